//! Sandbox networking: every sandbox has one virtio-net NIC, an IPv4
//! address from the configured subnet, an egress policy and port forwards
//! (host port -> guest port).
//!
//! Two modes ([`NetMode`]):
//! - **bridge** (root): a bridge owned by arrakis, a tap per sandbox, NAT
//!   for egress, forwards as DNAT rules; every rule lives in arrakis's own
//!   nftables tables, generated whole from the store and replaced
//!   atomically on each change (see [`nft`]), so start-up reconciliation is
//!   the same operation as any change.
//! - **user** (no root): QEMU's user networking (slirp), with its host
//!   forwards for the same port list.
//! - **netns**: the sandbox joins a network namespace someone else set up
//!   (CNI, for the containerd shim): its tap lives in that namespace and
//!   traffic crosses to the namespace's interface by tc redirects, and the
//!   guest takes that interface's address and MAC (see [`netns`]). The
//!   namespace's owner does addressing, egress and port publishing.
//!
//! The address plan of the subnet (default `10.20.0.0/16`): the first host
//! address is the gateway (the bridge, or slirp's host), the second is
//! slirp's DNS proxy in user mode, and sandboxes get addresses from the
//! third on. A sandbox's MAC is derived from its address, so distinct
//! addresses give distinct MACs.

pub mod host;
pub mod netns;
pub mod nft;

/// Errors of the host side of networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Host(#[from] host::HostNetError),
}

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How sandboxes are networked, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetModeConfig {
    /// Bridge when this process may create bridges, taps and nftables rules
    /// (root with `CAP_NET_ADMIN`, `/dev/net/tun` and `nft` present), user
    /// otherwise.
    #[default]
    Auto,
    User,
    Bridge,
}

impl FromStr for NetModeConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(NetModeConfig::Auto),
            "user" => Ok(NetModeConfig::User),
            "bridge" => Ok(NetModeConfig::Bridge),
            _ => Err("expected one of: auto, user, bridge".to_string()),
        }
    }
}

/// How one sandbox is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    User,
    Bridge,
    Netns,
}

impl NetMode {
    /// What QEMU backs the NIC with: modes with the same backend can
    /// restore each other's snapshots.
    pub fn backend(self) -> &'static str {
        match self {
            NetMode::User => "user",
            NetMode::Bridge | NetMode::Netns => "tap",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::User => "user",
            NetMode::Bridge => "bridge",
            NetMode::Netns => "netns",
        }
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IPv4 network or address with its prefix length (`10.20.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is over 32"));
        }
        Ok(Ipv4Net { addr, prefix })
    }

    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The same network with its host bits cleared.
    pub fn trunc(&self) -> Ipv4Net {
        Ipv4Net {
            addr: self.network(),
            prefix: self.prefix,
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network())
    }

    /// The `n`th address of the network (0 is the network address), if it
    /// is a host address (not the network or broadcast address).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        if n == 0 || u64::from(n) + 1 >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network()) + n))
    }

    /// How many host addresses the network has.
    pub fn host_count(&self) -> u32 {
        let size = 1u64 << (32 - u32::from(self.prefix));
        u32::try_from(size.saturating_sub(2)).unwrap_or(u32::MAX)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    /// `ADDR/PREFIX`, or a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an IPv4 CIDR such as 10.20.0.0/16");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, prefix.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        Ipv4Net::new(addr, prefix).map_err(|_| bad())
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a sandbox may open connections to (beyond its own forwards'
/// replies). Serialized as `"allow"`, `"deny"` or a list of CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum EgressPolicy {
    /// Anywhere outside the host and other sandboxes.
    #[default]
    AllowAll,
    /// Nowhere.
    DenyAll,
    /// Only these networks.
    AllowList(Vec<Ipv4Net>),
}

/// Most CIDRs an allow-list may hold.
pub const MAX_EGRESS_CIDRS: usize = 256;

impl EgressPolicy {
    /// Checks the list's size; the CIDRs are valid by construction.
    pub fn validate(&self) -> Result<(), String> {
        if let EgressPolicy::AllowList(list) = self {
            if list.len() > MAX_EGRESS_CIDRS {
                return Err(format!(
                    "{} CIDRs; accepted: at most {MAX_EGRESS_CIDRS}",
                    list.len()
                ));
            }
        }
        Ok(())
    }
}

impl EgressPolicy {
    /// `allow`, `deny`, or IPv4 CIDRs separated by commas (the form of
    /// command-line flags and environment variables); a bare address is a
    /// /32 and host bits are cleared, as the API does. An error names the
    /// item at fault.
    pub fn parse_list(text: &str) -> Result<EgressPolicy, String> {
        match text.trim() {
            "allow" => Ok(EgressPolicy::AllowAll),
            "deny" => Ok(EgressPolicy::DenyAll),
            list => list
                .split(',')
                .map(|item| {
                    let item = item.trim();
                    item.parse::<Ipv4Net>().map(|net| net.trunc()).map_err(|_| {
                        format!(
                            "{item:?} is not an IPv4 CIDR; expected allow, deny or \
                             CIDR[,CIDR...], e.g. 10.0.0.0/8,192.168.1.0/24"
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(EgressPolicy::AllowList),
        }
    }
}

impl Serialize for EgressPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            EgressPolicy::AllowAll => serializer.serialize_str("allow"),
            EgressPolicy::DenyAll => serializer.serialize_str("deny"),
            EgressPolicy::AllowList(list) => list.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected \"allow\", \"deny\" or a list of IPv4 CIDRs")
        })? {
            Raw::Word(word) => match word.as_str() {
                "allow" => Ok(EgressPolicy::AllowAll),
                "deny" => Ok(EgressPolicy::DenyAll),
                _ => Err(serde::de::Error::custom(format!(
                    "{word:?}: expected \"allow\", \"deny\" or a list of IPv4 CIDRs"
                ))),
            },
            Raw::List(items) => items
                .iter()
                .map(|item| item.parse::<Ipv4Net>().map(|net| net.trunc()))
                .collect::<Result<Vec<_>, _>>()
                .map(EgressPolicy::AllowList)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressPolicy::AllowAll => f.write_str("allow"),
            EgressPolicy::DenyAll => f.write_str("deny"),
            EgressPolicy::AllowList(list) => {
                let items: Vec<String> = list.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", items.join(", "))
            }
        }
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC of a sandbox address: locally administered, unicast
    /// (`02:a5:` then the four address bytes), so distinct addresses give
    /// distinct MACs.
    pub fn for_address(addr: Ipv4Addr) -> Mac {
        let [a, b, c, d] = addr.octets();
        Mac([0x02, 0xa5, a, b, c, d])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The network of one sandbox, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNet {
    pub mode: NetMode,
    /// The guest's address, with the subnet's prefix length.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// What the guest's resolv.conf names.
    pub nameserver: Ipv4Addr,
    /// `02:a5:...`, see [`Mac::for_address`].
    pub mac: String,
    /// The host tap device (bridge mode).
    pub tap: Option<String>,
    pub egress: EgressPolicy,
    /// Where a netns-mode sandbox's NIC is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachedNet>,
}

/// A netns-mode NIC: tap `tap` in namespace `netns`, joined by tc
/// redirects to the namespace's `interface`, whose MTU it takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedNet {
    pub netns: PathBuf,
    pub interface: String,
    pub tap: String,
    pub mtu: u32,
}

/// One port forward: `host_port` on the host reaches `guest_port` on the
/// sandbox's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    pub host_port: u16,
    pub guest_port: u16,
    pub description: String,
}

/// A forward to add: the host port (`None` or 0: allocate one from the
/// configured range), the guest port and a description.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    #[serde(default)]
    pub host_port: Option<u16>,
    pub guest_port: u16,
    #[serde(default)]
    pub description: String,
}

impl ForwardRequest {
    /// Checks a batch of requests: guest ports 1-65535, no host port twice,
    /// descriptions of at most [`MAX_DESCRIPTION`] characters; 0 as host
    /// port becomes `None`.
    pub fn validate_all(requests: &mut [ForwardRequest]) -> Result<(), String> {
        if requests.len() > MAX_FORWARDS {
            return Err(format!(
                "{} forwards; accepted: at most {MAX_FORWARDS}",
                requests.len()
            ));
        }
        let mut hosts = std::collections::BTreeSet::new();
        for request in requests.iter_mut() {
            if request.guest_port == 0 {
                return Err("guestPort must be 1 to 65535".to_string());
            }
            if request.host_port == Some(0) {
                request.host_port = None;
            }
            if let Some(port) = request.host_port {
                if !hosts.insert(port) {
                    return Err(format!("hostPort {port} is given twice"));
                }
            }
            validate_description(&request.description)?;
        }
        Ok(())
    }
}

/// What a snapshot records of its sandbox's network: a restore recreates
/// the NIC in this mode (the saved device state includes it), with the
/// same policy and forwards of the same guest ports on new host ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotNet {
    pub mode: NetMode,
    pub egress: EgressPolicy,
    pub forwards: Vec<GuestForward>,
}

/// A forward without its host port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestForward {
    pub guest_port: u16,
    pub description: String,
}

/// An inclusive range of ports (`28000-32767`, or one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `PORT` or `FIRST-LAST` with 1 <= FIRST <= LAST <= 65535.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port (1-65535) or a range such as 5736-5740");
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?),
            None => {
                let p = port(s).ok_or_else(bad)?;
                (p, p)
            }
        };
        if first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u16),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n.to_string().parse(),
            Raw::Text(text) => text.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A forward every sandbox gets: a guest port or range, and its
/// description (a range's ports are described `"<description> (range
/// A-B)"`, as the original Arrakis did).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultForward {
    pub guest: PortRange,
    pub description: String,
}

impl DefaultForward {
    /// Each guest port of the entry with its description.
    pub fn expand(&self) -> Vec<(u16, String)> {
        if self.guest.first == self.guest.last {
            return vec![(self.guest.first, self.description.clone())];
        }
        let description = format!("{} (range {})", self.description, self.guest);
        (self.guest.first..=self.guest.last)
            .map(|port| (port, description.clone()))
            .collect()
    }
}

/// The `[network]` section of the runtime config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub mode: NetModeConfig,
    /// The bridge arrakis owns in bridge mode; also the name of its
    /// nftables tables. 1 to 15 of `a-z 0-9 _`, starting with a letter.
    pub bridge: String,
    /// Sandbox addresses come from here (see the module documentation).
    pub subnet: Ipv4Net,
    /// Host ports for forwards are allocated from this range.
    pub host_ports: PortRange,
    /// Forwards every new sandbox gets.
    pub forwards: Vec<DefaultForward>,
    /// The egress policy of a sandbox created without one.
    pub egress: EgressPolicy,
    /// Let sandboxes connect to each other (bridge mode).
    pub allow_inter_sandbox: bool,
    /// Let sandboxes connect to the host's own addresses (bridge mode).
    pub allow_host: bool,
    /// The resolver guests use is the host's: the first `nameserver` of
    /// this file (bridge mode; slirp reads the host's own in user mode).
    pub resolv_conf: PathBuf,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetModeConfig::Auto,
            bridge: "arrakis0".to_string(),
            subnet: Ipv4Net {
                addr: Ipv4Addr::new(10, 20, 0, 0),
                prefix: 16,
            },
            // Below Linux's ephemeral range (32768-60999): a port there can
            // be taken by any outgoing connection's source port between a
            // sandbox's stop and its start, and its forward cannot reopen.
            host_ports: PortRange {
                first: 28000,
                last: 32767,
            },
            forwards: vec![
                DefaultForward {
                    guest: PortRange {
                        first: 5901,
                        last: 5901,
                    },
                    description: "gui".to_string(),
                },
                DefaultForward {
                    guest: PortRange {
                        first: 5736,
                        last: 5740,
                    },
                    description: "code".to_string(),
                },
            ],
            egress: EgressPolicy::AllowAll,
            allow_inter_sandbox: false,
            allow_host: false,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// First host number of the subnet given to sandboxes (1: gateway, 2:
/// slirp's DNS).
pub const FIRST_SANDBOX_HOST: u32 = 3;

impl NetworkConfig {
    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_bridge_name(&self.bridge).map_err(|m| ("network.bridge", m))?;
        if self.subnet.prefix > 29 || self.subnet.prefix < 8 {
            return Err((
                "network.subnet",
                format!(
                    "{} is /{}; accepted: a prefix from /8 to /29",
                    self.subnet, self.subnet.prefix
                ),
            ));
        }
        if self.subnet.addr != self.subnet.network() {
            return Err((
                "network.subnet",
                format!(
                    "{} has host bits set; did you mean {}?",
                    self.subnet,
                    self.subnet.trunc()
                ),
            ));
        }
        if self.host_ports.first < 1024 {
            return Err((
                "network.host_ports",
                format!(
                    "{} starts below 1024; accepted: a range within 1024-65535",
                    self.host_ports
                ),
            ));
        }
        self.egress.validate().map_err(|m| ("network.egress", m))?;
        let mut seen = std::collections::BTreeSet::new();
        for forward in &self.forwards {
            validate_description(&forward.description).map_err(|m| ("network.forwards", m))?;
            for (port, _) in forward.expand() {
                if !seen.insert(port) {
                    return Err((
                        "network.forwards",
                        format!("guest port {port} is listed twice"),
                    ));
                }
            }
        }
        if seen.len() > MAX_FORWARDS {
            return Err((
                "network.forwards",
                format!(
                    "{} guest ports; accepted: at most {MAX_FORWARDS}",
                    seen.len()
                ),
            ));
        }
        Ok(())
    }

    /// The gateway address (the subnet's first host address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet
            .host(1)
            .expect("a validated subnet has host addresses")
    }

    /// Slirp's DNS proxy address in user mode.
    pub fn user_dns(&self) -> Ipv4Addr {
        self.subnet
            .host(2)
            .expect("a validated subnet has host addresses")
    }
}

/// Most forwards one sandbox may have.
pub const MAX_FORWARDS: usize = 64;

/// Longest forward description, in characters.
pub const MAX_DESCRIPTION: usize = 256;

pub fn validate_description(description: &str) -> Result<(), String> {
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(format!(
            "a description is over {MAX_DESCRIPTION} characters"
        ));
    }
    if description.chars().any(char::is_control) {
        return Err(format!(
            "the description {description:?} contains control characters"
        ));
    }
    Ok(())
}

/// Bridge (and nftables table) names: 1 to 15 of `a-z 0-9 _`, starting
/// with a letter.
pub fn validate_bridge_name(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: accepted: 1 to 15 of a-z, 0-9 and _, starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_parse_and_number_hosts() {
        let net: Ipv4Net = "10.20.0.0/16".parse().unwrap();
        assert_eq!(net.host(1), Some(Ipv4Addr::new(10, 20, 0, 1)));
        assert_eq!(net.host(256), Some(Ipv4Addr::new(10, 20, 1, 0)));
        assert_eq!(net.host(0), None);
        assert_eq!(net.host(65535), None);
        assert_eq!(net.host_count(), 65534);
        assert!(net.contains(Ipv4Addr::new(10, 20, 255, 1)));
        assert!(!net.contains(Ipv4Addr::new(10, 21, 0, 1)));
        let host: Ipv4Net = "192.168.1.7".parse().unwrap();
        assert_eq!(host.prefix, 32);
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/-1", ""] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.1.2.3/8".parse::<Ipv4Net>().unwrap().trunc().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn egress_policies_round_trip_as_json() {
        for (json, policy) in [
            (r#""allow""#, EgressPolicy::AllowAll),
            (r#""deny""#, EgressPolicy::DenyAll),
            (
                r#"["10.1.0.0/16","192.168.5.5/32"]"#,
                EgressPolicy::AllowList(vec![
                    "10.1.0.0/16".parse().unwrap(),
                    "192.168.5.5/32".parse().unwrap(),
                ]),
            ),
        ] {
            let parsed: EgressPolicy = serde_json::from_str(json).unwrap();
            assert_eq!(parsed, policy);
            assert_eq!(serde_json::to_string(&policy).unwrap(), json);
        }
        for bad in [r#""maybe""#, r#"["10.0.0.0/40"]"#, "3"] {
            let err = serde_json::from_str::<EgressPolicy>(bad).unwrap_err();
            assert!(err.to_string().contains("expected") || err.to_string().contains("CIDR"));
        }
    }

    #[test]
    fn macs_follow_addresses() {
        let mac = Mac::for_address(Ipv4Addr::new(10, 20, 1, 3));
        assert_eq!(mac.to_string(), "02:a5:0a:14:01:03");
    }

    #[test]
    fn port_ranges_and_default_forwards() {
        assert_eq!(
            "5736-5740".parse::<PortRange>().unwrap(),
            PortRange {
                first: 5736,
                last: 5740
            }
        );
        for bad in ["0", "5740-5736", "70000", "a-b", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let config = NetworkConfig::default();
        config.validate().unwrap();
        let ports: Vec<(u16, String)> = config.forwards.iter().flat_map(|f| f.expand()).collect();
        assert_eq!(ports.len(), 6);
        assert_eq!(ports[0], (5901, "gui".to_string()));
        assert_eq!(ports[1], (5736, "code (range 5736-5740)".to_string()));
    }

    #[test]
    fn validation_names_the_field() {
        let mut config = NetworkConfig {
            bridge: "Br-0".into(),
            ..NetworkConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().0, "network.bridge");
        config.bridge = "arrakis0".into();
        config.subnet = "10.20.0.1/16".parse().unwrap();
        assert!(config.validate().unwrap_err().1.contains("10.20.0.0/16"));
        config.subnet = "10.20.0.0/30".parse().unwrap();
        assert_eq!(config.validate().unwrap_err().0, "network.subnet");
        config.subnet = "10.20.0.0/24".parse().unwrap();
        config.forwards.push(DefaultForward {
            guest: "5738".parse().unwrap(),
            description: "again".into(),
        });
        assert!(config.validate().unwrap_err().1.contains("5738"));
    }
}
