//! Fault injection at random points (issue 4): for each seed, a cluster of four real nodes and
//! a controller, a 3-replica block volume of 128 MiB attached on one node and written in
//! full, four writer threads doing 4 KiB `O_DIRECT` writes, each followed by `fdatasync`, at
//! pseudo-random blocks of its first 32 MiB (each thread its own blocks, so that a block has
//! at most one write in flight), and one fault chosen by the seed: kill -9 of
//!
//! - the controller (sometimes while a replica is being rebuilt),
//! - the engine's node (the node where the volume is attached; its engine dies with it): the
//!   volume is then staged again on the restarted node, or taken over by another node,
//! - a replica's node (not the attached one), which comes back after a while,
//! - the rebuild source: a replica's node is killed so that a replacement is rebuilt, and
//!   while the rebuild runs, the node of a member it copies from is killed too,
//!
//! each at a moment drawn from the seed. The killed processes are restarted and the volume
//! must recover: three ready replicas and no degraded reason. Then the checker:
//!
//! 1. every block reads back through the volume's device with its last acknowledged content,
//!    or with the content of a write to it that was in flight when a failure hit;
//! 2. after a clean detach, every ready member's data file holds exactly the content the
//!    device showed for every block, and the members are byte-identical: a stale replica let
//!    in as a member would have kept (or served) stale blocks;
//! 3. while the workload ran, `ctl volume` was sampled: a replica never became ready again
//!    (from failed, creating or rebuilding) without the controller logging its promotion
//!    after a completed rebuild.
//!
//! Seeds: `PALISADE_FAULT_SEEDS` (how many, default 16: seed `i` injects fault `i % 4`, so
//! each test below runs four, one after the other), or `PALISADE_FAULT_SEED` to replay one. A failure names the
//! seed and the fault, and keeps the processes' logs (the path is in the message);
//! `PALISADE_FAULT_KEEP_LOGS=1` keeps them for passing seeds too.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use palisade::csi::v1 as pb;
use serde_json::Value;

/// The volume's size; all of it is written before the faults, so that a rebuild copies
/// all of it and lasts a few seconds.
const VOLUME: u64 = 128 * MIB;
/// The writer's blocks.
const BLOCK: usize = 4096;
/// The writer writes in the first `REGION` bytes.
const REGION: u64 = 32 * MIB;
const BLOCKS: u64 = VOLUME / BLOCK as u64;

/// The four faults; seed `i` injects `FAULTS[i % 4]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Controller,
    EngineNode,
    ReplicaNode,
    RebuildSource,
}

const FAULTS: [Fault; 4] = [
    Fault::Controller,
    Fault::EngineNode,
    Fault::ReplicaNode,
    Fault::RebuildSource,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_controller_at_random_moments() {
    run_seeds(Fault::Controller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_engines_node_at_random_moments() {
    run_seeds(Fault::EngineNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_replicas_node_at_random_moments() {
    run_seeds(Fault::ReplicaNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_rebuild_source_at_random_moments() {
    run_seeds(Fault::RebuildSource).await;
}

/// The seeds of this run that inject `fault`.
fn seeds_for(fault: Fault) -> Vec<u64> {
    let env = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
    };
    let all: Vec<u64> = match env("PALISADE_FAULT_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("PALISADE_FAULT_SEEDS").unwrap_or(16)).collect(),
    };
    all.into_iter()
        .filter(|s| FAULTS[(*s % 4) as usize] == fault)
        .collect()
}

async fn run_seeds(fault: Fault) {
    for seed in seeds_for(fault) {
        run_seed(seed, fault).await;
    }
}

/// SplitMix64: small, deterministic, good enough to draw the faults and the blocks.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// The content of generation `generation` of `block` in seed `seed`'s run: a header naming
/// all three (so a wrong block says what it holds), then bytes drawn from them.
fn content(seed: u64, block: u64, generation: u64) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    out[..8].copy_from_slice(b"PALFAULT");
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    out[24..32].copy_from_slice(&generation.to_le_bytes());
    let mut rng = Rng(seed ^ block.rotate_left(20) ^ generation.rotate_left(40));
    for chunk in out[32..].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    out
}

/// What a block holds, in words, for failure messages.
fn describe(bytes: &[u8], seed: u64, block: u64) -> String {
    if bytes.iter().all(|b| *b == 0) {
        return "zeros".into();
    }
    if &bytes[..8] != b"PALFAULT" {
        return "bytes the writer never wrote".into();
    }
    let field = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let (s, b, g) = (field(8), field(16), field(24));
    let intact = bytes == content(s, b, g);
    format!(
        "generation {g}{}{}",
        if (s, b) != (seed, block) {
            format!(" of block {b} (seed {s})")
        } else {
            String::new()
        },
        if intact { "" } else { ", torn" }
    )
}

/// A page-aligned buffer for `O_DIRECT`, without unsafe code.
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + 4096];
        let at = buf.as_ptr().align_offset(4096);
        assert!(at < 4096);
        Aligned { buf, at, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

fn open_direct(device: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
}

/// What the writers did: for each block, its last acknowledged generation and the
/// generations written after that whose outcome is unknown (their write or the sync after
/// it failed).
struct Log {
    acked: Vec<u64>,
    unknown: BTreeMap<u64, Vec<u64>>,
    next_generation: u64,
    writes: u64,
    failures: Vec<String>,
    /// One per writer thread.
    rngs: Vec<Rng>,
}

impl Log {
    fn allowed(&self, block: u64) -> Vec<u64> {
        let mut allowed = vec![self.acked[block as usize]];
        if let Some(unknown) = self.unknown.get(&block) {
            allowed.extend(unknown);
        }
        allowed
    }

    fn holds_allowed(&self, seed: u64, block: u64, bytes: &[u8]) -> bool {
        self.allowed(block)
            .into_iter()
            .any(|g| bytes == content(seed, block, g))
    }

    /// Why `bytes` is not an allowed content of `block`.
    fn complaint(&self, seed: u64, block: u64, bytes: &[u8]) -> String {
        format!(
            "block {block} (offset {}) holds {}, but its last acknowledged write is generation {}{}",
            block * BLOCK as u64,
            describe(bytes, seed, block),
            self.acked[block as usize],
            match self.unknown.get(&block) {
                Some(u) => format!(" (and writes of generations {u:?} were in flight at failures)"),
                None => String::new(),
            }
        )
    }
}

/// Fills the whole volume through `device` (generation 0 of every block), synced.
fn prefill(device: &Path, seed: u64) -> Log {
    let file = open_direct(device).expect("open the volume's device");
    let per = 256usize;
    let mut buf = Aligned::new(per * BLOCK);
    for first in (0..BLOCKS).step_by(per) {
        for (i, chunk) in buf.bytes_mut().chunks_mut(BLOCK).enumerate() {
            chunk.copy_from_slice(&content(seed, first + i as u64, 0));
        }
        file.write_all_at(buf.bytes(), first * BLOCK as u64)
            .expect("prefill the volume");
    }
    file.sync_data().expect("sync the prefill");
    Log {
        acked: vec![0; BLOCKS as usize],
        unknown: BTreeMap::new(),
        next_generation: 1,
        writes: 0,
        failures: Vec::new(),
        rngs: (0..WRITERS as u64)
            .map(|t| Rng(seed ^ 0x5752_4954_4552 ^ (t << 56)))
            .collect(),
    }
}

/// Writer threads, each with blocks of its own (those equal to its index modulo
/// `WRITERS`), so that a block has at most one write in flight while several blocks do.
const WRITERS: usize = 4;

/// Threads writing random blocks of the region through the device until stopped, each until
/// a write of its own fails (then it closes the device and stops, so that the device can be
/// torn down).
struct Writer {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts writing; the failures of `log` (already told) are forgotten.
    fn start(device: &Path, seed: u64, mut log: Log) -> Writer {
        log.failures.clear();
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(log));
        let threads = (0..WRITERS)
            .map(|thread| {
                let (stop, failed, log) =
                    (Arc::clone(&stop), Arc::clone(&failed), Arc::clone(&log));
                let device = device.to_path_buf();
                std::thread::spawn(move || {
                    write_until_stopped(&device, seed, thread, &log, &stop, &failed)
                })
            })
            .collect();
        Writer {
            stop,
            failed,
            log,
            threads,
        }
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops the writers (those still writing) and returns the log; they must stop within
    /// `within` (a write stuck longer than that is a failure of its own).
    async fn finish(self, within: Duration) -> Log {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + within;
        while !self.threads.iter().all(|t| t.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "a writer is stuck in a write or sync for more than {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for thread in self.threads {
            thread.join().expect("a writer thread panicked");
        }
        Arc::try_unwrap(self.log)
            .ok()
            .expect("the writers are gone")
            .into_inner()
            .expect("the log")
    }

    /// Waits until a writer stops on a failed write, then stops the others; returns the log.
    async fn until_failed(self, within: Duration) -> Log {
        let deadline = Instant::now() + within;
        while !self.has_failed() {
            assert!(
                Instant::now() < deadline,
                "the writers went on writing for {within:?} after their engine died"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.finish(within).await
    }
}

fn write_until_stopped(
    device: &Path,
    seed: u64,
    thread: usize,
    log: &Mutex<Log>,
    stop: &AtomicBool,
    failed: &AtomicBool,
) {
    let file = match open_direct(device) {
        Ok(f) => f,
        Err(e) => {
            let failure = format!("open {}: {e}", device.display());
            log.lock().expect("the log").failures.push(failure);
            failed.store(true, Ordering::SeqCst);
            return;
        }
    };
    let mut buf = Aligned::new(BLOCK);
    let own_blocks = REGION / BLOCK as u64 / WRITERS as u64;
    while !stop.load(Ordering::SeqCst) {
        let (block, generation) = {
            let mut log = log.lock().expect("the log");
            let k = log.rngs[thread].next() % own_blocks;
            log.next_generation += 1;
            (k * WRITERS as u64 + thread as u64, log.next_generation - 1)
        };
        buf.bytes_mut()
            .copy_from_slice(&content(seed, block, generation));
        let result = file
            .write_all_at(buf.bytes(), block * BLOCK as u64)
            .and_then(|()| file.sync_data());
        let mut log = log.lock().expect("the log");
        log.writes += 1;
        match result {
            Ok(()) => {
                log.acked[block as usize] = generation;
                log.unknown.remove(&block);
            }
            Err(e) => {
                log.unknown.entry(block).or_default().push(generation);
                log.failures.push(format!(
                    "write of generation {generation} to block {block}: {e}"
                ));
                failed.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Samples `ctl volume` and records each replica's states, in order, without repeats.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<String, Vec<String>>>,
}

impl Sampler {
    fn start(cluster: &Cluster, volume: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let (api, secret, volume) = (
            cluster.api.clone(),
            cluster.secret_file.clone(),
            volume.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let mut states: BTreeMap<String, Vec<String>> = BTreeMap::new();
            while !stopping.load(Ordering::SeqCst) {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
                    .args(["ctl", "--controller", &api, "--secret-file"])
                    .arg(&secret)
                    .args(["volume", &volume, "--json"])
                    .output();
                let v: Option<Value> = out
                    .ok()
                    .filter(|o| o.status.success())
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok());
                for r in v
                    .as_ref()
                    .and_then(|v| v["replicas"].as_array())
                    .into_iter()
                    .flatten()
                {
                    let (id, state) = (
                        r["id"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                    );
                    let seen = states.entry(id).or_default();
                    if seen.last() != Some(&state) {
                        seen.push(state);
                    }
                }
                std::thread::sleep(Duration::from_millis(150));
            }
            states
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> BTreeMap<String, Vec<String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the sampler")
    }
}

/// Replicas of the volume in `state`, by node.
fn replicas_in(volume: &Value, state: &str) -> Vec<(String, String)> {
    volume["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter(|r| r["state"] == state)
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                r["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// What happened so far in this seed's run, for the failure message.
struct Story {
    seed: u64,
    told: Mutex<Vec<String>>,
}

impl Story {
    fn tell(&self, what: impl Into<String>) {
        let what = what.into();
        println!("seed {}:   {what}", self.seed);
        self.told.lock().expect("story").push(what);
    }

    fn text(&self) -> String {
        self.told.lock().expect("story").join("; ")
    }
}

async fn run_seed(seed: u64, fault: Fault) {
    let log_dir = std::env::temp_dir().join(format!("palisade-faults-seed-{seed}"));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir).expect("create the log directory");
    println!("seed {seed}: {fault:?} (logs in {})", log_dir.display());
    let story = Story {
        seed,
        told: Mutex::default(),
    };
    let started = Instant::now();
    let mut cluster = Cluster::start_with_logs(4, Some(log_dir.clone())).await;
    let root = cluster.dir.path().to_path_buf();
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(scenario(
        &mut cluster,
        seed,
        fault,
        &story,
    )))
    .await;
    stop_all(&mut cluster);
    cleanup_mounts(&root);
    drop(cluster);
    match result {
        Ok(()) => {
            println!(
                "seed {seed}: {fault:?} passed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            if std::env::var_os("PALISADE_FAULT_KEEP_LOGS").is_none() {
                let _ = std::fs::remove_dir_all(&log_dir);
            }
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            panic!(
                "seed {seed}, fault {fault:?} failed: {message}\n  what happened: {}\n  replay: PALISADE_FAULT_SEED={seed} cargo test --test faults\n  logs: {}",
                story.text(),
                log_dir.display()
            );
        }
    }
}

/// Where the volume is attached and how to reach it.
struct Attached {
    node: String,
    ctx: HashMap<String, String>,
    device: PathBuf,
}

fn publish_request(id: &str, node: &str) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: id.to_string(),
        node_id: node.to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    }
}

/// NodeStageVolume and NodePublishVolume of the block volume on `node`; returns the
/// published device.
async fn stage_block(
    cluster: &Cluster,
    node: &str,
    id: &str,
    ctx: &HashMap<String, String>,
) -> PathBuf {
    let (staging, target) = staging_and_target(cluster, node, id);
    let mut client = node_client(cluster, node).await;
    client
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.to_string(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("NodeStageVolume on {node}: {s:?}"));
    client
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.to_string(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("NodePublishVolume on {node}: {s:?}"));
    target
}

/// What the kubelet does for a pod whose volume's engine died: unpublish and unstage on
/// `node` (both must succeed), then stage and publish again with the same attachment.
async fn restage(cluster: &Cluster, id: &str, attached: &Attached) -> PathBuf {
    wait_up(cluster, &attached.node).await;
    let (staging, target) = staging_and_target(cluster, &attached.node, id);
    let mut client = node_client(cluster, &attached.node).await;
    unpublish_and_unstage(&mut client, id, &staging, &target).await;
    stage_block(cluster, &attached.node, id, &attached.ctx).await
}

/// Waits until the volume has healed: three ready replicas, nothing rebuilding or being
/// created, no degraded reason. The writer must not fail meanwhile.
async fn wait_healed(cluster: &Cluster, id: &str, writer: &Writer, story: &Story) -> Value {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let v = cluster.ctl_json(&["volume", id]);
        let busy =
            !replicas_in(&v, "rebuilding").is_empty() || !replicas_in(&v, "creating").is_empty();
        if replicas_in(&v, "ready").len() == 3 && !busy && v["degraded_reason"].is_null() {
            story.tell("healed: three ready replicas");
            return v;
        }
        assert!(
            !writer.has_failed(),
            "a write failed while the volume was healing: {v:#}"
        );
        assert!(Instant::now() < deadline, "the volume did not heal: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the engine on `engine_node` has started to copy a replica of the volume
/// (the controller marks it rebuilding first; the engine's node takes it up within a couple
/// of seconds and logs the start); returns (its node, its id).
async fn wait_rebuild_started(cluster: &Cluster, engine_node: &str, id: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = cluster.ctl_json(&["volume", id]);
        let log = node_log(cluster, engine_node);
        let started = replicas_in(&v, "rebuilding")
            .into_iter()
            .find(|(_, replica)| logged(&log, "rebuild started", replica) > 0);
        if let Some(started) = started {
            return started;
        }
        assert!(Instant::now() < deadline, "no rebuild started: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log of a process of the cluster (`controller` or a node id).
fn node_log(cluster: &Cluster, name: &str) -> String {
    let dir = cluster.log_dir.as_ref().expect("the cluster logs to files");
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// How many lines of `log` say `what` about `replica`.
fn logged(log: &str, what: &str, replica: &str) -> usize {
    let token = format!("replica={replica}");
    log.lines()
        .filter(|l| l.contains(what) && l.split_whitespace().any(|t| t == token))
        .count()
}

/// kill -9 of the controller, `pause_ms` of nothing, then the controller again; returns how
/// long it did not answer.
async fn bounce_controller(cluster: &mut Cluster, pause_ms: u64, story: &Story) -> Duration {
    let killed = Instant::now();
    cluster.kill9_controller();
    sleep_ms(pause_ms).await;
    cluster.restart_controller().await;
    let downtime = killed.elapsed();
    story.tell(format!(
        "killed the controller and restarted it after {pause_ms} ms: it answered again {} ms after the kill",
        downtime.as_millis()
    ));
    downtime
}

/// Waits until the controller sees `node` up (registered, heartbeating).
async fn wait_up(cluster: &Cluster, node: &str) {
    cluster
        .wait_nodes(&format!("{node} up"), |n| {
            n.iter().any(|x| x["id"] == node && up(x))
        })
        .await;
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn scenario(cluster: &mut Cluster, seed: u64, fault: Fault, story: &Story) {
    // Every random choice of this seed, drawn up front in a fixed order.
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xFA17);
    let replenish_now = fault == Fault::RebuildSource || rng.coin();
    let attach_draw = rng.next();
    let victim_draw = rng.next();
    let source_draw = rng.next();
    let warmup_ms = rng.range(300, 3000);
    let moment_ms = rng.range(0, 1500);
    let down_ms = rng.range(0, 4000);
    let second_down_ms = rng.range(0, 4000);
    let variant = rng.coin();
    let takeover_draw = rng.next();

    let mut csi = ready_cluster(cluster).await;
    if replenish_now {
        cluster.ctl_ok(&[
            "settings",
            "set",
            "replica-replenishment-wait-interval",
            "0",
        ]);
    }
    story.tell(format!(
        "replica-replenishment-wait-interval {}",
        if replenish_now { "0" } else { "default" }
    ));
    let mut request = create_request("faults", VOLUME, "3");
    request
        .parameters
        .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
    let id = csi
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let created = cluster.ctl_json(&["volume", &id]);
    let replica_nodes: Vec<String> = replicas_in(&created, "ready")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(replica_nodes.len(), 3, "{created:#}");
    let all: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let spare: Vec<String> = all
        .iter()
        .filter(|n| !replica_nodes.contains(n))
        .cloned()
        .collect();
    // The rebuild source must be a remote member: attach where no replica is, so that the
    // engine reads (and copies) from remote members in turn.
    let attach_on = if fault == Fault::RebuildSource {
        spare[0].clone()
    } else {
        all[(attach_draw % all.len() as u64) as usize].clone()
    };
    let ctx = csi
        .controller_publish_volume(publish_request(&id, &attach_on))
        .await
        .expect("ControllerPublishVolume")
        .into_inner()
        .publish_context;
    let device = stage_block(cluster, &attach_on, &id, &ctx).await;
    let mut attached = Attached {
        node: attach_on.clone(),
        ctx,
        device,
    };
    story.tell(format!(
        "replicas on {replica_nodes:?}, attached on {attach_on}"
    ));
    let log = prefill(&attached.device, seed);

    let sampler = Sampler::start(cluster, &id);
    let mut writer = Writer::start(&attached.device, seed, log);
    sleep_ms(warmup_ms).await;
    let remote_replicas: Vec<String> = replica_nodes
        .iter()
        .filter(|n| **n != attach_on)
        .cloned()
        .collect();
    match fault {
        Fault::Controller => {
            let downtime;
            if variant && replenish_now {
                // During a rebuild: a replica's node dies first, its replacement is rebuilt.
                let victim =
                    remote_replicas[(victim_draw % remote_replicas.len() as u64) as usize].clone();
                cluster.kill9(&victim);
                story.tell(format!("killed {victim} (a replica's node)"));
                let (node, replica) = wait_rebuild_started(cluster, &attached.node, &id).await;
                story.tell(format!("{replica} is being rebuilt on {node}"));
                sleep_ms(moment_ms).await;
                story.tell(format!("killing the controller {moment_ms} ms later"));
                downtime = bounce_controller(cluster, down_ms % 1500, story).await;
                sleep_ms(second_down_ms).await;
                cluster.restart_node(&victim).await;
                story.tell(format!("restarted {victim}"));
            } else {
                sleep_ms(moment_ms).await;
                story.tell(format!(
                    "killing the controller {} ms into the workload",
                    warmup_ms + moment_ms
                ));
                downtime = bounce_controller(cluster, down_ms % 1500, story).await;
            }
            // The engine keeps its lease only while it can renew it: a controller down (or
            // slow to start) for long makes it stop, which is no failure of this test: the
            // volume is staged again, as the kubelet would after the pod restarts. A lease
            // still running when the controller is back is renewed within a lease. But the
            // engine renews every third of its lease (1 s here), so a controller back within
            // a second must find it still serving.
            sleep_ms(HEARTBEAT_TIMEOUT_S * 1000 + 500).await;
            if writer.has_failed() {
                assert!(
                    downtime >= Duration::from_secs(1),
                    "the engine stopped although the controller was down for only {} ms (lease {HEARTBEAT_TIMEOUT_S} s)",
                    downtime.as_millis()
                );
                let log = writer.finish(Duration::from_secs(30)).await;
                story.tell(format!(
                    "the engine stopped while the controller was down ({}); staged again on {}",
                    log.failures.join(", "),
                    attached.node
                ));
                attached.device = restage(cluster, &id, &attached).await;
                writer = Writer::start(&attached.device, seed, log);
            }
        }
        Fault::EngineNode => {
            sleep_ms(moment_ms).await;
            let dead = attached.node.clone();
            cluster.kill9(&dead);
            story.tell(format!(
                "killed {dead} (the engine's node) {} ms into the workload",
                warmup_ms + moment_ms
            ));
            let log = writer.until_failed(Duration::from_secs(60)).await;
            story.tell(format!("the writers stopped: {}", log.failures.join(", ")));
            let others: Vec<String> = all.iter().filter(|n| **n != dead).cloned().collect();
            if variant {
                // Take-over by another node, once the dead one is known to be down.
                let to = others[(takeover_draw % others.len() as u64) as usize].clone();
                let since = Instant::now();
                let ctx = loop {
                    match csi
                        .controller_publish_volume(publish_request(&id, &to))
                        .await
                    {
                        Ok(r) => break r.into_inner().publish_context,
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                            assert!(
                                since.elapsed() < Duration::from_secs(60),
                                "no take-over by {to}: {}",
                                s.message()
                            );
                            sleep_ms(200).await;
                        }
                        Err(s) => panic!("ControllerPublish to {to}: {s:?}"),
                    }
                };
                let device = stage_block(cluster, &to, &id, &ctx).await;
                story.tell(format!(
                    "taken over by {to} after {:.1} s",
                    since.elapsed().as_secs_f64()
                ));
                attached = Attached {
                    node: to,
                    ctx,
                    device,
                };
                writer = Writer::start(&attached.device, seed, log);
                sleep_ms(down_ms).await;
                cluster.restart_node(&dead).await;
                // The kubelet of the dead node cleans the pod's paths up.
                let (staging, target) = staging_and_target(cluster, &dead, &id);
                let mut client = node_client(cluster, &dead).await;
                unpublish_and_unstage(&mut client, &id, &staging, &target).await;
                story.tell(format!(
                    "restarted {dead} after {down_ms} ms more; its stale paths unstaged"
                ));
            } else {
                sleep_ms(down_ms).await;
                cluster.restart_node(&dead).await;
                attached.device = restage(cluster, &id, &attached).await;
                story.tell(format!(
                    "restarted {dead} after {down_ms} ms; staged again there"
                ));
                writer = Writer::start(&attached.device, seed, log);
            }
        }
        Fault::ReplicaNode => {
            sleep_ms(moment_ms).await;
            let victim =
                remote_replicas[(victim_draw % remote_replicas.len() as u64) as usize].clone();
            cluster.kill9(&victim);
            story.tell(format!(
                "killed {victim} (a replica's node) {} ms into the workload",
                warmup_ms + moment_ms
            ));
            sleep_ms(down_ms).await;
            cluster.restart_node(&victim).await;
            story.tell(format!("restarted {victim} after {down_ms} ms"));
        }
        Fault::RebuildSource => {
            let victim =
                remote_replicas[(victim_draw % remote_replicas.len() as u64) as usize].clone();
            cluster.kill9(&victim);
            story.tell(format!("killed {victim} (a replica's node)"));
            let (node, replica) = wait_rebuild_started(cluster, &attached.node, &id).await;
            story.tell(format!("{replica} is being rebuilt on {node}"));
            let sources: Vec<String> = remote_replicas
                .iter()
                .filter(|n| **n != victim)
                .cloned()
                .collect();
            let source = sources[(source_draw % sources.len() as u64) as usize].clone();
            // A rebuild of the volume takes a second or two here.
            let moment_ms = moment_ms * 2 / 3;
            sleep_ms(moment_ms).await;
            let running = logged(
                &node_log(cluster, &attached.node),
                "rebuild complete",
                &replica,
            ) == 0;
            cluster.kill9(&source);
            story.tell(format!(
                "killed {source} (a source of the rebuild) {moment_ms} ms later{}",
                if running {
                    ""
                } else {
                    ", but the rebuild had finished already"
                }
            ));
            let (first, second) = if variant {
                (&victim, &source)
            } else {
                (&source, &victim)
            };
            sleep_ms(down_ms).await;
            cluster.restart_node(first).await;
            sleep_ms(second_down_ms).await;
            cluster.restart_node(second).await;
            story.tell(format!(
                "restarted {first} after {down_ms} ms, then {second} after {second_down_ms} ms more"
            ));
        }
    }

    let resyncs = node_log(cluster, "controller")
        .lines()
        .filter(|l| l.contains("previous engine did not stop cleanly"))
        .count();
    if resyncs > 0 {
        story.tell(format!(
            "the controller kept one member and had the others rebuilt {resyncs} time(s), after an engine that did not stop cleanly"
        ));
    }
    wait_healed(cluster, &id, &writer, story).await;
    // Writes go on to the healed volume for a while.
    sleep_ms(1000).await;
    let log = writer.finish(Duration::from_secs(30)).await;
    assert!(
        log.failures.is_empty(),
        "a write failed: {:?}",
        log.failures
    );
    story.tell(format!(
        "{} writes, {} in flight at failures",
        log.writes,
        log.unknown.values().map(Vec::len).sum::<usize>()
    ));
    let states = sampler.finish();
    check(cluster, &id, seed, &attached, &log, &states).await;
}

/// The checker (see the module's documentation).
async fn check(
    cluster: &Cluster,
    id: &str,
    seed: u64,
    attached: &Attached,
    log: &Log,
    states: &BTreeMap<String, Vec<String>>,
) {
    // 1. Through the device.
    let device = {
        let file = open_direct(&attached.device).expect("open the device");
        let mut buf = Aligned::new(MIB as usize);
        let mut all = Vec::with_capacity(VOLUME as usize);
        for at in (0..VOLUME).step_by(MIB as usize) {
            file.read_exact_at(buf.bytes_mut(), at)
                .expect("read the volume through its device");
            all.extend_from_slice(buf.bytes());
        }
        all
    };
    for block in 0..BLOCKS {
        let bytes = &device[block as usize * BLOCK..][..BLOCK];
        assert!(
            log.holds_allowed(seed, block, bytes),
            "read through the device on {}: {}",
            attached.node,
            log.complaint(seed, block, bytes)
        );
    }

    // 2. On the members' disks, after a clean detach (the engine flushes and stops).
    let (staging, target) = staging_and_target(cluster, &attached.node, id);
    let mut client = node_client(cluster, &attached.node).await;
    unpublish_and_unstage(&mut client, id, &staging, &target).await;
    let members = member_data_files(cluster, id);
    assert_eq!(members.len(), 3, "{:#}", cluster.ctl_json(&["volume", id]));
    for (replica, path) in &members {
        let data = std::fs::read(path)
            .unwrap_or_else(|e| panic!("the data file of member {replica}: {e}"));
        assert_eq!(data.len() as u64, VOLUME, "member {replica}'s data file");
        for block in 0..BLOCKS {
            let bytes = &data[block as usize * BLOCK..][..BLOCK];
            assert!(
                log.holds_allowed(seed, block, bytes),
                "member {replica} ({}): {}",
                path.display(),
                log.complaint(seed, block, bytes)
            );
            let shown = &device[block as usize * BLOCK..][..BLOCK];
            assert!(
                bytes == shown,
                "member {replica} ({}) holds {} in block {block}, but the device showed {}",
                path.display(),
                describe(bytes, seed, block),
                describe(shown, seed, block)
            );
        }
    }

    // 3. Every return to ready was a promotion after a completed rebuild.
    let controller_log = node_log(cluster, "controller");
    for (replica, seen) in states {
        let returns = seen
            .windows(2)
            .filter(|w| w[1] == "ready" && w[0] != "ready")
            .count();
        let promotions = logged(&controller_log, "rebuilt replica promoted", replica);
        assert!(
            returns <= promotions,
            "replica {replica} became ready {returns} times ({seen:?}) but was promoted after a rebuild {promotions} times"
        );
    }
}
