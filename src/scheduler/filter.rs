//! The hard filters of placement, as small pure checks: which nodes may take a replica at
//! all (ready, schedulable, every nodeSelector tag) and which of their disks (schedulable,
//! every diskSelector tag, both space checks). Each refusal says why, and the refusals of a
//! whole pass are tallied so that an error can say "3 nodes not ready, 2 lack tag ssd".

use std::collections::BTreeMap;

use super::space::{human, DiskSpace, SpacePolicy};
use super::view::{ClusterView, DiskView, NodeView};

/// What one placement asks of a node and a disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Filter<'a> {
    pub node_selector: &'a [String],
    pub disk_selector: &'a [String],
    pub size: u64,
    pub space: SpacePolicy,
    pub heartbeat_timeout_ms: u64,
}

/// Why a node cannot take a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NodeRefusal {
    NotReady { heartbeat_age_ms: u64 },
    Unschedulable,
    MissingTag(String),
}

/// Why a disk cannot take a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DiskRefusal {
    Unschedulable,
    MissingTag(String),
    NoCapacity,
    ActualSpace,
    ScheduledSpace,
}

/// The first selector tag that `tags` lacks.
fn missing_tag(selector: &[String], tags: &[String]) -> Option<String> {
    selector.iter().find(|t| !tags.contains(t)).cloned()
}

impl Filter<'_> {
    /// The node filter: ready, schedulable, has every nodeSelector tag.
    pub fn check_node(&self, node: &NodeView) -> Result<(), NodeRefusal> {
        if !node.ready {
            return Err(NodeRefusal::NotReady {
                heartbeat_age_ms: node.heartbeat_age_ms,
            });
        }
        if !node.schedulable {
            return Err(NodeRefusal::Unschedulable);
        }
        match missing_tag(self.node_selector, &node.tags) {
            Some(tag) => Err(NodeRefusal::MissingTag(tag)),
            None => Ok(()),
        }
    }

    /// The disk filter: the disk's attributes, then the actual and the scheduled space
    /// checks for a replica of `size`.
    pub fn check_disk(&self, disk: &DiskView) -> Result<(), DiskRefusal> {
        self.check_disk_attributes(disk)?;
        self.check_space(&disk.space, 0)
    }

    /// The disk filter without the space checks: schedulable, has every diskSelector tag,
    /// reports a capacity.
    pub fn check_disk_attributes(&self, disk: &DiskView) -> Result<(), DiskRefusal> {
        if !disk.schedulable {
            return Err(DiskRefusal::Unschedulable);
        }
        if let Some(tag) = missing_tag(self.disk_selector, &disk.tags) {
            return Err(DiskRefusal::MissingTag(tag));
        }
        if disk.space.maximum == 0 {
            return Err(DiskRefusal::NoCapacity);
        }
        Ok(())
    }

    /// The two space checks, with `placed` bytes already placed on the disk by this
    /// placement (they count as used and as scheduled).
    pub fn check_space(&self, space: &DiskSpace, placed: u64) -> Result<(), DiskRefusal> {
        let space = DiskSpace {
            available: space.available.saturating_sub(placed),
            scheduled: space.scheduled.saturating_add(placed),
            ..*space
        };
        if !self.space.actual_fits(&space, self.size) {
            Err(DiskRefusal::ActualSpace)
        } else if !self.space.scheduled_fits(&space, self.size) {
            Err(DiskRefusal::ScheduledSpace)
        } else {
            Ok(())
        }
    }

    /// Why a node refuses, in words.
    pub fn describe_node(&self, node: &NodeView, refusal: &NodeRefusal) -> String {
        match refusal {
            NodeRefusal::NotReady { heartbeat_age_ms } => format!(
                "node {} is not ready (last heartbeat {} s ago, timeout {} s)",
                node.id,
                heartbeat_age_ms / 1000,
                self.heartbeat_timeout_ms / 1000
            ),
            NodeRefusal::Unschedulable => format!("node {} is not schedulable", node.id),
            NodeRefusal::MissingTag(tag) => format!("node {} lacks node tag {tag:?}", node.id),
        }
    }

    /// Why a disk refuses, in words, with the figures of the space check that failed;
    /// `node` names the disk's node when the context does not.
    pub fn describe_disk(
        &self,
        node: Option<&NodeView>,
        disk: &DiskView,
        refusal: &DiskRefusal,
    ) -> String {
        let d = &disk.space;
        let what = match refusal {
            DiskRefusal::Unschedulable => "is not schedulable".to_string(),
            DiskRefusal::MissingTag(tag) => format!("lacks disk tag {tag:?}"),
            DiskRefusal::NoCapacity => "reports no capacity".to_string(),
            DiskRefusal::ActualSpace => format!(
                "needs {}, {} available and {} must stay free \
                 (storage-minimal-available-percentage {}% of {})",
                human(self.size),
                human(d.available),
                human(self.space.minimal_available(d)),
                self.space.minimal_available_pct,
                human(d.maximum)
            ),
            DiskRefusal::ScheduledSpace => format!(
                "needs {}, {} schedulable: {} scheduled of {} \
                 (storage-over-provisioning-percentage {}%, reserved {})",
                human(self.size),
                human(self.space.scheduled_headroom(d)),
                human(d.scheduled),
                human(self.space.provisioning_limit(d)),
                self.space.over_provisioning_pct,
                human(d.reserved)
            ),
        };
        match node {
            Some(node) => format!("disk {} on node {} {what}", disk.id, node.id),
            None => format!("disk {} {what}", disk.id),
        }
    }

    /// Everything that keeps one node from taking the replica, or None when some disk of
    /// the node passes every filter (then only anti-affinity can be in the way).
    pub fn explain_node(&self, view: &ClusterView, node: &NodeView) -> Option<String> {
        if let Err(refusal) = self.check_node(node) {
            return Some(self.describe_node(node, &refusal));
        }
        let disks = view.disks_of(node);
        if disks.is_empty() {
            return Some(format!("node {} has no disks", node.id));
        }
        let mut reasons = Vec::with_capacity(disks.len());
        for disk in disks {
            match self.check_disk(disk) {
                Ok(()) => return None,
                Err(refusal) => reasons.push(self.describe_disk(None, disk, &refusal)),
            }
        }
        Some(format!(
            "no disk on node {} qualifies: {}",
            node.id,
            reasons.join("; ")
        ))
    }
}

/// The refusals of one filter pass, counted by reason.
#[derive(Debug, Default, Clone)]
pub(super) struct Refusals {
    pub nodes: usize,
    not_ready: usize,
    unschedulable_nodes: usize,
    missing_node_tag: BTreeMap<String, usize>,
    diskless_nodes: usize,
    pub disks: usize,
    unschedulable_disks: usize,
    missing_disk_tag: BTreeMap<String, usize>,
    no_capacity: usize,
    actual_space: usize,
    scheduled_space: usize,
    /// The first space refusal in words, as an example of the figures.
    space_example: Option<String>,
}

impl Refusals {
    /// Counts a node refusal.
    pub fn node(&mut self, refusal: NodeRefusal) {
        match refusal {
            NodeRefusal::NotReady { .. } => self.not_ready += 1,
            NodeRefusal::Unschedulable => self.unschedulable_nodes += 1,
            NodeRefusal::MissingTag(tag) => *self.missing_node_tag.entry(tag).or_default() += 1,
        }
    }

    /// Counts a node that passed the node filter but has no disks.
    pub fn diskless_node(&mut self) {
        self.diskless_nodes += 1;
    }

    /// Counts a disk refusal; the first space refusal is kept in words as an example.
    pub fn disk(
        &mut self,
        filter: &Filter<'_>,
        node: &NodeView,
        disk: &DiskView,
        refusal: DiskRefusal,
    ) {
        match &refusal {
            DiskRefusal::Unschedulable => self.unschedulable_disks += 1,
            DiskRefusal::MissingTag(tag) => {
                *self.missing_disk_tag.entry(tag.clone()).or_default() += 1
            }
            DiskRefusal::NoCapacity => self.no_capacity += 1,
            DiskRefusal::ActualSpace => self.actual_space += 1,
            DiskRefusal::ScheduledSpace => self.scheduled_space += 1,
        }
        let is_space = matches!(
            refusal,
            DiskRefusal::ActualSpace | DiskRefusal::ScheduledSpace
        );
        if is_space && self.space_example.is_none() {
            self.space_example = Some(filter.describe_disk(Some(node), disk, &refusal));
        }
    }

    /// True when no node and no disk was refused.
    pub fn is_empty(&self) -> bool {
        self.node_parts().is_empty() && self.disk_parts().is_empty()
    }

    fn node_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        push_count(&mut parts, self.not_ready, "not ready", "not ready");
        push_count(
            &mut parts,
            self.unschedulable_nodes,
            "not schedulable",
            "not schedulable",
        );
        for (tag, n) in &self.missing_node_tag {
            push_count(
                &mut parts,
                *n,
                &format!("lacks node tag {tag:?}"),
                &format!("lack node tag {tag:?}"),
            );
        }
        push_count(
            &mut parts,
            self.diskless_nodes,
            "has no disks",
            "have no disks",
        );
        parts
    }

    fn disk_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        push_count(
            &mut parts,
            self.unschedulable_disks,
            "not schedulable",
            "not schedulable",
        );
        for (tag, n) in &self.missing_disk_tag {
            push_count(
                &mut parts,
                *n,
                &format!("lacks disk tag {tag:?}"),
                &format!("lack disk tag {tag:?}"),
            );
        }
        push_count(
            &mut parts,
            self.no_capacity,
            "reports no capacity",
            "report no capacity",
        );
        push_count(
            &mut parts,
            self.actual_space,
            "fails the actual space check",
            "fail the actual space check",
        );
        push_count(
            &mut parts,
            self.scheduled_space,
            "fails the scheduled space check",
            "fail the scheduled space check",
        );
        parts
    }

    /// The tally in words: "of 5 nodes: 3 not ready, 2 lack node tag "ssd"; of 8 disks on
    /// the other nodes: 2 fail the actual space check (e.g. ...)".
    pub fn summary(&self) -> String {
        let mut out = Vec::new();
        let nodes = self.node_parts();
        if !nodes.is_empty() {
            out.push(format!("of {} nodes: {}", self.nodes, nodes.join(", ")));
        }
        let disks = self.disk_parts();
        if !disks.is_empty() {
            let mut text = format!(
                "of {} disks on the other nodes: {}",
                self.disks,
                disks.join(", ")
            );
            if let Some(example) = &self.space_example {
                text.push_str(&format!(" (e.g. {example})"));
            }
            out.push(text);
        }
        out.join("; ")
    }
}

fn push_count(parts: &mut Vec<String>, n: usize, one: &str, many: &str) {
    match n {
        0 => {}
        1 => parts.push(format!("1 {one}")),
        n => parts.push(format!("{n} {many}")),
    }
}
