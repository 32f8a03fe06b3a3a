//! The read side of one table: a watch-fed copy of the kind's objects in the namespace,
//! ordered by store key, each decoded once when its event arrives.
//!
//! kube-runtime's `watcher` does the list-then-watch, the resumption from the last
//! resourceVersion, the relist after a `410 Gone` and the backoff; this module applies its
//! events the way `reflector::store` does (a relist replaces the whole map at `InitDone`, so
//! readers never see half of one), but into a `BTreeMap` keyed by store key rather than a
//! hash map of raw objects, because `list_prefix` is ordered by key and reads must hand out
//! `Arc`s of decoded model values without cloning or decoding on every call.
//!
//! Objects are watched untyped (`DynamicObject`) and decoded one by one, so an object that
//! does not decode (edited by hand into something the model cannot read) is kept as corrupt
//! and reported by reads of it, as the embedded store does, instead of failing the whole
//! list and leaving the table unsynced.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::core::ObjectMeta;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use serde::Deserialize;
use tracing::{debug, warn};

use super::error::KubernetesError;
use super::names::key_for_name;
use super::resource::StoredResource;
use crate::store::{StoreError, Versioned};

/// One object as the cache holds it.
pub(super) struct Entry<T> {
    /// The object's resourceVersion as a number, or as given when it is not one.
    pub version: Result<u64, String>,
    /// The object's metadata (labels, annotations, finalizers, deletionTimestamp), which a
    /// write carries over.
    pub meta: ObjectMeta,
    content: Content<T>,
}

enum Content<T> {
    Decoded(Arc<T>),
    /// A spec that does not decode, kept so that reading it reports `StoreError::Corrupt` and
    /// a write naming its version can replace it.
    Corrupt(Arc<serde_json::Value>),
}

impl<T> Entry<T> {
    /// True when the object's deletion has been asked for.
    pub fn deleting(&self) -> bool {
        self.meta.deletion_timestamp.is_some()
    }

    /// True when the object carries `finalizer`.
    pub fn has_finalizer(&self, finalizer: &str) -> bool {
        self.meta
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|x| x == finalizer))
    }

    /// The version, when it is a number.
    pub fn number(&self) -> Option<u64> {
        self.version.as_ref().ok().copied()
    }
}

/// The cached objects and what the watch has reached.
pub(super) struct State<T> {
    pub objects: BTreeMap<String, Entry<T>>,
    /// The highest resourceVersion applied. Events of one kind arrive in resourceVersion
    /// order, so every write of this kind at or below it is reflected here (or superseded).
    pub seen: u64,
    /// Set once the first full list has been applied.
    pub synced: bool,
    /// The objects of a relist under way, applied whole at its end.
    relist: Option<BTreeMap<String, Entry<T>>>,
    /// The watch's last error, for the message of a sync that does not finish.
    pub last_error: Option<String>,
}

/// A table's cache; see the module documentation.
pub(super) struct Cache<K: StoredResource> {
    state: RwLock<State<K::Value>>,
    /// Bumped after every applied event, to wake writers waiting for their write.
    changed: tokio::sync::watch::Sender<u64>,
}

impl<K: StoredResource> Cache<K> {
    pub fn new() -> Cache<K> {
        Cache {
            state: RwLock::new(State {
                objects: BTreeMap::new(),
                seen: 0,
                synced: false,
                relist: None,
                last_error: None,
            }),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Nothing panics while holding the lock; if something ever did, the map is still whole
    /// (every update is a single insert, remove or swap).
    pub fn read(&self) -> RwLockReadGuard<'_, State<K::Value>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State<K::Value>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feeds the cache from `stream` until it ends (it does not: the watcher retries with
    /// backoff, recording each error).
    pub async fn run(self: Arc<Self>, api: kube::Api<DynamicObject>) {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => self.apply(event),
                Err(e) => {
                    warn!(kind = K::KIND, error = %e, "the watch failed; retrying");
                    self.write().last_error = Some(e.to_string());
                }
            }
        }
    }

    fn apply(&self, event: watcher::Event<DynamicObject>) {
        {
            let mut state = self.write();
            match event {
                watcher::Event::Init => state.relist = Some(BTreeMap::new()),
                watcher::Event::InitApply(object) => {
                    if let Some((key, entry)) = decode::<K>(object) {
                        state
                            .relist
                            .get_or_insert_with(BTreeMap::new)
                            .insert(key, entry);
                    }
                }
                watcher::Event::InitDone => {
                    let objects = state.relist.take().unwrap_or_default();
                    let highest = objects.values().filter_map(Entry::number).max();
                    state.seen = state.seen.max(highest.unwrap_or(0));
                    state.objects = objects;
                    state.synced = true;
                    state.last_error = None;
                    debug!(kind = K::KIND, objects = state.objects.len(), "listed");
                }
                watcher::Event::Apply(object) => {
                    if let Some((key, entry)) = decode::<K>(object) {
                        state.seen = state.seen.max(entry.number().unwrap_or(0));
                        state.objects.insert(key, entry);
                    }
                }
                watcher::Event::Delete(object) => {
                    if let Some((key, entry)) = decode::<K>(object) {
                        state.seen = state.seen.max(entry.number().unwrap_or(0));
                        state.objects.remove(&key);
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits until `done` holds of the cache, at most `timeout`. False on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&State<K::Value>) -> bool,
    ) -> bool {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                if done(&self.read()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    // The sender lives as long as the cache: not reached.
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl<T: Clone> State<T> {
    /// The stored object under `key`, as a store read returns it.
    pub fn get(&self, kind: &'static str, key: &str) -> Option<Result<Versioned<T>, StoreError>>
    where
        T: serde::de::DeserializeOwned,
    {
        self.objects.get(key).map(|e| versioned(kind, key, e))
    }

    /// The objects whose key starts with `prefix`, ordered by key.
    pub fn list_prefix(
        &self,
        kind: &'static str,
        prefix: &str,
    ) -> Result<Vec<Versioned<T>>, StoreError>
    where
        T: serde::de::DeserializeOwned,
    {
        self.objects
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, e)| versioned(kind, key, e))
            .collect()
    }
}

fn versioned<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    key: &str,
    entry: &Entry<T>,
) -> Result<Versioned<T>, StoreError> {
    let version = match &entry.version {
        Ok(v) => *v,
        Err(value) => {
            return Err(KubernetesError::ResourceVersion {
                kind,
                name: entry.meta.name.clone().unwrap_or_default(),
                value: value.clone(),
            }
            .into())
        }
    };
    match &entry.content {
        Content::Decoded(value) => Ok(Versioned {
            version,
            value: Arc::clone(value),
        }),
        // It failed to decode when it arrived; decoding it again yields the error to return
        // (serde_json::Error cannot be cloned).
        Content::Corrupt(spec) => match T::deserialize(&**spec) {
            Ok(value) => Ok(Versioned {
                version,
                value: Arc::new(value),
            }),
            Err(source) => Err(StoreError::Corrupt {
                kind,
                key: key.to_string(),
                source,
            }),
        },
    }
}

/// The store key and cache entry of an object from the watch; None for an object whose name
/// no key maps to (made by hand).
fn decode<K: StoredResource>(object: DynamicObject) -> Option<(String, Entry<K::Value>)> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let Some(key) = key_for_name(&name) else {
        warn!(
            kind = K::KIND,
            name, "ignoring an object whose name is not a store key's"
        );
        return None;
    };
    let raw_version = object.metadata.resource_version.clone().unwrap_or_default();
    let version = parse_version(&raw_version).ok_or(raw_version);
    let spec = object.data.get("spec").unwrap_or(&serde_json::Value::Null);
    let content = match K::Value::deserialize(spec) {
        Ok(value) => Content::Decoded(Arc::new(value)),
        Err(e) => {
            warn!(kind = K::KIND, key, error = %e, "stored object does not decode");
            Content::Corrupt(Arc::new(spec.clone()))
        }
    };
    let mut meta = object.metadata;
    // Never used here, and the largest part of most objects' metadata.
    meta.managed_fields = None;
    Some((
        key,
        Entry {
            version,
            meta,
            content,
        },
    ))
}

/// A resourceVersion as a store version.
///
/// Kubernetes calls resourceVersions opaque, but an API server backed by etcd (every
/// conformant one: etcd3 is its only storage backend) sets them to the etcd revision of the
/// object's last change (`ModRevision`), a positive 64-bit integer written in decimal, and
/// increasing with every change of the cluster. That is what this store relies on: a
/// decimal that fits a u64 and is above 0. Anything else is refused by name
/// ([`KubernetesError::ResourceVersion`]) rather than guessed at.
pub(super) fn parse_version(value: &str) -> Option<u64> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    value.parse::<u64>().ok().filter(|v| digits && *v > 0)
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn resource_versions_are_positive_decimals() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "0",
            "+1",
            "-1",
            " 1",
            "1a",
            "18446744073709551616",
            "abc",
        ] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
    }
}
