//! The one place that maps the errors behind Palisade's own API to gRPC codes, and, for the
//! node agent's client, the codes a node answers back to agent errors. Every match is
//! exhaustive: a new error variant does not compile until someone picks its code.

use tonic::{Code, Status};

use crate::control::{ForceDetachError, MemberError, RegisterError, SettingUpdateError};
use crate::csi::status::status;
use crate::replica::agent::AgentError;
use crate::settings::SettingError;

impl From<RegisterError> for Status {
    fn from(e: RegisterError) -> Status {
        match e {
            e @ RegisterError::Duplicate { .. } => status(Code::FailedPrecondition, &e),
            // The node reacts to NOT_FOUND by registering again.
            e @ RegisterError::NotRegistered { .. } => status(Code::NotFound, &e),
            RegisterError::Store(s) => Status::from(s),
        }
    }
}

impl From<SettingUpdateError> for Status {
    fn from(e: SettingUpdateError) -> Status {
        match e {
            SettingUpdateError::Setting(
                e @ (SettingError::UnknownSetting { .. } | SettingError::BadValue { .. }),
            ) => status(Code::InvalidArgument, &e),
            SettingUpdateError::Store(s) => Status::from(s),
        }
    }
}

impl From<MemberError> for Status {
    fn from(e: MemberError) -> Status {
        match e {
            e @ (MemberError::VolumeNotFound(_) | MemberError::ReplicaNotFound { .. }) => {
                status(Code::NotFound, &e)
            }
            e @ (MemberError::Superseded { .. }
            | MemberError::LastMember { .. }
            | MemberError::NotRebuilding { .. }) => status(Code::FailedPrecondition, &e),
            e @ MemberError::NoMemberUp { .. } => status(Code::Unavailable, &e),
            MemberError::Store(s) => Status::from(s),
        }
    }
}

impl From<ForceDetachError> for Status {
    fn from(e: ForceDetachError) -> Status {
        match e {
            e @ ForceDetachError::NotFound(_) => status(Code::NotFound, &e),
            ForceDetachError::Store(s) => Status::from(s),
        }
    }
}

/// What a node's agent answers for a failed operation. The client turns the codes back into
/// agent errors with [`agent_error`].
pub fn agent_status(e: &AgentError) -> Status {
    let code = match e {
        AgentError::UnknownNode(_) => Code::FailedPrecondition,
        AgentError::UnknownDisk { .. } => Code::NotFound,
        AgentError::Unreachable { .. } => Code::Unavailable,
        AgentError::Replica(_) | AgentError::Task(_) => Code::Internal,
        AgentError::Engine { .. } => Code::OutOfRange,
    };
    status(code, e)
}

/// The agent error for a node's answer `s` (or for a call that did not reach it) to an
/// operation on `disk` of `node`.
pub fn agent_error(node: &str, disk: &str, s: &Status) -> AgentError {
    match s.code() {
        // Not reached, no answer in time, or the connection broke: the operation may or may
        // not have happened, and every agent operation is idempotent, so the caller retries.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => AgentError::Unreachable {
            node: node.to_string(),
            why: s.message().to_string(),
        },
        // The process at the node's agent address is another node's (a stale address).
        Code::FailedPrecondition => AgentError::UnknownNode(node.to_string()),
        Code::NotFound => AgentError::UnknownDisk {
            node: node.to_string(),
            disk: disk.to_string(),
        },
        Code::Ok
        | Code::Unknown
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => AgentError::Task(format!(
            "node {node:?} answered {:?}: {}",
            s.code(),
            s.message()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_survive_the_round_trip_that_matters() {
        let unknown_disk = AgentError::UnknownDisk {
            node: "n1".into(),
            disk: "d9".into(),
        };
        let back = agent_error("n1", "d9", &agent_status(&unknown_disk));
        assert!(matches!(back, AgentError::UnknownDisk { ref disk, .. } if disk == "d9"));
        let back = agent_error(
            "n1",
            "d1",
            &agent_status(&AgentError::UnknownNode("n1".into())),
        );
        assert!(matches!(back, AgentError::UnknownNode(ref n) if n == "n1"));
        let back = agent_error("n1", "d1", &Status::unavailable("tcp connect error"));
        assert!(matches!(back, AgentError::Unreachable { ref why, .. } if why.contains("connect")));
        let back = agent_error("n1", "d1", &agent_status(&AgentError::Task("boom".into())));
        assert!(back.to_string().contains("boom"), "{back}");
    }

    #[test]
    fn a_bad_setting_is_invalid_argument_naming_it() {
        let mut s = crate::settings::Settings::default();
        let e = s.set("default-replica-count", "99").unwrap_err();
        let st = Status::from(SettingUpdateError::from(e));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().contains("default-replica-count"), "{st:?}");
    }
}
