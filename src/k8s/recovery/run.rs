//! Running the recovery controller: while this process leads, reflectors keep the
//! VolumeAttachments, PersistentVolumes, claims, pods, Nodes and ReplicaSets (their metadata)
//! in memory, and a pass runs after every change they see and every `resync` (grace periods
//! and failover delays run out with no change). Leadership comes from the caller as a
//! `watch::Receiver<bool>` (true: lead): the reflectors start when it turns true and stop
//! when it turns false, and the controller returns when its sender is dropped.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::FutureExt;
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};

use super::view::Snapshot;
use super::Recovery;

/// How long a pass waits after a change for the ones that come with it (a node going down
/// changes many pods at once).
const SETTLE: Duration = Duration::from_millis(100);

/// Runs `recovery` whenever `leader` says this process leads, until the sender of `leader`
/// is dropped. With no leader election, pass a receiver whose sender holds `true` for as long
/// as the controller should run.
pub async fn run(recovery: Arc<Recovery>, mut leader: watch::Receiver<bool>) {
    loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        info!("leading: the recovery controller starts watching");
        let stopped = tokio::select! {
            () = recovery.lead() => false,
            stopped = lost(&mut leader) => stopped,
        };
        recovery.forget();
        if stopped {
            info!("the recovery controller stops");
            return;
        }
        info!("no longer leading: the recovery controller stops watching");
    }
}

/// Waits until `leader` turns false (false) or its sender is dropped (true).
async fn lost(leader: &mut watch::Receiver<bool>) -> bool {
    loop {
        if leader.changed().await.is_err() {
            return true;
        }
        if !*leader.borrow_and_update() {
            return false;
        }
    }
}

/// A reflector's store and the stream that fills it, reduced to "something changed".
fn reflect<K>(
    stream: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&());
    let changes = stream
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .filter_map(move |event| {
            let kind = kind.clone();
            async move {
                if let Err(e) = &event {
                    warn!(kind = %kind, error = %e, "watching failed; retrying with backoff");
                }
                event.ok().map(|_| ())
            }
        })
        .boxed();
    (store, changes)
}

fn watch_all<K>(client: &kube::Client) -> (Store<K>, BoxStream<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    reflect(watcher(Api::<K>::all(client.clone()), watcher::Config::default()).boxed())
}

/// The stores are filled: every reflector has listed once.
fn ready<K>(store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

impl Recovery {
    /// Watches and runs passes until the watches end (they do not: they retry with backoff).
    async fn lead(&self) {
        let client = &self.client;
        let (attachments, a) = watch_all::<VolumeAttachment>(client);
        let (volumes, v) = watch_all::<PersistentVolume>(client);
        let (claims, c) = watch_all::<PersistentVolumeClaim>(client);
        let (pods, p) = watch_all::<Pod>(client);
        let (nodes, n) = watch_all::<Node>(client);
        // Only their metadata (owner references): `Api<PartialObjectMeta<_>>` asks for no more.
        let (replica_sets, r) = watch_all::<PartialObjectMeta<ReplicaSet>>(client);
        let mut changes = stream::select_all([a, v, c, p, n, r]);
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announced = false;
        loop {
            tokio::select! {
                change = changes.next() => {
                    if change.is_none() {
                        return;
                    }
                    tokio::time::sleep(SETTLE).await;
                }
                _ = resync.tick() => {},
            }
            // Everything that arrived meanwhile is covered by this pass.
            while let Some(Some(())) = changes.next().now_or_never() {}
            let filled = ready(&attachments)
                && ready(&volumes)
                && ready(&claims)
                && ready(&pods)
                && ready(&nodes)
                && ready(&replica_sets);
            if !filled {
                continue;
            }
            if !announced {
                info!(
                    attachments = attachments.len(),
                    pods = pods.len(),
                    nodes = nodes.len(),
                    "recovery controller caches filled; passes start"
                );
                announced = true;
            }
            let snapshot = Snapshot {
                attachments: attachments.state(),
                volumes: volumes.state(),
                claims: claims.state(),
                pods: pods.state(),
                nodes: nodes.state(),
                replica_sets: replica_sets.state(),
            };
            if let Err(e) = self.pass(&snapshot).await {
                warn!(error = %e, "the recovery pass failed; the next one retries");
            }
        }
    }
}
