//! End-to-end tests: frps, frpc and backends in one process, on port 0.

mod auth;
mod resilience;
mod storage;
mod tunnel;
