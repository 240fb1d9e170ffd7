//! The REST API server of arrakis: the routes of the original Arrakis
//! server (what py-arrakis 2.0.0 calls), under `/v1` and also without the
//! prefix (what py-arrakis 1.x and the MCP server call).
//!
//! Handlers are thin: they parse [`wire`] types into runtime calls on a
//! [`Manager`] and map [`arrakis_runtime::ErrorKind`] to HTTP statuses
//! ([`error`]). The OpenAPI document is generated from the same handler
//! annotations that register the routes ([`openapi`]), so the two cannot
//! drift apart.

mod archive;
pub mod config;
pub mod error;
mod extract;
pub mod metrics;
pub mod openapi;
mod routes;
pub mod wire;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use arrakis_runtime::Manager;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
use metrics::Metrics;

/// Largest JSON request body accepted (raw file and archive uploads
/// stream and have no limit).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The request id header, taken from the request when valid, else made up;
/// always on the response and in the request's log lines.
pub const REQUEST_ID: &str = "x-request-id";

/// How the server is exposed.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// When set, every request but the health check must carry
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    manager: Manager,
    /// The OpenAPI document, serialized once.
    openapi: Bytes,
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
}

/// Serves the API on `listener` until `shutdown` resolves; requests in
/// flight then finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    manager: Manager,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(manager, options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Every route, under `/v1` and unprefixed, with JSON 404/405 replies for
/// unknown paths and methods.
pub fn router(manager: Manager, options: ServeOptions) -> Router {
    let openapi = openapi::document()
        .to_json()
        .map(Bytes::from)
        .unwrap_or_else(|e| Bytes::from(format!("{{\"error\":{{\"message\":\"{e}\"}}}}")));
    let state = AppState {
        manager,
        openapi,
        metrics: Arc::new(Metrics::default()),
        token: options.token.map(Arc::from),
    };
    let (v1, _) = OpenApiRouter::new()
        .nest("/v1", routes::all())
        .split_for_parts();
    let (bare, _) = routes::all().split_for_parts();
    v1.merge(bare)
        .route_layer(axum::middleware::from_fn(remember_route))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

/// The matched route template, carried on the response for the outer
/// layers (which run before routing and cannot see it otherwise).
#[derive(Clone)]
struct Route(MatchedPath);

async fn remember_route(
    route: Option<MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(Route(route));
    }
    response
}

/// Request id, one log line and the metrics of every request.
async fn request_context(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    if let Ok(value) = HeaderValue::from_str(&id) {
        request.headers_mut().insert(REQUEST_ID, value);
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let route = response
        .extensions()
        .get::<Route>()
        .map_or("unmatched", |r| r.0.as_str())
        .to_string();
    state
        .metrics
        .request(method.as_str(), &route, status, elapsed);
    let elapsed_ms = elapsed.as_millis() as u64;
    // Server errors also log their message where they are rendered.
    span.in_scope(|| tracing::info!(%method, %path, %route, status, elapsed_ms, "request"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// 1 to 128 characters of `[A-Za-z0-9._:-]`: safe to log and echo.
fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn new_request_id() -> String {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{random:016x}")
}

/// With a token configured, every request but the health check needs
/// `Authorization: Bearer <token>`.
async fn authorize(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if path == "/health" || path == "/v1/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => unauthorized("the API token is wrong"),
        None => unauthorized("this server needs an API token: send Authorization: Bearer <token>"),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Compares without an early exit, so timing does not tell how much of a
/// guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        (router(manager, ServeOptions::default()), home)
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
        // Only /metrics answers text; its body is returned as a JSON string.
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            assert!(
                uri.ends_with("/metrics"),
                "{method} {uri}: body is not JSON ({e}): {bytes:?}"
            );
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
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
            "/v1/metrics",
            "/v1/openapi.json",
            "/v1/snapshots",
            "/v1/snapshots/{id}",
            "/v1/snapshots/{id}/fork",
            "/v1/snapshots/{id}/restore",
            "/v1/vms",
            "/v1/vms/{name}",
            "/v1/vms/{name}/cmd",
            "/v1/vms/{name}/egress",
            "/v1/vms/{name}/exec",
            "/v1/vms/{name}/exec/ws",
            "/v1/vms/{name}/files",
            "/v1/vms/{name}/fork",
            "/v1/vms/{name}/fs/archive",
            "/v1/vms/{name}/fs/chmod",
            "/v1/vms/{name}/fs/file",
            "/v1/vms/{name}/fs/list",
            "/v1/vms/{name}/fs/mkdir",
            "/v1/vms/{name}/fs/stat",
            "/v1/vms/{name}/portForwards",
            "/v1/vms/{name}/rollback",
            "/v1/vms/{name}/snapshots",
        ];
        let mut documented: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        documented.sort_unstable();
        assert_eq!(documented, expected);
        for (path, item) in &doc.paths.paths {
            let concrete = path
                .replace("{name}", "no-such-vm")
                .replace("{id}", "no-such-snapshot");
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
        for uri in ["/v1/vms/a/snapshot", "/v1/vms/", "/v2/health", "/v1"] {
            let (status, json) = call(&app, "GET", uri, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert!(message(&json).starts_with(NO_ROUTE), "{uri}: {json}");
        }
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc = openapi::document();
        let mut ids = Vec::new();
        for item in doc.paths.paths.values() {
            for op in [&item.get, &item.post, &item.put, &item.patch, &item.delete]
                .into_iter()
                .flatten()
            {
                ids.push(op.operation_id.clone().expect("every operation has an id"));
            }
        }
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
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
                404,
                "no snapshot",
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

    async fn send(app: &Router, request: Request<Body>) -> axum::response::Response {
        app.clone().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn a_token_guards_everything_but_health() {
        let home = tempfile::tempdir().unwrap();
        let manager = Manager::open(RuntimeConfig::with_home(home.path()))
            .await
            .unwrap();
        let token = "0123456789abcdef0123";
        let app = router(
            manager,
            ServeOptions {
                token: Some(token.to_string()),
            },
        );
        let get = |uri: &str, auth: Option<&str>| {
            let mut builder = Request::builder().uri(uri);
            if let Some(auth) = auth {
                builder = builder.header("authorization", auth);
            }
            builder.body(Body::empty()).unwrap()
        };
        for uri in ["/v1/health", "/health"] {
            assert_eq!(send(&app, get(uri, None)).await.status(), StatusCode::OK);
        }
        for (auth, hint) in [
            (None, "needs an API token"),
            (Some("Bearer nope"), "wrong"),
            (Some(token), "needs an API token"),
        ] {
            let response = send(&app, get("/v1/vms", auth)).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let json: Value = serde_json::from_slice(&body).unwrap();
            assert!(message(&json).contains(hint), "{auth:?}: {json}");
        }
        let bearer = format!("Bearer {token}");
        let response = send(&app, get("/v1/vms", Some(&bearer))).await;
        assert_eq!(response.status(), StatusCode::OK);
        // Unknown paths are hidden behind the token too.
        let response = send(&app, get("/v1/nothing", None)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn request_ids_are_kept_or_made() {
        let (app, _home) = app().await;
        let response = send(
            &app,
            Request::builder()
                .uri("/v1/health")
                .header(REQUEST_ID, "client-id.1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.headers()[REQUEST_ID], "client-id.1");
        for bad in ["has space", "x\u{7f}", ""] {
            let Ok(value) = axum::http::HeaderValue::from_str(bad) else {
                continue;
            };
            let response = send(
                &app,
                Request::builder()
                    .uri("/v1/nothing")
                    .header(REQUEST_ID, value)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            let made = response.headers()[REQUEST_ID].to_str().unwrap();
            assert_eq!(made.len(), 16, "{bad:?} -> {made}");
            assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[tokio::test]
    async fn metrics_count_requests_by_route() {
        let (app, _home) = app().await;
        for _ in 0..3 {
            call(&app, "GET", "/v1/vms/some%20vm", "").await;
        }
        let (status, text) = call(&app, "GET", "/metrics", "").await;
        assert_eq!(status, StatusCode::OK);
        let text = text.as_str().unwrap();
        assert!(
            text.contains(
                "arrakis_http_requests_total{method=\"GET\",route=\"/v1/vms/{name}\",status=\"404\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE arrakis_sandboxes gauge"));
        assert!(text.contains("arrakis_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/vms/{name}\"} 3"));
    }
}
