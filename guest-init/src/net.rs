//! Guest network setup without any user-space tool: brings interfaces up,
//! assigns the IPv4 address, installs the default route (classic `SIOC*`
//! ioctls through libc, since user images may lack `ip`) and writes
//! `/etc/resolv.conf`. Used at boot (from the command line) and by the
//! `Configure` request (e.g. after a restore gave the clone a new address).

use std::ffi::c_void;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use arrakis_protocol::NetworkConfig;

/// Errors of network configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid address {value:?}: expected IPv4 ADDR/PREFIX such as 10.0.0.2/24")]
    BadCidr { value: String },
    #[error("invalid {field} {value:?}: expected an IPv4 address")]
    BadAddr { field: &'static str, value: String },
    #[error("invalid MAC address {value:?}: expected a unicast aa:bb:cc:dd:ee:ff")]
    BadMac { value: String },
    #[error("invalid interface name {name:?}: 1 to 15 bytes, no '/', NUL or whitespace")]
    BadInterface { name: String },
    #[error("{op} on interface {interface} failed")]
    Ioctl {
        op: &'static str,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a configuration socket")]
    Socket(#[source] io::Error),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// An IPv4 address with its prefix length (`10.20.1.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Parses `ADDR/PREFIX`; the prefix is required and at most 32.
    pub fn parse(value: &str) -> Result<Ipv4Cidr, NetError> {
        let bad = || NetError::BadCidr {
            value: value.to_owned(),
        };
        let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }

    /// The netmask of the prefix (`/24` -> `255.255.255.0`).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

/// Validated settings for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSettings {
    pub interface: String,
    pub address: Ipv4Cidr,
    pub gateway: Option<Ipv4Addr>,
    pub nameservers: Vec<Ipv4Addr>,
    /// A new hardware address for the interface.
    pub mac: Option<[u8; 6]>,
}

impl NetSettings {
    /// Validates a `Configure` request's network part.
    pub fn from_request(config: &NetworkConfig) -> Result<NetSettings, NetError> {
        validate_interface(&config.interface)?;
        let address = Ipv4Cidr::parse(&config.address)?;
        let gateway = config
            .gateway
            .as_deref()
            .map(|gw| parse_addr("gateway", gw))
            .transpose()?;
        let nameservers = config
            .nameservers
            .iter()
            .map(|ns| parse_addr("nameserver", ns))
            .collect::<Result<Vec<_>, _>>()?;
        let mac = config.mac.as_deref().map(parse_mac).transpose()?;
        Ok(NetSettings {
            interface: config.interface.clone(),
            address,
            gateway,
            nameservers,
            mac,
        })
    }
}

fn parse_addr(field: &'static str, value: &str) -> Result<Ipv4Addr, NetError> {
    value.parse().map_err(|_| NetError::BadAddr {
        field,
        value: value.to_owned(),
    })
}

/// `aa:bb:cc:dd:ee:ff`, unicast (the low bit of the first byte clear).
fn parse_mac(value: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac {
        value: value.to_owned(),
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(bad());
    }
    Ok(mac)
}

fn validate_interface(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(NetError::BadInterface {
            name: name.to_owned(),
        })
    }
}

/// Brings the loopback interface up (the kernel assigns 127.0.0.1 itself).
pub fn loopback_up() -> Result<(), NetError> {
    let sock = config_socket()?;
    set_up(&sock, "lo")
}

/// Assigns the address, brings the interface up and replaces the default
/// route when a gateway is given. Nameservers are not touched here; see
/// [`write_resolv_conf`].
pub fn apply(settings: &NetSettings) -> Result<(), NetError> {
    validate_interface(&settings.interface)?;
    let sock = config_socket()?;
    let name = settings.interface.as_str();
    if let Some(mac) = settings.mac {
        set_mac(&sock, name, mac)?;
    }
    set_addr(
        &sock,
        name,
        libc::SIOCSIFADDR,
        "SIOCSIFADDR",
        settings.address.addr,
    )?;
    set_addr(
        &sock,
        name,
        libc::SIOCSIFNETMASK,
        "SIOCSIFNETMASK",
        settings.address.netmask(),
    )?;
    set_up(&sock, name)?;
    if let Some(gateway) = settings.gateway {
        // An old default route (e.g. of the VM this one was cloned from) would
        // make the add fail with EEXIST; its absence is not an error.
        let _ = route(&sock, name, libc::SIOCDELRT, "SIOCDELRT", None);
        route(&sock, name, libc::SIOCADDRT, "SIOCADDRT", Some(gateway))?;
    }
    Ok(())
}

/// The text of a resolv.conf naming these servers.
pub fn resolv_conf_text(nameservers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# written by arrakis-init\n");
    for ns in nameservers {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    text
}

/// Replaces `path` (normally `/etc/resolv.conf`) atomically. A symlink there
/// (e.g. to a systemd-resolved stub that does not run here) is replaced by a
/// regular file.
pub fn write_resolv_conf(path: &Path, nameservers: &[Ipv4Addr]) -> Result<(), NetError> {
    crate::system::write_atomic(path, resolv_conf_text(nameservers).as_bytes(), 0o644).map_err(
        |source| NetError::Write {
            path: path.display().to_string(),
            source,
        },
    )
}

fn config_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2) call with constant arguments; no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::c_ulong,
    op: &'static str,
    interface: &str,
    arg: *mut c_void,
) -> Result<(), NetError> {
    // SAFETY: every caller passes a pointer to a live, initialised struct of
    // the type `request` expects (ifreq or rtentry), valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_ioctl, sock.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(NetError::Ioctl {
            op,
            interface: interface.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct/union for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is valid for any bit pattern.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_addr(
    sock: &OwnedFd,
    name: &str,
    request: libc::c_ulong,
    op: &'static str,
    addr: Ipv4Addr,
) -> Result<(), NetError> {
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(sock, request, op, name, std::ptr::addr_of_mut!(req).cast())
}

/// Sets the hardware address; virtio-net takes it while the link is up
/// and tells the device (so its receive filter follows).
fn set_mac(sock: &OwnedFd, name: &str, mac: [u8; 6]) -> Result<(), NetError> {
    let mut req = ifreq_for(name);
    // SAFETY: sockaddr is a plain C struct for which all-zero bytes are valid.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ioctl(
        sock,
        libc::SIOCSIFHWADDR,
        "SIOCSIFHWADDR",
        name,
        std::ptr::addr_of_mut!(req).cast(),
    )
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), NetError> {
    let mut req = ifreq_for(name);
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        "SIOCGIFFLAGS",
        name,
        std::ptr::addr_of_mut!(req).cast(),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        "SIOCSIFFLAGS",
        name,
        std::ptr::addr_of_mut!(req).cast(),
    )
}

/// The kernel's `struct rtentry` (not exported by libc for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds or deletes the default route through `interface`.
fn route(
    sock: &OwnedFd,
    interface: &str,
    request: libc::c_ulong,
    op: &'static str,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let mut dev: Vec<libc::c_char> = interface.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    let mut flags = libc::RTF_UP;
    if gateway.is_some() {
        flags |= libc::RTF_GATEWAY;
    }
    let mut entry = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(
        sock,
        request,
        op,
        interface,
        std::ptr::addr_of_mut!(entry).cast(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_netmask() {
        let cidr = Ipv4Cidr::parse("10.20.1.2/24").unwrap();
        assert_eq!(cidr.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            Ipv4Cidr::parse("10.0.0.1/0").unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            Ipv4Cidr::parse("10.0.0.1/32").unwrap().netmask(),
            Ipv4Addr::BROADCAST
        );
        assert_eq!(
            Ipv4Cidr::parse("10.0.0.1/19").unwrap().netmask(),
            Ipv4Addr::new(255, 255, 224, 0)
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0/8",
            "::1/64",
            "10.0.0.1/-1",
            "x/8",
        ] {
            assert!(Ipv4Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_from_request_validate_every_field() {
        let mut config = NetworkConfig {
            interface: "eth0".into(),
            address: "10.1.2.3/16".into(),
            gateway: Some("10.1.0.1".into()),
            nameservers: vec!["1.1.1.1".into()],
            mac: Some("02:a5:0a:01:02:03".into()),
        };
        let settings = NetSettings::from_request(&config).unwrap();
        assert_eq!(settings.gateway, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(settings.nameservers, vec![Ipv4Addr::new(1, 1, 1, 1)]);
        assert_eq!(settings.mac, Some([2, 0xa5, 10, 1, 2, 3]));
        for bad in [
            "03:a5:0a:01:02:03",
            "02:a5:0a:01:02",
            "02-a5-0a-01-02-03",
            "zz:a5:0a:01:02:03",
        ] {
            config.mac = Some(bad.into());
            let err = NetSettings::from_request(&config).unwrap_err();
            assert!(matches!(err, NetError::BadMac { .. }), "{bad}: {err}");
        }
        config.mac = None;

        config.gateway = Some("gw".into());
        let err = NetSettings::from_request(&config).unwrap_err();
        assert!(err.to_string().contains("gateway"), "{err}");
        config.gateway = None;
        config.interface = "a-very-long-interface-name".into();
        assert!(matches!(
            NetSettings::from_request(&config),
            Err(NetError::BadInterface { .. })
        ));
    }

    #[test]
    fn resolv_conf_lists_servers_in_order() {
        let text = resolv_conf_text(&[Ipv4Addr::new(9, 9, 9, 9), Ipv4Addr::new(1, 0, 0, 1)]);
        assert!(
            text.ends_with("nameserver 9.9.9.9\nnameserver 1.0.0.1\n"),
            "{text}"
        );
    }

    #[test]
    fn resolv_conf_replaces_a_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub-resolv.conf", &path).unwrap();
        write_resolv_conf(&path, &[Ipv4Addr::new(10, 0, 0, 1)]).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("nameserver 10.0.0.1\n"));
    }
}
