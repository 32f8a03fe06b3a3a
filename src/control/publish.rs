//! ControllerPublish and ControllerUnpublish: the attachment authority's decisions
//! (`attach`) persisted with a compare-and-swap, the publish context handed to the node,
//! fencing the members before an attachment moves away from a down node, and the
//! operator's force-detach.

use super::*;

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
    #[error("node {node:?} is down (its heartbeat expired); volume {volume:?} is not attached to a node that cannot run it")]
    TargetDown { volume: String, node: String },
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

/// The result of fencing a volume's members.
pub(super) struct FenceOutcome {
    pub(super) fenced: usize,
    pub(super) members: usize,
    failures: Vec<String>,
}

impl FenceOutcome {
    pub(super) fn describe(&self) -> String {
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

/// A publish capability must be one of the kinds (block or mount) the volume was created for.
pub(super) fn check_publish_capability(volume: &Volume, cap: &Capability) -> Result<(), String> {
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

/// Why a force-detach failed.
#[derive(Debug, thiserror::Error)]
pub enum ForceDetachError {
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Controller {
    /// The publish context for an attachment: its epoch and, in cluster mode, the token its
    /// engine opens replica sessions with.
    pub(super) fn publish_context(
        &self,
        volume_id: &str,
        a: &Attachment,
    ) -> HashMap<String, String> {
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
    pub(super) async fn fence_members(
        &self,
        volume_id: &str,
        epoch: u64,
    ) -> Result<FenceOutcome, StoreError> {
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
        let Some(target) = self.store.nodes().get(node_id).await? else {
            return Err(PublishError::NodeNotFound(node_id.to_string()));
        };
        let volume = &current.value;
        if volume.state != VolumeState::Ready || self.deletion_requested(volume_id).await? {
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
        // A new attachment on a node that is down is refused: its engine could not run, and
        // in Kubernetes the attach-detach controller recreates the VolumeAttachment of a pod
        // still on a dead node, which would move the volume back there from the node its
        // replacement waits on, after every recovery.
        if matches!(
            decision,
            PublishDecision::Attach(_) | PublishDecision::TakeOver { .. }
        ) && !matches!(self.health(Some(&target.value), now), attach::Health::Up)
        {
            return Err(PublishError::TargetDown {
                volume: volume_id.to_string(),
                node: node_id.to_string(),
            });
        }
        let attachment = match decision {
            PublishDecision::AlreadyPublished(a) => return Ok(self.publish_context(volume_id, &a)),
            PublishDecision::Attach(a) => {
                self.check_node_room(node_id).await?;
                if volume.epoch > 0 {
                    self.wait_for_older_leases(volume, a.epoch).await;
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
                self.wait_for_older_leases(volume, to.epoch).await;
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

    pub(super) async fn check_node_room(&self, node_id: &str) -> Result<(), PublishError> {
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
                    // Fenced for recovery already (the epoch is ahead of the attachment's):
                    // fenced again at that epoch, not raised a second time.
                    let (epoch, _) = recovery::fence_epoch(&current.value, a);
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
