//! A task's stdio on the host side: the FIFOs (or log URIs) containerd's
//! client named in Create/Exec, which the shim copies to and from the
//! process in the guest.
//!
//! FIFOs are opened read-write, as containerd's own shims do: the open never
//! blocks or fails for want of a peer, and a client that has not opened its
//! end yet (or closes it early) is not taken for end of input. The end of
//! stdin is signalled by `CloseIO` instead, which containerd sends when its
//! client's input ends.

use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

/// Where a process's stdio goes, as given by containerd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Where an output stream is written.
#[derive(Debug)]
pub enum Sink {
    Discard,
    Fifo(pipe::Sender),
    File(tokio::fs::File),
}

/// The destination an output URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary(String),
}

fn parse_target(uri: &str) -> Target {
    if uri.is_empty() {
        Target::None
    } else if let Some(path) = uri.strip_prefix("file://") {
        Target::File(PathBuf::from(path))
    } else if uri.starts_with("binary://") {
        Target::Binary(uri.to_owned())
    } else if let Some(path) = uri.strip_prefix("fifo://") {
        Target::Fifo(PathBuf::from(path))
    } else {
        Target::Fifo(PathBuf::from(uri))
    }
}

impl Sink {
    /// Opens the output named by `uri` (a FIFO path, `file://`, or empty).
    pub async fn open(uri: &str) -> io::Result<Sink> {
        match parse_target(uri) {
            Target::None => Ok(Sink::Discard),
            Target::Fifo(path) => Ok(Sink::Fifo(open_fifo_sender(&path)?)),
            Target::File(path) => {
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await?;
                Ok(Sink::File(file))
            }
            Target::Binary(uri) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uri}: a binary:// logger takes both outputs; use open_outputs"),
            )),
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Discard => Ok(()),
            Sink::Fifo(pipe) => pipe.write_all(data).await,
            Sink::File(file) => file.write_all(data).await,
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(file) => file.flush().await,
            _ => Ok(()),
        }
    }
}

/// Both outputs of a process. A `binary://` URI (a logging driver such as
/// nerdctl's) starts that program with the process's stdout on its fd 3,
/// stderr on fd 4 and a pipe on fd 5 that it closes once ready, with
/// `CONTAINER_ID` and `CONTAINER_NAMESPACE` set, as containerd's shims do.
pub async fn open_outputs(
    paths: &StdioPaths,
    container_id: &str,
    namespace: &str,
) -> io::Result<(Sink, Sink, Option<Logger>)> {
    if let Target::Binary(uri) = parse_target(&paths.stdout) {
        let (logger, stdout, stderr) = Logger::start(&uri, container_id, namespace).await?;
        return Ok((Sink::Fifo(stdout), Sink::Fifo(stderr), Some(logger)));
    }
    let stdout = Sink::open(&paths.stdout).await?;
    let stderr = Sink::open(&paths.stderr).await?;
    Ok((stdout, stderr, None))
}

/// A running logging driver.
#[derive(Debug)]
pub struct Logger {
    child: tokio::process::Child,
}

/// How long a logging driver may take to signal it is ready.
const LOGGER_READY: std::time::Duration = std::time::Duration::from_secs(10);

impl Logger {
    async fn start(
        uri: &str,
        container_id: &str,
        namespace: &str,
    ) -> io::Result<(Logger, pipe::Sender, pipe::Sender)> {
        let (program, args) = parse_binary_uri(uri)?;
        let (out_r, out_w) = cloexec_pipe()?;
        let (err_r, err_w) = cloexec_pipe()?;
        let (ready_r, ready_w) = cloexec_pipe()?;
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .env("CONTAINER_ID", container_id)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        // SAFETY: between fork and exec only async-signal-safe calls
        // (dup2, fcntl) on descriptors that are open in the child.
        unsafe {
            command.pre_exec(move || {
                for (target, fd) in (3..).zip(fds) {
                    if fd == target {
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("starting the logger {}: {e}", program.display()),
            )
        })?;
        drop((out_r, err_r, ready_w));
        // The logger closes its end of the ready pipe (or exits) when ready.
        let mut ready = pipe::Receiver::from_owned_fd(ready_r)?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(LOGGER_READY, ready.read(&mut byte)).await {
            Ok(_) => {}
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the logger {} did not get ready in {LOGGER_READY:?}",
                        program.display()
                    ),
                ))
            }
        }
        let stdout = pipe::Sender::from_owned_fd(out_w)?;
        let stderr = pipe::Sender::from_owned_fd(err_w)?;
        Ok((Logger { child }, stdout, stderr))
    }

    /// Waits for the logger to finish (after both outputs were closed).
    pub async fn wait(mut self) {
        match tokio::time::timeout(LOGGER_READY, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("the logger did not exit after its input ended; killing it");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// `binary:///path/to/program?key=value&flag` -> the program and its
/// arguments (`key value flag`).
fn parse_binary_uri(uri: &str) -> io::Result<(PathBuf, Vec<String>)> {
    let rest = uri.strip_prefix("binary://").unwrap_or(uri);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{uri}: the logger must be an absolute path"),
        ));
    }
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(key));
        if !value.is_empty() {
            args.push(percent_decode(value));
        }
    }
    Ok((PathBuf::from(percent_decode(path)), args))
}

/// Decodes `%XX` escapes and `+` (query strings as Go's url package writes them).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn open_fifo_sender(path: &Path) -> io::Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(true)
        .unchecked(false)
        .open_sender(path)
}

/// Opens the stdin FIFO (read-write, see the module doc).
pub fn open_stdin(path: &str) -> io::Result<Option<pipe::Receiver>> {
    if path.is_empty() {
        return Ok(None);
    }
    let path = path.strip_prefix("fifo://").unwrap_or(path);
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_their_targets() {
        assert_eq!(parse_target(""), Target::None);
        assert_eq!(
            parse_target("/run/containerd/fifo/1/t-stdout"),
            Target::Fifo("/run/containerd/fifo/1/t-stdout".into())
        );
        assert_eq!(
            parse_target("file:///var/log/c.log"),
            Target::File("/var/log/c.log".into())
        );
        assert!(matches!(
            parse_target("binary:///usr/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=/x"),
            Target::Binary(_)
        ));
    }

    #[tokio::test]
    async fn fifo_output_reaches_a_reader_and_ends_with_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
        let mut sink = Sink::open(path.to_str().unwrap()).await.unwrap();
        sink.write_all(b"hello\n").await.unwrap();
        drop(sink);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello\n");
    }

    #[test]
    fn binary_uris_become_a_command_line() {
        let (program, args) = parse_binary_uri(
            "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl%2F1935db59",
        )
        .unwrap();
        assert_eq!(program, PathBuf::from("/usr/local/bin/nerdctl"));
        assert_eq!(
            args,
            ["_NERDCTL_INTERNAL_LOGGING", "/var/lib/nerdctl/1935db59"]
        );
        assert!(parse_binary_uri("binary://relative/logger").is_err());
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    #[tokio::test]
    async fn a_binary_logger_gets_both_outputs_and_the_container_identity() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("logger");
        let log = dir.path().join("log");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\n{{ echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1\"; cat <&3; cat <&4; }} > {}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?tag", script.display());
        let paths = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..StdioPaths::default()
        };
        let (mut out, mut err, logger) = open_outputs(&paths, "c1", "ns").await.unwrap();
        out.write_all(b"to stdout\n").await.unwrap();
        err.write_all(b"to stderr\n").await.unwrap();
        drop((out, err));
        logger.unwrap().wait().await;
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "ns/c1 tag\nto stdout\nto stderr\n"
        );
    }

    #[tokio::test]
    async fn file_output_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/c.log");
        let uri = format!("file://{}", path.display());
        for line in [&b"one\n"[..], b"two\n"] {
            let mut sink = Sink::open(&uri).await.unwrap();
            sink.write_all(line).await.unwrap();
            sink.flush().await.unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    }
}
