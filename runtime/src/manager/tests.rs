//! The manager against a fake VMM: reconciliation at open and on list,
//! transition checks, cleanup after a failed create, the sandbox quota, and
//! the snapshot steps with their failures and recovery. No VM boots here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::*;
use crate::accel::HostFacts;
use crate::error::ErrorKind;
use crate::store::{NewLayer, SnapshotRecord, SnapshotState, Store};
use crate::vmm::{HostForward, QmpError, StateFormat, VmSpec, VmStatus, VmmError};

/// Pretends processes with the listed pids run in the listed states.
#[derive(Default)]
struct FakeVmm {
    vms: Mutex<HashMap<u32, VmStatus>>,
    killed: Mutex<Vec<u32>>,
    /// Every spec `launch` was called with.
    launched: Mutex<Vec<VmSpec>>,
    /// Steps that fail: "freeze", "save", "load".
    failing: Mutex<HashSet<&'static str>>,
    /// The disk each VM writes to, as moved by `freeze_disk`.
    disks: Mutex<HashMap<u32, PathBuf>>,
    /// Run-state changes and snapshot steps, in order.
    calls: Mutex<Vec<String>>,
    /// User-mode forwards opened (true) and closed at runtime.
    forwards: Mutex<Vec<(HostForward, bool)>>,
}

impl FakeVmm {
    fn with(vms: &[(u32, VmStatus)]) -> Arc<FakeVmm> {
        Arc::new(FakeVmm {
            vms: Mutex::new(vms.iter().cloned().collect()),
            ..FakeVmm::default()
        })
    }

    fn fail(&self, step: &'static str) {
        self.failing.lock().unwrap().insert(step);
    }

    fn step(&self, vm: &VmHandle, step: &'static str) -> Result<(), VmmError> {
        self.calls.lock().unwrap().push(step.to_string());
        if self.failing.lock().unwrap().contains(step) {
            return Err(VmmError::Qmp {
                command: step,
                source: QmpError::Refused(format!("fake: {step} fails")),
            });
        }
        if !self.is_alive(vm) {
            return Err(VmmError::Unkillable { pid: vm.pid });
        }
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn set(&self, pid: u32, status: Option<VmStatus>) {
        let mut vms = self.vms.lock().unwrap();
        match status {
            Some(status) => vms.insert(pid, status),
            None => vms.remove(&pid),
        };
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    async fn launch(&self, spec: &VmSpec) -> Result<VmHandle, VmmError> {
        self.launched.lock().unwrap().push(spec.clone());
        Err(VmmError::LaunchFailed {
            status: "exit status: 1".into(),
            stderr: "fake: no VMs here".into(),
        })
    }

    fn is_alive(&self, vm: &VmHandle) -> bool {
        self.vms.lock().unwrap().contains_key(&vm.pid)
    }

    async fn status(&self, vm: &VmHandle) -> Result<VmStatus, VmmError> {
        Ok(self
            .vms
            .lock()
            .unwrap()
            .get(&vm.pid)
            .cloned()
            .unwrap_or(VmStatus::Exited))
    }

    async fn pause(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.calls.lock().unwrap().push("stop".into());
        self.set(vm.pid, Some(VmStatus::Paused));
        Ok(())
    }

    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.calls.lock().unwrap().push("cont".into());
        self.set(vm.pid, Some(VmStatus::Running));
        Ok(())
    }

    async fn freeze_disk(&self, vm: &VmHandle, new_top: &Path) -> Result<(), VmmError> {
        self.step(vm, "freeze")?;
        std::fs::write(new_top, b"QFI\xfbfake").unwrap();
        self.disks
            .lock()
            .unwrap()
            .insert(vm.pid, new_top.to_path_buf());
        Ok(())
    }

    async fn save_state(&self, vm: &VmHandle, state_file: &Path) -> Result<(), VmmError> {
        self.step(vm, "save")?;
        std::fs::write(state_file, b"device state").unwrap();
        Ok(())
    }

    async fn load_state(
        &self,
        vm: &VmHandle,
        _state_file: &Path,
        _format: StateFormat,
    ) -> Result<(), VmmError> {
        self.step(vm, "load")
    }

    async fn active_disk(&self, vm: &VmHandle) -> Result<Option<PathBuf>, VmmError> {
        Ok(self.disks.lock().unwrap().get(&vm.pid).cloned())
    }

    async fn host_forward(
        &self,
        _vm: &VmHandle,
        forward: HostForward,
        add: bool,
    ) -> Result<(), VmmError> {
        self.forwards.lock().unwrap().push((forward, add));
        Ok(())
    }

    async fn quit(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.kill(vm).await
    }

    async fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.set(vm.pid, None);
        self.killed.lock().unwrap().push(vm.pid);
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    config: RuntimeConfig,
}

impl Fixture {
    /// A state dir, plus artifacts that exist (a tiny raw base image).
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::with_home(dir.path());
        config.warm_start = false;
        config.network.mode = crate::network::NetModeConfig::User;
        config.accel = crate::config::AccelMode::Tcg;
        config.ram_dir = Some(dir.path().join("ram"));
        for path in [&config.kernel, &config.initramfs] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"artifact").unwrap();
        }
        let image = crate::spec::image_path(&config.images_dir, "debian");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink("debian", config.images_dir.join("default")).unwrap();
        Fixture { dir, config }
    }

    fn layout(&self) -> StateLayout {
        StateLayout::new(&self.config.state_dir)
    }

    /// A record of a default-sized sandbox, without a disk layer.
    fn record(&self, name: &str, id: &str, state: SandboxState, pid: Option<u32>) -> SandboxRecord {
        SandboxRecord {
            name: name.into(),
            id: id.into(),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            image_path: self.dir.path().join("images/debian/rootfs.ext4"),
            state,
            pid,
            accel: AccelKind::Tcg,
            created_at: 1,
            boot_count: 1,
            env: BTreeMap::new(),
            disk_layer: None,
            from_snapshot: None,
            network: None,
        }
    }

    /// Records a sandbox directly in the store, with its directory.
    fn seed(&self, name: &str, id: &str, state: SandboxState, pid: Option<u32>) {
        let layout = self.layout();
        std::fs::create_dir_all(layout.sandbox_dir(id).path()).unwrap();
        let store = Store::open(&layout.database()).unwrap();
        store
            .insert(&self.record(name, id, state, pid), None, 0)
            .unwrap();
    }

    /// Records a sandbox on its own root layer `layer`, with the layer
    /// file and, if a process is expected, a RAM file with some data.
    fn seed_on_layer(
        &self,
        name: &str,
        id: &str,
        state: SandboxState,
        pid: Option<u32>,
        layer: &str,
    ) {
        let layout = self.layout();
        std::fs::create_dir_all(layout.sandbox_dir(id).path()).unwrap();
        std::fs::create_dir_all(layout.layers_dir()).unwrap();
        // A real (tiny) qcow2 image: restores run qemu-img on it.
        let status = std::process::Command::new(&self.config.qemu_img_binary)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(layout.layer_file(layer))
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(status.success());
        if state.expects_process() {
            std::fs::create_dir_all(self.ram_dir()).unwrap();
            std::fs::write(self.ram_file(id), b"guest memory").unwrap();
        }
        let record = SandboxRecord {
            env: [("K".to_string(), "v".to_string())].into(),
            disk_layer: Some(layer.into()),
            ..self.record(name, id, state, pid)
        };
        let store = Store::open(&layout.database()).unwrap();
        store
            .insert(
                &record,
                Some(&NewLayer {
                    id: layer.into(),
                    parent: None,
                }),
                0,
            )
            .unwrap();
    }

    fn ram_dir(&self) -> PathBuf {
        self.config.resolved_ram_dir()
    }

    fn ram_file(&self, id: &str) -> PathBuf {
        self.ram_dir().join(format!("{id}.ram"))
    }

    fn store(&self) -> Store {
        Store::open(&self.layout().database()).unwrap()
    }

    /// File names in a directory, sorted.
    fn files_in(&self, dir: &Path) -> Vec<String> {
        crate::testing::VmTestEnv::entries(dir)
    }

    async fn open(&self, vmm: Arc<FakeVmm>) -> Manager {
        Manager::open_with(self.config.clone(), vmm, &HostFacts::default())
            .await
            .unwrap()
    }
}

fn id(n: u8) -> String {
    format!("{n:016x}")
}

fn states(infos: &[SandboxInfo]) -> Vec<(&str, SandboxState, Option<u32>)> {
    infos
        .iter()
        .map(|i| (i.name.as_str(), i.state, i.pid))
        .collect()
}

#[tokio::test]
async fn open_reconciles_records_with_processes() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.layout().sandboxes_dir()).unwrap();
    fx.seed("alive", &id(1), SandboxState::Running, Some(101));
    fx.seed("died", &id(2), SandboxState::Running, Some(102));
    fx.seed(
        "paused-says-running",
        &id(3),
        SandboxState::Paused,
        Some(103),
    );
    fx.seed("half-created", &id(4), SandboxState::Creating, Some(104));
    fx.seed("half-stopped", &id(5), SandboxState::Stopping, Some(105));
    fx.seed("half-destroyed", &id(6), SandboxState::Destroying, None);
    fx.seed("stopped", &id(7), SandboxState::Stopped, None);
    fx.seed("busy", &id(8), SandboxState::Creating, None);
    // Held by "another process": reconciliation must leave it alone.
    let held = crate::lock::SandboxLock::try_acquire(&fx.layout().lock_file(&id(8)))
        .unwrap()
        .unwrap();
    // An orphan: directory and lock file without a record.
    std::fs::create_dir_all(fx.layout().sandbox_dir(&id(9)).path()).unwrap();
    std::fs::write(fx.layout().lock_file(&id(10)), b"").unwrap();

    let vmm = FakeVmm::with(&[
        (101, VmStatus::Running),
        (103, VmStatus::Running),
        (104, VmStatus::Running),
        (105, VmStatus::Running),
    ]);
    let manager = fx.open(vmm.clone()).await;
    let infos = manager.list().await.unwrap();
    assert_eq!(
        states(&infos),
        [
            ("alive", SandboxState::Running, Some(101)),
            ("busy", SandboxState::Creating, None),
            ("died", SandboxState::Crashed, None),
            ("half-stopped", SandboxState::Stopped, None),
            ("paused-says-running", SandboxState::Running, Some(103)),
            ("stopped", SandboxState::Stopped, None),
        ]
    );
    let mut killed = vmm.killed.lock().unwrap().clone();
    killed.sort();
    assert_eq!(killed, [104, 105]);
    for gone in [4, 6, 9] {
        assert!(
            !fx.layout().sandbox_dir(&id(gone)).path().exists(),
            "dir {gone} left"
        );
    }
    assert!(!fx.layout().lock_file(&id(10)).exists());
    assert!(fx.layout().sandbox_dir(&id(8)).path().exists());
    drop(held);
}

#[tokio::test]
async fn list_notices_a_dead_vm() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.layout().sandboxes_dir()).unwrap();
    fx.seed("box", &id(1), SandboxState::Running, Some(101));
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    assert_eq!(
        manager.get("box").await.unwrap().state,
        SandboxState::Running
    );
    vmm.set(101, None);
    assert_eq!(
        states(&manager.list().await.unwrap()),
        [("box", SandboxState::Crashed, None)]
    );
    let err = manager.agent("box").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        err.to_string(),
        "cannot use the agent of sandbox \"box\": it is crashed"
    );
}

#[tokio::test]
async fn operations_follow_the_transition_table() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.layout().sandboxes_dir()).unwrap();
    fx.seed("box", &id(1), SandboxState::Running, Some(101));
    fx.seed("off", &id(2), SandboxState::Stopped, None);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;

    assert_eq!(
        manager.pause("box").await.unwrap().state,
        SandboxState::Paused
    );
    assert_eq!(vmm.vms.lock().unwrap()[&101], VmStatus::Paused);
    let err = manager.pause("box").await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::InvalidState {
                state: SandboxState::Paused,
                op: Operation::Pause,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        manager.resume("box").await.unwrap().state,
        SandboxState::Running
    );
    for result in [
        manager.pause("off").await,
        manager.resume("off").await,
        manager.stop("off").await,
    ] {
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Conflict);
    }
    assert_eq!(
        manager.start("nope").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn destroy_kills_and_removes_everything() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.layout().sandboxes_dir()).unwrap();
    fx.seed("box", &id(1), SandboxState::Paused, Some(101));
    fx.seed("wreck", &id(2), SandboxState::Crashed, None);
    let vmm = FakeVmm::with(&[(101, VmStatus::Paused)]);
    let manager = fx.open(vmm.clone()).await;
    manager.destroy("box").await.unwrap();
    manager.destroy("wreck").await.unwrap();
    assert_eq!(*vmm.killed.lock().unwrap(), [101]);
    assert!(manager.list().await.unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(fx.layout().sandboxes_dir())
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        manager.destroy("box").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn two_managers_on_one_state_dir_destroy_once() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.layout().sandboxes_dir()).unwrap();
    fx.seed("box", &id(1), SandboxState::Running, Some(101));
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let one = fx.open(vmm.clone()).await;
    let two = fx.open(vmm.clone()).await;
    // The second waits for the first's lock, then finds the sandbox gone.
    let (lock, record) = one.lock("box").await.unwrap();
    let racer = tokio::spawn(async move { two.destroy("box").await });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !racer.is_finished(),
        "destroy ran while another manager held the lock"
    );
    one.teardown(&record).await.unwrap();
    drop(lock);
    let err = racer.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(*vmm.killed.lock().unwrap(), [101]);
    let leftovers: Vec<_> = std::fs::read_dir(fx.layout().sandboxes_dir())
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn a_failed_create_leaves_nothing() {
    let fx = Fixture::new();
    let manager = fx.open(FakeVmm::with(&[])).await;
    let err = manager.create(SandboxSpec::named("box")).await.unwrap_err();
    assert!(err.chain().contains("fake: no VMs here"), "{}", err.chain());
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(manager.list().await.unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(fx.layout().sandboxes_dir())
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A create in user mode launches a NIC with the leased address, its MAC,
/// the forwards and (egress denied) `restrict`; when the boot fails, the
/// address and ports are leased again by the next create.
#[tokio::test]
async fn user_mode_creates_launch_a_nic_and_release_it_on_failure() {
    use crate::network::{EgressPolicy, ForwardRequest};
    use crate::vmm::NetBackend;
    let fx = Fixture::new();
    let vmm = FakeVmm::with(&[]);
    let manager = fx.open(vmm.clone()).await;
    assert_eq!(manager.network_mode(), crate::network::NetMode::User);
    let mut spec = SandboxSpec::named("box");
    spec.egress = Some(EgressPolicy::DenyAll);
    spec.forwards = vec![ForwardRequest {
        host_port: None,
        guest_port: 8000,
        description: "web".into(),
    }];
    for _ in 0..2 {
        manager.create(spec.clone()).await.unwrap_err();
    }
    let launched = vmm.launched.lock().unwrap().clone();
    assert_eq!(launched.len(), 2);
    let net = launched[0].network.clone().expect("a NIC");
    let again = launched[1].network.clone().expect("a NIC");
    assert_eq!(
        (&net.address, &net.mac),
        (&again.address, &again.mac),
        "the address came back"
    );
    assert!(
        fx.store().all_forwards().unwrap().is_empty(),
        "and the host ports"
    );
    assert_eq!(net.address.to_string(), "10.20.0.3/16");
    assert_eq!(net.mac, "02:a5:0a:14:00:03");
    assert_eq!(
        net.nameserver.to_string(),
        "127.0.0.1",
        "no resolver when denied"
    );
    let NetBackend::User {
        restrict, forwards, ..
    } = net.backend
    else {
        panic!("not user mode: {:?}", net.backend)
    };
    assert!(restrict);
    // The six configured defaults, then ours.
    assert_eq!(forwards.len(), 7);
    assert_eq!(forwards[6].guest.to_string(), "10.20.0.3:8000");
    let cmdline = crate::vmm::qemu::kernel_cmdline(&launched[0]);
    assert!(cmdline.contains("arrakis.ip=10.20.0.3/16"), "{cmdline}");

    spec.egress = Some(EgressPolicy::AllowList(vec!["10.0.0.0/8".parse().unwrap()]));
    let err = manager.create(spec).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("bridge"), "{err}");
    assert_eq!(
        vmm.launched.lock().unwrap().len(),
        2,
        "refused before a launch"
    );
}

#[tokio::test]
async fn a_name_never_reaches_the_kernel_command_line() {
    let fx = Fixture::new();
    let vmm = FakeVmm::with(&[]);
    let manager = fx.open(vmm.clone()).await;
    let name = "x init=sh arrakis.hostname=evil\u{a0}Ü";
    manager.create(SandboxSpec::named(name)).await.unwrap_err();
    let launched = vmm.launched.lock().unwrap().clone();
    assert_eq!(launched.len(), 1);
    let cmdline = crate::vmm::qemu::kernel_cmdline(&launched[0]);
    let hostnames: Vec<&str> = cmdline
        .split(' ')
        .filter(|arg| arg.starts_with("arrakis.hostname="))
        .collect();
    assert_eq!(
        hostnames,
        ["arrakis.hostname=x-init-sh-arrakis.hostname-evil"],
        "{cmdline}"
    );
    assert!(!cmdline.contains(" init="), "{cmdline}");
}

#[tokio::test]
async fn create_validates_before_touching_anything() {
    let fx = Fixture::new();
    let manager = fx.open(FakeVmm::with(&[])).await;
    let err = manager
        .create(SandboxSpec {
            image: Some("ubuntu".into()),
            ..SandboxSpec::named("box")
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let text = err.to_string();
    assert!(
        text.starts_with("invalid image: no image \"ubuntu\": not a local image"),
        "{text}"
    );
    assert!(text.contains("available: debian, default"), "{text}");

    std::fs::remove_file(&fx.config.kernel).unwrap();
    let err = manager.create(SandboxSpec::named("box")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("guest kernel not found"), "{err}");
    assert!(std::fs::read_dir(fx.layout().sandboxes_dir())
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn open_refuses_a_bad_config() {
    let fx = Fixture::new();
    let mut config = fx.config.clone();
    config.default_memory_mb = 1;
    let err = Manager::open_with(config, FakeVmm::with(&[]), &HostFacts::default())
        .await
        .err()
        .expect("invalid config");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.chain().contains("default_memory_mb"), "{}", err.chain());
    assert!(!Path::new(&fx.config.state_dir).join("arrakis.db").exists());
}

const L1: &str = "00000000000000a1";
const L2: &str = "00000000000000a2";

fn snapshot_dir_entries(fx: &Fixture) -> Vec<String> {
    fx.files_in(&fx.layout().snapshots_dir())
}

fn layer_files(fx: &Fixture) -> Vec<String> {
    fx.files_in(&fx.layout().layers_dir())
}

#[tokio::test]
async fn snapshots_freeze_the_disk_and_leave_the_vm_as_it_was() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    fx.seed_on_layer("held", &id(2), SandboxState::Paused, Some(102), L2);
    fx.seed("off", &id(3), SandboxState::Stopped, None);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running), (102, VmStatus::Paused)]);
    let manager = fx.open(vmm.clone()).await;
    vmm.calls();

    let info = manager
        .snapshot("box", Some("s 1/x".into()))
        .await
        .unwrap_err();
    assert_eq!(info.kind(), ErrorKind::InvalidArgument);
    let info = manager.snapshot("box", Some("s 1".into())).await.unwrap();
    assert_eq!(vmm.calls(), ["stop", "freeze", "save", "cont"]);
    assert_eq!(vmm.vms.lock().unwrap()[&101], VmStatus::Running);
    assert_eq!(
        (info.id.as_str(), info.sandbox.as_str(), info.memory_mb),
        ("s 1", "box", 256)
    );
    assert_eq!(info.env.get("K").map(String::as_str), Some("v"));
    assert!(info.size_bytes > 0, "{info:?}");
    assert_eq!(manager.get_snapshot("s 1").await.unwrap(), info);
    // The sandbox moved to a new top layer standing on the frozen one.
    let record = fx.store().get("box").unwrap().unwrap();
    let top = record.disk_layer.clone().unwrap();
    assert_ne!(top, L1);
    assert_eq!(fx.store().layer_parents().unwrap()[&top], Some(L1.into()));
    assert_eq!(
        vmm.disks.lock().unwrap()[&101],
        fx.layout().layer_file(&top)
    );
    let snap = fx.store().get_snapshot("s 1").unwrap().unwrap();
    assert_eq!((snap.layer.as_str(), snap.next_layer), (L1, None));
    let dir = fx.layout().snapshot_dir(&snap.dir);
    assert_eq!(std::fs::read(dir.memory_file()).unwrap(), b"guest memory");
    assert_eq!(std::fs::read(dir.state_file()).unwrap(), b"device state");

    let err = manager
        .snapshot("box", Some("s 1".into()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(vmm.calls(), Vec::<String>::new());

    // A paused VM stays paused throughout; an id is generated.
    let held = manager.snapshot("held", None).await.unwrap();
    assert!(held.id.starts_with("snap-"), "{}", held.id);
    assert_eq!(vmm.calls(), ["freeze", "save"]);
    assert_eq!(vmm.vms.lock().unwrap()[&102], VmStatus::Paused);
    assert_eq!(
        manager.get("held").await.unwrap().state,
        SandboxState::Paused
    );

    let err = manager.snapshot("off", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let err = manager.snapshot("nope", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let listed: Vec<String> = manager
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&"s 1".to_string()));

    // Deleting the snapshot removes its files; the frozen layer stays
    // while the sandbox stands on it.
    manager.delete_snapshot("s 1").await.unwrap();
    assert!(!dir.path().exists());
    assert!(fx.layout().layer_file(L1).is_file());
    for err in [
        manager.delete_snapshot("s 1").await.unwrap_err(),
        manager.get_snapshot("s 1").await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
    // The id is free again.
    manager.snapshot("box", Some("s 1".into())).await.unwrap();
    manager.delete_snapshot("s 1").await.unwrap();
    // Destroying the sandbox removes all of its layers.
    manager.destroy("box").await.unwrap();
    let layers = layer_files(&fx);
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert!(layers.contains(&format!("{L2}.qcow2")), "{layers:?}");
    assert!(!fx.ram_file(&id(1)).exists());
}

#[tokio::test]
async fn a_failed_snapshot_leaves_the_sandbox_running() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    vmm.calls();

    // Freezing fails: nothing changed, the reserved layer is collected.
    vmm.fail("freeze");
    let err = manager.snapshot("box", Some("a".into())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(
        err.chain().contains("fake: freeze fails"),
        "{}",
        err.chain()
    );
    assert_eq!(vmm.calls(), ["stop", "freeze", "cont"]);
    assert_eq!(vmm.vms.lock().unwrap()[&101], VmStatus::Running);
    assert_eq!(
        fx.store()
            .get("box")
            .unwrap()
            .unwrap()
            .disk_layer
            .as_deref(),
        Some(L1)
    );
    assert_eq!(
        fx.store().layer_ids().unwrap(),
        HashSet::from([L1.to_string()])
    );
    assert!(manager.list_snapshots().await.unwrap().is_empty());
    assert!(snapshot_dir_entries(&fx).is_empty());

    // Saving fails after the freeze: the sandbox keeps its new layer.
    vmm.failing.lock().unwrap().clear();
    vmm.fail("save");
    let err = manager.snapshot("box", Some("a".into())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(vmm.calls(), ["stop", "freeze", "save", "cont"]);
    assert_eq!(vmm.vms.lock().unwrap()[&101], VmStatus::Running);
    let top = fx.store().get("box").unwrap().unwrap().disk_layer.unwrap();
    assert_ne!(top, L1);
    assert_eq!(
        vmm.disks.lock().unwrap()[&101],
        fx.layout().layer_file(&top)
    );
    assert_eq!(fx.store().layer_parents().unwrap()[&top], Some(L1.into()));
    assert!(manager.list_snapshots().await.unwrap().is_empty());
    assert!(snapshot_dir_entries(&fx).is_empty());
    assert_eq!(
        manager.get("box").await.unwrap().state,
        SandboxState::Running
    );

    // It works once the VMM does.
    vmm.failing.lock().unwrap().clear();
    manager.snapshot("box", Some("a".into())).await.unwrap();
}

/// A manager that died mid-snapshot leaves a `creating` record; the next
/// open asks QEMU where the disk is, records it, resumes the VM and removes
/// the remains.
#[tokio::test]
async fn an_interrupted_snapshot_is_repaired_at_open() {
    for frozen in [true, false] {
        let fx = Fixture::new();
        fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
        let record = fx.store().get("box").unwrap().unwrap();
        let snap = SnapshotRecord {
            id: "half".into(),
            dir: "00000000000000d1".into(),
            state: SnapshotState::Creating,
            sandbox: "box".into(),
            sandbox_id: id(1),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            image_path: record.image_path.clone(),
            env: BTreeMap::new(),
            accel: AccelKind::Tcg,
            layer: L1.into(),
            next_layer: Some(L2.into()),
            created_at: 2,
            parent_snapshot: None,
            state_format: StateFormat::Devices,
            golden_key: None,
            network: None,
        };
        fx.store().begin_snapshot(&snap).unwrap();
        let dir = fx.layout().snapshot_dir(&snap.dir);
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.state_file(), b"partial").unwrap();
        // QEMU created the new layer in both cases; it switched only in one.
        std::fs::write(fx.layout().layer_file(L2), b"QFI\xfbnew").unwrap();
        let vmm = FakeVmm::with(&[(101, VmStatus::Paused)]);
        let active = if frozen { L2 } else { L1 };
        vmm.disks
            .lock()
            .unwrap()
            .insert(101, fx.layout().layer_file(active));

        let manager = fx.open(vmm.clone()).await;
        let record = fx.store().get("box").unwrap().unwrap();
        assert_eq!(
            record.disk_layer.as_deref(),
            Some(active),
            "frozen={frozen}"
        );
        assert_eq!(vmm.vms.lock().unwrap()[&101], VmStatus::Running);
        assert!(manager.list_snapshots().await.unwrap().is_empty());
        assert!(fx.store().list_snapshots().unwrap().is_empty());
        assert!(snapshot_dir_entries(&fx).is_empty(), "frozen={frozen}");
        let mut want = vec![format!("{L1}.qcow2")];
        if frozen {
            want.push(format!("{L2}.qcow2"));
        }
        assert_eq!(layer_files(&fx), want);
    }
}

#[tokio::test]
async fn the_quota_applies_to_create_and_restore() {
    let mut fx = Fixture::new();
    fx.config.max_sandboxes = 2;
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    fx.seed("off", &id(2), SandboxState::Stopped, None);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    manager.snapshot("box", Some("s".into())).await.unwrap();

    let err = manager
        .create(SandboxSpec::named("third"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("max_sandboxes = 2"), "{err}");
    let err = manager.restore("s", "third").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(vmm.launched.lock().unwrap().is_empty());
    assert_eq!(manager.list().await.unwrap().len(), 2);

    // Below the limit, the (fake) launch is what fails; nothing is left.
    manager.destroy("off").await.unwrap();
    let layers_before = layer_files(&fx);
    let err = manager.restore("s", "third").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let launched = vmm.launched.lock().unwrap().clone();
    assert_eq!(launched.len(), 1);
    assert_eq!(launched[0].incoming, Some(StateFormat::Devices));
    assert_eq!(
        (launched[0].memory_mb, launched[0].hostname.as_str()),
        (256, "third")
    );
    assert!(manager.get("third").await.is_err());
    assert_eq!(layer_files(&fx), layers_before);
    assert!(!fx.ram_file(&manager_id(&launched[0])).exists());
    assert!(manager.get_snapshot("s").await.is_ok());
}

fn manager_id(spec: &VmSpec) -> String {
    spec.dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn restore_checks_its_arguments_first() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    manager.snapshot("box", Some("s".into())).await.unwrap();
    let cases = [
        ("nope", "new", ErrorKind::NotFound),
        ("s", "a/b", ErrorKind::InvalidArgument),
        ("s", "", ErrorKind::InvalidArgument),
        ("s", "box", ErrorKind::AlreadyExists),
    ];
    for (snapshot, name, kind) in cases {
        let err = manager.restore(snapshot, name).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{snapshot} -> {name}: {err}");
    }
    assert!(vmm.launched.lock().unwrap().is_empty());
    // A snapshot taken under another accelerator cannot run here.
    fx.store()
        .conn_for_tests()
        .execute("UPDATE snapshots SET accel = 'kvm'", [])
        .unwrap();
    let err = manager.restore("s", "new").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("under kvm"), "{err}");
    assert_eq!(manager.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn orphaned_files_are_swept_at_open() {
    let fx = Fixture::new();
    fx.seed_on_layer("run", &id(1), SandboxState::Running, Some(101), L1);
    fx.seed_on_layer("off", &id(2), SandboxState::Stopped, None, L2);
    // A stale RAM file of the stopped one, one of no sandbox at all, a
    // layer and a snapshot directory and lock file nobody records.
    std::fs::write(fx.ram_file(&id(2)), b"old").unwrap();
    std::fs::write(fx.ram_file(&id(9)), b"old").unwrap();
    std::fs::write(fx.ram_dir().join("not-ours.txt"), b"x").unwrap();
    std::fs::write(fx.layout().layer_file("00000000000000ff"), b"x").unwrap();
    std::fs::create_dir_all(fx.layout().snapshot_dir("00000000000000ee").path()).unwrap();
    std::fs::write(fx.layout().snapshot_lock("00000000000000ee"), b"").unwrap();
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let _manager = fx.open(vmm).await;
    assert_eq!(
        fx.files_in(&fx.ram_dir()),
        [format!("{}.ram", id(1)), "not-ours.txt".to_string()]
    );
    assert_eq!(
        layer_files(&fx),
        [format!("{L1}.qcow2"), format!("{L2}.qcow2")]
    );
    assert!(snapshot_dir_entries(&fx).is_empty());
    assert!(!fx.layout().lock_file(&id(9)).exists());
}

/// A VM that dies frees its RAM file when the death is noticed.
#[tokio::test]
async fn a_dead_vm_gives_back_its_memory() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    assert!(fx.ram_file(&id(1)).exists());
    vmm.set(101, None);
    assert_eq!(
        manager.get("box").await.unwrap().state,
        SandboxState::Crashed
    );
    assert!(!fx.ram_file(&id(1)).exists());
    let err = manager.snapshot("box", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}

/// A fork whose restores fail leaves no sandbox, layer or RAM file behind,
/// and starts no more than its concurrency bound after the first failure;
/// a fork of a sandbox deletes the snapshot it took.
#[tokio::test]
async fn a_failed_fork_leaves_nothing() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    manager.snapshot("box", Some("s".into())).await.unwrap();
    let layers_before = layer_files(&fx);

    for (count, prefix, kind) in [
        (0, "w", ErrorKind::InvalidArgument),
        (fork::MAX_FORKS + 1, "w", ErrorKind::InvalidArgument),
        (2, "a/b", ErrorKind::InvalidArgument),
    ] {
        let err = manager
            .fork(ForkSource::Snapshot("s".into()), count, prefix)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{count} {prefix}: {err}");
    }
    assert!(vmm.launched.lock().unwrap().is_empty());

    let err = manager
        .fork(ForkSource::Snapshot("s".into()), 10, "w")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let launched = vmm.launched.lock().unwrap().len();
    assert!((1..=4).contains(&launched), "{launched} launches");
    assert_eq!(manager.list().await.unwrap().len(), 1);
    assert_eq!(layer_files(&fx), layers_before);

    let err = manager
        .fork(ForkSource::Sandbox("box".into()), 2, "w")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let snapshots: Vec<String> = manager
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(snapshots, ["s"]);
    assert_eq!(manager.list().await.unwrap().len(), 1);
}

/// A rollback whose boot fails leaves the sandbox stopped on a new layer
/// over the snapshot's; a snapshot of another shape is refused first.
#[tokio::test]
async fn a_failed_rollback_leaves_the_sandbox_stopped_on_the_snapshot() {
    let fx = Fixture::new();
    fx.seed_on_layer("box", &id(1), SandboxState::Running, Some(101), L1);
    let vmm = FakeVmm::with(&[(101, VmStatus::Running)]);
    let manager = fx.open(vmm.clone()).await;
    manager.snapshot("box", Some("s".into())).await.unwrap();
    fx.store()
        .conn_for_tests()
        .execute(
            "INSERT INTO snapshots SELECT 'other', 'ffffffffffffffff', state, sandbox,
                    sandbox_id, vcpus, memory_mb * 2, image, image_path, env, accel, layer,
                    next_layer, created_at, parent_snapshot, state_format, golden_key, network
             FROM snapshots WHERE id = 's'",
            [],
        )
        .unwrap();
    let err = manager.rollback("box", "other").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(
        manager.get("box").await.unwrap().state,
        SandboxState::Running
    );
    let err = manager.rollback("box", "nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let on_before = fx.store().get("box").unwrap().unwrap().disk_layer.unwrap();
    let err = manager.rollback("box", "s").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert_eq!(vmm.killed.lock().unwrap().as_slice(), [101]);
    let record = fx.store().get("box").unwrap().unwrap();
    assert_eq!(
        (record.state, record.pid, record.from_snapshot.as_deref()),
        (SandboxState::Stopped, None, Some("s"))
    );
    assert_ne!(record.disk_layer.as_deref(), Some(on_before.as_str()));
    let parents = fx.store().layer_parents().unwrap();
    assert_eq!(
        parents[record.disk_layer.as_ref().unwrap()].as_deref(),
        Some(L1)
    );
    // The layer the sandbox wrote after the snapshot is gone.
    assert!(!parents.contains_key(&on_before));
}
