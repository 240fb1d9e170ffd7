//! The file system API beyond the original: stat, list, raw bytes up and
//! down, directories as tar, mkdir, chmod, remove. Every path is absolute,
//! or relative to `/tmp/server_files`, as for the original upload and
//! download.

use arrakis_protocol::{FileKind, FileStat};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;

/// `?path=P`, the query of stat, list and the byte and archive transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Absolute, or relative to `/tmp/server_files`.
    pub path: String,
}

/// `PUT .../fs/file?path=P&mode=644`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PutFileQuery {
    /// Absolute, or relative to `/tmp/server_files`. Parent directories
    /// are created.
    pub path: String,
    /// Permission bits in octal (default 644 for a new file).
    #[serde(default)]
    pub mode: Option<String>,
}

/// `DELETE .../fs/file?path=P&recursive=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST .../fs/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    pub path: String,
    /// Create missing parents too (and succeed if it exists).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits in octal, e.g. `"755"`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `POST .../fs/chmod`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChmodBody {
    pub path: String,
    /// Permission bits in octal, e.g. `"755"`.
    pub mode: String,
}

/// One file system entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The last path component.
    pub name: String,
    /// The full guest path.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits in octal, e.g. `"644"`.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub modified: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Entry {
    /// `stat` describes `path` itself.
    pub fn new(path: String, stat: FileStat) -> Entry {
        let name = match path.trim_end_matches('/').rsplit_once('/') {
            Some((_, last)) if !last.is_empty() => last.to_string(),
            _ => stat.name,
        };
        Entry {
            name,
            path,
            kind: match stat.kind {
                FileKind::File => EntryKind::File,
                FileKind::Dir => EntryKind::Dir,
                FileKind::Symlink => EntryKind::Symlink,
                FileKind::Other => EntryKind::Other,
            },
            size: stat.size,
            mode: format!("{:o}", stat.mode & 0o7777),
            uid: stat.uid,
            gid: stat.gid,
            modified: stat.mtime,
            link_target: stat.link_target,
        }
    }

    /// An entry listed in the directory `dir`.
    pub fn in_dir(dir: &str, stat: FileStat) -> Entry {
        let mut entry = Entry::new(join(dir, &stat.name), stat);
        entry.name = entry
            .path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        entry
    }
}

/// `dir/name`, without doubling a `/`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Listing {
    /// The directory, as resolved.
    pub path: String,
    /// Sorted by name.
    pub entries: Vec<Entry>,
}

/// The reply of a raw upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Written {
    pub path: String,
    pub bytes: u64,
}

/// The reply of an archive upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Extracted {
    /// The directory the archive was unpacked into.
    pub path: String,
    /// Files, directories and links created.
    pub entries: u64,
    pub bytes: u64,
}

/// An optional octal mode field, `name` for the error message.
pub fn parse_mode(name: &str, text: Option<&str>) -> Result<Option<u32>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} {text:?} is not an octal permission mode: accepted 0 to 7777, e.g. \"644\""
            ))
        })
}

/// A non-empty path without NUL, resolved like the original's uploads.
pub fn resolve(path: &str) -> Result<String, ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request("path is empty"));
    }
    if path.contains('\0') {
        return Err(ApiError::bad_request("path contains NUL"));
    }
    Ok(super::guest_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_paths() {
        assert_eq!(parse_mode("mode", Some("755")), Ok(Some(0o755)));
        assert_eq!(parse_mode("mode", None), Ok(None));
        for bad in ["9", "17777", "", "rw"] {
            let err = parse_mode("mode", Some(bad)).unwrap_err();
            assert!(err.message.contains("octal"), "{bad}");
        }
        assert_eq!(resolve("a/b").unwrap(), "/tmp/server_files/a/b");
        assert_eq!(resolve("/etc").unwrap(), "/etc");
        assert!(resolve("").is_err());
        assert!(resolve("a\0b").is_err());
        assert_eq!(join("/", "etc"), "/etc");
        assert_eq!(join("/etc", "hosts"), "/etc/hosts");
    }

    #[test]
    fn a_stat_is_named_by_its_last_component() {
        let stat = FileStat {
            name: "/tmp/x/a.bin".into(),
            kind: FileKind::File,
            size: 1,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            link_target: None,
        };
        assert_eq!(
            Entry::new("/tmp/x/a.bin".into(), stat.clone()).name,
            "a.bin"
        );
        assert_eq!(Entry::new("/".into(), stat).name, "/tmp/x/a.bin");
    }

    #[test]
    fn entries_look_like_this() {
        let stat = FileStat {
            name: "hosts".into(),
            kind: FileKind::File,
            size: 12,
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            link_target: None,
        };
        assert_eq!(
            serde_json::to_value(Entry::in_dir("/etc", stat)).unwrap(),
            serde_json::json!({
                "name": "hosts", "path": "/etc/hosts", "kind": "file", "size": 12,
                "mode": "644", "uid": 0, "gid": 0, "modified": 1_700_000_000
            })
        );
    }
}
