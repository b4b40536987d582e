//! A request's life around its route's own work: what is decided from its head ([`Context`]:
//! draining, the tenant, the declared length, the head's quotas), its body read within its
//! bounds ([`read_body`]) and parsed off the async workers ([`parse`]), its answer encoded within
//! `max_answer` ([`encode_answer`]), its count in `requests_total`, and its place among the
//! requests a drain waits for, held until its answer's body is written. Also what every log line
//! of a request is bounded by ([`clip`], [`acceptable_request_id`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::config::Tenant;
use super::execute::{self, Admitted};
use super::metrics::RequestLabels;
use super::status::ApiError;
use super::{Served, State};

type Shared = Arc<State>;

/// Retry-After while draining: this replica will not come back.
const DRAINING_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest client request id kept (a UUID is 36, a W3C trace id 32); a longer one, or one
/// with other characters, is replaced by the server's own, so a client cannot make every log
/// line of its request long or forge log structure.
pub const MAX_REQUEST_ID: usize = 64;
/// The most bytes of one client-provided string (model name, field value, error message, path)
/// in a log line.
pub const LOG_FIELD_MAX: usize = 256;

/// Whether a client's `x-request-id` is kept: 1 to [`MAX_REQUEST_ID`] bytes of
/// `[A-Za-z0-9._-]`.
pub fn acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `text` cut to at most `max` bytes at a character boundary, for a log line.
pub fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn body_too_large(max_body: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("The request body is larger than max_body ({max_body} bytes)."),
    )
    .code("body_too_large")
}

/// The body, read only now that the request is admitted: at most `max_body` bytes (413 past
/// it) within `body_read_timeout`, and after `body_rate_grace` at `min_body_rate` bytes per
/// second or more on average since its first read (408 past either; hyper closes the
/// connection, as the body was not read to its end).
pub(super) async fn read_body(state: &Shared, body: Body) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let max_body = state.config.max_body;
    let timeout = state.config.body_read_timeout;
    let min_rate = state.config.min_body_rate;
    let grace = state.config.body_rate_grace;
    let started = tokio::time::Instant::now();
    let whole_by = started + timeout;
    let mut limited = http_body_util::Limited::new(body, max_body as usize);
    let mut received = bytes::BytesMut::new();
    loop {
        // The slowest a body may be: `received` bytes must have arrived by grace +
        // received / rate; the next byte is due then.
        let rate_by = (min_rate > 0).then(|| {
            started + grace + Duration::from_secs_f64(received.len() as f64 / min_rate as f64)
        });
        let due = rate_by.map_or(whole_by, |at| at.min(whole_by));
        match tokio::time::timeout_at(due, limited.frame()).await {
            Ok(None) => return Ok(received.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(error))) if error.is::<http_body_util::LengthLimitError>() => {
                return Err(body_too_large(max_body))
            }
            Ok(Some(Err(error))) => {
                return Err(ApiError::bad_request(
                    format!(
                        "The request body could not be read: {}",
                        clip(&error.to_string(), LOG_FIELD_MAX)
                    ),
                    None,
                )
                .code("body_unreadable"))
            }
            Err(_) if due < whole_by => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "The request body arrived slower than min_body_rate ({min_rate} bytes/s \
                         after {}): {} bytes in {:.1} s.",
                        humantime::format_duration(grace),
                        received.len(),
                        started.elapsed().as_secs_f64()
                    ),
                )
                .code("body_too_slow"))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "The request body did not arrive within body_read_timeout ({}).",
                        humantime::format_duration(timeout)
                    ),
                )
                .code("body_timeout"))
            }
        }
    }
}

/// Parses the body on the blocking pool: a large body's parse then holds a blocking thread,
/// not one of the async workers every other request needs.
pub(super) async fn parse<T: serde::de::DeserializeOwned + Send + 'static>(
    bytes: Bytes,
) -> Result<T, ApiError> {
    let parsed = tokio::task::spawn_blocking(move || serde_json::from_slice::<T>(&bytes))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("Parsing the request failed: {e}"),
            )
        })?;
    parsed.map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid: {e}"), None)
            .code("invalid_json")
    })
}

/// Counts the bytes written to it.
#[derive(Default)]
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `answer` as JSON in one buffer of exactly its size (measured by a first, counting pass, so
/// the host never holds more than the answer itself), refused (422 `answer_too_large`) past
/// `max_answer` before any of it is allocated.
pub(super) fn encode_answer(
    state: &Shared,
    answer: &impl serde::Serialize,
) -> Result<Vec<u8>, ApiError> {
    let failed = |e: serde_json::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("The answer could not be encoded: {e}"),
        )
    };
    let mut counter = ByteCount::default();
    serde_json::to_writer(&mut counter, answer).map_err(failed)?;
    let max = state.config.max_answer;
    if counter.0 as u64 > max {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            format!(
                "The answer's JSON would be {} bytes, more than max_answer ({max} bytes).",
                counter.0
            ),
        )
        .code("answer_too_large"));
    }
    let mut buffer = Vec::with_capacity(counter.0);
    serde_json::to_writer(&mut buffer, answer).map_err(failed)?;
    Ok(buffer)
}

/// The host does not tokenize (the tokenizer runs in the sandbox), so `prompt_tokens` and the
/// tokens rate are an estimate: one token per 4 bytes (rounded up) plus the 2 special tokens,
/// capped at the model's longest input.
pub fn estimate_tokens(text: &str, max_input_tokens: u32) -> u64 {
    let estimate = (text.len() as u64).div_ceil(4) + 2;
    match max_input_tokens {
        0 => estimate,
        cap => estimate.min(u64::from(cap)),
    }
}

/// What a request is labelled with in metrics, filled in as it is learned.
pub(super) struct Context {
    route: &'static str,
    tenant: String,
    model: String,
    state: Shared,
    /// This request's place in `in_flight` (a drain waits for it): handed to its answer's body
    /// by [`Context::finish`], so it counts until the body is written.
    in_flight: Option<InFlight>,
}

/// An answer's body that keeps its request in flight until hyper drops it (its last byte taken,
/// or the connection gone). Its length is the body's, so `Content-Length` is kept.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// One request counted in `State::in_flight` until dropped.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

impl Context {
    pub(super) fn new(state: &Shared, route: &'static str) -> Self {
        Self {
            route,
            tenant: "-".into(),
            model: "-".into(),
            state: state.clone(),
            in_flight: None,
        }
    }

    /// Everything decided from the request's head, before any body byte is read (and so before
    /// hyper sends `100 Continue`): draining, the tenant (401), the declared length (413), and
    /// the request and fuel quotas (429), so a request whose body turns out malformed has spent
    /// its request like any other.
    pub(super) async fn admit<'s>(
        &mut self,
        state: &'s Shared,
        headers: &HeaderMap,
    ) -> Result<(&'s Tenant, Admitted), ApiError> {
        let tenant = self.tenant(state, headers)?;
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > state.config.max_body) {
            return Err(body_too_large(state.config.max_body));
        }
        let admitted = execute::admit(state, tenant).await?;
        Ok((tenant, admitted))
    }

    /// Refuses while draining, then finds the tenant.
    fn tenant<'s>(
        &mut self,
        state: &'s Shared,
        headers: &HeaderMap,
    ) -> Result<&'s Tenant, ApiError> {
        if state.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(
                "The server is shutting down; retry on another replica.",
                "draining",
                DRAINING_RETRY_AFTER,
            ));
        }
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        self.in_flight = Some(InFlight(state.clone()));
        let tenant = super::auth::tenant(&state.tenants, headers)?;
        self.tenant = tenant.name.clone();
        Ok(tenant)
    }

    pub(super) fn model(&mut self, state: &Shared, name: &str) -> Result<Arc<Served>, ApiError> {
        match state.models.get(name) {
            Some(served) => {
                self.model = served.name.clone();
                Ok(served.clone())
            }
            None => {
                let names: Vec<_> = state.models.keys().cloned().collect();
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "The model `{}` does not exist. Available: {}.",
                        clip(name, LOG_FIELD_MAX),
                        names.join(", ")
                    ),
                )
                .param("model")
                .code("model_not_found")
                .extra("available", json!(names)))
            }
        }
    }

    pub(super) fn finish(mut self, result: Result<Response, ApiError>) -> Response {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                // Refusals are counted (`requests_total` by status), not logged at info: a client
                // sending refused requests would otherwise write a log line per refusal, as fast
                // as it can send, spending the host's CPU and disk on its behalf. Only the
                // server's own failures (500) are worth a line each.
                let message = clip(&error.message, LOG_FIELD_MAX);
                if error.status == StatusCode::INTERNAL_SERVER_ERROR {
                    tracing::warn!(status = 500, code = ?error.code, message, "failed");
                } else {
                    tracing::debug!(status = error.status.as_u16(), code = ?error.code, message, "refused");
                }
                error.into_response()
            }
        };
        self.state
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                route: self.route.into(),
                status: response.status().as_u16(),
                tenant: std::mem::take(&mut self.tenant),
                model: std::mem::take(&mut self.model),
            })
            .inc();
        // Still in flight while hyper writes the body: its guard is dropped with the body, once
        // hyper has taken its last byte (or the connection is gone).
        match self.in_flight.take() {
            Some(guard) => {
                let (parts, body) = response.into_parts();
                Response::from_parts(
                    parts,
                    Body::new(Guarded {
                        body,
                        _in_flight: guard,
                    }),
                )
            }
            None => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimates_round_up_and_respect_the_model_cap() {
        assert_eq!(estimate_tokens("", 256), 2);
        assert_eq!(estimate_tokens("abcde", 256), 4);
        assert_eq!(estimate_tokens(&"x".repeat(4000), 256), 256);
        assert_eq!(estimate_tokens(&"x".repeat(4000), 0), 1002);
    }

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain_and_log_fields_are_clipped() {
        let ok = |id: &str| acceptable_request_id(&HeaderValue::from_str(id).unwrap());
        assert!(ok("trace-0123.abc_DEF"));
        assert!(ok(&"x".repeat(MAX_REQUEST_ID)));
        assert!(!ok(&"x".repeat(MAX_REQUEST_ID + 1)));
        for bad in ["", "a b", "a/b", "a\"b", "é"] {
            assert!(!ok(bad), "{bad:?}");
        }
        assert_eq!(clip("short", LOG_FIELD_MAX), "short");
        assert_eq!(
            clip(&"m".repeat(1 << 20), LOG_FIELD_MAX).len(),
            LOG_FIELD_MAX
        );
        // Cut at a character boundary: é is two bytes.
        assert_eq!(clip("aé", 2), "a");
    }
}
