//! Where the verbs are carried out: [`Backend::Local`] runs the runtime's
//! [`Manager`] in this process (the default), [`Backend::Remote`] talks to
//! an arrakis server over HTTP (`--server URL`). Every verb is written once
//! against this type; both variants speak the API's wire types, so output
//! (tables and `--json`) is the same in both modes.

mod local;
mod remote;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use arrakis_api::wire::exec::{ExecBody, ExecExit};
use arrakis_api::wire::fs::{Entry, Listing};
use arrakis_api::wire::snapshots::Snapshot;
use arrakis_api::wire::{PortForward, Vm};
use arrakis_runtime::network::{EgressPolicy, ForwardRequest};
use arrakis_runtime::{ExecSession, ExecStdin, ForkSource, Manager, RuntimeConfig};
use bytes::Bytes;

pub use remote::Client;

pub enum Backend {
    Local(Manager),
    Remote(Client),
}

/// A sandbox to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVm {
    pub name: String,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Boot even if a golden snapshot could warm-start it.
    pub cold_boot: bool,
    pub forwards: Vec<ForwardRequest>,
    /// `None`: the runtime's default policy.
    pub egress: Option<EgressPolicy>,
}

/// Which state change a PATCH asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Stop,
    Pause,
    Resume,
}

impl Change {
    /// The `status` of `PATCH /v1/vms/{name}` (`resume`, not the original
    /// client's `stopped`).
    pub fn wire(self) -> &'static str {
        match self {
            Change::Stop => "stopped",
            Change::Pause => "paused",
            Change::Resume => "resume",
        }
    }
}

impl Backend {
    /// Remote when a server URL is given, else the sandboxes of the state
    /// directory, in this process.
    pub async fn open(
        server: Option<&str>,
        token: Option<&str>,
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Backend> {
        if let Some(url) = server.filter(|url| !url.is_empty()) {
            return Ok(Backend::Remote(Client::new(url, token)?));
        }
        let mut config = RuntimeConfig::from_env().context("reading the environment")?;
        if let Some(dir) = state_dir {
            config.state_dir = dir.to_path_buf();
        }
        let manager = Manager::open(config)
            .await
            .context("opening the sandbox state")?;
        Ok(Backend::Local(manager))
    }

    /// Creates a sandbox; fails if one of that name exists.
    pub async fn create(&self, new: NewVm) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => local::create(manager, new).await,
            Backend::Remote(client) => {
                // POST /v1/vms boots a stopped VM of that name again;
                // `create` promises a new one.
                if client.get_vm(&new.name).await.is_ok() {
                    bail!("a sandbox named {:?} already exists", new.name);
                }
                client.start(new).await
            }
        }
    }

    /// Creates the sandbox, or boots it again if it exists and is stopped
    /// (what `POST /v1/vms` does).
    pub async fn start(&self, new: NewVm) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => local::start(manager, new).await,
            Backend::Remote(client) => client.start(new).await,
        }
    }

    /// Restores a snapshot as the new sandbox `name`.
    pub async fn restore(&self, name: &str, snapshot_id: &str) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => local::restore(manager, name, snapshot_id).await,
            Backend::Remote(client) => client.restore(name, snapshot_id).await,
        }
    }

    /// Starts `count` sandboxes `{prefix}-1..{count}` from a snapshot or a
    /// running sandbox; all or nothing. Returned in name order.
    pub async fn fork(
        &self,
        source: ForkSource,
        count: u32,
        prefix: &str,
    ) -> anyhow::Result<Vec<Vm>> {
        match self {
            Backend::Local(manager) => local::fork(manager, source, count, prefix).await,
            Backend::Remote(client) => client.fork(&source, count, prefix).await,
        }
    }

    /// Replaces the state of sandbox `name` with a snapshot's; returns the
    /// sandbox afterwards.
    pub async fn rollback(&self, name: &str, snapshot_id: &str) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => local::rollback(manager, name, snapshot_id).await,
            Backend::Remote(client) => client.rollback(name, snapshot_id).await,
        }
    }

    pub async fn get(&self, name: &str) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => Ok(Vm::from(&manager.get(name).await?)),
            Backend::Remote(client) => client.get_vm(name).await,
        }
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Vm>> {
        match self {
            Backend::Local(manager) => Ok(manager.list().await?.iter().map(Vm::from).collect()),
            Backend::Remote(client) => client.list_vms().await,
        }
    }

    /// Stops, pauses or resumes; returns the sandbox afterwards.
    pub async fn change(&self, name: &str, change: Change) -> anyhow::Result<Vm> {
        match self {
            Backend::Local(manager) => {
                let info = match change {
                    Change::Stop => manager.stop(name).await?,
                    Change::Pause => manager.pause(name).await?,
                    Change::Resume => manager.resume(name).await?,
                };
                Ok(Vm::from(&info))
            }
            Backend::Remote(client) => {
                client.change(name, change).await?;
                client.get_vm(name).await
            }
        }
    }

    pub async fn destroy(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => Ok(manager.destroy(name).await?),
            Backend::Remote(client) => client.destroy(name).await,
        }
    }

    pub async fn destroy_all(&self) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => local::destroy_all(manager).await,
            Backend::Remote(client) => client.destroy_all().await,
        }
    }

    /// Starts a command. `interactive` keeps its stdin open for
    /// [`Execution::stdin`]; otherwise stdin is `body.stdin` or empty.
    pub async fn exec(
        &self,
        name: &str,
        body: ExecBody,
        interactive: bool,
    ) -> anyhow::Result<Execution> {
        let started = Instant::now();
        let stream = match self {
            Backend::Local(manager) => {
                Stream::Local(local::exec(manager, name, &body, interactive).await?)
            }
            Backend::Remote(client) if interactive => {
                Stream::Ws(client.exec_ws(name, &body).await?)
            }
            Backend::Remote(client) => Stream::Sse(client.exec_sse(name, &body).await?),
        };
        Ok(Execution { stream, started })
    }

    pub async fn stat(&self, name: &str, path: &str) -> anyhow::Result<Entry> {
        match self {
            Backend::Local(manager) => {
                let stat = manager.agent(name).await?.stat(path).await?;
                Ok(Entry::new(path.to_string(), stat))
            }
            Backend::Remote(client) => client.stat(name, path).await,
        }
    }

    pub async fn list_dir(&self, name: &str, path: &str) -> anyhow::Result<Listing> {
        match self {
            Backend::Local(manager) => {
                let mut stats = manager.agent(name).await?.list(path).await?;
                stats.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Listing {
                    path: path.to_string(),
                    entries: stats
                        .into_iter()
                        .map(|stat| Entry::in_dir(path, stat))
                        .collect(),
                })
            }
            Backend::Remote(client) => client.list_dir(name, path).await,
        }
    }

    pub async fn mkdir(&self, name: &str, path: &str, parents: bool) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => Ok(manager
                .agent(name)
                .await?
                .mkdir(path, parents, None)
                .await?),
            Backend::Remote(client) => client.mkdir(name, path, parents).await,
        }
    }

    pub async fn remove(&self, name: &str, path: &str, recursive: bool) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => {
                Ok(manager.agent(name).await?.remove(path, recursive).await?)
            }
            Backend::Remote(client) => client.remove(name, path, recursive).await,
        }
    }

    pub async fn chmod(&self, name: &str, path: &str, mode: u32) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => Ok(manager.agent(name).await?.chmod(path, mode).await?),
            Backend::Remote(client) => client.chmod(name, path, mode).await,
        }
    }

    /// Writes the local file `file` to `path` in the sandbox (parents are
    /// created); returns the byte count.
    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        file: tokio::fs::File,
        mode: u32,
    ) -> anyhow::Result<u64> {
        match self {
            Backend::Local(manager) => local::write_file(manager, name, path, file, mode).await,
            Backend::Remote(client) => client.write_file(name, path, file, mode).await,
        }
    }

    /// Copies the sandbox file at `path` into `out`; returns the byte count.
    pub async fn read_file(
        &self,
        name: &str,
        path: &str,
        out: &mut tokio::fs::File,
    ) -> anyhow::Result<u64> {
        match self {
            Backend::Local(manager) => Ok(manager.agent(name).await?.read_file(path, out).await?),
            Backend::Remote(client) => client.read_file(name, path, out).await,
        }
    }

    /// Unpacks the tar archive `archive` into the sandbox directory `dir`
    /// (created with its parents).
    pub async fn put_archive(
        &self,
        name: &str,
        dir: &str,
        archive: tokio::fs::File,
    ) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => local::put_archive(manager, name, dir, archive).await,
            Backend::Remote(client) => client.put_archive(name, dir, archive).await,
        }
    }

    /// Writes a tar archive of the sandbox directory `dir` into `out`.
    pub async fn get_archive(
        &self,
        name: &str,
        dir: &str,
        out: &mut tokio::fs::File,
    ) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => local::get_archive(manager, name, dir, out).await,
            Backend::Remote(client) => client.get_archive(name, dir, out).await,
        }
    }

    /// The port forwards of sandbox `name`.
    pub async fn forwards(&self, name: &str) -> anyhow::Result<Vec<PortForward>> {
        match self {
            Backend::Local(manager) => {
                let forwards = manager.forwards(name).await?;
                Ok(forwards.iter().map(PortForward::from).collect())
            }
            Backend::Remote(client) => Ok(client.get_vm(name).await?.port_forwards),
        }
    }

    /// Adds forwards to sandbox `name`, all or nothing; returns those
    /// added, with their host ports.
    pub async fn add_forwards(
        &self,
        name: &str,
        requests: Vec<ForwardRequest>,
    ) -> anyhow::Result<Vec<PortForward>> {
        match self {
            Backend::Local(manager) => {
                let added = manager.add_forwards(name, requests).await?;
                Ok(added.iter().map(PortForward::from).collect())
            }
            Backend::Remote(client) => client.add_forwards(name, requests).await,
        }
    }

    /// Removes the forwards on `host_ports`.
    pub async fn remove_forwards(&self, name: &str, host_ports: &[u16]) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => {
                manager
                    .remove_forwards(name, Some(host_ports.to_vec()))
                    .await?;
            }
            Backend::Remote(client) => {
                for port in host_ports {
                    client.remove_forward(name, *port).await?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the egress policy of sandbox `name`; returns the policy in
    /// force afterwards.
    pub async fn set_egress(
        &self,
        name: &str,
        egress: EgressPolicy,
    ) -> anyhow::Result<EgressPolicy> {
        match self {
            Backend::Local(manager) => Ok(manager.set_egress(name, egress).await?.egress),
            Backend::Remote(client) => client.set_egress(name, egress).await,
        }
    }

    pub async fn snapshot(&self, name: &str, id: Option<String>) -> anyhow::Result<Snapshot> {
        match self {
            Backend::Local(manager) => local::snapshot(manager, name, id).await,
            Backend::Remote(client) => client.snapshot(name, id).await,
        }
    }

    /// Every snapshot, or those of the sandbox `vm`.
    pub async fn snapshots(&self, vm: Option<&str>) -> anyhow::Result<Vec<Snapshot>> {
        match self {
            Backend::Local(manager) => local::snapshots(manager, vm).await,
            Backend::Remote(client) => client.snapshots(vm).await,
        }
    }

    pub async fn get_snapshot(&self, id: &str) -> anyhow::Result<Snapshot> {
        match self {
            Backend::Local(manager) => local::get_snapshot(manager, id).await,
            Backend::Remote(client) => client.get_snapshot(id).await,
        }
    }

    pub async fn delete_snapshot(&self, id: &str) -> anyhow::Result<()> {
        match self {
            Backend::Local(manager) => local::delete_snapshot(manager, id).await,
            Backend::Remote(client) => client.delete_snapshot(id).await,
        }
    }
}

/// What a running command produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExecExit),
}

/// A command running in a sandbox, in either mode.
pub struct Execution {
    stream: Stream,
    started: Instant,
}

enum Stream {
    Local(ExecSession),
    Sse(remote::SseExec),
    Ws(remote::WsExec),
}

impl Execution {
    /// The next output, or the end. Cancel-safe (usable in `select!`).
    pub async fn next(&mut self) -> anyhow::Result<Output> {
        match &mut self.stream {
            Stream::Local(session) => Ok(match session.next().await? {
                arrakis_runtime::ExecEvent::Stdout(data) => Output::Stdout(data),
                arrakis_runtime::ExecEvent::Stderr(data) => Output::Stderr(data),
                arrakis_runtime::ExecEvent::Exited(status) => {
                    Output::Exit(ExecExit::new(status, self.started.elapsed()))
                }
            }),
            Stream::Sse(sse) => sse.next().await,
            Stream::Ws(ws) => ws.next().await,
        }
    }

    /// The command's stdin, when it was started interactive.
    pub fn stdin(&self) -> Option<Stdin> {
        match &self.stream {
            Stream::Local(session) => Some(Stdin::Local(session.stdin())),
            Stream::Ws(ws) => Some(Stdin::Ws(ws.sender())),
            Stream::Sse(_) => None,
        }
    }

    /// Sends `signal` to the command's process tree; false when this
    /// transport cannot (server-sent events are one way).
    pub async fn signal(&self, signal: i32) -> anyhow::Result<bool> {
        match &self.stream {
            Stream::Local(session) => {
                session.signal(signal, true).await?;
                Ok(true)
            }
            Stream::Ws(ws) => {
                ws.signal(signal).await?;
                Ok(true)
            }
            Stream::Sse(_) => Ok(false),
        }
    }
}

/// Writes a running command's stdin; usable from another task.
#[derive(Clone)]
pub enum Stdin {
    Local(ExecStdin),
    Ws(remote::WsSender),
}

impl Stdin {
    pub async fn write(&self, data: Bytes) -> anyhow::Result<()> {
        match self {
            Stdin::Local(stdin) => Ok(stdin.write(data).await?),
            Stdin::Ws(sender) => sender.stdin(data).await,
        }
    }

    /// Closes stdin: the command reads end of file.
    pub async fn close(&self) -> anyhow::Result<()> {
        match self {
            Stdin::Local(stdin) => Ok(stdin.close().await?),
            Stdin::Ws(sender) => sender.eof().await,
        }
    }
}
