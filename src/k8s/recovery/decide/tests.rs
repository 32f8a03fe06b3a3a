//! Every case of the recovery decisions, for every policy.

use super::*;
use crate::k8s::recovery::tests::{deleting, owned, pod, stored, NOW};
use crate::k8s::recovery::view::{AttachmentView, Owner, Phase, PodView};
use RecoveryPolicy::{Immediate, Never, Wait};

const POLICIES: [RecoveryPolicy; 3] = [Never, Wait, Immediate];

fn va(attached: bool, deleting: bool) -> AttachmentView {
    AttachmentView {
        name: "csi-1".into(),
        uid: "uid-csi-1".into(),
        pv: "pvc-1".into(),
        node: "a".into(),
        attached,
        deleting,
    }
}

fn decide(pods: &[PodView], policy: RecoveryPolicy, down: Option<u64>) -> AttachmentDecision {
    let refs: Vec<&PodView> = pods.iter().collect();
    decide_attachment(&va(true, false), &refs, policy, down, NOW)
}

const DOWN: Option<u64> = Some(NOW - 60_000);

fn waiting() -> PodView {
    pod("new", Some("b"), Phase::Pending, "pvc-1")
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn an_attachment_on_a_node_that_is_up_is_never_touched() {
    let pods = [pod("old", Some("a"), Phase::Running, "pvc-1"), waiting()];
    for policy in POLICIES {
        assert_eq!(
            decide(&pods, policy, None),
            AttachmentDecision::Keep(Keep::NodeUp)
        );
    }
}

#[test]
fn an_attachment_being_deleted_or_not_attached_is_left_to_kubernetes() {
    let pods = [waiting()];
    let refs: Vec<&PodView> = pods.iter().collect();
    for policy in POLICIES {
        assert_eq!(
            decide_attachment(&va(true, true), &refs, policy, DOWN, NOW),
            AttachmentDecision::Keep(Keep::Deleting)
        );
        assert_eq!(
            decide_attachment(&va(false, false), &refs, policy, DOWN, NOW),
            AttachmentDecision::Keep(Keep::NotAttached)
        );
    }
}

#[test]
fn nothing_moves_while_no_pod_waits_on_another_node() {
    let cases: Vec<Vec<PodView>> = vec![
        vec![],
        vec![pod("old", Some("a"), Phase::Running, "pvc-1")],
        // Pending on the down node itself, not yet scheduled, being deleted, or running
        // elsewhere already: none of them waits for this attachment.
        vec![pod("again", Some("a"), Phase::Pending, "pvc-1")],
        vec![pod("unscheduled", None, Phase::Pending, "pvc-1")],
        vec![deleting(
            pod("gone", Some("b"), Phase::Pending, "pvc-1"),
            NOW,
        )],
        vec![pod("running", Some("b"), Phase::Running, "pvc-1")],
    ];
    for pods in cases {
        for policy in POLICIES {
            assert_eq!(
                decide(&pods, policy, DOWN),
                AttachmentDecision::Keep(Keep::NoReplacementWaiting),
                "{policy} {pods:?}"
            );
        }
    }
}

#[test]
fn every_policy_recovers_once_no_pod_on_the_down_node_uses_the_volume() {
    // The seed's case: the old pod was force-deleted (gone), or it is done.
    for others in [
        vec![],
        vec![pod("done", Some("a"), Phase::Terminated, "pvc-1")],
    ] {
        let mut pods = others.clone();
        pods.push(waiting());
        for policy in POLICIES {
            assert_eq!(
                decide(&pods, policy, DOWN),
                AttachmentDecision::Recover(Recover::NoPodOnNode {
                    waiting: names(&["new"])
                }),
                "{policy}"
            );
        }
    }
}

#[test]
fn never_holds_while_any_pod_on_the_down_node_uses_the_volume() {
    for old in [
        pod("old", Some("a"), Phase::Running, "pvc-1"),
        pod("old", Some("a"), Phase::Unknown, "pvc-1"),
        deleting(
            pod("old", Some("a"), Phase::Running, "pvc-1"),
            NOW - 3_600_000,
        ),
    ] {
        let d = decide(&[old, waiting()], Never, DOWN);
        assert_eq!(
            d,
            AttachmentDecision::Keep(Keep::PodsOnNode {
                policy: Never,
                pods: names(&["old"]),
                waiting: names(&["new"]),
            })
        );
        let AttachmentDecision::Keep(keep) = d else {
            unreachable!()
        };
        assert!(keep.is_notable());
        assert!(
            keep.describe("a", NOW).contains("force-delete it"),
            "{}",
            keep.describe("a", NOW)
        );
    }
}

#[test]
fn wait_recovers_once_every_pod_on_the_down_node_outlived_its_grace_period() {
    let old = |name, at| deleting(pod(name, Some("a"), Phase::Running, "pvc-1"), at);
    // Not evicted yet: held.
    assert_eq!(
        decide(
            &[pod("old", Some("a"), Phase::Running, "pvc-1"), waiting()],
            Wait,
            DOWN
        ),
        AttachmentDecision::Keep(Keep::PodsOnNode {
            policy: Wait,
            pods: names(&["old"]),
            waiting: names(&["new"]),
        })
    );
    // One evicted, one not: held, naming the one not being deleted.
    assert_eq!(
        decide(
            &[
                old("evicted", NOW - 1),
                pod("kept", Some("a"), Phase::Running, "pvc-1"),
                waiting()
            ],
            Wait,
            DOWN
        ),
        AttachmentDecision::Keep(Keep::PodsOnNode {
            policy: Wait,
            pods: names(&["kept"]),
            waiting: names(&["new"]),
        })
    );
    // Both evicted, one still within its grace period: held until the later one.
    let d = decide(
        &[
            old("first", NOW - 1),
            old("second", NOW + 12_000),
            waiting(),
        ],
        Wait,
        DOWN,
    );
    assert_eq!(
        d,
        AttachmentDecision::Keep(Keep::GracePeriodRunning {
            pods: names(&["first", "second"]),
            until_ms: NOW + 12_000,
            waiting: names(&["new"]),
        })
    );
    let AttachmentDecision::Keep(keep) = d else {
        unreachable!()
    };
    assert!(
        keep.describe("a", NOW).contains("ends in 12 s"),
        "{}",
        keep.describe("a", NOW)
    );
    // The deletionTimestamp is already the request time plus the grace period: at it, over.
    assert_eq!(
        decide(
            &[old("first", NOW - 1), old("second", NOW), waiting()],
            Wait,
            DOWN
        ),
        AttachmentDecision::Recover(Recover::GracePeriodOver {
            pods: names(&["first", "second"]),
            waiting: names(&["new"]),
        })
    );
}

#[test]
fn immediate_recovers_as_soon_as_a_replacement_is_pending() {
    for old in [
        pod("old", Some("a"), Phase::Running, "pvc-1"),
        deleting(pod("old", Some("a"), Phase::Running, "pvc-1"), NOW + 30_000),
    ] {
        assert_eq!(
            decide(&[old, waiting()], Immediate, DOWN),
            AttachmentDecision::Recover(Recover::ReplacementPending {
                pods: names(&["old"]),
                waiting: names(&["new"]),
            })
        );
    }
}

#[test]
fn the_descriptions_name_the_policy_the_pods_and_the_node() {
    let r = Recover::GracePeriodOver {
        pods: names(&["old"]),
        waiting: names(&["new"]),
    };
    let text = r.describe("a");
    assert!(
        text.contains("\"wait\"")
            && text.contains("pod old")
            && text.contains("node a")
            && text.contains("pod new"),
        "{text}"
    );
    let r = Recover::ReplacementPending {
        pods: vec![],
        waiting: names(&["n1", "n2"]),
    };
    assert!(
        r.describe("a").contains("pods n1, n2"),
        "{}",
        r.describe("a")
    );
}

use crate::settings::NodeDownPodDeletionPolicy as P;

fn owners() -> [Owner; 5] {
    [
        Owner::None,
        Owner::StatefulSet,
        Owner::Deployment,
        // A ReplicaSet no Deployment owns, and another controller.
        Owner::Other("ReplicaSet".into()),
        Owner::Other("Job".into()),
    ]
}

#[test]
fn the_pod_deletion_policy_covers_the_owners_it_names() {
    let expected = [
        (P::DoNothing, [false, false, false, false, false]),
        (P::DeleteStatefulSetPod, [false, true, false, false, false]),
        (P::DeleteDeploymentPod, [false, false, true, false, false]),
        (
            P::DeleteBothStatefulSetAndDeploymentPod,
            [false, true, true, false, false],
        ),
    ];
    for (policy, covers) in expected {
        for (owner, covered) in owners().iter().zip(covers) {
            assert_eq!(policy_covers(policy, owner), covered, "{policy} {owner:?}");
        }
    }
}

fn old_pod(owner: Owner) -> PodView {
    owned(pod("old", Some("a"), Phase::Running, "pvc-1"), owner)
}

#[test]
fn a_terminating_pod_on_a_down_node_is_force_deleted_once_its_grace_period_is_over() {
    let policy = P::DeleteBothStatefulSetAndDeploymentPod;
    for owner in [Owner::StatefulSet, Owner::Deployment] {
        let over = deleting(old_pod(owner.clone()), NOW);
        assert_eq!(
            decide_down_pod(&over, DOWN, policy, 0, NOW),
            DownPodDecision::ForceDelete(ForceCause::Policy(policy))
        );
        let running = deleting(old_pod(owner.clone()), NOW + 1);
        assert_eq!(
            decide_down_pod(&running, DOWN, policy, 0, NOW),
            DownPodDecision::Keep
        );
        let not_terminating = old_pod(owner.clone());
        assert_eq!(
            decide_down_pod(&not_terminating, DOWN, policy, 0, NOW),
            DownPodDecision::Keep
        );
        // Its node is up: its kubelet finishes the deletion itself.
        assert_eq!(
            decide_down_pod(&over, None, policy, 0, NOW),
            DownPodDecision::Keep
        );
    }
    // Owners the policy does not name, and do-nothing.
    for owner in [Owner::None, Owner::Other("Job".into())] {
        let over = deleting(old_pod(owner), NOW - 1);
        assert_eq!(
            decide_down_pod(&over, DOWN, policy, 0, NOW),
            DownPodDecision::Keep
        );
    }
    let over = deleting(old_pod(Owner::StatefulSet), NOW - 1);
    assert_eq!(
        decide_down_pod(&over, DOWN, P::DoNothing, 0, NOW),
        DownPodDecision::Keep
    );
    assert_eq!(
        decide_down_pod(&over, DOWN, P::DeleteDeploymentPod, 0, NOW),
        DownPodDecision::Keep
    );
    // A pod that is done holds nothing; one never scheduled is on no node.
    let mut done = over.clone();
    done.phase = Phase::Terminated;
    assert_eq!(
        decide_down_pod(&done, DOWN, policy, 0, NOW),
        DownPodDecision::Keep
    );
    let mut unscheduled = over;
    unscheduled.node = None;
    assert_eq!(
        decide_down_pod(&unscheduled, DOWN, policy, 0, NOW),
        DownPodDecision::Keep
    );
}

#[test]
fn the_failover_deletes_workload_pods_once_the_node_has_been_down_long_enough() {
    let since = Some(NOW - 30_000);
    for owner in [Owner::StatefulSet, Owner::Deployment] {
        let p = old_pod(owner.clone());
        assert_eq!(
            decide_down_pod(&p, since, P::DoNothing, 30, NOW),
            DownPodDecision::ForceDelete(ForceCause::Failover { down_for_s: 30 })
        );
        assert_eq!(
            decide_down_pod(&p, since, P::DoNothing, 31, NOW),
            DownPodDecision::Keep,
            "not down long enough"
        );
        assert_eq!(
            decide_down_pod(&p, since, P::DoNothing, 0, NOW),
            DownPodDecision::Keep,
            "off"
        );
        // Before any eviction, and ahead of the pod deletion policy when both apply.
        let terminating = deleting(p.clone(), NOW - 1);
        assert_eq!(
            decide_down_pod(
                &terminating,
                since,
                P::DeleteBothStatefulSetAndDeploymentPod,
                30,
                NOW
            ),
            DownPodDecision::ForceDelete(ForceCause::Failover { down_for_s: 30 })
        );
    }
    for owner in [Owner::None, Owner::Other("ReplicaSet".into())] {
        let p = old_pod(owner);
        assert_eq!(
            decide_down_pod(&p, since, P::DoNothing, 30, NOW),
            DownPodDecision::Keep,
            "nothing but StatefulSet and Deployment pods"
        );
    }
    let text = ForceCause::Failover { down_for_s: 30 }.describe("a");
    assert!(text.contains("node a") && text.contains("30 s"), "{text}");
}

#[test]
fn a_running_pod_whose_volume_moved_or_was_fenced_under_it_is_deleted() {
    let p = pod("app", Some("b"), Phase::Running, "pvc-1");
    let current = stored("pvc-1", 3, Some(("b", 3)));
    let elsewhere = stored("pvc-1", 4, Some(("c", 4)));
    let fenced = stored("pvc-1", 4, Some(("b", 3)));
    let released = stored("pvc-1", 4, None);
    assert_eq!(
        decide_detached(&p, true, &[Some(&current)], true),
        DetachedDecision::Keep
    );
    assert_eq!(
        decide_detached(&p, true, &[Some(&elsewhere)], true),
        DetachedDecision::Delete {
            volume: "pvc-1".into(),
            why: Detachment::Elsewhere { node: "c".into() }
        }
    );
    assert_eq!(
        decide_detached(&p, true, &[Some(&fenced)], true),
        DetachedDecision::Delete {
            volume: "pvc-1".into(),
            why: Detachment::Fenced { epoch: 4 }
        }
    );
    assert_eq!(
        decide_detached(&p, true, &[Some(&released)], true),
        DetachedDecision::Delete {
            volume: "pvc-1".into(),
            why: Detachment::NotAttached
        }
    );
    // The first lost volume of several is named; a volume the store lacks is no evidence.
    let other = stored("pvc-2", 1, Some(("b", 1)));
    assert_eq!(
        decide_detached(&p, true, &[None, Some(&other), Some(&fenced)], true),
        DetachedDecision::Delete {
            volume: "pvc-1".into(),
            why: Detachment::Fenced { epoch: 4 }
        }
    );
    assert_eq!(
        decide_detached(&p, true, &[None], true),
        DetachedDecision::Keep
    );
}

#[test]
fn a_detached_pod_is_kept_when_the_setting_is_off_or_it_is_not_simply_running() {
    let lost = stored("pvc-1", 4, Some(("c", 4)));
    let p = pod("app", Some("b"), Phase::Running, "pvc-1");
    assert_eq!(
        decide_detached(&p, true, &[Some(&lost)], false),
        DetachedDecision::Keep
    );
    assert_eq!(
        decide_detached(&p, false, &[Some(&lost)], true),
        DetachedDecision::Keep,
        "its node is down: the node-down path's business"
    );
    for phase in [Phase::Pending, Phase::Terminated, Phase::Unknown] {
        let mut q = p.clone();
        q.phase = phase;
        assert_eq!(
            decide_detached(&q, true, &[Some(&lost)], true),
            DetachedDecision::Keep
        );
    }
    let d = deleting(p.clone(), NOW);
    assert_eq!(
        decide_detached(&d, true, &[Some(&lost)], true),
        DetachedDecision::Keep
    );
    let mut unscheduled = p;
    unscheduled.node = None;
    assert_eq!(
        decide_detached(&unscheduled, true, &[Some(&lost)], true),
        DetachedDecision::Keep
    );
}

#[test]
fn a_bare_pod_is_never_deleted_for_a_detached_volume() {
    let lost = stored("pvc-1", 4, Some(("c", 4)));
    let bare = owned(pod("bare", Some("b"), Phase::Running, "pvc-1"), Owner::None);
    assert_eq!(
        decide_detached(&bare, true, &[Some(&lost)], true),
        DetachedDecision::Bare {
            volume: "pvc-1".into(),
            why: Detachment::Elsewhere { node: "c".into() }
        }
    );
    // Any controller will do: it recreates the pod.
    let job = owned(
        pod("job", Some("b"), Phase::Running, "pvc-1"),
        Owner::Other("Job".into()),
    );
    assert!(matches!(
        decide_detached(&job, true, &[Some(&lost)], true),
        DetachedDecision::Delete { .. }
    ));
}
