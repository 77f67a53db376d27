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
//! while a response is owed to it fails its connection once no byte could
//! be written for the stall limit (`--keepalive-timeout`). Without it such
//! a caller kept the request's capacity slot, its key's concurrency lease
//! and the upstream connection for as long as it liked: hyper stops
//! polling the response body (and its idle timer) while it cannot write.

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
    /// Whether the last write (or flush) is waiting.
    stalled: bool,
}

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
            stalled: false,
        }
    }

    /// Passes on a write's outcome: progress disarms the stall clock, a
    /// wait arms it (from the first wait), and a wait past the limit fails.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        if !self.stalled {
            self.stalled = true;
            let until = Instant::now() + self.stall_limit;
            match &mut self.stall {
                Some(sleep) => sleep.as_mut().reset(until),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(until))),
            }
        }
        let sleep = self.stall.as_mut().expect("armed above");
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the caller took no response byte for {:?}",
                    self.stall_limit
                ),
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
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, polled)
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

        // A slow reader that takes a byte now and then is never cut.
        let (mut io, mut far2, _first) = clocked(100);
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = [0u8; 16];
            while got < 4096 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                got += far2.read(&mut buf).await.unwrap();
            }
            got
        });
        let mut sent = 0;
        while sent < 4096 {
            sent += io.write(&chunk).await.expect("progress within the limit");
        }
        io.flush().await.unwrap();
        drop(io);
        assert!(reader.await.unwrap() >= 4096);
        far.shutdown().await.unwrap();
    }
}
