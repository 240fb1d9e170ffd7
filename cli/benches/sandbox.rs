//! Benchmarks of the core paths, each against a baseline measured in the
//! same run on the same machine (absolute times here are noisy):
//!
//! - cold start: `Manager::create` + first output of `echo`, against bare
//!   QEMU booting the same kernel and rootfs to a marker (`init=/bin/echo`);
//! - exec round trip of `true` and `echo hi`, against the guest's own cost
//!   of spawning the same program (timed inside the guest);
//! - host memory (RSS, PSS) of one idle 256 MiB sandbox;
//! - upload and download of a 100 MiB file.
//!
//! Run with `cargo bench -p arrakis-cli --bench sandbox` (or `scripts/bench`);
//! `ARRAKIS_BENCH_RUNS` sets the number of boots per side (default 5).

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::{AccelKind, ExecOptions, Manager, RuntimeConfig, SandboxSpec, WriteOptions};

mod common;

use common::{argv_request, first_output, median, memory_kib, ms, spread, MARKER};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("ARRAKIS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = tempfile::Builder::new().prefix("arrakis-bench").tempdir()?;
    let mut config = RuntimeConfig::from_env()?;
    config.state_dir = state.path().to_path_buf();
    // Cold starts are what this measures (benches/snapshot.rs: warm ones).
    config.warm_start = false;
    common::quiet_network(&mut config);
    runtime.block_on(bench(config, runs))
}

async fn bench(config: RuntimeConfig, runs: usize) -> anyhow::Result<()> {
    let manager = Manager::open(config.clone()).await?;
    let accel = manager.accel().kind();
    println!("arrakis benchmarks: accelerator {accel:?}, {runs} runs per side, medians");
    println!();

    let mut baseline = Vec::new();
    let mut ours = Vec::new();
    for i in 0..runs {
        baseline.push(bare_qemu_boot(&config, accel)?);
        ours.push(cold_start(&manager, &format!("cold{i}")).await?);
    }
    let (base, mine) = (median(&mut baseline), median(&mut ours));
    println!("cold start to first output (median, min-max)");
    println!(
        "  bare QEMU, same kernel + rootfs, to marker  {:>9.1} ms  {}",
        ms(base),
        spread(&baseline)
    );
    println!(
        "  arrakis create + exec echo                   {:>9.1} ms  {}",
        ms(mine),
        spread(&ours)
    );
    println!(
        "  overhead of our stack                        {:>+9.1} %",
        (mine.as_secs_f64() / base.as_secs_f64() - 1.0) * 100.0
    );
    println!();

    let info = manager.create(SandboxSpec::named("steady")).await?;
    let agent = manager.agent("steady").await?;
    for (label, argv) in [
        ("true", vec!["/bin/true"]),
        ("echo hi", vec!["/bin/echo", "hi"]),
    ] {
        let mut times = Vec::new();
        for _ in 0..60 {
            let start = Instant::now();
            let out = agent
                .exec(argv_request(&argv), ExecOptions::default())
                .await?;
            times.push(start.elapsed());
            anyhow::ensure!(out.status.code == Some(0), "{label} failed: {out:?}");
        }
        let round_trip = median(&mut times);
        let spawn = guest_spawn_cost(&agent, &argv).await?;
        println!("exec round trip of `{label}`");
        println!(
            "  through the agent                            {:>9.2} ms",
            ms(round_trip)
        );
        println!(
            "  guest's own fork+exec+wait                   {:>9.2} ms",
            ms(spawn)
        );
        println!(
            "  agent overhead                               {:>9.2} ms",
            ms(round_trip.saturating_sub(spawn))
        );
    }
    println!();

    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(pid) = info.pid {
        let (rss, pss) = memory_kib(pid)?;
        println!("host memory of one idle {} MiB sandbox", info.memory_mb);
        println!(
            "  RSS {:>6.1} MiB   PSS {:>6.1} MiB",
            rss as f64 / 1024.0,
            pss as f64 / 1024.0
        );
        println!();
    }

    let size = 100 * 1024 * 1024;
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let start = Instant::now();
    agent
        .write_file("/root/bench.bin", &mut &data[..], WriteOptions::default())
        .await?;
    let up = start.elapsed();
    let mut sink = tokio::io::sink();
    let start = Instant::now();
    let read = agent.read_file("/root/bench.bin", &mut sink).await?;
    let down = start.elapsed();
    anyhow::ensure!(read == size as u64, "downloaded {read} bytes of {size}");
    println!("file transfer of 100 MiB");
    println!(
        "  upload   {:>7.1} MiB/s ({:.2} s)",
        100.0 / up.as_secs_f64(),
        up.as_secs_f64()
    );
    println!(
        "  download {:>7.1} MiB/s ({:.2} s)",
        100.0 / down.as_secs_f64(),
        down.as_secs_f64()
    );
    manager.destroy("steady").await?;
    Ok(())
}

/// Creates a sandbox and times until the first byte of `echo`'s output.
async fn cold_start(manager: &Manager, name: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    manager.create(SandboxSpec::named(name)).await?;
    first_output(manager, name).await?;
    let elapsed = start.elapsed();
    manager.destroy(name).await?;
    Ok(elapsed)
}

/// Bare QEMU with the same machine, kernel and rootfs, booting straight into
/// `/bin/echo MARKER` from the root disk (no initramfs, no agent).
fn bare_qemu_boot(config: &RuntimeConfig, accel: AccelKind) -> anyhow::Result<Duration> {
    let rootfs = config
        .images_dir
        .join(&config.default_image)
        .join("rootfs.ext4");
    let accel_arg = match accel {
        AccelKind::Kvm => "kvm".to_string(),
        AccelKind::Tcg => format!("tcg,tb-size={}", config.tcg_tb_size_mb),
    };
    let mut append = String::from(
        "console=ttyS0 panic=-1 quiet pci=off root=/dev/vda ro rootfstype=ext4 init=/bin/echo",
    );
    if accel == AccelKind::Tcg {
        append.push_str(&format!(" tsc_early_khz={} tsc=reliable", tsc_khz()?));
    }
    append.push_str(&format!(" -- {MARKER}"));
    let start = Instant::now();
    let mut child = Process::new(&config.qemu_binary)
        .args([
            "-accel",
            &accel_arg,
            "-M",
            "microvm,x-option-roms=off,rtc=on,isa-serial=on",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-m",
            "256M",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&config.kernel)
        .args(["-append", &append, "-drive"])
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut elapsed = None;
    for line in BufReader::new(stdout).lines() {
        if line?.contains(MARKER) {
            elapsed = Some(start.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    elapsed.ok_or_else(|| anyhow::anyhow!("bare QEMU never printed the marker"))
}

fn tsc_khz() -> anyhow::Result<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no cpu MHz in /proc/cpuinfo"))?;
    Ok((mhz * 1000.0) as u64)
}

/// The guest's own cost of fork+exec+wait of `argv`, timed inside the guest.
async fn guest_spawn_cost(
    agent: &arrakis_runtime::AgentClient,
    argv: &[&str],
) -> anyhow::Result<Duration> {
    let script = format!(
        "import subprocess,time\nts=[]\nfor _ in range(60):\n t=time.perf_counter(); subprocess.run({argv:?}, stdout=subprocess.DEVNULL); ts.append(time.perf_counter()-t)\nts.sort(); print(ts[len(ts)//2])"
    );
    let request = ExecRequest {
        command: Command::Argv(vec!["python3".into(), "-c".into(), script]),
        ..ExecRequest::default()
    };
    let out = agent.exec(request, ExecOptions::default()).await?;
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Duration::from_secs_f64(secs))
}
