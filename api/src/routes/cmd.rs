//! `POST /vms/{name}/cmd`: a shell command, run by `bash -c` in the
//! sandbox; no time limit unless the request sets `timeoutSecs`.

use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::{AgentClient, AgentError, ExecEvent};
use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::extract::{JsonBody, VmName};
use crate::wire::exec::timeout_ms;
use crate::wire::{exit_error, CmdRequest, CmdResponse, ErrorBody, WORK_DIR};
use crate::AppState;

/// Combined output kept of one command; the rest is read and dropped.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// Runs `cmd` with `bash -c` in `/tmp/server_files`, as root. A command
/// that fails still gets 200, with `error` set.
#[utoipa::path(
    post,
    path = "/vms/{name}/cmd",
    tag = "vms",
    params(("name" = String, Path, description = "The VM name")),
    request_body = CmdRequest,
    responses(
        (status = 200, body = CmdResponse),
        (status = 400, body = ErrorBody, description = "Not JSON, no cmd, or an empty cmd"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn run(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<CmdRequest>,
) -> Result<Json<CmdResponse>, ApiError> {
    request.validate()?;
    let defaults = super::exec_defaults(&state, &name).await?;
    let exec = ExecRequest {
        command: Command::Shell(request.cmd.clone()),
        env: defaults.env,
        cwd: Some(defaults.cwd.unwrap_or_else(|| WORK_DIR.to_string())),
        user: defaults.user,
        timeout_ms: timeout_ms(request.timeout_secs)?,
        ..ExecRequest::default()
    };
    let agent = state.manager.agent(&name).await?;
    let result = match agent.mkdir(WORK_DIR, true, None).await {
        Err(e) => Err(e),
        Ok(()) if request.blocking => run_blocking(&agent, exec).await,
        Ok(()) => start_background(&agent, exec, &request.cmd).await,
    };
    match result {
        Ok(reply) => Ok(Json(reply)),
        Err(source) => Err(super::agent_failure(&state, &name, source).await),
    }
}

async fn run_blocking(agent: &AgentClient, exec: ExecRequest) -> Result<CmdResponse, AgentError> {
    let mut session = agent.exec_stream(exec).await?;
    let mut output = Vec::new();
    let mut truncated = false;
    let status = loop {
        match session.next().await? {
            ExecEvent::Stdout(data) | ExecEvent::Stderr(data) => {
                let room = MAX_OUTPUT_BYTES.saturating_sub(output.len());
                output.extend_from_slice(&data[..data.len().min(room)]);
                truncated |= data.len() > room;
            }
            ExecEvent::Exited(status) => break status,
        }
    };
    let mut error = exit_error(status.code, status.signal);
    if truncated {
        let note = format!("output truncated to {MAX_OUTPUT_BYTES} bytes");
        error = if error.is_empty() {
            note
        } else {
            format!("{error}; {note}")
        };
    }
    Ok(CmdResponse {
        output: String::from_utf8_lossy(&output).into_owned(),
        error,
    })
}

/// Starts the command and leaves a task that drains its output until it
/// exits (dropping the session would kill it).
async fn start_background(
    agent: &AgentClient,
    exec: ExecRequest,
    cmd: &str,
) -> Result<CmdResponse, AgentError> {
    let mut session = agent.exec_stream(exec).await?;
    tokio::spawn(async move {
        loop {
            match session.next().await {
                Ok(ExecEvent::Exited(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    Ok(CmdResponse {
        output: format!("Command '/usr/bin/bash -c {cmd}' started in background"),
        error: String::new(),
    })
}
