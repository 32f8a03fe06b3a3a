//! The cluster's objects as the store keeps them: nodes and their disks, volumes with their
//! attachment, and replicas. Plain data, serde-serialisable, no behaviour beyond small helpers.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::params::VolumeParams;

/// Topology key whose value is the node id; every node reports it.
pub const TOPOLOGY_NODE_KEY: &str = "topology.palisade.io/node";
/// Topology key for the node's zone (only reported when the node has one).
pub const TOPOLOGY_ZONE_KEY: &str = "topology.kubernetes.io/zone";

/// The publish context key of the attachment's epoch, which ControllerPublish hands to the
/// node and the node's engine opens its replica sessions with.
pub const CONTEXT_EPOCH: &str = "palisade.io/epoch";
/// The publish context key of the attachment token an engine opens its replica sessions with
/// (cluster mode).
pub const CONTEXT_TOKEN: &str = "palisade.io/token";

/// The filesystem of a mount capability that names none, and of a StorageClass without
/// `fsType`.
pub const DEFAULT_FS: &str = "ext4";

/// The largest volume Palisade creates (a sparse file's practical bound on ext4 is 16 TiB).
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;

/// A node of the cluster as its agent reported it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    /// host:port of the node's replica server ("" in standalone).
    pub address: String,
    /// host:port of the node's agent API, which the controller calls to create, grow and
    /// delete replicas ("" in standalone, where the agent is in the controller's process).
    #[serde(default)]
    pub agent_address: String,
    pub zone: Option<String>,
    pub tags: Vec<String>,
    /// Operator lever: false keeps new replicas off this node.
    pub schedulable: bool,
    /// Milliseconds since the Unix epoch of the last heartbeat.
    pub last_heartbeat_ms: u64,
    pub disks: Vec<Disk>,
}

/// A disk (a directory on a filesystem) that holds replicas.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Disk {
    /// Stable id, kept in a marker file in the disk directory.
    pub id: String,
    pub path: PathBuf,
    pub tags: Vec<String>,
    pub schedulable: bool,
    /// Total bytes of the filesystem the disk lives on.
    pub storage_maximum: u64,
    /// Bytes available on that filesystem now.
    pub storage_available: u64,
    /// Bytes the operator keeps out of scheduling.
    pub storage_reserved: u64,
}

/// Where a volume is in its life.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeState {
    /// Intent recorded; replicas may not all exist yet. A retry or restart resumes it.
    Creating,
    Ready,
    /// Delete recorded; replicas are being removed. A retry or restart finishes it.
    Deleting,
}

/// How the volume is consumed: a mounted filesystem or a raw block device.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[schemars(transform = string_or_object_schema)]
pub enum AccessType {
    Block,
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
}

/// The schema of an externally tagged enum with both unit and struct variants (a string or
/// an object), which no Kubernetes structural schema can describe: the API server keeps the
/// value whole, unvalidated.
fn string_or_object_schema(schema: &mut schemars::Schema) {
    let description = schema.get("description").cloned();
    *schema = schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true });
    if let Some(description) = description {
        schema.insert("description".to_string(), description);
    }
}

/// CSI access modes that Palisade knows by name.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// True when at most one node may have the volume published at a time.
    pub fn is_single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }
}

/// One requested volume capability, reduced to what Palisade acts on.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

/// The volume's one attachment: the node its engine runs on and the epoch that fences
/// every older attachment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Attachment {
    pub node_id: String,
    pub epoch: u64,
    pub readonly: bool,
    pub capability: Capability,
    pub since_ms: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Volume {
    /// Derived from the name (see `volume_id_for_name`), so create-by-name is a keyed put.
    pub id: String,
    pub name: String,
    pub size: u64,
    pub params: VolumeParams,
    /// The `csi.storage.k8s.io/*` keys external-provisioner adds, kept as given.
    pub extra_params: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    /// The topology segments the volume is reachable from (strict-local pins one node).
    pub accessible_topology: Vec<BTreeMap<String, String>>,
    pub state: VolumeState,
    /// Why the volume has fewer replicas than asked, when it has.
    pub degraded_reason: Option<String>,
    /// Highest epoch ever handed out; bumps on every new attachment.
    pub epoch: u64,
    pub attachment: Option<Attachment>,
    pub created_ms: u64,
    /// While `Creating`: the replicas its placement decided, recorded with the volume in one
    /// write so that a crash at any point resumes the same plan. Empty once `Ready`.
    #[serde(default)]
    pub planned_replicas: Vec<Replica>,
    /// The number the next replica added after creation takes (`<id>-r-<n>`): numbers are
    /// never reused, so a deleted replica's id (its reports, its leftover files) cannot be
    /// taken for a new one's.
    #[serde(default)]
    pub next_replica: u64,
    /// Set when an engine starts serving the volume, cleared when an engine stops cleanly
    /// (every request it took finished while it still served). An engine that starts while
    /// it is set follows one that died, was fenced or lost its lease, whose writes in flight
    /// may have reached some members and not others: only one member is kept and the others
    /// are rebuilt from it.
    #[serde(default)]
    pub engine_running: bool,
    /// How many of its replicas are ready (hold every acknowledged write), as the
    /// controller last counted them: at creation, and on every lifecycle pass that finds it
    /// changed. For the operator's eyes (`kubectl get plv`); decisions count the replicas.
    #[serde(default)]
    pub ready_replicas: u32,
    /// The attachment lease of the volume's latest engine as the controllers promised it, so
    /// that a controller that did not grant it (another replica, or itself before a restart)
    /// still waits for it to lapse before a new attachment starts. Kept when the volume is
    /// detached: an engine that did not give its lease back may still serve until then.
    #[serde(default)]
    pub engine_lease: Option<EngineLease>,
}

/// What the controllers promised an engine about its attachment lease (see
/// `control::leases`). It is rewritten at a coarse interval, not at every renewal: it bounds
/// every lease granted to the engine of `epoch` from above.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct EngineLease {
    /// The attachment epoch of the engine the leases were granted to.
    pub epoch: u64,
    /// No lease granted to that engine lasts beyond this (milliseconds since the Unix epoch,
    /// on the clock of the controller that wrote it).
    pub until_ms: u64,
    /// The controller process (an identity drawn at its start) that wrote this and granted
    /// the leases since: only it renews without rewriting the record, so only it may trust its
    /// memory of the last grant instead of `until_ms`.
    pub granter: String,
    /// The engine gave its lease back when it stopped: nothing to wait for.
    pub released: bool,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Placed after the volume was created (a replacement); not yet confirmed by its node.
    /// A new volume's first replicas are recorded `Ready`: the volume's `Creating` state
    /// covers them until every one exists.
    Creating,
    Ready,
    /// Being filled by the attached engine's online rebuild: it receives every write but is
    /// not a member until the engine promotes it (then `Ready`).
    Rebuilding,
    Failed,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Replica {
    /// `<volume id>-r-<n>`.
    pub id: String,
    pub volume_id: String,
    pub node_id: String,
    pub disk_id: String,
    /// The replica's directory on the node.
    pub path: PathBuf,
    pub size: u64,
    pub state: ReplicaState,
    /// When it was marked `Failed` (ms since the epoch); 0 otherwise.
    #[serde(default)]
    pub failed_ms: u64,
    /// While `Rebuilding`: how much of it the engine has rebuilt, in steps of 10% (for the
    /// operator's eyes; the exact progress is in `palisade ctl volume`). None otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_percent: Option<u8>,
}

/// Maps a CSI volume name to its volume id. Names that are already safe as ids and paths
/// are kept (as Longhorn does: the PV name is the volume name); any other name maps to a
/// digest of it, with a prefix that no kept name can have.
pub fn volume_id_for_name(name: &str) -> String {
    let safe = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.starts_with("h-");
    if safe {
        name.to_string()
    } else {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(name.as_bytes());
        format!("h-{}", &hex::encode(digest)[..40])
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_are_kept_and_others_hashed() {
        assert_eq!(volume_id_for_name("pvc-0a1b"), "pvc-0a1b");
        let odd = volume_id_for_name("Sanity Volume/ü");
        assert!(odd.starts_with("h-") && odd.len() == 42, "{odd}");
        assert_eq!(odd, volume_id_for_name("Sanity Volume/ü"));
        assert_ne!(volume_id_for_name("h-abc"), "h-abc");
        assert_ne!(volume_id_for_name(&"a".repeat(128)), "a".repeat(128));
    }
}
