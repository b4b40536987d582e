//! `POST /v1/chat/completions` (OpenAI's shape) for models that export `generate`: the request
//! checked and turned into a [`GenerateRequest`], the generation run by the pipeline
//! ([`execute::execute_generation`]) in a task of its own, and its answer: one JSON object, or
//! with `stream: true` server-sent events as the guest hands its tokens over.
//!
//! Errors before the first token (quotas, queue, a refused request, a limit the prompt alone
//! reaches) are HTTP errors, as for embeddings. After the first token the answer is 200: a limit
//! that stops the generation ends it with `finish_reason: "length"` and a `limit` object naming
//! it, after the text generated so far (in the stream, after the chunks already sent); any other
//! failure ends a stream with an `error` event and no `[DONE]`. A client that goes away stops
//! its generation within [`crate::worker`]'s stop poll (50 ms).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderValue, Request};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;

use super::execute::{self, pipeline_failed, GenerationJob, GenerationRun};
use super::request::{
    clip, encode_answer, estimate_tokens, parse, read_body, Context, LOG_FIELD_MAX,
};
use super::status::{limit_json, ApiError};
use super::{Served, State};
use crate::generate::{
    FinishReason, GenerateRequest, Generation, GenerationError, Message, OnEmit, Prompt,
    DEFAULT_MAX_TOKENS,
};
use crate::worker::StopCheck;

type Shared = Arc<State>;

/// Tokens a chat template adds per message (role markers and separators), for the estimate
/// the tokens quota reserves before the guest has counted.
const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 4;

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopStrings>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // accepted, as OpenAI's API does, and not used
    user: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// A message's content: a string, or an array of parts of which only text parts are taken.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopStrings {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A chat request, checked and ready to run.
struct Chat {
    served: Arc<Served>,
    request: GenerateRequest,
    /// The prompt's tokens as estimated before the guest counts them.
    prompt_estimate: u64,
    stream: bool,
    include_usage: bool,
}

pub(super) async fn chat_completions(
    AxumState(state): AxumState<Shared>,
    request: Request<Body>,
) -> Response {
    let mut ctx = Context::new(&state, "/v1/chat/completions");
    let result = chat_inner(&state, request, &mut ctx).await;
    ctx.finish(result)
}

async fn chat_inner(
    state: &Shared,
    request: Request<Body>,
    ctx: &mut Context,
) -> Result<Response, ApiError> {
    let (tenant, admitted) = ctx.admit(state, request.headers()).await?;
    let prepared = async {
        let bytes = read_body(state, request.into_body()).await?;
        let request: ChatRequest = parse(bytes).await?;
        let served = ctx.model(state, &request.model)?;
        prepare(served, request)
    };
    let chat = match prepared.await {
        Ok(chat) => chat,
        Err(e) => return Err(admitted.release(state, e).await),
    };
    // The pieces go to the answer through a channel whose receiver the answer holds: when the
    // client goes away, hyper drops the answer (or this handler), the channel closes, and that
    // is the stop the generation is asked about. The text it holds is bounded by the output
    // limit, its messages by the fuel each `emit` costs.
    let (pieces, received) = unbounded_channel::<String>();
    let gone = pieces.clone();
    let stop: StopCheck = Arc::new(move || gone.is_closed());
    let on_emit: OnEmit = if chat.stream {
        Box::new(move |_, text| {
            if !text.is_empty() {
                let _ = pieces.send(text.to_string());
            }
        })
    } else {
        drop(pieces);
        Box::new(|_, _| {})
    };
    let meta = Meta::new(&chat.served.name);
    let run = execute::spawn_generation(
        state,
        tenant,
        &chat.served,
        GenerationJob {
            request: chat.request,
            prompt_estimate: chat.prompt_estimate,
            admitted,
            on_emit,
            stop,
        },
    );
    if chat.stream {
        return stream(
            run,
            received,
            meta,
            chat.include_usage,
            chat.prompt_estimate,
        )
        .await;
    }
    let GenerationRun {
        result,
        rate_headers,
    } = run.await.map_err(pipeline_failed)??;
    drop(received);
    let answer = match result {
        Ok(generation) => meta.completion(
            &generation.generated.text,
            finish_reason(generation.finish_reason),
            None,
            usage_of_generation(&generation),
        ),
        Err(failure) => match partial_answer(&failure) {
            Some(limit) => meta.completion(
                &failure.partial.text,
                "length",
                Some(limit),
                usage_of_failure(&failure, chat.prompt_estimate),
            ),
            None => {
                let mut e = ApiError::from_run(&failure.error);
                e.headers.extend(rate_headers);
                return Err(e);
            }
        },
    };
    let body = encode_answer(state, &answer)?;
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    response.headers_mut().extend(rate_headers);
    Ok(response)
}

/// The request checked against the model and OpenAI's rules that the guest does not know.
fn prepare(served: Arc<Served>, request: ChatRequest) -> Result<Chat, ApiError> {
    let Some(generator) = served.model.generator_info() else {
        return Err(ApiError::bad_request(
            format!(
                "Model {} does not generate text; use /v1/embeddings or /v1/infer.",
                served.name
            ),
            Some("model"),
        ));
    };
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("Only n = 1 is supported.", Some("n")));
    }
    let max_tokens = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => DEFAULT_MAX_TOKENS,
    };
    let messages = request
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                Content::Text(text) => text,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(piece)) => text.push_str(&piece),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
                                    format!(
                                        "Only text content parts are supported, not {:?}.",
                                        clip(kind, LOG_FIELD_MAX)
                                    ),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message {
                role: m.role,
                content,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let context = generator.context_length;
    let prompt_estimate = messages
        .iter()
        .map(|m| estimate_tokens(&m.content, 0) + TEMPLATE_TOKENS_PER_MESSAGE)
        .sum::<u64>()
        .min(u64::from(context));
    let stop = match request.stop {
        None => Vec::new(),
        Some(StopStrings::One(one)) => vec![one],
        Some(StopStrings::Many(many)) => many,
    };
    Ok(Chat {
        served,
        request: GenerateRequest {
            prompt: Prompt::Chat(messages),
            max_tokens,
            temperature: request.temperature.unwrap_or(1.0),
            top_p: request.top_p.unwrap_or(1.0),
            seed: request.seed.unwrap_or(0),
            stop,
        },
        prompt_estimate,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// What every answer and chunk of one completion carries.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(model: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            id: format!(
                "chatcmpl-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            created,
            model: model.to_string(),
        }
    }

    /// A whole (not streamed) answer: its one choice, and its usage.
    fn completion(&self, text: &str, finish: &str, limit: Option<Value>, usage: Value) -> Value {
        let mut choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        });
        if let Some(limit) = limit {
            choice["limit"] = limit;
        }
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    fn chunk(&self, choices: Value) -> Bytes {
        event(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }))
    }
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A failed generation that still answers with its text: a limit stopped it after at least one
/// token. The limit's figures, for the choice's `limit` field.
fn partial_answer(failure: &GenerationError) -> Option<Value> {
    let limit = failure.error.error.limit()?;
    (!failure.partial.tokens.is_empty()).then(|| limit_json(limit))
}

fn usage_of_generation(generation: &Generation) -> Value {
    json!({
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "fuel": generation.usage.fuel_consumed,
        "fuel_to_first_token": generation.token_fuel.to_first_token,
        "fuel_per_token": generation.token_fuel.per_token,
    })
}

/// A stopped generation's usage: the guest reports the prompt's tokens only at the end, so the
/// estimate stands in for them (and says so).
fn usage_of_failure(failure: &GenerationError, prompt_estimate: u64) -> Value {
    let completion = failure.partial.tokens.len() as u64;
    json!({
        "prompt_tokens": prompt_estimate,
        "prompt_tokens_estimated": true,
        "completion_tokens": completion,
        "total_tokens": prompt_estimate + completion,
        "fuel": failure.error.usage.fuel_consumed,
        "fuel_to_first_token": failure.token_fuel.to_first_token,
        "fuel_per_token": failure.token_fuel.per_token,
    })
}

/// The streamed answer. Its head waits for the first piece of text (or the generation's end),
/// so that what fails before any text is an HTTP error; then the events follow as the pieces
/// arrive.
async fn stream(
    mut run: JoinHandle<Result<GenerationRun, ApiError>>,
    mut received: UnboundedReceiver<String>,
    meta: Meta,
    include_usage: bool,
    prompt_estimate: u64,
) -> Result<Response, ApiError> {
    let first = tokio::select! {
        biased;
        piece = received.recv() => piece,
        ended = &mut run => {
            // Ended before any text: the answer is the run's (the channel may still hold the
            // last pieces of a generation that ended right after them).
            let ended = ended.map_err(pipeline_failed)??;
            let mut pieces = Vec::new();
            while let Ok(piece) = received.try_recv() {
                pieces.push(piece);
            }
            if pieces.is_empty() {
                if let Err(failure) = &ended.result {
                    let mut e = ApiError::from_run(&failure.error);
                    e.headers.extend(ended.rate_headers);
                    return Err(e);
                }
            }
            let events = finished_events(&meta, pieces, &ended, include_usage, prompt_estimate);
            return Ok(sse(futures::stream::iter(events.into_iter().map(Ok))));
        }
    };
    let Some(first) = first else {
        // The channel closed without a piece: the generation ended; its answer is the run's.
        let ended = run.await.map_err(pipeline_failed)??;
        if let Err(failure) = &ended.result {
            let mut e = ApiError::from_run(&failure.error);
            e.headers.extend(ended.rate_headers);
            return Err(e);
        }
        let events = finished_events(&meta, Vec::new(), &ended, include_usage, prompt_estimate);
        return Ok(sse(futures::stream::iter(events.into_iter().map(Ok))));
    };
    let opening = vec![
        meta.chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])),
        meta.chunk(json!([{"index": 0, "delta": {"content": first}, "finish_reason": null}])),
    ];
    enum Phase {
        Opening(std::vec::IntoIter<Bytes>),
        Pieces,
        Closing(std::vec::IntoIter<Bytes>),
    }
    let streamed = futures::stream::unfold(
        (
            Phase::Opening(opening.into_iter()),
            received,
            Some(run),
            meta,
        ),
        move |(mut phase, mut received, mut run, meta)| async move {
            loop {
                match &mut phase {
                    Phase::Opening(events) | Phase::Closing(events) => {
                        if let Some(event) = events.next() {
                            return Some((
                                Ok::<_, std::convert::Infallible>(event),
                                (phase, received, run, meta),
                            ));
                        }
                        if matches!(phase, Phase::Closing(_)) {
                            return None;
                        }
                        phase = Phase::Pieces;
                    }
                    Phase::Pieces => match received.recv().await {
                        Some(piece) => {
                            let event = meta.chunk(json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]));
                            return Some((Ok(event), (phase, received, run, meta)));
                        }
                        None => {
                            let ended = match run.take() {
                                Some(handle) => handle.await,
                                None => return None,
                            };
                            let events = match ended {
                                Ok(Ok(ended)) => finished_events(
                                    &meta,
                                    Vec::new(),
                                    &ended,
                                    include_usage,
                                    prompt_estimate,
                                ),
                                Ok(Err(e)) => vec![event(&e.body())],
                                Err(e) => vec![event(&pipeline_failed(e).body())],
                            };
                            phase = Phase::Closing(events.into_iter());
                        }
                    },
                }
            }
        },
    );
    Ok(sse(streamed))
}

/// The events after the last piece: the final chunk (its finish reason, and the limit that
/// stopped it), the usage chunk when asked for, and `[DONE]`; or, for a failure that is not a
/// limit, one `error` event.
fn finished_events(
    meta: &Meta,
    pieces: Vec<String>,
    ended: &GenerationRun,
    include_usage: bool,
    prompt_estimate: u64,
) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = pieces
        .into_iter()
        .map(|piece| {
            meta.chunk(json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]))
        })
        .collect();
    let (last, usage) = match &ended.result {
        Ok(generation) => (
            json!([{"index": 0, "delta": {}, "finish_reason": finish_reason(generation.finish_reason)}]),
            usage_of_generation(generation),
        ),
        Err(failure) => match failure.error.error.limit() {
            Some(limit) => (
                json!([{"index": 0, "delta": {}, "finish_reason": "length", "limit": limit_json(limit)}]),
                usage_of_failure(failure, prompt_estimate),
            ),
            None => {
                events.push(event(&ApiError::from_run(&failure.error).body()));
                return events;
            }
        },
    };
    events.push(meta.chunk(last));
    if include_usage {
        events.push(event(&json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [],
            "usage": usage,
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn sse(
    events: impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut response = Body::from_stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}
