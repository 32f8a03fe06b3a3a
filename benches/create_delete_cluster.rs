//! CreateVolume + DeleteVolume latency of the cluster mode on each store backend, in one run:
//! a real `palisade controller` and one real `palisade node` on loopback, (a) with the
//! embedded store (redb in the controller's state directory) and (b) with `--store
//! kubernetes` against a real API server (etcd + kube-apiserver from `$KUBEBUILDER_ASSETS`,
//! as tests/common/k8s.rs starts them). Both clusters run side by side; at 100 and 1,000
//! volumes already in the store, each times 200 CreateVolume + DeleteVolume pairs of new
//! names over the controller's CSI socket, the two backends one after the other at each level
//! so that they see the same machine. Prints p50/p99 of each call and the ratios kubernetes /
//! embedded and 1,000 / 100 volumes.
//!
//! API requests: the API server's own count (`apiserver_request_total` of the palisade.io
//! group, from `GET /metrics` with the admin credentials), differenced around a batch of 50
//! CreateVolumes and then around the DeleteVolumes of the same volumes, by resource and
//! verb. The node's heartbeats (PUTs of palisadenodes) land in the same window; they are the
//! node's, not the call's, and are printed apart.
//!
//! Volumes: 1 replica, 1 MiB, block access. The node's disk is a private tmpfs, as in the
//! standalone bench, so that replica files cost no disk flush and what differs between the
//! two runs is the store. PALISADE_BENCH_REPLICAS=N starts N nodes and makes volumes of N
//! replicas instead (3 is the default numberOfReplicas). The harness puts etcd's data on
//! tmpfs too (its fsyncs are free), while the embedded store fsyncs its commits on the state
//! directory's disk.
//!
//! Run: `cargo bench --bench create_delete_cluster`. Environment: PALISADE_BENCH_MAX (the
//! highest level, 1000; 100 for a short run), PALISADE_BENCH_REPLICAS (1),
//! PALISADE_BENCH_ONLY (`embedded` or `kubernetes`), PALISADE_BENCH_LOGS (a directory for the
//! processes' logs). Without KUBEBUILDER_ASSETS it prints SKIPPED for the Kubernetes part and
//! measures the embedded one. Without `--bench` (as `cargo test --all-targets` runs it) it is
//! a smoke run: 100 volumes, 20 samples, 5 counted.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{
    cleanup_mounts, create_request, ready_cluster, stop_all, Cluster, ClusterOptions, MIB,
};
use common::k8s::ControlPlane;
use palisade::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use tonic::transport::Channel;

/// The namespace the Kubernetes store keeps its objects in.
const NAMESPACE: &str = "palisade-bench";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Which store a cluster keeps its state in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Kubernetes,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Kubernetes => "kubernetes",
        }
    }
}

/// One cluster under test; on drop its processes are killed and its node's tmpfs unmounted
/// (before the control plane, a later field, goes).
struct Bench {
    backend: Backend,
    cluster: Cluster,
    csi: ControllerClient<Channel>,
    /// The API server of the Kubernetes store, kept running.
    _plane: Option<ControlPlane>,
    /// A client with the admin credentials, for /metrics.
    admin: Option<kube::Client>,
    /// Volumes created so far by the fill.
    filled: usize,
    /// numberOfReplicas of every volume, and the number of nodes.
    replicas: String,
}

impl Drop for Bench {
    fn drop(&mut self) {
        stop_all(&mut self.cluster);
        cleanup_mounts(self.cluster.dir.path());
    }
}

impl Bench {
    /// A controller on `backend` and nodes n1..n`replicas`, each with a tmpfs disk, all up,
    /// free-space check off. None (after a SKIPPED line) when the Kubernetes binaries are
    /// missing.
    async fn start(backend: Backend, replicas: usize, logs: Option<PathBuf>) -> Option<Bench> {
        let mut controller_args = Vec::new();
        let mut plane = None;
        if backend == Backend::Kubernetes {
            let p = ControlPlane::start("create_delete_cluster (the Kubernetes store)").await?;
            p.apply_crds();
            p.create_namespace(NAMESPACE);
            controller_args = vec![
                "--store".to_string(),
                "kubernetes".to_string(),
                "--kubeconfig".to_string(),
                p.kubeconfig.display().to_string(),
                "--namespace".to_string(),
                NAMESPACE.to_string(),
            ];
            plane = Some(p);
        }
        let log_dir = logs.map(|d| d.join(backend.name()));
        if let Some(d) = &log_dir {
            std::fs::create_dir_all(d).expect("log directory");
        }
        let mut cluster = Cluster::start_with(ClusterOptions {
            nodes: 0,
            log_dir,
            controller_args,
        })
        .await;
        let secret = cluster.secret_file.clone();
        for i in 1..=replicas {
            let id = format!("n{i}");
            let mut node = cluster.node_args(&id, &secret);
            std::fs::create_dir_all(&node.disk).expect("disk directory");
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16g", "palisade-bench"])
                .arg(&node.disk)
                .status()
                .expect("run mount");
            assert!(status.success(), "mounting a tmpfs at {:?}", node.disk);
            node.child = Some(cluster.spawn_process(&id, &node.args));
            let socket = node.socket.clone();
            cluster.nodes.push(node);
            cluster.wait_for_csi(&socket).await;
        }
        let csi = ready_cluster(&cluster).await;
        let admin = match &plane {
            Some(p) => Some(p.client().await),
            None => None,
        };
        let mut bench = Bench {
            backend,
            cluster,
            csi,
            _plane: plane,
            admin,
            filled: 0,
            replicas: replicas.to_string(),
        };
        bench.warm_up().await;
        Some(bench)
    }

    /// A heartbeat of each node after its registration, one CreateVolume + DeleteVolume,
    /// and a heartbeat after those. The first writes in a fresh namespace take about 2 s on
    /// the API server (the nodes' registrations and the settings here), which leaves a
    /// node's last heartbeat that old and, with the harness's 3 s heartbeat timeout, the
    /// node not ready a moment later.
    async fn warm_up(&mut self) {
        self.fresh_heartbeat().await;
        self.create("warm-up").await;
        self.delete("warm-up").await;
        self.fresh_heartbeat().await;
    }

    /// Waits until every node's last heartbeat is newer than the call.
    async fn fresh_heartbeat(&self) {
        let since = Instant::now();
        self.cluster
            .wait_nodes("a heartbeat", |nodes| {
                nodes.iter().all(|n| {
                    n["heartbeat_age_ms"]
                        .as_u64()
                        .is_some_and(|age| u128::from(age) < since.elapsed().as_millis())
                })
            })
            .await;
    }

    async fn create(&mut self, name: &str) -> Duration {
        let start = Instant::now();
        self.csi
            .create_volume(create_request(name, MIB, &self.replicas))
            .await
            .unwrap_or_else(|e| panic!("{}: create {name}: {e}", self.backend.name()));
        start.elapsed()
    }

    async fn delete(&mut self, id: &str) -> Duration {
        let start = Instant::now();
        self.csi
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.to_string(),
                secrets: Default::default(),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: delete {id}: {e}", self.backend.name()));
        start.elapsed()
    }

    /// Creates volumes until `level` exist; returns how long it took.
    async fn fill(&mut self, level: usize) -> Duration {
        let start = Instant::now();
        while self.filled < level {
            let name = format!("fill-{}", self.filled);
            self.create(&name).await;
            self.filled += 1;
        }
        start.elapsed()
    }

    /// `samples` CreateVolume + DeleteVolume pairs of new names (volume ids are the names).
    async fn measure(&mut self, tag: &str, samples: usize) -> Latencies {
        let mut out = Latencies::default();
        for i in 0..samples {
            let name = format!("bench-{tag}-{i}");
            out.create.push(self.create(&name).await);
            out.delete.push(self.delete(&name).await);
        }
        out.create.sort();
        out.delete.sort();
        out
    }

    /// The API requests of `count` CreateVolumes and then of their DeleteVolumes, as the API
    /// server counted them. None without an API server.
    async fn count_requests(&mut self, tag: &str, count: usize) -> Option<RequestCounts> {
        let client = self.admin.clone()?;
        let before = palisade_requests(&client).await;
        let start = Instant::now();
        for i in 0..count {
            self.create(&format!("count-{tag}-{i}")).await;
        }
        let create_time = start.elapsed();
        let created = palisade_requests(&client).await;
        let start = Instant::now();
        for i in 0..count {
            self.delete(&format!("count-{tag}-{i}")).await;
        }
        let delete_time = start.elapsed();
        let deleted = palisade_requests(&client).await;
        Some(RequestCounts {
            count,
            create: difference(&before, &created),
            create_time,
            delete: difference(&created, &deleted),
            delete_time,
        })
    }
}

/// Latencies of CreateVolume and DeleteVolume, each sorted.
#[derive(Default)]
struct Latencies {
    create: Vec<Duration>,
    delete: Vec<Duration>,
}

impl Latencies {
    fn p(&self, call: Call, p: f64) -> Duration {
        match call {
            Call::Create => percentile(&self.create, p),
            Call::Delete => percentile(&self.delete, p),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Create,
    Delete,
}

/// Requests of the palisade.io group by (resource, verb).
type Requests = BTreeMap<(String, String), u64>;

/// What the API server counted around a batch of creates and the deletes of the same volumes.
struct RequestCounts {
    count: usize,
    create: Requests,
    create_time: Duration,
    delete: Requests,
    delete_time: Duration,
}

/// The heartbeats of the node: its writes of its own object.
const NODES: &str = "palisadenodes";

/// "3.00 (palisadevolumes POST 1.00, ...)" for the requests of the calls (the node's
/// heartbeats left out), and the heartbeats apart.
fn describe(requests: &Requests, count: usize, window: Duration) -> String {
    let per = |n: u64| n as f64 / count as f64;
    let calls: u64 = requests
        .iter()
        .filter(|((resource, _), _)| resource != NODES)
        .map(|(_, n)| n)
        .sum();
    let parts: Vec<String> = requests
        .iter()
        .filter(|((resource, _), _)| resource != NODES)
        .map(|((resource, verb), n)| format!("{resource} {verb} {:.2}", per(*n)))
        .collect();
    let heartbeats: u64 = requests
        .iter()
        .filter(|((resource, _), _)| resource == NODES)
        .map(|(_, n)| n)
        .sum();
    format!(
        "{:.2} ({}); the node's heartbeats meanwhile: {heartbeats} palisadenodes requests in {:.1} s",
        per(calls),
        parts.join(", "),
        window.as_secs_f64()
    )
}

fn difference(before: &Requests, after: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// `apiserver_request_total` of the palisade.io group, summed over codes and scopes.
async fn palisade_requests(client: &kube::Client) -> Requests {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    let text = client
        .request_text(request)
        .await
        .expect("GET /metrics of the API server");
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = parse_labels(labels);
        if labels.get("group").map(String::as_str) != Some("palisade.io") {
            continue;
        }
        let value: f64 = value.trim().parse().expect("a counter value");
        let key = (
            labels.get("resource").cloned().unwrap_or_default(),
            labels.get("verb").cloned().unwrap_or_default(),
        );
        *out.entry(key).or_default() += value as u64;
    }
    out
}

/// `a="x",b="y"` as a map (values here never hold quotes or backslashes).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let Some((value, after)) = after.split_once('"') else {
            break;
        };
        out.insert(name.trim_start_matches(',').to_string(), value.to_string());
        rest = after;
    }
    out
}

/// One level's figures of one backend.
struct Level {
    level: usize,
    lat: Latencies,
    requests: Option<RequestCounts>,
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (max, samples, counted) = if bench {
        let max = std::env::var("PALISADE_BENCH_MAX")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000);
        (max, 200usize, 50usize)
    } else {
        println!("create_delete_cluster smoke run (cargo bench --bench create_delete_cluster for the figures)");
        (100, 20, 5)
    };
    let replicas: usize = std::env::var("PALISADE_BENCH_REPLICAS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let only = std::env::var("PALISADE_BENCH_ONLY").ok();
    let logs = std::env::var_os("PALISADE_BENCH_LOGS").map(PathBuf::from);
    let levels: Vec<usize> = [100usize, 1_000]
        .into_iter()
        .filter(|l| *l <= max)
        .collect();

    let mut benches = Vec::new();
    for backend in [Backend::Embedded, Backend::Kubernetes] {
        if only.as_deref().is_some_and(|o| o != backend.name()) {
            continue;
        }
        match Bench::start(backend, replicas, logs.clone()).await {
            Some(b) => benches.push(b),
            None => println!(
                "SKIPPED: the Kubernetes store was not measured (KUBEBUILDER_ASSETS, see above); \
                 only the embedded figures follow"
            ),
        }
    }
    println!(
        "cluster mode: palisade controller + {replicas} palisade node(s) (tmpfs disks); volumes of {replicas} replica(s), 1 MiB; \
         {samples} CreateVolume + DeleteVolume pairs per level; requests counted over {counted} creates and their deletes"
    );

    let mut results: BTreeMap<&'static str, Vec<Level>> = BTreeMap::new();
    for &level in &levels {
        for b in &mut benches {
            let fill = b.fill(level).await;
            let lat = b.measure(&level.to_string(), samples).await;
            let requests = b.count_requests(&level.to_string(), counted).await;
            println!(
                "{:<10} {level:>5} volumes: create p50 {:.2} ms p99 {:.2} ms | delete p50 {:.2} ms p99 {:.2} ms (filled in {:.1} s)",
                b.backend.name(),
                ms(lat.p(Call::Create, 0.5)),
                ms(lat.p(Call::Create, 0.99)),
                ms(lat.p(Call::Delete, 0.5)),
                ms(lat.p(Call::Delete, 0.99)),
                fill.as_secs_f64(),
            );
            if let Some(r) = &requests {
                println!(
                    "{:<10} {level:>5} volumes: API requests per CreateVolume {}",
                    "",
                    describe(&r.create, r.count, r.create_time)
                );
                println!(
                    "{:<10} {level:>5} volumes: API requests per DeleteVolume {}",
                    "",
                    describe(&r.delete, r.count, r.delete_time)
                );
            }
            results.entry(b.backend.name()).or_default().push(Level {
                level,
                lat,
                requests,
            });
        }
    }

    let (embedded, kubernetes) = (results.get("embedded"), results.get("kubernetes"));
    if let (Some(e), Some(k)) = (embedded, kubernetes) {
        for (e, k) in e.iter().zip(k) {
            println!(
                "kubernetes / embedded at {:>5} volumes: create p50 {:.2} p99 {:.2} | delete p50 {:.2} p99 {:.2}",
                e.level,
                ratio(k.lat.p(Call::Create, 0.5), e.lat.p(Call::Create, 0.5)),
                ratio(k.lat.p(Call::Create, 0.99), e.lat.p(Call::Create, 0.99)),
                ratio(k.lat.p(Call::Delete, 0.5), e.lat.p(Call::Delete, 0.5)),
                ratio(k.lat.p(Call::Delete, 0.99), e.lat.p(Call::Delete, 0.99)),
            );
        }
    }
    for (name, levels) in &results {
        if let (Some(first), Some(last)) = (levels.first(), levels.last()) {
            if first.level != last.level {
                println!(
                    "{name}: {} / {} volumes: create p50 {:.2} p99 {:.2} | delete p50 {:.2} p99 {:.2}",
                    last.level,
                    first.level,
                    ratio(last.lat.p(Call::Create, 0.5), first.lat.p(Call::Create, 0.5)),
                    ratio(last.lat.p(Call::Create, 0.99), first.lat.p(Call::Create, 0.99)),
                    ratio(last.lat.p(Call::Delete, 0.5), first.lat.p(Call::Delete, 0.5)),
                    ratio(last.lat.p(Call::Delete, 0.99), first.lat.p(Call::Delete, 0.99)),
                );
            }
        }
    }
    match kubernetes.and_then(|k| Some((k.first()?, k.last()?))) {
        Some((first, last)) => {
            let p99 = last.lat.p(Call::Create, 0.99);
            let flat = ratio(p99, first.lat.p(Call::Create, 0.99));
            let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
            let smoke = if bench {
                ""
            } else {
                " (smoke run, not the figure)"
            };
            println!(
                "goal{smoke} (kubernetes): CreateVolume p99 at {} volumes {:.2} ms, <= 50 ms: {}; p99 {} / {} volumes {flat:.2}, flat (<= 1.5): {}",
                last.level,
                ms(p99),
                verdict(ms(p99) <= 50.0),
                last.level,
                first.level,
                verdict(flat <= 1.5),
            );
            if let Some(r) = &last.requests {
                let calls = |requests: &Requests| {
                    let n: u64 = requests
                        .iter()
                        .filter(|((resource, _), _)| resource != NODES)
                        .map(|(_, n)| n)
                        .sum();
                    n as f64 / r.count as f64
                };
                println!(
                    "API requests at {} volumes: {:.2} per CreateVolume, {:.2} per DeleteVolume",
                    last.level,
                    calls(&r.create),
                    calls(&r.delete)
                );
            }
        }
        None => println!("goal (kubernetes): SKIPPED, not measured"),
    }
}
