//! The `arrakis.*` keys of the kernel command line (`/proc/cmdline`): the
//! boot-time settings the host passes to the guest before any agent session.
//!
//! Parsing never fails: a bad value is reported in [`BootConfig::warnings`]
//! and the default is kept, so a typo on the host side cannot stop the boot.

use std::net::Ipv4Addr;

use crate::net::Ipv4Cidr;

/// The virtio-serial port name the agent listens on unless told otherwise.
pub const DEFAULT_PORT_NAME: &str = "org.arrakis.agent";
/// The hostname set when the command line names none.
pub const DEFAULT_HOSTNAME: &str = "arrakis";

/// Everything the guest takes from its kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Block device holding the root filesystem (`arrakis.root`).
    pub root: String,
    /// Filesystem type of the root device (`arrakis.rootfstype`).
    pub rootfstype: String,
    /// `arrakis.hostname`.
    pub hostname: String,
    /// Address of `eth0` (`arrakis.ip=ADDR/PREFIX`); no network setup when absent.
    pub ip: Option<Ipv4Cidr>,
    /// Default gateway (`arrakis.gw`).
    pub gateway: Option<Ipv4Addr>,
    /// Nameservers for `/etc/resolv.conf` (`arrakis.dns=ADDR[,ADDR]`).
    pub dns: Vec<Ipv4Addr>,
    /// Name of the virtio-serial port of the agent (`arrakis.port`).
    pub port: String,
    /// Verbose logging (`arrakis.debug=1`).
    pub debug: bool,
    /// Values that could not be parsed (the default was kept for each).
    pub warnings: Vec<String>,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            root: "/dev/vda".to_owned(),
            rootfstype: "ext4".to_owned(),
            hostname: DEFAULT_HOSTNAME.to_owned(),
            ip: None,
            gateway: None,
            dns: Vec::new(),
            port: DEFAULT_PORT_NAME.to_owned(),
            debug: false,
            warnings: Vec::new(),
        }
    }
}

impl BootConfig {
    /// Parses a kernel command line. Keys other than `arrakis.*` are ignored;
    /// when a key repeats, the last value wins.
    pub fn parse(cmdline: &str) -> BootConfig {
        let mut config = BootConfig::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(setting) = word.strip_prefix("arrakis.") else {
                continue;
            };
            let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
            config.apply(key, value);
        }
        config
    }

    fn apply(&mut self, key: &str, value: &str) {
        match key {
            "root" => self.set_nonempty_path(key, value, |c, v| c.root = v),
            "rootfstype" => self.set_nonempty_path(key, value, |c, v| c.rootfstype = v),
            "hostname" => match crate::system::validate_hostname(value) {
                Ok(()) => self.hostname = value.to_owned(),
                Err(e) => self.warn(key, value, &e.to_string()),
            },
            "ip" => match Ipv4Cidr::parse(value) {
                Ok(cidr) => self.ip = Some(cidr),
                Err(e) => self.warn(key, value, &e.to_string()),
            },
            "gw" => match value.parse::<Ipv4Addr>() {
                Ok(addr) => self.gateway = Some(addr),
                Err(_) => self.warn(key, value, "expected an IPv4 address"),
            },
            "dns" => {
                let parsed: Result<Vec<Ipv4Addr>, _> = value
                    .split(',')
                    .filter(|part| !part.is_empty())
                    .map(str::parse)
                    .collect();
                match parsed {
                    Ok(list) => self.dns = list,
                    Err(_) => self.warn(key, value, "expected IPv4 addresses separated by commas"),
                }
            }
            "port" => self.set_nonempty_path(key, value, |c, v| c.port = v),
            "debug" => self.debug = matches!(value, "" | "1" | "true" | "yes" | "on"),
            _ => self.warnings.push(format!("unknown key arrakis.{key}")),
        }
    }

    fn set_nonempty_path(&mut self, key: &str, value: &str, set: fn(&mut Self, String)) {
        if value.is_empty() {
            self.warn(key, value, "expected a non-empty value");
        } else {
            set(self, value.to_owned());
        }
    }

    fn warn(&mut self, key: &str, value: &str, why: &str) {
        self.warnings
            .push(format!("arrakis.{key}={value:?} ignored: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_nothing_is_given() {
        let config = BootConfig::parse("console=ttyS0 reboot=t panic=-1\n");
        assert_eq!(config, BootConfig::default());
        assert_eq!(config.root, "/dev/vda");
        assert_eq!(config.port, DEFAULT_PORT_NAME);
        assert!(!config.debug);
    }

    #[test]
    fn reads_every_key() {
        let config = BootConfig::parse(
            "console=ttyS0 arrakis.root=/dev/vdb arrakis.rootfstype=xfs arrakis.hostname=box-1 \
             arrakis.ip=10.20.1.2/24 arrakis.gw=10.20.1.1 arrakis.dns=1.1.1.1,8.8.8.8 \
             arrakis.port=org.example.port arrakis.debug=1 quiet",
        );
        assert_eq!(config.root, "/dev/vdb");
        assert_eq!(config.rootfstype, "xfs");
        assert_eq!(config.hostname, "box-1");
        let ip = config.ip.expect("ip parsed");
        assert_eq!(ip.addr, Ipv4Addr::new(10, 20, 1, 2));
        assert_eq!(ip.prefix, 24);
        assert_eq!(config.gateway, Some(Ipv4Addr::new(10, 20, 1, 1)));
        assert_eq!(
            config.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(config.port, "org.example.port");
        assert!(config.debug);
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn bad_values_keep_defaults_and_warn() {
        let config = BootConfig::parse(
            "arrakis.ip=10.0.0.300/24 arrakis.gw=nope arrakis.dns=1.1.1.1,x \
             arrakis.hostname=bad_name! arrakis.root= arrakis.colour=blue",
        );
        assert_eq!(config.ip, None);
        assert_eq!(config.gateway, None);
        assert!(config.dns.is_empty());
        assert_eq!(config.hostname, DEFAULT_HOSTNAME);
        assert_eq!(config.root, "/dev/vda");
        assert_eq!(config.warnings.len(), 6, "{:?}", config.warnings);
        assert!(config.warnings.iter().any(|w| w.contains("arrakis.colour")));
    }

    #[test]
    fn last_value_wins_and_debug_forms() {
        let config = BootConfig::parse("arrakis.hostname=a arrakis.hostname=b arrakis.debug");
        assert_eq!(config.hostname, "b");
        assert!(config.debug);
        assert!(!BootConfig::parse("arrakis.debug=0").debug);
    }

    #[test]
    fn prefix_out_of_range_is_rejected() {
        assert_eq!(BootConfig::parse("arrakis.ip=10.0.0.2/33").ip, None);
        assert_eq!(BootConfig::parse("arrakis.ip=10.0.0.2").ip, None);
    }
}
