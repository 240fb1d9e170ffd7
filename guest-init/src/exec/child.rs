//! The child side of an exec: the `std::process::Command` with its
//! between-fork-and-exec setup (own session, own cgroup, OOM score, user
//! switch), and signal delivery to the process or its whole tree.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::spec::ExecSpec;
use crate::cgroup::ExecCgroup;

/// What the forked child does before `execve`. Runs after `fork` in a
/// multi-threaded parent, so only async-signal-safe calls are allowed: raw
/// syscalls on data prepared in the parent, no allocation, no locks.
struct ChildSetup {
    /// `cgroup.procs` of the exec's cgroup, opened by the parent (close-on-exec).
    cgroup_procs: Option<RawFd>,
    /// (uid, gid, supplementary groups) to switch to.
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

const OOM_SCORE_ADJ: &std::ffi::CStr = c"/proc/self/oom_score_adj";

impl ChildSetup {
    fn run(&self) -> io::Result<()> {
        // SAFETY: setsid takes no arguments; the child is not a group leader
        // (fresh fork), so it succeeds.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(fd) = self.cgroup_procs {
            // Joining is best effort: without it the tree is still our process group.
            // SAFETY: writes one byte from a static buffer to an fd the parent keeps open.
            let _ = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        }
        self.reset_oom_score();
        if let Some((uid, gid, groups)) = &self.user {
            // Raw syscalls: the child has a single thread, and libc wrappers
            // may try to synchronise credentials with threads that are gone.
            // SAFETY: `groups` is a live Vec prepared before fork; the kernel reads len entries.
            let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain integer arguments.
            if unsafe { libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain integer arguments.
            if unsafe { libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The agent runs at -1000 (never OOM-killed); its children must not inherit that.
    fn reset_oom_score(&self) {
        // SAFETY: open/write/close on a static NUL-terminated path and a static buffer.
        unsafe {
            let fd = libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
    }
}

/// The command for `spec`, with piped stdout/stderr (and stdin when asked).
/// `cgroup_procs` must stay open until the spawn returned.
pub(super) fn command(spec: &ExecSpec, cgroup_procs: Option<&File>) -> Command {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let creds = &spec.credentials;
    let setup = ChildSetup {
        cgroup_procs: cgroup_procs.map(AsRawFd::as_raw_fd),
        user: spec
            .switch_user
            .then(|| (creds.uid, creds.gid, creds.groups.clone())),
    };
    // SAFETY: `ChildSetup::run` only makes async-signal-safe raw syscalls on
    // data owned by the closure (see its doc), as required after fork.
    unsafe {
        cmd.pre_exec(move || setup.run());
    }
    cmd
}

/// Sends `signal` to one process. Errors (already gone) are ignored.
pub(super) fn signal_process(pid: i32, signal: i32) {
    // SAFETY: kill(2) with integer arguments; pid > 0 was checked by the caller.
    let _ = unsafe { libc::kill(pid, signal) };
}

/// Sends `signal` to every process of the exec: its cgroup when it has one
/// and its process group (whose id is the main pid, thanks to `setsid`).
pub(super) fn signal_tree(pid: i32, cgroup: Option<&ExecCgroup>, signal: i32) {
    if let Some(cgroup) = cgroup {
        let killed = signal == libc::SIGKILL && cgroup.kill_all().is_ok();
        if !killed {
            for member in cgroup.pids() {
                if member > 0 {
                    signal_process(member, signal);
                }
            }
        }
    }
    // SAFETY: killpg(2) with integer arguments.
    let _ = unsafe { libc::killpg(pid, signal) };
}
