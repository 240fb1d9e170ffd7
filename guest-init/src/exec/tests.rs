//! Exec semantics against real processes, with channels standing in for the
//! multiplexed stream.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use arrakis_protocol::Command;

use super::*;
use crate::supervisor;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Started(u32),
    Data(Channel, Bytes),
    Eof(Channel),
}

/// Records what the exec sends; optionally slow, like a host short of credit.
#[derive(Clone, Default)]
struct Recorder {
    sent: Arc<Mutex<Vec<Sent>>>,
    delay: Option<Duration>,
}

impl Recorder {
    fn push(&self, item: Sent) {
        self.sent.lock().unwrap().push(item);
    }

    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    fn output(&self, channel: Channel) -> Vec<u8> {
        let mut bytes = Vec::new();
        for item in self.sent() {
            if let Sent::Data(ch, data) = item {
                if ch == channel {
                    bytes.extend_from_slice(&data);
                }
            }
        }
        bytes
    }

    fn text(&self, channel: Channel) -> String {
        String::from_utf8(self.output(channel)).unwrap()
    }
}

impl ExecOutput for Recorder {
    async fn started(&self, pid: u32) -> Result<(), Gone> {
        self.push(Sent::Started(pid));
        Ok(())
    }

    async fn data(&self, channel: Channel, data: Bytes) -> Result<(), Gone> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.push(Sent::Data(channel, data));
        Ok(())
    }

    async fn eof(&self, channel: Channel) -> Result<(), Gone> {
        self.push(Sent::Eof(channel));
        Ok(())
    }
}

/// Host events from a channel; when the test drops its sender, no more come.
struct Events(mpsc::UnboundedReceiver<HostEvent>);

impl ExecInput for Events {
    async fn next(&mut self) -> HostEvent {
        match self.0.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }
}

fn context() -> ExecContext {
    ExecContext {
        supervisor: supervisor::global(),
        cgroups: Arc::new(Cgroups::disabled()),
        root: PathBuf::from("/"),
    }
}

fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(script.into()),
        ..ExecRequest::default()
    }
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(args.iter().map(|a| a.to_string()).collect()),
        ..ExecRequest::default()
    }
}

/// Runs `request` with no host events.
async fn run(request: ExecRequest) -> (ExecOutcome, Recorder) {
    let (_tx, rx) = mpsc::unbounded_channel();
    let out = Recorder::default();
    let outcome = context()
        .run(&request, out.clone(), Events(rx))
        .await
        .unwrap();
    (outcome, out)
}

fn process_gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

async fn wait_gone(pid: i32) {
    for _ in 0..300 {
        if process_gone(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("process {pid} still exists");
}

fn kill(pid: i32) {
    // SAFETY: kill(2) with integer arguments, on a pid this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[tokio::test]
async fn stdout_and_stderr_are_separate_and_exit_code_reported() {
    let (outcome, out) = run(shell("echo out; echo err >&2; exit 7")).await;
    assert_eq!(
        outcome.status,
        ExitStatus {
            code: Some(7),
            signal: None,
            timed_out: false
        }
    );
    assert!(!outcome.cancelled);
    assert_eq!(out.text(Channel::Stdout), "out\n");
    assert_eq!(out.text(Channel::Stderr), "err\n");
    let sent = out.sent();
    assert!(matches!(sent.first(), Some(Sent::Started(pid)) if *pid > 0));
    let tail = &sent[sent.len() - 2..];
    assert!(
        tail.contains(&Sent::Eof(Channel::Stdout)) && tail.contains(&Sent::Eof(Channel::Stderr))
    );
}

#[tokio::test]
async fn ten_mebibytes_arrive_intact_in_bounded_chunks() {
    let (outcome, out) = run(argv(&["seq", "1", "1500000"])).await;
    assert_eq!(outcome.status.code, Some(0));
    let expected: String = (1..=1_500_000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 10 * 1024 * 1024);
    let got = out.output(Channel::Stdout);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected.as_bytes(), "content differs");
    for item in out.sent() {
        if let Sent::Data(_, data) = item {
            assert!(!data.is_empty() && data.len() <= CHUNK);
        }
    }
}

#[tokio::test]
async fn stdin_is_streamed_through_cat() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = argv(&["cat"]);
    request.stdin = true;
    // 3 MiB: more than the agent buffers, so the queue must drain as cat reads.
    let block: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    for chunk in block.chunks(100_000) {
        tx.send(HostEvent::Stdin(Bytes::copy_from_slice(chunk)))
            .unwrap();
    }
    tx.send(HostEvent::StdinEof).unwrap();
    let out = Recorder::default();
    let outcome = context()
        .run(&request, out.clone(), Events(rx))
        .await
        .unwrap();
    assert_eq!(outcome.status.code, Some(0));
    assert!(out.output(Channel::Stdout) == block, "echoed bytes differ");
}

#[tokio::test]
async fn stdin_is_dev_null_unless_requested() {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(HostEvent::Stdin(Bytes::from_static(b"ignored")))
        .unwrap();
    let out = Recorder::default();
    let outcome = context()
        .run(&argv(&["cat"]), out.clone(), Events(rx))
        .await
        .unwrap();
    assert_eq!(outcome.status.code, Some(0));
    assert_eq!(out.text(Channel::Stdout), "");
}

#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let mut request = shell("sleep 100 & echo $!; sleep 100");
    request.timeout_ms = Some(300);
    let started = Instant::now();
    let (outcome, out) = run(request).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        outcome.status,
        ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true
        }
    );
    let background: i32 = out.text(Channel::Stdout).trim().parse().unwrap();
    wait_gone(background).await;
}

#[tokio::test]
async fn background_process_does_not_block_the_reply_and_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("survived");
    let script = format!(
        "(sleep 0.3; echo late; echo late >&2; touch {}) & sleep 1000 & echo $!",
        marker.display()
    );
    let started = Instant::now();
    let (outcome, out) = run(shell(&script)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome.status.code, Some(0));
    let sleeper: i32 = out.text(Channel::Stdout).trim().parse().unwrap();
    assert!(!process_gone(sleeper), "background sleep was killed");
    // Its late writes go to a drained pipe instead of killing it with SIGPIPE.
    for _ in 0..200 {
        if marker.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        marker.exists(),
        "background writer did not survive the reply"
    );
    assert!(!out.text(Channel::Stdout).contains("late"));
    kill(sleeper);
    wait_gone(sleeper).await;
}

#[tokio::test]
async fn last_output_of_the_main_process_is_not_cut_by_a_slow_host() {
    // The host takes 20 ms per chunk: well past the grace period after exit,
    // yet everything the main process wrote must arrive.
    let (_tx, rx) = mpsc::unbounded_channel();
    let out = Recorder {
        delay: Some(Duration::from_millis(20)),
        ..Recorder::default()
    };
    let request = shell("sleep 1000 & head -c 300000 /dev/zero");
    let outcome = context()
        .run(&request, out.clone(), Events(rx))
        .await
        .unwrap();
    assert_eq!(outcome.status.code, Some(0));
    assert_eq!(out.output(Channel::Stdout).len(), 300_000);
    // Clean up the sleeper through its process group (the exec's main pid).
    let Some(Sent::Started(pid)) = out.sent().first().cloned() else {
        panic!("no Started first");
    };
    // SAFETY: killpg(2) on the process group this test created.
    unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
}

#[tokio::test]
async fn signals_reach_the_process_or_the_group() {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(HostEvent::Signal {
        signal: 15,
        group: false,
    })
    .unwrap();
    let out = Recorder::default();
    let outcome = context()
        .run(&argv(&["sleep", "100"]), out, Events(rx))
        .await
        .unwrap();
    assert_eq!(outcome.status.signal, Some(15));

    let (tx, rx) = mpsc::unbounded_channel();
    let out = Recorder::default();
    let request = shell("sleep 100 & echo $!; sleep 100");
    let task = tokio::spawn({
        let out = out.clone();
        async move { context().run(&request, out, Events(rx)).await }
    });
    while out.text(Channel::Stdout).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.send(HostEvent::Signal {
        signal: 0,
        group: true,
    })
    .unwrap();
    tx.send(HostEvent::Signal {
        signal: 9,
        group: true,
    })
    .unwrap();
    let outcome = task.await.unwrap().unwrap();
    assert_eq!(outcome.status.signal, Some(9));
    let background: i32 = out.text(Channel::Stdout).trim().parse().unwrap();
    wait_gone(background).await;
}

#[tokio::test]
async fn cancel_kills_and_reports_cancelled() {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(HostEvent::Cancel).unwrap();
    let out = Recorder::default();
    let outcome = context()
        .run(&argv(&["sleep", "100"]), out.clone(), Events(rx))
        .await
        .unwrap();
    assert!(outcome.cancelled);
    assert_eq!(outcome.status.signal, Some(9));
}

#[tokio::test]
async fn endless_output_with_a_slow_host_still_times_out() {
    let (_tx, rx) = mpsc::unbounded_channel();
    let out = Recorder {
        delay: Some(Duration::from_millis(5)),
        ..Recorder::default()
    };
    let mut request = argv(&["yes"]);
    request.timeout_ms = Some(300);
    let started = Instant::now();
    let outcome = context()
        .run(&request, out.clone(), Events(rx))
        .await
        .unwrap();
    assert!(outcome.status.timed_out);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Only what the slow host accepted was read: yes was held back by the pipe.
    let chunks = out
        .sent()
        .iter()
        .filter(|s| matches!(s, Sent::Data(..)))
        .count();
    assert!(chunks < 200, "{chunks} chunks");
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = context()
        .run(
            &argv(&["no-such-program-xyz"]),
            Recorder::default(),
            Events(rx),
        )
        .await
        .unwrap_err();
    match err {
        ExecError::Spawn { source, .. } => assert_eq!(source.kind(), io::ErrorKind::NotFound),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn env_cwd_and_user_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut request = shell("pwd; echo \"$GREETING\"; echo \"$PATH\"; id -u; id -G");
    request.cwd = Some(dir.path().display().to_string());
    request.env = BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]);
    // SAFETY: getuid takes no arguments.
    let root = unsafe { libc::getuid() } == 0;
    if root {
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        request.user = Some("65534".into());
    }
    let (outcome, out) = run(request).await;
    assert_eq!(
        outcome.status.code,
        Some(0),
        "{}",
        out.text(Channel::Stderr)
    );
    let text = out.text(Channel::Stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], dir.path().display().to_string());
    assert_eq!(lines[1], "hello");
    assert_eq!(lines[2], DEFAULT_PATH);
    if root {
        assert_eq!(lines[3], "65534");
        assert!(
            !lines[4].split(' ').any(|g| g == "0"),
            "kept root's groups: {}",
            lines[4]
        );
    }
}

#[tokio::test]
async fn each_exec_is_its_own_process_group() {
    let (outcome, out) = run(shell(
        "ps -o pgid= -p $$ 2>/dev/null || cut -d' ' -f5 /proc/$$/stat",
    ))
    .await;
    assert_eq!(outcome.status.code, Some(0));
    let Some(Sent::Started(pid)) = out.sent().first().cloned() else {
        panic!("no Started first");
    };
    assert_eq!(out.text(Channel::Stdout).trim(), pid.to_string());
}
