//! The child side of an exec: spawning with `clone(CLONE_VM | CLONE_VFORK)`
//! (the way `posix_spawn` does it) and the child's setup before `execve`
//! (default signal dispositions, own session, own cgroup, OOM score, stdio
//! or a pseudo-terminal, working directory, resource limits, user switch),
//! and signal delivery to the process or its whole tree.
//!
//! `fork` of the multi-threaded agent copies its page tables and leaves
//! copy-on-write faults behind; under TCG that cost milliseconds per exec.
//! The vfork-style child instead borrows the agent's memory and stack-less
//! state until `execve`, while the spawning thread waits.

use std::ffi::{c_char, c_int, c_void, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use arrakis_protocol::TtySize;

use super::spec::ExecSpec;
use crate::cgroup::ExecCgroup;

/// Stack of the vfork-style child: it only makes raw syscalls.
const CHILD_STACK: usize = 64 * 1024;
/// Highest signal number whose disposition the child resets.
const MAX_SIGNAL: c_int = 64;
const OOM_SCORE_ADJ: &std::ffi::CStr = c"/proc/self/oom_score_adj";
const DEV_NULL: &std::ffi::CStr = c"/dev/null";
const PTMX: &std::ffi::CStr = c"/dev/ptmx";

/// The parent's ends of a spawned child's stdio.
#[derive(Debug)]
pub(super) enum ChildIo {
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The master of the child's terminal (non-blocking), for both directions.
    Pty { master: OwnedFd },
}

/// The step of the child's set-up that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// In the agent, before the child existed (pipes, terminal, clone).
    Prepare,
    Session,
    Stdio,
    Terminal,
    Cwd,
    /// The limit at this index of the spec's limits.
    Limit(usize),
    User,
    Exec,
}

impl Step {
    /// Numbers stored by the child (it cannot allocate).
    const LIMITS: u32 = 100;

    fn code(self) -> u32 {
        match self {
            Step::Prepare => 0,
            Step::Session => 1,
            Step::Stdio => 2,
            Step::Terminal => 3,
            Step::Cwd => 4,
            Step::User => 5,
            Step::Exec => 6,
            Step::Limit(index) => {
                Step::LIMITS.saturating_add(u32::try_from(index).unwrap_or(u32::MAX))
            }
        }
    }

    fn from_code(code: u32) -> Step {
        match code {
            1 => Step::Session,
            2 => Step::Stdio,
            3 => Step::Terminal,
            4 => Step::Cwd,
            5 => Step::User,
            6 => Step::Exec,
            n if n >= Step::LIMITS => Step::Limit((n - Step::LIMITS) as usize),
            _ => Step::Prepare,
        }
    }
}

/// A spawn that failed, and where.
#[derive(Debug)]
pub(super) struct SpawnError {
    pub step: Step,
    pub source: io::Error,
}

impl From<io::Error> for SpawnError {
    fn from(source: io::Error) -> Self {
        SpawnError {
            step: Step::Prepare,
            source,
        }
    }
}

/// Everything the child needs, prepared by the parent. The child runs in the
/// parent's memory while the spawning thread waits (`CLONE_VFORK`), so it
/// only reads this and makes raw syscalls: no allocation, no locks, no panics.
struct Plan {
    /// Paths to try with `execve`, in order (the `PATH` lookup is done here).
    programs: Vec<CString>,
    /// Null-terminated pointers into `_strings`.
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    _strings: Vec<CString>,
    cwd: CString,
    /// The child's ends for fds 0, 1 and 2 (all above 2, close-on-exec).
    stdio: [OwnedFd; 3],
    /// `cgroup.procs` of the exec's cgroup (close-on-exec).
    cgroup_procs: Option<RawFd>,
    /// Whether fd 0 becomes the controlling terminal (after `setsid`).
    controlling_tty: bool,
    /// (`RLIMIT_*`, [soft, hard]) to set, in order.
    limits: Vec<(c_int, [u64; 2])>,
    /// (uid, gid, supplementary groups) to switch to.
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// errno of the step that failed, written by the child before it exits.
    error: AtomicI32,
    /// The step the child is at ([`Step::code`]).
    step: AtomicU32,
}

/// Spawns `spec` with piped stdout/stderr (and stdin when asked), or on a
/// new terminal, in the cgroup whose `cgroup.procs` is given. Blocks until
/// the child called `execve`; a failure before or in `execve` is returned as
/// the error (the failed child is reaped here). Call with the supervisor's
/// registry locked.
pub(super) fn spawn(
    spec: &ExecSpec,
    cgroup_procs: Option<&File>,
) -> Result<(u32, ChildIo), SpawnError> {
    let (io, stdio) = match spec.tty {
        Some(size) => {
            let (master, slave) = open_pty(size)?;
            let stdio = [
                above_stdio(slave.try_clone()?)?,
                above_stdio(slave.try_clone()?)?,
                above_stdio(slave)?,
            ];
            (ChildIo::Pty { master }, stdio)
        }
        None => {
            let (stdin, child_stdin) = if spec.stdin {
                let (read, write) = pipe()?;
                (Some(write), above_stdio(read)?)
            } else {
                (None, above_stdio(open_dev_null()?)?)
            };
            let (stdout, child_stdout) = pipe()?;
            let (stderr, child_stderr) = pipe()?;
            let io = ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            };
            let stdio = [
                child_stdin,
                above_stdio(child_stdout)?,
                above_stdio(child_stderr)?,
            ];
            (io, stdio)
        }
    };
    let plan = Plan::new(spec, stdio, cgroup_procs.map(AsRawFd::as_raw_fd))?;
    let pid = plan.clone_child()?;
    Ok((pid, io))
}

impl Plan {
    fn new(spec: &ExecSpec, stdio: [OwnedFd; 3], cgroup_procs: Option<RawFd>) -> io::Result<Plan> {
        let programs = candidates(spec)?;
        let args: Vec<CString> = std::iter::once(&spec.program)
            .chain(&spec.args)
            .map(|a| cstring(a.as_bytes().to_vec()))
            .collect::<io::Result<_>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").into_bytes()))
            .collect::<io::Result<_>>()?;
        let pointers = |strings: &[CString]| -> Vec<*const c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv, envp) = (pointers(&args), pointers(&env));
        let creds = &spec.credentials;
        Ok(Plan {
            programs,
            argv,
            envp,
            _strings: args.into_iter().chain(env).collect(),
            cwd: cstring(spec.cwd.as_os_str().as_encoded_bytes().to_vec())?,
            stdio,
            cgroup_procs,
            controlling_tty: spec.tty.is_some(),
            limits: spec
                .limits
                .iter()
                .map(|l| (l.resource, [l.soft, l.hard]))
                .collect(),
            user: spec
                .switch_user
                .then(|| (creds.uid, creds.gid, creds.groups.clone())),
            error: AtomicI32::new(0),
            step: AtomicU32::new(0),
        })
    }

    /// Starts the child and waits until it exec'd or failed.
    fn clone_child(&self) -> Result<u32, SpawnError> {
        let mut stack = vec![0u8; CHILD_STACK];
        // SAFETY: one past the end of the allocation, rounded down to the
        // 16-byte alignment the ABI wants; the stack grows down from there.
        let top = unsafe { stack.as_mut_ptr().add(CHILD_STACK) };
        let top = top.wrapping_sub(top as usize % 16).cast::<c_void>();
        // Block every signal so no handler of the agent runs in the child
        // (it shares our memory) before it reset the dispositions.
        // SAFETY: sigset_t is plain data, filled by sigfillset before use.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live, writable sigset_t values.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        let arg = std::ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child
        // calls execve or exits, so `self` and `stack` outlive every use the
        // child makes of them; `child_main` only makes raw syscalls (see Plan).
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                arg,
            )
        };
        let clone_error = io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        drop(stack);
        if pid < 0 {
            return Err(clone_error.into());
        }
        match self.error.load(Ordering::Acquire) {
            0 => Ok(pid.unsigned_abs()),
            errno => {
                // The child has exited: reap it (the caller holds the
                // registry lock, so the reaper cannot have taken it).
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                Err(SpawnError {
                    step: Step::from_code(self.step.load(Ordering::Acquire)),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }

    fn at(&self, step: Step) {
        self.step.store(step.code(), Ordering::Release);
    }

    /// The child's work; returns the errno of the failed step (on success
    /// `execve` does not return).
    fn run_child(&self) -> c_int {
        reset_signals();
        self.at(Step::Session);
        // SAFETY: setsid takes no arguments; the child is not a group leader.
        if unsafe { libc::setsid() } < 0 {
            return errno();
        }
        if let Some(fd) = self.cgroup_procs {
            // Joining is best effort: without it the tree is still our process group.
            // SAFETY: writes one byte from a static buffer to an fd the parent keeps open.
            let _ = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        }
        reset_oom_score();
        self.at(Step::Stdio);
        for (target, fd) in (0..).zip(&self.stdio) {
            // SAFETY: dup2 of an open fd (above 2) onto 0..=2; the copy is
            // not close-on-exec.
            if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                return errno();
            }
        }
        self.at(Step::Terminal);
        // SAFETY: TIOCSCTTY on fd 0 (the terminal's slave) of a session
        // leader without a controlling terminal; the argument is an integer.
        if self.controlling_tty && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return errno();
        }
        self.at(Step::Cwd);
        // SAFETY: a NUL-terminated path owned by the plan.
        if unsafe { libc::chdir(self.cwd.as_ptr()) } < 0 {
            return errno();
        }
        // Before the user switch: raising a hard limit needs root.
        for (index, (resource, limit)) in self.limits.iter().enumerate() {
            self.at(Step::Limit(index));
            // SAFETY: prlimit64 on this process (pid 0) with a pointer to
            // two u64 (the kernel's struct rlimit64) owned by the plan.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *resource,
                    limit.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                )
            };
            if rc < 0 {
                return errno();
            }
        }
        self.at(Step::User);
        if let Err(e) = self.switch_user() {
            return e;
        }
        let empty: u64 = 0;
        // SAFETY: unblocks every signal (the kernel's 8-byte mask) for the new program.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &empty,
                std::ptr::null_mut::<u64>(),
                8,
            )
        };
        self.at(Step::Exec);
        self.exec()
    }

    fn switch_user(&self) -> Result<(), c_int> {
        let Some((uid, gid, groups)) = &self.user else {
            return Ok(());
        };
        // Raw syscalls: libc wrappers would try to synchronise credentials
        // with the agent's other threads.
        // SAFETY: `groups` is a live Vec of the plan; the kernel reads len entries.
        let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
        if rc < 0 {
            return Err(errno());
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) } < 0 {
            return Err(errno());
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) } < 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Tries each candidate like `execvp`: EACCES wins over a later ENOENT,
    /// any other error stops the search.
    fn exec(&self) -> c_int {
        let mut result = libc::ENOENT;
        for program in &self.programs {
            // SAFETY: NUL-terminated path and null-terminated pointer arrays
            // into strings the plan owns.
            unsafe { libc::execve(program.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => result = libc::EACCES,
                other => return other,
            }
        }
        result
    }
}

extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&Plan` given to clone, alive while the parent waits.
    let plan = unsafe { &*arg.cast_const().cast::<Plan>() };
    let error = plan.run_child();
    plan.error.store(error.max(1), Ordering::Release);
    // SAFETY: _exit ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(127) }
}

/// The paths to try: the program itself when it has a '/', else each
/// directory of the child's `PATH` (an empty entry is the working directory).
fn candidates(spec: &ExecSpec) -> io::Result<Vec<CString>> {
    if spec.program.contains('/') {
        return Ok(vec![cstring(spec.program.clone().into_bytes())?]);
    }
    let path = spec
        .env
        .get("PATH")
        .map_or(super::DEFAULT_PATH, String::as_str);
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            cstring(format!("{dir}/{}", spec.program).into_bytes())
        })
        .collect()
}

fn cstring(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

fn errno() -> c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// Sets every signal to its default disposition (the agent ignores SIGPIPE,
/// and no handler of the agent may run in the child), with raw syscalls.
fn reset_signals() {
    // The kernel's struct sigaction, all zero: SIG_DFL, no flags, empty mask.
    let default = [0u64; 4];
    for signal in 1..=MAX_SIGNAL {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: a valid, zeroed kernel sigaction and no old-action pointer.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    default.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8,
                )
            };
        }
    }
}

/// The agent runs at -1000 (never OOM-killed); its children must not inherit that.
fn reset_oom_score() {
    // SAFETY: open/write/close on a static NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A new pseudo-terminal of `size`: (master, non-blocking; slave), both
/// close-on-exec, the slave not made anyone's controlling terminal here.
fn open_pty(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a static NUL-terminated path.
    let fd = unsafe { libc::open(PTMX.as_ptr(), flags | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a live local.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes the open flags as an integer and returns a new fd.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    set_window_size(&master, size)?;
    Ok((master, slave))
}

/// `TIOCSWINSZ` on a terminal (either end): the foreground process group
/// gets `SIGWINCH` when the size changed.
pub(super) fn set_window_size(terminal: &impl AsRawFd, size: TtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_dev_null() -> io::Result<OwnedFd> {
    // SAFETY: a static NUL-terminated path.
    let fd = unsafe { libc::open(DEV_NULL.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fd` moved above 0..=2 if it is there, so the child's dup2 onto 0..=2
/// cannot overwrite another of its stdio fds.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: duplicates an open fd; the new one is owned by the result.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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
