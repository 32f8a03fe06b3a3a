//! The CSI v1 wire types and gRPC services generated from proto/csi.proto.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("csi.v1");
}
