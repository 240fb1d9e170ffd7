//! Bridge-mode host networking against the real kernel: the bridge, taps
//! and nftables tables of `network::host` and `network::nft`, and traffic
//! through the rendered rules (forwards, egress policy, DNS, host
//! protection, anti-spoofing). Needs root; skipped with a message
//! otherwise.
//!
//! Isolation: every namespace here is a thread that called
//! `unshare(CLONE_NEWNET)`. Network namespaces are per thread, and what
//! such a thread starts (`ip`, `nft`), opens (`/proc/sys/net`) or creates
//! (sockets) lives in its namespace, so the host's own interfaces and
//! tables are never touched, and nothing outlives the test process: a
//! namespace goes away with its thread and its sockets, even when a test
//! panics. No `ip netns` name is registered, so none can be left behind.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use arrakis_runtime::network::nft::{self, Ruleset, SandboxRules};
use arrakis_runtime::network::{
    host, EgressPolicy, Ipv4Net, Mac, NetMode, PortForward, SandboxNet,
};

const BRIDGE: &str = "arrakist";
/// Longest a step inside a namespace may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection that should work may take, and how long one
/// that should be dropped is given before it counts as dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ID_A: &str = "a0a0a0a0a0a0a0a0";
const ID_B: &str = "b1b1b1b1b1b1b1b1";
const ID_C: &str = "c2c2c2c2c2c2c2c2";
const UPLINK_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: bridge-mode tests need root (network namespaces, bridges, nftables)");
    }
    root
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread in a network namespace of its own, running the closures it is
/// given there.
struct Netns {
    tid: libc::pid_t,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Netns {
    fn new() -> Netns {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare(2) takes a flag and touches no memory of
            // ours; CLONE_NEWNET moves only this thread to a new namespace.
            let result = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                // SAFETY: gettid(2) takes nothing and cannot fail.
                Ok(unsafe { libc::gettid() })
            } else {
                Err(std::io::Error::last_os_error())
            };
            let ok = result.is_ok();
            let _ = ready.send(result);
            if ok {
                for job in queue {
                    job();
                }
            }
        });
        let tid = started
            .recv()
            .expect("the namespace thread starts")
            .expect("unshare(CLONE_NEWNET)");
        Netns {
            tid,
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Runs `job` in the namespace; its panic is re-raised here.
    fn run<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> R {
        let (done, result) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(catch_unwind(AssertUnwindSafe(job)));
        });
        self.jobs
            .as_ref()
            .expect("open")
            .send(job)
            .expect("the namespace thread runs");
        match result.recv().expect("the job reports") {
            Ok(value) => value,
            Err(panic) => resume_unwind(panic),
        }
    }

    /// Runs the future `make()` returns in the namespace, bounded in time.
    fn block_on<F, M>(&self, make: M) -> F::Output
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future,
        F::Output: Send + 'static,
    {
        self.run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime
                .block_on(async move { tokio::time::timeout(STEP_TIMEOUT, make()).await })
                .expect("the step finishes in time")
        })
    }

    /// Runs `program ARGS` in the namespace and returns its stdout; panics
    /// with its stderr on failure.
    fn cmd(&self, program: &'static str, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.run(move || {
            let output = Command::new(program)
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
            assert!(
                output.status.success(),
                "`{program} {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    }
}

impl Netns {
    /// Runs `ip ARGS` in the namespace, ARGS split at spaces.
    fn ip(&self, args: &str) -> String {
        self.cmd("ip", &args.split_whitespace().collect::<Vec<_>>())
    }

    /// Runs a fallible async step in the namespace; panics with its error.
    fn must<T, E, F, M>(&self, make: M) -> T
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = Result<T, E>>,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.block_on(make).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sandbox(
    id: &str,
    host_number: u8,
    egress: EgressPolicy,
    forwards: &[(u16, u16)],
) -> SandboxRules {
    let addr = Ipv4Addr::new(10, 20, 0, host_number);
    SandboxRules {
        id: id.to_string(),
        net: SandboxNet {
            mode: NetMode::Bridge,
            address: Ipv4Net { addr, prefix: 16 },
            gateway: Ipv4Addr::new(10, 20, 0, 1),
            nameserver: Ipv4Addr::new(10, 20, 0, 1),
            mac: Mac::for_address(addr).to_string(),
            tap: Some(host::tap_name(id)),
            egress,
            attached: None,
        },
        forwards: forwards
            .iter()
            .map(|&(host_port, guest_port)| PortForward {
                host_port,
                guest_port,
                description: "test".to_string(),
            })
            .collect(),
    }
}

/// The rules of the tests: neither host nor inter-sandbox access.
fn ruleset(sandboxes: &[SandboxRules], dns_upstream: Option<Ipv4Addr>) -> Ruleset<'_> {
    Ruleset {
        table: BRIDGE,
        bridge: BRIDGE,
        subnet: "10.20.0.0/16".parse().unwrap(),
        gateway: Ipv4Addr::new(10, 20, 0, 1),
        dns_upstream,
        allow_inter_sandbox: false,
        allow_host: false,
        sandboxes,
    }
}

fn rules(sandboxes: &[SandboxRules], dns_upstream: Option<Ipv4Addr>) -> String {
    nft::render(&ruleset(sandboxes, dns_upstream))
}

fn gateway() -> Ipv4Net {
    "10.20.0.1/16".parse().unwrap()
}

fn apply(ns: &Netns, script: String) {
    ns.block_on(move || async move { nft::apply(&script).await })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bridge_taps_and_tables_follow_the_state() {
    if !is_root() {
        return;
    }
    let ns = Netns::new();
    ns.must(|| host::ensure_bridge(BRIDGE, gateway()));
    // A second run repairs: a stray address goes, the gateway stays.
    ns.ip("addr add 10.99.0.1/24 dev arrakist");
    ns.must(|| host::ensure_bridge(BRIDGE, gateway()));
    let addrs: serde_json::Value =
        serde_json::from_str(&ns.ip("-j -4 addr show dev arrakist")).unwrap();
    let inet = addrs[0]["addr_info"].as_array().unwrap();
    assert_eq!(inet.len(), 1, "{addrs}");
    assert_eq!(inet[0]["local"], "10.20.0.1");
    assert_eq!(inet[0]["prefixlen"], 16);
    assert!(addrs[0]["flags"].as_array().unwrap().contains(&"UP".into()));
    let sysctl = |path: &'static str| ns.run(move || std::fs::read_to_string(path).unwrap());
    assert_eq!(sysctl("/proc/sys/net/ipv4/ip_forward").trim(), "1");
    let localnet = sysctl("/proc/sys/net/ipv4/conf/arrakist/route_localnet");
    assert_eq!(localnet.trim(), "1");

    let (tap_a, tap_b) = (host::tap_name(ID_A), host::tap_name(ID_B));
    for tap in [&tap_a, &tap_b, &tap_a] {
        let tap = tap.clone();
        ns.must(move || async move { host::create_tap(&tap, BRIDGE, true).await });
    }
    let port: serde_json::Value =
        serde_json::from_str(&ns.ip(&format!("-d -j link show dev {tap_a}"))).unwrap();
    assert_eq!(port[0]["master"], BRIDGE);
    assert_eq!(port[0]["linkinfo"]["info_slave_data"]["isolated"], true);
    assert!(port[0]["flags"].as_array().unwrap().contains(&"UP".into()));
    assert_eq!(
        ns.must(|| host::taps_on(BRIDGE)),
        [tap_a.clone(), tap_b.clone()]
    );
    // A name taken by something that is not a tap is left alone.
    ns.ip("link add arnotatap type bridge");
    let error = ns
        .block_on(|| host::create_tap("arnotatap", BRIDGE, true))
        .unwrap_err();
    assert!(
        matches!(error, host::HostNetError::NotATap { .. }),
        "{error:?}"
    );
    ns.ip("link del arnotatap");

    check_rules_follow_sandboxes(&ns, &tap_b);
    tear_down(&ns, &tap_a);
}

/// Rules for two sandboxes, then for one once the other (and its tap) is
/// gone.
fn check_rules_follow_sandboxes(ns: &Netns, tap_b: &str) {
    let allow = EgressPolicy::AllowList(vec!["1.2.3.0/24".parse().unwrap()]);
    let both = [
        sandbox(ID_A, 3, allow, &[(40000, 5901)]),
        sandbox(ID_B, 4, EgressPolicy::DenyAll, &[(40001, 22)]),
    ];
    for _ in 0..2 {
        apply(ns, rules(&both, Some(Ipv4Addr::new(127, 0, 0, 53))));
    }
    let ip_table = ns.cmd("nft", &["list", "table", "ip", BRIDGE]);
    for expected in [
        "tcp dport 40000 dnat to 10.20.0.3:5901",
        "tcp dport 40001 dnat to 10.20.0.4:22",
        "udp dport 53 dnat to 127.0.0.53:53",
        &format!("chain sb_{ID_B}"),
    ] {
        assert!(
            ip_table.contains(expected),
            "no {expected:?} in\n{ip_table}"
        );
    }
    let bridge_table = ns.cmd("nft", &["list", "table", "bridge", BRIDGE]);
    let spoof = "ether saddr != 02:a5:0a:14:00:04 drop";
    assert!(bridge_table.contains(spoof), "{bridge_table}");
    assert!(ns.must(|| nft::table_exists(BRIDGE)));

    let tap = tap_b.to_string();
    ns.must(move || async move { host::delete_tap(&tap).await });
    apply(ns, rules(&both[..1], None));
    let ruleset = ns.cmd("nft", &["list", "ruleset"]);
    assert!(ruleset.contains("dnat to 10.20.0.3:5901"), "{ruleset}");
    for gone in ["10.20.0.4", ID_B, tap_b, "dport 53"] {
        assert!(!ruleset.contains(gone), "{gone} is still in\n{ruleset}");
    }
    assert_eq!(ns.must(|| host::taps_on(BRIDGE)), [host::tap_name(ID_A)]);
}

/// Removes everything, twice (absent things are fine), and checks that
/// nothing is left.
fn tear_down(ns: &Netns, tap: &str) {
    for _ in 0..2 {
        apply(ns, nft::render_removal(BRIDGE));
        let tap = tap.to_string();
        ns.must(move || async move { host::delete_tap(&tap).await });
        ns.must(|| host::delete_bridge(BRIDGE));
    }
    assert!(!ns.must(|| nft::table_exists(BRIDGE)));
    assert_eq!(ns.cmd("nft", &["list", "ruleset"]).trim(), "");
    let links: serde_json::Value = serde_json::from_str(&ns.ip("-j link show")).unwrap();
    let names: Vec<&str> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lo"]);
    assert!(ns.must(|| host::taps_on(BRIDGE)).is_empty());
}

#[test]
fn unrelated_tables_survive_apply_and_removal() {
    if !is_root() {
        return;
    }
    let ns = Netns::new();
    let others = "table ip other {\n chain c {\n tcp dport 1 drop\n }\n}\n\
                  table bridge arrakist2 {\n}\n";
    apply(&ns, others.to_string());
    let sandboxes = [sandbox(ID_A, 3, EgressPolicy::AllowAll, &[(40000, 80)])];
    apply(&ns, rules(&sandboxes, None));
    apply(&ns, rules(&[], None));
    let tables = ns.cmd("nft", &["list", "tables"]);
    assert!(tables.contains(&format!("table ip {BRIDGE}\n")), "{tables}");
    apply(&ns, nft::render_removal(BRIDGE));
    let tables = ns.cmd("nft", &["list", "tables"]);
    assert_eq!(tables, "table ip other\ntable bridge arrakist2\n");
    let other = ns.cmd("nft", &["list", "table", "ip", "other"]);
    assert!(other.contains("tcp dport 1 drop"), "{other}");
}

#[test]
fn bad_scripts_fail_with_nft_stderr_and_change_nothing() {
    if !is_root() {
        return;
    }
    let ns = Netns::new();
    apply(&ns, rules(&[], None));
    let before = ns.cmd("nft", &["list", "ruleset"]);
    let empty = rules(&[], None);
    let broken = format!("{empty}table ip {BRIDGE} {{ chain c {{ bogus; }} }}\n");
    let error = ns
        .block_on(move || async move { nft::apply(&broken).await })
        .unwrap_err();
    assert!(matches!(error, nft::NftError::Failed { .. }), "{error:?}");
    assert!(error.to_string().contains("bogus"), "{error}");
    assert_eq!(ns.cmd("nft", &["list", "ruleset"]), before);
}

/// Accepts TCP connections on `listener` and answers each with the
/// address of the peer as it saw it.
fn serve_tcp(listener: TcpListener) {
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let peer = stream.peer_addr().map(|a| a.ip().to_string());
            let _ = stream.write_all(peer.unwrap_or_default().as_bytes());
        }
    });
}

/// Answers each UDP datagram on `socket` with the peer's address.
fn serve_udp(socket: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(peer.ip().to_string().as_bytes(), peer);
        }
    });
}

/// From `ns`, what a TCP server at `to` says the peer address is; `None`
/// when no connection is made within [`CONNECT_TIMEOUT`].
fn tcp_peer(ns: &Netns, to: &str) -> Option<String> {
    let to: SocketAddr = to.parse().unwrap();
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    })
}

/// From `ns`, a UDP datagram from `from` to `to`, and the answer if one
/// comes back from `to` in time.
fn udp_peer(ns: &Netns, from: &str, to: &str) -> Option<String> {
    let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
    ns.run(move || {
        let socket = UdpSocket::bind(from).unwrap();
        socket.connect(to).unwrap();
        socket.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        socket.send(b"?").ok()?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// What the rules open beyond the defaults, and where DNS goes.
#[derive(Debug, Clone, Copy)]
struct Options {
    host: bool,
    inter_sandbox: bool,
    dns: Ipv4Addr,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            host: false,
            inter_sandbox: false,
            dns: INTERNET,
        }
    }
}

/// The namespaces of the traffic tests: the host (bridge and rules),
/// guests of sandboxes A and C, each behind a port named like its tap (a
/// veth pair, as no VM runs here), and an "internet" host behind an
/// uplink. Sandbox B has a real tap and no guest.
struct World {
    host: Netns,
    guest: Netns,
    guest_c: Netns,
    internet: Netns,
}

impl World {
    /// With `br_netfilter`, bridged IPv4 also goes through the `ip` hooks
    /// (as on hosts with Docker); `None` when this kernel has no such
    /// module loaded.
    fn new(br_netfilter: bool) -> Option<World> {
        let world = World {
            host: Netns::new(),
            guest: Netns::new(),
            guest_c: Netns::new(),
            internet: Netns::new(),
        };
        let host_ns = &world.host;
        let setting = if br_netfilter { "1" } else { "0" };
        let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        // Without the module there is no such file, and no such traffic.
        if host_ns.run(move || std::fs::write(path, setting)).is_err() && br_netfilter {
            eprintln!("skipping: br_netfilter is not loaded");
            return None;
        }
        host_ns.ip("link set lo up");
        host_ns.must(|| host::ensure_bridge(BRIDGE, gateway()));
        attach_guest(host_ns, &world.guest, ID_A, 3);
        attach_guest(host_ns, &world.guest_c, ID_C, 5);
        host_ns.must(|| async { host::create_tap(&host::tap_name(ID_B), BRIDGE, true).await });
        let internet_tid = world.internet.tid;
        host_ns.ip(&format!(
            "link add uplink type veth peer name i0 netns {internet_tid}"
        ));
        host_ns.ip("addr add 198.51.100.1/24 dev uplink");
        host_ns.ip("link set dev uplink up");
        world.internet.ip("addr add 198.51.100.2/24 dev i0");
        world.internet.ip("link set dev i0 up");
        Some(world)
    }

    /// Servers answering with the peer address they see: the guests'
    /// service on 5901, one on the host's bridge address, and TCP 7000,
    /// UDP 7001 and a "resolver" on UDP 53 on the internet.
    fn start_servers(&self) {
        for guest in [&self.guest, &self.guest_c] {
            serve_tcp(guest.run(|| TcpListener::bind("0.0.0.0:5901").unwrap()));
        }
        serve_tcp(
            self.host
                .run(|| TcpListener::bind("10.20.0.1:8000").unwrap()),
        );
        let internet = &self.internet;
        serve_tcp(internet.run(|| TcpListener::bind("198.51.100.2:7000").unwrap()));
        serve_udp(internet.run(|| UdpSocket::bind("198.51.100.2:7001").unwrap()));
        serve_udp(internet.run(|| UdpSocket::bind("198.51.100.2:53").unwrap()));
    }

    /// Rules for A (forward 40000 -> 5901), B and C (forward 40001 ->
    /// 5901). Ports are isolated unless
    /// sandboxes may talk, as the runtime does.
    fn apply(&self, egress_a: EgressPolicy, options: Options) {
        let sandboxes = [
            sandbox(ID_A, 3, egress_a, &[(40000, 5901)]),
            sandbox(ID_B, 4, EgressPolicy::AllowAll, &[]),
            sandbox(ID_C, 5, EgressPolicy::DenyAll, &[(40001, 5901)]),
        ];
        let rules = Ruleset {
            allow_host: options.host,
            allow_inter_sandbox: options.inter_sandbox,
            ..ruleset(&sandboxes, Some(options.dns))
        };
        apply(&self.host, nft::render(&rules));
        let isolated = if options.inter_sandbox { "off" } else { "on" };
        for id in [ID_A, ID_C] {
            let port = host::tap_name(id);
            self.host.ip(&format!(
                "link set dev {port} type bridge_slave isolated {isolated}"
            ));
        }
    }
}

/// Puts `guest` behind a bridge port named like sandbox `id`'s tap, with
/// the sandbox's MAC, address (`10.20.0.<host_number>`) and default route.
fn attach_guest(host_ns: &Netns, guest: &Netns, id: &str, host_number: u8) {
    let port = host::tap_name(id);
    let tid = guest.tid;
    host_ns.ip(&format!(
        "link add {port} type veth peer name g0 netns {tid}"
    ));
    host_ns.ip(&format!("link set dev {port} master {BRIDGE}"));
    host_ns.ip(&format!("link set dev {port} up"));
    let addr = Ipv4Addr::new(10, 20, 0, host_number);
    guest.ip(&format!(
        "link set dev g0 address {}",
        Mac::for_address(addr)
    ));
    guest.ip(&format!("addr add {addr}/16 dev g0"));
    guest.ip("link set dev g0 up");
    guest.ip("route add default via 10.20.0.1");
}

#[test]
fn traffic_follows_the_rules() {
    if let Some(world) = is_root().then(|| World::new(false)).flatten() {
        check_traffic(world);
    }
}

#[test]
fn traffic_follows_the_rules_with_br_netfilter() {
    if let Some(world) = is_root().then(|| World::new(true)).flatten() {
        check_traffic(world);
    }
}

fn check_traffic(world: World) {
    world.start_servers();
    let allow = EgressPolicy::AllowList(vec![Ipv4Net {
        addr: INTERNET,
        prefix: 32,
    }]);
    world.apply(allow, Options::default());
    let (host_ns, guest, internet) = (&world.host, &world.guest, &world.internet);
    let uplink = Some(UPLINK_HOST.to_string());

    // Forwards: from the host's loopback (masqueraded to the gateway) and
    // from outside (the client's own address).
    assert_eq!(
        tcp_peer(host_ns, "127.0.0.1:40000").as_deref(),
        Some("10.20.0.1")
    );
    assert_eq!(
        tcp_peer(internet, "198.51.100.1:40000").as_deref(),
        Some("198.51.100.2")
    );
    // Egress to an allowed address, NATed to the uplink's address.
    assert_eq!(tcp_peer(guest, "198.51.100.2:7000"), uplink);
    // The host's own services stay out of reach.
    assert_eq!(tcp_peer(guest, "10.20.0.1:8000"), None);
    // DNS to the gateway reaches the upstream and answers from the gateway.
    assert_eq!(udp_peer(guest, "10.20.0.3:0", "10.20.0.1:53"), uplink);
    check_anti_spoofing(&world);

    // Deny all: no egress, but DNS and forwards still work.
    world.apply(EgressPolicy::DenyAll, Options::default());
    assert_eq!(tcp_peer(guest, "198.51.100.2:7000"), None);
    assert_eq!(udp_peer(guest, "10.20.0.3:0", "198.51.100.2:7001"), None);
    assert_eq!(udp_peer(guest, "10.20.0.3:0", "10.20.0.1:53"), uplink);
    assert_eq!(
        tcp_peer(internet, "198.51.100.1:40000").as_deref(),
        Some("198.51.100.2")
    );

    // Allow all: egress anywhere.
    world.apply(EgressPolicy::AllowAll, Options::default());
    assert_eq!(tcp_peer(guest, "198.51.100.2:7000"), uplink);

    // A resolver on the host's loopback (systemd-resolved's 127.0.0.53):
    // reached through `route_localnet`, without masquerade.
    serve_udp(host_ns.run(|| UdpSocket::bind("127.0.0.53:53").unwrap()));
    let loopback_dns = Options {
        dns: Ipv4Addr::new(127, 0, 0, 53),
        ..Options::default()
    };
    world.apply(EgressPolicy::DenyAll, loopback_dns);
    let answer = udp_peer(guest, "10.20.0.3:0", "10.20.0.1:53");
    assert_eq!(answer.as_deref(), Some("10.20.0.3"));
}

#[test]
fn allow_options_open_what_they_name_only() {
    if let Some(world) = is_root().then(|| World::new(false)).flatten() {
        check_allow_options(world);
    }
}

#[test]
fn allow_options_open_what_they_name_only_with_br_netfilter() {
    if let Some(world) = is_root().then(|| World::new(true)).flatten() {
        check_allow_options(world);
    }
}

fn check_allow_options(world: World) {
    world.start_servers();
    serve_tcp(
        world
            .host
            .run(|| TcpListener::bind("127.0.0.1:8001").unwrap()),
    );
    // The guest routes 127.0.0.1 to the host, whose `route_localnet` on
    // the bridge would deliver it locally.
    let guest = &world.guest;
    guest.run(|| std::fs::write("/proc/sys/net/ipv4/conf/g0/route_localnet", "1").unwrap());
    guest.ip("route add 127.0.0.1/32 via 10.20.0.1 dev g0");
    let host = Options {
        host: true,
        ..Options::default()
    };
    world.apply(EgressPolicy::DenyAll, host);
    assert_eq!(
        tcp_peer(guest, "10.20.0.1:8000").as_deref(),
        Some("10.20.0.3")
    );
    assert_eq!(tcp_peer(guest, "127.0.0.1:8001"), None);

    // Sandbox to sandbox, directly or through C's forward on a host
    // address (masqueraded, so C's answer comes back through the host).
    world.apply(EgressPolicy::DenyAll, Options::default());
    assert_eq!(tcp_peer(guest, "10.20.0.1:8000"), None);
    assert_eq!(tcp_peer(guest, "10.20.0.5:5901"), None);
    assert_eq!(tcp_peer(guest, "10.20.0.1:40001"), None);
    let inter_sandbox = Options {
        inter_sandbox: true,
        ..Options::default()
    };
    world.apply(EgressPolicy::DenyAll, inter_sandbox);
    assert_eq!(
        tcp_peer(guest, "10.20.0.5:5901").as_deref(),
        Some("10.20.0.3")
    );
    assert_eq!(
        tcp_peer(guest, "10.20.0.1:40001").as_deref(),
        Some("10.20.0.1")
    );
    assert_eq!(tcp_peer(guest, "10.20.0.1:8000"), None);
}

/// A's tap may send only from A's MAC and address, and claim only A's
/// address in ARP; the control: without the bridge table, all of it
/// passes.
fn check_anti_spoofing(world: &World) {
    assert_eq!(spoofs_that_pass(world), [false; 3]);
    apply(&world.host, format!("delete table bridge {BRIDGE}\n"));
    assert_eq!(spoofs_that_pass(world), [true; 3]);
}

/// Whether A's guest gets through when it sends from another MAC, sends
/// as sandbox B (allow all), and answers ARP for an address not its own.
/// The host is told where the spoofed MAC and address are, so only the
/// check under test can stop the first two.
fn spoofs_that_pass(world: &World) -> [bool; 3] {
    let (host_ns, guest) = (&world.host, &world.guest);
    let mac_a = Mac::for_address(Ipv4Addr::new(10, 20, 0, 3));
    let other_mac = "02:a5:0a:14:00:63";
    let pin = |addr: &str, mac: &str| {
        host_ns.ip(&format!(
            "neigh replace {addr} lladdr {mac} dev {BRIDGE} nud permanent"
        ));
    };
    // A MAC change flushes the guest's ARP cache; the gateway is pinned so
    // the guest need not ask (ARP from the other MAC is dropped too).
    let bridge: serde_json::Value =
        serde_json::from_str(&host_ns.ip(&format!("-j link show dev {BRIDGE}"))).unwrap();
    let bridge_mac = bridge[0]["address"].as_str().unwrap().to_string();
    guest.ip(&format!("link set dev g0 address {other_mac}"));
    guest.ip(&format!(
        "neigh replace 10.20.0.1 lladdr {bridge_mac} dev g0 nud permanent"
    ));
    pin("10.20.0.3", other_mac);
    let from_other_mac = tcp_peer(guest, "198.51.100.2:7000").is_some();
    guest.ip(&format!("link set dev g0 address {mac_a}"));
    guest.ip("neigh flush dev g0 nud all");
    pin("10.20.0.3", &mac_a.to_string());
    assert!(tcp_peer(guest, "198.51.100.2:7000").is_some());

    guest.ip("addr add 10.20.0.4/32 dev g0");
    guest.ip("addr add 10.20.0.6/32 dev g0");
    pin("10.20.0.4", &mac_a.to_string());
    let as_b = udp_peer(guest, "10.20.0.4:0", "198.51.100.2:7001").is_some();
    let arp_claim = host_learns(host_ns, "10.20.0.6");
    guest.ip("addr del 10.20.0.4/32 dev g0");
    guest.ip("addr del 10.20.0.6/32 dev g0");
    for addr in ["10.20.0.3", "10.20.0.4", "10.20.0.6"] {
        host_ns.ip(&format!("neigh flush to {addr} dev {BRIDGE} nud all"));
    }
    [from_other_mac, as_b, arp_claim]
}

/// Whether the host, sending to `addr` on the bridge, learns its MAC by
/// ARP within [`CONNECT_TIMEOUT`].
fn host_learns(host_ns: &Netns, addr: &'static str) -> bool {
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    while std::time::Instant::now() < deadline {
        host_ns.run(move || {
            let socket = UdpSocket::bind("10.20.0.1:0").unwrap();
            let _ = socket.send_to(b"?", (addr, 9));
        });
        std::thread::sleep(Duration::from_millis(200));
        let json = host_ns.ip(&format!("-j neigh show to {addr} dev {BRIDGE}"));
        let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
        if entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.get("lladdr").is_some())
        {
            return true;
        }
    }
    false
}
