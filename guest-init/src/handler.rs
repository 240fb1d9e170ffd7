//! The agent's request dispatch: one [`Agent`] answers every stream the host
//! opens, adapting the multiplexed stream to the exec, file and tunnel cores and
//! mapping their errors to protocol error codes (the only place that does).

use std::error::Error;
use std::io;
use std::path::Path;
use std::time::Duration;

use arrakis_protocol::{
    error_chain, AttachRequest, Channel, ConfigureRequest, ErrorBody, ErrorCode, ExecRequest,
    GuestInfo, Handler, Outcome, ReadFileRequest, Request, Response, Stream, StreamEvent,
    StreamMessage, StreamReceiver, StreamSender, WriteFileRequest, PROTOCOL_VERSION,
};
use bytes::Bytes;
use tracing::Instrument;

use crate::exec::{AttachEnd, ExecContext, ExecError, ExecInput, ExecOutput, Gone, HostEvent};
use crate::files::{self, FileError, FileSink, FileSource, Incoming, WriteOptions};
use crate::log::RateLimit;
use crate::net::{self, NetError, NetSettings};
use crate::system::{self, SystemError};
use crate::tunnel::{self, TunnelError};
use crate::users::UserError;

/// Delay between the `Done` reply to `Shutdown` and the power-off, so the
/// reply leaves the port first.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(50);
static LOG_LIMIT: RateLimit = RateLimit::new(20);

/// The guest agent.
#[derive(Debug)]
pub struct Agent {
    exec: ExecContext,
    /// Whether this process is the guest's init: only then may requests
    /// change the clock, hostname, network or power state.
    is_init: bool,
    /// Counts freezes and thaws: a freeze's lease thaws only if nothing
    /// happened since.
    freezes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Freezes and thaws apply one at a time, in the order they arrive.
    freezing: tokio::sync::Mutex<()>,
}

/// Lease of a freeze that names none, and the longest one accepted.
const DEFAULT_FREEZE_LEASE: Duration = Duration::from_secs(10);
const MAX_FREEZE_LEASE: Duration = Duration::from_secs(120);

impl Agent {
    pub fn new(exec: ExecContext, is_init: bool) -> Agent {
        Agent {
            exec,
            is_init,
            freezes: Default::default(),
            freezing: tokio::sync::Mutex::new(()),
        }
    }

    /// Freezes or thaws the execs; a freeze thaws by itself when its lease
    /// runs out (guest monotonic time, which a restored clone continues).
    async fn freeze(&self, frozen: bool, lease_ms: u64) -> Result<(), ErrorBody> {
        use std::sync::atomic::Ordering;
        self.require_init("freeze")?;
        let _turn = self.freezing.lock().await;
        let generation = self.freezes.fetch_add(1, Ordering::SeqCst) + 1;
        let cgroups = self.exec.cgroups.clone();
        tokio::task::spawn_blocking(move || cgroups.set_frozen(frozen))
            .await
            .map_err(|e| internal(&e))?
            .map_err(|e| match e.kind() {
                io::ErrorKind::Unsupported => ErrorBody::new(ErrorCode::Unsupported, e.to_string()),
                _ => internal(&e),
            })?;
        if frozen {
            let lease = match lease_ms {
                0 => DEFAULT_FREEZE_LEASE,
                ms => Duration::from_millis(ms).min(MAX_FREEZE_LEASE),
            };
            let (cgroups, freezes) = (self.exec.cgroups.clone(), self.freezes.clone());
            tokio::spawn(async move {
                tokio::time::sleep(lease).await;
                if freezes.load(Ordering::SeqCst) == generation {
                    tracing::warn!(?lease, "freeze lease ran out; thawing the execs");
                    let _ = tokio::task::spawn_blocking(move || cgroups.set_frozen(false)).await;
                }
            });
        }
        Ok(())
    }
}

impl Handler for Agent {
    async fn handle(&self, request: Request, stream: Stream) {
        let op = op_name(&request);
        let span = tracing::debug_span!("stream", id = stream.id(), op);
        self.dispatch(op, request, stream).instrument(span).await;
    }
}

impl Agent {
    async fn dispatch(&self, op: &'static str, request: Request, stream: Stream) {
        tracing::debug!("request");
        match request {
            Request::Exec(req) => self.exec(req, stream).await,
            Request::Attach(req) => self.attach(req, stream).await,
            Request::ReadFile(req) => read_file(req, stream).await,
            Request::WriteFile(req) => write_file(req, stream).await,
            Request::Shutdown(req) => self.shutdown(req.reboot, stream).await,
            Request::Connect(req) => connect(req.port, stream).await,
            other => {
                let outcome = self.simple(other).await;
                finish(stream.close(outcome).await, op);
            }
        }
    }
}

fn op_name(request: &Request) -> &'static str {
    match request {
        Request::Ping => "ping",
        Request::Info => "info",
        Request::Exec(_) => "exec",
        Request::Attach(_) => "attach",
        Request::ReadFile(_) => "read_file",
        Request::WriteFile(_) => "write_file",
        Request::Mkdir(_) => "mkdir",
        Request::List(_) => "list",
        Request::Stat(_) => "stat",
        Request::Remove(_) => "remove",
        Request::Chmod(_) => "chmod",
        Request::SetTime(_) => "set_time",
        Request::Configure(_) => "configure",
        Request::Freeze(_) => "freeze",
        Request::Shutdown(_) => "shutdown",
        Request::Connect(_) => "connect",
    }
}

fn finish<E: std::fmt::Display>(closed: Result<(), E>, op: &str) {
    if let Err(e) = closed {
        if LOG_LIMIT.allow() {
            tracing::debug!(error = %e, op, "could not send the reply");
        }
    }
}

impl Agent {
    async fn exec(&self, request: ExecRequest, stream: Stream) {
        let (sender, receiver) = stream.split();
        if request.keep.is_some() {
            let result = self
                .exec
                .run_kept(&request, StreamOut(sender.clone()), StreamIn(receiver))
                .await;
            end_attached(result, &sender, "exec").await;
            self.exec.prepare_next();
            return;
        }
        let result = self
            .exec
            .run(&request, StreamOut(sender.clone()), StreamIn(receiver))
            .await;
        let outcome = match result {
            Ok(done) if done.cancelled => Err(ErrorBody::new(
                ErrorCode::Cancelled,
                "the exec was cancelled by the host; its process tree was killed",
            )),
            Ok(done) => Ok(Response::Exited(done.status)),
            Err(e) => Err(exec_error(&e)),
        };
        finish(sender.close(outcome).await, "exec");
        self.exec.prepare_next();
    }

    async fn attach(&self, request: AttachRequest, stream: Stream) {
        let (sender, receiver) = stream.split();
        let result = self
            .exec
            .attach(&request.id, StreamOut(sender.clone()), StreamIn(receiver))
            .await;
        end_attached(result, &sender, "attach").await;
    }

    async fn simple(&self, request: Request) -> Outcome {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::Info => info(),
            Request::Mkdir(req) => {
                let path = resolve(&req.path)?;
                blocking(move || files::mkdir(&path, req.parents, req.mode)).await?;
                Ok(Response::Done)
            }
            Request::List(req) => {
                let path = resolve(&req.path)?;
                let entries = blocking(move || files::list(&path)).await?;
                Ok(Response::Entries { entries })
            }
            Request::Stat(req) => {
                let path = resolve(&req.path)?;
                let stat = blocking(move || files::stat(&path, &req.path)).await?;
                Ok(Response::Stat(stat))
            }
            Request::Remove(req) => {
                let path = resolve(&req.path)?;
                blocking(move || files::remove(&path, req.recursive)).await?;
                Ok(Response::Done)
            }
            Request::Chmod(req) => {
                let path = resolve(&req.path)?;
                blocking(move || files::chmod(&path, req.mode)).await?;
                Ok(Response::Done)
            }
            Request::SetTime(req) => {
                self.require_init("set_time")?;
                system::set_time(req.unix_nanos).map_err(|e| system_error(&e))?;
                Ok(Response::Done)
            }
            Request::Configure(req) => {
                self.require_init("configure")?;
                tokio::task::spawn_blocking(move || configure(&req))
                    .await
                    .map_err(|e| internal(&e))??;
                Ok(Response::Done)
            }
            Request::Freeze(req) => {
                self.freeze(req.frozen, req.lease_ms).await?;
                Ok(Response::Done)
            }
            // Streamed or replied-before-acting requests are handled in `handle`.
            Request::Exec(_)
            | Request::Attach(_)
            | Request::ReadFile(_)
            | Request::WriteFile(_)
            | Request::Shutdown(_)
            | Request::Connect(_) => Err(ErrorBody::new(
                ErrorCode::Internal,
                "request dispatched to the wrong path",
            )),
        }
    }

    fn require_init(&self, op: &str) -> Result<(), ErrorBody> {
        if self.is_init {
            Ok(())
        } else {
            Err(ErrorBody::new(
                ErrorCode::Unsupported,
                format!("{op} is only available when the agent runs as the guest's init"),
            ))
        }
    }

    async fn shutdown(&self, reboot: bool, stream: Stream) {
        if let Err(e) = self.require_init("shutdown") {
            finish(stream.close(Err(e)).await, "shutdown");
            return;
        }
        finish(stream.close(Ok(Response::Done)).await, "shutdown");
        tokio::time::sleep(SHUTDOWN_DELAY).await;
        let _ = tokio::task::spawn_blocking(move || system::shutdown(reboot)).await;
    }
}

/// Closes the stream of a kept exec as its attachment ended.
async fn end_attached(result: Result<AttachEnd, ExecError>, sender: &StreamSender, op: &str) {
    match result {
        Ok(AttachEnd::Exited { status, ack }) => {
            let closed = sender.close(Ok(Response::Exited(status))).await;
            ack.reply_sent(closed.is_ok());
            finish(closed, op);
        }
        Ok(AttachEnd::Replaced) => {
            let body = ErrorBody::new(
                ErrorCode::Cancelled,
                "attached elsewhere: another stream took over this kept process",
            );
            finish(sender.close(Err(body)).await, op);
        }
        // The host reset the stream or left: the process stays kept.
        Ok(AttachEnd::Detached) => {}
        Err(e) => finish(sender.close(Err(exec_error(&e))).await, op),
    }
}

fn info() -> Outcome {
    Ok(Response::Info(GuestInfo {
        agent_version: crate::agent::AGENT_VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION,
        kernel_release: system::kernel_release().map_err(|e| system_error(&e))?,
        hostname: system::hostname(),
        uptime_ms: system::uptime_ms().map_err(|e| system_error(&e))?,
    }))
}

/// Applies a `Configure` request: entropy first (cheap, and the most
/// important after a restore), then the hostname, then the network.
fn configure(req: &ConfigureRequest) -> Result<(), ErrorBody> {
    if let Some(entropy) = &req.entropy {
        system::add_entropy(entropy).map_err(|e| system_error(&e))?;
    }
    if let Some(hostname) = &req.hostname {
        system::set_hostname(hostname).map_err(|e| system_error(&e))?;
    }
    if let Some(network) = &req.network {
        let settings = NetSettings::from_request(network).map_err(|e| net_error(&e))?;
        net::apply(&settings).map_err(|e| net_error(&e))?;
        if !settings.nameservers.is_empty() {
            net::write_resolv_conf(Path::new("/etc/resolv.conf"), &settings.nameservers)
                .map_err(|e| net_error(&e))?;
        }
    }
    Ok(())
}

async fn read_file(req: ReadFileRequest, stream: Stream) {
    let result = async {
        let path = resolve(&req.path)?;
        let sink = StreamFile(&stream);
        let bytes = files::read_file(&path, req.offset, req.length, &sink)
            .await
            .map_err(|e| file_error(&e))?;
        stream
            .send_eof(Channel::File)
            .await
            .map_err(|e| internal(&e))?;
        Ok(Response::FileRead { bytes })
    }
    .await;
    finish(stream.close(result).await, "read_file");
}

async fn write_file(req: WriteFileRequest, mut stream: Stream) {
    let result = async {
        let path = resolve(&req.path)?;
        let options = WriteOptions {
            mode: req.mode,
            create_parents: req.create_parents,
            append: req.append,
        };
        let bytes = files::write_file(&path, options, &mut StreamSource(&mut stream))
            .await
            .map_err(|e| file_error(&e))?;
        Ok(Response::FileWritten { bytes })
    }
    .await;
    finish(stream.close(result).await, "write_file");
}

async fn connect(port: u16, stream: Stream) {
    let (sender, receiver) = stream.split();
    // None: the host reset the stream or left; nobody reads a reply.
    if let Some(result) = tunnel::run(port, &sender, receiver).await {
        let outcome = result
            .map(|()| Response::Done)
            .map_err(|e| tunnel_error(&e));
        finish(sender.close(outcome).await, "connect");
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, ErrorBody> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| file_error(&e))
}

fn resolve(path: &str) -> Result<std::path::PathBuf, ErrorBody> {
    files::resolve(path).map_err(|e| file_error(&e))
}

/// Exec output on the stream.
#[derive(Clone)]
struct StreamOut(StreamSender);

impl ExecOutput for StreamOut {
    async fn started(&self, pid: u32) -> Result<(), Gone> {
        self.0
            .send_message(&StreamMessage::Started { pid })
            .await
            .map_err(|_| Gone)
    }

    async fn data(&self, channel: Channel, data: Bytes) -> Result<(), Gone> {
        self.0.send_data(channel, data).await.map_err(|_| Gone)
    }

    async fn eof(&self, channel: Channel) -> Result<(), Gone> {
        self.0.send_eof(channel).await.map_err(|_| Gone)
    }
}

/// Host events of an exec stream.
struct StreamIn(StreamReceiver);

impl ExecInput for StreamIn {
    async fn next(&mut self) -> HostEvent {
        loop {
            match self.0.next().await {
                Ok(StreamEvent::Data(Channel::Stdin, data)) => return HostEvent::Stdin(data),
                Ok(StreamEvent::Eof(Channel::Stdin)) => return HostEvent::StdinEof,
                Ok(StreamEvent::Message(StreamMessage::Signal { signal, group })) => {
                    return HostEvent::Signal { signal, group }
                }
                Ok(StreamEvent::Message(StreamMessage::Resize { rows, cols })) => {
                    return HostEvent::Resize { rows, cols }
                }
                Ok(StreamEvent::Reset) | Err(_) => return HostEvent::Cancel,
                Ok(other) => unexpected(&other, "exec"),
            }
        }
    }
}

/// File bytes read by the guest, sent on the stream.
struct StreamFile<'a>(&'a Stream);

impl FileSink for StreamFile<'_> {
    async fn data(&self, data: Bytes) -> Result<(), Gone> {
        self.0
            .send_data(Channel::File, data)
            .await
            .map_err(|_| Gone)
    }
}

/// File bytes written by the host, taken from the stream.
struct StreamSource<'a>(&'a mut Stream);

impl FileSource for StreamSource<'_> {
    async fn next(&mut self) -> Incoming {
        loop {
            match self.0.next().await {
                Ok(StreamEvent::Data(Channel::File, data)) => return Incoming::Data(data),
                Ok(StreamEvent::Eof(Channel::File)) => return Incoming::Eof,
                Ok(StreamEvent::Reset) | Err(_) => return Incoming::Cancel,
                Ok(other) => unexpected(&other, "write_file"),
            }
        }
    }
}

fn unexpected(event: &StreamEvent, op: &str) {
    if LOG_LIMIT.allow() {
        let what = match event {
            StreamEvent::Data(channel, _) => format!("data on channel {channel:?}"),
            StreamEvent::Eof(channel) => format!("eof on channel {channel:?}"),
            StreamEvent::Message(_) => "message".to_owned(),
            StreamEvent::Closed(_) => "close".to_owned(),
            StreamEvent::Reset => "reset".to_owned(),
        };
        tracing::debug!(op, what, "ignoring an unexpected stream event");
    }
}

fn internal(error: &dyn Error) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, error_chain(error))
}

fn io_code(error: &io::Error) -> ErrorCode {
    match error.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        _ => match error.raw_os_error() {
            Some(libc::EISDIR | libc::ENOTDIR) => ErrorCode::WrongKind,
            Some(libc::EROFS | libc::EPERM) => ErrorCode::PermissionDenied,
            Some(libc::ENAMETOOLONG | libc::ELOOP) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        },
    }
}

fn file_error(error: &FileError) -> ErrorBody {
    let code = match error {
        FileError::BadPath { .. }
        | FileError::BadMode { .. }
        | FileError::NotEmpty { .. }
        | FileError::RemoveRoot => ErrorCode::InvalidArgument,
        FileError::IsDir { .. } | FileError::NotRegular { .. } => ErrorCode::WrongKind,
        FileError::Io { source, .. } => io_code(source),
        FileError::Cancelled { .. } => ErrorCode::Cancelled,
    };
    ErrorBody::new(code, error_chain(error))
}

fn exec_error(error: &ExecError) -> ErrorBody {
    let code = match error {
        ExecError::EmptyArgv | ExecError::Invalid { .. } => ErrorCode::InvalidArgument,
        ExecError::User(
            UserError::UnknownUser { .. }
            | UserError::UnknownGroup { .. }
            | UserError::BadSpec { .. },
        ) => ErrorCode::InvalidArgument,
        ExecError::Cwd { source, .. }
        | ExecError::Spawn { source, .. }
        | ExecError::Setup { source, .. } => io_code(source),
        ExecError::CwdNotDir { .. } => ErrorCode::WrongKind,
        ExecError::Lost { .. } => ErrorCode::Internal,
        ExecError::AlreadyKept { .. } => ErrorCode::AlreadyExists,
        ExecError::NotKept { .. } => ErrorCode::NotFound,
    };
    ErrorBody::new(code, error_chain(error))
}

fn tunnel_error(error: &TunnelError) -> ErrorBody {
    let code = match error {
        TunnelError::BadPort => ErrorCode::InvalidArgument,
        TunnelError::Refused { .. } | TunnelError::Timeout { .. } => ErrorCode::Unavailable,
        TunnelError::Connect { source, .. } | TunnelError::Broken { source, .. } => {
            match source.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::TimedOut
                | io::ErrorKind::AddrNotAvailable => ErrorCode::Unavailable,
                _ => io_code(source),
            }
        }
    };
    ErrorBody::new(code, error_chain(error))
}

fn system_error(error: &SystemError) -> ErrorBody {
    let code = match error {
        SystemError::BadHostname { .. } | SystemError::EntropyTooLong { .. } => {
            ErrorCode::InvalidArgument
        }
        SystemError::SetHostname(e) | SystemError::SetClock(e) | SystemError::Uname(e) => {
            io_code(&io::Error::from(*e))
        }
        SystemError::Entropy(e) | SystemError::Read { source: e, .. } => io_code(e),
        SystemError::Parse { .. } => ErrorCode::Internal,
    };
    ErrorBody::new(code, error_chain(error))
}

fn net_error(error: &NetError) -> ErrorBody {
    let code = match error {
        NetError::BadCidr { .. }
        | NetError::BadAddr { .. }
        | NetError::BadMac { .. }
        | NetError::BadInterface { .. } => ErrorCode::InvalidArgument,
        NetError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
            ErrorCode::NotFound
        }
        NetError::Ioctl { source, .. }
        | NetError::Socket(source)
        | NetError::Write { source, .. } => io_code(source),
    };
    ErrorBody::new(code, error_chain(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent as it runs outside the guest (not PID 1, no cgroups).
    fn host_agent() -> Agent {
        Agent::new(
            ExecContext::new(
                crate::supervisor::global(),
                std::sync::Arc::new(crate::cgroup::Cgroups::disabled()),
                "/".into(),
            ),
            false,
        )
    }

    #[test]
    fn io_errors_map_to_codes() {
        let code = |errno| io_code(&io::Error::from_raw_os_error(errno));
        assert_eq!(code(libc::ENOENT), ErrorCode::NotFound);
        assert_eq!(code(libc::EACCES), ErrorCode::PermissionDenied);
        assert_eq!(code(libc::EPERM), ErrorCode::PermissionDenied);
        assert_eq!(code(libc::EEXIST), ErrorCode::AlreadyExists);
        assert_eq!(code(libc::EISDIR), ErrorCode::WrongKind);
        assert_eq!(code(libc::ENOTDIR), ErrorCode::WrongKind);
        assert_eq!(code(libc::EROFS), ErrorCode::PermissionDenied);
        assert_eq!(code(libc::EIO), ErrorCode::Internal);
    }

    #[test]
    fn file_errors_name_the_path_and_the_cause() {
        let err = files::remove(Path::new("/nonexistent/arrakis-test"), false).unwrap_err();
        let body = file_error(&err);
        assert_eq!(body.code, ErrorCode::NotFound);
        assert!(
            body.message.contains("/nonexistent/arrakis-test"),
            "{}",
            body.message
        );
        assert!(body.message.contains("No such file"), "{}", body.message);
        let body = resolve("../../etc/shadow").unwrap_err();
        assert_eq!(body.code, ErrorCode::InvalidArgument);
        assert!(
            body.message.contains("../../etc/shadow"),
            "{}",
            body.message
        );
    }

    #[test]
    fn exec_and_net_errors_map_to_codes() {
        let spawn = ExecError::Spawn {
            program: "nope".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(exec_error(&spawn).code, ErrorCode::NotFound);
        assert_eq!(
            exec_error(&ExecError::EmptyArgv).code,
            ErrorCode::InvalidArgument
        );
        let kept = |error| exec_error(&error).code;
        assert_eq!(
            kept(ExecError::AlreadyKept { id: "a".into() }),
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            kept(ExecError::NotKept { id: "a".into() }),
            ErrorCode::NotFound
        );
        let setup = ExecError::Setup {
            program: "sh".into(),
            step: "set RLIMIT_NOFILE to soft 1, hard 1".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let body = exec_error(&setup);
        assert_eq!(body.code, ErrorCode::PermissionDenied);
        assert!(body.message.contains("RLIMIT_NOFILE"), "{}", body.message);
        let ioctl = NetError::Ioctl {
            op: "SIOCSIFADDR",
            interface: "eth9".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let body = net_error(&ioctl);
        assert_eq!(body.code, ErrorCode::NotFound);
        assert!(body.message.contains("eth9"));
    }

    #[test]
    fn tunnel_errors_map_to_codes() {
        let refused = tunnel_error(&TunnelError::Refused { port: 8000 });
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert!(
            refused.message.contains("connection refused on port 8000"),
            "{}",
            refused.message
        );
        assert_eq!(
            tunnel_error(&TunnelError::BadPort).code,
            ErrorCode::InvalidArgument
        );
        let broken = TunnelError::Broken {
            port: 1,
            source: io::Error::from_raw_os_error(libc::ECONNRESET),
        };
        let body = tunnel_error(&broken);
        assert_eq!(body.code, ErrorCode::Unavailable);
        assert!(body.message.contains("reset"), "{}", body.message);
        let odd = TunnelError::Connect {
            port: 1,
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(tunnel_error(&odd).code, ErrorCode::PermissionDenied);
    }

    #[tokio::test]
    async fn guest_wide_changes_need_init() {
        let agent = host_agent();
        for request in [
            Request::SetTime(arrakis_protocol::SetTimeRequest { unix_nanos: 0 }),
            Request::Configure(ConfigureRequest::default()),
        ] {
            let err = agent.simple(request).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Unsupported);
        }
        assert_eq!(agent.simple(Request::Ping).await, Ok(Response::Pong));
        match agent.simple(Request::Info).await {
            Ok(Response::Info(info)) => {
                assert_eq!(info.protocol_version, PROTOCOL_VERSION);
                assert!(!info.kernel_release.is_empty());
                assert!(info.uptime_ms > 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn file_requests_without_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let agent = host_agent();
        let sub = dir.path().join("a/b").display().to_string();
        let mkdir = arrakis_protocol::MkdirRequest {
            path: sub.clone(),
            parents: true,
            mode: None,
        };
        assert_eq!(
            agent.simple(Request::Mkdir(mkdir)).await,
            Ok(Response::Done)
        );
        let list = arrakis_protocol::PathRequest {
            path: dir.path().join("a").display().to_string(),
        };
        match agent.simple(Request::List(list)).await {
            Ok(Response::Entries { entries }) => assert_eq!(entries[0].name, "b"),
            other => panic!("unexpected {other:?}"),
        }
        let stat = arrakis_protocol::PathRequest { path: sub.clone() };
        match agent.simple(Request::Stat(stat)).await {
            Ok(Response::Stat(stat)) => assert_eq!(stat.name, sub),
            other => panic!("unexpected {other:?}"),
        }
        let remove = arrakis_protocol::RemoveRequest {
            path: dir.path().join("a").display().to_string(),
            recursive: false,
        };
        let err = agent.simple(Request::Remove(remove)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("not empty"), "{}", err.message);
    }
}
