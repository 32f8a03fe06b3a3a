//! Deleting a snapshot: its layer L is merged with its child C, one of two ways, whichever
//! copies fewer blocks.
//!
//! - Down: the blocks L holds and C does not are copied into C's data file, where C's map
//!   does not claim them, so no view changes; C's map gains them (the head's in place, a
//!   frozen layer's as a new map file, since its recorded digest must stay true); the
//!   manifest drops L; L's files go. Before the manifest is rewritten the old chain stands,
//!   whole (C and L hold the same bytes for the moved blocks).
//! - Up, when C holds fewer blocks than that (deleting an old, large snapshot whose child is
//!   small): the manifest first marks L `deleting` (from then on the snapshot is gone: not
//!   listed, not readable), then C's blocks are copied into L's data file, a new map file
//!   holds the union, and the manifest puts L's data file with that map in C's place; C's
//!   files go. Writing C's blocks into L's file overwrites bytes only L's own view could see,
//!   which is why the intent comes first; open rolls a marked delete forward, and re-copying
//!   is harmless (C's file is unchanged until the end).
//!
//! A crash at any step leaves the old chain or the new one; a re-run (or the open) converges.

use super::bitmap::Bitmap;
use super::files::{self, blocks_of, io_error, LayerEntry};
use std::os::unix::fs::FileExt;

use super::{set_len_at_least, Chain, LayerError, BLOCK_SIZE, COPY_CHUNK_BLOCKS};

impl Chain {
    pub(super) fn delete_inner(&mut self, index: usize) -> Result<(), LayerError> {
        let child = index + 1;
        if child == self.head_index() {
            self.flush_inner()?;
        }
        let moving = self.layers[index].map.minus(&self.layers[child].map);
        if self.merges_up(moving.count(), self.layers[child].map.count()) {
            let mut next = self.manifest.clone();
            next.layers[index].deleting = true;
            files::write_manifest(&self.dir, &next)?;
            self.manifest = next;
            self.crash_point("delete: intent written")?;
            self.finish_merge_up(index)
        } else {
            self.merge_down(index, &moving)
        }
    }

    /// True when moving the child's `child_blocks` up is cheaper than moving `down_blocks`
    /// down.
    fn merges_up(&self, down_blocks: u64, child_blocks: u64) -> bool {
        #[cfg(test)]
        if let Some(up) = self.merge_up {
            return up;
        }
        child_blocks < down_blocks
    }

    fn merge_down(&mut self, index: usize, moving: &Bitmap) -> Result<(), LayerError> {
        let child = index + 1;
        let child_is_head = child == self.head_index();
        self.copy_blocks(index, child, moving)?;
        self.crash_point("delete: blocks copied")?;

        let mut next = self.manifest.clone();
        let mut merged = self.layers[child].map.clone();
        merged.union_with(moving);
        let mut replaced_map = None;
        if child_is_head {
            self.layers[child].map = merged;
            self.flush_inner()?;
        } else {
            let name = files::map_name(next.next_id);
            next.next_id += 1;
            files::create_map(&self.dir.join(&name), &merged)?;
            files::sync_dir(&self.dir)?;
            let entry = &mut next.layers[child];
            entry.map_digest = Some(files::digest(&merged));
            replaced_map = Some(std::mem::replace(&mut entry.map, name));
            merged.mark_clean();
            self.layers[child].map = merged;
        }
        self.crash_point("delete: child map written")?;

        let gone = next.layers.remove(index);
        files::write_manifest(&self.dir, &next)?;
        self.crash_point("delete: manifest written")?;

        self.manifest = next;
        self.layers.remove(index);
        let mut doomed = vec![gone.data_name(), gone.map];
        doomed.extend(replaced_map);
        self.remove_files(&doomed)
    }

    /// Moves the child's blocks up into layer `index` (marked `deleting`) and puts it in the
    /// child's place.
    pub(super) fn finish_merge_up(&mut self, index: usize) -> Result<(), LayerError> {
        let child = index + 1;
        let child_is_head = child == self.head_index();
        let child_entry = self.manifest.layers[child].clone();
        let data_path = self.data_path(index);
        set_len_at_least(&self.layers[index].data, &data_path, child_entry.size)?;
        let child_map = self.layers[child].map.clone();
        self.copy_blocks(child, index, &child_map)?;
        self.crash_point("delete: blocks copied")?;

        let mut merged = self.layers[index].map.clone();
        merged.grow(blocks_of(child_entry.size));
        merged.union_with(&child_map);
        merged.mark_clean();
        let mut next = self.manifest.clone();
        let map = files::map_name(next.next_id);
        next.next_id += 1;
        let map_file = files::create_map(&self.dir.join(&map), &merged)?;
        files::sync_dir(&self.dir)?;
        self.crash_point("delete: child map written")?;

        let id = next.layers[index].id;
        let gone = std::mem::replace(
            &mut next.layers[index],
            LayerEntry {
                id,
                map_digest: child_entry
                    .map_digest
                    .as_ref()
                    .map(|_| files::digest(&merged)),
                map,
                deleting: false,
                ..child_entry.clone()
            },
        );
        next.layers.remove(child);
        files::write_manifest(&self.dir, &next)?;
        self.crash_point("delete: manifest written")?;

        self.manifest = next;
        self.layers.remove(child);
        self.layers[index].map = merged;
        if child_is_head {
            self.head_map = map_file;
        }
        self.remove_files(&[child_entry.data_name(), child_entry.map, gone.map])
    }

    /// Copies the blocks of `blocks` from layer `from`'s data file into layer `to`'s, in runs
    /// of at most [`COPY_CHUNK_BLOCKS`], and syncs `to`'s.
    fn copy_blocks(&self, from: usize, to: usize, blocks: &Bitmap) -> Result<(), LayerError> {
        let (from_path, to_path) = (self.data_path(from), self.data_path(to));
        let mut buf = vec![0u8; (COPY_CHUNK_BLOCKS * BLOCK_SIZE) as usize];
        let mut at = 0;
        while let Some(start) = blocks.next_set(at) {
            let stop = blocks.next_clear(start).min(start + COPY_CHUNK_BLOCKS);
            let part = &mut buf[..((stop - start) * BLOCK_SIZE) as usize];
            self.layers[from]
                .data
                .read_exact_at(part, start * BLOCK_SIZE)
                .map_err(io_error("read", &from_path))?;
            self.layers[to]
                .data
                .write_all_at(part, start * BLOCK_SIZE)
                .map_err(io_error("write", &to_path))?;
            at = stop;
        }
        self.layers[to]
            .data
            .sync_all()
            .map_err(io_error("sync", &to_path))
    }

    /// Removes files of the chain's directory that the manifest no longer lists.
    fn remove_files(&self, names: &[String]) -> Result<(), LayerError> {
        for name in names {
            files::remove_file(&self.dir.join(name))?;
        }
        files::sync_dir(&self.dir)
    }
}
