//! A snapshot of the cluster arranged for placement: nodes sorted by id with their readiness
//! and zone resolved, disks with the bytes already scheduled on them. Built once from the
//! store's nodes and replicas in O(nodes + disks + replicas); every placement then reads it
//! without touching the replica list again.

use std::collections::HashMap;
use std::ops::Range;

use crate::model::{Node, Replica};

use super::space::DiskSpace;

/// Bytes scheduled per (node, disk): the sum of the sizes of the replicas placed there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduledSpace {
    bytes: HashMap<(String, String), u64>,
}

impl ScheduledSpace {
    /// Counts a replica.
    pub fn add(&mut self, replica: &Replica) {
        let key = (replica.node_id.clone(), replica.disk_id.clone());
        let entry = self.bytes.entry(key).or_default();
        *entry = entry.saturating_add(replica.size);
    }

    /// Uncounts a replica.
    pub fn remove(&mut self, replica: &Replica) {
        let key = (replica.node_id.clone(), replica.disk_id.clone());
        if let Some(entry) = self.bytes.get_mut(&key) {
            *entry = entry.saturating_sub(replica.size);
            if *entry == 0 {
                self.bytes.remove(&key);
            }
        }
    }

    /// Bytes scheduled on one disk.
    pub fn get(&self, node_id: &str, disk_id: &str) -> u64 {
        // Keys are owned pairs; a lookup by borrowed strings needs a probe key.
        self.bytes
            .get(&(node_id.to_string(), disk_id.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// The cluster as placement sees it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub(super) nodes: Vec<NodeView>,
    pub(super) disks: Vec<DiskView>,
    by_id: HashMap<String, usize>,
    pub(super) zone_count: usize,
    heartbeat_timeout_ms: u64,
}

/// One node of the view.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub(super) id: String,
    pub(super) zone: Option<String>,
    /// Index of the zone; nodes without a zone share the zone "" (as in Longhorn).
    pub(super) zone_index: usize,
    pub(super) tags: Vec<String>,
    pub(super) schedulable: bool,
    pub(super) ready: bool,
    pub(super) heartbeat_age_ms: u64,
    /// The node's disks in `ClusterView::disks`.
    pub(super) disks: Range<usize>,
}

/// One disk of the view.
#[derive(Debug, Clone)]
pub struct DiskView {
    pub(super) id: String,
    /// Index of the disk's node in `ClusterView::nodes`.
    pub(super) node: usize,
    pub(super) tags: Vec<String>,
    pub(super) schedulable: bool,
    pub(super) space: DiskSpace,
}

impl ClusterView {
    /// Builds the view. A node is ready when its last heartbeat is at most
    /// `heartbeat_timeout_ms` old at `now_ms` (a heartbeat from the future counts as fresh).
    /// Each replica adds its size to the scheduled bytes of its disk, whatever its state; a
    /// replica on an unknown node or disk adds nothing. Nodes are kept in id order and disks
    /// in id order within their node, which makes every tie-break by id an index comparison;
    /// a node or disk id listed twice keeps its first entry.
    pub fn new<'a>(
        nodes: &[Node],
        replicas: impl IntoIterator<Item = &'a Replica>,
        now_ms: u64,
        heartbeat_timeout_ms: u64,
    ) -> ClusterView {
        let mut order: Vec<&Node> = nodes.iter().collect();
        order.sort_by(|a, b| a.id.cmp(&b.id));
        order.dedup_by(|later, first| later.id == first.id);
        let mut view = ClusterView {
            nodes: Vec::with_capacity(order.len()),
            disks: Vec::new(),
            by_id: HashMap::with_capacity(order.len()),
            zone_count: 0,
            heartbeat_timeout_ms,
        };
        let mut zones: HashMap<&str, usize> = HashMap::new();
        for node in order {
            let zone_index = {
                let next = zones.len();
                *zones
                    .entry(node.zone.as_deref().unwrap_or(""))
                    .or_insert(next)
            };
            view.push_node(node, zone_index, now_ms);
        }
        view.zone_count = zones.len();
        // One hash lookup per replica: this loop is the O(replicas) part of building a view.
        let mut scheduled = ScheduledSpace::default();
        for replica in replicas {
            scheduled.add(replica);
        }
        view.set_scheduled(&scheduled);
        view
    }

    /// Builds the view from an aggregate of scheduled bytes kept up to date by its owner,
    /// in O(nodes + disks): what a controller does on every CreateVolume.
    pub fn with_scheduled(
        nodes: &[Node],
        scheduled: &ScheduledSpace,
        now_ms: u64,
        heartbeat_timeout_ms: u64,
    ) -> ClusterView {
        let mut view = ClusterView::new(nodes, std::iter::empty(), now_ms, heartbeat_timeout_ms);
        view.set_scheduled(scheduled);
        view
    }

    fn set_scheduled(&mut self, scheduled: &ScheduledSpace) {
        for disk in &mut self.disks {
            let node = &self.nodes[disk.node].id;
            disk.space.scheduled = scheduled.get(node, &disk.id);
        }
    }

    fn push_node(&mut self, node: &Node, zone_index: usize, now_ms: u64) {
        let index = self.nodes.len();
        let start = self.disks.len();
        let mut disks: Vec<_> = node.disks.iter().collect();
        disks.sort_by(|a, b| a.id.cmp(&b.id));
        disks.dedup_by(|later, first| later.id == first.id);
        self.disks.extend(disks.into_iter().map(|d| DiskView {
            id: d.id.clone(),
            node: index,
            tags: d.tags.clone(),
            schedulable: d.schedulable,
            space: DiskSpace {
                maximum: d.storage_maximum,
                available: d.storage_available,
                reserved: d.storage_reserved,
                scheduled: 0,
            },
        }));
        let heartbeat_age_ms = now_ms.saturating_sub(node.last_heartbeat_ms);
        self.nodes.push(NodeView {
            id: node.id.clone(),
            zone: node.zone.clone(),
            zone_index,
            tags: node.tags.clone(),
            schedulable: node.schedulable,
            ready: heartbeat_age_ms <= self.heartbeat_timeout_ms,
            heartbeat_age_ms,
            disks: start..self.disks.len(),
        });
        self.by_id.insert(node.id.clone(), index);
    }

    /// Adds `size` to the scheduled bytes of a disk, as a new replica there does; the
    /// controller applies a placement to its view this way without rebuilding it. Returns
    /// false (and changes nothing) when the node or disk is not in the view.
    pub fn record_replica(&mut self, node_id: &str, disk_id: &str, size: u64) -> bool {
        match self.disk_index(node_id, disk_id) {
            Some(i) => {
                let space = &mut self.disks[i].space;
                space.scheduled = space.scheduled.saturating_add(size);
                true
            }
            None => false,
        }
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeView> {
        self.node_index(id).map(|i| &self.nodes[i])
    }

    /// Every node, in id order.
    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    /// The disks of a node of this view, in id order.
    pub fn disks_of(&self, node: &NodeView) -> &[DiskView] {
        self.disks.get(node.disks.clone()).unwrap_or_default()
    }

    /// The disk `disk_id` of node `node_id`.
    pub fn disk(&self, node_id: &str, disk_id: &str) -> Option<&DiskView> {
        self.disk_index(node_id, disk_id).map(|i| &self.disks[i])
    }

    /// The heartbeat age beyond which a node is not ready.
    pub fn heartbeat_timeout_ms(&self) -> u64 {
        self.heartbeat_timeout_ms
    }

    pub(super) fn node_index(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    pub(super) fn disk_index(&self, node_id: &str, disk_id: &str) -> Option<usize> {
        let node = &self.nodes[self.node_index(node_id)?];
        node.disks.clone().find(|&i| self.disks[i].id == disk_id)
    }
}

impl NodeView {
    /// The node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's zone, if it reported one.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The node's tags.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// True when the node's heartbeat is within the timeout.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The operator's lever: false keeps new replicas off the node.
    pub fn is_schedulable(&self) -> bool {
        self.schedulable
    }

    /// Milliseconds since the node's last heartbeat (0 for one from the future).
    pub fn heartbeat_age_ms(&self) -> u64 {
        self.heartbeat_age_ms
    }
}

impl DiskView {
    /// The disk's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The disk's tags.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The operator's lever: false keeps new replicas off the disk.
    pub fn is_schedulable(&self) -> bool {
        self.schedulable
    }

    /// The figures the space checks read, including the bytes scheduled on the disk.
    pub fn space(&self) -> DiskSpace {
        self.space
    }
}
