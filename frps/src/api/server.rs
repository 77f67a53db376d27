//! `/api/health`, `/api/stats`, `/api/connections`, `/api/config`, `/api/ports`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxState};
use axum::http::HeaderMap;

use super::types::{
    ClientConnections, ConfigView, Connections, ErrorCounts, Health, Page, Pending,
    PendingConnection, Ports, Stats,
};
use super::{ApiError, ApiResult, ApiState, Envelope, ok};
use crate::state::State;

/// Server health (no admin token needed): 200, or 503 once shutdown has
/// started (the public port refuses new connections while it drains), so a
/// probe that looks only at the status takes this frps out at once.
#[utoipa::path(get, path = "/api/health", tag = "server",
    responses(
        (status = 200, body = Envelope<Health>, description = "Serving"),
        (status = 503, body = Envelope<Health>, description = "Shutting down: the public port refuses new connections while in-flight requests finish (`status` is `shutting_down`)"),
    ))]
pub async fn health(
    AxState(state): ApiState,
) -> (axum::http::StatusCode, axum::Json<Envelope<Health>>) {
    let stopping = state.shutdown.is_cancelled();
    let h = Health {
        status: if stopping { "shutting_down" } else { "ok" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: state.started_at.elapsed().as_secs(),
        clients_online: state.registry.online_count(),
        pending_connections: state.pending.len(),
        database: state.store.backend().into(),
        redis: state.redis.as_ref().map(|r| r.is_healthy()),
    };
    if stopping {
        let mut answer = ok(h, "server is shutting down");
        answer.0.success = false;
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, answer);
    }
    (axum::http::StatusCode::OK, ok(h, "server is healthy"))
}

/// Request and connection statistics.
#[utoipa::path(get, path = "/api/stats", tag = "server",
    responses((status = 200, body = Envelope<Stats>)))]
pub async fn stats(AxState(state): ApiState) -> ApiResult<Stats> {
    let s = &state.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let clients = state.registry.online();
    let stats = Stats {
        uptime_secs: state.started_at.elapsed().as_secs(),
        requests_total: load(&s.requests),
        requests_per_client: clients
            .iter()
            .map(|c| (c.id.clone(), c.requests.load(Ordering::Relaxed)))
            .collect(),
        clients_online: clients.len(),
        active_connections: load(&s.public_connections),
        in_flight: clients
            .iter()
            .map(|c| c.in_flight.load(Ordering::Relaxed))
            .sum(),
        pending_connections: state.pending.len(),
        upstream_dial_backs: load(&s.upstream_dial_backs),
        upstream_streams: load(&s.upstream_streams),
        queue_depth: state
            .queues
            .depths_listed(&state.registry)
            .into_iter()
            .collect(),
        bytes_in: load(&s.bytes_in),
        bytes_out: load(&s.bytes_out),
        errors: ErrorCounts {
            auth_failures: load(&s.auth_failures),
            auth_unavailable: load(&s.auth_unavailable),
            no_client: load(&s.no_client),
            dial_timeouts: load(&s.dial_timeouts),
            upstream_errors: load(&s.upstream_errors),
            queue_rejections: load(&s.queue_rejections),
            rate_limited_rpm: load(&s.rate_limited_rpm),
            rate_limited_concurrency: load(&s.rate_limited_concurrency),
        },
    };
    Ok(ok(stats, "server statistics"))
}

/// Open connections, and per client a page of the registered clients (in
/// id order, as `/api/clients`: `?limit=&after=`, `Link` to the next).
#[utoipa::path(get, path = "/api/connections", tag = "server", params(Page),
    responses((status = 200, body = Envelope<Connections>),
        (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>)))]
pub async fn connections(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Result<(HeaderMap, Json<Envelope<Connections>>), ApiError> {
    let (headers, clients, more) =
        super::clients::page_of(&state, query, "/api/connections", |c| ClientConnections {
            id: c.id.clone(),
            remote_addr: c.remote_addr.to_string(),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            idle: c.idle.len(),
            tunnel: c.tunnel().is_some(),
        })?;
    let c = Connections {
        public_connections: state.stats.public_connections.load(Ordering::Relaxed),
        pending: state.pending.len(),
        clients,
    };
    Ok((headers, ok(c, &format!("current connections{more}"))))
}

/// Dial-backs requested and not yet arrived.
#[utoipa::path(get, path = "/api/connections/pending", tag = "server",
    responses((status = 200, body = Envelope<Pending>)))]
pub async fn pending(AxState(state): ApiState) -> ApiResult<Pending> {
    let pending: Vec<_> = state
        .pending
        .snapshot()
        .into_iter()
        .map(|(id, client, waited)| PendingConnection {
            conn_id: id.to_string(),
            client_id: client,
            waiting_ms: waited.as_millis() as u64,
        })
        .collect();
    Ok(ok(
        Pending {
            count: pending.len(),
            pending,
        },
        "pending connections",
    ))
}

fn ports(state: &State) -> Ports {
    Ports {
        control: state.addrs.control.port(),
        proxy: state.addrs.proxy.port(),
        public: state.addrs.public.port(),
        api: state.addrs.api.port(),
    }
}

/// The effective configuration, without secrets.
#[utoipa::path(get, path = "/api/config", tag = "server",
    responses((status = 200, body = Envelope<ConfigView>)))]
pub async fn config(AxState(state): ApiState) -> ApiResult<ConfigView> {
    let c = &state.config;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let view = ConfigView {
        ports: ports(&state),
        bind_addr: c.bind_addr.to_string(),
        api_bind: c.api_bind.to_string(),
        database: state.store.backend().into(),
        redis_configured: c.redis().is_some(),
        static_api_key: c.api_key.as_deref().is_some_and(|k| !k.is_empty()),
        admin_token: c.admin_token().is_some(),
        connect_timeout_ms: ms(c.connect_timeout),
        heartbeat_interval_ms: ms(c.heartbeat_interval),
        handshake_timeout_ms: ms(c.handshake_timeout),
        header_timeout_ms: ms(c.header_timeout),
        keepalive_timeout_ms: ms(c.keepalive_timeout),
        shutdown_timeout_ms: ms(c.shutdown_timeout),
        max_idle_per_client: c.max_idle_per_client,
        pool_idle_timeout_ms: ms(c.pool_idle_timeout),
        pool_idle_after_burst: c.pool_idle_after_burst,
        tunnel_mux: c.tunnel_mux,
        forward_paths: c.forward_paths.iter().map(ToString::to_string).collect(),
        token_ttl_secs: c.token_lifetime().map(|d| d.as_secs()),
    };
    Ok(ok(view, "server configuration (secrets omitted)"))
}

/// The bound ports.
#[utoipa::path(get, path = "/api/ports", tag = "server",
    responses((status = 200, body = Envelope<Ports>)))]
pub async fn ports_handler(AxState(state): ApiState) -> ApiResult<Ports> {
    Ok(ok(ports(&state), "bound ports"))
}
