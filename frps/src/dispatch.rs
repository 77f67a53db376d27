//! Waiting for capacity: when every eligible client is at its
//! `--max-concurrency`, a request waits in a FIFO queue per model (bounded
//! by `--queue-max` and `--queue-timeout`) and is served as soon as a slot
//! frees, instead of piling onto one box.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Requests in this queue (changed only under the map's lock, so an
    /// empty queue can be removed without losing a waiter).
    waiting: AtomicUsize,
    /// Slots freed for this queue so far: a woken waiter that cannot use
    /// the slot passes the wake-up on once per freed slot.
    freed: AtomicU64,
}

/// Per-model wait queues. A queue exists only while requests wait in it.
///
/// Waiters in one queue can all use the same slots: requests pinned to a
/// client (`X-Frpx-Client`) wait in a queue of their own per client, and
/// retries (which exclude the clients that failed them) in one of their
/// own per model. A waiter woken for a slot it still cannot use passes the
/// wake-up to the next one.
#[derive(Debug, Default)]
pub struct Queues {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
}

/// A place in a queue; leaving it (on drop) removes the queue when empty.
struct Waiting<'a> {
    queues: &'a Queues,
    key: String,
    queue: Arc<Queue>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queues = self.queues.queues.lock().expect("queues lock");
        if self.queue.waiting.fetch_sub(1, Ordering::AcqRel) == 1
            && queues
                .get(&self.key)
                .is_some_and(|q| Arc::ptr_eq(q, &self.queue))
        {
            queues.remove(&self.key);
        }
    }
}

/// The queue of requests for `model` (`*` for none) pinned to `pinned`, or
/// retrying (`retry`).
fn queue_key(model: &str, pinned: Option<&str>, retry: bool) -> String {
    match (pinned, retry) {
        (Some(id), _) => format!("{model}@{id}"),
        (None, true) => format!("{model}!retry"),
        (None, false) => model.to_owned(),
    }
}

/// The model a queue key is for (what `/metrics` and the API report).
fn model_of_key(key: &str) -> &str {
    key.rsplit_once('@')
        .map(|(m, _)| m)
        .or_else(|| key.strip_suffix("!retry"))
        .unwrap_or(key)
}

impl Queues {
    /// Requests waiting in the queue `key`.
    fn waiting(&self, key: &str) -> usize {
        let queues = self.queues.lock().expect("queues lock");
        queues
            .get(key)
            .map_or(0, |q| q.waiting.load(Ordering::Acquire))
    }

    /// Joins the queue `key` (created if absent), unless `max` already wait.
    fn join(&self, key: String, max: usize) -> Option<Waiting<'_>> {
        let mut queues = self.queues.lock().expect("queues lock");
        let queue = queues.entry(key.clone()).or_default().clone();
        if queue.waiting.load(Ordering::Acquire) >= max {
            if queue.waiting.load(Ordering::Acquire) == 0 {
                queues.remove(&key);
            }
            return None;
        }
        queue.waiting.fetch_add(1, Ordering::AcqRel);
        Some(Waiting {
            queues: self,
            key,
            queue,
        })
    }

    /// A slot on `client` freed: wake the first waiter of each queue that
    /// can use it.
    pub fn slot_freed(&self, client: &ClientHandle) {
        let queues = self.queues.lock().expect("queues lock");
        if queues.is_empty() {
            return;
        }
        let wake = |model: &str| {
            for key in [
                queue_key(model, None, false),
                queue_key(model, None, true),
                queue_key(model, Some(&client.id), false),
            ] {
                if let Some(q) = queues.get(&key) {
                    q.freed.fetch_add(1, Ordering::AcqRel);
                    q.notify.notify_one();
                }
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
        let mut by_model: HashMap<String, usize> = HashMap::new();
        for (k, q) in self.queues.lock().expect("queues lock").iter() {
            *by_model.entry(model_of_key(k).to_owned()).or_default() +=
                q.waiting.load(Ordering::Relaxed);
        }
        let mut d: Vec<_> = by_model.into_iter().collect();
        d.sort();
        d
    }

    /// Requests waiting in all queues.
    pub fn total(&self) -> usize {
        self.depths().iter().map(|(_, n)| n).sum()
    }

    /// Number of queues (each has at least one request waiting).
    pub fn len(&self) -> usize {
        self.queues.lock().expect("queues lock").len()
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
/// every eligible client is at capacity. A queue is made only then: for a
/// model some online client serves (never for any name a caller sends).
pub async fn acquire(state: &State, want: Want<'_>) -> Result<Dispatched, Refusal> {
    let balance = state.config.balance;
    let model = want.model.map(normalize).unwrap_or(ANY.into());
    let key = queue_key(&model, want.pinned, !want.exclude.is_empty());
    let pick = || router::pick(&state.registry, balance, want);
    // Arrivals queue behind earlier waiters, so the queue is served in
    // order; when it is full, one that a free slot fits right now takes it.
    if state.queues.waiting(&key) == 0 || state.queues.waiting(&key) >= state.config.queue_max {
        match pick() {
            Ok(client) => {
                return Ok(Dispatched {
                    client,
                    queued: false,
                });
            }
            Err(no) => refusal(no)?,
        }
    }
    let Some(place) = state.queues.join(key, state.config.queue_max) else {
        return Err(Refusal::QueueFull);
    };
    let queue = place.queue.clone();
    let deadline = Instant::now() + state.config.queue_timeout;
    let mut woken = false;
    let mut passed_on = None;
    loop {
        let notified = queue.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match pick() {
            Ok(client) => {
                return Ok(Dispatched {
                    client,
                    queued: true,
                });
            }
            Err(no) => refusal(no)?,
        }
        // Woken for a slot this request cannot use (another client's, or
        // one it excludes): the next waiter may. Once per freed slot, so
        // waiters that cannot use it do not wake each other forever.
        let freed = queue.freed.load(Ordering::Acquire);
        if woken && passed_on != Some(freed) {
            passed_on = Some(freed);
            queue.notify.notify_one();
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(Refusal::QueueTimeout);
        }
        woken = true;
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
