//! Upstream HTTP/1.1 connections to a client's local service, through its
//! tunnel: reuse an idle one, else ask the client to dial back.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use common::Command;
use http_body_util::{Either, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::listeners::public::CountedBody;
use crate::pending::PairError;
use crate::registry::ClientHandle;
use crate::state::{State, Stats};

/// Body of a request sent upstream: buffered (routing read it) or streamed.
pub type UpBody = Either<Full<Bytes>, CountedBody>;

/// Sender half of one upstream connection.
pub type Sender = SendRequest<UpBody>;

/// One upstream connection: where its requests go, and what closes it.
///
/// Dropping the sender alone does not close a connection whose task still
/// has a request body queued that the service stopped taking (hyper looks
/// at the sender only once its write queue is empty): such a connection,
/// and the body's bytes, would stay for good on a tunnel stream. So
/// dropping a `Conn` closes its connection; only [`Conn::keep_open`] lets
/// go of it without (for an upload still going out on it, whose own watch
/// closes it).
#[derive(Debug)]
pub struct Conn {
    /// Where its requests go.
    pub sender: Sender,
    /// Ends the connection's task, whatever it is doing; cancelled when
    /// the `Conn` is dropped.
    pub cut: CancellationToken,
    /// Set by [`Conn::keep_open`].
    kept_open: bool,
}

impl Conn {
    /// The connection `sender` sends on, which `cut` ends.
    pub fn new(sender: Sender, cut: CancellationToken) -> Self {
        Self {
            sender,
            cut,
            kept_open: false,
        }
    }

    /// Lets go of the connection without closing it.
    pub fn keep_open(mut self) {
        self.kept_open = true;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.kept_open {
            self.cut.cancel();
        }
    }
}

/// Why no upstream connection could be had from a client.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Pairing failed (timeout, client-side failure, cancelled).
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The client's control connection is gone.
    #[error("client disconnected")]
    ClientGone,
    /// The HTTP handshake over the tunnel failed.
    #[error("tunnel handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
    /// The request reached the client's service, which failed (closed,
    /// reset) before a response head.
    #[error("{0}")]
    Service(String),
    /// The client's service sent no response head in this time.
    #[error("no response headers within {0:?}")]
    HeadTimeout(std::time::Duration),
    /// The request's tunnel stream was reset for its connection's receive
    /// budget (frpc's local service, or frps's callers, reading slowly on
    /// other streams): the client is busy, not failing.
    #[error("{0}")]
    Busy(String),
}

impl AcquireError {
    /// What the caller is told of this failure: frps's own words. A reason
    /// a client sent (why it could not open a connection, why it reset or
    /// refused a stream) stays in frps's log: it may name the box's
    /// addresses, and a box must not write to the fleet's callers (a
    /// provider's text in a consumer's error, "use this other endpoint").
    pub fn for_caller(&self) -> std::borrow::Cow<'static, str> {
        match self {
            AcquireError::Pair(PairError::Failed(_)) => {
                "the client could not open a connection to its service".into()
            }
            AcquireError::Pair(PairError::Refused(_)) => {
                "a server plugin refused the data connection".into()
            }
            AcquireError::Busy(_) => "the client is busy".into(),
            other => other.to_string().into(),
        }
    }

    /// Whether the failure was the client not dialing back in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, AcquireError::Pair(PairError::Timeout(_)))
    }
}

/// Idle upstream connections of one client, most recently used last.
///
/// The pool holds as many connections as recent load needed (every
/// connection in it was in use at once at some point), up to
/// `--max-idle-per-client`; [`IdlePool::expire`] closes those unused for
/// `--pool-idle-timeout`, so it shrinks back after a burst.
#[derive(Default)]
pub struct IdlePool {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    list: Vec<Idle>,
    /// Set when the client is gone: nothing is taken back any more.
    closed: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool")
            .field("len", &self.len())
            .finish()
    }
}

impl IdlePool {
    /// Takes the most recently used connection that is still open. It may
    /// still be finishing its previous exchange: await `ready()` before use.
    pub fn take(&self) -> Option<Conn> {
        let mut entries = self.entries.lock().expect("idle lock");
        while let Some(idle) = entries.list.pop() {
            if !idle.conn.sender.is_closed() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Returns a connection for reuse, unless `max` open ones are already
    /// idle or the pool is closed (then it is closed).
    pub fn put(&self, conn: Conn, max: usize) {
        let mut entries = self.entries.lock().expect("idle lock");
        if entries.closed {
            return;
        }
        let list = &mut entries.list;
        if list.len() >= max {
            list.retain(|e| !e.conn.sender.is_closed());
        }
        if list.len() < max {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle since before `cutoff`, and those the
    /// other side closed; returns how many went.
    pub fn expire(&self, cutoff: Instant) -> usize {
        let list = &mut self.entries.lock().expect("idle lock").list;
        let before = list.len();
        list.retain(|e| e.since >= cutoff && !e.conn.sender.is_closed());
        before - list.len()
    }

    /// Closes all but the `keep` most recently used idle connections (and
    /// those the other side closed); returns how many went.
    pub fn shrink(&self, keep: usize) -> usize {
        let list = &mut self.entries.lock().expect("idle lock").list;
        let before = list.len();
        list.retain(|e| !e.conn.sender.is_closed());
        let surplus = list.len().saturating_sub(keep);
        list.drain(..surplus);
        before - list.len()
    }

    /// Number of idle connections still open (those the other side closed
    /// wait for the next sweep or `put` to be dropped, and are not counted).
    pub fn len(&self) -> usize {
        let entries = self.entries.lock().expect("idle lock");
        entries
            .list
            .iter()
            .filter(|e| !e.conn.sender.is_closed())
            .count()
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every idle connection and refuses any put back later (the
    /// client is gone, or frps is stopping).
    pub fn close(&self) {
        let mut entries = self.entries.lock().expect("idle lock");
        entries.closed = true;
        entries.list.clear();
    }
}

/// Four times per `--pool-idle-timeout` (but at most every 100 ms and at
/// least every 15 s), closes the idle upstream connections of every client
/// that went unused for `--pool-idle-timeout`.
pub async fn expire_idle(state: std::sync::Arc<State>) {
    let timeout = state.config.pool_idle_timeout;
    let period = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
    crate::periodic::every(period, &state.shutdown, || async {
        let Some(cutoff) = Instant::now().checked_sub(timeout) else {
            return;
        };
        for client in state.registry.all() {
            let closed = client.idle.expire(cutoff);
            if closed > 0 {
                debug!(client = %client.id, closed, "closed idle upstream connections");
            }
        }
    })
    .await;
}

/// Most an upstream connection's read buffer grows to, and most of a
/// request body its write buffer queues (hyper's default is about 400 KiB).
/// A large download grows the read buffer, and it stays that size while the
/// connection waits in the pool: frps after the benchmark's download held
/// 0.6 MiB more that way, and at 128 KiB the download is as fast
/// (bench/README.md). Also the largest response head frps accepts from a
/// service (hyper also refuses one of over 100 headers).
pub const UPSTREAM_READ_BUFFER: usize = 128 * 1024;

/// An upstream connection and whether it came from the idle pool.
pub struct Upstream {
    /// The connection (closed when dropped).
    pub conn: Conn,
    /// True when reused (a failure to send on it says nothing about the client).
    pub reused: bool,
}

/// Longest [`acquire`] waits, over all the idle connections it tries, for
/// one to be ready before opening a new one.
const POOLED_READY_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Which connections [`acquire`] may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// An idle pooled one first, else a tunnel stream, else a dial-back.
    Any,
    /// Not a pooled one, which the service may close as idle just as a
    /// request goes out on it (the keep-alive race): a new tunnel stream,
    /// else a dial-back. For a request that cannot be sent twice (a
    /// streamed body) and for the one retry after such a race.
    NotPooled,
}

/// Gets a connection to `client`'s local service as `reuse` allows: an
/// idle one if ready, else a new stream or dial-back, waiting at most
/// `--connect-timeout`.
pub async fn acquire(
    state: &State,
    client: &ClientHandle,
    reuse: Reuse,
) -> Result<Upstream, AcquireError> {
    // An idle connection is ready at once, or nearly (its task finishing
    // the last exchange); one still writing a request body its service
    // stopped reading is not, and is dropped rather than waited on, all of
    // them within POOLED_READY_WAIT in total.
    let timeout = state.config.connect_timeout;
    let pooled_by = tokio::time::Instant::now() + POOLED_READY_WAIT.min(timeout);
    while reuse == Reuse::Any
        && let Some(mut conn) = client.idle.take()
    {
        // Not ready in time (still writing a body its service no longer
        // takes), or the request gave up meanwhile (its caller left): the
        // `Conn` dropped closes it.
        if let Ok(Ok(())) = tokio::time::timeout_at(pooled_by, conn.sender.ready()).await {
            return Ok(Upstream { conn, reused: true });
        }
    }
    if let Some(tunnel) = client.tunnel()
        && let Ok(stream) = tunnel.open()
    {
        // A stream on the tunnel connection: no round trip before the
        // request goes out. frpc connects the local service when the
        // stream's first frame arrives; if it cannot, it resets the stream
        // with the reason and the request fails over as when a dial-back
        // cannot be opened.
        Stats::inc(&state.stats.upstream_streams);
        return handshake(state, client, stream).await;
    }
    let mut waiter = state
        .pending
        .register(client, state.config.max_pending_per_client)?;
    let conn_id = waiter.conn_id;
    Stats::inc(&state.stats.upstream_dial_backs);
    let dial = async {
        client
            .control_tx
            .send(Command::OpenConnection { conn_id })
            .await
            .map_err(|_| AcquireError::ClientGone)?;
        Ok::<_, AcquireError>(waiter.wait(timeout).await?)
    };
    let stream = tokio::select! {
        res = tokio::time::timeout(timeout, dial) => match res {
            Ok(Ok(stream)) => stream,
            // The box dialed back, and the server plugins have not decided
            // on its connection yet: theirs, not the box's.
            Err(_) | Ok(Err(AcquireError::Pair(PairError::Timeout(_)))) => {
                // The plugins are blamed when they had a fair share of the
                // wait (one plugin timeout, at most half the wait).
                let share = state.config.plugin_timeout.min(timeout / 2);
                return Err(state.pending.timed_out(conn_id, timeout, share).into());
            }
            Ok(Err(e)) => return Err(e),
        },
        _ = client.kick.cancelled() => return Err(AcquireError::ClientGone),
    };
    handshake(state, client, stream).await
}

/// An HTTP/1.1 connection to `client`'s local service over `io` (a
/// dial-back or a stream of the tunnel connection), driven by its own task
/// until it closes or frps stops.
async fn handshake<T>(state: &State, client: &ClientHandle, io: T) -> Result<Upstream, AcquireError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake::<_, UpBody>(TokioIo::new(io))
        .await?;
    // Cut at frps's hard stop, by the request's upload watch, or when
    // frps lets go of the connection (the `Conn` dropped).
    let cut = state.hard_stop.child_token();
    drive(conn, cut.clone(), client.id.clone());
    let mut conn = Conn::new(sender, cut);
    conn.sender.ready().await?;
    Ok(Upstream {
        conn,
        reused: false,
    })
}

/// Runs an upstream connection's task until it ends or `cut` is cancelled.
fn drive<T>(
    conn: http1::Connection<TokioIo<T>, UpBody>,
    cut: CancellationToken,
    client_id: String,
) -> tokio::task::JoinHandle<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            res = conn => if let Err(e) = res {
                debug!(client = %client_id, "upstream connection ended: {e}");
            },
            _ = cut.cancelled() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn a_clients_own_reason_is_not_told_to_the_caller() {
        let from_box = "dial 10.0.0.5:11434: refused; use https://elsewhere.example";
        for e in [
            AcquireError::Pair(PairError::Failed(from_box.into())),
            AcquireError::Pair(PairError::Refused(from_box.into())),
            AcquireError::Busy(from_box.into()),
        ] {
            assert!(e.to_string().contains(from_box), "logged: {e}");
            let told = e.for_caller();
            assert!(
                !told.contains("10.0.0.5") && !told.contains("elsewhere"),
                "{told}"
            );
        }
        // frps's own words pass as they are.
        let e = AcquireError::HeadTimeout(Duration::from_secs(300));
        assert_eq!(e.for_caller(), e.to_string());
        let e = AcquireError::Pair(PairError::Timeout(Duration::from_secs(10)));
        assert_eq!(e.for_caller(), "client did not dial back within 10s");
    }

    /// A connection over an in-memory pipe, with the pipe's far end (drop
    /// it to close the connection).
    async fn sender() -> (Conn, tokio::io::DuplexStream) {
        let (conn, far, _task) = driven().await;
        (conn, far)
    }

    /// [`sender`] with the connection's task.
    async fn driven() -> (Conn, tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (near, far) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake::<_, UpBody>(TokioIo::new(near))
            .await
            .unwrap();
        let cut = CancellationToken::new();
        let task = drive(conn, cut.clone(), "gpu".into());
        (Conn::new(sender, cut), far, task)
    }

    /// A connection whose service stopped taking a request body: dropping
    /// its sender leaves its task writing for good; every way the pool lets
    /// go of a connection closes it.
    #[tokio::test(start_paused = true)]
    async fn connections_the_pool_lets_go_of_are_closed_not_dropped() {
        let stuck = || async {
            let (mut conn, far, task) = driven().await;
            let body = Full::new(Bytes::from(vec![b'x'; 1 << 20]));
            let req = hyper::Request::post("/v1/chat/completions")
                .header("host", "box")
                .body(Either::Left(body))
                .unwrap();
            // Sent; the far end reads none of it.
            let _answer = conn.sender.send_request(req);
            tokio::task::yield_now().await;
            (conn, far, task)
        };
        let ended = |task: tokio::task::JoinHandle<()>| async move {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_ok()
        };
        // Its sender merely dropped, it stays (what the pool must not do).
        let (conn, _far, task) = stuck().await;
        conn.keep_open();
        assert!(!ended(task).await, "hyper noticed a dropped sender");
        // Refused by a full pool.
        let pool = IdlePool::default();
        let (conn, _far, task) = stuck().await;
        pool.put(conn, 0);
        assert!(ended(task).await);
        // Expired, shrunk, and when the client is gone.
        for way in 0..3 {
            let (conn, _far, task) = stuck().await;
            pool.put(conn, 8);
            match way {
                0 => assert_eq!(pool.expire(Instant::now() + Duration::from_secs(1)), 1),
                1 => assert_eq!(pool.shrink(0), 1),
                _ => pool.close(),
            }
            assert!(ended(task).await, "way {way}");
        }
        // Put back after the client left.
        let (conn, _far, task) = stuck().await;
        pool.put(conn, 8);
        assert!(ended(task).await);
    }

    /// A pool that was offered `n` connections with room for `max`, and
    /// the far ends of all of them.
    async fn offered(n: usize, max: usize) -> (IdlePool, Vec<tokio::io::DuplexStream>) {
        let pool = IdlePool::default();
        let mut ends = Vec::new();
        for _ in 0..n {
            let (s, far) = sender().await;
            ends.push(far);
            pool.put(s, max);
        }
        (pool, ends)
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_max() {
        let (pool, _ends) = offered(3, 2).await;
        assert_eq!(pool.len(), 2);
        assert!(pool.take().is_some());
        assert!(pool.take().is_some());
        assert!(pool.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expire_closes_connections_unused_for_the_timeout() {
        let pool = IdlePool::default();
        let (old, _old_end) = sender().await;
        pool.put(old, 8);
        tokio::time::advance(Duration::from_secs(30)).await;
        let (recent, _recent_end) = sender().await;
        pool.put(recent, 8);
        tokio::time::advance(Duration::from_secs(30)).await;
        // Idle 60 s and 30 s; a 45 s timeout closes the first only.
        let cutoff = Instant::now() - Duration::from_secs(45);
        assert_eq!(pool.expire(cutoff), 1);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.expire(cutoff), 0);
    }

    #[tokio::test]
    async fn connections_closed_by_the_client_are_never_handed_out() {
        let pool = IdlePool::default();
        let (s, far) = sender().await;
        pool.put(s, 8);
        drop(far);
        let since = Instant::now();
        // The connection task notices the end of the pipe on its own; from
        // then on it is not counted, though still in the list until the sweep.
        while !pool.is_empty() {
            assert!(since.elapsed() < Duration::from_secs(5), "never closed");
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.entries.lock().unwrap().list.len(), 1);
        assert_eq!(pool.expire(since - Duration::from_secs(1)), 1);
        assert!(pool.take().is_none());
    }

    #[tokio::test]
    async fn shrink_keeps_the_most_recently_used() {
        let (pool, mut ends) = offered(5, 8).await;
        assert_eq!(pool.shrink(2), 3);
        assert_eq!(pool.len(), 2);
        // The three put first are closed: their far ends read the end.
        for far in &mut ends[..3] {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), far.read(&mut byte));
            assert_eq!(read.await.expect("closed").unwrap(), 0);
        }
        assert_eq!(pool.shrink(2), 0, "nothing more to close");
        assert_eq!(pool.shrink(0), 2);
        assert!(pool.take().is_none());
    }

    #[tokio::test]
    async fn a_closed_pool_takes_nothing_back() {
        let pool = IdlePool::default();
        let (before, _before_end) = sender().await;
        pool.put(before, 8);
        pool.close();
        assert!(pool.is_empty());
        // A response that ends after the client left returns its connection
        // to a pool nobody will sweep: it is closed instead.
        let (after, _after_end) = sender().await;
        pool.put(after, 8);
        assert!(pool.is_empty());
    }
}
