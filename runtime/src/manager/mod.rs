//! [`Manager`]: the one entry point for sandbox operations on this host.
//!
//! Ownership: the true owner of a sandbox is its record in the store plus
//! its lock file, not a task in this process, because several manager
//! processes (the CLI runs one per command) share a state directory and VMs
//! outlive all of them. Every lifecycle operation takes the sandbox's
//! `flock`, re-reads the record, checks the transition with
//! [`SandboxState::on`], acts, and records the result. Agent use (exec,
//! files) takes no lock: many calls run concurrently on one shared session.
//!
//! [`Manager::open`] reconciles records with reality first (see
//! [`reconcile`]). The manager is `Clone + Send + Sync`; no std mutex is
//! held across an `.await`.
//!
//! Snapshots and restores live in [`snapshot`], fork and rollback in
//! [`fork`]; the sandbox quota
//! (`max_sandboxes`) is checked in the same store transaction that inserts
//! a new record.

mod build;
mod checkpoint;
mod export;
mod fork;
mod golden;
mod images;
mod lifecycle;
mod network;
mod reconcile;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::Instrument;

use crate::accel::{Accel, AccelKind, HostFacts};
use crate::agent::AgentClient;
use crate::config::RuntimeConfig;
use crate::error::RuntimeError;
use crate::layout::StateLayout;
use crate::lock::{LockError, SandboxLock};
use crate::network::{NetMode, PortForward, SandboxNet};
use crate::sandbox::{Operation, SandboxState};
use crate::spec::SandboxSpec;
use crate::store::{SandboxRecord, Store, StoreError};
use crate::vmm::qemu::Qemu;
use crate::vmm::{VmHandle, Vmm};

pub use build::{BuildProgress, BuildRequest, QuietBuild};
pub use checkpoint::{CheckpointFile, ExportedCheckpoint, CHECKPOINT_VERSION};
pub use fork::{ForkSource, MAX_FORKS};
pub use images::{ExecDefaults, ImportedImage};
pub use snapshot::SnapshotInfo;

/// Handshake bound when connecting to the agent of a running sandbox.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What callers see of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxInfo {
    pub name: String,
    pub id: String,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    /// QEMU's pid while it runs.
    pub pid: Option<u32>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub accel: AccelKind,
    pub boot_count: u32,
    /// The guest serial console of the current (or last) boot.
    pub console_log: PathBuf,
    /// Environment for every exec in the sandbox (front ends apply it).
    pub env: BTreeMap<String, String>,
    /// The snapshot it was last restored, forked or rolled back from
    /// (which may since be deleted); `None` if it was cold-created.
    pub from_snapshot: Option<String>,
    /// Its NIC (`None`: restored from a snapshot taken before networking).
    pub network: Option<SandboxNet>,
    /// Host ports that reach it, by host port.
    pub forwards: Vec<PortForward>,
}

/// The agent session of one sandbox, connected on first use.
type AgentSlot = Arc<tokio::sync::Mutex<Option<AgentClient>>>;

#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    config: RuntimeConfig,
    layout: StateLayout,
    accel: Accel,
    store: Store,
    vmm: Arc<dyn Vmm>,
    /// Keyed by sandbox id. The std mutex guards only map access.
    agents: Mutex<HashMap<String, AgentSlot>>,
    /// Digests of the files golden snapshots are keyed on.
    digests: golden::DigestCache,
    /// How new sandboxes are networked.
    net_mode: NetMode,
}

impl Manager {
    /// Opens the state directory with the QEMU backend and reconciles it.
    pub async fn open(config: RuntimeConfig) -> Result<Manager, RuntimeError> {
        let vmm = Arc::new(Qemu::new(&config.qemu_binary));
        Manager::open_with(config, vmm, &HostFacts::probe()).await
    }

    /// [`Manager::open`] with a given VMM backend and host facts.
    pub async fn open_with(
        config: RuntimeConfig,
        vmm: Arc<dyn Vmm>,
        host: &HostFacts,
    ) -> Result<Manager, RuntimeError> {
        config.validate()?;
        let accel = Accel::choose(config.accel, host, config.tcg_tb_size_mb).map_err(|e| {
            RuntimeError::InvalidArgument {
                field: "accel",
                message: e.to_string(),
            }
        })?;
        let layout = StateLayout::new(&config.state_dir).with_ram_dir(&config.resolved_ram_dir());
        create_private_dir(layout.root())?;
        // The RAM directory is made on demand (see `Manager::prepare_ram`).
        for dir in [
            layout.sandboxes_dir(),
            layout.layers_dir(),
            layout.snapshots_dir(),
        ] {
            create_private_dir(&dir)?;
        }
        let store = Store::open(&layout.database())?;
        let net_mode = network::choose_mode(config.network.mode)?;
        let manager = Manager {
            inner: Arc::new(Inner {
                config,
                layout,
                accel,
                store,
                vmm,
                agents: Mutex::new(HashMap::new()),
                digests: golden::DigestCache::default(),
                net_mode,
            }),
        };
        manager.reconcile_all().await?;
        // A failed apply leaves the kernel's previous ruleset in place (nft
        // transactions are atomic); the next change or start-up retries.
        // Refusing to open would block every operation on the sandboxes.
        if let Err(error) = manager.reconcile_network().await {
            tracing::warn!(error = %error.chain(), "cannot bring the host network in line with the state");
        }
        Ok(manager)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The accelerator new boots use.
    pub fn accel(&self) -> &Accel {
        &self.inner.accel
    }

    /// Creates and boots a sandbox; returns once its agent answers. On any
    /// failure everything created is removed again.
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError> {
        let span = tracing::info_span!("sandbox", name = %spec.name);
        self.create_inner(spec, None).instrument(span).await
    }

    /// Boots a stopped or crashed sandbox again, on its existing disk.
    pub async fn start(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        self.start_inner(name).instrument(span(name)).await
    }

    /// Powers the guest off (agent shutdown, then QMP quit, then SIGKILL).
    pub async fn stop(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        self.stop_inner(name).instrument(span(name)).await
    }

    /// Freezes the VM's vCPUs.
    pub async fn pause(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        self.pause_or_resume(name, Operation::Pause)
            .instrument(span(name))
            .await
    }

    pub async fn resume(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        self.pause_or_resume(name, Operation::Resume)
            .instrument(span(name))
            .await
    }

    /// Kills the VM if it runs and removes the sandbox's files and record.
    /// Disk layers its snapshots or restored sandboxes stand on stay.
    pub async fn destroy(&self, name: &str) -> Result<(), RuntimeError> {
        self.destroy_inner(name).instrument(span(name)).await
    }

    /// Snapshots a running or paused sandbox (memory, devices and disk at
    /// one instant), which stays as it was. `id`: the snapshot's id, unique
    /// in this state directory (see [`crate::spec::validate_snapshot_id`]);
    /// `None` generates `snap-<random hex>`.
    pub async fn snapshot(
        &self,
        name: &str,
        id: Option<String>,
    ) -> Result<SnapshotInfo, RuntimeError> {
        self.snapshot_inner(name, id).instrument(span(name)).await
    }

    /// Every complete snapshot, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        self.list_snapshots_inner()
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<SnapshotInfo, RuntimeError> {
        self.get_snapshot_inner(id)
    }

    /// Deletes a snapshot's files and record. Sandboxes restored from it
    /// keep working: the disk layers they stand on stay until the last of
    /// them is destroyed.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), RuntimeError> {
        self.delete_snapshot_inner(id)
            .instrument(tracing::info_span!("snapshot", id = %id))
            .await
    }

    /// The golden snapshots kept for warm starts (see `cold_boot` and
    /// [`RuntimeConfig::warm_start`]), oldest first.
    pub async fn golden_snapshots(&self) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        self.golden_snapshots_inner()
    }

    /// Deletes every golden snapshot (the next create of each image and
    /// shape boots and keeps a new one). Returns how many were deleted.
    pub async fn clear_golden_snapshots(&self) -> Result<usize, RuntimeError> {
        self.clear_golden_snapshots_inner().await
    }

    /// Starts a new sandbox `new_name` from a snapshot, running from the
    /// instant the snapshot was taken (processes, memory, disk), with the
    /// snapshot's vCPUs, memory, image and environment; returns once its
    /// agent answers and the clone has its own hostname, clock and entropy.
    /// `AlreadyExists` if the name is taken.
    pub async fn restore(
        &self,
        snapshot_id: &str,
        new_name: &str,
    ) -> Result<SandboxInfo, RuntimeError> {
        self.restore_inner(snapshot_id, new_name, None)
            .instrument(span(new_name))
            .await
    }

    /// [`Manager::restore`], with the clone's NIC attached to network
    /// namespace `netns` (netns mode, see [`crate::network::netns`]), as
    /// the containerd shim restores a checkpoint into its container's
    /// namespace.
    pub async fn restore_attached(
        &self,
        snapshot_id: &str,
        new_name: &str,
        netns: &std::path::Path,
    ) -> Result<SandboxInfo, RuntimeError> {
        self.restore_inner(snapshot_id, new_name, Some(netns))
            .instrument(span(new_name))
            .await
    }

    /// Starts `count` (1 to [`MAX_FORKS`]) new sandboxes
    /// `<name_prefix>-1` .. `<name_prefix>-<count>` from one snapshot, or
    /// from a running or paused sandbox (snapshotted first, and that
    /// snapshot deleted afterwards), restoring a few at once. Each is its
    /// own machine (hostname, clock, entropy, `/etc/machine-id`). All or
    /// nothing: names, count and quota are checked before any VM starts,
    /// and on any failure the forks made are destroyed. Returned in name
    /// order.
    pub async fn fork(
        &self,
        source: ForkSource,
        count: u32,
        name_prefix: &str,
    ) -> Result<Vec<SandboxInfo>, RuntimeError> {
        self.fork_inner(source, count, name_prefix)
            .instrument(tracing::info_span!("fork", prefix = %name_prefix))
            .await
    }

    /// Replaces the memory, devices and disk of sandbox `name` (running,
    /// paused, stopped or crashed) with snapshot `snapshot_id`'s, keeping
    /// its name, id and environment; it runs from the snapshot's instant
    /// when this returns. The snapshot must have the sandbox's vCPUs,
    /// memory and image (`InvalidArgument` otherwise); it need not be one
    /// of the sandbox's own. Disk layers only the old state used are freed.
    pub async fn rollback(
        &self,
        name: &str,
        snapshot_id: &str,
    ) -> Result<SandboxInfo, RuntimeError> {
        self.rollback_inner(name, snapshot_id)
            .instrument(span(name))
            .await
    }

    /// One sandbox, with its liveness refreshed.
    pub async fn get(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        let record = self.record(name)?;
        let record = self.refresh(record).await?;
        record
            .map(|r| self.info(&r))
            .ok_or_else(|| RuntimeError::NotFound {
                name: name.to_string(),
            })
    }

    /// Every sandbox, by name, with liveness refreshed (a QEMU that died
    /// shows as crashed).
    pub async fn list(&self) -> Result<Vec<SandboxInfo>, RuntimeError> {
        let mut infos = Vec::new();
        for record in self.inner.store.list()? {
            if let Some(record) = self.refresh(record).await? {
                infos.push(self.info(&record));
            }
        }
        Ok(infos)
    }

    /// The guest agent of a running sandbox.
    pub async fn agent(&self, name: &str) -> Result<AgentClient, RuntimeError> {
        let record = self.record(name)?;
        let record = self
            .refresh(record)
            .await?
            .ok_or_else(|| RuntimeError::NotFound {
                name: name.to_string(),
            })?;
        self.check(&record, Operation::Agent)?;
        self.agent_for(&record).await
    }

    fn record(&self, name: &str) -> Result<SandboxRecord, RuntimeError> {
        self.inner
            .store
            .get(name)?
            .ok_or_else(|| RuntimeError::NotFound {
                name: name.to_string(),
            })
    }

    /// Checks that `op` is legal now; returns the state after it.
    fn check(&self, record: &SandboxRecord, op: Operation) -> Result<SandboxState, RuntimeError> {
        record.state.on(op).map_err(|e| RuntimeError::InvalidState {
            name: record.name.clone(),
            state: e.from,
            op: e.op,
        })
    }

    fn lock_timeout(&self) -> Duration {
        self.inner.config.boot_timeout()
            + self.inner.config.stop_timeout()
            + Duration::from_secs(15)
    }

    /// Takes the sandbox's lock and returns its record as of then.
    async fn lock(&self, name: &str) -> Result<(SandboxLock, SandboxRecord), RuntimeError> {
        let record = self.record(name)?;
        let path = self.inner.layout.lock_file(&record.id);
        let lock = SandboxLock::acquire(&path, self.lock_timeout())
            .await
            .map_err(|e| lock_error(name, e))?;
        // The record may have changed (or gone, or been re-created under a
        // new id) while we waited.
        match self.inner.store.get(name)? {
            Some(current) if current.id == record.id => Ok((lock, current)),
            _ => {
                // Destroyed while we waited: our open re-created its lock file.
                let _ = std::fs::remove_file(&path);
                Err(RuntimeError::NotFound {
                    name: name.to_string(),
                })
            }
        }
    }

    fn handle(&self, record: &SandboxRecord) -> Option<VmHandle> {
        let dir = self.inner.layout.sandbox_dir(&record.id);
        record.pid.map(|pid| VmHandle { pid, dir })
    }

    fn info(&self, record: &SandboxRecord) -> SandboxInfo {
        SandboxInfo {
            name: record.name.clone(),
            id: record.id.clone(),
            state: record.state,
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
            image: record.image.clone(),
            pid: record.pid,
            created_at: record.created_at,
            accel: record.accel,
            boot_count: record.boot_count,
            console_log: self.inner.layout.sandbox_dir(&record.id).console_log(),
            env: record.env.clone(),
            from_snapshot: record.from_snapshot.clone(),
            network: record.network.clone(),
            forwards: match record.network {
                Some(_) => self.inner.store.forwards(&record.id).unwrap_or_default(),
                None => Vec::new(),
            },
        }
    }

    /// The file the sandbox's disk is written to.
    fn disk_path(&self, record: &SandboxRecord) -> PathBuf {
        match &record.disk_layer {
            Some(layer) => self.inner.layout.layer_file(layer),
            None => self.inner.layout.sandbox_dir(&record.id).legacy_overlay(),
        }
    }

    /// Removes the RAM of a sandbox whose VM is gone (its tmpfs file, or its
    /// link to a snapshot's memory), and the RAM directory if that was the
    /// last file in it, so state directories without running VMs leave
    /// nothing on `/dev/shm`.
    fn release_ram(&self, id: &str) {
        remove_file_if_exists(&self.inner.layout.ram_file(id));
        remove_file_if_exists(&self.inner.layout.sandbox_dir(id).memory_base());
        let _ = std::fs::remove_dir(self.inner.layout.ram_dir());
    }

    /// Makes the RAM directory and an empty RAM file of sandbox `id` in it
    /// (QEMU sizes it, and the guest starts from zeros). Another manager may
    /// remove the directory when it is empty ([`Manager::release_ram`])
    /// between the two steps; the file then cannot be created (`NotFound`)
    /// and both are tried again. Once the file exists the directory is not
    /// empty and stays.
    fn prepare_ram(&self, id: &str) -> Result<(), RuntimeError> {
        let ram = self.inner.layout.ram_file(id);
        let mut attempts = 0;
        loop {
            create_private_dir(self.inner.layout.ram_dir())?;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&ram);
            match created.map(drop) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => {
                    attempts += 1;
                }
                Err(source) => {
                    return Err(RuntimeError::Io {
                        op: "create the RAM file",
                        path: ram,
                        source,
                    })
                }
            }
        }
    }

    /// Deletes the files of layers the store just dropped.
    fn remove_layers(&self, layers: &[String]) {
        for layer in layers {
            tracing::debug!(%layer, "removing an unreferenced disk layer");
            remove_file_if_exists(&self.inner.layout.layer_file(layer));
        }
    }

    fn agent_slot(&self, id: &str) -> AgentSlot {
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.entry(id.to_string()).or_default().clone()
    }

    fn forget_agent(&self, id: &str) {
        let mut agents = self.inner.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.remove(id);
    }

    /// The cached agent session of `record`, connecting if there is none.
    async fn agent_for(&self, record: &SandboxRecord) -> Result<AgentClient, RuntimeError> {
        let slot = self.agent_slot(&record.id);
        let mut guard = slot.lock().await;
        if let Some(agent) = guard.as_ref().filter(|a| a.is_connected()) {
            return Ok(agent.clone());
        }
        let socket = self.inner.layout.sandbox_dir(&record.id).agent_socket();
        let agent = AgentClient::connect(&socket, AGENT_CONNECT_TIMEOUT)
            .await
            .map_err(|source| RuntimeError::Agent {
                name: record.name.clone(),
                source,
            })?;
        *guard = Some(agent.clone());
        Ok(agent)
    }
}

fn span(name: &str) -> tracing::Span {
    tracing::info_span!("sandbox", name = %name)
}

/// The error for a failed insert of a new sandbox record.
fn insert_error(error: StoreError) -> RuntimeError {
    match error {
        StoreError::Duplicate { name } => RuntimeError::AlreadyExists { name },
        StoreError::Quota { max } => RuntimeError::QuotaExceeded { max },
        StoreError::MissingSnapshot { id } => RuntimeError::SnapshotNotFound { id },
        other => other.into(),
    }
}

fn remove_file_if_exists(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %error, "cannot remove file");
        }
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock_error(name: &str, error: LockError) -> RuntimeError {
    match error {
        LockError::Timeout { .. } => RuntimeError::Busy {
            name: name.to_string(),
        },
        LockError::Io { path, source } => RuntimeError::Io {
            op: "lock",
            path,
            source,
        },
    }
}

/// Creates `path` (and parents) with mode 0700 if missing.
fn create_private_dir(path: &std::path::Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| RuntimeError::Io {
            op: "create directory",
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests;
