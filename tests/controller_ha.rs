//! A controller that survives its pod, against a real API server (`$KUBEBUILDER_ASSETS`):
//! leader election with a Lease (two electors, one leads; a killed leader is replaced within
//! 15 s; one that steps down at once), the cluster secret as a Secret (two controllers
//! creating it at once agree on one; a node waits for it), node health from the Nodes'
//! Ready condition and the kubelets' Leases (by the rule of `control::health`), and two real
//! `palisade controller --kubernetes` processes on one Kubernetes store with a real node.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node as KubeNode, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use common::cluster::{create_request, free_port, spawn_logged};
use common::k8s::ControlPlane;
use palisade::control::health::{HostEvidence, NodeEvidence};
use palisade::control::{Controller, ControllerConfig};
use palisade::k8s::election::{ElectionConfig, Elector, RETRY_PERIOD};
use palisade::k8s::node_health::{KubeletWatch, NODE_LEASE_NAMESPACE};
use palisade::k8s::secret::{ClusterSecret, SecretError, SECRET_KEY};
use palisade::model::now_ms;
use palisade::store::embedded::EmbeddedStore;

const NAMESPACE: &str = "palisade-system";

/// How long a killed leader may take to be replaced.
const HANDOVER: Duration = Duration::from_secs(15);

async fn plane(test: &str) -> Option<ControlPlane> {
    let plane = ControlPlane::start(test).await?;
    plane.create_namespace(NAMESPACE);
    Some(plane)
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

async fn holder(client: &kube::Client, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get_opt(lease)
        .await
        .expect("read the Lease")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_electors_leads_and_a_killed_leader_is_replaced_within_15_s() {
    let test = "one_of_two_electors_leads_and_a_killed_leader_is_replaced_within_15_s";
    let Some(plane) = plane(test).await else {
        return;
    };
    let client = plane.client().await;
    let elector = |identity: &str| {
        let client = client.clone();
        let config = ElectionConfig::new(NAMESPACE, "test-leader", identity);
        Elector::start(client, config)
    };
    let (a, b) = (elector("candidate-a"), elector("candidate-b"));
    let (la, lb) = (a.leadership(), b.leadership());
    wait_for("a leader", Duration::from_secs(20), || {
        la.is_leader() || lb.is_leader()
    })
    .await;
    // Exactly one, through three renewals.
    let until = Instant::now() + RETRY_PERIOD * 3;
    while Instant::now() < until {
        assert!(
            la.is_leader() != lb.is_leader(),
            "leaders: a {}, b {}",
            la.is_leader(),
            lb.is_leader()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leader, follower) = if la.is_leader() { (a, b) } else { (b, a) };
    assert_eq!(
        holder(&client, "test-leader").await.as_deref(),
        Some(leader.identity())
    );

    // kill -9 of the leader: its task goes without giving the Lease up.
    let dead = leader.leadership();
    let killed = Instant::now();
    drop(leader);
    // Its work stops as soon as the aborted task is gone.
    wait_for(
        "the dropped elector stops leading",
        Duration::from_secs(1),
        || !dead.is_leader(),
    )
    .await;
    let following = follower.leadership();
    let took = wait_for("the follower leads", HANDOVER, || following.is_leader()).await;
    eprintln!("a killed leader was replaced after {took:?}");
    assert!(killed.elapsed() <= HANDOVER);
    assert_eq!(
        holder(&client, "test-leader").await.as_deref(),
        Some(follower.identity())
    );
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get("test-leader")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));

    // A leader that steps down gives the Lease up: the next candidate takes it at its next
    // try, not a whole lease later.
    let third = elector("candidate-c");
    let next = third.leadership();
    tokio::time::sleep(RETRY_PERIOD * 2).await;
    assert!(!next.is_leader(), "took a live Lease");
    let stepped = Instant::now();
    follower.step_down().await;
    assert!(!following.is_leader());
    let took = wait_for("the third candidate leads", RETRY_PERIOD * 3, || {
        next.is_leader()
    })
    .await;
    eprintln!(
        "a leader that stepped down was replaced after {took:?} ({:?} in all)",
        stepped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_creating_the_secret_at_once_agree_on_one() {
    let test = "two_controllers_creating_the_secret_at_once_agree_on_one";
    let Some(plane) = plane(test).await else {
        return;
    };
    // Two clients, as two controller processes have.
    let (one, two) = (plane.client().await, plane.client().await);
    let secrets = Api::<Secret>::namespaced(one.clone(), NAMESPACE);
    for round in 0..5 {
        let name = format!("cluster-secret-{round}");
        let (a, b) = (
            ClusterSecret::new(one.clone(), NAMESPACE, &name),
            ClusterSecret::new(two.clone(), NAMESPACE, &name),
        );
        let (x, y) = tokio::join!(a.read_or_create(), b.read_or_create());
        let (x, y) = (x.expect("first controller"), y.expect("second controller"));
        assert_eq!(x, y, "round {round}: two secrets");
        assert_eq!(x.len(), 32);
        let stored = secrets.get(&name).await.unwrap();
        assert_eq!(stored.data.unwrap()[SECRET_KEY].0, x);
        assert_eq!(stored.immutable, Some(true));
        // A later start reads it.
        assert_eq!(a.read_or_create().await.unwrap(), x);
    }
    let listed = plane.kubectl_ok(&["get", "secrets", "-n", NAMESPACE, "-o", "name"]);
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.contains("cluster-secret-"))
            .count(),
        5,
        "{listed}"
    );

    // A node waits until the controller created it.
    let waiting = {
        let secret = ClusterSecret::new(two.clone(), NAMESPACE, "later");
        tokio::spawn(async move { secret.wait(Duration::from_millis(200)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "read a Secret that does not exist");
    let made = ClusterSecret::new(one.clone(), NAMESPACE, "later")
        .read_or_create()
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting node never read it")
        .unwrap()
        .unwrap();
    assert_eq!(read, made);

    // Someone else's Secret of that name is refused, and left as it is.
    plane.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "not-ours",
        "--from-literal=password=x",
        "-n",
        NAMESPACE,
    ]);
    let refused = ClusterSecret::new(one.clone(), NAMESPACE, "not-ours")
        .read_or_create()
        .await;
    assert!(
        matches!(refused, Err(SecretError::MissingKey { .. })),
        "{refused:?}"
    );
    let kept = secrets.get("not-ours").await.unwrap().data.unwrap();
    assert_eq!(kept.keys().collect::<Vec<_>>(), ["password"]);
}

/// A Node with its Ready condition, and its kubelet's Lease renewed now.
async fn kubelet(client: &kube::Client, name: &str, ready: bool, lease_seconds: i32) {
    let nodes = Api::<KubeNode>::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &KubeNode {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                ..KubeNode::default()
            },
        )
        .await
        .expect("create a Node");
    set_ready(client, name, ready).await;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(NODE_LEASE_NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_string()),
            lease_duration_seconds: Some(lease_seconds),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE)
        .create(&PostParams::default(), &lease)
        .await
        .expect("create a node Lease");
}

async fn set_ready(client: &kube::Client, name: &str, ready: bool) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {"conditions": [{
        "type": "Ready",
        "status": if ready { "True" } else { "False" },
        "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
        "message": "set by the test",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }]}});
    Api::<KubeNode>::all(client.clone())
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch a Node's status");
}

async fn renew(client: &kube::Client, name: &str) {
    let patch = json!({"spec": {"renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now())}});
    Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("renew a node Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_health_weighs_the_kubelets_nodes_and_leases_by_the_rule() {
    let test = "node_health_weighs_the_kubelets_nodes_and_leases_by_the_rule";
    let Some(plane) = plane(test).await else {
        return;
    };
    let client = plane.client().await;
    // k-ready: Ready, its Lease renewed now for 4 s. k-notready: NotReady, Lease fresh.
    // k-absent: a Palisade node with no Kubernetes Node.
    kubelet(&client, "k-ready", true, 4).await;
    let lease_made = Instant::now();
    kubelet(&client, "k-notready", false, 40).await;
    let watch = Arc::new(KubeletWatch::start(client.clone()));
    assert!(
        watch.wait_synced(Duration::from_secs(30)).await,
        "never synced"
    );
    let host = |node: &str| watch.host(node, now_ms());
    assert_eq!(host("k-ready"), HostEvidence::Alive);
    assert_eq!(host("k-notready"), HostEvidence::NotReady);
    assert_eq!(host("k-absent"), HostEvidence::Unknown);

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("db.redb")).unwrap());
    let agent = Arc::new(palisade::replica::agent::LocalAgent::new(
        "none".into(),
        HashMap::new(),
    ));
    // Heartbeat timeout 1 s; a vouched-for node stays up 30 s more.
    let controller = Controller::new(
        store,
        agent,
        ControllerConfig {
            heartbeat_timeout_ms: 1_000,
            termination_grace_ms: 0,
        },
    )
    .with_node_evidence(watch.clone(), 30_000);
    for id in ["k-ready", "k-notready", "k-absent"] {
        controller
            .heartbeat(palisade::model::Node {
                id: id.to_string(),
                address: String::new(),
                agent_address: format!("{id}:1"),
                zone: None,
                tags: vec![],
                schedulable: true,
                last_heartbeat_ms: 0,
                disks: vec![],
            })
            .await
            .unwrap();
    }
    let up = || async {
        controller
            .node_statuses()
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.node.id.clone(), s.up))
            .collect::<HashMap<_, _>>()
    };
    let expect = |ready: bool, notready: bool, absent: bool| {
        HashMap::from([
            ("k-ready".to_string(), ready),
            ("k-notready".to_string(), notready),
            ("k-absent".to_string(), absent),
        ])
    };
    // Fresh heartbeats: up, NotReady or not.
    assert_eq!(up().await, expect(true, true, true));
    // Expired heartbeats: down at once but for the vouched-for one.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(up().await, expect(true, false, false));

    // The kubelet renews its Lease: the watch delivers it, so k-ready stays vouched for past
    // the first renewal's 4 s.
    renew(&client, "k-ready").await;
    let renewed = Instant::now();
    let past_first =
        (lease_made + Duration::from_millis(4_500)).saturating_duration_since(Instant::now());
    tokio::time::sleep(past_first).await;
    assert_eq!(
        host("k-ready"),
        HostEvidence::Alive,
        "the renewal was not seen"
    );
    assert!(up().await["k-ready"]);

    // It stops renewing: once its Lease expired, the node is down although its confirmation
    // period (30 s) is not over.
    let expired = wait_for("k-ready's Lease expires", Duration::from_secs(15), || {
        host("k-ready") == HostEvidence::LeaseExpired
    })
    .await;
    assert!(renewed.elapsed() >= Duration::from_secs(4), "{expired:?}");
    assert_eq!(up().await, expect(false, false, false));

    // k-notready's kubelet recovers (Ready, Lease fresh): vouched for, its node is up again
    // within the confirmation period; a heartbeat would make it up whatever the kubelet says.
    set_ready(&client, "k-notready", true).await;
    wait_for("k-notready is Ready", Duration::from_secs(10), || {
        host("k-notready") == HostEvidence::Alive
    })
    .await;
    assert_eq!(up().await, expect(false, true, false));
}

/// A child process killed with SIGKILL when dropped.
struct Process(Option<Child>);

impl Process {
    fn kill9(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.0.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        common::cluster::wait_exit(&mut child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `palisade controller` of the pair.
struct ControllerProc {
    api: String,
    socket: PathBuf,
    log: PathBuf,
    process: Process,
}

impl ControllerProc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

const SECRET: &str = "palisade-cluster-secret";
const LEADER_LEASE: &str = "palisade-controller";

fn kube_args(plane: &ControlPlane) -> Vec<String> {
    vec![
        "--kubeconfig".into(),
        plane.kubeconfig.display().to_string(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--secret-from-kubernetes".into(),
        SECRET.into(),
    ]
}

fn start_controller(plane: &ControlPlane, dir: &Path, name: &str) -> ControllerProc {
    let api = format!("127.0.0.1:{}", free_port());
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut args: Vec<String> = vec![
        "controller".into(),
        "--listen".into(),
        api.clone(),
        "--endpoint".into(),
        format!("unix://{}", socket.display()),
        "--state-dir".into(),
        dir.join(name).display().to_string(),
        "--store".into(),
        "kubernetes".into(),
        "--kubernetes".into(),
        "--heartbeat-timeout-seconds".into(),
        "4".into(),
        "--lease-seconds".into(),
        "4".into(),
    ];
    args.extend(kube_args(plane));
    let child = spawn_logged(&args, &log);
    ControllerProc {
        api: format!("http://{api}"),
        socket,
        log,
        process: Process(Some(child)),
    }
}

fn ctl(plane: &ControlPlane, controller: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("ctl")
        .args(["--controller", controller, "--json"])
        .args(kube_args(plane))
        .args(args)
        .output()
        .expect("run palisade ctl")
}

fn ctl_json(plane: &ControlPlane, controller: &str, args: &[&str]) -> Value {
    let out = ctl(plane, controller, args);
    assert!(
        out.status.success(),
        "ctl {args:?} against {controller}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl's JSON")
}

async fn wait_for_csi(socket: &Path, log: &Path) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = palisade::csi::connect(socket).await {
            let mut identity =
                palisade::csi::v1::identity_client::IdentityClient::new(channel.clone());
            if identity
                .probe(palisade::csi::v1::ProbeRequest {})
                .await
                .is_ok()
            {
                return channel;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no CSI on {socket:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_holder(
    client: &kube::Client,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        if let Some(h) = holder(client, LEADER_LEASE).await {
            if ok(&h) {
                return h;
            }
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controller_processes_share_the_store_and_secret_and_one_leads() {
    let test = "two_controller_processes_share_the_store_and_secret_and_one_leads";
    let Some(plane) = plane(test).await else {
        return;
    };
    plane.apply_crds();
    let client = plane.client().await;
    let dir = tempfile::Builder::new()
        .prefix("palisade-ha-")
        .tempdir()
        .unwrap();

    // The first controller creates the secret and takes the Lease.
    let mut a = start_controller(&plane, dir.path(), "a");
    wait_for_csi(&a.socket, &a.log).await;
    let first = wait_holder(&client, "a leader", Duration::from_secs(30), |_| true).await;
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(SECRET)
        .await
        .expect("the controller created the cluster secret");
    assert_eq!(secret.data.unwrap()[SECRET_KEY].0.len(), 32);

    // The second one reads it and follows.
    let b = start_controller(&plane, dir.path(), "b");
    let channel_b = wait_for_csi(&b.socket, &b.log).await;
    tokio::time::sleep(RETRY_PERIOD * 2).await;
    assert_eq!(
        holder(&client, LEADER_LEASE).await.as_deref(),
        Some(first.as_str())
    );
    let leader_log = a.log();
    assert!(leader_log.contains("leading: starting"), "{leader_log}");
    assert!(
        leader_log.contains("leading: the recovery controller starts watching"),
        "{leader_log}"
    );
    assert!(
        !b.log().contains("leading"),
        "the follower ran leader-only work:\n{}",
        b.log()
    );

    // A node reads the same secret (waiting for it if need be) and registers through the
    // follower; both controllers see it, through the one store, and both accept ctl's
    // credential from the Secret.
    let home = dir.path().join("n1");
    let mut node_args: Vec<String> = vec![
        "node".into(),
        "--controller".into(),
        b.api.clone(),
        "--node-id".into(),
        "n1".into(),
        "--endpoint".into(),
        format!("unix://{}", home.join("csi.sock").display()),
        "--state-dir".into(),
        home.display().to_string(),
        "--disk".into(),
        home.join("disk").display().to_string(),
        "--replica-listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--agent-listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--heartbeat-seconds".into(),
        "1".into(),
    ];
    node_args.extend(kube_args(&plane));
    let _node = Process(Some(spawn_logged(&node_args, &dir.path().join("n1.log"))));
    for controller in [&a.api, &b.api] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = ctl_json(&plane, controller, &["nodes"]);
            let listed = nodes.as_array().cloned().unwrap_or_default();
            if listed.len() == 1 && listed[0]["up"] == true {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n1 not up through {controller}: {nodes:#}; node log:\n{}",
                std::fs::read_to_string(dir.path().join("n1.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // CSI on either: a volume created through the follower is the leader's too.
    ctl_json(
        &plane,
        &a.api,
        &[
            "settings",
            "set",
            "storage-minimal-available-percentage",
            "0",
        ],
    );
    let mut csi_b = palisade::csi::v1::controller_client::ControllerClient::new(channel_b.clone());
    let created = csi_b
        .create_volume(create_request("pvc-ha", 16 << 20, "1"))
        .await
        .expect("create_volume through the follower")
        .into_inner()
        .volume
        .expect("a volume");
    assert_eq!(created.volume_id, "pvc-ha");
    let seen = ctl_json(&plane, &a.api, &["volume", "pvc-ha"]);
    assert_eq!(seen["state"], "ready", "{seen:#}");

    // kill -9 of the leader: the follower takes the Lease over within 15 s and starts the
    // leader-only work.
    let killed = Instant::now();
    a.process.kill9();
    let second = wait_holder(&client, "the follower leads", HANDOVER, |h| h != first).await;
    eprintln!(
        "the killed leader was replaced after {:?}",
        killed.elapsed()
    );
    let log = b.log();
    assert!(log.contains("became the leader"), "{log}");
    wait_for(
        "the follower starts the leader's work",
        Duration::from_secs(5),
        || {
            let log = b.log();
            log.contains("leading: starting")
                && log.contains("leading: the recovery controller starts watching")
        },
    )
    .await;
    assert!(!second.is_empty());
    // The node stays up through the new leader.
    let nodes = ctl_json(&plane, &b.api, &["nodes"]);
    assert_eq!(nodes[0]["up"], true, "{nodes:#}");

    // A clean stop gives the Lease up.
    let mut b = b;
    assert!(b.process.terminate(), "the controller did not stop cleanly");
    assert_eq!(
        holder(&client, LEADER_LEASE).await,
        None,
        "the Lease was not given up"
    );
}
