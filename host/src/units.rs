//! Sizes, fuel amounts and durations: the human syntax the CLI and config files take, the
//! formats reports print, and the serde adapters every report type shares.
//!
//! One syntax everywhere: a size is bytes or has a binary suffix (`2G` = 2 GiB), fuel is a
//! count with a decimal suffix (`10G` = 10^10), and a duration always carries its unit (`5s`,
//! `250ms`). A bare number is refused as a duration, on the command line and in JSON alike,
//! because "7" reads as seconds to one person and milliseconds to the next.

use std::time::Duration;

/// A value the human syntax does not accept.
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

/// Parses a plain count (`1024`, `1_000`).
pub fn parse_count(s: &str) -> Result<u64, ParseError> {
    let trimmed = s.trim();
    scaled("count", s, trimmed, 1).and_then(|n| {
        if trimmed.contains('.') {
            Err(parse_error("count", s, "expected a whole number"))
        } else {
            Ok(n)
        }
    })
}

/// Parses a duration as humantime does (`5s`, `250ms`, `1m 30s`). A bare number is refused:
/// it must say its unit.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    const WHAT: &str = "duration";
    let trimmed = s.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(parse_error(
            WHAT,
            s,
            "a duration needs a unit: write `5s` or `250ms`",
        ));
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

/// Formats a duration for people, to the millisecond: `1s 250ms`, `0s` below a millisecond.
pub fn format_duration(d: Duration) -> String {
    let ms = Duration::from_millis(d.as_millis() as u64);
    humantime::format_duration(ms).to_string()
}

/// Serde adapters. Reports write plain numbers in the unit their key names (`wall_time_us`),
/// limits write and read the human syntax above (numbers are accepted for sizes and fuel).
pub mod serde {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Either a number or a human string.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }

    /// A byte size: written as a number, read from a number or `"2GiB"`.
    pub mod size {
        use super::*;
        pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(*bytes)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            match NumberOrText::deserialize(d)? {
                NumberOrText::Number(n) => Ok(n),
                NumberOrText::Text(t) => {
                    crate::units::parse_size(&t).map_err(serde::de::Error::custom)
                }
            }
        }
    }

    /// A count: written as a number, read from a number or `"1_000"`.
    pub mod count {
        use super::*;
        pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(*n)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            match NumberOrText::deserialize(d)? {
                NumberOrText::Number(n) => Ok(n),
                NumberOrText::Text(t) => {
                    crate::units::parse_count(&t).map_err(serde::de::Error::custom)
                }
            }
        }
    }

    /// An optional fuel cap: `null` (none), a number, or `"10G"`.
    pub mod fuel {
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
                Some(NumberOrText::Text(t)) => crate::units::parse_fuel(&t)
                    .map(Some)
                    .map_err(serde::de::Error::custom),
            }
        }
    }

    /// A duration as a human string with its unit (`"5s"`), both ways; a bare number is
    /// refused (see the module docs).
    pub mod duration {
        use super::*;
        use std::time::Duration;
        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(&humantime::format_duration(*d))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            match NumberOrText::deserialize(d)? {
                NumberOrText::Number(n) => Err(serde::de::Error::custom(format!(
                    "a duration needs a unit: write \"{n}ms\" or \"{n}s\""
                ))),
                NumberOrText::Text(t) => {
                    crate::units::parse_duration(&t).map_err(serde::de::Error::custom)
                }
            }
        }
    }

    /// A duration as whole microseconds (the report keys say `_us`), both ways.
    pub mod micros {
        use super::*;
        use std::time::Duration;
        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(d.as_micros() as u64)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            Ok(Duration::from_micros(u64::deserialize(d)?))
        }
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
    fn counts_are_whole_numbers() {
        assert_eq!(parse_count("1024"), Ok(1024));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert!(parse_count("1.5").is_err());
        assert!(parse_count("1K").is_err());
    }

    #[test]
    fn durations_need_their_unit() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        let bare = parse_duration("7").unwrap_err().to_string();
        assert!(bare.contains("needs a unit"), "{bare}");
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn counts_and_sizes_format_for_people() {
        assert_eq!(format_count(402116557), "402,116,557");
        assert_eq!(format_count(12), "12");
        assert_eq!(format_size(384), "384 B");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(
            format_duration(Duration::from_micros(1_250_900)),
            "1s 250ms"
        );
    }
}
