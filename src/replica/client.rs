//! The engine's side of the replica protocol: one session on one replica over one TCP
//! connection, implementing [`ReplicaIo`].
//!
//! Requests are pipelined: any number of callers share the connection. Each request gets a
//! tag and a oneshot channel; a writer task sends the frames (several to a write when they
//! queue up) and a reader task hands each answer to the caller waiting on its tag. When the
//! connection breaks, every waiting caller gets `Unreachable`, and so does every later call,
//! at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::replica::io::{ReplicaIo, ReplicaIoError};
use crate::replica::wire::{self, Open, Request, Response, Tag};

/// How long [`ReplicaClient::connect`] waits for the connection and the Open's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames at least this long are written on their own rather than copied into a batch.
const LARGE_FRAME: usize = 64 << 10;
/// Small frames are gathered into writes of up to this many bytes.
const WRITE_BATCH: usize = 256 << 10;
/// Requests queued for the writer before callers wait.
const QUEUE: usize = 256;

/// An open session on a replica.
pub struct ReplicaClient {
    replica_id: String,
    local: bool,
    epoch: u64,
    size: u64,
    next_tag: AtomicU64,
    outgoing: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    tasks: [AbortHandle; 2],
}

/// What the caller side and the connection tasks share.
struct Shared {
    replica_id: String,
    pending: Mutex<Pending>,
    /// Set to true once the connection is broken; wakes the tasks to stop.
    broken_tx: watch::Sender<bool>,
}

#[derive(Default)]
struct Pending {
    /// The callers waiting for an answer, by tag.
    waiting: HashMap<Tag, oneshot::Sender<Response>>,
    /// Why the connection broke, once it has.
    broken: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection broken (the first reason stays) and fails every waiting caller.
    /// `lost` says it broke rather than being closed by its owner.
    fn fail(&self, why: String, lost: bool) {
        let waiting = {
            let mut pending = self.lock();
            if pending.broken.is_none() {
                if lost {
                    tracing::warn!(replica = %self.replica_id, "replica session lost: {why}");
                }
                pending.broken = Some(why);
            }
            std::mem::take(&mut pending.waiting)
        };
        // Dropping the senders wakes their callers, who read the reason.
        drop(waiting);
        self.broken_tx.send_replace(true);
    }

    fn unreachable(&self) -> ReplicaIoError {
        let why = self
            .lock()
            .broken
            .clone()
            .unwrap_or_else(|| "the session is closed".to_string());
        ReplicaIoError::Unreachable {
            replica: self.replica_id.clone(),
            why,
        }
    }
}

/// Removes a caller's entry if it stops waiting before its answer (cancelled or failed).
struct Waiting<'a> {
    shared: &'a Shared,
    tag: Tag,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.tag);
    }
}

impl ReplicaClient {
    /// Connects to the replica server at `addr` and opens a session on replica `replica_id`
    /// of `volume_id` at attachment `epoch`, with the attachment's `token`. `local` tells the
    /// engine that the replica's data is on this node. A replica with a higher epoch refuses
    /// with `Fenced`; a wrong token, an unknown replica or a replica of another volume with
    /// `Invalid`; a server that cannot be reached within [`CONNECT_TIMEOUT`] is
    /// `Unreachable`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        volume_id: &str,
        replica_id: &str,
        epoch: u64,
        token: &str,
        local: bool,
    ) -> Result<ReplicaClient, ReplicaIoError> {
        let open = Open {
            volume_id: volume_id.to_string(),
            replica_id: replica_id.to_string(),
            epoch,
            token: token.to_string(),
        };
        let opening = tokio::time::timeout(CONNECT_TIMEOUT, open_session(addr, &open));
        let (stream, buf, size) = match opening.await {
            Ok(opened) => opened?,
            Err(_) => {
                return Err(ReplicaIoError::Unreachable {
                    replica: replica_id.to_string(),
                    why: format!("no session within {CONNECT_TIMEOUT:?}"),
                })
            }
        };
        let (reader, writer) = stream.into_split();
        let (broken_tx, broken_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            replica_id: replica_id.to_string(),
            pending: Mutex::new(Pending::default()),
            broken_tx,
        });
        let (outgoing, to_send) = mpsc::channel(QUEUE);
        let reading = tokio::spawn(read_answers(
            reader,
            buf,
            Arc::clone(&shared),
            broken_rx.clone(),
        ));
        let writing = tokio::spawn(write_requests(
            writer,
            to_send,
            Arc::clone(&shared),
            broken_rx,
        ));
        Ok(ReplicaClient {
            replica_id: replica_id.to_string(),
            local,
            epoch,
            size,
            next_tag: AtomicU64::new(1),
            outgoing,
            shared,
            tasks: [reading.abort_handle(), writing.abort_handle()],
        })
    }

    /// The volume's size in bytes, as the replica reported it at Open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The attachment epoch of this session.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sends `request` and waits for its answer.
    async fn call(&self, request: &Request) -> Result<Response, ReplicaIoError> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::new();
        wire::encode_request(tag, request, &mut frame).map_err(|e| self.invalid(e.to_string()))?;
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut pending = self.shared.lock();
            if pending.broken.is_some() {
                drop(pending);
                return Err(self.shared.unreachable());
            }
            pending.waiting.insert(tag, answer_tx);
        }
        let _waiting = Waiting {
            shared: &self.shared,
            tag,
        };
        if self.outgoing.send(frame.freeze()).await.is_err() {
            return Err(self.shared.unreachable());
        }
        answer_rx.await.map_err(|_| self.shared.unreachable())
    }

    /// The error for an answer that is not the success expected.
    fn refused(&self, response: Response) -> ReplicaIoError {
        refusal(&self.replica_id, self.epoch, response)
    }

    fn invalid(&self, why: String) -> ReplicaIoError {
        ReplicaIoError::Invalid {
            replica: self.replica_id.clone(),
            why,
        }
    }

    /// The offset of the piece starting `start` bytes into a range at `offset`.
    fn offset_of(&self, offset: u64, start: u32) -> Result<u64, ReplicaIoError> {
        offset
            .checked_add(u64::from(start))
            .ok_or_else(|| self.invalid(format!("offset {offset} + {start} overflows")))
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        match self.call(&Request::Read { offset, len }).await? {
            Response::Data(data) if data.len() == usize::try_from(len).unwrap_or(usize::MAX) => {
                Ok(data)
            }
            Response::Data(data) => Err(ReplicaIoError::Io {
                replica: self.replica_id.clone(),
                why: format!("asked for {len} bytes, got {}", data.len()),
            }),
            other => Err(self.refused(other)),
        }
    }

    async fn write_chunk(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        match self.call(&Request::Write { offset, fua, data }).await? {
            Response::Done => Ok(()),
            other => Err(self.refused(other)),
        }
    }

    async fn done(&self, request: &Request) -> Result<(), ReplicaIoError> {
        match self.call(request).await? {
            Response::Done => Ok(()),
            other => Err(self.refused(other)),
        }
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared
            .fail("the session was closed".to_string(), false);
    }
}

/// The error for `response`, the answer of a replica that did not do what was asked.
pub(crate) fn refusal(replica_id: &str, epoch: u64, response: Response) -> ReplicaIoError {
    let replica = replica_id.to_string();
    match response {
        Response::Fenced { current } | Response::StaleEpoch { current } => ReplicaIoError::Fenced {
            replica,
            ours: epoch,
            current,
        },
        Response::BadToken => ReplicaIoError::Invalid {
            replica,
            why: format!("the replica refused the attachment token of epoch {epoch}"),
        },
        Response::NotFound => ReplicaIoError::Invalid {
            replica,
            why: "the replica server has no such replica".to_string(),
        },
        Response::NotOpen => ReplicaIoError::Invalid {
            replica,
            why: "the replica server says the session is not open".to_string(),
        },
        Response::Invalid(why) => ReplicaIoError::Invalid { replica, why },
        Response::Io(why) => ReplicaIoError::Io { replica, why },
        Response::Protocol(why) => ReplicaIoError::Unreachable {
            replica,
            why: format!("the replica server closed the session: {why}"),
        },
        Response::Done
        | Response::Opened { .. }
        | Response::Data(_)
        | Response::Extents(_)
        | Response::Checksum(_) => ReplicaIoError::Io {
            replica,
            why: format!("unexpected answer {}", answer_name(&response)),
        },
    }
}

fn answer_name(response: &Response) -> &'static str {
    match response {
        Response::Done => "Done",
        Response::Opened { .. } => "Opened",
        Response::Data(_) => "Data",
        Response::Extents(_) => "Extents",
        Response::Checksum(_) => "Checksum",
        _ => "error",
    }
}

/// Connects, sends Open and waits for its answer. Returns the stream, the bytes read past
/// the answer, and the replica's size.
async fn open_session(
    addr: impl ToSocketAddrs,
    open: &Open,
) -> Result<(TcpStream, BytesMut, u64), ReplicaIoError> {
    let replica = &open.replica_id;
    let unreachable = |why: String| ReplicaIoError::Unreachable {
        replica: replica.clone(),
        why,
    };
    let mut frame = BytesMut::new();
    wire::encode_request(0, &Request::Open(open.clone()), &mut frame).map_err(|e| {
        ReplicaIoError::Invalid {
            replica: replica.clone(),
            why: e.to_string(),
        }
    })?;
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(format!("cannot connect: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| unreachable(format!("cannot set TCP_NODELAY: {e}")))?;
    stream
        .write_all(&frame)
        .await
        .map_err(|e| unreachable(format!("cannot send Open: {e}")))?;
    let mut buf = BytesMut::with_capacity(64 << 10);
    let response = loop {
        match wire::decode_response(&mut buf) {
            Ok(Some((_, response))) => break response,
            Ok(None) => match stream.read_buf(&mut buf).await {
                Ok(0) => return Err(unreachable("closed the connection at Open".to_string())),
                Ok(_) => {}
                Err(e) => return Err(unreachable(format!("connection failed at Open: {e}"))),
            },
            Err(e) => return Err(unreachable(format!("malformed answer to Open: {e}"))),
        }
    };
    match response {
        Response::Opened { size, .. } => Ok((stream, buf, size)),
        other => Err(refusal(replica, open.epoch, other)),
    }
}

/// Hands each answer to the caller waiting for its tag, until the connection breaks.
async fn read_answers(
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    shared: Arc<Shared>,
    mut broken: watch::Receiver<bool>,
) {
    let why = loop {
        match wire::decode_response(&mut buf) {
            Ok(Some((_, Response::Protocol(message)))) => {
                break format!("the replica server closed the session: {message}")
            }
            Ok(Some((tag, response))) => {
                let waiting = shared.lock().waiting.remove(&tag);
                // No one waiting: the caller gave up (its future was dropped).
                if let Some(waiting) = waiting {
                    let _ = waiting.send(response);
                }
            }
            Ok(None) => {
                tokio::select! {
                    read = reader.read_buf(&mut buf) => match read {
                        Ok(0) => break "the replica server closed the connection".to_string(),
                        Ok(_) => {}
                        Err(e) => break format!("the connection failed: {e}"),
                    },
                    _ = broken.wait_for(|broken| *broken) => return,
                }
            }
            Err(e) => break format!("malformed answer: {e}"),
        }
    };
    shared.fail(why, true);
}

/// Sends the callers' frames, gathering small ones queued together into one write.
async fn write_requests(
    mut writer: OwnedWriteHalf,
    mut to_send: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    mut broken: watch::Receiver<bool>,
) {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let first = tokio::select! {
            frame = to_send.recv() => frame,
            _ = broken.wait_for(|broken| *broken) => return,
        };
        let Some(first) = first else {
            // The client was dropped.
            let _ = writer.shutdown().await;
            return;
        };
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(frame) = next {
            if frame.len() >= LARGE_FRAME {
                result = flush(&mut writer, &mut batch).await;
                if result.is_ok() {
                    result = writer.write_all(&frame).await;
                }
            } else {
                batch.extend_from_slice(&frame);
            }
            if result.is_err() {
                break;
            }
            next = match batch.len() < WRITE_BATCH {
                true => to_send.try_recv().ok(),
                false => None,
            };
        }
        if result.is_ok() {
            result = flush(&mut writer, &mut batch).await;
        }
        if let Err(e) = result {
            shared.fail(format!("cannot send to the replica server: {e}"), true);
            return;
        }
    }
}

async fn flush(writer: &mut OwnedWriteHalf, batch: &mut BytesMut) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    writer.write_all(batch).await?;
    batch.clear();
    Ok(())
}

/// The pieces, each at most [`wire::MAX_IO_LEN`], of a range of `len` bytes: each piece's
/// start within the range, and its length.
fn pieces(len: u32) -> impl Iterator<Item = (u32, u32)> {
    let max = u32::try_from(wire::MAX_IO_LEN).unwrap_or(u32::MAX);
    let count = len.div_ceil(max);
    (0..count).map(move |i| {
        let start = i.saturating_mul(max);
        (start, len.saturating_sub(start).min(max))
    })
}

#[async_trait]
impl ReplicaIo for ReplicaClient {
    fn id(&self) -> &str {
        &self.replica_id
    }

    fn is_local(&self) -> bool {
        self.local
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        if usize::try_from(len).is_ok_and(|len| len <= wire::MAX_IO_LEN) {
            return self.read_chunk(offset, len).await;
        }
        // Larger than one frame carries: read in pieces, one after another.
        let mut data = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        for (start, n) in pieces(len) {
            let at = self.offset_of(offset, start)?;
            data.extend_from_slice(&self.read_chunk(at, n).await?);
        }
        Ok(data.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ReplicaIoError> {
        if data.len() <= wire::MAX_IO_LEN {
            return self.write_chunk(offset, data, fua).await;
        }
        let len = u32::try_from(data.len())
            .map_err(|_| self.invalid(format!("a write of {} bytes", data.len())))?;
        for (start, n) in pieces(len) {
            let at = self.offset_of(offset, start)?;
            let start = usize::try_from(start).unwrap_or(usize::MAX);
            let end = start.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            let piece = data
                .get(start..end)
                .ok_or_else(|| self.invalid("a write piece out of range".to_string()))?;
            self.write_chunk(at, data.slice_ref(piece), fua).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ReplicaIoError> {
        self.done(&Request::Flush).await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ReplicaIoError> {
        self.done(&Request::Trim { offset, len }).await
    }

    async fn extents(&self, offset: u64, len: u32) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
        match self.call(&Request::Extents { offset, len }).await? {
            Response::Extents(extents) => {
                // In order, inside the range asked, not empty: else the answer is wrong.
                let end = offset.saturating_add(u64::from(len));
                let mut at = offset;
                for &(o, l) in &extents {
                    let stop = o.checked_add(u64::from(l));
                    if o < at || l == 0 || stop.is_none_or(|s| s > end) {
                        return Err(ReplicaIoError::Io {
                            replica: self.replica_id.clone(),
                            why: format!("extent {o}+{l} is not an ordered part of {offset}+{len}"),
                        });
                    }
                    at = stop.unwrap_or(end);
                }
                Ok(extents)
            }
            other => Err(self.refused(other)),
        }
    }

    async fn checksum(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<[u8; wire::CHECKSUM_LEN], ReplicaIoError> {
        if usize::try_from(len).is_ok_and(|len| len > wire::MAX_IO_LEN) {
            return Err(self.invalid(format!(
                "a checksum covers at most {} bytes, not {len}",
                wire::MAX_IO_LEN
            )));
        }
        match self.call(&Request::Checksum { offset, len }).await? {
            Response::Checksum(digest) => Ok(digest),
            other => Err(self.refused(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_ranges_split_into_pieces_that_fit_a_frame() {
        let max = wire::MAX_IO_LEN as u32;
        assert_eq!(pieces(5).collect::<Vec<_>>(), [(0, 5)]);
        assert_eq!(pieces(0).count(), 0);
        assert_eq!(pieces(max).collect::<Vec<_>>(), [(0, max)]);
        assert_eq!(
            pieces(2 * max + 3).collect::<Vec<_>>(),
            [(0, max), (max, max), (2 * max, 3)]
        );
        let all: Vec<_> = pieces(u32::MAX).collect();
        assert_eq!(
            all.iter().map(|(_, n)| *n as u64).sum::<u64>(),
            u32::MAX as u64
        );
        assert!(all.iter().all(|(_, n)| *n as usize <= wire::MAX_IO_LEN));
        assert!(all.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
    }
}
