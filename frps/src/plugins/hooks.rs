//! Where frps asks its plugins. Every helper returns at once, building no
//! content, when no plugin handles its operation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::Registration;
use http::{Response, StatusCode};
use tracing::info;
use uuid::Uuid;

use super::content::{
    CloseProxyContent, LoginContent, NewProxyContent, NewUserConnContent, NewWorkConnContent,
    PingContent, UserInfo, now,
};
use super::{Op, PluginError, Plugins};
use crate::listeners::public::{PublicBody, error_response};
use crate::pending::PairError;
use crate::registry::ClientHandle;
use crate::state::State;

/// frp's `proxy_type` for every frpx client.
pub const PROXY_TYPE: &str = "http";

/// The `run_id` plugins see for a control session.
pub fn run_id(session: u64) -> String {
    session.to_string()
}

fn user_info(user: &str, metas: &super::content::Metas, session: u64) -> UserInfo {
    UserInfo {
        user: user.to_owned(),
        metas: metas.clone(),
        run_id: run_id(session),
    }
}

fn client_user(client: &ClientHandle) -> UserInfo {
    let reg = &client.registration;
    user_info(&reg.user, &reg.metas, client.session)
}

/// `Login`, then `NewProxy`, for a registration about to be accepted as
/// session `session`. Returns the registration as the plugins left it: a
/// modified `Login` may change the user, metas, hostname, os, arch and
/// version; a modified `NewProxy` may change the client id (`proxy_name`)
/// and the proxy metas.
pub async fn admit(
    plugins: &Plugins,
    mut reg: Registration,
    peer: SocketAddr,
    session: u64,
) -> Result<Registration, PluginError> {
    if plugins.handles(Op::Login) {
        let login = LoginContent {
            version: reg.version.clone(),
            hostname: reg.hostname.clone(),
            os: reg.os.clone(),
            arch: reg.arch.clone(),
            user: reg.user.clone(),
            timestamp: now(),
            privilege_key: String::new(),
            run_id: run_id(session),
            pool_count: 0,
            metas: reg.metas.clone(),
            client_address: as_frp_gives(peer),
        };
        let login = plugins.call(login).await?;
        reg.version = login.version;
        reg.hostname = login.hostname;
        reg.os = login.os;
        reg.arch = login.arch;
        reg.user = login.user;
        reg.metas = login.metas;
    }
    if plugins.handles(Op::NewProxy) {
        let proxy = NewProxyContent {
            user: user_info(&reg.user, &reg.metas, session),
            proxy_name: reg.client_id.clone(),
            proxy_type: PROXY_TYPE.into(),
            metas: reg.proxy_metas.clone(),
            ..Default::default()
        };
        let proxy = plugins.call(proxy).await?;
        if proxy.proxy_name != reg.client_id {
            info!(
                "server plugin renamed client '{}' to {:?}",
                reg.client_id,
                crate::listeners::public::shorten(&proxy.proxy_name, super::MAX_PLUGIN_TEXT)
            );
        }
        reg.client_id = proxy.proxy_name;
        reg.proxy_metas = proxy.metas;
    }
    Ok(reg)
}

/// `CloseProxy` for a registration [`admit`] accepted as session
/// `session`: its session ended, or it was refused after the plugins had
/// accepted its `NewProxy` (every `NewProxy` accepted gets its
/// `CloseProxy`). Notification only: failures are logged (by the plugin
/// layer) and otherwise ignored.
pub async fn close_proxy(plugins: &Plugins, reg: &Registration, session: u64) {
    if plugins.handles(Op::CloseProxy) {
        let content = CloseProxyContent {
            user: user_info(&reg.user, &reg.metas, session),
            proxy_name: reg.client_id.clone(),
        };
        plugins.notify(content).await;
    }
}

/// A control session's right to one `Ping` call at a time: see [`ping`].
#[derive(Debug, Default)]
pub struct PingSlot(Arc<AtomicBool>);

/// Frees a [`PingSlot`] when its call ends, however it ends.
struct PingInFlight(Arc<AtomicBool>);

impl Drop for PingInFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// `Ping` for a heartbeat, run beside the control session so a slow plugin
/// does not hold up its frames. A rejection (or failure) disconnects the
/// client with the reason. At most one call per session is in flight
/// (`slot`): a heartbeat arriving meanwhile is not shown to the plugins, so
/// a client sending heartbeats in a flood costs one call at a time.
pub fn ping(state: &Arc<State>, client: &Arc<ClientHandle>, slot: &PingSlot) {
    if !state.plugins.handles(Op::Ping) {
        return;
    }
    if slot.0.swap(true, Ordering::AcqRel) {
        return;
    }
    let in_flight = PingInFlight(slot.0.clone());
    let (state, client) = (state.clone(), client.clone());
    state.tasks.clone().spawn(async move {
        let _in_flight = in_flight;
        let content = PingContent {
            user: client_user(&client),
            timestamp: now(),
            privilege_key: String::new(),
        };
        tokio::select! {
            res = state.plugins.call(content) => {
                if let Err(e) = res {
                    client.kick(e.to_string());
                }
            }
            _ = client.kick.cancelled() => {}
            _ = state.hard_stop.cancelled() => {}
        }
    });
}

/// `NewWorkConn` for a data connection's hello. Only a hello that proves
/// its session (client id and session key), for a connection frps asked
/// that session for, is shown to plugins; with
/// plugins asked, any other is refused here, unpaired (a session replaced
/// a moment ago may still have a request waiting for its dial-back, which
/// must not be paired without the plugins' word; a forged hello must not
/// fail a real pairing either). On a plugin's refusal the waiting request
/// is failed at once (it fails over) and the reason is returned.
pub async fn new_work_conn(
    state: &State,
    conn_id: Uuid,
    client_id: &str,
    session_key: &str,
) -> Result<(), String> {
    if !state.plugins.handles(Op::NewWorkConn) {
        return Ok(());
    }
    let Some(client) = state.registry.proven(client_id, session_key) else {
        return Err("unknown client or wrong session key".to_owned());
    };
    // Nor is a dial-back frps is not waiting for: a box could have the
    // plugins called as often as it liked (taking the turns `NewUserConn`
    // waits for when both go to one address, or counted by an audit
    // plugin). The tunnel connection (`conn_id` nil) is asked for by no
    // pairing: one per session, proven above.
    if !conn_id.is_nil() {
        state.pending.expects(conn_id, client_id, session_key)?;
    }
    let content = NewWorkConnContent {
        user: client_user(&client),
        run_id: run_id(client.session),
        timestamp: now(),
        privilege_key: String::new(),
    };
    // A request whose wait ends while the plugins decide is failed as
    // theirs (not the box's: no cool-down, no 504 blaming it).
    let _deciding = state.pending.deciding(conn_id);
    match state.plugins.call(content).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let reason = e.to_string();
            state
                .pending
                .fail(conn_id, client.session, PairError::Refused(reason.clone()));
            Err(reason)
        }
    }
}

/// `NewUserConn` for a public request about to go to `client`.
pub async fn new_user_conn(
    plugins: &Plugins,
    client: &ClientHandle,
    caller: SocketAddr,
) -> Result<(), PluginError> {
    if !plugins.handles(Op::NewUserConn) {
        return Ok(());
    }
    let content = NewUserConnContent {
        user: client_user(client),
        proxy_name: client.id.clone(),
        proxy_type: PROXY_TYPE.into(),
        remote_addr: as_frp_gives(caller),
    };
    plugins.call(content).await.map(drop)
}

/// A peer's address as frp gives it to plugins: an IPv4 peer of a
/// dual-stack listener (`--bind-addr ::`) as IPv4 (`203.0.113.5:50000`, not
/// `[::ffff:203.0.113.5]:50000`, which a plugin written for frp would not
/// match against its IPv4 lists), as in X-Forwarded-For.
fn as_frp_gives(peer: SocketAddr) -> String {
    SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()
}

/// The public caller's answer when `NewUserConn` did not pass: 403 with the
/// plugin's reason, or 503 when a plugin could not decide (the cause is in
/// frps's log, not in the answer).
pub fn refusal(e: &PluginError) -> Response<PublicBody> {
    if e.is_rejection() {
        error_response(
            StatusCode::FORBIDDEN,
            &e.to_string(),
            "permission_error",
            "rejected_by_plugin",
        )
    } else {
        crate::listeners::public::retry_soon(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server could not check this request; retry later",
            "service_unavailable",
            "plugin_unavailable",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_peers_of_a_dual_stack_listener_are_given_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:203.0.113.5]:50000".parse().unwrap();
        assert_eq!(as_frp_gives(mapped), "203.0.113.5:50000");
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(as_frp_gives(v6), "[2001:db8::1]:443");
        let v4: SocketAddr = "127.0.0.1:7".parse().unwrap();
        assert_eq!(as_frp_gives(v4), "127.0.0.1:7");
    }
}
