//! Cluster mode end to end on loopback: the real `palisade controller`, three real
//! `palisade node` processes (each with its own disk, sockets and ports) and `palisade ctl`,
//! driven over the controller's CSI socket and checked through `ctl --json` and on disk.
//! The nodes and `ctl` read the cluster secret from the controller's state directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade::api::v1 as api;
use palisade::api::v1::control_plane_client::ControlPlaneClient;
use palisade::api::v1::node_agent_client::NodeAgentClient;
use palisade::api::Auth;
use palisade::csi::v1 as pb;
use palisade::replica::{DATA_FILE, REPLICAS_DIR};
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use serde_json::Value;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
/// The controller's heartbeat timeout in these tests (nodes heartbeat every second).
const HEARTBEAT_TIMEOUT_S: u64 = 3;
/// The pods' termination grace that the `wait` recovery policy waits out, in these tests.
const TERMINATION_GRACE_S: u64 = 4;

/// A free loopback port: bound once, then released for the process to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn log_level() -> String {
    std::env::var("PALISADE_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// One node process, where it keeps things, and how it was started.
struct NodeProc {
    id: String,
    disk: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// A controller and its nodes, killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    api: String,
    /// The controller's cluster secret, which the nodes and ctl are given.
    secret_file: PathBuf,
    controller_socket: PathBuf,
    controller_args: Vec<String>,
    controller: Option<Child>,
    nodes: Vec<NodeProc>,
}

fn spawn(args: &[String]) -> Child {
    spawn_logging(args, None)
}

/// Spawns palisade with its log (standard error) going to `log` when given.
fn spawn_logging(args: &[String], log: Option<&Path>) -> Child {
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
fn spawn_logged(args: &[String], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create a log file"))
        .spawn()
        .expect("spawn palisade")
}

impl Cluster {
    async fn start(node_count: usize) -> Cluster {
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
        ];
        let mut cluster = Cluster {
            controller: Some(spawn(&controller_args)),
            controller_args,
            secret_file: dir.path().join("controller/cluster.secret"),
            dir,
            api: format!("http://{api}"),
            controller_socket,
            nodes: Vec::new(),
        };
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
    fn node_args(&self, id: &str, secret_file: &Path) -> NodeProc {
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
    async fn add_node(&mut self, id: &str, secret_file: &Path, log: Option<&Path>) {
        let mut node = self.node_args(id, secret_file);
        node.child = Some(match log {
            Some(log) => spawn_logged(&node.args, log),
            None => spawn(&node.args),
        });
        let socket = node.socket.clone();
        self.nodes.push(node);
        self.wait_for_csi(&socket).await;
    }

    /// Starts a killed node again with the same arguments.
    async fn restart_node(&mut self, id: &str) {
        self.restart_node_logging(id, None).await;
    }

    /// Starts a killed node again with the same arguments, its log going to `log` if given.
    async fn restart_node_logging(&mut self, id: &str, log: Option<&Path>) {
        self.kill9(id);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node of the cluster");
        node.child = Some(spawn_logging(&node.args, log));
        let socket = node.socket.clone();
        self.wait_for_csi(&socket).await;
    }

    /// kill -9 of the controller, then the same controller again on the same state.
    async fn restart_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.controller = Some(spawn(&self.controller_args));
        let socket = self.controller_socket.clone();
        self.wait_for_csi(&socket).await;
    }

    /// Waits until the CSI socket answers Probe with ready.
    async fn wait_for_csi(&mut self, socket: &Path) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = palisade::csi_server::connect(socket).await {
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

    /// Runs `palisade ctl --controller <api> --secret-file <the controller's> ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_with_secret(&self.secret_file, args)
    }

    /// Runs `palisade ctl --controller <api> --secret-file <secret_file> ARGS`.
    fn ctl_with_secret(&self, secret_file: &Path, args: &[&str]) -> Output {
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
    fn ctl_ok(&self, args: &[&str]) -> String {
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
    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.ctl_ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {text}"))
    }

    /// Polls `ctl nodes --json` until `ok` holds for the node list.
    async fn wait_nodes(&self, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
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
    fn kill9(&mut self, id: &str) {
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

    async fn controller_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(
            palisade::csi_server::connect(&self.controller_socket)
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

fn up(node: &Value) -> bool {
    node["up"] == Value::Bool(true) && node["health"] == "up"
}

fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(
            pb::volume_capability::BlockVolume {},
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create_request(name: &str, bytes: u64, replicas: &str) -> pb::CreateVolumeRequest {
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
fn replicas_on(disk: &Path) -> Vec<(String, u64)> {
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

fn replica_nodes(volume: &Value) -> BTreeSet<String> {
    volume["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["node_id"].as_str().expect("node_id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_place_replicas_survive_a_dead_node_and_obey_ctl() {
    let mut cluster = Cluster::start(3).await;
    let all = ["n1", "n2", "n3"];

    // Every node registers, heartbeats and is up; its replica server accepts connections.
    let nodes = cluster
        .wait_nodes("3 nodes up", |n| n.len() == 3 && n.iter().all(up))
        .await;
    for n in &nodes {
        assert_eq!(n["disks"].as_array().map(Vec::len), Some(1), "{n:#}");
        assert!(n["storage_maximum"].as_u64() > Some(0), "{n:#}");
        let replica_address = n["replica_address"].as_str().expect("replica address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(replica_address)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "replica server of {} at {replica_address} never listened",
                n["id"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let table = cluster.ctl_ok(&["nodes"]);
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(" up (")).count(),
        3,
        "{table}"
    );

    // Each node's CSI socket serves Identity (no controller service) and Node.
    let node_channel = palisade::csi_server::connect(&cluster.node("n2").socket)
        .await
        .expect("connect to n2");
    let info = NodeClient::new(node_channel.clone())
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("node_get_info")
        .into_inner();
    assert_eq!(info.node_id, "n2");
    let caps = IdentityClient::new(node_channel)
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .expect("get_plugin_capabilities")
        .into_inner();
    assert!(!format!("{caps:?}").contains("ControllerService") && !caps.capabilities.is_empty());

    // The nodes' disks are directories on the host's filesystem, whose free space is not
    // ours to know: the actual-space check must not depend on it.
    cluster.ctl_ok(&[
        "settings",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);

    // A 3-replica volume: one replica on each node, each a data file of the volume's size.
    let mut csi = cluster.controller_client().await;
    let size = 16 * MIB;
    csi.create_volume(create_request("v-three", size, "3"))
        .await
        .expect("create_volume v-three");
    let v = cluster.ctl_json(&["volume", "v-three"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    assert_eq!(v["size"].as_u64(), Some(size));
    assert_eq!(replica_nodes(&v), all.map(String::from).into(), "{v:#}");
    assert!(v["degraded_reason"].is_null(), "{v:#}");
    for r in v["replicas"].as_array().expect("replicas") {
        assert_eq!(r["state"], "ready", "{r:#}");
        assert_eq!(r["node_up"], true, "{r:#}");
    }
    for id in all {
        let found = replicas_on(&cluster.node(id).disk);
        assert_eq!(found.len(), 1, "{id}: {found:?}");
        assert!(found[0].0.starts_with("v-three-r-"), "{id}: {found:?}");
        assert_eq!(found[0].1, size, "{id}: {found:?}");
    }
    let listed = cluster.ctl_ok(&["volumes"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("v-three") && l.contains("n1:ready")),
        "{listed}"
    );
    let scheduled = cluster.ctl_json(&["nodes"]);
    for n in scheduled.as_array().expect("nodes") {
        assert_eq!(n["storage_scheduled"].as_u64(), Some(size), "{n:#}");
    }

    // DeleteVolume removes all three.
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "v-three".into(),
        secrets: Default::default(),
    })
    .await
    .expect("delete_volume v-three");
    assert_eq!(cluster.ctl_json(&["volumes"]), serde_json::json!([]));
    for id in all {
        assert_eq!(replicas_on(&cluster.node(id).disk), vec![], "{id}");
    }

    // Settings: a round trip, and a bad value refused naming the setting.
    assert_eq!(
        cluster
            .ctl_ok(&["settings", "set", "default-replica-count", "2"])
            .trim(),
        "default-replica-count = 2"
    );
    assert_eq!(
        cluster
            .ctl_ok(&["settings", "get", "default-replica-count"])
            .trim(),
        "2"
    );
    let refused = cluster.ctl(&["settings", "set", "default-replica-count", "21"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("default-replica-count") && why.contains("InvalidArgument"),
        "{why}"
    );
    let refused = cluster.ctl(&["settings", "set", "no-such-setting", "1"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no-such-setting"));
    let got = cluster.ctl_json(&["settings", "get", "default-replica-count"]);
    assert_eq!(got["value"], "2", "a refused value must change nothing");
    let listed = cluster.ctl_json(&["settings"]);
    assert!(
        listed
            .as_array()
            .expect("settings")
            .iter()
            .any(|s| s["name"] == "volume-attachment-recovery-policy" && s["value"] == "wait"),
        "{listed:#}"
    );
    cluster.ctl_ok(&["settings", "set", "default-replica-count", "3"]);

    // kill -9 a node: it is down once its heartbeat has expired; the others stay up.
    let killed_at = Instant::now();
    cluster.kill9("n3");
    cluster
        .wait_nodes("n3 down, n1 and n2 up", |n| {
            n.iter().all(|n| up(n) == (n["id"] != "n3"))
        })
        .await;
    let down_after = killed_at.elapsed();
    assert!(
        down_after >= Duration::from_secs(HEARTBEAT_TIMEOUT_S - 1),
        "n3 went down after {down_after:?}, before its heartbeat could expire"
    );
    let table = cluster.ctl_ok(&["nodes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("n3") && l.contains("down (")),
        "{table}"
    );

    // A 3-replica volume while a node is down: degraded, 2 replicas, the reason stated.
    csi.create_volume(create_request("v-degraded", size, "3"))
        .await
        .expect("create_volume v-degraded");
    let v = cluster.ctl_json(&["volume", "v-degraded"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    assert_eq!(
        replica_nodes(&v),
        ["n1", "n2"].map(String::from).into(),
        "{v:#}"
    );
    let reason = v["degraded_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("only 2 of the 3") && reason.contains("not ready"),
        "the reason should count the replicas and say a node is not ready: {v:#}"
    );
    let status = csi
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "v-degraded".into(),
        })
        .await
        .expect("controller_get_volume")
        .into_inner()
        .status
        .expect("status");
    let condition = status.volume_condition.expect("volume condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains(reason), "{condition:?}");
    assert_eq!(replicas_on(&cluster.node("n1").disk).len(), 1);
    assert_eq!(replicas_on(&cluster.node("n2").disk).len(), 1);
    assert_eq!(replicas_on(&cluster.node("n3").disk), vec![]);
    let listed = cluster.ctl_ok(&["volumes"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("v-degraded") && l.contains("2/3")),
        "{listed}"
    );

    // ControllerPublish to a node that is up works, and ctl shows the attachment.
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: "v-degraded".into(),
        node_id: node.to_string(),
        volume_capability: Some(block_cap()),
        readonly: false,
        ..Default::default()
    };
    let published = csi
        .controller_publish_volume(publish("n1"))
        .await
        .expect("controller_publish_volume to n1")
        .into_inner();
    assert_eq!(
        published
            .publish_context
            .get("palisade.io/epoch")
            .map(String::as_str),
        Some("1")
    );
    let v = cluster.ctl_json(&["volume", "v-degraded"]);
    assert_eq!(v["attachment"]["node_id"], "n1", "{v:#}");
    assert_eq!(v["attachment"]["epoch"], 1, "{v:#}");
    // n1 is up: another node cannot take the volume.
    let err = csi
        .controller_publish_volume(publish("n2"))
        .await
        .expect_err("publish to n2 while n1 holds the volume");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("n1"), "{err:?}");

    // ctl volume detach --force clears the attachment; the epoch stays for fencing.
    let refused = cluster.ctl(&["volume", "detach", "v-degraded"]);
    assert!(!refused.status.success(), "detach without --force");
    let detached = cluster.ctl_json(&["volume", "detach", "--force", "v-degraded"]);
    assert_eq!(detached["released"]["node_id"], "n1", "{detached:#}");
    let v = cluster.ctl_json(&["volume", "v-degraded"]);
    assert!(v["attachment"].is_null(), "{v:#}");
    assert_eq!(v["epoch"], 1, "{v:#}");
    let status = csi
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "v-degraded".into(),
        })
        .await
        .expect("controller_get_volume")
        .into_inner()
        .status
        .expect("status");
    assert!(status.published_node_ids.is_empty(), "{status:?}");
    let again = cluster.ctl_ok(&["volume", "detach", "--force", "v-degraded"]);
    assert!(again.contains("was not attached"), "{again}");
    // The next attachment gets a higher epoch.
    let published = csi
        .controller_publish_volume(publish("n2"))
        .await
        .expect("controller_publish_volume to n2")
        .into_inner();
    assert_eq!(
        published
            .publish_context
            .get("palisade.io/epoch")
            .map(String::as_str),
        Some("2")
    );
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: "v-degraded".into(),
        node_id: "n2".into(),
        secrets: Default::default(),
    })
    .await
    .expect("controller_unpublish_volume");

    // A volume whose replicas are all on live nodes deletes cleanly.
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "v-degraded".into(),
        secrets: Default::default(),
    })
    .await
    .expect("delete_volume v-degraded");
    assert_eq!(replicas_on(&cluster.node("n1").disk), vec![]);
    assert_eq!(replicas_on(&cluster.node("n2").disk), vec![]);

    // An unknown volume is NOT_FOUND through ctl, with a clear message.
    let missing = cluster.ctl(&["volume", "no-such-volume"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_processes_pick_up_where_they_were() {
    let mut cluster = Cluster::start(2).await;
    cluster
        .wait_nodes("2 nodes up", |n| n.len() == 2 && n.iter().all(up))
        .await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);
    let secret_file = cluster.dir.path().join("controller/cluster.secret");
    let secret = std::fs::read(&secret_file).expect("the cluster secret");
    assert_eq!(secret.len(), 32);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .expect("stat the secret")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut csi = cluster.controller_client().await;
    csi.create_volume(create_request("v-kept", 8 * MIB, "2"))
        .await
        .expect("create_volume v-kept");

    // The controller dies and comes back on the same state: same secret, same nodes (they
    // keep heartbeating), same volumes, and it reaches the nodes' agents again.
    cluster.restart_controller().await;
    assert_eq!(std::fs::read(&secret_file).expect("the secret"), secret);
    cluster
        .wait_nodes("2 nodes up after the controller's restart", |n| {
            n.len() == 2 && n.iter().all(up)
        })
        .await;
    let v = cluster.ctl_json(&["volume", "v-kept"]);
    assert_eq!(
        replica_nodes(&v),
        ["n1", "n2"].map(String::from).into(),
        "{v:#}"
    );

    // A node dies and comes back with the same address: it registers again, and is still up
    // once the last heartbeat of its previous life has long expired.
    cluster.restart_node("n1").await;
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_TIMEOUT_S + 1)).await;
    cluster
        .wait_nodes("n1 up after its restart", |n| {
            n.len() == 2 && n.iter().all(up)
        })
        .await;
    let mut csi = cluster.controller_client().await;
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "v-kept".into(),
        secrets: Default::default(),
    })
    .await
    .expect("delete_volume v-kept after the restarts");
    for id in ["n1", "n2"] {
        assert_eq!(replicas_on(&cluster.node(id).disk), vec![], "{id}");
    }
}

/// Asserts that a call was refused as unauthenticated, with `needle` in the message.
#[track_caller]
fn assert_unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
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
fn intruder_registration(agent_address: &str) -> api::RegisterNodeRequest {
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
fn wait_exit(child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_refuse_callers_without_this_clusters_credential() {
    let mut cluster = Cluster::start(2).await;
    cluster
        .wait_nodes("2 nodes up", |n| n.len() == 2 && n.iter().all(up))
        .await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);
    let mut csi = cluster.controller_client().await;
    csi.create_volume(create_request("v-guarded", 8 * MIB, "1"))
        .await
        .expect("create_volume v-guarded");
    let v = cluster.ctl_json(&["volume", "v-guarded"]);
    let replica = &v["replicas"][0];
    let field = |name: &str| replica[name].as_str().expect(name).to_string();
    let (node_id, replica_path) = (field("node_id"), PathBuf::from(field("path")));
    assert!(replica_path.join(DATA_FILE).exists(), "{v:#}");
    let target = api::ReplicaTarget {
        node_id: node_id.clone(),
        disk_id: field("disk_id"),
        replica_id: field("id"),
        volume_id: "v-guarded".into(),
    };
    let nodes = cluster.ctl_json(&["nodes"]);
    let agent_address = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == node_id.as_str())
        .and_then(|n| n["agent_address"].as_str())
        .expect("the replica's node's agent address")
        .to_string();

    let secret = std::fs::read(&cluster.secret_file).expect("the cluster secret");
    let stranger = Auth::new(b"the secret of some other cluster!");
    let timeout = Duration::from_secs(5);

    // The controller's ControlPlane: a bare client, and another cluster's credential.
    let channel = palisade::api::channel(&cluster.api, timeout).expect("controller channel");
    let mut bare = ControlPlaneClient::new(channel.clone());
    let missing = "missing authorization metadata";
    assert_unauthenticated(bare.list_volumes(api::ListVolumesRequest {}).await, missing);
    assert_unauthenticated(
        bare.register_node(intruder_registration(&agent_address))
            .await,
        missing,
    );
    let mut wrong = palisade::api::control_client(channel.clone(), stranger.clone());
    let wrong_credential = "wrong credential for this cluster";
    assert_unauthenticated(
        wrong.list_volumes(api::ListVolumesRequest {}).await,
        wrong_credential,
    );
    assert_unauthenticated(
        wrong
            .register_node(intruder_registration(&agent_address))
            .await,
        wrong_credential,
    );
    assert_unauthenticated(
        wrong
            .set_setting(api::SetSettingRequest {
                name: "default-replica-count".into(),
                value: "1".into(),
            })
            .await,
        wrong_credential,
    );
    assert_unauthenticated(
        wrong
            .force_detach(api::ForceDetachRequest {
                volume: "v-guarded".into(),
            })
            .await,
        wrong_credential,
    );
    // A bearer that is not a credential at all.
    let mut request = tonic::Request::new(api::ListVolumesRequest {});
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::from_static("Bearer not-hex"),
    );
    assert_unauthenticated(
        bare.list_volumes(request).await,
        "malformed authorization metadata",
    );
    // The right credential works on the same channel.
    let mut right = palisade::api::control_client(channel, Auth::new(&secret));
    let volumes = right
        .list_volumes(api::ListVolumesRequest {})
        .await
        .expect("list_volumes with the cluster's credential")
        .into_inner();
    assert!(volumes.volumes.iter().any(|v| v.id == "v-guarded"));
    assert_eq!(
        cluster
            .ctl_ok(&["settings", "get", "default-replica-count"])
            .trim(),
        "3"
    );

    // The node's agent: nobody but the controller deletes a replica.
    let channel = palisade::api::channel(&agent_address, timeout).expect("agent channel");
    let delete = || api::DeleteReplicaRequest {
        target: Some(target.clone()),
    };
    assert_unauthenticated(
        NodeAgentClient::new(channel.clone())
            .delete_replica(delete())
            .await,
        missing,
    );
    assert_unauthenticated(
        palisade::api::agent_client(channel.clone(), stranger)
            .delete_replica(delete())
            .await,
        wrong_credential,
    );
    assert!(replica_path.join(DATA_FILE).exists());
    // With the credential (a grow to the same size: nothing changes), it answers.
    palisade::api::agent_client(channel, Auth::new(&secret))
        .grow_replica(api::GrowReplicaRequest {
            target: Some(target.clone()),
            size: 8 * MIB,
        })
        .await
        .expect("grow_replica with the cluster's credential");
    assert!(replica_path.join(DATA_FILE).exists());

    // ctl: without the secret file, with a short one, with another cluster's.
    let absent = cluster.dir.path().join("no-such.secret");
    let out = cluster.ctl_with_secret(&absent, &["nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--secret-file")
            && stderr.contains("no-such.secret")
            && stderr.contains("No such file"),
        "{stderr}"
    );
    let short = cluster.dir.path().join("short.secret");
    std::fs::write(&short, b"abc").expect("write a short secret");
    let out = cluster.ctl_with_secret(&short, &["nodes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("short.secret") && stderr.contains("holds 3 bytes"),
        "{stderr}"
    );
    let other = cluster.dir.path().join("other.secret");
    std::fs::write(&other, b"the secret of some other cluster!").expect("write a secret");
    let out = cluster.ctl_with_secret(&other, &["volumes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains(wrong_credential),
        "{stderr}"
    );

    // A node without its secret file does not start, and says why.
    let lost = cluster.node_args("n-lost", &absent);
    let log = cluster.dir.path().join("n-lost.log");
    let mut child = spawn_logged(&lost.args, &log);
    assert!(!wait_exit(&mut child));
    let text = std::fs::read_to_string(&log).expect("the node's log");
    assert!(
        text.contains("--secret-file") && text.contains("no-such.secret"),
        "{text}"
    );

    // A node with another cluster's secret is refused: it never shows as a node, and its
    // log says why. The nodes with the right one stay up.
    let log = cluster.dir.path().join("n-other.log");
    cluster.add_node("n-other", &other, Some(&log)).await;
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_TIMEOUT_S)).await;
    let nodes = cluster
        .wait_nodes("n1 and n2 up", |n| n.len() == 2 && n.iter().all(up))
        .await;
    assert!(nodes.iter().all(|n| n["id"] != "n-other"), "{nodes:?}");
    let text = std::fs::read_to_string(&log).expect("the node's log");
    assert!(
        text.contains("Unauthenticated")
            && text.contains(wrong_credential)
            && text.contains("other.secret"),
        "{text}"
    );
    assert!(!text.contains("registered with the controller"), "{text}");
    // The same node with the right secret joins.
    cluster.kill9("n-other");
    let mut fixed = cluster.node_args("n-other", &cluster.secret_file);
    fixed.child = Some(spawn(&fixed.args));
    let socket = fixed.socket.clone();
    if let Some(slot) = cluster.nodes.iter_mut().find(|n| n.id == "n-other") {
        *slot = fixed;
    }
    cluster.wait_for_csi(&socket).await;
    cluster
        .wait_nodes("n-other up with the right secret", |n| {
            n.len() == 3 && n.iter().all(up)
        })
        .await;

    // The controller still reaches the agents with its credential.
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "v-guarded".into(),
        secrets: Default::default(),
    })
    .await
    .expect("delete_volume v-guarded");
    assert!(!replica_path.exists());
}

fn mount_cap() -> pb::VolumeCapability {
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
async fn stage_and_publish(
    cluster: &Cluster,
    node: &str,
    volume_id: &str,
    publish_context: &std::collections::HashMap<String, String>,
) -> PathBuf {
    let n = cluster.node(node);
    let mut client = NodeClient::new(
        palisade::csi_server::connect(&n.socket)
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
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
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
fn cleanup_mounts(root: &Path) {
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

/// The replicated data path end to end: a 3-replica volume attached on n1 through the
/// engine (replica sessions, NBD, nbdfuse, loop, ext4), written through its mount; a
/// replica node dies during writes and writing goes on; then n1 freezes, the volume is
/// taken over on n2 (policy immediate), every acknowledged write is there, and n1, resumed,
/// cannot write any more: its fsync fails, and the data files of the replicas the new engine
/// uses do not change by one byte while n1 tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_volume_survives_a_dead_replica_and_fails_over_with_fencing() {
    let mut cluster = Cluster::start(3).await;
    let root = cluster.dir.path().to_path_buf();
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(failover_scenario(
        &mut cluster,
    )))
    .await;
    stop_all(&mut cluster);
    cleanup_mounts(&root);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn failover_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    let mut request = create_request("data", 64 * MIB, "3");
    request.volume_capabilities = vec![mount_cap()];
    request
        .parameters
        .insert("volumeAttachmentRecoveryPolicy".into(), "immediate".into());
    let volume = csi
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let id = volume.volume_id.clone();
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let ctx = csi
        .controller_publish_volume(publish("n1"))
        .await
        .expect("ControllerPublish to n1")
        .into_inner()
        .publish_context;
    let target1 = stage_and_publish(cluster, "n1", &id, &ctx).await;

    // Acknowledged writes, with every member up.
    let mut acknowledged: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for i in 0..4u64 {
        let data = pattern(i, 1 << 20);
        let name = PathBuf::from(format!("before-{i}"));
        write_synced(&target1.join(&name), &data).expect("write with 3 members");
        acknowledged.push((name, data));
    }

    // A replica node dies: writes go on, and its replica leaves the membership.
    cluster.kill9("n3");
    for i in 0..4u64 {
        let data = pattern(100 + i, 1 << 20);
        let name = PathBuf::from(format!("after-n3-{i}"));
        write_synced(&target1.join(&name), &data).expect("write after a member died");
        acknowledged.push((name, data));
    }
    let status = cluster.ctl_json(&["volume", &id]);
    let states: Vec<(String, String)> = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&("n3".to_string(), "failed".to_string())),
        "n3's replica must have left the membership: {states:?}"
    );

    // A stale writer of n1's attachment, beside n1's engine: a session of its epoch, opened
    // with its token, on each replica that is still a member.
    let stale = stale_sessions(cluster, &id, &ctx).await;

    // n1 freezes; the volume moves to n2 once n1's heartbeat has expired.
    let n1_pid =
        nix::unistd::Pid::from_raw(cluster.node("n1").child.as_ref().expect("n1 runs").id() as i32);
    nix::sys::signal::kill(n1_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP n1");
    let frozen = Instant::now();
    let ctx2 = loop {
        match csi.controller_publish_volume(publish("n2")).await {
            Ok(r) => break r.into_inner().publish_context,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                assert!(
                    frozen.elapsed() < Duration::from_secs(HEARTBEAT_TIMEOUT_S + 30),
                    "no take-over: {}",
                    s.message()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("ControllerPublish to n2: {s:?}"),
        }
    };
    assert_ne!(ctx2.get("palisade.io/epoch"), ctx.get("palisade.io/epoch"));
    let target2 = stage_and_publish(cluster, "n2", &id, &ctx2).await;
    write_synced(&target2.join("on-n2"), b"the new node writes").expect("write on n2");
    let failover = frozen.elapsed();
    println!(
        "failover: node frozen -> volume writable on the new node in {:.2} s (heartbeat timeout {} s, policy immediate)",
        failover.as_secs_f64(),
        HEARTBEAT_TIMEOUT_S
    );
    for (name, data) in &acknowledged {
        let read = std::fs::read(target2.join(name)).expect("an acknowledged file");
        assert!(read == *data, "{name:?} differs on the new node");
    }

    // n2 stops writing: its filesystem is frozen, which flushes it through the new engine to
    // the members. From here on nothing may change the data files of the replicas the new
    // engine uses.
    let members = member_data_files(cluster, &id);
    assert!(
        !members.is_empty(),
        "the new engine has no member: {:#}",
        cluster.ctl_json(&["volume", &id])
    );
    let frozen_fs = FrozenFs::freeze(&target2);
    let before: Vec<Vec<u8>> = members
        .iter()
        .map(|(_, path)| std::fs::read(path).expect("a member's data file"))
        .collect();

    // n1 resumes: its engine is fenced, so it cannot write any more.
    nix::sys::signal::kill(n1_pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT n1");
    let late = write_synced(&target1.join("late-from-n1"), &pattern(999, 1 << 20));
    assert!(late.is_err(), "the fenced node's write was acknowledged");
    // Every replica the new engine uses refuses writes (plain and FUA) and trims of n1's
    // attachment.
    for (replica, _) in &members {
        let (_, session) = stale
            .iter()
            .find(|(r, _)| r == replica)
            .expect("a stale session on each member of the new engine");
        use palisade::replica_io::{ReplicaIo, ReplicaIoError};
        let data = || bytes::Bytes::from(vec![0xa5; 4096]);
        let refusals = [
            ("write", session.write(0, data(), false).await),
            ("FUA write", session.write(1 << 20, data(), true).await),
            ("trim", session.trim(2 << 20, 1 << 20).await),
        ];
        for (what, refused) in refusals {
            assert!(
                matches!(refused, Err(ReplicaIoError::Fenced { .. })),
                "replica {replica} did not refuse a {what} of the old attachment: {refused:?}"
            );
        }
    }
    // n1's engine, its writer and its kernel's writeback get time to try again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ((replica, path), before) in members.iter().zip(&before) {
        let after = std::fs::read(path).expect("a member's data file");
        assert!(
            after == *before,
            "replica {replica} ({}) of the new engine took bytes after n1 resumed: first difference at byte {:?}",
            path.display(),
            first_difference(before, &after)
        );
    }
    drop(frozen_fs);
    assert!(
        !target2.join("late-from-n1").exists(),
        "the fenced node's file is visible on the new node"
    );
}

/// The recovery policies with a frozen attached node: `never` refuses until the attachment
/// is released by hand, `wait` takes over once the node has been down for the termination
/// grace, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_policies_never_and_wait_with_a_frozen_node() {
    let mut cluster = Cluster::start(3).await;
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(policies_scenario(
        &mut cluster,
    )))
    .await;
    stop_all(&mut cluster);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn policies_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    let mut ids = Vec::new();
    for policy in ["never", "wait"] {
        let mut request = create_request(&format!("pol-{policy}"), 16 * MIB, "3");
        request
            .parameters
            .insert("volumeAttachmentRecoveryPolicy".into(), policy.into());
        let id = csi
            .create_volume(request)
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
            .volume_id;
        csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n1".into(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .expect("publish on n1");
        ids.push(id);
    }
    // A third volume without the parameter follows the setting as it is at take-over time,
    // changed here after the volume was created.
    let setting_id = csi
        .create_volume(create_request("pol-setting", 16 * MIB, "3"))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: setting_id.clone(),
        node_id: "n1".into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .expect("publish on n1");
    cluster.ctl_ok(&[
        "settings",
        "set",
        "volume-attachment-recovery-policy",
        "immediate",
    ]);
    let publish_n2 = |id: &str| pb::ControllerPublishVolumeRequest {
        volume_id: id.to_string(),
        node_id: "n2".into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    };
    let n1_pid =
        nix::unistd::Pid::from_raw(cluster.node("n1").child.as_ref().expect("n1 runs").id() as i32);
    nix::sys::signal::kill(n1_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP n1");
    let frozen = Instant::now();
    cluster
        .wait_nodes("n1 down", |n| n.iter().any(|x| x["id"] == "n1" && !up(x)))
        .await;

    // Down, but not for the grace yet: `wait` refuses and says when it will allow it.
    let early = csi.controller_publish_volume(publish_n2(&ids[1])).await;
    match early {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("wait"), "{}", s.message());
            assert!(s.message().contains("n1"), "{}", s.message());
        }
        Ok(_) => panic!("`wait` took over before the termination grace had passed"),
    }
    // The volume that follows the setting (now `immediate`) moves at once.
    csi.controller_publish_volume(publish_n2(&setting_id))
        .await
        .expect("the setting `immediate` applies to a volume without the parameter");
    assert!(
        frozen.elapsed() < Duration::from_secs(TERMINATION_GRACE_S + HEARTBEAT_TIMEOUT_S),
        "the take-over by the setting came too late to tell it from `wait`"
    );

    // After the grace it takes over.
    let took_over = loop {
        match csi.controller_publish_volume(publish_n2(&ids[1])).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                assert!(
                    frozen.elapsed()
                        < Duration::from_secs(HEARTBEAT_TIMEOUT_S + TERMINATION_GRACE_S + 20),
                    "`wait` never took over: {}",
                    s.message()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("publish with `wait`: {s:?}"),
        }
    };
    assert_eq!(
        took_over
            .publish_context
            .get("palisade.io/epoch")
            .map(String::as_str),
        Some("2")
    );
    assert!(
        frozen.elapsed() >= Duration::from_secs(TERMINATION_GRACE_S),
        "`wait` took over after {:?}, before the grace",
        frozen.elapsed()
    );

    // `never` still refuses, however long the node has been down...
    let s = csi
        .controller_publish_volume(publish_n2(&ids[0]))
        .await
        .expect_err("`never` must not take over");
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(s.message().contains("never"), "{}", s.message());
    // ...until the operator releases the attachment.
    cluster.ctl_ok(&["volume", "detach", "--force", &ids[0]]);
    csi.controller_publish_volume(publish_n2(&ids[0]))
        .await
        .expect("publish after a forced detach");
    let status = cluster.ctl_json(&["volume", &ids[0]]);
    assert_eq!(status["attachment"]["node_id"], "n2", "{status:#}");
}

/// Resumes frozen processes, then kills every process of the cluster and waits for it.
fn stop_all(cluster: &mut Cluster) {
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
async fn ready_cluster(cluster: &Cluster) -> ControllerClient<Channel> {
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
async fn node_client(cluster: &Cluster, node: &str) -> NodeClient<Channel> {
    NodeClient::new(
        palisade::csi_server::connect(&cluster.node(node).socket)
            .await
            .expect("connect to the node's CSI socket"),
    )
}

/// The node's home (its state directory), where `stage_and_publish` stages and publishes.
fn node_home(cluster: &Cluster, node: &str) -> PathBuf {
    cluster
        .node(node)
        .socket
        .parent()
        .expect("node home")
        .to_path_buf()
}

/// The staging and target paths `stage_and_publish` uses for a volume on a node.
fn staging_and_target(cluster: &Cluster, node: &str, volume_id: &str) -> (PathBuf, PathBuf) {
    let home = node_home(cluster, node);
    (
        home.join(format!("staging-{volume_id}")),
        home.join(format!("target-{volume_id}")),
    )
}

/// Whether something is mounted at `path`, per the kernel.
fn is_mounted(path: &Path) -> bool {
    let path = path.display().to_string();
    mounts_under(Path::new(&path)).contains(&path)
}

/// Mount points at or under `dir`, per the kernel.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// Loop devices whose backing file is under `dir`, with that file.
fn loops_under(dir: &Path) -> Vec<(String, String)> {
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
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
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
async fn volume_stats(
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
async fn unpublish_and_unstage(
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
async fn create_and_publish(
    csi: &mut ControllerClient<Channel>,
    name: &str,
    replicas: &str,
    policy: Option<&str>,
    node: &str,
) -> (String, std::collections::HashMap<String, String>) {
    let mut request = create_request(name, 32 * MIB, replicas);
    request.volume_capabilities = vec![mount_cap()];
    if let Some(policy) = policy {
        request
            .parameters
            .insert("volumeAttachmentRecoveryPolicy".into(), policy.into());
    }
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
            volume_capability: Some(mount_cap()),
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
async fn with_cluster(scenario: for<'a> fn(&'a mut Cluster) -> futures::future::BoxFuture<'a, ()>) {
    with_cluster_of(3, scenario).await;
}

/// [`with_cluster`] with `nodes` nodes.
async fn with_cluster_of(
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

/// kill -9 of a node process with replicated volumes staged, published and written: the
/// engines die with it, and the FUSE mounts, loop devices, staging and target mounts over
/// them are dead. The restarted node tears all that down at start-up (and nothing of another
/// node's): at once where nothing holds the mounts, lazily where a process still has a file
/// open on one (as a pod would), the loop device going when that file is closed. It reports
/// the pods' paths abnormal until the kubelet unpublishes and unstages them, which succeed;
/// a fresh stage brings each volume back with every fsynced write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_tears_down_its_dead_data_path_and_stages_again() {
    with_cluster(|cluster| Box::pin(restart_scenario(cluster))).await;
}

async fn restart_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    // Two volumes on n1: one whose mounts nothing holds, one with a file held open.
    let mut volumes = Vec::new();
    for name in ["restarted", "held"] {
        let (id, ctx) = create_and_publish(&mut csi, name, "2", None, "n1").await;
        let target = stage_and_publish(cluster, "n1", &id, &ctx).await;
        let (staging, _) = staging_and_target(cluster, "n1", &id);
        let mut written = Vec::new();
        for i in 0..3u64 {
            let (file, data) = (format!("file-{i}"), pattern(i, 1 << 20));
            write_synced(&target.join(&file), &data).expect("write before the kill");
            written.push((file, data));
        }
        volumes.push((id, ctx, staging, target, written));
    }
    let held = std::fs::File::open(volumes[1].3.join("file-0")).expect("hold a file open");
    // Another node's volume, which n1's start-up must leave alone.
    let (other, other_ctx) = create_and_publish(&mut csi, "neighbour", "1", None, "n2").await;
    let other_target = stage_and_publish(cluster, "n2", &other, &other_ctx).await;
    write_synced(&other_target.join("kept"), b"n2's data").expect("write on n2");

    let home = node_home(cluster, "n1");
    let fuse_root = home.join("fuse");
    assert_eq!(
        loops_under(&fuse_root).len(),
        2,
        "{:?}",
        loops_under(&fuse_root)
    );

    cluster.kill9("n1");
    // What the dead process left: every layer is still mounted, none can serve.
    for (id, _, staging, target, _) in &volumes {
        assert!(is_mounted(&fuse_root.join(id)) && is_mounted(staging) && is_mounted(target));
    }
    assert_eq!(processes_naming(&fuse_root).len(), 2, "orphaned nbdfuse");

    cluster.restart_node("n1").await;
    // Start-up tore down the dead layers of n1, and only those: nothing is mounted any
    // more; the held volume's loop device goes once its file is closed.
    assert_eq!(
        mounts_under(&home),
        Vec::<String>::new(),
        "mounts left on n1"
    );
    let loops = loops_under(&fuse_root);
    assert!(
        loops.iter().all(|(_, b)| !b.contains("/restarted/")),
        "the loop device of the volume nothing held is left: {loops:?}"
    );
    assert_eq!(processes_naming(&fuse_root), vec![], "nbdfuse left for n1");
    for (id, ..) in &volumes {
        assert!(!home.join("engines").join(format!("{id}.sock")).exists());
    }
    let n2_home = node_home(cluster, "n2");
    assert_eq!(loops_under(&n2_home.join("fuse")).len(), 1, "n2's loop");
    assert_eq!(
        std::fs::read(other_target.join("kept")).expect("n2's volume is still mounted"),
        b"n2's data"
    );

    // The pods' paths are reported abnormal, saying the volume must be staged again.
    let mut n1 = node_client(cluster, "n1").await;
    for (id, _, staging, target, _) in &volumes {
        for path in [target, staging] {
            let stats = volume_stats(&mut n1, id, path)
                .await
                .expect("NodeGetVolumeStats of a torn-down path");
            let condition = stats.volume_condition.expect("a volume condition");
            assert!(condition.abnormal, "{path:?}: {condition:?}");
            assert!(
                condition.message.contains("engine") && condition.message.contains("staged again"),
                "{path:?}: {}",
                condition.message
            );
        }
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !loops_under(&fuse_root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the held volume's loop device stayed after its file was closed: {:?}",
            loops_under(&fuse_root)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The kubelet's unpublish and unstage succeed (twice) and leave nothing behind.
    cluster
        .wait_nodes("n1 up again", |n| {
            n.iter().any(|x| x["id"] == "n1" && up(x))
        })
        .await;
    for (id, ctx, staging, target, written) in &volumes {
        unpublish_and_unstage(&mut n1, id, staging, target).await;
        unpublish_and_unstage(&mut n1, id, staging, target).await;
        assert!(!target.exists() && !staging.exists());
        assert_eq!(
            volume_stats(&mut n1, id, target)
                .await
                .map_err(|s| s.code()),
            Err(tonic::Code::NotFound)
        );
        // A fresh stage on the restarted node serves every fsynced write.
        let target = stage_and_publish(cluster, "n1", id, ctx).await;
        for (file, data) in written {
            let read = std::fs::read(target.join(file)).expect("a file written before the kill");
            assert!(read == *data, "{id}: {file} differs after the restart");
        }
        write_synced(&target.join("after"), b"written by the new engine").expect("write again");
        let stats = volume_stats(&mut n1, id, &target).await.expect("stats");
        assert_eq!(
            stats.volume_condition.map(|c| c.abnormal),
            Some(false),
            "a restaged volume is healthy"
        );
        unpublish_and_unstage(&mut n1, id, staging, &target).await;
    }
    assert_nothing_left(&home);
    assert!(
        !home.join("torn-down").join("restarted.json").exists(),
        "the record of torn-down paths outlived the unstage"
    );

    let mut n2 = node_client(cluster, "n2").await;
    let (other_staging, _) = staging_and_target(cluster, "n2", &other);
    unpublish_and_unstage(&mut n2, &other, &other_staging, &other_target).await;
}

/// Polls NodeGetVolumeStats of `path` until it reports the volume abnormal; returns the
/// message.
async fn wait_abnormal(
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

/// Engines that stop on their own are noticed by their node, which logs it as an error,
/// reports the volume abnormal with the reason, and still unstages it completely:
/// - fenced: n1 freezes, the volume is taken over by n2 (policy immediate) and staged there;
///   n1's first write after it resumes meets the newer epoch at the replicas;
/// - lease expired: the controller freezes, so n1 (started with a 3 s lease) cannot renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_that_stop_on_their_own_are_reported_and_unstaged() {
    with_cluster(|cluster| Box::pin(stopped_engines_scenario(cluster))).await;
}

/// Waits (a few seconds at most) for an error line in `log` saying that the engine of
/// `volume` stopped, in `state`.
async fn assert_logged_stop(log: &Path, volume: &str, state: &str) {
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
fn assert_nothing_left(home: &Path) {
    assert_eq!(mounts_under(home), Vec::<String>::new(), "mounts left");
    assert_eq!(loops_under(&home.join("fuse")), vec![], "loop devices left");
    assert_eq!(processes_naming(&home.join("fuse")), vec![], "nbdfuse left");
    let sockets: Vec<_> = std::fs::read_dir(home.join("engines"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(sockets, Vec::<PathBuf>::new(), "engine sockets left");
}

/// Sets a node's `--lease-seconds` for its next start.
fn set_lease(cluster: &mut Cluster, node: &str, seconds: u64) {
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

async fn stopped_engines_scenario(cluster: &mut Cluster) {
    let home = node_home(cluster, "n1");
    let log = home.join("n1.log");
    cluster.restart_node_logging("n1", Some(&log)).await;
    let mut csi = ready_cluster(cluster).await;

    // Fenced.
    let (id, ctx) = create_and_publish(&mut csi, "fenced", "3", Some("immediate"), "n1").await;
    let target = stage_and_publish(cluster, "n1", &id, &ctx).await;
    write_synced(&target.join("a"), b"before").expect("write on n1");
    let (staging, _) = staging_and_target(cluster, "n1", &id);
    let mut n1 = node_client(cluster, "n1").await;
    let stats = volume_stats(&mut n1, &id, &staging).await.expect("stats");
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    let n1_pid =
        nix::unistd::Pid::from_raw(cluster.node("n1").child.as_ref().expect("n1 runs").id() as i32);
    nix::sys::signal::kill(n1_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP n1");
    let frozen = Instant::now();
    let ctx2 = loop {
        let request = pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n2".into(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        match csi.controller_publish_volume(request).await {
            Ok(r) => break r.into_inner().publish_context,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                assert!(
                    frozen.elapsed() < Duration::from_secs(HEARTBEAT_TIMEOUT_S + 30),
                    "no take-over: {}",
                    s.message()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("ControllerPublish to n2: {s:?}"),
        }
    };
    let n2_target = stage_and_publish(cluster, "n2", &id, &ctx2).await;
    nix::sys::signal::kill(n1_pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT n1");
    let late = write_synced(&target.join("late"), &pattern(7, 1 << 20));
    assert!(late.is_err(), "the fenced node's write was acknowledged");
    // The take-over waited for the lease the controller last granted n1's engine to lapse,
    // so the resumed engine finds its lease expired before anything could fence it (the
    // members' fencing is the second line, exercised by tests/replica_protocol.rs).
    for path in [&staging, &target] {
        let message = wait_abnormal(&mut n1, &id, path, Duration::from_secs(10)).await;
        assert!(
            message.contains("attachment lease expired"),
            "{path:?}: {message}"
        );
    }
    assert_logged_stop(&log, &id, "LeaseExpired").await;
    unpublish_and_unstage(&mut n1, &id, &staging, &target).await;
    assert_nothing_left(&home);
    assert_eq!(
        std::fs::read(n2_target.join("a")).expect("read on n2"),
        b"before"
    );
    assert!(!n2_target.join("late").exists());
    let mut n2 = node_client(cluster, "n2").await;
    let (n2_staging, _) = staging_and_target(cluster, "n2", &id);
    unpublish_and_unstage(&mut n2, &id, &n2_staging, &n2_target).await;

    // Lease expired: n1 again, with a lease of 3 s.
    let log = home.join("n1-short-lease.log");
    set_lease(cluster, "n1", 3);
    cluster.restart_node_logging("n1", Some(&log)).await;
    let mut csi = ready_cluster(cluster).await;
    let (id, ctx) = create_and_publish(&mut csi, "expired", "3", None, "n1").await;
    let target = stage_and_publish(cluster, "n1", &id, &ctx).await;
    write_synced(&target.join("a"), b"before").expect("write on n1");
    let (staging, _) = staging_and_target(cluster, "n1", &id);
    let mut n1 = node_client(cluster, "n1").await;
    let controller_pid = nix::unistd::Pid::from_raw(
        cluster
            .controller
            .as_ref()
            .expect("the controller runs")
            .id() as i32,
    );
    nix::sys::signal::kill(controller_pid, nix::sys::signal::Signal::SIGSTOP)
        .expect("SIGSTOP the controller");
    let message = wait_abnormal(&mut n1, &id, &staging, Duration::from_secs(15)).await;
    nix::sys::signal::kill(controller_pid, nix::sys::signal::Signal::SIGCONT)
        .expect("SIGCONT the controller");
    assert!(message.contains("attachment lease expired"), "{message}");
    assert!(
        write_synced(&target.join("late"), b"after the lease").is_err(),
        "a write was acknowledged after the lease expired"
    );
    assert_logged_stop(&log, &id, "LeaseExpired").await;
    unpublish_and_unstage(&mut n1, &id, &staging, &target).await;
    assert_nothing_left(&home);
}

/// The ready replicas of a volume as `ctl volume --json` shows them: (node, data file).
fn ready_replicas(volume: &Value) -> Vec<(String, PathBuf)> {
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

/// Rebuild under load: a writer writes and fsyncs files through the mount while a replica's
/// node is killed; the controller places a replacement on the spare node (the replenishment
/// wait set to 0), the attached engine rebuilds it online and promotes it. Afterwards the
/// volume has three ready replicas again, every acknowledged file reads back, and the three
/// members' data files are byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_is_replaced_and_rebuilt_under_load() {
    with_cluster_of(4, |cluster| Box::pin(rebuild_scenario(cluster))).await;
}

async fn rebuild_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "replica-replenishment-wait-interval",
        "0",
    ]);
    let (id, ctx) = create_and_publish(&mut csi, "heal", "3", Some("immediate"), "n1").await;
    let target = stage_and_publish(cluster, "n1", &id, &ctx).await;
    let before = cluster.ctl_json(&["volume", &id]);
    let first = ready_replicas(&before);
    assert_eq!(first.len(), 3, "{before:#}");
    let victim = first
        .iter()
        .map(|(node, _)| node.clone())
        .find(|n| n != "n1")
        .expect("a replica away from the attached node");

    let writer = Writer::start(&target);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill9(&victim);

    // Failed, replaced, rebuilt, promoted: three ready replicas, none on the dead node.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen_rebuilding = false;
    let healed = loop {
        let v = cluster.ctl_json(&["volume", &id]);
        seen_rebuilding |= v["replicas"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["state"] == "rebuilding"));
        let ready = ready_replicas(&v);
        if ready.len() == 3 && ready.iter().all(|(n, _)| *n != victim) {
            break v;
        }
        assert!(Instant::now() < deadline, "the volume did not heal: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seen_rebuilding,
        "no replica was seen rebuilding: {healed:#}"
    );
    assert!(
        healed["degraded_reason"].is_null(),
        "healed but still degraded: {healed:#}"
    );
    // Writes go on to the new member for a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.stop_and_check(&target);
    detach_and_compare_members(cluster, "n1", &id, &target).await;
}

/// Waits until the volume's ready replicas satisfy `ok` (by their nodes), and returns the
/// volume as `ctl` shows it.
async fn wait_ready(
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

/// Best-effort data locality and numberOfReplicas changes on an attached volume: attached
/// on a node without a replica, a local replica is added and rebuilt and a remote one
/// retired; `ctl volume set --replicas` grows and shrinks the volume (never dropping the
/// local replica); data written before and after reads back, and the members end identical.
/// Where no local disk qualifies, the volume's status says so and nothing loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_and_replica_count_follow_the_volume() {
    with_cluster_of(4, |cluster| Box::pin(locality_scenario(cluster))).await;
}

async fn locality_scenario(cluster: &mut Cluster) {
    // n1..n3 carry the tag "ssd"; n4 does not.
    for id in ["n1", "n2", "n3"] {
        let node = cluster
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node");
        node.args
            .extend(["--node-tags".to_string(), "ssd".to_string()]);
        cluster.restart_node(id).await;
    }
    let mut csi = ready_cluster(cluster).await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "replica-replenishment-wait-interval",
        "0",
    ]);

    // Best-effort locality: a 2-replica volume attached where it has no replica.
    let mut request = create_request("local", 32 * MIB, "2");
    request.volume_capabilities = vec![mount_cap()];
    request
        .parameters
        .insert("dataLocality".into(), "best-effort".into());
    request
        .parameters
        .insert("nodeSelector".into(), "ssd".into());
    let id = csi
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let placed: Vec<String> = ready_replicas(&cluster.ctl_json(&["volume", &id]))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let consumer = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !placed.iter().any(|p| p == n))
        .expect("an ssd node without a replica");
    let ctx = csi
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: consumer.to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("ControllerPublish")
        .into_inner()
        .publish_context;
    let target = stage_and_publish(cluster, consumer, &id, &ctx).await;
    write_synced(&target.join("before"), &pattern(1, 4 << 20)).expect("write");
    let v = wait_ready(cluster, &id, "a local replica and one remote", |nodes| {
        nodes.len() == 2 && nodes.iter().any(|n| n == consumer)
    })
    .await;
    assert!(v["degraded_reason"].is_null(), "{v:#}");
    write_synced(&target.join("after-local"), &pattern(2, 4 << 20)).expect("write");

    // numberOfReplicas 2 -> 3 -> 1, attached: grows, then shrinks to the local replica.
    cluster.ctl_ok(&["volume", "set", &id, "--replicas", "3"]);
    wait_ready(cluster, &id, "three ready replicas", |nodes| {
        nodes.len() == 3
    })
    .await;
    write_synced(&target.join("after-grow"), &pattern(3, 4 << 20)).expect("write");
    cluster.ctl_ok(&["volume", "set", &id, "--replicas", "1"]);
    let v = wait_ready(cluster, &id, "only the local replica", |nodes| {
        nodes == [consumer.to_string()]
    })
    .await;
    assert_eq!(
        v["replicas"].as_array().expect("replicas").len(),
        1,
        "retired replicas are deleted: {v:#}"
    );
    cluster.ctl_ok(&["volume", "set", &id, "--replicas", "2"]);
    wait_ready(cluster, &id, "two ready replicas", |nodes| nodes.len() == 2).await;
    for (name, seed) in [("before", 1), ("after-local", 2), ("after-grow", 3)] {
        let read = std::fs::read(target.join(name)).expect("a written file");
        assert!(read == pattern(seed, 4 << 20), "{name} differs");
    }
    let refused = cluster.ctl(&["volume", "set", &id, "--data-locality", "strict-local"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("strict-local is decided when the volume is created"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let (staging, _) = staging_and_target(cluster, consumer, &id);
    let mut node = node_client(cluster, consumer).await;
    unpublish_and_unstage(&mut node, &id, &staging, &target).await;
    let members = ready_replicas(&cluster.ctl_json(&["volume", &id]));
    let expected = std::fs::read(&members[0].1).expect("a member's data file");
    assert!(
        std::fs::read(&members[1].1).expect("data file") == expected,
        "members differ"
    );

    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: consumer.to_string(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublish");

    // No qualifying local disk: attached on n4, which lacks the tag, the volume says why.
    let ctx = csi
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n4".to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("ControllerPublish to n4")
        .into_inner()
        .publish_context;
    let target4 = stage_and_publish(cluster, "n4", &id, &ctx).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = cluster.ctl_json(&["volume", &id]);
        if v["degraded_reason"]
            .as_str()
            .is_some_and(|r| r.contains("data locality best-effort") && r.contains("n4"))
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no locality explanation: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // And nothing loops: the replicas stay as they were.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = cluster.ctl_json(&["volume", &id]);
    assert_eq!(
        later["replicas"], v["replicas"],
        "replicas changed: {later:#}"
    );
    // Read on another node, through another engine: the replicas hold every file.
    for (name, seed) in [("before", 1), ("after-local", 2), ("after-grow", 3)] {
        let read = std::fs::read(target4.join(name)).expect("read on n4");
        assert!(read == pattern(seed, 4 << 20), "{name} differs on n4");
    }
}

/// Strict-local: one replica on the consumer's node, the volume pinned there; an attach
/// anywhere else is refused with an explanation, and the lifecycle never adds a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_local_volume_stays_on_its_node() {
    with_cluster(|cluster| Box::pin(strict_local_scenario(cluster))).await;
}

async fn strict_local_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "replica-replenishment-wait-interval",
        "0",
    ]);
    let mut request = create_request("pinned", 32 * MIB, "1");
    request.volume_capabilities = vec![mount_cap()];
    request
        .parameters
        .insert("dataLocality".into(), "strict-local".into());
    request.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![],
        preferred: vec![pb::Topology {
            segments: [(
                palisade::model::TOPOLOGY_NODE_KEY.to_string(),
                "n2".to_string(),
            )]
            .into(),
        }],
    });
    let volume = csi
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let id = volume.volume_id.clone();
    let v = cluster.ctl_json(&["volume", &id]);
    let nodes: Vec<String> = ready_replicas(&v).into_iter().map(|(n, _)| n).collect();
    let home = nodes.first().cloned().expect("one replica");
    assert_eq!(
        home, "n2",
        "the replica is on the consumer named in preferred"
    );
    assert_eq!(nodes.len(), 1, "{v:#}");
    let elsewhere = if home == "n1" { "n3" } else { "n1" };
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.to_string(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let refused = csi
        .controller_publish_volume(publish(elsewhere))
        .await
        .expect_err("an attach away from the replica's node");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("strict-local") && refused.message().contains(&home),
        "{}",
        refused.message()
    );
    let ctx = csi
        .controller_publish_volume(publish(&home))
        .await
        .expect("ControllerPublish on its node")
        .into_inner()
        .publish_context;
    let target = stage_and_publish(cluster, &home, &id, &ctx).await;
    write_synced(&target.join("f"), &pattern(5, 1 << 20)).expect("write");
    let refused = cluster.ctl(&["volume", "set", &id, "--replicas", "2"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("strict-local"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = cluster.ctl_json(&["volume", &id]);
    assert_eq!(
        later["replicas"].as_array().map(Vec::len),
        Some(1),
        "{later:#}"
    );
    assert!(later["degraded_reason"].is_null(), "{later:#}");
}

/// Sessions on each of the volume's members (its replicas in state ready) with the epoch and
/// token of the attachment in `publish_context`, by replica id.
async fn stale_sessions(
    cluster: &Cluster,
    volume: &str,
    publish_context: &std::collections::HashMap<String, String>,
) -> Vec<(String, palisade::replica_client::ReplicaClient)> {
    let epoch: u64 = publish_context[palisade::controller::CONTEXT_EPOCH]
        .parse()
        .expect("an epoch");
    let token = &publish_context[palisade::controller::CONTEXT_TOKEN];
    let status = cluster.ctl_json(&["volume", volume]);
    let mut sessions = Vec::new();
    for r in status["replicas"].as_array().expect("replicas") {
        if r["state"] != "ready" {
            continue;
        }
        let id = r["id"].as_str().expect("replica id");
        let address = r["node_address"].as_str().expect("node_address");
        let session = palisade::replica_client::ReplicaClient::connect(
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
fn member_data_files(cluster: &Cluster, volume: &str) -> Vec<(String, PathBuf)> {
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
struct FrozenFs(PathBuf);

impl FrozenFs {
    fn freeze(mount_point: &Path) -> FrozenFs {
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
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Faults during healing: the controller is killed (-9) and restarted while a replacement is
/// being rebuilt, then the node of a replica being rebuilt is killed and comes back. The
/// volume converges to three ready replicas; a writer's every acknowledged write reads back,
/// and the members end byte-identical. No replica that was not up to date serves as a member:
/// a replica that missed writes counts only after a complete, verified rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healing_survives_a_controller_restart_and_a_dying_rebuild_target() {
    with_cluster_of(4, |cluster| Box::pin(faults_scenario(cluster))).await;
}

async fn faults_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    cluster.ctl_ok(&[
        "settings",
        "set",
        "replica-replenishment-wait-interval",
        "0",
    ]);
    let (id, ctx) = create_and_publish(&mut csi, "faults", "3", Some("immediate"), "n1").await;
    let target = stage_and_publish(cluster, "n1", &id, &ctx).await;
    let first = ready_replicas(&cluster.ctl_json(&["volume", &id]));
    let victim = first
        .iter()
        .map(|(node, _)| node.clone())
        .find(|n| n != "n1")
        .expect("a replica away from the attached node");
    let writer = Writer::start(&target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A replica's node dies; as soon as its replacement is rebuilding, the controller dies.
    cluster.kill9(&victim);
    let rebuilding_on = |v: &Value| -> Option<String> {
        v["replicas"].as_array()?.iter().find_map(|r| {
            (r["state"] == "rebuilding")
                .then(|| r["node_id"].as_str().unwrap_or_default().to_string())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let spare = loop {
        let v = cluster.ctl_json(&["volume", &id]);
        if let Some(node) = rebuilding_on(&v) {
            break node;
        }
        assert!(Instant::now() < deadline, "no replacement: {v:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.restart_controller().await;

    // Then the node of whatever is rebuilding next (or of the new replica) dies and returns.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = cluster.ctl_json(&["volume", &id]);
    let doomed = rebuilding_on(&v).unwrap_or(spare);
    assert_ne!(doomed, "n1");
    cluster.kill9(&doomed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_node(&doomed).await;
    cluster.restart_node(&victim).await;

    let healed = wait_ready(cluster, &id, "three ready replicas again", |nodes| {
        nodes.len() == 3
    })
    .await;
    assert!(healed["degraded_reason"].is_null(), "{healed:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.stop_and_check(&target);
    detach_and_compare_members(cluster, "n1", &id, &target).await;
}

/// A writer through a mount: 40 files of 256 KiB rewritten in turn, each write fsynced; it
/// remembers, for each file, the content of its last acknowledged write.
struct Writer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, std::collections::BTreeMap<String, u64>)>,
}

impl Writer {
    fn start(target: &Path) -> Writer {
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
    fn stop_and_check(self, target: &Path) {
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
async fn detach_and_compare_members(cluster: &Cluster, node: &str, id: &str, target: &Path) {
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
