//! Fixtures shared by the recovery tests (reduced pods, stored volumes, Kubernetes objects as
//! the API server would send them), and the tests of the view built from those objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::core::PartialObjectMeta;
use serde_json::json;

use super::view::*;
use crate::model::{AccessMode, AccessType, Attachment, Capability, Volume, VolumeState};
use crate::params::{DataLocality, RecoveryPolicy, SoftAntiAffinity, VolumeParams};

pub(super) const DRIVER: &str = "driver.palisade.io";
/// A fixed "now" for the pure tests: 2026-01-01T00:00:00Z.
pub(super) const NOW: u64 = 1_767_225_600_000;

/// A pod using the PersistentVolume `pv`, owned by a Deployment.
pub(super) fn pod(name: &str, node: Option<&str>, phase: Phase, pv: &str) -> PodView {
    PodView {
        namespace: "apps".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node: node.map(str::to_string),
        phase,
        deletion: None,
        owner: Owner::Deployment,
        volumes: vec![pv.into()],
    }
}

/// `pod`, being deleted with a deletionTimestamp of `at_ms`.
pub(super) fn deleting(mut pod: PodView, at_ms: u64) -> PodView {
    pod.deletion = Some(Deletion {
        at_ms,
        grace_seconds: 30,
    });
    pod
}

/// `pod`, owned by `owner`.
pub(super) fn owned(mut pod: PodView, owner: Owner) -> PodView {
    pod.owner = owner;
    pod
}

/// A stored volume with epoch `epoch`, attached on `(node, epoch)` if given.
pub(super) fn stored(id: &str, epoch: u64, attachment: Option<(&str, u64)>) -> Volume {
    Volume {
        id: id.into(),
        name: id.into(),
        size: 8 << 20,
        params: VolumeParams {
            number_of_replicas: 2,
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
        extra_params: BTreeMap::new(),
        capabilities: vec![capability()],
        accessible_topology: vec![],
        state: VolumeState::Ready,
        degraded_reason: None,
        epoch,
        attachment: attachment.map(|(node, epoch)| Attachment {
            node_id: node.into(),
            epoch,
            readonly: false,
            capability: capability(),
            since_ms: 1,
        }),
        created_ms: 1,
        planned_replicas: vec![],
        next_replica: 2,
        engine_running: true,
        ready_replicas: 0,
        engine_lease: None,
    }
}

pub(super) fn capability() -> Capability {
    Capability {
        access_type: AccessType::Block,
        access_mode: AccessMode::SingleNodeWriter,
    }
}

/// RFC 3339 for a time in ms since the Unix epoch.
pub(super) fn rfc3339(ms: u64) -> String {
    let ts = k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).unwrap();
    ts.to_string()
}

/// A Node whose Ready condition is `ready` ("True", "False", "Unknown") since `since_ms`.
pub(super) fn k8s_node(name: &str, ready: &str, since_ms: u64) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": format!("uid-node-{name}")},
        "status": {"conditions": [{
            "type": "Ready", "status": ready,
            "lastTransitionTime": rfc3339(since_ms),
            "lastHeartbeatTime": rfc3339(since_ms),
        }]},
    }))
    .unwrap()
}

/// A PersistentVolume of `driver` with handle `handle`, bound to `apps/<claim>`, with a
/// recovery policy attribute if given.
pub(super) fn k8s_pv(
    name: &str,
    handle: &str,
    claim: &str,
    driver: &str,
    policy: Option<&str>,
) -> PersistentVolume {
    let mut attributes = serde_json::Map::new();
    if let Some(p) = policy {
        attributes.insert("volumeAttachmentRecoveryPolicy".into(), json!(p));
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": format!("uid-pv-{name}")},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "8Mi"},
            "claimRef": {"kind": "PersistentVolumeClaim", "namespace": "apps", "name": claim},
            "csi": {"driver": driver, "volumeHandle": handle, "volumeAttributes": attributes},
        },
    }))
    .unwrap()
}

/// The claim `apps/<name>`, bound to `pv`.
pub(super) fn k8s_pvc(name: &str, pv: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-pvc-{name}")},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "8Mi"}},
            "volumeName": pv,
        },
        "status": {"phase": "Bound"},
    }))
    .unwrap()
}

/// How a Kubernetes pod fixture is made.
#[derive(Clone, Copy)]
pub(super) struct PodSpec<'a> {
    pub name: &'a str,
    pub node: Option<&'a str>,
    pub phase: &'a str,
    pub claim: &'a str,
    /// The controller owner, (kind, name).
    pub owner: Option<(&'a str, &'a str)>,
    /// (deletionTimestamp in ms, deletionGracePeriodSeconds).
    pub deletion: Option<(u64, i64)>,
}

pub(super) fn k8s_pod(p: &PodSpec<'_>) -> Pod {
    let mut metadata = json!({
        "name": p.name, "namespace": "apps", "uid": format!("uid-{}", p.name),
    });
    if let Some((kind, name)) = p.owner {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": name,
            "uid": format!("uid-{name}"), "controller": true,
        }]);
    }
    if let Some((at, grace)) = p.deletion {
        metadata["deletionTimestamp"] = json!(rfc3339(at));
        metadata["deletionGracePeriodSeconds"] = json!(grace);
    }
    let mut spec = json!({
        "containers": [{"name": "app", "image": "busybox"}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": p.claim}}],
    });
    if let Some(node) = p.node {
        spec["nodeName"] = json!(node);
    }
    serde_json::from_value(json!({
        "metadata": metadata, "spec": spec, "status": {"phase": p.phase},
    }))
    .unwrap()
}

/// A VolumeAttachment of `attacher` for `pv` on `node`.
pub(super) fn k8s_va(
    name: &str,
    pv: &str,
    node: &str,
    attached: bool,
    attacher: &str,
) -> VolumeAttachment {
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}")},
        "spec": {"attacher": attacher, "nodeName": node, "source": {"persistentVolumeName": pv}},
        "status": {"attached": attached},
    }))
    .unwrap()
}

/// The metadata of ReplicaSet `apps/<name>`, owned by Deployment `deployment` if given.
pub(super) fn k8s_rs(name: &str, deployment: Option<&str>) -> PartialObjectMeta<ReplicaSet> {
    let mut metadata = json!({"name": name, "namespace": "apps", "uid": format!("uid-{name}")});
    if let Some(d) = deployment {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": d,
            "uid": format!("uid-{d}"), "controller": true,
        }]);
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": metadata,
    }))
    .unwrap()
}

/// The snapshot of one volume `pvc-1` (claim `data`) attached on node `a`, which went down
/// at `NOW - 60 s`, with `pods`; node `b` is up.
pub(super) fn snapshot(pods: &[PodSpec<'_>]) -> Snapshot {
    Snapshot {
        attachments: vec![Arc::new(k8s_va("csi-1", "pvc-1", "a", true, DRIVER))],
        volumes: vec![Arc::new(k8s_pv("pvc-1", "pvc-1", "data", DRIVER, None))],
        claims: vec![Arc::new(k8s_pvc("data", "pvc-1"))],
        pods: pods.iter().map(|p| Arc::new(k8s_pod(p))).collect(),
        nodes: vec![
            Arc::new(k8s_node("a", "Unknown", NOW - 60_000)),
            Arc::new(k8s_node("b", "True", NOW - 3_600_000)),
        ],
        replica_sets: vec![
            Arc::new(k8s_rs("web-1", Some("web"))),
            Arc::new(k8s_rs("bare-rs", None)),
        ],
    }
}

#[test]
fn node_ready_says_down_since_the_condition_changed() {
    let health = NodeReady;
    assert_eq!(
        health.down_since("a", Some(&k8s_node("a", "True", 5_000))),
        None
    );
    assert_eq!(
        health.down_since("a", Some(&k8s_node("a", "False", 5_000))),
        Some(5_000)
    );
    assert_eq!(
        health.down_since("a", Some(&k8s_node("a", "Unknown", 7_000))),
        Some(7_000)
    );
    let registering: Node = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
    assert_eq!(health.down_since("a", Some(&registering)), None);
    assert_eq!(
        health.down_since("gone", None),
        Some(0),
        "a deleted Node is down"
    );
    let custom = |name: &str, _: Option<&Node>| (name == "x").then_some(9);
    assert_eq!(custom.down_since("x", None), Some(9));
    assert_eq!(custom.down_since("y", None), None);
}

#[test]
fn the_view_keeps_palisades_volumes_and_the_pods_using_them() {
    let mut snap = snapshot(&[
        PodSpec {
            name: "web-1-old",
            node: Some("a"),
            phase: "Running",
            claim: "data",
            owner: Some(("ReplicaSet", "web-1")),
            deletion: Some((NOW - 1_000, 30)),
        },
        PodSpec {
            name: "db-0",
            node: Some("b"),
            phase: "Pending",
            claim: "data",
            owner: Some(("StatefulSet", "db")),
            deletion: None,
        },
        PodSpec {
            name: "bare",
            node: None,
            phase: "Pending",
            claim: "data",
            owner: None,
            deletion: None,
        },
        PodSpec {
            name: "rs-pod",
            node: Some("b"),
            phase: "Running",
            claim: "data",
            owner: Some(("ReplicaSet", "bare-rs")),
            deletion: None,
        },
        PodSpec {
            name: "other-claim",
            node: Some("a"),
            phase: "Running",
            claim: "elsewhere",
            owner: None,
            deletion: None,
        },
    ]);
    // Another driver's volume and attachment, and a claim bound to it: not Palisade's.
    snap.volumes.push(Arc::new(k8s_pv(
        "pv-x",
        "x",
        "elsewhere",
        "other.csi",
        None,
    )));
    snap.claims.push(Arc::new(k8s_pvc("elsewhere", "pv-x")));
    snap.attachments
        .push(Arc::new(k8s_va("csi-x", "pv-x", "a", true, "other.csi")));

    let view = ClusterView::new(&snap, DRIVER, &NodeReady);
    assert_eq!(view.volumes.keys().collect::<Vec<_>>(), ["pvc-1"]);
    assert_eq!(
        view.volumes["pvc-1"].claim,
        Some(("apps".to_string(), "data".to_string()))
    );
    assert_eq!(view.attachments.len(), 1);
    let va = &view.attachments[0];
    assert_eq!(
        (va.name.as_str(), va.node.as_str(), va.attached, va.deleting),
        ("csi-1", "a", true, false)
    );
    let owners: Vec<(&str, &Owner)> = view
        .pods
        .iter()
        .map(|p| (p.name.as_str(), &p.owner))
        .collect();
    assert_eq!(
        owners,
        [
            ("web-1-old", &Owner::Deployment),
            ("db-0", &Owner::StatefulSet),
            ("bare", &Owner::None),
            ("rs-pod", &Owner::Other("ReplicaSet".into())),
        ]
    );
    let old = &view.pods[0];
    assert_eq!(old.phase, Phase::Running);
    assert_eq!(
        old.deletion,
        Some(Deletion {
            at_ms: NOW - 1_000,
            grace_seconds: 30
        })
    );
    assert_eq!(view.pods[2].node, None);
    assert_eq!(view.down, BTreeMap::from([("a".to_string(), NOW - 60_000)]));
    assert_eq!(view.pods_of("pvc-1").len(), 4);
}

#[test]
fn a_volume_policy_attribute_is_read_and_a_bad_one_ignored() {
    let pv = |p| k8s_pv("pvc-1", "pvc-1", "data", DRIVER, Some(p));
    for (attribute, expected) in [
        ("immediate", Some(RecoveryPolicy::Immediate)),
        ("never", Some(RecoveryPolicy::Never)),
        ("Sometimes", None),
    ] {
        let snap = Snapshot {
            volumes: vec![Arc::new(pv(attribute))],
            ..Snapshot::default()
        };
        let view = ClusterView::new(&snap, DRIVER, &NodeReady);
        assert_eq!(view.volumes["pvc-1"].policy, expected, "{attribute}");
    }
}

#[test]
fn an_ephemeral_volume_is_found_through_its_generated_claim() {
    let mut pod = k8s_pod(&PodSpec {
        name: "eph",
        node: Some("a"),
        phase: "Running",
        claim: "unused",
        owner: None,
        deletion: None,
    });
    pod.spec.as_mut().unwrap().volumes = Some(vec![serde_json::from_value(json!({
        "name": "scratch",
        "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}},
    }))
    .unwrap()]);
    let snap = Snapshot {
        volumes: vec![Arc::new(k8s_pv(
            "pvc-e",
            "pvc-e",
            "eph-scratch",
            DRIVER,
            None,
        ))],
        claims: vec![Arc::new(k8s_pvc("eph-scratch", "pvc-e"))],
        pods: vec![Arc::new(pod)],
        ..Snapshot::default()
    };
    let view = ClusterView::new(&snap, DRIVER, &NodeReady);
    assert_eq!(view.pods.len(), 1);
    assert_eq!(view.pods[0].volumes, ["pvc-e"]);
}
