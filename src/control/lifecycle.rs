//! The replica lifecycle of attached volumes, driven by a periodic pass of the controller
//! ([`Controller::reconcile_replicas`]) and by the engines' reports:
//!
//! - a volume with fewer ready replicas than it asks for is degraded; a failed replica whose
//!   node is back is reused (rebuilt: the engine copies everything, so whatever it holds is
//!   overwritten); otherwise, after `replica-replenishment-wait-interval`, a replacement is
//!   placed by the placement engine, created on its node and rebuilt;
//! - a volume with more ready replicas than it asks for retires one (numberOfReplicas was
//!   lowered, or a best-effort local replica joined): never the attached node's, else the
//!   one whose removal keeps the anti-affinity best (one on a node or zone that holds two);
//! - best-effort data locality: attached on a node without a replica, a local one is placed
//!   (if a local disk qualifies, else the volume says why) and rebuilt, then a remote one
//!   is retired;
//! - a failed replica older than the volume's staleReplicaTimeout is deleted;
//! - a volume with no ready replica is faulted and says so; nothing rebuilds from nothing.
//!
//! Rebuilds run in the attached engine (see `crate::engine`); at most
//! `concurrent-replica-rebuild-per-node-limit` replicas rebuild on one node at once. The
//! store changes here happen under the volume's lock, so they interleave safely with
//! publish, the engines' reports and a restart of the controller at any point: each pass
//! starts from what the store says.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::*;
use crate::params::DataLocality;
use crate::replica::agent::ReplicaTarget;

/// A failed replica whose node is back waits this long before it is reused (so that a
/// replica that fails again at once is not retried in a tight loop).
const REUSE_BACKOFF_MS: u64 = 5_000;

/// An engine's report on one rebuild.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildReport {
    pub replica_id: String,
    pub size: u64,
    pub done: u64,
    pub copied: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: u64,
    /// running | done | failed
    pub state: String,
    pub error: String,
}

/// Why a volume's numberOfReplicas or dataLocality cannot change as asked.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Controller {
    /// Changes a volume's numberOfReplicas and/or dataLocality. The lifecycle pass then
    /// grows or shrinks it (while it is attached). strict-local is a placement made at
    /// creation (one replica, the volume pinned to its node): it can be neither set nor left.
    pub async fn update_volume(
        &self,
        volume_id: &str,
        number_of_replicas: Option<u32>,
        data_locality: Option<DataLocality>,
    ) -> Result<Arc<Volume>, UpdateError> {
        let _guard = self.locks.lock(volume_id).await;
        let current = self
            .store
            .volumes()
            .get(volume_id)
            .await?
            .ok_or_else(|| UpdateError::NotFound(volume_id.to_string()))?;
        let mut updated = (*current.value).clone();
        let strict = updated.params.data_locality == DataLocality::StrictLocal;
        if let Some(locality) = data_locality {
            if locality != updated.params.data_locality
                && (strict || locality == DataLocality::StrictLocal)
            {
                return Err(UpdateError::Invalid(format!(
                    "dataLocality cannot change from {} to {locality}: strict-local is decided when the volume is created (one replica, the volume pinned to that node)",
                    updated.params.data_locality
                )));
            }
            updated.params.data_locality = locality;
        }
        if let Some(n) = number_of_replicas {
            if !(1..=20).contains(&n) {
                return Err(UpdateError::Invalid(format!(
                    "numberOfReplicas must be 1 to 20, not {n}"
                )));
            }
            if strict && n != 1 {
                return Err(UpdateError::Invalid(
                    "numberOfReplicas of a strict-local volume is 1: its one replica is on the consumer's node".to_string(),
                ));
            }
            updated.params.number_of_replicas = n;
        }
        if updated.params == current.value.params {
            return Ok(current.value);
        }
        info!(volume = %volume_id, replicas = updated.params.number_of_replicas,
            data_locality = %updated.params.data_locality, "volume updated");
        self.store
            .volumes()
            .put(volume_id, updated.clone(), Some(current.version))
            .await?;
        Ok(Arc::new(updated))
    }

    /// An engine's rebuilt replica becomes a member. Idempotent: a replica that is a member
    /// already is Ok.
    pub async fn promote_member(
        &self,
        volume_id: &str,
        replica_id: &str,
        node_id: &str,
        epoch: u64,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        self.attached_volume(volume_id, node_id, epoch).await?;
        let replicas = self.volume_replicas(volume_id).await?;
        let Some(replica) = replicas.iter().find(|r| r.value.id == replica_id) else {
            return Err(MemberError::ReplicaNotFound {
                volume: volume_id.to_string(),
                replica: replica_id.to_string(),
            });
        };
        match replica.value.state {
            ReplicaState::Ready => return Ok(()),
            ReplicaState::Rebuilding => {}
            other => {
                return Err(MemberError::NotRebuilding {
                    replica: replica_id.to_string(),
                    state: format!("{other:?}"),
                })
            }
        }
        let mut ready = (*replica.value).clone();
        ready.state = ReplicaState::Ready;
        ready.failed_ms = 0;
        self.put_replica(ready, Some(replica)).await?;
        self.rebuild_reports().remove(replica_id);
        info!(volume = %volume_id, replica = %replica_id, node = %node_id, epoch,
            "rebuilt replica promoted: it is a member");
        self.refresh_degraded(volume_id).await?;
        Ok(())
    }

    /// An engine's progress report. A failed rebuild marks its replica failed (to be reused
    /// or replaced by a later pass).
    pub async fn report_rebuilds(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
        reports: Vec<RebuildReport>,
    ) -> Result<(), MemberError> {
        let _guard = self.locks.lock(volume_id).await;
        self.attached_volume(volume_id, node_id, epoch).await?;
        let replicas = self.volume_replicas(volume_id).await?;
        for report in reports {
            let Some(replica) = replicas.iter().find(|r| r.value.id == report.replica_id) else {
                continue;
            };
            if report.state == "failed" && replica.value.state == ReplicaState::Rebuilding {
                warn!(volume = %volume_id, replica = %report.replica_id, error = %report.error,
                    "rebuild failed; the replica is marked failed");
                let mut failed = (*replica.value).clone();
                failed.state = ReplicaState::Failed;
                failed.failed_ms = now_ms();
                self.put_replica(failed, Some(replica)).await?;
            }
            if report.state == "running" && replica.value.state == ReplicaState::Rebuilding {
                // Recorded in steps of 10%, for `kubectl get plr`: a few writes per rebuild.
                let tenths = report.done.saturating_mul(10) / report.size.max(1);
                let percent = u8::try_from(tenths.min(10) * 10).unwrap_or(100);
                if replica.value.rebuilt_percent != Some(percent) {
                    let mut progressed = (*replica.value).clone();
                    progressed.rebuilt_percent = Some(percent);
                    match self.put_replica(progressed, Some(replica)).await {
                        Ok(_) | Err(StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if report.state == "running" {
                self.rebuild_reports()
                    .insert(report.replica_id.clone(), report);
            } else {
                self.rebuild_reports().remove(&report.replica_id);
            }
        }
        Ok(())
    }

    /// The last progress reported for a replica being rebuilt.
    pub fn rebuild_progress(&self, replica_id: &str) -> Option<RebuildReport> {
        self.rebuild_reports().get(replica_id).cloned()
    }

    fn rebuild_reports(&self) -> std::sync::MutexGuard<'_, HashMap<String, RebuildReport>> {
        self.rebuilds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass over every volume. Errors of one volume are logged and do not stop the
    /// others.
    pub async fn reconcile_replicas(&self) -> Result<(), StoreError> {
        if self.fencing.is_none() {
            // Standalone: replicas are local files with no engine to rebuild them.
            return Ok(());
        }
        let volumes = self.store.volumes().list().await?;
        for v in volumes {
            if let Err(e) = self.reconcile_volume(&v.value.id).await {
                warn!(volume = %v.value.id, error = %e, "replica reconciliation failed; retrying at the next pass");
            }
        }
        Ok(())
    }

    async fn reconcile_volume(&self, volume_id: &str) -> Result<(), String> {
        let _guard = self.locks.lock(volume_id).await;
        let store_error = |e: StoreError| e.to_string();
        let Some(volume) = self
            .store
            .volumes()
            .get(volume_id)
            .await
            .map_err(store_error)?
        else {
            return Ok(());
        };
        let vol = Arc::clone(&volume.value);
        if vol.state != VolumeState::Ready {
            return Ok(());
        }
        let now = now_ms();
        let settings = self.settings().await.map_err(store_error)?;
        let nodes = self.list_nodes().await.map_err(store_error)?;
        let up = |node_id: &str| {
            matches!(
                self.health(nodes.iter().find(|n| n.id == node_id), now),
                crate::control::attach::Health::Up
            )
        };
        let mut replicas = self.volume_replicas(volume_id).await.map_err(store_error)?;
        // A replacement whose creation a crash interrupted: finish it (or drop it).
        if let Some(r) = replicas
            .iter()
            .find(|r| r.value.state == ReplicaState::Creating)
        {
            return self.finish_replica(&vol, r).await;
        }

        // Failed replicas past the volume's staleReplicaTimeout are deleted.
        let stale_ms = vol
            .params
            .stale_replica_timeout_minutes
            .saturating_mul(60_000);
        let mut kept = Vec::new();
        for r in replicas {
            let stale = r.value.state == ReplicaState::Failed
                && r.value.failed_ms > 0
                && now.saturating_sub(r.value.failed_ms) > stale_ms;
            if stale && up(&r.value.node_id) {
                self.retire(&vol, &r, "failed longer than staleReplicaTimeout")
                    .await?;
            } else {
                kept.push(r);
            }
        }
        replicas = kept;

        let count =
            |state: ReplicaState| replicas.iter().filter(|r| r.value.state == state).count();
        let ready = count(ReplicaState::Ready);
        let rebuilding = count(ReplicaState::Rebuilding);
        let want = vol.params.number_of_replicas as usize;
        if ready == 0 {
            let reason = "faulted: no replica holds every acknowledged write any more (every replica failed); it is not served from a stale one".to_string();
            return self.set_degraded(&volume, 0, Some(reason)).await;
        }
        let Some(attachment) = vol.attachment.clone() else {
            // Rebuilds need the volume's engine: only attached volumes heal.
            return self
                .set_degraded(&volume, ready, degraded(ready, rebuilding, want, None))
                .await;
        };
        let attached = attachment.node_id.as_str();
        let local_wanted = vol.params.data_locality == DataLocality::BestEffort;
        let has_local = replicas.iter().any(|r| {
            r.value.node_id == attached
                && matches!(
                    r.value.state,
                    ReplicaState::Ready | ReplicaState::Rebuilding
                )
        });
        let mut note = None;
        // The limit is the node's, over every volume's rebuilds.
        let limit = settings.concurrent_replica_rebuild_per_node_limit as usize;
        let all_rebuilding: Vec<String> = self
            .store
            .replicas()
            .list()
            .await
            .map_err(store_error)?
            .into_iter()
            .filter(|r| r.value.state == ReplicaState::Rebuilding)
            .map(|r| r.value.node_id.clone())
            .collect();
        let rebuilding_on = |node: &str| -> Result<usize, String> {
            Ok(all_rebuilding.iter().filter(|n| *n == node).count())
        };

        if local_wanted && !has_local && rebuilding == 0 {
            // Best-effort locality: a replica on the attached node, then one remote retired.
            match self
                .place_one(&vol, &replicas, &settings, &nodes, Some(attached))
                .await
            {
                Ok(Some((node, disk))) if node == attached && rebuilding_on(&node)? < limit => {
                    self.add_replica(&vol, &replicas, &node, &disk).await?;
                    return Ok(());
                }
                Ok(Some(_)) | Ok(None) => {
                    note = Some(format!(
                        "data locality best-effort: no disk of node {attached} qualifies for a local replica"
                    ));
                }
                Err(why) => {
                    note = Some(format!(
                        "data locality best-effort: no local replica on node {attached}: {why}"
                    ));
                }
            }
        }

        if ready + rebuilding < want {
            // Reuse a failed replica whose node is back.
            if let Some(r) = replicas.iter().find(|r| {
                r.value.state == ReplicaState::Failed
                    && up(&r.value.node_id)
                    && now.saturating_sub(r.value.failed_ms) >= REUSE_BACKOFF_MS
            }) {
                if rebuilding_on(&r.value.node_id)? < limit {
                    if r.value.size < vol.size {
                        // The volume grew while this replica was away.
                        let target = ReplicaTarget {
                            node_id: &r.value.node_id,
                            disk_id: &r.value.disk_id,
                            replica_id: &r.value.id,
                            volume_id: &vol.id,
                        };
                        self.agent
                            .grow_replica(target, vol.size)
                            .await
                            .map_err(|e| format!("growing {} to reuse it: {e}", r.value.id))?;
                    }
                    let mut reused = (*r.value).clone();
                    reused.size = vol.size;
                    reused.state = ReplicaState::Rebuilding;
                    reused.failed_ms = 0;
                    self.put_replica(reused, Some(r))
                        .await
                        .map_err(store_error)?;
                    info!(volume = %volume_id, replica = %r.value.id, node = %r.value.node_id,
                        "a failed replica's node is back: reusing it (rebuilt in full)");
                    return self
                        .refresh_degraded(volume_id)
                        .await
                        .map_err(|e| e.to_string());
                }
            }
            // Replace, once the volume has been short of replicas for the wait interval.
            let since = replicas
                .iter()
                .filter(|r| r.value.state == ReplicaState::Failed)
                .map(|r| r.value.failed_ms)
                .min();
            let wait_ms = settings
                .replica_replenishment_wait_interval_seconds
                .saturating_mul(1000);
            let due = since.is_none_or(|s| now.saturating_sub(s) >= wait_ms);
            if due {
                match self
                    .place_one(&vol, &replicas, &settings, &nodes, None)
                    .await
                {
                    Ok(Some((node, disk))) if rebuilding_on(&node)? < limit => {
                        self.add_replica(&vol, &replicas, &node, &disk).await?;
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(why) => note = Some(format!("no replacement can be placed: {why}")),
                }
            }
        } else if ready > want && rebuilding == 0 {
            if let Some(r) = pick_retiree(&replicas, attached, &nodes) {
                self.retire(&vol, r, "more ready replicas than numberOfReplicas")
                    .await?;
                return Ok(());
            }
        }
        self.set_degraded(&volume, ready, degraded(ready, rebuilding, want, note))
            .await
    }

    /// Where one more replica of `vol` would go (with `preferred` for locality).
    async fn place_one(
        &self,
        vol: &Volume,
        replicas: &[Versioned<Replica>],
        settings: &Settings,
        nodes: &[Node],
        preferred: Option<&str>,
    ) -> Result<Option<(String, String)>, String> {
        let view = self.cluster_view(nodes).await.map_err(|e| e.to_string())?;
        // Every replica the volume has counts as used, failed ones too: they may come back.
        let existing: Vec<Replica> = replicas.iter().map(|r| (*r.value).clone()).collect();
        let request = PlacementRequest {
            volume_id: &vol.id,
            size: vol.size,
            replica_count: u32::try_from(existing.len() + 1).unwrap_or(u32::MAX),
            params: &vol.params,
            settings,
            preferred_node: preferred,
            existing: &existing,
        };
        let placement = scheduler::place(&view, &request).map_err(|e| e.to_string())?;
        Ok(placement.replicas.into_iter().next())
    }

    /// Creates a new replica of `vol` on `node`/`disk` and records it as rebuilding.
    async fn add_replica(
        &self,
        vol: &Volume,
        replicas: &[Versioned<Replica>],
        node: &str,
        disk: &str,
    ) -> Result<(), String> {
        let next = replicas
            .iter()
            .filter_map(|r| r.value.id.rsplit("-r-").next()?.parse::<u64>().ok())
            .max()
            .map_or(0, |n| n + 1)
            .max(vol.next_replica);
        let replica_id = format!("{}-r-{next}", vol.id);
        // The number is taken before the replica is recorded: a crash in between skips it.
        let current = self
            .store
            .volumes()
            .get(&vol.id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("volume {} is gone", vol.id))?;
        let mut counted = (*current.value).clone();
        counted.next_replica = next + 1;
        self.store
            .volumes()
            .put(&vol.id, counted, Some(current.version))
            .await
            .map_err(|e| e.to_string())?;
        let replica = Replica {
            id: replica_id.clone(),
            volume_id: vol.id.clone(),
            node_id: node.to_string(),
            disk_id: disk.to_string(),
            path: Default::default(),
            size: vol.size,
            state: ReplicaState::Creating,
            failed_ms: 0,
            rebuilt_percent: None,
        };
        // Recorded first, so a crash between the two leaves a record that the next pass
        // finishes or cleans, never a stray replica unknown to the store.
        let version = self
            .put_replica(replica.clone(), None)
            .await
            .map_err(|e| e.to_string())?;
        let recorded = Versioned {
            version,
            value: Arc::new(replica),
        };
        self.finish_replica(vol, &recorded).await?;
        info!(volume = %vol.id, replica = %replica_id, node, disk, "replica added; the attached engine rebuilds it");
        self.refresh_degraded(&vol.id)
            .await
            .map_err(|e| e.to_string())
    }

    /// Creates a recorded `Creating` replica on its node (idempotent) and marks it
    /// rebuilding; one that cannot be created is deleted (record, then whatever its node
    /// made), so that a node refusing replicas does not pile records up.
    async fn finish_replica(&self, vol: &Volume, r: &Versioned<Replica>) -> Result<(), String> {
        let target = ReplicaTarget {
            node_id: &r.value.node_id,
            disk_id: &r.value.disk_id,
            replica_id: &r.value.id,
            volume_id: &vol.id,
        };
        match self.agent.create_replica(target, vol.size).await {
            Ok(path) => {
                let mut ready = (*r.value).clone();
                ready.path = path;
                ready.state = ReplicaState::Rebuilding;
                self.put_replica(ready, Some(r))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Err(e) => {
                let why = format!("creating {} on {}: {e}", r.value.id, r.value.node_id);
                self.retire(vol, r, "it could not be created").await?;
                Err(why)
            }
        }
    }

    /// Deletes a replica: its record first (the engine drops a replica that is no longer
    /// ready in the store, and a failure on it is no longer a member's), then its files.
    async fn retire(&self, vol: &Volume, r: &Versioned<Replica>, why: &str) -> Result<(), String> {
        self.delete_replica_record(r)
            .await
            .map_err(|e| e.to_string())?;
        let target = ReplicaTarget {
            node_id: &r.value.node_id,
            disk_id: &r.value.disk_id,
            replica_id: &r.value.id,
            volume_id: &vol.id,
        };
        if let Err(e) = self.agent.delete_replica(target).await {
            warn!(volume = %vol.id, replica = %r.value.id, error = %e,
                "the retired replica's files could not be deleted; they hold no member data");
        }
        info!(volume = %vol.id, replica = %r.value.id, node = %r.value.node_id, why, "replica retired");
        Ok(())
    }

    /// Recomputes the degraded reason from the store.
    pub(super) async fn refresh_degraded(&self, volume_id: &str) -> Result<(), StoreError> {
        let Some(volume) = self.store.volumes().get(volume_id).await? else {
            return Ok(());
        };
        let replicas = self.volume_replicas(volume_id).await?;
        let count = |s| replicas.iter().filter(|r| r.value.state == s).count();
        let ready = count(ReplicaState::Ready);
        let reason = degraded(
            ready,
            count(ReplicaState::Rebuilding),
            volume.value.params.number_of_replicas as usize,
            None,
        );
        self.set_degraded(&volume, ready, reason)
            .await
            .map_err(StoreError::Backend)
    }

    /// Records the volume's degraded reason and its count of ready replicas (what
    /// `kubectl get plv` and `ctl` show), writing only when either changed.
    async fn set_degraded(
        &self,
        volume: &Versioned<Volume>,
        ready: usize,
        reason: Option<String>,
    ) -> Result<(), String> {
        let ready = u32::try_from(ready).unwrap_or(u32::MAX);
        if volume.value.degraded_reason == reason && volume.value.ready_replicas == ready {
            return Ok(());
        }
        let mut updated = (*volume.value).clone();
        updated.degraded_reason = reason;
        updated.ready_replicas = ready;
        self.store
            .volumes()
            .put(&updated.id.clone(), updated, Some(volume.version))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The degraded reason for these counts (None when the volume has what it asks for).
fn degraded(ready: usize, rebuilding: usize, want: usize, note: Option<String>) -> Option<String> {
    let mut parts = Vec::new();
    if ready < want {
        parts.push(match rebuilding {
            0 => format!("degraded: {ready} of {want} replicas ready"),
            n => format!("degraded: {ready} of {want} replicas ready, {n} rebuilding"),
        });
    }
    parts.extend(note);
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The ready replica to retire when there is one too many: never the attached node's; a
/// failed one does not count. Prefers one whose node, then zone, holds another replica of
/// the volume (removing it keeps the spread), then the last one.
fn pick_retiree<'a>(
    replicas: &'a [Versioned<Replica>],
    attached: &str,
    nodes: &[Node],
) -> Option<&'a Versioned<Replica>> {
    let ready: Vec<&Versioned<Replica>> = replicas
        .iter()
        .filter(|r| r.value.state == ReplicaState::Ready)
        .collect();
    let zone = |node: &str| {
        nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.zone.clone())
    };
    let shares = |r: &Versioned<Replica>, same: &dyn Fn(&Replica, &Replica) -> bool| {
        ready
            .iter()
            .any(|o| o.value.id != r.value.id && same(&o.value, &r.value))
    };
    let candidates: Vec<&Versioned<Replica>> = ready
        .iter()
        .copied()
        .filter(|r| r.value.node_id != attached)
        .collect();
    candidates
        .iter()
        .copied()
        .find(|r| shares(r, &|a, b| a.node_id == b.node_id))
        .or_else(|| {
            candidates.iter().copied().find(|r| {
                shares(r, &|a, b| {
                    zone(&a.node_id).is_some() && zone(&a.node_id) == zone(&b.node_id)
                })
            })
        })
        .or_else(|| candidates.last().copied())
}
