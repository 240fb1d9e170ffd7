//! Port forwards: `127.0.0.1:<hostPort>` on the host reaches
//! `127.0.0.1:<guestPort>` inside a sandbox. Sandboxes have no network
//! device, so every accepted connection is tunnelled over the sandbox's
//! agent session (the protocol's `connect` request, see
//! [`arrakis_runtime::agent::TcpTunnel`]).
//!
//! [`Forwards`] is owned by the server and keyed by sandbox name. Each
//! forward is a listener with its own accept loop; each accepted connection
//! asks for the sandbox's *current* agent client (through the
//! [`AgentSource`] given at open, normally [`Manager::agent`]), so forwards
//! keep working across pause/resume and agent reconnects. A connection made
//! while the guest cannot be reached (paused, stopped, nothing listening on
//! the guest port) is reset at once. Forwards live in this process only.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arrakis_runtime::{AgentClient, Manager, RuntimeError};
use axum::http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::wire::{PortForward, PortForwardRequest};

/// Forwards one sandbox may have.
pub const MAX_FORWARDS: usize = 16;
/// Live connections one forward carries at once; past it new ones are reset.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest description kept, in characters.
pub const MAX_DESCRIPTION: usize = 256;
/// Pause after a failed `accept` (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The future an [`AgentSource`] returns.
pub type AgentFuture = Pin<Box<dyn Future<Output = Result<AgentClient, RuntimeError>> + Send>>;

/// Gives the sandbox's current agent client; called once per accepted connection.
pub type AgentSource = Arc<dyn Fn() -> AgentFuture + Send + Sync>;

/// The agent of sandbox `name` as `manager` has it at each call.
pub fn manager_source(manager: &Manager, name: &str) -> AgentSource {
    let manager = manager.clone();
    let name: Arc<str> = Arc::from(name);
    Arc::new(move || {
        let manager = manager.clone();
        let name = name.clone();
        Box::pin(async move { manager.agent(&name).await })
    })
}

/// Every port forward of this server. Cheap to clone; clones share them.
#[derive(Clone, Default)]
pub struct Forwards {
    inner: Arc<Mutex<HashMap<String, Vec<Live>>>>,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.map();
        f.debug_map()
            .entries(
                map.iter()
                    .map(|(name, live)| (name, live.iter().map(|l| &l.info).collect::<Vec<_>>())),
            )
            .finish()
    }
}

/// One running forward.
struct Live {
    info: PortForward,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A validated request, its listener bound.
struct Bound {
    listener: TcpListener,
    host_port: u16,
    guest_port: u16,
    description: String,
}

impl Forwards {
    pub fn new() -> Forwards {
        Forwards::default()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<Live>>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens `requests` for sandbox `sandbox` through `manager`'s agent of it;
    /// see [`Forwards::open_with`].
    pub async fn open(
        &self,
        manager: &Manager,
        sandbox: &str,
        requests: &[PortForwardRequest],
    ) -> Result<Vec<PortForward>, ApiError> {
        self.open_with(sandbox, manager_source(manager, sandbox), requests)
            .await
    }

    /// Binds `127.0.0.1:<hostPort>` for every request (0 or absent: a free
    /// port) and starts forwarding; returns the forwards opened, with the
    /// ports actually bound. All or nothing: on any error nothing stays
    /// bound. Forwards add to those the sandbox already has, up to
    /// [`MAX_FORWARDS`]. Errors: a guest port of 0, a host port given twice
    /// or a description over [`MAX_DESCRIPTION`] characters (400); more
    /// than [`MAX_FORWARDS`] (422); a host port already in use (409, naming
    /// it); a privileged port without the privilege (403).
    pub async fn open_with(
        &self,
        sandbox: &str,
        agent: AgentSource,
        requests: &[PortForwardRequest],
    ) -> Result<Vec<PortForward>, ApiError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        validate(requests)?;
        self.check_room(sandbox, requests.len())?;
        let mut bound = Vec::with_capacity(requests.len());
        for request in requests {
            bound.push(bind(request).await?);
        }
        // Checked again with the lock held: another open may have raced us.
        let mut map = self.map();
        let existing = map.get(sandbox).map_or(0, Vec::len);
        if existing + bound.len() > MAX_FORWARDS {
            return Err(too_many(sandbox, existing, bound.len()));
        }
        let mut opened = Vec::with_capacity(bound.len());
        let entry = map.entry(sandbox.to_string()).or_default();
        for b in bound {
            let info = PortForward {
                host_port: b.host_port.to_string(),
                guest_port: b.guest_port.to_string(),
                description: b.description,
            };
            let cancel = CancellationToken::new();
            tracing::info!(
                sandbox,
                host_port = b.host_port,
                guest_port = b.guest_port,
                "port forward open"
            );
            let task = tokio::spawn(accept_loop(
                b.listener,
                Target {
                    sandbox: Arc::from(sandbox),
                    guest_port: b.guest_port,
                    agent: agent.clone(),
                },
                cancel.clone(),
            ));
            opened.push(info.clone());
            entry.push(Live { info, cancel, task });
        }
        Ok(opened)
    }

    fn check_room(&self, sandbox: &str, adding: usize) -> Result<(), ApiError> {
        let existing = self.map().get(sandbox).map_or(0, Vec::len);
        if existing + adding > MAX_FORWARDS {
            return Err(too_many(sandbox, existing, adding));
        }
        Ok(())
    }

    /// The forwards of `sandbox`, in the order they were opened.
    pub fn list(&self, sandbox: &str) -> Vec<PortForward> {
        self.map()
            .get(sandbox)
            .map(|live| live.iter().map(|l| l.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Stops the forwards of `sandbox`: its listeners are closed (the ports
    /// are free again when this returns) and its live connections dropped
    /// (the guest side is reset). Returns how many forwards there were.
    pub async fn close(&self, sandbox: &str) -> usize {
        let live = self.map().remove(sandbox).unwrap_or_default();
        let count = live.len();
        stop(live).await;
        if count > 0 {
            tracing::info!(sandbox, count, "port forwards closed");
        }
        count
    }

    /// Stops every forward (server shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Live> = self.map().drain().flat_map(|(_, live)| live).collect();
        stop(all).await;
    }
}

async fn stop(live: Vec<Live>) {
    for forward in &live {
        forward.cancel.cancel();
    }
    for forward in live {
        // The loop ends at once when cancelled; a panic in it is not ours to raise.
        let _ = forward.task.await;
    }
}

fn too_many(sandbox: &str, existing: usize, adding: usize) -> ApiError {
    ApiError::unprocessable(format!(
        "portForwards: at most {MAX_FORWARDS} per VM; {sandbox:?} has {existing} and {adding} more were asked for"
    ))
}

fn validate(requests: &[PortForwardRequest]) -> Result<(), ApiError> {
    if requests.len() > MAX_FORWARDS {
        return Err(ApiError::unprocessable(format!(
            "portForwards: at most {MAX_FORWARDS} per VM, {} given",
            requests.len()
        )));
    }
    let mut host_ports = Vec::new();
    for request in requests {
        if request.guest_port == 0 {
            return Err(ApiError::bad_request(
                "portForwards: guestPort must be 1 to 65535",
            ));
        }
        if let Some(port) = request.host_port.filter(|p| *p != 0) {
            if host_ports.contains(&port) {
                return Err(ApiError::bad_request(format!(
                    "portForwards: hostPort {port} is given twice"
                )));
            }
            host_ports.push(port);
        }
        let description = request.description.as_deref().unwrap_or_default();
        if description.chars().count() > MAX_DESCRIPTION {
            return Err(ApiError::bad_request(format!(
                "portForwards: description is over {MAX_DESCRIPTION} characters"
            )));
        }
    }
    Ok(())
}

async fn bind(request: &PortForwardRequest) -> Result<Bound, ApiError> {
    let wanted = request.host_port.unwrap_or(0);
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, wanted)))
        .await
        .map_err(|e| bind_error(wanted, &e))?;
    let host_port = listener
        .local_addr()
        .map_err(|e| ApiError::internal(format!("portForwards: bound port unknown: {e}")))?
        .port();
    Ok(Bound {
        listener,
        host_port,
        guest_port: request.guest_port,
        description: request.description.clone().unwrap_or_default(),
    })
}

fn bind_error(port: u16, error: &std::io::Error) -> ApiError {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => ApiError::new(
            StatusCode::CONFLICT,
            format!("portForwards: hostPort {port} is already in use on 127.0.0.1"),
        ),
        std::io::ErrorKind::PermissionDenied => ApiError::new(
            StatusCode::FORBIDDEN,
            format!("portForwards: hostPort {port} needs privileges this server does not have"),
        ),
        _ => ApiError::internal(format!(
            "portForwards: cannot listen on 127.0.0.1:{port}: {error}"
        )),
    }
}

/// Where a forward's connections go.
#[derive(Clone)]
struct Target {
    sandbox: Arc<str>,
    guest_port: u16,
    agent: AgentSource,
}

async fn accept_loop(listener: TcpListener, target: Target, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::debug!(sandbox = %target.sandbox, guest_port = target.guest_port, "too many forwarded connections; resetting a new one");
                    reset(socket);
                }
                Ok((socket, peer)) => {
                    connections.spawn(forward_one(socket, peer, target.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, "accept failed on a port forward");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Dropping the connections resets their tunnels; the guest aborts its side.
    connections.shutdown().await;
}

/// Carries one accepted connection to the guest port.
async fn forward_one(socket: TcpStream, peer: SocketAddr, target: Target) {
    let tunnel = async {
        let agent = (target.agent)().await.map_err(|e| e.chain())?;
        agent
            .connect_tcp(target.guest_port)
            .await
            .map_err(|e| arrakis_runtime::agent::error_chain(&e))
    };
    let tunnel = match tunnel.await {
        Ok(tunnel) => tunnel,
        Err(error) => {
            tracing::debug!(sandbox = %target.sandbox, guest_port = target.guest_port, %peer, %error, "cannot reach the guest port; resetting the connection");
            reset(socket);
            return;
        }
    };
    match tunnel.splice(socket).await {
        Ok(bytes) => tracing::debug!(
            sandbox = %target.sandbox,
            guest_port = target.guest_port,
            %peer,
            to_guest = bytes.to_guest,
            from_guest = bytes.from_guest,
            "forwarded connection finished"
        ),
        Err(error) => tracing::debug!(
            sandbox = %target.sandbox,
            guest_port = target.guest_port,
            %peer,
            error = %arrakis_runtime::agent::error_chain(&error),
            "forwarded connection failed"
        ),
    }
}

/// Closes `socket` with a TCP reset: its peer sees a refused or aborted
/// connection, not a clean end of data.
fn reset(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arrakis_runtime::agent::tunnel_fake::serve_loopback_agent;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn request(guest_port: u16, host_port: Option<u16>) -> PortForwardRequest {
        PortForwardRequest {
            guest_port,
            host_port,
            description: Some(format!("guest {guest_port}")),
        }
    }

    /// A fake agent on a unix socket whose `connect` reaches the host's
    /// loopback, and a source that connects to it, counting its calls and
    /// failing while `down` is set.
    struct Fixture {
        _dir: tempfile::TempDir,
        calls: Arc<AtomicUsize>,
        down: Arc<std::sync::atomic::AtomicBool>,
        source: AgentSource,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        serve_loopback_agent(&socket).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source: AgentSource = {
            let (calls, down) = (calls.clone(), down.clone());
            Arc::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let (socket, down) = (socket.clone(), down.load(Ordering::SeqCst));
                Box::pin(async move {
                    if down {
                        return Err(RuntimeError::NotFound { name: "sb".into() });
                    }
                    Ok(AgentClient::connect(&socket, Duration::from_secs(5))
                        .await
                        .expect("fake agent"))
                })
            })
        };
        Fixture {
            _dir: dir,
            calls,
            down,
            source,
        }
    }

    /// A "guest" service on the host: echoes each connection, upper-cased.
    async fn echo_service() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                buf[..n].make_ascii_uppercase();
                                if socket.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    async fn round_trip(host_port: &str, text: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut client = TcpStream::connect(format!("127.0.0.1:{host_port}")).await?;
        client.write_all(text).await?;
        client.shutdown().await?;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn forwards_reach_the_guest_port_and_close_frees_them() {
        let fx = fixture();
        let guest_port = echo_service().await;
        let forwards = Forwards::new();
        let opened = forwards
            .open_with("sb", fx.source.clone(), &[request(guest_port, None)])
            .await
            .unwrap();
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].guest_port, guest_port.to_string());
        assert_eq!(opened[0].description, format!("guest {guest_port}"));
        let host_port = opened[0].host_port.clone();
        assert_ne!(host_port, "0");
        assert_eq!(forwards.list("sb"), opened);
        assert!(forwards.list("other").is_empty());

        // Each connection asks for the current agent.
        for _ in 0..3 {
            assert_eq!(
                round_trip(&host_port, b"hello").await.unwrap(),
                b"HELLO".to_vec()
            );
        }
        assert_eq!(fx.calls.load(Ordering::SeqCst), 3);

        // While the agent cannot be had, connections are reset; then they work again.
        fx.down.store(true, Ordering::SeqCst);
        let refused = round_trip(&host_port, b"x").await;
        assert!(
            matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{refused:?}"
        );
        fx.down.store(false, Ordering::SeqCst);
        assert_eq!(
            round_trip(&host_port, b"again").await.unwrap(),
            b"AGAIN".to_vec()
        );

        // A live connection, then close: it is dropped and the port is free.
        let mut live = TcpStream::connect(format!("127.0.0.1:{host_port}"))
            .await
            .unwrap();
        live.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        live.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PING");
        assert_eq!(forwards.close("sb").await, 1);
        assert!(forwards.list("sb").is_empty());
        let end = tokio::time::timeout(Duration::from_secs(5), live.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        let port: u16 = host_port.parse().unwrap();
        TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        assert_eq!(forwards.close("sb").await, 0);
    }

    #[tokio::test]
    async fn a_fixed_host_port_and_a_refused_guest_port() {
        let fx = fixture();
        let forwards = Forwards::new();
        // Two ports that were free a moment ago: one to ask for on the
        // host, one that nothing listens on in the "guest".
        let (wanted, closed_guest_port) = {
            let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            (
                a.local_addr().unwrap().port(),
                b.local_addr().unwrap().port(),
            )
        };
        let opened = forwards
            .open_with(
                "sb",
                fx.source.clone(),
                &[request(closed_guest_port, Some(wanted))],
            )
            .await
            .unwrap();
        assert_eq!(opened[0].host_port, wanted.to_string());
        // Nothing listens on the guest port: the host connection is reset.
        let result = round_trip(&opened[0].host_port, b"x").await;
        assert!(
            matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{result:?}"
        );
        forwards.close_all().await;
        assert!(forwards.list("sb").is_empty());
    }

    #[tokio::test]
    async fn bad_requests_bind_nothing() {
        let fx = fixture();
        let forwards = Forwards::new();
        let status = |r: Result<Vec<PortForward>, ApiError>| r.unwrap_err().status;

        let zero = forwards
            .open_with("sb", fx.source.clone(), &[request(0, None)])
            .await;
        assert_eq!(status(zero), StatusCode::BAD_REQUEST);

        let twice = forwards
            .open_with(
                "sb",
                fx.source.clone(),
                &[request(80, Some(40_000)), request(81, Some(40_000))],
            )
            .await;
        assert_eq!(status(twice), StatusCode::BAD_REQUEST);

        let many: Vec<_> = (1..=17).map(|p| request(p, None)).collect();
        let over = forwards.open_with("sb", fx.source.clone(), &many).await;
        assert_eq!(status(over), StatusCode::UNPROCESSABLE_ENTITY);

        // A taken port fails the whole request (409 naming it), and the
        // port bound before it in the same request is released.
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let first = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = forwards
            .open_with(
                "sb",
                fx.source.clone(),
                &[request(80, Some(first)), request(81, Some(taken_port))],
            )
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::CONFLICT);
        assert!(
            error.message.contains(&format!("hostPort {taken_port}")),
            "{}",
            error.message
        );
        TcpListener::bind(("127.0.0.1", first)).await.unwrap();
        assert!(forwards.list("sb").is_empty());

        // The limit counts the forwards a sandbox already has.
        let fifteen: Vec<_> = (1..=15).map(|p| request(p, None)).collect();
        forwards
            .open_with("sb", fx.source.clone(), &fifteen)
            .await
            .unwrap();
        let two = [request(1, None), request(2, None)];
        let over = forwards.open_with("sb", fx.source.clone(), &two).await;
        assert_eq!(status(over), StatusCode::UNPROCESSABLE_ENTITY);
        forwards
            .open_with("sb", fx.source.clone(), &two[..1])
            .await
            .unwrap();
        assert_eq!(forwards.list("sb").len(), MAX_FORWARDS);
        // Other sandboxes have their own budget.
        forwards
            .open_with("other", fx.source.clone(), &two)
            .await
            .unwrap();
        assert_eq!(forwards.close("sb").await, MAX_FORWARDS);
        assert_eq!(forwards.close("other").await, 2);
    }
}
