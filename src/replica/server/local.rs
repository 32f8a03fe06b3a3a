//! In-process sessions on this node's own replicas: the same Open, token, epoch and fencing
//! rules as a network session, without the socket (a node's engine opens its local member so).

use super::*;

/// In-process access to a replica server's replicas, for the engine of a volume attached on
/// the same node: a [`LocalSession`] obeys exactly the rules of a network session — the
/// attachment token, the epoch rules of Open, and fencing under the same per-replica lock,
/// so a newer Open (from any engine, over the network or not) fences it too — without the
/// socket, the framing or a task hand-off.
#[derive(Clone)]
pub struct LocalReplicas {
    pub(super) shared: Arc<Shared>,
}

impl LocalReplicas {
    /// In-process sessions on the replicas on `disks`, with tokens verified with `secret`;
    /// the same as [`ReplicaServer::local`] of a server over those disks, without a server.
    pub fn new(disks: Vec<PathBuf>, secret: Vec<u8>) -> Result<LocalReplicas, ServerError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(ServerError::SecretTooShort(secret.len()));
        }
        let disks = disks
            .into_iter()
            .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
            .collect();
        Ok(LocalReplicas {
            shared: Arc::new(Shared { disks, secret }),
        })
    }

    /// Opens a session on replica `replica_id` of `volume_id` at attachment `epoch`, with the
    /// attachment's `token`; refused exactly as a network Open would be.
    pub async fn open(
        &self,
        volume_id: &str,
        replica_id: &str,
        epoch: u64,
        token: &str,
    ) -> Result<LocalSession, ReplicaIoError> {
        let open = Open {
            volume_id: volume_id.to_string(),
            replica_id: replica_id.to_string(),
            epoch,
            token: token.to_string(),
        };
        match open_replica(&self.shared, &open, &"this process").await {
            Ok((session, Response::Opened { size, .. })) => Ok(LocalSession {
                replica: session.replica,
                epoch,
                size,
            }),
            Ok((_, other)) | Err(other) => Err(refusal(replica_id, epoch, other)),
        }
    }
}

/// A session on a replica of this process's replica server (see [`LocalReplicas`]). Reads,
/// ordinary writes and trims run on the calling task (the page cache absorbs them); flushes
/// and FUA writes, which wait for the disk, on the blocking pool.
pub struct LocalSession {
    replica: Arc<ServedReplica>,
    epoch: u64,
    size: u64,
}

impl LocalSession {
    /// The volume's size in bytes, as the replica's metadata says.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Runs `request` inline under the replica's read lock, after the epoch check.
    async fn inline(&self, request: Request) -> Response {
        let state = self.replica.state.read().await;
        if state.epoch > self.epoch {
            return Response::Fenced {
                current: state.epoch,
            };
        }
        do_io(&state, request)
    }

    fn refused(&self, response: Response) -> ReplicaIoError {
        refusal(&self.replica.id, self.epoch, response)
    }

    fn done(&self, response: Response) -> Result<(), ReplicaIoError> {
        match response {
            Response::Done => Ok(()),
            other => Err(self.refused(other)),
        }
    }
}

#[async_trait::async_trait]
impl ReplicaIo for LocalSession {
    fn id(&self) -> &str {
        &self.replica.id
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        let request = Request::Read { offset, len };
        // A large read (a rebuild's chunk) may wait on the disk for a while: on the blocking
        // pool, so that the caller's other work (the rebuild's writes to its target) goes on.
        let response = match len > INLINE_READ_MAX {
            false => self.inline(request).await,
            true => execute(Arc::clone(&self.replica), self.epoch, request).await,
        };
        match response {
            Response::Data(data) => Ok(data),
            other => Err(self.refused(other)),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        let request = Request::Write { offset, fua, data };
        let response = match fua {
            false => self.inline(request).await,
            true => execute(Arc::clone(&self.replica), self.epoch, request).await,
        };
        self.done(response)
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        self.done(execute(Arc::clone(&self.replica), self.epoch, Request::Flush).await)
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.done(self.inline(Request::Trim { offset, len }).await)
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
        match self.inline(Request::Extents { offset, len }).await {
            Response::Extents(extents) => Ok(extents),
            other => Err(self.refused(other)),
        }
    }

    async fn checksum(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<[u8; crate::replica::wire::CHECKSUM_LEN], ReplicaIoError> {
        let request = Request::Checksum { offset, len };
        match execute(Arc::clone(&self.replica), self.epoch, request).await {
            Response::Checksum(digest) => Ok(digest),
            other => Err(self.refused(other)),
        }
    }
}
