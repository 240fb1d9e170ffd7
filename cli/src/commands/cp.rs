//! cp, upload and download: files and directories between this machine and
//! a sandbox. Files go as raw bytes; directories as tar archives (packed
//! and unpacked here by [`crate::tarball`]).

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use arrakis_api::wire::fs::EntryKind;

use crate::backend::Backend;
use crate::cli::{CpArgs, DownloadArgs, UploadArgs};
use crate::tarball;

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Sandbox { name: String, path: String },
}

/// `NAME:PATH` names a path in a sandbox; anything else is local. A local
/// path containing ':' can be written as `./a:b`.
fn place(text: &str) -> Place {
    match text.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => Place::Sandbox {
            name: name.to_string(),
            path: path.to_string(),
        },
        _ => Place::Local(PathBuf::from(text)),
    }
}

fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
}

/// `dir/name`, for a sandbox path (`name` alone when `dir` is empty).
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() || dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

pub async fn copy(backend: &Backend, args: CpArgs) -> anyhow::Result<u8> {
    match (place(&args.source), place(&args.destination)) {
        (Place::Local(local), Place::Sandbox { name, path }) => {
            upload(backend, &local, &name, &path, args.mode).await
        }
        (Place::Sandbox { name, path }, Place::Local(local)) => {
            let target = download_target(backend, &name, &path, &local).await?;
            download(backend, &name, &path, &target).await
        }
        _ => bail!("cp copies between this machine and a sandbox: exactly one of SOURCE and DESTINATION must be NAME:PATH"),
    }?;
    Ok(0)
}

async fn is_remote_dir(backend: &Backend, name: &str, path: &str) -> bool {
    // Any failure (absent path, absent sandbox) means "not a directory";
    // the transfer itself then reports what is wrong.
    !path.is_empty()
        && backend
            .stat(name, path)
            .await
            .is_ok_and(|entry| entry.kind == EntryKind::Dir)
}

/// The name a local path is copied under (`.` is the directory's own).
fn local_name(local: &Path) -> anyhow::Result<String> {
    let named = match local.file_name() {
        Some(name) => PathBuf::from(name),
        None => local
            .canonicalize()
            .with_context(|| format!("resolving {}", local.display()))?
            .file_name()
            .map(PathBuf::from)
            .with_context(|| format!("{} has no name to copy under", local.display()))?,
    };
    named
        .to_str()
        .map(str::to_string)
        .context("the local file name is not valid UTF-8")
}

/// Copies a local file or directory to `path` in the sandbox. Into an
/// existing directory (or a path ending in `/`) it goes under its own name.
async fn upload(
    backend: &Backend,
    local: &Path,
    name: &str,
    path: &str,
    mode: Option<u32>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("reading {}", local.display()))?;
    let into_dir =
        path.is_empty() || path.ends_with('/') || is_remote_dir(backend, name, path).await;
    let target = if into_dir {
        join(path, &local_name(local)?)
    } else {
        path.to_string()
    };
    if meta.is_dir() {
        let root = local.to_path_buf();
        let archive = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
            let file = tempfile::tempfile().context("creating a temporary file")?;
            let (mut file, _) = tarball::pack(&root, file)?;
            file.seek(SeekFrom::Start(0))?;
            Ok(file)
        })
        .await??;
        backend
            .put_archive(name, &target, tokio::fs::File::from_std(archive))
            .await
            .with_context(|| format!("copying {} to {name}:{target}", local.display()))?;
    } else if meta.is_file() {
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("opening {}", local.display()))?;
        let mode = mode.unwrap_or(meta.permissions().mode() & 0o777);
        backend
            .write_file(name, &target, file, mode)
            .await
            .with_context(|| format!("writing {name}:{target}"))?;
    } else {
        bail!("{} is not a regular file or a directory", local.display());
    }
    Ok(())
}

/// Where `cp NAME:PATH LOCAL` lands: into LOCAL if it is a directory
/// (under the sandbox path's name), else LOCAL itself.
async fn download_target(
    backend: &Backend,
    name: &str,
    path: &str,
    local: &Path,
) -> anyhow::Result<PathBuf> {
    if !local.is_dir() {
        return Ok(local.to_path_buf());
    }
    match base_name(path) {
        Some(base) => Ok(local.join(base)),
        // `/`, `.` and the like: a directory, unpacked into LOCAL.
        None if is_remote_dir(backend, name, path).await => Ok(local.to_path_buf()),
        None => bail!("{name}:{path} has no file name; give the local file name"),
    }
}

/// Copies the sandbox file or directory at `path` to exactly `target`.
async fn download(backend: &Backend, name: &str, path: &str, target: &Path) -> anyhow::Result<()> {
    let entry = backend.stat(name, path).await?;
    if entry.kind == EntryKind::Dir {
        let mut archive =
            tokio::fs::File::from_std(tempfile::tempfile().context("creating a temporary file")?);
        backend
            .get_archive(name, path, &mut archive)
            .await
            .with_context(|| format!("reading {name}:{path}"))?;
        let mut archive = archive.into_std().await;
        let target = target.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            archive.seek(SeekFrom::Start(0))?;
            let stats = tarball::unpack(std::io::BufReader::new(archive), &target)?;
            for link in &stats.refused_links {
                eprintln!(
                    "arrakis: not creating the symlink {link}: it points outside the destination"
                );
            }
            if stats.skipped > 0 {
                eprintln!(
                    "arrakis: skipped {} entries that are not files, directories or links",
                    stats.skipped
                );
            }
            Ok(())
        })
        .await??;
        return Ok(());
    }
    let file_name = target
        .file_name()
        .context("the local destination has no file name")?;
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(file_name);
    partial_name.push(".arrakis-partial");
    let partial = target.with_file_name(partial_name);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    if let Err(error) = backend.read_file(name, path, &mut file).await {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error).with_context(|| format!("reading {name}:{path}"));
    }
    file.sync_all().await?;
    tokio::fs::rename(&partial, target)
        .await
        .with_context(|| format!("moving the download to {}", target.display()))?;
    Ok(())
}

/// The original client's `upload -n NAME -f SRC -f DST [-f SRC -f DST...]`.
pub async fn upload_pairs(backend: &Backend, args: UploadArgs) -> anyhow::Result<u8> {
    if !args.files.len().is_multiple_of(2) {
        bail!(
            "-f takes pairs: a local source, then its sandbox destination (-f SRC -f DST or -f SRC,DST); got {} paths",
            args.files.len()
        );
    }
    let name = args.name.get();
    for pair in args.files.chunks(2) {
        upload(backend, Path::new(&pair[0]), name, &pair[1], None).await?;
    }
    Ok(0)
}

/// Where `download -p PATH` writes: a relative PATH at the same relative
/// path here (as the original client did), an absolute one under its file
/// name in the current directory (the original wrote to the same absolute
/// path on this machine, which could overwrite anything).
fn download_destination(path: &str) -> anyhow::Result<PathBuf> {
    if path.starts_with('/') {
        return base_name(path)
            .map(PathBuf::from)
            .with_context(|| format!("{path} has no file name"));
    }
    let relative = tarball::entry_path(Path::new(path))
        .map_err(|_| anyhow::anyhow!("{path}: a relative path must not climb out with '..'"))?;
    if relative.as_os_str().is_empty() {
        bail!("{path:?} names no file");
    }
    Ok(relative)
}

/// The original client's `download -n NAME -p PATH [-p PATH...]`: every
/// path is tried; failures are reported and make the exit code 1.
pub async fn download_paths(backend: &Backend, args: DownloadArgs) -> anyhow::Result<u8> {
    let name = args.name.get();
    let mut failed = 0;
    for path in &args.paths {
        let result = async {
            let target = download_destination(path)?;
            if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(parent)
                    .await
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            download(backend, name, path, &target).await
        }
        .await;
        if let Err(error) = result {
            eprintln!("arrakis: {path}: {}", crate::output::error_chain(&error));
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} downloads failed", args.paths.len());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_sandbox_paths_from_local_ones() {
        assert_eq!(
            place("box:/etc/hosts"),
            Place::Sandbox {
                name: "box".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            place("my box:a b"),
            Place::Sandbox {
                name: "my box".into(),
                path: "a b".into()
            }
        );
        assert_eq!(place("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(place("/tmp/x"), Place::Local("/tmp/x".into()));
        assert_eq!(place(":x"), Place::Local(":x".into()));
    }

    #[test]
    fn base_names_and_joins() {
        assert_eq!(base_name("/a/b.txt"), Some("b.txt"));
        assert_eq!(base_name("/a/dir/"), Some("dir"));
        assert_eq!(base_name("rel"), Some("rel"));
        assert_eq!(base_name("/"), None);
        assert_eq!(base_name("."), None);
        assert_eq!(base_name("a/.."), None);
        assert_eq!(join("", "f"), "f");
        assert_eq!(join("/root/", "f"), "/root/f");
        assert_eq!(join("/root", "f"), "/root/f");
    }

    #[test]
    fn local_names() {
        assert_eq!(local_name(Path::new("/tmp/a.txt")).unwrap(), "a.txt");
        assert_eq!(local_name(Path::new("dir/")).unwrap(), "dir");
        let here = std::env::current_dir().unwrap();
        let expected = here.file_name().unwrap().to_str().unwrap();
        assert_eq!(local_name(Path::new(".")).unwrap(), expected);
    }

    #[test]
    fn download_destinations() {
        assert_eq!(
            download_destination("/etc/hostname").unwrap(),
            Path::new("hostname")
        );
        assert_eq!(
            download_destination("out/a.txt").unwrap(),
            Path::new("out/a.txt")
        );
        assert_eq!(download_destination("./x").unwrap(), Path::new("x"));
        assert!(download_destination("../x").is_err());
        assert!(download_destination("a/../../x").is_err());
        assert!(download_destination("/").is_err());
        assert!(download_destination(".").is_err());
    }
}
