//! End to end: the shipped `arrakis` binary, driven as a user would, against
//! real QEMU microVMs. Every CLI call is a new manager process, so these also
//! prove that sandboxes outlive the process that created them.

mod common;

use std::process::{Command, Output, Stdio};

use common::{binary_blob, require_artifacts, sha256, wait_limited, CALL_LIMIT};

/// A private state directory; destroys every sandbox in it when dropped,
/// even if the test failed half way.
struct Env {
    state: tempfile::TempDir,
    /// Environment of every call, clean-up included.
    vars: Vec<(&'static str, &'static str)>,
}

impl Env {
    fn new() -> Env {
        Env::with_vars(&[])
    }

    fn with_vars(vars: &[(&'static str, &'static str)]) -> Env {
        require_artifacts();
        Env {
            state: tempfile::Builder::new()
                .prefix("arrakis-e2e")
                .tempdir()
                .unwrap(),
            vars: vars.to_vec(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = common::command();
        cmd.arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .env_remove("ARRAKIS_SERVER")
            .envs(self.vars.iter().copied());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run_captured(self.cmd(args), args)
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        common::expect_ok(self.run(args), args)
    }

    fn qemu_pids(&self) -> Vec<i32> {
        common::qemu_pids(self.state.path())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let listing = self.run(&["list", "--json"]);
        if let Ok(list) = serde_json::from_slice::<Vec<serde_json::Value>>(&listing.stdout) {
            for sandbox in list {
                if let Some(name) = sandbox["vmName"].as_str() {
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
    let blob = binary_blob(3_000_000);
    std::fs::write(&local, &blob).unwrap();
    env.ok(&["cp", local.to_str().unwrap(), "keep:/root/in/blob.bin"]);
    let remote_sum = env.ok(&["exec", "keep", "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(remote_sum.starts_with(&sha256(&blob)), "{remote_sum}");
    let back = dir.path().join("back.bin");
    env.ok(&["cp", "keep:in/blob.bin", back.to_str().unwrap()]);
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&blob));

    // Directories go as tar archives both ways (the guest's tar in this
    // mode), byte for byte, symlinks as links.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/bin.dat"), binary_blob(100_000)).unwrap();
    std::fs::write(tree.join("a/é.txt"), "héllo\n").unwrap();
    std::os::unix::fs::symlink("a/é.txt", tree.join("link")).unwrap();
    env.ok(&["cp", tree.to_str().unwrap(), "keep:/root/tree"]);
    let copy = dir.path().join("copy");
    env.ok(&["cp", "keep:/root/tree", copy.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(copy.join("a/b/bin.dat")).unwrap(),
        binary_blob(100_000)
    );
    assert_eq!(
        std::fs::read_to_string(copy.join("a/é.txt")).unwrap(),
        "héllo\n"
    );
    assert_eq!(
        std::fs::read_link(copy.join("link")).unwrap(),
        std::path::Path::new("a/é.txt")
    );

    // The original client's form of a command line, in this mode too.
    let out = env.run(&["run", "-n", "keep", "-c", "echo both; echo err >&2; exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("both\n") && stdout.contains("err\n"),
        "{stdout}"
    );

    // Timeouts are reported with coreutils' exit code.
    let out = env.run(&["exec", "keep", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));

    // Stop keeps the disk; start boots it again.
    env.ok(&["stop", "-n", "keep"]);
    let got: serde_json::Value = serde_json::from_str(&env.ok(&["get", "keep", "--json"])).unwrap();
    assert_eq!(got["status"], "STOPPED");
    env.ok(&["start", "keep"]);
    let remote_sum = env.ok(&["exec", "keep", "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(remote_sum.starts_with(&sha256(&blob)), "{remote_sum}");

    let table = env.ok(&["list-all"]);
    assert!(
        table.starts_with("NAME") && table.contains("keep"),
        "{table}"
    );
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

#[test]
fn snapshots_work_in_process_too() {
    let env = Env::new();
    env.ok(&["start", "-n", "orig"]);
    env.ok(&["exec", "orig", "--shell", "--", "echo kept > /root/mark"]);
    let snap: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", "-n", "orig", "-i", "s 1", "--json"])).unwrap();
    assert_eq!(snap["snapshotId"], "s 1");
    assert_eq!(snap["vmName"], "orig");
    env.ok(&["restore", "-n", "clone", "-i", "s 1"]);
    assert_eq!(
        env.ok(&["exec", "clone", "--", "cat", "/root/mark"]),
        "kept\n"
    );
    let table = env.ok(&["snapshots"]);
    assert!(table.starts_with("ID") && table.contains("s 1"), "{table}");
    env.ok(&["snapshots", "rm", "s 1"]);
    let out = env.run(&["snapshots", "get", "s 1"]);
    assert_eq!(out.status.code(), Some(1));
    env.ok(&["destroy-all"]);
    assert!(env.qemu_pids().is_empty());
}

#[test]
fn fork_rollback_and_the_lineage_tree() {
    let env = Env::new();
    env.ok(&["start", "-n", "orig"]);
    env.ok(&["exec", "orig", "--shell", "--", "echo base > /root/mark"]);
    env.ok(&["snapshot", "-n", "orig", "-i", "base"]);
    // The snapshot outlives its sandbox; fewer VMs at once.
    env.ok(&["destroy", "orig"]);

    // The count is checked before anything starts.
    let out = env.run(&["fork", "base", "-c", "65"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--count"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = env.ok(&["fork", "base", "-c", "2"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("base-fork-1 ") && lines[1].contains("RUNNING"),
        "{table}"
    );
    assert!(lines[2].starts_with("base-fork-2 "), "{table}");
    assert_eq!(
        env.ok(&["exec", "base-fork-1", "--", "cat", "/root/mark"]),
        "base\n"
    );

    // A snapshot of a fork descends from the fork's snapshot.
    env.ok(&[
        "exec",
        "base-fork-1",
        "--shell",
        "--",
        "echo child > /root/mark",
    ]);
    let child: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", "-n", "base-fork-1", "-i", "child", "--json"]))
            .unwrap();
    assert_eq!(child["parentSnapshot"], "base");

    // Rollback: the other fork takes that state, under its own name.
    let vm: serde_json::Value =
        serde_json::from_str(&env.ok(&["rollback", "base-fork-2", "child", "--json"])).unwrap();
    assert_eq!(
        (&vm["vmName"], &vm["status"], &vm["fromSnapshot"]),
        (
            &serde_json::json!("base-fork-2"),
            &serde_json::json!("RUNNING"),
            &serde_json::json!("child")
        )
    );
    assert_eq!(
        env.ok(&["exec", "base-fork-2", "--", "cat", "/root/mark"]),
        "child\n"
    );

    let tree = env.ok(&["snapshots", "tree"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 4, "{tree}");
    assert!(lines[0].starts_with("snapshot base  of orig, "), "{tree}");
    assert_eq!(lines[1], "├── sandbox base-fork-1  RUNNING", "{tree}");
    assert!(
        lines[2].starts_with("└── snapshot child  of base-fork-1, "),
        "{tree}"
    );
    assert_eq!(lines[3], "    └── sandbox base-fork-2  RUNNING", "{tree}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "tree", "--json"])).unwrap();
    let base = &json["snapshots"][0];
    assert_eq!(base["snapshotId"], "base");
    assert_eq!(base["sandboxes"][0]["vmName"], "base-fork-1");
    assert_eq!(base["children"][0]["snapshotId"], "child");
    assert_eq!(base["children"][0]["sandboxes"][0]["vmName"], "base-fork-2");
    env.ok(&["destroy-all"]);
    assert!(env.qemu_pids().is_empty());
}

/// Killing the process that takes a snapshot, at any point, leaves either a
/// complete snapshot or none, and the sandbox usable: the next call (a new
/// manager) repairs what the dead one left.
#[test]
fn a_snapshot_killed_midway_is_all_or_nothing() {
    let env = Env::new();
    env.ok(&["create", "victim", "--cold-boot"]);
    env.ok(&[
        "exec",
        "victim",
        "--shell",
        "--",
        "echo 1 > /root/mark; head -c 32M /dev/urandom > /dev/shm/fill",
    ]);
    let fill = env.ok(&["exec", "victim", "--shell", "--", "md5sum < /dev/shm/fill"]);
    let mut complete = 0;
    let delays = [0u64, 30, 60, 90, 120, 160, 220, 300];
    for (i, delay) in delays.iter().enumerate() {
        let id = format!("k{i}");
        let args = ["snapshot", "-n", "victim", "-i", id.as_str()];
        let mut child = env
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*delay));
        let _ = child.kill();
        let _ = child.wait();

        assert_eq!(
            env.ok(&["exec", "victim", "--", "cat", "/root/mark"]),
            "1\n",
            "the sandbox after a kill at {delay} ms"
        );
        let listed: Vec<serde_json::Value> =
            serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
        let ids: Vec<&str> = listed
            .iter()
            .filter_map(|s| s["snapshotId"].as_str())
            .collect();
        // Nothing half-made on disk either: one directory per listed snapshot.
        let dirs = std::fs::read_dir(env.state.path().join("snapshots"))
            .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        assert_eq!(
            dirs,
            ids.len(),
            "snapshot dirs after a kill at {delay} ms: {ids:?}"
        );
        if ids.contains(&id.as_str()) {
            complete += 1;
            let clone = format!("r{i}");
            env.ok(&["restore", "-n", &clone, "-i", &id]);
            assert_eq!(
                env.ok(&[
                    "exec",
                    &clone,
                    "--shell",
                    "--",
                    "cat /root/mark; md5sum < /dev/shm/fill"
                ]),
                format!("1\n{fill}"),
                "the restore of a snapshot completed before a kill at {delay} ms"
            );
            env.ok(&["destroy", &clone]);
        }
    }
    eprintln!(
        "{complete} of {} snapshots completed before their kill",
        delays.len()
    );
    env.ok(&["destroy-all"]);
}

/// `GET /index.html` on a loopback port; `None` when nothing answers.
fn fetch(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(CALL_LIMIT)).ok()?;
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (_, body) = reply.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// What [`fetch`] gets within 30 seconds (a loaded host may be slow to
/// connect through a forward).
fn served(port: u16) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let body = fetch(port);
        if body.is_some() || std::time::Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The host port of the forward described `description`, from `port ls`.
fn host_port_of(env: &Env, name: &str, description: &str) -> Option<u16> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["port", "ls", name, "--json"])).unwrap();
    list.iter()
        .find(|f| f["description"] == description)
        .map(|f| f["hostPort"].as_str().unwrap().parse().unwrap())
}

/// Forwards given at creation and added, removed and listed afterwards,
/// proved by the bytes a guest web server returns through them. User-mode
/// networking, so that nothing on the host's network changes; egress
/// denied.
#[test]
fn port_forwards_reach_the_guest_and_go_away() {
    let env = Env::with_vars(&[("ARRAKIS_NETWORK_MODE", "user")]);
    env.ok(&["create", "web", "-p", "0:8000=web", "--egress", "deny"]);
    let info = env.ok(&["info", "web"]);
    for line in ["Network:   user", "IP:        10.20.", "Egress:    deny"] {
        assert!(info.contains(line), "{line:?} in {info}");
    }
    assert_eq!(env.ok(&["egress", "web"]), "deny\n");
    env.ok(&[
        "exec",
        "web",
        "--shell",
        "--",
        "mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && cd /tmp/www && \
         (setsid python3 -m http.server 8000 >/dev/null 2>&1 &) && \
         for i in $(seq 300); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000), timeout=1)' 2>/dev/null && exit 0; sleep 0.2; done; exit 1",
    ]);
    let first = host_port_of(&env, "web", "web").expect("the forward given at creation");
    assert_eq!(served(first).as_deref(), Some("served-by-the-guest\n"));

    let added: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["port", "add", "web", "-p", "8000=again", "--json"]))
            .unwrap();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["guestPort"], "8000");
    let second: u16 = added[0]["hostPort"].as_str().unwrap().parse().unwrap();
    assert_ne!(second, first);
    assert_eq!(host_port_of(&env, "web", "again"), Some(second));
    assert_eq!(served(second).as_deref(), Some("served-by-the-guest\n"));

    env.ok(&["port", "rm", "web", &second.to_string()]);
    assert_eq!(host_port_of(&env, "web", "again"), None);
    assert_eq!(fetch(second), None, "port {second} still answers");
    assert_eq!(served(first).as_deref(), Some("served-by-the-guest\n"));
    let out = env.run(&["port", "rm", "web", &second.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no forward on host port {second}")),
        "{stderr}"
    );

    env.ok(&["destroy", "web"]);
    assert_eq!(fetch(first), None, "port {first} answers after destroy");
    assert!(env.qemu_pids().is_empty());
}
