//! Backpressure per model: at most `concurrency` runs at once and at most `queue` requests
//! waiting behind them. A request that finds the queue full is refused at once (503 with
//! Retry-After) instead of waiting without bound; one that waits longer than its deadline
//! gives up (503 too).
//!
//! The line is fair across tenants, not first-come: a freed slot goes to the waiting tenant
//! that runs the fewest slots of this model now, among those to the one served least recently,
//! and within a tenant to its oldest request. A tenant with sixteen connections therefore gets
//! a slot in turn with each tenant that has one, not sixteen times as many, and no tenant waits
//! behind more than one run of each other tenant. When the line is full, a newcomer takes the
//! place of the newest waiter of the tenant holding the most places (if that tenant holds at
//! least two more than the newcomer's tenant), so one tenant cannot fill the line either. How
//! long a tenant holds its slots is bounded by its limits (wall time, fuel) and its fuel quota.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A model's run slots and waiting line.
pub struct Queue {
    line: Arc<Mutex<Line>>,
    #[cfg(test)]
    concurrency: usize,
    capacity: usize,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `capacity` requests were already waiting (or this one's place went to another tenant's).
    Full,
    /// No slot came free within the deadline.
    TimedOut,
}

/// A run slot, held until dropped, and how long it took to get.
pub struct Slot {
    line: Arc<Mutex<Line>>,
    tenant: Arc<str>,
    pub waited: Duration,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.line).release(&self.tenant);
    }
}

/// The slots' state, behind one lock (never held across an await).
struct Line {
    free: usize,
    /// Slots held per tenant (absent: none).
    running: HashMap<Arc<str>, usize>,
    /// When each tenant was last given a slot (a grant counter).
    served: HashMap<Arc<str>, u64>,
    grants: u64,
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    tenant: Arc<str>,
    /// `true`: a slot is this waiter's (counted in `running`); `false`: its place was taken.
    answer: oneshot::Sender<bool>,
}

fn lock(line: &Mutex<Line>) -> std::sync::MutexGuard<'_, Line> {
    // Nothing panics while holding it; a poisoned state is still a valid one.
    line.lock().unwrap_or_else(|p| p.into_inner())
}

impl Line {
    fn take(&mut self, tenant: &Arc<str>) {
        *self.running.entry(tenant.clone()).or_default() += 1;
        self.grants += 1;
        self.served.insert(tenant.clone(), self.grants);
    }

    /// `tenant` gives a slot back: it goes to the next waiter, or becomes free.
    fn release(&mut self, tenant: &str) {
        self.release_count(tenant);
        while let Some(i) = self.next_waiter() {
            let waiter = self.waiters.remove(i).expect("an index of the line");
            self.take(&waiter.tenant);
            if waiter.answer.send(true).is_ok() {
                return;
            }
            // Its request is gone (cannot happen: a waiter leaves the line under this lock
            // before it goes); the slot goes to the next.
            self.release_count(&waiter.tenant);
        }
        self.free += 1;
    }

    fn release_count(&mut self, tenant: &str) {
        if let Some(n) = self.running.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(tenant);
            }
        }
    }

    /// The waiter whose tenant runs the fewest slots, then was served least recently, then
    /// came first.
    fn next_waiter(&self) -> Option<usize> {
        self.waiters
            .iter()
            .enumerate()
            .min_by_key(|(i, w)| {
                (
                    self.running.get(&w.tenant).copied().unwrap_or(0),
                    self.served.get(&w.tenant).copied().unwrap_or(0),
                    *i,
                )
            })
            .map(|(i, _)| i)
    }

    /// Makes room in a full line for `tenant`: the newest waiter of the tenant holding the most
    /// places is refused, if that tenant holds at least two more than `tenant`.
    fn evict_for(&mut self, tenant: &str) -> bool {
        let mut places: HashMap<&str, usize> = HashMap::new();
        for w in &self.waiters {
            *places.entry(&w.tenant).or_default() += 1;
        }
        let mine = places.get(tenant).copied().unwrap_or(0);
        let Some((heaviest, most)) = places.into_iter().max_by_key(|(_, n)| *n) else {
            return false;
        };
        if most < mine + 2 {
            return false;
        }
        let heaviest: Arc<str> = heaviest.into();
        let i = self
            .waiters
            .iter()
            .rposition(|w| w.tenant == heaviest)
            .expect("the heaviest tenant waits");
        let evicted = self.waiters.remove(i).expect("an index of the line");
        let _ = evicted.answer.send(false);
        true
    }
}

impl Queue {
    pub fn new(concurrency: u32, capacity: u32) -> Self {
        Self {
            line: Arc::new(Mutex::new(Line {
                free: concurrency as usize,
                running: HashMap::new(),
                served: HashMap::new(),
                grants: 0,
                waiters: VecDeque::new(),
                next_id: 0,
            })),
            #[cfg(test)]
            concurrency: concurrency as usize,
            capacity: capacity as usize,
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        lock(&self.line).waiters.len()
    }

    /// Runs holding a slot now.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.concurrency - lock(&self.line).free
    }

    /// A slot for `tenant` now, or after waiting at most `deadline` in a line that has room.
    pub async fn acquire(&self, tenant: &str, deadline: Duration) -> Result<Slot, Refused> {
        let start = Instant::now();
        let tenant: Arc<str> = tenant.into();
        let slot = |waited| Slot {
            line: self.line.clone(),
            tenant: tenant.clone(),
            waited,
        };
        let (id, answer) = {
            let mut line = lock(&self.line);
            if line.free > 0 {
                line.free -= 1;
                line.take(&tenant);
                return Ok(slot(Duration::ZERO));
            }
            if line.waiters.len() >= self.capacity && !line.evict_for(&tenant) {
                return Err(Refused::Full);
            }
            let (send, answer) = oneshot::channel();
            let id = line.next_id;
            line.next_id += 1;
            line.waiters.push_back(Waiter {
                id,
                tenant: tenant.clone(),
                answer: send,
            });
            (id, answer)
        };
        /// A place in the line: left (or its slot given back) if the request goes first.
        struct Place<'a> {
            line: &'a Mutex<Line>,
            id: u64,
            tenant: &'a str,
            answer: oneshot::Receiver<bool>,
            done: bool,
        }
        impl Drop for Place<'_> {
            fn drop(&mut self) {
                if self.done {
                    return;
                }
                let mut line = lock(self.line);
                if let Some(i) = line.waiters.iter().position(|w| w.id == self.id) {
                    line.waiters.remove(i);
                } else if let Ok(true) = self.answer.try_recv() {
                    // Granted as it gave up: the slot goes on to the next.
                    line.release(self.tenant);
                }
            }
        }
        let mut place = Place {
            line: &self.line,
            id,
            tenant: &tenant,
            answer,
            done: false,
        };
        let answered = tokio::time::timeout(deadline, &mut place.answer).await;
        match answered {
            Ok(Ok(true)) => {
                place.done = true;
                drop(place);
                Ok(slot(start.elapsed()))
            }
            Ok(_) => {
                place.done = true;
                Err(Refused::Full)
            }
            Err(_) => Err(Refused::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_freed_slot_admits_the_next() {
        let queue = Arc::new(Queue::new(1, 1));
        let first = queue.acquire("a", Duration::from_secs(10)).await.unwrap();
        assert_eq!(first.waited, Duration::ZERO);
        assert_eq!(queue.running(), 1);
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.acquire("a", Duration::from_secs(10)).await.is_ok() })
        };
        while queue.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queue.acquire("a", Duration::from_secs(10)).await.err(),
            Some(Refused::Full)
        );
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(queue.waiting(), 0);
    }

    /// Starts `tenant`'s request for a slot of `queue` (which has none free), recording
    /// `tenant` in `order` when it gets one and then giving the slot back; returns once the
    /// request waits in the line.
    async fn wait_in_line(
        queue: &Arc<Queue>,
        tenant: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<(), Refused>> {
        let before = queue.waiting();
        let handle = {
            let (queue, order) = (queue.clone(), order.clone());
            tokio::spawn(async move {
                let slot = queue.acquire(tenant, Duration::from_secs(10)).await?;
                order.lock().unwrap().push(tenant);
                drop(slot);
                Ok(())
            })
        };
        while queue.waiting() == before {
            tokio::task::yield_now().await;
        }
        handle
    }

    #[tokio::test]
    async fn a_freed_slot_goes_round_the_waiting_tenants_not_first_come() {
        let queue = Arc::new(Queue::new(1, 32));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = queue.acquire("a", Duration::ZERO).await.unwrap();
        let mut waiting = Vec::new();
        // Tenant a queues eight requests before b and c queue one each.
        for _ in 0..8 {
            waiting.push(wait_in_line(&queue, "a", &order).await);
        }
        waiting.push(wait_in_line(&queue, "b", &order).await);
        waiting.push(wait_in_line(&queue, "c", &order).await);
        assert_eq!(queue.waiting(), 10);
        drop(held);
        for handle in waiting {
            assert_eq!(handle.await.unwrap(), Ok(()));
        }
        // First come would be a (8 times), b, c: b and c are served after one run of a's.
        assert_eq!(
            *order.lock().unwrap(),
            ["b", "c", "a", "a", "a", "a", "a", "a", "a", "a"]
        );
        assert_eq!((queue.running(), queue.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_line_gives_the_newest_place_of_the_tenant_holding_most_to_a_newcomer() {
        let queue = Arc::new(Queue::new(1, 4));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = queue.acquire("a", Duration::ZERO).await.unwrap();
        let mut a = Vec::new();
        for _ in 0..4 {
            a.push(wait_in_line(&queue, "a", &order).await);
        }
        // Full, and a newcomer of a's own is refused at once.
        assert_eq!(
            queue.acquire("a", Duration::from_secs(10)).await.err(),
            Some(Refused::Full)
        );
        // b takes the place of a's newest request, which is refused.
        let b = {
            let (queue, order) = (queue.clone(), order.clone());
            tokio::spawn(async move {
                let slot = queue.acquire("b", Duration::from_secs(10)).await?;
                order.lock().unwrap().push("b");
                drop(slot);
                Ok::<(), Refused>(())
            })
        };
        let newest = a.pop().unwrap();
        assert_eq!(newest.await.unwrap(), Err(Refused::Full));
        assert_eq!(queue.waiting(), 4);
        drop(held);
        assert_eq!(b.await.unwrap(), Ok(()));
        for handle in a {
            assert_eq!(handle.await.unwrap(), Ok(()));
        }
        assert_eq!(*order.lock().unwrap(), ["b", "a", "a", "a"]);
    }

    #[tokio::test]
    async fn a_slot_granted_to_a_request_that_gave_up_goes_to_the_next() {
        let queue = Arc::new(Queue::new(1, 4));
        let held = queue.acquire("a", Duration::ZERO).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // b's request is dropped while waiting; c's then gets the slot.
        let b = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.acquire("b", Duration::from_secs(10)).await.is_ok() })
        };
        while queue.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let c = wait_in_line(&queue, "c", &order).await;
        b.abort();
        let _ = b.await;
        assert_eq!(queue.waiting(), 1);
        drop(held);
        assert_eq!(c.await.unwrap(), Ok(()));
        assert_eq!(*order.lock().unwrap(), ["c"]);
        assert_eq!((queue.running(), queue.waiting()), (0, 0));
    }

    /// Closed-loop clients on a model with `slots` slots: `connections[t]` clients of tenant
    /// `t`, each asking for a slot again as soon as its run (`RUN_STEPS` scheduler turns) ends,
    /// until `runs` runs have been granted. Returns each tenant's runs and the median wait of
    /// tenant 1's runs (in runs granted while it waited). `fifo` uses a first-come semaphore,
    /// what the queue was before it was fair.
    async fn closed_loop(
        fifo: bool,
        slots: u32,
        connections: &[usize],
        runs: usize,
    ) -> (Vec<usize>, usize) {
        const RUN_STEPS: usize = 3;
        let queue = Arc::new(Queue::new(slots, 1024));
        let semaphore = Arc::new(tokio::sync::Semaphore::new(slots as usize));
        let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut clients = tokio::task::JoinSet::new();
        for (tenant, &n) in connections.iter().enumerate() {
            for _ in 0..n {
                let (queue, semaphore, granted, log) = (
                    queue.clone(),
                    semaphore.clone(),
                    granted.clone(),
                    log.clone(),
                );
                let name: &'static str = ["t0", "t1", "t2", "t3", "t4", "t5"][tenant];
                clients.spawn(async move {
                    loop {
                        let asked = granted.load(std::sync::atomic::Ordering::SeqCst);
                        let (slot, permit) = if fifo {
                            (None, Some(semaphore.clone().acquire_owned().await.unwrap()))
                        } else {
                            let slot = queue.acquire(name, Duration::from_secs(60)).await;
                            (Some(slot.unwrap()), None)
                        };
                        let n = granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n >= runs {
                            return;
                        }
                        log.lock().unwrap().push((tenant, n - asked));
                        for _ in 0..RUN_STEPS {
                            tokio::task::yield_now().await;
                        }
                        drop((slot, permit));
                    }
                });
            }
        }
        while clients.join_next().await.is_some() {}
        let log = log.lock().unwrap();
        let mut per_tenant = vec![0; connections.len()];
        for (tenant, _) in log.iter() {
            per_tenant[*tenant] += 1;
        }
        let mut waits: Vec<usize> = log
            .iter()
            .filter(|(t, _)| *t == 1)
            .map(|(_, w)| *w)
            .collect();
        waits.sort_unstable();
        (per_tenant, waits.get(waits.len() / 2).copied().unwrap_or(0))
    }

    #[tokio::test]
    async fn one_tenant_with_sixteen_connections_gets_a_fair_share_not_sixteen_times() {
        // Tenant 0 has 16 connections, tenants 1 to 4 one each; 4 slots; 1,000 runs.
        let connections = [16, 1, 1, 1, 1];
        let (before, before_wait) = closed_loop(true, 4, &connections, 1000).await;
        let (after, after_wait) = closed_loop(false, 4, &connections, 1000).await;
        eprintln!("first come: runs {before:?}, tenant 1's median wait {before_wait} runs");
        eprintln!("fair:       runs {after:?}, tenant 1's median wait {after_wait} runs");
        // First come: runs in proportion to connections (16 : 1).
        assert_eq!(before, [800, 50, 50, 50, 50]);
        // Fair: tenant 0 gets no more than the most any one-connection tenant gets (a tenant
        // with one client is not always waiting: its next request comes after its run), and
        // each of those at least twice its first-come share (measured: [252, 125, 249, 249,
        // 125], median wait 19 runs before, 4 after).
        let most_of_the_others = *after[1..].iter().max().unwrap();
        assert!(after[0] <= most_of_the_others + 10, "{after:?}");
        assert!(after[1..].iter().all(|&runs| runs >= 100), "{after:?}");
        assert!(
            after_wait * 2 < before_wait,
            "{after_wait} vs {before_wait}"
        );
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_gives_up_and_leaves_the_line() {
        let queue = Queue::new(1, 4);
        let _held = queue.acquire("a", Duration::ZERO).await.unwrap();
        assert_eq!(
            queue.acquire("a", Duration::from_millis(5)).await.err(),
            Some(Refused::TimedOut)
        );
        assert_eq!(queue.waiting(), 0);
    }
}
