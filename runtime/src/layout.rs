//! The on-disk layout of the state directory. Every path the runtime touches
//! under `state_dir` is named here and nowhere else.
//!
//! ```text
//! <state_dir>/arrakis.db                 SQLite: sandboxes, disk layers, snapshots
//! <state_dir>/sandboxes/<id>.lock        flock held during lifecycle operations
//! <state_dir>/sandboxes/<id>/            0700, one per sandbox, named by its id
//!     agent.sock  qmp.sock               QEMU's unix sockets
//!     qemu.pid                           written by QEMU (-pidfile)
//!     console.log                        the guest serial console
//!     qemu.log                           QEMU's own stderr at launch
//!     memory.base                        a restored VM's RAM: a hard link to the
//!                                        snapshot's memory.ram, mapped copy-on-write
//!     overlay.qcow2                      only in sandboxes made before layers existed
//! <state_dir>/layers/<layer>.qcow2       every disk image: a sandbox's writable top
//!                                        layer and the frozen layers under it
//! <state_dir>/snapshots/<dir>/           one per snapshot, named by an internal id
//!     state.bin                          QEMU device state (no RAM)
//!     memory.ram                         guest RAM, sparse; never written once ready
//! <state_dir>/snapshots/<dir>.lock       flock: exclusive to create or delete,
//!                                        shared while a restore reads the files
//! <ram_dir>/<id>.ram                     guest RAM of a running VM (tmpfs)
//! ```
//!
//! Directories are named by ids, never by user-chosen names, so names are
//! free to carry characters a file system or a socket path would not like.
//! Layer files never move: a qcow2 image records its backing file by
//! absolute path, and those paths must stay valid for as long as any layer
//! above them exists.

use std::path::{Path, PathBuf};

/// Length of a sandbox id in hex digits.
pub const ID_HEX_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
    ram_dir: PathBuf,
}

impl StateLayout {
    /// `sun_path` holds 108 bytes including the terminating NUL.
    pub const MAX_SOCKET_PATH: usize = 107;

    /// The layout of `root`, with the default RAM directory.
    pub fn new(root: &Path) -> Self {
        StateLayout {
            root: root.to_path_buf(),
            ram_dir: crate::config::default_ram_dir(root),
        }
    }

    /// The same layout with RAM files in `ram_dir`.
    pub fn with_ram_dir(mut self, ram_dir: &Path) -> Self {
        self.ram_dir = ram_dir.to_path_buf();
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ram_dir(&self) -> &Path {
        &self.ram_dir
    }

    /// The guest RAM file of sandbox `id` while its VM runs.
    pub fn ram_file(&self, id: &str) -> PathBuf {
        self.ram_dir.join(format!("{id}.ram"))
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// The qcow2 file of disk layer `layer`.
    pub fn layer_file(&self, layer: &str) -> PathBuf {
        self.layers_dir().join(format!("{layer}.qcow2"))
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The directory of the snapshot whose internal directory id is `dir`.
    pub fn snapshot_dir(&self, dir: &str) -> SnapshotDir {
        SnapshotDir {
            path: self.snapshots_dir().join(dir),
        }
    }

    pub fn snapshot_lock(&self, dir: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{dir}.lock"))
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("arrakis.db")
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    pub fn sandbox_dir(&self, id: &str) -> SandboxDir {
        SandboxDir {
            path: self.sandboxes_dir().join(id),
        }
    }

    pub fn lock_file(&self, id: &str) -> PathBuf {
        self.sandboxes_dir().join(format!("{id}.lock"))
    }

    /// The longest socket path any sandbox will use.
    pub fn longest_socket_path(&self) -> PathBuf {
        self.sandbox_dir(&"0".repeat(ID_HEX_LEN)).agent_socket()
    }
}

/// One sandbox's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    pub fn new(path: &Path) -> Self {
        SandboxDir {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk of a sandbox created before disk layers existed; moved into
    /// `layers/` on its next start.
    pub fn legacy_overlay(&self) -> PathBuf {
        self.path.join("overlay.qcow2")
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }

    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// The RAM a restored VM maps privately (a link to a snapshot's).
    pub fn memory_base(&self) -> PathBuf {
        self.path.join("memory.base")
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }
}

/// One snapshot's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's device state, without guest RAM.
    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.bin")
    }

    /// The guest RAM, sparse.
    pub fn memory_file(&self) -> PathBuf {
        self.path.join("memory.ram")
    }
}

/// True for strings shaped like a sandbox id (lowercase hex of the right
/// length). Layer ids and snapshot directory ids have the same shape.
pub fn is_sandbox_id(s: &str) -> bool {
    s.len() == ID_HEX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_hang_off_the_id() {
        let layout = StateLayout::new(Path::new("/s"));
        assert_eq!(layout.database(), Path::new("/s/arrakis.db"));
        let dir = layout.sandbox_dir("0123456789abcdef");
        assert_eq!(
            dir.agent_socket(),
            Path::new("/s/sandboxes/0123456789abcdef/agent.sock")
        );
        assert_eq!(
            layout.lock_file("0123456789abcdef"),
            Path::new("/s/sandboxes/0123456789abcdef.lock")
        );
        assert_eq!(
            layout.longest_socket_path(),
            Path::new("/s/sandboxes/0000000000000000/agent.sock")
        );
        assert_eq!(
            layout.layer_file("00000000000000aa"),
            Path::new("/s/layers/00000000000000aa.qcow2")
        );
        let snap = layout.snapshot_dir("00000000000000bb");
        assert_eq!(
            snap.memory_file(),
            Path::new("/s/snapshots/00000000000000bb/memory.ram")
        );
        assert_eq!(
            layout.snapshot_lock("00000000000000bb"),
            Path::new("/s/snapshots/00000000000000bb.lock")
        );
        let layout = layout.with_ram_dir(Path::new("/dev/shm/x"));
        assert_eq!(
            layout.ram_file("0123456789abcdef"),
            Path::new("/dev/shm/x/0123456789abcdef.ram")
        );
    }

    #[test]
    fn recognises_ids() {
        assert!(is_sandbox_id("0123456789abcdef"));
        assert!(!is_sandbox_id("0123456789ABCDEF"));
        assert!(!is_sandbox_id("0123456789abcde"));
        assert!(!is_sandbox_id("0123456789abcdef.lock"));
    }
}
