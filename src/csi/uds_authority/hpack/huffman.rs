//! Decoding of HPACK's Huffman-coded string literals (RFC 7541 §5.2 and Appendix B).
//!
//! The code of Appendix B is canonical: within one length the codes are consecutive and in
//! symbol order, and each length starts where the previous one ended, shifted left. So the
//! code lengths alone define it, and a decoder needs, per length, the first code and where
//! that length's symbols start in the symbols sorted by (length, symbol).

/// Bit length of the code of each symbol 0..=255 and of EOS (256), from RFC 7541 Appendix B.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

/// The longest code (EOS and a few control bytes).
const MAX_LEN: usize = 30;

/// The end-of-string symbol, which must never appear in a decoded string.
const EOS: u16 = 256;

/// A Huffman-coded string that is not valid under RFC 7541 §5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HuffmanError {
    #[error("the EOS symbol inside a Huffman-coded string")]
    Eos,
    #[error("Huffman padding longer than 7 bits or not all ones")]
    BadPadding,
}

/// Per-length decoding tables of the canonical code.
struct Canonical {
    /// first_code[len]: the code of the first symbol of that length.
    first_code: [u32; MAX_LEN + 1],
    /// count[len]: how many symbols have a code of that length.
    count: [u16; MAX_LEN + 1],
    /// offset[len]: index in `symbols` of the first symbol of that length.
    offset: [u16; MAX_LEN + 1],
    /// The symbols ordered by (code length, symbol).
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut count = [0u16; MAX_LEN + 1];
    let mut s = 0;
    while s < 257 {
        count[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut first_code = [0u32; MAX_LEN + 1];
    let mut offset = [0u16; MAX_LEN + 1];
    let mut code = 0u32;
    let mut next = 0u16;
    let mut len = 1;
    while len <= MAX_LEN {
        first_code[len] = code;
        offset[len] = next;
        code = (code + count[len] as u32) << 1;
        next += count[len];
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut fill = offset;
    let mut s = 0;
    while s < 257 {
        let len = CODE_LENGTHS[s] as usize;
        symbols[fill[len] as usize] = s as u16;
        fill[len] += 1;
        s += 1;
    }
    Canonical {
        first_code,
        count,
        offset,
        symbols,
    }
}

const TABLE: Canonical = canonical();

/// Decodes a Huffman-coded string literal, appending the bytes to `out`.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            // A run of ones longer than any code is EOS or worse; canonical codes of one
            // length are consecutive, so one comparison tells whether `code` is complete.
            let index = code.wrapping_sub(TABLE.first_code[len]);
            if index < u32::from(TABLE.count[len]) {
                let symbol = TABLE.symbols[usize::from(TABLE.offset[len]) + index as usize];
                if symbol == EOS {
                    return Err(HuffmanError::Eos);
                }
                // Symbols other than EOS are 0..=255.
                out.push(symbol as u8);
                code = 0;
                len = 0;
            } else if len == MAX_LEN {
                // Every 30-bit pattern that is not EOS is a code or starts with one, so
                // this cannot happen; refuse rather than index past the tables.
                return Err(HuffmanError::BadPadding);
            }
        }
    }
    // What is left must be the most significant bits of EOS (all ones), shorter than a byte.
    if len >= 8 || code != (1u32 << len) - 1 {
        return Err(HuffmanError::BadPadding);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The code of `symbol`, rebuilt from the canonical tables (for test encoders).
    pub(crate) fn code_of(symbol: usize) -> (u32, usize) {
        let len = CODE_LENGTHS[symbol] as usize;
        let start = usize::from(TABLE.offset[len]);
        let rank = TABLE.symbols[start..]
            .iter()
            .position(|&s| usize::from(s) == symbol)
            .unwrap();
        (TABLE.first_code[len] + rank as u32, len)
    }

    /// A Huffman encoder, for tests: codes, then padding with the leading bits of EOS.
    pub(crate) fn encode(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut acc: u64 = 0;
        let mut bits = 0;
        for &b in src {
            let (code, len) = code_of(usize::from(b));
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
        }
        out
    }

    fn decoded(src: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn the_code_is_complete_and_eos_is_thirty_ones() {
        // Kraft's sum of a complete prefix code is exactly 1.
        let sum: u64 = CODE_LENGTHS
            .iter()
            .map(|&l| 1u64 << (MAX_LEN - l as usize))
            .sum();
        assert_eq!(sum, 1 << MAX_LEN);
        assert_eq!(code_of(256), ((1 << 30) - 1, 30));
    }

    #[test]
    fn codes_match_rfc_7541_appendix_b() {
        // A few rows of the table as printed in the RFC.
        assert_eq!(code_of(usize::from(b'0')), (0x0, 5));
        assert_eq!(code_of(usize::from(b' ')), (0x14, 6));
        assert_eq!(code_of(usize::from(b'a')), (0x3, 5));
        assert_eq!(code_of(usize::from(b'%')), (0x15, 6));
        assert_eq!(code_of(usize::from(b'/')), (0x18, 6));
        assert_eq!(code_of(usize::from(b'z')), (0x7b, 7));
        assert_eq!(code_of(usize::from(b'~')), (0x1ffd, 13));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(10), (0x3ffffffc, 30));
        assert_eq!(code_of(255), (0x3ffffee, 26));
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 C.4.1 and C.4.2.
        let www = hex::decode("f1e3c2e5f23a6ba0ab90f4ff").unwrap();
        assert_eq!(decoded(&www).unwrap(), b"www.example.com");
        let no_cache = hex::decode("a8eb10649cbf").unwrap();
        assert_eq!(decoded(&no_cache).unwrap(), b"no-cache");
        // C.4.3.
        let custom = hex::decode("25a849e95bb8e8b4bf").unwrap();
        assert_eq!(decoded(&custom).unwrap(), b"custom-value");
        // C.6.1.
        let date = hex::decode("d07abe941054d444a8200595040b8166e082a62d1bff").unwrap();
        assert_eq!(decoded(&date).unwrap(), b"Mon, 21 Oct 2013 20:13:21 GMT");
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encode(&all)).unwrap(), all);
        assert_eq!(decoded(&encode(b"")).unwrap(), b"");
        assert_eq!(
            decoded(&encode(b"tmp%2Fcsi.sock")).unwrap(),
            b"tmp%2Fcsi.sock"
        );
    }

    #[test]
    fn refuses_bad_padding_and_eos() {
        // '0' is 00000: padding with zeros instead of ones.
        assert_eq!(decoded(&[0b0000_0000]), Err(HuffmanError::BadPadding));
        // A whole byte of ones is padding longer than 7 bits.
        assert_eq!(decoded(&[0xff]), Err(HuffmanError::BadPadding));
        // EOS itself, padded with ones.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // '0' then three bits of ones is fine.
        assert_eq!(decoded(&[0b0000_0111]).unwrap(), b"0");
    }

    proptest::proptest! {
        #[test]
        fn round_trips_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            proptest::prop_assert_eq!(decoded(&encode(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decoded(&bytes);
        }
    }
}
