//! The Kubernetes recovery controller against a real API server (etcd and kube-apiserver
//! from `$KUBEBUILDER_ASSETS`, no controller manager, no scheduler, no kubelet): Nodes,
//! PersistentVolumes, claims, VolumeAttachments and pods made by hand as a dead node's and a
//! live one's would be, and a real control plane on an embedded store whose fencer fences
//! every replica it can reach. One pass must delete exactly what it should (a stale
//! VolumeAttachment after fencing, a terminating StatefulSet pod on the dead node, a pod whose
//! volume moved), leave the rest (an unfenceable volume's VolumeAttachment, a bare pod), post
//! the Events on the pods and the claims, and change nothing more on a second pass; the
//! controller loop acts only while it leads.
//!
//! SKIPPED (with a line saying so) without `KUBEBUILDER_ASSETS`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use common::k8s::{ControlPlane, Options};
use palisade::control::fence::Fencer;
use palisade::control::{Controller, ControllerConfig, Fencing};
use palisade::k8s::recovery::{self, NodeReady, Recovery, RecoveryConfig, Snapshot};
use palisade::model::{
    self, AccessMode, AccessType, Attachment, Capability, Replica, ReplicaState, Volume,
    VolumeState,
};
use palisade::params::{DataLocality, SoftAntiAffinity, VolumeParams};
use palisade::replica::agent::LocalAgent;
use palisade::settings::{NodeDownPodDeletionPolicy, Settings};
use palisade::store::embedded::EmbeddedStore;
use palisade::store::{Store, SETTINGS_KEY};

const DRIVER: &str = "driver.palisade.io";
const NS: &str = "apps";

/// Fences every replica it is asked to, and counts them.
#[derive(Default)]
struct CountingFencer(Mutex<usize>);

#[async_trait::async_trait]
impl Fencer for CountingFencer {
    async fn fence(&self, _: &str, _: &str, _: &str, _: u64, _: &str) -> Result<(), String> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

fn rfc3339(ms: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap()
        .to_string()
}

async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .unwrap();
}

/// The Kubernetes side of the test.
struct Cluster {
    client: kube::Client,
}

impl Cluster {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), NS)
    }

    fn global<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>,
        K::DynamicType: Default,
    {
        Api::all(self.client.clone())
    }

    async fn node(&self, name: &str, ready: &str, since_ms: u64) {
        let nodes = self.global::<Node>();
        create(&nodes, json!({"metadata": {"name": name}})).await;
        let at = rfc3339(since_ms);
        patch_status(
            &nodes,
            name,
            json!({"conditions": [{
                "type": "Ready", "status": ready, "reason": "Test", "message": "set by the test",
                "lastTransitionTime": at, "lastHeartbeatTime": at,
            }]}),
        )
        .await;
    }

    /// A PersistentVolume `pv-<v>` of Palisade's for volume `v`, bound to claim `<v>`; with
    /// its VolumeAttachment `va-<v>` on `attached_on`, if given, attached.
    async fn volume(&self, v: &str, policy: Option<&str>, attached_on: Option<&str>) {
        let attributes = match policy {
            Some(p) => json!({"volumeAttachmentRecoveryPolicy": p}),
            None => json!({}),
        };
        create(
            &self.global::<PersistentVolume>(),
            json!({
                "metadata": {"name": format!("pv-{v}")},
                "spec": {
                    "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "8Mi"},
                    "persistentVolumeReclaimPolicy": "Delete",
                    "claimRef": {"kind": "PersistentVolumeClaim", "namespace": NS, "name": v},
                    "csi": {"driver": DRIVER, "volumeHandle": v, "volumeAttributes": attributes},
                },
            }),
        )
        .await;
        create(
            &self.api::<PersistentVolumeClaim>(),
            json!({
                "metadata": {"name": v, "namespace": NS},
                "spec": {
                    "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                    "resources": {"requests": {"storage": "8Mi"}}, "volumeName": format!("pv-{v}"),
                },
            }),
        )
        .await;
        if let Some(node) = attached_on {
            let vas = self.global::<VolumeAttachment>();
            let name = format!("va-{v}");
            create(
                &vas,
                json!({
                    "metadata": {"name": name},
                    "spec": {"attacher": DRIVER, "nodeName": node,
                             "source": {"persistentVolumeName": format!("pv-{v}")}},
                }),
            )
            .await;
            patch_status(&vas, &name, json!({"attached": true})).await;
        }
    }

    /// A pod on `node` using claim `claim`, owned by (kind, name) if given, in `phase`.
    async fn pod(
        &self,
        name: &str,
        node: &str,
        claim: &str,
        owner: Option<(&str, &str)>,
        phase: &str,
    ) {
        let mut metadata = json!({"name": name, "namespace": NS});
        if let Some((kind, owner)) = owner {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": owner,
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true,
            }]);
        }
        let pods = self.api::<Pod>();
        create(
            &pods,
            json!({
                "metadata": metadata,
                "spec": {
                    "nodeName": node, "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": "busybox"}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
                },
            }),
        )
        .await;
        if phase != "Pending" {
            patch_status(&pods, name, json!({"phase": phase})).await;
        }
    }

    async fn exists<K>(&self, api: &Api<K>, name: &str) -> Option<K>
    where
        K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        api.get_opt(name).await.unwrap()
    }

    /// The Events in the namespace: (reason, kind of the object, its name).
    async fn events(&self) -> Vec<(String, String, String)> {
        let mut events: Vec<(String, String, String)> = self
            .api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                let regarding = e.regarding.unwrap_or_default();
                (
                    e.reason.unwrap_or_default(),
                    regarding.kind.unwrap_or_default(),
                    regarding.name.unwrap_or_default(),
                )
            })
            .collect();
        events.sort();
        events
    }
}

fn capability() -> Capability {
    Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    }
}

/// Palisade's side: nodes `dead` (no heartbeat for long), `alive` and `third` (beating), and
/// per volume its attachment (node, epoch) and where its replicas are.
async fn control_plane(
    dir: &std::path::Path,
    settings: Settings,
    volumes: &[(&str, (&str, u64), &[&str])],
) -> (Arc<Controller>, Arc<CountingFencer>) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("db.redb")).unwrap());
    store
        .settings()
        .put(SETTINGS_KEY, settings, None)
        .await
        .unwrap();
    let node = |id: &str| model::Node {
        id: id.into(),
        address: format!("{id}.test:9502"),
        agent_address: String::new(),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: 1,
        disks: vec![],
    };
    store.nodes().put("dead", node("dead"), None).await.unwrap();
    for (id, (on, epoch), replicas) in volumes {
        let volume = Volume {
            id: id.to_string(),
            name: id.to_string(),
            size: 8 << 20,
            params: VolumeParams {
                number_of_replicas: replicas.len() as u32,
                data_locality: DataLocality::Disabled,
                stale_replica_timeout_minutes: 30,
                disk_selector: vec![],
                node_selector: vec![],
                replica_soft_anti_affinity: SoftAntiAffinity::Ignored,
                replica_zone_soft_anti_affinity: SoftAntiAffinity::Ignored,
                replica_disk_soft_anti_affinity: SoftAntiAffinity::Ignored,
                recovery_policy: None,
                mkfs_params: vec![],
            },
            extra_params: Default::default(),
            capabilities: vec![capability()],
            accessible_topology: vec![],
            state: VolumeState::Ready,
            degraded_reason: None,
            epoch: *epoch,
            attachment: Some(Attachment {
                node_id: on.to_string(),
                epoch: *epoch,
                readonly: false,
                capability: capability(),
                since_ms: 1,
            }),
            created_ms: 1,
            planned_replicas: vec![],
            next_replica: replicas.len() as u64,
            engine_running: true,
            ready_replicas: 0,
            engine_lease: None,
        };
        store.volumes().put(id, volume, None).await.unwrap();
        for (n, on) in replicas.iter().enumerate() {
            let replica = Replica {
                id: format!("{id}-r-{n}"),
                volume_id: id.to_string(),
                node_id: on.to_string(),
                disk_id: "d0".into(),
                path: Default::default(),
                size: 8 << 20,
                state: ReplicaState::Ready,
                failed_ms: 0,
                rebuilt_percent: None,
            };
            store
                .replicas()
                .put(&replica.id.clone(), replica, None)
                .await
                .unwrap();
        }
    }
    let fencer = Arc::new(CountingFencer::default());
    let controller = Controller::new(
        store,
        Arc::new(LocalAgent::new("alive".into(), HashMap::new())),
        ControllerConfig::default(),
    )
    .with_fencing(Fencing {
        secret: Arc::new(vec![3; 32]),
        fencer: fencer.clone(),
        lease_ms: 100,
    });
    controller.heartbeat(node("alive")).await.unwrap();
    controller.heartbeat(node("third")).await.unwrap();
    (Arc::new(controller), fencer)
}

fn epoch_of(volume: &Option<Arc<Volume>>) -> u64 {
    volume.as_ref().map(|v| v.epoch).unwrap_or(0)
}

#[tokio::test]
async fn recovery_against_a_real_api_server() {
    let test = "recovery_against_a_real_api_server";
    let Some(plane) = ControlPlane::start_with(test, Options::default()).await else {
        return;
    };
    let cluster = Cluster {
        client: plane.client().await,
    };
    plane.create_namespace(NS);
    // No controller manager: nobody creates the namespace's default ServiceAccount.
    create(
        &cluster.api::<ServiceAccount>(),
        json!({"metadata": {"name": "default", "namespace": NS}}),
    )
    .await;
    let now = model::now_ms();
    cluster.node("dead", "Unknown", now - 60_000).await;
    cluster.node("alive", "True", now - 3_600_000).await;
    cluster.node("third", "True", now - 3_600_000).await;

    // The seed's case: the old pod was force-deleted, its replacement waits on alive.
    cluster.volume("seed", Some("never"), Some("dead")).await;
    cluster
        .pod(
            "seed-new",
            "alive",
            "seed",
            Some(("ReplicaSet", "web-1")),
            "Pending",
        )
        .await;
    // A StatefulSet's pod on the dead node, evicted, past its 1 s grace period.
    cluster.volume("sts", None, Some("dead")).await;
    cluster
        .pod(
            "db-0",
            "dead",
            "sts",
            Some(("StatefulSet", "db")),
            "Running",
        )
        .await;
    let grace = DeleteParams {
        grace_period_seconds: Some(1),
        ..DeleteParams::default()
    };
    cluster.api::<Pod>().delete("db-0", &grace).await.unwrap();
    // A volume that moved to third under a running pod on alive, and a bare pod on it too;
    // its VolumeAttachment on alive still says attached.
    cluster.volume("moved", None, Some("alive")).await;
    cluster
        .pod(
            "app",
            "alive",
            "moved",
            Some(("ReplicaSet", "web-2")),
            "Running",
        )
        .await;
    cluster.pod("solo", "alive", "moved", None, "Running").await;
    // A volume whose only member is on the dead node: nothing may move.
    cluster.volume("stuck", None, Some("dead")).await;
    cluster
        .pod(
            "stuck-new",
            "alive",
            "stuck",
            Some(("ReplicaSet", "web-3")),
            "Pending",
        )
        .await;

    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        node_down_pod_deletion_policy: NodeDownPodDeletionPolicy::DeleteStatefulSetPod,
        ..Settings::default()
    };
    let (controller, fencer) = control_plane(
        dir.path(),
        settings,
        &[
            ("seed", ("dead", 1), &["alive", "dead"]),
            ("sts", ("dead", 1), &["alive"]),
            ("moved", ("third", 2), &["third"]),
            ("stuck", ("dead", 1), &["dead"]),
        ],
    )
    .await;
    let mut config = RecoveryConfig::new(DRIVER, Some("test".into()));
    config.resync = Duration::from_millis(300);
    let recovery = Arc::new(Recovery::new(
        controller.clone(),
        cluster.client.clone(),
        config,
        Arc::new(NodeReady),
    ));
    // db-0's grace period (1 s) must be over.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let snapshot = Snapshot::fetch(&cluster.client).await.unwrap();
    let report = recovery.pass(&snapshot).await.unwrap();
    eprintln!("first pass: {report:?}");
    let vas = cluster.global::<VolumeAttachment>();
    let pods = cluster.api::<Pod>();
    assert!(cluster.exists(&vas, "va-seed").await.is_none(), "va-seed");
    assert!(cluster.exists(&vas, "va-sts").await.is_none(), "va-sts");
    assert!(
        cluster.exists(&vas, "va-moved").await.is_none(),
        "the moved volume's stale VolumeAttachment on alive, with the pod it was deleted for"
    );
    assert!(
        cluster.exists(&pods, "db-0").await.is_none(),
        "db-0 force-deleted"
    );
    let app = cluster.exists(&pods, "app").await.expect("app");
    assert!(
        app.metadata.deletion_timestamp.is_some()
            && app.metadata.deletion_grace_period_seconds != Some(0),
        "app deleted gracefully: {:?}",
        app.metadata
    );
    let solo = cluster.exists(&pods, "solo").await.expect("solo");
    assert!(
        solo.metadata.deletion_timestamp.is_none(),
        "a bare pod is never deleted"
    );
    assert!(
        cluster.exists(&vas, "va-stuck").await.is_some(),
        "unfenceable: kept"
    );
    assert!(cluster.exists(&pods, "seed-new").await.is_some());
    // stuck: refused before anything changed.
    for (volume, epoch) in [("seed", 2), ("sts", 2), ("moved", 2), ("stuck", 1)] {
        assert_eq!(
            epoch_of(&controller.get_volume(volume).await.unwrap()),
            epoch,
            "{volume}"
        );
    }
    let events = cluster.events().await;
    for expected in [
        ("VolumeFenced", "Pod", "seed-new"),
        ("VolumeFenced", "PersistentVolumeClaim", "seed"),
        ("StaleAttachmentRemoved", "Pod", "seed-new"),
        ("StaleAttachmentRemoved", "PersistentVolumeClaim", "seed"),
        ("StaleAttachmentRemoved", "PersistentVolumeClaim", "sts"),
        ("PodForceDeleted", "Pod", "db-0"),
        ("PodForceDeleted", "PersistentVolumeClaim", "sts"),
        ("PodDeleted", "Pod", "app"),
        ("PodDeleted", "PersistentVolumeClaim", "moved"),
        ("PodNotDeleted", "Pod", "solo"),
        ("RecoveryRefused", "Pod", "stuck-new"),
        ("RecoveryRefused", "PersistentVolumeClaim", "stuck"),
    ] {
        let expected = (
            expected.0.to_string(),
            expected.1.to_string(),
            expected.2.to_string(),
        );
        assert!(
            events.contains(&expected),
            "{expected:?} not in {events:#?}"
        );
    }

    // A second pass, as after a restart: nothing more is deleted, no epoch is raised.
    let fenced = *fencer.0.lock().unwrap();
    let count = events.len();
    let snapshot = Snapshot::fetch(&cluster.client).await.unwrap();
    let report = recovery.pass(&snapshot).await.unwrap();
    eprintln!("second pass: {report:?}");
    assert!(report.pods_force_deleted.is_empty() && report.pods_deleted.is_empty());
    assert!(report.attachments_removed.is_empty());
    assert!(cluster.exists(&vas, "va-stuck").await.is_some());
    for (volume, epoch) in [("seed", 2), ("sts", 2), ("moved", 2), ("stuck", 1)] {
        assert_eq!(
            epoch_of(&controller.get_volume(volume).await.unwrap()),
            epoch,
            "{volume}"
        );
    }
    assert_eq!(*fencer.0.lock().unwrap(), fenced, "nothing left to fence");
    assert_eq!(cluster.events().await.len(), count, "nothing new to report");

    // The loop: nothing happens until this process leads; then the reflectors see the
    // next stale attachment and a pass removes it; dropping the sender stops it.
    cluster.volume("lead", None, Some("dead")).await;
    cluster
        .pod(
            "lead-new",
            "alive",
            "lead",
            Some(("ReplicaSet", "web-4")),
            "Pending",
        )
        .await;
    {
        let store = controller.store();
        let mut v = (*controller.get_volume("seed").await.unwrap().unwrap()).clone();
        v.id = "lead".into();
        v.name = "lead".into();
        v.epoch = 1;
        v.attachment = Some(Attachment {
            node_id: "dead".into(),
            epoch: 1,
            readonly: false,
            capability: capability(),
            since_ms: 1,
        });
        store.volumes().put("lead", v, None).await.unwrap();
        let replica = Replica {
            id: "lead-r-0".into(),
            volume_id: "lead".into(),
            node_id: "alive".into(),
            disk_id: "d0".into(),
            path: Default::default(),
            size: 8 << 20,
            state: ReplicaState::Ready,
            failed_ms: 0,
            rebuilt_percent: None,
        };
        store
            .replicas()
            .put("lead-r-0", replica, None)
            .await
            .unwrap();
    }
    let (leader, leading) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(recovery::run(recovery.clone(), leading));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cluster.exists(&vas, "va-lead").await.is_some(),
        "acted without leading"
    );
    leader.send(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.exists(&vas, "va-lead").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "va-lead not removed while leading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(epoch_of(&controller.get_volume("lead").await.unwrap()), 2);
    drop(leader);
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the controller stops when its leadership sender is dropped")
        .unwrap();
}
