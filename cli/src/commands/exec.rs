//! exec (run a command in a sandbox, streaming its output) and run
//! (create + exec + optional destroy; or, with -c, the original client's
//! command line in an existing sandbox).

use std::time::Duration;

use anyhow::{bail, Context};
use arrakis_api::wire::exec::{ExecBody, ExecExit, MAX_TIMEOUT_SECS};
use arrakis_protocol::ExitStatus;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lifecycle::{env_pairs, new_vm};
use crate::backend::{Backend, Output, Stdin};
use crate::cli::{CommandArgs, ExecArgs, RunArgs};

/// Exit code reported when the command was killed for running too long
/// (the same as coreutils `timeout`).
const TIMED_OUT: u8 = 124;

/// Exit code when this client gives up on a command it cannot signal
/// (128 + SIGINT, as a shell reports an interrupted command).
const INTERRUPTED: u8 = 130;

/// How long past a command's timeout the client waits for its end.
const AGENT_GRACE: Duration = Duration::from_secs(15);

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The request of a command: validated here, the same for both modes.
pub fn body(options: &CommandArgs, command: &[String]) -> anyhow::Result<ExecBody> {
    let env = env_pairs(&options.env, "--env")?;
    let timeout_secs = match options.timeout {
        None => None,
        Some(secs) if secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_SECS => Some(secs),
        Some(secs) => bail!("--timeout expects seconds between 0 and 604800, got {secs}"),
    };
    if command.is_empty() || command[0].is_empty() {
        bail!("give the command to run");
    }
    let (argv, shell) = if options.shell {
        (None, Some(command.join(" ")))
    } else {
        (Some(command.to_vec()), None)
    };
    Ok(ExecBody {
        argv,
        shell,
        env,
        cwd: options.cwd.clone(),
        user: options.user.clone(),
        timeout_secs,
        stdin: None,
    })
}

/// The process exit code for how a command ended: its code, 128 + the
/// signal that killed it, or 124 if it ran out of time.
pub fn exit_code(exit: &ExecExit) -> u8 {
    if exit.timed_out {
        return TIMED_OUT;
    }
    let status = ExitStatus {
        code: exit.exit_code,
        signal: exit.signal,
        timed_out: false,
    };
    status.shell_code().clamp(0, 255) as u8
}

pub async fn exec(backend: &Backend, args: ExecArgs) -> anyhow::Result<u8> {
    let body = body(&args.options, &args.command)?;
    stream(backend, &args.name, body, args.options.interactive, false).await
}

/// Copies this process's stdin to the command's, then closes it.
fn forward_stdin(stdin: Stdin) {
    tokio::spawn(async move {
        let mut input = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = input.read(&mut buf).await {
            if n == 0
                || stdin
                    .write(Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
            {
                break;
            }
        }
        let _ = stdin.close().await;
    });
}

/// Runs a command and passes its output through as it arrives (stderr to
/// stdout too with `merge`); returns its exit code.
pub async fn stream(
    backend: &Backend,
    name: &str,
    body: ExecBody,
    interactive: bool,
    merge: bool,
) -> anyhow::Result<u8> {
    let timeout = body.timeout_secs;
    let mut execution = backend.exec(name, body, interactive).await?;
    if interactive {
        if let Some(stdin) = execution.stdin() {
            forward_stdin(stdin);
        }
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    // The guest enforces the timeout; this is the client's backstop should
    // the end never be reported.
    let deadline = timeout
        .map(|secs| tokio::time::Instant::now() + Duration::from_secs_f64(secs) + AGENT_GRACE);
    loop {
        let output = tokio::select! {
            output = execution.next() => output?,
            () = sleep_until(deadline) => {
                bail!("the end of the command was not reported {}s after its timeout", AGENT_GRACE.as_secs());
            }
            _ = tokio::signal::ctrl_c() => {
                if execution.signal(libc::SIGINT).await? {
                    continue;
                }
                // Server-sent events cannot carry a signal; hanging up
                // makes the server end the command.
                eprintln!("arrakis: interrupted; the command is ended");
                return Ok(INTERRUPTED);
            }
        };
        match output {
            Output::Stdout(data) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            Output::Stderr(data) if merge => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            Output::Stderr(data) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            Output::Exit(exit) => {
                if exit.timed_out {
                    eprintln!("arrakis: the command ran out of time and was killed");
                }
                return Ok(exit_code(&exit));
            }
        }
    }
}

pub async fn run(backend: &Backend, args: RunArgs) -> anyhow::Result<u8> {
    if let Some(cmd) = args.cmd {
        // The original client: a command line in an existing sandbox, its
        // output (stdout and stderr together) printed.
        let name = args.name.context("-c/--cmd needs -n NAME")?;
        let options = CommandArgs {
            shell: true,
            ..args.options.clone()
        };
        let body = body(&options, &[cmd])?;
        return stream(backend, &name, body, options.interactive, true).await;
    }
    let name = args.name.clone().unwrap_or_else(generated_name);
    let body = body(&args.options, &args.command)?;
    backend
        .create(new_vm(&name, &args.size, &args.net))
        .await
        .with_context(|| format!("creating sandbox {name:?}"))?;
    let result = stream(backend, &name, body, args.options.interactive, false).await;
    if args.rm {
        backend
            .destroy(&name)
            .await
            .with_context(|| format!("destroying sandbox {name:?}"))?;
    } else {
        eprintln!(
            "arrakis: sandbox {name:?} is still running (destroy it with `arrakis destroy {name}`)"
        );
    }
    result
}

fn generated_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("run-{:08x}", random as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(command: &[&str]) -> Vec<String> {
        command.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builds_argv_and_shell_requests() {
        let req = body(&CommandArgs::default(), &words(&["ls", "-l"])).unwrap();
        assert_eq!(req.argv, Some(words(&["ls", "-l"])));
        assert_eq!(req.shell, None);
        let shell = CommandArgs {
            shell: true,
            timeout: Some(1.5),
            env: vec!["A=b=c".into()],
            cwd: Some("/tmp".into()),
            ..CommandArgs::default()
        };
        let req = body(&shell, &words(&["echo", "$HOME"])).unwrap();
        assert_eq!(req.shell.as_deref(), Some("echo $HOME"));
        assert_eq!(req.argv, None);
        assert_eq!(req.timeout_secs, Some(1.5));
        assert_eq!(req.env["A"], "b=c");
        assert_eq!(req.cwd.as_deref(), Some("/tmp"));
        // The body is what the API reads.
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            serde_json::json!({"shell": "echo $HOME", "env": {"A": "b=c"}, "cwd": "/tmp", "timeoutSecs": 1.5})
        );
    }

    #[test]
    fn rejects_bad_env_and_timeouts() {
        let bad = CommandArgs {
            env: vec!["NOEQUALS".into()],
            ..CommandArgs::default()
        };
        let err = body(&bad, &words(&["true"])).unwrap_err();
        assert!(err.to_string().contains("--env"));
        for secs in [-1.0, 0.0, f64::NAN, 1e9] {
            let bad = CommandArgs {
                timeout: Some(secs),
                ..CommandArgs::default()
            };
            let err = body(&bad, &words(&["true"])).unwrap_err();
            assert!(err.to_string().contains("--timeout"), "{secs}");
        }
    }

    #[test]
    fn exit_codes_match_a_shell() {
        let exit = |code, signal, timed_out| ExecExit {
            exit_code: code,
            signal,
            timed_out,
            duration_ms: 0,
        };
        assert_eq!(exit_code(&exit(Some(0), None, false)), 0);
        assert_eq!(exit_code(&exit(Some(3), None, false)), 3);
        assert_eq!(exit_code(&exit(None, Some(9), false)), 137);
        assert_eq!(exit_code(&exit(None, Some(15), false)), 143);
        assert_eq!(exit_code(&exit(None, Some(9), true)), 124);
        assert_eq!(exit_code(&exit(Some(300), None, false)), 255);
        // As the embedded mode always did: an unknown status is clamped.
        assert_eq!(exit_code(&exit(None, None, false)), 0);
    }
}
