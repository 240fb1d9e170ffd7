//! The QEMU backend: a `microvm` with virtio-mmio devices, daemonized so it
//! outlives the manager process, driven over QMP.
//!
//! [`command_line`] is a pure function of the [`VmSpec`]; the flags follow
//! the measured, working command lines in `shared/notes/qemu-cmdlines.txt`.
//! Differences: `-display none` instead of `-nographic` (QEMU refuses
//! `-nographic` with `-daemonize`), the serial console goes to a file, and
//! there is no network device yet.
//!
//! Guest RAM is always a `memory-backend-file` (see [`GuestMemory`]): a
//! snapshot saves only device state (`xen-save-devices-state`, ~20 KiB,
//! ~2 ms) and captures the RAM file, instead of pushing all of RAM through
//! the migration stream; a restore maps the snapshot's RAM file privately
//! and loads the device state as an incoming migration.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    qmp, GuestMemory, HostForward, NetBackend, StateFormat, VmHandle, VmNetwork, VmSpec, VmStatus,
    Vmm, VmmError,
};
use crate::process;

/// Name of the virtio-serial port the guest agent looks for.
pub const AGENT_PORT_NAME: &str = "org.arrakis.agent";

/// How long QEMU may take to set up and daemonize.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of QEMU's stderr kept in a launch error.
const STDERR_TAIL: usize = 4096;

/// Upper bound on saving or loading device state. The stream is small
/// (guest RAM is not in it); this only catches a wedged migration.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Qemu {
    binary: PathBuf,
}

impl Qemu {
    pub fn new(binary: &Path) -> Self {
        Qemu {
            binary: binary.to_path_buf(),
        }
    }
}

/// Maps a failed QMP `command` to the backend's error.
fn qmp_failed(command: &'static str) -> impl FnOnce(qmp::QmpError) -> VmmError {
    move |source| VmmError::Qmp { command, source }
}

/// Escapes a value for a QEMU `-opt key=value,...` list (commas double).
fn opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The guest kernel command line.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut args: Vec<String> = ["console=ttyS0", "panic=-1", "quiet", "reboot=t", "pci=off"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("arrakis.hostname={}", spec.hostname));
    if let Some(net) = &spec.network {
        args.push(format!("arrakis.ip={}", net.address));
        args.push(format!("arrakis.gw={}", net.gateway));
        args.push(format!("arrakis.dns={}", net.nameserver));
    }
    args.extend(spec.accel.kernel_args());
    args.extend(spec.extra_kernel_args.iter().cloned());
    args.join(" ")
}

/// Every argument after the binary name.
pub fn command_line(spec: &VmSpec) -> Vec<OsString> {
    let dir = &spec.dir;
    let mut args: Vec<String> = vec![
        "-M".into(),
        "microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=ram0".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
    ];
    args.extend(spec.accel.qemu_args());
    let share = match spec.memory {
        GuestMemory::Shared(_) => "on",
        GuestMemory::Private(_) => "off",
    };
    args.extend([
        "-m".into(),
        format!("{}M", spec.memory_mb),
        "-object".into(),
        format!(
            "memory-backend-file,id=ram0,size={}M,mem-path={},share={share}",
            spec.memory_mb,
            opt(spec.memory.path())
        ),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-kernel".into(),
        spec.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        spec.initramfs.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_cmdline(spec),
        "-drive".into(),
        format!(
            "id=root,file={},format=qcow2,if=none,cache=unsafe",
            opt(&spec.disk)
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-rng-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            opt(&dir.agent_socket())
        ),
        "-device".into(),
        "virtio-serial-device".into(),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
    ]);
    if let Some(net) = &spec.network {
        args.extend(["-netdev".into(), netdev(net), "-device".into()]);
        args.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac));
    }
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", opt(&dir.qmp_socket())),
        "-chardev".into(),
        format!("file,id=console,path={}", opt(&dir.console_log())),
        "-serial".into(),
        "chardev:console".into(),
        "-pidfile".into(),
        dir.pid_file().to_string_lossy().into_owned(),
        "-daemonize".into(),
    ]);
    if let Some(format) = spec.incoming {
        // Wait for `migrate-incoming`, and stay paused after it.
        args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        if format == StateFormat::Devices {
            // Device state has no configuration section to expect.
            args.extend(["-global".into(), "migration.send-configuration=off".into()]);
        }
    }
    args.into_iter().map(OsString::from).collect()
}

/// The `-netdev` of the NIC, id `net0`.
fn netdev(net: &VmNetwork) -> String {
    match &net.backend {
        NetBackend::Tap { tap, .. } => {
            format!("tap,id=net0,ifname={tap},script=no,downscript=no")
        }
        NetBackend::User {
            subnet,
            dns,
            restrict,
            forwards,
        } => {
            let mut value = format!(
                "user,id=net0,net={},host={},dns={dns},ipv6=off,restrict={}",
                subnet.trunc(),
                net.gateway,
                if *restrict { "on" } else { "off" }
            );
            for forward in forwards {
                value.push_str(&format!(",hostfwd={}", hostfwd_rule(forward)));
            }
            value
        }
    }
}

/// `tcp::HOST-GUEST_IP:GUEST` (every host address), as `-netdev user` and
/// `hostfwd_add` take it.
fn hostfwd_rule(forward: &HostForward) -> String {
    format!(
        "tcp::{}-{}:{}",
        forward.host_port,
        forward.guest.ip(),
        forward.guest.port()
    )
}

/// What a new overlay is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing<'a> {
    /// A raw base image.
    Raw(&'a Path),
    /// A (frozen) qcow2 layer.
    Qcow2(&'a Path),
}

/// Creates `overlay` as a qcow2 image over `backing`, which is recorded in
/// the overlay by the path given (absolute paths stay valid).
pub async fn create_overlay(
    qemu_img: &Path,
    backing: Backing<'_>,
    overlay: &Path,
) -> Result<(), VmmError> {
    let (format, base) = match backing {
        Backing::Raw(path) => ("raw", path),
        Backing::Qcow2(path) => ("qcow2", path),
    };
    let output = tokio::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(base)
        .arg(overlay)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            binary: qemu_img.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    stderr.truncate(STDERR_TAIL);
    Err(VmmError::Overlay {
        overlay: overlay.to_path_buf(),
        stderr,
    })
}

/// The last `lines` lines of a text file (empty if unreadable), at most 16 KiB.
pub fn last_lines(path: &Path, lines: usize) -> String {
    let text = tail_of_file(path, 16 * 1024);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `max` bytes of a file, as text (empty if unreadable).
pub fn tail_of_file(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

impl Qemu {
    /// Removes what a previous boot left (sockets, pid file) so a stale
    /// file is never mistaken for the new VM's, and for a boot empties a
    /// shared RAM file, whose content the guest would otherwise start with.
    fn clear_runtime_files(spec: &VmSpec) -> Result<(), VmmError> {
        let dir = &spec.dir;
        if let (None, GuestMemory::Shared(ram)) = (spec.incoming, &spec.memory) {
            match std::fs::OpenOptions::new().write(true).open(ram) {
                Ok(file) => file.set_len(0).map_err(|source| VmmError::Io {
                    op: "empty",
                    path: ram.clone(),
                    source,
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        op: "open",
                        path: ram.clone(),
                        source,
                    })
                }
            }
        }
        for path in [
            dir.agent_socket(),
            dir.qmp_socket(),
            dir.pid_file(),
            dir.qemu_log(),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        op: "remove",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn read_pid(path: &Path) -> Result<u32, VmmError> {
        let pid_err = |source| VmmError::PidFile {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(pid_err)?;
        text.trim()
            .parse::<u32>()
            .ok()
            .filter(|pid| *pid > 1)
            .ok_or_else(|| {
                pid_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    text.clone(),
                ))
            })
    }
}

#[async_trait]
impl Vmm for Qemu {
    async fn launch(&self, spec: &VmSpec) -> Result<VmHandle, VmmError> {
        Self::clear_runtime_files(spec)?;
        let log_path = spec.dir.qemu_log();
        let log = std::fs::File::create(&log_path).map_err(|source| VmmError::Io {
            op: "create",
            path: log_path.clone(),
            source,
        })?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(command_line(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        // A netns-mode tap exists only inside its namespace: QEMU opens it
        // from there (its sockets are paths, which a network namespace does
        // not change).
        let netns = match spec.network.as_ref().map(|n| &n.backend) {
            Some(NetBackend::Tap {
                netns: Some(path), ..
            }) => Some(std::fs::File::open(path).map_err(|source| VmmError::Io {
                op: "open the network namespace",
                path: path.clone(),
                source,
            })?),
            _ => None,
        };
        if let Some(file) = &netns {
            crate::network::netns::join_in_child(command.as_std_mut(), file);
        }
        tracing::debug!(binary = %self.binary.display(), args = ?command.as_std().get_args().collect::<Vec<_>>(), "launching QEMU");
        let mut child = command.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        drop(netns);
        // With -daemonize the first process exits once the VM is set up
        // (sockets listening, pid file written), or with an error.
        let status = tokio::time::timeout(LAUNCH_TIMEOUT, child.wait())
            .await
            .map_err(|_| VmmError::LaunchTimeout(LAUNCH_TIMEOUT))?
            .map_err(|source| VmmError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        if !status.success() {
            return Err(VmmError::LaunchFailed {
                status: status.to_string(),
                stderr: tail_of_file(&log_path, STDERR_TAIL),
            });
        }
        let pid = Self::read_pid(&spec.dir.pid_file())?;
        Ok(VmHandle {
            pid,
            dir: spec.dir.clone(),
        })
    }

    fn is_alive(&self, vm: &VmHandle) -> bool {
        process::is_vm_process(vm.pid, vm.dir.path())
    }

    async fn status(&self, vm: &VmHandle) -> Result<VmStatus, VmmError> {
        if !self.is_alive(vm) {
            return Ok(VmStatus::Exited);
        }
        match qmp::query_status(&vm.dir.qmp_socket()).await {
            Ok((_, state)) if state == "running" => Ok(VmStatus::Running),
            Ok((_, state)) if state == "paused" => Ok(VmStatus::Paused),
            Ok((_, state)) => Ok(VmStatus::Other(state)),
            Err(_) if !self.is_alive(vm) => Ok(VmStatus::Exited),
            Err(source) => Err(qmp_failed("query-status")(source)),
        }
    }

    async fn pause(&self, vm: &VmHandle) -> Result<(), VmmError> {
        qmp::stop(&vm.dir.qmp_socket())
            .await
            .map_err(qmp_failed("stop"))
    }

    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        qmp::cont(&vm.dir.qmp_socket())
            .await
            .map_err(qmp_failed("cont"))
    }

    async fn quit(&self, vm: &VmHandle) -> Result<(), VmmError> {
        qmp::quit(&vm.dir.qmp_socket())
            .await
            .map_err(qmp_failed("quit"))
    }

    async fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        if process::terminate(vm.pid, vm.dir.path(), Duration::from_secs(3)).await {
            Ok(())
        } else {
            Err(VmmError::Unkillable { pid: vm.pid })
        }
    }

    async fn freeze_disk(&self, vm: &VmHandle, new_top: &Path) -> Result<(), VmmError> {
        qmp::freeze_disk(&vm.dir.qmp_socket(), new_top)
            .await
            .map_err(qmp_failed("blockdev-snapshot-sync"))
    }

    async fn save_state(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        qmp::save_devices(&vm.dir.qmp_socket(), state_file)
            .await
            .map_err(qmp_failed("xen-save-devices-state"))
    }

    async fn load_state(
        &self,
        vm: &VmHandle,
        state_file: &Path,
        format: StateFormat,
    ) -> Result<(), VmmError> {
        let ignore_shared = format == StateFormat::Migration;
        qmp::load_state(
            &vm.dir.qmp_socket(),
            state_file,
            ignore_shared,
            STATE_TIMEOUT,
        )
        .await
        .map_err(qmp_failed("migrate-incoming"))
    }

    async fn active_disk(&self, vm: &VmHandle) -> Result<Option<PathBuf>, VmmError> {
        qmp::active_disk(&vm.dir.qmp_socket())
            .await
            .map_err(qmp_failed("query-block"))
    }

    async fn host_forward(
        &self,
        vm: &VmHandle,
        forward: HostForward,
        add: bool,
    ) -> Result<(), VmmError> {
        // Only the monitor (HMP) has these; it answers errors as text.
        let command = match add {
            true => format!("hostfwd_add net0 {}", hostfwd_rule(&forward)),
            false => format!("hostfwd_remove net0 tcp::{}", forward.host_port),
        };
        let reply = qmp::human(&vm.dir.qmp_socket(), &command)
            .await
            .map_err(qmp_failed("human-monitor-command"))?;
        // Success is silent, or (remove) "host forwarding rule for ... removed".
        let reply = reply.trim();
        if reply.is_empty() || reply.contains("removed") {
            Ok(())
        } else {
            Err(VmmError::Monitor {
                command,
                reply: reply.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::layout::SandboxDir;

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            hostname: "web-1".into(),
            dir: SandboxDir::new(Path::new("/s/sandboxes/0123456789abcdef")),
            vcpus: 2,
            memory_mb: 512,
            kernel: PathBuf::from("/a/vmlinuz"),
            initramfs: PathBuf::from("/a/initramfs.cpio"),
            disk: PathBuf::from("/s/layers/00000000000000aa.qcow2"),
            memory: GuestMemory::Shared(PathBuf::from("/dev/shm/arrakis-x/0123456789abcdef.ram")),
            incoming: None,
            accel,
            extra_kernel_args: vec!["loglevel=4".into()],
            network: None,
        }
    }

    fn args_of(spec: &VmSpec) -> Vec<String> {
        command_line(spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The values following every occurrence of `flag`.
    fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line() {
        let args = args_of(&spec(Accel::Tcg {
            tb_size_mb: 64,
            tsc_khz: Some(2_600_000),
        }));
        assert_eq!(
            values_of(&args, "-M"),
            ["microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=ram0"]
        );
        assert_eq!(
            values_of(&args, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/arrakis-x/0123456789abcdef.ram,share=on"]
        );
        assert!(!args.iter().any(|a| a == "-incoming" || a == "-S"));
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot", "-daemonize"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        assert!(
            !args.iter().any(|a| a == "-nographic"),
            "-nographic conflicts with -daemonize"
        );
        assert_eq!(values_of(&args, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(values_of(&args, "-m"), ["512M"]);
        assert_eq!(values_of(&args, "-smp"), ["2"]);
        assert_eq!(values_of(&args, "-kernel"), ["/a/vmlinuz"]);
        assert_eq!(values_of(&args, "-initrd"), ["/a/initramfs.cpio"]);
        assert_eq!(
            values_of(&args, "-append"),
            [
                "console=ttyS0 panic=-1 quiet reboot=t pci=off arrakis.hostname=web-1 \
              tsc_early_khz=2600000 tsc=reliable loglevel=4"
            ]
        );
        assert_eq!(
            values_of(&args, "-drive"),
            ["id=root,file=/s/layers/00000000000000aa.qcow2,format=qcow2,if=none,cache=unsafe"]
        );
        assert_eq!(
            values_of(&args, "-device"),
            [
                "virtio-blk-device,drive=root",
                "virtio-rng-device",
                "virtio-serial-device",
                "virtserialport,chardev=agent,name=org.arrakis.agent",
            ]
        );
        assert_eq!(
            values_of(&args, "-chardev"),
            [
                "socket,id=agent,path=/s/sandboxes/0123456789abcdef/agent.sock,server=on,wait=off",
                "file,id=console,path=/s/sandboxes/0123456789abcdef/console.log",
            ]
        );
        assert_eq!(
            values_of(&args, "-qmp"),
            ["unix:/s/sandboxes/0123456789abcdef/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(values_of(&args, "-serial"), ["chardev:console"]);
        assert_eq!(
            values_of(&args, "-pidfile"),
            ["/s/sandboxes/0123456789abcdef/qemu.pid"]
        );
        assert!(
            !args.iter().any(|a| a.contains("netdev")),
            "no NIC asked for"
        );
    }

    fn with_nic(backend: NetBackend) -> VmSpec {
        let mut spec = spec(Accel::Kvm);
        spec.network = Some(VmNetwork {
            mac: "02:a5:0a:14:00:03".into(),
            address: "10.20.0.3/16".parse().unwrap(),
            gateway: "10.20.0.1".parse().unwrap(),
            nameserver: "10.20.0.2".parse().unwrap(),
            backend,
        });
        spec
    }

    #[test]
    fn a_tap_nic_comes_last_with_its_mac() {
        let args = args_of(&with_nic(NetBackend::Tap {
            tap: "ar0123456789abc".into(),
            netns: None,
        }));
        assert_eq!(
            values_of(&args, "-netdev"),
            ["tap,id=net0,ifname=ar0123456789abc,script=no,downscript=no"]
        );
        let devices = values_of(&args, "-device");
        assert_eq!(
            devices.last().unwrap(),
            &"virtio-net-device,netdev=net0,mac=02:a5:0a:14:00:03"
        );
        let append = values_of(&args, "-append")[0];
        assert!(
            append.contains("arrakis.ip=10.20.0.3/16 arrakis.gw=10.20.0.1 arrakis.dns=10.20.0.2"),
            "{append}"
        );
    }

    #[test]
    fn user_mode_forwards_and_restricts() {
        let args = args_of(&with_nic(NetBackend::User {
            subnet: "10.20.0.0/16".parse().unwrap(),
            dns: "10.20.0.2".parse().unwrap(),
            restrict: true,
            forwards: vec![HostForward {
                host_port: 40001,
                guest: "10.20.0.3:5901".parse().unwrap(),
            }],
        }));
        assert_eq!(
            values_of(&args, "-netdev"),
            ["user,id=net0,net=10.20.0.0/16,host=10.20.0.1,dns=10.20.0.2,ipv6=off,restrict=on,hostfwd=tcp::40001-10.20.0.3:5901"]
        );
    }

    #[test]
    fn an_incoming_vm_waits_paused() {
        let mut spec = spec(Accel::Kvm);
        spec.incoming = Some(StateFormat::Migration);
        let args = args_of(&spec);
        assert_eq!(values_of(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"));
        assert!(values_of(&args, "-global").is_empty());
    }

    #[test]
    fn a_restore_maps_the_snapshot_memory_privately() {
        let mut spec = spec(Accel::Kvm);
        spec.memory = GuestMemory::Private(PathBuf::from("/s/sandboxes/x/memory.base"));
        spec.incoming = Some(StateFormat::Devices);
        let args = args_of(&spec);
        assert_eq!(
            values_of(&args, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/s/sandboxes/x/memory.base,share=off"]
        );
        assert_eq!(
            values_of(&args, "-global"),
            ["migration.send-configuration=off"]
        );
    }

    #[test]
    fn kvm_command_line_has_no_tsc_args() {
        let args = args_of(&spec(Accel::Kvm));
        assert_eq!(values_of(&args, "-accel"), ["kvm"]);
        assert_eq!(values_of(&args, "-cpu"), ["host"]);
        let append = values_of(&args, "-append")[0];
        assert!(!append.contains("tsc"), "{append}");
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut spec = spec(Accel::Kvm);
        spec.dir = SandboxDir::new(Path::new("/s,x/0123456789abcdef"));
        spec.disk = PathBuf::from("/s,x/layers/00000000000000aa.qcow2");
        spec.memory = GuestMemory::Shared(PathBuf::from("/r,x/a.ram"));
        let args = args_of(&spec);
        assert!(values_of(&args, "-drive")[0]
            .starts_with("id=root,file=/s,,x/layers/00000000000000aa.qcow2,"));
        assert!(values_of(&args, "-object")[0].contains("mem-path=/r,,x/a.ram,"));
        assert!(values_of(&args, "-qmp")[0].starts_with("unix:/s,,x/"));
    }

    #[tokio::test]
    async fn launch_failure_reports_qemu_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(Accel::Tcg {
            tb_size_mb: 16,
            tsc_khz: None,
        });
        spec.dir = SandboxDir::new(dir.path());
        spec.kernel = dir.path().join("no-such-kernel");
        // A stand-in for QEMU that fails the way QEMU does: message on stderr, exit 1.
        let fake = dir.path().join("fake-qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"qemu: could not load kernel\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = Qemu::new(&fake).launch(&spec).await.unwrap_err();
        match err {
            VmmError::LaunchFailed { stderr, .. } => {
                assert_eq!(stderr, "qemu: could not load kernel")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
