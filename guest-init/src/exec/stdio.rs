//! The agent's ends of an exec's stdio: output sources (a pipe, or the
//! master of the exec's terminal), the stdin writer and its queue, and the
//! forwarding of output to the host.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use arrakis_protocol::{Channel, TtySize};
use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::child::{self, ChildIo};
use super::{ExecOutput, CHUNK, DISCARD_PACE, DRAIN_LIMIT, STDIN_BUFFER};

/// The master of an exec's terminal (non-blocking). Shared by the output
/// forwarder, the stdin writer and resizes; the terminal lives as long as
/// one of them holds it.
#[derive(Debug)]
pub(super) struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        child::set_window_size(self.0.get_ref(), size)
    }

    /// Reads without waiting; `WouldBlock` when nothing is buffered. The
    /// end of the terminal (every slave closed, `EIO`) reads as 0.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.0.get_ref(), buf) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EIO) => Ok(0),
            Err(errno) => Err(errno.into()),
        }
    }

    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|_| self.try_read(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            let written = guard
                .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from));
            match written {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// Where an exec's output is read from.
#[derive(Debug)]
pub(super) enum Source {
    Pipe(pipe::Receiver),
    Pty(Arc<Pty>),
}

impl Source {
    /// Reads some bytes; 0 at the end.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Pipe(pipe) => pipe.read(buf).await,
            Source::Pty(pty) => pty.read(buf).await,
        }
    }

    /// Reads what is buffered without waiting (`WouldBlock` when nothing is).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Pipe(pipe) => pipe.try_read(buf),
            Source::Pty(pty) => pty.try_read(buf),
        }
    }
}

/// Where stdin from the host is written.
enum Sink {
    Pipe(pipe::Sender),
    Pty(Arc<Pty>),
}

/// The agent's ends of a spawned child's stdio.
pub(super) struct Stdio {
    pub stdout: Option<Source>,
    /// None with a terminal: stderr is the terminal too.
    pub stderr: Option<Source>,
    pub stdin: StdinQueue,
    pub pty: Option<Arc<Pty>>,
}

impl Stdio {
    /// Wraps the child's fds for tokio; `stdin` says whether the host may
    /// write to a terminal. An fd that cannot be registered is dropped
    /// (its channel then only gets `EOF`).
    pub fn new(io: ChildIo, stdin: bool) -> Stdio {
        match io {
            ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let writer = stdin
                    .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok())
                    .map(|pipe| stdin_writer(Sink::Pipe(pipe)));
                Stdio {
                    stdout: receiver(stdout),
                    stderr: receiver(stderr),
                    stdin: StdinQueue::new(writer, false),
                    pty: None,
                }
            }
            ChildIo::Pty { master } => {
                // SAFETY: `master` is an open fd owned by the AsyncFd from
                // here on, so it stays the same open file until it drops.
                let registered = unsafe { AsyncFd::register(master) };
                let Ok(pty) = registered.map(|fd| Arc::new(Pty(fd))) else {
                    return Stdio {
                        stdout: None,
                        stderr: None,
                        stdin: StdinQueue::new(None, true),
                        pty: None,
                    };
                };
                let writer = stdin.then(|| stdin_writer(Sink::Pty(Arc::clone(&pty))));
                Stdio {
                    stdout: Some(Source::Pty(Arc::clone(&pty))),
                    stderr: None,
                    stdin: StdinQueue::new(writer, true),
                    pty: Some(pty),
                }
            }
        }
    }
}

fn receiver(fd: OwnedFd) -> Option<Source> {
    pipe::Receiver::from_owned_fd(fd).ok().map(Source::Pipe)
}

/// Starts the task that writes queued stdin chunks into the child's stdin.
/// Dropping the returned sender (after the queue drained) ends it, which
/// closes a pipe (a terminal stays open while the exec holds it).
fn stdin_writer(mut sink: Sink) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let written = match &mut sink {
                Sink::Pipe(pipe) => pipe.write_all(&chunk).await,
                Sink::Pty(pty) => pty.write_all(&chunk).await,
            };
            // EPIPE/EIO: the child closed its stdin; the queue stops accepting.
            if written.is_err() {
                return;
            }
        }
    });
    tx
}

/// Stdin from the host waiting for the writer task.
pub(super) struct StdinQueue {
    writer: Option<mpsc::Sender<Bytes>>,
    queue: VecDeque<Bytes>,
    queued: usize,
    eof: bool,
    /// A terminal: `EOF` from the host only stops its input (closing the
    /// master would hang the terminal up).
    terminal: bool,
}

impl StdinQueue {
    fn new(writer: Option<mpsc::Sender<Bytes>>, terminal: bool) -> StdinQueue {
        StdinQueue {
            writer,
            queue: VecDeque::new(),
            queued: 0,
            eof: false,
            terminal,
        }
    }

    pub fn has_room(&self) -> bool {
        self.queued < STDIN_BUFFER
    }

    pub fn push(&mut self, data: Bytes) {
        if self.writer.is_some() && !self.eof && !data.is_empty() {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    pub fn finish(&mut self) {
        self.eof = true;
        if self.queue.is_empty() && !self.terminal {
            self.writer = None;
        }
    }

    /// Takes input again after an `EOF` (a new stream attached to a
    /// terminal); a closed pipe stays closed.
    pub fn reopen(&mut self) {
        if self.terminal {
            self.eof = false;
        }
    }

    pub fn close(&mut self) {
        self.writer = None;
        self.queue.clear();
        self.queued = 0;
    }

    pub fn can_flush(&self) -> bool {
        self.writer.is_some() && !self.queue.is_empty()
    }

    /// Hands the oldest chunk to the writer; false when the writer is gone.
    pub async fn flush_one(&mut self) -> bool {
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
        if self.eof && self.queue.is_empty() && !self.terminal {
            self.writer = None;
        }
        true
    }
}

/// Forwards one source until its end, or until told to detach; then sends
/// what is already buffered (bounded) and hands the source back if it is
/// still open.
pub(super) async fn forward<O: ExecOutput>(
    mut source: Source,
    channel: Channel,
    out: O,
    mut detach: watch::Receiver<bool>,
) -> Option<Source> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = tokio::select! {
            biased;
            _ = detach.wait_for(|d| *d) => break,
            read = source.read(&mut buf) => read,
        };
        match read {
            Ok(0) => return None,
            Ok(n) => {
                if out
                    .data(channel, Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
                {
                    return Some(source);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let mut budget = DRAIN_LIMIT;
    while budget > 0 {
        match source.try_read(&mut buf) {
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
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(source)
}

/// Reads and drops a detached source until its last writer is gone, so a
/// background process writing to it does not die of SIGPIPE. Paced (one
/// read per [`DISCARD_PACE`]) so an endless writer costs the agent little:
/// it blocks on the full pipe instead.
pub(super) async fn discard(mut source: Source) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match source.read(&mut buf).await {
            Ok(0) => return,
            Ok(_) => tokio::time::sleep(DISCARD_PACE).await,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
