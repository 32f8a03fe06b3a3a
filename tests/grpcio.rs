//! Python's grpcio, with a default channel (`grpc.insecure_channel("unix://" + path)`), as a
//! CSI client of the real binaries over their real unix sockets: `palisade standalone`, and
//! the `controller` and `node` of a cluster. grpcio sends the percent-encoded socket path as
//! `:authority`, which `h2` alone refuses (stream reset with PROTOCOL_ERROR).
//!
//! Needs python3 with grpcio (`.ci/run` installs it); without them each test says SKIPPED
//! and why, on stderr past the test harness's capture, and passes.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use palisade::csi::v1 as pb;
use prost::Message;

/// Calls GetPluginInfo twice on one channel (the second request refers to the first one's
/// entries in the HPACK dynamic table) and Probe, with hand-made protobuf (empty requests);
/// prints the responses as hex, one JSON object.
const CLIENT: &str = r#"
import json, sys
import grpc

channel = grpc.insecure_channel("unix://" + sys.argv[1])
raw = lambda b: b
info = channel.unary_unary("/csi.v1.Identity/GetPluginInfo", request_serializer=raw, response_deserializer=raw)
probe = channel.unary_unary("/csi.v1.Identity/Probe", request_serializer=raw, response_deserializer=raw)
result = {"grpcio": grpc.__version__, "info": [], "probe": None}
try:
    for _ in range(2):
        result["info"].append(info(b"", timeout=20).hex())
    result["probe"] = probe(b"", timeout=20).hex()
except grpc.RpcError as e:
    result["error"] = "%s: %s" % (e.code(), e.details())
print(json.dumps(result))
"#;

/// Why grpcio cannot be used here, if it cannot.
fn grpcio_missing() -> Option<String> {
    match Command::new("python3").args(["-c", "import grpc"]).output() {
        Err(e) => Some(format!("python3 cannot be run ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "python3 cannot import grpc ({})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no message")
        )),
        Ok(_) => None,
    }
}

fn skipped(test: &str, why: &str) {
    // Straight to stderr: the harness captures only the print macros.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test} because {why} (pip install grpcio)"
    );
}

/// Runs the grpcio client against `socket` and checks what it got back.
fn assert_grpcio_served(socket: &Path, driver_name: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(socket)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("client's JSON");
    assert!(
        result.get("error").is_none(),
        "grpcio {} on {socket:?}: {}",
        result["grpcio"],
        result["error"]
    );
    let info = result["info"].as_array().expect("info responses");
    assert_eq!(info.len(), 2);
    for hex_response in info {
        let bytes = hex::decode(hex_response.as_str().unwrap_or_default()).expect("hex");
        let info = pb::GetPluginInfoResponse::decode(bytes.as_slice()).expect("protobuf");
        assert_eq!(info.name, driver_name);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    }
    let bytes = hex::decode(result["probe"].as_str().unwrap_or_default()).expect("hex");
    let probe = pb::ProbeResponse::decode(bytes.as_slice()).expect("protobuf");
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn grpcio_default_channel_is_served_by_standalone() {
    if let Some(why) = grpcio_missing() {
        return skipped("grpcio_default_channel_is_served_by_standalone", &why);
    }
    let driver = common::Driver::start(&["disk0"]).await;
    assert_grpcio_served(&driver.socket, "driver.palisade.io");
}

#[tokio::test]
async fn grpcio_default_channel_is_served_by_controller_and_node() {
    if let Some(why) = grpcio_missing() {
        return skipped(
            "grpcio_default_channel_is_served_by_controller_and_node",
            &why,
        );
    }
    let cluster = common::cluster::Cluster::start(1).await;
    assert_grpcio_served(&cluster.controller_socket, "driver.palisade.io");
    assert_grpcio_served(&cluster.node("n1").socket, "driver.palisade.io");
}
