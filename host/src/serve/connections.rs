//! The API address's edge: the connection limit (an axum [`Listener`] that holds one permit per
//! open connection), the per-peer connection cap ([`super::peers`]), and each connection served
//! by hyper's HTTP/1 with a capped read buffer and a watchdog that closes it when its head is
//! slow or it sits idle ([`serve`]); each request is charged to its client's per-peer rate
//! before the router sees it.
//!
//! At `max_connections`, a new connection is accepted and the **longest-idle** keep-alive
//! connection (no request open, no head being read) is closed for it, so a client is served
//! even when every slot is held by idle connections. When none is idle, the connection whose
//! head has been arriving longest (for a new connection that has sent nothing yet: since it
//! was accepted) is closed instead, once that head is older than
//! `slow_head_eviction` (a client sends a head in one write; one that is still sending after that
//! long is trickling it, and holding a slot others need): a slow-loris spread over many
//! addresses cannot hold every slot for the whole header timeout. When every slot has a
//! request in progress (each bounded by its own timeout) or a head younger than that, the new
//! connection waits until one closes or ages (looked at again every [`EVICT_RETRY`]): the
//! kernel completes the handshake and keeps the rest in the listen backlog. A client at the limit sees latency, not a reset it would have to tell apart from a
//! crash; the file descriptors and per-connection buffers the process holds stay bounded either
//! way (`max_connections`, plus the one accepted connection waiting for a slot).
//!
//! A peer over `max_connections_per_peer` has its new connection closed at once, unanswered
//! and unlogged (counted in `peer_refused`): answering would cost a buffer and a write per
//! refusal, and a client that opens hundreds of connections reads a close as plainly as a 503.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::serve::Listener;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use super::metrics::CloseLabels;
use super::peers::{client_address, PeerConnection, PeerLimited, Peers};
use super::status::ApiError;

/// How often a connection waiting for a slot looks again for one to close.
const EVICT_RETRY: Duration = Duration::from_millis(250);

/// The open connections' activities, for choosing the longest-idle one to close.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        // A map of handles: valid after any panic in another holder.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, activity: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, activity);
        id
    }

    /// Asks the connection idle longest (no request open, no head being read) to close, or
    /// failing that the one whose head began longest ago, if more than `slow_head` ago; false
    /// when there is neither.
    /// One at a time: while a chosen connection has not yet closed (or started a request), no
    /// other is chosen.
    fn evict_one(&self, slow_head: Duration) -> bool {
        let now = Instant::now();
        let open = self.lock();
        if open.values().any(|a| a.evicted.load(Ordering::SeqCst)) {
            return false;
        }
        let candidates = || {
            open.values()
                .map(|a| (*a.lock(), a))
                .filter(|(state, _)| state.open == 0)
        };
        let idle = candidates()
            .filter(|(state, _)| state.is_idle())
            .min_by_key(|(state, _)| state.last);
        let chosen = idle.or_else(|| {
            candidates()
                .filter(|(state, _)| {
                    state
                        .head_since()
                        .is_some_and(|at| now.saturating_duration_since(at) > slow_head)
                })
                .min_by_key(|(state, _)| state.head_since())
        });
        match chosen {
            Some((_, activity)) => {
                activity.evicted.store(true, Ordering::SeqCst);
                activity.changed.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A TCP listener that keeps at most `max` connections open, and at most the per-peer cap
/// from one address.
pub struct Limited {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    open: Gauge,
    peers: Arc<Peers>,
    refused: Counter,
    registry: Arc<Registry>,
    /// How old a head must be to be closed for a new connection when none is idle.
    slow_head: Duration,
    /// A connection accepted and waiting for a slot: kept here, not in the accept future, so
    /// that dropping that future (the serve loop's `select!`) does not close it.
    pending: Option<(TcpStream, SocketAddr, PeerConnection)>,
}

impl Limited {
    /// `listener`, serving at most `max` of its connections at once; `open` counts them,
    /// `refused` the connections closed for their peer's cap; a head arriving for more than
    /// `slow_head` may be closed for a new connection when none is idle.
    pub fn new(
        listener: TcpListener,
        max: u32,
        slow_head: Duration,
        open: Gauge,
        peers: Arc<Peers>,
        refused: Counter,
    ) -> Limited {
        Limited {
            listener,
            permits: Arc::new(Semaphore::new(max as usize)),
            open,
            peers,
            refused,
            registry: Arc::new(Registry::default()),
            slow_head,
            pending: None,
        }
    }
}

impl Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        // Cancel-safe: a connection accepted before a slot is free waits in `pending`.
        while self.pending.is_none() {
            let (io, addr) = Listener::accept(&mut self.listener).await;
            let Some(peer) = self.peers.connect(addr.ip()) else {
                self.refused.inc();
                drop(io);
                continue;
            };
            self.pending = Some((io, addr, peer));
        }
        let permit = loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                break permit;
            }
            self.registry.evict_one(self.slow_head);
            let wait = self.permits.clone().acquire_owned();
            if let Ok(permit) = tokio::time::timeout(EVICT_RETRY, wait).await {
                // The semaphore is never closed.
                break permit.expect("the connection semaphore is never closed");
            }
        };
        let (io, addr, peer) = self.pending.take().expect("set above");
        self.open.inc();
        let activity = Arc::new(Activity::new());
        let id = self.registry.add(activity.clone());
        (
            Counted {
                io,
                _permit: permit,
                _peer: peer,
                open: self.open.clone(),
                activity,
                registry: self.registry.clone(),
                id,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection: its permit and its place in the gauge are given back when hyper
/// drops it; its reads and writes are recorded in its [`Activity`].
pub struct Counted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    _peer: PeerConnection,
    open: Gauge,
    activity: Arc<Activity>,
    registry: Arc<Registry>,
    id: u64,
}

/// Connections closed since the process started (what [`super::memory`] watches).
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// How many accepted connections have been dropped since the process started.
pub fn closed_total() -> u64 {
    CLOSED.load(Ordering::Relaxed)
}

impl Drop for Counted {
    fn drop(&mut self) {
        CLOSED.fetch_add(1, Ordering::Relaxed);
        self.open.dec();
        self.registry.lock().remove(&self.id);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The edge's settings for each connection (from the serve config).
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    /// From a head's first byte to its last.
    pub header_read_timeout: Duration,
    /// No request open and no byte moving.
    pub idle_timeout: Duration,
    /// hyper's read buffer cap: a head that does not fit is 431.
    pub max_read_buffer: usize,
}

/// What a connection's watchdog reads: whether a request is open, when bytes last moved, and
/// when the head being read (if any) began. Updated by the connection's reads and writes and
/// by the service around each request.
pub struct Activity {
    state: Mutex<ActivityState>,
    /// Woken when a head starts or a request ends (the deadline to watch changes), or the
    /// connection is chosen to close for a new one.
    changed: Notify,
    /// Chosen to close for a new connection at `max_connections` (done only while idle).
    evicted: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    /// Requests whose head hyper parsed and whose answer is not yet produced.
    open: usize,
    /// Bytes last read or written (or a request last began or ended).
    last: Instant,
    /// The first byte read while no request was open: a head being read since then.
    head_started: Option<Instant>,
    /// Accepted and nothing read yet: its first head may already wait in the kernel (a busy
    /// runtime may not have polled it), so it is not idle; for closing one at the cap it
    /// counts as a head begun when it was accepted.
    fresh: bool,
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    HeaderTimeout,
    IdleTimeout,
    /// Idle longest when a new connection needed its slot.
    Evicted,
    /// Its head arriving longest, for over `slow_head_eviction`, when a new connection needed its
    /// slot and none was idle.
    EvictedSlowHead,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::HeaderTimeout => "header_timeout",
            Close::IdleTimeout => "idle_timeout",
            Close::Evicted => "evicted_idle",
            Close::EvictedSlowHead => "evicted_slow_head",
        }
    }
}

impl ActivityState {
    /// No request open, no head being read, not new: a keep-alive connection between requests.
    fn is_idle(&self) -> bool {
        self.open == 0 && self.head_started.is_none() && !self.fresh
    }

    /// Since when a head has been arriving (a fresh connection's: since it was accepted).
    fn head_since(&self) -> Option<Instant> {
        self.head_started
            .or_else(|| self.fresh.then_some(self.last))
    }

    /// When the connection is to be closed, and why; `None` while a request is open (its body
    /// has its own timeout, and the answer's writing counts as activity once it is produced).
    fn deadline(&self, edge: &Edge) -> Option<(Instant, Close)> {
        if self.open > 0 {
            return None;
        }
        Some(match self.head_started {
            Some(started) => (started + edge.header_read_timeout, Close::HeaderTimeout),
            None => (self.last + edge.idle_timeout, Close::IdleTimeout),
        })
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                open: 0,
                last: Instant::now(),
                head_started: None,
                fresh: true,
            }),
            changed: Notify::new(),
            evicted: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // Nothing panics while holding it; a poisoned state is still a valid one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) {
        let mut state = self.lock();
        state.last = Instant::now();
        state.fresh = false;
        if state.open == 0 && state.head_started.is_none() {
            state.head_started = Some(state.last);
            drop(state);
            self.changed.notify_one();
        }
    }

    fn wrote(&self) {
        self.lock().last = Instant::now();
    }

    /// A request's head was parsed: it is open until the guard drops (its answer produced).
    fn begin(self: &Arc<Self>) -> RequestOpen {
        let mut state = self.lock();
        state.open += 1;
        state.head_started = None;
        state.fresh = false;
        state.last = Instant::now();
        RequestOpen(self.clone())
    }
}

/// One open request of a connection.
struct RequestOpen(Arc<Activity>);

impl Drop for RequestOpen {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        state.last = Instant::now();
        drop(state);
        self.0.changed.notify_one();
    }
}

/// A connection that can be asked to finish what it started and close.
trait Graceful: std::future::Future {
    /// Finish the request in progress (its answer written out), then close; close at once
    /// when idle.
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves `app` on `listener`'s connections until `shutdown` turns true, then stops accepting,
/// lets each connection finish the answer it is writing (and close), and returns when all have
/// closed. Dropping the returned future drops every connection at once. HTTP/1 only: a client
/// speaking HTTP/2 gets a parse error.
pub async fn serve(
    mut listener: Limited,
    app: Router,
    edge: Edge,
    closed: Family<CloseLabels, Counter>,
    peer_refused: Counter,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let peers = listener.peers.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        // hyper's own timer also runs while a keep-alive connection waits for its next
        // request, which would make the idle timeout the header timeout: the watchdog keeps
        // the two apart.
        .header_read_timeout(None)
        .max_buf_size(edge.max_read_buffer);
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            (io, peer) = listener.accept() => {
                let activity = io.activity.clone();
                let service = {
                    let activity = activity.clone();
                    let app = app.clone();
                    let peers = peers.clone();
                    let peer_refused = peer_refused.clone();
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let open = activity.begin();
                        // Charged before the router: a refusal costs no log line and no
                        // tenant lookup.
                        let refused = peers.limits().requests.and_then(|_| {
                            let limits = peers.limits();
                            let client =
                                client_address(peer.ip(), request.headers(), &limits.trusted_proxies);
                            peers.request(client).err()
                        });
                        let app = app.clone();
                        let request = request.map(axum::body::Body::new);
                        let peer_refused = peer_refused.clone();
                        async move {
                            let answer = match refused {
                                Some(limited) => {
                                    peer_refused.inc();
                                    Ok(peer_limited(limited))
                                }
                                None => app.oneshot(request).await,
                            };
                            drop(open);
                            answer
                        }
                    })
                };
                let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
                let closed = closed.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    if let Some(reason) = watch(connection, &activity, &edge, shutdown).await {
                        tracing::debug!(reason = reason.as_str(), "connection closed");
                        closed
                            .get_or_create(&CloseLabels {
                                reason: reason.as_str().into(),
                            })
                            .inc();
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// 429 for a client past its per-peer rate.
fn peer_limited(limited: PeerLimited) -> axum::response::Response {
    let seconds = super::status::retry_after_seconds(limited.retry_after);
    ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "peer_requests",
        format!("Rate limit reached for this client address; retry after {seconds} s."),
    )
    .code("rate_limit_exceeded")
    .retry_after(limited.retry_after)
    .into_response()
}

/// Returns once `shutdown` is true (never, if its sender is gone without saying so).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drives `connection` until it ends on its own (`None`) or its head or idle deadline passes
/// (the connection is dropped, which closes it, and the reason returned). Once `shutdown` turns
/// true the connection is asked to finish its answer and close.
async fn watch<F: Graceful>(
    connection: F,
    activity: &Activity,
    edge: &Edge,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<Close> {
    tokio::pin!(connection);
    let mut shutting_down = false;
    loop {
        let changed = activity.changed.notified();
        let state = *activity.lock();
        if activity.evicted.load(Ordering::SeqCst) {
            match state.open {
                0 if state.is_idle() => return Some(Close::Evicted),
                0 => return Some(Close::EvictedSlowHead),
                // A request began since it was chosen: it is neither idle nor slow now.
                _ => activity.evicted.store(false, Ordering::SeqCst),
            }
        }
        let deadline = state.deadline(edge);
        let wake = match deadline {
            Some((at, reason)) if at <= Instant::now() => return Some(reason),
            Some((at, _)) => at,
            // A request is open: look again when it ends (or after a while).
            None => Instant::now() + edge.idle_timeout,
        };
        tokio::select! {
            _ = &mut connection => return None,
            () = tokio::time::sleep_until(wake) => {}
            () = changed => {}
            () = stopped(&mut shutdown), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().shut_down();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: Edge = Edge {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_read_buffer: 64 << 10,
    };

    #[test]
    fn a_head_has_the_header_timeout_an_idle_connection_the_idle_timeout_and_a_request_none() {
        let t0 = Instant::now();
        let idle = ActivityState {
            open: 0,
            last: t0,
            head_started: None,
            fresh: false,
        };
        assert_eq!(
            idle.deadline(&EDGE),
            Some((t0 + Duration::from_secs(60), Close::IdleTimeout))
        );
        let head = ActivityState {
            head_started: Some(t0 + Duration::from_secs(5)),
            last: t0 + Duration::from_secs(9),
            ..idle
        };
        // Bytes trickling in do not move the head's deadline.
        assert_eq!(
            head.deadline(&EDGE),
            Some((t0 + Duration::from_secs(15), Close::HeaderTimeout))
        );
        let open = ActivityState { open: 1, ..head };
        assert_eq!(open.deadline(&EDGE), None);
    }
}
