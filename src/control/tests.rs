//! The controller's rules against the real embedded store and a real agent over disk
//! directories: resynchronisation, leases, interrupted replacements, stale replicas, rebuild
//! limits, scheduled space, capacity ranges.

use super::*;
use crate::model::{AccessMode, AccessType, Disk};
use crate::replica::agent::LocalAgent;
use crate::store::embedded::EmbeddedStore;
use std::time::Duration;

async fn controller(dir: &std::path::Path) -> Controller {
    controller_with(dir, ControllerConfig::default()).await
}

async fn controller_with(dir: &std::path::Path, config: ControllerConfig) -> Controller {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("db.redb")).unwrap());
    let mut disks = Vec::new();
    let mut paths = HashMap::new();
    for name in ["d0", "d1"] {
        let path = dir.join(name);
        let info = crate::replica::init_disk(&path).unwrap();
        paths.insert(info.id.clone(), path.clone());
        disks.push(Disk {
            id: info.id,
            path,
            tags: vec![],
            schedulable: true,
            storage_maximum: info.storage_maximum,
            storage_available: info.storage_available,
            storage_reserved: 0,
        });
    }
    let agent = Arc::new(LocalAgent::new("n1".into(), paths));
    // The test's disks are directories on the host's filesystem, whose free share is
    // not this test's business.
    let settings = Settings {
        storage_minimal_available_percentage: 0,
        ..Settings::default()
    };
    store
        .settings()
        .put(SETTINGS_KEY, settings, None)
        .await
        .unwrap();
    let c = Controller::new(store, agent, config);
    c.heartbeat(Node {
        id: "n1".into(),
        address: String::new(),
        agent_address: String::new(),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: 0,
        disks,
    })
    .await
    .unwrap();
    c
}

fn request(name: &str, size: u64) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        capacity: CapacityRange {
            required: size,
            limit: 0,
        },
        capabilities: vec![Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeWriter,
        }],
        parameters: HashMap::from([
            ("numberOfReplicas".to_string(), "2".to_string()),
            ("replicaSoftAntiAffinity".to_string(), "enabled".to_string()),
        ]),
        preferred_node: None,
        requisite: vec![],
    }
}

async fn from_store(c: &Controller) -> ScheduledSpace {
    let mut s = ScheduledSpace::default();
    for r in c.store.replicas().list().await.unwrap() {
        s.add(&r.value);
    }
    s
}

/// Fences every replica it is asked to.
struct Fences;

#[async_trait::async_trait]
impl crate::control::fence::Fencer for Fences {
    async fn fence(&self, _: &str, _: &str, _: &str, _: u64, _: &str) -> Result<(), String> {
        Ok(())
    }
}

async fn beat(c: &Controller, id: &str) {
    c.heartbeat(Node {
        id: id.into(),
        address: format!("{id}.test:9502"),
        agent_address: String::new(),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: 0,
        disks: if id == "n1" {
            c.store
                .nodes()
                .get("n1")
                .await
                .unwrap()
                .unwrap()
                .value
                .disks
                .clone()
        } else {
            vec![]
        },
    })
    .await
    .unwrap();
}

/// An engine that starts after one that did not stop cleanly (it died, was fenced or
/// lost its lease, maybe with writes that reached some members and not others) finds one
/// member kept and the others marked rebuilding, to be rebuilt from it; after a clean stop
/// the next engine keeps every member. A clean stop of a superseded engine says nothing.
#[tokio::test]
async fn an_engine_after_an_unclean_stop_keeps_one_member_and_rebuilds_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let c = attached(dir.path(), &["v"]).await;
    let states = || async {
        let mut states: Vec<ReplicaState> = c
            .volume_replicas("v")
            .await
            .unwrap()
            .iter()
            .map(|r| r.value.state)
            .collect();
        states.sort_by_key(|s| format!("{s:?}"));
        states
    };
    let both = vec![ReplicaState::Ready, ReplicaState::Ready];

    // The first engine has nothing to repair, and stops cleanly.
    c.start_engine("v", "n1", 1).await.unwrap();
    assert_eq!(states().await, both);
    c.engine_stopped_cleanly("v", "n1", 1).await.unwrap();
    c.release_lease("v", "n1", 1).await.unwrap();
    // So does the next one, which then dies.
    c.start_engine("v", "n1", 1).await.unwrap();
    assert_eq!(states().await, both);
    // The one after it (the volume staged again) keeps one member.
    c.start_engine("v", "n1", 1).await.unwrap();
    assert_eq!(
        states().await,
        vec![ReplicaState::Ready, ReplicaState::Rebuilding]
    );
    // Starting again keeps the same one: nothing else is ready.
    c.start_engine("v", "n1", 1).await.unwrap();
    assert_eq!(
        states().await,
        vec![ReplicaState::Ready, ReplicaState::Rebuilding]
    );
    // A superseded engine's clean stop is ignored; the current one still runs.
    c.engine_stopped_cleanly("v", "n1", 0).await.unwrap();
    assert!(
        c.store
            .volumes()
            .get("v")
            .await
            .unwrap()
            .unwrap()
            .value
            .engine_running
    );
}

/// The starting engine's node is alive whatever its heartbeat says: after an unclean
/// stop its own member is kept and the others are resynchronised even when that node's
/// heartbeat is late (they were left as they were, possibly different, before).
#[tokio::test]
async fn a_late_heartbeat_does_not_skip_the_resynchronisation() {
    let dir = tempfile::tempdir().unwrap();
    let c = attached(dir.path(), &["v"]).await;
    c.start_engine("v", "n1", 1).await.unwrap();
    // The engine dies; n1's heartbeat is late when the next one starts there.
    let node = c.store.nodes().get("n1").await.unwrap().unwrap();
    let mut late = (*node.value).clone();
    late.last_heartbeat_ms = 1;
    c.store
        .nodes()
        .put("n1", late, Some(node.version))
        .await
        .unwrap();
    c.start_engine("v", "n1", 1).await.unwrap();
    let mut states: Vec<String> = c
        .volume_replicas("v")
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{:?}", r.value.state))
        .collect();
    states.sort();
    assert_eq!(states, ["Ready", "Rebuilding"]);
}

/// A new attachment starts only once the lease the controller granted to the previous
/// one has lapsed (so a cut-off engine has stopped writing anywhere), unless that engine
/// gave it back; a superseded engine's renewals are refused.
#[tokio::test]
async fn a_new_attachment_waits_for_the_previous_lease_unless_released() {
    const LEASE_MS: u64 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig {
        heartbeat_timeout_ms: 200,
        termination_grace_ms: 0,
    };
    let c = controller_with(dir.path(), config)
        .await
        .with_fencing(Fencing {
            secret: Arc::new(vec![1; 32]),
            fencer: Arc::new(Fences),
            lease_ms: LEASE_MS,
        });
    let mut create = request("v", 8 << 20);
    create
        .parameters
        .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
    c.create_volume(create).await.unwrap();
    beat(&c, "n1").await;
    let cap = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    };
    let lease = Duration::from_millis(LEASE_MS);

    // Take-over from a node that went down after a renewal: waits out the lease.
    // The replicas are on n1; the engine runs on n2, which goes down after a renewal.
    beat(&c, "n2").await;
    c.publish("v", "n2", &cap, false).await.unwrap();
    c.renew_lease("v", "n2", 1).await.unwrap();
    let granted = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    beat(&c, "n1").await;
    c.publish("v", "n1", &cap, false).await.unwrap();
    assert!(
        granted.elapsed() >= lease + leases::LEASE_SLACK,
        "took over {:?} after the old engine's last renewal, within its lease",
        granted.elapsed()
    );
    let superseded = c.renew_lease("v", "n2", 1).await;
    assert!(
        matches!(superseded, Err(MemberError::Superseded { .. })),
        "{superseded:?}"
    );

    // The engine on n1 stops and gives its lease back: the next attachment is at once.
    beat(&c, "n1").await;
    beat(&c, "n2").await;
    c.renew_lease("v", "n1", 2).await.unwrap();
    c.release_lease("v", "n1", 2).await.unwrap();
    c.unpublish("v", "n1").await.unwrap();
    let started = std::time::Instant::now();
    let context = c.publish("v", "n2", &cap, false).await.unwrap();
    assert!(started.elapsed() < lease, "{:?}", started.elapsed());

    // Without the release, a clean detach and attach elsewhere still waits for it.
    let epoch: u64 = context[CONTEXT_EPOCH].parse().unwrap();
    c.renew_lease("v", "n2", epoch).await.unwrap();
    let granted = std::time::Instant::now();
    c.unpublish("v", "n2").await.unwrap();
    beat(&c, "n1").await;
    beat(&c, "n2").await;
    c.publish("v", "n1", &cap, false).await.unwrap();
    assert!(
        granted.elapsed() >= lease + leases::LEASE_SLACK,
        "{:?}",
        granted.elapsed()
    );

    // A take-over whose every member is on a down node moves nothing.
    beat(&c, "n1").await;
    c.renew_lease("v", "n1", epoch + 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    beat(&c, "n2").await;
    let refused = c.publish("v", "n2", &cap, false).await;
    assert!(
        matches!(refused, Err(PublishError::Unfenceable { .. })),
        "{refused:?}"
    );
}

/// Two controllers on one store (two replicas, or one before and after a restart): the
/// lease record on the volume is rewritten only when it does not cover a renewal or names
/// the other controller, and a controller that did not grant the last lease waits for the
/// record's bound, whatever its own memory says.
#[tokio::test]
async fn a_lease_granted_by_another_controller_is_waited_out_from_the_record() {
    const LEASE_MS: u64 = 600;
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig {
        heartbeat_timeout_ms: 200,
        termination_grace_ms: 0,
    };
    let fencing = Fencing {
        secret: Arc::new(vec![1; 32]),
        fencer: Arc::new(Fences),
        lease_ms: LEASE_MS,
    };
    let a = controller_with(dir.path(), config.clone())
        .await
        .with_fencing(fencing.clone());
    let b = Controller::new(a.store.clone(), a.agent.clone(), config).with_fencing(fencing);
    let mut create = request("v", 8 << 20);
    create
        .parameters
        .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
    a.create_volume(create).await.unwrap();
    let cap = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    };
    let version = || async { a.store.volumes().get("v").await.unwrap().unwrap().version };
    let record = || async {
        a.store
            .volumes()
            .get("v")
            .await
            .unwrap()
            .unwrap()
            .value
            .engine_lease
            .clone()
            .unwrap()
    };

    beat(&a, "n2").await;
    a.publish("v", "n2", &cap, false).await.unwrap();
    a.start_engine("v", "n2", 1).await.unwrap();
    let first = record().await;
    assert_eq!(
        (first.epoch, first.granter.as_str()),
        (1, a.leases.me.as_str())
    );
    let written = version().await;
    // Renewals with the controller the record names, within its bound: no write.
    for _ in 0..3 {
        a.renew_lease("v", "n2", 1).await.unwrap();
    }
    assert_eq!(
        version().await,
        written,
        "a covered renewal wrote the store"
    );
    // The engine's renewals move to the other controller: it takes the record over first.
    b.renew_lease("v", "n2", 1).await.unwrap();
    let taken = record().await;
    assert_eq!(taken.granter, b.leases.me);
    assert!(version().await > written);
    let granted = std::time::Instant::now();

    // n2 goes down; `a` takes over. Its memory says its last grant was a while ago, but `b`
    // granted since: it waits for the record's bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    beat(&a, "n1").await;
    a.publish("v", "n1", &cap, false).await.unwrap();
    let bound = taken.until_ms + leases::LEASE_SLACK.as_millis() as u64 + CLOCK_SKEW_MS;
    assert!(
        now_ms() >= bound,
        "took over {} ms before the bound of the lease the other controller granted",
        bound - now_ms()
    );
    assert!(granted.elapsed() >= Duration::from_millis(LEASE_MS));

    // A restarted controller (a new one on the same store) trusts no memory of its previous
    // life: the record names that one, so after a detach without the lease given back it
    // waits for the bound too.
    a.start_engine("v", "n1", 2).await.unwrap();
    let ours = record().await;
    assert_eq!(ours.granter, a.leases.me);
    let restarted = Controller::new(
        a.store.clone(),
        a.agent.clone(),
        ControllerConfig {
            heartbeat_timeout_ms: 200,
            termination_grace_ms: 0,
        },
    )
    .with_fencing(Fencing {
        secret: Arc::new(vec![1; 32]),
        fencer: Arc::new(Fences),
        lease_ms: LEASE_MS,
    });
    beat(&restarted, "n1").await;
    restarted.unpublish("v", "n1").await.unwrap();
    beat(&restarted, "n2").await;
    restarted.publish("v", "n2", &cap, false).await.unwrap();
    assert!(now_ms() >= ours.until_ms + leases::LEASE_SLACK.as_millis() as u64 + CLOCK_SKEW_MS);

    // Given back through either controller, nothing is waited for by anyone.
    restarted.start_engine("v", "n2", 3).await.unwrap();
    a.release_lease("v", "n2", 3).await.unwrap();
    assert!(record().await.released);
    beat(&b, "n2").await;
    restarted.unpublish("v", "n2").await.unwrap();
    beat(&b, "n1").await;
    let started = std::time::Instant::now();
    b.publish("v", "n1", &cap, false).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(LEASE_MS),
        "{:?}",
        started.elapsed()
    );
}

struct Hosts(std::sync::Mutex<HashMap<String, health::HostEvidence>>);

impl health::NodeEvidence for Hosts {
    fn host(&self, node_id: &str, _now_ms: u64) -> health::HostEvidence {
        let map = self.0.lock().unwrap();
        map.get(node_id)
            .copied()
            .unwrap_or(health::HostEvidence::Unknown)
    }
}

/// The controller decides health with the node evidence it is given: a vouched-for host
/// keeps a node with an expired heartbeat up for the confirmation period, NotReady alone
/// never takes a node with a fresh heartbeat down, and a second registration of a node id
/// is judged on the heartbeat alone.
#[tokio::test]
async fn node_health_follows_the_evidence_by_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig {
        heartbeat_timeout_ms: 300,
        termination_grace_ms: 0,
    };
    let hosts = Arc::new(Hosts(Default::default()));
    let c = controller_with(dir.path(), config)
        .await
        .with_node_evidence(hosts.clone(), 600);
    let set = |node: &str, e: health::HostEvidence| {
        hosts.0.lock().unwrap().insert(node.to_string(), e);
    };
    let up = || async {
        c.node_statuses()
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.node.id.clone(), s.up))
            .collect::<BTreeMap<_, _>>()
    };
    for n in ["n1", "n2", "n3"] {
        beat(&c, n).await;
    }
    set("n1", health::HostEvidence::NotReady);
    set("n2", health::HostEvidence::Alive);
    set("n3", health::HostEvidence::Alive);
    assert_eq!(c.host_evidence("n1"), health::HostEvidence::NotReady);
    let all = |n1, n2, n3| {
        BTreeMap::from([
            ("n1".to_string(), n1),
            ("n2".to_string(), n2),
            ("n3".to_string(), n3),
        ])
    };
    assert_eq!(
        up().await,
        all(true, true, true),
        "NotReady with a fresh heartbeat"
    );
    // Every heartbeat expired: n1 (NotReady) is down at once, the vouched-for ones later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up().await, all(false, true, true));
    // A second process registering n2 from another address is judged on the heartbeat
    // alone, which has expired: it may.
    let mut second = (*c.get_node("n2").await.unwrap().unwrap()).clone();
    second.agent_address = "elsewhere:1".into();
    c.register_node(second, &[]).await.unwrap();
    // Past the confirmation period, a vouched-for node is down all the same.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(up().await, all(false, true, false));
}

/// A replacement whose creation a crash interrupted (recorded `Creating`) is finished by
/// the next lifecycle pass; one its node cannot create is deleted, not piled up.
#[tokio::test]
async fn interrupted_replacements_are_finished_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let c = attached(dir.path(), &["v"]).await;
    let disk = c
        .store
        .nodes()
        .get("n1")
        .await
        .unwrap()
        .unwrap()
        .value
        .disks[0]
        .clone();
    let pending = |id: &str, disk_id: &str| Replica {
        id: id.into(),
        volume_id: "v".into(),
        node_id: "n1".into(),
        disk_id: disk_id.into(),
        path: Default::default(),
        size: 8 << 20,
        state: ReplicaState::Creating,
        failed_ms: 0,
        rebuilt_percent: None,
    };
    c.put_replica(pending("v-r-7", &disk.id), None)
        .await
        .unwrap();
    c.reconcile_replicas().await.unwrap();
    let finished = c
        .store
        .replicas()
        .get("v-r-7")
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(finished.state, ReplicaState::Rebuilding);
    assert!(
        finished.path.join(crate::replica::DATA_FILE).exists(),
        "{finished:?}"
    );

    c.put_replica(pending("v-r-8", "no-such-disk"), None)
        .await
        .unwrap();
    c.reconcile_replicas().await.unwrap();
    assert!(c.store.replicas().get("v-r-8").await.unwrap().is_none());
}

/// A controller with fencing, and volumes of 8 MiB with two replicas (on n1's two
/// disks) and a staleReplicaTimeout of 30 minutes, attached on n1.
async fn attached(dir: &std::path::Path, names: &[&str]) -> Controller {
    let c = controller(dir).await.with_fencing(Fencing {
        secret: Arc::new(vec![1; 32]),
        fencer: Arc::new(Fences),
        lease_ms: 1_000,
    });
    beat(&c, "n1").await;
    let cap = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    };
    for name in names {
        let mut request = request(name, 8 << 20);
        request
            .parameters
            .insert("staleReplicaTimeout".into(), "30".into());
        c.create_volume(request).await.unwrap();
        c.publish(name, "n1", &cap, false).await.unwrap();
    }
    c
}

/// Marks one replica of `volume` failed `ago_ms` ago; returns it.
async fn fail_one(c: &Controller, volume: &str, ago_ms: u64) -> Replica {
    let r = c.volume_replicas(volume).await.unwrap().remove(1);
    let mut failed = (*r.value).clone();
    failed.state = ReplicaState::Failed;
    failed.failed_ms = now_ms() - ago_ms;
    c.put_replica(failed.clone(), Some(&r)).await.unwrap();
    failed
}

async fn replica(c: &Controller, id: &str) -> Option<Replica> {
    let r = c.store.replicas().get(id).await.unwrap();
    r.map(|r| (*r.value).clone())
}

/// staleReplicaTimeout (30 minutes here): a failed replica older than that is
/// deleted, record and files, and replaced; a younger one whose node is up is reused —
/// grown first when the volume grew meanwhile, since its rebuild writes the new end.
#[tokio::test]
async fn stale_replicas_are_deleted_and_younger_ones_reused_at_the_volume_size() {
    let dir = tempfile::tempdir().unwrap();
    let c = attached(dir.path(), &["old", "young"]).await;
    let stale = fail_one(&c, "old", 31 * 60_000).await;
    let young = fail_one(&c, "young", 10_000).await;
    // The young replica's volume grows while it is failed: it is left as it was.
    c.expand(
        "young",
        CapacityRange {
            required: 16 << 20,
            limit: 0,
        },
    )
    .await
    .unwrap();
    let data = |r: &Replica| r.path.join(crate::replica::DATA_FILE);
    assert_eq!(std::fs::metadata(data(&young)).unwrap().len(), 8 << 20);
    assert_eq!(replica(&c, &young.id).await.unwrap().size, 8 << 20);

    c.reconcile_replicas().await.unwrap();

    assert!(
        replica(&c, &stale.id).await.is_none(),
        "the stale record: {:?}",
        replica(&c, &stale.id).await
    );
    assert!(!stale.path.exists(), "the stale replica's files");
    let replacement = c.volume_replicas("old").await.unwrap();
    assert!(
        replacement
            .iter()
            .any(|r| r.value.state == ReplicaState::Rebuilding && r.value.id != stale.id),
        "no replacement: {replacement:?}"
    );
    let reused = replica(&c, &young.id).await.unwrap();
    assert_eq!(reused.state, ReplicaState::Rebuilding);
    assert_eq!(reused.size, 16 << 20);
    assert_eq!(std::fs::metadata(data(&young)).unwrap().len(), 16 << 20);
}

/// concurrent-replica-rebuild-per-node-limit counts a node's rebuilds over every
/// volume: with a limit of 1, a second volume's rebuild waits for the first.
#[tokio::test]
async fn the_rebuild_limit_is_per_node_across_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let c = attached(dir.path(), &["a", "b"]).await;
    let current = c.store.settings().get(SETTINGS_KEY).await.unwrap().unwrap();
    let mut settings = (*current.value).clone();
    settings.concurrent_replica_rebuild_per_node_limit = 1;
    c.store
        .settings()
        .put(SETTINGS_KEY, settings, Some(current.version))
        .await
        .unwrap();
    let failed = [
        fail_one(&c, "a", 10_000).await,
        fail_one(&c, "b", 10_000).await,
    ];
    let states = || async {
        let mut states = Vec::new();
        for r in &failed {
            states.push(replica(&c, &r.id).await.unwrap().state);
        }
        states
    };

    c.reconcile_replicas().await.unwrap();
    c.reconcile_replicas().await.unwrap();
    let now = states().await;
    assert_eq!(
        now.iter()
            .filter(|s| **s == ReplicaState::Rebuilding)
            .count(),
        1,
        "{now:?}"
    );
    assert!(now.contains(&ReplicaState::Failed), "{now:?}");

    // The first rebuild is done: the other starts.
    let first = &failed[now
        .iter()
        .position(|s| *s == ReplicaState::Rebuilding)
        .unwrap()];
    let r = c.store.replicas().get(&first.id).await.unwrap().unwrap();
    let mut done = (*r.value).clone();
    done.state = ReplicaState::Ready;
    c.put_replica(done, Some(&r)).await.unwrap();
    c.reconcile_replicas().await.unwrap();
    let now = states().await;
    assert!(now.contains(&ReplicaState::Ready), "{now:?}");
    assert!(now.contains(&ReplicaState::Rebuilding), "{now:?}");
}

/// On a store shared with another controller, the scheduled space counts the other's
/// replicas too.
async fn scheduled(c: &Controller) -> u64 {
    c.node_statuses()
        .await
        .unwrap()
        .iter()
        .flat_map(|s| s.scheduled.clone())
        .sum()
}

#[tokio::test]
async fn on_a_shared_store_scheduled_space_counts_every_controllers_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let a = controller(dir.path()).await.with_shared_store();
    let b = Controller::new(
        a.store.clone(),
        a.agent.clone(),
        ControllerConfig::default(),
    )
    .with_shared_store();
    assert_eq!(scheduled(&a).await, 0);
    let mut one = request("v", 8 << 20);
    one.parameters.insert("numberOfReplicas".into(), "1".into());
    b.create_volume(one).await.unwrap();
    assert_eq!(
        scheduled(&a).await,
        8 << 20,
        "the other controller's replica"
    );
}

#[tokio::test]
async fn scheduled_space_follows_every_replica_write() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path()).await;
    let empty = c.scheduled_space().await.unwrap();
    assert_eq!(empty, ScheduledSpace::default());
    for i in 0..4 {
        c.create_volume(request(&format!("v{i}"), 8 << 20))
            .await
            .unwrap();
    }
    c.expand(
        "v1",
        CapacityRange {
            required: 16 << 20,
            limit: 0,
        },
    )
    .await
    .unwrap();
    c.delete_volume("v2").await.unwrap();
    let kept = c.scheduled_space().await.unwrap();
    assert_eq!(kept, from_store(&c).await);
    let total: u64 = c
        .store
        .nodes()
        .get("n1")
        .await
        .unwrap()
        .unwrap()
        .value
        .disks
        .iter()
        .map(|d| kept.get("n1", &d.id))
        .sum();
    // v0, v3: 2 × 8 MiB each; v1: 2 × 16 MiB.
    assert_eq!(total, (2 * 8 + 2 * 8 + 2 * 16) << 20);
}

#[test]
fn capacity_range_resolves_within_bounds() {
    let r = |required, limit| CapacityRange { required, limit }.resolve();
    assert_eq!(r(0, 0), Ok(DEFAULT_VOLUME_SIZE));
    assert_eq!(r(1, 0), Ok(SIZE_ALIGNMENT));
    assert_eq!(r(SIZE_ALIGNMENT + 1, 0), Ok(2 * SIZE_ALIGNMENT));
    assert_eq!(r(0, 10 * SIZE_ALIGNMENT + 5), Ok(10 * SIZE_ALIGNMENT));
    assert!(r(10, 5).unwrap_err().contains("limit_bytes"));
    assert!(r(SIZE_ALIGNMENT + 1, SIZE_ALIGNMENT + 2).is_err());
    assert!(r(0, 100).is_err());
    assert!(r(MAX_VOLUME_SIZE + 1, 0).is_err());
}

/// Records every replica it fences, with the epoch, and fences it.
#[derive(Default)]
struct RecordedFences(std::sync::Mutex<Vec<(String, u64)>>);

#[async_trait::async_trait]
impl crate::control::fence::Fencer for RecordedFences {
    async fn fence(
        &self,
        _: &str,
        _: &str,
        replica: &str,
        epoch: u64,
        _: &str,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push((replica.to_string(), epoch));
        Ok(())
    }
}

impl RecordedFences {
    fn epochs(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().map(|(_, e)| *e).collect()
    }
}

/// Fencing for the Kubernetes recovery: a take-over's first half. The epoch is raised once,
/// in the store, and persisted on the reachable members; the attachment stays on the down
/// node. Fencing again (a restart in the middle) fences at the same epoch. ControllerUnpublish
/// for the down node (what the csi-attacher calls once the VolumeAttachment is deleted) then
/// succeeds without that node, fences at that same epoch and releases; again, it is a no-op.
/// A volume whose every member is on the down node is refused before anything changes.
#[tokio::test]
async fn fencing_for_recovery_raises_the_epoch_once_and_unpublish_then_releases_without_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig {
        heartbeat_timeout_ms: 200,
        termination_grace_ms: 0,
    };
    let fences = Arc::new(RecordedFences::default());
    let c = controller_with(dir.path(), config)
        .await
        .with_fencing(Fencing {
            secret: Arc::new(vec![1; 32]),
            fencer: fences.clone(),
            lease_ms: 100,
        });
    // Both volumes' replicas are on n1's disks; v is attached on n2, w on n1.
    c.create_volume(request("v", 8 << 20)).await.unwrap();
    c.create_volume(request("w", 8 << 20)).await.unwrap();
    beat(&c, "n1").await;
    beat(&c, "n2").await;
    let cap = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    };
    c.publish("v", "n2", &cap, false).await.unwrap();
    c.publish("w", "n1", &cap, false).await.unwrap();
    let volume = |id: &'static str| {
        let c = &c;
        async move { c.get_volume(id).await.unwrap().unwrap() }
    };

    // n2 goes down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    beat(&c, "n1").await;
    let first = c.fence_for_recovery("v", "n2").await.unwrap();
    assert_eq!(
        first,
        RecoveryFence::Fenced {
            epoch: 2,
            fenced: 2,
            members: 2,
            raised: true
        }
    );
    let v = volume("v").await;
    assert_eq!(v.epoch, 2);
    assert_eq!(
        v.attachment.as_ref().map(|a| (a.node_id.as_str(), a.epoch)),
        Some(("n2", 1))
    );
    assert!(!attached_current_on(&v, "n2"));
    // The engine on n2 can no longer renew its lease.
    assert!(matches!(
        c.renew_lease("v", "n2", 1).await,
        Err(MemberError::Superseded { .. })
    ));
    let again = c.fence_for_recovery("v", "n2").await.unwrap();
    assert_eq!(
        again,
        RecoveryFence::Fenced {
            epoch: 2,
            fenced: 2,
            members: 2,
            raised: false
        }
    );
    assert_eq!(volume("v").await.epoch, 2);
    assert_eq!(fences.epochs(), [2, 2, 2, 2]);
    assert_eq!(
        c.fence_for_recovery("v", "n1").await.unwrap(),
        RecoveryFence::NotAttachedThere {
            attached_to: Some("n2".into())
        }
    );
    assert_eq!(
        c.fence_for_recovery("nothing", "n2").await.unwrap(),
        RecoveryFence::NoVolume
    );

    c.unpublish("v", "n2").await.unwrap();
    let v = volume("v").await;
    assert_eq!((v.epoch, v.attachment.is_none()), (2, true));
    assert!(
        fences.epochs().iter().all(|e| *e == 2),
        "unpublish raised the epoch again: {:?}",
        fences.epochs()
    );
    c.unpublish("v", "n2").await.unwrap();
    assert_eq!(volume("v").await.epoch, 2);
    assert_eq!(
        c.fence_for_recovery("v", "n2").await.unwrap(),
        RecoveryFence::NotAttachedThere { attached_to: None }
    );
    // The next attachment takes a higher epoch still.
    let context = c.publish("v", "n1", &cap, false).await.unwrap();
    assert_eq!(context[CONTEXT_EPOCH], "3");

    // n1 goes down too: w's only members are there. Refused, and nothing changes: not the
    // epoch, not the members (a take-over would have failed them all).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        let refused = c.fence_for_recovery("w", "n1").await;
        match &refused {
            Err(RecoveryFenceError::Unfenceable { why, .. }) => {
                assert!(why.contains("none of its 2 members"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let w = volume("w").await;
        assert_eq!(w.epoch, 1);
        let states: Vec<ReplicaState> = c
            .volume_replicas("w")
            .await
            .unwrap()
            .iter()
            .map(|r| r.value.state)
            .collect();
        assert_eq!(states, [ReplicaState::Ready, ReplicaState::Ready]);
        assert_eq!(
            w.attachment.as_ref().map(|a| a.node_id.as_str()),
            Some("n1")
        );
    }
}

/// ControllerPublish refuses a new attachment on a node that is down (FAILED_PRECONDITION):
/// in Kubernetes the attach-detach controller recreates the VolumeAttachment of a pod still
/// on a dead node, and the volume must not move back there. The same node up again is fine,
/// and a node that is up can still take the volume over from a down one.
#[tokio::test]
async fn publishing_on_a_node_that_is_down_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig {
        heartbeat_timeout_ms: 200,
        termination_grace_ms: 0,
    };
    let c = controller_with(dir.path(), config).await;
    let mut create = request("v", 8 << 20);
    create
        .parameters
        .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
    c.create_volume(create).await.unwrap();
    let cap = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    };
    beat(&c, "n2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = c.publish("v", "n2", &cap, false).await;
    assert!(
        matches!(refused, Err(PublishError::TargetDown { .. })),
        "{refused:?}"
    );
    let status = tonic::Status::from(refused.unwrap_err());
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(c
        .store
        .volumes()
        .get("v")
        .await
        .unwrap()
        .unwrap()
        .value
        .attachment
        .is_none());
    beat(&c, "n2").await;
    c.publish("v", "n2", &cap, false).await.unwrap();
    // n2 goes down; n1, up, takes the volume over (the CSI-path failover).
    tokio::time::sleep(Duration::from_millis(300)).await;
    beat(&c, "n1").await;
    c.publish("v", "n1", &cap, false).await.unwrap();
}
