//! What at a path on the node is a volume's own: the loop device behind a mount and the file
//! behind that loop device (the volume's engine file or one of its replica files), and so
//! what NodeUnpublish and NodeUnstage may unmount and remove. Nothing that is not the
//! volume's is ever touched.

use super::*;

/// The (major, minor) of a block device node.
pub(super) fn device_numbers(dev: &Path) -> Result<(u64, u64), NodeError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev)
        .map_err(io("inspect device", dev))?
        .rdev();
    Ok((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
}

/// The block device behind `path`, read from the kernel: the device node itself when `path`
/// is one (a block volume's bind-mounted target), else the device of the filesystem
/// mounted at `path`. None when nothing is mounted there.
pub(super) fn loop_behind(path: &Path) -> Result<Option<(u64, u64)>, NodeError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mounts = mount::mounts_at(path)?;
    let Some(top) = mounts.last() else {
        return Ok(None);
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => Ok(Some((
            nix::sys::stat::major(meta.rdev()),
            nix::sys::stat::minor(meta.rdev()),
        ))),
        _ => Ok(Some((
            u64::from(top.major_minor.0),
            u64::from(top.major_minor.1),
        ))),
    }
}

/// The replica data file a loop device serves, from sysfs, and whether it was deleted.
pub(super) fn loop_backing(numbers: (u64, u64)) -> Option<(PathBuf, bool)> {
    let raw = std::fs::read_to_string(format!(
        "/sys/dev/block/{}:{}/loop/backing_file",
        numbers.0, numbers.1
    ))
    .ok()?;
    let raw = raw.trim_end_matches('\n');
    Some(match raw.strip_suffix(" (deleted)") {
        Some(p) => (PathBuf::from(p), true),
        None => {
            let p = PathBuf::from(raw);
            let gone = !p.exists();
            (p, gone)
        }
    })
}

/// True when `backing` is a data file of one of `volume`'s replicas on these disks.
pub(super) fn is_replica_file_of(
    backing: &Path,
    volume: &str,
    disks: &[(String, PathBuf)],
) -> bool {
    let Some(replica_id) = backing
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
    else {
        return false;
    };
    let ours = replica_id
        .strip_prefix(volume)
        .and_then(|rest| rest.strip_prefix("-r-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    ours && disks
        .iter()
        .any(|(_, d)| backing == replica::replica_dir(d, replica_id).join(replica::DATA_FILE))
}

/// The loop device over `backing`. A file on a dead FUSE mount (its engine is gone) cannot
/// be resolved (ENOTCONN): then the path is matched as the kernel names it.
pub(super) fn loop_over(backing: &Path) -> Result<Option<PathBuf>, NodeError> {
    match blockdev::find_loop_for(backing) {
        Ok(found) => Ok(found),
        Err(e) => {
            warn!(file = %backing.display(), error = %e, "cannot resolve the loop device's file; matching its path as it is");
            Ok(reconcile::loops_over(backing, &blockdev::list_loops()?)
                .into_iter()
                .next())
        }
    }
}

/// What tells a volume's mounts from anything else on this node, before its loop device is
/// looked up (in a blocking task: [`UnresolvedOwner::resolve`]).
pub(super) struct UnresolvedOwner {
    pub(super) volume: String,
    /// Cluster mode: the engine's FUSE file its loop device is over.
    pub(super) engine_file: Option<PathBuf>,
    /// The node's disks: a loop device over one of the volume's replica files there is the
    /// volume's (standalone), even once the file is deleted.
    pub(super) disks: Vec<(String, PathBuf)>,
    /// The file its loop device is over now, when the volume is known here.
    pub(super) backing: Option<PathBuf>,
}

impl UnresolvedOwner {
    pub(super) fn resolve(self) -> Result<VolumeOwner, NodeError> {
        let device = match &self.backing {
            Some(b) => loop_over(b)?,
            None => None,
        };
        let device = match device {
            Some(dev) => Some((device_numbers(&dev)?, dev)),
            None => None,
        };
        Ok(VolumeOwner {
            volume: self.volume,
            engine_file: self.engine_file,
            disks: self.disks,
            device,
        })
    }
}

/// What tells a volume's mounts from anything else on this node, read from the kernel: a
/// mount is the volume's when its device is the volume's loop device, or a loop device over
/// one of the volume's files (its engine's FUSE file, its replica files on these disks).
pub(super) struct VolumeOwner {
    pub(super) volume: String,
    pub(super) engine_file: Option<PathBuf>,
    pub(super) disks: Vec<(String, PathBuf)>,
    /// Its loop device, when one is attached: (major, minor) and the device node.
    pub(super) device: Option<((u64, u64), PathBuf)>,
}

/// What is mounted on top at a path, as far as a volume is concerned.
pub(super) enum AtPath {
    Nothing,
    TheVolume,
    /// Something else: its source and filesystem type.
    Other(String),
}

impl VolumeOwner {
    /// Whether the block device `numbers` is the volume's.
    pub(super) fn owns_device(&self, numbers: (u64, u64)) -> bool {
        if self.device.as_ref().is_some_and(|(n, _)| *n == numbers) {
            return true;
        }
        loop_backing(numbers).is_some_and(|(backing, _)| {
            self.engine_file.as_deref() == Some(backing.as_path())
                || is_replica_file_of(&backing, &self.volume, &self.disks)
        })
    }

    /// Whether a mount (one lower in a stack, which the path does not show) is the volume's:
    /// its filesystem, or a bind mount of its device node (a raw block publication).
    pub(super) fn owns_mount(&self, m: &MountInfo) -> bool {
        let (major, minor) = m.major_minor;
        if self.owns_device((u64::from(major), u64::from(minor))) {
            return true;
        }
        m.fs_type == "devtmpfs"
            && self.device.as_ref().is_some_and(|(_, dev)| {
                dev.file_name()
                    .is_some_and(|name| m.root == Path::new("/").join(name))
            })
    }

    /// What is mounted on top at `path`.
    pub(super) fn at(&self, path: &Path) -> Result<AtPath, NodeError> {
        let Some(top) = mount::mounts_at(path)?.pop() else {
            return Ok(AtPath::Nothing);
        };
        Ok(match loop_behind(path)? {
            None => AtPath::Nothing,
            Some(numbers) if self.owns_device(numbers) => AtPath::TheVolume,
            Some(_) => AtPath::Other(format!("{} ({})", top.source, top.fs_type)),
        })
    }

    /// Unmounts the volume's mounts stacked at `path`, top first, and nothing else. A mount
    /// that is not the volume's is left as it is, and so is the path: it is returned,
    /// unless one of the volume's is beneath it (an error: it cannot be reached without
    /// touching the other).
    pub(super) fn unmount_at(
        &self,
        field: &'static str,
        path: &Path,
    ) -> Result<Option<String>, NodeError> {
        for _ in 0..MAX_STACKED {
            match self.at(path)? {
                AtPath::Nothing => return Ok(None),
                AtPath::TheVolume => {
                    mount::unmount_top(path).map_err(|e| match e {
                        MountError::Busy { .. } => NodeError::Busy {
                            volume: self.volume.clone(),
                            field,
                            path: path.to_path_buf(),
                        },
                        other => NodeError::Mount(other),
                    })?;
                }
                AtPath::Other(what) => {
                    let mounts = mount::mounts_at(path)?;
                    if mounts.iter().rev().skip(1).any(|m| self.owns_mount(m)) {
                        return Err(NodeError::Covered {
                            volume: self.volume.clone(),
                            field,
                            path: path.to_path_buf(),
                            what,
                        });
                    }
                    return Ok(Some(what));
                }
            }
        }
        Err(MountError::TooManyStacked {
            target: path.to_path_buf(),
        }
        .into())
    }
}

/// NodeUnpublish: the volume's mounts at the target come off, then the target goes if the
/// driver made it for the volume (node/paths.rs); anything else there stays as it is.
pub(super) fn unpublish_blocking(owner: &VolumeOwner, target: &Path) -> Result<(), NodeError> {
    let volume = owner.volume.as_str();
    paths::check_no_symlinks(TARGET, target)?;
    if let Some(what) = owner.unmount_at(TARGET, target)? {
        warn!(volume, target = %target.display(), %what, "target_path has something mounted that is not this volume's; it is left as it is");
        return Ok(());
    }
    match paths::remove_made_for(TARGET, target, volume)? {
        Removal::Gone | Removal::Removed => {}
        Removal::NotMade => {
            info!(volume, target = %target.display(), "target_path was not made by the driver for this volume; it is left in place");
        }
        Removal::NotEmpty => {
            return Err(NodeError::MadeNotEmpty {
                volume: volume.to_string(),
                field: TARGET,
                path: target.to_path_buf(),
            })
        }
    }
    info!(volume, target = %target.display(), "volume unpublished");
    Ok(())
}

/// NodeUnstage: the volume's mounts at the staging path come off, its device is detached
/// once nothing mounts it, and the staging directory goes if the driver made it for the
/// volume and it is empty; anything else there stays as it is.
pub(super) fn unstage_blocking(owner: &VolumeOwner, staging: &Path) -> Result<(), NodeError> {
    let volume = owner.volume.as_str();
    paths::check_no_symlinks(STAGING, staging)?;
    let left = owner.unmount_at(STAGING, staging)?;
    if let Some((_, dev)) = &owner.device {
        let users: Vec<PathBuf> = mount::read_mountinfo()?
            .into_iter()
            .filter(|m| Path::new(&m.source) == dev)
            .map(|m| m.mount_point)
            .collect();
        if !users.is_empty() {
            return Err(NodeError::StillPublished {
                volume: volume.to_string(),
                paths: users,
            });
        }
        blockdev::detach_loop(dev)?;
    }
    match left {
        Some(what) => {
            warn!(volume, staging = %staging.display(), %what, "staging_target_path has something mounted that is not this volume's; it is left as it is");
        }
        None => match paths::remove_made_for(STAGING, staging, volume)? {
            Removal::Gone | Removal::Removed | Removal::NotMade => {}
            Removal::NotEmpty => {
                warn!(volume, staging = %staging.display(), "the staging directory the driver made is not empty (files were written to the node's own disk while nothing was mounted there); it is left in place");
            }
        },
    }
    info!(volume, staging = %staging.display(), "volume unstaged");
    Ok(())
}
