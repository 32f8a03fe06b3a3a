//! A layer's allocation map in memory: one bit per block, set when the layer holds the block
//! (its data, or zeros it was written or trimmed to). Stored as little-endian u64 words, so
//! the bytes on disk are bit `b` at byte `b / 8`, bit `b % 8`, the same on every machine.
//! The head's map remembers which of its pages changed since the last flush, so a flush
//! writes only those.

use std::collections::BTreeSet;

/// Bytes of bitmap in one page written at a flush (and bits: blocks it covers, times 8).
pub(super) const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;

/// The blocks a layer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
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
            words: vec![0; word_count(blocks)],
            blocks,
            dirty: BTreeSet::new(),
        }
    }

    /// The map of `blocks` blocks in `bytes` (at least [`byte_len`] of them); bits past
    /// `blocks` are ignored.
    pub(super) fn from_bytes(bytes: &[u8], blocks: u64) -> Option<Bitmap> {
        let bytes = bytes.get(..usize::try_from(byte_len(blocks)).ok()?)?;
        let mut map = Bitmap::new(blocks);
        for (word, chunk) in map.words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(le);
        }
        map.clear_tail();
        Some(map)
    }

    /// The map as stored on disk: [`byte_len`] bytes.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.truncate(byte_len(self.blocks) as usize);
        bytes
    }

    /// The bytes of page `page` as stored on disk (the last page may be short).
    pub(super) fn page_bytes(&self, page: usize) -> Vec<u8> {
        let start = page * WORDS_PER_PAGE;
        let end = (start + WORDS_PER_PAGE).min(self.words.len());
        let mut bytes: Vec<u8> = self.words[start.min(end)..end]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let total = byte_len(self.blocks) as usize;
        bytes.truncate(total.saturating_sub(page * PAGE_BYTES));
        bytes
    }

    pub(super) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// True when the layer holds block `block` (false past its end).
    pub(super) fn get(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Marks blocks `start..end` (clipped to the map) held.
    pub(super) fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.blocks);
        let mut block = start;
        while block < end {
            let word = (block / 64) as usize;
            let bit = block % 64;
            let n = (64 - bit).min(end - block);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if self.words[word] & mask != mask {
                self.words[word] |= mask;
                self.dirty.insert(word / WORDS_PER_PAGE);
            }
            block += n;
        }
    }

    /// Adds every block `other` holds (within this map).
    pub(super) fn union_with(&mut self, other: &Bitmap) {
        for (i, (word, theirs)) in self.words.iter_mut().zip(&other.words).enumerate() {
            if *word | theirs != *word {
                *word |= theirs;
                self.dirty.insert(i / WORDS_PER_PAGE);
            }
        }
        self.clear_tail();
    }

    /// The blocks this map holds and `other` does not.
    pub(super) fn minus(&self, other: &Bitmap) -> Bitmap {
        let mut out = self.clone();
        out.dirty.clear();
        for (i, word) in out.words.iter_mut().enumerate() {
            *word &= !other.words.get(i).copied().unwrap_or(0);
        }
        out
    }

    /// How many blocks the map holds.
    pub(super) fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Makes the map `blocks` long; the new blocks are not held. Never shrinks.
    pub(super) fn grow(&mut self, blocks: u64) {
        if blocks > self.blocks {
            self.words.resize(word_count(blocks), 0);
            self.blocks = blocks;
        }
    }

    /// The first held block at or after `from`, if any.
    pub(super) fn next_set(&self, from: u64) -> Option<u64> {
        self.next_where(from, false)
    }

    /// The first block at or after `from` that is not held (the map's length if none).
    pub(super) fn next_clear(&self, from: u64) -> u64 {
        self.next_where(from, true).unwrap_or(self.blocks)
    }

    /// The pages changed since the last call, which forgets them.
    pub(super) fn take_dirty(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Forgets the changed pages without returning them.
    pub(super) fn mark_clean(&mut self) {
        self.dirty.clear();
    }

    /// The first block at or after `from` whose bit, inverted when `invert`, is set.
    fn next_where(&self, from: u64, invert: bool) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut word = (from / 64) as usize;
        let mut bits = self.read_word(word, invert) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let block = word as u64 * 64 + u64::from(bits.trailing_zeros());
                return (block < self.blocks).then_some(block);
            }
            word += 1;
            if word >= self.words.len() {
                return None;
            }
            bits = self.read_word(word, invert);
        }
    }

    fn read_word(&self, word: usize, invert: bool) -> u64 {
        if invert {
            !self.words[word]
        } else {
            self.words[word]
        }
    }

    /// Clears the bits past the last block, which no layer may hold.
    fn clear_tail(&mut self) {
        let used = self.blocks % 64;
        if used != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << used) - 1;
            }
        }
    }
}

fn word_count(blocks: u64) -> usize {
    blocks.div_ceil(64) as usize
}
