//! Placement benchmark (plain `fn main`, no harness): 1,000 nodes × 8 disks in 10 zones
//! with 100,000 existing replicas. Times `ClusterView::new` once, then `place` for a
//! 3-replica volume many times, and, as a reference from the same run, a naive sort of all
//! 8,000 disks by free space (the least a scheduler that looks at every disk must do).
//!
//! `cargo bench --bench placement` runs it in full; without `--bench` (as
//! `cargo test --all-targets` runs it) it only does a few placements as a smoke test.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use palisade::model::{Disk, Node, Replica, ReplicaState};
use palisade::params::VolumeParams;
use palisade::scheduler::{place, ClusterView, PlacementRequest};
use palisade::settings::Settings;

const NODES: usize = 1_000;
const DISKS_PER_NODE: usize = 8;
const ZONES: usize = 10;
const REPLICAS: usize = 100_000;
const PLACEMENTS: usize = 10_000;
const SORTS: usize = 1_000;
const GIB: u64 = 1 << 30;
const NOW_MS: u64 = 1_700_000_000_000;
const HEARTBEAT_TIMEOUT_MS: u64 = 10_000;

/// A small deterministic generator, so that every run measures the same cluster.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn nodes(rng: &mut Lcg) -> Vec<Node> {
    (0..NODES)
        .map(|n| Node {
            id: format!("node-{n:04}"),
            address: format!("10.0.{}.{}:7000", n / 250, n % 250),
            agent_address: format!("10.0.{}.{}:7001", n / 250, n % 250),
            zone: Some(format!("zone-{}", n % ZONES)),
            tags: vec![],
            schedulable: true,
            last_heartbeat_ms: NOW_MS,
            disks: (0..DISKS_PER_NODE)
                .map(|d| {
                    let maximum = 4096 * GIB;
                    Disk {
                        id: format!("node-{n:04}-disk-{d}"),
                        path: PathBuf::from(format!("/mnt/disk{d}")),
                        tags: vec![],
                        schedulable: true,
                        storage_maximum: maximum,
                        storage_available: maximum - (rng.next() % 1024) * GIB,
                        storage_reserved: 0,
                    }
                })
                .collect(),
        })
        .collect()
}

fn replicas(rng: &mut Lcg) -> Vec<Replica> {
    (0..REPLICAS)
        .map(|i| {
            let n = (rng.next() as usize) % NODES;
            let d = (rng.next() as usize) % DISKS_PER_NODE;
            Replica {
                id: format!("vol-{:06}-r-{}", i / 3, i % 3),
                volume_id: format!("vol-{:06}", i / 3),
                node_id: format!("node-{n:04}"),
                disk_id: format!("node-{n:04}-disk-{d}"),
                path: PathBuf::from(format!("/mnt/disk{d}/vol-{i}")),
                size: (1 + rng.next() % 20) * GIB,
                state: ReplicaState::Ready,
                failed_ms: 0,
                rebuilt_percent: None,
            }
        })
        .collect()
}

fn params() -> Result<VolumeParams, String> {
    palisade::params::parse(&Default::default(), &Settings::default())
        .map(|p| p.params)
        .map_err(|e| e.to_string())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// p50, p99 and mean of the samples, in µs.
fn stats(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| micros(samples[((samples.len() as f64 - 1.0) * q) as usize]);
    let mean = micros(samples.iter().sum::<Duration>()) / samples.len() as f64;
    (at(0.50), at(0.99), mean)
}

/// Times `place` for a 3-replica volume `runs` times.
fn time_placements(view: &ClusterView, runs: usize) -> Result<Vec<Duration>, String> {
    let params = params()?;
    let settings = Settings::default();
    let req = PlacementRequest {
        volume_id: "bench-volume",
        size: 10 * GIB,
        replica_count: 3,
        params: &params,
        settings: &settings,
        preferred_node: None,
        existing: &[],
    };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let placement = place(black_box(view), black_box(&req)).map_err(|e| e.to_string())?;
        samples.push(start.elapsed());
        if placement.replicas.len() != 3 {
            return Err(format!("expected 3 replicas, got {placement:?}"));
        }
        black_box(placement);
    }
    Ok(samples)
}

/// Times gathering every disk's free space from the view and sorting by it, `runs` times.
fn time_naive_sorts(view: &ClusterView, runs: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut free: Vec<(u64, u32)> = Vec::with_capacity(NODES * DISKS_PER_NODE);
        for node in black_box(view).nodes() {
            for disk in view.disks_of(node) {
                let s = disk.space();
                let left = s.available.saturating_sub(s.reserved + s.scheduled);
                free.push((left, free.len() as u32));
            }
        }
        free.sort_unstable_by(|a, b| b.cmp(a));
        samples.push(start.elapsed());
        black_box(free);
    }
    samples
}

fn main() -> Result<(), String> {
    let full = std::env::args().any(|a| a == "--bench");
    let (placements, sorts) = if full { (PLACEMENTS, SORTS) } else { (10, 10) };
    let mut rng = Lcg(42);
    let nodes = nodes(&mut rng);
    let replicas = replicas(&mut rng);

    let start = Instant::now();
    let view = ClusterView::new(&nodes, &replicas, NOW_MS, HEARTBEAT_TIMEOUT_MS);
    let build = start.elapsed();

    time_placements(&view, placements.min(100))?; // warm-up
    let (p50, p99, mean) = stats(&mut time_placements(&view, placements)?);
    let (s50, s99, smean) = stats(&mut time_naive_sorts(&view, sorts));

    println!(
        "cluster: {NODES} nodes × {DISKS_PER_NODE} disks in {ZONES} zones, {REPLICAS} replicas"
    );
    println!(
        "ClusterView::new: {:.2} ms (once)",
        build.as_secs_f64() * 1e3
    );
    println!(
        "place (3 replicas), {placements} runs: p50 {p50:.1} µs  p99 {p99:.1} µs  mean {mean:.1} µs"
    );
    println!(
        "naive sort of {} disks by free space, {sorts} runs: p50 {s50:.1} µs  p99 {s99:.1} µs  \
         mean {smean:.1} µs",
        NODES * DISKS_PER_NODE
    );
    println!(
        "ratio place / naive sort: p50 {:.2}  mean {:.2}",
        p50 / s50,
        mean / smean
    );
    Ok(())
}
