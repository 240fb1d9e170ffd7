//! TCP connections to guest ports, tunnelled over the agent session (the
//! `connect` request): no guest network device is needed. The host end is a
//! [`TcpTunnel`]; [`TcpTunnel::splice`] joins it to a host socket.

use std::time::Duration;

use arrakis_protocol::{
    Channel, ConnectRequest, ProtocolError, Request, Response, Stream, StreamEvent, StreamMessage,
};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{AgentClient, AgentError};

/// Bound on the guest's answer to `connect` (the agent itself gives up
/// connecting after 5 s; the rest is slack for a slow, emulated guest).
pub const CONNECT_TCP_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest chunk read from the host socket at once (one DATA frame).
const CHUNK: usize = 64 * 1024;

const OP: &str = "connect";

impl AgentClient {
    /// Opens a TCP connection to `127.0.0.1:port` inside the guest, carried
    /// by the agent session. Returns once the guest is connected; nothing
    /// listening is [`AgentError::Remote`] with code `unavailable`
    /// ("connection refused on port N").
    pub async fn connect_tcp(&self, port: u16) -> Result<TcpTunnel, AgentError> {
        if port == 0 {
            return Err(AgentError::InvalidRequest(
                "port 0 is not a port one can connect to (1 to 65535)".into(),
            ));
        }
        let mut stream = self
            .client
            .open(&Request::Connect(ConnectRequest { port }))
            .await
            .map_err(AgentError::protocol(OP))?;
        let first = tokio::time::timeout(CONNECT_TCP_TIMEOUT, stream.next())
            .await
            .map_err(|_| AgentError::Protocol {
                op: OP,
                source: ProtocolError::Timeout("waiting for the guest to connect"),
            })?
            .map_err(AgentError::protocol(OP))?;
        match first {
            StreamEvent::Message(StreamMessage::Connected) => Ok(TcpTunnel { port, stream }),
            StreamEvent::Closed(Err(body)) => Err(AgentError::Remote { op: OP, body }),
            other => Err(AgentError::unexpected(OP, other)),
        }
    }
}

/// An established connection to a guest port. Dropping it resets the
/// stream; the agent then aborts the guest side of the connection.
pub struct TcpTunnel {
    port: u16,
    stream: Stream,
}

impl std::fmt::Debug for TcpTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTunnel")
            .field("port", &self.port)
            .field("stream", &self.stream.id())
            .finish()
    }
}

/// Bytes a finished [`TcpTunnel::splice`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From the host socket into the guest connection.
    pub to_guest: u64,
    /// From the guest connection out of the host socket.
    pub from_guest: u64,
}

/// Why the host -> guest direction stopped.
enum Up {
    Local(std::io::Error),
    /// The guest ended the stream or the session died: the other direction reads why.
    Stream,
}

impl TcpTunnel {
    /// The guest port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Copies between `socket` and the guest connection until both
    /// directions ended. End of input on either side is passed on as a
    /// half-close (`shutdown(SHUT_WR)` on the other). Memory is bounded by
    /// the protocol's flow control: one window per direction.
    ///
    /// On failure (the guest connection broke, the host socket failed, the
    /// agent session ended) `socket` is closed with a TCP reset, so its peer
    /// sees an abort rather than a clean end of the data.
    pub async fn splice(self, mut socket: TcpStream) -> Result<Spliced, AgentError> {
        let _ = socket.set_nodelay(true);
        let (sender, mut receiver) = self.stream.split();
        let (mut to_guest, mut from_guest) = (0u64, 0u64);
        let result = {
            let (mut host_in, mut host_out) = socket.split();
            let up = async {
                loop {
                    let mut buf = BytesMut::with_capacity(CHUNK);
                    let n = host_in.read_buf(&mut buf).await.map_err(Up::Local)?;
                    if n == 0 {
                        return sender
                            .send_eof(Channel::Stdin)
                            .await
                            .map_err(|_| Up::Stream);
                    }
                    sender
                        .send_data(Channel::Stdin, buf.freeze())
                        .await
                        .map_err(|_| Up::Stream)?;
                    to_guest += n as u64;
                }
            };
            let down = async {
                loop {
                    match receiver.next().await.map_err(AgentError::protocol(OP))? {
                        StreamEvent::Data(Channel::Stdout, data) => {
                            host_out
                                .write_all(&data)
                                .await
                                .map_err(|source| AgentError::LocalIo { op: OP, source })?;
                            from_guest += data.len() as u64;
                        }
                        // The peer may have closed already: nothing to tell it then.
                        StreamEvent::Eof(Channel::Stdout) => drop(host_out.shutdown().await),
                        StreamEvent::Closed(Ok(Response::Done)) => return Ok(()),
                        StreamEvent::Closed(Err(body)) => {
                            return Err(AgentError::Remote { op: OP, body })
                        }
                        other => return Err(AgentError::unexpected(OP, other)),
                    }
                }
            };
            let mut up = std::pin::pin!(up);
            let mut down = std::pin::pin!(down);
            let mut up_done = false;
            loop {
                tokio::select! {
                    // The guest's reply ends the tunnel, whatever `up` is doing.
                    result = &mut down => break result,
                    result = &mut up, if !up_done => match result {
                        Ok(()) => up_done = true,
                        Err(Up::Stream) => up_done = true,
                        Err(Up::Local(source)) => break Err(AgentError::LocalIo { op: OP, source }),
                    },
                }
            }
        };
        if result.is_err() {
            let _ = socket.set_zero_linger();
        }
        result.map(|()| Spliced {
            to_guest,
            from_guest,
        })
    }
}

/// A stand-in guest agent for tests without a VM: it answers `ping` and
/// tunnels `connect` to the *host's* loopback, with the protocol's
/// half-close semantics.
#[cfg(any(test, feature = "testing"))]
pub mod fake {
    use std::path::Path;
    use std::sync::Arc;

    use arrakis_protocol::{
        serve, Channel, ErrorBody, ErrorCode, Handler, Request, Response, Stream, StreamEvent,
        StreamMessage,
    };
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpStream, UnixListener};

    /// Serves the fake agent on a unix socket at `socket`, one host session
    /// after another, until the returned task is aborted.
    pub fn serve_loopback_agent(socket: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = UnixListener::bind(socket)?;
        Ok(tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, Arc::new(LoopbackAgent), "loopback-fake"));
            }
        }))
    }

    struct LoopbackAgent;

    impl Handler for LoopbackAgent {
        async fn handle(&self, request: Request, stream: Stream) {
            match request {
                Request::Ping => drop(stream.close(Ok(Response::Pong)).await),
                Request::Connect(req) => connect(req.port, stream).await,
                _ => {
                    let body = ErrorBody::new(ErrorCode::Unsupported, "loopback fake");
                    drop(stream.close(Err(body)).await)
                }
            }
        }
    }

    async fn connect(port: u16, stream: Stream) {
        let socket = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(socket) => socket,
            Err(e) => {
                let message = format!("connection refused on port {port}: {e}");
                let body = ErrorBody::new(ErrorCode::Unavailable, message);
                return drop(stream.close(Err(body)).await);
            }
        };
        let (sender, mut receiver) = stream.split();
        if sender
            .send_message(&StreamMessage::Connected)
            .await
            .is_err()
        {
            return;
        }
        let (mut rd, mut wr) = socket.into_split();
        let down = async {
            loop {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => return sender.send_eof(Channel::Stdout).await.is_ok(),
                    Ok(_) => {
                        if sender
                            .send_data(Channel::Stdout, buf.freeze())
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        };
        let up = async {
            loop {
                match receiver.next().await {
                    Ok(StreamEvent::Data(_, data)) => {
                        if wr.write_all(&data).await.is_err() {
                            return false;
                        }
                    }
                    Ok(StreamEvent::Eof(_)) => return wr.shutdown().await.is_ok(),
                    _ => return false,
                }
            }
        };
        let mut down = std::pin::pin!(down);
        let mut up = std::pin::pin!(up);
        let (mut down_done, mut up_done) = (false, false);
        let clean = loop {
            if down_done && up_done {
                break true;
            }
            tokio::select! {
                ok = &mut down, if !down_done => if ok { down_done = true } else { break false },
                ok = &mut up, if !up_done => if ok { up_done = true } else { break false },
                () = sender.ended() => return,
            }
        };
        let outcome = if clean {
            Ok(Response::Done)
        } else {
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "the connection broke",
            ))
        };
        let _ = sender.close(outcome).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn agent() -> (tempfile::TempDir, AgentClient) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        fake::serve_loopback_agent(&socket).unwrap();
        let agent = AgentClient::connect(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        (dir, agent)
    }

    /// A host socket pair: (the side given to `splice`, the client side).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    #[tokio::test]
    async fn splice_copies_both_ways_with_half_close() {
        let (_dir, agent) = agent().await;
        // The "guest" service: reads everything, then answers with it reversed.
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = service.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = service.accept().await.unwrap();
            let mut got = Vec::new();
            socket.read_to_end(&mut got).await.unwrap();
            got.reverse();
            socket.write_all(&got).await.unwrap();
        });
        let tunnel = agent.connect_tcp(port).await.unwrap();
        assert_eq!(tunnel.port(), port);
        let (inner, mut client) = socket_pair().await;
        let splice = tokio::spawn(tunnel.splice(inner));
        let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut output = Vec::new();
        client.read_to_end(&mut output).await.unwrap();
        let mut expected = input.clone();
        expected.reverse();
        assert!(output == expected, "{} bytes back", output.len());
        let spliced = splice.await.unwrap().unwrap();
        assert_eq!(
            spliced,
            Spliced {
                to_guest: 3_000_000,
                from_guest: 3_000_000
            }
        );
    }

    #[tokio::test]
    async fn refused_and_invalid_ports_are_clear_errors() {
        let (_dir, agent) = agent().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        match agent.connect_tcp(port).await.unwrap_err() {
            AgentError::Remote { op, body } => {
                assert_eq!(op, "connect");
                assert_eq!(body.code, arrakis_protocol::ErrorCode::Unavailable);
                assert!(body.message.contains("refused"), "{}", body.message);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            agent.connect_tcp(0).await,
            Err(AgentError::InvalidRequest(_))
        ));
        // The session is still good.
        agent.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_broken_guest_connection_resets_the_host_socket() {
        let (_dir, agent) = agent().await;
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = service.local_addr().unwrap().port();
        let tunnel = agent.connect_tcp(port).await.unwrap();
        let (inner, mut client) = socket_pair().await;
        let splice = tokio::spawn(tunnel.splice(inner));
        // The guest service aborts its connection.
        let (guest_side, _) = service.accept().await.unwrap();
        guest_side.set_zero_linger().unwrap();
        drop(guest_side);
        let result = tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&result, Err(AgentError::Remote { op: "connect", .. })),
            "{result:?}"
        );
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf).await;
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
        agent.ping().await.unwrap();
    }
}
