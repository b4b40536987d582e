//! Pre-initialised snapshots: build the model once, start every run from the built state.
//!
//! A model component that exports `wizer-initialize` (the `preinit-model` world in `wit/`) is
//! instantiated once under the loader's limits, that function is called (the guest parses its
//! weights, builds its tensors, loads its tokenizer), and the initialised instance's linear
//! memories and globals are written back into the component as data segments
//! ([`wasmtime_wizer`]). The result is an ordinary `model` component whose runs begin where
//! initialisation ended, so a run's fuel and memory measure the request alone, and wasmtime's
//! copy-on-write memory images let every concurrent instance share the snapshot's pages.
//!
//! Initialisation runs with every import but `wasi:random` defined as a trap: whatever it could
//! learn from the host (clock, files, stdio handles) would be frozen into the snapshot and
//! replayed into runs that never asked for it, so a guest that calls one there is refused.
//! Randomness is the exception because it is seeded identically in every store (and metered
//! as in a run).
//!
//! A snapshot carries a `wasm-infer-snapshot` custom section: the format, the wasm-infer and
//! wasmtime versions and engine settings that made it, the source component's digest and what
//! initialisation cost. Loading a snapshot made under other settings is refused with the
//! differences spelled out, because its state (and its recorded figures) came from semantics
//! this runtime does not have.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Instance, Linker, WasmList};
use wasmtime::Store;
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use crate::component::{self, Inspection};
use crate::error::{Error, InvalidModel, Result};
use crate::limits::Limits;
use crate::run::call_limited;
use crate::runtime::{block_on, EngineFingerprint, Runtime};
use crate::store::RunState;

/// The export a pre-initialisable model provides (wizer's default name).
pub const INIT_EXPORT: &str = "wizer-initialize";
/// Name of the custom section that marks and describes a snapshot.
pub const SNAPSHOT_SECTION: &str = "wasm-infer-snapshot";
/// Version of the snapshot section's layout and of the snapshotting procedure.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// What pre-initialising a model cost. Paid once, when the snapshot is made; runs started
/// from the snapshot do not pay it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitReport {
    /// Fuel consumed by instantiation plus `wizer-initialize` (0 without fuel metering).
    pub fuel: u64,
    /// Linear memory (all memories) when initialisation ended: the snapshot's initial memory.
    pub memory_bytes: u64,
    /// Wall time of instantiation plus initialisation (not of compiling or rewriting).
    #[serde(rename = "time_us", with = "crate::units::serde::micros")]
    pub time: Duration,
    /// Size of the component that was initialised.
    pub source_bytes: u64,
    /// Size of the snapshot component.
    pub snapshot_bytes: u64,
}

/// The `wasm-infer-snapshot` section's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// [`SNAPSHOT_FORMAT`] of the wasm-infer that made it.
    pub format: u32,
    /// wasm-infer version that made it.
    pub wasm_infer: String,
    /// Engine that ran the initialisation.
    pub engine: EngineFingerprint,
    /// SHA-256 of the component it was made from.
    pub source_sha256: String,
    /// What initialisation cost.
    pub init: InitReport,
}

impl SnapshotInfo {
    /// Refuses a snapshot made by another format or engine configuration.
    pub fn check(&self, runtime: &Runtime) -> Result<(), InvalidModel> {
        let mut differences = Vec::new();
        if self.format != SNAPSHOT_FORMAT {
            differences.push(format!(
                "snapshot format {} (this build: {SNAPSHOT_FORMAT})",
                self.format
            ));
        }
        differences.extend(self.engine.differences(&runtime.fingerprint()));
        if differences.is_empty() {
            Ok(())
        } else {
            Err(InvalidModel::SnapshotMismatch(format!(
                "made by wasm-infer {} with {}; make it again from the original component \
                 with this build (`wasm-infer snapshot`)",
                self.wasm_infer,
                differences.join(", ")
            )))
        }
    }
}

/// A pre-initialised component and its description.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The snapshot component (an ordinary `model` component with a snapshot section).
    pub wasm: Vec<u8>,
    /// What is in its snapshot section.
    pub info: SnapshotInfo,
}

/// Pre-initialises `wasm` (which must export [`INIT_EXPORT`]) under `limits` and returns the
/// snapshot. Blocking; see [`snapshot_async`].
pub fn snapshot(runtime: &Runtime, wasm: &[u8], limits: &Limits) -> Result<Snapshot> {
    block_on(snapshot_async(runtime, wasm, limits))?
}

/// Pre-initialises `wasm` under `limits` (fuel, memory and wall time bound the initialisation
/// like a run) and returns the snapshot.
pub async fn snapshot_async(runtime: &Runtime, wasm: &[u8], limits: &Limits) -> Result<Snapshot> {
    component::check_header(wasm)?;
    let inspection = component::inspect(wasm)?;
    if read_info(&inspection, wasm)?.is_some() {
        return Err(InvalidModel::Malformed("already a wasm-infer snapshot".into()).into());
    }
    if !inspection.exports_func(INIT_EXPORT) {
        return Err(InvalidModel::NotPreinitialisable.into());
    }
    // The world's exports are checked when the snapshot is loaded as a model.
    inspection.check_counts()?;
    inspection.check_imports()?;
    make(runtime, wasm, limits).await
}

/// Instruments, initialises and snapshots `wasm`, which the caller has inspected.
pub(crate) async fn make(runtime: &Runtime, wasm: &[u8], limits: &Limits) -> Result<Snapshot> {
    make_locked(runtime, wasm, limits, None).await
}

/// [`make`], calling `lock` (the pre-initialisation child's lock-down) once the component is
/// compiled and linked and before its first instruction runs.
pub(crate) async fn make_locked(
    runtime: &Runtime,
    wasm: &[u8],
    limits: &Limits,
    lock: Option<fn() -> std::result::Result<(), String>>,
) -> Result<Snapshot> {
    let mut wizer = Wizer::new();
    // The component-level export lifts the core module's `wizer-initialize`; wizer 48 drops
    // the core export but not the lift, which leaves an invalid component. Keeping it is
    // harmless: the snapshot's model is already built, so a second call does nothing.
    wizer.keep_init_func(true);
    let (context, instrumented) = wizer
        .instrument_component(wasm)
        .map_err(|e| InvalidModel::Malformed(format!("preparing the snapshot: {e:#}")))?;
    let engine = runtime.engine();
    let component = Component::new(engine, &instrumented)
        .map_err(|e| component::diagnose(&instrumented, &e))?;
    let init_index = match component.get_export(None, INIT_EXPORT) {
        Some((ComponentItem::ComponentFunc(ty), index))
            if ty.params().len() == 0 && ty.results().len() == 0 =>
        {
            index
        }
        _ => {
            return Err(InvalidModel::WrongWorld(format!(
                "`{INIT_EXPORT}` must be a function with no parameters and no results"
            ))
            .into())
        }
    };
    let linker = init_linker(engine, &component).map_err(|e| Error::Internal(format!("{e:#}")))?;
    let instance_pre = linker
        .instantiate_pre(&component)
        .map_err(|e| Error::Internal(format!("{e:#}")))?;
    if let Some(lock) = lock {
        // Made lazily at the first instantiation otherwise, through `memfd_create`, which the
        // locked process may not call.
        component
            .initialize_copy_on_write_image()
            .map_err(|e| Error::Internal(format!("preparing the memory image: {e:#}")))?;
        lock().map_err(|e| Error::Internal(format!("locking down: {e}")))?;
    }

    let limited = call_limited(runtime, limits, move |store| {
        Box::pin(async move {
            let instance = instance_pre.instantiate_async(&mut *store).await?;
            store.data_mut().mark_instantiated();
            let func = instance.get_typed_func::<(), ()>(&mut *store, init_index)?;
            func.call_async(&mut *store, ()).await?;
            Ok(instance)
        })
    })
    .await;
    let instance = limited.result.map_err(|e| Error::Init(Box::new(e)))?;
    let mut store = limited.store.expect("a call that succeeded had a store");
    // Whole microseconds: the figure is stored that way, and must compare equal once read back.
    let time = Duration::from_micros(limited.usage.wall_time.as_micros() as u64);
    let fuel = limited.usage.fuel_consumed;
    let memory_bytes = limited.usage.peak_memory_bytes;
    // wizer reads each memory whole as one `list<u8>`; the default cap on data copied per
    // host call (128 MiB, a guard against guests) is for runs, not for reading our own snapshot.
    store.data_mut().limit_result_copy(usize::MAX);
    let rewritten = wizer
        .snapshot_component(
            &context,
            &mut Access {
                store: &mut store,
                instance,
            },
        )
        .await
        .map_err(|e| Error::Internal(format!("writing the snapshot: {e:#}")))?;
    drop(store);

    let mut info = SnapshotInfo {
        format: SNAPSHOT_FORMAT,
        wasm_infer: env!("CARGO_PKG_VERSION").to_string(),
        engine: runtime.fingerprint(),
        source_sha256: crate::cache::component_digest(wasm),
        init: InitReport {
            fuel,
            memory_bytes,
            time,
            source_bytes: wasm.len() as u64,
            snapshot_bytes: 0,
        },
    };
    // The recorded size includes the section itself; its JSON length settles in two passes
    // at most (the size's digits are the only part that changes).
    let mut wasm_out = rewritten.clone();
    for _ in 0..3 {
        wasm_out = rewritten.clone();
        component::append_custom_section(&mut wasm_out, SNAPSHOT_SECTION, &section_payload(&info));
        if info.init.snapshot_bytes == wasm_out.len() as u64 {
            break;
        }
        info.init.snapshot_bytes = wasm_out.len() as u64;
    }
    tracing::debug!(
        fuel,
        memory_bytes,
        ?time,
        bytes = wasm_out.len(),
        "pre-initialised the model"
    );
    Ok(Snapshot {
        wasm: wasm_out,
        info,
    })
}

/// The imports initialisation may use: `wasi:random`, which is seeded deterministically
/// in every store (Rust's std seeds its `HashMap`s from it, so nearly every guest calls it while
/// initialising), so what it returned is what a run would have seen, and metered as in a run
/// (a floor a call, 16 fuel a random byte, 1 MiB a call at most: `wasi::cost`), so
/// the initialisation's fuel counts it; and `wasi:cli/environment`, empty as in a run (candle
/// reads a variable while it builds quantized layers). Every other import traps.
fn init_linker(
    engine: &wasmtime::Engine,
    component: &Component,
) -> wasmtime::Result<Linker<RunState>> {
    let mut linker: Linker<RunState> = Linker::new(engine);
    crate::wasi::add_random_only(&mut linker)?;
    crate::wasi::add_environment_only(&mut linker)?;
    linker.define_unknown_imports_as_traps(component)?;
    Ok(linker)
}

fn section_payload(info: &SnapshotInfo) -> Vec<u8> {
    serde_json::to_vec(info).expect("snapshot info serialises")
}

/// Reads the snapshot section of an inspected component, if it has one.
pub(crate) fn read_info(
    inspection: &Inspection,
    wasm: &[u8],
) -> Result<Option<SnapshotInfo>, InvalidModel> {
    inspection
        .custom_section(wasm, SNAPSHOT_SECTION)
        .map(|data| {
            serde_json::from_slice(data)
                .map_err(|e| InvalidModel::Malformed(format!("{SNAPSHOT_SECTION} section: {e}")))
        })
        .transpose()
}

/// Reads the snapshot section of `wasm`, if it is a snapshot.
pub fn snapshot_info(wasm: &[u8]) -> Result<Option<SnapshotInfo>, InvalidModel> {
    component::check_header(wasm)?;
    read_info(&component::inspect(wasm)?, wasm)
}

/// Checks that `snapshot` (from a process that ran guest code: data, not to be trusted) is
/// `source` with only its initial state changed, as pre-initialisation changes it: every
/// section but the memories, globals and data (and custom sections) byte for byte the same,
/// in the same order, nested modules and components included; the globals of the same types
/// (their values are free); the memories of the same types but for their initial size, which
/// may only have grown, together at most `memory_limit` bytes; each data segment active at a
/// constant offset and inside its memory's initial size (a passive segment the same as the
/// source's). What a snapshot that passes can still do is in SECURITY.md.
pub(crate) fn check_data_only(
    source: &[u8],
    snapshot: &[u8],
    memory_limit: u64,
) -> Result<(), InvalidModel> {
    let poisoned = InvalidModel::PoisonedSnapshot;
    let (source_parts, source_modules) = state_parts(source)
        .map_err(|e| InvalidModel::Malformed(format!("reading the component: {e}")))?;
    let (parts, modules) = state_parts(snapshot).map_err(poisoned)?;
    if let Some(at) =
        (0..parts.len().max(source_parts.len())).find(|&i| parts.get(i) != source_parts.get(i))
    {
        return Err(poisoned(match parts.get(at) {
            Some(StatePart::Globals(_)) => {
                format!("part {at}: its globals are not of the component's types")
            }
            Some(StatePart::Memories(_)) => {
                format!("part {at}: its memories are not of the component's types")
            }
            Some(StatePart::Section(id, _)) => format!(
                "part {at} (section id {id}) differs from the component's: a snapshot may \
                 change memory contents, memory sizes and global values, not code, types, \
                 imports or exports"
            ),
            _ => format!("part {at}: its structure differs from the component's"),
        }));
    }
    let mut total: u64 = 0;
    for (m, (module, source_module)) in modules.iter().zip(&source_modules).enumerate() {
        for (j, (memory, before)) in module
            .memories
            .iter()
            .zip(&source_module.memories)
            .enumerate()
        {
            if memory.initial < before.initial {
                return Err(poisoned(format!(
                    "memory {j} of module {m} shrank from {} to {} pages",
                    before.initial, memory.initial
                )));
            }
            total = total.saturating_add(memory_bytes(memory));
        }
        let memories: Vec<&wasmparser::MemoryType> =
            module.imported.iter().chain(&module.memories).collect();
        for (k, segment) in module.segments.iter().enumerate() {
            let Segment::Active {
                memory,
                offset,
                len,
            } = segment
            else {
                continue;
            };
            let Some(ty) = memories.get(*memory as usize) else {
                return Err(poisoned(format!(
                    "data segment {k} of module {m} is for memory {memory}, which it does not have"
                )));
            };
            let Some(offset) = offset else {
                return Err(poisoned(format!(
                    "data segment {k} of module {m} is at a computed offset"
                )));
            };
            let end = offset.saturating_add(*len);
            let size = memory_bytes(ty);
            if end > size {
                return Err(poisoned(format!(
                    "data segment {k} of module {m} ends at byte {end}, past the {size} bytes \
                     of its memory"
                )));
            }
        }
        // Pre-initialisation leaves each of the component's segments in its place as an
        // empty passive one (the code may name them by index) and adds its own after them,
        // active.
        let kept = source_module.segments.len();
        for (k, segment) in module.segments.iter().enumerate() {
            let fits = match segment {
                Segment::Passive(bytes) => k < kept && bytes.is_empty(),
                Segment::Active { .. } => k >= kept,
            };
            if !fits {
                return Err(poisoned(format!(
                    "data segment {k} of module {m} is not where pre-initialisation puts \
                     segments (the component's {kept} left empty and passive, then active ones)"
                )));
            }
        }
        if module.segments.len() < kept {
            return Err(poisoned(format!(
                "module {m} has {} data segments, fewer than the component's {kept}",
                module.segments.len()
            )));
        }
    }
    if total > memory_limit {
        return Err(poisoned(format!(
            "its memories hold {total} bytes, more than the {memory_limit} bytes of the load's \
             memory limit"
        )));
    }
    Ok(())
}

fn memory_bytes(memory: &wasmparser::MemoryType) -> u64 {
    memory
        .initial
        .checked_shl(memory.page_size_log2.unwrap_or(16))
        .filter(|bytes| bytes >> memory.page_size_log2.unwrap_or(16) == memory.initial)
        .unwrap_or(u64::MAX)
}

/// A component as [`check_data_only`] compares it.
#[derive(Debug, PartialEq, Eq)]
enum StatePart<'a> {
    /// A module or component begins (`true`: a core module).
    Begin(bool),
    End,
    /// A section's bytes (not a custom, memory, global, data or data-count section, nor a
    /// nested module or component, whose own parts follow).
    Section(u8, &'a [u8]),
    /// A module's memory types, initial sizes left out.
    Memories(Vec<wasmparser::MemoryType>),
    /// A module's global types.
    Globals(Vec<wasmparser::GlobalType>),
}

/// What pre-initialisation may change in one core module.
#[derive(Default)]
struct ModuleState<'a> {
    imported: Vec<wasmparser::MemoryType>,
    memories: Vec<wasmparser::MemoryType>,
    segments: Vec<Segment<'a>>,
}

enum Segment<'a> {
    /// `offset`: `None` when it is not one constant.
    Active {
        memory: u32,
        offset: Option<u64>,
        len: u64,
    },
    Passive(&'a [u8]),
}

fn state_parts(wasm: &[u8]) -> Result<(Vec<StatePart<'_>>, Vec<ModuleState<'_>>), String> {
    use wasmparser::{DataKind, Encoding, Operator, Parser, Payload, TypeRef};
    let mut parts = Vec::new();
    let mut done = Vec::new();
    // One entry per open module or component: the module's state, or `None`.
    let mut open: Vec<Option<ModuleState>> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| e.to_string())?;
        let module = open.last_mut().and_then(Option::as_mut);
        match (module, payload) {
            (_, Payload::Version { encoding, .. }) => {
                let is_module = encoding == Encoding::Module;
                parts.push(StatePart::Begin(is_module));
                open.push(is_module.then(ModuleState::default));
            }
            (_, Payload::End(_)) => {
                parts.push(StatePart::End);
                if let Some(Some(module)) = open.pop() {
                    done.push(module);
                }
            }
            (_, Payload::CustomSection(_))
            | (_, Payload::ModuleSection { .. })
            | (_, Payload::ComponentSection { .. })
            | (_, Payload::CodeSectionEntry(_))
            | (_, Payload::DataCountSection { .. }) => {}
            (Some(module), Payload::ImportSection(reader)) => {
                // 2: the import section's id.
                parts.push(StatePart::Section(2, &wasm[reader.range()]));
                for import in reader.into_imports() {
                    if let TypeRef::Memory(ty) = import.map_err(|e| e.to_string())?.ty {
                        module.imported.push(ty);
                    }
                }
            }
            (Some(module), Payload::MemorySection(reader)) => {
                module.memories = reader
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                let types = module
                    .memories
                    .iter()
                    .map(|ty| wasmparser::MemoryType { initial: 0, ..*ty })
                    .collect();
                parts.push(StatePart::Memories(types));
            }
            (Some(_), Payload::GlobalSection(reader)) => {
                let types = reader
                    .into_iter()
                    .map(|global| global.map(|g| g.ty))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                parts.push(StatePart::Globals(types));
            }
            (Some(module), Payload::DataSection(reader)) => {
                for data in reader {
                    let data = data.map_err(|e| e.to_string())?;
                    module.segments.push(match data.kind {
                        DataKind::Passive => Segment::Passive(data.data),
                        DataKind::Active {
                            memory_index,
                            offset_expr,
                        } => {
                            let mut ops = offset_expr.get_operators_reader();
                            let first = ops.read().map_err(|e| e.to_string())?;
                            let end = ops.read().map_err(|e| e.to_string())?;
                            let offset = match (first, end) {
                                (Operator::I32Const { value }, Operator::End) => {
                                    Some(u64::from(value as u32))
                                }
                                (Operator::I64Const { value }, Operator::End) => Some(value as u64),
                                _ => None,
                            };
                            Segment::Active {
                                memory: memory_index,
                                offset,
                                len: data.data.len() as u64,
                            }
                        }
                    });
                }
            }
            (_, payload) => {
                if let Some((id, range)) = payload.as_section() {
                    parts.push(StatePart::Section(id, &wasm[range]));
                }
            }
        }
    }
    Ok((parts, done))
}

/// Lets wizer read the initialised instance's memories and globals.
struct Access<'a> {
    store: &'a mut Store<RunState>,
    instance: Instance,
}

impl Access<'_> {
    async fn call<R: wasmtime::component::Lift + Send + Sync + 'static, T>(
        &mut self,
        instance: &str,
        func: &str,
        with: impl FnOnce(&Store<RunState>, R) -> T,
    ) -> T {
        // The accessors are wizer's own instrumentation of a component that just initialised
        // successfully, so a failure here is a bug in the snapshot machinery, not the guest's.
        let (_, instance_index) = self
            .instance
            .get_export(&mut *self.store, None, instance)
            .expect("wizer's accessor instance is exported");
        let (_, func_index) = self
            .instance
            .get_export(&mut *self.store, Some(&instance_index), func)
            .expect("wizer's accessor is exported");
        let typed = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, func_index)
            .expect("wizer's accessor has the expected type");
        let (value,) = typed
            .call_async(&mut *self.store, ())
            .await
            .expect("wizer's accessor does not trap");
        with(self.store, value)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(store))
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, v| v).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, v| v).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, v: f32| v.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, v: f64| v.to_bits()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_section_round_trips() {
        let mut wasm = wat::parse_str("(component)").unwrap();
        let info = SnapshotInfo {
            format: SNAPSHOT_FORMAT,
            wasm_infer: "0.0.0".into(),
            engine: EngineFingerprint {
                wasmtime: "1.2.3".into(),
                fuel: true,
                epochs: true,
                simd: true,
                relaxed_simd: true,
                relaxed_simd_deterministic: true,
                nan_canonicalization: true,
            },
            source_sha256: "ab".repeat(32),
            init: InitReport {
                fuel: 7,
                memory_bytes: 65536,
                time: Duration::from_micros(12),
                source_bytes: 100,
                snapshot_bytes: 200,
            },
        };
        assert_eq!(snapshot_info(&wasm).unwrap(), None);
        component::append_custom_section(&mut wasm, SNAPSHOT_SECTION, &section_payload(&info));
        assert_eq!(snapshot_info(&wasm).unwrap(), Some(info));
    }
}
