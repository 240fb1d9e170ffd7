//! The stream multiplexer: one session over a byte stream, many concurrent
//! streams, credit flow control on bulk data. The host side is [`Client`];
//! the guest side is [`serve`] with a [`Handler`]. Both ends hand out the same
//! [`Stream`] type.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::frame::{
    Channel, Frame, FrameReader, Hello, HelloAck, Kind, CHUNK, HEADER_LEN, MAX_PAYLOAD,
    PROTOCOL_VERSION, SYNC, WINDOW,
};
use crate::messages::{ErrorBody, ErrorCode, Outcome, Request, Response, StreamMessage};

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o error on the agent channel")]
    Io(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the agent session ended")]
    Disconnected,
    #[error("frame of {len} bytes is over the limit")]
    FrameTooLarge { len: usize },
    #[error("malformed protocol input: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: the host speaks {ours}, the agent speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("the agent refused: {}", .0.message)]
    Remote(ErrorBody),
    #[error("the stream is already closed")]
    StreamClosed,
    #[error("unexpected event on the stream: {0}")]
    UnexpectedEvent(String),
}

/// Something that arrived on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Data(Channel, Bytes),
    Eof(Channel),
    Message(StreamMessage),
    /// The stream's final reply (host side only).
    Closed(Outcome),
    /// The host abandoned the stream (guest side only): stop the work.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Host,
    Guest,
}

/// The reader's end of one stream.
struct Slot {
    events: mpsc::UnboundedSender<StreamEvent>,
    window: Arc<Semaphore>,
    done: Arc<AtomicBool>,
    ended: Arc<watch::Sender<bool>>,
}

/// State of one session shared by its reader, writer and streams.
struct Shared {
    role: Role,
    out: mpsc::UnboundedSender<Frame>,
    slots: Mutex<HashMap<u32, Slot>>,
    closed: Arc<watch::Sender<bool>>,
}

impl Shared {
    fn new(role: Role) -> (Arc<Shared>, mpsc::UnboundedReceiver<Frame>) {
        let (out, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            role,
            out,
            slots: Mutex::new(HashMap::new()),
            closed: Arc::new(watch::Sender::new(false)),
        };
        (Arc::new(shared), rx)
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<u32, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn send(&self, frame: Frame) -> Result<(), ProtocolError> {
        tracing::trace!(role = ?self.role, stream = frame.stream, kind = ?frame.kind, len = frame.payload.len(), "frame out");
        if self.is_closed() {
            return Err(ProtocolError::Disconnected);
        }
        self.out
            .send(frame)
            .map_err(|_| ProtocolError::Disconnected)
    }

    /// Registers stream `id` and returns its two halves.
    fn register(
        self: &Arc<Self>,
        id: u32,
        keep: Option<Arc<Connection>>,
    ) -> (StreamSender, StreamReceiver) {
        let (events, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(WINDOW as usize));
        let done = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(watch::Sender::new(false));
        self.slots().insert(
            id,
            Slot {
                events,
                window: window.clone(),
                done: done.clone(),
                ended: ended.clone(),
            },
        );
        let core = Arc::new(Core {
            id,
            shared: self.clone(),
            window,
            done,
            ended,
            _keep: keep,
        });
        (
            StreamSender { core: core.clone() },
            StreamReceiver { core, events: rx },
        )
    }

    /// Ends the session: every stream sees `Disconnected`.
    fn shutdown(&self) {
        self.closed.send_replace(true);
        let slots = std::mem::take(&mut *self.slots());
        for slot in slots.values() {
            slot.window.close();
            slot.ended.send_replace(true);
        }
    }

    /// Routes one frame of an established session to its stream.
    fn dispatch(&self, frame: Frame) -> Result<(), ProtocolError> {
        let id = frame.stream;
        let event = match (frame.kind, self.role) {
            (Kind::Credit, _) => {
                let granted = frame.credit_value()? as usize;
                if let Some(slot) = self.slots().get(&id) {
                    // Never let a peer push the window past its size.
                    let room = (WINDOW as usize).saturating_sub(slot.window.available_permits());
                    slot.window.add_permits(granted.min(room));
                }
                return Ok(());
            }
            (Kind::Data, _) => {
                let (channel, bytes) = frame.channel_payload()?;
                StreamEvent::Data(channel, bytes)
            }
            (Kind::Eof, _) => StreamEvent::Eof(frame.channel_payload()?.0),
            (Kind::Message, _) => StreamEvent::Message(frame.parse_json()?),
            (Kind::Close, Role::Host) => StreamEvent::Closed(frame.parse_json()?),
            (Kind::Reset, Role::Guest) => StreamEvent::Reset,
            (kind, role) => {
                return Err(ProtocolError::Malformed(format!(
                    "{kind:?} frame on stream {id} is not valid for the {role:?} side"
                )))
            }
        };
        let last = matches!(event, StreamEvent::Closed(_) | StreamEvent::Reset);
        let mut slots = self.slots();
        if let Some(slot) = slots.get(&id) {
            if last {
                slot.done.store(true, Ordering::SeqCst);
                slot.window.close();
                slot.ended.send_replace(true);
            }
            // The receiver may be gone already; late frames are dropped.
            let _ = slot.events.send(event);
        }
        if last {
            slots.remove(&id);
        }
        Ok(())
    }
}

/// Owned by both halves of a stream; its drop ends the stream if nobody did.
struct Core {
    id: u32,
    shared: Arc<Shared>,
    window: Arc<Semaphore>,
    done: Arc<AtomicBool>,
    /// Turns true when the stream can no longer carry data (see [`StreamSender::ended`]).
    ended: Arc<watch::Sender<bool>>,
    _keep: Option<Arc<Connection>>,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.shared.slots().remove(&self.id);
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let frame = match self.shared.role {
            Role::Host => Frame::new(self.id, Kind::Reset, Bytes::new()),
            Role::Guest => Frame::json(
                self.id,
                Kind::Close,
                &Outcome::Err(ErrorBody::new(
                    ErrorCode::Internal,
                    "the agent ended the request without a reply",
                )),
            ),
        };
        let _ = self.shared.send(frame);
    }
}

/// The sending half of a stream. Cheap to clone.
#[derive(Clone)]
pub struct StreamSender {
    core: Arc<Core>,
}

impl StreamSender {
    pub fn id(&self) -> u32 {
        self.core.id
    }

    fn check_open(&self) -> Result<(), ProtocolError> {
        if self.core.done.load(Ordering::SeqCst) {
            Err(ProtocolError::StreamClosed)
        } else if self.core.shared.is_closed() {
            Err(ProtocolError::Disconnected)
        } else {
            Ok(())
        }
    }

    /// Sends bytes on `channel`, waiting for flow-control credit as needed.
    pub async fn send_data(&self, channel: Channel, data: Bytes) -> Result<(), ProtocolError> {
        for chunk in data.chunks(CHUNK) {
            self.check_open()?;
            let permits = self
                .core
                .window
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| {
                    self.check_open()
                        .err()
                        .unwrap_or(ProtocolError::Disconnected)
                })?;
            permits.forget();
            self.core
                .shared
                .send(Frame::data(self.core.id, channel, chunk))?;
        }
        Ok(())
    }

    pub async fn send_eof(&self, channel: Channel) -> Result<(), ProtocolError> {
        self.check_open()?;
        self.core
            .shared
            .send(Frame::channel_only(self.core.id, Kind::Eof, channel))
    }

    pub async fn send_message(&self, message: &StreamMessage) -> Result<(), ProtocolError> {
        self.check_open()?;
        self.core
            .shared
            .send(Frame::json(self.core.id, Kind::Message, message))
    }

    /// Sends the stream's final reply (guest side).
    pub async fn close(&self, outcome: Outcome) -> Result<(), ProtocolError> {
        if self.core.shared.role != Role::Guest {
            return Err(ProtocolError::UnexpectedEvent(
                "only the agent closes a stream".into(),
            ));
        }
        if self.core.done.swap(true, Ordering::SeqCst) {
            return Err(ProtocolError::StreamClosed);
        }
        self.core.window.close();
        self.core.ended.send_replace(true);
        self.core.shared.slots().remove(&self.core.id);
        self.core
            .shared
            .send(Frame::json(self.core.id, Kind::Close, &outcome))
    }

    /// Abandons the stream (host side), as dropping every handle of it
    /// would: the guest sees `RESET`, and later sends on any clone fail
    /// with [`ProtocolError::StreamClosed`]. Does nothing once the stream
    /// ended, and on the guest side (which ends a stream with a reply).
    pub fn reset(&self) {
        if self.core.shared.role != Role::Host || self.core.done.swap(true, Ordering::SeqCst) {
            return;
        }
        self.core.window.close();
        self.core.ended.send_replace(true);
        self.core.shared.slots().remove(&self.core.id);
        let _ = self
            .core
            .shared
            .send(Frame::new(self.core.id, Kind::Reset, Bytes::new()));
    }

    /// Resolves once the stream can no longer carry data: the peer closed
    /// or reset it, this side closed it, or the session ended. Lets a side
    /// that is busy elsewhere (say, blocked writing into a socket) notice a
    /// reset without taking events off the receiver.
    pub async fn ended(&self) {
        let mut ended = self.core.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }
}

/// The receiving half of a stream.
pub struct StreamReceiver {
    core: Arc<Core>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
}

impl StreamReceiver {
    /// The next event; `Disconnected` when the session ended, `StreamClosed`
    /// after the final event.
    pub async fn next(&mut self) -> Result<StreamEvent, ProtocolError> {
        match self.events.recv().await {
            Some(event) => {
                if let StreamEvent::Data(_, bytes) = &event {
                    if !bytes.is_empty() && !self.core.done.load(Ordering::SeqCst) {
                        let _ = self
                            .core
                            .shared
                            .send(Frame::credit(self.core.id, bytes.len() as u32));
                    }
                }
                Ok(event)
            }
            None if self.core.done.load(Ordering::SeqCst) => Err(ProtocolError::StreamClosed),
            None => Err(ProtocolError::Disconnected),
        }
    }
}

/// Both halves of a stream.
pub struct Stream {
    sender: StreamSender,
    receiver: StreamReceiver,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.sender.id()
    }

    pub async fn send_data(&self, channel: Channel, data: Bytes) -> Result<(), ProtocolError> {
        self.sender.send_data(channel, data).await
    }

    pub async fn send_eof(&self, channel: Channel) -> Result<(), ProtocolError> {
        self.sender.send_eof(channel).await
    }

    pub async fn send_message(&self, message: &StreamMessage) -> Result<(), ProtocolError> {
        self.sender.send_message(message).await
    }

    pub async fn next(&mut self) -> Result<StreamEvent, ProtocolError> {
        self.receiver.next().await
    }

    pub async fn close(self, outcome: Outcome) -> Result<(), ProtocolError> {
        self.sender.close(outcome).await
    }

    pub fn split(self) -> (StreamSender, StreamReceiver) {
        (self.sender, self.receiver)
    }
}

/// Writes queued frames, batching what is ready. Returns the writer so a
/// following session can reuse it.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    closed: Arc<watch::Sender<bool>>,
) -> W {
    const BATCH: usize = 256 * 1024;
    let mut closed_rx = closed.subscribe();
    let mut buf = BytesMut::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = closed_rx.wait_for(|closed| *closed) => break,
        };
        first.encode(&mut buf);
        while buf.len() < BATCH {
            match frames.try_recv() {
                Ok(frame) => frame.encode(&mut buf),
                Err(_) => break,
            }
        }
        if let Err(error) = write_all_flush(&mut writer, &buf).await {
            tracing::debug!(%error, "agent channel write failed; ending the session");
            closed.send_replace(true);
            break;
        }
        buf.clear();
    }
    writer
}

async fn write_all_flush<W: AsyncWrite + Unpin>(writer: &mut W, buf: &[u8]) -> std::io::Result<()> {
    writer.write_all(buf).await?;
    writer.flush().await
}

fn greeting<T: serde::Serialize>(kind: Kind, body: &T) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_slice(&SYNC);
    Frame::json(0, kind, body).encode(&mut buf);
    buf
}

/// Options of [`Client::connect`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long to wait for the agent to answer the session greeting.
    pub handshake_timeout: Duration,
    /// When the agent has not answered after this long, send filler bytes and
    /// greet again (doubling the delay each time). This completes a frame that
    /// an earlier host left half written, which would otherwise swallow the
    /// greeting; an agent that is merely still booting skips the filler.
    pub regreet_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            handshake_timeout: Duration::from_secs(10),
            regreet_after: Duration::from_secs(3),
        }
    }
}

/// Keeps a host session's tasks alive for as long as the client or any of its streams is.
struct Connection {
    shared: Arc<Shared>,
    next_id: AtomicU32,
    agent_version: String,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.shutdown();
        self.reader.abort();
    }
}

/// The host end of a session with a guest agent. Cheap to clone; every clone
/// shares the session.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Connection>,
}

impl Client {
    /// Greets the agent on `io` and starts the session.
    pub async fn connect<T>(io: T, options: ClientOptions) -> Result<Client, ProtocolError>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read_half, mut write_half) = tokio::io::split(io);
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            nonce,
        };
        let mut reader = FrameReader::new(read_half);
        tracing::debug!(nonce, "greeting the agent");
        let ack = tokio::time::timeout(
            options.handshake_timeout,
            handshake(&mut reader, &mut write_half, &hello, options.regreet_after),
        )
        .await
        .map_err(|_| ProtocolError::Timeout("waiting for the agent to answer the greeting"))??;
        if ack.version != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: ack.version,
            });
        }
        let (shared, frames) = Shared::new(Role::Host);
        tokio::spawn(write_loop(write_half, frames, shared.closed.clone()));
        let reader = tokio::spawn(host_read_loop(reader, shared.clone()));
        Ok(Client {
            conn: Arc::new(Connection {
                shared,
                next_id: AtomicU32::new(1),
                agent_version: ack.agent_version,
                reader,
            }),
        })
    }

    pub fn agent_version(&self) -> &str {
        &self.conn.agent_version
    }

    pub fn is_closed(&self) -> bool {
        self.conn.shared.is_closed()
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        let mut rx = self.conn.shared.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Opens a stream with `request` as its first message.
    pub async fn open(&self, request: &Request) -> Result<Stream, ProtocolError> {
        let shared = &self.conn.shared;
        let id = self.conn.next_id.fetch_add(2, Ordering::Relaxed);
        let (sender, receiver) = shared.register(id, Some(self.conn.clone()));
        shared.send(Frame::json(id, Kind::Open, request))?;
        Ok(Stream { sender, receiver })
    }

    /// A request with a single reply.
    pub async fn call(&self, request: &Request) -> Result<Response, ProtocolError> {
        let mut stream = self.open(request).await?;
        loop {
            match stream.next().await? {
                StreamEvent::Closed(Ok(response)) => return Ok(response),
                StreamEvent::Closed(Err(body)) => return Err(ProtocolError::Remote(body)),
                StreamEvent::Data(..) | StreamEvent::Eof(_) | StreamEvent::Message(_) => {}
                StreamEvent::Reset => {
                    return Err(ProtocolError::UnexpectedEvent(
                        "reset from the agent".into(),
                    ))
                }
            }
        }
    }

    /// [`Client::call`] bounded in time.
    pub async fn call_timeout(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ProtocolError> {
        tokio::time::timeout(timeout, self.call(request))
            .await
            .map_err(|_| ProtocolError::Timeout("waiting for the agent's reply"))?
    }
}

/// Greets the agent until it answers; see [`ClientOptions::regreet_after`].
async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    hello: &Hello,
    regreet_after: Duration,
) -> Result<HelloAck, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greet = greeting(Kind::Hello, hello);
    write_all_flush(writer, &greet).await?;
    let ack = await_ack(reader, hello.nonce);
    tokio::pin!(ack);
    let mut delay = regreet_after;
    loop {
        tokio::select! {
            ack = &mut ack => return ack,
            _ = tokio::time::sleep(delay) => {
                tracing::debug!(?delay, "no answer to the greeting; sending filler and greeting again");
                let mut filler = BytesMut::zeroed(MAX_PAYLOAD + HEADER_LEN);
                filler.extend_from_slice(&greet);
                write_all_flush(writer, &filler).await?;
                delay *= 2;
            }
        }
    }
}

/// Skips input until the agent's greeting with our nonce.
async fn await_ack<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    nonce: u64,
) -> Result<HelloAck, ProtocolError> {
    loop {
        if !reader.sync().await? {
            return Err(ProtocolError::Disconnected);
        }
        loop {
            match reader.read_frame().await {
                Ok(Some(frame)) if frame.kind == Kind::HelloAck => {
                    if let Ok(ack) = frame.parse_json::<HelloAck>() {
                        if ack.nonce == nonce {
                            return Ok(ack);
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(ProtocolError::Disconnected),
                Err(ProtocolError::Malformed(_) | ProtocolError::FrameTooLarge { .. }) => break,
                Err(error) => return Err(error),
            }
        }
    }
}

async fn host_read_loop<R: AsyncRead + Unpin>(mut reader: FrameReader<R>, shared: Arc<Shared>) {
    loop {
        let result = match reader.read_frame().await {
            Ok(Some(frame)) => {
                tracing::trace!(stream = frame.stream, kind = ?frame.kind, len = frame.payload.len(), "frame in");
                shared.dispatch(frame)
            }
            Ok(None) => Err(ProtocolError::Disconnected),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::debug!(%error, "agent session ended");
            break;
        }
    }
    shared.shutdown();
}

/// The guest's request handler: called once per stream, on its own task.
/// It must end the stream with [`Stream::close`].
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, stream: Stream) -> impl Future<Output = ()> + Send;
}

enum SessionEnd {
    Eof,
    Resync,
}

/// Serves sessions on `io` until the host goes away (EOF), then returns
/// `Ok(())`. A new greeting in the middle of a session (a host that
/// reconnected without the guest seeing EOF) starts a fresh session.
pub async fn serve<T, H>(io: T, handler: Arc<H>, agent_version: &str) -> Result<(), ProtocolError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    let (read_half, mut write_half) = tokio::io::split(io);
    let mut reader = FrameReader::new(read_half);
    loop {
        let Some(hello) = accept_hello(&mut reader).await? else {
            return Ok(());
        };
        let ack = HelloAck {
            version: PROTOCOL_VERSION,
            nonce: hello.nonce,
            agent_version: agent_version.to_string(),
        };
        write_all_flush(&mut write_half, &greeting(Kind::HelloAck, &ack)).await?;
        let (shared, frames) = Shared::new(Role::Guest);
        let writer = tokio::spawn(write_loop(write_half, frames, shared.closed.clone()));
        let end = guest_session(&mut reader, &shared, &handler).await;
        shared.shutdown();
        write_half = writer
            .await
            .map_err(|e| ProtocolError::Io(std::io::Error::other(e)))?;
        match end? {
            SessionEnd::Eof => return Ok(()),
            SessionEnd::Resync => continue,
        }
    }
}

async fn accept_hello<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<Option<Hello>, ProtocolError> {
    loop {
        if !reader.sync().await? {
            return Ok(None);
        }
        match reader.read_frame().await {
            Ok(Some(frame)) if frame.kind == Kind::Hello => {
                if let Ok(hello) = frame.parse_json::<Hello>() {
                    return Ok(Some(hello));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ProtocolError::Disconnected) => return Ok(None),
            Err(ProtocolError::Malformed(_) | ProtocolError::FrameTooLarge { .. }) => {}
            Err(error) => return Err(error),
        }
    }
}

async fn guest_session<R: AsyncRead + Unpin, H: Handler>(
    reader: &mut FrameReader<R>,
    shared: &Arc<Shared>,
    handler: &Arc<H>,
) -> Result<SessionEnd, ProtocolError> {
    loop {
        let frame = match reader.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(ProtocolError::Disconnected) => return Ok(SessionEnd::Eof),
            Err(error @ (ProtocolError::Malformed(_) | ProtocolError::FrameTooLarge { .. })) => {
                tracing::warn!(%error, "resynchronising the agent session");
                return Ok(SessionEnd::Resync);
            }
            Err(error) => return Err(error),
        };
        if frame.kind == Kind::Open {
            open_stream(shared, handler, frame);
        } else if let Err(error) = shared.dispatch(frame) {
            tracing::warn!(%error, "resynchronising the agent session");
            return Ok(SessionEnd::Resync);
        }
    }
}

fn open_stream<H: Handler>(shared: &Arc<Shared>, handler: &Arc<H>, frame: Frame) {
    let id = frame.stream;
    if shared.slots().contains_key(&id) {
        tracing::warn!(stream = id, "ignoring a second OPEN for a live stream");
        return;
    }
    let request = frame.parse_json::<Request>();
    let (sender, receiver) = shared.register(id, None);
    let stream = Stream { sender, receiver };
    let handler = handler.clone();
    tokio::spawn(async move {
        match request {
            Ok(request) => handler.handle(request, stream).await,
            Err(error) => {
                let body = ErrorBody::new(ErrorCode::InvalidArgument, error.to_string());
                let _ = stream.close(Err(body)).await;
            }
        }
    });
}
