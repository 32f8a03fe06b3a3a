//! The store's contract, one set of cases run against both backends: the embedded store
//! (redb in a temporary file) and the Kubernetes store (custom resources on a real API
//! server from `$KUBEBUILDER_ASSETS`, with deploy/cluster/crds.yaml applied by kubectl).
//!
//! Every case gets two handles `a` and `b` on fresh state: for Kubernetes two stores
//! connected separately to one namespace (two controllers on one API server); for the
//! embedded store, which one process alone can open, the same store twice.
//!
//! The Kubernetes run then checks what only it has: the error when the CRDs are missing, the
//! printer columns, the volume finalizer under `kubectl delete`, the refusal of a write the
//! API server pruned, and how long a put takes.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::k8s::ControlPlane;
use palisade::model::{
    AccessMode, AccessType, Attachment, Capability, Disk, Node, Replica, ReplicaState, Volume,
    VolumeState,
};
use palisade::params::{DataLocality, RecoveryPolicy, SoftAntiAffinity, VolumeParams};
use palisade::settings::Settings;
use palisade::store::embedded::EmbeddedStore;
use palisade::store::kubernetes::KubernetesStore;
use palisade::store::{Store, StoreError, Versioned, SETTINGS_KEY};

type Handles = (Arc<dyn Store>, Arc<dyn Store>);
type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Case = fn(Arc<dyn Store>, Arc<dyn Store>) -> CaseFuture;

/// Every case, by name.
fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("create_read_update_delete", |a, b| {
            Box::pin(create_read_update_delete(a, b))
        }),
        ("stale_or_missing_versions_conflict", |a, b| {
            Box::pin(stale_or_missing_versions_conflict(a, b))
        }),
        (
            "deletes_check_the_version_and_accept_missing_keys",
            |a, b| Box::pin(deletes_check_the_version_and_accept_missing_keys(a, b)),
        ),
        ("lists_are_ordered_by_key_and_filtered_by_prefix", |a, b| {
            Box::pin(lists_are_ordered_by_key_and_filtered_by_prefix(a, b))
        }),
        ("any_key_is_stored_and_ordered_as_given", |a, b| {
            Box::pin(any_key_is_stored_and_ordered_as_given(a, b))
        }),
        ("every_field_survives_a_round_trip", |a, b| {
            Box::pin(every_field_survives_a_round_trip(a, b))
        }),
        ("reads_follow_the_handles_own_writes", |a, b| {
            Box::pin(reads_follow_the_handles_own_writes(a, b))
        }),
        ("of_racing_writers_exactly_one_wins", |a, b| {
            Box::pin(of_racing_writers_exactly_one_wins(a, b))
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_the_contract() {
    for (name, case) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        eprintln!("embedded: {name}");
        case(store.clone(), store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_store_keeps_the_contract() {
    let Some(plane) = ControlPlane::start("the_kubernetes_store_keeps_the_contract").await else {
        return;
    };
    let client = plane.client().await;

    // Before the CRDs exist, connecting fails and says what to do.
    let err = match KubernetesStore::connect(client.clone(), "default").await {
        Ok(_) => panic!("connected without the CRDs"),
        Err(e) => error_chain(&e),
    };
    assert!(
        err.contains("cannot list palisade")
            && err.contains("kubectl apply -f deploy/cluster/crds.yaml"),
        "{err}"
    );

    plane.apply_crds();
    for (i, (name, case)) in cases().into_iter().enumerate() {
        let namespace = format!("contract-{i}");
        plane.create_namespace(&namespace);
        let (a, b) = connect_two(&plane, &namespace).await;
        eprintln!("kubernetes: {name} (namespace {namespace})");
        case(a, b).await;
    }

    printer_columns(&plane).await;
    finalizer_under_kubectl_delete(&plane).await;
    put_latency(&plane).await;
    // Last: it changes the CRD.
    pruned_writes_are_refused(&plane).await;
}

async fn connect_two(plane: &ControlPlane, namespace: &str) -> Handles {
    let a = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    let b = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    (Arc::new(a), Arc::new(b))
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn node(id: &str, heartbeat: u64) -> Node {
    Node {
        id: id.to_string(),
        address: format!("{id}.example:7000"),
        agent_address: format!("{id}.example:7001"),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: heartbeat,
        disks: vec![],
    }
}

fn volume(id: &str) -> Volume {
    Volume {
        id: id.to_string(),
        name: id.to_string(),
        size: 1 << 30,
        params: VolumeParams {
            number_of_replicas: 3,
            data_locality: DataLocality::Disabled,
            stale_replica_timeout_minutes: 30,
            disk_selector: vec![],
            node_selector: vec![],
            replica_soft_anti_affinity: SoftAntiAffinity::Ignored,
            replica_zone_soft_anti_affinity: SoftAntiAffinity::Ignored,
            replica_disk_soft_anti_affinity: SoftAntiAffinity::Ignored,
            recovery_policy: Some(RecoveryPolicy::Wait),
            mkfs_params: vec![],
        },
        extra_params: BTreeMap::new(),
        capabilities: vec![],
        accessible_topology: vec![],
        state: VolumeState::Ready,
        degraded_reason: None,
        epoch: 0,
        attachment: None,
        created_ms: 0,
        planned_replicas: Vec::new(),
        next_replica: 0,
        engine_running: false,
        ready_replicas: 0,
        engine_lease: None,
    }
}

fn replica(volume_id: &str, n: u32) -> Replica {
    Replica {
        id: format!("{volume_id}-r-{n}"),
        volume_id: volume_id.to_string(),
        node_id: format!("node-{n}"),
        disk_id: "disk-0".to_string(),
        path: PathBuf::from(format!("/var/lib/palisade/replicas/{volume_id}-r-{n}")),
        size: 1 << 30,
        state: ReplicaState::Ready,
        failed_ms: 0,
        rebuilt_percent: None,
    }
}

fn replica_ids(objects: &[Versioned<Replica>]) -> Vec<String> {
    objects.iter().map(|o| o.value.id.clone()).collect()
}

fn node_ids(objects: &[Versioned<Node>]) -> Vec<String> {
    objects.iter().map(|o| o.value.id.clone()).collect()
}

fn is_conflict(r: &Result<u64, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict { .. }))
}

/// Polls `store` until `key` has `version` (another handle's write reaches this one through
/// its watch, not at once).
async fn until_version(store: &dyn Store, key: &str, version: u64) -> Versioned<Node> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(n) = store.nodes().get(key).await.unwrap() {
            if n.version == version {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{key} never reached version {version}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create_read_update_delete(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let settings = a.settings();
    assert!(settings.get(SETTINGS_KEY).await.unwrap().is_none());

    let v1 = settings
        .put(SETTINGS_KEY, Settings::default(), None)
        .await
        .unwrap();
    let got = settings.get(SETTINGS_KEY).await.unwrap().unwrap();
    assert_eq!((got.version, &*got.value), (v1, &Settings::default()));

    let changed = Settings {
        default_replica_count: 2,
        ..Settings::default()
    };
    let v2 = settings
        .put(SETTINGS_KEY, changed.clone(), Some(v1))
        .await
        .unwrap();
    assert!(v2 > v1, "{v2} after {v1}");
    let got = settings.get(SETTINGS_KEY).await.unwrap().unwrap();
    assert_eq!((got.version, &*got.value), (v2, &changed));
    assert_eq!(settings.list().await.unwrap().len(), 1);

    settings.delete(SETTINGS_KEY, v2).await.unwrap();
    assert!(settings.get(SETTINGS_KEY).await.unwrap().is_none());
    assert!(settings.list().await.unwrap().is_empty());
    // Created again after a delete.
    let again = settings
        .put(SETTINGS_KEY, Settings::default(), None)
        .await
        .unwrap();
    let got = settings.get(SETTINGS_KEY).await.unwrap().unwrap();
    assert_eq!((got.version, &*got.value), (again, &Settings::default()));
}

async fn stale_or_missing_versions_conflict(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let nodes = a.nodes();
    let v1 = nodes.put("n1", node("n1", 1), None).await.unwrap();
    let v2 = nodes.put("n1", node("n1", 2), Some(v1)).await.unwrap();

    for expected in [None, Some(v1), Some(v2 + 1_000_000)] {
        let err = nodes.put("n1", node("n1", 9), expected).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict { kind: "node", key, expected: e }
                if key == "n1" && *e == expected),
            "{err}"
        );
    }
    // An update of a key that does not exist is a conflict too.
    let err = nodes.put("n2", node("n2", 1), Some(v1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(nodes.get("n2").await.unwrap().is_none());

    // The losers changed nothing.
    let got = nodes.get("n1").await.unwrap().unwrap();
    assert_eq!((got.version, got.value.last_heartbeat_ms), (v2, 2));
}

async fn deletes_check_the_version_and_accept_missing_keys(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let nodes = a.nodes();
    let v1 = nodes.put("n1", node("n1", 1), None).await.unwrap();
    let v2 = nodes.put("n1", node("n1", 2), Some(v1)).await.unwrap();

    let err = nodes.delete("n1", v1).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { kind: "node", key, expected: Some(e) }
            if key == "n1" && *e == v1),
        "{err}"
    );
    assert!(nodes.get("n1").await.unwrap().is_some());

    nodes.delete("n1", v2).await.unwrap();
    assert!(nodes.get("n1").await.unwrap().is_none());
    nodes.delete("n1", v2).await.unwrap();
    nodes.delete("never-was", 7).await.unwrap();

    // A volume too (the Kubernetes store's volumes carry a finalizer).
    let volumes = a.volumes();
    let v1 = volumes.put("pvc-1", volume("pvc-1"), None).await.unwrap();
    let mut changed = volume("pvc-1");
    changed.epoch = 1;
    let v2 = volumes.put("pvc-1", changed, Some(v1)).await.unwrap();
    let err = volumes.delete("pvc-1", v1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    volumes.delete("pvc-1", v2).await.unwrap();
    assert!(volumes.get("pvc-1").await.unwrap().is_none());
    volumes.put("pvc-1", volume("pvc-1"), None).await.unwrap();
}

async fn lists_are_ordered_by_key_and_filtered_by_prefix(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let replicas = a.replicas();
    for (volume, n) in [
        ("vol-b", 1),
        ("vol-a", 2),
        ("vol-a", 0),
        ("vol-ab", 0),
        ("vol", 5),
    ] {
        let r = replica(volume, n);
        replicas.put(&r.id.clone(), r, None).await.unwrap();
    }
    assert_eq!(
        replica_ids(&replicas.list().await.unwrap()),
        [
            "vol-a-r-0",
            "vol-a-r-2",
            "vol-ab-r-0",
            "vol-b-r-1",
            "vol-r-5"
        ]
    );
    assert_eq!(
        replica_ids(&replicas.list_prefix("vol-a-r-").await.unwrap()),
        ["vol-a-r-0", "vol-a-r-2"]
    );
    assert_eq!(
        replica_ids(&replicas.list_prefix("vol-a").await.unwrap()),
        ["vol-a-r-0", "vol-a-r-2", "vol-ab-r-0"]
    );
    assert_eq!(replicas.list_prefix("").await.unwrap().len(), 5);
    assert!(replicas.list_prefix("vol-c").await.unwrap().is_empty());
    assert!(replicas.list_prefix("zzz").await.unwrap().is_empty());
    // Tables are separate.
    assert!(a.volumes().list().await.unwrap().is_empty());
}

/// Keys that are not valid Kubernetes object names (capitals, `_`, a name's own encoding
/// prefix) are stored, read and ordered by the key itself.
async fn any_key_is_stored_and_ordered_as_given(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let nodes = a.nodes();
    let keys = ["b", "Node_1", "a_1", "a", "x.41", "A", "worker.example.com"];
    for key in keys {
        nodes.put(key, node(key, 1), None).await.unwrap();
    }
    let mut sorted = keys.to_vec();
    sorted.sort();
    assert_eq!(node_ids(&nodes.list().await.unwrap()), sorted);
    assert_eq!(
        node_ids(&nodes.list_prefix("a").await.unwrap()),
        ["a", "a_1"]
    );
    assert_eq!(node_ids(&nodes.list_prefix("x.").await.unwrap()), ["x.41"]);
    for key in keys {
        let got = nodes.get(key).await.unwrap().unwrap();
        assert_eq!(got.value.id, key);
        let updated = nodes
            .put(key, node(key, 2), Some(got.version))
            .await
            .unwrap();
        nodes.delete(key, updated).await.unwrap();
    }
    assert!(nodes.list().await.unwrap().is_empty());
}

/// Every field of every kind, set to something other than its default, reads back equal (a
/// schema that dropped one would lose it silently).
async fn every_field_survives_a_round_trip(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let mount = Capability {
        access_type: AccessType::Mount {
            fs_type: "xfs".to_string(),
            mount_flags: vec!["noatime".to_string()],
        },
        access_mode: AccessMode::SingleNodeWriter,
    };
    let block = Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::MultiNodeReaderOnly,
    };
    let mut v = volume("pvc-full");
    v.size = 10 << 30;
    v.params.data_locality = DataLocality::BestEffort;
    v.params.disk_selector = vec!["ssd".to_string()];
    v.params.node_selector = vec!["fast".to_string(), "big".to_string()];
    v.params.replica_zone_soft_anti_affinity = SoftAntiAffinity::Enabled;
    v.params.recovery_policy = None;
    v.params.mkfs_params = vec!["-m".to_string(), "0".to_string()];
    v.extra_params = BTreeMap::from([(
        "csi.storage.k8s.io/pvc/name".to_string(),
        "data".to_string(),
    )]);
    v.capabilities = vec![mount.clone(), block];
    v.accessible_topology = vec![BTreeMap::from([(
        "topology.palisade.io/node".to_string(),
        "n1".to_string(),
    )])];
    v.state = VolumeState::Creating;
    v.degraded_reason = Some("only 2 nodes".to_string());
    v.epoch = 7;
    v.attachment = Some(Attachment {
        node_id: "n1".to_string(),
        epoch: 7,
        readonly: true,
        capability: mount,
        since_ms: 1_700_000_000_000,
    });
    v.created_ms = 1_600_000_000_000;
    v.planned_replicas = vec![replica("pvc-full", 0), replica("pvc-full", 1)];
    v.next_replica = 2;
    v.engine_running = true;
    a.volumes().put(&v.id, v.clone(), None).await.unwrap();
    assert_eq!(*a.volumes().get(&v.id).await.unwrap().unwrap().value, v);

    let mut r = replica("pvc-full", 3);
    r.state = ReplicaState::Failed;
    r.failed_ms = 1_700_000_000_001;
    a.replicas().put(&r.id, r.clone(), None).await.unwrap();
    assert_eq!(*a.replicas().get(&r.id).await.unwrap().unwrap().value, r);

    let mut n = node("n1", 1_700_000_000_002);
    n.zone = Some("zone-a".to_string());
    n.tags = vec!["fast".to_string()];
    n.schedulable = false;
    n.disks = vec![Disk {
        id: "d1".to_string(),
        path: PathBuf::from("/mnt/disk1"),
        tags: vec!["ssd".to_string()],
        schedulable: true,
        storage_maximum: 1 << 40,
        storage_available: 1 << 39,
        storage_reserved: 1 << 30,
    }];
    a.nodes().put("n1", n.clone(), None).await.unwrap();
    assert_eq!(*a.nodes().get("n1").await.unwrap().unwrap().value, n);

    let mut s = Settings::default();
    for (name, value) in [
        ("default-replica-count", "2"),
        ("default-data-locality", "strict-local"),
        ("replica-soft-anti-affinity", "true"),
        ("storage-over-provisioning-percentage", "200"),
        ("volume-attachment-recovery-policy", "immediate"),
        (
            "node-down-pod-deletion-policy",
            "delete-both-statefulset-and-deployment-pod",
        ),
        ("auto-delete-pod-when-volume-detached-unexpectedly", "false"),
    ] {
        s.set(name, value).unwrap();
    }
    a.settings()
        .put(SETTINGS_KEY, s.clone(), None)
        .await
        .unwrap();
    assert_eq!(
        *a.settings().get(SETTINGS_KEY).await.unwrap().unwrap().value,
        s
    );
}

/// A get→modify→put loop never reads the version it has just replaced, and a delete is gone
/// for the reads that follow it.
async fn reads_follow_the_handles_own_writes(a: Arc<dyn Store>, _b: Arc<dyn Store>) {
    let volumes = a.volumes();
    let mut version = volumes
        .put("pvc-ryw", volume("pvc-ryw"), None)
        .await
        .unwrap();
    for epoch in 1..=20 {
        let got = volumes.get("pvc-ryw").await.unwrap().unwrap();
        assert_eq!(got.version, version, "a read right after a put");
        assert_eq!(got.value.epoch, epoch - 1);
        let listed = volumes.list_prefix("pvc-ryw").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].version, version, "a list right after a put");
        let mut next = (*got.value).clone();
        next.epoch = epoch;
        version = volumes
            .put("pvc-ryw", next, Some(got.version))
            .await
            .unwrap();
    }
    volumes.delete("pvc-ryw", version).await.unwrap();
    assert!(volumes.get("pvc-ryw").await.unwrap().is_none());
    assert!(volumes.list().await.unwrap().is_empty());
}

/// Two handles (two controllers) racing: of two creates, or of two updates from the same
/// version, exactly one wins; increments with retries lose none.
async fn of_racing_writers_exactly_one_wins(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    // Creates from both, many at once.
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.nodes().put("race", node("race", i), None).await })
        })
        .collect();
    let mut winners = vec![];
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(version) => winners.push((i as u64, version)),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (winner, mut version) = winners[0];
    for store in [&a, &b] {
        let got = until_version(&**store, "race", version).await;
        assert_eq!(got.value.last_heartbeat_ms, winner);
    }

    // Updates from the same version, from both.
    for round in 0..10u64 {
        let (ra, rb) = tokio::join!(
            a.nodes()
                .put("race", node("race", 1000 + round), Some(version)),
            b.nodes()
                .put("race", node("race", 2000 + round), Some(version)),
        );
        assert!(
            is_conflict(&ra) != is_conflict(&rb),
            "round {round}: {ra:?} {rb:?}"
        );
        let (won, heartbeat) = match (ra, rb) {
            (Ok(v), _) => (v, 1000 + round),
            (_, Ok(v)) => (v, 2000 + round),
            (ra, rb) => panic!("round {round}: {ra:?} {rb:?}"),
        };
        version = won;
        for store in [&a, &b] {
            let got = until_version(&**store, "race", version).await;
            assert_eq!(got.value.last_heartbeat_ms, heartbeat);
        }
    }

    // Increments with compare-and-swap retries, from both: none is lost.
    a.nodes()
        .put("counter", node("counter", 0), None)
        .await
        .unwrap();
    let increments = |store: Arc<dyn Store>| async move {
        let mut conflicts = 0;
        for _ in 0..10 {
            loop {
                let Some(current) = store.nodes().get("counter").await.unwrap() else {
                    // The other handle's watch has not brought the counter here yet.
                    tokio::task::yield_now().await;
                    continue;
                };
                let next = node("counter", current.value.last_heartbeat_ms + 1);
                match store
                    .nodes()
                    .put("counter", next, Some(current.version))
                    .await
                {
                    Ok(_) => break,
                    Err(StoreError::Conflict { .. }) => conflicts += 1,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }
        conflicts
    };
    let (ca, cb) = tokio::join!(
        tokio::spawn(increments(a.clone())),
        tokio::spawn(increments(b.clone()))
    );
    let conflicts = ca.unwrap() + cb.unwrap();
    let latest = a.nodes().get("counter").await.unwrap().unwrap();
    let latest = if latest.value.last_heartbeat_ms == 20 {
        latest
    } else {
        // The last increment may have been b's, not yet seen by a.
        let b_latest = b.nodes().get("counter").await.unwrap().unwrap();
        until_version(&*a, "counter", b_latest.version).await
    };
    assert_eq!(latest.value.last_heartbeat_ms, 20, "{conflicts} conflicts");
    eprintln!("  20 increments from two handles, {conflicts} conflicts retried");
}

/// `kubectl get` shows the printer columns of each kind.
async fn printer_columns(plane: &ControlPlane) {
    let namespace = "columns";
    plane.create_namespace(namespace);
    let store = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    let mut v = volume("pvc-cols");
    v.size = 3 << 29;
    v.epoch = 4;
    v.attachment = Some(Attachment {
        node_id: "worker-1".to_string(),
        epoch: 4,
        readonly: false,
        capability: Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeWriter,
        },
        since_ms: 0,
    });
    store.volumes().put("pvc-cols", v, None).await.unwrap();
    let r = replica("pvc-cols", 0);
    store.replicas().put(&r.id.clone(), r, None).await.unwrap();
    let mut n = node("worker-1", palisade::model::now_ms());
    n.zone = Some("zone-a".to_string());
    n.disks = vec![Disk {
        id: "d1".to_string(),
        path: PathBuf::from("/mnt/d1"),
        tags: vec![],
        schedulable: true,
        storage_maximum: 100 << 30,
        storage_available: 40 << 30,
        storage_reserved: 0,
    }];
    store.nodes().put("worker-1", n, None).await.unwrap();
    store
        .settings()
        .put(SETTINGS_KEY, Settings::default(), None)
        .await
        .unwrap();

    let table = |resource: &str| plane.kubectl_ok(&["get", resource, "-n", namespace]);
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let volumes = table("palisadevolumes");
    eprintln!("{volumes}");
    let lines: Vec<&str> = volumes.lines().collect();
    assert_eq!(
        words(lines[0]),
        ["NAME", "SIZE", "READY", "REPLICAS", "STATE", "NODE", "EPOCH", "AGE"]
    );
    assert_eq!(
        words(lines[1])[..7],
        ["pvc-cols", "1.5Gi", "0", "3", "Ready", "worker-1", "4"]
    );

    let replicas = table("plr");
    eprintln!("{replicas}");
    let lines: Vec<&str> = replicas.lines().collect();
    assert_eq!(
        words(lines[0]),
        ["NAME", "VOLUME", "NODE", "DISK", "REBUILT", "STATE", "SIZE", "AGE"]
    );
    assert_eq!(
        words(lines[1])[..6],
        [
            "pvc-cols-r-0",
            "pvc-cols",
            "node-0",
            "disk-0",
            "Ready",
            "1Gi"
        ]
    );
    // The volume label and the selectable fields find a volume's replicas.
    for selector in [
        ["-l", "palisade.io/volume=pvc-cols"],
        ["--field-selector", "spec.volume_id=pvc-cols"],
    ] {
        let out = plane.kubectl_ok(&[
            "get",
            "plr",
            "-n",
            namespace,
            "-o",
            "name",
            selector[0],
            selector[1],
        ]);
        assert_eq!(
            out.trim(),
            "palisadereplica.palisade.io/pvc-cols-r-0",
            "{selector:?}"
        );
    }

    let nodes = table("pln");
    eprintln!("{nodes}");
    let lines: Vec<&str> = nodes.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "NAME",
            "ADDRESS",
            "ZONE",
            "SCHEDULABLE",
            "DISKS",
            "FREE",
            "HEARTBEAT",
            "AGE"
        ]
    );
    let row = words(lines[1]);
    assert_eq!(
        row[..6],
        [
            "worker-1",
            "worker-1.example:7000",
            "zone-a",
            "true",
            "1",
            "40Gi"
        ]
    );

    let settings = table("pls");
    eprintln!("{settings}");
    assert_eq!(
        words(settings.lines().next().unwrap_or_default()),
        ["NAME", "REPLICAS", "LOCALITY", "RECOVERY", "AGE"]
    );
    // The category lists all four.
    let all = plane.kubectl_ok(&["get", "palisade", "-n", namespace, "-o", "name"]);
    assert_eq!(all.lines().count(), 4, "{all}");
}

/// A volume deleted by hand stays, unchanged and listed as asked for deletion, until the
/// store deletes its record (what the controller does once the replicas are gone).
async fn finalizer_under_kubectl_delete(plane: &ControlPlane) {
    let namespace = "finalizer";
    plane.create_namespace(namespace);
    let store = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    let volumes = store.volumes();
    let version = volumes
        .put("pvc-fin", volume("pvc-fin"), None)
        .await
        .unwrap();
    volumes
        .put("pvc-other", volume("pvc-other"), None)
        .await
        .unwrap();
    let finalizers = plane.kubectl_ok(&[
        "get",
        "plv",
        "pvc-fin",
        "-n",
        namespace,
        "-o",
        "jsonpath={.metadata.finalizers}",
    ]);
    assert_eq!(finalizers, r#"["palisade.io/replicas"]"#);
    assert!(volumes.deletion_requested().await.unwrap().is_empty());

    plane.kubectl_ok(&["delete", "plv", "pvc-fin", "-n", namespace, "--wait=false"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while volumes.deletion_requested().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the delete never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(volumes.deletion_requested().await.unwrap(), ["pvc-fin"]);
    let marked = volumes.get("pvc-fin").await.unwrap().expect("still there");
    assert_ne!(marked.version, version);
    assert_eq!(*marked.value, volume("pvc-fin"), "read as it was");
    // A create of the same volume meanwhile is refused; so is a delete naming the old version.
    assert!(is_conflict(
        &volumes.put("pvc-fin", volume("pvc-fin"), None).await
    ));
    assert!(matches!(
        volumes.delete("pvc-fin", version).await,
        Err(StoreError::Conflict { .. })
    ));
    // Updates still work (DeleteVolume records Deleting first), and keep it marked.
    let mut deleting = (*marked.value).clone();
    deleting.state = VolumeState::Deleting;
    let v2 = volumes
        .put("pvc-fin", deleting, Some(marked.version))
        .await
        .unwrap();
    assert_eq!(volumes.deletion_requested().await.unwrap(), ["pvc-fin"]);

    volumes.delete("pvc-fin", v2).await.unwrap();
    assert!(volumes.get("pvc-fin").await.unwrap().is_none());
    assert!(volumes.deletion_requested().await.unwrap().is_empty());
    let out = plane.kubectl(&["get", "plv", "pvc-fin", "-n", namespace]);
    assert!(!out.status.success(), "the object is still there");
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

/// Median and 99th percentile of creates and updates against the real API server.
async fn put_latency(plane: &ControlPlane) {
    let namespace = "latency";
    plane.create_namespace(namespace);
    let store = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    let volumes = store.volumes();
    let (mut creates, mut updates) = (vec![], vec![]);
    for i in 0..100 {
        let id = format!("pvc-{i:03}");
        let started = Instant::now();
        let version = volumes.put(&id, volume(&id), None).await.unwrap();
        creates.push(started.elapsed());
        let mut v = volume(&id);
        v.epoch = 1;
        let started = Instant::now();
        volumes.put(&id, v, Some(version)).await.unwrap();
        updates.push(started.elapsed());
    }
    creates.sort();
    updates.sort();
    eprintln!(
        "put latency over 100 (API server and etcd on this machine, read-your-writes included): \
         create p50 {:?} p99 {:?}; update p50 {:?} p99 {:?}",
        creates[50], creates[98], updates[50], updates[98]
    );
}

/// A CRD without a field the model has: the API server drops the field, and the store
/// refuses the write instead of losing it silently.
async fn pruned_writes_are_refused(plane: &ControlPlane) {
    let namespace = "pruned";
    plane.create_namespace(namespace);
    plane.kubectl_ok(&[
        "patch",
        "crd",
        "palisadevolumes.palisade.io",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/engine_running"}]"#,
    ]);
    let store = KubernetesStore::connect(plane.client().await, namespace)
        .await
        .unwrap();
    // The API server takes a moment to serve the new schema.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        let id = format!("pvc-pruned-{i}");
        let mut v = volume(&id);
        v.engine_running = true;
        match store.volumes().put(&id, v, None).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "never pruned");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => {
                let text = error_chain(&err);
                assert!(
                    text.contains("fields missing") && text.contains("crds.yaml"),
                    "{text}"
                );
                break;
            }
        }
    }
}
