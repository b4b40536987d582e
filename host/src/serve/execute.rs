//! The request pipeline, between the HTTP translation ([`routes`](super::routes)) and the
//! library: a request's quotas reserved from its head ([`admit`]), then, once its body is
//! parsed, [`execute`]: the model's own admission (size, profile), the tokens quota, a place in
//! the model's [queue](super::queue), the run under the tenant's limits, the fallback after a
//! limit trip, the refund (or overrun charge) of its fuel, and the run's metrics. Every
//! refusal comes back as the [`ApiError`] its answer is made of; nothing here knows about
//! routes, bodies or JSON.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::config::{FallbackConfig, Tenant, TenantRates};
use super::metrics::{ModelLabels, RateLabels, RunLabels, TripLabels};
use super::queue::Refused;
use super::ratelimit::{Charge, Decision, Quota};
use super::status::{retry_after_seconds, ApiError};
use super::{Served, State};
use crate::data::Input;
use crate::error::{ErrorKind, RunError};
use crate::generate::{GenerateRequest, Generation, GenerationError, OnEmit};
use crate::limits::Limits;
use crate::model::Outcome;
use crate::usage::Usage;
use crate::worker::StopCheck;

/// Retry-After for a full queue or a wait that ran out: about one run's time.
const QUEUE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Retry-After when the rate-limit backend is down.
const BACKEND_RETRY_AFTER: Duration = Duration::from_secs(1);
/// What a client is told when the rate-limit backend cannot answer (fail-closed): a fixed text.
const BACKEND_UNAVAILABLE: &str = "Rate limits cannot be checked now; retry later.";

/// The quotas a request reserves from its head alone, before any body byte is read: its
/// request (1) and its fuel cap, all or none (429 naming the quota that refused, 503 when the
/// backend cannot answer), so that a request whose body turns out malformed has spent its
/// request like any other.
pub(super) async fn admit(state: &State, tenant: &Tenant) -> Result<Admitted, ApiError> {
    let TenantRates { requests, fuel, .. } = tenant.rates;
    let wanted: Vec<(&'static str, Quota, u64)> = [
        requests.map(|q| ("requests", q, 1)),
        fuel.map(|q| ("fuel", q, tenant.limits.fuel.unwrap_or(q.burst))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (charges, rates) = reserve(state, tenant, &wanted, &[]).await?;
    let fuel = charges
        .into_iter()
        .zip(&wanted)
        .find(|(_, (name, _, _))| *name == "fuel")
        .map(|(charge, _)| charge);
    Ok(Admitted { fuel, rates })
}

/// A run that succeeded, with what its answer carries.
pub(super) struct Done {
    pub(super) outcome: Outcome,
    /// The model that answered (the fallback's, when it answered).
    pub(super) answered_by: String,
    /// Which fallback answered, as the answer names it.
    pub(super) fallback: Option<String>,
    pub(super) limits: Limits,
    /// The quotas' `RateLimit-Policy` and `RateLimit` headers.
    pub(super) rate_headers: HeaderMap,
}

/// What an admitted request holds: its fuel reservation (refunded by what its run does not
/// burn, whole if it never runs) and the quotas' figures for its answer's headers.
pub(super) struct Admitted {
    /// The fuel charge (its key, quota and the cap reserved).
    fuel: Option<Charge>,
    rates: Vec<RateEntry>,
}

impl Admitted {
    /// The request will not run: its fuel reservation goes back whole (its request stays
    /// spent). Returns `error` with the quotas' headers.
    pub(super) async fn release(self, state: &State, mut error: ApiError) -> ApiError {
        if let Some(fuel) = self.fuel {
            state.limiter.refund_all(&[fuel]).await;
        }
        error.headers.extend(rate_headers(&self.rates));
        error
    }
}

/// One run, start to end: input check, tokens quota, queue, run (and fallback), refund,
/// metrics.
pub(super) async fn execute(
    state: &State,
    tenant: &Tenant,
    served: &Served,
    input: Input,
    tokens: u64,
    admitted: Admitted,
) -> Result<Done, ApiError> {
    let limits = tenant.limits.clone();
    // Refused before it is queued (too large, or predicted over a limit by the model's
    // profile): its request is spent, its fuel given back.
    if let Err(limit) = served.model.admit(&input, &limits) {
        let error: crate::Error = limit.into();
        return Err(admitted.release(state, ApiError::from_error(&error)).await);
    }
    // The tokens are known only now that the body is parsed: their quota is the one reserved
    // after admission (one more step of the limiter, only for tenants that have it).
    let mut rates = admitted.rates.clone();
    if let Some(quota) = tenant.rates.tokens {
        let wanted = [("tokens", quota, tokens)];
        match reserve(state, tenant, &wanted, &admitted.rates).await {
            Ok((_, entries)) => rates.extend(entries),
            Err(e) => {
                let Admitted { fuel, .. } = admitted;
                if let Some(fuel) = fuel {
                    state.limiter.refund_all(&[fuel]).await;
                }
                return Err(e);
            }
        }
    }
    let rate_headers = rate_headers(&rates);
    let cap_charge = admitted.fuel.clone();
    let reserved = hold_prediction(state, served, &input, admitted).await;
    // Kept for the fallback's retry only when there is one.
    let retry_input = served.fallback.as_ref().map(|_| input.clone());
    let result = run_queued(state, served, input, &limits, &tenant.name).await;
    // Fuel reserved for this request's runs: the admission's cap, and as much again for a
    // fallback's run.
    let mut reserved_fuel = reserved.fuel.as_ref().map_or(0, |fuel| fuel.cost);
    let result = match (result, retry_input) {
        (Err(Failure::Run(failure)), Some(input)) if is_fallback_trip(failure.kind()) => {
            // The fallback is a second run: it needs its own fuel reservation, and both runs'
            // fuel is charged and reported.
            if reserve_fallback_fuel(state, cap_charge.as_ref()).await {
                reserved_fuel += cap_charge.as_ref().map_or(0, |fuel| fuel.cost);
                let first = failure.usage.fuel_consumed;
                match run_fallback(state, served, input, &limits, &tenant.name, &failure).await {
                    Ok((mut outcome, by, how)) => {
                        outcome.usage.fuel_consumed += first;
                        Ok((outcome, by, how))
                    }
                    Err(Failure::Run(mut second)) => {
                        second.usage.fuel_consumed += first;
                        Err(Failure::Run(second))
                    }
                    // No slot for the fallback: the first run's trip is the answer.
                    Err(Failure::Refused(_)) => Err(Failure::Run(failure)),
                }
            } else {
                Err(Failure::Run(failure))
            }
        }
        (other, _) => other.map(|outcome| (outcome, served.name.clone(), None)),
    };
    // Refund what the runs did not use, in one step of the limiter: the fuel they did not burn
    // (a failed run burnt what its usage says). Requests and tokens are spent once admitted.
    if let Some(fuel) = reserved.fuel {
        let consumed = match &result {
            Ok((outcome, _, _)) => outcome.usage.fuel_consumed,
            Err(Failure::Run(failure)) => failure.usage.fuel_consumed,
            Err(Failure::Refused(_)) => 0,
        };
        if consumed > reserved_fuel && served.model.profile().is_some() {
            // A run the profile under-predicted (its cap still bounded it): the difference is
            // charged now, as far as the quota has room for it. Without a profile the cap was
            // reserved, and what a trip burns past it is not charged (as before).
            let over = Charge {
                cost: consumed - reserved_fuel,
                ..fuel
            };
            let _ = state.limiter.reserve_all(&[over]).await;
        } else {
            let unused = Charge {
                cost: reserved_fuel.saturating_sub(consumed),
                ..fuel
            };
            state.limiter.refund_all(&[unused]).await;
        }
    }
    match result {
        Ok((outcome, answered_by, fallback)) => Ok(Done {
            outcome,
            answered_by,
            fallback,
            limits,
            rate_headers,
        }),
        Err(Failure::Run(failure)) => {
            let mut e = ApiError::from_run(&failure);
            e.headers.extend(rate_headers);
            Err(e)
        }
        Err(Failure::Refused(e)) => Err(e),
    }
}

/// With a profile, the fuel quota holds the request's predicted fuel instead of its cap while
/// it runs: the difference is refunded now (the rest after the run, or the overrun charged).
async fn hold_prediction(
    state: &State,
    served: &Served,
    input: &Input,
    mut admitted: Admitted,
) -> Admitted {
    if let (Some(profile), Some(fuel)) = (served.model.profile(), admitted.fuel.as_mut()) {
        let predicted = profile.predict(input).0;
        if predicted < fuel.cost {
            let released = Charge {
                cost: fuel.cost - predicted,
                ..fuel.clone()
            };
            state.limiter.refund_all(&[released]).await;
            fuel.cost = predicted;
        }
    }
    admitted
}

/// Reserves a fallback run's fuel (the same cap as the first run's), when the tenant has a fuel
/// quota: whether the fallback may run. A quota with no room for it (or a backend that cannot
/// answer) leaves the first run's trip as the answer.
async fn reserve_fallback_fuel(state: &State, fuel: Option<&Charge>) -> bool {
    let Some(fuel) = fuel else {
        return true;
    };
    match state.limiter.reserve_all(std::slice::from_ref(fuel)).await {
        Ok(decisions) => super::ratelimit::all_allowed(&decisions),
        Err(_) => false,
    }
}

/// The trips a fallback answers: the run was too big for its limits, not wrong.
fn is_fallback_trip(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Fuel | ErrorKind::Memory | ErrorKind::WallTime | ErrorKind::DeviceMemory
    )
}

/// [`execute`] in a task of its own: a client that goes away mid-run (hyper then drops its
/// handler) does not cut the pipeline short, so the run's fuel is still settled and its
/// figures recorded.
pub(super) async fn execute_detached(
    state: &Arc<State>,
    tenant: &Tenant,
    served: &Arc<Served>,
    input: Input,
    tokens: u64,
    admitted: Admitted,
) -> Result<Done, ApiError> {
    let (state, tenant, served) = (state.clone(), tenant.clone(), served.clone());
    tokio::spawn(async move { execute(&state, &tenant, &served, input, tokens, admitted).await })
        .await
        .unwrap_or_else(|e| Err(pipeline_failed(e)))
}

pub(super) fn pipeline_failed(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("The request's pipeline failed: {e}"),
    )
}

/// A generation that ran (to its end, or to the limit or failure that stopped it), with its
/// quotas' headers.
pub(super) struct GenerationRun {
    pub(super) result: Result<Generation, Box<GenerationError>>,
    pub(super) rate_headers: HeaderMap,
}

/// What a generation brings to the pipeline besides its tenant and model.
pub(super) struct GenerationJob {
    pub(super) request: GenerateRequest,
    /// The prompt's tokens as estimated before the guest counts them.
    pub(super) prompt_estimate: u64,
    pub(super) admitted: Admitted,
    /// Each piece, as the guest hands it over.
    pub(super) on_emit: OnEmit,
    /// Whether the client is gone.
    pub(super) stop: StopCheck,
}

/// One generation, start to end, in a task of its own (it outlives its client's connection
/// only until `stop` says the client is gone): the tokens quota (the prompt's estimate plus
/// `max_tokens`, settled to the tokens the guest really read and wrote), the queue, the
/// generation in a worker (or in this process) with its pieces handed to `on_emit`, the fuel
/// refund and the metrics. A generation `stop` ended keeps its whole fuel reservation: its
/// figures went with its worker.
pub(super) fn spawn_generation(
    state: &Arc<State>,
    tenant: &Tenant,
    served: &Arc<Served>,
    job: GenerationJob,
) -> tokio::task::JoinHandle<Result<GenerationRun, ApiError>> {
    let (state, tenant, served) = (state.clone(), tenant.clone(), served.clone());
    tokio::spawn(async move { generation_pipeline(&state, &tenant, &served, job).await })
}

async fn generation_pipeline(
    state: &State,
    tenant: &Tenant,
    served: &Served,
    job: GenerationJob,
) -> Result<GenerationRun, ApiError> {
    let GenerationJob {
        request,
        prompt_estimate,
        admitted,
        on_emit,
        stop,
    } = job;
    let mut rates = admitted.rates.clone();
    let mut tokens = None;
    if let Some(quota) = tenant.rates.tokens {
        let wanted = prompt_estimate.saturating_add(u64::from(request.max_tokens));
        match reserve(state, tenant, &[("tokens", quota, wanted)], &admitted.rates).await {
            Ok((charges, entries)) => {
                rates.extend(entries);
                tokens = charges.into_iter().next();
            }
            Err(e) => {
                if let Some(fuel) = admitted.fuel {
                    state.limiter.refund_all(&[fuel]).await;
                }
                return Err(e);
            }
        }
    }
    let rate_headers = rate_headers(&rates);
    let (slot, limits) = match take_slot(state, served, &tenant.limits, &tenant.name).await {
        Ok(taken) => taken,
        Err(mut e) => {
            let refunds: Vec<Charge> = admitted.fuel.into_iter().chain(tokens).collect();
            state.limiter.refund_all(&refunds).await;
            e.headers.extend(rate_headers);
            return Err(e);
        }
    };
    let fired = Arc::new(AtomicBool::new(false));
    let stopped = {
        let fired = fired.clone();
        Arc::new(move || {
            let gone = stop();
            if gone {
                fired.store(true, Ordering::Relaxed);
            }
            gone
        }) as StopCheck
    };
    let running = Running::new(state, served);
    let result = state
        .generate_for_tenant(
            served,
            Some(&tenant.name),
            request,
            &limits,
            on_emit,
            stopped,
        )
        .await;
    drop(running);
    drop(slot);
    let (usage, kind) = match &result {
        Ok(generation) => (&generation.usage, None),
        Err(failure) => (&*failure.error.usage, Some(failure.error.kind())),
    };
    record_run(state, served, &tenant.name, usage, kind);
    let mut settle = Vec::new();
    let mut overrun = Vec::new();
    // Fuel: what the run did not burn goes back, unless it was stopped (no figure came back).
    if let Some(fuel) = admitted.fuel {
        if !fired.load(Ordering::Relaxed) {
            settle.push(Charge {
                cost: fuel.cost.saturating_sub(usage.fuel_consumed),
                ..fuel
            });
        }
    }
    // Tokens: the guest's own counts (on a failure, the estimate and the tokens generated).
    if let Some(charge) = tokens {
        let used = match &result {
            Ok(g) => u64::from(g.prompt_tokens) + u64::from(g.completion_tokens),
            Err(failure) => prompt_estimate + failure.partial.tokens.len() as u64,
        };
        if used <= charge.cost {
            settle.push(Charge {
                cost: charge.cost - used,
                ..charge
            });
        } else {
            overrun.push(Charge {
                cost: used - charge.cost,
                ..charge
            });
        }
    }
    state.limiter.refund_all(&settle).await;
    if !overrun.is_empty() {
        // Charged as far as the quota has room: the tokens were already generated.
        let _ = state.limiter.reserve_all(&overrun).await;
    }
    Ok(GenerationRun {
        result,
        rate_headers,
    })
}

enum Failure {
    Run(RunError),
    Refused(ApiError),
}

/// A slot in `served`'s queue, then the run, with the queue wait taken out of its wall time.
async fn run_queued(
    state: &State,
    served: &Served,
    input: Input,
    limits: &Limits,
    tenant: &str,
) -> Result<Outcome, Failure> {
    let (slot, limits) = take_slot(state, served, limits, tenant)
        .await
        .map_err(Failure::Refused)?;
    let running = Running::new(state, served);
    let result = state.run_for_tenant(served, tenant, input, &limits).await;
    drop(running);
    drop(slot);
    let (usage, kind) = match &result {
        Ok(outcome) => (&outcome.usage, None),
        Err(failure) => (&*failure.usage, Some(failure.kind())),
    };
    record_run(state, served, tenant, usage, kind);
    result.map_err(Failure::Run)
}

/// A place in `served`'s queue for `tenant`, waited for no longer than the request's wall time
/// (or `queue_wait`), and the limits its run gets: the wall time less the wait.
async fn take_slot(
    state: &State,
    served: &Served,
    limits: &Limits,
    tenant: &str,
) -> Result<(super::queue::Slot, Limits), ApiError> {
    let model_labels = ModelLabels {
        model: served.name.clone(),
    };
    let deadline = state
        .config
        .queue_wait
        .map_or(limits.wall_time, |w| w.min(limits.wall_time));
    state
        .metrics
        .queue_depth
        .get_or_create(&model_labels)
        .set(served.queue.waiting() as i64 + 1);
    let slot = served.queue.acquire(tenant, deadline).await;
    state
        .metrics
        .queue_depth
        .get_or_create(&model_labels)
        .set(served.queue.waiting() as i64);
    let slot = slot.map_err(|refused| {
        let message = match refused {
            Refused::Full => format!("Model {} is overloaded: its queue is full.", served.name),
            Refused::TimedOut => format!(
                "Model {} is overloaded: no run slot came free within {}.",
                served.name,
                humantime::format_duration(deadline)
            ),
        };
        ApiError::unavailable(message, "overloaded", QUEUE_RETRY_AFTER)
    })?;
    let run_labels = RunLabels {
        tenant: tenant.into(),
        model: served.name.clone(),
    };
    state
        .metrics
        .queue_wait
        .get_or_create(&run_labels)
        .observe(slot.waited.as_secs_f64());
    // The request's deadline covers its wait in the queue.
    let limits = Limits {
        wall_time: limits.wall_time.saturating_sub(slot.waited),
        ..limits.clone()
    };
    Ok((slot, limits))
}

/// A run counted in `wasm_infer_in_flight{model}` until dropped, however its future ends.
struct Running(prometheus_client::metrics::gauge::Gauge);

impl Running {
    fn new(state: &State, served: &Served) -> Self {
        let gauge = state
            .metrics
            .in_flight
            .get_or_create(&ModelLabels {
                model: served.name.clone(),
            })
            .clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A finished run's figures into the metrics: its usage, and its limit trip if it had one.
fn record_run(
    state: &State,
    served: &Served,
    tenant: &str,
    usage: &Usage,
    failed: Option<ErrorKind>,
) {
    state.metrics.record_run(tenant, &served.name, usage);
    if let Some(kind) = failed.filter(|kind| kind.is_limit()) {
        state
            .metrics
            .limit_trips
            .get_or_create(&TripLabels {
                tenant: tenant.into(),
                model: served.name.clone(),
                kind: kind.as_str().into(),
            })
            .inc();
    }
}

/// The model's fallback after a limit trip: another model, or the input cut shorter.
async fn run_fallback(
    state: &State,
    served: &Served,
    input: Input,
    limits: &Limits,
    tenant: &str,
    first: &RunError,
) -> Result<(Outcome, String, Option<String>), Failure> {
    let fallback = served.fallback.as_ref().expect("checked by the caller");
    let mut limits = limits.clone();
    let (target, input, how) = match fallback {
        FallbackConfig::Model(other) => (
            state.models.get(other).expect("checked at start").clone(),
            input,
            format!("model {other}"),
        ),
        FallbackConfig::Truncate(bytes) => (
            state.models[&served.name].clone(),
            truncate(input, *bytes as usize),
            format!("truncated to {bytes} bytes"),
        ),
        FallbackConfig::InSandbox => {
            limits = limits.hide_device();
            (
                state.models[&served.name].clone(),
                input,
                "in-sandbox".to_string(),
            )
        }
    };
    tracing::info!(model = %served.name, first = %first.error, fallback = %how, "retrying with the fallback");
    let outcome = run_queued(state, &target, input, &limits, tenant).await?;
    state
        .metrics
        .fallbacks
        .get_or_create(&RunLabels {
            tenant: tenant.into(),
            model: served.name.clone(),
        })
        .inc();
    Ok((outcome, target.name.clone(), Some(how)))
}

fn truncate(input: Input, bytes: usize) -> Input {
    let cut = |mut s: String| {
        if s.len() > bytes {
            let mut end = bytes;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    };
    match input {
        Input::Text(t) => Input::Text(cut(t)),
        Input::Texts(ts) => Input::Texts(ts.into_iter().map(cut).collect()),
        other => other,
    }
}

/// One quota's figures for the `RateLimit-Policy` and `RateLimit` headers.
#[derive(Clone)]
struct RateEntry {
    name: &'static str,
    policy: String,
    remaining: String,
}

/// Reserves `wanted` (name, quota, cost) of the tenant's quotas, all or none, in one step of the
/// limiter (one round trip to Redis). 429 when one does not fit, naming the quota that limits
/// (the longest wait; a cost above its burst is the longest of all), with its Retry-After and
/// the headers of `earlier` entries and these; 503 when the backend cannot answer
/// (fail-closed). Nothing is asked of the limiter when `wanted` is empty.
async fn reserve(
    state: &State,
    tenant: &Tenant,
    wanted: &[(&'static str, Quota, u64)],
    earlier: &[RateEntry],
) -> Result<(Vec<Charge>, Vec<RateEntry>), ApiError> {
    if wanted.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let charges: Vec<Charge> = wanted
        .iter()
        .map(|(name, quota, cost)| Charge::new(format!("{}:{name}", tenant.name), *quota, *cost))
        .collect();
    // The backend's error text (its address, script digest, server message) stays in the
    // server's log, which the limiter writes once per outage, not once per request.
    let decisions = state.limiter.reserve_all(&charges).await.map_err(|_| {
        ApiError::unavailable(
            BACKEND_UNAVAILABLE,
            "rate_limit_unavailable",
            BACKEND_RETRY_AFTER,
        )
    })?;
    let mut entries = Vec::new();
    // The refusing quota with the longest wait (`None`, never fits, is longest).
    let mut limiting: Option<(usize, Option<Duration>, u64)> = None;
    for (i, ((name, quota, _), decision)) in wanted.iter().zip(&decisions).enumerate() {
        let window = (quota.burst as f64 / quota.per_second).ceil() as u64;
        let policy = format!("\"{name}\";q={};w={window}", quota.burst);
        let (r, reset) = match decision {
            Decision::Allowed { remaining, reset } => (*remaining, *reset),
            Decision::Limited {
                retry_after,
                remaining,
                reset,
            } => {
                let longer = match limiting {
                    None => true,
                    Some((_, None, _)) => false,
                    Some((_, Some(longest), _)) => retry_after.is_none_or(|after| after > longest),
                };
                if longer {
                    limiting = Some((i, *retry_after, *remaining));
                }
                (*remaining, *reset)
            }
        };
        entries.push(RateEntry {
            name,
            policy,
            remaining: format!("\"{name}\";r={r};t={}", reset.as_secs_f64().ceil() as u64),
        });
    }
    if let Some((i, retry_after, r)) = limiting {
        let (name, quota, cost) = wanted[i];
        state
            .metrics
            .rate_limited
            .get_or_create(&RateLabels {
                tenant: tenant.name.clone(),
                limit: name.into(),
            })
            .inc();
        let message = match retry_after {
            Some(after) => format!(
                "Rate limit reached for {name}: this request needs {cost}, {r} left; \
                 retry after {} s.",
                retry_after_seconds(after)
            ),
            None => format!(
                "Rate limit for {name}: this request needs {cost}, more than the burst \
                 of {} ever admits.",
                quota.burst
            ),
        };
        let mut e =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, name, message).code("rate_limit_exceeded");
        if let Some(after) = retry_after {
            e = e.retry_after(after);
        }
        let all: Vec<RateEntry> = earlier.iter().cloned().chain(entries).collect();
        e.headers.extend(rate_headers(&all));
        return Err(e);
    }
    Ok((charges, entries))
}

/// The `RateLimit-Policy` and `RateLimit` headers, one item per quota in a fixed order
/// (requests, tokens, fuel) whichever step reserved it.
fn rate_headers(entries: &[RateEntry]) -> HeaderMap {
    const ORDER: [&str; 3] = ["requests", "tokens", "fuel"];
    let mut sorted: Vec<&RateEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| ORDER.iter().position(|n| *n == e.name));
    let mut headers = HeaderMap::new();
    if !sorted.is_empty() {
        let policies: Vec<&str> = sorted.iter().map(|e| e.policy.as_str()).collect();
        let remaining: Vec<&str> = sorted.iter().map(|e| e.remaining.as_str()).collect();
        if let Ok(v) = HeaderValue::from_str(&policies.join(", ")) {
            headers.insert(HeaderName::from_static("ratelimit-policy"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&remaining.join(", ")) {
            headers.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_cuts_at_a_character_boundary() {
        assert_eq!(
            truncate(Input::Text("héllo".into()), 2),
            Input::Text("h".into())
        );
        assert_eq!(
            truncate(Input::Texts(vec!["abc".into(), "d".into()]), 2),
            Input::Texts(vec!["ab".into(), "d".into()])
        );
    }
}
