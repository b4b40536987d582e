//! `wasm-infer serve`: the HTTP service. It only translates: every decision about a run is the
//! library's (`Error::kind()` maps to a status).

pub mod ratelimit;
