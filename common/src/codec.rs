//! Framing: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The length is checked against a maximum before anything is allocated, so
//! a peer announcing a 4 GiB frame costs nothing. Every failure is a
//! [`FrameError`]; the caller closes that connection and nothing else.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::Command;

/// Largest frame body accepted or sent by default (64 KiB).
pub const MAX_FRAME: usize = 64 * 1024;

/// Default deadline for a handshake frame (login, register, data hello).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const HEADER: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The announced (or encoded) length is above the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A zero-length frame, which carries no command.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid command.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// No complete frame arrived before the deadline.
    #[error("no frame within {0:?}")]
    Timeout(Duration),
}

/// How much room a frame still arriving gets at a time, at least: its
/// buffer grows with what arrived, never straight to the announced length.
const READ_STEP: usize = 4096;

/// Reads commands from a byte stream, buffering internally.
///
/// [`FrameReader::read_command`] is cancel-safe: bytes read before a
/// cancelled call stay in the buffer for the next one, so it can sit in a
/// `tokio::select!` loop.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`, accepting frames of at most `max` bytes.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(1024),
            max,
        }
    }

    /// Reads the next command. `Ok(None)` means the peer closed the
    /// connection cleanly between frames.
    pub async fn read_command(&mut self) -> Result<Option<Command>, FrameError> {
        loop {
            if let Some(cmd) = self.parse()? {
                return Ok(Some(cmd));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Like [`FrameReader::read_command`], failing with
    /// [`FrameError::Timeout`] when no frame completes within `limit`.
    pub async fn read_command_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Command>, FrameError> {
        tokio::time::timeout(limit, self.read_command())
            .await
            .map_err(|_| FrameError::Timeout(limit))?
    }

    /// A command that has come already (buffered here, or readable from
    /// `inner` without waiting), or `None` when the next one is not there
    /// yet; what was read of it stays buffered. For a side about to give
    /// its peer up for silence: while it waited on a write of its own, the
    /// peer's frames may have come without being read.
    pub async fn read_command_now(&mut self) -> Option<Result<Option<Command>, FrameError>> {
        let read = self.read_command();
        let mut read = std::pin::pin!(read);
        // Not held back by the task's cooperative budget: a frame that is
        // there is found.
        tokio::task::unconstrained(std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match read.as_mut().poll(cx) {
                std::task::Poll::Ready(read) => Some(read),
                std::task::Poll::Pending => None,
            })
        }))
        .await
    }

    /// Parses one frame from the buffer if it is complete.
    fn parse(&mut self) -> Result<Option<Command>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = frame_len(self.buf[..HEADER].try_into().expect("4 bytes"), self.max)?;
        if self.buf.len() < HEADER + len {
            // Room for what is still to come, but not beyond what has come
            // so far (or READ_STEP): a peer that announces a large frame
            // and sends little of it gets little memory held for it.
            let missing = HEADER + len - self.buf.len();
            self.buf.reserve(missing.min(READ_STEP.max(self.buf.len())));
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let body = self.buf.split_to(len);
        let command = serde_json::from_slice(&body);
        if len > READ_STEP && self.buf.len() <= READ_STEP {
            // The buffer grown for a large frame (a registration's model
            // list) is let go with it: kept, the connection would hold it
            // for its whole life, though its next frames are small. What
            // came after it in the same read (a heartbeat) moves to a
            // small one.
            let mut small = BytesMut::with_capacity(self.buf.len().max(1024));
            small.extend_from_slice(&self.buf);
            self.buf = small;
        }
        Ok(Some(command?))
    }
}

fn frame_len(header: [u8; HEADER], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Reads exactly one command and not a byte more, so the stream can carry
/// raw data right after it (the data-connection hello). Fails with
/// [`FrameError::Timeout`] when the frame does not arrive within `limit`.
pub async fn read_one_command<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
    limit: Duration,
) -> Result<Command, FrameError> {
    let read = async {
        let mut header = [0u8; HEADER];
        read_exact_or_truncated(stream, &mut header).await?;
        let len = frame_len(header, max)?;
        // Grown as bytes arrive, not allocated at the announced length: a
        // peer that announces a large frame and stalls holds little.
        let mut body = Vec::with_capacity(len.min(READ_STEP));
        (&mut *stream)
            .take(len as u64)
            .read_to_end(&mut body)
            .await?;
        if body.len() < len {
            return Err(FrameError::Truncated);
        }
        Ok(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| FrameError::Timeout(limit))?
}

/// [`read_one_command`], passing over commands of a newer peer this
/// version does not know ([`Command::Unknown`]), all within `limit`: for a
/// handshake's answer, which a newer peer may precede with something new.
pub async fn read_one_known_command<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
    limit: Duration,
) -> Result<Command, FrameError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match read_one_command(stream, max, left).await {
            Ok(Command::Unknown) => continue,
            Err(FrameError::Timeout(_)) => return Err(FrameError::Timeout(limit)),
            read => return read,
        }
    }
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Encodes `cmd` as one frame (header and body in one buffer).
pub fn encode(cmd: &Command, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER];
    serde_json::to_writer(&mut out, cmd)?;
    let len = out.len() - HEADER;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Writes `cmd` as one frame and flushes.
pub async fn write_command<W: AsyncWrite + Unpin>(
    stream: &mut W,
    cmd: &Command,
) -> Result<(), FrameError> {
    let frame = encode(cmd, MAX_FRAME)?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ModelInfo, Registration};
    use proptest::prelude::*;
    use tokio::io::duplex;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// `body` as one frame, length first.
    fn raw_frame(body: &[u8]) -> Vec<u8> {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_answer_is_read_past_commands_of_a_newer_peer() {
        let (mut a, mut b) = duplex(1024);
        let future = br#"{"type":"SomethingNewer","detail":{"x":1}}"#;
        a.write_all(&raw_frame(future)).await.unwrap();
        write_command(&mut a, &Command::MuxAccepted).await.unwrap();
        write_command(&mut a, &Command::Heartbeat { seq: 1 })
            .await
            .unwrap();
        let limit = Duration::from_secs(5);
        let read = read_one_known_command(&mut b, MAX_FRAME, limit).await;
        assert_eq!(read.unwrap(), Command::MuxAccepted);
        // Not a byte past it was read.
        let read = read_one_command(&mut b, MAX_FRAME, limit).await;
        assert_eq!(read.unwrap(), Command::Heartbeat { seq: 1 });
        // Unknown commands only, then silence: one limit for them all.
        let started = tokio::time::Instant::now();
        a.write_all(&raw_frame(future)).await.unwrap();
        let read = read_one_known_command(&mut b, MAX_FRAME, limit).await;
        assert!(
            matches!(read, Err(FrameError::Timeout(l)) if l == limit),
            "{read:?}"
        );
        assert_eq!(started.elapsed(), limit);
    }

    #[tokio::test]
    async fn a_command_of_an_unknown_type_is_read_as_unknown_and_the_stream_goes_on() {
        let (mut a, b) = duplex(1024);
        let future = br#"{"type":"SomethingNewer","detail":{"x":1}}"#;
        a.write_all(&raw_frame(future)).await.unwrap();
        write_command(&mut a, &Command::Heartbeat { seq: 7 })
            .await
            .unwrap();
        drop(a);
        let mut reader = FrameReader::new(b, MAX_FRAME);
        assert_eq!(reader.read_command().await.unwrap(), Some(Command::Unknown));
        assert_eq!(
            reader.read_command().await.unwrap(),
            Some(Command::Heartbeat { seq: 7 })
        );
        // A known type with bad fields is still an error, not Unknown.
        let (mut a, b) = duplex(1024);
        let bad = br#"{"type":"Heartbeat","seq":"seven"}"#;
        a.write_all(&raw_frame(bad)).await.unwrap();
        assert!(FrameReader::new(b, MAX_FRAME).read_command().await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_came_is_found_without_waiting_and_one_still_coming_is_not() {
        let (mut a, b) = duplex(1024);
        let mut reader = FrameReader::new(b, MAX_FRAME);
        let started = tokio::time::Instant::now();
        assert!(reader.read_command_now().await.is_none());
        let beat = raw_frame(&serde_json::to_vec(&Command::Heartbeat { seq: 1 }).unwrap());
        // Half a frame: not yet, and what came is kept.
        a.write_all(&beat[..5]).await.unwrap();
        assert!(reader.read_command_now().await.is_none());
        a.write_all(&beat[5..]).await.unwrap();
        write_command(&mut a, &Command::Heartbeat { seq: 2 })
            .await
            .unwrap();
        for seq in [1, 2] {
            let found = reader.read_command_now().await.expect("there");
            assert_eq!(found.unwrap(), Some(Command::Heartbeat { seq }));
        }
        assert!(reader.read_command_now().await.is_none());
        drop(a);
        assert_eq!(reader.read_command_now().await.unwrap().unwrap(), None);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_frame_announced_large_holds_memory_only_for_what_arrived() {
        let body = serde_json::to_vec(&Command::Disconnect {
            reason: "r".repeat(40_000),
        })
        .unwrap();
        let frame = raw_frame(&body);
        let (mut a, b) = duplex(1 << 20);
        // The header and a few bytes, then nothing: little is held.
        a.write_all(&frame[..HEADER + 10]).await.unwrap();
        let mut reader = FrameReader::new(b, MAX_FRAME);
        let waited = tokio::time::timeout(Duration::from_millis(50), reader.read_command()).await;
        assert!(waited.is_err(), "incomplete");
        assert!(
            reader.buf.capacity() <= 2 * READ_STEP,
            "held {} bytes for 14 received",
            reader.buf.capacity()
        );
        // The rest in pieces: the frame is read whole, the buffer grown
        // with what arrived.
        for piece in frame[HEADER + 10..].chunks(3000) {
            a.write_all(piece).await.unwrap();
        }
        assert_eq!(
            reader.read_command().await.unwrap(),
            Some(Command::Disconnect {
                reason: "r".repeat(40_000)
            })
        );
        // Read, the large frame's memory is let go: the next, small ones
        // do not keep it for the connection's life.
        write_command(&mut a, &Command::Heartbeat { seq: 1 })
            .await
            .unwrap();
        assert_eq!(
            reader.read_command().await.unwrap(),
            Some(Command::Heartbeat { seq: 1 })
        );
        reader.buf.reserve(1);
        assert!(
            reader.buf.capacity() <= 2 * READ_STEP,
            "held {} bytes after the large frame",
            reader.buf.capacity()
        );
        // So when the next frame came in the same read as the large one.
        let mut both = frame.clone();
        both.extend_from_slice(&encode(&Command::Heartbeat { seq: 2 }, MAX_FRAME).unwrap());
        reader.buf.extend_from_slice(&both);
        assert!(matches!(
            reader.read_command().await.unwrap(),
            Some(Command::Disconnect { .. })
        ));
        assert_eq!(
            reader.read_command().await.unwrap(),
            Some(Command::Heartbeat { seq: 2 })
        );
        // (A buffer split off a larger one reports only its own part as
        // its capacity; reserving takes the whole allocation back.)
        reader.buf.reserve(1);
        assert!(
            reader.buf.capacity() <= 2 * READ_STEP,
            "held {} bytes after the large frame and the next",
            reader.buf.capacity()
        );

        // The same for a single frame read without a reader.
        let (mut a, mut b) = duplex(1 << 20);
        a.write_all(&frame[..HEADER + 10]).await.unwrap();
        let rest = frame[HEADER + 10..].to_vec();
        let writer = tokio::spawn(async move {
            for piece in rest.chunks(3000) {
                tokio::task::yield_now().await;
                a.write_all(piece).await.unwrap();
            }
            a
        });
        let read = read_one_command(&mut b, MAX_FRAME, Duration::from_secs(5)).await;
        assert!(
            matches!(read, Ok(Command::Disconnect { ref reason }) if reason.len() == 40_000),
            "{read:?}"
        );
        drop(writer.await.unwrap());
        // And a frame cut short is truncated, not waited for.
        let (mut a, mut b) = duplex(1 << 20);
        a.write_all(&frame[..HEADER + 10]).await.unwrap();
        drop(a);
        assert!(matches!(
            read_one_command(&mut b, MAX_FRAME, Duration::from_secs(5)).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn round_trip_over_duplex() {
        let (mut a, b) = duplex(1024);
        let cmds = vec![
            Command::Heartbeat { seq: 1 },
            Command::Disconnect {
                reason: "bye".into(),
            },
        ];
        for c in &cmds {
            write_command(&mut a, c).await.unwrap();
        }
        drop(a);
        let mut reader = FrameReader::new(b, MAX_FRAME);
        for c in &cmds {
            assert_eq!(reader.read_command().await.unwrap().as_ref(), Some(c));
        }
        assert!(reader.read_command().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, b) = duplex(64);
        // 4 GiB - 1 announced: must fail at once, without reading or allocating the body.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(b, MAX_FRAME);
        match reader.read_command().await {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, MAX_FRAME);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(reader.buf.capacity() < 1 << 20);
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let (mut a, b) = duplex(64);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"\xff\xfe{{x").await.unwrap();
        let mut reader = FrameReader::new(b, MAX_FRAME);
        assert!(matches!(
            reader.read_command().await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn empty_frame_is_an_error() {
        let (mut a, b) = duplex(64);
        a.write_all(&0u32.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(b, MAX_FRAME);
        assert!(matches!(
            reader.read_command().await,
            Err(FrameError::Empty)
        ));
    }

    #[tokio::test]
    async fn truncated_frame_is_reported() {
        let (mut a, b) = duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{\"ty").await.unwrap();
        drop(a);
        let mut reader = FrameReader::new(b, MAX_FRAME);
        assert!(matches!(
            reader.read_command().await,
            Err(FrameError::Truncated)
        ));
        let (mut a, mut b) = duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        drop(a);
        assert!(matches!(
            read_one_command(&mut b, MAX_FRAME, HANDSHAKE_TIMEOUT).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn deeply_nested_json_is_malformed_not_a_crash() {
        let body = "[".repeat(10_000);
        let (mut a, b) = duplex(64 * 1024);
        a.write_all(&raw_frame(body.as_bytes())).await.unwrap();
        let mut reader = FrameReader::new(b, MAX_FRAME);
        assert!(matches!(
            reader.read_command().await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn handshake_frame_times_out() {
        let (_a, mut b) = duplex(64);
        let err = read_one_command(&mut b, MAX_FRAME, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Timeout(d) if d == Duration::from_secs(5)));
        let mut reader = FrameReader::new(b, MAX_FRAME);
        let err = reader
            .read_command_within(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Timeout(_)));
    }

    #[tokio::test]
    async fn read_one_command_leaves_following_bytes() {
        let (mut a, mut b) = duplex(1024);
        write_command(&mut a, &Command::Heartbeat { seq: 3 })
            .await
            .unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let cmd = read_one_command(&mut b, MAX_FRAME, HANDSHAKE_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(cmd, Command::Heartbeat { seq: 3 });
        let mut rest = [0u8; 16];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn encoding_refuses_oversized_commands() {
        let cmd = Command::Error {
            message: "x".repeat(100),
        };
        assert!(matches!(
            encode(&cmd, 50),
            Err(FrameError::TooLarge { max: 50, .. })
        ));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            any::<u64>().prop_map(|seq| Command::Heartbeat { seq }),
            ".*".prop_map(|message| Command::Error { message }),
            (".*", ".*").prop_map(|(email, password)| Command::Login { email, password }),
            (
                "[a-z0-9_-]{1,20}",
                ".*",
                proptest::collection::vec("[a-z0-9:.]{1,12}", 0..5)
            )
                .prop_map(|(client_id, hostname, models)| Command::Register(
                    Registration {
                        client_id,
                        hostname,
                        models: models
                            .into_iter()
                            .map(|name| ModelInfo { name, size: None })
                            .collect(),
                        ..Default::default()
                    }
                )),
        ]
    }

    proptest! {
        /// Any sequence of commands, written back to back and read in chunks
        /// of any size, comes back unchanged and in order.
        #[test]
        fn framing_round_trips(cmds in proptest::collection::vec(arb_command(), 1..8), chunk in 1usize..64) {
            rt().block_on(async {
                let mut bytes = Vec::new();
                for c in &cmds {
                    bytes.extend(encode(c, MAX_FRAME).unwrap());
                }
                let (mut a, b) = duplex(chunk);
                let writer = tokio::spawn(async move {
                    for piece in bytes.chunks(chunk) {
                        a.write_all(piece).await.unwrap();
                    }
                });
                let mut reader = FrameReader::new(b, MAX_FRAME);
                for c in &cmds {
                    let got = reader.read_command().await.unwrap();
                    prop_assert_eq!(got.as_ref(), Some(c));
                }
                writer.await.unwrap();
                prop_assert!(reader.read_command().await.unwrap().is_none());
                Ok(())
            })?;
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            rt().block_on(async {
                let (mut a, b) = duplex(1024);
                a.write_all(&bytes).await.unwrap();
                drop(a);
                let mut reader = FrameReader::new(b, MAX_FRAME);
                while let Ok(Some(_)) = reader.read_command().await {}
            });
        }
    }
}
