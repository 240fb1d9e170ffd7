//! The REST API server of arrakis: the routes of the original Arrakis
//! server (what py-arrakis 2.0.0 calls), under `/v1` and also without the
//! prefix (what py-arrakis 1.x and the MCP server call).
//!
//! Handlers are thin: they parse [`wire`] types into runtime calls on a
//! [`Manager`] and map [`arrakis_runtime::ErrorKind`] to HTTP statuses
//! ([`error`]). The OpenAPI document is generated from the same handler
//! annotations that register the routes ([`openapi`]), so the two cannot
//! drift apart.

pub mod error;
mod extract;
pub mod openapi;
mod routes;
pub mod wire;

use arrakis_runtime::Manager;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::Router;
use bytes::Bytes;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

/// Largest request body accepted (file uploads are JSON text).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    manager: Manager,
    /// The OpenAPI document, serialized once.
    openapi: Bytes,
}

/// Serves the API on `listener` until the process ends or accepting fails.
pub async fn serve(listener: tokio::net::TcpListener, manager: Manager) -> std::io::Result<()> {
    axum::serve(listener, router(manager)).await
}

/// Every route, under `/v1` and unprefixed, with JSON 404/405 replies for
/// unknown paths and methods.
pub fn router(manager: Manager) -> Router {
    let openapi = openapi::document()
        .to_json()
        .map(Bytes::from)
        .unwrap_or_else(|e| Bytes::from(format!("{{\"error\":{{\"message\":\"{e}\"}}}}")));
    let state = AppState { manager, openapi };
    let (v1, _) = OpenApiRouter::new()
        .nest("/v1", routes::all())
        .split_for_parts();
    let (bare, _) = routes::all().split_for_parts();
    v1.merge(bare)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// One log line per request: method, path, status and duration.
async fn log_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // Server errors also log their message where they are rendered.
    tracing::info!(%method, %path, status, elapsed_ms, "request");
    response
}

/// Message prefix of the 404 for a path no route serves.
pub const NO_ROUTE: &str = "no route for";

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        format!("{NO_ROUTE} {method} {}", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrakis_runtime::RuntimeConfig;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;
    use utoipa::openapi::path::HttpMethod;

    /// A router on a real manager over an empty temporary state directory
    /// (no VM is ever started here).
    async fn app() -> (Router, tempfile::TempDir) {
        let home = tempfile::tempdir().unwrap();
        let manager = Manager::open(RuntimeConfig::with_home(home.path()))
            .await
            .expect("open a manager on an empty state dir");
        (router(manager), home)
    }

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY_BYTES)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {uri}: body is not JSON ({e}): {bytes:?}"));
        (status, json)
    }

    fn message(json: &Value) -> &str {
        json["error"]["message"].as_str().unwrap_or("")
    }

    const METHODS: [(HttpMethod, &str); 5] = [
        (HttpMethod::Get, "GET"),
        (HttpMethod::Post, "POST"),
        (HttpMethod::Put, "PUT"),
        (HttpMethod::Patch, "PATCH"),
        (HttpMethod::Delete, "DELETE"),
    ];

    /// Every documented operation is served (under /v1 and unprefixed), and
    /// every other method on a documented path is a 405; a path the
    /// document does not have is the router's 404.
    #[tokio::test]
    async fn served_routes_match_the_document() {
        let (app, _home) = app().await;
        let doc = openapi::document();
        let expected = [
            "/v1/health",
            "/v1/openapi.json",
            "/v1/vms",
            "/v1/vms/{name}",
            "/v1/vms/{name}/cmd",
            "/v1/vms/{name}/files",
        ];
        let mut documented: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        documented.sort_unstable();
        assert_eq!(documented, expected);
        for (path, item) in &doc.paths.paths {
            let concrete = path.replace("{name}", "no-such-vm");
            let bare = concrete
                .strip_prefix("/v1")
                .expect("every path is under /v1");
            for (method, verb) in METHODS {
                let documented = match method {
                    HttpMethod::Get => item.get.is_some(),
                    HttpMethod::Post => item.post.is_some(),
                    HttpMethod::Put => item.put.is_some(),
                    HttpMethod::Patch => item.patch.is_some(),
                    HttpMethod::Delete => item.delete.is_some(),
                    _ => false,
                };
                for uri in [concrete.as_str(), bare] {
                    let (status, json) = call(&app, verb, uri, "").await;
                    if documented {
                        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{verb} {uri}");
                        assert!(
                            !message(&json).starts_with(NO_ROUTE),
                            "{verb} {uri} is documented but not served: {json}"
                        );
                    } else {
                        assert_eq!(
                            status,
                            StatusCode::METHOD_NOT_ALLOWED,
                            "{verb} {uri} is served but not documented: {json}"
                        );
                    }
                }
            }
        }
        for uri in ["/v1/vms/a/snapshots", "/v1/vms/", "/v2/health", "/v1"] {
            let (status, json) = call(&app, "GET", uri, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert!(message(&json).starts_with(NO_ROUTE), "{uri}: {json}");
        }
    }

    #[tokio::test]
    async fn the_document_is_served() {
        let (app, _home) = app().await;
        let (status, json) = call(&app, "GET", "/v1/openapi.json", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, serde_json::to_value(openapi::document()).unwrap());
        let schemas = &json["components"]["schemas"];
        assert_eq!(
            schemas["VmStatus"]["enum"],
            serde_json::json!(["RUNNING", "STOPPED", "PAUSED"])
        );
        assert_eq!(
            schemas["CmdRequest"]["required"],
            serde_json::json!(["cmd"]),
            "{}",
            schemas["CmdRequest"]
        );
        let vm = &schemas["Vm"]["properties"];
        for key in ["vmName", "status", "ip", "tapDeviceName", "portForwards"] {
            assert!(vm.get(key).is_some(), "Vm.{key} missing: {vm}");
        }
    }

    #[tokio::test]
    async fn errors_without_vms() {
        let (app, _home) = app().await;
        let (status, json) = call(&app, "GET", "/v1/health", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["status"], "healthy");
        let stamp = json["timestamp"].as_str().unwrap();
        assert!(stamp.ends_with('Z') && stamp.len() == 20, "{stamp}");

        let (status, json) = call(&app, "GET", "/v1/vms", "").await;
        assert_eq!(
            (status, json),
            (StatusCode::OK, serde_json::json!({"vms": []}))
        );

        let cases = [
            (
                "GET",
                "/v1/vms/my%20sb",
                "",
                404,
                "no sandbox named \"my sb\"",
            ),
            ("DELETE", "/vms/%C3%BC", "", 404, "no sandbox named \"ü\""),
            (
                "PATCH",
                "/v1/vms/x",
                r#"{"status":"paused"}"#,
                404,
                "no sandbox",
            ),
            (
                "PATCH",
                "/v1/vms/x",
                r#"{"status":"running"}"#,
                400,
                "invalid status",
            ),
            (
                "POST",
                "/v1/vms/x/cmd",
                r#"{"cmd":"true"}"#,
                404,
                "no sandbox",
            ),
            (
                "POST",
                "/v1/vms/x/cmd",
                r#"{"cmd":""}"#,
                400,
                "cmd is empty",
            ),
            (
                "POST",
                "/v1/vms/x/files",
                r#"{"files":[]}"#,
                400,
                "files is empty",
            ),
            ("GET", "/v1/vms/x/files", "", 400, "'paths'"),
            ("GET", "/v1/vms/x/files?paths=a", "", 404, "no sandbox"),
            ("POST", "/v1/vms", "", 400, "vmName"),
            ("POST", "/v1/vms", "{", 400, "invalid request body"),
            (
                "POST",
                "/v1/vms",
                r#"{"vmName":"a/b"}"#,
                400,
                "invalid name",
            ),
            (
                "POST",
                "/v1/vms",
                r#"{"vmName":"a","snapshotId":"s"}"#,
                501,
                "later issue",
            ),
            (
                "POST",
                "/v1/vms",
                r#"{"vmName":"a","rootfs":"/r"}"#,
                422,
                "rootfs",
            ),
            ("PUT", "/v1/vms", "", 405, "not allowed"),
        ];
        for (method, uri, body, code, hint) in cases {
            let (status, json) = call(&app, method, uri, body).await;
            assert_eq!(status.as_u16(), code, "{method} {uri} {body}: {json}");
            assert!(
                message(&json).contains(hint),
                "{method} {uri} {body}: {json}"
            );
        }
        let (status, json) = call(&app, "DELETE", "/v1/vms", "").await;
        assert_eq!(
            (status, json),
            (StatusCode::OK, serde_json::json!({"success": true}))
        );
    }
}
