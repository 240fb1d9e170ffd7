//! Spawning and reaping. As PID 1 the agent inherits every orphan, so one
//! reaper collects every exit with `waitpid(-1)`; per-child waits (as in
//! `tokio::process` or `Child::wait`) would race with it and are never used.
//!
//! Children are spawned while holding the registry lock and registered under
//! it, and the reaper only calls `waitpid` while holding the same lock, so an
//! exit can never be reaped before its pid is registered. The reaper is one
//! OS thread that sleeps in `waitid(WNOWAIT)` until some child has exited
//! (no signal handler involved). Outside the guest (tests, a dev run) the
//! process makes itself a child subreaper so orphans behave the same.

use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// Exited normally with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// A child spawned through the [`Supervisor`]: its pid, what the spawn
/// function returned with it (its pipes), and its exit.
#[derive(Debug)]
pub struct SpawnedChild<T> {
    pub pid: u32,
    pub io: T,
    /// Resolves once the reaper collected the child's exit.
    pub exit: oneshot::Receiver<ProcessExit>,
}

#[derive(Debug, Default)]
struct Registry {
    waiters: HashMap<i32, oneshot::Sender<ProcessExit>>,
    /// Bumped at every spawn, so the reaper knows whether "no children" is stale.
    spawns: u64,
}

/// The process-wide spawn registry and reaper.
#[derive(Debug)]
pub struct Supervisor {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

/// The one supervisor of this process, started on first use.
pub fn global() -> &'static Supervisor {
    static GLOBAL: OnceLock<&'static Supervisor> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        if std::process::id() != 1 {
            // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
            let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            if rc != 0 {
                tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper");
            }
        }
        let supervisor: &'static Supervisor = Box::leak(Box::new(Supervisor {
            registry: Mutex::new(Registry::default()),
            spawned: Condvar::new(),
        }));
        let started = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || supervisor.reap_forever());
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the reaper thread; zombies will pile up");
        }
        supervisor
    })
}

impl Supervisor {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `start` (blocking: it spawns one child and returns its pid) and
    /// registers the child for its exit status. A child that `start` reports
    /// as failed must be reaped by `start` itself.
    pub fn spawn<T, E>(
        &self,
        start: impl FnOnce() -> Result<(u32, T), E>,
    ) -> Result<SpawnedChild<T>, E> {
        let mut registry = self.lock();
        let (pid, io) = start()?;
        let (tx, rx) = oneshot::channel();
        let key = i32::try_from(pid).unwrap_or(i32::MAX);
        registry.waiters.insert(key, tx);
        registry.spawns += 1;
        drop(registry);
        self.spawned.notify_all();
        Ok(SpawnedChild { pid, io, exit: rx })
    }

    fn reap_forever(&self) {
        loop {
            let spawns_before = self.lock().spawns;
            // Sleep until some child is a zombie, without reaping it yet.
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => self.reap_all(),
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    // No children: wait for the next spawn. Orphans can only
                    // come from descendants, which need a child to exist first.
                    let registry = self.lock();
                    if registry.spawns == spawns_before {
                        let _ = self.spawned.wait_timeout(registry, Duration::from_secs(1));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "waitid failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Collects every exited child and hands each status to its waiter.
    fn reap_all(&self) {
        let mut registry = self.lock();
        loop {
            let exit = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ProcessExit::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    (pid, ProcessExit::Signaled(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waitpid failed");
                    return;
                }
            };
            let (pid, status) = exit;
            match registry.waiters.remove(&pid.as_raw()) {
                // The receiver may be gone (the exec was abandoned): nothing to do.
                Some(waiter) => drop(waiter.send(status)),
                None => tracing::trace!(pid = pid.as_raw(), ?status, "reaped an orphan"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::{ChildStdout, Command, Stdio};

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null());
        cmd
    }

    fn spawn(cmd: &mut Command) -> io::Result<SpawnedChild<Option<ChildStdout>>> {
        global().spawn(|| {
            let mut child = cmd.spawn()?;
            Ok((child.id(), child.stdout.take()))
        })
    }

    #[tokio::test]
    async fn exit_code_is_delivered() {
        let child = spawn(&mut sh("exit 3")).unwrap();
        assert_eq!(child.exit.await.unwrap(), ProcessExit::Exited(3));
    }

    #[tokio::test]
    async fn signal_death_is_delivered() {
        let child = spawn(&mut sh("kill -9 $$")).unwrap();
        assert_eq!(child.exit.await.unwrap(), ProcessExit::Signaled(9));
    }

    #[tokio::test]
    async fn fast_exits_are_not_lost() {
        let mut children = Vec::new();
        for _ in 0..40 {
            children.push(spawn(&mut Command::new("true")).unwrap());
        }
        for child in children {
            let exit = tokio::time::timeout(Duration::from_secs(10), child.exit)
                .await
                .expect("exit delivered")
                .unwrap();
            assert_eq!(exit, ProcessExit::Exited(0));
        }
    }

    #[tokio::test]
    async fn orphans_are_reaped() {
        let mut cmd = sh("sleep 0.2 & echo $!");
        cmd.stdout(Stdio::piped());
        let mut child = spawn(&mut cmd).unwrap();
        let mut out = String::new();
        child.io.take().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(child.exit.await.unwrap(), ProcessExit::Exited(0));
        let orphan: i32 = out.trim().parse().unwrap();
        // The orphan is re-parented to this process and must not stay a zombie.
        let proc_dir = format!("/proc/{orphan}");
        for _ in 0..300 {
            if !std::path::Path::new(&proc_dir).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
        panic!("orphan {orphan} not reaped: {stat}");
    }

    #[test]
    fn spawn_failure_is_an_error() {
        let err = spawn(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
