//! Engine supervision on the node: opening members, following the store, stop reasons.

use super::*;
use crate::engine::FileReplica;

/// A controller that refuses every renewal (the attachment has moved on).
struct Refusing;

#[async_trait]
impl Membership for Refusing {
    async fn remove_member(&self, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
    async fn renew_lease(&self) -> Result<Duration, String> {
        Err("the attachment has moved on".into())
    }
}

#[test]
fn stop_reasons_name_the_cause_and_the_volume() {
    assert_eq!(stop_reason("v1", EngineState::Serving), None);
    let fenced = stop_reason("v1", EngineState::Fenced).unwrap();
    assert!(
        fenced.contains("fenced by a newer attachment on another node")
            && fenced.contains("\"v1\""),
        "{fenced}"
    );
    let expired = stop_reason("v1", EngineState::LeaseExpired).unwrap();
    assert!(
        expired.contains("attachment lease expired") && expired.contains("\"v1\""),
        "{expired}"
    );
    assert!(gone_message("v1").contains("staged again"));
}

#[tokio::test]
async fn the_watcher_sees_an_engine_whose_lease_lapsed() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let data = dir.path().join("data");
    std::fs::File::create(&data).unwrap().set_len(size).unwrap();
    let member = FileReplica::open("r1", &data, size).unwrap();
    let config = EngineConfig {
        lease: Duration::from_millis(300),
        renew_interval: Duration::from_millis(50),
        ..EngineConfig::default()
    };
    let engine = Engine::with_config(
        "v1",
        size,
        vec![Arc::new(member)],
        Arc::new(Refusing),
        config,
    )
    .unwrap();
    let renewing = engine.clone();
    let lease = tokio::spawn(async move { renewing.keep_lease(std::future::pending()).await });
    let watcher = tokio::spawn(watch_engine(engine.clone(), Duration::from_millis(20)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!watcher.is_finished(), "the lease has not lapsed yet");
    let seen = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the watcher notices within the lease")
        .unwrap();
    assert_eq!(seen, EngineState::LeaseExpired);
    lease.abort();
}
