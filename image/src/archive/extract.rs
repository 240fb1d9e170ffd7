//! Extracts an untrusted image archive (a tar, plain or gzip or zstd compressed) into a private
//! scratch directory in one pass, so its entries can then be read in any order.
//!
//! Only plain relative names are accepted (no absolute paths, no `..`), and only regular files,
//! directories and links. Links are never created as symlinks: once every entry is written, a
//! symbolic or hard link whose target is a regular file of the archive becomes a hard link to
//! it (`docker save` writes a layer shared by several images once and links the others to it).
//! A link pointing outside the archive is refused; one to nothing is dropped.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::{io_error, ArchiveError};
use crate::unpack;

const BUFFER_SIZE: usize = 256 * 1024;

/// A link entry, both names relative to the archive root.
struct Link {
    name: PathBuf,
    target: PathBuf,
}

/// Writes the regular files and directories of the tar at `archive` under `dest`, then
/// materializes its links (see the module documentation).
pub(super) fn extract(archive: &Path, dest: &Path) -> Result<(), ArchiveError> {
    let tar_error = |source| ArchiveError::Tar {
        path: archive.to_path_buf(),
        source,
    };
    let file = File::open(archive).map_err(|source| io_error("opening", archive, source))?;
    let mut reader = BufReader::with_capacity(BUFFER_SIZE, file);
    let head = reader.fill_buf().map_err(tar_error)?;
    let stream = unpack::detect(head).decoder(reader).map_err(tar_error)?;
    let mut tar = tar::Archive::new(stream);
    let mut links = Vec::new();
    for entry in tar.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let raw = entry.path().map_err(tar_error)?.into_owned();
        let unsafe_name = |reason| ArchiveError::UnsafeName {
            name: raw.display().to_string(),
            reason,
        };
        let name = clean_relative(&raw).map_err(unsafe_name)?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Directory => {
                let path = dest.join(&name);
                fs::create_dir_all(&path).map_err(|e| io_error("creating", &path, e))?;
            }
            EntryType::Regular | EntryType::Continuous => {
                if name.as_os_str().is_empty() {
                    return Err(unsafe_name("a file cannot be the archive's root"));
                }
                write_file(&mut entry, &dest.join(&name), archive)?;
            }
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(tar_error)?
                    .ok_or_else(|| unsafe_name("the link has no target"))?;
                let target = if kind == EntryType::Symlink {
                    resolve_symlink(&name, &target)
                } else {
                    clean_relative(&target).ok()
                };
                let target =
                    target.ok_or_else(|| unsafe_name("the link points outside the archive"))?;
                if name.as_os_str().is_empty() {
                    return Err(unsafe_name("a link cannot be the archive's root"));
                }
                links.push(Link { name, target });
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {}
            _ => {
                return Err(unsafe_name(
                    "devices, FIFOs and sparse files have no place in an image archive",
                ))
            }
        }
    }
    materialize_links(dest, links)
}

/// A name made of plain components only (`.` components are dropped); the reason otherwise.
/// The empty path names the root.
pub(super) fn clean_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` is not allowed"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute names are not allowed")
            }
        }
    }
    Ok(clean)
}

/// Where a symlink at `name` pointing at `target` leads, relative to the archive root, or
/// `None` when that is outside it (absolute targets, or `..` climbing above the root).
fn resolve_symlink(name: &Path, target: &Path) -> Option<PathBuf> {
    let mut parts: Vec<OsString> = name
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .map(|c| c.as_os_str().to_owned())
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// Copies one entry's content to `path`, telling read errors (the archive) from write errors.
fn write_file(entry: &mut impl Read, path: &Path, archive: &Path) -> Result<(), ArchiveError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
    }
    let mut file = File::create(path).map_err(|e| io_error("creating", path, e))?;
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ArchiveError::Tar {
                    path: archive.to_path_buf(),
                    source,
                })
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| io_error("writing", path, e))?;
    }
    Ok(())
}

/// Hard-links each link to its target once the target is a regular file, repeating while that
/// makes progress so chains of links resolve. Links that never reach a file are dropped.
fn materialize_links(dest: &Path, mut pending: Vec<Link>) -> Result<(), ArchiveError> {
    pending.retain(|link| link.name != link.target);
    while !pending.is_empty() {
        let before = pending.len();
        let mut waiting = Vec::new();
        for link in pending {
            let target = dest.join(&link.target);
            if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
                waiting.push(link);
                continue;
            }
            let path = dest.join(&link.name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
            }
            // A later entry replaces an earlier one of the same name, as tar does.
            let _ = fs::remove_file(&path);
            fs::hard_link(&target, &path).map_err(|e| io_error("linking", &path, e))?;
        }
        if waiting.len() == before {
            break;
        }
        pending = waiting;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_stay_inside() {
        assert_eq!(
            clean_relative(Path::new("./a/./b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert_eq!(clean_relative(Path::new("./")).unwrap(), PathBuf::new());
        assert!(clean_relative(Path::new("a/../b")).is_err());
        assert!(clean_relative(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn symlinks_resolve_from_their_directory() {
        let resolve =
            |name: &str, target: &str| resolve_symlink(Path::new(name), Path::new(target));
        assert_eq!(
            resolve("b/layer.tar", "../a/layer.tar"),
            Some(PathBuf::from("a/layer.tar"))
        );
        assert_eq!(resolve("x", "./y"), Some(PathBuf::from("y")));
        assert_eq!(resolve("b/layer.tar", "../../etc/passwd"), None);
        assert_eq!(resolve("x", "/etc/passwd"), None);
    }
}
