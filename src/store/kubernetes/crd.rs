//! The custom resources that hold the cluster state in a cluster, one kind per store table:
//! `PalisadeVolume`, `PalisadeReplica`, `PalisadeNode` and `PalisadeSettings` (group
//! `palisade.io`, version `v1alpha1`, namespaced; short names `plv`, `plr`, `pln`, `pls`; all
//! in the category `palisade`, so `kubectl get palisade` lists them all).
//!
//! Each spec is the model type itself (flattened, so `spec.size`, `spec.state`...) plus the
//! store key it is kept under: there is one definition of every field, in `model.rs` and
//! `settings.rs`, and its doc comment is the schema's description (`kubectl explain`).
//!
//! `status` holds a few fields derived from the spec for the printer columns (sizes in
//! binary units, a disk count, free space, the last heartbeat as a time). Only the store
//! writes objects, and it computes the status from the value on every write
//! ([`PalisadeVolume::stored`] and the others), so it can never disagree with the spec; it is
//! never read back. It is deliberately *not* a status subresource: with one, a write of the
//! main resource silently drops status changes and a status write is a second request with
//! its own resourceVersion, so one store put would become two writes that can tear. The
//! store's contract is one document, one version, one compare-and-swap.
//!
//! Two columns an operator may look for are not here, because the objects do not hold them:
//! a volume's ready replica count (a count over other objects; keeping it on the volume would
//! change the volume's version on every replica change and make the controller's volume
//! writes conflict) and a replica's rebuild progress (the controller keeps it in memory; see
//! `palisade ctl volumes`). `kubectl get plr -l palisade.io/volume=<id>` lists a volume's
//! replicas with their states.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::ObjectMeta;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;

/// The API group of Palisade's custom resources.
pub const GROUP: &str = "palisade.io";
/// Their API version.
pub const VERSION: &str = "v1alpha1";
/// The finalizer on every volume object: a `kubectl delete` of a volume only marks it for
/// deletion (a deletionTimestamp), and the object stays until the controller has deleted
/// the volume's replicas and then the volume record, which removes the finalizer. So no
/// deletion by hand orphans replica files (or deletes the record of an attached volume).
pub const VOLUME_FINALIZER: &str = "palisade.io/replicas";
/// Label on every replica object: its volume's id (`kubectl get plr -l palisade.io/volume=X`).
pub const VOLUME_LABEL: &str = "palisade.io/volume";
/// Label on every replica object: its node's id, when that is a valid label value.
pub const NODE_LABEL: &str = "palisade.io/node";

/// A Palisade volume: its size, parameters, state, attachment and fencing epoch.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
// Clippy reads the `name = …, type_ = …` of one printcolumn(…) as duplicates of another's.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "PalisadeVolume",
    plural = "palisadevolumes",
    shortname = "plv",
    category = "palisade",
    namespaced,
    status = "VolumeSummary",
    doc = "A Palisade volume: N replicas on the disks of different nodes, kept identical by the engine on the node it is attached to. Written by palisade controller only.",
    printcolumn(
        name = "Size",
        type_ = "string",
        json_path = ".status.size",
        description = "The volume's size (binary units)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".spec.ready_replicas",
        description = "Replicas ready (holding every acknowledged write)"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.params.number_of_replicas",
        description = "Replicas wanted (numberOfReplicas)"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".spec.state",
        description = "Creating, Ready or Deleting"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.attachment.node_id",
        description = "The node the volume is attached to"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".spec.epoch",
        description = "The fencing epoch: raised by every new attachment"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".spec.degraded_reason",
        description = "Why the volume has fewer replicas than wanted",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct PalisadeVolumeSpec {
    /// The store key the object is kept under (the volume id).
    pub key: String,
    /// The volume.
    #[serde(flatten)]
    pub volume: Volume,
}

/// Derived from a volume's spec by the store on every write, for the printer columns.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct VolumeSummary {
    /// The size in binary units (`10Gi`).
    pub size: String,
}

/// One replica of a volume: a sparse file on one disk of one node.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
// Clippy reads the `name = …, type_ = …` of one printcolumn(…) as duplicates of another's.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "PalisadeReplica",
    plural = "palisadereplicas",
    shortname = "plr",
    category = "palisade",
    namespaced,
    status = "ReplicaSummary",
    doc = "One replica of a Palisade volume: a sparse file on one disk of one node. Written by palisade controller only.",
    selectable = ".spec.volume_id",
    selectable = ".spec.node_id",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume_id"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node_id"),
    printcolumn(name = "Disk", type_ = "string", json_path = ".spec.disk_id"),
    printcolumn(
        name = "Rebuilt",
        type_ = "integer",
        json_path = ".spec.rebuilt_percent",
        description = "While rebuilding: percent rebuilt (in steps of 10)"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".spec.state",
        description = "Creating, Ready (a member), Rebuilding (receiving writes, not yet a member) or Failed"
    ),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.path",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct PalisadeReplicaSpec {
    /// The store key the object is kept under (the replica id, `<volume id>-r-<n>`).
    pub key: String,
    /// The replica.
    #[serde(flatten)]
    pub replica: Replica,
}

/// Derived from a replica's spec by the store on every write, for the printer columns.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ReplicaSummary {
    /// The size in binary units (`10Gi`).
    pub size: String,
}

/// A node as its agent reported it: address, zone, tags, disks and last heartbeat.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
// Clippy reads the `name = …, type_ = …` of one printcolumn(…) as duplicates of another's.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "PalisadeNode",
    plural = "palisadenodes",
    shortname = "pln",
    category = "palisade",
    namespaced,
    status = "NodeSummary",
    doc = "A node of a Palisade cluster and its disks, as its agent reported them. Written by palisade controller only.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(
        name = "Schedulable",
        type_ = "boolean",
        json_path = ".spec.schedulable"
    ),
    printcolumn(name = "Disks", type_ = "integer", json_path = ".status.disks"),
    printcolumn(
        name = "Free",
        type_ = "string",
        json_path = ".status.free",
        description = "Bytes available on the node's disks, summed"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.last_heartbeat",
        description = "Time since the last heartbeat: a node is down once it exceeds the controller's heartbeat timeout (10 s by default)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct PalisadeNodeSpec {
    /// The store key the object is kept under (the node id).
    pub key: String,
    /// The node.
    #[serde(flatten)]
    pub node: Node,
}

/// Derived from a node's spec by the store on every write, for the printer columns.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct NodeSummary {
    /// How many disks the node has.
    pub disks: u32,
    /// Bytes available on its disks, summed, in binary units.
    pub free: String,
    /// The last heartbeat (RFC 3339); absent before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
}

/// The cluster-wide settings (Longhorn's names, as `palisade ctl settings` shows them).
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
// Clippy reads the `name = …, type_ = …` of one printcolumn(…) as duplicates of another's.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "PalisadeSettings",
    plural = "palisadesettings",
    singular = "palisadesettings",
    shortname = "pls",
    category = "palisade",
    namespaced,
    doc = "The cluster-wide settings of Palisade (one object, named settings). Change them with palisade ctl settings, which validates every value.",
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.default_replica_count",
        description = "default-replica-count"
    ),
    printcolumn(
        name = "Locality",
        type_ = "string",
        json_path = ".spec.default_data_locality",
        description = "default-data-locality"
    ),
    printcolumn(
        name = "Recovery",
        type_ = "string",
        json_path = ".spec.volume_attachment_recovery_policy",
        description = "volume-attachment-recovery-policy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct PalisadeSettingsSpec {
    /// The store key the object is kept under (`settings`).
    pub key: String,
    /// The settings.
    #[serde(flatten)]
    pub settings: Settings,
}

impl PalisadeVolume {
    /// The object the store writes for `volume` under `key`, named `name`, with its summary.
    pub fn stored(name: &str, key: &str, volume: Volume) -> PalisadeVolume {
        let summary = VolumeSummary {
            size: binary_size(volume.size),
        };
        let mut object = PalisadeVolume::new(
            name,
            PalisadeVolumeSpec {
                key: key.to_string(),
                volume,
            },
        );
        object.status = Some(summary);
        object
    }
}

impl PalisadeReplica {
    /// The object the store writes for `replica` under `key`, named `name`, with its summary
    /// and its volume and node labels.
    pub fn stored(name: &str, key: &str, replica: Replica) -> PalisadeReplica {
        let summary = ReplicaSummary {
            size: binary_size(replica.size),
        };
        let mut labels = BTreeMap::new();
        for (label, value) in [
            (VOLUME_LABEL, &replica.volume_id),
            (NODE_LABEL, &replica.node_id),
        ] {
            if is_label_value(value) {
                labels.insert(label.to_string(), value.clone());
            }
        }
        let mut object = PalisadeReplica::new(
            name,
            PalisadeReplicaSpec {
                key: key.to_string(),
                replica,
            },
        );
        object.metadata.labels = Some(labels).filter(|l| !l.is_empty());
        object.status = Some(summary);
        object
    }
}

impl PalisadeNode {
    /// The object the store writes for `node` under `key`, named `name`, with its summary.
    pub fn stored(name: &str, key: &str, node: Node) -> PalisadeNode {
        let free = node
            .disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.storage_available));
        let summary = NodeSummary {
            disks: u32::try_from(node.disks.len()).unwrap_or(u32::MAX),
            free: binary_size(free),
            last_heartbeat: rfc3339_from_ms(node.last_heartbeat_ms),
        };
        let mut object = PalisadeNode::new(
            name,
            PalisadeNodeSpec {
                key: key.to_string(),
                node,
            },
        );
        object.status = Some(summary);
        object
    }
}

impl PalisadeSettings {
    /// The object the store writes for `settings` under `key`, named `name`.
    pub fn stored(name: &str, key: &str, settings: Settings) -> PalisadeSettings {
        PalisadeSettings::new(
            name,
            PalisadeSettingsSpec {
                key: key.to_string(),
                settings,
            },
        )
    }
}

/// The four CustomResourceDefinitions, as `palisade crds` prints them and
/// deploy/cluster/crds.yaml holds them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        PalisadeVolume::crd(),
        PalisadeReplica::crd(),
        PalisadeNode::crd(),
        PalisadeSettings::crd(),
    ];
    for crd in &mut crds {
        crd.metadata = ObjectMeta {
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "palisade".to_string(),
            )])),
            ..crd.metadata.clone()
        };
        for version in &mut crd.spec.versions {
            // `status` is written with the object, in the same request (see the module
            // documentation): no status subresource.
            version.subresources = None;
        }
    }
    crds
}

/// Why the CRDs could not be rendered as YAML.
#[derive(Debug, thiserror::Error)]
#[error("rendering the CustomResourceDefinitions as YAML failed: {source}")]
pub struct CrdYamlError {
    #[source]
    source: serde_saphyr::ser::Error,
}

/// The CRDs as one multi-document YAML stream, with a header that says where it comes from.
pub fn crds_yaml() -> Result<String, CrdYamlError> {
    let body =
        serde_saphyr::to_string_multiple(&crds()).map_err(|source| CrdYamlError { source })?;
    Ok(format!(
        "# Palisade's custom resources (the Kubernetes store). Generated from src/store/kubernetes/crd.rs:\n\
         # cargo run -- crds > deploy/cluster/crds.yaml\n---\n{body}"
    ))
}

/// Bytes in binary units, as Kubernetes quantities spell them: `0`, `512Ki`, `10Gi`, `1.5Ti`
/// (one decimal, rounded down, so a size is never shown larger than it is).
pub fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut unit = None;
    let mut scaled = u128::from(bytes);
    let mut divisor = 1u128;
    for u in UNITS {
        if scaled < 1024 {
            break;
        }
        scaled /= 1024;
        divisor *= 1024;
        unit = Some(u);
    }
    let Some(unit) = unit else {
        return bytes.to_string();
    };
    let tenths = u128::from(bytes) * 10 / divisor % 10;
    if tenths == 0 {
        format!("{scaled}{unit}")
    } else {
        format!("{scaled}.{tenths}{unit}")
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, seconds); None for 0 (never).
fn rfc3339_from_ms(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    let seconds = i64::try_from(ms / 1000).ok()?;
    let time = k8s_openapi::jiff::Timestamp::from_second(seconds).ok()?;
    Some(time.to_string())
}

/// A valid label value: at most 63 characters, alphanumerics, `-`, `_` and `.`, beginning and
/// ending with an alphanumeric.
fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_binary_units_never_rounded_up() {
        assert_eq!(binary_size(0), "0");
        assert_eq!(binary_size(1023), "1023");
        assert_eq!(binary_size(1024), "1Ki");
        assert_eq!(binary_size(10 << 30), "10Gi");
        assert_eq!(binary_size(3 << 29), "1.5Gi");
        assert_eq!(binary_size((2 << 30) - 1), "1.9Gi");
        assert_eq!(binary_size(u64::MAX), "15.9Ei");
    }

    #[test]
    fn heartbeats_are_rfc3339() {
        assert_eq!(rfc3339_from_ms(0), None);
        assert_eq!(
            rfc3339_from_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }

    #[test]
    fn replica_labels_are_set_only_when_valid() {
        let replica = |node: &str| Replica {
            id: "pvc-1-r-0".to_string(),
            volume_id: "pvc-1".to_string(),
            node_id: node.to_string(),
            disk_id: "d".to_string(),
            path: "/d/pvc-1-r-0".into(),
            size: 1 << 30,
            state: crate::model::ReplicaState::Ready,
            failed_ms: 0,
            rebuilt_percent: None,
        };
        let labels = |node| {
            PalisadeReplica::stored("pvc-1-r-0", "pvc-1-r-0", replica(node))
                .metadata
                .labels
                .unwrap_or_default()
        };
        assert_eq!(
            labels("worker-1"),
            BTreeMap::from([
                (VOLUME_LABEL.to_string(), "pvc-1".to_string()),
                (NODE_LABEL.to_string(), "worker-1".to_string()),
            ])
        );
        assert!(!labels("a node/with spaces").contains_key(NODE_LABEL));
    }

    #[test]
    fn no_crd_has_a_status_subresource() {
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            for version in &crd.spec.versions {
                assert_eq!(version.name, VERSION);
                assert!(version.subresources.is_none(), "{}", crd.spec.names.plural);
            }
        }
    }

    #[test]
    fn the_checked_in_crds_are_the_generated_ones() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cluster/crds.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crds_yaml().expect("the CRDs render");
        assert!(
            checked_in == generated,
            "{path} differs from what src/store/kubernetes/crd.rs generates: run \
             `cargo run -- crds > deploy/cluster/crds.yaml`"
        );
    }
}
