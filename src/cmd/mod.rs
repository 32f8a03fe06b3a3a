//! Cluster mode on one or many machines: `palisade controller` (CSI Controller, the store,
//! the ControlPlane API) and `palisade node` (CSI Node, the node agent, the replica server),
//! plus the process plumbing they share with `palisade standalone`.

pub mod ctl;
pub mod standalone;

pub mod controller;
pub mod node;
pub mod process;

use std::path::PathBuf;

/// Where `palisade node` and `palisade ctl` read the cluster secret unless `--secret-file`
/// says otherwise: where `palisade controller` creates it with its default state directory.
pub const DEFAULT_SECRET_FILE: &str = "/var/lib/palisade/cluster.secret";

/// How `palisade controller`, `node` and `ctl` reach Kubernetes, and whether the cluster
/// secret is a Secret there. Every command that has a `--secret-file` takes these too.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubernetesArgs {
    /// A kubeconfig for the API server (default: KUBECONFIG, then ~/.kube/config, then the
    /// pod's service account).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of Palisade's own objects: the custom resources of `--store
    /// kubernetes`, the cluster secret's Secret and the leader's Lease (default: the pod's,
    /// from its service account).
    #[arg(long, global = true, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// The cluster secret is the Secret NAME in the namespace (key `cluster.secret`) instead
    /// of a file: `palisade controller` creates it when it is missing (32 random bytes;
    /// two controllers starting at once agree on one), `palisade node` waits until it
    /// exists, `palisade ctl` reads it.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "PALISADE_SECRET_FROM_KUBERNETES",
        conflicts_with = "secret_file"
    )]
    pub secret_from_kubernetes: Option<String>,
}

impl KubernetesArgs {
    /// The connection these flags describe.
    pub fn connection(&self) -> crate::k8s::connection::Connection {
        crate::k8s::connection::Connection {
            kubeconfig: self.kubeconfig.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// The secret's source: the Secret named by `--secret-from-kubernetes`, else `file`.
    pub fn secret_source(&self, file: PathBuf) -> SecretSource {
        match &self.secret_from_kubernetes {
            Some(name) => SecretSource::Kubernetes {
                name: name.clone(),
                connection: self.connection(),
            },
            None => SecretSource::File(file),
        }
    }
}

/// Where a process gets the cluster secret.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// A file (`--secret-file`): the controller creates it when missing, the others read it.
    File(PathBuf),
    /// A Kubernetes Secret (`--secret-from-kubernetes`).
    Kubernetes {
        name: String,
        connection: crate::k8s::connection::Connection,
    },
}

impl SecretSource {
    /// The Secret handle of a Kubernetes source, with the client it uses.
    async fn kubernetes_secret(
        name: &str,
        connection: &crate::k8s::connection::Connection,
    ) -> Result<crate::k8s::secret::ClusterSecret, ClusterError> {
        let client = connection.client().await?;
        let namespace = connection.namespace()?;
        Ok(crate::k8s::secret::ClusterSecret::new(
            client, &namespace, name,
        ))
    }
}

/// Why `palisade controller` or `palisade node` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Socket(#[from] crate::csi::SocketError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    Secret(#[from] crate::replica::token::SecretError),
    #[error("reading the cluster secret (--secret-file {path:?}) failed: {source}; give the path of a copy of the controller's secret file (<controller state dir>/cluster.secret) with --secret-file")]
    SecretFile {
        path: PathBuf,
        #[source]
        source: crate::replica::token::SecretError,
    },
    #[error(transparent)]
    KubernetesSecret(#[from] crate::k8s::secret::SecretError),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::connection::ConnectionError),
    #[error(transparent)]
    ReplicaServer(#[from] crate::replica::server::ServerError),
    #[error("create state directory {path:?}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {address} for the {what}: {source}")]
    Listen {
        what: &'static str,
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Address(String),
    #[error("controller address {address:?}: {source}")]
    ControllerAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Serve(#[from] process::ServeError),
}

/// Creates the state directory if it is missing.
fn create_state_dir(path: &std::path::Path) -> Result<(), ClusterError> {
    std::fs::create_dir_all(path).map_err(|source| ClusterError::StateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Binds a TCP listener for one of the process's servers.
async fn listen(
    what: &'static str,
    address: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, ClusterError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ClusterError::Listen {
            what,
            address,
            source,
        })
}
