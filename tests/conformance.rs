//! CSI conformance: the real `palisade standalone` binary, over its real unix socket, checked
//! against the CSI spec's semantics and per-RPC error tables (spec.md), and against what
//! csi-sanity checks for the capabilities Palisade advertises.
//!
//! Every test starts its own driver on a private state directory. Error checks assert the
//! code and that the message names the offending field (as a whole word, so that
//! "staging_target_path" does not count as naming "target_path").

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use palisade::csi::v1 as pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

const NODE_KEY: &str = "topology.palisade.io/node";
const DRIVER_NAME: &str = "driver.palisade.io";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// True when `message` contains `field` as a whole identifier (not inside a longer one).
fn names_field(message: &str, field: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    message.match_indices(field).any(|(i, _)| {
        let before = message[..i].chars().next_back();
        let after = message[i + field.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// Asserts an error with `code` whose message names `field` as a whole identifier.
#[track_caller]
fn assert_field<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, field: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} naming {field:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "wrong code (field {field:?}); message: {}",
                s.message()
            );
            assert!(
                names_field(s.message(), field),
                "message {:?} does not name the field {field:?}",
                s.message()
            );
        }
    }
}

/// A mount (ext4 unless `fs` says otherwise) capability with the given access mode.
fn mount_mode(fs: &str, mode: Mode) -> pb::VolumeCapability {
    cap(
        pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: fs.to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        mode,
    )
}

fn block_mode(mode: Mode) -> pb::VolumeCapability {
    cap(
        pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {}),
        mode,
    )
}

const MULTI_NODE_MODES: [Mode; 3] = [
    Mode::MultiNodeReaderOnly,
    Mode::MultiNodeSingleWriter,
    Mode::MultiNodeMultiWriter,
];

fn range(required: i64, limit: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

/// A one-replica CreateVolume request with an explicit capacity range.
fn create_range_req(name: &str, required: i64, limit: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: range(required, limit),
        volume_capabilities: vec![mount_cap("ext4")],
        parameters: params(&[("numberOfReplicas", "1")]),
        ..Default::default()
    }
}

async fn try_create(
    d: &mut Driver,
    req: pb::CreateVolumeRequest,
) -> Result<pb::Volume, tonic::Status> {
    d.controller.create_volume(req).await.map(|r| {
        r.into_inner()
            .volume
            .expect("CreateVolumeResponse.volume is REQUIRED")
    })
}

fn topology(node: &str) -> pb::Topology {
    pb::Topology {
        segments: HashMap::from([(NODE_KEY.to_string(), node.to_string())]),
    }
}

fn publish_req(
    volume_id: &str,
    node_id: &str,
    c: pb::VolumeCapability,
    readonly: bool,
) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: volume_id.to_string(),
        node_id: node_id.to_string(),
        volume_capability: Some(c),
        readonly,
        ..Default::default()
    }
}

async fn controller_publish(
    d: &mut Driver,
    volume_id: &str,
    c: pb::VolumeCapability,
) -> HashMap<String, String> {
    let node = d.node_id.clone();
    d.controller
        .controller_publish_volume(publish_req(volume_id, &node, c, false))
        .await
        .expect("controller_publish_volume")
        .into_inner()
        .publish_context
}

fn unpublish_req(volume_id: &str, node_id: &str) -> pb::ControllerUnpublishVolumeRequest {
    pb::ControllerUnpublishVolumeRequest {
        volume_id: volume_id.to_string(),
        node_id: node_id.to_string(),
        ..Default::default()
    }
}

async fn get_volume(d: &mut Driver, id: &str) -> pb::ControllerGetVolumeResponse {
    d.controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.to_string(),
        })
        .await
        .expect("controller_get_volume")
        .into_inner()
}

fn published_nodes(r: &pb::ControllerGetVolumeResponse) -> Vec<String> {
    r.status
        .as_ref()
        .expect("ControllerGetVolumeResponse.status is REQUIRED")
        .published_node_ids
        .clone()
}

/// Every ListVolumes entry, following next_token.
async fn list_all(d: &mut Driver) -> Vec<pb::list_volumes_response::Entry> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let page = d
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 0,
                starting_token: token.clone(),
            })
            .await
            .expect("list_volumes")
            .into_inner();
        out.extend(page.entries);
        if page.next_token.is_empty() {
            return out;
        }
        token = page.next_token;
    }
    panic!("ListVolumes never ended");
}

fn entry_ids(entries: &[pb::list_volumes_response::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            e.volume
                .as_ref()
                .expect("Entry.volume is REQUIRED")
                .volume_id
                .clone()
        })
        .collect()
}

async fn capacity(d: &mut Driver, req: pb::GetCapacityRequest) -> pb::GetCapacityResponse {
    d.controller
        .get_capacity(req)
        .await
        .expect("get_capacity")
        .into_inner()
}

fn one_replica_capacity_req() -> pb::GetCapacityRequest {
    pb::GetCapacityRequest {
        volume_capabilities: vec![mount_cap("ext4")],
        parameters: params(&[("numberOfReplicas", "1")]),
        accessible_topology: None,
    }
}

/// The data files (`<disk>/replicas/<replica id>/volume.img`) of a volume's replicas.
fn replica_data_files(d: &Driver, volume_id: &str) -> Vec<PathBuf> {
    let prefix = format!("{volume_id}-r-");
    let mut out = Vec::new();
    for i in 0..d.disks.len() {
        let Ok(entries) = std::fs::read_dir(d.disk_dir(i).join("replicas")) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                out.push(e.path().join("volume.img"));
            }
        }
    }
    out.sort();
    out
}

fn stage_req(
    volume_id: &str,
    staging: &Path,
    c: pb::VolumeCapability,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(c),
        ..Default::default()
    }
}

fn node_publish_req(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    c: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(c),
        readonly,
        ..Default::default()
    }
}

fn unpublish_node_req(volume_id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: target.display().to_string(),
    }
}

fn unstage_req(volume_id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.display().to_string(),
    }
}

fn stats_req(volume_id: &str, path: &Path) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: volume_id.to_string(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

/// The staging directory the CO would create for a volume (the CO creates it, per spec).
fn staging_dir(d: &Driver, name: &str) -> PathBuf {
    let p = d.path(&format!("staging/{name}"));
    std::fs::create_dir_all(&p).expect("create staging directory");
    p
}

/// A target path whose parent exists (the CO's duty); the target itself is the SP's.
fn target_path(d: &Driver, pod: &str) -> PathBuf {
    let parent = d.path(&format!("pods/{pod}"));
    std::fs::create_dir_all(&parent).expect("create target parent");
    parent.join("volume")
}

/// Creates a one-replica volume, controller-publishes it to the node and stages it.
async fn staged_volume(
    d: &mut Driver,
    name: &str,
    bytes: i64,
    c: pb::VolumeCapability,
) -> (pb::Volume, PathBuf) {
    let vol = create(d, name, bytes, vec![c.clone()]).await;
    controller_publish(d, &vol.volume_id, c.clone()).await;
    let staging = staging_dir(d, name);
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, c))
        .await
        .expect("node_stage_volume");
    (vol, staging)
}

/// A staged volume, also published at a target path.
async fn published_volume(
    d: &mut Driver,
    name: &str,
    bytes: i64,
    c: pb::VolumeCapability,
) -> (pb::Volume, PathBuf, PathBuf) {
    let (vol, staging) = staged_volume(d, name, bytes, c.clone()).await;
    let target = target_path(d, name);
    d.node
        .node_publish_volume(node_publish_req(
            &vol.volume_id,
            &staging,
            &target,
            c,
            false,
        ))
        .await
        .expect("node_publish_volume");
    (vol, staging, target)
}

/// (fs type, per-mount options) of every mount at `path`, bottom first.
fn mounts_at(path: &Path) -> Vec<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let p = path.display().to_string().replace(' ', "\\040");
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            if fields.get(4) != Some(&p.as_str()) {
                return None;
            }
            let fs = right.split(' ').next()?.to_string();
            Some((fs, fields.get(5)?.to_string()))
        })
        .collect()
}

fn usage(
    r: &pb::NodeGetVolumeStatsResponse,
    unit: pb::volume_usage::Unit,
) -> Option<pb::VolumeUsage> {
    r.usage.iter().find(|u| u.unit == unit as i32).cloned()
}

async fn volume_stats(d: &mut Driver, id: &str, path: &Path) -> pb::NodeGetVolumeStatsResponse {
    d.node
        .node_get_volume_stats(stats_req(id, path))
        .await
        .expect("node_get_volume_stats")
        .into_inner()
}

/// Runs `palisade standalone` directly (not through the harness) and waits for it to exit.
fn run_standalone_until_exit(
    args: &[String],
    within: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("standalone")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn palisade");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    (status, stderr)
}

// ---------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_plugin_info_reports_the_driver_name_and_a_version() {
    let mut d = Driver::start(&["disk0"]).await;
    for _ in 0..2 {
        let info = d
            .identity
            .get_plugin_info(pb::GetPluginInfoRequest {})
            .await
            .expect("get_plugin_info")
            .into_inner();
        assert_eq!(info.name, DRIVER_NAME);
        // Spec: domain name notation, at most 63 characters.
        assert!(info.name.len() <= 63);
        assert!(info
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
        assert!(
            !info.vendor_version.is_empty(),
            "vendor_version is REQUIRED"
        );
    }
}

#[tokio::test]
async fn get_plugin_capabilities_advertise_controller_topology_and_online_expansion() {
    use pb::plugin_capability::{service, volume_expansion, Type};
    let mut d = Driver::start(&["disk0"]).await;
    let caps = d
        .identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .expect("get_plugin_capabilities")
        .into_inner()
        .capabilities;
    let mut services = HashSet::new();
    let mut expansion = HashSet::new();
    for c in &caps {
        match &c.r#type {
            Some(Type::Service(s)) => {
                services.insert(service::Type::try_from(s.r#type).expect("known service type"));
            }
            Some(Type::VolumeExpansion(e)) => {
                expansion.insert(
                    volume_expansion::Type::try_from(e.r#type).expect("known expansion type"),
                );
            }
            None => panic!("a plugin capability without a type: {c:?}"),
        }
    }
    assert_eq!(
        services,
        HashSet::from([
            service::Type::ControllerService,
            service::Type::VolumeAccessibilityConstraints
        ])
    );
    assert_eq!(expansion, HashSet::from([volume_expansion::Type::Online]));
}

#[tokio::test]
async fn probe_reports_ready() {
    let mut d = Driver::start(&["disk0"]).await;
    for _ in 0..2 {
        let r = d
            .identity
            .probe(pb::ProbeRequest {})
            .await
            .expect("probe")
            .into_inner();
        assert_eq!(r.ready, Some(true));
    }
}

// ---------------------------------------------------------------------------------------
// Capabilities and unimplemented RPCs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn controller_get_capabilities_lists_exactly_the_supported_rpcs() {
    use pb::controller_service_capability::{rpc::Type as T, Type};
    let mut d = Driver::start(&["disk0"]).await;
    let caps = d
        .controller
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .expect("controller_get_capabilities")
        .into_inner()
        .capabilities;
    let got: HashSet<T> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => T::try_from(r.r#type).expect("known controller capability"),
            None => panic!("a controller capability without a type"),
        })
        .collect();
    let want = HashSet::from([
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::ExpandVolume,
        T::ListVolumesPublishedNodes,
        T::PublishReadonly,
        T::GetVolume,
        T::VolumeCondition,
        T::SingleNodeMultiWriter,
    ]);
    assert_eq!(got, want);
    assert_eq!(caps.len(), want.len(), "no capability listed twice");
}

#[tokio::test]
async fn snapshot_rpcs_and_modify_volume_are_unimplemented() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "snap-source", MIB, vec![mount_cap("ext4")]).await;
    assert_code(
        d.controller
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: vol.volume_id.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "snapshot",
    );
    assert_code(
        d.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: "snap".into(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "snapshot",
    );
    assert_code(
        d.controller
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await,
        Code::Unimplemented,
        "snapshot",
    );
    assert_code(
        d.controller
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: "snap".into(),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "snapshot",
    );
    assert_code(
        d.controller
            .controller_modify_volume(pb::ControllerModifyVolumeRequest {
                volume_id: vol.volume_id.clone(),
                mutable_parameters: params(&[("numberOfReplicas", "2")]),
                ..Default::default()
            })
            .await,
        Code::Unimplemented,
        "modif",
    );
}

#[tokio::test]
async fn node_get_capabilities_lists_exactly_the_supported_rpcs() {
    use pb::node_service_capability::{rpc::Type as T, Type};
    let mut d = Driver::start(&["disk0"]).await;
    let caps = d
        .node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .expect("node_get_capabilities")
        .into_inner()
        .capabilities;
    let got: HashSet<T> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => T::try_from(r.r#type).expect("known node capability"),
            None => panic!("a node capability without a type"),
        })
        .collect();
    let want = HashSet::from([
        T::StageUnstageVolume,
        T::GetVolumeStats,
        T::ExpandVolume,
        T::VolumeCondition,
        T::SingleNodeMultiWriter,
    ]);
    assert_eq!(got, want);
    assert_eq!(caps.len(), want.len(), "no capability listed twice");
}

#[tokio::test]
async fn node_get_info_reports_node_id_volume_limit_and_topology() {
    let mut d = Driver::start(&["disk0"]).await;
    let info = d
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("node_get_info")
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert!(info.max_volumes_per_node > 0);
    let topo = info
        .accessible_topology
        .expect("accessible_topology, since VOLUME_ACCESSIBILITY_CONSTRAINTS is advertised");
    assert_eq!(topo.segments.get(NODE_KEY), Some(&info.node_id));
}

// ---------------------------------------------------------------------------------------
// CreateVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_volume_without_name_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("x", MIB, 0);
    req.name = String::new();
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "name",
    );
}

#[tokio::test]
async fn create_volume_without_capabilities_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("no-caps", MIB, 0);
    req.volume_capabilities.clear();
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    assert!(
        list_all(&mut d).await.is_empty(),
        "a refused CreateVolume leaves no volume"
    );
}

#[tokio::test]
async fn create_volume_with_a_capability_without_access_mode_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("no-mode", MIB, 0);
    req.volume_capabilities[0].access_mode = None;
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "access_mode",
    );
}

#[tokio::test]
async fn create_volume_with_the_unknown_access_mode_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = pb::CreateVolumeRequest {
        volume_capabilities: vec![mount_mode("ext4", Mode::Unknown)],
        ..create_range_req("unknown-mode", MIB, 0)
    };
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "access_mode",
    );
}

#[tokio::test]
async fn create_volume_with_a_capability_without_access_type_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("no-type", MIB, 0);
    req.volume_capabilities[0].access_type = None;
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "access_type",
    );
}

#[tokio::test]
async fn create_volume_with_an_unsupported_fs_type_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = pb::CreateVolumeRequest {
        volume_capabilities: vec![mount_cap("btrfs")],
        ..create_range_req("btrfs", MIB, 0)
    };
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "fs_type",
    );
}

#[tokio::test]
async fn create_volume_with_a_multi_node_access_mode_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    for mode in MULTI_NODE_MODES {
        for c in [mount_mode("ext4", mode), block_mode(mode)] {
            // Also when listed next to a supported capability: ALL must be satisfiable.
            let req = pb::CreateVolumeRequest {
                volume_capabilities: vec![mount_cap("ext4"), c],
                ..create_range_req("multi-node", MIB, 0)
            };
            assert_field(
                d.controller.create_volume(req).await,
                Code::InvalidArgument,
                "volume_capabilities",
            );
        }
    }
    assert!(list_all(&mut d).await.is_empty());
}

#[tokio::test]
async fn create_volume_accepts_every_single_node_mode_and_both_access_types() {
    let mut d = Driver::start(&["disk0"]).await;
    let modes = [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        for (j, c) in [
            mount_mode("", mode),
            mount_mode("xfs", mode),
            block_mode(mode),
        ]
        .into_iter()
        .enumerate()
        {
            let req = pb::CreateVolumeRequest {
                volume_capabilities: vec![c],
                ..create_range_req(&format!("mode-{i}-{j}"), MIB, 0)
            };
            let vol = try_create(&mut d, req)
                .await
                .expect("single-node capability");
            assert_eq!(vol.capacity_bytes, MIB);
        }
    }
}

#[tokio::test]
async fn create_volume_without_capacity_range_gets_the_default_size() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = pb::CreateVolumeRequest {
        capacity_range: None,
        ..create_range_req("default-size", 0, 0)
    };
    let vol = try_create(&mut d, req).await.expect("create_volume");
    assert_eq!(vol.capacity_bytes, GIB);
    assert_eq!(vol.volume_id, "default-size");
    for f in replica_data_files(&d, &vol.volume_id) {
        assert_eq!(
            std::fs::metadata(&f).expect("replica data file").len(),
            GIB as u64
        );
    }
}

#[tokio::test]
async fn create_volume_rounds_required_bytes_up_to_a_mebibyte() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = try_create(&mut d, create_range_req("rounded", MIB + 1, 0))
        .await
        .expect("create_volume");
    assert_eq!(vol.capacity_bytes, 2 * MIB);
    let files = replica_data_files(&d, &vol.volume_id);
    assert_eq!(files.len(), 1, "numberOfReplicas 1: {files:?}");
    assert_eq!(
        std::fs::metadata(&files[0]).expect("data file").len(),
        2 * MIB as u64
    );
}

#[tokio::test]
async fn create_volume_honours_an_exact_capacity_range() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = try_create(&mut d, create_range_req("exact", 64 * MIB, 64 * MIB))
        .await
        .expect("create_volume");
    assert_eq!(vol.capacity_bytes, 64 * MIB);
}

#[tokio::test]
async fn create_volume_with_only_a_limit_stays_within_it() {
    let mut d = Driver::start(&["disk0"]).await;
    let limit = 10 * MIB + 5;
    let vol = try_create(&mut d, create_range_req("limited", 0, limit))
        .await
        .expect("create_volume");
    assert!(
        vol.capacity_bytes > 0 && vol.capacity_bytes <= limit,
        "{}",
        vol.capacity_bytes
    );
}

#[tokio::test]
async fn create_volume_with_limit_below_required_is_out_of_range() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .create_volume(create_range_req("inverted", 4 * MIB, 2 * MIB))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
    assert!(list_all(&mut d).await.is_empty());
}

#[tokio::test]
async fn create_volume_with_a_range_holding_no_mebibyte_multiple_is_out_of_range() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .create_volume(create_range_req("narrow", MIB + 1, MIB + 2))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
    assert_field(
        d.controller
            .create_volume(create_range_req("tiny-limit", 0, 100))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
}

#[tokio::test]
async fn create_volume_larger_than_the_largest_volume_is_out_of_range() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .create_volume(create_range_req("huge", 17 << 40, 0))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
}

#[tokio::test]
async fn create_volume_with_negative_capacity_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .create_volume(create_range_req("negative", -1, 0))
            .await,
        Code::InvalidArgument,
        "required_bytes",
    );
    assert_field(
        d.controller
            .create_volume(create_range_req("negative", 0, -1))
            .await,
        Code::InvalidArgument,
        "limit_bytes",
    );
}

#[tokio::test]
async fn create_volume_twice_with_the_same_arguments_returns_the_same_volume() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = create_req(
        "twice",
        8 * MIB,
        vec![mount_cap("ext4")],
        &[
            ("numberOfReplicas", "1"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ],
    );
    let first = try_create(&mut d, req.clone()).await.expect("first create");
    let second = try_create(&mut d, req).await.expect("second create");
    assert_eq!(first, second);
    assert_eq!(
        replica_data_files(&d, &first.volume_id).len(),
        1,
        "one volume's worth of replicas"
    );
    assert_eq!(entry_ids(&list_all(&mut d).await), vec![first.volume_id]);
}

#[tokio::test]
async fn create_volume_same_name_with_a_range_admitting_its_size_is_the_same_volume() {
    let mut d = Driver::start(&["disk0"]).await;
    let first = try_create(&mut d, create_range_req("admitted", 64 * MIB, 0))
        .await
        .expect("create_volume");
    let second = try_create(&mut d, create_range_req("admitted", 32 * MIB, 128 * MIB))
        .await
        .expect("a compatible range is OK");
    assert_eq!(second.volume_id, first.volume_id);
    assert_eq!(second.capacity_bytes, 64 * MIB);
}

#[tokio::test]
async fn create_volume_same_name_different_size_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    try_create(&mut d, create_range_req("resized", 8 * MIB, 8 * MIB))
        .await
        .expect("create_volume");
    assert_field(
        d.controller
            .create_volume(create_range_req("resized", 16 * MIB, 16 * MIB))
            .await,
        Code::AlreadyExists,
        "capacity",
    );
    let got = get_volume(&mut d, "resized").await;
    assert_eq!(
        got.volume.expect("volume").capacity_bytes,
        8 * MIB,
        "the existing volume is untouched"
    );
}

#[tokio::test]
async fn create_volume_same_name_different_parameters_is_already_exists() {
    let mut d = Driver::start(&["disk0", "disk1"]).await;
    try_create(&mut d, create_range_req("reparam", 8 * MIB, 0))
        .await
        .expect("create_volume");
    let mut req = create_range_req("reparam", 8 * MIB, 0);
    req.parameters = params(&[
        ("numberOfReplicas", "2"),
        ("replicaSoftAntiAffinity", "enabled"),
    ]);
    assert_field(
        d.controller.create_volume(req).await,
        Code::AlreadyExists,
        "parameters",
    );
}

#[tokio::test]
async fn create_volume_same_name_different_capabilities_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    try_create(&mut d, create_range_req("recap", 8 * MIB, 0))
        .await
        .expect("create_volume");
    let req = pb::CreateVolumeRequest {
        volume_capabilities: vec![block_cap()],
        ..create_range_req("recap", 8 * MIB, 0)
    };
    assert_field(
        d.controller.create_volume(req).await,
        Code::AlreadyExists,
        "capabilities",
    );
}

#[tokio::test]
async fn create_volume_with_a_128_byte_name_works_and_is_idempotent() {
    let mut d = Driver::start(&["disk0"]).await;
    let name: String = "Sanity-Controller-Create-MaxLen-"
        .chars()
        .cycle()
        .take(128)
        .collect();
    assert_eq!(name.len(), 128);
    let first = try_create(&mut d, create_range_req(&name, MIB, 0))
        .await
        .expect("128-byte name");
    assert!(
        !first.volume_id.is_empty() && first.volume_id.len() <= 128,
        "{}",
        first.volume_id
    );
    let second = try_create(&mut d, create_range_req(&name, MIB, 0))
        .await
        .expect("again");
    assert_eq!(second.volume_id, first.volume_id);
    get_volume(&mut d, &first.volume_id).await;
    d.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: first.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete_volume");
    assert!(replica_data_files(&d, &first.volume_id).is_empty());
}

#[tokio::test]
async fn create_volume_with_odd_characters_in_the_name_works() {
    let mut d = Driver::start(&["disk0"]).await;
    let names = [
        "Sanity Volume/ü ☃",
        "../../etc/passwd",
        "UPPER",
        "h-reserved-prefix",
        "a.b_c:d",
        "-dash",
    ];
    let mut ids = HashSet::new();
    for name in names {
        let vol = try_create(&mut d, create_range_req(name, MIB, 0))
            .await
            .expect(name);
        assert!(
            !vol.volume_id.contains('/'),
            "{name:?} -> {:?}",
            vol.volume_id
        );
        assert!(
            vol.volume_id.starts_with("h-") && vol.volume_id.len() == 42,
            "{name:?} -> {:?}",
            vol.volume_id
        );
        let again = try_create(&mut d, create_range_req(name, MIB, 0))
            .await
            .expect(name);
        assert_eq!(again.volume_id, vol.volume_id, "{name:?}");
        assert!(ids.insert(vol.volume_id), "distinct names get distinct ids");
    }
    let mut listed: Vec<String> = entry_ids(&list_all(&mut d).await);
    listed.sort();
    let mut want: Vec<String> = ids.into_iter().collect();
    want.sort();
    assert_eq!(listed, want);
}

#[tokio::test]
async fn create_volume_keeps_dns_label_names_as_volume_ids() {
    let mut d = Driver::start(&["disk0"]).await;
    let label63 = format!("pvc-{}", "a".repeat(59));
    assert_eq!(label63.len(), 63);
    let label64 = format!("{label63}b");
    for (name, kept) in [
        ("pvc-0a1b", true),
        (label63.as_str(), true),
        (label64.as_str(), false),
    ] {
        let vol = try_create(&mut d, create_range_req(name, MIB, 0))
            .await
            .expect(name);
        if kept {
            assert_eq!(vol.volume_id, name);
        } else {
            assert!(
                vol.volume_id.starts_with("h-") && vol.volume_id.len() == 42,
                "{}",
                vol.volume_id
            );
        }
    }
}

#[tokio::test]
async fn create_volume_too_large_for_the_disks_is_resource_exhausted_and_leaves_nothing() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let r = d
        .controller
        .create_volume(create_range_req("too-big", 2 * GIB, 0))
        .await;
    assert_code(r, Code::ResourceExhausted, "too-big");
    let r = d
        .controller
        .create_volume(create_range_req("too-big", 2 * GIB, 0))
        .await;
    let msg = r.expect_err("still too big").message().to_string();
    assert!(
        msg.contains("disk") || msg.contains("space"),
        "the message says why: {msg:?}"
    );
    assert!(list_all(&mut d).await.is_empty(), "nothing recorded");
    assert!(
        replica_data_files(&d, "too-big").is_empty(),
        "no replica file left"
    );
}

#[tokio::test]
async fn create_volume_from_a_snapshot_or_volume_source_is_invalid_argument() {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut d = Driver::start(&["disk0"]).await;
    let src = create(&mut d, "source", MIB, vec![mount_cap("ext4")]).await;
    for source in [
        Type::Snapshot(SnapshotSource {
            snapshot_id: "snap-1".into(),
        }),
        Type::Volume(VolumeSource {
            volume_id: src.volume_id.clone(),
        }),
    ] {
        let req = pb::CreateVolumeRequest {
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(source),
            }),
            ..create_range_req("clone", MIB, 0)
        };
        assert_field(
            d.controller.create_volume(req).await,
            Code::InvalidArgument,
            "volume_content_source",
        );
    }
    assert_eq!(entry_ids(&list_all(&mut d).await), vec![src.volume_id]);
}

#[tokio::test]
async fn create_volume_with_an_unknown_parameter_is_invalid_argument_naming_it() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("unknown-param", MIB, 0);
    req.parameters.insert("replicaCount".into(), "2".into());
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "replicaCount",
    );
}

#[tokio::test]
async fn create_volume_with_bad_parameter_values_is_invalid_argument_naming_the_key() {
    let mut d = Driver::start(&["disk0"]).await;
    let bad = [
        ("numberOfReplicas", "0"),
        ("numberOfReplicas", "21"),
        ("numberOfReplicas", "three"),
        ("dataLocality", "sometimes"),
        ("staleReplicaTimeout", "0"),
        ("staleReplicaTimeout", "-5"),
        ("replicaSoftAntiAffinity", "maybe"),
        ("replicaZoneSoftAntiAffinity", "true"),
        ("replicaDiskSoftAntiAffinity", "yes"),
        ("volumeAttachmentRecoveryPolicy", "later"),
        ("fsType", "btrfs"),
        ("encrypted", "true"),
        ("fromBackup", "s3://bucket?backup=b1"),
        ("backingImage", "ubuntu"),
        ("mkfsParams", "-O $(reboot)"),
        ("diskSelector", "fast disk"),
        ("nodeSelector", "a|b"),
        ("csi.storage.k8s.io/fstype", "btrfs"),
    ];
    for (key, value) in bad {
        let mut req = create_range_req("bad-param", MIB, 0);
        req.parameters.insert(key.to_string(), value.to_string());
        assert_field(
            d.controller.create_volume(req).await,
            Code::InvalidArgument,
            key,
        );
    }
    assert!(list_all(&mut d).await.is_empty());
}

#[tokio::test]
async fn create_volume_with_an_fs_type_parameter_contradicting_the_capability_is_invalid_argument()
{
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("fs-conflict", MIB, 0);
    req.parameters.insert("fsType".into(), "xfs".into());
    // The capability asks for ext4: no volume satisfies both.
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "fsType",
    );
}

#[tokio::test]
async fn create_volume_strict_local_with_several_replicas_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut req = create_range_req("strict", MIB, 0);
    req.parameters = params(&[("dataLocality", "strict-local"), ("numberOfReplicas", "2")]);
    assert_field(
        d.controller.create_volume(req).await,
        Code::InvalidArgument,
        "dataLocality",
    );
}

#[tokio::test]
async fn create_volume_accepts_longhorn_parameters_and_returns_them_in_the_context() {
    let mut d = Driver::start(&["disk0", "disk1:ssd"]).await;
    let mut req = create_range_req("longhorn", 4 * MIB, 0);
    req.parameters = params(&[
        ("numberOfReplicas", "1"),
        ("dataLocality", "best-effort"),
        ("staleReplicaTimeout", "30"),
        ("diskSelector", "ssd"),
        ("replicaSoftAntiAffinity", "enabled"),
        ("replicaZoneSoftAntiAffinity", "disabled"),
        ("replicaDiskSoftAntiAffinity", "ignored"),
        ("volumeAttachmentRecoveryPolicy", "immediate"),
        ("mkfsParams", "-I 256"),
        ("encrypted", "false"),
        ("migratable", "false"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/pv/name", "pvc-123"),
    ]);
    let vol = try_create(&mut d, req)
        .await
        .expect("valid Longhorn parameters");
    let ctx = &vol.volume_context;
    for (k, v) in [
        ("numberOfReplicas", "1"),
        ("dataLocality", "best-effort"),
        ("staleReplicaTimeout", "30"),
        ("diskSelector", "ssd"),
        ("volumeAttachmentRecoveryPolicy", "immediate"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/pv/name", "pvc-123"),
    ] {
        assert_eq!(
            ctx.get(k).map(String::as_str),
            Some(v),
            "volume_context[{k:?}] in {ctx:?}"
        );
    }
    // A volume reports the same volume_context everywhere.
    let got = get_volume(&mut d, &vol.volume_id)
        .await
        .volume
        .expect("volume");
    assert_eq!(got.volume_context, vol.volume_context);
}

#[tokio::test]
async fn create_volume_disk_selector_places_the_replica_on_a_tagged_disk() {
    let mut d = Driver::start(&["disk0", "disk1:ssd"]).await;
    let mut req = create_range_req("on-ssd", 4 * MIB, 0);
    req.parameters.insert("diskSelector".into(), "ssd".into());
    let vol = try_create(&mut d, req).await.expect("create_volume");
    let files = replica_data_files(&d, &vol.volume_id);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with(d.disk_dir(1)),
        "{files:?} is not on the ssd disk"
    );

    let mut req = create_range_req("on-nvme", 4 * MIB, 0);
    req.parameters.insert("diskSelector".into(), "nvme".into());
    assert_code(
        d.controller.create_volume(req).await,
        Code::ResourceExhausted,
        "nvme",
    );
}

#[tokio::test]
async fn create_volume_with_soft_node_anti_affinity_spreads_replicas_over_the_disks() {
    let mut d = Driver::start(&["disk0", "disk1", "disk2"]).await;
    let mut req = create_range_req("spread", 4 * MIB, 0);
    req.parameters = params(&[
        ("numberOfReplicas", "3"),
        ("replicaSoftAntiAffinity", "enabled"),
    ]);
    let vol = try_create(&mut d, req).await.expect("create_volume");
    let files = replica_data_files(&d, &vol.volume_id);
    assert_eq!(files.len(), 3, "{files:?}");
    for i in 0..3 {
        assert_eq!(
            files
                .iter()
                .filter(|f| f.starts_with(d.disk_dir(i)))
                .count(),
            1,
            "{files:?}"
        );
    }
    let got = get_volume(&mut d, &vol.volume_id).await;
    let cond = got
        .status
        .expect("status")
        .volume_condition
        .expect("volume_condition");
    assert!(
        !cond.abnormal,
        "three replicas on three disks is healthy: {cond:?}"
    );
}

#[tokio::test]
async fn create_volume_with_requisite_topology_of_this_node_works_and_of_an_unknown_node_is_resource_exhausted(
) {
    let mut d = Driver::start(&["disk0"]).await;
    let req = pb::CreateVolumeRequest {
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topology("node-1")],
            preferred: vec![topology("node-1")],
        }),
        ..create_range_req("here", MIB, 0)
    };
    try_create(&mut d, req).await.expect("requisite node-1");
    let req = pb::CreateVolumeRequest {
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topology("node-9")],
            preferred: vec![],
        }),
        ..create_range_req("elsewhere", MIB, 0)
    };
    assert_code(
        d.controller.create_volume(req).await,
        Code::ResourceExhausted,
        "elsewhere",
    );
    assert_eq!(entry_ids(&list_all(&mut d).await), vec!["here".to_string()]);
}

#[tokio::test]
async fn create_volume_strict_local_reports_its_node_as_accessible_topology() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = pb::CreateVolumeRequest {
        parameters: params(&[("dataLocality", "strict-local"), ("numberOfReplicas", "1")]),
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topology("node-1")],
            preferred: vec![topology("node-1")],
        }),
        ..create_range_req("pinned", MIB, 0)
    };
    let vol = try_create(&mut d, req).await.expect("create_volume");
    assert_eq!(vol.accessible_topology, vec![topology("node-1")]);
}

// ---------------------------------------------------------------------------------------
// DeleteVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_volume_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .delete_volume(pb::DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
}

#[tokio::test]
async fn delete_volume_of_an_unknown_id_is_ok() {
    let mut d = Driver::start(&["disk0"]).await;
    for id in [
        "no-such-volume",
        "h-0000000000000000000000000000000000000000",
        "../../x",
        "Not A Palisade Id",
    ] {
        d.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume({id:?}): {e}"));
    }
}

#[tokio::test]
async fn delete_volume_twice_is_ok_and_removes_the_volume_and_its_replicas() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "doomed", 4 * MIB, vec![mount_cap("ext4")]).await;
    assert_eq!(replica_data_files(&d, &vol.volume_id).len(), 1);
    for _ in 0..2 {
        d.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete_volume");
    }
    assert!(replica_data_files(&d, &vol.volume_id).is_empty());
    assert!(list_all(&mut d).await.is_empty());
    assert_code(
        d.controller
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await,
        Code::NotFound,
        &vol.volume_id,
    );
    // The name is free again.
    let again = create(&mut d, "doomed", 8 * MIB, vec![mount_cap("ext4")]).await;
    assert_eq!(again.capacity_bytes, 8 * MIB);
}

#[tokio::test]
async fn delete_volume_while_published_is_failed_precondition() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "in-use", 4 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let r = d
        .controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_code(r, Code::FailedPrecondition, "node-1");
    assert_eq!(
        replica_data_files(&d, &vol.volume_id).len(),
        1,
        "the volume is untouched"
    );
    d.controller
        .controller_unpublish_volume(unpublish_req(&vol.volume_id, "node-1"))
        .await
        .expect("controller_unpublish_volume");
    d.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete after unpublish");
}

// ---------------------------------------------------------------------------------------
// ControllerPublishVolume / ControllerUnpublishVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn controller_publish_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .controller_publish_volume(publish_req("", "node-1", mount_cap("ext4"), false))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    // csi-sanity's shape: nothing at all.
    assert_code(
        d.controller
            .controller_publish_volume(pb::ControllerPublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "",
    );
}

#[tokio::test]
async fn controller_publish_without_node_id_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "no-node", MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .controller_publish_volume(publish_req(&vol.volume_id, "", mount_cap("ext4"), false))
            .await,
        Code::InvalidArgument,
        "node_id",
    );
}

#[tokio::test]
async fn controller_publish_without_capability_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "no-cap", MIB, vec![mount_cap("ext4")]).await;
    let mut req = publish_req(&vol.volume_id, "node-1", mount_cap("ext4"), false);
    req.volume_capability = None;
    assert_field(
        d.controller.controller_publish_volume(req).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert!(published_nodes(&get_volume(&mut d, &vol.volume_id).await).is_empty());
}

#[tokio::test]
async fn controller_publish_with_a_multi_node_capability_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "multi", MIB, vec![mount_cap("ext4")]).await;
    for mode in MULTI_NODE_MODES {
        assert_field(
            d.controller
                .controller_publish_volume(publish_req(
                    &vol.volume_id,
                    "node-1",
                    mount_mode("ext4", mode),
                    false,
                ))
                .await,
            Code::InvalidArgument,
            "volume_capability",
        );
    }
    assert!(published_nodes(&get_volume(&mut d, &vol.volume_id).await).is_empty());
}

#[tokio::test]
async fn controller_publish_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_code(
        d.controller
            .controller_publish_volume(publish_req(
                "no-such-volume",
                "node-1",
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
    // csi-sanity: unknown volume on an unknown node is NOT_FOUND too.
    assert_code(
        d.controller
            .controller_publish_volume(publish_req(
                "no-such-volume",
                "no-such-node",
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::NotFound,
        "no-such",
    );
}

#[tokio::test]
async fn controller_publish_to_an_unknown_node_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "lost-node", MIB, vec![mount_cap("ext4")]).await;
    assert_code(
        d.controller
            .controller_publish_volume(publish_req(
                &vol.volume_id,
                "node-9",
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::NotFound,
        "node-9",
    );
    assert!(published_nodes(&get_volume(&mut d, &vol.volume_id).await).is_empty());
}

#[tokio::test]
async fn controller_publish_twice_is_ok_with_the_same_publish_context() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "pub-twice", MIB, vec![mount_cap("ext4")]).await;
    let first = controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let second = controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    assert_eq!(first, second);
    assert_eq!(
        published_nodes(&get_volume(&mut d, &vol.volume_id).await),
        vec!["node-1"]
    );
}

#[tokio::test]
async fn controller_publish_readonly_is_accepted() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "pub-ro", MIB, vec![mount_cap("ext4")]).await;
    for _ in 0..2 {
        d.controller
            .controller_publish_volume(publish_req(
                &vol.volume_id,
                "node-1",
                mount_cap("ext4"),
                true,
            ))
            .await
            .expect("PUBLISH_READONLY is advertised");
    }
}

#[tokio::test]
async fn controller_publish_again_with_a_different_readonly_flag_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "pub-flip", MIB, vec![mount_cap("ext4")]).await;
    let ctx = controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    assert_code(
        d.controller
            .controller_publish_volume(publish_req(
                &vol.volume_id,
                "node-1",
                mount_cap("ext4"),
                true,
            ))
            .await,
        Code::AlreadyExists,
        &vol.volume_id,
    );
    // The original publication stands.
    assert_eq!(
        controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await,
        ctx
    );
}

#[tokio::test]
async fn controller_publish_again_with_a_different_capability_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    let caps = vec![
        mount_cap("ext4"),
        mount_mode("ext4", Mode::SingleNodeReaderOnly),
    ];
    let vol = create(&mut d, "pub-recap", MIB, caps).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    assert_code(
        d.controller
            .controller_publish_volume(publish_req(
                &vol.volume_id,
                "node-1",
                mount_mode("ext4", Mode::SingleNodeReaderOnly),
                false,
            ))
            .await,
        Code::AlreadyExists,
        &vol.volume_id,
    );
}

#[tokio::test]
async fn controller_unpublish_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .controller_unpublish_volume(unpublish_req("", "node-1"))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
}

#[tokio::test]
async fn controller_unpublish_twice_is_ok_and_clears_the_published_node() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "unpub", MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    for _ in 0..2 {
        d.controller
            .controller_unpublish_volume(unpublish_req(&vol.volume_id, "node-1"))
            .await
            .expect("controller_unpublish_volume");
    }
    assert!(published_nodes(&get_volume(&mut d, &vol.volume_id).await).is_empty());
    let entries = list_all(&mut d).await;
    let status = entries[0].status.as_ref().expect("status");
    assert!(status.published_node_ids.is_empty(), "{status:?}");
}

#[tokio::test]
async fn controller_unpublish_of_an_unknown_volume_is_ok() {
    let mut d = Driver::start(&["disk0"]).await;
    for id in ["no-such-volume", "Not A Palisade Id", "../x"] {
        d.controller
            .controller_unpublish_volume(unpublish_req(id, "node-1"))
            .await
            .unwrap_or_else(|e| panic!("ControllerUnpublish({id:?}): {e}"));
    }
}

#[tokio::test]
async fn controller_unpublish_from_an_unknown_node_is_ok_and_keeps_the_real_publication() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "keep-pub", MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    d.controller
        .controller_unpublish_volume(unpublish_req(&vol.volume_id, "node-9"))
        .await
        .expect("unpublish from a node it is not published on");
    assert_eq!(
        published_nodes(&get_volume(&mut d, &vol.volume_id).await),
        vec!["node-1"]
    );
}

#[tokio::test]
async fn controller_unpublish_without_node_id_unpublishes_from_every_node() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "unpub-all", MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    d.controller
        .controller_unpublish_volume(unpublish_req(&vol.volume_id, ""))
        .await
        .expect("node_id is OPTIONAL");
    assert!(published_nodes(&get_volume(&mut d, &vol.volume_id).await).is_empty());
}

// ---------------------------------------------------------------------------------------
// ValidateVolumeCapabilities
// ---------------------------------------------------------------------------------------

fn validate_req(
    id: &str,
    caps: Vec<pb::VolumeCapability>,
) -> pb::ValidateVolumeCapabilitiesRequest {
    pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

#[tokio::test]
async fn validate_volume_capabilities_confirms_supported_capabilities() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "validate", MIB, vec![mount_cap("ext4")]).await;
    for caps in [
        vec![mount_cap("ext4")],
        vec![
            mount_cap("ext4"),
            mount_mode("ext4", Mode::SingleNodeMultiWriter),
        ],
    ] {
        for _ in 0..2 {
            let r = d
                .controller
                .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                    volume_context: vol.volume_context.clone(),
                    ..validate_req(&vol.volume_id, caps.clone())
                })
                .await
                .expect("validate_volume_capabilities")
                .into_inner();
            let confirmed = r
                .confirmed
                .unwrap_or_else(|| panic!("not confirmed: {:?}", r.message));
            assert_eq!(
                confirmed.volume_capabilities, caps,
                "confirms exactly what was asked"
            );
            assert_eq!(confirmed.volume_context, vol.volume_context);
        }
    }
}

#[tokio::test]
async fn validate_volume_capabilities_does_not_confirm_multi_node_modes() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "validate-multi", MIB, vec![mount_cap("ext4")]).await;
    for mode in MULTI_NODE_MODES {
        let r = d
            .controller
            .validate_volume_capabilities(validate_req(
                &vol.volume_id,
                vec![mount_cap("ext4"), mount_mode("ext4", mode)],
            ))
            .await
            .expect("an unsupported capability is a successful, unconfirmed answer")
            .into_inner();
        assert!(r.confirmed.is_none(), "{mode:?} confirmed: {r:?}");
        assert!(!r.message.is_empty(), "the message says why");
    }
}

#[tokio::test]
async fn validate_volume_capabilities_does_not_confirm_a_mismatched_context_or_parameters() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "validate-ctx", MIB, vec![mount_cap("ext4")]).await;
    let r = d
        .controller
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            volume_context: HashMap::from([("numberOfReplicas".to_string(), "7".to_string())]),
            ..validate_req(&vol.volume_id, vec![mount_cap("ext4")])
        })
        .await
        .expect("validate_volume_capabilities")
        .into_inner();
    assert!(r.confirmed.is_none(), "{r:?}");
    assert!(names_field(&r.message, "volume_context"), "{:?}", r.message);

    let matching = d
        .controller
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            parameters: params(&[("numberOfReplicas", "1")]),
            ..validate_req(&vol.volume_id, vec![mount_cap("ext4")])
        })
        .await
        .expect("validate_volume_capabilities")
        .into_inner();
    let confirmed = matching
        .confirmed
        .expect("the volume's own parameters are confirmed");
    assert_eq!(confirmed.parameters, params(&[("numberOfReplicas", "1")]));

    let other = d
        .controller
        .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            parameters: params(&[("numberOfReplicas", "3")]),
            ..validate_req(&vol.volume_id, vec![mount_cap("ext4")])
        })
        .await
        .expect("validate_volume_capabilities")
        .into_inner();
    assert!(other.confirmed.is_none(), "{other:?}");
    assert!(!other.message.is_empty());
}

#[tokio::test]
async fn validate_volume_capabilities_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_code(
        d.controller
            .validate_volume_capabilities(validate_req("no-such-volume", vec![mount_cap("ext4")]))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
}

#[tokio::test]
async fn validate_volume_capabilities_without_volume_id_or_capabilities_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "validate-args", MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .validate_volume_capabilities(validate_req("", vec![mount_cap("ext4")]))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_field(
        d.controller
            .validate_volume_capabilities(validate_req(&vol.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
}

// ---------------------------------------------------------------------------------------
// ListVolumes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn list_volumes_pages_through_every_volume_exactly_once() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut want = HashSet::new();
    for i in 0..7 {
        want.insert(
            create(&mut d, &format!("page-{i}"), MIB, vec![mount_cap("ext4")])
                .await
                .volume_id,
        );
    }
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = d
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .expect("list_volumes")
            .into_inner();
        assert!(page.entries.len() <= 3, "max_entries is a MUST NOT exceed");
        sizes.push(page.entries.len());
        seen.extend(entry_ids(&page.entries));
        if page.next_token.is_empty() {
            break;
        }
        assert!(sizes.len() < 10, "paging does not end: {sizes:?}");
        token = page.next_token;
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen.len(), 7, "each exactly once: {seen:?}");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), want);
}

#[tokio::test]
async fn list_volumes_without_max_entries_returns_everything_with_status() {
    let mut d = Driver::start(&["disk0"]).await;
    let a = create(&mut d, "list-a", MIB, vec![mount_cap("ext4")]).await;
    let b = create(&mut d, "list-b", 2 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &b.volume_id, mount_cap("ext4")).await;
    let page = d
        .controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .expect("list_volumes")
        .into_inner();
    assert!(page.next_token.is_empty());
    assert_eq!(page.entries.len(), 2);
    for e in &page.entries {
        let v = e.volume.as_ref().expect("volume");
        // LIST_VOLUMES_PUBLISHED_NODES: status MUST be set; VOLUME_CONDITION: condition MUST be set.
        let status = e.status.as_ref().expect("status");
        assert!(status.volume_condition.is_some(), "{e:?}");
        if v.volume_id == a.volume_id {
            assert_eq!(v, &a);
            assert!(status.published_node_ids.is_empty());
        } else {
            assert_eq!(v, &b);
            assert_eq!(status.published_node_ids, vec!["node-1"]);
        }
    }
}

#[tokio::test]
async fn list_volumes_shows_new_volumes_and_drops_deleted_ones() {
    let mut d = Driver::start(&["disk0"]).await;
    assert!(list_all(&mut d).await.is_empty());
    let vol = create(&mut d, "sanity", MIB, vec![mount_cap("ext4")]).await;
    assert_eq!(
        entry_ids(&list_all(&mut d).await),
        vec![vol.volume_id.clone()]
    );
    d.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete_volume");
    assert!(list_all(&mut d).await.is_empty());
}

#[tokio::test]
async fn list_volumes_token_survives_deletion_of_the_last_listed_volume() {
    let mut d = Driver::start(&["disk0"]).await;
    for i in 0..4 {
        create(&mut d, &format!("del-{i}"), MIB, vec![mount_cap("ext4")]).await;
    }
    let first = d
        .controller
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .expect("list_volumes")
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    assert!(
        !first.next_token.is_empty(),
        "more than max_entries: next_token MUST be set"
    );
    let listed = entry_ids(&first.entries);
    for id in &listed {
        d.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete_volume");
    }
    let rest = d
        .controller
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token,
        })
        .await
        .expect("a token this plugin handed out stays valid")
        .into_inner();
    let rest = entry_ids(&rest.entries);
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(
        rest.iter().all(|id| !listed.contains(id)),
        "no duplicates: {rest:?}"
    );
}

#[tokio::test]
async fn list_volumes_with_a_bad_starting_token_is_aborted() {
    let mut d = Driver::start(&["disk0"]).await;
    create(&mut d, "tok", MIB, vec![mount_cap("ext4")]).await;
    for token in ["invalid-token", "after:", "\u{1F600}"] {
        assert_field(
            d.controller
                .list_volumes(pb::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: token.to_string(),
                })
                .await,
            Code::Aborted,
            "starting_token",
        );
    }
}

#[tokio::test]
async fn list_volumes_with_negative_max_entries_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "max_entries",
    );
}

// ---------------------------------------------------------------------------------------
// ControllerGetVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn controller_get_volume_returns_the_volume_its_publication_and_condition() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "get-me", 4 * MIB, vec![mount_cap("ext4")]).await;
    let got = get_volume(&mut d, &vol.volume_id).await;
    assert_eq!(got.volume.as_ref(), Some(&vol));
    assert!(published_nodes(&got).is_empty());
    let cond = got
        .status
        .as_ref()
        .and_then(|s| s.volume_condition.clone())
        .expect("VOLUME_CONDITION: volume_condition MUST be set");
    assert!(
        !cond.abnormal,
        "a one-replica volume asked for one replica is healthy: {cond:?}"
    );
    assert!(
        !cond.message.is_empty(),
        "VolumeCondition.message is REQUIRED"
    );

    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    assert_eq!(
        published_nodes(&get_volume(&mut d, &vol.volume_id).await),
        vec!["node-1"]
    );
}

#[tokio::test]
async fn controller_get_volume_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    for id in ["no-such-volume", "../x"] {
        assert_code(
            d.controller
                .controller_get_volume(pb::ControllerGetVolumeRequest {
                    volume_id: id.into(),
                })
                .await,
            Code::NotFound,
            id,
        );
    }
}

#[tokio::test]
async fn controller_get_volume_without_volume_id_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        d.controller
            .controller_get_volume(pb::ControllerGetVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
}

#[tokio::test]
async fn a_volume_with_fewer_replicas_than_asked_is_abnormal_with_a_reason() {
    let mut d = Driver::start(&["disk0"]).await;
    let req = create_req(
        "degraded",
        4 * MIB,
        vec![mount_cap("ext4")],
        &[("numberOfReplicas", "3")],
    );
    let vol = try_create(&mut d, req)
        .await
        .expect("degraded availability is allowed by default");
    assert!(replica_data_files(&d, &vol.volume_id).len() < 3);
    let cond = get_volume(&mut d, &vol.volume_id)
        .await
        .status
        .and_then(|s| s.volume_condition)
        .expect("volume_condition");
    assert!(cond.abnormal, "{cond:?}");
    assert!(!cond.message.is_empty(), "the reason is given");
    let listed = list_all(&mut d).await;
    let listed_cond = listed[0]
        .status
        .as_ref()
        .and_then(|s| s.volume_condition.clone())
        .expect("volume_condition in ListVolumes");
    assert_eq!(listed_cond, cond);
}

// ---------------------------------------------------------------------------------------
// GetCapacity (on private tmpfs disks, so that the figures are the test's own)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_capacity_is_positive_and_stable() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let a = capacity(&mut d, pb::GetCapacityRequest::default()).await;
    assert!(a.available_capacity > 0, "{a:?}");
    assert!(a.available_capacity <= GIB, "no more than the disk: {a:?}");
    let b = capacity(&mut d, pb::GetCapacityRequest::default()).await;
    assert_eq!(a, b);
    let one = capacity(&mut d, one_replica_capacity_req()).await;
    assert!(one.available_capacity > 0, "{one:?}");
    if let Some(max) = one.maximum_volume_size {
        assert!(max > 0 && max <= GIB, "{one:?}");
    }
}

#[tokio::test]
async fn get_capacity_drops_when_a_volume_is_scheduled() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let before = capacity(&mut d, one_replica_capacity_req())
        .await
        .available_capacity;
    // Half the disk: under the scheduled-space rule the headroom falls to the other half,
    // though the sparse replica file takes no space yet.
    create(&mut d, "half", GIB / 2, vec![mount_cap("ext4")]).await;
    let after = capacity(&mut d, one_replica_capacity_req())
        .await
        .available_capacity;
    assert!(after < before, "before {before}, after {after}");
    assert!(
        after <= GIB / 2,
        "at most what is left to schedule: {after}"
    );
}

#[tokio::test]
async fn get_capacity_maximum_volume_size_is_the_largest_volume_that_can_be_created() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let r = capacity(&mut d, one_replica_capacity_req()).await;
    let max = r
        .maximum_volume_size
        .expect("maximum_volume_size (the SP has one)");
    assert!(max >= MIB, "{r:?}");
    // One byte more cannot be created...
    assert_code(
        d.controller
            .create_volume(create_range_req("over-max", max + 1, 0))
            .await,
        Code::ResourceExhausted,
        "over-max",
    );
    // ...and the largest multiple of 1 MiB within it can.
    let size = max / MIB * MIB;
    let vol = try_create(&mut d, create_range_req("at-max", size, 0))
        .await
        .expect("a volume of maximum_volume_size fits");
    assert_eq!(vol.capacity_bytes, size);
}

#[tokio::test]
async fn get_capacity_for_this_node_equals_the_total_and_for_an_unknown_node_is_zero() {
    let mut d = Driver::start_on_tmpfs(&["disk0", "disk1"], GIB as u64).await;
    let all = capacity(&mut d, one_replica_capacity_req()).await;
    let here = capacity(
        &mut d,
        pb::GetCapacityRequest {
            accessible_topology: Some(topology("node-1")),
            ..one_replica_capacity_req()
        },
    )
    .await;
    assert_eq!(here.available_capacity, all.available_capacity);
    let nowhere = capacity(
        &mut d,
        pb::GetCapacityRequest {
            accessible_topology: Some(topology("node-9")),
            ..one_replica_capacity_req()
        },
    )
    .await;
    assert_eq!(nowhere.available_capacity, 0, "{nowhere:?}");
}

#[tokio::test]
async fn get_capacity_with_a_bad_parameter_is_invalid_argument() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    for (key, value) in [
        ("numberOfReplicas", "0"),
        ("bogusKey", "1"),
        ("dataLocality", "nearby"),
    ] {
        assert_field(
            d.controller
                .get_capacity(pb::GetCapacityRequest {
                    parameters: params(&[(key, value)]),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            key,
        );
    }
}

#[tokio::test]
async fn get_capacity_for_a_multi_node_capability_is_none() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let r = d
        .controller
        .get_capacity(pb::GetCapacityRequest {
            volume_capabilities: vec![mount_mode("ext4", Mode::MultiNodeMultiWriter)],
            ..one_replica_capacity_req()
        })
        .await;
    // No volume with that capability can be provisioned: either no capacity or a refusal.
    match r {
        Ok(r) => assert_eq!(r.into_inner().available_capacity, 0),
        Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// ControllerExpandVolume
// ---------------------------------------------------------------------------------------

fn expand_req(id: &str, required: i64, limit: i64) -> pb::ControllerExpandVolumeRequest {
    pb::ControllerExpandVolumeRequest {
        volume_id: id.to_string(),
        capacity_range: range(required, limit),
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_expand_grows_the_volume_and_its_replica_files() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "grow", 64 * MIB, vec![mount_cap("ext4")]).await;
    for _ in 0..2 {
        let r = d
            .controller
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_capability: Some(mount_cap("ext4")),
                ..expand_req(&vol.volume_id, 128 * MIB, 0)
            })
            .await
            .expect("controller_expand_volume")
            .into_inner();
        assert_eq!(r.capacity_bytes, 128 * MIB);
        assert!(
            r.node_expansion_required,
            "a filesystem volume needs NodeExpandVolume"
        );
    }
    let files = replica_data_files(&d, &vol.volume_id);
    assert!(!files.is_empty());
    for f in files {
        assert_eq!(
            std::fs::metadata(&f).expect("data file").len(),
            128 * MIB as u64,
            "{f:?}"
        );
    }
    let got = get_volume(&mut d, &vol.volume_id)
        .await
        .volume
        .expect("volume");
    assert_eq!(got.capacity_bytes, 128 * MIB);
}

#[tokio::test]
async fn controller_expand_rounds_up_to_a_mebibyte_within_the_limit() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "grow-round", 4 * MIB, vec![mount_cap("ext4")]).await;
    let r = d
        .controller
        .controller_expand_volume(expand_req(&vol.volume_id, 8 * MIB + 1, 16 * MIB))
        .await
        .expect("controller_expand_volume")
        .into_inner();
    assert!(
        r.capacity_bytes > 8 * MIB && r.capacity_bytes <= 16 * MIB,
        "{r:?}"
    );
}

#[tokio::test]
async fn controller_expand_without_volume_id_or_capacity_range_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "grow-args", 4 * MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .controller_expand_volume(expand_req("", 8 * MIB, 0))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    assert_field(
        d.controller
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                capacity_range: None,
                ..expand_req(&vol.volume_id, 0, 0)
            })
            .await,
        Code::InvalidArgument,
        "capacity_range",
    );
    assert_field(
        d.controller
            .controller_expand_volume(expand_req(&vol.volume_id, -1, 0))
            .await,
        Code::InvalidArgument,
        "required_bytes",
    );
}

#[tokio::test]
async fn controller_expand_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_code(
        d.controller
            .controller_expand_volume(expand_req("no-such-volume", 8 * MIB, 0))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
}

#[tokio::test]
async fn controller_expand_to_a_smaller_size_is_ok_and_keeps_the_size() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "no-shrink", 16 * MIB, vec![mount_cap("ext4")]).await;
    let r = d
        .controller
        .controller_expand_volume(expand_req(&vol.volume_id, 8 * MIB, 0))
        .await
        .expect("already larger than asked: OK")
        .into_inner();
    assert_eq!(r.capacity_bytes, 16 * MIB);
    for f in replica_data_files(&d, &vol.volume_id) {
        assert_eq!(
            std::fs::metadata(&f).expect("data file").len(),
            16 * MIB as u64
        );
    }
}

#[tokio::test]
async fn controller_expand_with_a_limit_below_the_current_size_is_out_of_range() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "over-limit", 16 * MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .controller_expand_volume(expand_req(&vol.volume_id, 4 * MIB, 8 * MIB))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
    assert_field(
        d.controller
            .controller_expand_volume(expand_req(&vol.volume_id, 32 * MIB, 24 * MIB))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
}

#[tokio::test]
async fn controller_expand_beyond_the_disks_is_out_of_range_and_changes_nothing() {
    let mut d = Driver::start_on_tmpfs(&["disk0"], GIB as u64).await;
    let vol = create(&mut d, "grow-too-far", 64 * MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .controller_expand_volume(expand_req(&vol.volume_id, 4 * GIB, 0))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
    let got = get_volume(&mut d, &vol.volume_id)
        .await
        .volume
        .expect("volume");
    assert_eq!(got.capacity_bytes, 64 * MIB);
    for f in replica_data_files(&d, &vol.volume_id) {
        assert_eq!(
            std::fs::metadata(&f).expect("data file").len(),
            64 * MIB as u64
        );
    }
}

#[tokio::test]
async fn controller_expand_with_a_capability_the_volume_cannot_have_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "grow-multi", 16 * MIB, vec![mount_cap("ext4")]).await;
    assert_field(
        d.controller
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_capability: Some(mount_mode("ext4", Mode::MultiNodeMultiWriter)),
                ..expand_req(&vol.volume_id, 32 * MIB, 0)
            })
            .await,
        Code::InvalidArgument,
        "volume_capability",
    );
    let got = get_volume(&mut d, &vol.volume_id)
        .await
        .volume
        .expect("volume");
    assert_eq!(got.capacity_bytes, 16 * MIB, "nothing grew");
}

// ---------------------------------------------------------------------------------------
// NodeStageVolume / NodeUnstageVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn node_stage_without_volume_id_staging_path_or_capability_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "stage-args", 16 * MIB, vec![mount_cap("ext4")]).await;
    let staging = staging_dir(&d, "stage-args");
    assert_field(
        d.node
            .node_stage_volume(stage_req("", &staging, mount_cap("ext4")))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = stage_req(&vol.volume_id, &staging, mount_cap("ext4"));
    req.staging_target_path = String::new();
    assert_field(
        d.node.node_stage_volume(req).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    let mut req = stage_req(&vol.volume_id, &staging, mount_cap("ext4"));
    req.volume_capability = None;
    assert_field(
        d.node.node_stage_volume(req).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert!(!is_mounted(&staging), "nothing staged");
}

#[tokio::test]
async fn node_stage_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let staging = staging_dir(&d, "ghost");
    assert_code(
        d.node
            .node_stage_volume(stage_req("no-such-volume", &staging, mount_cap("ext4")))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
}

#[tokio::test]
async fn node_stage_twice_is_ok_and_mounts_the_filesystem_once() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "stage-twice", 64 * MIB, mount_cap("")).await;
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("")))
        .await
        .expect("second NodeStageVolume");
    let mounts = mounts_at(&staging);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].0, "ext4", "an empty fs_type means ext4");
}

#[tokio::test]
async fn node_stage_formats_xfs_when_asked() {
    let mut d = Driver::start(&["disk0"]).await;
    let (_, staging) = staged_volume(&mut d, "stage-xfs", 512 * MIB, mount_cap("xfs")).await;
    let mounts = mounts_at(&staging);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].0, "xfs");
}

#[tokio::test]
async fn node_stage_again_with_an_incompatible_capability_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    let caps = vec![
        mount_cap("ext4"),
        mount_mode("ext4", Mode::SingleNodeReaderOnly),
    ];
    let vol = create(&mut d, "restage", 64 * MIB, caps).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let staging = staging_dir(&d, "restage");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("node_stage_volume");
    // Staged read-write; staging it read-only at the same path is not the same staging.
    assert_code(
        d.node
            .node_stage_volume(stage_req(
                &vol.volume_id,
                &staging,
                mount_mode("ext4", Mode::SingleNodeReaderOnly),
            ))
            .await,
        Code::AlreadyExists,
        &vol.volume_id,
    );
}

#[tokio::test]
async fn node_stage_with_a_multi_node_capability_is_failed_precondition() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "stage-multi", 64 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let staging = staging_dir(&d, "stage-multi");
    assert_code(
        d.node
            .node_stage_volume(stage_req(
                &vol.volume_id,
                &staging,
                mount_mode("ext4", Mode::MultiNodeMultiWriter),
            ))
            .await,
        Code::FailedPrecondition,
        &vol.volume_id,
    );
    assert!(!is_mounted(&staging));
}

#[tokio::test]
async fn node_unstage_without_volume_id_or_staging_path_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let staging = staging_dir(&d, "unstage-args");
    assert_field(
        d.node.node_unstage_volume(unstage_req("", &staging)).await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = unstage_req("some-volume", &staging);
    req.staging_target_path = String::new();
    assert_field(
        d.node.node_unstage_volume(req).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
}

#[tokio::test]
async fn node_unstage_twice_is_ok_and_unmounts() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "unstage-twice", 64 * MIB, mount_cap("ext4")).await;
    assert!(is_mounted(&staging));
    for _ in 0..2 {
        d.node
            .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .expect("node_unstage_volume");
    }
    assert!(!is_mounted(&staging));
    // And the volume can be staged again afterwards.
    std::fs::create_dir_all(&staging).expect("recreate staging directory");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("stage after unstage");
    assert!(is_mounted(&staging));
}

#[tokio::test]
async fn node_unstage_of_a_volume_never_staged_is_ok() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "never-staged", 16 * MIB, vec![mount_cap("ext4")]).await;
    let staging = staging_dir(&d, "never-staged");
    d.node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("not staged there: OK");
}

// ---------------------------------------------------------------------------------------
// NodePublishVolume / NodeUnpublishVolume
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn node_publish_without_volume_id_target_path_or_capability_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "pub-args", 64 * MIB, mount_cap("ext4")).await;
    let target = target_path(&d, "pub-args");
    assert_field(
        d.node
            .node_publish_volume(node_publish_req(
                "",
                &staging,
                &target,
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = node_publish_req(&vol.volume_id, &staging, &target, mount_cap("ext4"), false);
    req.target_path = String::new();
    assert_field(
        d.node.node_publish_volume(req).await,
        Code::InvalidArgument,
        "target_path",
    );
    let mut req = node_publish_req(&vol.volume_id, &staging, &target, mount_cap("ext4"), false);
    req.volume_capability = None;
    assert_field(
        d.node.node_publish_volume(req).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    assert!(!target.exists(), "nothing published");
}

#[tokio::test]
async fn node_publish_requests_shaped_like_csi_sanity_are_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let target = target_path(&d, "sanity");
    // Only a volume id: target_path and volume_capability are missing (and the staging path,
    // which the spec makes FAILED_PRECONDITION; the missing required fields come first).
    let r = d
        .node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: "sanity-volume".into(),
            ..Default::default()
        })
        .await;
    let s = r.expect_err("missing fields");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        names_field(s.message(), "target_path") || names_field(s.message(), "volume_capability"),
        "{:?}",
        s.message()
    );
    // A volume id and a target path, no capability.
    assert_field(
        d.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: "sanity-volume".into(),
                target_path: target.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "volume_capability",
    );
}

#[tokio::test]
async fn node_publish_without_staging_target_path_is_failed_precondition() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "pub-nostage", 64 * MIB, mount_cap("ext4")).await;
    let target = target_path(&d, "pub-nostage");
    let mut req = node_publish_req(&vol.volume_id, &staging, &target, mount_cap("ext4"), false);
    req.staging_target_path = String::new();
    assert_field(
        d.node.node_publish_volume(req).await,
        Code::FailedPrecondition,
        "staging_target_path",
    );
}

#[tokio::test]
async fn node_publish_before_stage_is_failed_precondition() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "unstaged", 64 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let staging = staging_dir(&d, "unstaged");
    let target = target_path(&d, "unstaged");
    assert_code(
        d.node
            .node_publish_volume(node_publish_req(
                &vol.volume_id,
                &staging,
                &target,
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::FailedPrecondition,
        &vol.volume_id,
    );
    assert!(!is_mounted(&target));
}

#[tokio::test]
async fn node_publish_twice_is_ok_and_mounts_the_target_once() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "np-twice", 64 * MIB, mount_cap("ext4")).await;
    d.node
        .node_publish_volume(node_publish_req(
            &vol.volume_id,
            &staging,
            &target,
            mount_cap("ext4"),
            false,
        ))
        .await
        .expect("second NodePublishVolume");
    assert_eq!(mounts_at(&target).len(), 1, "{:?}", mounts_at(&target));
    std::fs::write(target.join("hello"), b"world").expect("the published volume is writable");
    assert_eq!(
        std::fs::read(staging.join("hello")).expect("same filesystem"),
        b"world"
    );
}

#[tokio::test]
async fn node_publish_readonly_mounts_the_target_read_only() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "np-ro", 64 * MIB, mount_cap("ext4")).await;
    let target = target_path(&d, "np-ro");
    for _ in 0..2 {
        d.node
            .node_publish_volume(node_publish_req(
                &vol.volume_id,
                &staging,
                &target,
                mount_cap("ext4"),
                true,
            ))
            .await
            .expect("readonly NodePublishVolume");
    }
    let err = std::fs::write(target.join("nope"), b"x").expect_err("read-only target");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[tokio::test]
async fn node_publish_again_at_the_same_target_with_a_different_readonly_flag_is_already_exists() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "np-flip", 64 * MIB, mount_cap("ext4")).await;
    assert_code(
        d.node
            .node_publish_volume(node_publish_req(
                &vol.volume_id,
                &staging,
                &target,
                mount_cap("ext4"),
                true,
            ))
            .await,
        Code::AlreadyExists,
        &vol.volume_id,
    );
    std::fs::write(target.join("still-rw"), b"x")
        .expect("the first publication is unchanged (read-write)");

    let (vol2, staging2) = staged_volume(&mut d, "np-flip-ro", 64 * MIB, mount_cap("ext4")).await;
    let target2 = target_path(&d, "np-flip-ro");
    d.node
        .node_publish_volume(node_publish_req(
            &vol2.volume_id,
            &staging2,
            &target2,
            mount_cap("ext4"),
            true,
        ))
        .await
        .expect("readonly publish");
    assert_code(
        d.node
            .node_publish_volume(node_publish_req(
                &vol2.volume_id,
                &staging2,
                &target2,
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::AlreadyExists,
        &vol2.volume_id,
    );
}

#[tokio::test]
async fn node_publish_single_writer_at_a_second_target_is_failed_precondition() {
    let mut d = Driver::start(&["disk0"]).await;
    for (name, mode) in [
        ("sn-single", Mode::SingleNodeSingleWriter),
        ("sn-writer", Mode::SingleNodeWriter),
    ] {
        let c = mount_mode("ext4", mode);
        let (vol, staging, _) = published_volume(&mut d, name, 64 * MIB, c.clone()).await;
        let second = target_path(&d, &format!("{name}-second"));
        assert_code(
            d.node
                .node_publish_volume(node_publish_req(
                    &vol.volume_id,
                    &staging,
                    &second,
                    c,
                    false,
                ))
                .await,
            Code::FailedPrecondition,
            &vol.volume_id,
        );
        assert!(!is_mounted(&second), "{mode:?}");
    }
}

#[tokio::test]
async fn node_publish_single_node_multi_writer_at_a_second_target_is_ok() {
    let mut d = Driver::start(&["disk0"]).await;
    let c = mount_mode("ext4", Mode::SingleNodeMultiWriter);
    let (vol, staging, first) = published_volume(&mut d, "sn-multi", 64 * MIB, c.clone()).await;
    let second = target_path(&d, "sn-multi-second");
    d.node
        .node_publish_volume(node_publish_req(
            &vol.volume_id,
            &staging,
            &second,
            c,
            false,
        ))
        .await
        .expect("SINGLE_NODE_MULTI_WRITER at a second target");
    std::fs::write(first.join("shared"), b"1").expect("write");
    assert_eq!(std::fs::read(second.join("shared")).expect("read"), b"1");
}

#[tokio::test]
async fn node_unpublish_without_volume_id_or_target_path_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let target = target_path(&d, "unpub-args");
    assert_field(
        d.node
            .node_unpublish_volume(unpublish_node_req("", &target))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = unpublish_node_req("some-volume", &target);
    req.target_path = String::new();
    assert_field(
        d.node.node_unpublish_volume(req).await,
        Code::InvalidArgument,
        "target_path",
    );
}

#[tokio::test]
async fn node_unpublish_of_a_never_published_target_is_ok() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "np-never", 16 * MIB, vec![mount_cap("ext4")]).await;
    let target = target_path(&d, "np-never");
    for _ in 0..2 {
        d.node
            .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
            .await
            .expect("nothing there: OK");
    }
    assert!(!target.exists());
}

#[tokio::test]
async fn node_unpublish_twice_is_ok_and_removes_the_target() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "np-gone", 64 * MIB, mount_cap("ext4")).await;
    assert!(target.is_dir() && is_mounted(&target));
    for _ in 0..2 {
        d.node
            .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
            .await
            .expect("node_unpublish_volume");
    }
    assert!(!is_mounted(&target));
    assert!(
        !target.exists(),
        "the SP MUST delete what it created at target_path"
    );
    assert!(
        is_mounted(&staging),
        "the staging mount is the CO's to unstage"
    );
}

#[tokio::test]
async fn block_volume_publishes_a_device_at_the_target_and_cleans_up() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "raw", 16 * MIB, block_cap()).await;
    let target = target_path(&d, "raw");
    for _ in 0..2 {
        d.node
            .node_publish_volume(node_publish_req(
                &vol.volume_id,
                &staging,
                &target,
                block_cap(),
                false,
            ))
            .await
            .expect("node_publish_volume (block)");
    }
    assert_eq!(mounts_at(&target).len(), 1);
    let meta = std::fs::metadata(&target).expect("target");
    assert!(meta.file_type().is_block_device(), "{meta:?}");
    let stats = volume_stats(&mut d, &vol.volume_id, &target).await;
    let bytes = usage(&stats, pb::volume_usage::Unit::Bytes).expect("bytes usage");
    assert_eq!(bytes.total, 16 * MIB);
    for _ in 0..2 {
        d.node
            .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
            .await
            .expect("node_unpublish_volume (block)");
    }
    assert!(
        !target.exists(),
        "the device file the SP created is removed"
    );
    for _ in 0..2 {
        d.node
            .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .expect("node_unstage_volume (block)");
    }
}

#[tokio::test]
async fn data_written_through_a_publication_survives_unstage_and_restage() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "durable", 64 * MIB, mount_cap("ext4")).await;
    std::fs::write(target.join("data"), b"kept").expect("write");
    d.node
        .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
        .await
        .expect("node_unpublish_volume");
    d.node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("node_unstage_volume");
    d.controller
        .controller_unpublish_volume(unpublish_req(&vol.volume_id, "node-1"))
        .await
        .expect("controller_unpublish_volume");

    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    std::fs::create_dir_all(&staging).expect("staging directory");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("restage: an existing filesystem is never reformatted");
    d.node
        .node_publish_volume(node_publish_req(
            &vol.volume_id,
            &staging,
            &target,
            mount_cap("ext4"),
            false,
        ))
        .await
        .expect("republish");
    assert_eq!(
        std::fs::read(target.join("data")).expect("read back"),
        b"kept"
    );
}

// ---------------------------------------------------------------------------------------
// NodeGetVolumeStats
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn node_get_volume_stats_reports_bytes_inodes_and_condition() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "stats", 64 * MIB, mount_cap("ext4")).await;
    for path in [&target, &staging] {
        let r = volume_stats(&mut d, &vol.volume_id, path).await;
        let bytes = usage(&r, pb::volume_usage::Unit::Bytes).expect("bytes usage");
        assert!(bytes.total > 0 && bytes.total <= 64 * MIB, "{bytes:?}");
        assert!(
            bytes.available > 0 && bytes.available <= bytes.total,
            "{bytes:?}"
        );
        assert!(bytes.used >= 0 && bytes.used <= bytes.total, "{bytes:?}");
        let inodes = usage(&r, pb::volume_usage::Unit::Inodes).expect("inodes usage");
        assert!(
            inodes.total > 0 && inodes.available <= inodes.total && inodes.used > 0,
            "{inodes:?}"
        );
        let cond = r
            .volume_condition
            .expect("VOLUME_CONDITION: volume_condition MUST be set");
        assert!(!cond.abnormal && !cond.message.is_empty(), "{cond:?}");
    }
}

#[tokio::test]
async fn node_get_volume_stats_without_volume_id_or_path_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let path = d.path("anywhere");
    assert_field(
        d.node.node_get_volume_stats(stats_req("", &path)).await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = stats_req("some-volume", &path);
    req.volume_path = String::new();
    assert_field(
        d.node.node_get_volume_stats(req).await,
        Code::InvalidArgument,
        "volume_path",
    );
}

#[tokio::test]
async fn node_get_volume_stats_on_a_missing_path_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, _, _) = published_volume(&mut d, "stats-missing", 64 * MIB, mount_cap("ext4")).await;
    let missing = d.path("pods/nowhere/volume");
    assert_code(
        d.node
            .node_get_volume_stats(stats_req(&vol.volume_id, &missing))
            .await,
        Code::NotFound,
        &vol.volume_id,
    );
    // An existing directory where the volume is not mounted is not the volume either.
    let plain = d.path("plain-dir");
    std::fs::create_dir_all(&plain).expect("mkdir");
    assert_code(
        d.node
            .node_get_volume_stats(stats_req(&vol.volume_id, &plain))
            .await,
        Code::NotFound,
        &vol.volume_id,
    );
}

#[tokio::test]
async fn node_get_volume_stats_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let path = d.path("pods/none/volume");
    assert_code(
        d.node
            .node_get_volume_stats(stats_req("no-such-volume", &path))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
}

#[tokio::test]
async fn node_get_volume_stats_at_another_volumes_path_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let (_, _, target_b) = published_volume(&mut d, "stats-b", 64 * MIB, mount_cap("ext4")).await;
    let a = create(&mut d, "stats-a", 64 * MIB, vec![mount_cap("ext4")]).await;
    assert_code(
        d.node
            .node_get_volume_stats(stats_req(&a.volume_id, &target_b))
            .await,
        Code::NotFound,
        &a.volume_id,
    );
}

#[tokio::test]
async fn node_get_volume_stats_with_csi_sanitys_relative_path_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, _, _) = published_volume(&mut d, "stats-rel", 64 * MIB, mount_cap("ext4")).await;
    for id in ["no-such-volume", vol.volume_id.as_str()] {
        assert_code(
            d.node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.to_string(),
                    volume_path: "some/path".into(),
                    staging_target_path: String::new(),
                })
                .await,
            Code::NotFound,
            id,
        );
    }
}

// ---------------------------------------------------------------------------------------
// NodeExpandVolume
// ---------------------------------------------------------------------------------------

fn node_expand_req(id: &str, path: &Path, required: i64) -> pb::NodeExpandVolumeRequest {
    pb::NodeExpandVolumeRequest {
        volume_id: id.to_string(),
        volume_path: path.display().to_string(),
        capacity_range: range(required, 0),
        ..Default::default()
    }
}

/// Whether this process (and so the driver it starts) may resize a mounted ext4 filesystem:
/// the kernel's EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE, which some sandboxes drop.
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Publishes a volume, expands it with ControllerExpandVolume while published (ONLINE), then
/// NodeExpandVolume (twice) at the publish path, and checks the filesystem grew.
async fn check_online_expansion(fs: &str, initial: i64, grown: i64) {
    let mut d = Driver::start(&["disk0"]).await;
    let name = format!("expand-{fs}");
    let (vol, staging, target) = published_volume(&mut d, &name, initial, mount_cap(fs)).await;
    let total = |r: &pb::NodeGetVolumeStatsResponse| {
        usage(r, pb::volume_usage::Unit::Bytes)
            .expect("bytes usage")
            .total
    };
    let before = total(&volume_stats(&mut d, &vol.volume_id, &target).await);
    let r = d
        .controller
        .controller_expand_volume(expand_req(&vol.volume_id, grown, 0))
        .await
        .expect("online ControllerExpandVolume of a published volume")
        .into_inner();
    assert_eq!(r.capacity_bytes, grown);
    assert!(r.node_expansion_required);
    for _ in 0..2 {
        let n = d
            .node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap(fs)),
                ..node_expand_req(&vol.volume_id, &target, grown)
            })
            .await
            .expect("node_expand_volume")
            .into_inner();
        assert_eq!(n.capacity_bytes, grown);
    }
    let after = total(&volume_stats(&mut d, &vol.volume_id, &target).await);
    assert!(
        after > before + (grown - initial) / 2,
        "{fs} grew from {before} to {after} bytes"
    );
    std::fs::write(target.join("after-growth"), b"x").expect("still writable");
}

#[tokio::test]
async fn node_expand_after_controller_expand_grows_a_mounted_ext4_filesystem() {
    if has_cap_sys_resource() {
        check_online_expansion("ext4", 64 * MIB, 256 * MIB).await;
        return;
    }
    // Without CAP_SYS_RESOURCE the kernel refuses an online ext4 resize: the refusal must
    // say why, and the growth must then happen offline at the next NodeStage.
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging, target) =
        published_volume(&mut d, "expand-ext4", 64 * MIB, mount_cap("ext4")).await;
    std::fs::write(target.join("before-growth"), b"kept").expect("write");
    d.controller
        .controller_expand_volume(expand_req(&vol.volume_id, 256 * MIB, 0))
        .await
        .expect("ControllerExpandVolume");
    assert_code(
        d.node
            .node_expand_volume(node_expand_req(&vol.volume_id, &target, 256 * MIB))
            .await,
        Code::Internal,
        "CAP_SYS_RESOURCE",
    );
    d.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("unpublish");
    d.node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("unstage");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("restage grows offline");
    let stats = volume_stats(&mut d, &vol.volume_id, &staging).await;
    let total = usage(&stats, pb::volume_usage::Unit::Bytes)
        .expect("bytes usage")
        .total;
    assert!(
        total > 200 * MIB,
        "ext4 did not grow offline: {total} bytes"
    );
    assert_eq!(
        std::fs::read(staging.join("before-growth")).expect("file kept"),
        b"kept"
    );
}

#[tokio::test]
async fn node_expand_after_controller_expand_grows_a_mounted_xfs_filesystem() {
    check_online_expansion("xfs", 512 * MIB, GIB).await;
}

#[tokio::test]
async fn node_expand_without_volume_id_or_path_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "nx-args", 16 * MIB, vec![mount_cap("ext4")]).await;
    let path = d.path("anywhere");
    assert_field(
        d.node
            .node_expand_volume(node_expand_req("", &path, 0))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    let mut req = node_expand_req(&vol.volume_id, &path, 0);
    req.volume_path = String::new();
    assert_field(
        d.node.node_expand_volume(req).await,
        Code::InvalidArgument,
        "volume_path",
    );
}

#[tokio::test]
async fn node_expand_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start(&["disk0"]).await;
    let path = d.path("pods/none/volume");
    assert_code(
        d.node
            .node_expand_volume(node_expand_req("no-such-volume", &path, 0))
            .await,
        Code::NotFound,
        "no-such-volume",
    );
    // csi-sanity sends a relative path with an unknown volume and expects NOT_FOUND.
    assert_code(
        d.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: "no-such-volume".into(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "no-such-volume",
    );
}

#[tokio::test]
async fn node_expand_beyond_the_volume_size_is_out_of_range() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, _, target) = published_volume(&mut d, "nx-far", 64 * MIB, mount_cap("ext4")).await;
    assert_field(
        d.node
            .node_expand_volume(node_expand_req(&vol.volume_id, &target, GIB))
            .await,
        Code::OutOfRange,
        "capacity_range",
    );
}

#[tokio::test]
async fn node_expand_with_a_capability_the_volume_cannot_have_is_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, _, target) = published_volume(&mut d, "nx-multi", 64 * MIB, mount_cap("ext4")).await;
    assert_field(
        d.node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_capability: Some(mount_mode("ext4", Mode::MultiNodeMultiWriter)),
                ..node_expand_req(&vol.volume_id, &target, 0)
            })
            .await,
        Code::InvalidArgument,
        "volume_capability",
    );
}

// ---------------------------------------------------------------------------------------
// The socket and the process
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_socket_is_owner_only() {
    let d = Driver::start(&["disk0"]).await;
    let meta = std::fs::symlink_metadata(&d.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn a_second_driver_on_the_same_socket_exits_nonzero_and_the_first_keeps_serving() {
    let mut d = Driver::start(&["disk0"]).await;
    let other = tempfile::Builder::new()
        .prefix("palisade-test-")
        .tempdir()
        .expect("tempdir");
    let args = vec![
        "--state-dir".to_string(),
        other.path().display().to_string(),
        "--endpoint".to_string(),
        format!("unix://{}", d.socket.display()),
        "--node-id".to_string(),
        "node-2".to_string(),
        "--disk".to_string(),
        other.path().join("disk0").display().to_string(),
    ];
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        run_standalone_until_exit(&args, Duration::from_secs(30))
    })
    .await
    .expect("join");
    let status = status.expect("the second driver exits instead of serving");
    assert!(
        !status.success(),
        "second driver exited with {status}; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&d.socket.display().to_string()),
        "the error names the socket: {stderr}"
    );
    assert!(d.socket.exists(), "the live socket was not removed");
    let r = d
        .identity
        .probe(pb::ProbeRequest {})
        .await
        .expect("first driver still serves");
    assert_eq!(r.into_inner().ready, Some(true));
}

#[tokio::test]
async fn a_driver_refuses_an_endpoint_that_is_not_a_socket() {
    let dir = tempfile::Builder::new()
        .prefix("palisade-test-")
        .tempdir()
        .expect("tempdir");
    let file = dir.path().join("csi.sock");
    std::fs::write(&file, b"not a socket").expect("write");
    let args = vec![
        "--state-dir".to_string(),
        dir.path().display().to_string(),
        "--endpoint".to_string(),
        format!("unix://{}", file.display()),
        "--node-id".to_string(),
        "node-1".to_string(),
        "--disk".to_string(),
        dir.path().join("disk0").display().to_string(),
    ];
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        run_standalone_until_exit(&args, Duration::from_secs(30))
    })
    .await
    .expect("join");
    let status = status.expect("the driver exits");
    assert!(!status.success(), "{status}; {stderr}");
    assert_eq!(std::fs::read(&file).expect("file intact"), b"not a socket");
}

#[tokio::test]
async fn a_stale_socket_left_by_kill9_is_replaced_on_restart_and_state_survives() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "survivor", 8 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    d.kill9();
    let meta = std::fs::symlink_metadata(&d.socket).expect("kill -9 leaves the socket file behind");
    assert!(meta.file_type().is_socket());
    d.restart().await;
    let meta = std::fs::symlink_metadata(&d.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let got = get_volume(&mut d, &vol.volume_id).await;
    assert_eq!(got.volume.as_ref(), Some(&vol));
    assert_eq!(published_nodes(&got), vec!["node-1"]);
    let again = create(&mut d, "survivor", 8 * MIB, vec![mount_cap("ext4")]).await;
    assert_eq!(again, vol, "CreateVolume stays idempotent across a restart");
}

#[tokio::test]
async fn node_stage_is_idempotent_across_a_restart() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, staging) = staged_volume(&mut d, "restart-stage", 64 * MIB, mount_cap("ext4")).await;
    d.kill9();
    d.restart().await;
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("staged state is read from the kernel");
    assert_eq!(mounts_at(&staging).len(), 1, "{:?}", mounts_at(&staging));
    d.node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("node_unstage_volume after restart");
    assert!(!is_mounted(&staging));
}

// A wedged client (here: one whose runtime stopped running) must not hold the driver
// hostage: Kubernetes sends SIGKILL after the grace period, and the sidecars are clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_even_while_a_client_connection_is_unresponsive() {
    let mut d = Driver::start(&["disk0"]).await;
    let socket = d.socket.clone();
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let frozen = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let channel = palisade::csi::connect(&socket).await.expect("connect");
            let mut id = pb::identity_client::IdentityClient::new(channel.clone());
            id.probe(pb::ProbeRequest {}).await.expect("probe");
            connected_tx.send(()).expect("signal");
            // Blocks this runtime: the connection stays open and answers nothing.
            let _ = release_rx.recv();
            drop(channel);
        });
    });
    connected_rx.recv().expect("the client connected");
    let clean = d.terminate();
    let _ = release_tx.send(());
    frozen.join().expect("client thread");
    assert!(
        clean,
        "SIGTERM: exit status 0 within 20 s despite the idle client"
    );
    assert!(!d.socket.exists());
}

// Multi-threaded, so that the client side of the connection keeps running (and answers the
// server's GOAWAY) while `terminate` blocks this thread waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_removes_the_socket() {
    let mut d = Driver::start(&["disk0"]).await;
    assert!(d.socket.exists());
    assert!(d.terminate(), "SIGTERM: exit status 0");
    assert!(!d.socket.exists(), "the socket is removed on a clean exit");
}

// ---------------------------------------------------------------------------------------
// The node touches only what is its own (paths given by a confused or hostile caller)
// ---------------------------------------------------------------------------------------

/// Loop devices whose backing file is `file`.
fn loops_over(file: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end()) == file)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Decoys a caller might name instead of a path of the volume: a file with content, a
/// directory with content, and an empty file and an empty directory the driver did not make.
struct Decoys {
    file: PathBuf,
    dir: PathBuf,
    empty_file: PathBuf,
    empty_dir: PathBuf,
}

impl Decoys {
    fn new(d: &Driver) -> Decoys {
        let root = d.path("decoys");
        std::fs::create_dir_all(root.join("dir")).expect("decoy dir");
        std::fs::create_dir_all(root.join("empty-dir")).expect("empty decoy dir");
        std::fs::write(root.join("file"), b"the host's own file").expect("decoy file");
        std::fs::write(root.join("dir/inside"), b"the host's own data").expect("decoy content");
        std::fs::write(root.join("empty-file"), b"").expect("empty decoy file");
        Decoys {
            file: root.join("file"),
            dir: root.join("dir"),
            empty_file: root.join("empty-file"),
            empty_dir: root.join("empty-dir"),
        }
    }

    fn all(&self) -> [&Path; 4] {
        [&self.file, &self.dir, &self.empty_file, &self.empty_dir]
    }

    #[track_caller]
    fn assert_untouched(&self) {
        assert_eq!(
            std::fs::read(&self.file).expect("decoy file kept"),
            b"the host's own file"
        );
        assert_eq!(
            std::fs::read(self.dir.join("inside")).expect("decoy dir kept"),
            b"the host's own data"
        );
        assert_eq!(
            std::fs::metadata(&self.empty_file)
                .expect("empty decoy file kept")
                .len(),
            0
        );
        assert!(self.empty_dir.is_dir(), "empty decoy dir kept");
        for p in self.all() {
            assert!(!is_mounted(p), "something mounted on the decoy {p:?}");
        }
    }
}

#[tokio::test]
async fn node_unpublish_removes_nothing_the_driver_did_not_make_for_the_volume() {
    let mut d = Driver::start(&["disk0"]).await;
    let decoys = Decoys::new(&d);
    let vol = create(&mut d, "not-there", 16 * MIB, vec![mount_cap("ext4")]).await;
    for volume_id in ["no-such-volume", vol.volume_id.as_str()] {
        for decoy in decoys.all() {
            for _ in 0..2 {
                d.node
                    .node_unpublish_volume(unpublish_node_req(volume_id, decoy))
                    .await
                    .expect("the volume is not published there: OK");
            }
        }
    }
    decoys.assert_untouched();
}

#[tokio::test]
async fn node_unpublish_leaves_what_another_volume_or_the_host_mounted_at_the_target() {
    let mut d = Driver::start(&["disk0"]).await;
    let (a, _, a_target) = published_volume(&mut d, "np-a", 64 * MIB, mount_cap("ext4")).await;
    std::fs::write(a_target.join("a"), b"volume a").expect("write a");
    let b = create(&mut d, "np-b", 16 * MIB, vec![mount_cap("ext4")]).await;
    // Another volume's publication: OK (b is not published there), and a stays.
    d.node
        .node_unpublish_volume(unpublish_node_req(&b.volume_id, &a_target))
        .await
        .expect("b is not published at a's target");
    assert!(is_mounted(&a_target), "a's publication was unmounted");
    assert_eq!(std::fs::read(a_target.join("a")).expect("a"), b"volume a");

    // A mount of the host's at a path: left mounted.
    let host_mount = d.path("host-mount");
    std::fs::create_dir_all(&host_mount).expect("mount point");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "host-tmpfs"])
        .arg(&host_mount)
        .status()
        .expect("mount");
    assert!(status.success());
    std::fs::write(host_mount.join("h"), b"host").expect("write");
    d.node
        .node_unpublish_volume(unpublish_node_req(&a.volume_id, &host_mount))
        .await
        .expect("a is not published there");
    assert!(is_mounted(&host_mount), "the host's tmpfs was unmounted");
    assert_eq!(std::fs::read(host_mount.join("h")).expect("h"), b"host");

    // Something mounted over the volume's publication hides it: the driver neither
    // unmounts what is not the volume's nor says OK while the volume stays mounted.
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "over-a"])
        .arg(&a_target)
        .status()
        .expect("mount");
    assert!(status.success());
    assert_field(
        d.node
            .node_unpublish_volume(unpublish_node_req(&a.volume_id, &a_target))
            .await,
        Code::FailedPrecondition,
        "target_path",
    );
    assert_eq!(mounts_at(&a_target).len(), 2, "both mounts stay");
    let status = Command::new("umount")
        .arg(&a_target)
        .status()
        .expect("umount");
    assert!(status.success());
    d.node
        .node_unpublish_volume(unpublish_node_req(&a.volume_id, &a_target))
        .await
        .expect("a's own publication comes off");
    assert!(!a_target.exists(), "the target the driver made is removed");
}

#[tokio::test]
async fn node_publish_mounts_only_on_an_empty_directory_or_file_and_keeps_what_the_co_made() {
    let mut d = Driver::start(&["disk0"]).await;
    let decoys = Decoys::new(&d);
    let (fs_vol, fs_staging) =
        staged_volume(&mut d, "pub-on-fs", 64 * MIB, mount_cap("ext4")).await;
    let (blk_vol, blk_staging) = staged_volume(&mut d, "pub-on-blk", 16 * MIB, block_cap()).await;
    // A filesystem on a file, on a non-empty directory or file; a device on a directory, on
    // a non-empty file.
    for (vol, staging, c, target) in [
        (&fs_vol, &fs_staging, mount_cap("ext4"), &decoys.file),
        (&fs_vol, &fs_staging, mount_cap("ext4"), &decoys.dir),
        (&fs_vol, &fs_staging, mount_cap("ext4"), &decoys.empty_file),
        (&blk_vol, &blk_staging, block_cap(), &decoys.file),
        (&blk_vol, &blk_staging, block_cap(), &decoys.dir),
        (&blk_vol, &blk_staging, block_cap(), &decoys.empty_dir),
    ] {
        assert_field(
            d.node
                .node_publish_volume(node_publish_req(&vol.volume_id, staging, target, c, false))
                .await,
            Code::FailedPrecondition,
            "target_path",
        );
    }
    decoys.assert_untouched();

    // An empty directory and an empty file the CO made are used, and kept afterwards
    // (the SP deletes only what it created).
    for (vol, staging, c, target) in [
        (&fs_vol, &fs_staging, mount_cap("ext4"), &decoys.empty_dir),
        (&blk_vol, &blk_staging, block_cap(), &decoys.empty_file),
    ] {
        for _ in 0..2 {
            d.node
                .node_publish_volume(node_publish_req(
                    &vol.volume_id,
                    staging,
                    target,
                    c.clone(),
                    false,
                ))
                .await
                .expect("an empty node of the right kind takes the volume");
        }
        assert_eq!(mounts_at(target).len(), 1);
        for _ in 0..2 {
            d.node
                .node_unpublish_volume(unpublish_node_req(&vol.volume_id, target))
                .await
                .expect("unpublish");
        }
        assert!(!is_mounted(target));
    }
    decoys.assert_untouched();
}

#[tokio::test]
async fn node_stage_mounts_only_on_an_empty_directory_and_starts_nothing_otherwise() {
    let mut d = Driver::start(&["disk0"]).await;
    let decoys = Decoys::new(&d);
    let vol = create(&mut d, "stage-on", 64 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let data = replica_data_files(&d, &vol.volume_id);
    assert_eq!(data.len(), 1);
    for staging in [&decoys.dir, &decoys.file, &decoys.empty_file] {
        assert_field(
            d.node
                .node_stage_volume(stage_req(&vol.volume_id, staging, mount_cap("ext4")))
                .await,
            Code::FailedPrecondition,
            "staging_target_path",
        );
        assert!(
            loops_over(&data[0]).is_empty(),
            "a refused stage left a loop device: {:?}",
            loops_over(&data[0])
        );
    }
    decoys.assert_untouched();
}

#[tokio::test]
async fn node_paths_going_up_or_through_symlinks_are_invalid_argument() {
    let mut d = Driver::start(&["disk0"]).await;
    let decoys = Decoys::new(&d);
    let (fs_vol, fs_staging) = staged_volume(&mut d, "links-fs", 64 * MIB, mount_cap("ext4")).await;
    let (blk_vol, blk_staging) = staged_volume(&mut d, "links-blk", 16 * MIB, block_cap()).await;
    let other = create(&mut d, "links-other", 64 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &other.volume_id, mount_cap("ext4")).await;
    // A link to the decoys' directory, one to the decoy file, and `..` out of the pods' tree.
    let pods = d.path("pods");
    std::fs::create_dir_all(&pods).expect("pods");
    let decoy_root = decoys.dir.parent().expect("decoys root").to_path_buf();
    std::os::unix::fs::symlink(&decoy_root, pods.join("link")).expect("dir link");
    std::os::unix::fs::symlink(&decoys.file, pods.join("file-link")).expect("file link");
    let via_dir_link = pods.join("link/empty-dir");
    let via_file_link = pods.join("file-link");
    let going_up = PathBuf::from(format!("{}/../decoys/empty-dir", pods.display()));

    for staging in [&via_dir_link, &going_up, &pods.join("link")] {
        assert_field(
            d.node
                .node_stage_volume(stage_req(&other.volume_id, staging, mount_cap("ext4")))
                .await,
            Code::InvalidArgument,
            "staging_target_path",
        );
    }
    for (vol, staging, c, target) in [
        (&fs_vol, &fs_staging, mount_cap("ext4"), &via_dir_link),
        (&fs_vol, &fs_staging, mount_cap("ext4"), &going_up),
        (&blk_vol, &blk_staging, block_cap(), &via_file_link),
        (
            &blk_vol,
            &blk_staging,
            block_cap(),
            &pods.join("link/empty-file"),
        ),
    ] {
        assert_field(
            d.node
                .node_publish_volume(node_publish_req(&vol.volume_id, staging, target, c, false))
                .await,
            Code::InvalidArgument,
            "target_path",
        );
    }
    let staging_up = PathBuf::from(format!("{}/../{}", fs_staging.display(), "links-fs"));
    assert_field(
        d.node
            .node_publish_volume(node_publish_req(
                &fs_vol.volume_id,
                &staging_up,
                &pods.join("t"),
                mount_cap("ext4"),
                false,
            ))
            .await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    for target in [&via_dir_link, &via_file_link, &going_up] {
        assert_field(
            d.node
                .node_unpublish_volume(unpublish_node_req(&fs_vol.volume_id, target))
                .await,
            Code::InvalidArgument,
            "target_path",
        );
    }
    assert_field(
        d.node
            .node_unstage_volume(unstage_req(&fs_vol.volume_id, &staging_up))
            .await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    decoys.assert_untouched();
    assert!(is_mounted(&fs_staging), "the real staging stays");
    assert!(!pods.join("t").exists());
}

/// Bind-mounts `dir` (alone: what is mounted below it does not come along) at a new path,
/// so that what lies beneath a mount point under `dir` can be written.
fn beneath(d: &Driver, dir: &Path) -> PathBuf {
    let view = d.path("beneath");
    std::fs::create_dir_all(&view).expect("view");
    let status = Command::new("mount")
        .arg("--bind")
        .arg(dir)
        .arg(&view)
        .status()
        .expect("mount --bind");
    assert!(status.success());
    view
}

#[tokio::test]
async fn node_unstage_that_cannot_finish_says_why_and_one_that_can_finishes() {
    let mut d = Driver::start(&["disk0"]).await;
    let vol = create(&mut d, "unstage-why", 64 * MIB, vec![mount_cap("ext4")]).await;
    controller_publish(&mut d, &vol.volume_id, mount_cap("ext4")).await;
    let data = replica_data_files(&d, &vol.volume_id);
    // The driver makes the staging directory (the CO did not).
    let stagings = d.path("stagings");
    std::fs::create_dir_all(&stagings).expect("stagings");
    let staging = stagings.join("made-by-the-driver");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("stage");

    // Busy: a file open on the staging mount.
    let open = std::fs::File::create(staging.join("open")).expect("open a file");
    let r = d
        .node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .map(|_| ());
    assert_field(r.clone(), Code::FailedPrecondition, "staging_target_path");
    let message = r.expect_err("busy").message().to_string();
    assert!(
        message.contains(&staging.display().to_string()) && message.contains("busy"),
        "{message}"
    );
    assert!(is_mounted(&staging));
    drop(open);

    // Files beneath the mount (written to the node's disk while it was not mounted): the
    // volume is unstaged all the same, and the directory is left with them.
    let view = beneath(&d, &stagings);
    std::fs::write(view.join("made-by-the-driver/beneath"), b"x").expect("write beneath");
    let status = Command::new("umount").arg(&view).status().expect("umount");
    assert!(status.success());
    for _ in 0..2 {
        d.node
            .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
            .await
            .expect("unstaged, the directory's own files left in it");
    }
    assert!(!is_mounted(&staging));
    assert!(loops_over(&data[0]).is_empty(), "the device is detached");
    assert_eq!(std::fs::read(staging.join("beneath")).expect("kept"), b"x");
    // Not empty: a stage there is refused, and nothing is hidden under a new mount.
    assert_field(
        d.node
            .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
            .await,
        Code::FailedPrecondition,
        "staging_target_path",
    );
    std::fs::remove_file(staging.join("beneath")).expect("clean up");
    d.node
        .node_stage_volume(stage_req(&vol.volume_id, &staging, mount_cap("ext4")))
        .await
        .expect("stage again");
    d.node
        .node_unstage_volume(unstage_req(&vol.volume_id, &staging))
        .await
        .expect("unstage");
    assert!(
        !staging.exists(),
        "the staging directory the driver made is removed"
    );
}

#[tokio::test]
async fn node_unpublish_keeps_a_target_it_made_that_is_not_empty_and_says_so() {
    let mut d = Driver::start(&["disk0"]).await;
    let (vol, _, target) = published_volume(&mut d, "np-full", 64 * MIB, mount_cap("ext4")).await;
    let view = beneath(&d, target.parent().expect("pod dir"));
    std::fs::write(view.join("volume/beneath"), b"x").expect("write beneath");
    let status = Command::new("umount").arg(&view).status().expect("umount");
    assert!(status.success());
    let r = d
        .node
        .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
        .await;
    assert_field(r, Code::FailedPrecondition, "target_path");
    assert!(!is_mounted(&target), "the volume itself is unmounted");
    assert_eq!(std::fs::read(target.join("beneath")).expect("kept"), b"x");
    std::fs::remove_file(target.join("beneath")).expect("clean up");
    d.node
        .node_unpublish_volume(unpublish_node_req(&vol.volume_id, &target))
        .await
        .expect("now empty: removed");
    assert!(!target.exists());
}

/// A message with raw bytes in fields 1 and 2, where the CSI requests have `string` fields.
#[derive(Clone, PartialEq, prost::Message)]
struct RawStrings {
    #[prost(bytes = "vec", tag = "1")]
    one: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    two: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyAnswer {}

async fn raw_call(d: &Driver, method: &'static str, msg: RawStrings) -> Result<(), tonic::Status> {
    let channel = palisade::csi::connect(&d.socket).await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RawStrings, AnyAnswer>::default();
    grpc.unary(
        tonic::Request::new(msg),
        tonic::codegen::http::uri::PathAndQuery::from_static(method),
        codec,
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn a_request_string_that_is_not_utf8_is_invalid_argument_naming_the_field() {
    let mut d = Driver::start(&["disk0"]).await;
    assert_field(
        raw_call(
            &d,
            "/csi.v1.Controller/CreateVolume",
            RawStrings {
                one: b"bad-\xff\xfe-name".to_vec(),
                two: Vec::new(),
            },
        )
        .await,
        Code::InvalidArgument,
        "name",
    );
    let decoys = Decoys::new(&d);
    assert_field(
        raw_call(
            &d,
            "/csi.v1.Node/NodeUnpublishVolume",
            RawStrings {
                one: b"some-volume".to_vec(),
                two: [decoys.file.as_os_str().as_encoded_bytes(), b"\xff"].concat(),
            },
        )
        .await,
        Code::InvalidArgument,
        "target_path",
    );
    decoys.assert_untouched();
    // The driver serves on.
    create(&mut d, "after-bad-utf8", 16 * MIB, vec![mount_cap("ext4")]).await;
}
