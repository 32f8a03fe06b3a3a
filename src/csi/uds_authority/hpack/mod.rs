//! HPACK (RFC 7541), sans-IO, for rewriting header blocks in flight: a decoder that keeps
//! the dynamic table of one direction of one connection, and an encoder that never touches a
//! dynamic table (static-table references and literals without indexing only), so that the
//! peer's decoder state is left exactly as it was.
//!
//! The decoder is as strict as the `h2` crate's where the two overlap (5-octet integers,
//! Huffman padding, table size updates bounded by the advertised table size) so that a block
//! `h2` would accept is not refused here; it does not judge names and values, which are
//! passed on as they are.

mod huffman;

use std::collections::VecDeque;

pub use huffman::HuffmanError;

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "literal never indexed": an intermediary must re-encode it the same way.
    pub never_indexed: bool,
}

impl Field {
    pub fn new(name: &[u8], value: &[u8]) -> Field {
        Field {
            name: name.to_vec(),
            value: value.to_vec(),
            never_indexed: false,
        }
    }

    /// The field's size as the dynamic table and SETTINGS_MAX_HEADER_LIST_SIZE count it.
    fn size(&self) -> usize {
        entry_size(&self.name, &self.value)
    }
}

/// A header block that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer longer than 5 octets")]
    IntegerOverflow,
    #[error("table index {0} is not in the static or dynamic table")]
    BadIndex(usize),
    #[error("dynamic table size update to {size} exceeds the allowed {allowed}")]
    TableSizeTooLarge { size: usize, allowed: usize },
    #[error("dynamic table size update after a header field")]
    LateTableSizeUpdate,
    #[error("bad Huffman-coded string: {0}")]
    Huffman(#[from] HuffmanError),
    #[error("decoded header list is larger than {0} bytes")]
    ListTooLarge(usize),
}

/// The per-entry overhead of RFC 7541 §4.1.
const ENTRY_OVERHEAD: usize = 32;

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + ENTRY_OVERHEAD
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The decoding context of one direction of one connection.
///
/// After [`Decoder::decode`] fails, the table may hold part of the failed block's insertions:
/// the decoder must not be used for that connection again.
#[derive(Debug)]
pub struct Decoder {
    /// Newest entry first (dynamic index 62 is `entries[0]`).
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE as the decoding side advertised it: the ceiling of size
    /// updates.
    allowed: usize,
    /// Decoded header lists larger than this are refused (a block of a few bytes can name a
    /// large table entry many times).
    max_list_size: usize,
}

impl Decoder {
    /// A decoder for a peer that was told SETTINGS_HEADER_TABLE_SIZE = `table_size`.
    pub fn new(table_size: usize, max_list_size: usize) -> Decoder {
        Decoder {
            entries: VecDeque::new(),
            size: 0,
            max_size: table_size,
            allowed: table_size,
            max_list_size,
        }
    }

    /// Decodes one complete header block (the fragments of HEADERS and its CONTINUATIONs,
    /// concatenated), applying its insertions and size updates to the dynamic table.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut src = Reader { buf: block, pos: 0 };
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(first) = src.peek() {
            let field = if first & 0x80 != 0 {
                let index = src.integer(7)?;
                let (name, value) = self.get(index)?;
                Field::new(name, value)
            } else if first & 0x40 != 0 {
                let field = self.literal(&mut src, 6, false)?;
                self.insert(field.name.clone(), field.value.clone());
                field
            } else if first & 0x20 != 0 {
                // Size updates are only allowed before the first field (§4.2).
                if !fields.is_empty() {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let size = src.integer(5)?;
                if size > self.allowed {
                    return Err(HpackError::TableSizeTooLarge {
                        size,
                        allowed: self.allowed,
                    });
                }
                self.max_size = size;
                self.evict();
                continue;
            } else {
                // 0000xxxx without indexing, 0001xxxx never indexed.
                self.literal(&mut src, 4, first & 0x10 != 0)?
            };
            list_size = list_size.saturating_add(field.size());
            if list_size > self.max_list_size {
                return Err(HpackError::ListTooLarge(self.max_list_size));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(
        &self,
        src: &mut Reader<'_>,
        prefix: u8,
        never_indexed: bool,
    ) -> Result<Field, HpackError> {
        let index = src.integer(prefix)?;
        let name = if index == 0 {
            src.string()?
        } else {
            self.get(index)?.0.to_vec()
        };
        let value = src.string()?;
        Ok(Field {
            name,
            value,
            never_indexed,
        })
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(index));
        }
        if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name, value));
        }
        self.entries
            .get(index - 1 - STATIC_TABLE.len())
            .map(|(name, value)| (name.as_slice(), value.as_slice()))
            .ok_or(HpackError::BadIndex(index))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // §4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.size += size;
        self.entries.push_front((name, value));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.entries.pop_back() {
                Some((name, value)) => self.size -= entry_size(&name, &value),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// A cursor over a header block.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<u8, HpackError> {
        let byte = self.peek().ok_or(HpackError::Truncated)?;
        self.pos += 1;
        Ok(byte)
    }

    /// An integer with an N-bit prefix (§5.1), at most 5 octets long as in `h2`.
    fn integer(&mut self, prefix: u8) -> Result<usize, HpackError> {
        let mask = (1u16 << prefix) as usize - 1;
        let mut value = usize::from(self.next()?) & mask;
        if value < mask {
            return Ok(value);
        }
        let mut shift = 0;
        for _ in 1..5 {
            let byte = self.next()?;
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(HpackError::IntegerOverflow)
    }

    /// A string literal (§5.2), Huffman-decoded if its H bit is set.
    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman = self.peek().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        let end = self.pos.checked_add(len).ok_or(HpackError::Truncated)?;
        let raw = self.buf.get(self.pos..end).ok_or(HpackError::Truncated)?;
        self.pos = end;
        if huffman {
            let mut out = Vec::with_capacity(len * 8 / 5 + 1);
            huffman::decode(raw, &mut out)?;
            Ok(out)
        } else {
            Ok(raw.to_vec())
        }
    }
}

/// Encodes `fields` as a header block that neither reads nor changes the peer's dynamic
/// table: exact static-table matches as indexed fields, everything else as literals
/// (without indexing, or never indexed when the field was) with a static-table name where
/// one exists. Strings are sent as they are, not Huffman-coded.
pub fn encode_without_indexing(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        let exact = STATIC_TABLE
            .iter()
            .position(|&(n, v)| n == field.name.as_slice() && v == field.value.as_slice());
        match exact {
            Some(i) if !field.never_indexed => integer(i + 1, 7, 0x80, out),
            _ => {
                let flags = if field.never_indexed { 0x10 } else { 0x00 };
                let name = STATIC_TABLE
                    .iter()
                    .position(|&(n, _)| n == field.name.as_slice());
                match name {
                    Some(i) => integer(i + 1, 4, flags, out),
                    None => {
                        out.push(flags);
                        string(&field.name, out);
                    }
                }
                string(&field.value, out);
            }
        }
    }
}

fn integer(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = (1u16 << prefix) as usize - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn string(bytes: &[u8], out: &mut Vec<u8>) {
    integer(bytes.len(), 7, 0x00, out);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs
            .iter()
            .map(|(n, v)| Field::new(n.as_bytes(), v.as_bytes()))
            .collect()
    }

    fn decoder() -> Decoder {
        Decoder::new(4096, 1 << 20)
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        d.entries
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn integers_follow_rfc_7541_c1() {
        let mut out = Vec::new();
        integer(10, 5, 0, &mut out);
        assert_eq!(out, [10]);
        out.clear();
        integer(1337, 5, 0, &mut out);
        assert_eq!(out, [31, 154, 10]);
        out.clear();
        integer(42, 8, 0, &mut out);
        assert_eq!(out, [42]);
        let mut r = Reader {
            buf: &[31, 154, 10],
            pos: 0,
        };
        assert_eq!(r.integer(5), Ok(1337));
        let mut r = Reader {
            buf: &[31, 0xff, 0xff, 0xff, 0xff, 0x01],
            pos: 0,
        };
        assert_eq!(r.integer(5), Err(HpackError::IntegerOverflow));
        let mut r = Reader {
            buf: &[31, 0xff],
            pos: 0,
        };
        assert_eq!(r.integer(5), Err(HpackError::Truncated));
    }

    /// RFC 7541 C.3: three requests without Huffman coding, sharing the dynamic table.
    #[test]
    fn decodes_rfc_7541_c3_requests() {
        let mut d = decoder();
        let first = hex::decode("828684410f7777772e6578616d706c652e636f6d").unwrap();
        assert_eq!(
            d.decode(&first).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.size, 57);
        let second = hex::decode("828684be58086e6f2d6361636865").unwrap();
        assert_eq!(
            d.decode(&second).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third =
            hex::decode("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565").unwrap();
        assert_eq!(
            d.decode(&third).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(
            table(&d),
            [
                ("custom-key".to_string(), "custom-value".to_string()),
                ("cache-control".to_string(), "no-cache".to_string()),
                (":authority".to_string(), "www.example.com".to_string()),
            ]
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.5: responses with a 256-byte table, so entries are evicted.
    #[test]
    fn evicts_as_in_rfc_7541_c5() {
        let mut d = Decoder::new(256, 1 << 20);
        let first = hex::decode(concat!(
            "4803333032580770726976617465611d",
            "4d6f6e2c203231204f63742032303133",
            "2032303a31333a323120474d546e1768",
            "747470733a2f2f7777772e6578616d70",
            "6c652e636f6d"
        ))
        .unwrap();
        d.decode(&first).unwrap();
        assert_eq!(d.size, 222);
        let second = hex::decode("4803333037c1c0bf").unwrap();
        assert_eq!(
            d.decode(&second).unwrap(),
            fields(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        assert_eq!(table(&d)[0], (":status".into(), "307".into()));
        assert_eq!(d.entries.len(), 4);
    }

    #[test]
    fn decodes_huffman_literals_of_rfc_7541_c4() {
        let mut d = decoder();
        let first = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
        assert_eq!(
            d.decode(&first).unwrap()[3],
            Field::new(b":authority", b"www.example.com")
        );
    }

    #[test]
    fn size_updates_bound_evict_and_must_come_first() {
        let mut d = decoder();
        d.decode(&hex::decode("400161016200").unwrap()[..5])
            .unwrap();
        assert_eq!(d.entries.len(), 1);
        // Size update to 0 empties the table, then a literal field.
        assert_eq!(
            d.decode(&[0x20, 0x82]).unwrap(),
            fields(&[(":method", "GET")])
        );
        assert!(d.entries.is_empty());
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));

        let mut d = decoder();
        // 4097 = 31 + 4066: 0x3f, 4066 = 0xfe2 -> 0xe2 0x1f.
        assert_eq!(
            d.decode(&[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableSizeTooLarge {
                size: 4097,
                allowed: 4096
            })
        );
        let mut d = decoder();
        assert_eq!(
            d.decode(&[0x82, 0x20]),
            Err(HpackError::LateTableSizeUpdate)
        );
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut d = Decoder::new(40, 1 << 20);
        d.decode(&[0x40, 1, b'a', 1, b'b']).unwrap();
        assert_eq!(d.size, 34);
        let mut big = vec![0x40, 1, b'c', 10];
        big.extend_from_slice(b"0123456789");
        d.decode(&big).unwrap();
        assert!(d.entries.is_empty());
        assert_eq!(d.size, 0);
    }

    #[test]
    fn refuses_what_does_not_decode() {
        let mut d = decoder();
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&[0x40, 3, b'a']), Err(HpackError::Truncated));
        assert_eq!(d.decode(&[0x04, 0x85, 0xff]), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0x04, 0x81, 0xff]),
            Err(HpackError::Huffman(HuffmanError::BadPadding))
        );
    }

    #[test]
    fn refuses_a_header_list_over_the_limit() {
        let mut d = Decoder::new(4096, 1000);
        let mut block = vec![0x40, 1, b'x', 0x7f, 200 - 127];
        block.extend(std::iter::repeat_n(b'v', 200));
        // One entry of 233 bytes, then four more references to it.
        block.extend_from_slice(&[0xbe, 0xbe, 0xbe, 0xbe]);
        assert_eq!(d.decode(&block), Err(HpackError::ListTooLarge(1000)));
    }

    #[test]
    fn encoding_reads_and_writes_no_dynamic_table() {
        let mut original = fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/csi.v1.Identity/GetPluginInfo"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-long", &"y".repeat(300)),
        ]);
        original.push(Field {
            name: b"authorization".to_vec(),
            value: b"secret".to_vec(),
            never_indexed: true,
        });
        let mut block = Vec::new();
        encode_without_indexing(&original, &mut block);
        // No byte of the block starts an incremental-indexing literal or a size update,
        // and no indexed field points past the static table.
        let mut d = decoder();
        assert_eq!(d.decode(&block).unwrap(), original);
        assert!(d.entries.is_empty());
        assert_eq!(block[0], 0x83, ":method POST is static entry 3");
        assert_eq!(block[1], 0x86, ":scheme http is static entry 6");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_block(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut d = Decoder::new(4096, 1 << 16);
            let _ = d.decode(&bytes);
            let _ = d.decode(&bytes);
        }

        #[test]
        fn encoded_fields_decode_back(
            pairs in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                 proptest::bool::ANY),
                0..10),
        ) {
            let original: Vec<Field> = pairs
                .into_iter()
                .map(|(name, value, never_indexed)| Field { name, value, never_indexed })
                .collect();
            let mut block = Vec::new();
            encode_without_indexing(&original, &mut block);
            let mut d = Decoder::new(4096, 1 << 20);
            proptest::prop_assert_eq!(d.decode(&block).unwrap(), original);
            proptest::prop_assert!(d.entries.is_empty());
        }
    }
}
