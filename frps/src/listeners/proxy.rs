//! Proxy port: clients dial back here with a `DataHello`; the connection is
//! handed to the request waiting for it. A `MuxHello` makes the connection
//! its session's multiplexed tunnel connection instead.

use std::net::SocketAddr;
use std::sync::Arc;

use common::mux::{Mux, Role};
use common::{Command, MAX_FRAME, Stream, read_one_command};
use tokio::net::TcpStream;
use tracing::debug;
use uuid::Uuid;

use crate::plugins::hooks;
use crate::registry::ClientHandle;
use crate::state::State;

/// Pairs one dial-back connection, or refuses it.
pub async fn handle(stream: TcpStream, peer: SocketAddr, state: Arc<State>) {
    let hs = state.config.handshake_timeout;
    let mut stream = match state.tls.accept_frames(stream, hs).await {
        Ok(s) => s,
        Err(e) => return debug!(%peer, "data connection dropped: {e}"),
    };
    let (conn_id, reason) = match read_one_command(&mut stream, MAX_FRAME, hs).await {
        Ok(Command::DataHello {
            conn_id,
            client_id,
            session_key,
        }) => match hooks::new_work_conn(&state, conn_id, &client_id, &session_key).await {
            Err(reason) => {
                debug!(%peer, %conn_id, client = %client_id, "data connection refused (before or by the server plugins): {reason}");
                (conn_id, reason)
            }
            // frps's end keeps `TCP_USER_TIMEOUT`: it only sends requests,
            // and a request written into a path that died while the
            // connection sat in the pool fails after a minute instead of
            // waiting out `--upstream-idle-timeout`. frpc's end, which sends
            // answers to callers that may read slowly, drops it.
            Ok(()) => match state
                .pending
                .complete(conn_id, &client_id, &session_key, stream)
            {
                Ok(()) => return,
                Err((s, reason)) => {
                    stream = s;
                    debug!(%peer, %conn_id, client = %client_id, "data connection refused: {reason}");
                    (conn_id, reason.to_owned())
                }
            },
        },
        Ok(Command::MuxHello {
            client_id,
            session_key,
        }) => match tunnel(&state, &client_id, &session_key).await {
            Ok(client) => return serve_tunnel(stream, peer, state, client).await,
            Err(reason) => {
                debug!(%peer, client = %client_id, "tunnel connection refused: {reason}");
                (Uuid::nil(), reason)
            }
        },
        Ok(other) => {
            let mut message = format!("expected DataHello or MuxHello, got {}", other.name());
            if matches!(other, Command::Login { .. } | Command::LoginToken { .. }) {
                // A frpc whose --control-port names this port.
                message.push_str(
                    ": this is frps's proxy port, for data connections; --control-port must name its control port (17000 by default)",
                );
            }
            debug!(%peer, "{message}");
            let _ = tokio::time::timeout(
                hs,
                common::write_command(&mut stream, &Command::Error { message }),
            )
            .await;
            return;
        }
        Err(e) => {
            debug!(%peer, "bad data connection: {e}");
            return;
        }
    };
    let rejected = Command::DataRejected { conn_id, reason };
    let _ = tokio::time::timeout(hs, common::write_command(&mut stream, &rejected)).await;
}

/// The live session a `MuxHello` proves it belongs to, if frps offers
/// tunnel connections and no server plugin refuses it (`NewWorkConn`, asked
/// once for the tunnel connection).
async fn tunnel(
    state: &State,
    client_id: &str,
    session_key: &str,
) -> Result<Arc<ClientHandle>, String> {
    if !state.config.tunnel_mux {
        return Err("this server does not take tunnel connections".into());
    }
    let client = state
        .registry
        .proven(client_id, session_key)
        .ok_or("unknown client or wrong session key")?;
    hooks::new_work_conn(state, Uuid::nil(), client_id, session_key).await?;
    Ok(client)
}

/// Runs `client`'s tunnel connection until it ends, the session ends or
/// frps stops; upstream connections open streams on it meanwhile.
async fn serve_tunnel(
    mut stream: Stream,
    peer: SocketAddr,
    state: Arc<State>,
    client: Arc<ClientHandle>,
) {
    let hs = state.config.handshake_timeout;
    match tokio::time::timeout(
        hs,
        common::write_command(&mut stream, &Command::MuxAccepted),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return debug!(%peer, client = %client.id, "tunnel connection lost: {e}"),
        Err(_) => {
            return debug!(%peer, client = %client.id, "tunnel connection stalled in its handshake");
        }
    }
    let (mux, driver) = Mux::new(stream, Role::Opener);
    client.attach_tunnel(mux.clone());
    debug!(%peer, client = %client.id, "tunnel connection open");
    tokio::spawn(async move {
        let id = client.id.clone();
        let log = |res: std::io::Result<()>| match res {
            Ok(()) => debug!(client = %id, "tunnel connection closed"),
            Err(e) => debug!(client = %id, "tunnel connection failed: {e}"),
        };
        tokio::pin!(driver);
        tokio::select! {
            res = &mut driver => log(res),
            _ = client.kick.cancelled() => {
                // The session ended: no new streams, and those still
                // answering finish, as dial-back connections outlive
                // their session (until frps stops).
                client.detach_tunnel(&mux);
                tokio::select! {
                    res = &mut driver => log(res),
                    _ = mux.drained() => {}
                    _ = state.hard_stop.cancelled() => {}
                }
            }
            _ = state.hard_stop.cancelled() => {}
        }
        client.detach_tunnel(&mux);
        mux.close();
    });
}
