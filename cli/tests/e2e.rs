//! End to end: the shipped `arrakis` binary, driven as a user would, against
//! real QEMU microVMs. Every CLI call is a new manager process, so these also
//! prove that sandboxes outlive the process that created them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Longest any single CLI call may take in these tests.
const CALL_LIMIT: Duration = Duration::from_secs(120);

use sha2::{Digest, Sha256};

/// A private state directory; destroys every sandbox in it when dropped,
/// even if the test failed half way.
struct Env {
    state: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        require_artifacts();
        Env {
            state: tempfile::Builder::new()
                .prefix("arrakis-e2e")
                .tempdir()
                .unwrap(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrakis"));
        cmd.arg("--state-dir").arg(self.state.path()).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let child = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_limited(child, args)
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "arrakis {args:?} failed: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn qemu_pids(&self) -> Vec<i32> {
        let dir = self.state.path().join("sandboxes");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|pid| pid.trim().parse().ok())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let listing = self.run(&["list", "--json"]);
        if let Ok(list) = serde_json::from_slice::<Vec<serde_json::Value>>(&listing.stdout) {
            for sandbox in list {
                if let Some(name) = sandbox["name"].as_str() {
                    let _ = self.run(&["destroy", name]);
                }
            }
        }
        for pid in self.qemu_pids() {
            // SAFETY: kill(2) with a pid read from our own state dir; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Waits for a CLI call, but never longer than `CALL_LIMIT`: a hang fails
/// the test instead of stalling the suite.
fn wait_limited(child: Child, args: &[&str]) -> Output {
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

fn artifacts_home() -> PathBuf {
    std::env::var_os("ARRAKIS_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache/arrakis"))
}

fn require_artifacts() {
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

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[test]
fn run_rm_boots_our_kernel_and_debian_then_cleans_up() {
    let env = Env::new();
    let out = env.ok(&[
        "run",
        "--rm",
        "--name",
        "once",
        "--",
        "sh",
        "-c",
        "uname -a; cat /etc/os-release",
    ]);
    assert!(out.contains("Linux"), "{out}");
    assert!(out.contains("bookworm"), "{out}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert!(list.is_empty(), "{list:?}");
    assert!(env.qemu_pids().is_empty());
}

#[test]
fn a_sandbox_outlives_the_cli_process_and_keeps_its_files() {
    let env = Env::new();
    env.ok(&["create", "keep"]);

    // Exit codes and stream separation through the CLI.
    let out = env.run(&[
        "exec",
        "keep",
        "--shell",
        "--",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // stdin piped through with -i.
    let mut child = env
        .cmd(&["exec", "keep", "-i", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&input).unwrap();
    }
    let out = wait_limited(child, &["exec", "keep", "-i", "--", "sha256sum"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&input)));

    // Upload in one process, read back in others.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("blob.bin");
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &blob).unwrap();
    env.ok(&["cp", local.to_str().unwrap(), "keep:/root/in/blob.bin"]);
    let remote_sum = env.ok(&["exec", "keep", "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(remote_sum.starts_with(&sha256(&blob)), "{remote_sum}");
    let back = dir.path().join("back.bin");
    env.ok(&["cp", "keep:in/blob.bin", back.to_str().unwrap()]);
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&blob));

    // Timeouts are reported with coreutils' exit code.
    let out = env.run(&["exec", "keep", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));

    // Stop keeps the disk; start boots it again.
    env.ok(&["stop", "keep"]);
    let got: serde_json::Value = serde_json::from_str(&env.ok(&["get", "keep", "--json"])).unwrap();
    assert_eq!(got["state"], "stopped");
    env.ok(&["start", "keep"]);
    let remote_sum = env.ok(&["exec", "keep", "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(remote_sum.starts_with(&sha256(&blob)), "{remote_sum}");

    env.ok(&["destroy", "keep"]);
    assert!(env.qemu_pids().is_empty());
    let out = env.run(&["exec", "keep", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep"));
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["create", "bad/name"], "name"),
        (vec!["create", "big", "--memory", "99999999"], "memory"),
        (vec!["create", "cpus", "--vcpus", "0"], "vcpus"),
        (
            vec!["create", "img", "--image", "no-such-image"],
            "no-such-image",
        ),
        (vec!["exec", "ghost", "--", "true"], "ghost"),
    ] {
        let out = env.run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(env.qemu_pids().is_empty());
    let list: Vec<serde_json::Value> = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert!(list.is_empty(), "{list:?}");
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(CALL_LIMIT)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn serve_runs_the_api_on_loopback_only() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let refused = env.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));

    let mut server = env
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the server whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let server = Kill(server);
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .rsplit("http://")
        .next()
        .expect("the server prints its address")
        .to_string();

    let (status, body) = http(&address, "GET", "/v1/health", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("healthy"), "{body}");
    let (status, body) = http(&address, "POST", "/v1/vms", r#"{"vmName":"via api"}"#);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("RUNNING"), "{body}");
    let (status, body) = http(
        &address,
        "POST",
        "/v1/vms/via%20api/cmd",
        r#"{"cmd":"echo $((6*7))"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("42"), "{body}");
    let (status, body) = http(&address, "GET", "/v1/vms/nope", "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = http(&address, "DELETE", "/v1/vms/via%20api", "");
    assert_eq!(status, 200, "{body}");
    drop(server);
    assert!(env.qemu_pids().is_empty());
}
