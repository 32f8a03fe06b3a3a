//! `palisade node`: one node of a cluster. It registers its disks with the controller and
//! heartbeats it; serves its agent (create, grow, delete replicas on its disks) on TCP for
//! the controller; serves CSI Identity + Node on a unix socket; and runs the replica server
//! for the replicas on its disks. The cluster secret comes from a file (`--secret-file`) or
//! a Kubernetes Secret (`--secret-from-kubernetes`, waited for until the controller created
//! it), never from Palisade's wire: the replica server verifies session tokens with it, and
//! the calls to and from the controller carry the API credential derived from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::Code;
use tracing::{debug, info, warn};

use super::process::{self, DiskArg, LocalReadiness, ReadyDisk, Server};
use super::{create_state_dir, listen, ClusterError, SecretSource};
use crate::api::agent::AgentService;
use crate::control::MAX_VOLUMES_PER_NODE;
use crate::csi::v1::{identity_server::IdentityServer, node_server::NodeServer};
use crate::csi::{self, identity, node::NodeRpc};
use crate::node::engines::ClusterLink;
use crate::node::{NodeConfig, NodeService};
use crate::replica::agent::LocalAgent;
use crate::replica::server::{ReplicaServer, ServerError};
use crate::replica::token;
use crate::rpc::v1 as pb;
use crate::rpc::v1::node_agent_server::NodeAgentServer;
use crate::rpc::{Auth, ControlClient, RequireCredential};

/// How often a node looks for a cluster secret Secret that does not exist yet.
const SECRET_POLL: Duration = Duration::from_secs(2);

/// Everything `palisade node` needs.
#[derive(Debug, Clone)]
pub struct NodeProcessConfig {
    /// The controller's ControlPlane address (`http://host:port`).
    pub controller: String,
    pub node_id: String,
    /// The CSI endpoint (`unix:///path`).
    pub endpoint: String,
    pub state_dir: PathBuf,
    /// The cluster secret, the controller's (read once, at start).
    pub secret: SecretSource,
    pub disks: Vec<DiskArg>,
    pub zone: Option<String>,
    pub node_tags: Vec<String>,
    /// Where the replica server listens.
    pub replica_listen: SocketAddr,
    /// Where the node agent API listens.
    pub agent_listen: SocketAddr,
    /// The host other processes reach this node at, when it listens on every address.
    pub advertise_host: Option<String>,
    pub driver_name: String,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// How long a call to the controller may take.
    pub controller_timeout: Duration,
    /// The engines' tunables (lease length among them).
    pub engine: crate::engine::EngineConfig,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: NodeProcessConfig) -> Result<(), ClusterError> {
    let secret = Arc::new(match &cfg.secret {
        SecretSource::File(path) => {
            token::read_secret_file(path).map_err(|source| ClusterError::SecretFile {
                path: path.clone(),
                source,
            })?
        }
        SecretSource::Kubernetes { name, connection } => {
            SecretSource::kubernetes_secret(name, connection)
                .await?
                .wait(SECRET_POLL)
                .await?
        }
    });
    let auth = Auth::new(&secret);
    create_state_dir(&cfg.state_dir)?;
    let socket = csi::socket_path(&cfg.endpoint)?;
    let disks = process::init_disks(&cfg.disks)?;
    let agent = Arc::new(LocalAgent::new(
        cfg.node_id.clone(),
        process::disk_dirs(&disks).into_iter().collect(),
    ));
    let controller =
        crate::rpc::channel(&cfg.controller, cfg.controller_timeout).map_err(|source| {
            ClusterError::ControllerAddress {
                address: cfg.controller.clone(),
                source,
            }
        })?;
    let replica_server = ReplicaServer::bind(
        cfg.replica_listen,
        disks.iter().map(|d| d.arg.path.clone()).collect(),
        secret.to_vec(),
    )
    .await
    .map_err(|e| match e {
        ServerError::Bind(source) => ClusterError::Listen {
            what: "replica server",
            address: cfg.replica_listen,
            source,
        },
        e => ClusterError::from(e),
    })?;
    let engines = ClusterLink::new(
        crate::rpc::control_client(controller.clone(), auth.clone()),
        cfg.node_id.clone(),
        cfg.state_dir.clone(),
        cfg.engine.clone(),
    )
    .with_local_replicas(replica_server.local());
    let node = Arc::new(
        NodeService::new(NodeConfig {
            node_id: cfg.node_id.clone(),
            zone: cfg.zone.clone(),
            disks: process::disk_dirs(&disks),
            max_volumes: MAX_VOLUMES_PER_NODE,
        })
        .with_cluster(engines.clone()),
    );
    node.reconcile().await?;

    let agent_listener = listen("node agent API", cfg.agent_listen).await?;
    let agent_bound = agent_listener
        .local_addr()
        .map_err(|source| ClusterError::Listen {
            what: "node agent API",
            address: cfg.agent_listen,
            source,
        })?;
    let agent_address = advertised(agent_bound, cfg.advertise_host.as_deref(), "--agent-listen")?;
    let replica_bound = replica_server
        .local_addr()
        .map_err(|source| ClusterError::Listen {
            what: "replica server",
            address: cfg.replica_listen,
            source,
        })?;
    let replica_address = advertised(
        replica_bound,
        cfg.advertise_host.as_deref(),
        "--replica-listen",
    )?;
    let csi_listener = csi::bind_socket(&socket)?;

    let membership = tokio::spawn(
        Membership {
            client: crate::rpc::control_client(controller, auth),
            cfg: cfg.clone(),
            disks: disks.clone(),
            agent_address: agent_address.clone(),
            replica_address: replica_address.clone(),
        }
        .run(),
    );

    info!(endpoint = %cfg.endpoint, node = %cfg.node_id, agent = %agent_address, replicas = %replica_address, controller = %cfg.controller, "serving CSI identity and node, the node agent API and the replica server");
    let readiness = Arc::new(LocalReadiness {
        store: None,
        disks: cfg.disks.iter().map(|d| d.path.clone()).collect(),
    });
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService {
            driver_name: cfg.driver_name.clone(),
            readiness,
        }))
        .add_service(NodeServer::new(NodeRpc { node }));
    let agent_api =
        tonic::transport::Server::builder().add_service(NodeAgentServer::with_interceptor(
            AgentService {
                agent,
                engines: Some(engines),
            },
            RequireCredential::new(secret, "node agent API"),
        ));
    let result = process::serve_until_signal(|shutdown| {
        vec![
            Server::new(
                "CSI",
                csi.serve_with_incoming_shutdown(
                    crate::csi::uds_authority::incoming(UnixListenerStream::new(csi_listener)),
                    shutdown.clone().wait(),
                ),
            ),
            Server::new(
                "node agent API",
                agent_api.serve_with_incoming_shutdown(
                    TcpListenerStream::new(agent_listener),
                    shutdown.clone().wait(),
                ),
            ),
            Server::new("replica server", async move {
                replica_server.serve(shutdown.wait()).await;
                Ok::<(), ServerError>(())
            }),
        ]
    })
    .await;
    membership.abort();
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    result.map_err(ClusterError::from)
}

/// The address other processes reach a listener bound at `bound` at: `bound` itself, or
/// the advertised host with its port. A listener on every address needs the host.
fn advertised(bound: SocketAddr, host: Option<&str>, flag: &str) -> Result<String, ClusterError> {
    match host {
        Some(h) if h.contains(':') && !h.starts_with('[') => Ok(format!("[{h}]:{}", bound.port())),
        Some(h) => Ok(format!("{h}:{}", bound.port())),
        None if bound.ip().is_unspecified() => Err(ClusterError::Address(format!(
            "{flag} {bound} listens on every address; give --advertise-host with the address the controller and the other nodes reach this node at"
        ))),
        None => Ok(bound.to_string()),
    }
}

/// The node's membership of the cluster: registers, then heartbeats every interval;
/// registers again when the controller no longer knows it.
struct Membership {
    client: ControlClient,
    cfg: NodeProcessConfig,
    disks: Vec<ReadyDisk>,
    agent_address: String,
    replica_address: String,
}

impl Membership {
    async fn run(mut self) {
        let mut registered = false;
        // Whether the last exchange worked: failures are logged when they start and end,
        // not at every heartbeat.
        let mut answering = true;
        loop {
            match self.exchange(&mut registered).await {
                Ok(()) if !answering => {
                    info!(controller = %self.cfg.controller, "the controller answers again");
                    answering = true;
                }
                Ok(()) => {}
                Err(e) if answering => {
                    warn!(controller = %self.cfg.controller, error = %e, "the exchange with the controller failed; retrying every heartbeat");
                    answering = false;
                }
                Err(e) => debug!(error = %e, "the exchange with the controller failed again"),
            }
            tokio::time::sleep(self.cfg.heartbeat_interval).await;
        }
    }

    /// One heartbeat, or a registration when not registered (or no longer).
    async fn exchange(&mut self, registered: &mut bool) -> Result<(), String> {
        let disks = process::read_disks(&self.disks)
            .map_err(|e| format!("reading the disks for the report failed: {e}"))?;
        let report = pb::NodeReport {
            node_id: self.cfg.node_id.clone(),
            zone: self.cfg.zone.clone().unwrap_or_default(),
            tags: self.cfg.node_tags.clone(),
            replica_address: self.replica_address.clone(),
            agent_address: self.agent_address.clone(),
            disks: disks
                .into_iter()
                .map(|d| pb::DiskReport {
                    id: d.id,
                    path: d.path.display().to_string(),
                    tags: d.tags,
                    storage_maximum: d.storage_maximum,
                    storage_available: d.storage_available,
                })
                .collect(),
        };
        if *registered {
            let request = pb::HeartbeatRequest {
                node: Some(report.clone()),
            };
            match self.client.heartbeat(request).await {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::NotFound => {
                    warn!(reason = %s.message(), "the controller does not know this node any more; registering again");
                    *registered = false;
                }
                Err(s) => return Err(format!("heartbeat: {}", self.describe(&s))),
            }
        }
        let request = pb::RegisterNodeRequest {
            node: Some(report),
            replica_ids: process::replica_ids(&self.disks),
        };
        self.client
            .register_node(request)
            .await
            .map_err(|s| format!("registration: {}", self.describe(&s)))?;
        info!(controller = %self.cfg.controller, node = %self.cfg.node_id, "registered with the controller");
        *registered = true;
        Ok(())
    }

    /// A refused call for the log, with a hint when the credential was refused.
    fn describe(&self, s: &tonic::Status) -> String {
        let described = crate::rpc::describe(s);
        if s.code() == Code::Unauthenticated {
            let source = match &self.cfg.secret {
                SecretSource::File(path) => format!("--secret-file {}", path.display()),
                SecretSource::Kubernetes { name, .. } => format!("the Secret {name}"),
            };
            format!("{described} (is {source} this controller's cluster secret?)")
        } else {
            described
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_addresses() {
        let any: SocketAddr = "0.0.0.0:9502".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9502".parse().unwrap();
        assert_eq!(advertised(local, None, "--x").unwrap(), "127.0.0.1:9502");
        assert_eq!(
            advertised(any, Some("10.0.0.7"), "--x").unwrap(),
            "10.0.0.7:9502"
        );
        assert_eq!(
            advertised(any, Some("fd00::7"), "--x").unwrap(),
            "[fd00::7]:9502"
        );
        let e = advertised(any, None, "--replica-listen").unwrap_err();
        assert!(e.to_string().contains("--advertise-host"), "{e}");
    }
}
