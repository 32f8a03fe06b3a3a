//! ControllerExpandVolume: every replica that is not failed is grown, then the attached
//! engine, and the size is recorded last, so that a retry after any failure goes the same way.

use super::*;

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

impl Controller {
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
    pub(super) async fn check_growth_fits(
        &self,
        volume: &Volume,
        size: u64,
    ) -> Result<(), ExpandError> {
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
}
