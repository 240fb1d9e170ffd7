//! Per-exec cgroups (v2) under `/sys/fs/cgroup/arrakis/exec-<n>`: they bound
//! a command's process count (a fork bomb stays inside) and let the agent
//! signal or kill the whole tree, daemons that called `setsid` included.
//! The agent itself stays in the root cgroup, and all execs together get a
//! low CPU weight against it, so a CPU-bound or forking command cannot make
//! the agent unresponsive (weights only matter under contention). Outside the
//! guest the manager is disabled and execs fall back to their process group.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Process limit of each exec's cgroup.
pub const EXEC_PIDS_MAX: u32 = 4096;
/// CPU weight of all execs together, against the agent's threads (default 100).
pub const EXECS_CPU_WEIGHT: u32 = 10;
/// Controllers enabled for exec cgroups (each one only when the kernel has it).
const CONTROLLERS: [&str; 3] = ["+cpu", "+pids", "+memory"];
const EXEC_PREFIX: &str = "exec-";
/// How long a freeze may take to stop every exec process.
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Creates and tracks exec cgroups.
#[derive(Debug, Default)]
pub struct Cgroups {
    /// `.../arrakis`, or `None` when cgroups are not used.
    base: Option<PathBuf>,
    next: AtomicU64,
    /// Names of the exec cgroups that still have an owner, never removed by cleanup.
    live: Arc<Mutex<HashSet<String>>>,
    /// The next exec's cgroup, created ahead by [`Cgroups::prepare_next`].
    spare: Mutex<Option<ExecCgroup>>,
}

impl Cgroups {
    /// No cgroups: execs rely on process groups.
    pub fn disabled() -> Cgroups {
        Cgroups::default()
    }

    /// Prepares `<mount>/arrakis` (a mounted cgroup2 hierarchy at `mount`),
    /// enabling the pids and memory controllers; disabled on failure.
    pub fn setup(mount: &Path) -> Cgroups {
        match prepare_base(mount) {
            Ok(base) => Cgroups {
                base: Some(base),
                ..Cgroups::default()
            },
            Err(e) => {
                tracing::warn!(error = %e, mount = %mount.display(), "exec cgroups disabled");
                Cgroups::disabled()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.base.is_some()
    }

    /// A fresh cgroup for one exec (the one prepared ahead if there is one),
    /// or `None` when disabled or on failure (the exec then runs in the
    /// agent's cgroup, still in its own process group).
    pub fn create_exec(&self) -> Option<ExecCgroup> {
        if let Some(spare) = lock(&self.spare).take() {
            return Some(spare);
        }
        self.create_new()
    }

    /// Removes the cgroups of finished execs and creates the next exec's
    /// cgroup ahead, so neither is on an exec's critical path (mkdir and
    /// rmdir of a cgroup cost about a millisecond under TCG). Blocking.
    pub fn prepare_next(&self) {
        if self.base.is_none() || lock(&self.spare).is_some() {
            return;
        }
        let fresh = self.create_new();
        let mut spare = lock(&self.spare);
        if spare.is_none() {
            *spare = fresh;
        }
    }

    fn create_new(&self) -> Option<ExecCgroup> {
        let base = self.base.as_ref()?;
        self.remove_stale(base);
        let name = format!("{EXEC_PREFIX}{}", self.next.fetch_add(1, Ordering::Relaxed));
        let path = base.join(&name);
        if let Err(e) = std::fs::create_dir(&path) {
            tracing::warn!(error = %e, path = %path.display(), "cannot create an exec cgroup");
            return None;
        }
        if let Err(e) = std::fs::write(path.join("pids.max"), EXEC_PIDS_MAX.to_string()) {
            tracing::debug!(error = %e, "pids.max not set");
        }
        lock(&self.live).insert(name.clone());
        Some(ExecCgroup {
            path,
            name,
            live: Arc::clone(&self.live),
        })
    }

    /// Removes exec cgroups whose processes are all gone (rmdir fails with
    /// EBUSY on a populated one, which is then left alone).
    fn remove_stale(&self, base: &Path) {
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        let live = lock(&self.live).clone();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(EXEC_PREFIX) && !live.contains(name) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

impl Cgroups {
    /// Freezes (or thaws) the processes of every exec at once, through the
    /// parent of their cgroups (new execs are created frozen meanwhile). A
    /// freeze returns once the kernel reports them all stopped. Blocking.
    pub fn set_frozen(&self, frozen: bool) -> io::Result<()> {
        let base = self.base.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "exec cgroups are disabled")
        })?;
        std::fs::write(base.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        if !frozen {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + FREEZE_WAIT;
        loop {
            let events = std::fs::read_to_string(base.join("cgroup.events"))?;
            if events.lines().any(|line| line.trim() == "frozen 1") {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                // Half frozen helps nobody: thaw before reporting.
                let _ = std::fs::write(base.join("cgroup.freeze"), "0");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the exec processes did not stop within {FREEZE_WAIT:?}"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn prepare_base(mount: &Path) -> io::Result<PathBuf> {
    if !mount.join("cgroup.controllers").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 hierarchy mounted there",
        ));
    }
    enable_controllers(mount);
    let base = mount.join("arrakis");
    match std::fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    enable_controllers(&base);
    if let Err(e) = std::fs::write(base.join("cpu.weight"), EXECS_CPU_WEIGHT.to_string()) {
        tracing::debug!(error = %e, "cpu.weight of the exec cgroups not set");
    }
    Ok(base)
}

fn enable_controllers(cgroup: &Path) {
    let available = std::fs::read_to_string(cgroup.join("cgroup.controllers")).unwrap_or_default();
    for controller in CONTROLLERS {
        if available.split_whitespace().any(|c| c == &controller[1..]) {
            if let Err(e) = std::fs::write(cgroup.join("cgroup.subtree_control"), controller) {
                tracing::debug!(error = %e, controller, "cannot enable controller");
            }
        }
    }
}

/// The cgroup of one exec. Dropping it only releases the name: background
/// processes keep running and the directory is removed lazily, by the next
/// clean-up that finds it empty.
#[derive(Debug)]
pub struct ExecCgroup {
    path: PathBuf,
    name: String,
    live: Arc<Mutex<HashSet<String>>>,
}

impl ExecCgroup {
    /// `cgroup.procs`, opened for the child to write "0" into (joining the
    /// cgroup between fork and exec).
    pub fn procs_for_join(&self) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path.join("cgroup.procs"))
    }

    /// Kills every process in the cgroup (`cgroup.kill`, Linux 5.14+).
    pub fn kill_all(&self) -> io::Result<()> {
        std::fs::write(self.path.join("cgroup.kill"), "1")
    }

    /// The pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezing_needs_cgroups() {
        let error = Cgroups::disabled().set_frozen(true).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn disabled_creates_nothing() {
        let cgroups = Cgroups::disabled();
        assert!(!cgroups.enabled());
        assert!(cgroups.create_exec().is_none());
    }

    #[test]
    fn setup_without_cgroup2_degrades() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = Cgroups::setup(dir.path());
        assert!(!cgroups.enabled());
    }

    #[test]
    fn stale_groups_are_removed_but_live_ones_kept() {
        // A plain directory stands in for the hierarchy: the logic under test
        // is the naming and the clean-up, not the kernel's files.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "pids memory").unwrap();
        let cgroups = Cgroups::setup(dir.path());
        assert!(cgroups.enabled());
        let base = dir.path().join("arrakis");
        std::fs::create_dir(base.join("exec-stale")).unwrap();
        let first = cgroups.create_exec().unwrap();
        assert!(
            !base.join("exec-stale").exists(),
            "an empty exec group is removed"
        );
        // Emptied like a cgroup whose processes are gone, but still owned.
        std::fs::remove_file(first.path.join("pids.max")).unwrap();
        let second = cgroups.create_exec().unwrap();
        assert!(first.path.exists(), "a live group survives the clean-up");
        assert_ne!(first.path, second.path);
        drop(first);
        cgroups.prepare_next();
        assert!(!base.join("exec-0").exists(), "removed once released");
        assert!(second.path.exists());
        let third = cgroups.create_exec().unwrap();
        assert!(third.path.exists(), "the prepared group is handed out");
        assert_ne!(third.path, second.path);
    }
}
