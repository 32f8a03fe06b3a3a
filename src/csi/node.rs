//! CSI Node: validates each request, calls the node domain service, maps its errors.

use std::path::Path;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use super::convert::{self, bytes_i64, required};
use crate::csi::v1 as pb;
use crate::csi::v1::node_server::Node;
use crate::model::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use crate::node::blockdev::BlockError;
use crate::node::engines::EngineLinkError;
use crate::node::mount::MountError;
use crate::node::paths::{self, PathError};
use crate::node::{NodeError, NodeService};

pub struct NodeRpc {
    pub node: Arc<NodeService>,
}

fn node_status(e: NodeError) -> Status {
    let code = match &e {
        NodeError::NoLocalReplica { .. } => Code::NotFound,
        NodeError::NotMounted { .. } => Code::NotFound,
        NodeError::NotStaged { .. } => Code::FailedPrecondition,
        NodeError::Incompatible { .. } => Code::AlreadyExists,
        NodeError::FsMismatch { .. } => Code::FailedPrecondition,
        NodeError::StillPublished { .. } => Code::FailedPrecondition,
        NodeError::SingleWriter { .. } => Code::FailedPrecondition,
        NodeError::Path(p) => match p {
            PathError::NotAbsolute { .. }
            | PathError::GoesUp { .. }
            | PathError::Symlink { .. } => Code::InvalidArgument,
            PathError::NotUsable { .. } => Code::FailedPrecondition,
            PathError::Io { .. } => Code::Internal,
        },
        NodeError::Covered { .. } | NodeError::Busy { .. } | NodeError::MadeNotEmpty { .. } => {
            Code::FailedPrecondition
        }
        // Something holds the device or the mount: it comes off once that lets go.
        NodeError::Block(BlockError::InUse { .. }) | NodeError::Mount(MountError::Busy { .. }) => {
            Code::FailedPrecondition
        }
        NodeError::Replica(_) | NodeError::Block(_) | NodeError::Mount(_) => Code::Internal,
        NodeError::Io { .. } | NodeError::Task(_) => Code::Internal,
        NodeError::Engine(e) => match e {
            EngineLinkError::NotPublished { .. } | EngineLinkError::NotCurrent { .. } => {
                Code::FailedPrecondition
            }
            EngineLinkError::VolumeNotFound { .. } => Code::NotFound,
            EngineLinkError::Controller { .. } | EngineLinkError::NoMembers { .. } => {
                Code::Unavailable
            }
            EngineLinkError::Start { .. } => Code::Internal,
            EngineLinkError::StillStaged { .. } => Code::FailedPrecondition,
        },
    };
    super::status::status(code, &e)
}

/// A path field: required, absolute, no NUL, no `..` (node/paths.rs; the links along it are
/// looked at where it is used).
fn path<'a>(value: &'a str, field: &'static str) -> Result<&'a Path, Status> {
    required(value, field)?;
    paths::check_form(field, value).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A volume_path the driver looks up: required; a path that is not absolute cannot be
/// where a volume is, so it is NOT_FOUND (as csi-sanity expects).
fn volume_path<'a>(value: &'a str, volume: &str) -> Result<&'a Path, Status> {
    required(value, "volume_path")?;
    if !value.starts_with('/') || value.contains('\0') {
        return Err(Status::not_found(format!(
            "volume_path: volume {volume:?} is not staged or published at {value:?}"
        )));
    }
    Ok(Path::new(value))
}

/// Node stage and publish serve single-node access modes only.
fn node_capability(
    volume: &str,
    cap: Option<&pb::VolumeCapability>,
    ctx: &std::collections::HashMap<String, String>,
) -> Result<crate::model::Capability, Status> {
    let cap = convert::required_capability(cap, "volume_capability")?;
    if !cap.access_mode.is_single_node() {
        return Err(Status::failed_precondition(format!(
            "volume_capability: access mode {:?} exceeds the capabilities of volume {volume:?}: Palisade volumes serve single-node access modes",
            cap.access_mode
        )));
    }
    Ok(convert::resolve_fs(cap, ctx))
}

/// mkfsParams as CreateVolume returned them in the volume context.
fn mkfs_params(ctx: &std::collections::HashMap<String, String>) -> Vec<String> {
    ctx.get("mkfsParams")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Node for NodeRpc {
    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = path(&req.staging_target_path, "staging_target_path")?;
        let cap = node_capability(id, req.volume_capability.as_ref(), &req.volume_context)?;
        convert::volume_id(id, "volume_id")?;
        self.node
            .stage(
                id,
                staging,
                &cap,
                mkfs_params(&req.volume_context),
                &req.publish_context,
            )
            .await
            .map_err(node_status)?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = path(&req.staging_target_path, "staging_target_path")?;
        self.node.unstage(id, staging).await.map_err(node_status)?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = path(&req.target_path, "target_path")?;
        let cap = node_capability(id, req.volume_capability.as_ref(), &req.volume_context)?;
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is not set: the plugin has STAGE_UNSTAGE_VOLUME, so NodeStageVolume must come first",
            ));
        }
        let staging = path(&req.staging_target_path, "staging_target_path")?;
        convert::volume_id(id, "volume_id")?;
        self.node
            .publish(id, staging, target, &cap, req.readonly)
            .await
            .map_err(node_status)?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = path(&req.target_path, "target_path")?;
        self.node.unpublish(id, target).await.map_err(node_status)?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let volume_path = volume_path(&req.volume_path, id)?;
        convert::volume_id(id, "volume_id")?;
        let s = self
            .node
            .stats(id, volume_path)
            .await
            .map_err(node_status)?;
        let mut usage = vec![pb::VolumeUsage {
            available: s.bytes_available.map(bytes_i64).unwrap_or(0),
            total: bytes_i64(s.bytes_total),
            used: s.bytes_used.map(bytes_i64).unwrap_or(0),
            unit: Unit::Bytes as i32,
        }];
        if let Some((total, free, used)) = s.inodes {
            usage.push(pb::VolumeUsage {
                available: bytes_i64(free),
                total: bytes_i64(total),
                used: bytes_i64(used),
                unit: Unit::Inodes as i32,
            });
        }
        let volume_condition = Some(match s.abnormal {
            Some(message) => pb::VolumeCondition {
                abnormal: true,
                message,
            },
            None => pb::VolumeCondition {
                abnormal: false,
                message: "healthy".to_string(),
            },
        });
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        }))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        if let Some(cap) = &req.volume_capability {
            let cap = convert::capability(cap, "volume_capability")?;
            if !cap.access_mode.is_single_node() {
                return Err(Status::invalid_argument(format!(
                    "volume_capability: access mode {:?} exceeds the volume's capabilities (single-node access modes only)",
                    cap.access_mode
                )));
            }
        }
        let volume_path = volume_path(&req.volume_path, id)?;
        convert::volume_id(id, "volume_id")?;
        let size = self
            .node
            .expand(id, volume_path)
            .await
            .map_err(node_status)?;
        if let Some(r) = &req.capacity_range {
            if r.required_bytes > 0 && bytes_i64(size) < r.required_bytes {
                return Err(Status::out_of_range(format!(
                    "capacity_range.required_bytes: the device has {size} bytes; expand the volume with ControllerExpandVolume first"
                )));
            }
        }
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: bytes_i64(size),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{rpc::Type as T, Rpc, Type};
        let capabilities = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let cfg = self.node.config();
        let mut segments =
            std::collections::HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), cfg.node_id.clone())]);
        if let Some(zone) = &cfg.zone {
            segments.insert(TOPOLOGY_ZONE_KEY.to_string(), zone.clone());
        }
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: cfg.node_id.clone(),
            max_volumes_per_node: cfg.max_volumes as i64,
            accessible_topology: Some(pb::Topology { segments }),
        }))
    }
}
