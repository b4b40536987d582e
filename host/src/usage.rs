//! What one run used, reported for every run (successful or not) so limits can be tuned.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{format_count, format_size};

/// Resources one run consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Fuel units consumed by the guest (instantiation included; a pre-initialised model's
    /// one-time initialisation is not, see [`LoadReport`](crate::LoadReport)). Deterministic.
    pub fuel_consumed: u64,
    /// Highest total linear memory of the guest, in bytes.
    pub peak_memory_bytes: u64,
    /// Total linear memory when the instance was created: its memory image (a snapshot's
    /// built model, or embedded weights). `peak - initial` is what the request itself grew.
    pub initial_memory_bytes: u64,
    /// Wall time from the start of the run to its end, instantiation included.
    #[serde(with = "crate::units::serde::micros", rename = "wall_time_us")]
    pub wall_time: Duration,
    /// Time spent waiting for a free pooled slot before the run started (not in `wall_time`;
    /// always zero without a pool, see [`RuntimeConfig::pool`](crate::RuntimeConfig::pool)).
    #[serde(with = "crate::units::serde::micros", rename = "queue_time_us")]
    pub queue_time: Duration,
    /// Time spent creating the fresh instance, within `wall_time`.
    #[serde(with = "crate::units::serde::micros", rename = "instantiate_time_us")]
    pub instantiate_time: Duration,
    /// Input payload size, in bytes.
    pub input_bytes: u64,
    /// Output payload size, in bytes (0 when the run failed).
    pub output_bytes: u64,
    /// Bytes the guest wrote to stdout (captured, not passed through).
    pub guest_stdout_bytes: u64,
    /// Bytes the guest wrote to stderr (captured, not passed through).
    pub guest_stderr_bytes: u64,
    /// Most device memory the run held at once on the accelerator path.
    pub device_peak_bytes: u64,
    /// Bytes copied from the sandbox to the device.
    pub device_uploaded_bytes: u64,
    /// Bytes copied from the device back into the sandbox.
    pub device_downloaded_bytes: u64,
    /// Accelerator calls made.
    pub accel_ops: u64,
    /// Device allocations refused for a budget (the guest may have fallen back).
    pub accel_refusals: u64,
    /// Accelerator calls stopped at the run's deadline before their work was done: between
    /// two of their slices, after their last one, or as they began (the run then ends with
    /// its wall-time error).
    #[serde(default)]
    pub accel_interrupted: u64,
    /// Fuel charged by WASI calls (their floors, random bytes, bytes moved on streams, the
    /// entries of polls), within `fuel_consumed`: the host's charge, apart from the guest's
    /// own instructions. Deterministic.
    #[serde(default)]
    pub wasi_fuel: u64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuel {} · peak memory {} (initial {}) · wall {:.1} ms (instantiate {:.2} ms) · \
             in {} · out {}",
            format_count(self.fuel_consumed),
            format_size(self.peak_memory_bytes),
            format_size(self.initial_memory_bytes),
            self.wall_time.as_secs_f64() * 1e3,
            self.instantiate_time.as_secs_f64() * 1e3,
            format_size(self.input_bytes),
            format_size(self.output_bytes),
        )?;
        if self.accel_ops > 0 {
            write!(
                f,
                " · accel {} ops, device peak {}, up {}, down {}, {} refused",
                self.accel_ops,
                format_size(self.device_peak_bytes),
                format_size(self.device_uploaded_bytes),
                format_size(self.device_downloaded_bytes),
                self.accel_refusals
            )?;
        }
        Ok(())
    }
}
