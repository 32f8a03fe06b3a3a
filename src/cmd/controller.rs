//! `palisade controller`: the store (embedded or Kubernetes), the cluster secret, CSI Identity + Controller
//! on a unix socket (for the sidecars), and the ControlPlane API on TCP (for the node agents
//! and `palisade ctl`, which must present the API credential derived from the cluster
//! secret). Replicas are created on the nodes through their agents ([`RemoteAgent`]), with
//! the same credential.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::{info, warn};

use super::process::{self, LocalReadiness, Server};
use super::{create_state_dir, listen, ClusterError};
use crate::api::agent::RemoteAgent;
use crate::api::control::ControlPlaneService;
use crate::control::fence::ReplicaFencer;
use crate::control::{Controller, ControllerConfig, Fencing};
use crate::csi::v1::{controller_server::ControllerServer, identity_server::IdentityServer};
use crate::csi::{self, controller::ControllerService, identity};
use crate::k8s::recovery::{self, NodeReady, Recovery, RecoveryConfig};
use crate::replica::token;
use crate::rpc::v1::control_plane_server::ControlPlaneServer;
use crate::rpc::{Auth, RequireCredential};
use crate::store::{self, Store};

/// How long fencing waits for one replica before counting it unreachable.
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How often the controller looks for volumes to heal, grow, shrink or localise.
const LIFECYCLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The file in the state directory that holds the cluster secret.
pub const SECRET_FILE: &str = "cluster.secret";
/// The file in the state directory that holds the embedded store.
pub const STORE_FILE: &str = "palisade.redb";

/// Everything `palisade controller` needs.
#[derive(Debug, Clone)]
pub struct ControllerProcessConfig {
    /// Where the ControlPlane API listens.
    pub listen: SocketAddr,
    /// The CSI endpoint (`unix:///path`).
    pub endpoint: String,
    /// Where the embedded store (and, by default, the cluster secret) lives.
    pub state_dir: PathBuf,
    /// Where the cluster state lives.
    pub store: store::Backend,
    /// The cluster secret: read, or created when missing (by default
    /// `<state_dir>/`[`SECRET_FILE`]).
    pub secret_file: PathBuf,
    pub driver_name: String,
    /// A node whose last heartbeat is older than this is down.
    pub heartbeat_timeout: Duration,
    /// The pods' termination grace period the `wait` recovery policy waits out.
    pub termination_grace: Duration,
    /// How long a call to a node's agent may take.
    pub agent_timeout: Duration,
    /// The engines' attachment lease.
    pub lease: Duration,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: ControllerProcessConfig) -> Result<(), ClusterError> {
    create_state_dir(&cfg.state_dir)?;
    let socket = csi::socket_path(&cfg.endpoint)?;
    let store: Arc<dyn Store> = store::open(cfg.store.clone()).await?;
    let secret = Arc::new(token::load_or_create_secret(&cfg.secret_file)?);
    let agent = Arc::new(RemoteAgent::new(
        store.clone(),
        cfg.agent_timeout,
        Auth::new(&secret),
    ));
    let controller = Arc::new(
        Controller::new(
            store.clone(),
            agent,
            ControllerConfig {
                heartbeat_timeout_ms: millis(cfg.heartbeat_timeout),
                termination_grace_ms: millis(cfg.termination_grace),
            },
        )
        .with_fencing(Fencing {
            secret: Arc::clone(&secret),
            fencer: Arc::new(ReplicaFencer {
                timeout: FENCE_TIMEOUT,
            }),
            lease_ms: millis(cfg.lease),
        }),
    );

    let api_listener = listen("control plane API", cfg.listen).await?;
    let api_address = api_listener
        .local_addr()
        .map_err(|source| ClusterError::Listen {
            what: "control plane API",
            address: cfg.listen,
            source,
        })?;
    let csi_listener = csi::bind_socket(&socket)?;

    // Interrupted creations and deletions need the nodes' agents, which may not be back yet:
    // finish them in the background rather than hold up serving.
    let reconcile = {
        let controller = controller.clone();
        tokio::spawn(async move {
            if let Err(e) = controller.reconcile().await {
                warn!(error = %e, "reconciling interrupted operations failed; the next call on each volume retries it");
            }
        })
    };

    // In Kubernetes, the recovery controller: what Palisade does when a node dies, where
    // Kubernetes alone is stuck (k8s::recovery). The same client configuration as the store.
    let recovery = match &cfg.store {
        store::Backend::Kubernetes { kubeconfig, .. } => {
            let client = store::kubernetes::config::client(kubeconfig.as_deref())
                .await
                .map_err(|e| {
                    ClusterError::from(store::StoreError::from(
                        store::kubernetes::KubernetesError::from(e),
                    ))
                })?;
            let recovery = Arc::new(Recovery::new(
                controller.clone(),
                client,
                RecoveryConfig::new(&cfg.driver_name, instance_name()),
                Arc::new(NodeReady),
            ));
            // Always leading for now: leader election hands this receiver over.
            let (leading, leader) = watch::channel(true);
            Some((leading, tokio::spawn(recovery::run(recovery, leader))))
        }
        store::Backend::Embedded { .. } => None,
    };

    // The replica lifecycle of attached volumes: reuse, replacement, retirement, locality.
    let lifecycle = {
        let controller = controller.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LIFECYCLE_INTERVAL).await;
                if let Err(e) = controller.reconcile_replicas().await {
                    warn!(error = %e, "the replica lifecycle pass failed; retrying");
                }
                if let Err(e) = controller.finish_requested_deletions().await {
                    warn!(error = %e, "the pass over volumes deleted by hand failed; retrying");
                }
            }
        })
    };

    info!(endpoint = %cfg.endpoint, api = %api_address, heartbeat_timeout_s = cfg.heartbeat_timeout.as_secs_f64(), "serving CSI identity and controller, and the control plane API");
    let readiness = Arc::new(LocalReadiness {
        store: Some(store.clone()),
        disks: Vec::new(),
    });
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::IdentityService {
            driver_name: cfg.driver_name.clone(),
            readiness,
        }))
        .add_service(ControllerServer::new(ControllerService {
            controller: controller.clone(),
        }));
    let api =
        tonic::transport::Server::builder().add_service(ControlPlaneServer::with_interceptor(
            ControlPlaneService {
                controller: controller.clone(),
            },
            RequireCredential::new(secret, "control plane API"),
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
                "control plane API",
                api.serve_with_incoming_shutdown(
                    TcpListenerStream::new(api_listener),
                    shutdown.wait(),
                ),
            ),
        ]
    })
    .await;
    reconcile.abort();
    lifecycle.abort();
    if let Some((leading, task)) = recovery {
        drop(leading);
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    result.map_err(ClusterError::from)
}

/// Who the recovery controller's Events say reported them: the pod's name (`POD_NAME`, from
/// the downward API, else `HOSTNAME`, which is the pod's name in a pod), else the host name.
fn instance_name() -> Option<String> {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok()),
        )
        .find(|n| !n.is_empty())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
