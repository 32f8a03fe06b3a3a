//! Where the Kubernetes client and the namespace come from: `--kubeconfig PATH`, else
//! `KUBECONFIG` or `~/.kube/config`, else the pod's service account (in-cluster); the
//! namespace from `--namespace`, else the service account's namespace file.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The namespace file of a pod's service account.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Why no client or no namespace could be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the kubeconfig {path:?} failed: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found (not in a pod, no KUBECONFIG, no ~/.kube/config; \
         give --kubeconfig PATH): {source}"
    )]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("building the Kubernetes client failed: {source}")]
    Client {
        #[source]
        source: kube::Error,
    },
    #[error(
        "no namespace given and {SERVICE_ACCOUNT_NAMESPACE} cannot be read (not in a pod?): \
         give --namespace: {source}"
    )]
    Namespace {
        #[source]
        source: std::io::Error,
    },
    #[error("the namespace {0:?} is not a valid namespace name")]
    BadNamespace(String),
}

/// A client from the kubeconfig at `kubeconfig` if given, else inferred (KUBECONFIG,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ConfigError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| ConfigError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| ConfigError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| ConfigError::Infer { source })?,
    };
    kube::Client::try_from(config).map_err(|source| ConfigError::Client { source })
}

/// The namespace given, else the one of the pod's service account.
pub fn namespace(given: Option<&str>) -> Result<String, ConfigError> {
    let namespace = match given {
        Some(ns) => ns.to_string(),
        None => std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .map_err(|source| ConfigError::Namespace { source })?
            .trim()
            .to_string(),
    };
    if is_dns_label(&namespace) {
        Ok(namespace)
    } else {
        Err(ConfigError::BadNamespace(namespace))
    }
}

/// A DNS-1123 label: 1 to 63 lowercase alphanumerics or `-`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_namespace_is_checked() {
        assert_eq!(
            namespace(Some("palisade-system")).unwrap(),
            "palisade-system"
        );
        for bad in ["", "Palisade", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(
                matches!(namespace(Some(bad)), Err(ConfigError::BadNamespace(_))),
                "{bad:?}"
            );
        }
    }
}
