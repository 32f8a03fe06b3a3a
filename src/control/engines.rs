//! What the control plane does for the engines of attached volumes: attachment leases
//! (granted, renewed, released, and waited out before a new attachment starts; the
//! arithmetic and what is persisted are in `leases`), removing a failed member from the
//! membership, and the resynchronisation after an engine that did not stop cleanly.

use super::*;

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

/// How long an engine's lease lasts when the controller was not told otherwise: at most the
/// default heartbeat timeout, so that waiting for a down node's lease to lapse does not
/// delay a take-over beyond noticing the node is down.
pub const DEFAULT_LEASE_MS: u64 = 9_000;

/// Succeeds when `node` holds the volume's attachment at `epoch`.
pub(super) fn check_attachment(volume: &Volume, node: &str, epoch: u64) -> Result<(), MemberError> {
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

impl Controller {
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
    pub(super) async fn attached_volume(
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
        self.grant_lease(volume_id, node_id, epoch).await
    }

    /// Grants the engine of the current attachment a lease, after recording it in the
    /// volume's lease record when the record does not cover it yet (see `leases`). The caller
    /// holds the volume's lock.
    async fn grant_lease(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<u64, MemberError> {
        let lease_ms = self.lease_ms();
        let mut last = None;
        for _ in 0..CAS_ATTEMPTS {
            let volume = self.attached_volume(volume_id, node_id, epoch).await?;
            let plan = leases::plan_grant(
                volume.value.engine_lease.as_ref(),
                &self.leases.me,
                epoch,
                now_ms(),
                lease_ms,
            );
            let floor_ms = match plan {
                leases::GrantPlan::Covered => 0,
                leases::GrantPlan::Write { record, floor_ms } => {
                    let mut updated = (*volume.value).clone();
                    updated.engine_lease = Some(record);
                    match self
                        .store
                        .volumes()
                        .put(volume_id, updated, Some(volume.version))
                        .await
                    {
                        Ok(_) => floor_ms,
                        Err(e @ StoreError::Conflict { .. }) => {
                            last = Some(e);
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            // The engine counts its lease from before it asked: remembering the grant as of
            // now, after the write, errs on the late side.
            let at = std::time::Instant::now();
            self.leases.remember(volume_id, epoch, at, floor_ms);
            return Ok(lease_ms);
        }
        Err(last
            .map(MemberError::from)
            .unwrap_or_else(|| MemberError::VolumeNotFound(volume_id.to_string())))
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
        self.grant_lease(volume_id, node_id, epoch).await
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
    pub(super) async fn set_engine_running(
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
    pub(super) async fn resync_members(
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
    /// wait for it to lapse, whichever controller starts it. Releasing a lease that is not
    /// current is Ok (nothing to do).
    pub async fn release_lease(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(volume) = self.store.volumes().get(volume_id).await? else {
                return Ok(());
            };
            if let Some(a) = &volume.value.attachment {
                if a.node_id != node_id {
                    return Ok(());
                }
            }
            let Some(record) = leases::plan_release(volume.value.engine_lease.as_ref(), epoch)
            else {
                self.leases.forget(volume_id, epoch);
                return Ok(());
            };
            let mut updated = (*volume.value).clone();
            updated.engine_lease = Some(record);
            match self
                .store
                .volumes()
                .put(volume_id, updated, Some(volume.version))
                .await
            {
                Ok(_) => {
                    self.leases.forget(volume_id, epoch);
                    info!(volume = %volume_id, node = %node_id, epoch, "engine stopped; its lease is released");
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(MemberError::Store(StoreError::Conflict {
            kind: "volume",
            key: volume_id.to_string(),
            expected: None,
        }))
    }

    pub(super) fn lease_ms(&self) -> u64 {
        self.fencing
            .as_ref()
            .map(|f| f.lease_ms)
            .unwrap_or(DEFAULT_LEASE_MS)
    }

    /// Waits until no engine of an attachment older than `epoch` can still hold a lease on
    /// the volume: an engine that lost its controller stops serving when its lease lapses, so
    /// after this even a node that was cut off (not only fenced on the members that could be
    /// reached) writes nothing more anywhere — not even to its own replica. `volume` is the
    /// volume as read before the new attachment is written with its version, so that no
    /// lease recorded after it is missed (such a write makes that one fail).
    pub(super) async fn wait_for_older_leases(&self, volume: &Volume, epoch: u64) {
        if self.fencing.is_none() {
            return;
        }
        let wait = leases::wait_before_attach(
            volume.engine_lease.as_ref(),
            self.leases.latest(&volume.id),
            &self.leases.me,
            epoch,
            self.lease_ms(),
            leases::Clock {
                now: std::time::Instant::now(),
                now_ms: now_ms(),
                started: self.leases.started,
            },
        );
        if !wait.is_zero() {
            info!(volume = %volume.id, epoch, wait_ms = wait.as_millis() as u64, "waiting for the previous attachment's lease to lapse");
            tokio::time::sleep(wait).await;
        }
    }
}
