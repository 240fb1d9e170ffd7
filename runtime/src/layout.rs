//! The on-disk layout of the state directory. Every path the runtime touches
//! under `state_dir` is named here and nowhere else.
//!
//! ```text
//! <state_dir>/arrakis.db                 SQLite: one record per sandbox
//! <state_dir>/sandboxes/<id>.lock        flock held during lifecycle operations
//! <state_dir>/sandboxes/<id>/            0700, one per sandbox, named by its id
//!     overlay.qcow2                      the sandbox's disk over the base image
//!     agent.sock  qmp.sock               QEMU's unix sockets
//!     qemu.pid                           written by QEMU (-pidfile)
//!     console.log                        the guest serial console
//!     qemu.log                           QEMU's own stderr at launch
//! ```
//!
//! Directories are named by the sandbox id, not its name, so names are free
//! to carry characters a file system or a socket path would not like.

use std::path::{Path, PathBuf};

/// Length of a sandbox id in hex digits.
pub const ID_HEX_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

impl StateLayout {
    /// `sun_path` holds 108 bytes including the terminating NUL.
    pub const MAX_SOCKET_PATH: usize = 107;

    pub fn new(root: &Path) -> Self {
        StateLayout {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
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

    pub fn overlay(&self) -> PathBuf {
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

    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }
}

/// True for strings shaped like a sandbox id (lowercase hex of the right length).
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
    }

    #[test]
    fn recognises_ids() {
        assert!(is_sandbox_id("0123456789abcdef"));
        assert!(!is_sandbox_id("0123456789ABCDEF"));
        assert!(!is_sandbox_id("0123456789abcde"));
        assert!(!is_sandbox_id("0123456789abcdef.lock"));
    }
}
