//! The parts of the OCI runtime spec (`config.json`, and exec processes)
//! that mean something for a microVM, and their translation:
//! - `process` (args, env, cwd, user and groups, terminal and its size,
//!   rlimits) becomes the agent's exec request for the container's process;
//! - `hostname` becomes the guest's hostname;
//! - `linux.resources`: the CPU quota (or cpuset) sets the vCPUs, the memory
//!   limit the VM's memory;
//! - the annotation [`PORTS_ANNOTATION`] publishes guest ports on the host;
//! - `hooks` run on the host, as runc runs them (nerdctl publishes ports
//!   with `createRuntime` and `poststop` hooks that run CNI);
//! - the network namespace ([`Spec::network_namespace`]) is where the VM's
//!   NIC is attached, and the namespace those hooks configure.
//!
//! The other namespaces, cgroup paths, seccomp, capabilities and the host
//! mounts do not apply: the VM is the isolation boundary, and the guest provides
//! `/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/shm`, `/run` and `/tmp` itself.
//! The structs read only these fields and ignore the rest.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use arrakis_protocol::{Command, ExecRequest, Rlimit, TtySize};
use arrakis_runtime::network::ForwardRequest;
use serde::Deserialize;

use crate::error::ShimError;

/// `host:guest[/tcp]` pairs, comma separated, e.g. `18080:80/tcp,2222:22`.
pub const PORTS_ANNOTATION: &str = "io.arrakis.ports";

/// Terminal size when the spec gives none.
const DEFAULT_TTY: TtySize = TtySize { rows: 24, cols: 80 };

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Echoed in the state that hooks read.
    #[serde(default)]
    pub oci_version: String,
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(default)]
    pub mounts: Vec<OciMount>,
    #[serde(default)]
    pub hooks: Option<Hooks>,
}

/// The hooks of each lifecycle stage, in the order they run. `prestart` is
/// deprecated in the spec but still written by some tools.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(default)]
    pub prestart: Vec<Hook>,
    #[serde(default)]
    pub create_runtime: Vec<Hook>,
    #[serde(default)]
    pub create_container: Vec<Hook>,
    #[serde(default)]
    pub start_container: Vec<Hook>,
    #[serde(default)]
    pub poststart: Vec<Hook>,
    #[serde(default)]
    pub poststop: Vec<Hook>,
}

/// One hook: a host program run with exactly `args` (including argv[0])
/// and `env`, fed the container's state on stdin.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Hook {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds; none means the runtime's default.
    #[serde(default)]
    pub timeout: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct OciMount {
    #[serde(default)]
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Largest host file a bind mount may copy into the guest.
pub const MAX_COPIED_FILE: u64 = 1024 * 1024;

impl OciMount {
    fn is_bind(&self) -> bool {
        self.kind == "bind" || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub rlimits: Vec<OciRlimit>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct ConsoleSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OciRlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Linux {
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
}

/// Where the container's network lives, read from `linux.namespaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkNamespace {
    /// No network namespace asked for: the container shares the host's.
    Host,
    /// A fresh namespace, made by the runtime (what nerdctl asks for; its
    /// hooks then run CNI in it).
    New,
    /// A namespace someone already made and configured (what the CRI
    /// plugin passes, with the pod's CNI network set up in it).
    Existing(PathBuf),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cpu {
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
    #[serde(default)]
    pub cpus: Option<String>,
}

impl Spec {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<Spec, ShimError> {
        let path = bundle.join("config.json");
        let raw = std::fs::read(&path).map_err(|e| ShimError::io("reading", &path, e))?;
        serde_json::from_slice(&raw)
            .map_err(|e| ShimError::invalid("config.json", format!("{e} (in {})", path.display())))
    }

    pub fn process(&self) -> Result<&Process, ShimError> {
        self.process
            .as_ref()
            .ok_or_else(|| ShimError::invalid("process", "config.json has no process"))
    }

    /// VM memory in MiB from `linux.resources.memory.limit` (rounded up).
    pub fn memory_mb(&self) -> Option<u32> {
        let limit = self.resources()?.memory.as_ref()?.limit?;
        if limit <= 0 {
            return None;
        }
        u32::try_from((limit as u64).div_ceil(MIB)).ok()
    }

    /// vCPUs from the CPU quota (rounded up) or, without one, the cpuset.
    pub fn vcpus(&self) -> Option<u32> {
        let cpu = self.resources()?.cpu.as_ref()?;
        if let (Some(quota), Some(period)) = (cpu.quota, cpu.period) {
            if quota > 0 && period > 0 {
                return u32::try_from((quota as u64).div_ceil(period)).ok();
            }
        }
        cpu.cpus.as_deref().and_then(cpuset_len)
    }

    /// The network namespace `linux.namespaces` asks for. A relative path
    /// is refused: it would resolve against the shim's working directory,
    /// not anything the caller meant. Two network entries are refused too,
    /// as runc does.
    pub fn network_namespace(&self) -> Result<NetworkNamespace, ShimError> {
        let Some(linux) = &self.linux else {
            return Ok(NetworkNamespace::Host);
        };
        let mut network = linux.namespaces.iter().filter(|ns| ns.kind == "network");
        let Some(namespace) = network.next() else {
            return Ok(NetworkNamespace::Host);
        };
        if network.next().is_some() {
            return Err(ShimError::invalid(
                "linux.namespaces",
                "more than one namespace of type \"network\"; give at most one",
            ));
        }
        match namespace.path.as_deref() {
            None | Some("") => Ok(NetworkNamespace::New),
            Some(path) if Path::new(path).is_absolute() => {
                Ok(NetworkNamespace::Existing(PathBuf::from(path)))
            }
            Some(path) => Err(ShimError::invalid(
                "linux.namespaces",
                format!(
                    "network namespace path {path:?} is relative; accepted: an absolute path \
                     such as /var/run/netns/NAME, or no path for a new namespace"
                ),
            )),
        }
    }

    fn resources(&self) -> Option<&Resources> {
        self.linux.as_ref()?.resources.as_ref()
    }

    /// Bind mounts of regular host files (what nerdctl and the CRI plugin
    /// use for `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf` and
    /// secrets): copied into the guest when the container is created, since
    /// a VM cannot share host files here. Returns (host file, guest path);
    /// directory binds cannot be honoured and are logged.
    pub fn copied_files(&self) -> Vec<(String, String)> {
        let mut files = Vec::new();
        for mount in self.mounts.iter().filter(|m| m.is_bind()) {
            if !mount.destination.starts_with('/') || mount.source.is_empty() {
                continue;
            }
            match std::fs::metadata(&mount.source) {
                Ok(meta) if meta.is_file() && meta.len() <= MAX_COPIED_FILE => {
                    files.push((mount.source.clone(), mount.destination.clone()));
                }
                Ok(meta) if meta.is_file() => tracing::warn!(
                    source = %mount.source,
                    size = meta.len(),
                    "a bind-mounted file over 1 MiB is not copied into the VM"
                ),
                _ => tracing::warn!(
                    source = %mount.source,
                    destination = %mount.destination,
                    "bind mounts of directories are not available in a VM; skipped"
                ),
            }
        }
        files
    }

    /// Host forwards from [`PORTS_ANNOTATION`].
    pub fn forwards(&self) -> Result<Vec<ForwardRequest>, ShimError> {
        match self.annotations.get(PORTS_ANNOTATION) {
            None => Ok(Vec::new()),
            Some(value) => parse_ports(value),
        }
    }
}

/// The number of CPUs in a cpuset list such as `0-3,6`.
fn cpuset_len(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                count += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                count += 1;
            }
        }
    }
    (count > 0).then_some(count)
}

/// Parses [`PORTS_ANNOTATION`]'s value.
pub fn parse_ports(value: &str) -> Result<Vec<ForwardRequest>, ShimError> {
    let bad = |entry: &str, why: &str| {
        ShimError::invalid(
            format!("annotation {PORTS_ANNOTATION}"),
            format!(
                "{entry:?}: {why}; accepted: HOST:GUEST[/tcp] pairs separated by commas, \
                 ports 1 to 65535, e.g. 18080:80/tcp"
            ),
        )
    };
    let mut forwards = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (ports, proto) = entry.split_once('/').unwrap_or((entry, "tcp"));
        if proto != "tcp" {
            return Err(bad(entry, "only tcp is forwarded"));
        }
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| bad(entry, "missing ':'"))?;
        let port = |text: &str| text.parse::<u16>().ok().filter(|p| *p != 0);
        let host = port(host).ok_or_else(|| bad(entry, "bad host port"))?;
        let guest = port(guest).ok_or_else(|| bad(entry, "bad guest port"))?;
        forwards.push(ForwardRequest {
            host_port: Some(host),
            guest_port: guest,
            description: format!("containerd {host}:{guest}/tcp"),
        });
    }
    Ok(forwards)
}

impl Process {
    /// The agent request running this process. `keep` names a process that
    /// must outlive the agent session (the container's init, so it survives
    /// a checkpoint's restore); `stdin` says whether the host feeds it.
    pub fn exec_request(&self, keep: Option<&str>, stdin: bool) -> Result<ExecRequest, ShimError> {
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err(ShimError::invalid(
                "process.args",
                "empty: name the program to run",
            ));
        }
        let mut env = BTreeMap::new();
        for entry in &self.env {
            let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            if key.is_empty() {
                return Err(ShimError::invalid(
                    "process.env",
                    format!("{entry:?} has no name; accepted: NAME=value"),
                ));
            }
            env.insert(key.to_owned(), value.to_owned());
        }
        let tty = self.terminal.then(|| match self.console_size {
            Some(size) if size.height > 0 && size.width > 0 => TtySize {
                rows: size.height.min(u16::MAX.into()) as u16,
                cols: size.width.min(u16::MAX.into()) as u16,
            },
            _ => DEFAULT_TTY,
        });
        Ok(ExecRequest {
            command: Command::Argv(self.args.clone()),
            env,
            clear_env: true,
            cwd: Some(if self.cwd.is_empty() {
                "/".to_owned()
            } else {
                self.cwd.clone()
            }),
            user: Some(format!("{}:{}", self.user.uid, self.user.gid)),
            groups: self.user.additional_gids.clone(),
            rlimits: self
                .rlimits
                .iter()
                .map(|r| Rlimit {
                    resource: r.kind.clone(),
                    soft: r.soft,
                    hard: r.hard,
                })
                .collect(),
            tty,
            keep: keep.map(str::to_owned),
            stdin,
            timeout_ms: None,
        })
    }
}

/// Parses an exec's process spec (`ExecProcessRequest.spec`, JSON).
pub fn parse_process(json: &[u8]) -> Result<Process, ShimError> {
    serde_json::from_slice(json).map_err(|e| ShimError::invalid("spec", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": true,
            "consoleSize": {"height": 40, "width": 120},
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin", "EMPTY=", "A=b=c"],
            "cwd": "/work",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "capabilities": {"bounding": ["CAP_CHOWN"]},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "web",
        "annotations": {"io.arrakis.ports": "18080:80/tcp, 2222:22"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "resources": {
                "memory": {"limit": 536870913},
                "cpu": {"quota": 150000, "period": 100000, "cpus": "0-3"}
            },
            "namespaces": [{"type": "pid"}]
        }
    }"#;

    #[test]
    fn a_full_spec_translates() {
        let spec: Spec = serde_json::from_str(CONFIG).unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("web"));
        assert_eq!(spec.memory_mb(), Some(513));
        assert_eq!(spec.vcpus(), Some(2));
        let forwards = spec.forwards().unwrap();
        assert_eq!(
            forwards
                .iter()
                .map(|f| (f.host_port, f.guest_port))
                .collect::<Vec<_>>(),
            [(Some(18080), 80), (Some(2222), 22)]
        );
        let request = spec
            .process()
            .unwrap()
            .exec_request(Some("init"), true)
            .unwrap();
        assert_eq!(
            request.command,
            Command::Argv(vec!["sh".into(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(request.env["PATH"], "/bin");
        assert_eq!(request.env["EMPTY"], "");
        assert_eq!(request.env["A"], "b=c");
        assert!(request.clear_env);
        assert_eq!(request.cwd.as_deref(), Some("/work"));
        assert_eq!(request.user.as_deref(), Some("1000:1000"));
        assert_eq!(request.groups, [10, 20]);
        assert_eq!(
            request.tty,
            Some(TtySize {
                rows: 40,
                cols: 120
            })
        );
        assert_eq!(request.rlimits.len(), 1);
        assert_eq!(request.rlimits[0].resource, "RLIMIT_NOFILE");
        assert_eq!(
            (request.rlimits[0].soft, request.rlimits[0].hard),
            (512, 1024)
        );
        assert_eq!(request.keep.as_deref(), Some("init"));
        assert!(request.stdin);
    }

    #[test]
    fn file_binds_are_copied_and_directory_binds_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let hostname = dir.path().join("hostname");
        std::fs::write(&hostname, "pod\n").unwrap();
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "mounts": [
                {"destination": "/etc/hostname", "type": "bind",
                 "source": hostname, "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "bind",
                 "source": dir.path(), "options": ["rbind"]},
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "relative", "type": "bind", "source": hostname},
            ]
        }))
        .unwrap();
        assert_eq!(
            spec.copied_files(),
            [(hostname.display().to_string(), "/etc/hostname".to_owned())]
        );
    }

    #[test]
    fn the_cpuset_counts_without_a_quota() {
        let spec: Spec = serde_json::from_str(
            r#"{"linux": {"resources": {"cpu": {"quota": -1, "period": 100000, "cpus": "0-1,4"}}}}"#,
        )
        .unwrap();
        assert_eq!(spec.vcpus(), Some(3));
        assert_eq!(spec.memory_mb(), None);
        assert_eq!(cpuset_len("3-1"), None);
        assert_eq!(cpuset_len("x"), None);
    }

    #[test]
    fn bad_port_annotations_say_what_is_accepted() {
        for bad in ["80", "a:80", "80:0", "1:2/udp", "70000:80"] {
            let err = parse_ports(bad).unwrap_err().to_string();
            assert!(
                err.contains(PORTS_ANNOTATION) && err.contains("HOST:GUEST"),
                "{bad}: {err}"
            );
        }
        assert!(parse_ports("").unwrap().is_empty());
    }

    /// Trimmed from what nerdctl 2.x writes for `nerdctl run -p 8080:80`.
    const NERDCTL_CONFIG: &str = r#"{
        "ociVersion": "1.1.0",
        "hooks": {
            "createRuntime": [{
                "path": "/usr/local/bin/nerdctl",
                "args": ["/usr/local/bin/nerdctl", "--data-root=/var/lib/nerdctl",
                         "--namespace=default", "internal", "oci-hook", "createRuntime"],
                "env": ["PATH=/usr/local/bin:/usr/bin:/bin"]
            }],
            "poststop": [{
                "path": "/usr/local/bin/nerdctl",
                "args": ["/usr/local/bin/nerdctl", "internal", "oci-hook", "postStop"],
                "timeout": 30
            }]
        },
        "annotations": {"nerdctl/ports": "[{\"HostPort\":8080,\"ContainerPort\":80}]"},
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "network"}
            ]
        }
    }"#;

    #[test]
    fn nerdctl_hooks_and_a_new_netns_parse() {
        let spec: Spec = serde_json::from_str(NERDCTL_CONFIG).unwrap();
        assert_eq!(spec.oci_version, "1.1.0");
        let hooks = spec.hooks.as_ref().unwrap();
        assert_eq!(hooks.create_runtime.len(), 1);
        let hook = &hooks.create_runtime[0];
        assert_eq!(hook.path, "/usr/local/bin/nerdctl");
        assert_eq!(hook.args.len(), 6);
        assert_eq!(hook.args[5], "createRuntime");
        assert_eq!(hook.env, ["PATH=/usr/local/bin:/usr/bin:/bin"]);
        assert_eq!(hook.timeout, None);
        assert_eq!(hooks.poststop.len(), 1);
        assert_eq!(hooks.poststop[0].args[3], "postStop");
        assert!(hooks.poststop[0].env.is_empty());
        assert_eq!(hooks.poststop[0].timeout, Some(30));
        assert!(hooks.prestart.is_empty() && hooks.create_container.is_empty());
        assert!(hooks.start_container.is_empty() && hooks.poststart.is_empty());
        assert_eq!(spec.network_namespace().unwrap(), NetworkNamespace::New);
    }

    #[test]
    fn a_cri_netns_path_is_existing() {
        let spec: Spec = serde_json::from_str(
            r#"{"linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234-abcd"}
            ]}}"#,
        )
        .unwrap();
        assert!(spec.hooks.is_none());
        assert_eq!(spec.oci_version, "");
        assert_eq!(
            spec.network_namespace().unwrap(),
            NetworkNamespace::Existing(PathBuf::from("/var/run/netns/cni-1234-abcd"))
        );
        let spec: Spec =
            serde_json::from_str(r#"{"linux": {"namespaces": [{"type": "network", "path": ""}]}}"#)
                .unwrap();
        assert_eq!(spec.network_namespace().unwrap(), NetworkNamespace::New);
    }

    #[test]
    fn without_a_network_namespace_it_is_the_hosts() {
        let spec: Spec = serde_json::from_str(CONFIG).unwrap();
        assert_eq!(spec.network_namespace().unwrap(), NetworkNamespace::Host);
        let spec: Spec = serde_json::from_str(r#"{"ociVersion": "1.0.0"}"#).unwrap();
        assert_eq!(spec.network_namespace().unwrap(), NetworkNamespace::Host);
    }

    #[test]
    fn bad_network_namespaces_are_refused() {
        for namespaces in [
            r#"[{"type": "network", "path": "netns/x"}]"#,
            r#"[{"type": "network"}, {"type": "network", "path": "/run/netns/x"}]"#,
        ] {
            let spec: Spec =
                serde_json::from_str(&format!(r#"{{"linux": {{"namespaces": {namespaces}}}}}"#))
                    .unwrap();
            let err = spec.network_namespace().unwrap_err().to_string();
            assert!(err.contains("linux.namespaces"), "{namespaces}: {err}");
        }
    }

    #[test]
    fn a_process_needs_args() {
        let process = parse_process(br#"{"args": [], "cwd": "/"}"#).unwrap();
        let err = process.exec_request(None, false).unwrap_err().to_string();
        assert!(err.contains("process.args"), "{err}");
        let process = parse_process(br#"{"args": ["true"], "env": ["=x"]}"#).unwrap();
        let err = process.exec_request(None, false).unwrap_err().to_string();
        assert!(err.contains("process.env"), "{err}");
        let process = parse_process(br#"{"args": ["true"]}"#).unwrap();
        let request = process.exec_request(None, false).unwrap();
        assert_eq!(request.cwd.as_deref(), Some("/"));
        assert_eq!(request.tty, None);
        assert_eq!(request.keep, None);
    }
}
