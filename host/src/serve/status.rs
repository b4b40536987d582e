//! Every answer that is not a success, in OpenAI's error shape
//! (`{"error":{"message","type","param","code"}}`), and the one table from a run's
//! [`ErrorKind`] to its HTTP status (docs/serving.md prints it).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, ErrorKind, LimitExceeded, RunError};
use crate::usage::Usage;

/// Every kind's status, OpenAI error `type`, and whether a retry may succeed, in the order the
/// docs/serving.md lists them.
pub const TABLE: [(ErrorKind, u16, &str); 16] = [
    (ErrorKind::Input, 413, "invalid_request_error"),
    (ErrorKind::Model, 422, "invalid_request_error"),
    (ErrorKind::Trap, 422, "invalid_request_error"),
    (ErrorKind::Fuel, 422, "limit_exceeded"),
    (ErrorKind::Memory, 422, "limit_exceeded"),
    (ErrorKind::Table, 422, "limit_exceeded"),
    (ErrorKind::Handles, 422, "limit_exceeded"),
    (ErrorKind::WallTime, 422, "limit_exceeded"),
    (ErrorKind::Output, 422, "limit_exceeded"),
    (ErrorKind::DeviceMemory, 422, "limit_exceeded"),
    (ErrorKind::InputRead, 400, "invalid_request_error"),
    (ErrorKind::Usage, 400, "invalid_request_error"),
    (ErrorKind::Overloaded, 503, "server_error"),
    (ErrorKind::WorkerLost, 503, "server_error"),
    (ErrorKind::InvalidModel, 500, "server_error"),
    (ErrorKind::Internal, 500, "server_error"),
];

/// The status a failed run of `kind` is answered with.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    let code = TABLE
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map_or(500, |(_, status, _)| *status);
    StatusCode::from_u16(code).expect("a valid status")
}

fn type_of(kind: ErrorKind) -> &'static str {
    TABLE
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map_or("server_error", |(_, _, t)| t)
}

/// Retry-After for a lost worker: the pool has already replaced it.
const WORKER_LOST_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An error answer: status, body fields, extra headers (boxed, so that `Result`s carrying it
/// stay small; its fields are reached through `Deref`).
#[derive(Debug)]
pub struct ApiError(Box<ApiErrorFields>);

impl std::ops::Deref for ApiError {
    type Target = ApiErrorFields;
    fn deref(&self) -> &ApiErrorFields {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorFields {
        &mut self.0
    }
}

/// What an [`ApiError`] holds.
#[derive(Debug)]
pub struct ApiErrorFields {
    pub status: StatusCode,
    pub message: String,
    pub error_type: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<String>,
    /// Extra members of the `error` object (a limit's figures, the run's usage).
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub headers: HeaderMap,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(ApiErrorFields {
            status,
            message: message.into(),
            error_type,
            param: None,
            code: None,
            extra: serde_json::Map::new(),
            headers: HeaderMap::new(),
        }))
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = param;
        e
    }

    /// 401: no key, or not a known one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    /// 503 with Retry-After: come back later.
    pub fn unavailable(message: impl Into<String>, code: &str, retry_after: Duration) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .code(code)
            .retry_after(retry_after)
    }

    pub fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn extra(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra.insert(key.to_string(), value);
        self
    }

    pub fn header(mut self, name: &'static str, value: String) -> Self {
        if let Ok(value) = HeaderValue::from_str(&value) {
            self.headers.insert(HeaderName::from_static(name), value);
        }
        self
    }

    /// `Retry-After` in whole seconds, rounded up (never 0: a client must wait a little).
    pub fn retry_after(self, after: Duration) -> Self {
        let seconds = retry_after_seconds(after);
        self.header("retry-after", seconds.to_string())
    }

    /// A failed run: the kind's status, its figures (for a limit) and the usage up to the end.
    pub fn from_run(failure: &RunError) -> Self {
        let mut e = Self::from_error(&failure.error);
        e.extra.insert("usage".into(), usage_json(&failure.usage));
        e
    }

    /// A library error, by its kind.
    pub fn from_error(error: &Error) -> Self {
        let kind = error.kind();
        let mut e = Self::new(status_of(kind), type_of(kind), error.to_string());
        e.code = Some(kind.as_str().to_string());
        if kind == ErrorKind::Input {
            e.param = Some("input");
        }
        if let Some(limit) = error.limit() {
            e.extra.insert("limit".into(), limit_json(limit));
        }
        match error {
            Error::Overloaded { retry_after, .. } => e.retry_after(*retry_after),
            Error::WorkerLost { .. } => e.retry_after(WORKER_LOST_RETRY_AFTER),
            _ => e,
        }
    }

    /// The body, for tests and logs.
    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::Map::new();
        error.insert("message".into(), self.message.clone().into());
        error.insert("type".into(), self.error_type.into());
        error.insert("param".into(), self.param.map_or(json!(null), |p| p.into()));
        error.insert(
            "code".into(),
            self.code.clone().map_or(json!(null), |c| c.into()),
        );
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().extend(self.0.headers);
        response
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_seconds(after: Duration) -> u64 {
    let micros = after.as_micros();
    (micros.div_ceil(1_000_000) as u64).max(1)
}

/// A limit's figures as a flat object: `{"kind":"fuel","limit":..,"consumed":..}`.
pub fn limit_json(limit: &LimitExceeded) -> serde_json::Value {
    let mut object = match serde_json::to_value(limit) {
        Ok(serde_json::Value::Object(tagged)) => tagged
            .into_iter()
            .next()
            .and_then(|(_, inner)| match inner {
                serde_json::Value::Object(fields) => Some(fields),
                _ => None,
            })
            .unwrap_or_default(),
        _ => serde_json::Map::new(),
    };
    // Durations serialise as {secs, nanos}; microseconds read better.
    if let LimitExceeded::WallTime {
        limit: cap,
        elapsed,
    } = limit
    {
        object.clear();
        object.insert("limit_us".into(), (cap.as_micros() as u64).into());
        object.insert("elapsed_us".into(), (elapsed.as_micros() as u64).into());
    }
    let kind = match limit {
        LimitExceeded::Batch { .. } => "batch",
        other => other.kind().as_str(),
    };
    object.insert("kind".into(), kind.into());
    serde_json::Value::Object(object)
}

/// A run's usage as JSON (the library's own serialisation).
pub fn usage_json(usage: &Usage) -> serde_json::Value {
    serde_json::to_value(usage).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_status() {
        for kind in ErrorKind::ALL {
            assert_eq!(
                TABLE.iter().filter(|(k, _, _)| *k == kind).count(),
                1,
                "{kind}"
            );
        }
        assert_eq!(status_of(ErrorKind::Input), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_of(ErrorKind::Fuel), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            status_of(ErrorKind::Overloaded),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(ErrorKind::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn a_limit_trip_carries_its_figures_in_openai_shape() {
        let error: Error = LimitExceeded::Fuel {
            limit: 1000,
            consumed: 1001,
        }
        .into();
        let body = ApiError::from_error(&error).body();
        assert_eq!(body["error"]["type"], "limit_exceeded");
        assert_eq!(body["error"]["code"], "fuel");
        assert_eq!(body["error"]["param"], serde_json::Value::Null);
        assert_eq!(
            body["error"]["limit"],
            json!({"kind": "fuel", "limit": 1000, "consumed": 1001})
        );
        let wall: Error = LimitExceeded::WallTime {
            limit: Duration::from_millis(200),
            elapsed: Duration::from_millis(210),
        }
        .into();
        assert_eq!(
            ApiError::from_error(&wall).body()["error"]["limit"],
            json!({"kind": "wall_time", "limit_us": 200_000, "elapsed_us": 210_000})
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
