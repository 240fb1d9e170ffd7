//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use std::time::Duration;

use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::network::{EgressPolicy, NetModeConfig};
use arrakis_runtime::{ExecEvent, Manager, RuntimeConfig};

/// What the benchmarks' guests print to show they are up.
pub const MARKER: &str = "ARRAKIS-BENCH-MARKER";

pub fn argv_request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(argv.iter().map(|s| s.to_string()).collect()),
        ..ExecRequest::default()
    }
}

/// Runs `echo` in sandbox `name` and returns at the first byte of its
/// output.
pub async fn first_output(manager: &Manager, name: &str) -> anyhow::Result<()> {
    let agent = manager.agent(name).await?;
    let mut session = agent
        .exec_stream(argv_request(&["/bin/echo", MARKER]))
        .await?;
    loop {
        match session.next().await? {
            ExecEvent::Stdout(_) => return Ok(()),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(status) => anyhow::bail!("echo exited without output: {status:?}"),
        }
    }
}

/// User-mode networking without egress: these benchmarks measure boots
/// and snapshots, and must not make bridges or rules in the host's own
/// namespace (benches/network.rs in the runtime measures networking).
pub fn quiet_network(config: &mut RuntimeConfig) {
    config.network.mode = NetModeConfig::User;
    config.network.egress = EgressPolicy::DenyAll;
}

pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}

pub fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// "min-max ms" of sorted times.
pub fn spread(sorted: &[Duration]) -> String {
    format!(
        "{:.0}-{:.0} ms",
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1])
    )
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
