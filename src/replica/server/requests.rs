//! What a session's requests do to a replica's data file: positional reads and writes, flush,
//! trim (hole punching, zeroing where punching is not possible), extents and checksums, each
//! checked against the replica's size.

use super::*;

/// Runs one request of a session with epoch `epoch`: checks the epoch and does the I/O
/// under the replica's read lock, held until the I/O is over.
pub(super) async fn execute(replica: Arc<ServedReplica>, epoch: u64, request: Request) -> Response {
    let state = Arc::clone(&replica.state).read_owned().await;
    if state.epoch > epoch {
        return Response::Fenced {
            current: state.epoch,
        };
    }
    let id = replica.id.clone();
    // The lock moves into the blocking task: it is released when the I/O is over, even if
    // the session is dropped meanwhile.
    match tokio::task::spawn_blocking(move || do_io(&state, request)).await {
        Ok(response) => response,
        Err(e) => Response::Io(format!("replica {id:?}: the I/O task failed: {e}")),
    }
}

/// The disk I/O of one request.
pub(super) fn do_io(state: &ReplicaState, request: Request) -> Response {
    let Some(file) = &state.file else {
        return Response::Io("the replica's data file is not open".to_string());
    };
    let size = state.size;
    let result = match request {
        Request::Read { offset, len } => {
            if let Err(refusal) = check_range("read", offset, u64::from(len), size) {
                return refusal;
            }
            let mut data = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            file.read_exact_at(&mut data, offset)
                .map(|()| Response::Data(Bytes::from(data)))
        }
        Request::Write { offset, fua, data } => {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            if let Err(refusal) = check_range("write", offset, len, size) {
                return refusal;
            }
            file.write_all_at(&data, offset)
                .and_then(|()| if fua { file.sync_data() } else { Ok(()) })
                .map(|()| Response::Done)
        }
        Request::Flush => file.sync_data().map(|()| Response::Done),
        Request::Trim { offset, len } => {
            if let Err(refusal) = check_range("trim", offset, u64::from(len), size) {
                return refusal;
            }
            punch_hole(file, offset, len).map(|()| Response::Done)
        }
        Request::Extents { offset, len } => {
            if let Err(refusal) = check_range("extents", offset, u64::from(len), size) {
                return refusal;
            }
            crate::replica::extents::data_extents(file, offset, len).map(Response::Extents)
        }
        Request::Checksum { offset, len } => {
            if let Err(refusal) = check_range("checksum", offset, u64::from(len), size) {
                return refusal;
            }
            crate::replica::extents::checksum(file, offset, len).map(Response::Checksum)
        }
        Request::Open(_) => return Response::Invalid("the session is open already".to_string()),
    };
    result.unwrap_or_else(|e| Response::Io(e.to_string()))
}

pub(super) fn check_range(what: &str, offset: u64, len: u64, size: u64) -> Result<(), Response> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Response::Invalid(format!(
            "{what} of {len} bytes at offset {offset} goes beyond the end of the volume \
             ({size} bytes)"
        ))),
    }
}

/// Discards a range: a hole punched in the data file, or zeros written where the filesystem
/// cannot punch holes.
pub(super) fn punch_hole(file: &File, offset: u64, len: u32) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "offset out of range");
    let start = i64::try_from(offset).map_err(|_| too_far())?;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match nix::fcntl::fallocate(file, flags, start, i64::from(len)) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
            let end = offset.checked_add(u64::from(len)).ok_or_else(too_far)?;
            let mut at = offset;
            while at < end {
                let n = usize::try_from(end - at).map_or(zeros.len(), |n| n.min(zeros.len()));
                let chunk = zeros.get(..n).ok_or_else(too_far)?;
                file.write_all_at(chunk, at)?;
                at = at.checked_add(n as u64).ok_or_else(too_far)?;
            }
            Ok(())
        }
        Err(errno) => Err(io::Error::from(errno)),
    }
}
