//! Rebuild benchmark (plain `fn main`, no harness): the online rebuild of a replica, against
//! the disk's sequential copy speed measured in the same run, and the write IOPS a workload
//! keeps during a rebuild against its IOPS without one.
//!
//! Setup, as on a cluster: the engine's node holds the source replica (opened in process)
//! and the new replica sits behind a second replica server on loopback (another node). The
//! volume is REBUILD_BENCH_SIZE bytes (default 4 GiB); "half" has data in its first half,
//! "sparse" has 1 MiB of data every 256 MiB. The reference copies a file of the same data
//! with `dd` (1 MiB blocks, fsync at the end) on the same disk. Throughput is data bytes
//! copied per second, the target fsynced at the end in both.
//!
//! `cargo bench --bench rebuild` runs it (files under REBUILD_BENCH_DIR, default
//! `target/rebuild-bench`); without `--bench` (as `cargo test --all-targets` runs it) it
//! only checks that it starts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use palisade::engine::{Engine, EngineConfig, Member, Membership, RebuildState};
use palisade::replica;
use palisade::replica::client::ReplicaClient;
use palisade::replica::server::ReplicaServer;
use palisade::replica::token::attachment_token;

const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"the rebuild bench's secret, 32 b";

struct Promotes;

#[async_trait]
impl Membership for Promotes {
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String> {
        Err(format!("benchmark: {replica_id} failed: {reason}"))
    }
    async fn renew_lease(&self) -> Result<Duration, String> {
        Ok(Duration::MAX)
    }
    async fn promote_member(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fills `[offset, offset + len)` of `path` with non-zero data.
fn fill(path: &Path, offset: u64, len: u64) -> Result<(), String> {
    run(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", "conv=notrunc", "status=none"])
        .arg(format!("seek={}", offset / MIB))
        .arg(format!("count={}", len / MIB)))
    .map(|_| ())
}

/// The reference: `dd` copies `bytes` of `from` to a new file, fsync at the end.
fn reference_copy(from: &Path, to: &Path, bytes: u64) -> Result<f64, String> {
    let _ = std::fs::remove_file(to);
    let started = Instant::now();
    run(Command::new("dd")
        .arg(format!("if={}", from.display()))
        .arg(format!("of={}", to.display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .arg(format!("count={}", bytes / MIB)))?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(to);
    Ok(bytes as f64 / secs)
}

/// fio 4k random writes at queue depth 16 for `secs`: the IOPS.
fn fio_iops(uri: &str, size: u64, secs: u64) -> Result<f64, String> {
    let out = run(Command::new("fio").args([
        "--name=load",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]))?;
    let start = out.find('{').unwrap_or(0);
    let json: serde_json::Value =
        serde_json::from_str(&out[start..]).map_err(|e| format!("fio output: {e}"))?;
    Ok(json["jobs"][0]["write"]["iops"]
        .as_f64()
        .unwrap_or(f64::NAN))
}

struct Setup {
    engine: Engine,
    target: Member,
    uri: String,
    stop: tokio::sync::watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
}

/// A source replica with data per `layout`, served in process to an engine on NBD (with
/// `second`, a copy of it behind its own replica server as a second member, as in a
/// 3-replica volume that lost one), and an empty target replica behind another server.
async fn setup(
    dir: &Path,
    name: &str,
    size: u64,
    layout: &[(u64, u64)],
    second: bool,
) -> Result<Setup, String> {
    let volume = format!("bench-{name}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let sides: &[&str] = if second {
        &["source", "target", "second"]
    } else {
        &["source", "target"]
    };
    for &side in sides {
        let disk = dir.join(format!("{name}-{side}"));
        let _ = std::fs::remove_dir_all(&disk);
        replica::init_disk(&disk).map_err(|e| e.to_string())?;
        let r = replica::create(&disk, &format!("{volume}-{side}"), &volume, size)
            .map_err(|e| e.to_string())?;
        if side == "source" {
            for (offset, len) in layout {
                fill(&r.data_path(), *offset, *len)?;
            }
        }
        if side == "second" {
            let source = replica::replica_dir(
                &dir.join(format!("{name}-source")),
                &format!("{volume}-source"),
            )
            .join(replica::DATA_FILE);
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&source)
                .arg(r.data_path()))?;
        }
        let server = ReplicaServer::bind("127.0.0.1:0", vec![disk], SECRET.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        let local = server.local();
        let mut rx = stopped.clone();
        tokio::spawn(server.serve(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        servers.push((addr, local));
    }
    let token = attachment_token(SECRET, &volume, 1);
    let source = servers[0]
        .1
        .open(&volume, &format!("{volume}-source"), 1, &token)
        .await
        .map_err(|e| e.to_string())?;
    let target = ReplicaClient::connect(
        servers[1].0,
        &volume,
        &format!("{volume}-target"),
        1,
        &token,
        false,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut members = vec![Arc::new(source) as Member];
    if second {
        let client = ReplicaClient::connect(
            servers[2].0,
            &volume,
            &format!("{volume}-second"),
            1,
            &token,
            false,
        )
        .await
        .map_err(|e| e.to_string())?;
        members.push(Arc::new(client));
    }
    let engine = Engine::with_config(
        volume.clone(),
        size,
        members,
        Arc::new(Promotes),
        EngineConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    let socket = dir.join(format!("{name}.sock"));
    let e = engine.clone();
    let path = socket.clone();
    let mut rx = stopped;
    let served = tokio::spawn(async move {
        let _ = e
            .serve_unix(&path, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
    });
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Setup {
        engine,
        target: Arc::new(target),
        uri: format!("nbd+unix:///?socket={}", socket.display()),
        stop,
        served,
    })
}

async fn full() -> Result<(), String> {
    let size = std::env::var("REBUILD_BENCH_SIZE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(4 << 30)
        / (256 * MIB)
        * (256 * MIB);
    let dir = PathBuf::from(
        std::env::var("REBUILD_BENCH_DIR").unwrap_or_else(|_| "target/rebuild-bench".into()),
    );
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    println!(
        "rebuild benchmark: {} MiB volume, files in {}",
        size / MIB,
        dir.display()
    );
    let half = vec![(0, size / 2)];
    let sparse: Vec<(u64, u64)> = (0..size / (256 * MIB))
        .map(|i| (i * 256 * MIB, MIB))
        .collect();
    let sample = dir.join("sample.img");
    fill(&sample, 0, size / 2)?;
    let reference = reference_copy(&sample, &dir.join("copy.img"), size / 2)?;
    println!(
        "reference: dd copy of {} MiB, fsync at the end: {:.0} MiB/s",
        size / 2 / MIB,
        reference / MIB as f64
    );
    for (name, layout) in [("half", half), ("sparse", sparse)] {
        let data: u64 = layout.iter().map(|(_, l)| l).sum();
        let s = setup(&dir, name, size, &layout, false).await?;
        let started = Instant::now();
        let status = s
            .engine
            .start_rebuild(Arc::clone(&s.target))
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let secs = started.elapsed().as_secs_f64();
        if status.state != RebuildState::Done {
            return Err(format!("rebuild {name}: {status:?}"));
        }
        let rate = status.copied as f64 / secs;
        println!(
            "rebuild {name}: {} MiB of data in a {} MiB volume in {secs:.2} s: {:.0} MiB/s of data, {:.0}% of the dd copy{}",
            data / MIB,
            size / MIB,
            rate / MIB as f64,
            100.0 * rate / reference,
            if name == "sparse" {
                format!(
                    "; dd of the data alone would take {:.2} s",
                    data as f64 / reference
                )
            } else {
                String::new()
            }
        );
        let _ = s.stop.send(true);
        let _ = s.served.await;
    }

    // Write IOPS during a rebuild against without one: a 3-replica volume that lost a
    // replica (two members, local and remote) and rebuilds a third.
    let secs = 10;
    let s = setup(&dir, "load", size, &[(0, size / 2)], true).await?;
    let uri = s.uri.clone();
    let quiet = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || fio_iops(&uri, size, secs)
    })
    .await
    .map_err(|e| e.to_string())??;
    let load = tokio::task::spawn_blocking(move || fio_iops(&uri, size, secs));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rebuild = s
        .engine
        .start_rebuild(Arc::clone(&s.target))
        .map_err(|e| e.to_string())?;
    let busy = load.await.map_err(|e| e.to_string())??;
    let status = rebuild.await.map_err(|e| e.to_string())?;
    println!(
        "4k random writes qd16 on 2 members: {quiet:.0} IOPS alone, {busy:.0} IOPS with a rebuild of a third running ({:.0}%; the rebuild {:?} after {:.1} s, {} MiB copied)",
        100.0 * busy / quiet,
        status.state,
        status.elapsed.as_secs_f64(),
        status.copied / MIB
    );
    let _ = s.stop.send(true);
    let _ = s.served.await;
    let _ = std::fs::remove_dir_all(&dir);
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
            eprintln!("rebuild bench: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    if !bench {
        println!("rebuild bench: run with `cargo bench --bench rebuild`");
        return;
    }
    if let Err(e) = runtime.block_on(full()) {
        eprintln!("rebuild bench: {e}");
        std::process::exit(1);
    }
}
