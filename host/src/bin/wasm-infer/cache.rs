//! `wasm-infer cache list|clear`: what the compiled-model cache holds, and emptying it.

use clap::Subcommand;
use wasm_infer::units::format_size;

use crate::args::RuntimeArgs;
use crate::exit;

#[derive(Subcommand)]
pub enum Command {
    /// List the entries, most recently used first: size, last use, whether a snapshot.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Remove every entry.
    Clear {
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

pub fn run(command: &Command) -> u8 {
    let runtime = match command {
        Command::List { runtime, .. } | Command::Clear { runtime } => runtime,
    };
    let config = runtime.config();
    let Some(dir) = config.cache_dir.clone() else {
        eprintln!("error: no cache directory (--no-cache, or no HOME)");
        return exit::USAGE;
    };
    let cache = wasm_infer::cache::Cache::new(dir, config.cache_max_bytes);
    let result = match command {
        Command::List { json, .. } => cache.list().map(|entries| {
            if *json {
                println!("{}", serde_json::json!(entries));
            } else {
                let total: u64 = entries.iter().map(|e| e.bytes).sum();
                for entry in &entries {
                    let age = entry.last_used.elapsed().unwrap_or_default();
                    println!(
                        "{:>10}  {:>8} ago  {}  {}",
                        format_size(entry.bytes),
                        humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
                        if entry.snapshot {
                            "snapshot"
                        } else {
                            "compiled"
                        },
                        entry.path.display()
                    );
                }
                println!(
                    "{} entries, {} in {}",
                    entries.len(),
                    format_size(total),
                    cache.dir().display()
                );
            }
        }),
        Command::Clear { .. } => cache.clear().map(|(count, bytes)| {
            println!(
                "removed {count} entries ({}) from {}",
                format_size(bytes),
                cache.dir().display()
            )
        }),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {}: {e}", cache.dir().display());
            exit::INTERNAL
        }
    }
}
