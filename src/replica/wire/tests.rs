//! The replica protocol's frames: every message round-trips, and malformed, truncated or
//! oversized input is an error, never a panic.

#![allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use super::*;
use proptest::prelude::*;

fn request_frame(tag: Tag, request: &Request) -> BytesMut {
    let mut out = BytesMut::new();
    encode_request(tag, request, &mut out).unwrap();
    out
}

fn response_frame(tag: Tag, response: &Response) -> BytesMut {
    let mut out = BytesMut::new();
    encode_response(tag, response, &mut out).unwrap();
    out
}

fn open() -> Request {
    Request::Open(Open {
        volume_id: "vol-1".into(),
        replica_id: "r-1".into(),
        epoch: 3,
        token: "ab".repeat(32),
    })
}

#[test]
fn the_frame_layout_is_as_documented() {
    let frame = request_frame(
        0x0102030405060708,
        &Request::Write {
            offset: 0x10,
            fua: true,
            data: Bytes::from_static(b"hi"),
        },
    );
    assert_eq!(
        &frame[..],
        b"\x00\x00\x00\x14\x03\x01\x02\x03\x04\x05\x06\x07\x08\
          \x00\x00\x00\x00\x00\x00\x00\x10\x01hi"
    );
    let frame = request_frame(1, &open());
    assert_eq!(&frame[..4], &(frame.len() as u32 - 4).to_be_bytes());
    assert_eq!(&frame[4..13], b"\x01\x00\x00\x00\x00\x00\x00\x00\x01");
    assert_eq!(&frame[13..20], b"\x00\x05vol-1");
    let frame = response_frame(9, &Response::Fenced { current: 4 });
    assert_eq!(
        &frame[..],
        b"\x00\x00\x00\x11\x11\x00\x00\x00\x00\x00\x00\x00\x09\
          \x00\x00\x00\x00\x00\x00\x00\x04"
    );
    let frame = response_frame(2, &Response::Io("disk".into()));
    assert_eq!(&frame[13..], b"\x00\x04disk");
}

#[test]
fn frames_decode_incrementally_and_in_sequence() {
    let requests = [
        open(),
        Request::Read {
            offset: 4096,
            len: 512,
        },
        Request::Flush,
        Request::Trim {
            offset: 0,
            len: u32::MAX,
        },
    ];
    let mut stream = BytesMut::new();
    for (tag, request) in requests.iter().enumerate() {
        encode_request(tag as Tag, request, &mut stream).unwrap();
    }
    // Fed one byte at a time, every frame comes out whole and in order.
    let mut buf = BytesMut::new();
    let mut decoded = vec![];
    for byte in stream {
        buf.put_u8(byte);
        while let Some(frame) = decode_request(&mut buf).unwrap() {
            decoded.push(frame);
        }
    }
    assert!(buf.is_empty());
    let expected: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(tag, r)| (tag as Tag, r))
        .collect();
    assert_eq!(decoded, expected);
}

#[test]
fn lengths_out_of_bounds_are_errors_at_once() {
    let mut buf = BytesMut::from(&b"\xff\xff\xff\xff"[..]);
    assert_eq!(
        decode_request(&mut buf),
        Err(WireError::FrameTooLarge {
            len: u32::MAX as u64
        })
    );
    let too_large = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
    assert!(matches!(
        decode_response(&mut BytesMut::from(&too_large[..])),
        Err(WireError::FrameTooLarge { .. })
    ));
    for len in 0..FRAME_HEADER_LEN as u32 {
        assert_eq!(
            decode_request(&mut BytesMut::from(&len.to_be_bytes()[..])),
            Err(WireError::FrameTooShort { len: len as u64 })
        );
    }
    // The largest frame is accepted, once whole.
    let data = Bytes::from(vec![7u8; MAX_IO_LEN]);
    let mut frame = request_frame(
        5,
        &Request::Write {
            offset: 0,
            fua: false,
            data: data.clone(),
        },
    );
    assert!(frame.len() - 4 <= MAX_FRAME_LEN);
    let mut partial = frame.split_to(frame.len() - 1);
    assert_eq!(decode_request(&mut partial), Ok(None));
    partial.unsplit(frame);
    assert_eq!(
        decode_request(&mut partial),
        Ok(Some((
            5,
            Request::Write {
                offset: 0,
                fua: false,
                data
            }
        )))
    );
}

#[test]
fn encoding_refuses_what_breaks_a_bound() {
    let mut out = BytesMut::new();
    let long_id = Request::Open(Open {
        volume_id: "v".repeat(MAX_ID_LEN + 1),
        replica_id: "r".into(),
        epoch: 1,
        token: "t".into(),
    });
    let long_token = Request::Open(Open {
        volume_id: "v".into(),
        replica_id: "r".into(),
        epoch: 1,
        token: "t".repeat(MAX_TOKEN_LEN + 1),
    });
    let long_read = Request::Read {
        offset: 0,
        len: MAX_IO_LEN as u32 + 1,
    };
    let long_write = Request::Write {
        offset: 0,
        fua: false,
        data: Bytes::from(vec![0; MAX_IO_LEN + 1]),
    };
    for request in [long_id, long_token, long_read, long_write] {
        assert!(matches!(
            encode_request(1, &request, &mut out),
            Err(WireError::TooLong { .. })
        ));
    }
    assert!(matches!(
        encode_response(1, &Response::Data(vec![0; MAX_IO_LEN + 1].into()), &mut out),
        Err(WireError::TooLong { .. })
    ));
    assert!(out.is_empty());
    // Messages are cut, at a character boundary.
    let message = "é".repeat(MAX_MESSAGE_LEN);
    let mut frame = response_frame(1, &Response::Invalid(message));
    let Some((1, Response::Invalid(cut))) = decode_response(&mut frame).unwrap() else {
        panic!("not an Invalid response");
    };
    assert_eq!(cut, "é".repeat(MAX_MESSAGE_LEN / 2));
}

#[test]
fn malformed_bodies_are_named_errors() {
    let cases: [(&[u8], WireError); 6] = [
        (
            b"\x09\x00\x00\x00\x00\x00\x00\x00\x01",
            WireError::UnknownOpcode(9),
        ),
        (
            b"\x04\x00\x00\x00\x00\x00\x00\x00\x01x",
            WireError::TrailingBytes {
                what: "flush request",
                extra: 1,
            },
        ),
        (
            b"\x02\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00",
            WireError::Truncated {
                what: "read offset",
            },
        ),
        (
            b"\x03\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02",
            WireError::UnknownFlags(2),
        ),
        (
            b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x01\x00",
            WireError::TooLong {
                what: "volume id",
                len: 256,
                max: MAX_ID_LEN,
            },
        ),
        (
            b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\xff",
            WireError::NotUtf8 { what: "volume id" },
        ),
    ];
    for (body, expected) in cases {
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        assert_eq!(decode_request(&mut buf), Err(expected));
    }
    let mut buf = BytesMut::new();
    buf.put_u32(9);
    buf.put_u8(99);
    buf.put_u64(1);
    assert_eq!(decode_response(&mut buf), Err(WireError::UnknownStatus(99)));
}

fn arb_string(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..=max / 4).prop_map(move |chars| {
        let s: String = chars.into_iter().collect();
        truncate_at_char(&s, max).to_string()
    })
}

fn arb_data() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            arb_string(MAX_ID_LEN),
            arb_string(MAX_ID_LEN),
            any::<u64>(),
            arb_string(MAX_TOKEN_LEN)
        )
            .prop_map(|(volume_id, replica_id, epoch, token)| Request::Open(Open {
                volume_id,
                replica_id,
                epoch,
                token
            })),
        (any::<u64>(), 0..=MAX_IO_LEN as u32)
            .prop_map(|(offset, len)| Request::Read { offset, len }),
        (any::<u64>(), any::<bool>(), arb_data()).prop_map(|(offset, fua, data)| Request::Write {
            offset,
            fua,
            data
        }),
        Just(Request::Flush),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Request::Trim { offset, len }),
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Request::Extents { offset, len }),
        (any::<u64>(), 0..=MAX_IO_LEN as u32)
            .prop_map(|(offset, len)| Request::Checksum { offset, len }),
    ]
}

fn arb_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Done),
        (any::<u64>(), any::<u64>()).prop_map(|(size, epoch)| Response::Opened { size, epoch }),
        arb_data().prop_map(Response::Data),
        proptest::collection::vec((any::<u64>(), any::<u32>()), 0..64).prop_map(Response::Extents),
        any::<[u8; CHECKSUM_LEN]>().prop_map(Response::Checksum),
        any::<u64>().prop_map(|current| Response::StaleEpoch { current }),
        any::<u64>().prop_map(|current| Response::Fenced { current }),
        Just(Response::BadToken),
        Just(Response::NotFound),
        Just(Response::NotOpen),
        arb_string(MAX_MESSAGE_LEN).prop_map(Response::Invalid),
        arb_string(MAX_MESSAGE_LEN).prop_map(Response::Io),
        arb_string(MAX_MESSAGE_LEN).prop_map(Response::Protocol),
    ]
}

proptest! {
    #[test]
    fn every_request_round_trips(tag in any::<u64>(), request in arb_request()) {
        let mut buf = request_frame(tag, &request);
        prop_assert_eq!(decode_request(&mut buf), Ok(Some((tag, request))));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_response_round_trips(tag in any::<u64>(), response in arb_response()) {
        let mut buf = response_frame(tag, &response);
        prop_assert_eq!(decode_response(&mut buf), Ok(Some((tag, response))));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_proper_prefix_of_a_frame_needs_more(
        request in arb_request(),
        response in arb_response(),
        cut in any::<prop::sample::Index>(),
    ) {
        let frame = request_frame(1, &request);
        let mut prefix = BytesMut::from(&frame[..cut.index(frame.len())]);
        prop_assert_eq!(decode_request(&mut prefix), Ok(None));
        prop_assert_eq!(prefix.len(), cut.index(frame.len()));
        let frame = response_frame(1, &response);
        let mut prefix = BytesMut::from(&frame[..cut.index(frame.len())]);
        prop_assert_eq!(decode_response(&mut prefix), Ok(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_decoders(&bytes, &mut Outcomes::default());
    }

    #[test]
    fn mutated_frames_never_panic(
        request in arb_request(),
        response in arb_response(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut frame in [request_frame(1, &request).to_vec(), response_frame(2, &response).to_vec()] {
            for (at, byte) in &edits {
                let i = at.index(frame.len());
                frame[i] = *byte;
            }
            check_decoders(&frame, &mut Outcomes::default());
            check_decoders(&frame[..cut.index(frame.len())], &mut Outcomes::default());
        }
    }
}

/// What the decoders made of fuzz inputs: frames accepted, inputs that ended needing
/// more bytes, and errors by kind.
#[derive(Default)]
struct Outcomes {
    frames: u64,
    need_more: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

impl Outcomes {
    fn error(&mut self, e: &WireError) {
        let debug = format!("{e:?}");
        let kind = debug
            .split([' ', '('])
            .next()
            .unwrap_or_default()
            .to_string();
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Feeds `input` to both decoders until they need more bytes or fail, checking that every
/// frame they accept consumes bytes and re-encodes to a frame that decodes the same.
fn check_decoders(input: &[u8], outcomes: &mut Outcomes) {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match decode_request(&mut buf) {
            Ok(Some((tag, request))) => {
                assert!(buf.len() < before);
                let mut again = request_frame(tag, &request);
                assert_eq!(decode_request(&mut again), Ok(Some((tag, request))));
                outcomes.frames += 1;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                outcomes.need_more += 1;
                break;
            }
            Err(e) => {
                outcomes.error(&e);
                break;
            }
        }
    }
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.len();
        match decode_response(&mut buf) {
            Ok(Some((tag, response))) => {
                assert!(buf.len() < before);
                let mut again = response_frame(tag, &response);
                assert_eq!(decode_response(&mut again), Ok(Some((tag, response))));
                outcomes.frames += 1;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                outcomes.need_more += 1;
                break;
            }
            Err(e) => {
                outcomes.error(&e);
                break;
            }
        }
    }
}

/// A small, fast, seedable generator (SplitMix64) for the long fuzz run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn string(&mut self, max: usize) -> String {
        let len = self.below(max + 1);
        // Mostly ASCII, some multi-byte characters.
        let s: String = (0..len)
            .map(|_| match self.below(8) {
                0 => 'é',
                1 => '✓',
                _ => (b'a' + self.below(26) as u8) as char,
            })
            .collect();
        truncate_at_char(&s, max).to_string()
    }

    fn interesting_u64(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX - self.below(4) as u64,
            2 => self.below(1 << 20) as u64,
            _ => self.next(),
        }
    }

    fn request(&mut self) -> Request {
        match self.below(5) {
            0 => Request::Open(Open {
                volume_id: self.string(MAX_ID_LEN),
                replica_id: self.string(MAX_ID_LEN),
                epoch: self.interesting_u64(),
                token: self.string(MAX_TOKEN_LEN),
            }),
            1 => Request::Read {
                offset: self.interesting_u64(),
                len: self.below(MAX_IO_LEN + 1) as u32,
            },
            2 => {
                let len = self.below(256);
                Request::Write {
                    offset: self.interesting_u64(),
                    fua: self.below(2) == 0,
                    data: self.bytes(len).into(),
                }
            }
            3 => Request::Flush,
            _ => Request::Trim {
                offset: self.interesting_u64(),
                len: self.next() as u32,
            },
        }
    }

    fn response(&mut self) -> Response {
        match self.below(11) {
            0 => Response::Done,
            1 => Response::Opened {
                size: self.interesting_u64(),
                epoch: self.interesting_u64(),
            },
            2 => {
                let len = self.below(256);
                Response::Data(self.bytes(len).into())
            }
            3 => Response::StaleEpoch {
                current: self.interesting_u64(),
            },
            4 => Response::Fenced {
                current: self.interesting_u64(),
            },
            5 => Response::BadToken,
            6 => Response::NotFound,
            7 => Response::NotOpen,
            8 => Response::Invalid(self.string(64)),
            9 => Response::Io(self.string(64)),
            _ => Response::Protocol(self.string(64)),
        }
    }

    /// Valid frames (one to three, of either direction) then mutated.
    fn mutated_frames(&mut self) -> Vec<u8> {
        let mut out = BytesMut::new();
        for _ in 0..=self.below(3) {
            let tag = self.interesting_u64();
            if self.below(2) == 0 {
                encode_request(tag, &self.request(), &mut out).unwrap();
            } else {
                encode_response(tag, &self.response(), &mut out).unwrap();
            }
        }
        let mut input = out.to_vec();
        for _ in 0..self.below(4) {
            if input.is_empty() {
                break;
            }
            match self.below(7) {
                0 | 1 => {
                    let i = self.below(input.len());
                    input[i] ^= 1 << self.below(8);
                }
                2 => {
                    let i = self.below(input.len());
                    input[i] = self.next() as u8;
                }
                3 => input.truncate(self.below(input.len())),
                4 => {
                    let i = self.below(input.len() + 1);
                    let len = self.below(16);
                    let extra = self.bytes(len);
                    input.splice(i..i, extra);
                }
                5 => {
                    // Rewrite the first length field or a string length.
                    let i = self.below(input.len().min(24));
                    let value = [0u8, 1, 8, 9, 0x7f, 0x80, 0xff][self.below(7)];
                    input[i] = value;
                }
                _ => {
                    let i = self.below(input.len());
                    input.drain(i..(i + self.below(8)).min(input.len()));
                }
            }
        }
        input
    }

    /// A fuzz input: random bytes, a random header before random bytes, or mutated frames.
    fn input(&mut self) -> Vec<u8> {
        match self.below(4) {
            0 => {
                let len = self.below(64);
                self.bytes(len)
            }
            1 => {
                let mut input = BytesMut::new();
                let len = match self.below(8) {
                    0 => self.next() as u32,
                    _ => self.below(80) as u32,
                };
                input.put_u32(len);
                input.put_u8(self.below(32) as u8);
                input.put_u64(self.next());
                let len = self.below(64);
                input.put_slice(&self.bytes(len));
                input.to_vec()
            }
            _ => self.mutated_frames(),
        }
    }
}

/// Runs `count` fuzz inputs through both decoders.
fn fuzz(seed: u64, count: u64) -> Outcomes {
    let mut rng = Rng(seed);
    let mut outcomes = Outcomes::default();
    for _ in 0..count {
        check_decoders(&rng.input(), &mut outcomes);
    }
    outcomes
}

fn seed() -> u64 {
    std::env::var("PALISADE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn run_fuzz(count: u64) {
    let seed = seed();
    eprintln!("fuzzing with seed {seed} (set PALISADE_FUZZ_SEED to replay)");
    let started = std::time::Instant::now();
    let outcomes = fuzz(seed, count);
    eprintln!(
        "fuzzed both decoders with {count} inputs in {:.1?}, no panic: {} frames accepted, \
         {} ends needing more bytes, errors {:?}",
        started.elapsed(),
        outcomes.frames,
        outcomes.need_more,
        outcomes.errors
    );
    // The generator reaches every outcome.
    assert!(outcomes.frames > count / 10);
    assert!(outcomes.need_more > count / 10);
    for kind in [
        "FrameTooLarge",
        "FrameTooShort",
        "UnknownOpcode",
        "UnknownStatus",
        "Truncated",
        "TrailingBytes",
        "TooLong",
        "NotUtf8",
        "UnknownFlags",
    ] {
        assert!(outcomes.errors.contains_key(kind), "no {kind} error");
    }
}

#[test]
fn fuzz_decoders() {
    run_fuzz(100_000);
}

/// The long run: `cargo test --release --lib wire:: -- --ignored --nocapture`
/// (`PALISADE_FUZZ_COUNT` for another count than 5 million).
#[test]
#[ignore]
fn fuzz_decoders_millions() {
    let count = std::env::var("PALISADE_FUZZ_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000_000u64);
    run_fuzz(count);
}
