//! Arbitrary bytes, cut into arbitrary chunks, through the real frame
//! decoder ([`common::FrameReader`] and [`common::read_one_command`]).
//!
//! Input layout: the first byte `k` picks how many of the next bytes are
//! chunk sizes (`k % 8`); the rest is the byte stream. Checked per input:
//! - nothing panics;
//! - no single allocation exceeds a small multiple of `MAX_FRAME`, so an
//!   announced length is never trusted before the limit check;
//! - decoding chunk by chunk, with the read future dropped (cancelled)
//!   whenever it would wait, yields exactly the commands and the error that
//!   decoding the whole stream at once does (the reader is cancel-safe);
//! - `read_one_command` agrees with the reader's first result.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{Command, FrameError, FrameReader, MAX_FRAME, read_one_command};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Records the largest single allocation since the last reset.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Largest allocation allowed while decoding: the body, the buffer that
/// holds it (which may double when it grows) and slack.
const ALLOC_BOUND: usize = 4 * MAX_FRAME;

/// Serves `data` in chunks of the given sizes (cycling); every other read
/// first answers "not yet" so the caller's future is dropped mid-frame.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
    stall: bool,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stall && !self.data.is_empty() {
            self.stall = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stall = true;
        let size = match self.sizes {
            [] => self.data.len(),
            sizes => usize::from(sizes[self.next % sizes.len()]).max(1),
        };
        self.next += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// The outcome of decoding a stream to its end or first error, comparable.
#[derive(Debug, PartialEq)]
struct Decoded {
    commands: Vec<Command>,
    error: Option<String>,
}

/// A comparable name for an error (serde messages carry positions that
/// do not depend on chunking, so they are kept).
fn describe(e: &FrameError) -> String {
    match e {
        FrameError::Io(e) => panic!("in-memory reads cannot fail: {e}"),
        FrameError::Timeout(_) => panic!("no deadline is used here"),
        other => other.to_string(),
    }
}

/// Polls `fut` once without a runtime.
fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

fn decode(stream: Chunked<'_>) -> Decoded {
    let mut reader = FrameReader::new(stream, MAX_FRAME);
    let mut commands = Vec::new();
    loop {
        // A fresh future each time: a Pending one is dropped, which is
        // what `tokio::select!` does to it.
        let result = {
            let fut = pin!(reader.read_command());
            match poll_once(fut) {
                Poll::Ready(r) => r,
                Poll::Pending => continue,
            }
        };
        match result {
            Ok(Some(cmd)) => commands.push(cmd),
            Ok(None) => {
                return Decoded {
                    commands,
                    error: None,
                };
            }
            Err(e) => {
                return Decoded {
                    commands,
                    error: Some(describe(&e)),
                };
            }
        }
    }
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fuzz_target!(|input: &[u8]| {
    let Some((&k, rest)) = input.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let (sizes, data) = rest.split_at(k);

    LARGEST.store(0, Ordering::Relaxed);
    let whole = decode(Chunked {
        data,
        sizes: &[],
        next: 0,
        stall: false,
    });
    let chunked = decode(Chunked {
        data,
        sizes,
        next: 0,
        stall: false,
    });
    assert_eq!(whole, chunked, "chunking changed what was decoded");

    let one = RT.with(|rt| {
        rt.block_on(async {
            let mut stream = Chunked {
                data,
                sizes,
                next: 0,
                stall: false,
            };
            read_one_command(&mut stream, MAX_FRAME, Duration::from_secs(60)).await
        })
    });
    match (one, whole.commands.first(), &whole.error) {
        (Ok(cmd), Some(first), _) => assert_eq!(&cmd, first),
        (Err(e), None, Some(err)) => assert_eq!(&describe(&e), err),
        // A clean end before any byte is `Truncated` for a handshake read.
        (Err(FrameError::Truncated), None, None) => assert!(data.is_empty()),
        (one, first, err) => panic!("read_one_command: {one:?}, reader: {first:?} / {err:?}"),
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOC_BOUND,
        "an allocation of {largest} bytes while decoding {} input bytes",
        data.len()
    );
});
