//! One store table on one custom resource kind in one namespace: reads from the watch-fed
//! [`Cache`], writes to the API server with the resourceVersion as the compare-and-swap, then
//! a wait until the cache has seen the write (read-your-writes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use either::Either;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::core::ObjectMeta;
use kube::{Api, Client};
use serde::Deserialize;
use tracing::warn;

use super::cache::{parse_version, Cache, State};
use super::error::KubernetesError;
use super::names::name_for_key;
use super::resource::StoredResource;
use crate::store::{StoreError, Table, Versioned};

/// How long a write waits for the watch to bring it into the cache before returning anyway
/// (the write is done; only a read right after it could then see the older version).
pub(super) const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);

/// How often a delete retries removing the finalizer of an object whose deletion it already
/// decided, when other writers keep changing the object.
const FINALIZER_ATTEMPTS: usize = 10;

/// Stops the watch when the table is dropped.
struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One table; see the module documentation.
pub(super) struct KubeTable<K: StoredResource> {
    api: Api<K>,
    /// Creates and replaces go through this one, as JSON without null members (see
    /// [`without_nulls`]).
    untyped: Api<DynamicObject>,
    namespace: String,
    cache: Arc<Cache<K>>,
    _watch: Watch,
}

impl<K: StoredResource> KubeTable<K> {
    /// Checks that the kind can be listed in `namespace` (so that a missing CRD or missing
    /// permissions fail here, by name) and starts its watch.
    pub async fn start(client: &Client, namespace: &str) -> Result<KubeTable<K>, KubernetesError> {
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        if let Err(source) = api.list_metadata(&ListParams::default().limit(1)).await {
            return Err(KubernetesError::Setup {
                plural: K::plural(&()).to_string(),
                namespace: namespace.to_string(),
                hint: setup_hint(&source),
                source,
            });
        }
        let untyped = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            namespace,
            &ApiResource::erase::<K>(&()),
        );
        let cache = Arc::new(Cache::new());
        let watch = Watch(tokio::spawn(Arc::clone(&cache).run(untyped.clone())));
        Ok(KubeTable {
            api,
            untyped,
            namespace: namespace.to_string(),
            cache,
            _watch: watch,
        })
    }

    /// Waits until the first full list is in the cache.
    pub async fn synced(&self, timeout: Duration) -> Result<(), KubernetesError> {
        if self.cache.wait_until(timeout, |s| s.synced).await {
            return Ok(());
        }
        Err(KubernetesError::Sync {
            plural: K::plural(&()).to_string(),
            namespace: self.namespace.clone(),
            timeout,
            last_error: (self.cache.read().last_error.clone())
                .unwrap_or_else(|| "none".to_string()),
        })
    }

    fn name(&self, key: &str) -> Result<String, StoreError> {
        name_for_key(key).map_err(|source| {
            KubernetesError::Key {
                kind: K::KIND,
                key: key.to_string(),
                source,
            }
            .into()
        })
    }

    /// `object` as JSON with every null member of an object left out, which is how `None`
    /// reaches the API server: absent. Kubernetes 1.32 rejects a null for an enum even when
    /// the schema says `nullable` (`Unsupported value: "null"`), so an `Option` of an enum
    /// that is `None` could not be stored otherwise; serde reads an absent `Option` field as
    /// `None`, and the check after every write would catch a type for which that is not so.
    fn without_nulls(&self, key: &str, object: &K) -> Result<DynamicObject, StoreError> {
        let encode = |source| KubernetesError::Encode {
            kind: K::KIND,
            key: key.to_string(),
            source,
        };
        let mut json = serde_json::to_value(object).map_err(encode)?;
        strip_nulls(&mut json);
        Ok(serde_json::from_value(json).map_err(encode)?)
    }

    fn conflict(&self, key: &str, expected: Option<u64>) -> StoreError {
        StoreError::Conflict {
            kind: K::KIND,
            key: key.to_string(),
            expected,
        }
    }

    fn api_error(&self, action: &'static str, key: &str, source: kube::Error) -> StoreError {
        KubernetesError::Api {
            action,
            kind: K::KIND,
            key: key.to_string(),
            source,
        }
        .into()
    }

    /// The version of an object the API server returned.
    fn version_of(meta: &ObjectMeta) -> Result<u64, StoreError> {
        let raw = meta.resource_version.clone().unwrap_or_default();
        parse_version(&raw).ok_or_else(|| {
            KubernetesError::ResourceVersion {
                kind: K::KIND,
                name: meta.name.clone().unwrap_or_default(),
                value: raw,
            }
            .into()
        })
    }

    /// Waits (bounded) until the cache satisfies `done`; a timeout is logged, not an error.
    async fn wait_for_cache(&self, key: &str, done: impl Fn(&State<K::Value>) -> bool) {
        if !self.cache.wait_until(READ_YOUR_WRITES_WAIT, done).await {
            warn!(kind = K::KIND, key, wait = ?READ_YOUR_WRITES_WAIT,
                "the watch has not brought a write back yet; reads may lag behind it");
        }
    }

    /// Removes this kind's finalizer from an object whose deletion was asked for, on the
    /// condition that it is still at `version` (a merge patch naming the resourceVersion is
    /// rejected with 409 otherwise). Only called for kinds that have a finalizer.
    async fn release(
        &self,
        name: &str,
        key: &str,
        version: u64,
        meta: &ObjectMeta,
    ) -> Result<Released, StoreError> {
        let Some(finalizer) = K::FINALIZER else {
            return Ok(Released::Gone);
        };
        let remaining: Vec<&String> = meta
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != finalizer)
            .collect();
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": version.to_string(), "finalizers": remaining }
        });
        match self
            .api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(object) => Ok(Released::At(Self::version_of(object.meta())?)),
            Err(e) if status_code(&e) == Some(404) => Ok(Released::Gone),
            Err(e) if status_code(&e) == Some(409) => Ok(Released::Moved),
            Err(source) => Err(self.api_error("remove the finalizer of", key, source)),
        }
    }

    /// After a delete that left the object waiting on finalizers: removes ours, re-reading
    /// the object when another writer changed it meanwhile. The delete is already decided.
    async fn release_pending(
        &self,
        name: &str,
        key: &str,
        mut pending: K,
    ) -> Result<Option<u64>, StoreError> {
        let Some(finalizer) = K::FINALIZER else {
            return Ok(Some(Self::version_of(pending.meta())?));
        };
        for _ in 0..FINALIZER_ATTEMPTS {
            let meta = pending.meta();
            if !meta.finalizers.iter().flatten().any(|f| f == finalizer) {
                return Ok(Some(Self::version_of(meta)?));
            }
            match self
                .release(name, key, Self::version_of(meta)?, meta)
                .await?
            {
                Released::At(version) => return Ok(Some(version)),
                Released::Gone => return Ok(None),
                Released::Moved => {}
            }
            pending = match self.api.get_opt(name).await {
                Ok(Some(object)) => object,
                Ok(None) => return Ok(None),
                Err(source) => return Err(self.api_error("read", key, source)),
            };
        }
        // Marked for deletion, finalizer still on: a retry of the delete (whose caller sees
        // the conflict, re-reads and tries again) removes it.
        Err(self.conflict(key, None))
    }
}

/// What a finalizer removal did.
enum Released {
    /// Removed; the object had this version afterwards (gone too, unless other finalizers
    /// hold it).
    At(u64),
    /// The object is gone.
    Gone,
    /// The object is no longer at the version named.
    Moved,
}

/// Copies onto `meta` (a freshly built object's) the metadata that others may own on the
/// stored object: its labels (except ours, under `palisade.io/`, which the new value
/// decides), annotations, owner references and finalizers. Our finalizer is added unless the
/// object is being deleted, when no finalizer may be added.
fn carry_over(meta: &mut ObjectMeta, stored: Option<&ObjectMeta>, finalizer: Option<&str>) {
    if let Some(stored) = stored {
        let ours = format!("{}/", crate::store::kubernetes::crd::GROUP);
        let mut labels: BTreeMap<String, String> = stored.labels.clone().unwrap_or_default();
        labels.retain(|k, _| !k.starts_with(&ours));
        labels.extend(meta.labels.take().unwrap_or_default());
        meta.labels = Some(labels).filter(|l| !l.is_empty());
        meta.annotations = stored.annotations.clone();
        meta.owner_references = stored.owner_references.clone();
        meta.finalizers = stored.finalizers.clone();
    }
    let deleting = stored.is_some_and(|s| s.deletion_timestamp.is_some());
    if let Some(finalizer) = finalizer {
        let finalizers = meta.finalizers.get_or_insert_with(Vec::new);
        if !deleting && !finalizers.iter().any(|f| f == finalizer) {
            finalizers.push(finalizer.to_string());
        }
    }
}

/// Removes the null members of every object in `json`, recursively (array elements stay).
fn strip_nulls(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(members) => {
            members.retain(|_, v| !v.is_null());
            members.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The HTTP status of an error answer of the API server.
fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// What to check when the first list of a kind fails.
fn setup_hint(e: &kube::Error) -> &'static str {
    match status_code(e) {
        Some(404) => {
            "is the CustomResourceDefinition installed? kubectl apply -f deploy/cluster/crds.yaml"
        }
        Some(403) => "may this identity list them? see deploy/cluster/02-rbac-controller.yaml",
        Some(401) => "the API server refused the credentials",
        _ => "is the API server reachable?",
    }
}

#[async_trait]
impl<K: StoredResource> Table<K::Value> for KubeTable<K> {
    async fn get(&self, key: &str) -> Result<Option<Versioned<K::Value>>, StoreError> {
        self.cache.read().get(K::KIND, key).transpose()
    }

    async fn list(&self) -> Result<Vec<Versioned<K::Value>>, StoreError> {
        self.cache.read().list_prefix(K::KIND, "")
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<Versioned<K::Value>>, StoreError> {
        self.cache.read().list_prefix(K::KIND, prefix)
    }

    async fn put(
        &self,
        key: &str,
        value: K::Value,
        expected: Option<u64>,
    ) -> Result<u64, StoreError> {
        let name = self.name(key)?;
        let mut object = K::stored(&name, key, value.clone());
        let stored = match expected {
            None => None,
            Some(_) => self.cache.read().objects.get(key).map(|e| e.meta.clone()),
        };
        carry_over(object.meta_mut(), stored.as_ref(), K::FINALIZER);
        object.meta_mut().resource_version = expected.map(|v| v.to_string());
        let object = self.without_nulls(key, &object)?;
        let params = PostParams::default();
        let written = match expected {
            None => self.untyped.create(&params, &object).await,
            Some(_) => self.untyped.replace(&name, &params, &object).await,
        };
        let written = match written {
            Ok(written) => written,
            // Create: AlreadyExists. Replace: the resourceVersion is not the stored one.
            Err(e) if status_code(&e) == Some(409) => return Err(self.conflict(key, expected)),
            // Replace of an object that does not exist.
            Err(e) if status_code(&e) == Some(404) && expected.is_some() => {
                return Err(self.conflict(key, expected))
            }
            Err(source) => return Err(self.api_error("write", key, source)),
        };
        let version = Self::version_of(&written.metadata)?;
        let spec = written.data.get("spec").unwrap_or(&serde_json::Value::Null);
        if K::Value::deserialize(spec).ok().as_ref() != Some(&value) {
            return Err(KubernetesError::Pruned {
                kind: K::KIND,
                key: key.to_string(),
            }
            .into());
        }
        // Events arrive in resourceVersion order: once the cache is at `version`, it holds
        // this write or a later one.
        self.wait_for_cache(key, |s| s.seen >= version).await;
        Ok(version)
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StoreError> {
        let name = self.name(key)?;
        let marked = {
            let state = self.cache.read();
            state
                .objects
                .get(key)
                .filter(|e| e.number() == Some(expected) && e.deleting())
                .filter(|e| K::FINALIZER.is_some_and(|f| e.has_finalizer(f)))
                .map(|e| e.meta.clone())
        };
        let released = match marked {
            // Its deletion was asked for already (`kubectl delete`): what is left is our
            // finalizer, and removing it on the condition of the version is the
            // compare-and-swap.
            Some(meta) => match self.release(&name, key, expected, &meta).await? {
                Released::At(version) => Some(version),
                Released::Gone => None,
                Released::Moved => return Err(self.conflict(key, Some(expected))),
            },
            None => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(expected.to_string()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                match self.api.delete(&name, &params).await {
                    Ok(Either::Right(_deleted)) => None,
                    Ok(Either::Left(pending)) => self.release_pending(&name, key, pending).await?,
                    Err(e) if status_code(&e) == Some(404) => None,
                    Err(e) if status_code(&e) == Some(409) => {
                        return Err(self.conflict(key, Some(expected)))
                    }
                    Err(source) => return Err(self.api_error("delete", key, source)),
                }
            }
        };
        self.wait_for_cache(key, |s| match s.objects.get(key) {
            None => true,
            // Other finalizers hold it: done once the cache shows ours removed.
            Some(e) => match released {
                Some(version) => {
                    e.number().is_some_and(|v| v >= version)
                        && !K::FINALIZER.is_some_and(|f| e.has_finalizer(f))
                }
                // Deleted, and something newer is there already (created again).
                None => e.number().is_some_and(|v| v > expected),
            },
        })
        .await;
        Ok(())
    }

    async fn deletion_requested(&self) -> Result<Vec<String>, StoreError> {
        let state = self.cache.read();
        Ok(state
            .objects
            .iter()
            .filter(|(_, e)| e.deleting())
            .map(|(key, _)| key.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_metadata_is_kept_and_ours_follows_the_value() {
        let stored = ObjectMeta {
            labels: Some(BTreeMap::from([
                ("team".to_string(), "storage".to_string()),
                ("palisade.io/node".to_string(), "old-node".to_string()),
            ])),
            annotations: Some(BTreeMap::from([("note".to_string(), "x".to_string())])),
            finalizers: Some(vec!["example.com/keep".to_string()]),
            ..ObjectMeta::default()
        };
        let mut fresh = ObjectMeta {
            labels: Some(BTreeMap::from([(
                "palisade.io/volume".to_string(),
                "v".to_string(),
            )])),
            ..ObjectMeta::default()
        };
        carry_over(&mut fresh, Some(&stored), Some("palisade.io/replicas"));
        assert_eq!(
            fresh.labels,
            Some(BTreeMap::from([
                ("palisade.io/volume".to_string(), "v".to_string()),
                ("team".to_string(), "storage".to_string()),
            ]))
        );
        assert_eq!(fresh.annotations, stored.annotations);
        assert_eq!(
            fresh.finalizers,
            Some(vec![
                "example.com/keep".to_string(),
                "palisade.io/replicas".to_string()
            ])
        );

        // Being deleted: no finalizer may be added.
        let deleting = ObjectMeta {
            deletion_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            )),
            ..stored
        };
        let mut fresh = ObjectMeta::default();
        carry_over(&mut fresh, Some(&deleting), Some("palisade.io/replicas"));
        assert_eq!(fresh.finalizers, Some(vec!["example.com/keep".to_string()]));
    }

    #[test]
    fn null_members_are_left_out_at_every_depth() {
        let mut json = serde_json::json!({
            "a": null,
            "b": { "c": null, "d": 1 },
            "e": [null, { "f": null }],
        });
        strip_nulls(&mut json);
        assert_eq!(
            json,
            serde_json::json!({ "b": { "d": 1 }, "e": [null, {}] })
        );
    }
}
