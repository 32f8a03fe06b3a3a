//! The Kubernetes recovery controller: what Palisade does when a node dies, where Kubernetes
//! alone is stuck (DESIGN, "Kubernetes recovery"). It runs on the leader only, watches
//! Palisade's VolumeAttachments, the PersistentVolumes and claims, the pods using them and
//! the Nodes, and on every change (and every few seconds, since grace periods run out with
//! no change) makes one level-triggered pass over all of them:
//!
//! - a VolumeAttachment on a down node is recovered as its volume's recovery policy says
//!   (`never`, `wait`, `immediate`, with Longhorn's meaning): the attachment is fenced, then
//!   the VolumeAttachment is deleted, so that the csi-attacher releases it, the volume is
//!   taken out of the dead Node's `status.volumesInUse`, which its kubelet can no longer
//!   update, and a Terminating pod there that still holds it is marked Failed: the
//!   attach-detach controller does not detach a volume its node reports in use before its
//!   six-minute maximum wait for unmount, keeps a Terminating pod's volume on its node while
//!   its containers are reported running, and notices a deleted VolumeAttachment only at its
//!   periodic sync (60 s by default); with all three gone, the pod waiting elsewhere gets the
//!   volume at once, without Kubernetes' six-minute wait;
//! - a terminating pod on a down node is force-deleted as node-down-pod-deletion-policy says,
//!   once its grace period is over, after its volumes are fenced and their VolumeAttachments
//!   there deleted; with node-down-failover-seconds, a node's StatefulSet and Deployment pods
//!   are, once it has been down that long and every Palisade volume attached there is fenced,
//!   after the Node is tainted `palisade.io/node-down:NoSchedule` (taken off when it is up);
//!   a node is down from the earlier of its Node going NotReady and Palisade's own health
//!   rule (the agent's heartbeat, weighed with the kubelet's Lease) saying so;
//! - a running pod whose volume was detached or fenced under it is deleted so that its
//!   controller recreates it (auto-delete-pod-when-volume-detached-unexpectedly); a pod that
//!   no controller owns never is.
//!
//! Every action, and every refusal, is a Kubernetes Event on the pod and the claim, and a log
//! line naming the volume and the node. The decisions are pure functions (`decide`) of a
//! reduced view of the cluster (`view`); `pass` plans and carries out one pass; `run` keeps
//! the reflectors and runs passes while this process leads.

pub mod decide;
mod events;
mod pass;
mod patches;
mod run;
pub mod view;

pub use pass::{plan, PassError, PassReport, Plan};
pub use run::run;
pub use view::{ClusterView, NodeHealth, NodeReady, Snapshot};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};

use crate::control::Controller;

/// How often a pass runs with no change seen: the time grace periods and failover delays
/// take to run out is noticed within this.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(2);

/// The recovery controller's configuration.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// The CSI driver name: VolumeAttachments with this attacher and PersistentVolumes of
    /// this driver are Palisade's.
    pub driver_name: String,
    /// How often a pass runs with no change seen.
    pub resync: Duration,
    /// Who the Events say reported them (`reportingController`, `reportingInstance`).
    pub reporter: Reporter,
    /// Fault injection for the tests: the process exits at once, as a kill -9 would stop
    /// it, right after a pass has fenced an attachment and before it deletes or marks
    /// anything, so that a restart must finish the recovery.
    pub crash_after_fence: bool,
}

impl RecoveryConfig {
    /// The defaults for `driver_name`, reporting as `palisade-recovery` from `instance` (the
    /// controller pod's name, when known).
    pub fn new(driver_name: &str, instance: Option<String>) -> RecoveryConfig {
        RecoveryConfig {
            driver_name: driver_name.to_string(),
            resync: DEFAULT_RESYNC,
            crash_after_fence: false,
            reporter: Reporter {
                controller: "palisade-recovery".to_string(),
                instance,
            },
        }
    }
}

/// The recovery controller: the control plane it fences through, the API it acts on, and
/// what it last reported (so that a state that lasts is one Event, not one per pass).
pub struct Recovery {
    controller: Arc<Controller>,
    client: kube::Client,
    config: RecoveryConfig,
    health: Arc<dyn NodeHealth>,
    recorder: Recorder,
    /// The last notice per subject, as reported.
    reported: Mutex<HashMap<String, String>>,
}

impl Recovery {
    /// A recovery controller acting through `controller` and `client`, with node health from
    /// `health` (for instance [`NodeReady`]).
    pub fn new(
        controller: Arc<Controller>,
        client: kube::Client,
        config: RecoveryConfig,
        health: Arc<dyn NodeHealth>,
    ) -> Recovery {
        let recorder = Recorder::new(client.clone(), config.reporter.clone());
        Recovery {
            controller,
            client,
            config,
            health,
            recorder,
            reported: Mutex::default(),
        }
    }

    /// Forgets what was reported (leadership lost: the next leader reports afresh).
    fn forget(&self) {
        self.reported_map().clear();
    }

    fn reported_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
