//! Cluster mode end to end on loopback: the real `palisade controller`, three real
//! `palisade node` processes (each with its own disk, sockets and ports) and `palisade ctl`,
//! driven over the controller's CSI socket and checked through `ctl --json` and on disk.
//! The nodes and `ctl` read the cluster secret from the controller's state directory.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cluster::*;
use palisade::csi::v1 as pb;
use palisade::replica::DATA_FILE;
use palisade::rpc::v1 as api;
use palisade::rpc::v1::control_plane_client::ControlPlaneClient;
use palisade::rpc::v1::node_agent_client::NodeAgentClient;
use palisade::rpc::Auth;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use serde_json::Value;

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

    // Each node's CSI socket serves Identity (the plugin's capabilities, CONTROLLER_SERVICE
    // included, as on the controller's socket: tests/identity.rs) and Node.
    let node_channel = palisade::csi::connect(&cluster.node("n2").socket)
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
    assert!(
        format!("{caps:?}").contains("ControllerService"),
        "{caps:?}"
    );

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
    let channel = palisade::rpc::channel(&cluster.api, timeout).expect("controller channel");
    let mut bare = ControlPlaneClient::new(channel.clone());
    let missing = "missing authorization metadata";
    assert_unauthenticated(bare.list_volumes(api::ListVolumesRequest {}).await, missing);
    assert_unauthenticated(
        bare.register_node(intruder_registration(&agent_address))
            .await,
        missing,
    );
    let mut wrong = palisade::rpc::control_client(channel.clone(), stranger.clone());
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
    let mut right = palisade::rpc::control_client(channel, Auth::new(&secret));
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
    let channel = palisade::rpc::channel(&agent_address, timeout).expect("agent channel");
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
        palisade::rpc::agent_client(channel.clone(), stranger)
            .delete_replica(delete())
            .await,
        wrong_credential,
    );
    assert!(replica_path.join(DATA_FILE).exists());
    // With the credential (a grow to the same size: nothing changes), it answers.
    palisade::rpc::agent_client(channel, Auth::new(&secret))
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
        use palisade::replica::io::{ReplicaIo, ReplicaIoError};
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

/// Engines that stop on their own are noticed by their node, which logs it as an error,
/// reports the volume abnormal with the reason, and still unstages it completely:
/// - fenced: n1 freezes, the volume is taken over by n2 (policy immediate) and staged there;
///   n1's first write after it resumes meets the newer epoch at the replicas;
/// - lease expired: the controller freezes, so n1 (started with a 3 s lease) cannot renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_that_stop_on_their_own_are_reported_and_unstaged() {
    with_cluster(|cluster| Box::pin(stopped_engines_scenario(cluster))).await;
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
    // Topology is the consumer's reach, not a limit on where replicas live: a replicated
    // volume whose requisite names only n1 is accessible from every node, its replicas are
    // placed by the usual rules (two nodes), and it attaches elsewhere.
    let only_n1 = || pb::Topology {
        segments: [(
            palisade::model::TOPOLOGY_NODE_KEY.to_string(),
            "n1".to_string(),
        )]
        .into(),
    };
    let mut request = create_request("reach", 32 * MIB, "2");
    request.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![only_n1()],
        preferred: vec![only_n1()],
    });
    let reach = csi
        .create_volume(request)
        .await
        .expect("CreateVolume with a requisite of one node")
        .into_inner()
        .volume
        .expect("volume");
    assert!(
        reach.accessible_topology.is_empty(),
        "a replicated volume is accessible from every node: {:?}",
        reach.accessible_topology
    );
    let v = cluster.ctl_json(&["volume", &reach.volume_id]);
    let homes: BTreeSet<String> = ready_replicas(&v).into_iter().map(|(n, _)| n).collect();
    assert_eq!(homes.len(), 2, "two replicas on two nodes: {v:#}");
    csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: reach.volume_id.clone(),
        node_id: "n3".into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .expect("ControllerPublish outside the requisite");
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: reach.volume_id.clone(),
        node_id: "n3".into(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublish");

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

fn xfs_cap() -> pb::VolumeCapability {
    let mut cap = mount_cap();
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = "xfs".into();
    }
    cap
}

/// Stages and publishes `id` on `node` as `cap`; returns the staging path and the target.
async fn stage_and_publish_as(
    cluster: &Cluster,
    node: &str,
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
    cap: &pb::VolumeCapability,
) -> (PathBuf, PathBuf) {
    let (staging, target) = staging_and_target(cluster, node, id);
    let mut client = node_client(cluster, node).await;
    client
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.to_string(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("NodeStageVolume");
    client
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.to_string(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
    (staging, target)
}

fn fs_bytes(path: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks() * s.fragment_size()
}

/// Online expansion of an attached, replicated xfs volume while a writer fsyncs through
/// the mount, with one replica's node dead: ControllerExpandVolume grows every live
/// replica and the running engine, NodeExpandVolume grows the device and the filesystem
/// in place, and data written past the old end reaches every member. The dead node's
/// replica, back, is grown before it is rebuilt; afterwards the members are byte-identical
/// at the new size, every acknowledged write reads back, and a fresh stage finds it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_replicated_volume_grows_online() {
    with_cluster(|cluster| Box::pin(expansion_scenario(cluster))).await;
}

async fn expansion_scenario(cluster: &mut Cluster) {
    const FROM: u64 = 320 * MIB;
    const TO: u64 = 448 * MIB;
    let mut csi = ready_cluster(cluster).await;
    let cap = xfs_cap();
    let request = create_request("grow", FROM, "2");
    let (id, ctx) = create_and_publish_as(&mut csi, request, &cap, "n1").await;
    let (staging, target) = stage_and_publish_as(cluster, "n1", &id, &ctx, &cap).await;
    let before = fs_bytes(&target);
    assert!(before < FROM, "{before}");
    let writer = Writer::start(&target);

    // One replica away from n1 dies; the engine drops it at its next write.
    let victim = ready_replicas(&cluster.ctl_json(&["volume", &id]))
        .into_iter()
        .map(|(node, _)| node)
        .find(|n| n != "n1")
        .expect("a replica away from n1");
    cluster.kill9(&victim);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = cluster.ctl_json(&["volume", &id]);
        if ready_replicas(&v).iter().all(|(n, _)| *n != victim) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead replica stays a member: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ControllerExpandVolume: the live replica and the engine grow; the dead one waits.
    let expanded = csi
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: TO as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume of an attached, degraded volume")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, TO as i64);
    assert!(expanded.node_expansion_required);
    let v = cluster.ctl_json(&["volume", &id]);
    assert_eq!(v["size"], TO, "{v:#}");
    for (node, file) in ready_replicas(&v) {
        let len = std::fs::metadata(&file)
            .expect("a member's data file")
            .len();
        assert_eq!(len, TO, "the member on {node}");
    }

    // NodeExpandVolume: the device and the mounted filesystem grow in place.
    let mut node = node_client(cluster, "n1").await;
    let grown = node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: TO as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("NodeExpandVolume")
        .into_inner();
    assert_eq!(grown.capacity_bytes, TO as i64);
    let after = fs_bytes(&target);
    assert!(
        after > before + (TO - FROM) * 3 / 4,
        "the filesystem did not grow: {before} -> {after}"
    );
    // More than the old filesystem could hold: some of it lands past the old end.
    let big = pattern(7, (FROM as usize) * 3 / 4);
    write_synced(&target.join("big"), &big).expect("a file larger than the old free space");

    // The dead node returns: its replica is grown, rebuilt and a member again.
    cluster.restart_node(&victim).await;
    let healed = wait_ready(cluster, &id, "two ready replicas again", |nodes| {
        nodes.len() == 2
    })
    .await;
    assert!(healed["degraded_reason"].is_null(), "{healed:#}");
    writer.stop_and_check(&target);
    assert!(std::fs::read(target.join("big")).expect("big") == big);

    detach_and_compare_members(cluster, "n1", &id, &target).await;
    let members = ready_replicas(&cluster.ctl_json(&["volume", &id]));
    for (node, file) in &members {
        let data = std::fs::read(file).expect("a member's data file");
        assert_eq!(data.len() as u64, TO, "the member on {node}");
        assert!(
            data[FROM as usize..].iter().any(|b| *b != 0),
            "nothing past the old end on {node}"
        );
    }

    // A fresh stage serves the new size from the start.
    let (_, target) = stage_and_publish_as(cluster, "n1", &id, &ctx, &cap).await;
    assert!(fs_bytes(&target) >= after);
    assert!(std::fs::read(target.join("big")).expect("big after a restage") == big);
    let mut node = node_client(cluster, "n1").await;
    unpublish_and_unstage(&mut node, &id, &staging, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_a_forged_epoch_is_failed_precondition_and_starts_nothing() {
    with_cluster_of(1, |cluster| Box::pin(forged_epoch_scenario(cluster))).await;
}

async fn forged_epoch_scenario(cluster: &mut Cluster) {
    let mut csi = ready_cluster(cluster).await;
    let (id, ctx) = create_and_publish(&mut csi, "forged", "1", None, "n1").await;
    let (staging, target) = staging_and_target(cluster, "n1", &id);
    let mut n1 = node_client(cluster, "n1").await;
    let mut forged = ctx.clone();
    forged.insert(palisade::model::CONTEXT_EPOCH.to_string(), "999".into());
    for _ in 0..2 {
        let status = n1
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: forged.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect_err("epoch 999 is not the volume's attachment");
        // Not UNAVAILABLE: a CO retries that forever, and this one cannot succeed.
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("publish_context") && status.message().contains("999"),
            "{}",
            status.message()
        );
    }
    let home = node_home(cluster, "n1");
    assert!(mounts_under(&home).is_empty(), "{:?}", mounts_under(&home));
    assert!(loops_under(&home).is_empty(), "{:?}", loops_under(&home));

    // The real attachment stages, and the volume is as usable as ever.
    let published = stage_and_publish(cluster, "n1", &id, &ctx).await;
    assert_eq!(published, target);
    write_synced(&target.join("f"), b"ok").expect("write");
    unpublish_and_unstage(&mut n1, &id, &staging, &target).await;
    assert!(!target.exists() && !staging.exists());
}
