//! Per-sandbox exclusive locks (`flock(2)` on `<state_dir>/sandboxes/<id>.lock`),
//! and per-snapshot locks, exclusive to take or delete a snapshot and shared
//! while a restore reads its files.
//!
//! Lifecycle operations hold the lock so two manager processes (the CLI is
//! one process per command) or two tasks of one process never start, stop or
//! destroy the same sandbox at once. `flock` locks belong to the open file
//! description, so separate opens conflict even inside one process, and the
//! kernel drops the lock when the holder dies. Files are opened close-on-exec,
//! so QEMU never inherits a lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {waited:?} waiting for the lock {path}: another operation holds it")]
    Timeout { path: PathBuf, waited: Duration },
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct SandboxLock {
    _file: File,
}

impl SandboxLock {
    /// Takes the lock if it is free; `None` when someone else holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<SandboxLock>, LockError> {
        Self::try_lock(path, libc::LOCK_EX)
    }

    fn try_lock(path: &Path, mode: i32) -> Result<Option<SandboxLock>, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock(2) on a descriptor we own and keep open for the call;
        // no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(SandboxLock { _file: file }));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io_err(error))
        }
    }

    /// Waits up to `timeout` for the lock.
    pub async fn acquire(path: &Path, timeout: Duration) -> Result<SandboxLock, LockError> {
        Self::wait(path, timeout, libc::LOCK_EX).await
    }

    /// Waits up to `timeout` for the lock in shared mode.
    pub async fn acquire_shared(path: &Path, timeout: Duration) -> Result<SandboxLock, LockError> {
        Self::wait(path, timeout, libc::LOCK_SH).await
    }

    async fn wait(path: &Path, timeout: Duration, mode: i32) -> Result<SandboxLock, LockError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(lock) = SandboxLock::try_lock(path, mode)? {
                return Ok(lock);
            }
            if start.elapsed() >= timeout {
                return Err(LockError::Timeout {
                    path: path.to_path_buf(),
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = SandboxLock::try_acquire(&path).unwrap().expect("free lock");
        assert!(SandboxLock::try_acquire(&path).unwrap().is_none());
        let err = SandboxLock::acquire(&path, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        let waiter = tokio::spawn({
            let path = path.clone();
            async move { SandboxLock::acquire(&path, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(held);
        waiter.await.unwrap().expect("lock after release");
    }

    #[tokio::test]
    async fn shared_holders_exclude_only_exclusive_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.lock");
        let short = Duration::from_millis(50);
        let one = SandboxLock::acquire_shared(&path, short).await.unwrap();
        let two = SandboxLock::acquire_shared(&path, short).await.unwrap();
        assert!(SandboxLock::try_acquire(&path).unwrap().is_none());
        drop(one);
        assert!(SandboxLock::try_acquire(&path).unwrap().is_none());
        drop(two);
        let exclusive = SandboxLock::acquire(&path, short).await.unwrap();
        let err = SandboxLock::acquire_shared(&path, short).await.unwrap_err();
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        drop(exclusive);
        SandboxLock::acquire_shared(&path, short).await.unwrap();
    }
}
