//! Shared harness for the end-to-end tests: starts the real `palisade standalone` binary on
//! a private state directory and socket, and talks CSI to it over that socket. The
//! multi-process cluster harness (controller, nodes, ctl) is in [`cluster`], and a real
//! Kubernetes control plane (etcd, kube-apiserver, ...) in [`k8s`].
#![allow(dead_code)]

pub mod cluster;
pub mod e2e;
pub mod failover;
pub mod k8s;
pub mod kubelet;
pub mod sidecars;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade::csi::v1 as pb;
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;

pub const GIB: i64 = 1 << 30;
pub const MIB: i64 = 1 << 20;

/// A running standalone driver.
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub disks: Vec<String>,
    pub node_id: String,
    child: Option<Child>,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Driver {
    /// Starts a driver with `disks` disk directories (tags as `name:tag,tag` suffixes).
    /// Each disk is a private tmpfs (16 GiB limit; only written bytes use memory), so that
    /// placement's free-space rules see the same disks whatever the host's disk holds.
    pub async fn start(disks: &[&str]) -> Driver {
        Driver::start_on_tmpfs(disks, 16 << 30).await
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path under the driver's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts the driver again on the same state, disks and socket.
    pub async fn restart(&mut self) {
        self.kill9();
        let (child, channel) =
            spawn(self.dir.path(), &self.socket, &self.disks, &self.node_id).await;
        self.child = Some(child);
        self.identity = IdentityClient::new(channel.clone());
        self.controller = ControllerClient::new(channel.clone());
        self.node = NodeClient::new(channel);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
        cleanup_under(self.dir.path());
    }
}

/// Unmounts every mount under `root` (deepest first) and detaches loop devices whose
/// backing file is under it, so that a failed test leaves nothing behind.
pub fn cleanup_under(root: &Path) {
    let root_s = root.display().to_string();
    // Volumes first, then the loop devices (which keep their tmpfs disks busy), then the
    // disks themselves.
    unmount_under(&root_s);
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let backing = e.path().join("loop/backing_file");
            if let Ok(b) = std::fs::read_to_string(&backing) {
                if b.trim().starts_with(&root_s) {
                    let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                    let _ = Command::new("losetup").args(["-d", &dev]).status();
                }
            }
        }
    }
    unmount_under(&root_s);
}

/// Unmounts every mount point under `root`, deepest first; failures are left for a retry.
fn unmount_under(root: &str) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(|p| p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount")
            .arg(&p)
            .stderr(Stdio::null())
            .status();
    }
}

async fn spawn(dir: &Path, socket: &Path, disks: &[String], node_id: &str) -> (Child, Channel) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.arg("standalone")
        .arg("--state-dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--node-id")
        .arg(node_id)
        .env(
            "RUST_LOG",
            std::env::var("PALISADE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null());
    for d in disks {
        cmd.arg("--disk").arg(d);
    }
    let mut child = cmd.spawn().expect("spawn palisade");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = palisade::csi::connect(socket).await {
            let mut id = IdentityClient::new(channel.clone());
            if let Ok(r) = id.probe(pb::ProbeRequest {}).await {
                if r.into_inner().ready == Some(true) {
                    return (child, channel);
                }
            }
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let status = child.wait();
            panic!("driver did not become ready on {socket:?} (exit: {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn mount_cap(fs: &str) -> pb::VolumeCapability {
    cap(
        pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: fs.to_string(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        pb::volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn block_cap() -> pb::VolumeCapability {
    cap(
        pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {}),
        pb::volume_capability::access_mode::Mode::SingleNodeWriter,
    )
}

pub fn cap(
    access_type: pb::volume_capability::AccessType,
    mode: pb::volume_capability::access_mode::Mode,
) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create_req(
    name: &str,
    bytes: i64,
    caps: Vec<pb::VolumeCapability>,
    p: &[(&str, &str)],
) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: caps,
        parameters: params(p),
        ..Default::default()
    }
}

/// Creates a 1-replica volume and returns it.
pub async fn create(
    d: &mut Driver,
    name: &str,
    bytes: i64,
    caps: Vec<pb::VolumeCapability>,
) -> pb::Volume {
    d.controller
        .create_volume(create_req(name, bytes, caps, &[("numberOfReplicas", "1")]))
        .await
        .expect("create_volume")
        .into_inner()
        .volume
        .expect("volume in response")
}

/// Asserts a gRPC error with `code` whose message contains `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}

/// Mount points currently under `path` per the kernel.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.display().to_string().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

impl Driver {
    /// Starts a driver whose disks are each a private tmpfs of `bytes` bytes, mounted before
    /// the driver starts, so that capacity figures are small, known and untouched by other
    /// tests. The mounts go away with the driver (`cleanup_under`). Loop devices over files on
    /// a tmpfs keep it busy until they are detached; `cleanup_under` detaches them first.
    pub async fn start_on_tmpfs(disks: &[&str], bytes: u64) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("palisade-test-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("csi.sock");
        let mut args = Vec::new();
        for d in disks {
            let (name, tags) = match d.split_once(':') {
                Some((name, tags)) => (name, Some(tags)),
                None => (*d, None),
            };
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).expect("create disk directory");
            let status = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={bytes}"),
                    "palisade-test",
                ])
                .arg(&path)
                .status()
                .expect("run mount");
            assert!(status.success(), "mounting a tmpfs at {path:?} failed");
            args.push(match tags {
                Some(tags) => format!("{}:{tags}", path.display()),
                None => path.display().to_string(),
            });
        }
        let node_id = "node-1".to_string();
        let (child, channel) = spawn(dir.path(), &socket, &args, &node_id).await;
        Driver {
            socket,
            disks: args,
            node_id,
            child: Some(child),
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            dir,
        }
    }

    /// The directory of the `i`th disk (without its tags).
    pub fn disk_dir(&self, i: usize) -> PathBuf {
        let d = &self.disks[i];
        PathBuf::from(d.split_once(':').map_or(d.as_str(), |(path, _)| path))
    }
}
