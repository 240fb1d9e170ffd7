//! `GET /health`.

use axum::Json;

use crate::wire::{rfc3339, Health};

/// Liveness of the server.
#[utoipa::path(get, path = "/health", tag = "meta", responses((status = 200, body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Json(Health {
        status: "healthy".to_string(),
        timestamp: rfc3339(now),
    })
}

/// Prometheus metrics (text format 0.0.4): `arrakis_sandboxes{state}`,
/// `arrakis_http_requests_total`, `arrakis_http_request_duration_seconds`
/// and `arrakis_operation_duration_seconds{operation}`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4"),
        (status = 500, body = crate::wire::ErrorBody),
    )
)]
pub(crate) async fn metrics(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
) -> Result<impl axum::response::IntoResponse, crate::ApiError> {
    let mut by_state = std::collections::BTreeMap::new();
    for info in state.manager.list().await? {
        *by_state.entry(info.state.to_string()).or_insert(0u64) += 1;
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&by_state),
    ))
}
