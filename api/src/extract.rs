//! Request extractors whose rejections are [`ApiError`]s, so every error
//! reply has the same JSON shape.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The percent-decoded `{name}` of a VM path.
pub struct VmName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<VmName, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid VM name in the path: {e}")))?;
        Ok(VmName(name))
    }
}

/// The percent-decoded `{id}` of a snapshot path.
pub struct SnapshotId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SnapshotId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<SnapshotId, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid snapshot id in the path: {e}")))?;
        Ok(SnapshotId(id))
    }
}

/// A query string decoded into `T`; a missing or invalid parameter is a
/// 400 naming it.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Query<T>, ApiError> {
        let raw = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(raw)
            .map(Query)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// A JSON body, whatever the `Content-Type`. An empty body reads as `{}`,
/// so the reply names the first required field that is missing.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<JsonBody<T>, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        parse_body(&bytes).map(JsonBody)
    }
}

pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => b"{}",
        Some(b'{') => bytes,
        // serde would read an array as the fields in order.
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid request body: expected a JSON object",
            ))
        }
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{CmdRequest, StartVmRequest};

    #[test]
    fn bodies() {
        let empty: StartVmRequest = parse_body(b"").unwrap();
        assert!(empty.parse().unwrap_err().message.contains("vmName"));
        let err = parse_body::<CmdRequest>(b" \n").unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("`cmd`"), "{}", err.message);
        let err = parse_body::<StartVmRequest>(b"not json").unwrap_err();
        assert!(
            err.message.starts_with("invalid request body"),
            "{}",
            err.message
        );
        let err = parse_body::<StartVmRequest>(b"[1]").unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        let err = parse_body::<CmdRequest>(br#" ["echo via array", true]"#).unwrap_err();
        assert!(err.message.contains("JSON object"), "{}", err.message);
    }
}
