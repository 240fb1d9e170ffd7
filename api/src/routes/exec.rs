//! `POST /vms/{name}/exec`: a command with an exit code and separate
//! stdout and stderr, answered as one JSON object or, with `Accept:
//! text/event-stream`, streamed as server-sent events; and `GET
//! /vms/{name}/exec/ws`, the same over a WebSocket with stdin.
//!
//! A client that goes away (closes the event stream or the socket) ends
//! the command: dropping the agent session makes the guest kill its
//! process tree, so nothing keeps running unobserved.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Instant;

use arrakis_protocol::ExitStatus;
use arrakis_runtime::{AgentClient, AgentError, ExecDefaults, ExecEvent, ExecOptions, ExecSession};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::Stream;

use super::exec_defaults;
use super::in_vm;
use crate::error::ApiError;
use crate::extract::{parse_body, JsonBody, VmName};
use crate::wire::exec::{ExecBody, ExecExit, ExecResult, OutputChunk, Utf8Chunker, WsMessage};
use crate::wire::{ErrorBody, WORK_DIR};
use crate::AppState;

/// Output kept of each of stdout and stderr in a JSON reply.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// Runs a command. The reply is an [`ExecResult`]; with `Accept:
/// text/event-stream` it is a stream of `stdout` and `stderr` events
/// (data `{"data":"text"}`) as output arrives, ended by an `exit` event
/// (data: [`ExecExit`]) or an `error` event (data `{"message":"..."}`).
#[utoipa::path(
    post,
    path = "/vms/{name}/exec",
    tag = "exec",
    params(("name" = String, Path, description = "The VM name")),
    request_body = ExecBody,
    responses(
        (status = 200, body = ExecResult, description = "The command ran (whatever its exit code); \
            as text/event-stream when asked for"),
        (status = 400, body = ErrorBody, description = "Not JSON, or an invalid field"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn exec(
    State(state): State<AppState>,
    VmName(name): VmName,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let defaults = exec_defaults(&state, &name).await?;
    let request = body.to_request(&defaults, false)?;
    let agent = state.manager.agent(&name).await?;
    let in_vm = in_vm(&name);
    agent.mkdir(WORK_DIR, true, None).await.map_err(&in_vm)?;
    let started = Instant::now();
    let session = agent.exec_stream(request).await.map_err(&in_vm)?;
    if let Some(stdin) = body.stdin {
        feed_stdin(&session, stdin);
    }
    if wants_events(&headers) {
        let events = events(session, started);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let output = match session
        .wait(ExecOptions {
            max_output_bytes: MAX_OUTPUT_BYTES,
        })
        .await
    {
        Ok(output) => output,
        Err(source) => return Err(super::agent_failure(&state, &name, source).await),
    };
    Ok(Json(ExecResult {
        exit: ExecExit::new(output.status, started.elapsed()),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        truncated: output.stdout_truncated || output.stderr_truncated,
    })
    .into_response())
}

fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("text/event-stream"))
}

/// Writes `text` to the command's stdin and closes it, from a task of its
/// own so a command that writes before it reads cannot deadlock the reply.
fn feed_stdin(session: &ExecSession, text: String) {
    let stdin = session.stdin();
    tokio::spawn(async move {
        if !text.is_empty() {
            // A command that exits without reading closes its stdin: fine.
            let _ = stdin.write(Bytes::from(text)).await;
        }
        let _ = stdin.close().await;
    });
}

/// Output, in order, as text on character boundaries per channel.
#[derive(Default)]
struct Decoder {
    stdout: Utf8Chunker,
    stderr: Utf8Chunker,
}

/// What a session yields next, for both streaming transports.
enum Step {
    Stdout(String),
    Stderr(String),
    Exit(ExitStatus),
    Failed(String),
}

impl Decoder {
    /// The steps one event makes (none for a chunk that ends mid-character).
    fn steps(&mut self, event: Result<ExecEvent, AgentError>) -> Vec<Step> {
        match event {
            Ok(ExecEvent::Stdout(data)) => non_empty(self.stdout.push(&data), Step::Stdout),
            Ok(ExecEvent::Stderr(data)) => non_empty(self.stderr.push(&data), Step::Stderr),
            Ok(ExecEvent::Exited(status)) => {
                let mut steps = non_empty(self.stdout.finish(), Step::Stdout);
                steps.extend(non_empty(self.stderr.finish(), Step::Stderr));
                steps.push(Step::Exit(status));
                steps
            }
            Err(error) => vec![Step::Failed(arrakis_runtime::agent::error_chain(&error))],
        }
    }
}

fn non_empty(text: String, step: fn(String) -> Step) -> Vec<Step> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![step(text)]
    }
}

/// The server-sent events of one session.
fn events(session: ExecSession, started: Instant) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Run {
        session: ExecSession,
        decoder: Decoder,
        queue: VecDeque<Step>,
        ended: bool,
    }
    let run = Run {
        session,
        decoder: Decoder::default(),
        queue: VecDeque::new(),
        ended: false,
    };
    futures_util::stream::unfold(run, move |mut run| async move {
        loop {
            if let Some(step) = run.queue.pop_front() {
                let event = match step {
                    Step::Stdout(data) => sse("stdout", &OutputChunk { data }),
                    Step::Stderr(data) => sse("stderr", &OutputChunk { data }),
                    Step::Exit(status) => sse("exit", &ExecExit::new(status, started.elapsed())),
                    Step::Failed(message) => sse("error", &ErrorBodyMessage { message }),
                };
                return Some((Ok(event), run));
            }
            if run.ended {
                return None;
            }
            let steps = run.decoder.steps(run.session.next().await);
            run.ended = steps
                .iter()
                .any(|step| matches!(step, Step::Exit(_) | Step::Failed(_)));
            run.queue.extend(steps);
        }
    })
}

#[derive(serde::Serialize)]
struct ErrorBodyMessage {
    message: String,
}

fn sse(name: &str, data: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_string());
    Event::default().event(name).data(data)
}

/// Runs a command over a WebSocket, with stdin. Messages are JSON text
/// frames: the client's first is an [`ExecBody`]; then the client sends
/// `{"type":"stdin","data":"..."}`, `{"type":"eof"}` and `{"type":"signal",
/// "signal":N}` (binary frames are stdin bytes too); the server sends
/// `started`, `stdout`, `stderr`, and finally `exit` or `error`, then
/// closes. See [`WsMessage`].
#[utoipa::path(
    get,
    path = "/vms/{name}/exec/ws",
    tag = "exec",
    params(("name" = String, Path, description = "The VM name")),
    responses(
        (status = 101, description = "Switching to the WebSocket exec protocol"),
        (status = 400, body = ErrorBody, description = "Not a WebSocket upgrade request"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
    )
)]
pub(crate) async fn exec_ws(
    State(state): State<AppState>,
    VmName(name): VmName,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "expected a WebSocket upgrade request: {}",
            e.body_text()
        ))
    })?;
    // Fail before upgrading when the VM cannot run commands.
    let defaults = exec_defaults(&state, &name).await?;
    let agent = state.manager.agent(&name).await?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        let mut socket = socket;
        if let Err(message) = ws_session(&mut socket, &agent, &defaults).await {
            let _ = send(&mut socket, &WsMessage::Error { message }).await;
        }
        let _ = socket.send(Message::Close(None)).await;
    }))
}

async fn send(socket: &mut WebSocket, message: &WsMessage) -> Result<(), String> {
    let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("sending to the client: {e}"))
}

async fn ws_session(
    socket: &mut WebSocket,
    agent: &AgentClient,
    defaults: &ExecDefaults,
) -> Result<(), String> {
    let first = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(text))) => break Bytes::from(text.as_str().to_owned()),
            Some(Ok(Message::Binary(bytes))) => break bytes,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Err(e)) => return Err(format!("receiving from the client: {e}")),
        }
    };
    let body: ExecBody = parse_body(&first).map_err(|e| e.message)?;
    let request = body.to_request(defaults, true).map_err(|e| e.message)?;
    agent
        .mkdir(WORK_DIR, true, None)
        .await
        .map_err(|e| arrakis_runtime::agent::error_chain(&e))?;
    let started = Instant::now();
    let mut session = agent
        .exec_stream(request)
        .await
        .map_err(|e| arrakis_runtime::agent::error_chain(&e))?;
    send(socket, &WsMessage::Started { pid: session.pid() }).await?;
    let stdin = session.stdin();
    if let Some(text) = body.stdin {
        stdin
            .write(Bytes::from(text))
            .await
            .map_err(|e| arrakis_runtime::agent::error_chain(&e))?;
    }
    let mut decoder = Decoder::default();
    loop {
        tokio::select! {
            event = session.next() => {
                for step in decoder.steps(event) {
                    let message = match step {
                        Step::Stdout(data) => WsMessage::Stdout { data },
                        Step::Stderr(data) => WsMessage::Stderr { data },
                        Step::Exit(status) => {
                            let exit = ExecExit::new(status, started.elapsed());
                            return send(socket, &WsMessage::Exit(exit)).await;
                        }
                        Step::Failed(message) => return Err(message),
                    };
                    send(socket, &message).await?;
                }
            }
            message = socket.recv() => {
                let message = match message {
                    // The client went away: dropping the session kills the command.
                    Some(Err(_)) | None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(message)) => message,
                };
                match message {
                    Message::Text(text) => match serde_json::from_str::<WsMessage>(text.as_str()) {
                        Ok(WsMessage::Stdin { data }) => {
                            // Writing after the command closed its stdin is not an error.
                            let _ = stdin.write(Bytes::from(data)).await;
                        }
                        Ok(WsMessage::Eof) => { let _ = stdin.close().await; }
                        Ok(WsMessage::Signal { signal }) => {
                            if !(1..=64).contains(&signal) {
                                return Err(format!("signal {signal} is out of range: accepted 1 to 64"));
                            }
                            session.signal(signal, true).await.map_err(|e| arrakis_runtime::agent::error_chain(&e))?;
                        }
                        Ok(other) => return Err(format!("unexpected message from the client: {other:?}")),
                        Err(e) => return Err(format!("invalid message: {e}; accepted stdin, eof and signal")),
                    },
                    Message::Binary(bytes) => { let _ = stdin.write(bytes).await; }
                    Message::Close(_) | Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        }
    }
}
