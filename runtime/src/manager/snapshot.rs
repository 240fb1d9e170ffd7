//! Snapshots, restores and snapshot deletion.
//!
//! # Snapshot
//! A snapshot is three things taken while the vCPUs are stopped: the disk
//! (the sandbox's top qcow2 layer, frozen with `blockdev-snapshot-sync`; the
//! sandbox continues on a new layer above it), the device state
//! (`xen-save-devices-state`: every device but RAM, ~20 KiB) and the guest
//! RAM, captured from its file:
//! - a booted VM writes its RAM into a tmpfs file mapped shared: the
//!   capture is a sparse copy of that file;
//! - a restored VM maps its snapshot's `memory.ram` privately: the capture
//!   is a sparse copy of that file with the pages the VM has written since
//!   (its copy-on-write copies, read through `/proc`) laid over it
//!   ([`memfile::capture_private`]). Its cost follows what the guest
//!   touched, not its size, and nothing goes through a migration stream.
//!
//! Steps, under the sandbox's lock and the new snapshot's exclusive lock:
//!
//! 1. record the snapshot as `creating`, reserving the new top layer;
//! 2. freeze the guest's exec processes through the agent (if running,
//!    see [`Manager::freeze_execs`]), stop the vCPUs, freeze the disk,
//!    record the sandbox's new top layer at once (from here on QEMU writes
//!    to it, whatever happens next);
//! 3. save the device state to `state.bin`, capture the RAM to
//!    `memory.ram`;
//! 4. `cont` if the VM was running (a paused one stays paused), and thaw
//!    the execs (a clone thaws its own after its fix-ups);
//! 5. `fsync` the snapshot's files and the frozen layer (snapshots survive
//!    host reboots), then record the snapshot `ready`.
//!
//! Any failure rolls the record back (the reserved layer is collected if
//! the disk was not frozen), removes the partial files and leaves the VM as
//! it was. A manager that dies half-way leaves a `creating` record whose
//! lock is free; reconciliation then finds out from QEMU (or from the
//! files, if QEMU is gone too) whether the disk was frozen, records that,
//! resumes the VM if its record says running, and removes the remains
//! ([`Manager::recover_snapshots`]). A snapshot is visible only once
//! `ready`, so a crash never shows a half snapshot.
//!
//! # Restore: map the RAM copy-on-write
//! A restore makes a new sandbox whose disk is a new layer on the
//! snapshot's frozen layer and whose RAM is the snapshot's `memory.ram`,
//! hard-linked into the sandbox directory (`memory.base`) and mapped
//! privately (`share=off`): nothing is copied, the file is never written,
//! and all sandboxes restored from one snapshot share its unmodified pages
//! in the page cache. The link keeps the memory alive for the sandbox when
//! the snapshot is deleted. QEMU starts with `-incoming defer -S`, loads
//! `state.bin`, `cont`s; the manager waits for the agent and fixes the
//! clone up through it: wall clock (`SetTime`), hostname, fresh entropy
//! (`Configure`) and a new machine-id.
//!
//! # Layers and deletion
//! Disk layers are shared by reachability (see [`crate::store`]): deleting
//! a snapshot removes its memory and state files at once, and its frozen
//! layer only when no sandbox stands on it any more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrakis_protocol::ConfigureRequest;
use serde::Serialize;

use super::lifecycle::{new_id, random_bytes, require_file};
use super::network::NetPlan;
use super::{
    create_private_dir, insert_error, lock_error, now_secs, remove_file_if_exists, Manager,
    SandboxInfo,
};
use crate::accel::AccelKind;
use crate::agent::{AgentClient, WriteOptions};
use crate::error::RuntimeError;
use crate::lock::{LockError, SandboxLock};
use crate::memfile;
use crate::network::NetMode;
use crate::sandbox::{Operation, SandboxState};
use crate::spec;
use crate::store::{NewLayer, SandboxRecord, SnapshotRecord, SnapshotState, StoreError};
use crate::vmm::qemu::{self, create_overlay, Backing};
use crate::vmm::{GuestMemory, StateFormat, VmHandle, VmStatus};

/// How long the exec processes of a sandbox may stay frozen for a snapshot
/// before the guest thaws them by itself (a host that died half-way).
const FREEZE_LEASE: Duration = Duration::from_secs(30);

/// How long a freeze request may take.
const FREEZE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of entropy mixed into a restored clone's pool.
const CLONE_ENTROPY: usize = 64;

/// Random bytes of a clone's `/etc/machine-id` (32 hex digits).
const MACHINE_ID_BYTES: usize = 16;

const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// Console lines quoted in a restore error.
const CONSOLE_TAIL_LINES: usize = 40;

/// What callers see of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// Name of the sandbox it was taken of (which may since be gone).
    pub sandbox: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    /// The sandbox's environment, given to sandboxes restored from it.
    pub env: BTreeMap<String, String>,
    /// Restores need a host running VMs under the same accelerator.
    pub accel: AccelKind,
    /// Bytes on the host's disk: memory, device state and the frozen disk
    /// layer (which restored sandboxes may share).
    pub size_bytes: u64,
    /// The snapshot the sandbox was itself restored, forked or rolled back
    /// from when this one was taken (which may since be deleted); `None`
    /// if it was cold-created.
    pub parent_snapshot: Option<String>,
}

/// How far a snapshot got, for the clean-up of a failure.
#[derive(Debug, Default)]
struct Progress {
    /// The vCPUs were stopped by us.
    paused: bool,
    /// The disk was frozen: QEMU writes to the new layer.
    frozen: bool,
    /// The store knows about the new layer.
    switched: bool,
}

impl Manager {
    pub(super) async fn snapshot_inner(
        &self,
        name: &str,
        id: Option<String>,
    ) -> Result<SnapshotInfo, RuntimeError> {
        let id = match id {
            Some(id) => {
                spec::validate_snapshot_id(&id).map_err(|message| {
                    RuntimeError::InvalidArgument {
                        field: "snapshot_id",
                        message,
                    }
                })?;
                id
            }
            None => format!("snap-{}", new_id()?),
        };
        let (_lock, mut record) = self.lock(name).await?;
        self.check(&record, Operation::Snapshot)?;
        let not_running = |record: &SandboxRecord| RuntimeError::InvalidState {
            name: name.to_string(),
            state: record.state,
            op: Operation::Snapshot,
        };
        let Some(vm) = self.handle(&record) else {
            return Err(not_running(&record));
        };
        if !self.inner.vmm.is_alive(&vm) {
            self.mark_died(&mut record)?;
            return Err(not_running(&record));
        }
        let Some(layer) = record.disk_layer.clone() else {
            return Err(RuntimeError::NotSnapshottable {
                name: name.to_string(),
                reason: "its disk predates snapshot support; stop and start it once",
            });
        };
        self.snapshot_locked(&record, &vm, layer, id, None).await
    }

    /// Takes snapshot `id` of `record`'s running VM `vm`, whose disk top is
    /// `layer`. The caller holds the sandbox's lock. With `golden_key`, the
    /// snapshot is a golden one (hidden from users; no environment).
    pub(super) async fn snapshot_locked(
        &self,
        record: &SandboxRecord,
        vm: &VmHandle,
        layer: String,
        id: String,
        golden_key: Option<String>,
    ) -> Result<SnapshotInfo, RuntimeError> {
        let memory =
            self.running_memory(&record.id)
                .ok_or_else(|| RuntimeError::NotSnapshottable {
                    name: record.name.clone(),
                    reason: "its VM was booted without file-backed memory (by an older arrakis); \
                         stop and start it once",
                })?;
        let env = if golden_key.is_some() {
            BTreeMap::new()
        } else {
            record.env.clone()
        };
        let network = self.snapshot_net(record)?;
        let dir = new_id()?;
        let snap_lock_path = self.inner.layout.snapshot_lock(&dir);
        let snap_lock = SandboxLock::try_acquire(&snap_lock_path)
            .map_err(|e| snapshot_lock_error(&id, e))?
            .ok_or_else(|| RuntimeError::SnapshotBusy { id: id.clone() })?;
        let snap = SnapshotRecord {
            id,
            dir,
            state: SnapshotState::Creating,
            sandbox: record.name.clone(),
            sandbox_id: record.id.clone(),
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
            image: record.image.clone(),
            image_path: record.image_path.clone(),
            env,
            accel: record.accel,
            layer,
            next_layer: Some(new_id()?),
            created_at: now_secs(),
            parent_snapshot: record.from_snapshot.clone(),
            state_format: StateFormat::Devices,
            golden_key,
            network,
        };
        if let Err(error) = self.inner.store.begin_snapshot(&snap) {
            remove_file_if_exists(&snap_lock_path);
            return Err(match error {
                StoreError::DuplicateSnapshot { id } => RuntimeError::SnapshotExists { id },
                other => other.into(),
            });
        }
        let mut progress = Progress::default();
        let frozen = self.freeze_execs(record).await;
        let result = self
            .take_snapshot(record, vm, &memory, &snap, &mut progress, frozen)
            .await;
        if let Err(error) = result {
            tracing::warn!(id = %snap.id, error = %error.chain(), ?progress, "snapshot failed; cleaning up");
            if progress.frozen && !progress.switched {
                // QEMU writes to the new layer but the store could not say
                // so: deleting the record would collect that layer. Leave
                // it to reconciliation, which asks QEMU.
                tracing::error!(id = %snap.id, "the sandbox's new disk layer is unrecorded; reconciliation will repair it");
            } else {
                self.discard_snapshot(&snap);
            }
            drop(snap_lock);
            return Err(error);
        }
        drop(snap_lock);
        let snap = self.inner.store.get_snapshot(&snap.id)?.ok_or_else(|| {
            RuntimeError::SnapshotNotFound {
                id: snap.id.clone(),
            }
        })?;
        Ok(self.snapshot_info(&snap))
    }

    /// Steps 2 to 5 of the module documentation.
    async fn take_snapshot(
        &self,
        record: &SandboxRecord,
        vm: &VmHandle,
        memory: &GuestMemory,
        snap: &SnapshotRecord,
        progress: &mut Progress,
        frozen: bool,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let dir = self.inner.layout.snapshot_dir(&snap.dir);
        create_private_dir(dir.path())?;
        let frozen_result = self
            .freeze_and_save(record, vm, memory, snap, progress)
            .await;
        let paused_for = started.elapsed();
        if progress.paused {
            self.inner
                .vmm
                .resume(vm)
                .await
                .map_err(|source| RuntimeError::Vmm {
                    name: record.name.clone(),
                    source,
                })?;
        }
        if frozen {
            self.thaw_execs(record).await;
        }
        frozen_result?;
        let layer = self.inner.layout.layer_file(&snap.layer);
        let files = [dir.memory_file(), dir.state_file(), layer];
        let dirs = [
            dir.path().to_path_buf(),
            self.inner.layout.layers_dir(),
            self.inner.layout.snapshots_dir(),
        ];
        blocking("sync the snapshot to disk", move || {
            for file in &files {
                std::fs::File::open(file)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| (file.clone(), e))?;
            }
            for dir in &dirs {
                memfile::sync_dir(dir).map_err(|e| (dir.clone(), e))?;
            }
            Ok(())
        })
        .await?;
        self.inner.store.finish_snapshot(&snap.id)?;
        tracing::info!(
            id = %snap.id,
            paused_ms = paused_for.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            memory_bytes = memfile::disk_usage(&dir.memory_file()),
            "snapshot taken"
        );
        Ok(())
    }

    async fn freeze_and_save(
        &self,
        record: &SandboxRecord,
        vm: &VmHandle,
        memory: &GuestMemory,
        snap: &SnapshotRecord,
        progress: &mut Progress,
    ) -> Result<(), RuntimeError> {
        let vmm = &self.inner.vmm;
        let vmm_err = |source| RuntimeError::Vmm {
            name: record.name.clone(),
            source,
        };
        if record.state == SandboxState::Running {
            vmm.pause(vm).await.map_err(vmm_err)?;
            progress.paused = true;
        }
        let next = snap.next_layer.as_deref().unwrap_or_default();
        vmm.freeze_disk(vm, &self.inner.layout.layer_file(next))
            .await
            .map_err(vmm_err)?;
        progress.frozen = true;
        self.inner.store.switch_disk(&snap.id)?;
        progress.switched = true;
        let dir = self.inner.layout.snapshot_dir(&snap.dir);
        vmm.save_state(vm, &dir.state_file())
            .await
            .map_err(vmm_err)?;
        let out = dir.memory_file();
        let pid = vm.pid;
        let size = u64::from(record.memory_mb) << 20;
        match memory.clone() {
            GuestMemory::Shared(ram) => {
                blocking("copy the guest memory", move || {
                    memfile::sparse_copy(&ram, &out, false)
                        .map(drop)
                        .map_err(|e| (ram, e))
                })
                .await
            }
            GuestMemory::Private(base) => {
                blocking("capture the guest memory", move || {
                    memfile::capture_private(pid, &base, size, &out)
                        .map(drop)
                        .map_err(|e| (base, e))
                })
                .await
            }
        }
    }

    /// Freezes a running sandbox's exec processes for a snapshot, so that a
    /// clone runs no user code before its fix-ups (which thaw it): no
    /// random bytes from the copied entropy pool, no stale clock or name.
    /// False when no freeze was asked for or the agent cannot freeze (a
    /// paused VM, an agent without the request): the snapshot goes on
    /// without it. Any other outcome (even a failure or a timeout, after
    /// which the guest may still freeze) is true: the caller thaws. The
    /// freeze thaws by itself after [`FREEZE_LEASE`] should nobody thaw it.
    async fn freeze_execs(&self, record: &SandboxRecord) -> bool {
        if record.state != SandboxState::Running {
            return false;
        }
        let agent = match self.agent_for(record).await {
            Ok(agent) => agent,
            Err(error) => {
                tracing::info!(error = %error.chain(), "execs not frozen for the snapshot");
                return false;
            }
        };
        match tokio::time::timeout(FREEZE_CALL_TIMEOUT, agent.freeze(true, FREEZE_LEASE)).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) if cannot_freeze(&error) => false,
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::agent::error_chain(&error), "execs not frozen for the snapshot");
                true
            }
            Err(_) => {
                tracing::warn!("the guest did not freeze its execs in time; snapshotting anyway");
                true
            }
        }
    }

    /// Thaws what [`Manager::freeze_execs`] froze (in the sandbox, or in a
    /// clone of it after its fix-ups). Failures are logged: the lease thaws
    /// the guest anyway.
    async fn thaw_execs(&self, record: &SandboxRecord) {
        let agent = match self.agent_for(record).await {
            Ok(agent) => agent,
            Err(error) => {
                tracing::warn!(error = %error.chain(), "cannot thaw the execs");
                return;
            }
        };
        match agent.freeze(false, Duration::ZERO).await {
            Ok(()) => {}
            Err(error) if cannot_freeze(&error) => {}
            Err(error) => {
                tracing::warn!(error = %crate::agent::error_chain(&error), "cannot thaw the execs");
            }
        }
    }

    /// The RAM of sandbox `id`'s running VM: its link to a snapshot's memory
    /// if it was restored, else its tmpfs file if it was booted.
    fn running_memory(&self, id: &str) -> Option<GuestMemory> {
        let base = self.inner.layout.sandbox_dir(id).memory_base();
        if base.is_file() {
            return Some(GuestMemory::Private(base));
        }
        let ram = self.inner.layout.ram_file(id);
        ram.is_file().then_some(GuestMemory::Shared(ram))
    }

    /// Removes a snapshot's record (collecting the layers nobody needs),
    /// files and lock file. The caller holds the snapshot's lock.
    fn discard_snapshot(&self, snap: &SnapshotRecord) {
        match self.inner.store.delete_snapshot(&snap.id, &snap.dir) {
            Ok(dead) => self.remove_layers(&dead),
            Err(StoreError::MissingSnapshot { .. }) => {}
            Err(error) => {
                tracing::error!(id = %snap.id, error = %crate::agent::error_chain(&error), "cannot delete the snapshot record");
                return;
            }
        }
        let dir = self.inner.layout.snapshot_dir(&snap.dir);
        if let Err(error) = std::fs::remove_dir_all(dir.path()) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.path().display(), %error, "cannot remove the snapshot directory");
            }
        }
        remove_file_if_exists(&self.inner.layout.snapshot_lock(&snap.dir));
    }

    pub(super) fn snapshot_info(&self, snap: &SnapshotRecord) -> SnapshotInfo {
        let dir = self.inner.layout.snapshot_dir(&snap.dir);
        let size_bytes = [
            dir.memory_file(),
            dir.state_file(),
            self.inner.layout.layer_file(&snap.layer),
        ]
        .iter()
        .map(|path| memfile::disk_usage(path))
        .sum();
        SnapshotInfo {
            id: snap.id.clone(),
            sandbox: snap.sandbox.clone(),
            created_at: snap.created_at,
            vcpus: snap.vcpus,
            memory_mb: snap.memory_mb,
            image: snap.image.clone(),
            env: snap.env.clone(),
            accel: snap.accel,
            size_bytes,
            parent_snapshot: snap.parent_snapshot.clone(),
        }
    }

    /// The complete snapshot `id`.
    /// A ready snapshot users can see (golden ones are internal).
    pub(super) fn ready_snapshot(&self, id: &str) -> Result<SnapshotRecord, RuntimeError> {
        self.inner
            .store
            .get_snapshot(id)?
            .filter(|s| s.state == SnapshotState::Ready && s.golden_key.is_none())
            .ok_or_else(|| RuntimeError::SnapshotNotFound { id: id.to_string() })
    }

    /// The ready snapshots users see, or (`golden`) the golden ones.
    pub(super) fn ready_snapshots(
        &self,
        golden: bool,
    ) -> Result<Vec<SnapshotRecord>, RuntimeError> {
        let mut all = self.inner.store.list_snapshots()?;
        all.retain(|s| s.state == SnapshotState::Ready && s.golden_key.is_some() == golden);
        Ok(all)
    }

    pub(super) fn list_snapshots_inner(&self) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        let snaps = self.ready_snapshots(false)?;
        Ok(snaps.iter().map(|s| self.snapshot_info(s)).collect())
    }

    pub(super) fn get_snapshot_inner(&self, id: &str) -> Result<SnapshotInfo, RuntimeError> {
        Ok(self.snapshot_info(&self.ready_snapshot(id)?))
    }

    pub(super) async fn delete_snapshot_inner(&self, id: &str) -> Result<(), RuntimeError> {
        let snap = self
            .inner
            .store
            .get_snapshot(id)?
            .filter(|s| s.golden_key.is_none())
            .ok_or_else(|| RuntimeError::SnapshotNotFound { id: id.to_string() })?;
        self.delete_snapshot_record(snap).await
    }

    /// Deletes snapshot `snap` (as read just before) under its lock.
    pub(super) async fn delete_snapshot_record(
        &self,
        snap: SnapshotRecord,
    ) -> Result<(), RuntimeError> {
        let id = snap.id.as_str();
        let lock_path = self.inner.layout.snapshot_lock(&snap.dir);
        let _lock = SandboxLock::acquire(&lock_path, self.lock_timeout())
            .await
            .map_err(|e| snapshot_lock_error(id, e))?;
        let Some(snap) = self
            .inner
            .store
            .get_snapshot(id)?
            .filter(|s| s.dir == snap.dir)
        else {
            // Deleted while we waited: our open re-created its lock file.
            remove_file_if_exists(&lock_path);
            return Err(RuntimeError::SnapshotNotFound { id: id.to_string() });
        };
        if snap.state == SnapshotState::Creating {
            // Its taker died (we hold its lock): repair, then it is gone.
            if !self.abandon_snapshot(&snap).await? {
                return Err(RuntimeError::SnapshotBusy { id: id.to_string() });
            }
            return Ok(());
        }
        self.discard_snapshot(&snap);
        tracing::info!("snapshot deleted");
        Ok(())
    }

    pub(super) async fn restore_inner(
        &self,
        snapshot_id: &str,
        new_name: &str,
        netns: Option<&Path>,
    ) -> Result<SandboxInfo, RuntimeError> {
        spec::validate_name(new_name).map_err(|message| RuntimeError::InvalidArgument {
            field: "name",
            message,
        })?;
        let (snap_lock, snap) = self.open_snapshot(snapshot_id).await?;
        let record = SandboxRecord {
            name: new_name.to_string(),
            id: new_id()?,
            vcpus: snap.vcpus,
            memory_mb: snap.memory_mb,
            image: snap.image.clone(),
            image_path: snap.image_path.clone(),
            state: SandboxState::Creating,
            pid: None,
            accel: snap.accel,
            created_at: now_secs(),
            boot_count: 0,
            env: snap.env.clone(),
            disk_layer: Some(new_id()?),
            from_snapshot: Some(snap.id.clone()),
            network: None,
        };
        let plan = match (snap.network.as_ref(), netns) {
            (Some(net), None) => Some(NetPlan::from_snapshot(net)),
            (Some(_), Some(path)) => Some(NetPlan::attached(path)?),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(RuntimeError::SnapshotIncompatible {
                    id: snap.id.clone(),
                    reason: "it has no NIC to attach to a network namespace".to_string(),
                })
            }
        };
        self.install_restored(record, &snap, snap_lock, plan).await
    }

    /// Records `record`, a new sandbox on snapshot `snap` (whose shared lock
    /// is `snap_lock`), gives it the network of `plan` (which must be
    /// `Some` exactly when the snapshot had a NIC), and boots it from the
    /// snapshot. On failure nothing of it is left.
    pub(super) async fn install_restored(
        &self,
        record: SandboxRecord,
        snap: &SnapshotRecord,
        snap_lock: SandboxLock,
        plan: Option<NetPlan>,
    ) -> Result<SandboxInfo, RuntimeError> {
        let new_name = record.name.as_str();
        let config = &self.inner.config;
        let lock_path = self.inner.layout.lock_file(&record.id);
        let lock = SandboxLock::try_acquire(&lock_path)
            .map_err(|e| lock_error(new_name, e))?
            .ok_or_else(|| RuntimeError::Busy {
                name: new_name.to_string(),
            })?;
        let layer = NewLayer {
            id: record.disk_layer.clone().unwrap_or_default(),
            parent: Some(snap.layer.clone()),
        };
        let max = config.max_sandboxes;
        if let Err(error) = self
            .inner
            .store
            .insert_restored(&record, &layer, &snap.id, max)
        {
            remove_file_if_exists(&lock_path);
            return Err(insert_error(error));
        }
        tracing::info!(id = %record.id, snapshot = %snap.id, "restoring sandbox");
        let mut record = record;
        let result = async {
            if let Some(plan) = plan {
                self.attach_network(&mut record, plan).await?;
            }
            self.boot_restored(&mut record, snap, snap_lock).await
        }
        .await;
        match result {
            Ok(()) => {
                drop(lock);
                Ok(self.info(&record))
            }
            Err(error) => {
                tracing::warn!(error = %error.chain(), "restore failed; cleaning up");
                if let Err(cleanup) = self.teardown(&record).await {
                    tracing::error!(error = %cleanup.chain(), "cleanup after a failed restore failed");
                }
                drop(lock);
                Err(error)
            }
        }
    }

    /// Checks that snapshot `snapshot_id` can be restored here and takes its
    /// shared lock (a delete waits until the files are read); returns the
    /// lock and the snapshot as of then.
    pub(super) async fn open_snapshot(
        &self,
        snapshot_id: &str,
    ) -> Result<(SandboxLock, SnapshotRecord), RuntimeError> {
        let snap = self.ready_snapshot(snapshot_id)?;
        self.lock_snapshot(snap).await
    }

    /// [`Manager::open_snapshot`] of a snapshot record just read.
    pub(super) async fn lock_snapshot(
        &self,
        snap: SnapshotRecord,
    ) -> Result<(SandboxLock, SnapshotRecord), RuntimeError> {
        let snapshot_id = snap.id.clone();
        let snapshot_id = snapshot_id.as_str();
        let accel = self.inner.accel.kind();
        if snap.accel != accel {
            return Err(RuntimeError::SnapshotIncompatible {
                id: snap.id,
                reason: format!(
                    "it was taken under {}, and VMs here run under {}",
                    snap.accel.as_str(),
                    accel.as_str()
                ),
            });
        }
        let config = &self.inner.config;
        if snap.vcpus > config.max_vcpus || snap.memory_mb > config.max_memory_mb {
            return Err(RuntimeError::SnapshotIncompatible {
                id: snap.id,
                reason: format!(
                    "it has {} vCPUs and {} MiB; this runtime allows at most {} and {} MiB",
                    snap.vcpus, snap.memory_mb, config.max_vcpus, config.max_memory_mb
                ),
            });
        }
        require_file("guest kernel", &config.kernel)?;
        require_file("guest initramfs", &config.initramfs)?;
        // Keep a delete from removing the files while they are read.
        let snap_lock_path = self.inner.layout.snapshot_lock(&snap.dir);
        let snap_lock = SandboxLock::acquire_shared(&snap_lock_path, self.lock_timeout())
            .await
            .map_err(|e| snapshot_lock_error(snapshot_id, e))?;
        let current = self
            .inner
            .store
            .get_snapshot(snapshot_id)?
            .filter(|s| s.state == SnapshotState::Ready && s.dir == snap.dir);
        let Some(snap) = current else {
            remove_file_if_exists(&snap_lock_path);
            return Err(RuntimeError::SnapshotNotFound {
                id: snapshot_id.to_string(),
            });
        };
        Ok((snap_lock, snap))
    }

    /// Disk layer, RAM, incoming QEMU, state, `cont`, agent, fix-ups. On
    /// failure the caller tears the sandbox down.
    pub(super) async fn boot_restored(
        &self,
        record: &mut SandboxRecord,
        snap: &SnapshotRecord,
        snap_lock: SandboxLock,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let layout = &self.inner.layout;
        let vmm_err = |source| RuntimeError::Vmm {
            name: record.name.clone(),
            source,
        };
        create_private_dir(layout.sandbox_dir(&record.id).path())?;
        let backing = layout.layer_file(&snap.layer);
        let disk = self.disk_path(record);
        let overlay = async {
            create_overlay(
                &self.inner.config.qemu_img_binary,
                Backing::Qcow2(&backing),
                &disk,
            )
            .await
            .map_err(vmm_err)
        };
        let snap_dir = layout.snapshot_dir(&snap.dir);
        let memory = snap_dir.memory_file();
        let base = layout.sandbox_dir(&record.id).memory_base();
        let link = {
            let base = base.clone();
            blocking("link the snapshot's memory", move || {
                memfile::link_or_copy(&memory, &base).map_err(|e| (memory, e))
            })
        };
        tokio::try_join!(overlay, link)?;
        let copied = started.elapsed();
        check_same_nic(record, snap)?;
        self.prepare_host_network(record).await?;
        let mut spec = self.vm_spec(record)?;
        spec.memory = GuestMemory::Private(base);
        spec.incoming = Some(snap.state_format);
        let vmm = self.inner.vmm.clone();
        let vm = vmm.launch(&spec).await.map_err(vmm_err)?;
        let launched = started.elapsed();
        self.inner
            .store
            .record_boot(&record.name, &record.id, record.state, vm.pid)?;
        record.pid = Some(vm.pid);
        record.boot_count += 1;
        vmm.load_state(&vm, &snap_dir.state_file(), snap.state_format)
            .await
            .map_err(vmm_err)?;
        drop(snap_lock);
        let loaded = started.elapsed();
        vmm.resume(&vm).await.map_err(vmm_err)?;
        let resumed = started.elapsed();
        let agent = AgentClient::wait_ready(
            &vm.dir.agent_socket(),
            self.inner.config.boot_timeout(),
            || vmm.is_alive(&vm),
        )
        .await
        .map_err(|reason| RuntimeError::Restore {
            name: record.name.clone(),
            snapshot: snap.id.clone(),
            reason,
            console_tail: qemu::last_lines(&vm.dir.console_log(), CONSOLE_TAIL_LINES),
        })?;
        let answered = started.elapsed();
        self.fix_up_clone(record, &agent).await?;
        *self.agent_slot(&record.id).lock().await = Some(agent);
        // Its processes were frozen at the snapshot: they run again only now.
        self.thaw_execs(record).await;
        let running = self.check(record, Operation::Booted)?;
        self.inner
            .store
            .set_state(&record.name, &record.id, running, record.pid)?;
        record.state = running;
        tracing::info!(
            pid = vm.pid,
            prepared_ms = copied.as_millis() as u64,
            launched_ms = launched.as_millis() as u64,
            loaded_ms = loaded.as_millis() as u64,
            resumed_ms = resumed.as_millis() as u64,
            agent_ms = answered.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "sandbox restored"
        );
        Ok(())
    }

    /// What makes a clone its own machine: the wall clock of now (the
    /// guest's stopped at the snapshot), its own hostname, entropy its
    /// siblings do not share, and a fresh `/etc/machine-id` (32 hex digits,
    /// the systemd format) so that tools keyed on it tell clones apart, and
    /// its own address and MAC (the NIC's device state is its parent's).
    async fn fix_up_clone(
        &self,
        record: &SandboxRecord,
        agent: &AgentClient,
    ) -> Result<(), RuntimeError> {
        let agent_err = |source| RuntimeError::Agent {
            name: record.name.clone(),
            source,
        };
        let configure = ConfigureRequest {
            hostname: Some(spec::hostname_for(&record.name)),
            network: self.guest_network(record),
            entropy: Some(random_bytes(CLONE_ENTROPY)?),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let machine_id: String = random_bytes(MACHINE_ID_BYTES)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let machine_id = format!("{machine_id}\n").into_bytes();
        let write_machine_id = async {
            let options = WriteOptions {
                mode: Some(0o444),
                ..WriteOptions::default()
            };
            agent
                .write_file(MACHINE_ID_PATH, &mut machine_id.as_slice(), options)
                .await
                .map(drop)
        };
        // All at once: the session multiplexes.
        tokio::try_join!(
            agent.set_time(now),
            agent.configure(configure),
            write_machine_id
        )
        .map(drop)
        .map_err(agent_err)
    }

    /// Finishes snapshots whose taker died (their lock is free): see the
    /// module documentation. Runs at [`Manager::open`], before the
    /// sandboxes are reconciled, so a VM left paused is resumed first.
    pub(super) async fn recover_snapshots(&self) -> Result<(), RuntimeError> {
        for snap in self.inner.store.list_snapshots()? {
            if snap.state != SnapshotState::Creating {
                continue;
            }
            let lock_path = self.inner.layout.snapshot_lock(&snap.dir);
            let Some(_lock) = SandboxLock::try_acquire(&lock_path)
                .map_err(|e| snapshot_lock_error(&snap.id, e))?
            else {
                continue;
            };
            let current = self
                .inner
                .store
                .get_snapshot(&snap.id)?
                .filter(|s| s.dir == snap.dir && s.state == SnapshotState::Creating);
            if let Some(snap) = current {
                tracing::info!(id = %snap.id, sandbox = %snap.sandbox, "finishing an interrupted snapshot");
                self.abandon_snapshot(&snap).await?;
            }
        }
        Ok(())
    }

    /// Records where the sandbox's disk really is, puts its VM back in its
    /// recorded run state, and discards the unfinished snapshot. The caller
    /// holds the snapshot's lock. False if the sandbox is busy (try later).
    async fn abandon_snapshot(&self, snap: &SnapshotRecord) -> Result<bool, RuntimeError> {
        let sandbox = self
            .inner
            .store
            .get(&snap.sandbox)?
            .filter(|r| r.id == snap.sandbox_id);
        if let Some(record) = sandbox {
            let lock_path = self.inner.layout.lock_file(&record.id);
            let Some(_lock) =
                SandboxLock::try_acquire(&lock_path).map_err(|e| lock_error(&record.name, e))?
            else {
                return Ok(false);
            };
            let Some(record) = self
                .inner
                .store
                .get(&record.name)?
                .filter(|r| r.id == record.id)
            else {
                return Ok(false);
            };
            let vm = self
                .handle(&record)
                .filter(|vm| self.inner.vmm.is_alive(vm));
            if let Some(next) = &snap.next_layer {
                let next_file = self.inner.layout.layer_file(next);
                let switched = match &vm {
                    Some(vm) => self
                        .inner
                        .vmm
                        .active_disk(vm)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|active| active == next_file),
                    None => is_qcow2(&next_file),
                };
                if switched {
                    self.inner.store.switch_disk(&snap.id)?;
                }
            }
            if let Some(vm) = vm {
                self.settle(&record, &vm).await;
            }
        }
        self.discard_snapshot(snap);
        Ok(true)
    }

    /// Resumes a VM an interrupted snapshot left stopped, as its record says.
    async fn settle(&self, record: &SandboxRecord, vm: &VmHandle) {
        let vmm = &self.inner.vmm;
        let status = match vmm.status(vm).await {
            Ok(status) => status,
            Err(error) => {
                tracing::warn!(error = %crate::agent::error_chain(&error), "cannot query the VM's run state");
                return;
            }
        };
        let postmigrate = status == VmStatus::Other("postmigrate".to_string());
        let result = match record.state {
            SandboxState::Running if status != VmStatus::Running => vmm.resume(vm).await,
            SandboxState::Paused if postmigrate => match vmm.resume(vm).await {
                Ok(()) => vmm.pause(vm).await,
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(error = %crate::agent::error_chain(&error), "cannot resume the VM");
        }
    }
}

/// An agent from before freezing existed (clones of its snapshots were
/// never frozen), or a guest without exec cgroups.
fn cannot_freeze(error: &crate::agent::AgentError) -> bool {
    matches!(
        error,
        crate::agent::AgentError::Remote { body, .. }
            if matches!(
                body.code,
                arrakis_protocol::ErrorCode::Unsupported | arrakis_protocol::ErrorCode::InvalidArgument
            )
    )
}

/// True when `path` starts with the qcow2 magic (a complete image header
/// is written at once by `qemu-img`/QEMU).
/// A restore recreates exactly the devices that were saved: the sandbox
/// must have a NIC of the snapshot's backend, or none if the snapshot had
/// none. Bridge and netns mode are both a tap (the guest is given its new
/// address, route and MAC after every restore); slirp offers the device
/// other features than a tap, so QEMU refuses a state saved with the other.
fn check_same_nic(record: &SandboxRecord, snap: &SnapshotRecord) -> Result<(), RuntimeError> {
    let ours = record.network.as_ref().map(|n| n.mode);
    let theirs = snap.network.as_ref().map(|n| n.mode);
    if ours.map(NetMode::backend) == theirs.map(NetMode::backend) {
        return Ok(());
    }
    let describe = |mode: Option<NetMode>| match mode {
        Some(mode) => format!("a {mode}-mode NIC"),
        None => "no NIC".to_string(),
    };
    Err(RuntimeError::SnapshotIncompatible {
        id: snap.id.clone(),
        reason: format!(
            "it has {}, and sandbox {:?} has {}",
            describe(theirs),
            record.name,
            describe(ours)
        ),
    })
}

fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

fn snapshot_lock_error(id: &str, error: LockError) -> RuntimeError {
    match error {
        LockError::Timeout { .. } => RuntimeError::SnapshotBusy { id: id.to_string() },
        LockError::Io { path, source } => RuntimeError::Io {
            op: "lock",
            path,
            source,
        },
    }
}

/// Runs blocking file work off the async threads; an error names the path.
async fn blocking<F>(op: &'static str, work: F) -> Result<(), RuntimeError>
where
    F: FnOnce() -> Result<(), (PathBuf, std::io::Error)> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((path, source))) => Err(RuntimeError::Io { op, path, source }),
        Err(join) => Err(RuntimeError::Io {
            op,
            path: PathBuf::new(),
            source: std::io::Error::other(join.to_string()),
        }),
    }
}
