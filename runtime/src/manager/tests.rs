//! The manager against a fake VMM: reconciliation at open and on list,
//! transition checks, and cleanup after a failed create. No VM boots here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::*;
use crate::accel::HostFacts;
use crate::error::ErrorKind;
use crate::store::Store;
use crate::vmm::{VmSpec, VmStatus, VmmError};

/// Pretends processes with the listed pids run in the listed states.
#[derive(Default)]
struct FakeVmm {
    vms: Mutex<HashMap<u32, VmStatus>>,
    killed: Mutex<Vec<u32>>,
    /// Every spec `launch` was called with.
    launched: Mutex<Vec<VmSpec>>,
}

impl FakeVmm {
    fn with(vms: &[(u32, VmStatus)]) -> Arc<FakeVmm> {
        Arc::new(FakeVmm {
            vms: Mutex::new(vms.iter().cloned().collect()),
            killed: Mutex::default(),
            launched: Mutex::default(),
        })
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
        self.set(vm.pid, Some(VmStatus::Paused));
        Ok(())
    }

    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.set(vm.pid, Some(VmStatus::Running));
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
        config.accel = crate::config::AccelMode::Tcg;
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

    /// Records a sandbox directly in the store, with its directory.
    fn seed(&self, name: &str, id: &str, state: SandboxState, pid: Option<u32>) {
        let layout = self.layout();
        std::fs::create_dir_all(layout.sandbox_dir(id).path()).unwrap();
        let store = Store::open(&layout.database()).unwrap();
        store
            .insert(&SandboxRecord {
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
            })
            .unwrap();
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
        text.starts_with("invalid image: no image named \"ubuntu\""),
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
