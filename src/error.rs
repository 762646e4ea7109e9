//! The one place where errors become HTTP responses.
//!
//! Every error a client can see has a stable machine `code`, a human sentence and a status, and is
//! sent as `{"error":{"code":"...","message":"..."}}`. Modules fail with their own small enums and
//! convert into [`ApiError`]; nothing else builds an error response. 5xx bodies never carry the
//! cause: the cause goes to the log where the error is created.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

/// An error answered to a client: status, stable code, human message, and an optional
/// `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable machine code, e.g. `TokenExpired`.
    pub code: &'static str,
    /// A sentence for a human: what happened and what to do.
    pub message: Cow<'static, str>,
    /// Seconds for a `Retry-After` header (429 and 503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 404 `NotFound`.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    /// 413 `PayloadTooLarge`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    /// 500 `InternalError`; the caller logs the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "The gateway failed to handle the request. It has been logged; try again.",
        )
    }

    /// 503 `Unavailable`.
    pub fn unavailable(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// The JSON body, `{"error":{"code","message"}}`.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let body = Outer { error: Inner { code: self.code, message: &self.message } };
        // Serializing two strings cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.body()).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// Turns the plain-text error answers of the standard layers (wrong method, body limit, timeout)
/// into the JSON error body, so a client sees one error shape whatever produced the error.
///
/// Runs on every response, so it only looks at the status and the content type of error answers.
pub fn json_error_bodies(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return res;
    }
    let err = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ApiError::new(status, "MethodNotAllowed", "This route does not accept this HTTP method.")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(status, "PayloadTooLarge", "The request body is larger than the gateway accepts.")
        }
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            "The request took longer than the gateway's request timeout.",
        ),
        StatusCode::NOT_FOUND => ApiError::not_found("No such route."),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "UnsupportedMediaType",
            "Send the body as JSON with Content-Type: application/json.",
        ),
        s if s.is_server_error() => {
            ApiError::new(s, "InternalError", "The gateway failed to handle the request.")
        }
        s => ApiError::new(s, "BadRequest", "The request was not understood."),
    };
    let (parts, _) = res.into_parts();
    let mut new = err.into_response();
    // Keep the headers the stack added (request id, CORS, Allow); the body is new.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().append(name, value.clone());
        }
    }
    new
}

/// A JSON request body whose errors answer 400 `BadRequest` with the parser's explanation.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes =
            <Bytes as axum::extract::FromRequest<S>>::from_request(req, state).await.map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "PayloadTooLarge",
                        "The request body is too large.",
                    )
                } else {
                    ApiError::bad_request("The request body could not be read.")
                }
            })?;
        // Every body of the API is a JSON object; serde would also take an array for a struct.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("The body must be a JSON object."));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("The body is not the expected JSON: {e}.")))
    }
}

/// Deserializes a whole number also written with a zero fraction (`3.0`), which JSON Schema
/// counts as an integer too; `3.5` and negatives are refused.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = f64::deserialize(d)?;
    if n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&n) {
        Ok(n as u32)
    } else {
        Err(serde::de::Error::custom(format!("{n} is not a whole number from 0 to {}", u32::MAX)))
    }
}

/// Deserializes an optional list of percentages (1 to 100) as [`whole_number`] does numbers.
pub fn percentages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    let Some(list) = Option::<Vec<f64>>::deserialize(d)? else { return Ok(None) };
    list.into_iter()
        .map(|n| {
            if n.fract() == 0.0 && (1.0..=100.0).contains(&n) {
                Ok(n as u8)
            } else {
                Err(serde::de::Error::custom(format!("{n} is not a percentage from 1 to 100")))
            }
        })
        .collect::<Result<Vec<u8>, _>>()
        .map(Some)
}

/// The answer for a route that does not exist.
pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("No such route. See the README for the Direct Line and API routes.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_code_and_message() {
        let e = ApiError::new(StatusCode::FORBIDDEN, "TokenExpired", "The token expired.");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "TokenExpired");
        assert_eq!(v["error"]["message"], "The token expired.");
    }

    #[tokio::test]
    async fn plain_errors_become_json() {
        let res = (StatusCode::PAYLOAD_TOO_LARGE, "too big").into_response();
        let res = json_error_bodies(res);
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "PayloadTooLarge");
    }

    #[tokio::test]
    async fn request_timeout_becomes_504() {
        let res = json_error_bodies(StatusCode::REQUEST_TIMEOUT.into_response());
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
