//! The VM resource: start (or restart), list, get, change state, destroy.

use arrakis_runtime::{ErrorKind, SandboxState};
use axum::extract::State;
use axum::Json;

use super::detached;
use crate::error::ApiError;
use crate::extract::{JsonBody, VmName};
use crate::metrics::Operation;
use crate::wire::{
    ErrorBody, StartCommand, StartVmRequest, StateChange, Success, UpdateStateRequest, Vm, VmList,
};
use crate::AppState;

/// Starts a new VM, boots a stopped one with the same name again, or (with
/// `snapshotId`) restores a snapshot as a new VM named `vmName`. Returns
/// once commands can run in it.
#[utoipa::path(
    post,
    path = "/vms",
    tag = "vms",
    request_body = StartVmRequest,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody, description = "Not JSON, or no vmName"),
        (status = 409, body = ErrorBody, description = "A VM with this name is running or paused, \
            or a requested host port is in use"),
        (status = 404, body = ErrorBody, description = "No snapshot with this snapshotId"),
        (status = 422, body = ErrorBody, description = "kernel, initramfs or rootfs given; or sizes with snapshotId"),
        (status = 429, body = ErrorBody, description = "The server's sandbox limit is reached"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<StartVmRequest>,
) -> Result<Json<Vm>, ApiError> {
    let spec = match request.parse()? {
        StartCommand::Start { spec } => spec,
        StartCommand::Restore { name, snapshot_id } => {
            let manager = state.manager.clone();
            let started = std::time::Instant::now();
            let info =
                detached(async move { Ok(manager.restore(&snapshot_id, &name).await?) }).await?;
            state
                .metrics
                .operation(Operation::Restore, started.elapsed());
            return Ok(Json(Vm::from(&info)));
        }
    };
    let manager = state.manager.clone();
    let started = std::time::Instant::now();
    let info = detached(async move {
        let name = spec.name.clone();
        match manager.get(&name).await {
            Ok(info) if matches!(info.state, SandboxState::Stopped | SandboxState::Crashed) => {
                // A restart keeps the VM's forwards and adds those asked for.
                if !spec.forwards.is_empty() {
                    manager.add_forwards(&name, spec.forwards).await?;
                }
                Ok(manager.start(&name).await?)
            }
            Ok(_) => Ok(manager.create(spec).await?),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(manager.create(spec).await?),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    state.metrics.operation(Operation::Boot, started.elapsed());
    Ok(Json(Vm::from(&info)))
}

/// Every VM.
#[utoipa::path(
    get,
    path = "/vms",
    tag = "vms",
    responses((status = 200, body = VmList), (status = 500, body = ErrorBody))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<VmList>, ApiError> {
    let infos = state.manager.list().await?;
    Ok(Json(VmList {
        vms: infos.iter().map(Vm::from).collect(),
    }))
}

/// Destroys every VM; `{"success":true}` also when there are none.
#[utoipa::path(
    delete,
    path = "/vms",
    tag = "vms",
    responses((status = 200, body = Success), (status = 500, body = ErrorBody))
)]
pub(crate) async fn destroy_all(State(state): State<AppState>) -> Result<Json<Success>, ApiError> {
    let manager = state.manager;
    detached(async move {
        let infos = manager.list().await?;
        let mut failures = Vec::new();
        for info in &infos {
            match manager.destroy(&info.name).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => failures.push(format!("{:?}: {}", info.name, e.chain())),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ApiError::internal(format!(
                "failed to destroy {} of {} VMs: {}",
                failures.len(),
                infos.len(),
                failures.join("; ")
            )))
        }
    })
    .await?;
    Ok(Json(Success::TRUE))
}

/// One VM.
#[utoipa::path(
    get,
    path = "/vms/{name}",
    tag = "vms",
    params(("name" = String, Path, description = "The VM name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    VmName(name): VmName,
) -> Result<Json<Vm>, ApiError> {
    let info = state.manager.get(&name).await?;
    Ok(Json(Vm::from(&info)))
}

/// Stops (`stopped`: powers off, can be started again with `POST /vms`),
/// pauses (`paused`) or resumes (`resume`) a VM.
#[utoipa::path(
    patch,
    path = "/vms/{name}",
    tag = "vms",
    params(("name" = String, Path, description = "The VM name")),
    request_body = UpdateStateRequest,
    responses(
        (status = 200, body = Success),
        (status = 400, body = ErrorBody, description = "Not JSON, or an unknown status"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM's state does not allow it"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<UpdateStateRequest>,
) -> Result<Json<Success>, ApiError> {
    let change = request.parse()?;
    let manager = state.manager;
    detached(async move {
        match change {
            StateChange::Stop => manager.stop(&name).await?,
            StateChange::Pause => manager.pause(&name).await?,
            StateChange::Resume => manager.resume(&name).await?,
        };
        Ok(())
    })
    .await?;
    Ok(Json(Success::TRUE))
}

/// Destroys a VM and its disk.
#[utoipa::path(
    delete,
    path = "/vms/{name}",
    tag = "vms",
    params(("name" = String, Path, description = "The VM name")),
    responses(
        (status = 200, body = Success),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn destroy(
    State(state): State<AppState>,
    VmName(name): VmName,
) -> Result<Json<Success>, ApiError> {
    let manager = state.manager;
    detached(async move {
        manager.destroy(&name).await?;
        Ok(())
    })
    .await?;
    Ok(Json(Success::TRUE))
}
