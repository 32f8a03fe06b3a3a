//! Volume lifecycle: CreateVolume (intent recorded, replicas placed and created, then
//! Available), DeleteVolume (Deleting recorded, replicas deleted, then the record), the
//! start-up pass that finishes both, ListVolumes and GetCapacity, and the checks of what a
//! request may ask for.

use super::*;

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
    /// accessibility_requirements.requisite. Topology is the consumer's reach, not a limit on
    /// where replicas live: in a cluster an engine reaches its members over the network from
    /// any node, so a volume there is accessible everywhere and the requisite places nothing.
    /// Only where a volume is served from a replica on the consumer's own node (standalone,
    /// and strict-local anywhere) are its replicas kept to nodes matching these segments.
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
pub enum ListError {
    #[error("starting_token {0:?} is not a token this controller handed out")]
    BadToken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
pub(super) const TOKEN_PREFIX: &str = "after:";

/// True when a node with this id and zone lies in a topology segment (every key matches;
/// keys Palisade does not report match nothing).
pub(super) fn node_in_segment(
    id: &str,
    zone: Option<&str>,
    segment: &HashMap<String, String>,
) -> bool {
    segment.iter().all(|(k, v)| match k.as_str() {
        TOPOLOGY_NODE_KEY => id == v,
        TOPOLOGY_ZONE_KEY => zone == Some(v.as_str()),
        _ => false,
    })
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
                    (true, None) => *fs_type = DEFAULT_FS.to_string(),
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

/// A second CreateVolume with the same name must ask for the same volume.
pub(super) fn check_same_volume(
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

impl Controller {
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
                if self.deletion_requested(&id).await? {
                    return Err(CreateError::BeingDeleted(req.name.clone()));
                }
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
    pub(super) async fn record_new_volume(
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
            ready_replicas: 0,
            engine_lease: None,
        };
        // Place before recording, so that a volume that cannot be placed leaves nothing.
        let placement = self.place(&volume, &[], req, settings).await?;
        let mut volume = volume;
        volume.degraded_reason = placement.degraded_reason.clone();
        volume.next_replica = placement.replicas.len() as u64;
        volume.ready_replicas = u32::try_from(placement.replicas.len()).unwrap_or(u32::MAX);
        // In standalone a volume is served from a local replica, so it is reachable exactly
        // from its replicas' nodes; so is a strict-local one anywhere. In a cluster the engine
        // reaches its members over the network from any node.
        let mut replica_nodes: Vec<&String> = placement.replicas.iter().map(|(n, _)| n).collect();
        replica_nodes.sort();
        replica_nodes.dedup();
        if self.serves_from_consumer_node(&volume) {
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
                rebuilt_percent: None,
            });
        }
        let version = self.store.volumes().put(id, volume.clone(), None).await?;
        info!(volume = %id, name = %req.name, size, replicas = placement.replicas.len(), "volume recorded");
        Ok(Versioned {
            version,
            value: Arc::new(volume),
        })
    }

    /// True where `volume` is served from a replica on the consumer's own node, so that its
    /// accessibility is its replicas' nodes: in standalone (no network data path), and for a
    /// strict-local volume anywhere. Elsewhere it is accessible from every node.
    fn serves_from_consumer_node(&self, volume: &Volume) -> bool {
        let networked = self.fencing.is_some();
        !networked || volume.params.data_locality == DataLocality::StrictLocal
    }

    pub(super) async fn place(
        &self,
        volume: &Volume,
        existing: &[Arc<Replica>],
        req: &CreateRequest,
        settings: &Settings,
    ) -> Result<scheduler::Placement, CreateError> {
        let mut nodes = self.list_nodes().await?;
        if !req.requisite.is_empty() && self.serves_from_consumer_node(volume) {
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
    pub(super) async fn finish_creation(
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
        // The replicas' records, all at once: each is its own object, and the volume's
        // Creating record, written before, already names them all. Every put runs to its
        // end (none is dropped halfway), so that the scheduled-space aggregate follows
        // each one that was written.
        let puts = volume
            .planned_replicas
            .iter()
            .map(|planned| self.put_replica(planned.clone(), None));
        for result in futures::future::join_all(puts).await {
            match result {
                // Already recorded by an attempt that a crash interrupted.
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Every replica again: creation is idempotent, and one interrupted by a crash is
        // finished here. Only once every record is in the store, so that a deletion
        // (which deletes what the records name) finds every replica made; the replicas
        // are made all at once, each on its own node's agent.
        let replicas = self.volume_replicas(&volume.id).await?;
        let creates = replicas.iter().map(|replica| {
            let target = ReplicaTarget {
                node_id: &replica.value.node_id,
                disk_id: &replica.value.disk_id,
                replica_id: &replica.value.id,
                volume_id: &volume.id,
            };
            self.agent.create_replica(target, volume.size)
        });
        for result in futures::future::join_all(creates).await {
            result.map_err(|source| CreateError::Agent {
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

    /// DeleteVolume: OK when the volume is already gone.
    /// True when the volume's record was deleted by hand (`kubectl delete` of its custom
    /// resource): it stays, held by its finalizer, until [`Self::finish_requested_deletions`]
    /// has deleted its replicas. Such a volume is neither handed out again nor attached.
    pub(super) async fn deletion_requested(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .volumes()
            .deletion_requested()
            .await?
            .iter()
            .any(|k| k == id))
    }

    /// Deletes, as DeleteVolume does, every volume whose record was deleted by hand, so that
    /// its replica files are never orphaned. An attached volume waits for its detach (and
    /// says so); the next pass retries whatever failed.
    pub async fn finish_requested_deletions(&self) -> Result<(), StoreError> {
        for id in self.store.volumes().deletion_requested().await? {
            match self.delete_volume(&id).await {
                Ok(()) => info!(volume = %id, "deleted a volume whose record was deleted by hand"),
                // Every pass (2 s) finds it again until it is detached: not worth an info line
                // each time; ControllerPublish and CreateVolume say why they refuse it.
                Err(DeleteError::InUse { node, .. }) => {
                    debug!(volume = %id, node = %node, "the record of an attached volume was deleted by hand: it is deleted once it is detached")
                }
                Err(e) => {
                    warn!(volume = %id, error = %e, "deleting a volume whose record was deleted by hand failed; retrying at the next pass")
                }
            }
        }
        Ok(())
    }

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

    pub(super) async fn finish_deletion(
        &self,
        current: Versioned<Volume>,
    ) -> Result<(), DeleteError> {
        let id = current.value.id.clone();
        // For each replica, its files on its node and then its record (never the record
        // first: the record is what finds the files again after a crash); all replicas at
        // once, each to its end. The volume's record goes only once every replica has.
        let replicas = self.volume_replicas(&id).await?;
        let deletions = replicas.iter().map(|replica| {
            let id = &id;
            async move {
                let target = ReplicaTarget {
                    node_id: &replica.value.node_id,
                    disk_id: &replica.value.disk_id,
                    replica_id: &replica.value.id,
                    volume_id: id,
                };
                self.agent
                    .delete_replica(target)
                    .await
                    .map_err(|source| DeleteError::Agent {
                        volume: id.clone(),
                        source,
                    })?;
                self.delete_replica_record(replica).await?;
                Ok::<(), DeleteError>(())
            }
        });
        for result in futures::future::join_all(deletions).await {
            result?;
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
}
