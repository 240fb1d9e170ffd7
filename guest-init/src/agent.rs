//! The session loop: serves the host over the port forever. While no host is
//! attached the port reads EOF at once, so each empty session is followed by
//! a growing pause (5 ms doubling to 50 ms); a session that carried traffic
//! resets the pause so a returning host is answered quickly.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arrakis_protocol::{serve, Handler};

use crate::log::RateLimit;
use crate::port::Port;

/// The agent version reported in `HELLO_ACK` and `Info`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Pauses between sessions that saw no host.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            current: min,
            min,
            max,
        }
    }

    /// The pause to take now; the next one doubles, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current;
        self.current = (self.current * 2).min(self.max);
        pause
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

static ERROR_LOG: RateLimit = RateLimit::new(2);

/// Opens the port called `port_name` (waiting for it) and serves sessions forever.
pub async fn serve_forever<H: Handler>(port_name: &str, handler: Arc<H>) {
    let port = Port::wait_and_open(Path::new(crate::port::VIRTIO_PORTS), port_name).await;
    serve_port(&port, handler).await;
}

/// Serves sessions on an open port forever.
pub async fn serve_port<H: Handler>(port: &Port, handler: Arc<H>) {
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
    loop {
        let io = match port.session() {
            Ok(io) => io,
            Err(e) => {
                if ERROR_LOG.allow() {
                    tracing::error!(error = %e, "cannot start a session on the port");
                }
                tokio::time::sleep(backoff.next_pause()).await;
                continue;
            }
        };
        let bytes_read = io.bytes_read();
        let result = serve(io, Arc::clone(&handler), AGENT_VERSION).await;
        let had_traffic = bytes_read.load(Ordering::Relaxed) > 0;
        match result {
            Ok(()) if had_traffic => tracing::info!("host session ended"),
            Ok(()) => {}
            Err(e) => {
                if ERROR_LOG.allow() {
                    tracing::warn!(error = %e, "host session failed");
                }
            }
        }
        if had_traffic {
            backoff.reset();
        } else {
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
        let pauses: Vec<u128> = (0..6).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 50, 50]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(5));
    }
}
