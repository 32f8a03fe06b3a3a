//! Replica placement, Longhorn's rules as pure functions: filter, then score.
//!
//! [`ClusterView::new`] arranges the store's nodes and replicas once (O(replicas)); then
//! [`place`] chooses disks for the new replicas of one volume in O(nodes + disks) per
//! replica, whatever the number of replicas in the cluster, and [`capacity`] answers
//! GetCapacity.
//!
//! The rules (see `select` for the tiers and the score):
//! - a node qualifies when it is ready, schedulable and has every nodeSelector tag; a disk
//!   when it is schedulable, has every diskSelector tag and passes Longhorn's two space
//!   checks (actual: `available − size > maximum × minimal%`; scheduled:
//!   `size + scheduled ≤ (maximum − reserved) × over-provisioning%`);
//! - replicas go first to unused nodes in unused zones, then fall back as the volume's
//!   zone, node and disk soft anti-affinity allow (per-volume override, else the setting);
//!   nodes without a zone all share one zone "", as in Longhorn;
//! - the volume's existing replicas (the request's `existing`) make their node, zone and
//!   disk used, whatever their state: the caller leaves out the replicas it is replacing;
//! - best-effort data locality puts the first new replica on the preferred node when that
//!   node qualifies and anti-affinity allows it there at all (even if a better tier exists
//!   elsewhere), and says why in `locality_note` when it does not; strict-local puts the
//!   replica on the preferred node or fails saying why;
//! - when fewer replicas than wanted fit, allow-volume-creation-with-degraded-availability
//!   decides between a degraded placement (with the reason) and an error; when none fits,
//!   it is always an error.

mod capacity;
mod filter;
mod select;
mod space;
mod view;

#[cfg(test)]
mod tests;

pub use capacity::{capacity, Capacity};
pub use space::{human, DiskSpace, SpacePolicy};
pub use view::{ClusterView, DiskView, NodeView, ScheduledSpace};

use crate::model::Replica;
use crate::params::{self, DataLocality, VolumeParams};
use crate::settings::{self, Settings};

use filter::Filter;
use select::{Candidates, Policy, Softness, Used};

/// What to place: new replicas for one volume.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    /// The volume's id (for messages).
    pub volume_id: &'a str,
    /// Bytes of each replica.
    pub size: u64,
    /// How many replicas the volume should have in all, existing ones included.
    pub replica_count: u32,
    /// Selectors, data locality and the anti-affinity overrides.
    pub params: &'a VolumeParams,
    /// Space percentages, anti-affinity defaults, allow-degraded.
    pub settings: &'a Settings,
    /// The node named first in accessibility_requirements.preferred, for data locality.
    pub preferred_node: Option<&'a str>,
    /// The volume's replicas that stay: their nodes, zones and disks count as used.
    pub existing: &'a [Replica],
}

/// Where the new replicas go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// (node id, disk id) of each new replica, in placement order.
    pub replicas: Vec<(String, String)>,
    /// Why fewer replicas than wanted were placed, when that is the case.
    pub degraded_reason: Option<String>,
    /// Why best-effort data locality could not put a replica on the preferred node.
    pub locality_note: Option<String>,
}

/// Why a volume cannot be placed. `StrictLocalWithoutNode` is the caller's mistake
/// (INVALID_ARGUMENT); the others mean the cluster lacks room (RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "cannot place any of the {wanted} missing replicas of volume {volume_id} \
         ({} each): {reason}", human(*size)
    )]
    NoRoom {
        volume_id: String,
        wanted: u32,
        size: u64,
        reason: String,
    },
    #[error(
        "only {placeable} of the {wanted} missing replicas of volume {volume_id} can be \
         placed, and setting allow-volume-creation-with-degraded-availability is false: \
         {reason}"
    )]
    NotEnoughRoom {
        volume_id: String,
        wanted: u32,
        placeable: u32,
        reason: String,
    },
    #[error(
        "volume {volume_id} has dataLocality strict-local but no consumer node was given: \
         strict-local needs volumeBindingMode WaitForFirstConsumer, so that CreateVolume \
         names the node in accessibility_requirements.preferred"
    )]
    StrictLocalWithoutNode { volume_id: String },
    #[error(
        "volume {volume_id} has dataLocality strict-local and its replica cannot go on \
         node {node_id}: {reason}"
    )]
    StrictLocalNodeUnfit {
        volume_id: String,
        node_id: String,
        reason: String,
    },
}

/// Chooses disks for the replicas the volume lacks (`replica_count` minus `existing`).
pub fn place(view: &ClusterView, req: &PlacementRequest<'_>) -> Result<Placement, PlacementError> {
    let existing = u32::try_from(req.existing.len()).unwrap_or(u32::MAX);
    let wanted = req.replica_count.saturating_sub(existing);
    if wanted == 0 {
        return Ok(Placement::default());
    }
    let filter = filter_for(view, req);
    let policy = policy_for(req.params, req.settings);
    let used = used_by(view, req.existing);
    let strict_node = strict_local_node(view, req)?;
    let mut candidates = Candidates::build(view, filter, policy, &used, strict_node);
    let (mut local, locality_note) =
        best_effort_choice(view, req, &used, &candidates, filter, policy);
    let mut replicas = Vec::new();
    while replicas.len() < wanted as usize {
        let Some(choice) = local.take().or_else(|| candidates.best()) else {
            break;
        };
        candidates.commit(choice);
        replicas.push(candidates.ids(choice));
    }
    let placeable = u32::try_from(replicas.len()).unwrap_or(u32::MAX);
    if placeable == wanted {
        return Ok(Placement {
            replicas,
            degraded_reason: None,
            locality_note,
        });
    }
    let reason = match strict_node {
        Some(node) => strict_reason(view, filter, &candidates, node),
        None => candidates.why_exhausted(),
    };
    let degraded_reason = short_of(req, wanted, placeable, reason)?;
    Ok(Placement {
        replicas,
        degraded_reason: Some(degraded_reason),
        locality_note,
    })
}

/// The filter of this request.
fn filter_for<'a>(view: &ClusterView, req: &PlacementRequest<'a>) -> Filter<'a> {
    Filter {
        node_selector: &req.params.node_selector,
        disk_selector: &req.params.disk_selector,
        size: req.size,
        space: SpacePolicy::from_settings(req.settings),
        heartbeat_timeout_ms: view.heartbeat_timeout_ms(),
    }
}

/// The volume's anti-affinity levels: its overrides, else the settings.
fn policy_for(p: &VolumeParams, s: &Settings) -> Policy {
    Policy {
        zone: Softness {
            soft: p.effective_zone_soft_anti_affinity(s),
            override_: p.replica_zone_soft_anti_affinity,
            param: params::REPLICA_ZONE_SOFT_ANTI_AFFINITY,
            setting: settings::REPLICA_ZONE_SOFT_ANTI_AFFINITY,
        },
        node: Softness {
            soft: p.effective_node_soft_anti_affinity(s),
            override_: p.replica_soft_anti_affinity,
            param: params::REPLICA_SOFT_ANTI_AFFINITY,
            setting: settings::REPLICA_SOFT_ANTI_AFFINITY,
        },
        disk: Softness {
            soft: p.effective_disk_soft_anti_affinity(s),
            override_: p.replica_disk_soft_anti_affinity,
            param: params::REPLICA_DISK_SOFT_ANTI_AFFINITY,
            setting: settings::REPLICA_DISK_SOFT_ANTI_AFFINITY,
        },
    }
}

/// The nodes, zones and disks of the existing replicas (those the view knows).
fn used_by(view: &ClusterView, existing: &[Replica]) -> Used {
    let mut used = Used::default();
    for r in existing {
        let Some(n) = view.node_index(&r.node_id) else {
            continue;
        };
        push_new(&mut used.nodes, n);
        push_new(&mut used.zones, view.nodes[n].zone_index);
        if let Some(d) = view.disk_index(&r.node_id, &r.disk_id) {
            push_new(&mut used.disks, d);
        }
    }
    used
}

fn push_new(list: &mut Vec<usize>, item: usize) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// For strict-local, the preferred node, which must be given and known.
fn strict_local_node(
    view: &ClusterView,
    req: &PlacementRequest<'_>,
) -> Result<Option<usize>, PlacementError> {
    if req.params.data_locality != DataLocality::StrictLocal {
        return Ok(None);
    }
    let Some(node_id) = req.preferred_node else {
        return Err(PlacementError::StrictLocalWithoutNode {
            volume_id: req.volume_id.to_string(),
        });
    };
    match view.node_index(node_id) {
        Some(n) => Ok(Some(n)),
        None => Err(PlacementError::StrictLocalNodeUnfit {
            volume_id: req.volume_id.to_string(),
            node_id: node_id.to_string(),
            reason: "it is not a known node".to_string(),
        }),
    }
}

/// For best-effort, the choice on the preferred node for the first new replica, or the
/// reason there is none. Nothing when locality is not best-effort or the preferred node
/// holds a replica already.
fn best_effort_choice(
    view: &ClusterView,
    req: &PlacementRequest<'_>,
    used: &Used,
    candidates: &Candidates<'_>,
    filter: Filter<'_>,
    policy: Policy,
) -> (Option<select::Choice>, Option<String>) {
    if req.params.data_locality != DataLocality::BestEffort {
        return (None, None);
    }
    let note = |why: String| Some(format!("best-effort data locality: {why}"));
    let Some(node_id) = req.preferred_node else {
        return (
            None,
            note(
                "no preferred node was given (volumeBindingMode Immediate?), so no replica \
                 was placed for a consumer yet"
                    .to_string(),
            ),
        );
    };
    let Some(node) = view.node_index(node_id) else {
        return (
            None,
            note(format!("preferred node {node_id} is not a known node")),
        );
    };
    if used.nodes.contains(&node) {
        return (None, None);
    }
    match candidates.best_on(node) {
        Some(choice) => (Some(choice), None),
        None => {
            let why = filter
                .explain_node(view, &view.nodes[node])
                .unwrap_or_else(|| {
                    Candidates::build(view, filter, policy, used, Some(node)).why_exhausted()
                });
            (
                None,
                note(format!("no replica on preferred node {node_id}: {why}")),
            )
        }
    }
}

/// Why the strict-local node took no (more) replica.
fn strict_reason(
    view: &ClusterView,
    filter: Filter<'_>,
    candidates: &Candidates<'_>,
    node: usize,
) -> String {
    filter
        .explain_node(view, &view.nodes[node])
        .unwrap_or_else(|| candidates.why_exhausted())
}

/// Fewer replicas than wanted: the degraded reason when allowed, else the error.
fn short_of(
    req: &PlacementRequest<'_>,
    wanted: u32,
    placeable: u32,
    reason: String,
) -> Result<String, PlacementError> {
    let volume_id = req.volume_id.to_string();
    if placeable == 0 {
        return Err(match (req.params.data_locality, req.preferred_node) {
            (DataLocality::StrictLocal, Some(node_id)) => PlacementError::StrictLocalNodeUnfit {
                volume_id,
                node_id: node_id.to_string(),
                reason,
            },
            _ => PlacementError::NoRoom {
                volume_id,
                wanted,
                size: req.size,
                reason,
            },
        });
    }
    if !req
        .settings
        .allow_volume_creation_with_degraded_availability
    {
        return Err(PlacementError::NotEnoughRoom {
            volume_id,
            wanted,
            placeable,
            reason,
        });
    }
    Ok(format!(
        "only {placeable} of the {wanted} missing replicas could be placed: {reason}"
    ))
}
