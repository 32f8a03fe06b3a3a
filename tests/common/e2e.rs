//! The end-to-end harness on a real Kubernetes control plane, shared by tests/k8s_e2e.rs and
//! tests/k8s_recovery.rs: etcd, kube-apiserver, kube-controller-manager (with its
//! attach-detach controller) and kube-scheduler from `$KUBEBUILDER_ASSETS`; the real
//! csi-provisioner and csi-attacher against `palisade controller --store kubernetes`; three
//! `palisade node` processes on directory disks; and for each node an emulated kubelet
//! ([`super::kubelet`]) that registers it and makes the CSI node calls a kubelet makes.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cluster::{self, Cluster, ClusterOptions};
use super::k8s::{ControlPlane, Options};
use super::kubelet::{attachment_name, Container, Kubelet, KubeletConfig};
use super::sidecars::{self, Sidecar};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};

pub const DRIVER: &str = "driver.palisade.io";
/// Where the test's claims and pods live.
pub const NAMESPACE: &str = "e2e";
/// Where the Palisade controller keeps its custom resources with the Kubernetes store.
pub const PALISADE_NAMESPACE: &str = "palisade-system";
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// The annotation that makes a pod's container write a marker (its value) into the volume.
pub const WRITE: &str = "e2e.palisade.io/write";
/// The annotation that makes a pod's container check that the volume holds that marker.
pub const EXPECT: &str = "e2e.palisade.io/expect";
/// The bytes a writer writes besides the marker, checked by the readers.
pub const DATA_BYTES: usize = 4 << 20;

/// The controller's store arguments: its state as custom resources in
/// [`PALISADE_NAMESPACE`] of the test's API server (the CRDs applied first).
pub fn store_args(plane: &ControlPlane) -> Vec<String> {
    plane.apply_crds();
    plane.create_namespace(PALISADE_NAMESPACE);
    vec![
        "--store".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        plane.kubeconfig.display().to_string(),
        "--namespace".into(),
        PALISADE_NAMESPACE.into(),
        // One of a cluster's controller replicas: leader election, node evidence from the
        // kubelets, and the recovery controller.
        "--kubernetes".into(),
    ]
}

/// The control plane, Palisade's processes, the sidecars and the kubelets; everything is
/// stopped and unmounted on drop.
pub struct E2e {
    // Dropped first to last: the kubelets, the sidecars, Palisade, the control plane.
    pub kubelets: Vec<Kubelet>,
    pub provisioner: Option<Sidecar>,
    pub attacher: Option<Sidecar>,
    pub cluster: Cluster,
    pub client: kube::Client,
    pub plane: ControlPlane,
    pub started: Instant,
    /// The test's name, without the crate.
    pub test: String,
}

impl E2e {
    /// Everything up, the nodes Ready and schedulable; None after a SKIPPED line when the
    /// binaries are missing.
    pub async fn start(test: &str) -> Option<E2e> {
        E2e::start_with(test, Vec::new(), Vec::new(), container()).await
    }

    /// As [`E2e::start`], with extra kube-controller-manager flags, extra `palisade
    /// controller` flags, and `container` as what runs in every pod.
    pub async fn start_with(
        test: &str,
        controller_manager_args: Vec<String>,
        controller_args: Vec<String>,
        container: Container,
    ) -> Option<E2e> {
        let started = Instant::now();
        let assets = super::k8s::assets(test)?;
        for sidecar in ["csi-provisioner", "csi-attacher"] {
            if !assets.join(sidecar).is_file() {
                eprintln!(
                    "SKIPPED: {test}: KUBEBUILDER_ASSETS={} has no {sidecar}",
                    assets.display()
                );
                return None;
            }
        }
        let plane = ControlPlane::start_with(
            test,
            Options {
                controller_manager: true,
                controller_manager_args,
                scheduler: true,
            },
        )
        .await?;
        let logs = plane.dir.path().join("logs");
        let cluster = Cluster::start_with(ClusterOptions {
            nodes: NODES.len(),
            log_dir: Some(logs.clone()),
            controller_args: [store_args(&plane), controller_args].concat(),
        })
        .await;
        cluster::ready_cluster(&cluster).await;
        plane.kubectl_ok(&[
            "apply",
            "-f",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/cluster/01-csidriver.yaml"
            ),
        ]);
        let client = plane.client().await;
        let mut e2e = E2e {
            kubelets: Vec::new(),
            provisioner: Some(sidecars::provisioner(
                &assets,
                &cluster.controller_socket,
                &plane.kubeconfig,
                logs.join("csi-provisioner.log"),
            )),
            attacher: Some(sidecars::attacher(
                &assets,
                &cluster.controller_socket,
                &plane.kubeconfig,
                logs.join("csi-attacher.log"),
            )),
            cluster,
            client,
            plane,
            started,
            test: test.rsplit("::").next().unwrap_or(test).to_string(),
        };
        for node in NODES {
            let root = e2e.cluster.dir.path().join("kubelet").join(node);
            let config = KubeletConfig::new(node, DRIVER, &e2e.cluster.node(node).socket, &root);
            let kubelet = Kubelet::start(e2e.client.clone(), config, container.clone()).await;
            assert_eq!(kubelet.node_id, node, "the CSI node id is the node name");
            e2e.kubelets.push(kubelet);
        }
        let nodes: Api<Node> = Api::all(e2e.client.clone());
        let nodes = &nodes;
        for node in NODES {
            eventually(
                &format!("Node {node} Ready and untainted"),
                60,
                || async move {
                    let n = nodes.get(node).await.map_err(|e| e.to_string())?;
                    let ready = n
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let taints = n
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.clone())
                        .unwrap_or_default();
                    if ready && taints.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("ready {ready}, taints {taints:?}"))
                    }
                },
            )
            .await;
        }
        e2e.plane.create_namespace(NAMESPACE);
        eprintln!(
            "{test}: everything up in {:.1} s",
            e2e.started.elapsed().as_secs_f64()
        );
        Some(e2e)
    }

    pub fn kubelet(&self, node: &str) -> &Kubelet {
        self.kubelets
            .iter()
            .find(|k| k.node_name == node)
            .expect("a kubelet of the test")
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// A StorageClass of `replicas` replicas, WaitForFirstConsumer, ext4, reclaim Delete.
    pub async fn storage_class(&self, name: &str, replicas: u32) {
        self.storage_class_with(name, replicas, &[]).await;
    }

    /// As [`E2e::storage_class`], with `extra` parameters.
    pub async fn storage_class_with(&self, name: &str, replicas: u32, extra: &[(&str, &str)]) {
        let mut parameters = json!({
            "numberOfReplicas": replicas.to_string(),
            "csi.storage.k8s.io/fstype": "ext4",
        });
        for (key, value) in extra {
            parameters[*key] = json!(value);
        }
        let class: StorageClass = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": { "name": name },
            "provisioner": DRIVER,
            "parameters": parameters,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        }))
        .expect("a StorageClass");
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create the StorageClass");
    }

    pub async fn create_claim(&self, name: &str, class: &str) {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": { "name": name },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "resources": { "requests": { "storage": "128Mi" } },
            },
        }))
        .expect("a PVC");
        self.api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &claim)
            .await
            .expect("create the PVC");
    }

    /// A pod on `node` (by node selector, so the scheduler places it and WaitForFirstConsumer
    /// provisions for it) with the claim mounted as its volume `data`.
    pub async fn create_pod(&self, name: &str, node: &str, claim: &str, annotations: Value) {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "annotations": annotations },
            "spec": {
                "nodeSelector": { "kubernetes.io/hostname": node },
                "containers": [{
                    "name": "app",
                    "image": "emulated",
                    "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                }],
                "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
            },
        }))
        .expect("a Pod");
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create the Pod");
    }

    /// Waits until the pod is Running and Ready; a failed container fails the test at once.
    pub async fn wait_pod_ready(&self, name: &str) -> Pod {
        let pods = &self.api::<Pod>();
        eventually(
            &format!("pod {name} Running and Ready"),
            120,
            || async move {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let status = pod.status.clone().unwrap_or_default();
                let ready = status
                    .conditions
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready && status.phase.as_deref() == Some("Running") {
                    return Ok(pod);
                }
                let waiting = status
                    .container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.state.and_then(|s| s.waiting))
                    .next();
                if let Some(w) = &waiting {
                    assert_ne!(
                        w.reason.as_deref(),
                        Some("CrashLoopBackOff"),
                        "the container of pod {name} failed: {:?}",
                        w.message
                    );
                }
                Err(format!(
                    "phase {:?}, node {:?}, waiting {:?}",
                    status.phase,
                    pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                    waiting.and_then(|w| w.message)
                ))
            },
        )
        .await
    }

    /// Deletes the pod (default grace) and waits until the kubelet has confirmed it.
    pub async fn delete_pod(&self, name: &str) {
        let pods = &self.api::<Pod>();
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete the pod");
        eventually(&format!("pod {name} gone"), 60, || async move {
            match pods.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(p)) => Err(format!("still there, {:?}", p.status.and_then(|s| s.phase))),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    pub async fn wait_attachment(&self, handle: &str, node: &str) -> VolumeAttachment {
        let name = attachment_name(handle, DRIVER, node);
        let api = &Api::<VolumeAttachment>::all(self.client.clone());
        let name = name.as_str();
        eventually(
            &format!("VolumeAttachment {name} attached"),
            60,
            || async move {
                let va = api.get(name).await.map_err(|e| e.to_string())?;
                if va.status.as_ref().is_some_and(|s| s.attached) {
                    Ok(va)
                } else {
                    Err(format!("{:?}", va.status))
                }
            },
        )
        .await
    }

    pub async fn wait_attachment_gone(&self, handle: &str, node: &str) {
        let name = attachment_name(handle, DRIVER, node);
        let api = &Api::<VolumeAttachment>::all(self.client.clone());
        let name = name.as_str();
        eventually(
            &format!("VolumeAttachment {name} gone"),
            60,
            || async move {
                match api.get_opt(name).await {
                    Ok(None) => Ok(()),
                    Ok(Some(va)) => Err(format!("{:?}", va.status)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }

    /// The claim's PV, once it is Bound.
    pub async fn bound_volume(&self, claim: &str) -> PersistentVolume {
        let claims = &self.api::<PersistentVolumeClaim>();
        let pv_name: String = eventually(&format!("PVC {claim} Bound"), 60, || async move {
            let pvc = claims.get(claim).await.map_err(|e| e.to_string())?;
            let phase = pvc.status.and_then(|s| s.phase);
            match (phase.as_deref(), pvc.spec.and_then(|s| s.volume_name)) {
                (Some("Bound"), Some(pv)) => Ok(pv),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        Api::<PersistentVolume>::all(self.client.clone())
            .get(&pv_name)
            .await
            .expect("the bound PV")
    }

    /// `palisade ctl volumes --json`.
    pub fn volumes(&self) -> Vec<Value> {
        self.cluster
            .ctl_json(&["volumes"])
            .as_array()
            .expect("a volume list")
            .clone()
    }

    /// The replica directories on every node's disk, by node.
    pub fn replica_files(&self) -> BTreeMap<String, Vec<String>> {
        NODES
            .iter()
            .map(|n| {
                let ids = cluster::replicas_on(&self.cluster.node(n).disk)
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                (n.to_string(), ids)
            })
            .collect()
    }

    /// Prints the end of every log: the control plane's, Palisade's and the sidecars'.
    pub fn dump_logs(&self) {
        let logs = self.plane.dir.path().join("logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&logs)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "===== {} (last 40 of {} lines)\n{}",
                file.display(),
                lines.len(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }

    /// With `PALISADE_E2E_LOGS=DIR`, copies every log into `DIR/<test>/` before the
    /// temporary directories go.
    pub fn keep_logs(&self) {
        let Some(keep) = std::env::var_os("PALISADE_E2E_LOGS") else {
            return;
        };
        let to = PathBuf::from(keep).join(&self.test);
        std::fs::create_dir_all(&to).expect("the directory for the logs");
        let logs = self.plane.dir.path().join("logs");
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
        }
        eprintln!("logs kept in {}", to.display());
    }

    /// Prints how far the test is.
    pub fn step(&self, what: &str) {
        eprintln!("{:7.2} s  {what}", self.started.elapsed().as_secs_f64());
    }

    /// Runs a scenario; on failure prints the logs; then stops everything and unmounts.
    pub async fn run<F>(mut self, scenario: F)
    where
        F: for<'a> FnOnce(&'a mut E2e) -> BoxFuture<'a, ()>,
    {
        let result =
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(scenario(&mut self)))
                .await;
        if result.is_err() {
            self.dump_logs();
        }
        self.kubelets.clear();
        self.provisioner.take();
        self.attacher.take();
        // SIGCONT first: a scenario may have left processes stopped.
        cluster::stop_all(&mut self.cluster);
        cluster::cleanup_mounts(self.cluster.dir.path());
        self.keep_logs();
        eprintln!(
            "the test took {:.1} s in all",
            self.started.elapsed().as_secs_f64()
        );
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Polls `probe` until it returns Ok, for at most `seconds`; panics with its last error.
pub async fn eventually<T, F, Fut>(what: &str, seconds: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "not {what} within {seconds} s; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pods' container: writes the marker of [`WRITE`] and [`DATA_BYTES`] of data derived
/// from it (each fsynced), and checks both for [`EXPECT`].
pub fn container() -> Container {
    Arc::new(|pod: &Pod, mounts: &BTreeMap<String, PathBuf>| {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let dir = mounts.get("data").ok_or("the volume data is not mounted")?;
        let seed = |marker: &str| {
            marker
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64)
        };
        if let Some(marker) = annotations.get(WRITE) {
            cluster::write_synced(&dir.join("marker"), marker.as_bytes())
                .map_err(|e| format!("writing the marker: {e}"))?;
            cluster::write_synced(
                &dir.join("data"),
                &cluster::pattern(seed(marker), DATA_BYTES),
            )
            .map_err(|e| format!("writing the data: {e}"))?;
        }
        if let Some(marker) = annotations.get(EXPECT) {
            let found = std::fs::read_to_string(dir.join("marker"))
                .map_err(|e| format!("reading the marker: {e}"))?;
            if &found != marker {
                return Err(format!("the marker is {found:?}, not {marker:?}"));
            }
            let data =
                std::fs::read(dir.join("data")).map_err(|e| format!("reading the data: {e}"))?;
            if data != cluster::pattern(seed(marker), DATA_BYTES) {
                return Err("the data differs from what was written".into());
            }
        }
        Ok(())
    })
}

pub fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("a pod uid")
}

pub fn volume_handle(pv: &PersistentVolume) -> (String, BTreeMap<String, String>) {
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.clone())
        .expect("a CSI PV");
    assert_eq!(csi.driver, DRIVER);
    assert_eq!(csi.fs_type.as_deref(), Some("ext4"), "the PV's fsType");
    (csi.volume_handle, csi.volume_attributes.unwrap_or_default())
}

/// The one volume `ctl` lists, which must be the PV's, ready, with `replicas` ready replicas
/// on distinct nodes whose files are exactly the replica directories on the disks.
pub fn assert_one_volume(e: &E2e, pv: &PersistentVolume, replicas: usize) -> Value {
    let volumes = e.volumes();
    assert_eq!(volumes.len(), 1, "exactly one volume: {volumes:#?}");
    let v = volumes[0].clone();
    let (handle, _) = volume_handle(pv);
    assert_eq!(v["id"], handle.as_str(), "{v:#}");
    assert_eq!(
        v["name"],
        pv.metadata.name.as_deref().unwrap_or_default(),
        "{v:#}"
    );
    assert_eq!(v["state"], "ready", "{v:#}");
    assert_eq!(v["number_of_replicas"], replicas as u64, "{v:#}");
    let ready = cluster::ready_replicas(&v);
    assert_eq!(ready.len(), replicas, "ready replicas: {v:#}");
    let nodes: std::collections::BTreeSet<&String> = ready.iter().map(|(n, _)| n).collect();
    assert_eq!(nodes.len(), replicas, "one replica per node: {v:#}");
    let mut on_disks: Vec<String> = e.replica_files().into_values().flatten().collect();
    on_disks.sort();
    let mut recorded: Vec<String> = v["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["id"].as_str().expect("a replica id").to_string())
        .collect();
    recorded.sort();
    assert_eq!(
        on_disks, recorded,
        "replica files on the disks vs the volume's replicas"
    );
    v
}

/// Deletes the claim (its pods gone) and checks that the PV, the Palisade volume and every
/// replica file go with it.
pub async fn delete_claim_and_check_gone(e: &E2e, claim: &str, pv: &PersistentVolume) {
    e.api::<PersistentVolumeClaim>()
        .delete(claim, &DeleteParams::default())
        .await
        .expect("delete the PVC");
    let pvs = &Api::<PersistentVolume>::all(e.client.clone());
    let pv_name = pv.metadata.name.clone().expect("a PV name");
    let pv_name = pv_name.as_str();
    eventually(&format!("PV {pv_name} gone"), 60, || async move {
        match pvs.get_opt(pv_name).await {
            Ok(None) => Ok(()),
            Ok(Some(pv)) => Err(format!("{:?}", pv.status.and_then(|s| s.phase))),
            Err(err) => Err(err.to_string()),
        }
    })
    .await;
    eventually(
        "no Palisade volume and no replica file",
        30,
        || async move {
            let volumes = e.volumes();
            let files = e.replica_files();
            if volumes.is_empty() && files.values().all(Vec::is_empty) {
                Ok(())
            } else {
                Err(format!("volumes {volumes:#?}, replica files {files:?}"))
            }
        },
    )
    .await;
}

/// Sends `signal` to every Palisade node process.
pub fn signal_nodes(e: &E2e, signal: nix::sys::signal::Signal) {
    for node in &e.cluster.nodes {
        if let Some(child) = &node.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, signal).expect("signal a node process");
        }
    }
}
