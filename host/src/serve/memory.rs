//! What the server's allocator hands back to the system.
//!
//! Memory a request used and freed must not stay resident: a burst of large bodies or of
//! connections would otherwise leave the server holding what no request is charged for.
//! glibc's malloc keeps freed memory in two ways that matter here:
//! - its mmap threshold rises to the size of the largest mmapped block freed (a 4 MiB body
//!   buffer raises it to 4 MiB and the trim threshold to 8 MiB), after which large buffers come
//!   from the heaps of its arenas, one per thread that allocated (up to 8 per core), and up to
//!   the trim threshold of each arena's free top stays resident;
//! - freed small chunks wait in bins and are consolidated and returned only by `malloc_trim`.
//!
//! So the server fixes both thresholds at start (which also stops them moving), and calls
//! `malloc_trim` on a blocking thread at most every [`TRIM_EVERY`], when connections have
//! closed since the last call: at rest that is never, under steady keep-alive traffic rarely.

use std::time::Duration;

/// Blocks at least this large are mmapped, and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 256 << 10;
/// The most free memory at the top of an arena's heap that is kept.
pub const TRIM_THRESHOLD: usize = 1 << 20;
/// How often, at most, freed memory is returned.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Fixes the allocator's thresholds and starts the task that returns freed memory. Without
/// glibc it does nothing.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; it is safe at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        }
        tokio::spawn(async {
            let mut every = tokio::time::interval(TRIM_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = super::connections::closed_total();
            loop {
                every.tick().await;
                let closed = super::connections::closed_total();
                if closed == seen {
                    continue;
                }
                seen = closed;
                // SAFETY: malloc_trim only returns free memory to the system.
                let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
            }
        });
    }
}
