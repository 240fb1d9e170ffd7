//! The shim server's log goes to the bundle's `log` FIFO, which containerd
//! reads and copies into its own log. `-debug` (given when containerd logs at
//! debug level) or `ARRAKIS_LOG` raise the level.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sets up logging for the long-running server. Nothing may be written to
/// stdout or stderr by `start` (containerd reads them as the address), so
/// this is only called for the server.
pub fn init(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = std::env::var("ARRAKIS_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    // The FIFO is in the working directory (the bundle); containerd has
    // its read end open before it starts the shim.
    let Ok(fifo) = OpenOptions::new().write(true).open("log") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(fifo))
        .try_init();
}
