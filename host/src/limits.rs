//! The limits one run is boxed in by, their defaults, and the human syntax for them.
//!
//! Every field is a ceiling on one resource of one run. A run that reaches any of them ends with
//! [`crate::LimitExceeded`] naming the limit and the figures; the host and other runs are
//! unaffected. `Limits` (de)serialises with serde in the same human syntax the CLI takes
//! (`"2GiB"`, `"5s"`, `"10G"` fuel), or in plain numbers (bytes, fuel units, milliseconds).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default fuel ceiling: none. Fuel is always *metered* (the usage report gives the exact figure),
/// but only capped when asked; the wall-time default still bounds a runaway guest.
pub const DEFAULT_FUEL: Option<u64> = None;
/// Default linear-memory ceiling: 1 GiB. all-MiniLM-L6-v2 needs about 200 MiB (embedded
/// weights plus their tensor copy plus activations); 1 GiB leaves room for long batches while
/// keeping a handful of concurrent runs within a small server's RAM.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Default wall-time ceiling: 30 s. A fresh MiniLM run takes well under a second here; a guest
/// that runs this long is looping.
pub const DEFAULT_WALL_TIME: Duration = Duration::from_secs(30);
/// Default input ceiling: 1 MiB of input payload, far above any sensible embedding batch.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 1 << 20;
/// Default output ceiling: 16 MiB of output payload (about 10,000 384-dimension embeddings).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// Default device-memory (VRAM) budget of one run on the accelerator path: 512 MiB.
pub const DEFAULT_DEVICE_MEMORY_BYTES: u64 = 512 << 20;
/// How much of what the guest writes to its stdout and stderr the host keeps, each: 64 KiB.
/// Guest output is captured for diagnostics, never passed through; bytes beyond this are
/// counted (in the usage report) and discarded, and the guest's writes still succeed.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 10;
/// Table elements a guest may have in total: 100,000 (each costs the host a pointer). Real
/// components use a few hundred.
pub const MAX_TABLE_ELEMENTS: u64 = 100_000;
/// Core instances, memories and tables a component may create: components built by
/// `wasm-component-ld` use fewer than ten of each.
pub const MAX_INSTANCES: usize = 100;
/// See [`MAX_INSTANCES`].
pub const MAX_MEMORIES: usize = 20;
/// See [`MAX_INSTANCES`].
pub const MAX_TABLES: usize = 100;

/// The ceilings for one run. `Limits::default()` is safe for untrusted models and inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Compute cap in fuel units (about one per wasm instruction). `None`: unlimited, still
    /// metered. Deterministic: the same model and input consume the same fuel on every run and
    /// machine, so a cap that passes in CI passes in production. Exceeded:
    /// [`LimitExceeded::Fuel`](crate::LimitExceeded::Fuel). Default: [`DEFAULT_FUEL`].
    #[serde(with = "fuel_serde")]
    pub fuel: Option<u64>,
    /// Total linear memory of all the guest's memories, in bytes (the weights it embeds count).
    /// A growth past it is refused; the run then fails with
    /// [`LimitExceeded::Memory`](crate::LimitExceeded::Memory) even if the guest's allocator turns
    /// the refusal into a trap. Default: [`DEFAULT_MEMORY_BYTES`].
    #[serde(with = "size_serde")]
    pub memory: u64,
    /// Wall-clock time for the whole run, instantiation included. Enforced by epoch
    /// interruption, so a run ends within one ticker interval after it; not deterministic
    /// (use fuel for that). Exceeded: [`LimitExceeded::WallTime`](crate::LimitExceeded::WallTime).
    /// Default: [`DEFAULT_WALL_TIME`].
    #[serde(with = "duration_serde")]
    pub wall_time: Duration,
    /// Input payload in bytes (the UTF-8 bytes of all texts), checked before any guest work.
    /// Exceeded: [`LimitExceeded::Input`](crate::LimitExceeded::Input). Default:
    /// [`DEFAULT_MAX_INPUT_BYTES`].
    #[serde(with = "size_serde")]
    pub max_input: u64,
    /// Output payload in bytes (4 per embedding value), checked before anything is returned.
    /// Exceeded: [`LimitExceeded::Output`](crate::LimitExceeded::Output). Default:
    /// [`DEFAULT_MAX_OUTPUT_BYTES`].
    #[serde(with = "size_serde")]
    pub max_output: u64,
    /// Device memory (VRAM, or host RAM on the CPU backend) the run may hold on the
    /// accelerator path at once, in bytes; also bounded by the runtime's host-wide budget. An
    /// allocation past either is refused with `budget-exceeded` before anything is allocated;
    /// a run that then fails reports
    /// [`LimitExceeded::DeviceMemory`](crate::LimitExceeded::DeviceMemory). Default:
    /// [`DEFAULT_DEVICE_MEMORY_BYTES`].
    #[serde(with = "size_serde")]
    pub device_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: DEFAULT_FUEL,
            memory: DEFAULT_MEMORY_BYTES,
            wall_time: DEFAULT_WALL_TIME,
            max_input: DEFAULT_MAX_INPUT_BYTES,
            max_output: DEFAULT_MAX_OUTPUT_BYTES,
            device_memory: DEFAULT_DEVICE_MEMORY_BYTES,
        }
    }
}

impl Limits {
    /// Sets the fuel cap.
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.fuel = Some(fuel);
        self
    }
    /// Sets the linear-memory ceiling in bytes.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// Sets the wall-time ceiling.
    pub fn wall_time(mut self, wall_time: Duration) -> Self {
        self.wall_time = wall_time;
        self
    }
    /// Sets the input ceiling in bytes.
    pub fn max_input(mut self, bytes: u64) -> Self {
        self.max_input = bytes;
        self
    }
    /// Sets the output ceiling in bytes.
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output = bytes;
        self
    }
    /// Sets the device-memory budget in bytes.
    pub fn device_memory(mut self, bytes: u64) -> Self {
        self.device_memory = bytes;
        self
    }
}

/// A value the human limit syntax does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {reason}")]
pub struct ParseError {
    what: &'static str,
    value: String,
    reason: &'static str,
}

fn parse_error(what: &'static str, value: &str, reason: &'static str) -> ParseError {
    ParseError {
        what,
        value: value.to_string(),
        reason,
    }
}

/// Splits `"2.5GiB"` into `("2.5", "GiB")`.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn scaled(what: &'static str, input: &str, number: &str, scale: u64) -> Result<u64, ParseError> {
    let number = number.replace('_', "");
    if number.is_empty() {
        return Err(parse_error(what, input, "expected a number"));
    }
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(scale)
            .ok_or_else(|| parse_error(what, input, "too large"));
    }
    let n: f64 = number
        .parse()
        .map_err(|_| parse_error(what, input, "expected a number"))?;
    let value = n * scale as f64;
    if !value.is_finite() || value >= u64::MAX as f64 {
        return Err(parse_error(what, input, "too large"));
    }
    Ok(value.round() as u64)
}

/// Parses a byte size: a plain number of bytes, or a number with a binary suffix, as wasmtime
/// users write them: `K`/`KB`/`KiB` = 2^10, `M`/`MB`/`MiB` = 2^20, `G`/`GB`/`GiB` = 2^30,
/// `T`/`TB`/`TiB` = 2^40 (case-insensitive; `2G` is 2 GiB). Fractions are allowed (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    const WHAT: &str = "size";
    let (number, suffix) = split_number(s.trim());
    let scale: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(parse_error(
                WHAT,
                s,
                "expected bytes or a K/M/G/T (KiB/MiB/GiB/TiB) suffix",
            ))
        }
    };
    scaled(WHAT, s, number, scale)
}

/// Parses a fuel amount: a plain number, or with a decimal suffix `K` = 10^3, `M` = 10^6,
/// `G` = 10^9, `T` = 10^12 (case-insensitive).
pub fn parse_fuel(s: &str) -> Result<u64, ParseError> {
    const WHAT: &str = "fuel";
    let (number, suffix) = split_number(s.trim());
    let scale: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        _ => {
            return Err(parse_error(
                WHAT,
                s,
                "expected a number with an optional K/M/G/T suffix",
            ))
        }
    };
    scaled(WHAT, s, number, scale)
}

/// Parses a duration as humantime does (`5s`, `250ms`, `1m 30s`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    const WHAT: &str = "duration";
    let trimmed = s.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        let secs = trimmed
            .parse::<u64>()
            .map_err(|_| parse_error(WHAT, s, "too large"))?;
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(trimmed)
        .map_err(|_| parse_error(WHAT, s, "expected a duration such as `5s`, `250ms` or `1m`"))
}

/// Formats bytes for people: `1.50 GiB`, `384 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Formats a count with thousands separators: `402,116,557`.
pub fn format_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Either a number or a human string, for the serde adapters below.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

mod size_serde {
    use super::*;
    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*bytes)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => Ok(n),
            NumberOrText::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
        }
    }
}

mod fuel_serde {
    use super::*;
    pub fn serialize<S: Serializer>(fuel: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match fuel {
            Some(n) => s.serialize_some(n),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<NumberOrText>::deserialize(d)? {
            None => Ok(None),
            Some(NumberOrText::Number(n)) => Ok(Some(n)),
            Some(NumberOrText::Text(t)) => {
                parse_fuel(&t).map(Some).map_err(serde::de::Error::custom)
            }
        }
    }
}

mod duration_serde {
    use super::*;
    /// Serialised as a human string (`"5s"`), deserialised from that or from milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(ms) => Ok(Duration::from_millis(ms)),
            NumberOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fuel = self
            .fuel
            .map_or_else(|| "unlimited".to_string(), format_count);
        write!(
            f,
            "fuel {fuel}, memory {}, wall time {}, input {}, output {}",
            format_size(self.memory),
            humantime::format_duration(self.wall_time),
            format_size(self.max_input),
            format_size(self.max_output)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn fuel_suffixes_are_decimal() {
        assert_eq!(parse_fuel("10G"), Ok(10_000_000_000));
        assert_eq!(parse_fuel("1.5M"), Ok(1_500_000));
        assert_eq!(parse_fuel("402_116_557"), Ok(402_116_557));
        assert!(parse_fuel("-1").is_err());
        assert!(parse_fuel("lots").is_err());
    }

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn limits_deserialise_from_human_strings_and_numbers() {
        let limits: Limits =
            serde_json::from_str(r#"{"fuel":"2G","memory":"512MiB","wall_time":"2s"}"#).unwrap();
        assert_eq!(limits.fuel, Some(2_000_000_000));
        assert_eq!(limits.memory, 512 << 20);
        assert_eq!(limits.wall_time, Duration::from_secs(2));
        assert_eq!(limits.max_input, DEFAULT_MAX_INPUT_BYTES);
        let limits: Limits =
            serde_json::from_str(r#"{"fuel":1000,"memory":65536,"wall_time":1500}"#).unwrap();
        assert_eq!(
            limits,
            Limits::default()
                .fuel(1000)
                .memory(65536)
                .wall_time(Duration::from_millis(1500))
        );
        let round_trip: Limits =
            serde_json::from_str(&serde_json::to_string(&limits).unwrap()).unwrap();
        assert_eq!(round_trip, limits);
        assert!(serde_json::from_str::<Limits>(r#"{"memry":"1G"}"#).is_err());
    }

    #[test]
    fn counts_and_sizes_format_for_people() {
        assert_eq!(format_count(402116557), "402,116,557");
        assert_eq!(format_count(12), "12");
        assert_eq!(format_size(384), "384 B");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
