//! A local file as a member replica: positional reads and writes, `fdatasync` for flush,
//! `O_DSYNC` writes for FUA, and hole punching for trim. Used by strict-local volumes and by
//! the engine's tests and benchmarks.
//!
//! Reads and ordinary writes run on tokio's blocking pool by default ([`FileIo::Blocking`]);
//! [`FileIo::Inline`] runs them on the calling task instead, which saves two thread hand-offs
//! per request when the data is in the page cache. FUA writes, flushes and trims wait for
//! the disk, so they always run on the blocking pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::replica::io::{ReplicaIo, ReplicaIoError};

/// The largest buffer of zeroes written at once when a file system cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;

/// Where a [`FileReplica`] runs its reads and ordinary (non-FUA) writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileIo {
    /// On tokio's blocking pool: never stalls the runtime, and every request in flight can
    /// be at the disk at once. Right for volumes larger than the page cache.
    #[default]
    Blocking,
    /// On the calling task: no thread hand-off, so far less overhead per request while the
    /// data is in the page cache; but a cache miss stalls a runtime worker, and the disk sees
    /// at most one request per worker. For cached data, and to measure the engine itself.
    Inline,
}

/// A replica whose data is a file on this node.
pub struct FileReplica {
    id: String,
    size: u64,
    io: FileIo,
    /// For reads, ordinary writes, flush and trim.
    file: Arc<File>,
    /// The same file opened with `O_DSYNC`, for FUA writes: durable when `pwrite` returns,
    /// without flushing the rest of the file.
    dsync: Arc<File>,
}

impl FileReplica {
    /// Opens `path` as replica `id` of a volume of `size` bytes. The file must exist and
    /// be at least `size` bytes long (a replica's data file is created at the volume's size).
    pub fn open(id: impl Into<String>, path: &Path, size: u64) -> io::Result<FileReplica> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} holds {len} bytes, less than the volume's {size}",
                    path.display()
                ),
            ));
        }
        let dsync = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(path)?;
        Ok(FileReplica {
            id: id.into(),
            size,
            io: FileIo::default(),
            file: Arc::new(file),
            dsync: Arc::new(dsync),
        })
    }

    /// The same replica with reads and ordinary writes run as `io` says.
    pub fn with_io(mut self, io: FileIo) -> FileReplica {
        self.io = io;
        self
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ReplicaIoError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ReplicaIoError::Invalid {
                replica: self.id.clone(),
                why: format!("{len} bytes at {offset} run past the end ({})", self.size),
            }),
        }
    }

    fn io_error(&self, what: &str, e: io::Error) -> ReplicaIoError {
        ReplicaIoError::Io {
            replica: self.id.clone(),
            why: format!("{what}: {e}"),
        }
    }

    /// Runs blocking file I/O on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, ReplicaIoError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.io_error(what, e)),
            Err(e) => Err(self.io_error(what, io::Error::other(e.to_string()))),
        }
    }
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Writes zeroes over `[offset, offset + len)` of `file`.
fn write_zeroes(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let end = offset.saturating_add(len);
    while offset < end {
        let n = usize::try_from(end - offset).map_or(zeroes.len(), |r| r.min(zeroes.len()));
        file.write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

#[async_trait]
impl ReplicaIo for FileReplica {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        self.check(offset, u64::from(len))?;
        let read = move |file: &File| {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        };
        match self.io {
            FileIo::Inline => read(&self.file).map_err(|e| self.io_error("read", e)),
            FileIo::Blocking => {
                let file = Arc::clone(&self.file);
                self.blocking("read", move || read(&file)).await
            }
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        self.check(offset, data.len() as u64)?;
        if !fua && self.io == FileIo::Inline {
            return self
                .file
                .write_all_at(&data, offset)
                .map_err(|e| self.io_error("write", e));
        }
        let file = Arc::clone(if fua { &self.dsync } else { &self.file });
        self.blocking("write", move || file.write_all_at(&data, offset))
            .await
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        let file = Arc::clone(&self.file);
        self.blocking("fdatasync", move || file.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.check(offset, u64::from(len))?;
        let file = Arc::clone(&self.file);
        self.blocking("punch hole", move || {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&*file, mode, off_t(offset)?, off_t(u64::from(len))?) {
                Ok(()) => Ok(()),
                // Trimmed bytes must read back as zeroes: without hole punching, write them.
                Err(nix::errno::Errno::EOPNOTSUPP) => write_zeroes(&file, offset, u64::from(len)),
                Err(e) => Err(io::Error::from(e)),
            }
        })
        .await
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
        self.check(offset, u64::from(len))?;
        let file = Arc::clone(&self.file);
        self.blocking("map extents", move || {
            crate::replica::extents::data_extents(&file, offset, len)
        })
        .await
    }

    async fn checksum(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<[u8; crate::replica::wire::CHECKSUM_LEN], ReplicaIoError> {
        self.check(offset, u64::from(len))?;
        let file = Arc::clone(&self.file);
        self.blocking("checksum", move || {
            crate::replica::extents::checksum(&file, offset, len)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn replica(size: u64) -> (tempfile::TempDir, std::path::PathBuf, FileReplica) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        let r = FileReplica::open("r1", &path, size).unwrap();
        (dir, path, r)
    }

    #[tokio::test]
    async fn reads_back_writes_and_trims_to_zeroes() {
        for io in [FileIo::Blocking, FileIo::Inline] {
            let (_dir, path, r) = replica(1 << 20);
            reads_back_writes_and_trims(path, r.with_io(io)).await;
        }
    }

    async fn reads_back_writes_and_trims(path: std::path::PathBuf, r: FileReplica) {
        assert_eq!(r.id(), "r1");
        assert!(r.is_local());
        r.write(8192, Bytes::from(vec![7u8; 65536]), false)
            .await
            .unwrap();
        r.write(3, Bytes::from_static(b"abc"), true).await.unwrap();
        r.flush().await.unwrap();
        assert_eq!(&r.read(0, 8).await.unwrap()[..], b"\0\0\0abc\0\0");
        assert!(std::fs::metadata(&path).unwrap().blocks() > 0);
        r.trim(8192, 65536).await.unwrap();
        assert_eq!(r.read(8192, 65536).await.unwrap(), vec![0u8; 65536]);
        // Unaligned trims zero exactly the range.
        r.write(0, Bytes::from(vec![9u8; 100]), false)
            .await
            .unwrap();
        r.trim(10, 20).await.unwrap();
        let data = r.read(0, 100).await.unwrap();
        assert!(data[..10].iter().all(|b| *b == 9));
        assert!(data[10..30].iter().all(|b| *b == 0));
        assert!(data[30..].iter().all(|b| *b == 9));
    }

    #[tokio::test]
    async fn refuses_ranges_past_the_end_and_short_files() {
        let (_dir, path, r) = replica(4096);
        for e in [
            r.read(4096, 1).await.unwrap_err(),
            r.write(u64::MAX, Bytes::from_static(b"x"), false)
                .await
                .unwrap_err(),
            r.trim(4000, 100).await.unwrap_err(),
        ] {
            assert!(matches!(e, ReplicaIoError::Invalid { .. }), "{e}");
        }
        assert!(FileReplica::open("r2", &path, 4097).is_err());
    }

    #[test]
    fn write_zeroes_covers_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 3 * ZERO_CHUNK]).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_zeroes(&file, 5, 2 * ZERO_CHUNK as u64 + 3).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..5].iter().all(|b| *b == 1));
        assert!(data[5..2 * ZERO_CHUNK + 8].iter().all(|b| *b == 0));
        assert!(data[2 * ZERO_CHUNK + 8..].iter().all(|b| *b == 1));
    }
}
