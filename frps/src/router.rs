//! Which client serves a request: only clients that are online, healthy,
//! serving the requested model and below their capacity are eligible; among
//! them the `--balance` strategy chooses.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;
use rand::seq::IteratorRandom;

use crate::registry::{ClientHandle, Registry};

/// How to choose among eligible clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Balance {
    /// Uniformly at random (the prototype's behaviour).
    Random,
    /// Fewest requests in flight; ties broken at random.
    LeastConn,
    /// Power of two choices: the less loaded of two random clients.
    P2c,
}

/// What a request asks of its client.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want<'a> {
    /// Requested model, if the request names one.
    pub model: Option<&'a str>,
    /// Only this client (`X-Frpx-Client`).
    pub pinned: Option<&'a str>,
    /// Sessions that already failed this request.
    pub exclude: &'a [u64],
}

/// Why no client was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No client is online at all (or the pinned one is not).
    NoneOnline,
    /// Clients are online, none serves the model.
    NoModel,
    /// Clients serve the model but none can be tried: each already failed
    /// this request or is cooling down after failures.
    Unavailable,
    /// Clients could take the request but all are at capacity.
    AtCapacity,
}

/// Normalises a model name the way Ollama does: a name without a tag means
/// `:latest` (`llama3` is `llama3:latest`).
pub fn normalize(model: &str) -> std::borrow::Cow<'_, str> {
    match trim_and_tag(model) {
        (name, true) => std::borrow::Cow::Borrowed(name),
        (name, false) => std::borrow::Cow::Owned(format!("{name}:latest")),
    }
}

/// The name without surrounding blanks, and whether it carries a tag.
fn trim_and_tag(model: &str) -> (&str, bool) {
    let name = model.trim();
    // A tag is a `:` after the last `/` (registry hosts may carry ports).
    let last = name.rsplit('/').next().unwrap_or(name);
    (name, last.contains(':'))
}

/// Whether `name` normalises to `normalized` (a [`normalize`]d name),
/// without allocating.
pub fn names(name: &str, normalized: &str) -> bool {
    match trim_and_tag(name) {
        (name, true) => name == normalized,
        (name, false) => normalized.strip_suffix(":latest") == Some(name),
    }
}

/// Whether a box listing the model `listed` takes a request naming
/// `requested`. Ollama lists every model with its tag and takes a name
/// without one as `:latest`, so a listed name with a tag takes the request
/// as Ollama would (`llama3` for `llama3:latest`). A listed name without a
/// tag is another server's (vLLM, llama.cpp), which takes only the name as
/// it lists it: `llama3:latest` sent to a vLLM serving `llama3` was a 404.
pub fn listed_serves(listed: &str, requested: &str) -> bool {
    match trim_and_tag(listed) {
        (listed, true) => names(requested, listed),
        (listed, false) => requested.trim() == listed,
    }
}

/// The name `client` lists `model` under (as listed), if it serves it.
pub fn listed_name(client: &ClientHandle, model: &str) -> Option<String> {
    client.with_models(|models| {
        models
            .iter()
            .find(|m| listed_serves(&m.name, model))
            .map(|m| m.name.clone())
    })
}

/// Whether `client` reports `model`.
pub fn serves(client: &ClientHandle, model: &str) -> bool {
    client.with_models(|models| models.iter().any(|m| listed_serves(&m.name, model)))
}

/// Chooses a client for `want` with `balance`, reserving one of its
/// capacity slots; the caller gives it back with
/// [`ClientHandle::release_slot`].
pub fn pick(
    registry: &Registry,
    balance: Balance,
    want: Want<'_>,
) -> Result<Arc<ClientHandle>, NoPick> {
    registry.with_clients(|clients| {
        if let Some(id) = want.pinned {
            let Some(c) = clients.get(id).filter(|c| !c.kick.is_cancelled()) else {
                return Err(NoPick::NoneOnline);
            };
            if let Some(model) = want.model
                && !serves(c, model)
            {
                return Err(NoPick::NoModel);
            }
            // Pinned or not, a box that is down or cooling down is spared:
            // a caller pinning it cannot keep extending its cool-down.
            if want.exclude.contains(&c.session) || !c.is_routable(std::time::Instant::now()) {
                return Err(NoPick::Unavailable);
            }
            return if c.try_reserve() {
                Ok(c.clone())
            } else {
                Err(NoPick::AtCapacity)
            };
        }
        let online = || clients.values().filter(|c| !c.kick.is_cancelled());
        if online().next().is_none() {
            return Err(NoPick::NoneOnline);
        }
        let with_model = || online().filter(|c| want.model.is_none_or(|m| serves(c, m)));
        if with_model().next().is_none() {
            return Err(NoPick::NoModel);
        }
        let now = std::time::Instant::now();
        let routable: Vec<&Arc<ClientHandle>> = with_model()
            .filter(|c| !want.exclude.contains(&c.session) && c.is_routable(now))
            .collect();
        if routable.is_empty() {
            return Err(NoPick::Unavailable);
        }
        let mut eligible: Vec<&Arc<ClientHandle>> =
            routable.into_iter().filter(|c| c.has_capacity()).collect();
        // Reservation can race with another request: retry with the rest.
        while !eligible.is_empty() {
            let i = choose(&eligible, balance);
            let c = eligible.swap_remove(i);
            if c.try_reserve() {
                return Ok(c.clone());
            }
        }
        Err(NoPick::AtCapacity)
    })
}

/// How long a request for `want` refused with [`NoPick::Unavailable`]
/// should wait before it is tried again: the soonest end of the cool-downs
/// its clients are in, or `None` when one of them is unavailable for a
/// reason whose end frps cannot tell (its service reported down: the box's
/// next probe may find it back at any time; or it failed this request).
pub fn next_routable(registry: &Registry, want: Want<'_>) -> Option<std::time::Duration> {
    let now = std::time::Instant::now();
    registry.with_clients(|clients| {
        let mut soonest: Option<std::time::Duration> = None;
        let candidates = clients.values().filter(|c| {
            !c.kick.is_cancelled()
                && want.pinned.is_none_or(|id| c.id == id)
                && want.model.is_none_or(|m| serves(c, m))
        });
        for c in candidates {
            if want.exclude.contains(&c.session) || !c.is_healthy() {
                return None;
            }
            let left = c.cooling_left(now)?;
            soonest = Some(soonest.map_or(left, |s| s.min(left)));
        }
        soonest
    })
}

fn load(c: &ClientHandle) -> usize {
    c.in_flight.load(Ordering::Relaxed)
}

fn choose(eligible: &[&Arc<ClientHandle>], balance: Balance) -> usize {
    let mut rng = rand::rng();
    match balance {
        Balance::Random => rng.random_range(0..eligible.len()),
        Balance::LeastConn => {
            let min = eligible.iter().map(|c| load(c)).min().unwrap_or(0);
            (0..eligible.len())
                .filter(|&i| load(eligible[i]) == min)
                .choose(&mut rng)
                .unwrap_or(0)
        }
        Balance::P2c => {
            let n = eligible.len();
            let a = rng.random_range(0..n);
            if n == 1 {
                return a;
            }
            // Two different clients: drawn twice from all, one would be
            // compared with itself (with two clients, half the time).
            let b = (a + rng.random_range(1..n)) % n;
            if load(eligible[b]) < load(eligible[a]) {
                b
            } else {
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_listings_take_only_their_own_name() {
        // Ollama's (tagged) take the name with or without `:latest`.
        assert!(listed_serves("llama3:latest", "llama3"));
        assert!(listed_serves("llama3:latest", "llama3:latest"));
        assert!(listed_serves("llama3:latest", " llama3 "));
        assert!(!listed_serves("llama3:8b", "llama3"));
        // vLLM's or llama.cpp's (untagged) take only the name as listed.
        assert!(listed_serves("llama3", "llama3"));
        assert!(listed_serves("llama3", " llama3"));
        assert!(!listed_serves("llama3", "llama3:latest"));
        assert!(listed_serves(
            "meta-llama/Llama-3-8B",
            "meta-llama/Llama-3-8B"
        ));
        assert!(!listed_serves(
            "meta-llama/Llama-3-8B",
            "meta-llama/Llama-3-8B:latest"
        ));
        // A registry host's port is no tag.
        assert!(!listed_serves(
            "registry:5000/team/model",
            "registry:5000/team/model:latest"
        ));
        assert!(listed_serves(
            "registry:5000/team/model:latest",
            "registry:5000/team/model"
        ));
    }
    use crate::registry::testing::add;
    use std::collections::{HashMap, HashSet};

    fn want(model: Option<&str>) -> Want<'_> {
        Want {
            model,
            ..Default::default()
        }
    }

    #[test]
    fn names_normalise_like_ollama() {
        assert_eq!(normalize("llama3"), "llama3:latest");
        for (name, other) in [
            ("llama3", "llama3:latest"),
            (" llama3 ", "llama3"),
            ("llama3:8b", "llama3:latest"),
            (
                "registry:5000/team/model",
                "registry:5000/team/model:latest",
            ),
            ("registry:5000/team/model:v2", "registry:5000/team/model"),
            ("a", "b:latest"),
            ("", ":latest"),
        ] {
            for (a, b) in [(name, other), (other, name), (name, name)] {
                assert_eq!(
                    names(a, &normalize(b)),
                    normalize(a) == normalize(b),
                    "{a} / {b}"
                );
            }
        }
        assert_eq!(normalize("llama3:latest"), "llama3:latest");
        assert_eq!(normalize("qwen2.5:1.5b"), "qwen2.5:1.5b");
        assert_eq!(
            normalize("registry:5000/team/model"),
            "registry:5000/team/model:latest"
        );
        assert_eq!(
            normalize("meta-llama/Llama-3-8B"),
            "meta-llama/Llama-3-8B:latest"
        );
    }

    #[test]
    fn only_clients_with_the_model_are_chosen() {
        let reg = Registry::default();
        assert_eq!(
            pick(&reg, Balance::LeastConn, want(None)).unwrap_err(),
            NoPick::NoneOnline
        );
        add(&reg, "a", &["llama3:latest"], None);
        add(&reg, "b", &["qwen2.5:1.5b"], None);
        for _ in 0..50 {
            let c = pick(&reg, Balance::Random, want(Some("llama3"))).unwrap();
            assert_eq!(c.id, "a");
            c.release_slot();
        }
        assert_eq!(
            pick(&reg, Balance::Random, want(Some("mistral"))).unwrap_err(),
            NoPick::NoModel
        );
        let pinned = Want {
            pinned: Some("b"),
            ..Default::default()
        };
        assert_eq!(pick(&reg, Balance::Random, pinned).unwrap().id, "b");
        let gone = Want {
            pinned: Some("zz"),
            ..Default::default()
        };
        assert_eq!(
            pick(&reg, Balance::Random, gone).unwrap_err(),
            NoPick::NoneOnline
        );
    }

    #[test]
    fn least_conn_spreads_and_capacity_is_respected() {
        let reg = Registry::default();
        for id in ["a", "b", "c"] {
            add(&reg, id, &["m"], Some(1));
        }
        let held: Vec<_> = (0..3)
            .map(|_| pick(&reg, Balance::LeastConn, want(Some("m"))).unwrap())
            .collect();
        let ids: HashSet<_> = held.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 3, "one per box");
        assert_eq!(
            pick(&reg, Balance::LeastConn, want(Some("m"))).unwrap_err(),
            NoPick::AtCapacity
        );
        held[1].release_slot();
        assert_eq!(
            pick(&reg, Balance::LeastConn, want(Some("m"))).unwrap().id,
            held[1].id
        );
    }

    #[test]
    fn every_strategy_reaches_every_client() {
        for balance in [Balance::Random, Balance::LeastConn, Balance::P2c] {
            let reg = Registry::default();
            for id in ["a", "b", "c"] {
                add(&reg, id, &[], None);
            }
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..300 {
                let c = pick(&reg, balance, want(None)).unwrap();
                *seen.entry(c.id.clone()).or_default() += 1;
                c.release_slot();
            }
            assert_eq!(seen.len(), 3, "{balance:?}: {seen:?}");
        }
    }

    #[test]
    fn power_of_two_choices_compares_two_different_clients() {
        let reg = Registry::default();
        let busy = add(&reg, "busy", &[], None);
        let idle = add(&reg, "idle", &[], None);
        for _ in 0..5 {
            assert!(busy.try_reserve());
        }
        // Of two, the less loaded always: its pair is always the other.
        for _ in 0..200 {
            let c = pick(&reg, Balance::P2c, want(None)).unwrap();
            assert_eq!(c.id, "idle");
            c.release_slot();
        }
        drop(idle);
    }

    #[test]
    fn excluded_and_cooling_clients_are_skipped() {
        let reg = Registry::default();
        let a = add(&reg, "a", &[], None);
        let b = add(&reg, "b", &[], None);
        let exclude = [a.session];
        let w = Want {
            exclude: &exclude,
            ..Default::default()
        };
        for _ in 0..20 {
            let c = pick(&reg, Balance::Random, w).unwrap();
            assert_eq!(c.id, "b");
            c.release_slot();
        }
        b.record_failure();
        b.record_failure();
        assert_eq!(
            pick(&reg, Balance::Random, w).unwrap_err(),
            NoPick::Unavailable
        );
        b.record_success();
        assert_eq!(pick(&reg, Balance::Random, w).unwrap().id, "b");
    }

    /// A request refused because every box it may use is cooling down is
    /// told when the first of them comes back; one whose box is down (no
    /// end known) or failed it is told nothing (try soon).
    #[test]
    fn the_soonest_cool_down_end_is_when_to_come_back() {
        let reg = Registry::default();
        let a = add(&reg, "a", &["m"], None);
        let b = add(&reg, "b", &["m"], None);
        let other = add(&reg, "other", &["n"], None);
        let cool = |c: &ClientHandle, at_least: u64| loop {
            if c.record_failure().is_some_and(|d| d.as_secs() >= at_least) {
                break;
            }
        };
        cool(&a, 8);
        cool(&b, 16);
        let left = |w: Want<'_>| next_routable(&reg, w).map(|d| d.as_secs_f64());
        let m = want(Some("m"));
        let soonest = left(m).unwrap();
        assert!((7.0..=8.0).contains(&soonest), "{soonest}");
        let pinned = Want {
            pinned: Some("b"),
            ..m
        };
        let b_left = left(pinned).unwrap();
        assert!((15.0..=16.0).contains(&b_left), "{b_left}");
        // `other` serves no `m`: not counted; on its own it is routable.
        assert!(left(want(Some("n"))).is_none());
        // A box whose service is down may be back at its next probe.
        a.set_service_up(false);
        assert!(left(m).is_none());
        a.set_service_up(true);
        // One that failed this request is no better in 8 s.
        let exclude = [a.session];
        let excluding = Want {
            exclude: &exclude,
            ..m
        };
        assert!(left(excluding).is_none());
        // Its cool-down over, a box is no reason to wait.
        a.record_success();
        assert!(left(m).is_none());
        drop(other);
    }
}
