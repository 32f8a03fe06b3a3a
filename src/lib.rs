//! Palisade: a CSI driver that makes replicated block volumes out of the local disks of a
//! cluster's nodes, and fences a failed node so it can never write to them again.
//!
//! One folder per subsystem; dependencies run one way, from the top of this list down:
//!
//! - `cmd`: the CLI's process wiring (standalone, controller, node, ctl);
//! - `api`, `csi`: the gRPC services (Palisade's own, and CSI) as thin adapters;
//! - `k8s`: the Kubernetes side over the control plane (the recovery controller, the
//!   cluster secret as a Secret, leader election, node health evidence);
//! - `control`, `node`: the control plane's domain and the node's;
//! - `scheduler`, `store`, `engine`, `replica`, `rpc`: placement, state, the data path, and
//!   the clients of Palisade's own wire;
//! - `model`, `params`, `settings`, `locks`: the base, imported by all, importing none of the
//!   above.

pub mod api;
pub mod cmd;
pub mod control;
pub mod csi;
pub mod engine;
pub mod k8s;
pub mod locks;
pub mod model;
pub mod node;
pub mod params;
pub mod replica;
pub mod rpc;
pub mod scheduler;
pub mod settings;
pub mod store;
