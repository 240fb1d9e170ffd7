//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! annotations and the wire types. The router registers the same
//! annotated handlers, so a route cannot be served without being
//! documented.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::wire::exec::{OutputChunk, WsMessage};
use crate::wire::ErrorBody;
use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "arrakis",
        description = "Sandboxes for AI agents, each a microVM. Compatible with the REST API \
                       of the original Arrakis (py-arrakis 2.0.0). Every path is also served \
                       without the /v1 prefix. Errors are {\"error\":{\"message\":\"...\"}}."
    ),
    components(schemas(ErrorBody, WsMessage, OutputChunk))
)]
struct ApiDoc;

/// The document served at `/v1/openapi.json`: every route under `/v1`.
pub fn document() -> utoipa::openapi::OpenApi {
    OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .nest("/v1", crate::routes::all())
        .split_for_parts()
        .1
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], state.openapi)
}
