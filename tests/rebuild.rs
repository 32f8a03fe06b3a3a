//! Online rebuild end to end: an engine over replicas behind real replica servers on
//! loopback, serving NBD; a new (or stale, returning) replica is rebuilt while fio writes and
//! verifies through the engine; afterwards the rebuilt replica is a member and every data
//! file is byte-identical, holes included (the copy skips them instead of writing zeros).
//!
//! Needs `fio` on the PATH; `.ci/run` installs it.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use palisade::engine::{Engine, EngineConfig, Member, Membership, RebuildState};
use palisade::replica;
use palisade::replica::client::ReplicaClient;
use palisade::replica::server::ReplicaServer;
use palisade::replica::token::attachment_token;

const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"the rebuild test's secret, 32 b.";
const VOLUME: &str = "vol-rb";

/// Records promotions; never removes anyone (no member fails here).
#[derive(Default)]
struct Recorder {
    promoted: Mutex<Vec<String>>,
}

#[async_trait]
impl Membership for Recorder {
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String> {
        Err(format!(
            "no member should fail here: {replica_id}: {reason}"
        ))
    }
    async fn renew_lease(&self) -> Result<Duration, String> {
        Ok(Duration::MAX)
    }
    async fn promote_member(&self, replica_id: &str) -> Result<(), String> {
        self.promoted.lock().unwrap().push(replica_id.to_string());
        Ok(())
    }
}

/// One replica server per replica (as on separate nodes), each with its own disk.
struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<std::net::SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Cluster {
    async fn start(replicas: usize, size: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut addrs = Vec::new();
        for i in 0..replicas {
            let disk = dir.path().join(format!("disk{i}"));
            replica::init_disk(&disk).unwrap();
            replica::create(&disk, &format!("r{i}"), VOLUME, size).unwrap();
            let server = ReplicaServer::bind("127.0.0.1:0", vec![disk], SECRET.to_vec())
                .await
                .unwrap();
            addrs.push(server.local_addr().unwrap());
            let mut rx = stopped.clone();
            tokio::spawn(server.serve(async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
        }
        Cluster { dir, addrs, stop }
    }

    async fn open(&self, i: usize) -> Member {
        let token = attachment_token(SECRET, VOLUME, 1);
        let client =
            ReplicaClient::connect(self.addrs[i], VOLUME, &format!("r{i}"), 1, &token, i == 0)
                .await
                .unwrap();
        Arc::new(client)
    }

    fn data_path(&self, i: usize) -> PathBuf {
        let disk = self.dir.path().join(format!("disk{i}"));
        replica::open(&disk, &format!("r{i}"))
            .unwrap()
            .unwrap()
            .data_path()
    }

    fn bytes(&self, i: usize) -> Vec<u8> {
        std::fs::read(self.data_path(i)).unwrap()
    }
}

fn fio(uri: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("fio")
        .arg("--name=rebuild")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(args)
        .output()
        .expect("fio runs (apt-get install fio)");
    assert!(
        out.status.success(),
        "fio {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Serves `engine` on a socket under `dir`; returns the NBD URI and the server task.
async fn serve(
    engine: &Engine,
    dir: &Path,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (String, tokio::task::JoinHandle<()>) {
    let socket = dir.join("engine.sock");
    let e = engine.clone();
    let path = socket.clone();
    let mut rx = stop;
    let task = tokio::spawn(async move {
        e.serve_unix(&path, async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .unwrap();
    });
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (format!("nbd+unix:///?socket={}", socket.display()), task)
}

/// Two members with data in the first half of the volume only; a third replica — fresh, or
/// `stale` (garbage everywhere, as a replica that missed writes and comes back) — is rebuilt
/// while fio rewrites and verifies the first half. Every file ends identical, the second
/// half a hole on the rebuilt replica too, and fio's verification passes.
async fn rebuild_under_fio(stale: bool) {
    let size = 64 * MIB;
    let half = size / 2;
    let cluster = Cluster::start(3, size).await;
    if stale {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(cluster.data_path(2))
            .unwrap();
        file.write_all_at(&vec![0xee; size as usize], 0).unwrap();
        file.sync_all().unwrap();
    }
    let membership = Arc::new(Recorder::default());
    let members = vec![cluster.open(0).await, cluster.open(1).await];
    let config = EngineConfig {
        rebuild_chunk: (MIB / 2) as u32,
        ..EngineConfig::default()
    };
    let engine = Engine::with_config(
        VOLUME,
        size,
        members,
        Arc::clone(&membership) as Arc<dyn Membership>,
        config,
    )
    .unwrap();
    let (uri, served) = serve(&engine, cluster.dir.path(), cluster.stop.subscribe()).await;
    // Data in the first half.
    let fill = format!("--size={half}");
    fio(&uri, &["--rw=write", "--bs=1M", "--iodepth=4", &fill]);

    // Random writes with verification, slowed so the rebuild runs in the middle of them.
    let writer = {
        let uri = uri.clone();
        tokio::task::spawn_blocking(move || {
            fio(
                &uri,
                &[
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    &format!("--size={half}"),
                    "--rate_iops=1500",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--randrepeat=0",
                ],
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target = cluster.open(2).await;
    let status = engine.start_rebuild(target).unwrap().await.unwrap();
    assert_eq!(status.state, RebuildState::Done, "{status:?}");
    assert_eq!(status.done, size);
    assert!(
        status.copied >= half && status.copied < size,
        "copied {} bytes: the data half, not the hole",
        status.copied
    );
    assert!(
        !writer.is_finished(),
        "fio ended before the rebuild: no overlap"
    );
    writer.await.unwrap();
    assert_eq!(*membership.promoted.lock().unwrap(), vec!["r2".to_string()]);
    assert_eq!(engine.member_ids(), vec!["r0", "r1", "r2"]);
    assert_eq!(engine.stats().errors, 0);

    // A write after the promotion reaches the rebuilt replica as a member.
    fio(
        &uri,
        &["--rw=write", "--bs=64k", "--size=1M", "--offset=1M"],
    );
    engine.flush().await.unwrap();
    cluster.stop.send_replace(true);
    served.await.unwrap();
    let expected = cluster.bytes(0);
    assert!(cluster.bytes(1) == expected, "member r1 differs from r0");
    assert!(
        cluster.bytes(2) == expected,
        "the rebuilt replica differs from r0"
    );
    // The hole stayed a hole: the rebuilt file holds about the data half, no more.
    let allocated = std::fs::metadata(cluster.data_path(2)).unwrap().blocks() * 512;
    assert!(
        allocated <= half + 4 * MIB,
        "the rebuilt replica allocates {allocated} bytes for {half} of data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_is_rebuilt_under_verified_writes_without_copying_holes() {
    rebuild_under_fio(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_returning_replica_is_brought_up_to_date_holes_included() {
    rebuild_under_fio(true).await;
}
