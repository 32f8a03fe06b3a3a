//! `palisade controller`: the store (embedded or Kubernetes), the cluster secret, CSI Identity + Controller
//! on a unix socket (for the sidecars), and the ControlPlane API on TCP (for the node agents
//! and `palisade ctl`, which must present the API credential derived from the cluster
//! secret). Replicas are created on the nodes through their agents ([`RemoteAgent`]), with
//! the same credential.
//!
//! In a Kubernetes cluster (`--kubernetes`) several replicas may run: every one serves CSI
//! and the API, while the background work (the start-up reconcile, the replica lifecycle
//! pass and the recovery controller) runs only on the one that holds the leader's Lease;
//! node health also weighs the kubelets' Nodes and Leases. The cluster secret may be a
//! Secret (`--secret-from-kubernetes`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::{info, warn};

use super::process::{self, LocalReadiness, Server};
use super::{create_state_dir, listen, ClusterError, SecretSource};
use crate::api::agent::RemoteAgent;
use crate::api::control::ControlPlaneService;
use crate::control::fence::ReplicaFencer;
use crate::control::leadership::Leadership;
use crate::control::{Controller, ControllerConfig, Fencing};
use crate::csi::v1::{controller_server::ControllerServer, identity_server::IdentityServer};
use crate::csi::{self, controller::ControllerService, identity};
use crate::k8s::connection::Connection;
use crate::k8s::election::{ElectionConfig, Elector};
use crate::k8s::node_health::KubeletWatch;
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
    /// The cluster secret: read, or created when missing (by default the file
    /// `<state_dir>/`[`SECRET_FILE`]).
    pub secret: SecretSource,
    /// Leader election and node health from Kubernetes, when running in a cluster.
    pub kubernetes: Option<KubernetesMode>,
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

/// What a controller in a Kubernetes cluster does with it.
#[derive(Debug, Clone)]
pub struct KubernetesMode {
    pub connection: Connection,
    /// The Lease (in the namespace) the replicas elect their leader with.
    pub lease_name: String,
    /// How much longer a node whose heartbeat expired stays up while its kubelet is alive
    /// (see `control::health`).
    pub vouch: Duration,
    /// Whether the recovery controller runs (on the leader).
    pub recovery: bool,
    /// Fault injection: see [`RecoveryConfig::crash_after_fence`].
    pub crash_after_recovery_fence: bool,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: ControllerProcessConfig) -> Result<(), ClusterError> {
    create_state_dir(&cfg.state_dir)?;
    let socket = csi::socket_path(&cfg.endpoint)?;
    let store: Arc<dyn Store> = store::open(cfg.store.clone()).await?;
    let secret = Arc::new(match &cfg.secret {
        SecretSource::File(path) => token::load_or_create_secret(path)?,
        SecretSource::Kubernetes { name, connection } => {
            SecretSource::kubernetes_secret(name, connection)
                .await?
                .read_or_create()
                .await?
        }
    });
    let agent = Arc::new(RemoteAgent::new(
        store.clone(),
        cfg.agent_timeout,
        Auth::new(&secret),
    ));
    let mut controller = Controller::new(
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
    });
    // On the Kubernetes store other controllers (the other replica, or a pod being
    // replaced) may write replicas too.
    if matches!(cfg.store, store::Backend::Kubernetes { .. }) {
        controller = controller.with_shared_store();
    }
    let mut elector = None;
    let mut kube_client = None;
    if let Some(k) = &cfg.kubernetes {
        let client = k.connection.client().await?;
        kube_client = Some(client.clone());
        let namespace = k.connection.namespace()?;
        controller = controller.with_node_evidence(
            Arc::new(KubeletWatch::start(client.clone())),
            millis(k.vouch),
        );
        info!(identity = %controller.identity(), lease = %k.lease_name, %namespace, "in a Kubernetes cluster: background work only while this replica holds the leader's Lease; node health also from the Nodes and their Leases");
        elector = Some(Elector::start(
            client,
            ElectionConfig::new(&namespace, &k.lease_name, controller.identity()),
        ));
    }
    let leadership = elector
        .as_ref()
        .map_or_else(Leadership::always, Elector::leadership);
    let controller = Arc::new(controller);
    // In a cluster, the recovery controller (stale VolumeAttachments, pods on down nodes)
    // runs on the leader too; it follows the leadership channel on its own.
    let recovery = match (&cfg.kubernetes, &kube_client) {
        (Some(k), Some(client)) if k.recovery => {
            let recovery = Recovery::new(
                controller.clone(),
                client.clone(),
                RecoveryConfig {
                    crash_after_fence: k.crash_after_recovery_fence,
                    ..RecoveryConfig::new(&cfg.driver_name, Some(controller.identity().to_string()))
                },
                Arc::new(NodeReady),
            );
            Some(tokio::spawn(recovery::run(
                Arc::new(recovery),
                leadership.receiver(),
            )))
        }
        (Some(_), Some(_)) => {
            info!("the recovery controller is off (--no-recovery-controller): Kubernetes alone handles dead nodes");
            None
        }
        _ => None,
    };

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
    // finish them in the background rather than hold up serving. On the leader, once per
    // term (a new leader finishes what its predecessor left).
    let reconcile = tokio::spawn(leadership.clone().each_term("start-up reconcile", {
        let controller = controller.clone();
        move || {
            let controller = controller.clone();
            async move {
                if let Err(e) = controller.reconcile().await {
                    warn!(error = %e, "reconciling interrupted operations failed; the next call on each volume retries it");
                }
            }
        }
    }));

    // The replica lifecycle of attached volumes (reuse, replacement, retirement, locality),
    // and the volumes whose records were deleted by hand. On the leader only.
    let lifecycle = tokio::spawn(leadership.clone().each_term("replica lifecycle", {
        let controller = controller.clone();
        move || {
            let controller = controller.clone();
            async move {
                loop {
                    tokio::time::sleep(LIFECYCLE_INTERVAL).await;
                    if let Err(e) = controller.reconcile_replicas().await {
                        warn!(error = %e, "the replica lifecycle pass failed; retrying");
                    }
                    if let Err(e) = controller.finish_requested_deletions().await {
                        warn!(error = %e, "the pass over volumes deleted by hand failed; retrying");
                    }
                }
            }
        }
    }));

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
    if let Some(recovery) = recovery {
        recovery.abort();
    }
    // Give the Lease up, so that another replica takes over at once.
    if let Some(elector) = elector {
        elector.step_down().await;
    }
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    result.map_err(ClusterError::from)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
