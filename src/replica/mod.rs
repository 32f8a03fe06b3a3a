//! Replica files on a node's disk, and the disk's own identity.
//!
//! A disk is a directory. It holds `palisade-disk.json` (the disk's stable id) and
//! `replicas/<replica id>/`, each with a sparse data file `volume.img` of the volume's size and
//! a metadata file `replica.json` (format version, ids, size, epoch, state, creation time).
//!
//! Every change is crash-safe and every operation idempotent, so a re-run after a crash at any
//! point converges:
//! - a replica is built under `replicas/.creating-<id>` and renamed into place only when whole,
//!   so `replicas/<id>` always holds a complete replica;
//! - metadata is rewritten atomically (temp file, fsync, rename, fsync of the directory);
//! - a delete first renames the replica to `replicas/.deleting-<id>`, so a half-removed replica
//!   is never mistaken for a valid one.
//!
//! [`list`] removes the leftovers of interrupted creates and deletes. Changes on one disk are
//! serialised by an advisory lock (`replicas/.lock`, flock), across threads and processes.
//! The functions block on file I/O; async callers wrap them in `spawn_blocking`.

pub mod agent;
pub mod client;
pub mod durable;
pub mod extents;
pub mod io;
pub mod layers;
pub mod server;
pub mod token;
pub mod wire;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory of a disk that holds its replicas.
pub const REPLICAS_DIR: &str = "replicas";
/// The file, in a disk's directory, that keeps the disk's id.
pub const DISK_MARKER_FILE: &str = "palisade-disk.json";
/// A replica's data file, in its directory.
pub const DATA_FILE: &str = "volume.img";
/// A replica's metadata file, in its directory.
pub const METADATA_FILE: &str = "replica.json";
/// The longest replica id: it must fit a file name (255 bytes) with a `.deleting-` prefix.
pub const MAX_ID_LEN: usize = 255 - DELETING_PREFIX.len();

const FORMAT_VERSION: u32 = 1;
const LOCK_FILE: &str = ".lock";
const CREATING_PREFIX: &str = ".creating-";
const DELETING_PREFIX: &str = ".deleting-";

/// What the node knows of a replica's data. The volume's membership in the store decides
/// which replicas serve it; this records, on the disk itself, whether a rebuild is under way.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaDataState {
    /// Holds the volume's data as of its epoch (a new replica of a new volume, all zeros, is).
    Complete,
    /// Being filled by a rebuild; its data is incomplete until the rebuild finishes.
    Rebuilding,
}

/// A replica present on a disk, as its metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaDir {
    pub id: String,
    pub volume_id: String,
    /// The volume's size in bytes; the data file is at least this long.
    pub size: u64,
    /// The highest attachment epoch the replica has accepted.
    pub epoch: u64,
    pub state: ReplicaDataState,
    /// Milliseconds since the Unix epoch when the replica was created.
    pub created_ms: u64,
    /// The replica's directory, `<disk>/replicas/<id>`.
    pub dir: PathBuf,
}

impl ReplicaDir {
    /// The sparse data file holding the volume's bytes.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    /// The metadata file.
    pub fn metadata_path(&self) -> PathBuf {
        self.dir.join(METADATA_FILE)
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            format_version: FORMAT_VERSION,
            replica_id: self.id.clone(),
            volume_id: self.volume_id.clone(),
            size: self.size,
            epoch: self.epoch,
            state: self.state,
            created_ms: self.created_ms,
        }
    }
}

/// A disk's identity and capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Stable across restarts: kept in the disk's marker file.
    pub id: String,
    /// Total bytes of the filesystem the disk lives on.
    pub storage_maximum: u64,
    /// Bytes available to unprivileged users on that filesystem now.
    pub storage_available: u64,
}

/// Why a replica or disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{what} {id:?} cannot be used: {reason}")]
    InvalidId {
        what: &'static str,
        id: String,
        reason: &'static str,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is malformed: {source}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not a valid replica: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "replica {:?} already exists at {} for volume {:?} of {} bytes, not for volume {:?} \
         of {} bytes",
        .0.id, .0.path.display(), .0.existing_volume_id, .0.existing_size, .0.volume_id, .0.size
    )]
    Mismatch(Box<Mismatch>),
    #[error("replica {id:?} does not exist on disk {disk}")]
    NotFound { id: String, disk: PathBuf },
    #[error("replica {id:?} is {size} bytes and cannot shrink to {requested}")]
    Shrink {
        id: String,
        size: u64,
        requested: u64,
    },
    #[error("replica {id:?} has accepted epoch {current}; refusing the lower epoch {requested}")]
    EpochLowered {
        id: String,
        current: u64,
        requested: u64,
    },
    #[error("cannot read the capacity of the filesystem of {path}: {source}")]
    Capacity {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

/// A replica that exists with another volume or size than a create asked for.
#[derive(Debug)]
pub struct Mismatch {
    pub id: String,
    pub path: PathBuf,
    pub existing_volume_id: String,
    pub existing_size: u64,
    pub volume_id: String,
    pub size: u64,
}

/// The metadata file's contents.
#[derive(Serialize, Deserialize)]
struct Metadata {
    format_version: u32,
    replica_id: String,
    volume_id: String,
    size: u64,
    epoch: u64,
    state: ReplicaDataState,
    created_ms: u64,
}

/// The disk marker file's contents.
#[derive(Serialize, Deserialize)]
struct DiskMarker {
    format_version: u32,
    id: String,
    created_ms: u64,
}

/// Creates the replica `replica_id` of `volume_id`, `size` bytes, on `disk`, or returns it if
/// it exists already with that volume and size. A replica of the same id with another volume
/// or size is an error. A new replica is `Complete` at epoch 0.
pub fn create(
    disk: &Path,
    replica_id: &str,
    volume_id: &str,
    size: u64,
) -> Result<ReplicaDir, ReplicaError> {
    check_id("replica id", replica_id)?;
    if volume_id.is_empty() {
        return Err(ReplicaError::InvalidId {
            what: "volume id",
            id: volume_id.to_string(),
            reason: "it is empty",
        });
    }
    let root = replicas_dir(disk);
    ensure_dir(&root)?;
    let _lock = lock(&root)?;
    let dir = root.join(replica_id);
    if let Some(existing) = load(&dir, replica_id)? {
        if existing.volume_id != volume_id || existing.size != size {
            return Err(ReplicaError::Mismatch(Box::new(Mismatch {
                id: replica_id.to_string(),
                path: dir,
                existing_volume_id: existing.volume_id,
                existing_size: existing.size,
                volume_id: volume_id.to_string(),
                size,
            })));
        }
        return Ok(existing);
    }

    // Built aside and renamed into place whole; a leftover of a crashed attempt starts over.
    let staging = root.join(format!("{CREATING_PREFIX}{replica_id}"));
    remove_dir_all_if_present(&staging)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_error("create directory", &staging))?;
    let replica = ReplicaDir {
        id: replica_id.to_string(),
        volume_id: volume_id.to_string(),
        size,
        epoch: 0,
        state: ReplicaDataState::Complete,
        created_ms: crate::model::now_ms(),
        dir: staging.clone(),
    };
    let data_path = replica.data_path();
    let data = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&data_path)
        .map_err(io_error("create data file", &data_path))?;
    data.set_len(size)
        .map_err(io_error("set the length of", &data_path))?;
    data.sync_all().map_err(io_error("sync", &data_path))?;
    write_metadata(&replica)?;
    fs::rename(&staging, &dir).map_err(io_error("rename into place", &staging))?;
    sync_dir(&root)?;
    Ok(ReplicaDir { dir, ..replica })
}

/// The replica `replica_id` on `disk`, or None if there is none. A replica whose metadata is
/// missing, torn or inconsistent is an error naming the file.
pub fn open(disk: &Path, replica_id: &str) -> Result<Option<ReplicaDir>, ReplicaError> {
    check_id("replica id", replica_id)?;
    load(&replicas_dir(disk).join(replica_id), replica_id)
}

/// Grows the replica to `new_size` bytes: extends the data file (sparse), syncs it, then
/// records the size. Growing to the current size is a no-op; shrinking is an error.
pub fn grow(disk: &Path, replica_id: &str, new_size: u64) -> Result<ReplicaDir, ReplicaError> {
    update(disk, replica_id, |replica| {
        if new_size < replica.size {
            return Err(ReplicaError::Shrink {
                id: replica.id.clone(),
                size: replica.size,
                requested: new_size,
            });
        }
        if new_size == replica.size {
            return Ok(false);
        }
        let data_path = replica.data_path();
        let data = OpenOptions::new()
            .write(true)
            .open(&data_path)
            .map_err(io_error("open data file", &data_path))?;
        // A grow interrupted after this point left the file longer than recorded: keep it.
        let len = data.metadata().map_err(io_error("stat", &data_path))?.len();
        if len < new_size {
            data.set_len(new_size)
                .map_err(io_error("set the length of", &data_path))?;
        }
        data.sync_all().map_err(io_error("sync", &data_path))?;
        replica.size = new_size;
        Ok(true)
    })
}

/// Records that the replica has accepted attachment epoch `epoch` (durably, before this
/// returns). The epoch never goes down: a lower one is an error, the same one a no-op.
pub fn set_epoch(disk: &Path, replica_id: &str, epoch: u64) -> Result<ReplicaDir, ReplicaError> {
    update(disk, replica_id, |replica| {
        if epoch < replica.epoch {
            return Err(ReplicaError::EpochLowered {
                id: replica.id.clone(),
                current: replica.epoch,
                requested: epoch,
            });
        }
        let changed = epoch != replica.epoch;
        replica.epoch = epoch;
        Ok(changed)
    })
}

/// Records the replica's data state (durably, before this returns).
pub fn set_state(
    disk: &Path,
    replica_id: &str,
    state: ReplicaDataState,
) -> Result<ReplicaDir, ReplicaError> {
    update(disk, replica_id, |replica| {
        let changed = state != replica.state;
        replica.state = state;
        Ok(changed)
    })
}

/// Removes the replica and its data. Removing a replica that is not there is Ok.
pub fn delete(disk: &Path, replica_id: &str) -> Result<(), ReplicaError> {
    check_id("replica id", replica_id)?;
    let root = replicas_dir(disk);
    if !exists(&root)? {
        return Ok(());
    }
    let _lock = lock(&root)?;
    let dir = root.join(replica_id);
    let doomed = root.join(format!("{DELETING_PREFIX}{replica_id}"));
    if exists(&dir)? {
        remove_dir_all_if_present(&doomed)?;
        fs::rename(&dir, &doomed).map_err(io_error("rename for deletion", &dir))?;
        sync_dir(&root)?;
    }
    remove_dir_all_if_present(&doomed)?;
    remove_dir_all_if_present(&root.join(format!("{CREATING_PREFIX}{replica_id}")))?;
    sync_dir(&root)
}

/// The replicas on `disk`, ordered by id. Removes what interrupted creates and deletes left
/// behind. Any replica whose metadata is missing or malformed is an error naming it.
pub fn list(disk: &Path) -> Result<Vec<ReplicaDir>, ReplicaError> {
    let root = replicas_dir(disk);
    if !exists(&root)? {
        return Ok(vec![]);
    }
    let _lock = lock(&root)?;
    let mut replicas = vec![];
    let mut removed = false;
    let entries = fs::read_dir(&root).map_err(io_error("read directory", &root))?;
    for entry in entries {
        let entry = entry.map_err(io_error("read directory", &root))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            tracing::warn!(path = %path.display(), "ignoring a file whose name is not UTF-8");
            continue;
        };
        if name.starts_with(CREATING_PREFIX) || name.starts_with(DELETING_PREFIX) {
            tracing::info!(path = %path.display(), "removing the leftover of an interrupted replica create or delete");
            remove_dir_all_if_present(&path)?;
            removed = true;
            continue;
        }
        if name == LOCK_FILE {
            continue;
        }
        let is_dir = entry.file_type().map_err(io_error("stat", &path))?.is_dir();
        if name.starts_with('.') || !is_dir {
            tracing::warn!(path = %path.display(), "ignoring a file that is not a replica");
            continue;
        }
        match load(&path, &name)? {
            Some(replica) => replicas.push(replica),
            None => {
                return Err(ReplicaError::Invalid {
                    path,
                    reason: "vanished while the disk was locked".to_string(),
                })
            }
        }
    }
    if removed {
        sync_dir(&root)?;
    }
    replicas.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(replicas)
}

/// Prepares the disk directory `path` (created if missing) and returns its identity and
/// capacity. The id is made once, at the first call, and kept in `palisade-disk.json`.
pub fn init_disk(path: &Path) -> Result<DiskInfo, ReplicaError> {
    if !exists(path)? {
        fs::create_dir_all(path).map_err(io_error("create directory", path))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    let root = replicas_dir(path);
    ensure_dir(&root)?;
    let _lock = lock(&root)?;
    let marker_path = path.join(DISK_MARKER_FILE);
    let id = match fs::read(&marker_path) {
        Ok(bytes) => {
            let marker: DiskMarker =
                serde_json::from_slice(&bytes).map_err(|source| ReplicaError::Malformed {
                    path: marker_path.clone(),
                    source,
                })?;
            if marker.format_version != FORMAT_VERSION || marker.id.is_empty() {
                return Err(ReplicaError::Invalid {
                    path: marker_path,
                    reason: format!(
                        "format version {} with id {:?}; expected version {FORMAT_VERSION} \
                         and an id",
                        marker.format_version, marker.id
                    ),
                });
            }
            marker.id
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let marker = DiskMarker {
                format_version: FORMAT_VERSION,
                id: random_id()?,
                created_ms: crate::model::now_ms(),
            };
            write_json_atomically(path, DISK_MARKER_FILE, &marker)?;
            marker.id
        }
        Err(e) => return Err(io_error("read", &marker_path)(e)),
    };
    let stats = nix::sys::statvfs::statvfs(path).map_err(|source| ReplicaError::Capacity {
        path: path.to_path_buf(),
        source,
    })?;
    let fragment = stats.fragment_size() as u64;
    Ok(DiskInfo {
        id,
        storage_maximum: fragment.saturating_mul(stats.blocks() as u64),
        storage_available: fragment.saturating_mul(stats.blocks_available() as u64),
    })
}

/// The directory replica `replica_id` has (or would have) on `disk`.
pub fn replica_dir(disk: &Path, replica_id: &str) -> PathBuf {
    replicas_dir(disk).join(replica_id)
}

fn replicas_dir(disk: &Path) -> PathBuf {
    disk.join(REPLICAS_DIR)
}

/// Checks that `id` is usable as one file name in the replicas directory, with room for the
/// prefixes of the names a replica takes while being created or deleted.
fn check_id(what: &'static str, id: &str) -> Result<(), ReplicaError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_ID_LEN {
        "it is longer than 245 bytes"
    } else if id.contains('/') {
        "it contains '/'"
    } else if id.contains('\0') {
        "it contains a NUL byte"
    } else if id.starts_with('.') {
        "it starts with '.'"
    } else {
        return Ok(());
    };
    Err(ReplicaError::InvalidId {
        what,
        id: id.to_string(),
        reason,
    })
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io {
        action,
        path,
        source,
    }
}

fn exists(path: &Path) -> Result<bool, ReplicaError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("stat", path)(e)),
    }
}

fn sync_dir(path: &Path) -> Result<(), ReplicaError> {
    durable::sync_dir(path).map_err(ReplicaError::from)
}

impl From<durable::FileError> for ReplicaError {
    fn from(e: durable::FileError) -> ReplicaError {
        ReplicaError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

/// Creates the directory `path` if it is missing, durably (its parent is synced).
fn ensure_dir(path: &Path) -> Result<(), ReplicaError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => match path.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create directory", path)(e)),
    }
}

fn remove_dir_all_if_present(path: &Path) -> Result<(), ReplicaError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

/// Takes the disk's lock, held until the returned file is dropped.
fn lock(root: &Path) -> Result<File, ReplicaError> {
    let path = root.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    file.lock().map_err(io_error("lock", &path))?;
    Ok(file)
}

/// Replaces `dir/name` with `value` as JSON: written to a temp file, synced, renamed over
/// the old file, and the directory synced, so a crash leaves the old file or the new one.
fn write_json_atomically(
    dir: &Path,
    name: &str,
    value: &impl Serialize,
) -> Result<(), ReplicaError> {
    durable::replace_json(dir, name, value).map_err(ReplicaError::from)
}

fn write_metadata(replica: &ReplicaDir) -> Result<(), ReplicaError> {
    write_json_atomically(&replica.dir, METADATA_FILE, &replica.metadata())
}

/// Reads and checks the replica in `dir`; None if `dir` does not exist.
fn load(dir: &Path, replica_id: &str) -> Result<Option<ReplicaDir>, ReplicaError> {
    let path = dir.join(METADATA_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if exists(dir)? {
                return Err(ReplicaError::Invalid {
                    path: dir.to_path_buf(),
                    reason: format!("it has no {METADATA_FILE}"),
                });
            }
            return Ok(None);
        }
        Err(e) => return Err(io_error("read", &path)(e)),
    };
    let metadata: Metadata =
        serde_json::from_slice(&bytes).map_err(|source| ReplicaError::Malformed {
            path: path.clone(),
            source,
        })?;
    let invalid = |reason: String| ReplicaError::Invalid {
        path: path.clone(),
        reason,
    };
    if metadata.format_version != FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {} is not {FORMAT_VERSION}",
            metadata.format_version
        )));
    }
    if metadata.replica_id != replica_id {
        return Err(invalid(format!(
            "it names replica {:?}, not {replica_id:?}",
            metadata.replica_id
        )));
    }
    if metadata.volume_id.is_empty() {
        return Err(invalid("its volume id is empty".to_string()));
    }
    let replica = ReplicaDir {
        id: metadata.replica_id,
        volume_id: metadata.volume_id,
        size: metadata.size,
        epoch: metadata.epoch,
        state: metadata.state,
        created_ms: metadata.created_ms,
        dir: dir.to_path_buf(),
    };
    let data_path = replica.data_path();
    let data_len = fs::metadata(&data_path)
        .map_err(io_error("stat data file", &data_path))?
        .len();
    if data_len < replica.size {
        return Err(ReplicaError::Invalid {
            path: data_path,
            reason: format!(
                "the data file is {data_len} bytes, shorter than the replica's {}",
                replica.size
            ),
        });
    }
    Ok(Some(replica))
}

/// Under the disk's lock, loads the replica, lets `change` modify it (returning whether it
/// did), and writes the metadata back if so.
fn update(
    disk: &Path,
    replica_id: &str,
    change: impl FnOnce(&mut ReplicaDir) -> Result<bool, ReplicaError>,
) -> Result<ReplicaDir, ReplicaError> {
    check_id("replica id", replica_id)?;
    let not_found = || ReplicaError::NotFound {
        id: replica_id.to_string(),
        disk: disk.to_path_buf(),
    };
    let root = replicas_dir(disk);
    if !exists(&root)? {
        return Err(not_found());
    }
    let _lock = lock(&root)?;
    let mut replica = load(&root.join(replica_id), replica_id)?.ok_or_else(not_found)?;
    if change(&mut replica)? {
        write_metadata(&replica)?;
    }
    Ok(replica)
}

/// A random id in the form of a version 4 UUID, from the kernel's random source.
fn random_id() -> Result<String, ReplicaError> {
    let source = Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    File::open(source)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_error("read", source))?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests;
