//! The protobuf codec of the CSI services. It is tonic's prost codec but for one answer: a
//! message that does not decode (a `string` field that is not UTF-8, a truncated field) is
//! INVALID_ARGUMENT naming the message and the field prost names, because on the driver's
//! socket what is decoded is a CO's request, and a malformed request is the caller's
//! error; tonic's codec answers INTERNAL, which CSI keeps for the plugin's own failures.
//! The CSI clients (tests, benches) decode answers with it too; this driver never sends an
//! answer that does not decode.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// [`ProstCodec`] with INVALID_ARGUMENT for messages that do not decode.
#[derive(Debug, Clone)]
pub struct CsiCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct CsiDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_error(&e))
    }
}

/// The answer to a message that does not decode. prost's error names the message and the
/// field (e.g. "failed to decode Protobuf message: CreateVolumeRequest.name: invalid
/// string value: data is not UTF-8 encoded").
fn decode_error(e: &prost::DecodeError) -> Status {
    Status::invalid_argument(format!("the request is not valid CSI protobuf: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::v1 as pb;

    #[test]
    fn a_string_field_that_is_not_utf8_names_the_field() {
        // Field 1 (name), length-delimited, 2 bytes: 0xff 0xfe.
        let bytes = [0x0a, 0x02, 0xff, 0xfe];
        let e = pb::CreateVolumeRequest::decode(&bytes[..]).unwrap_err();
        let s = decode_error(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().contains("CreateVolumeRequest.name"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("UTF-8"), "{}", s.message());
    }
}
