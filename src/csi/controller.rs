//! CSI Controller: validates each request, calls the domain controller, maps its errors.
//! Snapshots and volume modification are not offered and answer UNIMPLEMENTED.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, bytes_i64, required, volume_id};
use crate::control::{Controller, CreateRequest};
use crate::csi::v1 as pb;
use crate::csi::v1::controller_server::Controller as CsiController;
use crate::model::{AccessType, Volume, TOPOLOGY_NODE_KEY};

/// Longest volume name accepted (the CSI spec asks plugins to take at least 128 bytes).
pub const MAX_NAME_BYTES: usize = 1024;

pub struct ControllerService {
    pub controller: Arc<Controller>,
}

fn topology_of(v: &Volume) -> Vec<pb::Topology> {
    v.accessible_topology
        .iter()
        .map(|t| pb::Topology {
            segments: t.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
        .collect()
}

fn volume_context(v: &Volume) -> HashMap<String, String> {
    let mut ctx = v.params.to_context();
    if let Some(fs) = crate::control::volume_fs_type(v) {
        ctx.insert(crate::params::FS_TYPE.to_string(), fs.to_string());
    }
    ctx.extend(v.extra_params.iter().map(|(k, v)| (k.clone(), v.clone())));
    ctx
}

fn to_pb_volume(v: &Volume) -> pb::Volume {
    pb::Volume {
        capacity_bytes: bytes_i64(v.size),
        volume_id: v.id.clone(),
        volume_context: volume_context(v),
        content_source: None,
        accessible_topology: topology_of(v),
    }
}

fn condition(v: &Volume) -> pb::VolumeCondition {
    match &v.degraded_reason {
        Some(why) => pb::VolumeCondition {
            abnormal: true,
            message: format!("degraded: {why}"),
        },
        None => pb::VolumeCondition {
            abnormal: false,
            message: "healthy".to_string(),
        },
    }
}

fn published_nodes(v: &Volume) -> Vec<String> {
    v.attachment.iter().map(|a| a.node_id.clone()).collect()
}

/// The first node named by a topology list, by our node key.
fn first_node(topologies: &[pb::Topology]) -> Option<String> {
    topologies
        .iter()
        .find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
}

#[tonic::async_trait]
impl CsiController for ControllerService {
    #[instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required(&req.name, "name")?;
        if name.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "name: {} bytes is longer than the {MAX_NAME_BYTES} bytes accepted",
                name.len()
            )));
        }
        let capabilities = convert::capabilities(&req.volume_capabilities, "volume_capabilities")?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: creating a volume from a snapshot or another volume is not supported yet",
            ));
        }
        let capacity = convert::capacity_range(req.capacity_range.as_ref())?;
        if !req.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument(
                "mutable_parameters: not supported (the plugin does not advertise MODIFY_VOLUME)",
            ));
        }
        let preferred_node = req
            .accessibility_requirements
            .as_ref()
            .and_then(|t| first_node(&t.preferred).or_else(|| first_node(&t.requisite)));
        let requisite: Vec<HashMap<String, String>> = req
            .accessibility_requirements
            .as_ref()
            .map(|t| t.requisite.iter().map(|s| s.segments.clone()).collect())
            .unwrap_or_default();
        let volume = self
            .controller
            .create_volume(CreateRequest {
                name: name.to_string(),
                capacity,
                capabilities,
                parameters: req.parameters,
                preferred_node,
                requisite,
            })
            .await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(to_pb_volume(&volume)),
        }))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        if volume_id(id, "volume_id").is_err() {
            // Not an id Palisade could have made: nothing to delete.
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        }
        self.controller.delete_volume(id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id, node = %request.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let node = required(&req.node_id, "node_id")?;
        let cap =
            convert::required_capability(req.volume_capability.as_ref(), "volume_capability")?;
        let id = volume_id(&req.volume_id, "volume_id")?;
        let publish_context = self
            .controller
            .publish(id, node, &cap, req.readonly)
            .await?;
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id, node = %request.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        if let Ok(id) = volume_id(&req.volume_id, "volume_id") {
            self.controller.unpublish(id, &req.node_id).await?;
        }
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let id = volume_id(&req.volume_id, "volume_id")?;
        let Some(volume) = self.controller.get_volume(id).await? else {
            return Err(Status::not_found(format!(
                "volume_id: no volume has id {id:?}"
            )));
        };
        let unconfirmed = |message: String| {
            Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            }))
        };
        let caps = match convert::capabilities(&req.volume_capabilities, "volume_capabilities") {
            Ok(c) => c,
            Err(status) => return unconfirmed(status.message().to_string()),
        };
        if let Err(why) = crate::control::check_capabilities(&caps, "volume_capabilities") {
            return unconfirmed(why);
        }
        let volume_fs = crate::control::volume_fs_type(&volume);
        for (i, c) in caps.iter().enumerate() {
            let fits = match &c.access_type {
                AccessType::Block => volume
                    .capabilities
                    .iter()
                    .any(|v| v.access_type == AccessType::Block),
                AccessType::Mount { fs_type, .. } => {
                    volume_fs.is_some()
                        && (fs_type.is_empty() || Some(fs_type.as_str()) == volume_fs)
                }
            };
            if !fits {
                return unconfirmed(format!(
                    "volume_capabilities[{i}]: the volume was created for {:?}",
                    volume
                        .capabilities
                        .iter()
                        .map(|v| &v.access_type)
                        .collect::<Vec<_>>()
                ));
            }
        }
        let ctx = volume_context(&volume);
        if !req.volume_context.is_empty() && req.volume_context != ctx {
            return unconfirmed("volume_context does not match the volume's".to_string());
        }
        if !req.parameters.is_empty() {
            let settings = self.controller.settings().await?;
            match crate::params::parse(&req.parameters, &settings) {
                Ok(p) if p.params == volume.params => {}
                Ok(_) => return unconfirmed("parameters differ from the volume's".to_string()),
                Err(e) => return unconfirmed(e.to_string()),
            }
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: caps.iter().map(convert::to_pb_capability).collect(),
                parameters: req.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        }))
    }

    #[instrument(skip_all)]
    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let max = usize::try_from(req.max_entries).map_err(|_| {
            Status::invalid_argument(format!(
                "max_entries must not be negative, got {}",
                req.max_entries
            ))
        })?;
        let page = self
            .controller
            .list_volumes(max, &req.starting_token)
            .await?;
        let entries = page
            .volumes
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(to_pb_volume(v)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let mut servable = true;
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            let cap = convert::capability(c, &format!("volume_capabilities[{i}]"))?;
            servable &= cap.access_mode.is_single_node();
        }
        if !servable {
            // No volume Palisade makes satisfies a multi-node capability.
            return Ok(Response::new(pb::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: Some(bytes_i64(crate::control::SIZE_ALIGNMENT)),
            }));
        }
        let segment = req.accessible_topology.as_ref().map(|t| &t.segments);
        let report = self.controller.capacity(&req.parameters, segment).await?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: bytes_i64(report.available),
            maximum_volume_size: Some(bytes_i64(report.maximum_volume_size)),
            minimum_volume_size: Some(bytes_i64(crate::control::SIZE_ALIGNMENT)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{rpc::Type as T, Rpc, Type};
        let capabilities = [
            T::CreateDeleteVolume,
            T::PublishUnpublishVolume,
            T::ListVolumes,
            T::GetCapacity,
            T::ExpandVolume,
            T::ListVolumesPublishedNodes,
            T::PublishReadonly,
            T::GetVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    async fn get_snapshot(
        &self,
        _request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported yet"))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        let range = convert::capacity_range(Some(range))?;
        if let Some(cap) = &req.volume_capability {
            let cap = convert::capability(cap, "volume_capability")?;
            crate::control::check_capabilities(std::slice::from_ref(&cap), "volume_capability")
                .map_err(Status::invalid_argument)?;
        }
        let id = volume_id(&req.volume_id, "volume_id")?;
        let size = self.controller.expand(id, range).await?;
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: bytes_i64(size),
            node_expansion_required: true,
        }))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        required(&req.volume_id, "volume_id")?;
        let id = volume_id(&req.volume_id, "volume_id")?;
        let volume = match self.controller.get_volume(id).await? {
            Some(v) if v.state == crate::model::VolumeState::Ready => v,
            _ => {
                return Err(Status::not_found(format!(
                    "volume_id: no volume has id {id:?}"
                )))
            }
        };
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(to_pb_volume(&volume)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&volume),
                volume_condition: Some(condition(&volume)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volume modification is not supported yet",
        ))
    }
}
