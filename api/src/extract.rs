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
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
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
    }
}
