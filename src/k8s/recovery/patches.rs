//! The recovery pass's writes to objects it does not own, each a read-modify-write that
//! keeps what others wrote: a Node's failover taint, a dead Node's `status.volumesInUse`, and
//! the status of a Terminating pod on a dead node, marked Failed.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};

use super::pass::Deleted;
use super::view::{PodView, FAILOVER_TAINT};
use super::Recovery;

impl Recovery {
    /// Adds (`add`) or removes the [`FAILOVER_TAINT`] (NoSchedule) on the Node `node`,
    /// keeping its other taints: a merge patch with the resourceVersion just read (the list
    /// is replaced as a whole), retried when the Node changed. A Node gone is fine.
    pub(super) async fn set_failover_taint(
        &self,
        node: &str,
        add: bool,
    ) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(current) = nodes.get_opt(node).await? else {
                return Ok(());
            };
            let mut taints = current
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let has = taints.iter().any(|t| t.key == FAILOVER_TAINT);
            if has == add {
                return Ok(());
            }
            if add {
                taints.push(k8s_openapi::api::core::v1::Taint {
                    key: FAILOVER_TAINT.to_string(),
                    value: Some("failover".to_string()),
                    effect: "NoSchedule".to_string(),
                    time_added: None,
                });
            } else {
                taints.retain(|t| t.key != FAILOVER_TAINT);
            }
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": current.metadata.resource_version },
                "spec": { "taints": taints },
            });
            match nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < STATUS_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// How many times a Node status patch is tried when the Node changed in between.
const STATUS_ATTEMPTS: usize = 5;

impl Recovery {
    /// Takes `names` out of the Node `node`'s `status.volumesInUse`: a merge patch with the
    /// resourceVersion just read, so that nothing else that changed in between is lost (the
    /// list is replaced as a whole), retried when the Node changed.
    pub(super) async fn release_in_use(
        &self,
        node: &str,
        names: &[String],
    ) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(current) = nodes.get_opt(node).await? else {
                return Ok(());
            };
            let listed = current
                .status
                .as_ref()
                .and_then(|s| s.volumes_in_use.clone())
                .unwrap_or_default();
            let kept: Vec<&String> = listed.iter().filter(|v| !names.contains(v)).collect();
            if kept.len() == listed.len() {
                return Ok(());
            }
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": current.metadata.resource_version },
                "status": { "volumesInUse": kept },
            });
            match nodes
                .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < STATUS_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The reason of the condition and the status of a pod marked Failed.
pub const FENCED_REASON: &str = "PalisadeVolumeFenced";

/// Marks `pod` Failed, with a `DisruptionTarget` condition saying why (as the pod garbage
/// collector does for a pod on an out-of-service node): the uid in the patch makes it fail
/// on a pod recreated under the same name, and a pod already terminal is left as it is.
pub(super) async fn mark_failed(
    pods: &Api<Pod>,
    pod: &PodView,
    message: &str,
) -> Result<Deleted, kube::Error> {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let patch = serde_json::json!({
        "metadata": { "uid": pod.uid },
        "status": {
            "phase": "Failed",
            "reason": FENCED_REASON,
            "message": message,
            "conditions": [{
                "type": "DisruptionTarget",
                "status": "True",
                "reason": FENCED_REASON,
                "message": message,
                "lastTransitionTime": now,
            }],
        },
    });
    match pods
        .patch_status(
            &pod.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => Ok(Deleted::Now),
        // Gone, replaced (uid), or already terminal (a phase cannot leave Failed/Succeeded).
        Err(kube::Error::Api(s)) if [404, 409, 422].contains(&s.code) => Ok(Deleted::Gone),
        Err(e) => Err(e),
    }
}
