//! Helpers for `bench/run.sh`, the frpx benchmark (issue 7).
//!
//! One binary, `frpx-bench`, with a subcommand per job the script cannot do
//! with stock tools:
//! - [`backend`]: the Rust HTTP backend (small response, large download,
//!   server-sent events stamped with their send time);
//! - [`sse`]: the SSE caller, measuring write-to-read latency per event;
//! - [`load`]: a simple closed-loop load generator, used when wrk is absent;
//! - [`download`]: one timed download, used when curl is absent;
//! - [`clients`]: simulated frpc clients registered over the real protocol;
//! - [`idle`]: idle keep-alive connections to the public port;
//! - [`histogram`]: frps's gateway-overhead histogram from `/metrics`;
//! - [`probe`]: readiness polling and free-port picking.
//!
//! Every measuring subcommand prints one line of `key=value` pairs for the
//! script to parse, and every loop is bounded by a count and a deadline.

pub mod backend;
pub mod client;
pub mod clients;
pub mod download;
pub mod histogram;
pub mod idle;
pub mod load;
pub mod probe;
pub mod sse;
pub mod stats;
