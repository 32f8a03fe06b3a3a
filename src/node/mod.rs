//! The node's domain layer: exposes a volume's local replica as a block device, formats it
//! only when blank, mounts it at the staging path, bind-mounts it into pods, reports stats
//! and grows filesystems. What is staged or published is read from the kernel (mountinfo,
//! sysfs), never remembered, so a restarted process knows where it stands.

mod ownership;
use ownership::*;

pub mod blockdev;
pub mod engines;
pub mod mount;
pub mod paths;
pub mod reconcile;

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::locks::KeyLocks;
use crate::model::{AccessMode, AccessType, Capability};
use crate::node::engines::{ClusterLink, EngineHealth};
use crate::replica::{self, ReplicaDir, ReplicaError};
use blockdev::BlockError;
use mount::{MountError, MountInfo};
use paths::{MountOn, PathError, Removal};
use reconcile::Reconciler;

/// The request fields that name paths on the node, as the errors name them.
const STAGING: &str = "staging_target_path";
const TARGET: &str = "target_path";

/// How many mounts stacked at one path the node takes off before it gives up.
const MAX_STACKED: usize = 32;

/// The node this process serves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub zone: Option<String>,
    /// The node's disks: (disk id, directory).
    pub disks: Vec<(String, PathBuf)>,
    pub max_volumes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("volume {volume:?} has no replica on node {node:?}")]
    NoLocalReplica { volume: String, node: String },
    #[error("volume {volume:?} is not staged at {path:?}")]
    NotStaged { volume: String, path: PathBuf },
    #[error("{path:?} is not a path where volume {volume:?} is staged or published")]
    NotMounted { volume: String, path: PathBuf },
    #[error("{path:?} already has {what} mounted, not volume {volume:?} as asked")]
    Incompatible {
        volume: String,
        path: PathBuf,
        what: String,
    },
    #[error("volume {volume:?} holds a {found} filesystem, but {wanted} was asked for; it is never reformatted")]
    FsMismatch {
        volume: String,
        found: String,
        wanted: String,
    },
    #[error("volume {volume:?} is published at {paths:?} already, and access mode {mode:?} allows one (read-write) publication")]
    SingleWriter {
        volume: String,
        mode: AccessMode,
        paths: Vec<PathBuf>,
    },
    #[error("volume {volume:?} is still mounted at {paths:?}; unpublish it there first")]
    StillPublished { volume: String, paths: Vec<PathBuf> },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{field}: volume {volume:?} is mounted at {path:?} beneath {what}, which is not the volume's; the driver does not unmount it: unmount it first, then retry")]
    Covered {
        volume: String,
        field: &'static str,
        path: PathBuf,
        what: String,
    },
    #[error("{field}: volume {volume:?} at {path:?} is busy (files open on it, or something mounted below it) and is not unmounted lazily: stop what uses it (`fuser -vm {path:?}` lists it), then retry")]
    Busy {
        volume: String,
        field: &'static str,
        path: PathBuf,
    },
    #[error("{field}: {path:?}, which the driver made for volume {volume:?}, is not empty now that the volume is unmounted from it (files were written to the node's own disk while nothing was mounted there); it is never removed with its contents: move them away, then retry")]
    MadeNotEmpty {
        volume: String,
        field: &'static str,
        path: PathBuf,
    },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] crate::node::engines::EngineLinkError),
    #[error("node task failed: {0}")]
    Task(String),
}

/// Stats of a staged or published volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub bytes_total: u64,
    pub bytes_available: Option<u64>,
    pub bytes_used: Option<u64>,
    pub inodes: Option<(u64, u64, u64)>,
    /// Some(message) when the volume is abnormal.
    pub abnormal: Option<String>,
}

/// The node's CSI domain service. Every call is idempotent.
pub struct NodeService {
    config: NodeConfig,
    locks: KeyLocks,
    /// Cluster mode: volumes are served by an engine over their member replicas.
    /// Standalone: by a loop device over the local replica file.
    cluster: Option<ClusterLink>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl NodeService {
    pub fn new(config: NodeConfig) -> Self {
        NodeService {
            config,
            locks: KeyLocks::default(),
            cluster: None,
        }
    }

    /// Serves volumes through engines over their members (cluster mode).
    pub fn with_cluster(mut self, link: ClusterLink) -> Self {
        self.cluster = Some(link);
        self
    }

    /// The file the volume's loop device is (or would be) over.
    async fn backing_file(&self, volume_id: &str) -> Result<PathBuf, NodeError> {
        match &self.cluster {
            Some(link) => Ok(link.backing_file(volume_id)),
            None => Ok(self.local_replica(volume_id).await?.data_path()),
        }
    }

    /// What tells the volume's mounts from anything else (see [`VolumeOwner`]).
    async fn owner(&self, volume_id: &str) -> UnresolvedOwner {
        UnresolvedOwner {
            volume: volume_id.to_string(),
            engine_file: self.cluster.as_ref().map(|l| l.backing_file(volume_id)),
            disks: self.config.disks.clone(),
            backing: self.backing_file(volume_id).await.ok(),
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// NodeStageVolume.
    pub async fn stage(
        &self,
        volume_id: &str,
        staging: &Path,
        cap: &Capability,
        mkfs_params: Vec<String>,
        publish_context: &std::collections::HashMap<String, String>,
    ) -> Result<(), NodeError> {
        let _g = self.locks.lock(volume_id).await;
        // Before an engine starts or a device is attached for a path that cannot be used.
        let (path, mounts_fs) = (staging.to_path_buf(), cap.access_type != AccessType::Block);
        blocking(move || check_staging_path(&path, mounts_fs)).await?;
        let (backing, limit) = match &self.cluster {
            Some(link) => {
                let file = link.start(volume_id, publish_context).await?;
                (file, link.size(volume_id).await)
            }
            None => (self.local_replica(volume_id).await?.data_path(), None),
        };
        let (volume, staging, cap) = (volume_id.to_string(), staging.to_path_buf(), cap.clone());
        let torn_down = self.reconciler();
        blocking(move || {
            stage_blocking(&volume, &backing, limit, &staging, &cap, &mkfs_params)?;
            forget_torn_down(torn_down.as_ref(), &volume, &staging);
            Ok(())
        })
        .await
    }

    /// Cluster mode: the record of paths torn down at start-up.
    fn reconciler(&self) -> Option<Reconciler> {
        self.cluster.as_ref().map(ClusterLink::reconciler)
    }

    /// NodeUnstageVolume: unmounts the volume from the staging path, detaches its device and
    /// removes the staging directory if the driver made it. Nothing that is not the
    /// volume's is touched.
    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> Result<(), NodeError> {
        let _g = self.locks.lock(volume_id).await;
        let owner = self.owner(volume_id).await;
        let staging = staging.to_path_buf();
        let torn_down = self.reconciler();
        blocking(move || {
            let key = reconcile::canonical(&staging);
            let owner = owner.resolve()?;
            unstage_blocking(&owner, &staging)?;
            forget_torn_down(torn_down.as_ref(), &owner.volume, &key);
            Ok(())
        })
        .await?;
        if let Some(link) = &self.cluster {
            link.stop(volume_id).await;
        }
        Ok(())
    }

    /// NodePublishVolume: bind-mounts the staged volume at the target.
    pub async fn publish(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        readonly: bool,
    ) -> Result<(), NodeError> {
        let _g = self.locks.lock(volume_id).await;
        let backing = self.backing_file(volume_id).await?;
        let (volume, staging, target, cap) = (
            volume_id.to_string(),
            staging.to_path_buf(),
            target.to_path_buf(),
            cap.clone(),
        );
        let torn_down = self.reconciler();
        blocking(move || {
            publish_blocking(&volume, &backing, &staging, &target, &cap, readonly)?;
            forget_torn_down(torn_down.as_ref(), &volume, &target);
            Ok(())
        })
        .await
    }

    /// NodeUnpublishVolume: unmounts the volume from the target and removes what the driver
    /// made there; OK when already gone. Nothing that is not the volume's is touched.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), NodeError> {
        let _g = self.locks.lock(volume_id).await;
        let owner = self.owner(volume_id).await;
        let target = target.to_path_buf();
        let torn_down = self.reconciler();
        blocking(move || {
            let key = reconcile::canonical(&target);
            let owner = owner.resolve()?;
            unpublish_blocking(&owner, &target)?;
            forget_torn_down(torn_down.as_ref(), &owner.volume, &key);
            Ok(())
        })
        .await
    }

    /// NodeGetVolumeStats for a staged or published path.
    pub async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats, NodeError> {
        let disks = self.config.disks.clone();
        let engine = match &self.cluster {
            Some(link) => Some(EngineView {
                file: link.backing_file(volume_id),
                health: link.health(volume_id).await,
                torn_down: link.reconciler(),
            }),
            None => None,
        };
        let (volume, path) = (volume_id.to_string(), path.to_path_buf());
        blocking(move || stats_blocking(&volume, &disks, engine.as_ref(), &path)).await
    }

    /// NodeExpandVolume: refreshes the device size and grows the filesystem mounted at
    /// `path` (if any). Returns the device's size.
    pub async fn expand(&self, volume_id: &str, path: &Path) -> Result<u64, NodeError> {
        let _g = self.locks.lock(volume_id).await;
        let backing = self.backing_file(volume_id).await?;
        // An engine's export is larger than the volume: the device shows what it serves.
        let limit = match &self.cluster {
            Some(link) => link.size(volume_id).await,
            None => None,
        };
        let (volume, path) = (volume_id.to_string(), path.to_path_buf());
        blocking(move || expand_blocking(&volume, &backing, limit, &path)).await
    }

    /// The replica of `volume_id` on this node's disks (the lowest replica id when there
    /// are several).
    pub async fn local_replica(&self, volume_id: &str) -> Result<ReplicaDir, NodeError> {
        let disks = self.config.disks.clone();
        let (volume, node) = (volume_id.to_string(), self.config.node_id.clone());
        blocking(move || {
            let mut found: Vec<ReplicaDir> = Vec::new();
            for (_, disk) in &disks {
                found.extend(
                    replica::list(disk)?
                        .into_iter()
                        .filter(|r| r.volume_id == volume),
                );
            }
            found.sort_by(|a, b| a.id.cmp(&b.id));
            found
                .into_iter()
                .next()
                .ok_or(NodeError::NoLocalReplica { volume, node })
        })
        .await
    }

    /// Start-up reconciliation: in cluster mode, tears down the data path of every volume
    /// whose engine died with an earlier process (see `node::reconcile`); then detaches loop
    /// devices over replica files of this node's disks whose replica no longer exists and
    /// which nothing mounts.
    pub async fn reconcile(&self) -> Result<(), NodeError> {
        if let Some(link) = &self.cluster {
            link.tear_down_stale().await;
        }
        let disks = self.config.disks.clone();
        blocking(move || {
            let mounts = mount::read_mountinfo()?;
            for (dev, backing) in blockdev::list_loops()? {
                let ours = disks.iter().any(|(_, d)| backing.starts_with(d.join("replicas")));
                if !ours {
                    continue;
                }
                let in_use = mounts.iter().any(|m| Path::new(&m.source) == dev);
                if backing.exists() || in_use {
                    continue;
                }
                warn!(device = %dev.display(), backing = %backing.display(), "detaching a loop device whose replica is gone");
                blockdev::detach_loop(&dev)?;
            }
            Ok(())
        })
        .await
    }
}

/// `limit`: the bytes of `backing` the device shows (an engine's export, larger than the
/// volume so that it can grow online); None for all of it.
fn stage_blocking(
    volume: &str,
    backing: &Path,
    limit: Option<u64>,
    staging: &Path,
    cap: &Capability,
    mkfs_params: &[String],
) -> Result<(), NodeError> {
    let dev = match limit {
        Some(limit) => blockdev::attach_loop_limited(backing, limit)?,
        None => blockdev::attach_loop(backing)?,
    };
    let AccessType::Mount {
        fs_type,
        mount_flags,
    } = &cap.access_type
    else {
        // Block: the attached device is the staged state; publish binds it.
        info!(volume, device = %dev.display(), "block volume staged");
        return Ok(());
    };
    let readonly = cap.access_mode == crate::model::AccessMode::SingleNodeReaderOnly;
    if let Some(m) = mount::mounts_at(staging)?.last() {
        if loop_behind(staging)? != Some(device_numbers(&dev)?) {
            return Err(NodeError::Incompatible {
                volume: volume.to_string(),
                path: staging.to_path_buf(),
                what: m.source.clone(),
            });
        }
        if &m.fs_type != fs_type || m.is_read_only() != readonly {
            return Err(NodeError::Incompatible {
                volume: volume.to_string(),
                path: staging.to_path_buf(),
                what: format!(
                    "this volume as {}{}",
                    m.fs_type,
                    if m.is_read_only() {
                        ", read-only"
                    } else {
                        ", read-write"
                    }
                ),
            });
        }
        return Ok(());
    }
    paths::prepare_mount_point(STAGING, staging, MountOn::Dir, volume)?;
    match blockdev::detect_fs(&dev)? {
        Some(found) if &found != fs_type => {
            return Err(NodeError::FsMismatch {
                volume: volume.to_string(),
                found,
                wanted: fs_type.clone(),
            })
        }
        Some(found) => {
            // A volume expanded while it was not staged: grow ext4 before mounting (no
            // capability needed offline); xfs only grows mounted, below.
            if found == "ext4"
                && !readonly
                && blockdev::device_size(&dev)?.saturating_sub(blockdev::ext4_size(&dev)?)
                    >= 1 << 20
            {
                info!(volume, device = %dev.display(), "growing ext4 to its device before mounting");
                blockdev::grow_ext4_offline(&dev)?;
            }
        }
        None => {
            info!(volume, device = %dev.display(), fs = %fs_type, "formatting a blank volume");
            blockdev::make_fs(&dev, fs_type, mkfs_params)?;
        }
    }
    mount::mount_fs(&dev, staging, fs_type, mount_flags, readonly)?;
    if fs_type == "xfs" && !readonly {
        blockdev::grow_fs(&dev, staging, fs_type)?;
    }
    info!(volume, device = %dev.display(), staging = %staging.display(), "volume staged");
    Ok(())
}

/// Forgets a path torn down at start-up once the kubelet has staged, published, unpublished
/// or unstaged it; a failure only leaves a stale record (logged).
fn forget_torn_down(torn_down: Option<&Reconciler>, volume: &str, path: &Path) {
    if let Some(r) = torn_down {
        if let Err(e) = r.forget(volume, path) {
            warn!(volume, path = %path.display(), error = %e, "cannot update the record of torn-down paths");
        }
    }
}

/// NodeStage's look at its path before anything is set up: no symbolic link in it, and for
/// a filesystem, where nothing is mounted yet, an empty directory or nothing (see
/// node/paths.rs). A retried stage finds the volume mounted there: stage_blocking decides.
fn check_staging_path(staging: &Path, mounts_fs: bool) -> Result<(), NodeError> {
    paths::check_no_symlinks(STAGING, staging)?;
    if !mounts_fs || mount::is_mount_point(staging)? {
        return Ok(());
    }
    let found = paths::inspect(staging).map_err(io("inspect staging directory", staging))?;
    paths::may_mount_on(found, MountOn::Dir).map_err(|why| PathError::NotUsable {
        field: STAGING,
        path: staging.to_path_buf(),
        why,
        wanted: "an empty directory",
    })?;
    Ok(())
}

fn publish_blocking(
    volume: &str,
    backing: &Path,
    staging: &Path,
    target: &Path,
    cap: &Capability,
    readonly: bool,
) -> Result<(), NodeError> {
    paths::check_no_symlinks(TARGET, target)?;
    paths::check_no_symlinks(STAGING, staging)?;
    let not_staged = || NodeError::NotStaged {
        volume: volume.to_string(),
        path: staging.to_path_buf(),
    };
    let dev = blockdev::find_loop_for(backing)?.ok_or_else(not_staged)?;
    let numbers = device_numbers(&dev)?;
    let (source, is_block) = match &cap.access_type {
        AccessType::Block => (dev.clone(), true),
        AccessType::Mount { .. } => {
            if loop_behind(staging)? != Some(numbers) {
                return Err(not_staged());
            }
            (staging.to_path_buf(), false)
        }
    };
    // Already published here: the same publish is OK, a different one is not.
    if let Some(existing) = mount::mounts_at(target)?.last() {
        let same_volume = loop_behind(target)? == Some(numbers);
        if same_volume && existing.is_read_only() == readonly {
            return Ok(());
        }
        return Err(NodeError::Incompatible {
            volume: volume.to_string(),
            path: target.to_path_buf(),
            what: if same_volume {
                format!(
                    "this volume {}",
                    if existing.is_read_only() {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )
            } else {
                existing.source.clone()
            },
        });
    }
    // SINGLE_NODE_SINGLE_WRITER: one publication in all. SINGLE_NODE_WRITER: one read-write
    // publication (read-only ones may sit beside it).
    let exclusive = match cap.access_mode {
        AccessMode::SingleNodeSingleWriter => true,
        AccessMode::SingleNodeWriter => !readonly,
        _ => false,
    };
    if exclusive {
        let staging_real = std::fs::canonicalize(staging).unwrap_or_else(|_| staging.to_path_buf());
        let elsewhere: Vec<PathBuf> = mount::find_mounts_of_source(&dev)?
            .into_iter()
            .filter(|m| m.mount_point != staging_real)
            .filter(|m| cap.access_mode == AccessMode::SingleNodeSingleWriter || !m.is_read_only())
            .map(|m| m.mount_point)
            .collect();
        if !elsewhere.is_empty() {
            return Err(NodeError::SingleWriter {
                volume: volume.to_string(),
                mode: cap.access_mode,
                paths: elsewhere,
            });
        }
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io("create target parent", parent))?;
    }
    let on = if is_block {
        MountOn::File
    } else {
        MountOn::Dir
    };
    paths::prepare_mount_point(TARGET, target, on, volume)?;
    mount::bind_mount(&source, target, readonly).map_err(|e| match e {
        MountError::Occupied { what, .. } => NodeError::Incompatible {
            volume: volume.to_string(),
            path: target.to_path_buf(),
            what,
        },
        other => NodeError::Mount(other),
    })?;
    info!(volume, target = %target.display(), readonly, "volume published");
    Ok(())
}

/// What NodeGetVolumeStats needs to know of a volume's engine (cluster mode).
struct EngineView {
    /// The file its loop device is over.
    file: PathBuf,
    health: EngineHealth,
    torn_down: Reconciler,
}

fn stats_blocking(
    volume: &str,
    disks: &[(String, PathBuf)],
    engine: Option<&EngineView>,
    path: &Path,
) -> Result<VolumeStats, NodeError> {
    let not_here = || NodeError::NotMounted {
        volume: volume.to_string(),
        path: path.to_path_buf(),
    };
    // Which volume is mounted at `path` is read from the kernel: the loop device behind
    // the mount and the replica file (or the engine's FUSE file) behind the loop device.
    let Some(numbers) = loop_behind(path)? else {
        // Nothing mounted: a path torn down at start-up (its engine died with an earlier
        // process) is abnormal until the kubelet unpublishes or unstages it.
        let reason = engine.and_then(|e| e.torn_down.torn_down_reason(volume, path));
        return match reason {
            Some(reason) => Ok(VolumeStats {
                bytes_total: 0,
                bytes_available: None,
                bytes_used: None,
                inodes: None,
                abnormal: Some(reason),
            }),
            None => Err(not_here()),
        };
    };
    let (backing, deleted) = loop_backing(numbers).ok_or_else(not_here)?;
    let abnormal = match engine.filter(|e| e.file == backing) {
        Some(e) => match &e.health {
            EngineHealth::Serving => None,
            EngineHealth::Stopped(reason) => Some(reason.clone()),
            EngineHealth::Gone => Some(crate::node::engines::gone_message(volume)),
        },
        None if is_replica_file_of(&backing, volume, disks) => deleted.then(|| {
            format!("the replica data file {backing:?} is missing: the volume is served from a deleted file and will not survive detaching")
        }),
        None => return Err(not_here()),
    };
    let meta = std::fs::metadata(path).map_err(|_| not_here())?;
    if meta.is_dir() {
        let s = mount::stats(path)?;
        return Ok(VolumeStats {
            bytes_total: s.bytes_total,
            bytes_available: Some(s.bytes_available),
            bytes_used: Some(s.bytes_used),
            inodes: Some((s.inodes_total, s.inodes_free, s.inodes_used)),
            abnormal,
        });
    }
    Ok(VolumeStats {
        bytes_total: blockdev::device_size(path)?,
        bytes_available: None,
        bytes_used: None,
        inodes: None,
        abnormal,
    })
}

fn expand_blocking(
    volume: &str,
    backing: &Path,
    limit: Option<u64>,
    path: &Path,
) -> Result<u64, NodeError> {
    let not_here = || NodeError::NotMounted {
        volume: volume.to_string(),
        path: path.to_path_buf(),
    };
    let dev = blockdev::find_loop_for(backing)?.ok_or_else(not_here)?;
    if loop_behind(path)? != Some(device_numbers(&dev)?) {
        return Err(not_here());
    }
    match limit {
        // Never below what the device shows already (a device does not shrink).
        Some(limit) => blockdev::set_loop_limit(&dev, limit.max(blockdev::device_size(&dev)?))?,
        None => blockdev::refresh_loop_capacity(&dev)?,
    }
    if path.is_dir() {
        if let Some(fs) = blockdev::detect_fs(&dev)? {
            blockdev::grow_fs(&dev, path, &fs)?;
        }
    }
    let size = blockdev::device_size(&dev)?;
    info!(volume, size, "volume expanded on the node");
    Ok(size)
}
