//! The host runtime core of arrakis: it owns sandboxes on this machine.
//!
//! A sandbox is a QEMU `microvm` that boots our kernel and an initramfs whose
//! `/init` is the guest agent, on a per-sandbox qcow2 overlay over a shared
//! read-only base image. [`Manager`] is the one entry point every front end
//! (CLI, HTTP API) uses; it keeps state in SQLite under the state directory so
//! sandboxes outlive the process that created them, and several manager
//! processes may work on one state directory at once.
//!
//! Layers, top down: [`manager`] (operations, reconciliation, snapshots and
//! restores) -> [`sandbox`] (the lifecycle state machine), [`store`]
//! (persistent records, disk layers), [`vmm`] (the VMM seam and its QEMU
//! backend), [`agent`] (typed client of the guest agent) ->
//! [`arrakis_protocol`].
//!
//! Guest RAM of every VM is a file on tmpfs mapped shared into QEMU, and
//! every disk is a chain of qcow2 layers under `<state_dir>/layers/`: that
//! is what makes snapshots cheap (device state + a sparse copy of the RAM
//! file + a frozen layer) and restores fast (see [`manager`]'s snapshot
//! module).

pub mod accel;
pub mod agent;
pub mod config;
pub mod error;
pub mod layout;
mod lock;
pub mod manager;
mod memfile;
pub mod network;
mod process;
pub mod sandbox;
pub mod spec;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vmm;

pub use accel::{Accel, AccelKind, HostFacts};
pub use agent::{
    AgentClient, AgentError, ExecEvent, ExecOptions, ExecOutput, ExecSession, ExecStdin,
    ReadyError, WriteOptions,
};
pub use config::{AccelMode, ConfigError, RuntimeConfig};
pub use error::{ErrorKind, RuntimeError};
pub use manager::{
    BuildProgress, BuildRequest, ExecDefaults, ForkSource, ImportedImage, Manager, QuietBuild,
    SandboxInfo, SnapshotInfo, MAX_FORKS,
};
pub use sandbox::{InvalidTransition, Operation, SandboxState};
pub use spec::SandboxSpec;
