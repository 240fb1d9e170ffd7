//! Running OCI hooks (`config.json`'s `hooks`) on the host, the way runc
//! runs them: each hook is a host program started with exactly its `args`
//! and `env`, in the bundle directory, fed the container's state JSON on
//! stdin, and a hook that fails or outlives its timeout fails the stage.
//!
//! nerdctl needs this for `-p`: its `createRuntime` hook runs CNI in the
//! network namespace the state's annotations name, its `poststop` hook
//! tears that down.

use std::collections::HashMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use arrakis_protocol::error_chain;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::error::ShimError;
use crate::oci::Hook;

/// runc's limit too for a hook that gives none: long enough for CNI
/// plugins on a busy host, short enough that a wedged hook is noticed.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a hook's stdout and stderr is kept for the error message.
const KEPT_OUTPUT: usize = 4096;

/// How long to keep reading a hook's output after it exits: a daemon it
/// started may hold the pipes open forever.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// The OCI runtime state, as a hook reads it on stdin.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookState<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub bundle: &'a Path,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: &'a HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook {index}: path {path:?} is not absolute")]
    RelativePath {
        stage: &'static str,
        index: usize,
        path: String,
    },
    #[error("cannot serialise the state for the {stage} hooks")]
    State {
        stage: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{stage} hook {path} could not be started")]
    Spawn {
        stage: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {stage} hook {path} failed")]
    Wait {
        stage: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{stage} hook {path} timed out after {}s and was killed{}", timeout.as_secs(), describe(stderr))]
    Timeout {
        stage: &'static str,
        path: String,
        timeout: Duration,
        stderr: String,
    },
    #[error("{stage} hook {path} failed ({status}){}", describe(stderr))]
    Failed {
        stage: &'static str,
        path: String,
        status: ExitStatus,
        stderr: String,
    },
}

fn describe(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl From<HookError> for ShimError {
    fn from(error: HookError) -> ShimError {
        match &error {
            HookError::RelativePath { stage, index, .. } => {
                ShimError::invalid(format!("hooks.{stage}[{index}].path"), error.to_string())
            }
            _ => ShimError::Internal(error_chain(&error)),
        }
    }
}

/// Runs `hooks` in order, stopping at the first that fails. `stage` is the
/// spec's name for them (`createRuntime`, `poststop`...), used in logs and
/// errors.
pub async fn run(
    stage: &'static str,
    hooks: &[Hook],
    state: &HookState<'_>,
) -> Result<(), ShimError> {
    if let Some((index, hook)) = hooks
        .iter()
        .enumerate()
        .find(|(_, hook)| !Path::new(&hook.path).is_absolute())
    {
        return Err(HookError::RelativePath {
            stage,
            index,
            path: hook.path.clone(),
        }
        .into());
    }
    let input = serde_json::to_vec(state).map_err(|source| HookError::State { stage, source })?;
    for hook in hooks {
        run_one(stage, hook, state.bundle, &input).await?;
    }
    Ok(())
}

async fn run_one(
    stage: &'static str,
    hook: &Hook,
    bundle: &Path,
    input: &[u8],
) -> Result<(), HookError> {
    tracing::debug!(stage, path = %hook.path, "running OCI hook");
    let path = hook.path.clone();
    let mut child = command(hook, bundle)
        .spawn()
        .map_err(|source| HookError::Spawn {
            stage,
            path: path.clone(),
            source,
        })?;
    let timeout = match hook.timeout {
        Some(seconds) if seconds > 0 => Duration::from_secs(seconds.into()),
        _ => DEFAULT_TIMEOUT,
    };
    let mut stdout = Tail::default();
    let mut stderr = Tail::default();
    let waited = tokio::time::timeout(
        timeout,
        communicate(&mut child, input, &mut stdout, &mut stderr),
    )
    .await;
    let status = match waited {
        Ok(Ok(status)) => status,
        Ok(Err(source)) => {
            return Err(HookError::Wait {
                stage,
                path,
                source,
            })
        }
        Err(_) => {
            if let Err(error) = child.kill().await {
                tracing::warn!(stage, path = %hook.path, %error, "cannot kill a timed-out hook");
            }
            return Err(HookError::Timeout {
                stage,
                path,
                timeout,
                stderr: stderr.text(),
            });
        }
    };
    if !status.success() {
        return Err(HookError::Failed {
            stage,
            path,
            status,
            stderr: stderr.text(),
        });
    }
    tracing::debug!(stage, path = %hook.path, stdout = %stdout.text(), "OCI hook done");
    Ok(())
}

/// The hook's command: exactly its argv and environment, nothing inherited
/// from the shim but the working directory, which runc's hooks get too.
fn command(hook: &Hook, bundle: &Path) -> Command {
    let mut command = Command::new(&hook.path);
    if let Some((arg0, rest)) = hook.args.split_first() {
        command.arg0(arg0).args(rest);
    }
    command.env_clear();
    for (index, entry) in hook.env.iter().enumerate() {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                command.env(key, value);
            }
            // The entry itself is not logged: it may hold a secret.
            _ => {
                tracing::warn!(path = %hook.path, index, "skipping a hook env entry that is not KEY=VALUE")
            }
        }
    }
    command
        .current_dir(bundle)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Feeds `input` to the child, drains its output and waits for it. Output
/// still open [`OUTPUT_GRACE`] after the child exits is abandoned.
async fn communicate(
    child: &mut Child,
    input: &[u8],
    stdout: &mut Tail,
    stderr: &mut Tail,
) -> std::io::Result<ExitStatus> {
    let (stdin, out, err) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (exited, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let wait = async {
        let status = child.wait().await;
        let _ = exited.send(());
        status
    };
    let pipes = async {
        tokio::select! {
            _ = async { tokio::join!(feed(stdin, input), drain(out, stdout), drain(err, stderr)) } => {}
            _ = async {
                let _ = exited_rx.await;
                tokio::time::sleep(OUTPUT_GRACE).await;
            } => {}
        }
    };
    let (status, ()) = tokio::join!(wait, pipes);
    status
}

/// Writes the whole state then closes stdin. A hook that exits without
/// reading it is no error (runc ignores EPIPE too); its exit status says
/// whether it worked.
async fn feed(stdin: Option<ChildStdin>, input: &[u8]) {
    let Some(mut stdin) = stdin else { return };
    match stdin.write_all(input).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => tracing::warn!(%error, "cannot write the state to a hook's stdin"),
    }
}

async fn drain(reader: Option<impl AsyncRead + Unpin>, tail: &mut Tail) {
    let Some(mut reader) = reader else { return };
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&buffer[..n]),
        }
    }
}

/// The last [`KEPT_OUTPUT`] bytes of a stream: where a failing program
/// says why.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > KEPT_OUTPUT {
            let excess = self.bytes.len() - KEPT_OUTPUT;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.truncated {
            format!("...{text}")
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Instant;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn hook(path: &str, args: &[&str], env: &[&str], timeout: Option<u32>) -> Hook {
        Hook {
            path: path.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.iter().map(|e| (*e).to_owned()).collect(),
            timeout,
        }
    }

    fn state<'a>(bundle: &'a Path, annotations: &'a HashMap<String, String>) -> HookState<'a> {
        HookState {
            oci_version: "1.1.0",
            id: "web",
            status: "creating",
            pid: None,
            bundle,
            annotations,
        }
    }

    fn netns_annotation() -> HashMap<String, String> {
        HashMap::from([(
            "nerdctl/network-namespace".to_owned(),
            "/run/arrakis/netns/web".to_owned(),
        )])
    }

    #[tokio::test]
    async fn the_hook_reads_the_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state.json");
        let path = script(dir.path(), "hook", &format!("/bin/cat > {}", out.display()));
        let annotations = netns_annotation();
        run(
            "createRuntime",
            &[hook(&path, &[], &[], None)],
            &state(dir.path(), &annotations),
        )
        .await
        .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(
            got,
            serde_json::json!({
                "ociVersion": "1.1.0",
                "id": "web",
                "status": "creating",
                "bundle": dir.path(),
                "annotations": {"nerdctl/network-namespace": "/run/arrakis/netns/web"},
            })
        );

        let empty = HashMap::new();
        let mut stopped = state(dir.path(), &empty);
        stopped.status = "stopped";
        stopped.pid = Some(42);
        run("poststop", &[hook(&path, &[], &[], None)], &stopped)
            .await
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["pid"], 42);
        assert_eq!(got["status"], "stopped");
        assert!(got.get("annotations").is_none(), "{got}");
    }

    #[tokio::test]
    async fn argv_env_and_cwd_are_exactly_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let out = dir.path().join("out");
        // A script's shebang would hide argv[0]: run sh itself and read
        // what it was started with from /proc.
        let body = format!(
            "{{ /usr/bin/tr '\\0' '\\n' < /proc/$$/cmdline; echo --; \
             /usr/bin/tr '\\0' '\\n' < /proc/$$/environ; echo --; /bin/pwd; }} > {}",
            out.display()
        );
        let annotations = HashMap::new();
        run(
            "createRuntime",
            &[hook(
                "/bin/sh",
                &["nerdctl", "-c", &body, "sh", "internal", "a b"],
                &["FOO=bar=baz", "MALFORMED", "=nokey"],
                None,
            )],
            &state(&bundle, &annotations),
        )
        .await
        .unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        let mut sections = lines.split(|line| *line == "--");
        let argv = sections.next().unwrap();
        assert_eq!(argv[0], "nerdctl", "{got}");
        assert_eq!(argv[3..], ["sh", "internal", "a b"], "{got}");
        assert_eq!(sections.next().unwrap(), ["FOO=bar=baz"], "{got}");
        assert_eq!(sections.next().unwrap(), [bundle.to_str().unwrap()]);
    }

    #[tokio::test]
    async fn a_failing_hook_reports_its_stage_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "hook",
            "echo 'some output'; echo 'cni: no such network' >&2; exit 3",
        );
        let annotations = HashMap::new();
        let err = run(
            "createRuntime",
            &[hook(&path, &[], &[], None)],
            &state(dir.path(), &annotations),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("createRuntime"), "{err}");
        assert!(err.contains(&path), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("cni: no such network"), "{err}");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "hook", "echo waiting >&2; exec /bin/sleep 30");
        let annotations = HashMap::new();
        let started = Instant::now();
        let err = run(
            "poststop",
            &[hook(&path, &[], &[], Some(1))],
            &state(dir.path(), &annotations),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(
            err.contains("poststop") && err.contains("timed out") && err.contains("waiting"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hooks_run_in_order_and_stop_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let first = script(
            dir.path(),
            "first",
            &format!("echo first >> {}", log.display()),
        );
        let second = script(
            dir.path(),
            "second",
            &format!("echo second >> {}", log.display()),
        );
        let failing = script(dir.path(), "failing", "exit 1");
        let annotations = HashMap::new();
        let state = state(dir.path(), &annotations);

        let hooks = [hook(&first, &[], &[], None), hook(&second, &[], &[], None)];
        run("createRuntime", &hooks, &state).await.unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "first\nsecond\n");

        std::fs::remove_file(&log).unwrap();
        let hooks = [hook(&failing, &[], &[], None), hook(&first, &[], &[], None)];
        let err = run("createRuntime", &hooks, &state).await.unwrap_err();
        assert!(err.to_string().contains(&failing), "{err}");
        assert!(!log.exists());
    }

    #[tokio::test]
    async fn relative_paths_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let first = script(
            dir.path(),
            "first",
            &format!("echo first >> {}", log.display()),
        );
        let annotations = HashMap::new();
        let hooks = [
            hook(&first, &[], &[], None),
            hook("bin/nerdctl", &[], &[], None),
        ];
        let err = run("createRuntime", &hooks, &state(dir.path(), &annotations))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ShimError::InvalidArgument { .. }), "{text}");
        assert!(text.contains("hooks.createRuntime[1].path"), "{text}");
        assert!(text.contains("bin/nerdctl"), "{text}");
        assert!(!log.exists());
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = PathBuf::from("/nonexistent/hook").display().to_string();
        let annotations = HashMap::new();
        let err = run(
            "poststop",
            &[hook(&missing, &[], &[], None)],
            &state(dir.path(), &annotations),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("poststop") && err.contains(&missing) && err.contains("started"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_hook_that_ignores_stdin_and_leaves_a_daemon_still_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep keeps stdout open after the hook exits.
        let path = script(dir.path(), "hook", "/bin/sleep 5 &\nexit 0");
        let big: HashMap<String, String> = (0..2000)
            .map(|i| (format!("key{i}"), "x".repeat(64)))
            .collect();
        let started = Instant::now();
        run(
            "createRuntime",
            &[hook(&path, &[], &[], None)],
            &state(dir.path(), &big),
        )
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn only_the_tail_of_the_output_is_kept() {
        let mut tail = Tail::default();
        tail.push(&vec![b'a'; KEPT_OUTPUT]);
        tail.push(b"the reason\n");
        let text = tail.text();
        assert!(text.starts_with("...") && text.ends_with("the reason"));
        assert_eq!(tail.bytes.len(), KEPT_OUTPUT);
    }
}
