//! The multi-process cluster harness of the end-to-end tests: a real `palisade controller`,
//! real `palisade node` processes (each with its own disk, sockets and ports) and `palisade
//! ctl`, on loopback, with the helpers the cluster scenarios share.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade::csi::v1 as pb;
use palisade::replica::{DATA_FILE, REPLICAS_DIR};
use palisade::rpc::v1 as api;
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use serde_json::Value;
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// The controller's heartbeat timeout in these tests (nodes heartbeat every second).
pub const HEARTBEAT_TIMEOUT_S: u64 = 3;

/// The pods' termination grace that the `wait` recovery policy waits out, in these tests.
pub const TERMINATION_GRACE_S: u64 = 4;

/// A free loopback port: bound once, then released for the process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

pub fn log_level() -> String {
    std::env::var("PALISADE_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// One node process, where it keeps things, and how it was started.
pub struct NodeProc {
    pub id: String,
    pub disk: PathBuf,
    pub socket: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
}

/// A controller and its nodes, killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api: String,
    /// The controller's cluster secret, which the nodes and ctl are given.
    pub secret_file: PathBuf,
    pub controller_socket: PathBuf,
    pub controller_args: Vec<String>,
    pub controller: Option<Child>,
    pub nodes: Vec<NodeProc>,
    /// When set, every process's log goes to `<log_dir>/<controller|node id>.log`, appended
    /// across restarts, at level `info` (or `PALISADE_TEST_LOG`).
    pub log_dir: Option<PathBuf>,
}

pub fn spawn(args: &[String]) -> Child {
    spawn_logging(args, None)
}

/// Spawns palisade with its log (standard error) going to `log` when given.
pub fn spawn_logging(args: &[String], log: Option<&Path>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.args(args)
        .env("RUST_LOG", log_level())
        .stdout(Stdio::null());
    if let Some(log) = log {
        cmd.stderr(std::fs::File::create(log).expect("create the log file"));
    }
    cmd.spawn().expect("spawn palisade")
}

/// Like [`spawn`], with the standard error (the log) going to `log`.
pub fn spawn_logged(args: &[String], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create a log file"))
        .spawn()
        .expect("spawn palisade")
}

/// How [`Cluster::start_with`] starts a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Nodes `n1`..`nN`.
    pub nodes: usize,
    /// See [`Cluster::log_dir`].
    pub log_dir: Option<PathBuf>,
    /// Appended to the controller's arguments (kept across restarts), e.g. another store.
    pub controller_args: Vec<String>,
}

impl Cluster {
    pub async fn start(node_count: usize) -> Cluster {
        Cluster::start_with_logs(node_count, None).await
    }

    /// [`Cluster::start`], every process logging to a file in `log_dir` when given (see
    /// [`Cluster::log_dir`]).
    pub async fn start_with_logs(node_count: usize, log_dir: Option<PathBuf>) -> Cluster {
        Cluster::start_with(ClusterOptions {
            nodes: node_count,
            log_dir,
            ..ClusterOptions::default()
        })
        .await
    }

    /// A controller (with `options.controller_args` after the usual ones) and
    /// `options.nodes` nodes.
    pub async fn start_with(options: ClusterOptions) -> Cluster {
        let ClusterOptions {
            nodes: node_count,
            log_dir,
            controller_args: extra_controller_args,
        } = options;
        let dir = tempfile::Builder::new()
            .prefix("palisade-cluster-")
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
            HEARTBEAT_TIMEOUT_S.to_string(),
            "--agent-timeout-seconds".into(),
            "5".into(),
            "--termination-grace-seconds".into(),
            TERMINATION_GRACE_S.to_string(),
            "--lease-seconds".into(),
            HEARTBEAT_TIMEOUT_S.to_string(),
        ]
        .into_iter()
        .chain(extra_controller_args)
        .collect();
        let mut cluster = Cluster {
            controller: None,
            controller_args,
            secret_file: dir.path().join("controller/cluster.secret"),
            dir,
            api: format!("http://{api}"),
            controller_socket,
            nodes: Vec::new(),
            log_dir,
        };
        cluster.controller = Some(cluster.spawn_process("controller", &cluster.controller_args));
        cluster
            .wait_for_csi(&cluster.controller_socket.clone())
            .await;
        // The controller created its secret before it served CSI.
        assert!(cluster.secret_file.exists(), "no {:?}", cluster.secret_file);
        for i in 1..=node_count {
            let id = format!("n{i}");
            let secret_file = cluster.secret_file.clone();
            cluster.add_node(&id, &secret_file, None).await;
        }
        cluster
    }

    /// The arguments of node `id` of this cluster, with `secret_file`.
    pub fn node_args(&self, id: &str, secret_file: &Path) -> NodeProc {
        let home = self.dir.path().join(id);
        let (disk, socket) = (home.join("disk"), home.join("csi.sock"));
        let args: Vec<String> = vec![
            "node".into(),
            "--controller".into(),
            self.api.clone(),
            "--node-id".into(),
            id.to_string(),
            "--secret-file".into(),
            secret_file.display().to_string(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--state-dir".into(),
            home.display().to_string(),
            "--disk".into(),
            disk.display().to_string(),
            "--replica-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--agent-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--heartbeat-seconds".into(),
            "1".into(),
        ];
        NodeProc {
            id: id.to_string(),
            disk,
            socket,
            args,
            child: None,
        }
    }

    /// Starts node `id` with `secret_file` (its log in `log`, if given) and waits for its CSI
    /// socket, which it serves whether or not the controller accepts it.
    pub async fn add_node(&mut self, id: &str, secret_file: &Path, log: Option<&Path>) {
        let mut node = self.node_args(id, secret_file);
        node.child = Some(match log {
            Some(log) => spawn_logged(&node.args, log),
            None => self.spawn_process(id, &node.args),
        });
        let socket = node.socket.clone();
        self.nodes.push(node);
        self.wait_for_csi(&socket).await;
    }

    /// Starts a killed node again with the same arguments.
    pub async fn restart_node(&mut self, id: &str) {
        self.restart_node_logging(id, None).await;
    }

    /// Starts a killed node again with the same arguments, its log going to `log` if given.
    pub async fn restart_node_logging(&mut self, id: &str, log: Option<&Path>) {
        self.kill9(id);
        let (args, socket) = {
            let node = self.node(id);
            (node.args.clone(), node.socket.clone())
        };
        let child = match log {
            Some(log) => spawn_logging(&args, Some(log)),
            None => self.spawn_process(id, &args),
        };
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node of the cluster")
            .child = Some(child);
        self.wait_for_csi(&socket).await;
    }

    /// Spawns palisade as process `name` of the cluster: logging to `<log_dir>/<name>.log`
    /// (appended) when the cluster has a log directory, else like [`spawn`].
    pub fn spawn_process(&self, name: &str, args: &[String]) -> Child {
        let Some(dir) = &self.log_dir else {
            return spawn(args);
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .expect("open a log file");
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("PALISADE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn palisade")
    }

    /// SIGKILL of the controller, which stays down until [`Cluster::restart_controller`].
    pub fn kill9_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 of the controller, then the same controller again on the same state.
    pub async fn restart_controller(&mut self) {
        self.kill9_controller();
        self.controller = Some(self.spawn_process("controller", &self.controller_args));
        let socket = self.controller_socket.clone();
        self.wait_for_csi(&socket).await;
    }

    /// Waits until the CSI socket answers Probe with ready.
    pub async fn wait_for_csi(&mut self, socket: &Path) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = palisade::csi::connect(socket).await {
                let mut id = IdentityClient::new(channel.clone());
                if let Ok(r) = id.probe(pb::ProbeRequest {}).await {
                    if r.into_inner().ready == Some(true) {
                        return channel;
                    }
                }
            }
            assert!(
                Instant::now() < deadline && self.all_running(),
                "{socket:?} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn all_running(&mut self) -> bool {
        let running =
            |c: &mut Option<Child>| c.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(None)));
        running(&mut self.controller) && self.nodes.iter_mut().all(|n| running(&mut n.child))
    }

    pub fn node(&self, id: &str) -> &NodeProc {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("a node of the cluster")
    }

    /// Runs `palisade ctl --controller <api> --secret-file <the controller's> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_with_secret(&self.secret_file, args)
    }

    /// Runs `palisade ctl --controller <api> --secret-file <secret_file> ARGS`.
    pub fn ctl_with_secret(&self, secret_file: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("ctl")
            .args(["--controller", &self.api])
            .arg("--secret-file")
            .arg(secret_file)
            .args(args)
            .output()
            .expect("run palisade ctl")
    }

    /// Runs ctl, which must succeed, and returns its standard output.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs ctl with `--json` and parses what it prints.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.ctl_ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {text}"))
    }

    /// Polls `ctl nodes --json` until `ok` holds for the node list.
    pub async fn wait_nodes(&self, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(HEARTBEAT_TIMEOUT_S + 20);
        loop {
            let nodes = self.ctl_json(&["nodes"]);
            let list = nodes.as_array().expect("a node list").clone();
            if ok(&list) {
                return list;
            }
            assert!(Instant::now() < deadline, "never saw {what}: {nodes:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL: the node gets no chance to say goodbye.
    pub fn kill9(&mut self, id: &str) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node of the cluster");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn controller_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(
            palisade::csi::connect(&self.controller_socket)
                .await
                .expect("connect to the controller's CSI socket"),
        )
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
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn up(node: &Value) -> bool {
    node["up"] == Value::Bool(true) && node["health"] == "up"
}

pub fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(
            pb::volume_capability::BlockVolume {},
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn create_request(name: &str, bytes: u64, replicas: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_cap()],
        parameters: [("numberOfReplicas".to_string(), replicas.to_string())].into(),
        ..Default::default()
    }
}

/// The replica directories on a disk, with the size of each one's data file.
pub fn replicas_on(disk: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(disk.join(REPLICAS_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<(String, u64)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let size = std::fs::metadata(e.path().join(DATA_FILE)).map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    found.sort();
    found
}

pub fn replica_nodes(volume: &Value) -> BTreeSet<String> {
    volume["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["node_id"].as_str().expect("node_id").to_string())
        .collect()
}

/// Asserts that a call was refused as unauthenticated, with `needle` in the message.
#[track_caller]
pub fn assert_unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
    match r {
        Ok(v) => panic!("expected UNAUTHENTICATED ({needle}), got OK: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                tonic::Code::Unauthenticated,
                "message: {}",
                s.message()
            );
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        }
    }
}

/// A registration as a node that does not exist.
pub fn intruder_registration(agent_address: &str) -> api::RegisterNodeRequest {
    api::RegisterNodeRequest {
        node: Some(api::NodeReport {
            node_id: "intruder".into(),
            zone: String::new(),
            tags: vec![],
            replica_address: "127.0.0.1:1".into(),
            agent_address: agent_address.into(),
            disks: vec![],
        }),
        replica_ids: vec![],
    }
}

/// Waits for a process to exit (it must, within 20 s) and returns whether it succeeded.
pub fn wait_exit(child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn mount_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Stages and publishes a volume on a node through its CSI socket; returns the target.
pub async fn stage_and_publish(
    cluster: &Cluster,
    node: &str,
    volume_id: &str,
    publish_context: &std::collections::HashMap<String, String>,
) -> PathBuf {
    let n = cluster.node(node);
    let mut client = NodeClient::new(
        palisade::csi::connect(&n.socket)
            .await
            .expect("connect to the node's CSI socket"),
    );
    let home = n.socket.parent().expect("node home").to_path_buf();
    let staging = home.join(format!("staging-{volume_id}"));
    let target = home.join(format!("target-{volume_id}"));
    client
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: volume_id.to_string(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("NodeStageVolume through the engine");
    client
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: volume_id.to_string(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
    target
}

/// Writes `bytes` to `path` and fsyncs it: Ok only when the data is acknowledged durable.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Unmounts and detaches whatever the test left under `root` (targets, staging, FUSE).
pub fn cleanup_mounts(root: &Path) {
    let root_s = root.display().to_string();
    for _ in 0..2 {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&root_s))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount")
                .arg(&p)
                .stderr(Stdio::null())
                .status();
        }
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let b =
                    std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
                if b.starts_with(&root_s) {
                    let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                    let _ = Command::new("losetup").args(["-d", &dev]).status();
                }
            }
        }
    }
    // nbdfuse outlives a killed node process; its mount is gone by now, so it may go too.
    for (pid, _) in processes_naming(root) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Resumes frozen processes, then kills every process of the cluster and waits for it.
pub fn stop_all(cluster: &mut Cluster) {
    for c in cluster
        .nodes
        .iter_mut()
        .filter_map(|n| n.child.as_mut())
        .chain(cluster.controller.as_mut())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for three nodes up, with the host-disk free-space check off (the nodes' disks are
/// directories on the host's filesystem), and returns a client of the controller's socket.
pub async fn ready_cluster(cluster: &Cluster) -> ControllerClient<Channel> {
    cluster.ctl_ok(&[
        "settings",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);
    let count = cluster.nodes.len();
    cluster
        .wait_nodes(&format!("{count} nodes up"), |n| {
            n.len() == count && n.iter().all(up)
        })
        .await;
    cluster.controller_client().await
}

/// A client of a node's CSI socket.
pub async fn node_client(cluster: &Cluster, node: &str) -> NodeClient<Channel> {
    NodeClient::new(
        palisade::csi::connect(&cluster.node(node).socket)
            .await
            .expect("connect to the node's CSI socket"),
    )
}

/// The node's home (its state directory), where `stage_and_publish` stages and publishes.
pub fn node_home(cluster: &Cluster, node: &str) -> PathBuf {
    cluster
        .node(node)
        .socket
        .parent()
        .expect("node home")
        .to_path_buf()
}

/// The staging and target paths `stage_and_publish` uses for a volume on a node.
pub fn staging_and_target(cluster: &Cluster, node: &str, volume_id: &str) -> (PathBuf, PathBuf) {
    let home = node_home(cluster, node);
    (
        home.join(format!("staging-{volume_id}")),
        home.join(format!("target-{volume_id}")),
    )
}

/// Whether something is mounted at `path`, per the kernel.
pub fn is_mounted(path: &Path) -> bool {
    let path = path.display().to_string();
    mounts_under(Path::new(&path)).contains(&path)
}

/// Mount points at or under `dir`, per the kernel.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// Loop devices whose backing file is under `dir`, with that file.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let dir = dir.display().to_string();
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if b.starts_with(&dir) {
                found.push((
                    format!("/dev/{}", e.file_name().to_string_lossy()),
                    b.trim_end().to_string(),
                ));
            }
        }
    }
    found
}

/// Live processes whose command line names a path under `dir` (nbdfuse serving a FUSE mount
/// of a node's state directory).
pub fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let dir = dir.display().to_string();
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().skip(1).any(|a| a.starts_with(&dir)) && args[0].ends_with("nbdfuse") {
                found.push((pid, args.join(" ")));
            }
        }
    }
    found
}

/// NodeGetVolumeStats of a path on a node.
pub async fn volume_stats(
    client: &mut NodeClient<Channel>,
    volume_id: &str,
    path: &Path,
) -> Result<pb::NodeGetVolumeStatsResponse, tonic::Status> {
    client
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_string(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// NodeUnpublishVolume then NodeUnstageVolume, both of which must succeed.
pub async fn unpublish_and_unstage(
    client: &mut NodeClient<Channel>,
    volume_id: &str,
    staging: &Path,
    target: &Path,
) {
    client
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
    client
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
}

/// Creates a volume of `replicas` replicas with the mount capability and publishes it to
/// `node`; returns its id and publish context.
pub async fn create_and_publish(
    csi: &mut ControllerClient<Channel>,
    name: &str,
    replicas: &str,
    policy: Option<&str>,
    node: &str,
) -> (String, std::collections::HashMap<String, String>) {
    let mut request = create_request(name, 32 * MIB, replicas);
    if let Some(policy) = policy {
        request
            .parameters
            .insert("volumeAttachmentRecoveryPolicy".into(), policy.into());
    }
    create_and_publish_as(csi, request, &mount_cap(), node).await
}

/// Creates the volume `request` asks for, with capability `cap`, and publishes it to
/// `node`; returns its id and publish context.
pub async fn create_and_publish_as(
    csi: &mut ControllerClient<Channel>,
    mut request: pb::CreateVolumeRequest,
    cap: &pb::VolumeCapability,
    node: &str,
) -> (String, std::collections::HashMap<String, String>) {
    request.volume_capabilities = vec![cap.clone()];
    let id = csi
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let ctx = csi
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node.to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("ControllerPublishVolume")
        .into_inner()
        .publish_context;
    (id, ctx)
}

/// Runs a scenario on a fresh three-node cluster, then stops every process and removes
/// every mount, loop device and nbdfuse process the test left, whether it passed or not.
pub async fn with_cluster(
    scenario: for<'a> fn(&'a mut Cluster) -> futures::future::BoxFuture<'a, ()>,
) {
    with_cluster_of(3, scenario).await;
}

/// [`with_cluster`] with `nodes` nodes.
pub async fn with_cluster_of(
    nodes: usize,
    scenario: for<'a> fn(&'a mut Cluster) -> futures::future::BoxFuture<'a, ()>,
) {
    let mut cluster = Cluster::start(nodes).await;
    let root = cluster.dir.path().to_path_buf();
    let result =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(scenario(&mut cluster)))
            .await;
    stop_all(&mut cluster);
    cleanup_mounts(&root);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Polls NodeGetVolumeStats of `path` until it reports the volume abnormal; returns the
/// message.
pub async fn wait_abnormal(
    client: &mut NodeClient<Channel>,
    volume_id: &str,
    path: &Path,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let stats = volume_stats(client, volume_id, path)
            .await
            .unwrap_or_else(|s| panic!("NodeGetVolumeStats of {path:?}: {s:?}"));
        let condition = stats.volume_condition.expect("a volume condition");
        if condition.abnormal {
            return condition.message;
        }
        assert!(
            Instant::now() < deadline,
            "{volume_id} at {path:?} still reported healthy after {within:?}: {}",
            condition.message
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (a few seconds at most) for an error line in `log` saying that the engine of
/// `volume` stopped, in `state`.
pub async fn assert_logged_stop(log: &Path, volume: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logged = std::fs::read_to_string(log).expect("the node's log");
        if logged.lines().any(|l| {
            l.contains("ERROR")
                && l.contains("the engine stopped serving I/O")
                && l.contains(&format!("volume={volume}"))
                && l.contains(&format!("state={state}"))
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no error logged for {volume} ({state}):\n{logged}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that nothing of any volume is left on the node with home `home`: no mount, no
/// loop device over its FUSE files, no nbdfuse, no engine socket.
#[track_caller]
pub fn assert_nothing_left(home: &Path) {
    assert_eq!(mounts_under(home), Vec::<String>::new(), "mounts left");
    assert_eq!(loops_under(&home.join("fuse")), vec![], "loop devices left");
    assert_eq!(processes_naming(&home.join("fuse")), vec![], "nbdfuse left");
    let sockets: Vec<_> = std::fs::read_dir(home.join("engines"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(sockets, Vec::<PathBuf>::new(), "engine sockets left");
}

/// Sets a node's `--lease-seconds` for its next start.
pub fn set_lease(cluster: &mut Cluster, node: &str, seconds: u64) {
    let args = &mut cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == node)
        .expect("a node of the cluster")
        .args;
    if let Some(i) = args.iter().position(|a| a == "--lease-seconds") {
        args.drain(i..=i + 1);
    }
    args.extend(["--lease-seconds".to_string(), seconds.to_string()]);
}

/// The ready replicas of a volume as `ctl volume --json` shows them: (node, data file).
pub fn ready_replicas(volume: &Value) -> Vec<(String, PathBuf)> {
    volume["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter(|r| r["state"] == "ready")
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                PathBuf::from(r["path"].as_str().unwrap_or_default()).join(DATA_FILE),
            )
        })
        .collect()
}

/// Waits until the volume's ready replicas satisfy `ok` (by their nodes), and returns the
/// volume as `ctl` shows it.
pub async fn wait_ready(
    cluster: &Cluster,
    id: &str,
    what: &str,
    ok: impl Fn(&[String]) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = cluster.ctl_json(&["volume", id]);
        let nodes: Vec<String> = ready_replicas(&v).into_iter().map(|(n, _)| n).collect();
        if ok(&nodes) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sessions on each of the volume's members (its replicas in state ready) with the epoch and
/// token of the attachment in `publish_context`, by replica id.
pub async fn stale_sessions(
    cluster: &Cluster,
    volume: &str,
    publish_context: &std::collections::HashMap<String, String>,
) -> Vec<(String, palisade::replica::client::ReplicaClient)> {
    let epoch: u64 = publish_context[palisade::model::CONTEXT_EPOCH]
        .parse()
        .expect("an epoch");
    let token = &publish_context[palisade::model::CONTEXT_TOKEN];
    let status = cluster.ctl_json(&["volume", volume]);
    let mut sessions = Vec::new();
    for r in status["replicas"].as_array().expect("replicas") {
        if r["state"] != "ready" {
            continue;
        }
        let id = r["id"].as_str().expect("replica id");
        let address = r["node_address"].as_str().expect("node_address");
        let session = palisade::replica::client::ReplicaClient::connect(
            address, volume, id, epoch, token, false,
        )
        .await
        .unwrap_or_else(|e| panic!("a session on {id} at epoch {epoch}: {e}"));
        sessions.push((id.to_string(), session));
    }
    sessions
}

/// The data files of the volume's members (its replicas in state ready), on their nodes'
/// disks, by replica id.
pub fn member_data_files(cluster: &Cluster, volume: &str) -> Vec<(String, PathBuf)> {
    let status = cluster.ctl_json(&["volume", volume]);
    status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter(|r| r["state"] == "ready")
        .map(|r| {
            let id = r["id"].as_str().expect("replica id").to_string();
            let node = r["node_id"].as_str().expect("node_id");
            let path = cluster
                .node(node)
                .disk
                .join(REPLICAS_DIR)
                .join(&id)
                .join(DATA_FILE);
            (id, path)
        })
        .collect()
}

/// A filesystem frozen with `fsfreeze` (flushed, and no more writes, not even its own
/// background ones, until thawed); thawed on drop.
pub struct FrozenFs(PathBuf);

impl FrozenFs {
    pub fn freeze(mount_point: &Path) -> FrozenFs {
        let status = Command::new("fsfreeze")
            .arg("--freeze")
            .arg(mount_point)
            .status()
            .expect("run fsfreeze (util-linux)");
        assert!(
            status.success(),
            "fsfreeze --freeze {mount_point:?}: {status}"
        );
        FrozenFs(mount_point.to_path_buf())
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .status();
    }
}

/// The offset of the first byte where `a` and `b` differ (or where the shorter one ends).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// A writer through a mount: 40 files of 256 KiB rewritten in turn, each write fsynced; it
/// remembers, for each file, the content of its last acknowledged write.
pub struct Writer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, std::collections::BTreeMap<String, u64>)>,
}

impl Writer {
    pub fn start(target: &Path) -> Writer {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stopping, target) = (Arc::clone(&stop), target.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut acknowledged = std::collections::BTreeMap::new();
            let mut i = 0u64;
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                let name = format!("w-{}", i % 40);
                match write_synced(&target.join(&name), &pattern(i, 256 << 10)) {
                    Ok(()) => acknowledged.insert(name, i),
                    Err(e) => panic!("write {name} failed: {e}"),
                };
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (i, acknowledged)
        });
        Writer { stop, thread }
    }

    /// Stops the writer and checks that every acknowledged write reads back.
    pub fn stop_and_check(self, target: &Path) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (writes, acknowledged) = self.thread.join().expect("the writer");
        assert!(writes > 40, "only {writes} writes");
        for (name, seed) in &acknowledged {
            let read = std::fs::read(target.join(name)).expect("an acknowledged file");
            assert!(read == pattern(*seed, 256 << 10), "{name} differs");
        }
    }
}

/// Unpublishes and unstages the volume on `node` (its engine flushes and stops), then
/// asserts that the data files of its ready replicas are byte-identical.
pub async fn detach_and_compare_members(cluster: &Cluster, node: &str, id: &str, target: &Path) {
    let (staging, _) = staging_and_target(cluster, node, id);
    let mut client = node_client(cluster, node).await;
    unpublish_and_unstage(&mut client, id, &staging, target).await;
    let members = ready_replicas(&cluster.ctl_json(&["volume", id]));
    assert!(members.len() >= 2, "nothing to compare: {members:?}");
    let expected = std::fs::read(&members[0].1).expect("a member's data file");
    for (node, file) in &members[1..] {
        let bytes = std::fs::read(file).expect("a member's data file");
        assert!(
            bytes == expected,
            "the member on {node} differs from the one on {}",
            members[0].0
        );
    }
}
