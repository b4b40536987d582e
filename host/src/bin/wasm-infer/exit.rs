//! Exit statuses: one per kind of failure, from one table (the `--help` text is made from it
//! too), so a CI script can tell which limit tripped.

use wasm_infer::{Error, ErrorKind};

/// Success.
pub const OK: u8 = 0;
/// A flag's value the library never sees was wrong (clap exits 2 for the rest).
pub const USAGE: u8 = 2;
/// Writing the result failed.
pub const INTERNAL: u8 = 1;
/// `wasm-infer check`: a figure moved, or the cases file was blessed on another build.
pub const CHECK_FAILED: u8 = 20;

/// Every kind's status and what it means, in the order `--help` lists them.
const TABLE: [(ErrorKind, u8, &str); 16] = [
    (ErrorKind::Internal, 1, "internal error (a bug, or the OS refused a resource)"),
    (ErrorKind::Usage, 2, "usage error (bad flag or value, or a setting this build lacks)"),
    (ErrorKind::InvalidModel, 3, "invalid model: missing, unreadable, not wasm, not a component, wrong world, too many parts"),
    (ErrorKind::Trap, 4, "guest trapped (panic, unreachable, stack overflow, ...)"),
    (ErrorKind::Model, 5, "the model refused the input (model error)"),
    (ErrorKind::InputRead, 6, "the input could not be read or is not UTF-8"),
    (ErrorKind::Fuel, 10, "fuel limit exceeded (--fuel)"),
    (ErrorKind::Memory, 11, "memory limit exceeded (--mem)"),
    (ErrorKind::Table, 11, "the fixed table-size limit exceeded"),
    (ErrorKind::Handles, 11, "the fixed live-handle limit exceeded"),
    (ErrorKind::WallTime, 12, "wall-time limit exceeded (--timeout)"),
    (ErrorKind::Input, 13, "input larger than --max-input, or more items than --max-batch"),
    (ErrorKind::Output, 14, "output larger than --max-output"),
    (ErrorKind::DeviceMemory, 15, "device-memory budget exceeded (--vram) and the model did not fall back"),
    (ErrorKind::Overloaded, 16, "the host is under memory pressure and admitted no run: retry later"),
    (ErrorKind::WorkerLost, 17, "the worker process running the request died: retry"),
];

/// The exit status for a failure of `kind`.
pub fn status(kind: ErrorKind) -> u8 {
    TABLE
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map_or(INTERNAL, |(_, status, _)| *status)
}

/// Prints `error` (with `context`, e.g. the model's path) and returns its status.
pub fn report(context: Option<&std::path::Path>, error: &Error) -> u8 {
    match context {
        Some(path) => eprintln!("error: {}: {error}", path.display()),
        None => eprintln!("error: {error}"),
    }
    status(error.kind())
}

/// The `--help` epilogue: the statuses and examples.
pub fn after_help() -> String {
    let mut text = String::from("Exit status:\n  0   success\n");
    for (_, status, meaning) in TABLE {
        text.push_str(&format!("  {status:<3} {meaning}\n"));
    }
    text.push_str(&format!(
        "  {CHECK_FAILED:<3} check: a figure moved, or the cases file was blessed on another build\n"
    ));
    text.push_str(
        "A refusal predicted by --profile exits as the limit it predicts (10 fuel, 11 memory).\n\
         On any failure nothing is written to stdout.\n\n\
         Examples:\n  \
         wasm-infer --fuel 2G --mem 512M minilm.wasm \"a sentence to embed\"\n  \
         wasm-infer minilm.wasm @sentences.txt --report json\n  \
         cat sentences.txt | wasm-infer --timeout 5s minilm.wasm -\n  \
         wasm-infer inspect minilm.wasm\n  \
         wasm-infer snapshot minilm.wasm -o minilm.snap.wasm\n  \
         wasm-infer calibrate minilm.wasm @inputs.txt --out minilm.profile.json\n  \
         wasm-infer --fuel 2G --profile minilm.profile.json minilm.wasm \"a sentence\"\n  \
         wasm-infer check minilm.wasm usage.json [--bless]\n  \
         wasm-infer cache list",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_status() {
        for kind in ErrorKind::ALL {
            assert_eq!(
                TABLE.iter().filter(|(k, _, _)| *k == kind).count(),
                1,
                "{kind}"
            );
        }
    }
}
