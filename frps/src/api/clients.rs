//! `/api/clients`, `/api/monitoring`, `/api/models`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State as AxState};

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::HeaderMap;

use super::page::{Paged, finish, window};
use super::types::{
    ClientDetail, ClientStatus, ClientSummary, FleetModel, HeartbeatStatus, Monitoring, Page,
};
use super::{ApiError, ApiResult, ApiState, Envelope, ok};
use crate::listeners::control::is_client_id;
use crate::registry::ClientHandle;
use crate::state::State;

fn client(state: &State, id: &str) -> Result<Arc<ClientHandle>, ApiError> {
    state
        .registry
        .get_online(id)
        .ok_or_else(|| ApiError::no_client(id))
}

fn sorted(state: &State) -> Vec<Arc<ClientHandle>> {
    let mut all = state.registry.online();
    all.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    all
}

/// The page of registered clients, in id order, that `query` asks of the
/// listing at `path`, each shown by `show`; with the headers naming the
/// next page and the message's tail ([`finish`]).
pub(super) fn page_of<T>(
    state: &State,
    query: Result<Query<Page>, QueryRejection>,
    path: &str,
    show: impl Fn(&ClientHandle) -> T,
) -> Result<(HeaderMap, Vec<T>, String), ApiError> {
    let window = window(query, |after| is_client_id(after).then(|| after.to_owned()))?;
    let mut page = sorted(state);
    let start = window
        .after
        .as_deref()
        .map_or(0, |after| page.partition_point(|c| c.id.as_str() <= after));
    page.drain(..start);
    page.truncate(usize::try_from(window.limit).unwrap_or(usize::MAX));
    let (headers, more) = finish(path, window.limit, &mut page, |c| c.id.clone());
    Ok((headers, page.iter().map(|c| show(c)).collect(), more))
}

/// Registered clients, in id order.
#[utoipa::path(get, path = "/api/clients", tag = "clients", params(Page),
    responses((status = 200, body = Envelope<Vec<ClientSummary>>),
        (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>)))]
pub async fn list(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<ClientSummary> {
    let (headers, clients, more) = page_of(&state, query, "/api/clients", ClientSummary::of)?;
    let n = clients.len();
    Ok((headers, ok(clients, &format!("{n} client(s) online{more}"))))
}

/// One client in detail.
#[utoipa::path(get, path = "/api/clients/{id}", tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = Envelope<ClientDetail>), (status = 404, body = Envelope<String>)))]
pub async fn get(AxState(state): ApiState, Path(id): Path<String>) -> ApiResult<ClientDetail> {
    let c = client(&state, &id)?;
    let (system, age) = c.system_aged().unzip();
    let detail = ClientDetail {
        summary: ClientSummary::of(&c),
        local_host: c.registration.local_host.clone(),
        idle_connections: c.idle.len(),
        max_concurrency: c.registration.max_concurrency,
        model_details: c.models(),
        system,
        system_secs_ago: age.map(|a| a.as_secs_f64()),
    };
    Ok(ok(detail, "client found"))
}

/// Disconnects a client: it is told why and dropped; it may reconnect after
/// its backoff.
#[utoipa::path(delete, path = "/api/clients/{id}", tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = Envelope<String>), (status = 404, body = Envelope<String>)))]
pub async fn disconnect(AxState(state): ApiState, Path(id): Path<String>) -> ApiResult<String> {
    let c = client(&state, &id)?;
    c.kick("disconnected by an operator through the management API");
    Ok(ok(id.clone(), &format!("client '{id}' disconnected")))
}

/// Connection status of one client.
#[utoipa::path(get, path = "/api/clients/{id}/status", tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = Envelope<ClientStatus>), (status = 404, body = Envelope<String>)))]
pub async fn status(AxState(state): ApiState, Path(id): Path<String>) -> ApiResult<ClientStatus> {
    let c = client(&state, &id)?;
    let s = ClientStatus {
        id: c.id.clone(),
        status: super::types::status(&c).into(),
        healthy: c.is_healthy(),
        cooling_down_secs: super::types::cooling_down_secs(&c),
        failures: c.failures(),
        last_heartbeat_secs_ago: c.last_seen().elapsed().as_secs_f64(),
        in_flight: c.in_flight.load(std::sync::atomic::Ordering::Relaxed),
    };
    Ok(ok(s, "client status"))
}

/// Heartbeat status of one client.
#[utoipa::path(get, path = "/api/clients/{id}/heartbeat", tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = Envelope<HeartbeatStatus>), (status = 404, body = Envelope<String>)))]
pub async fn heartbeat(
    AxState(state): ApiState,
    Path(id): Path<String>,
) -> ApiResult<HeartbeatStatus> {
    let c = client(&state, &id)?;
    let interval = state.config.heartbeat_interval;
    let h = HeartbeatStatus {
        id: c.id.clone(),
        interval_ms: interval.as_millis() as u64,
        evict_after_ms: (interval * 3).as_millis() as u64,
        last_heartbeat_secs_ago: c.last_seen().elapsed().as_secs_f64(),
        heartbeats: c.heartbeats.load(std::sync::atomic::Ordering::Relaxed),
    };
    Ok(ok(h, "heartbeat status"))
}

fn monitoring_of(c: &ClientHandle) -> Monitoring {
    let (system, age) = c.system_aged().unzip();
    Monitoring {
        id: c.id.clone(),
        status: super::types::status(c).into(),
        system,
        system_secs_ago: age.map(|a| a.as_secs_f64()),
    }
}

/// System metrics of the registered clients, in id order.
#[utoipa::path(get, path = "/api/monitoring", tag = "monitoring", params(Page),
    responses((status = 200, body = Envelope<Vec<Monitoring>>),
        (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>)))]
pub async fn monitoring(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<Monitoring> {
    let (headers, all, more) = page_of(&state, query, "/api/monitoring", monitoring_of)?;
    Ok((
        headers,
        ok(all, &format!("system metrics of every client{more}")),
    ))
}

/// System metrics of one client.
#[utoipa::path(get, path = "/api/monitoring/{id}", tag = "monitoring",
    params(("id" = String, Path, description = "Client id")),
    responses((status = 200, body = Envelope<Monitoring>), (status = 404, body = Envelope<String>)))]
pub async fn monitoring_one(
    AxState(state): ApiState,
    Path(id): Path<String>,
) -> ApiResult<Monitoring> {
    let c = client(&state, &id)?;
    Ok(ok(monitoring_of(&c), "system metrics"))
}

/// Models across the fleet, in name order, and which clients serve each
/// (in id order); paged like the other listings, the cursor being the
/// page's last model name in hexadecimal (a name may hold any text).
#[utoipa::path(get, path = "/api/models", tag = "monitoring", params(Page),
    responses((status = 200, body = Envelope<Vec<FleetModel>>),
        (status = 400, description = "A page parameter (`limit`, `after`) that is not valid", body = Envelope<String>)))]
pub async fn models(
    AxState(state): ApiState,
    query: Result<Query<Page>, QueryRejection>,
) -> Paged<FleetModel> {
    let window = window(query, from_hex)?;
    let after = window.after.as_deref();
    let limit = usize::try_from(window.limit).unwrap_or(usize::MAX);
    // The page's models only: a small page of a large fleet holds no more.
    let mut by_name: BTreeMap<String, FleetModel> = BTreeMap::new();
    for c in sorted(&state) {
        for m in c.models() {
            if after.is_some_and(|after| m.name.as_str() <= after) {
                continue;
            }
            if by_name.len() >= limit && !by_name.contains_key(&m.name) {
                if by_name
                    .last_key_value()
                    .is_some_and(|(last, _)| m.name > *last)
                {
                    continue;
                }
                by_name.pop_last();
            }
            let entry = by_name.entry(m.name.clone()).or_insert_with(|| FleetModel {
                name: m.name.clone(),
                clients: Vec::new(),
                size: None,
            });
            entry.clients.push(c.id.clone());
            entry.size = entry.size.or(m.size);
        }
    }
    let mut models: Vec<_> = by_name.into_values().collect();
    let (headers, more) = finish("/api/models", window.limit, &mut models, |m| hex(&m.name));
    let n = models.len();
    Ok((
        headers,
        ok(models, &format!("{n} model(s) in the fleet{more}")),
    ))
}

/// `text`'s bytes in lower-case hexadecimal: a cursor of visible ASCII.
fn hex(text: &str) -> String {
    common::hex::encode(text.as_bytes())
}

/// The text [`hex`] gave `cursor`, if it is such a cursor.
fn from_hex(cursor: &str) -> Option<String> {
    String::from_utf8(common::hex::decode(cursor)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_cursors_are_hex_and_round_trip() {
        for name in ["llama3:latest", "qwen2.5/7b instruct", "modèle", ""] {
            let cursor = hex(name);
            assert!(cursor.bytes().all(|b| b.is_ascii_hexdigit()), "{cursor}");
            assert_eq!(from_hex(&cursor).as_deref(), Some(name));
        }
        assert_eq!(hex("a:"), "613a");
        for bad in ["6", "zz", "ff", "6g", "+1"] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
    }
}
