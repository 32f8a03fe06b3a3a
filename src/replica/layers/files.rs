//! The chain's files in its directory: the manifest `chain.json` (rewritten atomically: temp
//! file, fsync, rename, fsync of the directory), each layer's sparse data file `data-<id>.img`
//! and its map file `map-<n>` (a 4 KiB header, then the bitmap). Reading any of them checks
//! it, and a file that does not hold what the manifest says is an error naming it.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::bitmap::{self, Bitmap};
use super::{LayerError, BLOCK_SIZE};

/// The manifest: the ordered list of layers, the single source of truth.
pub(super) const MANIFEST: &str = "chain.json";
pub(super) const FORMAT_VERSION: u32 = 1;
/// A map file's header: magic, then the block size (u32 LE), then zeros up to 4 KiB, so the
/// bitmap's pages are the file's pages.
pub(super) const MAP_HEADER: u64 = 4096;
const MAP_MAGIC: &[u8; 8] = b"PLSDMAP1";
const DATA_PREFIX: &str = "data-";
const MAP_PREFIX: &str = "map-";

/// The manifest's contents.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    pub format_version: u32,
    pub block_size: u64,
    /// The volume's size in bytes (the head's).
    pub size: u64,
    /// The next number free for a layer id or a map file.
    pub next_id: u64,
    /// Oldest first; the last is the writable head.
    pub layers: Vec<LayerEntry>,
}

/// One layer in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct LayerEntry {
    pub id: u64,
    /// The snapshot's name; None for the head.
    pub name: Option<String>,
    /// Milliseconds since the Unix epoch: when the snapshot was taken (the head: created).
    pub created_ms: u64,
    /// The volume's size when the layer was frozen (the head: the volume's size).
    pub size: u64,
    /// The map file's name.
    pub map: String,
    /// The XXH3-128 of a frozen layer's bitmap, hex; None for the head, whose map changes.
    pub map_digest: Option<String>,
    /// The snapshot is deleted and its child's blocks are being moved into its files (an
    /// intent, rolled forward at open); it is no longer listed or readable.
    #[serde(default)]
    pub deleting: bool,
}

impl LayerEntry {
    pub(super) fn data_name(&self) -> String {
        data_name(self.id)
    }
}

pub(super) fn data_name(id: u64) -> String {
    format!("{DATA_PREFIX}{id}.img")
}

pub(super) fn map_name(n: u64) -> String {
    format!("{MAP_PREFIX}{n}")
}

pub(super) fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

pub(super) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::Io {
        action,
        path,
        source,
    }
}

pub(super) fn invalid(path: &Path, reason: impl Into<String>) -> LayerError {
    LayerError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(super) fn sync_dir(path: &Path) -> Result<(), LayerError> {
    crate::replica::durable::sync_dir(path).map_err(LayerError::from)
}

impl From<crate::replica::durable::FileError> for LayerError {
    fn from(e: crate::replica::durable::FileError) -> LayerError {
        LayerError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

/// The digest a frozen layer's map is recorded with.
pub(super) fn digest(map: &Bitmap) -> String {
    hex::encode(xxhash_rust::xxh3::xxh3_128(map.as_bytes()).to_le_bytes())
}

/// Reads the manifest in `dir` and checks that it describes a well-formed chain; None if
/// there is no manifest.
pub(super) fn read_manifest(dir: &Path) -> Result<Option<Manifest>, LayerError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", &path)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| LayerError::Malformed {
            path: path.clone(),
            source,
        })?;
    check_manifest(&manifest).map_err(|reason| invalid(&path, reason))?;
    Ok(Some(manifest))
}

fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.format_version != FORMAT_VERSION {
        return Err(format!(
            "format version {} is not {FORMAT_VERSION}",
            m.format_version
        ));
    }
    if m.block_size != BLOCK_SIZE {
        return Err(format!("block size {} is not {BLOCK_SIZE}", m.block_size));
    }
    let Some((head, frozen)) = m.layers.split_last() else {
        return Err("it lists no layer".to_string());
    };
    if head.name.is_some() || head.map_digest.is_some() {
        return Err(format!(
            "its head (layer {}) has a name or a digest",
            head.id
        ));
    }
    if head.size != m.size {
        return Err(format!(
            "its head is {} bytes, the volume {}",
            head.size, m.size
        ));
    }
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut maps = BTreeSet::new();
    for layer in &m.layers {
        if layer.id >= m.next_id || !ids.insert(layer.id) {
            return Err(format!(
                "layer id {} is repeated or not below next_id",
                layer.id
            ));
        }
        if !valid_map_name(&layer.map, m.next_id) || !maps.insert(layer.map.clone()) {
            return Err(format!(
                "layer {} has a bad or repeated map {:?}",
                layer.id, layer.map
            ));
        }
    }
    for layer in frozen {
        let Some(name) = &layer.name else {
            return Err(format!("snapshot layer {} has no name", layer.id));
        };
        super::check_name(name).map_err(|e| e.to_string())?;
        if !names.insert(name.clone()) {
            return Err(format!("snapshot name {name:?} is repeated"));
        }
        if layer.map_digest.is_none() {
            return Err(format!("snapshot {name:?} has no map digest"));
        }
    }
    if head.deleting || frozen.iter().filter(|l| l.deleting).count() > 1 {
        return Err("more than one layer, or the head, is being deleted".to_string());
    }
    if m.layers.windows(2).any(|w| w[0].size > w[1].size) {
        return Err("a layer is larger than a newer one (volumes only grow)".to_string());
    }
    Ok(())
}

/// `map-<n>` with `n` below `next_id`.
fn valid_map_name(name: &str, next_id: u64) -> bool {
    name.strip_prefix(MAP_PREFIX)
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n < next_id && map_name(n) == name)
}

/// Replaces the manifest in `dir` with `manifest`, atomically and durably.
pub(super) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), LayerError> {
    crate::replica::durable::replace_json(dir, MANIFEST, manifest).map_err(LayerError::from)
}

/// Creates (or truncates: a name the manifest does not list holds nothing of value) a sparse
/// data file of `size` bytes, synced.
pub(super) fn create_data(path: &Path, size: u64) -> Result<File, LayerError> {
    let file = open_options(true)
        .open(path)
        .map_err(io_error("create data file", path))?;
    file.set_len(size)
        .map_err(io_error("set the length of", path))?;
    file.sync_all().map_err(io_error("sync", path))?;
    Ok(file)
}

/// Creates (or truncates) the map file `path` holding `map`, synced.
pub(super) fn create_map(path: &Path, map: &Bitmap) -> Result<File, LayerError> {
    let file = open_options(true)
        .open(path)
        .map_err(io_error("create map file", path))?;
    let mut header = vec![0u8; MAP_HEADER as usize];
    header[..8].copy_from_slice(MAP_MAGIC);
    header[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(io_error("write", path))?;
    file.set_len(MAP_HEADER + bitmap::byte_len(map.blocks()))
        .map_err(io_error("set the length of", path))?;
    if map.count() > 0 {
        file.write_all_at(map.as_bytes(), MAP_HEADER)
            .map_err(io_error("write", path))?;
    }
    file.sync_all().map_err(io_error("sync", path))?;
    Ok(file)
}

/// Opens an existing layer file for reading and writing.
pub(super) fn open_existing(path: &Path) -> Result<File, LayerError> {
    open_options(false)
        .open(path)
        .map_err(io_error("open", path))
}

fn open_options(create: bool) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if create {
        options.create(true).truncate(true);
    }
    options
}

/// Checks that the data file `path` is at least `size` bytes.
pub(super) fn check_data(file: &File, path: &Path, size: u64) -> Result<(), LayerError> {
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    if len < size {
        return Err(invalid(
            path,
            format!("the data file is {len} bytes, shorter than the layer's {size}"),
        ));
    }
    Ok(())
}

/// Reads and checks the map file `path` of a layer of `size` bytes; a frozen layer's bitmap
/// must match the digest the manifest records.
pub(super) fn read_map(
    file: &File,
    path: &Path,
    size: u64,
    digest_wanted: Option<&str>,
) -> Result<Bitmap, LayerError> {
    let blocks = blocks_of(size);
    let mut header = [0u8; 12];
    file.read_exact_at(&mut header, 0)
        .map_err(io_error("read the header of", path))?;
    if &header[..8] != MAP_MAGIC {
        return Err(invalid(path, "it is not a map file (bad magic)"));
    }
    let block_size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if u64::from(block_size) != BLOCK_SIZE {
        return Err(invalid(
            path,
            format!("block size {block_size} is not {BLOCK_SIZE}"),
        ));
    }
    let want = usize::try_from(bitmap::byte_len(blocks))
        .map_err(|_| invalid(path, "the map is too large for this machine"))?;
    let mut bytes = vec![0u8; want];
    file.read_exact_at(&mut bytes, MAP_HEADER).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid(
                path,
                format!("it is shorter than the {want} bytes of bitmap"),
            )
        } else {
            io_error("read", path)(e)
        }
    })?;
    let map =
        Bitmap::from_bytes(&bytes, blocks).ok_or_else(|| invalid(path, "the bitmap is short"))?;
    if let Some(wanted) = digest_wanted {
        let found = digest(&map);
        if found != wanted {
            return Err(invalid(
                path,
                format!("its digest is {found}, the manifest records {wanted}"),
            ));
        }
    }
    Ok(map)
}

/// Removes the files in `dir` that the manifest does not list (what an interrupted create,
/// snapshot or delete left), and the manifest's temp file; syncs `dir` if any went.
pub(super) fn remove_unlisted(dir: &Path, manifest: &Manifest) -> Result<(), LayerError> {
    let mut keep: BTreeSet<String> = BTreeSet::from([MANIFEST.to_string()]);
    for layer in &manifest.layers {
        keep.insert(layer.data_name());
        keep.insert(layer.map.clone());
    }
    let mut removed = false;
    for entry in fs::read_dir(dir).map_err(io_error("read directory", dir))? {
        let entry = entry.map_err(io_error("read directory", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let ours = name.starts_with(DATA_PREFIX)
            || name.starts_with(MAP_PREFIX)
            || name == format!(".{MANIFEST}.tmp");
        if ours && !keep.contains(&name) {
            remove_file(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Removes `path`; gone already is fine.
pub(super) fn remove_file(path: &Path) -> Result<(), LayerError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}
