//! Data connections: on `OpenConnection`, connect the local service, dial the
//! proxy port, say hello, then join the two streams. And the session's
//! tunnel connection, when frps offers one: each stream frps opens on it is
//! joined to a new connection to the local service, as a data connection
//! would be, without a command or a dial per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::mux::{GoneBy, Mux, MuxStream, Role};
use common::{Command, MAX_FRAME, Stream, join_streams_lingering, read_one_command, write_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::control::from_frps;
use crate::tls::Dialer;

/// What a data connection needs to prove it belongs to this session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Registered client id.
    pub client_id: String,
    /// Session key from `Registered`.
    pub session_key: String,
    /// Whether frps offered a tunnel connection.
    pub mux: bool,
    /// Where data and tunnel connections go ([`dial_back_addr`]).
    pub proxy_addr: String,
}

/// frps's proxy port at the address this session's control connection
/// reached: a server name is resolved once per session, not per dial-back,
/// so dial-backs reach the frps that holds the session (several frps behind
/// one round-robin DNS name each know only their own sessions) and a slow
/// resolver costs nothing per request. The configured address when the
/// control connection's peer is unknown.
pub fn dial_back_addr(control_peer: Option<std::net::SocketAddr>, config: &Config) -> String {
    match control_peer {
        // The peer address as it is (an IPv6 scope id included), on the
        // proxy port.
        Some(mut peer) => {
            peer.set_port(config.proxy_port);
            peer.to_string()
        }
        None => config.proxy_addr(),
    }
}

/// How long a data connection whose service answered without taking the
/// whole request may wait for the answer's acknowledgement, the rest of
/// the request read and dropped meanwhile, before it is closed
/// ([`until_delivered`]).
pub const ANSWERED_DRAIN: Duration = Duration::from_secs(5);

/// How long a data connection frps has closed waits for the local service's
/// next byte before both are dropped.
pub const DIAL_BACK_LINGER: Duration = Duration::from_secs(10);

/// How often a tunnel stream whose local connection is still being made
/// looks whether frps reset it meanwhile.
const STREAM_GONE_CHECK: Duration = Duration::from_millis(100);

/// Data connections that could not be opened (the proxy port or the local
/// service unreachable) are said at warn once a second at most, the rest
/// at debug: a proxy port firewalled while the control port is open, or a
/// local service down, made a warn line per request.
static OPEN_FAILURES: common::pace::SharedPace =
    common::pace::SharedPace::new(Duration::from_secs(1));

/// Data connections frps refused (a plugin refusing every dial-back),
/// paced apart from [`OPEN_FAILURES`]: one kind does not hide the other.
static REFUSALS: common::pace::SharedPace = common::pace::SharedPace::new(Duration::from_secs(1));

/// Says a data connection's failure at warn as `pace` lets it, else at debug.
fn paced(pace: &common::pace::SharedPace, message: std::fmt::Arguments<'_>) {
    if pace.admit() {
        warn!("{message}");
    } else {
        debug!("{message}");
    }
}

/// Says that a data connection could not be opened ([`OPEN_FAILURES`]).
fn data_failure(message: std::fmt::Arguments<'_>) {
    paced(&OPEN_FAILURES, message);
}

/// First wait before dialing a lost tunnel connection again; doubles up to
/// [`TUNNEL_RETRY_MAX`] while dials fail, and starts over once one works.
/// Meanwhile frps asks for dial-backs, as without a tunnel connection.
pub const TUNNEL_RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two tunnel dials.
pub const TUNNEL_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a tunnel connection ended.
#[derive(Debug, thiserror::Error)]
enum TunnelError {
    /// frps said no: asked again only after [`TUNNEL_RETRY_MAX`].
    #[error("frps refused the tunnel connection: {0}")]
    Refused(String),
    /// Dialing, the handshake or the connection failed.
    #[error("{0}")]
    Lost(String),
}

/// Keeps the session's tunnel connection up while the session lasts: dials
/// it, serves the streams frps opens (each task on `tasks`, ending only
/// with frpc's `shutdown`, and holding one of `slots`, the
/// `--max-data-connections` that dial-backs take too), and dials again
/// after a pause when it is lost or refused (a refusal waits
/// [`TUNNEL_RETRY_MAX`]). Once `session_over`, no new dial: a connection
/// still up keeps serving the streams in flight (as dial-back connections
/// outlive their session) until frps closes it, and resets any new one.
pub async fn run_tunnel(
    config: Arc<Config>,
    dialer: Dialer,
    session: Arc<Session>,
    tasks: TaskTracker,
    slots: Arc<DataSlots>,
    session_over: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut pause = TUNNEL_RETRY_MIN;
    // The last refusal's reason: the same one again (a plugin's standing
    // policy, asked every 30 s) is not worth a warning each time.
    let mut last_refusal: Option<String> = None;
    loop {
        let run = tunnel(
            &config,
            &dialer,
            &session,
            &tasks,
            &slots,
            &session_over,
            &shutdown,
        );
        let (result, accepted) = tokio::select! {
            r = run => r,
            _ = shutdown.cancelled() => return,
        };
        if session_over.is_cancelled() && accepted.is_none() {
            return;
        }
        let refused = matches!(result, Err(TunnelError::Refused(_)));
        match result {
            Err(TunnelError::Refused(reason)) => {
                if last_refusal.as_deref() == Some(reason.as_str()) {
                    debug!("frps refused the tunnel connection again ({reason})");
                } else {
                    warn!(
                        "frps refused the tunnel connection ({reason}); dial-backs meanwhile, asking again every {TUNNEL_RETRY_MAX:?}"
                    );
                    last_refusal = Some(reason);
                }
            }
            // With its session: the next session dials its own.
            Err(TunnelError::Lost(reason)) if session_over.is_cancelled() => {
                debug!("tunnel connection ended with its session: {reason}");
                return;
            }
            Err(TunnelError::Lost(reason)) => {
                last_refusal = None;
                warn!("tunnel connection lost: {reason}; dial-backs until it is back")
            }
            Ok(()) => {
                last_refusal = None;
                debug!("tunnel connection closed by frps")
            }
        }
        let wait = pause_after(pause, accepted, refused);
        tokio::select! {
            // Jittered: a fleet whose tunnels dropped at once (frps's proxy
            // port restarted, its sessions kept) does not redial at once.
            _ = tokio::time::sleep(crate::backoff::jittered(wait)) => {}
            _ = session_over.cancelled() => return,
        }
        pause = (wait * 2).min(TUNNEL_RETRY_MAX);
    }
}

/// Why frpc refuses another data connection or tunnel stream: frps takes
/// a refusal starting with [`common::protocol::OPEN_BUSY`] as the box busy.
pub fn busy_reason(max: u32) -> String {
    format!(
        "{}frpc already holds {max} data connections (--max-data-connections)",
        common::protocol::OPEN_BUSY
    )
}

/// The `--max-data-connections` slots that dial-backs and tunnel streams
/// take alike, across sessions.
#[derive(Debug)]
pub struct DataSlots {
    slots: Arc<Semaphore>,
    max: u32,
    /// Set while requests are refused for want of a slot: the first
    /// refusal of a run is a warning, the rest debug lines.
    out: AtomicBool,
}

impl DataSlots {
    /// `max` slots.
    pub fn new(max: u32) -> Self {
        DataSlots {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            out: AtomicBool::new(false),
        }
    }

    /// A slot for `what` (a dial-back's or stream's id), else the reason
    /// to refuse it with (logged: at warn once per run of refusals).
    pub fn take(&self, what: impl std::fmt::Display) -> Result<OwnedSemaphorePermit, String> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                self.out.store(false, Ordering::Relaxed);
                Ok(slot)
            }
            Err(_) => {
                let reason = busy_reason(self.max);
                if self.out.swap(true, Ordering::Relaxed) {
                    debug!("{what}: {reason}");
                } else {
                    warn!("{what}: {reason}: refusing frps's requests for more");
                }
                Err(reason)
            }
        }
    }
}

/// The pause before the next tunnel dial, after one that waited `pause`
/// and was accepted at `accepted` (if it was): the shortest again only
/// after a connection that lasted [`crate::control::STABLE_SESSION`] (one
/// lost right after frps took it, every time, must not be dialled twice a
/// second for ever), the longest after a refusal.
fn pause_after(pause: Duration, accepted: Option<tokio::time::Instant>, refused: bool) -> Duration {
    if refused {
        TUNNEL_RETRY_MAX
    } else if accepted.is_some_and(|at| at.elapsed() >= crate::control::STABLE_SESSION) {
        TUNNEL_RETRY_MIN
    } else {
        pause
    }
}

/// One tunnel connection, until it ends; also says when frps accepted it.
async fn tunnel(
    config: &Arc<Config>,
    dialer: &Dialer,
    session: &Session,
    tasks: &TaskTracker,
    slots: &DataSlots,
    session_over: &CancellationToken,
    shutdown: &CancellationToken,
) -> (Result<(), TunnelError>, Option<tokio::time::Instant>) {
    let proxy_addr = &session.proxy_addr;
    let handshake = async {
        let mut remote = dialer
            .connect(proxy_addr, config.connect_timeout)
            .await
            .map_err(|e| TunnelError::Lost(format!("proxy port: {e}")))?;
        let hello = Command::MuxHello {
            client_id: session.client_id.clone(),
            session_key: session.session_key.clone(),
        };
        let lost =
            |e: common::FrameError| TunnelError::Lost(format!("handshake with {proxy_addr}: {e}"));
        write_command(&mut remote, &hello).await.map_err(lost)?;
        // frps asks its NewWorkConn plugins before answering (each within
        // its --plugin-timeout): the wait of a control request, not of a
        // bare handshake.
        // A newer frps's frames this version does not know are skipped,
        // as on the control connection, within the one wait.
        let answer = common::codec::read_one_known_command(
            &mut remote,
            MAX_FRAME,
            crate::control::REPLY_TIMEOUT,
        )
        .await
        .map_err(lost)?;
        match answer {
            Command::MuxAccepted => Ok(remote),
            Command::DataRejected { reason, .. } => Err(TunnelError::Refused(from_frps(&reason))),
            Command::Error { message } => Err(TunnelError::Refused(from_frps(&message))),
            other => Err(TunnelError::Refused(format!("unexpected {}", other.name()))),
        }
    };
    // A handshake under way when the session ends (a stop, a reconnect)
    // is given up: nothing would use its connection, and a stop would
    // wait for it (up to frps's reply timeout) as for a request in flight.
    let remote = tokio::select! {
        done = handshake => match done {
            Ok(remote) => remote,
            Err(e) => return (Err(e), None),
        },
        _ = session_over.cancelled() => return (Ok(()), None),
    };
    let accepted = tokio::time::Instant::now();
    debug!("tunnel connection open");
    let (mux, driver) = Mux::new(remote, Role::Acceptor);
    let accept = async {
        while let Some(stream) = mux.accept().await {
            if session_over.is_cancelled() {
                // As busy: frps moves the request to another box without
                // counting a failure of this one (a stop or reconnect is
                // none).
                stream.reset(&format!(
                    "{}the session of this tunnel connection has ended",
                    common::protocol::OPEN_BUSY
                ));
                continue;
            }
            // frps takes a reset with this reason as the box busy.
            let slot = match slots.take(format_args!("stream {}", stream.id())) {
                Ok(slot) => slot,
                Err(reason) => {
                    stream.reset(&reason);
                    continue;
                }
            };
            let (config, shutdown) = (config.clone(), shutdown.clone());
            tasks.spawn(async move {
                let _slot = slot;
                tokio::select! {
                    _ = serve_stream(&config, stream) => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    };
    let result = tokio::select! {
        r = driver => r.map_err(|e| TunnelError::Lost(e.to_string())),
        _ = accept => Ok(()),
    };
    (result, Some(accepted))
}

/// Joins one stream of the tunnel connection to a new connection to the
/// local service; when the service cannot be reached the stream is reset
/// with the reason, and frps fails the request over.
async fn serve_stream(config: &Config, mut stream: MuxStream) {
    let id = stream.id();
    let watch = stream.watch();
    let whose = watch.clone();
    // Who ended a stream that went away under the join.
    let reset_by = move || match whose.gone_by() {
        Some(GoneBy::ShedHere) => {
            "frpc shed the stream for the tunnel connection's receive budget (it held the most unread)"
        }
        Some(GoneBy::ConnectionLost) => "the tunnel connection ended",
        _ => "frps reset the stream",
    };
    // A stream frps gave up on meanwhile (its caller left while the service
    // was slow to accept) is let go at once: a stream held until the
    // connect times out still counts against the tunnel connection's
    // stream limit, and enough of them would end the connection, failing
    // every healthy stream on it.
    let gone = async {
        loop {
            tokio::time::sleep(STREAM_GONE_CHECK).await;
            if watch.gone() {
                return;
            }
        }
    };
    let connected = tokio::select! {
        connected = connect_local(config) => connected,
        () = gone => {
            debug!(stream = id, "{} while the local service was being connected", reset_by());
            return;
        }
    };
    let mut local = match connected {
        Ok(local) => local,
        Err(reason) => {
            data_failure(format_args!(
                "stream {id}: cannot open data connection: {reason}"
            ));
            stream.reset(&reason);
            return;
        }
    };
    // As on a dial-back: once frps closed the stream, a hung service
    // that ignores the half-close gets DIAL_BACK_LINGER, not for ever; and
    // a service that stopped taking a request frps has given up on (it
    // reset the stream) is let go.
    match join_streams_lingering(&mut stream, &mut local, DIAL_BACK_LINGER, move || {
        watch.gone()
    })
    .await
    {
        Ok(stats) => {
            debug!(
                stream = id,
                to_local = stats.a_to_b,
                to_server = stats.b_to_a,
                "tunnel stream closed"
            )
        }
        Err(e) if common::SenderGone::is(&e) => warn!(
            stream = id,
            "{} while the local service took none of the request for {:?}; closing the local connection",
            reset_by(),
            common::GONE_CHECK
        ),
        Err(e) => debug!(stream = id, "tunnel stream ended: {e}"),
    }
}

/// A connection to the local service, within `--connect-timeout`.
async fn connect_local(config: &Config) -> Result<TcpStream, String> {
    let limit = config.connect_timeout;
    let local_host = config.local_host();
    let local = tokio::time::timeout(limit, common::stream::connect_any(&local_host))
        .await
        .map_err(|_| format!("local service {local_host} did not accept within {limit:?}"))?
        .map_err(|e| format!("local service {local_host} unreachable: {e}"))?;
    let _ = local.set_nodelay(true);
    Ok(local)
}

/// Opens data connection `conn_id`; failures before the join are reported to
/// frps through `control` as `OpenFailed` so it can fail over at once.
pub async fn open(
    config: Arc<Config>,
    dialer: Dialer,
    session: Arc<Session>,
    conn_id: Uuid,
    control: mpsc::Sender<Command>,
) {
    match connect(&config, &dialer, &session, conn_id).await {
        Ok((mut remote, mut local)) => {
            match forward(&config, &mut remote, &mut local, conn_id).await {
                // Closed before a byte: frps dropped it unread (its connection
                // cap, say). Said over the control connection, frps fails the
                // request over at once instead of waiting --connect-timeout; for
                // a pairing no longer waiting it is a no-op.
                Ok(false) => {
                    debug!(%conn_id, "frps closed the data connection before using it");
                    let reason = "frps closed the data connection before using it".to_owned();
                    let _ = control.send(Command::OpenFailed { conn_id, reason }).await;
                }
                Ok(true) => {}
                Err(e) => debug!(%conn_id, "data connection ended: {e}"),
            }
        }
        Err(reason) => {
            data_failure(format_args!(
                "{conn_id}: cannot open data connection: {reason}"
            ));
            let _ = control.send(Command::OpenFailed { conn_id, reason }).await;
        }
    }
}

async fn connect(
    config: &Config,
    dialer: &Dialer,
    session: &Session,
    conn_id: Uuid,
) -> Result<(Stream, TcpStream), String> {
    let limit = config.connect_timeout;
    let proxy_addr = &session.proxy_addr;
    let local = connect_local(config);
    let remote = async {
        dialer
            .connect(proxy_addr, limit)
            .await
            .map_err(|e| format!("proxy port: {e}"))
    };
    let (local, mut remote) = tokio::try_join!(local, remote)?;
    let hello = Command::DataHello {
        conn_id,
        client_id: session.client_id.clone(),
        session_key: session.session_key.clone(),
    };
    write_command(&mut remote, &hello)
        .await
        .map_err(|e| format!("cannot send hello to {proxy_addr}: {e}"))?;
    Ok((remote, local))
}

/// Joins `remote` and `local` once frps starts talking. Frames start with a
/// zero byte (their length is below 16 MiB) and HTTP never does, so a first
/// zero byte means frps refused the hello: read the refusal instead of
/// passing it to the local service. Otherwise that first byte goes to the
/// local service ahead of the rest. False when frps closed (or reset) the
/// connection before sending anything.
///
/// `local` was opened with the dial (so an unreachable service is reported
/// before frps sends a request), but frps may keep the connection in its
/// pool, unused, for up to its `--pool-idle-timeout`: a service that closes
/// connections idle that long (llama.cpp's server after 5 s) is seen doing
/// so, and the request gets a new connection (before, it went into the
/// closed one, and frps had to send it again).
async fn forward(
    config: &Config,
    remote: &mut Stream,
    local: &mut TcpStream,
    conn_id: Uuid,
) -> std::io::Result<bool> {
    let path = path_watch(remote.tcp());
    forward_watched(remote, local, conn_id, path, connect_local(config)).await
}

/// [`forward`], ended early (both connections closed, `TimedOut`) when
/// `path` says frps's end went silent; `redial` opens the local connection
/// again when the service closed it before the request.
async fn forward_watched(
    remote: &mut Stream,
    local: &mut TcpStream,
    conn_id: Uuid,
    path: impl Future<Output = common::stream::PathState>,
    redial: impl Future<Output = Result<TcpStream, String>>,
) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    // Before a request the service has nothing to say: what `peek` sees
    // there is its end closing (or bytes of its own, left for the join).
    let mut local_closed = false;
    let mut watching = true;
    let got = loop {
        let mut byte = [0u8; 1];
        tokio::select! {
            got = remote.read(&mut first) => break got,
            seen = local.peek(&mut byte), if watching => {
                watching = false;
                local_closed = !matches!(seen, Ok(n) if n > 0);
            }
        }
    };
    match got {
        Ok(0) => return Ok(false),
        Ok(_) => {}
        // Reset before a byte: closed unread with our hello still in its
        // buffer.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    if first[0] == 0 {
        let mut frame = AsyncReadExt::chain(&first[..], &mut *remote);
        match read_one_command(&mut frame, MAX_FRAME, common::codec::HANDSHAKE_TIMEOUT).await {
            // frps gave up on the pairing (its caller left, its wait ran
            // out, the request moved elsewhere): routine, not a refusal.
            Ok(Command::DataRejected { reason, .. }) if given_up(&reason) => {
                debug!(%conn_id, "frps no longer wanted the data connection: {}", from_frps(&reason))
            }
            Ok(Command::DataRejected { reason, .. }) => paced(
                &REFUSALS,
                format_args!(
                    "{conn_id}: frps refused the data connection: {}",
                    from_frps(&reason)
                ),
            ),
            Ok(other) => warn!(%conn_id, "unexpected {} on a data connection", other.name()),
            Err(e) => warn!(%conn_id, "bad frame on a data connection: {e}"),
        }
        return Ok(true);
    }
    if local_closed {
        debug!(%conn_id, "the local service closed the idle connection; opening another for the request");
        *local = redial.await.map_err(|reason| {
            data_failure(format_args!(
                "{conn_id}: cannot open data connection: {reason}"
            ));
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, reason)
        })?;
    }
    // A request: from now on a slow reader is not a dead path.
    let _ = common::stream::release_user_timeout(remote.tcp());
    local.write_all(&first).await?;
    // Without the user timeout, a path that dies while an answer is on its
    // way would be retried by the kernel for about 15 minutes, holding the
    // local connection (and the service's slot): watched instead, in a way
    // that tells a dead path from a slow reader.
    // frps never half-closes a connection it still wants an answer on: once
    // it has closed, the service's answer (or silence, if it hangs and
    // ignores the half-close) gets DIAL_BACK_LINGER, not for ever.
    // While the service takes nothing of a request, nothing reads frps's
    // side: its end (it gave up on the request) is looked up instead.
    let gone = peer_watch(remote.tcp());
    let stats = tokio::select! {
        joined = join_streams_lingering(remote, local, DIAL_BACK_LINGER, gone) => match joined {
            Err(e) if common::SenderGone::is(&e) => {
                warn!(%conn_id, "frps closed the data connection while the local service took none of the request for {:?}; closing the local connection", common::GONE_CHECK);
                return Err(e);
            }
            // The service answered early (a 413) and closed without
            // reading the rest of the upload, which frps still sends: the
            // answer went back whole, with the end of it. Closed with those
            // bytes unread, the connection would be reset, and the reset
            // drops what of the answer frps has not acknowledged yet (on a
            // real network, most of it): the rest is read and dropped
            // first, until frps closes (it has the answer) or a deadline.
            Err(e) if common::join::AnsweredBack::is(&e) => {
                debug!(%conn_id, "the local service answered without taking the whole request: {e}");
                until_delivered(remote).await;
                return Err(e);
            }
            joined => joined?,
        },
        silent = path => {
            warn!(%conn_id, "no acknowledgement from frps for {:?} with {} bytes to deliver: the path is gone; closing the data connection and the local one", silent.since_ack, silent.queued);
            // Reset, not closed: a close would leave the kernel
            // retransmitting the queued bytes into the dead path.
            let _ = common::stream::reset_on_close(remote.tcp());
            return Err(std::io::ErrorKind::TimedOut.into());
        }
    };
    debug!(%conn_id, to_local = stats.a_to_b + 1, to_server = stats.b_to_a, "data connection closed");
    Ok(true)
}

/// Reads and drops what frps still sends on `remote` (the rest of an
/// upload its service did not take) until everything frpc sent on it,
/// the end included, is acknowledged (the kernel's send queue is empty),
/// frps closes it, or [`ANSWERED_DRAIN`] passes: closed with unread bytes,
/// the connection is reset, and the reset drops what of the answer is not
/// yet acknowledged. (Counting bytes instead ended the wait at a few MiB
/// of the upload, well within one round trip on a fast link.)
async fn until_delivered(remote: &mut Stream) {
    use tokio::io::AsyncReadExt;
    #[cfg(unix)]
    let state = socket_reader(remote.tcp(), common::stream::path_state);
    #[cfg(not(unix))]
    let state = || -> std::io::Result<common::stream::PathState> {
        Err(std::io::ErrorKind::Unsupported.into())
    };
    let deadline = tokio::time::Instant::now() + ANSWERED_DRAIN;
    let mut sink = vec![0u8; 16 * 1024];
    loop {
        match state() {
            Ok(s) if s.queued == 0 => return,
            Ok(_) => {}
            // Where the queue cannot be read: read on until the deadline.
            Err(_) => {}
        }
        // Looked at again each 20 ms while frps sends nothing.
        let next = (tokio::time::Instant::now() + Duration::from_millis(20)).min(deadline);
        match tokio::time::timeout_at(next, remote.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => return,
            _ if tokio::time::Instant::now() >= deadline => return,
            _ => {}
        }
    }
}

/// `read` of the descriptor under `tcp`, whenever the returned function is
/// called: for the watches raced against (or asked by) the join that owns
/// the connection, and dropped with it.
#[cfg(unix)]
fn socket_reader<T>(
    tcp: &TcpStream,
    read: fn(std::os::fd::BorrowedFd<'_>) -> std::io::Result<T>,
) -> impl Fn() -> std::io::Result<T> + Sync + use<T> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let fd = tcp.as_raw_fd();
    move || {
        // SAFETY: the readers live no longer than the join that owns the
        // connection: the descriptor is open whenever this runs.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        read(fd)
    }
}

/// Resolves once the path under `tcp` (frpc's end of a data connection)
/// has gone silent ([`common::stream::path_gone_silent`]).
#[cfg(unix)]
fn path_watch(tcp: &TcpStream) -> impl Future<Output = common::stream::PathState> + use<> {
    common::stream::path_gone_silent(
        socket_reader(tcp, common::stream::path_state),
        common::stream::SILENT_PATH_LIMIT,
        common::stream::SILENT_PATH_CHECK,
    )
}

/// Whether frps has closed or reset its end of the data connection under
/// `tcp` ([`common::stream::peer_gone`]); never, where that cannot be read.
#[cfg(unix)]
fn peer_watch(tcp: &TcpStream) -> impl Fn() -> bool + Sync + use<> {
    let gone = socket_reader(tcp, common::stream::peer_gone);
    move || gone().unwrap_or(false)
}

/// Never gone where descriptors cannot be read this way.
#[cfg(not(unix))]
fn peer_watch(_: &TcpStream) -> impl Fn() -> bool + Sync + use<> {
    || false
}

/// Not watched where descriptors cannot be read this way.
#[cfg(not(unix))]
fn path_watch(_: &TcpStream) -> impl Future<Output = common::stream::PathState> + use<> {
    std::future::pending()
}

/// Whether a `DataRejected` reason is frps having given up on the pairing
/// (what frps's `pending` says then), not a refusal of the connection.
fn given_up(reason: &str) -> bool {
    reason.starts_with("unknown or expired connection id")
        || reason.starts_with("the request gave up waiting")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tokio::net::TcpListener;

    /// A data connection failing on every request is said at warn once a
    /// second at most, not once per request.
    #[test]
    fn data_connection_failures_are_said_once_a_second() {
        let ((), said) = common::testing::logged(|| {
            for i in 0..50 {
                data_failure(format_args!("{i}: cannot open data connection: refused"));
            }
        });
        assert!(
            said.matches("cannot open data connection").count() <= 1,
            "{said}"
        );
        // A refusal by frps is paced apart: not hidden by the failures.
        let ((), said) = common::testing::logged(|| {
            data_failure(format_args!("x: cannot open data connection: refused"));
            paced(
                &REFUSALS,
                format_args!("y: frps refused the data connection"),
            );
        });
        assert!(said.contains("frps refused the data connection"), "{said}");
    }

    #[test]
    fn a_pairing_frps_gave_up_on_is_no_refusal() {
        // What frps's `pending` says of a pairing whose request left.
        assert!(given_up("unknown or expired connection id"));
        assert!(given_up("the request gave up waiting for this connection"));
        assert!(!given_up("server plugin 'p' rejected it: not today"));
        assert!(!given_up(
            "connection id does not belong to this client session"
        ));
    }

    #[test]
    fn a_run_of_refusals_for_want_of_a_slot_is_warned_once() {
        let slots = DataSlots::new(1);
        let held = slots.take("first").expect("one slot");
        let (refusals, said) = common::testing::logged(|| {
            (0..3)
                .map(|i| slots.take(format_args!("stream {i}")).unwrap_err())
                .collect::<Vec<_>>()
        });
        assert!(
            refusals.iter().all(|r| r == &busy_reason(1)),
            "{refusals:?}"
        );
        assert!(refusals[0].starts_with(common::protocol::OPEN_BUSY));
        assert_eq!(said.matches("--max-data-connections").count(), 1, "{said}");
        assert!(said.contains("stream 0"), "{said}");
        // A slot free again ends the run: the next refusal warns again.
        drop(held);
        let again = slots.take("second").expect("freed");
        let (_, said) = common::testing::logged(|| slots.take("third").unwrap_err());
        assert!(said.contains("third"), "{said}");
        drop(again);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_tunnel_that_lasted_is_dialled_again_at_once() {
        let grown = Duration::from_secs(8);
        // Never accepted, or lost right after frps took it: the pause goes
        // on growing.
        assert_eq!(pause_after(grown, None, false), grown);
        let accepted = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(pause_after(grown, Some(accepted), false), grown);
        // Up for a while: from the shortest again.
        tokio::time::advance(crate::control::STABLE_SESSION).await;
        assert_eq!(pause_after(grown, Some(accepted), false), TUNNEL_RETRY_MIN);
        // Refused: the longest.
        assert_eq!(pause_after(grown, Some(accepted), true), TUNNEL_RETRY_MAX);
    }

    #[test]
    fn dial_backs_go_where_the_control_connection_went() {
        let mut config = Config::parse_from(["frpc"]);
        config.server_addr = "frps.example".into();
        config.proxy_port = 17001;
        // The name's address for this session, not the name again.
        let peer: std::net::SocketAddr = "203.0.113.7:17000".parse().unwrap();
        assert_eq!(dial_back_addr(Some(peer), &config), "203.0.113.7:17001");
        let peer: std::net::SocketAddr = "[2001:db8::7]:17000".parse().unwrap();
        assert_eq!(dial_back_addr(Some(peer), &config), "[2001:db8::7]:17001");
        assert_eq!(dial_back_addr(None, &config), "frps.example:17001");
    }

    /// frpc's end of a data connection and its local one, and the other
    /// ends of both (frps's and the service's), over loopback.
    async fn joined_pairs() -> (Stream, TcpStream, TcpStream, TcpStream) {
        let frps = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (remote, frps_end) = tokio::join!(
            TcpStream::connect(frps.local_addr().unwrap()),
            frps.accept()
        );
        let (local, service_end) = tokio::join!(
            TcpStream::connect(service.local_addr().unwrap()),
            service.accept()
        );
        (
            Stream::from(remote.unwrap()),
            local.unwrap(),
            frps_end.unwrap().0,
            service_end.unwrap().0,
        )
    }

    /// A redial for a test whose service keeps its connection.
    async fn no_redial() -> Result<TcpStream, String> {
        panic!("the local connection was open")
    }

    /// [`forward_watched`] of `remote` and `local` in a task, with a path
    /// that never goes silent and a service that keeps its connection.
    fn forwarding(
        remote: Stream,
        local: TcpStream,
    ) -> tokio::task::JoinHandle<std::io::Result<bool>> {
        forwarding_with(remote, local, std::future::pending(), no_redial())
    }

    /// [`forward_watched`] of `remote` and `local` in a task, watching
    /// `path` and opening the local connection again with `redial`.
    fn forwarding_with(
        mut remote: Stream,
        mut local: TcpStream,
        path: impl Future<Output = common::stream::PathState> + Send + 'static,
        redial: impl Future<Output = Result<TcpStream, String>> + Send + 'static,
    ) -> tokio::task::JoinHandle<std::io::Result<bool>> {
        tokio::spawn(async move {
            forward_watched(&mut remote, &mut local, Uuid::new_v4(), path, redial).await
        })
    }

    #[tokio::test]
    async fn a_local_connection_the_service_closed_while_pooled_is_opened_again() {
        let (remote, local, mut frps_end, service_end) = joined_pairs().await;
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let again = service.local_addr().unwrap();
        let redial = async move { TcpStream::connect(again).await.map_err(|e| e.to_string()) };
        let forwarding = forwarding_with(remote, local, std::future::pending(), redial);
        // The service closes the connection as idle, and a while later
        // frps sends a request on it.
        drop(service_end);
        tokio::time::sleep(Duration::from_millis(100)).await;
        frps_end.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut service_end, _) = tokio::time::timeout(Duration::from_secs(10), service.accept())
            .await
            .expect("a new local connection")
            .unwrap();
        let mut got = [0u8; 18];
        service_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n", "the whole request");
        service_end.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        drop(service_end);
        let mut head = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), frps_end.read_to_end(&mut head))
            .await
            .expect("the answer, then the close")
            .unwrap();
        assert_eq!(head, b"HTTP/1.1 200 OK\r\n");
        drop(frps_end);
        let carried = tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("ends once both sides closed");
        assert!(carried.unwrap().unwrap(), "a request was carried");
    }

    /// A service that answers at once and closes without reading the rest
    /// of an upload: frps gets the whole answer and then the end of it, not
    /// a reset (which on a real network destroys what of the answer was
    /// not yet acknowledged).
    #[tokio::test]
    async fn an_answer_before_the_whole_upload_ends_in_a_close_not_a_reset() {
        let (remote, local, frps_end, mut service_end) = joined_pairs().await;
        let mut forwarding = forwarding(remote, local);
        let (mut from_frpc, mut to_frpc) = frps_end.into_split();
        // frps sends the head, then a body of 4 MiB, as fast as it is taken.
        let uploading = tokio::spawn(async move {
            to_frpc
                .write_all(b"POST /upload HTTP/1.1\r\ncontent-length: 4194304\r\n\r\n")
                .await?;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..64 {
                to_frpc.write_all(&chunk).await?;
            }
            std::io::Result::Ok(to_frpc)
        });
        let mut head = [0u8; 16];
        service_end.read_exact(&mut head).await.unwrap();
        service_end
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        // Closed with most of the upload unread: the kernel resets it.
        drop(service_end);
        // frps reads only once frpc is done with the connection.
        let ended = tokio::time::timeout(Duration::from_secs(10), &mut forwarding)
            .await
            .expect("ends once the answer is acknowledged");
        assert!(
            ended.unwrap().is_err(),
            "the failed write is still reported"
        );
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), from_frpc.read_to_end(&mut answer))
                .await
                .expect("the answer and its end");
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(read.is_ok(), "ended by a close, not {read:?}");
        // The rest of the upload has nowhere to go.
        uploading.abort();
    }

    /// What frpc sent is waited for until the peer acknowledged it (here:
    /// took it, its window having been shut), the peer's bytes read and
    /// dropped meanwhile; then the wait ends, not at its deadline.
    #[tokio::test]
    async fn the_answer_is_waited_for_until_acknowledged() {
        // frps's side takes little before its window shuts; frpc's holds
        // the whole answer in its send queue.
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(4096).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4 << 20).unwrap();
        let (ours, theirs) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut remote, mut theirs) = (Stream::from(ours.unwrap()), theirs.unwrap().0);
        const ANSWER: usize = 256 * 1024;
        tokio::time::timeout(Duration::from_secs(5), remote.write_all(&[b'a'; ANSWER]))
            .await
            .expect("queued whole")
            .unwrap();
        // Its peer still sends (what frpc drops) and reads nothing yet.
        theirs.write_all(&[b'u'; 1000]).await.unwrap();
        let mut waiting = tokio::spawn(async move {
            until_delivered(&mut remote).await;
            remote
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the answer is not acknowledged yet");
        let reading = tokio::spawn(async move {
            let (mut got, mut buf) = (0, vec![0u8; 64 * 1024]);
            while got < ANSWER {
                let n = theirs.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got += n;
            }
            got
        });
        let _remote = tokio::time::timeout(Duration::from_secs(4), &mut waiting)
            .await
            .expect("ends once acknowledged, before its deadline")
            .unwrap();
        assert_eq!(reading.await.unwrap(), ANSWER);
    }

    #[tokio::test]
    async fn a_service_that_speaks_first_keeps_its_connection() {
        let (remote, local, mut frps_end, mut service_end) = joined_pairs().await;
        let forwarding = forwarding(remote, local);
        service_end.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!forwarding.is_finished(), "waiting for frps's first byte");
        frps_end.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        service_end.read_exact(&mut got).await.unwrap();
        let mut hello = [0u8; 5];
        frps_end.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        drop(frps_end);
        drop(service_end);
        let carried = tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("ends once both sides closed");
        assert!(carried.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_silent_path_closes_the_data_connection_and_the_local_one() {
        let (remote, local, mut frps_end, mut service_end) = joined_pairs().await;
        let (silent, path) = tokio::sync::oneshot::channel();
        let path = async move {
            let _ = path.await;
            common::stream::PathState {
                queued: 100,
                since_ack: common::stream::SILENT_PATH_LIMIT,
            }
        };
        let forwarding = forwarding_with(remote, local, path, no_redial());
        // A request reaches the service and it starts answering.
        frps_end.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0u8; 18];
        service_end.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
        service_end.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut head = [0u8; 17];
        frps_end.read_exact(&mut head).await.unwrap();
        assert!(
            !forwarding.is_finished(),
            "the join goes on while the path answers"
        );
        // The path goes silent: both connections close.
        silent.send(()).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("ends")
            .unwrap();
        assert_eq!(ended.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        // frps's end is reset (nothing left retransmitting into the path).
        let mut more = [0u8; 64];
        let reset = tokio::time::timeout(Duration::from_secs(10), frps_end.read(&mut more))
            .await
            .expect("frps's end hears of it");
        assert_eq!(
            reset.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), service_end.read_to_end(&mut rest))
            .await
            .expect("the service sees its connection close")
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_request_the_service_stops_taking_is_let_go_once_frps_closes() {
        let (remote, local, frps_end, service_end) = joined_pairs().await;
        let forwarding = forwarding(remote, local);
        // An upload the service (hung, its connection open) never reads:
        // frps sends until every buffer on the way is full.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sending = tokio::spawn(async move {
            let mut frps_end = frps_end;
            let chunk = vec![b'x'; 64 * 1024];
            frps_end
                .write_all(b"POST / HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            tokio::select! {
                _ = stopped => {}
                _ = async { while frps_end.write_all(&chunk).await.is_ok() {} } => {}
            }
            frps_end
        });
        // Well past a few looks: frps is still there, so frpc waits.
        tokio::time::sleep(common::GONE_CHECK * 2 + Duration::from_secs(1)).await;
        assert!(
            !forwarding.is_finished(),
            "a hung service is waited for while frps waits"
        );
        // frps gives up on the request and its end goes, with the upload's
        // bytes still queued: reset (a close would hold its FIN behind the
        // queued bytes until frps's kernel gives the socket up).
        stop.send(()).unwrap();
        let frps_end = sending.await.unwrap();
        common::stream::reset_on_close(&frps_end).unwrap();
        drop(frps_end);
        let ended = tokio::time::timeout(common::GONE_CHECK * 2, forwarding)
            .await
            .expect("let go within a look or two")
            .unwrap();
        let err = ended.unwrap_err();
        assert!(common::SenderGone::is(&err), "{err}");
        // The service's connection is closed too.
        let mut service_end = service_end;
        let mut rest = [0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match service_end.read(&mut rest).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the service sees its connection close");
    }

    #[tokio::test]
    async fn a_stream_reset_while_the_service_is_being_connected_is_let_go_at_once() {
        // A local service whose accept queue is full: connects hang.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = socket.listen(1).unwrap();
        let port = full.local_addr().unwrap().port();
        let mut queued = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_millis(300),
                TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            {
                queued.push(c);
            }
        }
        let mut config = Config::parse_from(["frpc"]);
        config.local_addr = "127.0.0.1".into();
        config.local_port = port;
        config.connect_timeout = Duration::from_secs(30);
        let (near, far) = tokio::io::duplex(1 << 16);
        let (opener, drive_a) = Mux::new(near, Role::Opener);
        let (acceptor, drive_b) = Mux::new(far, Role::Acceptor);
        tokio::spawn(drive_a);
        tokio::spawn(drive_b);
        let sent = opener.open().unwrap();
        let stream = acceptor.accept().await.unwrap();
        let serving = tokio::spawn(async move { serve_stream(&config, stream).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!serving.is_finished(), "still connecting");
        // frps gives up on it (its caller left).
        drop(sent);
        tokio::time::timeout(Duration::from_secs(2), serving)
            .await
            .expect("let go well before the 30 s connect timeout")
            .unwrap();
        assert_eq!(acceptor.streams(), 0, "nothing held on the connection");
        drop(queued);
    }

    #[tokio::test]
    async fn a_data_connection_frps_drops_unread_is_reported_as_failed() {
        // frps's proxy port over its connection cap: accepts and closes.
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = proxy.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = proxy.accept().await {
                drop(s);
            }
        });
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_port = service.local_addr().unwrap().port();
        let mut config = Config::parse_from(["frpc"]);
        config.server_addr = "127.0.0.1".into();
        config.proxy_port = proxy_port;
        config.local_addr = "127.0.0.1".into();
        config.local_port = local_port;
        let dialer = Dialer::from_config(&config).unwrap();
        let session = Arc::new(Session {
            client_id: "gpu".into(),
            session_key: "k".into(),
            mux: false,
            proxy_addr: config.proxy_addr(),
        });
        let (tx, mut rx) = mpsc::channel(4);
        let conn_id = Uuid::new_v4();
        tokio::time::timeout(
            Duration::from_secs(10),
            open(Arc::new(config), dialer, session, conn_id, tx),
        )
        .await
        .expect("ends at once");
        match rx.try_recv() {
            Ok(Command::OpenFailed {
                conn_id: id,
                reason,
            }) => {
                assert_eq!(id, conn_id);
                assert!(reason.contains("before using it"), "{reason}");
            }
            other => panic!("expected OpenFailed, got {other:?}"),
        }
    }
}
