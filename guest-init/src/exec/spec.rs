//! Turns an `ExecRequest` into a checked [`ExecSpec`]: the program and
//! arguments (shell or direct), the user and groups, the environment, the
//! working directory, the resource limits, the terminal and the kept id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrakis_protocol::{
    valid_keep_id, Command, ExecRequest, Rlimit, TtySize, KEEP_ID_FORM, RLIMIT_NAMES,
};

use super::ExecError;
use crate::files;
use crate::users::{Credentials, UserDb};

/// `PATH` of every exec unless the request overrides it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A checked, ready to spawn command.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// `argv[0]`, looked up in the child's `PATH` when it has no '/'.
    pub program: String,
    pub args: Vec<String>,
    /// The complete environment of the child.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub credentials: Credentials,
    /// Whether to switch to `credentials` (false when they are the agent's own).
    pub switch_user: bool,
    /// Whether the host streams stdin (else `/dev/null`; with a terminal,
    /// whether the host may type into it).
    pub stdin: bool,
    pub timeout: Option<Duration>,
    /// The kept id: the process outlives its stream.
    pub keep: Option<String>,
    /// Run on a new pseudo-terminal of this size.
    pub tty: Option<TtySize>,
    /// Resource limits to set in the child.
    pub limits: Vec<Limit>,
}

/// A checked resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The OCI name, for messages.
    pub name: &'static str,
    /// The `RLIMIT_*` number.
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

/// Most supplementary groups a process can have (`NGROUPS_MAX`).
const MAX_GROUPS: usize = 65_536;

impl ExecSpec {
    /// Validates `request`. `root` is the filesystem the users and the shell
    /// are looked up in (`/` in the guest).
    pub fn from_request(request: &ExecRequest, root: &Path) -> Result<ExecSpec, ExecError> {
        let (program, args) = argv(&request.command, root)?;
        if let Some(id) = &request.keep {
            if !valid_keep_id(id) {
                return Err(invalid("keep", format!("{id:?} is not {KEEP_ID_FORM}")));
            }
        }
        if let Some(size) = request.tty {
            if size.rows == 0 || size.cols == 0 {
                return Err(invalid("tty", "rows and cols must be at least 1"));
            }
        }
        let limits = limits(&request.rlimits)?;
        let mut credentials = UserDb::new(root).resolve(request.user.as_deref())?;
        if request.groups.len() > MAX_GROUPS {
            return Err(invalid("groups", format!("at most {MAX_GROUPS} groups")));
        }
        for gid in &request.groups {
            if !credentials.groups.contains(gid) {
                credentials.groups.push(*gid);
            }
        }
        let env = if request.clear_env {
            exact_environment(&credentials, &request.env)?
        } else {
            environment(&credentials, &request.env)?
        };
        let cwd = working_dir(request.cwd.as_deref(), &credentials)?;
        // SAFETY: getuid/getgid cannot fail and take no arguments.
        let (own_uid, own_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // Extra groups need setgroups, which is part of the switch.
        let switch_user =
            credentials.uid != own_uid || credentials.gid != own_gid || !request.groups.is_empty();
        Ok(ExecSpec {
            program,
            args,
            env,
            cwd,
            credentials,
            switch_user,
            stdin: request.stdin,
            timeout: request.timeout_ms.map(Duration::from_millis),
            keep: request.keep.clone(),
            tty: request.tty,
            limits,
        })
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ExecError {
    ExecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The `RLIMIT_*` number of an OCI resource name.
fn rlimit_number(name: &str) -> Option<(&'static str, i32)> {
    // `as i32`: the constants are u32 with glibc and i32 with musl.
    let number = match name {
        "RLIMIT_AS" => libc::RLIMIT_AS as i32,
        "RLIMIT_CORE" => libc::RLIMIT_CORE as i32,
        "RLIMIT_CPU" => libc::RLIMIT_CPU as i32,
        "RLIMIT_DATA" => libc::RLIMIT_DATA as i32,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE as i32,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS as i32,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK as i32,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE as i32,
        "RLIMIT_NICE" => libc::RLIMIT_NICE as i32,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE as i32,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC as i32,
        "RLIMIT_RSS" => libc::RLIMIT_RSS as i32,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO as i32,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME as i32,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING as i32,
        "RLIMIT_STACK" => libc::RLIMIT_STACK as i32,
        _ => return None,
    };
    let name = RLIMIT_NAMES.iter().find(|known| **known == name)?;
    Some((name, number))
}

fn limits(rlimits: &[Rlimit]) -> Result<Vec<Limit>, ExecError> {
    rlimits
        .iter()
        .map(|limit| {
            let Some((name, resource)) = rlimit_number(&limit.resource) else {
                return Err(invalid(
                    "rlimits",
                    format!(
                        "unknown resource {:?}; accepted: {}",
                        limit.resource,
                        RLIMIT_NAMES.join(", ")
                    ),
                ));
            };
            if limit.soft > limit.hard {
                return Err(invalid(
                    "rlimits",
                    format!(
                        "{name}: the soft limit {} is above the hard limit {}",
                        limit.soft, limit.hard
                    ),
                ));
            }
            Ok(Limit {
                name,
                resource,
                soft: limit.soft,
                hard: limit.hard,
            })
        })
        .collect()
}

fn argv(command: &Command, root: &Path) -> Result<(String, Vec<String>), ExecError> {
    let (program, args) = match command {
        Command::Argv(argv) => {
            let (first, rest) = argv.split_first().ok_or(ExecError::EmptyArgv)?;
            if first.is_empty() {
                return Err(ExecError::EmptyArgv);
            }
            (first.clone(), rest.to_vec())
        }
        Command::Shell(script) => {
            let shell = if root.join("bin/bash").exists() {
                "/bin/bash"
            } else if root.join("bin/sh").exists() {
                "/bin/sh"
            } else {
                return Err(ExecError::Invalid {
                    field: "command".into(),
                    reason: "this image has no shell (/bin/sh): run the program directly \
                             (argv) instead of a shell command line"
                        .into(),
                });
            };
            (shell.to_owned(), vec!["-c".to_owned(), script.clone()])
        }
    };
    if program.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::Invalid {
            field: "command".into(),
            reason: "arguments must not contain NUL bytes".into(),
        });
    }
    Ok((program, args))
}

fn environment(
    credentials: &Credentials,
    extra: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ExecError> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", DEFAULT_PATH),
        ("HOME", credentials.home.as_str()),
        ("USER", credentials.name.as_str()),
        ("LOGNAME", credentials.name.as_str()),
        ("SHELL", credentials.shell.as_str()),
        ("TERM", "xterm-256color"),
        ("LANG", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    check_env(extra)?;
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(env)
}

/// `extra` alone, plus `PATH` and `HOME` when it lacks them (what runc
/// gives a container).
fn exact_environment(
    credentials: &Credentials,
    extra: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ExecError> {
    check_env(extra)?;
    let mut env = extra.clone();
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    let home = if credentials.home.is_empty() {
        "/"
    } else {
        credentials.home.as_str()
    };
    env.entry("HOME".to_owned())
        .or_insert_with(|| home.to_owned());
    Ok(env)
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ExecError> {
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(ExecError::Invalid {
                field: format!("env key {key:?}"),
                reason: "keys must be non-empty without '=' or NUL".into(),
            });
        }
        if value.contains('\0') {
            // The value may be a secret: name the key only.
            return Err(ExecError::Invalid {
                field: format!("env value of {key}"),
                reason: "values must not contain NUL bytes".into(),
            });
        }
    }
    Ok(())
}

fn working_dir(requested: Option<&str>, credentials: &Credentials) -> Result<PathBuf, ExecError> {
    let Some(requested) = requested else {
        let home = PathBuf::from(&credentials.home);
        return Ok(if home.is_dir() {
            home
        } else {
            PathBuf::from("/")
        });
    };
    let path = files::resolve(requested).map_err(|e| ExecError::Invalid {
        field: format!("cwd {requested:?}"),
        reason: e.to_string(),
    })?;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(ExecError::CwdNotDir {
            path: path.display().to_string(),
        }),
        Err(source) => Err(ExecError::Cwd {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: Command) -> ExecRequest {
        ExecRequest {
            command,
            ..ExecRequest::default()
        }
    }

    #[test]
    fn argv_is_taken_verbatim() {
        let spec = ExecSpec::from_request(
            &request(Command::Argv(vec!["ls".into(), "-l".into(), "a b".into()])),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(spec.program, "ls");
        assert_eq!(spec.args, ["-l", "a b"]);
        assert!(!spec.stdin);
        assert_eq!(spec.timeout, None);
    }

    #[test]
    fn shell_prefers_bash_in_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let shell = Command::Shell("echo hi".into());
        let err = ExecSpec::from_request(&request(shell.clone()), dir.path()).unwrap_err();
        assert!(err.to_string().contains("no shell"), "{err}");
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/sh"), "").unwrap();
        let spec = ExecSpec::from_request(&request(shell.clone()), dir.path()).unwrap();
        assert_eq!(
            (spec.program.as_str(), spec.args.as_slice()),
            ("/bin/sh", &["-c".to_owned(), "echo hi".to_owned()][..])
        );
        std::fs::write(dir.path().join("bin/bash"), "").unwrap();
        let spec = ExecSpec::from_request(&request(shell), dir.path()).unwrap();
        assert_eq!(spec.program, "/bin/bash");
    }

    #[test]
    fn empty_or_nul_commands_are_rejected() {
        let root = Path::new("/");
        assert!(matches!(
            ExecSpec::from_request(&request(Command::Argv(vec![])), root),
            Err(ExecError::EmptyArgv)
        ));
        assert!(matches!(
            ExecSpec::from_request(&request(Command::Argv(vec!["a\0b".into()])), root),
            Err(ExecError::Invalid { .. })
        ));
    }

    #[test]
    fn environment_defaults_then_request() {
        let mut req = request(Command::Shell("true".into()));
        req.env.insert("PATH".into(), "/opt/bin".into());
        req.env.insert("SECRET".into(), "hunter2".into());
        let spec = ExecSpec::from_request(&req, Path::new("/")).unwrap();
        assert_eq!(spec.env["PATH"], "/opt/bin");
        assert_eq!(spec.env["SECRET"], "hunter2");
        assert_eq!(spec.env["TERM"], "xterm-256color");
        assert_eq!(spec.env["LANG"], "C.UTF-8");
        assert!(spec.env.contains_key("HOME") && spec.env.contains_key("USER"));

        req.env.insert("BAD=KEY".into(), "x".into());
        let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("BAD=KEY"), "{err}");
        req.env.remove("BAD=KEY");
        req.env.insert("NUL".into(), "top\0secret".into());
        let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
        assert!(!err.to_string().contains("secret"), "value leaked: {err}");
    }

    #[test]
    fn cwd_must_be_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let mut req = request(Command::Shell("true".into()));
        req.cwd = Some(dir.path().display().to_string());
        assert_eq!(
            ExecSpec::from_request(&req, Path::new("/")).unwrap().cwd,
            dir.path()
        );
        req.cwd = Some(file.display().to_string());
        assert!(matches!(
            ExecSpec::from_request(&req, Path::new("/")),
            Err(ExecError::CwdNotDir { .. })
        ));
        req.cwd = Some(dir.path().join("missing").display().to_string());
        assert!(matches!(
            ExecSpec::from_request(&req, Path::new("/")),
            Err(ExecError::Cwd { .. })
        ));
        req.cwd = Some("../escape".into());
        assert!(matches!(
            ExecSpec::from_request(&req, Path::new("/")),
            Err(ExecError::Invalid { .. })
        ));
    }

    #[test]
    fn clear_env_is_exactly_env_plus_path_and_home() {
        let mut req = request(Command::Argv(vec!["true".into()]));
        req.clear_env = true;
        req.env.insert("A".into(), "1".into());
        let spec = ExecSpec::from_request(&req, Path::new("/")).unwrap();
        let keys: Vec<&str> = spec.env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["A", "HOME", "PATH"]);
        assert_eq!(spec.env["PATH"], DEFAULT_PATH);
        assert_eq!(spec.env["HOME"], spec.credentials.home);
        req.env.insert("PATH".into(), "/x".into());
        req.env.insert("HOME".into(), "/h".into());
        let spec = ExecSpec::from_request(&req, Path::new("/")).unwrap();
        assert_eq!(
            (spec.env["PATH"].as_str(), spec.env["HOME"].as_str()),
            ("/x", "/h")
        );
        assert_eq!(spec.env.len(), 3);
        // A uid without a passwd entry gets `/`.
        let dir = tempfile::tempdir().unwrap();
        req.env.remove("HOME");
        req.user = Some("4321".into());
        let spec = ExecSpec::from_request(&req, dir.path()).unwrap();
        assert_eq!(spec.env["HOME"], "/");
    }

    #[test]
    fn rlimits_are_named_as_in_oci() {
        let mut req = request(Command::Shell("true".into()));
        req.rlimits = vec![
            Rlimit {
                resource: "RLIMIT_NOFILE".into(),
                soft: 100,
                hard: 200,
            },
            Rlimit {
                resource: "RLIMIT_CORE".into(),
                soft: u64::MAX,
                hard: u64::MAX,
            },
        ];
        let spec = ExecSpec::from_request(&req, Path::new("/")).unwrap();
        assert_eq!(spec.limits[0].resource, libc::RLIMIT_NOFILE as i32);
        assert_eq!((spec.limits[0].soft, spec.limits[0].hard), (100, 200));
        assert_eq!(spec.limits[1].name, "RLIMIT_CORE");
        for name in RLIMIT_NAMES {
            assert!(rlimit_number(name).is_some(), "{name}");
        }
        req.rlimits[0].resource = "RLIMIT_BOGUS".into();
        let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ExecError::Invalid { .. }), "{err:?}");
        assert!(
            text.contains("RLIMIT_BOGUS") && text.contains("RLIMIT_NPROC"),
            "{text}"
        );
        req.rlimits[0] = Rlimit {
            resource: "RLIMIT_NOFILE".into(),
            soft: 2,
            hard: 1,
        };
        let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("above the hard limit"), "{err}");
    }

    #[test]
    fn keep_tty_and_groups_are_checked() {
        let mut req = request(Command::Argv(vec!["true".into()]));
        for bad in ["", "a/b", "x y", &"k".repeat(65)] {
            req.keep = Some(bad.into());
            let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with("invalid keep"), "{err}");
        }
        req.keep = Some("init".into());
        req.tty = Some(TtySize { rows: 0, cols: 80 });
        let err = ExecSpec::from_request(&req, Path::new("/")).unwrap_err();
        assert!(err.to_string().starts_with("invalid tty"), "{err}");
        req.tty = Some(TtySize { rows: 24, cols: 80 });
        req.user = Some("0:0".into());
        req.groups = vec![0, 4242, 4242];
        // An empty root: no /etc/group adds memberships of its own.
        let dir = tempfile::tempdir().unwrap();
        let spec = ExecSpec::from_request(&req, dir.path()).unwrap();
        assert_eq!(spec.keep.as_deref(), Some("init"));
        assert_eq!(spec.credentials.groups, [0, 4242]);
        assert!(spec.switch_user, "extra groups need setgroups");
    }

    #[test]
    fn unknown_user_is_an_error() {
        let mut req = request(Command::Shell("true".into()));
        req.user = Some("no-such-user-here".into());
        assert!(matches!(
            ExecSpec::from_request(&req, Path::new("/")),
            Err(ExecError::User(_))
        ));
    }
}
