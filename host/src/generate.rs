//! Text generation: a model that also exports the `generator` world's `generate`
//! (`wit/model.wit`), run under the same limits as any model, with every token streamed to the
//! host through `token-sink.emit` as the guest produces it.
//!
//! Because the host holds every token the moment it is final, a run that a limit stops (fuel,
//! memory, wall time, output) still returns what was generated, on its [`GenerationError`],
//! marked with the limit; and since fuel counts wasm instructions, the same fuel cap stops the
//! same request at the same token on every run.
//!
//! The fuel rule of `emit` (docs/generation.md#fuel): [`cost::EMIT_CALL`] per call, plus
//! [`cost::EMIT_PER_TOKEN`] per token id and [`cost::EMIT_PER_BYTE`] per byte of text, charged
//! before anything is copied; the text also counts against the run's output limit
//! ([`Limits::max_output`]) before it is copied.

use wasmtime::component::{Linker, WasmList, WasmStr};
use wasmtime::StoreContextMut;

use crate::bindings::generator::wasm_infer::model::generation as wit;
use crate::bindings::generator::GeneratorPre;
use crate::bindings::ModelPre;
use crate::error::{Error, LimitExceeded, RunError};
use crate::limits::Limits;
use crate::model::Model;
use crate::run::call_limited;
use crate::runtime::{block_on, Runtime};
use crate::store::RunState;
use crate::usage::Usage;

/// The fuel cost model of `token-sink.emit`.
pub mod cost {
    /// Every call (a context switch into the host, a deadline check, a callback).
    pub const EMIT_CALL: u64 = 100;
    /// Per token id handed over (4 bytes copied into a growing list).
    pub const EMIT_PER_TOKEN: u64 = 4;
    /// Per byte of text (validated as UTF-8 and copied once).
    pub const EMIT_PER_BYTE: u64 = 1;

    /// One call handing over `tokens` ids and `bytes` bytes of text.
    pub fn emit(tokens: u64, bytes: u64) -> u64 {
        EMIT_CALL
            .saturating_add(tokens.saturating_mul(EMIT_PER_TOKEN))
            .saturating_add(bytes.saturating_mul(EMIT_PER_BYTE))
    }
}

/// Most token ids one `emit` may hand over (a guest hands over one or a few).
pub const MAX_TOKENS_PER_EMIT: usize = 4096;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

/// What to continue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// One user message; the model applies its chat template.
    Text(String),
    /// A conversation; the model applies its chat template.
    Chat(Vec<Message>),
}

/// A generation request (the `generation.request` record of `wit/model.wit`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Most tokens to generate (at least 1).
    pub max_tokens: u32,
    /// 0 is greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Seeds the model's own random generator.
    pub seed: u64,
    /// Generation ends before any of these would appear; not part of the text.
    pub stop: Vec<String>,
}

impl GenerateRequest {
    /// Greedy generation of at most `max_tokens` tokens for one user message.
    pub fn new(prompt: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            prompt: Prompt::Text(prompt.into()),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }

    /// The request's bytes (prompt, messages and stop strings), checked against the input
    /// limit before any guest work.
    pub fn payload_bytes(&self) -> u64 {
        let prompt = match &self.prompt {
            Prompt::Text(text) => text.len(),
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| m.role.len() + m.content.len())
                .sum(),
        };
        (prompt + self.stop.iter().map(String::len).sum::<usize>()) as u64
    }

    fn into_wit(self) -> wit::Request {
        wit::Request {
            prompt: match self.prompt {
                Prompt::Text(text) => wit::Prompt::Text(text),
                Prompt::Chat(messages) => wit::Prompt::Chat(
                    messages
                        .into_iter()
                        .map(|m| wit::Message {
                            role: m.role,
                            content: m.content,
                        })
                        .collect(),
                ),
            },
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// A generator's static facts (`generator-info`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GeneratorInfo {
    /// Prompt and generated tokens together.
    pub context_length: u32,
    /// The chat template the model applies (Jinja source).
    pub chat_template: String,
}

/// What a generation produced so far: every token id and the text the guest handed over.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub text: String,
}

/// A finished generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// The text and token ids, as streamed.
    #[serde(flatten)]
    pub generated: Generated,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// A failed generation: the error, what the run used, and what it had generated before the
/// error (empty when it failed before the first token, e.g. a refused request).
#[derive(Debug)]
pub struct GenerationError {
    pub error: RunError,
    pub partial: Generated,
}

impl std::fmt::Display for GenerationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for GenerationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// Called with each `emit` (token ids, text) as it arrives, e.g. to print tokens as they come.
pub type OnEmit = Box<dyn FnMut(&[u32], &str) + Send>;

/// A run's generation state in its store.
#[derive(Default)]
pub(crate) struct Stream {
    pub(crate) generated: Generated,
    /// The run's output limit (bytes of text).
    pub(crate) max_output: u64,
    /// The limit an `emit` hit (the call trapped), reported instead of the trap.
    pub(crate) tripped: Option<LimitExceeded>,
    pub(crate) on_emit: Option<OnEmit>,
}

/// A loaded generator: its bindings and `generator-info`.
#[derive(Clone)]
pub(crate) struct GeneratorModel {
    pub(crate) pre: GeneratorPre<RunState>,
    pub(crate) info: GeneratorInfo,
}

/// Links `token-sink.emit`: the deadline, then the output limit, then fuel, all before any
/// byte is copied.
pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    let mut sink = linker.instance("wasm-infer:model/token-sink@0.1.0")?;
    sink.func_wrap(
        "emit",
        |mut store: StoreContextMut<'_, RunState>,
         (tokens, text): (WasmList<u32>, WasmStr)|
         -> wasmtime::Result<()> {
            if store.data_mut().deadline.check() {
                return Err(wasmtime::Trap::Interrupt.into());
            }
            if tokens.len() > MAX_TOKENS_PER_EMIT {
                return Err(wasmtime::format_err!(
                    "token-sink.emit: {} token ids in one call (at most {MAX_TOKENS_PER_EMIT})",
                    tokens.len()
                ));
            }
            let bytes = text.to_str(&store)?.len() as u64;
            let stream = &mut store.data_mut().stream;
            let size = stream.generated.text.len() as u64 + bytes;
            if size > stream.max_output {
                let limit = LimitExceeded::Output {
                    limit: stream.max_output,
                    size,
                    at_least: false,
                };
                stream.tripped = Some(limit.clone());
                return Err(wasmtime::format_err!("token-sink.emit: {limit}"));
            }
            crate::accel::charge(&mut store, cost::emit(tokens.len() as u64, bytes))?;
            let ids: Vec<u32> = tokens
                .as_le_slice(&store)
                .iter()
                .map(|id| u32::from_le(*id))
                .collect();
            let piece = text.to_str(&store)?.into_owned();
            let stream = &mut store.data_mut().stream;
            stream.generated.tokens.extend_from_slice(&ids);
            stream.generated.text.push_str(&piece);
            if let Some(on_emit) = stream.on_emit.as_mut() {
                on_emit(&ids, &piece);
            }
            Ok(())
        },
    )?;
    Ok(())
}

impl Model {
    /// The generator's facts, when the model exports `generate` (`None` for other models).
    pub fn generator_info(&self) -> Option<&GeneratorInfo> {
        self.generator().map(|g| &g.info)
    }

    /// Generates for `request` in a fresh sandbox under `limits`, blocking the calling thread.
    pub fn generate(
        &self,
        request: GenerateRequest,
        limits: &Limits,
    ) -> Result<Generation, GenerationError> {
        self.generate_streaming(request, limits, None)
    }

    /// [`Model::generate`], calling `on_emit` with each piece as the guest hands it over.
    pub fn generate_streaming(
        &self,
        request: GenerateRequest,
        limits: &Limits,
        on_emit: Option<OnEmit>,
    ) -> Result<Generation, GenerationError> {
        block_on(self.generate_async(request, limits, on_emit)).unwrap_or_else(|error| {
            Err(GenerationError {
                error: RunError::new(error, Usage::default()),
                partial: Generated::default(),
            })
        })
    }

    /// [`Model::generate`] on the caller's tokio runtime (see [`Model::run_async`]).
    pub async fn generate_async(
        &self,
        request: GenerateRequest,
        limits: &Limits,
        on_emit: Option<OnEmit>,
    ) -> Result<Generation, GenerationError> {
        let refuse = |error: Error, input_bytes: u64| GenerationError {
            error: RunError::new(
                error,
                Usage {
                    input_bytes,
                    ..Usage::default()
                },
            ),
            partial: Generated::default(),
        };
        let input_bytes = request.payload_bytes();
        let Some(generator) = self.generator().cloned() else {
            return Err(refuse(
                Error::Model {
                    code: crate::error::ModelErrorCode::UnsupportedInput,
                    message: format!(
                        "{} is not a text generator (it does not export `generate`)",
                        self.info().name
                    ),
                },
                input_bytes,
            ));
        };
        if input_bytes > limits.max_input {
            let limit = LimitExceeded::Input {
                limit: limits.max_input,
                size: input_bytes,
            };
            return Err(refuse(limit.into(), input_bytes));
        }
        let (_admitted, granted) = match self.runtime().admit(limits) {
            Ok(admitted) => admitted,
            Err(error) => return Err(refuse(error, input_bytes)),
        };
        let limits = &granted;
        let weights = self.weights();
        let request = request.into_wit();
        let limited = call_limited(self.runtime(), limits, move |store| {
            Box::pin(async move {
                store.data_mut().device.share_weights(weights);
                store.data_mut().stream.on_emit = on_emit;
                let instance = generator.pre.instantiate_async(&mut *store).await?;
                store.data_mut().mark_instantiated();
                instance.call_generate(&mut *store, &request).await
            })
        })
        .await;
        let mut usage = limited.usage;
        usage.input_bytes = input_bytes;
        let (partial, tripped) = match limited.store {
            Some(mut store) => {
                let stream = std::mem::take(&mut store.data_mut().stream);
                (stream.generated, stream.tripped)
            }
            None => (Generated::default(), None),
        };
        usage.output_bytes = partial.text.len() as u64;
        let error = match limited.result {
            Ok(Ok(answer)) => {
                return Ok(Generation {
                    generated: partial,
                    prompt_tokens: answer.prompt_tokens,
                    completion_tokens: answer.completion_tokens,
                    finish_reason: match answer.finish_reason {
                        wit::FinishReason::Stop => FinishReason::Stop,
                        wit::FinishReason::Length => FinishReason::Length,
                    },
                    usage,
                })
            }
            Ok(Err(refusal)) => Error::Model {
                code: refusal.code.into(),
                message: refusal.message,
            },
            // The output limit, refused by `emit`, rather than the trap it raised.
            Err(Error::Trap { .. }) if tripped.is_some() => tripped.expect("checked").into(),
            Err(error) => error,
        };
        Err(GenerationError {
            error: RunError::new(error, usage),
            partial,
        })
    }
}

/// Asks a generator for its `generator-info` (at load), `None` when the component does not
/// export the `generator` world.
pub(crate) async fn fetch_generator(
    runtime: &Runtime,
    model: &ModelPre<RunState>,
    limits: &Limits,
) -> crate::error::Result<Option<GeneratorModel>> {
    let Ok(pre) = GeneratorPre::new(model.instance_pre().clone()) else {
        return Ok(None);
    };
    let call = pre.clone();
    let limited = call_limited(runtime, limits, move |store| {
        Box::pin(async move {
            let instance = call.instantiate_async(&mut *store).await?;
            store.data_mut().limit_result_copy(crate::limits::MAX_INFO_BYTES as usize);
            instance.call_generator_info(&mut *store).await
        })
    })
    .await;
    let info = limited.result?;
    Ok(Some(GeneratorModel {
        pre,
        info: GeneratorInfo {
            context_length: info.context_length,
            chat_template: info.chat_template,
        },
    }))
}
