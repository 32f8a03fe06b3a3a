//! The ranges of a chain's view that hold data, for a rebuild or a clone to copy only those:
//! the union of the view's layers' maps, walked a run of held blocks at a time.

use super::bitmap::Bitmap;
use super::BLOCK_SIZE;

/// The byte ranges `(offset, len)` that hold data in one view of a chain, in order, each a
/// maximal run of blocks some layer of the view holds.
pub struct Extents {
    union: Bitmap,
    next: u64,
}

impl Extents {
    pub(super) fn new(union: Bitmap) -> Extents {
        Extents { union, next: 0 }
    }
}

impl Iterator for Extents {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.union.next_set(self.next)?;
        let stop = self.union.next_clear(start);
        self.next = stop;
        Some((start * BLOCK_SIZE, (stop - start) * BLOCK_SIZE))
    }
}
