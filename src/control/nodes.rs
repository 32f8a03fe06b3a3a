//! Nodes: registration and heartbeats of the node agents, the replicas a node reports at
//! start-up, node health (the rule is in `health`: the heartbeat's age, and the node
//! evidence when there is a source), and the nodes as `palisade ctl nodes` shows them.

use super::*;

/// A node as `palisade ctl nodes` shows it: as stored, with its health and the bytes
/// scheduled on each of its disks.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub node: Arc<Node>,
    /// Up by the health rule (see `health`).
    pub up: bool,
    /// How old the last heartbeat is, in milliseconds.
    pub heartbeat_age_ms: u64,
    /// Bytes scheduled on each disk of `node.disks`, in the same order.
    pub scheduled: Vec<u64>,
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

impl Controller {
    /// The node's health by the rule of `health`: its heartbeat, and what the node evidence
    /// (if any) says about its host.
    pub(super) fn health(&self, node: Option<&Node>, now: u64) -> Health {
        let host = match (&self.evidence, node) {
            (Some(e), Some(n)) => e.source.host(&n.id, now),
            _ => HostEvidence::Unknown,
        };
        health::node_health(
            node.map(|n| n.last_heartbeat_ms),
            host,
            now,
            self.health_rule(),
        )
    }

    /// Whether the node's own heartbeat is fresh, whatever else is known: the question a
    /// second registration of a node id asks (is another process heartbeating with it?).
    fn heartbeat_fresh(&self, node: &Node, now: u64) -> bool {
        health::node_health(
            Some(node.last_heartbeat_ms),
            HostEvidence::Unknown,
            now,
            self.health_rule(),
        ) == Health::Up
    }

    fn health_rule(&self) -> HealthRule {
        HealthRule {
            heartbeat_timeout_ms: self.config.heartbeat_timeout_ms,
            vouch_ms: self.evidence.as_ref().map_or(0, |e| e.vouch_ms),
        }
    }

    /// What the node evidence says about node `id`'s host now (Unknown without any).
    pub fn host_evidence(&self, id: &str) -> HostEvidence {
        self.evidence
            .as_ref()
            .map_or(HostEvidence::Unknown, |e| e.source.host(id, now_ms()))
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
            if registered != &node.agent_address && self.heartbeat_fresh(&current.value, now) {
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
}
