//! The service's Prometheus metrics (`/metrics`, text exposition format): what was asked, what
//! it cost, what tripped, and how full the server is.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TripLabels {
    pub tenant: String,
    pub model: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLabels {
    pub tenant: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// `header_timeout`, `idle_timeout`, `evicted_idle` or `evicted_slow_head` (closed for a
    /// new client at `max_connections`); for `peer_refused`, `connections` or `requests`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why a worker was recycled: `abnormal` (a run that trapped or failed internally),
    /// `runs` (`recycle_after_runs`), `memory` (`recycle_above_rss`), `tenant` (another
    /// tenant's request needed its place, `worker_affinity = "tenant"`) or `stopped` (its
    /// client went away during a generation).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn bytes_histogram() -> Histogram {
    // 1 MiB to 16 GiB.
    Histogram::new(exponential_buckets((1u64 << 20) as f64, 2.0, 15))
}

/// Every metric, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub limit_trips: Family<TripLabels, Counter>,
    pub fuel_consumed: Family<RunLabels, Counter>,
    pub wall_time: Family<RunLabels, Histogram, fn() -> Histogram>,
    pub queue_wait: Family<RunLabels, Histogram, fn() -> Histogram>,
    pub peak_memory: Family<RunLabels, Histogram, fn() -> Histogram>,
    pub device_bytes: Family<RunLabels, Counter>,
    pub rate_limited: Family<RateLabels, Counter>,
    pub in_flight: Family<ModelLabels, Gauge>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub pool_slots_free: Gauge,
    /// Connections open on the API address (see `max_connections`).
    pub connections_open: Gauge,
    pub device_memory_used: Gauge,
    pub rate_limit_backend_failures: Counter,
    pub drain_cancelled: Counter,
    pub fallbacks: Family<RunLabels, Counter>,
    /// Connections the server closed on its own, by reason.
    pub connections_closed: Family<CloseLabels, Counter>,
    /// Connections and requests refused by the per-peer limits, by which.
    pub peer_refused: Family<CloseLabels, Counter>,
    /// `/readyz` probes that ran the models (the rest answered from the cached result).
    pub readiness_probes: Counter,
    /// Worker places (`isolation = "process"`; a place whose replacement failed is gone).
    pub workers: Gauge,
    /// Workers started: the first ones, replacements and recycled ones.
    pub workers_started: Counter,
    /// Requests lost with their worker (answered 503 `worker_lost`).
    pub workers_lost: Counter,
    /// Workers replaced while alive, by reason.
    pub workers_recycled: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasm_infer");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route, status, tenant and model",
            requests.clone(),
        );
        let limit_trips = Family::default();
        registry.register(
            "limit_trips",
            "Runs stopped by a limit, by kind",
            limit_trips.clone(),
        );
        let fuel_consumed = Family::default();
        registry.register(
            "fuel_consumed",
            "Fuel consumed by runs (successful or not)",
            fuel_consumed.clone(),
        );
        let wall_time = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register("run_wall_seconds", "Wall time of runs", wall_time.clone());
        let queue_wait = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register(
            "queue_wait_seconds",
            "Time requests waited for a run slot",
            queue_wait.clone(),
        );
        let peak_memory = Family::new_with_constructor(bytes_histogram as fn() -> Histogram);
        registry.register(
            "run_peak_memory_bytes",
            "Peak linear memory of runs",
            peak_memory.clone(),
        );
        let device_bytes = Family::default();
        registry.register(
            "run_device_peak_bytes",
            "Sum of runs' device-memory peaks",
            device_bytes.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit (429), by tenant and limit",
            rate_limited.clone(),
        );
        let in_flight = Family::default();
        registry.register("in_flight", "Runs in progress", in_flight.clone());
        let queue_depth = Family::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a run slot",
            queue_depth.clone(),
        );
        let pool_slots_free = Gauge::default();
        registry.register(
            "pool_slots_free",
            "Pooled sandbox slots not in use",
            pool_slots_free.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open on the API address",
            connections_open.clone(),
        );
        let device_memory_used = Gauge::default();
        registry.register(
            "device_memory_used_bytes",
            "Host-wide device memory held by runs",
            device_memory_used.clone(),
        );
        let rate_limit_backend_failures = Counter::default();
        registry.register(
            "rate_limit_backend_failures",
            "Rate-limit backend calls that failed",
            rate_limit_backend_failures.clone(),
        );
        let drain_cancelled = Counter::default();
        registry.register(
            "drain_cancelled",
            "Requests still running when the drain deadline passed",
            drain_cancelled.clone(),
        );
        let fallbacks = Family::default();
        registry.register(
            "fallbacks",
            "Requests answered by a model's fallback",
            fallbacks.clone(),
        );
        let connections_closed = Family::default();
        registry.register(
            "connections_closed",
            "Connections the server closed on its own (header_timeout, idle_timeout, evicted_idle, \
             evicted_slow_head)",
            connections_closed.clone(),
        );
        let peer_refused = Family::default();
        registry.register(
            "peer_refused",
            "Connections (closed unanswered) and requests (429) refused by the per-peer limits",
            peer_refused.clone(),
        );
        let readiness_probes = Counter::default();
        registry.register(
            "readiness_probes",
            "Readiness checks that ran the models (at most one per readiness_interval)",
            readiness_probes.clone(),
        );
        let workers = Gauge::default();
        registry.register(
            "workers",
            "Worker processes the server runs guests in",
            workers.clone(),
        );
        let workers_started = Counter::default();
        registry.register(
            "workers_started",
            "Worker processes started (first ones, replacements, recycled ones)",
            workers_started.clone(),
        );
        let workers_lost = Counter::default();
        registry.register(
            "workers_lost",
            "Requests lost with their worker process",
            workers_lost.clone(),
        );
        let workers_recycled = Family::default();
        registry.register(
            "workers_recycled",
            "Worker processes replaced while alive, by reason: a trap (abnormal), a run count, a memory bound, a tenant switch",
            workers_recycled.clone(),
        );
        Self {
            registry,
            workers,
            workers_started,
            workers_lost,
            workers_recycled,
            requests,
            limit_trips,
            fuel_consumed,
            wall_time,
            queue_wait,
            peak_memory,
            device_bytes,
            rate_limited,
            in_flight,
            queue_depth,
            pool_slots_free,
            connections_open,
            device_memory_used,
            rate_limit_backend_failures,
            drain_cancelled,
            fallbacks,
            connections_closed,
            peer_refused,
            readiness_probes,
        }
    }

    /// Records what a run used.
    pub fn record_run(&self, tenant: &str, model: &str, usage: &crate::Usage) {
        let labels = RunLabels {
            tenant: tenant.to_string(),
            model: model.to_string(),
        };
        self.fuel_consumed
            .get_or_create(&labels)
            .inc_by(usage.fuel_consumed);
        self.wall_time
            .get_or_create(&labels)
            .observe(usage.wall_time.as_secs_f64());
        self.peak_memory
            .get_or_create(&labels)
            .observe(usage.peak_memory_bytes as f64);
        self.device_bytes
            .get_or_create(&labels)
            .inc_by(usage.device_peak_bytes);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
