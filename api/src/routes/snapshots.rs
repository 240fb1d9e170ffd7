//! Snapshots: created on a VM (`POST /vms/{name}/snapshots`, the
//! original's route), listed, looked up and deleted as resources of their
//! own. Restoring is `POST /vms` with `snapshotId`.

use arrakis_runtime::SnapshotInfo;
use axum::extract::State;
use axum::Json;

use super::detached;
use crate::error::ApiError;
use crate::extract::{JsonBody, SnapshotId, VmName};
use crate::metrics::Operation;
use crate::wire::snapshots::{Snapshot, SnapshotList, SnapshotRequest};
use crate::wire::{rfc3339, ErrorBody, Success};
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
