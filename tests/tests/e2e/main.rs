//! End-to-end tests: frps, frpc and backends in one process, on port 0.

mod api;
mod auth;
mod bad_input;
mod faults;
mod mux;
mod plugins;
mod ratelimit;
mod resilience;
mod routing;
mod storage;
mod tls;
mod tunnel;
