//! The sandbox side of networking (see [`crate::network`]): leasing an
//! address and host ports, the host side of bridge mode (tap, nftables
//! rules), forwards and egress policy changes at runtime, and bringing the
//! host in line with the store at start-up.
//!
//! Bridge mode keeps one rule: the bridge, the taps and arrakis's nftables
//! tables exist exactly while bridge-mode sandboxes are recorded. Every
//! change re-renders the whole ruleset from the store and replaces it in
//! one `nft` transaction, under a lock shared by every process on this
//! state directory, so the last writer always applies the latest state.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;

use super::Manager;
use crate::error::RuntimeError;
use crate::lock::SandboxLock;
use crate::network::{
    host, netns, nft, AttachedNet, EgressPolicy, ForwardRequest, GuestForward, Mac, NetError,
    NetMode, NetModeConfig, PortForward, PortRange, SandboxNet, SnapshotNet, FIRST_SANDBOX_HOST,
    MAX_FORWARDS,
};
use crate::sandbox::Operation;
use crate::store::{SandboxRecord, StoreError};
use crate::vmm::{HostForward, NetBackend, VmNetwork};

/// The name the guest kernel gives the one NIC.
const GUEST_INTERFACE: &str = "eth0";

/// What a new sandbox's network should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NetPlan {
    pub mode: NetMode,
    pub egress: EgressPolicy,
    pub forwards: Vec<ForwardRequest>,
    /// The namespace a netns-mode NIC joins (`Some` exactly in that mode).
    pub netns: Option<PathBuf>,
}

impl NetPlan {
    /// The plan of a NIC that joins namespace `path` (netns mode); the
    /// path must name a namespace that is not this process's.
    pub fn attached(path: &std::path::Path) -> Result<NetPlan, RuntimeError> {
        let netns = netns::check_path(path).map_err(|message| RuntimeError::InvalidArgument {
            field: "netns",
            message,
        })?;
        Ok(NetPlan {
            mode: NetMode::Netns,
            egress: EgressPolicy::AllowAll,
            forwards: Vec::new(),
            netns: Some(netns),
        })
    }

    /// The plan for a sandbox restored from a snapshot with `net`: its mode
    /// and policy, and its forwards' guest ports on new host ports. A
    /// netns-mode snapshot's namespace belonged to its sandbox: restored
    /// without one, the clone gets bridge mode (a tap as well, which its
    /// saved NIC needs) and the default policy.
    pub fn from_snapshot(net: &SnapshotNet) -> NetPlan {
        if net.mode == NetMode::Netns {
            return NetPlan {
                mode: NetMode::Bridge,
                egress: EgressPolicy::AllowAll,
                forwards: Vec::new(),
                netns: None,
            };
        }
        NetPlan {
            netns: None,
            mode: net.mode,
            egress: net.egress.clone(),
            forwards: net
                .forwards
                .iter()
                .map(|f| ForwardRequest {
                    host_port: None,
                    guest_port: f.guest_port,
                    description: f.description.clone(),
                })
                .collect(),
        }
    }
}

/// Resolves the configured mode: `auto` is bridge when this process can
/// manage the host's network, user otherwise.
pub(super) fn choose_mode(configured: NetModeConfig) -> Result<NetMode, RuntimeError> {
    match configured {
        NetModeConfig::User => Ok(NetMode::User),
        NetModeConfig::Auto => Ok(match host::can_manage() {
            Ok(()) => NetMode::Bridge,
            Err(_) => NetMode::User,
        }),
        NetModeConfig::Bridge => host::can_manage().map(|()| NetMode::Bridge).map_err(|why| {
            RuntimeError::NetworkUnsupported(format!(
                "network.mode = \"bridge\" cannot work here: {why}; run as root or set \
                 network.mode = \"user\""
            ))
        }),
    }
}

/// Whether nothing on the host listens on TCP `port` (a forward there
/// would hide it, or QEMU could not bind it).
fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

impl Manager {
    /// How new sandboxes are networked.
    pub fn network_mode(&self) -> NetMode {
        self.inner.net_mode
    }

    /// The plan for a new sandbox in this manager's mode.
    pub(super) fn plan_for(
        &self,
        egress: EgressPolicy,
        forwards: Vec<ForwardRequest>,
    ) -> Result<NetPlan, RuntimeError> {
        let plan = NetPlan {
            mode: self.inner.net_mode,
            egress,
            forwards,
            netns: None,
        };
        check_policy(plan.mode, &plan.egress)?;
        Ok(plan)
    }

    /// Gives the recorded sandbox `record` its network: an address and
    /// host ports (the host side is made at boot, see
    /// [`Manager::prepare_host_network`]). On failure the caller's teardown
    /// releases what was taken.
    pub(super) async fn attach_network(
        &self,
        record: &mut SandboxRecord,
        plan: NetPlan,
    ) -> Result<(), RuntimeError> {
        check_policy(plan.mode, &plan.egress)?;
        if let Some(path) = &plan.netns {
            return self.attach_netns(record, path).await;
        }
        let config = &self.inner.config.network;
        let id = record.id.clone();
        let gateway = config.gateway();
        let nameserver = match (plan.mode, &plan.egress) {
            (NetMode::Bridge | NetMode::Netns, _) => gateway,
            // slirp's `restrict=on` drops DNS too: a lookup would hang for
            // the resolver's timeout (python's http.server does one before
            // it listens). The guest's own loopback refuses at once.
            (NetMode::User, EgressPolicy::DenyAll) => Ipv4Addr::LOCALHOST,
            (NetMode::User, _) => config.user_dns(),
        };
        let net = self
            .inner
            .store
            .attach_network(
                &record.name,
                &id,
                config.subnet,
                FIRST_SANDBOX_HOST,
                |address| SandboxNet {
                    mode: plan.mode,
                    address: crate::network::Ipv4Net {
                        addr: address,
                        prefix: config.subnet.prefix,
                    },
                    gateway,
                    nameserver,
                    mac: Mac::for_address(address).to_string(),
                    tap: (plan.mode == NetMode::Bridge).then(|| host::tap_name(&id)),
                    egress: plan.egress.clone(),
                    attached: None,
                },
            )
            .map_err(net_store_error)?;
        record.network = Some(net);
        self.inner
            .store
            .add_forwards(
                &id,
                &plan.forwards,
                config.host_ports,
                random_start(config.host_ports),
                MAX_FORWARDS,
                port_is_free,
            )
            .map_err(net_store_error)?;
        Ok(())
    }

    /// Gives `record` a netns-mode NIC in `netns`: the address, gateway
    /// and MAC of the namespace's interface (nothing is leased; the
    /// namespace's owner made them unique).
    async fn attach_netns(
        &self,
        record: &mut SandboxRecord,
        path: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        let tap = host::tap_name(&record.id);
        let interface = netns::inspect(path, &tap)
            .await
            .map_err(|e| RuntimeError::Network {
                name: record.name.clone(),
                source: e.into(),
            })?;
        let net = SandboxNet {
            mode: NetMode::Netns,
            address: interface.address,
            gateway: interface.gateway,
            // The container's resolv.conf comes from its owner (a copied
            // bind mount); until then, the gateway.
            nameserver: interface.gateway,
            mac: interface.mac.clone(),
            tap: None,
            egress: EgressPolicy::AllowAll,
            attached: Some(AttachedNet {
                netns: path.to_path_buf(),
                interface: interface.name.clone(),
                tap,
                mtu: interface.mtu,
            }),
        };
        self.inner
            .store
            .update_network(&record.name, &record.id, &net)?;
        tracing::info!(netns = %path.display(), interface = %interface.name, address = %interface.address, "NIC joins a network namespace");
        record.network = Some(net);
        Ok(())
    }

    /// The host side a boot of `record` needs: in bridge mode the bridge,
    /// its tap (made again: a host reboot loses it) and the rules; in
    /// netns mode the tap and redirects in the namespace.
    pub(super) async fn prepare_host_network(
        &self,
        record: &SandboxRecord,
    ) -> Result<(), RuntimeError> {
        if let Some(attached) = attached_of(record) {
            // What the namespace offers was read when the NIC was recorded
            // (just before a create's boot).
            return netns::attach(attached)
                .await
                .map_err(|source| RuntimeError::Network {
                    name: record.name.clone(),
                    source: source.into(),
                });
        }
        let Some(tap) = tap_of(record) else {
            return Ok(());
        };
        let config = &self.inner.config.network;
        let net_err = |source: NetError| RuntimeError::Network {
            name: record.name.clone(),
            source,
        };
        let _lock = self.network_lock().await?;
        let gateway = crate::network::Ipv4Net {
            addr: config.gateway(),
            prefix: config.subnet.prefix,
        };
        host::ensure_bridge(&config.bridge, gateway)
            .await
            .map_err(|e| net_err(e.into()))?;
        host::create_tap(tap, &config.bridge, !config.allow_inter_sandbox)
            .await
            .map_err(|e| net_err(e.into()))?;
        self.apply_rules_locked(&record.name).await
    }

    /// Removes the host side of a sandbox whose record is gone: its tap,
    /// and its rules (and the bridge, if it was the last).
    pub(super) async fn release_host_network(&self, record: &SandboxRecord) {
        if let Some(attached) = attached_of(record) {
            if let Err(error) = netns::detach(attached).await {
                tracing::warn!(%error, "cannot remove the sandbox's tap from its network namespace");
            }
            return;
        }
        let Some(tap) = tap_of(record) else {
            return;
        };
        let result = async {
            let _lock = self.network_lock().await?;
            host::delete_tap(tap)
                .await
                .map_err(|e| RuntimeError::Network {
                    name: record.name.clone(),
                    source: e.into(),
                })?;
            self.apply_rules_locked(&record.name).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(error = %error.chain(), "cannot remove the sandbox's host network; the next change or start-up retries");
        }
    }

    /// The NIC of a VM of `record`: `None` for sandboxes without one.
    pub(super) fn vm_network(
        &self,
        record: &SandboxRecord,
    ) -> Result<Option<VmNetwork>, RuntimeError> {
        let Some(net) = record.network.as_ref() else {
            return Ok(None);
        };
        let backend = match (&net.tap, net.mode, &net.attached) {
            (_, NetMode::Netns, Some(attached)) => NetBackend::Tap {
                tap: attached.tap.clone(),
                netns: Some(attached.netns.clone()),
            },
            (Some(tap), NetMode::Bridge, _) => NetBackend::Tap {
                tap: tap.clone(),
                netns: None,
            },
            _ => NetBackend::User {
                subnet: self.inner.config.network.subnet,
                dns: self.inner.config.network.user_dns(),
                restrict: net.egress == EgressPolicy::DenyAll,
                forwards: self
                    .inner
                    .store
                    .forwards(&record.id)?
                    .iter()
                    .map(|f| host_forward(net, f))
                    .collect(),
            },
        };
        Ok(Some(VmNetwork {
            mac: net.mac.clone(),
            address: net.address,
            gateway: net.gateway,
            nameserver: net.nameserver,
            backend,
        }))
    }

    /// What the guest agent is told after a restore: the clone's address,
    /// MAC and resolver (its NIC still has its parent's).
    pub(super) fn guest_network(
        &self,
        record: &SandboxRecord,
    ) -> Option<arrakis_protocol::NetworkConfig> {
        let net = record.network.as_ref()?;
        Some(arrakis_protocol::NetworkConfig {
            interface: GUEST_INTERFACE.to_string(),
            address: net.address.to_string(),
            gateway: Some(net.gateway.to_string()),
            nameservers: vec![net.nameserver.to_string()],
            mac: Some(net.mac.clone()),
        })
    }

    /// What a snapshot of `record` records of its network.
    pub(super) fn snapshot_net(
        &self,
        record: &SandboxRecord,
    ) -> Result<Option<SnapshotNet>, RuntimeError> {
        let Some(net) = record.network.as_ref() else {
            return Ok(None);
        };
        let forwards = self
            .inner
            .store
            .forwards(&record.id)?
            .into_iter()
            .map(|f| GuestForward {
                guest_port: f.guest_port,
                description: f.description,
            })
            .collect();
        Ok(Some(SnapshotNet {
            mode: net.mode,
            egress: net.egress.clone(),
            forwards,
        }))
    }

    /// The forwards of sandbox `name`.
    pub async fn forwards(&self, name: &str) -> Result<Vec<PortForward>, RuntimeError> {
        let record = self.record(name)?;
        Ok(self.inner.store.forwards(&record.id)?)
    }

    /// Adds forwards to sandbox `name` (any state; a running user-mode VM
    /// gets them at once). All or nothing.
    pub async fn add_forwards(
        &self,
        name: &str,
        mut requests: Vec<ForwardRequest>,
    ) -> Result<Vec<PortForward>, RuntimeError> {
        ForwardRequest::validate_all(&mut requests).map_err(|message| {
            RuntimeError::InvalidArgument {
                field: "portForwards",
                message,
            }
        })?;
        let (_lock, record) = self.lock(name).await?;
        let net = require_own_network(&record)?.clone();
        let config = &self.inner.config.network;
        let added = self
            .inner
            .store
            .add_forwards(
                &record.id,
                &requests,
                config.host_ports,
                random_start(config.host_ports),
                MAX_FORWARDS,
                port_is_free,
            )
            .map_err(net_store_error)?;
        if let Err(error) = self.open_forwards(&record, &net, &added).await {
            let ports: Vec<u16> = added.iter().map(|f| f.host_port).collect();
            self.inner.store.remove_forwards(&record.id, Some(&ports))?;
            let _ = self.sync_rules(name).await;
            return Err(error);
        }
        tracing::info!(count = added.len(), "forwards added");
        Ok(added)
    }

    /// Removes forwards of sandbox `name` by host port (all when `None`);
    /// returns those removed.
    pub async fn remove_forwards(
        &self,
        name: &str,
        host_ports: Option<Vec<u16>>,
    ) -> Result<Vec<PortForward>, RuntimeError> {
        let (_lock, record) = self.lock(name).await?;
        let net = require_own_network(&record)?.clone();
        let removed = self
            .inner
            .store
            .remove_forwards(&record.id, host_ports.as_deref())?;
        match net.mode {
            NetMode::Bridge | NetMode::Netns => self.sync_rules(name).await?,
            NetMode::User => {
                if let Some(vm) = self.running_vm(&record) {
                    for forward in &removed {
                        let fwd = host_forward(&net, forward);
                        if let Err(error) = self.inner.vmm.host_forward(&vm, fwd, false).await {
                            tracing::warn!(port = forward.host_port, %error, "cannot close a forward");
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Changes the egress policy of sandbox `name` (bridge mode; user mode
    /// fixes it at creation).
    pub async fn set_egress(
        &self,
        name: &str,
        egress: EgressPolicy,
    ) -> Result<SandboxNet, RuntimeError> {
        egress
            .validate()
            .map_err(|message| RuntimeError::InvalidArgument {
                field: "egress",
                message,
            })?;
        let (_lock, record) = self.lock(name).await?;
        let mut net = require_own_network(&record)?.clone();
        if net.mode == NetMode::User && net.egress != egress {
            return Err(RuntimeError::NetworkUnsupported(format!(
                "sandbox {name:?} uses user-mode networking, whose egress policy is fixed when \
                 it is created; bridge mode (root) changes it at runtime"
            )));
        }
        net.egress = egress;
        self.inner
            .store
            .update_network(&record.name, &record.id, &net)?;
        self.sync_rules(name).await?;
        tracing::info!(egress = %net.egress, "egress policy changed");
        Ok(net)
    }

    /// Makes `added` (already recorded) reachable.
    async fn open_forwards(
        &self,
        record: &SandboxRecord,
        net: &SandboxNet,
        added: &[PortForward],
    ) -> Result<(), RuntimeError> {
        match net.mode {
            NetMode::Bridge | NetMode::Netns => self.sync_rules(&record.name).await,
            NetMode::User => {
                let Some(vm) = self.running_vm(record) else {
                    // Opened with the VM at its next boot.
                    return Ok(());
                };
                for forward in added {
                    self.inner
                        .vmm
                        .host_forward(&vm, host_forward(net, forward), true)
                        .await
                        .map_err(|source| RuntimeError::Vmm {
                            name: record.name.clone(),
                            source,
                        })?;
                }
                Ok(())
            }
        }
    }

    /// The VM of `record` if one runs (forwards of a stopped sandbox are
    /// opened at its next boot).
    fn running_vm(&self, record: &SandboxRecord) -> Option<crate::vmm::VmHandle> {
        record.state.on(Operation::Snapshot).ok()?;
        self.handle(record).filter(|vm| self.inner.vmm.is_alive(vm))
    }

    /// Re-applies the bridge-mode rules from the store after a change to
    /// sandbox `name` (which a failure names).
    async fn sync_rules(&self, name: &str) -> Result<(), RuntimeError> {
        if !self.bridge_in_use()? {
            return Ok(());
        }
        let _lock = self.network_lock().await?;
        self.apply_rules_locked(name).await
    }

    /// Whether bridge mode is this manager's or any record's.
    fn bridge_in_use(&self) -> Result<bool, RuntimeError> {
        Ok(self.inner.net_mode == NetMode::Bridge
            || self.inner.store.list()?.iter().any(|r| tap_of(r).is_some()))
    }

    /// Renders the rules of every bridge-mode record and applies them; with
    /// none left, removes the tables and the bridge. The caller holds the
    /// network lock. A store that cannot be read is an error, never an
    /// empty ruleset: that would tear down every sandbox's network.
    async fn apply_rules_locked(&self, name: &str) -> Result<(), RuntimeError> {
        let config = &self.inner.config.network;
        let net_err = |source: NetError| RuntimeError::Network {
            name: name.to_string(),
            source,
        };
        let forwards = self.inner.store.all_forwards()?;
        let sandboxes: Vec<nft::SandboxRules> = self
            .inner
            .store
            .list()?
            .into_iter()
            .filter_map(|r| {
                let net = r.network.filter(|n| n.tap.is_some())?;
                Some(nft::SandboxRules {
                    forwards: forwards.get(&r.id).cloned().unwrap_or_default(),
                    id: r.id,
                    net,
                })
            })
            .collect();
        if sandboxes.is_empty() {
            nft::apply(&nft::render_removal(&config.bridge))
                .await
                .map_err(|e| net_err(e.into()))?;
            return host::delete_bridge(&config.bridge)
                .await
                .map_err(|e| net_err(e.into()));
        }
        let rules = nft::Ruleset {
            table: &config.bridge,
            bridge: &config.bridge,
            subnet: config.subnet,
            gateway: config.gateway(),
            dns_upstream: host::host_nameserver(&config.resolv_conf),
            allow_inter_sandbox: config.allow_inter_sandbox,
            allow_host: config.allow_host,
            sandboxes: &sandboxes,
        };
        nft::apply(&nft::render(&rules))
            .await
            .map_err(|e| net_err(e.into()))
    }

    /// At start-up: removes taps on our bridge that no record owns, and
    /// brings the rules (and the bridge's existence) in line with the
    /// store.
    pub(super) async fn reconcile_network(&self) -> Result<(), RuntimeError> {
        let config = &self.inner.config.network;
        let bridge_records = self.inner.store.list()?.iter().any(|r| tap_of(r).is_some());
        let ours_exists =
            host::can_manage().is_ok() && nft::table_exists(&config.bridge).await.unwrap_or(false);
        if !bridge_records && !ours_exists {
            return Ok(());
        }
        // Failures name the bridge: no one sandbox is at fault.
        let name = config.bridge.as_str();
        let _lock = self.network_lock().await?;
        let records = self.inner.store.list()?;
        let owned: std::collections::HashSet<&str> = records.iter().filter_map(tap_of).collect();
        for tap in host::taps_on(&config.bridge).await.unwrap_or_default() {
            if !owned.contains(tap.as_str()) {
                tracing::info!(%tap, "removing a tap no sandbox owns");
                host::delete_tap(&tap)
                    .await
                    .map_err(|e| RuntimeError::Network {
                        name: name.to_string(),
                        source: e.into(),
                    })?;
            }
        }
        self.apply_rules_locked(name).await
    }

    async fn network_lock(&self) -> Result<SandboxLock, RuntimeError> {
        let path = self.inner.layout.root().join("network.lock");
        SandboxLock::acquire(&path, self.lock_timeout())
            .await
            .map_err(|e| super::lock_error("network", e))
    }
}

/// Where to start looking for free host ports: a random port of `range`.
/// Other state directories (their own leases) or programs may take ports
/// between our probe and QEMU binding them; starting each search at a
/// random place makes such collisions rare, where lowest-first made every
/// manager try the same ports.
fn random_start(range: PortRange) -> u16 {
    let random = super::lifecycle::random_bytes(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let offset = usize::from(random) % range.len();
    range.first + offset as u16
}

/// The user-mode forward of `forward` to the sandbox with `net`.
fn host_forward(net: &SandboxNet, forward: &PortForward) -> HostForward {
    HostForward {
        host_port: forward.host_port,
        guest: SocketAddrV4::new(net.address.addr, forward.guest_port),
    }
}

/// Where a netns-mode sandbox's NIC is attached.
fn attached_of(record: &SandboxRecord) -> Option<&AttachedNet> {
    record.network.as_ref()?.attached.as_ref()
}

/// The network of `record`, which arrakis must manage itself: a netns-mode
/// sandbox's forwards and policy are its namespace owner's.
fn require_own_network(record: &SandboxRecord) -> Result<&SandboxNet, RuntimeError> {
    let net = require_network(record)?;
    if net.mode == NetMode::Netns {
        return Err(RuntimeError::NetworkUnsupported(format!(
            "sandbox {:?} is attached to a network namespace that its owner (CNI) manages: \
             publish ports and set policy there",
            record.name
        )));
    }
    Ok(net)
}

/// The tap of a bridge-mode sandbox.
fn tap_of(record: &SandboxRecord) -> Option<&str> {
    record.network.as_ref()?.tap.as_deref()
}

/// User mode has no per-destination filter: only allow all or deny all.
fn check_policy(mode: NetMode, egress: &EgressPolicy) -> Result<(), RuntimeError> {
    if mode == NetMode::User && matches!(egress, EgressPolicy::AllowList(_)) {
        return Err(RuntimeError::NetworkUnsupported(
            "an egress allow-list needs bridge-mode networking (root); user mode allows all or \
             denies all"
                .to_string(),
        ));
    }
    Ok(())
}

fn require_network(record: &SandboxRecord) -> Result<&SandboxNet, RuntimeError> {
    record.network.as_ref().ok_or_else(|| {
        RuntimeError::NetworkUnsupported(format!(
            "sandbox {:?} has no network device (it comes from a snapshot taken before \
             networking)",
            record.name
        ))
    })
}

/// The error of a failed lease.
fn net_store_error(error: StoreError) -> RuntimeError {
    match error {
        StoreError::PortTaken { port } => RuntimeError::PortTaken { port },
        StoreError::AddressesExhausted { .. } | StoreError::PortsExhausted { .. } => {
            RuntimeError::NetworkExhausted(error.to_string())
        }
        StoreError::TooManyForwards { .. } => RuntimeError::InvalidArgument {
            field: "portForwards",
            message: error.to_string(),
        },
        other => other.into(),
    }
}
