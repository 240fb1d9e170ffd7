//! The shim's errors and how they reach containerd (ttrpc status codes,
//! which containerd maps to its errdefs: NotFound, FailedPrecondition...).

use std::path::{Path, PathBuf};

use arrakis_protocol::error_chain;
use arrakis_runtime::ErrorKind;
use arrakis_runtime::{AgentError, RuntimeError};
use containerd_shim_protos::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("cannot mount on {target}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{action} {path} failed")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Image(#[from] arrakis_image::store::StoreError),
    #[error(transparent)]
    Ext4(#[from] arrakis_image::ext4::Ext4Error),
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ShimError {
        ShimError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> ShimError {
        ShimError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            ShimError::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Runtime(error) => match error.kind() {
                ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::Conflict | ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
                ErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
                ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
                _ => Code::INTERNAL,
            },
            _ => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(error: ShimError) -> ttrpc::Error {
        let message = error_chain(&error);
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code(), message))
    }
}

impl From<ShimError> for containerd_shim::Error {
    fn from(error: ShimError) -> containerd_shim::Error {
        containerd_shim::Error::Other(error_chain(&error))
    }
}
