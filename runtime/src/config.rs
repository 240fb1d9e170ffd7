//! Runtime configuration: where artifacts and state live, which QEMU to run,
//! resource defaults and limits.
//!
//! One serde schema serves the config file and programmatic use: it is
//! parsed strictly (`deny_unknown_fields`), every field has a default, and
//! [`RuntimeConfig::validate`] checks the whole thing before any use.
//!
//! Defaults hang off `ARRAKIS_HOME` (default `$HOME/.cache/arrakis`), the
//! directory `scripts/setup` fills with artifacts: the kernel and initramfs
//! in `artifacts/`, base images in `images/<name>/rootfs.ext4`. State (the
//! database and one directory per sandbox) defaults to `$ARRAKIS_HOME/state`
//! rather than `/var/lib/arrakis` because arrakis is not installed as a
//! system package yet; an installation sets `ARRAKIS_STATE_DIR` or
//! `state_dir`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::layout::StateLayout;
use crate::network::{EgressPolicy, NetworkConfig};
use crate::spec;

/// Smallest guest memory accepted, in MiB: below this the kernel and the
/// agent do not fit.
pub const MIN_MEMORY_MB: u32 = 64;

/// Most vCPUs a `microvm` accepts.
const VCPU_CEILING: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when this host can run ordinary guests under it, TCG otherwise
    /// (see [`crate::accel`]).
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelMode::Auto),
            "kvm" => Ok(AccelMode::Kvm),
            "tcg" => Ok(AccelMode::Tcg),
            _ => Err("expected one of: auto, kvm, tcg".to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Database, sandbox directories and lock files.
    pub state_dir: PathBuf,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Initramfs whose `/init` is the guest agent.
    pub initramfs: PathBuf,
    /// Base images, as `<images_dir>/<name>/rootfs.ext4`.
    pub images_dir: PathBuf,
    /// Image used when a sandbox names none.
    pub default_image: String,
    /// Free space an image pulled, imported or built gets in its ext4 disk beyond its
    /// content, which is what its sandboxes can write. The file is sparse.
    pub image_free_mb: u64,
    pub qemu_binary: PathBuf,
    pub qemu_img_binary: PathBuf,
    pub accel: AccelMode,
    /// TCG translation cache size; QEMU's default (1 GiB) costs ~90 MiB RSS per VM.
    pub tcg_tb_size_mb: u32,
    pub default_vcpus: u32,
    pub default_memory_mb: u32,
    pub max_vcpus: u32,
    pub max_memory_mb: u32,
    /// How long a boot may take until the agent answers.
    pub boot_timeout_secs: u64,
    /// How long `stop` waits for the guest to power off before forcing it.
    pub stop_timeout_secs: u64,
    /// Appended to the guest kernel command line, one argument per entry.
    pub extra_kernel_args: Vec<String>,
    /// Where the guest RAM files of running VMs live (see
    /// [`RuntimeConfig::resolved_ram_dir`]). Every VM's memory is a
    /// `memory-backend-file` shared with QEMU, so a snapshot can skip it in
    /// the migration stream and copy the file instead; on tmpfs guest writes
    /// never reach a disk. `None` (the default): a directory on `/dev/shm`
    /// named after a hash of `state_dir`, so two state directories never
    /// share one (reconciliation removes RAM files no sandbox owns).
    pub ram_dir: Option<PathBuf>,
    /// Most sandboxes (in any state) that may exist in this state directory;
    /// `create` and `restore` beyond it fail with
    /// [`crate::ErrorKind::ResourceExhausted`]. 0: unlimited.
    pub max_sandboxes: u32,
    /// Create sandboxes by restoring a golden snapshot of the same image
    /// and shape, kept the first time one boots (see `manager::golden`),
    /// instead of booting each. Off: every create boots.
    pub warm_start: bool,
    /// How sandboxes are networked (see [`crate::network`]).
    pub network: NetworkConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig::with_home(&default_home(|var| std::env::var(var).ok()))
    }
}

/// `$ARRAKIS_HOME`, else `$HOME/.cache/arrakis`, else `/var/lib/arrakis`.
fn default_home(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(home) = env("ARRAKIS_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    match env("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Path::new(&home).join(".cache/arrakis"),
        None => PathBuf::from("/var/lib/arrakis"),
    }
}

impl RuntimeConfig {
    /// The defaults for an `ARRAKIS_HOME` of `home`.
    pub fn with_home(home: &Path) -> Self {
        RuntimeConfig {
            state_dir: home.join("state"),
            kernel: home.join("artifacts/vmlinuz"),
            initramfs: home.join("artifacts/initramfs.cpio"),
            images_dir: home.join("images"),
            default_image: "default".to_string(),
            image_free_mb: 2048,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img_binary: PathBuf::from("qemu-img"),
            accel: AccelMode::Auto,
            tcg_tb_size_mb: 64,
            default_vcpus: 1,
            default_memory_mb: 256,
            max_vcpus: 16,
            max_memory_mb: 16384,
            boot_timeout_secs: 60,
            stop_timeout_secs: 10,
            extra_kernel_args: Vec::new(),
            ram_dir: None,
            max_sandboxes: 0,
            warm_start: true,
            network: NetworkConfig::default(),
        }
    }

    /// The defaults with the environment applied: `ARRAKIS_HOME`,
    /// `ARRAKIS_STATE_DIR`, `ARRAKIS_RAM_DIR`, `ARRAKIS_ACCEL` (`auto`,
    /// `kvm`, `tcg`), `ARRAKIS_WARM_START` (`true`, `false`),
    /// `ARRAKIS_NETWORK_MODE` (`auto`, `user`, `bridge`),
    /// `ARRAKIS_NETWORK_EGRESS` (`allow`, `deny`, or CIDRs separated by
    /// commas: the default egress policy).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with(|var| std::env::var(var).ok())
    }

    fn from_env_with(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = RuntimeConfig::with_home(&default_home(&env));
        if let Some(dir) = env("ARRAKIS_STATE_DIR").filter(|v| !v.is_empty()) {
            config.state_dir = PathBuf::from(dir);
        }
        if let Some(dir) = env("ARRAKIS_RAM_DIR").filter(|v| !v.is_empty()) {
            config.ram_dir = Some(PathBuf::from(dir));
        }
        if let Some(value) = env("ARRAKIS_WARM_START").filter(|v| !v.is_empty()) {
            config.warm_start = match value.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ConfigError::Env {
                        var: "ARRAKIS_WARM_START",
                        value: value.clone(),
                        message: "expected true or false".to_string(),
                    })
                }
            };
        }
        if let Some(value) = env("ARRAKIS_NETWORK_MODE").filter(|v| !v.is_empty()) {
            config.network.mode = value.parse().map_err(|message| ConfigError::Env {
                var: "ARRAKIS_NETWORK_MODE",
                value: value.clone(),
                message,
            })?;
        }
        if let Some(value) = env("ARRAKIS_NETWORK_EGRESS").filter(|v| !v.is_empty()) {
            config.network.egress =
                EgressPolicy::parse_list(&value).map_err(|message| ConfigError::Env {
                    var: "ARRAKIS_NETWORK_EGRESS",
                    value: value.clone(),
                    message,
                })?;
        }
        if let Some(value) = env("ARRAKIS_ACCEL").filter(|v| !v.is_empty()) {
            config.accel = value.parse().map_err(|message| ConfigError::Env {
                var: "ARRAKIS_ACCEL",
                value: value.clone(),
                message,
            })?;
        }
        Ok(config)
    }

    /// [`RuntimeConfig::image_free_mb`] in bytes.
    pub fn image_free_bytes(&self) -> u64 {
        self.image_free_mb.saturating_mul(1 << 20)
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }

    /// `ram_dir`, or by default `/dev/shm/arrakis-<hash of state_dir>`.
    pub fn resolved_ram_dir(&self) -> PathBuf {
        match &self.ram_dir {
            Some(dir) => dir.clone(),
            None => default_ram_dir(&self.state_dir),
        }
    }

    /// Checks every field; the first problem found is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_paths()?;
        self.validate_limits()?;
        self.network
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        spec::validate_image_name(&self.default_image)
            .map_err(|message| invalid("default_image", message))?;
        for arg in &self.extra_kernel_args {
            if arg.is_empty()
                || arg
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"')
            {
                return Err(invalid(
                    "extra_kernel_args",
                    format!("{arg:?} is not one kernel argument: no spaces, quotes or control characters"),
                ));
            }
        }
        Ok(())
    }

    fn validate_paths(&self) -> Result<(), ConfigError> {
        let ram_dir = self.resolved_ram_dir();
        for (field, path) in [
            ("state_dir", &self.state_dir),
            ("kernel", &self.kernel),
            ("initramfs", &self.initramfs),
            ("images_dir", &self.images_dir),
            ("ram_dir", &ram_dir),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        let longest = StateLayout::new(&self.state_dir).longest_socket_path();
        if longest.as_os_str().len() > StateLayout::MAX_SOCKET_PATH {
            return Err(invalid(
                "state_dir",
                format!(
                    "{} is too long: sandbox sockets like {} must stay under {} bytes",
                    self.state_dir.display(),
                    longest.display(),
                    StateLayout::MAX_SOCKET_PATH
                ),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        if !(1..=VCPU_CEILING).contains(&self.max_vcpus) {
            return Err(invalid("max_vcpus", format!("must be 1..={VCPU_CEILING}")));
        }
        if !(1..=self.max_vcpus).contains(&self.default_vcpus) {
            return Err(invalid(
                "default_vcpus",
                format!("must be 1..={} (max_vcpus)", self.max_vcpus),
            ));
        }
        if self.max_memory_mb < MIN_MEMORY_MB {
            return Err(invalid(
                "max_memory_mb",
                format!("must be at least {MIN_MEMORY_MB}"),
            ));
        }
        if !(MIN_MEMORY_MB..=self.max_memory_mb).contains(&self.default_memory_mb) {
            return Err(invalid(
                "default_memory_mb",
                format!(
                    "must be {MIN_MEMORY_MB}..={} (max_memory_mb)",
                    self.max_memory_mb
                ),
            ));
        }
        if !(1..=4096).contains(&self.tcg_tb_size_mb) {
            return Err(invalid("tcg_tb_size_mb", "must be 1..=4096".to_string()));
        }
        if !(1..=3600).contains(&self.boot_timeout_secs) {
            return Err(invalid("boot_timeout_secs", "must be 1..=3600".to_string()));
        }
        if !(1..=600).contains(&self.stop_timeout_secs) {
            return Err(invalid("stop_timeout_secs", "must be 1..=600".to_string()));
        }
        Ok(())
    }
}

/// `/dev/shm/arrakis-<16 hex digits>`: FNV-1a of the state directory's
/// path (a stable name, not a secret; the directory is created 0700).
pub fn default_ram_dir(state_dir: &Path) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in state_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    PathBuf::from(format!("/dev/shm/arrakis-{hash:016x}"))
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults_hang_off_home_and_validate() {
        let config = RuntimeConfig::from_env_with(env_of(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(config.state_dir, Path::new("/home/u/.cache/arrakis/state"));
        assert_eq!(
            config.kernel,
            Path::new("/home/u/.cache/arrakis/artifacts/vmlinuz")
        );
        assert_eq!(
            config.initramfs,
            Path::new("/home/u/.cache/arrakis/artifacts/initramfs.cpio")
        );
        assert_eq!(
            config.images_dir,
            Path::new("/home/u/.cache/arrakis/images")
        );
        assert_eq!(config.accel, AccelMode::Auto);
        assert_eq!((config.default_vcpus, config.default_memory_mb), (1, 256));
        config.validate().unwrap();
    }

    #[test]
    fn ram_dirs_follow_the_state_dir() {
        let mut config = RuntimeConfig::with_home(Path::new("/h"));
        let first = config.resolved_ram_dir();
        assert!(first.starts_with("/dev/shm"), "{}", first.display());
        assert_eq!(first, default_ram_dir(Path::new("/h/state")));
        config.state_dir = PathBuf::from("/other/state");
        assert_ne!(config.resolved_ram_dir(), first);
        config.ram_dir = Some(PathBuf::from("/run/arrakis-ram"));
        assert_eq!(config.resolved_ram_dir(), Path::new("/run/arrakis-ram"));
        assert_eq!(config.max_sandboxes, 0);
    }

    #[test]
    fn env_overrides_apply() {
        let config = RuntimeConfig::from_env_with(env_of(&[
            ("HOME", "/home/u"),
            ("ARRAKIS_HOME", "/opt/ar"),
            ("ARRAKIS_STATE_DIR", "/var/lib/ar"),
            ("ARRAKIS_ACCEL", "tcg"),
            ("ARRAKIS_RAM_DIR", "/run/ar-ram"),
            ("ARRAKIS_NETWORK_MODE", "user"),
            ("ARRAKIS_NETWORK_EGRESS", "deny"),
        ]))
        .unwrap();
        assert_eq!(config.network.egress, EgressPolicy::DenyAll);
        let err =
            RuntimeConfig::from_env_with(env_of(&[("ARRAKIS_NETWORK_EGRESS", "10.0.0.0/40")]))
                .unwrap_err();
        assert!(err.to_string().contains("ARRAKIS_NETWORK_EGRESS"), "{err}");
        assert_eq!(config.network.mode, crate::network::NetModeConfig::User);
        assert_eq!(config.resolved_ram_dir(), Path::new("/run/ar-ram"));
        assert_eq!(config.kernel, Path::new("/opt/ar/artifacts/vmlinuz"));
        assert_eq!(config.state_dir, Path::new("/var/lib/ar"));
        assert_eq!(config.accel, AccelMode::Tcg);
    }

    #[test]
    fn bad_accel_env_names_the_variable() {
        let err = RuntimeConfig::from_env_with(env_of(&[("ARRAKIS_ACCEL", "hvf")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ARRAKIS_ACCEL") && text.contains("auto, kvm, tcg"),
            "{text}"
        );
    }

    #[test]
    fn parsing_is_strict_and_defaulted() {
        let config: RuntimeConfig =
            serde_json::from_str(r#"{"default_memory_mb": 512, "accel": "kvm"}"#).unwrap();
        assert_eq!(config.default_memory_mb, 512);
        assert_eq!(config.accel, AccelMode::Kvm);
        assert_eq!(config.default_vcpus, 1);
        let err = serde_json::from_str::<RuntimeConfig>(r#"{"memory": 512}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let base = RuntimeConfig::with_home(Path::new("/h"));
        type Mutation = Box<dyn Fn(&mut RuntimeConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("default_vcpus", Box::new(|c| c.default_vcpus = 0)),
            ("default_vcpus", Box::new(|c| c.default_vcpus = 17)),
            ("max_vcpus", Box::new(|c| c.max_vcpus = 0)),
            ("default_memory_mb", Box::new(|c| c.default_memory_mb = 32)),
            ("max_memory_mb", Box::new(|c| c.max_memory_mb = 10)),
            (
                "state_dir",
                Box::new(|c| c.state_dir = PathBuf::from("relative")),
            ),
            (
                "state_dir",
                Box::new(|c| c.state_dir = PathBuf::from(format!("/{}", "x".repeat(120)))),
            ),
            ("kernel", Box::new(|c| c.kernel = PathBuf::from("vmlinuz"))),
            (
                "default_image",
                Box::new(|c| c.default_image = "../etc".into()),
            ),
            (
                "extra_kernel_args",
                Box::new(|c| c.extra_kernel_args = vec!["a b".into()]),
            ),
            ("boot_timeout_secs", Box::new(|c| c.boot_timeout_secs = 0)),
            ("tcg_tb_size_mb", Box::new(|c| c.tcg_tb_size_mb = 0)),
            (
                "ram_dir",
                Box::new(|c| c.ram_dir = Some(PathBuf::from("shm"))),
            ),
        ];
        for (field, mutate) in cases {
            let mut config = base.clone();
            mutate(&mut config);
            match config.validate() {
                Err(ConfigError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected an error on {field}, got {other:?}"),
            }
        }
    }
}
