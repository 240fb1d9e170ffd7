//! File system primitives for the unpacker: lexical path checks, symlink-free parent resolution
//! and the metadata calls std does not offer without following symlinks.
//!
//! Parents are checked with `symlink_metadata` on each component rather than walked with
//! `openat(O_NOFOLLOW)`. That is sound because the unpack root is private to the unpacker while a
//! layer is applied: nothing else can swap a checked directory for a symlink between the check
//! and the write. The final component is never followed either: it is removed and recreated,
//! and metadata calls use the no-follow variants (or target a node just created as a
//! non-symlink).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{Rejection, UnpackError};

/// Turns a tar entry path into a path relative to the root, resolving `.` and `..` lexically.
///
/// The result is what gets written, so a `..` that would climb above the root is refused
/// instead of being clamped: a layer that tries it is malformed or hostile.
pub(super) fn normalize(raw: &Path) -> Result<PathBuf, Rejection> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => return Err(Rejection::Absolute),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(Rejection::EscapesRoot);
                }
            }
            Component::Normal(name) => out.push(name),
        }
    }
    Ok(out)
}

/// What [`resolve_parents`] does about a parent directory that does not exist yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum MissingParents {
    /// Create it (mode 0755), as tar does for entries whose directory entry was omitted.
    Create,
    /// Report it: whiteouts and hard link targets never create anything.
    Report,
}

/// Checks every parent of `rel` below `root` is a real directory, never a symlink.
///
/// Returns `false` when a parent is missing and `missing` is [`MissingParents::Report`].
pub(super) fn resolve_parents(
    root: &Path,
    rel: &Path,
    entry: &Path,
    missing: MissingParents,
) -> Result<bool, UnpackError> {
    let Some(parent) = rel.parent() else {
        return Ok(true);
    };
    let mut prefix = PathBuf::new();
    for component in parent.components() {
        prefix.push(component);
        let full = root.join(&prefix);
        match fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::rejected(
                    entry,
                    Rejection::SymlinkParent(prefix),
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::rejected(
                    entry,
                    Rejection::ParentNotDir(prefix),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if missing == MissingParents::Report {
                    return Ok(false);
                }
                create_dir(&full, 0o755)?;
            }
            Err(e) => return Err(UnpackError::io("inspecting", &full, e)),
        }
    }
    Ok(true)
}

/// Creates one directory with exactly `mode`, whatever the process umask.
pub(super) fn create_dir(path: &Path, mode: u32) -> Result<(), UnpackError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| UnpackError::io("creating directory", path, e))?;
    set_mode(path, mode)
}

/// Removes whatever is at `path` (a whole tree for a directory) without following symlinks.
pub(super) fn remove_any(path: &Path) -> Result<(), UnpackError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| UnpackError::io("removing", path, e))
}

/// Sets permission bits including setuid/setgid/sticky. Callers never pass a symlink.
pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), UnpackError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| UnpackError::io("setting mode of", path, e))
}

/// Sets the owner of `path` itself (never a symlink's target).
pub(super) fn set_owner(path: &Path, uid: u64, gid: u64) -> Result<(), UnpackError> {
    let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
        (Ok(uid), Ok(gid)) => (uid, gid),
        _ => {
            let e = io::Error::new(io::ErrorKind::InvalidData, "uid or gid above 2^32");
            return Err(UnpackError::io("changing owner of", path, e));
        }
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| UnpackError::io("changing owner of", path, e))
}

/// A modification time as stored in the archive (PAX records may carry nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timestamp {
    pub(super) secs: i64,
    pub(super) nanos: u32,
}

/// Sets access and modification time of `path` itself (symlinks included) to `time`.
pub(super) fn set_mtime(path: &Path, time: Timestamp) -> Result<(), UnpackError> {
    let c_path = c_path(path)?;
    let spec = libc::timespec {
        tv_sec: time.secs as libc::time_t,
        tv_nsec: time.nanos as libc::c_long,
    };
    let times = [spec, spec];
    // SAFETY: `c_path` is a valid NUL-terminated string and `times` points to two timespecs,
    // both alive for the duration of the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "setting mtime of", path)
}

/// Sets one extended attribute on `path` itself. `Ok(false)` means the file system (or, for
/// privileged namespaces, the caller's privileges) refused it in a way that is not fatal.
pub(super) fn set_xattr(
    path: &Path,
    name: &[u8],
    value: &[u8],
    tolerate_eperm: bool,
) -> Result<bool, UnpackError> {
    let c_path = c_path(path)?;
    let c_name = CString::new(name).map_err(|_| nul_error(path))?;
    // SAFETY: both strings are NUL-terminated and `value` is a live slice whose length is passed.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(false),
        Some(libc::EPERM) if tolerate_eperm => Ok(false),
        _ => Err(UnpackError::io("setting xattr on", path, err)),
    }
}

/// The node kinds [`make_node`] creates.
#[derive(Debug, Clone, Copy)]
pub(super) enum NodeKind {
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// Creates a device node or FIFO (std has no `mknod`). Permission bits are fixed up by the
/// caller afterwards because `mknod` applies the umask.
pub(super) fn make_node(path: &Path, kind: NodeKind, mode: u32) -> Result<(), UnpackError> {
    let c_path = c_path(path)?;
    let (file_type, dev) = match kind {
        NodeKind::Char { major, minor } => (libc::S_IFCHR, libc::makedev(major, minor)),
        NodeKind::Block { major, minor } => (libc::S_IFBLK, libc::makedev(major, minor)),
        NodeKind::Fifo => (libc::S_IFIFO, 0),
    };
    // SAFETY: `c_path` is a valid NUL-terminated string alive for the call.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), file_type | (mode & 0o7777), dev) };
    check(rc, "creating node", path)
}

fn c_path(path: &Path) -> Result<CString, UnpackError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| nul_error(path))
}

fn nul_error(path: &Path) -> UnpackError {
    let e = io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte");
    UnpackError::io("encoding", path, e)
}

fn check(rc: libc::c_int, op: &'static str, path: &Path) -> Result<(), UnpackError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(UnpackError::io(op, path, io::Error::last_os_error()))
    }
}
