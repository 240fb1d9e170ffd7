//! The agent's end of the host channel: a virtio-serial port, found by name
//! under `/sys/class/virtio-ports` (there is no udev), opened once for the
//! life of the guest, and wrapped for tokio.
//!
//! The port reports `POLLHUP` while no host is attached, and tokio keeps a
//! "closed" readiness once it has seen one (it never clears it). So:
//! - each session registers a fresh duplicate of the fd ([`Port::session`])
//!   instead of reusing one registration;
//! - within a session, `EAGAIN` after a hang-up was seen (the host left and
//!   maybe came back) ends the session: reads report EOF, writes fail with
//!   `NotConnected`. Retrying would spin, since the readiness stays set.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

    /// A new I/O handle for one session (a fresh registration of a dup'd fd).
    pub fn session(&self) -> io::Result<PortIo> {
        let fd = self.fd.try_clone()?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open
        // (and the same fd) until it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(PortIo {
            fd,
            bytes_read: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// `AsyncRead + AsyncWrite` over the port for one session.
#[derive(Debug)]
pub struct PortIo {
    fd: AsyncFd<OwnedFd>,
    bytes_read: Arc<AtomicU64>,
}

impl PortIo {
    /// A counter of the bytes this session read (to tell a real session from
    /// an immediate EOF while no host is attached).
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes_read)
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
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let hung_up = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    this.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // EOF: the next session starts with a fresh registration.
                Err(_would_block) if hung_up => return Poll::Ready(Ok(())),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if hung_up => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the host hung up",
                    )))
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
    async fn sessions_read_write_and_see_eof() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let ours = ours.into_std().unwrap();
        let port = Port::from_fd(ours.into());
        let mut io = port.session().unwrap();
        let counter = io.bytes_read();
        theirs.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(counter.load(Ordering::Relaxed), 4);
        io.write_all(b"pong").await.unwrap();
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop(io);

        // A second session on the same port works after the first ended.
        let mut io = port.session().unwrap();
        theirs.write_all(b"again").await.unwrap();
        drop(theirs);
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"again");
    }
}
