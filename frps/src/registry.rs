//! Live clients: who is registered, how to reach them, what they serve.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use common::{Command, ModelInfo, Registration, SystemInfo};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::upstream::IdlePool;

/// A registration named a client id that a live client of another account
/// holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client id '{0}' is in use by another account; choose another --client-id")]
pub struct IdTaken(pub String);

/// One registered client (one control session).
#[derive(Debug)]
pub struct ClientHandle {
    /// Client id, unique among live clients.
    pub id: String,
    /// Unique number of this control session; a reconnect gets a new one.
    pub session: u64,
    /// Proof a data connection must present.
    pub session_key: String,
    /// What the client announced at registration.
    pub registration: Registration,
    /// The account that logged this client in.
    pub owner: Principal,
    /// Address of the control connection's peer.
    pub remote_addr: SocketAddr,
    /// When the client registered.
    pub connected_at: chrono::DateTime<chrono::Utc>,
    /// Commands to send on the control connection.
    pub control_tx: mpsc::Sender<Command>,
    /// Cancelled to drop the client (replacement, operator, shutdown).
    pub kick: CancellationToken,
    /// Cancelled when the client is evicted for silence (no frame for
    /// three heartbeat intervals: a box frozen or cut off): requests still
    /// waiting for its answer fail over then, rather than wait out
    /// `--upstream-idle-timeout`. Not on a replacement or a kick, whose
    /// requests in flight may still be answered.
    pub silent: CancellationToken,
    kick_reason: Mutex<Option<String>>,
    last_seen: Mutex<Instant>,
    /// Paces the client's `Error` lines at warn.
    error_logged: common::pace::SharedPace,
    busy_logged: common::pace::SharedPace,
    models: RwLock<Vec<ModelInfo>>,
    /// The latest system metrics, and when they came.
    system: RwLock<Option<(SystemInfo, Instant)>>,
    /// Requests currently being served by this box: shared by its sessions
    /// (a request an earlier session started still runs on the box after a
    /// reconnect, and counts against its `--max-concurrency`).
    pub in_flight: Arc<AtomicUsize>,
    /// Requests served by this client since it registered.
    pub requests: AtomicU64,
    /// Heartbeats received in this session.
    pub heartbeats: AtomicU64,
    service_up: AtomicBool,
    /// The box's failures and cool-down: shared with the session it
    /// replaced, whose requests still running count for the box.
    health: SharedHealth,
    /// Idle upstream HTTP connections through this client's tunnel.
    pub idle: IdlePool,
    /// Held while its `gpu_assets` row is written, so writes land in order:
    /// shared with the box's other sessions (same id and account).
    pub asset_writes: Arc<tokio::sync::Mutex<()>>,
    /// The `updatedAt` of this session's last `gpu_assets` write that
    /// landed, or of a later one by another session of its machine that
    /// left before it: its `offline` lands only on the row as they left it.
    pub asset_written_at: Mutex<Option<chrono::NaiveDateTime>>,
    /// The session's multiplexed tunnel connection, once frpc dialed it.
    tunnel: Mutex<Option<common::mux::Mux>>,
    /// SHA-256 of the token renewals sent to this session (at its token
    /// login, and since), not yet said saved (`TokenSaved`): only these are
    /// looked up when frpc says one is, at most [`MAX_SESSION_RENEWALS`].
    renewals: Mutex<Vec<[u8; 32]>>,
}

/// Most renewals a session waits to hear saved (a renewal comes every
/// half token lifetime: days).
pub const MAX_SESSION_RENEWALS: usize = 8;

/// Most models frps keeps for one client (the first ones announced; a
/// frpc of 2026-12-05 or later announces no more, the first by name).
pub use common::{MAX_MODEL_NAME, MAX_MODELS};

/// `models` as frps keeps them: names of 1 to [`MAX_MODEL_NAME`] bytes
/// without control characters, each once, at most [`MAX_MODELS`] of them;
/// and how many were dropped.
pub fn within_limits(mut models: Vec<ModelInfo>) -> (Vec<ModelInfo>, usize) {
    let announced = models.len();
    // A name said twice is one model (the size said first kept), and not a
    // dropped one: the fleet's listing names each box once per model.
    let (_, repeated) = common::keep_named_models(&mut models);
    models.truncate(MAX_MODELS);
    models.shrink_to_fit();
    let dropped = announced - repeated - models.len();
    (models, dropped)
}

impl ClientHandle {
    /// Renewal `hash` was sent to this session.
    pub fn renewal_sent(&self, hash: [u8; 32]) {
        let mut renewals = self.renewals.lock().expect("renewals lock");
        if renewals.len() >= MAX_SESSION_RENEWALS {
            renewals.remove(0);
        }
        renewals.push(hash);
    }

    /// Whether `hash` is a renewal sent to this session and not said saved
    /// before (it is forgotten: said once).
    pub fn renewal_saved(&self, hash: &[u8; 32]) -> bool {
        let mut renewals = self.renewals.lock().expect("renewals lock");
        let Some(at) = renewals.iter().position(|r| r == hash) else {
            return false;
        };
        renewals.remove(at);
        true
    }

    /// The tunnel connection to open upstream streams on, while it lasts.
    pub fn tunnel(&self) -> Option<common::mux::Mux> {
        let tunnel = self.tunnel.lock().expect("tunnel lock");
        tunnel.as_ref().filter(|m| !m.is_closed()).cloned()
    }

    /// Makes `mux` the session's tunnel connection; one it replaces is
    /// closed (its streams fail, and requests on them fail over).
    pub fn attach_tunnel(&self, mux: common::mux::Mux) {
        let old = self.tunnel.lock().expect("tunnel lock").replace(mux);
        if let Some(old) = old {
            old.close();
        }
    }

    /// Forgets `mux` if it is still the session's tunnel connection.
    pub fn detach_tunnel(&self, mux: &common::mux::Mux) {
        let mut tunnel = self.tunnel.lock().expect("tunnel lock");
        if tunnel.as_ref().is_some_and(|m| m.same(mux)) {
            *tunnel = None;
        }
    }

    /// Whether the client's `Error` received now is logged at warn: one a
    /// second at most, the rest at debug (a client sending them without
    /// pause would fill the log).
    pub fn may_log_error(&self) -> bool {
        self.error_logged.admit()
    }

    /// Whether a refusal of the client's for want of room (its reason,
    /// which callers are not told) is logged at info now: one a second at
    /// most, the rest at debug (a burst refuses many).
    pub fn may_log_busy(&self) -> bool {
        self.busy_logged.admit()
    }

    /// Marks the client as heard from now.
    pub fn touch(&self) {
        *self.last_seen.lock().expect("last_seen lock") = Instant::now();
    }

    /// When the client was last heard from.
    pub fn last_seen(&self) -> Instant {
        *self.last_seen.lock().expect("last_seen lock")
    }

    /// Drops the client, telling it `reason`.
    pub fn kick(&self, reason: impl Into<String>) {
        self.kick_reason
            .lock()
            .expect("kick lock")
            .get_or_insert_with(|| reason.into());
        self.kick.cancel();
    }

    /// Why the client was kicked, if it was.
    pub fn kick_reason(&self) -> Option<String> {
        self.kick_reason.lock().expect("kick lock").clone()
    }

    /// Runs `f` over the reported models without copying them.
    pub fn with_models<T>(&self, f: impl FnOnce(&[ModelInfo]) -> T) -> T {
        f(&self.models.read().expect("models lock"))
    }

    /// Most requests the client takes at once (`usize::MAX`: unlimited).
    pub fn capacity(&self) -> usize {
        self.registration
            .max_concurrency
            .map_or(usize::MAX, |n| n.max(1) as usize)
    }

    /// Whether a slot is free now.
    pub fn has_capacity(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.capacity()
    }

    /// Takes a slot if one is free; the taker must [`Self::release_slot`].
    pub fn try_reserve(&self) -> bool {
        let cap = self.capacity();
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a slot taken with [`Self::try_reserve`].
    pub fn release_slot(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether requests may be routed here at `now`: its service answers and
    /// it is not cooling down after repeated failures.
    pub fn is_routable(&self, now: Instant) -> bool {
        self.is_healthy()
            && self
                .health
                .lock()
                .expect("health lock")
                .until
                .is_none_or(|t| now >= t)
    }

    /// Notes a failure before any response byte. After
    /// [`FAILURES_BEFORE_COOLDOWN`] in a row the client is skipped for a
    /// cool-down that doubles with each further failure (1 s up to 60 s);
    /// returns its length when one starts. Requests queued meanwhile must
    /// be woken at its end ([`crate::dispatch::record_failure`]).
    pub fn record_failure(&self) -> Option<std::time::Duration> {
        self.record_failure_of(Instant::now())
    }

    /// [`Self::record_failure`] for a request sent to the box at `sent`.
    /// One sent before the last cool-down began failed with the failure
    /// that began it (the service crashed under all of them at once) and
    /// is not counted again: eight requests inside an Ollama that
    /// restarted doubled the cool-down eight times, to a minute, for an
    /// outage of seconds. Requests sent after it count as before.
    pub fn record_failure_of(&self, sent: Instant) -> Option<std::time::Duration> {
        let mut h = self.health.lock().expect("health lock");
        if h.cooled_at.is_some_and(|at| sent < at) {
            return None;
        }
        h.failures = h.failures.saturating_add(1);
        if h.failures < FAILURES_BEFORE_COOLDOWN {
            return None;
        }
        let n = (h.failures - FAILURES_BEFORE_COOLDOWN).min(6);
        let cool = (COOLDOWN_BASE * (1u32 << n)).min(COOLDOWN_MAX);
        let now = Instant::now();
        h.until = Some(now + cool);
        h.cooled_at = Some(now);
        tracing::warn!(client = %self.id, failures = h.failures, "client '{}' marked unhealthy for {cool:?}", self.id);
        Some(cool)
    }

    /// Notes a request served: the failure count restarts.
    /// Returns whether that ended a cool-down still running: the client
    /// takes requests again, and queued ones should look (nothing else
    /// tells them: no slot was freed).
    pub fn record_success(&self) -> bool {
        let mut h = self.health.lock().expect("health lock");
        let ended = h.until.is_some_and(|t| Instant::now() < t);
        if !h.is_clean() {
            *h = Health::default();
        }
        ended
    }

    /// Notes the box's report that its local service is up again: a
    /// cool-down running ends, once between successes (a box flipping its
    /// report cannot keep out of its cool-downs), and the failures and
    /// sheds stay counted (its next failure cools it down again, for
    /// longer). Returns whether a cool-down ended.
    pub fn record_service_up(&self) -> bool {
        let mut h = self.health.lock().expect("health lock");
        let ended = !h.forgiven && h.until.is_some_and(|t| Instant::now() < t);
        if ended {
            h.until = None;
            h.forgiven = true;
        }
        ended
    }

    /// Notes a request's tunnel stream shed for its connection's receive
    /// budget before an answer, or a dial-back frpc refused for want of room
    /// (`--max-data-connections`): the box busy, not failing; true once more
    /// than [`SHEDS_BEFORE_FAILURE`] came with no success between: the
    /// reason is the box's own text, so a box that sheds everything is
    /// taken for a failing one.
    pub fn record_shed(&self) -> bool {
        let mut h = self.health.lock().expect("health lock");
        h.sheds = h.sheds.saturating_add(1);
        h.sheds > SHEDS_BEFORE_FAILURE
    }

    /// Notes an answer of the service's that says it is failing (see
    /// [`counts_against_the_box`]), to a request of the caller (its key and
    /// network) tagged `from`. Returns how many came in a row, with no
    /// answer between but a 503 or 504, when this one counts as a failure:
    /// past [`SERVER_ERRORS_BEFORE_FAILURE`], once they answered more than
    /// one caller (`None` otherwise). A
    /// box answering 500 to everything at once (a model that cannot load)
    /// would otherwise draw most requests under least-conn (it never has
    /// any in flight); one caller whose requests the service cannot answer
    /// (a malformed input it answers 500) cannot cool a box down alone.
    /// The flag is true the first time the streak counts (to say so once).
    pub fn record_server_error(&self, from: u64) -> Option<(u32, bool)> {
        let mut h = self.health.lock().expect("health lock");
        match h.server_errors_from {
            None => h.server_errors_from = Some(from),
            Some(first) if first != from => h.server_errors_mixed = true,
            Some(_) => {}
        }
        h.server_errors = h.server_errors.saturating_add(1);
        if !h.server_errors_mixed || h.server_errors <= SERVER_ERRORS_BEFORE_FAILURE {
            return None;
        }
        let first = !std::mem::replace(&mut h.server_errors_said, true);
        Some((h.server_errors, first))
    }

    /// The box's failures since its last success (of this session and of
    /// the sessions before it that the box's health carries over).
    pub fn failures(&self) -> u32 {
        self.health.lock().expect("health lock").failures
    }

    /// What is left at `now` of the cool-down the client is in, if any.
    pub fn cooling_left(&self, now: Instant) -> Option<std::time::Duration> {
        let until = self.health.lock().expect("health lock").until?;
        Some(until.checked_duration_since(now)?).filter(|d| !d.is_zero())
    }

    /// Whether the client is cooling down after failures.
    pub fn is_cooling_down(&self) -> bool {
        self.health
            .lock()
            .expect("health lock")
            .until
            .is_some_and(|t| Instant::now() < t)
    }

    /// Models the client's service currently reports.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.models.read().expect("models lock").clone()
    }

    /// How many models the client serves now.
    pub fn model_count(&self) -> usize {
        self.models.read().expect("models lock").len()
    }

    /// Replaces the reported models; returns whether they differ from
    /// those reported before.
    pub fn set_models(&self, models: Vec<ModelInfo>) -> bool {
        let mut current = self.models.write().expect("models lock");
        if *current == models {
            return false;
        }
        *current = models;
        true
    }

    /// Records whether the local service answers.
    pub fn set_service_up(&self, up: bool) {
        self.service_up.store(up, Ordering::Relaxed);
    }

    /// Whether the client's local service answered its last probe.
    pub fn is_healthy(&self) -> bool {
        self.service_up.load(Ordering::Relaxed)
    }

    /// Latest system metrics.
    pub fn system(&self) -> Option<SystemInfo> {
        self.system_aged().map(|(info, _)| info)
    }

    /// Latest system metrics with their age: a box whose metrics read
    /// hangs (a stuck network mount, a wedged GPU driver) sends none until
    /// it ends, and its last ones would otherwise pass for current.
    pub fn system_aged(&self) -> Option<(SystemInfo, std::time::Duration)> {
        self.system_aged_at(Instant::now())
    }

    fn system_aged_at(&self, now: Instant) -> Option<(SystemInfo, std::time::Duration)> {
        let system = self.system.read().expect("system lock");
        system
            .as_ref()
            .map(|(info, at)| (info.clone(), now.saturating_duration_since(*at)))
    }

    /// Stores the latest system metrics.
    pub fn set_system(&self, info: SystemInfo) {
        *self.system.write().expect("system lock") = Some((info, Instant::now()));
    }
}

/// Consecutive failures after which a client cools down.
pub const FAILURES_BEFORE_COOLDOWN: u32 = 2;
/// First cool-down; doubles with each further failure.
pub const COOLDOWN_BASE: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest cool-down.
pub const COOLDOWN_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Answers that say the service is failing ([`counts_against_the_box`]) in
/// a row, with no other answer between, after which each further one
/// counts as a failure.
pub const SERVER_ERRORS_BEFORE_FAILURE: u32 = 4;

/// Whether an answer of the service's with `status` may say the box is
/// failing rather than the request: 500 (an engine that cannot load its
/// model, out of memory, dead) and 502 (a proxy on the box whose engine is
/// down). Not 503 (Ollama's queue full, an engine loading: busy, which is
/// not failing) nor 504 (a proxy on the box timing out one long
/// generation, which a caller can ask for); 501 (an endpoint the server
/// was started without, as llama.cpp's embeddings) and 505 answer the
/// request, as a 4xx does.
pub fn counts_against_the_box(status: u16) -> bool {
    matches!(status, 500 | 502)
}

/// Streams shed for the receive budget in a row (no success between) after
/// which each further one counts as a failure.
pub const SHEDS_BEFORE_FAILURE: u32 = 16;

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    failures: u32,
    until: Option<Instant>,
    /// When the last cool-down began.
    cooled_at: Option<Instant>,
    /// Streams shed since the last success.
    sheds: u32,
    /// Answers counted against the box since the last other answer.
    server_errors: u32,
    /// The caller the first of them answered (its tag), and whether
    /// another's came since.
    server_errors_from: Option<u64>,
    server_errors_mixed: bool,
    /// Whether this streak's counting as failures was logged.
    server_errors_said: bool,
    /// A report of the service up again ended a cool-down since the last
    /// success.
    forgiven: bool,
}

impl Health {
    /// Whether there is anything to remember: failures, sheds, or a
    /// cool-down.
    fn is_clean(&self) -> bool {
        self.failures == 0
            && self.until.is_none()
            && self.sheds == 0
            && self.server_errors == 0
            && !self.forgiven
    }
}

/// The set of live clients.
#[derive(Debug)]
pub struct Registry {
    clients: RwLock<HashMap<String, Arc<ClientHandle>>>,
    next_session: AtomicU64,
    changes: watch::Sender<u64>,
    /// Each box's in-flight count (by client id and account), while any of
    /// its sessions, current or gone with requests still running, holds it.
    in_flight: Mutex<ByBox<AtomicUsize>>,
    /// Each box's `gpu_assets` write order, shared by its sessions: a gone
    /// session's `offline` and its reconnect's `online` land in turn.
    asset_writes: Mutex<ByBox<tokio::sync::Mutex<()>>>,
    /// The health (failures, cool-down) of boxes whose session ended, for
    /// their next session: a box failing requests does not leave its
    /// cool-down by reconnecting.
    health_left: Mutex<HealthLeft>,
}

/// The health each box's last session left, shared (requests that
/// session still ran when it ended, failing or answered later, count for
/// the box's next one), with when the session ended; kept while
/// [`remembered`].
#[derive(Debug)]
struct HealthLeft {
    by_box: HashMap<(String, i64), (SharedHealth, Instant)>,
    prune_at: usize,
}

/// A box's health, shared by its sessions.
type SharedHealth = Arc<Mutex<Health>>;

/// Whether a box's health, left by a session that ended at `left_at`, is
/// still handed to its next session at `now`: for [`COOLDOWN_MAX`] past its
/// cool-down's end, or past `left_at`.
fn remembered(health: &Mutex<Health>, left_at: Instant, now: Instant) -> bool {
    let until = health.lock().expect("health lock").until;
    let from = until.map_or(left_at, |t| t.max(left_at));
    now < from + COOLDOWN_MAX
}

/// Something each box (client id and account) shares across its sessions
/// while any holds it, and when next to forget those no session holds.
#[derive(Debug)]
struct ByBox<T> {
    by_box: HashMap<(String, i64), std::sync::Weak<T>>,
    prune_at: usize,
}

impl<T: Default> ByBox<T> {
    fn new() -> Self {
        ByBox {
            by_box: HashMap::new(),
            prune_at: 1024,
        }
    }

    /// The one the box `(id, user_id)` holds, else a new one.
    fn of(&mut self, id: &str, user_id: i64) -> Arc<T> {
        let key = (id.to_owned(), user_id);
        if let Some(live) = self.by_box.get(&key).and_then(std::sync::Weak::upgrade) {
            return live;
        }
        let fresh = Arc::new(T::default());
        self.by_box.insert(key, Arc::downgrade(&fresh));
        if self.by_box.len() > self.prune_at {
            self.by_box.retain(|_, c| c.strong_count() > 0);
            self.prune_at = (self.by_box.len() * 2).max(1024);
        }
        fresh
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            clients: RwLock::default(),
            next_session: AtomicU64::new(1),
            changes: watch::Sender::new(0),
            in_flight: Mutex::new(ByBox::new()),
            asset_writes: Mutex::new(ByBox::new()),
            health_left: Mutex::new(HealthLeft {
                by_box: HashMap::new(),
                prune_at: 1024,
            }),
        }
    }
}

/// What [`Registry::insert`] needs to create a client.
#[derive(Debug)]
pub struct NewClient {
    /// The registration as announced (and possibly rewritten).
    pub registration: Registration,
    /// Peer address of the control connection.
    pub remote_addr: SocketAddr,
    /// Channel to the control connection's writer.
    pub control_tx: mpsc::Sender<Command>,
    /// Proof for data connections.
    pub session_key: String,
    /// The account that logged the client in.
    pub owner: Principal,
}

impl Registry {
    /// Adds a client. A live client with the same id and owner is kicked
    /// and replaced: a reconnect after a network blip is never locked out.
    /// A live client with the same id under another account stays, and the
    /// newcomer is refused with [`IdTaken`].
    pub fn insert(&self, new: NewClient) -> Result<Arc<ClientHandle>, IdTaken> {
        let session = self.reserve_session();
        self.insert_as(new, session)
    }

    /// A fresh session number, for a registration still being decided
    /// (server plugins see it as `run_id` before it is inserted).
    pub fn reserve_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The in-flight count of the box `id` of account `user_id`: the one
    /// its earlier sessions share while requests they started still run,
    /// else a new one.
    fn in_flight_of(&self, id: &str, user_id: i64) -> Arc<AtomicUsize> {
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .of(id, user_id)
    }

    /// [`Registry::insert`] with a number from [`Registry::reserve_session`].
    pub fn insert_as(
        &self,
        mut new: NewClient,
        session: u64,
    ) -> Result<Arc<ClientHandle>, IdTaken> {
        let in_flight = self.in_flight_of(&new.registration.client_id, new.owner.user_id);
        let asset_writes = self
            .asset_writes
            .lock()
            .expect("asset write lock")
            .of(&new.registration.client_id, new.owner.user_id);
        let health = self.health_of(&new.registration.client_id, new.owner.user_id);
        let handle = Arc::new(ClientHandle {
            id: new.registration.client_id.clone(),
            session,
            session_key: new.session_key,
            // Kept once: the registration's copy is never read again.
            models: RwLock::new(std::mem::take(&mut new.registration.models)),
            registration: new.registration,
            owner: new.owner,
            remote_addr: new.remote_addr,
            connected_at: chrono::Utc::now(),
            control_tx: new.control_tx,
            kick: CancellationToken::new(),
            silent: CancellationToken::new(),
            kick_reason: Mutex::new(None),
            last_seen: Mutex::new(Instant::now()),
            error_logged: common::pace::SharedPace::new(std::time::Duration::from_secs(1)),
            busy_logged: common::pace::SharedPace::new(std::time::Duration::from_secs(1)),
            system: RwLock::new(None),
            in_flight,
            requests: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            service_up: AtomicBool::new(true),
            health,
            idle: IdlePool::default(),
            asset_writes,
            asset_written_at: Mutex::new(None),
            tunnel: Mutex::new(None),
            renewals: Mutex::new(Vec::new()),
        });
        handle.set_service_up(handle.registration.service_up);
        let old = {
            let mut clients = self.clients.write().expect("registry lock");
            if let Some(live) = clients.get(&handle.id)
                && live.owner.user_id != handle.owner.user_id
            {
                return Err(IdTaken(handle.id.clone()));
            }
            clients.insert(handle.id.clone(), handle.clone())
        };
        self.health_left
            .lock()
            .expect("health lock")
            .by_box
            .remove(&(handle.id.clone(), handle.owner.user_id));
        if let Some(old) = old {
            old.kick(common::protocol::REPLACED);
        }
        self.changed();
        Ok(handle)
    }

    /// Removes `handle` if it is still the registered session for its id.
    /// Returns whether it was removed.
    pub fn remove(&self, handle: &ClientHandle) -> bool {
        let removed = {
            let mut clients = self.clients.write().expect("registry lock");
            match clients.get(&handle.id) {
                Some(current) if current.session == handle.session => {
                    clients.remove(&handle.id);
                    // Under the registry's lock: a registration of the box
                    // finds either this session or what it left.
                    self.keep_health(handle);
                    true
                }
                _ => false,
            }
        };
        if removed {
            self.changed();
        }
        removed
    }

    /// What a new session of the box `(id, user_id)` starts with: the
    /// health of its live session (a reconnect replacing it), or what its
    /// last session left while that is remembered; shared, so the requests
    /// that session still runs count for the box.
    fn health_of(&self, id: &str, user_id: i64) -> SharedHealth {
        let live = self.clients.read().expect("registry lock").get(id).cloned();
        if let Some(live) = live.filter(|c| c.owner.user_id == user_id) {
            return live.health.clone();
        }
        // Forgotten only once the new session is in ([`Registry::insert_as`]):
        // a registration refused meanwhile leaves it for the next.
        let left = self.health_left.lock().expect("health lock");
        match left.by_box.get(&(id.to_owned(), user_id)) {
            Some((health, left_at)) if remembered(health, *left_at, Instant::now()) => {
                health.clone()
            }
            _ => Arc::new(Mutex::new(Health::default())),
        }
    }

    /// Keeps the health of `gone`'s session for the box's next one, shared:
    /// a request it still ran that fails (or is answered) after it ended
    /// counts too. A frpc that crashes mid-request ends its session as its
    /// requests fail.
    fn keep_health(&self, gone: &ClientHandle) {
        let key = (gone.id.clone(), gone.owner.user_id);
        let mut left = self.health_left.lock().expect("health lock");
        let now = Instant::now();
        left.by_box.insert(key, (gone.health.clone(), now));
        if left.by_box.len() > left.prune_at {
            left.by_box
                .retain(|_, (health, left_at)| remembered(health, *left_at, now));
            left.prune_at = (left.by_box.len() * 2).max(1024);
        }
    }

    /// The live client with this id.
    pub fn get(&self, id: &str) -> Option<Arc<ClientHandle>> {
        self.clients.read().expect("registry lock").get(id).cloned()
    }

    /// The live client `id` if `session_key` is its session's proof
    /// (compared in constant time): what a dial-back or tunnel hello names.
    pub fn proven(&self, id: &str, session_key: &str) -> Option<Arc<ClientHandle>> {
        self.get(id).filter(|c| {
            crate::auth::constant_time_eq(c.session_key.as_bytes(), session_key.as_bytes())
        })
    }

    /// The live client with this session number.
    pub fn get_session(&self, id: &str, session: u64) -> Option<Arc<ClientHandle>> {
        self.get(id).filter(|c| c.session == session)
    }

    /// Every live client that is not on its way out: a kicked one
    /// (disconnected by an operator, replaced, evicted) stays registered
    /// until its session has told it why, up to `--handshake-timeout`, but
    /// takes no requests and is shown nowhere.
    pub fn online(&self) -> Vec<Arc<ClientHandle>> {
        self.clients
            .read()
            .expect("registry lock")
            .values()
            .filter(|c| !c.kick.is_cancelled())
            .cloned()
            .collect()
    }

    /// How many clients [`Registry::online`] lists.
    pub fn online_count(&self) -> usize {
        self.clients
            .read()
            .expect("registry lock")
            .values()
            .filter(|c| !c.kick.is_cancelled())
            .count()
    }

    /// Client `id` if it is online (see [`Registry::online`]).
    pub fn get_online(&self, id: &str) -> Option<Arc<ClientHandle>> {
        self.get(id).filter(|c| !c.kick.is_cancelled())
    }

    /// Every live client.
    pub fn all(&self) -> Vec<Arc<ClientHandle>> {
        self.clients
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Runs `f` over the live clients without copying the set.
    pub fn with_clients<T>(&self, f: impl FnOnce(&HashMap<String, Arc<ClientHandle>>) -> T) -> T {
        f(&self.clients.read().expect("registry lock"))
    }

    /// Number of live clients.
    pub fn len(&self) -> usize {
        self.clients.read().expect("registry lock").len()
    }

    /// Whether no client is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notifies on every registration and removal (the value is a counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

/// Clients for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A registration of `id` (account 1, session key `key-<id>`) serving
    /// `models`, at most `max` at once; and its control channel's far end.
    pub fn new_client(
        id: &str,
        models: &[&str],
        max: Option<u32>,
    ) -> (NewClient, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(4);
        let models = models
            .iter()
            .map(|m| common::ModelInfo {
                name: m.to_string(),
                size: None,
            })
            .collect();
        let new = NewClient {
            registration: Registration {
                client_id: id.into(),
                models,
                max_concurrency: max,
                ..Default::default()
            },
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            control_tx: tx,
            session_key: format!("key-{id}"),
            owner: Principal {
                user_id: 1,
                email: "a@b".into(),
                token_id: None,
            },
        };
        (new, rx)
    }

    /// Registers [`new_client`] in `reg`.
    pub fn add(reg: &Registry, id: &str, models: &[&str], max: Option<u32>) -> Arc<ClientHandle> {
        reg.insert(new_client(id, models, max).0)
            .expect("one owner in these tests")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::new_client as client_with;
    use super::*;

    fn new_client(id: &str) -> (NewClient, mpsc::Receiver<Command>) {
        client_with(id, &[], None)
    }

    /// Metrics come with their age: a box whose metrics read hangs sends
    /// none, and its last ones must not pass for current.
    #[test]
    fn system_metrics_carry_their_age() {
        let reg = Registry::default();
        let c = super::testing::add(&reg, "gpu", &[], None);
        assert!(c.system_aged().is_none());
        let info = SystemInfo {
            cpu_usage: 42.0,
            ..Default::default()
        };
        c.set_system(info.clone());
        let (got, age) = c.system_aged().unwrap();
        assert_eq!(got, info);
        assert!(age < std::time::Duration::from_secs(5), "{age:?}");
        let later = Instant::now() + std::time::Duration::from_secs(90);
        let (_, age) = c.system_aged_at(later).unwrap();
        assert!(age >= std::time::Duration::from_secs(90), "{age:?}");
        // A new report starts it again.
        c.set_system(info);
        let (_, age) = c.system_aged_at(later).unwrap();
        assert!(age <= std::time::Duration::from_secs(90), "{age:?}");
    }

    #[test]
    fn a_boxs_cap_counts_requests_its_earlier_session_still_runs() {
        let reg = Registry::default();
        let first = super::testing::add(&reg, "gpu", &["m"], Some(1));
        assert!(first.try_reserve());
        // The box reconnects while that request streams on.
        let second = super::testing::add(&reg, "gpu", &["m"], Some(1));
        assert!(first.kick.is_cancelled());
        assert_eq!(second.in_flight.load(Ordering::Relaxed), 1);
        assert!(!second.try_reserve(), "over its --max-concurrency 1");
        first.release_slot();
        assert!(second.try_reserve());
        second.release_slot();
        // Another account's box of that id never shares the count.
        assert!(second.try_reserve());
        assert_eq!(reg.in_flight_of("gpu", 2).load(Ordering::Relaxed), 0);
        second.release_slot();
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_busy_refusals_are_logged_at_info_once_a_second_apart_from_errors() {
        let reg = Registry::default();
        let client = reg.insert(new_client("busy").0).unwrap();
        assert!(client.may_log_busy());
        assert!(!client.may_log_busy());
        // Its own pace: a burst of refusals does not silence an error.
        assert!(client.may_log_error());
        tokio::time::advance(std::time::Duration::from_millis(999)).await;
        assert!(!client.may_log_busy());
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(client.may_log_busy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_errors_are_logged_at_warn_once_a_second() {
        let reg = Registry::default();
        let client = reg.insert(new_client("chatty").0).unwrap();
        assert!(client.may_log_error());
        assert!(!client.may_log_error());
        tokio::time::advance(std::time::Duration::from_millis(999)).await;
        assert!(!client.may_log_error());
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert!(client.may_log_error());
        assert!(!client.may_log_error());
    }

    #[test]
    fn a_kicked_client_is_not_online_while_its_session_winds_down() {
        let reg = Registry::default();
        let (a, _rx1) = new_client("gpu-a");
        let a = reg.insert(a).unwrap();
        let (b, _rx2) = new_client("gpu-b");
        reg.insert(b).unwrap();
        assert_eq!(reg.online_count(), 2);
        a.kick("disconnected by an operator");
        // Still registered (its session has yet to tell it why)...
        assert_eq!(reg.len(), 2);
        assert!(reg.get("gpu-a").is_some());
        // ...but shown nowhere.
        assert!(reg.get_online("gpu-a").is_none());
        assert!(reg.get_online("gpu-b").is_some());
        assert_eq!(reg.online_count(), 1);
        let ids: Vec<String> = reg.online().iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids, ["gpu-b"]);
    }

    #[test]
    fn same_id_replaces_and_kicks_the_stale_session() {
        let reg = Registry::default();
        let (a, _rx1) = new_client("gpu");
        let first = reg.insert(a).unwrap();
        let (b, _rx2) = new_client("gpu");
        let second = reg.insert(b).unwrap();
        assert!(first.kick.is_cancelled());
        assert!(first.kick_reason().unwrap().contains("replaced"));
        assert_eq!(reg.len(), 1);
        // The stale session's cleanup must not remove its replacement.
        assert!(!reg.remove(&first));
        assert_eq!(reg.get("gpu").unwrap().session, second.session);
        assert!(reg.remove(&second));
        assert!(reg.is_empty());
    }

    #[test]
    fn changes_are_signalled() {
        let reg = Registry::default();
        let rx = reg.subscribe();
        let (a, _rx) = new_client("x");
        let h = reg.insert(a).unwrap();
        reg.remove(&h);
        assert_eq!(*rx.borrow(), 2);
    }

    #[test]
    fn another_accounts_live_id_is_not_taken_over() {
        let reg = Registry::default();
        let (a, _rx1) = new_client("gpu");
        let owner = reg.insert(a).unwrap();
        let (mut b, _rx2) = new_client("gpu");
        b.owner.user_id = 2;
        assert_eq!(reg.insert(b).unwrap_err(), IdTaken("gpu".into()));
        assert!(!owner.kick.is_cancelled());
        assert_eq!(reg.get("gpu").unwrap().session, owner.session);
        // Once the owner is gone, the id is free again.
        assert!(reg.remove(&owner));
        let (mut c, _rx3) = new_client("gpu");
        c.owner.user_id = 2;
        assert!(reg.insert(c).is_ok());
    }

    #[test]
    fn a_box_keeps_its_failures_and_cool_down_across_sessions() {
        let reg = Registry::default();
        let add = |id| super::testing::add(&reg, id, &[], None);
        let first = add("gpu");
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            first.record_failure();
        }
        assert!(first.is_cooling_down());
        // A reconnect replacing the live session, then one after the
        // session ended: both still cooling down.
        let second = add("gpu");
        assert!(second.is_cooling_down(), "replaced");
        assert!(reg.remove(&second));
        let third = add("gpu");
        assert!(third.is_cooling_down(), "reconnected after it ended");
        assert!(!third.is_routable(Instant::now()));
        // One more failure doubles the cool-down as it would have.
        assert_eq!(third.record_failure(), Some(COOLDOWN_BASE * 2));
        // Another account's box of that id starts clean; refused while
        // it is live, this box's next session still remembers.
        assert!(reg.remove(&third));
        let (mut other, _rx) = new_client("gpu");
        other.owner.user_id = 2;
        let other = reg.insert(other).unwrap();
        assert!(!other.is_cooling_down());
        assert!(reg.insert(new_client("gpu").0).is_err(), "IdTaken");
        assert!(reg.remove(&other));
        // A success forgets it all: the next session starts clean.
        let fourth = add("gpu");
        assert!(fourth.is_cooling_down());
        fourth.record_success();
        assert!(reg.remove(&fourth));
        let fifth = add("gpu");
        assert!(!fifth.is_cooling_down());
        // Starting clean: one failure is not enough.
        assert_eq!(fifth.record_failure(), None);
    }

    #[test]
    fn failures_of_requests_a_session_ran_when_it_ended_count_for_the_next() {
        let reg = Registry::default();
        let add = |id| super::testing::add(&reg, id, &[], None);
        let gone = add("gpu");
        assert!(reg.remove(&gone));
        // Its requests fail as it ends (a frpc crashing mid-request): the
        // box's next session cools down, whether it registered before...
        let next = add("gpu");
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            gone.record_failure();
        }
        assert!(next.is_cooling_down(), "registered before they failed");
        // ...or after.
        next.record_success();
        assert!(reg.remove(&next));
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            next.record_failure();
        }
        assert!(add("gpu").is_cooling_down(), "registered after they failed");
    }

    #[test]
    fn what_sessions_left_is_forgotten_once_past_its_time() {
        let reg = Registry::default();
        let gone = super::testing::add(&reg, "gpu", &[], None);
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            gone.record_failure();
        }
        assert!(reg.remove(&gone));
        let health = |reg: &Registry| {
            let left = reg.health_left.lock().unwrap();
            let (health, left_at) = &left.by_box[&("gpu".to_owned(), 1)];
            (health.clone(), *left_at)
        };
        let (kept, left_at) = health(&reg);
        let until = kept.lock().unwrap().until.unwrap();
        assert!(remembered(
            &kept,
            left_at,
            until + COOLDOWN_MAX - std::time::Duration::from_millis(1)
        ));
        assert!(!remembered(&kept, left_at, until + COOLDOWN_MAX));
        // A clean one for COOLDOWN_MAX past its session's end.
        kept.lock().unwrap().until = None;
        assert!(remembered(
            &kept,
            left_at,
            left_at + COOLDOWN_MAX - std::time::Duration::from_millis(1)
        ));
        assert!(!remembered(&kept, left_at, left_at + COOLDOWN_MAX));
        // Past its time, the box's next session starts clean.
        let (Some(past), now) = (Instant::now().checked_sub(COOLDOWN_MAX * 2), Instant::now())
        else {
            return; // a monotonic clock younger than two minutes
        };
        kept.lock().unwrap().until = Some(past);
        reg.health_left
            .lock()
            .unwrap()
            .by_box
            .insert(("gpu".to_owned(), 1), (kept, past));
        assert!(!remembered(&health(&reg).0, past, now));
        let next = super::testing::add(&reg, "gpu", &[], None);
        assert_eq!(next.failures(), 0, "forgotten");
        assert!(reg.remove(&next));
        // Many boxes leaving: the forgotten ones are pruned as the map grows.
        {
            let mut left = reg.health_left.lock().unwrap();
            for i in 0..2000 {
                let health = Arc::new(Mutex::new(Health::default()));
                left.by_box.insert((format!("old-{i}"), 1), (health, past));
            }
        }
        for i in 0..10 {
            let c = super::testing::add(&reg, &format!("new-{i}"), &[], None);
            assert!(reg.remove(&c));
        }
        let left = reg.health_left.lock().unwrap();
        assert!(left.by_box.len() <= 12, "{}", left.by_box.len());
        assert!(left.by_box.contains_key(&("gpu".to_owned(), 1)));
    }

    #[test]
    fn failures_of_requests_a_replaced_session_still_runs_count_for_the_box() {
        let reg = Registry::default();
        let add = |id| super::testing::add(&reg, id, &[], None);
        let old = add("gpu");
        // A reconnect replaces it while its requests still run; they fail.
        let new = add("gpu");
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            old.record_failure();
        }
        assert!(
            new.is_cooling_down(),
            "the box's failures, whichever session"
        );
        new.record_success();
        assert!(!old.is_cooling_down());
        // The old session's end leaves nothing that would hold back the
        // box's next one.
        assert!(!reg.remove(&old), "not the registered session");
        assert!(reg.remove(&new));
        assert!(!add("gpu").is_cooling_down());
    }

    #[test]
    fn a_model_said_twice_is_kept_once_and_not_counted_as_dropped() {
        let model = |name: &str, size| ModelInfo {
            name: name.into(),
            size,
        };
        let (kept, dropped) = within_limits(vec![
            model("llama3", Some(1)),
            model("", None),
            model("qwen", None),
            model("llama3", Some(2)),
            model("bad\n", None),
            model("qwen", None),
        ]);
        assert_eq!(kept, vec![model("llama3", Some(1)), model("qwen", None)]);
        assert_eq!(dropped, 2, "the empty and the control-character names");
        // Past the cap, distinct names are dropped and counted; repeats of
        // kept ones are not.
        let mut many: Vec<_> = (0..MAX_MODELS + 3)
            .map(|i| model(&format!("m{i}"), None))
            .collect();
        many.insert(1, model("m0", None));
        let (kept, dropped) = within_limits(many);
        assert_eq!(kept.len(), MAX_MODELS);
        assert_eq!(kept[1].name, "m1");
        assert_eq!(dropped, 3);
    }

    #[test]
    fn a_report_of_the_service_up_again_ends_one_cool_down_between_successes() {
        let reg = Registry::default();
        let gpu = super::testing::add(&reg, "gpu", &[], None);
        assert!(!gpu.record_service_up(), "nothing to end");
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            gpu.record_failure();
        }
        assert!(gpu.record_service_up());
        assert!(!gpu.is_cooling_down());
        // Its failures stay counted: the next one cools it down again, for
        // longer, and flipping its report does not end that one.
        assert_eq!(gpu.record_failure(), Some(COOLDOWN_BASE * 2));
        assert!(!gpu.record_service_up());
        assert!(gpu.is_cooling_down());
        // A success forgets it all.
        gpu.record_success();
        assert!(!gpu.is_cooling_down());
        for _ in 0..FAILURES_BEFORE_COOLDOWN {
            gpu.record_failure();
        }
        assert!(gpu.record_service_up());
    }

    /// A streak of server errors counts only past its threshold, once it
    /// answered two keys, and any other answer ends it.
    #[test]
    fn server_errors_count_past_a_streak_that_answered_several_keys() {
        let reg = Registry::default();
        let gpu = super::testing::add(&reg, "gpu", &[], None);
        for _ in 0..3 * SERVER_ERRORS_BEFORE_FAILURE {
            assert_eq!(gpu.record_server_error(1), None, "one key");
        }
        assert_eq!(
            gpu.record_server_error(2),
            Some((3 * SERVER_ERRORS_BEFORE_FAILURE + 1, true))
        );
        assert_eq!(
            gpu.record_server_error(1),
            Some((3 * SERVER_ERRORS_BEFORE_FAILURE + 2, false)),
            "said once"
        );
        // A success between ends the streak: short ones on either side of
        // it never count.
        gpu.record_success();
        for round in 0..2 {
            for i in 0..SERVER_ERRORS_BEFORE_FAILURE {
                assert_eq!(gpu.record_server_error(u64::from(i % 2)), None, "{round}");
            }
            gpu.record_success();
        }
        for i in 0..SERVER_ERRORS_BEFORE_FAILURE {
            assert_eq!(gpu.record_server_error(u64::from(i % 2)), None);
        }
        assert_eq!(
            gpu.record_server_error(0),
            Some((SERVER_ERRORS_BEFORE_FAILURE + 1, true)),
            "a new streak is said again"
        );
        assert!(!counts_against_the_box(503) && !counts_against_the_box(504));
        assert!(counts_against_the_box(500) && counts_against_the_box(502));
    }

    /// Requests that failed together (a service crashing under all of
    /// them) make one cool-down, not one doubling each: those sent before
    /// it began are not counted; one sent after it is.
    #[test]
    fn requests_failing_together_cool_a_box_down_once() {
        let reg = Registry::default();
        let gpu = super::testing::add(&reg, "gpu", &[], None);
        let sent = Instant::now();
        assert_eq!(gpu.record_failure_of(sent), None);
        assert_eq!(gpu.record_failure_of(sent), Some(COOLDOWN_BASE));
        for _ in 0..8 {
            assert_eq!(gpu.record_failure_of(sent), None);
        }
        assert_eq!(gpu.failures(), FAILURES_BEFORE_COOLDOWN);
        let left = gpu.cooling_left(Instant::now()).expect("cooling down");
        assert!(left <= COOLDOWN_BASE, "{left:?}");
        // A request sent after the cool-down began fails: it doubles.
        let later = Instant::now();
        assert_eq!(gpu.record_failure_of(later), Some(COOLDOWN_BASE * 2));
        assert_eq!(gpu.record_failure_of(sent), None);
    }
}
