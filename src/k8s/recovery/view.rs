//! What the recovery controller sees of Kubernetes, reduced to what its decisions need: the
//! cluster's objects as a [`Snapshot`] (from the reflectors, or listed once), turned into a
//! [`ClusterView`] of Palisade's VolumeAttachments, PersistentVolumes and the pods using them,
//! and which nodes are down since when ([`NodeHealth`]). Sans-IO apart from
//! [`Snapshot::fetch`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;

use crate::params::RecoveryPolicy;

/// The objects one recovery pass looks at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every VolumeAttachment (Palisade's are picked by their attacher).
    pub attachments: Vec<Arc<VolumeAttachment>>,
    /// Every PersistentVolume (Palisade's are picked by their CSI driver).
    pub volumes: Vec<Arc<PersistentVolume>>,
    /// Every PersistentVolumeClaim.
    pub claims: Vec<Arc<PersistentVolumeClaim>>,
    /// Every pod.
    pub pods: Vec<Arc<Pod>>,
    /// Every Node, for their health.
    pub nodes: Vec<Arc<Node>>,
    /// Only their metadata: which Deployment owns a pod's ReplicaSet.
    pub replica_sets: Vec<Arc<PartialObjectMeta<ReplicaSet>>>,
}

impl Snapshot {
    /// Lists every object once (a one-off pass, and tests; the controller keeps reflectors).
    pub async fn fetch(client: &kube::Client) -> Result<Snapshot, kube::Error> {
        async fn all<K>(client: &kube::Client) -> Result<Vec<Arc<K>>, kube::Error>
        where
            K: kube::Resource<DynamicType = ()>
                + Clone
                + serde::de::DeserializeOwned
                + std::fmt::Debug,
        {
            let list = Api::<K>::all(client.clone())
                .list(&ListParams::default())
                .await?;
            Ok(list.items.into_iter().map(Arc::new).collect())
        }
        Ok(Snapshot {
            attachments: all(client).await?,
            volumes: all(client).await?,
            claims: all(client).await?,
            pods: all(client).await?,
            nodes: all(client).await?,
            replica_sets: all(client).await?,
        })
    }
}

/// Whether a node is down, and since when: Kubernetes' Node Ready condition by default
/// ([`NodeReady`]); the controller's own health (heartbeats, the node's Lease) can be plugged
/// in instead, or as well (any `Fn(&str, Option<&Node>) -> Option<u64>`).
pub trait NodeHealth: Send + Sync + 'static {
    /// When the node named `name` went down, in milliseconds since the Unix epoch; None while
    /// it is up. `node` is its Node object, if it has one.
    fn down_since(&self, name: &str, node: Option<&Node>) -> Option<u64>;
}

impl<F> NodeHealth for F
where
    F: Fn(&str, Option<&Node>) -> Option<u64> + Send + Sync + 'static,
{
    fn down_since(&self, name: &str, node: Option<&Node>) -> Option<u64> {
        self(name, node)
    }
}

/// A node is down while its Ready condition is False or Unknown (the node lifecycle
/// controller sets Unknown when the kubelet stops posting status), since the condition's last
/// transition. A node with no Ready condition yet is up (it is registering); a node with no
/// Node object (deleted) is down, since ever.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeReady;

impl NodeHealth for NodeReady {
    fn down_since(&self, _name: &str, node: Option<&Node>) -> Option<u64> {
        let Some(node) = node else {
            return Some(0);
        };
        let ready = node
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")?;
        match ready.status.as_str() {
            "True" => None,
            _ => Some(ready.last_transition_time.as_ref().map_or(0, millis)),
        }
    }
}

/// Milliseconds since the Unix epoch of a Kubernetes time (0 before it).
pub fn millis(t: &Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

/// A pod's phase, as far as recovery cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    /// Succeeded or Failed: its containers are done, it holds no volume.
    Terminated,
    Unknown,
}

/// The controller that owns a pod (its owner reference with `controller: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// No controller: a bare pod, which nothing would recreate.
    None,
    StatefulSet,
    /// A ReplicaSet that a Deployment owns.
    Deployment,
    /// Another controller (a bare ReplicaSet, a Job, an operator's kind...), by kind.
    Other(String),
}

impl Owner {
    /// True for the owners whose pods the failover and the `delete-both-...` policy delete.
    pub fn is_workload(&self) -> bool {
        matches!(self, Owner::StatefulSet | Owner::Deployment)
    }
}

/// A pod's deletion as the API server recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    /// `metadata.deletionTimestamp`, in ms since the Unix epoch. The API server sets it to the
    /// time the deletion was requested plus the grace period, so the grace period is over
    /// once it has passed.
    pub at_ms: u64,
    /// `metadata.deletionGracePeriodSeconds` (0 for a force-delete).
    pub grace_seconds: i64,
}

/// A pod, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    /// What its deletion names as a precondition, so that a pod recreated under the same
    /// name (a StatefulSet's) is never deleted in its place.
    pub uid: String,
    /// `spec.nodeName`: None until it is scheduled.
    pub node: Option<String>,
    pub phase: Phase,
    pub deletion: Option<Deletion>,
    pub owner: Owner,
    /// The PersistentVolumes of Palisade's that it uses (through its claims), by name.
    pub volumes: Vec<String>,
}

impl PodView {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A PersistentVolume of Palisade's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    /// The PersistentVolume's name.
    pub pv: String,
    /// Its volume handle: Palisade's volume id.
    pub volume: String,
    /// The claim bound to it, as (namespace, name).
    pub claim: Option<(String, String)>,
    /// `volumeAttachmentRecoveryPolicy` from its volume attributes, when it has one.
    pub policy: Option<RecoveryPolicy>,
}

/// A VolumeAttachment of Palisade's (its attacher is the driver) for a PersistentVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentView {
    pub name: String,
    /// The precondition of its deletion.
    pub uid: String,
    /// The PersistentVolume's name.
    pub pv: String,
    pub node: String,
    /// `status.attached`.
    pub attached: bool,
    /// It has a deletionTimestamp (the csi-attacher is detaching it).
    pub deleting: bool,
}

/// The cluster as the decisions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Palisade's PersistentVolumes, by name.
    pub volumes: BTreeMap<String, VolumeView>,
    pub attachments: Vec<AttachmentView>,
    /// The pods that use at least one of Palisade's volumes.
    pub pods: Vec<PodView>,
    /// The nodes that are down, with since when (ms since the Unix epoch).
    pub down: BTreeMap<String, u64>,
    /// For each down node, the PersistentVolumes of Palisade's that its Node's
    /// `status.volumesInUse` still lists (its dead kubelet cannot take them out), by name.
    /// While it does, the attach-detach controller does not detach them from the node
    /// before its maximum wait for unmount (6 minutes), even with the VolumeAttachment gone.
    pub in_use: BTreeMap<String, Vec<String>>,
    /// The Nodes that carry the [`FAILOVER_TAINT`].
    pub tainted: BTreeSet<String>,
}

/// The taint the node-down failover puts on a down Node before it deletes the pods there, so
/// that their replacements are not scheduled back onto it (Kubernetes' own
/// `node.kubernetes.io/unreachable` taint comes only with NotReady); taken off once the node
/// is up again.
pub const FAILOVER_TAINT: &str = "palisade.io/node-down";

/// Node health from two sources: a node is down from the earlier moment either says so.
pub struct EarliestDown {
    /// The Kubernetes side (for instance [`NodeReady`]).
    pub kubernetes: std::sync::Arc<dyn NodeHealth>,
    /// Palisade's own: since when each node's agent is down by the controller's health rule
    /// (its heartbeat, weighed with its kubelet's Lease).
    pub agents: HashMap<String, u64>,
}

impl NodeHealth for EarliestDown {
    fn down_since(&self, name: &str, node: Option<&Node>) -> Option<u64> {
        match (
            self.kubernetes.down_since(name, node),
            self.agents.get(name).copied(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The name under which the kubelet reports a CSI volume in `status.volumesInUse` (and the
/// attach-detach controller in `status.volumesAttached`).
pub fn unique_volume_name(driver: &str, volume_handle: &str) -> String {
    format!("kubernetes.io/csi/{driver}^{volume_handle}")
}

impl ClusterView {
    /// The view of `snapshot` for the driver `driver`, with node health from `health`.
    pub fn new(snapshot: &Snapshot, driver: &str, health: &dyn NodeHealth) -> ClusterView {
        let volumes: BTreeMap<String, VolumeView> = snapshot
            .volumes
            .iter()
            .filter_map(|pv| volume_view(pv, driver))
            .map(|v| (v.pv.clone(), v))
            .collect();
        // Claims bound to one of ours: (namespace, name) -> PV name.
        let bound: HashMap<(String, String), String> = snapshot
            .claims
            .iter()
            .filter_map(|pvc| {
                let pv = pvc.spec.as_ref()?.volume_name.clone()?;
                volumes.contains_key(&pv).then(|| {
                    (
                        (
                            pvc.metadata.namespace.clone().unwrap_or_default(),
                            pvc.metadata.name.clone().unwrap_or_default(),
                        ),
                        pv,
                    )
                })
            })
            .collect();
        let deployments: HashMap<(String, String), bool> = snapshot
            .replica_sets
            .iter()
            .map(|rs| {
                let key = (
                    rs.metadata.namespace.clone().unwrap_or_default(),
                    rs.metadata.name.clone().unwrap_or_default(),
                );
                let of_deployment = controller_of(rs.metadata.owner_references.as_deref())
                    .is_some_and(|o| o.kind == "Deployment");
                (key, of_deployment)
            })
            .collect();
        let pods: Vec<PodView> = snapshot
            .pods
            .iter()
            .filter_map(|pod| pod_view(pod, &bound, &deployments))
            .collect();
        let attachments: Vec<AttachmentView> = snapshot
            .attachments
            .iter()
            .filter_map(|va| attachment_view(va, driver, &volumes))
            .collect();

        let nodes: HashMap<&str, &Node> = snapshot
            .nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.as_ref())))
            .collect();
        let mut names: Vec<&str> = nodes.keys().copied().collect();
        names.extend(attachments.iter().map(|a| a.node.as_str()));
        names.extend(pods.iter().filter_map(|p| p.node.as_deref()));
        let down = names
            .into_iter()
            .filter_map(|name| {
                let since = health.down_since(name, nodes.get(name).copied())?;
                Some((name.to_string(), since))
            })
            .collect::<BTreeMap<String, u64>>();
        let in_use = down
            .keys()
            .filter_map(|name| {
                let listed = nodes
                    .get(name.as_str())?
                    .status
                    .as_ref()?
                    .volumes_in_use
                    .as_ref()?;
                let pvs: Vec<String> = volumes
                    .values()
                    .filter(|v| listed.contains(&unique_volume_name(driver, &v.volume)))
                    .map(|v| v.pv.clone())
                    .collect();
                (!pvs.is_empty()).then(|| (name.clone(), pvs))
            })
            .collect();
        let tainted = nodes
            .iter()
            .filter(|(_, n)| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == FAILOVER_TAINT))
            })
            .map(|(name, _)| name.to_string())
            .collect();
        ClusterView {
            volumes,
            attachments,
            pods,
            down,
            in_use,
            tainted,
        }
    }

    /// The pods that use the PersistentVolume `pv`.
    pub fn pods_of(&self, pv: &str) -> Vec<&PodView> {
        self.pods
            .iter()
            .filter(|p| p.volumes.iter().any(|v| v == pv))
            .collect()
    }
}

/// The controller among `owners`.
fn controller_of(owners: Option<&[OwnerReference]>) -> Option<&OwnerReference> {
    owners?.iter().find(|o| o.controller == Some(true))
}

fn volume_view(pv: &PersistentVolume, driver: &str) -> Option<VolumeView> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
    let policy = csi
        .volume_attributes
        .as_ref()
        .and_then(|a| a.get(crate::params::VOLUME_ATTACHMENT_RECOVERY_POLICY))
        .and_then(|p| p.parse::<RecoveryPolicy>().ok());
    let claim = spec
        .claim_ref
        .as_ref()
        .and_then(|c| Some((c.namespace.clone()?, c.name.clone()?)));
    Some(VolumeView {
        pv: pv.metadata.name.clone()?,
        volume: csi.volume_handle.clone(),
        claim,
        policy,
    })
}

fn attachment_view(
    va: &VolumeAttachment,
    driver: &str,
    volumes: &BTreeMap<String, VolumeView>,
) -> Option<AttachmentView> {
    if va.spec.attacher != driver {
        return None;
    }
    let pv = va.spec.source.persistent_volume_name.clone()?;
    if !volumes.contains_key(&pv) {
        return None;
    }
    Some(AttachmentView {
        name: va.metadata.name.clone()?,
        uid: va.metadata.uid.clone().unwrap_or_default(),
        pv,
        node: va.spec.node_name.clone(),
        attached: va.status.as_ref().is_some_and(|s| s.attached),
        deleting: va.metadata.deletion_timestamp.is_some(),
    })
}

fn pod_view(
    pod: &Pod,
    bound: &HashMap<(String, String), String>,
    deployments: &HashMap<(String, String), bool>,
) -> Option<PodView> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref()?;
    // A generic ephemeral volume's claim is named `<pod>-<volume>`.
    let volumes: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| match (&v.persistent_volume_claim, &v.ephemeral) {
            (Some(claim), _) => Some(claim.claim_name.clone()),
            (None, Some(_)) => Some(format!("{name}-{}", v.name)),
            (None, None) => None,
        })
        .filter_map(|claim| bound.get(&(namespace.clone(), claim)).cloned())
        .collect();
    if volumes.is_empty() {
        return None;
    }
    let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") => Phase::Pending,
        Some("Running") => Phase::Running,
        Some("Succeeded" | "Failed") => Phase::Terminated,
        _ => Phase::Unknown,
    };
    let owner = match controller_of(pod.metadata.owner_references.as_deref()) {
        None => Owner::None,
        Some(o) if o.kind == "StatefulSet" => Owner::StatefulSet,
        Some(o) if o.kind == "ReplicaSet" => {
            match deployments.get(&(namespace.clone(), o.name.clone())) {
                Some(true) => Owner::Deployment,
                _ => Owner::Other(o.kind.clone()),
            }
        }
        Some(o) => Owner::Other(o.kind.clone()),
    };
    let deletion = pod.metadata.deletion_timestamp.as_ref().map(|t| Deletion {
        at_ms: millis(t),
        grace_seconds: pod.metadata.deletion_grace_period_seconds.unwrap_or(0),
    });
    Some(PodView {
        namespace,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        name,
        node: spec.node_name.clone().filter(|n| !n.is_empty()),
        phase,
        deletion,
        owner,
        volumes,
    })
}
