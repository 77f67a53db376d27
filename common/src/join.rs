//! Joining two byte streams.
//!
//! Each direction copies through a buffer that exists only while bytes are
//! moving: it is allocated when the source becomes readable, grows while
//! reads fill it (a bulk download) and shrinks when they stop, and is freed
//! as soon as the source has nothing more to give. An idle joined connection
//! (a warm tunnel connection waiting for its next request) holds no buffer
//! at all, where a fixed pair of 64 KiB buffers per connection made frpc's
//! memory grow with every connection frps kept warm.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// First buffer of a direction that starts moving: one small request or
/// response fits.
pub const JOIN_BUFFER_MIN: usize = 8 * 1024;

/// Largest buffer a direction grows to while reads keep filling it. Chosen
/// by benchmark case c (one 1 GiB download): 64 KiB gave 6.6-6.8 Gbit/s
/// through frpx, 256 KiB 10.1 Gbit/s on the same machine.
pub const JOIN_BUFFER_MAX: usize = 256 * 1024;

/// Most bytes all joins of a process hold beyond [`JOIN_BUFFER_MIN`] per
/// direction at once: a 64th of what 4,096 joins (frpc's default
/// `--max-data-connections`) would hold with both directions grown to
/// [`JOIN_BUFFER_MAX`] (2 GiB), for instance against a peer that stops
/// reading while the other side keeps sending. A direction grows no further
/// than what is left (copying in at least [`JOIN_BUFFER_MIN`]) until others
/// give theirs back; 128 directions can copy at full size at once.
pub const JOIN_GROWTH_BUDGET: usize = 128 * (JOIN_BUFFER_MAX - JOIN_BUFFER_MIN);

/// Room for buffers to grow past [`JOIN_BUFFER_MIN`], shared by joins.
#[derive(Debug)]
struct Budget {
    left: AtomicUsize,
}

impl Budget {
    const fn new(bytes: usize) -> Budget {
        Budget {
            left: AtomicUsize::new(bytes),
        }
    }

    /// Takes `bytes`, or what is left when that is less; returns how many.
    fn take_up_to(&self, bytes: usize) -> usize {
        match self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left - left.min(bytes))
            }) {
            Ok(left) | Err(left) => left.min(bytes),
        }
    }

    fn give(&self, bytes: usize) {
        self.left.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// The process's [`JOIN_GROWTH_BUDGET`].
static GROWTH: Budget = Budget::new(JOIN_GROWTH_BUDGET);

/// Bytes moved by [`join_streams`] in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JoinStats {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
}

/// Copies bytes both ways between `a` and `b` until both directions are done.
///
/// Half-close is preserved: when one side reaches EOF, the other side's write
/// half is shut down, and the opposite direction keeps flowing until it ends
/// too. One side's EOF never cuts data still in flight the other way.
pub async fn join_streams<A, B>(a: &mut A, b: &mut B) -> io::Result<JoinStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    join(a, b, None).await
}

/// How often a join whose bytes for `b` wait asks whether `a` is still
/// there ([`join_streams_lingering`]).
pub const GONE_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// As [`join_streams`], but once `a` has ended (its EOF passed on to `b`),
/// the way back gets `linger` at most without a byte before the join ends:
/// a peer that closed and a `b` that never answers (a hung service that
/// ignores the half-close) do not hold both connections for ever. And while
/// bytes from `a` wait for `b` to take them, nothing reads `a`, so its end
/// (or reset) would go unseen: every [`GONE_CHECK`] without progress the
/// join asks `a_gone`, and ends (`ConnectionAborted`) once it says `a` is
/// gone. A `b` that is merely slow, its caller still there, is waited for.
pub async fn join_streams_lingering<A, B>(
    a: &mut A,
    b: &mut B,
    linger: std::time::Duration,
    a_gone: impl Fn() -> bool + Sync,
) -> io::Result<JoinStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    join(a, b, Some((linger, &a_gone as &(dyn Fn() -> bool + Sync)))).await
}

/// Why [`join_streams_lingering`] ended when its `a_gone` said so (the
/// `ConnectionAborted` error's inner error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sending side left while its bytes waited to be taken")]
pub struct SenderGone;

impl SenderGone {
    /// Whether `error` is a join ended by [`SenderGone`].
    pub fn is(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|e| e.is::<SenderGone>())
    }
}

/// Why [`join_streams_lingering`] failed when its write to `b` failed but
/// everything `b` sent back reached `a`, whose write half was then shut
/// (the inner error of an error of the write's kind): a service answered
/// early and closed without reading the rest of an upload. `a` still holds
/// that unread rest: closed now, the kernel would reset it and drop the
/// answer's bytes not yet acknowledged; the owner drains it first
/// ([`crate::stream::drain`]).
#[derive(Debug, thiserror::Error)]
#[error("{0} (after the whole answer went back)")]
pub struct AnsweredBack(pub io::Error);

impl AnsweredBack {
    /// Whether `error` is a join ended by [`AnsweredBack`].
    pub fn is(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|e| e.is::<AnsweredBack>())
    }
}

/// A timer and the byte count it was last pushed back at.
type Clock = Option<(Pin<Box<tokio::time::Sleep>>, u64)>;

/// Whether `limit` passed since `moved` last changed, (re)arming `clock`.
fn expired(
    clock: &mut Clock,
    limit: std::time::Duration,
    moved: u64,
    cx: &mut Context<'_>,
) -> bool {
    let (timer, seen) = clock.get_or_insert_with(|| (Box::pin(tokio::time::sleep(limit)), moved));
    if *seen != moved {
        *seen = moved;
        timer.as_mut().reset(tokio::time::Instant::now() + limit);
    }
    timer.as_mut().poll(cx).is_ready()
}

async fn join<A, B>(
    a: &mut A,
    b: &mut B,
    limits: Option<(std::time::Duration, &(dyn Fn() -> bool + Sync))>,
) -> io::Result<JoinStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let linger = limits.map(|(linger, _)| linger);
    let (mut a_to_b, mut b_to_a) = (Copy::default(), Copy::default());
    // Armed once `a` ended; pushed back whenever bytes move the other way.
    let mut lingering: Clock = None;
    // Armed while bytes wait for `b`; pushed back whenever it takes some,
    // or `a` is found still there.
    let mut stalling: Clock = None;
    // How the way there failed, when it did and the way back goes on.
    let mut failed_there: Option<io::Error> = None;
    // Whether the way back ended whole (not cut by the linger).
    let mut back_done = false;
    poll_fn(|cx| {
        let there = match a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
            // With a linger, the way back outlives a failed write to `b`:
            // a service that answers early and closes without reading the
            // rest of an upload (its kernel then resets the connection,
            // and the next write here fails) has its answer already on the
            // way back, which still reaches `a`. A failed read from `a`
            // (frps reset the connection: its caller left) ends the join
            // at once, closing `b`, so the service stops working for
            // nobody.
            Poll::Ready(Err(e)) if linger.is_some() && a_to_b.write_failed => {
                a_to_b.fail();
                failed_there = Some(e);
                Poll::Ready(())
            }
            other => other?,
        };
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        if there.is_ready() && back.is_ready() {
            back_done = true;
            return Poll::Ready(Ok::<(), io::Error>(()));
        }
        // The linger measures `b`'s silence: while bytes it sent wait for
        // `a` to take them (backpressure), the clock stands still.
        if let (Poll::Ready(()), Some(limit)) = (there, linger)
            && !b_to_a.buf.has_remaining()
            && expired(&mut lingering, limit, b_to_a.moved, cx)
        {
            return Poll::Ready(Ok(()));
        }
        match limits {
            Some((_, a_gone)) if there.is_pending() && a_to_b.buf.has_remaining() => {
                while expired(&mut stalling, GONE_CHECK, a_to_b.moved, cx) {
                    if a_gone() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            SenderGone,
                        )));
                    }
                    // Still there: look again after another GONE_CHECK
                    // (polled once more, so the timer holds this waker).
                    if let Some((timer, _)) = &mut stalling {
                        timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + GONE_CHECK);
                    }
                }
            }
            _ => stalling = None,
        }
        Poll::Pending
    })
    .await?;
    if let Some(e) = failed_there {
        if back_done {
            return Err(io::Error::new(e.kind(), AnsweredBack(e)));
        }
        return Err(e);
    }
    Ok(JoinStats {
        a_to_b: a_to_b.moved,
        b_to_a: b_to_a.moved,
    })
}

impl Drop for Copy {
    fn drop(&mut self) {
        self.budget.give(self.charged);
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Copying,
    /// The source ended and everything read was written: shutting the
    /// destination's write half.
    ShuttingDown,
    Done,
}

/// One direction of a join.
#[derive(Debug)]
struct Copy {
    /// Bytes read and not yet written; no capacity while idle.
    buf: BytesMut,
    /// Size of the next allocation: doubles while reads fill the buffer,
    /// halves while they use under a quarter of it.
    size: usize,
    /// Size of the allocation `buf` holds (0 when none).
    allocated: usize,
    /// What the allocation holds beyond [`JOIN_BUFFER_MIN`], taken from
    /// `budget`.
    charged: usize,
    budget: &'static Budget,
    moved: u64,
    phase: Phase,
    /// Everything read was written, but the destination's flush has not
    /// completed yet: owed before the next read. A buffered destination
    /// (TLS) may hold the bytes until it does, and an idle source would
    /// never poll again to push them out.
    flush_owed: bool,
    /// The error that ended this direction came from the destination.
    write_failed: bool,
}

impl Default for Copy {
    fn default() -> Self {
        Copy::paid_by(&GROWTH)
    }
}

impl Copy {
    /// A direction whose growth past [`JOIN_BUFFER_MIN`] `budget` pays for.
    fn paid_by(budget: &'static Budget) -> Self {
        Copy {
            buf: BytesMut::new(),
            size: JOIN_BUFFER_MIN,
            allocated: 0,
            charged: 0,
            budget,
            moved: 0,
            phase: Phase::Copying,
            flush_owed: false,
            write_failed: false,
        }
    }

    /// Passes on the outcome of a write to the destination, noting a
    /// failure as the destination's (not the source's).
    fn writing<T>(&mut self, outcome: io::Result<T>) -> io::Result<T> {
        self.write_failed |= outcome.is_err();
        outcome
    }

    /// Gives up on this direction after an error: what it held is lost.
    fn fail(&mut self) {
        self.release();
        self.phase = Phase::Done;
    }

    /// Frees the buffer (nothing is left in it).
    fn release(&mut self) {
        self.buf = BytesMut::new();
        self.allocated = 0;
        self.budget.give(std::mem::take(&mut self.charged));
    }

    /// The size of the next allocation: `self.size`, or as much of it as
    /// the budget can pay for beyond what this direction holds already (at
    /// least [`JOIN_BUFFER_MIN`]).
    fn affordable(&mut self) -> usize {
        let want = self.size - JOIN_BUFFER_MIN;
        if want < self.charged {
            self.budget.give(self.charged - want);
            self.charged = want;
        } else if want > self.charged {
            self.charged += self.budget.take_up_to(want - self.charged);
        }
        JOIN_BUFFER_MIN + self.charged
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::ShuttingDown => {
                    let shut = ready!(to.as_mut().poll_shutdown(cx));
                    self.writing(shut)?;
                    self.phase = Phase::Done;
                }
                Phase::Copying if self.buf.has_remaining() => {
                    let written = ready!(to.as_mut().poll_write(cx, self.buf.chunk()));
                    let n = self.writing(written)?;
                    if n == 0 {
                        self.write_failed = true;
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.buf.advance(n);
                    self.moved += n as u64;
                    // Written out: a buffered destination (TLS) sends now.
                    self.flush_owed = !self.buf.has_remaining();
                }
                Phase::Copying if self.flush_owed => {
                    let flushed = ready!(to.as_mut().poll_flush(cx));
                    self.writing(flushed)?;
                    self.flush_owed = false;
                }
                Phase::Copying => {
                    // Reuses the emptied allocation when it is the size
                    // wanted (`reserve` moves back to its start), else
                    // makes one of exactly that size (`reserve` on a
                    // smaller one would double it, past the maximum).
                    self.buf.clear();
                    let size = self.affordable();
                    if self.allocated == size {
                        self.buf.reserve(size);
                    } else {
                        self.buf = BytesMut::with_capacity(size);
                        self.allocated = size;
                    }
                    let room = self.buf.capacity();
                    debug_assert!(room <= JOIN_BUFFER_MAX, "buffer of {room} bytes");
                    match tokio_util::io::poll_read_buf(from.as_mut(), cx, &mut self.buf) {
                        Poll::Pending => {
                            // Nothing buffered and nothing to read: hold no
                            // memory until the source speaks again.
                            self.release();
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(0)) => {
                            self.release();
                            self.phase = Phase::ShuttingDown;
                        }
                        Poll::Ready(Ok(n)) if n >= room => {
                            self.size = (self.size * 2).min(JOIN_BUFFER_MAX);
                        }
                        Poll::Ready(Ok(n)) if n < self.size / 4 => {
                            self.size = (self.size / 2).max(JOIN_BUFFER_MIN);
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::Waker;

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf, duplex, sink};

    /// A source that yields the given chunks one read at a time, then is
    /// pending (or at EOF once `end` is set).
    #[derive(Default)]
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        end: bool,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.chunks.pop_front() {
                Some(mut chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    if n < chunk.len() {
                        self.chunks.push_front(chunk.split_off(n));
                    }
                    Poll::Ready(Ok(()))
                }
                None if self.end => Poll::Ready(Ok(())),
                None => Poll::Pending,
            }
        }
    }

    fn poll_once(
        copy: &mut Copy,
        from: &mut Chunks,
        to: &mut tokio::io::Sink,
    ) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(Waker::noop());
        copy.poll(&mut cx, Pin::new(from), Pin::new(to))
    }

    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let (mut copy, mut to) = (Copy::default(), sink());
        let mut from = Chunks::default();
        assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
        assert_eq!(copy.buf.capacity(), 0);

        from.chunks.push_back(b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
        assert_eq!(copy.moved, 18);
        assert_eq!(
            copy.buf.capacity(),
            0,
            "the buffer is freed once the source is drained"
        );
        assert_eq!(copy.size, JOIN_BUFFER_MIN);
    }

    #[test]
    fn reads_that_fill_the_buffer_grow_it_and_small_ones_shrink_it() {
        let (mut copy, mut to) = (Copy::default(), sink());
        let mut from = Chunks::default();
        // Reads of 8, 16, ... up to half the maximum, then three full ones.
        let bulk = (JOIN_BUFFER_MAX - JOIN_BUFFER_MIN) + 3 * JOIN_BUFFER_MAX;
        from.chunks.push_back(vec![7; bulk]);
        assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
        assert_eq!(copy.moved, bulk as u64);
        assert_eq!(
            copy.size, JOIN_BUFFER_MAX,
            "a bulk transfer reads in the largest buffer"
        );

        // Small reads halve it, one step per read, down to the first size.
        let mut expected = JOIN_BUFFER_MAX;
        let mut small_reads = 0;
        while expected > JOIN_BUFFER_MIN {
            expected /= 2;
            from.chunks.push_back(vec![1; 100]);
            assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
            assert_eq!(copy.size, expected);
            small_reads += 1;
        }
        from.chunks.push_back(vec![1; 100]);
        assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
        assert_eq!(copy.size, JOIN_BUFFER_MIN, "never below the first size");
        small_reads += 1;

        from.end = true;
        assert!(poll_once(&mut copy, &mut from, &mut to).is_ready());
        assert_eq!(copy.phase, Phase::Done);
        assert_eq!(copy.moved, bulk as u64 + 100 * small_reads);
    }

    /// A destination that takes nothing (a peer that stopped reading).
    struct Stuck;

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[test]
    fn buffers_grow_only_as_far_as_the_shared_budget_allows() {
        const LEFT_OVER: usize = 100 * 1024;
        let full = JOIN_BUFFER_MAX - JOIN_BUFFER_MIN;
        let budget: &'static Budget = Box::leak(Box::new(Budget::new(full + LEFT_OVER)));
        // A direction that had grown to the largest size, its destination
        // then taking nothing: it holds its buffer.
        let held = || {
            let mut copy = Copy::paid_by(budget);
            copy.size = JOIN_BUFFER_MAX;
            let mut from = Chunks::default();
            from.chunks.push_back(vec![7; 2 * JOIN_BUFFER_MAX]);
            let mut cx = Context::from_waker(Waker::noop());
            assert!(
                copy.poll(&mut cx, Pin::new(&mut from), Pin::new(&mut Stuck))
                    .is_pending()
            );
            assert!(copy.buf.has_remaining());
            copy
        };
        let first = held();
        assert_eq!(first.allocated, JOIN_BUFFER_MAX);
        assert_eq!(budget.left.load(Ordering::Acquire), LEFT_OVER);
        // The next one gets what is left, the one after its first size only.
        let second = held();
        assert_eq!(second.allocated, JOIN_BUFFER_MIN + LEFT_OVER);
        let spent = held();
        assert_eq!(spent.allocated, JOIN_BUFFER_MIN);
        assert_eq!(spent.buf.len(), JOIN_BUFFER_MIN);
        // Once the first is gone, the room is there again.
        drop(first);
        let third = held();
        assert_eq!(third.allocated, JOIN_BUFFER_MAX);
        drop((second, spent, third));
        assert_eq!(budget.left.load(Ordering::Acquire), full + LEFT_OVER);
        // A direction that shrinks or empties gives back what it took.
        let (mut copy, mut to) = (Copy::paid_by(budget), sink());
        let mut from = Chunks::default();
        from.chunks.push_back(vec![
            7;
            (JOIN_BUFFER_MAX - JOIN_BUFFER_MIN)
                + 3 * JOIN_BUFFER_MAX
        ]);
        assert!(poll_once(&mut copy, &mut from, &mut to).is_pending());
        assert_eq!(copy.size, JOIN_BUFFER_MAX);
        assert_eq!(copy.charged, 0, "released with the drained buffer");
        assert_eq!(budget.left.load(Ordering::Acquire), full + LEFT_OVER);
    }

    /// A destination that keeps written bytes until flushed, and whose
    /// first flush is pending (a TLS stream whose socket is full).
    #[derive(Default)]
    struct Buffered {
        held: Vec<u8>,
        sent: Vec<u8>,
        flushes_refused: usize,
    }

    impl AsyncWrite for Buffered {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.flushes_refused < 1 {
                self.flushes_refused += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let held = std::mem::take(&mut self.held);
            self.sent.extend(held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[test]
    fn a_pending_flush_is_finished_though_the_source_stays_idle() {
        let mut copy = Copy::default();
        let mut to = Buffered::default();
        let mut from = Chunks::default();
        from.chunks.push_back(b"the end of an answer".to_vec());
        let mut cx = Context::from_waker(Waker::noop());
        // First poll: written, the flush refused.
        assert!(
            copy.poll(&mut cx, Pin::new(&mut from), Pin::new(&mut to))
                .is_pending()
        );
        assert!(to.sent.is_empty());
        // Woken by the destination, with nothing more to read: the flush
        // is retried, not forgotten.
        assert!(
            copy.poll(&mut cx, Pin::new(&mut from), Pin::new(&mut to))
                .is_pending()
        );
        assert_eq!(to.sent, b"the end of an answer");
        assert!(!copy.flush_owed);
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        // a <-> (a_peer ... b_peer) <-> b
        let (mut a, mut a_peer) = duplex(16);
        let (mut b, mut b_peer) = duplex(16);
        let join = tokio::spawn(async move { join_streams(&mut a_peer, &mut b_peer).await });

        // a sends a request and closes its write half.
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();

        // b reads the request to EOF, then answers *after* a's EOF.
        let mut req = Vec::new();
        b.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        let answer = vec![7u8; 100_000];
        let writer = {
            let answer = answer.clone();
            tokio::spawn(async move {
                b.write_all(&answer).await.unwrap();
                b.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, answer);
        writer.await.unwrap();
        let stats = join.await.unwrap().unwrap();
        assert_eq!(
            stats,
            JoinStats {
                a_to_b: 7,
                b_to_a: 100_000
            }
        );
    }

    /// A service that answered and closed without reading the rest of the
    /// upload: writes to it fail, its answer is still there to read.
    struct AnsweredAndReset {
        answer: Chunks,
    }

    impl AsyncRead for AnsweredAndReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.answer).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for AnsweredAndReset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_answer_still_reaches_the_caller_after_the_upload_fails() {
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n".to_vec();
        let service = || AnsweredAndReset {
            answer: Chunks {
                chunks: VecDeque::from([answer.clone()]),
                end: true,
            },
        };
        let (mut caller, mut near) = duplex(1024);
        caller.write_all(b"POST /upload ...").await.unwrap();
        let mut b = service();
        let linger = std::time::Duration::from_secs(10);
        let join = tokio::spawn(async move {
            join_streams_lingering(&mut near, &mut b, linger, || false).await
        });
        let mut got = Vec::new();
        caller.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, answer);
        let err = join.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A peer that reset the connection: reads fail, writes go nowhere.
    struct ResetByPeer;

    impl AsyncRead for ResetByPeer {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for ResetByPeer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_from_the_caller_side_ends_the_join_at_once() {
        // frps reset the connection (its caller left) while the service is
        // still silent: no linger, the service's connection closes now.
        let (mut service, mut near) = duplex(1024);
        let started = tokio::time::Instant::now();
        let linger = std::time::Duration::from_secs(30);
        let err = join_streams_lingering(&mut ResetByPeer, &mut near, linger, || false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        drop(near);
        let mut rest = Vec::new();
        service.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn after_one_side_ends_the_other_has_a_bounded_linger_without_bytes() {
        use std::time::Duration;
        let (mut a, mut a_peer) = duplex(1024);
        let (mut b, mut b_peer) = duplex(1024);
        let linger = Duration::from_secs(30);
        let started = tokio::time::Instant::now();
        let join = tokio::spawn(async move {
            join_streams_lingering(&mut a_peer, &mut b_peer, linger, || false).await
        });
        // a closes; b answers a little every 20 s (under the linger each
        // time), then falls silent and never closes.
        a.shutdown().await.unwrap();
        let mut eof = Vec::new();
        b.read_to_end(&mut eof).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            b.write_all(b"tick").await.unwrap();
        }
        let stats = join.await.unwrap().unwrap();
        assert_eq!(stats.b_to_a, 12);
        // Ended 30 s after the last byte (written at 60 s), not waiting for b.
        let ended = started.elapsed();
        assert!(
            (Duration::from_secs(90)..Duration::from_secs(91)).contains(&ended),
            "{ended:?}"
        );
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"tick".repeat(3));
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_waiting_for_a_destination_end_the_join_once_their_sender_is_gone() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let (mut a, mut a_peer) = duplex(64 * 1024);
        let (mut b, mut b_peer) = duplex(1024);
        let gone = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, n) = (gone.clone(), asked.clone());
        let join = tokio::spawn(async move {
            join_streams_lingering(
                &mut a_peer,
                &mut b_peer,
                Duration::from_secs(10),
                move || {
                    n.fetch_add(1, Ordering::SeqCst);
                    g.load(Ordering::SeqCst)
                },
            )
            .await
        });
        // An upload larger than the way to b holds; b (a service whose
        // workers are all busy) takes nothing for an hour: its sender is
        // still there, so the join waits.
        a.write_all(&vec![7u8; 32 * 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!join.is_finished(), "a slow destination is waited for");
        let looks = asked.load(Ordering::SeqCst);
        assert!(
            (700..=721).contains(&looks),
            "asked every 5 s without progress: {looks}"
        );
        // b takes a little: progress, so no look for the next 5 s.
        let mut taken = vec![0u8; 512];
        b.read_exact(&mut taken).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            asked.load(Ordering::SeqCst),
            looks,
            "progress pushed the look back"
        );
        // The sender leaves (frps gave up on the request): the join ends at
        // the next look, closing a's side.
        gone.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let err = join.await.unwrap().expect_err("the sender is gone");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        assert!(SenderGone::is(&err), "{err}");
        assert!(started.elapsed() <= GONE_CHECK, "{:?}", started.elapsed());
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).await.unwrap(), 0);
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_join_never_asks_whether_its_sender_is_gone() {
        use std::time::Duration;
        let (mut a, mut a_peer) = duplex(1024);
        let (mut b, mut b_peer) = duplex(1024);
        let mut join = tokio::spawn(async move {
            join_streams_lingering(&mut a_peer, &mut b_peer, Duration::from_secs(10), || {
                panic!("asked with nothing waiting")
            })
            .await
        });
        a.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        // Nothing waits for b: an hour of silence (a long generation) is fine.
        tokio::select! {
            ended = &mut join => panic!("the join ended: {ended:?}"),
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        b.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        a.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
        drop((a, b));
        join.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_linger_waits_out_a_slow_reader_of_the_answer() {
        use std::time::Duration;
        let (mut a, mut a_peer) = duplex(1024);
        let (mut b, mut b_peer) = duplex(64 * 1024);
        let linger = Duration::from_secs(30);
        let join = tokio::spawn(async move {
            join_streams_lingering(&mut a_peer, &mut b_peer, linger, || false).await
        });
        // a has sent all it will; b answers with more than the way to a
        // holds, then closes. a takes nothing for a minute (a slow reader),
        // then all of it: nothing is lost to the linger meanwhile.
        a.shutdown().await.unwrap();
        let mut eof = Vec::new();
        b.read_to_end(&mut eof).await.unwrap();
        let answer = vec![9u8; 16 * 1024];
        b.write_all(&answer).await.unwrap();
        drop(b);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), answer.len());
        let stats = join.await.unwrap().unwrap();
        assert_eq!(stats.b_to_a, answer.len() as u64);
    }
}
