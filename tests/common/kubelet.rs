//! An emulated kubelet for the end-to-end tests on a real control plane: for one node, what
//! the kubelet does with the API server and with a CSI driver, for real, with no containers.
//!
//! - Registration: the Node (capacity and allocatable for the scheduler, the labels
//!   `kubernetes.io/hostname`, os and arch, the topology segments the driver's NodeGetInfo
//!   returns, the annotation that hands attach and detach to the attach-detach controller)
//!   and the CSINode entry that node-driver-registrar makes the kubelet write: the driver,
//!   its node id and topology keys from NodeGetInfo, its volume limit.
//! - Heartbeat: the Lease in `kube-node-lease` and the Ready condition, every
//!   [`KubeletConfig::heartbeat`].
//! - Pods bound to the node, level-triggered (kube-rs reflectors wake a sync loop, which
//!   also runs every [`KubeletConfig::resync`]), each step idempotent:
//!   1. the CSI volumes of its claims (PVC Bound, its PV) are reported in the Node's
//!      `status.volumesInUse` before anything is mounted, as the volume manager does;
//!   2. it waits for the attach-detach controller to list the volume in
//!      `status.volumesAttached`, and for the VolumeAttachment (named as the kubelet names
//!      it) to be `attached`; its `attachmentMetadata` is the publish context;
//!   3. NodeStageVolume at `<root>/plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount`
//!      and NodePublishVolume at `<root>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`,
//!      each with a `vol_data.json` beside it, as the kubelet lays them out, with the PV's
//!      volumeHandle, fsType, mountOptions and volumeAttributes and the access mode the
//!      kubelet derives from the PV and the node's capabilities;
//!   4. the pod's "container", a function the test passes, runs once with the mount paths;
//!      then the pod is Running and Ready (or, if it failed, not Ready, its message in the
//!      container's status, as CrashLoopBackOff).
//! - A pod with a deletionTimestamp: NodeUnpublishVolume, NodeUnstageVolume when no other
//!   pod on the node uses the volume, the volume out of `volumesInUse`, and then the pod is
//!   deleted with grace period 0 (uid precondition), as the kubelet confirms a termination.
//!   Pod directories whose pod is gone from the API (force-deleted) are torn down the same way.
//! - [`Kubelet::kill`] plays a dead node: no more Lease, status or pod handling, until
//!   [`Kubelet::revive`].
//!
//! Not emulated: images, real containers and their restarts, probes, pod IPs and networking,
//! non-CSI volume types (they are ignored), raw block volumes (the pod stays
//! ContainerCreating, saying so), secrets of
//! CSI calls, fsGroup, NodeExpandVolume, NodeGetVolumeStats, eviction and node pressure.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode, VolumeAttachment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use palisade::csi::v1 as pb;
use pb::node_client::NodeClient;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// The kubelet's name for the CSI volume plugin, in paths and unique volume names.
const CSI_PLUGIN: &str = "kubernetes.io/csi";
/// The annotation through which the kubelet leaves attach and detach to the controller.
const CONTROLLER_MANAGED_ATTACH: &str = "volumes.kubernetes.io/controller-managed-attach-detach";
/// The annotation in which the kubelet records each CSI driver's node id.
const CSI_NODE_ID_ANNOTATION: &str = "csi.volume.kubernetes.io/nodeid";
/// The namespace of the node Leases.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Each of these files beside a staging or target path describes the volume (the kubelet's
/// `vol_data.json`), so that a restart, or a pod gone from the API, can still be torn down.
const VOL_DATA: &str = "vol_data.json";

/// How a [`Kubelet`] runs.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The Kubernetes node name.
    pub node_name: String,
    /// The CSI driver whose node plugin serves on `csi_socket`.
    pub driver: String,
    pub csi_socket: PathBuf,
    /// What `/var/lib/kubelet` is to the kubelet: staging and pod directories go under it.
    pub root_dir: PathBuf,
    /// How often the Lease and the Ready condition are renewed.
    pub heartbeat: Duration,
    /// The Lease's duration.
    pub lease_duration: Duration,
    /// How often pods are synced when nothing changed.
    pub resync: Duration,
    /// Extra labels on the Node (e.g. `topology.kubernetes.io/zone`).
    pub labels: BTreeMap<String, String>,
}

impl KubeletConfig {
    pub fn new(node_name: &str, driver: &str, csi_socket: &Path, root_dir: &Path) -> Self {
        KubeletConfig {
            node_name: node_name.to_string(),
            driver: driver.to_string(),
            csi_socket: csi_socket.to_path_buf(),
            root_dir: root_dir.to_path_buf(),
            heartbeat: Duration::from_secs(2),
            lease_duration: Duration::from_secs(40),
            resync: Duration::from_secs(1),
            labels: BTreeMap::new(),
        }
    }
}

/// What runs in a pod: called once the pod's volumes are published, with the pod and, for
/// each of its CSI volumes (by the pod's volume name), the target path where it is mounted.
/// An error is the container's failure message.
pub type Container =
    Arc<dyn Fn(&Pod, &BTreeMap<String, PathBuf>) -> Result<(), String> + Send + Sync>;

/// A running emulated kubelet; dropping it stops its tasks (its mounts stay, as a kubelet's
/// do when it stops).
pub struct Kubelet {
    pub node_name: String,
    /// The node id the driver's NodeGetInfo returned (the CSINode's nodeID).
    pub node_id: String,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Kubelet {
    /// Registers the node (Node, CSINode, Lease) and starts the heartbeat and pod handling.
    pub async fn start(client: kube::Client, config: KubeletConfig, container: Container) -> Self {
        let csi = NodeClient::new(
            palisade::csi::connect(&config.csi_socket)
                .await
                .unwrap_or_else(|e| panic!("connect to {:?}: {e}", config.csi_socket)),
        );
        let info = DriverInfo::query(csi.clone()).await;
        // The kubelet reports its own version, which is the control plane's here.
        let version = client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .unwrap_or_else(|_| "v0.0.0-emulated".into());
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        let node_field = format!("metadata.name={}", config.node_name);
        let pod_field = format!("spec.nodeName={}", config.node_name);
        let caches = Caches {
            node: reflect(
                Api::all(client.clone()),
                watcher::Config::default().fields(&node_field),
                &wake,
                &mut tasks,
            ),
            pods: reflect(
                Api::all(client.clone()),
                watcher::Config::default().fields(&pod_field),
                &wake,
                &mut tasks,
            ),
            pvcs: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                &wake,
                &mut tasks,
            ),
            pvs: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                &wake,
                &mut tasks,
            ),
            attachments: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                &wake,
                &mut tasks,
            ),
            drivers: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                &wake,
                &mut tasks,
            ),
        };
        let shared = Arc::new(Shared {
            client,
            csi,
            info,
            version,
            dead: AtomicBool::new(false),
            status: tokio::sync::Mutex::new(Reported {
                in_use: BTreeSet::new(),
                ready_since: now(),
            }),
            wake,
            caches,
            config,
            staged_at: std::sync::Mutex::default(),
        });
        shared.register().await;
        for cache in shared.caches.ready() {
            cache.await;
        }
        tasks.push(tokio::spawn(heartbeat(shared.clone())));
        tasks.push(tokio::spawn(sync_loop(shared.clone(), container)));
        Kubelet {
            node_name: shared.config.node_name.clone(),
            node_id: shared.info.node_id.clone(),
            shared,
            tasks,
        }
    }

    /// Plays a dead node: no more Lease renewals, status updates or pod handling.
    pub fn kill(&self) {
        self.shared
            .log("KILLED: no more lease, status or pod handling");
        self.shared.dead.store(true, Ordering::SeqCst);
    }

    /// Comes back from [`Kubelet::kill`]: Ready again (a new transition), pods handled again.
    pub async fn revive(&self) {
        self.shared.status.lock().await.ready_since = now();
        self.shared.dead.store(false, Ordering::SeqCst);
        self.shared.log("REVIVED");
        self.shared.post_status(None).await;
        self.shared.renew_lease().await;
        self.shared.wake.notify_one();
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// What the node last reported in `status.volumesInUse`.
    pub async fn volumes_in_use(&self) -> BTreeSet<String> {
        self.shared.status.lock().await.in_use.clone()
    }

    /// When NodeStageVolume of the volume `volume_handle` last succeeded on this node.
    pub fn staged_at(&self, volume_handle: &str) -> Option<std::time::Instant> {
        self.shared
            .staged_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(volume_handle)
            .copied()
    }

    /// The staging path of a volume on this node, as the kubelet lays it out.
    pub fn staging_path(&self, volume_handle: &str) -> PathBuf {
        self.shared.staging_dir(volume_handle).join("globalmount")
    }

    /// The target path of a pod's volume on this node, as the kubelet lays it out.
    pub fn target_path(&self, pod_uid: &str, pv_name: &str) -> PathBuf {
        self.shared.publish_dir(pod_uid, pv_name).join("mount")
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The unique name of a CSI volume in `volumesInUse` and `volumesAttached`.
pub fn unique_volume_name(driver: &str, volume_handle: &str) -> String {
    format!("{CSI_PLUGIN}/{driver}^{volume_handle}")
}

/// The name the attach-detach controller gives the VolumeAttachment of a CSI volume on a
/// node, and under which the kubelet looks for it.
pub fn attachment_name(volume_handle: &str, driver: &str, node_name: &str) -> String {
    let digest = Sha256::digest(format!("{volume_handle}{driver}{node_name}").as_bytes());
    format!("csi-{}", hex::encode(digest))
}

/// What NodeGetInfo and NodeGetCapabilities said.
struct DriverInfo {
    node_id: String,
    topology: BTreeMap<String, String>,
    max_volumes: i64,
    stage_unstage: bool,
    single_node_multi_writer: bool,
}

impl DriverInfo {
    async fn query(mut csi: NodeClient<Channel>) -> DriverInfo {
        let info = csi
            .node_get_info(pb::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        let capabilities: Vec<i32> = csi
            .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| {
                c.r#type
                    .map(|pb::node_service_capability::Type::Rpc(rpc)| rpc.r#type)
            })
            .collect();
        use pb::node_service_capability::rpc::Type;
        DriverInfo {
            node_id: info.node_id,
            topology: info
                .accessible_topology
                .map(|t| t.segments.into_iter().collect())
                .unwrap_or_default(),
            max_volumes: info.max_volumes_per_node,
            stage_unstage: capabilities.contains(&(Type::StageUnstageVolume as i32)),
            single_node_multi_writer: capabilities.contains(&(Type::SingleNodeMultiWriter as i32)),
        }
    }
}

/// The kubelet's informers.
struct Caches {
    node: Store<Node>,
    pods: Store<Pod>,
    pvcs: Store<PersistentVolumeClaim>,
    pvs: Store<PersistentVolume>,
    attachments: Store<VolumeAttachment>,
    drivers: Store<CSIDriver>,
}

impl Caches {
    fn ready(&self) -> Vec<futures::future::BoxFuture<'static, ()>> {
        fn wait<K>(store: &Store<K>) -> futures::future::BoxFuture<'static, ()>
        where
            K: kube::Resource + Clone + Send + Sync + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
        {
            let store = store.clone();
            Box::pin(async move {
                tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready())
                    .await
                    .expect("a kubelet cache filled within 30 s")
                    .expect("a kubelet cache");
            })
        }
        vec![
            wait(&self.node),
            wait(&self.pods),
            wait(&self.pvcs),
            wait(&self.pvs),
            wait(&self.attachments),
            wait(&self.drivers),
        ]
    }
}

/// A reflector of `api` whose every event wakes the sync loop.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    wake: &Arc<tokio::sync::Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let wake = wake.clone();
    tasks.push(tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {
            wake.notify_one();
        }
    }));
    reader
}

/// What the node last reported, changed only under its lock, so that two status updates
/// never cross (an older volumesInUse arriving after a newer one).
struct Reported {
    in_use: BTreeSet<String>,
    ready_since: Time,
}

struct Shared {
    config: KubeletConfig,
    client: kube::Client,
    csi: NodeClient<Channel>,
    info: DriverInfo,
    /// The kubeletVersion reported in the node status.
    version: String,
    dead: AtomicBool,
    status: tokio::sync::Mutex<Reported>,
    wake: Arc<tokio::sync::Notify>,
    caches: Caches,
    /// When each volume (by handle) was last staged: for tests that time a failover.
    staged_at: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The time of day, to the millisecond, for log lines.
fn clock() -> String {
    let t = k8s_openapi::jiff::Timestamp::now().to_string();
    t.get(11..23).unwrap_or(&t).to_string()
}

fn json_time(t: &Time) -> Value {
    serde_json::to_value(t).expect("a time as JSON")
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Renews the Lease and the node status until the kubelet is dropped.
async fn heartbeat(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.config.heartbeat).await;
        if shared.dead.load(Ordering::SeqCst) {
            continue;
        }
        shared.post_status(None).await;
        shared.renew_lease().await;
    }
}

/// Syncs the pods whenever a cache changes, and every `resync`.
async fn sync_loop(shared: Arc<Shared>, container: Container) {
    let mut workers = PodWorkers::new(container);
    loop {
        if !shared.dead.load(Ordering::SeqCst) {
            shared.sync(&mut workers).await;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(shared.config.resync) => {}
        }
    }
}

/// What the sync loop remembers about pods between passes (the rest it reads again).
struct PodWorkers {
    container: Container,
    /// Pods whose container ran and that were marked Running.
    started: HashSet<String>,
    /// Pods whose container failed, with the message.
    failed: HashMap<String, String>,
    /// The reason last written into a waiting pod's status.
    waiting: HashMap<String, String>,
    /// Volume handles staged by this kubelet, and targets published.
    staged: HashSet<String>,
    published: HashSet<PathBuf>,
}

impl PodWorkers {
    fn new(container: Container) -> Self {
        PodWorkers {
            container,
            started: HashSet::new(),
            failed: HashMap::new(),
            waiting: HashMap::new(),
            staged: HashSet::new(),
            published: HashSet::new(),
        }
    }
}

/// One CSI volume of a pod, resolved through its claim and PV.
#[derive(Debug, Clone)]
struct PodVolume {
    /// The pod's name for the volume.
    name: String,
    pv_name: String,
    driver: String,
    handle: String,
    unique: String,
    attach_required: bool,
    fs_type: String,
    mount_options: Vec<String>,
    read_only: bool,
    access_mode: String,
    block: bool,
    volume_context: HashMap<String, String>,
    pod_info_on_mount: bool,
}

/// A volume directory found on disk (staging or target), with its `vol_data.json`.
#[derive(Debug, Clone)]
struct OnDisk {
    dir: PathBuf,
    driver: String,
    handle: String,
    /// The pod's uid, for a target.
    pod_uid: Option<String>,
}

impl OnDisk {
    fn unique(&self) -> String {
        unique_volume_name(&self.driver, &self.handle)
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

fn is_deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Shared {
    fn log(&self, message: &str) {
        eprintln!("{} kubelet {}: {message}", clock(), self.config.node_name);
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn pods(&self, pod: &Pod) -> Api<Pod> {
        Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }

    fn staging_dir(&self, handle: &str) -> PathBuf {
        let sha = hex::encode(Sha256::digest(handle.as_bytes()));
        self.config
            .root_dir
            .join("plugins")
            .join(CSI_PLUGIN)
            .join(&self.config.driver)
            .join(sha)
    }

    fn publish_dir(&self, pod_uid: &str, pv_name: &str) -> PathBuf {
        self.config
            .root_dir
            .join("pods")
            .join(pod_uid)
            .join("volumes")
            .join(CSI_PLUGIN.replace('/', "~"))
            .join(pv_name)
    }

    // ---------------------------------------------------------------- registration

    /// Creates (or updates) the Node, posts its status, writes the CSINode, renews the Lease.
    async fn register(&self) {
        let name = &self.config.node_name;
        let mut labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // As the kubelet does after NodeGetInfo: the topology segments become labels.
        labels.extend(self.info.topology.clone());
        labels.extend(self.config.labels.clone());
        let node_ids = json!({ &self.config.driver: &self.info.node_id }).to_string();
        let annotations = json!({
            CONTROLLER_MANAGED_ATTACH: "true",
            CSI_NODE_ID_ANNOTATION: node_ids,
            "node.alpha.kubernetes.io/ttl": "0",
        });
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": labels, "annotations": annotations },
            "spec": {},
        }))
        .expect("a Node");
        let node = match self.nodes().create(&PostParams::default(), &node).await {
            Ok(node) => node,
            Err(e) if status_code(&e) == Some(409) => {
                let patch = json!({ "metadata": { "labels": labels, "annotations": annotations } });
                self.nodes()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap_or_else(|e| panic!("update Node {name}: {e}"))
            }
            Err(e) => panic!("register Node {name}: {e}"),
        };
        let node_uid = node.metadata.uid.clone().expect("a Node uid");
        self.log(&format!(
            "registered Node (CSI node id {}, topology {:?})",
            self.info.node_id, self.info.topology
        ));
        self.post_status(None).await;
        self.write_csinode(&node_uid).await;
        self.renew_lease().await;
    }

    /// The CSINode with this driver's entry, as node-driver-registrar has the kubelet write it.
    async fn write_csinode(&self, node_uid: &str) {
        let name = &self.config.node_name;
        let api: Api<CSINode> = Api::all(self.client.clone());
        let mut driver = json!({
            "name": self.config.driver,
            "nodeID": self.info.node_id,
            "topologyKeys": self.info.topology.keys().collect::<Vec<_>>(),
        });
        if self.info.max_volumes > 0 {
            driver["allocatable"] = json!({ "count": self.info.max_volumes });
        }
        let body: CSINode = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode",
            "metadata": {
                "name": name,
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid,
                }],
            },
            "spec": { "drivers": [driver.clone()] },
        }))
        .expect("a CSINode");
        match api.create(&PostParams::default(), &body).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(409) => {
                let mut current = api
                    .get(name)
                    .await
                    .unwrap_or_else(|e| panic!("get CSINode {name}: {e}"));
                let entry = serde_json::from_value(driver).expect("a CSINode driver");
                current
                    .spec
                    .drivers
                    .retain(|d| d.name != self.config.driver);
                current.spec.drivers.push(entry);
                api.replace(name, &PostParams::default(), &current)
                    .await
                    .unwrap_or_else(|e| panic!("update CSINode {name}: {e}"));
            }
            Err(e) => panic!("create CSINode {name}: {e}"),
        }
    }

    // ---------------------------------------------------------------- heartbeat

    /// Posts the node status with `in_use` as volumesInUse (the last one reported when None).
    /// Returns whether the API server took it.
    async fn post_status(&self, in_use: Option<BTreeSet<String>>) -> bool {
        let mut reported = self.status.lock().await;
        let in_use = in_use.unwrap_or_else(|| reported.in_use.clone());
        let heartbeat = json_time(&now());
        let since = json_time(&reported.ready_since);
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            json!({
                "type": kind, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": heartbeat, "lastTransitionTime": since,
            })
        };
        let resources = json!({
            "cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi",
        });
        let patch = json!({
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                    condition("Ready", "True", "KubeletReady", "emulated kubelet is posting ready status"),
                ],
                "addresses": [
                    { "type": "InternalIP", "address": "127.0.0.1" },
                    { "type": "Hostname", "address": self.config.node_name },
                ],
                "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
                "nodeInfo": {
                    "machineID": self.config.node_name, "systemUUID": self.config.node_name,
                    "bootID": "emulated", "kernelVersion": "emulated", "osImage": "emulated",
                    "containerRuntimeVersion": "emulated://0", "kubeletVersion": self.version,
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
                },
                "volumesInUse": in_use,
            }
        });
        let result = self
            .nodes()
            .patch_status(
                &self.config.node_name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await;
        match result {
            Ok(_) => {
                if reported.in_use != in_use {
                    self.log(&format!("volumesInUse = {in_use:?}"));
                }
                reported.in_use = in_use;
                true
            }
            Err(e) => {
                self.log(&format!("posting the node status failed: {e}"));
                false
            }
        }
    }

    async fn renew_lease(&self) {
        let name = &self.config.node_name;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), NODE_LEASE_NAMESPACE);
        let renew = serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now()))
            .expect("a time as JSON");
        let spec = json!({
            "holderIdentity": name,
            "leaseDurationSeconds": self.config.lease_duration.as_secs(),
            "renewTime": renew,
        });
        let patched = api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await;
        match patched {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(404) => {
                let node_uid = self
                    .caches
                    .node
                    .get(&ObjectRef::new(name))
                    .and_then(|n| n.metadata.uid.clone());
                let mut metadata = json!({ "name": name, "namespace": NODE_LEASE_NAMESPACE });
                if let Some(node_uid) = node_uid {
                    metadata["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid,
                    }]);
                }
                let lease: Lease =
                    serde_json::from_value(json!({ "metadata": metadata, "spec": spec }))
                        .expect("a Lease");
                if let Err(e) = api.create(&PostParams::default(), &lease).await {
                    self.log(&format!("creating the Lease failed: {e}"));
                }
            }
            Err(e) => self.log(&format!("renewing the Lease failed: {e}")),
        }
    }

    // ---------------------------------------------------------------- pods

    /// One level-triggered pass over the node's pods and volumes.
    async fn sync(&self, workers: &mut PodWorkers) {
        let pods = self.caches.pods.state();
        let resolved: Vec<(Arc<Pod>, Vec<PodVolume>, Option<String>)> = pods
            .iter()
            .map(|p| {
                let (volumes, why) = self.pod_volumes(p);
                (p.clone(), volumes, why)
            })
            .collect();
        let live_uids: HashSet<String> = pods.iter().map(|p| uid(p)).collect();
        workers.started.retain(|u| live_uids.contains(u));
        workers.failed.retain(|u, _| live_uids.contains(u));
        workers.waiting.retain(|u, _| live_uids.contains(u));

        // The volumes the running and starting pods need.
        let desired: BTreeSet<String> = resolved
            .iter()
            .filter(|(p, _, _)| !is_deleting(p) && !is_terminal(p))
            .flat_map(|(_, volumes, _)| volumes.iter().map(|v| v.unique.clone()))
            .collect();
        // 1. In use: what is wanted or still mounted, reported before anything is mounted.
        if !self.report_in_use(&desired).await {
            return;
        }

        // 2. Tear down the targets of pods being deleted, of terminal pods and of pods gone
        //    from the API.
        let keep: HashSet<String> = resolved
            .iter()
            .filter(|(p, _, _)| !is_deleting(p) && !is_terminal(p))
            .map(|(p, _, _)| uid(p))
            .collect();
        for target in self.published_on_disk() {
            let owner = target.pod_uid.clone().unwrap_or_default();
            if !keep.contains(&owner) {
                self.unpublish(workers, &target).await;
            }
        }
        // 3. Unstage what no pod publishes or wants any more.
        let published: HashSet<String> = self
            .published_on_disk()
            .iter()
            .map(OnDisk::unique)
            .collect();
        for staged in self.staged_on_disk() {
            let unique = staged.unique();
            if !published.contains(&unique) && !desired.contains(&unique) {
                self.unstage(workers, &staged).await;
            }
        }
        // 4. Report what is no longer in use, then confirm the deletions.
        if !self.report_in_use(&desired).await {
            return;
        }
        let mounted_pods: HashSet<String> = self
            .published_on_disk()
            .into_iter()
            .filter_map(|t| t.pod_uid)
            .collect();
        let staged: HashSet<String> = self.staged_on_disk().iter().map(OnDisk::unique).collect();
        for (pod, volumes, _) in &resolved {
            let torn_down = !mounted_pods.contains(&uid(pod))
                && volumes
                    .iter()
                    .all(|v| !staged.contains(&v.unique) || desired.contains(&v.unique));
            if is_deleting(pod) && torn_down {
                self.confirm_deletion(pod).await;
            }
        }

        // 5. Start the pods that are not running yet.
        for (pod, volumes, why) in &resolved {
            let id = uid(pod);
            if is_deleting(pod)
                || is_terminal(pod)
                || workers.started.contains(&id)
                || workers.failed.contains_key(&id)
            {
                continue;
            }
            if let Some(why) = why {
                self.mark_waiting(workers, pod, why).await;
                continue;
            }
            match self.mount_all(workers, pod, volumes).await {
                Err(why) => self.mark_waiting(workers, pod, &why).await,
                Ok(mounts) => {
                    let container = workers.container.clone();
                    let pod_copy: Pod = (**pod).clone();
                    let outcome =
                        tokio::task::spawn_blocking(move || container(&pod_copy, &mounts))
                            .await
                            .unwrap_or_else(|e| Err(format!("the container panicked: {e}")));
                    match outcome {
                        Ok(()) => {
                            if self.mark_running(pod).await {
                                workers.started.insert(id);
                            }
                        }
                        Err(message) => {
                            self.log(&format!(
                                "pod {}: container failed: {message}",
                                pod_name(pod)
                            ));
                            self.mark_failed(pod, &message).await;
                            workers.failed.insert(id, message);
                        }
                    }
                }
            }
        }
    }

    /// Reports `desired` plus whatever is still staged or published on disk as in use; true
    /// when the API server has it.
    async fn report_in_use(&self, desired: &BTreeSet<String>) -> bool {
        let mut in_use = desired.clone();
        in_use.extend(self.staged_on_disk().iter().map(OnDisk::unique));
        in_use.extend(self.published_on_disk().iter().map(OnDisk::unique));
        if self.status.lock().await.in_use == in_use {
            return true;
        }
        self.post_status(Some(in_use)).await
    }

    /// The CSI volumes of a pod's claims (other volume types are not the kubelet's CSI
    /// business), and why the pod cannot start yet, if it cannot.
    fn pod_volumes(&self, pod: &Pod) -> (Vec<PodVolume>, Option<String>) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let mut volumes = Vec::new();
        let mut why = None;
        let spec_volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in spec_volumes {
            let Some(claim) = &v.persistent_volume_claim else {
                continue;
            };
            let pvc = self
                .caches
                .pvcs
                .get(&ObjectRef::new(&claim.claim_name).within(&namespace));
            let Some(pvc) = pvc else {
                why.get_or_insert(format!("PVC {namespace}/{} not found", claim.claim_name));
                continue;
            };
            let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
            let (true, Some(pv_name)) = (bound, pv_name) else {
                why.get_or_insert(format!("PVC {namespace}/{} is not bound", claim.claim_name));
                continue;
            };
            let Some(pv) = self.caches.pvs.get(&ObjectRef::new(&pv_name)) else {
                why.get_or_insert(format!("PV {pv_name} not found"));
                continue;
            };
            let Some(spec) = &pv.spec else { continue };
            let Some(csi) = &spec.csi else { continue };
            if csi.driver != self.config.driver {
                why.get_or_insert(format!(
                    "PV {pv_name}: no CSI driver {} on this node",
                    csi.driver
                ));
                continue;
            }
            let driver = self.caches.drivers.get(&ObjectRef::new(&csi.driver));
            let driver_spec = driver.as_ref().map(|d| d.spec.clone());
            volumes.push(PodVolume {
                name: v.name.clone(),
                pv_name: pv_name.clone(),
                driver: csi.driver.clone(),
                handle: csi.volume_handle.clone(),
                unique: unique_volume_name(&csi.driver, &csi.volume_handle),
                // No CSIDriver object: the kubelet assumes attach is required.
                attach_required: driver_spec
                    .as_ref()
                    .and_then(|s| s.attach_required)
                    .unwrap_or(true),
                fs_type: csi.fs_type.clone().unwrap_or_default(),
                mount_options: spec.mount_options.clone().unwrap_or_default(),
                read_only: claim.read_only.unwrap_or(false) || csi.read_only.unwrap_or(false),
                access_mode: spec
                    .access_modes
                    .as_ref()
                    .and_then(|m| m.first().cloned())
                    .unwrap_or_else(|| "ReadWriteOnce".into()),
                block: spec.volume_mode.as_deref() == Some("Block"),
                volume_context: csi
                    .volume_attributes
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                pod_info_on_mount: driver_spec
                    .as_ref()
                    .and_then(|s| s.pod_info_on_mount)
                    .unwrap_or(false),
            });
        }
        (volumes, why)
    }

    /// Waits for attach, stages and publishes every CSI volume of a pod; the target paths
    /// by the pod's volume name, or why not (yet).
    async fn mount_all(
        &self,
        workers: &mut PodWorkers,
        pod: &Pod,
        volumes: &[PodVolume],
    ) -> Result<BTreeMap<String, PathBuf>, String> {
        let attached: HashSet<String> = self
            .caches
            .node
            .get(&ObjectRef::new(&self.config.node_name))
            .and_then(|n| n.status.clone())
            .and_then(|s| s.volumes_attached)
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.name)
            .collect();
        let reported = self.status.lock().await.in_use.clone();
        let mut mounts = BTreeMap::new();
        for v in volumes {
            if v.block {
                return Err(format!(
                    "volume {}: volumeMode Block is not emulated",
                    v.name
                ));
            }
            if !reported.contains(&v.unique) {
                return Err(format!("{} is not reported in use yet", v.unique));
            }
            let publish_context = if v.attach_required {
                if !attached.contains(&v.unique) {
                    return Err(format!(
                        "waiting for the attach-detach controller: {} is not in volumesAttached",
                        v.unique
                    ));
                }
                let name = attachment_name(&v.handle, &v.driver, &self.config.node_name);
                let va = self.caches.attachments.get(&ObjectRef::new(&name));
                let status = va.as_ref().and_then(|va| va.status.clone());
                match status {
                    Some(s) if s.attached => s.attachment_metadata.unwrap_or_default(),
                    Some(s) => {
                        let error = s
                            .attach_error
                            .and_then(|e| e.message)
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default();
                        return Err(format!(
                            "VolumeAttachment {name} is not attached yet{error}"
                        ));
                    }
                    None => return Err(format!("VolumeAttachment {name} is not attached yet")),
                }
            } else {
                BTreeMap::new()
            }
            .into_iter()
            .collect::<HashMap<String, String>>();
            let capability = self.capability(v);
            let staging = self.staging_dir(&v.handle);
            if self.info.stage_unstage && !workers.staged.contains(&v.handle) {
                let mount = staging.join("globalmount");
                std::fs::create_dir_all(&mount)
                    .map_err(|e| format!("create {}: {e}", mount.display()))?;
                write_vol_data(&staging, v).map_err(|e| format!("{VOL_DATA}: {e}"))?;
                self.csi
                    .clone()
                    .node_stage_volume(pb::NodeStageVolumeRequest {
                        volume_id: v.handle.clone(),
                        publish_context: publish_context.clone(),
                        staging_target_path: mount.display().to_string(),
                        volume_capability: Some(capability.clone()),
                        secrets: HashMap::new(),
                        volume_context: v.volume_context.clone(),
                    })
                    .await
                    .map_err(|s| {
                        format!("MountVolume.MountDevice failed for {}: {s:?}", v.pv_name)
                    })?;
                self.log(&format!(
                    "NodeStageVolume {} at {}",
                    v.handle,
                    mount.display()
                ));
                workers.staged.insert(v.handle.clone());
                self.staged_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(v.handle.clone(), std::time::Instant::now());
            }
            let dir = self.publish_dir(&uid(pod), &v.pv_name);
            let target = dir.join("mount");
            if !workers.published.contains(&target) {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("create {}: {e}", dir.display()))?;
                write_vol_data(&dir, v).map_err(|e| format!("{VOL_DATA}: {e}"))?;
                let mut volume_context = v.volume_context.clone();
                if v.pod_info_on_mount {
                    volume_context.extend(pod_info(pod));
                }
                self.csi
                    .clone()
                    .node_publish_volume(pb::NodePublishVolumeRequest {
                        volume_id: v.handle.clone(),
                        publish_context,
                        staging_target_path: if self.info.stage_unstage {
                            staging.join("globalmount").display().to_string()
                        } else {
                            String::new()
                        },
                        target_path: target.display().to_string(),
                        volume_capability: Some(capability),
                        readonly: v.read_only,
                        secrets: HashMap::new(),
                        volume_context,
                    })
                    .await
                    .map_err(|s| format!("MountVolume.SetUp failed for {}: {s:?}", v.pv_name))?;
                self.log(&format!(
                    "NodePublishVolume {} for pod {} at {}",
                    v.handle,
                    pod_name(pod),
                    target.display()
                ));
                workers.published.insert(target.clone());
            }
            mounts.insert(v.name.clone(), target);
        }
        Ok(mounts)
    }

    /// The volume capability the kubelet sends: a mount with the PV's fsType and mount
    /// options, and the access mode mapped as the kubelet maps it (to SINGLE_NODE_MULTI_WRITER
    /// for ReadWriteOnce when the node plugin supports it).
    fn capability(&self, v: &PodVolume) -> pb::VolumeCapability {
        use pb::volume_capability::access_mode::Mode;
        let multi = self.info.single_node_multi_writer;
        let mode = match v.access_mode.as_str() {
            "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
            "ReadWriteMany" => Mode::MultiNodeMultiWriter,
            "ReadWriteOncePod" if multi => Mode::SingleNodeSingleWriter,
            _ if multi => Mode::SingleNodeMultiWriter,
            _ => Mode::SingleNodeWriter,
        };
        pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume {
                    fs_type: v.fs_type.clone(),
                    mount_flags: v.mount_options.clone(),
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    /// The volume directories under `<root>/pods/*/volumes/kubernetes.io~csi/`.
    fn published_on_disk(&self) -> Vec<OnDisk> {
        let mut found = Vec::new();
        let pods = self.config.root_dir.join("pods");
        for pod in read_dir(&pods) {
            let uid = pod.file_name().map(|n| n.to_string_lossy().into_owned());
            let volumes = pod.join("volumes").join(CSI_PLUGIN.replace('/', "~"));
            for dir in read_dir(&volumes) {
                if let Some(mut v) = read_vol_data(&dir) {
                    v.pod_uid = uid.clone();
                    found.push(v);
                }
            }
        }
        found
    }

    /// The volume directories under `<root>/plugins/kubernetes.io/csi/<driver>/`.
    fn staged_on_disk(&self) -> Vec<OnDisk> {
        let dir = self
            .config
            .root_dir
            .join("plugins")
            .join(CSI_PLUGIN)
            .join(&self.config.driver);
        read_dir(&dir)
            .iter()
            .filter_map(|d| read_vol_data(d))
            .collect()
    }

    /// NodeUnpublishVolume of a target found on disk, then its directories removed (only
    /// empty ones: never a recursive removal where a mount might still be).
    async fn unpublish(&self, workers: &mut PodWorkers, v: &OnDisk) {
        let target = v.dir.join("mount");
        let result = self
            .csi
            .clone()
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: v.handle.clone(),
                target_path: target.display().to_string(),
            })
            .await;
        if let Err(s) = result {
            self.log(&format!("NodeUnpublishVolume {} failed: {s:?}", v.handle));
            return;
        }
        self.log(&format!(
            "NodeUnpublishVolume {} at {}",
            v.handle,
            target.display()
        ));
        workers.published.remove(&target);
        let _ = std::fs::remove_dir(&target);
        let _ = std::fs::remove_file(v.dir.join(VOL_DATA));
        let _ = std::fs::remove_dir(&v.dir);
        // <root>/pods/<uid>/volumes/kubernetes.io~csi, then volumes, then <uid>.
        let mut dir = v.dir.parent();
        for _ in 0..3 {
            let Some(d) = dir else { break };
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }

    /// NodeUnstageVolume of a staging directory found on disk, then the directory removed.
    async fn unstage(&self, workers: &mut PodWorkers, v: &OnDisk) {
        let staging = v.dir.join("globalmount");
        if self.info.stage_unstage {
            let result = self
                .csi
                .clone()
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: v.handle.clone(),
                    staging_target_path: staging.display().to_string(),
                })
                .await;
            if let Err(s) = result {
                self.log(&format!("NodeUnstageVolume {} failed: {s:?}", v.handle));
                return;
            }
            self.log(&format!(
                "NodeUnstageVolume {} at {}",
                v.handle,
                staging.display()
            ));
        }
        workers.staged.remove(&v.handle);
        let _ = std::fs::remove_dir(&staging);
        let _ = std::fs::remove_file(v.dir.join(VOL_DATA));
        let _ = std::fs::remove_dir(&v.dir);
    }

    /// Deletes a terminating pod whose volumes are torn down, with grace period 0 and its uid
    /// as precondition, as the kubelet does once the pod's containers are gone.
    async fn confirm_deletion(&self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods(pod).delete(&name, &params).await {
            Ok(_) => self.log(&format!("pod {} terminated and deleted", pod_name(pod))),
            Err(e) if matches!(status_code(&e), Some(404) | Some(409)) => {}
            Err(e) => self.log(&format!("deleting pod {} failed: {e}", pod_name(pod))),
        }
    }

    async fn patch_pod_status(&self, pod: &Pod, status: Value) -> bool {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let result = self
            .pods(pod)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(&json!({ "status": status })),
            )
            .await;
        match result {
            Ok(_) => true,
            Err(e) => {
                self.log(&format!(
                    "updating the status of pod {} failed: {e}",
                    pod_name(pod)
                ));
                false
            }
        }
    }

    fn container_statuses(pod: &Pod, state: Value, ready: bool) -> Value {
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        containers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": "",
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "state": state,
                })
            })
            .collect()
    }

    async fn mark_waiting(&self, workers: &mut PodWorkers, pod: &Pod, why: &str) {
        let id = uid(pod);
        if workers.waiting.get(&id).map(String::as_str) == Some(why) {
            return;
        }
        self.log(&format!("pod {}: {why}", pod_name(pod)));
        let status = json!({
            "hostIP": "127.0.0.1",
            "startTime": json_time(&now()),
            "containerStatuses": Self::container_statuses(
                pod,
                json!({ "waiting": { "reason": "ContainerCreating", "message": why } }),
                false,
            ),
        });
        if self.patch_pod_status(pod, status).await {
            workers.waiting.insert(id, why.to_string());
        }
    }

    async fn mark_running(&self, pod: &Pod) -> bool {
        let t = json_time(&now());
        let conditions: Vec<Value> = [
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
        ]
        .iter()
        .map(|kind| json!({ "type": kind, "status": "True", "lastTransitionTime": t }))
        .collect();
        let status = json!({
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "conditions": conditions,
            "containerStatuses": Self::container_statuses(
                pod, json!({ "running": { "startedAt": t } }), true),
        });
        let ok = self.patch_pod_status(pod, status).await;
        if ok {
            self.log(&format!("pod {} Running and Ready", pod_name(pod)));
        }
        ok
    }

    async fn mark_failed(&self, pod: &Pod, message: &str) {
        let t = json_time(&now());
        let status = json!({
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "conditions": [
                { "type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": t },
                { "type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": t },
            ],
            "containerStatuses": Self::container_statuses(
                pod,
                json!({ "waiting": { "reason": "CrashLoopBackOff", "message": message } }),
                false,
            ),
        });
        self.patch_pod_status(pod, status).await;
    }
}

/// The pod information a driver with `podInfoOnMount` gets in NodePublishVolume.
fn pod_info(pod: &Pod) -> HashMap<String, String> {
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    [
        (
            "csi.storage.k8s.io/pod.name",
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "csi.storage.k8s.io/pod.namespace",
            pod.metadata.namespace.clone().unwrap_or_default(),
        ),
        ("csi.storage.k8s.io/pod.uid", uid(pod)),
        ("csi.storage.k8s.io/serviceAccount.name", service_account),
        ("csi.storage.k8s.io/ephemeral", "false".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn write_vol_data(dir: &Path, v: &PodVolume) -> std::io::Result<()> {
    let data = json!({
        "driverName": v.driver,
        "volumeHandle": v.handle,
        "specVolID": v.pv_name,
        "volumeLifecycleMode": "Persistent",
    });
    std::fs::write(dir.join(VOL_DATA), data.to_string())
}

fn read_vol_data(dir: &Path) -> Option<OnDisk> {
    let text = std::fs::read_to_string(dir.join(VOL_DATA)).ok()?;
    let data: Value = serde_json::from_str(&text).ok()?;
    Some(OnDisk {
        dir: dir.to_path_buf(),
        driver: data["driverName"].as_str()?.to_string(),
        handle: data["volumeHandle"].as_str()?.to_string(),
        pod_uid: None,
    })
}
