//! The `Exec` request, independent of the multiplexer: spawns the command
//! through the [`Supervisor`], streams its stdout/stderr (or its terminal)
//! as they are produced (backpressured by the host's flow control), feeds
//! stdin, delivers signals and resizes, enforces the timeout, and reports
//! the exit as soon as the main process is gone, even when background
//! children keep the pipes open.
//!
//! An exec's life is tied to its stream unless it is kept (see [`kept`]):
//! then the stream only attaches to it, and `Attach` can take it over.
//!
//! The stream is reached through two small traits ([`ExecOutput`],
//! [`ExecInput`]) so the whole behaviour is testable with plain channels.

mod child;
mod kept;
mod spec;
mod stdio;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrakis_protocol::{valid_keep_id, Channel, ExecRequest, ExitStatus, TtySize, KEEP_ID_FORM};
use bytes::Bytes;
use tokio::sync::watch;

pub use kept::{AttachEnd, ReplyAck};
pub use spec::{ExecSpec, Limit, DEFAULT_PATH};

use crate::cgroup::{Cgroups, ExecCgroup};
use crate::log::RateLimit;
use crate::supervisor::{ProcessExit, SpawnedChild, Supervisor};
use crate::users::UserError;
use child::{ChildIo, SpawnError, Step};
use stdio::{Pty, StdinQueue, Stdio};

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
    /// A step of the child's set-up before `execve` failed.
    #[error("cannot {step} for {program:?}")]
    Setup {
        program: String,
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("the exit status of pid {pid} was lost")]
    Lost { pid: u32 },
    #[error("a kept process {id:?} already exists")]
    AlreadyKept { id: String },
    #[error("no kept process {id:?} (never started, or its exit was already reported)")]
    NotKept { id: String },
}

/// The host side went away (stream reset or session closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where the exec sends what it produces.
pub trait ExecOutput: Clone + Send + Sync + 'static {
    fn started(&self, pid: u32) -> impl Future<Output = Result<(), Gone>> + Send;
    /// Waits for flow-control credit; this is what slows a chatty command
    /// down. Dropping the future before it finished must send nothing (a
    /// kept exec then keeps the chunk for the next stream); `data` is at
    /// most [`CHUNK`] bytes.
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
    /// The terminal's new size (ignored without a terminal).
    Resize {
        rows: u16,
        cols: u16,
    },
    /// The host abandoned the stream or the session ended: kill the tree
    /// (a kept exec only detaches).
    Cancel,
}

/// Where the exec takes host events from. After [`HostEvent::Cancel`] it is
/// not polled again. `next` must be cancel-safe (it is raced in `select!`).
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
    /// The kept execs, by id.
    kept: kept::Registry,
}

impl ExecContext {
    pub fn new(supervisor: &'static Supervisor, cgroups: Arc<Cgroups>, root: PathBuf) -> Self {
        ExecContext {
            supervisor,
            cgroups,
            root,
            kept: kept::Registry::default(),
        }
    }

    /// Validates, spawns and supervises one exec until its main process
    /// exits; a cancel kills its tree. Kept execs go through
    /// [`ExecContext::run_kept`].
    pub async fn run<O: ExecOutput, I: ExecInput>(
        &self,
        request: &ExecRequest,
        out: O,
        input: I,
    ) -> Result<ExecOutcome, ExecError> {
        let spec = ExecSpec::from_request(request, &self.root)?;
        if spec.keep.is_some() {
            return Err(ExecError::Invalid {
                field: "keep".into(),
                reason: "a kept exec is run by run_kept".into(),
            });
        }
        let started = std::time::Instant::now();
        let (running, child) = self.spawn(&spec)?;
        let outcome = running.supervise(child, spec.stdin, out, input).await;
        tracing::debug!(
            total_us = started.elapsed().as_micros() as u64,
            "exec finished"
        );
        outcome
    }

    /// Validates and spawns a kept exec (its id must be free), then serves
    /// `out`/`input` as its first attached stream: returns when that stream
    /// ends (see [`AttachEnd`]). The process outlives it.
    pub async fn run_kept<O: ExecOutput, I: ExecInput>(
        &self,
        request: &ExecRequest,
        out: O,
        input: I,
    ) -> Result<AttachEnd, ExecError> {
        let spec = ExecSpec::from_request(request, &self.root)?;
        let Some(id) = spec.keep.clone() else {
            return Err(ExecError::Invalid {
                field: "keep".into(),
                reason: "run_kept needs a kept id".into(),
            });
        };
        let attachments = self.kept.reserve(&id)?;
        let (running, child) = match self.spawn(&spec) {
            Ok(spawned) => spawned,
            Err(e) => {
                self.kept.release(&id);
                return Err(e);
            }
        };
        let stdio = Stdio::new(child.io, spec.stdin);
        let owner = kept::Owner::new(kept::Parts {
            id: id.clone(),
            registry: self.kept.clone(),
            running,
            exit: child.exit,
            stdio,
            attachments,
        });
        let (first, end) = kept::Attachment::new(out, input);
        tokio::spawn(owner.run(first));
        end.await.map_err(|_| ExecError::NotKept { id })
    }

    /// Attaches `out`/`input` to the kept exec `id`, taking it over from
    /// the stream attached now; returns when this stream ends.
    pub async fn attach<O: ExecOutput, I: ExecInput>(
        &self,
        id: &str,
        out: O,
        input: I,
    ) -> Result<AttachEnd, ExecError> {
        if !valid_keep_id(id) {
            return Err(ExecError::Invalid {
                field: "id".into(),
                reason: format!("{id:?} is not {KEEP_ID_FORM}"),
            });
        }
        let (attachment, end) = kept::Attachment::new(out, input);
        self.kept.attach(id, attachment)?;
        end.await.map_err(|_| ExecError::NotKept { id: id.into() })
    }

    /// Spawns `spec` in a fresh cgroup.
    fn spawn(&self, spec: &ExecSpec) -> Result<(Running, SpawnedChild<ChildIo>), ExecError> {
        let cgroup = self.cgroups.create_exec();
        let procs = cgroup.as_ref().and_then(|c| c.procs_for_join().ok());
        let started = std::time::Instant::now();
        // Inline, not on a blocking thread: the vfork-style spawn holds this
        // worker only until the child's execve (about a millisecond under
        // TCG), less than the two thread hops of spawn_blocking.
        let spawned = self.supervisor.spawn(|| child::spawn(spec, procs.as_ref()));
        drop(procs);
        let child = spawned.map_err(|error| spawn_error(spec, error))?;
        tracing::debug!(
            pid = child.pid,
            spawn_us = started.elapsed().as_micros() as u64,
            "exec started"
        );
        let running = Running {
            pid: i32::try_from(child.pid).unwrap_or(i32::MAX),
            cgroup,
            timeout: spec.timeout,
            pty: None,
        };
        Ok((running, child))
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

fn spawn_error(spec: &ExecSpec, error: SpawnError) -> ExecError {
    let program = spec.program.clone();
    let source = error.source;
    let step = match error.step {
        Step::Prepare | Step::Exec => return ExecError::Spawn { program, source },
        Step::Session => "start a new session".to_owned(),
        Step::Stdio => "set up stdin, stdout and stderr".to_owned(),
        Step::Terminal => "make the terminal the controlling terminal".to_owned(),
        Step::Cwd => format!("enter the working directory {}", spec.cwd.display()),
        Step::Limit(index) => match spec.limits.get(index) {
            Some(limit) => format!(
                "set {} to soft {}, hard {}",
                limit.name, limit.soft, limit.hard
            ),
            None => "set a resource limit".to_owned(),
        },
        Step::User => {
            let creds = &spec.credentials;
            format!(
                "switch to uid {}, gid {} with {} supplementary groups",
                creds.uid,
                creds.gid,
                creds.groups.len()
            )
        }
    };
    ExecError::Setup {
        program,
        step,
        source,
    }
}

/// A spawned exec while it is supervised.
struct Running {
    pid: i32,
    cgroup: Option<ExecCgroup>,
    timeout: Option<Duration>,
    /// The exec's terminal, when it has one.
    pty: Option<Arc<Pty>>,
}

impl Running {
    async fn supervise<O: ExecOutput, I: ExecInput>(
        mut self,
        child: SpawnedChild<ChildIo>,
        stdin: bool,
        out: O,
        input: I,
    ) -> Result<ExecOutcome, ExecError> {
        let stdio = Stdio::new(child.io, stdin);
        self.pty = stdio.pty;
        let mut cancelled = out.started(child.pid).await.is_err();
        if cancelled {
            self.kill_tree();
        }
        let (detach_tx, detach_rx) = watch::channel(false);
        let forwarders = [
            (Channel::Stdout, stdio.stdout),
            (Channel::Stderr, stdio.stderr),
        ]
        .map(|(channel, source)| {
            let out = out.clone();
            let detach = detach_rx.clone();
            tokio::spawn(async move {
                match source {
                    Some(source) => stdio::forward(source, channel, out, detach).await,
                    None => None,
                }
            })
        });
        let (exit, timed_out, input_cancelled) = self
            .wait_main(child.exit, input, stdio.stdin, cancelled)
            .await;
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
            tokio::spawn(stdio::discard(leftover));
        }
        if !cancelled {
            for channel in [Channel::Stdout, Channel::Stderr] {
                cancelled |= out.eof(channel).await.is_err();
            }
        }
        let status = exit_status(exit, timed_out);
        Ok(ExecOutcome { status, cancelled })
    }

    /// Handles host events and the timeout until the main process exits.
    /// Returns its exit (None if the reaper dropped it), whether the timeout
    /// fired and whether the host cancelled.
    async fn wait_main<I: ExecInput>(
        &self,
        mut exit: tokio::sync::oneshot::Receiver<ProcessExit>,
        mut input: I,
        mut stdin: StdinQueue,
        mut cancelled: bool,
    ) -> (Option<ProcessExit>, bool, bool) {
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
            HostEvent::Resize { rows, cols } => self.resize(TtySize { rows, cols }),
            HostEvent::Cancel => return true,
        }
        false
    }

    fn resize(&self, size: TtySize) {
        let Some(pty) = &self.pty else {
            if LOG_LIMIT.allow() {
                tracing::debug!(?size, "ignoring a resize of an exec without a terminal");
            }
            return;
        };
        if let Err(error) = pty.resize(size) {
            if LOG_LIMIT.allow() {
                tracing::debug!(%error, ?size, "resizing the terminal failed");
            }
        }
    }

    fn kill_tree(&self) {
        child::signal_tree(self.pid, self.cgroup.as_ref(), libc::SIGKILL);
    }
}

fn exit_status(exit: ProcessExit, timed_out: bool) -> ExitStatus {
    match exit {
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
    }
}

#[cfg(test)]
mod tests;
