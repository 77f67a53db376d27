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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Set by the connection's service when its first request arrives.
#[derive(Debug, Default)]
pub struct FirstRequest(AtomicBool);

impl FirstRequest {
    /// A request head was parsed and handed to the service.
    pub fn arrived(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn has_arrived(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

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

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadClock<I> {
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
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, polled, 0)
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
}
