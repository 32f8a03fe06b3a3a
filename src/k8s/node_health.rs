//! Node health evidence from Kubernetes: the Nodes' Ready condition and the kubelets' Leases
//! in `kube-node-lease`, each kept by a reflector (watched, not polled), served to the
//! controller's health rule as [`NodeEvidence`] (the rule and why it is safe are in
//! `control::health`). A Palisade node id is taken to be the name of its Kubernetes Node.
//!
//! A Lease's freshness is judged on this controller's clock: a renewal counts from when the
//! watch delivered it, never from the `renewTime` the kubelet wrote on its own clock. A
//! Lease first seen in a (re)list counts from its `renewTime`, but never from later than
//! now: that it exists says nothing of when it was renewed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use tracing::warn;

use crate::control::health::{HostEvidence, NodeEvidence};
use crate::model::now_ms;

/// Where the kubelets keep their Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The kubelet's default `leaseDurationSeconds`, for a Lease that names none.
const DEFAULT_NODE_LEASE: Duration = Duration::from_secs(40);

/// When this controller saw each Lease's current renewal.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    renew_time_us: Option<i64>,
    seen_ms: u64,
}

/// The Nodes and their Leases, watched; dropping it stops the watches.
pub struct KubeletWatch {
    nodes: reflector::Store<Node>,
    leases: reflector::Store<Lease>,
    renewals: Arc<Mutex<HashMap<String, Renewal>>>,
    nodes_synced: Arc<AtomicBool>,
    leases_synced: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KubeletWatch {
    /// Starts watching every Node and the Leases in [`NODE_LEASE_NAMESPACE`].
    pub fn start(client: kube::Client) -> KubeletWatch {
        let (nodes, node_writer) = reflector::store();
        let nodes_synced = Arc::new(AtomicBool::new(false));
        let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            // Only the conditions are read: the rest of a Node (its images above all) is not
            // kept.
            .modify(|node| {
                node.managed_fields_mut().clear();
                node.annotations_mut().clear();
                node.spec = None;
                if let Some(status) = node.status.as_mut() {
                    let conditions = status.conditions.take();
                    *status = Default::default();
                    status.conditions = conditions;
                }
            })
            .reflect(node_writer);
        let synced = nodes_synced.clone();
        let node_task = tokio::spawn(async move {
            let mut events = std::pin::pin!(node_events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => synced.store(true, Ordering::Release),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "watching the Nodes failed; retrying"),
                }
            }
        });

        let (leases, lease_writer) = reflector::store();
        let leases_synced = Arc::new(AtomicBool::new(false));
        let renewals: Arc<Mutex<HashMap<String, Renewal>>> = Arc::default();
        let lease_events = watcher(
            Api::<Lease>::namespaced(client, NODE_LEASE_NAMESPACE),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|lease| lease.managed_fields_mut().clear())
        .reflect(lease_writer);
        let (synced, seen) = (leases_synced.clone(), renewals.clone());
        let lease_task = tokio::spawn(async move {
            let mut events = std::pin::pin!(lease_events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(lease)) => note(&seen, &lease, true),
                    Ok(watcher::Event::InitApply(lease)) => note(&seen, &lease, false),
                    Ok(watcher::Event::Delete(lease)) => {
                        lock(&seen).remove(&lease.name_any());
                    }
                    Ok(watcher::Event::InitDone) => synced.store(true, Ordering::Release),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => warn!(error = %e, "watching the kubelets' Leases failed; retrying"),
                }
            }
        });
        KubeletWatch {
            nodes,
            leases,
            renewals,
            nodes_synced,
            leases_synced,
            tasks: vec![node_task, lease_task],
        }
    }

    /// True once both watches have listed everything once.
    pub fn synced(&self) -> bool {
        self.nodes_synced.load(Ordering::Acquire) && self.leases_synced.load(Ordering::Acquire)
    }

    /// Waits until [`KubeletWatch::synced`], at most `timeout`; returns whether it is.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.synced() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

impl Drop for KubeletWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl NodeEvidence for KubeletWatch {
    fn host(&self, node_id: &str, now_ms: u64) -> HostEvidence {
        if !self.synced() {
            return HostEvidence::Unknown;
        }
        let Some(node) = self.nodes.get(&ObjectRef::new(node_id)) else {
            return HostEvidence::Unknown;
        };
        if !is_ready(&node) {
            return HostEvidence::NotReady;
        }
        let Some(lease) = self
            .leases
            .get(&ObjectRef::new(node_id).within(NODE_LEASE_NAMESPACE))
        else {
            return HostEvidence::LeaseExpired;
        };
        let Some(renewal) = lock(&self.renewals).get(node_id).copied() else {
            return HostEvidence::LeaseExpired;
        };
        let duration_ms = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_NODE_LEASE.as_millis() as u64, |s| s * 1000);
        if now_ms > renewal.seen_ms.saturating_add(duration_ms) {
            HostEvidence::LeaseExpired
        } else {
            HostEvidence::Alive
        }
    }
}

/// True when the Node's Ready condition is True (False and Unknown are not ready).
fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Records when this controller saw `lease`'s current renewal: now for one the watch
/// delivered live, its own `renewTime` (but no later than now) for one first listed.
fn note(renewals: &Mutex<HashMap<String, Renewal>>, lease: &Lease, live: bool) {
    let renew_time_us = lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0.as_microsecond());
    let now = now_ms();
    let mut map = lock(renewals);
    let name = lease.name_any();
    if map
        .get(&name)
        .is_some_and(|r| r.renew_time_us == renew_time_us)
    {
        return;
    }
    let seen_ms = match (live, renew_time_us) {
        (_, None) => 0,
        (true, Some(_)) => now,
        (false, Some(us)) => u64::try_from(us / 1000).unwrap_or(0).min(now),
    };
    map.insert(
        name,
        Renewal {
            renew_time_us,
            seen_ms,
        },
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
