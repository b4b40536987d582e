//! Host bindings generated from `wit/`, the single definition of the host/guest ABI.

wasmtime::component::bindgen!({
    world: "model",
    path: "../wit",
    exports: { default: async },
});
