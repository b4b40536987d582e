//! Host bindings generated from `wit/`, the single definition of the host/guest ABI.

wasmtime::component::bindgen!({
    world: "model",
    path: "../wit",
    exports: { default: async },
    // The accel imports are linked by hand (`accel::add_to_linker`), which can charge fuel
    // through the store; bindgen supplies their types.
    with: { "wasm-infer:model/accel.tensor": crate::accel::DeviceTensor },
    additional_derives: [PartialEq],
});
