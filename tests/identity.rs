//! CSI Identity is the plugin's, not the process's: the spec requires every instance of a
//! plugin to answer GetPluginInfo and GetPluginCapabilities the same. This checks it on
//! every socket Palisade serves: `palisade standalone`, and a cluster's controller and two
//! nodes (whose sockets serve no Controller service, yet advertise CONTROLLER_SERVICE as
//! the controller's does, so that a CO sees one plugin).

mod common;

use std::path::Path;

use common::cluster::Cluster;
use common::Driver;
use palisade::csi::v1 as pb;
use pb::identity_client::IdentityClient;
use pb::plugin_capability::{service, volume_expansion, Type};

/// What one socket says about the plugin: its info, and its capabilities in a canonical
/// order (the spec gives the list no order).
#[derive(Debug, PartialEq)]
struct Answer {
    info: pb::GetPluginInfoResponse,
    capabilities: Vec<String>,
}

async fn identity_of(socket: &Path) -> Answer {
    let channel = palisade::csi::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect to {socket:?}: {e}"));
    let mut identity = IdentityClient::new(channel);
    let info = identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap_or_else(|e| panic!("GetPluginInfo on {socket:?}: {e}"))
        .into_inner();
    let mut capabilities: Vec<String> = identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap_or_else(|e| panic!("GetPluginCapabilities on {socket:?}: {e}"))
        .into_inner()
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(Type::Service(s)) => format!(
                "service {:?}",
                service::Type::try_from(s.r#type).expect("a known service type")
            ),
            Some(Type::VolumeExpansion(e)) => format!(
                "volume expansion {:?}",
                volume_expansion::Type::try_from(e.r#type).expect("a known expansion type")
            ),
            None => panic!("a plugin capability without a type on {socket:?}: {c:?}"),
        })
        .collect();
    capabilities.sort();
    Answer { info, capabilities }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_socket_of_standalone_and_of_a_cluster_answers_identity_the_same() {
    let standalone = Driver::start(&["disk0"]).await;
    let cluster = Cluster::start(2).await;
    let mut sockets = vec![
        ("standalone", standalone.socket.clone()),
        ("cluster controller", cluster.controller_socket.clone()),
    ];
    for n in &cluster.nodes {
        sockets.push((n.id.as_str(), n.socket.clone()));
    }

    let expected = identity_of(&standalone.socket).await;
    assert_eq!(expected.info.name, "driver.palisade.io");
    assert_eq!(expected.info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        expected.capabilities,
        [
            "service ControllerService",
            "service VolumeAccessibilityConstraints",
            "volume expansion Online",
        ],
    );
    for (name, socket) in &sockets {
        assert_eq!(
            identity_of(socket).await,
            expected,
            "{name} ({socket:?}) answers Identity unlike standalone"
        );
    }
}
