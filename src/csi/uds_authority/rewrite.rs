//! The client-to-server bytes of one HTTP/2 connection, sans-IO: every header block whose
//! `:authority` is not a valid URI authority is re-encoded with `localhost` in its place;
//! every other byte is passed on as it came.
//!
//! Header blocks are HPACK-compressed against a dynamic table that the client's encoder and
//! the server's decoder keep in step, so a block cannot be edited alone. This side decodes
//! every block with its own copy of the client's table. Until the first rewrite the server's
//! table is the same copy (it has seen exactly the client's blocks), and blocks that need no
//! change pass through untouched. A rewritten block, and every block after it on that
//! connection, is re-encoded with static-table references and literals only: the server's
//! table then stays as it was and is never referred to, so it cannot be wrong.
//!
//! Frames this side cannot follow (a bad preface, malformed HEADERS or CONTINUATION, a block
//! that does not decode) make it step aside while nothing has been rewritten yet: the rest of
//! the connection is passed on untouched and `h2` answers it as it always did. After a
//! rewrite that is no longer possible, and the connection is failed instead.

use tracing::debug;

use super::hpack::{self, Decoder, HpackError};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// SETTINGS_MAX_FRAME_SIZE as the CSI servers leave it (the default; they do not call
/// tonic's `Server::max_frame_size`): no client frame is larger, and rewritten blocks are
/// split to fit.
pub const MAX_FRAME_SIZE: usize = 16_384;

/// SETTINGS_HEADER_TABLE_SIZE as the server leaves it (the default; tonic has no setting
/// for it): the largest dynamic table the client's encoder may use.
const HEADER_TABLE_SIZE: usize = 4_096;

/// Header blocks are held until complete; past this many bytes or frames (well above what
/// `h2` accepts before it refuses the connection itself) this side steps aside.
const MAX_BLOCK_BYTES: usize = 256 * 1024;
const MAX_BLOCK_FRAMES: usize = 64;

/// Decoded header lists above this are refused (`h2` refuses far smaller ones).
const MAX_HEADER_LIST_SIZE: usize = 1 << 20;

/// What an unusable `:authority` becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;

/// Why a connection had to be failed: it went wrong after a request had been rewritten, when
/// the server's header table no longer follows the client's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("after a rewritten :authority, the client sent {0}")]
    Frame(&'static str),
    #[error("after a rewritten :authority, a header block from the client does not decode")]
    Hpack(#[source] HpackError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// This many bytes of the preface seen.
    Preface(usize),
    /// At a frame boundary.
    Frames,
    /// Inside the payload of a frame that passes through; this many bytes left.
    Payload(usize),
    /// Stepped aside: everything passes through.
    Transparent,
    /// Failed; nothing more is passed on.
    Failed,
}

/// The rewriting state of one connection's client-to-server direction.
pub struct Rewriter {
    mode: Mode,
    /// Received but not yet passed on: part of a frame header, or an incomplete header block.
    pending: Vec<u8>,
    decoder: Decoder,
    /// The server's HPACK table still equals the client's: nothing has been rewritten.
    in_sync: bool,
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        Rewriter::new()
    }
}

/// A complete header block found at the start of a buffer.
struct Block {
    /// Bytes of the buffer it spans (all its frames).
    len: usize,
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
}

enum Scan {
    Incomplete,
    Complete(Block),
    Malformed(&'static str),
}

struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

fn head(buf: &[u8]) -> Option<Head> {
    let h = buf.get(..FRAME_HEADER_LEN)?;
    Some(Head {
        len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
        kind: h[3],
        flags: h[4],
        stream_id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
    })
}

/// Finds the header block (HEADERS and its CONTINUATIONs) that starts `buf`, checking the
/// frames as `h2` does.
fn scan_block(buf: &[u8]) -> Scan {
    let Some(first) = head(buf) else {
        return Scan::Incomplete;
    };
    if first.len > MAX_FRAME_SIZE {
        return Scan::Malformed("a HEADERS frame larger than SETTINGS_MAX_FRAME_SIZE");
    }
    if first.stream_id == 0 {
        return Scan::Malformed("HEADERS on stream 0");
    }
    let Some(payload) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + first.len) else {
        return Scan::Incomplete;
    };
    let mut rest = payload;
    let mut pad = 0;
    if first.flags & PADDED != 0 {
        let Some((&p, after)) = rest.split_first() else {
            return Scan::Malformed("a PADDED HEADERS frame without a pad length");
        };
        pad = usize::from(p);
        rest = after;
    }
    let mut priority = None;
    if first.flags & PRIORITY != 0 {
        let Some((p, after)) = rest.split_first_chunk::<PRIORITY_LEN>() else {
            return Scan::Malformed("a PRIORITY HEADERS frame too short for its priority");
        };
        priority = Some(*p);
        rest = after;
    }
    let Some(fragment) = rest.len().checked_sub(pad).map(|n| &rest[..n]) else {
        return Scan::Malformed("HEADERS with more padding than payload");
    };
    let mut block = Block {
        len: FRAME_HEADER_LEN + first.len,
        stream_id: first.stream_id,
        end_stream: first.flags & END_STREAM != 0,
        priority,
        fragment: fragment.to_vec(),
    };
    let mut end_headers = first.flags & END_HEADERS != 0;
    let mut frames = 1;
    while !end_headers {
        let Some(next) = head(&buf[block.len..]) else {
            return Scan::Incomplete;
        };
        if next.kind != CONTINUATION {
            return Scan::Malformed("a frame other than CONTINUATION inside a header block");
        }
        if next.stream_id != block.stream_id {
            return Scan::Malformed("a CONTINUATION for another stream inside a header block");
        }
        if next.len > MAX_FRAME_SIZE {
            return Scan::Malformed("a CONTINUATION frame larger than SETTINGS_MAX_FRAME_SIZE");
        }
        frames += 1;
        if frames > MAX_BLOCK_FRAMES || block.len + FRAME_HEADER_LEN + next.len > MAX_BLOCK_BYTES {
            return Scan::Malformed("a header block too large to follow");
        }
        let start = block.len + FRAME_HEADER_LEN;
        let Some(payload) = buf.get(start..start + next.len) else {
            return Scan::Incomplete;
        };
        block.fragment.extend_from_slice(payload);
        block.len = start + next.len;
        end_headers = next.flags & END_HEADERS != 0;
    }
    Scan::Complete(block)
}

/// Whether `h2` takes this `:authority` (it parses it as an `http::uri::Authority`).
pub fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // len <= MAX_FRAME_SIZE < 2^24.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Frames an encoded header block as HEADERS (keeping END_STREAM and the priority) and as
/// many CONTINUATIONs as needed, each at most MAX_FRAME_SIZE.
fn emit_block(out: &mut Vec<u8>, block: &Block, encoded: &[u8]) {
    let prefix = if block.priority.is_some() {
        PRIORITY_LEN
    } else {
        0
    };
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME_SIZE - prefix));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_head(out, prefix + first.len(), HEADERS, flags, block.stream_id);
    if let Some(p) = &block.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        let flags = if after.is_empty() { END_HEADERS } else { 0 };
        frame_head(out, chunk.len(), CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
        rest = after;
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        Rewriter {
            mode: Mode::Preface(0),
            pending: Vec::new(),
            decoder: Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE),
            in_sync: true,
        }
    }

    /// True once this side has stepped aside for good: bytes may bypass it.
    pub fn is_transparent(&self) -> bool {
        self.mode == Mode::Transparent && self.pending.is_empty()
    }

    /// Takes the next bytes from the client and appends what may go on to the server to
    /// `out`; an incomplete frame header or header block is kept until the rest arrives.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if self.mode == Mode::Failed {
            return Err(RewriteError::Frame("more bytes after a failure"));
        }
        if self.is_transparent() {
            out.extend_from_slice(input);
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(input);
        let mut pos = 0;
        let result = self.process(&buf, &mut pos, out);
        buf.drain(..pos);
        self.pending = buf;
        if result.is_err() {
            self.mode = Mode::Failed;
            self.pending.clear();
        }
        result
    }

    /// The client closed its side: what is still held goes on if the server can make sense
    /// of it (it will find it truncated, as it would have without this side).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.in_sync {
            out.append(&mut self.pending);
        }
        self.pending.clear();
    }

    fn process(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        loop {
            let avail = &buf[*pos..];
            match self.mode {
                Mode::Failed => return Ok(()),
                Mode::Transparent => {
                    out.extend_from_slice(avail);
                    *pos = buf.len();
                    return Ok(());
                }
                Mode::Preface(seen) => {
                    let n = avail.len().min(PREFACE.len() - seen);
                    if avail[..n] != PREFACE[seen..seen + n] {
                        debug!("not an HTTP/2 client preface; passing the connection through");
                        self.mode = Mode::Transparent;
                        continue;
                    }
                    out.extend_from_slice(&avail[..n]);
                    *pos += n;
                    if seen + n < PREFACE.len() {
                        self.mode = Mode::Preface(seen + n);
                        return Ok(());
                    }
                    self.mode = Mode::Frames;
                }
                Mode::Payload(left) => {
                    let n = avail.len().min(left);
                    out.extend_from_slice(&avail[..n]);
                    *pos += n;
                    if n < left {
                        self.mode = Mode::Payload(left - n);
                        return Ok(());
                    }
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    let Some(h) = head(avail) else {
                        return Ok(());
                    };
                    match h.kind {
                        HEADERS => match scan_block(avail) {
                            Scan::Incomplete => return Ok(()),
                            Scan::Malformed(what) => self.step_aside(RewriteError::Frame(what))?,
                            Scan::Complete(block) => {
                                self.header_block(&block, &avail[..block.len], out)?;
                                *pos += block.len;
                            }
                        },
                        CONTINUATION => self.step_aside(RewriteError::Frame(
                            "a CONTINUATION outside a header block",
                        ))?,
                        PUSH_PROMISE => self.step_aside(RewriteError::Frame("a PUSH_PROMISE"))?,
                        _ => {
                            out.extend_from_slice(&avail[..FRAME_HEADER_LEN]);
                            *pos += FRAME_HEADER_LEN;
                            self.mode = Mode::Payload(h.len);
                        }
                    }
                }
            }
        }
    }

    /// Passes the rest of the connection through untouched if the server's header table is
    /// still the client's; otherwise fails.
    fn step_aside(&mut self, error: RewriteError) -> Result<(), RewriteError> {
        if !self.in_sync {
            return Err(error);
        }
        match &error {
            RewriteError::Frame(what) => {
                debug!("client sent {what}; passing the connection through")
            }
            RewriteError::Hpack(e) => {
                debug!(error = %e, "client header block does not decode; passing the connection through")
            }
        }
        self.mode = Mode::Transparent;
        Ok(())
    }

    fn header_block(
        &mut self,
        block: &Block,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let mut fields = match self.decoder.decode(&block.fragment) {
            Ok(fields) => fields,
            Err(e) => {
                self.step_aside(RewriteError::Hpack(e))?;
                // Stepped aside: the block goes on as it came.
                out.extend_from_slice(raw);
                return Ok(());
            }
        };
        let mut rewritten = false;
        for field in fields.iter_mut() {
            if field.name == b":authority" && !valid_authority(&field.value) {
                debug!(
                    stream = block.stream_id,
                    authority = %String::from_utf8_lossy(&field.value),
                    "request :authority is not a URI authority; handing it on as localhost"
                );
                field.value = REPLACEMENT_AUTHORITY.to_vec();
                rewritten = true;
            }
        }
        if self.in_sync && !rewritten {
            out.extend_from_slice(raw);
            return Ok(());
        }
        self.in_sync = false;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        hpack::encode_without_indexing(&fields, &mut encoded);
        emit_block(out, block, &encoded);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::csi::uds_authority::hpack::Field;

    /// The header blocks in `bytes` (a client's connection, preface optional), each decoded
    /// with one decoder for the whole connection, with the stream they are on.
    pub(crate) fn decode_all(bytes: &[u8]) -> Vec<(u32, Vec<Field>)> {
        let mut blocks: Vec<(u32, Vec<u8>)> = Vec::new();
        for f in frames(bytes) {
            match f.kind {
                HEADERS => blocks.push((f.stream_id, fragment(&f))),
                CONTINUATION => blocks.last_mut().unwrap().1.extend_from_slice(&f.payload),
                _ => {}
            }
        }
        let mut d = Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE);
        blocks
            .into_iter()
            .map(|(id, block)| (id, d.decode(&block).unwrap()))
            .collect()
    }

    /// grpcio 1.85.3's first request on `unix:///tmp/auth/cap.sock`, as captured.
    pub(crate) const GRPCIO_FIRST: &str = concat!(
        "40053a706174681e2f6373692e76312e4964656e746974792f476574506c7567696e496e666f",
        "400a3a617574686f7269747915746d70253246617574682532466361702e736f636b8386",
        "400c636f6e74656e742d74797065106170706c69636174696f6e2f67727063",
        "4002746508747261696c657273",
        "4014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970",
        "400c677270632d74696d656f7574023553",
        "400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3320677270632d632f35382e302e3020286c696e75783b2063687474703229"
    );

    /// Its second request on that channel: everything but :path refers to the dynamic table
    /// (0xc4 is the :authority the first request inserted).
    const GRPCIO_SECOND: &str = concat!(
        "40053a706174681e2f6373692e76312e4964656e746974792f476574506c7567696e496e666f",
        "c48386c3c2c1c0bf"
    );

    const AUTHORITY: &[u8] = b"tmp%2Fauth%2Fcap.sock";

    pub(crate) struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream_id: u32,
        pub payload: Vec<u8>,
    }

    /// Splits bytes after the preface into frames (test input is well formed).
    pub(crate) fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut rest = bytes.strip_prefix(&PREFACE[..]).unwrap_or(bytes);
        let mut out = Vec::new();
        while let Some(h) = head(rest) {
            let payload = rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len].to_vec();
            rest = &rest[FRAME_HEADER_LEN + h.len..];
            out.push(Frame {
                kind: h.kind,
                flags: h.flags,
                stream_id: h.stream_id,
                payload,
            });
        }
        assert!(rest.is_empty(), "trailing bytes");
        out
    }

    /// A HEADERS payload without its pad length, priority and padding.
    pub(crate) fn fragment(f: &Frame) -> Vec<u8> {
        let mut p = &f.payload[..];
        let mut pad = 0;
        if f.flags & PADDED != 0 {
            pad = usize::from(p[0]);
            p = &p[1..];
        }
        if f.flags & PRIORITY != 0 {
            p = &p[PRIORITY_LEN..];
        }
        p[..p.len() - pad].to_vec()
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_head(&mut out, payload.len(), kind, flags, stream_id);
        out.extend_from_slice(payload);
        out
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 4, 0, 0x40, 0, 0])
    }

    fn grpc_data(stream_id: u32) -> Vec<u8> {
        frame(0x0, END_STREAM, stream_id, &[0, 0, 0, 0, 0])
    }

    fn connection(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    }

    fn rewrite(input: &[u8]) -> Vec<u8> {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(input, &mut out).unwrap();
        assert!(r.pending.is_empty());
        out
    }

    fn block(hex_block: &str) -> Vec<u8> {
        hex::decode(hex_block).unwrap()
    }

    fn decoded(hex_block: &str) -> Vec<Field> {
        Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE)
            .decode(&block(hex_block))
            .unwrap()
    }

    /// The fields of `original` with :authority set to localhost.
    fn with_localhost(mut fields: Vec<Field>) -> Vec<Field> {
        for f in fields.iter_mut().filter(|f| f.name == b":authority") {
            f.value = REPLACEMENT_AUTHORITY.to_vec();
        }
        fields
    }

    #[test]
    fn grpcio_authority_becomes_localhost_and_nothing_else_changes() {
        let original = decoded(GRPCIO_FIRST);
        assert!(original
            .iter()
            .any(|f| f.name == b":authority" && f.value == AUTHORITY));
        assert!(!valid_authority(AUTHORITY));

        let input = connection(&[
            settings(),
            frame(HEADERS, END_HEADERS, 1, &block(GRPCIO_FIRST)),
            grpc_data(1),
        ]);
        let out = rewrite(&input);
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0].payload,
            frames(&input)[0].payload,
            "SETTINGS untouched"
        );
        assert_eq!(
            (f[1].kind, f[1].flags, f[1].stream_id),
            (HEADERS, END_HEADERS, 1)
        );
        assert_eq!(decode_all(&out), [(1, with_localhost(original))]);
        assert_eq!(out[out.len() - 14..], grpc_data(1)[..], "DATA untouched");
    }

    #[test]
    fn dynamic_table_references_across_requests_resolve_to_the_client_entries() {
        let input = connection(&[
            settings(),
            frame(HEADERS, END_HEADERS, 1, &block(GRPCIO_FIRST)),
            grpc_data(1),
            frame(HEADERS, END_HEADERS, 3, &block(GRPCIO_SECOND)),
            grpc_data(3),
        ]);
        let out = rewrite(&input);
        let mut client = Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE);
        let first = client.decode(&block(GRPCIO_FIRST)).unwrap();
        let second = client.decode(&block(GRPCIO_SECOND)).unwrap();
        assert!(second
            .iter()
            .any(|f| f.name == b":authority" && f.value == AUTHORITY));
        assert_eq!(
            decode_all(&out),
            [(1, with_localhost(first)), (3, with_localhost(second))]
        );
    }

    #[test]
    fn blocks_after_a_rewrite_are_re_encoded_even_when_valid() {
        // The first request puts "good:1" into the client's table; after a rewritten second
        // request, a third one that names it by index must not reach h2 as a bare index.
        let first = [&[0x41u8, 6][..], b"good:1", &[0x82, 0x86, 0x84]].concat();
        let second = [&[0x41u8, 3][..], b"a/b", &[0x82, 0x86, 0x84]].concat();
        let third = [0xbf, 0x82, 0x86, 0x84];
        let input = connection(&[
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &first),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
            frame(HEADERS, END_HEADERS | END_STREAM, 5, &third),
        ]);
        let out = rewrite(&input);
        let f = frames(&out);
        assert_eq!(f[0].payload, first, "in step with the client: untouched");
        assert_ne!(f[2].payload, third);
        // h2's table holds only what the untouched first block inserted.
        let mut h2 = Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE);
        let decoded: Vec<Vec<Field>> = f.iter().map(|f| h2.decode(&f.payload).unwrap()).collect();
        assert_eq!(decoded[1][0], Field::new(b":authority", b"localhost"));
        assert_eq!(decoded[2][0], Field::new(b":authority", b"good:1"));
        assert!(f.iter().all(|f| f.flags == END_HEADERS | END_STREAM));
    }

    #[test]
    fn valid_authorities_pass_through_byte_for_byte() {
        let mut headers = vec![0x82, 0x86, 0x84, 0x41, 9];
        headers.extend_from_slice(b"localhost");
        let input = connection(&[
            settings(),
            frame(HEADERS, END_HEADERS, 1, &headers),
            grpc_data(1),
            frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84, 0xbe]),
            // Ping and an unknown frame type.
            frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
            frame(0xfa, 0x33, 7, b"whatever"),
        ]);
        assert_eq!(rewrite(&input), input);
        for ok in [&b"localhost"[..], b"localhost:1234", b"[::1]:80", b"a.b-c"] {
            assert!(valid_authority(ok), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"%2Fcsi.sock",
            b"/var/lib/kubelet/csi.sock",
            b"a b",
            b"\xff",
        ] {
            assert!(!valid_authority(bad), "{bad:?}");
        }
    }

    #[test]
    fn continuation_frames_padding_and_priority() {
        let original = block(GRPCIO_FIRST);
        let (a, rest) = original.split_at(40);
        let (b, c) = rest.split_at(100);
        // PADDED | PRIORITY HEADERS: pad length 3, dependency on stream 0 weight 16.
        let mut payload = vec![3, 0, 0, 0, 0, 15];
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let input = connection(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload),
            frame(CONTINUATION, 0, 1, b),
            frame(CONTINUATION, END_HEADERS, 1, c),
        ]);
        let out = rewrite(&input);
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(f[0].payload[..5], [0, 0, 0, 0, 15], "priority kept");
        assert_eq!(
            decode_all(&out),
            [(1, with_localhost(decoded(GRPCIO_FIRST)))]
        );
    }

    #[test]
    fn large_rewritten_blocks_are_split_into_frames_of_at_most_max_frame_size() {
        // 40 KiB of custom header in three frames, with the bad authority.
        let mut fields = vec![
            Field::new(b":method", b"POST"),
            Field::new(b":authority", b"%2Ftmp%2Fcsi.sock"),
        ];
        for i in 0..10 {
            fields.push(Field::new(format!("x-{i}").as_bytes(), &[b'v'; 4000]));
        }
        let mut encoded = Vec::new();
        hpack::encode_without_indexing(&fields, &mut encoded);
        let (a, rest) = encoded.split_at(16_000);
        let (b, c) = rest.split_at(16_000);
        let input = connection(&[
            frame(
                HEADERS,
                PRIORITY,
                1,
                &[&[0u8, 0, 0, 3, 200][..], a].concat(),
            ),
            frame(CONTINUATION, 0, 1, b),
            frame(CONTINUATION, END_HEADERS, 1, c),
        ]);
        let out = rewrite(&input);
        let f = frames(&out);
        assert!(f.len() >= 3);
        assert!(f.iter().all(|f| f.payload.len() <= MAX_FRAME_SIZE));
        assert_eq!(f[0].payload.len(), MAX_FRAME_SIZE);
        assert_eq!(f[0].flags, PRIORITY);
        assert!(f[1..f.len() - 1]
            .iter()
            .all(|f| f.kind == CONTINUATION && f.flags == 0));
        assert_eq!(f[f.len() - 1].flags, END_HEADERS);
        assert_eq!(decode_all(&out), [(1, with_localhost(fields))]);
    }

    #[test]
    fn truncated_input_is_held_until_complete_whatever_the_split() {
        let input = connection(&[
            settings(),
            frame(HEADERS, END_HEADERS, 1, &block(GRPCIO_FIRST)),
            grpc_data(1),
            frame(HEADERS, 0, 3, &block(GRPCIO_SECOND)[..10]),
            frame(CONTINUATION, END_HEADERS, 3, &block(GRPCIO_SECOND)[10..]),
            grpc_data(3),
        ]);
        let whole = rewrite(&input);
        for chunk in [1, 2, 7, 9, 10, 24, 33, 100] {
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                r.feed(piece, &mut out).unwrap();
            }
            assert!(r.pending.is_empty());
            assert_eq!(out, whole, "chunks of {chunk}");
        }
        // A header block is not passed on before its last frame.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let cut = input.len() - 14 - 5;
        r.feed(&input[..cut], &mut out).unwrap();
        let held = frames(&out);
        assert_eq!(
            held.last().map(|f| f.kind),
            Some(0x0),
            "stream 1 DATA out, stream 3 held"
        );
    }

    #[test]
    fn a_large_data_frame_streams_through_without_being_held() {
        let mut input = connection(&[settings()]);
        frame_head(&mut input, 10_000, 0x0, 0, 1);
        input.extend(std::iter::repeat_n(7u8, 5_000));
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!(out, input);
        assert!(r.pending.is_empty());
    }

    #[test]
    fn not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input[..3], &mut out).unwrap();
        r.feed(&input[3..], &mut out).unwrap();
        assert_eq!(out, input);
        assert!(r.is_transparent());
    }

    #[test]
    fn bad_frames_before_any_rewrite_pass_through_for_h2_to_refuse() {
        let cases = [
            frame(HEADERS, END_HEADERS, 0, &[0x82]),
            frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            frame(HEADERS, END_HEADERS | PADDED, 1, &[]),
            frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
            [frame(HEADERS, 0, 1, &[0x82]), settings()].concat(),
            [
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[]),
            ]
            .concat(),
            // HPACK: index 70 is in neither table.
            frame(HEADERS, END_HEADERS, 1, &[0xc6]),
        ];
        for bad in cases {
            let input = connection(&[settings(), bad.clone(), grpc_data(1)]);
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            r.feed(&input, &mut out).unwrap();
            assert_eq!(out, input, "{}", hex::encode(&bad));
            assert!(r.is_transparent());
        }
        // Oversized HEADERS frame header alone is enough to step aside.
        let mut input = connection(&[]);
        frame_head(&mut input, MAX_FRAME_SIZE + 1, HEADERS, END_HEADERS, 1);
        let mut out = Vec::new();
        let mut r = Rewriter::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn bad_frames_after_a_rewrite_fail_the_connection() {
        let rewritten = frame(HEADERS, END_HEADERS, 1, &block(GRPCIO_FIRST));
        for bad in [
            frame(HEADERS, END_HEADERS, 3, &[0xff]),
            frame(CONTINUATION, END_HEADERS, 3, &[0x82]),
            frame(HEADERS, END_HEADERS | PADDED, 3, &[200, 0x82]),
        ] {
            let input = connection(&[rewritten.clone(), bad]);
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            assert!(r.feed(&input, &mut out).is_err());
            assert!(r.feed(&grpc_data(1), &mut out).is_err(), "stays failed");
        }
    }

    #[test]
    fn finish_hands_on_a_held_block_only_while_in_step() {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let partial = connection(&[frame(HEADERS, 0, 1, &[0x82])]);
        r.feed(&partial, &mut out).unwrap();
        assert_eq!(out, PREFACE);
        r.finish(&mut out);
        assert_eq!(out, partial);

        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &block(GRPCIO_FIRST)),
            frame(HEADERS, 0, 3, &[0xc4]),
        ]);
        r.feed(&input, &mut out).unwrap();
        let before = out.len();
        r.finish(&mut out);
        assert_eq!(out.len(), before);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            split in 0usize..400,
        ) {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&bytes);
            let split = split.min(input.len());
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            let _ = r.feed(&input[..split], &mut out);
            let _ = r.feed(&input[split..], &mut out);
            r.finish(&mut out);
        }
    }
}
