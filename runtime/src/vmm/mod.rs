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

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::accel::Accel;
use crate::layout::SandboxDir;
use crate::network::Ipv4Net;

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
    #[error("QEMU refused `{command}`: {reply}")]
    Monitor { command: String, reply: String },
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
    /// Where guest RAM lives.
    pub memory: GuestMemory,
    /// Start paused, waiting for [`Vmm::load_state`] of state in this
    /// format, instead of booting.
    pub incoming: Option<StateFormat>,
    pub accel: Accel,
    pub extra_kernel_args: Vec<String>,
    /// The NIC, if the VM has one. Snapshots record whether it had: a
    /// restore must recreate exactly the devices that were saved.
    pub network: Option<VmNetwork>,
}

/// The guest's NIC and how the host side of it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetwork {
    pub mac: String,
    /// The guest's address and prefix (passed on the kernel command line).
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub nameserver: Ipv4Addr,
    pub backend: NetBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap device arrakis created: on its bridge, or (`netns`) in a
    /// network namespace QEMU is then launched in, to open it there.
    Tap {
        tap: String,
        netns: Option<std::path::PathBuf>,
    },
    /// QEMU's user networking (slirp).
    User {
        /// The guest's view of the network: slirp's `net`, `host`
        /// (gateway) and `dns`.
        subnet: Ipv4Net,
        dns: Ipv4Addr,
        /// No connection out of the guest (its forwards still work).
        restrict: bool,
        /// Forwards opened with the VM.
        forwards: Vec<HostForward>,
    },
}

/// A user-mode forward: TCP on every host address at `host_port` to the
/// guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    pub host_port: u16,
    pub guest: std::net::SocketAddrV4,
}

/// Guest RAM is always a file, so that a snapshot never pushes it through
/// QEMU's migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// Mapped shared (`share=on`, a tmpfs file): the guest's writes land in
    /// the file, which a snapshot copies. Booted VMs; a boot empties it
    /// (QEMU sizes an empty or absent file).
    Shared(PathBuf),
    /// A snapshot's memory mapped privately (`share=off`): copy-on-write,
    /// so nothing is copied at restore, the file is never written, and VMs
    /// restored from one file share its unmodified pages in the page
    /// cache. A snapshot of such a VM is the file plus the pages the VM
    /// has copied since (see [`crate::memfile::capture_private`]).
    Private(PathBuf),
}

impl GuestMemory {
    pub fn path(&self) -> &Path {
        match self {
            GuestMemory::Shared(path) | GuestMemory::Private(path) => path,
        }
    }
}

/// How a device state file was written; loading must match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// Device state only (`xen-save-devices-state`): no RAM section and no
    /// configuration section. What [`Vmm::save_state`] writes.
    Devices,
    /// A migration stream with `x-ignore-shared`, written by arrakis
    /// versions before copy-on-write restores; still loadable.
    Migration,
}

impl StateFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            StateFormat::Devices => "devices",
            StateFormat::Migration => "migration",
        }
    }

    pub fn parse(text: &str) -> Option<StateFormat> {
        match text {
            "devices" => Some(StateFormat::Devices),
            "migration" => Some(StateFormat::Migration),
            _ => None,
        }
    }
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
    /// Writes the device state of a paused VM to `state_file` in
    /// [`StateFormat::Devices`], without the guest RAM (that is in
    /// [`VmSpec::memory`]). The VM stays paused and usable.
    async fn save_state(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError>;
    /// Loads state into a VM launched with [`VmSpec::incoming`] set to
    /// `format`; the VM ends paused.
    async fn load_state(
        &self,
        vm: &VmHandle,
        state_file: &Path,
        format: StateFormat,
    ) -> Result<(), VmmError>;
    /// The file the VM writes its disk to now, if the VMM says.
    async fn active_disk(&self, vm: &VmHandle) -> Result<Option<PathBuf>, VmmError>;
    /// Opens (`add`) or closes a user-mode forward of a running VM.
    async fn host_forward(
        &self,
        vm: &VmHandle,
        forward: HostForward,
        add: bool,
    ) -> Result<(), VmmError>;
}
