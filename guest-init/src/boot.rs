//! Boot as PID 1, as a sequence of named steps: the kernel filesystems, the
//! console, the command line, the root disk and the switch into it, the
//! mounts a Linux userland expects, cgroups, identity and network.
//!
//! Nothing here is fatal: PID 1 must never exit (the kernel would panic), so
//! a failed step is logged to the console and the boot goes on, degraded.
//! The initramfs contents are left in place: this binary keeps running from it.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use arrakis_protocol::error_chain;
use nix::mount::{mount, MsFlags};

use crate::cgroup::Cgroups;
use crate::cmdline::BootConfig;
use crate::net::{self, NetSettings};

const NEW_ROOT: &str = "/newroot";
const ROOT_DEVICE_WAIT: Duration = Duration::from_secs(2);
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// Errors of boot steps (logged, never fatal).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("root device {device} did not appear within {ROOT_DEVICE_WAIT:?}")]
    NoRootDevice { device: String },
    #[error("switching root failed at {step}")]
    SwitchRoot {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open /dev/console")]
    Console(#[source] io::Error),
}

/// First steps, before logging works: kernel filesystems, the console on
/// fds 0-2, and the command line.
pub fn early() -> BootConfig {
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = mount_fs(fstype, target, fstype, MsFlags::MS_NOSUID, None);
    }
    // On failure there is nowhere to report it; the kernel log says more.
    let _ = attach_console();
    read_cmdline()
}

/// The configuration from `/proc/cmdline` (defaults when unreadable).
pub fn read_cmdline() -> BootConfig {
    BootConfig::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// The rest of the boot, with logging up. Returns the exec cgroup manager.
pub fn finish(config: &BootConfig) -> Cgroups {
    match mount_root(config).and_then(|()| switch_root()) {
        Ok(()) => tracing::info!(root = config.root, "switched to the root filesystem"),
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "staying on the initramfs")
        }
    }
    ensure_kernel_filesystems();
    mount_userland();
    let cgroups = Cgroups::setup(Path::new(CGROUP_MOUNT));
    identity_and_network(config);
    if let Err(e) = crate::system::set_oom_score_adj(-1000) {
        tracing::warn!(error = %e, "cannot protect the agent from the OOM killer");
    }
    cgroups
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(BootError::Mount {
            fstype: fstype.to_owned(),
            target: target.to_owned(),
            source,
        }),
    }
}

/// Mounts cgroup2 with `favordynmods` (Linux 6.0+) when the kernel has it:
/// without it every write to `cgroup.procs` (each exec joining its cgroup)
/// waits for an RCU grace period, about 7 ms under TCG.
fn mount_cgroup2(flags: MsFlags) {
    let mounted = mount_fs(
        "cgroup2",
        CGROUP_MOUNT,
        "cgroup2",
        flags,
        Some("favordynmods"),
    )
    .or_else(|_| mount_fs("cgroup2", CGROUP_MOUNT, "cgroup2", flags, None));
    if let Err(e) = mounted {
        tracing::warn!(error = %error_chain(&e), "mount failed");
    }
}

/// Makes `/dev/console` fds 0, 1 and 2 (the kernel opens none when the
/// initramfs has no console node). Not our controlling terminal.
fn attach_console() -> Result<(), BootError> {
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
        .map_err(BootError::Console)?;
    for target in 0..=2 {
        if console.as_raw_fd() != target {
            // SAFETY: dup2 onto the standard fds, which this process owns;
            // the console fd stays valid until `console` drops afterwards.
            unsafe { libc::dup2(console.as_raw_fd(), target) };
        }
    }
    if console.as_raw_fd() <= 2 {
        // It became one of 0-2 itself: keep it open.
        std::mem::forget(console);
    }
    Ok(())
}

fn mount_root(config: &BootConfig) -> Result<(), BootError> {
    let started = Instant::now();
    while !Path::new(&config.root).exists() {
        if started.elapsed() > ROOT_DEVICE_WAIT {
            return Err(BootError::NoRootDevice {
                device: config.root.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    mount_fs(
        &config.root,
        NEW_ROOT,
        &config.rootfstype,
        MsFlags::empty(),
        None,
    )
}

/// Moves the kernel filesystems into the new root and makes it `/`
/// (what `switch_root` does, minus deleting the initramfs).
fn switch_root() -> Result<(), BootError> {
    let step = |step: &'static str| move |source| BootError::SwitchRoot { step, source };
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            // Remounted fresh after the switch (see `ensure_kernel_filesystems`).
            tracing::warn!(error = %e, dir, "cannot move into the new root");
        }
    }
    nix::unistd::chdir(NEW_ROOT).map_err(step("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("mount --move"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))
}

/// Mounts /proc, /sys and /dev again if the move into the root failed.
fn ensure_kernel_filesystems() {
    for (fstype, target, probe) in [
        ("proc", "/proc", "/proc/self"),
        ("sysfs", "/sys", "/sys/class"),
        ("devtmpfs", "/dev", "/dev/null"),
    ] {
        if !Path::new(probe).exists() {
            if let Err(e) = mount_fs(fstype, target, fstype, MsFlags::MS_NOSUID, None) {
                tracing::error!(error = %error_chain(&e), "kernel filesystem missing");
            }
        }
    }
}

/// /dev/pts, /dev/shm, /run, cgroup2, /tmp and the /dev symlinks.
fn mount_userland() {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mounts = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777"),
        ),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=755")),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(e) = mount_fs(source, target, fstype, flags, data) {
            tracing::warn!(error = %error_chain(&e), "mount failed");
        }
    }
    mount_cgroup2(nosuid_nodev | MsFlags::MS_NOEXEC);
    // /tmp belongs to the root filesystem (it is snapshotted with it); only
    // create it when the image lacks it.
    if !Path::new("/tmp").exists() && std::fs::create_dir("/tmp").is_ok() {
        let _ = std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
}

fn identity_and_network(config: &BootConfig) {
    // The file write is the first metadata update of the fresh root file
    // system (tens of ms under emulation); nothing waits for it, so it is
    // kept off the path to the agent answering.
    match crate::system::set_kernel_hostname(&config.hostname) {
        Ok(()) => {
            let name = config.hostname.clone();
            let _ = std::thread::Builder::new()
                .name("hostname".into())
                .spawn(move || crate::system::write_hostname_file(&name));
        }
        Err(e) => tracing::warn!(error = %error_chain(&e), "hostname not set"),
    }
    if let Err(e) = net::loopback_up() {
        tracing::warn!(error = %error_chain(&e), "loopback not up");
    }
    if let Some(address) = config.ip {
        let settings = NetSettings {
            interface: "eth0".to_owned(),
            address,
            gateway: config.gateway,
            nameservers: config.dns.clone(),
            // QEMU gave the NIC its address.
            mac: None,
        };
        if let Err(e) = net::apply(&settings) {
            tracing::warn!(error = %error_chain(&e), "eth0 not configured");
        }
    }
    if !config.dns.is_empty() {
        if let Err(e) = net::write_resolv_conf(Path::new("/etc/resolv.conf"), &config.dns) {
            tracing::warn!(error = %error_chain(&e), "resolv.conf not written");
        }
    }
}
