//! Snapshots: created on a VM (`POST /vms/{name}/snapshots`, the
//! original's route), listed, looked up and deleted as resources of their
//! own. Restoring is `POST /vms` with `snapshotId`.

use arrakis_runtime::{ForkSource, SnapshotInfo, MAX_FORKS};
use axum::extract::State;
use axum::Json;

use super::detached;
use crate::error::ApiError;
use crate::extract::{JsonBody, SnapshotId, VmName};
use crate::metrics::Operation;
use crate::wire::snapshots::{
    ForkRequest, RestoreRequest, RollbackRequest, Snapshot, SnapshotList, SnapshotRequest,
};
use crate::wire::{rfc3339, ErrorBody, Success, Vm, VmList};
use crate::AppState;

impl From<&SnapshotInfo> for Snapshot {
    fn from(info: &SnapshotInfo) -> Snapshot {
        Snapshot {
            snapshot_id: info.id.clone(),
            vm_name: info.sandbox.clone(),
            created_at: rfc3339(info.created_at),
            vcpus: info.vcpus,
            memory_mb: info.memory_mb,
            image: info.image.clone(),
            size_bytes: info.size_bytes,
            parent_snapshot: info.parent_snapshot.clone(),
        }
    }
}

/// Snapshots a running or paused VM (memory, devices and disk at one
/// instant); the VM stays as it was.
#[utoipa::path(
    post,
    path = "/vms/{name}/snapshots",
    operation_id = "create_snapshot",
    tag = "snapshots",
    params(("name" = String, Path, description = "The VM name")),
    request_body = SnapshotRequest,
    responses(
        (status = 200, body = Snapshot),
        (status = 400, body = ErrorBody, description = "An invalid snapshotId"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The id is taken, or the VM is not running or paused"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<SnapshotRequest>,
) -> Result<Json<Snapshot>, ApiError> {
    let id = request.snapshot_id.filter(|id| !id.is_empty());
    let manager = state.manager.clone();
    let started = std::time::Instant::now();
    let info = detached(async move { Ok(manager.snapshot(&name, id).await?) }).await?;
    state
        .metrics
        .operation(Operation::Snapshot, started.elapsed());
    Ok(Json(Snapshot::from(&info)))
}

/// The snapshots taken of one VM (also of a VM since destroyed under
/// this name).
#[utoipa::path(
    get,
    path = "/vms/{name}/snapshots",
    operation_id = "list_vm_snapshots",
    tag = "snapshots",
    params(("name" = String, Path, description = "The VM name")),
    responses((status = 200, body = SnapshotList), (status = 500, body = ErrorBody))
)]
pub(crate) async fn list_of_vm(
    State(state): State<AppState>,
    VmName(name): VmName,
) -> Result<Json<SnapshotList>, ApiError> {
    let infos = state.manager.list_snapshots().await?;
    Ok(Json(SnapshotList {
        snapshots: infos
            .iter()
            .filter(|info| info.sandbox == name)
            .map(Snapshot::from)
            .collect(),
    }))
}

/// Every snapshot, oldest first.
#[utoipa::path(
    get,
    path = "/snapshots",
    operation_id = "list_snapshots",
    tag = "snapshots",
    responses((status = 200, body = SnapshotList), (status = 500, body = ErrorBody))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<SnapshotList>, ApiError> {
    let infos = state.manager.list_snapshots().await?;
    Ok(Json(SnapshotList {
        snapshots: infos.iter().map(Snapshot::from).collect(),
    }))
}

/// One snapshot.
#[utoipa::path(
    get,
    path = "/snapshots/{id}",
    operation_id = "get_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot id")),
    responses(
        (status = 200, body = Snapshot),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    SnapshotId(id): SnapshotId,
) -> Result<Json<Snapshot>, ApiError> {
    let info = state.manager.get_snapshot(&id).await?;
    Ok(Json(Snapshot::from(&info)))
}

/// Deletes a snapshot; VMs restored from it keep running. Its id can be
/// used again afterwards.
#[utoipa::path(
    delete,
    path = "/snapshots/{id}",
    operation_id = "delete_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot id")),
    responses(
        (status = 200, body = Success),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    SnapshotId(id): SnapshotId,
) -> Result<Json<Success>, ApiError> {
    let manager = state.manager;
    detached(async move { Ok(manager.delete_snapshot(&id).await?) }).await?;
    Ok(Json(Success::TRUE))
}

/// Restores a snapshot as a new VM (the same as `POST /vms` with
/// `snapshotId`).
#[utoipa::path(
    post,
    path = "/snapshots/{id}/restore",
    operation_id = "restore_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot id")),
    request_body = RestoreRequest,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such snapshot"),
        (status = 409, body = ErrorBody, description = "The name is taken"),
        (status = 429, body = ErrorBody, description = "The server's sandbox limit is reached"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn restore(
    State(state): State<AppState>,
    SnapshotId(id): SnapshotId,
    JsonBody(request): JsonBody<RestoreRequest>,
) -> Result<Json<Vm>, ApiError> {
    let manager = state.manager.clone();
    let started = std::time::Instant::now();
    let name = request.vm_name;
    let info = detached(async move { Ok(manager.restore(&id, &name).await?) }).await?;
    state
        .metrics
        .operation(Operation::Restore, started.elapsed());
    Ok(Json(Vm::from(&info)))
}

fn fork_count(request: &ForkRequest) -> Result<u32, ApiError> {
    if !(1..=MAX_FORKS).contains(&request.count) {
        return Err(ApiError::bad_request(format!(
            "count {} is out of range: accepted 1 to {MAX_FORKS}",
            request.count
        )));
    }
    Ok(request.count)
}

async fn fork(
    state: AppState,
    source: ForkSource,
    count: u32,
    prefix: String,
) -> Result<Json<VmList>, ApiError> {
    let manager = state.manager.clone();
    let started = std::time::Instant::now();
    let infos = detached(async move { Ok(manager.fork(source, count, &prefix).await?) }).await?;
    state
        .metrics
        .operation(Operation::Restore, started.elapsed());
    Ok(Json(VmList {
        vms: infos.iter().map(Vm::from).collect(),
    }))
}

/// Starts `count` independent VMs from a snapshot at once, named
/// `{namePrefix}-1..{count}`; all or nothing.
#[utoipa::path(
    post,
    path = "/snapshots/{id}/fork",
    operation_id = "fork_snapshot",
    tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot id")),
    request_body = ForkRequest,
    responses(
        (status = 200, body = VmList),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such snapshot"),
        (status = 409, body = ErrorBody, description = "A name is taken"),
        (status = 429, body = ErrorBody, description = "The server's sandbox limit is reached"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn fork_snapshot(
    State(state): State<AppState>,
    SnapshotId(id): SnapshotId,
    JsonBody(request): JsonBody<ForkRequest>,
) -> Result<Json<VmList>, ApiError> {
    let count = fork_count(&request)?;
    let prefix = request.name_prefix.unwrap_or_else(|| format!("{id}-fork"));
    fork(state, ForkSource::Snapshot(id), count, prefix).await
}

/// Starts `count` independent copies of a running or paused VM (taking a
/// snapshot of it first), named `{namePrefix}-1..{count}`.
#[utoipa::path(
    post,
    path = "/vms/{name}/fork",
    operation_id = "fork_vm",
    tag = "snapshots",
    params(("name" = String, Path, description = "The VM name")),
    request_body = ForkRequest,
    responses(
        (status = 200, body = VmList),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A name is taken, or the VM is not running or paused"),
        (status = 429, body = ErrorBody, description = "The server's sandbox limit is reached"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn fork_vm(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<ForkRequest>,
) -> Result<Json<VmList>, ApiError> {
    let count = fork_count(&request)?;
    let prefix = request
        .name_prefix
        .unwrap_or_else(|| format!("{name}-fork"));
    fork(state, ForkSource::Sandbox(name), count, prefix).await
}

/// Replaces a VM's memory, devices and disk with a snapshot's, keeping its
/// name (the agent's undo).
#[utoipa::path(
    post,
    path = "/vms/{name}/rollback",
    operation_id = "rollback_vm",
    tag = "snapshots",
    params(("name" = String, Path, description = "The VM name")),
    request_body = RollbackRequest,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody, description = "The snapshot's size or image differs"),
        (status = 404, body = ErrorBody, description = "No such VM or snapshot"),
        (status = 409, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn rollback(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<RollbackRequest>,
) -> Result<Json<Vm>, ApiError> {
    let manager = state.manager.clone();
    let started = std::time::Instant::now();
    let info =
        detached(async move { Ok(manager.rollback(&name, &request.snapshot_id).await?) }).await?;
    state
        .metrics
        .operation(Operation::Restore, started.elapsed());
    Ok(Json(Vm::from(&info)))
}
