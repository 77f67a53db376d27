//! Key validation cost at each layer: in-process cache hit, Redis hit,
//! database hit. Run with `cargo bench -p frps --bench key_validation`.
//!
//! Uses PostgreSQL from `FRPX_TEST_DATABASE_URL` when set (else a temporary
//! SQLite file) and Redis from `FRPX_TEST_REDIS_URL` when set.

use std::time::{Duration, Instant};

use frps::auth::keys::{KeyCheck, KeyValidator};
use frps::auth::redis::RedisCache;
use frps::auth::secret;
use frps::store::Store;

fn per_op(total: Duration, n: u32) -> String {
    let ns = total.as_nanos() as f64 / n as f64;
    if ns < 1000.0 {
        format!("{ns:.0} ns")
    } else {
        format!("{:.1} µs", ns / 1000.0)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("FRPX_TEST_DATABASE_URL").unwrap_or_else(|_| {
        format!(
            "sqlite://{}/frpx-bench-{}.db",
            std::env::temp_dir().display(),
            uuid::Uuid::new_v4()
        )
    });
    let store = Store::connect(&url).await?;
    let (key, _) = KeyValidator::create(&store, Some("bench"), None).await?;
    let hash = secret::hash(&key);
    println!("| layer | per validation | backend |");
    println!("|---|---|---|");

    // In-process hit: the key is in the moka cache after the first check.
    let v = KeyValidator::new(None, Some(store.clone()), None);
    assert!(matches!(v.check(&key).await, KeyCheck::Valid(_)));
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        assert!(matches!(v.check(&key).await, KeyCheck::Valid(_)));
    }
    println!(
        "| in-process cache hit | {} | moka |",
        per_op(t.elapsed(), n)
    );

    // Redis hit: the layer's own lookup, as taken on an in-process miss.
    match std::env::var("FRPX_TEST_REDIS_URL") {
        Ok(redis_url) => {
            let prefix = format!("frpx-bench-{}:", uuid::Uuid::new_v4().simple());
            let redis =
                RedisCache::connect_now(&redis_url, &prefix, frps::auth::redis::Seal::random())
                    .await?;
            redis
                .set(
                    &hash,
                    frps::auth::redis::CachedKey {
                        expires_at: None,
                        limits: Default::default(),
                    },
                    chrono::Utc::now().timestamp(),
                )
                .await;
            let n = 5_000;
            let t = Instant::now();
            for _ in 0..n {
                assert!(redis.get(&hash).await.is_some());
            }
            println!("| Redis hit | {} | {redis_url} |", per_op(t.elapsed(), n));
            redis.revoke(&hash).await;
        }
        Err(_) => println!("| Redis hit | n/a (FRPX_TEST_REDIS_URL unset) | - |"),
    }

    // Database hit: the lookup taken when neither cache has the key.
    let n = 5_000;
    let t = Instant::now();
    for _ in 0..n {
        assert!(store.find_api_key(&key, &hash).await?.is_some());
    }
    println!(
        "| database hit | {} | {} |",
        per_op(t.elapsed(), n),
        store.backend()
    );
    store.close().await;
    Ok(())
}
