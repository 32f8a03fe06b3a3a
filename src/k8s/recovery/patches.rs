//! The recovery pass's writes to objects it does not own, each a read-modify-write that
//! keeps what others wrote: a Node's failover taint, a dead Node's `status.volumesInUse`, and
//! the status of a Terminating pod on a dead node, marked Failed.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};

use super::pass::Deleted;
use super::view::{PodView, FAILOVER_TAINT};
use super::Recovery;

/// How many times a Node patch is tried when the Node changed in between.
const NODE_ATTEMPTS: usize = 5;

/// Which part of a Node a patch writes.
#[derive(Clone, Copy)]
enum Part {
    Spec,
    Status,
}

/// A read-modify-write of the Node `node`: `edit` gives the merge patch's body for the Node
/// as just read (None: nothing to change), sent with that resourceVersion, so that a list it
/// replaces as a whole loses nothing written in between; retried when the Node changed. A
/// Node gone is fine.
async fn edit_node(
    nodes: &Api<Node>,
    node: &str,
    part: Part,
    edit: impl Fn(&Node) -> Option<serde_json::Value>,
) -> Result<(), kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(current) = nodes.get_opt(node).await? else {
            return Ok(());
        };
        let Some(mut patch) = edit(&current) else {
            return Ok(());
        };
        patch["metadata"] =
            serde_json::json!({ "resourceVersion": current.metadata.resource_version });
        let params = PatchParams::default();
        let result = match part {
            Part::Spec => nodes.patch(node, &params, &Patch::Merge(&patch)).await,
            Part::Status => {
                nodes
                    .patch_status(node, &params, &Patch::Merge(&patch))
                    .await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < NODE_ATTEMPTS => {}
            Err(e) => return Err(e),
        }
    }
}

impl Recovery {
    /// Adds (`add`) or removes the [`FAILOVER_TAINT`] (NoSchedule) on the Node `node`,
    /// keeping its other taints.
    pub(super) async fn set_failover_taint(
        &self,
        node: &str,
        add: bool,
    ) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        edit_node(&nodes, node, Part::Spec, |current| {
            let mut taints = current
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if taints.iter().any(|t| t.key == FAILOVER_TAINT) == add {
                return None;
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
            Some(serde_json::json!({ "spec": { "taints": taints } }))
        })
        .await
    }

    /// Takes `names` out of the Node `node`'s `status.volumesInUse`, keeping the rest.
    pub(super) async fn release_in_use(
        &self,
        node: &str,
        names: &[String],
    ) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        edit_node(&nodes, node, Part::Status, |current| {
            let listed = current
                .status
                .as_ref()
                .and_then(|s| s.volumes_in_use.clone())
                .unwrap_or_default();
            let kept: Vec<&String> = listed.iter().filter(|v| !names.contains(v)).collect();
            (kept.len() != listed.len())
                .then(|| serde_json::json!({ "status": { "volumesInUse": kept } }))
        })
        .await
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
