//! One recovery pass: the plan, a pure function of the cluster's view, the stored volumes,
//! the settings and the time ([`plan`]); then its execution, in this order: fence every
//! attachment the plan needs fenced; delete the VolumeAttachments whose fencing succeeded;
//! take the fenced volumes out of their down Node's `status.volumesInUse` (else the
//! attach-detach controller waits 6 minutes, or its 60 s sync, to detach them); force-delete the pods on down nodes whose every needed fence succeeded; delete the pods
//! whose volume was detached under them; post the Events.
//!
//! Level-triggered and idempotent, so that a pass interrupted anywhere (a crash, a lost
//! leadership) is finished by the next one: fencing again fences at the same epoch, a
//! VolumeAttachment or pod already gone is fine, and every deletion names the object's uid,
//! so that a pod recreated with the same name (a StatefulSet's) is never deleted by mistake.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, Preconditions};
use tracing::{info, warn};

use crate::control::{RecoveryFence, RecoveryFenceError};
use crate::model::{now_ms, Volume};
use crate::settings::Settings;
use crate::store::StoreError;

use super::decide::{
    self, AttachmentDecision, DetachedDecision, DownPodDecision, ForceCause, Recover,
};
use super::events::{reason, Notice, Objects, Severity};
use super::patches::mark_failed;
use super::view::{
    unique_volume_name, AttachmentView, ClusterView, EarliestDown, Phase, PodView, Snapshot,
    FAILOVER_TAINT,
};
use super::Recovery;

/// An attachment to fence: (volume id, node).
pub type Target = (String, String);

/// How many attachments are fenced at once.
const CONCURRENT_FENCES: usize = 8;

/// What one pass does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The attachments to fence, each once.
    pub fences: BTreeSet<Target>,
    /// The VolumeAttachments to delete once their attachment is fenced.
    pub attachments: Vec<RemoveAttachment>,
    /// The volumes to take out of a down Node's `status.volumesInUse` once fenced there.
    pub in_use: Vec<ReleaseInUse>,
    /// The terminating pods on down nodes to mark Failed once their volume is fenced there.
    pub terminate: Vec<RemovePod>,
    /// The down Nodes to taint with [`FAILOVER_TAINT`] before their pods are failed over.
    pub taint: BTreeSet<String>,
    /// The Nodes whose [`FAILOVER_TAINT`] comes off: they are up again.
    pub untaint: BTreeSet<String>,
    /// The pods on down nodes to force-delete once their attachments are fenced.
    pub force_deletes: Vec<RemovePod>,
    /// The pods to delete because their volume was detached under them.
    pub deletes: Vec<RemovePod>,
    /// The lasting states to report.
    pub notices: Vec<Notice>,
    /// Whom to tell about each fenced volume: its claim and its pods.
    pub subjects: BTreeMap<String, Subjects>,
}

/// The claim and pods of a volume, as (namespace, name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    pub claims: Vec<(String, String)>,
    pub pods: Vec<(String, String)>,
}

/// A VolumeAttachment to delete, of `volume`, after fencing every one of `needs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveAttachment {
    pub va: AttachmentView,
    pub volume: String,
    pub needs: Vec<Target>,
    pub why: String,
}

/// A volume that a down node's `status.volumesInUse` still lists, though its
/// VolumeAttachment there is gone or being removed: taken out of the list after fencing
/// `needs`, so that the attach-detach controller, which will not detach a volume its node
/// reports in use until its 6-minute maximum wait for unmount, detaches it at once (it
/// notices a deleted VolumeAttachment only at its periodic sync, every 60 s by default) and
/// attaches it where a replacement waits. Only the node's dead kubelet could say otherwise,
/// and it is fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseInUse {
    pub node: String,
    /// The PersistentVolume's name.
    pub pv: String,
    pub volume: String,
    pub needs: Vec<Target>,
}

/// A pod to delete after fencing every one of `needs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovePod {
    pub pod: PodView,
    pub needs: Vec<Target>,
    /// The volume it is deleted for (a detached one), or None (all of its volumes).
    pub volume: Option<String>,
    /// Its volumes' claims, as (namespace, name), for the Events.
    pub claims: Vec<(String, String)>,
    pub why: String,
    /// Deleted only once its node carries the [`FAILOVER_TAINT`] (the failover's pods).
    pub needs_taint: bool,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// The attachments fenced, or found with nothing left to fence there.
    pub fenced: Vec<Target>,
    /// The attachments that could not be fenced, and why.
    pub refused: Vec<(Target, String)>,
    /// The VolumeAttachments deleted (or found gone), by name.
    pub attachments_removed: Vec<String>,
    /// The volumes taken out of a down Node's `status.volumesInUse`, as (node, PV name).
    pub in_use_released: Vec<(String, String)>,
    /// The terminating pods on down nodes marked Failed, as `namespace/name`.
    pub pods_marked_failed: Vec<String>,
    /// The Nodes tainted with [`FAILOVER_TAINT`], and those it was taken off.
    pub tainted: Vec<String>,
    pub untainted: Vec<String>,
    /// The pods force-deleted, as `namespace/name`.
    pub pods_force_deleted: Vec<String>,
    /// The pods deleted (gracefully), as `namespace/name`.
    pub pods_deleted: Vec<String>,
}

/// Why a pass could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("reading the settings or the volumes from the store failed: {0}")]
    Store(#[from] StoreError),
}

/// Plans one pass over `view` at `now_ms`, with the volumes as stored and the settings.
pub fn plan(
    view: &ClusterView,
    stored: &HashMap<String, Arc<Volume>>,
    settings: &Settings,
    now_ms: u64,
) -> Plan {
    let mut plan = Plan::default();
    let mut removing = BTreeSet::new();
    let volume_of = |pv: &str| view.volumes.get(pv).map(|v| v.volume.clone());
    let claims_of = |pod: &PodView| -> Vec<(String, String)> {
        pod.volumes
            .iter()
            .filter_map(|pv| view.volumes.get(pv)?.claim.clone())
            .collect()
    };

    // Pods on down nodes: the deletion policy and the failover.
    for pod in &view.pods {
        let Some(node) = pod.node.as_deref() else {
            continue;
        };
        let decision = decide::decide_down_pod(
            pod,
            view.down.get(node).copied(),
            settings.node_down_pod_deletion_policy,
            settings.node_down_failover_seconds,
            now_ms,
        );
        let DownPodDecision::ForceDelete(cause) = decision else {
            continue;
        };
        let mut needs: BTreeSet<Target> = pod
            .volumes
            .iter()
            .filter_map(|pv| volume_of(pv))
            .map(|v| (v, node.to_string()))
            .collect();
        if matches!(cause, ForceCause::Failover { .. }) {
            // Only once every Palisade volume attached on the node is fenced.
            needs.extend(
                stored
                    .values()
                    .filter(|v| v.attachment.as_ref().is_some_and(|a| a.node_id == node))
                    .map(|v| (v.id.clone(), node.to_string())),
            );
        }
        let why = cause.describe(node);
        let needs: Vec<Target> = needs.into_iter().collect();
        let needs_taint = matches!(cause, ForceCause::Failover { .. });
        if needs_taint && !view.tainted.contains(node) {
            plan.taint.insert(node.to_string());
        }
        for va in view
            .attachments
            .iter()
            .filter(|a| a.node == node && !a.deleting && pod.volumes.contains(&a.pv))
        {
            let Some(volume) = volume_of(&va.pv) else {
                continue;
            };
            if removing.insert(va.name.clone()) {
                plan.attachments.push(RemoveAttachment {
                    va: va.clone(),
                    volume,
                    needs: needs.clone(),
                    why: format!("pod {} is force-deleted ({why})", pod.name),
                });
            }
        }
        plan.fences.extend(needs.iter().cloned());
        plan.force_deletes.push(RemovePod {
            pod: pod.clone(),
            needs,
            volume: None,
            claims: claims_of(pod),
            why,
            needs_taint,
        });
    }
    plan.untaint = view
        .tainted
        .iter()
        .filter(|n| !view.down.contains_key(*n))
        .cloned()
        .collect();

    // VolumeAttachments on down nodes: the recovery policy.
    for va in &view.attachments {
        let Some(volume) = view.volumes.get(&va.pv) else {
            continue;
        };
        let pods = view.pods_of(&va.pv);
        // As ControllerPublish decides: the volume's own policy, else the setting.
        let policy = stored
            .get(&volume.volume)
            .and_then(|v| v.params.recovery_policy)
            .or(volume.policy)
            .unwrap_or(settings.volume_attachment_recovery_policy);
        let decision =
            decide::decide_attachment(va, &pods, policy, view.down.get(&va.node).copied(), now_ms);
        let subjects = Subjects {
            claims: volume.claim.iter().cloned().collect(),
            pods: pods
                .iter()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
        };
        match decision {
            AttachmentDecision::Recover(recover) => {
                let target = (volume.volume.clone(), va.node.clone());
                plan.fences.insert(target.clone());
                // The attach-detach controller keeps a terminating pod's volumes on its node
                // for as long as the pod's containers are reported running, which only the
                // dead kubelet could change: it will neither detach them there nor attach
                // them elsewhere. Once fenced, such a pod is marked Failed, as its kubelet
                // would once its containers stopped.
                let held = match &recover {
                    Recover::GracePeriodOver { pods: held, .. }
                    | Recover::ReplacementPending { pods: held, .. } => held.clone(),
                    Recover::NoPodOnNode { .. } => vec![],
                };
                for pod in pods.iter().filter(|p| {
                    held.contains(&p.name)
                        && p.deletion.is_some()
                        && p.phase != Phase::Terminated
                        && p.node.as_deref() == Some(va.node.as_str())
                }) {
                    if let Some(mark) = plan.terminate.iter_mut().find(|m| m.pod.key() == pod.key())
                    {
                        if !mark.needs.contains(&target) {
                            mark.needs.push(target.clone());
                        }
                        continue;
                    }
                    plan.terminate.push(RemovePod {
                        pod: (*pod).clone(),
                        needs: vec![target.clone()],
                        volume: Some(volume.volume.clone()),
                        claims: claims_of(pod),
                        why: recover.describe(&va.node),
                        needs_taint: false,
                    });
                }
                if removing.insert(va.name.clone()) {
                    plan.attachments.push(RemoveAttachment {
                        va: va.clone(),
                        volume: volume.volume.clone(),
                        needs: vec![target],
                        why: recover.describe(&va.node),
                    });
                }
            }
            AttachmentDecision::Keep(keep) if keep.is_notable() => {
                plan.notices.push(Notice {
                    key: Some(format!("attachment/{}", va.name)),
                    signature: format!("{keep:?}"),
                    severity: Severity::Normal,
                    reason: reason::RECOVERY_WAITING,
                    action: "Wait",
                    note: format!(
                        "volume {} stays attached to down node {}: {}",
                        volume.volume,
                        va.node,
                        keep.describe(&va.node, now_ms)
                    ),
                    volume: Some(volume.volume.clone()),
                    node: Some(va.node.clone()),
                    pods: subjects.pods.clone(),
                    claims: subjects.claims.clone(),
                });
            }
            AttachmentDecision::Keep(_) => {}
        }
        plan.subjects.insert(volume.volume.clone(), subjects);
    }

    // Volumes a down node still reports in use, whose VolumeAttachment there is gone, being
    // deleted, or removed by this pass.
    for (node, pvs) in &view.in_use {
        for pv in pvs {
            let Some(volume) = volume_of(pv) else {
                continue;
            };
            let standing = view
                .attachments
                .iter()
                .any(|a| &a.node == node && &a.pv == pv && !a.deleting);
            let removed_now = plan
                .attachments
                .iter()
                .any(|a| &a.va.node == node && &a.va.pv == pv);
            if standing && !removed_now {
                continue;
            }
            let target = (volume.clone(), node.clone());
            plan.fences.insert(target.clone());
            plan.in_use.push(ReleaseInUse {
                node: node.clone(),
                pv: pv.clone(),
                volume,
                needs: vec![target],
            });
        }
    }

    // Running pods whose volume was detached under them.
    for pod in &view.pods {
        let Some(node) = pod.node.as_deref() else {
            continue;
        };
        let volumes: Vec<Option<&Volume>> = pod
            .volumes
            .iter()
            .map(|pv| volume_of(pv).and_then(|v| stored.get(&v)).map(Arc::as_ref))
            .collect();
        let decision = decide::decide_detached(
            pod,
            !view.down.contains_key(node),
            &volumes,
            settings.auto_delete_pod_when_volume_detached_unexpectedly,
        );
        match decision {
            DetachedDecision::Keep => {}
            DetachedDecision::Delete { volume, why } => {
                let why = format!(
                    "auto-delete-pod-when-volume-detached-unexpectedly: {}; deleted so that its controller recreates it",
                    why.describe(&volume, node)
                );
                // The VolumeAttachment there still says attached, with the publish context of
                // an attachment that is gone or fenced: a replacement on the same node would
                // stage with it. Deleted too, so that the volume is published afresh (a new
                // epoch) wherever the replacement lands.
                for va in view.attachments.iter().filter(|a| {
                    a.node == node && !a.deleting && pod.volumes.contains(&a.pv)
                }) {
                    if removing.insert(va.name.clone()) {
                        plan.attachments.push(RemoveAttachment {
                            va: va.clone(),
                            volume: volume.clone(),
                            needs: vec![],
                            why: why.clone(),
                        });
                    }
                }
                plan.deletes.push(RemovePod {
                    pod: pod.clone(),
                    needs: vec![],
                    claims: claims_of(pod),
                    why,
                    volume: Some(volume),
                    needs_taint: false,
                });
            }
            DetachedDecision::Bare { volume, why } => plan.notices.push(Notice {
                key: Some(format!("bare-pod/{}", pod.key())),
                signature: format!("{volume} {why:?}"),
                severity: Severity::Warning,
                reason: reason::POD_NOT_DELETED,
                action: "DeletePod",
                note: format!(
                    "{}; no controller owns pod {}, so it is not deleted: delete it to restart it on the volume",
                    why.describe(&volume, node),
                    pod.name
                ),
                volume: Some(volume),
                node: Some(node.to_string()),
                pods: vec![(pod.namespace.clone(), pod.name.clone())],
                claims: vec![],
            }),
        }
    }

    // Whom to tell about a fence the pod path alone asked for.
    for (volume, _) in &plan.fences {
        if plan.subjects.contains_key(volume) {
            continue;
        }
        let subjects = view
            .volumes
            .values()
            .find(|v| &v.volume == volume)
            .map(|v| Subjects {
                claims: v.claim.iter().cloned().collect(),
                pods: view
                    .pods_of(&v.pv)
                    .iter()
                    .map(|p| (p.namespace.clone(), p.name.clone()))
                    .collect(),
            })
            .unwrap_or_default();
        plan.subjects.insert(volume.clone(), subjects);
    }
    plan
}

/// How a deletion ended.
pub(super) enum Deleted {
    /// Deleted now.
    Now,
    /// It was gone already, or replaced by another object of the same name.
    Gone,
}

fn deleted(result: Result<(), kube::Error>) -> Result<Deleted, kube::Error> {
    match result {
        Ok(()) => Ok(Deleted::Now),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Deleted::Gone),
        Err(e) => Err(e),
    }
}

fn params(uid: &str, grace_period_seconds: Option<u32>) -> DeleteParams {
    DeleteParams {
        grace_period_seconds,
        preconditions: (!uid.is_empty()).then(|| Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

impl Recovery {
    /// One pass over `snapshot`: plans it and carries it out.
    pub async fn pass(&self, snapshot: &Snapshot) -> Result<PassReport, PassError> {
        let settings = self.controller.settings().await?;
        let stored: HashMap<String, Arc<Volume>> = self
            .controller
            .stored_volumes()
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let now = now_ms();
        let health = EarliestDown {
            kubernetes: self.health.clone(),
            agents: self.controller.nodes_down_since(now).await?,
        };
        let view = ClusterView::new(snapshot, &self.config.driver_name, &health);
        let plan = plan(&view, &stored, &settings, now);
        Ok(self.execute(plan, snapshot, &view.tainted).await)
    }

    async fn execute(
        &self,
        plan: Plan,
        snapshot: &Snapshot,
        tainted: &BTreeSet<String>,
    ) -> PassReport {
        let objects = Objects::new(snapshot);
        let mut seen = HashSet::new();
        let mut report = PassReport::default();

        let mut tainted = tainted.clone();
        for (node, add) in plan
            .taint
            .iter()
            .map(|n| (n, true))
            .chain(plan.untaint.iter().map(|n| (n, false)))
        {
            match self.set_failover_taint(node, add).await {
                Ok(()) if add => {
                    info!(node = %node, taint = FAILOVER_TAINT, "down node tainted NoSchedule before its pods are failed over, so that their replacements go elsewhere");
                    tainted.insert(node.clone());
                    report.tainted.push(node.clone());
                }
                Ok(()) => {
                    info!(node = %node, taint = FAILOVER_TAINT, "the node is up again: its failover taint is taken off");
                    report.untainted.push(node.clone());
                }
                Err(e) => {
                    warn!(node = %node, add, error = %e, "could not change the node's failover taint; the next pass retries")
                }
            }
        }

        let results: Vec<_> = stream::iter(plan.fences.iter().cloned())
            .map(|target| async move {
                let result = self
                    .controller
                    .fence_for_recovery(&target.0, &target.1)
                    .await;
                (target, result)
            })
            .buffer_unordered(CONCURRENT_FENCES)
            .collect()
            .await;
        let mut fenced = HashSet::new();
        for (target, result) in results {
            let (volume, node) = &target;
            let subjects = plan.subjects.get(volume).cloned().unwrap_or_default();
            let notice = |severity, reason, signature: String, note: String| Notice {
                key: Some(format!("fence/{volume}/{node}")),
                signature,
                severity,
                reason,
                action: "Fence",
                note,
                volume: Some(volume.clone()),
                node: Some(node.clone()),
                pods: subjects.pods.clone(),
                claims: subjects.claims.clone(),
            };
            match result {
                Ok(outcome) => {
                    if let RecoveryFence::Fenced { epoch, .. } = &outcome {
                        let note = format!(
                            "volume {volume}'s attachment on down node {node} is {}: the node can never write to it again",
                            outcome.describe()
                        );
                        let n = notice(
                            Severity::Normal,
                            reason::VOLUME_FENCED,
                            format!("epoch {epoch}"),
                            note,
                        );
                        self.notify(&n, &objects, &mut seen).await;
                    } else {
                        info!(volume = %volume, node = %node, "{}", outcome.describe());
                    }
                    fenced.insert(target.clone());
                    report.fenced.push(target);
                }
                Err(e) => {
                    let why = e.to_string();
                    // One report per refusal, however its wording evolves (the members found
                    // unreachable are failed, and the next try finds none left).
                    let kind = match e {
                        RecoveryFenceError::Unfenceable { .. } => "unfenceable",
                        RecoveryFenceError::Store(_) => "store",
                    };
                    let n = notice(
                        Severity::Warning,
                        reason::RECOVERY_REFUSED,
                        kind.to_string(),
                        format!("the volume cannot move away from down node {node}: {why}"),
                    );
                    self.notify(&n, &objects, &mut seen).await;
                    report.refused.push((target, why));
                }
            }
        }

        if self.config.crash_after_fence && report.fenced.iter().any(|t| plan.fences.contains(t)) {
            tracing::error!(fenced = ?report.fenced, "fault injection (--crash-after-recovery-fence): exiting after fencing, before anything is deleted");
            std::process::exit(137);
        }

        let attachments: Api<VolumeAttachment> = Api::all(self.client.clone());
        let mut removed = HashSet::new();
        for remove in &plan.attachments {
            if !remove.needs.iter().all(|t| fenced.contains(t)) {
                continue;
            }
            let (volume, node) = (&remove.volume, &remove.va.node);
            let result = attachments
                .delete(&remove.va.name, &params(&remove.va.uid, None))
                .await
                .map(|_| ());
            match deleted(result) {
                Ok(how) => {
                    removed.insert(remove.va.name.clone());
                    report.attachments_removed.push(remove.va.name.clone());
                    if let Deleted::Now = how {
                        let subjects = plan.subjects.get(volume).cloned().unwrap_or_default();
                        let n = Notice {
                            key: None,
                            signature: String::new(),
                            severity: Severity::Normal,
                            reason: reason::STALE_ATTACHMENT_REMOVED,
                            action: "DeleteVolumeAttachment",
                            note: format!(
                                "VolumeAttachment {} of volume {volume} on down node {node} deleted after fencing, so that the volume can attach elsewhere: {}",
                                remove.va.name, remove.why
                            ),
                            volume: Some(volume.clone()),
                            node: Some(node.clone()),
                            pods: subjects.pods,
                            claims: subjects.claims,
                        };
                        self.notify(&n, &objects, &mut seen).await;
                    }
                }
                Err(e) => {
                    warn!(volume = %volume, node = %node, attachment = %remove.va.name, error = %e, "could not delete the stale VolumeAttachment; the next pass retries")
                }
            }
        }

        let mut releases: BTreeMap<&str, Vec<&ReleaseInUse>> = BTreeMap::new();
        for release in &plan.in_use {
            if release.needs.iter().all(|t| fenced.contains(t)) {
                releases.entry(&release.node).or_default().push(release);
            }
        }
        for (node, releases) in releases {
            let names: Vec<String> = releases
                .iter()
                .map(|r| unique_volume_name(&self.config.driver_name, &r.volume))
                .collect();
            match self.release_in_use(node, &names).await {
                Ok(()) => {
                    for r in releases {
                        info!(volume = %r.volume, node = %node, "fenced volume taken out of the down node's status.volumesInUse, so that the attach-detach controller detaches it now");
                        report
                            .in_use_released
                            .push((node.to_string(), r.pv.clone()));
                    }
                }
                Err(e) => {
                    warn!(node = %node, volumes = ?names, error = %e, "could not take the fenced volumes out of the down node's status.volumesInUse; the next pass retries")
                }
            }
        }

        let pods = |namespace: &str| Api::<Pod>::namespaced(self.client.clone(), namespace);
        for mark in &plan.terminate {
            let pod = &mark.pod;
            let node = pod.node.clone().unwrap_or_default();
            if !mark.needs.iter().all(|t| fenced.contains(t)) {
                continue;
            }
            let message = format!(
                "node {node} is down and the pod's Palisade volumes are fenced there: {}",
                mark.why
            );
            match mark_failed(&pods(&pod.namespace), pod, &message).await {
                Ok(how) => {
                    report.pods_marked_failed.push(pod.key());
                    if let Deleted::Now = how {
                        let n = Notice {
                            severity: Severity::Normal,
                            action: "MarkPodFailed",
                            ..pod_notice(
                                mark,
                                reason::POD_MARKED_FAILED,
                                format!(
                                    "terminating pod {} on down node {node} marked Failed, so that the attach-detach controller releases its volumes: {message}",
                                    pod.name
                                ),
                            )
                        };
                        self.notify(&n, &objects, &mut seen).await;
                    }
                }
                Err(e) => {
                    warn!(pod = %pod.key(), node = %node, error = %e, "could not mark the terminating pod on a down node Failed; the next pass retries")
                }
            }
        }

        for remove in &plan.force_deletes {
            let pod = &remove.pod;
            let node = pod.node.clone().unwrap_or_default();
            let unfenced: Vec<&Target> = remove
                .needs
                .iter()
                .filter(|t| !fenced.contains(*t))
                .collect();
            let pending_attachment = plan.attachments.iter().any(|a| {
                a.va.node == node && pod.volumes.contains(&a.va.pv) && !removed.contains(&a.va.name)
            });
            if remove.needs_taint && !tainted.contains(&node) {
                continue;
            }
            if !unfenced.is_empty() || pending_attachment {
                let missing: Vec<&str> = unfenced.iter().map(|t| t.0.as_str()).collect();
                warn!(pod = %pod.key(), node = %node, unfenced = ?missing, "the pod on a down node is not force-deleted yet: not all of its node's attachments are fenced and released; the next pass retries");
                continue;
            }
            let result = pods(&pod.namespace)
                .delete(&pod.name, &params(&pod.uid, Some(0)))
                .await
                .map(|_| ());
            match deleted(result) {
                Ok(how) => {
                    report.pods_force_deleted.push(pod.key());
                    if let Deleted::Now = how {
                        let n = pod_notice(
                            remove,
                            reason::POD_FORCE_DELETED,
                            format!("pod {} on down node {node} force-deleted (grace period 0) after its volumes were fenced: {}", pod.name, remove.why),
                        );
                        self.notify(&n, &objects, &mut seen).await;
                    }
                }
                Err(e) => {
                    warn!(pod = %pod.key(), node = %node, error = %e, "could not force-delete the pod; the next pass retries")
                }
            }
        }

        for remove in &plan.deletes {
            let pod = &remove.pod;
            let node = pod.node.clone().unwrap_or_default();
            let result = pods(&pod.namespace)
                .delete(&pod.name, &params(&pod.uid, None))
                .await
                .map(|_| ());
            match deleted(result) {
                Ok(how) => {
                    report.pods_deleted.push(pod.key());
                    if let Deleted::Now = how {
                        let n = pod_notice(
                            remove,
                            reason::POD_DELETED,
                            format!("pod {} on node {node} deleted: {}", pod.name, remove.why),
                        );
                        self.notify(&n, &objects, &mut seen).await;
                    }
                }
                Err(e) => {
                    warn!(pod = %pod.key(), node = %node, error = %e, "could not delete the pod whose volume was detached; the next pass retries")
                }
            }
        }

        for notice in &plan.notices {
            self.notify(notice, &objects, &mut seen).await;
        }
        self.forget_unseen(&seen);
        report
    }
}

/// A Warning about the pod `remove` deletes, on the pod and its volumes' claims.
fn pod_notice(remove: &RemovePod, reason: &'static str, note: String) -> Notice {
    Notice {
        key: None,
        signature: String::new(),
        severity: Severity::Warning,
        reason,
        action: "DeletePod",
        note,
        volume: remove.volume.clone(),
        node: remove.pod.node.clone(),
        pods: vec![(remove.pod.namespace.clone(), remove.pod.name.clone())],
        claims: remove.claims.clone(),
    }
}

#[cfg(test)]
mod tests;
