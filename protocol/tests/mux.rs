//! The multiplexer end to end over an in-memory byte stream: a real
//! `Client` against a real `serve` loop.

use std::sync::Arc;
use std::time::Duration;

use arrakis_protocol::frame::FrameReader;
use arrakis_protocol::frame::{Frame, Kind, SYNC};
use arrakis_protocol::{
    serve, Channel, Client, ClientOptions, ErrorBody, ErrorCode, ExecRequest, Handler,
    ProtocolError, Request, Response, Stream, StreamEvent, StreamMessage,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes stdin to stdout for `exec`, answers ping, and fails `stat`.
struct Echo;

impl Handler for Echo {
    async fn handle(&self, request: Request, mut stream: Stream) {
        match request {
            Request::Ping => {
                let _ = stream.close(Ok(Response::Pong)).await;
            }
            Request::Exec(_) => {
                let _ = stream
                    .send_message(&StreamMessage::Started { pid: 42 })
                    .await;
                let mut total = 0u64;
                loop {
                    match stream.next().await {
                        Ok(StreamEvent::Data(Channel::Stdin, bytes)) => {
                            total += bytes.len() as u64;
                            if stream.send_data(Channel::Stdout, bytes).await.is_err() {
                                return;
                            }
                        }
                        Ok(StreamEvent::Eof(Channel::Stdin)) => break,
                        Ok(StreamEvent::Reset) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                let _ = stream.send_eof(Channel::Stdout).await;
                let _ = stream
                    .close(Ok(Response::FileWritten { bytes: total }))
                    .await;
            }
            Request::Stat(path) => {
                let body = ErrorBody::new(ErrorCode::NotFound, format!("{} not found", path.path));
                let _ = stream.close(Err(body)).await;
            }
            // Dropped without a reply: the mux must answer for us.
            _ => {}
        }
    }
}

async fn pair() -> (Client, tokio::task::JoinHandle<Result<(), ProtocolError>>) {
    let (host, guest) = tokio::io::duplex(256 * 1024);
    let server = tokio::spawn(serve(guest, Arc::new(Echo), "test-agent"));
    let client = Client::connect(host, ClientOptions::default())
        .await
        .unwrap();
    (client, server)
}

fn exec() -> Request {
    Request::Exec(ExecRequest {
        stdin: true,
        ..ExecRequest::default()
    })
}

#[tokio::test]
async fn unary_calls_and_remote_errors() {
    let (client, _server) = pair().await;
    assert_eq!(client.agent_version(), "test-agent");
    assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
    let stat = Request::Stat(arrakis_protocol::PathRequest {
        path: "/nope".into(),
    });
    match client.call(&stat).await {
        Err(ProtocolError::Remote(body)) => {
            assert_eq!(body.code, ErrorCode::NotFound);
            assert_eq!(body.message, "/nope not found");
        }
        other => panic!("unexpected {other:?}"),
    }
    match client.call(&Request::Info).await {
        Err(ProtocolError::Remote(body)) => assert_eq!(body.code, ErrorCode::Internal),
        other => panic!("unexpected {other:?}"),
    }
}

async fn echo_through(client: &Client, payload: Bytes) -> Bytes {
    let (tx, mut rx) = client.open(&exec()).await.unwrap().split();
    let writer = tokio::spawn(async move {
        tx.send_data(Channel::Stdin, payload).await.unwrap();
        tx.send_eof(Channel::Stdin).await.unwrap();
        tx
    });
    let mut out = BytesMut::new();
    let mut started = false;
    loop {
        match rx.next().await.unwrap() {
            StreamEvent::Message(StreamMessage::Started { pid }) => {
                assert_eq!(pid, 42);
                started = true;
            }
            StreamEvent::Data(Channel::Stdout, bytes) => out.extend_from_slice(&bytes),
            StreamEvent::Eof(Channel::Stdout) => {}
            StreamEvent::Closed(Ok(Response::FileWritten { bytes })) => {
                assert_eq!(bytes as usize, out.len());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(started);
    let _tx = writer.await.unwrap();
    assert!(matches!(rx.next().await, Err(ProtocolError::StreamClosed)));
    out.freeze()
}

#[tokio::test]
async fn bulk_data_flows_both_ways_under_flow_control() {
    let (client, _server) = pair().await;
    // Far more than the window, so credit must be returned for it to finish.
    let payload: Bytes = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let echoed = echo_through(&client, payload.clone()).await;
    assert_eq!(echoed, payload);
}

#[tokio::test]
async fn many_concurrent_streams_stay_apart() {
    let (client, _server) = pair().await;
    let tasks: Vec<_> = (0..20u8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let payload = Bytes::from(vec![i; 100_000 + i as usize]);
                (echo_through(&client, payload.clone()).await, payload)
            })
        })
        .collect();
    for task in tasks {
        let (got, want) = task.await.unwrap();
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn session_ends_when_the_guest_goes_away() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    // A hand-written guest that answers the greeting, starts one stream and vanishes.
    let fake_guest = tokio::spawn(async move {
        let (read_half, mut write_half) = tokio::io::split(guest);
        let mut reader = FrameReader::new(read_half);
        assert!(reader.sync().await.unwrap());
        let hello: serde_json::Value = reader
            .read_frame()
            .await
            .unwrap()
            .unwrap()
            .parse_json()
            .unwrap();
        let mut out = BytesMut::new();
        out.extend_from_slice(&SYNC);
        let ack = serde_json::json!({"version": 1, "nonce": hello["nonce"], "agent_version": "v"});
        Frame::json(0, Kind::HelloAck, &ack).encode(&mut out);
        write_half.write_all(&out).await.unwrap();
        let open = reader.read_frame().await.unwrap().unwrap();
        assert_eq!(open.kind, Kind::Open);
        out.clear();
        Frame::json(
            open.stream,
            Kind::Message,
            &StreamMessage::Started { pid: 1 },
        )
        .encode(&mut out);
        write_half.write_all(&out).await.unwrap();
    });
    let client = Client::connect(host, ClientOptions::default())
        .await
        .unwrap();
    let mut stream = client.open(&exec()).await.unwrap();
    assert!(matches!(
        stream.next().await.unwrap(),
        StreamEvent::Message(StreamMessage::Started { pid: 1 })
    ));
    fake_guest.await.unwrap();
    assert!(matches!(
        stream.next().await,
        Err(ProtocolError::Disconnected)
    ));
    tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    assert!(matches!(
        client.call(&Request::Ping).await,
        Err(ProtocolError::Disconnected)
    ));
}

#[tokio::test]
async fn serve_returns_at_eof_without_a_host() {
    let (host, guest) = tokio::io::duplex(1024);
    drop(host);
    serve(guest, Arc::new(Echo), "v").await.unwrap();
}

/// A host that vanished mid-frame leaves junk in the byte stream; the next
/// host's greeting must still be found, without the guest seeing EOF.
#[tokio::test]
async fn a_new_greeting_mid_session_resynchronises() {
    let (mut raw, guest) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(serve(guest, Arc::new(Echo), "v"));

    // First "host": greets, then writes half a frame and disappears.
    let mut first = BytesMut::new();
    first.extend_from_slice(&SYNC);
    Frame::json(
        0,
        Kind::Hello,
        &serde_json::json!({"version": 1, "nonce": 7}),
    )
    .encode(&mut first);
    raw.write_all(&first).await.unwrap();
    let mut half = BytesMut::new();
    Frame::data(1, Channel::Stdin, &[1u8; 100]).encode(&mut half);
    raw.write_all(&half[..20]).await.unwrap();
    // Drain the first ack so the duplex buffer does not fill up.
    let mut buf = vec![0u8; 512];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(n > SYNC.len());

    // Second host on the same byte stream: its first greeting is swallowed by
    // the half frame, the filler completes it, and the second greeting lands.
    let options = ClientOptions {
        regreet_after: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let client = Client::connect(raw, options).await.unwrap();
    assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn dropping_a_stream_resets_it_on_the_guest() {
    let (client, _server) = pair().await;
    let mut stream = client.open(&exec()).await.unwrap();
    assert!(matches!(
        stream.next().await.unwrap(),
        StreamEvent::Message(StreamMessage::Started { .. })
    ));
    drop(stream);
    // The session is still usable after the reset.
    assert_eq!(client.call(&Request::Ping).await.unwrap(), Response::Pong);
}

#[tokio::test]
async fn handshake_times_out_against_a_silent_peer() {
    let (host, _guest) = tokio::io::duplex(1024);
    let options = ClientOptions {
        handshake_timeout: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    assert!(matches!(
        Client::connect(host, options).await,
        Err(ProtocolError::Timeout(_))
    ));
}

#[tokio::test]
async fn undecodable_request_gets_an_error_reply() {
    let (mut raw, guest) = tokio::io::duplex(64 * 1024);
    let _server = tokio::spawn(serve(guest, Arc::new(Echo), "v"));
    let mut out = BytesMut::new();
    out.extend_from_slice(&SYNC);
    Frame::json(
        0,
        Kind::Hello,
        &serde_json::json!({"version": 1, "nonce": 1}),
    )
    .encode(&mut out);
    Frame::new(1, Kind::Open, &b"{\"op\":\"launch_missiles\"}"[..]).encode(&mut out);
    raw.write_all(&out).await.unwrap();
    let mut seen = Vec::new();
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut buf = [0u8; 1024];
            let n = raw.read(&mut buf).await.unwrap();
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_string();
            if text.contains("invalid_argument") {
                return text;
            }
        }
    })
    .await
    .unwrap();
    assert!(reply.contains("launch_missiles"), "{reply}");
}

/// Answers `connect` with `Connected`, then parks without reading events and
/// reports when the stream ended (as a guest blocked writing into a socket).
struct Parked(tokio::sync::mpsc::UnboundedSender<u32>);

impl Handler for Parked {
    async fn handle(&self, _request: Request, stream: Stream) {
        let id = stream.id();
        let (sender, _receiver) = stream.split();
        let _ = sender.send_message(&StreamMessage::Connected).await;
        sender.ended().await;
        let _ = self.0.send(id);
    }
}

#[tokio::test]
async fn ended_fires_on_reset_and_on_session_end() {
    // Host and guest talk through a relay that the test can cut.
    let (host, mut host_end) = tokio::io::duplex(64 * 1024);
    let (guest, mut guest_end) = tokio::io::duplex(64 * 1024);
    let relay = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut host_end, &mut guest_end).await;
    });
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(serve(guest, Arc::new(Parked(ended_tx)), "v"));
    let client = Client::connect(host, ClientOptions::default())
        .await
        .unwrap();
    let connect = Request::Connect(arrakis_protocol::ConnectRequest { port: 1 });
    let mut first = client.open(&connect).await.unwrap();
    let mut second = client.open(&connect).await.unwrap();
    for stream in [&mut first, &mut second] {
        assert_eq!(
            stream.next().await.unwrap(),
            StreamEvent::Message(StreamMessage::Connected)
        );
    }
    // Dropping a stream resets it: only that one ends on the guest.
    let first_id = first.id();
    drop(first);
    let seen = tokio::time::timeout(Duration::from_secs(5), ended.recv())
        .await
        .unwrap();
    assert_eq!(seen, Some(first_id));
    assert!(ended.try_recv().is_err());
    // Cutting the byte stream ends the session: the rest end on both sides.
    let (sender, _receiver) = second.split();
    relay.abort();
    let seen = tokio::time::timeout(Duration::from_secs(5), ended.recv())
        .await
        .unwrap();
    assert_eq!(seen, Some(sender.id()));
    tokio::time::timeout(Duration::from_secs(5), sender.ended())
        .await
        .unwrap();
    assert!(matches!(
        sender
            .send_data(Channel::Stdin, Bytes::from_static(b"x"))
            .await,
        Err(ProtocolError::Disconnected | ProtocolError::StreamClosed)
    ));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reset_ends_a_stream_whose_sender_has_clones() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let _server = tokio::spawn(serve(guest, Arc::new(Parked(ended_tx)), "v"));
    let client = Client::connect(host, ClientOptions::default())
        .await
        .unwrap();
    let connect = Request::Connect(arrakis_protocol::ConnectRequest { port: 1 });
    let (sender, mut receiver) = client.open(&connect).await.unwrap().split();
    assert_eq!(
        receiver.next().await.unwrap(),
        StreamEvent::Message(StreamMessage::Connected)
    );
    let clone = sender.clone();
    sender.reset();
    let seen = tokio::time::timeout(Duration::from_secs(5), ended.recv())
        .await
        .unwrap();
    assert_eq!(seen, Some(clone.id()));
    assert!(matches!(
        clone
            .send_data(Channel::Stdin, Bytes::from_static(b"x"))
            .await,
        Err(ProtocolError::StreamClosed)
    ));
    assert!(matches!(
        receiver.next().await,
        Err(ProtocolError::StreamClosed)
    ));
    // A second reset (or dropping the handles) sends nothing more.
    clone.reset();
    drop((clone, receiver));
    assert!(ended.try_recv().is_err());
    assert!(!client.is_closed());
}
