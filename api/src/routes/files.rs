//! `POST /vms/{name}/files` (upload text files) and `GET
//! /vms/{name}/files?paths=a,b` (download them). Relative paths are under
//! `/tmp/server_files`; absolute paths are used as given both ways, so an
//! upload and a download of the same path round-trip.

use arrakis_protocol::FileKind;
use arrakis_runtime::agent::error_chain;
use arrakis_runtime::{AgentClient, WriteOptions};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;

use crate::error::ApiError;
use crate::extract::{JsonBody, VmName};
use crate::wire::{
    guest_path, parse_download_query, DownloadResponse, Empty, ErrorBody, FileDownload,
    UploadRequest,
};
use crate::AppState;

/// Largest file a download returns (the reply holds it as a JSON string).
pub const MAX_DOWNLOAD_BYTES: u64 = 32 * 1024 * 1024;

/// Writes each file (creating parent directories), in order; stops at the
/// first failure, leaving the files before it written.
#[utoipa::path(
    post,
    path = "/vms/{name}/files",
    tag = "files",
    params(("name" = String, Path, description = "The VM name")),
    request_body = UploadRequest,
    responses(
        (status = 200, body = Empty),
        (status = 400, body = ErrorBody, description = "Not JSON, no files, or an empty path"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<UploadRequest>,
) -> Result<Json<Empty>, ApiError> {
    request.validate()?;
    let agent = state.manager.agent(&name).await?;
    let options = WriteOptions {
        create_parents: true,
        ..WriteOptions::default()
    };
    for (i, file) in request.files.iter().enumerate() {
        agent
            .write_file(
                &guest_path(&file.path),
                &mut file.content.as_bytes(),
                options,
            )
            .await
            .map_err(|source| {
                let error = super::in_vm(&name)(source);
                // The guest refused this path: not a missing VM (404) or a
                // VM state (409), but a file this request cannot write.
                let status = match error.status.as_u16() {
                    403 | 404 | 409 => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => error.status,
                };
                ApiError::new(
                    status,
                    format!("files[{i}] ({:?}): {}", file.path, error.message),
                )
            })?;
    }
    Ok(Json(Empty {}))
}

/// Reads each file as text (invalid UTF-8 becomes U+FFFD). A file that
/// cannot be read is reported in its own `error`, with status 200.
#[utoipa::path(
    get,
    path = "/vms/{name}/files",
    tag = "files",
    params(
        ("name" = String, Path, description = "The VM name"),
        ("paths" = String, Query, min_length = 1, description = "Comma-separated file paths"),
    ),
    responses(
        (status = 200, body = DownloadResponse),
        (status = 400, body = ErrorBody, description = "No paths"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    VmName(name): VmName,
    RawQuery(query): RawQuery,
) -> Result<Json<DownloadResponse>, ApiError> {
    let paths = parse_download_query(query.as_deref())?;
    let agent = state.manager.agent(&name).await?;
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let item = match read_text(&agent, &guest_path(&path)).await {
            Ok(content) => FileDownload {
                path,
                content,
                error: String::new(),
            },
            Err(why) => FileDownload {
                path,
                content: String::new(),
                error: format!("Failed to read file: {why}"),
            },
        };
        files.push(item);
    }
    Ok(Json(DownloadResponse { files }))
}

async fn read_text(agent: &AgentClient, path: &str) -> Result<String, String> {
    let stat = agent.stat(path).await.map_err(|e| error_chain(&e))?;
    match stat.kind {
        FileKind::Dir => return Err(format!("{path} is a directory")),
        FileKind::Other => return Err(format!("{path} is not a regular file")),
        FileKind::File | FileKind::Symlink => {}
    }
    if stat.size > MAX_DOWNLOAD_BYTES {
        return Err(format!(
            "{path} is {} bytes; downloads are limited to {MAX_DOWNLOAD_BYTES}",
            stat.size
        ));
    }
    // The size stat reports is 0 for /proc files: the read is capped too.
    let mut content = Capped::new(MAX_DOWNLOAD_BYTES);
    match agent.read_file(path, &mut content).await {
        Ok(_) => Ok(String::from_utf8_lossy(&content.bytes).into_owned()),
        Err(_) if content.overflowed => Err(format!(
            "{path} is larger than {MAX_DOWNLOAD_BYTES} bytes, the download limit"
        )),
        Err(e) => Err(error_chain(&e)),
    }
}

/// Collects at most `limit` bytes; a write past it fails, which ends the
/// read.
struct Capped {
    bytes: Vec<u8>,
    limit: u64,
    overflowed: bool,
}

impl Capped {
    fn new(limit: u64) -> Capped {
        Capped {
            bytes: Vec::new(),
            limit,
            overflowed: false,
        }
    }
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() as u64 + buf.len() as u64 > self.limit {
            self.overflowed = true;
            return std::task::Poll::Ready(Err(std::io::Error::other("download limit reached")));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
