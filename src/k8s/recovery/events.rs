//! What the recovery controller tells the operator: each action or refusal as a Kubernetes
//! Event (events.k8s.io/v1) on the pods and the claim it concerns, so that `kubectl describe`
//! shows it, and as a log line naming the volume and the node. A state that lasts over many
//! passes (a policy holding a volume, a fence that keeps failing) is reported once, when it
//! starts or changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Pod};
use kube::runtime::events::{Event, EventType};
use kube::Resource;
use tracing::{info, warn};

use super::view::Snapshot;
use super::Recovery;

/// The Events' reasons.
pub mod reason {
    /// The attachment on a down node was fenced.
    pub const VOLUME_FENCED: &str = "VolumeFenced";
    /// Fencing failed: the volume stays attached to the down node.
    pub const RECOVERY_REFUSED: &str = "RecoveryRefused";
    /// The stale VolumeAttachment was deleted.
    pub const STALE_ATTACHMENT_REMOVED: &str = "StaleAttachmentRemoved";
    /// The recovery policy holds the volume on the down node while a pod waits for it.
    pub const RECOVERY_WAITING: &str = "RecoveryWaiting";
    /// A terminating pod on a down node was marked Failed once its volumes were fenced.
    pub const POD_MARKED_FAILED: &str = "PodMarkedFailed";
    /// A pod on a down node was force-deleted.
    pub const POD_FORCE_DELETED: &str = "PodForceDeleted";
    /// A pod whose volume was detached under it was deleted, to be recreated.
    pub const POD_DELETED: &str = "PodDeleted";
    /// A pod whose volume was detached under it is not deleted (no controller owns it).
    pub const POD_NOT_DELETED: &str = "PodNotDeleted";
}

/// How serious a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// One thing to report, on some pods and claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// For a lasting state: its subject, reported again only when `signature` changes. None
    /// for an action, reported once as it happens.
    pub key: Option<String>,
    pub signature: String,
    pub severity: Severity,
    /// One of [`reason`].
    pub reason: &'static str,
    /// What the controller did or tried (`Fence`, `DeleteVolumeAttachment`, `DeletePod`,
    /// `Wait`).
    pub action: &'static str,
    pub note: String,
    pub volume: Option<String>,
    pub node: Option<String>,
    /// (namespace, name) of the pods and claims the Event goes on.
    pub pods: Vec<(String, String)>,
    pub claims: Vec<(String, String)>,
}

/// The largest Event note the API server takes.
const MAX_NOTE: usize = 1024;

/// The pods and claims of a snapshot, by (namespace, name), for the Events' references.
pub(super) struct Objects {
    pods: HashMap<(String, String), Arc<Pod>>,
    claims: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
}

impl Objects {
    pub(super) fn new(snapshot: &Snapshot) -> Objects {
        fn key<K: Resource>(o: &K) -> (String, String) {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        }
        Objects {
            pods: snapshot
                .pods
                .iter()
                .map(|p| (key(p.as_ref()), p.clone()))
                .collect(),
            claims: snapshot
                .claims
                .iter()
                .map(|c| (key(c.as_ref()), c.clone()))
                .collect(),
        }
    }

    fn references(&self, notice: &Notice) -> Vec<ObjectReference> {
        let pods = notice
            .pods
            .iter()
            .filter_map(|k| self.pods.get(k))
            .map(|p| p.object_ref(&()));
        let claims = notice
            .claims
            .iter()
            .filter_map(|k| self.claims.get(k))
            .map(|c| c.object_ref(&()));
        pods.chain(claims).collect()
    }
}

/// `note` cut to what an Event takes, at a character boundary.
fn bounded(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

impl Recovery {
    /// Logs and posts `notice` unless it is a lasting state reported already; records the
    /// subject as seen in this pass.
    pub(super) async fn notify(
        &self,
        notice: &Notice,
        objects: &Objects,
        seen: &mut HashSet<String>,
    ) {
        if let Some(key) = &notice.key {
            seen.insert(key.clone());
            if self.reported_map().get(key) == Some(&notice.signature) {
                return;
            }
        }
        let volume = notice.volume.as_deref().unwrap_or("-");
        let node = notice.node.as_deref().unwrap_or("-");
        match notice.severity {
            Severity::Normal => {
                info!(volume, node, reason = notice.reason, "{}", notice.note)
            }
            Severity::Warning => {
                warn!(volume, node, reason = notice.reason, "{}", notice.note)
            }
        }
        let event = Event {
            type_: match notice.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: notice.reason.to_string(),
            note: Some(bounded(&notice.note)),
            action: notice.action.to_string(),
            secondary: None,
        };
        let mut posted = true;
        for reference in objects.references(notice) {
            if let Err(e) = self.recorder.publish(&event, &reference).await {
                posted = false;
                warn!(volume, node, reason = notice.reason, object = ?reference.name, error = %e, "could not post the Event");
            }
        }
        if let (Some(key), true) = (&notice.key, posted) {
            self.reported_map()
                .insert(key.clone(), notice.signature.clone());
        }
    }

    /// Forgets the lasting states not seen in this pass, so that one that comes back is
    /// reported again.
    pub(super) fn forget_unseen(&self, seen: &HashSet<String>) {
        self.reported_map().retain(|key, _| seen.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::bounded;

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() <= super::MAX_NOTE, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }
}
