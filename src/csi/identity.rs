//! CSI Identity: who the plugin is, what it offers, and whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::v1 as pb;
use crate::csi::v1::identity_server::Identity;

/// Answers whether the store and disks are usable now.
#[tonic::async_trait]
pub trait Readiness: Send + Sync + 'static {
    async fn ready(&self) -> Result<(), String>;
}

pub struct IdentityService {
    pub driver_name: String,
    pub readiness: Arc<dyn Readiness>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{
            service::Type as S, volume_expansion::Type as E, Service, Type, VolumeExpansion,
        };
        let service = |t: S| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        // The plugin's capabilities, not this process's: the spec requires every instance
        // of a plugin (the controller's socket and every node's) to answer the same, and a
        // CO calls Controller RPCs only on the controller's socket whatever a node says.
        let capabilities = vec![
            service(S::ControllerService),
            service(S::VolumeAccessibilityConstraints),
            pb::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: E::Online as i32,
                })),
            },
        ];
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        match self.readiness.ready().await {
            Ok(()) => Ok(Response::new(pb::ProbeResponse { ready: Some(true) })),
            Err(why) => {
                tracing::warn!(reason = %why, "probe: not ready");
                Ok(Response::new(pb::ProbeResponse { ready: Some(false) }))
            }
        }
    }
}
