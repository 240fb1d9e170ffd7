//! End to end through the HTTP API: `arrakis serve` on a private state
//! directory and a free loopback port, driven by the same `arrakis` binary
//! as a client (`--server URL`), against real QEMU microVMs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary_blob, kill_qemus, require_artifacts, sha256, wait_limited};

/// A running `arrakis serve`. Dropping it destroys every sandbox (through
/// the API, then in-process on the same state directory as a fallback),
/// stops the server and kills any QEMU left, even when a test failed.
struct Server {
    child: Option<Child>,
    url: String,
    state: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// With extra environment for the server (e.g. its API token).
    fn start_with(env: &[(&str, &str)]) -> Server {
        require_artifacts();
        let state = tempfile::Builder::new()
            .prefix("arrakis-remote")
            .tempdir()
            .unwrap();
        let mut child = common::command()
            .arg("--state-dir")
            .arg(state.path())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("ARRAKIS_SERVER")
            .env_remove("ARRAKIS_API_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read both streams for good (a full pipe would stall the server),
        // and find the line that says where it listens.
        let (lines, found) = std::sync::mpsc::channel::<String>();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in streams {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let _ = lines.send(line);
                }
            });
        }
        let mut server = Server {
            child: Some(child),
            url: String::new(),
            state,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while server.url.is_empty() {
            match found.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(at) = line.find("serving the API on http://") {
                        let url = &line[at + "serving the API on ".len()..];
                        server.url = url.split_whitespace().next().unwrap().to_string();
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let exited = server.child.as_mut().unwrap().try_wait().unwrap();
                    assert!(
                        exited.is_none() && Instant::now() < deadline,
                        "arrakis serve did not print its address (exit: {exited:?}): {seen:?}"
                    );
                }
            }
        }
        server
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = common::command();
        cmd.arg("--server")
            .arg(&self.url)
            .args(args)
            .env_remove("ARRAKIS_STATE_DIR")
            .env_remove("ARRAKIS_TOKEN");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run_captured(self.cmd(args), args)
    }

    /// Runs and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        common::expect_ok(self.run(args), args)
    }

    /// Runs with `input` on stdin.
    fn with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = wait_limited(child, args);
        writer.join().unwrap();
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.run(&["destroy-all"]);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Sandboxes outlive the server: clean up in-process as well.
        if let Ok(child) = common::command()
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("destroy-all")
            .env_remove("ARRAKIS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            let _ = wait_limited(child, &["destroy-all"]);
        }
        kill_qemus(self.state.path());
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `root` (relative path -> content), and symlinks as
/// `-> target`.
fn tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if kind.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn an_unreachable_server_is_named_with_a_hint() {
    // Port 1 on loopback: nothing listens there.
    let out = common::command()
        .args(["--server", "http://127.0.0.1:1", "list-all"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_of(&out);
    assert!(
        stderr.starts_with("arrakis: cannot reach the arrakis server at http://127.0.0.1:1: ")
            && stderr.contains("(is 'arrakis serve' running?)"),
        "{stderr}"
    );
    let out = common::command()
        .args(["--server", "https://127.0.0.1:1", "list-all"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("https"), "{}", stderr_of(&out));
}

#[test]
fn the_original_client_verbs_and_more_through_the_api() {
    let server = Server::start();
    let name = "my box é";

    // start -n: a new VM; the table and the API's JSON.
    let out = server.ok(&["start", "-n", name, "--memory", "384"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.contains(name) && out.contains("RUNNING") && out.contains("384M"),
        "{out}"
    );
    let table = server.ok(&["list-all"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for header in ["NAME", "STATUS", "VCPUS", "MEMORY", "IMAGE", "CREATED"] {
        assert!(lines[0].contains(header), "{table}");
    }
    assert!(lines[1].starts_with(name), "{table}");
    let vms: Vec<serde_json::Value> =
        serde_json::from_str(&server.ok(&["list-all", "--json"])).unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["vmName"], name);
    assert_eq!(vms[0]["status"], "RUNNING");
    assert_eq!(vms[0]["memoryMb"], 384);
    let one: serde_json::Value =
        serde_json::from_str(&server.ok(&["list", "-n", name, "--json"])).unwrap();
    assert_eq!(one["vmName"], name);
    let info: serde_json::Value =
        serde_json::from_str(&server.ok(&["get", name, "--json"])).unwrap();
    assert_eq!(info["id"], one["id"]);

    // The original's boot-file flags are refused with the reason.
    let out = server.run(&["start", "-n", "other", "-k", "/boot/vmlinuz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("configured kernel"),
        "{}",
        stderr_of(&out)
    );

    // run -n -c: combined output, the command's exit code.
    let out = server.run(&["run", "-n", name, "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("out\n") && stdout.contains("err\n"),
        "{stdout}"
    );

    // exec streams: stdout and stderr apart, the exit code passed on, and
    // the first line arrives while the command still runs.
    let out = server.run(&[
        "exec",
        name,
        "--shell",
        "--",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(stderr_of(&out), "err\n");
    let mut child = server
        .cmd(&[
            "exec",
            name,
            "--shell",
            "--",
            "echo first; sleep 3; echo second",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let first_at = started.elapsed();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let out = wait_limited(child, &["exec", "streaming"]);
    let all_at = started.elapsed();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!((first.as_str(), rest.as_str()), ("first\n", "second\n"));
    assert!(
        all_at - first_at >= Duration::from_secs(2),
        "the first line came {first_at:?} in, the end {all_at:?}: not streamed"
    );
    let out = server.run(&["exec", name, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(143));
    let out = server.run(&["exec", name, "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));

    // exec -i: stdin passed through byte for byte (WebSocket).
    let input = binary_blob(300_000);
    let out = server.with_stdin(&["exec", name, "-i", "--", "sha256sum"], &input);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&sha256(&input)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = server.with_stdin(
        &["exec", name, "-i", "--", "sh", "-c", "cat; exit 5"],
        b"typed\n",
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "typed\n");

    // cp of a binary file both ways.
    let dir = tempfile::tempdir().unwrap();
    let blob = binary_blob(3_000_000);
    let local = dir.path().join("blob.bin");
    std::fs::write(&local, &blob).unwrap();
    let remote = format!("{name}:/root/in/blob.bin");
    server.ok(&["cp", local.to_str().unwrap(), &remote]);
    let sum = server.ok(&["exec", name, "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(sum.starts_with(&sha256(&blob)), "{sum}");
    let back = dir.path().join("back.bin");
    server.ok(&["cp", &remote, back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), blob);
    // Into an existing directory, under the file's own name.
    server.ok(&["cp", local.to_str().unwrap(), &format!("{name}:/root/in")]);
    let down = dir.path().join("down");
    std::fs::create_dir(&down).unwrap();
    server.ok(&["cp", &remote, down.to_str().unwrap()]);
    assert_eq!(std::fs::read(down.join("blob.bin")).unwrap(), blob);

    // cp of a directory both ways: nested, binary, empty, a symlink.
    let src = dir.path().join("tree");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::create_dir_all(src.join("empty dir")).unwrap();
    std::fs::write(src.join("a/b/bin.dat"), binary_blob(200_000)).unwrap();
    std::fs::write(src.join("a/é ü.txt"), "héllo\n").unwrap();
    std::fs::write(src.join("zero"), "").unwrap();
    std::os::unix::fs::symlink("a/b/bin.dat", src.join("link")).unwrap();
    server.ok(&["cp", src.to_str().unwrap(), &format!("{name}:/root/tree")]);
    let sum = server.ok(&["exec", name, "--", "sha256sum", "/root/tree/a/b/bin.dat"]);
    assert!(sum.starts_with(&sha256(&binary_blob(200_000))), "{sum}");
    let listing = server.ok(&["fs", "ls", name, "/root/tree"]);
    for entry in ["a", "empty dir", "zero", "link -> a/b/bin.dat"] {
        assert!(listing.contains(entry), "{entry}: {listing}");
    }
    let copy = dir.path().join("tree-back");
    server.ok(&["cp", &format!("{name}:/root/tree"), copy.to_str().unwrap()]);
    assert_eq!(tree(&copy), tree(&src));
    // Into an existing local directory, under the sandbox directory's name.
    let into = dir.path().join("into");
    std::fs::create_dir(&into).unwrap();
    server.ok(&["cp", &format!("{name}:/root/tree"), into.to_str().unwrap()]);
    assert_eq!(tree(&into.join("tree")), tree(&src));

    // The original's upload (pairs of -f) and download (-p, relative
    // paths land at the same relative path here).
    let text = dir.path().join("note.txt");
    std::fs::write(&text, "note\n").unwrap();
    server.ok(&[
        "upload",
        "-n",
        name,
        "-f",
        text.to_str().unwrap(),
        "-f",
        "notes/note.txt",
        "-f",
        &format!("{},/root/bin2.bin", local.display()),
    ]);
    let sum = server.ok(&["exec", name, "--", "sha256sum", "/root/bin2.bin"]);
    assert!(sum.starts_with(&sha256(&blob)), "{sum}");
    let work = tempfile::tempdir().unwrap();
    let out = server
        .cmd(&[
            "download",
            "-n",
            name,
            "-p",
            "notes/note.txt",
            "-p",
            "/root/bin2.bin",
        ])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        std::fs::read_to_string(work.path().join("notes/note.txt")).unwrap(),
        "note\n"
    );
    assert_eq!(std::fs::read(work.path().join("bin2.bin")).unwrap(), blob);
    let out = server.run(&["upload", "-n", name, "-f", "only-one"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("pairs"), "{}", stderr_of(&out));

    // fs verbs.
    server.ok(&["fs", "mkdir", "-p", name, "/root/x/y"]);
    server.ok(&["fs", "chmod", name, "700", "/root/x"]);
    let stat: serde_json::Value =
        serde_json::from_str(&server.ok(&["fs", "stat", name, "/root/x", "--json"])).unwrap();
    assert_eq!(
        (stat["kind"].as_str(), stat["mode"].as_str()),
        (Some("dir"), Some("700"))
    );
    server.ok(&["fs", "rm", "-r", name, "/root/x"]);
    assert!(!server
        .run(&["fs", "stat", name, "/root/x"])
        .status
        .success());

    // Errors: the server's message and status, exit code 1.
    let out = server.run(&["get", "no such box"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_of(&out);
    assert!(stderr.starts_with("arrakis: HTTP 404: "), "{stderr}");
    assert!(stderr.contains("no such box"), "{stderr}");

    // pause/resume, stop/start (the disk is kept).
    let out = server.ok(&["pause", "-n", name]);
    assert!(out.contains("PAUSED"), "{out}");
    let out = server.ok(&["resume", name]);
    assert!(out.contains("RUNNING"), "{out}");
    let out = server.ok(&["stop", "-n", name]);
    assert!(out.contains("STOPPED"), "{out}");
    server.ok(&["start", name]);
    let sum = server.ok(&["exec", name, "--", "sha256sum", "/root/in/blob.bin"]);
    assert!(sum.starts_with(&sha256(&blob)), "{sum}");

    // destroy -n, and destroy-all for the rest.
    server.ok(&["create", "second"]);
    server.ok(&["destroy", "-n", name]);
    let vms: Vec<serde_json::Value> =
        serde_json::from_str(&server.ok(&["list-all", "--json"])).unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["vmName"], "second");
    server.ok(&["destroy-all"]);
    assert_eq!(server.ok(&["list-all"]).lines().count(), 1);
    assert!(common::qemu_pids(server.state.path()).is_empty());
}

#[test]
fn snapshot_and_restore_through_the_api() {
    let server = Server::start();
    server.ok(&["start", "-n", "origin"]);
    server.ok(&[
        "exec",
        "origin",
        "--shell",
        "--",
        "echo before > /root/mark",
    ]);
    let snap: serde_json::Value =
        serde_json::from_str(&server.ok(&["snapshot", "-n", "origin", "-i", "snap one", "--json"]))
            .unwrap();
    assert_eq!(snap["snapshotId"], "snap one");
    assert_eq!(snap["vmName"], "origin");
    let table = server.ok(&["snapshots"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("snap one"), "{table}");
    let got: serde_json::Value =
        serde_json::from_str(&server.ok(&["snapshots", "get", "snap one", "--json"])).unwrap();
    assert_eq!(got["snapshotId"], "snap one");

    // restore -n -i, and start -n -s, as new sandboxes.
    server.ok(&["restore", "-n", "copy one", "-i", "snap one"]);
    let mark = server.ok(&["exec", "copy one", "--", "cat", "/root/mark"]);
    assert_eq!(mark, "before\n");
    server.ok(&["start", "-n", "copy two", "-s", "snap one"]);
    let mark = server.ok(&["exec", "copy two", "--", "cat", "/root/mark"]);
    assert_eq!(mark, "before\n");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&server.ok(&["snapshots", "--vm", "origin", "--json"])).unwrap();
    assert_eq!(list.len(), 1);

    server.ok(&["snapshots", "rm", "snap one"]);
    let out = server.run(&["snapshots", "get", "snap one"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("HTTP 404"), "{}", stderr_of(&out));
    server.ok(&["destroy-all"]);
}

#[test]
fn the_token_goes_with_every_call_when_the_server_wants_one() {
    let server = Server::start_with(&[("ARRAKIS_API_TOKEN", "s3cret-token-0123456789")]);
    let out = server.run(&["list-all"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_of(&out);
    assert!(stderr.starts_with("arrakis: HTTP 401: "), "{stderr}");
    assert!(stderr.contains("--token"), "{stderr}");
    let out = server.run(&["--token", "wrong", "list-all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("HTTP 401"), "{}", stderr_of(&out));

    server.ok(&["--token", "s3cret-token-0123456789", "start", "-n", "t"]);
    // From the environment too, and over the WebSocket.
    let mut cmd = server.cmd(&["exec", "t", "-i", "--", "cat"]);
    cmd.env("ARRAKIS_TOKEN", "s3cret-token-0123456789")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"via ws\n").unwrap();
    let out = wait_limited(child, &["exec", "-i", "with a token"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via ws\n");
    let out = server.run(&["exec", "t", "-i", "--", "cat"]);
    assert!(stderr_of(&out).contains("HTTP 401"), "{}", stderr_of(&out));
    server.ok(&["--token", "s3cret-token-0123456789", "destroy-all"]);
}

#[test]
fn fork_rollback_and_the_lineage_tree_through_the_api() {
    let server = Server::start();
    server.ok(&["start", "-n", "origin"]);
    server.ok(&["exec", "origin", "--shell", "--", "echo base > /root/mark"]);
    server.ok(&["snapshot", "-n", "origin", "-i", "base"]);
    server.ok(&["destroy", "origin"]);

    let forks: Vec<serde_json::Value> = serde_json::from_str(
        &server.ok(&["fork", "-i", "base", "-c", "2", "--prefix", "w", "--json"]),
    )
    .unwrap();
    let names: Vec<&str> = forks
        .iter()
        .filter_map(|vm| vm["vmName"].as_str())
        .collect();
    assert_eq!(names, ["w-1", "w-2"]);
    assert!(
        forks.iter().all(|vm| vm["fromSnapshot"] == "base"),
        "{forks:?}"
    );
    assert_eq!(
        server.ok(&["exec", "w-2", "--", "cat", "/root/mark"]),
        "base\n"
    );

    server.ok(&["exec", "w-1", "--shell", "--", "echo child > /root/mark"]);
    server.ok(&["snapshot", "-n", "w-1", "-i", "child"]);
    let out = server.ok(&["rollback", "-n", "w-2", "-i", "child"]);
    assert!(out.starts_with("NAME") && out.contains("w-2"), "{out}");
    assert_eq!(
        server.ok(&["exec", "w-2", "--", "cat", "/root/mark"]),
        "child\n"
    );
    let out = server.run(&["rollback", "w-2", "no such snapshot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("HTTP 404"), "{}", stderr_of(&out));

    let tree = server.ok(&["snapshots", "tree"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 4, "{tree}");
    assert!(lines[0].starts_with("snapshot base  of origin, "), "{tree}");
    assert_eq!(lines[1], "├── sandbox w-1  RUNNING", "{tree}");
    assert!(
        lines[2].starts_with("└── snapshot child  of w-1, "),
        "{tree}"
    );
    assert_eq!(lines[3], "    └── sandbox w-2  RUNNING", "{tree}");

    // Forking a sandbox (POST /v1/vms/{name}/fork) goes through a snapshot
    // that is deleted afterwards: the fork shows at the top.
    server.ok(&["destroy", "w-2"]);
    let out = server.ok(&["fork", "--sandbox", "w-1", "--prefix", "x"]);
    assert!(out.contains("x-1") && out.contains("RUNNING"), "{out}");
    assert_eq!(
        server.ok(&["exec", "x-1", "--", "cat", "/root/mark"]),
        "child\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&server.ok(&["snapshots", "tree", "--json"])).unwrap();
    assert_eq!(json["sandboxes"][0]["vmName"], "x-1", "{json}");
    assert_eq!(
        json["snapshots"][0]["sandboxes"][0]["vmName"], "w-1",
        "{json}"
    );
    server.ok(&["destroy-all"]);
}
