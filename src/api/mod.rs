//! Palisade's own gRPC API (proto/palisade.proto): the controller's ControlPlane, which node
//! agents and `palisade ctl` use, and every node's NodeAgent, which the controller uses.
//! Thin adapters over the domain layer (`control`, `agent`), with the mapping of their errors
//! to gRPC codes in one place (`status`).

pub mod agent;
pub mod control;
pub mod status;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// The wire types and gRPC services generated from proto/palisade.proto.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}

/// A gRPC channel to a TCP endpoint given as `http://host:port` or `host:port`. It connects
/// lazily (and reconnects after a failure); `timeout` bounds connecting and every call.
pub fn channel(address: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A status's message followed by the errors beneath it (a refused connection says why only
/// there).
pub fn message(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// A status for the logs: its code and [`message`].
pub fn describe(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), message(s))
}
