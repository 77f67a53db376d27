//! Upstream HTTP/1.1 connections to a client's local service, through its
//! tunnel: reuse an idle one, else ask the client to dial back.

use std::sync::Mutex;

use bytes::Bytes;
use common::Command;
use http_body_util::{Either, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::listeners::public::CountedBody;
use crate::pending::PairError;
use crate::registry::ClientHandle;
use crate::state::State;

/// Body of a request sent upstream: buffered (routing read it) or streamed.
pub type UpBody = Either<Full<Bytes>, CountedBody>;

/// Sender half of one upstream connection.
pub type Sender = SendRequest<UpBody>;

/// Why no upstream connection could be had from a client.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Pairing failed (timeout, client-side failure, cancelled).
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The client's control connection is gone.
    #[error("client disconnected")]
    ClientGone,
    /// The HTTP handshake over the tunnel failed.
    #[error("tunnel handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl AcquireError {
    /// Whether the failure was the client not dialing back in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, AcquireError::Pair(PairError::Timeout(_)))
    }
}

/// Idle upstream connections of one client, most recently used last.
#[derive(Default)]
pub struct IdlePool {
    senders: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool")
            .field("len", &self.len())
            .finish()
    }
}

impl IdlePool {
    /// Takes the most recently used connection that is still open. It may
    /// still be finishing its previous exchange: await `ready()` before use.
    pub fn take(&self) -> Option<Sender> {
        let mut senders = self.senders.lock().expect("idle lock");
        while let Some(s) = senders.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Returns a connection for reuse, unless `max` are already idle.
    pub fn put(&self, sender: Sender, max: usize) {
        let mut senders = self.senders.lock().expect("idle lock");
        senders.retain(|s| !s.is_closed());
        if senders.len() < max {
            senders.push(sender);
        }
    }

    /// Number of idle connections.
    pub fn len(&self) -> usize {
        self.senders.lock().expect("idle lock").len()
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every idle connection.
    pub fn clear(&self) {
        self.senders.lock().expect("idle lock").clear();
    }
}

/// An upstream connection and whether it came from the idle pool.
pub struct Upstream {
    /// Where to send the request.
    pub sender: Sender,
    /// True when reused (a failure to send on it says nothing about the client).
    pub reused: bool,
}

/// Gets a connection to `client`'s local service: an idle one if ready, else
/// a new dial-back, waiting at most `--connect-timeout`.
pub async fn acquire(state: &State, client: &ClientHandle) -> Result<Upstream, AcquireError> {
    let timeout = state.config.connect_timeout;
    while let Some(mut sender) = client.idle.take() {
        if let Ok(Ok(())) = tokio::time::timeout(timeout, sender.ready()).await {
            return Ok(Upstream {
                sender,
                reused: true,
            });
        }
    }
    let mut waiter = state
        .pending
        .register(client, state.config.max_pending_per_client)?;
    let conn_id = waiter.conn_id;
    let dial = async {
        client
            .control_tx
            .send(Command::OpenConnection { conn_id })
            .await
            .map_err(|_| AcquireError::ClientGone)?;
        Ok::<_, AcquireError>(waiter.wait(timeout).await?)
    };
    let stream = tokio::select! {
        res = tokio::time::timeout(timeout, dial) => res.map_err(|_| PairError::Timeout(timeout))??,
        _ = client.kick.cancelled() => return Err(AcquireError::ClientGone),
    };
    let (mut sender, conn) = http1::Builder::new()
        .handshake::<_, UpBody>(TokioIo::new(stream))
        .await?;
    let stop = state.hard_stop.clone();
    let client_id = client.id.clone();
    tokio::spawn(async move {
        tokio::select! {
            res = conn => if let Err(e) = res {
                debug!(client = %client_id, "upstream connection ended: {e}");
            },
            _ = stop.cancelled() => {}
        }
    });
    sender.ready().await?;
    Ok(Upstream {
        sender,
        reused: false,
    })
}
