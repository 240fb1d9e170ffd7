//! Real-VM tests of the runtime: QEMU boots our kernel, initramfs and base
//! image. They need the artifacts from `scripts/setup` (under
//! `$ARRAKIS_HOME`, default `~/.cache/arrakis`) and FAIL, naming what is
//! missing, when those are absent.
//!
//! Each test has its own temporary state directory and a guard that kills
//! every QEMU started under it, even when the test fails; each is bounded in
//! time. Every test boots at most two VMs at once, except the fork of five
//! (six 256 MiB VMs, restored four at a time); run with `--test-threads=2`
//! or fewer on a 2-core machine.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use arrakis_protocol::{Command, ErrorCode, ExecRequest, FileKind};
use arrakis_runtime::{
    AgentClient, AgentError, ErrorKind, ExecOptions, ForkSource, RuntimeError, SandboxSpec,
    SandboxState, WriteOptions,
};
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Upper bound of any one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(400);

use arrakis_runtime::testing::{pids_under as qemu_pids_under, run_bounded, VmTestEnv as TestEnv};

/// Runs a test body on a multi-threaded runtime, bounded in time.
fn run<F: Future<Output = ()>>(body: F) {
    run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", body);
}

fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(script.to_string()),
        ..ExecRequest::default()
    }
}

async fn sh(agent: &AgentClient, script: &str) -> (String, String, i32) {
    let out = agent
        .exec(shell(script), ExecOptions::default())
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.shell_code(),
    )
}

/// The version string in a bzImage's setup header (`kernel_version` field),
/// e.g. `6.1.192 (arrakis@arrakis) #1 SMP Tue Nov 24 12:14:27 UTC 2026`.
fn kernel_version_string(bzimage: &Path) -> String {
    let image = std::fs::read(bzimage).expect("read the kernel");
    let field = u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize + 0x200;
    let end = image[field..].iter().position(|b| *b == 0).expect("NUL") + field;
    String::from_utf8_lossy(&image[field..end]).into_owned()
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[test]
fn boots_our_kernel_and_runs_processes() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let info = manager
            .create(SandboxSpec::named("exec-box"))
            .await
            .expect("create");
        assert_eq!(info.state, SandboxState::Running);
        assert!(info.pid.is_some());
        let agent = manager.agent("exec-box").await.unwrap();

        let (uname, _, code) = sh(&agent, "uname -a").await;
        assert_eq!(code, 0);
        let guest = agent.info().await.unwrap();
        assert!(uname.contains(&guest.kernel_release), "{uname}");
        // The booted kernel is the artifact: same release and build stamp.
        let built = kernel_version_string(&env.config.kernel);
        let (release, rest) = built.split_once(' ').expect("version string");
        let stamp = rest
            .split_once(") ")
            .map(|(_, stamp)| stamp)
            .expect("build stamp");
        assert!(
            built.contains("(arrakis@arrakis)"),
            "not our kernel build: {built}"
        );
        assert!(
            uname.contains(release) && uname.contains(stamp),
            "{uname} vs {built}"
        );
        assert_eq!(guest.hostname, "exec-box");
        let (os, _, _) = sh(&agent, "cat /etc/os-release").await;
        assert!(os.contains("VERSION_CODENAME=bookworm"), "{os}");

        // Exit codes, including death by signal.
        assert_eq!(sh(&agent, "true").await.2, 0);
        assert_eq!(sh(&agent, "false").await.2, 1);
        let killed = agent
            .exec(shell("kill -9 $$"), ExecOptions::default())
            .await
            .unwrap();
        assert_eq!(killed.status.signal, Some(9));
        assert_eq!(killed.status.shell_code(), 137);

        // stdout and stderr stay apart.
        let (out, err, code) = sh(&agent, "echo to-out; echo to-err >&2; exit 7").await;
        assert_eq!(
            (out.as_str(), err.as_str(), code),
            ("to-out\n", "to-err\n", 7)
        );

        // 10 MiB of output arrives intact.
        let big = agent
            .exec(
                shell("head -c 10485760 /dev/zero | tr '\\0' 'a'"),
                ExecOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(big.stdout.len(), 10 * 1024 * 1024);
        assert!(!big.stdout_truncated);
        assert_eq!(sha256(&big.stdout), sha256(&vec![b'a'; 10 * 1024 * 1024]));

        // stdin flows through `cat`.
        let cat = agent
            .exec_stream(ExecRequest {
                stdin: true,
                ..shell("cat")
            })
            .await
            .unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let stdin = cat.stdin();
        stdin.write(Bytes::from(payload.clone())).await.unwrap();
        stdin.close().await.unwrap();
        let echoed = cat.wait(ExecOptions::default()).await.unwrap();
        assert_eq!(echoed.status.code, Some(0));
        assert_eq!(sha256(&echoed.stdout), sha256(&payload));

        // A timeout kills the whole process tree and says so.
        let started = std::time::Instant::now();
        let timed = agent
            .exec(
                ExecRequest {
                    timeout_ms: Some(1500),
                    ..shell("sleep 300 & sleep 300; echo never")
                },
                ExecOptions::default(),
            )
            .await
            .unwrap();
        assert!(timed.status.timed_out, "{:?}", timed.status);
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(!String::from_utf8_lossy(&timed.stdout).contains("never"));
        let (left, _, _) = sh(&agent, "ps -eo args | grep -c '^sleep 300' || true").await;
        assert_eq!(left.trim(), "0", "sleep processes survived the timeout");

        // A background child does not hold the exec open.
        let started = std::time::Instant::now();
        let (out, _, code) = sh(&agent, "sleep 1000 & echo started").await;
        assert_eq!((out.as_str(), code), ("started\n", 0));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );

        // 20 concurrent execs on one session each get their own answer.
        let runs = (0..20).map(|i| {
            let agent = agent.clone();
            async move {
                let script = format!("echo out-{i}; echo err-{i} >&2; exit {i}");
                let out = agent
                    .exec(shell(&script), ExecOptions::default())
                    .await
                    .unwrap();
                (i, out)
            }
        });
        for (i, out) in futures_join_all(runs).await {
            assert_eq!(out.stdout, format!("out-{i}\n").into_bytes());
            assert_eq!(out.stderr, format!("err-{i}\n").into_bytes());
            assert_eq!(out.status.code, Some(i));
        }

        manager.destroy("exec-box").await.unwrap();
    });
}

/// Awaits every future concurrently (spawned, so they run in parallel).
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

#[test]
fn files_round_trip_and_bad_paths_fail_clearly() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager
            .create(SandboxSpec::named("files-box"))
            .await
            .expect("create");
        let agent = manager.agent("files-box").await.unwrap();

        // 50 MiB of random bytes, in and out, unchanged.
        let data: Vec<u8> = {
            let mut f = std::fs::File::open("/dev/urandom").unwrap();
            let mut buf = vec![0u8; 50 * 1024 * 1024];
            std::io::Read::read_exact(&mut f, &mut buf).unwrap();
            buf
        };
        let written = agent
            .write_file(
                "/root/data/blob.bin",
                &mut data.as_slice(),
                WriteOptions {
                    create_parents: true,
                    ..WriteOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(written, data.len() as u64);
        let (guest_sum, _, _) = sh(&agent, "sha256sum /root/data/blob.bin").await;
        assert!(guest_sum.starts_with(&sha256(&data)), "{guest_sum}");
        let mut back = Vec::new();
        let read = agent
            .read_file("/root/data/blob.bin", &mut back)
            .await
            .unwrap();
        assert_eq!(read, data.len() as u64);
        assert_eq!(sha256(&back), sha256(&data));

        // mkdir -p, list, stat, chmod, remove.
        agent.mkdir("/root/a/b/c", true, None).await.unwrap();
        agent
            .write_file(
                "/root/a/b/c/note.txt",
                &mut &b"hello"[..],
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let entries = agent.list("/root/a/b/c").await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].name.as_str(), entries[0].size), ("note.txt", 5));
        agent.chmod("/root/a/b/c/note.txt", 0o600).await.unwrap();
        let stat = agent.stat("/root/a/b/c/note.txt").await.unwrap();
        assert_eq!(
            (stat.kind, stat.size, stat.mode),
            (FileKind::File, 5, 0o600)
        );
        assert_eq!(agent.stat("/root/a/b").await.unwrap().kind, FileKind::Dir);
        agent.remove("/root/a", true).await.unwrap();
        let err = agent.stat("/root/a").await.unwrap_err();
        assert!(
            matches!(&err, AgentError::Remote { body, .. } if body.code == ErrorCode::NotFound),
            "{err:?}"
        );

        // Bad paths fail on the host with a message naming the problem.
        for (path, why) in [
            ("", "empty"),
            ("a\0b", "NUL"),
            ("../../etc/passwd", "climb"),
        ] {
            let err = agent.stat(path).await.unwrap_err();
            assert!(
                matches!(err, AgentError::InvalidPath(_)),
                "{path:?}: {err:?}"
            );
            assert!(err.to_string().contains(why), "{path:?}: {err}");
            let err = agent
                .write_file(path, &mut &b"x"[..], WriteOptions::default())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(why), "{path:?}: {err}");
        }
        manager.destroy("files-box").await.unwrap();
    });
}

#[test]
fn sandboxes_are_isolated_and_destroy_cleans_up() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let (a, b) = tokio::join!(
            manager.create(SandboxSpec::named("iso-a")),
            manager.create(SandboxSpec::named("iso-b"))
        );
        let (a, b) = (a.expect("create a"), b.expect("create b"));
        assert_ne!(a.id, b.id);
        let agent_a = manager.agent("iso-a").await.unwrap();
        let agent_b = manager.agent("iso-b").await.unwrap();
        agent_a
            .write_file(
                "/root/secret",
                &mut &b"only in a"[..],
                WriteOptions::default(),
            )
            .await
            .unwrap();
        let mut marker = agent_a
            .exec_stream(shell("exec -a iso-a-marker sleep 600"))
            .await
            .unwrap();
        let err = agent_b.stat("/root/secret").await.unwrap_err();
        assert!(matches!(err, AgentError::Remote { .. }), "{err:?}");
        let (ps_b, _, _) = sh(&agent_b, "ps -eo args").await;
        assert!(!ps_b.contains("iso-a-marker"), "{ps_b}");
        let (ps_a, _, _) = sh(&agent_a, "ps -eo args").await;
        assert!(ps_a.contains("iso-a-marker"), "{ps_a}");
        marker.signal(9, true).await.unwrap();
        let _ = marker.next().await;

        // Destroy leaves no process, socket, disk, RAM file or record behind.
        let dir_a = env.sandboxes_dir().join(&a.id);
        assert!(dir_a.join("agent.sock").exists());
        assert_eq!(TestEnv::entries(&env.layers_dir()).len(), 2);
        let mut ram_files = vec![format!("{}.ram", a.id), format!("{}.ram", b.id)];
        ram_files.sort();
        assert_eq!(TestEnv::entries(&env.ram_dir()), ram_files);
        drop((agent_a, agent_b));
        manager.destroy("iso-a").await.unwrap();
        assert!(!dir_a.exists(), "sandbox dir survived destroy");
        assert_eq!(TestEnv::entries(&env.layers_dir()).len(), 1);
        assert_eq!(TestEnv::entries(&env.ram_dir()), [format!("{}.ram", b.id)]);
        assert!(qemu_pids_under(&dir_a).is_empty(), "QEMU survived destroy");
        assert!(!env.sandboxes_dir().join(format!("{}.lock", a.id)).exists());
        let err = manager.get("iso-a").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let names: Vec<String> = manager
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["iso-b"]);
        // The other sandbox is untouched.
        let agent_b = manager.agent("iso-b").await.unwrap();
        assert_eq!(sh(&agent_b, "echo alive").await.0, "alive\n");
        manager.destroy("iso-b").await.unwrap();
        assert!(manager.list().await.unwrap().is_empty());
        assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
    });
}

#[test]
fn a_killed_qemu_shows_as_crashed_and_still_cleans_up() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let info = manager
            .create(SandboxSpec::named("doomed"))
            .await
            .expect("create");
        let pid = info.pid.expect("pid");
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut state = SandboxState::Running;
        for _ in 0..100 {
            state = manager.get("doomed").await.unwrap().state;
            if state == SandboxState::Crashed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(state, SandboxState::Crashed);
        let listed = manager.list().await.unwrap();
        assert_eq!(
            (listed[0].state, listed[0].pid),
            (SandboxState::Crashed, None)
        );
        let err = manager.agent("doomed").await.unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidState { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Conflict);

        // A crashed sandbox boots again on its disk.
        let restarted = manager.start("doomed").await.expect("start after crash");
        assert_eq!(
            (restarted.state, restarted.boot_count),
            (SandboxState::Running, 2)
        );
        manager.destroy("doomed").await.unwrap();
        assert!(!env.sandboxes_dir().join(&info.id).exists());
        assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
    });
}

#[test]
fn sandboxes_survive_a_manager_restart_and_stop_start() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let info = manager
            .create(SandboxSpec::named("durable"))
            .await
            .expect("create");
        let agent = manager.agent("durable").await.unwrap();
        agent
            .write_file("/root/kept.txt", &mut &b"kept"[..], WriteOptions::default())
            .await
            .unwrap();
        sh(&agent, "sync").await;
        drop(agent);
        drop(manager);

        // A new manager process (here: a new Manager) finds it running.
        let manager = env.manager().await;
        let again = manager.get("durable").await.unwrap();
        assert_eq!((again.state, again.pid), (SandboxState::Running, info.pid));
        let agent = manager.agent("durable").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/kept.txt").await.0, "kept");

        // Pause and resume.
        assert_eq!(
            manager.pause("durable").await.unwrap().state,
            SandboxState::Paused
        );
        let err = manager.pause("durable").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(
            manager.resume("durable").await.unwrap().state,
            SandboxState::Running
        );
        assert_eq!(sh(&agent, "echo back").await.0, "back\n");
        drop(agent);

        // Stop, then start again on the same disk.
        let stopped = manager.stop("durable").await.expect("stop");
        assert_eq!((stopped.state, stopped.pid), (SandboxState::Stopped, None));
        assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
        assert!(
            TestEnv::entries(&env.ram_dir()).is_empty(),
            "a stopped sandbox keeps no RAM file"
        );
        let err = manager.agent("durable").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        let started = manager.start("durable").await.expect("start");
        assert_eq!(started.state, SandboxState::Running);
        let agent = manager.agent("durable").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/kept.txt").await.0, "kept");
        drop(agent);
        manager.destroy("durable").await.unwrap();
    });
}

#[test]
fn bad_input_is_refused_and_starts_nothing() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let bad = [
            (SandboxSpec::named(""), "name"),
            (SandboxSpec::named("line\nbreak"), "name"),
            (SandboxSpec::named("   "), "name"),
            (SandboxSpec::named(&"x".repeat(64)), "name"),
            (SandboxSpec::named("../escape"), "name"),
            (
                SandboxSpec {
                    memory_mb: Some(1 << 30),
                    ..SandboxSpec::named("huge")
                },
                "memory_mb",
            ),
            (
                SandboxSpec {
                    memory_mb: Some(1),
                    ..SandboxSpec::named("tiny")
                },
                "memory_mb",
            ),
            (
                SandboxSpec {
                    vcpus: Some(4096),
                    ..SandboxSpec::named("wide")
                },
                "vcpus",
            ),
            (
                SandboxSpec {
                    vcpus: Some(0),
                    ..SandboxSpec::named("none")
                },
                "vcpus",
            ),
            (
                SandboxSpec {
                    image: Some("no-such-image".into()),
                    ..SandboxSpec::named("noimg")
                },
                "image",
            ),
        ];
        for (spec, field) in bad {
            let err = manager.create(spec.clone()).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{spec:?}: {err}");
            match &err {
                RuntimeError::InvalidArgument {
                    field: got,
                    message,
                } => {
                    assert_eq!(*got, field, "{spec:?}");
                    assert!(!message.is_empty());
                }
                other => panic!("{spec:?}: unexpected {other:?}"),
            }
        }
        assert!(manager.list().await.unwrap().is_empty());
        assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(env.sandboxes_dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let err = manager.get("nope").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err = manager.destroy("nope").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);

        // A name in use is refused without touching the first sandbox.
        manager
            .create(SandboxSpec::named("taken"))
            .await
            .expect("create");
        let err = manager
            .create(SandboxSpec::named("taken"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        assert_eq!(manager.list().await.unwrap().len(), 1);
        assert_eq!(qemu_pids_under(&env.sandboxes_dir()).len(), 1);
        manager.destroy("taken").await.unwrap();
    });
}

#[test]
fn a_boot_that_fails_is_reported_and_cleaned_up() {
    let mut env = TestEnv::new();
    // No init in the initramfs and no root device: the kernel panics, and
    // with panic=-1 and -no-reboot QEMU exits.
    env.config.extra_kernel_args = vec!["rdinit=/nonexistent".into()];
    env.config.boot_timeout_secs = 30;
    run(async {
        let manager = env.manager().await;
        let err = manager
            .create(SandboxSpec::named("broken"))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Boot { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("VM exited"), "{text}");
        assert!(
            text.contains("Kernel panic"),
            "the console tail is missing: {text}"
        );
        assert!(manager.list().await.unwrap().is_empty());
        assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(env.sandboxes_dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    });
}

/// A fork bomb, a busy loop and a flood of output, each bounded by a
/// timeout, must not take the agent down: it keeps answering while they run
/// and after they are killed, and nothing of them is left behind.
#[test]
fn misbehaving_commands_do_not_take_the_agent_down() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("rogue")).await.unwrap();
        let agent = manager.agent("rogue").await.unwrap();
        let bounded = |script: &str| ExecRequest {
            timeout_ms: Some(4000),
            ..shell(script)
        };
        let count = "ps -e --no-headers | wc -l";
        let (before, _, _) = sh(&agent, count).await;
        // The bomb runs as a background job; the main process stays so the
        // timeout has a tree to kill.
        let bomb = agent
            .exec_stream(bounded("b() { b | b & }; b; sleep 100"))
            .await
            .unwrap();
        let spin = agent
            .exec_stream(bounded("while :; do :; done"))
            .await
            .unwrap();
        let flood = agent.exec_stream(bounded("yes flood")).await.unwrap();

        // While all three run, the agent still answers promptly enough.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = tokio::time::timeout(Duration::from_secs(20), sh(&agent, "echo alive"))
            .await
            .expect("the agent stopped answering while the commands ran");
        assert_eq!(during.0, "alive\n");

        for session in [bomb, spin] {
            let out = session.wait(ExecOptions::default()).await.unwrap();
            assert!(out.status.timed_out, "{:?}", out.status);
        }
        // Unread, the flood was held back by flow control (at most one 512 KiB
        // window in flight); it is read with a smaller cap, the rest drained.
        let flooded = flood
            .wait(ExecOptions {
                max_output_bytes: 64 * 1024,
            })
            .await
            .unwrap();
        assert!(flooded.status.timed_out, "{:?}", flooded.status);
        assert!(flooded.stdout.len() <= 64 * 1024);
        let whole_lines = flooded.stdout.len() - flooded.stdout.len() % 6;
        assert!(flooded.stdout[..whole_lines]
            .chunks(6)
            .all(|line| line == b"flood\n"));

        // Afterwards: still answering, and no survivors of the bomb or the loop.
        let (after, _, _) = sh(&agent, &format!("sleep 1; {count}")).await;
        let (before, after): (u32, u32) = (
            before.trim().parse().unwrap(),
            after.trim().parse().unwrap(),
        );
        assert!(
            after <= before + 2,
            "{before} processes before, {after} after"
        );
        manager.destroy("rogue").await.unwrap();
    });
}

/// A counter that runs in the background after its exec returns: it
/// rewrites `/root/counter` every 100 ms, renamed into place, so a reader
/// never sees the file emptied by a redirection (read as 0, that made a
/// running counter look stopped once).
const START_COUNTER: &str = "printf '#!/bin/sh\\ni=0\\nwhile :; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; sleep 0.1; done\\n' \
     > /root/count.sh && chmod +x /root/count.sh && (setsid /root/count.sh >/dev/null 2>&1 &)";

/// The counter's pid and value, twice, 1.2 s apart (it must have
/// advanced). The first value is waited for (up to 5 s): a counter just
/// started may not have written one yet.
async fn counter_advances(agent: &AgentClient) -> bool {
    let read = || async {
        let (out, _, _) = sh(agent, "cat /root/counter 2>/dev/null").await;
        out.trim().parse::<u64>().unwrap_or(0)
    };
    let mut first = read().await;
    for _ in 0..25 {
        if first > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        first = read().await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = read().await;
    let (pids, _, _) = sh(agent, "pgrep -f count.sh").await;
    first > 0 && second > first && !pids.trim().is_empty()
}

fn env_of(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Nothing of any sandbox or snapshot is left in the state directory.
fn assert_all_gone(env: &TestEnv) {
    assert!(qemu_pids_under(&env.sandboxes_dir()).is_empty());
    for dir in [env.layers_dir(), env.snapshots_dir(), env.ram_dir()] {
        let left = TestEnv::entries(&dir);
        assert!(left.is_empty(), "{} still has {left:?}", dir.display());
    }
    let left = TestEnv::entries(&env.sandboxes_dir());
    assert!(left.is_empty(), "sandboxes/ still has {left:?}");
}

#[test]
fn a_restored_clone_runs_from_the_snapshot_instant() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager
            .create(SandboxSpec {
                env: env_of(&[("GREETING", "hi there")]),
                ..SandboxSpec::named("origin")
            })
            .await
            .expect("create");
        let origin = manager.agent("origin").await.unwrap();
        sh(
            &origin,
            "echo before > /root/note.txt; echo in-memory > /dev/shm/mem.txt",
        )
        .await;
        let (_, err, code) = sh(&origin, START_COUNTER).await;
        assert_eq!(code, 0, "{err}");
        assert!(counter_advances(&origin).await, "the counter does not run");

        let snap = manager
            .snapshot("origin", Some("first snap: ü".into()))
            .await
            .expect("snapshot");
        assert_eq!(
            (snap.id.as_str(), snap.sandbox.as_str(), snap.memory_mb),
            ("first snap: ü", "origin", 256)
        );
        assert_eq!(snap.env, env_of(&[("GREETING", "hi there")]));
        assert!(snap.size_bytes > 1 << 20, "{snap:?}");
        assert_eq!(
            manager.list_snapshots().await.unwrap(),
            std::slice::from_ref(&snap)
        );
        // The original goes on, and moves on.
        assert_eq!(
            manager.get("origin").await.unwrap().state,
            SandboxState::Running
        );
        sh(&origin, "echo after > /root/note.txt").await;

        let clone = manager
            .restore("first snap: ü", "clone 1")
            .await
            .expect("restore");
        assert_eq!(clone.state, SandboxState::Running);
        assert_eq!(clone.env, env_of(&[("GREETING", "hi there")]));
        assert_eq!((clone.vcpus, clone.memory_mb), (1, 256));
        let agent = manager.agent("clone 1").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/note.txt").await.0, "before\n");
        assert_eq!(sh(&agent, "cat /dev/shm/mem.txt").await.0, "in-memory\n");
        assert!(
            counter_advances(&agent).await,
            "the counter did not survive the restore"
        );
        // Its own hostname, and the host's time.
        assert_eq!(agent.info().await.unwrap().hostname, "clone-1");
        let (guest_now, _, _) = sh(&agent, "date +%s").await;
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let guest_now: u64 = guest_now.trim().parse().unwrap();
        assert!(
            guest_now.abs_diff(host_now) <= 5,
            "guest clock {guest_now}, host {host_now}"
        );
        // The original is unaffected.
        assert_eq!(sh(&origin, "cat /root/note.txt").await.0, "after\n");
        assert_eq!(origin.info().await.unwrap().hostname, "origin");
        assert!(counter_advances(&origin).await);
        // Clones diverge from their original: they write to their own disk.
        sh(&agent, "echo clone > /root/note.txt; sync").await;
        assert_eq!(sh(&origin, "cat /root/note.txt").await.0, "after\n");

        // A name in use is refused; the snapshot id too.
        let err = manager
            .restore("first snap: ü", "origin")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        let err = manager
            .snapshot("origin", Some("first snap: ü".into()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        let err = manager.restore("no such snapshot", "x").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

        drop((agent, origin));
        manager.destroy("clone 1").await.unwrap();
        manager.destroy("origin").await.unwrap();
        // The snapshot outlives its sandbox; deleting it leaves nothing.
        assert_eq!(
            manager.get_snapshot("first snap: ü").await.unwrap().id,
            snap.id
        );
        manager.delete_snapshot("first snap: ü").await.unwrap();
        assert!(manager.list_snapshots().await.unwrap().is_empty());
        assert_all_gone(&env);
    });
}

/// A paused sandbox stays paused (and can be snapshotted again); a
/// restored sandbox can be snapshotted, restored, stopped and started.
#[test]
fn snapshots_of_paused_and_restored_sandboxes() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("base")).await.unwrap();
        let base = manager.agent("base").await.unwrap();
        sh(&base, "echo 1 > /root/generation").await;
        manager.pause("base").await.unwrap();
        manager
            .snapshot("base", Some("paused".into()))
            .await
            .expect("snapshot of a paused sandbox");
        assert_eq!(
            manager.get("base").await.unwrap().state,
            SandboxState::Paused
        );
        // QEMU refuses a second migration unless it was resumed in between.
        manager
            .snapshot("base", Some("paused again".into()))
            .await
            .expect("second snapshot of a paused sandbox");
        assert_eq!(
            manager.get("base").await.unwrap().state,
            SandboxState::Paused
        );
        manager.resume("base").await.unwrap();
        assert_eq!(sh(&base, "cat /root/generation").await.0, "1\n");
        drop(base);
        manager.delete_snapshot("paused again").await.unwrap();

        let gen2 = manager.restore("paused", "gen2").await.expect("restore");
        let agent = manager.agent("gen2").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/generation").await.0, "1\n");
        sh(&agent, "echo 2 > /root/generation").await;
        // RAM the clone wrote over its copy-on-write mapping (a tmpfs file
        // of random bytes) must be in its snapshot's memory.
        let (sum, err, code) = sh(
            &agent,
            "head -c 24M /dev/urandom > /dev/shm/big && md5sum < /dev/shm/big",
        )
        .await;
        assert_eq!(code, 0, "{err}");
        // Snapshot of a restored sandbox (the original Arrakis's issue #4).
        manager
            .snapshot("gen2", Some("from a clone".into()))
            .await
            .expect("snapshot of a restored sandbox");
        assert_eq!(sh(&agent, "cat /root/generation").await.0, "2\n");
        sh(&agent, "echo changed > /dev/shm/big").await;
        drop(agent);
        // The chain does not depend on the sandboxes it came from.
        manager.destroy("base").await.unwrap();
        manager.destroy("gen2").await.unwrap();
        assert!(!env.sandboxes_dir().join(&gen2.id).exists());

        manager
            .restore("from a clone", "gen3")
            .await
            .expect("restore");
        let agent = manager.agent("gen3").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/generation").await.0, "2\n");
        assert_eq!(sh(&agent, "md5sum < /dev/shm/big").await.0, sum);
        sh(&agent, "echo 3 > /root/generation").await;
        drop(agent);
        // Stop and start: a cold boot on the layered disk.
        manager.stop("gen3").await.expect("stop");
        let started = manager.start("gen3").await.expect("start");
        assert_eq!(started.boot_count, 2);
        let agent = manager.agent("gen3").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/generation").await.0, "3\n");
        assert_eq!(agent.info().await.unwrap().hostname, "gen3");
        drop(agent);
        // And the cold-booted sandbox can be snapshotted and restored too.
        manager
            .snapshot("gen3", Some("after a cold boot".into()))
            .await
            .unwrap();
        manager.restore("after a cold boot", "gen4").await.unwrap();
        let agent = manager.agent("gen4").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/generation").await.0, "3\n");
        drop(agent);

        for name in ["gen3", "gen4"] {
            manager.destroy(name).await.unwrap();
        }
        for id in ["paused", "from a clone", "after a cold boot"] {
            manager.delete_snapshot(id).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// Deleting a snapshot while a sandbox restored from it runs: the sandbox
/// keeps its disk (also across a cold boot); its layers go with it.
#[test]
fn deleting_a_snapshot_keeps_its_clones_working() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("src")).await.unwrap();
        let agent = manager.agent("src").await.unwrap();
        sh(
            &agent,
            "echo from-src > /root/origin.txt; echo src-ram > /dev/shm/origin",
        )
        .await;
        drop(agent);
        manager.snapshot("src", Some("s".into())).await.unwrap();
        manager.destroy("src").await.unwrap();

        manager.restore("s", "child").await.expect("restore");
        manager.delete_snapshot("s").await.expect("delete");
        assert!(TestEnv::entries(&env.snapshots_dir()).is_empty());
        // The child's own layer and the frozen one it stands on.
        assert_eq!(TestEnv::entries(&env.layers_dir()).len(), 2);
        let agent = manager.agent("child").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/origin.txt").await.0, "from-src\n");
        sh(&agent, "echo more > /root/child.txt").await;
        // Its memory outlives the snapshot's files: a snapshot of the child
        // still captures RAM from the deleted snapshot plus its own writes.
        sh(&agent, "echo child-ram >> /dev/shm/origin").await;
        manager
            .snapshot("child", Some("grand".into()))
            .await
            .unwrap();
        manager.restore("grand", "gc").await.unwrap();
        let gc = manager.agent("gc").await.unwrap();
        assert_eq!(
            sh(&gc, "cat /dev/shm/origin /root/child.txt").await.0,
            "src-ram\nchild-ram\nmore\n"
        );
        drop(gc);
        manager.destroy("gc").await.unwrap();
        manager.delete_snapshot("grand").await.unwrap();
        let (out, _, code) = sh(
            &agent,
            "dd if=/dev/urandom of=/root/big bs=1M count=8 2>&1 && sync && md5sum /root/big",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        drop(agent);
        manager.stop("child").await.unwrap();
        manager
            .start("child")
            .await
            .expect("cold boot without the snapshot");
        let agent = manager.agent("child").await.unwrap();
        assert_eq!(
            sh(&agent, "cat /root/origin.txt /root/child.txt").await.0,
            "from-src\nmore\n"
        );
        let (sum, _, _) = sh(&agent, "md5sum /root/big").await;
        assert_eq!(sum, out.lines().last().unwrap().to_string() + "\n");
        drop(agent);
        manager.destroy("child").await.unwrap();
        assert_all_gone(&env);
    });
}

#[test]
fn the_sandbox_quota_counts_creates_and_restores() {
    let mut env = TestEnv::new();
    env.config.max_sandboxes = 1;
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("only")).await.unwrap();
        let err = manager
            .create(SandboxSpec::named("second"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
        assert!(
            matches!(err, RuntimeError::QuotaExceeded { max: 1 }),
            "{err:?}"
        );
        manager.snapshot("only", Some("q".into())).await.unwrap();
        let err = manager.restore("q", "second").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
        assert_eq!(qemu_pids_under(&env.sandboxes_dir()).len(), 1);
        // A stopped sandbox still counts.
        manager.stop("only").await.unwrap();
        let err = manager.restore("q", "second").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
        manager.destroy("only").await.unwrap();
        manager
            .restore("q", "second")
            .await
            .expect("restore within the quota");
        manager.destroy("second").await.unwrap();
        manager.delete_snapshot("q").await.unwrap();
        assert_all_gone(&env);
    });
}

/// Timings of a default-size sandbox under this host's accelerator, printed
/// for the record (`--nocapture` shows them): cold create, snapshot, and
/// restore until the agent answers.
#[test]
fn snapshot_and_restore_timings() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let started = std::time::Instant::now();
        manager.create(SandboxSpec::named("timed")).await.unwrap();
        let create = started.elapsed();
        let agent = manager.agent("timed").await.unwrap();
        sh(&agent, START_COUNTER).await;
        drop(agent);
        let (mut snaps, mut restores) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let started = std::time::Instant::now();
            manager
                .snapshot("timed", Some(format!("t{i}")))
                .await
                .unwrap();
            snaps.push(ms(started.elapsed()));
            let started = std::time::Instant::now();
            manager
                .restore(&format!("t{i}"), "timed clone")
                .await
                .unwrap();
            restores.push(ms(started.elapsed()));
            let agent = manager.agent("timed clone").await.unwrap();
            assert!(counter_advances(&agent).await);
            drop(agent);
            manager.destroy("timed clone").await.unwrap();
        }
        let snap = manager.get_snapshot("t0").await.unwrap();
        eprintln!(
            "TIMINGS accel={:?} memory_mb={} create_ms={:.0} snapshot_ms={:?} restore_ms={:?} snapshot_size_mib={:.1}",
            manager.accel().kind(),
            snap.memory_mb,
            ms(create),
            snaps.iter().map(|v| v.round()).collect::<Vec<_>>(),
            restores.iter().map(|v| v.round()).collect::<Vec<_>>(),
            snap.size_bytes as f64 / (1 << 20) as f64,
        );
        manager.destroy("timed").await.unwrap();
        for i in 0..3 {
            manager.delete_snapshot(&format!("t{i}")).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// Five forks of one snapshot at once: each runs from the snapshot's
/// instant (same boot id: memory restored, no reboot) but is its own
/// machine (hostname, machine id, entropy, disk). Prints the timings.
#[test]
fn a_fork_of_five_makes_five_distinct_machines() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let started = std::time::Instant::now();
        manager.create(SandboxSpec::named("parent")).await.unwrap();
        let create = started.elapsed();
        let parent = manager.agent("parent").await.unwrap();
        let (boot_id, _, _) = sh(&parent, "cat /proc/sys/kernel/random/boot_id").await;
        let (parent_machine_id, _, _) = sh(&parent, "cat /etc/machine-id 2>/dev/null").await;
        drop(parent);
        let snap = manager
            .snapshot("parent", Some("seed".into()))
            .await
            .unwrap();
        assert_eq!(snap.parent_snapshot, None);

        let started = std::time::Instant::now();
        let forks = manager
            .fork(ForkSource::Snapshot("seed".into()), 5, "worker")
            .await
            .expect("fork");
        let fork_time = started.elapsed();
        let names: Vec<&str> = forks.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["worker-1", "worker-2", "worker-3", "worker-4", "worker-5"]
        );
        let (mut hostnames, mut machine_ids, mut randoms) = (Vec::new(), Vec::new(), Vec::new());
        for fork in &forks {
            assert_eq!(fork.state, SandboxState::Running);
            assert_eq!(fork.from_snapshot.as_deref(), Some("seed"));
            let agent = manager.agent(&fork.name).await.unwrap();
            assert_eq!(
                sh(&agent, "cat /proc/sys/kernel/random/boot_id").await.0,
                boot_id,
                "{} was rebooted, not restored",
                fork.name
            );
            hostnames.push(agent.info().await.unwrap().hostname);
            let (id, _, _) = sh(&agent, "cat /etc/machine-id").await;
            let id = id.trim().to_string();
            assert!(
                id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id:?}"
            );
            machine_ids.push(id);
            randoms.push(sh(&agent, "head -c 16 /dev/urandom | od -x").await.0);
        }
        sh(
            &manager.agent("worker-1").await.unwrap(),
            "echo mine > /root/only-in-1; sync",
        )
        .await;
        for name in &names[1..] {
            let agent = manager.agent(name).await.unwrap();
            let (_, _, code) = sh(&agent, "test -e /root/only-in-1").await;
            assert_ne!(code, 0, "{name} sees worker-1's file");
        }
        for values in [&hostnames, &machine_ids, &randoms] {
            let mut unique = values.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 5, "{values:?}");
        }
        assert!(!machine_ids.contains(&parent_machine_id.trim().to_string()));
        // Lineage: a snapshot of a fork names the fork's snapshot.
        let child = manager
            .snapshot("worker-2", Some("of a fork".into()))
            .await
            .unwrap();
        assert_eq!(child.parent_snapshot.as_deref(), Some("seed"));
        eprintln!(
            "TIMINGS fork_of_5_ms={:.0} cold_create_ms={:.0}",
            ms(fork_time),
            ms(create)
        );
        for name in names.iter().chain(&["parent"]) {
            manager.destroy(name).await.unwrap();
        }
        for id in ["seed", "of a fork"] {
            manager.delete_snapshot(id).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// A fork of a running sandbox: it goes on, the forks have its memory and
/// disk, and the snapshot taken for the fork is gone afterwards.
#[test]
fn a_fork_of_a_running_sandbox() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("live")).await.unwrap();
        let live = manager.agent("live").await.unwrap();
        sh(&live, "echo disk > /root/d; echo mem > /dev/shm/m").await;
        let forks = manager
            .fork(ForkSource::Sandbox("live".into()), 2, "copy")
            .await
            .expect("fork of a sandbox");
        assert_eq!(forks.len(), 2);
        assert!(manager.list_snapshots().await.unwrap().is_empty());
        assert_eq!(
            manager.get("live").await.unwrap().state,
            SandboxState::Running
        );
        assert_eq!(sh(&live, "cat /root/d").await.0, "disk\n");
        for fork in &forks {
            assert!(fork.from_snapshot.as_deref().unwrap().starts_with("fork-"));
            let agent = manager.agent(&fork.name).await.unwrap();
            assert_eq!(sh(&agent, "cat /root/d /dev/shm/m").await.0, "disk\nmem\n");
        }
        // Bad counts and taken names are refused before anything starts.
        let err = manager
            .fork(ForkSource::Sandbox("live".into()), 0, "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let err = manager
            .fork(ForkSource::Sandbox("live".into()), 65, "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let err = manager
            .fork(ForkSource::Sandbox("live".into()), 3, "copy")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        let err = manager
            .fork(ForkSource::Snapshot("nope".into()), 1, "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert_eq!(manager.list().await.unwrap().len(), 3);
        drop(live);
        for name in ["live", "copy-1", "copy-2"] {
            manager.destroy(name).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// Rollback in place: same name and id, the snapshot's disk and memory,
/// the old layers freed; a mismatched snapshot is refused.
#[test]
fn rollback_restores_a_sandbox_in_place() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        let before = manager.create(SandboxSpec::named("rb")).await.unwrap();
        let agent = manager.agent("rb").await.unwrap();
        sh(
            &agent,
            "echo old > /root/f; echo old-mem > /dev/shm/m; sync",
        )
        .await;
        let (boot_id, _, _) = sh(&agent, "cat /proc/sys/kernel/random/boot_id").await;
        manager.snapshot("rb", Some("good".into())).await.unwrap();
        sh(
            &agent,
            "echo new > /root/f; echo new-mem > /dev/shm/m; sync",
        )
        .await;
        drop(agent);
        let layers_before = TestEnv::entries(&env.layers_dir()).len();

        let after = manager.rollback("rb", "good").await.expect("rollback");
        assert_eq!(
            (after.name.as_str(), after.id.as_str()),
            ("rb", before.id.as_str())
        );
        assert_eq!(after.state, SandboxState::Running);
        assert_eq!(after.from_snapshot.as_deref(), Some("good"));
        let agent = manager.agent("rb").await.unwrap();
        assert_eq!(
            sh(&agent, "cat /root/f /dev/shm/m").await.0,
            "old\nold-mem\n"
        );
        assert_eq!(
            sh(&agent, "cat /proc/sys/kernel/random/boot_id").await.0,
            boot_id
        );
        assert_eq!(agent.info().await.unwrap().hostname, "rb");
        // The layer the sandbox wrote after the snapshot is gone; a new one
        // on the snapshot's replaced it.
        assert_eq!(TestEnv::entries(&env.layers_dir()).len(), layers_before);
        drop(agent);

        // Also from stopped, and twice in a row.
        manager.stop("rb").await.unwrap();
        manager
            .rollback("rb", "good")
            .await
            .expect("rollback of a stopped sandbox");
        let agent = manager.agent("rb").await.unwrap();
        assert_eq!(sh(&agent, "cat /root/f").await.0, "old\n");
        drop(agent);

        // A snapshot of another shape is refused, and nothing changes.
        manager
            .create(SandboxSpec {
                memory_mb: Some(320),
                ..SandboxSpec::named("other")
            })
            .await
            .unwrap();
        manager.snapshot("other", Some("big".into())).await.unwrap();
        let err = manager.rollback("rb", "big").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert_eq!(
            manager.get("rb").await.unwrap().state,
            SandboxState::Running
        );
        let err = manager.rollback("rb", "missing").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

        for name in ["rb", "other"] {
            manager.destroy(name).await.unwrap();
        }
        for id in ["good", "big"] {
            manager.delete_snapshot(id).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// A fork that does not fit the quota starts nothing.
#[test]
fn a_fork_beyond_the_quota_starts_nothing() {
    let mut env = TestEnv::new();
    env.config.max_sandboxes = 3;
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("q")).await.unwrap();
        manager.snapshot("q", Some("qs".into())).await.unwrap();
        let err = manager
            .fork(ForkSource::Snapshot("qs".into()), 3, "f")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
        assert_eq!(manager.list().await.unwrap().len(), 1);
        assert_eq!(qemu_pids_under(&env.sandboxes_dir()).len(), 1);
        let forks = manager
            .fork(ForkSource::Snapshot("qs".into()), 2, "f")
            .await
            .expect("a fork within the quota");
        for fork in forks {
            manager.destroy(&fork.name).await.unwrap();
        }
        manager.destroy("q").await.unwrap();
        manager.delete_snapshot("qs").await.unwrap();
        assert_all_gone(&env);
    });
}

/// Warm starts: the first create of an image and shape keeps a golden
/// snapshot (booted under a neutral hostname); the next create is restored
/// from it (its kernel is the golden boot's: the same command line) and is
/// still its own machine. `cold_boot` and another shape boot; a changed
/// boot input or a broken golden snapshot falls back to a boot and a new
/// golden snapshot.
#[test]
fn creates_warm_start_from_a_golden_snapshot() {
    let mut env = TestEnv::new();
    env.config.warm_start = true;
    const IDENTITY: &str = "cat /proc/cmdline; hostname; echo \"id=$(cat /etc/machine-id)\"";
    async fn cmdline(manager: &arrakis_runtime::Manager, name: &str) -> String {
        let agent = manager.agent(name).await.unwrap();
        sh(&agent, "cat /proc/cmdline").await.0
    }
    run(async {
        let manager = env.manager().await;
        manager
            .create(SandboxSpec::named("w1"))
            .await
            .expect("cold create");
        let golden = manager.golden_snapshots().await.unwrap();
        assert_eq!(golden.len(), 1, "{golden:?}");
        assert!(manager.list_snapshots().await.unwrap().is_empty());
        let err = manager.get_snapshot(&golden[0].id).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::NotFound,
            "golden snapshots are internal"
        );
        let w1 = manager.agent("w1").await.unwrap();
        let first = sh(&w1, IDENTITY).await.0;
        sh(
            &w1,
            "echo mine > /root/w1-only; echo mine > /dev/shm/w1-only",
        )
        .await;

        let w2 = manager
            .create(SandboxSpec {
                env: env_of(&[("K", "v")]),
                ..SandboxSpec::named("w2")
            })
            .await
            .expect("warm create");
        assert_eq!(
            (w2.from_snapshot.as_deref(), w2.env["K"].as_str()),
            (None, "v")
        );
        let a2 = manager.agent("w2").await.unwrap();
        let second = sh(&a2, IDENTITY).await.0;
        let (first, second): (Vec<&str>, Vec<&str>) =
            (first.lines().collect(), second.lines().collect());
        assert!(
            first[0].contains("arrakis.hostname=sandbox "),
            "{}",
            first[0]
        );
        assert_eq!(first[0], second[0], "w2 booted instead of warm-starting");
        assert_eq!((first[1], second[1]), ("w1", "w2"));
        assert_ne!(first[2], second[2], "machine-ids must differ");
        // The golden instant precedes anything run in w1.
        let (out, _, code) = sh(&a2, "cat /root/w1-only /dev/shm/w1-only").await;
        assert_ne!(code, 0, "w2 sees w1's files: {out}");
        assert_eq!(manager.golden_snapshots().await.unwrap(), golden);

        // Asked to, or for another shape, it boots.
        manager
            .create(SandboxSpec {
                cold_boot: true,
                ..SandboxSpec::named("w3")
            })
            .await
            .unwrap();
        manager
            .create(SandboxSpec {
                memory_mb: Some(320),
                ..SandboxSpec::named("w4")
            })
            .await
            .unwrap();
        assert!(cmdline(&manager, "w3")
            .await
            .contains("arrakis.hostname=w3 "));
        assert!(cmdline(&manager, "w4")
            .await
            .contains("arrakis.hostname=sandbox "));
        assert_eq!(manager.golden_snapshots().await.unwrap().len(), 2);
        for name in ["w2", "w3", "w4"] {
            manager.destroy(name).await.unwrap();
        }
        drop(manager);

        // Another boot input (here a kernel argument): a new key, a boot,
        // and the old golden snapshot of that shape replaced.
        let mut changed = env.config.clone();
        changed.extra_kernel_args = vec!["arrakis.test=1".into()];
        let manager = arrakis_runtime::Manager::open(changed).await.unwrap();
        manager.create(SandboxSpec::named("w5")).await.unwrap();
        assert!(cmdline(&manager, "w5").await.contains("arrakis.test=1"));
        let now = manager.golden_snapshots().await.unwrap();
        assert_eq!(now.len(), 2, "{now:?}");
        assert!(!now.iter().any(|g| g.id == golden[0].id), "{now:?}");

        // A golden snapshot that no longer restores is dropped for a boot
        // (the only snapshots here are golden ones), and replaced.
        for entry in TestEnv::entries(&env.snapshots_dir()) {
            let state = env.snapshots_dir().join(entry).join("state.bin");
            if state.is_file() {
                std::fs::write(state, b"not a device state").unwrap();
            }
        }
        manager
            .create(SandboxSpec::named("w6"))
            .await
            .expect("falls back to a boot");
        manager
            .create(SandboxSpec::named("w7"))
            .await
            .expect("warm from the new golden");
        let agent = manager.agent("w7").await.unwrap();
        assert_eq!(sh(&agent, "hostname").await.0, "w7\n");
        assert_eq!(cmdline(&manager, "w7").await, cmdline(&manager, "w6").await);
        for name in ["w1", "w5", "w6", "w7"] {
            manager.destroy(name).await.unwrap();
        }
        assert_eq!(manager.clear_golden_snapshots().await.unwrap(), 2);
        assert_all_gone(&env);
    });
}

/// A call in flight while its sandbox is snapshotted carries on and
/// completes; one in flight when the sandbox is rolled back (its VM
/// replaced) fails promptly instead of hanging; and a clone of a snapshot
/// taken mid-call answers new calls (the stale call stays behind).
#[test]
fn calls_in_flight_across_snapshot_and_rollback() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("busy")).await.unwrap();
        manager
            .snapshot("busy", Some("before".into()))
            .await
            .unwrap();
        let agent = manager.agent("busy").await.unwrap();

        let running = agent.clone();
        let call = tokio::spawn(async move {
            running
                .exec(shell("sleep 1; echo done"), ExecOptions::default())
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        manager
            .snapshot("busy", Some("during".into()))
            .await
            .unwrap();
        let out = call.await.unwrap().expect("the call survives the snapshot");
        assert_eq!(
            (
                String::from_utf8_lossy(&out.stdout).as_ref(),
                out.status.code
            ),
            ("done\n", Some(0))
        );

        let running = agent.clone();
        let call = tokio::spawn(async move {
            running
                .exec(shell("sleep 60"), ExecOptions::default())
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        manager.rollback("busy", "before").await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a call into the replaced VM must not hang")
            .unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
        let agent = manager.agent("busy").await.unwrap();
        assert_eq!(sh(&agent, "echo ok").await.0, "ok\n");

        manager.restore("during", "copy").await.unwrap();
        let copy = manager.agent("copy").await.unwrap();
        assert_eq!(sh(&copy, "echo ok").await.0, "ok\n");
        for name in ["busy", "copy"] {
            manager.destroy(name).await.unwrap();
        }
        for id in ["before", "during"] {
            manager.delete_snapshot(id).await.unwrap();
        }
        assert_all_gone(&env);
    });
}

/// The counter's value, read by the agent itself (an exec would wait while
/// the execs are frozen).
async fn counter_value(agent: &AgentClient) -> u64 {
    let mut out = Vec::new();
    // Not there yet (the counter starts in the background): 0.
    match agent.read_file("/root/counter", &mut out).await {
        Ok(_) => String::from_utf8_lossy(&out).trim().parse().unwrap_or(0),
        Err(_) => 0,
    }
}

/// Whether the counter moves within 1.2 s, read without an exec.
async fn counter_moves(agent: &AgentClient) -> bool {
    let first = counter_value(agent).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    counter_value(agent).await > first
}

/// The agent freezes every exec process on request, until thawed or until
/// the freeze's lease runs out; a snapshot freezes them while it is taken
/// and thaws them after; a clone's processes run again once the clone has
/// its own entropy, clock and name.
#[test]
fn execs_freeze_for_snapshots_and_clones_thaw_after_their_fix_ups() {
    let env = TestEnv::new();
    run(async {
        let manager = env.manager().await;
        manager.create(SandboxSpec::named("ice")).await.unwrap();
        let agent = manager.agent("ice").await.unwrap();
        let (_, err, code) = sh(&agent, START_COUNTER).await;
        assert_eq!(code, 0, "{err}");
        assert!(counter_moves(&agent).await, "the counter does not run");

        agent
            .freeze(true, Duration::from_millis(2500))
            .await
            .unwrap();
        assert!(!counter_moves(&agent).await, "frozen processes still run");
        // The lease (2.5 s from the freeze) thaws them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(counter_moves(&agent).await, "the lease did not thaw");
        agent.freeze(true, Duration::from_secs(60)).await.unwrap();
        agent.freeze(false, Duration::ZERO).await.unwrap();
        assert!(counter_moves(&agent).await, "a thaw did not thaw");

        manager
            .snapshot("ice", Some("ice-snap".into()))
            .await
            .unwrap();
        assert!(counter_moves(&agent).await, "frozen after the snapshot");
        manager.restore("ice-snap", "ice-clone").await.unwrap();
        let clone = manager.agent("ice-clone").await.unwrap();
        assert!(counter_moves(&clone).await, "the clone stays frozen");
        assert_eq!(sh(&clone, "hostname").await.0, "ice-clone\n");

        for name in ["ice", "ice-clone"] {
            manager.destroy(name).await.unwrap();
        }
        manager.delete_snapshot("ice-snap").await.unwrap();
        assert_all_gone(&env);
    });
}
