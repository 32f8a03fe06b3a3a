//! Engine benchmark (plain `fn main`, no harness): fio's nbd engine with the kbench job
//! shapes, side by side in one run on the same disk, against:
//! - `nbdkit file`: nbdkit's file plugin, the reference NBD server;
//! - `engine x1`, `engine x1 inl`, `engine x3 inl`: the engine over `FileReplica` members
//!   (on the blocking pool, or inline), which shows the engine's own overhead;
//! - `net x1`, `net x2`, `net x3`: the cluster data path — replicas behind real replica
//!   servers (one per member, as on separate nodes), opened with an attachment token, the
//!   first in process as a node opens its own replica, the others over loopback TCP;
//! - `tcp x1`: one replica reachable only over TCP (a volume attached away from its replica).
//!
//! Prints IOPS, MB/s, mean and p99 latency, each one's ratio to nbdkit, and the goals.
//! `benches/engine.sh` runs it.
//!
//! `cargo bench --bench engine` runs it in full (ENGINE_BENCH_RUNTIME seconds per job, 10 by
//! default; ENGINE_BENCH_SIZE bytes per file, 512 MiB; files under ENGINE_BENCH_DIR, by
//! default `target/engine-bench`; ENGINE_BENCH_ONLY, a substring of "JOB / SERVER", runs only
//! the matching jobs). Without `--bench` (as `cargo test --all-targets` runs it)
//! it only runs one short job against a one-member engine as a smoke test.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use palisade::engine::{Engine, FileIo, FileReplica, Member, Membership};

const MIB: u64 = 1 << 20;

/// A membership that never removes anyone in a benchmark (no member fails) and always
/// renews the lease.
struct Steady;

#[async_trait]
impl Membership for Steady {
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String> {
        Err(format!("benchmark: {replica_id} failed: {reason}"))
    }
    async fn renew_lease(&self) -> Result<Duration, String> {
        Ok(Duration::MAX)
    }
}

struct Shape {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    write: bool,
}

const SHAPES: [Shape; 5] = [
    Shape {
        name: "4k randread qd64",
        rw: "randread",
        bs: "4k",
        iodepth: 64,
        write: false,
    },
    Shape {
        name: "4k randwrite qd64",
        rw: "randwrite",
        bs: "4k",
        iodepth: 64,
        write: true,
    },
    Shape {
        name: "128k seqread qd64",
        rw: "read",
        bs: "128k",
        iodepth: 64,
        write: false,
    },
    Shape {
        name: "128k seqwrite qd64",
        rw: "write",
        bs: "128k",
        iodepth: 64,
        write: true,
    },
    Shape {
        name: "4k randwrite qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        write: true,
    },
];

#[derive(Clone, Copy, Default)]
struct Figures {
    iops: f64,
    mb_s: f64,
    mean_us: f64,
    p99_us: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Fills `path` with `size` bytes of non-zero data, so reads do not hit holes.
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8 + 1).collect();
    for _ in 0..size / MIB {
        f.write_all(&chunk)?;
    }
    f.into_inner()?.sync_all()
}

fn fio(uri: &str, shape: &Shape, size: u64, runtime: u64) -> Result<Figures, String> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", shape.rw),
            &format!("--bs={}", shape.bs),
            &format!("--iodepth={}", shape.iodepth),
            &format!("--size={size}"),
            &format!("--runtime={runtime}"),
            "--time_based",
            "--ramp_time=1",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // fio may print notes before its JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let start = if stdout.starts_with('{') {
        0
    } else {
        stdout.find("\n{").map_or(0, |i| i + 1)
    };
    let json: serde_json::Value =
        serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio output: {e}: {stdout}"))?;
    let side = &json["jobs"][0][if shape.write { "write" } else { "read" }];
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(Figures {
        iops: num(&side["iops"]),
        mb_s: num(&side["bw_bytes"]) / 1e6,
        mean_us: num(&side["lat_ns"]["mean"]) / 1e3,
        p99_us: num(&side["clat_ns"]["percentile"]["99.000000"]) / 1e3,
    })
}

async fn wait_for_socket(path: &Path) -> Result<(), String> {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("{} never accepted", path.display()))
}

/// Starts an engine over the first `members` files, serving on `socket`.
async fn start_engine(
    files: &[PathBuf],
    members: usize,
    io: FileIo,
    size: u64,
    socket: &Path,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let list = files[..members]
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FileReplica::open(format!("r{i}"), f, size)
                .map(|r| Arc::new(r.with_io(io)) as Member)
                .map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let engine = Engine::new(format!("bench-{members}"), size, list, Arc::new(Steady))
        .map_err(|e| e.to_string())?;
    let socket_owned = socket.to_path_buf();
    let task = tokio::spawn(async move {
        if let Err(e) = engine.serve_unix(&socket_owned, stop).await {
            eprintln!("engine: {e}");
        }
    });
    wait_for_socket(socket).await?;
    Ok(task)
}

/// Starts an engine whose `members` members are real replicas, each on a disk of its own
/// replica server on loopback (as on separate nodes), opened with an attachment token. With
/// `local`, the first is opened in process through its server's [`LocalReplicas`] handle,
/// as a node opens its own replica; the others over TCP: the cluster data path.
async fn start_network_engine(
    dir: &Path,
    index: usize,
    members: usize,
    local: bool,
    size: u64,
    socket: &Path,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let secret = vec![7u8; 32];
    let volume = format!("net-{index}");
    let token = palisade::replica::token::attachment_token(&secret, &volume, 1);
    let mut list: Vec<Member> = Vec::new();
    for m in 0..members {
        let disk = dir.join(format!("net{index}-disk{m}"));
        let _ = std::fs::remove_dir_all(&disk);
        std::fs::create_dir_all(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        let replica_id = format!("{volume}-r-{m}");
        let r = palisade::replica::create(&disk, &replica_id, &volume, size)
            .map_err(|e| e.to_string())?;
        fill(&r.data_path(), size).map_err(|e| e.to_string())?;
        let server = palisade::replica::server::ReplicaServer::bind(
            "127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .map_err(|e| e.to_string())?,
            vec![disk.clone()],
            secret.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        let in_process = server.local();
        let mut rx = stop.clone();
        tokio::spawn(server.serve(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        if local && m == 0 {
            let session = in_process
                .open(&volume, &replica_id, 1, &token)
                .await
                .map_err(|e| e.to_string())?;
            list.push(Arc::new(session));
            continue;
        }
        let client = palisade::replica::client::ReplicaClient::connect(
            addr,
            &volume,
            &replica_id,
            1,
            &token,
            false,
        )
        .await
        .map_err(|e| e.to_string())?;
        list.push(Arc::new(client));
    }
    let engine = Engine::new(volume, size, list, Arc::new(Steady)).map_err(|e| e.to_string())?;
    let socket_owned = socket.to_path_buf();
    let mut rx = stop;
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Err(e) = engine.serve_unix(&socket_owned, stop).await {
            eprintln!("engine: {e}");
        }
    });
    wait_for_socket(socket).await?;
    Ok(task)
}

fn start_nbdkit(file: &Path, socket: &Path) -> Result<Child, String> {
    Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(socket)
        .arg("file")
        .arg(file)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting nbdkit: {e}"))
}

fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

async fn smoke() -> Result<(), String> {
    if !have("fio") {
        println!("engine bench smoke test skipped: fio is not installed");
        return Ok(());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let size = 64 * MIB;
    let file = dir.path().join("r0.img");
    fill(&file, size).map_err(|e| e.to_string())?;
    let socket = dir.path().join("engine.sock");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = start_engine(&[file], 1, FileIo::Blocking, size, &socket, async move {
        let _ = rx.await;
    })
    .await?;
    let shape = &SHAPES[1];
    let f = tokio::task::block_in_place(|| fio(&uri(&socket), shape, size, 1))?;
    println!(
        "smoke: {} on a one-member engine: {:.0} IOPS",
        shape.name, f.iops
    );
    let _ = tx.send(());
    task.await.map_err(|e| e.to_string())
}

async fn full() -> Result<(), String> {
    for tool in ["fio", "nbdkit"] {
        if !have(tool) {
            return Err(format!(
                "{tool} is not installed (apt-get install -y fio nbdkit)"
            ));
        }
    }
    let runtime = env_u64("ENGINE_BENCH_RUNTIME", 10);
    let size = env_u64("ENGINE_BENCH_SIZE", 512 << 20) / MIB * MIB;
    let dir = PathBuf::from(
        std::env::var("ENGINE_BENCH_DIR").unwrap_or_else(|_| "target/engine-bench".into()),
    );
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    println!(
        "engine benchmark: fio nbd engine, {runtime} s per job, {} MiB per file, files in {}",
        size / MIB,
        dir.display()
    );

    // Every server gets files of its own, filled the same way and then put through the same
    // jobs, so that no server inherits another's page-cache state.
    let reference = dir.join("nbdkit.img");
    fill(&reference, size).map_err(|e| format!("{}: {e}", reference.display()))?;

    let nbdkit_socket = dir.join("nbdkit.sock");
    let _ = std::fs::remove_file(&nbdkit_socket);
    let mut nbdkit = start_nbdkit(&reference, &nbdkit_socket)?;
    wait_for_socket(&nbdkit_socket).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut targets = vec![("nbdkit file".to_string(), nbdkit_socket.clone())];
    let mut engines = Vec::new();
    let engine_targets = [
        (1, FileIo::Blocking, "engine x1"),
        (1, FileIo::Inline, "engine x1 inl"),
        (3, FileIo::Inline, "engine x3 inl"),
    ];
    for (i, (members, io, label)) in engine_targets.into_iter().enumerate() {
        let socket = dir.join(format!("engine{i}.sock"));
        let files: Vec<PathBuf> = (0..members)
            .map(|m| dir.join(format!("engine{i}-r{m}.img")))
            .collect();
        for f in &files {
            fill(f, size).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        engines.push(start_engine(&files, members, io, size, &socket, stop).await?);
        targets.push((label.to_string(), socket));
    }
    // The cluster data path: the engine's local replica opened in process, the others behind
    // replica servers on loopback (`net xN`); and one replica that is only reachable over the
    // network (`tcp x1`: a volume attached on a node without a replica).
    for (members, local, label) in [
        (1, true, "net x1"),
        (2, true, "net x2"),
        (3, true, "net x3"),
        (1, false, "tcp x1"),
    ] {
        let index = targets.len();
        let socket = dir.join(format!("net{index}.sock"));
        let task =
            start_network_engine(&dir, index, members, local, size, &socket, stop_rx.clone())
                .await?;
        engines.push(task);
        targets.push((label.to_string(), socket));
    }

    let only = std::env::var("ENGINE_BENCH_ONLY").unwrap_or_default();
    let mut results: Vec<Vec<Figures>> = Vec::new();
    for shape in &SHAPES {
        let mut row = Vec::new();
        for (label, socket) in &targets {
            if !format!("{} / {label}", shape.name).contains(only.as_str()) {
                row.push(Figures::default());
                continue;
            }
            eprintln!("running {} against {label} ...", shape.name);
            let f = tokio::task::block_in_place(|| fio(&uri(socket), shape, size, runtime))?;
            row.push(f);
        }
        results.push(row);
    }

    let _ = stop_tx.send(true);
    for e in engines {
        let _ = e.await;
    }
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();

    println!();
    println!(
        "{:<20} {:<14} {:>10} {:>9} {:>10} {:>10} {:>9}",
        "job", "server", "IOPS", "MB/s", "mean µs", "p99 µs", "vs nbdkit"
    );
    for (shape, row) in SHAPES.iter().zip(&results) {
        let reference = row[0];
        for ((label, _), f) in targets.iter().zip(row) {
            let ratio = if label.starts_with("nbdkit") {
                String::new()
            } else {
                format!("{:.0}%", 100.0 * f.iops / reference.iops)
            };
            println!(
                "{:<20} {:<14} {:>10.0} {:>9.1} {:>10.1} {:>10.1} {:>9}",
                shape.name, label, f.iops, f.mb_s, f.mean_us, f.p99_us, ratio
            );
        }
    }
    println!();
    let pct = |a: f64, b: f64| 100.0 * a / b;
    let column = |label: &str| targets.iter().position(|(l, _)| l == label).unwrap_or(0);
    let (x1, x3, inl1, inl3, tcp) = (
        column("net x1"),
        column("net x3"),
        column("engine x1 inl"),
        column("engine x3 inl"),
        column("tcp x1"),
    );
    let randwrite = &results[1];
    let qd1 = &results[4];
    println!("against the goals (net xN: the cluster data path, local replica in process, others over loopback TCP):");
    for (i, shape) in SHAPES.iter().enumerate() {
        println!(
            "goal: 1 replica >= 80% of nbdkit IOPS, {}: {:.0}% (remote-only tcp x1: {:.0}%; file member inline: {:.0}%)",
            shape.name,
            pct(results[i][x1].iops, results[i][0].iops),
            pct(results[i][tcp].iops, results[i][0].iops),
            pct(results[i][inl1].iops, results[i][0].iops)
        );
    }
    println!(
        "goal: 3-replica 4k randwrite IOPS >= 50% of 1-replica: {:.0}% (file members inline: {:.0}%)",
        pct(randwrite[x3].iops, randwrite[x1].iops),
        pct(randwrite[inl3].iops, randwrite[inl1].iops)
    );
    println!(
        "goal: qd1 write latency <= nbdkit + 150 µs: nbdkit {:.1} µs, 1 replica {:+.1} µs, 3 replicas {:+.1} µs (tcp x1 {:+.1} µs)",
        qd1[0].mean_us,
        qd1[x1].mean_us - qd1[0].mean_us,
        qd1[x3].mean_us - qd1[0].mean_us,
        qd1[tcp].mean_us - qd1[0].mean_us
    );
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS of the bench process ({} engines and 7 replica servers, no fio, no nbdkit): {rss} MiB", targets.len() - 1);
    }
    Ok(())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("engine bench: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        if bench {
            full().await
        } else {
            smoke().await
        }
    });
    if let Err(e) = result {
        eprintln!("engine bench: {e}");
        std::process::exit(1);
    }
}
