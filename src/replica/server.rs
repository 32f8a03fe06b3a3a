//! The replica server: one per node, on TCP, serving the replicas on the node's disks to the
//! engines of their volumes with the protocol of [`crate::replica::wire`].
//!
//! A connection is one session on one replica. Its first frame must be Open, which the server
//! accepts only with the attachment token for that volume and epoch, for a replica of that
//! volume on one of its disks, and at an epoch no lower than the one the replica has stored;
//! a higher epoch is persisted (fsync) before the session is accepted.
//!
//! Fencing: each replica has one in-memory state behind a read-write lock, shared by all its
//! sessions. A request holds the read lock from its epoch check to the end of its disk I/O;
//! an Open takes the write lock, so it waits for every request in flight, then persists and
//! raises the epoch. Every later request of an older session is refused with Fenced: once a
//! newer epoch has been accepted, no byte of an older session reaches the disk.
//!
//! Requests are pipelined: the server reads frames continuously. Reads, writes without FUA
//! and trims, which the page cache absorbs, run inline in batches (everything one socket read
//! brought, under one acquisition of the lock, answered in one write by the session's own
//! task); flushes and FUA writes, which wait for the disk, run on the blocking thread pool,
//! up to [`MAX_IN_FLIGHT`] of them (with at most [`MAX_IN_FLIGHT_BYTES`] of data) at once,
//! answered by a writer task. Answers carry the request's tag. A malformed frame ends its session (logged with the
//! peer's address) and nothing else.

mod local;
mod requests;
pub use local::*;
use requests::*;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::fcntl::FallocateFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio::task::JoinSet;

use crate::replica::client::refusal;
use crate::replica::io::{ReplicaIo, ReplicaIoError};
use crate::replica::token;
use crate::replica::wire::{self, Open, Request, Response, Tag};
use crate::replica::{self, ReplicaError};

/// The most requests of one session executing at once; the server stops reading the
/// session's frames while it has this many.
pub const MAX_IN_FLIGHT: usize = 64;
/// The most bytes of data (written or to be read) of one session's requests in flight.
pub const MAX_IN_FLIGHT_BYTES: usize = 2 * wire::MAX_IO_LEN;
/// How long a shutdown waits for sessions to finish their requests before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a new connection has to open its session before the server closes it.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest cluster secret the server accepts.
pub use crate::replica::token::MIN_SECRET_LEN;

/// The longest frame a connection may send before its session is open (an Open frame is far
/// smaller), so that no unauthenticated peer makes the server reserve a large buffer.
const MAX_UNOPENED_BYTES: usize = 64 << 10;
/// Answers are gathered into one write of up to this many bytes.
const WRITE_BATCH: usize = 256 << 10;
/// After refusing a session, the server reads (and drops) what the client still sends for
/// up to this long, so that closing does not reset the connection before the refusal is read.
const LINGER: Duration = Duration::from_secs(2);
/// A Trim on a filesystem that cannot punch holes writes zeros, this many at a time.
const ZERO_CHUNK: usize = 1 << 20;
/// Local reads larger than this run on the blocking pool rather than in the caller's task.
const INLINE_READ_MAX: u32 = 1 << 20;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be made.
    #[error("cannot listen for replica sessions: {0}")]
    Bind(#[source] io::Error),
    /// The cluster secret is too short to authenticate anything.
    #[error("the cluster secret is {0} bytes; at least {MIN_SECRET_LEN} are needed")]
    SecretTooShort(usize),
}

/// A replica server bound to its address, ready to [`serve`](ReplicaServer::serve).
pub struct ReplicaServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    disks: Vec<PathBuf>,
    secret: Vec<u8>,
}

/// The replicas being served in this process, by disk and replica id. An entry lives as long
/// as a session (or a request) holds it; the epoch itself is on disk, read again at every
/// Open. Process-wide rather than per server, so that every session on a replica file in this
/// process — of any server, in-process or over the network — shares one state and one lock,
/// and a newer Open fences them all.
type Registry = Mutex<HashMap<(PathBuf, String), Weak<ServedReplica>>>;

fn registry() -> &'static Registry {
    static SERVED: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    SERVED.get_or_init(Registry::default)
}

/// Tells the sessions of replica `replica_id` on `disk`, if any in this process, that
/// the replica was grown to `size` bytes (its metadata says so already): requests up to
/// the new end are served from now on, without a new Open. Blocking (it waits for I/O in
/// flight): call it off the async runtime.
pub fn replica_grown(disk: &Path, replica_id: &str, size: u64) {
    let disk = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    let served = registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&(disk, replica_id.to_string()))
        .and_then(Weak::upgrade);
    if let Some(replica) = served {
        let mut state = replica.state.blocking_write();
        if state.file.is_some() && state.size < size {
            state.size = size;
        }
    }
}

/// A replica being served, shared by all its sessions.
struct ServedReplica {
    id: String,
    disk: PathBuf,
    state: Arc<RwLock<ReplicaState>>,
}

/// What the server knows of a replica; changed only by an Open, under the write lock.
#[derive(Default)]
struct ReplicaState {
    /// The highest epoch accepted: sessions with a lower one are fenced.
    epoch: u64,
    /// The volume's size, as of the last Open.
    size: u64,
    /// The data file, opened by the first Open (and again if the replica was recreated).
    file: Option<Arc<File>>,
    /// Which incarnation of the replica `file` belongs to.
    created_ms: u64,
}

/// An open session: the replica and the epoch it was opened with.
struct Session {
    replica: Arc<ServedReplica>,
    epoch: u64,
}

/// The permits of requests in flight: a count and bytes of data.
type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// An answer of a request that ran on its own task, on its way to the client, with the
/// permits of its request (released once written, so a client that stops reading stops the
/// server reading its requests).
struct Answer {
    tag: Tag,
    response: Response,
    _permits: Option<Permits>,
}

impl ReplicaServer {
    /// Listens on `addr` for sessions on the replicas found on `disks`, verifying tokens with
    /// the cluster `secret`.
    pub async fn bind(
        addr: impl ToSocketAddrs,
        disks: Vec<PathBuf>,
        secret: Vec<u8>,
    ) -> Result<ReplicaServer, ServerError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(ServerError::SecretTooShort(secret.len()));
        }
        let listener = TcpListener::bind(addr).await.map_err(ServerError::Bind)?;
        // One spelling per disk, so that every server in the process finds the same served
        // replica for the same file.
        let disks = disks
            .into_iter()
            .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
            .collect();
        Ok(ReplicaServer {
            listener,
            shared: Arc::new(Shared { disks, secret }),
        })
    }

    /// In-process sessions on this server's replicas, for the engines of the same process.
    pub fn local(&self) -> LocalReplicas {
        LocalReplicas {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The address the server listens on (with the port chosen, if port 0 was asked for).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves sessions until `shutdown` completes; then stops accepting, lets every session
    /// finish the requests it has read and send their answers (for up to [`SHUTDOWN_GRACE`]),
    /// and closes them.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = watch::channel(false);
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = Arc::clone(&self.shared);
                        sessions.spawn(serve_connection(shared, stream, peer, stopped.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: keep serving the sessions
                        // there are, and try again shortly.
                        tracing::warn!(error = %e, "cannot accept a replica session");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(joined) = sessions.join_next(), if !sessions.is_empty() => {
                    log_session_end(joined);
                }
            }
        }
        drop(self.listener);
        stop.send_replace(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = sessions.join_next().await {
                log_session_end(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "replica sessions still busy after the shutdown grace; closing them"
            );
            sessions.shutdown().await;
        }
        tracing::info!("replica server stopped");
    }
}

fn log_session_end(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::error!(error = %e, "a replica session task failed");
    }
}

/// Serves one connection: its session, from Open to close.
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (mut reader, writer) = stream.into_split();
    let (answers, to_send) = mpsc::unbounded_channel();
    // Batches write their answers themselves; answers of requests that ran on their own go
    // through the writer task.
    let direct: SharedWriter = Arc::new(tokio::sync::Mutex::new(writer));
    let writer = tokio::spawn(write_answers(Arc::clone(&direct), to_send, peer));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let in_flight_bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    let mut session: Option<Session> = None;
    let mut buf = BytesMut::with_capacity(64 << 10);
    // Requests read and not yet run, to run together in one batch (see `Batch`).
    let mut batch = Batch::default();
    // Set when the server ends the session on its side, with an answer saying why.
    let mut refused = false;
    let open_deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    loop {
        // Before Open, nothing but a small Open frame is taken: an unauthenticated peer
        // cannot make the server hold a large buffer.
        let declared = buf
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_be_bytes(b) as usize);
        if session.is_none() && declared.is_some_and(|len| len > MAX_UNOPENED_BYTES) {
            let message = format!(
                "a frame of {} bytes before the session is open (at most {MAX_UNOPENED_BYTES} are read before an Open)",
                declared.unwrap_or_default()
            );
            tracing::warn!(%peer, "{message}; closing the replica session");
            answer(&answers, 0, Response::Protocol(message), None);
            refused = true;
            break;
        }
        let decoded = wire::decode_request(&mut buf);
        if !batch.is_empty() && (batch.is_full() || !matches!(decoded, Ok(Some(_)))) {
            // Everything read so far is decoded (or the batch is full): run it before
            // waiting for more. A frame decoded meanwhile is handled right after.
            if let Some(open_session) = &session {
                let ran = batch.run(open_session, &direct).await;
                if ran.is_err() {
                    break;
                }
            }
        }
        let (tag, request) = match decoded {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                tokio::select! {
                    read = reader.read_buf(&mut buf) => match read {
                        Ok(0) if buf.is_empty() => break,
                        Ok(0) => {
                            tracing::warn!(%peer, bytes = buf.len(), "replica session closed inside a frame");
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "replica session connection failed");
                            break;
                        }
                    },
                    _ = stopped.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep_until(open_deadline), if session.is_none() => {
                        tracing::warn!(%peer, "no Open within {OPEN_TIMEOUT:?}; closing the replica session");
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "malformed frame; closing the replica session");
                answer(&answers, 0, Response::Protocol(e.to_string()), None);
                refused = true;
                break;
            }
        };
        let Some(open_session) = &session else {
            let Request::Open(open) = request else {
                tracing::warn!(%peer, "a request before Open; closing the replica session");
                answer(&answers, tag, Response::NotOpen, None);
                refused = true;
                break;
            };
            match open_replica(&shared, &open, &peer).await {
                Ok((opened, response)) => {
                    session = Some(opened);
                    answer(&answers, tag, response, None);
                    continue;
                }
                Err(refusal) => {
                    answer(&answers, tag, refusal, None);
                    refused = true;
                    break;
                }
            }
        };
        if let Request::Open(_) = request {
            tracing::warn!(%peer, "a second Open; closing the replica session");
            let message = "the session is open already".to_string();
            answer(&answers, tag, Response::Invalid(message), None);
            refused = true;
            break;
        }
        if runs_inline(&request) {
            batch.push(tag, request);
            continue;
        }
        // Requests run in the order they arrived: the batch read before this one first.
        if !batch.is_empty() && batch.run(open_session, &direct).await.is_err() {
            break;
        }
        // Waits (and stops reading) while the session has too much in flight.
        let cost = data_len(&request).clamp(1, MAX_IN_FLIGHT_BYTES);
        let Ok(permits) = acquire(&in_flight, &in_flight_bytes, cost).await else {
            break;
        };
        let replica = Arc::clone(&open_session.replica);
        let epoch = open_session.epoch;
        let answers = answers.clone();
        tokio::spawn(async move {
            let response = execute(replica, epoch, request).await;
            answer(&answers, tag, response, Some(permits));
        });
    }
    // The writer ends once the requests in flight have sent their answers.
    drop(answers);
    if let Err(e) = writer.await {
        tracing::error!(%peer, error = %e, "the replica session's writer failed");
    }
    if refused {
        // The answer is sent and the write side shut: drain until the client closes too.
        let mut scratch = BytesMut::with_capacity(64 << 10);
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(1..) = reader.read_buf(&mut scratch).await {
                scratch.clear();
            }
        })
        .await;
    }
}

/// Whether a request runs inline, in a batch on the session's task, rather than on the
/// blocking pool: reads, writes without FUA and trims, which the page cache absorbs. What
/// waits for the disk (flush, FUA writes) runs on its own.
fn runs_inline(request: &Request) -> bool {
    match request {
        Request::Read { .. } | Request::Extents { .. } => true,
        // A large trim may have to write zeros (no hole punching): the blocking pool.
        Request::Trim { len, .. } => usize::try_from(*len).is_ok_and(|l| l <= wire::MAX_IO_LEN),
        Request::Write { fua, .. } => !fua,
        // A checksum reads a whole chunk: the blocking pool.
        Request::Open(_) | Request::Flush | Request::Checksum { .. } => false,
    }
}

/// Takes the permits for a request (or batch) moving `cost` bytes; waits while the session
/// has too much in flight. Fails only if the semaphores were closed (never).
async fn acquire(
    count: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
    cost: usize,
) -> Result<Permits, tokio::sync::AcquireError> {
    let cost = u32::try_from(cost.clamp(1, MAX_IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
    let (count, bytes) = tokio::join!(
        Arc::clone(count).acquire_owned(),
        Arc::clone(bytes).acquire_many_owned(cost)
    );
    Ok((count?, bytes?))
}

/// Requests that run together, inline: the session reads every frame the socket has, runs
/// the batch under one acquisition of the replica's lock, and sends the answers in one write.
/// Pipelined requests thus cost one read, one lock and one write per batch instead of a
/// task, a blocking-pool hand-off and a write each.
#[derive(Default)]
struct Batch {
    requests: Vec<(Tag, Request)>,
    /// The bytes of data the batch moves.
    bytes: usize,
}

impl Batch {
    /// The most requests in one batch.
    const MAX_REQUESTS: usize = 64;
    /// The most data bytes in one batch.
    const MAX_BYTES: usize = 4 << 20;

    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    fn is_full(&self) -> bool {
        self.requests.len() >= Self::MAX_REQUESTS || self.bytes >= Self::MAX_BYTES
    }

    fn push(&mut self, tag: Tag, request: Request) {
        self.bytes = self.bytes.saturating_add(data_len(&request));
        self.requests.push((tag, request));
    }

    /// Runs the batch: checks the session's epoch and does each request's I/O under the
    /// replica's read lock (so an Open that fences waits for the whole batch), then writes
    /// the answers (the session reads nothing more meanwhile: a client that stops reading
    /// stops the session). Fails only when the session must end.
    async fn run(&mut self, session: &Session, direct: &SharedWriter) -> Result<(), ()> {
        let mut frames = BytesMut::with_capacity(
            self.requests
                .iter()
                .map(|(_, r)| match r {
                    Request::Read { len, .. } => {
                        usize::try_from(*len).unwrap_or(0).saturating_add(32)
                    }
                    _ => 32,
                })
                .fold(0usize, usize::saturating_add),
        );
        {
            let state = session.replica.state.read().await;
            for (tag, request) in self.requests.drain(..) {
                let response = if state.epoch > session.epoch {
                    Response::Fenced {
                        current: state.epoch,
                    }
                } else {
                    do_io(&state, request)
                };
                encode_answer(tag, &response, &mut frames);
            }
        }
        self.bytes = 0;
        let mut writer = direct.lock().await;
        writer.write_all(&frames).await.map_err(|_| ())
    }
}

fn answer(
    answers: &mpsc::UnboundedSender<Answer>,
    tag: Tag,
    response: Response,
    permits: Option<Permits>,
) {
    // An error means the writer has gone (the client disconnected): nobody to answer.
    let _ = answers.send(Answer {
        tag,
        response,
        _permits: permits,
    });
}

/// The bytes of data a request moves.
fn data_len(request: &Request) -> usize {
    match request {
        Request::Read { len, .. } => usize::try_from(*len).unwrap_or(usize::MAX),
        Request::Write { data, .. } => data.len(),
        Request::Checksum { len, .. } => usize::try_from(*len).unwrap_or(usize::MAX),
        Request::Open(_) | Request::Flush | Request::Trim { .. } | Request::Extents { .. } => 0,
    }
}

/// The write side of a session, shared by its batches and its writer task.
type SharedWriter = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// Writes answers as they come, several to a write when they are queued together.
async fn write_answers(
    writer: SharedWriter,
    mut to_send: mpsc::UnboundedReceiver<Answer>,
    peer: SocketAddr,
) {
    let mut out = BytesMut::with_capacity(64 << 10);
    let mut sent = Vec::new();
    while let Some(first) = to_send.recv().await {
        let mut next = Some(first);
        while let Some(answer) = next {
            encode_answer(answer.tag, &answer.response, &mut out);
            sent.push(answer);
            next = match out.len() < WRITE_BATCH {
                true => to_send.try_recv().ok(),
                false => None,
            };
        }
        if let Err(e) = writer.lock().await.write_all(&out).await {
            tracing::debug!(%peer, error = %e, "cannot answer on the replica session");
            return;
        }
        out.clear();
        // Releases the permits of the answered requests.
        sent.clear();
    }
    if let Err(e) = writer.lock().await.shutdown().await {
        tracing::debug!(%peer, error = %e, "cannot close the replica session");
    }
}

/// Encodes one answer; one that cannot be encoded becomes an I/O error answer.
fn encode_answer(tag: Tag, response: &Response, out: &mut BytesMut) {
    if let Err(e) = wire::encode_response(tag, response, out) {
        let response = Response::Io(format!("cannot encode the answer: {e}"));
        // An Io answer always encodes.
        let _ = wire::encode_response(tag, &response, out);
    }
}

/// Handles an Open: verifies the token, finds the replica, applies the epoch rules. Returns
/// the session and the Opened answer, or the refusal to send before closing.
async fn open_replica(
    shared: &Arc<Shared>,
    open: &Open,
    peer: &(dyn std::fmt::Display + Sync),
) -> Result<(Session, Response), Response> {
    let refuse = |response: Response, why: &str| {
        tracing::warn!(
            %peer, volume = %open.volume_id, replica = %open.replica_id, epoch = open.epoch,
            "replica session refused: {why}"
        );
        Err(response)
    };
    if !token::verify(&shared.secret, &open.volume_id, open.epoch, &open.token) {
        return refuse(Response::BadToken, "wrong token");
    }
    let replica = match find_replica(shared, &open.replica_id).await {
        Ok(Some(replica)) => replica,
        Ok(None) => return refuse(Response::NotFound, "no such replica"),
        Err(response) => return refuse(response, "cannot look the replica up"),
    };
    let state = Arc::clone(&replica.state).write_owned().await;
    let disk = replica.disk.clone();
    let open_copy = open.clone();
    // The write lock goes into the blocking task, so that even if this session is dropped
    // meanwhile, no request runs until the epoch is persisted and raised.
    let accepted = tokio::task::spawn_blocking(move || accept(state, &disk, &open_copy)).await;
    match accepted {
        Ok(Ok(Accepted {
            size,
            epoch,
            fenced,
        })) => {
            if let Some(previous) = fenced {
                tracing::info!(
                    %peer, volume = %open.volume_id, replica = %open.replica_id,
                    "replica raised from epoch {previous} to {epoch}; older sessions are fenced"
                );
            }
            tracing::info!(
                %peer, volume = %open.volume_id, replica = %open.replica_id, epoch,
                "replica session open"
            );
            let session = Session {
                replica,
                epoch: open.epoch,
            };
            Ok((session, Response::Opened { size, epoch }))
        }
        Ok(Err(refusal)) => refuse(refusal.clone(), &describe(&refusal)),
        Err(e) => refuse(
            Response::Io(format!("the open task failed: {e}")),
            "task failed",
        ),
    }
}

fn describe(response: &Response) -> String {
    match response {
        Response::StaleEpoch { current } => format!("the replica has the higher epoch {current}"),
        Response::NotFound => "no such replica".to_string(),
        Response::Invalid(message) | Response::Io(message) => message.clone(),
        other => format!("{other:?}"),
    }
}

/// What an accepted Open found: the volume's size, the epoch now stored, and the epoch it
/// replaced if it raised it.
struct Accepted {
    size: u64,
    epoch: u64,
    fenced: Option<u64>,
}

/// The epoch rules, under the replica's write lock: refuse a lower epoch, persist a higher
/// one before accepting it, accept an equal one.
fn accept(
    mut state: tokio::sync::OwnedRwLockWriteGuard<ReplicaState>,
    disk: &Path,
    open: &Open,
) -> Result<Accepted, Response> {
    let id = &open.replica_id;
    // The metadata on disk is the truth; it is read again at every Open.
    let found = replica::open(disk, id).map_err(|e| replica_error(&e))?;
    let Some(dir) = found else {
        return Err(Response::NotFound);
    };
    if dir.volume_id != open.volume_id {
        return Err(Response::Invalid(format!(
            "replica {id:?} holds volume {:?}, not {:?}",
            dir.volume_id, open.volume_id
        )));
    }
    let current = dir.epoch.max(state.epoch);
    if open.epoch < current {
        return Err(Response::StaleEpoch { current });
    }
    let fenced = if open.epoch > dir.epoch {
        replica::set_epoch(disk, id, open.epoch).map_err(|e| match e {
            ReplicaError::EpochLowered { current, .. } => Response::StaleEpoch { current },
            other => replica_error(&other),
        })?;
        // Stored: from now on older sessions are refused, even if the rest of this Open
        // fails.
        state.epoch = open.epoch;
        Some(current)
    } else {
        None
    };
    if state.file.is_none() || state.created_ms != dir.created_ms {
        let path = dir.data_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Response::Io(format!("cannot open {}: {e}", path.display())))?;
        state.file = Some(Arc::new(file));
        state.created_ms = dir.created_ms;
    }
    state.epoch = open.epoch;
    state.size = dir.size;
    Ok(Accepted {
        size: dir.size,
        epoch: open.epoch,
        fenced,
    })
}

fn replica_error(e: &ReplicaError) -> Response {
    match e {
        ReplicaError::InvalidId { .. } => Response::Invalid(e.to_string()),
        ReplicaError::NotFound { .. } => Response::NotFound,
        _ => Response::Io(e.to_string()),
    }
}

/// The served replica `replica_id`: the one sessions share already, or the one found on the
/// server's disks. None if no disk has it.
async fn find_replica(
    shared: &Arc<Shared>,
    replica_id: &str,
) -> Result<Option<Arc<ServedReplica>>, Response> {
    if let Some(replica) = shared.served(replica_id) {
        return Ok(Some(replica));
    }
    let disks = shared.disks.clone();
    let id = replica_id.to_string();
    let found = tokio::task::spawn_blocking(move || {
        let mut failure = None;
        for disk in disks {
            match replica::open(&disk, &id) {
                Ok(Some(_)) => return Ok(Some(disk)),
                Ok(None) => {}
                Err(e @ ReplicaError::InvalidId { .. }) => return Err(replica_error(&e)),
                Err(e) => failure = Some(replica_error(&e)),
            }
        }
        match failure {
            Some(response) => Err(response),
            None => Ok(None),
        }
    })
    .await
    .map_err(|e| Response::Io(format!("the lookup task failed: {e}")))??;
    Ok(found.map(|disk| shared.serve(replica_id, disk)))
}

impl Shared {
    fn served(&self, replica_id: &str) -> Option<Arc<ServedReplica>> {
        let replicas = registry().lock().unwrap_or_else(PoisonError::into_inner);
        self.disks.iter().find_map(|disk| {
            replicas
                .get(&(disk.clone(), replica_id.to_string()))
                .and_then(Weak::upgrade)
        })
    }

    /// The served replica `replica_id`, made (on `disk`) unless a session made it meanwhile.
    fn serve(&self, replica_id: &str, disk: PathBuf) -> Arc<ServedReplica> {
        let mut replicas = registry().lock().unwrap_or_else(PoisonError::into_inner);
        let key = (disk, replica_id.to_string());
        if let Some(replica) = replicas.get(&key).and_then(Weak::upgrade) {
            return replica;
        }
        replicas.retain(|_, replica| replica.strong_count() > 0);
        let replica = Arc::new(ServedReplica {
            id: replica_id.to_string(),
            disk: key.0.clone(),
            state: Arc::new(RwLock::new(ReplicaState::default())),
        });
        replicas.insert(key, Arc::downgrade(&replica));
        replica
    }
}

#[cfg(test)]
mod tests;
