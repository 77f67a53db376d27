//! Arbitrary bytes as one public-port connection, served by frps' real
//! public connection code ([`frps::listeners::public::serve_connection`]:
//! the listener's hyper settings, key check, model extraction, hop-by-hop
//! and `X-Forwarded-For` rewriting, routing) over an in-memory duplex.
//!
//! The server has the static key `fuzz-key`, an SQLite database in the
//! temporary directory and no client online, so authenticated requests end
//! in the router's refusal rather than in a tunnel. Checked per input:
//! nothing panics, the connection finishes within a few seconds once the
//! caller has sent everything and closed its side, and whatever comes back
//! is HTTP/1.1 (or HTTP/1.0, answering an HTTP/1.0 request).

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use frps::listeners::public::serve_connection;
use frps::server::BoundAddrs;
use frps::state::State;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest one input may keep the connection busy.
const PER_INPUT: Duration = Duration::from_secs(5);

/// The address every fuzzed connection appears to come from.
const PEER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7)),
    40000,
);

struct Harness {
    rt: tokio::runtime::Runtime,
    state: Arc<State>,
}

fn harness() -> Harness {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = std::env::temp_dir().join(format!("frpx-fuzz-http-head-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let config = frps::Config::ephemeral("fuzz-key", &format!("sqlite://{}", db.display()));
    let unbound: SocketAddr = ([127, 0, 0, 1], 0).into();
    let addrs = BoundAddrs {
        control: unbound,
        proxy: unbound,
        public: unbound,
        api: unbound,
    };
    let state = rt
        .block_on(State::new(config, addrs))
        .expect("frps state over SQLite");
    Harness {
        rt,
        state: Arc::new(state),
    }
}

thread_local! {
    static HARNESS: Harness = harness();
}

fuzz_target!(|input: &[u8]| {
    HARNESS.with(|h| {
        let out = h.rt.block_on(async {
            let (mut caller, server) = tokio::io::duplex(64 * 1024);
            let serve = serve_connection(h.state.clone(), server, PEER);
            let talk = async {
                // The server may close early (bad head): writes then fail,
                // which is an answer too.
                let _ = caller.write_all(input).await;
                let _ = caller.shutdown().await;
                let mut out = Vec::new();
                let _ = caller.read_to_end(&mut out).await;
                out
            };
            let both = async { tokio::join!(serve, talk) };
            match tokio::time::timeout(PER_INPUT, both).await {
                Ok((_served, out)) => out,
                Err(_) => panic!("connection still open {PER_INPUT:?} after the caller finished"),
            }
        });
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1.x answer: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    });
});
