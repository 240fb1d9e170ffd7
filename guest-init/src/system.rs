//! Whole-guest settings and facts: hostname, wall clock, entropy, the
//! agent's OOM score, uptime and kernel release, and the shutdown sequence
//! (stop every process, sync, remount read-only, power off).

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest entropy seed accepted from the host.
pub const MAX_ENTROPY_BYTES: usize = 64 * 1024;

/// Errors of system settings.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("invalid hostname {name:?}: 1 to 64 characters of letters, digits, '-' and '.', not starting with '-' or '.'")]
    BadHostname { name: String },
    #[error("cannot set the hostname")]
    SetHostname(#[source] nix::Error),
    #[error("cannot set the clock")]
    SetClock(#[source] nix::Error),
    #[error("entropy of {len} bytes is too long (at most {MAX_ENTROPY_BYTES})")]
    EntropyTooLong { len: usize },
    #[error("cannot add entropy through /dev/urandom")]
    Entropy(#[source] io::Error),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {content:?}")]
    Parse { path: String, content: String },
    #[error("cannot read the kernel release")]
    Uname(#[source] nix::Error),
}

/// Checks a hostname against the characters the kernel and resolvers accept.
pub fn validate_hostname(name: &str) -> Result<(), SystemError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SystemError::BadHostname {
            name: name.to_owned(),
        })
    }
}

/// Sets the kernel hostname and, when the root filesystem lets us, `/etc/hostname`.
pub fn set_hostname(name: &str) -> Result<(), SystemError> {
    set_kernel_hostname(name)?;
    write_hostname_file(name);
    Ok(())
}

/// Validates `name` and sets the kernel hostname only.
pub fn set_kernel_hostname(name: &str) -> Result<(), SystemError> {
    validate_hostname(name)?;
    nix::unistd::sethostname(name).map_err(SystemError::SetHostname)
}

/// Records the hostname in `/etc/hostname` (best effort: the root file
/// system may be read-only).
pub fn write_hostname_file(name: &str) {
    let line = format!("{name}\n");
    if let Err(e) = write_atomic(Path::new("/etc/hostname"), line.as_bytes(), 0o644) {
        tracing::debug!(error = %e, "/etc/hostname not updated");
    }
}

/// The kernel hostname.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> Result<String, SystemError> {
    let uts = nix::sys::utsname::uname().map_err(SystemError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

/// Milliseconds since boot, from `/proc/uptime`.
pub fn uptime_ms() -> Result<u64, SystemError> {
    let path = "/proc/uptime";
    let content = std::fs::read_to_string(path).map_err(|source| SystemError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_uptime_ms(&content).ok_or_else(|| SystemError::Parse {
        path: path.to_owned(),
        content,
    })
}

fn parse_uptime_ms(content: &str) -> Option<u64> {
    let first = content.split_ascii_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u64 = secs.parse().ok()?;
    let frac_ms: u64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    secs.checked_mul(1000)?.checked_add(frac_ms)
}

/// Sets `CLOCK_REALTIME` to the given time.
pub fn set_time(unix_nanos: u64) -> Result<(), SystemError> {
    let ts = nix::sys::time::TimeSpec::from(std::time::Duration::from_nanos(unix_nanos));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(SystemError::SetClock)
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes host-provided bytes into the kernel's pool, credits them and
/// reseeds the CRNG at once, so clones restored from one snapshot stop
/// sharing their random state. Without the reseed the CRNG keeps its old
/// key until its next periodic reseed (up to a minute), and clones read
/// the same bytes from `/dev/urandom` (measured: two of five forks did).
pub fn add_entropy(bytes: &[u8]) -> Result<(), SystemError> {
    if bytes.len() > MAX_ENTROPY_BYTES {
        return Err(SystemError::EntropyTooLong { len: bytes.len() });
    }
    if bytes.is_empty() {
        return Ok(());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = 2 + bytes.len().div_ceil(4);
    let mut info = vec![0u32; words];
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    info[0] = bits as u32;
    info[1] = len as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(SystemError::Entropy)?;
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a live buffer laid out as struct rand_pool_info with
    // buf_size bytes of data after the two ints; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            urandom.as_raw_fd(),
            RNDADDENTROPY,
            info.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(SystemError::Entropy(io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::syscall(libc::SYS_ioctl, urandom.as_raw_fd(), RNDRESEEDCRNG, 0) };
    if rc < 0 {
        return Err(SystemError::Entropy(io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the calling process's OOM score adjustment (-1000 = never chosen).
pub fn set_oom_score_adj(value: i32) -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", value.to_string())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name next to `path` (same directory, so a rename is atomic).
pub fn temp_path_for(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = path.file_name().unwrap_or(OsStr::new("file"));
    let mut name = std::ffi::OsString::from(".");
    // Keep the temporary name within NAME_MAX even for long base names.
    name.push(OsStr::from_bytes(&base.as_bytes()[..base.len().min(200)]));
    name.push(format!(".arrakis-tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `content` to a temporary file beside `path`, then renames it over
/// `path`: readers see the old or the new content, never a part.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let temp = temp_path_for(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether a `/proc/<pid>/stat` line describes a live user-space process
/// (not a kernel thread, not a zombie the reaper is about to collect).
fn is_live_user_process(stat: &str) -> bool {
    let Some((_, after_comm)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = after_comm.split_ascii_whitespace().collect();
    let (Some(state), Some(flags)) = (fields.first(), fields.get(6)) else {
        return false;
    };
    let flags: u64 = flags.parse().unwrap_or(PF_KTHREAD);
    *state != "Z" && *state != "X" && flags & PF_KTHREAD == 0
}

/// Whether any process other than this one is still running.
fn user_processes_left() -> bool {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str() else {
            return false;
        };
        pid != me
            && pid.bytes().all(|b| b.is_ascii_digit())
            && std::fs::read_to_string(entry.path().join("stat"))
                .is_ok_and(|stat| is_live_user_process(&stat))
    })
}

/// How long to wait for processes to exit after SIGTERM at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Stops every process, syncs and remounts the root read-only, then powers
/// off (or reboots; QEMU runs with `-no-reboot`, so both end the VM). Only
/// returns if the final `reboot(2)` fails, which it does not as PID 1.
pub fn shutdown(reboot: bool) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    tracing::info!(reboot, "shutting down");
    nix::unistd::sync();
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    // (kill(-1, 0) cannot tell: it counts kernel threads too.)
    while user_processes_left() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(everyone, Signal::SIGKILL);
    nix::unistd::sync();
    let remount = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    );
    if let Err(e) = remount {
        tracing::warn!(error = %e, "cannot remount / read-only; synced only");
        nix::unistd::sync();
    }
    let how = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    // reboot(2) only returns on failure.
    let failure = nix::sys::reboot::reboot(how).err();
    tracing::error!(error = ?failure, "reboot(2) failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["arrakis", "box-1", "a.b.c", "A1"] {
            assert!(validate_hostname(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in ["", "-x", ".x", "a b", "a_b", "é", long.as_str()] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uptime_parsing() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("0.05 0.00"), Some(50));
        assert_eq!(parse_uptime_ms("7 1"), Some(7_000));
        assert_eq!(parse_uptime_ms("x"), None);
        assert_eq!(parse_uptime_ms(""), None);
        assert!(uptime_ms().unwrap() > 0);
    }

    #[test]
    fn process_table_filter() {
        let user = "42 (bash) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 5 1 1";
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0";
        let zombie = "77 (sh) Z 1 77 77 0 -1 4194564 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        let odd_name = "43 (a) b (c) R 1 43 43 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 5 1 1";
        assert!(is_live_user_process(user));
        assert!(!is_live_user_process(kthread));
        assert!(!is_live_user_process(zombie));
        assert!(is_live_user_process(odd_name));
        assert!(!is_live_user_process("garbage"));
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(is_live_user_process(&own));
    }

    #[test]
    fn entropy_limit() {
        let big = vec![0u8; MAX_ENTROPY_BYTES + 1];
        assert!(matches!(
            add_entropy(&big),
            Err(SystemError::EntropyTooLong { .. })
        ));
        assert!(add_entropy(&[]).is_ok());
    }

    #[test]
    fn write_atomic_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }
}
