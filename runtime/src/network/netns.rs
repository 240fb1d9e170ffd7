//! Netns mode: a sandbox's NIC joins a network namespace that someone else
//! set up, the way CNI sets one up for a container (a veth whose peer is on
//! a bridge, an address, a default route, port mappings on the host side).
//!
//! The VM's tap is made inside that namespace, and two tc filters join it
//! to the namespace's interface: everything arriving on the interface is
//! redirected out of the tap (to the guest), and everything the guest sends
//! out of the interface. The namespace's own stack never sees a packet. The
//! guest takes the interface's address, route and MAC, so to the rest of
//! the network the VM *is* that interface; nothing on the host side changes.
//! This is the tc-redirect model Kata Containers uses for the same job.
//!
//! QEMU must open the tap from inside the namespace: it is launched there
//! (see [`crate::vmm::NetBackend::Tap`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::host::{check_ifname, parse_json, run_tool, HostNetError, Link, TAP_PREFIX};
use super::{AttachedNet, Ipv4Net};

/// What the guest takes over from the namespace's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsInterface {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Deserialize)]
struct IpRoute {
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
}

/// The interface of namespace `netns` a VM can take over (see [`choose`]),
/// and the gateway of the namespace's default route through it.
pub async fn inspect(netns: &Path, own_tap: &str) -> Result<NetnsInterface, HostNetError> {
    let args = ["-d", "-j", "addr", "show"];
    let links: Vec<Link> = parse_json(&args, &run_tool("ip", &args, Some(netns)).await?)?;
    let (link, address) = choose(netns, &links, own_tap)?;
    let unusable = |why: String| HostNetError::NoInterface {
        netns: netns.to_path_buf(),
        why,
    };
    let args = ["-j", "-4", "route", "show", "default"];
    let routes: Vec<IpRoute> = parse_json(&args, &run_tool("ip", &args, Some(netns)).await?)?;
    let gateway = routes
        .iter()
        .filter(|r| r.dev.as_deref() == Some(link.ifname.as_str()))
        .find_map(|r| r.gateway.as_deref()?.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            unusable(format!(
                "it has no IPv4 default route through {}",
                link.ifname
            ))
        })?;
    let mac = link
        .address
        .clone()
        .ok_or_else(|| unusable(format!("{} has no MAC address", link.ifname)))?;
    Ok(NetnsInterface {
        name: link.ifname.clone(),
        mac,
        mtu: link.mtu.unwrap_or(1500),
        address,
        gateway,
    })
}

/// Of the `links` of namespace `netns` (`ip -d -j addr show`), the one
/// Ethernet interface (not loopback, not a tap) with an IPv4 address, and
/// that address. `NetnsTaken` when the tap of a sandbox other than
/// `own_tap`'s is there: two VMs cannot share one interface.
fn choose<'a>(
    netns: &Path,
    links: &'a [Link],
    own_tap: &str,
) -> Result<(&'a Link, Ipv4Net), HostNetError> {
    check_not_taken(netns, links, own_tap)?;
    let unusable = |why: String| HostNetError::NoInterface {
        netns: netns.to_path_buf(),
        why,
    };
    let mut candidates = links.iter().filter_map(|link| {
        if link.link_type.as_deref() != Some("ether") || is_tap(link) {
            return None;
        }
        let address = link.addr_info.iter().find(|a| a.family == "inet")?;
        Some((link, address))
    });
    let (link, address) = candidates
        .next()
        .ok_or_else(|| unusable("it has no Ethernet interface with an IPv4 address".into()))?;
    if let Some((other, _)) = candidates.next() {
        return Err(unusable(format!(
            "it has more than one interface with an IPv4 address ({} and {}); a VM takes one",
            link.ifname, other.ifname
        )));
    }
    let addr: Ipv4Addr = address
        .local
        .parse()
        .map_err(|_| unusable(format!("{} has address {:?}", link.ifname, address.local)))?;
    let net = Ipv4Net::new(addr, address.prefixlen)
        .map_err(|why| unusable(format!("{}: {why}", link.ifname)))?;
    Ok((link, net))
}

/// `NetnsTaken` when `links` hold a sandbox tap other than `own_tap`.
fn check_not_taken(netns: &Path, links: &[Link], own_tap: &str) -> Result<(), HostNetError> {
    match links
        .iter()
        .find(|l| is_tap(l) && l.ifname.starts_with(TAP_PREFIX) && l.ifname != own_tap)
    {
        Some(other) => Err(HostNetError::NetnsTaken {
            netns: netns.to_path_buf(),
            tap: other.ifname.clone(),
        }),
        None => Ok(()),
    }
}

/// Whether `link` is a tap (or tun) device.
fn is_tap(link: &Link) -> bool {
    link.kind() == "tun"
}

/// Makes the tap of `attached` in its namespace and joins it to the
/// namespace's interface both ways, with the interface's MTU. A tap of
/// that name from an earlier boot is made anew; another sandbox's tap there
/// is `NetnsTaken`. On failure nothing is left.
pub async fn attach(attached: &AttachedNet) -> Result<(), HostNetError> {
    let (netns, tap, interface) = (
        attached.netns.as_path(),
        attached.tap.as_str(),
        attached.interface.as_str(),
    );
    check_ifname(tap)?;
    check_ifname(interface)?;
    let args = ["-d", "-j", "link", "show"];
    let links: Vec<Link> = parse_json(&args, &run_tool("ip", &args, Some(netns)).await?)?;
    check_not_taken(netns, &links, tap)?;
    if links.iter().any(|l| l.ifname == tap) {
        run_tool("ip", &["link", "del", "dev", tap], Some(netns)).await?;
    }
    run_tool(
        "ip",
        &["tuntap", "add", "dev", tap, "mode", "tap"],
        Some(netns),
    )
    .await?;
    let result = async {
        let mtu = attached.mtu.to_string();
        run_tool(
            "ip",
            &["link", "set", "dev", tap, "mtu", &mtu, "up"],
            Some(netns),
        )
        .await?;
        redirect(netns, interface, tap).await?;
        redirect(netns, tap, interface).await
    }
    .await;
    if result.is_err() {
        if let Err(error) = detach(attached).await {
            tracing::warn!(%tap, %error, "cannot undo a half-made attachment");
        }
    }
    result
}

/// Sends every frame arriving on `from` out of `to`.
async fn redirect(netns: &Path, from: &str, to: &str) -> Result<(), HostNetError> {
    // An ingress qdisc left by an earlier attachment goes, with its filter.
    let _ = run_tool("tc", &["qdisc", "del", "dev", from, "ingress"], Some(netns)).await;
    run_tool("tc", &["qdisc", "add", "dev", from, "ingress"], Some(netns)).await?;
    #[rustfmt::skip]
    let filter = [
        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all",
        "u32", "match", "u8", "0", "0",
        "action", "mirred", "egress", "redirect", "dev", to,
    ];
    run_tool("tc", &filter, Some(netns)).await.map(drop)
}

/// Removes the tap and the redirect of `attached`; a namespace that is
/// gone (its owner deleted it, and everything in it) is fine.
pub async fn detach(attached: &AttachedNet) -> Result<(), HostNetError> {
    check_ifname(&attached.tap)?;
    check_ifname(&attached.interface)?;
    let netns = attached.netns.as_path();
    if !netns_exists(netns) {
        return Ok(());
    }
    let args = ["-j", "link", "show"];
    let links: Vec<Link> = parse_json(&args, &run_tool("ip", &args, Some(netns)).await?)?;
    // Without our tap this is not (or no longer) our namespace: a path
    // such as /proc/PID/ns/net may since name another process's.
    if !links.iter().any(|l| l.ifname == attached.tap) {
        return Ok(());
    }
    if links.iter().any(|l| l.ifname == attached.interface) {
        #[rustfmt::skip]
        let qdisc = ["qdisc", "del", "dev", attached.interface.as_str(), "ingress"];
        if let Err(error) = run_tool("tc", &qdisc, Some(netns)).await {
            tracing::debug!(%error, "no redirect to remove");
        }
    }
    run_tool("ip", &["link", "del", "dev", &attached.tap], Some(netns)).await?;
    Ok(())
}

/// Whether `path` still names a namespace (a file, usually a bind mount of
/// one; a vanished owner leaves nothing or an empty file).
fn netns_exists(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|file| {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: `fd` is open for the call and `stat` is a valid buffer
        // the kernel fills.
        let rc = unsafe { libc::fstatfs(fd, stat.as_mut_ptr()) };
        if rc != 0 {
            return false;
        }
        // SAFETY: fstatfs returned 0, so it filled `stat`.
        let kind = unsafe { stat.assume_init() }.f_type;
        // `f_type`'s integer type differs between targets.
        #[allow(clippy::unnecessary_cast)]
        let kind = kind as i64;
        kind == NSFS_MAGIC
    })
}

/// Makes the child `command` spawns join the network namespace open as
/// `namespace` before it runs its program; the caller's threads keep
/// theirs. `namespace` must stay open until the spawn returns.
pub fn join_in_child(command: &mut std::process::Command, namespace: &std::fs::File) {
    use std::os::unix::process::CommandExt;
    let fd = std::os::fd::AsRawFd::as_raw_fd(namespace);
    // SAFETY: between fork and exec the child only calls setns(2), which
    // is async-signal-safe, on a descriptor the caller keeps open until
    // the spawn returns.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `f_type` of nsfs, where namespace files live.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// A netns given by a caller: an absolute path to a namespace file, not
/// this process's own namespace (a VM taking over the host's interface
/// would cut the host off).
pub fn check_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    if !netns_exists(path) {
        return Err(format!(
            "{} is not a network namespace (expected a file such as /run/netns/NAME)",
            path.display()
        ));
    }
    if is_own_namespace(path) {
        return Err(format!(
            "{} is this process's own network namespace; a VM takes over the interface of \
             the namespace it is given",
            path.display()
        ));
    }
    Ok(path.to_path_buf())
}

/// Whether `path` is the network namespace this process runs in.
pub fn is_own_namespace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_one_ethernet_interface_with_an_address() {
        let links: Vec<Link> = serde_json::from_str(
            r#"[{"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
                 "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                {"ifname":"eth0","link_type":"ether","address":"ae:11:22:33:44:55","mtu":1500,
                 "linkinfo":{"info_kind":"veth"},
                 "addr_info":[{"family":"inet","local":"10.4.0.7","prefixlen":24},
                              {"family":"inet6","local":"fe80::1","prefixlen":64}]},
                {"ifname":"ar0123","link_type":"ether","linkinfo":{"info_kind":"tun"},
                 "addr_info":[]}]"#,
        )
        .unwrap();
        let netns = Path::new("/run/netns/pod");
        let (eth, address) = choose(netns, &links, "ar0123").unwrap();
        assert_eq!(eth.ifname, "eth0");
        assert_eq!(address.to_string(), "10.4.0.7/24");
        assert!(is_tap(&links[2]));
        // Another sandbox's tap there: taken.
        let err = choose(netns, &links, "ar9999").unwrap_err();
        assert!(matches!(err, HostNetError::NetnsTaken { .. }), "{err}");
    }

    #[test]
    fn a_namespace_path_must_be_absolute_and_a_namespace() {
        assert!(check_path(Path::new("run/netns/x")).is_err());
        let err = check_path(Path::new("/etc/hostname")).unwrap_err();
        assert!(err.contains("not a network namespace"), "{err}");
        let err = check_path(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(err.contains("own network namespace"), "{err}");
        assert!(is_own_namespace(Path::new("/proc/self/ns/net")));
        assert!(!is_own_namespace(Path::new("/etc/hostname")));
    }
}
