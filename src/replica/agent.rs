//! What the controller asks of a node's agent: create, grow and delete replica files on the
//! node's disks. In standalone the agent is in the same process (`LocalAgent`); in a cluster
//! each node serves its `LocalAgent` as the NodeAgent gRPC service, and the controller's
//! agent is `crate::api::agent::RemoteAgent`, which calls the node the replica is on.

use std::collections::HashMap;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::replica::{self, ReplicaError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node {0:?} is not served by this agent")]
    UnknownNode(String),
    #[error("disk {disk:?} is not on node {node:?}")]
    UnknownDisk { node: String, disk: String },
    #[error("node {node:?} is unreachable: {why}")]
    Unreachable { node: String, why: String },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("replica task failed: {0}")]
    Task(String),
    #[error("the engine of volume {volume:?} on node {node:?} cannot grow: {why}")]
    Engine {
        node: String,
        volume: String,
        why: String,
    },
}

/// A replica the controller wants on a node's disk.
#[derive(Debug, Clone)]
pub struct ReplicaTarget<'a> {
    pub node_id: &'a str,
    pub disk_id: &'a str,
    pub replica_id: &'a str,
    pub volume_id: &'a str,
}

#[async_trait]
pub trait NodeAgent: Send + Sync + 'static {
    /// Creates the replica (idempotent); returns its directory.
    async fn create_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<PathBuf, AgentError>;
    /// Grows the replica's data file to `size` (idempotent, never shrinks).
    async fn grow_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<(), AgentError>;
    /// Removes the replica; Ok when it is already gone.
    async fn delete_replica(&self, t: ReplicaTarget<'_>) -> Result<(), AgentError>;
    /// Grows the engine serving attachment `epoch` of `volume_id` on `node_id` to `size`
    /// (its replicas were grown first). Returns the engine's size afterwards, or None when
    /// no engine of that attachment runs there (it reads the size when it starts).
    async fn grow_engine(
        &self,
        node_id: &str,
        volume_id: &str,
        epoch: u64,
        size: u64,
    ) -> Result<Option<u64>, AgentError>;
}

/// The agent of the node this process runs, acting on its disks directly.
pub struct LocalAgent {
    node_id: String,
    disks: HashMap<String, PathBuf>,
}

impl LocalAgent {
    pub fn new(node_id: String, disks: HashMap<String, PathBuf>) -> Self {
        LocalAgent { node_id, disks }
    }

    fn disk(&self, t: &ReplicaTarget<'_>) -> Result<PathBuf, AgentError> {
        if t.node_id != self.node_id {
            return Err(AgentError::UnknownNode(t.node_id.to_string()));
        }
        self.disks
            .get(t.disk_id)
            .cloned()
            .ok_or_else(|| AgentError::UnknownDisk {
                node: t.node_id.to_string(),
                disk: t.disk_id.to_string(),
            })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
        .map_err(AgentError::from)
}

#[async_trait]
impl NodeAgent for LocalAgent {
    async fn create_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<PathBuf, AgentError> {
        let disk = self.disk(&t)?;
        let (rid, vid) = (t.replica_id.to_string(), t.volume_id.to_string());
        let dir = blocking(move || replica::create(&disk, &rid, &vid, size)).await?;
        Ok(dir.dir.clone())
    }

    async fn grow_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<(), AgentError> {
        let disk = self.disk(&t)?;
        let rid = t.replica_id.to_string();
        blocking(move || {
            replica::grow(&disk, &rid, size)?;
            // Sessions open on it now serve the new bytes too (an attached volume grows
            // online).
            crate::replica::server::replica_grown(&disk, &rid, size);
            Ok(())
        })
        .await
    }

    async fn delete_replica(&self, t: ReplicaTarget<'_>) -> Result<(), AgentError> {
        let disk = self.disk(&t)?;
        let rid = t.replica_id.to_string();
        blocking(move || replica::delete(&disk, &rid)).await
    }

    /// The local agent knows no engines: a standalone node serves its volumes through a
    /// loop device over the replica file, which grows with it.
    async fn grow_engine(
        &self,
        node_id: &str,
        _volume_id: &str,
        _epoch: u64,
        _size: u64,
    ) -> Result<Option<u64>, AgentError> {
        if node_id != self.node_id {
            return Err(AgentError::UnknownNode(node_id.to_string()));
        }
        Ok(None)
    }
}
