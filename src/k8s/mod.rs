//! The Kubernetes side of Palisade: the custom resource types that hold the cluster state in
//! the API server (group `palisade.io`, version `v1alpha1`), the client configuration
//! (in-cluster, `--kubeconfig` or `KUBECONFIG`, and the namespace), and later the watchers,
//! leader election and the recovery reconcilers of DESIGN.md's "Kubernetes recovery".
//!
//! The store backend that reads and writes these resources is `store::kubernetes`; this
//! module defines what they look like (schemas, printer columns, short names) and nothing
//! about how they are kept consistent.

pub mod config;
pub mod crd;
