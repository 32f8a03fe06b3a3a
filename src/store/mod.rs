//! The one source of truth for cluster state, behind one trait with optimistic concurrency:
//! every object carries a version, and an update whose expected version is stale loses with
//! `StoreError::Conflict` so that the caller re-reads and retries.
//!
//! Objects are documents keyed by id (volumes, replicas, nodes, and the settings under the
//! key "settings"); there are no multi-object transactions, so that the same trait is served
//! by both backends: [`embedded`] (one redb file, for standalone use and tests) and
//! [`kubernetes`] (custom resources in the API server, for clusters).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;

pub mod embedded;
pub mod kubernetes;

/// An object as stored, with the version its next update must name.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: Arc<T>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {key:?} was changed concurrently (expected version {expected:?})")]
    Conflict {
        kind: &'static str,
        key: String,
        expected: Option<u64>,
    },
    #[error("{kind} {key:?} is stored but cannot be decoded: {source}")]
    Corrupt {
        kind: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The Kubernetes store's API server failed, refused or could not be reached.
    #[error(transparent)]
    Kubernetes(Box<kubernetes::KubernetesError>),
}

impl From<kubernetes::KubernetesError> for StoreError {
    fn from(e: kubernetes::KubernetesError) -> Self {
        StoreError::Kubernetes(Box::new(e))
    }
}

/// One kind of object, kept as a table of documents.
#[async_trait]
pub trait Table<T>: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Versioned<T>>, StoreError>;
    /// Every object, ordered by key.
    async fn list(&self) -> Result<Vec<Versioned<T>>, StoreError>;
    /// The objects whose key starts with `prefix`, ordered by key.
    async fn list_prefix(&self, prefix: &str) -> Result<Vec<Versioned<T>>, StoreError>;
    /// Writes `value` under `key`. `expected`: `None` means the key must not exist yet,
    /// `Some(v)` means the stored version must be `v`. Returns the version the object has
    /// now, which the next put must name: versions only grow, but need not be consecutive,
    /// and a put that changes nothing may keep the old one. Once it returns, reads through
    /// the same store see this write (or a later one).
    async fn put(&self, key: &str, value: T, expected: Option<u64>) -> Result<u64, StoreError>;
    /// Deletes `key` if its version is `expected`. Deleting a missing key is Ok.
    async fn delete(&self, key: &str, expected: u64) -> Result<(), StoreError>;
    /// The keys, ordered, whose deletion was asked for from outside the store: objects
    /// deleted with `kubectl delete` in the Kubernetes store, which stay (held by the
    /// volumes' finalizer), unchanged and readable, until they are deleted through the
    /// store. The embedded store has none.
    async fn deletion_requested(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

/// The cluster state: one table per kind.
pub trait Store: Send + Sync + 'static {
    fn volumes(&self) -> &dyn Table<Volume>;
    fn replicas(&self) -> &dyn Table<Replica>;
    fn nodes(&self) -> &dyn Table<Node>;
    fn settings(&self) -> &dyn Table<Settings>;
}

/// The key the settings object is stored under.
pub const SETTINGS_KEY: &str = "settings";

/// Which backend a process keeps its state in.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The redb database file at `path`.
    Embedded { path: PathBuf },
    /// Custom resources through the Kubernetes API: the client from `kubeconfig` if given,
    /// else inferred (KUBECONFIG, ~/.kube/config, in-cluster); the namespace given, else the
    /// pod's service account's.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        namespace: Option<String>,
    },
}

/// Opens the store on `backend`: the embedded file, or a Kubernetes store once its watches
/// have synced.
pub async fn open(backend: Backend) -> Result<Arc<dyn Store>, StoreError> {
    match backend {
        Backend::Embedded { path } => {
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&path))
                .await
                .map_err(|e| StoreError::Backend(format!("opening the store failed: {e}")))??;
            Ok(Arc::new(store))
        }
        Backend::Kubernetes {
            kubeconfig,
            namespace,
        } => {
            let namespace = crate::store::kubernetes::config::namespace(namespace.as_deref())
                .map_err(kubernetes::KubernetesError::from)?;
            let client = crate::store::kubernetes::config::client(kubeconfig.as_deref())
                .await
                .map_err(kubernetes::KubernetesError::from)?;
            let store = kubernetes::KubernetesStore::connect(client, &namespace).await?;
            tracing::info!(namespace, "the Kubernetes store is synced");
            Ok(Arc::new(store))
        }
    }
}
