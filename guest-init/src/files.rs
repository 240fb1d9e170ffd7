//! The file requests: read (streamed out), write (streamed in, atomic by
//! temp file + rename), mkdir, list, stat, remove and chmod. Relative paths
//! resolve under [`DEFAULT_WORKDIR`]. The streaming ends are reached through
//! [`FileSink`] / [`FileSource`] so everything is testable without the mux.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use arrakis_protocol::{paths, FileKind, FileStat, DEFAULT_WORKDIR};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::exec::Gone;
use crate::system::temp_path_for;

/// Largest DATA chunk of a file read.
pub const CHUNK: usize = 64 * 1024;
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// Errors of file requests; each names the path it is about.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid path {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("invalid mode {mode:#o}: at most 0o7777")]
    BadMode { mode: u32 },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a directory")]
    IsDir { path: String },
    /// A device, FIFO or socket: replacing it would break the guest, and
    /// writing through it is not a file write.
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error("directory {path} is not empty (set recursive to remove it)")]
    NotEmpty { path: String },
    #[error("refusing to remove /")]
    RemoveRoot,
    #[error("the host abandoned the write of {path}")]
    Cancelled { path: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Validates a request path and makes it absolute (relative paths are under
/// [`DEFAULT_WORKDIR`]).
pub fn resolve(path: &str) -> Result<PathBuf, FileError> {
    paths::validate(path).map_err(|e| FileError::BadPath {
        path: path.to_owned(),
        reason: e.message,
    })?;
    Ok(Path::new(DEFAULT_WORKDIR).join(path))
}

fn check_mode(mode: u32) -> Result<u32, FileError> {
    if mode > 0o7777 {
        Err(FileError::BadMode { mode })
    } else {
        Ok(mode)
    }
}

/// Describes `meta` (from lstat); `name` is what the caller wants reported.
fn file_stat(name: String, meta: &std::fs::Metadata, link_target: Option<String>) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        name,
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        link_target,
    }
}

/// lstat of `path`, reported under the name `requested`.
pub fn stat(path: &Path, requested: &str) -> Result<FileStat, FileError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let target = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(io_err("read the link", path))?;
        Some(target.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(file_stat(requested.to_owned(), &meta, target))
}

/// The entries of a directory, sorted by name, each described by lstat.
pub fn list(path: &Path) -> Result<Vec<FileStat>, FileError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err("list", path))? {
        let entry = entry.map_err(io_err("list", path))?;
        // An entry removed while listing is skipped, not an error.
        let Ok(meta) = entry.metadata() else { continue };
        let target = if meta.file_type().is_symlink() {
            std::fs::read_link(entry.path())
                .ok()
                .map(|t| t.to_string_lossy().into_owned())
        } else {
            None
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push(file_stat(name, &meta, target));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Creates a directory (`parents`: like `mkdir -p`, an existing directory is fine).
pub fn mkdir(path: &Path, parents: bool, mode: Option<u32>) -> Result<(), FileError> {
    let mode = check_mode(mode.unwrap_or(DEFAULT_DIR_MODE))?;
    if parents && path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode)
        .create(path)
        .map_err(io_err("create the directory", path))?;
    // The builder's mode went through the umask; make it exact.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

/// Removes a file, a symlink (not its target) or a directory.
pub fn remove(path: &Path, recursive: bool) -> Result<(), FileError> {
    if path == Path::new("/") {
        return Err(FileError::RemoveRoot);
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err("remove", path))?;
    if !meta.is_dir() {
        return std::fs::remove_file(path).map_err(io_err("remove", path));
    }
    let result = if recursive {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_dir(path)
    };
    result.map_err(|source| {
        if source.raw_os_error() == Some(libc::ENOTEMPTY) {
            FileError::NotEmpty {
                path: path.display().to_string(),
            }
        } else {
            io_err("remove", path)(source)
        }
    })
}

/// Sets the permission bits (of a symlink's target: links have none).
pub fn chmod(path: &Path, mode: u32) -> Result<(), FileError> {
    let mode = check_mode(mode)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

/// Where a file read sends its bytes.
pub trait FileSink: Send + Sync {
    fn data(&self, data: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;
}

/// Streams `length` bytes (to the end when `None`) from `offset`; returns
/// how many were sent.
pub async fn read_file<S: FileSink>(
    path: &Path,
    offset: u64,
    length: Option<u64>,
    sink: &S,
) -> Result<u64, FileError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("open", path))?;
    let meta = file.metadata().await.map_err(io_err("stat", path))?;
    if meta.is_dir() {
        return Err(FileError::IsDir {
            path: path.display().to_string(),
        });
    }
    if offset > 0 {
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(io_err("seek in", path))?;
    }
    let mut remaining = length.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while remaining > 0 {
        let want = usize::try_from(remaining).unwrap_or(CHUNK).min(CHUNK);
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        if sink.data(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
            return Err(FileError::Cancelled {
                path: path.display().to_string(),
            });
        }
        sent += n as u64;
        remaining -= n as u64;
    }
    Ok(sent)
}

/// What a file write receives from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Data(Bytes),
    Eof,
    /// The host abandoned the stream or the session ended.
    Cancel,
}

/// Where a file write takes its bytes from.
pub trait FileSource: Send {
    fn next(&mut self) -> impl Future<Output = Incoming> + Send;
}

/// Options of a file write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits of a new file (default 0o644); an existing file keeps its own.
    pub mode: Option<u32>,
    pub create_parents: bool,
    pub append: bool,
}

/// Receives the file's bytes until EOF. Unless appending, they go to a
/// temporary file renamed over the target at the end, so readers never see
/// a half-written file and a cancelled write leaves the old content.
pub async fn write_file<S: FileSource>(
    path: &Path,
    options: WriteOptions,
    source: &mut S,
) -> Result<u64, FileError> {
    let mode = options.mode.map(check_mode).transpose()?;
    let owned = path.to_owned();
    let plan = tokio::task::spawn_blocking(move || WritePlan::prepare(&owned, options, mode))
        .await
        .map_err(|e| io_err("write", path)(io::Error::other(e.to_string())))??;
    let result = plan.receive(source).await;
    if result.is_err() {
        if let Some(temp) = &plan.temp {
            let _ = tokio::fs::remove_file(temp).await;
        }
    }
    result
}

/// Where the bytes of one write go, decided before any byte is received.
struct WritePlan {
    /// The file finally holding the content (a symlink's target, followed).
    target: PathBuf,
    /// The temporary file renamed over `target` (None when appending).
    temp: Option<PathBuf>,
    file: std::fs::File,
}

impl WritePlan {
    fn prepare(
        path: &Path,
        options: WriteOptions,
        mode: Option<u32>,
    ) -> Result<WritePlan, FileError> {
        if options.create_parents {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("create the parents of", path))?;
            }
        }
        let target = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
            }
            _ => path.to_owned(),
        };
        let existing = std::fs::metadata(&target).ok();
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(FileError::IsDir {
                path: target.display().to_string(),
            });
        }
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            return Err(FileError::NotRegular {
                path: target.display().to_string(),
            });
        }
        let open_at = if options.append {
            target.clone()
        } else {
            temp_path_for(&target)
        };
        let new_mode = mode.unwrap_or(DEFAULT_FILE_MODE);
        let mut open = std::fs::OpenOptions::new();
        open.write(true).mode(0o600);
        if options.append {
            open.append(true).create(true);
        } else {
            open.create_new(true);
        }
        let file = open.open(&open_at).map_err(io_err("open", &open_at))?;
        let (mode, owner) = match &existing {
            Some(meta) => (meta.mode() & 0o7777, Some((meta.uid(), meta.gid()))),
            None => (new_mode, None),
        };
        let plan = WritePlan {
            target,
            temp: (!options.append).then_some(open_at),
            file,
        };
        // A file created here gets exactly `mode`; an existing one (or its
        // replacement) keeps its mode and owner.
        if !(options.append && existing.is_some()) {
            let finish = || -> io::Result<()> {
                plan.file
                    .set_permissions(std::fs::Permissions::from_mode(mode))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::fchown(&plan.file, Some(uid), Some(gid))?;
                }
                Ok(())
            };
            if let Err(source) = finish() {
                if let Some(temp) = &plan.temp {
                    let _ = std::fs::remove_file(temp);
                }
                return Err(io_err("set the mode of", path)(source));
            }
        }
        Ok(plan)
    }

    async fn receive<S: FileSource>(&self, source: &mut S) -> Result<u64, FileError> {
        let written_path = self.temp.as_deref().unwrap_or(&self.target);
        let handle = self
            .file
            .try_clone()
            .map_err(io_err("write", written_path))?;
        let mut file = tokio::fs::File::from_std(handle);
        let mut written = 0u64;
        loop {
            match source.next().await {
                Incoming::Data(data) => {
                    file.write_all(&data)
                        .await
                        .map_err(io_err("write", written_path))?;
                    written += data.len() as u64;
                }
                Incoming::Eof => break,
                Incoming::Cancel => {
                    return Err(FileError::Cancelled {
                        path: self.target.display().to_string(),
                    })
                }
            }
        }
        file.flush().await.map_err(io_err("write", written_path))?;
        drop(file);
        if let Some(temp) = &self.temp {
            tokio::fs::rename(temp, &self.target)
                .await
                .map_err(io_err("replace", &self.target))?;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests;
