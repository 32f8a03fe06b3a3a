//! The engine's NBD server on a unix socket: accepts any number of clients; on each
//! connection runs the handshake, then reads requests and hands each to its own task, so
//! requests on one connection run concurrently and are answered as they complete (out of
//! order, by handle). In-flight requests and payload bytes are bounded per connection: at
//! the bound the server stops reading from that client.
//!
//! A client that breaks the protocol is disconnected with a logged error; its requests
//! already handed to the engine still complete (a half-applied write would leave the members
//! different), only their replies are dropped.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::{Engine, EngineError};
use crate::engine::nbd::{
    self, Command, Errno, Handshake, HandshakeStatus, ProtocolError, Request,
};

/// How much the reader asks the socket for at least, per read.
const READ_CHUNK: usize = 64 * 1024;
/// A read buffer larger than this is dropped once empty.
const KEEP_BUFFER: usize = 1 << 20;
/// The reply writer's buffer.
const WRITE_BUFFER: usize = 256 * 1024;

impl Engine {
    /// Serves the volume over NBD on a unix socket at `socket_path` (created with mode 0600;
    /// a stale socket there is replaced) until `shutdown` completes, and keeps the lease
    /// meanwhile. On shutdown it stops accepting and reading, lets in-flight requests finish
    /// (up to [`super::EngineConfig::shutdown_grace`]) and removes the socket.
    pub async fn serve_unix(
        &self,
        socket_path: impl AsRef<Path>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), EngineError> {
        let path = socket_path.as_ref();
        let listener = bind(path).map_err(|source| EngineError::Socket {
            volume: self.volume_id().to_string(),
            path: path.display().to_string(),
            source,
        })?;
        info!(volume = %self.volume_id(), socket = %path.display(), size = self.size(),
            members = ?self.member_ids(), "serving NBD");
        let (stop_tx, stop_rx) = watch::channel(false);
        let lease = {
            let engine = self.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                engine
                    .keep_lease(async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await
            })
        };
        let mut connections = JoinSet::new();
        let mut next_id = 0u64;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_id += 1;
                        connections.spawn(connection(self.clone(), stream, next_id, stop_rx.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        warn!(volume = %self.volume_id(), error = %e, "accepting an NBD client failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        info!(volume = %self.volume_id(), "NBD server shutting down");
        let _ = stop_tx.send(true);
        drop(listener);
        if let Err(e) = std::fs::remove_file(path) {
            warn!(volume = %self.volume_id(), socket = %path.display(), error = %e,
                "could not remove the NBD socket");
        }
        let drained = tokio::time::timeout(self.config().shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(volume = %self.volume_id(), "NBD clients still busy after the grace period; dropping them");
            self.inner
                .unclean
                .store(true, std::sync::atomic::Ordering::Release);
            connections.abort_all();
        }
        lease.abort();
        Ok(())
    }
}

/// Binds the socket, replacing a stale socket file (never any other kind of file).
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Why a connection ended.
enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the protocol.
    Protocol(ProtocolError),
    /// The socket failed.
    Io(io::Error),
}

async fn connection(engine: Engine, stream: UnixStream, id: u64, stop: watch::Receiver<bool>) {
    let span = info_span!("nbd", volume = %engine.volume_id(), conn = id);
    async move {
        let timeout = engine.config().handshake_timeout;
        let (stream, leftover) =
            match tokio::time::timeout(timeout, handshake(&engine, stream)).await {
                Ok(Ok(Some(ok))) => ok,
                Ok(Ok(None)) => {
                    debug!("client ended the handshake");
                    return;
                }
                Ok(Err(End::Protocol(e))) => {
                    error!(error = %e, "NBD client broke the handshake; disconnecting it");
                    return;
                }
                Ok(Err(End::Io(e))) => {
                    debug!(error = %e, "NBD handshake failed");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    warn!(
                        ?timeout,
                        "NBD client did not finish the handshake; disconnecting it"
                    );
                    return;
                }
            };
        debug!("NBD client entered transmission");
        transmission(engine, stream, leftover, stop).await;
    }
    .instrument(span)
    .await
}

/// Runs the handshake; `None` when the client aborted it.
async fn handshake(
    engine: &Engine,
    mut stream: UnixStream,
) -> Result<Option<(UnixStream, BytesMut)>, End> {
    let mut hs = Handshake::new(engine.export());
    let mut status = HandshakeStatus::Continue;
    let mut chunk = vec![0u8; 4096];
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(End::Io)?;
        }
        match status {
            HandshakeStatus::Transmission => return Ok(Some((stream, hs.into_leftover()))),
            HandshakeStatus::Aborted => return Ok(None),
            HandshakeStatus::Continue => {}
        }
        let n = stream.read(&mut chunk).await.map_err(End::Io)?;
        if n == 0 {
            return Ok(None);
        }
        status = hs
            .receive(chunk.get(..n).unwrap_or_default())
            .map_err(End::Protocol)?;
    }
}

/// A reply on its way to the client, holding the request's in-flight permits until sent.
struct Reply {
    handle: u64,
    result: Result<Option<Bytes>, Errno>,
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

async fn transmission(
    engine: Engine,
    stream: UnixStream,
    mut buf: BytesMut,
    mut stop: watch::Receiver<bool>,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(wr, rx).in_current_span());
    let config = engine.config();
    let limits = Limits {
        requests: Arc::new(Semaphore::new(config.max_in_flight_requests)),
        bytes: Arc::new(Semaphore::new(config.max_in_flight_bytes)),
        max_bytes: config.max_in_flight_bytes,
    };
    let end = read_requests(&engine, &mut rd, &mut buf, &tx, &limits, &mut stop).await;
    drop(tx);
    match end {
        End::Disconnect | End::Eof | End::Shutdown => {
            // Every outstanding request is answered before the connection closes.
            match writer.await {
                Ok(Ok(())) => debug!("NBD client disconnected"),
                Ok(Err(e)) => debug!(error = %e, "NBD client went away before its replies"),
                Err(e) => warn!(error = %e, "NBD reply writer failed"),
            }
        }
        End::Protocol(e) => {
            error!(error = %e, "NBD client sent garbage; disconnecting it");
            writer.abort();
        }
        End::Io(e) => {
            debug!(error = %e, "NBD connection failed");
            writer.abort();
        }
    }
}

async fn read_requests(
    engine: &Engine,
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    tx: &mpsc::UnboundedSender<Reply>,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) -> End {
    loop {
        loop {
            match nbd::decode_request(buf) {
                Ok(Some(request)) => {
                    if request.command == Command::Disconnect {
                        return End::Disconnect;
                    }
                    dispatch(engine, request, tx, limits).await;
                }
                Ok(None) => break,
                Err(e) => return End::Protocol(e),
            }
        }
        if *stop.borrow() {
            return End::Shutdown;
        }
        if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
            // Grown for a large write: give the memory back.
            *buf = BytesMut::new();
        }
        let want = nbd::request_len_hint(buf).saturating_sub(buf.len());
        buf.reserve(want.max(READ_CHUNK));
        tokio::select! {
            _ = stop.changed() => return End::Shutdown,
            read = rd.read_buf(buf) => match read {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(e) => return End::Io(e),
            },
        }
    }
}

/// Takes the request's in-flight permits (waiting for them is the back-pressure), then
/// refuses it or hands it to its own task.
async fn dispatch(
    engine: &Engine,
    request: Request,
    tx: &mpsc::UnboundedSender<Reply>,
    limits: &Limits,
) {
    let Ok(request_permit) = Arc::clone(&limits.requests).acquire_owned().await else {
        return;
    };
    let payload = match &request.command {
        Command::Read { len, .. } => *len as usize,
        Command::Write { data, .. } => data.len(),
        _ => 0,
    };
    let bytes_permit = if payload > 0 {
        // At most the whole budget, which is at least one maximal request.
        let n = u32::try_from(payload.min(limits.max_bytes)).unwrap_or(u32::MAX);
        Arc::clone(&limits.bytes).acquire_many_owned(n).await.ok()
    } else {
        None
    };
    let permits = Permits {
        _request: request_permit,
        _bytes: bytes_permit,
    };
    let handle = request.handle;
    // Reads may reach the export's end (zeroes past the volume's); nothing else may pass
    // the volume's end.
    let bound = match request.command {
        Command::Read { .. } => engine.exported_size(),
        _ => engine.size(),
    };
    if let Err(errno) = request.check(bound) {
        debug!(
            handle,
            ?errno,
            command = request.command_name(),
            "refusing a request"
        );
        let _ = tx.send(Reply {
            handle,
            result: Err(errno),
            _permits: permits,
        });
        return;
    }
    let engine = engine.clone();
    let tx = tx.clone();
    let fua = request.fua();
    let no_hole = request.no_hole();
    let reply = move |result: Result<Option<Bytes>, EngineError>| {
        let result = result.map_err(|e| {
            debug!(handle, error = %e, "request failed");
            e.errno()
        });
        let _ = tx.send(Reply {
            handle,
            result,
            _permits: permits,
        });
    };
    match request.command {
        Command::Read { offset, len } => {
            tokio::spawn(
                async move { reply(engine.read(offset, len).await.map(Some)) }.in_current_span(),
            );
        }
        Command::Write { offset, data } => {
            let lock = engine.lock_range(offset, data.len() as u64);
            tokio::spawn(
                async move {
                    let result = engine.write_locked(lock, offset, data, fua).await;
                    reply(result.map(|()| None))
                }
                .in_current_span(),
            );
        }
        Command::Trim { offset, len } => {
            let lock = engine.lock_range(offset, u64::from(len));
            tokio::spawn(
                async move {
                    let result = engine.trim_locked(lock, offset, len, fua).await;
                    reply(result.map(|()| None))
                }
                .in_current_span(),
            );
        }
        Command::WriteZeroes { offset, len } => {
            let lock = engine.lock_range(offset, u64::from(len));
            tokio::spawn(
                async move {
                    let result = engine
                        .write_zeroes_locked(lock, offset, len, no_hole, fua)
                        .await;
                    reply(result.map(|()| None))
                }
                .in_current_span(),
            );
        }
        Command::Flush => {
            tokio::spawn(
                async move { reply(engine.flush().await.map(|()| None)) }.in_current_span(),
            );
        }
        // Disconnect is handled by the reader; `check` refused the unsupported ones.
        Command::Disconnect | Command::Unsupported { .. } => {}
    }
}

/// Writes replies as they come, batching whatever is ready into one flush.
async fn write_replies(
    wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let mut header = BytesMut::with_capacity(nbd::SIMPLE_REPLY_LEN);
    while let Some(reply) = rx.recv().await {
        put_reply(&mut out, &mut header, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            put_reply(&mut out, &mut header, reply).await?;
        }
        out.flush().await?;
    }
    Ok(())
}

async fn put_reply(
    out: &mut BufWriter<OwnedWriteHalf>,
    header: &mut BytesMut,
    reply: Reply,
) -> io::Result<()> {
    header.clear();
    nbd::encode_simple_reply(header, reply.handle, reply.result.as_ref().err().copied());
    out.write_all(header).await?;
    if let Ok(Some(data)) = &reply.result {
        out.write_all(data).await?;
    }
    Ok(())
}
