//! `palisade standalone`: controller and one node in one process, with the embedded store,
//! serving Identity, Controller and Node on one unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::cmd::process::{self, LocalReadiness, ReadyDisk, ServeError, Server};
use crate::control::{Controller, ControllerConfig, MAX_VOLUMES_PER_NODE};
use crate::csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use crate::csi::{self, controller::ControllerService, identity, node::NodeRpc};
use crate::model::{now_ms, Node};
use crate::node::{NodeConfig, NodeService};
use crate::replica::agent::LocalAgent;
use crate::store::{embedded::EmbeddedStore, Store};

pub use crate::cmd::process::DiskArg;

/// Everything `palisade standalone` needs.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    pub endpoint: String,
    pub state_dir: PathBuf,
    pub disks: Vec<DiskArg>,
    pub node_id: String,
    pub zone: Option<String>,
    pub node_tags: Vec<String>,
    pub driver_name: String,
    pub heartbeat_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Socket(#[from] csi::SocketError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error("create state directory {path:?}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The node's own report: its disks as they are now.
fn node_report(cfg: &StandaloneConfig, disks: &[ReadyDisk]) -> Result<Node, StandaloneError> {
    Ok(Node {
        id: cfg.node_id.clone(),
        address: String::new(),
        agent_address: String::new(),
        zone: cfg.zone.clone(),
        tags: cfg.node_tags.clone(),
        schedulable: true,
        last_heartbeat_ms: now_ms(),
        disks: process::read_disks(disks)?,
    })
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: StandaloneConfig) -> Result<(), StandaloneError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StandaloneError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let socket = csi::socket_path(&cfg.endpoint)?;
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&cfg.state_dir.join("palisade.redb"))?);

    let disks = process::init_disks(&cfg.disks)?;
    let agent = Arc::new(LocalAgent::new(
        cfg.node_id.clone(),
        process::disk_dirs(&disks).into_iter().collect(),
    ));
    let controller = Arc::new(Controller::new(
        store.clone(),
        agent,
        ControllerConfig::default(),
    ));
    controller.heartbeat(node_report(&cfg, &disks)?).await?;
    controller.reconcile().await?;
    controller
        .report_node_replicas(&cfg.node_id, &process::replica_ids(&disks))
        .await;

    let node = Arc::new(NodeService::new(NodeConfig {
        node_id: cfg.node_id.clone(),
        zone: cfg.zone.clone(),
        disks: process::disk_dirs(&disks),
        max_volumes: MAX_VOLUMES_PER_NODE,
    }));
    node.reconcile().await?;

    let heartbeat = {
        let (controller, cfg, disks) = (controller.clone(), cfg.clone(), disks.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(cfg.heartbeat_interval).await;
                let report = match node_report(&cfg, &disks) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "reading the disks for the heartbeat failed");
                        continue;
                    }
                };
                if let Err(e) = controller.heartbeat(report).await {
                    warn!(error = %e, "heartbeat failed");
                }
            }
        })
    };

    let listener = csi::bind_socket(&socket)?;
    info!(endpoint = %cfg.endpoint, node = %cfg.node_id, "serving CSI identity, controller and node");
    let readiness = Arc::new(LocalReadiness {
        store: Some(store.clone()),
        disks: cfg.disks.iter().map(|d| d.path.clone()).collect(),
    });
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService {
            driver_name: cfg.driver_name.clone(),
            readiness,
        }))
        .add_service(ControllerServer::new(ControllerService {
            controller: controller.clone(),
        }))
        .add_service(NodeServer::new(NodeRpc { node }));
    let result = process::serve_until_signal(|shutdown| {
        vec![Server::new(
            "CSI",
            csi.serve_with_incoming_shutdown(
                crate::csi::uds_authority::incoming(UnixListenerStream::new(listener)),
                shutdown.wait(),
            ),
        )]
    })
    .await;
    heartbeat.abort();
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    result.map_err(StandaloneError::from)
}
