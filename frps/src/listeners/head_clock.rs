//! The public port's two clocks for request heads.
//!
//! hyper has one: `header_read_timeout`, started when it begins waiting for
//! a head, which on a keep-alive connection is the moment the previous
//! response ended. Used alone it either closes idle keep-alive connections
//! after the short slowloris deadline, or gives a slow head the long idle
//! allowance. So hyper's clock is set to `--keepalive-timeout` (how long an
//! idle connection may wait for its next request), and [`HeadClock`], around
//! the connection's stream, enforces `--header-timeout` from a head's first
//! byte (from the connection's start for its first head) until the request
//! reaches the service.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Where one connection is in its request cycle, shared by its stream
/// wrapper and its service.
#[derive(Debug, Default)]
pub struct Phase {
    /// Requests handed to the service so far.
    started: AtomicU64,
    in_request: AtomicBool,
}

impl Phase {
    /// A request head was parsed and handed to the service.
    pub fn request_started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_request.store(true, Ordering::Release);
    }

    /// The response to it was sent (or dropped): the next bytes start a head.
    pub fn response_ended(&self) {
        self.in_request.store(false, Ordering::Release);
    }

    fn in_request(&self) -> bool {
        self.in_request.load(Ordering::Acquire)
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }
}

/// A running head deadline, and how many requests had started when it was
/// set: once another starts, that head arrived in time.
#[derive(Debug)]
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    requests: u64,
}

/// A connection's stream that fails reads once a request head has taken
/// longer than its limit.
#[derive(Debug)]
pub struct HeadClock<I> {
    io: I,
    phase: Arc<Phase>,
    limit: Duration,
    /// Running while a head is being received; `None` otherwise.
    deadline: Option<Deadline>,
}

impl<I> HeadClock<I> {
    /// Wraps `io`; its first head must arrive within `limit` from now.
    pub fn new(io: I, phase: Arc<Phase>, limit: Duration) -> Self {
        Self {
            io,
            phase,
            limit,
            deadline: Some(Deadline {
                sleep: Box::pin(tokio::time::sleep(limit)),
                requests: 0,
            }),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadClock<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this
            .deadline
            .as_ref()
            .is_some_and(|d| d.requests != this.phase.started())
        {
            // The head arrived in time.
            this.deadline = None;
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request head not complete within {:?}", this.limit),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
            && this.deadline.is_none()
            && !this.phase.in_request()
        {
            // The first byte of the next head (or of a request body the
            // service did not read, which must also end in time).
            let mut sleep = Box::pin(tokio::time::sleep(this.limit));
            // Registers the wakeup; a fresh deadline cannot have passed.
            let _ = sleep.as_mut().poll(cx);
            this.deadline = Some(Deadline {
                sleep,
                requests: this.phase.started(),
            });
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadClock<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body that tells the connection's [`Phase`] when it is gone
/// (hyper drops it once sent, or when the connection fails).
#[derive(Debug)]
pub struct Ended<B> {
    inner: B,
    phase: Arc<Phase>,
}

impl<B> Ended<B> {
    /// Wraps the body of the response to the current request.
    pub fn new(inner: B, phase: Arc<Phase>) -> Self {
        Self { inner, phase }
    }
}

impl<B> Drop for Ended<B> {
    fn drop(&mut self) {
        self.phase.response_ended();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Ended<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn clocked(
        limit_ms: u64,
    ) -> (
        HeadClock<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Phase>,
    ) {
        let (near, far) = tokio::io::duplex(1024);
        let phase = Arc::new(Phase::default());
        let io = HeadClock::new(near, phase.clone(), Duration::from_millis(limit_ms));
        (io, far, phase)
    }

    async fn read_some(io: &mut HeadClock<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_that_never_comes_times_out() {
        let (mut io, _far, _phase) = clocked(100);
        let started = tokio::time::Instant::now();
        let err = read_some(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_between_requests_is_not_a_slow_head() {
        let (mut io, mut far, phase) = clocked(100);
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_some(&mut io).await.unwrap() > 0);
        phase.request_started();
        phase.response_ended();
        // Idle far longer than the head limit: no error, the read waits.
        let waiting = tokio::time::timeout(Duration::from_secs(60), read_some(&mut io)).await;
        assert!(waiting.is_err(), "an idle connection was failed");
        // The next head's first byte starts its clock.
        far.write_all(b"GE").await.unwrap();
        assert_eq!(read_some(&mut io).await.unwrap(), 2);
        let started = tokio::time::Instant::now();
        let err = read_some(&mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_has_no_head_deadline() {
        let (mut io, mut far, phase) = clocked(100);
        far.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_some(&mut io).await.unwrap() > 0);
        phase.request_started();
        // A slow body, one byte a second: not the head clock's business.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(read_some(&mut io).await.unwrap(), 1);
        }
    }

    #[test]
    fn dropping_the_response_body_ends_the_request() {
        let phase = Arc::new(Phase::default());
        phase.request_started();
        let body = Ended::new(http_body_util::Empty::<Bytes>::new(), phase.clone());
        assert!(phase.in_request());
        drop(body);
        assert!(!phase.in_request());
    }
}
