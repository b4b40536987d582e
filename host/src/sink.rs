//! `token-sink`: where a generator hands over its tokens as it makes them (`wit/model.wit`),
//! and what a run holds of them. The fuel rule of `emit` (docs/generation.md#fuel):
//! [`cost::EMIT_CALL`] per call, plus [`cost::EMIT_PER_TOKEN`] per token id and
//! [`cost::EMIT_PER_BYTE`] per byte of text, charged before anything is copied; the text also
//! counts against the run's output limit before it is copied.

use wasmtime::component::{Linker, WasmList, WasmStr};
use wasmtime::StoreContextMut;

use crate::error::LimitExceeded;

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

/// What a generation produced so far: every token id and the text the guest handed over.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub text: String,
}

/// Called with each `emit` (token ids, text) as it arrives, e.g. to print tokens as they come.
pub type OnEmit = Box<dyn FnMut(&[u32], &str) + Send>;

/// The fuel a run had left just after an `emit`, and how many tokens it had handed over by
/// then (the first and the last of a run give its prompt and per-token fuel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EmitStamp {
    pub(crate) fuel_left: u64,
    pub(crate) tokens: u64,
}

/// A run's generation state in its store.
#[derive(Default)]
pub(crate) struct Stream {
    pub(crate) generated: Generated,
    /// Stamps of the first and the latest `emit` that handed over a token (`None` without fuel
    /// metering): two figures, however many calls, so their memory does not grow with a run.
    pub(crate) first_emit: Option<EmitStamp>,
    pub(crate) last_emit: Option<EmitStamp>,
    /// The run's output limit (bytes of text).
    pub(crate) max_output: u64,
    /// The limit an `emit` hit (the call trapped), reported instead of the trap.
    pub(crate) tripped: Option<LimitExceeded>,
    pub(crate) on_emit: Option<OnEmit>,
}

/// What `emit` needs of a store's data: the run's deadline and its stream.
pub(crate) trait Streams: Send {
    fn deadline_passed(&mut self) -> bool;
    fn stream(&mut self) -> &mut Stream;
}

/// Links `token-sink.emit`: the deadline, then the output limit, then fuel, all before any
/// byte is copied.
pub(crate) fn add_to_linker<T: Streams + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    let mut sink = linker.instance("wasm-infer:model/token-sink@0.1.0")?;
    sink.func_wrap(
        "emit",
        |mut store: StoreContextMut<'_, T>,
         (tokens, text): (WasmList<u32>, WasmStr)|
         -> wasmtime::Result<()> {
            if store.data_mut().deadline_passed() {
                return Err(wasmtime::Trap::Interrupt.into());
            }
            if tokens.len() > MAX_TOKENS_PER_EMIT {
                return Err(wasmtime::format_err!(
                    "token-sink.emit: {} token ids in one call (at most {MAX_TOKENS_PER_EMIT})",
                    tokens.len()
                ));
            }
            let bytes = text.to_str(&store)?.len() as u64;
            let stream = store.data_mut().stream();
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
            let fuel_left = store.get_fuel().ok();
            let stream = store.data_mut().stream();
            stream.generated.tokens.extend_from_slice(&ids);
            if let (Some(fuel_left), false) = (fuel_left, ids.is_empty()) {
                let stamp = EmitStamp {
                    fuel_left,
                    tokens: stream.generated.tokens.len() as u64,
                };
                stream.first_emit.get_or_insert(stamp);
                stream.last_emit = Some(stamp);
            }
            stream.generated.text.push_str(&piece);
            if let Some(on_emit) = stream.on_emit.as_mut() {
                on_emit(&ids, &piece);
            }
            Ok(())
        },
    )?;
    Ok(())
}
