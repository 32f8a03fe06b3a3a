//! The `palisade` binary: one subcommand per process role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use palisade::cmd::controller::{ControllerProcessConfig, KubernetesMode};
use palisade::cmd::node::NodeProcessConfig;
use palisade::cmd::standalone::{self, DiskArg, StandaloneConfig};
use palisade::store::Backend;

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Replicated block volumes from local disks, with fencing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Controller and one node in one process, embedded store, one CSI socket.
    Standalone {
        /// CSI endpoint (default: unix://<state-dir>/csi.sock).
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: Option<String>,
        /// Where the store and (by default) the disk live.
        #[arg(long, default_value = "/var/lib/palisade")]
        state_dir: PathBuf,
        /// A disk for replicas: PATH or PATH:tag1,tag2. Repeat for several (default: <state-dir>/disk0).
        #[arg(long = "disk")]
        disks: Vec<DiskArg>,
        /// This node's id (default: the host name).
        #[arg(long, env = "NODE_ID")]
        node_id: Option<String>,
        /// This node's zone, reported as topology.kubernetes.io/zone.
        #[arg(long)]
        zone: Option<String>,
        /// Node tags for nodeSelector, comma-separated.
        #[arg(long, value_delimiter = ',')]
        node_tags: Vec<String>,
        /// The CSI driver name.
        #[arg(long, default_value = "driver.palisade.io")]
        driver_name: String,
        /// Seconds between the node's heartbeats.
        #[arg(long, default_value_t = 2)]
        heartbeat_seconds: u64,
    },
    /// The cluster's controller: CSI Identity + Controller on a unix socket, the store
    /// (embedded, or custom resources in Kubernetes), and the control plane API (for nodes
    /// and `palisade ctl`) on TCP.
    Controller {
        /// Where the control plane API listens (host:port).
        #[arg(long, default_value = "127.0.0.1:9500")]
        listen: SocketAddr,
        /// CSI endpoint (default: unix://<state-dir>/csi.sock).
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: Option<String>,
        /// Where the embedded store and (by default) the cluster secret live.
        #[arg(long, default_value = "/var/lib/palisade")]
        state_dir: PathBuf,
        /// Where the cluster state lives: `embedded` (a file in the state directory) or
        /// `kubernetes` (palisade.io custom resources; apply deploy/cluster/crds.yaml first).
        #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
        store: StoreKind,
        /// The cluster secret, created (32 random bytes, mode 0600) when missing. Nodes and
        /// `palisade ctl` need a copy of it. Default: <state-dir>/cluster.secret.
        #[arg(long, env = "PALISADE_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        /// The CSI driver name.
        #[arg(long, default_value = "driver.palisade.io")]
        driver_name: String,
        /// A node whose last heartbeat is older than this is down.
        #[arg(long, default_value_t = 10)]
        heartbeat_timeout_seconds: u64,
        /// The pods' termination grace period, which the `wait` recovery policy waits out.
        #[arg(long, default_value_t = 30)]
        termination_grace_seconds: u64,
        /// How long a call to a node's agent may take.
        #[arg(long, default_value_t = 10)]
        agent_timeout_seconds: u64,
        /// The engines' attachment lease: an engine that cannot renew it for this long stops
        /// serving I/O, and a new attachment of its volume waits until it has lapsed.
        #[arg(long, default_value_t = 9)]
        lease_seconds: u64,
        #[command(flatten)]
        kube: palisade::cmd::KubernetesArgs,
        /// Run as one of the controller replicas of a Kubernetes cluster: the background work
        /// (start-up reconcile, replica lifecycle, and the recovery controller, which only
        /// runs in a cluster) runs only on the replica that holds the Lease
        /// --leader-election-lease in the namespace, and node health also weighs each node's
        /// Kubernetes Node (Ready) and kubelet Lease.
        #[arg(long, env = "PALISADE_KUBERNETES")]
        kubernetes: bool,
        /// The Lease the controller replicas elect their leader with (with --kubernetes).
        #[arg(long, default_value = "palisade-controller")]
        leader_election_lease: String,
        /// How much longer a node whose heartbeat expired stays up while its kubelet is alive
        /// (Node Ready, Lease fresh), for a Palisade process that restarts (with
        /// --kubernetes); 0: the heartbeat alone decides.
        #[arg(long, default_value_t = 10)]
        kubelet_vouch_seconds: u64,
        /// With --kubernetes, do not run the recovery controller: Kubernetes alone handles a
        /// dead node's VolumeAttachments and pods, as with any CSI driver (for comparison).
        #[arg(long)]
        no_recovery_controller: bool,
        /// Fault injection for the tests: exit right after a recovery pass fences an
        /// attachment, before it deletes anything.
        #[arg(long, hide = true)]
        crash_after_recovery_fence: bool,
    },
    /// One node of a cluster: CSI Identity + Node on a unix socket, the node agent API and the
    /// replica server on TCP; registers and heartbeats with the controller.
    Node {
        /// The controller's control plane API.
        #[arg(
            long,
            env = "PALISADE_CONTROLLER",
            default_value = "http://127.0.0.1:9500"
        )]
        controller: String,
        /// This node's id (default: the host name).
        #[arg(long, env = "NODE_ID")]
        node_id: Option<String>,
        /// CSI endpoint (default: unix://<state-dir>/csi.sock).
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: Option<String>,
        /// The node's own state (and, by default, its socket and disk).
        #[arg(long, default_value = "/var/lib/palisade")]
        state_dir: PathBuf,
        /// A copy of the controller's cluster secret (its <state-dir>/cluster.secret), read at
        /// start: the replica server checks session tokens with it, and the calls to and
        /// from the controller are authenticated with a key derived from it.
        #[arg(long, env = "PALISADE_SECRET_FILE", default_value = palisade::cmd::DEFAULT_SECRET_FILE)]
        secret_file: PathBuf,
        /// A disk for replicas: PATH or PATH:tag1,tag2. Repeat for several (default: <state-dir>/disk0).
        #[arg(long = "disk")]
        disks: Vec<DiskArg>,
        /// Where the replica server listens (host:port).
        #[arg(long, default_value = "127.0.0.1:9502")]
        replica_listen: SocketAddr,
        /// Where the node agent API listens (host:port).
        #[arg(long, default_value = "127.0.0.1:9501")]
        agent_listen: SocketAddr,
        /// The host the controller and other nodes reach this node at (needed when a listen
        /// address is 0.0.0.0 or ::).
        #[arg(long, env = "NODE_IP")]
        advertise_host: Option<String>,
        /// This node's zone, reported as topology.kubernetes.io/zone.
        #[arg(long)]
        zone: Option<String>,
        /// Node tags for nodeSelector, comma-separated.
        #[arg(long, value_delimiter = ',')]
        node_tags: Vec<String>,
        /// The CSI driver name.
        #[arg(long, default_value = "driver.palisade.io")]
        driver_name: String,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 2)]
        heartbeat_seconds: u64,
        /// The longest attachment lease an engine keeps (the controller's `--lease-seconds`
        /// is used when shorter): an engine that cannot renew it stops serving I/O.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
        #[command(flatten)]
        kube: palisade::cmd::KubernetesArgs,
    },
    /// The operator's view and levers: nodes, volumes, settings, force-detach.
    Ctl(palisade::cmd::ctl::CtlArgs),
    /// Prints the CustomResourceDefinitions of the Kubernetes store (YAML, for kubectl apply).
    Crds,
}

/// The `--store` of `palisade controller`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Kubernetes,
}

/// The disks to use: those given, else `<state-dir>/disk0`.
fn disks_or_default(disks: Vec<DiskArg>, state_dir: &std::path::Path) -> Vec<DiskArg> {
    if disks.is_empty() {
        vec![DiskArg {
            path: state_dir.join("disk0"),
            tags: Vec::new(),
        }]
    } else {
        disks
    }
}

/// The CSI endpoint given, else the socket in the state directory.
fn endpoint_or_default(endpoint: Option<String>, state_dir: &std::path::Path) -> String {
    endpoint.unwrap_or_else(|| format!("unix://{}", state_dir.join("csi.sock").display()))
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node-1".to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade: starting the runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Standalone {
            endpoint,
            state_dir,
            disks,
            node_id,
            zone,
            node_tags,
            driver_name,
            heartbeat_seconds,
        } => {
            let disks = disks_or_default(disks, &state_dir);
            let endpoint = endpoint_or_default(endpoint, &state_dir);
            let cfg = StandaloneConfig {
                endpoint,
                state_dir,
                disks,
                node_id: node_id.unwrap_or_else(host_name),
                zone,
                node_tags,
                driver_name,
                heartbeat_interval: Duration::from_secs(heartbeat_seconds.max(1)),
            };
            runtime
                .block_on(standalone::run(cfg))
                .map_err(|e| e.to_string())
        }
        Command::Controller {
            listen,
            endpoint,
            state_dir,
            store,
            secret_file,
            driver_name,
            heartbeat_timeout_seconds,
            termination_grace_seconds,
            agent_timeout_seconds,
            lease_seconds,
            kube,
            kubernetes,
            leader_election_lease,
            kubelet_vouch_seconds,
            no_recovery_controller,
            crash_after_recovery_fence,
        } => {
            let store = match store {
                StoreKind::Embedded => Backend::Embedded {
                    path: state_dir.join(palisade::cmd::controller::STORE_FILE),
                },
                StoreKind::Kubernetes => Backend::Kubernetes {
                    kubeconfig: kube.kubeconfig.clone(),
                    namespace: kube.namespace.clone(),
                },
            };
            let cfg = ControllerProcessConfig {
                store,
                listen,
                endpoint: endpoint_or_default(endpoint, &state_dir),
                secret: kube.secret_source(
                    secret_file
                        .unwrap_or_else(|| state_dir.join(palisade::cmd::controller::SECRET_FILE)),
                ),
                kubernetes: kubernetes.then(|| KubernetesMode {
                    connection: kube.connection(),
                    lease_name: leader_election_lease,
                    vouch: Duration::from_secs(kubelet_vouch_seconds),
                    recovery: !no_recovery_controller,
                    crash_after_recovery_fence,
                }),
                state_dir,
                driver_name,
                heartbeat_timeout: Duration::from_secs(heartbeat_timeout_seconds.max(1)),
                termination_grace: Duration::from_secs(termination_grace_seconds),
                agent_timeout: Duration::from_secs(agent_timeout_seconds.max(1)),
                lease: Duration::from_secs(lease_seconds.max(1)),
            };
            runtime
                .block_on(palisade::cmd::controller::run(cfg))
                .map_err(|e| e.to_string())
        }
        Command::Node {
            controller,
            node_id,
            endpoint,
            state_dir,
            secret_file,
            disks,
            replica_listen,
            agent_listen,
            advertise_host,
            zone,
            node_tags,
            driver_name,
            heartbeat_seconds,
            lease_seconds,
            kube,
        } => {
            let heartbeat_interval = Duration::from_secs(heartbeat_seconds.max(1));
            let lease = Duration::from_secs(lease_seconds.max(2));
            let engine = palisade::engine::EngineConfig {
                lease,
                renew_interval: lease / 3,
                ..Default::default()
            };
            let cfg = NodeProcessConfig {
                engine,
                controller,
                node_id: node_id.unwrap_or_else(host_name),
                endpoint: endpoint_or_default(endpoint, &state_dir),
                disks: disks_or_default(disks, &state_dir),
                state_dir,
                secret: kube.secret_source(secret_file),
                zone,
                node_tags,
                replica_listen,
                agent_listen,
                advertise_host,
                driver_name,
                heartbeat_interval,
                // A heartbeat that takes longer than the interval is as good as lost.
                controller_timeout: heartbeat_interval.max(Duration::from_secs(5)),
            };
            runtime
                .block_on(palisade::cmd::node::run(cfg))
                .map_err(|e| e.to_string())
        }
        Command::Crds => palisade::store::kubernetes::crd::crds_yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(|e| e.to_string()),
        Command::Ctl(args) => {
            let mut out = std::io::stdout().lock();
            runtime
                .block_on(palisade::cmd::ctl::run(args, &mut out))
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e}");
            ExitCode::FAILURE
        }
    }
}
