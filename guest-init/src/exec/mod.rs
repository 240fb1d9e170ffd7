//! The `Exec` request, independent of the multiplexer: spawns the command
//! through the [`Supervisor`], streams its stdout/stderr as they are
//! produced (backpressured by the host's flow control), feeds stdin, delivers
//! signals, enforces the timeout, and reports the exit as soon as the main
//! process is gone, even when background children keep the pipes open.
//!
//! The stream is reached through two small traits ([`ExecOutput`],
//! [`ExecInput`]) so the whole behaviour is testable with plain channels.

mod child;
mod spec;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrakis_protocol::{Channel, ExecRequest, ExitStatus};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

pub use spec::{ExecSpec, DEFAULT_PATH};

use crate::cgroup::{Cgroups, ExecCgroup};
use crate::log::RateLimit;
use crate::supervisor::{ProcessExit, SpawnedChild, Supervisor};
use crate::users::UserError;
use child::ChildPipes;

/// Largest DATA chunk read from a pipe at once.
pub const CHUNK: usize = 64 * 1024;
/// How long output is still forwarded after the main process exited, while
/// a background process keeps a pipe open.
pub const EXIT_GRACE: Duration = Duration::from_millis(50);
/// After the grace period, what is already buffered in a pipe is still sent,
/// up to this much (the main process's last output; a chatty background
/// process cannot hold the reply back longer).
const DRAIN_LIMIT: usize = 1024 * 1024;
/// Pause between two reads of a pipe whose exec already replied.
const DISCARD_PACE: Duration = Duration::from_millis(10);
/// Stdin buffered in the agent while the child does not read; past it the
/// agent stops taking events from the host, which backpressures the host.
const STDIN_BUFFER: usize = 1024 * 1024;

static LOG_LIMIT: RateLimit = RateLimit::new(20);

/// Errors of an exec, before or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("command.argv must name a program")]
    EmptyArgv,
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("working directory {path} is not usable")]
    Cwd {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("working directory {path} is not a directory")]
    CwdNotDir { path: String },
    #[error("cannot run {program:?}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("the exit status of pid {pid} was lost")]
    Lost { pid: u32 },
}

/// The host side went away (stream reset or session closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where the exec sends what it produces.
pub trait ExecOutput: Clone + Send + Sync + 'static {
    fn started(&self, pid: u32) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Waits for flow-control credit; this is what slows a chatty command down.
    fn data(&self, channel: Channel, data: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;
    fn eof(&self, channel: Channel) -> impl Future<Output = Result<(), Gone>> + Send;
}

/// What the host can send while the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    Stdin(Bytes),
    StdinEof,
    Signal {
        signal: i32,
        group: bool,
    },
    /// The host abandoned the stream or the session ended: kill the tree.
    Cancel,
}

/// Where the exec takes host events from. After [`HostEvent::Cancel`] it is
/// not polled again.
pub trait ExecInput: Send + 'static {
    fn next(&mut self) -> impl Future<Output = HostEvent> + Send;
}

/// The result of a finished exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    /// The host cancelled (its reply will not be read).
    pub cancelled: bool,
}

/// What every exec shares.
#[derive(Debug)]
pub struct ExecContext {
    pub supervisor: &'static Supervisor,
    pub cgroups: Arc<Cgroups>,
    /// Root of the users database and the shell lookup (`/` in the guest).
    pub root: PathBuf,
}

impl ExecContext {
    /// Validates, spawns and supervises one exec until its main process exits.
    pub async fn run<O: ExecOutput, I: ExecInput>(
        &self,
        request: &ExecRequest,
        out: O,
        input: I,
    ) -> Result<ExecOutcome, ExecError> {
        let spec = ExecSpec::from_request(request, &self.root)?;
        let timeout = spec.timeout;
        let cgroup = self.cgroups.create_exec();
        let procs = cgroup.as_ref().and_then(|c| c.procs_for_join().ok());
        let supervisor = self.supervisor;
        let started = std::time::Instant::now();
        // Inline, not on a blocking thread: the vfork-style spawn holds this
        // worker only until the child's execve (about a millisecond under
        // TCG), less than the two thread hops of spawn_blocking.
        let spawned = supervisor.spawn(|| child::spawn(&spec, procs.as_ref()));
        drop(procs);
        let child = spawned.map_err(|source| ExecError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        tracing::debug!(
            pid = child.pid,
            spawn_us = started.elapsed().as_micros() as u64,
            "exec started"
        );
        let running = Running {
            pid: i32::try_from(child.pid).unwrap_or(i32::MAX),
            cgroup,
            timeout,
        };
        let outcome = running.supervise(child, out, input).await;
        tracing::debug!(
            total_us = started.elapsed().as_micros() as u64,
            "exec finished"
        );
        outcome
    }

    /// Prepares the next exec (its cgroup) in the background; called once
    /// the reply went out, while the guest waits for the host anyway.
    pub fn prepare_next(&self) {
        if self.cgroups.enabled() {
            let cgroups = Arc::clone(&self.cgroups);
            drop(tokio::task::spawn_blocking(move || cgroups.prepare_next()));
        }
    }
}

/// A spawned exec while it is supervised.
struct Running {
    pid: i32,
    cgroup: Option<ExecCgroup>,
    timeout: Option<Duration>,
}

impl Running {
    async fn supervise<O: ExecOutput, I: ExecInput>(
        self,
        child: SpawnedChild<ChildPipes>,
        out: O,
        input: I,
    ) -> Result<ExecOutcome, ExecError> {
        let stdout = Some(receiver(child.io.stdout));
        let stderr = Some(receiver(child.io.stderr));
        let stdin = child.io.stdin.map(stdin_writer);
        let mut cancelled = out.started(child.pid).await.is_err();
        if cancelled {
            self.kill_tree();
        }
        let (detach_tx, detach_rx) = watch::channel(false);
        let forwarders =
            [(Channel::Stdout, stdout), (Channel::Stderr, stderr)].map(|(channel, pipe)| {
                let out = out.clone();
                let detach = detach_rx.clone();
                tokio::spawn(async move {
                    match pipe {
                        Some(Ok(pipe)) => forward(pipe, channel, out, detach).await,
                        _ => None,
                    }
                })
            });
        let (exit, timed_out, input_cancelled) =
            self.wait_main(child.exit, input, stdin, cancelled).await;
        cancelled |= input_cancelled;
        let exit = exit.ok_or(ExecError::Lost { pid: child.pid })?;

        // The main process is gone: finish forwarding, but do not wait for
        // background processes that inherited the pipes.
        let [stdout_task, stderr_task] = forwarders;
        let mut both = std::pin::pin!(async { (stdout_task.await, stderr_task.await) });
        let (a, b) = tokio::select! {
            done = &mut both => done,
            () = tokio::time::sleep(EXIT_GRACE) => {
                let _ = detach_tx.send(true);
                both.await
            }
        };
        for leftover in [a, b].into_iter().flatten().flatten() {
            tokio::spawn(discard(leftover));
        }
        if !cancelled {
            for channel in [Channel::Stdout, Channel::Stderr] {
                cancelled |= out.eof(channel).await.is_err();
            }
        }
        let status = match exit {
            ProcessExit::Exited(code) => ExitStatus {
                code: Some(code),
                signal: None,
                timed_out,
            },
            ProcessExit::Signaled(signal) => ExitStatus {
                code: None,
                signal: Some(signal),
                timed_out,
            },
        };
        Ok(ExecOutcome { status, cancelled })
    }

    /// Handles host events and the timeout until the main process exits.
    /// Returns its exit (None if the reaper dropped it), whether the timeout
    /// fired and whether the host cancelled.
    async fn wait_main<I: ExecInput>(
        &self,
        mut exit: tokio::sync::oneshot::Receiver<ProcessExit>,
        mut input: I,
        stdin: Option<io::Result<mpsc::Sender<Bytes>>>,
        mut cancelled: bool,
    ) -> (Option<ProcessExit>, bool, bool) {
        let mut stdin = StdinQueue::new(stdin.and_then(Result::ok));
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let sleep = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400)),
        );
        let mut sleep = std::pin::pin!(sleep);
        let mut timed_out = false;
        loop {
            tokio::select! {
                status = &mut exit => return (status.ok(), timed_out, cancelled),
                () = &mut sleep, if deadline.is_some() && !timed_out => {
                    timed_out = true;
                    self.kill_tree();
                }
                event = input.next(), if !cancelled && stdin.has_room() => {
                    if self.on_event(event, &mut stdin) {
                        cancelled = true;
                        self.kill_tree();
                    }
                }
                sent = stdin.flush_one(), if stdin.can_flush() => {
                    if !sent {
                        stdin.close();
                    }
                }
            }
        }
    }

    /// Applies one host event; returns true when the host cancelled.
    fn on_event(&self, event: HostEvent, stdin: &mut StdinQueue) -> bool {
        match event {
            HostEvent::Stdin(data) => stdin.push(data),
            HostEvent::StdinEof => stdin.finish(),
            HostEvent::Signal { signal, group } => {
                if !(1..=64).contains(&signal) {
                    if LOG_LIMIT.allow() {
                        tracing::debug!(signal, "ignoring an invalid signal number");
                    }
                } else if group {
                    child::signal_tree(self.pid, self.cgroup.as_ref(), signal);
                } else {
                    child::signal_process(self.pid, signal);
                }
            }
            HostEvent::Cancel => return true,
        }
        false
    }

    fn kill_tree(&self) {
        child::signal_tree(self.pid, self.cgroup.as_ref(), libc::SIGKILL);
    }
}

fn receiver(fd: OwnedFd) -> io::Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd)
}

/// Starts the task that writes queued stdin chunks into the child's stdin.
/// Dropping the returned sender (after the queue drained) closes the pipe.
fn stdin_writer(fd: OwnedFd) -> io::Result<mpsc::Sender<Bytes>> {
    let mut pipe = pipe::Sender::from_owned_fd(fd)?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            // EPIPE: the child closed its stdin; the queue stops accepting.
            if pipe.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    Ok(tx)
}

/// Stdin from the host waiting for the writer task.
struct StdinQueue {
    writer: Option<mpsc::Sender<Bytes>>,
    queue: VecDeque<Bytes>,
    queued: usize,
    eof: bool,
}

impl StdinQueue {
    fn new(writer: Option<mpsc::Sender<Bytes>>) -> StdinQueue {
        StdinQueue {
            writer,
            queue: VecDeque::new(),
            queued: 0,
            eof: false,
        }
    }

    fn has_room(&self) -> bool {
        self.queued < STDIN_BUFFER
    }

    fn push(&mut self, data: Bytes) {
        if self.writer.is_some() && !self.eof && !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    fn finish(&mut self) {
        self.eof = true;
        if self.queue.is_empty() {
            self.writer = None;
        }
    }

    fn close(&mut self) {
        self.writer = None;
        self.queue.clear();
        self.queued = 0;
    }

    fn can_flush(&self) -> bool {
        self.writer.is_some() && !self.queue.is_empty()
    }

    /// Hands the oldest chunk to the writer; false when the writer is gone.
    async fn flush_one(&mut self) -> bool {
        {
            let Some(writer) = &self.writer else {
                return false;
            };
            let Ok(permit) = writer.reserve().await else {
                return false;
            };
            if let Some(chunk) = self.queue.pop_front() {
                self.queued -= chunk.len();
                permit.send(chunk);
            }
        }
        if self.eof && self.queue.is_empty() {
            self.writer = None;
        }
        true
    }
}

/// Forwards one pipe until EOF, or until told to detach; then sends what is
/// already buffered (bounded) and hands the pipe back if it is still open.
async fn forward<O: ExecOutput>(
    mut pipe: pipe::Receiver,
    channel: Channel,
    out: O,
    mut detach: watch::Receiver<bool>,
) -> Option<pipe::Receiver> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = tokio::select! {
            biased;
            _ = detach.wait_for(|d| *d) => break,
            read = pipe.read(&mut buf) => read,
        };
        match read {
            Ok(0) => return None,
            Ok(n) => {
                if out
                    .data(channel, Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    return Some(pipe);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let mut budget = DRAIN_LIMIT;
    while budget > 0 {
        match nix::unistd::read(&pipe, &mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                budget = budget.saturating_sub(n);
                if out
                    .data(channel, Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(_) => return None,
        }
    }
    Some(pipe)
}

/// Reads and drops a detached pipe until its last writer is gone, so a
/// background process writing to it does not die of SIGPIPE. Paced (one
/// read per [`DISCARD_PACE`]) so an endless writer costs the agent little:
/// it blocks on the full pipe instead.
async fn discard(mut pipe: pipe::Receiver) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(_) => tokio::time::sleep(DISCARD_PACE).await,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
