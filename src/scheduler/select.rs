//! Choosing the disk for each new replica of a volume: one filter pass keeps the candidate
//! disks (grouped by node), then each replica takes the best candidate of the best tier of
//! anti-affinity that the volume allows:
//!
//! 1. a node without a replica of the volume, in a zone without one;
//! 2. a node without a replica, in a zone with one (zone anti-affinity soft);
//! 3. a node with a replica, on a disk without one (zone and node anti-affinity soft: a
//!    used node is always in a used zone, so hard zone anti-affinity forbids it too, as in
//!    Longhorn);
//! 4. a disk with a replica (all three soft), if it still passes both space checks with
//!    the replicas this placement put on it.
//!
//! Among the candidates of a tier, the node whose candidate disks keep the largest share
//! of free space after taking the replica wins, then the same for the disk within it; ties
//! go to the lowest id. Free space counts every scheduled byte as written, so placements
//! spread even over sparse replicas.

use crate::params::SoftAntiAffinity;

use super::filter::{Filter, Refusals};
use super::space::{free_after, Free};
use super::view::ClusterView;

/// The tiers of anti-affinity, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Tier {
    NewZone,
    SameZone,
    SameNode,
    SameDisk,
}

/// One anti-affinity level resolved for a volume, and where the value came from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Softness {
    pub soft: bool,
    /// The per-volume override (Ignored when the setting decided).
    pub override_: SoftAntiAffinity,
    pub param: &'static str,
    pub setting: &'static str,
}

impl Softness {
    /// "replicaSoftAntiAffinity is "disabled"" or "setting replica-soft-anti-affinity is
    /// false": why the level is what it is.
    pub fn source(&self) -> String {
        match self.override_ {
            SoftAntiAffinity::Ignored => format!("setting {} is {}", self.setting, self.soft),
            o => format!("{} is {:?}", self.param, o.as_str()),
        }
    }
}

/// The volume's three anti-affinity levels.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub zone: Softness,
    pub node: Softness,
    pub disk: Softness,
}

impl Policy {
    /// Whether the volume may use a candidate of `tier`.
    pub fn allows(&self, tier: Tier) -> bool {
        match tier {
            Tier::NewZone => true,
            Tier::SameZone => self.zone.soft,
            Tier::SameNode => self.zone.soft && self.node.soft,
            Tier::SameDisk => self.zone.soft && self.node.soft && self.disk.soft,
        }
    }
}

/// A disk that passed the filters.
#[derive(Debug, Clone)]
struct CandidateDisk {
    /// Index in `ClusterView::disks`.
    disk: usize,
    /// Holds a replica of the volume (existing or placed now).
    used: bool,
    /// Bytes this placement put on the disk.
    placed: u64,
}

/// A node with at least one candidate disk.
#[derive(Debug, Clone)]
struct CandidateNode {
    /// Index in `ClusterView::nodes`.
    node: usize,
    zone: usize,
    /// Its disks in `Candidates::disks`.
    disks: std::ops::Range<usize>,
    /// Holds a replica of the volume (existing or placed now).
    used: bool,
    /// Free space of its candidate disks before this placement.
    free: Free,
}

/// A chosen disk: indexes into the candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Choice {
    node: usize,
    disk: usize,
    pub tier: Tier,
}

/// The candidates of one placement and what it has placed so far.
#[derive(Debug)]
pub(super) struct Candidates<'v> {
    view: &'v ClusterView,
    filter: Filter<'v>,
    policy: Policy,
    nodes: Vec<CandidateNode>,
    disks: Vec<CandidateDisk>,
    zone_used: Vec<bool>,
    pub refusals: Refusals,
}

/// Where the volume's existing replicas are, as view indexes.
#[derive(Debug, Default)]
pub(super) struct Used {
    pub nodes: Vec<usize>,
    pub disks: Vec<usize>,
    pub zones: Vec<usize>,
}

impl<'v> Candidates<'v> {
    /// The filter pass over the nodes (all, or only `only_node`): O(nodes + disks).
    pub fn build(
        view: &'v ClusterView,
        filter: Filter<'v>,
        policy: Policy,
        used: &Used,
        only_node: Option<usize>,
    ) -> Self {
        let mut zone_used = vec![false; view.zone_count];
        for &z in &used.zones {
            if let Some(slot) = zone_used.get_mut(z) {
                *slot = true;
            }
        }
        let mut c = Candidates {
            view,
            filter,
            policy,
            nodes: Vec::new(),
            disks: Vec::new(),
            zone_used,
            refusals: Refusals::default(),
        };
        match only_node {
            Some(n) => c.add_node(n, used),
            None => (0..view.nodes.len()).for_each(|n| c.add_node(n, used)),
        }
        c
    }

    fn add_node(&mut self, index: usize, used: &Used) {
        let node = &self.view.nodes[index];
        self.refusals.nodes += 1;
        if let Err(refusal) = self.filter.check_node(node) {
            self.refusals.node(refusal);
            return;
        }
        if node.disks.is_empty() {
            self.refusals.diskless_node();
            return;
        }
        let start = self.disks.len();
        let mut free = Free::default();
        for d in node.disks.clone() {
            let disk = &self.view.disks[d];
            self.refusals.disks += 1;
            match self.filter.check_disk(disk) {
                Ok(()) => {
                    free = free.plus(free_after(&disk.space, 0));
                    self.disks.push(CandidateDisk {
                        disk: d,
                        used: used.disks.contains(&d),
                        placed: 0,
                    });
                }
                Err(refusal) => self.refusals.disk(&self.filter, node, disk, refusal),
            }
        }
        if self.disks.len() > start {
            self.nodes.push(CandidateNode {
                node: index,
                zone: node.zone_index,
                disks: start..self.disks.len(),
                used: used.nodes.contains(&index),
                free,
            });
        }
    }

    /// The best tier a candidate node offers, with the node's score in it.
    fn node_option(&self, n: &CandidateNode) -> Option<(Tier, f64)> {
        let size = self.filter.size;
        if !n.used {
            let tier = if self.zone_used.get(n.zone).copied().unwrap_or(false) {
                Tier::SameZone
            } else {
                Tier::NewZone
            };
            return Some((tier, n.free.ratio_after(size)));
        }
        [Tier::SameNode, Tier::SameDisk]
            .into_iter()
            .find_map(|tier| {
                let free = self
                    .eligible_disks(n, tier)
                    .fold(None, |acc: Option<Free>, d| {
                        let f = self.disk_free(d);
                        Some(acc.map_or(f, |a| a.plus(f)))
                    })?;
                Some((tier, free.ratio_after(size)))
            })
    }

    /// Whether a replica may take candidate disk `d` in `tier`: an unused disk in the first
    /// three tiers; in the last, any disk that still passes the space checks with what this
    /// placement put on it.
    fn is_eligible(&self, d: &CandidateDisk, tier: Tier) -> bool {
        match tier {
            Tier::SameDisk => self
                .filter
                .check_space(&self.view.disks[d.disk].space, d.placed)
                .is_ok(),
            _ => !d.used,
        }
    }

    /// The candidate disks of a node that a replica may take in `tier`.
    fn eligible_disks<'a>(
        &'a self,
        n: &CandidateNode,
        tier: Tier,
    ) -> impl Iterator<Item = &'a CandidateDisk> + 'a {
        self.disks[n.disks.clone()]
            .iter()
            .filter(move |d| self.is_eligible(d, tier))
    }

    fn disk_free(&self, d: &CandidateDisk) -> Free {
        free_after(&self.view.disks[d.disk].space, d.placed)
    }

    /// The best choice among the nodes that pass `keep`, in the best tier the policy allows.
    fn best_where(&self, keep: impl Fn(&CandidateNode) -> bool) -> Option<Choice> {
        let mut best: Option<(Tier, f64, usize)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if !keep(n) {
                continue;
            }
            let Some((tier, score)) = self.node_option(n) else {
                continue;
            };
            if !self.policy.allows(tier) {
                continue;
            }
            let better = match best {
                None => true,
                Some((t, s, _)) => tier < t || (tier == t && score > s),
            };
            if better {
                best = Some((tier, score, i));
            }
        }
        let (tier, _, node) = best?;
        self.best_disk(node, tier)
    }

    /// The best disk of candidate node `node` in `tier`.
    fn best_disk(&self, node: usize, tier: Tier) -> Option<Choice> {
        let n = &self.nodes[node];
        let size = self.filter.size;
        let mut best: Option<(f64, usize)> = None;
        for (offset, d) in self.disks[n.disks.clone()].iter().enumerate() {
            if !self.is_eligible(d, tier) {
                continue;
            }
            let score = self.disk_free(d).ratio_after(size);
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, n.disks.start + offset));
            }
        }
        best.map(|(_, disk)| Choice { node, disk, tier })
    }

    /// The best choice over all candidates.
    pub fn best(&self) -> Option<Choice> {
        self.best_where(|_| true)
    }

    /// The best choice on view node `node` only (for data locality).
    pub fn best_on(&self, node: usize) -> Option<Choice> {
        self.best_where(|n| n.node == node)
    }

    /// Takes a choice: its disk, node and zone now hold a replica of the volume.
    pub fn commit(&mut self, c: Choice) {
        let size = self.filter.size;
        let disk = &mut self.disks[c.disk];
        disk.used = true;
        disk.placed = disk.placed.saturating_add(size);
        let node = &mut self.nodes[c.node];
        node.used = true;
        if let Some(slot) = self.zone_used.get_mut(node.zone) {
            *slot = true;
        }
    }

    /// The (node id, disk id) of a choice.
    pub fn ids(&self, c: Choice) -> (String, String) {
        let disk = &self.view.disks[self.disks[c.disk].disk];
        let node = &self.view.nodes[disk.node];
        (node.id.clone(), disk.id.clone())
    }

    /// Why no candidate is left: which anti-affinity rule excludes how many candidates,
    /// then what the filters refused.
    pub fn why_exhausted(&self) -> String {
        if self.nodes.is_empty() {
            return self.why_no_candidates();
        }
        let mut by_tier = [0usize; 4];
        let mut full = 0;
        for n in &self.nodes {
            match self.node_option(n) {
                Some((tier, _)) => by_tier[tier as usize] += 1,
                None => full += 1,
            }
        }
        let mut parts = Vec::new();
        let zone = self.policy.zone;
        let node = self.policy.node;
        let disk = self.policy.disk;
        let count = |n: usize, what: &str| plural(n, "qualifying node", "qualifying nodes", what);
        if by_tier[Tier::SameZone as usize] > 0 && !zone.soft {
            parts.push(format!(
                "{} in a zone that already holds a replica and zone anti-affinity is hard ({})",
                count(by_tier[Tier::SameZone as usize], "is/are"),
                zone.source()
            ));
        }
        let used_nodes = by_tier[Tier::SameNode as usize] + by_tier[Tier::SameDisk as usize];
        if used_nodes > 0 && !zone.soft {
            parts.push(format!(
                "{} a replica already (and zone anti-affinity is hard: {})",
                count(used_nodes, "holds/hold"),
                zone.source()
            ));
        } else if used_nodes > 0 && !node.soft {
            parts.push(format!(
                "{} a replica already and node anti-affinity is hard ({})",
                count(used_nodes, "holds/hold"),
                node.source()
            ));
        } else if by_tier[Tier::SameDisk as usize] > 0 && !disk.soft {
            parts.push(format!(
                "every qualifying disk of {} a replica already and disk anti-affinity is hard ({})",
                plural(
                    by_tier[Tier::SameDisk as usize],
                    "node",
                    "nodes",
                    "holds/hold"
                ),
                disk.source()
            ));
        }
        if full > 0 {
            parts.push(format!(
                "{} no room for one more replica",
                count(full, "has/have")
            ));
        }
        let mut text = parts.join("; ");
        if !self.refusals.is_empty() {
            text.push_str(&format!(
                "; other nodes and disks refused: {}",
                self.refusals.summary()
            ));
        }
        text
    }

    /// Why no disk passed the filters.
    pub fn why_no_candidates(&self) -> String {
        if self.refusals.nodes == 0 {
            return "the cluster has no nodes".to_string();
        }
        if self.refusals.disks == 0 {
            format!("no node qualifies: {}", self.refusals.summary())
        } else {
            format!("no disk qualifies: {}", self.refusals.summary())
        }
    }
}

/// "1 qualifying node is" / "3 qualifying nodes are": `verbs` is "singular/plural".
fn plural(n: usize, one: &str, many: &str, verbs: &str) -> String {
    let (v1, vn) = verbs.split_once('/').unwrap_or((verbs, verbs));
    if n == 1 {
        format!("1 {one} {v1}")
    } else {
        format!("{n} {many} {vn}")
    }
}
