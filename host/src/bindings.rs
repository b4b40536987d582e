//! Host bindings generated from `wit/`, the single definition of the host/guest ABI, and the
//! host's representation of the one resource the WIT defines (a device tensor).

wasmtime::component::bindgen!({
    world: "model",
    path: "../wit",
    exports: { default: async },
    // The accel imports are linked by hand (`accel::add_to_linker`), which can charge fuel
    // through the store; bindgen supplies their types.
    with: { "wasm-infer:model/accel.tensor": DeviceTensor },
    additional_derives: [PartialEq],
});

/// The `generator` world (text generation): the `model` world's types and accel interface are
/// the ones above; `token-sink` is linked by hand (`generate::add_to_linker`), which charges
/// fuel and the output limit before it copies.
pub(crate) mod generator {
    wasmtime::component::bindgen!({
        world: "generator",
        path: "../wit",
        exports: { default: async },
        with: {
            "wasm-infer:model/types": crate::bindings::wasm_infer::model::types,
            "wasm-infer:model/accel": crate::bindings::wasm_infer::model::accel,
        },
    });
}

/// A guest's tensor on the device: the tensor and the bytes charged for it to the run, and, for
/// a resident weight, the shared weight it reads (read-only; the handle keeps it, and its
/// host-wide accounting, alive). The weight is typed `Any` so that the bindings do not depend on
/// the accelerator module, which depends on them.
pub struct DeviceTensor {
    pub(crate) tensor: candle_core::Tensor,
    pub(crate) bytes: u64,
    pub(crate) resident: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}
