//! The host side of bridge mode: arrakis's bridge, one tap per sandbox,
//! the sysctls forwarding needs, and what the host offers (can we manage
//! its network at all, which resolver does it use).
//!
//! Everything goes through `ip` (iproute2), with `-j` where we read, and
//! through `/proc/sys` files, never through `/sys/class/net`: the latter
//! shows the network namespace sysfs was mounted in, while `ip`, `nft` and
//! `/proc/sys/net` follow the calling thread's, which is what the tests
//! (a namespace per thread) and any caller in a namespace need. Existence
//! is decided from `ip -j link show` listings, never from error text.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use super::nft::{is_safe_ifname, stderr_text};
use super::{validate_bridge_name, Ipv4Net};

/// Every tap arrakis makes starts with this.
pub const TAP_PREFIX: &str = "ar";

/// How long one `ip` run may take; it normally takes milliseconds.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error(
        "{name:?} is not a usable interface name: accepted: 1 to 15 of a-z, A-Z, 0-9, _, - and ."
    )]
    InvalidName { name: String },
    #[error("cannot run `{program} {}`", .args.join(" "))]
    Spawn {
        program: &'static str,
        args: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {}` failed ({status}): {stderr}", .args.join(" "))]
    Failed {
        program: &'static str,
        args: Vec<String>,
        status: String,
        stderr: String,
    },
    #[error("`{program} {}` did not finish within {timeout:?}", .args.join(" "))]
    TimedOut {
        program: &'static str,
        args: Vec<String>,
        timeout: Duration,
    },
    #[error("cannot parse the output of `{program} {}`", .args.join(" "))]
    Parse {
        program: &'static str,
        args: Vec<String>,
        #[source]
        source: serde_json::Error,
    },
    #[error("{name} exists but is a {kind:?} device, not a bridge")]
    NotABridge { name: String, kind: String },
    #[error("{name} exists but is a {kind:?} device, not a tap")]
    NotATap { name: String, kind: String },
    #[error("network namespace {} cannot hold a VM: {why}", .netns.display())]
    NoInterface { netns: PathBuf, why: String },
    #[error("network namespace {} is taken: sandbox tap {tap} is already attached there", .netns.display())]
    NetnsTaken { netns: PathBuf, tap: String },
    #[error("cannot set {path} to {value}")]
    Sysctl {
        path: PathBuf,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The tap of sandbox `sandbox_id`: [`TAP_PREFIX`] and the first 13
/// characters of the id, within the kernel's 15-byte limit. Ids are random
/// hex, so 52 bits keep taps distinct.
pub fn tap_name(sandbox_id: &str) -> String {
    let head: String = sandbox_id.chars().take(13).collect();
    format!("{TAP_PREFIX}{head}")
}

/// One interface in `ip -j [-d] link show` or `ip -j [-d] addr show`
/// (which adds `addr_info`).
#[derive(Debug, Deserialize)]
pub(super) struct Link {
    pub ifname: String,
    #[serde(default)]
    pub master: Option<String>,
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
    /// The MAC address, for Ethernet links.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub link_type: Option<String>,
    #[serde(default)]
    pub addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LinkInfo {
    #[serde(default)]
    pub info_kind: Option<String>,
}

impl Link {
    /// The link's kind with `-d` (`bridge`, `tun`, `veth`...), or "".
    pub(super) fn kind(&self) -> &str {
        self.linkinfo
            .as_ref()
            .and_then(|info| info.info_kind.as_deref())
            .unwrap_or("")
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct AddrInfo {
    pub family: String,
    pub local: String,
    pub prefixlen: u8,
}

/// Makes bridge `bridge` exist, with exactly the IPv4 address `gateway`
/// (e.g. `10.20.0.1/16`), up, with forwarding on. Idempotent: this is also
/// how a host reboot or a changed subnet is repaired.
///
/// The bridge is arrakis's: other IPv4 addresses on it (a former subnet)
/// are removed. Besides `ip_forward`, it sets the bridge's
/// `route_localnet` (DNAT from the host's 127.0.0.1 to a forward, and DNS
/// DNATed to a loopback resolver) and turns IPv6 off on it (guests are
/// IPv4 only, and the tables filter IPv4 only).
pub async fn ensure_bridge(bridge: &str, gateway: Ipv4Net) -> Result<(), HostNetError> {
    check_bridge_name(bridge)?;
    match find_link(bridge).await? {
        None => {
            run_ip(&["link", "add", "name", bridge, "type", "bridge"]).await?;
        }
        Some(link) if link.kind() != "bridge" => {
            return Err(HostNetError::NotABridge {
                name: bridge.to_string(),
                kind: link.kind().to_string(),
            })
        }
        Some(_) => {}
    }
    set_address(bridge, gateway).await?;
    run_ip(&["link", "set", "dev", bridge, "up"]).await?;
    set_sysctl(Path::new("/proc/sys/net/ipv4/ip_forward"), "1", true)?;
    let localnet = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    set_sysctl(Path::new(&localnet), "1", true)?;
    // A kernel without IPv6 has no such file, and nothing to turn off.
    let ipv6 = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    set_sysctl(Path::new(&ipv6), "1", false)
}

/// Leaves `gateway` as the only IPv4 address of `bridge`.
async fn set_address(bridge: &str, gateway: Ipv4Net) -> Result<(), HostNetError> {
    let args = ["-j", "addr", "show", "dev", bridge];
    let links: Vec<Link> = parse_json(&args, &run_ip(&args).await?)?;
    let wanted = gateway.to_string();
    let mut present = false;
    for info in links.iter().flat_map(|l| &l.addr_info) {
        if info.family != "inet" {
            continue;
        }
        let have = format!("{}/{}", info.local, info.prefixlen);
        if have == wanted {
            present = true;
        } else {
            run_ip(&["addr", "del", &have, "dev", bridge]).await?;
        }
    }
    if !present {
        run_ip(&["addr", "add", &wanted, "dev", bridge]).await?;
    }
    Ok(())
}

/// Writes `value` to the sysctl file `path` unless it holds it already
/// (so a host where an administrator set it, and `/proc/sys` is read-only,
/// still works). Synchronous on purpose: `/proc/sys/net` answers for the calling thread's namespace,
/// and these are tiny procfs writes.
fn set_sysctl(path: &Path, value: &'static str, required: bool) -> Result<(), HostNetError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    match std::fs::write(path, value) {
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        result => result.map_err(|source| HostNetError::Sysctl {
            path: path.to_path_buf(),
            value,
            source,
        }),
    }
}

/// Makes tap `tap` anew as a port of `bridge` and brings it up; QEMU then
/// opens it with `-netdev tap,ifname=TAP,script=no,downscript=no`. An old
/// tap of that name (a crashed run) is replaced. `isolated` ports cannot
/// exchange frames with each other, only with the bridge itself: that is
/// how sandboxes are kept apart on the link, below the nftables rules.
pub async fn create_tap(tap: &str, bridge: &str, isolated: bool) -> Result<(), HostNetError> {
    check_ifname(tap)?;
    check_bridge_name(bridge)?;
    if let Some(old) = find_link(tap).await? {
        if old.kind() != "tun" {
            return Err(HostNetError::NotATap {
                name: tap.to_string(),
                kind: old.kind().to_string(),
            });
        }
        delete_link(tap).await?;
    }
    run_ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    let isolated = if isolated { "on" } else { "off" };
    let configured = async {
        run_ip(&["link", "set", "dev", tap, "master", bridge]).await?;
        let port = ["link", "set", "dev", tap, "type", "bridge_slave"];
        run_ip(&[&port[..], &["isolated", isolated]].concat()).await?;
        run_ip(&["link", "set", "dev", tap, "up"]).await.map(drop)
    }
    .await;
    if configured.is_err() {
        // A tap half set up (say, not isolated) must not stay around.
        if let Err(error) = delete_link(tap).await {
            tracing::warn!(%tap, %error, "cannot remove a tap that failed to set up");
        }
    }
    configured
}

/// Removes tap `tap`; one that does not exist is fine.
pub async fn delete_tap(tap: &str) -> Result<(), HostNetError> {
    check_ifname(tap)?;
    delete_link(tap).await
}

/// The interfaces attached to `bridge` whose names start with
/// [`TAP_PREFIX`], sorted; none when the bridge does not exist.
pub async fn taps_on(bridge: &str) -> Result<Vec<String>, HostNetError> {
    check_bridge_name(bridge)?;
    let mut taps: Vec<String> = list_links()
        .await?
        .into_iter()
        .filter(|link| link.master.as_deref() == Some(bridge))
        .filter(|link| link.ifname.starts_with(TAP_PREFIX))
        .map(|link| link.ifname)
        .collect();
    taps.sort();
    Ok(taps)
}

/// Removes `bridge` (its ports are detached, not deleted); one that does
/// not exist is fine.
pub async fn delete_bridge(bridge: &str) -> Result<(), HostNetError> {
    check_bridge_name(bridge)?;
    delete_link(bridge).await
}

/// Whether bridge mode can work here: root, `/dev/net/tun`, and `nft` and
/// `ip` on `PATH`. The error lists everything missing.
pub fn can_manage() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (effective uid 0)".to_string());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_string());
    }
    for program in ["nft", "ip"] {
        if !on_path(program) {
            missing.push(format!("`{program}` on PATH"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing {}", missing.join(", ")))
    }
}

/// Whether an executable file `program` is in a `PATH` directory.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// The first IPv4 `nameserver` of the resolv.conf at `resolv_conf`; none
/// when the file is unreadable or names only IPv6 resolvers.
pub fn host_nameserver(resolv_conf: &Path) -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string(resolv_conf).ok()?;
    nameserver_in(&text)
}

fn nameserver_in(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("nameserver"), Some(addr)) => addr.parse().ok(),
            _ => None,
        }
    })
}

pub(super) fn check_ifname(name: &str) -> Result<(), HostNetError> {
    if is_safe_ifname(name) {
        Ok(())
    } else {
        Err(HostNetError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn check_bridge_name(name: &str) -> Result<(), HostNetError> {
    validate_bridge_name(name).map_err(|_| HostNetError::InvalidName {
        name: name.to_string(),
    })
}

/// Every interface, with its kind (`ip -d` adds `linkinfo`).
async fn list_links() -> Result<Vec<Link>, HostNetError> {
    let args = ["-d", "-j", "link", "show"];
    parse_json(&args, &run_ip(&args).await?)
}

async fn find_link(name: &str) -> Result<Option<Link>, HostNetError> {
    Ok(list_links().await?.into_iter().find(|l| l.ifname == name))
}

/// Deletes interface `name` if it exists. A failed delete of an interface
/// that is gone afterwards (someone else removed it) is a success.
async fn delete_link(name: &str) -> Result<(), HostNetError> {
    if find_link(name).await?.is_none() {
        return Ok(());
    }
    match run_ip(&["link", "del", "dev", name]).await {
        Err(error) if matches!(find_link(name).await, Ok(None)) => {
            tracing::debug!(%name, %error, "interface vanished while deleting it");
            Ok(())
        }
        result => result.map(drop),
    }
}

pub(super) fn parse_json<T: for<'de> Deserialize<'de>>(
    args: &[&str],
    stdout: &str,
) -> Result<T, HostNetError> {
    serde_json::from_str(stdout).map_err(|source| HostNetError::Parse {
        program: "ip",
        args: owned(args),
        source,
    })
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Runs `ip ARGS`; its stdout on success.
async fn run_ip(args: &[&str]) -> Result<String, HostNetError> {
    run_tool("ip", args, None).await
}

/// Runs `program ARGS` (an iproute2 tool), in network namespace `netns`
/// (a path such as `/run/netns/NAME`) when given; its stdout on success.
pub(super) async fn run_tool(
    program: &'static str,
    args: &[&str],
    netns: Option<&Path>,
) -> Result<String, HostNetError> {
    let spawn_error = |source| HostNetError::Spawn {
        program,
        args: owned(args),
        source,
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Opened here, entered in the child: the caller's threads keep their
    // namespace.
    let namespace = netns
        .map(std::fs::File::open)
        .transpose()
        .map_err(spawn_error)?;
    if let Some(file) = &namespace {
        super::netns::join_in_child(command.as_std_mut(), file);
    }
    let child = command.spawn().map_err(spawn_error)?;
    drop(namespace);
    let output = tokio::time::timeout(IP_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| HostNetError::TimedOut {
            program,
            args: owned(args),
            timeout: IP_TIMEOUT,
        })?
        .map_err(spawn_error)?;
    if !output.status.success() {
        return Err(HostNetError::Failed {
            program,
            args: owned(args),
            status: output.status.to_string(),
            stderr: stderr_text(&output.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernel_limit() {
        let tap = tap_name("0123456789abcdef");
        assert_eq!(tap, "ar0123456789abc");
        assert_eq!(tap.len(), 15);
        assert!(is_safe_ifname(&tap));
        assert_eq!(tap_name("abc"), "arabc");
    }

    #[test]
    fn finds_the_first_ipv4_nameserver() {
        let text = "# generated\nsearch example.com\nnameserver fe80::1%eth0\n\
                    ;nameserver 9.9.9.9\nnameserver\tbogus\n  nameserver 1.1.1.1\nnameserver 8.8.8.8\n";
        assert_eq!(nameserver_in(text), Some(Ipv4Addr::new(1, 1, 1, 1)));
        assert_eq!(nameserver_in("nameserver ::1\n"), None);
        assert_eq!(host_nameserver(Path::new("/nonexistent/resolv.conf")), None);
    }

    #[test]
    fn parses_ip_link_listings() {
        let json = r#"[{"ifindex":1,"ifname":"lo","flags":[]},
            {"ifindex":2,"ifname":"br9","linkinfo":{"info_kind":"bridge","info_data":{}}},
            {"ifindex":3,"ifname":"ar0123","master":"br9","linkinfo":{"info_kind":"tun",
             "info_slave_kind":"bridge"}}]"#;
        let links: Vec<Link> = parse_json(&["link"], json).unwrap();
        assert_eq!(links[0].kind(), "");
        assert_eq!(links[1].kind(), "bridge");
        assert_eq!(links[2].master.as_deref(), Some("br9"));
        assert_eq!(links[2].kind(), "tun");
        assert!(matches!(
            parse_json::<Vec<Link>>(&["link"], "not json"),
            Err(HostNetError::Parse { .. })
        ));
    }

    #[test]
    fn rejects_names_that_are_not_plain() {
        for bad in ["", "ar\"x", "ar*", "a b", "0123456789abcdef", "ar/x"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        assert!(check_bridge_name("Br0").is_err());
        assert!(check_bridge_name("arrakis0").is_ok());
    }
}
