//! End-to-end lifecycle tests: the real `palisade standalone` binary over its real socket,
//! real loop devices, real filesystems and real mounts (the tests run as root). Each test
//! starts its own driver on a private temporary directory; the harness's Drop unmounts and
//! detaches whatever a failed test leaves behind.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use palisade::csi::v1 as pb;
use tonic::Code;

/// The name of a replica's data file inside its directory.
const DATA_FILE: &str = "volume.img";

// ---------------------------------------------------------------------------------------
// Small deterministic pseudo-random generator (xorshift64*), seeded per test and printed so
// that a failure can be replayed.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn from_time(what: &str) -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        eprintln!("{what}: random seed {seed}");
        Rng::new(seed)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

// ---------------------------------------------------------------------------------------
// CSI call helpers.

async fn controller_publish(
    d: &mut Driver,
    volume_id: &str,
    cap: &pb::VolumeCapability,
) -> HashMap<String, String> {
    d.controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: d.node_id.clone(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            ..Default::default()
        })
        .await
        .expect("ControllerPublishVolume")
        .into_inner()
        .publish_context
}

async fn controller_unpublish(d: &mut Driver, volume_id: &str) {
    d.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: d.node_id.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublishVolume");
}

async fn stage(
    d: &mut Driver,
    vol: &pb::Volume,
    staging: &Path,
    cap: &pb::VolumeCapability,
    publish_context: &HashMap<String, String>,
) -> Result<(), tonic::Status> {
    d.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn publish(
    d: &mut Driver,
    vol: &pb::Volume,
    staging: &Path,
    target: &Path,
    cap: &pb::VolumeCapability,
    publish_context: &HashMap<String, String>,
    readonly: bool,
) -> Result<(), tonic::Status> {
    d.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly,
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn unpublish(d: &mut Driver, volume_id: &str, target: &Path) {
    d.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
}

async fn unstage(d: &mut Driver, volume_id: &str, staging: &Path) {
    d.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
}

async fn delete_volume(d: &mut Driver, volume_id: &str) -> Result<(), tonic::Status> {
    d.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume_id.to_string(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn volume_stats(
    d: &mut Driver,
    volume_id: &str,
    path: &Path,
) -> pb::NodeGetVolumeStatsResponse {
    d.node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_string(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner()
}

fn bytes_usage(stats: &pb::NodeGetVolumeStatsResponse) -> pb::VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no BYTES usage in {stats:?}"))
}

/// Every volume ListVolumes reports (all pages): id → capacity.
async fn list_volumes(d: &mut Driver) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = d
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 0,
                starting_token: token.clone(),
            })
            .await
            .expect("ListVolumes")
            .into_inner();
        for e in page.entries {
            let v = e.volume.expect("volume in ListVolumes entry");
            assert!(
                out.insert(v.volume_id.clone(), v.capacity_bytes).is_none(),
                "ListVolumes reports {:?} twice",
                v.volume_id
            );
        }
        if page.next_token.is_empty() {
            return out;
        }
        token = page.next_token;
    }
}

// ---------------------------------------------------------------------------------------
// What is on disk and in the kernel.

/// Every entry of every `<disk>/replicas/` directory but the disk's lock file: replica
/// directories, and leftovers of interrupted creates and deletes (`.creating-<replica id>`,
/// `.deleting-<replica id>`).
fn replica_entries(d: &Driver) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for disk in &d.disks {
        let disk = disk.split_once(':').map_or(disk.as_str(), |(p, _)| p);
        let Ok(entries) = std::fs::read_dir(Path::new(disk).join("replicas")) else {
            continue;
        };
        out.extend(
            entries
                .flatten()
                .filter(|e| e.file_name() != ".lock")
                .map(|e| e.path()),
        );
    }
    out.sort();
    out
}

/// The volume a replica directory (or a leftover of one) belongs to, from its name
/// `[.creating-|.deleting-]<volume id>-r-<n>`.
fn replica_volume(entry: &Path) -> Option<String> {
    let name = entry.file_name()?.to_str()?;
    let name = name
        .strip_prefix(".creating-")
        .or_else(|| name.strip_prefix(".deleting-"))
        .unwrap_or(name);
    let (volume, n) = name.rsplit_once("-r-")?;
    n.parse::<u32>().ok().map(|_| volume.to_string())
}

/// The replica directories of `volume_id` on the driver's disks (not leftovers).
fn replica_dirs(d: &Driver, volume_id: &str) -> Vec<PathBuf> {
    replica_entries(d)
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| replica_volume(p).as_deref() == Some(volume_id))
        .collect()
}

/// The data file of the volume's only replica.
fn only_data_file(d: &Driver, volume_id: &str) -> PathBuf {
    let dirs = replica_dirs(d, volume_id);
    assert_eq!(
        dirs.len(),
        1,
        "expected one replica directory of {volume_id:?}, found {dirs:?}"
    );
    let file = dirs[0].join(DATA_FILE);
    assert!(file.is_file(), "replica data file {file:?} is missing");
    file
}

/// Loop devices (`/dev/loopN`) whose backing file is `file` (also when it was deleted).
fn loops_over(file: &Path) -> Vec<String> {
    let want = file.display().to_string();
    let deleted = format!("{want} (deleted)");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let b = b.trim_end_matches('\n');
            if b == want || b == deleted {
                out.push(format!("/dev/{name}"));
            }
        }
    }
    out.sort();
    out
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
struct MountEntry {
    root: String,
    options: String,
    fstype: String,
    source: String,
}

impl MountEntry {
    fn is_readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// The mounts stacked at exactly `path`, oldest first.
fn mounts_at(path: &Path) -> Vec<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let want = path
        .display()
        .to_string()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 10 || fields[4] != want {
            continue;
        }
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        out.push(MountEntry {
            root: fields[3].to_string(),
            options: fields[5].to_string(),
            fstype: fields.get(sep + 1).unwrap_or(&"").to_string(),
            source: fields.get(sep + 2).unwrap_or(&"").to_string(),
        });
    }
    out
}

/// The one mount at `path`; panics when there is none or several.
fn single_mount(path: &Path) -> MountEntry {
    let m = mounts_at(path);
    assert_eq!(
        m.len(),
        1,
        "expected exactly one mount at {path:?}, found {m:?}"
    );
    m.into_iter().next().expect("one mount")
}

/// Runs a command, panics with its stderr on failure, returns its trimmed stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The filesystem signature on a device or image file (empty: none).
fn probe(path: &Path, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(path)
        .output()
        .expect("run blkid");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Size in bytes of a block device (or of the device bound onto a file).
fn device_size(path: &Path) -> u64 {
    run("blockdev", &["--getsize64", &path.display().to_string()])
        .parse()
        .expect("blockdev --getsize64 prints a number")
}

/// Size of a loop device as sysfs reports it.
fn sysfs_size(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .expect("read sysfs size")
        .trim()
        .parse()
        .expect("sysfs size is a number");
    sectors * 512
}

/// Total bytes of the filesystem mounted at `path`.
fn fs_total(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks() as u64 * s.fragment_size() as u64
}

// ---------------------------------------------------------------------------------------
// Files with known content.

type Files = Vec<(PathBuf, Vec<u8>)>;

fn fsync_dir(dir: &Path) {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync directory {dir:?}: {e}"));
}

/// Writes a set of files (small, nested, empty and a few MiB of pseudo-random bytes) under
/// `dir`, fsyncs them and their directories, and returns what was written.
fn write_files(dir: &Path, rng: &mut Rng) -> Files {
    let files: Files = vec![
        (PathBuf::from("hello.txt"), b"hello, palisade\n".to_vec()),
        (PathBuf::from("empty"), Vec::new()),
        (PathBuf::from("nested/deeper/small.bin"), rng.bytes(65_537)),
        (PathBuf::from("big.bin"), rng.bytes(5 * MIB as usize + 123)),
    ];
    for (rel, data) in &files {
        let path = dir.join(rel);
        let parent = path.parent().expect("a parent");
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {parent:?}: {e}"));
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
        std::io::Write::write_all(&mut f, data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync {path:?}: {e}"));
        let mut p = parent;
        while p.starts_with(dir) {
            fsync_dir(p);
            match p.parent() {
                Some(up) => p = up,
                None => break,
            }
        }
    }
    files
}

#[track_caller]
fn check_files(dir: &Path, files: &Files) {
    for (rel, want) in files {
        let path = dir.join(rel);
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        assert_eq!(got.len(), want.len(), "{path:?} has the wrong length");
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!("{path:?} differs from what was written, first at byte {at}");
        }
    }
}

/// The parameters every single-replica volume of these tests is created with.
const ONE_REPLICA: &[(&str, &str)] = &[("numberOfReplicas", "1")];

// ---------------------------------------------------------------------------------------
// 1, 2: the full lifecycle of a filesystem volume.

async fn full_lifecycle(fs: &str, size: i64) {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time(&format!("full_lifecycle_{fs}"));
    let cap = mount_cap(fs);
    let name = format!("life-{fs}");
    let vol = create(&mut d, &name, size, vec![cap.clone()]).await;
    assert!(
        vol.capacity_bytes >= size,
        "capacity {} < asked {size}",
        vol.capacity_bytes
    );
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    assert_eq!(
        std::fs::metadata(&data).expect("stat data file").len(),
        vol.capacity_bytes as u64,
        "the replica data file is not of the volume's size"
    );
    assert!(
        loops_over(&data).is_empty(),
        "a loop device exists before NodeStage"
    );

    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("kubelet/plugins/staging/life");
    let target = d.path("kubelet/pods/pod-1/volumes/life/mount");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    let staged = single_mount(&staging);
    assert_eq!(
        staged.fstype, fs,
        "staging mount has the wrong filesystem: {staged:?}"
    );
    assert!(
        !staged.is_readonly(),
        "staging mount is read-only: {staged:?}"
    );
    let loops = loops_over(&data);
    assert_eq!(
        loops.len(),
        1,
        "expected one loop device over {data:?}, found {loops:?}"
    );
    assert_eq!(
        staged.source, loops[0],
        "the staging mount is not the loop device over the replica"
    );
    let uuid = probe(Path::new(&loops[0]), "UUID");
    assert!(!uuid.is_empty(), "no filesystem UUID on {}", loops[0]);

    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish");
    let published = single_mount(&target);
    assert_eq!(
        published.source, loops[0],
        "the target is not bound to the volume: {published:?}"
    );
    assert!(!published.is_readonly());

    let files = write_files(&target, &mut rng);
    check_files(&staging, &files);
    let stats = volume_stats(&mut d, &id, &target).await;
    let usage = bytes_usage(&stats);
    assert!(
        usage.total > 0 && usage.used >= 5 * MIB,
        "stats after writing 5 MiB: {stats:?}"
    );
    assert_eq!(
        stats.volume_condition.as_ref().map(|c| c.abnormal),
        Some(false),
        "{stats:?}"
    );

    unpublish(&mut d, &id, &target).await;
    assert!(
        !is_mounted(&target),
        "target still mounted after NodeUnpublish"
    );
    assert!(!target.exists(), "target path not removed by NodeUnpublish");
    assert!(
        is_mounted(&staging),
        "NodeUnpublish unmounted the staging path"
    );

    unstage(&mut d, &id, &staging).await;
    assert!(
        !is_mounted(&staging),
        "staging still mounted after NodeUnstage"
    );
    assert!(!staging.exists(), "staging path not removed by NodeUnstage");
    assert!(
        loops_over(&data).is_empty(),
        "loop device still attached over {data:?} after NodeUnstage: {:?}",
        loops_over(&data)
    );

    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage again");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish again");
    let loops = loops_over(&data);
    assert_eq!(
        loops.len(),
        1,
        "expected one loop device after staging again: {loops:?}"
    );
    assert_eq!(
        probe(Path::new(&loops[0]), "UUID"),
        uuid,
        "the volume was reformatted"
    );
    check_files(&target, &files);

    unpublish(&mut d, &id, &target).await;
    unstage(&mut d, &id, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    assert!(
        loops_over(&data).is_empty(),
        "loop device left after the second NodeUnstage"
    );
    controller_unpublish(&mut d, &id).await;
    delete_volume(&mut d, &id).await.expect("DeleteVolume");
    assert!(
        replica_dirs(&d, &id).is_empty(),
        "replica directory left: {:?}",
        replica_dirs(&d, &id)
    );
    assert!(!data.exists(), "replica data file left after DeleteVolume");
    assert!(
        !list_volumes(&mut d).await.contains_key(&id),
        "deleted volume still listed"
    );
}

#[tokio::test]
async fn full_lifecycle_ext4() {
    full_lifecycle("ext4", 64 * MIB).await;
}

#[tokio::test]
async fn full_lifecycle_xfs() {
    full_lifecycle("xfs", 512 * MIB).await;
}

// ---------------------------------------------------------------------------------------
// 3: raw block volumes.

/// (offset, bytes) blocks written through a block volume.
fn block_pattern(rng: &mut Rng, size: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, rng.bytes(4096)),
        (MIB as u64 + 512, rng.bytes(3000)),
        (33 * MIB as u64 + 7, rng.bytes(10_000)),
        (size - 4096, rng.bytes(4096)),
    ]
}

fn write_at(path: &Path, blocks: &[(u64, Vec<u8>)]) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?} for writing: {e}"));
    for (off, data) in blocks {
        f.write_all_at(data, *off)
            .unwrap_or_else(|e| panic!("write {} bytes at {off} of {path:?}: {e}", data.len()));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {path:?}: {e}"));
}

#[track_caller]
fn check_at(path: &Path, blocks: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    for (off, want) in blocks {
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, *off)
            .unwrap_or_else(|e| panic!("read {} bytes at {off} of {path:?}: {e}", want.len()));
        assert!(
            got == *want,
            "{path:?} at offset {off} does not hold the pattern written"
        );
    }
}

#[tokio::test]
async fn block_volume_lifecycle() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time("block_volume_lifecycle");
    let cap = block_cap();
    let size = 64 * MIB;
    let vol = create(&mut d, "blk", size, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("kubelet/plugins/staging/blk");
    let target = d.path("kubelet/pods/pod-1/volumeDevices/blk/dev");

    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage (block)");
    assert_eq!(
        loops_over(&data).len(),
        1,
        "block NodeStage attaches one loop device"
    );
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish (block)");
    let bound = single_mount(&target);
    let loops = loops_over(&data);
    assert_eq!(
        Some(bound.root.trim_start_matches('/')),
        loops.first().map(|l| l.trim_start_matches("/dev/")),
        "the target is not bound to the loop device over the replica: {bound:?}"
    );
    assert_eq!(
        device_size(&target),
        vol.capacity_bytes as u64,
        "the bound device's size"
    );

    let blocks = block_pattern(&mut rng, vol.capacity_bytes as u64);
    let zeros: Vec<(u64, Vec<u8>)> = blocks
        .iter()
        .map(|(o, b)| (*o, vec![0u8; b.len()]))
        .collect();
    check_at(&target, &zeros);
    write_at(&target, &blocks);
    check_at(&target, &blocks);

    unpublish(&mut d, &id, &target).await;
    assert!(
        !is_mounted(&target),
        "target still bound after NodeUnpublish"
    );
    assert!(!target.exists(), "target file not removed by NodeUnpublish");
    unstage(&mut d, &id, &staging).await;
    assert!(
        loops_over(&data).is_empty(),
        "loop device still attached after NodeUnstage: {:?}",
        loops_over(&data)
    );
    // The loop device is over the replica's data file: the pattern is in it.
    check_at(&data, &blocks);

    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage again (block)");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish again (block)");
    check_at(&target, &blocks);

    unpublish(&mut d, &id, &target).await;
    unstage(&mut d, &id, &staging).await;
    assert!(loops_over(&data).is_empty());
    controller_unpublish(&mut d, &id).await;
    delete_volume(&mut d, &id).await.expect("DeleteVolume");
    assert!(
        replica_dirs(&d, &id).is_empty(),
        "replica directory left after DeleteVolume"
    );
}

// ---------------------------------------------------------------------------------------
// 4: read-only publish.

#[tokio::test]
async fn readonly_publish_refuses_writes_but_staging_stays_writable() {
    let mut d = Driver::start(&["disk0"]).await;
    // A read-only and a read-write publication on one node: SINGLE_NODE_WRITER allows one
    // read-write publication, and read-only ones beside it.
    let cap = cap(
        pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: "ext4".to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        pb::volume_capability::access_mode::Mode::SingleNodeWriter,
    );
    let vol = create(&mut d, "ro", 64 * MIB, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/ro");
    let ro = d.path("pods/reader/mount");
    let rw = d.path("pods/writer/mount");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    publish(&mut d, &vol, &staging, &ro, &cap, &pctx, true)
        .await
        .expect("NodePublish readonly");

    let ro_mount = single_mount(&ro);
    assert!(
        ro_mount.is_readonly(),
        "readonly publish is mounted rw: {ro_mount:?}"
    );
    match std::fs::write(ro.join("nope"), b"must not be written") {
        Ok(()) => panic!("writing into a read-only publish succeeded"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "expected EROFS, got {e}"
        ),
    }
    match std::fs::create_dir(ro.join("nodir")) {
        Ok(()) => panic!("mkdir in a read-only publish succeeded"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "expected EROFS, got {e}"
        ),
    }

    let staged = single_mount(&staging);
    assert!(
        !staged.is_readonly(),
        "the read-only publish made the staging mount ro: {staged:?}"
    );
    publish(&mut d, &vol, &staging, &rw, &cap, &pctx, false)
        .await
        .expect("NodePublish rw");
    let rw_mount = single_mount(&rw);
    assert!(
        !rw_mount.is_readonly(),
        "rw publish is mounted ro: {rw_mount:?}"
    );
    std::fs::write(rw.join("through-rw"), b"written through the rw publish")
        .expect("write through rw publish");
    std::fs::write(staging.join("through-staging"), b"staging")
        .expect("write through the staging mount");
    assert_eq!(
        std::fs::read(ro.join("through-rw")).expect("read through the ro publish"),
        b"written through the rw publish"
    );
    // Still read-only after the rw publish of the same filesystem.
    match std::fs::write(ro.join("nope"), b"x") {
        Ok(()) => panic!("the read-only publish became writable after a rw publish"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "expected EROFS, got {e}"
        ),
    }

    unpublish(&mut d, &id, &ro).await;
    unpublish(&mut d, &id, &rw).await;
    unstage(&mut d, &id, &staging).await;
    assert!(!is_mounted(&ro) && !is_mounted(&rw) && !is_mounted(&staging));
}

// ---------------------------------------------------------------------------------------
// 5: online expansion.

async fn controller_expand(
    d: &mut Driver,
    id: &str,
    bytes: i64,
    cap: &pb::VolumeCapability,
) -> pb::ControllerExpandVolumeResponse {
    d.controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner()
}

async fn node_expand(
    d: &mut Driver,
    id: &str,
    path: &Path,
    staging: &Path,
    bytes: i64,
    cap: &pb::VolumeCapability,
) -> Result<i64, tonic::Status> {
    d.node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.to_string(),
            volume_path: path.display().to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

/// Whether this process (and so the driver it starts) has CAP_SYS_RESOURCE, which the kernel
/// requires for growing a mounted ext4 filesystem (EXT4_IOC_RESIZE_FS).
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    eff & (1 << CAP_SYS_RESOURCE) != 0
}

/// A filesystem grown from `before` bytes for a device of `to` bytes has about `to` bytes.
#[track_caller]
fn check_grown(after: u64, before: u64, to: i64) {
    assert!(
        after as u128 * 100 >= to as u128 * 80 && after <= to as u64,
        "after growing to {to} bytes the filesystem has {after} bytes (was {before})"
    );
    assert!(
        after as u128 * 10 >= before as u128 * 18,
        "filesystem barely grew: {before} → {after}"
    );
}

/// Writes more than a volume of `old_size` bytes could ever hold into `dir`.
fn fill_beyond(dir: &Path, old_size: i64, rng: &mut Rng) {
    let big = (old_size + old_size / 4) as usize;
    let chunk = rng.bytes(MIB as usize);
    let path = dir.join("beyond.bin");
    let mut f = std::fs::File::create(&path).expect("create beyond.bin");
    let mut written = 0;
    while written < big {
        std::io::Write::write_all(&mut f, &chunk)
            .unwrap_or_else(|e| panic!("writing {big} bytes after growth: {e}"));
        written += chunk.len();
    }
    f.sync_all().expect("fsync beyond.bin");
}

async fn expand_filesystem(fs: &str, from: i64, to: i64, fill_beyond_old_size: bool) {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time(&format!("expand_{fs}"));
    let cap = mount_cap(fs);
    let vol = create(&mut d, &format!("grow-{fs}"), from, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/grow");
    let target = d.path("pods/p/grow");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish");
    let files = write_files(&target, &mut rng);
    let before = fs_total(&target);
    assert!(
        before <= from as u64,
        "a {from}-byte volume's filesystem has {before} bytes"
    );

    let r = controller_expand(&mut d, &id, to, &cap).await;
    assert!(
        r.capacity_bytes >= to,
        "ControllerExpandVolume returned {} < {to}",
        r.capacity_bytes
    );
    assert!(
        r.node_expansion_required,
        "a filesystem volume needs node expansion"
    );
    assert_eq!(
        std::fs::metadata(&data).expect("stat data file").len(),
        r.capacity_bytes as u64,
        "the replica data file did not grow"
    );

    let expanded = node_expand(&mut d, &id, &target, &staging, to, &cap).await;
    if fs == "ext4" && !has_cap_sys_resource() {
        // The kernel refuses to grow a mounted ext4 without CAP_SYS_RESOURCE: the driver must
        // say so and harm nothing, and the next NodeStage grows it offline, before mounting.
        eprintln!(
            "no CAP_SYS_RESOURCE: checking that online ext4 growth is refused with a reason, \
             and that the next NodeStage grows the filesystem offline"
        );
        match expanded {
            Ok(size) => panic!("NodeExpandVolume succeeded ({size}) without CAP_SYS_RESOURCE"),
            Err(e) => assert!(
                e.message().contains("CAP_SYS_RESOURCE"),
                "the refusal does not name the missing capability: {e:?}"
            ),
        }
        assert_eq!(
            fs_total(&target),
            before,
            "a refused growth changed the filesystem"
        );
        check_files(&target, &files);
        unpublish(&mut d, &id, &target).await;
        unstage(&mut d, &id, &staging).await;
        stage(&mut d, &vol, &staging, &cap, &pctx)
            .await
            .expect("NodeStage after a refused growth");
        check_grown(fs_total(&staging), before, to);
        check_files(&staging, &files);
        if fill_beyond_old_size {
            fill_beyond(&staging, from, &mut rng);
            check_files(&staging, &files);
        }
        unstage(&mut d, &id, &staging).await;
        assert!(
            loops_over(&data).is_empty(),
            "loop device left: {:?}",
            loops_over(&data)
        );
        return;
    }
    let got = expanded.expect("NodeExpandVolume");
    assert_eq!(got, r.capacity_bytes, "NodeExpandVolume capacity");
    let dev = single_mount(&staging).source;
    assert_eq!(
        sysfs_size(&dev),
        r.capacity_bytes as u64,
        "loop device size after NodeExpand"
    );
    let after = fs_total(&target);
    check_grown(after, before, to);
    assert_eq!(
        fs_total(&staging),
        after,
        "the staging mount sees another size"
    );
    let stats = volume_stats(&mut d, &id, &target).await;
    let usage = bytes_usage(&stats);
    assert!(
        usage.total as u128 * 100 >= to as u128 * 80,
        "NodeGetVolumeStats total {} after growing to {to}",
        usage.total
    );
    check_files(&target, &files);

    if fill_beyond_old_size {
        fill_beyond(&target, from, &mut rng);
        check_files(&target, &files);
    }

    unpublish(&mut d, &id, &target).await;
    unstage(&mut d, &id, &staging).await;
    // The grown filesystem comes back grown.
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage after growth");
    assert_eq!(
        fs_total(&staging),
        after,
        "the filesystem size did not persist"
    );
    check_files(&staging, &files);
    unstage(&mut d, &id, &staging).await;
}

#[tokio::test]
async fn expand_ext4_while_published() {
    expand_filesystem("ext4", 64 * MIB, 128 * MIB, true).await;
}

#[tokio::test]
async fn expand_xfs_while_published() {
    expand_filesystem("xfs", 512 * MIB, GIB, false).await;
}

#[tokio::test]
async fn expand_block_while_published() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time("expand_block_while_published");
    let cap = block_cap();
    let vol = create(&mut d, "grow-blk", 64 * MIB, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/grow-blk");
    let target = d.path("pods/p/grow-blk");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish");
    let old = block_pattern(&mut rng, 64 * MIB as u64);
    write_at(&target, &old);
    assert_eq!(device_size(&target), 64 * MIB as u64);

    let r = controller_expand(&mut d, &id, 128 * MIB, &cap).await;
    assert_eq!(r.capacity_bytes, 128 * MIB);
    assert_eq!(
        std::fs::metadata(&data).expect("stat").len(),
        128 * MIB as u64
    );
    let got = node_expand(&mut d, &id, &target, &staging, 128 * MIB, &cap)
        .await
        .expect("NodeExpandVolume (block)");
    assert_eq!(got, 128 * MIB, "NodeExpandVolume capacity");
    assert_eq!(
        device_size(&target),
        128 * MIB as u64,
        "bound device size after NodeExpand"
    );
    let loops = loops_over(&data);
    assert_eq!(loops.len(), 1, "{loops:?}");
    assert_eq!(
        sysfs_size(&loops[0]),
        128 * MIB as u64,
        "loop device size in sysfs"
    );

    check_at(&target, &old);
    let new = vec![
        (100 * MIB as u64, rng.bytes(8192)),
        (128 * MIB as u64 - 4096, rng.bytes(4096)),
    ];
    write_at(&target, &new);
    check_at(&target, &new);
    check_at(&target, &old);

    unpublish(&mut d, &id, &target).await;
    unstage(&mut d, &id, &staging).await;
    check_at(&data, &new);
    check_at(&data, &old);
}

// ---------------------------------------------------------------------------------------
// 6: kill -9 and restart.

#[tokio::test]
async fn kill9_while_published_then_restart() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time("kill9_while_published_then_restart");
    let cap = mount_cap("ext4");
    let vol = create(&mut d, "survivor", 64 * MIB, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/survivor");
    let target = d.path("pods/p/survivor");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish");
    let files = write_files(&target, &mut rng);
    let dev = single_mount(&staging).source;
    let uuid = probe(Path::new(&dev), "UUID");

    d.kill9();
    d.restart().await;

    // Kernel state survives the process.
    assert_eq!(
        single_mount(&staging).source,
        dev,
        "staging mount changed across the restart"
    );
    assert_eq!(
        single_mount(&target).source,
        dev,
        "target mount changed across the restart"
    );
    assert_eq!(
        loops_over(&data),
        vec![dev.clone()],
        "the restart touched the loop device"
    );
    check_files(&target, &files);

    // The restarted driver reads where it stands from the kernel.
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage again after restart (idempotent)");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish again after restart (idempotent)");
    assert_eq!(
        single_mount(&staging).source,
        dev,
        "NodeStage after restart mounted again"
    );
    assert_eq!(
        single_mount(&target).source,
        dev,
        "NodePublish after restart mounted again"
    );
    assert_eq!(
        loops_over(&data),
        vec![dev.clone()],
        "NodeStage after restart attached another loop device"
    );
    assert_eq!(
        probe(Path::new(&dev), "UUID"),
        uuid,
        "the volume was reformatted"
    );
    check_files(&target, &files);

    let stats = volume_stats(&mut d, &id, &target).await;
    let usage = bytes_usage(&stats);
    assert!(
        usage.total > 0 && usage.used >= 5 * MIB,
        "stats after restart: {stats:?}"
    );
    assert_eq!(
        stats.volume_condition.as_ref().map(|c| c.abnormal),
        Some(false),
        "{stats:?}"
    );

    unpublish(&mut d, &id, &target).await;
    unstage(&mut d, &id, &staging).await;
    assert!(
        !is_mounted(&target) && !target.exists(),
        "target left behind"
    );
    assert!(
        !is_mounted(&staging) && !staging.exists(),
        "staging left behind"
    );
    assert!(
        loops_over(&data).is_empty(),
        "loop device left: {:?}",
        loops_over(&data)
    );
    controller_unpublish(&mut d, &id).await;
    delete_volume(&mut d, &id).await.expect("DeleteVolume");
    assert!(
        replica_entries(&d).is_empty(),
        "replica directories left: {:?}",
        replica_entries(&d)
    );
    assert!(list_volumes(&mut d).await.is_empty());
}

#[tokio::test]
async fn kill9_between_creates_keeps_exactly_the_created_volumes() {
    let mut d = Driver::start(&["disk0"]).await;
    let cap = mount_cap("ext4");
    let names = ["keep-a", "Keep B (hashed id)", "keep-c"];
    let mut created: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let v = create(&mut d, name, (16 + i as i64) * MIB, vec![cap.clone()]).await;
        created.insert(name.to_string(), (v.volume_id.clone(), v.capacity_bytes));
        d.kill9();
        d.restart().await;
        let listed = list_volumes(&mut d).await;
        let want: BTreeMap<String, i64> = created.values().cloned().collect();
        assert_eq!(
            listed,
            want,
            "after kill -9 following {} CreateVolume calls",
            i + 1
        );
        for (id, cap_bytes) in &want {
            let file = only_data_file(&d, id);
            assert_eq!(
                std::fs::metadata(&file).expect("stat").len(),
                *cap_bytes as u64
            );
        }
    }
    for (i, name) in names.iter().enumerate() {
        let v = create(&mut d, name, (16 + i as i64) * MIB, vec![cap.clone()]).await;
        let (id, bytes) = &created[*name];
        assert_eq!(
            &v.volume_id, id,
            "CreateVolume({name:?}) after restart returned another id"
        );
        assert_eq!(v.capacity_bytes, *bytes);
    }
    assert_eq!(list_volumes(&mut d).await.len(), names.len());
    assert_eq!(
        replica_entries(&d).len(),
        names.len(),
        "{:?}",
        replica_entries(&d)
    );
}

// ---------------------------------------------------------------------------------------
// 7: kill -9 at random moments during create/delete churn.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Create(String),
    Delete(String),
}

#[derive(Debug, Default)]
struct Churn {
    /// Volumes whose CreateVolume returned and no DeleteVolume was called since.
    live: BTreeSet<String>,
    /// The call that had been sent and not answered.
    in_flight: Option<Op>,
    next: u64,
    done: u64,
    killed: bool,
    /// A call that failed before the kill.
    error: Option<String>,
}

const CHURN_SIZE: i64 = 16 * MIB;

async fn churn(
    mut controller: pb::controller_client::ControllerClient<tonic::transport::Channel>,
    state: Arc<Mutex<Churn>>,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    loop {
        let op = {
            let mut s = state.lock().expect("churn state");
            let live: Vec<String> = s.live.iter().cloned().collect();
            let op = match rng.below(6) {
                0..=2 if !live.is_empty() => {
                    Op::Delete(live[rng.below(live.len() as u64) as usize].clone())
                }
                3 if !live.is_empty() => {
                    Op::Create(live[rng.below(live.len() as u64) as usize].clone())
                }
                _ => {
                    s.next += 1;
                    Op::Create(format!("churn-{}", s.next))
                }
            };
            s.in_flight = Some(op.clone());
            op
        };
        let result = match &op {
            Op::Create(name) => controller
                .create_volume(create_req(
                    name,
                    CHURN_SIZE,
                    vec![mount_cap("ext4")],
                    ONE_REPLICA,
                ))
                .await
                .and_then(|r| match r.into_inner().volume {
                    Some(v) if &v.volume_id == name => Ok(()),
                    other => Err(tonic::Status::internal(format!(
                        "CreateVolume({name:?}) answered {other:?}; churn names are kept as ids"
                    ))),
                }),
            Op::Delete(id) => controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        let mut s = state.lock().expect("churn state");
        match result {
            Ok(()) => {
                match &op {
                    Op::Create(n) => s.live.insert(n.clone()),
                    Op::Delete(n) => s.live.remove(n),
                };
                s.in_flight = None;
                s.done += 1;
            }
            Err(e) => {
                if !s.killed {
                    s.error = Some(format!("{op:?} failed before any kill: {e}"));
                }
                return;
            }
        }
    }
}

/// Checks listed volumes against what is on disk: every listed volume has one replica
/// directory with a data file of its size, and every replica directory on disk belongs to a
/// listed volume or to `excepted`.
#[track_caller]
fn check_disk_matches(
    d: &Driver,
    listed: &BTreeMap<String, i64>,
    excepted: Option<&str>,
    when: &str,
) {
    for (id, bytes) in listed {
        let dirs = replica_dirs(d, id);
        assert_eq!(
            dirs.len(),
            1,
            "{when}: listed volume {id:?} has replica directories {dirs:?}"
        );
        let file = dirs[0].join(DATA_FILE);
        let len = std::fs::metadata(&file)
            .unwrap_or_else(|e| {
                panic!("{when}: listed volume {id:?} has no data file {file:?}: {e}")
            })
            .len();
        assert_eq!(
            len, *bytes as u64,
            "{when}: data file {file:?} is not of the volume's size"
        );
    }
    for entry in replica_entries(d) {
        let owner = replica_volume(&entry);
        let ok = owner
            .as_deref()
            .is_some_and(|v| listed.contains_key(v) || excepted == Some(v));
        assert!(
            ok,
            "{when}: {entry:?} belongs to no listed volume (listed: {:?})",
            listed.keys()
        );
    }
}

#[tokio::test]
async fn kill9_at_random_moments_during_create_delete_churn() {
    let mut d = Driver::start(&["disk0"]).await;
    let mut rng = Rng::from_time("kill9_at_random_moments_during_create_delete_churn");
    let state = Arc::new(Mutex::new(Churn::default()));
    for round in 0..5 {
        let task = tokio::spawn(churn(d.controller.clone(), state.clone(), rng.next_u64()));
        let delay = 50 + rng.below(451);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        state.lock().expect("churn state").killed = true;
        d.kill9();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        d.restart().await;

        let (live, in_flight, done) = {
            let mut s = state.lock().expect("churn state");
            if let Some(e) = &s.error {
                panic!("round {round}: {e}");
            }
            s.killed = false;
            (s.live.clone(), s.in_flight.take(), s.done)
        };
        let when = format!("round {round} (killed after {delay} ms, {done} calls so far, interrupted: {in_flight:?})");
        eprintln!("{when}");
        let listed = list_volumes(&mut d).await;
        let ids: BTreeSet<String> = listed.keys().cloned().collect();
        for (id, bytes) in &listed {
            assert_eq!(
                *bytes, CHURN_SIZE,
                "{when}: {id:?} listed with capacity {bytes}"
            );
        }
        let (maybe_extra, maybe_missing) = match &in_flight {
            Some(Op::Create(n)) => (Some(n.as_str()), None),
            Some(Op::Delete(n)) => (None, Some(n.as_str())),
            None => (None, None),
        };
        for id in &live {
            assert!(
                ids.contains(id) || maybe_missing == Some(id.as_str()),
                "{when}: {id:?}, whose CreateVolume returned, is not listed ({ids:?})"
            );
        }
        for id in &ids {
            assert!(
                live.contains(id) || maybe_extra == Some(id.as_str()),
                "{when}: {id:?} is listed, but neither its CreateVolume returned nor was it interrupted"
            );
        }
        check_disk_matches(&d, &listed, maybe_missing, &when);

        // Retrying the interrupted call converges.
        match &in_flight {
            Some(Op::Create(name)) => {
                let v = d
                    .controller
                    .create_volume(create_req(
                        name,
                        CHURN_SIZE,
                        vec![mount_cap("ext4")],
                        ONE_REPLICA,
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("{when}: retrying CreateVolume({name:?}): {e}"))
                    .into_inner()
                    .volume
                    .expect("volume");
                assert_eq!(&v.volume_id, name);
                state.lock().expect("churn state").live.insert(name.clone());
            }
            Some(Op::Delete(id)) => {
                delete_volume(&mut d, id)
                    .await
                    .unwrap_or_else(|e| panic!("{when}: retrying DeleteVolume({id:?}): {e}"));
                assert!(
                    replica_dirs(&d, id).is_empty(),
                    "{when}: retried DeleteVolume left {:?}",
                    replica_dirs(&d, id)
                );
                state.lock().expect("churn state").live.remove(id);
            }
            None => {}
        }
        let live = state.lock().expect("churn state").live.clone();
        let listed = list_volumes(&mut d).await;
        assert_eq!(
            listed.keys().cloned().collect::<BTreeSet<_>>(),
            live,
            "{when}: after retrying, the listed volumes are not those created and not deleted"
        );
        check_disk_matches(&d, &listed, None, &format!("{when}, after the retry"));
    }
    assert!(
        state.lock().expect("churn state").done > 0,
        "the churn never completed a call"
    );
}

// ---------------------------------------------------------------------------------------
// 8: concurrency.

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let mut d = Driver::start(&["disk0", "disk1"]).await;
    let params: &[(&str, &str)] = &[
        ("numberOfReplicas", "2"),
        ("replicaSoftAntiAffinity", "enabled"),
    ];
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = d.controller.clone();
        let req = create_req("contended", 32 * MIB, vec![mount_cap("ext4")], params);
        tasks.push(tokio::spawn(async move {
            c.create_volume(req)
                .await
                .map(|r| r.into_inner().volume.expect("volume"))
        }));
    }
    let mut ids = BTreeSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("concurrent CreateVolume #{i} failed: {e}"));
        assert_eq!(v.capacity_bytes, 32 * MIB);
        ids.insert(v.volume_id);
    }
    assert_eq!(
        ids.len(),
        1,
        "concurrent CreateVolume calls returned several ids: {ids:?}"
    );
    let id = ids.into_iter().next().expect("one id");
    let listed = list_volumes(&mut d).await;
    assert_eq!(listed.keys().collect::<Vec<_>>(), vec![&id], "ListVolumes");
    let entries = replica_entries(&d);
    assert_eq!(
        entries.len(),
        2,
        "expected the volume's 2 replica directories, found {entries:?}"
    );
    for e in &entries {
        assert_eq!(replica_volume(e).as_deref(), Some(id.as_str()), "{e:?}");
        assert_eq!(
            std::fs::metadata(e.join(DATA_FILE))
                .expect("data file")
                .len(),
            32 * MIB as u64
        );
    }
}

#[tokio::test]
async fn concurrent_stages_of_one_volume_mount_once() {
    let mut d = Driver::start(&["disk0"]).await;
    let cap = mount_cap("ext4");
    let vol = create(&mut d, "stage-race", 64 * MIB, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/race");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut n = d.node.clone();
        let req = pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: pctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move { n.node_stage_volume(req).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        t.await
            .expect("task")
            .unwrap_or_else(|e| panic!("concurrent NodeStage #{i} failed: {e}"));
    }
    let m = single_mount(&staging);
    assert_eq!(m.fstype, "ext4");
    assert_eq!(
        loops_over(&data),
        vec![m.source.clone()],
        "concurrent stages attached several loop devices"
    );
    std::fs::write(staging.join("ok"), b"ok").expect("write into the staged volume");

    unstage(&mut d, &id, &staging).await;
    assert!(!is_mounted(&staging));
    assert!(
        loops_over(&data).is_empty(),
        "loop devices left: {:?}",
        loops_over(&data)
    );
}

// ---------------------------------------------------------------------------------------
// 9: volume condition.

#[tokio::test]
async fn stats_report_a_missing_replica_file_as_abnormal() {
    let mut d = Driver::start(&["disk0"]).await;
    let cap = mount_cap("ext4");
    let vol = create(&mut d, "fragile", 64 * MIB, vec![cap.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &cap).await;
    let staging = d.path("staging/fragile");
    let target = d.path("pods/p/fragile");
    stage(&mut d, &vol, &staging, &cap, &pctx)
        .await
        .expect("NodeStage");
    publish(&mut d, &vol, &staging, &target, &cap, &pctx, false)
        .await
        .expect("NodePublish");

    let healthy = volume_stats(&mut d, &id, &target).await;
    let cond = healthy.volume_condition.clone().expect("volume_condition");
    assert!(
        !cond.abnormal,
        "abnormal before anything went wrong: {cond:?}"
    );

    std::fs::remove_file(&data).expect("delete the replica data file");
    // The loop device keeps the inode alive: the mount still works.
    std::fs::write(target.join("still"), b"works").expect("write after the file was unlinked");

    let stats = volume_stats(&mut d, &id, &target).await;
    let cond = stats.volume_condition.clone().expect("volume_condition");
    assert!(
        cond.abnormal,
        "a volume whose replica file is gone is reported normal: {cond:?}"
    );
    let file = data.display().to_string();
    assert!(
        cond.message.contains(&file),
        "message {:?} does not name {file:?}",
        cond.message
    );
    let on_staging = volume_stats(&mut d, &id, &staging).await;
    assert!(
        on_staging
            .volume_condition
            .as_ref()
            .is_some_and(|c| c.abnormal),
        "the staging path's stats do not report the condition: {on_staging:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 10: a formatted volume is never reformatted.

#[tokio::test]
async fn staging_with_another_filesystem_is_refused() {
    let mut d = Driver::start(&["disk0"]).await;
    let ext4 = mount_cap("ext4");
    let xfs = mount_cap("xfs");
    let vol = create(&mut d, "keep-fs", 512 * MIB, vec![ext4.clone()]).await;
    let id = vol.volume_id.clone();
    let data = only_data_file(&d, &id);
    let pctx = controller_publish(&mut d, &id, &ext4).await;
    let staging = d.path("staging/keep-fs");

    stage(&mut d, &vol, &staging, &ext4, &pctx)
        .await
        .expect("NodeStage ext4");
    std::fs::write(staging.join("precious"), b"do not format me").expect("write");
    fsync_dir(&staging);
    std::fs::File::open(staging.join("precious"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    unstage(&mut d, &id, &staging).await;
    assert_eq!(probe(&data, "TYPE"), "ext4");

    assert_code(
        stage(&mut d, &vol, &staging, &xfs, &pctx).await,
        Code::FailedPrecondition,
        "ext4",
    );
    assert!(
        !is_mounted(&staging),
        "a refused NodeStage left a mount: {:?}",
        mounts_at(&staging)
    );
    assert_eq!(
        probe(&data, "TYPE"),
        "ext4",
        "the refused NodeStage changed the filesystem"
    );

    stage(&mut d, &vol, &staging, &ext4, &pctx)
        .await
        .expect("NodeStage ext4 again");
    assert_eq!(single_mount(&staging).fstype, "ext4");
    assert_eq!(
        std::fs::read(staging.join("precious")).expect("the file is still there"),
        b"do not format me"
    );
    unstage(&mut d, &id, &staging).await;
    assert!(
        loops_over(&data).is_empty(),
        "loop devices left after the refused stage and a final unstage: {:?}",
        loops_over(&data)
    );
}
