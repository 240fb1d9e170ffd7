//! The routes, one file per resource; [`all`] registers them without the
//! `/v1` prefix (the caller nests them).

mod cmd;
mod files;
mod health;
mod vms;

use std::future::Future;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::openapi::{__path_openapi_json, openapi_json};
use crate::AppState;
use cmd::{__path_run, run};
use files::{__path_download, __path_upload, download, upload};
use health::{__path_health, health};
use vms::{
    __path_destroy, __path_destroy_all, __path_get, __path_list, __path_start, __path_update,
};
use vms::{destroy, destroy_all, get, list, start, update};

pub(crate) fn all() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(openapi_json))
        .routes(routes!(start, list, destroy_all))
        .routes(routes!(get, update, destroy))
        .routes(routes!(run))
        .routes(routes!(upload, download))
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
