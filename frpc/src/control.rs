//! The control session: log in, register, heartbeat, obey the server; and the
//! reconnect loop around it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    Command, FrameError, FrameReader, MAX_FRAME, ModelInfo, PROTOCOL_VERSION, Registration, Stream,
    SystemInfo, write_command,
};
use tokio::io::{AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::identity::{self, Identity};
use crate::local;
use crate::login::{self, Credentials};
use crate::metrics::Collector;
use crate::tls::Dialer;
use crate::tunnel::{self, Session};

/// How long frpc waits for frps's answer to a login or registration. frps
/// may consult its server plugins first (one after another, each allowed
/// `--plugin-timeout`), so this is well above frps's own frame deadline.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a session must have lasted for the next reconnect to start
/// from `--reconnect-min` again. A session frps ends right after accepting
/// it (a plugin that kicks, an operator's disconnect) is retried with the
/// backoff growing, not every heartbeat.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// How long a password login waits for its token to be written before
/// registering (the write then finishes on its own): frps expects the
/// registration within its handshake timeout (5 s by default).
const TOKEN_SAVE_WAIT: Duration = Duration::from_secs(1);

/// Refused tokens a process remembers (it holds one and reads one from its
/// file; a few more cover renewals refused in turn).
const MAX_REFUSED_TOKENS: usize = 8;

/// Tokens of one session kept for [`common::protocol::TOKEN_ENDED`]: the
/// login's and the latest renewals.
const MAX_SESSION_TOKENS: usize = 8;

/// Shortest time between two renewals of a session that frpc takes.
const RENEWAL_PACE: Duration = Duration::from_secs(1);

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server refused us for a reason retrying cannot fix.
    #[error("{0}")]
    Fatal(String),
    /// Anything else: reconnect after backoff.
    #[error("{0}")]
    Retry(String),
    /// frps cannot log us in now and said for how long: reconnect after
    /// backoff, and not before `at_least`.
    #[error("{reason}")]
    Wait {
        /// What frps said.
        reason: String,
        /// frps's hint, at most [`LONGEST_WAIT_HINT`].
        at_least: Duration,
    },
    /// The saved token was refused: reconnect at once and log in with a password.
    #[error("saved token refused")]
    Relogin,
}

/// A reply frpc could not read as a frame: what answered may be no frps
/// control port at all (its public or API port speaks HTTP, an SSH server
/// its banner); said so, with the first bytes when they are text, rather
/// than as a frame too large to read.
fn not_frps(e: FrameError, addr: &str) -> SessionError {
    let first = match &e {
        FrameError::TooLarge { len, .. } => u32::try_from(*len)
            .ok()
            .map(u32::to_be_bytes)
            .filter(|b| b.iter().all(|c| c.is_ascii_graphic() || *c == b' '))
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        FrameError::Malformed(_) => None,
        _ => return e.into(),
    };
    let seen = match first.as_deref() {
        Some("HTTP") => " (it answered in HTTP: frps's public or API port?)".to_owned(),
        Some(text) => format!(" (its first bytes read {text:?})"),
        None => format!(" ({e})"),
    };
    SessionError::Retry(format!(
        "what answers at {addr} does not speak frpx's control protocol{seen}: --server-addr and --control-port must name frps's control port (17000 by default)"
    ))
}

impl From<FrameError> for SessionError {
    fn from(e: FrameError) -> Self {
        SessionError::Retry(format!("connection to frps failed: {e}"))
    }
}

/// What a session logs in with: decided before frps is dialled.
enum LoginWith {
    /// The saved token ([`Client::usable_saved_token`]).
    Token(login::SavedToken),
    /// Email and password.
    Password(Credentials),
}

/// How a session that registered ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Local shutdown was requested.
    Shutdown,
    /// The server closed or dropped us (reason given when it said one).
    Disconnected(Option<String>),
}

/// Everything a session needs.
pub struct Client {
    config: Arc<Config>,
    identity: Identity,
    shutdown: CancellationToken,
    /// Ends the connections still carrying requests once the drain after
    /// `shutdown` is over (`--shutdown-timeout`).
    hard_stop: CancellationToken,
    tunnels: TaskTracker,
    /// One permit per dial-back data connection held, across sessions
    /// (`--max-data-connections`).
    data_slots: Arc<tunnel::DataSlots>,
    /// Tokens frps refused (revoked, expired), the latest
    /// [`MAX_REFUSED_TOKENS`]: never sent again by this process, neither the
    /// one held in memory nor the file's, which may differ when the file
    /// could not be written (the file keeps its token: frps may refuse it
    /// only for now, a database being restored, and a box without a
    /// password would have nothing left to log in with).
    refused: Mutex<Vec<String>>,
    /// The token the current session logged in with (or was given at its
    /// password login) and its renewals during the session: what frps
    /// means when it ends the session with
    /// [`common::protocol::TOKEN_ENDED`].
    session_tokens: Mutex<Vec<String>>,
    dialer: Dialer,
    /// Whether a session of this process registered: a TLS failure that
    /// stops a first start (a configuration to fix) is retried after that.
    has_registered: AtomicBool,
    plaintext_warned: AtomicBool,
    prompted: Mutex<Option<Credentials>>,
    /// The account the last login was for (saved with a renewed token).
    account: Mutex<String>,
    /// The token for the next login, when it is not (only) the file's, and
    /// the order of the tokens frps gave this process.
    tokens: Arc<Mutex<Tokens>>,
    /// Held while a token file is written: writes land one at a time, and
    /// one overtaken by a newer token is skipped.
    writing: Arc<Mutex<()>>,
    /// Made by the first metrics read, off the runtime's thread: loading
    /// NVML or listing disks can hang (a wedged GPU driver, a dead network
    /// mount), which must not hold up the login or Ctrl-C.
    collector: Arc<Mutex<Option<Collector>>>,
    models_fit: Arc<local::ModelFit>,
    /// What this process last announced of its service, across sessions:
    /// a doubtful probe at a reconnect is judged against it as every other.
    announced: Arc<Mutex<Announced>>,
    /// Renewals saved and not yet said so to frps (`TokenSaved`, sent by
    /// the session that is up when `saved_ready` fires), the latest
    /// [`MAX_SESSION_TOKENS`].
    saved: Arc<Mutex<Vec<String>>>,
    saved_ready: Arc<tokio::sync::Notify>,
    /// This process's hold on its token file (one frpc per token file),
    /// also held by each token write until it is done.
    token_lock: Arc<crate::state_file::TokenFileLock>,
}

/// The tokens frps gave this process.
#[derive(Debug, Default)]
struct Tokens {
    /// The one for the next login, when it is not (only) the file's: one
    /// from a password login (whether or not its file could be written),
    /// a renewal once saved.
    current: Option<login::SavedToken>,
    /// The latest renewal that could not be saved (a read-only token file):
    /// the last resort, once the held and the file's token are expired or
    /// refused. Using it ends the saved one's family, dead by then anyway;
    /// without it, a box with no password would stop for good when the
    /// token it could not replace ran out.
    unsaved: Option<login::SavedToken>,
    /// The token file's token as this process last read it: logged in with
    /// when the file can no longer be read.
    read: Option<login::SavedToken>,
    /// Counts the tokens received: a write or a renewal overtaken by a
    /// later one is dropped.
    turn: u64,
}

impl Tokens {
    /// The turn of a token just received.
    fn next_turn(&mut self) -> u64 {
        self.turn += 1;
        self.turn
    }

    /// Makes the renewal of `turn` the one for the next login, unless a
    /// later token came meanwhile.
    fn keep(&mut self, turn: u64, saved: login::SavedToken) {
        if self.turn == turn {
            self.current = Some(saved);
            self.unsaved = None;
        }
    }

    /// Keeps the renewal of `turn`, which could not be saved, as the last
    /// resort, unless a later token came meanwhile.
    fn keep_unsaved(&mut self, turn: u64, saved: login::SavedToken) {
        if self.turn == turn {
            self.unsaved = Some(saved);
        }
    }
}

impl Client {
    /// A client for `config`, stopping when `shutdown` is cancelled.
    pub fn new(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let token_lock = crate::state_file::lock_token_file(&config.token_file)?;
        Self::holding(config, shutdown, token_lock)
    }

    /// [`Client::new`] with its token file's lock taken.
    fn holding(
        config: Config,
        shutdown: CancellationToken,
        token_lock: crate::state_file::TokenFileLock,
    ) -> anyhow::Result<Self> {
        let identity = identity::resolve(config.client_id.as_deref(), &config.token_file)?;
        let dialer = Dialer::from_config(&config)?;
        let template = registration(&config, &identity, Vec::new(), false);
        let models_fit = Arc::new(local::ModelFit::new(&template)?);
        let data_slots = Arc::new(tunnel::DataSlots::new(config.max_data_connections));
        Ok(Self {
            config: Arc::new(config),
            identity,
            shutdown,
            hard_stop: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            data_slots,
            refused: Mutex::new(Vec::new()),
            session_tokens: Mutex::new(Vec::new()),
            dialer,
            has_registered: AtomicBool::new(false),
            plaintext_warned: AtomicBool::new(false),
            prompted: Mutex::new(None),
            account: Mutex::new(String::new()),
            tokens: Arc::default(),
            writing: Arc::default(),
            collector: Arc::default(),
            models_fit,
            announced: Arc::default(),
            saved: Arc::default(),
            saved_ready: Arc::default(),
            token_lock: Arc::new(token_lock),
        })
    }

    /// Runs sessions until shutdown, reconnecting with backoff. Returns an
    /// error only when the server refuses us for good (bad credentials,
    /// unsupported protocol): it never exits because the server went away.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut floor = Duration::ZERO;
        let result = loop {
            let mut registered = None;
            let ended = self.session(&mut registered).await;
            settle(&mut backoff, registered);
            match ended {
                Ok(SessionEnd::Shutdown) => break Ok(()),
                Ok(SessionEnd::Disconnected(reason)) => {
                    let why = reason.unwrap_or_else(|| "connection closed".into());
                    if why == common::protocol::REPLACED {
                        // Another frpc registered with our id (two on one
                        // machine, or cloned machines): take turns slowly.
                        // Jittered: the two taking turns in step would
                        // keep replacing each other at once.
                        let pause = crate::backoff::at_most(self.config.reconnect_max);
                        error!(
                            "another frpc registered as client id '{}'; give each its own --client-id. Taking the id back in {pause:.1?}",
                            self.identity.client_id
                        );
                        backoff.reset();
                        if self.pause(pause).await {
                            break Ok(());
                        }
                        continue;
                    }
                    if why == common::protocol::TOKEN_ENDED {
                        // Sending them again would only count as failed
                        // logins against this address.
                        let ended =
                            std::mem::take(&mut *self.session_tokens.lock().expect("token lock"));
                        for token in ended {
                            self.refuse_token(token);
                        }
                    }
                    warn!("disconnected from frps: {why}");
                }
                Err(SessionError::Fatal(reason)) => break Err(anyhow::anyhow!(reason)),
                Err(SessionError::Retry(reason)) => warn!("{reason}"),
                Err(SessionError::Wait { reason, at_least }) => {
                    warn!("{reason}");
                    floor = at_least;
                }
                Err(SessionError::Relogin) => continue,
            }
            // An attempt sooner than frps asked would only be refused again;
            // its wait is spread above (boxes refused together, by a frps
            // restarting, come back apart).
            let asked = crate::backoff::at_least(std::mem::take(&mut floor));
            let delay = backoff.next_delay().max(asked);
            info!(
                "reconnecting to {} in {delay:.1?}",
                self.config.control_addr()
            );
            if self.pause(delay).await {
                break Ok(());
            }
        };
        self.drain().await;
        result
    }

    /// Lets the connections still carrying requests finish, for at most
    /// `--shutdown-timeout`, then ends them. The control connection is
    /// closed by now, so frps sends no new request and closes this client's
    /// idle connections itself.
    async fn drain(&self) {
        self.tunnels.close();
        let limit = self.config.shutdown_timeout;
        if !self.tunnels.is_empty() && !limit.is_zero() {
            // Counted as tasks: the connections, and the tunnel's supervisor.
            info!(
                "waiting up to {limit:?} for the requests in flight to finish ({} task(s) open)",
                self.tunnels.len()
            );
        }
        if tokio::time::timeout(limit, self.tunnels.wait())
            .await
            .is_err()
        {
            if !limit.is_zero() {
                warn!(
                    "shutdown deadline passed; closing {} connection(s) still in use",
                    self.tunnels.len()
                );
            }
            self.hard_stop.cancel();
            self.tunnels.wait().await;
        }
    }

    /// Waits `delay`; true when shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    /// One control session; `registered` is set to when frps accepted it.
    async fn session(&self, registered: &mut Option<Instant>) -> Result<SessionEnd, SessionError> {
        // Credentials come before frps is dialled: a person typing a
        // password must not be racing frps's handshake deadline.
        // The file is read on a blocking thread, which a hung disk (an NFS
        // mount gone) can hold: a stop does not wait for it.
        let saved = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            saved = self.usable_saved_token() => saved,
        };
        let with = match saved {
            // Refused before frps is dialled: the rule that lets the
            // password go in plaintext lets such a token go.
            Ok(Some(saved)) if saved.tls && !self.may_send_password() => {
                return Err(SessionError::Fatal(format!(
                    "refusing to send the login token saved in {} to frps at {} over plaintext: it was issued over TLS. Pass --tls (with --tls-ca, or --tls-fingerprint for a self-signed frps) as when it was issued, or --insecure-plaintext on a network you trust",
                    self.config.token_file.display(),
                    self.config.control_addr()
                )));
            }
            Ok(Some(saved)) => LoginWith::Token(saved),
            found => tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                creds = self.password_credentials(found.err()) => LoginWith::Password(creds?),
            },
        };
        // The local service is asked for its models before frps is dialled:
        // a slow or hung service must not eat into frps's handshake deadline.
        let probe = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            (now, listed, list, why) = probe_service(&self.config, &self.models_fit, self.config.connect_timeout) => {
                let mut announced = self.announced.lock().expect("announced lock");
                announced.down_why = why;
                announced.take(now, listed, list, &self.config.local_host())
            }
        };
        let addr = self.config.control_addr();
        let limit = self.config.connect_timeout;
        let stream = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            res = self.dialer.connect(&addr, limit) => res.map_err(|e| {
                dial_failed(e, self.has_registered.load(Ordering::Relaxed), self.config.reconnect_max)
            })?,
        };
        let proxy_addr = tunnel::dial_back_addr(stream.tcp().peer_addr().ok(), &self.config);
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd, MAX_FRAME);

        let handshake = async {
            self.login(&mut reader, &mut wr, with).await?;
            self.register(&mut reader, &mut wr, probe, proxy_addr).await
        };
        let (session, heartbeat, probe) = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            res = handshake => res?,
        };
        *registered = Some(Instant::now());
        self.has_registered.store(true, Ordering::Relaxed);
        let account = self.account.lock().expect("account lock").clone();
        // A token saved before its account was recorded names none.
        let account = if account.is_empty() {
            String::new()
        } else {
            format!(" for account {account}")
        };
        info!(
            "registered with frps at {addr} as '{}'{account} (heartbeat every {heartbeat:?})",
            session.client_id
        );
        self.serve(&mut reader, &mut wr, Arc::new(session), heartbeat, probe)
            .await
    }

    /// Remembers that frps refused `token`, so it is not sent again.
    fn refuse_token(&self, token: String) {
        let mut refused = self.refused.lock().expect("refused lock");
        if !refused.contains(&token) {
            if refused.len() == MAX_REFUSED_TOKENS {
                refused.remove(0);
            }
            refused.push(token);
        }
    }

    /// The token to log in with: the one this process holds (from a
    /// password login, or a renewal once saved), else the file's; one frps
    /// refused in this process, one for another frps and an expired one
    /// are passed over. When the token file exists but cannot be read, the
    /// token it held when last read (or the one held, should it only look
    /// expired); an error without either.
    async fn usable_saved_token(&self) -> Result<Option<login::SavedToken>, login::ReadError> {
        let server = self.config.control_addr();
        let refused = self.refused.lock().expect("refused lock").clone();
        let (held, unsaved, last_read) = {
            let tokens = self.tokens.lock().expect("token lock");
            let t = &*tokens;
            (t.current.clone(), t.unsaved.clone(), t.read.clone())
        };
        // Without a password to fall back on, a token that only looks
        // expired by this machine's clock (booted weeks ahead, before NTP
        // set it) is sent all the same: frps, whose clock decides, may
        // still take it; skipping it would stop frpc for good.
        let judge_expiry = self.has_password() && self.may_send_password();
        let configured_email = self.config.email.clone();
        let usable = |saved: &login::SavedToken| {
            if refused.contains(&saved.token) {
                return false;
            }
            // A token is for the frps that issued it: never hand it to
            // another one (a test server, a typo in --server-addr).
            if !(saved.server.is_empty() || saved.server == server) {
                info!(
                    "the saved token is for frps at {}, not {server}: logging in with email and password",
                    saved.server
                );
                return false;
            }
            // A token is for the account that logged in: one given on the
            // command line (or in frpc.ini) that is another is the one
            // meant (the box moved to another owner), not the token's.
            if let Some(email) = configured_email.as_deref()
                && !saved.email.is_empty()
                && !saved.email.trim().eq_ignore_ascii_case(email.trim())
            {
                info!(
                    "the saved token is for account {}, not {email}: logging in with email and password",
                    saved.email
                );
                return false;
            }
            // Sending a token known to be dead would only count as a
            // failed login against this address.
            if judge_expiry && saved.expired_at(chrono::Utc::now()) {
                info!(
                    "the saved token expired at {}: logging in with email and password",
                    common::text::tame(saved.expires_at.as_deref().unwrap_or("?"), 64)
                );
                return false;
            }
            true
        };
        // Not expired by this clock, when it is not judged: preferred to
        // one that is (the unsaved renewal over the expired saved token).
        let alive = |saved: &login::SavedToken| !saved.expired_at(chrono::Utc::now());
        let held = held.filter(usable);
        if let Some(held) = held.as_ref().filter(|t| alive(t)) {
            return Ok(Some(held.clone()));
        }
        // Off the runtime's one thread: a disk busy with a model loading
        // must not hold up the streams of the previous session.
        let path = self.config.token_file.clone();
        let read = tokio::task::spawn_blocking(move || login::read(&path))
            .await
            .unwrap_or(Ok(None));
        let read = match read {
            Ok(read) => {
                self.tokens.lock().expect("token lock").read = read.clone();
                read
            }
            // Unreadable (replaced by a `sudo frpc` run, say): the token
            // it held when this process last read it, rather than retrying
            // until someone mends the file. Not an unsaved renewal: using
            // it would end the file's token, which may well be alive.
            Err(e) => {
                let own: Vec<_> = [held, last_read]
                    .into_iter()
                    .flatten()
                    .filter(usable)
                    .collect();
                let Some(own) = own.iter().find(|t| alive(t)).or(own.first()) else {
                    return Err(e);
                };
                warn!("{e}; logging in with the token it held when frpc last read it");
                return Ok(Some(own.clone()));
            }
        };
        let candidates: Vec<login::SavedToken> =
            [held, read.filter(usable), unsaved.filter(usable)]
                .into_iter()
                .flatten()
                .collect();
        let found = candidates
            .iter()
            .find(|t| alive(t))
            .or(candidates.first())
            .cloned();
        if let Some(t) = found.as_ref().filter(|t| !alive(t)) {
            warn!(
                "the saved token expired at {} by this machine's clock; sending it anyway (no password to log in with): frps decides",
                common::text::tame(t.expires_at.as_deref().unwrap_or("?"), 64)
            );
        }
        Ok(found)
    }

    /// The token of a password login, for the next login whether or not
    /// it can be written to the token file, where it is saved off the
    /// runtime's thread: a disk busy loading a model must not hold up the
    /// streams, nor (the write waited for [`TOKEN_SAVE_WAIT`] at most) the
    /// registration frps expects within its handshake timeout.
    async fn save_token(&self, token: String, expires_at: Option<String>, email: String) {
        let saved = self.saved_token(token, expires_at, email);
        let turn = {
            let mut tokens = self.tokens.lock().expect("token lock");
            tokens.current = Some(saved.clone());
            tokens.next_turn()
        };
        let write = self.write_token(turn, saved, |saved, file, written| match written {
            // Where, in full: a relative --token-file is the working
            // directory's, which under a service manager may not be
            // what the operator thinks.
            Ok(_) => info!(
                "logged in as {}; token saved to {}",
                saved.email,
                std::path::absolute(file).as_deref().unwrap_or(file).display()
            ),
            Err(e) => warn!(
                "logged in as {}, but cannot save the token ({e:#}); this frpc keeps using it, a restarted one logs in with the password again",
                saved.email
            ),
        });
        // Past the wait, the write finishes (and says so) on its own.
        let _ = tokio::time::timeout(TOKEN_SAVE_WAIT, write).await;
    }

    fn saved_token(
        &self,
        token: String,
        expires_at: Option<String>,
        email: String,
    ) -> login::SavedToken {
        login::SavedToken {
            token,
            expires_at,
            server: self.config.control_addr(),
            email,
            tls: self.dialer.is_tls(),
        }
    }

    /// Adds a renewal to the tokens of the current session: the one it
    /// logged in with and the latest [`MAX_SESSION_TOKENS`] `- 1` renewals.
    fn session_token(&self, token: String) {
        let mut tokens = self.session_tokens.lock().expect("token lock");
        if tokens.len() >= MAX_SESSION_TOKENS {
            tokens.remove(1);
        }
        tokens.push(token);
    }

    /// Saves a token frps renewed (at a token login or during a session),
    /// not held up by the write (the handshake's deadline and the session's
    /// heartbeats go on while a busy disk syncs). Once saved it is the one
    /// for the next login; one that cannot be saved is never used, so the
    /// saved one, which frps keeps valid until its renewal's first use,
    /// still logs in after a restart (and is renewed again then).
    fn renewed(&self, token: String, expires_at: Option<String>) -> tokio::task::JoinHandle<()> {
        // frps's text: shortened, with no control characters for the log.
        let until = expires_at
            .as_deref()
            .map_or_else(|| "no expiry".into(), |t| common::text::tame(t, 64));
        let email = self.account.lock().expect("account lock").clone();
        let saved = self.saved_token(token, expires_at, email);
        let turn = self.tokens.lock().expect("token lock").next_turn();
        let tokens = self.tokens.clone();
        let (acks, ack_ready) = (self.saved.clone(), self.saved_ready.clone());
        self.write_token(turn, saved, move |saved, file, written| match written {
            Ok(durable) => {
                tokens.lock().expect("token lock").keep(turn, saved.clone());
                info!(
                    "frps renewed the login token (valid until {until}); saved to {}",
                    file.display()
                );
                if !durable {
                    // Said saved, frps would revoke the token it replaces,
                    // which a power cut could bring back into the file:
                    // its first login confirms it instead.
                    return;
                }
                // frps hears it is saved: what it replaces (and any copy
                // of that) stops working now, not at the next login.
                let mut acks = acks.lock().expect("saved tokens lock");
                if acks.len() >= MAX_SESSION_TOKENS {
                    acks.remove(0);
                }
                acks.push(saved.token.clone());
                ack_ready.notify_one();
            }
            Err(e) => {
                tokens
                    .lock()
                    .expect("token lock")
                    .keep_unsaved(turn, saved.clone());
                warn!(
                    "frps renewed the login token, but it cannot be saved ({e:#}); frpc keeps logging in with the token it had while it is valid, then with the renewal (a restarted frpc has only the saved one)"
                )
            }
        })
    }

    /// Writes `saved`, the token of `turn`, to the token file on a blocking
    /// thread, then tells `done` how it went; skipped (and `done` not
    /// called) when a later token came first, whose file must not be
    /// replaced by this older one (a renewal frps revoked by renewing the
    /// same token again).
    fn write_token(
        &self,
        turn: u64,
        saved: login::SavedToken,
        done: impl FnOnce(&login::SavedToken, &std::path::Path, anyhow::Result<bool>) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let file = self.config.token_file.clone();
        let (tokens, writing) = (self.tokens.clone(), self.writing.clone());
        // A write still running when this frpc stops keeps the file its
        // own: a frpc started meanwhile waits for it.
        let lock = self.token_lock.clone();
        tokio::task::spawn_blocking(move || {
            let _held = lock;
            let _one_at_a_time = writing.lock().expect("token write lock");
            if tokens.lock().expect("token lock").turn != turn {
                debug!("not saving a token a later one replaced");
                return;
            }
            let written = login::save_durably(&file, &saved);
            done(&saved, &file, written);
        })
    }

    /// Whether a password login is possible: from the flags or the
    /// environment, a prompt, or one prompted for already.
    fn has_password(&self) -> bool {
        self.prompted.lock().expect("credentials lock").is_some()
            || !matches!(
                login::source(
                    self.config.email.as_deref(),
                    self.config.password.as_deref(),
                    !self.config.no_prompt,
                ),
                login::Source::None
            )
    }

    /// Whether a password may go to frps: over TLS, or in plaintext when
    /// allowed (`--insecure-plaintext`).
    fn may_send_password(&self) -> bool {
        self.dialer.is_tls() || self.config.insecure_plaintext
    }

    /// Email and password for a login, refusing to send them in plaintext
    /// unless allowed. `unreadable`: the token file exists but could not be
    /// read; then a password, when there is one, logs in instead, and a
    /// box that has none (or may not send it) retries with backoff rather
    /// than exiting, since the file may be readable again (an I/O error
    /// that passes, permissions an operator fixes).
    async fn password_credentials(
        &self,
        unreadable: Option<login::ReadError>,
    ) -> Result<Credentials, SessionError> {
        // No password to send at all: say that, not that it would go in
        // plaintext.
        if !self.has_password() {
            return Err(match unreadable {
                None => self.no_credentials(),
                Some(e) => SessionError::Retry(format!(
                    "{e}; trying it again (fix the file, or pass --email and --password or set FRPC_EMAIL and FRPC_PASSWORD to log in without it)"
                )),
            });
        }
        if !self.may_send_password() {
            let refusal = format!(
                "refusing to send the account password to frps at {} over plaintext: pass --tls (with --tls-ca, or --tls-fingerprint for a self-signed frps), or --insecure-plaintext on a network you trust",
                self.config.control_addr()
            );
            return Err(match unreadable {
                None => SessionError::Fatal(refusal),
                Some(e) => SessionError::Retry(format!("{e}; trying it again ({refusal})")),
            });
        }
        if let Some(e) = unreadable {
            warn!("{e}; logging in with email and password instead");
        }
        self.credentials().await
    }

    /// Logs in with a saved token.
    async fn login_token(
        &self,
        reader: &mut FrameReader<ReadHalf<Stream>>,
        wr: &mut WriteHalf<Stream>,
        saved: login::SavedToken,
    ) -> Result<(), SessionError> {
        if !self.dialer.is_tls() && !self.plaintext_warned.swap(true, Ordering::Relaxed) {
            warn!(
                "sending the login token to frps over plaintext: anyone on the path can read and reuse it. Use --tls (with --tls-ca or --tls-fingerprint)"
            );
        }
        let refused_token = saved.token.clone();
        write_command(wr, &Command::LoginToken { token: saved.token }).await?;
        match self.expect_reply(reader).await? {
            Command::LoginResult {
                ok: true,
                token,
                expires_at,
                ..
            } => {
                *self.account.lock().expect("account lock") = saved.email.clone();
                *self.session_tokens.lock().expect("token lock") = vec![refused_token];
                // Past half its lifetime, frps hands over a new one.
                if let Some(token) = token {
                    self.session_token(token.clone());
                    drop(self.renewed(token, expires_at));
                }
                Ok(())
            }
            Command::LoginResult {
                reason,
                code,
                retry_after_ms,
                ..
            } => {
                let reason = reason.map_or_else(|| "no reason given".into(), |r| from_frps(&r));
                match code.as_deref() {
                    Some("token_invalid" | "token_expired") => {
                        info!(
                            "frps refused the saved token ({reason}); logging in with email and password"
                        );
                        self.refuse_token(refused_token);
                        Err(SessionError::Relogin)
                    }
                    Some("unavailable" | "throttled") => Err(not_now(reason, retry_after_ms)),
                    _ => Err(SessionError::Fatal(format!(
                        "frps refused the login: {reason}"
                    ))),
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Logs in `with` the saved token or a password.
    async fn login(
        &self,
        reader: &mut FrameReader<ReadHalf<Stream>>,
        wr: &mut WriteHalf<Stream>,
        with: LoginWith,
    ) -> Result<(), SessionError> {
        let creds = match with {
            LoginWith::Password(creds) => creds,
            LoginWith::Token(saved) => return self.login_token(reader, wr, saved).await,
        };
        let email = creds.email.clone();
        write_command(
            wr,
            &Command::Login {
                email: creds.email,
                password: creds.password,
            },
        )
        .await?;
        match self.expect_reply(reader).await? {
            Command::LoginResult {
                ok: true,
                token: Some(token),
                expires_at,
                ..
            } => {
                *self.account.lock().expect("account lock") = email.clone();
                *self.session_tokens.lock().expect("token lock") = vec![token.clone()];
                // A token that cannot be saved (a full disk, a read-only
                // directory) costs a restarted frpc a password login, not
                // this one or its next sessions.
                self.save_token(token, expires_at, email).await;
                Ok(())
            }
            Command::LoginResult { ok: true, .. } => Err(SessionError::Retry(
                "frps accepted the login but sent no token".into(),
            )),
            Command::LoginResult {
                reason,
                code,
                retry_after_ms,
                ..
            } => {
                let reason = reason.map_or_else(|| "no reason given".into(), |r| from_frps(&r));
                match code.as_deref() {
                    // Too many attempts from this address (another box behind
                    // the same NAT, or several logging in at once): wait.
                    Some("unavailable" | "throttled") => Err(not_now(reason, retry_after_ms)),
                    _ => Err(SessionError::Fatal(format!("login failed: {reason}"))),
                }
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Email and password from flags, the environment or a prompt (asked
    /// once per process).
    async fn credentials(&self) -> Result<Credentials, SessionError> {
        if let Some(c) = self.prompted.lock().expect("credentials lock").clone() {
            return Ok(c);
        }
        match login::source(
            self.config.email.as_deref(),
            self.config.password.as_deref(),
            !self.config.no_prompt,
        ) {
            login::Source::Given(c) => Ok(c),
            login::Source::Prompt => {
                // Said in the log too: the prompt itself may be where
                // nobody looks (a container's terminal).
                warn!(
                    "{}: asking for the account's email and password on the terminal (answer within {PROMPT_TIMEOUT:?}; --no-prompt to fail instead)",
                    self.why_no_token()
                );
                let (email, password) = (self.config.email.clone(), self.config.password.clone());
                let creds = answered_within(PROMPT_TIMEOUT, move || {
                    login::prompt(email.as_deref(), password.as_deref())
                })
                .await?;
                *self.prompted.lock().expect("credentials lock") = Some(creds.clone());
                Ok(creds)
            }
            login::Source::None => Err(self.no_credentials()),
        }
    }

    /// Neither a usable saved token nor a password: why, and what to do.
    fn no_credentials(&self) -> SessionError {
        SessionError::Fatal(format!(
            "{} and no credentials: pass --email and --password (or set FRPC_EMAIL and FRPC_PASSWORD), or run frpc in a terminal to be prompted",
            self.why_no_token()
        ))
    }

    /// Why a password is needed: the saved token refused, or none usable.
    fn why_no_token(&self) -> String {
        if self.refused.lock().expect("refused lock").is_empty() {
            format!(
                "no usable saved token in {}",
                self.config.token_file.display()
            )
        } else {
            format!(
                "frps refused the saved token in {}",
                self.config.token_file.display()
            )
        }
    }

    async fn register(
        &self,
        reader: &mut FrameReader<ReadHalf<Stream>>,
        wr: &mut WriteHalf<Stream>,
        (models, service_up): Probe,
        proxy_addr: String,
    ) -> Result<(Session, Duration, Probe), SessionError> {
        if !service_up {
            let why = self.announced.lock().expect("announced lock").why_down();
            warn!(
                "the local service at {} does not answer{why}; registering as unhealthy until it does",
                self.config.local_host()
            );
        }
        let registration = registration(&self.config, &self.identity, models.clone(), service_up);
        write_command(wr, &Command::Register(registration)).await?;
        match self.expect_reply(reader).await? {
            Command::Registered {
                client_id,
                session_key,
                heartbeat_interval_ms,
                mux,
            } => Ok((
                Session {
                    client_id,
                    session_key,
                    mux,
                    proxy_addr,
                },
                Duration::from_millis(heartbeat_interval_ms.max(100)),
                (models, service_up),
            )),
            Command::RegisterRefused { reason, retry } => {
                let msg = format!("frps refused the registration: {}", from_frps(&reason));
                Err(if retry {
                    SessionError::Retry(msg)
                } else {
                    SessionError::Fatal(msg)
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Reads the reply to a handshake frame.
    async fn expect_reply(
        &self,
        reader: &mut FrameReader<ReadHalf<Stream>>,
    ) -> Result<Command, SessionError> {
        // One deadline for the reply, whatever comes before it: commands
        // of a newer frps this frpc does not know are skipped, as the
        // protocol says (not taken for a wrong reply).
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let read = reader.read_command_within(left).await;
            match read.map_err(|e| not_frps(e, &self.config.control_addr()))? {
                Some(Command::Error { message }) => {
                    return Err(SessionError::Fatal(format!(
                        "frps: {}",
                        from_frps(&message)
                    )));
                }
                Some(Command::Unknown) => continue,
                Some(cmd) => return Ok(cmd),
                None => {
                    return Err(SessionError::Retry(
                        "frps closed the connection during the handshake".into(),
                    ));
                }
            }
        }
    }

    async fn serve(
        &self,
        reader: &mut FrameReader<ReadHalf<Stream>>,
        wr: &mut WriteHalf<Stream>,
        session: Arc<Session>,
        heartbeat: Duration,
        probe: Probe,
    ) -> Result<SessionEnd, SessionError> {
        let (out_tx, mut out_rx) = mpsc::channel::<Command>(64);
        let reporter = report(
            self.config.clone(),
            self.collector.clone(),
            self.models_fit.clone(),
            probe,
            self.announced.clone(),
            out_tx.clone(),
        );
        // The reporter and the tunnel connection live as long as this
        // session (a fatal error ends it without a shutdown: the process's
        // exit must not wait for the reporter's next tick).
        let session_over = self.shutdown.child_token();
        let _end_session = session_over.clone().drop_guard();
        let stop = session_over.clone();
        self.tunnels.spawn(async move {
            tokio::select! {
                _ = reporter => {}
                _ = stop.cancelled() => {}
            }
        });
        if session.mux {
            self.tunnels.spawn(tunnel::run_tunnel(
                self.config.clone(),
                self.dialer.clone(),
                session.clone(),
                self.tunnels.clone(),
                self.data_slots.clone(),
                session_over,
                self.hard_stop.clone(),
            ));
        }
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let silence = heartbeat * 3;
        let dead = tokio::time::sleep(silence);
        tokio::pin!(dead);
        let mut seq = 0u64;
        let mut renewals = common::pace::Pace::new(RENEWAL_PACE);
        let mut errors = common::pace::Pace::new(Duration::from_secs(1));
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    // frps hears a stop, not a crash: the requests waiting
                    // for this box's dial-backs go elsewhere without its
                    // being counted as failing. No write of this loop is
                    // midway here (one cut by the shutdown returns at once).
                    let bye = Command::Disconnect { reason: STOPPING.into() };
                    let _ = tokio::time::timeout(GOODBYE_WRITE, write_command(wr, &bye)).await;
                    return Ok(SessionEnd::Shutdown);
                }
                // A write of this loop may have waited most of the window
                // (its limit is the window): what frps sent meanwhile is
                // read before it is taken for silent.
                _ = &mut dead => match reader.read_command_now().await {
                    Some(frame) => frame,
                    None => return Err(SessionError::Retry(format!("frps silent for {silence:?}"))),
                },
                _ = ticker.tick() => {
                    seq += 1;
                    let beat = Command::Heartbeat { seq };
                    if !send_within(wr, &beat, silence, &self.shutdown).await? {
                        return Ok(SessionEnd::Shutdown);
                    }
                    continue;
                }
                Some(cmd) = out_rx.recv() => {
                    if !send_within(wr, &cmd, silence, &self.shutdown).await? {
                        return Ok(SessionEnd::Shutdown);
                    }
                    continue;
                }
                _ = self.saved_ready.notified() => {
                    let saved = std::mem::take(&mut *self.saved.lock().expect("saved tokens lock"));
                    for token in saved {
                        let said = Command::TokenSaved { token };
                        if !send_within(wr, &said, silence, &self.shutdown).await? {
                            return Ok(SessionEnd::Shutdown);
                        }
                    }
                    continue;
                }
                frame = reader.read_command() => frame,
            };
            let Some(cmd) = frame? else {
                return Ok(SessionEnd::Disconnected(None));
            };
            dead.as_mut().reset(Instant::now() + silence);
            match cmd {
                Command::OpenConnection { conn_id } => self.open(conn_id, &session, &out_tx),
                Command::HeartbeatAck { .. } => {}
                Command::TokenRenewed { token, expires_at } => {
                    // frps renews a token past half its lifetime (days):
                    // renewals without pause (a broken frps) are not
                    // each kept and written.
                    if !renewals.admit() {
                        warn!(
                            "frps renewed the login token again within {RENEWAL_PACE:?}; ignoring the renewal"
                        );
                        continue;
                    }
                    // frps now watches the renewal for this session.
                    self.session_token(token.clone());
                    drop(self.renewed(token, expires_at));
                }
                Command::Disconnect { reason } => {
                    return Ok(SessionEnd::Disconnected(Some(from_frps(&reason))));
                }
                Command::Error { message } => report_error(&mut errors, &message),
                Command::Unknown => {
                    debug!("ignoring a command this frpc does not know (a newer frps)")
                }
                other => warn!("ignoring unexpected {} from frps", other.name()),
            }
        }
    }
}

impl Client {
    /// Opens data connection `conn_id` in a task holding one of the
    /// `--max-data-connections` slots; without a free slot, tells frps
    /// (`OpenFailed`) at once, or, when the control connection's queue is
    /// full too, lets frps's pairing time out.
    fn open(&self, conn_id: uuid::Uuid, session: &Arc<Session>, out: &mpsc::Sender<Command>) {
        let slot = match self
            .data_slots
            .take(format_args!("data connection {conn_id}"))
        {
            Ok(slot) => slot,
            Err(reason) => {
                let _ = out.try_send(Command::OpenFailed { conn_id, reason });
                return;
            }
        };
        let open = tunnel::open(
            self.config.clone(),
            self.dialer.clone(),
            session.clone(),
            conn_id,
            out.clone(),
        );
        let stop = self.hard_stop.clone();
        self.tunnels.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = open => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The longest text from frps (a refusal's reason, an `Error`'s message)
/// that frpc logs or prints; longer is cut.
pub const MAX_FRPS_TEXT: usize = 1024;

/// Text from frps as frpc logs it: at most [`MAX_FRPS_TEXT`] characters,
/// control characters as spaces (frps's frames carry up to 64 KiB).
pub(crate) fn from_frps(text: &str) -> String {
    common::text::tame(text, MAX_FRPS_TEXT)
}

/// Logs an `Error` frps sent: a line a second at most at warn, the rest at
/// debug (the text and the pace are frps's).
fn report_error(pace: &mut common::pace::Pace, message: &str) {
    if pace.admit() {
        warn!("frps reported an error: {}", from_frps(message));
    } else {
        debug!("frps reported an error: {}", from_frps(message));
    }
}

/// How long frpc waits for an answer at its password prompt.
pub const PROMPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Credentials from `ask` (a prompt, on a blocking thread), or an error
/// once `limit` passed without an answer: a terminal nobody types in (under
/// `docker run -t` without `-i`, stdin is a terminal that never speaks)
/// must not hold frpc for ever. The thread left waiting does not hold up
/// the exit.
async fn answered_within(
    limit: Duration,
    ask: impl FnOnce() -> anyhow::Result<Credentials> + Send + 'static,
) -> Result<Credentials, SessionError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(ask)).await {
        Err(_) => Err(SessionError::Fatal(format!(
            "no answer at the terminal's prompt within {limit:?} (a terminal nobody types in, as under `docker run -t` without `-i`?): pass --email and --password (or set FRPC_EMAIL and FRPC_PASSWORD), or --no-prompt"
        ))),
        Ok(Err(e)) => Err(SessionError::Fatal(format!("prompt failed: {e}"))),
        Ok(Ok(Err(e))) => Err(SessionError::Fatal(format!(
            "cannot read credentials: {e:#}"
        ))),
        Ok(Ok(Ok(creds))) => Ok(creds),
    }
}

/// Longest wait frps's hint on a refused login makes frpc keep to (its
/// own throttle asks for a minute at most).
pub const LONGEST_WAIT_HINT: Duration = Duration::from_secs(300);

/// A login frps cannot grant now (`throttled`, `unavailable`): retried
/// after backoff, and not before frps's `retry_after_ms` when it gave one.
fn not_now(reason: String, retry_after_ms: Option<u64>) -> SessionError {
    let reason = format!("frps cannot log us in now: {reason}");
    match retry_after_ms {
        Some(ms) => SessionError::Wait {
            reason,
            at_least: Duration::from_millis(ms).min(LONGEST_WAIT_HINT),
        },
        None => SessionError::Retry(reason),
    }
}

/// After a session that frps accepted at `registered`: the backoff starts
/// over if it lasted [`STABLE_SESSION`].
fn settle(backoff: &mut Backoff, registered: Option<Instant>) {
    if registered.is_some_and(|at| at.elapsed() >= STABLE_SESSION) {
        backoff.reset();
    }
}

/// Writes `cmd` to frps; true once written. A server that takes none of it
/// for `limit` (stuck, or its connection dead without a reset) is given up
/// for a reconnect; a shutdown meanwhile ends the wait at once (false).
/// Without this a blocked write held up the session loop, its silence
/// timer and Ctrl-C alike.
async fn send_within<W: AsyncWrite + Unpin>(
    wr: &mut W,
    cmd: &Command,
    limit: Duration,
    shutdown: &CancellationToken,
) -> Result<bool, SessionError> {
    tokio::select! {
        written = tokio::time::timeout(limit, write_command(wr, cmd)) => match written {
            Ok(done) => done.map(|()| true).map_err(Into::into),
            Err(_) => Err(SessionError::Retry(format!(
                "frps took no {} for {limit:?}",
                cmd.name()
            ))),
        },
        _ = shutdown.cancelled() => Ok(false),
    }
}

/// The `Disconnect` reason frpc sends frps when it stops (SIGINT, SIGTERM).
pub const STOPPING: &str = "frpc is shutting down";

/// How long frpc's `Disconnect` may take to write when it stops.
const GOODBYE_WRITE: Duration = Duration::from_secs(1);

/// What frpc announces when it registers.
fn registration(
    config: &Config,
    identity: &Identity,
    models: Vec<ModelInfo>,
    service_up: bool,
) -> Registration {
    Registration {
        client_id: identity.client_id.clone(),
        machine_id: identity.machine_id.clone(),
        hostname: identity::hostname(),
        os: identity::os(),
        arch: identity::arch(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: PROTOCOL_VERSION,
        metas: crate::config::meta_map(&config.metas),
        user: config.user.clone(),
        proxy_metas: crate::config::meta_map(&config.proxy_metas),
        models,
        local_host: config.local_host(),
        service_up,
        max_concurrency: config.max_concurrency,
    }
}

/// The local service's models and whether it answered.
type Probe = (Vec<ModelInfo>, bool);

/// What a process announced of its service, for [`after_probe`].
#[derive(Debug, Default)]
struct Announced {
    /// The last probe announced, none before the first registration.
    last: Option<Probe>,
    /// Whether the probe before was doubtful.
    unlisted_before: bool,
    /// The kind of answer without a model list last said.
    no_list: Option<String>,
    /// Whether the last probe judged was a doubtful one set aside.
    held: bool,
    /// Why the last probe found the service down or slow, if it did.
    down_why: Option<String>,
}

impl Announced {
    /// ` (why)` the last probe found the service down or slow, or nothing.
    fn why_down(&self) -> String {
        self.down_why
            .as_deref()
            .map(|why| format!(" ({why})"))
            .unwrap_or_default()
    }

    /// Says (once per reason) that the service answers without a model
    /// list (`why`; `None`: it listed its models), and when it lists them
    /// again: such a box is announced up with no models (the second such
    /// answer in a row is believed), so requests naming a model never
    /// reach it, and nothing else at the default level would say why.
    /// Called after [`Announced::judge`]: an answer it set aside (the
    /// first in a row, a passing error) is not said.
    fn note_list(&mut self, why: Option<NoList>, service: &str) {
        match (why, &self.no_list) {
            (Some(_), _) if self.held => {}
            (Some(NoList { kind, why }), said) if said.as_ref() != Some(&kind) => {
                warn!(
                    "the local service at {service} answers, but not with a model list ({why}): this box is announced with no models, so requests naming a model do not come to it (is --local-port the service's, and does it want an API key?)"
                );
                self.no_list = Some(kind);
            }
            (None, Some(_)) => {
                info!("the local service at {service} lists its models again");
                self.no_list = None;
            }
            _ => {}
        }
    }

    /// A probe of the service at `service`, as [`probe_service`] returns
    /// it: judged ([`Announced::judge`]), then what it says of the model
    /// list noted ([`Announced::note_list`]); what to announce.
    fn take(
        &mut self,
        now: Probe,
        listed: bool,
        list: Option<Option<NoList>>,
        service: &str,
    ) -> Probe {
        let judged = self.judge(now, listed);
        if let Some(why) = list {
            self.note_list(why, service);
        }
        judged
    }

    /// What to announce after probe `now` (`listed`: to be believed at
    /// once), remembered as the last announced.
    fn judge(&mut self, now: Probe, listed: bool) -> Probe {
        let judged = match &self.last {
            Some(last) => {
                self.held = !listed && holds_doubt(last, self.unlisted_before);
                after_probe(last, now, listed, &mut self.unlisted_before)
            }
            None => {
                self.held = false;
                self.unlisted_before = !listed;
                now
            }
        };
        // A service that is down keeps the models it last listed, announced
        // as down: frps then answers their callers 503 (retry) and keeps
        // their queues, rather than 404 `model_not_found` (which SDKs take
        // for good) while Ollama restarts or vLLM loads its weights.
        let judged = match (&self.last, judged) {
            (Some((models, _)), (none, false)) if none.is_empty() => (models.clone(), false),
            (_, judged) => judged,
        };
        self.last = Some(judged.clone());
        judged
    }
}

/// Why the local service's answer was no model list.
#[derive(Debug, Clone, PartialEq)]
struct NoList {
    /// Its kind ([`local::ProbeError::kind`]): a reason is said once.
    kind: String,
    /// What is said.
    why: String,
}

/// Asks the local service for its models, keeping those that fit in a
/// control frame (`fit`), and says whether the answer is to be believed
/// at once: false for an answer that was not a model list (an error status,
/// a body cut short or too large) and for a service that did not answer in
/// time (busy: a model loading, long prompts being tokenised), which
/// [`after_probe`] believes only the second time in a row. A service that
/// cannot be reached is down at once.
/// The third value is why an answer was no model list (`None` when it was
/// one, or when the service did not answer).
/// The fourth value is why the service is down or slow (for the line that
/// says it stopped answering).
async fn probe_service(
    config: &Config,
    fit: &local::ModelFit,
    deadline: Duration,
) -> (Probe, bool, Option<Option<NoList>>, Option<String>) {
    match local::models(&config.local_host(), deadline, &fit.listed).await {
        Ok(models) => ((fit.fit(models), true), true, Some(None), None),
        Err(e @ local::ProbeError::Unreachable(_)) => {
            debug!("local service down: {e}");
            let why = common::text::tame(&e.to_string(), 512);
            ((Vec::new(), false), true, None, Some(why))
        }
        // Not ready (llama.cpp loading its model answers 503; a proxy in
        // front of a vLLM still starting, 502 or 504): as a service slow
        // to answer, doubtful once, down the second time in a row, its
        // models kept.
        Err(
            e @ (local::ProbeError::Timeout(_)
            | local::ProbeError::Status {
                status: 502..=504, ..
            }),
        ) => {
            debug!("local service slow to answer or not ready: {e}");
            let why = common::text::tame(&e.to_string(), 512);
            ((Vec::new(), false), false, None, Some(why))
        }
        Err(e) => {
            debug!("local service has no model list: {e}");
            let why = common::text::tame(&e.to_string(), 512);
            let kind = e.kind();
            (
                (Vec::new(), true),
                false,
                Some(Some(NoList { kind, why })),
                None,
            )
        }
    }
}

/// Longest a model-list probe waits for its answer, whatever
/// `--metrics-interval`.
pub const PROBE_MOST: Duration = Duration::from_secs(30);

/// How long the reporter's model-list probe waits for its answer: until
/// the next probe is due (`--metrics-interval`), at most [`PROBE_MOST`],
/// at least `--connect-timeout` (the probe before registering keeps to
/// `--connect-timeout`: a hung service must not delay every
/// registration). A service saturated with requests (vLLM's event
/// loop streaming to hundreds of callers) answers its model list in
/// seconds: held to `--connect-timeout` (5 s), two such answers in a row
/// marked a box down while it served at full load, and back at the next
/// quick one, over and over.
pub fn probe_deadline(config: &Config) -> Duration {
    config
        .metrics_interval
        .min(PROBE_MOST)
        .max(config.connect_timeout)
}

/// What the reporter announces after a probe: a doubtful one (no model
/// list, or no answer in time) after a service that was up keeps what it
/// said (a passing error status or a busy moment must not withdraw every
/// model, nor mark the box down); the second in a row is believed.
fn after_probe(last: &Probe, now: Probe, listed: bool, unlisted_before: &mut bool) -> Probe {
    if listed {
        *unlisted_before = false;
        return now;
    }
    let keep = holds_doubt(last, *unlisted_before);
    *unlisted_before = true;
    if keep { last.clone() } else { now }
}

/// Whether a doubtful probe after `last` is set aside: `last` was up, and
/// the probe before was not doubtful too.
fn holds_doubt(last: &Probe, unlisted_before: bool) -> bool {
    last.1 && !unlisted_before
}

/// System metrics from `collector` (made by the first read), read off the
/// async thread, or `None` when they took longer than `limit` (a GPU
/// driver or a network mount that hangs, when loaded or when read) or the
/// previous read is still stuck: at most one thread ever waits on a hung
/// read, and the model reports go on.
async fn read_metrics(
    collector: &Arc<Mutex<Option<Collector>>>,
    limit: Duration,
) -> Option<SystemInfo> {
    let c = collector.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut c = match c.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(c.get_or_insert_with(Collector::new).collect_within(limit))
    });
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(info)) => info,
        Ok(Err(_)) => None,
        Err(_) => {
            warn!("reading system metrics took over {limit:?}; skipping them until it ends");
            None
        }
    }
}

/// Every `--metrics-interval`: system metrics, and the model list when it
/// (or the service's health) changed. Ends with the session (its channel).
async fn report(
    config: Arc<Config>,
    collector: Arc<Mutex<Option<Collector>>>,
    fit: Arc<local::ModelFit>,
    mut last: Probe,
    announced: Arc<Mutex<Announced>>,
    out: mpsc::Sender<Command>,
) {
    let mut tick = tokio::time::interval(config.metrics_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate: metrics at once; the models were just
    // probed for the registration.
    let mut first = true;
    // Whether a report trimmed to fit a frame was said (once a session).
    let mut trimmed_said = false;
    loop {
        tick.tick().await;
        // The session is over (its loop dropped the receiver): so is this,
        // whether or not a send would have noticed this tick.
        if out.is_closed() {
            return;
        }
        let report = read_metrics(&collector, config.metrics_interval)
            .await
            .and_then(crate::metrics::fit_in_frame);
        if let Some((info, trimmed)) = report {
            if trimmed && !std::mem::replace(&mut trimmed_said, true) {
                warn!(
                    "this box's metrics report is over a control frame's {MAX_FRAME} bytes: sending it with its first GPUs and disks only"
                );
            }
            if out.send(Command::SystemInfo(info)).await.is_err() {
                return;
            }
        }
        if std::mem::take(&mut first) {
            continue;
        }
        let (now, listed, list, why) = probe_service(&config, &fit, probe_deadline(&config)).await;
        // The session ended during the probe: the next one's start-up
        // probe is judged afresh, not as the second of two slow answers.
        if out.is_closed() {
            return;
        }
        let (now, why) = {
            let mut announced = announced.lock().expect("announced lock");
            announced.down_why = why;
            let now = announced.take(now, listed, list, &config.local_host());
            (now, announced.why_down())
        };
        tracing::debug!(
            models = now.0.len(),
            up = now.1,
            changed = now != last,
            "probed the local service"
        );
        if now.1 != last.1 {
            if now.1 {
                info!("the local service at {} answers again", config.local_host());
            } else {
                warn!(
                    "the local service at {} stopped answering{why}",
                    config.local_host()
                );
            }
        }
        if now != last {
            let update = Command::ModelsUpdate {
                models: now.0.clone(),
                service_up: now.1,
            };
            if out.send(update).await.is_err() {
                return;
            }
            last = now;
        }
    }
}

/// What a failed dial of the control connection ends the session with. A
/// certificate frpc refuses, or a port that does not speak TLS, stops a
/// first start: the configuration has to change. Once this process has
/// registered, the same is retried (every `max`, saying so at error
/// level): a box left running for months must not stop for good over a
/// frps restarted once with a wrong certificate chain, or a middlebox that
/// answered in its place, with nobody there to start it again.
/// Verification is not weakened: nothing is sent until a handshake passes.
fn dial_failed(e: crate::tls::DialError, has_registered: bool, max: Duration) -> SessionError {
    match (e.is_fatal(), has_registered) {
        (true, false) => SessionError::Fatal(e.to_string()),
        (true, true) => {
            error!("{e}; retrying, since this frpc was registered with frps before");
            SessionError::Wait {
                reason: "the TLS handshake with frps failed".into(),
                // Jittered: a fleet refused by one bad deployment must not
                // come back in lockstep.
                at_least: crate::backoff::at_most(max),
            }
        }
        (false, _) => SessionError::Retry(e.to_string()),
    }
}

fn unexpected(cmd: &Command) -> SessionError {
    SessionError::Retry(format!(
        "unexpected {} from frps during the handshake",
        cmd.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Probe {
        let models = names
            .iter()
            .map(|n| ModelInfo {
                name: (*n).into(),
                ..ModelInfo::default()
            })
            .collect();
        (models, true)
    }

    /// A client for `config` that does not take its token file's lock:
    /// for tests of several processes' views of one file.
    fn unlocked(config: Config) -> Client {
        let none = crate::state_file::TokenFileLock::none();
        Client::holding(config, CancellationToken::new(), none).unwrap()
    }

    fn client_saving_to(token_file: &std::path::Path) -> Client {
        use clap::Parser;
        let config = Config::parse_from([
            "frpc",
            "--client-id",
            "gpu",
            "--token-file",
            &token_file.display().to_string(),
        ]);
        Client::new(config, CancellationToken::new()).unwrap()
    }

    #[tokio::test]
    async fn a_renewal_is_used_once_saved_and_never_when_it_cannot_be() {
        let dir = std::env::temp_dir().join(format!("frpc-renew-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // Saved: the next login uses it.
        let path = dir.join("token.json");
        let client = client_saving_to(&path);
        client.renewed("frpxc_new".into(), None).await.unwrap();
        assert_eq!(login::load(&path).unwrap().token, "frpxc_new");
        assert_eq!(
            client.usable_saved_token().await.unwrap().unwrap().token,
            "frpxc_new"
        );
        // frps is told it is saved (its parent then stops working).
        assert_eq!(*client.saved.lock().unwrap(), ["frpxc_new"]);
        // Saved where the directory cannot be synced (a share refusing
        // fsync on directories): used, but not said saved: a power cut
        // could bring back the token it replaces, which frps would have
        // revoked. Its first login confirms it instead.
        let unsynced = dir.join("unsynced");
        std::fs::create_dir_all(&unsynced).unwrap();
        common::private_file::testing::refuse_directory_sync(&unsynced);
        let client = client_saving_to(&unsynced.join("token.json"));
        client
            .renewed("frpxc_undurable".into(), None)
            .await
            .unwrap();
        assert_eq!(
            login::load(&unsynced.join("token.json")).unwrap().token,
            "frpxc_undurable"
        );
        assert_eq!(
            client.usable_saved_token().await.unwrap().unwrap().token,
            "frpxc_undurable"
        );
        assert!(client.saved.lock().unwrap().is_empty(), "not said saved");
        // Not saved (the token file's name is taken by a directory): the
        // token it renews stays the one to log in with, and no temporary
        // copy of the new one is left behind.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("token.json")).unwrap();
        let client = client_saving_to(&blocked.join("token.json"));
        client.renewed("frpxc_unsaved".into(), None).await.unwrap();
        assert!(client.tokens.lock().unwrap().current.is_none());

        assert_eq!(
            client
                .tokens
                .lock()
                .unwrap()
                .unsaved
                .as_ref()
                .unwrap()
                .token,
            "frpxc_unsaved",
            "kept as the last resort"
        );
        let left: Vec<_> = std::fs::read_dir(&blocked)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.contains("tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_service_answering_without_a_model_list_is_said_once_per_reason_once_believed() {
        let mut announced = Announced::default();
        // A probe taken as the reporter takes it; what it warned.
        let mut probe = |why: Option<(&str, &str)>| {
            let said = common::testing::logged(|| {
                let now = match why {
                    None => listed(&["llama3"]),
                    Some(_) => (Vec::new(), true),
                };
                let listed = why.is_none();
                let why = why.map(|(kind, why)| NoList {
                    kind: kind.into(),
                    why: why.into(),
                });
                announced.take(now, listed, Some(why), "127.0.0.1:11434");
            })
            .1;
            (said, announced.no_list.clone())
        };
        assert_eq!(probe(None), (String::new(), None));
        // One error in passing is set aside: not said (nor its end).
        let passing = Some(("503 on /api/tags", "local service answered 503"));
        assert_eq!(probe(passing), (String::new(), None));
        assert_eq!(probe(None), (String::new(), None));
        // The second in a row is believed and said.
        let denied = |column| {
            let why = format!("local service answered 401 on /v1/models (line 1 column {column})");
            Some(("401 on /v1/models", why.leak() as &str))
        };
        assert_eq!(probe(denied(3)).0, "");
        let (said, kind) = probe(denied(4));
        assert!(
            said.contains("answers, but not with a model list (local service answered 401 on /v1/models (line 1 column 4))")
                && said.contains("API key"),
            "{said}"
        );
        assert_eq!(kind.as_deref(), Some("401 on /v1/models"));
        // Not at every probe, though its details change.
        assert_eq!(probe(denied(5)).0, "");
        let other = Some((
            "404 on /api/tags",
            "local service answered 404 on /api/tags",
        ));
        assert!(probe(other).0.contains("404"));
        // Listing again (said at info level, not captured here), once.
        assert_eq!(probe(None), (String::new(), None));
        assert_eq!(probe(other).0, "");
        assert!(probe(other).0.contains("404"));
        // At start nothing is kept: the first such answer is believed.
        let mut fresh = Announced::default();
        fresh.judge((Vec::new(), true), false);
        let said = common::testing::logged(|| {
            let why = NoList {
                kind: "401 on /v1/models".into(),
                why: "local service answered 401 on /v1/models".into(),
            };
            fresh.note_list(Some(why), "127.0.0.1:11434");
        })
        .1;
        assert!(said.contains("401"), "{said}");
    }

    #[test]
    fn a_service_gone_down_is_said_with_why_and_keeps_its_models() {
        let (update, said) = common::testing::logged(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                // Nothing listens there any more.
                let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = closed.local_addr().unwrap().port().to_string();
                drop(closed);
                let (reporter, mut rx, _) = reporter_up_with_llama3(&port);
                let update = loop {
                    let cmd = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
                    if let Command::ModelsUpdate { models, service_up } = cmd.unwrap().unwrap() {
                        break (models, service_up);
                    }
                };
                reporter.abort();
                update
            })
        });
        // Down, its models kept (frps answers their callers 503, not 404).
        assert!(!update.1);
        assert_eq!(update.0.len(), 1);
        assert_eq!(update.0[0].name, "llama3");
        // The line says why.
        assert!(
            said.contains("stopped answering (local service unreachable: "),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_service_answering_503_is_not_ready_not_without_models() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // llama.cpp while it loads its model: 503 on every path.
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = service.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = service.accept().await {
                let _ = s.read(&mut [0u8; 4096]).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let config = {
            use clap::Parser;
            let port = port.to_string();
            Config::parse_from(["frpc", "--client-id", "gpu", "--local-port", &port])
        };
        let fit = local::ModelFit::new(&common::Registration::default()).unwrap();
        let (probe, believed, list, why) =
            probe_service(&config, &fit, config.connect_timeout).await;
        assert_eq!(probe, (Vec::new(), false), "down, not up without models");
        assert!(!believed, "doubtful: believed the second time");
        assert!(list.is_none());
        assert!(why.unwrap().contains("503"));
        // Judged after a service that listed models: they are kept, and
        // the box is down the second time.
        let mut announced = Announced::default();
        announced.judge(listed(&["llama3"]), true);
        assert_eq!(
            announced.judge(probe.clone(), believed),
            listed(&["llama3"])
        );
        assert_eq!(
            announced.judge(probe, believed),
            (listed(&["llama3"]).0, false)
        );
    }

    #[tokio::test]
    async fn a_probe_ending_after_its_session_is_not_judged() {
        // A service that takes the probe's connection and never answers.
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = service.local_addr().unwrap().port().to_string();
        let (reporter, rx, announced) = reporter_up_with_llama3(&port);
        // The probe is under way: the session ends meanwhile.
        let within = Duration::from_secs(10);
        let accepted = tokio::time::timeout(within, service.accept()).await;
        let (_held, _) = accepted.expect("probed").unwrap();
        drop(rx);
        let ended = tokio::time::timeout(within, reporter).await;
        ended.expect("the reporter ended").unwrap();
        let announced = announced.lock().unwrap();
        assert!(
            !announced.unlisted_before,
            "the late probe counted as a doubtful one"
        );
        assert_eq!(announced.last, Some((llama3(), true)));
    }

    fn llama3() -> Vec<ModelInfo> {
        vec![ModelInfo {
            name: "llama3".into(),
            size: None,
        }]
    }

    /// The reporter of a session whose service (at `port`) last listed
    /// `llama3`, up, probing every second: its task, what it sends, and
    /// what it announced.
    fn reporter_up_with_llama3(
        port: &str,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::Receiver<Command>,
        Arc<Mutex<Announced>>,
    ) {
        use clap::Parser;
        let config = Config::parse_from([
            "frpc",
            "--client-id",
            "gpu",
            "--local-port",
            port,
            "--metrics-interval",
            "1s",
            "--connect-timeout",
            "1s",
        ]);
        let announced = Arc::new(Mutex::new(Announced {
            last: Some((llama3(), true)),
            ..Announced::default()
        }));
        let fit = local::ModelFit::new(&common::Registration::default()).unwrap();
        let (tx, rx) = mpsc::channel(8);
        let reporter = tokio::spawn(report(
            Arc::new(config),
            Arc::new(Mutex::new(None)),
            Arc::new(fit),
            (llama3(), true),
            announced.clone(),
            tx,
        ));
        (reporter, rx, announced)
    }

    /// A refused certificate stops a first start, and is retried at the
    /// longest reconnect delay once this process has registered.
    #[test]
    fn tls_refusals_stop_only_a_first_start() {
        use crate::tls::DialError;
        let max = Duration::from_secs(30);
        let refused = || DialError::Certificate {
            addr: "frps:17000".into(),
            reason: "its certificate is issued by an unknown CA".into(),
        };
        let not_tls = || DialError::NotTls {
            addr: "frps:17000".into(),
        };
        for e in [refused(), not_tls()] {
            assert!(matches!(dial_failed(e, false, max), SessionError::Fatal(_)));
        }
        for e in [refused(), not_tls()] {
            let (end, said) = common::testing::logged(|| dial_failed(e, true, max));
            assert!(
                matches!(end, SessionError::Wait { at_least, .. } if at_least <= max && at_least >= max.mul_f64(0.8)),
                "{end:?}"
            );
            assert!(
                said.contains("ERROR") && said.contains("retrying"),
                "{said}"
            );
        }
        let timeout = DialError::Timeout {
            addr: "frps:17000".into(),
            limit: max,
        };
        assert!(matches!(
            dial_failed(timeout, false, max),
            SessionError::Retry(_)
        ));
    }

    /// A box moved to another owner, restarted with that account's email:
    /// the token of the account before is not logged in with (frpc went
    /// on serving, and claiming client ids for, the old account).
    #[tokio::test]
    async fn a_token_of_another_account_than_the_one_given_is_passed_over() {
        use clap::Parser;
        let dir = std::env::temp_dir().join(format!("frpc-account-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        let token_file = path.display().to_string();
        let saved = login::SavedToken {
            token: "frpxc_alices".into(),
            expires_at: None,
            server: String::new(),
            email: "alice@example.com".into(),
            tls: false,
        };
        login::save(&path, &saved).unwrap();
        let client = |email: Option<&str>| {
            let mut args = vec!["frpc", "--client-id", "gpu", "--token-file", &token_file];
            if let Some(email) = email {
                args.extend(["--email", email, "--password", "secret-pw"]);
            }
            Client::new(Config::parse_from(args), CancellationToken::new()).unwrap()
        };
        let chosen = |email| async move {
            client(email)
                .usable_saved_token()
                .await
                .unwrap()
                .map(|t| t.token)
        };
        assert_eq!(chosen(Some("bob@example.com")).await, None);
        // The same account, in any letter case, or none given: used.
        assert_eq!(
            chosen(Some("Alice@Example.com")).await.as_deref(),
            Some("frpxc_alices")
        );
        assert_eq!(chosen(None).await.as_deref(), Some("frpxc_alices"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_token_file_gone_unreadable_leaves_the_token_last_read_from_it() {
        let dir = std::env::temp_dir().join(format!("frpc-lastread-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        let saved = |token: &str| login::SavedToken {
            token: token.into(),
            expires_at: None,
            server: String::new(),
            email: "a@b".into(),
            tls: false,
        };
        login::save(&path, &saved("frpxc_in_file")).unwrap();
        let client = client_saving_to(&path);
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_in_file");
        // A renewal that could not be saved is held too; then the file
        // cannot be read (a directory in its place, as a root-owned copy
        // would be for this user).
        client.tokens.lock().unwrap().unsaved = Some(saved("frpxc_unsaved"));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(&path).unwrap();
        // The file's token as last read logs in, not the renewal (using
        // it would end the file's token, alive as far as frpc knows).
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_in_file");
        // Refused by frps meanwhile, it is not sent again: the error is.
        client.refuse_token("frpxc_in_file".into());
        assert!(client.usable_saved_token().await.is_err());
        // A process that never read the file has nothing to fall back on.
        drop(client);
        assert!(client_saving_to(&path).usable_saved_token().await.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn an_unsaved_renewal_is_used_only_once_the_saved_token_is_dead() {
        let dir = std::env::temp_dir().join(format!("frpc-unsaved-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token.json");
        let client = client_saving_to(&path);
        let token = |token: &str, expires_at: Option<&str>| login::SavedToken {
            token: token.into(),
            expires_at: expires_at.map(Into::into),
            server: client.config.control_addr(),
            email: "owner@example.com".into(),
            tls: false,
        };
        let unsaved = token("frpxc_unsaved", None);
        {
            let mut tokens = client.tokens.lock().unwrap();
            let turn = tokens.next_turn();
            tokens.keep_unsaved(turn, unsaved.clone());
        }
        // The file's token is alive: it is the one.
        login::save(&path, &token("frpxc_saved", Some("2999-01-01T00:00:00Z"))).unwrap();
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_saved");
        // Expired, or refused by frps: the renewal frpc could not save.
        login::save(&path, &token("frpxc_saved", Some("2001-01-01T00:00:00Z"))).unwrap();
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_unsaved");
        login::save(&path, &token("frpxc_saved", None)).unwrap();
        client.refuse_token("frpxc_saved".into());
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_unsaved");
        // Without a password (none here: no flags, no terminal), a token
        // that looks expired by this clock is still sent when it is all
        // there is: frps's clock decides.
        {
            client.tokens.lock().unwrap().unsaved = None;
        }
        login::save(
            &path,
            &token("frpxc_looks_expired", Some("2001-01-01T00:00:00Z")),
        )
        .unwrap();
        let chosen = client.usable_saved_token().await.unwrap().unwrap();
        assert_eq!(chosen.token, "frpxc_looks_expired");
        // With a password to fall back on, it is not sent; with one that
        // may not go in plaintext, it is (frpc would only stop).
        let with_password = |plaintext: bool| {
            use clap::Parser;
            let file = path.display().to_string();
            let mut args = vec!["frpc", "--client-id", "gpu", "--token-file", &file];
            args.extend(["--email", "owner@example.com", "--password", "secret"]);
            if plaintext {
                args.push("--insecure-plaintext");
            }
            unlocked(Config::parse_from(args))
        };
        let may_send = with_password(true);
        assert!(may_send.usable_saved_token().await.unwrap().is_none());
        let may_not = with_password(false).usable_saved_token().await.unwrap();
        assert_eq!(may_not.unwrap().token, "frpxc_looks_expired");
        {
            client.tokens.lock().unwrap().unsaved = Some(unsaved.clone());
        }
        // A later token saved replaces it as the last resort too.
        {
            let mut tokens = client.tokens.lock().unwrap();
            let turn = tokens.next_turn();
            tokens.keep(turn, token("frpxc_later", None));
            assert!(tokens.unsaved.is_none());
        }
        // An older unsaved renewal never displaces a later token's turn.
        {
            let mut tokens = client.tokens.lock().unwrap();
            let old = tokens.turn;
            tokens.next_turn();
            tokens.keep_unsaved(old, unsaved);
            assert!(tokens.unsaved.is_none());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_token_file_that_cannot_be_read_is_retried_not_fatal() {
        let dir = std::env::temp_dir().join(format!("frpc-unread-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        let client = |flags: &[&str]| {
            use clap::Parser;
            let mut args = vec!["frpc", "--client-id", "gpu", "--no-prompt", "--token-file"];
            let file = path.display().to_string();
            args.push(&file);
            args.extend(flags);
            unlocked(Config::parse_from(args))
        };
        // No file and no password: nothing will change by retrying.
        let bare = client(&[]);
        assert!(bare.usable_saved_token().await.unwrap().is_none());
        let err = bare.password_credentials(None).await.unwrap_err();
        assert!(
            matches!(err, SessionError::Fatal(ref m) if m.contains("no usable saved token")),
            "{err}"
        );
        // A file that exists and cannot be read (a directory here, as a
        // file frpc may not read for a user other than root): the failure
        // names it and is retried, never taken for "no token".
        std::fs::create_dir_all(&path).unwrap();
        let unread = bare.usable_saved_token().await.unwrap_err();
        let err = bare.password_credentials(Some(unread)).await.unwrap_err();
        let SessionError::Retry(m) = err else {
            panic!("not retried: {err}");
        };
        assert!(m.contains("cannot read the token file"), "{m}");
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(!m.contains("no usable saved token"), "{m}");
        // Nor when the password it has may not go in plaintext.
        let plain = client(&["--email", "a@b", "--password", "pw"]);
        let unread = plain.usable_saved_token().await.unwrap_err();
        let err = plain.password_credentials(Some(unread)).await.unwrap_err();
        assert!(
            matches!(err, SessionError::Retry(ref m) if m.contains("cannot read the token file") && m.contains("plaintext")),
            "{err}"
        );
        // With a password it may send, that logs in instead.
        let given = client(&["--email", "a@b", "--password", "pw", "--insecure-plaintext"]);
        let unread = given.usable_saved_token().await.unwrap_err();
        let creds = given.password_credentials(Some(unread)).await.unwrap();
        assert_eq!(
            (creds.email.as_str(), creds.password.as_str()),
            ("a@b", "pw")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn neither_a_refused_held_token_nor_a_refused_file_token_is_sent_again() {
        let dir = std::env::temp_dir().join(format!("frpc-refused-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        let client = client_saving_to(&path);
        // A password login's token held in memory, and an older one left in
        // the file (whose write failed).
        client
            .save_token("frpxc_held".into(), None, "a@b".into())
            .await;
        let old = login::SavedToken {
            token: "frpxc_file".into(),
            expires_at: None,
            server: String::new(),
            email: "a@b".into(),
            tls: false,
        };
        login::save(&path, &old).unwrap();
        let next = || async { client.usable_saved_token().await.unwrap().map(|t| t.token) };
        assert_eq!(next().await.as_deref(), Some("frpxc_held"));
        client.refuse_token("frpxc_held".into());
        assert_eq!(next().await.as_deref(), Some("frpxc_file"));
        // Both refused: the password next, not the two in turn for ever.
        client.refuse_token("frpxc_file".into());
        assert_eq!(next().await, None);
        // The list stays bounded, the latest kept.
        for i in 0..2 * MAX_REFUSED_TOKENS {
            client.refuse_token(format!("frpxc_{i}"));
        }
        let refused = client.refused.lock().unwrap().clone();
        assert_eq!(refused.len(), MAX_REFUSED_TOKENS);
        assert_eq!(
            refused.last().unwrap(),
            &format!("frpxc_{}", 2 * MAX_REFUSED_TOKENS - 1)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_token_overtaken_by_a_later_one_never_replaces_it() {
        let dir = std::env::temp_dir().join(format!("frpc-order-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        for _ in 0..20 {
            let client = client_saving_to(&path);
            // A renewal whose write is still on its way when frps gives a
            // newer token (renewing again, or a password login): whichever
            // write runs first, the newer token is the one kept and saved.
            let older = client.renewed("frpxc_older".into(), None);
            let newer = client.renewed("frpxc_newer".into(), None);
            older.await.unwrap();
            newer.await.unwrap();
            assert_eq!(login::load(&path).unwrap().token, "frpxc_newer");
            assert_eq!(
                client.usable_saved_token().await.unwrap().unwrap().token,
                "frpxc_newer"
            );
            let older = client.renewed("frpxc_renewal".into(), None);
            client
                .save_token("frpxc_password".into(), None, "a@b".into())
                .await;
            older.await.unwrap();
            assert_eq!(login::load(&path).unwrap().token, "frpxc_password");
            assert_eq!(
                client.usable_saved_token().await.unwrap().unwrap().token,
                "frpxc_password"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn frps_asking_for_a_wait_is_kept_to_within_reason() {
        let wait = |ms| match not_now("throttled".into(), ms) {
            SessionError::Wait { at_least, reason } => {
                assert!(reason.contains("throttled"), "{reason}");
                Some(at_least)
            }
            SessionError::Retry(_) => None,
            other => panic!("{other:?}"),
        };
        assert_eq!(wait(Some(1500)), Some(Duration::from_millis(1500)));
        assert_eq!(wait(Some(u64::MAX)), Some(LONGEST_WAIT_HINT));
        assert_eq!(wait(None), None, "an frps that gives no hint");
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_session_that_lasted_starts_the_backoff_over() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut backoff = Backoff::new(min, max);
        for _ in 0..3 {
            backoff.next_delay();
        }
        // Accepted, then ended within seconds (a kick): the delays go on
        // growing, as after a failed dial.
        let accepted = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        settle(&mut backoff, Some(accepted));
        assert!(backoff.next_delay() >= Duration::from_millis(6400));
        settle(&mut backoff, None);
        assert!(backoff.next_delay() >= Duration::from_millis(12800));
        // A session that lasted: from the first delay again.
        let accepted = Instant::now();
        tokio::time::advance(STABLE_SESSION).await;
        settle(&mut backoff, Some(accepted));
        assert!(backoff.next_delay() <= min.mul_f64(1.2));
    }

    #[test]
    fn a_doubtful_probe_at_a_reconnect_keeps_what_the_last_session_announced() {
        let mut announced = Announced::default();
        // Nothing announced yet: the first probe is taken as it is.
        assert_eq!(
            announced.judge(listed(&["llama3"]), true),
            listed(&["llama3"])
        );
        // The next session's registration probe times out (a model
        // loading): the models stay, the service stays up.
        let slow = (Vec::new(), false);
        assert_eq!(announced.judge(slow.clone(), false), listed(&["llama3"]));
        // The reporter's next doubtful probe is the second in a row: the
        // service is down, its models still announced (frps answers their
        // callers 503, not 404).
        let down = (listed(&["llama3"]).0, false);
        assert_eq!(announced.judge(slow.clone(), false), down);
        // So while it stays unreachable (down at once).
        assert_eq!(announced.judge((Vec::new(), false), true), down);
        // Back, with what it lists now; an answer with no models is
        // believed too.
        assert_eq!(
            announced.judge(listed(&["qwen2.5:1.5b"]), true),
            listed(&["qwen2.5:1.5b"])
        );
        assert_eq!(announced.judge(listed(&[]), true), listed(&[]));
        // A first doubtful probe at start is believed (nothing to keep).
        let mut fresh = Announced::default();
        assert_eq!(fresh.judge(slow.clone(), false), slow);
    }

    /// A probe waits until the next is due, between --connect-timeout
    /// and 30 s: a saturated service slow to list its models is not taken
    /// for down at 5 s.
    #[test]
    fn a_probe_waits_until_the_next_is_due_within_bounds() {
        use clap::Parser;
        let deadline = |metrics: &str, connect: &str| {
            let cfg = Config::try_parse_from([
                "frpc",
                "--metrics-interval",
                metrics,
                "--connect-timeout",
                connect,
            ])
            .unwrap();
            probe_deadline(&cfg)
        };
        let s = Duration::from_secs;
        assert_eq!(deadline("10s", "5s"), s(10));
        assert_eq!(deadline("1s", "5s"), s(5));
        assert_eq!(deadline("2m", "5s"), PROBE_MOST);
        assert_eq!(deadline("2m", "40s"), s(40));
    }

    #[test]
    fn one_answer_without_a_list_keeps_the_last_list_and_two_withdraw_it() {
        let mut unlisted = false;
        let last = listed(&["llama3"]);
        let none = (Vec::new(), true);
        // One bad answer: the models stay.
        let now = after_probe(&last, none.clone(), false, &mut unlisted);
        assert_eq!(now, last);
        // A second in a row: believed.
        let now = after_probe(&now, none.clone(), false, &mut unlisted);
        assert_eq!(now, none);
        // A list again resets the count.
        let back = after_probe(&now, listed(&["qwen"]), true, &mut unlisted);
        assert_eq!(back, listed(&["qwen"]));
        assert!(!unlisted);
        // A service that never lists models, or that is down, is as it says.
        let mut unlisted = false;
        assert_eq!(after_probe(&none, none.clone(), false, &mut unlisted), none);
        let down = (Vec::new(), false);
        assert_eq!(after_probe(&last, down.clone(), true, &mut unlisted), down);
        // A service slow to answer once (doubtful) stays up with its models;
        // twice in a row, it is down.
        let mut doubted = false;
        let now = after_probe(&last, down.clone(), false, &mut doubted);
        assert_eq!(now, last);
        assert_eq!(after_probe(&now, down.clone(), false, &mut doubted), down);
        // One that was down stays down.
        let mut doubted = false;
        assert_eq!(after_probe(&down, down.clone(), false, &mut doubted), down);
    }

    #[tokio::test]
    async fn a_stuck_metrics_read_is_skipped_without_piling_up_threads() {
        let collector = Arc::new(Mutex::new(None));
        // Another read holds the collector (as a read stuck in a driver
        // would): this one gives up at once instead of queueing behind it.
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let collector = collector.clone();
            std::thread::spawn(move || {
                let _held = collector.lock().unwrap();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        };
        locked_rx.recv().unwrap();
        let started = std::time::Instant::now();
        let read = read_metrics(&collector, Duration::from_secs(30)).await;
        assert!(read.is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(
            read_metrics(&collector, Duration::from_secs(30))
                .await
                .is_some()
        );
    }

    #[test]
    fn errors_from_frps_are_logged_short_on_one_line_once_a_second() {
        let forged = format!(
            "oops\n2026-12-03T00:00:00Z  INFO forged {}",
            "x".repeat(70_000)
        );
        let ((), logged) = common::testing::logged(|| {
            let mut pace = common::pace::Pace::new(Duration::from_secs(1));
            for _ in 0..100 {
                report_error(&mut pace, &forged);
            }
        });
        let lines: Vec<&str> = logged.lines().collect();
        assert_eq!(lines.len(), 1, "{logged}");
        assert!(lines[0].contains("frps reported an error: oops 2026-12-03T00:00:00Z"));
        assert!(
            lines[0].len() < MAX_FRPS_TEXT + 200,
            "{} bytes",
            lines[0].len()
        );
    }

    #[test]
    fn a_session_keeps_its_login_token_and_its_latest_renewals() {
        let dir = std::env::temp_dir().join(format!("frpc-session-{}", uuid::Uuid::new_v4()));
        let client = client_saving_to(&dir.join("token.json"));
        *client.session_tokens.lock().unwrap() = vec!["login".into()];
        for i in 0..100 {
            client.session_token(format!("renewal-{i}"));
        }
        let kept = client.session_tokens.lock().unwrap().clone();
        assert_eq!(kept.len(), MAX_SESSION_TOKENS);
        assert_eq!(kept[0], "login");
        assert_eq!(kept[MAX_SESSION_TOKENS - 1], "renewal-99");
        assert_eq!(
            kept[1],
            format!("renewal-{}", 100 - (MAX_SESSION_TOKENS - 1))
        );
    }

    #[tokio::test]
    async fn a_prompt_nobody_answers_ends_with_what_to_pass_instead() {
        // A read of a terminal that never speaks.
        let (release, never) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let err = answered_within(Duration::from_millis(100), move || {
            let _ = never.recv();
            anyhow::bail!("released")
        })
        .await
        .unwrap_err();
        let SessionError::Fatal(m) = err else {
            panic!("not fatal: {err}");
        };
        assert!(
            m.contains("no answer at the terminal's prompt within 100ms"),
            "{m}"
        );
        assert!(m.contains("--no-prompt"), "{m}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(release);
        // An answer in time is the answer.
        let creds = answered_within(Duration::from_secs(30), || {
            Ok(Credentials {
                email: "a@b".into(),
                password: "pw".into(),
            })
        })
        .await
        .unwrap();
        assert_eq!(
            (creds.email.as_str(), creds.password.as_str()),
            ("a@b", "pw")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_takes_nothing_is_given_up_after_the_limit() {
        // 64 bytes of pipe nobody reads: a frame or two fit, then writes block.
        let (mut near, _far) = tokio::io::duplex(64);
        let shutdown = CancellationToken::new();
        let limit = Duration::from_secs(30);
        let started = Instant::now();
        let mut seq = 0;
        let err = loop {
            seq += 1;
            match send_within(&mut near, &Command::Heartbeat { seq }, limit, &shutdown).await {
                Ok(true) => continue,
                Ok(false) => panic!("reported a shutdown that did not happen"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, SessionError::Retry(ref m) if m.contains("took no Heartbeat")),
            "{err}"
        );
        assert_eq!(started.elapsed(), limit);
        // A shutdown ends a blocked write at once.
        shutdown.cancel();
        let beat = Command::Heartbeat { seq: 0 };
        assert!(
            !send_within(&mut near, &beat, limit, &shutdown)
                .await
                .unwrap()
        );
        assert_eq!(started.elapsed(), limit);
    }

    /// A frps on a port of its own that logs a token in and registers one
    /// session (`mux`: offering a tunnel connection), then runs `after`
    /// with the session's writer and reader; and a saved token for it.
    async fn one_session_frps<F, Fut>(mux: bool, after: F) -> (u16, std::path::PathBuf)
    where
        F: FnOnce(WriteHalf<Stream>, FrameReader<ReadHalf<Stream>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let frps = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = frps.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("frpc-session-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token.json");
        let saved = login::SavedToken {
            token: "frpxc_t".into(),
            expires_at: None,
            server: format!("127.0.0.1:{port}"),
            email: "a@b.c".into(),
            tls: false,
        };
        login::save(&token_file, &saved).unwrap();
        tokio::spawn(async move {
            let (s, _) = frps.accept().await.unwrap();
            let (rd, mut wr) = tokio::io::split(Stream::from(s));
            let mut reader = FrameReader::new(rd, MAX_FRAME);
            let login = reader.read_command().await.unwrap();
            assert!(
                matches!(login, Some(Command::LoginToken { .. })),
                "{login:?}"
            );
            let result = Command::LoginResult {
                ok: true,
                token: None,
                expires_at: None,
                reason: None,
                code: None,
                retry_after_ms: None,
            };
            write_command(&mut wr, &result).await.unwrap();
            let _register = reader.read_command().await.unwrap();
            let registered = Command::Registered {
                client_id: "gpu".into(),
                session_key: "k".into(),
                heartbeat_interval_ms: 10_000,
                mux,
            };
            write_command(&mut wr, &registered).await.unwrap();
            after(wr, reader).await;
        });
        (port, token_file)
    }

    fn config_for(port: u16, token_file: &std::path::Path, more: &[&str]) -> Config {
        use clap::Parser;
        let (port, file) = (port.to_string(), token_file.display().to_string());
        let mut args = vec![
            "frpc",
            "--client-id",
            "gpu",
            "--server-addr",
            "127.0.0.1",
            "--control-port",
            &port,
            "--token-file",
            &file,
            "--no-prompt",
            "--local-port",
            "1",
            "--connect-timeout",
            "1s",
        ];
        args.extend_from_slice(more);
        Config::parse_from(args)
    }

    #[tokio::test]
    async fn a_fatal_end_of_a_session_does_not_wait_for_its_reporter() {
        // frps ends the token's session: without a password, frpc stops.
        let (port, token_file) = one_session_frps(false, |mut wr, mut reader| async move {
            // Once the session's reporter runs (its first metrics).
            while let Ok(Some(cmd)) = reader.read_command().await {
                if matches!(cmd, Command::SystemInfo(_)) {
                    break;
                }
            }
            let ended = Command::Disconnect {
                reason: common::protocol::TOKEN_ENDED.into(),
            };
            write_command(&mut wr, &ended).await.unwrap();
            std::future::pending::<()>().await;
        })
        .await;
        let more = ["--metrics-interval", "60s", "--shutdown-timeout", "60s"];
        let client = Client::new(
            config_for(port, &token_file, &more),
            CancellationToken::new(),
        );
        let started = std::time::Instant::now();
        let ran = tokio::time::timeout(Duration::from_secs(30), client.unwrap().run()).await;
        let err = ran.expect("frpc stopped before the reporter's next tick");
        assert!(err.is_err(), "a fatal error: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        std::fs::remove_dir_all(token_file.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_stop_does_not_wait_for_a_tunnel_handshake() {
        // A proxy port that takes the tunnel connection and never answers
        // its MuxHello (a slow NewWorkConn plugin).
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = proxy.local_addr().unwrap().port().to_string();
        let (dialled, mut was_dialled) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = proxy.accept().await {
                held.push(s);
                let _ = dialled.try_send(());
            }
        });
        let (port, token_file) = one_session_frps(true, |_wr, mut reader| async move {
            while let Ok(Some(_)) = reader.read_command().await {}
        })
        .await;
        let more = ["--proxy-port", &proxy_port, "--shutdown-timeout", "60s"];
        let shutdown = CancellationToken::new();
        let client = Client::new(config_for(port, &token_file, &more), shutdown.clone());
        let run = tokio::spawn(client.unwrap().run());
        let within = Duration::from_secs(10);
        tokio::time::timeout(within, was_dialled.recv())
            .await
            .expect("the tunnel connection dialled");
        let started = std::time::Instant::now();
        shutdown.cancel();
        let ran = tokio::time::timeout(within, run).await;
        ran.expect("stopped without waiting for the handshake")
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        std::fs::remove_dir_all(token_file.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_stop_tells_frps_it_is_no_crash() {
        let (heard, mut said) = mpsc::channel(1);
        let (registered, mut is_registered) = mpsc::channel(1);
        let (port, token_file) = one_session_frps(false, |_wr, mut reader| async move {
            // Once the session loop runs (it sends the first metrics).
            while let Ok(Some(cmd)) = reader.read_command().await {
                if matches!(cmd, Command::SystemInfo(_)) {
                    break;
                }
            }
            let _ = registered.send(()).await;
            // The last command before the connection closes.
            let mut last = None;
            while let Ok(Some(cmd)) = reader.read_command().await {
                last = Some(cmd);
            }
            let _ = heard.send(last).await;
        })
        .await;
        let more = ["--metrics-interval", "60s"];
        let shutdown = CancellationToken::new();
        let client = Client::new(config_for(port, &token_file, &more), shutdown.clone());
        let run = tokio::spawn(client.unwrap().run());
        let within = Duration::from_secs(10);
        tokio::time::timeout(within, is_registered.recv())
            .await
            .expect("registered");
        shutdown.cancel();
        tokio::time::timeout(within, run)
            .await
            .expect("stopped")
            .unwrap()
            .unwrap();
        let last = tokio::time::timeout(within, said.recv()).await.unwrap();
        assert!(
            matches!(&last, Some(Some(Command::Disconnect { reason })) if reason == STOPPING),
            "{last:?}"
        );
        std::fs::remove_dir_all(token_file.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_token_issued_over_tls_is_not_sent_in_plaintext() {
        let frps = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = frps.local_addr().unwrap().port();
        let (heard, mut said) = mpsc::channel(1);
        tokio::spawn(async move {
            let accepted = frps.accept().await;
            let _ = heard.send(accepted.is_ok()).await;
        });
        let dir = std::env::temp_dir().join(format!("frpc-tls-token-{}", uuid::Uuid::new_v4()));
        let token_file = dir.join("token.json");
        let saved = login::SavedToken {
            token: "frpxc_secret".into(),
            expires_at: None,
            server: format!("127.0.0.1:{port}"),
            email: "a@b.c".into(),
            tls: true,
        };
        login::save(&token_file, &saved).unwrap();
        let within = Duration::from_secs(10);
        let run = |more: &'static [&'static str]| {
            let client = Client::new(
                config_for(port, &token_file, more),
                CancellationToken::new(),
            );
            tokio::time::timeout(within, client.unwrap().run())
        };
        let err = run(&[]).await.expect("exits").unwrap_err().to_string();
        assert!(err.contains("it was issued over TLS"), "{err}");
        assert!(err.contains("--insecure-plaintext"), "{err}");
        // frps was not even dialled.
        let dialled = tokio::time::timeout(Duration::from_millis(300), said.recv()).await;
        assert!(dialled.is_err(), "{dialled:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_port_that_is_no_control_port_is_named_as_such() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (answer, said) in [
            (
                &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"[..],
                "it answered in HTTP: frps's public or API port?",
            ),
            (
                &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
                "its first bytes read \"SSH-\"",
            ),
        ] {
            let port = {
                let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = server.local_addr().unwrap().port();
                tokio::spawn(async move {
                    let (mut s, _) = server.accept().await.unwrap();
                    s.write_all(answer).await.unwrap();
                    let _ = s.read(&mut [0u8; 1024]).await;
                });
                port
            };
            let dir = std::env::temp_dir().join(format!("frpc-port-{}", uuid::Uuid::new_v4()));
            let more = [
                "--email",
                "a@b.c",
                "--password",
                "pw",
                "--insecure-plaintext",
            ];
            let client = Client::new(
                config_for(port, &dir.join("token.json"), &more),
                CancellationToken::new(),
            )
            .unwrap();
            let mut registered = None;
            let ended =
                tokio::time::timeout(Duration::from_secs(10), client.session(&mut registered))
                    .await
                    .expect("ends");
            let Err(SessionError::Retry(why)) = ended else {
                panic!("{ended:?}");
            };
            assert!(
                why.contains("does not speak frpx's control protocol"),
                "{why}"
            );
            assert!(why.contains(said), "{why}");
            assert!(why.contains("--control-port"), "{why}");
            drop(client);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
