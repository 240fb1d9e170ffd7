//! Embedded mode: the verbs on the runtime's [`Manager`], in this process.

use anyhow::{bail, Context};
use arrakis_api::wire::exec::ExecBody;
use arrakis_api::wire::snapshots::Snapshot;
use arrakis_api::wire::Vm;
use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::{
    ErrorKind, ExecEvent, ExecSession, ForkSource, Manager, SandboxSpec, WriteOptions,
};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::NewVm;

fn spec(new: NewVm) -> SandboxSpec {
    let mut spec = SandboxSpec::named(&new.name);
    spec.vcpus = new.vcpus;
    spec.memory_mb = new.memory_mb;
    spec.image = new.image;
    spec.env = new.env;
    spec.cold_boot = new.cold_boot;
    spec.forwards = new.forwards;
    spec.egress = new.egress;
    spec
}

pub async fn create(manager: &Manager, new: NewVm) -> anyhow::Result<Vm> {
    Ok(Vm::from(&manager.create(spec(new)).await?))
}

/// As `POST /v1/vms`: boot a stopped (or crashed) sandbox again, create
/// one that does not exist; one in another state is refused (by the
/// runtime, which names the state).
pub async fn start(manager: &Manager, new: NewVm) -> anyhow::Result<Vm> {
    let info = match manager.get(&new.name).await {
        Ok(_) => manager.start(&new.name).await?,
        Err(e) if e.kind() == ErrorKind::NotFound => manager.create(spec(new)).await?,
        Err(e) => return Err(e.into()),
    };
    Ok(Vm::from(&info))
}

pub async fn destroy_all(manager: &Manager) -> anyhow::Result<()> {
    let infos = manager.list().await?;
    let mut failures = Vec::new();
    for info in &infos {
        match manager.destroy(&info.name).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("{:?}: {}", info.name, e.chain())),
        }
    }
    if !failures.is_empty() {
        bail!(
            "failed to destroy {} of {} sandboxes: {}",
            failures.len(),
            infos.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

/// The agent request of `body`. Unlike the API, a missing `cwd` stays the
/// agent's default (as the CLI always did in this mode).
pub fn request(body: &ExecBody, interactive: bool) -> anyhow::Result<ExecRequest> {
    let command = match (&body.argv, &body.shell) {
        (Some(argv), None) if !argv.is_empty() => Command::Argv(argv.clone()),
        (None, Some(shell)) => Command::Shell(shell.clone()),
        _ => bail!("give either a command or a shell command line"),
    };
    Ok(ExecRequest {
        command,
        env: body.env.clone(),
        cwd: body.cwd.clone(),
        user: body.user.clone(),
        timeout_ms: body.timeout_secs.map(|secs| (secs * 1000.0).ceil() as u64),
        stdin: interactive || body.stdin.is_some(),
        ..ExecRequest::default()
    })
}

pub async fn exec(
    manager: &Manager,
    name: &str,
    body: &ExecBody,
    interactive: bool,
) -> anyhow::Result<ExecSession> {
    let mut request = request(body, interactive)?;
    let defaults = manager.exec_defaults(name).await?;
    let mut env = defaults.env;
    env.append(&mut request.env);
    request.env = env;
    request.cwd = request.cwd.or(defaults.cwd);
    request.user = request.user.or(defaults.user);
    let agent = manager.agent(name).await?;
    let session = agent.exec_stream(request).await?;
    if let Some(text) = body.stdin.clone() {
        let stdin = session.stdin();
        tokio::spawn(async move {
            if !text.is_empty() {
                let _ = stdin.write(Bytes::from(text)).await;
            }
            let _ = stdin.close().await;
        });
    }
    Ok(session)
}

pub async fn write_file(
    manager: &Manager,
    name: &str,
    path: &str,
    mut file: tokio::fs::File,
    mode: u32,
) -> anyhow::Result<u64> {
    let options = WriteOptions {
        mode: Some(mode),
        create_parents: true,
        append: false,
    };
    let agent = manager.agent(name).await?;
    Ok(agent.write_file(path, &mut file, options).await?)
}

/// Runs `argv` in the sandbox with `input` as its stdin and its stdout
/// into `out`; fails with its stderr unless it exits 0.
async fn run_tool(
    manager: &Manager,
    name: &str,
    argv: &[&str],
    input: Option<tokio::fs::File>,
    out: Option<&mut tokio::fs::File>,
) -> anyhow::Result<()> {
    let request = ExecRequest {
        command: Command::Argv(argv.iter().map(|s| s.to_string()).collect()),
        env: Default::default(),
        cwd: None,
        user: None,
        timeout_ms: None,
        stdin: true,
        ..ExecRequest::default()
    };
    let agent = manager.agent(name).await?;
    let mut session = agent.exec_stream(request).await?;
    let stdin = session.stdin();
    let feeder = tokio::spawn(async move {
        if let Some(mut input) = input {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = input.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if stdin
                    .write(Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    // The tool stopped reading; its exit status tells why.
                    break;
                }
            }
        }
        let _ = stdin.close().await;
        anyhow::Ok(())
    });
    let mut out = out;
    let mut errors = Vec::new();
    let status = loop {
        match session.next().await? {
            ExecEvent::Stdout(data) => {
                if let Some(out) = out.as_mut() {
                    out.write_all(&data).await?;
                }
            }
            ExecEvent::Stderr(data) => {
                if errors.len() < 64 * 1024 {
                    errors.extend_from_slice(&data);
                }
            }
            ExecEvent::Exited(status) => break status,
        }
    };
    feeder.await.context("feeding the archive")??;
    if let Some(out) = out {
        out.flush().await?;
    }
    if status.code != Some(0) {
        let text = String::from_utf8_lossy(&errors);
        bail!(
            "{} in the sandbox failed ({}): {}",
            argv[0],
            arrakis_api::wire::exit_error(status.code, status.signal),
            text.trim()
        );
    }
    Ok(())
}

pub async fn put_archive(
    manager: &Manager,
    name: &str,
    dir: &str,
    archive: tokio::fs::File,
) -> anyhow::Result<()> {
    manager.agent(name).await?.mkdir(dir, true, None).await?;
    run_tool(
        manager,
        name,
        &["tar", "-x", "--no-same-owner", "-f", "-", "-C", dir],
        Some(archive),
        None,
    )
    .await
}

pub async fn get_archive(
    manager: &Manager,
    name: &str,
    dir: &str,
    out: &mut tokio::fs::File,
) -> anyhow::Result<()> {
    run_tool(
        manager,
        name,
        &["tar", "-c", "-f", "-", "-C", dir, "."],
        None,
        Some(out),
    )
    .await
}

pub async fn snapshot(
    manager: &Manager,
    name: &str,
    id: Option<String>,
) -> anyhow::Result<Snapshot> {
    Ok(Snapshot::from(&manager.snapshot(name, id).await?))
}

pub async fn snapshots(manager: &Manager, vm: Option<&str>) -> anyhow::Result<Vec<Snapshot>> {
    let mut list = Vec::new();
    for info in manager.list_snapshots().await? {
        if vm.is_none_or(|vm| info.sandbox == vm) {
            list.push(Snapshot::from(&info));
        }
    }
    Ok(list)
}

pub async fn get_snapshot(manager: &Manager, id: &str) -> anyhow::Result<Snapshot> {
    Ok(Snapshot::from(&manager.get_snapshot(id).await?))
}

pub async fn delete_snapshot(manager: &Manager, id: &str) -> anyhow::Result<()> {
    Ok(manager.delete_snapshot(id).await?)
}

pub async fn restore(manager: &Manager, name: &str, id: &str) -> anyhow::Result<Vm> {
    Ok(Vm::from(&manager.restore(id, name).await?))
}

pub async fn fork(
    manager: &Manager,
    source: ForkSource,
    count: u32,
    prefix: &str,
) -> anyhow::Result<Vec<Vm>> {
    let infos = manager.fork(source, count, prefix).await?;
    Ok(infos.iter().map(Vm::from).collect())
}

pub async fn rollback(manager: &Manager, name: &str, snapshot_id: &str) -> anyhow::Result<Vm> {
    Ok(Vm::from(&manager.rollback(name, snapshot_id).await?))
}
