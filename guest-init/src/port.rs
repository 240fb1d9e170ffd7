//! The agent's end of the host channel: a virtio-serial port, found by name
//! under `/sys/class/virtio-ports` (there is no udev), opened once for the
//! life of the guest, and wrapped for tokio as [`PortIo`], which hides the
//! port's hang-ups (see there).

use std::fs::OpenOptions;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Where the kernel lists virtio-serial ports.
pub const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
const RETRY: Duration = Duration::from_millis(20);

/// The device node of the port called `name`, if it exists yet.
pub fn find_port(sys_class: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class).ok()?;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// The opened port.
#[derive(Debug)]
pub struct Port {
    fd: OwnedFd,
}

impl Port {
    /// Opens a port device (non-blocking, close-on-exec).
    pub fn open(path: &Path) -> io::Result<Port> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Port::from_fd(file.into()))
    }

    /// Wraps an already open, non-blocking fd (a socket in tests).
    pub fn from_fd(fd: OwnedFd) -> Port {
        Port { fd }
    }

    /// Waits until the port named `name` appears, then opens it.
    pub async fn wait_and_open(sys_class: &Path, name: &str) -> Port {
        let mut reported = false;
        loop {
            match find_port(sys_class, name).map(|dev| (Port::open(&dev), dev)) {
                Some((Ok(port), dev)) => {
                    tracing::info!(device = %dev.display(), name, "agent port open");
                    return port;
                }
                Some((Err(e), dev)) if !reported => {
                    tracing::warn!(error = %e, device = %dev.display(), "cannot open the agent port yet");
                    reported = true;
                }
                None if !reported => {
                    tracing::info!(name, "waiting for the agent port");
                    reported = true;
                }
                _ => {}
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// The I/O handle the agent serves on (a registration of a dup'd fd).
    pub fn io(&self) -> io::Result<PortIo> {
        let base = self.fd.try_clone()?;
        let fd = register(&base)?;
        Ok(PortIo {
            base,
            fd,
            read_pause: None,
            write_pause: None,
            pause: MIN_PAUSE,
            write_waker: None,
            bytes_read: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// First pause after the host went away; it doubles up to [`MAX_PAUSE`].
const MIN_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(50);
/// Retry interval of a write blocked while no host is attached.
const WRITE_RETRY: Duration = Duration::from_millis(10);

fn register(base: &OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = base.try_clone()?;
    // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open
    // (and the same fd) until it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// `AsyncRead + AsyncWrite` over the port that never reports end of stream.
///
/// The port reads EOF (and reports `POLLHUP`) whenever no host is attached,
/// and also spuriously while one host replaces another within milliseconds:
/// the guest can see the old host's "closed" event after the new host's
/// first bytes. So a hang-up is not an end of session. Reads pause (5 ms
/// doubling to 50 ms) and re-register the fd (tokio never clears a "closed"
/// readiness), writes wait and retry; the protocol ends a session only when
/// the next host greets.
#[derive(Debug)]
pub struct PortIo {
    base: OwnedFd,
    fd: AsyncFd<OwnedFd>,
    read_pause: Option<Pin<Box<Sleep>>>,
    write_pause: Option<Pin<Box<Sleep>>>,
    pause: Duration,
    /// A writer waiting on the registration that a re-registration replaces.
    write_waker: Option<Waker>,
    bytes_read: Arc<AtomicU64>,
}

impl PortIo {
    /// A counter of the bytes read so far.
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes_read)
    }

    fn host_absent(&mut self) {
        self.read_pause = Some(Box::pin(tokio::time::sleep(self.pause)));
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }

    fn reregister(&mut self) -> io::Result<()> {
        self.fd = register(&self.base)?;
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
        Ok(())
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.read_pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.read_pause = None;
                this.reregister()?;
            }
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let hung_up = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(0)) => this.host_absent(),
                Ok(Ok(n)) => {
                    buf.advance(n);
                    this.pause = MIN_PAUSE;
                    this.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if hung_up => this.host_absent(),
                Err(_would_block) => {}
            }
        }
    }
}

fn write_fd(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    nix::unistd::write(fd, data).map_err(io::Error::from)
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.write_pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.write_pause = None;
                // The readiness may still say "closed": try the write itself.
                match write_fd(this.fd.get_ref(), data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        this.write_pause = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let mut guard = match this.fd.poll_write_ready(cx) {
                Poll::Ready(guard) => guard?,
                Poll::Pending => {
                    this.write_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            };
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|fd| write_fd(fd.get_ref(), data)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if hung_up => {
                    this.write_pause = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                }
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The port outlives sessions: shutting a session down closes nothing.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn finds_the_port_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport0p1", "org.arrakis.agent\n"),
        ] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), name).unwrap();
        }
        std::fs::create_dir(dir.path().join("vport1p1")).unwrap();
        assert_eq!(
            find_port(dir.path(), "org.arrakis.agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port(dir.path(), "org.other"), None);
        assert_eq!(
            find_port(&dir.path().join("missing"), "org.arrakis.agent"),
            None
        );
    }

    #[tokio::test]
    async fn a_hang_up_is_not_an_end_of_stream() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let ours = ours.into_std().unwrap();
        ours.set_nonblocking(true).unwrap();
        let port = Port::from_fd(ours.into());
        let mut io = port.io().unwrap();
        let counter = io.bytes_read();
        theirs.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(counter.load(Ordering::Relaxed), 4);
        io.write_all(b"pong").await.unwrap();
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");

        // The peer goes away: reads wait (pausing between tries) instead of
        // reporting EOF.
        theirs.write_all(b"last").await.unwrap();
        drop(theirs);
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"last");
        let more = tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await;
        assert!(more.is_err(), "a hang-up was reported as {more:?}");
    }
}
