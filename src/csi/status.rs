//! The one place that maps domain errors to gRPC codes, following the CSI spec's per-RPC
//! error tables. Every match is exhaustive: a new error variant does not compile until
//! someone picks its code.

use tonic::{Code, Status};

use crate::control::{
    CreateError, DeleteError, ExpandError, ListError, PublishError, UnpublishError,
};
use crate::replica::agent::AgentError;
use crate::scheduler::PlacementError;
use crate::store::StoreError;

fn store(e: &StoreError) -> Code {
    match e {
        // A racing writer changed the object: the call may be retried and will converge.
        StoreError::Conflict { .. } => Code::Aborted,
        StoreError::Corrupt { .. } => Code::Internal,
        StoreError::Backend(_) => Code::Internal,
        // The API server unreachable or overloaded: the write may or may not have happened.
        StoreError::Kubernetes(e) if e.is_transient() => Code::Unavailable,
        StoreError::Kubernetes(_) => Code::Internal,
    }
}

fn agent(e: &AgentError) -> Code {
    match e {
        AgentError::Unreachable { .. } => Code::Unavailable,
        AgentError::UnknownNode(_) | AgentError::UnknownDisk { .. } => Code::Internal,
        AgentError::Replica(_) | AgentError::Task(_) => Code::Internal,
        AgentError::Engine { .. } => Code::Internal,
    }
}

/// A status with the error's message and its sources' messages (each once).
pub(crate) fn status(code: Code, e: &dyn std::error::Error) -> Status {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    Status::new(code, msg)
}

impl From<CreateError> for Status {
    fn from(e: CreateError) -> Status {
        let code = match &e {
            CreateError::Params(_) | CreateError::Capability(_) => Code::InvalidArgument,
            CreateError::OutOfRange(_) => Code::OutOfRange,
            CreateError::Incompatible { .. } => Code::AlreadyExists,
            CreateError::BeingDeleted(_) => Code::Aborted,
            CreateError::Placement { source, .. } => match source {
                PlacementError::StrictLocalWithoutNode { .. } => Code::InvalidArgument,
                PlacementError::NoRoom { .. }
                | PlacementError::NotEnoughRoom { .. }
                | PlacementError::StrictLocalNodeUnfit { .. } => Code::ResourceExhausted,
            },
            CreateError::Store(s) => store(s),
            CreateError::Agent { source, .. } => agent(source),
        };
        status(code, &e)
    }
}

impl From<DeleteError> for Status {
    fn from(e: DeleteError) -> Status {
        let code = match &e {
            DeleteError::InUse { .. } => Code::FailedPrecondition,
            DeleteError::Store(s) => store(s),
            DeleteError::Agent { source, .. } => agent(source),
        };
        status(code, &e)
    }
}

impl From<PublishError> for Status {
    fn from(e: PublishError) -> Status {
        let code = match &e {
            PublishError::VolumeNotFound(_) | PublishError::NodeNotFound(_) => Code::NotFound,
            PublishError::Capability(_) => Code::InvalidArgument,
            PublishError::Incompatible { .. } => Code::AlreadyExists,
            PublishError::HeldElsewhere { .. }
            | PublishError::HeldByDownNode { .. }
            | PublishError::TargetDown { .. }
            | PublishError::StrictLocal { .. }
            | PublishError::Unfenceable { .. } => Code::FailedPrecondition,
            PublishError::NodeFull { .. } => Code::ResourceExhausted,
            PublishError::NotReady(_) => Code::Aborted,
            PublishError::Store(s) => store(s),
        };
        status(code, &e)
    }
}

impl From<UnpublishError> for Status {
    fn from(e: UnpublishError) -> Status {
        let code = match &e {
            UnpublishError::Store(s) => store(s),
            // The members may be reachable again later: a retry can succeed.
            UnpublishError::Unfenceable { .. } => Code::Unavailable,
        };
        status(code, &e)
    }
}

impl From<ExpandError> for Status {
    fn from(e: ExpandError) -> Status {
        let code = match &e {
            ExpandError::NotFound(_) => Code::NotFound,
            ExpandError::OutOfRange(_) => Code::OutOfRange,
            ExpandError::NotReady(_) | ExpandError::Busy { .. } => Code::Aborted,
            ExpandError::Store(s) => store(s),
            ExpandError::Agent { source, .. } => agent(source),
        };
        status(code, &e)
    }
}

impl From<ListError> for Status {
    fn from(e: ListError) -> Status {
        let code = match &e {
            ListError::BadToken(_) => Code::Aborted,
            ListError::Store(s) => store(s),
        };
        status(code, &e)
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        status(store(&e), &e)
    }
}
