//! The NBD handshake and transmission codec: every option and command, and malformed input
//! answered with an error, never a panic.

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
