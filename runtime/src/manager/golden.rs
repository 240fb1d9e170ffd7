//! Warm starts from golden snapshots.
//!
//! The first time a sandbox of some image and shape (vCPUs, memory) boots
//! to a ready agent, the manager snapshots it at that instant, before any
//! user command: a *golden* snapshot. Later sandboxes of the same image and
//! shape are restored from it (copy-on-write, with the clone fix-ups:
//! hostname, machine-id, entropy, clock) instead of booting, so a create
//! costs a restore, not a boot.
//!
//! A golden snapshot is keyed by a digest of everything the guest was
//! booted from: the kernel, the initramfs (which holds the agent), the base
//! image, the QEMU binary, the accelerator and its arguments, the extra
//! kernel arguments and the shape. A change to any of them changes the key:
//! the next create boots cold and keeps a new golden snapshot, replacing
//! the old ones of that image and shape. A golden snapshot that fails to
//! restore is deleted and the create boots cold. File digests are cached
//! by the file's identity and modification time, so each file is read once.
//!
//! Golden snapshots are internal: they are not listed, fetched, restored
//! or deleted through the snapshot API, and carry no environment.
//! `warm_start = false` in the runtime config (or `cold_boot` on a create)
//! turns warm starts off.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::network::NetPlan;

use super::{Manager, SandboxInfo, SnapshotInfo};
use crate::error::RuntimeError;
use crate::store::{SandboxRecord, Store};

/// Changes whenever what a golden snapshot holds changes meaning.
const KEY_VERSION: &str = "arrakis-golden-2";

/// Digests of files by path, valid while the file's identity (device,
/// inode, size, mtime, ctime) is unchanged; kept in memory and in the
/// store, so a file is read once, not once per process.
#[derive(Default)]
pub(super) struct DigestCache {
    files: std::sync::Mutex<HashMap<PathBuf, (String, String)>>,
}

impl DigestCache {
    /// The SHA-256 of `path` (hex).
    fn digest(&self, store: &Store, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let stamp = format!(
            "{}:{}:{}:{}.{}:{}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        if let Some((cached, digest)) = self.lock().get(path) {
            if *cached == stamp {
                return Ok(digest.clone());
            }
        }
        let digest = match store.file_digest(path, &stamp).ok().flatten() {
            Some(digest) => digest,
            None => {
                let digest = sha256_of(path)?;
                if let Err(error) = store.record_file_digest(path, &stamp, &digest) {
                    tracing::warn!(error = %crate::agent::error_chain(&error), "cannot record a file digest");
                }
                digest
            }
        };
        self.lock()
            .insert(path.to_path_buf(), (stamp, digest.clone()));
        Ok(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (String, String)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `binary` as found on `PATH` if it has no slash (as `exec` would).
fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return Some(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

impl Manager {
    pub(super) fn golden_snapshots_inner(&self) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        let snaps = self.ready_snapshots(true)?;
        Ok(snaps.iter().map(|s| self.snapshot_info(s)).collect())
    }

    pub(super) async fn clear_golden_snapshots_inner(&self) -> Result<usize, RuntimeError> {
        self.clear_golden_snapshots_of(None).await
    }

    /// Deletes the golden snapshots booted from base disk `image` (all with `None`).
    pub(super) async fn clear_golden_snapshots_of(
        &self,
        image: Option<&Path>,
    ) -> Result<usize, RuntimeError> {
        let mut snaps = self.ready_snapshots(true)?;
        snaps.retain(|snap| image.is_none_or(|image| snap.image_path == image));
        let deleted = snaps.len();
        for snap in snaps {
            self.delete_snapshot_record(snap).await?;
        }
        Ok(deleted)
    }

    /// The golden key of a new sandbox, or `None` when warm starts are off
    /// or a file it depends on cannot be read (the create then boots cold,
    /// and reports a missing artifact itself).
    pub(super) async fn golden_key(
        &self,
        record: &SandboxRecord,
        mode: crate::network::NetMode,
    ) -> Option<String> {
        let config = &self.inner.config;
        if !config.warm_start {
            return None;
        }
        let qemu = resolve_binary(&config.qemu_binary)?;
        let files = [
            config.kernel.clone(),
            config.initramfs.clone(),
            record.image_path.clone(),
            qemu,
        ];
        let manager = self.clone();
        let digests = tokio::task::spawn_blocking(move || {
            files
                .iter()
                .map(|file| manager.inner.digests.digest(&manager.inner.store, file))
                .collect::<std::io::Result<Vec<String>>>()
        })
        .await
        .ok()?;
        let digests = match digests {
            Ok(digests) => digests,
            Err(error) => {
                tracing::warn!(%error, "cannot digest the boot files; booting cold");
                return None;
            }
        };
        let accel = &self.inner.accel;
        let mut hasher = Sha256::new();
        let mut field = |text: &str| {
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        };
        field(KEY_VERSION);
        for digest in &digests {
            field(digest);
        }
        field(record.accel.as_str());
        for arg in accel
            .qemu_args()
            .iter()
            .chain(&accel.kernel_args())
            .chain(&config.extra_kernel_args)
        {
            field(arg);
        }
        field(&record.vcpus.to_string());
        field(&record.memory_mb.to_string());
        field(mode.as_str());
        Some(hex(&hasher.finalize()))
    }

    /// Creates `record` by restoring the golden snapshot for `key`. `None`
    /// when there is none, or it could not be used (it is then deleted, and
    /// the caller boots cold); errors that are not the snapshot's fault
    /// (quota, name taken) are returned.
    pub(super) async fn warm_create(
        &self,
        record: &SandboxRecord,
        key: &str,
        plan: &NetPlan,
    ) -> Result<Option<SandboxInfo>, RuntimeError> {
        let Some(golden) = self.inner.store.golden_snapshot(key)? else {
            return Ok(None);
        };
        let (snap_lock, golden) = match self.lock_snapshot(golden).await {
            Ok(opened) => opened,
            Err(error) => {
                tracing::info!(error = %error.chain(), "golden snapshot unavailable; booting cold");
                return Ok(None);
            }
        };
        let mut record = record.clone();
        record.disk_layer = Some(super::lifecycle::new_id()?);
        let started = std::time::Instant::now();
        // The key covers the network mode: a golden snapshot has a NIC of
        // this mode (or, from before networking, none: then it is stale).
        let plan = match &golden.network {
            Some(net) if net.mode == plan.mode => plan.clone(),
            _ => {
                drop(snap_lock);
                tracing::info!(golden = %golden.id, "golden snapshot has another NIC; replacing it");
                if let Err(error) = self.delete_snapshot_record(golden).await {
                    tracing::warn!(error = %error.chain(), "cannot delete the golden snapshot");
                }
                return Ok(None);
            }
        };
        match self
            .install_restored(record, &golden, snap_lock, Some(plan))
            .await
        {
            Ok(info) => {
                tracing::info!(
                    golden = %golden.id,
                    total_ms = started.elapsed().as_millis() as u64,
                    "sandbox warm-started"
                );
                Ok(Some(info))
            }
            Err(error) if error.blames_snapshot() => {
                tracing::warn!(golden = %golden.id, error = %error.chain(), "golden snapshot does not restore; deleting it and booting cold");
                if let Err(error) = self.delete_snapshot_record(golden).await {
                    tracing::warn!(error = %error.chain(), "cannot delete the golden snapshot");
                }
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Keeps the state of `record`'s freshly booted VM as the golden
    /// snapshot for `key`, and deletes the golden snapshots of the same
    /// image and shape made under other keys. The caller holds the
    /// sandbox's lock. Failures are logged: the sandbox runs either way.
    pub(super) async fn keep_golden(&self, record: &SandboxRecord, key: &str) {
        let (Some(vm), Some(layer)) = (self.handle(record), record.disk_layer.clone()) else {
            return;
        };
        let id = format!("golden-{}", &key[..16.min(key.len())]);
        let started = std::time::Instant::now();
        match self
            .snapshot_locked(record, &vm, layer, id, Some(key.to_string()))
            .await
        {
            Ok(info) => tracing::info!(
                golden = %info.id,
                total_ms = started.elapsed().as_millis() as u64,
                "kept a golden snapshot for warm starts"
            ),
            Err(error) => {
                tracing::info!(error = %error.chain(), "no golden snapshot kept");
                return;
            }
        }
        let mut stale = self.ready_snapshots(true).unwrap_or_default();
        stale.retain(|s| {
            s.golden_key.as_deref() != Some(key)
                && (s.image_path.as_path(), s.vcpus, s.memory_mb)
                    == (record.image_path.as_path(), record.vcpus, record.memory_mb)
        });
        for snap in stale {
            let id = snap.id.clone();
            match self.delete_snapshot_record(snap).await {
                Ok(()) => tracing::info!(golden = %id, "deleted an outdated golden snapshot"),
                Err(error) => {
                    tracing::warn!(golden = %id, error = %error.chain(), "cannot delete an outdated golden snapshot")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_cached_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, b"one").unwrap();
        let cache = DigestCache::default();
        let first = cache.digest(&store, &path).unwrap();
        assert_eq!(
            first,
            "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
        );
        assert_eq!(cache.digest(&store, &path).unwrap(), first);
        // Another process finds it in the store.
        let stamps: i64 = store
            .conn_for_tests()
            .query_row("SELECT count(*) FROM file_digests", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stamps, 1);
        assert_eq!(DigestCache::default().digest(&store, &path).unwrap(), first);
        std::fs::write(&path, b"two").unwrap();
        assert_ne!(cache.digest(&store, &path).unwrap(), first);
        assert!(cache.digest(&store, &dir.path().join("absent")).is_err());
    }

    #[test]
    fn binaries_are_found_on_the_path() {
        assert_eq!(
            resolve_binary(Path::new("/usr/bin/env")),
            Some(PathBuf::from("/usr/bin/env"))
        );
        let sh = resolve_binary(Path::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(resolve_binary(Path::new("no-such-binary-here")), None);
    }
}
