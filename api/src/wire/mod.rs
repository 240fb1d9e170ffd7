//! The JSON wire types of the API, shaped like the original Arrakis REST
//! server (what py-arrakis 2.0.0 sends and reads), and their parsing into
//! domain requests. Nothing here touches the runtime.

pub mod exec;
pub mod fs;
pub mod snapshots;

use std::collections::BTreeMap;

use arrakis_runtime::network::{EgressPolicy, ForwardRequest};
use arrakis_runtime::{SandboxInfo, SandboxSpec, SandboxState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Working directory of commands, and the base of relative file paths.
pub const WORK_DIR: &str = "/tmp/server_files";

/// `{"error":{"message":"..."}}`, the body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorMessage {
    pub message: String,
}

impl ErrorBody {
    pub fn new(message: String) -> ErrorBody {
        ErrorBody {
            error: ErrorMessage { message },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `healthy`.
    pub status: String,
    /// RFC 3339, UTC, e.g. `2025-05-26T07:17:03Z`.
    pub timestamp: String,
}

/// `{"success":true}`, the reply of state changes and deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Success {
    pub success: bool,
}

impl Success {
    pub const TRUE: Success = Success { success: true };
}

/// `{}`, the reply of an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Empty {}

/// What a VM looks like on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub vm_name: String,
    pub status: VmStatus,
    /// Guest address with prefix length (`10.20.0.3/16`); empty for a VM
    /// without a NIC (restored from a snapshot taken before networking).
    pub ip: String,
    /// The host tap device in bridge mode; empty in user mode.
    pub tap_device_name: String,
    pub port_forwards: Vec<PortForward>,
    /// Beyond the original: `bridge` or `user` (absent without a NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// The guest NIC's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Where the VM may connect to: `"allow"`, `"deny"` or a list of
    /// IPv4 CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub egress: Option<EgressPolicy>,
    /// Beyond the original: the sandbox's id, size, image and creation
    /// time (RFC 3339, UTC).
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    pub created_at: String,
    /// The snapshot this VM was restored or forked from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VmStatus {
    Running,
    Stopped,
    Paused,
}

impl VmStatus {
    /// The three states clients know. Transitions in progress show as the
    /// state they leave (`creating`, `starting`: running; `stopping`,
    /// `destroying`: stopped); a crashed VM is stopped and can be started.
    pub fn of(state: SandboxState) -> VmStatus {
        match state {
            SandboxState::Creating | SandboxState::Starting | SandboxState::Running => {
                VmStatus::Running
            }
            SandboxState::Paused => VmStatus::Paused,
            SandboxState::Stopping
            | SandboxState::Stopped
            | SandboxState::Crashed
            | SandboxState::Destroying => VmStatus::Stopped,
        }
    }
}

/// A forwarded port; ports are strings, as in the original server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortForward {
    pub host_port: String,
    pub guest_port: String,
    pub description: String,
}

impl From<&arrakis_runtime::network::PortForward> for PortForward {
    fn from(forward: &arrakis_runtime::network::PortForward) -> PortForward {
        PortForward {
            host_port: forward.host_port.to_string(),
            guest_port: forward.guest_port.to_string(),
            description: forward.description.clone(),
        }
    }
}

impl From<&SandboxInfo> for Vm {
    fn from(info: &SandboxInfo) -> Vm {
        let net = info.network.as_ref();
        Vm {
            vm_name: info.name.clone(),
            status: VmStatus::of(info.state),
            ip: net.map(|n| n.address.to_string()).unwrap_or_default(),
            tap_device_name: net.and_then(|n| n.tap.clone()).unwrap_or_default(),
            port_forwards: info.forwards.iter().map(PortForward::from).collect(),
            network_mode: net.map(|n| n.mode.to_string()),
            mac: net.map(|n| n.mac.clone()),
            egress: net.map(|n| n.egress.clone()),
            id: info.id.clone(),
            vcpus: info.vcpus,
            memory_mb: info.memory_mb,
            image: info.image.clone(),
            created_at: rfc3339(info.created_at),
            from_snapshot: info.from_snapshot.clone(),
        }
    }
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2025-05-26T07:17:03Z`).
pub fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs.min(253_402_300_799) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<Vm>,
}

/// `POST /v1/vms`. Every field is optional on the wire, unknown keys are
/// ignored (as by the original server).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartVmRequest {
    #[serde(default)]
    pub vm_name: Option<String>,
    /// Not supported: sandboxes boot the configured kernel.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Not supported: sandboxes boot the configured initramfs.
    #[serde(default)]
    pub initramfs: Option<String>,
    /// Not supported: sandboxes boot the configured image.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// Accepted and ignored, as by the original server.
    #[serde(default)]
    pub entry_point: Option<String>,
    /// Restore this snapshot as the VM `vmName`.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Beyond the original: virtual CPUs of a new VM (server default if
    /// absent).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest memory of a new VM in MiB.
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Base image of a new VM (see `GET /v1/openapi.json` info for the
    /// server's images); default the server's.
    #[serde(default)]
    pub image: Option<String>,
    /// Environment of every command run in the VM.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Guest ports to reach from the host, beyond the server's default
    /// ones.
    #[serde(default)]
    pub port_forwards: Option<Vec<PortForwardRequest>>,
    /// Where the VM may connect to: `"allow"`, `"deny"` or a list of IPv4
    /// CIDRs; default the server's.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub egress: Option<EgressPolicy>,
    /// Boot the guest even when the server could warm-start the VM from a
    /// golden snapshot of its image and shape.
    #[serde(default)]
    pub cold_boot: Option<bool>,
}

/// A guest port to forward; the host port is picked when absent or 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortForwardRequest {
    pub guest_port: u16,
    #[serde(default)]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub description: Option<String>,
}

impl PortForwardRequest {
    pub fn into_runtime(self) -> ForwardRequest {
        ForwardRequest {
            host_port: self.host_port.filter(|p| *p != 0),
            guest_port: self.guest_port,
            description: self.description.unwrap_or_default(),
        }
    }
}

/// `POST /v1/vms/{name}/portForwards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddForwardsRequest {
    pub port_forwards: Vec<PortForwardRequest>,
}

/// `PUT /v1/vms/{name}/egress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// `"allow"`, `"deny"` or a list of IPv4 CIDRs such as `["10.0.0.0/8"]`.
    #[schema(value_type = Object)]
    pub egress: EgressPolicy,
}

/// What a start request asks for, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartCommand {
    /// Create the VM, or boot it again if it exists and is stopped (the
    /// spec's sizes then apply only to a new VM).
    Start { spec: SandboxSpec },
    /// Restore a snapshot as a new VM named `name`.
    Restore { name: String, snapshot_id: String },
}

impl StartVmRequest {
    pub fn parse(self) -> Result<StartCommand, ApiError> {
        let name = self.vm_name.unwrap_or_default();
        if name.is_empty() {
            return Err(ApiError::bad_request(
                "vmName is required: a non-empty string naming the VM",
            ));
        }
        if let Some(snapshot_id) = self.snapshot_id.filter(|id| !id.is_empty()) {
            // As the original: kernel, initramfs and rootfs are ignored.
            if self.vcpus.is_some() || self.memory_mb.is_some() || self.image.is_some() {
                return Err(ApiError::unprocessable(
                    "vcpus, memoryMb and image cannot be given with snapshotId: a restored VM has its snapshot's",
                ));
            }
            if self.env.is_some() || self.port_forwards.is_some() || self.egress.is_some() {
                return Err(ApiError::unprocessable(
                    "env, portForwards and egress cannot be given with snapshotId: a restored VM has its snapshot's (change them after the restore)",
                ));
            }
            if self.cold_boot == Some(true) {
                return Err(ApiError::unprocessable(
                    "coldBoot cannot be given with snapshotId: a restored VM does not boot",
                ));
            }
            return Ok(StartCommand::Restore { name, snapshot_id });
        }
        for (field, value) in [
            ("kernel", &self.kernel),
            ("initramfs", &self.initramfs),
            ("rootfs", &self.rootfs),
        ] {
            if non_empty(value) {
                return Err(ApiError::unprocessable(format!(
                    "{field} is not supported: sandboxes boot the server's configured {field}; omit it"
                )));
            }
        }
        let mut spec = SandboxSpec::named(&name);
        spec.vcpus = self.vcpus;
        spec.memory_mb = self.memory_mb;
        spec.image = self.image;
        spec.env = self.env.unwrap_or_default();
        spec.cold_boot = self.cold_boot.unwrap_or(false);
        spec.egress = self.egress;
        spec.forwards = self
            .port_forwards
            .unwrap_or_default()
            .into_iter()
            .map(PortForwardRequest::into_runtime)
            .collect();
        Ok(StartCommand::Start { spec })
    }
}

fn non_empty(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|v| !v.is_empty())
}

/// `PATCH /v1/vms/{name}`. Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UpdateStateRequest {
    /// `stopped`, `paused` or `resume` (kept as text, so that another
    /// value gets an error naming the accepted ones).
    #[serde(default)]
    #[schema(value_type = StateName, required = true)]
    pub status: Option<String>,
}

/// The states a PATCH asks for (documentation of `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateName {
    Stopped,
    Paused,
    Resume,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    Stop,
    Pause,
    Resume,
}

impl UpdateStateRequest {
    pub fn parse(self) -> Result<StateChange, ApiError> {
        match self.status.as_deref() {
            Some("stopped") => Ok(StateChange::Stop),
            Some("paused") => Ok(StateChange::Pause),
            Some("resume") => Ok(StateChange::Resume),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid status {other:?}: accepted \"stopped\", \"paused\" or \"resume\""
            ))),
            None => Err(ApiError::bad_request(
                "status is required: \"stopped\", \"paused\" or \"resume\"",
            )),
        }
    }
}

/// `POST /v1/vms/{name}/cmd`: run `cmd` with `bash -c`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CmdRequest {
    #[schema(min_length = 1)]
    pub cmd: String,
    /// Wait for the command and return its output (default). When false,
    /// the command runs in the background and its output is dropped.
    #[serde(default = "default_true")]
    pub blocking: bool,
    /// Beyond the original: kill the command's process tree after this
    /// many seconds (no limit by default).
    #[serde(default, rename = "timeoutSecs")]
    pub timeout_secs: Option<f64>,
}

fn default_true() -> bool {
    true
}

impl CmdRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.cmd.is_empty() {
            return Err(ApiError::bad_request(
                "cmd is empty: give a command for bash -c",
            ));
        }
        Ok(())
    }
}

/// Both keys are always present; `error` is empty when the command exited
/// with status 0, else `exit status N` or `signal: NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CmdResponse {
    /// Standard output and error, interleaved as they arrived.
    pub output: String,
    pub error: String,
}

/// `POST /v1/vms/{name}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    pub files: Vec<FileUpload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileUpload {
    /// Absolute, or relative to `/tmp/server_files`. Parent directories
    /// are created.
    #[schema(min_length = 1)]
    pub path: String,
    /// Text, written as UTF-8.
    pub content: String,
}

impl UploadRequest {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.files.is_empty() {
            return Err(ApiError::bad_request(
                "files is empty: give at least one {\"path\",\"content\"}",
            ));
        }
        if let Some(i) = self.files.iter().position(|f| f.path.is_empty()) {
            return Err(ApiError::bad_request(format!("files[{i}].path is empty")));
        }
        Ok(())
    }
}

/// `GET /v1/vms/{name}/files?paths=a,b`: the comma-separated paths.
pub fn parse_download_query(raw: Option<&str>) -> Result<Vec<String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let paths = pairs
        .into_iter()
        .find(|(key, _)| key == "paths")
        .map(|(_, value)| value)
        .unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::bad_request(
            "the 'paths' query parameter is required: comma-separated file paths",
        ));
    }
    Ok(paths.split(',').map(str::to_string).collect())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DownloadResponse {
    pub files: Vec<FileDownload>,
}

/// All three keys are always present. A file that cannot be read has empty
/// `content` and the reason in `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileDownload {
    /// As requested.
    pub path: String,
    pub content: String,
    pub error: String,
}

/// A guest path: absolute as given, relative under [`WORK_DIR`].
pub fn guest_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{WORK_DIR}/{path}")
    }
}

/// Go's wording for how a process ended (`exit status 1`,
/// `signal: killed`), as the original server reported it; empty for
/// success.
pub fn exit_error(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(0), _) => String::new(),
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal: {}", signal_name(signal)),
        (None, None) => "exit status unknown".to_string(),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(json: &str) -> Result<StartCommand, ApiError> {
        serde_json::from_str::<StartVmRequest>(json)
            .unwrap()
            .parse()
    }

    #[test]
    fn start_requests() {
        assert_eq!(
            start(r#"{"vmName":"my sb","extra":1,"entryPoint":"x"}"#),
            Ok(StartCommand::Start {
                spec: SandboxSpec::named("my sb"),
            })
        );
        let Ok(StartCommand::Start { spec }) = start(
            r#"{"vmName":"b","vcpus":2,"memoryMb":512,"image":"img","env":{"K":"V"},"portForwards":[{"guestPort":80,"hostPort":0}],"egress":["10.0.0.0/8"]}"#,
        ) else {
            panic!("not a start")
        };
        assert_eq!((spec.vcpus, spec.memory_mb), (Some(2), Some(512)));
        assert_eq!(spec.image.as_deref(), Some("img"));
        assert_eq!(spec.env["K"], "V");
        assert_eq!(spec.forwards[0].guest_port, 80);
        assert_eq!(spec.forwards[0].host_port, None);
        assert_eq!(
            spec.egress,
            Some(EgressPolicy::AllowList(vec!["10.0.0.0/8".parse().unwrap()]))
        );
        assert_eq!(
            start(r#"{"vmName":"c","snapshotId":"s1","kernel":"ignored"}"#),
            Ok(StartCommand::Restore {
                name: "c".into(),
                snapshot_id: "s1".into()
            })
        );
        for (json, status, hint) in [
            ("{}", 400, "vmName"),
            (r#"{"vmName":""}"#, 400, "vmName"),
            (
                r#"{"vmName":"a","snapshotId":"s","vcpus":2}"#,
                422,
                "snapshotId",
            ),
            (r#"{"vmName":"a","kernel":"/k"}"#, 422, "kernel"),
        ] {
            let err = start(json).unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{json}");
            assert!(err.message.contains(hint), "{json}: {}", err.message);
        }
    }

    #[test]
    fn state_changes() {
        let parse = |json: &str| {
            serde_json::from_str::<UpdateStateRequest>(json)
                .unwrap()
                .parse()
        };
        assert_eq!(parse(r#"{"status":"stopped"}"#), Ok(StateChange::Stop));
        assert_eq!(
            parse(r#"{"status":"paused","x":1}"#),
            Ok(StateChange::Pause)
        );
        assert_eq!(parse(r#"{"status":"resume"}"#), Ok(StateChange::Resume));
        for bad in [r#"{"status":"running"}"#, "{}"] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.status.as_u16(), 400);
            assert!(err.message.contains("\"paused\""), "{}", err.message);
        }
    }

    #[test]
    fn cmd_requests() {
        let req: CmdRequest = serde_json::from_str(r#"{"cmd":"echo hi"}"#).unwrap();
        assert!(req.blocking);
        assert_eq!(req.validate(), Ok(()));
        let req: CmdRequest = serde_json::from_str(r#"{"cmd":"","blocking":false}"#).unwrap();
        assert!(!req.blocking);
        assert!(req.validate().unwrap_err().message.contains("cmd"));
        assert!(serde_json::from_str::<CmdRequest>(r#"{"blocking":true}"#).is_err());
        assert!(serde_json::from_str::<CmdRequest>(r#"{"cmd":"x","y":1}"#).is_err());
    }

    #[test]
    fn upload_requests() {
        let ok: UploadRequest =
            serde_json::from_str(r#"{"files":[{"path":"/tmp/a b.txt","content":"h\u00e9llo"}]}"#)
                .unwrap();
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.files[0].content, "héllo");
        let empty: UploadRequest = serde_json::from_str(r#"{"files":[]}"#).unwrap();
        assert!(empty.validate().is_err());
        let no_path: UploadRequest =
            serde_json::from_str(r#"{"files":[{"path":"","content":""}]}"#).unwrap();
        assert!(no_path
            .validate()
            .unwrap_err()
            .message
            .contains("files[0].path"));
        assert!(serde_json::from_str::<UploadRequest>(r#"{"files":[{"path":"a"}]}"#).is_err());
    }

    #[test]
    fn download_queries_decode_like_the_original() {
        // What py-arrakis sends for ["/tmp/a b.txt", "x+y", "rel.txt"].
        assert_eq!(
            parse_download_query(Some("paths=/tmp/a%20b.txt,x+y,rel.txt")).unwrap(),
            vec!["/tmp/a b.txt", "x y", "rel.txt"]
        );
        for bad in [None, Some(""), Some("paths="), Some("path=a")] {
            let err = parse_download_query(bad).unwrap_err();
            assert!(err.message.contains("'paths'"), "{bad:?}");
        }
    }

    #[test]
    fn paths_and_exit_texts() {
        assert_eq!(guest_path("/etc/hostname"), "/etc/hostname");
        assert_eq!(guest_path("a/b.txt"), "/tmp/server_files/a/b.txt");
        assert_eq!(exit_error(Some(0), None), "");
        assert_eq!(exit_error(Some(2), None), "exit status 2");
        assert_eq!(exit_error(None, Some(9)), "signal: killed");
        assert_eq!(exit_error(None, Some(40)), "signal: signal 40");
    }

    #[test]
    fn vm_objects_have_the_original_keys() {
        let vm = Vm {
            vm_name: "a".into(),
            status: VmStatus::of(SandboxState::Crashed),
            ip: String::new(),
            tap_device_name: String::new(),
            port_forwards: vec![PortForward {
                host_port: "3000".into(),
                guest_port: "5901".into(),
                description: "gui".into(),
            }],
            id: "0a".into(),
            vcpus: 1,
            memory_mb: 256,
            image: "default".into(),
            created_at: rfc3339(1_748_243_823),
            from_snapshot: None,
            network_mode: None,
            mac: None,
            egress: None,
        };
        assert_eq!(
            serde_json::to_value(&vm).unwrap(),
            serde_json::json!({
                "vmName": "a", "status": "STOPPED", "ip": "", "tapDeviceName": "",
                "portForwards": [{"hostPort": "3000", "guestPort": "5901", "description": "gui"}],
                "id": "0a", "vcpus": 1, "memoryMb": 256, "image": "default",
                "createdAt": "2025-05-26T07:17:03Z"
            })
        );
        assert_eq!(serde_json::to_string(&Empty {}).unwrap(), "{}");
    }
}
