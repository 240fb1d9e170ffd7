//! Host processes: is a recorded QEMU pid still ours, signals, waiting for
//! exit. QEMU runs daemonized (not our child), so liveness comes from
//! `/proc`, and a pid counts as ours only while its command line mentions
//! the sandbox directory: this guards against pid reuse, and zombies (empty
//! command line) count as gone.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

/// True when `pid` is a live process whose command line mentions `dir`.
pub fn is_vm_process(pid: u32, dir: &Path) -> bool {
    if pid <= 1 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => cmdline_mentions(&raw, dir),
        Err(_) => false,
    }
}

/// True when one of the NUL-separated arguments in `raw` names a path inside `dir`.
fn cmdline_mentions(raw: &[u8], dir: &Path) -> bool {
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    raw.split(|b| *b == 0)
        .any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_slice()))
}

/// Sends `signal` to `pid` if it is still the VM process of `dir`.
/// Returns false when there was nothing to signal.
pub fn signal_vm(pid: u32, dir: &Path, signal: i32) -> bool {
    if !is_vm_process(pid, dir) {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // pid > 1 is checked by is_vm_process, so this never targets a process
    // group or every process.
    let rc = unsafe { libc::kill(pid, signal) };
    rc == 0
}

/// Waits until `pid` is no longer the VM process of `dir`; false on timeout.
pub async fn wait_gone(pid: u32, dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_vm_process(pid, dir) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then SIGKILL after `grace`; true once the process is gone.
pub async fn terminate(pid: u32, dir: &Path, grace: Duration) -> bool {
    if signal_vm(pid, dir, libc::SIGTERM) && wait_gone(pid, dir, grace).await {
        return true;
    }
    signal_vm(pid, dir, libc::SIGKILL);
    wait_gone(pid, dir, Duration::from_secs(10)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_paths_inside_the_dir() {
        let dir = Path::new("/s/sandboxes/abc");
        let raw = b"qemu\0-qmp\0unix:/s/sandboxes/abc/qmp.sock,server=on\0";
        assert!(cmdline_mentions(raw, dir));
        assert!(!cmdline_mentions(
            b"qemu\0/s/sandboxes/abcd/qmp.sock\0",
            dir
        ));
        assert!(!cmdline_mentions(b"", dir));
    }

    #[test]
    fn never_claims_init_or_strangers() {
        assert!(!is_vm_process(0, Path::new("/")));
        assert!(!is_vm_process(1, Path::new("/")));
        let me = std::process::id();
        assert!(!is_vm_process(me, Path::new("/nonexistent/dir")));
        assert!(!signal_vm(me, Path::new("/nonexistent/dir"), libc::SIGKILL));
    }

    #[tokio::test]
    async fn terminates_a_matching_process() {
        let dir = tempfile::tempdir().unwrap();
        // `sh -c CMD NAME` puts NAME ($0) on the command line: a path inside `dir`.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do sleep 0.1; done"])
            .arg(dir.path().join("marker"))
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until the child has exec'd, /proc shows the test binary's command line.
        let mut waited = 0;
        while !is_vm_process(pid, dir.path()) && waited < 200 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        if !is_vm_process(pid, dir.path()) {
            let _ = child.kill();
            panic!("the test process never showed its command line");
        }
        let reaper = std::thread::spawn(move || child.wait());
        assert!(terminate(pid, dir.path(), Duration::from_secs(2)).await);
        let status = reaper.join().unwrap().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
    }
}
