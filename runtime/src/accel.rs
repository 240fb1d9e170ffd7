//! The choice of accelerator, and what it implies for QEMU and the guest
//! kernel command line.
//!
//! KVM is used only when `/dev/kvm` opens read-write **and** the CPU flags in
//! `/proc/cpuinfo` show `vmx` or `svm`. The second condition matters on
//! KVM-PVM hosts: there `/dev/kvm` answers, but only specially built PVM
//! guest kernels run, and an ordinary one hangs silently. Everywhere else the
//! guest runs under TCG, which needs `tsc_early_khz=<host kHz> tsc=reliable`
//! on the kernel command line (without it about half of microvm boots hang
//! calibrating the clock) and a bounded translation cache.

use serde::{Deserialize, Serialize};

use crate::config::AccelMode;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("accel = kvm was configured but /dev/kvm cannot be opened read-write; use accel = auto or tcg")]
    KvmUnavailable,
}

/// What the host offers, gathered once by [`HostFacts::probe`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFacts {
    /// `/dev/kvm` opened read-write.
    pub kvm_device: bool,
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub hw_virt_flags: bool,
    /// The TSC frequency from "cpu MHz", in kHz.
    pub tsc_khz: Option<u64>,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let kvm_device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts::from_cpuinfo(kvm_device, &cpuinfo)
    }

    pub fn from_cpuinfo(kvm_device: bool, cpuinfo: &str) -> HostFacts {
        let hw_virt_flags = cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .filter_map(|line| line.split_once(':'))
            .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let tsc_khz = cpuinfo
            .lines()
            .filter(|line| line.starts_with("cpu MHz"))
            .filter_map(|line| line.split_once(':'))
            .find_map(|(_, mhz)| mhz.trim().parse::<f64>().ok())
            .filter(|mhz| mhz.is_finite() && *mhz > 0.0)
            .map(|mhz| (mhz * 1000.0).round() as u64);
        HostFacts {
            kvm_device,
            hw_virt_flags,
            tsc_khz,
        }
    }
}

/// The accelerator's name, as recorded and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }

    pub fn parse(s: &str) -> Option<AccelKind> {
        match s {
            "kvm" => Some(AccelKind::Kvm),
            "tcg" => Some(AccelKind::Tcg),
            _ => None,
        }
    }
}

/// The chosen accelerator with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg {
        tb_size_mb: u32,
        /// Host TSC in kHz, passed to the guest; absent when unknown.
        tsc_khz: Option<u64>,
    },
}

impl Accel {
    /// Decides from the configured mode and the host's facts.
    pub fn choose(mode: AccelMode, host: &HostFacts, tb_size_mb: u32) -> Result<Accel, AccelError> {
        let tcg = Accel::Tcg {
            tb_size_mb,
            tsc_khz: host.tsc_khz,
        };
        match mode {
            AccelMode::Tcg => Ok(tcg),
            AccelMode::Kvm if host.kvm_device => {
                if !host.hw_virt_flags {
                    tracing::warn!(
                        "accel = kvm forced on a host without vmx/svm; ordinary guests may hang"
                    );
                }
                Ok(Accel::Kvm)
            }
            AccelMode::Kvm => Err(AccelError::KvmUnavailable),
            AccelMode::Auto if host.kvm_device && host.hw_virt_flags => Ok(Accel::Kvm),
            AccelMode::Auto => Ok(tcg),
        }
    }

    pub fn kind(&self) -> AccelKind {
        match self {
            Accel::Kvm => AccelKind::Kvm,
            Accel::Tcg { .. } => AccelKind::Tcg,
        }
    }

    /// QEMU arguments selecting the accelerator (and CPU model).
    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            Accel::Tcg { tb_size_mb, .. } => {
                vec!["-accel".into(), format!("tcg,tb-size={tb_size_mb}")]
            }
        }
    }

    /// Guest kernel arguments this accelerator needs.
    pub fn kernel_args(&self) -> Vec<String> {
        match self {
            Accel::Kvm => Vec::new(),
            Accel::Tcg {
                tsc_khz: Some(khz), ..
            } => {
                vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()]
            }
            Accel::Tcg { tsc_khz: None, .. } => vec!["tsc=reliable".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2596.140\n\
        flags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n\nprocessor\t: 1\ncpu MHz\t\t: 2596.140\n";
    const VMX_CPUINFO: &str = "processor\t: 0\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu vmx sse2\n";

    #[test]
    fn reads_cpuinfo() {
        let pvm = HostFacts::from_cpuinfo(true, PVM_CPUINFO);
        assert!(!pvm.hw_virt_flags);
        assert_eq!(pvm.tsc_khz, Some(2_596_140));
        let vmx = HostFacts::from_cpuinfo(true, VMX_CPUINFO);
        assert!(vmx.hw_virt_flags);
        assert!(HostFacts::from_cpuinfo(false, "flags : svm\n").hw_virt_flags);
        assert_eq!(
            HostFacts::from_cpuinfo(false, "cpu MHz : nonsense\n").tsc_khz,
            None
        );
    }

    #[test]
    fn auto_uses_kvm_only_with_device_and_flags() {
        let cases = [
            (true, VMX_CPUINFO, AccelKind::Kvm),
            (false, VMX_CPUINFO, AccelKind::Tcg),
            (true, PVM_CPUINFO, AccelKind::Tcg),
            (false, PVM_CPUINFO, AccelKind::Tcg),
        ];
        for (device, cpuinfo, want) in cases {
            let host = HostFacts::from_cpuinfo(device, cpuinfo);
            assert_eq!(
                Accel::choose(AccelMode::Auto, &host, 64).unwrap().kind(),
                want,
                "{host:?}"
            );
        }
    }

    #[test]
    fn explicit_modes_override() {
        let pvm = HostFacts::from_cpuinfo(true, PVM_CPUINFO);
        assert_eq!(Accel::choose(AccelMode::Kvm, &pvm, 64).unwrap(), Accel::Kvm);
        let vmx = HostFacts::from_cpuinfo(true, VMX_CPUINFO);
        assert_eq!(
            Accel::choose(AccelMode::Tcg, &vmx, 64).unwrap().kind(),
            AccelKind::Tcg
        );
        let none = HostFacts::from_cpuinfo(false, VMX_CPUINFO);
        assert!(matches!(
            Accel::choose(AccelMode::Kvm, &none, 64),
            Err(AccelError::KvmUnavailable)
        ));
    }

    #[test]
    fn tcg_args_carry_tsc_and_cache_size() {
        let host = HostFacts::from_cpuinfo(false, PVM_CPUINFO);
        let tcg = Accel::choose(AccelMode::Auto, &host, 64).unwrap();
        assert_eq!(tcg.qemu_args(), ["-accel", "tcg,tb-size=64"]);
        assert_eq!(tcg.kernel_args(), ["tsc_early_khz=2596140", "tsc=reliable"]);
        assert_eq!(Accel::Kvm.qemu_args(), ["-accel", "kvm", "-cpu", "host"]);
        assert!(Accel::Kvm.kernel_args().is_empty());
    }
}
