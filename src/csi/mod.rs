//! The CSI gRPC surface: the wire types generated from proto/csi.proto (`v1`), thin adapters
//! over the domain services (identity, controller, node), request conversion, the one error
//! mapping, and the unix socket they are served on.

/// The CSI v1 wire types and gRPC services generated from proto/csi.proto.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

pub mod codec;
pub mod controller;
pub mod convert;
pub mod identity;
pub mod node;
pub mod status;
pub mod uds_authority;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Errors setting up the CSI socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("endpoint {0:?} is not a unix socket endpoint (expected unix:///path/to/csi.sock)")]
    BadEndpoint(String),
    #[error("{0:?} is served by a running process already")]
    InUse(PathBuf),
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The socket path of a `unix://` endpoint (`unix:///p`, `unix:/p` or a bare absolute path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, SocketError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(SocketError::BadEndpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket owner-only (0600), replacing a stale socket file but never a live one.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |op: &'static str| {
        move |source| SocketError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create socket directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io("remove stale socket"))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    // The socket is created under a umask that leaves it owner-only from its first instant.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io("bind socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod socket"))?;
    Ok(listener)
}

/// A gRPC channel to a CSI unix socket (for `palisade ctl`, tests and benchmarks).
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
