//! The byte stream every frpx connection runs on: plain TCP, or TLS over TCP.
//!
//! Listeners and the pairing table work on [`Stream`] whatever the transport,
//! so TLS is decided once per connection (at accept or dial) and the data
//! path never branches on it again. Reads and writes go straight to the TCP
//! socket or through rustls' record layer: no extra buffer or copy.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

/// Silence after which TCP keepalive probes start on a link between frps
/// and frpc: well under the idle timeout of common NATs, so a pooled data
/// connection's mapping stays open while it waits for a request.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel declares the peer gone and the
/// connection fails (so a dead idle connection is never handed a request).
pub const KEEPALIVE_RETRIES: u32 = 3;

/// How long sent bytes may go unacknowledged on a link before the kernel
/// fails it: keepalive only probes an idle connection, so a path that goes
/// silent under traffic (a hello just sent, a request on its way, a tunnel
/// connection that is rarely idle) would otherwise be retried for about 15
/// minutes. Also ends a link whose peer has taken nothing (a zero window)
/// for this long, which is why frpc's end of a data connection drops it once
/// it carries a request ([`release_user_timeout`]): frpc sends answers, and a
/// caller may read them slowly. frps's end keeps it (it sends requests, and a
/// request written into a pooled connection whose path died must fail, not
/// wait), as do control and tunnel connections.
pub const LINK_USER_TIMEOUT: Duration = Duration::from_secs(
    KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_RETRIES as u64,
);

/// How long one address of a name is given to connect before the next one
/// is tried beside it (RFC 8305's connection attempt delay).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to `addr` (`host:port`), trying the addresses it resolves to
/// as RFC 8305 does: the two families taking turns, the next address
/// started when the one before fails or after [`ATTEMPT_DELAY`], the first
/// to connect kept. tokio's `TcpStream::connect` tries them one after the
/// other, each until it fails: an address that drops packets (an AAAA
/// record of a server whose firewall opens only IPv4, a box with broken
/// IPv6) took the caller's whole timeout, every time, and the next address
/// was never tried.
pub async fn connect_any(addr: &str) -> io::Result<TcpStream> {
    let addrs = tokio::net::lookup_host(addr).await?.collect();
    connect_first(families_alternating(addrs), ATTEMPT_DELAY).await
}

/// Connects to the first of `addrs` to answer, starting each after the one
/// before failed or after `delay`; the error of the last to fail when none
/// connects.
pub async fn connect_first(
    addrs: Vec<std::net::SocketAddr>,
    delay: Duration,
) -> io::Result<TcpStream> {
    let mut next = addrs.into_iter().peekable();
    // Dropped on return: the attempts still under way are abandoned.
    let mut attempts = tokio::task::JoinSet::new();
    let mut last = None;
    loop {
        match next.next() {
            Some(addr) => {
                attempts.spawn(TcpStream::connect(addr));
            }
            None if attempts.is_empty() => {
                return Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the name has no address")
                }));
            }
            None => {}
        }
        let more = next.peek().is_some();
        tokio::select! {
            Some(joined) = attempts.join_next() => match joined {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = Some(e),
                Err(e) => last = Some(io::Error::other(e)),
            },
            () = tokio::time::sleep(delay), if more => {}
        }
    }
}

/// `addrs` with the family of the first and the other taking turns, each
/// family in its own order.
fn families_alternating(addrs: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
    let first_v6 = addrs.first().is_some_and(std::net::SocketAddr::is_ipv6);
    let (first, other): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(first.len() + other.len());
    let (mut first, mut other) = (first.into_iter(), other.into_iter());
    loop {
        match (first.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Socket options of every link between frps and frpc (control, data and
/// tunnel connections): `TCP_NODELAY` (requests and events go out at once),
/// TCP keepalive ([`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`],
/// [`KEEPALIVE_RETRIES`]) and, on Linux, `TCP_USER_TIMEOUT` of
/// [`LINK_USER_TIMEOUT`].
pub fn tune_link(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(LINK_USER_TIMEOUT))?;
    Ok(())
}

/// Takes [`LINK_USER_TIMEOUT`] off frpc's end of a data connection once it
/// carries a request: from then on a window held shut is a slow reader (a
/// caller reading a stream slowly), which frps's own timers judge
/// (`--keepalive-timeout`, `--upstream-idle-timeout`), not a path gone
/// silent. Keepalive stays.
pub fn release_user_timeout(tcp: &TcpStream) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket2::SockRef::from(tcp).set_tcp_user_timeout(None)?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
    Ok(())
}

/// How long a link may go without any acknowledgement from its peer, while
/// it has bytes to deliver, before [`path_gone_silent`] calls the path dead.
/// Above the longest gap between the kernel's zero-window probes (its
/// `TCP_RTO_MAX`, 120 s): a live peer that keeps its window shut (frps
/// relaying to a caller who reads slowly, or not for a while) answers each
/// probe within it. For the end of a link that dropped
/// [`LINK_USER_TIMEOUT`] ([`release_user_timeout`]): without either, the
/// kernel retransmits into a dead path for about 15 minutes.
pub const SILENT_PATH_LIMIT: Duration = Duration::from_secs(180);

/// How often [`path_gone_silent`] looks.
pub const SILENT_PATH_CHECK: Duration = Duration::from_secs(15);

/// What the kernel says of the path under a TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathState {
    /// Bytes in the send queue: sent and not yet acknowledged, or not sent
    /// yet (the peer's window is shut).
    pub queued: usize,
    /// Time since the last acknowledgement from the peer (of data, or of a
    /// window or keepalive probe).
    pub since_ack: Duration,
}

impl PathState {
    /// Whether the path looks dead at this look: bytes to deliver and no
    /// acknowledgement for `limit`. Nothing queued is an idle link, which
    /// keepalive judges. One look is not enough ([`path_gone_silent`]
    /// wants two in a row): the kernel stamps only acknowledgements that
    /// move something, so while frps sends and frpc has nothing to send,
    /// the stamp goes stale, and an answer written then reads as silent
    /// until its acknowledgement comes back one round trip later.
    pub fn is_silent(&self, limit: Duration) -> bool {
        self.queued > 0 && self.since_ack >= limit
    }
}

/// Reads [`PathState`] of the TCP socket `fd` (Linux only; elsewhere an
/// `Unsupported` error).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn path_state(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<PathState> {
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is a valid descriptor for the call (borrowed), and
    // TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let info = tcp_info(fd)?;
    Ok(PathState {
        queued: queued.max(0) as usize,
        since_ack: Duration::from_millis(info.tcpi_last_ack_recv.into()),
    })
}

/// The kernel's `TCP_INFO` of the TCP socket `fd`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn tcp_info(fd: std::os::fd::RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: an all-zero `tcp_info` is a valid value of the plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is open for the call (the callers borrow it), and the
    // kernel writes at most `len` bytes into `info`.
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Whether the peer of the TCP socket `fd` has closed or reset the
/// connection (it is no longer established), as the kernel knows without
/// a read: for a side that cannot read now (its bytes wait for someone
/// else) and must not miss the other side's end. Linux only; elsewhere
/// `Unsupported`.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn peer_gone(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // The states of the kernel's `tcp_states.h` reached once the peer's
    // FIN or RST arrived: TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING.
    // Not FIN_WAIT1/2: that is this side's own half-close, the peer still
    // there.
    const PEER_DONE: [u8; 5] = [6, 7, 8, 9, 11];
    Ok(PEER_DONE.contains(&tcp_info(fd.as_raw_fd())?.tcpi_state))
}

/// See the Linux version: not available here.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
pub fn path_state(_: std::os::fd::BorrowedFd<'_>) -> io::Result<PathState> {
    Err(io::ErrorKind::Unsupported.into())
}

/// See the Linux version: not available here.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
pub fn peer_gone(_: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Resolves once `read` says the path went silent ([`PathState::is_silent`]
/// for `limit`) at two looks in a row, looking every `every` (below
/// `limit`: an acknowledgement between the two looks would have reset the
/// time since one below it); never, if the state cannot be read (another
/// platform, a descriptor that is not TCP), since the kernel's own
/// retransmission limit still ends the link in the end. Returns the state
/// that decided.
pub async fn path_gone_silent(
    mut read: impl FnMut() -> io::Result<PathState>,
    limit: Duration,
    every: Duration,
) -> PathState {
    let mut silent_before = false;
    loop {
        tokio::time::sleep(every).await;
        match read() {
            Ok(state) if state.is_silent(limit) => {
                if silent_before {
                    return state;
                }
                silent_before = true;
            }
            Ok(_) => silent_before = false,
            Err(_) => return std::future::pending().await,
        }
    }
}

/// Binds a listener on `addr` as `TcpListener::bind` does (`SO_REUSEADDR`
/// on Unix, a backlog of 128) with `TCP_NODELAY` set before it listens, so
/// every socket it accepts starts with it: Linux copies the option from the
/// listening socket to each accepted one, which spares a `setsockopt` per
/// connection (a caller that opens a connection per request pays for every
/// one). Set before `listen`, not after: a connection whose handshake ends
/// in between would be queued without it. The flag says whether accepted
/// sockets have it from the listener; otherwise each must be set on its own.
pub fn listen_with_nodelay(
    addr: std::net::SocketAddr,
) -> io::Result<(tokio::net::TcpListener, bool)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    let inherited =
        cfg!(any(target_os = "linux", target_os = "android")) && socket.set_nodelay(true).is_ok();
    socket.bind(addr)?;
    Ok((socket.listen(128)?, inherited))
}

/// Makes closing `tcp` reset the connection (`SO_LINGER` 0) instead of
/// leaving the kernel to deliver what is queued: for a link given up as dead.
pub fn reset_on_close(tcp: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO))
}

/// Whether `tcp` carries exactly [`tune_link`]'s options (for tests and
/// diagnostics).
pub fn link_is_tuned(tcp: &TcpStream) -> io::Result<bool> {
    let sock = socket2::SockRef::from(tcp);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if sock.tcp_user_timeout()? != Some(LINK_USER_TIMEOUT) {
        return Ok(false);
    }
    Ok(tcp.nodelay()?
        && sock.keepalive()?
        && sock.tcp_keepalive_time()? == KEEPALIVE_IDLE
        && sock.tcp_keepalive_interval()? == KEEPALIVE_INTERVAL
        && sock.tcp_keepalive_retries()? == KEEPALIVE_RETRIES)
}

/// Most a refused peer's bytes are read before its connection is closed:
/// a request body of a few MiB (a prompt with images) is taken whole, so
/// its caller reads the refusal instead of a reset (at 64 KiB, before
/// 2026-12-05, it got the reset). The caller's deadline bounds the time.
pub const DRAIN_LIMIT: usize = 8 * 1024 * 1024;

/// Reads and drops what the peer still sends after a refusal was written,
/// until it closes or [`DRAIN_LIMIT`] bytes have come (the caller's
/// deadline bounds the time): closing with unread bytes makes the kernel
/// reset the connection, which can destroy the refusal before the peer has
/// read it.
pub async fn drain(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut sink = vec![0u8; 16 * 1024];
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match stream.read(&mut sink).await? {
            0 => break,
            n => read += n,
        }
    }
    Ok(())
}

/// A connection between frps and frpc (or a consumer), with or without TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, client or server side (boxed: rustls state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The underlying TCP socket (for socket options and addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for Stream {
    fn from(s: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(TlsStream::Server(s)))
    }
}

impl From<tokio_rustls::client::TlsStream<TcpStream>> for Stream {
    fn from(s: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(TlsStream::Client(s)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// First byte of a TLS handshake record (a ClientHello starts with it).
/// Frames never start with it: their 4-byte length is below 16 MiB, so their
/// first byte is 0.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn address_families_take_turns() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let got = families_alternating(vec![
            a("[::1]:1"),
            a("[::2]:1"),
            a("[::3]:1"),
            a("10.0.0.1:1"),
            a("10.0.0.2:1"),
        ]);
        let want = ["[::1]:1", "10.0.0.1:1", "[::2]:1", "10.0.0.2:1", "[::3]:1"];
        assert_eq!(got, want.map(a));
        let got = families_alternating(vec![a("10.0.0.1:1"), a("[::1]:1"), a("10.0.0.2:1")]);
        assert_eq!(got, ["10.0.0.1:1", "[::1]:1", "10.0.0.2:1"].map(a));
        assert!(families_alternating(Vec::new()).is_empty());
    }

    #[tokio::test]
    async fn an_address_that_drops_packets_does_not_hold_up_the_next() {
        // A listener whose accept queue is full drops further SYNs: a
        // connect to it hangs, as to an address a firewall drops.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dropping = socket.listen(0).unwrap();
        let silent = dropping.local_addr().unwrap();
        let _queued = TcpStream::connect(silent).await.unwrap();
        let hung =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(silent)).await;
        assert!(hung.is_err(), "the queue is full: connects hang");
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let to = good.local_addr().unwrap();
        for addrs in [
            vec![silent, to],
            vec![refused, silent, to],
            vec![refused, to],
        ] {
            let started = std::time::Instant::now();
            let tcp = tokio::time::timeout(
                Duration::from_secs(5),
                connect_first(addrs.clone(), Duration::from_millis(100)),
            )
            .await
            .unwrap_or_else(|_| panic!("{addrs:?}: stuck on the silent address"))
            .unwrap();
            assert_eq!(tcp.peer_addr().unwrap(), to, "{addrs:?}");
            // A refusal moves on at once; only the silent one waits its delay.
            let delays = addrs.iter().filter(|a| **a == silent).count() as u32;
            assert!(
                started.elapsed() < Duration::from_millis(100) * delays + Duration::from_secs(1),
                "{addrs:?}: {:?}",
                started.elapsed()
            );
        }
        let err = connect_first(vec![refused], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let err = connect_first(Vec::new(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let tcp = connect_any(&to.to_string()).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), to);
    }

    #[tokio::test]
    async fn links_get_nodelay_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        assert!(!link_is_tuned(&tcp).unwrap());
        tune_link(&tcp).unwrap();
        assert!(link_is_tuned(&tcp).unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket2::SockRef::from(&tcp).tcp_user_timeout().unwrap(),
            Some(LINK_USER_TIMEOUT)
        );
        assert_eq!(LINK_USER_TIMEOUT, Duration::from_secs(60));
        release_user_timeout(&tcp).unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket2::SockRef::from(&tcp).tcp_user_timeout().unwrap(),
            None
        );
        assert!(tcp.nodelay().unwrap(), "the rest stays");
    }

    #[tokio::test]
    async fn accepted_sockets_take_nodelay_from_their_listener() {
        let (l, inherited) = listen_with_nodelay("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(
            inherited,
            cfg!(any(target_os = "linux", target_os = "android"))
        );
        let (c, a) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let (_c, a) = (c.unwrap(), a.unwrap().0);
        assert_eq!(a.nodelay().unwrap(), inherited);
        // IPv6 too, where the machine has it.
        if let Ok((l6, inherited)) = listen_with_nodelay("[::1]:0".parse().unwrap()) {
            let (c, a) = tokio::join!(TcpStream::connect(l6.local_addr().unwrap()), l6.accept());
            let (_c, a) = (c.unwrap(), a.unwrap().0);
            assert_eq!(a.nodelay().unwrap(), inherited);
        }
        // A listener bound the usual way: accepted sockets without it.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, a) = tokio::join!(
            TcpStream::connect(plain.local_addr().unwrap()),
            plain.accept()
        );
        let (_c, a) = (c.unwrap(), a.unwrap().0);
        assert!(!a.nodelay().unwrap());
    }

    #[test]
    fn a_path_is_silent_only_with_bytes_to_deliver_and_no_ack_for_the_limit() {
        let limit = SILENT_PATH_LIMIT;
        let state = |queued, since_ack| PathState { queued, since_ack };
        assert!(state(1, limit).is_silent(limit));
        assert!(state(64 * 1024, limit * 2).is_silent(limit));
        // A peer answering probes (slow reader) or acknowledging data.
        assert!(!state(64 * 1024, limit - Duration::from_millis(1)).is_silent(limit));
        // Nothing to deliver: idle, keepalive's business.
        assert!(!state(0, limit * 10).is_silent(limit));
        assert!(
            SILENT_PATH_LIMIT > Duration::from_secs(120),
            "above the kernel's longest gap between window probes"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn path_state_reads_the_send_queue_of_a_live_peer_that_stops_reading() {
        use std::os::fd::AsFd;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let (a, _peer) = (a.unwrap(), b.unwrap().0);
        let idle = path_state(a.as_fd()).unwrap();
        assert_eq!(idle.queued, 0);
        // Fill the peer's window and our send buffer: the peer, alive,
        // acknowledges what it took and answers for the rest.
        let chunk = vec![7u8; 64 * 1024];
        loop {
            match a.try_write(&chunk) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let full = path_state(a.as_fd()).unwrap();
        assert!(full.queued > 0, "{full:?}");
        assert!(full.since_ack < Duration::from_secs(5), "{full:?}");
        assert!(!full.is_silent(SILENT_PATH_LIMIT));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_peer_that_closes_or_resets_is_seen_gone_without_a_read() {
        use std::os::fd::AsFd;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        for reset in [false, true] {
            let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
            let (a, peer) = (a.unwrap(), b.unwrap().0);
            assert!(!peer_gone(a.as_fd()).unwrap(), "a live peer");
            // This side's own half-close is not the peer leaving.
            let a = if reset {
                a
            } else {
                let a = a.into_std().unwrap();
                a.shutdown(std::net::Shutdown::Write).unwrap();
                let a = TcpStream::from_std(a).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!peer_gone(a.as_fd()).unwrap(), "only half-closed here");
                a
            };
            if reset {
                reset_on_close(&peer).unwrap();
            }
            drop(peer);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !peer_gone(a.as_fd()).unwrap() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "reset {reset}: never seen gone"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_resolves_at_the_second_silent_look_in_a_row_and_never_without_a_reading() {
        let limit = Duration::from_secs(180);
        let every = Duration::from_secs(15);
        let mut looks = 0u32;
        let started = tokio::time::Instant::now();
        // Acknowledgements stop at the start; bytes stay queued.
        let gone = path_gone_silent(
            || {
                looks += 1;
                Ok(PathState {
                    queued: 10,
                    since_ack: started.elapsed(),
                })
            },
            limit,
            every,
        )
        .await;
        // Silent at the 12th look (180 s), and still at the 13th.
        assert_eq!(gone.since_ack, limit + every);
        assert_eq!(started.elapsed(), limit + every);
        assert_eq!(looks, 13);
        // A stale stamp seen once (an answer written after a long upload,
        // its acknowledgement one round trip away) is not a dead path.
        let mut looks = 0u32;
        let stale_once = path_gone_silent(
            || {
                looks += 1;
                Ok(PathState {
                    queued: 10,
                    since_ack: if looks % 2 == 1 {
                        limit * 4
                    } else {
                        Duration::from_millis(20)
                    },
                })
            },
            limit,
            every,
        );
        assert!(
            tokio::time::timeout(limit * 10, stale_once).await.is_err(),
            "never resolves"
        );
        // A state that cannot be read: the watch never fires.
        let unreadable = path_gone_silent(|| Err(io::ErrorKind::Unsupported.into()), limit, every);
        assert!(
            tokio::time::timeout(limit * 10, unreadable).await.is_err(),
            "never resolves"
        );
    }

    #[tokio::test]
    async fn plain_streams_carry_bytes_both_ways_and_half_close() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        let mut a = Stream::from(a.unwrap());
        let mut b = Stream::from(b.unwrap().0);
        assert!(!a.is_tls());
        assert_eq!(a.tcp().peer_addr().unwrap(), addr);
        a.write_all(b"ping").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        b.write_all(b"pong").await.unwrap();
        drop(b);
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    #[tokio::test]
    async fn drain_reads_until_the_peer_closes_or_the_limit() {
        // A peer that closes after a little: all of it read, then done.
        let (mut near, mut far) = tokio::io::duplex(4096);
        far.write_all(b"leftover request bytes").await.unwrap();
        drop(far);
        drain(&mut near).await.unwrap();
        // A peer that never stops: done after DRAIN_LIMIT, the rest unread.
        let (mut near, mut far) = tokio::io::duplex(256 * 1024);
        let writer = tokio::spawn(async move {
            far.write_all(&vec![b'x'; DRAIN_LIMIT + 100_000])
                .await
                .unwrap();
            far
        });
        drain(&mut near).await.unwrap();
        let far = writer.await.unwrap();
        let mut rest = Vec::new();
        drop(far);
        near.read_to_end(&mut rest).await.unwrap();
        assert!(
            !rest.is_empty() && rest.len() <= 100_000 + 16 * 1024,
            "{}",
            rest.len()
        );
    }
}
