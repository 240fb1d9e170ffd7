//! Exec semantics against real processes, with channels standing in for the
//! multiplexed stream.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use arrakis_protocol::{Command, TtySize};
use tokio::sync::mpsc;

use super::*;
use crate::supervisor;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Started(u32),
    Data(Channel, Bytes),
    Eof(Channel),
}

/// Records what the exec sends; optionally slow, like a host short of
/// credit; once `gone` is set, fails like a reset stream.
#[derive(Clone, Default)]
struct Recorder {
    sent: Arc<Mutex<Vec<Sent>>>,
    delay: Option<Duration>,
    gone: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn push(&self, item: Sent) -> Result<(), Gone> {
        if self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Gone);
        }
        self.sent.lock().unwrap().push(item);
        Ok(())
    }

    fn set_gone(&self) {
        self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn pid(&self) -> i32 {
        match self.sent().first() {
            Some(Sent::Started(pid)) => *pid as i32,
            other => panic!("no Started first: {other:?}"),
        }
    }

    /// Waits until `Started` was sent (bounded); returns the pid.
    async fn started_pid(&self) -> i32 {
        for _ in 0..500 {
            if !self.sent().is_empty() {
                return self.pid();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("Started never arrived");
    }

    /// Waits until `channel` carried `text` (bounded).
    async fn wait_for(&self, channel: Channel, text: &str) {
        for _ in 0..500 {
            if String::from_utf8_lossy(&self.output(channel)).contains(text) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{text:?} never arrived; got {:?}",
            String::from_utf8_lossy(&self.output(channel))
        );
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
        self.push(Sent::Started(pid))
    }

    async fn data(&self, channel: Channel, data: Bytes) -> Result<(), Gone> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.push(Sent::Data(channel, data))
    }

    async fn eof(&self, channel: Channel) -> Result<(), Gone> {
        self.push(Sent::Eof(channel))
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
    ExecContext::new(
        supervisor::global(),
        Arc::new(Cgroups::disabled()),
        PathBuf::from("/"),
    )
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

// Terminals, resource limits, groups and the exact environment.

fn on_tty(mut request: ExecRequest, rows: u16, cols: u16) -> ExecRequest {
    request.tty = Some(TtySize { rows, cols });
    request
}

#[tokio::test]
async fn a_tty_exec_sees_a_terminal_of_the_requested_size() {
    let script = "test -t 0 && test -t 1 && test -t 2 && echo all-tty; \
                  (exec </dev/tty) && echo has-ctty; stty size; echo err >&2";
    let (outcome, out) = run(on_tty(shell(script), 33, 101)).await;
    assert_eq!(outcome.status.code, Some(0));
    // The terminal's output processing turns "\n" into "\r\n"; stderr is
    // the terminal too.
    assert_eq!(
        out.text(Channel::Stdout),
        "all-tty\r\nhas-ctty\r\n33 101\r\nerr\r\n"
    );
    assert_eq!(out.text(Channel::Stderr), "");
    let sent = out.sent();
    assert!(
        sent.contains(&Sent::Eof(Channel::Stdout)) && sent.contains(&Sent::Eof(Channel::Stderr))
    );
}

#[tokio::test]
async fn a_resize_reaches_the_terminal_and_stdin_eof_does_not_hang_it_up() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = on_tty(
        shell("stty size; read line; stty size; echo \"got $line\""),
        24,
        80,
    );
    request.stdin = true;
    let out = Recorder::default();
    let task = tokio::spawn({
        let out = out.clone();
        async move { context().run(&request, out, Events(rx)).await }
    });
    out.wait_for(Channel::Stdout, "24 80\r\n").await;
    tx.send(HostEvent::Resize {
        rows: 50,
        cols: 132,
    })
    .unwrap();
    tx.send(HostEvent::Stdin(Bytes::from_static(b"hello\n")))
        .unwrap();
    // On a terminal EOF only ends the host's input: the shell keeps its
    // terminal (no SIGHUP) and finishes normally.
    tx.send(HostEvent::StdinEof).unwrap();
    let outcome = task.await.unwrap().unwrap();
    assert_eq!(
        outcome.status.code,
        Some(0),
        "{}",
        out.text(Channel::Stdout)
    );
    // The typed line is echoed by the terminal.
    assert_eq!(
        out.text(Channel::Stdout),
        "24 80\r\nhello\r\n50 132\r\ngot hello\r\n"
    );
}

#[tokio::test]
async fn a_resize_without_a_terminal_is_ignored() {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(HostEvent::Resize { rows: 1, cols: 1 }).unwrap();
    let out = Recorder::default();
    let outcome = context()
        .run(&shell("echo fine"), out.clone(), Events(rx))
        .await
        .unwrap();
    assert_eq!(outcome.status.code, Some(0));
    assert_eq!(out.text(Channel::Stdout), "fine\n");
}

fn rlimit(resource: &str, soft: u64, hard: u64) -> arrakis_protocol::Rlimit {
    arrakis_protocol::Rlimit {
        resource: resource.into(),
        soft,
        hard,
    }
}

#[tokio::test]
async fn rlimits_are_applied_before_the_program_runs() {
    let mut request =
        shell("ulimit -Sn; ulimit -Hn; ulimit -c; grep 'Max open files' /proc/self/limits");
    request.rlimits = vec![
        rlimit("RLIMIT_NOFILE", 123, 456),
        rlimit("RLIMIT_CORE", 0, 0),
    ];
    let (outcome, out) = run(request).await;
    assert_eq!(
        outcome.status.code,
        Some(0),
        "{}",
        out.text(Channel::Stderr)
    );
    let text = out.text(Channel::Stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["123", "456", "0"]);
    let limits: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(limits[3..5], ["123", "456"], "{}", lines[3]);

    let mut request = shell("true");
    request.rlimits = vec![rlimit("RLIMIT_FILES", 1, 1)];
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = context()
        .run(&request, Recorder::default(), Events(rx))
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("RLIMIT_FILES"), "{err}");
}

#[tokio::test]
async fn a_limit_the_kernel_refuses_names_the_step() {
    // SAFETY: getuid takes no arguments.
    if unsafe { libc::getuid() } != 0 {
        return;
    }
    // Above fs.nr_open: refused even for root.
    let mut request = argv(&["true"]);
    request.rlimits = vec![rlimit("RLIMIT_NOFILE", u64::MAX, u64::MAX)];
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = context()
        .run(&request, Recorder::default(), Events(rx))
        .await
        .unwrap_err();
    match &err {
        ExecError::Setup { step, source, .. } => {
            assert!(step.contains("RLIMIT_NOFILE"), "{step}");
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn extra_groups_are_added_to_the_users_own() {
    // SAFETY: getuid takes no arguments.
    if unsafe { libc::getuid() } != 0 {
        return;
    }
    let mut request = argv(&["id", "-G"]);
    request.user = Some("65534:65534".into());
    request.cwd = Some("/".into());
    request.groups = vec![4242, 4343];
    let (outcome, out) = run(request).await;
    assert_eq!(
        outcome.status.code,
        Some(0),
        "{}",
        out.text(Channel::Stderr)
    );
    let mut groups: Vec<u32> = out
        .text(Channel::Stdout)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, [4242, 4343, 65534]);

    // Root keeps root but gets the extra group too.
    let mut request = argv(&["id", "-G"]);
    request.groups = vec![4242];
    let (_, out) = run(request).await;
    let groups = out.text(Channel::Stdout);
    assert!(groups.split_whitespace().any(|g| g == "4242"), "{groups}");
    assert!(groups.split_whitespace().any(|g| g == "0"), "{groups}");
}

#[tokio::test]
async fn clear_env_gives_exactly_env_plus_path_and_home() {
    let mut request = argv(&["env"]);
    request.clear_env = true;
    request.env = BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]);
    let (outcome, out) = run(request).await;
    assert_eq!(outcome.status.code, Some(0));
    let text = out.text(Channel::Stdout);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    let path = format!("PATH={DEFAULT_PATH}");
    assert_eq!(lines, ["GREETING=hi", "HOME=/root", path.as_str()]);

    let mut request = argv(&["env"]);
    request.clear_env = true;
    request.env = BTreeMap::from([
        ("PATH".to_owned(), "/bin:/usr/bin".to_owned()),
        ("HOME".to_owned(), "/tmp".to_owned()),
    ]);
    let (_, out) = run(request).await;
    let text = out.text(Channel::Stdout);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["HOME=/tmp", "PATH=/bin:/usr/bin"]);
}

// Kept execs.

fn kept(id: &str, mut request: ExecRequest) -> ExecRequest {
    request.keep = Some(id.into());
    request
}

/// Starts a kept exec on its first stream; returns the stream's recorder,
/// its host-event sender and the task that ends with the stream.
fn start_kept(
    ctx: &Arc<ExecContext>,
    request: ExecRequest,
    out: Recorder,
) -> (
    mpsc::UnboundedSender<HostEvent>,
    tokio::task::JoinHandle<Result<AttachEnd, ExecError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = Arc::clone(ctx);
    let task = tokio::spawn(async move { ctx.run_kept(&request, out, Events(rx)).await });
    (tx, task)
}

fn start_attach(
    ctx: &Arc<ExecContext>,
    id: &str,
    out: Recorder,
) -> (
    mpsc::UnboundedSender<HostEvent>,
    tokio::task::JoinHandle<Result<AttachEnd, ExecError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctx, id) = (Arc::clone(ctx), id.to_owned());
    let task = tokio::spawn(async move { ctx.attach(&id, out, Events(rx)).await });
    (tx, task)
}

/// Expects an `Exited` end and confirms the reply as sent (or not).
fn exited(end: Result<AttachEnd, ExecError>, sent: bool) -> ExitStatus {
    match end {
        Ok(AttachEnd::Exited { status, ack }) => {
            ack.reply_sent(sent);
            status
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

async fn detach(
    tx: &mpsc::UnboundedSender<HostEvent>,
    task: tokio::task::JoinHandle<Result<AttachEnd, ExecError>>,
) {
    tx.send(HostEvent::Cancel).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the stream ends at once")
        .unwrap();
    assert!(matches!(end, Ok(AttachEnd::Detached)), "{end:?}");
}

async fn attach_collect(
    ctx: &Arc<ExecContext>,
    id: &str,
) -> (Result<AttachEnd, ExecError>, Recorder) {
    let out = Recorder::default();
    let (_tx, task) = start_attach(ctx, id, out.clone());
    let end = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("attach ends")
        .unwrap();
    (end, out)
}

#[tokio::test]
async fn a_kept_exec_survives_a_cancel_and_reports_on_attach() {
    let ctx = Arc::new(context());
    let first = Recorder::default();
    let request = kept(
        "survivor",
        shell("echo one; sleep 0.3; echo two; echo err >&2; exit 4"),
    );
    let (tx, task) = start_kept(&ctx, request, first.clone());
    first.wait_for(Channel::Stdout, "one\n").await;
    let pid = first.pid();
    detach(&tx, task).await;
    assert!(!process_gone(pid), "a kept exec was killed by the cancel");
    // It prints and exits while detached.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (end, second) = attach_collect(&ctx, "survivor").await;
    let status = exited(end, true);
    assert_eq!(status.code, Some(4));
    assert_eq!(second.pid(), pid);
    assert_eq!(second.text(Channel::Stdout), "two\n");
    assert_eq!(second.text(Channel::Stderr), "err\n");
    assert!(!first.text(Channel::Stdout).contains("two"));
    let sent = second.sent();
    assert!(
        sent.contains(&Sent::Eof(Channel::Stdout)) && sent.contains(&Sent::Eof(Channel::Stderr))
    );
    // Reported once: then forgotten.
    let (end, _) = attach_collect(&ctx, "survivor").await;
    assert!(matches!(end, Err(ExecError::NotKept { .. })), "{end:?}");
}

#[tokio::test]
async fn stdin_stays_open_across_a_detach() {
    let ctx = Arc::new(context());
    let mut request = kept(
        "reader",
        shell("read a; echo \"a=$a\"; read b; echo \"b=$b\""),
    );
    request.stdin = true;
    let first = Recorder::default();
    let (tx, task) = start_kept(&ctx, request, first.clone());
    tx.send(HostEvent::Stdin(Bytes::from_static(b"1\n")))
        .unwrap();
    first.wait_for(Channel::Stdout, "a=1\n").await;
    detach(&tx, task).await;
    let second = Recorder::default();
    let (tx, task) = start_attach(&ctx, "reader", second.clone());
    tx.send(HostEvent::Stdin(Bytes::from_static(b"2\n")))
        .unwrap();
    let status = exited(task.await.unwrap(), true);
    assert_eq!(status.code, Some(0));
    assert_eq!(second.text(Channel::Stdout), "b=2\n");
}

#[tokio::test]
async fn output_waits_in_the_pipe_while_detached_and_none_is_lost() {
    let ctx = Arc::new(context());
    // A slow first host reads a little, then goes away; the rest must block
    // the writer in the full pipe and arrive, whole, on the next stream.
    let first = Recorder {
        delay: Some(Duration::from_millis(20)),
        ..Recorder::default()
    };
    let request = kept("flood", argv(&["head", "-c", "300000", "/dev/zero"]));
    let (tx, task) = start_kept(&ctx, request, first.clone());
    first.wait_for(Channel::Stdout, "\0").await;
    let pid = first.pid();
    detach(&tx, task).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !process_gone(pid),
        "the writer should block on the full pipe"
    );
    let (end, second) = attach_collect(&ctx, "flood").await;
    assert_eq!(exited(end, true).code, Some(0));
    let total = first.output(Channel::Stdout).len() + second.output(Channel::Stdout).len();
    assert_eq!(total, 300_000);
    assert!(!second.output(Channel::Stdout).is_empty());
}

#[tokio::test]
async fn a_chunk_the_stream_refused_goes_to_the_next_one() {
    let ctx = Arc::new(context());
    let first = Recorder::default();
    let request = kept(
        "refused",
        shell("read _ <&-; sleep 0.2; echo late; sleep 0.3"),
    );
    let (_tx, task) = start_kept(&ctx, request, first.clone());
    first.started_pid().await;
    // The stream fails under the exec, as a reset one does mid-send.
    first.set_gone();
    let end = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(end, Ok(AttachEnd::Detached)), "{end:?}");
    let (end, second) = attach_collect(&ctx, "refused").await;
    assert_eq!(exited(end, true).code, Some(0));
    assert_eq!(second.text(Channel::Stdout), "late\n");
}

#[tokio::test]
async fn an_exit_whose_reply_was_not_sent_stays_kept() {
    let ctx = Arc::new(context());
    let first = Recorder::default();
    let (_tx, task) = start_kept(
        &ctx,
        kept("unsent", shell("echo bye; exit 9")),
        first.clone(),
    );
    assert_eq!(exited(task.await.unwrap(), false).code, Some(9));
    let (end, second) = attach_collect(&ctx, "unsent").await;
    assert_eq!(exited(end, true).code, Some(9));
    assert_eq!(second.text(Channel::Stdout), "");
    assert!(matches!(second.sent().first(), Some(Sent::Started(_))));
    let (end, _) = attach_collect(&ctx, "unsent").await;
    assert!(matches!(end, Err(ExecError::NotKept { .. })), "{end:?}");
}

#[tokio::test]
async fn a_second_attach_takes_over() {
    let ctx = Arc::new(context());
    let mut request = kept("shared", argv(&["cat"]));
    request.stdin = true;
    let first = Recorder::default();
    let (tx1, task1) = start_kept(&ctx, request, first.clone());
    tx1.send(HostEvent::Stdin(Bytes::from_static(b"a\n")))
        .unwrap();
    first.wait_for(Channel::Stdout, "a\n").await;
    let second = Recorder::default();
    let (tx2, task2) = start_attach(&ctx, "shared", second.clone());
    let end = tokio::time::timeout(Duration::from_secs(5), task1)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(end, Ok(AttachEnd::Replaced)), "{end:?}");
    assert_eq!(second.pid(), first.pid());
    tx2.send(HostEvent::Stdin(Bytes::from_static(b"b\n")))
        .unwrap();
    second.wait_for(Channel::Stdout, "b\n").await;
    // Signals go through the new stream.
    tx2.send(HostEvent::Signal {
        signal: libc::SIGTERM,
        group: false,
    })
    .unwrap();
    let status = exited(task2.await.unwrap(), true);
    assert_eq!(status.signal, Some(libc::SIGTERM));
    assert_eq!(first.text(Channel::Stdout), "a\n");
    assert_eq!(second.text(Channel::Stdout), "b\n");
}

#[tokio::test]
async fn kept_ids_are_unique_and_attach_needs_a_known_one() {
    let ctx = Arc::new(context());
    let (end, _) = attach_collect(&ctx, "never-started").await;
    assert!(matches!(end, Err(ExecError::NotKept { .. })), "{end:?}");
    let (end, _) = attach_collect(&ctx, "bad/id").await;
    assert!(matches!(end, Err(ExecError::Invalid { .. })), "{end:?}");

    let mut request = kept("dup", argv(&["cat"]));
    request.stdin = true;
    let first = Recorder::default();
    let (tx, task) = start_kept(&ctx, request.clone(), first.clone());
    first.started_pid().await;
    let (_tx2, second) = start_kept(&ctx, request.clone(), Recorder::default());
    let end = second.await.unwrap();
    assert!(matches!(end, Err(ExecError::AlreadyKept { .. })), "{end:?}");
    tx.send(HostEvent::StdinEof).unwrap();
    assert_eq!(exited(task.await.unwrap(), true).code, Some(0));
    // Once reported, the id is free again; a failed spawn frees it too.
    let (tx, task) = start_kept(&ctx, request, Recorder::default());
    tx.send(HostEvent::StdinEof).unwrap();
    assert_eq!(exited(task.await.unwrap(), true).code, Some(0));
    let (_tx, task) = start_kept(
        &ctx,
        kept("dup", argv(&["no-such-program-xyz"])),
        Recorder::default(),
    );
    assert!(matches!(task.await.unwrap(), Err(ExecError::Spawn { .. })));
    let (_tx, task) = start_kept(&ctx, kept("dup", argv(&["true"])), Recorder::default());
    assert_eq!(exited(task.await.unwrap(), true).code, Some(0));
}

#[tokio::test]
async fn a_kept_exec_on_a_terminal_can_be_resized_after_an_attach() {
    let ctx = Arc::new(context());
    let mut request = kept(
        "tty",
        on_tty(
            shell("stty size; read _; stty size; read _; echo done"),
            24,
            80,
        ),
    );
    request.stdin = true;
    let first = Recorder::default();
    let (tx, task) = start_kept(&ctx, request, first.clone());
    first.wait_for(Channel::Stdout, "24 80\r\n").await;
    // EOF on a terminal only ends this stream's input...
    tx.send(HostEvent::StdinEof).unwrap();
    detach(&tx, task).await;
    let second = Recorder::default();
    let (tx, task) = start_attach(&ctx, "tty", second.clone());
    tx.send(HostEvent::Resize {
        rows: 40,
        cols: 100,
    })
    .unwrap();
    // ...the next one types again.
    tx.send(HostEvent::Stdin(Bytes::from_static(b"\n")))
        .unwrap();
    second.wait_for(Channel::Stdout, "40 100\r\n").await;
    tx.send(HostEvent::Stdin(Bytes::from_static(b"\n")))
        .unwrap();
    assert_eq!(exited(task.await.unwrap(), true).code, Some(0));
    assert!(second.text(Channel::Stdout).ends_with("done\r\n"));
    assert_eq!(second.text(Channel::Stderr), "");
}
