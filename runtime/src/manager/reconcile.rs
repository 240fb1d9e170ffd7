//! Bringing records in line with reality: at [`Manager::open`] for every
//! snapshot left unfinished and every sandbox, and on `get`/`list` for the
//! sandboxes whose QEMU may have died. At open it also removes files no
//! record owns: sandbox directories and lock files, RAM files of VMs that
//! are gone, disk layers nothing references and snapshot directories
//! without a snapshot.
//!
//! [`decide`] is the pure table (record state x what was observed ->
//! action); the rest gathers observations and applies the action while
//! holding the sandbox's lock. A record whose lock is held elsewhere is
//! being worked on by another task or process and is left alone.

use std::collections::HashSet;
use std::path::Path;

use super::lifecycle::pid_from_file;
use super::{remove_file_if_exists, Manager};
use crate::error::RuntimeError;
use crate::layout::{is_sandbox_id, SandboxDir};
use crate::lock::SandboxLock;
use crate::sandbox::{Operation, SandboxState};
use crate::store::SandboxRecord;
use crate::vmm::{VmHandle, VmStatus};

/// What was observed about a recorded sandbox's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Observed {
    /// No process (or the pid now belongs to something else).
    Gone,
    /// The process runs; the VMM's run state when it was asked.
    Alive(Option<VmStatus>),
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Keep,
    /// Record this state (keeping the pid only if a process is expected).
    Record(SandboxState),
    /// Kill the process, then record this state.
    KillThenRecord(SandboxState),
    /// Kill the process if any and remove the sandbox entirely.
    Remove,
}

/// The reconciliation table.
pub(crate) fn decide(state: SandboxState, observed: &Observed) -> Action {
    use SandboxState as S;
    let alive = matches!(observed, Observed::Alive(_));
    let vm_says = match observed {
        Observed::Alive(Some(VmStatus::Running)) => Some(S::Running),
        Observed::Alive(Some(VmStatus::Paused)) => Some(S::Paused),
        _ => None,
    };
    match state {
        // The creator died (its lock is free): finish the job it can't.
        S::Creating | S::Destroying => Action::Remove,
        S::Starting | S::Running | S::Paused if !alive => {
            Action::Record(state.on(Operation::Died).unwrap_or(S::Crashed))
        }
        // A starter that died after the launch: trust the VMM's word.
        S::Starting => Action::Record(vm_says.unwrap_or(S::Running)),
        S::Running | S::Paused => match vm_says {
            Some(actual) if actual != state => Action::Record(actual),
            _ => Action::Keep,
        },
        // A stopper that died: finish the stop.
        S::Stopping if alive => Action::KillThenRecord(S::Stopped),
        S::Stopping => Action::Record(S::Stopped),
        S::Stopped | S::Crashed => Action::Keep,
    }
}

impl Manager {
    /// Reconciles every record, then removes directories and lock files
    /// that belong to no record.
    pub(super) async fn reconcile_all(&self) -> Result<(), RuntimeError> {
        self.recover_snapshots().await?;
        for record in self.inner.store.list()? {
            self.reconcile_one(&record.name, true).await?;
        }
        self.remove_orphans().await?;
        self.remove_orphan_ram_files()?;
        self.remove_orphan_layers()?;
        self.remove_orphan_snapshots()
    }

    /// For `get`/`list`: reconciles `record` when its QEMU may have died or
    /// an operation on it was interrupted. `None` if it was removed.
    pub(super) async fn refresh(
        &self,
        record: SandboxRecord,
    ) -> Result<Option<SandboxRecord>, RuntimeError> {
        let dir = self.inner.layout.sandbox_dir(&record.id);
        let suspicious = match record.state {
            SandboxState::Running | SandboxState::Paused => !record
                .pid
                .is_some_and(|pid| self.inner.vmm.is_alive(&VmHandle { pid, dir })),
            SandboxState::Stopped | SandboxState::Crashed => false,
            _ => true,
        };
        if !suspicious {
            return Ok(Some(record));
        }
        match self.reconcile_one(&record.name, false).await? {
            Reconciled::Busy => Ok(Some(record)),
            Reconciled::Done(current) => Ok(current.map(|r| *r)),
        }
    }

    /// Reconciles one sandbox under its lock. `ask_vmm`: query the run
    /// state of live VMs (a QMP round trip each).
    async fn reconcile_one(&self, name: &str, ask_vmm: bool) -> Result<Reconciled, RuntimeError> {
        let Some(record) = self.inner.store.get(name)? else {
            return Ok(Reconciled::Done(None));
        };
        let lock_path = self.inner.layout.lock_file(&record.id);
        let Some(_lock) =
            SandboxLock::try_acquire(&lock_path).map_err(|e| super::lock_error(name, e))?
        else {
            return Ok(Reconciled::Busy);
        };
        let Some(mut record) = self.inner.store.get(name)?.filter(|r| r.id == record.id) else {
            return Ok(Reconciled::Done(None));
        };
        let observed = self.observe(&record, ask_vmm).await;
        let action = decide(record.state, &observed);
        if action != Action::Keep {
            tracing::info!(sandbox = %record.name, state = %record.state, ?observed, ?action, "reconciling");
        }
        match action {
            Action::Keep => {}
            Action::Record(state) | Action::KillThenRecord(state) => {
                if let (Action::KillThenRecord(_), Some(vm)) = (action, self.handle(&record)) {
                    self.kill_vm(&record, &vm).await?;
                }
                let pid = record.pid.filter(|_| state.expects_process());
                if pid.is_none() {
                    self.forget_agent(&record.id);
                    self.release_ram(&record.id);
                }
                self.inner
                    .store
                    .set_state(&record.name, &record.id, state, pid)?;
                record.state = state;
                record.pid = pid;
            }
            Action::Remove => {
                self.teardown(&record).await?;
                return Ok(Reconciled::Done(None));
            }
        }
        Ok(Reconciled::Done(Some(Box::new(record))))
    }

    async fn observe(&self, record: &SandboxRecord, ask_vmm: bool) -> Observed {
        let Some(vm) = self.handle(record) else {
            return Observed::Gone;
        };
        if !self.inner.vmm.is_alive(&vm) {
            return Observed::Gone;
        }
        if !ask_vmm {
            return Observed::Alive(None);
        }
        match self.inner.vmm.status(&vm).await {
            Ok(VmStatus::Exited) => Observed::Gone,
            Ok(status) => Observed::Alive(Some(status)),
            Err(error) => {
                tracing::warn!(sandbox = %record.name, error = %crate::agent::error_chain(&error), "cannot query the VM's run state");
                Observed::Alive(None)
            }
        }
    }

    /// Removes sandbox directories and lock files that no record owns (left
    /// by a process that died mid-create), killing any QEMU still in them.
    async fn remove_orphans(&self) -> Result<(), RuntimeError> {
        let sandboxes = self.inner.layout.sandboxes_dir();
        let Ok(entries) = std::fs::read_dir(&sandboxes) else {
            return Ok(());
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|name| {
                name.strip_suffix(".lock")
                    .map(str::to_string)
                    .unwrap_or(name)
            })
            .filter(|id| is_sandbox_id(id))
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            let lock_path = self.inner.layout.lock_file(&id);
            let Some(_lock) =
                SandboxLock::try_acquire(&lock_path).map_err(|e| super::lock_error(&id, e))?
            else {
                continue;
            };
            if self.inner.store.list()?.iter().any(|r| r.id == id) {
                continue;
            }
            tracing::info!(%id, "removing an orphaned sandbox directory");
            let dir = self.inner.layout.sandbox_dir(&id);
            self.kill_orphan(&dir).await;
            if let Err(error) = std::fs::remove_dir_all(dir.path()) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.path().display(), %error, "cannot remove orphaned directory");
                }
            }
            let _ = std::fs::remove_file(&lock_path);
        }
        Ok(())
    }

    /// Removes RAM files of sandboxes that have no VM: no record, or a
    /// record in a state without a process, checked under the sandbox's
    /// lock (a boot in progress holds it).
    fn remove_orphan_ram_files(&self) -> Result<(), RuntimeError> {
        for id in ids_in(self.inner.layout.ram_dir(), ".ram") {
            let record = self.inner.store.list()?.into_iter().find(|r| r.id == id);
            if record.as_ref().is_some_and(|r| r.state.expects_process()) {
                continue;
            }
            let lock_path = self.inner.layout.lock_file(&id);
            let Some(_lock) =
                SandboxLock::try_acquire(&lock_path).map_err(|e| super::lock_error(&id, e))?
            else {
                continue;
            };
            let record = self.inner.store.list()?.into_iter().find(|r| r.id == id);
            if record.as_ref().is_some_and(|r| r.state.expects_process()) {
                continue;
            }
            tracing::info!(%id, "removing a RAM file no running VM owns");
            self.release_ram(&id);
            if record.is_none() {
                remove_file_if_exists(&lock_path);
            }
        }
        Ok(())
    }

    /// Removes layer files without a row: rows are written before files
    /// and deleted before them, so such a file is garbage. The directory is
    /// listed before the rows are read, so a layer created meanwhile is
    /// never taken for one.
    fn remove_orphan_layers(&self) -> Result<(), RuntimeError> {
        let files = ids_in(&self.inner.layout.layers_dir(), ".qcow2");
        if files.is_empty() {
            return Ok(());
        }
        let rows = self.inner.store.layer_ids()?;
        for id in files.into_iter().filter(|id| !rows.contains(id)) {
            tracing::info!(layer = %id, "removing a disk layer no record owns");
            remove_file_if_exists(&self.inner.layout.layer_file(&id));
        }
        Ok(())
    }

    /// Removes snapshot directories without a record, and lock files
    /// without one that nobody holds (a taker locks before it records).
    fn remove_orphan_snapshots(&self) -> Result<(), RuntimeError> {
        let dirs = ids_in(&self.inner.layout.snapshots_dir(), "");
        let locks = ids_in(&self.inner.layout.snapshots_dir(), ".lock");
        if dirs.is_empty() && locks.is_empty() {
            return Ok(());
        }
        let known: HashSet<String> = self
            .inner
            .store
            .list_snapshots()?
            .into_iter()
            .map(|s| s.dir)
            .collect();
        for dir in dirs.into_iter().filter(|d| !known.contains(d)) {
            let path = self.inner.layout.snapshot_dir(&dir);
            tracing::info!(path = %path.path().display(), "removing a snapshot directory no record owns");
            if let Err(error) = std::fs::remove_dir_all(path.path()) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.path().display(), %error, "cannot remove directory");
                }
            }
        }
        for dir in locks.into_iter().filter(|d| !known.contains(d)) {
            let path = self.inner.layout.snapshot_lock(&dir);
            if let Ok(Some(_lock)) = SandboxLock::try_acquire(&path) {
                remove_file_if_exists(&path);
            }
        }
        Ok(())
    }

    async fn kill_orphan(&self, dir: &SandboxDir) {
        if let Some(pid) = pid_from_file(&dir.pid_file()) {
            let vm = VmHandle {
                pid,
                dir: dir.clone(),
            };
            if self.inner.vmm.is_alive(&vm) {
                if let Err(error) = self.inner.vmm.kill(&vm).await {
                    tracing::warn!(pid, error = %crate::agent::error_chain(&error), "cannot kill orphaned QEMU");
                }
            }
        }
    }
}

/// Ids named `<id><suffix>` in `dir` (ids: lowercase hex of the sandbox
/// id's length). An empty suffix lists directories.
fn ids_in(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| suffix.is_empty() == e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(suffix).map(str::to_string))
        .filter(|id| is_sandbox_id(id))
        .collect()
}

pub(super) enum Reconciled {
    /// Another holder has the lock.
    Busy,
    /// The record after reconciliation (`None`: removed).
    Done(Option<Box<SandboxRecord>>),
}

#[cfg(test)]
mod tests {
    use super::SandboxState as S;
    use super::*;

    #[test]
    fn decisions() {
        let gone = Observed::Gone;
        let alive = Observed::Alive(None);
        let running = Observed::Alive(Some(VmStatus::Running));
        let paused = Observed::Alive(Some(VmStatus::Paused));
        let panicked = Observed::Alive(Some(VmStatus::Other("guest-panicked".into())));
        let cases = [
            (S::Creating, &gone, Action::Remove),
            (S::Creating, &running, Action::Remove),
            (S::Destroying, &alive, Action::Remove),
            (S::Destroying, &gone, Action::Remove),
            (S::Starting, &gone, Action::Record(S::Crashed)),
            (S::Starting, &alive, Action::Record(S::Running)),
            (S::Starting, &paused, Action::Record(S::Paused)),
            (S::Running, &gone, Action::Record(S::Crashed)),
            (S::Running, &alive, Action::Keep),
            (S::Running, &running, Action::Keep),
            (S::Running, &paused, Action::Record(S::Paused)),
            (S::Running, &panicked, Action::Keep),
            (S::Paused, &gone, Action::Record(S::Crashed)),
            (S::Paused, &running, Action::Record(S::Running)),
            (S::Paused, &paused, Action::Keep),
            (S::Stopping, &alive, Action::KillThenRecord(S::Stopped)),
            (S::Stopping, &gone, Action::Record(S::Stopped)),
            (S::Stopped, &gone, Action::Keep),
            (S::Crashed, &gone, Action::Keep),
        ];
        for (state, observed, want) in cases {
            assert_eq!(decide(state, observed), want, "{state} with {observed:?}");
        }
    }
}
