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

use crate::bindings::generator::wasm_infer::model::generation as wit;
use crate::error::{Error, LimitExceeded, RunError};
use crate::limits::Limits;
use crate::model::Model;
use crate::run::call_limited;
use crate::runtime::block_on;
use crate::usage::Usage;

pub use crate::generator::GeneratorInfo;
use crate::sink::EmitStamp;
pub use crate::sink::{cost, Generated, OnEmit, MAX_TOKENS_PER_EMIT};

/// Tokens generated when a request does not say (the CLI's `--max-tokens`, serve's
/// `max_tokens`).
pub const DEFAULT_MAX_TOKENS: u32 = 64;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// Where a generation's fuel went, read off the fuel left at each `emit` that handed over a
/// token (docs/generation.md#fuel-per-token): figures to plan a fuel cap with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenFuel {
    /// Fuel used when the first token had been handed over: the prompt's processing, the first
    /// decoding step and its `emit`. It is the smallest fuel cap that lets the first token
    /// through: with one unit less the run stops before it.
    pub to_first_token: Option<u64>,
    /// The same for the last token handed over.
    pub to_last_token: Option<u64>,
    /// Tokens between the two (the first excluded).
    pub tokens_after_first: u64,
    /// Mean fuel per token after the first: (`to_last_token` - `to_first_token`) /
    /// `tokens_after_first`, rounded down (`None` for fewer than two tokens).
    pub per_token: Option<u64>,
}

impl TokenFuel {
    fn from_stamps(budget: u64, first: Option<EmitStamp>, last: Option<EmitStamp>) -> Self {
        let (Some(first), Some(last)) = (first, last) else {
            return Self::default();
        };
        let used = |stamp: EmitStamp| budget.saturating_sub(stamp.fuel_left);
        let tokens_after_first = last.tokens.saturating_sub(first.tokens);
        Self {
            to_first_token: Some(used(first)),
            to_last_token: Some(used(last)),
            tokens_after_first,
            per_token: (tokens_after_first > 0)
                .then(|| (used(last) - used(first)) / tokens_after_first),
        }
    }
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
    pub token_fuel: TokenFuel,
    pub usage: Usage,
}

/// A failed generation: the error, what the run used, and what it had generated before the
/// error (empty when it failed before the first token, e.g. a refused request).
#[derive(Debug)]
pub struct GenerationError {
    pub error: RunError,
    pub partial: Generated,
    /// The fuel figures of the tokens in `partial`.
    pub token_fuel: TokenFuel,
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
    ) -> Result<Generation, Box<GenerationError>> {
        self.generate_streaming(request, limits, None)
    }

    /// [`Model::generate`], calling `on_emit` with each piece as the guest hands it over.
    pub fn generate_streaming(
        &self,
        request: GenerateRequest,
        limits: &Limits,
        on_emit: Option<OnEmit>,
    ) -> Result<Generation, Box<GenerationError>> {
        block_on(self.generate_async(request, limits, on_emit)).unwrap_or_else(|error| {
            Err(Box::new(GenerationError {
                error: RunError::new(error, Usage::default()),
                partial: Generated::default(),
                token_fuel: TokenFuel::default(),
            }))
        })
    }

    /// [`Model::generate`] on the caller's tokio runtime (see [`Model::run_async`]).
    pub async fn generate_async(
        &self,
        request: GenerateRequest,
        limits: &Limits,
        on_emit: Option<OnEmit>,
    ) -> Result<Generation, Box<GenerationError>> {
        let refuse = |error: Error, input_bytes: u64| {
            Box::new(GenerationError {
                error: RunError::new(
                    error,
                    Usage {
                        input_bytes,
                        ..Usage::default()
                    },
                ),
                partial: Generated::default(),
                token_fuel: TokenFuel::default(),
            })
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
        let (partial, tripped, token_fuel) = match limited.store {
            Some(mut store) => {
                let stream = std::mem::take(&mut store.data_mut().stream);
                let budget = crate::store::fuel_budget(limits);
                let fuel = TokenFuel::from_stamps(budget, stream.first_emit, stream.last_emit);
                (stream.generated, stream.tripped, fuel)
            }
            None => (Generated::default(), None, TokenFuel::default()),
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
                    token_fuel,
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
        Err(Box::new(GenerationError {
            error: RunError::new(error, usage),
            partial,
            token_fuel,
        }))
    }
}
