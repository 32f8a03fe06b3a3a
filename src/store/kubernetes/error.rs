//! What can go wrong in the Kubernetes store, beyond a lost compare-and-swap (which is
//! `StoreError::Conflict`).

use std::time::Duration;

use super::names::KeyError;
use crate::store::kubernetes::config::ConfigError;

/// A failure of the Kubernetes store. [`KubernetesError::is_transient`] says whether a retry
/// may succeed.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("{action} {kind} {key:?} through the Kubernetes API failed: {source}")]
    Api {
        action: &'static str,
        kind: &'static str,
        key: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "{kind} object {name:?} has resourceVersion {value:?}, which is not a decimal \
         unsigned integer: the Kubernetes store uses resourceVersions as versions, which \
         holds for API servers backed by etcd (their resourceVersions are etcd revisions)"
    )]
    ResourceVersion {
        kind: &'static str,
        name: String,
        value: String,
    },
    #[error(
        "{kind} {key:?} was written, but the API server stored it with fields missing or \
         changed: the installed CustomResourceDefinition is older than this palisade; apply \
         deploy/cluster/crds.yaml (or `palisade crds | kubectl apply -f -`)"
    )]
    Pruned { kind: &'static str, key: String },
    #[error("encoding {kind} {key:?} as JSON failed: {source}")]
    Encode {
        kind: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind} key {key:?} cannot be stored: {source}")]
    Key {
        kind: &'static str,
        key: String,
        #[source]
        source: KeyError,
    },
    #[error("cannot list {plural} in namespace {namespace:?} ({hint}): {source}")]
    Setup {
        plural: String,
        namespace: String,
        hint: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the watch of {plural} in namespace {namespace:?} did not sync within {timeout:?} \
         (last error: {last_error})"
    )]
    Sync {
        plural: String,
        namespace: String,
        timeout: Duration,
        last_error: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl KubernetesError {
    /// True when the API server could not be reached or was overloaded, so the outcome of
    /// a write is unknown and a retry may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            KubernetesError::Api { source, .. } | KubernetesError::Setup { source, .. } => {
                is_transient(source)
            }
            KubernetesError::Sync { .. } => true,
            KubernetesError::ResourceVersion { .. }
            | KubernetesError::Pruned { .. }
            | KubernetesError::Encode { .. }
            | KubernetesError::Key { .. }
            | KubernetesError::Config(_) => false,
        }
    }
}

/// Connection failures, timeouts, throttling and the API server's own 5xx answers.
fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}
