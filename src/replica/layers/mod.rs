//! A replica's data as a chain of layers, so that a snapshot costs metadata and not a copy of
//! the volume (ext4 has no reflink), in the manner of Longhorn's differencing disks.
//!
//! A chain lives in one directory: zero or more immutable snapshot layers, oldest first, and
//! one writable head. Each layer is a sparse data file of the volume's size (as of the layer)
//! and an allocation map with one bit per 4 KiB block, set when the layer holds the block:
//! its data, or zeros it was written or trimmed to. Holes alone cannot say "trimmed here,
//! hide the older layers", hence the explicit map. A read resolves each block to the newest
//! layer holding it (zeros if none) and reads each run of blocks of one layer in one pread.
//! A snapshot's own view is the same resolution stopped at that layer.
//!
//! Why 4 KiB blocks: it is the page size, ext4's block size (on the node's disk and as the
//! volume's filesystem) and the preferred block size the engine's NBD export advertises, so
//! writes cover whole blocks and need no old contents copied up from older layers (partial
//! blocks are handled, by a read-modify-write of the edge blocks); the map is 32 KiB per GiB (2 MiB for 64 GiB), small enough to keep in memory for
//! every layer and to write at a flush only where it changed. Volume sizes are multiples of
//! the block size (Palisade rounds them to MiB).
//!
//! The manifest `chain.json`, the ordered list of layers rewritten atomically (temp file,
//! fsync, rename, fsync of the directory), is the single source of truth: a file it does not
//! list is a leftover, removed at open. Why each operation is crash-safe:
//! - Flush: the head's data file is fsynced first, then the changed pages of its map are
//!   written and fsynced, so the map never claims a block whose data is not durable. Head map
//!   bits only ever go from 0 to 1, so a torn map page mixes old and new bits, each true.
//!   A block the map does not claim may hold stale head data after a crash; every later write
//!   to it writes the whole block (copying up the older layers' bytes), so it never shows.
//! - Snapshot: flush; create the new head's empty files (synced, and the directory); rewrite
//!   the manifest with the old head frozen (named, with its map's digest) and the new head
//!   appended. Before the rename the old chain stands (the new files are leftovers); after it
//!   the new one. Nothing is copied: the cost is a few fsyncs and a hash of the head's map.
//! - Delete a snapshot L with child C: L and C are merged into one layer, by copying L's
//!   blocks that C lacks down into C's file, or C's blocks up into L's file when C holds
//!   fewer, whichever copies less (see merge.rs). Down never overwrites a byte any view can
//!   see, and the manifest drops L last; up overwrites bytes only L's own view sees, so the
//!   manifest first marks L deleted (open rolls that forward). Either way a crash leaves the
//!   old chain or the new one, and a re-run converges.
//! - Grow: the head's data and map files are extended first, then the manifest records the
//!   size; files longer than recorded are fine. Older layers keep their size: past it they
//!   hold nothing.
//!
//! Every operation is idempotent: create of an existing chain of that size opens it, a
//! snapshot whose name exists returns it, deleting a snapshot that is gone is Ok. After any
//! error of an operation that changes the chain, the [`Chain`] refuses further use (its memory
//! may be ahead of the disk): drop it and open the chain again, which repairs what is needed.
//! A chain has one user at a time (`&mut self`); the replica's own lock keeps other processes
//! out. The functions block on file I/O; async callers wrap them in `spawn_blocking`.

mod bitmap;
mod extents;
mod files;
mod merge;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bitmap::Bitmap;
pub use extents::Extents;
use files::{blocks_of, io_error, LayerEntry, Manifest};

/// The chain's block: the unit of the allocation maps.
pub const BLOCK_SIZE: u64 = 4096;
/// The longest snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// The most bytes copied in one pread/pwrite when a snapshot is merged.
const COPY_CHUNK_BLOCKS: u64 = 256;

/// Why a chain operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is malformed: {source}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not a valid layer chain file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} holds no layer chain (no {})", files::MANIFEST)]
    NotAChain { path: PathBuf },
    #[error("the chain at {path} is {existing} bytes, not {requested}")]
    SizeMismatch {
        path: PathBuf,
        existing: u64,
        requested: u64,
    },
    #[error("a chain's size must be a multiple of {BLOCK_SIZE} bytes, not {size}")]
    UnalignedSize { size: u64 },
    #[error("{len} bytes at {offset} are outside the {size} bytes of the volume")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the chain is {size} bytes and cannot shrink to {requested}")]
    Shrink { size: u64, requested: u64 },
    #[error("snapshot name {name:?} cannot be used: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("no snapshot {name:?} in the chain at {path}")]
    SnapshotNotFound { name: String, path: PathBuf },
    #[error("the chain at {path} failed earlier and must be opened again")]
    Poisoned { path: PathBuf },
    #[cfg(test)]
    #[error("injected crash at {point}")]
    Injected { point: &'static str },
}

/// A snapshot in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Milliseconds since the Unix epoch when the snapshot was taken.
    pub created_ms: u64,
    /// The volume's size at the snapshot.
    pub size: u64,
    /// The bytes this layer holds itself (not those it shares with older layers).
    pub bytes_held: u64,
}

/// Bytes `start..end` of a view that resolve to one layer (None: to zeros).
#[derive(Debug, PartialEq, Eq)]
struct Run {
    layer: Option<usize>,
    start: u64,
    end: u64,
}

/// One layer's open files and map, in the manifest's order.
struct Layer {
    data: File,
    map: Bitmap,
}

/// A replica's layer chain, open.
pub struct Chain {
    dir: PathBuf,
    manifest: Manifest,
    layers: Vec<Layer>,
    /// The head's map file, written at a flush.
    head_map: File,
    /// The head's data file has writes not yet fsynced.
    data_dirty: bool,
    poisoned: bool,
    /// The step at which a test stops an operation, as a crash would.
    #[cfg(test)]
    crash_at: Option<&'static str>,
    /// Forces the direction of a merge (true: the child's blocks up into the parent).
    #[cfg(test)]
    merge_up: Option<bool>,
}

impl Chain {
    /// Creates an empty chain of `size` bytes in `dir` (made if missing), or opens the one
    /// there if it has that size.
    pub fn create(dir: &Path, size: u64) -> Result<Chain, LayerError> {
        if !size.is_multiple_of(BLOCK_SIZE) {
            return Err(LayerError::UnalignedSize { size });
        }
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                files::sync_dir(parent)?;
            }
        }
        if files::read_manifest(dir)?.is_some() {
            let chain = Chain::open(dir)?;
            if chain.size() != size {
                return Err(LayerError::SizeMismatch {
                    path: dir.to_path_buf(),
                    existing: chain.size(),
                    requested: size,
                });
            }
            return Ok(chain);
        }
        let head = LayerEntry {
            id: 0,
            name: None,
            created_ms: crate::model::now_ms(),
            size,
            map: files::map_name(1),
            map_digest: None,
            deleting: false,
        };
        files::create_data(&dir.join(head.data_name()), size)?;
        files::create_map(&dir.join(&head.map), &Bitmap::new(blocks_of(size)))?;
        files::sync_dir(dir)?;
        let manifest = Manifest {
            format_version: files::FORMAT_VERSION,
            block_size: BLOCK_SIZE,
            size,
            next_id: 2,
            layers: vec![head],
        };
        files::write_manifest(dir, &manifest)?;
        Chain::open(dir)
    }

    /// Opens the chain in `dir`, checking the manifest and every layer's files against it,
    /// and removes the leftovers of interrupted operations.
    pub fn open(dir: &Path) -> Result<Chain, LayerError> {
        let manifest = files::read_manifest(dir)?.ok_or_else(|| LayerError::NotAChain {
            path: dir.to_path_buf(),
        })?;
        if !manifest.size.is_multiple_of(BLOCK_SIZE)
            || manifest
                .layers
                .iter()
                .any(|l| !l.size.is_multiple_of(BLOCK_SIZE))
        {
            return Err(files::invalid(
                &dir.join(files::MANIFEST),
                "a size is not a multiple of the block size",
            ));
        }
        files::remove_unlisted(dir, &manifest)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for entry in &manifest.layers {
            layers.push(open_layer(dir, entry)?);
        }
        let head_entry = manifest
            .layers
            .last()
            .ok_or_else(|| LayerError::NotAChain {
                path: dir.to_path_buf(),
            })?;
        let head_map = files::open_existing(&dir.join(&head_entry.map))?;
        let mut chain = Chain {
            dir: dir.to_path_buf(),
            manifest,
            layers,
            head_map,
            data_dirty: false,
            poisoned: false,
            #[cfg(test)]
            crash_at: None,
            #[cfg(test)]
            merge_up: None,
        };
        // A delete that recorded its intent and stopped: finish it.
        if let Some(index) = chain.manifest.layers.iter().position(|l| l.deleting) {
            chain.finish_merge_up(index)?;
        }
        Ok(chain)
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    /// The chain's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `len` bytes at `offset` of the volume (the head's view).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, LayerError> {
        self.read_view(self.head_index(), offset, len)
    }

    /// Reads `len` bytes at `offset` of the volume as it was at snapshot `name`.
    pub fn read_at_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, LayerError> {
        let top = self.snapshot_index(name)?;
        self.read_view(top, offset, len)
    }

    /// Writes `data` at `offset` into the head; durable at the next [`Chain::flush`].
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), LayerError> {
        check_range(offset, data.len() as u64, self.size())?;
        self.guard(|chain| chain.write_inner(offset, data))
    }

    /// Makes `len` bytes at `offset` read as zeros, hiding older layers there, and frees the
    /// head's space for the whole blocks among them; durable at the next flush.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), LayerError> {
        check_range(offset, len, self.size())?;
        self.guard(|chain| chain.trim_inner(offset, len))
    }

    /// Makes every completed write and trim durable: the head's data, then its map.
    pub fn flush(&mut self) -> Result<(), LayerError> {
        self.guard(Chain::flush_inner)
    }

    /// Freezes the head as snapshot `name` and starts a new empty head; returns the snapshot.
    /// A snapshot of that name that exists already is returned as it is.
    pub fn snapshot(&mut self, name: &str) -> Result<SnapshotInfo, LayerError> {
        self.usable()?;
        check_name(name)?;
        if let Ok(index) = self.snapshot_index(name) {
            return Ok(self.info(index));
        }
        self.guard(|chain| chain.snapshot_inner(name))
    }

    /// Deletes snapshot `name`, merging what it alone holds into its child and freeing the
    /// rest. Deleting a snapshot that is not there is Ok.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<(), LayerError> {
        self.usable()?;
        let Ok(index) = self.snapshot_index(name) else {
            return Ok(());
        };
        self.guard(|chain| chain.delete_inner(index))
    }

    /// The snapshots, oldest first.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        (0..self.head_index())
            .filter(|&i| !self.manifest.layers[i].deleting)
            .map(|i| self.info(i))
            .collect()
    }

    /// Grows the volume to `new_size` bytes (the new bytes read as zeros). The same size is a
    /// no-op; shrinking is an error.
    pub fn grow(&mut self, new_size: u64) -> Result<(), LayerError> {
        if new_size < self.size() {
            return Err(LayerError::Shrink {
                size: self.size(),
                requested: new_size,
            });
        }
        if !new_size.is_multiple_of(BLOCK_SIZE) {
            return Err(LayerError::UnalignedSize { size: new_size });
        }
        if new_size == self.size() {
            return Ok(());
        }
        self.guard(|chain| chain.grow_inner(new_size))
    }

    /// The byte ranges that hold data in the head's view (`None`) or snapshot `name`'s, in
    /// order and coalesced; the rest reads as zeros. A trimmed block over older data counts
    /// as data (it reads as zeros, which copying preserves).
    pub fn extents(&self, snapshot: Option<&str>) -> Result<Extents, LayerError> {
        let top = match snapshot {
            Some(name) => self.snapshot_index(name)?,
            None => self.head_index(),
        };
        let mut union = Bitmap::new(blocks_of(self.manifest.layers[top].size));
        for layer in &self.layers[..=top] {
            union.union_with(&layer.map);
        }
        Ok(Extents::new(union))
    }

    /// The byte ranges the layer itself holds: snapshot `name`'s, or the head's (`None`), in
    /// order and coalesced; those the view gets from older layers are not among them. Copying
    /// each snapshot's own ranges (read from its view) into a new chain's head and taking the
    /// snapshot there, oldest first, then the head's, rebuilds the chain with every view.
    pub fn layer_extents(&self, snapshot: Option<&str>) -> Result<Extents, LayerError> {
        let index = match snapshot {
            Some(name) => self.snapshot_index(name)?,
            None => self.head_index(),
        };
        Ok(Extents::new(self.layers[index].map.clone()))
    }

    fn head_index(&self) -> usize {
        self.layers.len() - 1
    }

    fn snapshot_index(&self, name: &str) -> Result<usize, LayerError> {
        self.manifest.layers[..self.head_index()]
            .iter()
            .position(|l| !l.deleting && l.name.as_deref() == Some(name))
            .ok_or_else(|| LayerError::SnapshotNotFound {
                name: name.to_string(),
                path: self.dir.clone(),
            })
    }

    fn info(&self, index: usize) -> SnapshotInfo {
        let entry = &self.manifest.layers[index];
        SnapshotInfo {
            name: entry.name.clone().unwrap_or_default(),
            created_ms: entry.created_ms,
            size: entry.size,
            bytes_held: self.layers[index].map.count() * BLOCK_SIZE,
        }
    }

    /// Refuses a chain that failed in the middle of a change.
    fn usable(&self) -> Result<(), LayerError> {
        if self.poisoned {
            return Err(LayerError::Poisoned {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Runs a change; any error leaves the chain refusing further use.
    fn guard<T>(
        &mut self,
        change: impl FnOnce(&mut Chain) -> Result<T, LayerError>,
    ) -> Result<T, LayerError> {
        self.usable()?;
        let result = change(self);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn read_view(&self, top: usize, offset: u64, len: usize) -> Result<Vec<u8>, LayerError> {
        let size = self.manifest.layers[top].size;
        check_range(offset, len as u64, size)?;
        let mut buf = vec![0u8; len];
        self.read_into(top, offset, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset` in the view of layers `0..=top`: one pread per run of blocks
    /// that resolve to the same layer; blocks no layer holds stay zero.
    fn read_into(&self, top: usize, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        for run in self.runs(top, offset, offset + buf.len() as u64) {
            if let Some(layer) = run.layer {
                let part = &mut buf[(run.start - offset) as usize..(run.end - offset) as usize];
                self.layers[layer]
                    .data
                    .read_exact_at(part, run.start)
                    .map_err(|e| io_error("read", &self.data_path(layer))(e))?;
            }
        }
        Ok(())
    }

    /// The bytes `start..end` of the view of layers `0..=top`, cut where the layer they
    /// resolve to changes.
    fn runs(&self, top: usize, start: u64, end: u64) -> Vec<Run> {
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let block = at / BLOCK_SIZE;
            let layer = self.owner(top, block);
            let mut next = block + 1;
            while next * BLOCK_SIZE < end && self.owner(top, next) == layer {
                next += 1;
            }
            let stop = (next * BLOCK_SIZE).min(end);
            runs.push(Run {
                layer,
                start: at,
                end: stop,
            });
            at = stop;
        }
        runs
    }

    /// The newest layer at or below `top` that holds `block`.
    fn owner(&self, top: usize, block: u64) -> Option<usize> {
        (0..=top).rev().find(|&i| self.layers[i].map.get(block))
    }

    fn data_path(&self, index: usize) -> PathBuf {
        self.dir.join(self.manifest.layers[index].data_name())
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<(), LayerError> {
        let len = data.len() as u64;
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / BLOCK_SIZE;
        let last = end.div_ceil(BLOCK_SIZE);
        let (start, stop) = (first * BLOCK_SIZE, last * BLOCK_SIZE);
        let head = self.head_index();
        let whole;
        let bytes: &[u8] = if start == offset && stop == end {
            data
        } else {
            // Whole blocks only: the edges' old bytes come from wherever they resolve now.
            let mut buf = vec![0u8; (stop - start) as usize];
            if offset != start {
                self.read_into(head, start, &mut buf[..BLOCK_SIZE as usize])?;
            }
            if end != stop {
                let from = buf.len() - BLOCK_SIZE as usize;
                self.read_into(head, stop - BLOCK_SIZE, &mut buf[from..])?;
            }
            buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
            whole = buf;
            &whole
        };
        let path = self.data_path(head);
        self.layers[head]
            .data
            .write_all_at(bytes, start)
            .map_err(io_error("write", &path))?;
        self.layers[head].map.set_range(first, last);
        self.data_dirty = true;
        Ok(())
    }

    fn trim_inner(&mut self, offset: u64, len: u64) -> Result<(), LayerError> {
        check_range(offset, len, self.size())?;
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = end / BLOCK_SIZE;
        if first >= last {
            return self.write_inner(offset, &vec![0u8; len as usize]);
        }
        let (start, stop) = (first * BLOCK_SIZE, last * BLOCK_SIZE);
        self.write_inner(offset, &vec![0u8; (start - offset) as usize])?;
        self.write_inner(stop, &vec![0u8; (end - stop) as usize])?;
        let head = self.head_index();
        let path = self.data_path(head);
        punch_hole(&self.layers[head].data, start, stop - start)
            .map_err(io_error("punch", &path))?;
        self.layers[head].map.set_range(first, last);
        self.data_dirty = true;
        Ok(())
    }

    fn flush_inner(&mut self) -> Result<(), LayerError> {
        let head = self.head_index();
        if self.data_dirty {
            let path = self.data_path(head);
            self.layers[head]
                .data
                .sync_all()
                .map_err(io_error("sync", &path))?;
            self.data_dirty = false;
        }
        let pages = self.layers[head].map.take_dirty();
        if pages.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(&self.manifest.layers[head].map);
        for page in pages {
            let bytes = self.layers[head].map.page_bytes(page);
            let at = files::MAP_HEADER + (page * bitmap::PAGE_BYTES) as u64;
            self.head_map
                .write_all_at(bytes, at)
                .map_err(io_error("write", &path))?;
        }
        self.head_map.sync_data().map_err(io_error("sync", &path))
    }

    fn snapshot_inner(&mut self, name: &str) -> Result<SnapshotInfo, LayerError> {
        self.flush_inner()?;
        self.crash_point("snapshot: head flushed")?;
        let now = crate::model::now_ms();
        let size = self.size();
        let id = self.manifest.next_id;
        let head = LayerEntry {
            id,
            name: None,
            created_ms: now,
            size,
            map: files::map_name(id + 1),
            map_digest: None,
            deleting: false,
        };
        let map = Bitmap::new(blocks_of(size));
        let data = files::create_data(&self.dir.join(head.data_name()), size)?;
        let map_file = files::create_map(&self.dir.join(&head.map), &map)?;
        files::sync_dir(&self.dir)?;
        self.crash_point("snapshot: new head created")?;

        let mut next = self.manifest.clone();
        let old = self.head_index();
        let frozen = &mut next.layers[old];
        frozen.name = Some(name.to_string());
        frozen.created_ms = now;
        frozen.map_digest = Some(files::digest(&self.layers[old].map));
        next.layers.push(head);
        next.next_id = id + 2;
        files::write_manifest(&self.dir, &next)?;
        self.crash_point("snapshot: manifest written")?;

        self.manifest = next;
        self.layers.push(Layer { data, map });
        self.head_map = map_file;
        Ok(self.info(old))
    }

    fn grow_inner(&mut self, new_size: u64) -> Result<(), LayerError> {
        let head = self.head_index();
        let data_path = self.data_path(head);
        let map_path = self.dir.join(&self.manifest.layers[head].map);
        let blocks = blocks_of(new_size);
        let map_len = files::MAP_HEADER + bitmap::byte_len(blocks);
        set_len_at_least(&self.layers[head].data, &data_path, new_size)?;
        set_len_at_least(&self.head_map, &map_path, map_len)?;
        self.crash_point("grow: files extended")?;
        let mut next = self.manifest.clone();
        next.size = new_size;
        next.layers[head].size = new_size;
        files::write_manifest(&self.dir, &next)?;
        self.manifest = next;
        self.layers[head].map.grow(blocks);
        Ok(())
    }

    #[cfg(test)]
    fn crash_point(&self, point: &'static str) -> Result<(), LayerError> {
        match self.crash_at {
            Some(at) if at == point => Err(LayerError::Injected { point }),
            _ => Ok(()),
        }
    }

    #[cfg(not(test))]
    fn crash_point(&self, _point: &'static str) -> Result<(), LayerError> {
        Ok(())
    }
}

/// Opens and checks one layer's files.
fn open_layer(dir: &Path, entry: &LayerEntry) -> Result<Layer, LayerError> {
    let data_path = dir.join(entry.data_name());
    let data = files::open_existing(&data_path)?;
    files::check_data(&data, &data_path, entry.size)?;
    let map_path = dir.join(&entry.map);
    let map_file = files::open_existing(&map_path)?;
    let map = files::read_map(
        &map_file,
        &map_path,
        entry.size,
        entry.map_digest.as_deref(),
    )?;
    Ok(Layer { data, map })
}

/// Extends `file` to `len` bytes unless it is that long already (an interrupted grow), synced.
fn set_len_at_least(file: &File, path: &Path, len: u64) -> Result<(), LayerError> {
    let now = file.metadata().map_err(io_error("stat", path))?.len();
    if now < len {
        file.set_len(len)
            .map_err(io_error("set the length of", path))?;
    }
    file.sync_all().map_err(io_error("sync", path))
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), LayerError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(LayerError::OutOfRange { offset, len, size }),
    }
}

/// Checks a snapshot name: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
pub(crate) fn check_name(name: &str) -> Result<(), LayerError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 255 bytes"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(LayerError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

/// Discards `len` bytes at `offset` of `file`: a hole punched, or zeros written where the
/// filesystem cannot punch holes.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "offset out of range");
    let start = i64::try_from(offset).map_err(|_| too_far())?;
    let count = i64::try_from(len).map_err(|_| too_far())?;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, flags, start, count) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; (COPY_CHUNK_BLOCKS * BLOCK_SIZE) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            Ok(())
        }
        Err(errno) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests;
