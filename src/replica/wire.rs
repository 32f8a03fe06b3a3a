//! The replica protocol: how an engine talks to a replica server, as frames of bytes. Sans-IO:
//! this module encodes messages into buffers and decodes them out of buffers, incrementally;
//! the server and the client own the sockets.
//!
//! Every integer is big-endian. A frame is a `u32` length of the rest of the frame, then a
//! one-byte kind, then a `u64` tag, then a body that depends on the kind:
//!
//! ```text
//! request:  len: u32 | opcode: u8 | tag: u64 | body
//! response: len: u32 | status: u8 | tag: u64 | body        (len = 9 + body length)
//! ```
//!
//! `len` is at least 9 and at most [`MAX_FRAME_LEN`]; anything else is a protocol error as
//! soon as the four length bytes have arrived. A string is a `u16` byte length then that many
//! bytes of UTF-8, each kind of string with its own bound.
//!
//! | opcode | request | body |
//! |---|---|---|
//! | 1 | Open  | volume_id: str ≤ 255 · replica_id: str ≤ 255 · epoch: u64 · token: str ≤ 128 |
//! | 2 | Read  | offset: u64 · len: u32 (≤ [`MAX_IO_LEN`]) |
//! | 3 | Write | offset: u64 · flags: u8 (bit 0 = FUA, others 0) · data: the rest (≤ [`MAX_IO_LEN`]) |
//! | 4 | Flush | (empty) |
//! | 5 | Trim  | offset: u64 · len: u32 |
//!
//! | status | response | body |
//! |---|---|---|
//! | 0 | Done: Write, Flush or Trim succeeded | (empty) |
//! | 1 | Opened: the session is open | size: u64 · epoch: u64 (the epoch now stored) |
//! | 2 | Data: a Read's bytes | data: the rest |
//! | 16 | StaleEpoch: Open refused, the replica has a higher epoch | current: u64 |
//! | 17 | Fenced: refused, a session with a newer epoch was opened | current: u64 |
//! | 18 | BadToken: Open refused, the token does not grant that volume and epoch | (empty) |
//! | 19 | NotFound: Open refused, no such replica on this node | (empty) |
//! | 20 | NotOpen: a request came before Open | (empty) |
//! | 21 | Invalid: the request is not valid (e.g. beyond the volume) | message: str ≤ 1024 |
//! | 22 | Io: the replica's disk failed the request | message: str ≤ 1024 |
//! | 23 | Protocol: the peer sent a malformed frame; the server closes | message: str ≤ 1024 |
//!
//! Requests are pipelined: a client may send many before the first answer, and the server
//! answers each, with its tag, as it completes, in any order. A session starts with Open and
//! nothing else; after a refused Open, NotOpen, or Protocol, the server closes the connection.
//!
//! The decoders never panic, whatever the input: every read is bounds-checked and every
//! length is checked before it is used (the lints below hold the module to that).

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The most data one Read may ask for or one Write may carry: 8 MiB.
pub const MAX_IO_LEN: usize = 8 << 20;
/// The largest value of a frame's length field: the largest I/O plus room for its header.
pub const MAX_FRAME_LEN: usize = MAX_IO_LEN + 64;
/// The length of a frame's fixed header after the length field: kind (1) and tag (8).
pub const FRAME_HEADER_LEN: usize = 9;
/// The longest volume or replica id, in bytes.
pub const MAX_ID_LEN: usize = 255;
/// The longest token, in bytes.
pub const MAX_TOKEN_LEN: usize = 128;
/// The longest error message; longer ones are cut (at a character boundary) when encoded.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// The most extents one Extents answer lists; a range with more is asked for in pieces.
pub const MAX_EXTENTS: usize = 4096;
/// The length of a Checksum answer's digest (XXH3-128, see [`crate::replica::extents`]).
pub const CHECKSUM_LEN: usize = 16;

/// The flag bit of a Write that asks for it to be on stable storage before it is answered.
const FLAG_FUA: u8 = 1;

const OP_OPEN: u8 = 1;
const OP_READ: u8 = 2;
const OP_WRITE: u8 = 3;
const OP_FLUSH: u8 = 4;
const OP_TRIM: u8 = 5;
const OP_EXTENTS: u8 = 6;
const OP_CHECKSUM: u8 = 7;

const ST_DONE: u8 = 0;
const ST_OPENED: u8 = 1;
const ST_DATA: u8 = 2;
const ST_EXTENTS: u8 = 3;
const ST_CHECKSUM: u8 = 4;
const ST_STALE_EPOCH: u8 = 16;
const ST_FENCED: u8 = 17;
const ST_BAD_TOKEN: u8 = 18;
const ST_NOT_FOUND: u8 = 19;
const ST_NOT_OPEN: u8 = 20;
const ST_INVALID: u8 = 21;
const ST_IO: u8 = 22;
const ST_PROTOCOL: u8 = 23;

/// A request's tag: chosen by the client, echoed in the response.
pub type Tag = u64;

/// What opens a session: which replica, at which attachment epoch, with which proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The volume the session is for; the replica must belong to it.
    pub volume_id: String,
    /// The replica, on one of the server's disks.
    pub replica_id: String,
    /// The attachment epoch of the engine opening the session.
    pub epoch: u64,
    /// The attachment token for (volume_id, epoch); see [`crate::replica::token`].
    pub token: String,
}

/// A request from an engine to a replica server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Opens the session; must be the first request and only the first.
    Open(Open),
    /// Reads `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Writes `data` at `offset`; with `fua`, answered only once on stable storage.
    Write { offset: u64, fua: bool, data: Bytes },
    /// Makes every completed write durable.
    Flush,
    /// Discards `len` bytes at `offset`; they read back as zeros.
    Trim { offset: u64, len: u32 },
    /// Lists the ranges within `len` bytes at `offset` that hold data (the rest are holes
    /// and read as zeros), for a rebuild that copies no holes.
    Extents { offset: u64, len: u32 },
    /// The XXH3-128 digest of the `len` bytes at `offset`, for a rebuild's verification.
    Checksum { offset: u64, len: u32 },
}

/// A replica server's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// A Write, Flush or Trim succeeded.
    Done,
    /// The session is open: the replica's size and the epoch it now has stored.
    Opened { size: u64, epoch: u64 },
    /// A Read's bytes.
    Data(Bytes),
    /// An Extents answer: the (offset, length) of each range with data, in order. At most
    /// [`MAX_EXTENTS`]; when there are more, the last one listed ends where the answer stops
    /// covering the range, and the caller asks again from there.
    Extents(Vec<(u64, u32)>),
    /// A Checksum answer.
    Checksum([u8; CHECKSUM_LEN]),
    /// Open refused: the replica has accepted the higher epoch `current`.
    StaleEpoch { current: u64 },
    /// Refused: a session with the newer epoch `current` has been opened on the replica.
    Fenced { current: u64 },
    /// Open refused: the token does not grant that volume and epoch.
    BadToken,
    /// Open refused: the server has no such replica.
    NotFound,
    /// A request other than Open came before the session was open.
    NotOpen,
    /// The request is not valid (out of the volume's range, a second Open, a wrong volume).
    Invalid(String),
    /// The replica's storage failed the request.
    Io(String),
    /// The peer sent a malformed frame; the connection is closed after this.
    Protocol(String),
}

/// Why bytes are not a valid frame, or a message cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame length {len} is larger than the maximum {MAX_FRAME_LEN}")]
    FrameTooLarge { len: u64 },
    #[error("frame length {len} is shorter than the {FRAME_HEADER_LEN}-byte header")]
    FrameTooShort { len: u64 },
    #[error("unknown request opcode {0}")]
    UnknownOpcode(u8),
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    #[error("the frame ends inside its {what}")]
    Truncated { what: &'static str },
    #[error("{extra} unexpected bytes after the {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("the {what} is {len} bytes, more than the maximum {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the {what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("unknown write flags {0:#04x}")]
    UnknownFlags(u8),
}

/// Appends the frame of request `request` with tag `tag` to `out`. A message that breaks a
/// bound of the protocol (an id too long, too much data) is an error and appends nothing.
pub fn encode_request(tag: Tag, request: &Request, out: &mut BytesMut) -> Result<(), WireError> {
    let (opcode, body_len) = match request {
        Request::Open(open) => {
            check_len("volume id", open.volume_id.len(), MAX_ID_LEN)?;
            check_len("replica id", open.replica_id.len(), MAX_ID_LEN)?;
            check_len("token", open.token.len(), MAX_TOKEN_LEN)?;
            let strings = [&open.volume_id, &open.replica_id, &open.token]
                .iter()
                .fold(0usize, |sum, s| sum.saturating_add(s.len()));
            // Three string lengths (u16) and the epoch (u64).
            (OP_OPEN, strings.saturating_add(2 + 2 + 8 + 2))
        }
        Request::Read { len, .. } => {
            check_len("read length", widen(*len), MAX_IO_LEN)?;
            (OP_READ, 8 + 4)
        }
        Request::Write { data, .. } => {
            check_len("write data", data.len(), MAX_IO_LEN)?;
            (OP_WRITE, data.len().saturating_add(8 + 1))
        }
        Request::Flush => (OP_FLUSH, 0),
        Request::Trim { .. } => (OP_TRIM, 8 + 4),
        Request::Extents { .. } => (OP_EXTENTS, 8 + 4),
        Request::Checksum { len, .. } => {
            check_len("checksum length", widen(*len), MAX_IO_LEN)?;
            (OP_CHECKSUM, 8 + 4)
        }
    };
    // The checks above bound body_len far below u32::MAX and MAX_FRAME_LEN.
    put_header(out, opcode, tag, body_len);
    match request {
        Request::Open(open) => {
            put_str(out, &open.volume_id);
            put_str(out, &open.replica_id);
            out.put_u64(open.epoch);
            put_str(out, &open.token);
        }
        Request::Read { offset, len }
        | Request::Trim { offset, len }
        | Request::Extents { offset, len }
        | Request::Checksum { offset, len } => {
            out.put_u64(*offset);
            out.put_u32(*len);
        }
        Request::Write { offset, fua, data } => {
            out.put_u64(*offset);
            out.put_u8(if *fua { FLAG_FUA } else { 0 });
            out.put_slice(data);
        }
        Request::Flush => {}
    }
    Ok(())
}

/// Appends the frame of response `response` to the request tagged `tag` to `out`. Messages
/// longer than [`MAX_MESSAGE_LEN`] are cut; data longer than [`MAX_IO_LEN`] is an error and
/// appends nothing.
pub fn encode_response(tag: Tag, response: &Response, out: &mut BytesMut) -> Result<(), WireError> {
    match response {
        Response::Done => put_header(out, ST_DONE, tag, 0),
        Response::Opened { size, epoch } => {
            put_header(out, ST_OPENED, tag, 16);
            out.put_u64(*size);
            out.put_u64(*epoch);
        }
        Response::Data(data) => {
            check_len("read data", data.len(), MAX_IO_LEN)?;
            put_header(out, ST_DATA, tag, data.len());
            out.put_slice(data);
        }
        Response::Extents(extents) => {
            check_len("extent list", extents.len(), MAX_EXTENTS)?;
            put_header(
                out,
                ST_EXTENTS,
                tag,
                extents.len().saturating_mul(12).saturating_add(4),
            );
            out.put_u32(extents.len() as u32);
            for (offset, len) in extents {
                out.put_u64(*offset);
                out.put_u32(*len);
            }
        }
        Response::Checksum(digest) => {
            put_header(out, ST_CHECKSUM, tag, CHECKSUM_LEN);
            out.put_slice(digest);
        }
        Response::StaleEpoch { current } => {
            put_header(out, ST_STALE_EPOCH, tag, 8);
            out.put_u64(*current);
        }
        Response::Fenced { current } => {
            put_header(out, ST_FENCED, tag, 8);
            out.put_u64(*current);
        }
        Response::BadToken => put_header(out, ST_BAD_TOKEN, tag, 0),
        Response::NotFound => put_header(out, ST_NOT_FOUND, tag, 0),
        Response::NotOpen => put_header(out, ST_NOT_OPEN, tag, 0),
        Response::Invalid(message) => put_message(out, ST_INVALID, tag, message),
        Response::Io(message) => put_message(out, ST_IO, tag, message),
        Response::Protocol(message) => put_message(out, ST_PROTOCOL, tag, message),
    }
    Ok(())
}

/// Takes the first whole request frame out of `buf`. `Ok(None)` means more bytes are needed
/// (nothing is consumed, and room for the rest of the frame is reserved); an error means the
/// stream is not the replica protocol and must be closed.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<(Tag, Request)>, WireError> {
    let Some((kind, tag, mut body)) = split_frame(buf)? else {
        return Ok(None);
    };
    let request = match kind {
        OP_OPEN => {
            let volume_id = body.string("volume id", MAX_ID_LEN)?;
            let replica_id = body.string("replica id", MAX_ID_LEN)?;
            let epoch = body.u64("epoch")?;
            let token = body.string("token", MAX_TOKEN_LEN)?;
            body.finish("open request")?;
            Request::Open(Open {
                volume_id,
                replica_id,
                epoch,
                token,
            })
        }
        OP_READ => {
            let offset = body.u64("read offset")?;
            let len = body.u32("read length")?;
            body.finish("read request")?;
            check_len("read length", widen(len), MAX_IO_LEN)?;
            Request::Read { offset, len }
        }
        OP_WRITE => {
            let offset = body.u64("write offset")?;
            let flags = body.u8("write flags")?;
            if flags & !FLAG_FUA != 0 {
                return Err(WireError::UnknownFlags(flags));
            }
            let data = body.rest();
            check_len("write data", data.len(), MAX_IO_LEN)?;
            Request::Write {
                offset,
                fua: flags & FLAG_FUA != 0,
                data,
            }
        }
        OP_FLUSH => {
            body.finish("flush request")?;
            Request::Flush
        }
        OP_TRIM => {
            let offset = body.u64("trim offset")?;
            let len = body.u32("trim length")?;
            body.finish("trim request")?;
            Request::Trim { offset, len }
        }
        OP_EXTENTS => {
            let offset = body.u64("extents offset")?;
            let len = body.u32("extents length")?;
            body.finish("extents request")?;
            Request::Extents { offset, len }
        }
        OP_CHECKSUM => {
            let offset = body.u64("checksum offset")?;
            let len = body.u32("checksum length")?;
            body.finish("checksum request")?;
            check_len("checksum length", widen(len), MAX_IO_LEN)?;
            Request::Checksum { offset, len }
        }
        other => return Err(WireError::UnknownOpcode(other)),
    };
    Ok(Some((tag, request)))
}

/// Takes the first whole response frame out of `buf`; see [`decode_request`].
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<(Tag, Response)>, WireError> {
    let Some((kind, tag, mut body)) = split_frame(buf)? else {
        return Ok(None);
    };
    let response = match kind {
        ST_DONE => {
            body.finish("done response")?;
            Response::Done
        }
        ST_OPENED => {
            let size = body.u64("replica size")?;
            let epoch = body.u64("epoch")?;
            body.finish("opened response")?;
            Response::Opened { size, epoch }
        }
        ST_DATA => {
            let data = body.rest();
            check_len("read data", data.len(), MAX_IO_LEN)?;
            Response::Data(data)
        }
        ST_EXTENTS => {
            let count = widen(body.u32("extent count")?);
            check_len("extent list", count, MAX_EXTENTS)?;
            let mut extents = Vec::with_capacity(count);
            for _ in 0..count {
                let offset = body.u64("extent offset")?;
                let len = body.u32("extent length")?;
                extents.push((offset, len));
            }
            body.finish("extents response")?;
            Response::Extents(extents)
        }
        ST_CHECKSUM => {
            let mut digest = [0u8; CHECKSUM_LEN];
            for byte in digest.iter_mut() {
                *byte = body.u8("checksum")?;
            }
            body.finish("checksum response")?;
            Response::Checksum(digest)
        }
        ST_STALE_EPOCH => {
            let current = body.u64("current epoch")?;
            body.finish("stale epoch response")?;
            Response::StaleEpoch { current }
        }
        ST_FENCED => {
            let current = body.u64("current epoch")?;
            body.finish("fenced response")?;
            Response::Fenced { current }
        }
        ST_BAD_TOKEN => {
            body.finish("bad token response")?;
            Response::BadToken
        }
        ST_NOT_FOUND => {
            body.finish("not found response")?;
            Response::NotFound
        }
        ST_NOT_OPEN => {
            body.finish("not open response")?;
            Response::NotOpen
        }
        ST_INVALID | ST_IO | ST_PROTOCOL => {
            let message = body.string("message", MAX_MESSAGE_LEN)?;
            body.finish("error response")?;
            match kind {
                ST_INVALID => Response::Invalid(message),
                ST_IO => Response::Io(message),
                _ => Response::Protocol(message),
            }
        }
        other => return Err(WireError::UnknownStatus(other)),
    };
    Ok(Some((tag, response)))
}

/// Splits the first whole frame off `buf`: its kind, tag and body.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Tag, Body)>, WireError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(array(len_bytes, "frame length")?);
    let len = widen(len);
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge { len: len as u64 });
    }
    if len < FRAME_HEADER_LEN {
        return Err(WireError::FrameTooShort { len: len as u64 });
    }
    // len ≤ MAX_FRAME_LEN, so this cannot overflow.
    let total = len.saturating_add(4);
    if buf.len() < total {
        buf.reserve(total.saturating_sub(buf.len()));
        return Ok(None);
    }
    buf.advance(4);
    let mut body = Body(buf.split_to(len).freeze());
    let kind = body.u8("frame kind")?;
    let tag = body.u64("tag")?;
    Ok(Some((kind, tag, body)))
}

/// The unread rest of a frame, read with bounds checks.
struct Body(Bytes);

impl Body {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated { what });
        }
        Ok(self.0.split_to(n))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(u8::from_be_bytes(array(&self.take(1, what)?, what)?))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(array(&self.take(2, what)?, what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(array(&self.take(4, what)?, what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(array(&self.take(8, what)?, what)?))
    }

    fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16(what)?);
        check_len(what, len, max)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8 { what })
    }

    fn rest(self) -> Bytes {
        self.0
    }

    fn finish(self, what: &'static str) -> Result<(), WireError> {
        match self.0.len() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { what, extra }),
        }
    }
}

fn array<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], WireError> {
    bytes.try_into().map_err(|_| WireError::Truncated { what })
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::TooLong { what, len, max });
    }
    Ok(())
}

/// A `u32` as a `usize` (this crate targets 64-bit Linux, where it always fits).
fn widen(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Appends a frame's length, kind and tag, for a body of `body_len` bytes. Callers bound
/// `body_len` well below [`MAX_FRAME_LEN`].
fn put_header(out: &mut BytesMut, kind: u8, tag: Tag, body_len: usize) {
    let len = body_len.saturating_add(FRAME_HEADER_LEN);
    out.reserve(len.saturating_add(4));
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    out.put_u8(kind);
    out.put_u64(tag);
}

/// Appends a string whose length the caller has checked against its bound (≤ u16::MAX).
fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
    out.put_slice(s.as_bytes());
}

fn put_message(out: &mut BytesMut, status: u8, tag: Tag, message: &str) {
    let message = truncate_at_char(message, MAX_MESSAGE_LEN);
    put_header(out, status, tag, message.len().saturating_add(2));
    put_str(out, message);
}

/// The longest prefix of `s` that is at most `max` bytes and ends at a character boundary.
fn truncate_at_char(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests;
