//! The cluster secret as a Kubernetes Secret: `palisade controller --secret-from-kubernetes
//! NAME` reads it, or creates it when absent (32 random bytes under the key
//! [`SECRET_KEY`], immutable); `palisade node` and `palisade ctl` read it, the node waiting
//! until it exists. Two controllers starting at once cannot make two: both try to create it,
//! the API server accepts one, and the other, refused with 409 Conflict, reads the winner's.
//! The key is the file name of the default `--secret-file`, so the same Secret mounted as a
//! volume gives a file `--secret-file` reads.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use super::status_code;
use crate::replica::token::{self, MAX_SECRET_FILE_LEN, MIN_SECRET_LEN};

/// The key of the Secret's data that holds the cluster secret.
pub const SECRET_KEY: &str = "cluster.secret";

/// Why the cluster secret could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{action} the Secret {namespace}/{name} failed: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{action} the Secret {namespace}/{name} was refused: the service account needs `get` on it (and the controller's `create`; deploy/cluster's RBAC grants them): {source}")]
    Forbidden {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the Secret {namespace}/{name} has no key {SECRET_KEY:?}; it is not a Palisade cluster secret (left untouched)")]
    MissingKey { namespace: String, name: String },
    #[error("the Secret {namespace}/{name} holds {len} bytes under {SECRET_KEY:?}, not a cluster secret (at least {MIN_SECRET_LEN}, at most {MAX_SECRET_FILE_LEN})")]
    BadLength {
        namespace: String,
        name: String,
        len: usize,
    },
    #[error(transparent)]
    Random(#[from] token::SecretError),
}

/// One Secret that holds (or will hold) the cluster secret.
#[derive(Clone)]
pub struct ClusterSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl ClusterSecret {
    /// The Secret `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> ClusterSecret {
        ClusterSecret {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The secret, or None when the Secret does not exist.
    pub async fn read(&self) -> Result<Option<Vec<u8>>, SecretError> {
        match self.api.get_opt(&self.name).await {
            Ok(Some(secret)) => self.bytes(&secret).map(Some),
            Ok(None) => Ok(None),
            Err(source) => Err(self.error("reading", source)),
        }
    }

    /// The secret, created first when the Secret does not exist (the controller's way).
    pub async fn read_or_create(&self) -> Result<Vec<u8>, SecretError> {
        if let Some(secret) = self.read().await? {
            return Ok(secret);
        }
        let bytes = token::new_secret()?;
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "palisade".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                SECRET_KEY.to_string(),
                ByteString(bytes.clone()),
            )])),
            // Never changed in place: a new secret means restarting every process anyway.
            immutable: Some(true),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        match self.api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                info!(namespace = %self.namespace, name = %self.name, "created the cluster secret");
                Ok(bytes)
            }
            // Another controller created it first: use theirs.
            Err(e) if status_code(&e) == Some(409) => {
                info!(namespace = %self.namespace, name = %self.name, "another controller created the cluster secret first; using it");
                match self.api.get(&self.name).await {
                    Ok(secret) => self.bytes(&secret),
                    Err(source) => Err(self.error("reading", source)),
                }
            }
            Err(source) => Err(self.error("creating", source)),
        }
    }

    /// The secret, once the Secret exists (a node's way: the controller creates it). Reads
    /// every `poll` until then, and through errors of the API server, which may be starting;
    /// a refusal to read it is an error at once.
    pub async fn wait(&self, poll: Duration) -> Result<Vec<u8>, SecretError> {
        let mut logged = false;
        loop {
            match self.read().await {
                Ok(Some(secret)) => return Ok(secret),
                Ok(None) if !logged => {
                    info!(namespace = %self.namespace, name = %self.name, "waiting for the cluster secret: `palisade controller --secret-from-kubernetes` creates it");
                    logged = true;
                }
                Ok(None) => {}
                Err(e @ SecretError::Api { .. }) => {
                    warn!(error = %e, "reading the cluster secret failed; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn bytes(&self, secret: &Secret) -> Result<Vec<u8>, SecretError> {
        let Some(ByteString(bytes)) = secret.data.as_ref().and_then(|d| d.get(SECRET_KEY)) else {
            return Err(SecretError::MissingKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            });
        };
        if !(MIN_SECRET_LEN..=MAX_SECRET_FILE_LEN).contains(&bytes.len()) {
            return Err(SecretError::BadLength {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                len: bytes.len(),
            });
        }
        Ok(bytes.clone())
    }

    fn error(&self, action: &'static str, source: kube::Error) -> SecretError {
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        match status_code(&source) {
            Some(401 | 403) => SecretError::Forbidden {
                action,
                namespace,
                name,
                source: Box::new(source),
            },
            _ => SecretError::Api {
                action,
                namespace,
                name,
                source: Box::new(source),
            },
        }
    }
}
