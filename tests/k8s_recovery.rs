//! Palisade's recovery controller end to end on a real Kubernetes control plane (the harness
//! of tests/common/e2e.rs: the real kube-controller-manager with its attach-detach
//! controller, kube-scheduler, csi-provisioner and csi-attacher, `palisade controller
//! --store kubernetes`, three `palisade node` processes and emulated kubelets).
//!
//! The seed scenario of issue 12: a Deployment's pod with an RWO Palisade claim runs on a
//! node and writes; the node dies (its kubelet stops renewing, its Palisade node process is
//! SIGKILLed); the Node goes NotReady; the old pod is force-deleted, as an operator does;
//! Palisade fences the volume on the dead node and removes its stale VolumeAttachment, and
//! the replacement pod on another node gets the volume, with the data, in seconds instead of
//! Kubernetes' six minutes. Each phase's time is printed.
//!
//! kube-controller-manager runs with `--node-monitor-grace-period=20s` (default 50 s) and
//! `--node-monitor-period=1s` (default 5 s) so that the Node goes NotReady sooner; the
//! recovery itself runs with the attach-detach controller's default timings.
//!
//! Without `KUBEBUILDER_ASSETS` (or without the sidecars in it) every test prints a SKIPPED
//! line and passes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster;
use common::e2e::*;
use common::kubelet::{attachment_name, Container};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// The goal: the replacement's VolumeAttachment attached within this of the force-delete
/// (Kubernetes alone: 360.9 s).
const GOAL: Duration = Duration::from_secs(5);

/// The label of the Deployment's pods.
const APP: &str = "writer";

/// The timings of kube-controller-manager for these tests.
fn controller_manager_args() -> Vec<String> {
    vec![
        "--node-monitor-grace-period=20s".into(),
        "--node-monitor-period=1s".into(),
    ]
}

/// What each pod's container did: (pod name, "wrote" or "verified").
type Log = Arc<Mutex<Vec<(String, &'static str)>>>;

/// The container of the Deployment's pods: the first writes the marker of [`WRITE`] and
/// data derived from it (fsynced); a later one finds them and checks them, so that the
/// replacement proves the data survived.
fn write_once_container(log: Log) -> Container {
    Arc::new(move |pod: &Pod, mounts: &BTreeMap<String, PathBuf>| {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = mounts.get("data").ok_or("the volume data is not mounted")?;
        let Some(marker) = annotations.get(WRITE) else {
            return Ok(());
        };
        let seed = marker
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        let marker_file = dir.join("marker");
        let did = if marker_file.exists() {
            let found = std::fs::read_to_string(&marker_file)
                .map_err(|e| format!("reading the marker: {e}"))?;
            if &found != marker {
                return Err(format!("the marker is {found:?}, not {marker:?}"));
            }
            let data =
                std::fs::read(dir.join("data")).map_err(|e| format!("reading the data: {e}"))?;
            if data != cluster::pattern(seed, DATA_BYTES) {
                return Err("the data differs from what was written".into());
            }
            "verified"
        } else {
            cluster::write_synced(&dir.join("data"), &cluster::pattern(seed, DATA_BYTES))
                .map_err(|e| format!("writing the data: {e}"))?;
            cluster::write_synced(&marker_file, marker.as_bytes())
                .map_err(|e| format!("writing the marker: {e}"))?;
            "wrote"
        };
        log.lock().expect("the container log").push((name, did));
        Ok(())
    })
}

/// A Deployment of one pod with the claim mounted as its volume `data`, writing `marker`.
/// With `evict_after`, the pods tolerate an unreachable or not-ready node only that long
/// (default 300 s), so that they are evicted (Terminating, never confirmed) soon after.
async fn create_deployment(
    e: &E2e,
    name: &str,
    claim: &str,
    marker: &str,
    evict_after: Option<u32>,
) {
    let tolerations: Vec<serde_json::Value> = evict_after
        .map(|s| {
            ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"]
                .iter()
                .map(|key| json!({ "key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": s }))
                .collect()
        })
        .unwrap_or_default();
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": APP } },
            // RWO: the old pod must go before the new one starts.
            "strategy": { "type": "Recreate" },
            "template": {
                "metadata": { "labels": { "app": APP }, "annotations": { WRITE: marker } },
                "spec": {
                    "tolerations": tolerations,
                    "containers": [{
                        "name": "app",
                        "image": "emulated",
                        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                    }],
                    "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
                },
            },
        },
    }))
    .expect("a Deployment");
    e.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
}

/// The Deployment's pods that are not being deleted.
async fn live_pods(e: &E2e) -> Vec<Pod> {
    e.api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("list the pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

fn is_running(pod: &Pod) -> bool {
    let status = pod.status.clone().unwrap_or_default();
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn not_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status != "True"))
}

fn unreachable_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| {
            t.iter()
                .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoSchedule")
        })
}

/// The phases of one failover, each when first seen.
#[derive(Debug, Default)]
struct Phases {
    stopped: Option<Instant>,
    not_ready: Option<Instant>,
    force_deleted: Option<Instant>,
    stale_gone: Option<Instant>,
    attached: Option<Instant>,
    staged: Option<Instant>,
    running: Option<Instant>,
}

impl Phases {
    fn print(&self, origin: Instant) {
        let at = |t: Option<Instant>| {
            t.map(|t| format!("{:8.2} s", t.duration_since(origin).as_secs_f64()))
                .unwrap_or_else(|| "   never".to_string())
        };
        let after_force = |t: Option<Instant>| match (t, self.force_deleted) {
            (Some(t), Some(f)) => format!(
                "  (force-delete + {:.2} s)",
                t.saturating_duration_since(f).as_secs_f64()
            ),
            _ => String::new(),
        };
        eprintln!("phases, from the node's death:");
        eprintln!("  node stops                  {}", at(self.stopped));
        eprintln!("  Node NotReady               {}", at(self.not_ready));
        eprintln!("  old pod force-deleted/evicted {}", at(self.force_deleted));
        eprintln!(
            "  stale VolumeAttachment gone {}{}",
            at(self.stale_gone),
            after_force(self.stale_gone)
        );
        eprintln!(
            "  new VolumeAttachment attached{}{}",
            at(self.attached),
            after_force(self.attached)
        );
        eprintln!(
            "  NodeStage on the new node   {}{}",
            at(self.staged),
            after_force(self.staged)
        );
        eprintln!(
            "  replacement pod Running     {}{}",
            at(self.running),
            after_force(self.running)
        );
    }
}

/// The scenarios run one at a time, whatever the test harness's threads: each starts a whole
/// control plane and three nodes, and the goal is a measured time on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_deleted_pod_on_a_dead_node_is_replaced_in_seconds_with_its_data() {
    run_scenario(
        "k8s_recovery::a_force_deleted_pod_on_a_dead_node_is_replaced_in_seconds_with_its_data",
        |e| {
            Box::pin(failover(
                e,
                Scenario {
                    policy: None,
                    force_delete: true,
                    goal: Some(GOAL),
                },
            ))
        },
    )
    .await;
}

/// The immediate policy: the old pod is evicted (Terminating for ever, its kubelet dead) and
/// nobody force-deletes it; the replacement gets the volume once it is pending.
///
/// Not in the default run yet: the attach-detach controller keeps the Terminating pod's
/// volume until its 60 s sync, so the replacement attaches 26–34 s after the eviction on a
/// quiet machine, and once, under load, not within the test's 180 s. Issue 12 is not done
/// until this meets its goal; run it with `cargo test --test k8s_recovery -- --ignored`.
#[ignore = "issue 12 work in progress: timing depends on the attach-detach controller's 60 s sync"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_immediate_policy_an_evicted_pod_on_a_dead_node_is_replaced_without_a_human() {
    run_scenario(
        "k8s_recovery::with_the_immediate_policy_an_evicted_pod_on_a_dead_node_is_replaced_without_a_human",
        |e| {
            Box::pin(failover(
                e,
                Scenario {
                    policy: Some("immediate"),
                    force_delete: false,
                    goal: None,
                },
            ))
        },
    )
    .await;
}

/// Starts the control plane, Palisade and the kubelets (one scenario at a time), then runs
/// `scenario` in it.
async fn run_scenario(
    test: &str,
    scenario: for<'a> fn(&'a mut E2e) -> futures::future::BoxFuture<'a, ()>,
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let log: Log = Arc::default();
    let Some(e) = E2e::start_with(
        test,
        controller_manager_args(),
        write_once_container(log.clone()),
    )
    .await
    else {
        return;
    };
    logs().insert(e.test.clone(), log);
    e.run(scenario).await;
}

/// The containers' log of each running test, by test name.
fn logs() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, Log>> {
    static LOGS: std::sync::OnceLock<Mutex<std::collections::HashMap<String, Log>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a failover scenario does.
struct Scenario {
    /// `volumeAttachmentRecoveryPolicy` of the StorageClass (None: the setting, `wait`).
    policy: Option<&'static str>,
    /// The old pod is force-deleted once its node is NotReady (else it is evicted after 2 s
    /// and left Terminating).
    force_delete: bool,
    /// The replacement's VolumeAttachment must be attached within this of the force-delete
    /// (or of the eviction).
    goal: Option<Duration>,
}

async fn failover(e: &mut E2e, scenario: Scenario) {
    let log = logs().get(&e.test).expect("the container log").clone();
    let mut parameters = json!({
        "numberOfReplicas": "2",
        "csi.storage.k8s.io/fstype": "ext4",
    });
    if let Some(policy) = scenario.policy {
        parameters["volumeAttachmentRecoveryPolicy"] = json!(policy);
    }
    let class: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": { "name": "palisade-2" },
        "provisioner": DRIVER,
        "parameters": parameters,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .expect("a StorageClass");
    Api::<StorageClass>::all(e.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("create the StorageClass");
    e.create_claim("data", "palisade-2").await;
    let evict_after = (!scenario.force_delete).then_some(2);
    create_deployment(
        e,
        "writer",
        "data",
        "written before the node died",
        evict_after,
    )
    .await;
    let first: Pod = eventually("the Deployment's pod Running", 120, || async {
        match live_pods(e).await.as_slice() {
            [p] if is_running(p) => Ok(p.clone()),
            other => Err(format!(
                "{:?}",
                other
                    .iter()
                    .map(|p| (node_of(p), p.status.clone().and_then(|s| s.phase)))
                    .collect::<Vec<_>>()
            )),
        }
    })
    .await;
    let old_node = node_of(&first).expect("the pod's node");
    let old_name = first.metadata.name.clone().expect("a pod name");
    e.step(&format!("pod {old_name} runs on {old_node} and wrote"));
    assert_eq!(
        log.lock().unwrap().as_slice(),
        &[(old_name.clone(), "wrote")],
        "the first pod wrote the data"
    );
    let pv = e.bound_volume("data").await;
    let (handle, _) = volume_handle(&pv);
    e.wait_attachment(&handle, &old_node).await;
    let before = e.volumes()[0].clone();
    assert_eq!(
        before["attachment"]["node_id"],
        old_node.as_str(),
        "{before:#}"
    );
    let old_epoch = before["attachment"]["epoch"].as_u64().expect("an epoch");

    // The node dies: its kubelet stops renewing and its Palisade node process is gone.
    let mut phases = Phases::default();
    let origin = Instant::now();
    e.kubelet(&old_node).kill();
    e.cluster.kill9(&old_node);
    phases.stopped = Some(origin);
    e.step(&format!(
        "{old_node} dies (kubelet silent, palisade node SIGKILLed)"
    ));

    let nodes: Api<Node> = Api::all(e.client.clone());
    let (nodes, old) = (&nodes, old_node.as_str());
    eventually(&format!("Node {old} NotReady"), 120, || async move {
        let n = nodes.get(old).await.map_err(|e| e.to_string())?;
        if not_ready(&n) {
            Ok(())
        } else {
            Err("still Ready".to_string())
        }
    })
    .await;
    phases.not_ready = Some(Instant::now());
    e.step(&format!("Node {old} NotReady"));
    // The scheduler must not put the replacement back on the dead node.
    eventually(
        &format!("Node {old} tainted unreachable"),
        30,
        || async move {
            let n = nodes.get(old).await.map_err(|e| e.to_string())?;
            if unreachable_taint(&n) {
                Ok(())
            } else {
                Err(format!("{:?}", n.spec.and_then(|s| s.taints)))
            }
        },
    )
    .await;

    let forced = if scenario.force_delete {
        // The seed case: an operator force-deletes the pod that nobody can confirm.
        e.plane.kubectl_ok(&[
            "delete",
            "pod",
            "-n",
            NAMESPACE,
            &old_name,
            "--force",
            "--grace-period=0",
        ]);
        e.step(&format!("pod {old_name} force-deleted"));
        Instant::now()
    } else {
        let pods = &e.api::<Pod>();
        let old_name = old_name.as_str();
        eventually(&format!("pod {old_name} evicted"), 60, || async move {
            match pods.get_opt(old_name).await {
                Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => Ok(()),
                Ok(p) => Err(format!("{:?}", p.map(|p| p.metadata.deletion_timestamp))),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        e.step(&format!("pod {old_name} evicted (Terminating)"));
        Instant::now()
    };
    phases.force_deleted = Some(forced);

    // Every phase as first seen, polled together.
    let attachments: Api<VolumeAttachment> = Api::all(e.client.clone());
    let stale = attachment_name(&handle, DRIVER, &old_node);
    let deadline = forced + Duration::from_secs(180);
    let mut new_node: Option<String> = None;
    // Any VolumeAttachment attached on the dead node after the stale one went.
    let mut reattached = false;
    while phases.running.is_none() && Instant::now() < deadline {
        let now = Instant::now();
        if phases.stale_gone.is_none()
            && attachments
                .get_opt(&stale)
                .await
                .expect("get the stale VolumeAttachment")
                .is_none()
        {
            phases.stale_gone = Some(now);
            e.step("the stale VolumeAttachment is gone");
        }
        if phases.stale_gone.is_some() && !reattached {
            let va = attachments
                .get_opt(&stale)
                .await
                .expect("get the stale VolumeAttachment");
            if va.and_then(|va| va.status).is_some_and(|s| s.attached) {
                reattached = true;
                e.step("a VolumeAttachment on the dead node is attached again");
            }
        }
        let pods = live_pods(e).await;
        if new_node.is_none() {
            new_node = pods.iter().find_map(node_of).filter(|n| *n != old_node);
            if let Some(n) = &new_node {
                e.step(&format!("the replacement is scheduled to {n}"));
            }
        }
        if let Some(n) = &new_node {
            if phases.attached.is_none() {
                let va = attachments
                    .get_opt(&attachment_name(&handle, DRIVER, n))
                    .await
                    .expect("get the new VolumeAttachment");
                if va.and_then(|va| va.status).is_some_and(|s| s.attached) {
                    phases.attached = Some(now);
                    e.step(&format!("the VolumeAttachment on {n} is attached"));
                }
            }
            if phases.staged.is_none() {
                phases.staged = e.kubelet(n).staged_at(&handle).filter(|t| *t > forced);
            }
            if pods.iter().any(is_running) {
                phases.running = Some(now);
                e.step("the replacement pod is Running");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phases.print(origin);
    let events = Api::<Event>::namespaced(e.client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("list the events");
    for ev in &events.items {
        if ev.reason.as_deref().is_some_and(|r| r != "Scheduled") {
            eprintln!(
                "event {} {}: {} {}",
                ev.involved_object.kind.clone().unwrap_or_default(),
                ev.involved_object.name.clone().unwrap_or_default(),
                ev.reason.clone().unwrap_or_default(),
                ev.message.clone().unwrap_or_default()
            );
        }
    }

    let new_node = new_node.expect("the replacement was scheduled");
    let attached = phases
        .attached
        .expect("the replacement's VolumeAttachment attached");
    assert!(phases.running.is_some(), "the replacement pod Running");
    assert!(
        !reattached,
        "the volume was attached to the dead node again"
    );
    let took = attached.duration_since(forced);
    if let Some(goal) = scenario.goal {
        assert!(
            took <= goal,
            "the replacement's VolumeAttachment attached {:.2} s after the force-delete (goal {:.0} s)",
            took.as_secs_f64(),
            goal.as_secs_f64()
        );
    }
    let entries = log.lock().unwrap().clone();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        entries[1].1, "verified",
        "the replacement found the data: {entries:?}"
    );
    let after = e.volumes()[0].clone();
    assert_eq!(
        after["attachment"]["node_id"],
        new_node.as_str(),
        "{after:#}"
    );
    assert!(
        after["attachment"]["epoch"].as_u64().expect("an epoch") > old_epoch,
        "the new attachment has a higher epoch: {after:#}"
    );
}
