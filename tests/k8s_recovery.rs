//! Palisade's recovery controller end to end on a real Kubernetes control plane (the harness
//! of tests/common/e2e.rs: the real kube-controller-manager with its attach-detach
//! controller, kube-scheduler, csi-provisioner and csi-attacher, `palisade controller
//! --store kubernetes --kubernetes`, three `palisade node` processes and emulated
//! kubelets), one scenario of tests/common/failover.rs per test: a Deployment's pod with an
//! RWO Palisade claim runs on a node and writes; the node dies; the replacement pod on another
//! node must get the volume, with the data, within each case's goal, and the volume must
//! never be attached to the dead node again. Each phase's time is printed.
//!
//! - the seed case (an operator force-deletes the pod): attached ≤ 5 s after the
//!   force-delete (Kubernetes alone: 360.9 s), and the node, SIGSTOPped rather than killed,
//!   comes back and writes nothing;
//! - `immediate`: the pod is evicted and left Terminating; attached ≤ 5 s after the
//!   replacement pod exists;
//! - `wait`: the same; attached ≤ 5 s after the old pod's grace period is over;
//! - node-down-pod-deletion-policy `delete-deployment-pod` with the policy `never`, and
//!   `delete-statefulset-pod` with a StatefulSet's pod: Palisade force-deletes the
//!   Terminating pod after its grace period, then the seed case follows (attached ≤ 5 s
//!   after the grace period);
//! - node-down-failover-seconds with every control-plane timing at its default: nobody
//!   does anything, and the replacement runs ≤ 60 s after the node's death;
//! - the out-of-service taint with Palisade's recovery controller off: Kubernetes' own way
//!   works with Palisade (ControllerUnpublish of the down node succeeds after fencing);
//! - kill -9 of the Palisade controller in the middle of a recovery: it converges after the
//!   restart, deleting nothing twice;
//! - auto-delete-pod-when-volume-detached-unexpectedly: a running pod whose volume an
//!   operator force-detaches is deleted with its stale VolumeAttachment, and its replacement
//!   is published afresh and finds the data.
//!
//! Except where said, kube-controller-manager runs with `--node-monitor-grace-period=20s`
//! (default 50 s) and `--node-monitor-period=1s` (default 5 s) so that the Node goes NotReady
//! sooner; the recovery itself runs with the attach-detach controller's default timings.
//!
//! Without `KUBEBUILDER_ASSETS` (or without the sidecars in it) every test prints a SKIPPED
//! line and passes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster;
use common::e2e::*;
use common::failover::{self, From, Log, Scenario, Trigger, Until};
use common::kubelet::attachment_name;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::Api;

/// The goal of the attachment-recovery cases: the replacement's VolumeAttachment attached
/// within this of what lets it move.
const GOAL: Duration = Duration::from_secs(5);

/// The scenarios run one at a time, whatever the test harness's threads: each starts a whole
/// control plane and three nodes, and the goals are measured times on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the control plane (with `controller_manager_args`), Palisade (with
/// `controller_args`) and the kubelets, one scenario at a time; runs `scenario`, then `after`
/// with its outcome.
async fn run(
    test: &str,
    controller_manager_args: Vec<String>,
    controller_args: Vec<String>,
    scenario: Scenario,
    after: for<'a> fn(&'a mut E2e, failover::Outcome) -> futures::future::BoxFuture<'a, ()>,
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let log: Log = Arc::default();
    let Some(e) = E2e::start_with(
        test,
        controller_manager_args,
        controller_args,
        failover::write_once_container(log.clone()),
    )
    .await
    else {
        return;
    };
    e.run(move |e| {
        Box::pin(async move {
            let outcome = failover::failover(e, &scenario, &log).await;
            after(e, outcome).await;
        })
    })
    .await;
}

/// The Events' reasons, for the recovery controller's.
async fn reasons(e: &E2e) -> Vec<String> {
    failover::events(e)
        .await
        .into_iter()
        .map(|(_, _, reason, _)| reason)
        .collect()
}

fn count(reasons: &[String], reason: &str) -> usize {
    reasons.iter().filter(|r| *r == reason).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_deleted_pod_on_a_dead_node_is_replaced_in_seconds_and_the_node_returning_writes_nothing(
) {
    let scenario = Scenario {
        goal: Some((GOAL, From::Trigger, Until::Attached)),
        freeze: true,
        ..Scenario::new(Trigger::ForceDelete)
    };
    run(
        "k8s_recovery::a_force_deleted_pod_on_a_dead_node_is_replaced_in_seconds_and_the_node_returning_writes_nothing",
        failover::fast_node_monitor(),
        vec![],
        scenario,
        |e, outcome| Box::pin(the_node_returns(e, outcome)),
    )
    .await;
}

/// The frozen node comes back (SIGCONT, its kubelet alive again): a write through the old
/// pod's mount fails, nothing of it reaches the volume, the old node's kubelet tears its
/// mounts down, and the volume stays attached to the new node only.
async fn the_node_returns(e: &mut E2e, outcome: failover::Outcome) {
    let old = outcome.old_node.clone();
    let new = outcome.new_node.clone().expect("the new node");
    let pv = outcome.pv.metadata.name.clone().expect("the PV's name");
    let old_uid = pod_uid(&outcome.old_pod);
    let old_target = e.kubelet(&old).target_path(&old_uid, &pv);
    assert!(
        cluster::is_mounted(&old_target),
        "the frozen node's mount is still there: {}",
        old_target.display()
    );
    let child = e.cluster.node(&old).child.as_ref().expect("the node runs");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    e.step(&format!("{old}'s palisade node resumed (SIGCONT)"));
    // What a container still running there would do first: write and fsync.
    let late = cluster::write_synced(&old_target.join("late"), &cluster::pattern(99, 1 << 20));
    assert!(
        late.is_err(),
        "the fenced node's write was acknowledged after the take-over"
    );
    e.step("the returning node's write failed");
    e.kubelet(&old).revive().await;
    e.step(&format!("{old}'s kubelet is alive again"));
    // Its kubelet finds the old pod gone from the API and tears its mounts down: the pod's
    // (NodeUnpublish), then the staging one (NodeUnstage).
    let mounts = [
        old_target.clone(),
        e.kubelet(&old).staging_path(&outcome.handle),
    ];
    let mounts = &mounts;
    eventually(
        "the old pod's mounts on the returning node gone",
        60,
        || async move {
            let left: Vec<&std::path::PathBuf> =
                mounts.iter().filter(|m| cluster::is_mounted(m)).collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still mounted: {left:?}"))
            }
        },
    )
    .await;
    // Its stale engine is gone with its device: no loop device over a file of the node's and
    // no nbdfuse serving one.
    let home = cluster::node_home(&e.cluster, &old);
    let home = &home;
    eventually(
        "the returning node's stale engine torn down",
        30,
        || async move {
            let (loops, fuse) = (cluster::loops_under(home), cluster::processes_naming(home));
            if loops.is_empty() && fuse.is_empty() {
                Ok(())
            } else {
                Err(format!("loop devices {loops:?}, nbdfuse {fuse:?}"))
            }
        },
    )
    .await;
    // Nothing double-attaches: a few seconds of the returned node do not bring the volume back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attachments: Api<VolumeAttachment> = Api::all(e.client.clone());
    assert!(
        attachments
            .get_opt(&attachment_name(&outcome.handle, DRIVER, &old))
            .await
            .expect("get the old VolumeAttachment")
            .is_none(),
        "a VolumeAttachment on the returned node"
    );
    let volume = e.volumes()[0].clone();
    assert_eq!(volume["attachment"]["node_id"], new.as_str(), "{volume:#}");
    // The late write reached nothing: the replacement's mount has no such file.
    let new_pod = e
        .api::<Pod>()
        .list(&kube::api::ListParams::default().labels(&format!("app={}", failover::APP)))
        .await
        .expect("list the pods")
        .items
        .into_iter()
        .find(|p| failover::node_of(p).as_deref() == Some(new.as_str()))
        .expect("the replacement");
    let new_target = e.kubelet(&new).target_path(&pod_uid(&new_pod), &pv);
    assert!(
        !new_target.join("late").exists(),
        "the returning node's write reached the volume"
    );
    assert!(new_target.join("marker").exists(), "the volume's data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_immediate_policy_an_evicted_pod_on_a_dead_node_is_replaced_without_a_human() {
    let scenario = Scenario {
        policy: Some("immediate"),
        goal: Some((GOAL, From::Replacement, Until::Attached)),
        ..Scenario::new(Trigger::Evicted { grace_s: 30 })
    };
    run(
        "k8s_recovery::with_the_immediate_policy_an_evicted_pod_on_a_dead_node_is_replaced_without_a_human",
        failover::fast_node_monitor(),
        vec![],
        scenario,
        |e, _| {
            Box::pin(async move {
                let r = reasons(e).await;
                assert!(count(&r, "PodMarkedFailed") >= 1, "{r:?}");
                assert_eq!(count(&r, "PodForceDeleted"), 0, "{r:?}");
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wait_policy_an_evicted_pod_on_a_dead_node_is_replaced_after_its_grace_period() {
    let scenario = Scenario {
        policy: Some("wait"),
        goal: Some((GOAL, From::GraceOver, Until::Attached)),
        ..Scenario::new(Trigger::Evicted { grace_s: 10 })
    };
    run(
        "k8s_recovery::with_the_wait_policy_an_evicted_pod_on_a_dead_node_is_replaced_after_its_grace_period",
        failover::fast_node_monitor(),
        vec![],
        scenario,
        |e, outcome| {
            Box::pin(async move {
                let p = &outcome.phases;
                let (grace, attached) = (p.grace_over.unwrap(), p.attached.unwrap());
                assert!(
                    attached >= grace,
                    "attached {:.2} s before the grace period was over",
                    grace.duration_since(attached).as_secs_f64()
                );
                let r = reasons(e).await;
                assert!(count(&r, "RecoveryWaiting") >= 1, "{r:?}");
                assert!(count(&r, "PodMarkedFailed") >= 1, "{r:?}");
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_deletion_policy_force_deletes_a_deployments_pod_on_a_dead_node_after_its_grace_period(
) {
    let scenario = Scenario {
        policy: Some("never"),
        settings: vec![(
            "node-down-pod-deletion-policy",
            "delete-deployment-pod".into(),
        )],
        goal: Some((GOAL, From::GraceOver, Until::Attached)),
        ..Scenario::new(Trigger::Evicted { grace_s: 10 })
    };
    run(
        "k8s_recovery::the_pod_deletion_policy_force_deletes_a_deployments_pod_on_a_dead_node_after_its_grace_period",
        failover::fast_node_monitor(),
        vec![],
        scenario,
        |e, outcome| {
            Box::pin(async move {
                let r = reasons(e).await;
                assert_eq!(count(&r, "PodForceDeleted"), 2, "on the pod and the claim: {r:?}");
                let old = outcome.old_pod.metadata.name.clone().unwrap();
                assert!(
                    e.api::<Pod>().get_opt(&old).await.unwrap().is_none(),
                    "the old pod is gone"
                );
            })
        },
    )
    .await;
}

/// node-down-pod-deletion-policy `delete-statefulset-pod`, with the default `wait` policy: a
/// StatefulSet recreates `writer-0` only once the old one is gone, which its dead kubelet
/// never confirms; Palisade force-deletes it after its grace period, and the new `writer-0`
/// (same name, new uid) gets the volume on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_deletion_policy_force_deletes_a_statefulsets_pod_on_a_dead_node_after_its_grace_period(
) {
    let scenario = Scenario {
        settings: vec![(
            "node-down-pod-deletion-policy",
            "delete-statefulset-pod".into(),
        )],
        workload: failover::Workload::StatefulSet,
        goal: Some((GOAL, From::GraceOver, Until::Attached)),
        ..Scenario::new(Trigger::Evicted { grace_s: 10 })
    };
    run(
        "k8s_recovery::the_pod_deletion_policy_force_deletes_a_statefulsets_pod_on_a_dead_node_after_its_grace_period",
        failover::fast_node_monitor(),
        vec![],
        scenario,
        |e, outcome| {
            Box::pin(async move {
                let r = reasons(e).await;
                assert_eq!(count(&r, "PodForceDeleted"), 2, "on the pod and the claim: {r:?}");
                let old = outcome.old_pod.metadata.name.clone().unwrap();
                assert_eq!(old, "writer-0");
                let now = e.api::<Pod>().get(&old).await.expect("the new writer-0");
                assert_ne!(now.metadata.uid, outcome.old_pod.metadata.uid, "a new pod");
            })
        },
    )
    .await;
}

/// The node-down failover, with every kube-controller-manager timing at its default (the
/// Node goes NotReady only ~50 s after the death, and the pod would be evicted after 300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_node_down_failover_a_dead_nodes_pod_runs_elsewhere_within_60_s_with_no_human() {
    let scenario = Scenario {
        settings: vec![("node-down-failover-seconds", "10".into())],
        goal: Some((Duration::from_secs(60), From::Death, Until::Running)),
        deadline: Duration::from_secs(120),
        ..Scenario::new(Trigger::Nothing)
    };
    run(
        "k8s_recovery::with_the_node_down_failover_a_dead_nodes_pod_runs_elsewhere_within_60_s_with_no_human",
        vec![],
        vec![],
        scenario,
        |e, outcome| {
            Box::pin(async move {
                let r = reasons(e).await;
                assert_eq!(count(&r, "PodForceDeleted"), 2, "on the pod and the claim: {r:?}");
                assert!(
                    outcome.phases.running < outcome.phases.not_ready
                        || outcome.phases.not_ready.is_none(),
                    "the failover came before Kubernetes even saw the node NotReady"
                );
            })
        },
    )
    .await;
}

/// Kubernetes' own way, with Palisade's recovery controller off: an operator taints the dead
/// node out-of-service; the pod garbage collector force-deletes its pods, the attach-detach
/// controller detaches at once, and ControllerUnpublish of the down node succeeds (Palisade
/// fences the attachment first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_out_of_service_taint_moves_the_volume_with_palisades_recovery_off() {
    let scenario = Scenario {
        goal: Some((Duration::from_secs(30), From::Trigger, Until::Attached)),
        ..Scenario::new(Trigger::OutOfService)
    };
    run(
        "k8s_recovery::the_out_of_service_taint_moves_the_volume_with_palisades_recovery_off",
        failover::fast_node_monitor(),
        vec!["--no-recovery-controller".into()],
        scenario,
        |e, _| {
            Box::pin(async move {
                let r = reasons(e).await;
                assert_eq!(count(&r, "VolumeFenced"), 0, "recovery is off: {r:?}");
            })
        },
    )
    .await;
}

/// The Palisade controller stops dead (as with kill -9) in the middle of a recovery: right
/// after its pass has fenced the volume, with the VolumeAttachment's removal and the
/// pod-deletion policy's force-delete still to come. After the restart the new leader
/// finishes it: the fence is not raised again, the pod is force-deleted once, and the volume
/// ends attached to the new node only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_in_the_middle_of_a_recovery_converges_after_its_restart() {
    let scenario = Scenario {
        policy: Some("never"),
        settings: vec![(
            "node-down-pod-deletion-policy",
            "delete-both-statefulset-and-deployment-pod".into(),
        )],
        crash_after_fence: true,
        ..Scenario::new(Trigger::Evicted { grace_s: 5 })
    };
    run(
        "k8s_recovery::a_controller_killed_in_the_middle_of_a_recovery_converges_after_its_restart",
        failover::fast_node_monitor(),
        vec!["--crash-after-recovery-fence".into()],
        scenario,
        |e, outcome| {
            Box::pin(async move {
                let p = &outcome.phases;
                assert!(
                    p.controller_killed.is_some(),
                    "the controller crashed after fencing and was restarted"
                );
                assert!(
                    p.stale_gone > p.controller_killed,
                    "the stale VolumeAttachment was removed after the restart, not before the crash"
                );
                let events = failover::events(e).await;
                let r: Vec<String> = events.iter().map(|ev| ev.2.clone()).collect();
                assert_eq!(
                    count(&r, "PodForceDeleted"),
                    2,
                    "the pod was force-deleted once (an Event on the pod and the claim): {r:?}"
                );
                // Fenced before the crash and again after it, at the same epoch: never raised
                // twice.
                let epochs: std::collections::BTreeSet<&str> = events
                    .iter()
                    .filter(|ev| ev.2 == "VolumeFenced")
                    .filter_map(|ev| ev.3.split("at epoch ").nth(1)?.split(' ').next())
                    .collect();
                assert_eq!(epochs.len(), 1, "{events:?}");
                let attachments: Api<VolumeAttachment> = Api::all(e.client.clone());
                let on: Vec<String> = attachments
                    .list(&Default::default())
                    .await
                    .expect("list the VolumeAttachments")
                    .items
                    .into_iter()
                    .map(|va| va.spec.node_name)
                    .collect();
                assert_eq!(
                    on,
                    [outcome.new_node.clone().unwrap()],
                    "one VolumeAttachment, on the new node"
                );
            })
        },
    )
    .await;
}

/// auto-delete-pod-when-volume-detached-unexpectedly (on by default): an operator
/// force-detaches the volume of a running Deployment pod (`palisade ctl volume detach --force
/// ID`); Palisade deletes the pod and its stale VolumeAttachment, and the replacement is
/// published afresh (a higher epoch), mounts the volume and finds the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_volume_is_detached_under_it_is_restarted_on_the_volume() {
    let test = "k8s_recovery::a_pod_whose_volume_is_detached_under_it_is_restarted_on_the_volume";
    let _one = ONE_AT_A_TIME.lock().await;
    let log: Log = Arc::default();
    let Some(e) = E2e::start_with(
        test,
        failover::fast_node_monitor(),
        vec![],
        failover::write_once_container(log.clone()),
    )
    .await
    else {
        return;
    };
    e.run(move |e| Box::pin(detached_under_its_pod(e, log)))
        .await;
}

async fn detached_under_its_pod(e: &mut E2e, log: Log) {
    failover::storage_class(e, None).await;
    e.create_claim("data", "palisade-2").await;
    failover::create_workload(
        e,
        failover::Workload::Deployment,
        "data",
        "written before the detach",
        None,
        None,
    )
    .await;
    let pods = e.api::<Pod>();
    let selector = kube::api::ListParams::default().labels(&format!("app={}", failover::APP));
    let (pods, selector) = (&pods, &selector);
    let first = eventually("the Deployment's pod Running", 120, || async move {
        let listed = pods.list(selector).await.map_err(|e| e.to_string())?.items;
        match listed.as_slice() {
            [p] if failover::is_running(p) => Ok(p.clone()),
            other => Err(format!("{} pods", other.len())),
        }
    })
    .await;
    let pv = e.bound_volume("data").await;
    let (handle, _) = volume_handle(&pv);
    let before = e.volumes()[0].clone();
    let old_epoch = before["attachment"]["epoch"].as_u64().expect("an epoch");
    e.step("the pod runs and wrote; the operator force-detaches its volume");
    e.cluster.ctl_ok(&["volume", "detach", "--force", &handle]);
    let old_uid = first.metadata.uid.clone();
    let old_uid = &old_uid;
    let replacement = eventually("the replacement pod Running", 120, || async move {
        let listed = pods.list(selector).await.map_err(|e| e.to_string())?.items;
        listed
            .into_iter()
            .find(|p| &p.metadata.uid != old_uid && failover::is_running(p))
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    e.step(&format!(
        "the replacement runs on {}",
        failover::node_of(&replacement).unwrap_or_default()
    ));
    let entries = log.lock().unwrap().clone();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].1, "verified", "the replacement found the data");
    let r = reasons(e).await;
    assert_eq!(
        count(&r, "PodDeleted"),
        2,
        "on the pod and the claim: {r:?}"
    );
    let after = e.volumes()[0].clone();
    assert_eq!(
        after["attachment"]["node_id"].as_str(),
        failover::node_of(&replacement).as_deref(),
        "{after:#}"
    );
    assert!(
        after["attachment"]["epoch"].as_u64().expect("an epoch") > old_epoch,
        "published afresh: {after:#}"
    );
}
