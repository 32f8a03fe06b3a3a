//! Palisade: a CSI driver that makes replicated block volumes out of the local disks of a
//! cluster's nodes, and fences a failed node so it can never write to them again.

pub mod agent;
pub mod api;
pub mod attach;
pub mod blockdev;
pub mod cluster;
pub mod controller;
pub mod csi;
pub mod csi_server;
pub mod ctl;
pub mod engine;
pub mod extents;
pub mod fence;
pub mod k8s;
pub mod locks;
pub mod model;
pub mod mount;
pub mod nbd;
pub mod node;
pub mod node_engine;
pub mod node_reconcile;
pub mod params;
pub mod replica;
pub mod replica_client;
pub mod replica_io;
pub mod replica_server;
pub mod scheduler;
pub mod settings;
pub mod standalone;
pub mod store;
pub mod token;
pub mod wire;
