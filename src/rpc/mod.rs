//! Palisade's own wire between its processes: the types and gRPC stubs generated from
//! proto/palisade.proto, authenticated clients of the ControlPlane and NodeAgent services, and
//! the channels they run on. Every call carries the cluster's API credential (`auth`). Both
//! sides use it: the node calls the controller (heartbeats, leases), the controller calls the
//! nodes (replicas), `palisade ctl` calls the controller; the services themselves are in `api`.

pub mod auth;

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use auth::{Auth, RequireCredential};

/// The wire types and gRPC services generated from proto/palisade.proto.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}

/// A ControlPlane client whose calls carry the API credential.
pub type ControlClient =
    v1::control_plane_client::ControlPlaneClient<InterceptedService<Channel, Auth>>;

/// A NodeAgent client whose calls carry the API credential.
pub type AgentClient = v1::node_agent_client::NodeAgentClient<InterceptedService<Channel, Auth>>;

/// A ControlPlane client over `channel` whose calls carry `auth`'s credential.
pub fn control_client(channel: Channel, auth: Auth) -> ControlClient {
    v1::control_plane_client::ControlPlaneClient::with_interceptor(channel, auth)
}

/// A NodeAgent client over `channel` whose calls carry `auth`'s credential.
pub fn agent_client(channel: Channel, auth: Auth) -> AgentClient {
    v1::node_agent_client::NodeAgentClient::with_interceptor(channel, auth)
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
