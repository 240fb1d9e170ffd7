//! The build context of `arrakis image build`: the directory COPY and ADD read from.
//!
//! [`BuildContext`] resolves the sources a COPY or ADD names (globs included) to paths inside
//! the context, honouring `.dockerignore`; hashes them into the step's cache key
//! ([`BuildContext::digest_sources`]); and lists what to copy where in the image
//! ([`BuildContext::plan_copy`]), with Docker's rules for directories and destinations.
//!
//! Nothing may escape the context: a source climbing out with `..`, or a symlink on the way to
//! a source that points outside, is an error. Absolute sources are taken relative to the
//! context root, as Docker does. Symlinks inside a copied directory are copied as symlinks,
//! whatever they point at: their targets are only ever resolved inside the image.

mod pattern;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::dockerfile::CopyKind;
use crate::oci::Digest;
use crate::unpack::Compression;

pub use pattern::{IgnoreRules, PatternError};

/// The ignore file read from the context root.
const IGNORE_FILE: &str = ".dockerignore";
/// How many symlinks resolving one source may follow (Linux's own limit).
const MAX_SYMLINKS: usize = 40;
/// Versions the digest's input format: change it when that format changes.
const DIGEST_DOMAIN: &[u8] = b"arrakis-build-context-v1\0";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("opening the build context `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the build context `{}` is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("reading `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{IGNORE_FILE} line {line}: {error}")]
    IgnorePattern { line: usize, error: PatternError },
    #[error("source `{written}`: {error}")]
    SourcePattern {
        written: String,
        error: PatternError,
    },
    #[error("source `{written}` is not in the build context")]
    NotFound { written: String },
    #[error("source `{written}` is excluded by {IGNORE_FILE}")]
    Ignored { written: String },
    #[error(
        "source pattern `{written}` matches no file in the build context (or only excluded ones)"
    )]
    NoMatch { written: String },
    #[error("source `{written}` leads outside the build context: {reason}")]
    Escapes { written: String, reason: String },
    #[error("source `{written}`: more than {MAX_SYMLINKS} symlinks to follow")]
    SymlinkLoop { written: String },
    #[error("source `{written}` is neither a regular file nor a directory")]
    UnsupportedType { written: String },
    #[error("`{}` changed while it was being read", path.display())]
    Changed { path: PathBuf },
    #[error("ADD cannot extract the {format} archive `{}`; decompress it first, or COPY it and extract it with RUN", path.display())]
    UnsupportedArchive { path: PathBuf, format: &'static str },
}

/// An opened build context.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Canonical, so absolute symlink targets can be compared with it.
    root: PathBuf,
    ignore: IgnoreRules,
}

/// What a source is, after following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Dir,
}

/// One resolved COPY/ADD source: a path written in the Dockerfile, or one match of a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The source as written in the Dockerfile, for messages.
    pub written: String,
    /// The matched path relative to the context root (empty for the root itself). Its last
    /// component names the copy of a file.
    pub path: PathBuf,
    /// `path` with symlinks followed: where the content is.
    pub resolved: PathBuf,
    pub kind: SourceKind,
}

/// What a copy entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    /// A symlink with this target, copied as is.
    Symlink(PathBuf),
    /// A tar archive (ADD only), to be extracted into the destination directory.
    Archive(Compression),
}

/// One thing to create in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyEntry {
    /// Where it is on the host.
    pub host_path: PathBuf,
    /// Where it goes in the image (absolute). Parents that do not exist are the executor's to
    /// create.
    pub dest: PathBuf,
    pub kind: EntryKind,
    /// The permission bits on the host (`--chmod` overrides them).
    pub mode: u32,
}

/// A file found under a source, before a destination is chosen.
struct Found {
    /// Relative to the source (empty for the source itself).
    rel: PathBuf,
    host_path: PathBuf,
    kind: EntryKind,
    mode: u32,
    size: u64,
}

impl BuildContext {
    /// Opens `dir` and reads its `.dockerignore`, if any.
    pub fn open(dir: &Path) -> Result<BuildContext, ContextError> {
        let open_error = |source| ContextError::Open {
            path: dir.to_path_buf(),
            source,
        };
        let root = fs::canonicalize(dir).map_err(open_error)?;
        if !fs::metadata(&root).map_err(open_error)?.is_dir() {
            return Err(ContextError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let ignore_path = root.join(IGNORE_FILE);
        let ignore = match fs::read_to_string(&ignore_path) {
            Ok(text) => IgnoreRules::parse(&text)
                .map_err(|(line, error)| ContextError::IgnorePattern { line, error })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => IgnoreRules::default(),
            Err(source) => {
                return Err(ContextError::Read {
                    path: ignore_path,
                    source,
                })
            }
        };
        Ok(BuildContext { root, ignore })
    }

    /// The context directory, canonicalized.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `.dockerignore` excludes this context-relative path.
    pub fn is_ignored(&self, path: &Path) -> bool {
        !path.as_os_str().is_empty() && self.ignore.is_ignored(&path.to_string_lossy())
    }

    /// Resolves COPY/ADD sources, in order; a glob contributes its matches sorted by path.
    pub fn resolve_sources(&self, sources: &[String]) -> Result<Vec<Source>, ContextError> {
        let mut resolved = Vec::new();
        for written in sources {
            let path = normalize(written)?;
            if pattern::has_wildcards(written) {
                let matches = self.glob(written, &path)?;
                if matches.is_empty() {
                    return Err(ContextError::NoMatch {
                        written: written.clone(),
                    });
                }
                resolved.extend(matches);
            } else {
                resolved.push(self.source(written, PathBuf::from(path))?);
            }
        }
        Ok(resolved)
    }

    /// A content hash of the sources for the build cache: each source's path and kind, then
    /// every entry under it in a stable order with its relative path, kind, permission bits,
    /// and file bytes or symlink target. Ownership and times are left out.
    pub fn digest_sources(&self, sources: &[Source]) -> Result<Digest, ContextError> {
        let mut hasher = Sha256::new_with_prefix(DIGEST_DOMAIN);
        for source in sources {
            put_bytes(&mut hasher, source.path.as_os_str().as_bytes());
            hasher.update([match source.kind {
                SourceKind::File => b'f',
                SourceKind::Dir => b'd',
            }]);
            for found in self.walk(source)? {
                let (tag, extra): (u8, &[u8]) = match &found.kind {
                    EntryKind::Dir => (b'd', b""),
                    EntryKind::File | EntryKind::Archive(_) => (b'f', b""),
                    EntryKind::Symlink(target) => (b'l', target.as_os_str().as_bytes()),
                };
                hasher.update([tag]);
                put_bytes(&mut hasher, found.rel.as_os_str().as_bytes());
                hasher.update(found.mode.to_be_bytes());
                put_bytes(&mut hasher, extra);
                if tag == b'f' {
                    hash_file(&mut hasher, &found.host_path, found.size)?;
                }
            }
        }
        Ok(Digest::from_sha256(hasher))
    }

    /// Lists what to create in the image for a COPY (or ADD) of `sources` to `dest` (absolute).
    ///
    /// Docker's rules: a directory source copies its contents (not itself) into the
    /// destination; with several sources, or `dest_is_dir`, the destination is a directory
    /// and each file source lands in it under its own name; a single file source to a
    /// non-directory destination is written at `dest` itself. For ADD, a file source that is
    /// a tar archive (plain, gzip or zstd) becomes an [`EntryKind::Archive`] entry to extract
    /// into `dest`.
    pub fn plan_copy(
        &self,
        sources: &[Source],
        dest: &str,
        dest_is_dir: bool,
        kind: CopyKind,
    ) -> Result<Vec<CopyEntry>, ContextError> {
        let into_dir = dest_is_dir || sources.len() > 1;
        let dest = PathBuf::from(dest);
        let mut entries = Vec::new();
        for source in sources {
            for found in self.walk(source)? {
                let (target, entry_kind) = match source.kind {
                    SourceKind::Dir => (join(&dest, &found.rel), found.kind),
                    SourceKind::File => {
                        let archive = match kind {
                            CopyKind::Add => archive_compression(&found.host_path)?,
                            CopyKind::Copy => None,
                        };
                        match (archive, source.path.file_name()) {
                            (Some(compression), _) => {
                                (dest.clone(), EntryKind::Archive(compression))
                            }
                            (None, Some(name)) if into_dir => (dest.join(name), found.kind),
                            (None, _) => (dest.clone(), found.kind),
                        }
                    }
                };
                entries.push(CopyEntry {
                    host_path: found.host_path,
                    dest: target,
                    kind: entry_kind,
                    mode: found.mode,
                });
            }
        }
        Ok(entries)
    }

    /// Resolves a literal source path (already normalized).
    fn source(&self, written: &str, path: PathBuf) -> Result<Source, ContextError> {
        let (resolved, metadata) = self.follow(written, &path)?;
        let kind = if metadata.is_dir() {
            SourceKind::Dir
        } else if metadata.is_file() {
            SourceKind::File
        } else {
            return Err(ContextError::UnsupportedType {
                written: written.to_owned(),
            });
        };
        let source = Source {
            written: written.to_owned(),
            path,
            resolved,
            kind,
        };
        if self.is_ignored(&source.path) || self.is_ignored(&source.resolved) {
            // An excluded directory still holds what exceptions re-include, as in Docker.
            let reincluded = kind == SourceKind::Dir
                && self.ignore.has_exceptions()
                && self.walk(&source)?.len() > 1;
            if !reincluded {
                return Err(ContextError::Ignored {
                    written: written.to_owned(),
                });
            }
        }
        Ok(source)
    }

    /// Follows `path` component by component inside the context, resolving symlinks within
    /// it; returns the resolved relative path and its metadata.
    fn follow(&self, written: &str, path: &Path) -> Result<(PathBuf, Metadata), ContextError> {
        let escapes = |reason: String| ContextError::Escapes {
            written: written.to_owned(),
            reason,
        };
        let not_found = || ContextError::NotFound {
            written: written.to_owned(),
        };
        let mut queue: VecDeque<PathBuf> = components(path).collect();
        let mut current = PathBuf::new();
        let mut metadata = fs::symlink_metadata(&self.root).map_err(|e| self.read_error("", e))?;
        let mut hops = 0;
        while let Some(part) = queue.pop_front() {
            if part.as_os_str() == ".." {
                if !current.pop() {
                    return Err(escapes("a symlink on the way climbs above the root".into()));
                }
                metadata = fs::symlink_metadata(self.root.join(&current))
                    .map_err(|e| self.read_error(&current, e))?;
                continue;
            }
            if !metadata.is_dir() {
                return Err(not_found());
            }
            let next = current.join(&part);
            metadata = match fs::symlink_metadata(self.root.join(&next)) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
                Err(e) => return Err(self.read_error(&next, e)),
            };
            if !metadata.file_type().is_symlink() {
                current = next;
                continue;
            }
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(ContextError::SymlinkLoop {
                    written: written.to_owned(),
                });
            }
            if self.is_ignored(&next) {
                return Err(ContextError::Ignored {
                    written: written.to_owned(),
                });
            }
            let target =
                fs::read_link(self.root.join(&next)).map_err(|e| self.read_error(&next, e))?;
            let relative = if target.is_absolute() {
                let inside = target.strip_prefix(&self.root).map_err(|_| {
                    escapes(format!(
                        "`{}` points to `{}`",
                        next.display(),
                        target.display()
                    ))
                })?;
                current = PathBuf::new();
                inside.to_path_buf()
            } else {
                target.clone()
            };
            for (index, part) in components(&relative).enumerate() {
                queue.insert(index, part);
            }
            let depth = current.components().count();
            let climbs = relative_climbs(&relative);
            if climbs > depth {
                return Err(escapes(format!(
                    "`{}` points to `{}`",
                    next.display(),
                    target.display()
                )));
            }
            metadata = fs::symlink_metadata(self.root.join(&current))
                .map_err(|e| self.read_error(&current, e))?;
        }
        Ok((current, metadata))
    }

    /// Matches a glob source (normalized to `path`) against the context, one segment at a
    /// time, without descending through symlinks.
    fn glob(&self, written: &str, path: &str) -> Result<Vec<Source>, ContextError> {
        let pattern_error = |error| ContextError::SourcePattern {
            written: written.to_owned(),
            error,
        };
        let mut candidates = vec![PathBuf::new()];
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (index, segment) in segments.iter().enumerate() {
            let last = index + 1 == segments.len();
            let glob = pattern::Glob::new(segment, false).map_err(pattern_error)?;
            let mut next = Vec::new();
            for dir in &candidates {
                let entries = match fs::read_dir(self.root.join(dir)) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                    Err(e) => return Err(self.read_error(dir, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| self.read_error(dir, e))?;
                    let name = entry.file_name();
                    if !glob.matches(&name.to_string_lossy()) {
                        continue;
                    }
                    let file_type = entry.file_type().map_err(|e| self.read_error(dir, e))?;
                    if last || file_type.is_dir() {
                        next.push(dir.join(name));
                    }
                }
            }
            candidates = next;
        }
        candidates.sort();
        let mut sources = Vec::new();
        for path in candidates {
            if self.is_ignored(&path) {
                continue;
            }
            match self.source(written, path) {
                Ok(source) => sources.push(source),
                // Excluded, or a socket or FIFO: a glob just does not match it.
                Err(ContextError::Ignored { .. } | ContextError::UnsupportedType { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sources)
    }

    /// Everything under a source, the source first, then depth-first in name order, without
    /// excluded entries. An excluded directory is still entered when `.dockerignore` has
    /// exceptions, and kept if anything in it is.
    fn walk(&self, source: &Source) -> Result<Vec<Found>, ContextError> {
        let host_path = self.root.join(&source.resolved);
        // Follow the source itself: it may be a symlink to the file or directory.
        let metadata =
            fs::metadata(&host_path).map_err(|e| self.read_error(&source.resolved, e))?;
        let mut found = vec![Found {
            rel: PathBuf::new(),
            host_path,
            kind: if source.kind == SourceKind::Dir {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            mode: metadata.permissions().mode() & 0o7777,
            size: metadata.len(),
        }];
        if source.kind == SourceKind::Dir {
            self.walk_dir(&source.resolved, Path::new(""), &mut found)?;
        }
        Ok(found)
    }

    /// Appends the entries of the directory `base/rel` (context-relative `base`).
    fn walk_dir(
        &self,
        base: &Path,
        rel: &Path,
        found: &mut Vec<Found>,
    ) -> Result<(), ContextError> {
        let dir = base.join(rel);
        let mut names: Vec<_> = fs::read_dir(self.root.join(&dir))
            .map_err(|e| self.read_error(&dir, e))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| self.read_error(&dir, e))?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let in_context = base.join(&rel);
            let host_path = self.root.join(&in_context);
            let metadata =
                fs::symlink_metadata(&host_path).map_err(|e| self.read_error(&in_context, e))?;
            let ignored = self.is_ignored(&in_context);
            let file_type = metadata.file_type();
            let mode = metadata.permissions().mode() & 0o7777;
            if file_type.is_dir() {
                if ignored && !self.ignore.has_exceptions() {
                    continue;
                }
                let at = found.len();
                found.push(Found {
                    rel: rel.clone(),
                    host_path,
                    kind: EntryKind::Dir,
                    mode,
                    size: 0,
                });
                self.walk_dir(base, &rel, found)?;
                if ignored && found.len() == at + 1 {
                    found.pop();
                }
                continue;
            }
            if ignored {
                continue;
            }
            let kind = if file_type.is_symlink() {
                let target =
                    fs::read_link(&host_path).map_err(|e| self.read_error(&in_context, e))?;
                EntryKind::Symlink(target)
            } else if file_type.is_file() {
                EntryKind::File
            } else {
                // Sockets, FIFOs and devices have no content to copy.
                continue;
            };
            found.push(Found {
                rel,
                host_path,
                kind,
                mode,
                size: metadata.len(),
            });
        }
        Ok(())
    }

    /// A read error about the context-relative `path`, reported with its full path.
    fn read_error(&self, path: impl AsRef<Path>, source: io::Error) -> ContextError {
        ContextError::Read {
            path: self.root.join(path),
            source,
        }
    }
}

/// Normalizes a written source to a `/`-separated path relative to the root: a leading `/`
/// and `.` components go, `..` climbs but never above the root.
fn normalize(written: &str) -> Result<String, ContextError> {
    if written.starts_with('/') {
        return Ok(pattern::clean(written).trim_start_matches('/').to_owned());
    }
    let cleaned = pattern::clean(written);
    if cleaned == ".." || cleaned.starts_with("../") {
        return Err(ContextError::Escapes {
            written: written.to_owned(),
            reason: "`..` climbs above the context root".to_owned(),
        });
    }
    Ok(if cleaned == "." {
        String::new()
    } else {
        cleaned
    })
}

/// The normal and `..` components of a relative path (`.` and roots dropped).
fn components(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(PathBuf::from(name)),
        Component::ParentDir => Some(PathBuf::from("..")),
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
    })
}

/// How far above its starting directory a relative path reaches at its highest point.
fn relative_climbs(path: &Path) -> usize {
    let (mut depth, mut lowest) = (0isize, 0isize);
    for part in components(path) {
        depth += if part.as_os_str() == ".." { -1 } else { 1 };
        lowest = lowest.min(depth);
    }
    lowest.unsigned_abs()
}

fn join(dest: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        dest.to_path_buf()
    } else {
        dest.join(rel)
    }
}

fn put_bytes(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// Hashes a file's size and bytes; the file must still have the size it was listed with.
fn hash_file(hasher: &mut Sha256, path: &Path, size: u64) -> Result<(), ContextError> {
    let read_error = |source| ContextError::Read {
        path: path.to_path_buf(),
        source,
    };
    hasher.update(size.to_be_bytes());
    let mut file = File::open(path).map_err(read_error)?;
    let copied = io::copy(&mut (&mut file).take(size), hasher).map_err(read_error)?;
    let mut probe = [0u8; 1];
    if copied != size || file.read(&mut probe).map_err(read_error)? != 0 {
        return Err(ContextError::Changed {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The compression of a tar archive, or `None` when the file is not one (Docker's test: the
/// decompressed start must be a valid tar header).
fn archive_compression(path: &Path) -> Result<Option<Compression>, ContextError> {
    let read_error = |source| ContextError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::new();
    File::open(path)
        .and_then(|file| file.take(512).read_to_end(&mut head))
        .map_err(read_error)?;
    let unsupported = |format| ContextError::UnsupportedArchive {
        path: path.to_path_buf(),
        format,
    };
    if head.starts_with(b"BZh") {
        return Err(unsupported("bzip2"));
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Err(unsupported("xz"));
    }
    let compression = crate::unpack::detect(&head);
    let block = match compression {
        Compression::None => head,
        _ => match compression.decoder(File::open(path).map_err(read_error)?) {
            Ok(decoder) => first_block(decoder),
            Err(_) => Vec::new(),
        },
    };
    Ok(is_tar_header(&block).then_some(compression))
}

/// The first 512 decompressed bytes, or fewer if the stream ends or is corrupt (then it is not
/// an archive, and is copied as a file).
fn first_block(reader: impl Read) -> Vec<u8> {
    let mut block = Vec::new();
    let _ = reader.take(512).read_to_end(&mut block);
    block
}

/// Whether a block is a tar header: 512 bytes whose checksum field matches.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 || block.iter().all(|b| *b == 0) {
        return false;
    }
    let field = &block[148..156];
    let digits: String = field
        .iter()
        .map(|b| *b as char)
        .filter(|c| !matches!(c, '\0' | ' '))
        .collect();
    let Ok(expected) = u32::from_str_radix(&digits, 8) else {
        return false;
    };
    let sum: u32 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == expected
}
