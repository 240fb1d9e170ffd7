//! Users and groups of the root filesystem, read from its own `/etc/passwd`
//! and `/etc/group` (the agent is static and must not depend on the image's
//! libc or NSS), and turned into the credentials an exec runs with.

use std::path::{Path, PathBuf};

/// Errors of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {name:?} not found in {passwd}")]
    UnknownUser { name: String, passwd: String },
    #[error("invalid user {value:?}: expected a user name or a numeric uid, optionally followed by `:group` or `:gid`")]
    BadSpec { value: String },
    #[error("no group named {name:?} in {group}")]
    UnknownGroup { name: String, group: String },
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One `/etc/group` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The colon-separated fields of each line of a passwd-style file with at
/// least `min_fields` fields and a name; comments and short lines are skipped.
fn records(content: &str, min_fields: usize) -> impl Iterator<Item = Vec<&str>> {
    content
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<&str>>())
        .filter(move |fields| fields.len() >= min_fields && !fields[0].is_empty())
}

/// Parses passwd content; malformed lines and comments are skipped.
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    records(content, 7)
        .filter_map(|fields| {
            Some(PasswdEntry {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
                shell: fields[6].to_owned(),
            })
        })
        .collect()
}

/// Parses group content; malformed lines and comments are skipped.
pub fn parse_group(content: &str) -> Vec<GroupEntry> {
    records(content, 4)
        .filter_map(|fields| {
            Some(GroupEntry {
                name: fields[0].to_owned(),
                gid: fields[2].parse().ok()?,
                members: fields[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid included.
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

/// Reads users from `<root>/etc/passwd` and `<root>/etc/group`; a missing
/// file counts as empty (minimal images may have neither).
#[derive(Debug, Clone)]
pub struct UserDb {
    root: PathBuf,
}

impl UserDb {
    pub fn new(root: impl Into<PathBuf>) -> UserDb {
        UserDb { root: root.into() }
    }

    fn passwd_path(&self) -> PathBuf {
        self.root.join("etc/passwd")
    }

    /// Resolves a request's `user` field (absent = root).
    pub fn resolve(&self, spec: Option<&str>) -> Result<Credentials, UserError> {
        let passwd = read_or_empty(&self.passwd_path());
        let group = read_or_empty(&self.root.join("etc/group"));
        resolve(
            spec,
            &parse_passwd(&passwd),
            &parse_group(&group),
            &self.passwd_path(),
        )
    }
}

fn read_or_empty(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Resolves `spec` (a name, a numeric uid, or `None` for root) against parsed
/// entries. A numeric uid without a passwd entry runs with gid = uid, home `/`.
pub fn resolve(
    spec: Option<&str>,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
    passwd_path: &Path,
) -> Result<Credentials, UserError> {
    let whole = spec.map(str::trim).unwrap_or("root");
    // `user:group`, as an image's USER may say.
    let (spec, group_spec) = match whole.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (whole, None),
    };
    let bad = |s: &str| s.is_empty() || s.contains([':', '\0', '\n']);
    if bad(spec) || group_spec.is_some_and(bad) {
        return Err(UserError::BadSpec {
            value: whole.to_owned(),
        });
    }
    let entry = match spec.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .unwrap_or_else(|| PasswdEntry {
                name: if uid == 0 {
                    "root".into()
                } else {
                    uid.to_string()
                },
                uid,
                gid: uid,
                home: if uid == 0 { "/root".into() } else { "/".into() },
                shell: "/bin/sh".into(),
            }),
        Err(_) => match passwd.iter().find(|e| e.name == spec) {
            Some(e) => e.clone(),
            None if spec == "root" => PasswdEntry {
                name: "root".into(),
                uid: 0,
                gid: 0,
                home: "/root".into(),
                shell: "/bin/sh".into(),
            },
            None => {
                return Err(UserError::UnknownUser {
                    name: spec.to_owned(),
                    passwd: passwd_path.display().to_string(),
                })
            }
        },
    };
    let gid = match group_spec {
        None => entry.gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|g| g.name == group)
                    .ok_or_else(|| UserError::UnknownGroup {
                        name: group.to_owned(),
                        group: passwd_path.with_file_name("group").display().to_string(),
                    })?
                    .gid
            }
        },
    };
    let mut supplementary = vec![gid];
    for group in groups {
        if group.members.contains(&entry.name) && !supplementary.contains(&group.gid) {
            supplementary.push(group.gid);
        }
    }
    Ok(Credentials {
        name: entry.name,
        uid: entry.uid,
        gid,
        groups: supplementary,
        home: if entry.home.is_empty() {
            "/".into()
        } else {
            entry.home
        },
        shell: if entry.shell.is_empty() {
            "/bin/sh".into()
        } else {
            entry.shell
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        bad:x:notanumber:1::/:/bin/sh\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/zsh\n\
        nohome:x:1001:1001::::\n";
    const GROUP: &str = "root:x:0:\n\
        sudo:x:27:alice,bob\n\
        docker:x:999: alice \n\
        alice:x:1000:\n\
        users:x:100:bob\n\
        junk\n";

    fn creds(spec: Option<&str>) -> Result<Credentials, UserError> {
        resolve(
            spec,
            &parse_passwd(PASSWD),
            &parse_group(GROUP),
            Path::new("/etc/passwd"),
        )
    }

    #[test]
    fn parses_valid_lines_only() {
        let users = parse_passwd(PASSWD);
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "alice", "nohome"]);
        assert_eq!(users[2].home, "/home/alice");
        assert_eq!(users[2].shell, "/bin/zsh");
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 5);
        assert_eq!(groups[1].members, ["alice", "bob"]);
        assert_eq!(groups[2].members, ["alice"]);
    }

    #[test]
    fn root_by_default() {
        let c = creds(None).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (0, 0, "/root"));
        assert_eq!(c.groups, [0]);
        assert_eq!(c.shell, "/bin/bash");
    }

    #[test]
    fn name_with_supplementary_groups() {
        let c = creds(Some("alice")).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.groups, [1000, 27, 999]);
        assert_eq!(c.home, "/home/alice");
    }

    #[test]
    fn numeric_uid_known_and_unknown() {
        assert_eq!(creds(Some("1000")).unwrap().name, "alice");
        let c = creds(Some("4242")).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (4242, 4242, "/"));
        assert_eq!(c.groups, [4242]);
    }

    #[test]
    fn user_with_group_by_name_or_gid() {
        let c = creds(Some("alice:27")).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 27));
        assert_eq!(c.groups[0], 27);
        let c = creds(Some("4242:4343")).unwrap();
        assert_eq!((c.uid, c.gid, c.groups[0]), (4242, 4343, 4343));
        let err = creds(Some("alice:nosuchgroup")).unwrap_err();
        assert!(matches!(err, UserError::UnknownGroup { .. }), "{err}");
        assert!(err.to_string().contains("/etc/group"), "{err}");
    }

    #[test]
    fn empty_home_and_shell_get_defaults() {
        let c = creds(Some("nohome")).unwrap();
        assert_eq!((c.home.as_str(), c.shell.as_str()), ("/", "/bin/sh"));
    }

    #[test]
    fn unknown_and_malformed_users() {
        let err = creds(Some("mallory")).unwrap_err();
        assert!(err.to_string().contains("mallory"), "{err}");
        assert!(matches!(creds(Some("a:")), Err(UserError::BadSpec { .. })));
        assert!(matches!(
            creds(Some("a:b:c")),
            Err(UserError::BadSpec { .. })
        ));
        assert!(matches!(creds(Some("")), Err(UserError::BadSpec { .. })));
    }

    #[test]
    fn root_without_passwd_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = UserDb::new(dir.path()).resolve(None).unwrap();
        assert_eq!((c.uid, c.home.as_str()), (0, "/root"));
        assert!(UserDb::new(dir.path()).resolve(Some("alice")).is_err());
    }
}
