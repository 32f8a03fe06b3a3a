//! The I/O an engine does against one member replica, whether it sits behind the network
//! (the replica protocol's client) or is a local file. The engine fans writes out to every
//! member through this trait; the replica server and client implement it on the wire.

use async_trait::async_trait;
use bytes::Bytes;

/// Why a member's I/O failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReplicaIoError {
    /// The replica refused the request because a session with a newer epoch exists: the
    /// caller has been fenced and must stop.
    #[error("replica {replica}: fenced by epoch {current} (this session has epoch {ours})")]
    Fenced {
        replica: String,
        ours: u64,
        current: u64,
    },
    /// The replica is unreachable or its connection broke.
    #[error("replica {replica}: unreachable: {why}")]
    Unreachable { replica: String, why: String },
    /// The replica answered with an I/O error.
    #[error("replica {replica}: I/O error: {why}")]
    Io { replica: String, why: String },
    /// The request was outside the volume or otherwise invalid.
    #[error("replica {replica}: invalid request: {why}")]
    Invalid { replica: String, why: String },
}

/// One member replica as the engine sees it.
#[async_trait]
pub trait ReplicaIo: Send + Sync + 'static {
    /// The replica's id.
    fn id(&self) -> &str;
    /// True when the replica's data is on this node (reads prefer it).
    fn is_local(&self) -> bool;
    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError>;
    /// Writes `data` at `offset`; with `fua`, it is on stable storage when this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError>;
    /// Makes every completed write durable (fsync).
    async fn flush(&self) -> Result<(), ReplicaIoError>;
    /// Discards `len` bytes at `offset` (they read back as zeros).
    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError>;

    /// The ranges within `len` bytes at `offset` that hold data (the rest read as zeros), in
    /// order, at most [`crate::replica::wire::MAX_EXTENTS`]. By default the whole range, which is
    /// always true, if wasteful.
    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
        Ok(vec![(offset, len)])
    }

    /// The XXH3-128 digest of `len` bytes at `offset`. By default by reading them.
    async fn checksum(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<[u8; crate::replica::wire::CHECKSUM_LEN], ReplicaIoError> {
        Ok(crate::replica::extents::digest(
            &self.read(offset, len).await?,
        ))
    }

    /// Cuts the snapshot `name` of the replica: every write it completed before is in it,
    /// none that comes after. The caller (the engine) has drained its writes first. Taking a
    /// name that exists is Ok and changes nothing. By default refused: the replica keeps no
    /// snapshots.
    async fn snapshot(&self, name: &str) -> Result<(), ReplicaIoError> {
        Err(unsupported(self.id(), &format!("snapshot {name:?}")))
    }

    /// Deletes the snapshot `name` (its space is merged or freed); a name that is gone is Ok.
    async fn delete_snapshot(&self, name: &str) -> Result<(), ReplicaIoError> {
        Err(unsupported(self.id(), &format!("delete snapshot {name:?}")))
    }

    /// Reads `len` bytes at `offset` of the snapshot `name`'s view of the volume.
    async fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, ReplicaIoError> {
        let _ = (offset, len);
        Err(unsupported(self.id(), &format!("read snapshot {name:?}")))
    }

    /// The ranges within `len` bytes at `offset` of the snapshot `name`'s view that hold data,
    /// as [`ReplicaIo::extents`] gives them for the live view.
    async fn snapshot_extents(
        &self,
        name: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
        let _ = name;
        Ok(vec![(offset, len)])
    }
}

/// The refusal of a replica that keeps no snapshots.
pub fn unsupported(replica: &str, what: &str) -> ReplicaIoError {
    ReplicaIoError::Invalid {
        replica: replica.to_string(),
        why: format!("{what}: this replica keeps no snapshots"),
    }
}
