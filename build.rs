// Compiles proto/csi.proto (the CSI gRPC types) and proto/palisade.proto (Palisade's own
// control-plane and node-agent API) with tonic; protoc comes from the protoc-bin-vendored
// crate so that no system protoc is needed.
//
// The CSI services use their own codec (src/csi/codec.rs): a request that is not
// valid protobuf (a `string` field that is not UTF-8, say) is the caller's error,
// INVALID_ARGUMENT, where tonic's codec answers INTERNAL.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/palisade.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::csi::codec::CsiCodec")
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/palisade.proto"], &["proto"])?;
    Ok(())
}
