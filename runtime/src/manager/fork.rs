//! Fork (many restores of one snapshot at once) and rollback (a sandbox
//! restored in place from a snapshot).
//!
//! # Fork
//! [`Manager::fork`] makes `count` sandboxes `<prefix>-1` .. `<prefix>-N`
//! from one snapshot. Everything that can be checked up front is, before
//! any VM starts: the count (1 to [`MAX_FORKS`]), every name (valid and
//! free) and the quota (the existing sandboxes plus `count` must fit). The
//! restores then run concurrently, at most [`FORK_CONCURRENCY`] at once
//! (each is a QEMU launch, a RAM copy and a wait for the agent; more at
//! once only make them compete for the host's cores). It is
//! all-or-nothing: on the first failure no further restore starts, and the
//! forks already made are destroyed. Each restore still checks the quota in
//! its own insert, so a concurrent create elsewhere cannot make it
//! overshoot; it can only make the fork fail (and clean up).
//!
//! Forking a running or paused sandbox takes a snapshot of it first, with
//! a generated id `fork-<random hex>`, and deletes that snapshot once the
//! forks are made (or have failed): the forks keep the frozen disk layer
//! they stand on (layers live by reachability), and the snapshot's memory
//! file is not needed after the restores copied it. The forks'
//! `from_snapshot` names that deleted snapshot. To keep the snapshot (to
//! fork again later, or roll back to it), snapshot first and fork from it.
//!
//! # Rollback
//! [`Manager::rollback`] replaces the memory, devices and disk of a
//! sandbox with a snapshot's, keeping its name, id and environment. Any
//! snapshot whose vCPUs, memory and image match the sandbox's is accepted
//! (not only the sandbox's own). Under the sandbox's lock: kill its VM (its
//! state is being thrown away, so no polite shutdown), record in one
//! transaction a new top layer on the snapshot's frozen layer (the old
//! layers nobody else stands on are collected and their files removed),
//! then boot it like a restore. If that boot fails the sandbox is
//! `stopped`, on the snapshot's disk: a start cold-boots it.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::lifecycle::new_id;
use super::{insert_error, span, Manager, SandboxInfo};
use crate::error::RuntimeError;
use crate::sandbox::Operation;
use crate::spec;
use crate::store::NewLayer;

/// Most sandboxes one fork makes.
pub const MAX_FORKS: u32 = 64;

/// Restores a fork runs at once.
const FORK_CONCURRENCY: usize = 4;

/// What a fork starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkSource {
    /// A snapshot, by id.
    Snapshot(String),
    /// A running or paused sandbox, by name: it is snapshotted first (see
    /// the module documentation of `fork`).
    Sandbox(String),
}

impl Manager {
    pub(super) async fn fork_inner(
        &self,
        source: ForkSource,
        count: u32,
        name_prefix: &str,
    ) -> Result<Vec<SandboxInfo>, RuntimeError> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(RuntimeError::InvalidArgument {
                field: "count",
                message: format!("must be 1 to {MAX_FORKS}, not {count}"),
            });
        }
        let names: Vec<String> = (1..=count).map(|i| format!("{name_prefix}-{i}")).collect();
        for name in &names {
            spec::validate_name(name).map_err(|message| RuntimeError::InvalidArgument {
                field: "name_prefix",
                message: format!("{message} (in fork name {name:?})"),
            })?;
        }
        for name in &names {
            if self.inner.store.get(name)?.is_some() {
                return Err(RuntimeError::AlreadyExists { name: name.clone() });
            }
        }
        let max = self.inner.config.max_sandboxes;
        if max > 0 {
            let existing = self.inner.store.list()?.len() as u64;
            if existing + u64::from(count) > u64::from(max) {
                return Err(RuntimeError::QuotaExceeded { max });
            }
        }
        let (snapshot_id, ephemeral) = match source {
            ForkSource::Snapshot(id) => {
                self.ready_snapshot(&id)?;
                (id, false)
            }
            ForkSource::Sandbox(name) => {
                let id = format!("fork-{}", new_id()?);
                let snap = self
                    .snapshot_inner(&name, Some(id))
                    .instrument(span(&name))
                    .await?;
                (snap.id, true)
            }
        };
        let started = std::time::Instant::now();
        let result = self.restore_all(&snapshot_id, &names).await;
        if ephemeral {
            if let Err(error) = self.delete_snapshot_inner(&snapshot_id).await {
                tracing::warn!(id = %snapshot_id, error = %error.chain(), "cannot delete the fork's snapshot");
            }
        }
        if result.is_ok() {
            tracing::info!(snapshot = %snapshot_id, count, total_ms = started.elapsed().as_millis() as u64, "forked");
        }
        result
    }

    /// Restores `snapshot_id` as every one of `names`, a few at once; all
    /// or nothing.
    async fn restore_all(
        &self,
        snapshot_id: &str,
        names: &[String],
    ) -> Result<Vec<SandboxInfo>, RuntimeError> {
        let permits = Arc::new(Semaphore::new(FORK_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for (index, name) in names.iter().enumerate() {
            let manager = self.clone();
            let permits = permits.clone();
            let snapshot_id = snapshot_id.to_string();
            let name = name.clone();
            tasks.spawn(async move {
                // Closed after a failure: the rest do not start.
                let Ok(_permit) = permits.clone().acquire_owned().await else {
                    return (index, None);
                };
                let result = manager
                    .restore_inner(&snapshot_id, &name, None)
                    .instrument(span(&name))
                    .await;
                if result.is_err() {
                    // Before our permit goes back: no waiting restore starts.
                    permits.close();
                }
                (index, Some(result))
            });
        }
        let mut made: Vec<Option<SandboxInfo>> = vec![None; names.len()];
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, Some(Ok(info)))) => made[index] = Some(info),
                Ok((_, None)) => {}
                Ok((_, Some(Err(error)))) => {
                    permits.close();
                    failure.get_or_insert(error);
                }
                Err(join) => {
                    permits.close();
                    failure.get_or_insert(RuntimeError::Io {
                        op: "run a fork's restore",
                        path: std::path::PathBuf::new(),
                        source: std::io::Error::other(join.to_string()),
                    });
                }
            }
        }
        let Some(error) = failure else {
            return Ok(made.into_iter().flatten().collect());
        };
        tracing::warn!(error = %error.chain(), "fork failed; destroying the forks made");
        for info in made.into_iter().flatten() {
            if let Err(cleanup) = self.destroy_inner(&info.name).await {
                tracing::error!(name = %info.name, error = %cleanup.chain(), "cannot destroy a fork");
            }
        }
        Err(error)
    }

    pub(super) async fn rollback_inner(
        &self,
        name: &str,
        snapshot_id: &str,
    ) -> Result<SandboxInfo, RuntimeError> {
        let (_lock, mut record) = self.lock(name).await?;
        let starting = self.check(&record, Operation::Rollback)?;
        let (snap_lock, snap) = self.open_snapshot(snapshot_id).await?;
        if (snap.vcpus, snap.memory_mb, snap.image.as_str())
            != (record.vcpus, record.memory_mb, record.image.as_str())
        {
            return Err(RuntimeError::InvalidArgument {
                field: "snapshot_id",
                message: format!(
                    "snapshot {:?} has {} vCPUs, {} MiB and image {:?}; sandbox {name:?} has {} \
                     vCPUs, {} MiB and image {:?}: a rollback needs the same",
                    snap.id,
                    snap.vcpus,
                    snap.memory_mb,
                    snap.image,
                    record.vcpus,
                    record.memory_mb,
                    record.image
                ),
            });
        }
        tracing::info!(snapshot = %snap.id, "rolling back");
        if let Some(vm) = self.handle(&record) {
            if self.inner.vmm.is_alive(&vm) {
                self.kill_vm(&record, &vm).await?;
            }
        }
        self.forget_agent(&record.id);
        self.release_ram(&record.id);
        let layer = NewLayer {
            id: new_id()?,
            parent: Some(snap.layer.clone()),
        };
        let dead = match self
            .inner
            .store
            .rollback_disk(name, &record.id, &layer, &snap.id, starting)
        {
            Ok(dead) => dead,
            Err(error) => {
                // The VM is gone; say so.
                if record.pid.is_some() {
                    let _ = self.mark_died(&mut record);
                }
                return Err(insert_error(error));
            }
        };
        self.remove_layers(&dead);
        record.disk_layer = Some(layer.id);
        record.from_snapshot = Some(snap.id.clone());
        record.state = starting;
        record.pid = None;
        if let Err(error) = self.boot_restored(&mut record, &snap, snap_lock).await {
            tracing::warn!(error = %error.chain(), "rollback boot failed; the sandbox is stopped");
            if let Some(vm) = self.handle(&record) {
                if self.inner.vmm.is_alive(&vm) {
                    let _ = self.kill_vm(&record, &vm).await;
                }
            }
            self.forget_agent(&record.id);
            self.release_ram(&record.id);
            let stopped = self.check(&record, Operation::BootFailed)?;
            self.inner
                .store
                .set_state(name, &record.id, stopped, None)?;
            return Err(error);
        }
        Ok(self.info(&record))
    }
}
