//! Task metrics (`ctr task metrics`, `crictl stats`), as cgroup v2 metrics:
//! containerd and the CRI plugin decode `io.containerd.cgroups.v2.Metrics`.
//!
//! A container here is a VM, so the numbers mean the VM:
//! - CPU: what QEMU has used on the host (its user and system time), which
//!   is what the container costs the node, emulation included;
//! - memory: the guest's own view (`MemTotal - MemAvailable` of its
//!   `/proc/meminfo`), with the VM's memory as the limit; QEMU's RSS would
//!   count the page cache and the shared RAM file's touched pages;
//! - pids: the guest's scheduling entities (`/proc/loadavg`).
//!
//! The guest's numbers come through the agent; a paused VM cannot answer,
//! so its metrics carry the CPU and the limit only.

use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::protobuf::MessageField;

/// The guest's side of the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestStats {
    pub memory_total: u64,
    pub memory_used: u64,
    pub tasks: u64,
}

/// QEMU's CPU time, microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub user_usec: u64,
    pub system_usec: u64,
}

/// The metrics of a VM with `memory_mb` of memory.
pub fn metrics(cpu: Option<HostCpu>, guest: Option<GuestStats>, memory_mb: u32) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cpu) = cpu {
        let mut stat = CPUStat::new();
        stat.user_usec = cpu.user_usec;
        stat.system_usec = cpu.system_usec;
        stat.usage_usec = cpu.user_usec + cpu.system_usec;
        metrics.cpu = MessageField::some(stat);
    }
    let mut memory = MemoryStat::new();
    memory.usage_limit = u64::from(memory_mb) * 1024 * 1024;
    if let Some(guest) = guest {
        memory.usage = guest.memory_used;
        let mut pids = PidsStat::new();
        pids.current = guest.tasks;
        metrics.pids = MessageField::some(pids);
    }
    metrics.memory = MessageField::some(memory);
    metrics
}

/// The CPU time of process `pid` from `/proc/<pid>/stat`.
pub fn host_cpu(pid: u32) -> Option<HostCpu> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf(3) takes a constant and reads no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_stat(&text, u64::try_from(ticks).ok().filter(|t| *t > 0)?)
}

/// utime and stime (fields 14 and 15; the command name, field 2, is in
/// parentheses and may hold spaces) in microseconds.
fn parse_stat(text: &str, ticks_per_sec: u64) -> Option<HostCpu> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let ticks = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let usec = |t: u64| t.saturating_mul(1_000_000) / ticks_per_sec;
    Some(HostCpu {
        user_usec: usec(ticks(14)?),
        system_usec: usec(ticks(15)?),
    })
}

/// The guest's numbers from its `/proc/meminfo` and `/proc/loadavg`.
pub fn parse_guest(meminfo: &str, loadavg: &str) -> Option<GuestStats> {
    let kib = |key: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable")?;
    // The fourth field is `running/total`.
    let tasks = loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()?;
    Some(GuestStats {
        memory_total: total * 1024,
        memory_used: total.saturating_sub(available) * 1024,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::MessageDyn;

    #[test]
    fn cpu_time_comes_from_utime_and_stime() {
        let stat =
            "4242 (qemu-system-x86 (x)) S 1 4242 4242 0 -1 4194624 100 0 0 0 250 130 0 0 20 0 3 0";
        assert_eq!(
            parse_stat(stat, 100),
            Some(HostCpu {
                user_usec: 2_500_000,
                system_usec: 1_300_000
            })
        );
        assert_eq!(parse_stat("garbage", 100), None);
        let own = host_cpu(std::process::id()).expect("our own stat");
        assert!(own.user_usec + own.system_usec < 3_600_000_000);
    }

    #[test]
    fn guest_memory_is_total_minus_available() {
        let meminfo = "MemTotal:         254000 kB\nMemFree:          100000 kB\nMemAvailable:     200000 kB\n";
        let guest = parse_guest(meminfo, "0.00 0.01 0.00 1/57 321\n").unwrap();
        assert_eq!(guest.memory_total, 254_000 * 1024);
        assert_eq!(guest.memory_used, 54_000 * 1024);
        assert_eq!(guest.tasks, 57);
        assert_eq!(parse_guest("MemTotal: 1 kB\n", "0 0 0 1/2 3"), None);
    }

    #[test]
    fn metrics_are_cgroup_v2_with_the_vm_memory_as_limit() {
        let guest = GuestStats {
            memory_total: 1,
            memory_used: 7 << 20,
            tasks: 9,
        };
        let cpu = HostCpu {
            user_usec: 5,
            system_usec: 6,
        };
        let metrics = metrics(Some(cpu), Some(guest), 256);
        assert_eq!(
            metrics.descriptor_dyn().full_name(),
            "io.containerd.cgroups.v2.Metrics"
        );
        assert_eq!(metrics.cpu.usage_usec, 11);
        assert_eq!(metrics.memory.usage, 7 << 20);
        assert_eq!(metrics.memory.usage_limit, 256 << 20);
        assert_eq!(metrics.pids.current, 9);
        let paused = super::metrics(Some(cpu), None, 256);
        assert!(paused.pids.is_none());
        assert_eq!(paused.memory.usage_limit, 256 << 20);
    }
}
