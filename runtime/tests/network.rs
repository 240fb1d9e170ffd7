//! Sandbox networking with real VMs, in bridge mode, inside a network
//! namespace this test makes (the manager, its bridge, taps and nftables
//! tables, and QEMU all live there; nothing touches the host's network):
//! forwards reached from the namespace's loopback, from another of its
//! addresses and from a second namespace standing in for another machine;
//! isolation between sandboxes and from host services; egress allowed,
//! denied and allow-listed, changed at runtime; five forks of one snapshot
//! as distinct machines with re-created forwards; and nothing left behind
//! after destroy and a manager restart. Needs root (skipped otherwise) and
//! the artifacts of `scripts/setup`.
//!
//! The namespace is a thread that called `unshare(CLONE_NEWNET)` before
//! building the test's runtime: threads and processes started from it
//! (tokio workers, `ip`, `nft`, QEMU) inherit it. The second namespace
//! ("outside") is a named one, deleted by a guard.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use arrakis_protocol::ExecRequest;
use arrakis_runtime::network::{EgressPolicy, ForwardRequest, NetMode, NetModeConfig, SandboxNet};
use arrakis_runtime::testing::{run_bounded, VmTestEnv};
use arrakis_runtime::{AgentClient, ExecOptions, ForkSource, Manager, SandboxSpec};

const TEST_TIMEOUT: Duration = Duration::from_secs(900);
const BRIDGE: &str = "arktest0";
/// The namespace's uplink and the "other machine" behind it.
const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const OUTSIDE_PORT: u16 = 8080;
const GUEST_WEB: u16 = 8000;

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: bridge-mode tests need root");
    }
    root
}

/// Runs `body` in a new network namespace (see the module documentation).
fn in_new_netns(body: impl FnOnce() + Send + 'static) {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(2) with a constant flag; affects this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        run_cmd("ip", &["link", "set", "lo", "up"]);
        body();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// [`in_new_netns`], checking that `body` leaves the namespace's
/// interfaces and nftables tables as it found them.
fn in_clean_netns(body: impl FnOnce() + Send + 'static) {
    in_new_netns(|| {
        let before = host_network();
        body();
        assert_eq!(host_network(), before, "nothing left behind");
    });
}

fn run_cmd(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The named "outside" namespace, its veth peer, and a web server in it.
struct Outside {
    name: String,
    server: Child,
}

impl Outside {
    /// Called from inside the test's namespace.
    fn new() -> Outside {
        let name = format!("arrakis-out-{}", std::process::id());
        run_cmd("ip", &["netns", "add", &name]);
        let outside = Outside {
            name,
            server: Command::new("true").spawn().unwrap(),
        };
        let ns = outside.name.clone();
        let ns = ns.as_str();
        run_cmd(
            "ip",
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", ns,
            ],
        );
        run_cmd(
            "ip",
            &["addr", "add", &format!("{UPLINK}/24"), "dev", "up0"],
        );
        run_cmd("ip", &["link", "set", "up0", "up"]);
        for args in [
            vec!["addr", "add", "198.51.100.2/24", "dev", "up1"],
            vec!["link", "set", "up1", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend(args);
            run_cmd("ip", &full);
        }
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("outside.txt"), "from outside\n").unwrap();
        let mut outside = outside;
        outside.server = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-m", "http.server"])
            .args(["--bind", &OUTSIDE.to_string(), &OUTSIDE_PORT.to_string()])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        outside
    }

    /// `curl` from the outside namespace; the body, or `None` on failure.
    fn fetch(&self, url: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "curl", "-sf", "-m", "5", url])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", "up0"]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Interfaces and nftables tables of the current namespace.
fn host_network() -> (String, String) {
    let links = run_cmd("ip", &["-br", "link"]);
    let mut names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort();
    (names.join(" "), run_cmd("nft", &["list", "tables"]))
}

async fn sh(agent: &AgentClient, script: &str) -> (String, i32) {
    let request = ExecRequest {
        command: arrakis_protocol::Command::Shell(script.to_string()),
        ..ExecRequest::default()
    };
    let out = agent
        .exec(request, ExecOptions::default())
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"));
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        out.status.shell_code(),
    )
}

/// Whether the guest can open a TCP connection to `addr:port`.
async fn guest_connects(agent: &AgentClient, addr: Ipv4Addr, port: u16) -> bool {
    let script = format!(
        "python3 -c 'import socket; socket.create_connection((\"{addr}\", {port}), timeout=3)'"
    );
    sh(agent, &script).await.1 == 0
}

/// Serves `/tmp/www/index.html` (the hostname) on the guest's port 8000.
async fn start_web(agent: &AgentClient) {
    let (_, code) = sh(
        agent,
        "mkdir -p /tmp/www && hostname > /tmp/www/index.html && cd /tmp/www && \
         (setsid python3 -m http.server 8000 >/dev/null 2>&1 &) && \
         for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000), timeout=1)' 2>/dev/null && exit 0; sleep 0.2; done; exit 1",
    )
    .await;
    assert_eq!(code, 0, "the guest web server did not start");
}

/// A plain HTTP GET of `/index.html` from this namespace.
fn get(addr: Ipv4Addr, port: u16) -> Option<String> {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-m",
            "5",
            &format!("http://{addr}:{port}/index.html"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn web_port(manager_forwards: &[arrakis_runtime::network::PortForward]) -> u16 {
    manager_forwards
        .iter()
        .find(|f| f.guest_port == GUEST_WEB)
        .expect("a forward of the web port")
        .host_port
}

fn bridge_env() -> VmTestEnv {
    let mut env = VmTestEnv::new();
    env.config.network.mode = NetModeConfig::Bridge;
    env.config.network.bridge = BRIDGE.to_string();
    env.config.network.egress = EgressPolicy::AllowAll;
    env.config.network.forwards = Vec::new();
    env
}

fn web_spec(name: &str, egress: EgressPolicy) -> SandboxSpec {
    let mut spec = SandboxSpec::named(name);
    spec.egress = Some(egress);
    spec.forwards = vec![ForwardRequest {
        host_port: None,
        guest_port: GUEST_WEB,
        description: "web".into(),
    }];
    spec
}

fn addr_of(net: &Option<SandboxNet>) -> Ipv4Addr {
    net.as_ref().expect("a NIC").address.addr
}

#[test]
fn bridge_mode_forwards_isolates_and_enforces_egress() {
    if !is_root() {
        return;
    }
    in_clean_netns(|| {
        let outside = Outside::new();
        // Stands in for the host's own services (the API, say).
        let service = TcpListener::bind("0.0.0.0:0").unwrap();
        let service_port = service.local_addr().unwrap().port();
        let env = bridge_env();
        run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", async {
            let manager = env.manager().await;
            let a = manager
                .create(web_spec("a", EgressPolicy::AllowAll))
                .await
                .unwrap();
            let b = manager
                .create(web_spec("b", EgressPolicy::DenyAll))
                .await
                .unwrap();
            let agent_a = manager.agent("a").await.unwrap();
            let agent_b = manager.agent("b").await.unwrap();
            start_web(&agent_a).await;
            start_web(&agent_b).await;

            // Forwards: from loopback, another local address, another machine.
            let port_a = web_port(&a.forwards);
            assert_eq!(get(Ipv4Addr::LOCALHOST, port_a).as_deref(), Some("a"));
            assert_eq!(get(UPLINK, port_a).as_deref(), Some("a"));
            let url = format!("http://{UPLINK}:{port_a}/index.html");
            assert_eq!(outside.fetch(&url).as_deref(), Some("a\n"));
            assert_eq!(
                get(Ipv4Addr::LOCALHOST, web_port(&b.forwards)).as_deref(),
                Some("b")
            );

            // Isolation: not each other, not the host's services.
            let gateway = a.network.as_ref().unwrap().gateway;
            assert!(!guest_connects(&agent_a, addr_of(&b.network), GUEST_WEB).await);
            assert!(!guest_connects(&agent_a, gateway, service_port).await);
            assert!(!guest_connects(&agent_a, UPLINK, service_port).await);
            assert!(
                !guest_connects(&agent_a, gateway, port_a).await,
                "not even through a forward"
            );

            // Egress: allowed, denied, allow-listed, changed at runtime.
            assert!(guest_connects(&agent_a, OUTSIDE, OUTSIDE_PORT).await);
            assert!(!guest_connects(&agent_b, OUTSIDE, OUTSIDE_PORT).await);
            let listed = EgressPolicy::AllowList(vec!["198.51.100.0/24".parse().unwrap()]);
            manager.set_egress("b", listed).await.unwrap();
            assert!(guest_connects(&agent_b, OUTSIDE, OUTSIDE_PORT).await);
            let elsewhere = EgressPolicy::AllowList(vec!["10.99.0.0/16".parse().unwrap()]);
            manager.set_egress("a", elsewhere).await.unwrap();
            assert!(!guest_connects(&agent_a, OUTSIDE, OUTSIDE_PORT).await);
            manager
                .set_egress("a", EgressPolicy::DenyAll)
                .await
                .unwrap();
            assert!(!guest_connects(&agent_a, OUTSIDE, OUTSIDE_PORT).await);
            assert_eq!(
                get(Ipv4Addr::LOCALHOST, port_a).as_deref(),
                Some("a"),
                "forwards still reach a sandbox without egress"
            );

            // Forwards added and removed at runtime.
            let added = manager
                .add_forwards(
                    "b",
                    vec![ForwardRequest {
                        host_port: None,
                        guest_port: GUEST_WEB,
                        description: "second".into(),
                    }],
                )
                .await
                .unwrap();
            let extra = added[0].host_port;
            assert_eq!(get(Ipv4Addr::LOCALHOST, extra).as_deref(), Some("b"));
            manager
                .remove_forwards("b", Some(vec![extra]))
                .await
                .unwrap();
            assert_eq!(get(Ipv4Addr::LOCALHOST, extra), None);

            drop((agent_a, agent_b));
            manager.destroy("a").await.unwrap();
            manager.destroy("b").await.unwrap();
        });
        drop(outside);
        drop(service);
    });
}

/// Issue 4's forks, as machines: five forks of one snapshot run at once,
/// each with its own address, MAC, tap, hostname, machine-id and random
/// bytes, and its own forward of the web server that was running in the
/// parent; a write in one is not seen by another.
#[test]
fn forks_are_distinct_machines_with_their_own_forwards() {
    if !is_root() {
        return;
    }
    in_clean_netns(|| {
        let env = bridge_env();
        run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", async {
            let manager = env.manager().await;
            manager
                .create(web_spec("parent", EgressPolicy::AllowAll))
                .await
                .unwrap();
            start_web(&manager.agent("parent").await.unwrap()).await;
            manager.snapshot("parent", Some("p".into())).await.unwrap();
            let forks = manager
                .fork(ForkSource::Snapshot("p".into()), 5, "f")
                .await
                .unwrap();
            let mut seen = Vec::new();
            for fork in &forks {
                let agent = manager.agent(&fork.name).await.unwrap();
                let (facts, code) = sh(
                    &agent,
                    "hostname > /tmp/www/index.html && cat /sys/class/net/eth0/address && \
                     python3 -c 'import socket,fcntl,struct; s=socket.socket(); print(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack(\"256s\", b\"eth0\"))[20:24]))' && \
                     hostname && cat /etc/machine-id && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
                )
                .await;
                assert_eq!(code, 0, "{facts}");
                let facts: Vec<String> = facts.lines().map(str::to_string).collect();
                let net = fork.network.as_ref().unwrap();
                assert_eq!(facts[0], net.mac, "the guest has the MAC arrakis gave it");
                assert_eq!(facts[1], net.address.addr.to_string());
                assert_eq!(facts[2], fork.name);
                assert!(net.tap.is_some());
                // Its own forward reaches the web server restored in it.
                let port = web_port(&fork.forwards);
                assert_eq!(
                    get(Ipv4Addr::LOCALHOST, port).as_deref(),
                    Some(fork.name.as_str())
                );
                seen.push((facts, net.tap.clone(), port));
            }
            for i in 0..seen.len() {
                for j in i + 1..seen.len() {
                    for k in 0..5 {
                        assert_ne!(
                            seen[i].0[k], seen[j].0[k],
                            "forks {i} and {j} share fact {k}"
                        );
                    }
                    assert_ne!(seen[i].1, seen[j].1);
                    assert_ne!(seen[i].2, seen[j].2);
                }
            }
            let one = manager.agent("f-1").await.unwrap();
            let two = manager.agent("f-2").await.unwrap();
            sh(&one, "echo mine > /root/only-in-f1").await;
            assert_ne!(sh(&two, "cat /root/only-in-f1").await.1, 0);
            drop((one, two));
            destroy_all(&manager).await;
        });
    });
}

/// A restart keeps sandboxes reachable, removes a tap no sandbox owns, and
/// after the last destroy nothing of arrakis's is left.
#[test]
fn a_restart_reconciles_the_host_network() {
    if !is_root() {
        return;
    }
    in_clean_netns(|| {
        let env = bridge_env();
        run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", async {
            let manager = env.manager().await;
            let info = manager
                .create(web_spec("c", EgressPolicy::DenyAll))
                .await
                .unwrap();
            start_web(&manager.agent("c").await.unwrap()).await;
            drop(manager);
            // A stale tap on our bridge, as a crashed manager could leave.
            run_cmd(
                "ip",
                &["tuntap", "add", "dev", "ar0000000000000", "mode", "tap"],
            );
            run_cmd("ip", &["link", "set", "ar0000000000000", "master", BRIDGE]);
            let manager: Manager = env.manager().await;
            let links = run_cmd("ip", &["-br", "link"]);
            assert!(!links.contains("ar0000000000000"), "{links}");
            let port = web_port(&info.forwards);
            assert_eq!(get(Ipv4Addr::LOCALHOST, port).as_deref(), Some("c"));
            destroy_all(&manager).await;
            drop(manager);
            env.manager().await;
        });
    });
}

/// A named namespace set up the way CNI's bridge plugin leaves a pod's:
/// `eth0` with an address and a default route, its veth peer here.
struct PodNetns {
    name: String,
    host_if: String,
}

impl PodNetns {
    /// Called from inside the test's namespace; `n` picks 10.77.n.0/24.
    fn new(n: u8) -> PodNetns {
        let pod = PodNetns {
            name: format!("arrakis-pod-{}-{n}", std::process::id()),
            host_if: format!("vpod{n}"),
        };
        run_cmd("ip", &["netns", "add", &pod.name]);
        let host_addr = format!("10.77.{n}.1/24");
        run_cmd(
            "ip",
            &[
                "link",
                "add",
                &pod.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.name,
            ],
        );
        run_cmd("ip", &["addr", "add", &host_addr, "dev", &pod.host_if]);
        run_cmd("ip", &["link", "set", &pod.host_if, "up"]);
        pod.ip(&["addr", "add", &format!("10.77.{n}.2/24"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", &format!("10.77.{n}.1")]);
        pod
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// `ip ARGS` in the pod's namespace; its output.
    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend(args);
        run_cmd("ip", &full)
    }

    fn eth0_mac(&self) -> String {
        let out = self.ip(&["-j", "link", "show", "dev", "eth0"]);
        let links: serde_json::Value = serde_json::from_str(&out).unwrap();
        links[0]["address"].as_str().unwrap().to_string()
    }

    /// Interfaces and eth0's qdiscs, to see that a sandbox left nothing.
    fn leftovers(&self) -> String {
        let mut full = vec![
            "netns", "exec", &self.name, "tc", "qdisc", "show", "dev", "eth0",
        ];
        let qdiscs = run_cmd("ip", &full);
        full.truncate(3);
        full.extend(["ip", "-br", "link"]);
        let links = run_cmd("ip", &full);
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        format!("{names:?} {qdiscs}")
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Netns mode, as the containerd shim uses it with CNI: the VM takes over
/// the pod namespace's `eth0` (its address and MAC), answers on it from
/// the host side and reaches the host side; a second VM cannot take the
/// same interface; a warm start from the golden snapshot does the same in
/// another namespace; arrakis's own forwards are refused; a snapshot
/// restored into the namespace serves again from the same process; a
/// restore without a namespace falls back to bridge mode; and destroy
/// leaves the namespaces as they were.
#[test]
fn netns_mode_takes_over_a_pod_namespace() {
    if !is_root() {
        return;
    }
    in_clean_netns(|| {
        let mut env = bridge_env();
        env.config.network.mode = NetModeConfig::User;
        env.config.warm_start = true;
        let pods = [PodNetns::new(0), PodNetns::new(1)];
        let before: Vec<String> = pods.iter().map(PodNetns::leftovers).collect();
        let host_service = TcpListener::bind("10.77.0.1:0").unwrap();
        let host_port = host_service.local_addr().unwrap().port();
        run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", async {
            let manager = env.manager().await;
            for (n, pod) in pods.iter().enumerate() {
                let name = format!("pod{n}");
                let mut spec = SandboxSpec::named(&name);
                spec.netns = Some(pod.path());
                let info = manager.create(spec).await.unwrap();
                let net = info.network.as_ref().expect("a NIC");
                assert_eq!(net.mode, NetMode::Netns);
                let guest = Ipv4Addr::new(10, 77, n as u8, 2);
                assert_eq!(net.address.addr, guest);
                assert_eq!(net.mac, pod.eth0_mac());
                let agent = manager.agent(&name).await.unwrap();
                let (mac, _) = sh(&agent, "cat /sys/class/net/eth0/address").await;
                assert_eq!(mac, pod.eth0_mac(), "the guest NIC has eth0's MAC");
                start_web(&agent).await;
                assert_eq!(get(guest, GUEST_WEB).as_deref(), Some(name.as_str()));
                if n == 0 {
                    assert!(guest_connects(&agent, Ipv4Addr::new(10, 77, 0, 1), host_port).await);
                }
            }
            // The first boot kept a golden snapshot; the second was warm.
            assert_eq!(manager.golden_snapshots().await.unwrap().len(), 1);

            let mut taken = SandboxSpec::named("second");
            taken.netns = Some(pods[0].path());
            let error = manager.create(taken).await.unwrap_err();
            assert!(error.chain().contains("is taken"), "{}", error.chain());
            assert!(manager.get("second").await.is_err());

            let forward = ForwardRequest {
                host_port: None,
                guest_port: 80,
                description: String::new(),
            };
            let error = manager
                .add_forwards("pod0", vec![forward])
                .await
                .unwrap_err();
            assert!(error.chain().contains("CNI"), "{}", error.chain());

            manager.snapshot("pod0", Some("s".into())).await.unwrap();
            // The checkpoint/restore of the shim: the same processes back
            // in the same namespace, after the original is gone.
            manager.destroy("pod0").await.unwrap();
            let back = manager
                .restore_attached("s", "back", &pods[0].path())
                .await
                .unwrap();
            assert_eq!(back.network.as_ref().unwrap().mode, NetMode::Netns);
            let guest = Ipv4Addr::new(10, 77, 0, 2);
            assert_eq!(get(guest, GUEST_WEB).as_deref(), Some("pod0"));
            let restored = manager.restore("s", "plain").await.unwrap();
            // A tap, which the saved NIC needs: bridge mode.
            assert_eq!(restored.network.unwrap().mode, NetMode::Bridge);
            manager.delete_snapshot("s").await.unwrap();
            destroy_all(&manager).await;
            manager.clear_golden_snapshots().await.unwrap();
        });
        for (pod, before) in pods.iter().zip(before) {
            assert_eq!(pod.leftovers(), before, "nothing left in {}", pod.name);
        }
        drop(host_service);
    });
}

async fn destroy_all(manager: &Manager) {
    for info in manager.list().await.unwrap() {
        manager.destroy(&info.name).await.unwrap();
    }
}
