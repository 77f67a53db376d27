//! Many byte streams over one connection between frps and frpc.
//!
//! Without it every upstream HTTP connection frps keeps to a client's
//! service is a TCP connection of its own through the tunnel, and each
//! request and each response crosses it in a system call of its own on
//! both sides. Over a [`Mux`] the streams' bytes go out in frames that one
//! writer task gathers: whatever every stream wrote while the writer waited
//! for its turn leaves in one write, and the other side reads it in one
//! read. Under load (many requests at once) that is several requests per
//! system call on the link, where each system call on loopback also wakes
//! the other process.
//!
//! Frames: a 9-byte header, kind (1 byte), stream id (4 bytes, big endian),
//! length (4 bytes, big endian), then `length` bytes of payload for
//! [`Kind::Data`] and [`Kind::Reset`] (its reason) only:
//!
//! - `Open`: the opener (frps) starts stream `id`; only the accepting side
//!   (frpc) may receive it.
//! - `Data`: bytes of stream `id`, at most [`MAX_PAYLOAD`] per frame and
//!   never more than the receiver's window allows.
//! - `Fin`: the sender writes no more on stream `id` (a half-close).
//! - `Reset`: stream `id` is aborted; the payload (at most [`MAX_REASON`]
//!   bytes of UTF-8) says why. The receiver still reads what arrived
//!   before it, then the error.
//! - `Credit`: the sender consumed `length` more bytes of stream `id`: the
//!   peer may send that much more. Each stream starts with [`WINDOW`] bytes
//!   of credit each way, so a slow reader holds at most that much of a
//!   stream in memory, and one stream never blocks the others. All streams
//!   of a connection together hold at most [`RECEIVE_BUDGET`] received and
//!   unread bytes: past it, the stream holding the most is reset (its
//!   reader is the slowest), so slow readers cannot pin a window on each of
//!   [`MAX_STREAMS`] streams.
//!
//! Anything else (an unknown kind, a frame over its limit, data beyond the
//! window, an `Open` for a stream in use or towards the opener) is a
//! protocol error: the connection ends and every stream on it fails.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

/// Size of a frame header.
pub const HEADER: usize = 9;
/// Largest payload of a `Data` frame: under glibc's mmap threshold (frps
/// and frpc set it to 128 KiB), so the copies the reader makes come from
/// the heap and not from a fresh mapping each (page faults on every frame
/// of a download).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest payload of a `Reset` frame (its reason).
pub const MAX_REASON: usize = 1024;
/// Bytes of a stream each side may send before the other grants more: the
/// most of one stream a slow reader holds in memory. Chosen with benchmark
/// case c (one 1 GiB download through one stream).
pub const WINDOW: u32 = 2 * 1024 * 1024;
/// Consumed bytes of a stream after which credit goes back to the sender.
const CREDIT_AT: u32 = WINDOW / 4;
/// Received and unread bytes all streams of one connection may hold
/// together (16 full windows); past it the stream holding the most is
/// reset. Without it, a peer (a registered frpc) and callers that read
/// slowly could make frps hold [`WINDOW`] on each of [`MAX_STREAMS`]
/// streams: 2 GiB.
pub const RECEIVE_BUDGET: usize = 16 * WINDOW as usize;
/// How the reason of a stream reset for its connection's
/// [`RECEIVE_BUDGET`] begins ([`StreamReset::is_shed`]): the side that
/// read it is busy (its readers slow), not failing.
pub const SHED: &str = "receive budget: ";
/// Frames queued for the writer after which streams wait to write more
/// (control frames are always queued: they are small and few).
const OUT_MAX: usize = 512 * 1024;
/// Frames queued for the writer past which the connection fails: only the
/// frames the peer's own make this side queue (a `Reset` for each `Open`
/// refused, `Credit`s) grow the queue past [`OUT_MAX`] without waiting,
/// and a peer that keeps sending them while it reads nothing would grow
/// it without end. An honest peer's share stays far below (its open
/// streams are bounded, and so are the answers to them).
const OUT_LIMIT: usize = OUT_MAX + 4 * 1024 * 1024;
/// A writer buffer larger than this is freed once nothing more is queued,
/// so an idle connection holds little (while frames keep coming it is
/// kept: a download would map and unmap it on every write).
const SPARE_KEEP: usize = 64 * 1024;
/// What a read asks the connection for at least.
const READ_CHUNK: usize = 64 * 1024;
/// Streams one opener keeps open at once: [`Mux::open`] fails beyond (frps
/// then falls back to a dial-back).
pub const MAX_STREAMS: usize = 1024;
/// Streams an acceptor holds for its peer, accepted or not, past which the
/// opener is in breach: it keeps to [`MAX_STREAMS`], and streams it has
/// finished with may linger here a while (their handles still dropping),
/// hence the margin. Each stream can hold a receive window and, on frpc, a
/// connection to the local service: a peer may not open them without end.
const MAX_PEER_STREAMS: usize = 4 * MAX_STREAMS;
/// Received bytes are packed into chunks of at least this much before
/// they queue for the reader, so a peer sending tiny frames costs no more
/// memory per byte than one sending large ones.
const CHUNK: usize = 16 * 1024;
/// A write to the connection that takes no byte for this long fails it:
/// the peer stopped reading (its reader never waits on its streams, so a
/// live peer always does).
pub const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A new stream (opener → acceptor).
    Open = 1,
    /// Bytes of a stream.
    Data = 2,
    /// The sender's half of a stream ends.
    Fin = 3,
    /// The stream is aborted; the payload says why.
    Reset = 4,
    /// The sender consumed `length` more bytes of the stream.
    Credit = 5,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Fin,
            4 => Kind::Reset,
            5 => Kind::Credit,
            _ => return None,
        })
    }
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams (frps).
    Opener,
    /// Accepts the streams the other end opens (frpc).
    Acceptor,
}

/// One end of a multiplexed connection; clones share it. Streams come from
/// [`Mux::open`] or [`Mux::accept`]; the future [`Mux::new`] returns moves
/// the bytes and must be polled (spawned) for anything to happen.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("Mux")
            .field("role", &self.shared.role)
            .field("streams", &inner.streams.len())
            .field("dead", &inner.dead)
            .finish()
    }
}

struct Shared {
    role: Role,
    inner: Mutex<Inner>,
    /// Tells the driver to stop ([`Mux::close`]).
    stop: Notify,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<u32, StreamState>,
    /// Frames waiting for the writer.
    out: BytesMut,
    /// The writer, when it waits for frames.
    writer: Option<Waker>,
    /// Streams waiting for room in `out` (each once: see
    /// `StreamState::wants_room`).
    out_waiters: Vec<u32>,
    /// Waits for the last stream to go ([`Mux::drained`]).
    drain_waker: Option<Waker>,
    /// Opened by the peer, not yet accepted.
    accept_queue: VecDeque<u32>,
    acceptor: Option<Waker>,
    next_id: u32,
    /// Why the connection ended, once it has.
    dead: Option<Arc<str>>,
    /// Received bytes the streams hold, unread (the sum of their `held`).
    buffered: usize,
    /// Most of them allowed ([`RECEIVE_BUDGET`]).
    budget: usize,
}

struct StreamState {
    /// Received and not yet read: full chunks, then `tail`.
    recv: VecDeque<Bytes>,
    /// The last received bytes, still being packed (see [`CHUNK`]).
    tail: BytesMut,
    /// Bytes in `recv` and `tail`.
    held: usize,
    /// The peer sent `Fin`.
    recv_fin: bool,
    /// Bytes the peer may still send before it needs more credit.
    recv_window: u32,
    /// Bytes read since credit last went back.
    consumed: u32,
    read_waker: Option<Waker>,
    /// Bytes this side may still send.
    credit: u32,
    write_waker: Option<Waker>,
    /// This side sent `Fin`.
    sent_fin: bool,
    /// Queued in `out_waiters`.
    wants_room: bool,
    /// The stream was reset (by the peer, or locally): why.
    reset: Option<Arc<str>>,
    /// That reset was this side's (a shed, or [`MuxStream::reset`]).
    reset_here: bool,
    /// Received bytes were thrown away unread (a shed, or a reset here):
    /// an end that arrived is not the end of what the reader got.
    thrown: bool,
    /// Which reset came first (what a log line about the stream's end
    /// should blame; [`StreamWatch::gone_by`]).
    first_reset: Option<GoneBy>,
}

impl StreamState {
    fn new() -> Self {
        StreamState {
            recv: VecDeque::new(),
            tail: BytesMut::new(),
            held: 0,
            recv_fin: false,
            recv_window: WINDOW,
            consumed: 0,
            read_waker: None,
            credit: WINDOW,
            write_waker: None,
            sent_fin: false,
            wants_room: false,
            reset: None,
            reset_here: false,
            thrown: false,
            first_reset: None,
        }
    }

    /// Queues received bytes for the reader, packed into chunks.
    fn receive(&mut self, payload: &[u8]) {
        if !self.tail.is_empty() && self.tail.len() + payload.len() > CHUNK {
            self.recv.push_back(std::mem::take(&mut self.tail).freeze());
        }
        self.tail.extend_from_slice(payload);
        self.held += payload.len();
    }

    /// Drops what was received and not read; returns how much that was.
    fn discard(&mut self) -> usize {
        self.recv.clear();
        self.tail = BytesMut::new();
        let held = std::mem::take(&mut self.held);
        self.thrown |= held > 0;
        held
    }

    fn wake_all(&mut self) {
        wake(&mut self.read_waker);
        wake(&mut self.write_waker);
    }
}

impl Inner {
    /// Resets the stream holding the most received bytes while the streams
    /// hold more than the budget allows. One the peer already reset loses
    /// its unread bytes (nothing to tell the peer) and reads as shed too.
    fn shed(&mut self) {
        while self.buffered > self.budget {
            let Some((&id, _)) = self
                .streams
                .iter()
                .filter(|(_, st)| st.held > 0)
                .max_by_key(|(_, st)| st.held)
            else {
                return;
            };
            let budget = self.budget;
            let st = self.streams.get_mut(&id).expect("just found");
            let reason = format!(
                "{SHED}the tunnel connection held {} KiB received and unread, over its {} KiB: \
                 this stream's reader was the slowest ({} KiB unread)",
                self.buffered / 1024,
                budget / 1024,
                st.held / 1024
            );
            // Reset by the peer too, but what it sent is lost here: the
            // reader hears of the shed (the peer answered), not of a peer
            // that never did, which an opener could take for a reason to
            // send its request again.
            let told = st.reset.is_some();
            st.reset = Some(Arc::from(reason.as_str()));
            st.reset_here = true;
            st.first_reset.get_or_insert(GoneBy::ShedHere);
            self.buffered -= st.discard();
            st.wake_all();
            if !told {
                self.push(Kind::Reset, id, reason.len() as u32, reason.as_bytes());
            }
        }
    }

    /// Queues a frame header (and `payload`) and wakes the writer.
    fn push(&mut self, kind: Kind, id: u32, len: u32, payload: &[u8]) {
        self.out.reserve(HEADER + payload.len());
        self.out.put_u8(kind as u8);
        self.out.put_u32(id);
        self.out.put_u32(len);
        self.out.put_slice(payload);
        wake(&mut self.writer);
    }
}

/// Wakes the task waiting in `slot`, if one is.
fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics under this lock; should something, the state is
        // still consistent enough to fail streams and tear down.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection ended for `reason` and wakes everyone waiting.
    fn fail(&self, reason: &str) {
        let mut inner = self.lock();
        if inner.dead.is_some() {
            return;
        }
        inner.dead = Some(Arc::from(reason));
        for st in inner.streams.values_mut() {
            st.wake_all();
        }
        inner.out_waiters.clear();
        wake(&mut inner.drain_waker);
        wake(&mut inner.acceptor);
        wake(&mut inner.writer);
        inner.out = BytesMut::new();
    }

    /// Applies one received frame.
    fn deliver(&self, kind: Kind, id: u32, len: u32, payload: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        match kind {
            Kind::Open => {
                if self.role == Role::Opener {
                    return Err(protocol_error("the peer opened a stream"));
                }
                if inner.streams.contains_key(&id) {
                    return Err(protocol_error(format!("stream {id} opened twice")));
                }
                if inner.streams.len() >= MAX_PEER_STREAMS {
                    return Err(protocol_error(format!(
                        "more than {MAX_PEER_STREAMS} streams opened on the tunnel connection"
                    )));
                }
                inner.streams.insert(id, StreamState::new());
                inner.accept_queue.push_back(id);
                wake(&mut inner.acceptor);
            }
            Kind::Data => {
                // A stream this side dropped: its bytes have nowhere to go.
                let Some(st) = inner.streams.get_mut(&id) else {
                    return Ok(());
                };
                if st.recv_fin {
                    return Err(protocol_error(format!("data on stream {id} after its end")));
                }
                if len > st.recv_window {
                    return Err(protocol_error(format!(
                        "stream {id} sent {len} bytes with {} of window left",
                        st.recv_window
                    )));
                }
                st.recv_window -= len;
                // Bytes of a stream reset here are dropped: an end after
                // them is not the end of what the reader got.
                st.thrown |= st.reset.is_some() && !payload.is_empty();
                if st.reset.is_none() && !payload.is_empty() {
                    st.receive(payload);
                    wake(&mut st.read_waker);
                    inner.buffered += payload.len();
                    if inner.buffered > inner.budget {
                        inner.shed();
                    }
                }
            }
            Kind::Fin => {
                if let Some(st) = inner.streams.get_mut(&id) {
                    st.recv_fin = true;
                    wake(&mut st.read_waker);
                }
            }
            Kind::Reset => {
                if let Some(st) = inner.streams.get_mut(&id) {
                    // The peer's text, logged and passed on to callers:
                    // no control characters (forged log lines).
                    let reason = crate::text::tame(&String::from_utf8_lossy(payload), MAX_REASON);
                    let reason = if reason.trim().is_empty() {
                        "the stream was reset by the other side".into()
                    } else {
                        reason
                    };
                    // What arrived before the reset is still read first
                    // (a response cut short shows as cut, not as missing).
                    st.reset.get_or_insert_with(|| Arc::from(reason.as_ref()));
                    st.first_reset.get_or_insert(GoneBy::Peer);
                    st.wake_all();
                }
            }
            Kind::Credit => {
                if let Some(st) = inner.streams.get_mut(&id) {
                    st.credit = st
                        .credit
                        .checked_add(len)
                        .filter(|c| *c <= 2 * WINDOW)
                        .ok_or_else(|| {
                            protocol_error(format!("stream {id} was granted more than its window"))
                        })?;
                    wake(&mut st.write_waker);
                }
            }
        }
        if inner.out.len() > OUT_LIMIT {
            return Err(protocol_error(format!(
                "the other side reads nothing of the {} KiB of frames its own made this side queue",
                inner.out.len() / 1024
            )));
        }
        Ok(())
    }
}

impl Mux {
    /// One end over `io`, and the future that drives it: it reads and
    /// writes frames until the connection ends (EOF, an error, a protocol
    /// error or [`Mux::close`]), then fails every stream still open.
    pub fn new<T>(io: T, role: Role) -> (Mux, impl Future<Output = io::Result<()>> + Send)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::with_budget(io, role, RECEIVE_BUDGET)
    }

    /// [`Mux::new`], its streams holding at most `budget` received and
    /// unread bytes together.
    pub fn with_budget<T>(
        io: T,
        role: Role,
        budget: usize,
    ) -> (Mux, impl Future<Output = io::Result<()>> + Send)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let shared = Arc::new(Shared {
            role,
            inner: Mutex::new(Inner {
                next_id: 1,
                budget,
                ..Inner::default()
            }),
            stop: Notify::new(),
        });
        let driver = {
            let shared = shared.clone();
            async move {
                let (reader, writer) = tokio::io::split(io);
                let result = tokio::select! {
                    r = read_loop(reader, &shared) => r,
                    w = write_loop(writer, &shared) => w,
                    _ = shared.stop.notified() => Ok(()),
                };
                let reason = match &result {
                    Ok(()) => "the tunnel connection closed".to_owned(),
                    Err(e) => format!("the tunnel connection failed: {e}"),
                };
                shared.fail(&reason);
                result
            }
        };
        (Mux { shared }, driver)
    }

    /// Starts a new stream (the opener's side only). Fails once the
    /// connection has ended.
    pub fn open(&self) -> io::Result<MuxStream> {
        assert_eq!(self.shared.role, Role::Opener, "only the opener opens");
        let mut inner = self.shared.lock();
        if let Some(reason) = &inner.dead {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                reason.to_string(),
            ));
        }
        if inner.streams.len() >= MAX_STREAMS {
            return Err(io::Error::other(format!(
                "{MAX_STREAMS} streams already open on the tunnel connection"
            )));
        }
        let mut id = inner.next_id;
        while id == 0 || inner.streams.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        inner.next_id = id.wrapping_add(1);
        inner.streams.insert(id, StreamState::new());
        inner.push(Kind::Open, id, 0, &[]);
        Ok(MuxStream {
            id,
            shared: self.shared.clone(),
        })
    }

    /// The next stream the other end opened (the acceptor's side only), or
    /// `None` once the connection has ended.
    pub async fn accept(&self) -> Option<MuxStream> {
        assert_eq!(
            self.shared.role,
            Role::Acceptor,
            "only the acceptor accepts"
        );
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(id) = inner.accept_queue.pop_front() {
                return Poll::Ready(Some(MuxStream {
                    id,
                    shared: self.shared.clone(),
                }));
            }
            if inner.dead.is_some() {
                return Poll::Ready(None);
            }
            inner.acceptor = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Resolves once no stream is open on this end (at once if none is),
    /// or the connection has ended.
    pub async fn drained(&self) {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.streams.is_empty() || inner.dead.is_some() {
                return Poll::Ready(());
            }
            inner.drain_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().dead.is_some()
    }

    /// Streams open on this end.
    pub fn streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Ends the connection: the driver stops and every stream fails.
    pub fn close(&self) {
        self.shared.stop.notify_one();
        self.shared.fail("the tunnel connection was closed");
    }

    /// Whether `self` and `other` are the same connection.
    pub fn same(&self, other: &Mux) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Reads frames and hands them to their streams until EOF or an error.
async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, shared: &Shared) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        // Every complete frame in the buffer.
        let mut needed = HEADER;
        while buf.len() >= HEADER {
            let kind = Kind::from_byte(buf[0])
                .ok_or_else(|| protocol_error(format!("unknown frame kind {}", buf[0])))?;
            let id = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(buf[5..9].try_into().expect("4 bytes"));
            let payload_len = match kind {
                Kind::Data if len as usize > MAX_PAYLOAD => {
                    return Err(protocol_error(format!("data frame of {len} bytes")));
                }
                Kind::Reset if len as usize > MAX_REASON => {
                    return Err(protocol_error(format!("reset reason of {len} bytes")));
                }
                Kind::Data | Kind::Reset => len as usize,
                Kind::Open | Kind::Fin | Kind::Credit => 0,
            };
            if buf.len() < HEADER + payload_len {
                needed = HEADER + payload_len;
                break;
            }
            buf.advance(HEADER);
            // Copied out (into the stream's chunks): the read buffer is
            // reused for every read.
            shared.deliver(kind, id, len, &buf[..payload_len])?;
            buf.advance(payload_len);
        }
        if buf.is_empty() && buf.capacity() > 2 * READ_CHUNK {
            // Between bursts: give a grown buffer back.
            buf = BytesMut::new();
        }
        buf.reserve(needed.saturating_sub(buf.len()).max(READ_CHUNK));
        if reader.read_buf(&mut buf).await? == 0 {
            return if buf.is_empty() {
                Ok(())
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Writes the queued frames, gathering whatever the streams queue while it
/// waits for its turn into one write.
async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, shared: &Shared) -> io::Result<()> {
    let mut batch = BytesMut::new();
    loop {
        let ready = poll_fn(|cx| {
            let mut inner = shared.lock();
            if inner.dead.is_some() {
                return Poll::Ready(false);
            }
            if !inner.out.is_empty() {
                return Poll::Ready(true);
            }
            inner.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !ready {
            return Ok(());
        }
        // Let the other tasks that are ready to run (more streams with
        // bytes to send) queue theirs first: one write for all of them.
        tokio::task::yield_now().await;
        {
            let mut inner = shared.lock();
            if inner.dead.is_some() {
                return Ok(());
            }
            std::mem::swap(&mut inner.out, &mut batch);
            // Room again: the streams fill the other buffer meanwhile.
            let Inner {
                out_waiters,
                streams,
                ..
            } = &mut *inner;
            for id in out_waiters.drain(..) {
                if let Some(st) = streams.get_mut(&id) {
                    st.wants_room = false;
                    wake(&mut st.write_waker);
                }
            }
        }
        // Each write (and the flush) has WRITE_STALL to take a byte: a slow
        // link taking a large batch bit by bit is not a stalled peer.
        let stalled = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the other side took no bytes for {WRITE_STALL:?}"),
            )
        };
        let mut sent = 0;
        while sent < batch.len() {
            let n = tokio::time::timeout(WRITE_STALL, writer.write(&batch[sent..]))
                .await
                .map_err(|_| stalled())??;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        tokio::time::timeout(WRITE_STALL, writer.flush())
            .await
            .map_err(|_| stalled())??;
        batch.clear();
        // Idle once more (nothing queued meanwhile): neither buffer keeps
        // what a burst grew it to. The one the streams fill was the batch
        // before, grown as much: it is let go too, or an idle connection
        // held up to a megabyte until its next frame.
        let mut inner = shared.lock();
        if inner.out.is_empty() {
            if batch.capacity() > SPARE_KEEP {
                batch = BytesMut::new();
            }
            if inner.out.capacity() > SPARE_KEEP {
                inner.out = BytesMut::new();
            }
        }
    }
}

/// One stream of a [`Mux`]: bytes in order both ways, half-close with
/// `shutdown`. Dropping it before both halves ended resets it.
pub struct MuxStream {
    id: u32,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.id).finish()
    }
}

impl MuxStream {
    /// The stream's id on its connection.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle that tells, without reading the stream, whether the other
    /// side is gone from it ([`StreamWatch::gone`]).
    pub fn watch(&self) -> StreamWatch {
        StreamWatch {
            id: self.id,
            shared: self.shared.clone(),
        }
    }

    /// Aborts the stream, telling the other side `reason` (cut to
    /// [`MAX_REASON`] bytes).
    pub fn reset(&self, reason: &str) {
        let mut inner = self.shared.lock();
        let Inner { streams, dead, .. } = &mut *inner;
        if dead.is_some() {
            return;
        }
        let Some(st) = streams.get_mut(&self.id) else {
            return;
        };
        if st.reset.is_some() {
            return;
        }
        st.reset = Some(Arc::from("the stream was reset"));
        st.reset_here = true;
        st.first_reset = Some(GoneBy::ResetHere);
        let dropped = st.discard();
        st.wake_all();
        inner.buffered -= dropped;
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason.as_bytes()[..end];
        inner.push(Kind::Reset, self.id, reason.len() as u32, reason);
    }
}

/// Looks at one stream from outside ([`MuxStream::watch`]).
#[derive(Clone)]
pub struct StreamWatch {
    id: u32,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StreamWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWatch").field("id", &self.id).finish()
    }
}

impl StreamWatch {
    /// Whether the stream can carry nothing more from the other side: it
    /// was reset (by either side) or dropped, or the connection ended. A
    /// stream the other side only half-closed is not gone.
    pub fn gone(&self) -> bool {
        let inner = self.shared.lock();
        inner.dead.is_some()
            || inner
                .streams
                .get(&self.id)
                .is_none_or(|st| st.reset.is_some())
    }

    /// Why the stream is [gone](Self::gone), for a log line about its end
    /// (`None` while it is not).
    pub fn gone_by(&self) -> Option<GoneBy> {
        let inner = self.shared.lock();
        if inner.dead.is_some() {
            return Some(GoneBy::ConnectionLost);
        }
        match inner.streams.get(&self.id) {
            None => Some(GoneBy::Dropped),
            Some(st) => st.first_reset,
        }
    }
}

/// Who ended a stream ([`StreamWatch::gone_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneBy {
    /// The multiplexed connection ended.
    ConnectionLost,
    /// Its handle on this side was dropped.
    Dropped,
    /// This side shed it for its receive budget (it held the most unread),
    /// before the peer reset it.
    ShedHere,
    /// This side reset it ([`MuxStream::reset`]).
    ResetHere,
    /// The peer reset it.
    Peer,
}

fn lost(reason: &Arc<str>) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, reason.to_string())
}

/// The error of a stream that was reset (`ConnectionReset` kind): the other
/// side's reason, for callers that tell it apart from a lost connection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct StreamReset {
    /// Why, as the side that reset it said.
    pub reason: Arc<str>,
    /// The reset was this side's own (a shed of bytes it received and
    /// nobody read, or the stream's own reset), not the peer's: whatever
    /// the peer sent on it was dropped here.
    pub here: bool,
}

impl StreamReset {
    /// Whether the stream was reset for its connection's
    /// [`RECEIVE_BUDGET`] (by either side): the readers behind that
    /// connection were slow, which says nothing of the stream itself.
    pub fn is_shed(&self) -> bool {
        self.reason.starts_with(SHED)
    }

    /// Whether the stream was reset as its opener's peer too busy for it:
    /// shed ([`StreamReset::is_shed`]), or refused for frpc's cap on its
    /// data connections ([`crate::protocol::OPEN_BUSY`]).
    pub fn is_busy(&self) -> bool {
        self.is_shed() || crate::protocol::busy_refusal(&self.reason).is_some()
    }

    /// The reset behind `error`, if it is one (searching its sources).
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a StreamReset> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(reset) = e.downcast_ref::<StreamReset>() {
                return Some(reset);
            }
            if let Some(reset) = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<StreamReset>())
            {
                return Some(reset);
            }
            next = e.source();
        }
        None
    }
}

fn was_reset(reason: &Arc<str>, here: bool) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        StreamReset {
            reason: reason.clone(),
            here,
        },
    )
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut inner = self.shared.lock();
        let Inner {
            streams,
            dead,
            buffered,
            ..
        } = &mut *inner;
        let st = streams
            .get_mut(&self.id)
            .expect("a live stream has its state");
        let mut copied = 0;
        while buf.remaining() > 0 {
            let Some(front) = st.recv.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            copied += n;
            if front.is_empty() {
                st.recv.pop_front();
            }
        }
        if buf.remaining() > 0 && !st.tail.is_empty() {
            let n = st.tail.len().min(buf.remaining());
            buf.put_slice(&st.tail[..n]);
            st.tail.advance(n);
            copied += n;
            if st.tail.is_empty() {
                // Its memory goes as soon as it is read.
                st.tail = BytesMut::new();
            }
        }
        if copied > 0 {
            st.held -= copied;
            *buffered -= copied;
            st.consumed += copied as u32;
            if st.consumed >= CREDIT_AT && !st.recv_fin && dead.is_none() {
                let grant = std::mem::take(&mut st.consumed);
                st.recv_window += grant;
                inner.push(Kind::Credit, self.id, grant, &[]);
            }
            return Poll::Ready(Ok(()));
        }
        // An end that arrived before a reset still reads as the end,
        // unless bytes before it were thrown away here (the reader would
        // take a cut stream for a whole one).
        if st.recv_fin && !st.thrown {
            return Poll::Ready(Ok(()));
        }
        if let Some(reason) = &st.reset {
            return Poll::Ready(Err(was_reset(reason, st.reset_here)));
        }
        if let Some(reason) = dead {
            return Poll::Ready(Err(lost(reason)));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = self.shared.lock();
        let Inner {
            streams,
            dead,
            out,
            out_waiters,
            ..
        } = &mut *inner;
        if let Some(reason) = dead {
            return Poll::Ready(Err(lost(reason)));
        }
        let st = streams
            .get_mut(&self.id)
            .expect("a live stream has its state");
        if let Some(reason) = &st.reset {
            return Poll::Ready(Err(was_reset(reason, st.reset_here)));
        }
        if st.sent_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if st.credit == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if out.len() >= OUT_MAX {
            st.write_waker = Some(cx.waker().clone());
            if !st.wants_room {
                st.wants_room = true;
                out_waiters.push(self.id);
            }
            return Poll::Pending;
        }
        let n = buf.len().min(st.credit as usize).min(MAX_PAYLOAD);
        st.credit -= n as u32;
        inner.push(Kind::Data, self.id, n as u32, &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames leave as soon as the writer gets its turn.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.shared.lock();
        let Inner { streams, dead, .. } = &mut *inner;
        if let Some(reason) = dead {
            return Poll::Ready(Err(lost(reason)));
        }
        let st = streams
            .get_mut(&self.id)
            .expect("a live stream has its state");
        // A reset stream is over both ways: nothing left to end.
        if st.reset.is_some() {
            return Poll::Ready(Ok(()));
        }
        if !st.sent_fin {
            st.sent_fin = true;
            inner.push(Kind::Fin, self.id, 0, &[]);
        }
        Poll::Ready(Ok(()))
    }
}

/// Streams a tunnel connection keeps room for whatever its past: a burst of
/// a thousand streams left its table (about 150 bytes a slot) that large
/// for the connection's life, on each of a thousand clients.
const STREAMS_KEPT_ROOM: usize = 64;

impl Inner {
    /// Gives back the stream table's room once it is mostly empty: at most
    /// a quarter used, above [`STREAMS_KEPT_ROOM`] slots. Shrunk to twice
    /// what it holds, so streams coming and going around one size do not
    /// grow and shrink it in turn.
    fn shrink_streams(&mut self) {
        let (len, room) = (self.streams.len(), self.streams.capacity());
        if room > STREAMS_KEPT_ROOM && len * 4 <= room {
            self.streams.shrink_to((len * 2).max(STREAMS_KEPT_ROOM));
            self.accept_queue.shrink_to(STREAMS_KEPT_ROOM);
        }
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let Some(st) = inner.streams.remove(&self.id) else {
            return;
        };
        inner.buffered -= st.held;
        if inner.streams.is_empty() {
            wake(&mut inner.drain_waker);
        }
        inner.shrink_streams();
        // Both halves ended, or the peer already knows: nothing to say.
        if (st.sent_fin && st.recv_fin) || st.reset.is_some() || inner.dead.is_some() {
            return;
        }
        inner.push(Kind::Reset, self.id, 0, &[]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Both ends over an in-memory pipe, their drivers spawned.
    fn pair() -> (Mux, Mux) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (opener, drive_a) = Mux::new(a, Role::Opener);
        let (acceptor, drive_b) = Mux::new(b, Role::Acceptor);
        tokio::spawn(drive_a);
        tokio::spawn(drive_b);
        (opener, acceptor)
    }

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: timed out"))
    }

    /// A burst of streams leaves neither side's stream table that large
    /// once they are gone.
    #[tokio::test]
    async fn a_burst_of_streams_leaves_no_large_table() {
        let (opener, acceptor) = pair();
        let mut near = Vec::new();
        let mut far = Vec::new();
        for _ in 0..1000 {
            near.push(opener.open().unwrap());
            far.push(within("accept", acceptor.accept()).await.unwrap());
        }
        let room = |mux: &Mux| mux.shared.lock().streams.capacity();
        assert!(room(&opener) >= 1000 && room(&acceptor) >= 1000);
        // All but two close.
        near.truncate(2);
        far.truncate(2);
        assert!(room(&opener) <= 2 * STREAMS_KEPT_ROOM, "{}", room(&opener));
        assert!(
            room(&acceptor) <= 2 * STREAMS_KEPT_ROOM,
            "{}",
            room(&acceptor)
        );
        // The two left still carry bytes.
        near[1].write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        within("read", far[1].read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"still");
    }

    /// After a burst through a slow link (the writer's two buffers grown
    /// by frames queued faster than they left), an idle connection holds
    /// neither grown buffer.
    #[tokio::test]
    async fn an_idle_connection_keeps_no_buffer_a_burst_grew() {
        let (a, b) = tokio::io::duplex(4096);
        let (opener, drive_a) = Mux::new(a, Role::Opener);
        let (acceptor, drive_b) = Mux::new(b, Role::Acceptor);
        tokio::spawn(drive_a);
        tokio::spawn(drive_b);
        let mut near = opener.open().unwrap();
        let mut far = within("accept", acceptor.accept()).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4 << 20];
            far.read_exact(&mut got).await.unwrap();
            far
        });
        within("write", near.write_all(&vec![7u8; 4 << 20]))
            .await
            .unwrap();
        let _far = within("read", reader).await.unwrap();
        // Let the writer finish its last batch.
        within("idle", async {
            loop {
                if opener.shared.lock().out.is_empty() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let held = opener.shared.lock().out.capacity();
        assert!(
            held <= SPARE_KEEP,
            "the queue holds {held} bytes while idle"
        );
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_with_half_close() {
        let (opener, acceptor) = pair();
        let mut near = opener.open().unwrap();
        let mut far = within("accept", acceptor.accept()).await.unwrap();
        near.write_all(b"request").await.unwrap();
        near.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("read", far.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"request");
        // The other half still flows after the first one ended.
        far.write_all(b"response").await.unwrap();
        far.shutdown().await.unwrap();
        let mut back = Vec::new();
        within("read back", near.read_to_end(&mut back))
            .await
            .unwrap();
        assert_eq!(back, b"response");
        drop((near, far));
        assert_eq!(opener.streams(), 0);
        assert_eq!(acceptor.streams(), 0);
    }

    #[tokio::test]
    async fn many_streams_keep_their_bytes_apart() {
        let (opener, acceptor) = pair();
        let echo = tokio::spawn(async move {
            while let Some(mut s) = acceptor.accept().await {
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    s.read_to_end(&mut all).await.unwrap();
                    s.write_all(&all).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut tasks = Vec::new();
        for i in 0..40u32 {
            let mut s = opener.open().unwrap();
            tasks.push(tokio::spawn(async move {
                // Some over the window both ways, so credit has to come back.
                let len = if i % 8 == 0 { WINDOW as usize * 2 } else { 0 } + 1000 * i as usize;
                let data: Vec<u8> = (0..len).map(|n| (n as u32 * 31 + i) as u8).collect();
                let (mut r, mut w) = tokio::io::split(s);
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&sent).await.unwrap();
                    w.shutdown().await.unwrap();
                    w
                });
                let mut back = Vec::new();
                r.read_to_end(&mut back).await.unwrap();
                s = r.unsplit(writer.await.unwrap());
                drop(s);
                assert_eq!(back, data, "stream {i}");
            }));
        }
        for t in tasks {
            within("echo", t).await.unwrap();
        }
        opener.close();
        within("acceptor ends", echo).await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_holds_one_window_and_blocks_no_other() {
        let (opener, acceptor) = pair();
        let mut stuck = opener.open().unwrap();
        let mut live = opener.open().unwrap();
        let _stuck_far = within("accept", acceptor.accept()).await.unwrap();
        let mut live_far = within("accept", acceptor.accept()).await.unwrap();
        let big = vec![7u8; WINDOW as usize + 1];
        // The window's worth goes out; the byte after it waits for credit.
        let blocked = tokio::time::timeout(Duration::from_millis(300), stuck.write_all(&big)).await;
        assert!(blocked.is_err(), "wrote past the window");
        live.write_all(b"still moving").await.unwrap();
        live.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("read", live_far.read_to_end(&mut got))
            .await
            .unwrap();
        assert_eq!(got, b"still moving");
    }

    /// A pair whose acceptor's streams may hold `budget` unread bytes
    /// together, and `n` streams opened and accepted on it: the acceptor,
    /// then the streams' near (opener) and far (acceptor) ends.
    async fn budgeted(budget: usize, n: usize) -> (Mux, Vec<MuxStream>, Vec<MuxStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (opener, drive_a) = Mux::new(a, Role::Opener);
        let (acceptor, drive_b) = Mux::with_budget(b, Role::Acceptor, budget);
        tokio::spawn(drive_a);
        tokio::spawn(drive_b);
        let mut near = Vec::new();
        let mut far = Vec::new();
        for _ in 0..n {
            near.push(opener.open().unwrap());
            far.push(within("accept", acceptor.accept()).await.unwrap());
        }
        (acceptor, near, far)
    }

    /// Reads from each of `streams` its `(fill, len)`: `len` bytes, each
    /// `fill`.
    async fn read_fills(streams: &mut [MuxStream], fills: [(u8, usize); 2]) {
        for (stream, (fill, len)) in streams.iter_mut().zip(fills) {
            let mut got = vec![0u8; len];
            within("read", stream.read_exact(&mut got)).await.unwrap();
            assert!(got.iter().all(|b| *b == fill));
        }
    }

    #[tokio::test]
    async fn past_the_receive_budget_the_slowest_reader_loses_its_stream() {
        // The acceptor's streams may hold two windows between them.
        let (acceptor, mut near, mut far) = budgeted(2 * WINDOW as usize, 3).await;
        let window = WINDOW as usize;
        // Nobody reads on the acceptor's side: a window on the first, half
        // a window on the second; a window less a little on the third takes
        // the total past the budget.
        near[0].write_all(&vec![1u8; window]).await.unwrap();
        near[1].write_all(&vec![2u8; window / 2]).await.unwrap();
        let buffered = || acceptor.shared.lock().buffered;
        within("held", async {
            while buffered() < window + window / 2 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let watches: Vec<_> = far.iter().map(MuxStream::watch).collect();
        near[2].write_all(&vec![3u8; window - 1000]).await.unwrap();
        // The first holds the most: it is reset, on both sides, with why.
        let mut byte = [0u8; 1];
        let err = within("read", far[0].read(&mut byte)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("reader was the slowest"), "{err}");
        let shed = |err: &io::Error| StreamReset::find(err).is_some_and(StreamReset::is_shed);
        let here = |err: &io::Error| StreamReset::find(err).is_some_and(|r| r.here);
        assert!(shed(&err), "told apart from other resets: {err}");
        assert!(here(&err), "the side that dropped the bytes knows it did");
        assert!(watches[0].gone());
        assert_eq!(watches[0].gone_by(), Some(GoneBy::ShedHere));
        assert!(!watches[1].gone());
        assert_eq!(watches[1].gone_by(), None);
        let near_watch = near[0].watch();
        let err = within("read", near[0].read(&mut byte)).await.unwrap_err();
        assert!(near_watch.gone());
        assert_eq!(near_watch.gone_by(), Some(GoneBy::Peer));
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("over its 4096 KiB"), "{err}");
        assert!(shed(&err), "{err}");
        assert!(!here(&err), "the peer's");
        within("the third's bytes arrived", async {
            while buffered() < window / 2 + window - 1000 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(buffered() <= 2 * window);
        // The others keep every byte, and reading them frees the budget.
        read_fills(&mut far[1..], [(2, window / 2), (3, window - 1000)]).await;
        assert_eq!(buffered(), 0);
        // Dropping a stream with unread bytes gives them back too.
        near[1].write_all(b"unread").await.unwrap();
        within("arrived", async {
            while buffered() < 6 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        drop(far.remove(1));
        assert_eq!(buffered(), 0);
    }

    #[tokio::test]
    async fn a_stream_the_peer_reset_reads_as_shed_once_its_bytes_are_dropped() {
        let (acceptor, mut near, mut far) = budgeted(2 * WINDOW as usize, 3).await;
        let window = WINDOW as usize;
        let buffered = || acceptor.shared.lock().buffered;
        // The first's answer arrives, then its peer gives up on it (the
        // service died mid-answer); nobody has read a byte yet.
        near[0].write_all(&vec![1u8; window]).await.unwrap();
        within("held", async {
            while buffered() < window {
                tokio::task::yield_now().await;
            }
        })
        .await;
        near[0].reset("the service closed the connection");
        within("reset", async {
            while acceptor.shared.lock().streams[&far[0].id].reset.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        // Its bytes went for the budget: the reader hears of the shed here,
        // not of a peer that never answered.
        let watch = far[0].watch();
        assert_eq!(watch.gone_by(), Some(GoneBy::Peer));
        overflow_shedding_the_first(&mut near, &mut far).await;
        assert_eq!(buffered(), 0);
        // A log line still blames the peer, which reset it first.
        assert_eq!(watch.gone_by(), Some(GoneBy::Peer));
        // Reset here, and a connection lost.
        far[1].reset("given up");
        assert_eq!(far[1].watch().gone_by(), Some(GoneBy::ResetHere));
        acceptor.close();
        assert_eq!(far[2].watch().gone_by(), Some(GoneBy::ConnectionLost));
    }

    /// With the first stream holding a window unread, the other two's
    /// writes take the connection over its budget of two windows: the
    /// first is shed (its reader hears so, from here), the others' bytes
    /// are all read.
    async fn overflow_shedding_the_first(near: &mut [MuxStream], far: &mut [MuxStream]) {
        let window = WINDOW as usize;
        near[1].write_all(&vec![2u8; window / 2]).await.unwrap();
        near[2].write_all(&vec![3u8; window - 1000]).await.unwrap();
        let mut got = Vec::new();
        let err = within("read", far[0].read_to_end(&mut got))
            .await
            .unwrap_err();
        assert!(got.is_empty());
        let reset = StreamReset::find(&err).expect("a reset");
        assert!(reset.is_shed() && reset.here, "{err}");
        read_fills(&mut far[1..], [(2, window / 2), (3, window - 1000)]).await;
    }

    #[tokio::test]
    async fn a_stream_shed_after_its_end_arrived_reads_as_cut_not_ended() {
        let (acceptor, mut near, mut far) = budgeted(2 * WINDOW as usize, 3).await;
        let window = WINDOW as usize;
        let buffered = || acceptor.shared.lock().buffered;
        // The first's whole answer and its end arrive; nobody reads them.
        near[0].write_all(&vec![1u8; window]).await.unwrap();
        near[0].shutdown().await.unwrap();
        within("held", async {
            while buffered() < window || !acceptor.shared.lock().streams[&far[0].id].recv_fin {
                tokio::task::yield_now().await;
            }
        })
        .await;
        // Shed, its bytes thrown away: the reader hears so, not a clean end.
        overflow_shedding_the_first(&mut near, &mut far).await;
        // A reset here that throws nothing away leaves an end an end.
        near[1].write_all(b"whole").await.unwrap();
        near[1].shutdown().await.unwrap();
        let mut whole = [0u8; 5];
        within("read", far[1].read_exact(&mut whole)).await.unwrap();
        within("end", async {
            while !acceptor.shared.lock().streams[&far[1].id].recv_fin {
                tokio::task::yield_now().await;
            }
        })
        .await;
        far[1].reset("done with it");
        let mut rest = Vec::new();
        within("read", far[1].read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        // One with bytes unread does not.
        near[2].write_all(b"unread").await.unwrap();
        near[2].shutdown().await.unwrap();
        within("end", async {
            while !acceptor.shared.lock().streams[&far[2].id].recv_fin {
                tokio::task::yield_now().await;
            }
        })
        .await;
        far[2].reset("done with it");
        let err = within("read", far[2].read_to_end(&mut rest))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(buffered(), 0);
    }

    #[tokio::test]
    async fn unread_bytes_of_a_stream_the_peer_reset_are_shed_first() {
        let (acceptor, mut near, mut far) = budgeted(2 * WINDOW as usize, 3).await;
        let window = WINDOW as usize;
        let buffered = || acceptor.shared.lock().buffered;
        // A window on the first, which its opener then drops (a reset):
        // its bytes stay readable, and count.
        near[0].write_all(&vec![1u8; window]).await.unwrap();
        within("held", async {
            while buffered() < window {
                tokio::task::yield_now().await;
            }
        })
        .await;
        drop(near.remove(0));
        within("reset seen", async {
            while !far[0].watch().gone() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        near[0].write_all(&vec![2u8; window / 2]).await.unwrap();
        near[1].write_all(&vec![3u8; window - 1000]).await.unwrap();
        // Over the budget: the reset stream's bytes go, the live ones stay.
        within("the others' bytes arrived", async {
            while buffered() != window / 2 + window - 1000 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let mut byte = [0u8; 1];
        let err = within("read", far[0].read(&mut byte)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        read_fills(&mut far[1..], [(2, window / 2), (3, window - 1000)]).await;
        assert_eq!(buffered(), 0);
    }

    #[tokio::test]
    async fn dropping_a_stream_resets_it_and_a_reason_travels() {
        let (opener, acceptor) = pair();
        let near = opener.open().unwrap();
        let mut far = within("accept", acceptor.accept()).await.unwrap();
        drop(near);
        let mut byte = [0u8; 1];
        let err = within("read", far.read(&mut byte)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

        let mut near = opener.open().unwrap();
        let far = within("accept", acceptor.accept()).await.unwrap();
        far.reset("local service 127.0.0.1:1 unreachable");
        let err = within("read", near.read(&mut byte)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(err.to_string(), "local service 127.0.0.1:1 unreachable");
        let reset = StreamReset::find(&err).expect("a reset");
        assert_eq!(&*reset.reason, "local service 127.0.0.1:1 unreachable");
        assert!(!reset.is_shed(), "a failure, not a slow reader");
        assert!(!reset.here, "the peer's");
        let err = near.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_watch_sees_a_reset_or_a_lost_connection_but_not_a_half_close() {
        let (opener, acceptor) = pair();
        let mut near = opener.open().unwrap();
        let far = within("accept", acceptor.accept()).await.unwrap();
        let watch = far.watch();
        assert!(!watch.gone());
        near.shutdown().await.unwrap();
        let mut end = Vec::new();
        let mut reader = far;
        within("read", reader.read_to_end(&mut end)).await.unwrap();
        assert!(!watch.gone(), "half-closed only");
        drop(near);
        within("the reset arrives", async {
            while !watch.gone() {
                tokio::task::yield_now().await;
            }
        })
        .await;

        let _near = opener.open().unwrap();
        let far = within("accept", acceptor.accept()).await.unwrap();
        let watch = far.watch();
        opener.close();
        within("the connection's end arrives", async {
            while !watch.gone() {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn the_end_of_the_connection_fails_every_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (opener, drive) = Mux::new(a, Role::Opener);
        let driver = tokio::spawn(drive);
        let mut s = opener.open().unwrap();
        drop(b);
        within("driver", driver).await.unwrap().unwrap();
        let mut byte = [0u8; 1];
        let err = s.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(opener.is_closed());
        assert_eq!(
            opener.open().unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );

        let (_opener, acceptor) = pair();
        acceptor.close();
        assert!(within("accept", acceptor.accept()).await.is_none());
    }

    /// Feeds `bytes` to an end as if the peer sent them; returns the
    /// driver's result.
    async fn peer_sends(role: Role, bytes: Vec<u8>) -> io::Result<()> {
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let (_mux, drive) = Mux::new(a, role);
        let driver = tokio::spawn(drive);
        b.write_all(&bytes).await.unwrap();
        drop(b);
        within("driver", driver).await.unwrap()
    }

    fn frame(kind: u8, id: u32, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn a_peer_breaking_the_protocol_ends_the_connection() {
        let cases = [
            (Role::Acceptor, frame(9, 1, 0, &[]), "unknown frame kind"),
            (
                Role::Opener,
                frame(1, 1, 0, &[]),
                "the peer opened a stream",
            ),
            (
                Role::Acceptor,
                frame(2, 1, MAX_PAYLOAD as u32 + 1, &[]),
                "data frame of",
            ),
            (Role::Acceptor, frame(4, 1, 5000, &[]), "reset reason of"),
            (
                Role::Acceptor,
                [frame(1, 1, 0, &[]), frame(1, 1, 0, &[])].concat(),
                "opened twice",
            ),
            (
                Role::Acceptor,
                [frame(1, 1, 0, &[]), frame(5, 1, WINDOW * 2, &[])].concat(),
                "more than its window",
            ),
        ];
        for (role, bytes, expected) in cases {
            let err = peer_sends(role, bytes).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains(expected), "{err} / {expected}");
        }
        // Data beyond the window, in frames within the size limit.
        let chunk = vec![0u8; MAX_PAYLOAD];
        let mut bytes = frame(1, 1, 0, &[]);
        for _ in 0..(WINDOW as usize / MAX_PAYLOAD) {
            bytes.extend(frame(2, 1, MAX_PAYLOAD as u32, &chunk));
        }
        bytes.extend(frame(2, 1, 1, &[0]));
        let err = peer_sends(Role::Acceptor, bytes).await.unwrap_err();
        assert!(err.to_string().contains("window left"), "{err}");
        // A frame cut short by the end of the connection.
        let err = peer_sends(Role::Acceptor, frame(2, 1, 10, b"abc"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Accepted or not, the streams a peer opens are bounded.
    #[tokio::test]
    async fn an_opener_past_the_stream_limit_ends_the_connection() {
        for accepting in [false, true] {
            let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
            let (mux, drive) = Mux::new(a, Role::Acceptor);
            let driver = tokio::spawn(drive);
            let holder = tokio::spawn(async move {
                let mut held = Vec::new();
                while accepting && let Some(stream) = mux.accept().await {
                    held.push(stream);
                }
                (mux, held)
            });
            let mut bytes = Vec::new();
            for id in 1..=MAX_PEER_STREAMS as u32 {
                bytes.extend(frame(1, id, 0, &[]));
            }
            b.write_all(&bytes).await.unwrap();
            // All held (accepted or queued): the next one is a breach.
            b.write_all(&frame(1, 0xffff, 0, &[])).await.unwrap();
            let err = within("driver", driver).await.unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("streams opened"), "{err}");
            let (_mux, held) = within("holder", holder).await.unwrap();
            if accepting {
                assert_eq!(held.len(), MAX_PEER_STREAMS);
            }
        }
    }

    /// A peer that opens streams only to have them refused, reading none
    /// of the resets, cannot grow this side's queue without end.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_of_what_it_causes_ends_the_connection() {
        // Little room on the way back, and the far end never reads it.
        let (a, b): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        let (_far_reader, mut far) = tokio::io::split(b);
        let (mux, drive) = Mux::new(a, Role::Acceptor);
        let driver = tokio::spawn(drive);
        let shared = mux.shared.clone();
        let refused = Arc::new(AtomicUsize::new(0));
        let counted = refused.clone();
        // As frpc refuses a stream past its cap: a reset with a reason.
        tokio::spawn(async move {
            while let Some(stream) = mux.accept().await {
                stream.reset(&"busy: over --max-data-connections ".repeat(3));
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Opens in batches, each once the last was refused (under the
        // limit of streams held at once).
        let flood = tokio::spawn(async move {
            let mut id = 1u32;
            loop {
                let mut bytes = Vec::new();
                for _ in 0..1000 {
                    bytes.extend(frame(1, id, 0, &[]));
                    id += 1;
                }
                if far.write_all(&bytes).await.is_err() {
                    return id;
                }
                let sent = id as usize - 1;
                while shared.lock().dead.is_none() && refused.load(Ordering::SeqCst) < sent {
                    tokio::task::yield_now().await;
                }
            }
        });
        let err = within("driver", driver).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("reads nothing"), "{err}");
        // About one Open in ten of a reset's size past the limit, not all.
        let opened = within("flood", flood).await.unwrap() as usize;
        assert!(opened > OUT_LIMIT / 120, "{opened}");
    }

    #[tokio::test]
    async fn a_reset_reason_from_the_peer_is_tamed() {
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let (mux, drive) = Mux::new(a, Role::Acceptor);
        tokio::spawn(drive);
        let forged = b"refused\n2026-12-04T00:00:00Z  INFO frps: forged line";
        let bytes = [
            frame(1, 3, 0, &[]),
            frame(4, 3, forged.len() as u32, forged),
        ]
        .concat();
        b.write_all(&bytes).await.unwrap();
        let mut s = within("accept", mux.accept()).await.unwrap();
        let mut got = Vec::new();
        let err = within("read", s.read_to_end(&mut got)).await.unwrap_err();
        let reset = StreamReset::find(&err).expect("a reset").reason.to_string();
        assert!(!reset.contains('\n'), "{reset:?}");
        assert!(reset.starts_with("refused 2026-12-04"), "{reset:?}");
    }

    #[tokio::test]
    async fn bytes_dropped_after_a_reset_here_keep_a_later_end_from_reading_as_whole() {
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let (mux, drive) = Mux::new(a, Role::Acceptor);
        tokio::spawn(drive);
        b.write_all(&frame(1, 5, 0, &[])).await.unwrap();
        let mut s = within("accept", mux.accept()).await.unwrap();
        s.reset("not wanted");
        // Sent before the peer saw the reset: dropped here, then its end.
        let bytes = [frame(2, 5, 4, b"lost"), frame(3, 5, 0, &[])].concat();
        b.write_all(&bytes).await.unwrap();
        let shared = mux.shared.clone();
        within("frames read", async {
            while !shared.lock().streams[&5].recv_fin {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let mut got = Vec::new();
        let err = within("read", s.read_to_end(&mut got)).await.unwrap_err();
        assert!(got.is_empty());
        assert!(StreamReset::find(&err).is_some(), "{err}");
    }

    #[tokio::test]
    async fn tiny_frames_are_packed_into_chunks() {
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let (mux, drive) = Mux::new(a, Role::Acceptor);
        tokio::spawn(drive);
        let mut bytes = frame(1, 7, 0, &[]);
        for n in 0..40_000u32 {
            bytes.extend(frame(2, 7, 1, &[n as u8]));
        }
        b.write_all(&bytes).await.unwrap();
        let mut s = within("accept", mux.accept()).await.unwrap();
        let shared = mux.shared.clone();
        let received = || shared.lock().streams[&7].recv_window == WINDOW - 40_000;
        within("frames read", async {
            while !received() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        {
            let inner = shared.lock();
            let st = &inner.streams[&7];
            // 40,000 one-byte frames: two full chunks and the tail, not
            // 40,000 allocations.
            assert_eq!(st.recv.len(), 2);
            assert_eq!(st.tail.len(), 40_000 - 2 * CHUNK);
        }
        let mut got = vec![0u8; 40_000];
        s.read_exact(&mut got).await.unwrap();
        assert!(got.iter().enumerate().all(|(n, b)| *b == n as u8));
        // A read with no room is answered at once.
        let mut empty = [0u8; 0];
        assert_eq!(within("empty read", s.read(&mut empty)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_end_before_a_reset_still_reads_as_the_end() {
        let (a, mut b): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 20);
        let (mux, drive) = Mux::new(a, Role::Acceptor);
        tokio::spawn(drive);
        let bytes = [
            frame(1, 3, 0, &[]),
            frame(2, 3, 5, b"whole"),
            frame(3, 3, 0, &[]),
            frame(4, 3, 4, b"gone"),
        ]
        .concat();
        b.write_all(&bytes).await.unwrap();
        let mut s = within("accept", mux.accept()).await.unwrap();
        let mut got = Vec::new();
        within("read", s.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"whole");
    }

    #[tokio::test]
    async fn the_opener_keeps_to_its_stream_limit_and_drains() {
        let (opener, _acceptor) = pair();
        let mut open: Vec<MuxStream> = (0..MAX_STREAMS).map(|_| opener.open().unwrap()).collect();
        let err = opener.open().unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
        open.pop();
        let last = opener.open().unwrap();
        open.push(last);
        let drained = {
            let opener = opener.clone();
            tokio::spawn(async move { opener.drained().await })
        };
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop(open);
        within("drained", drained).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_connection() {
        // The far end is kept but never read: the pipe fills up.
        let (a, _far) = tokio::io::duplex(1024);
        let (opener, drive) = Mux::new(a, Role::Opener);
        let driver = tokio::spawn(drive);
        let mut s = opener.open().unwrap();
        s.write_all(&[1u8; 8192]).await.unwrap();
        let ended = tokio::time::timeout(WRITE_STALL * 2, driver).await;
        let err = ended.expect("ended").unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(opener.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_link_taking_bytes_now_and_then_is_not_a_stall() {
        // The far end reads 1 KiB every 50 s: each batch takes far longer
        // than WRITE_STALL in all, but no write waits that long for a byte.
        let (a, mut far) = tokio::io::duplex(1024);
        let (opener, drive) = Mux::new(a, Role::Opener);
        let driver = tokio::spawn(drive);
        let mut s = opener.open().unwrap();
        s.write_all(&[1u8; 8192]).await.unwrap();
        let mut got = 0;
        let mut buf = [0u8; 1024];
        // The open frame, then the 8 KiB in frames with their headers.
        while got < 8192 + 9 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            got += far.read(&mut buf).await.unwrap();
        }
        assert!(!driver.is_finished(), "the connection was failed");
        assert!(!opener.is_closed());
    }

    /// Counts the writes that reach the connection.
    struct CountingWrites<T> {
        inner: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountingWrites<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountingWrites<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn what_streams_write_together_leaves_in_one_write() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingWrites {
            inner: a,
            writes: writes.clone(),
        };
        let (opener, drive) = Mux::new(io, Role::Opener);
        tokio::spawn(drive);
        // Twenty streams open and write before the writer gets its turn.
        let mut streams = Vec::new();
        for i in 0..20u8 {
            let mut s = opener.open().unwrap();
            s.write_all(&[i; 100]).await.unwrap();
            streams.push(s);
        }
        let expected = 20 * (HEADER + HEADER + 100);
        let mut got = vec![0u8; expected];
        within("read", b.read_exact(&mut got)).await.unwrap();
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        // Frame by frame: an Open then its Data, for each stream in order.
        let mut at = 0;
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(got[at], Kind::Open as u8);
            assert_eq!(got[at + 1..at + 5], s.id().to_be_bytes());
            at += HEADER;
            assert_eq!(got[at], Kind::Data as u8);
            assert_eq!(got[at + 5..at + 9], 100u32.to_be_bytes());
            assert!(
                got[at + HEADER..at + HEADER + 100]
                    .iter()
                    .all(|b| *b == i as u8)
            );
            at += HEADER + 100;
        }
    }
}
