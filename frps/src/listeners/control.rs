//! Control port: clients log in, register, heartbeat and receive commands.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Command, FrameError, FrameReader, MAX_FRAME, PROTOCOL_VERSION, Registration, Stream};
use rand::RngCore;
use tokio::io::AsyncWrite;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::Principal;
use crate::auth::accounts::{LoginError, TokenReview};
use crate::pending::PairError;
use crate::plugins::{Op, hooks};
use crate::registry::{ClientHandle, IdTaken, NewClient};
use crate::state::State;

pub use common::protocol::{MAX_CLIENT_ID, is_client_id};

/// A live client's `gpu_assets` row is rewritten at most this often.
pub const ASSET_REFRESH: Duration = Duration::from_secs(60);

/// Longest a `gpu_assets` write is waited for: a database that stopped
/// answering (a network path dead without a reset) must not keep ended
/// sessions alive, nor queue a box's later writes behind it.
pub const ASSET_WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// How a control session ended badly.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed during the handshake")]
    ClosedEarly,
    #[error("{0}")]
    Refused(String),
}

/// Serves one control connection until it closes.
pub async fn handle(stream: TcpStream, peer: SocketAddr, state: Arc<State>) {
    let _session = state.sessions.token();
    let span = info_span!("control", %peer, client = tracing::field::Empty);
    async move {
        let hs = state.config.handshake_timeout;
        let stream = match state.tls.accept_frames(stream, hs).await {
            Ok(s) => s,
            Err(e) => return debug!("control connection dropped: {e}"),
        };
        let (rd, mut wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd, MAX_FRAME);
        match session(&mut reader, &mut wr, peer, &state).await {
            Ok(()) => {}
            Err(ControlError::Refused(reason)) => info!("control connection refused: {reason}"),
            Err(e) => debug!("control connection ended: {e}"),
        }
    }
    .instrument(span)
    .await
}

async fn session(
    reader: &mut FrameReader<ReadHalf<Stream>>,
    wr: &mut WriteHalf<Stream>,
    peer: SocketAddr,
    state: &Arc<State>,
) -> Result<(), ControlError> {
    let hs = state.config.handshake_timeout;
    let (owner, renewal) = login(reader, wr, peer, state).await?;

    let cmd = reader.read_command_within(hs).await?;
    let registration = match cmd {
        Some(Command::Register(reg)) => reg,
        Some(other) => {
            let reason = format!("expected Register, got {}", other.name());
            send(
                wr,
                &Command::Error {
                    message: reason.clone(),
                },
                hs,
            )
            .await?;
            return Err(ControlError::Refused(reason));
        }
        None => return Err(ControlError::ClosedEarly),
    };
    let session = state.registry.reserve_session();
    // An id another account holds is refused before the plugins hear of
    // it: a `NewProxy` for a live name refused afterwards would tell them
    // (by its `CloseProxy`) that the live one ended.
    let proxy_plugins =
        state.plugins.handles(Op::NewProxy) || state.plugins.handles(Op::CloseProxy);
    let admitted = match validate(&registration) {
        Ok(()) if proxy_plugins => {
            let id = &registration.client_id;
            let bound = bound_to(state, id, state.store.client_id_owner(id)).await;
            let owned = bound.and_then(|bound| owned_by(id, owner.user_id, bound));
            // Released to this account while the previous owner's session
            // is still live: refused (and retried) before the plugins hear
            // a NewProxy for the live name, as it would be after them.
            match state.registry.get(id) {
                Some(live) if owned.is_ok() && live.owner.user_id != owner.user_id => {
                    Err((still_live_elsewhere(id), true))
                }
                _ => owned,
            }
        }
        Ok(()) => Ok(()),
        Err(refusal) => Err(refusal),
    };
    // The id frpc asked for: a plugin may rename it.
    let asked_id = registration.client_id.clone();
    let admitted = match admitted {
        Ok(()) => hooks::admit(&state.plugins, registration, peer, session)
            .await
            .map_err(|e| (e.to_string(), !e.is_rejection())),
        Err(refusal) => Err(refusal),
    };
    let mut registration = match admitted {
        Ok(reg) => reg,
        Err((reason, retry)) => return refuse(wr, hs, reason, retry).await,
    };
    registration.models = kept_models(&registration.client_id, registration.models);
    // The plugins accepted this registration's NewProxy: a refusal from
    // here on owes them its CloseProxy.
    let refusal = match validate(&registration) {
        // A plugin rewrote it (the client id, the host name...) into one
        // frps refuses: the plugin's doing, not frpc's flags, and a fixed
        // plugin may accept it.
        Err((reason, _)) => Some((
            format!("a server plugin changed this registration into one frps refuses: {reason}"),
            true,
        )),
        Ok(()) => claim_id(state, &registration, owner.user_id)
            .await
            .err()
            .map(|(reason, retry)| {
                if registration.client_id == asked_id || retry {
                    (reason, retry)
                } else {
                    // The id a plugin renamed it to belongs to another
                    // account, or is past the account's limit: not frpc's
                    // `--client-id` at fault, which the refusal's advice
                    // names, nor one to give up on (a fixed plugin may
                    // accept it). A database unavailable says so itself.
                    (
                        format!(
                            "a server plugin renamed this client '{asked_id}' to '{}', which this account cannot use (another account's id, or past its --max-client-ids): the plugin's configuration is at fault, not this box's --client-id",
                            common::text::shorten(&registration.client_id, 80)
                        ),
                        true,
                    )
                }
            }),
    };
    if let Some((reason, retry)) = refusal {
        // frpc hears first: its wait for an answer does not include the
        // CloseProxy plugins.
        let refused = refuse(wr, hs, reason, retry).await;
        hooks::close_proxy(&state.plugins, &registration, session).await;
        return refused;
    }

    // Plugins may have taken a while: a client that gave up meanwhile (its
    // connection closed) is not registered, so it cannot replace the
    // session it opened since with the same id.
    let early = match tokio::time::timeout(Duration::ZERO, reader.read_command()).await {
        Err(_) => None,
        Ok(Ok(None)) => Some(ControlError::ClosedEarly),
        Ok(Ok(Some(other))) => {
            let reason = format!("expected nothing before Registered, got {}", other.name());
            let _ = send(
                wr,
                &Command::Error {
                    message: reason.clone(),
                },
                hs,
            )
            .await;
            Some(ControlError::Refused(reason))
        }
        Ok(Err(e)) => Some(e.into()),
    };
    if let Some(ended) = early {
        hooks::close_proxy(&state.plugins, &registration, session).await;
        return Err(ended);
    }
    let (tx, mut rx) = mpsc::channel(64);
    let session_key = random_hex(32);
    // Kept for a CloseProxy should the id still be live under another
    // account (the registration moves into the registry's handle).
    let closing = state
        .plugins
        .handles(Op::CloseProxy)
        .then(|| registration.clone());
    let new = NewClient {
        registration,
        remote_addr: peer,
        control_tx: tx,
        session_key: session_key.clone(),
        owner,
    };
    let client = match state.registry.insert_as(new, session) {
        Ok(client) => client,
        Err(IdTaken(id)) => {
            // `claim_id` just found the id this account's: an operator
            // released it while the previous owner's session was still
            // live. That session's end frees it, so the box tries again.
            let refused = refuse(wr, hs, still_live_elsewhere(&id), true).await;
            if let Some(reg) = &closing {
                hooks::close_proxy(&state.plugins, reg, session).await;
            }
            return refused;
        }
    };
    drop(closing);
    if let Some(renewal) = renewal {
        client.renewal_sent(renewal);
    }
    tracing::Span::current().record("client", client.id.as_str());
    let registered = Command::Registered {
        client_id: client.id.clone(),
        session_key,
        heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as u64,
        mux: state.config.tunnel_mux,
    };
    let result = match send(wr, &registered, hs).await {
        Ok(()) => {
            info!(
                client = %client.id,
                machine = %client.registration.machine_id,
                models = client.model_count(),
                "Client '{}' registered from {peer}",
                client.id
            );
            state.queues.wake_all();
            // Recorded beside the session, which starts serving at once: a
            // slow database must not hold up heartbeats and dial-back
            // commands. `write_asset` keeps it before this session's
            // `offline` write (or skips it once the session has ended).
            let (st, cl) = (state.clone(), client.clone());
            state
                .tasks
                .spawn(async move { write_asset(&st, &cl, "online").await });
            // Ends with the session, also when the session's future is
            // dropped (frps's hard stop) rather than run to its end.
            let _watch = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch_token(
                state.clone(),
                client.clone(),
            )));
            serve(reader, wr, &mut rx, &client, state).await
        }
        Err(e) => Err(e.into()),
    };
    // The box's session was lost (its frpc crashed, its connection dropped,
    // it broke the protocol; not replaced, kicked, evicted or stopped with a
    // `Disconnect`, which name a reason) while frps waited for its
    // dial-backs: once, a failure of the box. Those requests fail over
    // unblamed (a session's end is not its service failing), so a frpc that
    // crashes at each request would otherwise be asked again at each
    // reconnect. Read before the waiters hear of the end and withdraw.
    let lost_under_dial_backs = client.kick_reason().is_none()
        && !state.drained.is_cancelled()
        && state.pending.outstanding(client.session) > 0;
    // Fail waiters for this session at once rather than at their timeout.
    // Until now the command channel stayed open: a request handing it an
    // `OpenConnection` meanwhile waits for this (a session's end, unblamed)
    // rather than finding the channel closed under a session still on.
    client.kick.cancel();
    drop(rx);
    if lost_under_dial_backs {
        warn!(client = %client.id, "client '{}' was lost while frps waited for its dial-backs", client.id);
        crate::dispatch::record_failure(state, &client);
    }
    client.idle.close();
    // A session replaced by a newer one of the same client id leaves the
    // proxy to that session: only the session that held the id closes it.
    if state.registry.remove(&client) {
        info!(client = %client.id, "Client '{}' left", client.id);
        // Requests queued for it (pinned, or for a model only it served)
        // look again now: another client may serve them, or none will
        // (404), rather than their waiting out the queue for a 429.
        state.queues.wake_all();
        // Both at once: the plugins hear of the end without waiting for
        // the database (a box reconnecting meanwhile sends them a NewProxy
        // for the same name, with a new `run_id`), and the `offline` write
        // does not wait for a slow plugin (a reconnect's `online` write
        // must not be overtaken by it, nor shutdown's last second spent).
        record_end(state, &client, true).await;
    } else if replaced_by_another_machine(state.registry.get(&client.id).as_deref(), &client) {
        // Replaced under its client id by another machine (two boxes
        // sharing an id): that one's `online` is its own row; this
        // machine's row goes offline.
        record_end(state, &client, false).await;
    }
    result
}

/// Whether `ended`, a session replaced under its client id, writes its own
/// machine `offline`: when the id is now another machine's (`live`), or no
/// session holds it any more (the one that replaced it left first, having
/// written only its own machine's row; were that this machine, the write
/// is a no-op: its row changed since this session's last write, which
/// [`write_asset`] checks).
fn replaced_by_another_machine(live: Option<&ClientHandle>, ended: &ClientHandle) -> bool {
    live.is_none_or(|live| asset_key(live) != asset_key(ended))
}

/// Writes `client`'s machine `offline` (and, with `close_proxy`, tells the
/// plugins its proxy closed) in a task of its own, tracked, and waits for
/// it: frps's hard stop, which drops the session (a drain past its
/// deadline leaves sessions a second to end), does not cut the write
/// midway and leave the machine `online`; the last wait of shutdown gives
/// it its time.
async fn record_end(state: &Arc<State>, client: &Arc<ClientHandle>, close_proxy: bool) {
    let (st, cl) = (state.clone(), client.clone());
    let ending = state.tasks.spawn(async move {
        let closing = async {
            if close_proxy {
                hooks::close_proxy(&st.plugins, &cl.registration, cl.session).await;
            }
        };
        tokio::join!(closing, write_asset(&st, &cl, "offline"));
    });
    let _ = ending.await;
}

/// Refuses a registration with `reason`; `retry` tells frpc whether trying
/// again can succeed.
async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    hs: Duration,
    reason: String,
    retry: bool,
) -> Result<(), ControlError> {
    let refusal = Command::RegisterRefused {
        reason: reason.clone(),
        retry,
    };
    send(wr, &refusal, hs).await?;
    Err(ControlError::Refused(reason))
}

/// A token login's principal, with a new token for the box when its own
/// has less than half its lifetime left ([`TokenReview::Renewed`]); refused
/// when the token was revoked (or expired) since it was checked, a moment
/// before: the session would have run on it until its next review.
async fn renewed_at_login(
    state: &State,
    principal: Principal,
) -> Result<(Principal, Option<(String, Option<chrono::NaiveDateTime>)>), LoginError> {
    let Some(id) = principal.token_id.as_deref() else {
        return Ok((principal, None));
    };
    match state.accounts.review_token(id, None).await {
        Ok(TokenReview::Renewed(t)) => {
            info!(email = %t.principal.email, "renewed a login token at login");
            Ok((t.principal, Some((t.token, t.expires_at))))
        }
        Ok(TokenReview::Unusable) => Err(LoginError::TokenInvalid),
        Ok(TokenReview::Usable) => Ok((principal, None)),
        Err(e) => {
            debug!("cannot renew the login token: {e}");
            Ok((principal, None))
        }
    }
}

/// Logs a client in: its account, and the SHA-256 of the renewal of its
/// token sent with the answer, if one was.
async fn login(
    reader: &mut FrameReader<ReadHalf<Stream>>,
    wr: &mut WriteHalf<Stream>,
    peer: SocketAddr,
    state: &State,
) -> Result<(Principal, Option<[u8; 32]>), ControlError> {
    let hs = state.config.handshake_timeout;
    let outcome = match reader.read_command_within(hs).await? {
        // Throttled per source address like password logins, so guessing
        // tokens cannot hammer the database.
        Some(Command::LoginToken { token }) => {
            match state.accounts.login_token(&token, peer.ip()).await {
                Ok(principal) => renewed_at_login(state, principal).await.map(|(p, issued)| {
                    let renewal = issued.as_ref().map(|(t, _)| crate::auth::secret::hash(t));
                    (p, issued, renewal)
                }),
                Err(e) => Err(e),
            }
        }
        // A fresh token, renewed from nothing: none to say saved.
        Some(Command::Login { email, password }) => state
            .accounts
            .login(&email, &password, peer.ip())
            .await
            .map(|t| (t.principal, Some((t.token, t.expires_at)), None)),
        Some(other) => {
            let reason = format!("expected Login or LoginToken, got {}", other.name());
            let refused = Command::LoginResult {
                ok: false,
                token: None,
                expires_at: None,
                reason: Some(reason.clone()),
                code: Some("protocol_error".into()),
                retry_after_ms: None,
            };
            send(wr, &refused, hs).await?;
            return Err(ControlError::Refused(reason));
        }
        None => return Err(ControlError::ClosedEarly),
    };
    match outcome {
        Ok((principal, issued, renewal)) => {
            let (token, expires_at) = match issued {
                Some((token, exp)) => (Some(token), exp.map(|e| e.and_utc().to_rfc3339())),
                None => (None, None),
            };
            let ok = Command::LoginResult {
                ok: true,
                token,
                expires_at,
                reason: None,
                code: None,
                retry_after_ms: None,
            };
            send(wr, &ok, hs).await?;
            Ok((principal, renewal))
        }
        Err(e) => {
            let refused = Command::LoginResult {
                ok: false,
                token: None,
                expires_at: None,
                reason: Some(e.to_string()),
                code: Some(e.code().into()),
                retry_after_ms: e.retry_after().map(|wait| {
                    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
                }),
            };
            send(wr, &refused, hs).await?;
            Err(ControlError::Refused(format!("login failed: {e}")))
        }
    }
}

/// Binds the registration's client id to `user_id` at its first
/// registration: an id is an account's for good (until `frps client
/// release`), so no other account can take it, and the requests pinned to
/// it, while its owner is offline. On refusal returns the reason and
/// whether a retry can succeed.
async fn claim_id(state: &State, reg: &Registration, user_id: i64) -> Result<(), (String, bool)> {
    let most = state.config.max_client_ids;
    let claim = state.store.claim_client_id(&reg.client_id, user_id, most);
    match bound_to(state, &reg.client_id, claim).await? {
        Some(owner) => owned_by(&reg.client_id, user_id, Some(owner)),
        // Not bound, the account having no room: not a retry's to fix but
        // an operator's (or the account's other ids released).
        None => Err((
            format!(
                "this account has reached its limit of {most} client ids (--max-client-ids); ask the operator to release unused ones (`frps client release <id>`), or reuse one"
            ),
            false,
        )),
    }
}

/// Whether client id `id` may be `user_id`'s, bound as it is to `owner`
/// (`None`: to no account); on refusal, the reason (a retry cannot help).
fn owned_by(id: &str, user_id: i64, owner: Option<i64>) -> Result<(), (String, bool)> {
    match owner {
        Some(owner) if owner != user_id => Err((
            format!("client id '{id}' belongs to another account; choose another --client-id"),
            false,
        )),
        _ => Ok(()),
    }
}

/// The account client id `id` is bound to, if any, as `lookup` says
/// within the handshake timeout; on failure, the reason and that a retry
/// can succeed.
async fn bound_to(
    state: &State,
    id: &str,
    lookup: impl Future<Output = Result<Option<i64>, crate::store::StoreError>>,
) -> Result<Option<i64>, (String, bool)> {
    let hs = state.config.handshake_timeout;
    match tokio::time::timeout(hs, lookup).await {
        Ok(Ok(owner)) => Ok(owner),
        Ok(Err(e)) => {
            // The database's own words stay in frps's log: a box's owner
            // gets no view of the server's internals.
            warn!(client = %id, "cannot check which account the client id belongs to: {e}");
            Err((
                format!(
                    "cannot check which account client id '{id}' belongs to: the database is unavailable"
                ),
                true,
            ))
        }
        Err(_) => Err((
            format!(
                "cannot check which account client id '{id}' belongs to: no answer from the database within {hs:?}"
            ),
            true,
        )),
    }
}

/// Checks a registration; on refusal returns the reason and whether a retry
/// can succeed.
fn validate(reg: &Registration) -> Result<(), (String, bool)> {
    if reg.protocol_version != PROTOCOL_VERSION {
        // The older side is the one to upgrade.
        let upgrade = if reg.protocol_version > PROTOCOL_VERSION {
            "upgrade frps"
        } else {
            "upgrade frpc"
        };
        return Err((
            format!(
                "protocol version {} is not supported (this server speaks {PROTOCOL_VERSION}); {upgrade}",
                reg.protocol_version
            ),
            false,
        ));
    }
    if !is_client_id(&reg.client_id) {
        return Err((
            format!("client id must be 1-{MAX_CLIENT_ID} characters of letters, digits and -_.:@"),
            false,
        ));
    }
    // Stored (gpu_assets), logged and shown by the API: bounded, and no
    // control characters to forge log lines or trip the database.
    let texts = [
        ("machine id", &reg.machine_id, 1),
        ("hostname", &reg.hostname, 0),
        ("os", &reg.os, 0),
        ("arch", &reg.arch, 0),
        ("version", &reg.version, 0),
        ("user", &reg.user, 0),
    ];
    for (what, text, min) in texts {
        if text.len() < min
            || text.len() > MAX_REGISTRATION_TEXT
            || text.chars().any(char::is_control)
        {
            return Err((
                format!(
                    "{what} must be {min}-{MAX_REGISTRATION_TEXT} bytes of text without control characters"
                ),
                false,
            ));
        }
    }
    Ok(())
}

/// The models of a registration or report as frps keeps them
/// ([`crate::registry::within_limits`]); what it drops is said once a
/// second at most.
fn kept_models(client: &str, models: Vec<common::ModelInfo>) -> Vec<common::ModelInfo> {
    static DROPPED: common::pace::SharedPace =
        common::pace::SharedPace::new(std::time::Duration::from_secs(1));
    let (kept, dropped) = crate::registry::within_limits(models);
    if dropped > 0 && DROPPED.admit() {
        warn!(
            %client,
            "dropped {dropped} of the client's models: frps keeps at most {} with names of 1-{} bytes without control characters",
            crate::registry::MAX_MODELS,
            crate::registry::MAX_MODEL_NAME
        );
    }
    kept
}

/// Longest machine id, hostname, os, arch, version or user a registration
/// may carry (a hostname is at most 253 characters).
const MAX_REGISTRATION_TEXT: usize = 255;

/// The registered phase: heartbeats, reports, commands to the client.
async fn serve(
    reader: &mut FrameReader<ReadHalf<Stream>>,
    wr: &mut WriteHalf<Stream>,
    rx: &mut mpsc::Receiver<Command>,
    client: &Arc<ClientHandle>,
    state: &Arc<State>,
) -> Result<(), ControlError> {
    let hs = state.config.handshake_timeout;
    let silence = state.config.heartbeat_interval * 3;
    let evict = tokio::time::sleep(silence);
    tokio::pin!(evict);
    let mut asset_written = Instant::now();
    let ping_slot = hooks::PingSlot::default();
    loop {
        let frame = tokio::select! {
            biased;
            // Sessions outlive the start of shutdown: requests in flight
            // or in line may still need a dial-back.
            _ = state.drained.cancelled() => {
                let _ = send(wr, &Command::Disconnect { reason: "server is shutting down".into() }, hs).await;
                return Ok(());
            }
            _ = client.kick.cancelled() => {
                let reason = client.kick_reason().unwrap_or_else(|| "disconnected by the server".into());
                info!(client = %client.id, "disconnecting client: {reason}");
                let _ = send(wr, &Command::Disconnect { reason }, hs).await;
                return Ok(());
            }
            // Writes of this loop may have waited (a send each up to the
            // handshake timeout): heartbeats that came meanwhile are read
            // before the client is taken for silent.
            _ = &mut evict => match reader.read_command_now().await {
                Some(frame) => frame,
                None => {
                    warn!(client = %client.id, "evicting client '{}': no heartbeat for {silence:?}", client.id);
                    let reason = format!("no heartbeat for {silence:?}");
                    // Out of the routing at once (the Disconnect may wait for
                    // a full send buffer), and its unanswered requests fail over.
                    client.silent.cancel();
                    client.kick(reason.clone());
                    let _ = send(wr, &Command::Disconnect { reason }, hs).await;
                    return Ok(());
                }
            },
            frame = reader.read_command() => frame,
            // After the reader: a steady stream of commands to send (dial-
            // back requests under load) must not keep the client's
            // heartbeats unread until the eviction timer fires.
            Some(cmd) = rx.recv() => {
                send(wr, &cmd, hs).await?;
                continue;
            }
        };
        let Some(cmd) = frame? else { return Ok(()) };
        client.touch();
        if let Command::Disconnect { reason } = &cmd {
            // frpc stopping: the box's own choice, not its failure (the
            // requests waiting for its dial-backs go elsewhere unblamed).
            let reason = common::text::tame(reason, MAX_CLIENT_TEXT);
            info!(client = %client.id, "client '{}' is disconnecting: {reason}", client.id);
            client.kick(format!("the client disconnected: {reason}"));
            return Ok(());
        }
        evict.as_mut().reset(Instant::now() + silence);
        if asset_written.elapsed() >= ASSET_REFRESH {
            asset_written = Instant::now();
            // Tracked like the first write: a shutdown waits for it.
            let (st, cl) = (state.clone(), client.clone());
            state
                .tasks
                .spawn(async move { write_asset(&st, &cl, "online").await });
        }
        if matches!(cmd, Command::Heartbeat { .. }) {
            hooks::ping(state, client, &ping_slot);
        }
        if let Command::TokenSaved { token } = &cmd {
            renewal_saved(state, client, token);
        }
        if let Some(reply) = on_command(cmd, client, state) {
            send(wr, &reply, hs).await?;
        }
        // One queued command per frame read: a client whose frames
        // never stop coming (the reader always ready) still hears
        // its dial-back requests and token renewals.
        if let Ok(cmd) = rx.try_recv() {
            send(wr, &cmd, hs).await?;
        }
    }
}

/// Every six heartbeat intervals (a quarter of `--token-ttl` when that is
/// shorter: [`token_check_period`]), checks that the token the session
/// logged in with is still usable; once it is revoked (`frps token revoke`, a
/// password change) or expired, the client is disconnected and must log in
/// again. Once it has less than half its lifetime left, the box is sent a
/// new one (`TokenRenewed`) and the session goes on under that one. While
/// the database cannot be asked, the session goes on.
async fn watch_token(state: Arc<State>, client: Arc<ClientHandle>) {
    let Some(mut id) = client.owner.token_id.clone() else {
        return;
    };
    let period = token_check_period(
        state.config.heartbeat_interval,
        state.config.token_lifetime(),
    );
    loop {
        tokio::select! {
            _ = client.kick.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        // A session replaced meanwhile (its box back on a new connection,
        // whose login may have renewed the token already) renews nothing:
        // a renewal here would revoke the one its successor handed out.
        let reviewed = tokio::select! {
            biased;
            _ = client.kick.cancelled() => return,
            reviewed = state.accounts.review_token(&id, Some(client.connected_at.naive_utc())) => reviewed,
        };
        match reviewed {
            Ok(TokenReview::Usable) => {}
            Ok(TokenReview::Unusable) => {
                client.kick(TOKEN_ENDED);
                return;
            }
            Ok(TokenReview::Renewed(t)) => {
                client.renewal_sent(crate::auth::secret::hash(&t.token));
                let renewed = Command::TokenRenewed {
                    token: t.token,
                    expires_at: t.expires_at.map(|e| e.and_utc().to_rfc3339()),
                };
                tokio::select! {
                    _ = client.kick.cancelled() => return,
                    sent = client.control_tx.send(renewed) => if sent.is_err() {
                        return;
                    },
                }
                info!(client = %client.id, "sent the client a renewed login token");
                if let Some(new) = t.principal.token_id {
                    id = new;
                }
            }
            Err(e) => debug!(client = %client.id, "cannot re-check the login token: {e}"),
        }
    }
}

pub use common::protocol::TOKEN_ENDED;

/// Most characters of a client's `Error` text frps logs.
pub const MAX_CLIENT_TEXT: usize = 1024;

/// The `gpu_assets` row a client writes: its machine id, or its client id
/// when it sent none.
fn asset_key(client: &ClientHandle) -> &str {
    let machine = &client.registration.machine_id;
    if machine.is_empty() {
        &client.id
    } else {
        machine
    }
}

/// Upserts the client's `gpu_assets` row; failures are logged, never fatal.
/// Writes of one box (all its sessions) land in order, no `online` lands
/// after the session ended (a periodic refresh racing the `offline` write),
/// no `offline` lands while another session of the box is registered
/// (a reconnect's `online` came first, or comes next), nor over a write
/// made since by a session on another frps.
async fn write_asset(state: &State, client: &ClientHandle, status: &str) {
    let _order = client.asset_writes.lock().await;
    if status == "online" && client.kick.is_cancelled() {
        return;
    }
    let machine = asset_key(client);
    // The row is the machine's: while another session of it is live (a
    // reconnect under this client id, or another frpc on the machine under
    // another id) it stays online; another machine registered under this
    // client id (two boxes sharing an id) does not keep this one's online.
    if status == "offline" {
        let mine = *client.asset_written_at.lock().expect("asset time lock");
        let mut spared = false;
        for live in state.registry.all().iter().filter(|live| {
            live.session != client.session
                && live.owner.user_id == client.owner.user_id
                && asset_key(live) == machine
        }) {
            // The row holds the latest of its sessions' writes, which may
            // be this one's: the last to leave must find its `offline`
            // guarded by that. Not knowing how this session left the row
            // (a failed write may have landed) leaves the other's guard
            // off too.
            let mut theirs = live.asset_written_at.lock().expect("asset time lock");
            *theirs = match (*theirs, mine) {
                (Some(at), Some(mine)) => Some(at.max(mine)),
                _ => None,
            };
            spared = true;
        }
        if spared {
            return;
        }
    }
    // Another frps may have written the row since (the box reconnected
    // there before this session noticed it was gone): this session's
    // `offline` lands only on the row as this session last left it. When
    // none of its writes landed, it is written as it stands.
    let unless_changed_since = match status {
        "offline" => *client.asset_written_at.lock().expect("asset time lock"),
        _ => None,
    };
    let user = client.owner.user_id.to_string();
    let write = state.store.upsert_gpu_asset(
        Some(&user),
        machine,
        &client.id,
        status,
        unless_changed_since,
    );
    let written = match tokio::time::timeout(ASSET_WRITE_DEADLINE, write).await {
        Ok(written) => written.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer from the database within {ASSET_WRITE_DEADLINE:?}"
        )),
    };
    match written {
        Ok(Some(at)) => {
            *client.asset_written_at.lock().expect("asset time lock") = at;
            if status == "offline" {
                prune_assets(state, &user).await;
            }
        }
        Ok(None) if unless_changed_since.is_some() => debug!(
            client = %client.id,
            "not recording machine {machine} offline: its gpu_assets row was written since by another session"
        ),
        Ok(None) => warn!(
            client = %client.id,
            "not recording the client in gpu_assets: machine id {machine} belongs to another account's row"
        ),
        Err(e) => {
            // It may have landed all the same (an answer lost after the
            // commit, or a write given up on that the database still
            // runs): this session no longer knows how it left the row.
            *client.asset_written_at.lock().expect("asset time lock") = None;
            warn!(client = %client.id, "cannot record the client in gpu_assets: {e}")
        }
    }
}

/// Keeps the account's `offline` machine rows to the most recent
/// `--max-client-ids` (machine ids come from frpc: an account presenting
/// new ones would add rows for good). Failures are logged.
async fn prune_assets(state: &State, user: &str) {
    let keep = state.config.max_client_ids;
    let prune = state.store.prune_gpu_assets(user, keep);
    match tokio::time::timeout(ASSET_WRITE_DEADLINE, prune).await {
        Ok(Ok(0)) => {}
        Ok(Ok(gone)) => debug!(
            user,
            "deleted {gone} offline gpu_assets row(s) beyond the account's {keep} most recent"
        ),
        Ok(Err(e)) => warn!(user, "cannot prune the account's gpu_assets rows: {e}"),
        Err(_) => warn!(
            user,
            "cannot prune the account's gpu_assets rows: no answer from the database within {ASSET_WRITE_DEADLINE:?}"
        ),
    }
}

/// frpc saved renewal `token`: if it is one sent to this session, it is
/// confirmed in the background (a shutdown waits for it), so what it was
/// renewed from no longer logs in; anything else is ignored, without a
/// database lookup.
fn renewal_saved(state: &Arc<State>, client: &Arc<ClientHandle>, token: &str) {
    let hash = crate::auth::secret::hash(token);
    if !client.renewal_saved(&hash) {
        debug!(client = %client.id, "ignoring TokenSaved for a token this session was not sent");
        return;
    }
    let (st, id, user) = (state.clone(), client.id.clone(), client.owner.user_id);
    state.tasks.spawn(async move {
        match st.accounts.renewal_saved(&hash, user).await {
            Ok(true) => info!(
                client = %id,
                "the client saved its renewed login token: the token it replaces no longer logs in"
            ),
            Ok(false) => debug!(client = %id, "a saved renewal was confirmed already, or revoked"),
            // Its first login confirms it then.
            Err(e) => debug!(client = %id, "cannot record a saved renewal: {e}"),
        }
    });
}

/// Handles one command from a registered client; returns the reply, if any.
fn on_command(cmd: Command, client: &ClientHandle, state: &State) -> Option<Command> {
    match cmd {
        Command::Heartbeat { seq } => {
            client
                .heartbeats
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(Command::HeartbeatAck { seq })
        }
        Command::SystemInfo(info) => {
            client.set_system(info);
            None
        }
        Command::ModelsUpdate { models, service_up } => {
            let health_changed = service_up != client.is_healthy();
            if health_changed {
                info!(client = %client.id, "client's local service is {}", if service_up { "up again" } else { "down" });
            }
            client.set_service_up(service_up);
            let models_changed = client.set_models(kept_models(&client.id, models));
            // The service back up ends a failure cool-down (the wake below
            // tells the queues), once between successes: the report is the
            // box's word, not a request served.
            if health_changed && service_up {
                client.record_service_up();
            }
            // frpc reports only changes: one that changes nothing (a peer
            // repeating itself) does not wake every queue to look again.
            if health_changed || models_changed {
                state.queues.wake_all();
            }
            None
        }
        Command::OpenFailed { conn_id, reason } => {
            // The client's text: logged (at warn when the request fails
            // for it, at info when it says the box is busy), never told
            // to callers.
            let reason = common::text::tame(&reason, MAX_CLIENT_TEXT);
            debug!(client = %client.id, %conn_id, "client could not open a connection: {reason}");
            state
                .pending
                .fail(conn_id, client.session, PairError::Failed(reason));
            None
        }
        Command::Error { message } => {
            // A line a second at most: the text and the pace are the
            // client's.
            if client.may_log_error() {
                let message = common::text::tame(&message, MAX_CLIENT_TEXT);
                warn!(client = %client.id, "client reported an error: {message}");
            } else {
                debug!(client = %client.id, "client reported an error: {}", common::text::tame(&message, MAX_CLIENT_TEXT));
            }
            None
        }
        Command::Unknown => {
            debug!(client = %client.id, "ignoring a command this frps does not know (a newer frpc)");
            None
        }
        // Handled by the session loop (`renewal_saved`).
        Command::TokenSaved { .. } => None,
        other => Some(Command::Error {
            message: format!(
                "unexpected {} on a registered control connection",
                other.name()
            ),
        }),
    }
}

/// Writes one frame, giving up after `limit` (a peer that does not read is dead).
async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    cmd: &Command,
    limit: Duration,
) -> Result<(), FrameError> {
    tokio::time::timeout(limit, common::write_command(wr, cmd))
        .await
        .map_err(|_| FrameError::Timeout(limit))?
}

/// `bytes` random bytes, hex-encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    common::hex::encode(&buf)
}

/// Why a registration for `id` waits: the id was released to its account
/// while a session of the previous owner is still live.
fn still_live_elsewhere(id: &str) -> String {
    format!(
        "client id '{id}' was released to this account but a session of its previous owner is still live; retrying until it ends"
    )
}

/// How often a session's token is checked: every six heartbeat intervals,
/// or a quarter of the tokens' lifetime `ttl` when that is shorter (at
/// least 100 ms), so a check falls in the second half of a token's life
/// and renews it before it expires (with `--token-ttl 1m` and a 10 s
/// heartbeat the first check found the token expired, and a box without a
/// password stopped).
fn token_check_period(heartbeat: Duration, ttl: Option<Duration>) -> Duration {
    let period = heartbeat * 6;
    match ttl {
        Some(ttl) => period.min(ttl / 4).max(Duration::from_millis(100)),
        None => period,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token revoked between the login's check and its review (the
    /// renewal step) is refused there: its session would have run until
    /// the next review, up to a minute.
    #[tokio::test]
    async fn a_token_revoked_during_its_login_is_refused() {
        let db = crate::store::TempDb::new("control");
        let config = crate::Config::ephemeral("k", &db.url);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let addrs = crate::server::BoundAddrs {
            control: any,
            proxy: any,
            public: any,
            api: any,
        };
        let state = State::new(config, addrs).await.unwrap();
        let store = state.store.clone();
        store
            .create_user(
                "box@x.test",
                &crate::auth::accounts::hash_password("password"),
            )
            .await
            .unwrap();
        let from = std::net::IpAddr::from([192, 0, 2, 1]);
        let issued = state
            .accounts
            .login("box@x.test", "password", from)
            .await
            .unwrap();
        let checked = state
            .accounts
            .login_token(&issued.token, from)
            .await
            .unwrap();
        let (kept, renewal) = renewed_at_login(&state, checked.clone()).await.unwrap();
        assert_eq!(kept.email, "box@x.test");
        assert!(renewal.is_none(), "young: not renewed");
        let id = checked.token_id.clone().unwrap();
        assert_eq!(store.revoke_client_tokens(&id).await.unwrap(), 1);
        assert_eq!(
            renewed_at_login(&state, checked).await.err(),
            Some(LoginError::TokenInvalid)
        );
    }

    #[test]
    fn a_token_is_checked_in_the_second_half_of_its_life() {
        let s = Duration::from_secs;
        assert_eq!(token_check_period(s(10), None), s(60));
        assert_eq!(token_check_period(s(10), Some(s(30 * 86400))), s(60));
        // A lifetime at or under six heartbeats: a quarter of it.
        assert_eq!(token_check_period(s(10), Some(s(60))), s(15));
        assert_eq!(token_check_period(s(3600), Some(s(6 * 3600))), s(5400));
        assert_eq!(
            token_check_period(s(10), Some(s(1))),
            Duration::from_millis(250)
        );
        let least = Duration::from_millis(100);
        assert_eq!(
            token_check_period(s(10), Some(Duration::from_millis(1))),
            least
        );
    }

    /// A session replaced under its client id writes its machine offline
    /// when the id went to another machine, or when the session that
    /// replaced it already left (it wrote only its own machine's row).
    #[test]
    fn a_replaced_session_writes_its_machine_offline_unless_it_lives_on() {
        let reg = crate::registry::Registry::default();
        let on = |machine: &str| {
            let (mut new, _rx) = crate::registry::testing::new_client("gpu", &[], None);
            new.registration.machine_id = machine.into();
            reg.insert(new).unwrap()
        };
        let ended = on("m1");
        let same = on("m1");
        assert!(!replaced_by_another_machine(Some(&same), &ended));
        let other = on("m2");
        assert!(replaced_by_another_machine(Some(&other), &ended));
        assert!(replaced_by_another_machine(None, &ended));
    }

    #[test]
    fn registrations_are_validated() {
        let ok = Registration {
            client_id: "gpu-01.lab:a@b_c".into(),
            machine_id: "4c4c4544-0042-3510".into(),
            hostname: "gpu box (lab)".into(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        let mut bad = ok.clone();
        bad.protocol_version = 99;
        let (newer, retry) = validate(&bad).unwrap_err();
        assert!(!retry);
        assert!(newer.ends_with("upgrade frps"), "{newer}");
        bad.protocol_version = 0;
        let (older, _) = validate(&bad).unwrap_err();
        assert!(older.ends_with("upgrade frpc"), "{older}");
        for id in ["", "has space", "new\nline", &"x".repeat(200)] {
            let mut bad = ok.clone();
            bad.client_id = id.into();
            assert!(validate(&bad).is_err(), "{id:?} accepted");
        }
        for machine in ["", "a\tb", &"m".repeat(256)] {
            let mut bad = ok.clone();
            bad.machine_id = machine.into();
            assert!(validate(&bad).is_err(), "{machine:?} accepted");
        }
        let mut bad = ok.clone();
        bad.os = "linux\r\n".into();
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn session_keys_are_random_256_bit() {
        let a = random_hex(32);
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_hex(32));
    }
}
