//! The seam between the runtime and a virtual machine monitor: a narrow
//! [`Vmm`] trait (launch, status, pause, resume, quit, kill, is_alive, and
//! the three steps of snapshot and restore: freeze_disk, save_state,
//! load_state) and the QEMU backend behind it ([`qemu::Qemu`]).
//!
//! The trait has steps, not a whole "snapshot" call, because the manager
//! must record each step's effect as it happens: once the disk is frozen
//! the VM writes to a new file, and the record must say so even if a later
//! step fails.
//!
//! A running VM is addressed by a [`VmHandle`] (pid + sandbox directory),
//! which the manager stores and rebuilds after a restart: nothing about a
//! VM lives only in memory, because VMs outlive the managing process.

pub mod qemu;
mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::accel::Accel;
use crate::layout::SandboxDir;

pub use qmp::QmpError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU failed to start ({status}): {stderr}")]
    LaunchFailed { status: String, stderr: String },
    #[error("cannot create the disk overlay {overlay}: {stderr}")]
    Overlay { overlay: PathBuf, stderr: String },
    #[error("QEMU did not daemonize within {0:?}")]
    LaunchTimeout(Duration),
    #[error("QEMU started but its pid file {path} is unreadable or invalid")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed")]
    Qmp {
        command: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("QEMU process {pid} did not exit after SIGKILL")]
    Unkillable { pid: u32 },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Guest hostname (a validated sandbox name).
    pub hostname: String,
    /// The sandbox directory: sockets, pid file and logs live here.
    pub dir: SandboxDir,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The VM's writable disk (a qcow2 overlay).
    pub disk: PathBuf,
    /// Guest RAM: a file mapped shared (`memory-backend-file,share=on`), so
    /// it can be left out of saved state and copied instead. Its content
    /// is the guest's memory from the first instruction on: a boot empties
    /// it (QEMU sizes an empty or absent file), a restore puts the
    /// snapshot's memory there first.
    pub ram_file: PathBuf,
    /// Start paused, waiting for [`Vmm::load_state`], instead of booting.
    pub incoming: bool,
    pub accel: Accel,
    pub extra_kernel_args: Vec<String>,
}

/// A launched VM, as recorded: enough to find it again from another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHandle {
    pub pid: u32,
    pub dir: SandboxDir,
}

impl VmHandle {
    pub fn new(pid: u32, dir: &Path) -> Self {
        VmHandle {
            pid,
            dir: SandboxDir::new(dir),
        }
    }
}

/// What the VMM reports about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    Running,
    Paused,
    /// The process is gone.
    Exited,
    /// Alive in some other run state (QEMU's name for it, e.g. `guest-panicked`).
    Other(String),
}

#[async_trait]
pub trait Vmm: Send + Sync {
    /// Starts the VM; returns once the VMM process runs in the background.
    async fn launch(&self, spec: &VmSpec) -> Result<VmHandle, VmmError>;
    /// Cheap liveness check (no round trip to the VMM).
    fn is_alive(&self, vm: &VmHandle) -> bool;
    async fn status(&self, vm: &VmHandle) -> Result<VmStatus, VmmError>;
    /// Freezes the vCPUs.
    async fn pause(&self, vm: &VmHandle) -> Result<(), VmmError>;
    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Asks the VMM to exit now (the guest gets no say). Does not wait.
    async fn quit(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Ends the VMM process with signals and waits until it is gone.
    async fn kill(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// Freezes the current top of the VM's disk: from now on it writes to
    /// `new_top`, created here as an overlay backed by the old top, which
    /// no process writes again. Atomic. The VM should be paused.
    async fn freeze_disk(&self, vm: &VmHandle, new_top: &Path) -> Result<(), VmmError>;
    /// Writes the device state of a paused VM to `state_file`, without the
    /// guest RAM (that is in [`VmSpec::ram_file`]). Afterwards the VM must
    /// be resumed before anything else is done with it.
    async fn save_state(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError>;
    /// Loads state written by [`Vmm::save_state`] into a VM launched with
    /// [`VmSpec::incoming`]; the VM ends paused.
    async fn load_state(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError>;
    /// The file the VM writes its disk to now, if the VMM says.
    async fn active_disk(&self, vm: &VmHandle) -> Result<Option<PathBuf>, VmmError>;
}
