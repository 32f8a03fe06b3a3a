//! Placement on synthetic clusters: every rule, each fallback tier, each setting that
//! flips an outcome, the space checks at their exact boundaries, and the messages.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::*;
use crate::model::{Disk, Node, Replica, ReplicaState};
use crate::params::{DataLocality, SoftAntiAffinity};

const GIB: u64 = 1 << 30;
const NOW: u64 = 10_000_000;
const TIMEOUT: u64 = 10_000;

fn disk(id: &str, maximum: u64) -> Disk {
    Disk {
        id: id.to_string(),
        path: PathBuf::from(format!("/var/lib/palisade/{id}")),
        tags: vec![],
        schedulable: true,
        storage_maximum: maximum,
        storage_available: maximum,
        storage_reserved: 0,
    }
}

fn node(id: &str, zone: Option<&str>, disks: Vec<Disk>) -> Node {
    Node {
        id: id.to_string(),
        address: format!("{id}:7000"),
        agent_address: format!("{id}:7001"),
        zone: zone.map(str::to_string),
        tags: vec![],
        schedulable: true,
        last_heartbeat_ms: NOW,
        disks,
    }
}

/// `nodes` nodes named n00, n01, ... with `disks` disks of `gib` GiB each (named
/// n00-d0, ...), node i in zone z{i % zones} (no zone when `zones` is 0).
fn cluster(nodes: usize, disks: usize, zones: usize, gib: u64) -> Vec<Node> {
    (0..nodes)
        .map(|i| {
            let id = format!("n{i:02}");
            let zone = (zones > 0).then(|| format!("z{}", i % zones));
            let disks = (0..disks)
                .map(|j| disk(&format!("{id}-d{j}"), gib * GIB))
                .collect();
            node(&id, zone.as_deref(), disks)
        })
        .collect()
}

fn replica(volume: &str, n: usize, node_id: &str, disk_id: &str, size: u64) -> Replica {
    Replica {
        id: format!("{volume}-r-{n}"),
        volume_id: volume.to_string(),
        node_id: node_id.to_string(),
        disk_id: disk_id.to_string(),
        path: PathBuf::from(format!("/r/{volume}-{n}")),
        size,
        state: ReplicaState::Ready,
        failed_ms: 0,
        rebuilt_percent: None,
    }
}

fn default_params() -> VolumeParams {
    match crate::params::parse(&HashMap::new(), &Settings::default()) {
        Ok(p) => p.params,
        Err(e) => panic!("{e}"),
    }
}

/// One placement scenario: the cluster, other volumes' replicas, and the request.
struct Case {
    nodes: Vec<Node>,
    others: Vec<Replica>,
    params: VolumeParams,
    settings: Settings,
    size: u64,
    count: u32,
    preferred: Option<String>,
    existing: Vec<Replica>,
}

impl Case {
    fn new(nodes: Vec<Node>) -> Case {
        Case {
            nodes,
            others: vec![],
            params: default_params(),
            settings: Settings::default(),
            size: 10 * GIB,
            count: 3,
            preferred: None,
            existing: vec![],
        }
    }

    fn count(mut self, count: u32) -> Case {
        self.count = count;
        self
    }

    fn size(mut self, size: u64) -> Case {
        self.size = size;
        self
    }

    fn view(&self) -> ClusterView {
        let all: Vec<Replica> = self.others.iter().chain(&self.existing).cloned().collect();
        ClusterView::new(&self.nodes, &all, NOW, TIMEOUT)
    }

    fn place(&self) -> Result<Placement, PlacementError> {
        let view = self.view();
        place(
            &view,
            &PlacementRequest {
                volume_id: "vol",
                size: self.size,
                replica_count: self.count,
                params: &self.params,
                settings: &self.settings,
                preferred_node: self.preferred.as_deref(),
                existing: &self.existing,
            },
        )
    }

    fn ok(&self) -> Placement {
        match self.place() {
            Ok(p) => p,
            Err(e) => panic!("placement should succeed: {e}"),
        }
    }

    fn err(&self) -> PlacementError {
        match self.place() {
            Ok(p) => panic!("placement should fail, got {p:?}"),
            Err(e) => e,
        }
    }

    fn zone_of(&self, node_id: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.id == node_id)
            .and_then(|n| n.zone.clone())
    }
}

fn nodes_of(p: &Placement) -> Vec<&str> {
    p.replicas.iter().map(|(n, _)| n.as_str()).collect()
}

fn disks_of(p: &Placement) -> Vec<&str> {
    p.replicas.iter().map(|(_, d)| d.as_str()).collect()
}

fn distinct(items: &[&str]) -> usize {
    let mut v = items.to_vec();
    v.sort();
    v.dedup();
    v.len()
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{text:?} should contain {part:?}");
    }
}

fn degraded(p: &Placement) -> &str {
    match &p.degraded_reason {
        Some(r) => r,
        None => panic!("placement should be degraded: {p:?}"),
    }
}

// ---- anti-affinity tiers ----

#[test]
fn replicas_go_to_distinct_zones_first() {
    let case = Case::new(cluster(6, 1, 3, 100));
    let p = case.ok();
    assert_eq!(p.replicas.len(), 3);
    assert_eq!(p.degraded_reason, None);
    let zones: Vec<Option<String>> = nodes_of(&p).iter().map(|n| case.zone_of(n)).collect();
    let mut unique = zones.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "{zones:?}");
}

#[test]
fn soft_zone_anti_affinity_falls_back_to_unused_nodes_in_used_zones() {
    let case = Case::new(cluster(4, 1, 2, 100));
    let p = case.ok();
    assert_eq!(distinct(&nodes_of(&p)), 3);
    let first_two: Vec<Option<String>> =
        nodes_of(&p)[..2].iter().map(|n| case.zone_of(n)).collect();
    assert_ne!(first_two[0], first_two[1], "the first two take both zones");
    assert_eq!(p.degraded_reason, None);
}

#[test]
fn hard_zone_anti_affinity_stops_at_the_number_of_zones() {
    let mut case = Case::new(cluster(4, 1, 2, 100));
    case.params.replica_zone_soft_anti_affinity = SoftAntiAffinity::Disabled;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 2);
    assert_contains(
        degraded(&p),
        &[
            "2 of the 3",
            "zone anti-affinity is hard",
            "replicaZoneSoftAntiAffinity is \"disabled\"",
        ],
    );

    // The same from the setting, with the setting named.
    let mut case = Case::new(cluster(4, 1, 2, 100));
    case.settings.replica_zone_soft_anti_affinity = false;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 2);
    assert_contains(
        degraded(&p),
        &["setting replica-zone-soft-anti-affinity is false"],
    );

    // And the override beats the setting the other way round.
    case.params.replica_zone_soft_anti_affinity = SoftAntiAffinity::Enabled;
    assert_eq!(case.ok().replicas.len(), 3);
}

#[test]
fn nodes_without_a_zone_share_one_zone() {
    let mut case = Case::new(cluster(3, 1, 0, 100));
    assert_eq!(
        case.ok().replicas.len(),
        3,
        "zone anti-affinity is soft by default"
    );
    case.params.replica_zone_soft_anti_affinity = SoftAntiAffinity::Disabled;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 1);
    assert_contains(degraded(&p), &["zone anti-affinity is hard"]);
}

#[test]
fn hard_node_anti_affinity_never_puts_two_replicas_on_one_node() {
    let case = Case::new(cluster(2, 2, 0, 100));
    let p = case.ok();
    assert_eq!(distinct(&nodes_of(&p)), 2);
    assert_eq!(p.replicas.len(), 2);
    assert_contains(
        degraded(&p),
        &[
            "2 qualifying nodes hold a replica already",
            "node anti-affinity is hard (setting replica-soft-anti-affinity is false)",
        ],
    );
}

#[test]
fn soft_node_anti_affinity_uses_another_disk_of_a_used_node() {
    for enable in ["setting", "param"] {
        let mut case = Case::new(cluster(2, 2, 0, 100));
        match enable {
            "setting" => case.settings.replica_soft_anti_affinity = true,
            _ => case.params.replica_soft_anti_affinity = SoftAntiAffinity::Enabled,
        }
        let p = case.ok();
        assert_eq!(p.replicas.len(), 3, "{enable}");
        assert_eq!(distinct(&nodes_of(&p)), 2, "{enable}");
        assert_eq!(
            distinct(&disks_of(&p)),
            3,
            "{enable}: never the same disk twice"
        );
        assert_eq!(p.degraded_reason, None);
    }
}

#[test]
fn hard_zone_anti_affinity_forbids_a_used_node_even_with_soft_node_anti_affinity() {
    let mut case = Case::new(cluster(2, 2, 2, 100));
    case.params.replica_soft_anti_affinity = SoftAntiAffinity::Enabled;
    case.params.replica_zone_soft_anti_affinity = SoftAntiAffinity::Disabled;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 2);
    assert_contains(degraded(&p), &["zone anti-affinity is hard"]);
}

#[test]
fn single_node_spreads_replicas_over_its_disks() {
    let mut case = Case::new(cluster(1, 3, 0, 100));
    case.settings.replica_soft_anti_affinity = true;
    let p = case.ok();
    assert_eq!(distinct(&disks_of(&p)), 3);
    assert_eq!(p.degraded_reason, None);
}

#[test]
fn single_node_with_soft_disk_anti_affinity_doubles_up_as_a_last_resort() {
    let mut case = Case::new(cluster(1, 2, 0, 100));
    case.settings.replica_soft_anti_affinity = true;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 3);
    assert_eq!(distinct(&disks_of(&p)), 2);
    assert_eq!(p.degraded_reason, None);
}

#[test]
fn single_node_with_hard_disk_anti_affinity_places_one_per_disk_and_degrades() {
    for hard in ["setting", "param"] {
        let mut case = Case::new(cluster(1, 2, 0, 100));
        case.settings.replica_soft_anti_affinity = true;
        match hard {
            "setting" => case.settings.replica_disk_soft_anti_affinity = false,
            _ => case.params.replica_disk_soft_anti_affinity = SoftAntiAffinity::Disabled,
        }
        let p = case.ok();
        assert_eq!(p.replicas.len(), 2, "{hard}");
        assert_eq!(distinct(&disks_of(&p)), 2, "{hard}");
        assert_contains(degraded(&p), &["2 of the 3", "disk anti-affinity is hard"]);
    }
}

#[test]
fn an_unused_disk_beats_an_emptier_used_disk() {
    let mut nodes = vec![node(
        "n00",
        None,
        vec![disk("big", 1000 * GIB), disk("small", 100 * GIB)],
    )];
    nodes[0].disks[1].storage_available = 60 * GIB;
    let mut case = Case::new(nodes).count(2);
    case.settings.replica_soft_anti_affinity = true;
    let p = case.ok();
    assert_eq!(disks_of(&p), vec!["big", "small"]);
}

#[test]
fn doubling_up_on_a_disk_rechecks_its_space() {
    // 100 GiB disk: the scheduled check allows 100 GiB, so two replicas of 40 GiB fit
    // and a third does not, although each alone passes.
    let mut case = Case::new(cluster(1, 1, 0, 100)).size(40 * GIB);
    case.settings.replica_soft_anti_affinity = true;
    case.settings.storage_minimal_available_percentage = 0;
    let p = case.ok();
    assert_eq!(p.replicas.len(), 2);
    assert_contains(degraded(&p), &["no room for one more replica"]);
}

// ---- filters ----

#[test]
fn node_selector_keeps_only_tagged_nodes() {
    let mut nodes = cluster(4, 1, 0, 100);
    for n in &mut nodes[2..] {
        n.tags = vec!["ssd".into(), "fast".into()];
    }
    let mut case = Case::new(nodes).count(2);
    case.params.node_selector = vec!["ssd".into(), "fast".into()];
    let p = case.ok();
    assert_eq!(nodes_of(&p), vec!["n02", "n03"]);

    let p = case.count(3).ok();
    assert_eq!(p.replicas.len(), 2);
    assert_contains(degraded(&p), &["2 lack node tag \"ssd\""]);
}

#[test]
fn disk_selector_keeps_only_tagged_disks() {
    let mut nodes = cluster(3, 2, 0, 100);
    for n in &mut nodes {
        n.disks[1].tags = vec!["nvme".into()];
    }
    let mut case = Case::new(nodes);
    case.params.disk_selector = vec!["nvme".into()];
    let p = case.ok();
    assert_eq!(disks_of(&p), vec!["n00-d1", "n01-d1", "n02-d1"]);

    case.params.disk_selector = vec!["nvme".into(), "gold".into()];
    let e = case.err().to_string();
    assert_contains(
        &e,
        &[
            "no disk qualifies",
            "3 lack disk tag \"gold\"",
            "3 lack disk tag \"nvme\"",
        ],
    );
}

#[test]
fn not_ready_and_unschedulable_nodes_are_skipped_and_counted() {
    let mut nodes = cluster(6, 1, 0, 100);
    for n in &mut nodes[..3] {
        n.last_heartbeat_ms = NOW - TIMEOUT - 1;
    }
    nodes[3].schedulable = false;
    nodes[4].schedulable = false;
    let case = Case::new(nodes.clone());
    let p = case.ok();
    assert_eq!(nodes_of(&p), vec!["n05"]);
    assert_contains(
        degraded(&p),
        &["of 6 nodes: 3 not ready, 2 not schedulable"],
    );

    nodes[5].last_heartbeat_ms = 0;
    let e = Case::new(nodes).err();
    assert!(matches!(e, PlacementError::NoRoom { .. }), "{e:?}");
    assert_contains(
        &e.to_string(),
        &["no node qualifies: of 6 nodes: 4 not ready, 2 not schedulable"],
    );
}

#[test]
fn readiness_is_a_heartbeat_within_the_timeout() {
    let mut nodes = cluster(1, 1, 0, 100);
    nodes[0].last_heartbeat_ms = NOW - TIMEOUT;
    assert_eq!(Case::new(nodes.clone()).count(1).ok().replicas.len(), 1);
    nodes[0].last_heartbeat_ms = NOW - TIMEOUT - 1;
    let e = Case::new(nodes.clone()).count(1).err().to_string();
    assert_contains(&e, &["1 not ready"]);
    nodes[0].last_heartbeat_ms = NOW + 5_000; // a clock ahead of ours
    assert_eq!(Case::new(nodes).count(1).ok().replicas.len(), 1);
}

#[test]
fn unschedulable_disks_are_skipped() {
    let mut nodes = cluster(1, 2, 0, 100);
    nodes[0].disks[0].schedulable = false;
    let p = Case::new(nodes.clone()).count(1).ok();
    assert_eq!(disks_of(&p), vec!["n00-d1"]);
    nodes[0].disks[1].schedulable = false;
    assert_contains(
        &Case::new(nodes).count(1).err().to_string(),
        &["2 not schedulable"],
    );
}

/// One node, one disk of 1000 bytes with these figures; one replica of `size`.
fn tiny(available: u64, reserved: u64, scheduled_by_others: u64, size: u64) -> Case {
    let mut d = disk("d", 1000);
    d.storage_available = available;
    d.storage_reserved = reserved;
    let mut case = Case::new(vec![node("n", None, vec![d])])
        .count(1)
        .size(size);
    if scheduled_by_others > 0 {
        case.others = vec![replica("other", 0, "n", "d", scheduled_by_others)];
    }
    case
}

#[test]
fn actual_space_check_at_its_boundary() {
    // minimal available = 25% of 1000 = 250; available − size must stay above it.
    assert!(tiny(350, 0, 0, 99).place().is_ok());
    let e = tiny(350, 0, 0, 100).err().to_string();
    assert_contains(
        &e,
        &[
            "1 fails the actual space check",
            "disk d on node n needs 100 B, 350 B available and 250 B must stay free",
            "storage-minimal-available-percentage 25%",
        ],
    );
    // The setting moves the boundary.
    let mut case = tiny(350, 0, 0, 100);
    case.settings.storage_minimal_available_percentage = 24;
    assert!(case.place().is_ok());
}

#[test]
fn scheduled_space_check_at_its_boundary() {
    // limit = (1000 − 100) × 100% = 900; 800 scheduled by another volume.
    assert!(tiny(1000, 100, 800, 100).place().is_ok());
    let e = tiny(1000, 100, 800, 101).err().to_string();
    assert_contains(
        &e,
        &[
            "1 fails the scheduled space check",
            "needs 101 B, 100 B schedulable: 800 B scheduled of 900 B",
            "storage-over-provisioning-percentage 100%, reserved 100 B",
        ],
    );
}

#[test]
fn reserved_bytes_shrink_the_scheduling_limit() {
    assert!(tiny(1000, 200, 700, 100).place().is_ok()); // limit 800
    assert!(tiny(1000, 201, 700, 100).place().is_err()); // limit 799
}

#[test]
fn over_provisioning_lets_scheduled_bytes_exceed_the_disk() {
    let case = tiny(1000, 100, 1500, 300);
    assert_contains(&case.err().to_string(), &["scheduled space check"]);
    let mut case = tiny(1000, 100, 1500, 300);
    case.settings.storage_over_provisioning_percentage = 200; // limit 1800
    assert!(case.place().is_ok());
    let mut case = tiny(1000, 100, 1500, 301);
    case.settings.storage_over_provisioning_percentage = 200;
    assert!(case.place().is_err());
}

#[test]
fn replicas_of_any_state_count_as_scheduled() {
    let mut case = tiny(1000, 100, 800, 101);
    assert!(case.place().is_err());
    case.others[0].state = ReplicaState::Failed;
    assert!(
        case.place().is_err(),
        "a failed replica still holds its space"
    );
    case.others[0].state = ReplicaState::Creating;
    assert!(case.place().is_err());
}

// ---- score ----

#[test]
fn the_emptier_node_wins() {
    let mut nodes = cluster(2, 1, 0, 100);
    nodes[0].disks[0].storage_available = 50 * GIB;
    nodes[1].disks[0].storage_available = 90 * GIB;
    assert_eq!(
        nodes_of(&Case::new(nodes.clone()).count(1).ok()),
        vec!["n01"]
    );
    nodes[0].disks[0].storage_available = 95 * GIB;
    assert_eq!(nodes_of(&Case::new(nodes).count(1).ok()), vec!["n00"]);
}

#[test]
fn the_emptier_disk_of_a_node_wins() {
    let mut nodes = cluster(1, 2, 0, 100);
    nodes[0].disks[0].storage_available = 60 * GIB;
    assert_eq!(
        disks_of(&Case::new(nodes.clone()).count(1).ok()),
        vec!["n00-d1"]
    );
    let mut case = Case::new(cluster(1, 2, 0, 100)).count(1);
    case.others = vec![replica("other", 0, "n00", "n00-d1", 20 * GIB)];
    assert_eq!(
        disks_of(&case.ok()),
        vec!["n00-d0"],
        "scheduled bytes count too"
    );
}

#[test]
fn free_space_is_compared_as_a_share_of_the_disk() {
    // 1 TiB with 200 GiB used has more free bytes than 100 GiB with 10 GiB used, but a
    // smaller share free (80% against 90%): the share decides.
    let mut nodes = vec![
        node("a", None, vec![disk("a-d", 1024 * GIB)]),
        node("b", None, vec![disk("b-d", 100 * GIB)]),
    ];
    nodes[0].disks[0].storage_available = 824 * GIB;
    nodes[1].disks[0].storage_available = 90 * GIB;
    assert_eq!(
        nodes_of(&Case::new(nodes).count(1).size(GIB).ok()),
        vec!["b"]
    );
}

#[test]
fn ties_go_to_the_lowest_id() {
    let mut nodes = cluster(4, 2, 0, 100);
    nodes.reverse();
    let p = Case::new(nodes).count(1).ok();
    assert_eq!(p.replicas, vec![("n00".to_string(), "n00-d0".to_string())]);
}

#[test]
fn many_placements_spread_evenly() {
    let case = Case::new(cluster(6, 2, 3, 1000));
    let mut view = case.view();
    let params = default_params();
    let settings = Settings::default();
    let mut per_disk: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..40 {
        let volume_id = format!("v{i}");
        let req = PlacementRequest {
            volume_id: &volume_id,
            size: 10 * GIB,
            replica_count: 3,
            params: &params,
            settings: &settings,
            preferred_node: None,
            existing: &[],
        };
        let p = match place(&view, &req) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.replicas.len(), 3);
        for (n, d) in &p.replicas {
            assert!(view.record_replica(n, d, 10 * GIB));
            *per_disk.entry(d.clone()).or_default() += 1;
        }
    }
    // 120 replicas on 12 disks: exactly 10 each.
    assert_eq!(per_disk.len(), 12);
    assert!(per_disk.values().all(|&n| n == 10), "{per_disk:?}");
}

// ---- data locality ----

#[test]
fn best_effort_puts_the_first_replica_on_the_preferred_node() {
    let mut nodes = cluster(4, 1, 0, 100);
    nodes[3].disks[0].storage_available = 40 * GIB; // the fullest node
    let mut case = Case::new(nodes);
    case.params.data_locality = DataLocality::BestEffort;
    case.preferred = Some("n03".into());
    let p = case.ok();
    assert_eq!(nodes_of(&p)[0], "n03");
    assert_eq!(distinct(&nodes_of(&p)), 3);
    assert_eq!(p.locality_note, None);

    // Without locality, the fullest node is left out.
    case.params.data_locality = DataLocality::Disabled;
    assert!(!nodes_of(&case.ok()).contains(&"n03"));
}

#[test]
fn best_effort_explains_a_missing_local_replica() {
    let mut nodes = cluster(4, 1, 0, 100);
    nodes[3].last_heartbeat_ms = 0;
    let mut case = Case::new(nodes);
    case.params.data_locality = DataLocality::BestEffort;
    case.preferred = Some("n03".into());
    let p = case.ok();
    assert_eq!(p.replicas.len(), 3);
    assert!(!nodes_of(&p).contains(&"n03"));
    assert_eq!(
        p.degraded_reason, None,
        "a missing local replica is not degraded"
    );
    let note = p.locality_note.clone().unwrap_or_default();
    assert_contains(&note, &["preferred node n03", "node n03 is not ready"]);

    case.preferred = Some("ghost".into());
    let note = case.ok().locality_note.unwrap_or_default();
    assert_contains(&note, &["ghost is not a known node"]);

    case.preferred = None;
    let note = case.ok().locality_note.unwrap_or_default();
    assert_contains(&note, &["no preferred node"]);

    // A preferred node whose disks are full: the note gives the disk's figures.
    let mut nodes = cluster(4, 1, 0, 100);
    nodes[3].disks[0].storage_available = 20 * GIB;
    let mut case = Case::new(nodes);
    case.params.data_locality = DataLocality::BestEffort;
    case.preferred = Some("n03".into());
    let note = case.ok().locality_note.unwrap_or_default();
    assert_contains(
        &note,
        &["no disk on node n03 qualifies", "disk n03-d0 needs 10 GiB"],
    );
}

#[test]
fn best_effort_adds_nothing_when_the_preferred_node_has_a_replica() {
    let mut case = Case::new(cluster(4, 1, 0, 100));
    case.params.data_locality = DataLocality::BestEffort;
    case.preferred = Some("n01".into());
    case.existing = vec![replica("vol", 0, "n01", "n01-d0", 10 * GIB)];
    let p = case.ok();
    assert_eq!(p.replicas.len(), 2);
    assert!(!nodes_of(&p).contains(&"n01"));
    assert_eq!(p.locality_note, None);
}

#[test]
fn strict_local_places_on_the_preferred_node_or_fails_saying_why() {
    let mut nodes = cluster(3, 1, 0, 100);
    nodes[2].disks[0].storage_available = 50 * GIB;
    let mut case = Case::new(nodes).count(1);
    case.params.data_locality = DataLocality::StrictLocal;
    case.params.number_of_replicas = 1;

    assert_eq!(
        case.err(),
        PlacementError::StrictLocalWithoutNode {
            volume_id: "vol".into()
        }
    );
    assert_contains(&case.err().to_string(), &["WaitForFirstConsumer"]);

    case.preferred = Some("n02".into());
    assert_eq!(nodes_of(&case.ok()), vec!["n02"]);

    case.size = 30 * GIB; // 50 − 30 = 20 GiB left, 25 GiB must stay free
    match case.err() {
        PlacementError::StrictLocalNodeUnfit {
            node_id, reason, ..
        } => {
            assert_eq!(node_id, "n02");
            assert_contains(
                &reason,
                &["no disk on node n02 qualifies", "must stay free"],
            );
        }
        other => panic!("{other:?}"),
    }

    case.size = 10 * GIB;
    case.nodes[2].schedulable = false;
    assert_contains(&case.err().to_string(), &["node n02 is not schedulable"]);

    case.preferred = Some("ghost".into());
    assert_contains(&case.err().to_string(), &["ghost", "not a known node"]);
}

// ---- degraded availability ----

#[test]
fn degraded_placement_follows_the_setting() {
    let mut case = Case::new(cluster(2, 1, 0, 100));
    assert_eq!(case.ok().replicas.len(), 2);
    case.settings
        .allow_volume_creation_with_degraded_availability = false;
    match case.err() {
        e @ PlacementError::NotEnoughRoom { .. } => {
            assert_contains(
                &e.to_string(),
                &[
                    "only 2 of the 3",
                    "allow-volume-creation-with-degraded-availability is false",
                    "node anti-affinity is hard",
                ],
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nothing_placeable_is_an_error_even_when_degraded_is_allowed() {
    let case = Case::new(cluster(3, 1, 0, 10)); // 10 GiB disks, 10 GiB replicas
    match case.err() {
        e @ PlacementError::NoRoom { .. } => assert_contains(
            &e.to_string(),
            &[
                "cannot place any of the 3 missing replicas of volume vol (10 GiB each)",
                "no disk qualifies: of 3 disks on the other nodes: 3 fail the actual space check",
                "(e.g. disk n00-d0 on node n00 needs 10 GiB",
            ],
        ),
        other => panic!("{other:?}"),
    }
    assert_contains(
        &Case::new(vec![]).err().to_string(),
        &["the cluster has no nodes"],
    );
    assert_contains(
        &Case::new(vec![node("bare", None, vec![])])
            .err()
            .to_string(),
        &["1 has no disks"],
    );
}

// ---- replacements ----

#[test]
fn existing_replicas_make_their_node_zone_and_disk_used() {
    let mut case = Case::new(cluster(6, 1, 3, 100));
    case.existing = vec![
        replica("vol", 0, "n00", "n00-d0", 10 * GIB), // zone z0
        replica("vol", 1, "n04", "n04-d0", 10 * GIB), // zone z1
    ];
    let p = case.ok();
    // n01 has the lowest id of the unused nodes, but its zone z1 is used.
    assert_eq!(nodes_of(&p), vec!["n02"]);
    assert_eq!(case.zone_of("n02").as_deref(), Some("z2"));

    case.count = 2;
    assert_eq!(case.ok(), Placement::default(), "nothing is missing");

    // The existing replica's disk is used: the new one takes the other disk of the node,
    // although the used one is emptier.
    let mut nodes = vec![node(
        "n",
        None,
        vec![disk("big", 1000 * GIB), disk("small", 100 * GIB)],
    )];
    nodes[0].disks[1].storage_available = 60 * GIB;
    let mut case = Case::new(nodes).count(2);
    case.settings.replica_soft_anti_affinity = true;
    case.existing = vec![replica("vol", 0, "n", "big", 10 * GIB)];
    assert_eq!(disks_of(&case.ok()), vec!["small"]);

    // A replacement that cannot go anywhere is an error, not an empty success.
    let mut case = Case::new(cluster(2, 1, 0, 100));
    case.existing = vec![
        replica("vol", 0, "n00", "n00-d0", 10 * GIB),
        replica("vol", 1, "n01", "n01-d0", 10 * GIB),
    ];
    assert!(matches!(case.err(), PlacementError::NoRoom { .. }));
}

// ---- view and capacity ----

#[test]
fn the_view_sums_scheduled_bytes_and_ignores_unknown_disks() {
    let nodes = cluster(2, 2, 0, 100);
    let replicas = vec![
        replica("a", 0, "n00", "n00-d1", 3 * GIB),
        replica("b", 0, "n00", "n00-d1", 4 * GIB),
        replica("c", 0, "n00", "ghost", 5 * GIB),
        replica("d", 0, "ghost", "n00-d1", 6 * GIB),
    ];
    let mut view = ClusterView::new(&nodes, &replicas, NOW, TIMEOUT);
    let scheduled = |v: &ClusterView, n: &str, d: &str| v.disk(n, d).map(|d| d.space().scheduled);
    assert_eq!(scheduled(&view, "n00", "n00-d1"), Some(7 * GIB));
    assert_eq!(scheduled(&view, "n00", "n00-d0"), Some(0));
    assert!(view.record_replica("n01", "n01-d0", GIB));
    assert_eq!(scheduled(&view, "n01", "n01-d0"), Some(GIB));
    assert!(!view.record_replica("n01", "ghost", GIB));
    assert!(!view.record_replica("ghost", "n01-d0", GIB));
}

#[test]
fn the_view_keeps_the_first_of_duplicate_ids_and_sorts_nodes() {
    let mut nodes = cluster(2, 1, 0, 100);
    let mut dup = nodes[0].clone();
    dup.schedulable = false;
    nodes.push(dup);
    nodes.reverse(); // n00 (unschedulable copy) now comes first
    let view = ClusterView::new(&nodes, &[], NOW, TIMEOUT);
    let ids: Vec<&str> = view.nodes().iter().map(|n| n.id()).collect();
    assert_eq!(ids, vec!["n00", "n01"]);
    assert_eq!(view.node("n00").map(|n| n.is_schedulable()), Some(false));
}

#[test]
fn capacity_is_the_headroom_that_placement_honours() {
    let mut nodes = cluster(3, 2, 0, 100);
    nodes[0].disks[0].storage_available = 60 * GIB; // actual headroom 35 GiB − 1
    nodes[0].disks[1].storage_reserved = 30 * GIB; // scheduled headroom 70 GiB
    nodes[1].disks[0].schedulable = false;
    nodes[2].last_heartbeat_ms = 0;
    let view = ClusterView::new(&nodes, &[], NOW, TIMEOUT);
    let settings = Settings::default();
    let params = default_params();
    let c = capacity(&view, &params, &settings, |_| true);
    let d00 = 35 * GIB - 1;
    let d01 = 70 * GIB;
    let d11 = 75 * GIB - 1;
    assert_eq!(c.available_bytes, d00 + d01 + d11);
    assert_eq!(c.maximum_volume_size, d11);

    let only_n00 = capacity(&view, &params, &settings, |n| n.id() == "n00");
    assert_eq!(only_n00.available_bytes, d00 + d01);
    assert_eq!(only_n00.maximum_volume_size, d01);

    // The figure is exact: a replica of that size fits on the disk, one byte more does not.
    let one_disk = vec![node("n", None, vec![nodes[0].disks[0].clone()])];
    let max = capacity(
        &ClusterView::new(&one_disk, &[], NOW, TIMEOUT),
        &params,
        &settings,
        |_| true,
    )
    .maximum_volume_size;
    assert_eq!(max, d00);
    assert!(Case::new(one_disk.clone())
        .count(1)
        .size(max)
        .place()
        .is_ok());
    assert!(Case::new(one_disk).count(1).size(max + 1).place().is_err());
}

#[test]
fn capacity_honours_the_selectors() {
    let mut nodes = cluster(2, 2, 0, 100);
    nodes[1].tags = vec!["ssd".into()];
    nodes[1].disks[0].tags = vec!["nvme".into()];
    let view = ClusterView::new(&nodes, &[], NOW, TIMEOUT);
    let settings = Settings::default();
    let mut params = default_params();
    let full_disk = 75 * GIB - 1;
    assert_eq!(
        capacity(&view, &params, &settings, |_| true).available_bytes,
        4 * full_disk
    );
    params.node_selector = vec!["ssd".into()];
    assert_eq!(
        capacity(&view, &params, &settings, |_| true).available_bytes,
        2 * full_disk
    );
    params.disk_selector = vec!["nvme".into()];
    assert_eq!(
        capacity(&view, &params, &settings, |_| true).available_bytes,
        full_disk
    );
    params.disk_selector = vec!["gold".into()];
    assert_eq!(
        capacity(&view, &params, &settings, |_| true),
        Capacity::default()
    );
}
