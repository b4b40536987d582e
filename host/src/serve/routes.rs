//! The routes: `POST /v1/embeddings` (OpenAI's shape), `POST /v1/infer` (native), `GET
//! /v1/models`, `/healthz`, `/readyz`, `/metrics`; and the one path every run takes through
//! them ([`execute`]): draining check, tenant, input check, rate limits, queue, run, refund,
//! fallback, metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use super::admission::Refused;
use super::config::{Tenant, TenantRates};
use super::metrics::{ModelLabels, RateLabels, RequestLabels, RunLabels, TripLabels};
use super::ratelimit::{Charge, Decision, Quota};
use super::status::{retry_after_seconds, usage_json, ApiError};
use super::{Served, State};
use crate::data::{DataKind, Input};
use crate::error::{ErrorKind, RunError};
use crate::limits::Limits;
use crate::model::Outcome;

type Shared = Arc<State>;

/// The request-id header, set when the client sent none and echoed on every answer.
const REQUEST_ID: &str = "x-request-id";
/// Which model answered (the requested one, or its fallback).
const ANSWERED_BY: &str = "x-wasm-infer-answered-by";
/// Set when a fallback answered: which (`model NAME`, `truncated to N bytes`, `in-sandbox`).
const FALLBACK: &str = "x-wasm-infer-fallback";
/// Retry-After for a full queue or a wait that ran out: about one run's time.
const QUEUE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Retry-After while draining: this replica will not come back.
const DRAINING_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Retry-After when the rate-limit backend is down.
const BACKEND_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Limits of the readiness probe's run (a few words through the real model).
const READY_WALL_TIME: Duration = Duration::from_secs(10);
/// OpenAI's cap on the items of one embeddings request.
const MAX_EMBEDDING_ITEMS: usize = 2048;

#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("req-{n:08x}"))
            .ok()
            .map(RequestId::new)
    }
}

/// The API's router.
pub fn router(state: Shared) -> Router {
    let max_body = state.config.max_body as usize;
    let request_id = HeaderName::from_static(REQUEST_ID);
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/infer", post(infer))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(
            |request: &Request<axum::body::Body>| {
                let id = request
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), id)
            },
        ))
        .layer(SetRequestIdLayer::new(request_id, Counter::default()))
        .with_state(state)
}

/// `/metrics` alone, for `metrics_listen`.
pub fn metrics_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "Unknown route.",
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: not draining, and every model answers a tiny real request from its snapshot (an
/// answer of the model's own, even a refusal of the probe's input, proves the sandbox works).
async fn readyz(AxumState(state): AxumState<Shared>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "draining"})),
        )
            .into_response();
    }
    let limits = Limits {
        wall_time: READY_WALL_TIME,
        ..state.config.limits.clone()
    };
    let mut models = serde_json::Map::new();
    let mut ready = true;
    for served in state.models.values() {
        let probe = if served.model.info().inputs.contains(&DataKind::Text) {
            Input::Text("ready".into())
        } else {
            Input::Texts(vec!["ready".into()])
        };
        let answer = match served.model.run_async(probe, &limits).await {
            Ok(outcome) => json!({"ok": true, "fuel": outcome.usage.fuel_consumed}),
            Err(failure) if failure.kind() == ErrorKind::Model => {
                json!({"ok": true, "fuel": failure.usage.fuel_consumed})
            }
            Err(failure) => {
                ready = false;
                json!({"ok": false, "error": failure.error.to_string()})
            }
        };
        models.insert(served.name.clone(), answer);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "models": models}))).into_response()
}

async fn metrics(AxumState(state): AxumState<Shared>) -> Response {
    state.refresh_gauges();
    state
        .metrics
        .rate_limit_backend_failures
        .inner()
        .store(state.limiter.backend_failures(), Ordering::Relaxed);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn models(AxumState(state): AxumState<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = super::auth::tenant(&state.tenants, &headers) {
        return e.into_response();
    }
    let data: Vec<_> = state
        .models
        .values()
        .map(|m| {
            let info = m.model.info();
            json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "wasm-infer",
                "info": info,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The body, or the OpenAI-shaped error for one that is too large or unreadable.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let mut e = ApiError::new(status, "invalid_request_error", rejection.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e = e.code("body_too_large");
        }
        e
    })
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid: {e}"), None)
            .code("invalid_json")
    })
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: serde_json::Value,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)] // accepted, as OpenAI's API does, and not used
    user: Option<String>,
}

async fn embeddings(
    AxumState(state): AxumState<Shared>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let route = "/v1/embeddings";
    let mut ctx = Context::new(&state, route);
    let result = embeddings_inner(&state, &headers, bytes, &mut ctx).await;
    ctx.finish(result)
}

async fn embeddings_inner(
    state: &Shared,
    headers: &HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
    ctx: &mut Context,
) -> Result<Response, ApiError> {
    let tenant = ctx.tenant(state, headers)?;
    let bytes = body(bytes)?;
    let request: EmbeddingsRequest = parse(&bytes)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("encoding_format must be \"float\" or \"base64\", not {other:?}."),
                Some("encoding_format"),
            ))
        }
    };
    let texts = embedding_input(request.input)?;
    let served = ctx.model(state, &request.model)?;
    let info = served.model.info();
    if info.output != DataKind::Embeddings {
        return Err(ApiError::bad_request(
            format!(
                "Model {} does not produce embeddings; use /v1/infer.",
                served.name
            ),
            Some("model"),
        ));
    }
    if let Some(dimensions) = request.dimensions {
        if dimensions != u64::from(info.output_dimension) {
            return Err(ApiError::bad_request(
                format!(
                    "Model {} does not support choosing dimensions: it returns {}.",
                    served.name, info.output_dimension
                ),
                Some("dimensions"),
            ));
        }
    }
    let tokens: u64 = texts
        .iter()
        .map(|t| estimate_tokens(t, info.max_input_tokens))
        .sum();
    let input = match texts.len() {
        1 => Input::Text(texts.into_iter().next().expect("one text")),
        _ => Input::Texts(texts),
    };
    let done = execute(state, tenant, &served, input, tokens, ctx).await?;
    let Some(vectors) = done.outcome.output.embeddings() else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The model returned no embeddings.",
        ));
    };
    let data: Vec<_> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": done.answered_by,
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "fuel": done.outcome.usage.fuel_consumed,
            "answered_by": done.answered_by,
            "fallback": done.fallback,
        },
    });
    Ok(done.respond(body))
}

/// The texts of an embeddings `input`: a string or an array of strings. Token-id arrays (which
/// OpenAI accepts) are refused: the tokenizer runs inside the sandbox.
fn embedding_input(input: serde_json::Value) -> Result<Vec<String>, ApiError> {
    use serde_json::Value;
    let refuse = |message: &str| Err(ApiError::bad_request(message, Some("input")));
    match input {
        Value::String(text) => Ok(vec![text]),
        Value::Array(items) if items.is_empty() => refuse("input must not be an empty array."),
        Value::Array(items) if items.len() > MAX_EMBEDDING_ITEMS => refuse(&format!(
            "input may hold at most {MAX_EMBEDDING_ITEMS} items, not {}.",
            items.len()
        )),
        Value::Array(items) => {
            if items.iter().any(|i| i.is_number() || i.is_array()) {
                return refuse(
                    "Token-id arrays are not supported: send text (the model tokenizes inside \
                     its sandbox).",
                );
            }
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(ApiError::bad_request(
                        "input must be a string or an array of strings.",
                        Some("input"),
                    )),
                })
                .collect()
        }
        _ => refuse("input must be a string or an array of strings."),
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    model: String,
    input: Input,
}

async fn infer(
    AxumState(state): AxumState<Shared>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Context::new(&state, "/v1/infer");
    let result = infer_inner(&state, &headers, bytes, &mut ctx).await;
    ctx.finish(result)
}

async fn infer_inner(
    state: &Shared,
    headers: &HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
    ctx: &mut Context,
) -> Result<Response, ApiError> {
    let tenant = ctx.tenant(state, headers)?;
    let bytes = body(bytes)?;
    let request: InferRequest = parse(&bytes)?;
    let served = ctx.model(state, &request.model)?;
    let tokens = match &request.input {
        Input::Text(t) => estimate_tokens(t, served.model.info().max_input_tokens),
        Input::Texts(ts) => ts
            .iter()
            .map(|t| estimate_tokens(t, served.model.info().max_input_tokens))
            .sum(),
        _ => 0,
    };
    let done = execute(state, tenant, &served, request.input, tokens, ctx).await?;
    let body = json!({
        "model": done.answered_by,
        "output": done.outcome.output,
        "usage": usage_json(&done.outcome.usage),
        "limits": done.limits,
        "fallback": done.fallback,
    });
    Ok(done.respond(body))
}

/// What a request is labelled with in metrics, filled in as it is learned.
struct Context {
    route: &'static str,
    tenant: String,
    model: String,
    state: Shared,
    /// Whether this request counts as in flight (a drain waits for it).
    counted: bool,
}

impl Context {
    fn new(state: &Shared, route: &'static str) -> Self {
        Self {
            route,
            tenant: "-".into(),
            model: "-".into(),
            state: state.clone(),
            counted: false,
        }
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
        self.counted = true;
        let tenant = super::auth::tenant(&state.tenants, headers)?;
        self.tenant = tenant.name.clone();
        Ok(tenant)
    }

    fn model(&mut self, state: &Shared, name: &str) -> Result<Arc<Served>, ApiError> {
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
                        "The model `{name}` does not exist. Available: {}.",
                        names.join(", ")
                    ),
                )
                .param("model")
                .code("model_not_found")
                .extra("available", json!(names)))
            }
        }
    }

    fn finish(mut self, result: Result<Response, ApiError>) -> Response {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                // Quota refusals are counted (`rate_limited_total`), not logged at info: a tenant
                // flooding past its quota would otherwise write a log line per refusal, as fast
                // as it can send, spending the host's CPU and disk on its behalf.
                if error.status == StatusCode::TOO_MANY_REQUESTS {
                    tracing::debug!(status = 429, code = ?error.code, message = %error.message, "refused");
                } else {
                    tracing::info!(status = error.status.as_u16(), code = ?error.code, message = %error.message, "refused");
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
        response
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if self.counted && self.state.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state.drained.notify_waiters();
        }
    }
}

/// A run that succeeded, with what its answer carries.
struct Done {
    outcome: Outcome,
    answered_by: String,
    fallback: Option<String>,
    limits: Limits,
    rate_headers: HeaderMap,
}

impl Done {
    fn respond(self, body: serde_json::Value) -> Response {
        let mut response = Json(body).into_response();
        let headers = response.headers_mut();
        headers.extend(self.rate_headers);
        if let Ok(v) = HeaderValue::from_str(&self.answered_by) {
            headers.insert(ANSWERED_BY, v);
        }
        if let Some(v) = self
            .fallback
            .as_deref()
            .and_then(|f| HeaderValue::from_str(f).ok())
        {
            headers.insert(FALLBACK, v);
        }
        response
    }
}

/// The reservations a request holds, to refund what it did not use.
struct Reserved {
    /// The fuel charge (its key, quota and the cap reserved).
    fuel: Option<Charge>,
}

/// One run, start to end: input check, rate limits, queue, run (and fallback), refund, metrics.
async fn execute(
    state: &Shared,
    tenant: &Tenant,
    served: &Arc<Served>,
    input: Input,
    tokens: u64,
    ctx: &Context,
) -> Result<Done, ApiError> {
    let limits = tenant.limits.clone();
    // Refused before anything is reserved or queued: no quota spent on a request never run.
    if let Err(limit) = limits.check_input(&input) {
        let error: crate::Error = limit.into();
        return Err(ApiError::from_error(&error));
    }
    let (reserved, rate_headers) = reserve(state, tenant, &limits, tokens, ctx).await?;
    // Kept for the fallback's retry only when there is one.
    let retry_input = served.fallback.as_ref().map(|_| input.clone());
    let result = run_queued(state, served, input, &limits, ctx).await;
    let result = match (result, retry_input) {
        (Err(Failure::Run(failure)), Some(input)) if is_fallback_trip(failure.kind()) => {
            run_fallback(state, served, input, &limits, ctx, &failure).await
        }
        (other, _) => other.map(|outcome| (outcome, served.name.clone(), None)),
    };
    // Refund what the run did not use, in one step of the limiter: the fuel it did not burn (a
    // failed run burnt what its usage says). Requests and tokens are spent once admitted.
    if let Some(fuel) = reserved.fuel {
        let consumed = match &result {
            Ok((outcome, _, _)) => outcome.usage.fuel_consumed,
            Err(Failure::Run(failure)) => failure.usage.fuel_consumed,
            Err(Failure::Refused(_)) => 0,
        };
        let unused = Charge {
            cost: fuel.cost.saturating_sub(consumed),
            ..fuel
        };
        state.limiter.refund_all(&[unused]).await;
    }
    match result {
        Ok((outcome, answered_by, fallback)) => Ok(Done {
            outcome,
            answered_by,
            fallback,
            limits,
            rate_headers,
        }),
        Err(Failure::Run(failure)) => {
            let mut e = ApiError::from_run(&failure);
            e.headers.extend(rate_headers);
            Err(e)
        }
        Err(Failure::Refused(e)) => Err(e),
    }
}

/// The trips a fallback answers: the run was too big for its limits, not wrong.
fn is_fallback_trip(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Fuel | ErrorKind::Memory | ErrorKind::WallTime | ErrorKind::DeviceMemory
    )
}

enum Failure {
    Run(RunError),
    Refused(ApiError),
}

/// A slot in `served`'s queue, then the run, with the queue wait taken out of its wall time.
async fn run_queued(
    state: &Shared,
    served: &Served,
    input: Input,
    limits: &Limits,
    ctx: &Context,
) -> Result<Outcome, Failure> {
    let model_labels = ModelLabels {
        model: served.name.clone(),
    };
    let deadline = state
        .config
        .queue_wait
        .map_or(limits.wall_time, |w| w.min(limits.wall_time));
    state
        .metrics
        .queue_depth
        .get_or_create(&model_labels)
        .set(served.queue.waiting() as i64 + 1);
    let slot = served.queue.acquire(deadline).await;
    state
        .metrics
        .queue_depth
        .get_or_create(&model_labels)
        .set(served.queue.waiting() as i64);
    let slot = slot.map_err(|refused| {
        let message = match refused {
            Refused::Full => format!("Model {} is overloaded: its queue is full.", served.name),
            Refused::TimedOut => format!(
                "Model {} is overloaded: no run slot came free within {}.",
                served.name,
                humantime::format_duration(deadline)
            ),
        };
        Failure::Refused(ApiError::unavailable(
            message,
            "overloaded",
            QUEUE_RETRY_AFTER,
        ))
    })?;
    let run_labels = RunLabels {
        tenant: ctx.tenant.clone(),
        model: served.name.clone(),
    };
    state
        .metrics
        .queue_wait
        .get_or_create(&run_labels)
        .observe(slot.waited.as_secs_f64());
    // The request's deadline covers its wait in the queue.
    let limits = Limits {
        wall_time: limits.wall_time.saturating_sub(slot.waited),
        ..limits.clone()
    };
    let in_flight = state.metrics.in_flight.get_or_create(&model_labels).clone();
    in_flight.inc();
    let result = served.model.run_async(input, &limits).await;
    in_flight.dec();
    drop(slot);
    let usage = match &result {
        Ok(outcome) => &outcome.usage,
        Err(failure) => &failure.usage,
    };
    state.metrics.record_run(&ctx.tenant, &served.name, usage);
    if let Err(failure) = &result {
        if failure.kind().is_limit() {
            state
                .metrics
                .limit_trips
                .get_or_create(&TripLabels {
                    tenant: ctx.tenant.clone(),
                    model: served.name.clone(),
                    kind: failure.kind().as_str().into(),
                })
                .inc();
        }
    }
    result.map_err(Failure::Run)
}

/// The model's fallback after a limit trip: another model, or the input cut shorter.
async fn run_fallback(
    state: &Shared,
    served: &Served,
    input: Input,
    limits: &Limits,
    ctx: &Context,
    first: &RunError,
) -> Result<(Outcome, String, Option<String>), Failure> {
    let fallback = served.fallback.as_ref().expect("checked by the caller");
    let mut limits = limits.clone();
    let (target, input, how) = match (&fallback.model, fallback.truncate) {
        (Some(other), _) => (
            state.models.get(other).expect("checked at start").clone(),
            input,
            format!("model {other}"),
        ),
        (None, Some(bytes)) => (
            state.models[&served.name].clone(),
            truncate(input, bytes as usize),
            format!("truncated to {bytes} bytes"),
        ),
        (None, None) if fallback.in_sandbox => {
            limits = limits.hide_device();
            (
                state.models[&served.name].clone(),
                input,
                "in-sandbox".to_string(),
            )
        }
        (None, None) => {
            return Err(Failure::Run(RunError {
                error: clone_error(&first.error),
                usage: first.usage.clone(),
            }))
        }
    };
    tracing::info!(model = %served.name, first = %first.error, fallback = %how, "retrying with the fallback");
    let outcome = run_queued(state, &target, input, &limits, ctx).await?;
    state
        .metrics
        .fallbacks
        .get_or_create(&RunLabels {
            tenant: ctx.tenant.clone(),
            model: served.name.clone(),
        })
        .inc();
    Ok((outcome, target.name.clone(), Some(how)))
}

fn clone_error(error: &crate::Error) -> crate::Error {
    match error.limit() {
        Some(limit) => limit.clone().into(),
        None => crate::Error::Internal(error.to_string()),
    }
}

fn truncate(input: Input, bytes: usize) -> Input {
    let cut = |mut s: String| {
        if s.len() > bytes {
            let mut end = bytes;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    };
    match input {
        Input::Text(t) => Input::Text(cut(t)),
        Input::Texts(ts) => Input::Texts(ts.into_iter().map(cut).collect()),
        other => other,
    }
}

/// Reserves the tenant's request, token and fuel quotas, all or none, in one step of the
/// limiter (one round trip to Redis). 429 when one does not fit, naming the quota that limits
/// (the longest wait; a cost above its burst is the longest of all), with its Retry-After; 503
/// when the backend cannot answer (fail-closed).
async fn reserve(
    state: &Shared,
    tenant: &Tenant,
    limits: &Limits,
    tokens: u64,
    ctx: &Context,
) -> Result<(Reserved, HeaderMap), ApiError> {
    let TenantRates {
        requests,
        fuel,
        tokens: tokens_quota,
    } = tenant.rates;
    let wanted: Vec<(&'static str, Quota, u64)> = [
        requests.map(|q| ("requests", q, 1)),
        tokens_quota.map(|q| ("tokens", q, tokens)),
        fuel.map(|q| ("fuel", q, limits.fuel.unwrap_or(q.burst))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let charges: Vec<Charge> = wanted
        .iter()
        .map(|(name, quota, cost)| Charge::new(format!("{}:{name}", tenant.name), *quota, *cost))
        .collect();
    let decisions = state.limiter.reserve_all(&charges).await.map_err(|error| {
        ApiError::unavailable(
            format!("Rate limits cannot be checked now: {error}"),
            "rate_limit_unavailable",
            BACKEND_RETRY_AFTER,
        )
    })?;
    let mut policies = Vec::new();
    let mut remaining = Vec::new();
    // The refusing quota with the longest wait (`None`, never fits, is longest).
    let mut limiting: Option<(usize, Option<Duration>, u64)> = None;
    for (i, ((name, quota, _), decision)) in wanted.iter().zip(&decisions).enumerate() {
        let window = (quota.burst as f64 / quota.per_second).ceil() as u64;
        policies.push(format!("\"{name}\";q={};w={window}", quota.burst));
        let (r, reset) = match decision {
            Decision::Allowed { remaining, reset } => (*remaining, *reset),
            Decision::Limited {
                retry_after,
                remaining,
                reset,
            } => {
                let longer = match limiting {
                    None => true,
                    Some((_, None, _)) => false,
                    Some((_, Some(longest), _)) => retry_after.is_none_or(|after| after > longest),
                };
                if longer {
                    limiting = Some((i, *retry_after, *remaining));
                }
                (*remaining, *reset)
            }
        };
        remaining.push(format!(
            "\"{name}\";r={r};t={}",
            reset.as_secs_f64().ceil() as u64
        ));
    }
    if let Some((i, retry_after, r)) = limiting {
        let (name, quota, cost) = wanted[i];
        state
            .metrics
            .rate_limited
            .get_or_create(&RateLabels {
                tenant: ctx.tenant.clone(),
                limit: name.into(),
            })
            .inc();
        let message = match retry_after {
            Some(after) => format!(
                "Rate limit reached for {name}: this request needs {cost}, {r} left; \
                 retry after {} s.",
                retry_after_seconds(after)
            ),
            None => format!(
                "Rate limit for {name}: this request needs {cost}, more than the burst \
                 of {} ever admits.",
                quota.burst
            ),
        };
        let mut e =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, name, message).code("rate_limit_exceeded");
        if let Some(after) = retry_after {
            e = e.retry_after(after);
        }
        e.headers.extend(rate_headers(&policies, &remaining));
        return Err(e);
    }
    let fuel = charges
        .into_iter()
        .zip(&wanted)
        .find(|(_, (name, _, _))| *name == "fuel")
        .map(|(charge, _)| charge);
    Ok((Reserved { fuel }, rate_headers(&policies, &remaining)))
}

fn rate_headers(policies: &[String], remaining: &[String]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if !policies.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&policies.join(", ")) {
            headers.insert(HeaderName::from_static("ratelimit-policy"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&remaining.join(", ")) {
            headers.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_inputs_are_texts_and_token_ids_are_refused() {
        assert_eq!(embedding_input(json!("a")).unwrap(), vec!["a"]);
        assert_eq!(embedding_input(json!(["a", "b"])).unwrap(), vec!["a", "b"]);
        for bad in [
            json!([1, 2]),
            json!([[1, 2]]),
            json!([]),
            json!(3),
            json!(["a", 1]),
        ] {
            let e = embedding_input(bad.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param, Some("input"));
        }
        assert!(embedding_input(json!([1]))
            .unwrap_err()
            .message
            .contains("Token-id arrays"));
    }

    #[test]
    fn token_estimates_round_up_and_respect_the_model_cap() {
        assert_eq!(estimate_tokens("", 256), 2);
        assert_eq!(estimate_tokens("abcde", 256), 4);
        assert_eq!(estimate_tokens(&"x".repeat(4000), 256), 256);
        assert_eq!(estimate_tokens(&"x".repeat(4000), 0), 1002);
    }

    #[test]
    fn truncation_cuts_at_a_character_boundary() {
        assert_eq!(
            truncate(Input::Text("héllo".into()), 2),
            Input::Text("h".into())
        );
        assert_eq!(
            truncate(Input::Texts(vec!["abc".into(), "d".into()]), 2),
            Input::Texts(vec!["ab".into(), "d".into()])
        );
    }
}
