//! A QMP client for one command at a time, built on the `qapi` crate
//! (`qmp` + `async-tokio-net` features), which works with QEMU 7.2 here:
//! greeting, capability negotiation and typed commands.
//!
//! Each call opens the VM's QMP socket, negotiates, runs one command and
//! closes. QEMU serves one QMP client per socket at a time, and manager
//! processes come and go, so no connection is kept between calls. Every call
//! is bounded by [`QMP_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::futures::QmpStreamTokio;
use qapi::qmp;

/// Upper bound on one QMP exchange, connect to reply.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot talk to QMP at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU refused the command: {0}")]
    Refused(String),
    #[error("no answer from QMP at {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
}

/// Runs one QMP command on the socket at `path`.
pub async fn execute<C>(path: &Path, command: C) -> Result<C::Ok, QmpError>
where
    C: qmp::QmpCommand + 'static,
    C::Ok: Send + 'static,
{
    let run = async {
        let io_err = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = QmpStreamTokio::open_uds(path).await.map_err(io_err)?;
        let stream = stream.negotiate().await.map_err(io_err)?;
        let (service, events) = stream.into_parts();
        // The event half reads QEMU's replies and events; it must be polled
        // while the command waits, and is dropped with the connection.
        let reader = tokio::spawn(events);
        let result = service.execute(command).await;
        reader.abort();
        result.map_err(|error| match error {
            qapi::ExecuteError::Qapi(e) => QmpError::Refused(e.to_string()),
            qapi::ExecuteError::Io(e) => io_err(e),
        })
    };
    tokio::time::timeout(QMP_TIMEOUT, run)
        .await
        .map_err(|_| QmpError::Timeout {
            path: path.to_path_buf(),
            timeout: QMP_TIMEOUT,
        })?
}

/// QEMU's run state, as text (`running`, `paused`, `guest-panicked`...).
pub async fn query_status(path: &Path) -> Result<(bool, String), QmpError> {
    let info = execute(path, qmp::query_status {}).await?;
    let name = serde_json::to_value(info.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    Ok((info.running, name))
}

pub async fn stop(path: &Path) -> Result<(), QmpError> {
    execute(path, qmp::stop {}).await.map(drop)
}

pub async fn cont(path: &Path) -> Result<(), QmpError> {
    execute(path, qmp::cont {}).await.map(drop)
}

/// `quit`: QEMU may close the socket before its reply arrives, so a broken
/// connection after sending counts as done; the caller waits for the exit.
pub async fn quit(path: &Path) -> Result<(), QmpError> {
    match execute(path, qmp::quit {}).await {
        Ok(_) | Err(QmpError::Io { .. }) => Ok(()),
        Err(other) => Err(other),
    }
}
