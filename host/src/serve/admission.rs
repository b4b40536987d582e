//! Backpressure per model: at most `concurrency` runs at once and at most `queue` requests
//! waiting behind them. A request that finds the queue full is refused at once (503 with
//! Retry-After) instead of waiting without bound; one that waits longer than its deadline
//! gives up (503 too).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A model's run slots and waiting line.
pub struct Queue {
    permits: Arc<Semaphore>,
    concurrency: usize,
    capacity: usize,
    waiting: AtomicUsize,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `capacity` requests were already waiting.
    Full,
    /// No slot came free within the deadline.
    TimedOut,
}

/// A run slot, held until dropped, and how long it took to get.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    pub waited: Duration,
}

impl Queue {
    pub fn new(concurrency: u32, capacity: u32) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency: concurrency as usize,
            capacity: capacity as usize,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Runs holding a slot now.
    pub fn running(&self) -> usize {
        self.concurrency - self.permits.available_permits()
    }

    /// A slot now, or after waiting at most `deadline` in a queue that has room.
    pub async fn acquire(&self, deadline: Duration) -> Result<Slot, Refused> {
        let start = Instant::now();
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(Slot {
                _permit: permit,
                waited: Duration::ZERO,
            });
        }
        // Take a place in the line, or refuse if there is none.
        let mut current = self.waiting.load(Ordering::SeqCst);
        loop {
            if current >= self.capacity {
                return Err(Refused::Full);
            }
            match self.waiting.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _place = Leave(&self.waiting);
        match tokio::time::timeout(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot {
                _permit: permit,
                waited: start.elapsed(),
            }),
            // The semaphore is never closed; a timeout is the only way out.
            _ => Err(Refused::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_freed_slot_admits_the_next() {
        let queue = Arc::new(Queue::new(1, 1));
        let first = queue.acquire(Duration::from_secs(10)).await.unwrap();
        assert_eq!(first.waited, Duration::ZERO);
        assert_eq!(queue.running(), 1);
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.acquire(Duration::from_secs(10)).await.is_ok() })
        };
        while queue.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queue.acquire(Duration::from_secs(10)).await.err(),
            Some(Refused::Full)
        );
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_gives_up_and_leaves_the_line() {
        let queue = Queue::new(1, 4);
        let _held = queue.acquire(Duration::ZERO).await.unwrap();
        assert_eq!(
            queue.acquire(Duration::from_millis(5)).await.err(),
            Some(Refused::TimedOut)
        );
        assert_eq!(queue.waiting(), 0);
    }
}
