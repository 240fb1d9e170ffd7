//! The one error type of the HTTP edge, [`ApiError`]: a status and a message,
//! rendered as `{"error":{"message":"..."}}`. Runtime errors map by
//! [`ErrorKind`], never by message text.

use arrakis_runtime::{ErrorKind, RuntimeError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::wire::ErrorBody;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// Malformed input: a body that is not JSON, a missing field (400).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// Well-formed input this server does not accept (422).
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

/// The HTTP status of a runtime error kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::FailedPrecondition => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> ApiError {
        ApiError::new(status_of(error.kind()), error.chain())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        (self.status, Json(ErrorBody::new(self.message))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrakis_runtime::{Operation, SandboxState};

    #[test]
    fn every_kind_has_its_status() {
        let cases = [
            (ErrorKind::InvalidArgument, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::AlreadyExists, 409),
            (ErrorKind::Conflict, 409),
            (ErrorKind::PermissionDenied, 403),
            (ErrorKind::FailedPrecondition, 503),
            (ErrorKind::ResourceExhausted, 429),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(status_of(kind).as_u16(), status, "{kind:?}");
        }
    }

    #[test]
    fn runtime_errors_keep_their_message() {
        let error = ApiError::from(RuntimeError::InvalidState {
            name: "a b".into(),
            state: SandboxState::Stopped,
            op: Operation::Pause,
        });
        assert_eq!(error.status, StatusCode::CONFLICT);
        assert_eq!(error.message, "cannot pause sandbox \"a b\": it is stopped");
        let missing = ApiError::from(RuntimeError::NotFound { name: "x".into() });
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_eq!(missing.message, "no sandbox named \"x\"");
    }

    #[tokio::test]
    async fn the_body_is_the_error_object() {
        let response = ApiError::bad_request("vmName is required").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "vmName is required"}})
        );
    }
}
