//! The Kubernetes store: the cluster state as custom resources (`crd`) in one
//! namespace, so that in a cluster it lives in the API server's etcd, visible with kubectl.
//!
//! - Versions are resourceVersions, parsed as u64 (see `cache::parse_version` for why that
//!   holds on etcd-backed API servers; anything else is refused by name). They are not
//!   consecutive: one etcd revision counts every write of the cluster. A put that changes
//!   nothing may keep its version (the API server skips no-op updates).
//! - A put with `expected: None` is a create (409 AlreadyExists is `StoreError::Conflict`);
//!   with `Some(v)` a replace carrying resourceVersion `v` (409, or 404 when the object is
//!   gone, is `Conflict`). A delete carries a resourceVersion precondition; deleting what is
//!   gone is Ok.
//! - Reads come from a watch-fed cache per kind (`cache`); nothing polls. Writes go to the
//!   API server, and then wait until the cache has seen them (read-your-writes, bounded by
//!   [`table::READ_YOUR_WRITES_WAIT`]), so that a get→modify→put loop never spins on the
//!   version it has just replaced.
//! - Keys map to object names (`names`): as they are when valid, else reversibly encoded;
//!   `spec.key` keeps the key.
//! - Volumes carry the finalizer `palisade.io/replicas`. A `kubectl delete` of a volume
//!   object only sets its deletionTimestamp: the volume reads as before (nothing in the
//!   controller acts on a request it has not vetted, such as deleting an attached volume),
//!   `Table::deletion_requested` lists it, and the object stays until its record is deleted
//!   through the store (DeleteVolume, once the replicas are gone), which removes the
//!   finalizer on the condition of the version, like any delete.
//! - Every write checks that the API server kept the value whole: an installed CRD older than
//!   this binary would silently prune new fields, and that is refused
//!   ([`KubernetesError::Pruned`]).
//!
//! Two stores on the same API server and namespace (two controllers) see each other's
//! writes through their watches, and their compare-and-swaps are the API server's, so of
//! two racing writes exactly one wins.

mod cache;
pub mod config;
pub mod crd;
mod error;
pub mod names;
mod resource;
mod table;

use std::time::Duration;

pub use error::KubernetesError;

use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;
use crate::store::kubernetes::crd::{
    PalisadeNode, PalisadeReplica, PalisadeSettings, PalisadeVolume,
};
use crate::store::{Store, StoreError, Table};
use table::KubeTable;

/// How long [`KubernetesStore::connect`] waits for the first list of every kind.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster state as custom resources in one namespace. See the module documentation.
pub struct KubernetesStore {
    volumes: KubeTable<PalisadeVolume>,
    replicas: KubeTable<PalisadeReplica>,
    nodes: KubeTable<PalisadeNode>,
    settings: KubeTable<PalisadeSettings>,
}

impl KubernetesStore {
    /// Starts a watch of each kind in `namespace` and returns once every one has listed
    /// (at most [`SYNC_TIMEOUT`]). Fails by name when a kind cannot be listed (its CRD is
    /// not installed, or the identity may not list it).
    pub async fn connect(
        client: kube::Client,
        namespace: &str,
    ) -> Result<KubernetesStore, StoreError> {
        let (volumes, replicas, nodes, settings) = tokio::try_join!(
            KubeTable::start(&client, namespace),
            KubeTable::start(&client, namespace),
            KubeTable::start(&client, namespace),
            KubeTable::start(&client, namespace),
        )?;
        tokio::try_join!(
            volumes.synced(SYNC_TIMEOUT),
            replicas.synced(SYNC_TIMEOUT),
            nodes.synced(SYNC_TIMEOUT),
            settings.synced(SYNC_TIMEOUT),
        )?;
        Ok(KubernetesStore {
            volumes,
            replicas,
            nodes,
            settings,
        })
    }
}

impl Store for KubernetesStore {
    fn volumes(&self) -> &dyn Table<Volume> {
        &self.volumes
    }

    fn replicas(&self) -> &dyn Table<Replica> {
        &self.replicas
    }

    fn nodes(&self) -> &dyn Table<Node> {
        &self.nodes
    }

    fn settings(&self) -> &dyn Table<Settings> {
        &self.settings
    }
}
