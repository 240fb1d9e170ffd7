//! Turns an `ExecRequest` into a checked [`ExecSpec`]: the program and
//! arguments (shell or direct), the user and groups, the environment and the
//! working directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrakis_protocol::{Command, ExecRequest};

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
    /// Whether the host streams stdin (else `/dev/null`).
    pub stdin: bool,
    pub timeout: Option<Duration>,
}

impl ExecSpec {
    /// Validates `request`. `root` is the filesystem the users and the shell
    /// are looked up in (`/` in the guest).
    pub fn from_request(request: &ExecRequest, root: &Path) -> Result<ExecSpec, ExecError> {
        let (program, args) = argv(&request.command, root)?;
        let credentials = UserDb::new(root).resolve(request.user.as_deref())?;
        let env = environment(&credentials, &request.env)?;
        let cwd = working_dir(request.cwd.as_deref(), &credentials)?;
        // SAFETY: getuid/getgid cannot fail and take no arguments.
        let (own_uid, own_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let switch_user = credentials.uid != own_uid || credentials.gid != own_gid;
        Ok(ExecSpec {
            program,
            args,
            env,
            cwd,
            credentials,
            switch_user,
            stdin: request.stdin,
            timeout: request.timeout_ms.map(Duration::from_millis),
        })
    }
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
    for (key, value) in extra {
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
        env.insert(key.clone(), value.clone());
    }
    Ok(env)
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
    fn unknown_user_is_an_error() {
        let mut req = request(Command::Shell("true".into()));
        req.user = Some("no-such-user-here".into());
        assert!(matches!(
            ExecSpec::from_request(&req, Path::new("/")),
            Err(ExecError::User(_))
        ));
    }
}
