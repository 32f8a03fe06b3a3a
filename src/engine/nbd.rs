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
mod tests;
