//! arrakis's nftables rules in bridge mode: rendering the whole ruleset
//! from the recorded state, and applying it with `nft`.
//!
//! Everything lives in two tables named after the bridge, `table ip T`
//! (NAT, forwards, host protection, egress policy) and `table bridge T`
//! (anti-spoofing on each tap). A script from [`render`] first creates
//! each table, then deletes it, then declares it whole, all in one
//! `nft -f` transaction: applying it replaces whatever was there (or
//! nothing) atomically, so start-up reconciliation and every change are
//! the same operation, and other tables on the host are never touched.
//!
//! Rendering trusts only typed values. The table and bridge names must
//! have passed [`validate_bridge_name`](super::validate_bridge_name) (as
//! [`NetworkConfig::validate`](super::NetworkConfig::validate) ensures);
//! the per-sandbox strings from the store (id, tap, MAC) are checked here,
//! and a sandbox failing a check is left out, which fails closed: its
//! address is not in the egress map, so its traffic is dropped, and it
//! has no forwards. Forward descriptions never reach the script.
//!
//! Decisions worth knowing:
//! - Forwards DNAT on every local address (`fib daddr type local`), from
//!   outside (prerouting) and from the host itself (output, including
//!   127.0.0.1, which needs `route_localnet` on the bridge and the
//!   masquerade of loopback sources towards it). Both hooks jump to one
//!   `forwards` chain, so the route lookup is made once per connection.
//! - Sandboxes reach other sandboxes, by their addresses or through a
//!   forward on a host address (hairpin), only with `allow_inter_sandbox`;
//!   the hairpin is then masqueraded so the reply comes back through the
//!   host. Without it, bridge ports are isolated too (see
//!   [`super::host::create_tap`]). One case does not work: where
//!   `br_netfilter` is loaded (Docker hosts), a sandbox cannot reach its
//!   own forward through a host address, as the bridge will not send the
//!   DNATed frame back out of the port it came from.
//! - `route_localnet` would let a guest address the host's 127.0.0.0/8
//!   directly: that is dropped whatever `allow_host` says, except DNS
//!   DNATed to a loopback resolver.
//! - DNS to the gateway is accepted towards the upstream before the
//!   link-local drop, as cloud resolvers (169.254.169.253/254) live there;
//!   only port 53 of that one address gets through.
//! - Guests speak IPv4 and ARP only: any other ether type from a tap
//!   (IPv6, VLAN-tagged frames that would dodge the address checks) is
//!   dropped.
//! - A policy change applies to new connections: established ones are
//!   accepted before the per-sandbox chains.
//! - Our `accept` ends processing in our chains only: another table's
//!   `drop` on the same hook (say a `FORWARD` policy of drop set by Docker)
//!   still drops sandbox traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{EgressPolicy, Ipv4Net, Mac, NetMode, PortForward, SandboxNet};

/// Longest stretch of a command's stderr kept in an error.
const MAX_STDERR: usize = 4096;

/// How long one `nft` run may take; it normally takes milliseconds.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);

/// Link-local addresses, where cloud metadata services answer.
const LINK_LOCAL: &str = "169.254.0.0/16";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("`nft {args}` did not finish within {timeout:?}")]
    TimedOut { args: String, timeout: Duration },
}

/// The rules input of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRules {
    pub id: String,
    pub net: SandboxNet,
    pub forwards: Vec<PortForward>,
}

/// Everything the ruleset is a function of.
#[derive(Debug, Clone, Copy)]
pub struct Ruleset<'a> {
    /// The name of both tables; the bridge's name in practice.
    pub table: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Net,
    /// The bridge's address.
    pub gateway: Ipv4Addr,
    /// The host's resolver: guests' DNS to the gateway goes there.
    pub dns_upstream: Option<Ipv4Addr>,
    pub allow_inter_sandbox: bool,
    pub allow_host: bool,
    /// Only bridge-mode sandboxes with a tap are rendered.
    pub sandboxes: &'a [SandboxRules],
}

/// One sandbox that passed the checks, ready to render.
struct Entry<'a> {
    id: &'a str,
    tap: &'a str,
    addr: Ipv4Addr,
    mac: Mac,
    egress: &'a EgressPolicy,
    forwards: &'a [PortForward],
}

/// The `nft -f` script that replaces arrakis's tables with the rules for
/// `rules`.
pub fn render(rules: &Ruleset) -> String {
    let entries = entries(rules);
    let mut out = String::new();
    render_ip_table(&mut out, rules, &entries);
    render_bridge_table(&mut out, rules.table, &entries);
    out
}

/// The `nft -f` script that removes arrakis's tables; applying it when
/// they are absent succeeds too.
pub fn render_removal(table: &str) -> String {
    let mut out = String::new();
    for family in ["ip", "bridge"] {
        remove_table(&mut out, family, table);
    }
    out
}

/// Writes `table FAMILY NAME {}` then `delete table FAMILY NAME`: declaring
/// the (empty) table first makes the delete succeed whether or not it
/// existed, in the same transaction.
fn remove_table(out: &mut String, family: &str, table: &str) {
    let _ = writeln!(out, "table {family} {table} {{}}");
    let _ = writeln!(out, "delete table {family} {table}");
}

/// Runs `script` with `nft -f -`: one transaction, all or nothing.
pub async fn apply(script: &str) -> Result<(), NftError> {
    run_nft(&["-f", "-"], Some(script)).await.map(drop)
}

/// Whether either of arrakis's tables named `table` exists.
pub async fn table_exists(table: &str) -> Result<bool, NftError> {
    let listing = run_nft(&["list", "tables"], None).await?;
    Ok(lists_table(&listing, table))
}

/// Whether the output of `nft list tables` names `table ip|bridge TABLE`.
fn lists_table(listing: &str, table: &str) -> bool {
    listing.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        matches!(words.as_slice(), ["table", "ip" | "bridge", name] if *name == table)
    })
}

/// Runs `nft ARGS`, feeding it `stdin`; its stdout on success.
async fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let joined = args.join(" ");
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NftError::Spawn {
            args: joined.clone(),
            source,
        })?;
    let input = child.stdin.take();
    let feed = async move {
        if let (Some(mut pipe), Some(text)) = (input, stdin) {
            // A write error means nft exited early; its status and stderr
            // below say why.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
    };
    let run = async { tokio::join!(feed, child.wait_with_output()).1 };
    let output = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| NftError::TimedOut {
            args: joined.clone(),
            timeout: NFT_TIMEOUT,
        })?
        .map_err(|source| NftError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(NftError::Failed {
            args: joined,
            status: output.status.to_string(),
            stderr: stderr_text(&output.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A command's stderr for an error message: trimmed, and cut to
/// [`MAX_STDERR`] bytes (nft echoes the offending line of a long script).
pub(super) fn stderr_text(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim();
    if text.len() <= MAX_STDERR {
        return text.to_string();
    }
    let mut end = MAX_STDERR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The sandboxes to render, sorted by id so the script depends on the
/// state only. A sandbox failing a check, or claiming an address or tap
/// another one claims too, is left out (see the module documentation).
fn entries<'a>(rules: &Ruleset<'a>) -> Vec<Entry<'a>> {
    let mut entries: Vec<Entry<'a>> = rules
        .sandboxes
        .iter()
        .filter_map(|sandbox| entry(rules, sandbox))
        .collect();
    entries.sort_by(|a, b| a.id.cmp(b.id));
    let mut addrs: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    let mut taps: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in &entries {
        *addrs.entry(entry.addr).or_default() += 1;
        *taps.entry(entry.tap).or_default() += 1;
    }
    entries.retain(|entry| {
        let unique = addrs[&entry.addr] == 1 && taps[entry.tap] == 1;
        if !unique {
            tracing::warn!(sandbox = entry.id, addr = %entry.addr, tap = entry.tap,
                "another sandbox has the same address or tap; leaving both without network");
        }
        unique
    });
    entries
}

/// The renderable form of one bridge-mode sandbox, if it passes the checks.
fn entry<'a>(rules: &Ruleset<'a>, sandbox: &'a SandboxRules) -> Option<Entry<'a>> {
    let net = &sandbox.net;
    let tap = net.tap.as_deref().filter(|_| net.mode == NetMode::Bridge)?;
    let addr = net.address.addr;
    let checked = if !is_chain_suffix(&sandbox.id) {
        Err("its id is not 1 to 64 of a-z and 0-9")
    } else if !is_safe_ifname(tap) {
        Err("its tap name is not a plain interface name")
    } else if !rules.subnet.contains(addr) || addr == rules.gateway {
        Err("its address is not a sandbox address of the subnet")
    } else {
        parse_mac(&net.mac).ok_or("its MAC does not parse")
    };
    match checked {
        Ok(mac) => Some(Entry {
            id: &sandbox.id,
            tap,
            addr,
            mac,
            egress: &net.egress,
            forwards: &sandbox.forwards,
        }),
        Err(problem) => {
            tracing::warn!(sandbox = %sandbox.id, "leaving a sandbox without network: {problem}");
            None
        }
    }
}

/// Whether `id` can follow `sb_` in a chain name (ids are 16 hex digits).
fn is_chain_suffix(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `name` is an interface name that is safe inside nft quotes:
/// 1 to 15 of `A-Z a-z 0-9 _ - .`, so no quote, escape or `*` wildcard.
pub(super) fn is_safe_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `aa:bb:cc:dd:ee:ff` (either case) as a [`Mac`].
fn parse_mac(text: &str) -> Option<Mac> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut bytes {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(Mac(bytes))
}

/// Removes the table, then opens its new declaration, which therefore
/// starts from nothing.
fn fresh_table(out: &mut String, family: &str, table: &str) {
    remove_table(out, family, table);
    let _ = writeln!(out, "table {family} {table} {{");
}

/// Writes one chain: its hook line if it is a base chain, then its rules.
fn chain(out: &mut String, name: &str, header: Option<&str>, rules: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    if let Some(header) = header {
        let _ = writeln!(out, "\t\t{header};");
    }
    for rule in rules {
        let _ = writeln!(out, "\t\t{rule}");
    }
    let _ = writeln!(out, "\t}}");
}

/// `table ip T`: NAT, forwards, host protection and egress policies.
fn render_ip_table(out: &mut String, rules: &Ruleset, entries: &[Entry]) {
    fresh_table(out, "ip", rules.table);
    let nat = |hook: &str, priority: &str| {
        format!("type nat hook {hook} priority {priority}; policy accept")
    };
    chain(
        out,
        "prerouting",
        Some(&nat("prerouting", "dstnat")),
        &prerouting_rules(rules),
    );
    // The host's own connections to a forward, 127.0.0.1 included.
    chain(
        out,
        "output",
        Some(&nat("output", "-100")),
        &["fib daddr type local jump forwards".to_string()],
    );
    chain(out, "forwards", None, &forward_dnats(entries));
    chain(
        out,
        "postrouting",
        Some(&nat("postrouting", "srcnat")),
        &postrouting_rules(rules),
    );
    let filter = |hook: &str| format!("type filter hook {hook} priority filter; policy accept");
    chain(out, "input", Some(&filter("input")), &input_rules(rules));
    chain(
        out,
        "forward",
        Some(&filter("forward")),
        &forward_rules(rules, entries),
    );
    for entry in entries {
        chain(
            out,
            &format!("sb_{}", entry.id),
            None,
            &egress_rules(entry.egress),
        );
    }
    let _ = writeln!(out, "}}");
}

/// DNS to the gateway goes to the upstream; forwards on local addresses.
fn prerouting_rules(rules: &Ruleset) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(upstream) = rules.dns_upstream {
        for proto in ["udp", "tcp"] {
            out.push(format!(
                "iifname \"{}\" ip daddr {} {proto} dport 53 dnat to {upstream}:53",
                rules.bridge, rules.gateway
            ));
        }
    }
    out.push("fib daddr type local jump forwards".to_string());
    out
}

/// One DNAT per forward; the first of duplicate host ports wins.
fn forward_dnats(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|entry| {
            entry.forwards.iter().map(move |forward| {
                format!(
                    "tcp dport {} dnat to {}:{}",
                    forward.host_port, entry.addr, forward.guest_port
                )
            })
        })
        .collect()
}

/// Source NAT: egress, loopback to forwards, and the hairpin.
fn postrouting_rules(rules: &Ruleset) -> Vec<String> {
    let (bridge, subnet) = (rules.bridge, rules.subnet.trunc());
    let mut out = vec![
        // Egress NAT.
        format!("ip saddr {subnet} oifname != \"{bridge}\" masquerade"),
        // The host's 127.0.0.1 reaching a forward: guests cannot answer it.
        format!("ip saddr 127.0.0.0/8 oifname \"{bridge}\" masquerade"),
    ];
    if rules.allow_inter_sandbox {
        // A sandbox reaching a forward on a host address: the reply must
        // come back through the host to be un-NATed.
        out.push(format!(
            "oifname \"{bridge}\" ct status dnat ip saddr {subnet} masquerade"
        ));
    }
    out
}

/// Accept rules for DNS DNATed to the upstream, in input (a resolver on
/// the host) or forward (one elsewhere).
fn dns_accepts(rules: &Ruleset) -> Vec<String> {
    let Some(upstream) = rules.dns_upstream else {
        return Vec::new();
    };
    ["udp", "tcp"]
        .iter()
        .map(|proto| {
            format!(
                "iifname \"{}\" ip daddr {upstream} {proto} dport 53 ct status dnat accept",
                rules.bridge
            )
        })
        .collect()
}

/// What guests may send to the host itself.
fn input_rules(rules: &Ruleset) -> Vec<String> {
    let bridge = rules.bridge;
    let mut out = vec![format!(
        "iifname \"{bridge}\" ct state established,related accept"
    )];
    out.extend(dns_accepts(rules));
    out.push(format!("iifname \"{bridge}\" ip daddr 127.0.0.0/8 drop"));
    if !rules.allow_host {
        out.push(format!("iifname \"{bridge}\" drop"));
    }
    out
}

/// What is routed from and to sandboxes; other traffic is not ours.
fn forward_rules(rules: &Ruleset, entries: &[Entry]) -> Vec<String> {
    let bridge = rules.bridge;
    let inter = if rules.allow_inter_sandbox {
        "accept"
    } else {
        "drop"
    };
    let mut out = vec![
        format!("oifname \"{bridge}\" ct state established,related accept"),
        format!("iifname \"{bridge}\" ct state established,related accept"),
        format!("iifname \"{bridge}\" oifname \"{bridge}\" {inter}"),
        // Forwards, from anywhere but the bridge.
        format!("oifname \"{bridge}\" ct status dnat accept"),
        format!("oifname \"{bridge}\" drop"),
    ];
    // DNS whatever the egress policy, and before the link-local drop:
    // cloud resolvers live there.
    out.extend(dns_accepts(rules));
    out.push(format!("iifname \"{bridge}\" ip daddr {LINK_LOCAL} drop"));
    if !entries.is_empty() {
        let map: Vec<String> = entries
            .iter()
            .map(|entry| format!("{} : jump sb_{}", entry.addr, entry.id))
            .collect();
        out.push(format!(
            "iifname \"{bridge}\" ip saddr vmap {{ {} }}",
            map.join(", ")
        ));
    }
    // Sources no sandbox has.
    out.push(format!("iifname \"{bridge}\" drop"));
    out
}

/// The body of one sandbox's egress chain.
fn egress_rules(egress: &EgressPolicy) -> Vec<String> {
    match egress {
        EgressPolicy::AllowAll => vec!["accept".to_string()],
        EgressPolicy::DenyAll => vec!["drop".to_string()],
        EgressPolicy::AllowList(list) => {
            let nets: BTreeSet<Ipv4Net> = list.iter().map(Ipv4Net::trunc).collect();
            let mut out = Vec::new();
            if !nets.is_empty() {
                let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                out.push(format!("ip daddr {{ {} }} accept", nets.join(", ")));
            }
            out.push("drop".to_string());
            out
        }
    }
}

/// `table bridge T`: each tap may only send from its sandbox's MAC and
/// address, and only IPv4 and ARP.
fn render_bridge_table(out: &mut String, table: &str, entries: &[Entry]) {
    fresh_table(out, "bridge", table);
    let mut prerouting = Vec::new();
    if !entries.is_empty() {
        let map: Vec<String> = entries
            .iter()
            .map(|entry| format!("\"{}\" : jump sb_{}", entry.tap, entry.id))
            .collect();
        prerouting.push(format!("iifname vmap {{ {} }}", map.join(", ")));
    }
    chain(
        out,
        "prerouting",
        Some("type filter hook prerouting priority -300; policy accept"),
        &prerouting,
    );
    for entry in entries {
        let (mac, addr) = (entry.mac, entry.addr);
        chain(
            out,
            &format!("sb_{}", entry.id),
            None,
            &[
                format!("ether saddr != {mac} drop"),
                "ether type != { ip, arp } drop".to_string(),
                format!("ether type ip ip saddr != {addr} drop"),
                format!("ether type arp arp saddr ether != {mac} drop"),
                format!("ether type arp arp saddr ip != {addr} drop"),
            ],
        );
    }
    let _ = writeln!(out, "}}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, host: u8, egress: EgressPolicy, ports: &[(u16, u16)]) -> SandboxRules {
        let addr = Ipv4Addr::new(10, 20, 0, host);
        SandboxRules {
            id: id.to_string(),
            net: SandboxNet {
                mode: NetMode::Bridge,
                address: Ipv4Net { addr, prefix: 16 },
                gateway: Ipv4Addr::new(10, 20, 0, 1),
                nameserver: Ipv4Addr::new(10, 20, 0, 1),
                mac: Mac::for_address(addr).to_string(),
                tap: Some(format!("ar{}", &id[..13])),
                egress,
                attached: None,
            },
            forwards: ports
                .iter()
                .map(|&(host_port, guest_port)| PortForward {
                    host_port,
                    guest_port,
                    description: "x\" ; flush ruleset".to_string(),
                })
                .collect(),
        }
    }

    fn ruleset(sandboxes: &[SandboxRules]) -> Ruleset<'_> {
        Ruleset {
            table: "arrakis0",
            bridge: "arrakis0",
            subnet: "10.20.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 20, 0, 1),
            dns_upstream: Some(Ipv4Addr::new(127, 0, 0, 53)),
            allow_inter_sandbox: false,
            allow_host: false,
            sandboxes,
        }
    }

    fn lines(script: &str) -> Vec<&str> {
        script.lines().map(str::trim).collect()
    }

    #[test]
    fn renders_forwards_policies_and_anti_spoofing() {
        let allow = EgressPolicy::AllowList(vec![
            "8.8.8.8/32".parse().unwrap(),
            "1.2.3.4/24".parse().unwrap(),
        ]);
        let sandboxes = [
            sandbox("bbbbbbbbbbbbbbbb", 4, EgressPolicy::DenyAll, &[(40001, 22)]),
            sandbox("aaaaaaaaaaaaaaaa", 3, allow, &[(40000, 5901), (40002, 80)]),
        ];
        let script = render(&ruleset(&sandboxes));
        let lines = lines(&script);
        for expected in [
            "table ip arrakis0 {}",
            "delete table ip arrakis0",
            "table bridge arrakis0 {}",
            "delete table bridge arrakis0",
            "fib daddr type local jump forwards",
            "tcp dport 40000 dnat to 10.20.0.3:5901",
            "tcp dport 40002 dnat to 10.20.0.3:80",
            "tcp dport 40001 dnat to 10.20.0.4:22",
            "iifname \"arrakis0\" ip daddr 10.20.0.1 udp dport 53 dnat to 127.0.0.53:53",
            "iifname \"arrakis0\" ip daddr 10.20.0.1 tcp dport 53 dnat to 127.0.0.53:53",
            "ip saddr 10.20.0.0/16 oifname != \"arrakis0\" masquerade",
            "ip saddr 127.0.0.0/8 oifname \"arrakis0\" masquerade",
            "iifname \"arrakis0\" ip daddr 127.0.0.0/8 drop",
            "iifname \"arrakis0\" oifname \"arrakis0\" drop",
            "iifname \"arrakis0\" ip daddr 169.254.0.0/16 drop",
            "iifname \"arrakis0\" ip saddr vmap { 10.20.0.3 : jump sb_aaaaaaaaaaaaaaaa, \
             10.20.0.4 : jump sb_bbbbbbbbbbbbbbbb }",
            "ip daddr { 1.2.3.0/24, 8.8.8.8/32 } accept",
            "iifname vmap { \"araaaaaaaaaaaaa\" : jump sb_aaaaaaaaaaaaaaaa, \
             \"arbbbbbbbbbbbbb\" : jump sb_bbbbbbbbbbbbbbbb }",
            "ether saddr != 02:a5:0a:14:00:03 drop",
            "ether type ip ip saddr != 10.20.0.4 drop",
            "ether type arp arp saddr ip != 10.20.0.3 drop",
        ] {
            assert!(
                lines.contains(&expected),
                "missing {expected:?} in\n{script}"
            );
        }
        // Sorted by id: the same state renders the same script.
        let swapped = [sandboxes[1].clone(), sandboxes[0].clone()];
        assert_eq!(render(&ruleset(&swapped)), script);
        assert!(!script.contains("flush"), "a description leaked:\n{script}");
        // Host and inter-sandbox traffic dropped by default.
        assert!(lines.contains(&"iifname \"arrakis0\" drop"));
        assert!(!script.contains("ct status dnat ip saddr"));
    }

    #[test]
    fn egress_chains_follow_the_policy() {
        assert_eq!(egress_rules(&EgressPolicy::AllowAll), ["accept"]);
        assert_eq!(egress_rules(&EgressPolicy::DenyAll), ["drop"]);
        assert_eq!(egress_rules(&EgressPolicy::AllowList(vec![])), ["drop"]);
    }

    #[test]
    fn zero_sandboxes_render_no_empty_maps() {
        let script = render(&ruleset(&[]));
        assert!(!script.contains("vmap"), "{script}");
        assert!(!script.contains("{ }"), "{script}");
        assert!(!script.contains("dnat to 10."), "{script}");
        assert!(lines(&script).contains(&"iifname \"arrakis0\" drop"));
    }

    #[test]
    fn options_change_host_and_inter_sandbox_rules() {
        let mut rules = ruleset(&[]);
        rules.allow_host = true;
        rules.allow_inter_sandbox = true;
        rules.dns_upstream = None;
        let script = render(&rules);
        let lines = lines(&script);
        assert!(lines.contains(&"iifname \"arrakis0\" oifname \"arrakis0\" accept"));
        assert!(
            lines.contains(&"oifname \"arrakis0\" ct status dnat ip saddr 10.20.0.0/16 masquerade")
        );
        assert!(!script.contains("dport 53"), "{script}");
        // The input chain ends at the loopback drop; forward still drops
        // unknown sources.
        let input: Vec<&str> = lines
            .iter()
            .skip_while(|l| !l.starts_with("chain input"))
            .take_while(|l| **l != "}")
            .copied()
            .collect();
        assert!(!input.contains(&"iifname \"arrakis0\" drop"), "{input:?}");
    }

    #[test]
    fn bad_records_are_left_out() {
        let good = sandbox("aaaaaaaaaaaaaaaa", 3, EgressPolicy::AllowAll, &[(40000, 1)]);
        let mut bad_mac = sandbox("bbbbbbbbbbbbbbbb", 4, EgressPolicy::AllowAll, &[(40001, 1)]);
        bad_mac.net.mac = "02:a5:0a:14:00".to_string();
        let mut bad_tap = sandbox("cccccccccccccccc", 5, EgressPolicy::AllowAll, &[(40002, 1)]);
        bad_tap.net.tap = Some("ar\" drop".to_string());
        let mut outside = sandbox("dddddddddddddddd", 6, EgressPolicy::AllowAll, &[(40003, 1)]);
        outside.net.address.addr = Ipv4Addr::new(192, 168, 0, 6);
        let mut user = sandbox("eeeeeeeeeeeeeeee", 7, EgressPolicy::AllowAll, &[(40004, 1)]);
        user.net.mode = NetMode::User;
        let mut twin = sandbox("ffffffffffffffff", 8, EgressPolicy::AllowAll, &[(40005, 1)]);
        let mut twin2 = sandbox("9999999999999999", 8, EgressPolicy::AllowAll, &[(40006, 1)]);
        twin.net.address.addr = Ipv4Addr::new(10, 20, 0, 9);
        twin2.net.address.addr = Ipv4Addr::new(10, 20, 0, 9);
        let sandboxes = [good, bad_mac, bad_tap, outside, user, twin, twin2];
        let script = render(&ruleset(&sandboxes));
        assert!(script.contains("dport 40000 "), "{script}");
        for port in 40001..=40006 {
            assert!(
                !script.contains(&format!("dport {port} ")),
                "{port}:\n{script}"
            );
        }
        assert!(!script.contains("ar\" drop"), "{script}");
    }

    #[test]
    fn removal_covers_both_tables() {
        assert_eq!(
            render_removal("arrakis0"),
            "table ip arrakis0 {}\ndelete table ip arrakis0\n\
             table bridge arrakis0 {}\ndelete table bridge arrakis0\n"
        );
    }

    #[test]
    fn parses_macs_and_table_listings() {
        assert_eq!(
            parse_mac("02:A5:0a:14:00:03"),
            Some(Mac([2, 0xa5, 10, 20, 0, 3]))
        );
        for bad in [
            "",
            "02:a5:0a:14:00",
            "02:a5:0a:14:00:03:04",
            "2:a5:0a:14:00:03",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let listing = "table ip filter\ntable bridge arrakis0\ntable inet arrakis1\n";
        assert!(lists_table(listing, "arrakis0"));
        assert!(!lists_table(listing, "arrakis1"));
        assert!(!lists_table(listing, "arrakis"));
    }

    #[test]
    fn long_stderr_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_STDERR);
        let text = stderr_text(long.as_bytes());
        assert!(text.len() <= MAX_STDERR + 3);
        assert!(text.ends_with("..."));
        assert_eq!(stderr_text(b"  short\n"), "short");
    }
}
