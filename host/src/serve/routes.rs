//! The routes: `POST /v1/embeddings` (OpenAI's shape), `POST /v1/infer` (native), `POST
//! /v1/chat/completions` ([`chat`](super::chat)), `GET /v1/models`, `/healthz`, `/readyz`,
//! `/metrics`: HTTP in and out. Every run takes one path through them: [`Context::admit`] from
//! the head alone (draining check, tenant, declared length, then the request and fuel quotas of
//! [`execute::admit`](super::execute::admit)), then the body (read under `max_body` and
//! `body_read_timeout`, parsed off the async workers; [`request`](super::request)), then the
//! pipeline's [`execute`](super::execute) (input check, tokens quota, queue, run, refund,
//! fallback, metrics), then the answer in the route's shape.
//!
//! Nothing a client sends is logged whole: its request id is kept only when short and plain
//! ([`acceptable_request_id`]), and every string of its in a log line is cut to
//! [`LOG_FIELD_MAX`] bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State as AxumState;
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
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use super::body::{EmbeddingInput, InferInput, MAX_BATCH_ITEMS};
use super::execute::{self, Done};
use super::request::{
    acceptable_request_id, clip, encode_answer, estimate_tokens, parse, read_body, Context,
    LOG_FIELD_MAX,
};
use super::status::ApiError;
use super::{Served, State};
use crate::data::{DataKind, Input};
use crate::error::ErrorKind;
use crate::limits::Limits;

type Shared = Arc<State>;

/// The request-id header, set when the client sent none and echoed on every answer.
const REQUEST_ID: &str = "x-request-id";
/// Which model answered (the requested one, or its fallback).
const ANSWERED_BY: &str = "x-wasm-infer-answered-by";
/// Set when a fallback answered: which (`model NAME`, `truncated to N bytes`, `in-sandbox`).
const FALLBACK: &str = "x-wasm-infer-fallback";
/// Limits of the readiness probe's run (a few words through the real model).
const READY_WALL_TIME: Duration = Duration::from_secs(10);
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

/// The API's router. `/metrics` is on it only when there is no `metrics_listen`: it names every
/// tenant, which the API's clients need not learn.
pub fn router(state: Shared) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID);
    let mut router = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/infer", post(infer))
        .route("/v1/chat/completions", post(super::chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if state.config.metrics_listen.is_none() {
        router = router.route("/metrics", get(metrics));
    }
    router
        .fallback(not_found)
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| {
                    let id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    let path = clip(request.uri().path(), LOG_FIELD_MAX);
                    tracing::info_span!("request", method = %request.method(), path, id)
                })
                // A 5xx under load (503 overloaded, draining) is a refusal, counted in
                // `requests_total`: not a log line per request.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::new(request_id, Counter::default()))
        // Outermost: an unacceptable client id is dropped before the server's is set.
        .layer(tower::util::MapRequestLayer::new(
            |mut request: Request<Body>| {
                if let Some(id) = request.headers().get(REQUEST_ID) {
                    if !acceptable_request_id(id) {
                        request.headers_mut().remove(REQUEST_ID);
                    }
                }
                request
            },
        ))
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

/// Ready: not draining, and every model answered a tiny real request from its snapshot (an
/// answer of the model's own, even a refusal of the probe's input, proves the sandbox works)
/// within the last `readiness_interval`. One caller at a time runs the probe; the others wait
/// for it and share its result, so probes cost at most one run per model per interval.
async fn readyz(AxumState(state): AxumState<Shared>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "draining"})),
        )
            .into_response();
    }
    let mut last = state.readiness.lock().await;
    let fresh = last
        .as_ref()
        .is_some_and(|r| r.checked.elapsed() < state.config.readiness_interval);
    if !fresh {
        let (ready, body) = probe_models(&state).await;
        state.metrics.readiness_probes.inc();
        *last = Some(super::Readiness {
            checked: std::time::Instant::now(),
            ready,
            body,
        });
    }
    let readiness = last.as_ref().expect("set above");
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness.body.clone())).into_response()
}

/// Runs each model's readiness probe: whether all answered, and the body `/readyz` returns.
async fn probe_models(state: &Shared) -> (bool, serde_json::Value) {
    let limits = Limits {
        wall_time: READY_WALL_TIME,
        ..state.config.limits.clone()
    };
    let mut models = serde_json::Map::new();
    let mut ready = true;
    for served in state.models.values() {
        let answer = if served.model.generator_info().is_some() {
            // A generator is asked to continue an empty prompt, which it refuses at once: its
            // own answer, from a fresh sandbox, without a generation's seconds of work.
            let probe = crate::generate::GenerateRequest::new("", 1);
            let never: crate::worker::StopCheck = Arc::new(|| false);
            state
                .generate_for_tenant(served, None, probe, &limits, Box::new(|_, _| {}), never)
                .await
                .map(|generation| generation.usage)
                .map_err(|failure| failure.error)
        } else {
            let probe = if served.model.info().inputs.contains(&DataKind::Text) {
                Input::Text("ready".into())
            } else {
                Input::Texts(vec!["ready".into()])
            };
            state
                .run(served, probe, &limits)
                .await
                .map(|outcome| outcome.usage)
        };
        let answer = match answer {
            Ok(usage) => json!({"ok": true, "fuel": usage.fuel_consumed}),
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
    (ready, json!({"ready": ready, "models": models}))
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

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: EmbeddingInput,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)] // accepted, as OpenAI's API does, and not used
    user: Option<String>,
}

async fn embeddings(AxumState(state): AxumState<Shared>, request: Request<Body>) -> Response {
    let route = "/v1/embeddings";
    let mut ctx = Context::new(&state, route);
    let result = embeddings_inner(&state, request, &mut ctx).await;
    ctx.finish(result)
}

/// An embeddings request, checked and ready to run.
struct Embeddings {
    served: Arc<Served>,
    input: Input,
    tokens: u64,
    base64: bool,
}

async fn embeddings_inner(
    state: &Shared,
    request: Request<Body>,
    ctx: &mut Context,
) -> Result<Response, ApiError> {
    let (tenant, admitted) = ctx.admit(state, request.headers()).await?;
    let prepared = prepare_embeddings(state, request.into_body(), ctx).await;
    let Embeddings {
        served,
        input,
        tokens,
        base64,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return Err(admitted.release(state, e).await),
    };
    let done = execute::execute_detached(state, tenant, &served, input, tokens, admitted).await?;
    let Some(vectors) = done.outcome.output.embeddings() else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The model returned no embeddings.",
        ));
    };
    let body = EmbeddingsAnswer {
        object: "list",
        data: EmbeddingItems { vectors, base64 },
        model: &done.answered_by,
        usage: EmbeddingsUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
            fuel: done.outcome.usage.fuel_consumed,
            answered_by: &done.answered_by,
            fallback: done.fallback.as_deref(),
        },
    };
    let body = encode_answer(state, &body)?;
    Ok(respond(done, body))
}

/// An embeddings answer in OpenAI's shape, serialised from the run's vectors as they are (no
/// intermediate JSON value per float).
#[derive(serde::Serialize)]
struct EmbeddingsAnswer<'a> {
    object: &'static str,
    data: EmbeddingItems<'a>,
    model: &'a str,
    usage: EmbeddingsUsage<'a>,
}

#[derive(serde::Serialize)]
struct EmbeddingsUsage<'a> {
    prompt_tokens: u64,
    total_tokens: u64,
    fuel: u64,
    answered_by: &'a str,
    fallback: Option<&'a str>,
}

struct EmbeddingItems<'a> {
    vectors: &'a [Vec<f32>],
    base64: bool,
}

impl serde::Serialize for EmbeddingItems<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct Item<'a> {
            index: usize,
            vector: &'a [f32],
            base64: bool,
        }
        impl serde::Serialize for Item<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut item = serializer.serialize_struct("Embedding", 3)?;
                item.serialize_field("object", "embedding")?;
                item.serialize_field("index", &self.index)?;
                if self.base64 {
                    // One vector's bytes at a time (1.5 KiB for 384 floats).
                    let bytes: Vec<u8> = self.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
                    item.serialize_field("embedding", &text)?;
                } else {
                    item.serialize_field("embedding", self.vector)?;
                }
                item.end()
            }
        }
        let mut seq = serializer.serialize_seq(Some(self.vectors.len()))?;
        for (index, vector) in self.vectors.iter().enumerate() {
            seq.serialize_element(&Item {
                index,
                vector,
                base64: self.base64,
            })?;
        }
        seq.end()
    }
}

/// The body of an admitted embeddings request, read, parsed and checked against the model.
async fn prepare_embeddings(
    state: &Shared,
    body: Body,
    ctx: &mut Context,
) -> Result<Embeddings, ApiError> {
    let bytes = read_body(state, body).await?;
    let request: EmbeddingsRequest = parse(bytes).await?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!(
                    "encoding_format must be \"float\" or \"base64\", not {:?}.",
                    clip(other, LOG_FIELD_MAX)
                ),
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
    Ok(Embeddings {
        served,
        input,
        tokens,
        base64,
    })
}

/// The texts of an embeddings `input`: a string or an array of strings. Token-id arrays (which
/// OpenAI accepts) are refused: the tokenizer runs inside the sandbox.
fn embedding_input(input: EmbeddingInput) -> Result<Vec<String>, ApiError> {
    let refuse = |message: &str| Err(ApiError::bad_request(message, Some("input")));
    match input {
        EmbeddingInput::Texts(texts) => Ok(texts),
        EmbeddingInput::Empty => refuse("input must not be an empty array."),
        EmbeddingInput::TooMany(count) => refuse(&format!(
            "input may hold at most {MAX_BATCH_ITEMS} items, not {count}."
        )),
        EmbeddingInput::TokenIds => refuse(
            "Token-id arrays are not supported: send text (the model tokenizes inside its \
             sandbox).",
        ),
        EmbeddingInput::NotText => refuse("input must be a string or an array of strings."),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    model: String,
    input: InferInput,
}

async fn infer(AxumState(state): AxumState<Shared>, request: Request<Body>) -> Response {
    let mut ctx = Context::new(&state, "/v1/infer");
    let result = infer_inner(&state, request, &mut ctx).await;
    ctx.finish(result)
}

async fn infer_inner(
    state: &Shared,
    request: Request<Body>,
    ctx: &mut Context,
) -> Result<Response, ApiError> {
    let (tenant, admitted) = ctx.admit(state, request.headers()).await?;
    let prepared = async {
        let bytes = read_body(state, request.into_body()).await?;
        let request: InferRequest = parse(bytes).await?;
        let served = ctx.model(state, &request.model)?;
        Ok((served, Input::from(request.input)))
    };
    let (served, input) = match prepared.await {
        Ok(prepared) => prepared,
        Err(e) => return Err(admitted.release(state, e).await),
    };
    let tokens = match &input {
        Input::Text(t) => estimate_tokens(t, served.model.info().max_input_tokens),
        Input::Texts(ts) => ts
            .iter()
            .map(|t| estimate_tokens(t, served.model.info().max_input_tokens))
            .sum(),
        _ => 0,
    };
    let done = execute::execute_detached(state, tenant, &served, input, tokens, admitted).await?;
    #[derive(serde::Serialize)]
    struct InferAnswer<'a> {
        model: &'a str,
        output: &'a crate::data::Output,
        usage: &'a crate::Usage,
        limits: &'a Limits,
        fallback: Option<&'a str>,
    }
    let body = encode_answer(
        state,
        &InferAnswer {
            model: &done.answered_by,
            output: &done.outcome.output,
            usage: &done.outcome.usage,
            limits: &done.limits,
            fallback: done.fallback.as_deref(),
        },
    )?;
    Ok(respond(done, body))
}

/// The answer to a run that succeeded: `body` (JSON, already encoded) with the run's headers.
fn respond(done: Done, body: Vec<u8>) -> Response {
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.extend(done.rate_headers);
    if let Ok(v) = HeaderValue::from_str(&done.answered_by) {
        headers.insert(ANSWERED_BY, v);
    }
    if let Some(v) = done
        .fallback
        .as_deref()
        .and_then(|f| HeaderValue::from_str(f).ok())
    {
        headers.insert(FALLBACK, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_inputs_are_texts_and_token_ids_are_refused() {
        let embedding_input = |value: serde_json::Value| {
            embedding_input(serde_json::from_value(value).expect("any JSON is an input"))
        };
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
}
