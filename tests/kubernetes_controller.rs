//! `palisade controller --store kubernetes` end to end: the real controller and a real node
//! on loopback, the controller's state as palisade.io custom resources on a real API server
//! (`$KUBEBUILDER_ASSETS`), driven over CSI and checked with kubectl and on disk.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::k8s::ControlPlane;
use palisade::csi::v1 as pb;

const NAMESPACE: &str = "palisade-system";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_keeps_its_state_in_custom_resources() {
    let test = "a_controller_keeps_its_state_in_custom_resources";
    let Some(plane) = ControlPlane::start(test).await else {
        return;
    };
    plane.apply_crds();
    plane.create_namespace(NAMESPACE);
    let store_args = [
        "--store".to_string(),
        "kubernetes".to_string(),
        "--kubeconfig".to_string(),
        plane.kubeconfig.display().to_string(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
    ];
    let mut cluster = Cluster::start_with(ClusterOptions {
        nodes: 1,
        log_dir: None,
        controller_args: store_args.to_vec(),
    })
    .await;
    cluster
        .wait_nodes("n1 up", |n| n.len() == 1 && n.iter().all(up))
        .await;
    let get = |args: &[&str]| {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-n", NAMESPACE]);
        plane.kubectl_ok(&all)
    };
    let field = |resource: &str, path: &str| get(&[resource, "-o", &format!("jsonpath={path}")]);
    assert_eq!(field("pln/n1", "{.spec.id}"), "n1");

    // Settings are an object too. (This disk is shared with whatever else the machine
    // holds: placement must not mind how full it is.)
    cluster.ctl_ok(&[
        "settings",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);
    assert_eq!(
        field(
            "pls/settings",
            "{.spec.storage_minimal_available_percentage}"
        ),
        "0"
    );

    // A volume: its record and its replica's are objects, its replica a directory on n1.
    let mut csi = cluster.controller_client().await;
    let size = 16 * MIB;
    let created = csi
        .create_volume(create_request("pvc-k8s", size, "1"))
        .await
        .expect("create_volume")
        .into_inner()
        .volume
        .expect("a volume");
    assert_eq!(created.volume_id, "pvc-k8s");
    assert_eq!(field("plv/pvc-k8s", "{.spec.state}"), "Ready");
    assert_eq!(
        field("plv/pvc-k8s", "{.metadata.finalizers}"),
        r#"["palisade.io/replicas"]"#
    );
    let replicas = get(&["plr", "-l", "palisade.io/volume=pvc-k8s", "-o", "name"]);
    assert_eq!(replicas.trim(), "palisadereplica.palisade.io/pvc-k8s-r-0");
    let disk = cluster.node("n1").disk.clone();
    assert_eq!(replicas_on(&disk), vec![("pvc-k8s-r-0".to_string(), size)]);

    // The state outlives the controller: a restarted one knows the volume, and a retried
    // CreateVolume returns it.
    cluster.restart_controller().await;
    let v = cluster.ctl_json(&["volume", "pvc-k8s"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let mut csi = cluster.controller_client().await;
    let again = csi
        .create_volume(create_request("pvc-k8s", size, "1"))
        .await
        .expect("create_volume again")
        .into_inner()
        .volume
        .expect("a volume");
    assert_eq!(again.volume_id, "pvc-k8s");

    // kubectl delete by hand of an attached volume: the finalizer keeps the object, and the
    // replica with it, while the volume is attached; it is neither handed out again nor
    // attached elsewhere.
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: "pvc-k8s".into(),
        node_id: node.into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    };
    csi.controller_publish_volume(publish("n1"))
        .await
        .expect("controller_publish_volume");
    plane.kubectl_ok(&["delete", "plv", "pvc-k8s", "-n", NAMESPACE, "--wait=false"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while field("plv/pvc-k8s", "{.metadata.deletionTimestamp}").is_empty() {
        assert!(Instant::now() < deadline, "no deletionTimestamp");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = csi
        .create_volume(create_request("pvc-k8s", size, "1"))
        .await
        .expect_err("a volume being deleted is not handed out again");
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    // Several lifecycle passes go by: the attached volume stays.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.ctl_json(&["volume", "pvc-k8s"])["state"], "ready");
    assert_eq!(replicas_on(&disk).len(), 1);

    // Once it is detached, the controller deletes it as DeleteVolume would: the replica
    // goes, then the record and the object.
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: "pvc-k8s".into(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .expect("controller_unpublish_volume");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(&["plv,plr", "-o", "name"]).trim().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the volume deleted by hand is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(replicas_on(&disk), vec![]);
    assert_eq!(cluster.ctl_json(&["volumes"]), serde_json::json!([]));
    // DeleteVolume of what is gone is OK.
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "pvc-k8s".into(),
        secrets: Default::default(),
    })
    .await
    .expect("delete_volume");
}

/// The full control plane later end-to-end tests need (garbage collection, the attach-detach
/// controller, scheduling) comes up too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_starts_a_controller_manager_and_a_scheduler() {
    let options = common::k8s::Options {
        controller_manager: true,
        scheduler: true,
        ..Default::default()
    };
    let test = "the_harness_starts_a_controller_manager_and_a_scheduler";
    let Some(plane) = ControlPlane::start_with(test, options).await else {
        return;
    };
    // The service account controller made the default account of a new namespace.
    plane.create_namespace("fresh");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !plane
        .kubectl(&["get", "serviceaccount", "default", "-n", "fresh"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no default service account");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The scheduler is up: a pod with nowhere to go is marked unschedulable.
    plane.kubectl_ok(&[
        "run",
        "probe",
        "-n",
        "fresh",
        "--image=registry.invalid/none",
        "--restart=Never",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reason = plane.kubectl_ok(&[
            "get",
            "pod",
            "probe",
            "-n",
            "fresh",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].reason}",
        ]);
        if reason == "Unschedulable" {
            break;
        }
        assert!(Instant::now() < deadline, "the pod was never considered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
