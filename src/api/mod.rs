//! Palisade's own gRPC services (proto/palisade.proto), served: the controller's ControlPlane,
//! which node agents and `palisade ctl` call, and every node's NodeAgent, which the controller
//! calls (with `agent::RemoteAgent`, the controller's side of it). Thin adapters over the
//! domain layers (`control`, `replica::agent`, `node`), with the mapping of their errors to
//! gRPC codes in one place (`status`). The wire types, clients and credentials are in `rpc`.

pub mod agent;
pub mod control;
pub mod status;
