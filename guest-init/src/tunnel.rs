//! The `Connect` request: a TCP connection from the agent to a port on the
//! guest's loopback, its bytes carried by the stream (host -> socket on the
//! stdin channel, socket -> host on stdout). This is how the host reaches
//! guest services without a network device.
//!
//! Buffering is bounded by the protocol's flow control: the socket is read
//! only as fast as the host grants credit, and the next chunk from the host
//! is taken only once the previous one is in the socket, so the agent holds
//! at most one window plus one chunk per connection.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use arrakis_protocol::{Channel, StreamEvent, StreamMessage, StreamReceiver, StreamSender};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::log::RateLimit;

/// How long the agent waits for the guest's TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest chunk read from the socket at once (one DATA frame).
const CHUNK: usize = 64 * 1024;

static LOG_LIMIT: RateLimit = RateLimit::new(20);

/// Why a tunnel could not be made, or broke.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("port 0 is not a port one can connect to (1 to 65535)")]
    BadPort,
    #[error("connection refused on port {port}: nothing listens on 127.0.0.1:{port} in the guest")]
    Refused { port: u16 },
    #[error("connecting to 127.0.0.1:{port} in the guest timed out after {} s", .after.as_secs())]
    Timeout { port: u16, after: Duration },
    #[error("cannot connect to 127.0.0.1:{port} in the guest")]
    Connect {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("the connection to port {port} in the guest broke")]
    Broken {
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// Serves one `connect` stream: connects, reports
/// [`StreamMessage::Connected`], then copies both ways. `Some(Ok(()))` once
/// both directions ended, `Some(Err(_))` when the connection could not be
/// made or broke (the caller replies), `None` when the host reset the stream
/// or the session ended (nobody reads a reply; the guest application's
/// connection is then aborted with a TCP reset, as a dropped client would).
pub async fn run(
    port: u16,
    sender: &StreamSender,
    receiver: StreamReceiver,
) -> Option<Result<(), TunnelError>> {
    let socket = tokio::select! {
        connected = connect(port) => match connected {
            Ok(socket) => socket,
            Err(error) => return Some(Err(error)),
        },
        () = sender.ended() => return None,
    };
    tunnel(port, socket, sender, receiver).await
}

async fn connect(port: u16) -> Result<TcpStream, TunnelError> {
    if port == 0 {
        return Err(TunnelError::BadPort);
    }
    let attempt = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(TunnelError::Refused { port })
        }
        Ok(Err(source)) => return Err(TunnelError::Connect { port, source }),
        Err(_) => {
            return Err(TunnelError::Timeout {
                port,
                after: CONNECT_TIMEOUT,
            })
        }
    };
    // Small writes (an HTTP request, a prompt) should not wait for Nagle.
    let _ = socket.set_nodelay(true);
    Ok(socket)
}

/// Why one direction stopped early.
enum Stop {
    /// The host reset the stream or the session ended: no reply is read.
    Gone,
    /// Reading the guest socket failed (the application reset the connection).
    Socket(io::Error),
}

/// Copies both ways until both directions ended, the socket failed or the
/// host went away.
async fn tunnel(
    port: u16,
    mut socket: TcpStream,
    sender: &StreamSender,
    receiver: StreamReceiver,
) -> Option<Result<(), TunnelError>> {
    if sender
        .send_message(&StreamMessage::Connected)
        .await
        .is_err()
    {
        let _ = socket.set_zero_linger();
        return None;
    }
    tracing::debug!(port, "tunnel connected");
    let result = {
        let (read_half, write_half) = socket.split();
        let mut down = std::pin::pin!(socket_to_host(read_half, sender));
        let mut up = std::pin::pin!(host_to_socket(receiver, write_half, port));
        let (mut down_done, mut up_done) = (false, false);
        loop {
            if down_done && up_done {
                break Ok(());
            }
            tokio::select! {
                result = &mut down, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(stop) => break Err(stop),
                },
                result = &mut up, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(stop) => break Err(stop),
                },
                // A reset must end the connection even while both directions
                // are blocked (the application neither reads nor writes).
                () = sender.ended() => break Err(Stop::Gone),
            }
        }
    };
    tracing::debug!(port, ok = result.is_ok(), "tunnel finished");
    match result {
        Ok(()) => Some(Ok(())),
        Err(Stop::Gone) => {
            let _ = socket.set_zero_linger();
            None
        }
        Err(Stop::Socket(source)) => Some(Err(TunnelError::Broken { port, source })),
    }
}

/// Socket -> host, paced by the host's credit; the socket's EOF becomes EOF on stdout.
async fn socket_to_host(mut socket: ReadHalf<'_>, sender: &StreamSender) -> Result<(), Stop> {
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        match socket.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => sender
                .send_data(Channel::Stdout, buf.freeze())
                .await
                .map_err(|_| Stop::Gone)?,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(Stop::Socket(error)),
        }
    }
    sender
        .send_eof(Channel::Stdout)
        .await
        .map_err(|_| Stop::Gone)
}

/// Host -> socket, one chunk at a time; EOF on stdin shuts the socket's
/// write side. Once the application stopped reading (a failed write), what
/// the host still sends is dropped, so its credit keeps flowing until the
/// other direction ends the stream.
async fn host_to_socket(
    mut receiver: StreamReceiver,
    mut socket: WriteHalf<'_>,
    port: u16,
) -> Result<(), Stop> {
    let mut broken = false;
    loop {
        match receiver.next().await {
            Ok(StreamEvent::Data(Channel::Stdin, data)) => {
                if !broken {
                    if let Err(error) = socket.write_all(&data).await {
                        if LOG_LIMIT.allow() {
                            tracing::debug!(port, %error, "the guest application stopped reading; dropping the host's bytes");
                        }
                        broken = true;
                    }
                }
            }
            Ok(StreamEvent::Eof(Channel::Stdin)) => {
                if !broken {
                    let _ = socket.shutdown().await;
                }
                return Ok(());
            }
            Ok(StreamEvent::Reset) | Err(_) => return Err(Stop::Gone),
            Ok(other) => {
                if LOG_LIMIT.allow() {
                    tracing::debug!(port, event = ?other, "ignoring an unexpected event on a connect stream");
                }
            }
        }
    }
}
