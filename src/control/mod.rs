//! The controller's domain layer: volumes from creation to deletion, their replicas'
//! placement, attachments, capacity and expansion. It knows nothing of protobuf; the CSI
//! adapter validates requests, calls in here under the volume's lock, and maps the errors.
//!
//! Every operation persists its intent before it touches a node, and is keyed so that a
//! retry, or a restart at any point, converges: a volume in `Creating` is resumed by the next
//! CreateVolume with its name (or by `reconcile` at start-up), a volume in `Deleting` is
//! finished by the next DeleteVolume or by `reconcile`.

pub mod attach;
pub mod fence;

mod lifecycle;
pub use lifecycle::{RebuildReport, UpdateError};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tracing::{info, warn};

use crate::locks::KeyLocks;
use crate::model::{
    self, now_ms, Attachment, Capability, Node, Replica, ReplicaState, Volume, VolumeState,
    TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY,
};
use crate::params::{self, DataLocality, ParamError, RecoveryPolicy, VolumeParams};
use crate::replica::agent::{AgentError, NodeAgent, ReplicaTarget};
use crate::scheduler::{self, ClusterView, PlacementError, PlacementRequest, ScheduledSpace};
use crate::settings::Settings;
use crate::store::{Store, StoreError, Versioned, SETTINGS_KEY};
use attach::{Health, PublishDecision, PublishRequest};

/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Volume sizes are multiples of this.
pub const SIZE_ALIGNMENT: u64 = 1 << 20;
/// The largest volume Palisade creates (a sparse file's practical bound on ext4 is 16 TiB).
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;
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

/// The capacity a CreateVolume asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// 0: no lower bound.
    pub required: u64,
    /// 0: no upper bound.
    pub limit: u64,
}

impl CapacityRange {
    fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }

    /// The size to create: the required bytes rounded up to the alignment, or the default,
    /// always within the limit.
    pub fn resolve(&self) -> Result<u64, String> {
        if self.limit != 0 && self.limit < self.required {
            return Err(format!(
                "capacity_range: limit_bytes {} is below required_bytes {}",
                self.limit, self.required
            ));
        }
        let wanted = if self.required == 0 {
            match self.limit {
                0 => DEFAULT_VOLUME_SIZE,
                limit => DEFAULT_VOLUME_SIZE.min(limit / SIZE_ALIGNMENT * SIZE_ALIGNMENT),
            }
        } else {
            self.required.div_ceil(SIZE_ALIGNMENT) * SIZE_ALIGNMENT
        };
        if wanted == 0 || !self.admits(wanted) {
            return Err(format!(
                "capacity_range: no size that is a multiple of {} bytes lies within [{}, {}]",
                SIZE_ALIGNMENT, self.required, self.limit
            ));
        }
        if wanted > MAX_VOLUME_SIZE {
            return Err(format!(
                "capacity_range: {wanted} bytes is above the largest volume Palisade makes ({MAX_VOLUME_SIZE} bytes)"
            ));
        }
        Ok(wanted)
    }
}

/// A CreateVolume request in domain terms.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub parameters: HashMap<String, String>,
    /// The node named first in accessibility_requirements.preferred (or requisite).
    pub preferred_node: Option<String>,
    /// accessibility_requirements.requisite: when given, replicas (and so the volume's
    /// accessibility) are kept to nodes matching one of these segments.
    pub requisite: Vec<HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error("{0}")]
    Capability(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("volume {name:?} already exists with a different {what}")]
    Incompatible { name: String, what: String },
    #[error("volume {0:?} is being deleted; retry once the deletion has finished")]
    BeingDeleted(String),
    #[error("cannot place volume {name:?}: {source}")]
    Placement {
        name: String,
        #[source]
        source: PlacementError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("creating a replica of volume {volume:?} failed: {source}")]
    Agent {
        volume: String,
        #[source]
        source: AgentError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("volume {volume:?} is published on node {node:?}; unpublish it first")]
    InUse { volume: String, node: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("deleting a replica of volume {volume:?} failed: {source}")]
    Agent {
        volume: String,
        #[source]
        source: AgentError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),
    #[error("node {0:?} does not exist")]
    NodeNotFound(String),
    #[error("{0}")]
    Capability(String),
    #[error("volume {volume:?} is already published on node {node:?} with a different capability or read-only flag")]
    Incompatible { volume: String, node: String },
    #[error("volume {volume:?} is published on node {node:?}, which is up; unpublish it there first (single-node access mode)")]
    HeldElsewhere { volume: String, node: String },
    #[error("volume {volume:?} is published on node {node:?}, which is down; {detail}")]
    HeldByDownNode {
        volume: String,
        node: String,
        detail: String,
    },
    #[error("volume {volume:?} is strict-local to node {pinned:?}; it cannot be attached on node {node:?}")]
    StrictLocal {
        volume: String,
        pinned: String,
        node: String,
    },
    #[error(
        "volume {volume:?} cannot move away from down node {node:?}: {why}; nothing was moved"
    )]
    Unfenceable {
        volume: String,
        node: String,
        why: String,
    },
    #[error("node {node:?} already has {count} volumes attached, its maximum")]
    NodeFull { node: String, count: u64 },
    #[error("volume {0:?} is not ready (it is being created or deleted)")]
    NotReady(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum UnpublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {volume:?} stays published on down node {node:?} until its members can be fenced: {why}")]
    Unfenceable {
        volume: String,
        node: String,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),
    #[error("replica {replica:?} is not a replica of volume {volume:?}")]
    ReplicaNotFound { volume: String, replica: String },
    #[error("replica {replica} is not being rebuilt (it is {state})")]
    NotRebuilding { replica: String, state: String },
    #[error("volume {volume:?}: epoch {epoch} of node {node:?} is superseded ({current})")]
    Superseded {
        volume: String,
        node: String,
        epoch: u64,
        current: String,
    },
    #[error("volume {volume:?}: replica {replica:?} is its last member; removing it would leave no copy of the data")]
    LastMember { volume: String, replica: String },
    #[error("volume {volume:?}: its previous engine did not stop cleanly and no member is on the starting engine's node or a node that is up, so none can be kept to resynchronise the others from; retry once a member's node is up")]
    NoMemberUp { volume: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("volume {0:?} is not ready (it is being created or deleted)")]
    NotReady(String),
    #[error("volume {volume:?} cannot grow now: {why}; retry")]
    Busy { volume: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("growing volume {volume:?} failed: {source}")]
    Agent {
        volume: String,
        #[source]
        source: AgentError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("starting_token {0:?} is not a token this controller handed out")]
    BadToken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The published context handed to the node with ControllerPublish.
pub const CONTEXT_EPOCH: &str = "palisade.io/epoch";
/// The attachment token an engine opens its replica sessions with (cluster mode).
pub const CONTEXT_TOKEN: &str = "palisade.io/token";

/// One page of ListVolumes.
#[derive(Debug)]
pub struct VolumePage {
    pub volumes: Vec<Arc<Volume>>,
    pub next_token: Option<String>,
}

/// What GetCapacity reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityReport {
    pub available: u64,
    pub maximum_volume_size: u64,
}

/// Prefix that marks a ListVolumes token as ours.
const TOKEN_PREFIX: &str = "after:";

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
    /// The cluster secret that attachment tokens are derived from, and the way to fence
    /// replicas; both unset in standalone, where no replica is served over the network.
    fencing: Option<Fencing>,
    /// The engines' attachment leases, as granted.
    leases: Leases,
    /// The engines' last reports on the rebuilds they run, by replica id.
    rebuilds: std::sync::Mutex<HashMap<String, lifecycle::RebuildReport>>,
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
            fencing: None,
            leases: Leases::default(),
            rebuilds: std::sync::Mutex::default(),
        }
    }

    /// Enables attachment tokens and fencing (cluster mode).
    pub fn with_fencing(mut self, fencing: Fencing) -> Self {
        self.fencing = Some(fencing);
        self
    }

    /// The publish context for an attachment: its epoch and, in cluster mode, the token its
    /// engine opens replica sessions with.
    fn publish_context(&self, volume_id: &str, a: &Attachment) -> HashMap<String, String> {
        let mut ctx = HashMap::from([(CONTEXT_EPOCH.to_string(), a.epoch.to_string())]);
        if let Some(f) = &self.fencing {
            ctx.insert(
                CONTEXT_TOKEN.to_string(),
                crate::replica::token::attachment_token(&f.secret, volume_id, a.epoch),
            );
        }
        ctx
    }

    /// Fences every member of a volume with `epoch`: each reachable one persists it (so the
    /// sessions of older epochs are refused from then on); each unreachable one is marked
    /// failed, so that it never serves as a member again without a rebuild. Returns how many
    /// were fenced. Without fencing (standalone) there is nothing to fence.
    async fn fence_members(&self, volume_id: &str, epoch: u64) -> Result<FenceOutcome, StoreError> {
        let Some(fencing) = self.fencing.clone() else {
            return Ok(FenceOutcome {
                fenced: 0,
                members: 0,
                failures: vec![],
            });
        };
        let token = crate::replica::token::attachment_token(&fencing.secret, volume_id, epoch);
        let nodes = self.list_nodes().await?;
        let members: Vec<Versioned<Replica>> = self
            .volume_replicas(volume_id)
            .await?
            .into_iter()
            .filter(|r| r.value.state == ReplicaState::Ready)
            .collect();
        // Replicas being rebuilt by the old engine are fenced too, and fail: the new engine
        // starts their rebuild over.
        for r in self.volume_replicas(volume_id).await? {
            if r.value.state == ReplicaState::Rebuilding {
                let address = nodes
                    .iter()
                    .find(|n| n.id == r.value.node_id)
                    .map(|n| n.address.clone())
                    .unwrap_or_default();
                if !address.is_empty() {
                    let fenced = fencing
                        .fencer
                        .fence(&address, volume_id, &r.value.id, epoch, &token)
                        .await;
                    if let Err(why) = fenced {
                        warn!(volume = %volume_id, replica = %r.value.id, error = %why, "could not fence a rebuilding replica");
                    }
                }
                let mut failed = (*r.value).clone();
                failed.state = ReplicaState::Failed;
                failed.failed_ms = now_ms();
                self.put_replica(failed, Some(&r)).await?;
            }
        }
        let now = now_ms();
        let attempts = members.iter().map(|r| {
            let node = nodes.iter().find(|n| n.id == r.value.node_id);
            let address = node.map(|n| n.address.clone()).unwrap_or_default();
            // A node known to be down cannot answer: its replicas are failed at once rather
            // than after the fence timeout (they are fenced when they come back, by the
            // epoch any later session carries).
            let down = !matches!(self.health(node, now), crate::control::attach::Health::Up);
            let (fencer, token) = (fencing.fencer.clone(), token.clone());
            let (volume, replica) = (volume_id.to_string(), r.value.id.clone());
            async move {
                if address.is_empty() {
                    return Err("its node has no replica server address".to_string());
                }
                if down {
                    return Err("its node is down (heartbeat expired)".to_string());
                }
                fencer
                    .fence(&address, &volume, &replica, epoch, &token)
                    .await
            }
        });
        let results = futures::future::join_all(attempts).await;
        let mut outcome = FenceOutcome {
            fenced: 0,
            members: members.len(),
            failures: vec![],
        };
        for (replica, result) in members.iter().zip(results) {
            match result {
                Ok(()) => outcome.fenced += 1,
                Err(why) => {
                    warn!(volume = %volume_id, replica = %replica.value.id, epoch, error = %why, "could not fence a member: marking it failed");
                    let mut failed = (*replica.value).clone();
                    failed.state = ReplicaState::Failed;
                    failed.failed_ms = now_ms();
                    self.put_replica(failed, Some(replica)).await?;
                    outcome
                        .failures
                        .push(format!("{}: {why}", replica.value.id));
                }
            }
        }
        Ok(outcome)
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

    /// The aggregate, loaded from the store when not known.
    async fn scheduled_space(&self) -> Result<ScheduledSpace, StoreError> {
        if let Some(space) = self
            .scheduled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(space);
        }
        let mut space = ScheduledSpace::default();
        for r in self.store.replicas().list().await? {
            space.add(&r.value);
        }
        let mut guard = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        Ok(guard.get_or_insert(space).clone())
    }

    /// Records a replica in the store and in the aggregate.
    async fn put_replica(
        &self,
        replica: Replica,
        old: Option<&Versioned<Replica>>,
    ) -> Result<u64, StoreError> {
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

    /// CreateVolume: idempotent by name.
    pub async fn create_volume(&self, req: CreateRequest) -> Result<Arc<Volume>, CreateError> {
        let id = model::volume_id_for_name(&req.name);
        let _guard = self.locks.lock(&id).await;
        let settings = self.settings().await?;
        let parsed = params::parse(&req.parameters, &settings)?;
        check_capabilities(&req.capabilities, "volume_capabilities")
            .map_err(CreateError::Capability)?;
        let mut req = req;
        req.capabilities = resolve_fs_types(&req.capabilities, parsed.fs_type.map(|f| f.as_str()))
            .map_err(CreateError::Capability)?;
        let size = req.capacity.resolve().map_err(CreateError::OutOfRange)?;

        let existing = self.store.volumes().get(&id).await?;
        let current = match existing {
            Some(v) => {
                check_same_volume(&v.value, &req, &parsed.params)?;
                v
            }
            None => {
                self.record_new_volume(&id, &req, parsed, size, &settings)
                    .await?
            }
        };
        self.finish_creation(current).await
    }

    /// Persists a new volume in `Creating` with its placement decided.
    async fn record_new_volume(
        &self,
        id: &str,
        req: &CreateRequest,
        parsed: params::Parsed,
        size: u64,
        settings: &Settings,
    ) -> Result<Versioned<Volume>, CreateError> {
        let accessible_topology = Vec::new();
        let volume = Volume {
            id: id.to_string(),
            name: req.name.clone(),
            size,
            params: parsed.params,
            extra_params: parsed.extra,
            capabilities: req.capabilities.clone(),
            accessible_topology,
            state: VolumeState::Creating,
            degraded_reason: None,
            epoch: 0,
            attachment: None,
            created_ms: now_ms(),
            planned_replicas: Vec::new(),
            next_replica: 0,
            engine_running: false,
        };
        // Place before recording, so that a volume that cannot be placed leaves nothing.
        let placement = self.place(&volume, &[], req, settings).await?;
        let mut volume = volume;
        volume.degraded_reason = placement.degraded_reason.clone();
        volume.next_replica = placement.replicas.len() as u64;
        // In standalone a volume is served from a local replica, so it is reachable exactly
        // from its replicas' nodes; so is a strict-local one anywhere. In a cluster the engine
        // reaches its members over the network from any node.
        let mut replica_nodes: Vec<&String> = placement.replicas.iter().map(|(n, _)| n).collect();
        replica_nodes.sort();
        replica_nodes.dedup();
        let networked = self.fencing.is_some();
        if !networked || volume.params.data_locality == DataLocality::StrictLocal {
            volume.accessible_topology = replica_nodes
                .into_iter()
                .map(|n| BTreeMap::from([(TOPOLOGY_NODE_KEY.to_string(), n.clone())]))
                .collect();
        }
        let nodes = self.list_nodes().await?;
        for (n, (node_id, disk_id)) in placement.replicas.iter().enumerate() {
            let replica_id = format!("{id}-r-{n}");
            let path = nodes
                .iter()
                .find(|node| &node.id == node_id)
                .and_then(|node| node.disks.iter().find(|d| &d.id == disk_id))
                .map(|d| crate::replica::replica_dir(&d.path, &replica_id))
                .unwrap_or_default();
            // Ready: the volume's own Creating state covers its first replicas, which are
            // trusted only once the volume is Ready.
            volume.planned_replicas.push(Replica {
                id: replica_id,
                volume_id: id.to_string(),
                node_id: node_id.clone(),
                disk_id: disk_id.clone(),
                path,
                size,
                state: ReplicaState::Ready,
                failed_ms: 0,
            });
        }
        let version = self.store.volumes().put(id, volume.clone(), None).await?;
        info!(volume = %id, name = %req.name, size, replicas = placement.replicas.len(), "volume recorded");
        Ok(Versioned {
            version,
            value: Arc::new(volume),
        })
    }

    async fn place(
        &self,
        volume: &Volume,
        existing: &[Arc<Replica>],
        req: &CreateRequest,
        settings: &Settings,
    ) -> Result<scheduler::Placement, CreateError> {
        let mut nodes = self.list_nodes().await?;
        if !req.requisite.is_empty() {
            nodes.retain(|n| {
                req.requisite
                    .iter()
                    .any(|seg| node_in_segment(n.id.as_str(), n.zone.as_deref(), seg))
            });
            if nodes.is_empty() {
                return Err(CreateError::Placement {
                    name: volume.name.clone(),
                    source: PlacementError::NoRoom {
                        volume_id: volume.id.clone(),
                        wanted: volume.params.number_of_replicas,
                        size: volume.size,
                        reason: format!(
                            "no node of the cluster matches any accessibility_requirements.requisite segment ({} given)",
                            req.requisite.len()
                        ),
                    },
                });
            }
        }
        let view = self.cluster_view(&nodes).await?;
        let existing: Vec<Replica> = existing.iter().map(|r| (**r).clone()).collect();
        let wanted = (volume.params.number_of_replicas as usize).saturating_sub(existing.len());
        let request = PlacementRequest {
            volume_id: &volume.id,
            size: volume.size,
            replica_count: u32::try_from(wanted).unwrap_or(u32::MAX),
            params: &volume.params,
            settings,
            preferred_node: req.preferred_node.as_deref(),
            existing: &existing,
        };
        scheduler::place(&view, &request).map_err(|source| CreateError::Placement {
            name: volume.name.clone(),
            source,
        })
    }

    /// Creates whatever replicas of a `Creating` volume are still missing, then marks it
    /// `Ready`. Returns the volume as stored.
    async fn finish_creation(
        &self,
        current: Versioned<Volume>,
    ) -> Result<Arc<Volume>, CreateError> {
        match current.value.state {
            VolumeState::Ready => return Ok(current.value),
            VolumeState::Deleting => {
                return Err(CreateError::BeingDeleted(current.value.name.clone()))
            }
            VolumeState::Creating => {}
        }
        let volume = current.value.clone();
        for planned in &volume.planned_replicas {
            match self.put_replica(planned.clone(), None).await {
                // Already recorded by an attempt that a crash interrupted.
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Every replica again: creation is idempotent, and one interrupted by a crash is
        // finished here.
        for replica in self.volume_replicas(&volume.id).await? {
            let target = ReplicaTarget {
                node_id: &replica.value.node_id,
                disk_id: &replica.value.disk_id,
                replica_id: &replica.value.id,
                volume_id: &volume.id,
            };
            self.agent
                .create_replica(target, volume.size)
                .await
                .map_err(|source| CreateError::Agent {
                    volume: volume.id.clone(),
                    source,
                })?;
        }
        let mut ready = (*volume).clone();
        ready.state = VolumeState::Ready;
        ready.planned_replicas.clear();
        self.store
            .volumes()
            .put(&volume.id, ready.clone(), Some(current.version))
            .await?;
        info!(volume = %volume.id, "volume ready");
        Ok(Arc::new(ready))
    }

    /// The replicas of one volume.
    pub async fn volume_replicas(
        &self,
        volume_id: &str,
    ) -> Result<Vec<Versioned<Replica>>, StoreError> {
        let prefix = format!("{volume_id}-r-");
        Ok(self
            .store
            .replicas()
            .list_prefix(&prefix)
            .await?
            .into_iter()
            .filter(|r| r.value.volume_id == volume_id)
            .collect())
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

    /// DeleteVolume: OK when the volume is already gone.
    pub async fn delete_volume(&self, id: &str) -> Result<(), DeleteError> {
        let _guard = self.locks.lock(id).await;
        let Some(current) = self.store.volumes().get(id).await? else {
            return Ok(());
        };
        if let Some(a) = &current.value.attachment {
            return Err(DeleteError::InUse {
                volume: id.to_string(),
                node: a.node_id.clone(),
            });
        }
        let current = if current.value.state == VolumeState::Deleting {
            current
        } else {
            let mut deleting = (*current.value).clone();
            deleting.state = VolumeState::Deleting;
            let version = self
                .store
                .volumes()
                .put(id, deleting.clone(), Some(current.version))
                .await?;
            Versioned {
                version,
                value: Arc::new(deleting),
            }
        };
        self.finish_deletion(current).await
    }

    async fn finish_deletion(&self, current: Versioned<Volume>) -> Result<(), DeleteError> {
        let id = current.value.id.clone();
        for replica in self.volume_replicas(&id).await? {
            let target = ReplicaTarget {
                node_id: &replica.value.node_id,
                disk_id: &replica.value.disk_id,
                replica_id: &replica.value.id,
                volume_id: &id,
            };
            self.agent
                .delete_replica(target)
                .await
                .map_err(|source| DeleteError::Agent {
                    volume: id.clone(),
                    source,
                })?;
            self.delete_replica_record(&replica).await?;
        }
        self.store.volumes().delete(&id, current.version).await?;
        info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Start-up reconciliation: finishes deletions and creations that a crash interrupted.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        for v in self.store.volumes().list().await? {
            let _guard = self.locks.lock(&v.value.id).await;
            let Some(current) = self.store.volumes().get(&v.value.id).await? else {
                continue;
            };
            let outcome = match current.value.state {
                VolumeState::Ready => continue,
                VolumeState::Deleting => self
                    .finish_deletion(current)
                    .await
                    .map_err(|e| e.to_string()),
                VolumeState::Creating => self
                    .finish_creation(current)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = outcome {
                warn!(volume = %v.value.id, error = %e, "reconciling an interrupted operation failed; the next call on the volume retries it");
            }
        }
        Ok(())
    }

    /// The volume as stored, if any.
    pub async fn get_volume(&self, id: &str) -> Result<Option<Arc<Volume>>, StoreError> {
        Ok(self.store.volumes().get(id).await?.map(|v| v.value))
    }

    /// The node as stored, if any.
    pub async fn get_node(&self, id: &str) -> Result<Option<Arc<Node>>, StoreError> {
        Ok(self.store.nodes().get(id).await?.map(|v| v.value))
    }

    fn health(&self, node: Option<&Node>, now: u64) -> Health {
        match node {
            Some(n)
                if now.saturating_sub(n.last_heartbeat_ms) <= self.config.heartbeat_timeout_ms =>
            {
                Health::Up
            }
            Some(n) => Health::Down {
                for_ms: now.saturating_sub(n.last_heartbeat_ms + self.config.heartbeat_timeout_ms),
            },
            None => Health::Down {
                for_ms: u64::MAX / 2,
            },
        }
    }

    /// ControllerPublishVolume: returns the publish context.
    pub async fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &Capability,
        readonly: bool,
    ) -> Result<HashMap<String, String>, PublishError> {
        let _guard = self.locks.lock(volume_id).await;
        let Some(current) = self.store.volumes().get(volume_id).await? else {
            return Err(PublishError::VolumeNotFound(volume_id.to_string()));
        };
        if self.store.nodes().get(node_id).await?.is_none() {
            return Err(PublishError::NodeNotFound(node_id.to_string()));
        }
        let volume = &current.value;
        if volume.state != VolumeState::Ready {
            return Err(PublishError::NotReady(volume_id.to_string()));
        }
        check_publish_capability(volume, capability).map_err(PublishError::Capability)?;
        if let Some(pinned) = strict_local_node(volume) {
            if pinned != node_id {
                return Err(PublishError::StrictLocal {
                    volume: volume_id.to_string(),
                    pinned: pinned.to_string(),
                    node: node_id.to_string(),
                });
            }
        }
        let now = now_ms();
        let holder = match &volume.attachment {
            Some(a) if a.node_id != node_id => {
                self.store.nodes().get(&a.node_id).await?.map(|n| n.value)
            }
            _ => None,
        };
        let policy = match volume.params.recovery_policy {
            Some(p) => p,
            None => self.settings().await?.volume_attachment_recovery_policy,
        };
        let decision = attach::decide_publish(
            volume.attachment.as_ref(),
            volume.epoch,
            &PublishRequest {
                node_id,
                capability,
                readonly,
                now_ms: now,
            },
            self.health(holder.as_deref(), now),
            policy,
            self.config.termination_grace_ms,
        );
        let attachment = match decision {
            PublishDecision::AlreadyPublished(a) => return Ok(self.publish_context(volume_id, &a)),
            PublishDecision::Attach(a) => {
                self.check_node_room(node_id).await?;
                if volume.epoch > 0 {
                    self.wait_for_older_leases(volume_id, a.epoch).await;
                }
                a
            }
            PublishDecision::TakeOver { from, to } => {
                warn!(volume = %volume_id, from = %from.node_id, to = %to.node_id, epoch = to.epoch, "taking over the attachment of a down node");
                self.check_node_room(node_id).await?;
                // Fence, then attach: the epoch is raised in the store first (epochs only
                // grow, so this is harmless if the take-over stops here), then persisted on
                // every reachable member, which refuses the old engine from then on.
                let mut bumped = (**volume).clone();
                bumped.epoch = to.epoch;
                let version = self
                    .store
                    .volumes()
                    .put(volume_id, bumped.clone(), Some(current.version))
                    .await?;
                let outcome = self.fence_members(volume_id, to.epoch).await?;
                if self.fencing.is_some() && outcome.fenced == 0 {
                    return Err(PublishError::Unfenceable {
                        volume: volume_id.to_string(),
                        node: from.node_id,
                        why: outcome.describe(),
                    });
                }
                info!(volume = %volume_id, epoch = to.epoch, fenced = outcome.fenced, of = outcome.members, "members fenced");
                self.wait_for_older_leases(volume_id, to.epoch).await;
                let mut updated = bumped;
                updated.attachment = Some(to.clone());
                self.store
                    .volumes()
                    .put(volume_id, updated, Some(version))
                    .await?;
                return Ok(self.publish_context(volume_id, &to));
            }
            PublishDecision::Incompatible(a) => {
                return Err(PublishError::Incompatible {
                    volume: volume_id.to_string(),
                    node: a.node_id,
                })
            }
            PublishDecision::HeldByHealthyNode(a) => {
                return Err(PublishError::HeldElsewhere {
                    volume: volume_id.to_string(),
                    node: a.node_id,
                })
            }
            PublishDecision::HeldByDownNode {
                current,
                policy,
                retry_in_ms,
            } => {
                let detail = match (policy, retry_in_ms) {
                    (RecoveryPolicy::Wait, Some(ms)) => format!(
                        "recovery policy \"wait\" allows the take-over in {} s",
                        ms.div_ceil(1000)
                    ),
                    _ => "recovery policy \"never\": release it with ControllerUnpublish or `palisade ctl volume detach --force`".to_string(),
                };
                return Err(PublishError::HeldByDownNode {
                    volume: volume_id.to_string(),
                    node: current.node_id,
                    detail,
                });
            }
        };
        let mut updated = (**volume).clone();
        updated.epoch = attachment.epoch;
        updated.attachment = Some(attachment.clone());
        self.store
            .volumes()
            .put(volume_id, updated, Some(current.version))
            .await?;
        info!(volume = %volume_id, node = %node_id, epoch = attachment.epoch, "volume published");
        Ok(self.publish_context(volume_id, &attachment))
    }

    async fn check_node_room(&self, node_id: &str) -> Result<(), PublishError> {
        let count = self
            .store
            .volumes()
            .list()
            .await?
            .iter()
            .filter(|v| {
                v.value
                    .attachment
                    .as_ref()
                    .is_some_and(|a| a.node_id == node_id)
            })
            .count() as u64;
        if count >= MAX_VOLUMES_PER_NODE {
            return Err(PublishError::NodeFull {
                node: node_id.to_string(),
                count,
            });
        }
        Ok(())
    }

    /// ControllerUnpublishVolume: OK when the volume, the node or the attachment is gone.
    pub async fn unpublish(&self, volume_id: &str, node_id: &str) -> Result<(), UnpublishError> {
        let _guard = self.locks.lock(volume_id).await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = self.store.volumes().get(volume_id).await? else {
                return Ok(());
            };
            if !attach::unpublish_releases(current.value.attachment.as_ref(), node_id) {
                return Ok(());
            }
            let mut updated = (*current.value).clone();
            // A holder that is down may still have an engine writing: fence it first.
            if let Some(a) = &current.value.attachment {
                let holder = self.store.nodes().get(&a.node_id).await?.map(|n| n.value);
                let down = matches!(
                    self.health(holder.as_deref(), now_ms()),
                    Health::Down { .. }
                );
                if down && self.fencing.is_some() {
                    let epoch = current.value.epoch + 1;
                    let outcome = self.fence_members(volume_id, epoch).await?;
                    if outcome.fenced == 0 && outcome.members > 0 {
                        return Err(UnpublishError::Unfenceable {
                            volume: volume_id.to_string(),
                            node: a.node_id.clone(),
                            why: outcome.describe(),
                        });
                    }
                    warn!(volume = %volume_id, node = %a.node_id, epoch, fenced = outcome.fenced, "unpublished from a down node after fencing");
                    updated.epoch = epoch;
                }
            }
            updated.attachment = None;
            match self
                .store
                .volumes()
                .put(volume_id, updated, Some(current.version))
                .await
            {
                Ok(_) => {
                    info!(volume = %volume_id, node = %node_id, "volume unpublished");
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(UnpublishError::Store(StoreError::Conflict {
            kind: "volume",
            key: volume_id.to_string(),
            expected: None,
        }))
    }

    /// An engine's report that a member failed: marks it failed, so that it is no longer a
    /// member, provided the engine's attachment is still current (a fenced engine cannot
    /// change membership). The engine acknowledges no write the member missed before this
    /// returns.
    pub async fn remove_member(
        &self,
        volume_id: &str,
        replica_id: &str,
        node_id: &str,
        epoch: u64,
        reason: &str,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        self.attached_volume(volume_id, node_id, epoch).await?;
        let replicas = self.volume_replicas(volume_id).await?;
        // A replica that is gone (retired) or failed already is no longer a member.
        let Some(replica) = replicas.iter().find(|r| r.value.id == replica_id) else {
            return Ok(());
        };
        if replica.value.state != ReplicaState::Ready {
            return Ok(());
        }
        let others = replicas
            .iter()
            .filter(|r| r.value.id != replica_id && r.value.state == ReplicaState::Ready)
            .count();
        if others == 0 {
            return Err(MemberError::LastMember {
                volume: volume_id.to_string(),
                replica: replica_id.to_string(),
            });
        }
        let mut failed = (*replica.value).clone();
        failed.state = ReplicaState::Failed;
        failed.failed_ms = now_ms();
        self.put_replica(failed, Some(replica)).await?;
        warn!(volume = %volume_id, replica = %replica_id, node = %node_id, epoch, reason, "member removed by its engine");
        Ok(())
    }

    /// The volume, provided `node_id` holds its attachment at `epoch` (an engine's call).
    async fn attached_volume(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<Versioned<Volume>, MemberError> {
        let volume = self
            .store
            .volumes()
            .get(volume_id)
            .await?
            .ok_or_else(|| MemberError::VolumeNotFound(volume_id.to_string()))?;
        check_attachment(&volume.value, node_id, epoch)?;
        Ok(volume)
    }

    /// An engine's lease renewal: Ok with the lease length while its attachment is current.
    /// The engine counts the lease from before it asked, so it lapses no later than the
    /// grant recorded here plus the lease: what a later attachment waits for.
    pub async fn renew_lease(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<u64, MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        self.attached_volume(volume_id, node_id, epoch).await?;
        self.leases.grant(volume_id, epoch);
        Ok(self.lease_ms())
    }

    /// An engine starting on the volume's current attachment: its first lease, as
    /// [`Controller::renew_lease`]. When the volume's previous engine did not stop cleanly
    /// (it died, was fenced or lost its lease), the writes it had in flight — never
    /// acknowledged — may have reached some members and not others, which would then answer
    /// reads of those blocks differently. So the members are made identical again first: one
    /// is kept (on the engine's node if it has one there, else the first on a node that is
    /// up) and the others are marked rebuilding, so that the new engine serves from the kept
    /// one alone and rebuilds the others from it. Every member held every acknowledged
    /// write, so any one will do. The volume is then marked as having a running engine until
    /// one stops cleanly.
    pub async fn start_engine(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<u64, MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        if self
            .set_engine_running(volume_id, node_id, epoch, true)
            .await?
        {
            self.resync_members(volume_id, node_id, epoch).await?;
        }
        self.leases.grant(volume_id, epoch);
        Ok(self.lease_ms())
    }

    /// An engine that stopped cleanly (every request it took finished while it still served,
    /// so its members are identical): the next engine need not rebuild them. Ignored when
    /// the engine's attachment is no longer current.
    pub async fn engine_stopped_cleanly(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        match self
            .set_engine_running(volume_id, node_id, epoch, false)
            .await
        {
            Ok(_) | Err(MemberError::Superseded { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Records whether an engine of the current attachment runs; returns what was recorded
    /// before. The caller holds the volume's lock.
    async fn set_engine_running(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
        running: bool,
    ) -> Result<bool, MemberError> {
        let mut last = None;
        for _ in 0..CAS_ATTEMPTS {
            let volume = self.attached_volume(volume_id, node_id, epoch).await?;
            let was = volume.value.engine_running;
            if was == running {
                return Ok(was);
            }
            let mut updated = (*volume.value).clone();
            updated.engine_running = running;
            match self
                .store
                .volumes()
                .put(volume_id, updated, Some(volume.version))
                .await
            {
                Ok(_) => return Ok(was),
                Err(e @ StoreError::Conflict { .. }) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(MemberError::from)
            .unwrap_or_else(|| MemberError::VolumeNotFound(volume_id.to_string())))
    }

    /// Keeps one ready replica of the volume as its member and marks the others rebuilding
    /// (see [`Controller::start_engine`]). The caller holds the volume's lock.
    async fn resync_members(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<(), MemberError> {
        let replicas = self.volume_replicas(volume_id).await?;
        let ready: Vec<&Versioned<Replica>> = replicas
            .iter()
            .filter(|r| r.value.state == ReplicaState::Ready)
            .collect();
        if ready.len() < 2 {
            return Ok(());
        }
        let nodes = self.list_nodes().await?;
        let now = now_ms();
        let up = |r: &Versioned<Replica>| {
            matches!(
                self.health(nodes.iter().find(|n| n.id == r.value.node_id), now),
                Health::Up
            )
        };
        // The starting engine's own node is alive (it is calling), whatever its heartbeat
        // says; otherwise a member on a node that is up.
        let kept = ready
            .iter()
            .find(|r| r.value.node_id == node_id)
            .or_else(|| ready.iter().find(|r| up(r)));
        // None: refuse the start (it is retried) rather than serve from members that may
        // differ; nothing is demoted meanwhile.
        let Some(kept) = kept else {
            return Err(MemberError::NoMemberUp {
                volume: volume_id.to_string(),
            });
        };
        let mut rebuilt = Vec::new();
        for r in ready.iter().filter(|r| r.value.id != kept.value.id) {
            let mut rebuilding = (*r.value).clone();
            rebuilding.state = ReplicaState::Rebuilding;
            rebuilding.failed_ms = 0;
            self.put_replica(rebuilding, Some(r)).await?;
            rebuilt.push(r.value.id.clone());
        }
        warn!(volume = %volume_id, node = %node_id, epoch, kept = %kept.value.id, ?rebuilt,
            "the volume's previous engine did not stop cleanly: writes it had in flight may have reached some members and not others; one member is kept and the others are rebuilt from it");
        self.refresh_degraded(volume_id).await?;
        Ok(())
    }

    /// An engine that has stopped gives its lease back: the volume's next attachment need not
    /// wait for it to lapse. Releasing a lease that is not current is Ok (nothing to do).
    pub async fn release_lease(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        if let Some(volume) = self.store.volumes().get(volume_id).await? {
            if let Some(a) = &volume.value.attachment {
                if a.node_id != node_id {
                    return Ok(());
                }
            }
        }
        if self.leases.release(volume_id, epoch) {
            info!(volume = %volume_id, node = %node_id, epoch, "engine stopped; its lease is released");
        }
        Ok(())
    }

    fn lease_ms(&self) -> u64 {
        self.fencing
            .as_ref()
            .map(|f| f.lease_ms)
            .unwrap_or(DEFAULT_LEASE_MS)
    }

    /// Waits until no engine of an attachment older than `epoch` can still hold a lease on
    /// the volume: an engine that lost its controller stops serving when its lease lapses, so
    /// after this even a node that was cut off (not only fenced on the members that could be
    /// reached) writes nothing more anywhere — not even to its own replica.
    async fn wait_for_older_leases(&self, volume_id: &str, epoch: u64) {
        if self.fencing.is_none() {
            return;
        }
        let Some(lapse) = self.leases.lapse(volume_id, epoch, self.lease_ms()) else {
            return;
        };
        let now = std::time::Instant::now();
        if lapse > now {
            let wait = lapse - now;
            info!(volume = %volume_id, epoch, wait_ms = wait.as_millis() as u64, "waiting for the previous attachment's lease to lapse");
            tokio::time::sleep(wait).await;
        }
    }

    /// ListVolumes, in volume id order, paged by an opaque token.
    pub async fn list_volumes(
        &self,
        max_entries: usize,
        starting_token: &str,
    ) -> Result<VolumePage, ListError> {
        let after = if starting_token.is_empty() {
            None
        } else {
            match starting_token.strip_prefix(TOKEN_PREFIX) {
                Some(id) if !id.is_empty() => Some(id.to_string()),
                _ => return Err(ListError::BadToken(starting_token.to_string())),
            }
        };
        let mut volumes: Vec<Arc<Volume>> = self
            .store
            .volumes()
            .list()
            .await?
            .into_iter()
            .filter(|v| v.value.state == VolumeState::Ready)
            .filter(|v| {
                after
                    .as_ref()
                    .is_none_or(|a| v.value.id.as_str() > a.as_str())
            })
            .map(|v| v.value)
            .collect();
        let mut next_token = None;
        if max_entries > 0 && volumes.len() > max_entries {
            volumes.truncate(max_entries);
            next_token = volumes.last().map(|v| format!("{TOKEN_PREFIX}{}", v.id));
        }
        Ok(VolumePage {
            volumes,
            next_token,
        })
    }

    /// GetCapacity for the given parameters, optionally restricted to one topology segment.
    pub async fn capacity(
        &self,
        parameters: &HashMap<String, String>,
        segment: Option<&HashMap<String, String>>,
    ) -> Result<CapacityReport, CreateError> {
        let settings = self.settings().await?;
        let parsed = params::parse(parameters, &settings)?;
        let nodes = self.list_nodes().await?;
        let view = self.cluster_view(&nodes).await?;
        let in_segment = |node: &scheduler::NodeView| {
            segment.is_none_or(|seg| node_in_segment(node.id(), node.zone(), seg))
        };
        let c = scheduler::capacity(&view, &parsed.params, &settings, in_segment);
        Ok(CapacityReport {
            available: c.available_bytes,
            maximum_volume_size: c.maximum_volume_size,
        })
    }

    /// ControllerExpandVolume: grows every replica, then records the new size. Returns the
    /// volume's size afterwards.
    pub async fn expand(&self, id: &str, range: CapacityRange) -> Result<u64, ExpandError> {
        let _guard = self.locks.lock(id).await;
        let Some(current) = self.store.volumes().get(id).await? else {
            return Err(ExpandError::NotFound(id.to_string()));
        };
        if current.value.state != VolumeState::Ready {
            return Err(ExpandError::NotReady(id.to_string()));
        }
        if range.limit != 0 && range.limit < range.required {
            return Err(ExpandError::OutOfRange(format!(
                "capacity_range: limit_bytes {} is below required_bytes {}",
                range.limit, range.required
            )));
        }
        if current.value.size >= range.required {
            // Already at least that large; shrinking is not supported, and not asked for.
            if range.limit != 0 && current.value.size > range.limit {
                return Err(ExpandError::OutOfRange(format!(
                    "capacity_range: the volume is {} bytes, above limit_bytes {}; volumes cannot shrink",
                    current.value.size, range.limit
                )));
            }
            return Ok(current.value.size);
        }
        let size = range.required.div_ceil(SIZE_ALIGNMENT) * SIZE_ALIGNMENT;
        let size = if range.limit != 0 && size > range.limit {
            range.required
        } else {
            size
        };
        if size > MAX_VOLUME_SIZE {
            return Err(ExpandError::OutOfRange(format!(
                "capacity_range: {size} bytes is above the largest volume Palisade makes ({MAX_VOLUME_SIZE} bytes)"
            )));
        }
        self.check_growth_fits(&current.value, size).await?;
        let replicas = self.volume_replicas(id).await?;
        if let Some(r) = replicas
            .iter()
            .find(|r| r.value.state == ReplicaState::Creating)
        {
            // Its node creates it at the size it was recorded with, the old one.
            return Err(ExpandError::Busy {
                volume: id.to_string(),
                why: format!("replica {} is being created", r.value.id),
            });
        }
        // Failed replicas stay as they are (their node may be down): one reused later is
        // grown to the volume's size before it is rebuilt.
        let replicas: Vec<_> = replicas
            .into_iter()
            .filter(|r| r.value.state != ReplicaState::Failed)
            .collect();
        for replica in &replicas {
            let target = ReplicaTarget {
                node_id: &replica.value.node_id,
                disk_id: &replica.value.disk_id,
                replica_id: &replica.value.id,
                volume_id: id,
            };
            self.agent
                .grow_replica(target, size)
                .await
                .map_err(|source| ExpandError::Agent {
                    volume: id.to_string(),
                    source,
                })?;
        }
        // Online: every member and rebuild target holds the new bytes now, so the engine
        // may serve them. Before the size is recorded, so that a retry after a failure here
        // comes this way again; an engine that starts meanwhile reads the old size, and its
        // node grows it to the recorded one within seconds.
        if let Some(a) = &current.value.attachment {
            self.agent
                .grow_engine(&a.node_id, id, a.epoch, size)
                .await
                .map_err(|source| ExpandError::Agent {
                    volume: id.to_string(),
                    source,
                })?;
        }
        for replica in replicas {
            let mut grown = (*replica.value).clone();
            grown.size = size;
            self.put_replica(grown, Some(&replica)).await?;
        }
        let mut grown = (*current.value).clone();
        grown.size = size;
        self.store
            .volumes()
            .put(id, grown, Some(current.version))
            .await?;
        info!(volume = %id, size, "volume expanded");
        Ok(size)
    }

    /// Refuses a growth that the replicas' disks cannot hold under the scheduling rules.
    async fn check_growth_fits(&self, volume: &Volume, size: u64) -> Result<(), ExpandError> {
        let nodes = self.list_nodes().await?;
        let settings = self.settings().await?;
        let scheduled_space = self.scheduled_space().await?;
        let growth = size - volume.size;
        for r in self.volume_replicas(&volume.id).await? {
            let Some(disk) = nodes
                .iter()
                .find(|n| n.id == r.value.node_id)
                .and_then(|n| n.disks.iter().find(|d| d.id == r.value.disk_id))
            else {
                continue;
            };
            let scheduled = scheduled_space.get(&r.value.node_id, &disk.id);
            let limit = disk.storage_maximum.saturating_sub(disk.storage_reserved) as u128
                * settings.storage_over_provisioning_percentage as u128
                / 100;
            if (scheduled + growth) as u128 > limit {
                return Err(ExpandError::OutOfRange(format!(
                    "capacity_range: growing to {size} bytes needs {growth} more bytes on disk {} of node {}, which has {} of {} schedulable bytes scheduled",
                    disk.id, r.value.node_id, scheduled, limit
                )));
            }
        }
        Ok(())
    }

    /// Records a node's heartbeat and its disks as its agent reports them.
    pub async fn heartbeat(&self, mut node: Node) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.nodes().get(&node.id).await?;
            node.last_heartbeat_ms = now_ms();
            if let Some(cur) = &current {
                // Operator levers live in the store; the agent reports only what is real.
                node.schedulable = cur.value.schedulable;
                for disk in &mut node.disks {
                    if let Some(old) = cur.value.disks.iter().find(|d| d.id == disk.id) {
                        disk.schedulable = old.schedulable;
                        disk.storage_reserved = old.storage_reserved;
                        disk.tags = if old.tags.is_empty() {
                            disk.tags.clone()
                        } else {
                            old.tags.clone()
                        };
                    }
                }
            }
            match self
                .store
                .nodes()
                .put(&node.id.clone(), node.clone(), current.map(|c| c.version))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            kind: "node",
            key: node.id,
            expected: None,
        })
    }
}

/// True when a node with this id and zone lies in a topology segment (every key matches;
/// keys Palisade does not report match nothing).
fn node_in_segment(id: &str, zone: Option<&str>, segment: &HashMap<String, String>) -> bool {
    segment.iter().all(|(k, v)| match k.as_str() {
        TOPOLOGY_NODE_KEY => id == v,
        TOPOLOGY_ZONE_KEY => zone == Some(v.as_str()),
        _ => false,
    })
}

/// How long an engine's lease lasts when the controller was not told otherwise: at most the
/// default heartbeat timeout, so that waiting for a down node's lease to lapse does not
/// delay a take-over beyond noticing the node is down.
pub const DEFAULT_LEASE_MS: u64 = 9_000;

/// Slack added to a lease before a new attachment may start, for the clocks of the
/// controller and the engine's node running at slightly different rates.
const LEASE_SLACK: std::time::Duration = std::time::Duration::from_millis(500);

/// The latest lease granted per volume, in memory. The controller's promise is only that a
/// new attachment waits until every lease it granted to an older one has lapsed; after a
/// restart it assumes one was granted just before it started.
struct Leases {
    started: std::time::Instant,
    latest: std::sync::Mutex<HashMap<String, Lease>>,
}

#[derive(Clone, Copy)]
enum Lease {
    /// Granted to the engine of `epoch` at `at`.
    Granted { epoch: u64, at: std::time::Instant },
    /// Given back by the engine of the latest epoch, which has stopped.
    Released,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            started: std::time::Instant::now(),
            latest: std::sync::Mutex::default(),
        }
    }
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn grant(&self, volume: &str, epoch: u64) {
        let at = std::time::Instant::now();
        self.map()
            .insert(volume.to_string(), Lease::Granted { epoch, at });
    }

    /// Records that the engine of `epoch` gave its lease back; true if that was the lease
    /// held (a release of an older or unknown one changes nothing).
    fn release(&self, volume: &str, epoch: u64) -> bool {
        let mut map = self.map();
        match map.get(volume) {
            Some(Lease::Granted { epoch: held, .. }) if *held == epoch => {
                map.insert(volume.to_string(), Lease::Released);
                true
            }
            _ => false,
        }
    }

    /// When every lease granted on `volume` to an attachment older than `epoch` has surely
    /// lapsed; None when there is none to wait for. Only the latest epoch's lease can be
    /// live: its own attachment waited for the ones before.
    fn lapse(&self, volume: &str, epoch: u64, lease_ms: u64) -> Option<std::time::Instant> {
        let lease = std::time::Duration::from_millis(lease_ms) + LEASE_SLACK;
        match self.map().get(volume) {
            Some(Lease::Granted { epoch: held, at }) if *held < epoch => Some(*at + lease),
            Some(_) => None,
            None => Some(self.started + lease),
        }
    }
}

/// Succeeds when `node` holds the volume's attachment at `epoch`.
fn check_attachment(volume: &Volume, node: &str, epoch: u64) -> Result<(), MemberError> {
    match &volume.attachment {
        // A volume whose epoch is ahead of its attachment is being taken over.
        Some(a) if a.node_id == node && a.epoch == epoch && volume.epoch == epoch => Ok(()),
        other => Err(MemberError::Superseded {
            volume: volume.id.clone(),
            node: node.to_string(),
            epoch,
            current: match other {
                Some(a) => format!("attached to {} at epoch {}", a.node_id, a.epoch),
                None => format!("not attached; epoch {}", volume.epoch),
            },
        }),
    }
}

/// The node a strict-local volume is pinned to.
pub fn strict_local_node(volume: &Volume) -> Option<&str> {
    if volume.params.data_locality != DataLocality::StrictLocal {
        return None;
    }
    volume
        .accessible_topology
        .first()
        .and_then(|t| t.get(TOPOLOGY_NODE_KEY))
        .map(String::as_str)
}

/// The result of fencing a volume's members.
struct FenceOutcome {
    fenced: usize,
    members: usize,
    failures: Vec<String>,
}

impl FenceOutcome {
    fn describe(&self) -> String {
        if self.members == 0 {
            "the volume has no member replica left".to_string()
        } else {
            format!(
                "none of its {} members could be fenced ({})",
                self.members,
                self.failures.join("; ")
            )
        }
    }
}

/// Access modes Palisade can serve: one node at a time (the engine runs on one node).
/// `field` names the request field in the message.
pub fn check_capabilities(caps: &[Capability], field: &str) -> Result<(), String> {
    if caps.is_empty() {
        return Err(format!("{field}: at least one capability is required"));
    }
    for cap in caps {
        if !cap.access_mode.is_single_node() {
            return Err(format!(
                "{field}: access mode {:?} is not supported; Palisade volumes are attached on one node at a time (single-node access modes)",
                cap.access_mode
            ));
        }
    }
    Ok(())
}

/// Gives every mount capability its filesystem: the one it names, else the `fsType`
/// parameter, else ext4. A capability and a parameter that disagree are refused.
pub fn resolve_fs_types(
    caps: &[Capability],
    param: Option<&str>,
) -> Result<Vec<Capability>, String> {
    caps.iter()
        .enumerate()
        .map(|(i, cap)| {
            let mut cap = cap.clone();
            if let model::AccessType::Mount { fs_type, .. } = &mut cap.access_type {
                match (fs_type.is_empty(), param) {
                    (true, Some(p)) => *fs_type = p.to_string(),
                    (true, None) => *fs_type = crate::csi::convert::DEFAULT_FS.to_string(),
                    (false, Some(p)) if p != fs_type => {
                        return Err(format!(
                            "volume_capabilities[{i}].mount.fs_type {fs_type:?} contradicts parameter fsType {p:?}"
                        ))
                    }
                    (false, _) => {}
                }
            }
            Ok(cap)
        })
        .collect()
}

/// The filesystem a volume's mount capabilities name (they agree after creation).
pub fn volume_fs_type(volume: &Volume) -> Option<&str> {
    volume
        .capabilities
        .iter()
        .find_map(|c| match &c.access_type {
            model::AccessType::Mount { fs_type, .. } => Some(fs_type.as_str()),
            model::AccessType::Block => None,
        })
}

/// A publish capability must be one of the kinds (block or mount) the volume was created for.
fn check_publish_capability(volume: &Volume, cap: &Capability) -> Result<(), String> {
    check_capabilities(std::slice::from_ref(cap), "volume_capability")?;
    let block = matches!(cap.access_type, model::AccessType::Block);
    let created_for = volume
        .capabilities
        .iter()
        .any(|c| matches!(c.access_type, model::AccessType::Block) == block);
    if !created_for {
        return Err(format!(
            "volume_capability: volume {:?} was created for {} access, not {}",
            volume.id,
            if block { "mount" } else { "block" },
            if block { "block" } else { "mount" },
        ));
    }
    Ok(())
}

/// A second CreateVolume with the same name must ask for the same volume.
fn check_same_volume(
    v: &Volume,
    req: &CreateRequest,
    params: &VolumeParams,
) -> Result<(), CreateError> {
    let incompatible = |what: &str| CreateError::Incompatible {
        name: req.name.clone(),
        what: what.to_string(),
    };
    if v.name != req.name {
        return Err(incompatible("name (the volume id collides)"));
    }
    if v.state == VolumeState::Deleting {
        return Err(CreateError::BeingDeleted(req.name.clone()));
    }
    if !req.capacity.admits(v.size) {
        return Err(CreateError::Incompatible {
            name: req.name.clone(),
            what: format!(
                "capacity (it has {} bytes; the request asks for [{}, {}])",
                v.size, req.capacity.required, req.capacity.limit
            ),
        });
    }
    if v.params != *params {
        return Err(incompatible("parameters"));
    }
    if v.capabilities != req.capabilities {
        return Err(incompatible("volume capabilities"));
    }
    Ok(())
}

// --- cluster API (ctl, nodes) ---
//
// What `palisade controller` serves beyond CSI: node registration and heartbeats, the
// operator's views (nodes with health and space, volumes with their replicas) and levers
// (settings, force-detach). Kept together here, apart from the CSI operations above.
// (Above the test module rather than at the very end: clippy refuses items after it.)

/// A node as `palisade ctl nodes` shows it: as stored, with its health and the bytes
/// scheduled on each of its disks.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub node: Arc<Node>,
    /// True while the last heartbeat is at most the heartbeat timeout old.
    pub up: bool,
    /// How old the last heartbeat is, in milliseconds.
    pub heartbeat_age_ms: u64,
    /// Bytes scheduled on each disk of `node.disks`, in the same order.
    pub scheduled: Vec<u64>,
}

/// A volume with its replicas, as `palisade ctl volumes` shows it.
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub volume: Arc<Volume>,
    /// Ordered by replica id.
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica of a [`VolumeStatus`].
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub replica: Arc<Replica>,
    /// True for a replica only planned with a volume still `Creating` (not recorded yet).
    pub planned: bool,
}

/// Why a node's registration or heartbeat is refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("node {node:?} is registered from agent address {registered:?} and is up (last heartbeat {age_ms} ms ago); refusing a registration from {reported:?}: are two processes running with one node id?")]
    Duplicate {
        node: String,
        registered: String,
        reported: String,
        age_ms: u64,
    },
    #[error("node {node:?} is not registered from agent address {reported:?}; register it first")]
    NotRegistered { node: String, reported: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a setting could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum SettingUpdateError {
    #[error(transparent)]
    Setting(#[from] crate::settings::SettingError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a force-detach failed.
#[derive(Debug, thiserror::Error)]
pub enum ForceDetachError {
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Controller {
    /// The controller's tunables.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Registers (or re-registers) a node from its agent's report, and reports the replica
    /// directories `found_replicas` on its disks that the store does not know (orphans, left
    /// in place) and the replicas the store places on it that were not found. Refused while
    /// the node id is registered from another agent address and that registration is up.
    pub async fn register_node(
        &self,
        node: Node,
        found_replicas: &[String],
    ) -> Result<(), RegisterError> {
        let now = now_ms();
        if let Some(current) = self.store.nodes().get(&node.id).await? {
            let registered = &current.value.agent_address;
            if registered != &node.agent_address
                && self.health(Some(&current.value), now) == Health::Up
            {
                return Err(RegisterError::Duplicate {
                    node: node.id.clone(),
                    registered: registered.clone(),
                    reported: node.agent_address.clone(),
                    age_ms: now.saturating_sub(current.value.last_heartbeat_ms),
                });
            }
        }
        let (id, agent, disks) = (
            node.id.clone(),
            node.agent_address.clone(),
            node.disks.len(),
        );
        self.heartbeat(node).await?;
        info!(node = %id, agent = %agent, disks, "node registered");
        self.report_node_replicas(&id, found_replicas).await;
        Ok(())
    }

    /// Records a registered node's heartbeat. Refused when the node is not registered from
    /// the reported agent address (the store lost it, or another process registered the id
    /// since): the node registers again.
    pub async fn node_heartbeat(&self, node: Node) -> Result<(), RegisterError> {
        match self.store.nodes().get(&node.id).await? {
            Some(current) if current.value.agent_address == node.agent_address => {}
            _ => {
                return Err(RegisterError::NotRegistered {
                    node: node.id,
                    reported: node.agent_address,
                })
            }
        }
        self.heartbeat(node).await?;
        Ok(())
    }

    /// Compares the replica directories a node found with the replicas the store places on
    /// it, and logs the differences. Nothing is deleted: an unknown directory may hold
    /// another installation's data.
    pub async fn report_node_replicas(&self, node_id: &str, found: &[String]) {
        let known = match self.store.replicas().list().await {
            Ok(list) => list
                .into_iter()
                .filter(|r| r.value.node_id == node_id)
                .map(|r| r.value.id.clone())
                .collect::<std::collections::HashSet<_>>(),
            Err(e) => {
                warn!(node = %node_id, error = %e, "listing replicas for the orphan check failed");
                return;
            }
        };
        for id in found.iter().filter(|id| !known.contains(*id)) {
            warn!(node = %node_id, replica = %id, "orphaned replica directory: no volume in the store owns it; left in place");
        }
        for id in known.iter().filter(|id| !found.contains(*id)) {
            warn!(node = %node_id, replica = %id, "replica missing: the store places it on this node, which did not find it on its disks");
        }
    }

    /// Every node with its health and scheduled space, ordered by id.
    pub async fn node_statuses(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let now = now_ms();
        let space = self.scheduled_space().await?;
        Ok(self
            .store
            .nodes()
            .list()
            .await?
            .into_iter()
            .map(|n| {
                let node = n.value;
                NodeStatus {
                    up: self.health(Some(&node), now) == Health::Up,
                    heartbeat_age_ms: now.saturating_sub(node.last_heartbeat_ms),
                    scheduled: node
                        .disks
                        .iter()
                        .map(|d| space.get(&node.id, &d.id))
                        .collect(),
                    node,
                }
            })
            .collect())
    }

    /// Every volume, in any state, with its replicas, ordered by id.
    pub async fn volume_statuses(&self) -> Result<Vec<VolumeStatus>, StoreError> {
        let mut by_volume: HashMap<String, Vec<Arc<Replica>>> = HashMap::new();
        for r in self.store.replicas().list().await? {
            by_volume
                .entry(r.value.volume_id.clone())
                .or_default()
                .push(r.value);
        }
        Ok(self
            .store
            .volumes()
            .list()
            .await?
            .into_iter()
            .map(|v| {
                let replicas = by_volume.remove(&v.value.id).unwrap_or_default();
                volume_status_of(v.value, replicas)
            })
            .collect())
    }

    /// One volume with its replicas, if it exists.
    pub async fn volume_status(&self, id: &str) -> Result<Option<VolumeStatus>, StoreError> {
        let Some(volume) = self.store.volumes().get(id).await? else {
            return Ok(None);
        };
        let replicas = self
            .volume_replicas(id)
            .await?
            .into_iter()
            .map(|r| r.value)
            .collect();
        Ok(Some(volume_status_of(volume.value, replicas)))
    }

    /// Changes one setting (validated by [`Settings::set`]) with a compare-and-swap that
    /// retries when another writer raced it. Returns the settings afterwards.
    pub async fn set_setting(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Settings, SettingUpdateError> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.settings().get(SETTINGS_KEY).await?;
            let mut settings = current
                .as_ref()
                .map(|c| (*c.value).clone())
                .unwrap_or_default();
            settings.set(name, value)?;
            match self
                .store
                .settings()
                .put(SETTINGS_KEY, settings.clone(), current.map(|c| c.version))
                .await
            {
                Ok(_) => {
                    info!(setting = %name, value = %value.trim(), "setting changed");
                    return Ok(settings);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SettingUpdateError::Store(StoreError::Conflict {
            kind: "settings",
            key: SETTINGS_KEY.to_string(),
            expected: None,
        }))
    }

    /// Releases a volume's attachment without asking its node: the operator's lever for the
    /// `never` recovery policy. The volume's epoch stays, so the next attachment gets a
    /// higher one and fences the released node. Returns the attachment released (None when
    /// the volume was not attached).
    pub async fn force_detach(
        &self,
        volume_id: &str,
    ) -> Result<Option<Attachment>, ForceDetachError> {
        let _guard = self.locks.lock(volume_id).await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = self.store.volumes().get(volume_id).await? else {
                return Err(ForceDetachError::NotFound(volume_id.to_string()));
            };
            let Some(attachment) = current.value.attachment.clone() else {
                info!(volume = %volume_id, "force-detach: the volume is not attached; nothing to release");
                return Ok(None);
            };
            let mut updated = (*current.value).clone();
            updated.attachment = None;
            match self
                .store
                .volumes()
                .put(volume_id, updated, Some(current.version))
                .await
            {
                Ok(_) => {
                    warn!(
                        volume = %volume_id,
                        node = %attachment.node_id,
                        epoch = attachment.epoch,
                        "FORCE-DETACH by the operator: the attachment is released without its node; \
                         that node may still have the volume open until the next attachment \
                         (epoch {}) fences it",
                        current.value.epoch + 1
                    );
                    return Ok(Some(attachment));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ForceDetachError::Store(StoreError::Conflict {
            kind: "volume",
            key: volume_id.to_string(),
            expected: None,
        }))
    }
}

/// A volume with its recorded replicas and, while it is `Creating`, its planned ones.
fn volume_status_of(volume: Arc<Volume>, recorded: Vec<Arc<Replica>>) -> VolumeStatus {
    let mut replicas: Vec<ReplicaStatus> = recorded
        .into_iter()
        .map(|replica| ReplicaStatus {
            replica,
            planned: false,
        })
        .collect();
    if volume.state == VolumeState::Creating {
        for p in &volume.planned_replicas {
            if !replicas.iter().any(|r| r.replica.id == p.id) {
                replicas.push(ReplicaStatus {
                    replica: Arc::new(p.clone()),
                    planned: true,
                });
            }
        }
    }
    replicas.sort_by(|a, b| a.replica.id.cmp(&b.replica.id));
    VolumeStatus { volume, replicas }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessMode, AccessType, Disk};
    use crate::replica::agent::LocalAgent;
    use crate::store::embedded::EmbeddedStore;
    use std::time::Duration;

    async fn controller(dir: &std::path::Path) -> Controller {
        controller_with(dir, ControllerConfig::default()).await
    }

    async fn controller_with(dir: &std::path::Path, config: ControllerConfig) -> Controller {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("db.redb")).unwrap());
        let mut disks = Vec::new();
        let mut paths = HashMap::new();
        for name in ["d0", "d1"] {
            let path = dir.join(name);
            let info = crate::replica::init_disk(&path).unwrap();
            paths.insert(info.id.clone(), path.clone());
            disks.push(Disk {
                id: info.id,
                path,
                tags: vec![],
                schedulable: true,
                storage_maximum: info.storage_maximum,
                storage_available: info.storage_available,
                storage_reserved: 0,
            });
        }
        let agent = Arc::new(LocalAgent::new("n1".into(), paths));
        // The test's disks are directories on the host's filesystem, whose free share is
        // not this test's business.
        let settings = Settings {
            storage_minimal_available_percentage: 0,
            ..Settings::default()
        };
        store
            .settings()
            .put(SETTINGS_KEY, settings, None)
            .await
            .unwrap();
        let c = Controller::new(store, agent, config);
        c.heartbeat(Node {
            id: "n1".into(),
            address: String::new(),
            agent_address: String::new(),
            zone: None,
            tags: vec![],
            schedulable: true,
            last_heartbeat_ms: 0,
            disks,
        })
        .await
        .unwrap();
        c
    }

    fn request(name: &str, size: u64) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            capacity: CapacityRange {
                required: size,
                limit: 0,
            },
            capabilities: vec![Capability {
                access_type: AccessType::Block,
                access_mode: AccessMode::SingleNodeWriter,
            }],
            parameters: HashMap::from([
                ("numberOfReplicas".to_string(), "2".to_string()),
                ("replicaSoftAntiAffinity".to_string(), "enabled".to_string()),
            ]),
            preferred_node: None,
            requisite: vec![],
        }
    }

    async fn from_store(c: &Controller) -> ScheduledSpace {
        let mut s = ScheduledSpace::default();
        for r in c.store.replicas().list().await.unwrap() {
            s.add(&r.value);
        }
        s
    }

    /// Fences every replica it is asked to.
    struct Fences;

    #[async_trait::async_trait]
    impl crate::control::fence::Fencer for Fences {
        async fn fence(&self, _: &str, _: &str, _: &str, _: u64, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    async fn beat(c: &Controller, id: &str) {
        c.heartbeat(Node {
            id: id.into(),
            address: format!("{id}.test:9502"),
            agent_address: String::new(),
            zone: None,
            tags: vec![],
            schedulable: true,
            last_heartbeat_ms: 0,
            disks: if id == "n1" {
                c.store
                    .nodes()
                    .get("n1")
                    .await
                    .unwrap()
                    .unwrap()
                    .value
                    .disks
                    .clone()
            } else {
                vec![]
            },
        })
        .await
        .unwrap();
    }

    /// An engine that starts after one that did not stop cleanly (it died, was fenced or
    /// lost its lease, maybe with writes that reached some members and not others) finds one
    /// member kept and the others marked rebuilding, to be rebuilt from it; after a clean stop
    /// the next engine keeps every member. A clean stop of a superseded engine says nothing.
    #[tokio::test]
    async fn an_engine_after_an_unclean_stop_keeps_one_member_and_rebuilds_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let c = attached(dir.path(), &["v"]).await;
        let states = || async {
            let mut states: Vec<ReplicaState> = c
                .volume_replicas("v")
                .await
                .unwrap()
                .iter()
                .map(|r| r.value.state)
                .collect();
            states.sort_by_key(|s| format!("{s:?}"));
            states
        };
        let both = vec![ReplicaState::Ready, ReplicaState::Ready];

        // The first engine has nothing to repair, and stops cleanly.
        c.start_engine("v", "n1", 1).await.unwrap();
        assert_eq!(states().await, both);
        c.engine_stopped_cleanly("v", "n1", 1).await.unwrap();
        c.release_lease("v", "n1", 1).await.unwrap();
        // So does the next one, which then dies.
        c.start_engine("v", "n1", 1).await.unwrap();
        assert_eq!(states().await, both);
        // The one after it (the volume staged again) keeps one member.
        c.start_engine("v", "n1", 1).await.unwrap();
        assert_eq!(
            states().await,
            vec![ReplicaState::Ready, ReplicaState::Rebuilding]
        );
        // Starting again keeps the same one: nothing else is ready.
        c.start_engine("v", "n1", 1).await.unwrap();
        assert_eq!(
            states().await,
            vec![ReplicaState::Ready, ReplicaState::Rebuilding]
        );
        // A superseded engine's clean stop is ignored; the current one still runs.
        c.engine_stopped_cleanly("v", "n1", 0).await.unwrap();
        assert!(
            c.store
                .volumes()
                .get("v")
                .await
                .unwrap()
                .unwrap()
                .value
                .engine_running
        );
    }

    /// The starting engine's node is alive whatever its heartbeat says: after an unclean
    /// stop its own member is kept and the others are resynchronised even when that node's
    /// heartbeat is late (they were left as they were, possibly different, before).
    #[tokio::test]
    async fn a_late_heartbeat_does_not_skip_the_resynchronisation() {
        let dir = tempfile::tempdir().unwrap();
        let c = attached(dir.path(), &["v"]).await;
        c.start_engine("v", "n1", 1).await.unwrap();
        // The engine dies; n1's heartbeat is late when the next one starts there.
        let node = c.store.nodes().get("n1").await.unwrap().unwrap();
        let mut late = (*node.value).clone();
        late.last_heartbeat_ms = 1;
        c.store
            .nodes()
            .put("n1", late, Some(node.version))
            .await
            .unwrap();
        c.start_engine("v", "n1", 1).await.unwrap();
        let mut states: Vec<String> = c
            .volume_replicas("v")
            .await
            .unwrap()
            .iter()
            .map(|r| format!("{:?}", r.value.state))
            .collect();
        states.sort();
        assert_eq!(states, ["Ready", "Rebuilding"]);
    }

    /// A new attachment starts only once the lease the controller granted to the previous
    /// one has lapsed (so a cut-off engine has stopped writing anywhere), unless that engine
    /// gave it back; a superseded engine's renewals are refused.
    #[tokio::test]
    async fn a_new_attachment_waits_for_the_previous_lease_unless_released() {
        const LEASE_MS: u64 = 1_000;
        let dir = tempfile::tempdir().unwrap();
        let config = ControllerConfig {
            heartbeat_timeout_ms: 200,
            termination_grace_ms: 0,
        };
        let c = controller_with(dir.path(), config)
            .await
            .with_fencing(Fencing {
                secret: Arc::new(vec![1; 32]),
                fencer: Arc::new(Fences),
                lease_ms: LEASE_MS,
            });
        let mut create = request("v", 8 << 20);
        create
            .parameters
            .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
        c.create_volume(create).await.unwrap();
        beat(&c, "n1").await;
        let cap = Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeWriter,
        };
        let lease = Duration::from_millis(LEASE_MS);

        // Take-over from a node that went down after a renewal: waits out the lease.
        // The replicas are on n1; the engine runs on n2, which goes down after a renewal.
        beat(&c, "n2").await;
        c.publish("v", "n2", &cap, false).await.unwrap();
        c.renew_lease("v", "n2", 1).await.unwrap();
        let granted = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        beat(&c, "n1").await;
        c.publish("v", "n1", &cap, false).await.unwrap();
        assert!(
            granted.elapsed() >= lease + LEASE_SLACK,
            "took over {:?} after the old engine's last renewal, within its lease",
            granted.elapsed()
        );
        let superseded = c.renew_lease("v", "n2", 1).await;
        assert!(
            matches!(superseded, Err(MemberError::Superseded { .. })),
            "{superseded:?}"
        );

        // The engine on n1 stops and gives its lease back: the next attachment is at once.
        beat(&c, "n1").await;
        beat(&c, "n2").await;
        c.renew_lease("v", "n1", 2).await.unwrap();
        c.release_lease("v", "n1", 2).await.unwrap();
        c.unpublish("v", "n1").await.unwrap();
        let started = std::time::Instant::now();
        let context = c.publish("v", "n2", &cap, false).await.unwrap();
        assert!(started.elapsed() < lease, "{:?}", started.elapsed());

        // Without the release, a clean detach and attach elsewhere still waits for it.
        let epoch: u64 = context[CONTEXT_EPOCH].parse().unwrap();
        c.renew_lease("v", "n2", epoch).await.unwrap();
        let granted = std::time::Instant::now();
        c.unpublish("v", "n2").await.unwrap();
        beat(&c, "n1").await;
        beat(&c, "n2").await;
        c.publish("v", "n1", &cap, false).await.unwrap();
        assert!(
            granted.elapsed() >= lease + LEASE_SLACK,
            "{:?}",
            granted.elapsed()
        );

        // A take-over whose every member is on a down node moves nothing.
        beat(&c, "n1").await;
        c.renew_lease("v", "n1", epoch + 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        beat(&c, "n2").await;
        let refused = c.publish("v", "n2", &cap, false).await;
        assert!(
            matches!(refused, Err(PublishError::Unfenceable { .. })),
            "{refused:?}"
        );
    }

    /// A replacement whose creation a crash interrupted (recorded `Creating`) is finished by
    /// the next lifecycle pass; one its node cannot create is deleted, not piled up.
    #[tokio::test]
    async fn interrupted_replacements_are_finished_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = attached(dir.path(), &["v"]).await;
        let disk = c
            .store
            .nodes()
            .get("n1")
            .await
            .unwrap()
            .unwrap()
            .value
            .disks[0]
            .clone();
        let pending = |id: &str, disk_id: &str| Replica {
            id: id.into(),
            volume_id: "v".into(),
            node_id: "n1".into(),
            disk_id: disk_id.into(),
            path: Default::default(),
            size: 8 << 20,
            state: ReplicaState::Creating,
            failed_ms: 0,
        };
        c.put_replica(pending("v-r-7", &disk.id), None)
            .await
            .unwrap();
        c.reconcile_replicas().await.unwrap();
        let finished = c
            .store
            .replicas()
            .get("v-r-7")
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(finished.state, ReplicaState::Rebuilding);
        assert!(
            finished.path.join(crate::replica::DATA_FILE).exists(),
            "{finished:?}"
        );

        c.put_replica(pending("v-r-8", "no-such-disk"), None)
            .await
            .unwrap();
        c.reconcile_replicas().await.unwrap();
        assert!(c.store.replicas().get("v-r-8").await.unwrap().is_none());
    }

    /// A controller with fencing, and volumes of 8 MiB with two replicas (on n1's two
    /// disks) and a staleReplicaTimeout of 30 minutes, attached on n1.
    async fn attached(dir: &std::path::Path, names: &[&str]) -> Controller {
        let c = controller(dir).await.with_fencing(Fencing {
            secret: Arc::new(vec![1; 32]),
            fencer: Arc::new(Fences),
            lease_ms: 1_000,
        });
        beat(&c, "n1").await;
        let cap = Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeWriter,
        };
        for name in names {
            let mut request = request(name, 8 << 20);
            request
                .parameters
                .insert("staleReplicaTimeout".into(), "30".into());
            c.create_volume(request).await.unwrap();
            c.publish(name, "n1", &cap, false).await.unwrap();
        }
        c
    }

    /// Marks one replica of `volume` failed `ago_ms` ago; returns it.
    async fn fail_one(c: &Controller, volume: &str, ago_ms: u64) -> Replica {
        let r = c.volume_replicas(volume).await.unwrap().remove(1);
        let mut failed = (*r.value).clone();
        failed.state = ReplicaState::Failed;
        failed.failed_ms = now_ms() - ago_ms;
        c.put_replica(failed.clone(), Some(&r)).await.unwrap();
        failed
    }

    async fn replica(c: &Controller, id: &str) -> Option<Replica> {
        let r = c.store.replicas().get(id).await.unwrap();
        r.map(|r| (*r.value).clone())
    }

    /// staleReplicaTimeout (30 minutes here): a failed replica older than that is
    /// deleted, record and files, and replaced; a younger one whose node is up is reused —
    /// grown first when the volume grew meanwhile, since its rebuild writes the new end.
    #[tokio::test]
    async fn stale_replicas_are_deleted_and_younger_ones_reused_at_the_volume_size() {
        let dir = tempfile::tempdir().unwrap();
        let c = attached(dir.path(), &["old", "young"]).await;
        let stale = fail_one(&c, "old", 31 * 60_000).await;
        let young = fail_one(&c, "young", 10_000).await;
        // The young replica's volume grows while it is failed: it is left as it was.
        c.expand(
            "young",
            CapacityRange {
                required: 16 << 20,
                limit: 0,
            },
        )
        .await
        .unwrap();
        let data = |r: &Replica| r.path.join(crate::replica::DATA_FILE);
        assert_eq!(std::fs::metadata(data(&young)).unwrap().len(), 8 << 20);
        assert_eq!(replica(&c, &young.id).await.unwrap().size, 8 << 20);

        c.reconcile_replicas().await.unwrap();

        assert!(
            replica(&c, &stale.id).await.is_none(),
            "the stale record: {:?}",
            replica(&c, &stale.id).await
        );
        assert!(!stale.path.exists(), "the stale replica's files");
        let replacement = c.volume_replicas("old").await.unwrap();
        assert!(
            replacement
                .iter()
                .any(|r| r.value.state == ReplicaState::Rebuilding && r.value.id != stale.id),
            "no replacement: {replacement:?}"
        );
        let reused = replica(&c, &young.id).await.unwrap();
        assert_eq!(reused.state, ReplicaState::Rebuilding);
        assert_eq!(reused.size, 16 << 20);
        assert_eq!(std::fs::metadata(data(&young)).unwrap().len(), 16 << 20);
    }

    /// concurrent-replica-rebuild-per-node-limit counts a node's rebuilds over every
    /// volume: with a limit of 1, a second volume's rebuild waits for the first.
    #[tokio::test]
    async fn the_rebuild_limit_is_per_node_across_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let c = attached(dir.path(), &["a", "b"]).await;
        let current = c.store.settings().get(SETTINGS_KEY).await.unwrap().unwrap();
        let mut settings = (*current.value).clone();
        settings.concurrent_replica_rebuild_per_node_limit = 1;
        c.store
            .settings()
            .put(SETTINGS_KEY, settings, Some(current.version))
            .await
            .unwrap();
        let failed = [
            fail_one(&c, "a", 10_000).await,
            fail_one(&c, "b", 10_000).await,
        ];
        let states = || async {
            let mut states = Vec::new();
            for r in &failed {
                states.push(replica(&c, &r.id).await.unwrap().state);
            }
            states
        };

        c.reconcile_replicas().await.unwrap();
        c.reconcile_replicas().await.unwrap();
        let now = states().await;
        assert_eq!(
            now.iter()
                .filter(|s| **s == ReplicaState::Rebuilding)
                .count(),
            1,
            "{now:?}"
        );
        assert!(now.contains(&ReplicaState::Failed), "{now:?}");

        // The first rebuild is done: the other starts.
        let first = &failed[now
            .iter()
            .position(|s| *s == ReplicaState::Rebuilding)
            .unwrap()];
        let r = c.store.replicas().get(&first.id).await.unwrap().unwrap();
        let mut done = (*r.value).clone();
        done.state = ReplicaState::Ready;
        c.put_replica(done, Some(&r)).await.unwrap();
        c.reconcile_replicas().await.unwrap();
        let now = states().await;
        assert!(now.contains(&ReplicaState::Ready), "{now:?}");
        assert!(now.contains(&ReplicaState::Rebuilding), "{now:?}");
    }

    #[test]
    fn leases_lapse_only_for_older_epochs() {
        let leases = Leases::default();
        let lease = Duration::from_millis(100) + LEASE_SLACK;
        // Nothing known (a restart): as if granted just before the controller started.
        assert_eq!(leases.lapse("v", 1, 100), Some(leases.started + lease));
        leases.grant("v", 3);
        let at = leases.lapse("v", 4, 100).unwrap();
        assert!(at >= leases.started + lease && at <= std::time::Instant::now() + lease);
        assert_eq!(leases.lapse("v", 3, 100), None, "the holder's own epoch");
        assert_eq!(
            leases.lapse("v", 2, 100),
            None,
            "an epoch older than the holder's"
        );
        assert!(
            !leases.release("v", 2),
            "an older epoch's release changes nothing"
        );
        assert!(leases.lapse("v", 4, 100).is_some());
        assert!(leases.release("v", 3));
        assert_eq!(leases.lapse("v", 4, 100), None);
    }

    #[tokio::test]
    async fn scheduled_space_follows_every_replica_write() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path()).await;
        let empty = c.scheduled_space().await.unwrap();
        assert_eq!(empty, ScheduledSpace::default());
        for i in 0..4 {
            c.create_volume(request(&format!("v{i}"), 8 << 20))
                .await
                .unwrap();
        }
        c.expand(
            "v1",
            CapacityRange {
                required: 16 << 20,
                limit: 0,
            },
        )
        .await
        .unwrap();
        c.delete_volume("v2").await.unwrap();
        let kept = c.scheduled_space().await.unwrap();
        assert_eq!(kept, from_store(&c).await);
        let total: u64 = c
            .store
            .nodes()
            .get("n1")
            .await
            .unwrap()
            .unwrap()
            .value
            .disks
            .iter()
            .map(|d| kept.get("n1", &d.id))
            .sum();
        // v0, v3: 2 × 8 MiB each; v1: 2 × 16 MiB.
        assert_eq!(total, (2 * 8 + 2 * 8 + 2 * 16) << 20);
    }

    #[test]
    fn capacity_range_resolves_within_bounds() {
        let r = |required, limit| CapacityRange { required, limit }.resolve();
        assert_eq!(r(0, 0), Ok(DEFAULT_VOLUME_SIZE));
        assert_eq!(r(1, 0), Ok(SIZE_ALIGNMENT));
        assert_eq!(r(SIZE_ALIGNMENT + 1, 0), Ok(2 * SIZE_ALIGNMENT));
        assert_eq!(r(0, 10 * SIZE_ALIGNMENT + 5), Ok(10 * SIZE_ALIGNMENT));
        assert!(r(10, 5).unwrap_err().contains("limit_bytes"));
        assert!(r(SIZE_ALIGNMENT + 1, SIZE_ALIGNMENT + 2).is_err());
        assert!(r(0, 100).is_err());
        assert!(r(MAX_VOLUME_SIZE + 1, 0).is_err());
    }
}
