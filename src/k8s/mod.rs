//! The Kubernetes side of the control plane, for a cluster: the recovery controller that
//! acts where Kubernetes alone is stuck when a node dies (`recovery`). It sits over the
//! control plane (it fences through `control`) and beside the CSI adapters; the state's own
//! Kubernetes backend (the custom resources and the client configuration) is
//! `store::kubernetes`, below it.

pub mod recovery;
