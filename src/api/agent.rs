//! The node agent over the network: `AgentService` serves a node's agent (its disks, through
//! [`crate::replica::agent::LocalAgent`]) as the NodeAgent gRPC service, and `RemoteAgent` is the
//! controller's [`NodeAgent`]: it looks up the node's agent address in the store and calls
//! that service, within a timeout, with the cluster's API credential.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::status::{agent_error, agent_status};
use crate::csi::convert::required;
use crate::replica::agent::{AgentError, NodeAgent, ReplicaTarget};
use crate::rpc::v1 as pb;
use crate::rpc::{AgentClient, Auth};
use crate::store::Store;

/// The NodeAgent gRPC service of one node, over the agent that acts on its disks.
pub struct AgentService {
    /// The agent that acts on this node's disks (a `LocalAgent`).
    pub agent: Arc<dyn NodeAgent>,
    /// The node's engines, for online expansion (None: this node runs none).
    pub engines: Option<crate::node::engines::ClusterLink>,
}

/// A request's target: every field required.
fn target(t: Option<&pb::ReplicaTarget>) -> Result<ReplicaTarget<'_>, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument("target is required"))?;
    Ok(ReplicaTarget {
        node_id: required(&t.node_id, "target.node_id")?,
        disk_id: required(&t.disk_id, "target.disk_id")?,
        replica_id: required(&t.replica_id, "target.replica_id")?,
        volume_id: required(&t.volume_id, "target.volume_id")?,
    })
}

fn size(size: u64) -> Result<u64, Status> {
    if size == 0 {
        return Err(Status::invalid_argument("size must be above 0"));
    }
    Ok(size)
}

#[tonic::async_trait]
impl pb::node_agent_server::NodeAgent for AgentService {
    #[instrument(skip_all, fields(replica = request.get_ref().target.as_ref().map(|t| t.replica_id.as_str())))]
    async fn create_replica(
        &self,
        request: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::CreateReplicaResponse>, Status> {
        let req = request.into_inner();
        let (t, size) = (target(req.target.as_ref())?, size(req.size)?);
        let dir = self
            .agent
            .create_replica(t.clone(), size)
            .await
            .map_err(|e| agent_status(&e))?;
        info!(volume = %t.volume_id, disk = %t.disk_id, size, dir = %dir.display(), "replica created");
        Ok(Response::new(pb::CreateReplicaResponse {
            path: dir.display().to_string(),
        }))
    }

    #[instrument(skip_all, fields(replica = request.get_ref().target.as_ref().map(|t| t.replica_id.as_str())))]
    async fn grow_replica(
        &self,
        request: Request<pb::GrowReplicaRequest>,
    ) -> Result<Response<pb::GrowReplicaResponse>, Status> {
        let req = request.into_inner();
        let (t, size) = (target(req.target.as_ref())?, size(req.size)?);
        self.agent
            .grow_replica(t.clone(), size)
            .await
            .map_err(|e| agent_status(&e))?;
        info!(volume = %t.volume_id, size, "replica grown");
        Ok(Response::new(pb::GrowReplicaResponse {}))
    }

    #[instrument(skip_all, fields(replica = request.get_ref().target.as_ref().map(|t| t.replica_id.as_str())))]
    async fn delete_replica(
        &self,
        request: Request<pb::DeleteReplicaRequest>,
    ) -> Result<Response<pb::DeleteReplicaResponse>, Status> {
        let req = request.into_inner();
        let t = target(req.target.as_ref())?;
        self.agent
            .delete_replica(t.clone())
            .await
            .map_err(|e| agent_status(&e))?;
        info!(volume = %t.volume_id, "replica deleted");
        Ok(Response::new(pb::DeleteReplicaResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn grow_engine(
        &self,
        request: Request<pb::GrowEngineRequest>,
    ) -> Result<Response<pb::GrowEngineResponse>, Status> {
        let req = request.into_inner();
        let node = required(&req.node_id, "node_id")?;
        let volume = required(&req.volume_id, "volume_id")?;
        let size = size(req.size)?;
        let grown = match &self.engines {
            Some(link) if link.node_id != node => {
                return Err(agent_status(&AgentError::UnknownNode(node.to_string())))
            }
            Some(link) => link.grow(volume, req.epoch, size).await.map_err(|why| {
                agent_status(&AgentError::Engine {
                    node: node.to_string(),
                    volume: volume.to_string(),
                    why,
                })
            })?,
            None => self
                .agent
                .grow_engine(node, volume, req.epoch, size)
                .await
                .map_err(|e| agent_status(&e))?,
        };
        Ok(Response::new(pb::GrowEngineResponse {
            size: grown.unwrap_or(0),
        }))
    }
}

/// The controller's agent in a cluster: every call goes to the agent address the node
/// registered, and gives up after `timeout` (an unreachable node is
/// [`AgentError::Unreachable`], which the caller may retry: every operation is idempotent).
pub struct RemoteAgent {
    store: Arc<dyn Store>,
    timeout: Duration,
    auth: Auth,
    /// One lazily connecting channel per agent address.
    channels: Mutex<HashMap<String, Channel>>,
}

impl RemoteAgent {
    /// An agent that finds nodes' agent addresses in `store`, gives each call `timeout` and
    /// authenticates it with `auth`.
    pub fn new(store: Arc<dyn Store>, timeout: Duration, auth: Auth) -> Self {
        RemoteAgent {
            store,
            timeout,
            auth,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client of the agent of `node_id`, at the address its registration recorded.
    async fn client(&self, node_id: &str) -> Result<AgentClient, AgentError> {
        let unreachable = |why: String| AgentError::Unreachable {
            node: node_id.to_string(),
            why,
        };
        let node = self
            .store
            .nodes()
            .get(node_id)
            .await
            .map_err(|e| unreachable(format!("its agent address cannot be read: {e}")))?
            .ok_or_else(|| AgentError::UnknownNode(node_id.to_string()))?;
        let address = &node.value.agent_address;
        if address.is_empty() {
            return Err(unreachable(
                "it registered no agent address (is it a standalone node?)".to_string(),
            ));
        }
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = crate::rpc::channel(address, self.timeout).map_err(|e| {
                    unreachable(format!("its agent address {address:?} is not usable: {e}"))
                })?;
                channels.insert(address.clone(), c.clone());
                c
            }
        };
        Ok(crate::rpc::agent_client(channel, self.auth.clone()))
    }

    /// Runs one call within the timeout, mapping what went wrong to an agent error.
    async fn call<T>(
        &self,
        t: &ReplicaTarget<'_>,
        call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, AgentError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(agent_error(t.node_id, t.disk_id, &status)),
            Err(_) => Err(AgentError::Unreachable {
                node: t.node_id.to_string(),
                why: format!("no answer within {} s", self.timeout.as_secs_f64()),
            }),
        }
    }
}

fn pb_target(t: &ReplicaTarget<'_>) -> Option<pb::ReplicaTarget> {
    Some(pb::ReplicaTarget {
        node_id: t.node_id.to_string(),
        disk_id: t.disk_id.to_string(),
        replica_id: t.replica_id.to_string(),
        volume_id: t.volume_id.to_string(),
    })
}

#[async_trait]
impl NodeAgent for RemoteAgent {
    async fn create_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<PathBuf, AgentError> {
        let mut client = self.client(t.node_id).await?;
        let req = pb::CreateReplicaRequest {
            target: pb_target(&t),
            size,
        };
        let reply = self.call(&t, client.create_replica(req)).await?;
        Ok(PathBuf::from(reply.path))
    }

    async fn grow_replica(&self, t: ReplicaTarget<'_>, size: u64) -> Result<(), AgentError> {
        let mut client = self.client(t.node_id).await?;
        let req = pb::GrowReplicaRequest {
            target: pb_target(&t),
            size,
        };
        self.call(&t, client.grow_replica(req)).await.map(|_| ())
    }

    async fn delete_replica(&self, t: ReplicaTarget<'_>) -> Result<(), AgentError> {
        let mut client = self.client(t.node_id).await?;
        let req = pb::DeleteReplicaRequest {
            target: pb_target(&t),
        };
        self.call(&t, client.delete_replica(req)).await.map(|_| ())
    }

    async fn grow_engine(
        &self,
        node_id: &str,
        volume_id: &str,
        epoch: u64,
        size: u64,
    ) -> Result<Option<u64>, AgentError> {
        let mut client = self.client(node_id).await?;
        let req = pb::GrowEngineRequest {
            node_id: node_id.to_string(),
            volume_id: volume_id.to_string(),
            epoch,
            size,
        };
        let t = ReplicaTarget {
            node_id,
            disk_id: "",
            replica_id: "",
            volume_id,
        };
        let reply = self.call(&t, client.grow_engine(req)).await?;
        Ok((reply.size != 0).then_some(reply.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;
    use crate::replica::agent::LocalAgent;
    use crate::store::embedded::EmbeddedStore;

    fn node(id: &str, agent_address: &str) -> Node {
        Node {
            id: id.into(),
            address: String::new(),
            agent_address: agent_address.into(),
            zone: None,
            tags: vec![],
            schedulable: true,
            last_heartbeat_ms: 0,
            disks: vec![],
        }
    }

    /// A remote agent over a real agent service on a loopback port.
    #[tokio::test]
    async fn remote_calls_reach_the_node_and_errors_come_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let info = crate::replica::init_disk(&disk).unwrap();
        let local = Arc::new(LocalAgent::new(
            "n1".into(),
            HashMap::from([(info.id.clone(), disk.clone())]),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let secret = Arc::new(b"0123456789abcdef0123456789abcdef".to_vec());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::node_agent_server::NodeAgentServer::with_interceptor(
                    AgentService {
                        agent: local,
                        engines: None,
                    },
                    crate::rpc::RequireCredential::new(secret.clone(), "node agent API"),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db.redb")).unwrap());
        store
            .nodes()
            .put("n1", node("n1", &address), None)
            .await
            .unwrap();
        // A node whose address nothing listens on, and one that claims n1's agent.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_address = closed.local_addr().unwrap().to_string();
        drop(closed);
        store
            .nodes()
            .put("gone", node("gone", &closed_address), None)
            .await
            .unwrap();
        store
            .nodes()
            .put("n2", node("n2", &address), None)
            .await
            .unwrap();
        // Another cluster's agent is refused, and nothing happens on the disk.
        let stranger = RemoteAgent::new(
            store.clone(),
            Duration::from_secs(5),
            Auth::new(b"another cluster's secret"),
        );
        let disk_id: &'static str = Box::leak(info.id.clone().into_boxed_str());
        let e = stranger
            .create_replica(
                ReplicaTarget {
                    node_id: "n1",
                    disk_id,
                    replica_id: "v1-r-0",
                    volume_id: "v1",
                },
                1 << 20,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentError::Task(ref why) if why.contains("Unauthenticated") && why.contains("wrong credential")),
            "{e}"
        );
        assert!(!crate::replica::replica_dir(&disk, "v1-r-0").exists());

        let remote = RemoteAgent::new(store, Duration::from_secs(5), Auth::new(&secret));
        let target = |node_id: &'static str, disk_id: &'static str| ReplicaTarget {
            node_id,
            disk_id,
            replica_id: "v1-r-0",
            volume_id: "v1",
        };

        let path = remote
            .create_replica(target("n1", disk_id), 1 << 20)
            .await
            .unwrap();
        assert_eq!(path, crate::replica::replica_dir(&disk, "v1-r-0"));
        remote
            .grow_replica(target("n1", disk_id), 2 << 20)
            .await
            .unwrap();
        let data = std::fs::metadata(path.join(crate::replica::DATA_FILE)).unwrap();
        assert_eq!(data.len(), 2 << 20);
        remote.delete_replica(target("n1", disk_id)).await.unwrap();
        remote.delete_replica(target("n1", disk_id)).await.unwrap();
        assert!(!path.exists());

        let e = remote
            .create_replica(target("n1", "no-such-disk"), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::UnknownDisk { .. }), "{e}");
        let e = remote
            .create_replica(target("n2", disk_id), 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentError::UnknownNode(ref n) if n == "n2"),
            "{e}"
        );
        let e = remote
            .create_replica(target("gone", disk_id), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Unreachable { .. }), "{e}");
        let e = remote
            .create_replica(target("never-registered", disk_id), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::UnknownNode(_)), "{e}");
    }
}
