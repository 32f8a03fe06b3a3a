//! Palisade end to end on a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager with its attach-detach controller, kube-scheduler, from
//! `$KUBEBUILDER_ASSETS`): the real csi-provisioner and csi-attacher against `palisade
//! controller`'s CSI socket, three `palisade node` processes on directory disks, and for
//! each node an emulated kubelet (tests/common/kubelet.rs) that registers it and makes the
//! CSI node calls a kubelet makes (the harness: tests/common/e2e.rs). A claim is
//! provisioned, attached, staged, published and written by a pod on one node, and read back
//! by a pod on another; the claim's deletion deletes the volume and its replica files. A
//! kill -9 of the controller in the middle of a provisioning converges to exactly one volume.
//!
//! Without `KUBEBUILDER_ASSETS` (or without the sidecars in it) every test prints a SKIPPED
//! line and passes.

mod common;

use std::time::Duration;

use common::cluster;
use common::e2e::*;
use common::kubelet::unique_volume_name;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::Api;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_follows_its_pod_from_node_to_node_and_is_deleted_with_its_data() {
    let test = "k8s_e2e::a_claim_follows_its_pod_from_node_to_node_and_is_deleted_with_its_data";
    let Some(e) = E2e::start(test).await else {
        return;
    };
    e.run(|e| Box::pin(moves_between_nodes(e))).await;
}

async fn moves_between_nodes(e: &mut E2e) {
    let e = &*e;
    {
        e.storage_class("palisade-2", 2).await;
        e.create_claim("data", "palisade-2").await;
        e.create_pod("writer", "n1", "data", json!({ WRITE: "written on n1" }))
            .await;
        let writer = e.wait_pod_ready("writer").await;
        e.step("the writer runs on n1");
        let pv = e.bound_volume("data").await;
        let (handle, attributes) = volume_handle(&pv);
        // --extra-create-metadata's keys are kept with the volume and come back in its context.
        assert_eq!(
            attributes
                .get("csi.storage.k8s.io/pvc/name")
                .map(String::as_str),
            Some("data"),
            "{attributes:?}"
        );
        assert_eq!(
            attributes.get("numberOfReplicas").map(String::as_str),
            Some("2"),
            "{attributes:?}"
        );
        let va = e.wait_attachment(&handle, "n1").await;
        let metadata = va
            .status
            .and_then(|s| s.attachment_metadata)
            .unwrap_or_default();
        assert!(
            !metadata.is_empty(),
            "ControllerPublish's publish context is in the VolumeAttachment"
        );
        let v = assert_one_volume(e, &pv, 2);
        assert_eq!(v["attachment"]["node_id"], "n1", "{v:#}");
        let first_epoch = v["attachment"]["epoch"].as_u64().expect("an epoch");
        let unique = unique_volume_name(DRIVER, &handle);
        assert!(e.kubelet("n1").volumes_in_use().await.contains(&unique));
        let pv_name = pv.metadata.name.clone().expect("a PV name");
        let target = e.kubelet("n1").target_path(&pod_uid(&writer), &pv_name);
        let staging = e.kubelet("n1").staging_path(&handle);
        assert!(cluster::is_mounted(&target), "{target:?} is mounted");
        assert!(cluster::is_mounted(&staging), "{staging:?} is mounted");

        // The pod goes; the volume is unpublished, unstaged and detached from n1 ...
        e.delete_pod("writer").await;
        e.step("the writer is gone");
        assert!(
            !cluster::is_mounted(&target) && !target.exists(),
            "{target:?} is gone"
        );
        assert!(!cluster::is_mounted(&staging), "{staging:?} is unmounted");
        assert!(!e.kubelet("n1").volumes_in_use().await.contains(&unique));
        e.wait_attachment_gone(&handle, "n1").await;
        eventually("the volume detached in Palisade", 30, || async move {
            let v = &e.volumes()[0];
            if v["attachment"].is_null() {
                Ok(())
            } else {
                Err(format!("{v:#}"))
            }
        })
        .await;

        // ... and comes back on n2 with the data.
        e.create_pod("reader", "n2", "data", json!({ EXPECT: "written on n1" }))
            .await;
        e.wait_pod_ready("reader").await;
        e.step("the reader runs on n2 and read the data back");
        e.wait_attachment(&handle, "n2").await;
        let v = assert_one_volume(e, &pv, 2);
        assert_eq!(v["attachment"]["node_id"], "n2", "{v:#}");
        assert!(
            v["attachment"]["epoch"].as_u64().expect("an epoch") > first_epoch,
            "a new attachment has a higher epoch: {v:#}"
        );

        // A dead node renews nothing; a revived one renews again.
        let leases: Api<Lease> = Api::namespaced(e.client.clone(), "kube-node-lease");
        let renewed = |lease: Lease| lease.spec.and_then(|s| s.renew_time);
        e.kubelet("n3").kill();
        let before = renewed(leases.get("n3").await.expect("n3's Lease"));
        let n1_before = renewed(leases.get("n1").await.expect("n1's Lease"));
        // Two heartbeats: a live node renews in that time, a dead one must not.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(renewed(leases.get("n3").await.expect("n3's Lease")), before);
        assert_ne!(
            renewed(leases.get("n1").await.expect("n1's Lease")),
            n1_before
        );
        e.kubelet("n3").revive().await;
        assert_ne!(renewed(leases.get("n3").await.expect("n3's Lease")), before);
        e.step("a dead n3 renewed nothing, a revived one renews");

        // The claim goes: the PV, the volume and its replica files go with it.
        e.delete_pod("reader").await;
        e.wait_attachment_gone(&handle, "n2").await;
        delete_claim_and_check_gone(e, "data", &pv).await;
        e.step("the claim, its PV, the volume and its replica files are gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_in_the_middle_of_provisioning_converges_to_one_volume() {
    let test = "k8s_e2e::a_controller_killed_in_the_middle_of_provisioning_converges_to_one_volume";
    let Some(e) = E2e::start(test).await else {
        return;
    };
    e.run(|e| Box::pin(killed_mid_provisioning(e))).await;
}

async fn killed_mid_provisioning(e: &mut E2e) {
    let seen = {
        let e = &*e;
        e.storage_class("palisade-2", 2).await;
        e.create_claim("data", "palisade-2").await;
        // Stop every node before the pod comes, so that CreateVolume, once it has recorded
        // the volume, waits on their agents: the kill below lands in the middle of it, not
        // before it nor after. The nodes' last heartbeats (every second) are recent enough
        // for placement to count them up (the controller's timeout is 3 s), and the
        // scheduler and the provisioner take well under that to call CreateVolume.
        signal_nodes(e, nix::sys::signal::Signal::SIGSTOP);
        e.create_pod("writer", "n1", "data", json!({ WRITE: "after a crash" }))
            .await;
        let claims = &e.api::<PersistentVolumeClaim>();
        eventually("the PVC's selected node", 60, || async move {
            let pvc = claims.get("data").await.map_err(|e| e.to_string())?;
            let annotations = pvc.metadata.annotations.unwrap_or_default();
            match annotations.get("volume.kubernetes.io/selected-node") {
                Some(node) if node == "n1" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        e.step("every node stopped; the scheduler selected n1");
        let seen = eventually("a volume being created", 20, || async move {
            match e.volumes().first() {
                Some(v) => Ok(v.clone()),
                None => Err("no volume yet".to_string()),
            }
        })
        .await;
        assert_eq!(
            seen["state"], "creating",
            "CreateVolume waits on the stopped nodes: {seen:#}"
        );
        let pvc = claims.get("data").await.expect("the PVC");
        assert_ne!(
            pvc.status.and_then(|s| s.phase).as_deref(),
            Some("Bound"),
            "the claim is not bound yet"
        );
        seen
    };
    e.step(&format!(
        "kill -9 of the controller, volume {} in state {}",
        seen["id"], seen["state"]
    ));
    e.cluster.kill9_controller();
    signal_nodes(e, nix::sys::signal::Signal::SIGCONT);
    e.cluster.restart_controller().await;
    e.step("the controller is back, the nodes run again");

    let e = &*e;
    // The provisioner lost the driver, exited, was restarted and retries CreateVolume.
    e.provisioner
        .as_ref()
        .expect("the provisioner")
        .wait_starts(2, Duration::from_secs(30))
        .await;
    e.wait_pod_ready("writer").await;
    e.step("the writer runs");
    let pv = e.bound_volume("data").await;
    let v = assert_one_volume(e, &pv, 2);
    assert_eq!(v["attachment"]["node_id"], "n1", "{v:#}");
    assert_eq!(
        seen["id"], v["id"],
        "the volume recorded before the crash is the one bound"
    );

    e.delete_pod("writer").await;
    let (handle, _) = volume_handle(&pv);
    e.wait_attachment_gone(&handle, "n1").await;
    delete_claim_and_check_gone(e, "data", &pv).await;
    e.step("the claim, its PV, the volume and its replica files are gone");
}
