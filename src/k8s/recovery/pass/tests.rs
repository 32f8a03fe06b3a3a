//! The pass: its plan for each case (pure), then the pass against a mocked API server
//! (`tower_test::mock` under kube's `Client::new`) and a real control plane on an embedded
//! store, checking the exact API calls: a VolumeAttachment is deleted only after fencing, a
//! pod on a down node is deleted with a grace period of 0 and its uid as a precondition, the
//! Events are posted on the pods and the claim, and a lasting state is reported once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use crate::control::fence::Fencer;
use crate::control::{Controller, ControllerConfig, Fencing};
use crate::k8s::recovery::tests::{
    self as fx, deleting, k8s_pv, k8s_pvc, k8s_va, owned, pod, snapshot, PodSpec, DRIVER, NOW,
};
use crate::k8s::recovery::view::{NodeReady, Owner, Phase};
use crate::k8s::recovery::{Recovery, RecoveryConfig};
use crate::model::{Node, Replica, ReplicaState};
use crate::replica::agent::LocalAgent;
use crate::settings::NodeDownPodDeletionPolicy;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Store, SETTINGS_KEY};

// --- the plan ---

fn view_of(pods: Vec<PodView>) -> ClusterView {
    ClusterView::new(&snapshot(&[]), DRIVER, &NodeReady).with_pods(pods)
}

impl ClusterView {
    fn with_pods(mut self, pods: Vec<PodView>) -> ClusterView {
        self.pods = pods;
        self
    }
}

fn stored_on_a(policy: Option<crate::params::RecoveryPolicy>) -> HashMap<String, Arc<Volume>> {
    let mut v = fx::stored("pvc-1", 1, Some(("a", 1)));
    v.params.recovery_policy = policy;
    HashMap::from([("pvc-1".to_string(), Arc::new(v))])
}

fn target(volume: &str, node: &str) -> Target {
    (volume.to_string(), node.to_string())
}

#[test]
fn the_seed_case_fences_and_removes_the_stale_attachment_under_every_policy() {
    use crate::params::RecoveryPolicy::*;
    let view = view_of(vec![pod("new", Some("b"), Phase::Pending, "pvc-1")]);
    for policy in [Never, Wait, Immediate] {
        let settings = Settings {
            volume_attachment_recovery_policy: policy,
            ..Settings::default()
        };
        let plan = plan(&view, &stored_on_a(None), &settings, NOW);
        assert_eq!(plan.fences, BTreeSet::from([target("pvc-1", "a")]));
        assert_eq!(plan.attachments.len(), 1);
        assert_eq!(plan.attachments[0].va.name, "csi-1");
        assert_eq!(plan.attachments[0].needs, [target("pvc-1", "a")]);
        assert!(plan.force_deletes.is_empty() && plan.deletes.is_empty());
        assert!(plan.notices.is_empty(), "{:?}", plan.notices);
        assert_eq!(
            plan.subjects["pvc-1"],
            Subjects {
                claims: vec![("apps".into(), "data".into())],
                pods: vec![("apps".into(), "new".into())],
            }
        );
    }
}

/// A down node's stale `status.volumesInUse` entry is released (after its fence) when the
/// volume's VolumeAttachment there is removed by the pass or already gone or going; never
/// while the attachment stands and the policy keeps it there.
#[test]
fn a_down_nodes_volumes_in_use_are_released_only_with_the_attachment() {
    use crate::params::RecoveryPolicy::*;
    let never = Settings {
        volume_attachment_recovery_policy: Never,
        ..Settings::default()
    };
    let release = ReleaseInUse {
        node: "a".into(),
        pv: "pvc-1".into(),
        volume: "pvc-1".into(),
        needs: vec![target("pvc-1", "a")],
    };
    // The seed case: the attachment is removed, and the entry released after the fence.
    let mut view = view_of(vec![pod("new", Some("b"), Phase::Pending, "pvc-1")]);
    view.in_use.insert("a".into(), vec!["pvc-1".into()]);
    let p = plan(&view, &stored_on_a(None), &never, NOW);
    assert_eq!(p.in_use, std::slice::from_ref(&release));
    assert_eq!(p.fences, BTreeSet::from([target("pvc-1", "a")]));
    // The policy keeps the attachment (a pod on the down node still uses it): nothing.
    let mut held = view_of(vec![
        pod("old", Some("a"), Phase::Running, "pvc-1"),
        pod("new", Some("b"), Phase::Pending, "pvc-1"),
    ]);
    held.in_use.insert("a".into(), vec!["pvc-1".into()]);
    let p = plan(&held, &stored_on_a(None), &never, NOW);
    assert!(p.in_use.is_empty() && p.fences.is_empty(), "{p:?}");
    // The VolumeAttachment is gone already (an earlier pass removed it): released still.
    held.attachments.clear();
    let p = plan(&held, &stored_on_a(None), &never, NOW);
    assert_eq!(p.in_use, [release]);
    assert_eq!(p.fences, BTreeSet::from([target("pvc-1", "a")]));
}

#[test]
fn the_volumes_own_policy_comes_first_then_its_attribute_then_the_setting() {
    use crate::params::RecoveryPolicy::*;
    let pods = vec![
        pod("old", Some("a"), Phase::Running, "pvc-1"),
        pod("new", Some("b"), Phase::Pending, "pvc-1"),
    ];
    let never = Settings {
        volume_attachment_recovery_policy: Never,
        ..Settings::default()
    };
    // The stored volume says immediate: recovered although the setting says never.
    assert_eq!(
        plan_len(
            &view_of(pods.clone()),
            &stored_on_a(Some(Immediate)),
            &never
        ),
        1
    );
    // Only the PersistentVolume's attribute says immediate.
    let mut view = view_of(pods.clone());
    view.volumes.get_mut("pvc-1").unwrap().policy = Some(Immediate);
    assert_eq!(plan_len(&view, &stored_on_a(None), &never), 1);
    // Neither: the setting, never, holds the volume, and says so once as a lasting state.
    let held = plan(&view_of(pods), &stored_on_a(None), &never, NOW);
    assert!(held.attachments.is_empty() && held.fences.is_empty());
    assert_eq!(held.notices.len(), 1);
    let n = &held.notices[0];
    assert_eq!(n.key.as_deref(), Some("attachment/csi-1"));
    assert_eq!(n.reason, "RecoveryWaiting");
    assert!(
        n.note.contains("\"never\"") && n.note.contains("pod old"),
        "{}",
        n.note
    );
    assert_eq!(n.claims, [("apps".to_string(), "data".to_string())]);
    assert_eq!(n.pods.len(), 2);
}

fn plan_len(view: &ClusterView, stored: &HashMap<String, Arc<Volume>>, s: &Settings) -> usize {
    plan(view, stored, s, NOW).attachments.len()
}

#[test]
fn a_terminating_pod_on_a_down_node_is_planned_after_its_fence_and_its_attachment() {
    let settings = Settings {
        node_down_pod_deletion_policy: NodeDownPodDeletionPolicy::DeleteStatefulSetPod,
        ..Settings::default()
    };
    let web = deleting(
        owned(
            pod("web-0", Some("a"), Phase::Running, "pvc-1"),
            Owner::StatefulSet,
        ),
        NOW - 1,
    );
    let plan = plan(&view_of(vec![web]), &stored_on_a(None), &settings, NOW);
    assert_eq!(plan.fences, BTreeSet::from([target("pvc-1", "a")]));
    assert_eq!(plan.attachments.len(), 1);
    assert!(
        plan.attachments[0].why.contains("web-0"),
        "{}",
        plan.attachments[0].why
    );
    assert_eq!(plan.force_deletes.len(), 1);
    let f = &plan.force_deletes[0];
    assert_eq!(
        (f.pod.name.as_str(), f.needs.as_slice()),
        ("web-0", [target("pvc-1", "a")].as_slice())
    );
    assert_eq!(f.claims, [("apps".to_string(), "data".to_string())]);
}

/// `wait` and `immediate` move the volume away from a pod on the down node that is still
/// there: once fenced, a terminating one is marked Failed (else the attach-detach controller
/// keeps its volume there); one that is not being deleted never is.
#[test]
fn a_terminating_pod_holding_a_recovered_volume_is_marked_failed_after_its_fence() {
    use crate::params::RecoveryPolicy::*;
    let old = deleting(pod("old", Some("a"), Phase::Running, "pvc-1"), NOW - 1);
    let new = pod("new", Some("b"), Phase::Pending, "pvc-1");
    for policy in [Wait, Immediate] {
        let settings = Settings {
            volume_attachment_recovery_policy: policy,
            ..Settings::default()
        };
        let view = view_of(vec![old.clone(), new.clone()]);
        let p = plan(&view, &stored_on_a(None), &settings, NOW);
        assert_eq!(p.fences, BTreeSet::from([target("pvc-1", "a")]), "{policy}");
        assert_eq!(p.attachments.len(), 1, "{policy}");
        assert_eq!(p.terminate.len(), 1, "{policy}: {:?}", p.terminate);
        let m = &p.terminate[0];
        assert_eq!(m.pod.name, "old");
        assert_eq!(m.needs, [target("pvc-1", "a")]);
        assert_eq!(m.volume.as_deref(), Some("pvc-1"));
        assert_eq!(m.claims, [("apps".to_string(), "data".to_string())]);
        assert!(
            p.force_deletes.is_empty(),
            "{policy}: not deleted, only marked"
        );
    }
    // `wait` with the grace period still running: nothing yet.
    let early = deleting(pod("old", Some("a"), Phase::Running, "pvc-1"), NOW + 5_000);
    let wait = Settings {
        volume_attachment_recovery_policy: Wait,
        ..Settings::default()
    };
    let p = plan(
        &view_of(vec![early, new.clone()]),
        &stored_on_a(None),
        &wait,
        NOW,
    );
    assert!(p.terminate.is_empty() && p.fences.is_empty(), "{p:?}");
    // `immediate` with the old pod not being deleted: the attachment goes, the pod is left.
    let running = pod("old", Some("a"), Phase::Running, "pvc-1");
    let immediate = Settings {
        volume_attachment_recovery_policy: Immediate,
        ..Settings::default()
    };
    let p = plan(
        &view_of(vec![running, new.clone()]),
        &stored_on_a(None),
        &immediate,
        NOW,
    );
    assert_eq!(p.attachments.len(), 1);
    assert!(p.terminate.is_empty(), "{:?}", p.terminate);
    // A pod already Failed (an earlier pass marked it): the seed case, nothing to mark.
    let failed = deleting(pod("old", Some("a"), Phase::Terminated, "pvc-1"), NOW - 1);
    let p = plan(&view_of(vec![failed, new]), &stored_on_a(None), &wait, NOW);
    assert_eq!(p.attachments.len(), 1);
    assert!(p.terminate.is_empty(), "{:?}", p.terminate);
}

#[test]
fn the_failover_needs_every_volume_attached_on_the_node_fenced() {
    let settings = Settings {
        node_down_failover_seconds: 30,
        ..Settings::default()
    };
    let mut stored = stored_on_a(None);
    // Attached on the down node, used by no pod Kubernetes shows.
    stored.insert(
        "pvc-9".into(),
        Arc::new(fx::stored("pvc-9", 3, Some(("a", 3)))),
    );
    stored.insert(
        "pvc-8".into(),
        Arc::new(fx::stored("pvc-8", 3, Some(("b", 3)))),
    );
    let db = owned(
        pod("db-0", Some("a"), Phase::Running, "pvc-1"),
        Owner::StatefulSet,
    );
    let bare = owned(pod("solo", Some("a"), Phase::Running, "pvc-1"), Owner::None);
    let plan = plan(&view_of(vec![db, bare]), &stored, &settings, NOW);
    assert_eq!(plan.force_deletes.len(), 1, "only the StatefulSet's pod");
    assert_eq!(
        plan.force_deletes[0].needs,
        [target("pvc-1", "a"), target("pvc-9", "a")]
    );
    assert_eq!(
        plan.fences,
        BTreeSet::from([target("pvc-1", "a"), target("pvc-9", "a")])
    );
    assert_eq!(plan.attachments[0].needs, plan.force_deletes[0].needs);
    // The failover's pods wait for the node's taint, which the plan puts on first.
    assert!(plan.force_deletes[0].needs_taint);
    assert_eq!(plan.taint, BTreeSet::from(["a".to_string()]));
    assert!(plan.untaint.is_empty());
}

/// The failover taint goes on a down node whose pods fail over, once; it comes off a node
/// that is up again, and stays on one still down.
#[test]
fn the_failover_taint_goes_on_before_the_pods_are_deleted_and_off_when_the_node_is_up() {
    let settings = Settings {
        node_down_failover_seconds: 30,
        ..Settings::default()
    };
    let db = || {
        owned(
            pod("db-0", Some("a"), Phase::Running, "pvc-1"),
            Owner::StatefulSet,
        )
    };
    let mut view = view_of(vec![db()]);
    view.tainted.insert("a".into());
    let p = plan(&view, &stored_on_a(None), &settings, NOW);
    assert!(p.taint.is_empty(), "tainted already: {:?}", p.taint);
    assert!(p.untaint.is_empty(), "still down");
    assert_eq!(p.force_deletes.len(), 1);
    // The node is up again: its taint comes off, and nothing is deleted.
    view.down.remove("a");
    let p = plan(&view, &stored_on_a(None), &settings, NOW);
    assert_eq!(p.untaint, BTreeSet::from(["a".to_string()]));
    assert!(p.force_deletes.is_empty() && p.taint.is_empty());
    // A pod deletion policy's force-delete (no failover) needs no taint.
    let policy = Settings {
        node_down_pod_deletion_policy: NodeDownPodDeletionPolicy::DeleteStatefulSetPod,
        ..Settings::default()
    };
    let p = plan(
        &view_of(vec![deleting(db(), NOW - 1)]),
        &stored_on_a(None),
        &policy,
        NOW,
    );
    assert_eq!(p.force_deletes.len(), 1);
    assert!(!p.force_deletes[0].needs_taint && p.taint.is_empty());
}

/// A node is down from the earlier of Kubernetes' and Palisade's own judgment.
#[test]
fn a_node_is_down_from_the_earlier_of_its_node_and_its_agent() {
    use crate::k8s::recovery::view::EarliestDown;
    use crate::k8s::recovery::NodeHealth;
    let health = EarliestDown {
        kubernetes: Arc::new(|name: &str, _: Option<&k8s_openapi::api::core::v1::Node>| {
            (name != "up").then_some(5_000)
        }),
        agents: HashMap::from([("a".to_string(), 2_000), ("up".to_string(), 7_000)]),
    };
    assert_eq!(health.down_since("a", None), Some(2_000));
    assert_eq!(health.down_since("b", None), Some(5_000));
    assert_eq!(
        health.down_since("up", None),
        Some(7_000),
        "the agent alone"
    );
}

#[test]
fn a_pod_whose_volume_moved_under_it_is_planned_for_deletion_and_a_bare_one_reported() {
    let stored = HashMap::from([(
        "pvc-1".to_string(),
        Arc::new(fx::stored("pvc-1", 2, Some(("c", 2)))),
    )]);
    let app = pod("app", Some("b"), Phase::Running, "pvc-1");
    let solo = owned(pod("solo", Some("b"), Phase::Running, "pvc-1"), Owner::None);
    let plan = plan(
        &view_of(vec![app, solo]),
        &stored,
        &Settings::default(),
        NOW,
    );
    assert_eq!(plan.deletes.len(), 1);
    assert_eq!(plan.deletes[0].pod.name, "app");
    assert_eq!(plan.deletes[0].volume.as_deref(), Some("pvc-1"));
    assert!(
        plan.deletes[0].why.contains("node c"),
        "{}",
        plan.deletes[0].why
    );
    assert_eq!(plan.notices.len(), 1);
    assert_eq!(plan.notices[0].reason, "PodNotDeleted");
    // Its VolumeAttachment on its own node, stale, goes with it (without a fence: the
    // attachment there is gone or fenced already); the one on the down node a is the
    // recovery policy's.
    let mut with_va = view_of(vec![pod("app", Some("b"), Phase::Running, "pvc-1")]);
    let mut stale = with_va.attachments[0].clone();
    stale.name = "csi-b".into();
    stale.node = "b".into();
    with_va.attachments.push(stale);
    let p = super::plan(&with_va, &stored, &Settings::default(), NOW);
    let on_b: Vec<&RemoveAttachment> = p.attachments.iter().filter(|a| a.va.node == "b").collect();
    assert_eq!(on_b.len(), 1, "{:?}", p.attachments);
    assert_eq!(on_b[0].va.name, "csi-b");
    assert!(on_b[0].needs.is_empty());
    assert_eq!(p.deletes.len(), 1);
    let off = Settings {
        auto_delete_pod_when_volume_detached_unexpectedly: false,
        ..Settings::default()
    };
    let view = view_of(vec![pod("app", Some("b"), Phase::Running, "pvc-1")]);
    assert!(plan_deletes(&view, &stored, &off));
}

fn plan_deletes(view: &ClusterView, stored: &HashMap<String, Arc<Volume>>, s: &Settings) -> bool {
    plan(view, stored, s, NOW).deletes.is_empty()
}

// --- the pass against a mocked API server ---

/// What happened, in order: fences and API requests.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Fence {
        replica: String,
        epoch: u64,
    },
    Api {
        method: String,
        path: String,
        body: Value,
    },
}

type Log = Arc<Mutex<Vec<Entry>>>;

struct LogFencer(Log);

#[async_trait::async_trait]
impl Fencer for LogFencer {
    async fn fence(
        &self,
        _: &str,
        _: &str,
        replica: &str,
        epoch: u64,
        _: &str,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(Entry::Fence {
            replica: replica.to_string(),
            epoch,
        });
        Ok(())
    }
}

/// The paths the API server answers 404 for.
type Missing = Arc<Mutex<HashSet<String>>>;

/// An API server that records every request and answers as the real one would (the paths in
/// `missing` answer 404), until the client is dropped.
fn api_server(log: Log, missing: Missing) -> (kube::Client, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            log.lock().unwrap().push(Entry::Api {
                method: method.clone(),
                path: path.clone(),
                body: body.clone(),
            });
            let gone = missing.lock().unwrap().contains(&path);
            let (code, answer) = if gone {
                (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            } else if method == "GET" && path.starts_with("/api/v1/nodes/") {
                // A Node with no taints, for the failover taint's read-modify-write.
                let name = path.trim_start_matches("/api/v1/nodes/");
                (
                    200,
                    json!({"kind": "Node", "apiVersion": "v1",
                    "metadata": {"name": name, "resourceVersion": "7"}, "spec": {}}),
                )
            } else if method == "POST" {
                (201, body)
            } else if method == "PATCH" {
                (200, body)
            } else if method == "DELETE" {
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "code": 200}),
                )
            } else {
                panic!("unexpected request {method} {path}");
            };
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), task)
}

/// A controller on an embedded store: node `a` down (its heartbeat long gone), `b` and `c`
/// up; each volume attached on `a` at epoch 1, with a ready replica on each node listed.
async fn controller(
    dir: &std::path::Path,
    log: &Log,
    volumes: &[(&str, &[&str])],
    settings: Settings,
) -> Arc<Controller> {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("db.redb")).unwrap());
    store
        .settings()
        .put(SETTINGS_KEY, settings, None)
        .await
        .unwrap();
    let node = |id: &str| Node {
        id: id.into(),
        address: format!("{id}.test:9502"),
        agent_address: String::new(),
        zone: None,
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: 1,
        disks: vec![],
    };
    store.nodes().put("a", node("a"), None).await.unwrap();
    for (id, replicas) in volumes {
        store
            .volumes()
            .put(id, fx::stored(id, 1, Some(("a", 1))), None)
            .await
            .unwrap();
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
    let agent = Arc::new(LocalAgent::new("b".into(), HashMap::new()));
    let c = Controller::new(store, agent, ControllerConfig::default()).with_fencing(Fencing {
        secret: Arc::new(vec![7; 32]),
        fencer: Arc::new(LogFencer(log.clone())),
        lease_ms: 100,
    });
    c.heartbeat(node("b")).await.unwrap();
    c.heartbeat(node("c")).await.unwrap();
    Arc::new(c)
}

/// A recovery controller talking to a mocked API server.
struct Mocked {
    recovery: Recovery,
    server: tokio::task::JoinHandle<()>,
    missing: Missing,
}

impl Mocked {
    fn start(controller: &Arc<Controller>, log: &Log) -> Mocked {
        let missing = Missing::default();
        let (client, server) = api_server(log.clone(), missing.clone());
        let recovery = Recovery::new(
            controller.clone(),
            client,
            RecoveryConfig::new(DRIVER, Some("test".into())),
            Arc::new(NodeReady),
        );
        Mocked {
            recovery,
            server,
            missing,
        }
    }

    /// One pass; every request it made has been answered (and logged) when it returns.
    async fn pass(&self, snapshot: &Snapshot) -> PassReport {
        self.recovery.pass(snapshot).await.unwrap()
    }

    fn answer_404(&self, path: &str) {
        self.missing.lock().unwrap().insert(path.to_string());
    }

    /// Drops the client and waits for the server to finish.
    async fn stop(self) {
        drop(self.recovery);
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .unwrap()
            .unwrap();
    }
}

/// The Events posted: (reason, type, kind of the object, its name).
fn events(log: &Log) -> Vec<(String, String, String, String)> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Entry::Api { method, path, body } if method == "POST" && path.ends_with("/events") => {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                Some((
                    s(&body["reason"]),
                    s(&body["type"]),
                    s(&body["regarding"]["kind"]),
                    s(&body["regarding"]["name"]),
                ))
            }
            _ => None,
        })
        .collect()
}

/// The index in the log of the first entry `f` picks.
fn position(log: &Log, f: impl Fn(&Entry) -> bool) -> Option<usize> {
    log.lock().unwrap().iter().position(f)
}

fn deletes(log: &Log) -> Vec<(String, Value)> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Entry::Api { method, path, body } if method == "DELETE" => {
                Some((path.clone(), body.clone()))
            }
            _ => None,
        })
        .collect()
}

fn ev(reason: &str, kind: &str, name: &str) -> (String, String, String, String) {
    let type_ = match reason {
        "RecoveryRefused" | "PodForceDeleted" | "PodDeleted" | "PodNotDeleted" => "Warning",
        _ => "Normal",
    };
    (reason.into(), type_.into(), kind.into(), name.into())
}

const VA_PATH: &str = "/apis/storage.k8s.io/v1/volumeattachments/csi-1";

fn new_pod() -> PodSpec<'static> {
    PodSpec {
        name: "web-1-new",
        node: Some("b"),
        phase: "Pending",
        claim: "data",
        owner: Some(("ReplicaSet", "web-1")),
        deletion: None,
    }
}

/// The seed's case: the old pod was force-deleted, its replacement waits on node b. The
/// attachment on down node a is fenced (the replica on b persists epoch 2; the one on a is
/// marked failed), and only then is the VolumeAttachment deleted, with its uid as a
/// precondition; the Events say so on the pod and the claim. A second pass (the
/// VolumeAttachment is gone meanwhile) fences at the same epoch and reports nothing new.
#[tokio::test]
async fn the_stale_attachment_is_deleted_only_after_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Log::default();
    let settings = Settings {
        volume_attachment_recovery_policy: crate::params::RecoveryPolicy::Never,
        ..Settings::default()
    };
    let c = controller(dir.path(), &log, &[("pvc-1", &["b", "a"])], settings).await;
    let snap = snapshot(&[new_pod()]);
    let api = Mocked::start(&c, &log);

    let report = api.pass(&snap).await;
    assert_eq!(report.fenced, [target("pvc-1", "a")]);
    assert_eq!(report.attachments_removed, ["csi-1"]);
    assert!(report.pods_force_deleted.is_empty() && report.pods_deleted.is_empty());
    let fenced = position(
        &log,
        |e| matches!(e, Entry::Fence { replica, epoch: 2 } if replica == "pvc-1-r-0"),
    )
    .unwrap();
    let deleted = position(
        &log,
        |e| matches!(e, Entry::Api { method, path, .. } if method == "DELETE" && path == VA_PATH),
    )
    .unwrap();
    assert!(fenced < deleted, "{:?}", log.lock().unwrap());
    assert_eq!(
        deletes(&log),
        [(
            VA_PATH.to_string(),
            json!({"preconditions": {"uid": "uid-csi-1"}})
        )]
    );
    assert_eq!(
        events(&log),
        [
            ev("VolumeFenced", "Pod", "web-1-new"),
            ev("VolumeFenced", "PersistentVolumeClaim", "data"),
            ev("StaleAttachmentRemoved", "Pod", "web-1-new"),
            ev("StaleAttachmentRemoved", "PersistentVolumeClaim", "data"),
        ]
    );
    let volume = c.get_volume("pvc-1").await.unwrap().unwrap();
    assert_eq!(volume.epoch, 2);
    let on_a = c
        .store()
        .replicas()
        .get("pvc-1-r-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        on_a.value.state,
        ReplicaState::Failed,
        "the down node's member"
    );

    // Again, as after a restart: the same epoch, the VolumeAttachment already gone.
    log.lock().unwrap().clear();
    api.answer_404(VA_PATH);
    let report = api.pass(&snap).await;
    api.stop().await;
    assert_eq!(report.attachments_removed, ["csi-1"]);
    assert_eq!(c.get_volume("pvc-1").await.unwrap().unwrap().epoch, 2);
    assert!(events(&log).is_empty(), "{:?}", events(&log));
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|e| !matches!(e, Entry::Fence { epoch, .. } if *epoch != 2)));
}

/// Every member of the volume is on the down node: nothing can be fenced, so nothing is
/// deleted and nothing changes in the store (the epoch, the member); the refusal is a
/// Warning on the pod and the claim, once however many passes try.
#[tokio::test]
async fn an_unfenceable_volume_deletes_nothing_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Log::default();
    let c = controller(dir.path(), &log, &[("pvc-1", &["a"])], Settings::default()).await;
    let snap = snapshot(&[new_pod()]);
    let api = Mocked::start(&c, &log);
    for pass in 0..2 {
        let report = api.pass(&snap).await;
        assert_eq!(report.refused.len(), 1);
        assert!(
            report.refused[0].1.contains("cannot be fenced"),
            "{}",
            report.refused[0].1
        );
        assert!(report.attachments_removed.is_empty());
        assert!(deletes(&log).is_empty(), "pass {pass}: {:?}", deletes(&log));
        assert_eq!(c.get_volume("pvc-1").await.unwrap().unwrap().epoch, 1);
        let member = c
            .store()
            .replicas()
            .get("pvc-1-r-0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(member.value.state, ReplicaState::Ready, "left as it was");
    }
    api.stop().await;
    assert_eq!(
        events(&log),
        [
            ev("RecoveryRefused", "Pod", "web-1-new"),
            ev("RecoveryRefused", "PersistentVolumeClaim", "data"),
        ]
    );
}

/// node-down-pod-deletion-policy: the StatefulSet's terminating pod on down node a, past its
/// grace period, is force-deleted (gracePeriodSeconds 0, its uid as a precondition) after its
/// attachment is fenced and its VolumeAttachment deleted.
#[tokio::test]
async fn a_terminating_pod_on_a_down_node_is_force_deleted_after_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Log::default();
    let settings = Settings {
        node_down_pod_deletion_policy:
            NodeDownPodDeletionPolicy::DeleteBothStatefulSetAndDeploymentPod,
        ..Settings::default()
    };
    let c = controller(dir.path(), &log, &[("pvc-1", &["b", "a"])], settings).await;
    let snap = snapshot(&[PodSpec {
        name: "db-0",
        node: Some("a"),
        phase: "Running",
        claim: "data",
        owner: Some(("StatefulSet", "db")),
        deletion: Some((now_ms() - 1_000, 30)),
    }]);
    let api = Mocked::start(&c, &log);
    let report = api.pass(&snap).await;
    api.stop().await;
    assert_eq!(report.pods_force_deleted, ["apps/db-0"]);
    let pod_path = "/api/v1/namespaces/apps/pods/db-0";
    assert_eq!(
        deletes(&log),
        [
            (
                VA_PATH.to_string(),
                json!({"preconditions": {"uid": "uid-csi-1"}})
            ),
            (
                pod_path.to_string(),
                json!({"gracePeriodSeconds": 0, "preconditions": {"uid": "uid-db-0"}})
            ),
        ]
    );
    let fenced = position(&log, |e| matches!(e, Entry::Fence { .. })).unwrap();
    let va = position(
        &log,
        |e| matches!(e, Entry::Api { path, .. } if path == VA_PATH),
    )
    .unwrap();
    assert!(fenced < va);
    assert!(events(&log).contains(&ev("PodForceDeleted", "Pod", "db-0")));
    assert!(events(&log).contains(&ev("PodForceDeleted", "PersistentVolumeClaim", "data")));
}

/// node-down-failover-seconds: the StatefulSet's pod on the down node is force-deleted only
/// once every Palisade volume attached there is fenced (here a bare pod's volume with its
/// only member on the dead node blocks it); the bare pod itself is never deleted.
#[tokio::test]
async fn the_failover_waits_for_every_volume_on_the_node_and_spares_bare_pods() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Log::default();
    let settings = Settings {
        node_down_failover_seconds: 30,
        ..Settings::default()
    };
    let c = controller(
        dir.path(),
        &log,
        &[("pvc-1", &["b", "a"]), ("pvc-2", &["a"])],
        settings,
    )
    .await;
    let mut snap = snapshot(&[
        PodSpec {
            name: "db-0",
            node: Some("a"),
            phase: "Running",
            claim: "data",
            owner: Some(("StatefulSet", "db")),
            deletion: None,
        },
        PodSpec {
            name: "solo",
            node: Some("a"),
            phase: "Running",
            claim: "solo-data",
            owner: None,
            deletion: None,
        },
    ]);
    snap.volumes.push(Arc::new(k8s_pv(
        "pvc-2",
        "pvc-2",
        "solo-data",
        DRIVER,
        None,
    )));
    snap.claims.push(Arc::new(k8s_pvc("solo-data", "pvc-2")));
    snap.attachments
        .push(Arc::new(k8s_va("csi-2", "pvc-2", "a", true, DRIVER)));

    let api = Mocked::start(&c, &log);
    let report = api.pass(&snap).await;
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(deletes(&log).is_empty(), "{:?}", deletes(&log));

    // pvc-2 gets a member on a node that is up: everything on a can be fenced now.
    let replica = Replica {
        id: "pvc-2-r-9".into(),
        volume_id: "pvc-2".into(),
        node_id: "c".into(),
        disk_id: "d0".into(),
        path: Default::default(),
        size: 8 << 20,
        state: ReplicaState::Ready,
        failed_ms: 0,
        rebuilt_percent: None,
    };
    c.store()
        .replicas()
        .put("pvc-2-r-9", replica, None)
        .await
        .unwrap();
    log.lock().unwrap().clear();
    let report = api.pass(&snap).await;
    api.stop().await;
    assert!(report.refused.is_empty(), "{report:?}");
    assert_eq!(report.pods_force_deleted, ["apps/db-0"]);
    let paths: Vec<String> = deletes(&log).into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, [VA_PATH, "/api/v1/namespaces/apps/pods/db-0"]);
    // The Node is tainted first, with the resourceVersion read, so that the replacement is
    // not scheduled back onto it.
    let tainted = position(&log, |e| {
        matches!(e, Entry::Api { method, path, body } if method == "PATCH"
            && path == "/api/v1/nodes/a"
            && body["spec"]["taints"] == json!([{"key": "palisade.io/node-down", "value": "failover", "effect": "NoSchedule"}])
            && body["metadata"]["resourceVersion"] == "7")
    })
    .expect("the failover taint patched onto node a");
    let deleted = position(
        &log,
        |e| matches!(e, Entry::Api { method, path, .. } if method == "DELETE" && path.ends_with("/pods/db-0")),
    )
    .unwrap();
    assert!(tainted < deleted, "{:?}", log.lock().unwrap());
}

/// auto-delete-pod-when-volume-detached-unexpectedly: a running Deployment pod on a node that
/// is up, whose volume is attached elsewhere now, is deleted gracefully (no grace period
/// given, its uid as a precondition); a bare pod in the same state is reported, once, and
/// never deleted.
#[tokio::test]
async fn a_pod_whose_volume_moved_is_deleted_and_a_bare_one_only_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log: Log = Log::default();
    let c = controller(dir.path(), &log, &[], Settings::default()).await;
    for id in ["pvc-1", "pvc-2"] {
        c.store()
            .volumes()
            .put(id, fx::stored(id, 2, Some(("c", 2))), None)
            .await
            .unwrap();
    }
    let app = PodSpec {
        name: "app",
        node: Some("b"),
        phase: "Running",
        claim: "data",
        owner: Some(("ReplicaSet", "web-1")),
        deletion: None,
    };
    let solo = PodSpec {
        name: "solo",
        node: Some("b"),
        phase: "Running",
        claim: "solo-data",
        owner: None,
        deletion: None,
    };
    let mut snap = snapshot(&[app, solo]);
    snap.attachments.clear();
    snap.volumes.push(Arc::new(k8s_pv(
        "pvc-2",
        "pvc-2",
        "solo-data",
        DRIVER,
        None,
    )));
    snap.claims.push(Arc::new(k8s_pvc("solo-data", "pvc-2")));
    let api = Mocked::start(&c, &log);

    let report = api.pass(&snap).await;
    assert_eq!(report.pods_deleted, ["apps/app"]);
    assert_eq!(
        deletes(&log),
        [(
            "/api/v1/namespaces/apps/pods/app".to_string(),
            json!({"preconditions": {"uid": "uid-app"}})
        )]
    );
    assert_eq!(
        events(&log),
        [
            ev("PodDeleted", "Pod", "app"),
            ev("PodDeleted", "PersistentVolumeClaim", "data"),
            ev("PodNotDeleted", "Pod", "solo"),
        ]
    );
    // The next pass: the deleted pod is terminating, the bare one was reported already.
    log.lock().unwrap().clear();
    let mut snap2 = snapshot(&[
        PodSpec {
            deletion: Some((now_ms() + 30_000, 30)),
            ..app
        },
        solo,
    ]);
    snap2.attachments.clear();
    snap2.volumes = snap.volumes.clone();
    snap2.claims = snap.claims.clone();
    let report = api.pass(&snap2).await;
    api.stop().await;
    assert_eq!(report, PassReport::default());
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
}
