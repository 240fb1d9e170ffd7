//! Control messages carried on a stream (JSON encoded inside `OPEN`, `MESSAGE`
//! and `CLOSE` frames). Bulk bytes (stdout, stderr, stdin, file contents)
//! never travel here; they go in `DATA` frames, see [`crate::frame`].
//!
//! Every type here is part of the frozen wire format: renaming a field or a
//! variant is a protocol version bump (see `tests/wire_schema.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The first message of every stream, sent by the host in an `OPEN` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check. Reply: [`Response::Pong`].
    Ping,
    /// Describe the guest. Reply: [`Response::Info`].
    Info,
    /// Run a process. While it runs the guest sends `DATA` frames on the
    /// stdout/stderr channels and the host may send `DATA` on the stdin
    /// channel, an `EOF` for stdin, [`StreamMessage::Signal`] and
    /// [`StreamMessage::Resize`]. The guest first sends
    /// [`StreamMessage::Started`], then closes the stream with
    /// [`Response::Exited`]. A `RESET` (or the end of the session) kills
    /// the process tree, unless the exec is kept ([`ExecRequest::keep`]):
    /// then it only detaches the stream.
    Exec(ExecRequest),
    /// Attach a new stream to a kept process ([`ExecRequest::keep`]). It
    /// then behaves as the stream of that exec: [`StreamMessage::Started`]
    /// first, then the output waiting in the process's pipes and the live
    /// output, stdin, signals and resizes, and [`Response::Exited`] once the
    /// process exited and its output is drained (the kept entry is then
    /// forgotten). A stream already attached is closed with
    /// [`ErrorCode::Cancelled`]. Unknown id: [`ErrorCode::NotFound`].
    Attach(AttachRequest),
    /// Read a file. The guest streams its bytes as `DATA` frames on the file
    /// channel, then closes with [`Response::FileRead`].
    ReadFile(ReadFileRequest),
    /// Write a file. The host streams the bytes as `DATA` frames on the file
    /// channel and ends them with `EOF`; the guest closes with
    /// [`Response::FileWritten`].
    WriteFile(WriteFileRequest),
    /// Create a directory. Reply: [`Response::Done`].
    Mkdir(MkdirRequest),
    /// List a directory. Reply: [`Response::Entries`].
    List(PathRequest),
    /// Describe one path without following a final symlink. Reply: [`Response::Stat`].
    Stat(PathRequest),
    /// Remove a file, symlink or directory. Reply: [`Response::Done`].
    Remove(RemoveRequest),
    /// Change permission bits. Reply: [`Response::Done`].
    Chmod(ChmodRequest),
    /// Set the guest wall clock. Reply: [`Response::Done`].
    SetTime(SetTimeRequest),
    /// Apply identity and network settings. Reply: [`Response::Done`].
    Configure(ConfigureRequest),
    /// Freeze or thaw every process the agent started (all execs and what
    /// they spawned; the agent itself keeps running). A freeze returns once
    /// they are stopped, and ends by itself after its lease unless thawed
    /// first. Around a snapshot this keeps user code from running in a
    /// clone before it has its own entropy, clock and name. Reply:
    /// [`Response::Done`].
    Freeze(FreezeRequest),
    /// Sync disks and power the guest off (or reboot). Reply: [`Response::Done`],
    /// sent before the guest goes down.
    Shutdown(ShutdownRequest),
    /// Open a TCP connection to `127.0.0.1:port` inside the guest and tunnel
    /// it over the stream. Once connected the guest sends
    /// [`StreamMessage::Connected`]; then the host's bytes for the socket go
    /// in `DATA` frames on the stdin channel and the socket's bytes come back
    /// on the stdout channel. `EOF` on either is a half-close (the guest
    /// shuts down the socket's write side; the socket's end of input is sent
    /// as `EOF` on stdout). The guest closes with [`Response::Done`] once
    /// both directions ended, or with an error (nothing listens:
    /// [`ErrorCode::Unavailable`]); `RESET` from the host drops the connection.
    Connect(ConnectRequest),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// What to run.
    pub command: Command,
    /// Extra environment, applied over the guest's default environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the user's home (or `/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid to run as; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Kill the whole process tree after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When true the host will stream stdin; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    // The fields below were added after version 1 shipped: they are left
    // out of the JSON when unset, so a request that does not use them is
    // byte for byte what older agents accept.
    /// Keep the process under this id ([`valid_keep_id`]): a reset stream
    /// or a new session only detaches it (its output waits in its pipes,
    /// stdin stays open, its exit status is kept) and
    /// [`Request::Attach`] reaches it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    /// Run on a new pseudo-terminal of this size: the terminal is the
    /// process's stdin, stdout and stderr (and its controlling terminal);
    /// its output comes on the stdout channel, stderr only gets `EOF`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Resource limits set in the process before it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// Supplementary group ids, in addition to the user's own groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// The environment is exactly `env`, plus `PATH` and `HOME` when `env`
    /// lacks them (as runc does), instead of `env` over the guest's defaults.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clear_env: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Size of a terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// One resource limit (`setrlimit(2)`). `u64::MAX` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// Named as in the OCI runtime spec: one of [`RLIMIT_NAMES`].
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

/// The resource names [`Rlimit::resource`] accepts (Linux's, as the OCI
/// runtime spec spells them).
pub const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
];

/// Longest id of a kept process.
pub const KEEP_ID_MAX: usize = 64;

/// Whether `id` can name a kept process: 1 to [`KEEP_ID_MAX`] characters
/// of `[A-Za-z0-9._-]`.
pub fn valid_keep_id(id: &str) -> bool {
    (1..=KEEP_ID_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What [`valid_keep_id`] accepts, for error messages.
pub const KEEP_ID_FORM: &str = "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// The [`ExecRequest::keep`] id of the process.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Executed directly (no shell), `argv[0]` looked up in `PATH`.
    Argv(Vec<String>),
    /// Run by `/bin/bash -c` when bash exists, else `/bin/sh -c`.
    Shell(String),
}

impl Default for Command {
    fn default() -> Self {
        Command::Argv(Vec::new())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// Read at most this many bytes; to the end of the file when absent.
    #[serde(default)]
    pub length: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits for a newly created file (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_parents: bool,
    /// Append instead of truncating.
    #[serde(default)]
    pub append: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default)]
    pub parents: bool,
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChmodRequest {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeRequest {
    /// Nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// True to freeze, false to thaw.
    pub frozen: bool,
    /// A freeze thaws by itself after this many milliseconds of guest
    /// monotonic time (so a host that dies mid-snapshot cannot leave the
    /// guest frozen). Ignored when thawing.
    #[serde(default)]
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigureRequest {
    #[serde(default)]
    pub hostname: Option<String>,
    /// Interface settings to apply, e.g. after a restore gave the VM a new address.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Bytes mixed into the guest's entropy pool (after a restore, so clones diverge).
    #[serde(default)]
    pub entropy: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub interface: String,
    /// Address with prefix length, e.g. `10.20.1.2/24`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// New hardware address (`02:a5:0a:14:00:03`), set before the address:
    /// a clone's NIC still has its parent's.
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub reboot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// TCP port on the guest's loopback address (1 to 65535).
    pub port: u16,
}

/// Mid-stream control messages (`MESSAGE` frames), in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamMessage {
    /// Guest -> host: the process of an `exec` stream has started.
    Started { pid: u32 },
    /// Host -> guest: deliver a signal to the process of an `exec` or
    /// `attach` stream.
    /// `group` sends it to the whole process tree.
    Signal { signal: i32, group: bool },
    /// Guest -> host: the connection of a `connect` stream is established;
    /// bytes may flow.
    Connected,
    /// Host -> guest: the terminal of an `exec`/`attach` stream has a new
    /// size (ignored when the exec has no terminal).
    Resize { rows: u16, cols: u16 },
}

/// The final message of a stream, carried by its `CLOSE` frame.
pub type Outcome = Result<Response, ErrorBody>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Pong,
    Info(GuestInfo),
    Exited(ExitStatus),
    FileRead { bytes: u64 },
    FileWritten { bytes: u64 },
    Entries { entries: Vec<FileStat> },
    Stat(FileStat),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestInfo {
    /// Agent (guest-init) version.
    pub agent_version: String,
    /// The protocol version the agent speaks.
    pub protocol_version: u32,
    pub kernel_release: String,
    pub hostname: String,
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed the process tree because `timeout_ms` elapsed.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Shell-style exit code: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => -1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStat {
    /// Base name for directory entries, the requested path for `stat`.
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Target of a symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// An error reported by the peer. `code` is machine readable; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed or a field had an unacceptable value.
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    /// The path is a directory where a file was needed, or the reverse.
    WrongKind,
    /// The stream was cancelled by the peer.
    Cancelled,
    /// The operation is not supported by this agent.
    Unsupported,
    /// Any other failure inside the guest.
    Internal,
    /// The target is not reachable now (nothing listens on the port, the
    /// connection was refused, reset or timed out); a later retry may work.
    Unavailable,
}
