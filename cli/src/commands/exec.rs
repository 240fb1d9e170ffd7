//! exec (run a command in a sandbox, streaming its output) and run
//! (create + exec + optional destroy).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::{ExecEvent, Manager};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lifecycle::spec;
use crate::cli::{CommandArgs, RunArgs};

/// Exit code reported when the command was killed for running too long
/// (the same as coreutils `timeout`).
const TIMED_OUT: u8 = 124;

/// How long past a command's timeout the host waits for the agent's report.
const AGENT_GRACE: Duration = Duration::from_secs(15);

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub fn request(args: &CommandArgs) -> anyhow::Result<ExecRequest> {
    let mut env = BTreeMap::new();
    for pair in &args.env {
        let Some((key, value)) = pair.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            bail!("--env expects KEY=VALUE, got {pair:?}");
        };
        env.insert(key.to_string(), value.to_string());
    }
    let timeout_ms = match args.timeout {
        None => None,
        Some(secs) if secs.is_finite() && secs > 0.0 && secs <= 7.0 * 86400.0 => {
            Some((secs * 1000.0).ceil() as u64)
        }
        Some(secs) => bail!("--timeout expects seconds between 0 and 604800, got {secs}"),
    };
    let command = if args.shell {
        Command::Shell(args.command.join(" "))
    } else {
        Command::Argv(args.command.clone())
    };
    Ok(ExecRequest {
        command,
        env,
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        timeout_ms,
        stdin: args.interactive,
    })
}

pub async fn exec(manager: &Manager, name: &str, args: &CommandArgs) -> anyhow::Result<u8> {
    let request = request(args)?;
    let timeout_ms = request.timeout_ms;
    let agent = manager.agent(name).await?;
    let mut session = agent.exec_stream(request).await?;
    if args.interactive {
        let stdin = session.stdin();
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
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    // The agent enforces the timeout; this is the host's backstop should the
    // agent never report the end.
    let deadline =
        timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms) + AGENT_GRACE);
    loop {
        let event = tokio::select! {
            event = session.next() => event?,
            () = sleep_until(deadline) => {
                bail!("the agent did not report the end of the command {}s after its timeout", AGENT_GRACE.as_secs());
            }
            _ = tokio::signal::ctrl_c() => {
                session.signal(libc::SIGINT, true).await?;
                continue;
            }
        };
        match event {
            ExecEvent::Stdout(data) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            ExecEvent::Stderr(data) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            ExecEvent::Exited(status) => {
                if status.timed_out {
                    eprintln!("arrakis: the command ran out of time and was killed");
                    return Ok(TIMED_OUT);
                }
                return Ok(status.shell_code().clamp(0, 255) as u8);
            }
        }
    }
}

pub async fn run(manager: &Manager, args: RunArgs) -> anyhow::Result<u8> {
    let name = args.name.clone().unwrap_or_else(generated_name);
    manager
        .create(spec(&name, &args.size))
        .await
        .with_context(|| format!("creating sandbox {name:?}"))?;
    let result = exec(manager, &name, &args.command).await;
    if args.rm {
        manager
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

    fn args(command: &[&str]) -> CommandArgs {
        CommandArgs {
            env: vec![],
            cwd: None,
            user: None,
            timeout: None,
            interactive: false,
            shell: false,
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn builds_argv_and_shell_requests() {
        let req = request(&args(&["ls", "-l"])).unwrap();
        assert_eq!(req.command, Command::Argv(vec!["ls".into(), "-l".into()]));
        let mut shell = args(&["echo", "$HOME"]);
        shell.shell = true;
        shell.timeout = Some(1.5);
        shell.env = vec!["A=b=c".into()];
        let req = request(&shell).unwrap();
        assert_eq!(req.command, Command::Shell("echo $HOME".into()));
        assert_eq!(req.timeout_ms, Some(1500));
        assert_eq!(req.env["A"], "b=c");
    }

    #[test]
    fn rejects_bad_env_and_timeouts() {
        let mut bad = args(&["true"]);
        bad.env = vec!["NOEQUALS".into()];
        assert!(request(&bad).unwrap_err().to_string().contains("--env"));
        let mut bad = args(&["true"]);
        bad.timeout = Some(-1.0);
        assert!(request(&bad).unwrap_err().to_string().contains("--timeout"));
    }
}
