//! The engine's membership through the controller: leases (start, renew, release, a clean
//! stop) and the removal of a failed member, over the ControlPlane API with the attachment's
//! epoch.

use super::*;

/// The engine's membership and lease, kept by the controller.
pub(super) struct ControlMembership {
    pub(super) control: ControlClient,
    pub(super) volume_id: String,
    pub(super) node_id: String,
    pub(super) epoch: u64,
    pub(super) timeout: Duration,
}

impl ControlMembership {
    /// Awaits a controller call within the time limit; its answer, or its error message.
    pub(super) async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err(format!(
                "the controller did not answer within {:?}",
                self.timeout
            )),
        }
    }
}

#[async_trait]
impl Membership for ControlMembership {
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String> {
        let mut control = self.control.clone();
        let call = control.remove_member(pb::RemoveMemberRequest {
            volume_id: self.volume_id.clone(),
            replica_id: replica_id.to_string(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            reason: reason.to_string(),
        });
        self.call(call).await.map(|_| ())
    }

    async fn renew_lease(&self) -> Result<Duration, String> {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            ..Default::default()
        });
        let granted = self.call(call).await?;
        Ok(Duration::from_millis(granted.lease_ms))
    }

    async fn promote_member(&self, replica_id: &str) -> Result<(), String> {
        let mut control = self.control.clone();
        let call = control.promote_member(pb::PromoteMemberRequest {
            volume_id: self.volume_id.clone(),
            replica_id: replica_id.to_string(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
        });
        self.call(call).await.map(|_| ())
    }
}

impl ControlMembership {
    /// The first lease of a starting engine, before it opens its members: the controller
    /// first makes the members identical again if the previous engine did not stop cleanly
    /// (one kept, the others to be rebuilt).
    /// A refusal is told apart from a controller that did not answer: an epoch that is not
    /// the volume's current attachment, or a volume that does not exist, stays so however
    /// often the stage is retried.
    pub(super) async fn start_lease(&self) -> Result<Duration, EngineLinkError> {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            start: true,
            ..Default::default()
        });
        let status = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(granted)) => return Ok(Duration::from_millis(granted.into_inner().lease_ms)),
            Ok(Err(status)) => status,
            Err(_) => {
                return Err(EngineLinkError::Controller {
                    volume: self.volume_id.clone(),
                    why: format!("the controller did not answer within {:?}", self.timeout),
                })
            }
        };
        let (volume, why) = (self.volume_id.clone(), status.message().to_string());
        Err(match status.code() {
            tonic::Code::FailedPrecondition => EngineLinkError::NotCurrent {
                volume,
                epoch: self.epoch,
                why,
            },
            tonic::Code::NotFound => EngineLinkError::VolumeNotFound { volume, why },
            _ => EngineLinkError::Controller { volume, why },
        })
    }

    /// Gives the lease back once the engine has stopped (best effort: when the controller
    /// does not hear it, the next attachment waits for the lease to lapse instead), saying
    /// whether it stopped `clean` (see [`Engine::is_clean`]). A clean stop the controller
    /// does not hear only costs the next engine a rebuild of the members.
    pub(super) async fn release_lease(&self, clean: bool) {
        let mut control = self.control.clone();
        let call = control.renew_lease(pb::RenewLeaseRequest {
            volume_id: self.volume_id.clone(),
            node_id: self.node_id.clone(),
            epoch: self.epoch,
            release: true,
            clean,
            ..Default::default()
        });
        if let Err(why) = self.call(call).await {
            warn!(volume = %self.volume_id, %why, "could not give the attachment lease back; the next attachment waits for it to lapse");
        }
    }
}
