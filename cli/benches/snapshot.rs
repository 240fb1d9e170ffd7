//! Snapshot, restore, fork and warm-start benchmarks, each against raw QEMU
//! doing the same step in the same run (absolute times here are noisy):
//!
//! - snapshot of a 256 MiB and a 1 GiB sandbox, idle and with memory
//!   touched: `Manager::snapshot` (time, bytes on disk) against QEMU's own
//!   snapshot of the same VM at the same moment (`stop`, a migration of
//!   everything to a file, `cont`);
//! - restore to first command output, against raw QEMU restoring that
//!   migration file (anonymous RAM, `-incoming`) until it runs;
//! - fork of 10: time until all 10 answer a command, and host memory (PSS)
//!   per idle fork against one cold-booted idle sandbox;
//! - create to first command output with a warm start against a cold boot.
//!
//! Run with `cargo bench -p arrakis-cli --bench snapshot` (or
//! `scripts/bench`); `ARRAKIS_BENCH_RUNS` sets repetitions (default 5).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrakis_runtime::{ExecOptions, ForkSource, Manager, RuntimeConfig, SandboxSpec};
use common::{argv_request, first_output, median, memory_kib, ms, spread};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("ARRAKIS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = tempfile::Builder::new()
        .prefix("arrakis-bench-snap")
        .tempdir()?;
    let mut config = RuntimeConfig::from_env()?;
    config.state_dir = state.path().join("state");
    config.warm_start = false;
    common::quiet_network(&mut config);
    runtime.block_on(bench(config, state.path(), runs))
}

async fn bench(config: RuntimeConfig, scratch: &Path, runs: usize) -> anyhow::Result<()> {
    let manager = Manager::open(config.clone()).await?;
    println!(
        "arrakis snapshot benchmarks: accelerator {:?}, {runs} runs, medians",
        manager.accel().kind()
    );
    println!();
    println!("snapshot (ours: device state + RAM file; QEMU: stop, migrate all to a file, cont)");
    let mut qemu_file = None;
    for memory_mb in [256u32, 1024] {
        // Two like VMs: QEMU's own snapshot reads every page of the RAM
        // file, which allocates the holes of a tmpfs file, and would make
        // the next capture of that VM read them all.
        let name = format!("snap{memory_mb}");
        let raw = format!("raw{memory_mb}");
        for vm in [&name, &raw] {
            manager
                .create(SandboxSpec {
                    memory_mb: Some(memory_mb),
                    ..SandboxSpec::named(vm)
                })
                .await?;
        }
        for touched in [false, true] {
            if touched {
                // Fill 60% of RAM with random bytes in tmpfs.
                let mib = memory_mb * 6 / 10;
                for vm in [&name, &raw] {
                    exec_ok(
                        &manager,
                        vm,
                        &format!("mount -o remount,size=90% /dev/shm && head -c {mib}M /dev/urandom > /dev/shm/fill"),
                    )
                    .await?;
                }
            }
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let (mut our_size, mut their_size) = (0, 0);
            for i in 0..runs {
                let id = format!("{name}-{touched}-{i}");
                let start = Instant::now();
                let info = manager.snapshot(&name, Some(id.clone())).await?;
                ours.push(start.elapsed());
                our_size = info.size_bytes;
                let file = scratch.join(format!("qemu-{memory_mb}-{touched}.mig"));
                let pid = manager.get(&raw).await?.pid.unwrap_or(0);
                theirs.push(qemu_snapshot(&qmp_socket(pid)?, &file)?);
                their_size = std::fs::metadata(&file)?.len();
                if memory_mb == 256 && !touched {
                    qemu_file = Some((file, keep_disk(qemu_args(pid)?, scratch)?));
                } else {
                    std::fs::remove_file(&file)?;
                }
                if i + 1 < runs {
                    manager.delete_snapshot(&id).await?;
                }
            }
            let label = format!(
                "{memory_mb} MiB {}",
                if touched { "60% touched" } else { "idle" }
            );
            println!(
                "  {label:<18} ours {:>7.1} ms {:>7.1} MiB   QEMU {:>7.1} ms {:>7.1} MiB   ratio {:.2}",
                ms(median(&mut ours)),
                our_size as f64 / 1048576.0,
                ms(median(&mut theirs)),
                their_size as f64 / 1048576.0,
                ms(median(&mut ours)) / ms(median(&mut theirs)),
            );
        }
        // Idle TCG guests still cost CPU: only the measured VMs run below.
        manager.destroy(&name).await?;
        manager.destroy(&raw).await?;
    }
    println!();

    // Restore to first output: snapshot "snap256-false-<last>" is idle.
    let idle = format!("snap256-false-{}", runs - 1);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (file, args) = qemu_file.ok_or_else(|| anyhow::anyhow!("no QEMU snapshot kept"))?;
    for i in 0..runs {
        let name = format!("restored{i}");
        let start = Instant::now();
        manager.restore(&idle, &name).await?;
        first_output(&manager, &name).await?;
        ours.push(start.elapsed());
        manager.destroy(&name).await?;
        theirs.push(qemu_restore(
            &args,
            &file,
            &scratch.join(format!("raw{i}")),
        )?);
    }
    println!("restore (ours: to first command output; QEMU: incoming migration until running)");
    print_pair("256 MiB idle", &mut ours, &mut theirs);
    println!();

    // Fork of 10.
    let mut times = Vec::new();
    let mut pss_per_fork = 0.0;
    for round in 0..runs.min(3) {
        let prefix = format!("f{round}");
        let start = Instant::now();
        let forks = manager
            .fork(ForkSource::Snapshot(idle.clone()), 10, &prefix)
            .await?;
        let mut answers = tokio::task::JoinSet::new();
        for fork in &forks {
            let (manager, name) = (manager.clone(), fork.name.clone());
            answers.spawn(async move { first_output(&manager, &name).await });
        }
        while let Some(answer) = answers.join_next().await {
            answer??;
        }
        times.push(start.elapsed());
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut total = 0u64;
            for fork in &forks {
                total += memory_kib(fork.pid.unwrap_or(0))?.1;
            }
            pss_per_fork = total as f64 / 1024.0 / forks.len() as f64;
        }
        for fork in forks {
            manager.destroy(&fork.name).await?;
        }
    }
    manager.create(SandboxSpec::named("idle-cold")).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cold_pid = manager.get("idle-cold").await?.pid.unwrap_or(0);
    let cold_pss = memory_kib(cold_pid)?.1 as f64 / 1024.0;
    println!("fork of 10 from a 256 MiB snapshot");
    println!(
        "  until all 10 answer      {:>9.1} ms  {}",
        ms(median(&mut times)),
        spread(&times)
    );
    println!(
        "  PSS per idle fork        {pss_per_fork:>9.1} MiB  vs one cold-booted idle sandbox {cold_pss:.1} MiB ({:.0}%)",
        pss_per_fork / cold_pss * 100.0
    );
    println!();

    // Warm against cold create.
    drop(manager);
    let mut warm_config = config.clone();
    warm_config.warm_start = true;
    let manager = Manager::open(warm_config).await?;
    manager.create(SandboxSpec::named("golden-maker")).await?;
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (cold_boot, times) in [(false, &mut warm), (true, &mut cold)] {
            let name = format!("c{i}-{cold_boot}");
            let start = Instant::now();
            manager
                .create(SandboxSpec {
                    cold_boot,
                    ..SandboxSpec::named(&name)
                })
                .await?;
            first_output(&manager, &name).await?;
            times.push(start.elapsed());
            manager.destroy(&name).await?;
        }
    }
    println!("create to first command output");
    print_pair("warm start vs cold boot", &mut warm, &mut cold);
    for sandbox in manager.list().await? {
        manager.destroy(&sandbox.name).await?;
    }
    manager.clear_golden_snapshots().await?;
    Ok(())
}

fn print_pair(label: &str, ours: &mut [Duration], theirs: &mut [Duration]) {
    let (a, b) = (median(ours), median(theirs));
    println!(
        "  {label:<24} {:>9.1} ms ({})  vs {:>9.1} ms ({})  ratio {:.2}",
        ms(a),
        spread(ours),
        ms(b),
        spread(theirs),
        a.as_secs_f64() / b.as_secs_f64()
    );
}

async fn exec_ok(manager: &Manager, name: &str, script: &str) -> anyhow::Result<()> {
    let agent = manager.agent(name).await?;
    let out = agent
        .exec(
            argv_request(&["/bin/sh", "-c", script]),
            ExecOptions::default(),
        )
        .await?;
    anyhow::ensure!(out.status.code == Some(0), "{script}: {out:?}");
    Ok(())
}

/// The QMP socket on QEMU `pid`'s command line.
fn qmp_socket(pid: u32) -> anyhow::Result<PathBuf> {
    let args = qemu_args(pid)?;
    let spec = args
        .windows(2)
        .find(|w| w[0] == "-qmp")
        .map(|w| w[1].clone())
        .ok_or_else(|| anyhow::anyhow!("no -qmp in QEMU {pid}'s command line"))?;
    let path = spec
        .strip_prefix("unix:")
        .and_then(|s| s.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("unexpected -qmp {spec}"))?;
    Ok(PathBuf::from(path))
}

fn qemu_args(pid: u32) -> anyhow::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// `args` with the `-drive` file replaced by a copy in `scratch`, so a raw
/// restore can use it after the sandbox (and its top layer) is gone.
fn keep_disk(mut args: Vec<String>, scratch: &Path) -> anyhow::Result<Vec<String>> {
    let copy = scratch.join("disk.qcow2");
    for arg in args.iter_mut().filter(|a| a.starts_with("id=root,file=")) {
        let rest = &arg["id=root,file=".len()..];
        let (path, options) = rest.split_once(',').unwrap_or((rest, ""));
        std::fs::copy(path, &copy)?;
        *arg = format!("id=root,file={},{options}", copy.display());
    }
    Ok(args)
}

/// A minimal synchronous QMP client.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let mut qmp = None;
        for _ in 0..200 {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    qmp = Some(stream);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let writer = qmp.ok_or_else(|| anyhow::anyhow!("no QMP at {}", path.display()))?;
        let mut qmp = Qmp {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        };
        qmp.line()?;
        qmp.run("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        anyhow::ensure!(self.reader.read_line(&mut line)? > 0, "QMP closed");
        Ok(serde_json::from_str(&line)?)
    }

    fn run(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}")?;
        loop {
            let reply = self.line()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(error) = reply.get("error") {
                anyhow::bail!("{command}: {error}");
            }
            return Ok(reply["return"].clone());
        }
    }

    fn wait_migration(&mut self) -> anyhow::Result<()> {
        loop {
            let state = self.run("query-migrate", serde_json::json!({}))?;
            match state["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => anyhow::bail!("migration: {state}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

/// QEMU's own snapshot of a running VM: stop, migrate everything (RAM
/// included) to `file`, cont. Returns the time the steps took.
fn qemu_snapshot(qmp: &Path, file: &Path) -> anyhow::Result<Duration> {
    let mut qmp = Qmp::connect(qmp)?;
    qmp.run(
        "migrate-set-capabilities",
        serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": false}]}),
    )?;
    qmp.run(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 1u64 << 40}),
    )?;
    let start = Instant::now();
    qmp.run("stop", serde_json::json!({}))?;
    qmp.run(
        "migrate",
        serde_json::json!({"uri": format!("exec:cat > '{}'", file.display())}),
    )?;
    qmp.wait_migration()?;
    qmp.run("cont", serde_json::json!({}))?;
    Ok(start.elapsed())
}

/// Raw QEMU restoring `file` (written by [`qemu_snapshot`] of the QEMU
/// that ran with `args`): the same command line with anonymous RAM, its
/// own sockets, the disk as a throwaway overlay, and `-incoming`; timed
/// until the VM runs.
fn qemu_restore(args: &[String], file: &Path, dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let mut args = args.to_vec();
    let binary = args.remove(0);
    let qmp = dir.join("qmp.sock");
    let mut out = Vec::new();
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        let value = match arg.as_str() {
            "-daemonize" => continue,
            "-pidfile" => {
                iter.next();
                continue;
            }
            "-object" | "-drive" | "-chardev" | "-qmp" => iter.next().unwrap_or_default(),
            _ => {
                out.push(arg);
                continue;
            }
        };
        let value = if value.starts_with("memory-backend-file") {
            let size = value
                .split(',')
                .find(|p| p.starts_with("size="))
                .unwrap_or("size=256M");
            format!("memory-backend-ram,id=ram0,{size}")
        } else if arg == "-drive" {
            format!("{value},snapshot=on,file.locking=off")
        } else if value.starts_with("socket,id=agent") {
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                dir.join("agent.sock").display()
            )
        } else if value.starts_with("file,id=console") {
            format!("file,id=console,path={}", dir.join("console.log").display())
        } else if arg == "-qmp" {
            format!("unix:{},server=on,wait=off", qmp.display())
        } else {
            value
        };
        out.push(arg);
        out.push(value);
    }
    out.extend([
        "-incoming".to_string(),
        format!("exec:cat '{}'", file.display()),
        "-S".to_string(),
    ]);
    let start = Instant::now();
    let mut child = std::process::Command::new(binary)
        .args(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = (|| {
        let mut qmp = Qmp::connect(&qmp)?;
        qmp.wait_migration()?;
        qmp.run("cont", serde_json::json!({}))?;
        Ok(start.elapsed())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
