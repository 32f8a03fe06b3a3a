//! The NBD protocol, server side, without I/O: the fixed-newstyle handshake as a state machine
//! fed with bytes ([`Handshake`]), and the transmission phase's request decoder
//! ([`decode_request`]) and simple-reply encoder ([`encode_simple_reply`]).
//!
//! What is spoken: newstyle fixed handshake with `NO_ZEROES`; options `EXPORT_NAME`, `INFO`,
//! `GO`, `LIST` and `ABORT` (every other option is answered `NBD_REP_ERR_UNSUP`, so clients
//! fall back to simple replies and no TLS); commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`
//! and `WRITE_ZEROES` with the `FUA` and `NO_HOLE` flags; simple replies only.
//!
//! Two kinds of bad input are told apart. A well-framed request the server cannot honour
//! (past the end of the export, a flag it did not advertise, `CACHE`) is a [`Request`] whose
//! [`Request::check`] names the errno to reply with: the connection goes on. Input that breaks
//! the framing (bad magic, an unknown command, a payload larger than [`MAX_PAYLOAD`], an
//! oversized option) is a [`ProtocolError`]: the server cannot know where the next message
//! starts, so it drops the connection. No input makes the decoders panic: every length is
//! checked before it is used and all arithmetic on client numbers is checked.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic the server sends, and that starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Length of a request header (magic, flags, type, handle, offset, length).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header (magic, error, handle).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The largest READ or WRITE payload accepted, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The largest option a client may send; export names are at most 4096 bytes, so anything
/// near this is garbage.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and its `NO_HOLE` flag) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: a flush on one connection covers writes completed on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (not supported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply error: the option is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect, once every outstanding request is answered.
pub const CMD_DISC: u16 = 2;
/// Command: flush every completed write to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard a range.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch (not advertised).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes to a range.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (needs structured replies; not advertised).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (not advertised).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access, the command's data is durable when it is answered.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write-zeroes): the range must be allocated, not punched.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The error codes a simple reply may carry (the NBD spec's closed list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errno {
    /// Operation not permitted (this server: fenced, or the lease lapsed).
    Perm,
    /// Input/output error.
    Io,
    /// Cannot allocate memory.
    NoMem,
    /// Invalid argument (bad range, flag or command).
    Inval,
    /// No space left on device (a write past the end of the export).
    NoSpc,
    /// Value too large.
    Overflow,
    /// Operation not supported.
    NotSup,
    /// The server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }
}

/// Input that breaks the protocol: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The client flags carry a bit this server did not offer.
    #[error("client flags {0:#x} carry bits this server does not know")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// An option's data is longer than [`MAX_OPTION_LEN`].
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_LEN} allowed")]
    OptionTooLong { option: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an export this server does not have (it cannot answer
    /// with an error, so it must hang up).
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    /// Bytes arrived after the handshake ended without entering transmission.
    #[error("input after the handshake ended")]
    AfterEnd,
    /// A request did not start with the request magic.
    #[error("request magic {0:#010x} is not {REQUEST_MAGIC:#010x}")]
    BadRequestMagic(u32),
    /// A request's command type is not one this server knows.
    #[error("unknown command type {0}")]
    UnknownCommand(u16),
    /// A READ or WRITE asks for more than [`MAX_PAYLOAD`] bytes.
    #[error("{command} of {len} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge { command: &'static str, len: u32 },
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// The smallest request alignment the server accepts.
    pub minimum: u32,
    /// The size the server prefers requests to be multiples of.
    pub preferred: u32,
    /// The largest READ or WRITE payload.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

/// What the server exports: one export, reachable by its name or by the default name `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The export's name (the volume id).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_HAS_FLAGS` is added when sent).
    pub flags: u16,
    /// Block size constraints.
    pub block_size: BlockSize,
}

impl Export {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    fn transmission_flags(&self) -> u16 {
        self.flags | FLAG_HAS_FLAGS
    }
}

/// Where a handshake stands after some input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// More input is needed (send [`Handshake::take_output`] first).
    Continue,
    /// The client chose the export: send the output, then enter transmission with
    /// [`Handshake::into_leftover`] as the first received bytes.
    Transmission,
    /// The client aborted: send the output, then close the connection.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Transmission,
    Aborted,
}

/// The server side of the fixed-newstyle handshake, without I/O: feed it what the client
/// sent with [`Handshake::receive`], send what [`Handshake::take_output`] returns.
#[derive(Debug)]
pub struct Handshake {
    export: Export,
    phase: Phase,
    no_zeroes: bool,
    input: BytesMut,
    output: BytesMut,
}

impl Handshake {
    /// Starts a handshake; the greeting is queued as output.
    pub fn new(export: Export) -> Handshake {
        let mut output = BytesMut::with_capacity(18);
        output.put_u64(NBD_MAGIC);
        output.put_u64(IHAVEOPT);
        output.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Handshake {
            export,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            input: BytesMut::new(),
            output,
        }
    }

    /// The bytes to send to the client now (empties the queue).
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// Consumes the handshake after [`HandshakeStatus::Transmission`], returning the bytes
    /// the client sent past the end of the handshake (the start of its first request).
    pub fn into_leftover(self) -> BytesMut {
        self.input
    }

    /// Feeds bytes received from the client and advances as far as they allow.
    pub fn receive(&mut self, data: &[u8]) -> Result<HandshakeStatus, ProtocolError> {
        if matches!(self.phase, Phase::Transmission | Phase::Aborted) {
            if data.is_empty() {
                return Ok(self.status());
            }
            if self.phase == Phase::Aborted {
                return Err(ProtocolError::AfterEnd);
            }
        }
        self.input.extend_from_slice(data);
        loop {
            match self.phase {
                Phase::ClientFlags => {
                    if self.input.len() < 4 {
                        return Ok(HandshakeStatus::Continue);
                    }
                    let flags = self.input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(ProtocolError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.phase = Phase::Options;
                }
                Phase::Options => {
                    if self.input.len() < 16 {
                        return Ok(HandshakeStatus::Continue);
                    }
                    let magic = be_u64(&self.input, 0).unwrap_or_default();
                    if magic != IHAVEOPT {
                        return Err(ProtocolError::BadOptionMagic(magic));
                    }
                    let option = be_u32(&self.input, 8).unwrap_or_default();
                    let len = be_u32(&self.input, 12).unwrap_or_default();
                    if len > MAX_OPTION_LEN {
                        return Err(ProtocolError::OptionTooLong { option, len });
                    }
                    // `len` is at most MAX_OPTION_LEN, so this cannot overflow a usize.
                    let total = 16 + len as usize;
                    if self.input.len() < total {
                        return Ok(HandshakeStatus::Continue);
                    }
                    self.input.advance(16);
                    let data = self.input.split_to(len as usize).freeze();
                    self.option(option, &data)?;
                }
                Phase::Transmission | Phase::Aborted => return Ok(self.status()),
            }
        }
    }

    fn status(&self) -> HandshakeStatus {
        match self.phase {
            Phase::Transmission => HandshakeStatus::Transmission,
            Phase::Aborted => HandshakeStatus::Aborted,
            Phase::ClientFlags | Phase::Options => HandshakeStatus::Continue,
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<(), ProtocolError> {
        match option {
            OPT_EXPORT_NAME => {
                if !self.export.matches(data) {
                    return Err(ProtocolError::UnknownExport(
                        String::from_utf8_lossy(data).into_owned(),
                    ));
                }
                self.output.put_u64(self.export.size);
                self.output.put_u16(self.export.transmission_flags());
                if !self.no_zeroes {
                    self.output.put_bytes(0, 124);
                }
                self.phase = Phase::Transmission;
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                self.phase = Phase::Aborted;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(());
                }
                let mut server = BytesMut::new();
                put_string(&mut server, &self.export.name);
                self.reply(option, REP_SERVER, &server);
                self.reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(data) else {
                    self.reply_error(option, REP_ERR_INVALID, "malformed export name or list");
                    return Ok(());
                };
                if !self.export.matches(name) {
                    self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
                    return Ok(());
                }
                let mut info = BytesMut::with_capacity(14);
                info.put_u16(INFO_EXPORT);
                info.put_u64(self.export.size);
                info.put_u16(self.export.transmission_flags());
                self.reply(option, REP_INFO, &info);
                // Sent whether or not it was asked for: the minimum is 1, so a client that
                // ignores it loses nothing.
                let block = self.export.block_size;
                let mut info = BytesMut::with_capacity(14);
                info.put_u16(INFO_BLOCK_SIZE);
                info.put_u32(block.minimum);
                info.put_u32(block.preferred);
                info.put_u32(block.maximum);
                self.reply(option, REP_INFO, &info);
                self.reply(option, REP_ACK, &[]);
                if option == OPT_GO {
                    self.phase = Phase::Transmission;
                }
            }
            _ => self.reply_error(option, REP_ERR_UNSUP, "option not supported"),
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.output.put_u64(OPTION_REPLY_MAGIC);
        self.output.put_u32(option);
        self.output.put_u32(reply_type);
        // Every reply this server builds is a few dozen bytes.
        self.output
            .put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
        self.output.put_slice(data);
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        self.reply(option, reply_type, message.as_bytes());
    }
}

fn put_string(out: &mut BytesMut, s: &str) {
    out.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.put_slice(s.as_bytes());
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO` (name length, name, count, info types)
/// and returns the name, or `None` when the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<&[u8]> {
    let name_len = usize::try_from(be_u32(data, 0)?).ok()?;
    let name_end = name_len.checked_add(4)?;
    let name = data.get(4..name_end)?;
    let count = usize::from(be_u16(data, name_end)?);
    let expected = name_end
        .checked_add(2)?
        .checked_add(count.checked_mul(2)?)?;
    (data.len() == expected).then_some(name)
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Write `data` at `offset`.
    Write { offset: u64, data: Bytes },
    /// Disconnect once every outstanding request is answered (no reply).
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Trim { offset: u64, len: u32 },
    /// Make `len` bytes at `offset` read as zeroes.
    WriteZeroes { offset: u64, len: u32 },
    /// A known command this server does not advertise (`CACHE`, `BLOCK_STATUS`, `RESIZE`):
    /// answered with `EINVAL`.
    Unsupported { command: u16 },
}

/// One transmission-phase request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Command flags as sent (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
}

impl Request {
    /// The command's name in the NBD spec, for logs.
    pub fn command_name(&self) -> &'static str {
        match self.command {
            Command::Read { .. } => "NBD_CMD_READ",
            Command::Write { .. } => "NBD_CMD_WRITE",
            Command::Disconnect => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim { .. } => "NBD_CMD_TRIM",
            Command::WriteZeroes { .. } => "NBD_CMD_WRITE_ZEROES",
            Command::Unsupported { .. } => "unsupported command",
        }
    }

    /// True when the client asked for force unit access.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// True when a write-zeroes must allocate rather than punch a hole.
    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }

    /// The byte range the request touches, if it has one.
    pub fn range(&self) -> Option<(u64, u64)> {
        match &self.command {
            Command::Read { offset, len }
            | Command::Trim { offset, len }
            | Command::WriteZeroes { offset, len } => Some((*offset, u64::from(*len))),
            Command::Write { offset, data } => Some((*offset, data.len() as u64)),
            Command::Disconnect | Command::Flush | Command::Unsupported { .. } => None,
        }
    }

    /// Checks the request against an export of `export_size` bytes: the errno to reply with
    /// when it cannot be served, as the NBD spec asks (`EINVAL` for unknown flags and
    /// commands, zero lengths and reads or trims past the end; `ENOSPC` for writes past the
    /// end).
    pub fn check(&self, export_size: u64) -> Result<(), Errno> {
        let allowed = match self.command {
            Command::WriteZeroes { .. } => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Unsupported { .. } => return Err(Errno::Inval),
            _ => CMD_FLAG_FUA,
        };
        if self.flags & !allowed != 0 {
            return Err(Errno::Inval);
        }
        let Some((offset, len)) = self.range() else {
            return Ok(());
        };
        if len == 0 {
            return Err(Errno::Inval);
        }
        let within = offset
            .checked_add(len)
            .is_some_and(|end| end <= export_size);
        if within {
            return Ok(());
        }
        match self.command {
            Command::Write { .. } | Command::WriteZeroes { .. } => Err(Errno::NoSpc),
            _ => Err(Errno::Inval),
        }
    }
}

/// How many bytes the request at the head of `buf` needs in all (header and payload), as far
/// as can be told: at least a header; for a write whose header is in, header plus payload.
/// A reader uses it to size its buffer; it never exceeds `REQUEST_HEADER_LEN + MAX_PAYLOAD`.
pub fn request_len_hint(buf: &[u8]) -> usize {
    let Some(ty) = be_u16(buf, 6) else {
        return REQUEST_HEADER_LEN;
    };
    let len = be_u32(buf, 24).unwrap_or(0);
    if ty == CMD_WRITE && len <= MAX_PAYLOAD {
        REQUEST_HEADER_LEN + len as usize
    } else {
        REQUEST_HEADER_LEN
    }
}

/// Decodes the request at the head of `buf`, removing it from the buffer: `Ok(None)` when
/// more bytes are needed, an error when the bytes cannot be a request. A write's payload is
/// copied out, so `buf` never shares its memory and can be reused in place.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let field = |at, width| match width {
        2 => be_u16(buf, at).map(u64::from),
        4 => be_u32(buf, at).map(u64::from),
        _ => be_u64(buf, at),
    };
    // The header is 28 bytes and in the buffer, so every field below is present.
    let magic = field(0, 4).unwrap_or_default() as u32;
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    let flags = field(4, 2).unwrap_or_default() as u16;
    let ty = field(6, 2).unwrap_or_default() as u16;
    let handle = field(8, 8).unwrap_or_default();
    let offset = field(16, 8).unwrap_or_default();
    let len = field(24, 4).unwrap_or_default() as u32;
    let command = match ty {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return Err(ProtocolError::PayloadTooLarge {
                    command: "NBD_CMD_READ",
                    len,
                });
            }
            Command::Read { offset, len }
        }
        CMD_WRITE => {
            if len > MAX_PAYLOAD {
                return Err(ProtocolError::PayloadTooLarge {
                    command: "NBD_CMD_WRITE",
                    len,
                });
            }
            let total = REQUEST_HEADER_LEN + len as usize;
            let Some(payload) = buf.get(REQUEST_HEADER_LEN..total) else {
                return Ok(None);
            };
            // Copied out rather than split off: a read buffer that lends out slices of itself
            // cannot be reused in place, and reallocating it for every read costs more.
            let data = Bytes::copy_from_slice(payload);
            buf.advance(total);
            return Ok(Some(Request {
                handle,
                flags,
                command: Command::Write { offset, data },
            }));
        }
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes { offset, len },
        CMD_CACHE | CMD_BLOCK_STATUS | CMD_RESIZE => Command::Unsupported { command: ty },
        other => return Err(ProtocolError::UnknownCommand(other)),
    };
    buf.advance(REQUEST_HEADER_LEN);
    Ok(Some(Request {
        handle,
        flags,
        command,
    }))
}

/// Appends a simple reply header: `error` is `None` on success (a successful read's data
/// follows it, sent by the caller).
pub fn encode_simple_reply(out: &mut BytesMut, handle: u64, error: Option<Errno>) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.map_or(0, Errno::code));
    out.put_u64(handle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export() -> Export {
        Export {
            name: "vol-1".into(),
            size: 1 << 20,
            flags: FLAG_SEND_FLUSH | FLAG_SEND_FUA,
            block_size: BlockSize::default(),
        }
    }

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }

    /// Splits option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut replies = Vec::new();
        while !out.is_empty() {
            assert_eq!(be_u64(out, 0), Some(OPTION_REPLY_MAGIC));
            let option = be_u32(out, 8).unwrap();
            let ty = be_u32(out, 12).unwrap();
            let len = be_u32(out, 16).unwrap() as usize;
            replies.push((option, ty, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        replies
    }

    fn started() -> Handshake {
        let mut hs = Handshake::new(export());
        let greeting = hs.take_output();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(
            be_u16(&greeting, 16),
            Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        assert_eq!(
            hs.receive(&flags.to_be_bytes()),
            Ok(HandshakeStatus::Continue)
        );
        hs
    }

    #[test]
    fn go_sends_export_and_block_size_then_enters_transmission() {
        let mut hs = started();
        let mut input = option(OPT_GO, &info_request("", &[INFO_BLOCK_SIZE]));
        // The client's first request may follow at once; it must be kept.
        input.extend_from_slice(&[0x25, 0x60]);
        assert_eq!(hs.receive(&input), Ok(HandshakeStatus::Transmission));
        let out = hs.take_output();
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].0, r[0].1), (OPT_GO, REP_INFO));
        assert_eq!(be_u16(&r[0].2, 0), Some(INFO_EXPORT));
        assert_eq!(be_u64(&r[0].2, 2), Some(1 << 20));
        assert_eq!(
            be_u16(&r[0].2, 10),
            Some(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA)
        );
        assert_eq!(be_u16(&r[1].2, 0), Some(INFO_BLOCK_SIZE));
        assert_eq!(be_u32(&r[1].2, 2), Some(1));
        assert_eq!(be_u32(&r[1].2, 6), Some(4096));
        assert_eq!(be_u32(&r[1].2, 10), Some(MAX_PAYLOAD));
        assert_eq!((r[2].1, r[2].2.len()), (REP_ACK, 0));
        assert_eq!(&hs.into_leftover()[..], &[0x25, 0x60]);
    }

    #[test]
    fn go_by_name_works_and_unknown_name_is_refused_without_hanging_up() {
        let mut hs = started();
        let status = hs.receive(&option(OPT_GO, &info_request("other", &[])));
        assert_eq!(status, Ok(HandshakeStatus::Continue));
        let r = replies(&hs.take_output());
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        let status = hs.receive(&option(OPT_GO, &info_request("vol-1", &[])));
        assert_eq!(status, Ok(HandshakeStatus::Transmission));
    }

    #[test]
    fn info_then_go_byte_by_byte() {
        let mut hs = started();
        let mut input = option(OPT_INFO, &info_request("vol-1", &[]));
        input.extend(option(OPT_GO, &info_request("", &[])));
        let mut last = HandshakeStatus::Continue;
        for b in &input {
            last = hs.receive(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(last, HandshakeStatus::Transmission);
        let r = replies(&hs.take_output());
        let types: Vec<(u32, u32)> = r.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            types,
            vec![
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK)
            ]
        );
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut hs = started();
        // Name length larger than the data.
        let mut data = info_request("vol-1", &[]);
        data[3] = 200;
        assert_eq!(
            hs.receive(&option(OPT_GO, &data)),
            Ok(HandshakeStatus::Continue)
        );
        assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
        // Trailing bytes after the info list.
        let mut data = info_request("", &[1]);
        data.push(0);
        hs.receive(&option(OPT_GO, &data)).unwrap();
        assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut hs = started();
        let status = hs.receive(&option(OPT_EXPORT_NAME, b"vol-1"));
        assert_eq!(status, Ok(HandshakeStatus::Transmission));
        let out = hs.take_output();
        assert_eq!(out.len(), 10);
        assert_eq!(be_u64(&out, 0), Some(1 << 20));

        let mut hs = Handshake::new(export());
        hs.take_output();
        hs.receive(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        hs.receive(&option(OPT_EXPORT_NAME, b"")).unwrap();
        assert_eq!(hs.take_output().len(), 10 + 124);
    }

    #[test]
    fn export_name_unknown_hangs_up() {
        let mut hs = started();
        assert_eq!(
            hs.receive(&option(OPT_EXPORT_NAME, b"nope")),
            Err(ProtocolError::UnknownExport("nope".into()))
        );
    }

    #[test]
    fn unsupported_options_get_err_unsup() {
        let mut hs = started();
        for opt in [OPT_STRUCTURED_REPLY, OPT_STARTTLS, 10, 11, 99] {
            assert_eq!(hs.receive(&option(opt, b"")), Ok(HandshakeStatus::Continue));
            let r = replies(&hs.take_output());
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP));
        }
    }

    #[test]
    fn list_and_abort() {
        let mut hs = started();
        hs.receive(&option(OPT_LIST, b"")).unwrap();
        let r = replies(&hs.take_output());
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..], b"vol-1");
        assert_eq!(r[1].1, REP_ACK);
        hs.receive(&option(OPT_LIST, b"x")).unwrap();
        assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_INVALID);
        assert_eq!(
            hs.receive(&option(OPT_ABORT, b"")),
            Ok(HandshakeStatus::Aborted)
        );
        assert_eq!(replies(&hs.take_output())[0].1, REP_ACK);
        assert_eq!(hs.receive(b"more"), Err(ProtocolError::AfterEnd));
    }

    #[test]
    fn handshake_garbage_is_an_error() {
        let mut hs = Handshake::new(export());
        assert_eq!(
            hs.receive(&4u32.to_be_bytes()),
            Err(ProtocolError::UnknownClientFlags(4))
        );
        let mut hs = started();
        assert!(matches!(
            hs.receive(&[0xff; 16]),
            Err(ProtocolError::BadOptionMagic(_))
        ));
        let mut hs = started();
        let mut big = Vec::new();
        big.extend_from_slice(&IHAVEOPT.to_be_bytes());
        big.extend_from_slice(&OPT_GO.to_be_bytes());
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            hs.receive(&big),
            Err(ProtocolError::OptionTooLong { .. })
        ));
    }

    fn request(flags: u16, ty: u16, handle: u64, offset: u64, len: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(ty);
        b.put_u64(handle);
        b.put_u64(offset);
        b.put_u32(len);
        b
    }

    #[test]
    fn decodes_requests_and_waits_for_write_payloads() {
        let mut buf = request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 3);
        assert_eq!(request_len_hint(&buf), REQUEST_HEADER_LEN + 3);
        assert_eq!(decode_request(&mut buf), Ok(None));
        buf.put_slice(b"abc");
        buf.extend_from_slice(&request(0, CMD_READ, 8, 0, 512));
        let write = decode_request(&mut buf).unwrap().unwrap();
        assert_eq!(write.handle, 7);
        assert!(write.fua());
        assert_eq!(
            write.command,
            Command::Write {
                offset: 4096,
                data: Bytes::from_static(b"abc")
            }
        );
        let read = decode_request(&mut buf).unwrap().unwrap();
        assert_eq!(
            read.command,
            Command::Read {
                offset: 0,
                len: 512
            }
        );
        assert!(buf.is_empty());
        assert_eq!(decode_request(&mut buf), Ok(None));
    }

    #[test]
    fn framing_errors() {
        let mut bad = request(0, CMD_READ, 1, 0, 1);
        bad[0] = 0;
        assert!(matches!(
            decode_request(&mut bad),
            Err(ProtocolError::BadRequestMagic(_))
        ));
        let mut unknown = request(0, 42, 1, 0, 1);
        assert_eq!(
            decode_request(&mut unknown),
            Err(ProtocolError::UnknownCommand(42))
        );
        for ty in [CMD_READ, CMD_WRITE] {
            let mut big = request(0, ty, 1, 0, MAX_PAYLOAD + 1);
            assert!(matches!(
                decode_request(&mut big),
                Err(ProtocolError::PayloadTooLarge { .. })
            ));
        }
        // Large trims and zeroes carry no payload and are fine.
        let mut trim = request(0, CMD_TRIM, 1, 0, u32::MAX);
        assert!(decode_request(&mut trim).unwrap().is_some());
    }

    #[test]
    fn checks() {
        let size = 1 << 20;
        let req = |flags, ty, offset, len| {
            let mut b = request(flags, ty, 1, offset, len);
            if ty == CMD_WRITE {
                b.put_bytes(1, len as usize);
            }
            decode_request(&mut b).unwrap().unwrap().check(size)
        };
        assert_eq!(req(0, CMD_READ, 0, 4096), Ok(()));
        assert_eq!(req(0, CMD_READ, size - 1, 1), Ok(()));
        assert_eq!(req(0, CMD_READ, size - 1, 2), Err(Errno::Inval));
        assert_eq!(req(0, CMD_READ, u64::MAX, 2), Err(Errno::Inval));
        assert_eq!(req(0, CMD_READ, 0, 0), Err(Errno::Inval));
        assert_eq!(req(0, CMD_WRITE, size, 1), Err(Errno::NoSpc));
        assert_eq!(req(0, CMD_WRITE_ZEROES, size - 1, 2), Err(Errno::NoSpc));
        assert_eq!(req(0, CMD_TRIM, size - 1, 2), Err(Errno::Inval));
        assert_eq!(req(CMD_FLAG_FUA, CMD_FLUSH, 0, 0), Ok(()));
        assert_eq!(req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 1), Ok(()));
        assert_eq!(req(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1), Err(Errno::Inval));
        assert_eq!(req(1 << 9, CMD_READ, 0, 1), Err(Errno::Inval));
        assert_eq!(req(0, CMD_CACHE, 0, 1), Err(Errno::Inval));
    }

    #[test]
    fn reply_encoding() {
        let mut out = BytesMut::new();
        encode_simple_reply(&mut out, 0x0102_0304_0506_0708, Some(Errno::Inval));
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(be_u32(&out, 0), Some(SIMPLE_REPLY_MAGIC));
        assert_eq!(be_u32(&out, 4), Some(22));
        assert_eq!(be_u64(&out, 8), Some(0x0102_0304_0506_0708));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn handshake_never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut hs = Handshake::new(export());
            for c in &chunks {
                if hs.receive(c).is_err() {
                    break;
                }
            }
        }

        #[test]
        fn handshake_after_valid_prefix_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..256), opt in 0u32..12) {
            let mut hs = started();
            let mut input = IHAVEOPT.to_be_bytes().to_vec();
            input.extend_from_slice(&opt.to_be_bytes());
            input.extend_from_slice(&(tail.len() as u32).to_be_bytes());
            input.extend_from_slice(&tail);
            let _ = hs.receive(&input);
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(req)) = decode_request(&mut buf) {
                let _ = req.check(1 << 20);
            }
            let _ = request_len_hint(&bytes);
        }

        #[test]
        fn request_headers_never_panic(flags: u16, ty in 0u16..10, offset: u64, len: u32, size: u64) {
            let mut buf = request(flags, ty, 1, offset, len);
            let _ = request_len_hint(&buf);
            if let Ok(Some(req)) = decode_request(&mut buf) {
                let _ = req.check(size);
                let _ = req.range();
            }
        }
    }
}
