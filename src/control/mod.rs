//! The control plane's domain: volumes from creation to deletion (`volumes`), their replicas'
//! placement and lifecycle (`lifecycle`), publish, attach and fence (`publish`, `attach`,
//! `fence`), fencing a down node's attachment for the Kubernetes recovery (`recovery`), the
//! engines' leases and membership (`engines`, `leases`), expansion (`expand`), node
//! registration (`nodes`) and health (`health`), the replica that runs the background work
//! (`leadership`), and the operator's views (`status`). It knows nothing of protobuf; the
//! CSI adapter validates requests, calls in here under the volume's lock, and maps the errors.
//! `Controller` is one type whose methods are spread over these files by responsibility; they
//! share this module's imports (`use super::*`).
//!
//! Every operation persists its intent before it touches a node, and is keyed so that a
//! retry, or a restart at any point, converges: a volume in `Creating` is resumed by the next
//! CreateVolume with its name (or by `reconcile` at start-up), a volume in `Deleting` is
//! finished by the next DeleteVolume or by `reconcile`.

pub mod attach;
mod engines;
mod expand;
pub mod fence;
pub mod health;
pub mod leadership;
mod leases;
mod lifecycle;
mod nodes;
mod publish;
mod recovery;
mod status;
mod volumes;

pub use engines::*;
pub use expand::*;
pub use leases::{CLOCK_SKEW_MS, RECORD_AHEAD_LEASES};
pub use lifecycle::{RebuildReport, UpdateError};
pub use nodes::*;
pub use publish::*;
pub use recovery::*;
pub use status::*;
pub use volumes::*;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::locks::KeyLocks;
use crate::model::{
    self, now_ms, Attachment, Capability, Node, Replica, ReplicaState, Volume, VolumeState,
    CONTEXT_EPOCH, CONTEXT_TOKEN, DEFAULT_FS, MAX_VOLUME_SIZE, TOPOLOGY_NODE_KEY,
    TOPOLOGY_ZONE_KEY,
};
use crate::params::{self, DataLocality, ParamError, RecoveryPolicy, VolumeParams};
use crate::replica::agent::{AgentError, NodeAgent, ReplicaTarget};
use crate::scheduler::{self, ClusterView, PlacementError, PlacementRequest, ScheduledSpace};
use crate::settings::Settings;
use crate::store::{Store, StoreError, Versioned, SETTINGS_KEY};
use attach::{Health, PublishDecision, PublishRequest};
use health::{HealthRule, HostEvidence, NodeEvidence};

/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this.
pub const SIZE_ALIGNMENT: u64 = 1 << 20;
/// How many volumes one node may have attached.
pub const MAX_VOLUMES_PER_NODE: u64 = 256;
/// How long a store compare-and-swap is retried before the call gives up.
const CAS_ATTEMPTS: usize = 16;

/// Tunables of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose heartbeat is older than this is down.
    pub heartbeat_timeout_ms: u64,
    /// The pods' termination grace period that the `wait` recovery policy waits out.
    pub termination_grace_ms: u64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            heartbeat_timeout_ms: 10_000,
            termination_grace_ms: 30_000,
        }
    }
}

/// The controller's domain service.
pub struct Controller {
    store: Arc<dyn Store>,
    agent: Arc<dyn NodeAgent>,
    locks: KeyLocks,
    config: ControllerConfig,
    /// Bytes scheduled per disk, kept up to date by every replica write of this controller
    /// (the only writer of replicas), so that placement does not read every replica. None
    /// until first needed, and again after a store error left it unsure.
    scheduled: std::sync::Mutex<Option<ScheduledSpace>>,
    /// Other controllers write replicas to the same store (replicas of one controller on the
    /// Kubernetes store): the aggregate above would miss their writes, so it is computed
    /// afresh for every use instead.
    shared_store: bool,
    /// The cluster secret that attachment tokens are derived from, and the way to fence
    /// replicas; both unset in standalone, where no replica is served over the network.
    fencing: Option<Fencing>,
    /// The engines' attachment leases, as granted.
    leases: leases::Leases,
    /// The engines' last reports on the rebuilds they run, by replica id.
    rebuilds: std::sync::Mutex<HashMap<String, lifecycle::RebuildReport>>,
    /// Evidence about the nodes' hosts beside their heartbeats (in Kubernetes, the kubelets'
    /// Nodes and Leases); None: the heartbeat alone decides.
    evidence: Option<Evidence>,
}

/// A source of node evidence and how long it may keep a node up past its heartbeat.
struct Evidence {
    source: Arc<dyn NodeEvidence>,
    vouch_ms: u64,
}

/// What the controller fences with.
#[derive(Clone)]
pub struct Fencing {
    pub secret: Arc<Vec<u8>>,
    pub fencer: Arc<dyn crate::control::fence::Fencer>,
    /// How long an engine's lease lasts without renewal.
    pub lease_ms: u64,
}

impl Controller {
    pub fn new(store: Arc<dyn Store>, agent: Arc<dyn NodeAgent>, config: ControllerConfig) -> Self {
        Controller {
            store,
            agent,
            locks: KeyLocks::default(),
            config,
            scheduled: std::sync::Mutex::new(None),
            shared_store: false,
            fencing: None,
            leases: leases::Leases::default(),
            rebuilds: std::sync::Mutex::default(),
            evidence: None,
        }
    }

    /// Marks the store as shared with other controllers (see `shared_store`): placement then
    /// counts the scheduled space from every stored replica each time, rather than from an
    /// aggregate that only this controller's writes keep up to date.
    pub fn with_shared_store(mut self) -> Self {
        self.shared_store = true;
        self
    }

    /// Decides node health with `source`'s evidence about the hosts beside the heartbeats: a
    /// node whose heartbeat expired stays up for `vouch_ms` more while its host is vouched
    /// for (see `health`).
    pub fn with_node_evidence(mut self, source: Arc<dyn NodeEvidence>, vouch_ms: u64) -> Self {
        self.evidence = Some(Evidence { source, vouch_ms });
        self
    }

    /// This controller process's name, as the volumes' lease records name their granter:
    /// the host name and random bits drawn at start.
    pub fn identity(&self) -> &str {
        &self.leases.me
    }

    /// Enables attachment tokens and fencing (cluster mode).
    pub fn with_fencing(mut self, fencing: Fencing) -> Self {
        self.fencing = Some(fencing);
        self
    }

    /// Applies `f` to the scheduled-space aggregate, if it is loaded.
    fn update_scheduled(&self, f: impl FnOnce(&mut ScheduledSpace)) {
        let mut guard = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(space) = guard.as_mut() {
            f(space);
        }
    }

    /// Forgets the aggregate; the next placement rebuilds it from the store.
    fn invalidate_scheduled(&self) {
        *self.scheduled.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The aggregate, loaded from the store when not known (always, on a shared store).
    async fn scheduled_space(&self) -> Result<ScheduledSpace, StoreError> {
        if !self.shared_store {
            if let Some(space) = self
                .scheduled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Ok(space);
            }
        }
        let mut space = ScheduledSpace::default();
        for r in self.store.replicas().list().await? {
            space.add(&r.value);
        }
        if self.shared_store {
            return Ok(space);
        }
        let mut guard = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        Ok(guard.get_or_insert(space).clone())
    }

    /// Records a replica in the store and in the aggregate.
    async fn put_replica(
        &self,
        mut replica: Replica,
        old: Option<&Versioned<Replica>>,
    ) -> Result<u64, StoreError> {
        // The recorded rebuild progress belongs to one stay in `Rebuilding`: any change of
        // state ends it (a new rebuild reports from zero).
        if replica.state != ReplicaState::Rebuilding
            || old.is_some_and(|o| o.value.state != ReplicaState::Rebuilding)
        {
            replica.rebuilt_percent = None;
        }
        let key = replica.id.clone();
        let result = self
            .store
            .replicas()
            .put(&key, replica.clone(), old.map(|o| o.version))
            .await;
        match &result {
            Ok(_) => self.update_scheduled(|s| {
                if let Some(old) = old {
                    s.remove(&old.value);
                }
                s.add(&replica);
            }),
            Err(StoreError::Conflict { .. }) => {}
            Err(_) => self.invalidate_scheduled(),
        }
        result
    }

    /// Deletes a replica's record from the store and the aggregate.
    async fn delete_replica_record(&self, replica: &Versioned<Replica>) -> Result<(), StoreError> {
        let result = self
            .store
            .replicas()
            .delete(&replica.value.id, replica.version)
            .await;
        match &result {
            Ok(()) => self.update_scheduled(|s| s.remove(&replica.value)),
            Err(StoreError::Conflict { .. }) => {}
            Err(_) => self.invalidate_scheduled(),
        }
        result
    }

    /// The store this controller works on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The current cluster settings (defaults when none were stored yet).
    pub async fn settings(&self) -> Result<Settings, StoreError> {
        Ok(self
            .store
            .settings()
            .get(SETTINGS_KEY)
            .await?
            .map(|v| (*v.value).clone())
            .unwrap_or_default())
    }

    /// What placement sees: these nodes, and the space every stored replica takes.
    async fn cluster_view(&self, nodes: &[Node]) -> Result<ClusterView, StoreError> {
        Ok(ClusterView::with_scheduled(
            nodes,
            &self.scheduled_space().await?,
            now_ms(),
            self.config.heartbeat_timeout_ms,
        ))
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        Ok(self
            .store
            .nodes()
            .list()
            .await?
            .iter()
            .map(|n| (*n.value).clone())
            .collect())
    }

    /// The volume as stored, if any.
    pub async fn get_volume(&self, id: &str) -> Result<Option<Arc<Volume>>, StoreError> {
        Ok(self.store.volumes().get(id).await?.map(|v| v.value))
    }

    /// The node as stored, if any.
    pub async fn get_node(&self, id: &str) -> Result<Option<Arc<Node>>, StoreError> {
        Ok(self.store.nodes().get(id).await?.map(|v| v.value))
    }
}

// --- cluster API (ctl, nodes) ---
//
// What `palisade controller` serves beyond CSI: node registration and heartbeats, the
// operator's views (nodes with health and space, volumes with their replicas) and levers
// (settings, force-detach). Kept together here, apart from the CSI operations above.
// (Above the test module rather than at the very end: clippy refuses items after it.)

impl Controller {
    /// The controller's tunables.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests;
