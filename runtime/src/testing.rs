//! Support for tests that boot real VMs (behind the `testing` feature): a
//! temporary state directory over the real artifacts, a guard that kills
//! every QEMU started under it even when the test fails, and a runner that
//! bounds the test in time.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::network::{EgressPolicy, NetModeConfig, PortRange};
use crate::{Manager, RuntimeConfig};

/// A temporary state directory on the artifacts of `scripts/setup`, with
/// its own temporary RAM directory (on `/dev/shm` when there is one).
pub struct VmTestEnv {
    pub config: RuntimeConfig,
    _state: tempfile::TempDir,
    _ram: tempfile::TempDir,
}

impl VmTestEnv {
    /// Fails the test, naming what is missing, when the kernel, initramfs or
    /// default image are absent.
    pub fn new() -> VmTestEnv {
        let state = tempfile::Builder::new()
            .prefix("arrakis-vm-")
            .tempdir()
            .expect("temp dir");
        let ram = tempfile::Builder::new()
            .prefix("arrakis-vm-ram-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::Builder::new().prefix("arrakis-vm-ram-").tempdir())
            .expect("temp RAM dir");
        let mut config = RuntimeConfig::from_env().expect("runtime config from the environment");
        config.state_dir = state.path().join("state");
        config.ram_dir = Some(ram.path().to_path_buf());
        config.boot_timeout_secs = 120;
        // Tests boot what they create unless they test warm starts.
        config.warm_start = false;
        // No root-only host changes, and guests in tests reach nothing but
        // their forwards (tests of bridge mode or egress say otherwise).
        config.network.mode = NetModeConfig::User;
        config.network.egress = EgressPolicy::DenyAll;
        config.network.host_ports = private_port_window();
        let image = config
            .images_dir
            .join(&config.default_image)
            .join("rootfs.ext4");
        let missing: Vec<String> = [
            ("kernel", &config.kernel),
            ("initramfs", &config.initramfs),
            ("default image", &image),
        ]
        .iter()
        .filter(|(_, path)| !path.is_file())
        .map(|(what, path)| format!("{what} ({})", path.display()))
        .collect();
        assert!(
            missing.is_empty(),
            "VM test artifacts are missing: {}. Run scripts/setup (or set ARRAKIS_HOME) first.",
            missing.join(", ")
        );
        VmTestEnv {
            config,
            _state: state,
            _ram: ram,
        }
    }

    pub async fn manager(&self) -> Manager {
        Manager::open(self.config.clone())
            .await
            .expect("open the manager")
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.config.state_dir.join("sandboxes")
    }

    /// Disk layer files (`<state>/layers/*.qcow2`).
    pub fn layers_dir(&self) -> PathBuf {
        self.config.state_dir.join("layers")
    }

    /// Snapshot directories and their lock files.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.config.state_dir.join("snapshots")
    }

    pub fn ram_dir(&self) -> PathBuf {
        self.config.resolved_ram_dir()
    }

    /// Names of the entries of `dir`, sorted (empty if it is missing).
    pub fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Default for VmTestEnv {
    fn default() -> Self {
        VmTestEnv::new()
    }
}

impl Drop for VmTestEnv {
    fn drop(&mut self) {
        for pid in pids_under(&self.sandboxes_dir()) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Pids of live processes whose command line mentions `dir`.
pub fn pids_under(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Runs `body` on a multi-threaded runtime, failing the test after `limit`.
/// Logs at `log_filter` (unless `RUST_LOG` says otherwise) go to the test's
/// captured output, shown when it fails.
pub fn run_bounded<F: Future<Output = ()>>(limit: Duration, log_filter: &str, body: F) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| log_filter.into()),
        )
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async {
            tokio::time::timeout(limit, body)
                .await
                .expect("test exceeded its time bound")
        });
}

/// A window of 200 host ports picked at random in 20000-59999, so test
/// environments running at once (each its own state directory, so its own
/// leases) rarely pick the same ports.
pub fn private_port_window() -> PortRange {
    let mut byte = [0u8; 2];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut byte))
        .map(|()| u16::from_le_bytes(byte))
        .unwrap_or(0);
    let first = 20000 + (random % 200) * 200;
    PortRange {
        first,
        last: first + 199,
    }
}
