// Compiles proto/csi.proto (the CSI gRPC types) and proto/palisade.proto (Palisade's own
// control-plane and node-agent API) with tonic; protoc comes from the protoc-bin-vendored
// crate so that no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/palisade.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/csi.proto", "proto/palisade.proto"], &["proto"])?;
    Ok(())
}
