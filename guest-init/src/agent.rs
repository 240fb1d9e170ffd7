//! The serving loop: the protocol session runs on the port for the life of
//! the guest. Hosts come and go without ending it (the port hides hang-ups,
//! see [`crate::port::PortIo`]); a new host's greeting starts a new session
//! inside [`serve`]. `serve` only returns on an I/O error, after which the
//! loop starts again on a fresh registration of the port.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrakis_protocol::{serve, Handler};

use crate::log::RateLimit;
use crate::port::Port;

/// The agent version reported in `HELLO_ACK` and `Info`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Pause before serving again after the port failed.
const RESTART_PAUSE: Duration = Duration::from_millis(50);

static ERROR_LOG: RateLimit = RateLimit::new(2);

/// Opens the port called `port_name` (waiting for it) and serves sessions forever.
pub async fn serve_forever<H: Handler>(port_name: &str, handler: Arc<H>) {
    let port = Port::wait_and_open(Path::new(crate::port::VIRTIO_PORTS), port_name).await;
    serve_port(&port, handler).await;
}

/// Serves sessions on an open port forever.
pub async fn serve_port<H: Handler>(port: &Port, handler: Arc<H>) {
    loop {
        let result = match port.io() {
            Ok(io) => serve(io, Arc::clone(&handler), AGENT_VERSION)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = result {
            if ERROR_LOG.allow() {
                tracing::warn!(%error, "agent channel failed; serving again");
            }
        }
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}
