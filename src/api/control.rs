//! The ControlPlane gRPC service of `palisade controller`: node registration and heartbeats
//! for the node agents, views and levers for `palisade ctl`. Each call validates its request,
//! calls the domain controller, and maps its errors (see `status`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, instrument};

use crate::control::{self, Controller, SettingUpdateError};
use crate::csi::convert::required;
use crate::model::{self, Disk, Node, ReplicaState, VolumeState};
use crate::rpc::v1 as pb;
use crate::rpc::v1::control_plane_server::ControlPlane;

/// The longest node id accepted (a DNS name's bound; node ids are host names).
pub const MAX_NODE_ID_BYTES: usize = 253;

/// The ControlPlane service over the domain controller. Serve it behind
/// [`super::RequireCredential`].
pub struct ControlPlaneService {
    pub controller: Arc<Controller>,
}

/// A node's report as the domain takes it; every error names the field.
fn node_from_report(report: Option<pb::NodeReport>) -> Result<Node, Status> {
    let r = report.ok_or_else(|| Status::invalid_argument("node is required"))?;
    required(&r.node_id, "node.node_id")?;
    if r.node_id.len() > MAX_NODE_ID_BYTES
        || r.node_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Status::invalid_argument(format!(
            "node.node_id: {:?} is not a node id (at most {MAX_NODE_ID_BYTES} bytes, no spaces or control characters)",
            r.node_id
        )));
    }
    required(&r.agent_address, "node.agent_address")?;
    let mut seen = HashSet::new();
    let mut disks = Vec::with_capacity(r.disks.len());
    for (i, d) in r.disks.into_iter().enumerate() {
        required(&d.id, &format!("node.disks[{i}].id"))?;
        if !seen.insert(d.id.clone()) {
            return Err(Status::invalid_argument(format!(
                "node.disks[{i}].id: disk {:?} is reported twice",
                d.id
            )));
        }
        if !d.path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "node.disks[{i}].path: {:?} is not an absolute path",
                d.path
            )));
        }
        disks.push(Disk {
            id: d.id,
            path: d.path.into(),
            tags: d.tags,
            // Operator levers: the controller keeps what the store has.
            schedulable: true,
            storage_maximum: d.storage_maximum,
            storage_available: d.storage_available,
            storage_reserved: 0,
        });
    }
    Ok(Node {
        id: r.node_id,
        address: r.replica_address,
        agent_address: r.agent_address,
        zone: Some(r.zone).filter(|z| !z.is_empty()),
        tags: r.tags,
        schedulable: true,
        last_heartbeat_ms: 0,
        disks,
    })
}

/// The fields every engine's call about one of its replicas needs.
fn engine_call_fields(volume_id: &str, replica_id: &str, node_id: &str) -> Result<(), Status> {
    volume_and_node(volume_id, node_id)?;
    if replica_id.is_empty() {
        return Err(Status::invalid_argument("replica_id is required"));
    }
    Ok(())
}

/// The fields every call of an attached engine names, each required.
fn volume_and_node(volume_id: &str, node_id: &str) -> Result<(), Status> {
    for (value, field) in [(volume_id, "volume_id"), (node_id, "node_id")] {
        if value.is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
    }
    Ok(())
}

fn volume_state(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Creating => "creating",
        VolumeState::Ready => "ready",
        VolumeState::Deleting => "deleting",
    }
}

fn replica_state(r: &control::ReplicaStatus) -> &'static str {
    if r.planned {
        return "planned";
    }
    match r.replica.state {
        ReplicaState::Creating => "creating",
        ReplicaState::Ready => "ready",
        ReplicaState::Rebuilding => "rebuilding",
        ReplicaState::Failed => "failed",
    }
}

fn attachment(a: &model::Attachment) -> pb::AttachmentStatus {
    pb::AttachmentStatus {
        node_id: a.node_id.clone(),
        epoch: a.epoch,
        readonly: a.readonly,
        since_ms: a.since_ms,
    }
}

/// What the volume views say about each node: its replica server address and health.
type NodeFacts = HashMap<String, (String, bool)>;

fn rebuild_progress(r: control::RebuildReport) -> pb::RebuildProgress {
    pb::RebuildProgress {
        replica_id: r.replica_id,
        size: r.size,
        done: r.done,
        copied: r.copied,
        bytes_per_second: r.bytes_per_second,
        eta_seconds: r.eta_seconds,
        state: r.state,
        error: r.error,
    }
}

fn volume(
    v: &control::VolumeStatus,
    nodes: &NodeFacts,
    controller: &Controller,
) -> pb::VolumeStatus {
    let vol = &v.volume;
    pb::VolumeStatus {
        id: vol.id.clone(),
        name: vol.name.clone(),
        size: vol.size,
        state: volume_state(vol.state).to_string(),
        number_of_replicas: vol.params.number_of_replicas,
        replicas: v
            .replicas
            .iter()
            .map(|r| {
                let (node_address, node_up) =
                    nodes.get(&r.replica.node_id).cloned().unwrap_or_default();
                pb::ReplicaStatus {
                    id: r.replica.id.clone(),
                    node_id: r.replica.node_id.clone(),
                    disk_id: r.replica.disk_id.clone(),
                    path: r.replica.path.display().to_string(),
                    size: r.replica.size,
                    state: replica_state(r).to_string(),
                    node_address,
                    node_up,
                    rebuild: controller
                        .rebuild_progress(&r.replica.id)
                        .map(rebuild_progress),
                }
            })
            .collect(),
        attachment: vol.attachment.as_ref().map(attachment),
        epoch: vol.epoch,
        degraded_reason: vol.degraded_reason.clone().unwrap_or_default(),
        recovery_policy: vol
            .params
            .recovery_policy
            .map_or_else(|| "setting".to_string(), |p| p.to_string()),
        data_locality: vol.params.data_locality.to_string(),
        created_ms: vol.created_ms,
    }
}

impl ControlPlaneService {
    fn ack(&self) -> pb::NodeAck {
        pb::NodeAck {
            heartbeat_timeout_ms: self.controller.config().heartbeat_timeout_ms,
        }
    }

    async fn node_facts(&self) -> Result<NodeFacts, Status> {
        Ok(self
            .controller
            .node_statuses()
            .await?
            .into_iter()
            .map(|n| (n.node.id.clone(), (n.node.address.clone(), n.up)))
            .collect())
    }

    /// The volume whose id, or else whose CSI name, is `key`.
    async fn find_volume(&self, key: &str) -> Result<control::VolumeStatus, Status> {
        required(key, "volume")?;
        if let Some(v) = self.controller.volume_status(key).await? {
            return Ok(v);
        }
        let by_name = model::volume_id_for_name(key);
        if by_name != key {
            if let Some(v) = self.controller.volume_status(&by_name).await? {
                return Ok(v);
            }
        }
        Err(Status::not_found(format!(
            "volume {key:?} does not exist (looked up as a volume id and as a volume name)"
        )))
    }
}

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    #[instrument(skip_all, fields(node = request.get_ref().node.as_ref().map(|n| n.node_id.as_str())))]
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::NodeAck>, Status> {
        let req = request.into_inner();
        let node = node_from_report(req.node)?;
        self.controller
            .register_node(node, &req.replica_ids)
            .await?;
        Ok(Response::new(self.ack()))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::NodeAck>, Status> {
        let node = node_from_report(request.into_inner().node)?;
        debug!(node = %node.id, "heartbeat");
        self.controller.node_heartbeat(node).await?;
        Ok(Response::new(self.ack()))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .controller
            .node_statuses()
            .await?
            .into_iter()
            .map(|n| pb::NodeStatus {
                id: n.node.id.clone(),
                zone: n.node.zone.clone().unwrap_or_default(),
                tags: n.node.tags.clone(),
                replica_address: n.node.address.clone(),
                agent_address: n.node.agent_address.clone(),
                up: n.up,
                heartbeat_age_ms: n.heartbeat_age_ms,
                schedulable: n.node.schedulable,
                disks: n
                    .node
                    .disks
                    .iter()
                    .zip(&n.scheduled)
                    .map(|(d, scheduled)| pb::DiskStatus {
                        id: d.id.clone(),
                        path: d.path.display().to_string(),
                        tags: d.tags.clone(),
                        schedulable: d.schedulable,
                        storage_maximum: d.storage_maximum,
                        storage_available: d.storage_available,
                        storage_reserved: d.storage_reserved,
                        storage_scheduled: *scheduled,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            heartbeat_timeout_ms: self.controller.config().heartbeat_timeout_ms,
        }))
    }

    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let nodes = self.node_facts().await?;
        let volumes = self
            .controller
            .volume_statuses()
            .await?
            .iter()
            .map(|v| volume(v, &nodes, &self.controller))
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::VolumeStatus>, Status> {
        let found = self.find_volume(&request.into_inner().volume).await?;
        let nodes = self.node_facts().await?;
        Ok(Response::new(volume(&found, &nodes, &self.controller)))
    }

    async fn get_settings(
        &self,
        request: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::GetSettingsResponse>, Status> {
        let name = request.into_inner().name;
        let settings = self.controller.settings().await?;
        let settings = if name.is_empty() {
            settings
                .list()
                .into_iter()
                .map(|(name, value)| pb::Setting {
                    name: name.to_string(),
                    value,
                })
                .collect()
        } else {
            let value = settings
                .get(&name)
                .map_err(|e| Status::from(SettingUpdateError::from(e)))?;
            vec![pb::Setting { name, value }]
        };
        Ok(Response::new(pb::GetSettingsResponse { settings }))
    }

    #[instrument(skip_all, fields(setting = %request.get_ref().name))]
    async fn set_setting(
        &self,
        request: Request<pb::SetSettingRequest>,
    ) -> Result<Response<pb::Setting>, Status> {
        let req = request.into_inner();
        required(&req.name, "name")?;
        let settings = self.controller.set_setting(&req.name, &req.value).await?;
        let value = settings
            .get(&req.name)
            .map_err(|e| Status::from(SettingUpdateError::from(e)))?;
        Ok(Response::new(pb::Setting {
            name: req.name,
            value,
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let r = request.into_inner();
        engine_call_fields(&r.volume_id, &r.replica_id, &r.node_id)?;
        self.controller
            .remove_member(&r.volume_id, &r.replica_id, &r.node_id, r.epoch, &r.reason)
            .await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn update_volume(
        &self,
        request: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::VolumeStatus>, Status> {
        let r = request.into_inner();
        let found = self.find_volume(&r.volume).await?;
        let id = found.volume.id.clone();
        let locality = match r.data_locality.as_str() {
            "" => None,
            other => Some(
                other
                    .parse::<crate::params::DataLocality>()
                    .map_err(|e| Status::invalid_argument(format!("data_locality: {e}")))?,
            ),
        };
        let replicas = (r.number_of_replicas > 0).then_some(r.number_of_replicas);
        self.controller
            .update_volume(&id, replicas, locality)
            .await
            .map_err(|e| match e {
                control::UpdateError::NotFound(_) => Status::not_found(e.to_string()),
                control::UpdateError::Invalid(_) => Status::invalid_argument(e.to_string()),
                control::UpdateError::Store(s) => Status::from(s),
            })?;
        let found = self.find_volume(&id).await?;
        let nodes = self.node_facts().await?;
        Ok(Response::new(volume(&found, &nodes, &self.controller)))
    }

    async fn promote_member(
        &self,
        request: Request<pb::PromoteMemberRequest>,
    ) -> Result<Response<pb::PromoteMemberResponse>, Status> {
        let r = request.into_inner();
        engine_call_fields(&r.volume_id, &r.replica_id, &r.node_id)?;
        self.controller
            .promote_member(&r.volume_id, &r.replica_id, &r.node_id, r.epoch)
            .await?;
        Ok(Response::new(pb::PromoteMemberResponse {}))
    }

    async fn report_rebuilds(
        &self,
        request: Request<pb::ReportRebuildsRequest>,
    ) -> Result<Response<pb::ReportRebuildsResponse>, Status> {
        let r = request.into_inner();
        volume_and_node(&r.volume_id, &r.node_id)?;
        let mut reports = Vec::with_capacity(r.rebuilds.len());
        for (i, p) in r.rebuilds.into_iter().enumerate() {
            if p.replica_id.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "rebuilds[{i}].replica_id is required"
                )));
            }
            if !matches!(p.state.as_str(), "running" | "done" | "failed") {
                return Err(Status::invalid_argument(format!(
                    "rebuilds[{i}].state must be running, done or failed, not {:?}",
                    p.state
                )));
            }
            reports.push(control::RebuildReport {
                replica_id: p.replica_id,
                size: p.size,
                done: p.done,
                copied: p.copied,
                bytes_per_second: if p.bytes_per_second.is_finite() {
                    p.bytes_per_second
                } else {
                    0.0
                },
                eta_seconds: p.eta_seconds,
                state: p.state,
                error: p.error,
            });
        }
        self.controller
            .report_rebuilds(&r.volume_id, &r.node_id, r.epoch, reports)
            .await?;
        Ok(Response::new(pb::ReportRebuildsResponse {}))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let r = request.into_inner();
        volume_and_node(&r.volume_id, &r.node_id)?;
        if r.start && r.release {
            return Err(Status::invalid_argument(
                "start and release: an engine either starts or stops, not both",
            ));
        }
        if r.clean && !r.release {
            return Err(Status::invalid_argument(
                "clean: only a release (an engine that stopped) can be clean",
            ));
        }
        if r.release {
            if r.clean {
                // Not heard: the next engine resynchronises the members, which costs a
                // rebuild and loses nothing; the lease is given back all the same.
                if let Err(e) = self
                    .controller
                    .engine_stopped_cleanly(&r.volume_id, &r.node_id, r.epoch)
                    .await
                {
                    tracing::warn!(volume = %r.volume_id, error = %e, "could not record a clean engine stop");
                }
            }
            self.controller
                .release_lease(&r.volume_id, &r.node_id, r.epoch)
                .await?;
            return Ok(Response::new(pb::RenewLeaseResponse { lease_ms: 0 }));
        }
        let lease_ms = if r.start {
            self.controller
                .start_engine(&r.volume_id, &r.node_id, r.epoch)
                .await?
        } else {
            self.controller
                .renew_lease(&r.volume_id, &r.node_id, r.epoch)
                .await?
        };
        Ok(Response::new(pb::RenewLeaseResponse { lease_ms }))
    }

    #[instrument(skip_all, fields(volume = %request.get_ref().volume))]
    async fn force_detach(
        &self,
        request: Request<pb::ForceDetachRequest>,
    ) -> Result<Response<pb::ForceDetachResponse>, Status> {
        let found = self.find_volume(&request.into_inner().volume).await?;
        let id = found.volume.id.clone();
        let released = self.controller.force_detach(&id).await?;
        Ok(Response::new(pb::ForceDetachResponse {
            volume_id: id,
            released: released.as_ref().map(attachment),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControllerConfig;
    use crate::replica::agent::LocalAgent;
    use crate::store::embedded::EmbeddedStore;
    use tonic::Code;

    fn service(dir: &std::path::Path, heartbeat_timeout_ms: u64) -> ControlPlaneService {
        let store = Arc::new(EmbeddedStore::open(&dir.join("db.redb")).unwrap());
        let agent = Arc::new(LocalAgent::new("n1".into(), HashMap::new()));
        ControlPlaneService {
            controller: Arc::new(Controller::new(
                store,
                agent,
                ControllerConfig {
                    heartbeat_timeout_ms,
                    termination_grace_ms: 0,
                },
            )),
        }
    }

    fn report_from(agent_address: &str) -> pb::NodeReport {
        pb::NodeReport {
            agent_address: agent_address.into(),
            ..report()
        }
    }

    async fn register(s: &ControlPlaneService, agent: &str) -> Result<pb::NodeAck, Status> {
        s.register_node(Request::new(pb::RegisterNodeRequest {
            node: Some(report_from(agent)),
            replica_ids: vec![],
        }))
        .await
        .map(Response::into_inner)
    }

    async fn heartbeat(s: &ControlPlaneService, agent: &str) -> Result<pb::NodeAck, Status> {
        s.heartbeat(Request::new(pb::HeartbeatRequest {
            node: Some(report_from(agent)),
        }))
        .await
        .map(Response::into_inner)
    }

    #[tokio::test]
    async fn nodes_register_once_per_id_and_heartbeat_from_their_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path(), 200);
        // A heartbeat before any registration: register first.
        assert_eq!(
            heartbeat(&s, "a:1").await.unwrap_err().code(),
            Code::NotFound
        );
        let ack = register(&s, "a:1").await.unwrap();
        assert_eq!(ack.heartbeat_timeout_ms, 200);
        heartbeat(&s, "a:1").await.unwrap();
        // A second process with the same id, while the first is up.
        let e = register(&s, "b:2").await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(
            e.message().contains("a:1") && e.message().contains("b:2"),
            "{e:?}"
        );
        assert_eq!(
            heartbeat(&s, "b:2").await.unwrap_err().code(),
            Code::NotFound
        );
        // Registering again from the same address (a restart) is fine.
        register(&s, "a:1").await.unwrap();

        let nodes = s
            .list_nodes(Request::new(pb::ListNodesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(nodes.nodes.len(), 1);
        let n = &nodes.nodes[0];
        assert!(n.up && n.agent_address == "a:1" && n.replica_address == "127.0.0.1:1");
        assert_eq!(n.disks[0].storage_available, 50);
        assert_eq!(n.disks[0].storage_scheduled, 0);

        // Once the first registration's heartbeat has expired, the id may move.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let nodes = s
            .list_nodes(Request::new(pb::ListNodesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(!nodes.nodes[0].up && nodes.nodes[0].heartbeat_age_ms >= 300);
        register(&s, "b:2").await.unwrap();
        assert_eq!(
            heartbeat(&s, "a:1").await.unwrap_err().code(),
            Code::NotFound
        );
        heartbeat(&s, "b:2").await.unwrap();
    }

    #[tokio::test]
    async fn settings_round_trip_and_bad_values_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path(), 10_000);
        let set = |name: &str, value: &str| {
            s.set_setting(Request::new(pb::SetSettingRequest {
                name: name.into(),
                value: value.into(),
            }))
        };
        let changed = set("volume-attachment-recovery-policy", "never")
            .await
            .unwrap()
            .into_inner();
        assert_eq!(changed.value, "never");
        let e = set("volume-attachment-recovery-policy", "sometimes")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("volume-attachment-recovery-policy"),
            "{e:?}"
        );
        let e = set("", "x").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let get =
            |name: &str| s.get_settings(Request::new(pb::GetSettingsRequest { name: name.into() }));
        let one = get("volume-attachment-recovery-policy")
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.settings.len(), 1);
        assert_eq!(one.settings[0].value, "never");
        let all = get("").await.unwrap().into_inner();
        assert_eq!(all.settings.len(), crate::settings::NAMES.len());
        let e = get("no-such-setting").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("no-such-setting"), "{e:?}");
    }

    #[tokio::test]
    async fn unknown_volumes_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = service(dir.path(), 10_000);
        let e = s
            .force_detach(Request::new(pb::ForceDetachRequest {
                volume: "Some Volume".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("Some Volume"), "{e:?}");
        let e = s
            .get_volume(Request::new(pb::GetVolumeRequest {
                volume: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let listed = s
            .list_volumes(Request::new(pb::ListVolumesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.volumes.is_empty());
    }

    fn report() -> pb::NodeReport {
        pb::NodeReport {
            node_id: "n1".into(),
            zone: String::new(),
            tags: vec!["ssd".into()],
            replica_address: "127.0.0.1:1".into(),
            agent_address: "127.0.0.1:2".into(),
            disks: vec![pb::DiskReport {
                id: "d1".into(),
                path: "/var/lib/palisade/disk0".into(),
                tags: vec![],
                storage_maximum: 100,
                storage_available: 50,
            }],
        }
    }

    #[test]
    fn reports_are_validated_field_by_field() {
        let node = node_from_report(Some(report())).unwrap();
        assert_eq!(node.zone, None);
        assert_eq!(node.agent_address, "127.0.0.1:2");
        assert_eq!(node.disks[0].storage_available, 50);

        let refused = |edit: fn(&mut pb::NodeReport), field: &str| {
            let mut r = report();
            edit(&mut r);
            let e = node_from_report(Some(r)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{e:?} should name {field}");
        };
        refused(|r| r.node_id.clear(), "node.node_id");
        refused(|r| r.node_id = "a b".into(), "node.node_id");
        refused(|r| r.agent_address.clear(), "node.agent_address");
        refused(|r| r.disks[0].id.clear(), "node.disks[0].id");
        refused(|r| r.disks[0].path = "disk".into(), "node.disks[0].path");
        refused(|r| r.disks.push(r.disks[0].clone()), "node.disks[1].id");
        assert!(node_from_report(None).is_err());
    }
}
