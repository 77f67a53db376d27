//! Data connections: on `OpenConnection`, connect the local service, dial the
//! proxy port, say hello, then join the two streams.

use std::sync::Arc;

use common::{Command, MAX_FRAME, Stream, join_streams, read_one_command, write_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::tls::Dialer;

/// What a data connection needs to prove it belongs to this session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Registered client id.
    pub client_id: String,
    /// Session key from `Registered`.
    pub session_key: String,
}

/// Opens data connection `conn_id`; failures before the join are reported to
/// frps through `control` as `OpenFailed` so it can fail over at once.
pub async fn open(
    config: Arc<Config>,
    dialer: Dialer,
    session: Arc<Session>,
    conn_id: Uuid,
    control: mpsc::Sender<Command>,
) {
    match connect(&config, &dialer, &session, conn_id).await {
        Ok((mut remote, mut local)) => {
            if let Err(e) = forward(&mut remote, &mut local, conn_id).await {
                debug!(%conn_id, "data connection ended: {e}");
            }
        }
        Err(reason) => {
            warn!(%conn_id, "cannot open data connection: {reason}");
            let _ = control.send(Command::OpenFailed { conn_id, reason }).await;
        }
    }
}

async fn connect(
    config: &Config,
    dialer: &Dialer,
    session: &Session,
    conn_id: Uuid,
) -> Result<(Stream, TcpStream), String> {
    let limit = config.connect_timeout;
    let local_host = config.local_host();
    let proxy_addr = config.proxy_addr();
    let local = async {
        tokio::time::timeout(limit, TcpStream::connect(&local_host))
            .await
            .map_err(|_| format!("local service {local_host} did not accept within {limit:?}"))?
            .map_err(|e| format!("local service {local_host} unreachable: {e}"))
    };
    let remote = async {
        dialer
            .connect(&proxy_addr, limit)
            .await
            .map_err(|e| format!("proxy port: {e}"))
    };
    let (local, mut remote) = tokio::try_join!(local, remote)?;
    let _ = local.set_nodelay(true);
    let hello = Command::DataHello {
        conn_id,
        client_id: session.client_id.clone(),
        session_key: session.session_key.clone(),
    };
    write_command(&mut remote, &hello)
        .await
        .map_err(|e| format!("cannot send hello to {proxy_addr}: {e}"))?;
    Ok((remote, local))
}

/// Joins `remote` and `local` once frps starts talking. Frames start with a
/// zero byte (their length is below 16 MiB) and HTTP never does, so a first
/// zero byte means frps refused the hello: read the refusal instead of
/// passing it to the local service. Otherwise that first byte goes to the
/// local service ahead of the rest.
async fn forward(remote: &mut Stream, local: &mut TcpStream, conn_id: Uuid) -> std::io::Result<()> {
    let mut first = [0u8; 1];
    if remote.read(&mut first).await? == 0 {
        return Ok(());
    }
    if first[0] == 0 {
        let mut frame = AsyncReadExt::chain(&first[..], &mut *remote);
        match read_one_command(&mut frame, MAX_FRAME, common::codec::HANDSHAKE_TIMEOUT).await {
            Ok(Command::DataRejected { reason, .. }) => {
                warn!(%conn_id, "frps refused the data connection: {reason}")
            }
            Ok(other) => warn!(%conn_id, "unexpected {} on a data connection", other.name()),
            Err(e) => warn!(%conn_id, "bad frame on a data connection: {e}"),
        }
        return Ok(());
    }
    local.write_all(&first).await?;
    let stats = join_streams(remote, local).await?;
    debug!(%conn_id, to_local = stats.a_to_b + 1, to_server = stats.b_to_a, "data connection closed");
    Ok(())
}
