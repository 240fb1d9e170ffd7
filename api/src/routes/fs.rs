//! The file system beyond the original's text files: stat, list, raw
//! bytes both ways, directories as tar both ways, mkdir, chmod, remove.
//! Contents stream between the HTTP body and the guest agent; nothing is
//! held whole in memory.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use arrakis_protocol::{Command, ExecRequest, FileKind};
use arrakis_runtime::{AgentClient, AgentError, WriteOptions};
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::{ReaderStream, StreamReader};

use super::in_vm;
use crate::archive::{self, EntryHeader, Kind, ReadKind};
use crate::error::ApiError;
use crate::extract::{JsonBody, Query, VmName};
use crate::wire::fs::{
    join, parse_mode, resolve, ChmodBody, Entry, Extracted, Listing, MkdirBody, PathQuery,
    PutFileQuery, RemoveQuery, Written,
};
use crate::wire::{ErrorBody, Success};
use crate::AppState;

/// Buffer between the agent and the HTTP body of a download.
const PIPE_BYTES: usize = 256 * 1024;

/// Describes one path (symlinks are not followed).
#[utoipa::path(
    get,
    path = "/vms/{name}/fs/stat",
    operation_id = "stat_file",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PathQuery),
    responses(
        (status = 200, body = Entry),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such VM or path"),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn stat(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PathQuery>,
) -> Result<Json<Entry>, ApiError> {
    let path = resolve(&query.path)?;
    let agent = state.manager.agent(&name).await?;
    let stat = agent.stat(&path).await.map_err(in_vm(&name))?;
    Ok(Json(Entry::new(path, stat)))
}

/// The entries of a directory, sorted by name.
#[utoipa::path(
    get,
    path = "/vms/{name}/fs/list",
    operation_id = "list_files",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PathQuery),
    responses(
        (status = 200, body = Listing),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such VM or directory"),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PathQuery>,
) -> Result<Json<Listing>, ApiError> {
    let path = resolve(&query.path)?;
    let agent = state.manager.agent(&name).await?;
    let mut stats = agent.list(&path).await.map_err(in_vm(&name))?;
    stats.sort_by(|a, b| a.name.cmp(&b.name));
    let entries = stats
        .into_iter()
        .map(|stat| Entry::in_dir(&path, stat))
        .collect();
    Ok(Json(Listing { path, entries }))
}

/// The bytes of a file, as `application/octet-stream`.
#[utoipa::path(
    get,
    path = "/vms/{name}/fs/file",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PathQuery),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody, description = "The path is a directory (use fs/archive)"),
        (status = 404, body = ErrorBody, description = "No such VM or file"),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn get_file(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = resolve(&query.path)?;
    let agent = state.manager.agent(&name).await?;
    let stat = agent.stat(&path).await.map_err(in_vm(&name))?;
    match stat.kind {
        FileKind::Dir => {
            return Err(ApiError::bad_request(format!(
                "{path} is a directory: download it with GET fs/archive"
            )))
        }
        FileKind::Other => {
            return Err(ApiError::bad_request(format!(
                "{path} is a device, FIFO or socket, not a regular file"
            )))
        }
        FileKind::File | FileKind::Symlink => {}
    }
    let (mut writer, reader) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(async move {
        if let Err(error) = agent.read_file(&path, &mut writer).await {
            // The client sees a body shorter than announced.
            tracing::warn!(%path, error = %arrakis_runtime::agent::error_chain(&error), "download failed");
        }
        let _ = writer.shutdown().await;
    });
    // No Content-Length: /proc files stat as empty, and files change.
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(ReaderStream::new(reader)),
    )
        .into_response())
}

/// The request body as a byte reader.
fn body_reader(body: Body) -> impl AsyncRead + Unpin {
    StreamReader::new(body.into_data_stream().map_err(std::io::Error::other))
}

/// Writes the request body to a file (replacing it; parents are created).
#[utoipa::path(
    put,
    path = "/vms/{name}/fs/file",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PutFileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, body = Written),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn put_file(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PutFileQuery>,
    body: Body,
) -> Result<Json<Written>, ApiError> {
    let path = resolve(&query.path)?;
    let mode = parse_mode("mode", query.mode.as_deref())?;
    let agent = state.manager.agent(&name).await?;
    let options = WriteOptions {
        create_parents: true,
        mode,
        ..WriteOptions::default()
    };
    let mut reader = body_reader(body);
    let bytes = agent
        .write_file(&path, &mut reader, options)
        .await
        .map_err(in_vm(&name))?;
    Ok(Json(Written { path, bytes }))
}

/// Removes a file, a link, or (with `recursive`) a directory tree.
#[utoipa::path(
    delete,
    path = "/vms/{name}/fs/file",
    operation_id = "remove_file",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), RemoveQuery),
    responses(
        (status = 200, body = Success),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running, or the directory is not empty"),
    )
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<RemoveQuery>,
) -> Result<Json<Success>, ApiError> {
    let path = resolve(&query.path)?;
    if path == "/" {
        return Err(ApiError::bad_request("refusing to remove /"));
    }
    let agent = state.manager.agent(&name).await?;
    agent
        .remove(&path, query.recursive)
        .await
        .map_err(in_vm(&name))?;
    Ok(Json(Success::TRUE))
}

/// Creates a directory.
#[utoipa::path(
    post,
    path = "/vms/{name}/fs/mkdir",
    tag = "files",
    params(("name" = String, Path, description = "The VM name")),
    request_body = MkdirBody,
    responses(
        (status = 200, body = Success),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running, or the path exists"),
    )
)]
pub(crate) async fn mkdir(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(body): JsonBody<MkdirBody>,
) -> Result<Json<Success>, ApiError> {
    let path = resolve(&body.path)?;
    let mode = parse_mode("mode", body.mode.as_deref())?;
    let agent = state.manager.agent(&name).await?;
    agent
        .mkdir(&path, body.parents, mode)
        .await
        .map_err(in_vm(&name))?;
    Ok(Json(Success::TRUE))
}

/// Changes permission bits.
#[utoipa::path(
    post,
    path = "/vms/{name}/fs/chmod",
    tag = "files",
    params(("name" = String, Path, description = "The VM name")),
    request_body = ChmodBody,
    responses(
        (status = 200, body = Success),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn chmod(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(body): JsonBody<ChmodBody>,
) -> Result<Json<Success>, ApiError> {
    let path = resolve(&body.path)?;
    let mode = parse_mode("mode", Some(&body.mode))?.unwrap_or(0);
    let agent = state.manager.agent(&name).await?;
    agent.chmod(&path, mode).await.map_err(in_vm(&name))?;
    Ok(Json(Success::TRUE))
}

/// A directory tree as a tar archive (GNU format). Entries are relative
/// to the directory; symlinks are stored as links, not followed.
#[utoipa::path(
    get,
    path = "/vms/{name}/fs/archive",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PathQuery),
    responses(
        (status = 200, description = "A tar archive", content_type = "application/x-tar"),
        (status = 400, body = ErrorBody, description = "The path is not a directory"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn get_archive(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let path = resolve(&query.path)?;
    let agent = state.manager.agent(&name).await?;
    let stat = agent.stat(&path).await.map_err(in_vm(&name))?;
    if stat.kind != FileKind::Dir {
        return Err(ApiError::bad_request(format!(
            "{path} is not a directory: download a file with GET fs/file"
        )));
    }
    let (mut writer, reader) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(async move {
        match write_tree(&agent, &path, &mut writer).await {
            Ok(()) => {
                let _ = writer.write_all(&archive::trailer()).await;
            }
            // Without the trailer, the client sees a truncated archive.
            Err(error) => tracing::warn!(%path, %error, "archive download failed"),
        }
        let _ = writer.shutdown().await;
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(ReaderStream::new(reader)),
    )
        .into_response())
}

/// Directories an archive of an ancestor does not descend into (their
/// entry is kept, empty): endless or huge kernel views, not files.
const VIRTUAL_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Writes the entries under `root`, breadth first, into `out`.
async fn write_tree<W: AsyncWrite + Unpin>(
    agent: &AgentClient,
    root: &str,
    out: &mut W,
) -> Result<(), String> {
    let chain = |e: AgentError| arrakis_runtime::agent::error_chain(&e);
    let io = |e: std::io::Error| e.to_string();
    let mut dirs = VecDeque::from([String::new()]);
    while let Some(relative) = dirs.pop_front() {
        let dir = if relative.is_empty() {
            root.to_string()
        } else {
            join(root, &relative)
        };
        let mut stats = agent.list(&dir).await.map_err(chain)?;
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        for stat in stats {
            let rel = if relative.is_empty() {
                stat.name.clone()
            } else {
                format!("{relative}/{}", stat.name)
            };
            let kind = match stat.kind {
                FileKind::File => Kind::File,
                FileKind::Dir => Kind::Dir,
                FileKind::Symlink => Kind::Symlink(stat.link_target.clone().unwrap_or_default()),
                FileKind::Other => continue,
            };
            let entry = EntryHeader {
                path: rel.clone(),
                kind: kind.clone(),
                size: if kind == Kind::File { stat.size } else { 0 },
                mode: stat.mode,
                mtime: stat.mtime.max(0) as u64,
            };
            out.write_all(&archive::header(&entry).map_err(io)?)
                .await
                .map_err(io)?;
            match kind {
                Kind::File => {
                    let full = join(&dir, &stat.name);
                    let mut exact = Exact::new(&mut *out, stat.size);
                    agent.read_file(&full, &mut exact).await.map_err(chain)?;
                    let short = exact.remaining;
                    if short > 0 {
                        // The file shrank while read: keep the archive well formed.
                        tracing::warn!(path = %full, "file changed while archived");
                        out.write_all(&vec![0; short as usize]).await.map_err(io)?;
                    }
                    out.write_all(&archive::padding(stat.size))
                        .await
                        .map_err(io)?;
                }
                // Kernel file systems are walked only when asked for directly.
                Kind::Dir if VIRTUAL_DIRS.contains(&join(&dir, &stat.name).as_str()) => {}
                Kind::Dir => dirs.push_back(rel),
                Kind::Symlink(_) => {}
            }
        }
    }
    Ok(())
}

/// Passes at most `remaining` bytes to `inner` and drops the rest, so a
/// file that grows while it is read cannot corrupt the archive.
struct Exact<W> {
    inner: W,
    remaining: u64,
}

impl<W> Exact<W> {
    fn new(inner: W, size: u64) -> Exact<W> {
        Exact {
            inner,
            remaining: size,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Exact<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let keep = buf.len().min(self.remaining as usize);
        if keep == 0 {
            return Poll::Ready(Ok(buf.len()));
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, &buf[..keep]) {
            Poll::Ready(Ok(n)) => {
                this.remaining -= n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The archive goes on after this file.
        Poll::Ready(Ok(()))
    }
}

/// Unpacks a tar archive (the request body) into a directory, creating
/// it. Entries must be relative and stay inside it; hard links, devices
/// and FIFOs are skipped.
#[utoipa::path(
    put,
    path = "/vms/{name}/fs/archive",
    tag = "files",
    params(("name" = String, Path, description = "The VM name"), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses(
        (status = 200, body = Extracted),
        (status = 400, body = ErrorBody, description = "Not a tar archive, or an entry escapes the directory"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn put_archive(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<PathQuery>,
    body: Body,
) -> Result<Json<Extracted>, ApiError> {
    let root = resolve(&query.path)?;
    let agent = state.manager.agent(&name).await?;
    let in_vm = in_vm(&name);
    agent.mkdir(&root, true, None).await.map_err(&in_vm)?;
    let mut reader = body_reader(body);
    let bad = |e: std::io::Error| ApiError::bad_request(format!("invalid archive: {e}"));
    let mut extracted = Extracted {
        path: root.clone(),
        entries: 0,
        bytes: 0,
    };
    while let Some(entry) = archive::next_entry(&mut reader).await.map_err(bad)? {
        let relative = archive::safe_relative(&entry.path).map_err(ApiError::bad_request)?;
        let target = if relative.is_empty() {
            root.clone()
        } else {
            join(&root, &relative)
        };
        match &entry.kind {
            ReadKind::File if !relative.is_empty() => {
                let options = WriteOptions {
                    create_parents: true,
                    mode: Some(entry.mode),
                    ..WriteOptions::default()
                };
                let mut content = (&mut reader).take(entry.size);
                let written = agent
                    .write_file(&target, &mut content, options)
                    .await
                    .map_err(&in_vm)?;
                if written != entry.size {
                    return Err(ApiError::bad_request(format!(
                        "invalid archive: it ends inside {:?}",
                        entry.path
                    )));
                }
                extracted.bytes += written;
                extracted.entries += 1;
            }
            ReadKind::Dir => {
                agent
                    .mkdir(&target, true, Some(entry.mode))
                    .await
                    .map_err(&in_vm)?;
                extracted.entries += 1;
            }
            ReadKind::Symlink(link) if !relative.is_empty() => {
                symlink(&agent, link, &target).await.map_err(&in_vm)?;
                extracted.entries += 1;
            }
            _ => {}
        }
        let skip = match entry.kind {
            ReadKind::File if !relative.is_empty() => archive::padded(entry.size) - entry.size,
            _ => archive::padded(entry.size),
        };
        archive::skip(&mut reader, skip).await.map_err(bad)?;
    }
    Ok(Json(extracted))
}

/// The agent has no symlink call: `ln` in the guest makes it.
async fn symlink(agent: &AgentClient, link: &str, target: &str) -> Result<(), AgentError> {
    let parent = target.rsplit_once('/').map_or("/", |(dir, _)| dir);
    if !parent.is_empty() {
        agent.mkdir(parent, true, None).await?;
    }
    let request = ExecRequest {
        command: Command::Argv(vec![
            "ln".into(),
            "-sfn".into(),
            "--".into(),
            link.into(),
            target.into(),
        ]),
        ..ExecRequest::default()
    };
    let output = agent.exec(request, Default::default()).await?;
    if output.status.code == Some(0) {
        Ok(())
    } else {
        Err(AgentError::InvalidRequest(format!(
            "creating the symlink {target} -> {link} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
