//! The lifecycle operations, each a sequence of named steps: create
//! (validate -> reserve -> provision disk -> boot), start, stop,
//! pause/resume, destroy (teardown).

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrakis_protocol::ConfigureRequest;

use super::images;
use super::network::NetPlan;
use super::{
    create_private_dir, insert_error, lock_error, now_secs, remove_file_if_exists, Manager,
    SandboxInfo,
};
use crate::agent::AgentClient;
use crate::error::RuntimeError;
use crate::layout::ID_HEX_LEN;
use crate::lock::SandboxLock;
use crate::process;
use crate::sandbox::{Operation, SandboxState};
use crate::spec::{self, SandboxSpec};
use crate::store::{NewLayer, SandboxRecord};
use crate::vmm::qemu::{self, create_overlay, Backing};
use crate::vmm::{GuestMemory, VmHandle, VmSpec, VmStatus};

/// Console lines quoted in a boot error.
const CONSOLE_TAIL_LINES: usize = 40;

/// The plan of a sandbox whose NIC joins namespace `path`.
fn attached_plan(spec: &SandboxSpec, path: &Path) -> Result<NetPlan, RuntimeError> {
    let invalid = |field, message: String| RuntimeError::InvalidArgument { field, message };
    let plan = NetPlan::attached(path)?;
    if spec.egress.is_some() {
        let message = "not with a network namespace: its owner decides".to_string();
        return Err(invalid("egress", message));
    }
    if !spec.forwards.is_empty() {
        let message = "not with a network namespace: publish ports through its owner".to_string();
        return Err(invalid("forwards", message));
    }
    Ok(plan)
}

/// The hostname a golden snapshot's guest boots with.
const GOLDEN_HOSTNAME: &str = "sandbox";

const SETUP_HINT: &str = "run scripts/setup, or point the runtime config at it";

impl Manager {
    /// Creates a sandbox; `base` (image builds) replaces the spec's image with a disk.
    pub(super) async fn create_inner(
        &self,
        spec: SandboxSpec,
        base: Option<images::ResolvedImage>,
    ) -> Result<SandboxInfo, RuntimeError> {
        let (record, plan) = self.validate_new(&spec, base)?;
        let golden_key = match spec.cold_boot {
            true => None,
            false => self.golden_key(&record, plan.mode).await,
        };
        if let Some(key) = &golden_key {
            if let Some(info) = self.warm_create(&record, key, &plan).await? {
                return Ok(info);
            }
        }
        let lock_path = self.inner.layout.lock_file(&record.id);
        let lock = SandboxLock::try_acquire(&lock_path)
            .map_err(|e| lock_error(&record.name, e))?
            .ok_or_else(|| RuntimeError::Busy {
                name: record.name.clone(),
            })?;
        let layer = NewLayer {
            id: record.disk_layer.clone().unwrap_or_default(),
            parent: None,
        };
        let max = self.inner.config.max_sandboxes;
        if let Err(error) = self.inner.store.insert(&record, Some(&layer), max) {
            remove_file_if_exists(&lock_path);
            return Err(insert_error(error));
        }
        tracing::info!(id = %record.id, vcpus = record.vcpus, memory_mb = record.memory_mb, image = %record.image, "creating sandbox");
        let mut record = record;
        // A boot that becomes a golden snapshot uses a neutral hostname: the
        // sandboxes warm-started from it must not see this one's name.
        let golden_key =
            golden_key.filter(|key| matches!(self.inner.store.golden_snapshot(key), Ok(None)));
        let hostname = match golden_key {
            Some(_) => GOLDEN_HOSTNAME.to_string(),
            None => spec::hostname_for(&record.name),
        };
        let result = async {
            self.attach_network(&mut record, plan).await?;
            self.provision(&record).await?;
            self.boot_as(&mut record, hostname).await?;
            if let Some(key) = &golden_key {
                self.keep_golden(&record, key).await;
                self.name_host(&record).await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                drop(lock);
                let record = self.inner.store.get(&record.name)?.unwrap_or(record);
                Ok(self.info(&record))
            }
            Err(error) => {
                tracing::warn!(error = %crate::agent::error_chain(&error), "create failed; cleaning up");
                if let Err(cleanup) = self.teardown(&record).await {
                    tracing::error!(error = %cleanup.chain(), "cleanup after a failed create failed");
                }
                drop(lock);
                Err(error)
            }
        }
    }

    /// Checks the request and the host's artifacts; nothing is created.
    fn validate_new(
        &self,
        spec: &SandboxSpec,
        base: Option<images::ResolvedImage>,
    ) -> Result<(SandboxRecord, NetPlan), RuntimeError> {
        let config = &self.inner.config;
        let resolved = spec::resolve(spec, config).map_err(|e| RuntimeError::InvalidArgument {
            field: e.field,
            message: e.message,
        })?;
        require_file("guest kernel", &config.kernel)?;
        require_file("guest initramfs", &config.initramfs)?;
        let image = if let Some(base) = base {
            base
        } else if spec.image.is_none() {
            match std::fs::canonicalize(&resolved.image_path) {
                Ok(path) if path.is_file() => images::ResolvedImage {
                    name: resolved.image,
                    path,
                },
                _ => {
                    return Err(RuntimeError::MissingArtifact {
                        what: "default base image",
                        path: resolved.image_path,
                        hint: SETUP_HINT,
                    })
                }
            }
        } else {
            self.resolve_image(&resolved.image, &resolved.image_path)?
        };
        let plan = match &spec.netns {
            None => self.plan_for(resolved.egress, resolved.forwards)?,
            Some(path) => attached_plan(spec, path)?,
        };
        let record = SandboxRecord {
            name: resolved.name,
            id: new_id()?,
            vcpus: resolved.vcpus,
            memory_mb: resolved.memory_mb,
            image: image.name,
            image_path: image.path,
            state: SandboxState::Creating,
            pid: None,
            accel: self.inner.accel.kind(),
            created_at: now_secs(),
            boot_count: 0,
            env: resolved.env,
            disk_layer: Some(new_id()?),
            from_snapshot: None,
            network: None,
        };
        Ok((record, plan))
    }

    /// The sandbox directory and its disk: a root layer over the base image.
    async fn provision(&self, record: &SandboxRecord) -> Result<(), RuntimeError> {
        let dir = self.inner.layout.sandbox_dir(&record.id);
        create_private_dir(dir.path())?;
        create_overlay(
            &self.inner.config.qemu_img_binary,
            Backing::Raw(&record.image_path),
            &self.disk_path(record),
        )
        .await
        .map_err(|source| RuntimeError::Vmm {
            name: record.name.clone(),
            source,
        })
    }

    /// Gives the guest of `record` its own hostname (after a boot under
    /// another one).
    async fn name_host(&self, record: &SandboxRecord) -> Result<(), RuntimeError> {
        let agent = self.agent_for(record).await?;
        agent
            .configure(ConfigureRequest {
                hostname: Some(spec::hostname_for(&record.name)),
                network: None,
                entropy: None,
            })
            .await
            .map_err(|source| RuntimeError::Agent {
                name: record.name.clone(),
                source,
            })
    }

    pub(super) fn vm_spec(&self, record: &SandboxRecord) -> Result<VmSpec, RuntimeError> {
        let config = &self.inner.config;
        let dir = self.inner.layout.sandbox_dir(&record.id);
        Ok(VmSpec {
            hostname: spec::hostname_for(&record.name),
            disk: self.disk_path(record),
            memory: GuestMemory::Shared(self.inner.layout.ram_file(&record.id)),
            incoming: None,
            dir,
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            accel: self.inner.accel.clone(),
            extra_kernel_args: config.extra_kernel_args.clone(),
            network: self.vm_network(record)?,
        })
    }

    /// Launches QEMU for a `Creating` or `Starting` record and waits for the
    /// agent; on success the record is `Running`. On failure QEMU is killed
    /// and the record keeps its state (the caller decides what follows).
    async fn boot(&self, record: &mut SandboxRecord) -> Result<(), RuntimeError> {
        let hostname = spec::hostname_for(&record.name);
        self.boot_as(record, hostname).await
    }

    /// [`Manager::boot`] with the guest's hostname at boot.
    async fn boot_as(
        &self,
        record: &mut SandboxRecord,
        hostname: String,
    ) -> Result<(), RuntimeError> {
        let running = self.check(record, Operation::Booted)?;
        self.prepare_ram(&record.id)?;
        self.prepare_host_network(record).await?;
        let mut vm_spec = self.vm_spec(record)?;
        vm_spec.hostname = hostname;
        let vm = self
            .inner
            .vmm
            .launch(&vm_spec)
            .await
            .map_err(|source| RuntimeError::Vmm {
                name: record.name.clone(),
                source,
            })?;
        self.inner
            .store
            .record_boot(&record.name, &record.id, record.state, vm.pid)?;
        record.pid = Some(vm.pid);
        record.boot_count += 1;
        tracing::info!(pid = vm.pid, "VM launched; waiting for the agent");
        let vmm = self.inner.vmm.clone();
        let ready = AgentClient::wait_ready(
            &vm.dir.agent_socket(),
            self.inner.config.boot_timeout(),
            || vmm.is_alive(&vm),
        )
        .await;
        match ready {
            Ok(agent) => {
                *self.agent_slot(&record.id).lock().await = Some(agent);
                self.inner
                    .store
                    .set_state(&record.name, &record.id, running, record.pid)?;
                record.state = running;
                // Awaited outside the macro: its arguments are not `Send`.
                let version = self.agent_version(&record.id).await;
                tracing::info!(agent = %version, "sandbox running");
                Ok(())
            }
            Err(reason) => {
                let _ = self.inner.vmm.kill(&vm).await;
                self.release_ram(&record.id);
                Err(RuntimeError::Boot {
                    name: record.name.clone(),
                    reason,
                    console_tail: qemu::last_lines(&vm.dir.console_log(), CONSOLE_TAIL_LINES),
                })
            }
        }
    }

    pub(super) async fn agent_version(&self, id: &str) -> String {
        let slot = self.agent_slot(id);
        let guard = slot.lock().await;
        guard
            .as_ref()
            .map(|a| a.agent_version().to_string())
            .unwrap_or_default()
    }

    pub(super) async fn start_inner(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        let (_lock, mut record) = self.lock(name).await?;
        let starting = self.check(&record, Operation::Start)?;
        self.move_legacy_disk(&mut record)?;
        let disk = self.disk_path(&record);
        if !disk.is_file() {
            return Err(RuntimeError::Io {
                op: "find the disk of",
                path: disk,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        self.inner
            .store
            .set_state(name, &record.id, starting, None)?;
        record.state = starting;
        if let Err(error) = self.boot(&mut record).await {
            let stopped = self.check(&record, Operation::BootFailed)?;
            self.inner
                .store
                .set_state(name, &record.id, stopped, None)?;
            return Err(error);
        }
        Ok(self.info(&record))
    }

    /// A sandbox made before disk layers existed has its disk in its own
    /// directory; a stopped one moves it into `layers/` (a rename: the file
    /// is backed by the base image by absolute path, which stays valid), so
    /// it can be snapshotted once running again. The record is written
    /// first: a layer file without a row would be swept away, while a row
    /// without its file is finished here on the next start.
    fn move_legacy_disk(&self, record: &mut SandboxRecord) -> Result<(), RuntimeError> {
        let legacy = self.inner.layout.sandbox_dir(&record.id).legacy_overlay();
        if record.disk_layer.is_none() {
            if !legacy.is_file() {
                return Ok(());
            }
            let layer = new_id()?;
            self.inner
                .store
                .adopt_layer(&record.name, &record.id, &layer)?;
            record.disk_layer = Some(layer);
        }
        let target = self.disk_path(record);
        if !target.exists() && legacy.is_file() {
            tracing::info!(to = %target.display(), "moving the disk of an older sandbox into layers/");
            std::fs::rename(&legacy, &target).map_err(|source| RuntimeError::Io {
                op: "move",
                path: legacy,
                source,
            })?;
        }
        Ok(())
    }

    pub(super) async fn stop_inner(&self, name: &str) -> Result<SandboxInfo, RuntimeError> {
        let (_lock, mut record) = self.lock(name).await?;
        let stopping = self.check(&record, Operation::Stop)?;
        let was_paused = record.state == SandboxState::Paused;
        self.inner
            .store
            .set_state(name, &record.id, stopping, record.pid)?;
        record.state = stopping;
        if let Some(vm) = self.handle(&record) {
            self.power_off(&record, &vm, was_paused).await?;
        }
        self.forget_agent(&record.id);
        self.release_ram(&record.id);
        let stopped = self.check(&record, Operation::Halted)?;
        self.inner
            .store
            .set_state(name, &record.id, stopped, None)?;
        record.state = stopped;
        record.pid = None;
        tracing::info!("sandbox stopped");
        Ok(self.info(&record))
    }

    /// Asks the guest to power off, then QEMU to quit, then kills it.
    async fn power_off(
        &self,
        record: &SandboxRecord,
        vm: &VmHandle,
        paused: bool,
    ) -> Result<(), RuntimeError> {
        let vmm = &self.inner.vmm;
        let vmm_err = |source| RuntimeError::Vmm {
            name: record.name.clone(),
            source,
        };
        if paused {
            vmm.resume(vm).await.map_err(vmm_err)?;
        }
        let polite = async {
            let agent = self.agent_for(record).await?;
            agent
                .shutdown()
                .await
                .map_err(|source| RuntimeError::Agent {
                    name: record.name.clone(),
                    source,
                })
        };
        match tokio::time::timeout(self.inner.config.stop_timeout(), polite).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error.chain(), "agent shutdown failed"),
            Err(_) => tracing::warn!("agent shutdown did not answer"),
        }
        if process::wait_gone(vm.pid, vm.dir.path(), self.inner.config.stop_timeout()).await {
            return Ok(());
        }
        tracing::warn!("guest did not power off in time; quitting QEMU");
        if let Err(error) = vmm.quit(vm).await {
            tracing::warn!(error = %crate::agent::error_chain(&error), "QMP quit failed");
        }
        if process::wait_gone(vm.pid, vm.dir.path(), Duration::from_secs(5)).await {
            return Ok(());
        }
        vmm.kill(vm).await.map_err(vmm_err)
    }

    pub(super) async fn pause_or_resume(
        &self,
        name: &str,
        op: Operation,
    ) -> Result<SandboxInfo, RuntimeError> {
        let (_lock, mut record) = self.lock(name).await?;
        let next = self.check(&record, op)?;
        let vm = self
            .handle(&record)
            .ok_or_else(|| RuntimeError::InvalidState {
                name: name.to_string(),
                state: record.state,
                op,
            })?;
        let result = match op {
            Operation::Pause => self.inner.vmm.pause(&vm).await,
            _ => self.inner.vmm.resume(&vm).await,
        };
        if let Err(source) = result {
            if !self.inner.vmm.is_alive(&vm) {
                self.mark_died(&mut record)?;
            }
            return Err(RuntimeError::Vmm {
                name: name.to_string(),
                source,
            });
        }
        let want = if next == SandboxState::Paused {
            VmStatus::Paused
        } else {
            VmStatus::Running
        };
        let status = self
            .inner
            .vmm
            .status(&vm)
            .await
            .map_err(|source| RuntimeError::Vmm {
                name: name.to_string(),
                source,
            })?;
        if status != want {
            tracing::warn!(?status, ?want, "VMM reports an unexpected run state");
        }
        self.inner
            .store
            .set_state(name, &record.id, next, record.pid)?;
        record.state = next;
        Ok(self.info(&record))
    }

    /// Records that QEMU died under a running sandbox.
    pub(super) fn mark_died(&self, record: &mut SandboxRecord) -> Result<(), RuntimeError> {
        let crashed = self.check(record, Operation::Died)?;
        self.inner
            .store
            .set_state(&record.name, &record.id, crashed, None)?;
        record.state = crashed;
        record.pid = None;
        self.forget_agent(&record.id);
        self.release_ram(&record.id);
        tracing::warn!("QEMU exited unexpectedly; sandbox marked {crashed}");
        Ok(())
    }

    pub(super) async fn destroy_inner(&self, name: &str) -> Result<(), RuntimeError> {
        let (_lock, record) = self.lock(name).await?;
        let destroying = self.check(&record, Operation::Destroy)?;
        self.inner
            .store
            .set_state(name, &record.id, destroying, record.pid)?;
        self.teardown(&record).await?;
        tracing::info!("sandbox destroyed");
        Ok(())
    }

    /// Kills the VM of `record`; a failure names the sandbox.
    pub(super) async fn kill_vm(
        &self,
        record: &SandboxRecord,
        vm: &VmHandle,
    ) -> Result<(), RuntimeError> {
        self.inner
            .vmm
            .kill(vm)
            .await
            .map_err(|source| RuntimeError::Vmm {
                name: record.name.clone(),
                source,
            })
    }

    /// Kills QEMU if it runs, then removes the RAM file, the directory, the
    /// record (with the disk layers nothing else uses) and the lock file, in
    /// that order, so an interrupted teardown can be resumed. The caller
    /// holds the lock.
    pub(super) async fn teardown(&self, record: &SandboxRecord) -> Result<(), RuntimeError> {
        self.forget_agent(&record.id);
        let dir = self.inner.layout.sandbox_dir(&record.id);
        for pid in record.pid.into_iter().chain(pid_from_file(&dir.pid_file())) {
            let vm = VmHandle {
                pid,
                dir: dir.clone(),
            };
            if self.inner.vmm.is_alive(&vm) {
                self.kill_vm(record, &vm).await?;
            }
        }
        self.release_ram(&record.id);
        match std::fs::remove_dir_all(dir.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::Io {
                    op: "remove",
                    path: dir.path().to_path_buf(),
                    source,
                })
            }
        }
        let dead = self.inner.store.delete(&record.name, &record.id)?;
        self.remove_layers(&dead);
        self.release_host_network(record).await;
        remove_file_if_exists(&self.inner.layout.lock_file(&record.id));
        Ok(())
    }
}

pub(super) fn require_file(what: &'static str, path: &Path) -> Result<(), RuntimeError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(RuntimeError::MissingArtifact {
            what,
            path: path.to_path_buf(),
            hint: SETUP_HINT,
        })
    }
}

/// A pid QEMU wrote, if any (a launch may have died before we recorded it).
pub(super) fn pid_from_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A fresh random id (sandboxes, layers, snapshot directories).
pub(super) fn new_id() -> Result<String, RuntimeError> {
    let bytes = random_bytes(ID_HEX_LEN / 2)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `len` bytes from the kernel's CSPRNG.
pub(super) fn random_bytes(len: usize) -> Result<Vec<u8>, RuntimeError> {
    let path = PathBuf::from("/dev/urandom");
    let mut bytes = vec![0u8; len];
    std::io::Read::read_exact(
        &mut std::fs::File::open(&path).map_err(|source| RuntimeError::Io {
            op: "open",
            path: path.clone(),
            source,
        })?,
        &mut bytes,
    )
    .map_err(|source| RuntimeError::Io {
        op: "read",
        path,
        source,
    })?;
    Ok(bytes)
}
