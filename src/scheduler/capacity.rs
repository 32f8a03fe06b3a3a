//! CSI GetCapacity: how many bytes of replicas the disks that a volume's parameters allow
//! can still take.

use crate::params::VolumeParams;
use crate::settings::Settings;

use super::filter::Filter;
use super::space::SpacePolicy;
use super::view::{ClusterView, NodeView};

/// What GetCapacity reports, in bytes of one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// The sum, over the qualifying disks, of the largest replica each can still take.
    pub available_bytes: u64,
    /// The largest replica one qualifying disk can still take.
    pub maximum_volume_size: u64,
}

/// The capacity for volumes with `params` on the nodes that `segment_filter` keeps (the
/// nodes of the requested topology segment).
///
/// A qualifying disk is on a node that is ready, schedulable, has every nodeSelector tag
/// and is kept by `segment_filter`; the disk itself is schedulable, has every diskSelector
/// tag and reports a capacity. For each, the largest replica it can take is
///
/// ```text
/// headroom = min(available − maximum × minimal% / 100 − 1,      (actual space check)
///                (maximum − reserved) × over-provisioning% / 100 − scheduled)
///                                                               (scheduled space check)
/// ```
///
/// each term floored at 0, so that a replica of exactly `headroom` bytes passes both checks
/// and one byte more fails one. `available_bytes` is the sum of the headrooms and
/// `maximum_volume_size` the largest. Both are per replica: a volume of N replicas needs
/// N such disks (on distinct nodes unless soft anti-affinity allows otherwise).
pub fn capacity(
    view: &ClusterView,
    params: &VolumeParams,
    settings: &Settings,
    segment_filter: impl Fn(&NodeView) -> bool,
) -> Capacity {
    let filter = Filter {
        node_selector: &params.node_selector,
        disk_selector: &params.disk_selector,
        size: 0,
        space: SpacePolicy::from_settings(settings),
        heartbeat_timeout_ms: view.heartbeat_timeout_ms(),
    };
    let mut total = Capacity::default();
    for node in view.nodes() {
        if !segment_filter(node) || filter.check_node(node).is_err() {
            continue;
        }
        for disk in view.disks_of(node) {
            if filter.check_disk_attributes(disk).is_err() {
                continue;
            }
            let headroom = filter.space.headroom(&disk.space());
            total.available_bytes = total.available_bytes.saturating_add(headroom);
            total.maximum_volume_size = total.maximum_volume_size.max(headroom);
        }
    }
    total
}
