//! A VM's network at runtime: port forwards and the egress policy.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::detached;
use crate::error::ApiError;
use crate::extract::{JsonBody, Query, VmName};
use crate::wire::{AddForwardsRequest, EgressRequest, ErrorBody, Vm};
use crate::AppState;

/// Adds port forwards (host ports picked from the server's range when
/// absent or 0). All or nothing. Works in any state: a stopped VM gets
/// them at its next start.
#[utoipa::path(
    post,
    path = "/vms/{name}/portForwards",
    tag = "network",
    params(("name" = String, Path, description = "The VM name")),
    request_body = AddForwardsRequest,
    responses(
        (status = 200, body = Vm, description = "The VM with all its forwards"),
        (status = 400, body = ErrorBody, description = "A guest port of 0, a host port given twice, too many forwards"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A requested host port is in use"),
        (status = 429, body = ErrorBody, description = "No free host port is left in the range"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn add_forwards(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<AddForwardsRequest>,
) -> Result<Json<Vm>, ApiError> {
    let manager = state.manager;
    let info = detached(async move {
        let requests = request
            .port_forwards
            .into_iter()
            .map(|r| r.into_runtime())
            .collect();
        manager.add_forwards(&name, requests).await?;
        Ok(manager.get(&name).await?)
    })
    .await?;
    Ok(Json(Vm::from(&info)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RemoveForwardQuery {
    /// The host port of the forward to remove.
    host_port: u16,
}

/// Removes the forward on one host port (the port is free for others).
#[utoipa::path(
    delete,
    path = "/vms/{name}/portForwards",
    tag = "network",
    params(("name" = String, Path, description = "The VM name"), RemoveForwardQuery),
    responses(
        (status = 200, body = Vm, description = "The VM with its remaining forwards"),
        (status = 400, body = ErrorBody, description = "No or a bad hostPort"),
        (status = 404, body = ErrorBody, description = "No such VM, or it has no forward on that port"),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn remove_forward(
    State(state): State<AppState>,
    VmName(name): VmName,
    Query(query): Query<RemoveForwardQuery>,
) -> Result<Json<Vm>, ApiError> {
    let manager = state.manager;
    let info = detached(async move {
        let removed = manager
            .remove_forwards(&name, Some(vec![query.host_port]))
            .await?;
        if removed.is_empty() {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!(
                    "VM {name:?} has no forward on host port {}",
                    query.host_port
                ),
            ));
        }
        Ok(manager.get(&name).await?)
    })
    .await?;
    Ok(Json(Vm::from(&info)))
}

/// Replaces the VM's egress policy; connections it opens from now on
/// follow it (bridge mode; in user mode the policy is fixed at creation).
#[utoipa::path(
    put,
    path = "/vms/{name}/egress",
    tag = "network",
    params(("name" = String, Path, description = "The VM name")),
    request_body = EgressRequest,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody, description = "Not a policy, or the VM's network mode cannot apply it"),
        (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub(crate) async fn set_egress(
    State(state): State<AppState>,
    VmName(name): VmName,
    JsonBody(request): JsonBody<EgressRequest>,
) -> Result<Json<Vm>, ApiError> {
    let manager = state.manager;
    let info = detached(async move {
        manager.set_egress(&name, request.egress).await?;
        Ok(manager.get(&name).await?)
    })
    .await?;
    Ok(Json(Vm::from(&info)))
}
