//! What a rebuild asks of a replica's data file: which ranges hold data (so holes are not
//! copied as zeros), and a digest of a range (so the copy can be verified where it lies).
//! The digest is XXH3-128: it detects a copy that went wrong (it is not meant to resist
//! someone forging data, which the replica protocol's tokens and epochs keep out), at tens
//! of GB/s, so verification costs a rebuild little more than reading the bytes.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use nix::unistd::{lseek, Whence};
use xxhash_rust::xxh3::Xxh3;

use crate::replica::wire::{CHECKSUM_LEN, MAX_EXTENTS};

/// The ranges within `len` bytes at `offset` of `file` that hold data, in order, clipped to
/// the range; at most [`MAX_EXTENTS`] (the caller asks again from the end of the last one).
/// A file system that cannot tell holes reports the whole range as data.
pub fn data_extents(file: &File, offset: u64, len: u32) -> io::Result<Vec<(u64, u32)>> {
    let end = offset.saturating_add(u64::from(len));
    let mut extents = Vec::new();
    let mut at = offset;
    let to_off =
        |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    while at < end && extents.len() < MAX_EXTENTS {
        let data = match lseek(file.as_fd(), to_off(at)?, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data from `at` to the end of the file.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(offset, len)]),
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(file.as_fd(), to_off(data)?, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(nix::errno::Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let stop = hole.min(end);
        // Within `len` (a u32), so the extent's length fits.
        extents.push((data, (stop - data) as u32));
        at = stop;
    }
    Ok(extents)
}

/// The digest of `len` bytes at `offset` of `file`.
pub fn checksum(file: &File, offset: u64, len: u32) -> io::Result<[u8; CHECKSUM_LEN]> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; (len as usize).min(1 << 20)];
    let mut at = offset;
    let end = offset.saturating_add(u64::from(len));
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, at)?;
        hasher.update(&*chunk);
        at += n as u64;
    }
    Ok(hasher.digest128().to_le_bytes())
}

/// The digest [`checksum`] gives for `data`.
pub fn digest(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_skip_holes_and_clip_to_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(16 << 20).unwrap();
        assert_eq!(data_extents(&file, 0, 16 << 20).unwrap(), vec![]);
        file.write_all_at(&[1; 8192], 1 << 20).unwrap();
        file.write_all_at(&[2; 4096], 8 << 20).unwrap();
        let all = data_extents(&file, 0, 16 << 20).unwrap();
        // File systems allocate in blocks (tmpfs and ext4: 4 KiB): the data is covered.
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].0 <= 1 << 20 && all[0].0 + u64::from(all[0].1) >= (1 << 20) + 8192);
        assert!(all[1].0 <= 8 << 20 && all[1].0 + u64::from(all[1].1) >= (8 << 20) + 4096);
        let clipped = data_extents(&file, (1 << 20) + 4096, 4096).unwrap();
        assert_eq!(clipped, vec![((1 << 20) + 4096, 4096)]);
        assert_eq!(data_extents(&file, 2 << 20, 1 << 20).unwrap(), vec![]);
    }

    #[test]
    fn checksums_match_the_digest_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            checksum(&file, 4096, (2 << 20) + 7).unwrap(),
            digest(&data[4096..4096 + (2 << 20) + 7])
        );
        assert_eq!(checksum(&file, 0, 0).unwrap(), digest(&[]));
        assert!(checksum(&file, 3 << 20, 1).is_err(), "past the end");
    }
}
