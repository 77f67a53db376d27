//! Pairing of requested data connections with the dial-backs that answer them.
//!
//! frps asks a client to open a connection (`OpenConnection { conn_id }`) and
//! waits here; the proxy listener hands over the client's connection when a
//! `DataHello` with that id and the client's session key arrives. A waiter
//! that gives up (timeout, caller gone) removes its entry when dropped, so
//! nothing lingers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Stream;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::auth::constant_time_eq;
use crate::registry::ClientHandle;

/// Why a pairing did not produce a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// The client did not dial back in time.
    #[error("client did not dial back within {0:?}")]
    Timeout(Duration),
    /// The client reported it could not open the connection.
    #[error("client could not open a connection: {0}")]
    Failed(String),
    /// A server plugin refused the data connection (or could not be
    /// asked): the operator's word on this connection, not the box failing.
    #[error("a server plugin refused the data connection: {0}")]
    Refused(String),
    /// The pairing was dropped (client gone, server shutting down).
    #[error("pairing cancelled")]
    Cancelled,
    /// The client already has `--max-pending-per-client` dial-backs outstanding.
    #[error("client has {0} dial-backs outstanding")]
    TooMany(usize),
}

struct Entry {
    client_id: String,
    session: u64,
    session_key: String,
    since: std::time::Instant,
    tx: oneshot::Sender<Result<Stream, PairError>>,
}

/// Pending pairings, keyed by connection id.
#[derive(Default)]
pub struct Pending {
    entries: Mutex<Entries>,
    /// Connection ids whose dial-back arrived and waits for the server
    /// plugins' `NewWorkConn` decision ([`Pending::deciding`]), and when
    /// it arrived.
    deciding: Mutex<HashMap<Uuid, std::time::Instant>>,
}

/// Marks a dial-back as waiting for the plugins' decision while it lives.
pub struct Deciding<'a> {
    pending: &'a Pending,
    conn_id: Uuid,
}

impl Drop for Deciding<'_> {
    fn drop(&mut self) {
        self.pending
            .deciding
            .lock()
            .expect("deciding lock")
            .remove(&self.conn_id);
    }
}

/// The pairings, and how many each session has (counted as they come and
/// go: a count by scanning every client's pairings, under the lock every
/// dial-back takes, cost a whole fleet's worth per request).
#[derive(Default)]
struct Entries {
    by_id: HashMap<Uuid, Entry>,
    per_session: HashMap<u64, usize>,
}

impl Entries {
    fn outstanding(&self, session: u64) -> usize {
        self.per_session.get(&session).copied().unwrap_or(0)
    }

    fn insert(&mut self, conn_id: Uuid, entry: Entry) {
        *self.per_session.entry(entry.session).or_default() += 1;
        if let Some(replaced) = self.by_id.insert(conn_id, entry) {
            // Random ids do not repeat; were one to, it is counted once.
            self.forget(replaced.session);
        }
    }

    fn remove(&mut self, conn_id: &Uuid) -> Option<Entry> {
        let entry = self.by_id.remove(conn_id)?;
        self.forget(entry.session);
        Some(entry)
    }

    fn forget(&mut self, session: u64) {
        if let std::collections::hash_map::Entry::Occupied(mut n) = self.per_session.entry(session)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("len", &self.len()).finish()
    }
}

/// A registered pairing; dropping it withdraws the pairing.
pub struct Waiter {
    /// The connection id to send in `OpenConnection`.
    pub conn_id: Uuid,
    pending: Arc<Pending>,
    rx: oneshot::Receiver<Result<Stream, PairError>>,
}

impl Pending {
    /// Opens a pairing for a connection from `client`.
    /// Fails with [`PairError::TooMany`] when the client already has `max`
    /// pairings outstanding.
    pub fn register(
        self: &Arc<Self>,
        client: &ClientHandle,
        max: usize,
    ) -> Result<Waiter, PairError> {
        let conn_id = Uuid::new_v4();
        let (tx, rx) = oneshot::channel();
        let mut entries = self.lock();
        let outstanding = entries.outstanding(client.session);
        if outstanding >= max {
            return Err(PairError::TooMany(outstanding));
        }
        entries.insert(
            conn_id,
            Entry {
                client_id: client.id.clone(),
                session: client.session,
                session_key: client.session_key.clone(),
                since: std::time::Instant::now(),
                tx,
            },
        );
        drop(entries);
        Ok(Waiter {
            conn_id,
            pending: self.clone(),
            rx,
        })
    }

    /// Whether a pairing `conn_id` waits for a hello of `client_id` with
    /// `session_key`, as [`Pending::complete`] checks: `Err` says why not.
    /// Asked before the server plugins are (`NewWorkConn`): a box may not
    /// have them called for connections frps never asked for.
    pub fn expects(
        &self,
        conn_id: Uuid,
        client_id: &str,
        session_key: &str,
    ) -> Result<(), &'static str> {
        let entries = self.lock();
        let Some(entry) = entries.by_id.get(&conn_id) else {
            return Err("unknown or expired connection id");
        };
        if entry.client_id != client_id
            || !constant_time_eq(entry.session_key.as_bytes(), session_key.as_bytes())
        {
            return Err("connection id does not belong to this client session");
        }
        Ok(())
    }

    /// Hands `stream` to the waiter for `conn_id` if the hello proves it comes
    /// from the client the pairing was opened for. On refusal the stream comes
    /// back with the reason. A wrong proof leaves the pairing in place, so a
    /// forged hello cannot cancel a real one.
    pub fn complete(
        &self,
        conn_id: Uuid,
        client_id: &str,
        session_key: &str,
        stream: Stream,
    ) -> Result<(), (Stream, &'static str)> {
        if let Err(reason) = self.expects(conn_id, client_id, session_key) {
            return Err((stream, reason));
        }
        let mut entries = self.lock();
        let Some(entry) = entries.remove(&conn_id) else {
            // Withdrawn in between (its request gave up).
            return Err((stream, "unknown or expired connection id"));
        };
        drop(entries);
        entry.tx.send(Ok(stream)).map_err(|back| {
            let stream = back.expect("we sent Ok");
            (stream, "the request gave up waiting for this connection")
        })
    }

    /// Fails the pairing `conn_id` of session `session` with `reason`.
    pub fn fail(&self, conn_id: Uuid, session: u64, error: PairError) {
        let mut entries = self.lock();
        if entries
            .by_id
            .get(&conn_id)
            .is_some_and(|e| e.session == session)
        {
            let entry = entries.remove(&conn_id).expect("entry present");
            let _ = entry.tx.send(Err(error));
        }
    }

    /// Notes that the dial-back for `conn_id` arrived and the server
    /// plugins are deciding on it, until the guard is dropped: a wait that
    /// ends meanwhile is the plugins' doing ([`Pending::timed_out`]), not
    /// the box's.
    pub fn deciding(&self, conn_id: Uuid) -> Deciding<'_> {
        self.deciding
            .lock()
            .expect("deciding lock")
            .insert(conn_id, std::time::Instant::now());
        Deciding {
            pending: self,
            conn_id,
        }
    }

    /// Why the wait of `limit` for `conn_id`, ending now, ended without a
    /// connection: the box did not dial back ([`PairError::Timeout`]), or
    /// it did, at least `share` ago, and the server plugins had not decided
    /// on it yet ([`PairError::Refused`]: not the box's failure). A box
    /// that dialed back with less than `share` of the wait left was late
    /// itself.
    pub fn timed_out(&self, conn_id: Uuid, limit: Duration, share: Duration) -> PairError {
        let arrived = self
            .deciding
            .lock()
            .expect("deciding lock")
            .get(&conn_id)
            .copied();
        if arrived.is_some_and(|at| at.elapsed() >= share) {
            PairError::Refused(format!(
                "the server plugins did not decide on the client's data connection within {limit:?} (--connect-timeout)"
            ))
        } else {
            PairError::Timeout(limit)
        }
    }

    /// `(connection id, client id, waited so far)` of every waiting pairing.
    pub fn snapshot(&self) -> Vec<(Uuid, String, std::time::Duration)> {
        self.lock()
            .by_id
            .iter()
            .map(|(id, e)| (*id, e.client_id.clone(), e.since.elapsed()))
            .collect()
    }

    /// Number of pairings waiting for a dial-back from `session`.
    pub fn outstanding(&self, session: u64) -> usize {
        self.lock().outstanding(session)
    }

    /// Number of pairings waiting for a dial-back.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no pairing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().expect("pending lock")
    }
}

impl Waiter {
    /// Waits for the dial-back, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> Result<Stream, PairError> {
        match tokio::time::timeout(limit, &mut self.rx).await {
            Err(_) => Err(PairError::Timeout(limit)),
            Ok(Err(_)) => Err(PairError::Cancelled),
            Ok(Ok(res)) => res,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.conn_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use tokio::net::{TcpListener, TcpStream};

    fn client(reg: &Registry, id: &str) -> Arc<ClientHandle> {
        crate::registry::testing::add(reg, id, &[], None)
    }

    async fn stream() -> Stream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (s, _) = tokio::join!(TcpStream::connect(addr), l.accept());
        s.unwrap().into()
    }

    /// A dial-back that arrived while the plugins decide on it is not the
    /// box failing to dial back.
    #[test]
    fn a_wait_ended_while_plugins_decide_is_theirs() {
        let pending = Pending::default();
        let limit = Duration::from_secs(2);
        let none = Duration::ZERO;
        let id = Uuid::new_v4();
        assert_eq!(
            pending.timed_out(id, limit, none),
            PairError::Timeout(limit)
        );
        let deciding = pending.deciding(id);
        let other = Uuid::new_v4();
        assert_eq!(
            pending.timed_out(other, limit, none),
            PairError::Timeout(limit)
        );
        match pending.timed_out(id, limit, none) {
            PairError::Refused(why) => assert!(why.contains("did not decide"), "{why}"),
            e => panic!("{e:?}"),
        }
        // Dialed back too late for the plugins to have had their share:
        // the box's lateness.
        let hour = Duration::from_secs(3600);
        assert_eq!(
            pending.timed_out(id, limit, hour),
            PairError::Timeout(limit)
        );
        drop(deciding);
        assert_eq!(
            pending.timed_out(id, limit, none),
            PairError::Timeout(limit)
        );
        assert!(pending.deciding.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_pairing_expires_and_is_removed() {
        let reg = Registry::default();
        let pending = Arc::new(Pending::default());
        let c = client(&reg, "a");
        let mut w = pending.register(&c, 8).unwrap();
        assert_eq!(pending.len(), 1);
        let err = w.wait(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(err, PairError::Timeout(Duration::from_secs(10)));
        drop(w);
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn only_the_right_session_completes_a_pairing() {
        let reg = Registry::default();
        let pending = Arc::new(Pending::default());
        let a = client(&reg, "a");
        let mut w = pending.register(&a, 8).unwrap();
        let id = w.conn_id;
        assert!(pending.complete(id, "a", "key-b", stream().await).is_err());
        assert!(pending.complete(id, "b", "key-a", stream().await).is_err());
        assert!(
            pending
                .complete(Uuid::new_v4(), "a", "key-a", stream().await)
                .is_err()
        );
        assert_eq!(
            pending.len(),
            1,
            "forged hellos must not cancel the pairing"
        );
        assert!(pending.complete(id, "a", "key-a", stream().await).is_ok());
        assert!(w.wait(Duration::from_secs(5)).await.is_ok());
        assert!(pending.is_empty());
        assert!(pending.lock().per_session.is_empty());
    }

    #[test]
    fn outstanding_dial_backs_per_client_are_capped() {
        let reg = Registry::default();
        let pending = Arc::new(Pending::default());
        let a = client(&reg, "a");
        let b = client(&reg, "b");
        let held: Vec<_> = (0..3).map(|_| pending.register(&a, 3).unwrap()).collect();
        assert_eq!(pending.register(&a, 3).err(), Some(PairError::TooMany(3)));
        assert!(
            pending.register(&b, 3).is_ok(),
            "other clients are unaffected"
        );
        drop(held);
        assert!(pending.register(&a, 3).is_ok());
        // Pairings ended every way hand their place back.
        let mut ended: Vec<_> = (0..3).map(|_| pending.register(&a, 3).unwrap()).collect();
        pending.fail(ended[0].conn_id, a.session, PairError::Cancelled);
        drop(ended.remove(1));
        assert_eq!(pending.lock().outstanding(a.session), 1);
        let _more: Vec<_> = (0..2).map(|_| pending.register(&a, 3).unwrap()).collect();
        assert_eq!(pending.register(&a, 3).err(), Some(PairError::TooMany(3)));
        drop((ended, _more));
        assert!(
            pending.lock().per_session.is_empty(),
            "nothing left counted"
        );
    }

    #[tokio::test]
    async fn open_failed_reaches_the_waiter_at_once() {
        let reg = Registry::default();
        let pending = Arc::new(Pending::default());
        let a = client(&reg, "a");
        let mut w = pending.register(&a, 8).unwrap();
        pending.fail(
            w.conn_id,
            a.session + 1,
            PairError::Failed("wrong session".into()),
        );
        assert_eq!(pending.len(), 1);
        pending.fail(
            w.conn_id,
            a.session,
            PairError::Failed("connection refused".into()),
        );
        assert_eq!(
            w.wait(Duration::from_secs(5)).await.unwrap_err(),
            PairError::Failed("connection refused".into())
        );
    }
}
