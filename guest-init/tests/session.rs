//! The agent behind the real multiplexer: a host `Client` on one end of a
//! socket pair, the agent's session loop on the other, as over virtio-serial.

use std::sync::Arc;
use std::time::Duration;

use arrakis_guest_init::agent;
use arrakis_guest_init::cgroup::Cgroups;
use arrakis_guest_init::exec::ExecContext;
use arrakis_guest_init::handler::Agent;
use arrakis_guest_init::port::Port;
use arrakis_guest_init::supervisor;
use arrakis_protocol::{
    Channel, Client, ClientOptions, Command, ErrorCode, ExecRequest, ExitStatus, ProtocolError,
    ReadFileRequest, Request, Response, Stream, StreamEvent, StreamMessage, WriteFileRequest,
};
use bytes::Bytes;

async fn connect() -> Client {
    let (guest, host) = tokio::net::UnixStream::pair().unwrap();
    let port = Port::from_fd(guest.into_std().unwrap().into());
    let handler = Arc::new(Agent::new(
        ExecContext::new(
            supervisor::global(),
            Arc::new(Cgroups::disabled()),
            "/".into(),
        ),
        false,
    ));
    tokio::spawn(async move { agent::serve_port(&port, handler).await });
    Client::connect(host, ClientOptions::default())
        .await
        .unwrap()
}

/// Everything the guest sent on a stream until its reply.
#[derive(Debug, Default)]
struct Transcript {
    started: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    file: Vec<u8>,
    eofs: Vec<Channel>,
    reply: Option<Result<Response, arrakis_protocol::ErrorBody>>,
}

async fn collect(stream: &mut Stream) -> Transcript {
    let mut t = Transcript::default();
    loop {
        match stream.next().await.unwrap() {
            StreamEvent::Message(StreamMessage::Started { pid }) => t.started = Some(pid),
            StreamEvent::Data(Channel::Stdout, data) => t.stdout.extend_from_slice(&data),
            StreamEvent::Data(Channel::Stderr, data) => t.stderr.extend_from_slice(&data),
            StreamEvent::Data(Channel::File, data) => t.file.extend_from_slice(&data),
            StreamEvent::Eof(channel) => t.eofs.push(channel),
            StreamEvent::Closed(outcome) => {
                t.reply = Some(outcome);
                return t;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn shell(script: &str) -> Request {
    Request::Exec(ExecRequest {
        command: Command::Shell(script.into()),
        ..ExecRequest::default()
    })
}

#[tokio::test]
async fn ping_and_info() {
    let client = connect().await;
    assert_eq!(client.agent_version(), agent::AGENT_VERSION);
    assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
    match client.call(&Request::Info).await.unwrap() {
        Response::Info(info) => assert_eq!(info.agent_version, agent::AGENT_VERSION),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn exec_streams_output_then_replies() {
    let client = connect().await;
    let mut stream = client
        .open(&shell("echo hi; echo oops >&2; exit 3"))
        .await
        .unwrap();
    let t = collect(&mut stream).await;
    assert!(t.started.is_some());
    assert_eq!(t.stdout, b"hi\n");
    assert_eq!(t.stderr, b"oops\n");
    assert_eq!(t.eofs, [Channel::Stdout, Channel::Stderr]);
    assert_eq!(
        t.reply,
        Some(Ok(Response::Exited(ExitStatus {
            code: Some(3),
            signal: None,
            timed_out: false
        })))
    );
}

#[tokio::test]
async fn large_output_and_stdin_pass_flow_control() {
    let client = connect().await;
    let mut stream = client
        .open(&Request::Exec(ExecRequest {
            command: Command::Argv(vec!["seq".into(), "1".into(), "800000".into()]),
            ..ExecRequest::default()
        }))
        .await
        .unwrap();
    let t = collect(&mut stream).await;
    let expected: String = (1..=800_000).map(|i| format!("{i}\n")).collect();
    assert!(t.stdout == expected.as_bytes(), "{} bytes", t.stdout.len());

    let stream = client
        .open(&Request::Exec(ExecRequest {
            command: Command::Argv(vec!["cat".into()]),
            stdin: true,
            ..ExecRequest::default()
        }))
        .await
        .unwrap();
    let input: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let (sender, mut receiver) = stream.split();
    let writer = tokio::spawn(async move {
        sender
            .send_data(Channel::Stdin, Bytes::from(input))
            .await
            .unwrap();
        sender.send_eof(Channel::Stdin).await.unwrap();
        sender
    });
    let mut echoed = Vec::new();
    let reply = loop {
        match receiver.next().await.unwrap() {
            StreamEvent::Data(Channel::Stdout, data) => echoed.extend_from_slice(&data),
            StreamEvent::Closed(outcome) => break outcome,
            _ => {}
        }
    };
    let _sender = writer.await.unwrap();
    assert_eq!(echoed.len(), 2_000_000);
    assert!(echoed
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 253) as u8));
    assert!(matches!(
        reply,
        Ok(Response::Exited(ExitStatus { code: Some(0), .. }))
    ));
}

#[tokio::test]
async fn files_round_trip_and_errors() {
    let client = connect().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/blob.bin").display().to_string();
    let content: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(31) >> 2) as u8)
        .collect();

    let stream = client
        .open(&Request::WriteFile(WriteFileRequest {
            path: path.clone(),
            mode: Some(0o600),
            create_parents: true,
            append: false,
        }))
        .await
        .unwrap();
    let (sender, mut receiver) = stream.split();
    let body = Bytes::from(content.clone());
    let writer = tokio::spawn(async move {
        sender.send_data(Channel::File, body).await.unwrap();
        sender.send_eof(Channel::File).await.unwrap();
        sender
    });
    let reply = loop {
        if let StreamEvent::Closed(outcome) = receiver.next().await.unwrap() {
            break outcome;
        }
    };
    let _sender = writer.await.unwrap();
    assert_eq!(reply, Ok(Response::FileWritten { bytes: 1_500_000 }));

    let mut stream = client
        .open(&Request::ReadFile(ReadFileRequest {
            path: path.clone(),
            offset: 0,
            length: None,
        }))
        .await
        .unwrap();
    let t = collect(&mut stream).await;
    assert!(t.file == content, "read back {} bytes", t.file.len());
    assert_eq!(t.reply, Some(Ok(Response::FileRead { bytes: 1_500_000 })));

    let missing = dir.path().join("missing").display().to_string();
    let err = client
        .call(&Request::ReadFile(ReadFileRequest {
            path: missing.clone(),
            offset: 0,
            length: None,
        }))
        .await
        .unwrap_err();
    match err {
        ProtocolError::Remote(body) => {
            assert_eq!(body.code, ErrorCode::NotFound);
            assert!(body.message.contains(&missing), "{}", body.message);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn abandoned_exec_is_killed() {
    let client = connect().await;
    let mut stream = client.open(&shell("sleep 100")).await.unwrap();
    let pid = match stream.next().await.unwrap() {
        StreamEvent::Message(StreamMessage::Started { pid }) => pid,
        other => panic!("unexpected {other:?}"),
    };
    // Dropping the host's stream resets it; the guest kills the tree.
    drop(stream);
    let proc_dir = format!("/proc/{pid}");
    for _ in 0..300 {
        if !std::path::Path::new(&proc_dir).exists() {
            // The agent still answers afterwards.
            assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pid {pid} survived the reset");
}

fn connect_to(port: u16) -> Request {
    Request::Connect(arrakis_protocol::ConnectRequest { port })
}

/// Opens a `connect` stream and waits for `Connected`.
async fn tunnel(client: &Client, port: u16) -> Stream {
    let mut stream = client.open(&connect_to(port)).await.unwrap();
    match stream.next().await.unwrap() {
        StreamEvent::Message(StreamMessage::Connected) => stream,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn connect_tunnels_bytes_both_ways_with_half_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = connect().await;
    // An echo server that answers only after the client's EOF, then with a
    // trailer: this needs the host's EOF to arrive as a half-close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.unwrap();
        socket.write_all(&got).await.unwrap();
        socket
            .write_all(format!("<{} bytes>", got.len()).as_bytes())
            .await
            .unwrap();
        got.len()
    });
    let input: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let (sender, mut receiver) = tunnel(&client, port).await.split();
    let body = Bytes::from(input.clone());
    let writer = tokio::spawn(async move {
        sender.send_data(Channel::Stdin, body).await.unwrap();
        sender.send_eof(Channel::Stdin).await.unwrap();
        sender
    });
    let mut echoed = Vec::new();
    let mut eofs = Vec::new();
    let reply = loop {
        match receiver.next().await.unwrap() {
            StreamEvent::Data(Channel::Stdout, data) => echoed.extend_from_slice(&data),
            StreamEvent::Eof(channel) => eofs.push(channel),
            StreamEvent::Closed(outcome) => break outcome,
            other => panic!("unexpected {other:?}"),
        }
    };
    let _sender = writer.await.unwrap();
    assert_eq!(server.await.unwrap(), input.len());
    assert_eq!(reply, Ok(Response::Done));
    assert_eq!(eofs, [Channel::Stdout]);
    let trailer = format!("<{} bytes>", input.len());
    assert_eq!(echoed.len(), input.len() + trailer.len());
    assert!(echoed[..input.len()] == input[..], "echo differs");
    assert_eq!(&echoed[input.len()..], trailer.as_bytes());
}

#[tokio::test]
async fn connect_waits_for_both_directions_before_done() {
    use tokio::io::AsyncWriteExt;
    let client = connect().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // A server that talks first and closes at once.
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"hello\n").await.unwrap();
    });
    let mut stream = tunnel(&client, port).await;
    assert_eq!(
        stream.next().await.unwrap(),
        StreamEvent::Data(Channel::Stdout, Bytes::from_static(b"hello\n"))
    );
    assert_eq!(
        stream.next().await.unwrap(),
        StreamEvent::Eof(Channel::Stdout)
    );
    server.await.unwrap();
    // The host's direction is still open: no reply yet.
    let early = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(early.is_err(), "replied before the host's EOF: {early:?}");
    stream.send_eof(Channel::Stdin).await.unwrap();
    assert_eq!(
        stream.next().await.unwrap(),
        StreamEvent::Closed(Ok(Response::Done))
    );
}

#[tokio::test]
async fn connect_to_a_closed_port_is_refused() {
    let client = connect().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    match client.call(&connect_to(port)).await {
        Err(ProtocolError::Remote(body)) => {
            assert_eq!(body.code, ErrorCode::Unavailable);
            assert!(
                body.message
                    .contains(&format!("connection refused on port {port}")),
                "{}",
                body.message
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    match client.call(&connect_to(0)).await {
        Err(ProtocolError::Remote(body)) => assert_eq!(body.code, ErrorCode::InvalidArgument),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reset_tunnel_closes_the_guest_socket_even_when_stuck() {
    let client = connect().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stream = tunnel(&client, port).await;
    let (socket, _) = listener.accept().await.unwrap();
    // The application reads nothing: once the socket's buffers are full the
    // agent blocks writing into it and the host blocks on credit.
    let (sender, receiver) = stream.split();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let flood = tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        while sender
            .send_data(Channel::Stdin, chunk.clone())
            .await
            .is_ok()
        {
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    // Dropping the host's stream resets it; the agent must abort the
    // connection (a TCP reset) although nothing moves on it.
    flood.abort();
    let _ = flood.await;
    drop(receiver);
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(error) = socket.take_error().unwrap() {
                return error;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the guest socket stayed open after the reset");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
}

/// The agent on one end of a socket pair; the host end is returned so a
/// test can greet it more than once (as new QEMUs do after a restore).
fn serve_agent() -> std::os::unix::net::UnixStream {
    let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
    guest.set_nonblocking(true).unwrap();
    let port = Port::from_fd(guest.into());
    let handler = Arc::new(Agent::new(
        ExecContext::new(
            supervisor::global(),
            Arc::new(Cgroups::disabled()),
            "/".into(),
        ),
        false,
    ));
    tokio::spawn(async move { agent::serve_port(&port, handler).await });
    host
}

/// A host session on a copy of `host`, through a relay; aborting the relay
/// makes that host vanish without the agent seeing a reset or an EOF.
async fn relayed_client(
    host: &std::os::unix::net::UnixStream,
) -> (Client, tokio::task::JoinHandle<()>) {
    let copy = host.try_clone().unwrap();
    copy.set_nonblocking(true).unwrap();
    let mut socket = tokio::net::UnixStream::from_std(copy).unwrap();
    let (near, mut far) = tokio::io::duplex(256 * 1024);
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut far, &mut socket).await;
    });
    let client = Client::connect(near, ClientOptions::default())
        .await
        .unwrap();
    (client, relay)
}

fn kept_shell(id: &str, script: &str) -> Request {
    Request::Exec(ExecRequest {
        command: Command::Shell(script.into()),
        keep: Some(id.into()),
        stdin: true,
        ..ExecRequest::default()
    })
}

fn attach(id: &str) -> Request {
    Request::Attach(arrakis_protocol::AttachRequest { id: id.into() })
}

async fn started(stream: &mut Stream) -> u32 {
    match stream.next().await.unwrap() {
        StreamEvent::Message(StreamMessage::Started { pid }) => pid,
        other => panic!("unexpected {other:?}"),
    }
}

async fn stdout_line(stream: &mut Stream) -> Bytes {
    match stream.next().await.unwrap() {
        StreamEvent::Data(Channel::Stdout, data) => data,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_kept_exec_survives_a_reset_and_is_attached_again() {
    let client = connect().await;
    let mut stream = client
        .open(&kept_shell(
            "k-reset",
            "echo one; read x; echo \"two $x\"; exit 6",
        ))
        .await
        .unwrap();
    let pid = started(&mut stream).await;
    assert_eq!(stdout_line(&mut stream).await, "one\n");
    drop(stream);
    // A second exec under the same id is refused while it is kept.
    match client.call(&kept_shell("k-reset", "true")).await {
        Err(ProtocolError::Remote(body)) => assert_eq!(body.code, ErrorCode::AlreadyExists),
        other => panic!("unexpected {other:?}"),
    }
    let mut first = client.open(&attach("k-reset")).await.unwrap();
    assert_eq!(started(&mut first).await, pid);
    // Another attach takes over; the first stream is told why.
    let mut second = client.open(&attach("k-reset")).await.unwrap();
    assert_eq!(started(&mut second).await, pid);
    match first.next().await.unwrap() {
        StreamEvent::Closed(Err(body)) => {
            assert_eq!(body.code, ErrorCode::Cancelled);
            assert!(
                body.message.contains("attached elsewhere"),
                "{}",
                body.message
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    second
        .send_data(Channel::Stdin, Bytes::from_static(b"x\n"))
        .await
        .unwrap();
    let t = collect(&mut second).await;
    assert_eq!(t.stdout, b"two x\n");
    assert_eq!(
        t.reply,
        Some(Ok(Response::Exited(ExitStatus {
            code: Some(6),
            signal: None,
            timed_out: false
        })))
    );
    // Reported: forgotten.
    match client.call(&attach("k-reset")).await {
        Err(ProtocolError::Remote(body)) => assert_eq!(body.code, ErrorCode::NotFound),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_new_host_session_detaches_kept_execs_and_kills_the_others() {
    let host = serve_agent();
    let (old, relay) = relayed_client(&host).await;
    let mut kept = old
        .open(&kept_shell(
            "k-session",
            "echo one; read x; echo \"two $x\"",
        ))
        .await
        .unwrap();
    let kept_pid = started(&mut kept).await;
    assert_eq!(stdout_line(&mut kept).await, "one\n");
    let mut plain = old.open(&shell("sleep 100")).await.unwrap();
    let plain_pid = started(&mut plain).await;
    // The old host vanishes without a word; a new one greets the agent.
    relay.abort();
    let copy = host.try_clone().unwrap();
    copy.set_nonblocking(true).unwrap();
    let options = ClientOptions {
        regreet_after: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let new = Client::connect(tokio::net::UnixStream::from_std(copy).unwrap(), options)
        .await
        .unwrap();
    let plain_dir = format!("/proc/{plain_pid}");
    for _ in 0..300 {
        if !std::path::Path::new(&plain_dir).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !std::path::Path::new(&plain_dir).exists(),
        "the plain exec survived the new session"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{kept_pid}")).exists(),
        "the kept exec was killed"
    );
    let mut stream = new.open(&attach("k-session")).await.unwrap();
    assert_eq!(started(&mut stream).await, kept_pid);
    stream
        .send_data(Channel::Stdin, Bytes::from_static(b"y\n"))
        .await
        .unwrap();
    let t = collect(&mut stream).await;
    assert_eq!(t.stdout, b"two y\n");
    assert!(matches!(
        t.reply,
        Some(Ok(Response::Exited(ExitStatus { code: Some(0), .. })))
    ));
    drop((kept, plain, old));
}

#[tokio::test]
async fn a_tty_exec_over_the_session_takes_resizes() {
    let client = connect().await;
    let mut stream = client
        .open(&Request::Exec(ExecRequest {
            command: Command::Shell("stty size; read _; stty size".into()),
            tty: Some(arrakis_protocol::TtySize { rows: 10, cols: 20 }),
            stdin: true,
            ..ExecRequest::default()
        }))
        .await
        .unwrap();
    started(&mut stream).await;
    assert_eq!(stdout_line(&mut stream).await, "10 20\r\n");
    stream
        .send_message(&StreamMessage::Resize { rows: 30, cols: 90 })
        .await
        .unwrap();
    stream
        .send_data(Channel::Stdin, Bytes::from_static(b"\n"))
        .await
        .unwrap();
    let t = collect(&mut stream).await;
    assert_eq!(t.stdout, b"\r\n30 90\r\n");
    assert!(t.stderr.is_empty());
    assert_eq!(t.eofs, [Channel::Stdout, Channel::Stderr]);
    assert!(matches!(
        t.reply,
        Some(Ok(Response::Exited(ExitStatus { code: Some(0), .. })))
    ));
}
