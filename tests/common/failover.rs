//! One node-failure scenario on the end-to-end harness (tests/common/e2e.rs), shared by
//! tests/k8s_recovery.rs and benches/node_failure.rs: a Deployment's pod with an RWO
//! Palisade claim runs on a node and writes; the node dies (its kubelet goes silent, its
//! Palisade node process is SIGKILLed, or SIGSTOPped to come back later); then what the
//! scenario's [`Trigger`] says happens (an operator force-deletes the pod, the pod is evicted
//! and left Terminating, an operator taints the node out-of-service, or nothing at all), and
//! every phase is timed as first seen, polled together every 100 ms, until the replacement
//! pod runs elsewhere or the scenario's deadline passes. When it runs, the replacement must
//! have found the first pod's data, and the volume must never have been attached to the dead
//! node again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::cluster;
use super::e2e::*;
use super::kubelet::{attachment_name, Container};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The label of the Deployment's pods.
pub const APP: &str = "writer";

/// The out-of-service taint an operator sets on a node known to be shut down.
pub const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// kube-controller-manager flags that make a Node go NotReady sooner (20 s instead of 50 s
/// without a renewal, checked every second instead of every 5 s); the recovery itself keeps
/// the attach-detach controller's default timings.
pub fn fast_node_monitor() -> Vec<String> {
    vec![
        "--node-monitor-grace-period=20s".into(),
        "--node-monitor-period=1s".into(),
    ]
}

/// What each pod's container did: (pod name, "wrote" or "verified").
pub type Log = Arc<Mutex<Vec<(String, &'static str)>>>;

/// The container of the Deployment's pods: the first writes the marker of [`WRITE`] and
/// data derived from it (fsynced); a later one finds them and checks them, so that the
/// replacement proves the data survived.
pub fn write_once_container(log: Log) -> Container {
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
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name, did));
        Ok(())
    })
}

/// The workload that owns the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// A Deployment (its ReplicaSet replaces an evicted pod at once, under a new name).
    Deployment,
    /// A StatefulSet (it recreates `writer-0` only once the old one is gone).
    StatefulSet,
}

/// A Deployment or StatefulSet of one pod with the claim mounted as its volume `data`,
/// writing `marker`. With `tolerate_s`, the pods tolerate an unreachable or not-ready node
/// only that long (default 300 s), so that they are evicted (Terminating, never confirmed)
/// soon after; with `grace_s`, that is their termination grace period (default 30 s).
pub async fn create_workload(
    e: &E2e,
    workload: Workload,
    claim: &str,
    marker: &str,
    tolerate_s: Option<u32>,
    grace_s: Option<u32>,
) {
    let tolerations: Vec<serde_json::Value> = tolerate_s
        .map(|s| {
            ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"]
                .iter()
                .map(|key| json!({ "key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": s }))
                .collect()
        })
        .unwrap_or_default();
    let mut spec = json!({
        "tolerations": tolerations,
        "containers": [{
            "name": "app",
            "image": "emulated",
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        }],
        "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
    });
    if let Some(g) = grace_s {
        spec["terminationGracePeriodSeconds"] = json!(g);
    }
    let template = json!({
        "metadata": { "labels": { "app": APP }, "annotations": { WRITE: marker } },
        "spec": spec,
    });
    match workload {
        Workload::Deployment => {
            let deployment: Deployment = serde_json::from_value(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": { "name": APP },
                "spec": {
                    "replicas": 1,
                    "selector": { "matchLabels": { "app": APP } },
                    // RWO: the old pod must go before the new one starts.
                    "strategy": { "type": "Recreate" },
                    "template": template,
                },
            }))
            .expect("a Deployment");
            e.api::<Deployment>()
                .create(&PostParams::default(), &deployment)
                .await
                .expect("create the Deployment");
        }
        Workload::StatefulSet => {
            let set: StatefulSet = serde_json::from_value(json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": { "name": APP },
                "spec": {
                    "replicas": 1,
                    "serviceName": APP,
                    "selector": { "matchLabels": { "app": APP } },
                    "template": template,
                },
            }))
            .expect("a StatefulSet");
            e.api::<StatefulSet>()
                .create(&PostParams::default(), &set)
                .await
                .expect("create the StatefulSet");
        }
    }
}

/// The Deployment's pods, and those not being deleted.
async fn app_pods(e: &E2e) -> Vec<Pod> {
    e.api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("list the pods")
        .items
}

pub fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

pub fn is_running(pod: &Pod) -> bool {
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

/// What happens once the node is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An operator force-deletes the old pod once its Node is NotReady and tainted
    /// unreachable (the seed case).
    ForceDelete,
    /// The old pod tolerates the dead node 2 s, is evicted, and stays Terminating (its
    /// kubelet is dead); its grace period is `grace_s`.
    Evicted { grace_s: u32 },
    /// An operator taints the Node out-of-service once it is NotReady.
    OutOfService,
    /// Nobody does anything; the pod tolerates the dead node for the default 300 s.
    Nothing,
}

/// The moment a scenario's goal counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The node's death.
    Death,
    /// The trigger: the force-delete, the eviction, the taint.
    Trigger,
    /// The replacement pod's creation.
    Replacement,
    /// The old pod's deletion timestamp: its eviction plus its grace period.
    GraceOver,
}

/// What the scenario waits for within its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The replacement's VolumeAttachment attached.
    Attached,
    /// The replacement pod Running.
    Running,
}

/// A failover scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// `volumeAttachmentRecoveryPolicy` of the StorageClass (None: the setting's).
    pub policy: Option<&'static str>,
    /// Palisade settings set before the Deployment is created.
    pub settings: Vec<(&'static str, String)>,
    pub trigger: Trigger,
    /// The goal: `until` within this of `from`. Checked only when the scenario must finish.
    pub goal: Option<(Duration, From, Until)>,
    /// How long after the node's death the scenario gives up waiting.
    pub deadline: Duration,
    /// False: the replacement need not run before the deadline (what Kubernetes does alone,
    /// capped); the phases are reported either way.
    pub must_finish: bool,
    /// SIGSTOP the node's Palisade process instead of SIGKILL, so that it can come back.
    pub freeze: bool,
    /// What owns the pod.
    pub workload: Workload,
    /// The Palisade controller runs with `--crash-after-recovery-fence` (it exits, as a kill
    /// -9 stops it, right after its recovery pass has fenced the volume and before it deletes
    /// anything); once it has, it is started again without.
    pub crash_after_fence: bool,
}

impl Scenario {
    pub fn new(trigger: Trigger) -> Scenario {
        Scenario {
            policy: None,
            settings: Vec::new(),
            trigger,
            goal: None,
            deadline: Duration::from_secs(240),
            must_finish: true,
            freeze: false,
            workload: Workload::Deployment,
            crash_after_fence: false,
        }
    }
}

/// The phases of one failover, each when first seen.
#[derive(Debug, Default, Clone)]
pub struct Phases {
    pub died: Option<Instant>,
    pub not_ready: Option<Instant>,
    /// The old pod Terminating (evicted), or gone (force-deleted).
    pub terminating: Option<Instant>,
    /// The trigger: the force-delete, the eviction, the out-of-service taint.
    pub trigger: Option<Instant>,
    pub replacement: Option<Instant>,
    /// The old pod's deletion timestamp (eviction + grace period).
    pub grace_over: Option<Instant>,
    pub stale_gone: Option<Instant>,
    pub attached: Option<Instant>,
    pub staged: Option<Instant>,
    pub running: Option<Instant>,
    pub controller_killed: Option<Instant>,
}

impl Phases {
    /// (name, time since the death) of every phase, in order.
    pub fn rows(&self) -> Vec<(&'static str, Option<f64>)> {
        let since = |t: Option<Instant>| {
            t.zip(self.died)
                .map(|(t, d)| t.saturating_duration_since(d).as_secs_f64())
        };
        vec![
            ("node stops", since(self.died)),
            ("Node NotReady", since(self.not_ready)),
            ("old pod Terminating/gone", since(self.terminating)),
            ("trigger (force-delete/eviction/taint)", since(self.trigger)),
            ("replacement pod created", since(self.replacement)),
            ("old pod's grace period over", since(self.grace_over)),
            ("stale VolumeAttachment gone", since(self.stale_gone)),
            ("new VolumeAttachment attached", since(self.attached)),
            ("NodeStage on the new node", since(self.staged)),
            ("replacement pod Running", since(self.running)),
        ]
    }

    pub fn print(&self) {
        eprintln!("phases, from the node's death:");
        for (name, at) in self.rows() {
            match at {
                Some(s) => eprintln!("  {name:<40} {s:8.2} s"),
                None => eprintln!("  {name:<40}    never"),
            }
        }
        if let (Some(k), Some(d)) = (self.controller_killed, self.died) {
            eprintln!(
                "  (Palisade controller crashed after fencing, restarted at {:.2} s)",
                k.saturating_duration_since(d).as_secs_f64()
            );
        }
    }

    pub fn from(&self, from: From) -> Option<Instant> {
        match from {
            From::Death => self.died,
            From::Trigger => self.trigger,
            From::Replacement => self.replacement,
            From::GraceOver => self.grace_over,
        }
    }
}

/// What a scenario ended with.
pub struct Outcome {
    pub phases: Phases,
    pub old_node: String,
    pub old_pod: Pod,
    pub new_node: Option<String>,
    pub pv: PersistentVolume,
    pub handle: String,
    /// The volume's attachment epoch before the node died.
    pub old_epoch: u64,
}

/// The StorageClass `palisade-2`: 2 replicas, ext4, WaitForFirstConsumer, with `policy`.
pub async fn storage_class(e: &E2e, policy: Option<&str>) {
    let extra: Vec<(&str, &str)> = policy
        .map(|p| ("volumeAttachmentRecoveryPolicy", p))
        .into_iter()
        .collect();
    e.storage_class_with("palisade-2", 2, &extra).await;
}

/// An instant `t` (wall clock) in this process's monotonic clock.
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    match SystemTime::now().duration_since(t) {
        Ok(ago) => now.checked_sub(ago).unwrap_or(now),
        Err(ahead) => now + ahead.duration(),
    }
}

fn system_time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(t.0.as_millisecond().max(0) as u64)
}

/// Runs `scenario` in `e`, with `log` the pods' container log; asserts what it must, prints
/// the phases and the Events, and returns what happened.
pub async fn failover(e: &mut E2e, scenario: &Scenario, log: &Log) -> Outcome {
    for (name, value) in &scenario.settings {
        e.cluster.ctl_ok(&["settings", "set", name, value]);
    }
    storage_class(e, scenario.policy).await;
    e.create_claim("data", "palisade-2").await;
    let (tolerate, grace) = match scenario.trigger {
        Trigger::Evicted { grace_s } => (Some(2), Some(grace_s)),
        _ => (None, None),
    };
    create_workload(
        e,
        scenario.workload,
        "data",
        "written before the node died",
        tolerate,
        grace,
    )
    .await;
    let first: Pod = eventually("the Deployment's pod Running", 120, || async {
        let pods = app_pods(e).await;
        match pods.as_slice() {
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

    // The node dies: its kubelet goes silent and its Palisade node process is gone (or
    // frozen).
    let mut phases = Phases::default();
    let died = Instant::now();
    e.kubelet(&old_node).kill();
    if scenario.freeze {
        let child = e
            .cluster
            .node(&old_node)
            .child
            .as_ref()
            .expect("the node runs");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    } else {
        e.cluster.kill9(&old_node);
    }
    phases.died = Some(died);
    e.step(&format!(
        "{old_node} dies (kubelet silent, palisade node {})",
        if scenario.freeze {
            "SIGSTOPped"
        } else {
            "SIGKILLed"
        }
    ));

    let nodes: Api<Node> = Api::all(e.client.clone());
    let pods_api = e.api::<Pod>();
    let attachments: Api<VolumeAttachment> = Api::all(e.client.clone());
    let stale = attachment_name(&handle, DRIVER, &old_node);
    let deadline = died + scenario.deadline;
    let mut new_node: Option<String> = None;
    // A VolumeAttachment attached on the dead node after the stale one went.
    let mut reattached = false;
    while phases.running.is_none() && Instant::now() < deadline {
        let now = Instant::now();
        let node = nodes.get(&old_node).await.expect("get the dead Node");
        if phases.not_ready.is_none() && not_ready(&node) {
            phases.not_ready = Some(now);
            e.step(&format!("Node {old_node} NotReady"));
        }
        let old = pods_api.get_opt(&old_name).await.expect("get the old pod");
        let old_uid = first.metadata.uid.clone();
        let old = old.filter(|p| p.metadata.uid == old_uid);
        if phases.terminating.is_none()
            && old
                .as_ref()
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        {
            phases.terminating = Some(now);
            e.step(&format!("the old pod {old_name} is Terminating or gone"));
            if let Some(ts) = old
                .as_ref()
                .and_then(|p| p.metadata.deletion_timestamp.as_ref())
            {
                phases.grace_over = Some(instant_of(system_time(ts)));
            }
        }
        if phases.trigger.is_none() {
            match scenario.trigger {
                Trigger::ForceDelete if phases.not_ready.is_some() && unreachable_taint(&node) => {
                    // The seed case: an operator force-deletes the pod nobody can confirm.
                    e.plane.kubectl_ok(&[
                        "delete",
                        "pod",
                        "-n",
                        NAMESPACE,
                        &old_name,
                        "--force",
                        "--grace-period=0",
                    ]);
                    phases.trigger = Some(Instant::now());
                    e.step(&format!("pod {old_name} force-deleted"));
                }
                Trigger::Evicted { .. } if phases.terminating.is_some() => {
                    phases.trigger = phases.terminating;
                }
                Trigger::OutOfService if phases.not_ready.is_some() => {
                    let patch = json!({ "spec": { "taints": [
                        { "key": "node.kubernetes.io/unreachable", "effect": "NoSchedule" },
                        { "key": OUT_OF_SERVICE, "value": "nodeshutdown", "effect": "NoExecute" },
                    ] } });
                    nodes
                        .patch(&old_node, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .expect("taint the Node out-of-service");
                    phases.trigger = Some(Instant::now());
                    e.step(&format!("Node {old_node} tainted {OUT_OF_SERVICE}"));
                }
                _ => {}
            }
        }
        if scenario.crash_after_fence && phases.controller_killed.is_none() {
            let exited = e
                .cluster
                .controller
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                e.step("the Palisade controller exited right after fencing; started again");
                phases.controller_killed = Some(Instant::now());
                e.cluster
                    .controller_args
                    .retain(|a| a != "--crash-after-recovery-fence");
                e.cluster.restart_controller().await;
                e.step("the Palisade controller is back");
            }
        }
        let va = attachments
            .get_opt(&stale)
            .await
            .expect("get the stale VolumeAttachment");
        if phases.stale_gone.is_none() && va.is_none() {
            phases.stale_gone = Some(now);
            e.step("the stale VolumeAttachment is gone");
        }
        if phases.stale_gone.is_some()
            && !reattached
            && va.and_then(|va| va.status).is_some_and(|s| s.attached)
        {
            reattached = true;
            e.step("a VolumeAttachment on the dead node is attached again");
        }
        let pods = app_pods(e).await;
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.uid != old_uid && p.metadata.deletion_timestamp.is_none())
            .collect();
        if phases.replacement.is_none() {
            if let Some(p) = live.first() {
                phases.replacement = Some(
                    p.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| instant_of(system_time(t)))
                        .unwrap_or(now),
                );
                e.step(&format!(
                    "the replacement pod {} exists",
                    p.metadata.name.clone().unwrap_or_default()
                ));
            }
        }
        if new_node.is_none() {
            new_node = live.iter().find_map(|p| node_of(p));
            if let Some(n) = &new_node {
                e.step(&format!("the replacement is scheduled to {n}"));
                assert_ne!(
                    n, &old_node,
                    "the replacement was scheduled to the dead node"
                );
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
                phases.staged = e.kubelet(n).staged_at(&handle).filter(|t| *t > died);
            }
            if live.iter().any(|p| is_running(p)) {
                phases.running = Some(now);
                e.step("the replacement pod is Running");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phases.print();
    print_events(e).await;

    assert!(
        !reattached,
        "the volume was attached to the dead node again"
    );
    let outcome = Outcome {
        phases: phases.clone(),
        old_node,
        old_pod: first,
        new_node: new_node.clone(),
        pv,
        handle,
        old_epoch,
    };
    if !scenario.must_finish && phases.running.is_none() {
        return outcome;
    }
    let new_node = new_node.expect("the replacement was scheduled");
    assert!(
        phases.running.is_some(),
        "the replacement pod Running within {:.0} s of the node's death",
        scenario.deadline.as_secs_f64()
    );
    if let Some((goal, from, until)) = scenario.goal {
        let start = phases.from(from).expect("the goal's start was seen");
        let end = match until {
            Until::Attached => phases.attached,
            Until::Running => phases.running,
        }
        .expect("the goal's end was seen");
        let took = end.saturating_duration_since(start);
        eprintln!(
            "goal: {until:?} {:.2} s after {from:?} (goal {:.0} s)",
            took.as_secs_f64(),
            goal.as_secs_f64()
        );
        assert!(
            took <= goal,
            "{until:?} {:.2} s after {from:?}, goal {:.0} s",
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
    outcome
}

/// The Events of the test's namespace, but the scheduler's, as (kind, name, reason).
pub async fn events(e: &E2e) -> Vec<(String, String, String, String)> {
    Api::<Event>::namespaced(e.client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("list the events")
        .items
        .into_iter()
        .filter(|ev| ev.reason.as_deref().is_some_and(|r| r != "Scheduled"))
        .map(|ev| {
            (
                ev.involved_object.kind.clone().unwrap_or_default(),
                ev.involved_object.name.clone().unwrap_or_default(),
                ev.reason.clone().unwrap_or_default(),
                ev.message.clone().unwrap_or_default(),
            )
        })
        .collect()
}

async fn print_events(e: &E2e) {
    for (kind, name, reason, message) in events(e).await {
        eprintln!("event {kind} {name}: {reason} {message}");
    }
}
