//! How the processes reach the API server, as the command line gave it (`--kubeconfig`,
//! `--namespace`): the client and the namespace are set up as the Kubernetes store's are
//! (`store::kubernetes::config`).

use std::path::PathBuf;

use crate::store::kubernetes::config;

/// Why no client or no namespace could be set up.
pub type ConnectionError = config::ConfigError;

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// A kubeconfig to use instead of inferring one.
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of Palisade's own objects (custom resources, the cluster secret's
    /// Secret, the leader's Lease).
    pub namespace: Option<String>,
}

impl Connection {
    /// A client from the kubeconfig given, else inferred (KUBECONFIG, `~/.kube/config`, then
    /// the pod's service account).
    pub async fn client(&self) -> Result<kube::Client, ConnectionError> {
        config::client(self.kubeconfig.as_deref()).await
    }

    /// The namespace given, else the pod's service account's.
    pub fn namespace(&self) -> Result<String, ConnectionError> {
        config::namespace(self.namespace.as_deref())
    }
}
