//! The engine's membership: a member that failed is removed from the volume's membership
//! in the store (through [`Membership`]) before any write it missed is acknowledged; a
//! member can be forgotten when the controller retires it.

use super::*;

impl Engine {
    /// Removes from the membership the members that failed `what`, provided at least one
    /// member remains (the remaining ones did `what`: members are only ever removed, so
    /// every current member was in the snapshot that `what` went to). Ok once every failed
    /// member is out of the membership, durably.
    pub(super) async fn remove_failed(
        &self,
        what: &'static str,
        failed: Vec<(Member, ReplicaIoError)>,
    ) -> Result<(), EngineError> {
        let _serial = self.inner.removal.lock().await;
        let current = self.snapshot();
        let doomed: Vec<&(Member, ReplicaIoError)> = failed
            .iter()
            .filter(|(m, _)| current.iter().any(|c| c.id() == m.id()))
            .collect();
        if doomed.len() >= current.len() {
            return Err(self.unavailable(what, &failed));
        }
        for (member, cause) in doomed {
            self.check_serving()?;
            let replica = member.id();
            let reason = format!("{what} failed: {cause}");
            warn!(volume = %self.inner.volume_id, replica, %reason,
                "removing a failed member from the volume");
            let removal = tokio::time::timeout(
                self.inner.config.membership_timeout,
                self.inner.membership.remove_member(replica, &reason),
            )
            .await;
            let why = match removal {
                Ok(Ok(())) => {
                    self.drop_member(replica);
                    continue;
                }
                Ok(Err(why)) => why,
                Err(_) => format!(
                    "no answer within {:?}",
                    self.inner.config.membership_timeout
                ),
            };
            error!(volume = %self.inner.volume_id, replica, %why,
                "could not remove a failed member: the I/O it missed is not acknowledged");
            return Err(EngineError::RemovalFailed {
                volume: self.inner.volume_id.clone(),
                replica: replica.to_string(),
                why,
            });
        }
        Ok(())
    }

    /// Drops `replica` from the engine's members without telling the membership (the store
    /// no longer counts it: it was retired). Never the last member. True if it was dropped.
    pub fn forget_member(&self, replica: &str) -> bool {
        let members = self.snapshot();
        if members.len() < 2 || !members.iter().any(|m| m.id() == replica) {
            return false;
        }
        let mut current = self
            .inner
            .members
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.len() < 2 {
            return false;
        }
        let kept: Vec<Member> = current
            .iter()
            .filter(|m| m.id() != replica)
            .cloned()
            .collect();
        let dropped = kept.len() < current.len();
        *current = Arc::new(kept);
        dropped
    }

    pub(super) fn drop_member(&self, replica: &str) {
        let mut members = self
            .inner
            .members
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let kept: Vec<Member> = members
            .iter()
            .filter(|m| m.id() != replica)
            .cloned()
            .collect();
        *members = Arc::new(kept);
        let left = members.len();
        drop(members);
        bump(&self.inner.counters.member_removals, 1);
        info!(volume = %self.inner.volume_id, replica, members_left = left,
            "member removed from the volume");
    }

    pub(super) fn unavailable(
        &self,
        what: &'static str,
        failed: &[(Member, ReplicaIoError)],
    ) -> EngineError {
        let errors = failed
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        EngineError::Unavailable {
            volume: self.inner.volume_id.clone(),
            what,
            errors,
        }
    }
}
