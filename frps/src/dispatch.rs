//! Waiting for capacity: when every eligible client is at its
//! `--max-concurrency`, a request waits in a FIFO queue per model (bounded
//! by `--queue-max` and `--queue-timeout`) and is served as soon as a slot
//! frees, instead of piling onto one box.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::registry::ClientHandle;
use crate::router::{self, NoPick, Want, normalize};
use crate::state::State;

/// The queue depth label of requests that name no model.
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
    /// Requests waiting in queues hold [`QUEUED_BODIES_SHARE`] of
    /// `--max-buffered-bodies` already: this one's body would pass it.
    QueuedBodies,
}

/// The part of `--max-buffered-bodies` that bodies of requests waiting in
/// queues may hold, together (a half): one model's backlog of large bodies
/// must not leave every other request, for idle boxes too, without room to
/// read its body.
pub const QUEUED_BODIES_SHARE: usize = 2;

#[derive(Debug, Default)]
struct Queue {
    /// The waiters in arrival order, each woken through its own `Notify`
    /// (which keeps a wake-up that comes while its waiter is busy picking).
    /// Only the first picks a slot: a waiter keeps its place when a slot it
    /// was woken for went elsewhere, and an arrival never takes a slot
    /// ahead of the waiters before it.
    line: Mutex<VecDeque<Arc<Notify>>>,
    /// Requests in this queue (changed only under the map's lock, so an
    /// empty queue can be removed without losing a waiter).
    waiting: AtomicUsize,
    /// Slots freed for this queue so far: a woken waiter that cannot use
    /// the slot passes the wake-up on once per freed slot.
    freed: AtomicU64,
}

impl Queue {
    /// Wakes the first waiter.
    fn wake_first(&self) {
        if let Some(first) = self.line.lock().expect("line lock").front() {
            first.notify_one();
        }
    }

    /// Wakes the waiter right after `me`.
    fn wake_after(&self, me: &Arc<Notify>) {
        let line = self.line.lock().expect("line lock");
        if let Some(at) = place_of(&line, me)
            && let Some(next) = line.get(at + 1)
        {
            next.notify_one();
        }
    }

    /// Takes `me` out of the line and wakes the waiter that came after it.
    fn leave(&self, me: &Arc<Notify>) {
        let mut line = self.line.lock().expect("line lock");
        if let Some(at) = place_of(&line, me) {
            line.remove(at);
            if let Some(next) = line.get(at) {
                next.notify_one();
            }
        }
    }

    /// Whether `me` is the first waiter.
    fn is_first(&self, me: &Arc<Notify>) -> bool {
        self.line
            .lock()
            .expect("line lock")
            .front()
            .is_some_and(|w| Arc::ptr_eq(w, me))
    }
}

/// Where `me` stands in `line`.
fn place_of(line: &VecDeque<Arc<Notify>>, me: &Arc<Notify>) -> Option<usize> {
    line.iter().position(|w| Arc::ptr_eq(w, me))
}

/// Per-model wait queues. A queue exists only while requests wait in it.
///
/// Waiters in one queue can all use the same slots: requests pinned to a
/// client (`X-Frpx-Client`) wait in a queue of their own per client, and
/// retries (which exclude the clients that failed them) in one of their
/// own per model. In a retry queue a waiter woken for a slot it cannot use
/// passes the wake-up to the next one.
#[derive(Debug, Default)]
pub struct Queues {
    queues: Mutex<HashMap<QueueKey, Arc<Queue>>>,
    /// Bytes of the bodies of the requests waiting in them.
    held: AtomicUsize,
}

/// A waiting request's body, counted in [`Queues::held`] until it leaves.
struct HeldBody<'a> {
    queues: &'a Queues,
    bytes: usize,
}

impl Drop for HeldBody<'_> {
    fn drop(&mut self) {
        self.queues.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Which requests a queue holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueueKey {
    /// The model as the requests name it, trimmed (`None` for requests
    /// naming none): not normalised, as boxes listing a model without a tag
    /// take only its exact name ([`router::listed_serves`]), so `m` and
    /// `m:latest` may wait for different boxes.
    model: Option<String>,
    /// The client the requests are pinned to.
    pinned: Option<String>,
    /// Retries: each excludes the clients that failed it.
    retry: bool,
}

impl QueueKey {
    fn new(model: Option<&str>, pinned: Option<&str>, retry: bool) -> Self {
        QueueKey {
            model: model.map(str::to_owned),
            pinned: pinned.map(str::to_owned),
            // A pinned request that failed on its client is not queued again.
            retry: retry && pinned.is_none(),
        }
    }
}

/// A place in a queue; leaving it (on drop) wakes the waiter after it (the
/// new first one, when it was first: a slot may still be free, or the
/// wake-up it took was meant for the line), and removes the queue when
/// empty.
struct Waiting<'a> {
    queues: &'a Queues,
    key: QueueKey,
    queue: Arc<Queue>,
    me: Arc<Notify>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queues = self.queues.queues.lock().expect("queues lock");
        self.queue.leave(&self.me);
        if self.queue.waiting.fetch_sub(1, Ordering::AcqRel) == 1
            && queues
                .get(&self.key)
                .is_some_and(|q| Arc::ptr_eq(q, &self.queue))
        {
            queues.remove(&self.key);
        }
    }
}

impl Queues {
    /// Counts `bytes` of a request's body as waiting, unless the bodies
    /// waiting would then hold over `max`.
    fn hold(&self, bytes: usize, max: usize) -> Option<HeldBody<'_>> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= max)
            })
            .ok()?;
        Some(HeldBody {
            queues: self,
            bytes,
        })
    }

    /// Bytes of the bodies of requests waiting in queues.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Requests waiting in the queue `key`.
    fn waiting(&self, key: &QueueKey) -> usize {
        let queues = self.queues.lock().expect("queues lock");
        queues
            .get(key)
            .map_or(0, |q| q.waiting.load(Ordering::Acquire))
    }

    /// Joins the queue `key` (created if absent), unless `max` already wait.
    fn join(&self, key: QueueKey, max: usize) -> Option<Waiting<'_>> {
        let mut queues = self.queues.lock().expect("queues lock");
        let queue = queues.entry(key.clone()).or_default().clone();
        if queue.waiting.load(Ordering::Acquire) >= max {
            if queue.waiting.load(Ordering::Acquire) == 0 {
                queues.remove(&key);
            }
            return None;
        }
        queue.waiting.fetch_add(1, Ordering::AcqRel);
        let me = Arc::new(Notify::new());
        queue.line.lock().expect("line lock").push_back(me.clone());
        Some(Waiting {
            queues: self,
            key,
            queue,
            me,
        })
    }

    /// A slot on `client` freed: wake the first waiter of each queue that
    /// can use it (requests naming no model or one the client serves, not
    /// pinned to another client). Allocates nothing under the lock.
    pub fn slot_freed(&self, client: &ClientHandle) {
        let queues = self.queues.lock().expect("queues lock");
        if queues.is_empty() {
            return;
        }
        client.with_models(|models| {
            for (key, q) in queues.iter() {
                if key.pinned.as_deref().is_some_and(|id| id != client.id) {
                    continue;
                }
                let serves =
                    |want: &str| models.iter().any(|m| router::listed_serves(&m.name, want));
                if key.model.as_deref().is_none_or(serves) {
                    q.freed.fetch_add(1, Ordering::AcqRel);
                    q.wake_first();
                }
            }
        });
    }

    /// Capacity appeared (a client registered or recovered): the first
    /// waiter of every queue looks again (and, having taken a slot, wakes
    /// the next, so the line takes what there is in order).
    pub fn wake_all(&self) {
        for q in self.queues.lock().expect("queues lock").values() {
            // As for a freed slot: a retry that cannot use it passes the
            // wake-up on once more.
            q.freed.fetch_add(1, Ordering::AcqRel);
            q.wake_first();
        }
    }

    /// Requests waiting, per model (`*` for requests naming none).
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.depths_named(|named| normalize(named).into_owned())
    }

    /// [`Self::depths`], each model named by `name` (from the name queued
    /// for; called with no lock held).
    pub fn depths_named(&self, name: impl Fn(&str) -> String) -> Vec<(String, usize)> {
        let waiting: Vec<(Option<String>, usize)> = self
            .queues
            .lock()
            .expect("queues lock")
            .iter()
            .map(|(k, q)| (k.model.clone(), q.waiting.load(Ordering::Relaxed)))
            .collect();
        let mut by_model: HashMap<String, usize> = HashMap::new();
        for (model, n) in waiting {
            // One series per model however it was spelled.
            let model = match model.as_deref() {
                None => ANY.to_owned(),
                Some(named) => name(named),
            };
            *by_model.entry(model).or_default() += n;
        }
        let mut d: Vec<_> = by_model.into_iter().collect();
        d.sort();
        d
    }

    /// [`Self::depths`], each model named as a box online lists it (as
    /// `frpx_requests_total` names it: `mistral` for vLLM's `mistral`, not
    /// `mistral:latest`), or normalized when none does any more.
    pub fn depths_listed(&self, registry: &crate::registry::Registry) -> Vec<(String, usize)> {
        let online = registry.online();
        self.depths_named(|named| {
            online
                .iter()
                .find_map(|c| crate::router::listed_name(c, named))
                .unwrap_or_else(|| normalize(named).into_owned())
        })
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
    acquire_holding(state, want, 0).await
}

/// [`acquire`] for a request holding a body of `body` bytes read whole:
/// it waits in a queue only while the bodies waiting, its own with them,
/// hold at most [`QUEUED_BODIES_SHARE`] of `--max-buffered-bodies`
/// ([`Refusal::QueuedBodies`] otherwise).
pub async fn acquire_holding(
    state: &State,
    want: Want<'_>,
    body: usize,
) -> Result<Dispatched, Refusal> {
    let balance = state.config.balance;
    let key = QueueKey::new(
        want.model.map(str::trim),
        want.pinned,
        !want.exclude.is_empty(),
    );
    let pick = || router::pick(&state.registry, balance, want);
    // Arrivals queue behind earlier waiters, so the queue is served in
    // order; when it is full, one that a free slot fits right now takes it.
    // A retry looks first whatever the line: the retries before it each
    // exclude their own failed clients, so a slot free for this one may be
    // one none of them can use (and no wake-up will come for it). So does a
    // pinned request that failed on its client: it is refused at once, not
    // after the line before it.
    let excludes = !want.exclude.is_empty();
    let waiting = state.queues.waiting(&key);
    if waiting == 0 || excludes || waiting >= state.config.queue_max {
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
    let share = state.config.max_buffered_bodies / QUEUED_BODIES_SHARE;
    let Some(_held) = state.queues.hold(body, share) else {
        return Err(Refusal::QueuedBodies);
    };
    let Some(place) = state.queues.join(key, state.config.queue_max) else {
        return Err(Refusal::QueueFull);
    };
    let queue = place.queue.clone();
    // Only retries differ in which slots they can use (each excludes its
    // own failed clients); in any other queue, what one waiter cannot use
    // no other can.
    let retry = place.key.retry;
    let deadline = Instant::now() + state.config.queue_timeout;
    let mut woken = false;
    let mut passed_on = None;
    // A retry looks once more now that it is in line: a slot freed between
    // its first look and its joining woke only the waiters already there,
    // who may all exclude it.
    let mut joined = retry;
    loop {
        // The first in line picks; in a retry queue, so does one the
        // wake-up was passed to. (A wake-up that comes meanwhile is kept
        // by the waiter's own `Notify`.)
        if retry && (woken || std::mem::take(&mut joined)) || queue.is_first(&place.me) {
            let refused = match pick() {
                Ok(client) => {
                    return Ok(Dispatched {
                        client,
                        queued: true,
                    });
                }
                Err(no) => refusal(no),
            };
            // Woken for a slot this retry cannot use (one it excludes):
            // the next waiter may use it. Once per freed slot. (Leaving,
            // it wakes the next one anyway.)
            let freed = queue.freed.load(Ordering::Acquire);
            if retry && woken && refused.is_ok() && passed_on != Some(freed) {
                passed_on = Some(freed);
                queue.wake_after(&place.me);
            }
            refused?;
        }
        if tokio::time::timeout_at(deadline, place.me.notified())
            .await
            .is_err()
        {
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

/// Notes a failure of `client` before any response byte. When that puts
/// it in a cool-down, the requests queued meanwhile look again once it
/// ends: the box frees no slot by recovering, and nothing else would tell
/// them it can take one.
pub fn record_failure(state: &Arc<State>, client: &ClientHandle) {
    record_failure_of(state, client, std::time::Instant::now());
}

/// [`record_failure`] for a request sent to `client` at `sent`
/// ([`ClientHandle::record_failure_of`]).
pub fn record_failure_of(state: &Arc<State>, client: &ClientHandle, sent: std::time::Instant) {
    let Some(cool) = client.record_failure_of(sent) else {
        return;
    };
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        tokio::time::sleep(cool).await;
        if let Some(state) = state.upgrade() {
            state.queues.wake_all();
        }
    });
}

/// `Retry-After` for a queue refusal, in whole seconds.
pub fn retry_after(queue_timeout: Duration) -> u64 {
    queue_timeout.as_secs().clamp(1, 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::BoundAddrs;
    use futures_util::FutureExt;

    async fn state() -> (Arc<State>, crate::store::TempDb) {
        state_with(|_| {}).await
    }

    async fn state_with(
        tune: impl FnOnce(&mut crate::Config),
    ) -> (Arc<State>, crate::store::TempDb) {
        let db = crate::store::TempDb::new("dispatch");
        let mut config = crate::Config::ephemeral("k", &db.url);
        config.queue_timeout = Duration::from_secs(120);
        tune(&mut config);
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let addrs = BoundAddrs {
            control: any,
            proxy: any,
            public: any,
            api: any,
        };
        (Arc::new(State::new(config, addrs).await.unwrap()), db)
    }

    fn add(state: &State, id: &str) -> Arc<ClientHandle> {
        crate::registry::testing::add(&state.registry, id, &["m"], Some(1))
    }

    /// A retry for `model` that leaves out the clients (sessions) `failed`.
    fn retry_of<'a>(model: &'a str, failed: &'a [u64]) -> Want<'a> {
        Want {
            model: Some(model),
            pinned: None,
            exclude: failed,
        }
    }

    #[tokio::test]
    async fn a_pinned_request_that_failed_on_its_client_is_refused_not_queued() {
        let (state, _db) = state().await;
        let x = add(&state, "x");
        assert!(x.try_reserve(), "x busy");
        fn pinned(exclude: &[u64]) -> Want<'_> {
            Want {
                model: Some("m"),
                pinned: Some("x"),
                exclude,
            }
        }
        let mut waiting = Box::pin(acquire(&state, pinned(&[])));
        assert!(waiting.as_mut().now_or_never().is_none(), "waits for x");
        // The same, after failing on x: refused at once, not queued
        // behind the first (to be refused only once in front).
        let failed = [x.session];
        let refused = acquire(&state, pinned(&failed)).now_or_never();
        assert!(
            matches!(refused, Some(Err(Refusal::Unavailable))),
            "{refused:?}"
        );
        assert_eq!(state.queues.total(), 1);
        x.release_slot();
        state.queues.slot_freed(&x);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.client.id, "x");
    }

    #[tokio::test]
    async fn a_retry_woken_for_a_slot_it_excludes_passes_the_wake_up_on() {
        let (state, _db) = state().await;
        let (x, y) = (add(&state, "x"), add(&state, "y"));
        assert!(x.try_reserve() && y.try_reserve(), "both boxes busy");
        // Two retries: the first (queued first) excludes y, the second x.
        let (not_y, not_x) = ([y.session], [x.session]);
        let mut first = Box::pin(acquire(&state, retry_of("m", &not_y)));
        let mut second = Box::pin(acquire(&state, retry_of("m", &not_x)));
        // Both join the queue.
        for _ in 0..2 {
            assert!(first.as_mut().now_or_never().is_none());
            assert!(second.as_mut().now_or_never().is_none());
        }
        assert_eq!(state.queues.total(), 2);
        // y frees a slot: the first waiter is woken, cannot use it, and
        // passes the wake-up to the second, which takes it.
        y.release_slot();
        state.queues.slot_freed(&y);
        let got = tokio::select! {
            d = &mut second => d.unwrap(),
            _ = &mut first => panic!("the first excludes y"),
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("the wake-up was lost"),
        };
        assert_eq!(got.client.id, "y");
        assert!(got.queued);
        assert_eq!(state.queues.total(), 1);
        drop(first);
        assert!(state.queues.is_empty(), "an empty queue is removed");
    }

    #[tokio::test]
    async fn bodies_waiting_in_queues_hold_at_most_half_the_buffer_budget() {
        let (state, _db) = state_with(|c| c.max_buffered_bodies = 1000).await;
        let x = add(&state, "x");
        assert!(x.try_reserve(), "x busy");
        let want = || Want {
            model: Some("m"),
            pinned: None,
            exclude: &[],
        };
        let mut large = Box::pin(acquire_holding(&state, want(), 400));
        assert!(large.as_mut().now_or_never().is_none(), "waits");
        assert_eq!(state.queues.held_bytes(), 400);
        // Past half of the budget with it: refused, not queued.
        let refused = acquire_holding(&state, want(), 101).now_or_never();
        assert!(
            matches!(refused, Some(Err(Refusal::QueuedBodies))),
            "{refused:?}"
        );
        assert_eq!(state.queues.total(), 1);
        // Up to half, and bodiless ones, wait.
        let mut fits = Box::pin(acquire_holding(&state, want(), 100));
        assert!(fits.as_mut().now_or_never().is_none());
        let mut bodiless = Box::pin(acquire(&state, want()));
        assert!(bodiless.as_mut().now_or_never().is_none());
        assert_eq!((state.queues.held_bytes(), state.queues.total()), (500, 3));
        // A waiter that leaves (its caller gone) gives its share back.
        drop(large);
        assert_eq!(state.queues.held_bytes(), 100);
        let mut again = Box::pin(acquire_holding(&state, want(), 400));
        assert!(again.as_mut().now_or_never().is_none());
        // One that gets its slot too.
        x.release_slot();
        state.queues.slot_freed(&x);
        let got = tokio::time::timeout(Duration::from_secs(10), &mut fits)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.client.id, "x");
        assert_eq!(state.queues.held_bytes(), 400);
        drop((bodiless, again));
        assert_eq!(state.queues.held_bytes(), 0);
    }

    /// A retry arriving behind another looks for a slot at once: the one
    /// free may be one the earlier retry excludes.
    #[tokio::test]
    async fn a_later_retry_takes_a_slot_an_earlier_one_excludes() {
        let (state, _db) = state().await;
        let (x, y) = (add(&state, "x"), add(&state, "y"));
        assert!(x.try_reserve(), "x busy, y free");
        let (not_y, not_x) = ([y.session], [x.session]);
        let mut first = Box::pin(acquire(&state, retry_of("m", &not_y)));
        assert!(first.as_mut().now_or_never().is_none(), "waits for x");
        let got = Box::pin(acquire(&state, retry_of("m", &not_x)))
            .now_or_never()
            .expect("y is free for it")
            .unwrap();
        assert_eq!(got.client.id, "y");
        assert!(!got.queued);
        drop(first);
    }

    /// A cool-down cut short by a success is news for the queues (the
    /// caller wakes them); one that had already run out, or none, is not.
    #[tokio::test]
    async fn a_success_says_whether_it_ended_a_cool_down() {
        let (state, _db) = state().await;
        let (x, y) = (add(&state, "x"), add(&state, "y"));
        assert!(!x.record_success(), "nothing to end");
        while x.record_failure().is_none() {}
        assert!(y.try_reserve(), "y busy; x free but cooling down");
        let mut waiter = Box::pin(acquire(
            &state,
            Want {
                model: Some("m"),
                pinned: None,
                exclude: &[],
            },
        ));
        assert!(waiter.as_mut().now_or_never().is_none());
        assert!(x.record_success(), "the cool-down was running");
        state.queues.wake_all();
        let got = waiter.as_mut().now_or_never().expect("woken").unwrap();
        assert_eq!(got.client.id, "x");
        assert!(!x.record_success());
    }

    #[tokio::test]
    async fn each_wake_of_all_is_passed_on_in_a_retry_queue() {
        let (state, _db) = state().await;
        let (x, y) = (add(&state, "x"), add(&state, "y"));
        assert!(x.try_reserve() && y.try_reserve(), "both boxes busy");
        let (not_y, not_x) = ([y.session], [x.session]);
        let mut first = Box::pin(acquire(&state, retry_of("m", &not_y)));
        let mut second = Box::pin(acquire(&state, retry_of("m", &not_x)));
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        // Capacity news that helps no one, passed down the line.
        state.queues.wake_all();
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        // y is free again without a freed-slot event (its cool-down ended,
        // say): the first cannot use it and passes this wake-up on too.
        y.release_slot();
        state.queues.wake_all();
        assert!(first.as_mut().now_or_never().is_none());
        let got = second.as_mut().now_or_never().expect("passed on");
        assert_eq!(got.unwrap().client.id, "y");
    }

    #[tokio::test]
    async fn the_line_is_served_in_order_and_a_waiter_keeps_its_place() {
        let (state, _db) = state().await;
        let x = add(&state, "x");
        assert!(x.try_reserve(), "the box is busy");
        let want = Want {
            model: Some("m"),
            pinned: None,
            exclude: &[],
        };
        let mut first = Box::pin(acquire(&state, want));
        assert!(first.as_mut().now_or_never().is_none());
        let mut second = Box::pin(acquire(&state, want));
        assert!(second.as_mut().now_or_never().is_none());
        // A slot frees and another request takes it before the first
        // waiter runs (a request of another queue): the first keeps its
        // place, it does not go behind the second.
        x.release_slot();
        state.queues.slot_freed(&x);
        assert!(x.try_reserve());
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        // A slot frees again, and a request arrives before the first
        // waiter runs: the arrival queues behind, the slot is the first's.
        x.release_slot();
        state.queues.slot_freed(&x);
        let mut third = Box::pin(acquire(&state, want));
        assert!(third.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        let got = first.as_mut().now_or_never().expect("the first is served");
        assert_eq!(got.unwrap().client.id, "x");
        drop(first);
        // Then the second, then the third, one slot at a time.
        assert!(third.as_mut().now_or_never().is_none());
        x.release_slot();
        state.queues.slot_freed(&x);
        assert!(third.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().expect("second").is_ok());
        drop(second);
        x.release_slot();
        state.queues.slot_freed(&x);
        assert!(third.as_mut().now_or_never().expect("third").is_ok());
        drop(third);
        assert!(state.queues.is_empty());
    }

    #[test]
    fn a_freed_slot_wakes_the_queues_its_client_can_serve() {
        let registry = crate::registry::Registry::default();
        // Two models as Ollama lists them, one as vLLM does.
        let x = crate::registry::testing::add(&registry, "x", &["m:latest", "n:7b", "v"], Some(1));
        let queues = Queues::default();
        let join = |model, pinned, retry| {
            queues
                .join(QueueKey::new(model, pinned, retry), 10)
                .expect("room")
        };
        let woken = [
            join(Some("m:latest"), None, false),
            join(Some("m"), None, false),
            join(Some("m:latest"), None, true),
            join(Some("m:latest"), Some("x"), false),
            join(Some("n:7b"), None, false),
            join(Some("v"), None, false),
            join(None, None, false),
        ];
        let left = [
            join(Some("m:latest"), Some("y"), false),
            join(Some("n:latest"), None, false),
            join(Some("other:latest"), None, false),
            // vLLM takes only its own name.
            join(Some("v:latest"), None, false),
        ];
        queues.slot_freed(&x);
        for w in &woken {
            assert_eq!(w.queue.freed.load(Ordering::Acquire), 1, "{:?}", w.key);
        }
        for w in &left {
            assert_eq!(w.queue.freed.load(Ordering::Acquire), 0, "{:?}", w.key);
        }
    }

    #[test]
    fn queues_of_pinned_requests_and_retries_count_under_their_model() {
        let queues = Queues::default();
        let a = queues.join(QueueKey::new(Some("m:latest"), Some("gpu@site"), false), 10);
        let b = queues.join(QueueKey::new(Some("m:latest"), None, true), 10);
        let c = queues.join(QueueKey::new(None, None, false), 10);
        // Spelled without its tag: the same series.
        let d = queues.join(QueueKey::new(Some("m"), None, false), 10);
        // A model named `*` is no request naming none.
        let e = queues.join(QueueKey::new(Some("*"), None, false), 10);
        assert_eq!(
            queues.depths(),
            vec![
                ("*".to_owned(), 1),
                ("*:latest".to_owned(), 1),
                ("m:latest".to_owned(), 3)
            ]
        );
        assert!(
            queues.join(QueueKey::new(None, None, false), 1).is_none(),
            "full"
        );
        drop((a, b, c, d, e));
        assert!(queues.is_empty());
    }

    /// Named as the box lists the model, as the request counts name it: a
    /// vLLM's `v` (no tag) is `v`, an Ollama's `m` is `m:latest`; a model
    /// no box online lists any more is normalized.
    #[test]
    fn queue_depths_name_models_as_the_boxes_list_them() {
        let reg = crate::registry::Registry::default();
        let _vllm = crate::registry::testing::add(&reg, "vllm", &["v"], None);
        let _ollama = crate::registry::testing::add(&reg, "ollama", &["m:latest"], None);
        let queues = Queues::default();
        let v = queues.join(QueueKey::new(Some("v"), None, false), 10);
        let m = queues.join(QueueKey::new(Some("m"), None, false), 10);
        let gone = queues.join(QueueKey::new(Some("gone"), None, false), 10);
        assert_eq!(
            queues.depths_listed(&reg),
            vec![
                ("gone:latest".to_owned(), 1),
                ("m:latest".to_owned(), 1),
                ("v".to_owned(), 1)
            ]
        );
        assert_eq!(queues.depths()[2], ("v:latest".to_owned(), 1));
        drop((v, m, gone));
    }
}
