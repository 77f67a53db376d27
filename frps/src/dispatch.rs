//! Waiting for capacity: when every eligible client is at its
//! `--max-concurrency`, a request waits in a FIFO queue per model (bounded
//! by `--queue-max` and `--queue-timeout`) and is served as soon as a slot
//! frees, instead of piling onto one box.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::registry::ClientHandle;
use crate::router::{self, NoPick, Want, normalize};
use crate::state::State;

/// Queue key of requests that name no model.
const ANY: &str = "*";

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No client online (or the pinned one is not).
    NoneOnline,
    /// No online client serves the model.
    NoModel,
    /// Eligible clients exist, none can be tried (all failed this request
    /// or are cooling down).
    Unavailable,
    /// The model's queue is full.
    QueueFull,
    /// Waited `--queue-timeout` without a free slot.
    QueueTimeout,
}

#[derive(Debug, Default)]
struct Queue {
    notify: Notify,
    waiting: AtomicUsize,
}

/// Per-model wait queues.
#[derive(Debug, Default)]
pub struct Queues {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
}

struct Waiting<'a>(&'a Queue);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Queues {
    fn queue(&self, key: &str) -> Arc<Queue> {
        self.queues
            .lock()
            .expect("queues lock")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    /// A slot on `client` freed: wake the first waiter of each model it serves.
    pub fn slot_freed(&self, client: &ClientHandle) {
        let queues = self.queues.lock().expect("queues lock");
        if queues.is_empty() {
            return;
        }
        let wake = |key: &str| {
            if let Some(q) = queues.get(key)
                && q.waiting.load(Ordering::Acquire) > 0
            {
                q.notify.notify_one();
            }
        };
        wake(ANY);
        client.with_models(|models| {
            for m in models {
                wake(&normalize(&m.name));
            }
        });
    }

    /// Capacity appeared (a client registered or recovered): let every
    /// waiter look again.
    pub fn wake_all(&self) {
        for q in self.queues.lock().expect("queues lock").values() {
            q.notify.notify_waiters();
        }
    }

    /// Requests waiting, per model (`*` for requests naming none).
    pub fn depths(&self) -> Vec<(String, usize)> {
        let mut d: Vec<_> = self
            .queues
            .lock()
            .expect("queues lock")
            .iter()
            .map(|(k, q)| (k.clone(), q.waiting.load(Ordering::Relaxed)))
            .collect();
        d.sort();
        d
    }

    /// Requests waiting in all queues.
    pub fn total(&self) -> usize {
        self.depths().iter().map(|(_, n)| n).sum()
    }
}

/// A client with a slot reserved for one request.
#[derive(Debug)]
pub struct Dispatched {
    /// The client chosen.
    pub client: Arc<ClientHandle>,
    /// Whether the request waited in a queue for it (time the gateway
    /// overhead measure counts as waiting, not as frps's own work).
    pub queued: bool,
}

/// Reserves a slot on a client for `want`, waiting in the model's queue when
/// every eligible client is at capacity.
pub async fn acquire(state: &State, want: Want<'_>) -> Result<Dispatched, Refusal> {
    let balance = state.config.balance;
    let key = want.model.map(normalize).unwrap_or(ANY.into());
    let queue = state.queues.queue(&key);
    // Arrivals queue behind earlier waiters, so the queue is served in order.
    if queue.waiting.load(Ordering::Acquire) == 0 {
        match router::pick(&state.registry, balance, want) {
            Ok(client) => {
                return Ok(Dispatched {
                    client,
                    queued: false,
                });
            }
            Err(no) => refusal(no)?,
        }
    }
    if queue.waiting.load(Ordering::Acquire) >= state.config.queue_max {
        return Err(Refusal::QueueFull);
    }
    queue.waiting.fetch_add(1, Ordering::AcqRel);
    let _waiting = Waiting(&queue);
    let deadline = Instant::now() + state.config.queue_timeout;
    loop {
        let notified = queue.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match router::pick(&state.registry, balance, want) {
            Ok(client) => {
                return Ok(Dispatched {
                    client,
                    queued: true,
                });
            }
            Err(no) => refusal(no)?,
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(Refusal::QueueTimeout);
        }
    }
}

/// `Ok` when the request should wait for capacity, else the refusal.
fn refusal(no: NoPick) -> Result<(), Refusal> {
    match no {
        NoPick::NoneOnline => Err(Refusal::NoneOnline),
        NoPick::NoModel => Err(Refusal::NoModel),
        NoPick::Unavailable => Err(Refusal::Unavailable),
        NoPick::AtCapacity => Ok(()),
    }
}

/// `Retry-After` for a queue refusal, in whole seconds.
pub fn retry_after(queue_timeout: Duration) -> u64 {
    queue_timeout.as_secs().clamp(1, 60)
}
