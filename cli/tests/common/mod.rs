//! What the end-to-end tests share: bounded CLI calls, the artifacts
//! check, and clean-up of QEMU processes a failed test may leave.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Longest any single CLI call may take in these tests.
pub const CALL_LIMIT: Duration = Duration::from_secs(120);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_arrakis")
}

/// The CLI as the tests run it: user-mode networking (the tests run as
/// root, and a bridge, taps or nftables rules must never be made in the
/// host's own namespace) with no egress, unless a test says otherwise.
pub fn command() -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.env("ARRAKIS_NETWORK_MODE", "user")
        .env("ARRAKIS_NETWORK_EGRESS", "deny");
    cmd
}

/// Waits for a CLI call, but never longer than `CALL_LIMIT`: a hang fails
/// the test instead of stalling the suite.
pub fn wait_limited(child: Child, args: &[&str]) -> Output {
    let pid = child.id() as i32;
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(CALL_LIMIT).is_err() {
            // SAFETY: kill(2) of our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    assert!(
        out.status.code().is_some(),
        "arrakis {args:?} ran longer than {CALL_LIMIT:?} and was killed; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` with no stdin and captured output, bounded by `CALL_LIMIT`.
pub fn run_captured(mut cmd: std::process::Command, args: &[&str]) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_limited(child, args)
}

/// Insists that `out` succeeded; returns its stdout.
pub fn expect_ok(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "arrakis {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn artifacts_home() -> PathBuf {
    std::env::var_os("ARRAKIS_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache/arrakis"))
}

pub fn require_artifacts() {
    let home = artifacts_home();
    for artifact in [
        "artifacts/vmlinuz",
        "artifacts/initramfs.cpio",
        "images/default/rootfs.ext4",
    ] {
        assert!(
            home.join(artifact).exists(),
            "{} is missing: run `scripts/setup` (or `make test`) first",
            home.join(artifact).display()
        );
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The pids of the QEMU processes recorded under a state directory.
pub fn qemu_pids(state: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(state.join("sandboxes")) else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

pub fn kill_qemus(state: &Path) {
    for pid in qemu_pids(state) {
        // SAFETY: kill(2) with a pid read from our own state dir; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Bytes that are not UTF-8 and cover every byte value.
pub fn binary_blob(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}
