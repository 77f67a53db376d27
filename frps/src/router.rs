//! Which client serves a request.

use std::sync::Arc;

use rand::seq::IteratorRandom;

use crate::registry::{ClientHandle, Registry};

/// Picks a live client at random (the seed's behaviour), skipping the
/// sessions in `exclude` (clients that already failed this request).
pub fn pick(registry: &Registry, exclude: &[u64]) -> Option<Arc<ClientHandle>> {
    registry.with_clients(|clients| {
        clients
            .values()
            .filter(|c| !exclude.contains(&c.session) && !c.kick.is_cancelled())
            .choose(&mut rand::rng())
            .cloned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewClient;
    use common::Registration;
    use std::collections::HashSet;
    use tokio::sync::mpsc;

    fn add(reg: &Registry, id: &str) -> Arc<ClientHandle> {
        let (tx, _rx) = mpsc::channel(1);
        reg.insert(NewClient {
            registration: Registration {
                client_id: id.into(),
                ..Default::default()
            },
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            control_tx: tx,
            owner: crate::auth::Principal {
                user_id: 1,
                email: "a@b".into(),
            },
            session_key: String::new(),
        })
    }

    #[test]
    fn random_pick_reaches_every_client_and_honours_exclusions() {
        let reg = Registry::default();
        assert!(pick(&reg, &[]).is_none());
        let a = add(&reg, "a");
        let b = add(&reg, "b");
        let c = add(&reg, "c");
        let seen: HashSet<_> = (0..200)
            .map(|_| pick(&reg, &[]).unwrap().id.clone())
            .collect();
        assert_eq!(seen.len(), 3);
        for _ in 0..50 {
            assert_eq!(pick(&reg, &[a.session, b.session]).unwrap().id, "c");
        }
        c.kick("test");
        assert!(pick(&reg, &[a.session, b.session]).is_none());
    }
}
