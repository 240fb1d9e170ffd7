//! What the shim must remember outside its own memory: enough for the
//! `delete` command (a separate process containerd runs after every
//! shutdown, and after a shim crash) to remove the VM, the mounts and the
//! root file system conversion. Written into the bundle before anything is
//! created, so a crash at any point leaves a record of what to undo.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ShimError;

const FILE: &str = "arrakis-shim.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// The arrakis sandbox running the container.
    pub sandbox: String,
    /// A conversion only this container uses, untagged on delete.
    #[serde(default)]
    pub private_image: Option<String>,
    /// The network namespace the shim made for the container (removed on
    /// delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_netns: Option<PathBuf>,
    /// The container's network namespace, as its hooks were told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The spec's `poststop` hooks are still to run.
    #[serde(default)]
    pub poststop: bool,
    /// The pid reported for a pod's sandbox container, a process holding
    /// the pod's network namespace (see `net::NetnsHolder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_pid: Option<u32>,
}

impl TaskState {
    pub fn path(bundle: &Path) -> PathBuf {
        bundle.join(FILE)
    }

    pub fn load(bundle: &Path) -> Result<Option<TaskState>, ShimError> {
        let path = Self::path(bundle);
        match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| ShimError::Internal(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShimError::io("reading", &path, e)),
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename).
    pub fn save(&self, bundle: &Path) -> Result<(), ShimError> {
        use std::io::Write;
        let path = Self::path(bundle);
        let tmp = bundle.join(format!(".{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec(self).expect("state serializes"))?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| ShimError::io("writing", &path, e))
    }

    pub fn remove(bundle: &Path) {
        let _ = std::fs::remove_file(Self::path(bundle));
    }
}

/// The sandbox name of container `id` in containerd namespace `namespace`:
/// `ctrd-<namespace>-<id>` when that fits a sandbox name (63 characters),
/// else `ctrd-<namespace prefix>-<hash of both>`; unique either way.
pub fn sandbox_name(namespace: &str, id: &str) -> String {
    let plain = format!("ctrd-{namespace}-{id}");
    if plain.chars().count() <= arrakis_runtime::spec::MAX_NAME_LEN {
        return plain;
    }
    let digest = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let hash: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let prefix: String = namespace.chars().take(20).collect();
    format!("ctrd-{prefix}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_readable_when_short_and_bounded_when_long() {
        assert_eq!(sandbox_name("default", "t1"), "ctrd-default-t1");
        let long = "c".repeat(76);
        let name = sandbox_name("k8s.io", &long);
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("ctrd-k8s.io-"));
        assert_ne!(name, sandbox_name("k8s.io", &"d".repeat(76)));
        assert_ne!(name, sandbox_name("other", &long));
    }

    #[test]
    fn state_round_trips_and_is_absent_before_save() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TaskState::load(dir.path()).unwrap(), None);
        let state = TaskState {
            sandbox: "ctrd-default-t1".into(),
            private_image: Some("arrakis.local/containerd-rootfs:x".into()),
            own_netns: Some(dir.path().join("netns")),
            netns: Some(dir.path().join("netns")),
            poststop: true,
            holder_pid: Some(42),
        };
        state.save(dir.path()).unwrap();
        assert_eq!(TaskState::load(dir.path()).unwrap(), Some(state));
        TaskState::remove(dir.path());
        assert_eq!(TaskState::load(dir.path()).unwrap(), None);
    }
}
