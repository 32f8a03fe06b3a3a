//! The Kubernetes side of a controller that survives its pod: the cluster secret kept as a
//! Secret (`secret`), leader election with a `coordination.k8s.io/v1` Lease (`election`),
//! and node health evidence from the kubelets' Nodes and Leases (`node_health`), with the
//! client and namespace they share (`connection`).
//!
//! (Kept apart from `k8s`, which holds the Kubernetes store's custom resources, until the two
//! are folded together.)

pub mod connection;
pub mod election;
pub mod node_health;
pub mod secret;

/// The HTTP status of a Kubernetes API error, if `error` is one.
fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
