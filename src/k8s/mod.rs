//! The Kubernetes side of the control plane, for a cluster: the recovery controller that
//! acts where Kubernetes alone is stuck when a node dies (`recovery`), and what lets several
//! controller replicas share a cluster: the cluster secret kept as a Secret (`secret`),
//! leader election with a `coordination.k8s.io/v1` Lease (`election`), node health evidence
//! from the kubelets' Nodes and Leases (`node_health`), and the connection they share
//! (`connection`). It sits over the control plane (it fences through `control`) and beside
//! the CSI adapters; the state's own Kubernetes backend (the custom resources and the client
//! configuration) is `store::kubernetes`, below it.

pub mod connection;
pub mod election;
pub mod node_health;
pub mod recovery;
pub mod secret;

/// The HTTP status of a Kubernetes API error, if `error` is one.
fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
