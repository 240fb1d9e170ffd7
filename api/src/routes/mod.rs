//! The routes, one file per resource; [`all`] registers them without the
//! `/v1` prefix (the caller nests them).

mod cmd;
mod exec;
mod files;
mod fs;
mod health;
mod network;
mod snapshots;
mod vms;

use std::future::Future;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use arrakis_runtime::ExecDefaults;

use crate::error::ApiError;
use crate::openapi::{__path_openapi_json, openapi_json};
use crate::AppState;
use cmd::{__path_run, run};
use exec::{__path_exec, __path_exec_ws, exec, exec_ws};
use files::{__path_download, __path_upload, download, upload};
use fs::{
    __path_chmod, __path_get_archive, __path_get_file, __path_list as __path_fs_list, __path_mkdir,
    __path_put_archive, __path_put_file, __path_remove, __path_stat, chmod, get_archive, get_file,
    list as fs_list, mkdir, put_archive, put_file, remove, stat,
};
use health::{__path_health, __path_metrics, health, metrics};
use network::{
    __path_add_forwards, __path_remove_forward, __path_set_egress, add_forwards, remove_forward,
    set_egress,
};
use snapshots::{
    __path_create as __path_create_snapshot, __path_delete as __path_delete_snapshot,
    __path_get as __path_get_snapshot, __path_list as __path_list_snapshots,
    __path_list_of_vm as __path_list_vm_snapshots, create as create_snapshot,
    delete as delete_snapshot, get as get_snapshot, list as list_snapshots,
    list_of_vm as list_vm_snapshots,
};
use snapshots::{
    __path_fork_snapshot, __path_fork_vm, __path_restore as __path_restore_snapshot,
    __path_rollback, fork_snapshot, fork_vm, restore as restore_snapshot, rollback,
};
use vms::{
    __path_destroy, __path_destroy_all, __path_get, __path_list, __path_start, __path_update,
};
use vms::{destroy, destroy_all, get, list, start, update};

pub(crate) fn all() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(start, list, destroy_all))
        .routes(routes!(get, update, destroy))
        .routes(routes!(run))
        .routes(routes!(upload, download))
        .routes(routes!(exec))
        .routes(routes!(exec_ws))
        .routes(routes!(stat))
        .routes(routes!(fs_list))
        .routes(routes!(get_file, put_file, remove))
        .routes(routes!(get_archive, put_archive))
        .routes(routes!(mkdir))
        .routes(routes!(chmod))
        .routes(routes!(create_snapshot, list_vm_snapshots))
        .routes(routes!(list_snapshots))
        .routes(routes!(get_snapshot, delete_snapshot))
        .routes(routes!(restore_snapshot))
        .routes(routes!(fork_snapshot))
        .routes(routes!(fork_vm))
        .routes(routes!(rollback))
        .routes(routes!(add_forwards))
        .routes(routes!(remove_forward))
        .routes(routes!(set_egress))
}

/// Maps an agent failure in sandbox `name` to its HTTP error.
pub(crate) fn in_vm(name: &str) -> impl Fn(arrakis_runtime::AgentError) -> ApiError + '_ {
    move |source| {
        ApiError::from(arrakis_runtime::RuntimeError::Agent {
            name: name.to_string(),
            source,
        })
    }
}

/// An agent failure during a request, as the caller should see it: when
/// the sandbox was destroyed or stopped meanwhile (the session ended
/// because of that), a 409 saying so rather than an internal error.
async fn agent_failure(
    state: &AppState,
    name: &str,
    source: arrakis_runtime::AgentError,
) -> ApiError {
    let now = state.manager.get(name).await;
    match now {
        Err(e) if e.kind() == arrakis_runtime::ErrorKind::NotFound => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!("sandbox {name:?} was destroyed while the request ran"),
        ),
        Ok(info) if info.state != arrakis_runtime::SandboxState::Running => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!(
                "sandbox {name:?} is {} now; the request was cut short",
                info.state
            ),
        ),
        _ => in_vm(name)(source),
    }
}

/// What every command in a sandbox starts from: its image's ENV, WORKDIR
/// and USER and the environment it was created with. Also answers 404 for
/// an unknown sandbox.
async fn exec_defaults(state: &AppState, name: &str) -> Result<ExecDefaults, ApiError> {
    Ok(state.manager.exec_defaults(name).await?)
}

/// Runs a lifecycle operation in its own task, so a client that hangs up
/// does not cancel a boot or teardown halfway.
async fn detached<T, F>(operation: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    tokio::spawn(operation)
        .await
        .map_err(|e| ApiError::internal(format!("the operation's task failed: {e}")))?
}
