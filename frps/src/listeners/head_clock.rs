//! The public port's deadline for a connection's first request head.
//!
//! hyper has one head clock (`header_read_timeout`), started whenever it
//! begins waiting for a head: on a keep-alive connection, the moment the
//! previous response ended. Used alone it would either close idle
//! keep-alive connections after the short slowloris deadline, or give a
//! new connection the long idle allowance to send its first head. So
//! hyper's clock is set to `--keepalive-timeout` (how long a connection may
//! wait, idle or mid-head, after a response), and [`HeadClock`], around the
//! connection's stream, holds the TLS handshake and the first head together
//! to `--header-timeout` from the accept.
//!
//! Later heads are held to `--keepalive-timeout` only: a peer that dribbles
//! one holds no more than a peer that idles for as long, which every
//! keep-alive connection may. The first head's short deadline is what keeps
//! connections that never send a request from piling up.
//!
//! The same wrapper holds writes to a deadline: a caller that stops reading
//! while a response is owed to it fails its connection once it took less
//! than [`STALL_DRAIN`] bytes in the stall limit (`--keepalive-timeout`)
//! from the moment a write first had to wait. Without it such a caller kept
//! the request's capacity slot, its key's concurrency lease and the
//! upstream connection for as long as it liked: hyper stops polling the
//! response body (and its idle timer) while it cannot write. (Before, any
//! byte taken started the limit over, so a caller taking a few bytes a
//! minute held them for hours.)
//!
//! The management API wraps its connections in it too, `--header-timeout`
//! being both its first head's deadline and its stall limit.
//!
//! And it closes a connection that carried a request body gently: once
//! its end is written (FIN, or TLS's close_notify), it reads what the caller
//! still sends and drops it, until the caller closes ([`LINGER_TIME`] at
//! most, [`LINGER_GAP`] of silence ends it early), as nginx's lingering
//! close does. frps answers some requests without reading their body (401,
//! 413 on the announced length, 429...) and hyper then closes; a close with
//! bytes unread, or arriving after it, resets the connection, which fails
//! the caller's write of its body (HTTP clients send the whole request
//! before reading) and can destroy the answer on its way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Set by the connection's service when its first request arrives, and
/// when a request announces a body.
#[derive(Debug, Default)]
pub struct FirstRequest {
    arrived: AtomicBool,
    body: AtomicBool,
}

impl FirstRequest {
    /// A request head was parsed and handed to the service.
    pub fn arrived(&self) {
        self.arrived.store(true, Ordering::Release);
    }

    /// A request announced a body (`Content-Length` over 0, or
    /// `Transfer-Encoding`): the connection's close lingers.
    pub fn body_announced(&self) {
        self.body.store(true, Ordering::Relaxed);
    }

    /// A request with `headers` was handed to the service: it arrived, and
    /// announced a body if they say so.
    pub fn arrived_with(&self, headers: &hyper::HeaderMap) {
        self.arrived();
        let body = headers.contains_key(hyper::header::TRANSFER_ENCODING)
            || headers
                .get(hyper::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if body {
            self.body_announced();
        }
    }

    fn has_arrived(&self) -> bool {
        self.arrived.load(Ordering::Acquire)
    }

    fn had_body(&self) -> bool {
        self.body.load(Ordering::Relaxed)
    }
}

/// Longest a closing connection reads what its caller still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Silence from the caller that ends a lingering close early.
pub const LINGER_GAP: Duration = Duration::from_secs(1);

/// Most bytes a lingering close reads and drops.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A connection's stream whose reads fail once its first request head is
/// later than a deadline, and whose writes fail once none could make
/// progress for a stall limit.
#[derive(Debug)]
pub struct HeadClock<I> {
    io: I,
    first: Arc<FirstRequest>,
    limit: Duration,
    /// Until the first request arrives; then dropped.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Longest a write may wait for the caller to take bytes.
    stall_limit: Duration,
    /// Armed when a write starts waiting; made on the first wait.
    stall: Option<Pin<Box<Sleep>>>,
    /// Since a write had to wait: until when the caller has to take
    /// [`STALL_DRAIN`] bytes, and how many it took so far.
    stalled: Option<(Instant, usize)>,
    /// Once the connection's end is written, if it lingers.
    closing: Closing,
}

/// Where a connection's close is.
#[derive(Debug)]
enum Closing {
    /// Its end is not written yet.
    Open,
    /// Written; reading the caller's last bytes: when it ends at the
    /// latest, its timer, and the bytes read.
    Lingering(Instant, Pin<Box<Sleep>>, usize),
    /// Done.
    Closed,
}

/// Bytes a caller that makes writes wait must take within the stall limit
/// (16 KiB a minute at the default: about 270 bytes a second).
pub const STALL_DRAIN: usize = 16 * 1024;

impl<I> HeadClock<I> {
    /// Wraps `io`, accepted at `accepted`: its first request head must have
    /// arrived by `accepted + limit`, and no write may wait longer than
    /// `stall_limit` for the peer to take a byte.
    pub fn new(
        io: I,
        first: Arc<FirstRequest>,
        accepted: Instant,
        limit: Duration,
        stall_limit: Duration,
    ) -> Self {
        Self {
            io,
            first,
            limit,
            deadline: Some(Box::pin(tokio::time::sleep_until(accepted + limit))),
            stall_limit,
            stall: None,
            stalled: None,
            closing: Closing::Open,
        }
    }

    /// Passes on a write's outcome (`written`: the bytes it took). A wait
    /// arms the stall clock; it is disarmed once the caller took
    /// [`STALL_DRAIN`] bytes since, or a write goes through past the limit
    /// (the caller kept up at that moment); a wait past the limit fails.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        written: usize,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            if let Some((until, drained)) = &mut self.stalled {
                *drained += written;
                if *drained >= STALL_DRAIN || Instant::now() >= *until {
                    self.stalled = None;
                }
            }
            return polled;
        }
        let (until, drained) = *self.stalled.get_or_insert_with(|| {
            let until = Instant::now() + self.stall_limit;
            match &mut self.stall {
                Some(sleep) => sleep.as_mut().reset(until),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(until))),
            }
            (until, 0)
        });
        let sleep = self.stall.as_mut().expect("armed above");
        if sleep.as_mut().poll(cx).is_ready() {
            let took = match drained {
                0 => "no response byte".to_owned(),
                n => format!("{n} bytes of its response (less than {STALL_DRAIN})"),
            };
            debug_assert!(Instant::now() >= until);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the caller took {took} in {:?}", self.stall_limit),
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadClock<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deadline.is_some() && this.first.has_arrived() {
            this.deadline = None;
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete request head within {:?}", this.limit),
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + Unpin> HeadClock<I> {
    /// Reads and drops what the caller still sends until it closes (or
    /// fails, or [`LINGER_BYTES`] came), [`LINGER_TIME`] after the close
    /// began at most, [`LINGER_GAP`] after its last byte at most.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Closing::Lingering(until, timer, read) = &mut self.closing else {
            return Poll::Ready(Ok(()));
        };
        let mut sink = [0u8; 8 * 1024];
        loop {
            if timer.as_mut().poll(cx).is_ready() {
                break;
            }
            let mut buf = ReadBuf::new(&mut sink);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    *read += buf.filled().len();
                    if *read >= LINGER_BYTES {
                        break;
                    }
                    let next = (Instant::now() + LINGER_GAP).min(*until);
                    timer.as_mut().reset(next);
                }
                // Its end, or a failure: nothing more is coming.
                Poll::Ready(_) => break,
            }
        }
        self.closing = Closing::Closed;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeadClock<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        let written = written(&polled);
        this.watch(cx, polled, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let written = written(&polled);
        this.watch(cx, polled, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled, 0)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Closing::Open = this.closing {
            let polled = Pin::new(&mut this.io).poll_shutdown(cx);
            match this.watch(cx, polled, 0) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            this.closing = if this.first.had_body() {
                let now = Instant::now();
                let timer = Box::pin(tokio::time::sleep_until(now + LINGER_GAP));
                Closing::Lingering(now + LINGER_TIME, timer, 0)
            } else {
                Closing::Closed
            };
        }
        this.poll_linger(cx)
    }
}

/// The bytes a write took.
fn written(polled: &Poll<io::Result<usize>>) -> usize {
    match polled {
        Poll::Ready(Ok(n)) => *n,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn clocked(limit_ms: u64) -> (HeadClock<DuplexStream>, DuplexStream, Arc<FirstRequest>) {
        let (near, far) = tokio::io::duplex(1024);
        let first = Arc::new(FirstRequest::default());
        let limit = Duration::from_millis(limit_ms);
        let io = HeadClock::new(near, first.clone(), Instant::now(), limit, STALL);
        (io, far, first)
    }

    const STALL: Duration = Duration::from_secs(60);

    async fn read_some(io: &mut HeadClock<DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_that_never_comes_times_out() {
        let (mut io, _far, _first) = clocked(100);
        let started = Instant::now();
        let err = read_some(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbled_first_head_times_out_from_the_accept() {
        let (mut io, mut far, _first) = clocked(100);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            far.write_all(b"G").await.unwrap();
            assert_eq!(read_some(&mut io).await.unwrap(), 1);
        }
        let err = read_some(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_first_request_reads_have_no_deadline() {
        let (mut io, mut far, first) = clocked(100);
        far.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_some(&mut io).await.unwrap() > 0);
        first.arrived();
        // A slow body, then a long idle wait: hyper's keep-alive clock
        // governs these, not this one.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(read_some(&mut io).await.unwrap(), 1);
        }
        let waiting = tokio::time::timeout(Duration::from_secs(60), read_some(&mut io)).await;
        assert!(
            waiting.is_err(),
            "the connection was failed after its first request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_reading_fails_its_writes_after_the_stall_limit() {
        // 1 KiB of pipe: the caller reads nothing, the pipe fills.
        let (mut io, mut far, _first) = clocked(100);
        let started = Instant::now();
        let chunk = [7u8; 256];
        let err = loop {
            match io.write(&chunk).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), STALL);

        // A slow reader that takes 16 KiB a minute (a KiB every three
        // seconds) is never cut.
        let (mut io, mut far2, _first) = clocked(100);
        let total = 4 * STALL_DRAIN;
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = [0u8; 1024];
            while got < total {
                tokio::time::sleep(Duration::from_secs(3)).await;
                got += far2.read(&mut buf).await.unwrap();
            }
            got
        });
        let mut sent = 0;
        while sent < total {
            sent += io
                .write(&chunk)
                .await
                .expect("enough taken within the limit");
        }
        io.flush().await.unwrap();
        drop(io);
        assert!(reader.await.unwrap() >= total);
        far.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_taking_a_few_bytes_now_and_then_is_cut_at_the_stall_limit() {
        let (mut io, mut far, _first) = clocked(100);
        let _reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                if far.read(&mut buf).await.is_err() {
                    return;
                }
            }
        });
        let chunk = [7u8; 256];
        let started = Instant::now();
        let cut = tokio::time::timeout(10 * STALL, async {
            loop {
                if let Err(e) = io.write(&chunk).await {
                    break e;
                }
            }
        });
        let err = cut.await.expect("never cut");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("bytes of its response"), "{err}");
        // From the first wait (the pipe full at once), not from the last
        // few bytes taken.
        assert_eq!(started.elapsed(), STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_kept_up_after_a_wait_starts_afresh_at_the_next() {
        // It waits once and takes a little; the response then comes slower
        // than it reads (a model generating), and much later it has to
        // wait again: that wait gets the whole limit.
        let (mut io, mut far, _first) = clocked(100);
        let chunk = [7u8; 1024];
        io.write_all(&chunk).await.unwrap();
        let mut buf = [0u8; 2048];
        let pending = tokio::time::timeout(Duration::from_secs(1), io.write_all(&chunk)).await;
        assert!(pending.is_err(), "the pipe is full");
        assert_eq!(far.read(&mut buf).await.unwrap(), 1024);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            io.write_all(&[1u8; 100]).await.unwrap();
            assert_eq!(far.read(&mut buf).await.unwrap(), 100);
        }
        io.write_all(&chunk).await.unwrap();
        let waited = Instant::now();
        let err = io.write_all(&chunk).await.unwrap_err();
        assert_eq!(waited.elapsed(), STALL);
        assert!(err.to_string().contains("no response byte"), "{err}");
    }

    /// Writes a byte every 100 ms to `far` for `sending` (all of them must
    /// go through), then closes it if `close`, else keeps it open.
    fn sender(
        mut far: DuplexStream,
        sending: Duration,
        close: bool,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let until = Instant::now() + sending;
            while Instant::now() < until {
                far.write_all(b"x").await.expect("taken while lingering");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if close {
                drop(far);
            } else {
                std::future::pending::<()>().await;
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_after_a_body_reads_what_the_caller_still_sends() {
        // Until the caller closes.
        let (mut io, far, first) = clocked(100);
        first.arrived();
        first.body_announced();
        let started = Instant::now();
        let sending = sender(far, Duration::from_secs(3), true);
        io.shutdown().await.unwrap();
        sending.await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < LINGER_TIME,
            "{took:?}"
        );

        // A caller that sends nothing more: its silence ends it.
        let (mut io, far, first) = clocked(100);
        first.body_announced();
        let started = Instant::now();
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER_GAP);
        drop(far);

        // One that never stops: LINGER_TIME at most.
        let (mut io, far, first) = clocked(100);
        first.body_announced();
        let started = Instant::now();
        let _sending = sender(far, Duration::from_secs(3600), false);
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER_TIME);
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_without_a_body_does_not_linger() {
        let (mut io, mut far, first) = clocked(100);
        first.arrived();
        let started = Instant::now();
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The end is written.
        let mut buf = [0u8; 8];
        assert_eq!(far.read(&mut buf).await.unwrap(), 0);
        // And it is closed for good: a second shutdown does not linger.
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
