//! A container's network, and the OCI hooks that set it up.
//!
//! Clients that network containers through CNI do it in one of two ways,
//! and both end in a network namespace holding the container's interface:
//! - the CRI plugin (Kubernetes) and `ctr run --cni` on 2.x make the
//!   namespace and configure it before the container exists; the spec
//!   names it (`linux.namespaces`, type `network`, with a `path`);
//! - nerdctl asks for a new namespace and configures it in an OCI
//!   `createRuntime` hook, which finds the namespace through the state's
//!   `nerdctl/network-namespace` annotation (meant for VM runtimes, whose
//!   pid is not in the container's namespace). The shim makes that
//!   namespace (in the bundle) and runs the hooks on the host, as runc
//!   would.
//!
//! The VM then joins the namespace in the runtime's netns mode (its tap in
//! the namespace, tc redirects to the interface, the guest takes the
//! interface's address and MAC), so CNI's port mappings and firewall apply
//! as they would to runc. Without a configured namespace (no hooks, an
//! empty one, or the host's) the VM gets arrakis's own network, with the
//! `io.arrakis.ports` forwards. A CRI pod's sandbox (pause) container does
//! not take the pod's interface: each container is its own VM here, and
//! the one that runs the application needs it; a second application
//! container of a pod finds the interface taken and gets arrakis's network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrakis_runtime::network::host::HostNetError;
use arrakis_runtime::network::netns as runtime_netns;

use crate::error::ShimError;
use crate::hooks::{self, HookState};
use crate::netns;
use crate::oci::{Hooks, NetworkNamespace, Spec};
use crate::state::TaskState;

/// Where nerdctl's hooks look for the namespace of a VM runtime.
pub const NETNS_ANNOTATION: &str = "nerdctl/network-namespace";

/// The CRI plugin's annotation saying which kind of container this is.
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// The namespace file the shim makes for a container, in its bundle.
const NETNS_FILE: &str = "netns";

/// What the hooks of one container are run with.
#[derive(Debug, Clone, Default)]
pub struct HookContext {
    oci_version: String,
    annotations: HashMap<String, String>,
    hooks: Hooks,
}

impl HookContext {
    /// The spec's hooks, with the state annotations that name `netns`.
    pub fn new(spec: &Spec, netns: Option<&Path>) -> HookContext {
        let mut annotations = spec.annotations.clone();
        if let Some(path) = netns {
            annotations.insert(
                NETNS_ANNOTATION.to_string(),
                path.to_string_lossy().into_owned(),
            );
        }
        HookContext {
            oci_version: spec.oci_version.clone(),
            annotations,
            hooks: spec.hooks.clone().unwrap_or_default(),
        }
    }

    async fn run(
        &self,
        stage: &'static str,
        hooks: &[crate::oci::Hook],
        id: &str,
        bundle: &Path,
        status: &str,
        pid: Option<u32>,
    ) -> Result<(), ShimError> {
        if hooks.is_empty() {
            return Ok(());
        }
        let state = HookState {
            oci_version: &self.oci_version,
            id,
            status,
            pid,
            bundle,
            annotations: &self.annotations,
        };
        hooks::run(stage, hooks, &state).await
    }

    /// `poststart`, after the container's process started: failures are
    /// logged, as the spec says.
    pub async fn poststart(&self, id: &str, bundle: &Path, pid: u32) {
        let hooks = &self.hooks.poststart;
        if let Err(error) = self
            .run("poststart", hooks, id, bundle, "running", Some(pid))
            .await
        {
            tracing::warn!(%id, error = %error, "a poststart hook failed");
        }
    }
}

/// What [`prepare`] decided.
pub struct NetSetup {
    /// The namespace the VM joins.
    pub attach: Option<PathBuf>,
    /// A pod's namespace that this (sandbox) container's pid must name:
    /// the CRI plugin gives the pod's other containers
    /// `/proc/<sandbox pid>/ns/net` (see [`NetnsHolder`]).
    pub hold: Option<PathBuf>,
    pub hooks: HookContext,
}

/// Sets up the network of a container being created: makes the namespace
/// it asks for (when hooks will configure it), runs the `createRuntime`
/// and `prestart` hooks, and decides which namespace the VM joins, if one
/// holds an interface for it. What it made is recorded in `state` first,
/// so a failure at any point is undone by [`teardown`].
pub async fn prepare(
    spec: &Spec,
    id: &str,
    bundle: &Path,
    state: &mut TaskState,
) -> Result<NetSetup, ShimError> {
    let hooks = spec.hooks.clone().unwrap_or_default();
    for (stage, list) in [
        ("createContainer", &hooks.create_container),
        ("startContainer", &hooks.start_container),
    ] {
        if !list.is_empty() {
            // runc runs them in the container's namespaces; here that is
            // another kernel, where host programs do not exist.
            tracing::warn!(
                stage,
                count = list.len(),
                "hooks that run inside the container are skipped: it is a VM"
            );
        }
    }
    let configuring = !hooks.create_runtime.is_empty() || !hooks.prestart.is_empty();
    let namespace = match spec.network_namespace()? {
        NetworkNamespace::Host => None,
        NetworkNamespace::Existing(path) => Some(path),
        // Nobody would configure a new namespace: arrakis's own network.
        NetworkNamespace::New if !configuring => None,
        NetworkNamespace::New => {
            let path = bundle.join(NETNS_FILE);
            state.own_netns = Some(path.clone());
            state.save(bundle)?;
            netns::create(&path)?;
            Some(path)
        }
    };
    let context = HookContext::new(spec, namespace.as_deref());
    if configuring || !hooks.poststop.is_empty() {
        // runc runs poststop when a create fails too: the hooks undo what
        // they did (nerdctl's releases the address and port mappings).
        state.netns = namespace.clone();
        state.poststop = !hooks.poststop.is_empty();
        state.save(bundle)?;
    }
    context
        .run(
            "createRuntime",
            &hooks.create_runtime,
            id,
            bundle,
            "creating",
            None,
        )
        .await?;
    context
        .run("prestart", &hooks.prestart, id, bundle, "creating", None)
        .await?;
    let mut setup = NetSetup {
        attach: None,
        hold: None,
        hooks: context,
    };
    // The shim's own namespace is the host's (or the node's): a VM must
    // never take over its interface.
    let Some(path) = namespace.filter(|path| !runtime_netns::is_own_namespace(path)) else {
        return Ok(setup);
    };
    if spec.annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
        tracing::info!(netns = %path.display(), "a pod's sandbox container: the pod's interface is left to its application container");
        setup.hold = Some(path);
        return Ok(setup);
    }
    match runtime_netns::inspect(&path, "").await {
        Ok(interface) => {
            tracing::info!(netns = %path.display(), interface = %interface.name, address = %interface.address, "the VM joins the container's network namespace");
            setup.attach = Some(path);
            Ok(setup)
        }
        Err(error @ (HostNetError::NoInterface { .. } | HostNetError::NetnsTaken { .. })) => {
            tracing::info!(%error, "arrakis's own network instead of the container's namespace");
            Ok(setup)
        }
        Err(error) => Err(ShimError::Internal(format!(
            "cannot inspect the container's network namespace: {}",
            arrakis_protocol::error_chain(&error)
        ))),
    }
}

/// The argv[0] of a [`NetnsHolder`], by which a later `delete` recognises
/// it before killing the recorded pid.
const HOLDER_NAME: &str = "arrakis-netns-holder";

/// A process that only sits in a network namespace, so that its pid names
/// it. A CRI pod's sandbox container reports it as its pid: containerd
/// gives the pod's application containers `/proc/<that pid>/ns/net`, and
/// QEMU's own pid is in the host's namespace.
pub struct NetnsHolder;

impl NetnsHolder {
    /// Starts `sleep infinity` in `netns`; returns its pid.
    pub fn spawn(netns: &Path) -> Result<u32, ShimError> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::open(netns)
            .map_err(|e| ShimError::io("opening the network namespace", netns, e))?;
        let mut command = std::process::Command::new("sleep");
        command
            .arg0(HOLDER_NAME)
            .arg("infinity")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        runtime_netns::join_in_child(&mut command, &file);
        let child = command
            .spawn()
            .map_err(|e| ShimError::io("starting a holder of", netns, e))?;
        Ok(child.id())
    }

    /// Stops the holder `pid` if it is still one (a pid is reused once its
    /// process is gone), and reaps it when it is this process's child.
    pub fn stop(pid: u32) {
        let Ok(raw) = i32::try_from(pid) else {
            return;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmdline.starts_with(format!("{HOLDER_NAME}\0").as_bytes()) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(raw);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// Undoes [`prepare`] once the VM is gone: the `poststop` hooks (with the
/// spec in the bundle), then the namespace the shim made. Failures are
/// logged; `state` records what is left to do, and is saved.
pub async fn teardown(id: &str, bundle: &Path, state: &mut TaskState) {
    if let Some(pid) = state.holder_pid.take() {
        NetnsHolder::stop(pid);
    }
    if state.poststop {
        match Spec::load(bundle) {
            Ok(spec) => {
                let context = HookContext::new(&spec, state.netns.as_deref());
                let hooks = &context.hooks.poststop;
                if let Err(error) = context
                    .run("poststop", hooks, id, bundle, "stopped", None)
                    .await
                {
                    tracing::warn!(%id, error = %error, "a poststop hook failed");
                }
            }
            Err(error) => {
                tracing::warn!(%id, error = %error, "cannot read the spec: poststop hooks not run")
            }
        }
        state.poststop = false;
    }
    if let Some(path) = state.own_netns.take() {
        if let Err(error) = netns::remove(&path) {
            tracing::warn!(path = %path.display(), error = %error, "cannot remove the container's network namespace");
            state.own_netns = Some(path);
        }
    }
    if let Err(error) = state.save(bundle) {
        tracing::debug!(error = %error, "cannot record the network teardown");
    }
}
