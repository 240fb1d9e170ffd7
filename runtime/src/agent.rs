//! Typed client of the guest agent over the sandbox's virtio-serial socket
//! (`<dir>/agent.sock`), on top of the multiplexed [`arrakis_protocol::Client`].
//!
//! Paths are validated here too ([`arrakis_protocol::paths::validate`]) so
//! bad input fails with a clear error before anything is sent. Guest errors
//! keep their machine-readable code ([`AgentError::Remote`]). Dropping an
//! exec future or an [`ExecSession`] before the process exits resets the
//! stream, and the agent kills the process, unless it is kept
//! ([`ExecRequest::keep`]): then it is only detached, and
//! [`AgentClient::attach`] reaches it again.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrakis_protocol::{
    paths, valid_keep_id, AttachRequest, Channel, ChmodRequest, Client, ClientOptions,
    ConfigureRequest, ErrorBody, ExecRequest, ExitStatus, FileStat, FreezeRequest, GuestInfo,
    MkdirRequest, PathRequest, ProtocolError, ReadFileRequest, RemoveRequest, Request, Response,
    SetTimeRequest, ShutdownRequest, Stream, StreamEvent, StreamMessage, StreamReceiver,
    StreamSender, WriteFileRequest, KEEP_ID_FORM, RLIMIT_NAMES,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Size of the chunks `write_file` sends.
pub const WRITE_CHUNK: usize = 64 * 1024;

/// Bound on unary calls (stat, mkdir...): a guest that does not answer in
/// this time is treated as broken.
const UNARY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid path: {}", .0.message)]
    InvalidPath(ErrorBody),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent {op} failed")]
    Protocol {
        op: &'static str,
        #[source]
        source: ProtocolError,
    },
    #[error("the guest refused {op}: {body}")]
    Remote { op: &'static str, body: ErrorBody },
    #[error("unexpected reply to {op}: {got}")]
    Unexpected { op: &'static str, got: String },
    #[error("local i/o failed during {op}")]
    LocalIo {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    fn protocol(op: &'static str) -> impl Fn(ProtocolError) -> AgentError {
        move |source| match source {
            ProtocolError::Remote(body) => AgentError::Remote { op, body },
            source => AgentError::Protocol { op, source },
        }
    }

    fn unexpected(op: &'static str, got: impl std::fmt::Debug) -> AgentError {
        let mut got = format!("{got:?}");
        got.truncate(200);
        AgentError::Unexpected { op, got }
    }
}

/// Why waiting for a booting guest's agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the VM exited after {0:?}, before its agent answered")]
    VmExited(Duration),
    #[error("the agent did not answer within {timeout:?} (last error: {last_error})")]
    Timeout {
        timeout: Duration,
        last_error: String,
    },
}

/// Limits of [`AgentClient::exec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOptions {
    /// Bytes kept of each of stdout and stderr; the rest is read and dropped.
    pub max_output_bytes: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            max_output_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The collected result of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    /// Output went past [`ExecOptions::max_output_bytes`] and was cut.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecOutput {
    fn push(&mut self, channel: Channel, data: &[u8], max: usize) {
        let (buf, truncated) = match channel {
            Channel::Stdout => (&mut self.stdout, &mut self.stdout_truncated),
            Channel::Stderr => (&mut self.stderr, &mut self.stderr_truncated),
            Channel::Stdin | Channel::File => return,
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
        *truncated |= data.len() > room;
    }
}

/// Options of [`AgentClient::write_file`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits of a new file (the agent's default is 0o644).
    pub mode: Option<u32>,
    pub create_parents: bool,
    pub append: bool,
}

#[derive(Clone)]
pub struct AgentClient {
    client: Client,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_version", &self.client.agent_version())
            .field("closed", &self.client.is_closed())
            .finish()
    }
}

fn check_path(path: &str) -> Result<(), AgentError> {
    paths::validate(path).map_err(AgentError::InvalidPath)
}

impl AgentClient {
    /// Connects and completes the session handshake.
    pub async fn connect(
        socket: &Path,
        handshake_timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let io = UnixStream::connect(socket)
            .await
            .map_err(|source| AgentError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let client = Client::connect(
            io,
            ClientOptions {
                handshake_timeout,
                ..ClientOptions::default()
            },
        )
        .await
        .map_err(AgentError::protocol("handshake"))?;
        Ok(AgentClient { client })
    }

    /// Waits for a booting guest: connects with retries until the handshake
    /// (a round trip through the agent) succeeds, `timeout` passes, or
    /// `vm_alive` says the VM is gone.
    pub async fn wait_ready(
        socket: &Path,
        timeout: Duration,
        vm_alive: impl Fn() -> bool,
    ) -> Result<AgentClient, ReadyError> {
        let start = Instant::now();
        let mut last_error = "no attempt finished".to_string();
        while start.elapsed() < timeout {
            let per_attempt = timeout
                .saturating_sub(start.elapsed())
                .min(Duration::from_secs(3));
            let attempt = AgentClient::connect(socket, per_attempt);
            tokio::select! {
                result = attempt => match result {
                    Ok(agent) => return Ok(agent),
                    Err(error) => last_error = error_chain(&error),
                },
                () = watch_exit(&vm_alive) => return Err(ReadyError::VmExited(start.elapsed())),
            }
            if !vm_alive() {
                return Err(ReadyError::VmExited(start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ReadyError::Timeout {
            timeout,
            last_error,
        })
    }

    pub fn agent_version(&self) -> &str {
        self.client.agent_version()
    }

    /// False once the session ended (the guest went away, or a protocol error).
    pub fn is_connected(&self) -> bool {
        !self.client.is_closed()
    }

    async fn unary(&self, op: &'static str, request: &Request) -> Result<Response, AgentError> {
        self.client
            .call_timeout(request, UNARY_TIMEOUT)
            .await
            .map_err(AgentError::protocol(op))
    }

    async fn expect_done(&self, op: &'static str, request: &Request) -> Result<(), AgentError> {
        match self.unary(op, request).await? {
            Response::Done => Ok(()),
            other => Err(AgentError::unexpected(op, other)),
        }
    }

    pub async fn ping(&self) -> Result<(), AgentError> {
        match self.unary("ping", &Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(AgentError::unexpected("ping", other)),
        }
    }

    pub async fn info(&self) -> Result<GuestInfo, AgentError> {
        match self.unary("info", &Request::Info).await? {
            Response::Info(info) => Ok(info),
            other => Err(AgentError::unexpected("info", other)),
        }
    }

    pub async fn mkdir(
        &self,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        check_path(path)?;
        let request = Request::Mkdir(MkdirRequest {
            path: path.to_string(),
            parents,
            mode,
        });
        self.expect_done("mkdir", &request).await
    }

    pub async fn list(&self, path: &str) -> Result<Vec<FileStat>, AgentError> {
        check_path(path)?;
        let request = Request::List(PathRequest {
            path: path.to_string(),
        });
        match self.unary("list", &request).await? {
            Response::Entries { entries } => Ok(entries),
            other => Err(AgentError::unexpected("list", other)),
        }
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        check_path(path)?;
        let request = Request::Stat(PathRequest {
            path: path.to_string(),
        });
        match self.unary("stat", &request).await? {
            Response::Stat(stat) => Ok(stat),
            other => Err(AgentError::unexpected("stat", other)),
        }
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        check_path(path)?;
        let request = Request::Remove(RemoveRequest {
            path: path.to_string(),
            recursive,
        });
        self.expect_done("remove", &request).await
    }

    pub async fn chmod(&self, path: &str, mode: u32) -> Result<(), AgentError> {
        check_path(path)?;
        if mode > 0o7777 {
            return Err(AgentError::InvalidRequest(format!(
                "mode {mode:#o} has bits outside 0o7777"
            )));
        }
        let request = Request::Chmod(ChmodRequest {
            path: path.to_string(),
            mode,
        });
        self.expect_done("chmod", &request).await
    }

    /// Sets the guest's wall clock (nanoseconds since the Unix epoch).
    pub async fn set_time(&self, unix_nanos: u64) -> Result<(), AgentError> {
        let request = Request::SetTime(SetTimeRequest { unix_nanos });
        self.expect_done("set_time", &request).await
    }

    /// Applies identity and network settings (hostname, entropy seed...).
    pub async fn configure(&self, request: ConfigureRequest) -> Result<(), AgentError> {
        self.expect_done("configure", &Request::Configure(request))
            .await
    }

    /// Freezes every process the agent started (returns once they are
    /// stopped; they thaw by themselves after `lease`), or thaws them.
    pub async fn freeze(&self, frozen: bool, lease: Duration) -> Result<(), AgentError> {
        let request = Request::Freeze(FreezeRequest {
            frozen,
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1),
        });
        self.expect_done("freeze", &request).await
    }

    /// Asks the guest to sync and power off. The session ending before the
    /// reply counts as success: the guest is going down either way.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let request = Request::Shutdown(ShutdownRequest { reboot: false });
        match self.expect_done("shutdown", &request).await {
            Err(AgentError::Protocol {
                source: ProtocolError::Disconnected,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Runs a process to completion and collects its output. A request with
    /// `stdin: true` gets an empty stdin.
    pub async fn exec(
        &self,
        request: ExecRequest,
        options: ExecOptions,
    ) -> Result<ExecOutput, AgentError> {
        validate_exec(&request)?;
        let wants_stdin = request.stdin;
        let mut stream = self
            .client
            .open(&Request::Exec(request))
            .await
            .map_err(AgentError::protocol("exec"))?;
        if wants_stdin {
            stream
                .send_eof(Channel::Stdin)
                .await
                .map_err(AgentError::protocol("exec"))?;
        }
        let mut output = ExecOutput::default();
        loop {
            let event = stream.next().await.map_err(AgentError::protocol("exec"))?;
            match exec_event(event, "exec")? {
                Some(ExecEvent::Stdout(data)) => {
                    output.push(Channel::Stdout, &data, options.max_output_bytes)
                }
                Some(ExecEvent::Stderr(data)) => {
                    output.push(Channel::Stderr, &data, options.max_output_bytes)
                }
                Some(ExecEvent::Exited(status)) => {
                    output.status = status;
                    return Ok(output);
                }
                None => {}
            }
        }
    }

    /// Starts a process and returns once the guest reports it started.
    pub async fn exec_stream(&self, request: ExecRequest) -> Result<ExecSession, AgentError> {
        validate_exec(&request)?;
        let terminal = request.tty.is_some();
        let stream = self
            .client
            .open(&Request::Exec(request))
            .await
            .map_err(AgentError::protocol("exec"))?;
        ExecSession::start(stream, "exec", terminal).await
    }

    /// Attaches to the kept process `id` (started with [`ExecRequest::keep`])
    /// and returns once the guest reports it, with its pid (as
    /// [`AgentClient::exec_stream`]). The output that waited while nobody
    /// was attached comes first, then live output; a process that already
    /// exited yields its exit after its output. A stream attached elsewhere
    /// is closed (its session gets [`AgentError::Remote`] with code
    /// `cancelled`). Unknown id: [`AgentError::Remote`] with code
    /// `not_found`.
    pub async fn attach(&self, id: &str) -> Result<ExecSession, AgentError> {
        check_keep_id("id", id)?;
        let request = Request::Attach(AttachRequest { id: id.to_owned() });
        let stream = self
            .client
            .open(&request)
            .await
            .map_err(AgentError::protocol("attach"))?;
        // Only agents that know `resize` answer `attach`, and whether the
        // process has a terminal is theirs to know.
        ExecSession::start(stream, "attach", true).await
    }

    /// Copies the guest file at `path` into `out`; returns the byte count.
    pub async fn read_file<W>(&self, path: &str, out: &mut W) -> Result<u64, AgentError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        check_path(path)?;
        let request = Request::ReadFile(ReadFileRequest {
            path: path.to_string(),
            offset: 0,
            length: None,
        });
        let mut stream = self
            .client
            .open(&request)
            .await
            .map_err(AgentError::protocol("read_file"))?;
        let mut copied = 0u64;
        loop {
            match stream
                .next()
                .await
                .map_err(AgentError::protocol("read_file"))?
            {
                StreamEvent::Data(Channel::File, data) => {
                    out.write_all(&data)
                        .await
                        .map_err(|source| AgentError::LocalIo {
                            op: "read_file",
                            source,
                        })?;
                    copied += data.len() as u64;
                }
                StreamEvent::Eof(Channel::File) => {}
                StreamEvent::Closed(Ok(Response::FileRead { bytes })) if bytes == copied => break,
                StreamEvent::Closed(Err(body)) => {
                    return Err(AgentError::Remote {
                        op: "read_file",
                        body,
                    })
                }
                other => return Err(AgentError::unexpected("read_file", other)),
            }
        }
        out.flush().await.map_err(|source| AgentError::LocalIo {
            op: "read_file",
            source,
        })?;
        Ok(copied)
    }

    /// Writes everything `src` yields to the guest file at `path`, in
    /// [`WRITE_CHUNK`] pieces; returns the byte count the guest confirmed.
    pub async fn write_file<R>(
        &self,
        path: &str,
        src: &mut R,
        options: WriteOptions,
    ) -> Result<u64, AgentError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        check_path(path)?;
        let request = Request::WriteFile(WriteFileRequest {
            path: path.to_string(),
            mode: options.mode,
            create_parents: options.create_parents,
            append: options.append,
        });
        let mut stream = self
            .client
            .open(&request)
            .await
            .map_err(AgentError::protocol("write_file"))?;
        let sent = match send_file(&stream, src).await {
            Ok(sent) => sent,
            // The guest ended the stream early (e.g. permission denied):
            // its reason is in the final event.
            Err(SendError::Stream(ProtocolError::StreamClosed)) => u64::MAX,
            Err(SendError::Stream(source)) => {
                return Err(AgentError::protocol("write_file")(source))
            }
            Err(SendError::Local(source)) => {
                return Err(AgentError::LocalIo {
                    op: "write_file",
                    source,
                })
            }
        };
        loop {
            match stream
                .next()
                .await
                .map_err(AgentError::protocol("write_file"))?
            {
                StreamEvent::Closed(Ok(Response::FileWritten { bytes })) if bytes == sent => {
                    return Ok(bytes)
                }
                StreamEvent::Closed(Err(body)) => {
                    return Err(AgentError::Remote {
                        op: "write_file",
                        body,
                    })
                }
                StreamEvent::Message(_) | StreamEvent::Eof(_) => {}
                other => return Err(AgentError::unexpected("write_file", other)),
            }
        }
    }
}

enum SendError {
    Stream(ProtocolError),
    Local(std::io::Error),
}

async fn send_file<R>(stream: &Stream, src: &mut R) -> Result<u64, SendError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut sent = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
        let n = src.read_buf(&mut buf).await.map_err(SendError::Local)?;
        if n == 0 {
            break;
        }
        stream
            .send_data(Channel::File, buf.freeze())
            .await
            .map_err(SendError::Stream)?;
        sent += n as u64;
    }
    stream
        .send_eof(Channel::File)
        .await
        .map_err(SendError::Stream)?;
    Ok(sent)
}

fn validate_exec(request: &ExecRequest) -> Result<(), AgentError> {
    match &request.command {
        arrakis_protocol::Command::Argv(argv) if argv.is_empty() => {
            return Err(AgentError::InvalidRequest(
                "the command's argv is empty".into(),
            ))
        }
        arrakis_protocol::Command::Argv(argv) if argv.iter().any(|a| a.contains('\0')) => {
            return Err(AgentError::InvalidRequest(
                "an argument contains a NUL byte".into(),
            ))
        }
        arrakis_protocol::Command::Shell(script) if script.contains('\0') => {
            return Err(AgentError::InvalidRequest(
                "the shell command contains a NUL byte".into(),
            ))
        }
        _ => {}
    }
    if let Some(cwd) = &request.cwd {
        check_path(cwd)?;
    }
    if let Some((key, _)) = request
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(AgentError::InvalidRequest(format!(
            "environment variable {key:?}: names must be non-empty without '=' or NUL, values without NUL"
        )));
    }
    if let Some(id) = &request.keep {
        check_keep_id("keep", id)?;
    }
    if let Some(size) = request.tty {
        check_size("tty", size.rows, size.cols)?;
    }
    for limit in &request.rlimits {
        if !RLIMIT_NAMES.contains(&limit.resource.as_str()) {
            return Err(AgentError::InvalidRequest(format!(
                "rlimits: unknown resource {:?}; accepted: {}",
                limit.resource,
                RLIMIT_NAMES.join(", ")
            )));
        }
        if limit.soft > limit.hard {
            return Err(AgentError::InvalidRequest(format!(
                "rlimits: {} has its soft limit {} above its hard limit {}",
                limit.resource, limit.soft, limit.hard
            )));
        }
    }
    Ok(())
}

fn check_keep_id(field: &str, id: &str) -> Result<(), AgentError> {
    if valid_keep_id(id) {
        Ok(())
    } else {
        Err(AgentError::InvalidRequest(format!(
            "{field} {id:?}: a kept process id is {KEEP_ID_FORM}"
        )))
    }
}

fn check_size(field: &str, rows: u16, cols: u16) -> Result<(), AgentError> {
    if rows == 0 || cols == 0 {
        return Err(AgentError::InvalidRequest(format!(
            "{field}: a terminal needs at least 1 row and 1 column (got {rows}x{cols})"
        )));
    }
    Ok(())
}

/// Output and the end of a streamed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exited(ExitStatus),
}

/// Maps a stream event of an exec to what callers care about (`None`: nothing).
/// `op` names the request in errors (`exec` or `attach`).
fn exec_event(event: StreamEvent, op: &'static str) -> Result<Option<ExecEvent>, AgentError> {
    Ok(match event {
        StreamEvent::Data(Channel::Stdout, data) => Some(ExecEvent::Stdout(data)),
        StreamEvent::Data(Channel::Stderr, data) => Some(ExecEvent::Stderr(data)),
        StreamEvent::Closed(Ok(Response::Exited(status))) => Some(ExecEvent::Exited(status)),
        StreamEvent::Closed(Err(body)) => return Err(AgentError::Remote { op, body }),
        StreamEvent::Eof(_) | StreamEvent::Message(StreamMessage::Started { .. }) => None,
        other => return Err(AgentError::unexpected(op, other)),
    })
}

/// Writes a streamed process's stdin; cheap to clone, usable from another task.
#[derive(Clone)]
pub struct ExecStdin {
    sender: StreamSender,
}

impl ExecStdin {
    pub async fn write(&self, data: Bytes) -> Result<(), AgentError> {
        self.sender
            .send_data(Channel::Stdin, data)
            .await
            .map_err(AgentError::protocol("exec stdin"))
    }

    /// Closes stdin (the process reads EOF).
    pub async fn close(&self) -> Result<(), AgentError> {
        self.sender
            .send_eof(Channel::Stdin)
            .await
            .map_err(AgentError::protocol("exec stdin"))
    }
}

/// Controls a streamed process from any task (stdin, signals, terminal
/// size) while another one reads its output ([`ExecSession::next`]).
/// Cheap to clone. Once the session is dropped or the process exited,
/// every call fails.
#[derive(Clone)]
pub struct ExecControl {
    sender: StreamSender,
    /// Whether a resize is sent: not for an exec started without a
    /// terminal (an agent older than `resize` would take the unknown
    /// message as a broken session).
    terminal: bool,
}

impl std::fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecControl")
            .field("stream", &self.sender.id())
            .finish()
    }
}

impl ExecControl {
    /// Writes to the process's stdin (or types into its terminal); waits
    /// for flow-control credit.
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), AgentError> {
        self.sender
            .send_data(Channel::Stdin, data)
            .await
            .map_err(AgentError::protocol("exec stdin"))
    }

    /// Closes stdin (the process reads EOF; on a terminal, input just stops).
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        self.sender
            .send_eof(Channel::Stdin)
            .await
            .map_err(AgentError::protocol("exec stdin"))
    }

    /// Delivers `signal` to the process, or to its whole tree with `group`.
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), AgentError> {
        self.sender
            .send_message(&StreamMessage::Signal { signal, group })
            .await
            .map_err(AgentError::protocol("exec signal"))
    }

    /// Resizes the process's terminal (the guest ignores it for a process
    /// without one). Both sizes must be at least 1.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        check_size("resize", rows, cols)?;
        if !self.terminal {
            return Ok(());
        }
        self.sender
            .send_message(&StreamMessage::Resize { rows, cols })
            .await
            .map_err(AgentError::protocol("exec resize"))
    }
}

/// A running process in the guest. Dropping it before the process exits
/// resets the stream, even while [`ExecStdin`] or [`ExecControl`] handles
/// live on: the agent kills the process, unless it is kept
/// ([`ExecRequest::keep`]): then it only detaches.
pub struct ExecSession {
    pid: u32,
    sender: StreamSender,
    receiver: StreamReceiver,
    /// Events that arrived before `Started`.
    early: VecDeque<ExecEvent>,
    exited: Option<ExitStatus>,
    /// The request that opened the stream, for errors.
    op: &'static str,
    /// See [`ExecControl::terminal`].
    terminal: bool,
}

impl ExecSession {
    async fn start(
        stream: Stream,
        op: &'static str,
        terminal: bool,
    ) -> Result<ExecSession, AgentError> {
        let (sender, mut receiver) = stream.split();
        let mut early = VecDeque::new();
        loop {
            let event = receiver.next().await.map_err(AgentError::protocol(op))?;
            if let StreamEvent::Message(StreamMessage::Started { pid }) = event {
                return Ok(ExecSession {
                    pid,
                    sender,
                    receiver,
                    early,
                    exited: None,
                    op,
                    terminal,
                });
            }
            match exec_event(event, op)? {
                Some(ExecEvent::Exited(status)) => {
                    return Err(AgentError::unexpected(
                        op,
                        format!("exited before starting: {status:?}"),
                    ))
                }
                Some(event) => early.push_back(event),
                None => {}
            }
        }
    }

    /// The process id inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle for stdin, signals and resizes, usable while another task
    /// reads the output with [`ExecSession::next`].
    pub fn control(&self) -> ExecControl {
        ExecControl {
            sender: self.sender.clone(),
            terminal: self.terminal,
        }
    }

    /// A handle to the process's stdin (the request must have had `stdin: true`).
    pub fn stdin(&self) -> ExecStdin {
        ExecStdin {
            sender: self.sender.clone(),
        }
    }

    /// Delivers `signal` to the process, or to its whole tree with `group`.
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), AgentError> {
        self.control().signal(signal, group).await
    }

    /// Resizes the process's terminal; see [`ExecControl::resize`].
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.control().resize(rows, cols).await
    }

    /// The next output or the exit; after the exit, the exit again.
    /// Cancel-safe: usable in `tokio::select!` (no event is lost).
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        if let Some(event) = self.early.pop_front() {
            return Ok(event);
        }
        if let Some(status) = self.exited {
            return Ok(ExecEvent::Exited(status));
        }
        loop {
            let event = self
                .receiver
                .next()
                .await
                .map_err(AgentError::protocol(self.op))?;
            if let Some(event) = exec_event(event, self.op)? {
                if let ExecEvent::Exited(status) = event {
                    self.exited = Some(status);
                }
                return Ok(event);
            }
        }
    }

    /// Collects the remaining output until the process exits.
    pub async fn wait(mut self, options: ExecOptions) -> Result<ExecOutput, AgentError> {
        let mut output = ExecOutput::default();
        loop {
            match self.next().await? {
                ExecEvent::Stdout(data) => {
                    output.push(Channel::Stdout, &data, options.max_output_bytes)
                }
                ExecEvent::Stderr(data) => {
                    output.push(Channel::Stderr, &data, options.max_output_bytes)
                }
                ExecEvent::Exited(status) => {
                    output.status = status;
                    return Ok(output);
                }
            }
        }
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        // Handles cloned from the sender must not keep the stream alive.
        self.sender.reset();
    }
}

/// Resolves when `alive` turns false.
async fn watch_exit(alive: &impl Fn() -> bool) {
    while alive() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub use arrakis_protocol::error_chain;

mod tunnel;
#[cfg(feature = "testing")]
pub use tunnel::fake as tunnel_fake;
pub use tunnel::{Spliced, TcpTunnel, CONNECT_TCP_TIMEOUT};

#[cfg(test)]
mod tests;
