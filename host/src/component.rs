//! What can be learnt about a component before compiling it: the header, custom sections,
//! what it imports and exports, and how many instances, memories and tables it would create.
//! A component that fails any of these checks is refused before a compiler ever sees it, so a
//! refused model costs neither a compilation nor a cache entry. After a failed compilation,
//! [`diagnose`] says whether the component uses a proposal this host leaves off.

use wasmparser::{
    ComponentAlias, ComponentExternalKind, ComponentInstance, ComponentOuterAliasKind,
    ComponentTypeRef, Encoding, Instance, Parser, Payload, Validator, WasmFeatures,
};

use crate::error::{ComponentPart, InvalidModel};
use crate::limits::{MAX_CORE_INSTANCES, MAX_MEMORIES, MAX_TABLES};

/// Checks the 8-byte preamble: `\0asm`, then version/layer. Core modules are `01 00 00 00`,
/// components `0d 00 01 00`.
pub(crate) fn check_header(wasm: &[u8]) -> Result<(), InvalidModel> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(InvalidModel::NotWasm);
    }
    match wasm[4..8] {
        [_, _, 0, 0] => Err(InvalidModel::NotAComponent),
        _ => Ok(()),
    }
}

fn malformed(e: wasmparser::BinaryReaderError) -> InvalidModel {
    InvalidModel::Malformed(e.to_string())
}

/// What instantiating a component (or one core module) creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) core_instances: u64,
    pub(crate) memories: u64,
    pub(crate) tables: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.core_instances = self.core_instances.saturating_add(other.core_instances);
        self.memories = self.memories.saturating_add(other.memories);
        self.tables = self.tables.saturating_add(other.tables);
    }
}

/// The outermost component's interface and size, read without validating code.
#[derive(Debug, Default)]
pub(crate) struct Inspection {
    /// Names of the instances, functions and other items imported (`wasi:io/poll@0.2.0`),
    /// type imports excepted.
    pub(crate) imports: Vec<String>,
    /// Export names and kinds.
    pub(crate) exports: Vec<(String, ComponentExternalKind)>,
    /// Everything one instantiation creates, nested components and modules included.
    pub(crate) counts: Counts,
    /// Custom sections of the outermost component, by name (payload ranges into the bytes).
    custom: Vec<(String, std::ops::Range<usize>)>,
}

/// One component's index spaces (what its modules and components would create) while its
/// sections are read.
#[derive(Default)]
struct Scope {
    modules: Vec<Counts>,
    components: Vec<Counts>,
    total: Counts,
}

enum Frame {
    Component(Scope),
    Module(Counts),
}

/// Reads `wasm` (a component) section by section: see [`Inspection`]. Counts are static: each
/// core instantiation adds its module's defined memories and tables, each component
/// instantiation what that component creates, so a nested component instantiated twice
/// counts twice.
pub(crate) fn inspect(wasm: &[u8]) -> Result<Inspection, InvalidModel> {
    let mut out = Inspection::default();
    let mut stack: Vec<Frame> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(malformed)?;
        let depth = stack.len();
        match (stack.last_mut(), payload) {
            (_, Payload::Version { encoding, .. }) => stack.push(match encoding {
                Encoding::Component => Frame::Component(Scope::default()),
                Encoding::Module => Frame::Module(Counts::default()),
            }),
            (_, Payload::End(_)) => {
                let finished = stack.pop();
                match (finished, stack.last_mut()) {
                    (Some(Frame::Module(counts)), Some(Frame::Component(parent))) => {
                        parent.modules.push(counts)
                    }
                    (Some(Frame::Component(scope)), Some(Frame::Component(parent))) => {
                        parent.components.push(scope.total)
                    }
                    (Some(Frame::Component(scope)), None) => out.counts = scope.total,
                    _ => {}
                }
            }
            (Some(Frame::Module(counts)), Payload::MemorySection(reader)) => {
                counts.memories += u64::from(reader.count())
            }
            (Some(Frame::Module(counts)), Payload::TableSection(reader)) => {
                counts.tables += u64::from(reader.count())
            }
            (Some(Frame::Component(scope)), Payload::InstanceSection(reader)) => {
                for instance in reader {
                    if let Instance::Instantiate { module_index, .. } =
                        instance.map_err(malformed)?
                    {
                        let module = scope.modules.get(module_index as usize).copied();
                        scope.total.add(module.unwrap_or_default());
                        scope.total.core_instances += 1;
                    }
                }
            }
            (Some(Frame::Component(scope)), Payload::ComponentInstanceSection(reader)) => {
                for instance in reader {
                    if let ComponentInstance::Instantiate {
                        component_index, ..
                    } = instance.map_err(malformed)?
                    {
                        let component = scope.components.get(component_index as usize).copied();
                        scope.total.add(component.unwrap_or_default());
                    }
                }
            }
            (Some(Frame::Component(_)), Payload::ComponentAliasSection(reader)) => {
                for alias in reader {
                    let alias = alias.map_err(malformed)?;
                    let (is_module, counts) = match alias {
                        ComponentAlias::Outer { kind, count, index } => {
                            let outer = depth.checked_sub(1 + count as usize);
                            let outer = outer.and_then(|i| match &stack[i] {
                                Frame::Component(scope) => Some(scope),
                                Frame::Module(_) => None,
                            });
                            match kind {
                                ComponentOuterAliasKind::CoreModule => (
                                    Some(true),
                                    outer.and_then(|s| s.modules.get(index as usize).copied()),
                                ),
                                ComponentOuterAliasKind::Component => (
                                    Some(false),
                                    outer.and_then(|s| s.components.get(index as usize).copied()),
                                ),
                                _ => (None, None),
                            }
                        }
                        ComponentAlias::InstanceExport { kind, .. } => match kind {
                            ComponentExternalKind::Module => (Some(true), None),
                            ComponentExternalKind::Component => (Some(false), None),
                            _ => (None, None),
                        },
                        ComponentAlias::CoreInstanceExport { .. } => (None, None),
                    };
                    if let Some(Frame::Component(scope)) = stack.last_mut() {
                        match is_module {
                            Some(true) => scope.modules.push(counts.unwrap_or_default()),
                            Some(false) => scope.components.push(counts.unwrap_or_default()),
                            None => {}
                        }
                    }
                }
            }
            (Some(Frame::Component(scope)), Payload::ComponentImportSection(reader)) => {
                for import in reader {
                    let import = import.map_err(malformed)?;
                    // What an imported module or component creates is the host's to say, and
                    // this host provides none.
                    match import.ty {
                        ComponentTypeRef::Module(_) => scope.modules.push(Counts::default()),
                        ComponentTypeRef::Component(_) => scope.components.push(Counts::default()),
                        _ => {}
                    }
                    // Type imports (the world's `use`d types) are satisfied by the instances
                    // they come from; only those need a provider.
                    let is_type = matches!(import.ty, ComponentTypeRef::Type(_));
                    if depth == 1 && !is_type {
                        out.imports.push(import.name.name.to_string());
                    }
                }
            }
            (Some(Frame::Component(scope)), Payload::ComponentExportSection(reader)) => {
                for export in reader {
                    let export = export.map_err(malformed)?;
                    // An export of a module or component adds to its index space too.
                    match export.kind {
                        ComponentExternalKind::Module => {
                            let counts = scope.modules.get(export.index as usize).copied();
                            scope.modules.push(counts.unwrap_or_default());
                        }
                        ComponentExternalKind::Component => {
                            let counts = scope.components.get(export.index as usize).copied();
                            scope.components.push(counts.unwrap_or_default());
                        }
                        _ => {}
                    }
                    if depth == 1 {
                        out.exports
                            .push((export.name.name.to_string(), export.kind));
                    }
                }
            }
            (Some(Frame::Component(_)), Payload::CustomSection(reader)) if depth == 1 => {
                out.custom.push((
                    reader.name().to_string(),
                    reader.data_offset()..reader.data_offset() + reader.data().len(),
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

impl Inspection {
    /// The payload of the outermost component's custom section `name` (the last, if several).
    pub(crate) fn custom_section<'w>(&self, wasm: &'w [u8], name: &str) -> Option<&'w [u8]> {
        self.custom
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, range)| &wasm[range.clone()])
    }

    /// Whether the component exports a function `name`.
    pub(crate) fn exports_func(&self, name: &str) -> bool {
        self.exports
            .iter()
            .any(|(n, kind)| n == name && *kind == ComponentExternalKind::Func)
    }

    /// Refuses a component that creates more than a model may (the caps the limiter and the
    /// pool enforce at instantiation, checked here so the refusal is typed and early).
    pub(crate) fn check_counts(&self) -> Result<(), InvalidModel> {
        let checks = [
            (
                ComponentPart::CoreInstances,
                self.counts.core_instances,
                MAX_CORE_INSTANCES,
            ),
            (ComponentPart::Memories, self.counts.memories, MAX_MEMORIES),
            (ComponentPart::Tables, self.counts.tables, MAX_TABLES),
        ];
        for (part, count, cap) in checks {
            if count > u64::from(cap) {
                return Err(InvalidModel::TooMany { part, count, cap });
            }
        }
        Ok(())
    }

    /// Refuses a component that imports an interface this host does not provide or does not
    /// export the `model` world's functions (names only; the linker checks the types once the
    /// component is compiled).
    pub(crate) fn check_world(&self) -> Result<(), InvalidModel> {
        self.check_imports()?;
        let missing: Vec<&str> = ["info", "infer"]
            .into_iter()
            .filter(|name| !self.exports_func(name))
            .collect();
        if !missing.is_empty() {
            return Err(InvalidModel::WrongWorld(format!(
                "no exported function {}",
                missing
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        Ok(())
    }
}

impl Inspection {
    /// Refuses a component that imports an interface this host does not provide.
    pub(crate) fn check_imports(&self) -> Result<(), InvalidModel> {
        match self.imports.iter().find(|name| !provided(name)) {
            Some(import) => Err(InvalidModel::UnsupportedImport(format!(
                "`{import}` (the host provides WASI 0.2 and wasm-infer:model 0.1)"
            ))),
            None => Ok(()),
        }
    }
}

/// The interfaces this host's linker defines: WASI 0.2 as `wasmtime-wasi` adds it (with every
/// capability denied at run time, see `wasi.rs`), and this package's own.
const PROVIDED: &[(&str, &str, &[&str])] = &[
    ("wasi:io", "0.2", &["error", "poll", "streams"]),
    (
        "wasi:cli",
        "0.2",
        &[
            "environment",
            "exit",
            "stdin",
            "stdout",
            "stderr",
            "terminal-input",
            "terminal-output",
            "terminal-stdin",
            "terminal-stdout",
            "terminal-stderr",
        ],
    ),
    ("wasi:clocks", "0.2", &["monotonic-clock", "wall-clock"]),
    ("wasi:filesystem", "0.2", &["types", "preopens"]),
    (
        "wasi:random",
        "0.2",
        &["random", "insecure", "insecure-seed"],
    ),
    (
        "wasi:sockets",
        "0.2",
        &[
            "network",
            "instance-network",
            "ip-name-lookup",
            "tcp",
            "tcp-create-socket",
            "udp",
            "udp-create-socket",
        ],
    ),
    (
        "wasm-infer:model",
        "0.1",
        &["types", "accel", "generation", "token-sink"],
    ),
];

/// Whether `name` (`wasi:io/poll@0.2.3`) is an interface in [`PROVIDED`], at a version the
/// linker's semver matching accepts (same major and minor for 0.x).
fn provided(name: &str) -> bool {
    let Some((path, version)) = name.split_once('@') else {
        return false;
    };
    let Some((package, interface)) = path.split_once('/') else {
        return false;
    };
    PROVIDED.iter().any(|(p, v, interfaces)| {
        *p == package
            && version
                .strip_prefix(v)
                .is_some_and(|rest| rest.starts_with('.'))
            && interfaces.contains(&interface)
    })
}

/// Proposals this host's engine leaves off (wasmtime is built without its `gc` and `threads`
/// features, and the component model's async additions are not enabled).
fn engine_lacks() -> WasmFeatures {
    WasmFeatures::THREADS
        | WasmFeatures::SHARED_EVERYTHING_THREADS
        | WasmFeatures::GC
        | WasmFeatures::EXCEPTIONS
        | WasmFeatures::LEGACY_EXCEPTIONS
        | WasmFeatures::STACK_SWITCHING
        | WasmFeatures::MEMORY_CONTROL
        | WasmFeatures::CUSTOM_PAGE_SIZES
        | WasmFeatures::WIDE_ARITHMETIC
        | WasmFeatures::CM_ASYNC
        | WasmFeatures::CM_ASYNC_STACKFUL
        | WasmFeatures::CM_MORE_ASYNC_BUILTINS
        | WasmFeatures::CM_THREADING
        | WasmFeatures::CM_ERROR_CONTEXT
        | WasmFeatures::CM_GC
}

/// Explains why the engine refused to compile `wasm`: if the component is valid with every
/// proposal on, and invalid without one this host leaves off, that proposal is named;
/// otherwise it is malformed, in the compiler's words.
pub(crate) fn diagnose(wasm: &[u8], compile_error: &wasmtime::Error) -> InvalidModel {
    let valid = |features: WasmFeatures| {
        Validator::new_with_features(features)
            .validate_all(wasm)
            .is_ok()
    };
    let all = WasmFeatures::all();
    if valid(all) {
        let used: Vec<String> = engine_lacks()
            .iter_names()
            .filter(|(_, flag)| !valid(all - *flag))
            .map(|(name, _)| name.to_ascii_lowercase().replace('_', "-"))
            .collect();
        if !used.is_empty() {
            return InvalidModel::UnsupportedProposal {
                proposal: used.join(", "),
            };
        }
    }
    InvalidModel::Malformed(format!("{compile_error:#}"))
}

/// Appends a custom section to a component (custom sections have id 0 in both encodings).
pub(crate) fn append_custom_section(wasm: &mut Vec<u8>, name: &str, payload: &[u8]) {
    use wasm_encoder::ComponentSection;
    wasm_encoder::CustomSection {
        name: name.into(),
        data: payload.into(),
    }
    .append_to_component(wasm);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(wat: &str) -> Counts {
        inspect(&wat::parse_str(wat).unwrap()).unwrap().counts
    }

    #[test]
    fn counts_follow_instantiations_not_definitions() {
        let module = r#"(core module $m (memory 1) (table 1 funcref) (table 1 funcref))"#;
        assert_eq!(
            counts(&format!("(component {module})")),
            Counts::default(),
            "a module that is never instantiated creates nothing"
        );
        assert_eq!(
            counts(&format!(
                "(component {module} (core instance (instantiate $m)) \
                 (core instance (instantiate $m)))"
            )),
            Counts {
                core_instances: 2,
                memories: 2,
                tables: 4
            }
        );
        let nested = format!(
            "(component (component $c {module} (core instance (instantiate $m))) \
             (instance (instantiate $c)) (instance (instantiate $c)) (instance (instantiate $c)))"
        );
        assert_eq!(
            counts(&nested),
            Counts {
                core_instances: 3,
                memories: 3,
                tables: 6
            }
        );
    }

    #[test]
    fn over_count_components_are_refused_with_the_figures() {
        let many = format!(
            "(component (core module $m (memory 1)) {})",
            "(core instance (instantiate $m))".repeat(5)
        );
        let inspection = inspect(&wat::parse_str(many).unwrap()).unwrap();
        assert_eq!(
            inspection.check_counts(),
            Err(InvalidModel::TooMany {
                part: ComponentPart::Memories,
                count: 5,
                cap: MAX_MEMORIES
            })
        );
    }

    #[test]
    fn provided_interfaces_match_by_name_and_compatible_version() {
        assert!(provided("wasi:io/poll@0.2.0"));
        assert!(provided("wasi:cli/terminal-stderr@0.2.12"));
        assert!(provided("wasm-infer:model/accel@0.1.0"));
        assert!(!provided("wasi:io/poll@0.3.0"));
        assert!(!provided("wasi:io/poll@0.20.0"));
        assert!(!provided("wasi:io/poll"));
        assert!(!provided("wasi:http/types@0.2.0"));
        assert!(!provided("evil:host/escape@1.0.0"));
    }

    #[test]
    fn a_custom_section_round_trips_and_nested_ones_are_not_the_components() {
        let mut wasm =
            wat::parse_str(r#"(component (core module $m (@custom "note" "inner")))"#).unwrap();
        assert_eq!(inspect(&wasm).unwrap().custom_section(&wasm, "note"), None);
        append_custom_section(&mut wasm, "note", b"outer");
        wasmparser::Validator::new().validate_all(&wasm).unwrap();
        assert_eq!(
            inspect(&wasm).unwrap().custom_section(&wasm, "note"),
            Some(&b"outer"[..])
        );
    }
}
