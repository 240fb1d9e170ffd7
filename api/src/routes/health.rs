//! `GET /health`.

use axum::Json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::wire::Health;

/// Liveness of the server.
#[utoipa::path(get, path = "/health", tag = "meta", responses((status = 200, body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    Json(Health {
        status: "healthy".to_string(),
        timestamp: now.format(&Rfc3339).unwrap_or_default(),
    })
}
