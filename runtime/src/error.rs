//! The error every [`crate::Manager`] operation returns, and its
//! [`ErrorKind`] for front ends to map to protocol codes (HTTP status,
//! ttrpc code). Kinds come from the variant, never from message text.

use std::path::PathBuf;

use arrakis_protocol::ErrorCode;

use crate::agent::{AgentError, ReadyError};
use crate::config::ConfigError;
use crate::network::NetError;
use crate::sandbox::{Operation, SandboxState};
use crate::store::StoreError;
use crate::vmm::VmmError;

/// How a front end should classify an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input (HTTP 400/422).
    InvalidArgument,
    /// No such sandbox or snapshot, or no such guest path (404).
    NotFound,
    /// The name or snapshot id is taken, or the guest path exists (409).
    AlreadyExists,
    /// The sandbox's state does not allow the operation, or another
    /// operation holds it (409).
    Conflict,
    /// The guest denied access to a path (403).
    PermissionDenied,
    /// The host is not set up for this (missing kernel, image...) (500/503).
    FailedPrecondition,
    /// A configured limit is reached, e.g. `max_sandboxes` (HTTP 429).
    ResourceExhausted,
    /// Everything else: VMM, agent, storage failures (500).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("no sandbox named {name:?}")]
    NotFound { name: String },
    #[error("a sandbox named {name:?} already exists")]
    AlreadyExists { name: String },
    #[error("cannot {op} sandbox {name:?}: it is {state}")]
    InvalidState {
        name: String,
        state: SandboxState,
        op: Operation,
    },
    #[error("sandbox {name:?} is busy with another operation; try again")]
    Busy { name: String },
    #[error("no snapshot with id {id:?}")]
    SnapshotNotFound { id: String },
    #[error("a snapshot with id {id:?} already exists")]
    SnapshotExists { id: String },
    #[error("snapshot {id:?} is busy with another operation; try again")]
    SnapshotBusy { id: String },
    /// The sandbox runs in a way a snapshot cannot capture.
    #[error("cannot snapshot sandbox {name:?}: {reason}")]
    NotSnapshottable { name: String, reason: &'static str },
    /// The snapshot cannot be restored on this host or configuration.
    #[error("cannot restore snapshot {id:?} here: {reason}")]
    SnapshotIncompatible { id: String, reason: String },
    #[error("the sandbox limit is reached: {max} sandboxes exist (max_sandboxes = {max})")]
    QuotaExceeded { max: u32 },
    /// The VM of a restored sandbox resumed but its agent never answered.
    #[error("sandbox {name:?} restored from snapshot {snapshot:?} did not answer: {reason}\n--- last console lines ---\n{console_tail}")]
    Restore {
        name: String,
        snapshot: String,
        reason: ReadyError,
        console_tail: String,
    },
    #[error("{what} not found at {path}: {hint}")]
    MissingArtifact {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("invalid runtime configuration")]
    Config(#[from] ConfigError),
    /// The VM started but its agent never answered. `reason` is part of
    /// the message (not a `source`) so the console tail comes last.
    #[error("sandbox {name:?} did not boot: {reason}\n--- last console lines ---\n{console_tail}")]
    Boot {
        name: String,
        reason: ReadyError,
        console_tail: String,
    },
    #[error("sandbox {name:?}: guest agent error")]
    Agent {
        name: String,
        #[source]
        source: AgentError,
    },
    #[error("sandbox {name:?}: VMM error")]
    Vmm {
        name: String,
        #[source]
        source: VmmError,
    },
    #[error("state store error")]
    Store(#[from] StoreError),
    /// Setting up the host side of a sandbox's network failed.
    #[error("sandbox {name:?}: host networking failed")]
    Network {
        name: String,
        #[source]
        source: NetError,
    },
    /// The network mode cannot do what was asked (bridge mode without
    /// root, a CIDR allow-list in user mode...).
    #[error("{0}")]
    NetworkUnsupported(String),
    #[error("host port {port} is already in use")]
    PortTaken { port: u16 },
    /// No address or host port is left.
    #[error("{0}")]
    NetworkExhausted(String),
    /// The image store (lookup, conversion, removal) failed.
    #[error(transparent)]
    Image(#[from] arrakis_image::store::StoreError),
    /// Pulling from a registry failed.
    #[error(transparent)]
    Registry(#[from] arrakis_image::registry::RegistryError),
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            RuntimeError::NotFound { .. } | RuntimeError::SnapshotNotFound { .. } => {
                ErrorKind::NotFound
            }
            RuntimeError::AlreadyExists { .. } | RuntimeError::SnapshotExists { .. } => {
                ErrorKind::AlreadyExists
            }
            RuntimeError::InvalidState { .. }
            | RuntimeError::Busy { .. }
            | RuntimeError::SnapshotBusy { .. }
            | RuntimeError::NotSnapshottable { .. } => ErrorKind::Conflict,
            RuntimeError::MissingArtifact { .. }
            | RuntimeError::Config(_)
            | RuntimeError::SnapshotIncompatible { .. } => ErrorKind::FailedPrecondition,
            RuntimeError::QuotaExceeded { .. } | RuntimeError::NetworkExhausted(_) => {
                ErrorKind::ResourceExhausted
            }
            RuntimeError::PortTaken { .. } => ErrorKind::Conflict,
            RuntimeError::NetworkUnsupported(_) => ErrorKind::InvalidArgument,
            RuntimeError::Network { .. } => ErrorKind::Internal,
            RuntimeError::Image(source) => image_kind(source),
            RuntimeError::Registry(source) => registry_kind(source),
            RuntimeError::Agent { source, .. } => agent_kind(source),
            RuntimeError::Boot { .. }
            | RuntimeError::Restore { .. }
            | RuntimeError::Vmm { .. }
            | RuntimeError::Store(_)
            | RuntimeError::Io { .. } => ErrorKind::Internal,
        }
    }

    /// True for failures of a restore that say the snapshot is unusable
    /// here (QEMU would not load it, the guest did not come back, its files
    /// are unreadable), rather than something about the request or host.
    pub fn blames_snapshot(&self) -> bool {
        matches!(
            self,
            RuntimeError::Restore { .. }
                | RuntimeError::Vmm { .. }
                | RuntimeError::Io { .. }
                | RuntimeError::Agent { .. }
                | RuntimeError::SnapshotIncompatible { .. }
        )
    }

    /// The error and all its causes on one line, for logs and API bodies.
    pub fn chain(&self) -> String {
        crate::agent::error_chain(self)
    }
}

fn image_kind(error: &arrakis_image::store::StoreError) -> ErrorKind {
    use arrakis_image::store::StoreError as E;
    match error {
        E::InvalidReference { .. } | E::Ambiguous { .. } => ErrorKind::InvalidArgument,
        E::NotFound { .. } => ErrorKind::NotFound,
        E::InUse { .. } => ErrorKind::Conflict,
        E::Io { .. } | E::Index(_) | E::Oci(_) | E::Ext4 { .. } | E::DiskMissing { .. } => {
            ErrorKind::Internal
        }
    }
}

fn registry_kind(error: &arrakis_image::registry::RegistryError) -> ErrorKind {
    use arrakis_image::registry::RegistryError as E;
    match error {
        E::InvalidReference { .. } => ErrorKind::InvalidArgument,
        E::NotFound { .. } | E::NoPlatform { .. } => ErrorKind::NotFound,
        E::CredentialsNeeded { .. } | E::CredentialsRefused { .. } => ErrorKind::PermissionDenied,
        E::Unreachable { .. } => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    }
}

fn agent_kind(error: &AgentError) -> ErrorKind {
    match error {
        AgentError::InvalidPath(_) | AgentError::InvalidRequest(_) => ErrorKind::InvalidArgument,
        AgentError::Remote { body, .. } => match body.code {
            ErrorCode::InvalidArgument | ErrorCode::WrongKind => ErrorKind::InvalidArgument,
            ErrorCode::NotFound => ErrorKind::NotFound,
            ErrorCode::AlreadyExists => ErrorKind::AlreadyExists,
            ErrorCode::PermissionDenied => ErrorKind::PermissionDenied,
            // Nothing listens on a guest port (yet): the guest is fine, the
            // target is not ready (HTTP 503).
            ErrorCode::Unavailable => ErrorKind::FailedPrecondition,
            ErrorCode::Cancelled | ErrorCode::Unsupported | ErrorCode::Internal => {
                ErrorKind::Internal
            }
        },
        AgentError::Connect { .. }
        | AgentError::Protocol { .. }
        | AgentError::Unexpected { .. }
        | AgentError::LocalIo { .. } => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrakis_protocol::ErrorBody;

    #[test]
    fn kinds_follow_variants() {
        let state = RuntimeError::InvalidState {
            name: "a".into(),
            state: SandboxState::Stopped,
            op: Operation::Pause,
        };
        assert_eq!(state.kind(), ErrorKind::Conflict);
        assert_eq!(
            state.to_string(),
            "cannot pause sandbox \"a\": it is stopped"
        );
        let remote = |code| RuntimeError::Agent {
            name: "a".into(),
            source: AgentError::Remote {
                op: "stat",
                body: ErrorBody::new(code, "x"),
            },
        };
        assert_eq!(remote(ErrorCode::NotFound).kind(), ErrorKind::NotFound);
        assert_eq!(
            remote(ErrorCode::PermissionDenied).kind(),
            ErrorKind::PermissionDenied
        );
        assert_eq!(remote(ErrorCode::Internal).kind(), ErrorKind::Internal);
        let path = RuntimeError::Agent {
            name: "a".into(),
            source: AgentError::InvalidPath(ErrorBody::new(ErrorCode::InvalidArgument, "empty")),
        };
        assert_eq!(path.kind(), ErrorKind::InvalidArgument);
        let quota = RuntimeError::QuotaExceeded { max: 3 };
        assert_eq!(quota.kind(), ErrorKind::ResourceExhausted);
        assert!(quota.to_string().contains("max_sandboxes = 3"), "{quota}");
        let missing = RuntimeError::SnapshotNotFound { id: "s 1".into() };
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert_eq!(missing.to_string(), "no snapshot with id \"s 1\"");
        let taken = RuntimeError::SnapshotExists { id: "s".into() };
        assert_eq!(taken.kind(), ErrorKind::AlreadyExists);
        assert!(
            path.chain().contains("invalid path: empty"),
            "{}",
            path.chain()
        );
    }
}
