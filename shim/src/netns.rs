//! Persistent network namespaces at a path, made the way `ip netns add`
//! makes them (an empty file with the namespace bind-mounted on it), so the
//! namespace outlives every process in it and others (CNI via nerdctl's
//! hooks, QEMU) can join it by path.
//!
//! The namespace is made in a short-lived thread of its own: `unshare`
//! moves only the calling thread, and the shim's runtime threads must stay
//! in the host's namespace.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::ShimError;

/// The thread's own namespace, as the bind mount's source.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Creates a new network namespace bound at `path` (which must not exist),
/// with `lo` up. On failure nothing is left behind.
pub fn create(path: &Path) -> Result<(), ShimError> {
    // 0444 as iproute2 makes them: the file is only a mount point.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|e| ShimError::io("creating the network namespace file", path, e))?;
    let target = path.to_path_buf();
    let made = std::thread::Builder::new()
        .name("netns-create".to_owned())
        .spawn(move || make_and_bind(&target))
        .map_err(|e| ShimError::io("starting a thread to create the network namespace", path, e))
        .and_then(|thread| {
            thread.join().unwrap_or_else(|_| {
                Err(ShimError::Internal(format!(
                    "the thread creating network namespace {} panicked",
                    path.display()
                )))
            })
        });
    if made.is_err() {
        if let Err(error) = remove(path) {
            tracing::warn!(path = %path.display(), error = %error, "cannot clean up a half-made network namespace");
        }
    }
    made
}

/// Runs in the throwaway thread: moves it into a new namespace, pins that
/// namespace on `path` and brings `lo` up (the `ip` child, forked from this
/// thread, starts in its namespace).
fn make_and_bind(path: &Path) -> Result<(), ShimError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
        ShimError::io(
            "unsharing a new network namespace for",
            path,
            io::Error::from(e),
        )
    })?;
    mount(
        Some(THREAD_NETNS),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| ShimError::Mount {
        target: path.to_path_buf(),
        source,
    })?;
    let output = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| ShimError::io("running `ip link set lo up` in network namespace", path, e))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ShimError::io(
            "running `ip link set lo up` in network namespace",
            path,
            io::Error::other(format!("{}: {}", output.status, stderr.trim())),
        ));
    }
    Ok(())
}

/// Unpins the namespace at `path` and removes the file. The namespace dies
/// with its last process. Removing what is not there is no error.
pub fn remove(path: &Path) -> Result<(), ShimError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (never bound, or already unmounted).
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(source) => {
            return Err(ShimError::Mount {
                target: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ShimError::io(
            "removing the network namespace file",
            path,
            e,
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use serde::Deserialize;

    use super::*;

    /// Whether this process may make namespaces and mount (root with
    /// CAP_SYS_ADMIN, not in a locked-down container), and has the tools.
    fn supported() -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return false;
        }
        let unshared = std::thread::spawn(|| unshare(CloneFlags::CLONE_NEWNET).is_ok())
            .join()
            .unwrap_or(false);
        if !unshared {
            eprintln!("skipped: unshare(CLONE_NEWNET) is not permitted");
            return false;
        }
        let tools = ["ip", "nsenter"].iter().all(|tool| {
            Command::new(tool)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !tools {
            eprintln!("skipped: needs ip and nsenter");
        }
        tools
    }

    fn netns_inode(link: &str) -> PathBuf {
        std::fs::read_link(link).unwrap()
    }

    #[derive(Deserialize)]
    struct Link {
        ifname: String,
        flags: Vec<String>,
    }

    #[test]
    fn create_makes_an_isolated_namespace_with_lo_up() {
        if !supported() {
            return;
        }
        let process = netns_inode("/proc/self/ns/net");
        let thread = netns_inode("/proc/thread-self/ns/net");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        create(&path).unwrap();

        assert_eq!(netns_inode("/proc/self/ns/net"), process);
        assert_eq!(netns_inode("/proc/thread-self/ns/net"), thread);
        let output = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["ip", "-j", "link", "show"])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{output:?}");
        let links: Vec<Link> = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(links.len(), 1, "{listing}");
        assert_eq!(links[0].ifname, "lo");
        assert!(links[0].flags.iter().any(|f| f == "UP"), "{listing}");
        // The file holds a namespace other than ours.
        let output = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["readlink", "/proc/self/ns/net"])
            .output()
            .unwrap();
        let inside = String::from_utf8_lossy(&output.stdout);
        assert!(inside.starts_with("net:["), "{output:?}");
        assert_ne!(Path::new(inside.trim()), process);

        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_path_and_leaves_it_alone() {
        if !supported() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        std::fs::write(&path, "mine").unwrap();
        let err = create(&path).unwrap_err().to_string();
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
    }

    #[test]
    fn a_create_that_cannot_make_the_file_names_the_step() {
        if !supported() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("ns");
        let err = create(&missing).unwrap_err().to_string();
        assert!(err.contains("creating the network namespace file"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn remove_is_idempotent() {
        if !supported() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        std::fs::write(&path, "").unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
    }
}
