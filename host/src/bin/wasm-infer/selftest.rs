//! `__lockdown-selftest` (internal): the worker lock-down's self-test.

use crate::exit;

/// Locks down, then tries `call`: the filter should kill the process before this returns.
pub fn run(call: &str) -> u8 {
    use wasm_infer::worker::lockdown;
    if let Err(e) = lockdown::lock_down() {
        eprintln!("error: {e}");
        return exit::INTERNAL;
    }
    match lockdown::forbidden(call) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            exit::INTERNAL
        }
    }
}
