//! Fencing: persisting a new attachment epoch on a replica through its node's replica
//! server, so that every session of an older epoch is refused from then on. The controller
//! fences the members of a volume before it moves the attachment away from a down node.

use std::time::Duration;

use async_trait::async_trait;

use crate::replica::client::ReplicaClient;

/// Fences one replica.
#[async_trait]
pub trait Fencer: Send + Sync + 'static {
    /// Opens a session on the replica at `address` with `epoch` and `token`; the replica
    /// persists the epoch before it answers. An error means the replica was not fenced.
    async fn fence(
        &self,
        address: &str,
        volume_id: &str,
        replica_id: &str,
        epoch: u64,
        token: &str,
    ) -> Result<(), String>;
}

/// Fences through the replica protocol, with a time limit per replica.
pub struct ReplicaFencer {
    pub timeout: Duration,
}

#[async_trait]
impl Fencer for ReplicaFencer {
    async fn fence(
        &self,
        address: &str,
        volume_id: &str,
        replica_id: &str,
        epoch: u64,
        token: &str,
    ) -> Result<(), String> {
        let connect = ReplicaClient::connect(address, volume_id, replica_id, epoch, token, false);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_client)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer from {address} within {:?}",
                self.timeout
            )),
        }
    }
}
