//! A QMP client built on the `qapi` crate (`qmp` + `async-tokio-net`
//! features), which works with QEMU 7.2 here: greeting, capability
//! negotiation and typed commands.
//!
//! A [`Session`] is one connection to a VM's QMP socket. Simple operations
//! open one, run one command and close ([`execute`]): QEMU serves one QMP
//! client per socket at a time, and manager processes come and go, so no
//! connection is kept between operations. Multi-step operations (saving or
//! loading VM state) keep one session for all their steps. Every exchange
//! is bounded by [`QMP_TIMEOUT`]; migrations are polled up to a caller's
//! bound.
//!
//! The crate's generated schema is newer than QEMU 7.2: commands whose
//! replies we read are declared here with lenient reply types
//! ([`QueryMigrate`], [`QueryBlock`]) so a field that 7.2 lacks cannot
//! break decoding.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use serde::{Deserialize, Serialize};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Upper bound on one QMP exchange, connect to reply.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `-drive id` of the root disk, which QMP block commands name.
pub const ROOT_DRIVE: &str = "root";

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
    #[error("migration {status}: {detail}")]
    Migration { status: String, detail: String },
}

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// One negotiated QMP connection.
pub struct Session {
    path: PathBuf,
    service: Service,
    /// Reads QEMU's replies and events; must be polled while commands wait.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    pub async fn open(path: &Path) -> Result<Session, QmpError> {
        let io_err = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let connect = async {
            let stream = QmpStreamTokio::open_uds(path).await.map_err(io_err)?;
            stream.negotiate().await.map_err(io_err)
        };
        let stream = tokio::time::timeout(QMP_TIMEOUT, connect)
            .await
            .map_err(|_| timeout(path))??;
        let (service, events) = stream.into_parts();
        let reader = tokio::spawn(async move {
            let _ = events.await;
        });
        Ok(Session {
            path: path.to_path_buf(),
            service,
            reader,
        })
    }

    /// Runs one command.
    pub async fn run<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qmp::QmpCommand + 'static,
        C::Ok: Send + 'static,
    {
        let result = tokio::time::timeout(QMP_TIMEOUT, self.service.execute(command))
            .await
            .map_err(|_| timeout(&self.path))?;
        result.map_err(|error| match error {
            qapi::ExecuteError::Qapi(e) => QmpError::Refused(e.to_string()),
            qapi::ExecuteError::Io(source) => QmpError::Io {
                path: self.path.clone(),
                source,
            },
        })
    }

    async fn ignore_shared(&self) -> Result<(), QmpError> {
        self.run(qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::x_ignore_shared,
                state: true,
            }],
        })
        .await
        .map(drop)
    }

    /// Polls `query-migrate` until the migration completes, fails, or
    /// `limit` passes.
    async fn wait_migration(&self, limit: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let info = self.run(QueryMigrate {}).await?;
            let status = info.status.unwrap_or_default();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" | "cancelling" => {
                    return Err(QmpError::Migration {
                        status,
                        detail: info
                            .error_desc
                            .unwrap_or_else(|| "no detail given".to_string()),
                    })
                }
                _ => {}
            }
            if start.elapsed() >= limit {
                return Err(QmpError::Migration {
                    status,
                    detail: format!("not done after {limit:?}"),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

fn timeout(path: &Path) -> QmpError {
    QmpError::Timeout {
        path: path.to_path_buf(),
        timeout: QMP_TIMEOUT,
    }
}

/// Runs one QMP command on the socket at `path`, on a connection of its own.
pub async fn execute<C>(path: &Path, command: C) -> Result<C::Ok, QmpError>
where
    C: qmp::QmpCommand + 'static,
    C::Ok: Send + 'static,
{
    Session::open(path).await?.run(command).await
}

/// QEMU's run state, as text (`running`, `paused`, `postmigrate`...).
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

/// `blockdev-snapshot-sync` on the root drive: QEMU creates `new_top` as a
/// qcow2 image backed by the current top image (recorded by the absolute
/// path QEMU opened it by), reopens that one read-only and writes to
/// `new_top` from now on. Atomic: on failure nothing switched.
pub async fn freeze_disk(path: &Path, new_top: &Path) -> Result<(), QmpError> {
    let command = qmp::blockdev_snapshot_sync(qmp::BlockdevSnapshotSync {
        device: Some(ROOT_DRIVE.to_string()),
        snapshot_file: new_top.to_string_lossy().into_owned(),
        format: Some("qcow2".to_string()),
        mode: Some(qmp::NewImageMode::absolute_paths),
        node_name: None,
        snapshot_node_name: None,
    });
    execute(path, command).await.map(drop)
}

/// Writes the device state of a paused VM to `state_file`: every device
/// but RAM, without the configuration section a migration starts with.
/// The VM stays paused with its disks active (`live: false`), so it can be
/// resumed, snapshotted again or stopped as usual.
pub async fn save_devices(path: &Path, state_file: &Path) -> Result<(), QmpError> {
    let command = qmp::xen_save_devices_state {
        filename: state_file.to_string_lossy().into_owned(),
        live: Some(false),
    };
    execute(path, command).await.map(drop)
}

/// Loads device state into a VM started with `-incoming defer -S`, whose
/// RAM is already in its memory backend: state from [`save_devices`], or
/// (with `ignore_shared`) a migration stream that left shared RAM out, as
/// earlier versions wrote. The VM ends paused.
pub async fn load_state(
    path: &Path,
    state_file: &Path,
    ignore_shared: bool,
    limit: Duration,
) -> Result<(), QmpError> {
    let session = Session::open(path).await?;
    if ignore_shared {
        session.ignore_shared().await?;
    }
    session
        .run(qmp::migrate_incoming {
            uri: Some(format!("exec:cat {}", shell_quote(state_file))),
            channels: None,
            exit_on_error: None,
        })
        .await?;
    session.wait_migration(limit).await
}

/// Runs a human monitor command; returns its text output.
pub async fn human(path: &Path, command_line: &str) -> Result<String, QmpError> {
    execute(
        path,
        qmp::human_monitor_command {
            command_line: command_line.to_string(),
            cpu_index: None,
        },
    )
    .await
}

/// The file QEMU writes the root drive to now (the top of its chain).
pub async fn active_disk(path: &Path) -> Result<Option<PathBuf>, QmpError> {
    let devices = execute(path, QueryBlock {}).await?;
    Ok(devices
        .into_iter()
        .find(|d| d.device.as_deref() == Some(ROOT_DRIVE))
        .and_then(|d| d.inserted)
        .map(|i| PathBuf::from(i.file)))
}

/// Single-quotes `path` for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`).
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// `query-migrate`, reading only what we use.
#[derive(Debug, Serialize)]
pub struct QueryMigrate {}

#[derive(Debug, Deserialize)]
pub struct MigrationState {
    pub status: Option<String>,
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

impl qapi::Command for QueryMigrate {
    type Ok = MigrationState;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}
impl qmp::QmpCommand for QueryMigrate {}

/// `query-block`, reading only what we use.
#[derive(Debug, Serialize)]
pub struct QueryBlock {}

#[derive(Debug, Deserialize)]
pub struct BlockDevice {
    pub device: Option<String>,
    pub inserted: Option<InsertedMedium>,
}

#[derive(Debug, Deserialize)]
pub struct InsertedMedium {
    pub file: String,
}

impl qapi::Command for QueryBlock {
    type Ok = Vec<BlockDevice>;
    const NAME: &'static str = "query-block";
    const ALLOW_OOB: bool = false;
}
impl qmp::QmpCommand for QueryBlock {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(
            shell_quote(Path::new("/s/a b/state.bin")),
            "'/s/a b/state.bin'"
        );
        assert_eq!(
            shell_quote(Path::new("/s/it's; rm -rf x/state.bin")),
            r"'/s/it'\''s; rm -rf x/state.bin'"
        );
    }

    #[test]
    fn lenient_replies_decode_what_qemu_7_2_sends() {
        let state: MigrationState = serde_json::from_str(
            r#"{"status":"completed","setup-time":1,"ram":{"transferred":5}}"#,
        )
        .unwrap();
        assert_eq!(state.status.as_deref(), Some("completed"));
        let devices: Vec<BlockDevice> = serde_json::from_str(
            r#"[{"device":"root","locked":false,"inserted":{"file":"/s/layers/a.qcow2","ro":false}}]"#,
        )
        .unwrap();
        assert_eq!(
            devices[0].inserted.as_ref().unwrap().file,
            "/s/layers/a.qcow2"
        );
    }
}
