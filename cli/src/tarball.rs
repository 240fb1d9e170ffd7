//! Directories as tar archives, on this machine's side of `cp`: packing a
//! local directory to upload, and unpacking a downloaded archive into a
//! local directory without letting any entry land outside it.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

/// Writes a tar of the contents of `root` (entries relative to it, no
/// leading `./`) to `out`. Symlinks are stored as links, never followed;
/// sockets, FIFOs and devices are skipped. Owners are stored as root.
/// Returns the writer and the number of entries.
pub fn pack<W: Write>(root: &Path, out: W) -> anyhow::Result<(W, u64)> {
    let meta = fs::metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut count = 0;
    add_dir(&mut builder, root, Path::new(""), &mut count)?;
    builder.finish()?;
    Ok((builder.into_inner()?, count))
}

fn add_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    relative: &Path,
    count: &mut u64,
) -> anyhow::Result<()> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = relative.join(&name);
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_uid(0);
        header.set_gid(0);
        let kind = meta.file_type();
        if kind.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, &rel, io::empty())?;
            *count += 1;
            add_dir(builder, &path, &rel, count)?;
        } else if kind.is_file() {
            let file =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            builder
                .append_data(&mut header, &rel, file)
                .with_context(|| format!("packing {}", path.display()))?;
            *count += 1;
        } else if kind.is_symlink() {
            let target =
                fs::read_link(&path).with_context(|| format!("reading {}", path.display()))?;
            header.set_size(0);
            builder.append_link(&mut header, &rel, &target)?;
            *count += 1;
        } else {
            eprintln!(
                "arrakis: skipping {}: not a file, directory or symlink",
                path.display()
            );
        }
    }
    Ok(())
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
    /// Entries of kinds not unpacked (devices, FIFOs).
    pub skipped: u64,
    /// Symlinks not created because they point outside the destination
    /// (`path -> target`).
    pub refused_links: Vec<String>,
}

/// The path of an archive entry relative to the destination, or why it is
/// refused: absolute, or climbing out with `..`. `.` components are
/// dropped; the archive's root (`./`) is the empty path.
pub fn entry_path(raw: &Path) -> anyhow::Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                bail!("refusing archive entry {}: absolute path", raw.display())
            }
            Component::ParentDir => {
                bail!(
                    "refusing archive entry {}: it climbs out with '..'",
                    raw.display()
                )
            }
        }
    }
    Ok(out)
}

/// Whether the symlink at `link` (relative to the destination) pointing to
/// `target` stays inside the destination, resolved lexically.
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.has_root() {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(part) => Some(part),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for component in target.components() {
        match component {
            Component::Normal(part) => depth.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Refuses to go through a symlink on the way to `relative` under `dest`
/// (an earlier entry may have planted one).
fn check_parents(dest: &Path, relative: &Path) -> anyhow::Result<()> {
    let mut path = dest.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => bail!(
                "refusing archive entry {}: it goes through the symlink {}",
                relative.display(),
                path.display()
            ),
            Ok(meta) if !meta.is_dir() => bail!(
                "refusing archive entry {}: {} is not a directory",
                relative.display(),
                path.display()
            ),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(())
}

/// Removes what is at `path` unless it is a directory (which is kept and
/// merged into), so a file or link never writes through an old symlink.
fn clear(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => fs::remove_file(path).with_context(|| format!("replacing {}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Unpacks `archive` into `dest` (created if missing). Nothing is written
/// outside `dest`: an entry with an absolute path or `..`, one whose path
/// goes through a symlink, or a hard link to outside fails the unpack at
/// that entry; a symlink pointing outside is not created (it is listed in
/// [`Unpacked::refused_links`]). A file never writes through an existing
/// symlink: the link is replaced.
pub fn unpack<R: Read>(archive: R, dest: &Path) -> anyhow::Result<Unpacked> {
    // The mode of a directory that was already there is left alone.
    let existed = dest.is_dir();
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut archive = tar::Archive::new(archive);
    let mut stats = Unpacked::default();
    // Directory modes are applied last, so a read-only directory does not
    // stop its own contents from being written.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let raw = entry
            .path()
            .context("an archive entry's path")?
            .into_owned();
        let relative = entry_path(&raw)?;
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        if relative.as_os_str().is_empty() {
            if kind.is_dir() {
                if !existed {
                    dir_modes.push((dest.to_path_buf(), mode));
                }
                continue;
            }
            bail!("refusing archive entry {}: not a directory", raw.display());
        }
        check_parents(dest, &relative)?;
        let target = dest.join(&relative);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&target)?;
                        fs::create_dir(&target)?;
                    }
                    Err(_) => fs::create_dir(&target)
                        .with_context(|| format!("creating {}", target.display()))?,
                }
                dir_modes.push((target, mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear(&target)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                stats.bytes += io::copy(&mut entry, &mut file)
                    .with_context(|| format!("writing {}", target.display()))?;
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = file.set_modified(when);
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .context("a symlink entry's target")?
                    .context("a symlink entry without a target")?
                    .into_owned();
                if !link_stays_inside(&relative, &link) {
                    stats.refused_links.push(format!(
                        "{} -> {}",
                        relative.display(),
                        link.display()
                    ));
                    continue;
                }
                clear(&target)?;
                std::os::unix::fs::symlink(&link, &target)
                    .with_context(|| format!("creating the symlink {}", target.display()))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .context("a hard link entry's target")?
                    .context("a hard link entry without a target")?
                    .into_owned();
                let source_rel = entry_path(&link)?;
                check_parents(dest, &source_rel)?;
                let source = dest.join(&source_rel);
                let meta = fs::symlink_metadata(&source).with_context(|| {
                    format!(
                        "archive entry {}: its link target {} is not unpacked",
                        raw.display(),
                        link.display()
                    )
                })?;
                if !meta.is_file() {
                    bail!(
                        "refusing archive entry {}: a hard link to {}, which is not a file",
                        raw.display(),
                        link.display()
                    );
                }
                clear(&target)?;
                fs::hard_link(&source, &target)
                    .with_context(|| format!("linking {}", target.display()))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => {
                stats.skipped += 1;
                continue;
            }
        }
        stats.entries += 1;
    }
    // Deepest first, so a parent's mode cannot block a child's.
    dir_modes.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    for (path, mode) in dir_modes {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive whose entries carry raw names the `tar` crate's own
    /// builder would refuse to write.
    fn raw_archive(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            {
                let gnu = header.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                if let Some(link) = link {
                    gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
                }
            }
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack_bytes(bytes: &[u8], dest: &Path) -> anyhow::Result<Unpacked> {
        unpack(bytes, dest)
    }

    #[test]
    fn packs_and_unpacks_a_tree_byte_exact() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path();
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        let binary: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 256) as u8).collect();
        fs::write(root.join("bin.dat"), &binary).unwrap();
        fs::write(root.join("sub/deeper/é ü.txt"), "héllo\n").unwrap();
        fs::write(root.join("empty"), "").unwrap();
        fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("../bin.dat", root.join("sub/link")).unwrap();
        let long = "n".repeat(150);
        fs::write(root.join(&long), "long").unwrap();

        let (bytes, count) = pack(root, Vec::new()).unwrap();
        assert_eq!(count, 7);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("copy");
        let stats = unpack_bytes(&bytes, &dest).unwrap();
        assert_eq!(stats.entries, 7);
        assert_eq!(fs::read(dest.join("bin.dat")).unwrap(), binary);
        assert_eq!(
            fs::read_to_string(dest.join("sub/deeper/é ü.txt")).unwrap(),
            "héllo\n"
        );
        assert_eq!(fs::read(dest.join("empty")).unwrap(), b"");
        assert_eq!(
            fs::metadata(dest.join("empty"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(dest.join("sub/link")).unwrap(),
            Path::new("../bin.dat")
        );
        assert_eq!(fs::read_to_string(dest.join(&long)).unwrap(), "long");
    }

    #[test]
    fn entry_paths() {
        assert_eq!(entry_path(Path::new("./a/./b")).unwrap(), Path::new("a/b"));
        assert_eq!(entry_path(Path::new("./")).unwrap(), Path::new(""));
        assert!(entry_path(Path::new("/etc/passwd")).is_err());
        assert!(entry_path(Path::new("a/../../x")).is_err());
        assert!(entry_path(Path::new("a/../b")).is_err());
    }

    #[test]
    fn link_targets() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("b")));
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(link_stays_inside(
            Path::new("a/b/l"),
            Path::new("../../c/./d")
        ));
        assert!(!link_stays_inside(Path::new("l"), Path::new("../x")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../x")));
        assert!(!link_stays_inside(
            Path::new("a/l"),
            Path::new("/etc/passwd")
        ));
        assert!(!link_stays_inside(
            Path::new("a/l"),
            Path::new("b/../../../x")
        ));
    }

    #[test]
    fn refuses_entries_that_escape() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let out = tempfile::tempdir().unwrap();
        let outside = out.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "absolute",
                raw_archive(&[("/tmp/arrakis-evil", Regular, b"x", None)]),
            ),
            ("dotdot", raw_archive(&[("../evil", Regular, b"x", None)])),
            (
                "nested dotdot",
                raw_archive(&[("a/../../evil", Regular, b"x", None)]),
            ),
            (
                "hard link out",
                raw_archive(&[("h", Link, b"", Some("../outside/f"))]),
            ),
        ];
        for (label, bytes) in cases {
            let dest = out.path().join(format!("dest-{}", label.replace(' ', "-")));
            let err = unpack_bytes(&bytes, &dest).unwrap_err();
            assert!(err.to_string().contains("refusing"), "{label}: {err:#}");
        }
        // Symlinks pointing out are not created; the rest is unpacked.
        let dest = out.path().join("links");
        let bytes = raw_archive(&[
            ("abs", Symlink, b"", Some("/etc")),
            ("d/up", Symlink, b"", Some("../../outside")),
            ("d/in", Symlink, b"", Some("../f")),
            ("f", Regular, b"x", None),
        ]);
        let stats = unpack_bytes(&bytes, &dest).unwrap();
        assert_eq!(
            stats.refused_links,
            ["abs -> /etc", "d/up -> ../../outside"]
        );
        assert_eq!(stats.entries, 2);
        assert!(fs::symlink_metadata(dest.join("abs")).is_err());
        assert!(fs::symlink_metadata(dest.join("d/up")).is_err());
        assert_eq!(fs::read_link(dest.join("d/in")).unwrap(), Path::new("../f"));
        // A symlink planted outside the tree by hand, then written through.
        let dest = out.path().join("planted");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("d")).unwrap();
        let bytes = raw_archive(&[("d/f", Regular, b"x", None)]);
        let err = unpack_bytes(&bytes, &dest).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err:#}");
        // A link to a sibling, then a file written "through" it: the link
        // is in the tree, but entries never go through links.
        let dest = out.path().join("through");
        let bytes = raw_archive(&[
            ("d", Directory, b"", None),
            ("d/l", Symlink, b"", Some("..")),
            ("d/l/f", Regular, b"x", None),
        ]);
        let err = unpack_bytes(&bytes, &dest).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err:#}");
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn a_file_replaces_an_old_symlink_instead_of_writing_through_it() {
        let out = tempfile::tempdir().unwrap();
        let victim = out.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let dest = out.path().join("dest");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&victim, dest.join("f")).unwrap();
        let bytes = raw_archive(&[("f", tar::EntryType::Regular, b"new", None)]);
        unpack_bytes(&bytes, &dest).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "new");
        assert!(!fs::symlink_metadata(dest.join("f"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn dot_prefixed_archives_as_gnu_tar_writes_them() {
        use tar::EntryType::{Directory, Regular};
        let out = tempfile::tempdir().unwrap();
        let bytes = raw_archive(&[
            ("./", Directory, b"", None),
            ("./a/", Directory, b"", None),
            ("./a/f", Regular, b"data", None),
        ]);
        let stats = unpack_bytes(&bytes, out.path()).unwrap();
        assert_eq!(stats.entries, 2);
        assert_eq!(fs::read(out.path().join("a/f")).unwrap(), b"data");
    }
}
