//! Usage pinned in a user's own CI: a cases file of inputs with their exact fuel, peak memory
//! and output digest, checked (or re-blessed) against a model, as `wasm-infer check` does.
//!
//! Fuel is deterministic (the same component, engine settings and input consume the same fuel
//! on every run and x86-64 machine), so an exact figure is a fair test: a moved figure means
//! the model, its input or the engine changed. The file records the component's SHA-256 and
//! the engine fingerprint it was blessed under, and a check names a difference there first,
//! since it explains every figure that moved with it.
//!
//! A cases file (JSON):
//!
//! ```json
//! {
//!   "cases": [
//!     { "input": "a short sentence" },
//!     { "name": "long", "input": "a much longer sentence ..." }
//!   ]
//! }
//! ```
//!
//! A case with only its `input` gets `fuel`, `peak_memory_bytes` and `output_sha256` filled in
//! by a bless. A case with a cosine bound instead, `{ "input": "...", "min_cosine": 0.9999 }`,
//! gets `output_vectors` (the embedding vectors) instead of a digest, and a check then passes
//! while every vector's cosine similarity with its recorded one is at least the bound; the
//! diff of one below it names the worst cosine and its vector, and a bless rewrites only
//! vectors that fell below their bound. A bless (`wasm-infer check --bless`, or
//! `WASM_INFER_BLESS=1` with [`assert_cases`]) also records `schema_version`,
//! `component_sha256` and `engine`. A bless writes the
//! file in its canonical form (two-space JSON, fields in the order above, one trailing
//! newline): a file already in that form changes in exactly the figures that moved.
//!
//! In a `cargo test`:
//!
//! ```no_run
//! use wasm_infer::testing::{assert_cases, assert_usage, Expected};
//! use wasm_infer::{Input, Limits, Model, Runtime};
//!
//! let runtime = Runtime::new()?;
//! let model = Model::load(&runtime, "my-model.wasm")?;
//! // One figure by hand...
//! let outcome = model.run(Input::Text("hello".into()), &Limits::default())?;
//! assert_usage(
//!     &outcome.usage,
//!     &Expected {
//!         fuel: Some(123_456_789),
//!         peak_memory_bytes: None,
//!     },
//! );
//! // ...or a whole cases file (re-bless with WASM_INFER_BLESS=1).
//! assert_cases(&model, "tests/usage.json", &Limits::default());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{Input, Output};
use crate::error::RunError;
use crate::limits::Limits;
use crate::model::Model;
use crate::profile::{self, FileError, PROFILE_SCHEMA_VERSION};
use crate::runtime::EngineFingerprint;
use crate::usage::Usage;

/// The environment variable that makes [`assert_cases`] bless instead of check.
pub const BLESS_ENV: &str = "WASM_INFER_BLESS";

/// A cases file (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    /// The format ([`PROFILE_SCHEMA_VERSION`]; a file without one is read as that).
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// The component the figures were blessed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component_sha256: Option<String>,
    /// The engine settings they were blessed under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineFingerprint>,
    /// The cases, in order.
    pub cases: Vec<Case>,
}

fn schema_version() -> u32 {
    PROFILE_SCHEMA_VERSION
}

/// One input and what it is expected to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// A name for reports (else the case is named by its number and input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The input, run as one text.
    pub input: String,
    /// Exact fuel consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Exact peak linear memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// SHA-256 of the output as JSON (serde_json's, whose floats print exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// Compare the output's vectors with [`output_vectors`](Self::output_vectors) by cosine
    /// similarity, each at least this, instead of by digest (for outputs that may move in the
    /// last bits, e.g. on the accelerator path, whose kernels depend on the host CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
    /// The expected embedding vectors of a case with [`min_cosine`](Self::min_cosine) (filled
    /// in by a bless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_vectors: Option<Vec<Vec<f32>>>,
}

impl Case {
    fn label(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("case {} ({name})", index + 1),
            None => {
                let mut input: String = self.input.chars().take(32).collect();
                if input.len() < self.input.len() {
                    input.push('…');
                }
                format!("case {} ({input:?})", index + 1)
            }
        }
    }
}

/// The SHA-256 of `output` as JSON, lowercase hex (what [`Case::output_sha256`] holds).
pub fn output_digest(output: &Output) -> String {
    let json = serde_json::to_vec(output).expect("an output serialises");
    format!("{:x}", Sha256::digest(json))
}

/// A figure that is not what the file expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The case (`case 2 ("hello")`).
    pub case: String,
    /// `fuel`, `peak_memory_bytes`, `output_sha256` or `output_vectors`.
    pub figure: &'static str,
    /// What the file says (`None`: not yet blessed).
    pub expected: Option<String>,
    /// What the run gave.
    pub got: String,
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected = self.expected.as_deref().unwrap_or("(not blessed)");
        write!(
            f,
            "{}: {} expected {expected}, got {}",
            self.case, self.figure, self.got
        )?;
        if let (Some(Ok(old)), Ok(new)) = (
            self.expected.as_deref().map(str::parse::<i128>),
            self.got.parse::<i128>(),
        ) {
            let change = new - old;
            if old != 0 {
                write!(
                    f,
                    " ({change:+}, {:+.3}%)",
                    change as f64 * 100.0 / old as f64
                )?;
            }
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// How the file's component and engine differ from the model's (one line each; a file
    /// never blessed says so). Listed first: they explain the figures that moved.
    pub identity: Vec<String>,
    /// Every figure that is not what the file expects, in case order.
    pub moved: Vec<Moved>,
    /// Cases run.
    pub cases: usize,
    /// The file was rewritten (a bless that changed something).
    pub written: bool,
    /// The lowest cosine similarity between an output vector and its expected vector, over
    /// every case with a `min_cosine` bound and recorded vectors of the same shape (`None`
    /// when there is none).
    pub worst_cosine: Option<f64>,
}

impl CheckReport {
    /// Nothing moved and the identity matches.
    pub fn passed(&self) -> bool {
        self.identity.is_empty() && self.moved.is_empty()
    }
}

impl fmt::Display for CheckReport {
    /// The identity differences, then one line per moved figure.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.identity {
            writeln!(f, "{line}")?;
        }
        for moved in &self.moved {
            writeln!(f, "{moved}")?;
        }
        Ok(())
    }
}

/// Why a check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The cases file is unreadable, malformed or of another schema version (nothing was run
    /// or written).
    #[error(transparent)]
    File(#[from] FileError),
    /// A case's run failed (nothing was written).
    #[error("{case}: the run failed: {error}")]
    Run {
        /// The case.
        case: String,
        /// Its failure, with what it used.
        error: RunError,
    },
}

/// Checks every case of the file at `path` against `model` under `limits`; with `bless`,
/// rewrites the figures that moved (and the identity) instead, writing the file only if
/// something changed, atomically. The file is never written when it cannot be read or a run
/// fails.
pub fn check_cases(
    model: &Model,
    path: impl AsRef<Path>,
    limits: &Limits,
    bless: bool,
) -> Result<CheckReport, CheckError> {
    let path = path.as_ref();
    let mut file: CasesFile = profile::read_versioned(path, "cases file", true)?;
    validate(path, &file)?;
    let sha256 = model.load_report().component_sha256.clone();
    let engine = model.runtime().fingerprint();
    let mut report = CheckReport {
        cases: file.cases.len(),
        ..CheckReport::default()
    };
    match (&file.component_sha256, &file.engine) {
        (Some(recorded), Some(recorded_engine)) => {
            let differences =
                profile::identity_differences(recorded, recorded_engine, &sha256, &engine);
            if !differences.is_empty() {
                report.identity.push(format!(
                    "{}: blessed on another build: {}",
                    path.display(),
                    differences.join("; ")
                ));
            }
        }
        _ => report.identity.push(format!(
            "{}: not yet blessed (no component_sha256 and engine)",
            path.display()
        )),
    }
    for (index, case) in file.cases.iter_mut().enumerate() {
        let label = case.label(index);
        let outcome = model
            .run(Input::Text(case.input.clone()), limits)
            .map_err(|error| CheckError::Run {
                case: label.clone(),
                error,
            })?;
        compare(
            &mut report.moved,
            &label,
            "fuel",
            &mut case.fuel,
            outcome.usage.fuel_consumed,
        );
        compare(
            &mut report.moved,
            &label,
            "peak_memory_bytes",
            &mut case.peak_memory_bytes,
            outcome.usage.peak_memory_bytes,
        );
        match case.min_cosine {
            Some(bound) => {
                let worst = compare_vectors(
                    &mut report.moved,
                    &label,
                    bound,
                    &mut case.output_vectors,
                    &outcome.output,
                );
                if let Some(worst) = worst {
                    report.worst_cosine =
                        Some(report.worst_cosine.map_or(worst, |w: f64| w.min(worst)));
                }
            }
            None => compare(
                &mut report.moved,
                &label,
                "output_sha256",
                &mut case.output_sha256,
                output_digest(&outcome.output),
            ),
        }
    }
    if bless && !report.passed() {
        file.schema_version = PROFILE_SCHEMA_VERSION;
        file.component_sha256 = Some(sha256);
        file.engine = Some(engine);
        let mut bytes = serde_json::to_vec_pretty(&file).expect("a cases file serialises");
        bytes.push(b'\n');
        profile::write_atomically(path, &bytes)?;
        report.written = true;
    }
    Ok(report)
}

/// Refuses, before anything runs, a case whose output would be compared two ways or whose
/// cosine bound is not a cosine.
fn validate(path: &Path, file: &CasesFile) -> Result<(), FileError> {
    for (index, case) in file.cases.iter().enumerate() {
        let problem = match case.min_cosine {
            Some(bound) if !(-1.0..=1.0).contains(&bound) => {
                format!("min_cosine {bound} is not in [-1, 1]")
            }
            Some(_) if case.output_sha256.is_some() => {
                "has both output_sha256 and min_cosine (its output is compared one way: drop one)"
                    .to_string()
            }
            None if case.output_vectors.is_some() => {
                "has output_vectors without a min_cosine bound".to_string()
            }
            _ => continue,
        };
        return Err(FileError::new(
            path,
            format!("{}: {problem}", case.label(index)),
        ));
    }
    Ok(())
}

/// The cosine similarity of two vectors of the same length, in f64 (1 for identical bits,
/// so that a zero vector matches itself; NaN, which fails every bound, for a zero vector
/// against another).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.iter()
        .map(|x| x.to_bits())
        .eq(b.iter().map(|x| x.to_bits()))
    {
        return 1.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Compares an output's vectors with the expected ones under a cosine bound; records a moved
/// `output_vectors` (with the worst cosine) and takes the output's vectors when they are
/// missing, of another shape or below the bound. Returns the worst cosine when the shapes
/// match.
fn compare_vectors(
    moved: &mut Vec<Moved>,
    case: &str,
    bound: f64,
    expected: &mut Option<Vec<Vec<f32>>>,
    output: &Output,
) -> Option<f64> {
    let shape =
        |v: &[Vec<f32>]| format!("{} vector(s) of {}", v.len(), v.first().map_or(0, Vec::len));
    let mut record = |expected_text: Option<String>, got: String| {
        moved.push(Moved {
            case: case.to_string(),
            figure: "output_vectors",
            expected: expected_text,
            got,
        })
    };
    let Some(got) = output.embeddings() else {
        record(
            expected.as_deref().map(shape),
            "an output without vectors".into(),
        );
        return None;
    };
    let Some(want) = expected.as_deref() else {
        record(None, shape(got));
        *expected = Some(got.to_vec());
        return None;
    };
    let same_shape =
        want.len() == got.len() && want.iter().zip(got).all(|(w, g)| w.len() == g.len());
    if !same_shape {
        record(Some(shape(want)), shape(got));
        *expected = Some(got.to_vec());
        return None;
    }
    if want.is_empty() {
        return None;
    }
    // The lowest cosine and its vector (1-based); NaN counts as the worst.
    let (at, worst) = want
        .iter()
        .zip(got)
        .map(|(w, g)| cosine(w, g))
        .enumerate()
        .fold((0, f64::INFINITY), |(at, worst), (i, c)| {
            if c < worst || (c.is_nan() && !worst.is_nan()) {
                (i + 1, c)
            } else {
                (at, worst)
            }
        });
    if worst.is_nan() || worst < bound {
        record(
            Some(format!("cosine >= {bound}")),
            format!("worst cosine {worst} (vector {at})"),
        );
        *expected = Some(got.to_vec());
    }
    Some(worst)
}

/// Records a moved figure and sets the expectation to what the run gave (used when blessing).
fn compare<T: PartialEq + ToString>(
    moved: &mut Vec<Moved>,
    case: &str,
    figure: &'static str,
    expected: &mut Option<T>,
    got: T,
) {
    if expected.as_ref() != Some(&got) {
        moved.push(Moved {
            case: case.to_string(),
            figure,
            expected: expected.as_ref().map(T::to_string),
            got: got.to_string(),
        });
        *expected = Some(got);
    }
}

/// Expected figures of one run; `None` is not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// Exact fuel.
    pub fuel: Option<u64>,
    /// Exact peak linear memory, in bytes.
    pub peak_memory_bytes: Option<u64>,
}

/// Panics, listing every figure that differs (figure, expected, got), unless `usage` has the
/// expected figures.
#[track_caller]
pub fn assert_usage(usage: &Usage, expected: &Expected) {
    let mut moved = Vec::new();
    for (figure, want, got) in [
        ("fuel", expected.fuel, usage.fuel_consumed),
        (
            "peak_memory_bytes",
            expected.peak_memory_bytes,
            usage.peak_memory_bytes,
        ),
    ] {
        if let Some(want) = want {
            if want != got {
                moved.push(Moved {
                    case: "usage".into(),
                    figure,
                    expected: Some(want.to_string()),
                    got: got.to_string(),
                });
            }
        }
    }
    if !moved.is_empty() {
        let lines: Vec<String> = moved.iter().map(ToString::to_string).collect();
        panic!("usage moved:\n{}", lines.join("\n"));
    }
}

/// [`check_cases`] for a `cargo test`: blesses when [`BLESS_ENV`] is `1`, else panics with
/// the report unless every figure is as the file says.
#[track_caller]
pub fn assert_cases(model: &Model, path: impl AsRef<Path>, limits: &Limits) {
    let path = path.as_ref();
    let bless = std::env::var(BLESS_ENV).is_ok_and(|v| v == "1");
    match check_cases(model, path, limits, bless) {
        Ok(report) if bless || report.passed() => {}
        Ok(report) => panic!(
            "{} moved (re-bless with {BLESS_ENV}=1 if intended):\n{report}",
            path.display()
        ),
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_figure_reads_as_case_figure_expected_got() {
        let moved = Moved {
            case: "case 2 (\"hello\")".into(),
            figure: "fuel",
            expected: Some("1000".into()),
            got: "1010".into(),
        };
        assert_eq!(
            moved.to_string(),
            "case 2 (\"hello\"): fuel expected 1000, got 1010 (+10, +1.000%)"
        );
        let fresh = Moved {
            expected: None,
            figure: "output_sha256",
            got: "ab".into(),
            ..moved
        };
        assert_eq!(
            fresh.to_string(),
            "case 2 (\"hello\"): output_sha256 expected (not blessed), got ab"
        );
    }

    #[test]
    #[should_panic(expected = "fuel expected 5, got 6")]
    fn assert_usage_names_the_figure() {
        let usage = Usage {
            fuel_consumed: 6,
            ..Usage::default()
        };
        assert_usage(
            &usage,
            &Expected {
                fuel: Some(5),
                peak_memory_bytes: None,
            },
        );
    }
}
