//! Calibration profiles: a model's fuel and peak memory fitted against the size of its input,
//! so that a request whose predicted cost is over its limits is refused before any guest work.
//!
//! **What is fitted.** The only figure known about a request before it runs is its size in
//! bytes ([`Input::payload_bytes`]); tokens are counted inside the guest and known only after a
//! run (a generation reports them, `infer` does not), so bytes are the predictor.
//! Each resource gets a [`Bound`]: `ceil(a + b·x + c·x²)` with `x` the input's bytes, fitted
//! by least squares (the quadratic term because attention is quadratic in the sequence), with
//! `b` and `c` forced non-negative (terms are dropped and the fit redone until they are) so
//! that the bound never falls as inputs grow, then **shifted up** by the largest
//! under-prediction on the calibration set, so that it covers every calibration point.
//!
//! Why a shifted least-squares curve rather than the upper convex hull of the points: the hull
//! covers the set exactly but is defined only between its smallest and largest input and
//! follows every outlier, while the shifted curve is smooth, monotone, extrapolates with the
//! trend, and costs one figure of slack (the shift) that the calibration report prints. A
//! bound fitted on a set can still under-predict an input outside it: the real caps stay on
//! for every admitted run (a mispredicted input is stopped exactly as without a profile).
//!
//! **Batches.** Calibration runs single texts. A batch is predicted as the sum of its texts'
//! fuel and the memory of its largest text, which holds for a model that runs a batch one
//! text at a time (as MiniLM does); calibrate a model that pads a batch with batches.
//!
//! **Generators.** For a model that exports `generate`, calibration generates for each input
//! (greedy, a fixed `max_tokens`) and the profile also holds a [`TokenProfile`]: the fuel to the
//! first token (the prompt's processing and one decoding step) as a [`Bound`] of the prompt's
//! bytes, and the most fuel per token after it, read off the run's [`crate::TokenFuel`]. A
//! generation of `n` tokens is then planned at the first token's bound plus `n - 1` times the
//! per-token figure. A token costs a little more the longer the context it attends to, so a
//! generation much longer than the calibration's can cost more per token than the profile says;
//! the real cap still stops it.
//!
//! **Identity.** A profile records the component's SHA-256 and the engine fingerprint
//! ([`EngineFingerprint`], what snapshots record: the settings that decide what fuel counts).
//! It is refused for another component or engine, naming what differs. Compiled-code details
//! (CPU features, Cranelift's code generation) are not part of it: fuel counts wasm
//! instructions, not native ones.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Input;
use crate::error::{LimitExceeded, PredictedLimit};
use crate::limits::Limits;
use crate::runtime::EngineFingerprint;
use crate::units::{format_count, format_size};

/// The profile format this build reads and writes.
pub const PROFILE_SCHEMA_VERSION: u32 = 1;

/// Default margin of the suggested limits over the bound at the largest calibrated input:
/// 10%, room for inputs a little past the calibration set without refitting.
pub const DEFAULT_MARGIN_PERCENT: u32 = 10;

/// A wasm page (64 KiB): linear memory grows in whole pages, so a memory limit is rounded up
/// to one.
const WASM_PAGE_BYTES: u64 = 64 << 10;

/// An upper bound of one resource against input bytes: `ceil(intercept + per_byte·x +
/// per_byte_squared·x²)`, the least-squares fit shifted up by `shift` (already in
/// `intercept`) to cover every calibration point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    /// The constant term (the shift included).
    pub intercept: f64,
    /// The linear term, per input byte (never negative).
    pub per_byte: f64,
    /// The quadratic term, per input byte squared (never negative).
    pub per_byte_squared: f64,
    /// How far the least-squares fit was raised to cover the calibration set.
    pub shift: f64,
}

impl Bound {
    /// The predicted figure for an input of `bytes`.
    pub fn predict(&self, bytes: u64) -> u64 {
        let x = bytes as f64;
        let y = self.intercept + self.per_byte * x + self.per_byte_squared * x * x;
        if y <= 0.0 {
            0
        } else {
            y.ceil().min(u64::MAX as f64) as u64
        }
    }

    /// Fits the bound to `(bytes, figure)` points (see the module docs). At least one point.
    pub fn fit(points: &[(u64, u64)]) -> Bound {
        assert!(!points.is_empty(), "a bound needs at least one point");
        // Terms tried from the richest down until every slope is non-negative.
        let mut fitted = [0.0; 3];
        for terms in [3usize, 2, 1] {
            match least_squares(points, terms) {
                Some(coefficients) if coefficients[1..].iter().all(|c| *c >= 0.0) => {
                    fitted = coefficients;
                    break;
                }
                _ => {}
            }
        }
        let mut bound = Bound {
            intercept: fitted[0],
            per_byte: fitted[1],
            per_byte_squared: fitted[2],
            shift: 0.0,
        };
        let worst = points
            .iter()
            .map(|&(x, y)| y as f64 - bound.raw(x))
            .fold(f64::NEG_INFINITY, f64::max);
        bound.shift = worst.max(0.0);
        bound.intercept += bound.shift;
        bound
    }

    fn raw(&self, bytes: u64) -> f64 {
        let x = bytes as f64;
        self.intercept + self.per_byte * x + self.per_byte_squared * x * x
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} + {:.1}·bytes + {:.4}·bytes² (least squares raised by {:.0})",
            self.intercept, self.per_byte, self.per_byte_squared, self.shift
        )
    }
}

/// Least squares of `y` on `1, x, x²` (the first `terms` of them), with `x` scaled to [0, 1]
/// so that the normal equations stay well conditioned; the coefficients come back unscaled,
/// zero past `terms`. `None` when the points cannot determine them (fewer distinct sizes than
/// terms).
fn least_squares(points: &[(u64, u64)], terms: usize) -> Option<[f64; 3]> {
    let scale = points.iter().map(|p| p.0).max().unwrap_or(0).max(1) as f64;
    let mut a = [[0.0f64; 4]; 3];
    for &(x, y) in points {
        let x = x as f64 / scale;
        let basis = [1.0, x, x * x];
        for (row, bi) in a.iter_mut().zip(basis).take(terms) {
            for (cell, bj) in row.iter_mut().zip(basis).take(terms) {
                *cell += bi * bj;
            }
            row[3] += bi * y as f64;
        }
    }
    let solution = solve(&mut a, terms)?;
    Some([
        solution[0],
        solution[1] / scale,
        solution[2] / (scale * scale),
    ])
}

/// Gaussian elimination with partial pivoting on the augmented `n`×`n` system.
fn solve(a: &mut [[f64; 4]; 3], n: usize) -> Option<[f64; 3]> {
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col];
        for (row, cells) in a.iter_mut().enumerate().take(n) {
            if row != col {
                let factor = cells[col] / pivot_row[col];
                // Columns past `n` are zero in every row but the right-hand side (column 3).
                for (cell, p) in cells.iter_mut().zip(pivot_row).skip(col) {
                    *cell -= factor * p;
                }
            }
        }
    }
    let mut x = [0.0; 3];
    for (i, (xi, row)) in x.iter_mut().zip(a.iter()).enumerate().take(n) {
        *xi = row[3] / row[i];
    }
    Some(x)
}

/// One calibration input's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The input's size, in bytes.
    pub input_bytes: u64,
    /// Fuel the run consumed.
    pub fuel: u64,
    /// The run's peak linear memory, in bytes.
    pub peak_memory_bytes: u64,
}

/// Limits suggested from a calibration: the bound at the largest calibrated input plus the
/// margin, memory rounded up to a wasm page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suggested {
    /// The margin over the bound, in percent.
    pub margin_percent: u32,
    /// A fuel cap.
    pub fuel: u64,
    /// A memory ceiling, in bytes.
    pub memory: u64,
}

/// A model's calibration profile (see the module docs), as `wasm-infer calibrate --out`
/// writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// [`PROFILE_SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// SHA-256 of the component the profile was measured on (as given, before any snapshot).
    pub component_sha256: String,
    /// The engine settings the figures were measured under.
    pub engine: EngineFingerprint,
    /// The model's name, from its info (for people; not checked).
    pub model: String,
    /// Inputs the fit was made on.
    pub inputs: u64,
    /// The largest calibrated input, in bytes: a prediction past it is an extrapolation.
    pub max_input_bytes: u64,
    /// Fuel against input bytes.
    pub fuel: Bound,
    /// Peak linear memory (bytes) against input bytes.
    pub peak_memory: Bound,
    /// Suggested limits.
    pub suggested: Suggested,
    /// For a generator: fuel to the first token and per token after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenProfile>,
}

/// One calibration generation's token figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSample {
    /// The prompt's bytes (what the request's size says before the guest tokenizes it).
    pub prompt_bytes: u64,
    /// The prompt's tokens, as the guest counted them (chat template included).
    pub prompt_tokens: u32,
    /// Fuel when the first token was handed over ([`crate::TokenFuel::to_first_token`]).
    pub to_first_token: u64,
    /// Mean fuel per token after the first ([`crate::TokenFuel::per_token`]).
    pub per_token: Option<u64>,
}

/// A generator's fuel per token, fitted by `calibrate` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenProfile {
    /// Tokens each calibration generation asked for (greedy).
    pub max_tokens: u32,
    /// Fuel to the first token against the prompt's bytes.
    pub to_first_token: Bound,
    /// The most fuel per token after the first over the calibration set.
    pub per_token: u64,
}

impl TokenProfile {
    /// Fits the token figures of a calibration set (at least one sample).
    pub fn fit(max_tokens: u32, samples: &[TokenSample]) -> TokenProfile {
        TokenProfile {
            max_tokens,
            to_first_token: Bound::fit(
                &samples
                    .iter()
                    .map(|s| (s.prompt_bytes, s.to_first_token))
                    .collect::<Vec<_>>(),
            ),
            per_token: samples
                .iter()
                .filter_map(|s| s.per_token)
                .max()
                .unwrap_or(0),
        }
    }

    /// Fuel planned for `max_tokens` tokens after a prompt of `prompt_bytes`: the first
    /// token's bound plus the per-token figure for each token after it.
    pub fn predict(&self, prompt_bytes: u64, max_tokens: u32) -> u64 {
        let after_first = u64::from(max_tokens.saturating_sub(1));
        self.to_first_token
            .predict(prompt_bytes)
            .saturating_add(after_first.saturating_mul(self.per_token))
    }
}

/// Why a profile or cases file cannot be used; displays as `path: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

impl FileError {
    pub(crate) fn new(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// What differs between the identity a file records and the model's, one line each (empty:
/// the same). Used by profiles and cases files alike.
pub(crate) fn identity_differences(
    recorded_sha256: &str,
    recorded_engine: &EngineFingerprint,
    component_sha256: &str,
    engine: &EngineFingerprint,
) -> Vec<String> {
    let mut out = Vec::new();
    if recorded_sha256 != component_sha256 {
        out.push(format!(
            "component sha256 {recorded_sha256} (this model: {component_sha256})"
        ));
    }
    out.extend(
        recorded_engine
            .differences(engine)
            .into_iter()
            .map(|d| format!("engine {d}")),
    );
    out
}

/// Reads a JSON file with a `schema_version` of [`PROFILE_SCHEMA_VERSION`] as `T`: the
/// version is checked before the rest, so that a file of another version is named as such.
/// With `optional`, a file without a `schema_version` (one a person has just written) is read
/// as the current version.
pub(crate) fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    optional: bool,
) -> Result<T, FileError> {
    let bytes =
        std::fs::read(path).map_err(|e| FileError::new(path, format!("cannot read: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| FileError::new(path, format!("not a {what} (malformed JSON: {e})")))?;
    match value.get("schema_version").map(serde_json::Value::as_u64) {
        None if optional && value.is_object() => {}
        None => {
            return Err(FileError::new(
                path,
                format!("not a {what}: no schema_version"),
            ))
        }
        Some(Some(version)) if version == u64::from(PROFILE_SCHEMA_VERSION) => {}
        Some(other) => {
            return Err(FileError::new(
                path,
                format!(
                    "{what} of schema_version {}, this build reads {PROFILE_SCHEMA_VERSION}",
                    other.map_or_else(|| value["schema_version"].to_string(), |v| v.to_string())
                ),
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| FileError::new(path, format!("not a {what}: {e}")))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader never sees
/// half a file and a failure leaves the old one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |name| name.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            FileError::new(path, format!("cannot write: {e}"))
        })
}

impl Profile {
    /// Fits a profile to calibration samples (at least one).
    pub fn fit(
        component_sha256: &str,
        engine: EngineFingerprint,
        model: &str,
        samples: &[Sample],
        margin_percent: u32,
    ) -> Profile {
        let fuel = Bound::fit(
            &samples
                .iter()
                .map(|s| (s.input_bytes, s.fuel))
                .collect::<Vec<_>>(),
        );
        let peak_memory = Bound::fit(
            &samples
                .iter()
                .map(|s| (s.input_bytes, s.peak_memory_bytes))
                .collect::<Vec<_>>(),
        );
        let max_input_bytes = samples.iter().map(|s| s.input_bytes).max().unwrap_or(0);
        let with_margin = |figure: u64| {
            figure.saturating_add((figure as u128 * margin_percent as u128).div_ceil(100) as u64)
        };
        let memory = with_margin(peak_memory.predict(max_input_bytes));
        Profile {
            schema_version: PROFILE_SCHEMA_VERSION,
            component_sha256: component_sha256.to_string(),
            engine,
            model: model.to_string(),
            inputs: samples.len() as u64,
            max_input_bytes,
            fuel,
            peak_memory,
            suggested: Suggested {
                margin_percent,
                fuel: with_margin(fuel.predict(max_input_bytes)),
                memory: memory.div_ceil(WASM_PAGE_BYTES) * WASM_PAGE_BYTES,
            },
            tokens: None,
        }
    }

    /// Reads a profile, checking its schema version and shape (not yet its identity: see
    /// [`Profile::check_identity`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Profile, FileError> {
        read_versioned(path.as_ref(), "calibration profile", false)
    }

    /// Writes the profile as pretty JSON, atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), FileError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a profile serialises");
        bytes.push(b'\n');
        write_atomically(path.as_ref(), &bytes)
    }

    /// What differs between the component and engine this profile was measured on and the
    /// given ones (empty: it applies).
    pub fn differences(&self, component_sha256: &str, engine: &EngineFingerprint) -> Vec<String> {
        identity_differences(
            &self.component_sha256,
            &self.engine,
            component_sha256,
            engine,
        )
    }

    /// `(fuel, peak memory)` predicted for `input` (see the module docs for batches).
    pub fn predict(&self, input: &Input) -> (u64, u64) {
        match input {
            Input::Texts(texts) => texts.iter().fold((0u64, 0u64), |(fuel, memory), text| {
                let bytes = text.len() as u64;
                (
                    fuel.saturating_add(self.fuel.predict(bytes)),
                    memory.max(self.peak_memory.predict(bytes)),
                )
            }),
            other => {
                let bytes = other.payload_bytes();
                (self.fuel.predict(bytes), self.peak_memory.predict(bytes))
            }
        }
    }

    /// Refuses `input` if its predicted fuel (when `limits` has a fuel cap) or peak memory is
    /// over its limit: [`LimitExceeded::Predicted`], fuel checked first.
    pub fn admit(&self, input: &Input, limits: &Limits) -> Result<(), LimitExceeded> {
        let (fuel, memory) = self.predict(input);
        if let Some(cap) = limits.fuel {
            if fuel > cap {
                return Err(LimitExceeded::Predicted {
                    limit: cap,
                    predicted: fuel,
                    resource: PredictedLimit::Fuel,
                });
            }
        }
        if memory > limits.memory {
            return Err(LimitExceeded::Predicted {
                limit: limits.memory,
                predicted: memory,
                resource: PredictedLimit::Memory,
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for Suggested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--fuel {} --mem {} (the bound at the largest calibrated input plus {}%)",
            format_count(self.fuel),
            format_size(self.memory),
            self.margin_percent
        )
    }
}

/// The `p`th percentile (nearest rank) of `values`, sorted or not; 0 when empty.
pub fn percentile(values: &[u64], p: u32) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (p as usize * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A float in a profile or cases file reads back as the float written. 0.9999999999998119
    /// is a bound `check` derives from a cosine; serde_json's default parser reads it one ulp
    /// high (0.999999999999812), which turned an exact bound into another one.
    #[test]
    fn a_float_reads_back_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("wasm-infer-floats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("floats.json");
        let written = [
            0.9999999999998119_f64,
            0.1 + 0.2,
            1.0e-300,
            2.2250738585072014e-308,
        ];
        std::fs::write(&path, serde_json::json!({ "floats": written }).to_string()).unwrap();
        let read: serde_json::Value = read_versioned(&path, "file", true).unwrap();
        let bits: Vec<u64> = read["floats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap().to_bits())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bits, written.map(f64::to_bits));
    }

    #[test]
    fn a_quadratic_is_recovered_and_covers_every_point() {
        let points: Vec<(u64, u64)> = (0..40u64)
            .map(|x| (x * 25, 1_000 + 7 * x * 25 + (x * 25) * (x * 25) / 100))
            .collect();
        let bound = Bound::fit(&points);
        assert!((bound.per_byte - 7.0).abs() < 0.01, "{bound}");
        assert!((bound.per_byte_squared - 0.01).abs() < 1e-5, "{bound}");
        for &(x, y) in &points {
            assert!(bound.predict(x) >= y, "{x}: {} < {y}", bound.predict(x));
        }
    }

    #[test]
    fn a_falling_fit_is_refitted_flat_and_raised_to_the_highest_point() {
        // Decreasing figures: no non-negative slope fits, so the bound is the constant that
        // covers the highest point.
        let points = [(10, 500), (20, 400), (30, 300)];
        let bound = Bound::fit(&points);
        assert_eq!((bound.per_byte, bound.per_byte_squared), (0.0, 0.0));
        assert_eq!(bound.predict(0), 500);
        assert_eq!(bound.predict(1000), 500);
        assert_eq!(bound.shift, 100.0);
    }

    #[test]
    fn a_generation_is_planned_as_its_first_token_and_the_most_per_token_after_it() {
        let sample = |bytes: u64, first: u64, per: Option<u64>| TokenSample {
            prompt_bytes: bytes,
            prompt_tokens: 0,
            to_first_token: first,
            per_token: per,
        };
        let profile = TokenProfile::fit(
            4,
            &[
                sample(10, 1_000, Some(70)),
                sample(20, 2_000, Some(90)),
                sample(30, 3_000, None),
            ],
        );
        assert_eq!(profile.per_token, 90);
        assert_eq!(profile.to_first_token.predict(20), 2_000);
        assert_eq!(profile.predict(20, 1), 2_000);
        assert_eq!(profile.predict(20, 5), 2_000 + 4 * 90);
        assert_eq!(profile.predict(20, 0), 2_000);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&values, 50), 5);
        assert_eq!(percentile(&values, 90), 9);
        assert_eq!(percentile(&values, 100), 10);
        assert_eq!(percentile(&values, 0), 1);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn a_batch_is_predicted_as_its_texts_summed_and_its_largest_text_s_memory() {
        let profile = Profile::fit(
            "x",
            crate::EngineSettings {
                meter_fuel: true,
                pool: None,
                nan_canonicalization: false,
                cpu_features: crate::CpuFeatures::Host,
            }
            .fingerprint(),
            "m",
            &[
                Sample {
                    input_bytes: 0,
                    fuel: 100,
                    peak_memory_bytes: 1000,
                },
                Sample {
                    input_bytes: 10,
                    fuel: 200,
                    peak_memory_bytes: 2000,
                },
            ],
            10,
        );
        assert_eq!(profile.predict(&Input::Text("12345".into())), (150, 1500));
        let batch = Input::Texts(vec!["12345".into(), "1234567890".into()]);
        assert_eq!(profile.predict(&batch), (350, 2000));
        assert_eq!(profile.suggested.fuel, 220);
        assert_eq!(profile.suggested.memory, WASM_PAGE_BYTES);
    }
}
