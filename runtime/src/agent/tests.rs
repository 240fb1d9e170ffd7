//! The agent client against a fake guest served by the real protocol crate
//! over a unix socket.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrakis_protocol::{serve, Command, ErrorCode, Handler};
use tokio::net::UnixListener;

use super::*;

#[derive(Default)]
struct FakeGuest {
    files: Mutex<HashMap<String, Vec<u8>>>,
    requests: AtomicUsize,
    /// Exec streams the host reset.
    resets: AtomicUsize,
}

fn fail(code: ErrorCode, message: &str) -> arrakis_protocol::Outcome {
    Err(ErrorBody::new(code, message))
}

impl FakeGuest {
    async fn exec(&self, argv: Vec<String>, stream: Stream) {
        let Some(program) = argv.first().cloned() else {
            let _ = stream
                .close(fail(ErrorCode::InvalidArgument, "empty argv"))
                .await;
            return;
        };
        if program == "missing" {
            let _ = stream
                .close(fail(ErrorCode::NotFound, "no such command"))
                .await;
            return;
        }
        let _ = stream
            .send_message(&StreamMessage::Started { pid: 42 })
            .await;
        self.run(&program, &argv, stream).await;
    }

    /// The process of an exec or attach stream, after `Started`.
    async fn run(&self, program: &str, argv: &[String], mut stream: Stream) {
        let mut status = ExitStatus {
            code: Some(0),
            ..ExitStatus::default()
        };
        match program {
            "echo" => {
                let out = Bytes::from(argv[1..].join(" "));
                let _ = stream.send_data(Channel::Stdout, out).await;
                let _ = stream
                    .send_data(Channel::Stderr, Bytes::from_static(b"warn"))
                    .await;
                status.code = Some(3);
            }
            "big" => {
                let chunk = Bytes::from(vec![b'a'; 256 * 1024]);
                for _ in 0..12 {
                    let _ = stream.send_data(Channel::Stdout, chunk.clone()).await;
                }
            }
            "cat" => loop {
                match stream.next().await {
                    Ok(StreamEvent::Data(Channel::Stdin, data)) => {
                        let _ = stream.send_data(Channel::Stdout, data).await;
                    }
                    Ok(StreamEvent::Message(StreamMessage::Resize { rows, cols })) => {
                        let text = Bytes::from(format!("resize {rows}x{cols}"));
                        let _ = stream.send_data(Channel::Stdout, text).await;
                    }
                    Ok(StreamEvent::Message(StreamMessage::Signal { signal, .. })) => {
                        status = ExitStatus {
                            code: None,
                            signal: Some(signal),
                            timed_out: false,
                        };
                        break;
                    }
                    Ok(StreamEvent::Eof(Channel::Stdin)) => break,
                    Ok(StreamEvent::Reset) | Err(_) => {
                        self.resets.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                }
            },
            _ => {}
        }
        let _ = stream.send_eof(Channel::Stdout).await;
        let _ = stream.send_eof(Channel::Stderr).await;
        let _ = stream.close(Ok(Response::Exited(status))).await;
    }

    async fn write(&self, path: String, mut stream: Stream) {
        if path.starts_with("/ro/") {
            let _ = stream
                .close(fail(ErrorCode::PermissionDenied, "read-only"))
                .await;
            return;
        }
        let mut content = Vec::new();
        loop {
            match stream.next().await {
                Ok(StreamEvent::Data(Channel::File, data)) => content.extend_from_slice(&data),
                Ok(StreamEvent::Eof(Channel::File)) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let bytes = content.len() as u64;
        self.files.lock().unwrap().insert(path, content);
        let _ = stream.close(Ok(Response::FileWritten { bytes })).await;
    }

    async fn read(&self, path: String, stream: Stream) {
        let content = self.files.lock().unwrap().get(&path).cloned();
        let Some(content) = content else {
            let _ = stream
                .close(fail(ErrorCode::NotFound, "no such file"))
                .await;
            return;
        };
        for chunk in content.chunks(100_000) {
            let _ = stream
                .send_data(Channel::File, Bytes::copy_from_slice(chunk))
                .await;
        }
        let _ = stream.send_eof(Channel::File).await;
        let bytes = content.len() as u64;
        let _ = stream.close(Ok(Response::FileRead { bytes })).await;
    }
}

impl Handler for FakeGuest {
    fn handle(&self, request: Request, stream: Stream) -> impl Future<Output = ()> + Send {
        self.requests.fetch_add(1, Ordering::SeqCst);
        async move {
            match request {
                Request::Ping => drop(stream.close(Ok(Response::Pong)).await),
                Request::Exec(ExecRequest {
                    command: Command::Argv(argv),
                    ..
                }) => self.exec(argv, stream).await,
                Request::Attach(req) if req.id == "kept" => {
                    let _ = stream
                        .send_message(&StreamMessage::Started { pid: 43 })
                        .await;
                    self.run("cat", &[], stream).await;
                }
                Request::Attach(req) => {
                    let message = format!("no kept process {:?}", req.id);
                    drop(stream.close(fail(ErrorCode::NotFound, &message)).await)
                }
                Request::WriteFile(req) => self.write(req.path, stream).await,
                Request::ReadFile(req) => self.read(req.path, stream).await,
                _ => drop(stream.close(fail(ErrorCode::Unsupported, "fake")).await),
            }
        }
    }
}

/// Serves `guest` on `<dir>/agent.sock`, one host connection after another.
fn spawn_guest(socket: &Path, guest: Arc<FakeGuest>) {
    let listener = UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let _ = serve(conn, guest.clone(), "fake-1").await;
        }
    });
}

async fn connected() -> (tempfile::TempDir, Arc<FakeGuest>, AgentClient) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let guest = Arc::new(FakeGuest::default());
    spawn_guest(&socket, guest.clone());
    let agent = AgentClient::connect(&socket, Duration::from_secs(5))
        .await
        .unwrap();
    (dir, guest, agent)
}

fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(args.iter().map(|s| s.to_string()).collect()),
        ..ExecRequest::default()
    }
}

#[tokio::test]
async fn exec_collects_and_separates_output() {
    let (_dir, _guest, agent) = connected().await;
    assert_eq!(agent.agent_version(), "fake-1");
    agent.ping().await.unwrap();
    let out = agent
        .exec(argv(&["echo", "hi", "there"]), ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hi there");
    assert_eq!(out.stderr, b"warn");
    assert_eq!(out.status.code, Some(3));
    assert!(!out.stdout_truncated && !out.stderr_truncated);
}

#[tokio::test]
async fn exec_caps_collected_output_but_drains_it() {
    let (_dir, _guest, agent) = connected().await;
    let options = ExecOptions {
        max_output_bytes: 1_000_000,
    };
    let out = agent.exec(argv(&["big"]), options).await.unwrap();
    assert_eq!(out.stdout.len(), 1_000_000);
    assert!(out.stdout_truncated);
    assert_eq!(out.status.code, Some(0));
    // The session is still usable afterwards.
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn exec_errors_keep_the_guest_code() {
    let (_dir, _guest, agent) = connected().await;
    let err = agent
        .exec(argv(&["missing"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Remote { body, .. } if body.code == ErrorCode::NotFound),
        "{err:?}"
    );
    let err = agent
        .exec_stream(argv(&["missing"]))
        .await
        .err()
        .expect("spawn failure");
    assert!(matches!(err, AgentError::Remote { .. }), "{err:?}");
}

#[tokio::test]
async fn exec_stream_pipes_stdin_and_signals() {
    let (_dir, _guest, agent) = connected().await;
    let mut session = agent
        .exec_stream(ExecRequest {
            stdin: true,
            ..argv(&["cat"])
        })
        .await
        .unwrap();
    assert_eq!(session.pid(), 42);
    // Without a terminal a resize is not even sent (older agents do not
    // know the message).
    session.resize(10, 10).await.unwrap();
    let stdin = session.stdin();
    stdin.write(Bytes::from_static(b"ping")).await.unwrap();
    assert_eq!(
        session.next().await.unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"ping"))
    );
    stdin.write(Bytes::from_static(b"more")).await.unwrap();
    stdin.close().await.unwrap();
    let out = session.wait(ExecOptions::default()).await.unwrap();
    assert_eq!(out.stdout, b"more");
    assert_eq!(out.status.code, Some(0));

    let mut session = agent
        .exec_stream(ExecRequest {
            stdin: true,
            ..argv(&["cat"])
        })
        .await
        .unwrap();
    session.signal(15, true).await.unwrap();
    match session.next().await.unwrap() {
        ExecEvent::Exited(status) => assert_eq!(status.signal, Some(15)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn files_round_trip_in_chunks() {
    let (_dir, guest, agent) = connected().await;
    let content: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let written = agent
        .write_file(
            "/tmp/blob",
            &mut content.as_slice(),
            WriteOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(written, content.len() as u64);
    assert_eq!(guest.files.lock().unwrap()["/tmp/blob"], content);
    let mut back = Vec::new();
    let read = agent.read_file("/tmp/blob", &mut back).await.unwrap();
    assert_eq!(read, content.len() as u64);
    assert_eq!(back, content);
    let err = agent
        .read_file("/tmp/none", &mut Vec::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Remote { body, .. } if body.code == ErrorCode::NotFound),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_refused_write_reports_the_guest_reason() {
    let (_dir, _guest, agent) = connected().await;
    let content = vec![0u8; 4 * 1024 * 1024];
    let err = agent
        .write_file("/ro/x", &mut content.as_slice(), WriteOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Remote { body, .. } if body.code == ErrorCode::PermissionDenied),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_input_is_rejected_before_sending() {
    let (_dir, guest, agent) = connected().await;
    let before = guest.requests.load(Ordering::SeqCst);
    for path in ["", "a\0b", "../etc/passwd", "x/../../y"] {
        let err = agent.stat(path).await.unwrap_err();
        assert!(
            matches!(err, AgentError::InvalidPath(_)),
            "{path:?}: {err:?}"
        );
        assert!(err.to_string().starts_with("invalid path"), "{err}");
        let err = agent
            .write_file(path, &mut &b"x"[..], WriteOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::InvalidPath(_)),
            "{path:?}: {err:?}"
        );
    }
    let err = agent
        .exec(argv(&[]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
    let err = agent.chmod("/x", 0o17777).await.unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
    assert_eq!(guest.requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn wait_ready_retries_until_the_agent_listens() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let later = socket.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        spawn_guest(&later, Arc::new(FakeGuest::default()));
    });
    let agent = AgentClient::wait_ready(&socket, Duration::from_secs(10), || true)
        .await
        .unwrap();
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn wait_ready_gives_up_when_the_vm_dies_or_time_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let start = Instant::now();
    let err = AgentClient::wait_ready(&socket, Duration::from_secs(30), || false)
        .await
        .unwrap_err();
    assert!(matches!(err, ReadyError::VmExited(_)), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let err = AgentClient::wait_ready(&socket, Duration::from_millis(400), || true)
        .await
        .unwrap_err();
    match err {
        ReadyError::Timeout { last_error, .. } => {
            assert!(last_error.contains("agent.sock"), "{last_error}")
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn attach_and_control_from_other_tasks() {
    let (_dir, _guest, agent) = connected().await;
    let mut session = agent.attach("kept").await.unwrap();
    assert_eq!(session.pid(), 43);
    let control = session.control();
    let writer = {
        let control = control.clone();
        tokio::spawn(async move {
            control.resize(30, 100).await.unwrap();
            control
                .write_stdin(Bytes::from_static(b"ping"))
                .await
                .unwrap();
        })
    };
    assert_eq!(
        session.next().await.unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"resize 30x100"))
    );
    assert_eq!(
        session.next().await.unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"ping"))
    );
    writer.await.unwrap();
    session.resize(5, 6).await.unwrap();
    assert_eq!(
        session.next().await.unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"resize 5x6"))
    );
    control.close_stdin().await.unwrap();
    let out = session.wait(ExecOptions::default()).await.unwrap();
    assert_eq!(out.status.code, Some(0));
    // The stream is over: the handle says so instead of hanging.
    assert!(control
        .write_stdin(Bytes::from_static(b"late"))
        .await
        .is_err());

    let session = agent.attach("kept").await.unwrap();
    let control = session.control();
    control.signal(9, true).await.unwrap();
    let out = session.wait(ExecOptions::default()).await.unwrap();
    assert_eq!(out.status.signal, Some(9));
}

#[tokio::test]
async fn attach_to_an_unknown_id_keeps_the_guest_code() {
    let (_dir, guest, agent) = connected().await;
    let err = agent.attach("gone").await.err().expect("not found");
    assert!(
        matches!(&err, AgentError::Remote { op: "attach", body } if body.code == ErrorCode::NotFound),
        "{err:?}"
    );
    let before = guest.requests.load(Ordering::SeqCst);
    for bad in ["", "a b", "../x", &"k".repeat(65)] {
        let err = agent.attach(bad).await.err().expect("invalid");
        assert!(
            matches!(err, AgentError::InvalidRequest(_)),
            "{bad:?}: {err:?}"
        );
    }
    assert_eq!(guest.requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn dropping_a_session_resets_it_even_while_handles_live() {
    let (_dir, guest, agent) = connected().await;
    let session = agent
        .exec_stream(ExecRequest {
            stdin: true,
            ..argv(&["cat"])
        })
        .await
        .unwrap();
    let (control, stdin) = (session.control(), session.stdin());
    drop(session);
    for _ in 0..200 {
        if guest.resets.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        guest.resets.load(Ordering::SeqCst),
        1,
        "the guest saw no reset"
    );
    assert!(control.write_stdin(Bytes::from_static(b"x")).await.is_err());
    assert!(stdin.close().await.is_err());
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn new_exec_fields_are_checked_before_sending() {
    let (_dir, guest, agent) = connected().await;
    let before = guest.requests.load(Ordering::SeqCst);
    let rlimit = |resource: &str, soft, hard| arrakis_protocol::Rlimit {
        resource: resource.into(),
        soft,
        hard,
    };
    let bad = [
        ExecRequest {
            keep: Some("no/slash".into()),
            ..argv(&["true"])
        },
        ExecRequest {
            tty: Some(arrakis_protocol::TtySize { rows: 0, cols: 80 }),
            ..argv(&["true"])
        },
        ExecRequest {
            rlimits: vec![rlimit("RLIMIT_FOO", 1, 1)],
            ..argv(&["true"])
        },
        ExecRequest {
            rlimits: vec![rlimit("RLIMIT_NOFILE", 2, 1)],
            ..argv(&["true"])
        },
    ];
    for request in bad {
        let err = agent
            .exec_stream(request.clone())
            .await
            .err()
            .expect("rejected");
        assert!(
            matches!(err, AgentError::InvalidRequest(_)),
            "{request:?}: {err:?}"
        );
    }
    let err = agent
        .exec_stream(ExecRequest {
            rlimits: vec![rlimit("RLIMIT_FOO", 1, 1)],
            ..argv(&["true"])
        })
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("RLIMIT_NOFILE"),
        "lists the accepted names: {err}"
    );
    assert_eq!(guest.requests.load(Ordering::SeqCst), before);
    // A valid one goes out.
    let session = agent
        .exec_stream(ExecRequest {
            keep: Some("init".into()),
            tty: Some(arrakis_protocol::TtySize { rows: 24, cols: 80 }),
            rlimits: vec![rlimit("RLIMIT_NOFILE", 1024, 4096)],
            groups: vec![10],
            clear_env: true,
            ..argv(&["echo", "ok"])
        })
        .await
        .unwrap();
    let err = session.resize(0, 10).await.unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
    let out = session.wait(ExecOptions::default()).await.unwrap();
    assert_eq!(out.stdout, b"ok");
}
