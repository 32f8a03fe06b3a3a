//! The one source of truth for cluster state, behind one trait with optimistic concurrency:
//! every object carries a version, and an update whose expected version is stale loses with
//! `StoreError::Conflict` so that the caller re-reads and retries.
//!
//! Objects are documents keyed by id (volumes, replicas, nodes, and the settings under the
//! key "settings"); there are no multi-object transactions, so that the same trait can be
//! served by Kubernetes custom resources later.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;

pub mod embedded;

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
    /// `Some(v)` means the stored version must be `v`. Returns the new version.
    async fn put(&self, key: &str, value: T, expected: Option<u64>) -> Result<u64, StoreError>;
    /// Deletes `key` if its version is `expected`. Deleting a missing key is Ok.
    async fn delete(&self, key: &str, expected: u64) -> Result<(), StoreError>;
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
