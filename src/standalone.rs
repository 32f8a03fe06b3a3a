//! `palisade standalone`: controller and one node in one process, with the embedded store,
//! serving Identity, Controller and Node on one unix socket.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::agent::LocalAgent;
use crate::controller::{Controller, ControllerConfig, MAX_VOLUMES_PER_NODE};
use crate::csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use crate::csi_server::{self, controller::ControllerService, identity, node::NodeRpc};
use crate::model::{now_ms, Disk, Node};
use crate::node::{NodeConfig, NodeService};
use crate::replica;
use crate::store::{embedded::EmbeddedStore, Store, SETTINGS_KEY};

/// How long a shutdown waits for connected clients before it stops regardless.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A disk given on the command line: `PATH` or `PATH:tag1,tag2`.
#[derive(Debug, Clone)]
pub struct DiskArg {
    pub path: PathBuf,
    pub tags: Vec<String>,
}

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, tags) = match s.split_once(':') {
            Some((p, t)) => (
                p,
                t.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            None => (s, Vec::new()),
        };
        if !path.starts_with('/') {
            return Err(format!("--disk {s:?}: the path must be absolute"));
        }
        Ok(DiskArg {
            path: PathBuf::from(path),
            tags,
        })
    }
}

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
    Socket(#[from] csi_server::SocketError),
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
    #[error("serving gRPC failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("installing signal handlers failed: {0}")]
    Signal(#[source] std::io::Error),
}

/// The node's own report: its disks as they are now.
fn node_report(
    cfg: &StandaloneConfig,
    disks: &[(String, DiskArg)],
) -> Result<Node, StandaloneError> {
    let mut out = Vec::new();
    for (_, d) in disks {
        let info = replica::init_disk(&d.path)?;
        out.push(Disk {
            id: info.id,
            path: d.path.clone(),
            tags: d.tags.clone(),
            schedulable: true,
            storage_maximum: info.storage_maximum,
            storage_available: info.storage_available,
            storage_reserved: 0,
        });
    }
    Ok(Node {
        id: cfg.node_id.clone(),
        address: String::new(),
        zone: cfg.zone.clone(),
        tags: cfg.node_tags.clone(),
        schedulable: true,
        last_heartbeat_ms: now_ms(),
        disks: out,
    })
}

struct StandaloneReadiness {
    store: Arc<dyn Store>,
    disks: Vec<PathBuf>,
}

#[tonic::async_trait]
impl identity::Readiness for StandaloneReadiness {
    async fn ready(&self) -> Result<(), String> {
        self.store
            .settings()
            .get(SETTINGS_KEY)
            .await
            .map_err(|e| format!("store: {e}"))?;
        for d in &self.disks {
            nix::sys::statvfs::statvfs(d).map_err(|e| format!("disk {d:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: StandaloneConfig) -> Result<(), StandaloneError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StandaloneError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let socket = csi_server::socket_path(&cfg.endpoint)?;
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&cfg.state_dir.join("palisade.redb"))?);

    let mut disks = Vec::new();
    for d in &cfg.disks {
        let info = replica::init_disk(&d.path)?;
        info!(disk = %info.id, path = %d.path.display(), "disk ready");
        disks.push((info.id, d.clone()));
    }
    let disk_map: HashMap<String, PathBuf> = disks
        .iter()
        .map(|(id, d)| (id.clone(), d.path.clone()))
        .collect();
    let agent = Arc::new(LocalAgent::new(cfg.node_id.clone(), disk_map));
    let controller = Arc::new(Controller::new(
        store.clone(),
        agent,
        ControllerConfig::default(),
    ));
    controller.heartbeat(node_report(&cfg, &disks)?).await?;
    controller.reconcile().await?;
    report_orphans(&controller, &disks).await;

    let node = Arc::new(NodeService::new(NodeConfig {
        node_id: cfg.node_id.clone(),
        zone: cfg.zone.clone(),
        disks: disks
            .iter()
            .map(|(id, d)| (id.clone(), d.path.clone()))
            .collect(),
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

    let listener = csi_server::bind_socket(&socket)?;
    info!(endpoint = %cfg.endpoint, node = %cfg.node_id, "serving CSI identity, controller and node");
    let readiness = Arc::new(StandaloneReadiness {
        store: store.clone(),
        disks: cfg.disks.iter().map(|d| d.path.clone()).collect(),
    });
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let serve = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService {
            driver_name: cfg.driver_name.clone(),
            controller: true,
            readiness,
        }))
        .add_service(ControllerServer::new(ControllerService {
            controller: controller.clone(),
        }))
        .add_service(NodeServer::new(NodeRpc { node }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown_signal().await;
            signalled.notify_one();
        });
    // Graceful shutdown waits for connected clients to go; a wedged one must not keep the
    // driver alive until SIGKILL.
    let result = tokio::select! {
        r = serve => r,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!("clients still connected {} s after the signal; stopping anyway", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    heartbeat.abort();
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    result.map_err(StandaloneError::from)
}

/// Replica directories on our disks that the store does not know: reported, never deleted
/// automatically (they may be another installation's data).
async fn report_orphans(controller: &Controller, disks: &[(String, DiskArg)]) {
    let known = match controller.store().replicas().list().await {
        Ok(list) => list
            .into_iter()
            .map(|r| r.value.id.clone())
            .collect::<std::collections::HashSet<_>>(),
        Err(e) => {
            warn!(error = %e, "listing replicas for the orphan check failed");
            return;
        }
    };
    for (_, d) in disks {
        match replica::list(&d.path) {
            Ok(found) => {
                for r in found.into_iter().filter(|r| !known.contains(&r.id)) {
                    warn!(replica = %r.id, volume = %r.volume_id, dir = %r.dir.display(), "orphaned replica directory: no volume in the store owns it; left in place");
                }
            }
            Err(e) => warn!(disk = %d.path.display(), error = %e, "listing replicas failed"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("could not install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
