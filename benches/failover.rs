//! Failover time and memory per attached volume, with the real binaries on loopback: a real
//! `palisade controller` and three real `palisade node` processes (each with its own disk
//! directory, sockets and ports), driven over their CSI sockets as the sidecars and kubelet
//! would, with volumes mounted through the whole data path (engine, NBD, nbdfuse, loop,
//! ext4).
//!
//! Failover: each round creates a 3-replica volume with volumeAttachmentRecoveryPolicy
//! `immediate`, attaches it on one node (ControllerPublish, NodeStage, NodePublish) and writes
//! through the mount; then freezes that node (SIGSTOP), at once retries ControllerPublish to
//! the next node until it succeeds, stages and publishes there and writes + fsyncs a file
//! through the new mount. The failover time is from the SIGSTOP to that fsync returning. The
//! reference beside it is the controller's heartbeat timeout: a frozen node cannot be told
//! from a slow one sooner, so no implementation can fail over faster. (The take-over also
//! waits for the frozen engine's attachment lease to lapse; the controller's default lease,
//! 9 s, is shorter than the default heartbeat timeout, 10 s.) Prints each round, the
//! median and the ratio median / heartbeat timeout. Between rounds the frozen node resumes,
//! its stale mount is unstaged and the volume is deleted.
//!
//! Memory: the resident memory (VmRSS, and the peak VmHWM) of each node process with no
//! volume attached, then with K volumes (3 replicas each) attached on the first node with
//! I/O done through each mount: the first node runs the K engines and a replica of each, the
//! other two serve a replica of each. Prints the growth per volume against the goal of
//! 32 MiB, and the nbdfuse processes' memory (one per volume) beside it; the reference is
//! nbdkit's file plugin serving one volume's file after the same amount of I/O.
//!
//! Run: `cargo bench --bench failover`. Environment: FAILOVER_BENCH_HEARTBEAT_TIMEOUT
//! (seconds, default 10 as in production), FAILOVER_BENCH_LEASE (seconds, default the
//! smaller of 9, as in production, and the heartbeat timeout), FAILOVER_BENCH_ROUNDS (5),
//! FAILOVER_BENCH_VOLUMES (K, 8), FAILOVER_BENCH_ONLY (`failover` or `memory`). Needs root,
//! FUSE, loop devices, nbdfuse, mkfs.ext4, fio and nbdkit. Without `--bench` (as
//! `cargo test --all-targets` runs it) it is a smoke run: a 3 s heartbeat timeout and lease,
//! one round, two volumes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use serde_json::Value;
use tonic::transport::Channel;

/// The tests' cluster harness, for its helpers (capabilities, data patterns, cleanup).
#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod harness;
use harness::{cleanup_mounts, free_port, mount_cap, pattern, write_synced};

const MIB: u64 = 1 << 20;
const VOLUME_SIZE: u64 = 256 * MIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---- the cluster (a variant of the tests' harness, with the timeouts under study) ----

struct NodeProc {
    id: String,
    home: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// A controller and three nodes; on drop every process is resumed and killed, and every
/// mount and loop device under the cluster's directory is removed.
struct Cluster {
    dir: tempfile::TempDir,
    api: String,
    /// The controller's cluster secret, which the nodes and ctl are given.
    secret_file: PathBuf,
    controller_socket: PathBuf,
    controller: Option<Child>,
    nodes: Vec<NodeProc>,
}

fn spawn(args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("create a log file");
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("PALISADE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn palisade")
}

impl Cluster {
    async fn start(heartbeat_timeout: u64, lease: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("palisade-failover-bench-")
            .tempdir()
            .expect("tempdir");
        let api = format!("127.0.0.1:{}", free_port());
        let controller_socket = dir.path().join("controller/csi.sock");
        let controller_args: Vec<String> = vec![
            "controller".into(),
            "--listen".into(),
            api.clone(),
            "--endpoint".into(),
            format!("unix://{}", controller_socket.display()),
            "--state-dir".into(),
            dir.path().join("controller").display().to_string(),
            "--heartbeat-timeout-seconds".into(),
            heartbeat_timeout.to_string(),
            "--lease-seconds".into(),
            lease.to_string(),
        ];
        std::fs::create_dir_all(dir.path().join("controller")).expect("controller dir");
        let controller = spawn(&controller_args, &dir.path().join("controller.log"));
        let mut cluster = Cluster {
            secret_file: dir.path().join("controller/cluster.secret"),
            dir,
            api: format!("http://{api}"),
            controller_socket: controller_socket.clone(),
            controller: Some(controller),
            nodes: Vec::new(),
        };
        cluster.wait_for_csi(&controller_socket).await;
        // The nodes heartbeat every 2 s (the default), or more often under a short timeout.
        let heartbeat = if heartbeat_timeout >= 6 { 2 } else { 1 };
        for i in 1..=3 {
            let id = format!("n{i}");
            let home = cluster.dir.path().join(&id);
            std::fs::create_dir_all(&home).expect("node home");
            let socket = home.join("csi.sock");
            let args: Vec<String> = vec![
                "node".into(),
                "--controller".into(),
                cluster.api.clone(),
                "--node-id".into(),
                id.clone(),
                "--secret-file".into(),
                cluster.secret_file.display().to_string(),
                "--endpoint".into(),
                format!("unix://{}", socket.display()),
                "--state-dir".into(),
                home.display().to_string(),
                "--disk".into(),
                home.join("disk").display().to_string(),
                "--replica-listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--agent-listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--heartbeat-seconds".into(),
                heartbeat.to_string(),
            ];
            let child = spawn(&args, &cluster.dir.path().join(format!("{id}.log")));
            cluster.nodes.push(NodeProc {
                id,
                home,
                socket: socket.clone(),
                args,
                child: Some(child),
            });
            cluster.wait_for_csi(&socket).await;
        }
        cluster.ctl_ok(&[
            "settings",
            "set",
            "storage-minimal-available-percentage",
            "0",
        ]);
        cluster.wait_all_up().await;
        cluster
    }

    async fn wait_for_csi(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = palisade::csi::connect(socket).await {
                let mut id = IdentityClient::new(channel);
                if let Ok(r) = id.probe(pb::ProbeRequest {}).await {
                    if r.into_inner().ready == Some(true) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline && self.all_running(),
                "{socket:?} did not become ready; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all_running(&mut self) -> bool {
        let running =
            |c: &mut Option<Child>| c.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(None)));
        running(&mut self.controller) && self.nodes.iter_mut().all(|n| running(&mut n.child))
    }

    fn node(&self, id: &str) -> &NodeProc {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("a node of the cluster")
    }

    fn pid(&self, id: &str) -> u32 {
        self.node(id).child.as_ref().expect("the node runs").id()
    }

    fn signal(&self, id: &str, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid(id) as i32);
        nix::sys::signal::kill(pid, signal).expect("signal a node");
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("ctl")
            .args(["--controller", &self.api])
            .arg("--secret-file")
            .arg(&self.secret_file)
            .args(args)
            .output()
            .expect("run palisade ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.ctl_ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {text}"))
    }

    async fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let nodes = self.ctl_json(&["nodes"]);
            let list = nodes.as_array().expect("a node list");
            if list.len() == 3
                && list
                    .iter()
                    .all(|n| n["up"] == Value::Bool(true) && n["health"] == "up")
            {
                return;
            }
            assert!(Instant::now() < deadline, "nodes never all up: {nodes:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(
            palisade::csi::connect(&self.controller_socket)
                .await
                .expect("connect to the controller"),
        )
    }

    async fn node_client(&self, id: &str) -> NodeClient<Channel> {
        NodeClient::new(
            palisade::csi::connect(&self.node(id).socket)
                .await
                .expect("connect to a node"),
        )
    }

    fn staging(&self, node: &str, volume: &str) -> PathBuf {
        self.node(node).home.join(format!("staging-{volume}"))
    }

    fn target(&self, node: &str, volume: &str) -> PathBuf {
        self.node(node).home.join(format!("target-{volume}"))
    }

    /// NodeStage + NodePublish on `node`; returns the mounted target.
    async fn stage_and_publish(
        &self,
        node: &str,
        volume: &str,
        context: &HashMap<String, String>,
    ) -> PathBuf {
        let mut client = self.node_client(node).await;
        let staging = self.staging(node, volume);
        let target = self.target(node, volume);
        client
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: volume.to_string(),
                publish_context: context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
        client
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: volume.to_string(),
                publish_context: context.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("NodePublishVolume");
        target
    }

    /// NodeUnpublish + NodeUnstage on `node`; Err says which failed.
    async fn unpublish_and_unstage(&self, node: &str, volume: &str) -> Result<(), String> {
        let mut client = self.node_client(node).await;
        client
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume.to_string(),
                target_path: self.target(node, volume).display().to_string(),
            })
            .await
            .map_err(|s| format!("NodeUnpublish on {node}: {s:?}"))?;
        client
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: volume.to_string(),
                staging_target_path: self.staging(node, volume).display().to_string(),
            })
            .await
            .map_err(|s| format!("NodeUnstage on {node}: {s:?}"))?;
        Ok(())
    }

    /// A ready 3-replica volume with recovery policy `immediate`.
    async fn create_volume(&self, name: &str) -> String {
        let mut csi = self.controller().await;
        let request = pb::CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: VOLUME_SIZE as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: [
                ("numberOfReplicas".to_string(), "3".to_string()),
                (
                    "volumeAttachmentRecoveryPolicy".to_string(),
                    "immediate".to_string(),
                ),
            ]
            .into(),
            ..Default::default()
        };
        csi.create_volume(request)
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
            .volume_id
    }

    async fn publish(
        &self,
        volume: &str,
        node: &str,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        let mut csi = self.controller().await;
        csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: volume.to_string(),
            node_id: node.to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().publish_context)
    }

    async fn unpublish_and_delete(&self, volume: &str, node: &str) {
        let mut csi = self.controller().await;
        csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume.to_string(),
            node_id: node.to_string(),
            secrets: Default::default(),
        })
        .await
        .expect("ControllerUnpublish");
        csi.delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume.to_string(),
            secrets: Default::default(),
        })
        .await
        .expect("DeleteVolume");
    }

    /// Kills a node (after resuming it), removes what it left mounted, and starts it again.
    async fn restart_node(&mut self, id: &str) {
        let home = self.node(id).home.clone();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node of the cluster");
        if let Some(mut c) = node.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup_mounts(&home);
        let log = self.dir.path().join(format!("{id}.restarted.log"));
        node.child = Some(spawn(&node.args, &log));
        let socket = node.socket.clone();
        self.wait_for_csi(&socket).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.as_mut())
            .chain(self.controller.as_mut())
        {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        cleanup_mounts(self.dir.path());
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---- failover ----

struct Round {
    from: String,
    to: String,
    /// SIGSTOP → the start of the ControllerPublish call that succeeded (the controller
    /// refused the ones before: the node was not down yet).
    detected: f64,
    /// SIGSTOP → ControllerPublish to the new node succeeded (detection, fencing, attach).
    published: f64,
    /// → NodeStage + NodePublish returned (engine, NBD, FUSE, loop, mount).
    mounted: f64,
    /// → the first write + fsync through the new mount returned: the failover time.
    writable: f64,
}

async fn failover_round(cluster: &mut Cluster, round: usize) -> Round {
    let ids = ["n1", "n2", "n3"];
    let from = ids[round % 3];
    let to = ids[(round + 1) % 3];
    let volume = cluster.create_volume(&format!("failover-{round}")).await;
    let context = cluster
        .publish(&volume, from)
        .await
        .expect("ControllerPublish");
    let target = cluster.stage_and_publish(from, &volume, &context).await;
    let before = pattern(round as u64, 4 << 20);
    write_synced(&target.join("before"), &before).expect("write before the failover");

    cluster.signal(from, nix::sys::signal::Signal::SIGSTOP);
    let frozen = Instant::now();
    let (context, detected) = loop {
        let attempt = frozen.elapsed().as_secs_f64();
        match cluster.publish(&volume, to).await {
            Ok(context) => break (context, attempt),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                assert!(
                    frozen.elapsed() < Duration::from_secs(120),
                    "no take-over: {}",
                    s.message()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("ControllerPublish to {to}: {s:?}"),
        }
    };
    let published = frozen.elapsed().as_secs_f64();
    let new_target = cluster.stage_and_publish(to, &volume, &context).await;
    let mounted = frozen.elapsed().as_secs_f64();
    write_synced(
        &new_target.join("after"),
        &pattern(1000 + round as u64, 1 << 20),
    )
    .expect("write on the new node");
    let writable = frozen.elapsed().as_secs_f64();
    let read = std::fs::read(new_target.join("before")).expect("the file written before");
    assert!(read == before, "the acknowledged file differs on {to}");

    // The frozen node resumes (its engine is fenced) and its stale mount goes.
    cluster.signal(from, nix::sys::signal::Signal::SIGCONT);
    if let Err(why) = cluster.unpublish_and_unstage(from, &volume).await {
        eprintln!("round {round}: the resumed node did not unstage ({why}); restarting it");
        cluster.restart_node(from).await;
    }
    cluster
        .unpublish_and_unstage(to, &volume)
        .await
        .expect("unstage on the new node");
    cluster.wait_all_up().await;
    cluster.unpublish_and_delete(&volume, to).await;
    Round {
        from: from.to_string(),
        to: to.to_string(),
        detected,
        published,
        mounted,
        writable,
    }
}

async fn failover(cluster: &mut Cluster, heartbeat_timeout: u64, lease: u64, rounds: usize) {
    println!(
        "failover: 3-replica volumes, policy immediate, heartbeat timeout {heartbeat_timeout} s, attachment lease {lease} s, {rounds} rounds"
    );
    let mut times = Vec::new();
    let mut phases = Vec::new();
    for round in 0..rounds {
        let r = failover_round(cluster, round).await;
        phases.push([
            r.detected,
            r.published - r.detected,
            r.mounted - r.published,
            r.writable - r.mounted,
        ]);
        println!(
            "  round {round}: {} frozen -> {}: take-over accepted {:.2} s, published {:.2} s, mounted {:.2} s, written + fsynced {:.2} s",
            r.from, r.to, r.detected, r.published, r.mounted, r.writable
        );
        times.push(r.writable);
    }
    let m = median(&times);
    println!(
        "failover (SIGSTOP -> first fsync on the new node): median {m:.2} s, min {:.2} s, max {:.2} s",
        times.iter().copied().fold(f64::INFINITY, f64::min),
        times.iter().copied().fold(0.0, f64::max)
    );
    let phase = |i: usize| median(&phases.iter().map(|p| p[i]).collect::<Vec<_>>());
    println!(
        "  medians of the phases: until the take-over is accepted {:.2} s, the accepted ControllerPublish (fencing, the old lease's lapse, attach) {:.2} s, NodeStage + NodePublish {:.2} s, first write + fsync {:.2} s",
        phase(0),
        phase(1),
        phase(2),
        phase(3)
    );
    println!(
        "reference: heartbeat timeout {heartbeat_timeout} s (detection floor; the old engine's lease, {lease} s from its last renewal, must lapse too); ratio failover / heartbeat timeout = {:.2}; goal < 15 s: {}",
        m / heartbeat_timeout as f64,
        if m < 15.0 { "met" } else { "missed" }
    );
}

// ---- memory ----

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The pids of the processes whose parent is `pid` and whose command is `name`.
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let comm = stat[..close].split_once('(').map_or("", |(_, c)| c);
            let ppid = stat[close + 1..].split_whitespace().nth(1);
            comm == name && ppid == Some(pid.to_string().as_str())
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The reference: nbdkit's file plugin serving one volume-sized file, after fio wrote `io`
/// bytes through it; returns its (VmRSS, VmHWM).
fn nbdkit_reference(dir: &Path, io: u64) -> Option<(u64, u64)> {
    let file = dir.join("nbdkit-reference.img");
    std::fs::File::create(&file)
        .ok()?
        .set_len(VOLUME_SIZE)
        .ok()?;
    let socket = dir.join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(&socket)
        .arg("file")
        .arg(&file)
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let fio = Command::new("fio")
        .args([
            "--name=reference",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///?socket={}", socket.display()),
            "--rw=write",
            "--bs=1M",
            &format!("--size={io}"),
            "--verify_state_save=0",
        ])
        .stdout(Stdio::null())
        .status();
    let memory = memory_kib(nbdkit.id());
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    fio.ok().filter(|s| s.success()).map(|_| memory)
}

async fn memory(cluster: &mut Cluster, volumes: usize) {
    let io = 16 * MIB;
    println!(
        "memory: {volumes} volumes (3 replicas, {} MiB each) attached on n1, {} MiB written + fsynced and read back through each mount",
        VOLUME_SIZE / MIB,
        io / MIB
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = ["n1", "n2", "n3"];
    let idle: Vec<(u64, u64)> = ids.iter().map(|id| memory_kib(cluster.pid(id))).collect();
    let mut attached = Vec::new();
    for i in 0..volumes {
        let volume = cluster.create_volume(&format!("memory-{i}")).await;
        let context = cluster.publish(&volume, "n1").await.expect("publish");
        let target = cluster.stage_and_publish("n1", &volume, &context).await;
        let data = pattern(i as u64, io as usize);
        write_synced(&target.join("data"), &data).expect("write through the mount");
        let read = std::fs::read(target.join("data")).expect("read back");
        assert!(read == data, "{volume}: read back differs");
        attached.push(volume);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy: Vec<(u64, u64)> = ids.iter().map(|id| memory_kib(cluster.pid(id))).collect();
    let fuse: Vec<(u64, u64)> = children_named(cluster.pid("n1"), "nbdfuse")
        .into_iter()
        .map(memory_kib)
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let role = if i == 0 {
            "engines + replica server"
        } else {
            "replica server"
        };
        let (rss0, hwm0) = idle[i];
        let (rss, hwm) = busy[i];
        let per = mib(rss.saturating_sub(rss0)) / volumes as f64;
        let per_hwm = mib(hwm.saturating_sub(hwm0)) / volumes as f64;
        println!(
            "  {id} ({role}): VmRSS {:.1} -> {:.1} MiB, VmHWM {:.1} -> {:.1} MiB; per volume: RSS {per:+.2} MiB, peak {per_hwm:+.2} MiB",
            mib(rss0),
            mib(rss),
            mib(hwm0),
            mib(hwm)
        );
    }
    let fuse_rss: u64 = fuse.iter().map(|m| m.0).sum();
    println!(
        "  nbdfuse on n1: {} processes, VmRSS {:.1} MiB in all, {:.2} MiB per volume",
        fuse.len(),
        mib(fuse_rss),
        mib(fuse_rss) / fuse.len().max(1) as f64
    );
    let engine_node = mib(busy[0].0.saturating_sub(idle[0].0)) / volumes as f64;
    let replica_nodes = (mib(busy[1].0.saturating_sub(idle[1].0))
        + mib(busy[2].0.saturating_sub(idle[2].0)))
        / 2.0
        / volumes as f64;
    match nbdkit_reference(cluster.dir.path(), io) {
        Some((rss, hwm)) => println!(
            "reference: nbdkit file plugin serving one volume after {} MiB written: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            io / MIB,
            mib(rss),
            mib(hwm)
        ),
        None => println!("reference: nbdkit or fio unavailable"),
    }
    println!(
        "memory per attached volume: engine node {engine_node:.2} MiB (engine + one replica), replica node {replica_nodes:.2} MiB; with nbdfuse {:.2} MiB; goal <= 32 MiB: {}",
        engine_node + mib(fuse_rss) / volumes as f64,
        if engine_node + mib(fuse_rss) / volumes as f64 <= 32.0 {
            "met"
        } else {
            "missed"
        }
    );
    for volume in &attached {
        cluster
            .unpublish_and_unstage("n1", volume)
            .await
            .expect("unstage");
        cluster.unpublish_and_delete(volume, "n1").await;
    }
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (heartbeat_timeout, rounds, volumes) = if bench {
        (
            env_u64("FAILOVER_BENCH_HEARTBEAT_TIMEOUT", 10),
            env_u64("FAILOVER_BENCH_ROUNDS", 5) as usize,
            env_u64("FAILOVER_BENCH_VOLUMES", 8) as usize,
        )
    } else {
        println!("failover bench smoke run (cargo bench --bench failover for the figures)");
        (3, 1, 2)
    };
    // The controller's default lease (9 s) is shorter than its default heartbeat timeout, so
    // that waiting for a down node's lease does not delay a take-over; kept so when the
    // heartbeat timeout is shortened.
    let lease = env_u64("FAILOVER_BENCH_LEASE", heartbeat_timeout.min(9));
    let only = std::env::var("FAILOVER_BENCH_ONLY").unwrap_or_default();
    let mut cluster = Cluster::start(heartbeat_timeout, lease).await;
    if only.is_empty() || only == "memory" {
        memory(&mut cluster, volumes).await;
    }
    if only.is_empty() || only == "failover" {
        failover(&mut cluster, heartbeat_timeout, lease, rounds).await;
    }
}
