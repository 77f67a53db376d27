//! Proxy port: clients dial back here with a `DataHello`; the connection is
//! handed to the request waiting for it.

use std::net::SocketAddr;
use std::sync::Arc;

use common::{Command, MAX_FRAME, read_one_command};
use tokio::net::TcpStream;
use tracing::debug;

use crate::plugins::hooks;
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
                debug!(%peer, %conn_id, client = %client_id, "data connection refused by a server plugin: {reason}");
                (conn_id, reason)
            }
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
        Ok(other) => {
            let message = format!("expected DataHello, got {}", other.name());
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
