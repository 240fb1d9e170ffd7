//! Kept execs: processes that outlive their stream. Each one is owned by a
//! task of its own ([`Owner`]) that holds its pipes, stdin and exit, and
//! serves one attached stream at a time. A reset stream or the end of the
//! session only detaches it: its output then waits unread in its pipes (the
//! process blocks once one is full; nothing is lost), stdin stays open and
//! an exit is kept. `Attach` hands the owner a new stream, which takes over
//! from the one attached before; the entry is forgotten once an `Exited`
//! reply reached a stream.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use arrakis_protocol::{Channel, ExitStatus};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::stdio::{self, Source, StdinQueue, Stdio};
use super::{
    exit_status, ExecError, ExecInput, ExecOutput, Gone, HostEvent, Running, CHUNK, DRAIN_LIMIT,
    EXIT_GRACE,
};
use crate::supervisor::ProcessExit;

/// How an attached stream ended.
#[derive(Debug)]
pub enum AttachEnd {
    /// The process exited and its output was sent: reply with the status,
    /// then tell the owner whether the reply went out (if not, the process
    /// stays kept for a later attach).
    Exited { status: ExitStatus, ack: ReplyAck },
    /// Another stream attached: close this one.
    Replaced,
    /// The host reset the stream or left: nobody reads a reply.
    Detached,
}

/// Confirms an `Exited` reply to the owner of a kept exec.
#[derive(Debug)]
pub struct ReplyAck(oneshot::Sender<bool>);

impl ReplyAck {
    /// `sent`: the reply went out, so the kept entry can be forgotten.
    pub fn reply_sent(self, sent: bool) {
        let _ = self.0.send(sent);
    }
}

/// The kept execs by id: where to send a new attachment.
#[derive(Clone, Default)]
pub(super) struct Registry(Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Attachment>>>>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.lock().keys()).finish()
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Attachment>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` for a new kept exec; returns where its attachments arrive.
    pub fn reserve(&self, id: &str) -> Result<mpsc::UnboundedReceiver<Attachment>, ExecError> {
        let mut entries = self.lock();
        if entries.contains_key(id) {
            return Err(ExecError::AlreadyKept { id: id.into() });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        entries.insert(id.to_owned(), tx);
        Ok(rx)
    }

    /// Gives up a reservation whose exec did not start.
    pub fn release(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn attach(&self, id: &str, attachment: Attachment) -> Result<(), ExecError> {
        let entries = self.lock();
        let sent = entries.get(id).map(|tx| tx.send(attachment));
        match sent {
            Some(Ok(())) => Ok(()),
            None | Some(Err(_)) => Err(ExecError::NotKept { id: id.into() }),
        }
    }

    /// Removes `id`; attachments that raced with the removal are dropped
    /// (their streams get `NotKept`).
    fn forget(&self, id: &str, attachments: &mut mpsc::UnboundedReceiver<Attachment>) {
        self.lock().remove(id);
        attachments.close();
        while attachments.try_recv().is_ok() {}
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`ExecOutput`] without its type, so one owner serves any stream.
trait ErasedOutput: Send + Sync {
    fn boxed_started(&self, pid: u32) -> BoxFuture<'_, Result<(), Gone>>;
    fn boxed_data(&self, channel: Channel, data: Bytes) -> BoxFuture<'_, Result<(), Gone>>;
    fn boxed_eof(&self, channel: Channel) -> BoxFuture<'_, Result<(), Gone>>;
}

impl<O: ExecOutput> ErasedOutput for O {
    fn boxed_started(&self, pid: u32) -> BoxFuture<'_, Result<(), Gone>> {
        Box::pin(self.started(pid))
    }

    fn boxed_data(&self, channel: Channel, data: Bytes) -> BoxFuture<'_, Result<(), Gone>> {
        Box::pin(self.data(channel, data))
    }

    fn boxed_eof(&self, channel: Channel) -> BoxFuture<'_, Result<(), Gone>> {
        Box::pin(self.eof(channel))
    }
}

#[derive(Clone)]
struct DynOutput(Arc<dyn ErasedOutput>);

impl DynOutput {
    fn started(&self, pid: u32) -> BoxFuture<'_, Result<(), Gone>> {
        self.0.boxed_started(pid)
    }

    fn data(&self, channel: Channel, data: Bytes) -> BoxFuture<'_, Result<(), Gone>> {
        self.0.boxed_data(channel, data)
    }

    fn eof(&self, channel: Channel) -> BoxFuture<'_, Result<(), Gone>> {
        self.0.boxed_eof(channel)
    }
}

/// [`ExecInput`] without its type.
trait ErasedInput: Send {
    fn boxed_next(&mut self) -> BoxFuture<'_, HostEvent>;
}

impl<I: ExecInput> ErasedInput for I {
    fn boxed_next(&mut self) -> BoxFuture<'_, HostEvent> {
        Box::pin(self.next())
    }
}

struct DynInput(Box<dyn ErasedInput>);

impl DynInput {
    fn next(&mut self) -> BoxFuture<'_, HostEvent> {
        self.0.boxed_next()
    }
}

/// A stream handed to the owner of a kept exec.
pub(super) struct Attachment {
    out: DynOutput,
    input: DynInput,
    end: oneshot::Sender<AttachEnd>,
}

impl Attachment {
    /// The attachment, and where its end is reported.
    pub fn new<O: ExecOutput, I: ExecInput>(
        out: O,
        input: I,
    ) -> (Attachment, oneshot::Receiver<AttachEnd>) {
        let (end, ended) = oneshot::channel();
        let attachment = Attachment {
            out: DynOutput(Arc::new(out)),
            input: DynInput(Box::new(input)),
            end,
        };
        (attachment, ended)
    }
}

/// What [`Owner::new`] takes over.
pub(super) struct Parts {
    pub id: String,
    pub registry: Registry,
    pub running: Running,
    pub exit: oneshot::Receiver<ProcessExit>,
    pub stdio: Stdio,
    pub attachments: mpsc::UnboundedReceiver<Attachment>,
}

/// One output channel of a kept exec, while no pump holds it.
struct Output {
    channel: Channel,
    /// None once it reached its end.
    source: Option<Source>,
    /// A chunk read but not delivered (its stream went away): sent first.
    pending: Option<Bytes>,
}

impl Output {
    fn restore(&mut self, pumped: Pumped) {
        self.source = pumped.source;
        self.pending = pumped.pending;
    }
}

/// What happened to an attached stream, for the owner's loop.
enum Turn {
    Replaced(Attachment),
    Detached,
    Finished,
}

/// The task that owns a kept exec.
pub(super) struct Owner {
    id: String,
    registry: Registry,
    running: Running,
    /// None once the main process exited.
    exit: Option<oneshot::Receiver<ProcessExit>>,
    status: Option<ExitStatus>,
    deadline: Option<Instant>,
    timed_out: bool,
    outputs: [Output; 2],
    stdin: StdinQueue,
    attachments: mpsc::UnboundedReceiver<Attachment>,
}

impl Owner {
    pub fn new(parts: Parts) -> Owner {
        let mut running = parts.running;
        running.pty = parts.stdio.pty;
        let deadline = running.timeout.map(|t| Instant::now() + t);
        Owner {
            id: parts.id,
            registry: parts.registry,
            running,
            exit: Some(parts.exit),
            status: None,
            deadline,
            timed_out: false,
            outputs: [
                (Channel::Stdout, parts.stdio.stdout),
                (Channel::Stderr, parts.stdio.stderr),
            ]
            .map(|(channel, source)| Output {
                channel,
                source,
                pending: None,
            }),
            stdin: parts.stdio.stdin,
            attachments: parts.attachments,
        }
    }

    /// Serves `first`, then every later attachment, until an `Exited` reply
    /// went out.
    pub async fn run(mut self, first: Attachment) {
        tracing::debug!(id = self.id, pid = self.running.pid, "kept exec started");
        let mut next = Some(first);
        loop {
            let attachment = match next.take() {
                Some(attachment) => attachment,
                None => match self.detached().await {
                    Some(attachment) => attachment,
                    None => break,
                },
            };
            match self.attached(attachment).await {
                Turn::Replaced(attachment) => next = Some(attachment),
                Turn::Detached => {
                    tracing::debug!(id = self.id, "kept exec detached");
                }
                Turn::Finished => break,
            }
        }
        self.registry.forget(&self.id, &mut self.attachments);
        // Background processes may still hold the pipes.
        for output in &mut self.outputs {
            if let Some(source) = output.source.take() {
                tokio::spawn(stdio::discard(source));
            }
        }
        tracing::debug!(id = self.id, "kept exec forgotten");
    }

    fn timeout_armed(&self) -> bool {
        self.deadline.is_some() && !self.timed_out && self.status.is_none()
    }

    fn time_out(&mut self) {
        self.timed_out = true;
        self.running.kill_tree();
    }

    fn on_exit(&mut self, exit: Option<ProcessExit>) {
        self.status = Some(match exit {
            Some(exit) => exit_status(exit, self.timed_out),
            None => {
                tracing::warn!(id = self.id, "the exit status of a kept exec was lost");
                ExitStatus {
                    timed_out: self.timed_out,
                    ..ExitStatus::default()
                }
            }
        });
    }

    /// No stream: output stays in the pipes; waits for the next attachment
    /// while keeping the exit, the timeout and queued stdin going.
    async fn detached(&mut self) -> Option<Attachment> {
        loop {
            tokio::select! {
                attachment = self.attachments.recv() => return attachment,
                exit = next_exit(&mut self.exit) => self.on_exit(exit),
                () = until(self.deadline), if self.timeout_armed() => self.time_out(),
                sent = self.stdin.flush_one(), if self.stdin.can_flush() => {
                    if !sent {
                        self.stdin.close();
                    }
                }
            }
        }
    }

    /// Serves one stream until it goes away, another one attaches, or the
    /// process exited and its output was drained.
    async fn attached(&mut self, attachment: Attachment) -> Turn {
        let Attachment {
            out,
            mut input,
            end,
        } = attachment;
        let pid = self.running.pid.unsigned_abs();
        if out.started(pid).await.is_err() {
            let _ = end.send(AttachEnd::Detached);
            return Turn::Detached;
        }
        self.stdin.reopen();
        let mut pumps = Pumps::start(&mut self.outputs, &out);
        let mut grace = self.status.map(|_| Instant::now() + EXIT_GRACE);
        let mut listening = true;
        while self.status.is_none() || !pumps.idle() {
            tokio::select! {
                exit = next_exit(&mut self.exit) => {
                    self.on_exit(exit);
                    grace = Some(Instant::now() + EXIT_GRACE);
                }
                () = until(self.deadline), if self.timeout_armed() => self.time_out(),
                () = until(grace), if grace.is_some() => {
                    // The main process is gone: send what is buffered, but do
                    // not wait for background processes holding the pipes.
                    grace = None;
                    pumps.drain();
                }
                event = input.next(), if self.stdin.has_room() => {
                    if event == HostEvent::Cancel {
                        pumps.stop(&mut self.outputs).await;
                        let _ = end.send(AttachEnd::Detached);
                        return Turn::Detached;
                    }
                    // After the exit the pid may name another process.
                    if self.status.is_none() {
                        self.running.on_event(event, &mut self.stdin);
                    }
                }
                sent = self.stdin.flush_one(), if self.stdin.can_flush() => {
                    if !sent {
                        self.stdin.close();
                    }
                }
                next = self.attachments.recv(), if listening => match next {
                    Some(next) => {
                        pumps.stop(&mut self.outputs).await;
                        let _ = end.send(AttachEnd::Replaced);
                        return Turn::Replaced(next);
                    }
                    None => listening = false,
                },
                (index, pumped) = pumps.next() => {
                    let gone = pumped.gone;
                    self.outputs[index].restore(pumped);
                    if gone {
                        pumps.stop(&mut self.outputs).await;
                        let _ = end.send(AttachEnd::Detached);
                        return Turn::Detached;
                    }
                }
            }
        }
        for channel in [Channel::Stdout, Channel::Stderr] {
            if out.eof(channel).await.is_err() {
                let _ = end.send(AttachEnd::Detached);
                return Turn::Detached;
            }
        }
        let (ack, acked) = oneshot::channel();
        let status = self.status.unwrap_or_default();
        if end
            .send(AttachEnd::Exited {
                status,
                ack: ReplyAck(ack),
            })
            .is_err()
        {
            return Turn::Detached;
        }
        match acked.await {
            Ok(true) => Turn::Finished,
            Ok(false) | Err(_) => Turn::Detached,
        }
    }
}

/// The main process's exit, once; pending afterwards.
async fn next_exit(exit: &mut Option<oneshot::Receiver<ProcessExit>>) -> Option<ProcessExit> {
    let Some(receiver) = exit else {
        return std::future::pending().await;
    };
    let status = receiver.await.ok();
    *exit = None;
    status
}

/// Sleeps until `deadline`; forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How far a pump may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Send what is buffered (bounded), then hand the source back.
    Drain,
    /// Hand the source back now, with any chunk not yet sent.
    Now,
}

/// What a pump hands back.
#[derive(Default)]
struct Pumped {
    source: Option<Source>,
    pending: Option<Bytes>,
    /// The stream is gone.
    gone: bool,
}

/// The pumps of an attached stream, one per output with something to send.
struct Pumps {
    handles: [Option<JoinHandle<Pumped>>; 2],
    stop: watch::Sender<Stop>,
}

impl Pumps {
    fn start(outputs: &mut [Output; 2], out: &DynOutput) -> Pumps {
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let handles = outputs.each_mut().map(|output| {
            if output.source.is_none() && output.pending.is_none() {
                return None;
            }
            let (source, pending) = (output.source.take(), output.pending.take());
            let (channel, out, stop) = (output.channel, out.clone(), stop_rx.clone());
            Some(tokio::spawn(pump(source, pending, channel, out, stop)))
        });
        Pumps { handles, stop }
    }

    fn idle(&self) -> bool {
        self.handles.iter().all(Option::is_none)
    }

    fn drain(&self) {
        self.stop.send_if_modified(|stop| {
            let run = *stop == Stop::Run;
            if run {
                *stop = Stop::Drain;
            }
            run
        });
    }

    /// The next pump to finish, with its index; pending while none runs.
    async fn next(&mut self) -> (usize, Pumped) {
        let [stdout, stderr] = &mut self.handles;
        tokio::select! {
            pumped = join(stdout) => (0, pumped),
            pumped = join(stderr) => (1, pumped),
        }
    }

    /// Stops every pump and puts its source (and unsent chunk) back.
    async fn stop(mut self, outputs: &mut [Output; 2]) {
        self.stop.send_replace(Stop::Now);
        for (handle, output) in self.handles.iter_mut().zip(outputs) {
            if handle.is_some() {
                output.restore(join(handle).await);
            }
        }
    }
}

async fn join(slot: &mut Option<JoinHandle<Pumped>>) -> Pumped {
    let Some(handle) = slot else {
        return std::future::pending().await;
    };
    // A pump that panicked lost its source: the channel just ends.
    let pumped = handle.await.unwrap_or_default();
    *slot = None;
    pumped
}

/// Sends `pending`, then what `source` yields, until its end or `stop`.
async fn pump(
    mut source: Option<Source>,
    mut pending: Option<Bytes>,
    channel: Channel,
    out: DynOutput,
    mut stop: watch::Receiver<Stop>,
) -> Pumped {
    let mut buf = vec![0u8; CHUNK];
    let mut budget = DRAIN_LIMIT;
    loop {
        let chunk = match pending.take() {
            Some(chunk) => chunk,
            None => {
                let Some(reading) = source.as_mut() else {
                    return Pumped::default();
                };
                let mode = *stop.borrow();
                let read = match mode {
                    Stop::Now => break,
                    Stop::Drain if budget == 0 => break,
                    Stop::Drain => match reading.try_read(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        read => read,
                    },
                    Stop::Run => tokio::select! {
                        biased;
                        changed = stop.wait_for(|s| *s != Stop::Run) => {
                            if changed.is_err() {
                                break;
                            }
                            continue;
                        }
                        read = reading.read(&mut buf) => read,
                    },
                };
                match read {
                    Ok(0) => return Pumped::default(),
                    Ok(n) => {
                        if mode == Stop::Drain {
                            budget = budget.saturating_sub(n);
                        }
                        Bytes::copy_from_slice(&buf[..n])
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return Pumped::default(),
                }
            }
        };
        let sent = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s == Stop::Now) => None,
            sent = out.data(channel, chunk.clone()) => Some(sent),
        };
        match sent {
            Some(Ok(())) => {}
            Some(Err(Gone)) => {
                return Pumped {
                    source,
                    pending: Some(chunk),
                    gone: true,
                }
            }
            None => {
                return Pumped {
                    source,
                    pending: Some(chunk),
                    gone: false,
                }
            }
        }
    }
    Pumped {
        source,
        pending: None,
        gone: false,
    }
}
