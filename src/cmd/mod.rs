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
