//! Network benchmark: a guest web server reached through a port forward
//! against the same guest reached directly, measured interleaved in one run
//! on the same machine (absolute numbers under TCG are noisy and low):
//!
//! - throughput: one GET of a 100 MiB file (from the guest's
//!   `/dev/urandom`), per side and run;
//! - request latency: sequential GETs of a 3-byte file, each over a new TCP
//!   connection (plain HTTP/1.0), median and p90.
//!
//! Sides: bridge mode reached directly at the guest's address on the
//! bridge, bridge mode through its forward (nftables DNAT) at 127.0.0.1,
//! and user mode (slirp) through its forward (QEMU `hostfwd`) at
//! 127.0.0.1; user mode has no direct path, so it is compared with bridge
//! direct. The guest serves with `python3 -m http.server` (the image has
//! no busybox); the same server on every side, so the ratios compare the
//! paths, not the server.
//!
//! Everything runs in a network namespace the benchmark makes (manager,
//! bridge, taps, nftables tables, QEMU): nothing touches the host's
//! network, and guests have no egress. Needs root (skipped otherwise) and
//! the artifacts of `scripts/setup`.
//!
//! Run with `cargo bench -p arrakis-runtime --bench network` (or
//! `scripts/bench`); `ARRAKIS_BENCH_RUNS` sets the number of 100 MiB GETs
//! per side (default 3).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrakis_protocol::ExecRequest;
use arrakis_runtime::network::{
    EgressPolicy, ForwardRequest, NetModeConfig, PortForward, PortRange,
};
use arrakis_runtime::testing::VmTestEnv;
use arrakis_runtime::{AgentClient, ExecOptions, Manager, SandboxInfo, SandboxSpec};

const BRIDGE: &str = "arkbench0";
const GUEST_PORT: u16 = 8000;
const BIG_BYTES: u64 = 100 * 1024 * 1024;
const SMALL_BODY: &[u8] = b"ok\n";
const LATENCY_GETS: usize = 50;
/// Untimed GETs of the big file per side before the throughput series.
const WARMUP_BIG: usize = 1;
/// Untimed GETs of the small file per side before the latency series.
const WARMUP_GETS: usize = 3;
/// Bound on booting both sandboxes and preparing their servers.
const SETUP_LIMIT: Duration = Duration::from_secs(300);
/// Bound on any one read or write of the client.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What the guests run: the files, then the server, then a wait until it
/// listens (bash's `/dev/tcp`, as starting python per probe is slow here).
const PREPARE: &str = "mkdir -p /srv && head -c 104857600 /dev/urandom > /srv/big && \
     printf 'ok\\n' > /srv/small && cd /srv && \
     (setsid python3 -m http.server --bind 0.0.0.0 8000 </dev/null >/dev/null 2>&1 &) && \
     for i in $(seq 150); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && exit 0; sleep 0.2; done; \
     exit 1";

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping the network benchmark: bridge mode needs root");
        return Ok(());
    }
    let runs: usize = std::env::var("ARRAKIS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let busy = other_qemus();
    // The namespace: this thread unshares it before anything else; the
    // tokio workers it starts and every process they spawn (ip, nft,
    // QEMU) inherit it.
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        // SAFETY: unshare(2) with a constant flag; affects this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        anyhow::ensure!(
            rc == 0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        run_cmd("ip", &["link", "set", "lo", "up"])?;
        bench(runs, busy)
    });
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Where each side is reached from the namespace.
struct Targets {
    bridge_direct: SocketAddr,
    bridge_forward: SocketAddr,
    user_forward: SocketAddr,
    vcpus: u32,
    memory_mb: u32,
}

fn bench(runs: usize, busy: usize) -> anyhow::Result<()> {
    // Declared first, dropped last: their guards kill any QEMU left over.
    let mut bridge_env = VmTestEnv::new();
    bridge_env.config.network.mode = NetModeConfig::Bridge;
    bridge_env.config.network.bridge = BRIDGE.to_string();
    bridge_env.config.network.egress = EgressPolicy::DenyAll;
    bridge_env.config.network.forwards = Vec::new();
    bridge_env.config.network.host_ports = PortRange {
        first: 30000,
        last: 30099,
    };
    let mut user_env = VmTestEnv::new();
    user_env.config.network.mode = NetModeConfig::User;
    user_env.config.network.egress = EgressPolicy::DenyAll;
    user_env.config.network.forwards = Vec::new();
    user_env.config.network.host_ports = PortRange {
        first: 31000,
        last: 31099,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (bridge, user) = runtime.block_on(async {
        let bridge = Manager::open(bridge_env.config.clone())
            .await
            .context("open the bridge-mode manager")?;
        let user = Manager::open(user_env.config.clone())
            .await
            .context("open the user-mode manager")?;
        anyhow::Ok((bridge, user))
    })?;

    let result = runtime
        .block_on(async {
            tokio::time::timeout(SETUP_LIMIT, setup(&bridge, &user))
                .await
                .context("setting up the sandboxes took too long")?
        })
        .and_then(|targets| {
            let accel = bridge.accel().kind().as_str().to_uppercase();
            measure(&targets, runs, &accel, busy)
        });

    let cleanup = runtime.block_on(async {
        let a = destroy_all(&bridge).await;
        let b = destroy_all(&user).await;
        a.and(b)
    });
    drop((bridge, user));
    drop(runtime);
    result?;
    cleanup
}

/// Boots one sandbox per mode (at once) and starts their web servers.
async fn setup(bridge: &Manager, user: &Manager) -> anyhow::Result<Targets> {
    let (b, u) = tokio::join!(prepare(bridge, "bridge"), prepare(user, "user"));
    let (b, u) = (b?, u?);
    let guest = b
        .network
        .as_ref()
        .context("the bridge-mode sandbox has no NIC")?
        .address
        .addr;
    Ok(Targets {
        bridge_direct: SocketAddrV4::new(guest, GUEST_PORT).into(),
        bridge_forward: local(forward_port(&b.forwards)?),
        user_forward: local(forward_port(&u.forwards)?),
        vcpus: b.vcpus,
        memory_mb: b.memory_mb,
    })
}

async fn prepare(manager: &Manager, name: &str) -> anyhow::Result<SandboxInfo> {
    let mut spec = SandboxSpec::named(name);
    spec.egress = Some(EgressPolicy::DenyAll);
    spec.forwards = vec![ForwardRequest {
        host_port: None,
        guest_port: GUEST_PORT,
        description: "bench".into(),
    }];
    let info = manager
        .create(spec)
        .await
        .with_context(|| format!("create the {name}-mode sandbox"))?;
    let agent = manager.agent(name).await?;
    sh(&agent, PREPARE)
        .await
        .with_context(|| format!("start the web server in the {name}-mode sandbox"))?;
    Ok(info)
}

async fn sh(agent: &AgentClient, script: &str) -> anyhow::Result<()> {
    let request = ExecRequest {
        command: arrakis_protocol::Command::Shell(script.to_string()),
        ..ExecRequest::default()
    };
    let out = agent.exec(request, ExecOptions::default()).await?;
    anyhow::ensure!(
        out.status.shell_code() == 0,
        "exit {}: {}",
        out.status.shell_code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn forward_port(forwards: &[PortForward]) -> anyhow::Result<u16> {
    forwards
        .iter()
        .find(|f| f.guest_port == GUEST_PORT)
        .map(|f| f.host_port)
        .context("no forward of the web port")
}

fn local(port: u16) -> SocketAddr {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into()
}

async fn destroy_all(manager: &Manager) -> anyhow::Result<()> {
    for info in manager.list().await? {
        manager.destroy(&info.name).await?;
    }
    Ok(())
}

/// Runs the interleaved series and prints the table.
fn measure(targets: &Targets, runs: usize, accel: &str, busy: usize) -> anyhow::Result<()> {
    let sides = [
        ("bridge direct", targets.bridge_direct),
        ("bridge forward", targets.bridge_forward),
        ("user forward", targets.user_forward),
    ];
    let mut buf = vec![0u8; 1 << 20];

    // Throughput: each run visits every side, starting one further along,
    // after an untimed round (the guests' first transfer also translates
    // their network paths).
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for run in 0..WARMUP_BIG + runs {
        for k in 0..sides.len() {
            let i = (run + k) % sides.len();
            let start = Instant::now();
            let body = get(sides[i].1, "/big", &mut buf)
                .with_context(|| format!("GET /big via {}", sides[i].0))?;
            let secs = start.elapsed().as_secs_f64();
            anyhow::ensure!(
                body.len == BIG_BYTES,
                "{}: got {} bytes of {BIG_BYTES}",
                sides[i].0,
                body.len
            );
            if run >= WARMUP_BIG {
                rates[i].push(BIG_BYTES as f64 / (1024.0 * 1024.0) / secs);
            }
        }
    }

    // Latency: one GET per side in turn, starting one further along each
    // round (a guest idle since the last round answers slower than one that
    // just answered), after a few untimed rounds.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for round in 0..WARMUP_GETS + LATENCY_GETS {
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let (label, addr) = sides[i];
            let start = Instant::now();
            let body =
                get(addr, "/small", &mut buf).with_context(|| format!("GET /small via {label}"))?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(
                body.head == SMALL_BODY,
                "{label}: unexpected body {:?}",
                String::from_utf8_lossy(&body.head)
            );
            if round >= WARMUP_GETS {
                times[i].push(ms);
            }
        }
    }

    for series in rates.iter_mut().chain(times.iter_mut()) {
        series.sort_by(f64::total_cmp);
    }
    let rate = |i: usize| median(&rates[i]);
    println!(
        "network ({accel}, {} vCPU, {} MiB guest): 100 MiB GET, median of {runs} (min-max), after {WARMUP_BIG} untimed",
        targets.vcpus, targets.memory_mb
    );
    println!(
        "  bridge direct   {:>7.1} MiB/s  ({:.1}-{:.1})",
        rate(0),
        rates[0][0],
        rates[0][runs - 1]
    );
    println!(
        "  bridge forward  {:>7.1} MiB/s  ({:.1}-{:.1})  {:.2}x bridge direct",
        rate(1),
        rates[1][0],
        rates[1][runs - 1],
        rate(1) / rate(0)
    );
    println!(
        "  user forward    {:>7.1} MiB/s  ({:.1}-{:.1})  {:.2}x bridge direct",
        rate(2),
        rates[2][0],
        rates[2][runs - 1],
        rate(2) / rate(0)
    );
    println!(
        "request latency ({LATENCY_GETS} GETs of a {}-byte file, new connection each, after {WARMUP_GETS} untimed)",
        SMALL_BODY.len()
    );
    let (med0, p90_0) = (median(&times[0]), p90(&times[0]));
    println!("  bridge direct   median {med0:>6.2} ms  p90 {p90_0:>6.2} ms");
    for (i, label) in [(1, "bridge forward"), (2, "user forward  ")] {
        let (med, p) = (median(&times[i]), p90(&times[i]));
        println!(
            "  {label}  median {med:>6.2} ms  p90 {p:>6.2} ms  ({:.2}x / {:.2}x bridge direct)",
            med / med0,
            p / p90_0
        );
    }
    println!(
        "  (bridge direct {}, forwards {} and {}; guest server python3 -m http.server)",
        targets.bridge_direct, targets.bridge_forward, targets.user_forward
    );
    if busy > 0 {
        println!("  note: {busy} other QEMU process(es) were running: numbers may be noisy");
    }
    Ok(())
}

/// A response's body: its length, and its first bytes (up to 64).
struct Body {
    len: u64,
    head: Vec<u8>,
}

/// One HTTP/1.0 GET over a new connection; fails unless the status is 200.
fn get(addr: SocketAddr, path: &str, buf: &mut [u8]) -> anyhow::Result<Body> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())?;
    let mut header = Vec::new();
    let mut body = Body {
        len: 0,
        head: Vec::new(),
    };
    let mut in_body = false;
    loop {
        let n = stream.read(buf)?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if !in_body {
            header.extend_from_slice(chunk);
            let Some(end) = header.windows(4).position(|w| w == b"\r\n\r\n") else {
                anyhow::ensure!(header.len() < 64 * 1024, "no end of headers");
                continue;
            };
            let status = header.split(|&b| b == b'\r').next().unwrap_or_default();
            let status = String::from_utf8_lossy(status).into_owned();
            anyhow::ensure!(status.contains(" 200 "), "status {status:?}");
            // What of this chunk follows the headers.
            let consumed = header.len() - n;
            chunk = &chunk[end + 4 - consumed..];
            in_body = true;
        }
        if body.head.len() < 64 {
            let take = chunk.len().min(64 - body.head.len());
            body.head.extend_from_slice(&chunk[..take]);
        }
        body.len += chunk.len() as u64;
    }
    anyhow::ensure!(in_body, "the connection closed before the headers ended");
    Ok(body)
}

fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// Nearest-rank 90th percentile of sorted values.
fn p90(sorted: &[f64]) -> f64 {
    let rank = (sorted.len() * 9).div_ceil(10);
    sorted[rank.max(1) - 1]
}

/// Live QEMU processes already running on the machine (they compete for
/// CPU); zombies not yet reaped do not count.
fn other_qemus() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status")).is_ok_and(|status| {
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::trim)
                        .unwrap_or_default()
                        .to_string()
                };
                field("Name:").starts_with("qemu-system") && !field("State:").starts_with('Z')
            })
        })
        .count()
}

fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
