//! A layer's allocation map in memory: one bit per block, set when the layer holds the block
//! (its data, or zeros it was written or trimmed to). Kept as the bytes stored on disk (bit
//! `b` at byte `b / 8`, bit `b % 8`, the same on every machine), so hashing or writing the
//! map costs no conversion, with the count of held blocks kept up to date, so a snapshot's
//! size costs nothing to report. The head's map remembers which of its pages changed since
//! the last flush, so a flush writes only those.

use std::collections::BTreeSet;

/// Bytes of bitmap in one page written at a flush (8 times as many blocks).
pub(super) const PAGE_BYTES: usize = 4096;

/// The blocks a layer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Bitmap {
    bytes: Vec<u8>,
    blocks: u64,
    held: u64,
    /// Pages changed since [`Bitmap::take_dirty`] last ran.
    dirty: BTreeSet<usize>,
}

/// The bytes a bitmap of `blocks` blocks takes on disk.
pub(super) fn byte_len(blocks: u64) -> u64 {
    blocks.div_ceil(8)
}

impl Bitmap {
    /// A map of `blocks` blocks holding none.
    pub(super) fn new(blocks: u64) -> Bitmap {
        Bitmap {
            bytes: vec![0; byte_len(blocks) as usize],
            blocks,
            held: 0,
            dirty: BTreeSet::new(),
        }
    }

    /// The map of `blocks` blocks in `bytes` (at least [`byte_len`] of them); bits past
    /// `blocks` are ignored.
    pub(super) fn from_bytes(bytes: &[u8], blocks: u64) -> Option<Bitmap> {
        let bytes = bytes.get(..usize::try_from(byte_len(blocks)).ok()?)?;
        let mut map = Bitmap {
            bytes: bytes.to_vec(),
            blocks,
            held: 0,
            dirty: BTreeSet::new(),
        };
        map.held = map.bytes.iter().map(|b| u64::from(b.count_ones())).sum();
        map.clear_tail();
        Some(map)
    }

    /// The map as stored on disk: [`byte_len`] bytes.
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes of page `page` as stored on disk (the last page may be short).
    pub(super) fn page_bytes(&self, page: usize) -> &[u8] {
        let start = (page * PAGE_BYTES).min(self.bytes.len());
        let end = (start + PAGE_BYTES).min(self.bytes.len());
        &self.bytes[start..end]
    }

    pub(super) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// How many blocks the map holds.
    pub(super) fn count(&self) -> u64 {
        self.held
    }

    /// True when the layer holds block `block` (false past its end).
    pub(super) fn get(&self, block: u64) -> bool {
        block < self.blocks && self.bytes[(block / 8) as usize] & (1 << (block % 8)) != 0
    }

    /// Marks blocks `start..end` (clipped to the map) held.
    pub(super) fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut block = start;
        while block < end {
            let bit = block % 8;
            let n = (8 - bit).min(end - block);
            let mask = (((1u16 << n) - 1) << bit) as u8;
            self.or_byte((block / 8) as usize, mask);
            block += n;
        }
    }

    /// Adds every block `other` holds (within this map).
    pub(super) fn union_with(&mut self, other: &Bitmap) {
        let n = self.bytes.len().min(other.bytes.len());
        for i in 0..n {
            let theirs = other.bytes[i];
            if theirs != 0 {
                self.or_byte(i, theirs);
            }
        }
        self.clear_tail();
    }

    /// The blocks this map holds and `other` does not.
    pub(super) fn minus(&self, other: &Bitmap) -> Bitmap {
        let mut out = Bitmap::new(self.blocks);
        for (i, mine) in self.bytes.iter().enumerate() {
            let left = mine & !other.bytes.get(i).copied().unwrap_or(0);
            out.bytes[i] = left;
            out.held += u64::from(left.count_ones());
        }
        out
    }

    /// Makes the map `blocks` long; the new blocks are not held. Never shrinks.
    pub(super) fn grow(&mut self, blocks: u64) {
        if blocks > self.blocks {
            self.bytes.resize(byte_len(blocks) as usize, 0);
            self.blocks = blocks;
        }
    }

    /// The first held block at or after `from`, if any.
    pub(super) fn next_set(&self, from: u64) -> Option<u64> {
        self.next_where(from, 0x00)
    }

    /// The first block at or after `from` that is not held (the map's length if none).
    pub(super) fn next_clear(&self, from: u64) -> u64 {
        self.next_where(from, 0xff).unwrap_or(self.blocks)
    }

    /// The pages changed since the last call, which forgets them.
    pub(super) fn take_dirty(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Forgets the changed pages without returning them.
    pub(super) fn mark_clean(&mut self) {
        self.dirty.clear();
    }

    fn or_byte(&mut self, i: usize, mask: u8) {
        let old = self.bytes[i];
        let new = old | mask;
        if new != old {
            self.bytes[i] = new;
            self.held += u64::from((new & !old).count_ones());
            self.dirty.insert(i / PAGE_BYTES);
        }
    }

    /// The first block at or after `from` whose bit differs from the bits of `skip` (0x00 to
    /// find a held block, 0xff to find one not held).
    fn next_where(&self, from: u64, skip: u8) -> Option<u64> {
        let mut block = from;
        while block < self.blocks {
            let byte = self.bytes[(block / 8) as usize];
            if block.is_multiple_of(8) && byte == skip {
                block += 8;
                continue;
            }
            if (byte & (1 << (block % 8)) != 0) != (skip == 0xff) {
                return Some(block);
            }
            block += 1;
        }
        None
    }

    /// Clears the bits past the last block, which no layer may hold.
    fn clear_tail(&mut self) {
        let used = self.blocks % 8;
        if used != 0 {
            if let Some(last) = self.bytes.last_mut() {
                let kept = *last & ((1u8 << used) - 1);
                self.held -= u64::from((*last ^ kept).count_ones());
                *last = kept;
            }
        }
    }
}
