"""A private containerd for the shim tests, in namespaces of its own.

`Containerd(version)` starts containerd 1.6 (Debian's, /usr/bin) or 2.2 (built by
scripts/install-containerd into $ARRAKIS_HOME/containerd/current) so that nothing
it does reaches the machine:

- a network namespace made for it (`ip netns add arrakis-ctd-<pid>-<n>`, lo up);
- a private mount namespace (`unshare --mount --propagation private`), held open
  by a `sleep` process, where `/run` and, if `/var/lib/cni` is missing,
  `/var/lib` are "shadowed": a tmpfs goes over the directory and each of its
  entries is bound back, so the machine's files stay visible while new entries
  (`/run/containerd`, `/run/netns/cni-*`, `/run/xtables.lock`, `/var/lib/cni`)
  exist only in the namespace and nothing is created on the host. A tmpfs goes
  over `/run/containerd`, `/run/netns` and `/var/lib/cni`: containerd, ctr,
  runc, libcni and host-local hard-wire those paths;
- a config whose root, state, sockets and opt dir are under a temporary
  directory T (`/tmp/actd-*`), CRI disabled unless `cri=True` (then a runtime
  handler `arrakis` maps to the runtime under test, the sandbox image is
  oci_image.PAUSE_NAME and CNI reads T/cni-conf with the installed plugins);
- containerd's environment: `PATH` with the shim binary's directory first,
  `TMPDIR`/`XDG_RUNTIME_DIR` = T/tmp (checkpoint dirs), a private
  `ARRAKIS_HOME` = T/h with the machine's kernel and initramfs linked in, and
  `ARRAKIS_LOG=debug`. The shim inherits all of it.

Everything a test runs (ctr, nerdctl, crictl, curl) goes through `run()`, which
enters both namespaces with `nsenter` and always has a timeout. `close()` kills
and deletes every task and container, stops containerd and `ctr events`, kills
whatever process is left in the namespaces or names T on its command line
(shims, QEMU), checks that nothing is mounted under T, and removes T and the
netns. The runtime under test is `io.containerd.arrakis.v2` unless
`ARRAKIS_CONTAINERD_RUNTIME` names another one (`io.containerd.runc.v2` proves
the harness).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ARRAKIS_RUNTIME = "io.containerd.arrakis.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
VERSIONS = ("1.6", "2.2")
DEFAULT_NAMESPACE = "arrakis-test"
CRI_NAMESPACE = "k8s.io"
CRI_HANDLER = "arrakis"

# A container start may boot a VM under TCG on a loaded machine.
START_TIMEOUT = 300
# Any other ctr call.
CALL_TIMEOUT = 60

STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- what is under test -----------------------------------------------------


def runtime() -> str:
    """The runtime the tests run containers with."""
    return os.environ.get("ARRAKIS_CONTAINERD_RUNTIME") or ARRAKIS_RUNTIME


def is_runc() -> bool:
    return "runc" in runtime()


def shim_binary() -> Path:
    """`ARRAKIS_SHIM_BIN` or target/release/containerd-shim-arrakis-v2."""
    return Path(os.environ.get("ARRAKIS_SHIM_BIN") or REPO / "target/release/containerd-shim-arrakis-v2")


def real_arrakis_home() -> Path:
    return Path(os.environ.get("ARRAKIS_HOME") or Path.home() / ".cache/arrakis")


def tools_dir() -> Path:
    """containerd 2.2, ctr, nerdctl, crictl (bin/) and the CNI plugins (cni/bin/)."""
    return real_arrakis_home() / "containerd" / "current"


def binaries(version: str) -> dict[str, Path]:
    tools = tools_dir()
    if version == "1.6":
        daemon, ctr = Path("/usr/bin/containerd"), Path("/usr/bin/ctr")
    elif version == "2.2":
        daemon, ctr = tools / "bin/containerd", tools / "bin/ctr"
    else:
        raise ValueError(f"containerd version {version!r}: expected one of {VERSIONS}")
    return {
        "containerd": daemon,
        "ctr": ctr,
        "nerdctl": tools / "bin/nerdctl",
        "crictl": tools / "bin/crictl",
        "cni": tools / "cni/bin",
    }


def preflight(version: str) -> list[str]:
    """What is missing to run the tests on `version` (empty when all is there)."""
    missing = []
    for name, path in binaries(version).items():
        if not path.exists():
            missing.append(f"{name} ({path}): run scripts/install-containerd")
    for tool in ("nsenter", "unshare", "ip", "mount", "umount"):
        if not shutil.which(tool):
            missing.append(f"{tool} (util-linux / iproute2)")
    if os.geteuid() != 0:
        missing.append("root (namespaces, mounts and containerd need it)")
    if not is_runc():
        if not os.access(shim_binary(), os.X_OK):
            missing.append(
                f"the shim {shim_binary()}: build it with `cargo build --release -p arrakis-shim` "
                "(scripts/test-python does when it is missing) or set ARRAKIS_SHIM_BIN"
            )
        for name in ("vmlinuz", "initramfs.cpio"):
            if not (real_arrakis_home() / "artifacts" / name).exists():
                missing.append(f"{real_arrakis_home() / 'artifacts' / name}: run scripts/setup")
    return missing


def missing_message(version: str) -> str | None:
    missing = preflight(version)
    if not missing:
        return None
    return (
        f"containerd {version} tests with runtime {runtime()} cannot run; missing:\n  - "
        + "\n  - ".join(missing)
    )


def require(version: str) -> None:
    """Fails (never skips) the calling test when something is missing, so that
    CI cannot pass without having run the tests."""
    missing = preflight(version)
    if missing:
        pytest.fail(
            f"containerd {version} tests with runtime {runtime()} cannot run; missing:\n  - "
            + "\n  - ".join(missing),
            pytrace=False,
        )


# --- small helpers ----------------------------------------------------------


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def returncode(self) -> int:
        return self.rc

    def check(self, rc: int = 0) -> "Result":
        assert self.rc == rc, f"expected rc {rc}: {self}"
        return self

    def __str__(self) -> str:
        def clip(s: str) -> str:
            return s if len(s) < 4000 else s[:2000] + "\n...\n" + s[-2000:]

        return (
            f"`{shlex.join(self.args)}` -> rc {self.rc} in {self.duration:.1f} s\n"
            f"--- stdout\n{clip(self.stdout)}--- stderr\n{clip(self.stderr)}"
        )


@dataclass
class Event:
    """One line of `ctr events`: `<timestamp> <namespace> <topic> <json>`."""

    index: int
    namespace: str
    topic: str
    data: dict
    line: str
    received: float = field(default_factory=time.monotonic)

    def matches(self, topic: str | None = None, namespace: str | None = None, **fields) -> bool:
        if topic is not None and self.topic != topic:
            return False
        if namespace is not None and self.namespace != namespace:
            return False
        for key, want in fields.items():
            # Protobuf's JSON leaves zero values out (exit_status 0).
            have = self.data.get(key, 0 if key in ("exit_status", "pid") else None)
            if have != want:
                return False
        return True


def parse_event(index: int, line: str) -> Event | None:
    tokens = line.rstrip("\n").split(" ")
    for i, token in enumerate(tokens):
        if token.startswith("/") and i > 0:
            rest = " ".join(tokens[i + 1 :]).strip()
            try:
                data = json.loads(rest) if rest else {}
            except ValueError:
                data = {"_raw": rest}
            if not isinstance(data, dict):
                data = {"_raw": data}
            return Event(index, tokens[i - 1], token, data, line.rstrip("\n"))
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ns_inode(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under `path` in the caller's mount namespace."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def host_state(path: str) -> tuple[bool, list[str]]:
    """Whether `path` exists on the host and what it holds (for the
    "untouched" checks)."""
    p = Path(path)
    if not p.exists():
        return (False, [])
    try:
        return (True, sorted(os.listdir(p)))
    except OSError:
        return (True, ["<unreadable>"])


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# --- ctr events -------------------------------------------------------------


class EventRecorder:
    """`ctr events` in the background; every parsed line is kept."""

    def __init__(self, owner: "Containerd"):
        self.owner = owner
        self.process: subprocess.Popen | None = None
        self.log_path = owner.tmp / "events.log"
        self._events: list[Event] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with open(self.owner.tmp / "events.stderr", "wb") as stderr:
            self.process = self.owner.popen(
                [str(self.owner.bin["ctr"]), "-a", str(self.owner.sock), "events"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self._thread = threading.Thread(target=self._read, name="ctr-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process and self.process.stdout
        with open(self.log_path, "a") as log:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                log.write(line)
                log.flush()
                with self._lock:
                    event = parse_event(len(self._events), line)
                    if event:
                        self._events.append(event)
                        self._lock.notify_all()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._thread:
            self._thread.join(timeout=10)

    def mark(self) -> int:
        """A position: pass it as `since` to look only at later events."""
        with self._lock:
            return len(self._events)

    def events(self, topic: str | None = None, since: int = 0, **fields) -> list[Event]:
        """Events from position `since` on whose topic and JSON fields match
        (e.g. `events("/tasks/exit", container_id="t1")`)."""
        with self._lock:
            return [e for e in self._events[since:] if e.matches(topic, **fields)]

    def topics(self, since: int = 0, **fields) -> list[str]:
        return [e.topic for e in self.events(None, since, **fields)]

    def wait_for(self, topic: str, timeout: float = 30, since: int = 0, **fields) -> Event:
        """The first matching event, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for e in self._events[since:]:
                    if e.matches(topic, **fields):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = "\n".join(e.line for e in self._events[since:][-30:])
                    raise AssertionError(
                        f"no event {topic} {fields} within {timeout} s; events since #{since}:\n{recent}"
                    )
                self._lock.wait(min(left, 1.0))


# --- the daemon -------------------------------------------------------------

_counter = itertools.count(1)
_active: list["Containerd"] = []
_kept: list[str] = []


class Containerd:
    """A private containerd of `version` ("1.6" or "2.2"). Use as a context
    manager, or call `start()` and `close()`.

    `cri=True` enables the CRI plugin with the runtime handler `arrakis`
    (mapped to the runtime under test). `shim_env` adds to the environment
    containerd (and so the shim) gets; `extra_config` is appended to its
    config.toml. `namespace` is the containerd namespace `ctr()` uses."""

    def __init__(
        self,
        version: str = "1.6",
        *,
        cri: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
        runtime_name: str | None = None,
        shim_env: dict[str, str] | None = None,
        extra_config: str = "",
        name: str | None = None,
    ):
        self.version = version
        self.cri = cri
        self.namespace = namespace
        self.runtime = runtime_name or runtime()
        self.shim_env = dict(shim_env or {})
        self.extra_config = extra_config
        self.name = name or f"ctd{version.replace('.', '')}"
        self.bin = binaries(version)
        self.netns = f"arrakis-ctd-{os.getpid()}-{next(_counter)}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"actd{version.replace('.', '')}-", dir="/tmp"))
        self.sock = self.tmp / "containerd.sock"
        self.home = self.tmp / "h"
        self.log_path = self.tmp / "containerd.log"
        self.cni_conf = self.tmp / "cni-conf"
        self.holder: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.events = EventRecorder(self)
        self.problems: list[str] = []
        # Set by the tests' fixture when its first container fails.
        self.canary_failure: str | None = None
        self.reported_log_size = -1
        self.keep = False
        self.closed = False
        self._netns_made = False
        self._host_before = {p: host_state(p) for p in ("/run/containerd", "/var/lib/cni")}
        self._mnt_ns: str | None = None

    # -- life cycle --

    def __enter__(self) -> "Containerd":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.keep = True
        self.close()

    def start(self) -> "Containerd":
        _active.append(self)
        try:
            self._prepare_dirs()
            self._make_namespaces()
            self._start_daemon()
            self.events.start()
        except BaseException as e:
            self.keep = True
            log = self.log_tail(60)
            self.close()
            if isinstance(e, Exception):
                raise RuntimeError(
                    f"starting containerd {self.version} failed: {e}\n"
                    f"teardown problems: {self.problems}\ncontainerd log ({self.log_path}):\n{log}"
                ) from None
            raise
        return self

    def _prepare_dirs(self) -> None:
        for d in ("root", "state", "tmp", "opt", "ns", "h/artifacts", "cni-conf", "nerdctl", "pods"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmp / "tmp", 0o1777)
        real = real_arrakis_home() / "artifacts"
        for name in ("vmlinuz", "initramfs.cpio"):
            if (real / name).exists():
                os.symlink((real / name).resolve(), self.home / "artifacts" / name)
        (self.tmp / "nerdctl.toml").write_text("")
        endpoint = f"unix://{self.sock}"
        (self.tmp / "crictl.yaml").write_text(
            f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: {START_TIMEOUT}\n"
        )
        (self.tmp / "config.toml").write_text(self.config_toml())
        if self.cri:
            self.write_cni_conf()

    def config_toml(self) -> str:
        t = self.tmp
        q = json.dumps  # TOML basic strings are JSON strings here
        lines = []
        if self.version == "1.6":
            disabled = [] if self.cri else ["io.containerd.grpc.v1.cri"]
            lines += ["version = 2"]
        else:
            disabled = ["io.containerd.nri.v1.nri"]
            if not self.cri:
                disabled += [
                    "io.containerd.grpc.v1.cri",
                    "io.containerd.cri.v1.images",
                    "io.containerd.cri.v1.runtime",
                    "io.containerd.podsandbox.controller.v1.podsandbox",
                ]
            lines += ["version = 3"]
        lines += [
            f"root = {q(str(t / 'root'))}",
            f"state = {q(str(t / 'state'))}",
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]",
            f"  address = {q(str(self.sock))}",
            "[ttrpc]",
            f"  address = {q(str(self.sock) + '.ttrpc')}",
            "[debug]",
            f"  address = {q(str(t / 'debug.sock'))}",
            '  level = "debug"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(str(t / 'opt'))}",
        ]
        if self.cri:
            lines += self._cri_toml()
        return "\n".join(lines) + "\n" + self.extra_config

    def _cri_toml(self) -> list[str]:
        from oci_image import PAUSE_NAME

        q = json.dumps
        cni_bin = str(self.bin["cni"])
        if self.version == "1.6":
            p = '[plugins."io.containerd.grpc.v1.cri"'
            return [
                f"{p}]",
                f"  sandbox_image = {q(PAUSE_NAME)}",
                "  disable_apparmor = true",
                "  restrict_oom_score_adj = true",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                f"{p}.cni]",
                f"  bin_dir = {q(cni_bin)}",
                f"  conf_dir = {q(str(self.cni_conf))}",
                f"{p}.containerd.runtimes.runc]",
                f"  runtime_type = {q(RUNC_RUNTIME)}",
                f"{p}.containerd.runtimes.{CRI_HANDLER}]",
                f"  runtime_type = {q(self.runtime)}",
            ]
        rt = '[plugins."io.containerd.cri.v1.runtime"'
        return [
            '[plugins."io.containerd.cri.v1.images".pinned_images]',
            f"  sandbox = {q(PAUSE_NAME)}",
            f"{rt}]",
            "  disable_apparmor = true",
            # CRI gives sandboxes oom_score_adj -998; lowering it needs
            # CAP_SYS_RESOURCE, which these machines' bounding set lacks
            # (runc: "failed to update /proc/self/oom_score_adj").
            "  restrict_oom_score_adj = true",
            f"{rt}.cni]",
            f"  bin_dirs = [{q(cni_bin)}]",
            f"  conf_dir = {q(str(self.cni_conf))}",
            f"{rt}.containerd.runtimes.runc]",
            f"  runtime_type = {q(RUNC_RUNTIME)}",
            f"{rt}.containerd.runtimes.{CRI_HANDLER}]",
            f"  runtime_type = {q(self.runtime)}",
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
        ]

    def write_cni_conf(self, subnet: str = "10.88.61.0/24") -> Path:
        """A bridge network for CRI pods (plus loopback, which CRI adds)."""
        conf = {
            "cniVersion": "1.0.0",
            "name": "arrakis-cri",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "arrcri0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        path = self.cni_conf / "10-arrakis-cri.conflist"
        path.write_text(json.dumps(conf, indent=2))
        return path

    def _setup_script(self) -> str:
        """Run inside the new mount namespace (see the module docstring)."""
        t = self.tmp
        cmds = ["set -eu", f"mount -t tmpfs -o size=1m,mode=0700 arrakis-ctd {shlex.quote(str(t / 'ns'))}"]

        def shadow(directory: str, skip: set[str]) -> None:
            orig = t / "ns" / ("orig" + directory.replace("/", "_"))
            st = os.stat(directory)
            cmds.append(f"mkdir {shlex.quote(str(orig))}")
            cmds.append(f"mount --rbind {shlex.quote(directory)} {shlex.quote(str(orig))}")
            cmds.append(
                f"mount -t tmpfs -o mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid} "
                f"arrakis-ctd {shlex.quote(directory)}"
            )
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if entry.name in skip:
                    continue
                dst = shlex.quote(f"{directory}/{entry.name}")
                src = shlex.quote(str(orig / entry.name))
                # An entry that went away since the listing is left out.
                skipped = f"echo skipped {dst} >&2"
                if entry.is_symlink():
                    cmds.append(f"ln -s {shlex.quote(os.readlink(entry.path))} {dst}")
                elif entry.is_dir(follow_symlinks=False):
                    cmds.append(f"mkdir {dst}")
                    cmds.append(f"mount --rbind {src} {dst} || {{ rmdir {dst}; {skipped}; }}")
                else:
                    cmds.append(f": > {dst}")
                    cmds.append(f"mount --bind {src} {dst} || {{ rm -f {dst}; {skipped}; }}")

        # /run/mount holds util-linux's utab: it stays private too.
        shadow("/run", {"containerd", "netns", "mount", "xtables.lock"})
        cmds.append("mkdir -p /run/containerd /run/netns")
        cmds.append("mount -t tmpfs -o size=64m,mode=0711 arrakis-ctd /run/containerd")
        cmds.append("mount -t tmpfs -o size=1m,mode=0755 arrakis-ctd /run/netns")
        if not os.path.isdir("/var/lib/cni"):
            shadow("/var/lib", {"cni"})
            cmds.append("mkdir /var/lib/cni")
        cmds.append("mount -t tmpfs -o size=16m,mode=0755 arrakis-ctd /var/lib/cni")
        cmds.append("ip link set lo up")
        cmds.append("echo ready")
        cmds.append("exec sleep infinity")
        return "\n".join(cmds) + "\n"

    def _make_namespaces(self) -> None:
        r = subprocess.run(["ip", "netns", "add", self.netns], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip netns add {self.netns} failed: {r.stderr}")
        self._netns_made = True
        script = self.tmp / "ns-setup.sh"
        script.write_text(self._setup_script())
        self.holder = subprocess.Popen(
            [
                "nsenter", f"--net=/run/netns/{self.netns}", "--",
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", str(script),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=(setup_log := open(self.tmp / "ns-setup.log", "wb")),
            start_new_session=True,
        )
        setup_log.close()
        line = self.holder.stdout.readline().decode().strip() if self.holder.stdout else ""
        if line != "ready":
            self.holder.wait(timeout=10)
            raise RuntimeError(
                f"the namespace set-up failed (status {self.holder.returncode}): "
                + (self.tmp / "ns-setup.log").read_text(errors="replace")
            )
        self._mnt_ns = _ns_inode(self.holder.pid, "mnt")
        assert self._mnt_ns and self._mnt_ns != _ns_inode("self", "mnt"), "the holder has no mount namespace of its own"

    @property
    def holder_pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def nsenter(self, wd: str | Path | None = None) -> list[str]:
        """The command prefix that enters the namespaces."""
        p = self.holder_pid
        return ["nsenter", f"--mount=/proc/{p}/ns/mnt", f"--net=/proc/{p}/ns/net", f"--wd={wd or self.tmp}", "--"]

    def env(self, daemon: bool = False) -> dict[str, str]:
        """The environment of containerd (`daemon`, inherited by the shims)
        or of the tools run with `run()`. Other ARRAKIS_* variables of the
        test run (e.g. ARRAKIS_ACCEL) pass through to the shim."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONTAINERD_", "NERDCTL_", "CONTAINER_", "CNI_"))
            and k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "ARRAKIS_STATE_DIR", "ARRAKIS_LOG_FILE")
        }
        # The shim first; containerd 2.2 must find its own runc shim before
        # Debian's 1.6 one in /usr/bin.
        path = [str(shim_binary().parent)]
        if self.version == "2.2" or not daemon:
            path.append(str(tools_dir() / "bin"))
        path.append(STANDARD_PATH)
        env.update(
            PATH=":".join(path),
            TMPDIR=str(self.tmp / "tmp"),
            XDG_RUNTIME_DIR=str(self.tmp / "tmp"),
            ARRAKIS_HOME=str(self.home),
            ARRAKIS_LOG="debug",
            NO_COLOR="1",
            NERDCTL_TOML=str(self.tmp / "nerdctl.toml"),
        )
        if daemon:
            env.update(self.shim_env)
        return env

    def _start_daemon(self) -> None:
        with open(self.log_path, "ab") as log:
            self.daemon = subprocess.Popen(
                self.nsenter() + [str(self.bin["containerd"]), "--config", str(self.tmp / "config.toml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(daemon=True),
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            r = self.ctr("version", timeout=10)
            if r.rc == 0 and "Server:" in r.stdout:
                break
            if self.daemon.poll() is not None:
                raise RuntimeError(f"containerd exited with status {self.daemon.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer `ctr version` in 30 s: {r}")
            time.sleep(0.2)

    # -- running things inside --

    def run(
        self,
        args: list[str],
        input: str | bytes | None = None,
        timeout: float = CALL_TIMEOUT,
        env: dict[str, str] | None = None,
        wd: str | Path | None = None,
        stdin_until=None,
    ) -> Result:
        """Runs `args` inside the namespaces; never raises on a non-zero exit.
        On timeout the process is killed and an AssertionError carries what it
        printed.

        `input` is written to its stdin, which is then closed, at once or, with
        `stdin_until` (a callable polled every 0.1 s), only once that returns
        true: `ctr run` and `ctr task exec` wire their CloseIO to stdin's EOF
        only after Create (Exec) returned, so an EOF that comes earlier is
        lost and the process never sees it (a race in ctr itself)."""
        full = self.nsenter(wd) + [str(a) for a in args]
        e = self.env()
        e.update(env or {})
        started = time.monotonic()
        data = input.encode() if isinstance(input, str) else input
        held = stdin_until is not None and data is not None
        if held:
            # Our own pipe: communicate() would close a PIPE stdin at once.
            stdin_read, stdin_write = os.pipe()
            stdin = stdin_read
        else:
            stdin = subprocess.PIPE if data is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            full,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=e,
            start_new_session=True,
        )
        if held:
            os.close(stdin_read)
            threading.Thread(
                target=_feed, args=(process, stdin_write, data, stdin_until, started + timeout), daemon=True
            ).start()
            data = None
        try:
            out, err = process.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            out, err = process.communicate()
            result = Result(list(map(str, args)), -9, out.decode(errors="replace"), err.decode(errors="replace"),
                            time.monotonic() - started)
            raise AssertionError(f"timed out after {timeout} s: {result}") from None
        return Result(list(map(str, args)), process.returncode, out.decode(errors="replace"),
                      err.decode(errors="replace"), time.monotonic() - started)

    def popen(self, args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """`subprocess.Popen` inside the namespaces (for ptys, background
        processes); the caller waits for it."""
        e = self.env()
        e.update(env or {})
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.nsenter() + [str(a) for a in args], env=e, **kwargs)

    def ctr_args(self, *args: str, namespace: str | None = None) -> list[str]:
        """The argv of `ctr -a <sock> -n <namespace> args...` (for `popen`)."""
        return [str(self.bin["ctr"]), "-a", str(self.sock), "-n", namespace or self.namespace, *args]

    def ctr(self, *args: str, namespace: str | None = None, input=None, timeout: float = CALL_TIMEOUT) -> Result:
        """`ctr -a <sock> -n <namespace> args...`."""
        return self.run(self.ctr_args(*args, namespace=namespace), input=input, timeout=timeout)

    def ctr_run(
        self,
        cid: str,
        *command: str,
        opts: tuple[str, ...] | list[str] = (),
        detach: bool = False,
        image: str | None = None,
        input=None,
        timeout: float = START_TIMEOUT,
    ) -> Result:
        """`ctr run [--rm|-d] --runtime <rt> [opts] IMAGE cid command...`
        (`--rm` unless `detach`). `input` goes to its stdin, closed once the
        task has started (see `run`)."""
        from oci_image import NAME

        mode = ["-d"] if detach else ["--rm"]
        mark = self.events.mark()
        return self.run(
            self.ctr_args("run", *mode, "--runtime", self.runtime, *opts, image or NAME, cid, *command),
            input=input,
            timeout=timeout,
            stdin_until=lambda: self.events.events("/tasks/start", since=mark, container_id=cid),
        )

    def exec(self, cid: str, exec_id: str, *command: str, opts=(), input=None,
             timeout: float = START_TIMEOUT) -> Result:
        """`ctr task exec --exec-id exec_id [opts] cid command...`; `input`
        goes to its stdin, closed once the exec has started."""
        mark = self.events.mark()
        return self.run(
            self.ctr_args("task", "exec", "--exec-id", exec_id, *opts, cid, *command),
            input=input,
            timeout=timeout,
            stdin_until=lambda: self.events.events("/tasks/exec-started", since=mark, container_id=cid,
                                                   exec_id=exec_id),
        )

    def nerdctl(self, *args: str, namespace: str | None = None, input=None, timeout: float = START_TIMEOUT) -> Result:
        """nerdctl on this daemon, its data root and CNI under T."""
        return self.run(
            [
                str(self.bin["nerdctl"]),
                "--address", str(self.sock),
                "--namespace", namespace or self.namespace,
                "--data-root", str(self.tmp / "nerdctl"),
                "--cni-path", str(self.bin["cni"]),
                "--cni-netconfpath", str(self.tmp / "nerdctl-cni"),
                *args,
            ],
            input=input,
            timeout=timeout,
        )

    def crictl(self, *args: str, input=None, timeout: float = START_TIMEOUT) -> Result:
        """crictl on this daemon's CRI socket (needs `cri=True`)."""
        return self.run(
            [
                str(self.bin["crictl"]),
                "--config", str(self.tmp / "crictl.yaml"),
                "--timeout", f"{int(timeout)}s",
                *args,
            ],
            input=input,
            timeout=timeout + 10,
        )

    def import_image(self, tar: str | Path, namespace: str | None = None) -> Result:
        """`ctr image import tar` (checked)."""
        return self.ctr("image", "import", str(tar), namespace=namespace, timeout=120).check()

    def tasks(self, namespace: str | None = None) -> dict[str, tuple[int, str]]:
        """`ctr task ls`: {task id: (pid, status)}."""
        r = self.ctr("task", "ls", namespace=namespace).check()
        out = {}
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = (int(parts[1]) if parts[1].isdigit() else 0, parts[2])
        return out

    def task_status(self, cid: str, namespace: str | None = None) -> str | None:
        return self.tasks(namespace).get(cid, (0, None))[1]

    def wait_status(self, cid: str, status: str, timeout: float = 30, namespace: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            have = self.task_status(cid, namespace)
            if have == status:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"task {cid} is {have}, not {status}, after {timeout} s")
            time.sleep(0.3)

    def containers(self, namespace: str | None = None) -> list[str]:
        """`ctr container ls -q`."""
        return self.ctr("container", "ls", "-q", namespace=namespace).check().stdout.split()

    def shim_pids(self, cid: str) -> list[int]:
        """The shim server processes of container `cid`."""
        return [
            p for p in self.processes()
            if "containerd-shim" in _cmdline(p) and f" -id {cid} " in _cmdline(p) + " "
            and " start" not in _cmdline(p) + " " and " delete" not in _cmdline(p) + " "
        ]

    def vm_pids(self, marker: str = "") -> list[int]:
        """QEMU processes of this daemon's shims (their command line names T)
        that also contain `marker`."""
        return [
            p for p in self.processes()
            if "qemu" in _cmdline(p).split(" ", 1)[0] and marker in _cmdline(p)
        ]

    def remove(self, cid: str, namespace: str | None = None) -> None:
        """SIGKILLs and deletes task `cid` and deletes its container; quiet
        when they are already gone."""
        ns = namespace
        if cid not in self.containers(ns):
            return
        if self.task_status(cid, ns) not in (None, "STOPPED"):
            self.ctr("task", "kill", "-s", "SIGKILL", "--all", cid, namespace=ns)
            try:
                self.wait_status(cid, "STOPPED", 30, ns)
            except AssertionError as e:
                self.problems.append(f"remove {cid}: {e}")
        if self.task_status(cid, ns) is not None:
            self.ctr("task", "delete", "-f", cid, namespace=ns, timeout=120)
        self.ctr("container", "delete", cid, namespace=ns, timeout=120)

    def image_digest(self, ref: str, namespace: str | None = None) -> str | None:
        """The target digest of image `ref` (`ctr image ls`)."""
        r = self.ctr("image", "ls", namespace=namespace).check()
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == ref:
                return parts[2]
        return None

    def content_json(self, digest: str, namespace: str | None = None):
        """A blob of the content store, parsed as JSON."""
        return json.loads(self.ctr("content", "get", digest, namespace=namespace).check().stdout)

    # -- reports --

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def vm_logs(self, lines: int = 30, limit: int = 3) -> list[tuple[str, str]]:
        """Tails of the newest `*.log` files under the private ARRAKIS_HOME
        (VM consoles, runtime logs)."""
        try:
            logs = sorted(self.home.rglob("*.log"), key=lambda p: p.stat().st_mtime)[-limit:]
        except OSError:
            return []
        out = []
        for p in logs:
            try:
                out.append((str(p), "\n".join(p.read_text(errors="replace").splitlines()[-lines:])))
            except OSError:
                pass
        return out

    # -- teardown --

    def processes(self) -> list[int]:
        """Processes other than the holder that live in our mount namespace or
        whose command line names T."""
        marker = str(self.tmp)
        me = os.getpid()
        found = []
        for pid in _pids():
            if pid == me or (self.holder and pid == self.holder.pid):
                continue
            if (self._mnt_ns and _ns_inode(pid, "mnt") == self._mnt_ns) or marker in _cmdline(pid):
                found.append(pid)
        return found

    def close(self) -> list[str]:
        """Tears everything down (see the module docstring); returns the
        problems met (also in `problems`). Each step runs even if an earlier
        one failed."""
        if self.closed:
            return self.problems
        self.closed = True
        steps = [self._remove_everything, self._stop_daemon, self.events.stop, self._kill_leftovers,
                 self._stop_holder, self._remove_files, self._check_host]
        for step in steps:
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - teardown goes on
                self.problems.append(f"{step.__name__}: {type(e).__name__}: {e}")
                if isinstance(e, KeyboardInterrupt):
                    self.kill_quietly()
                    break
        if self in _active:
            _active.remove(self)
        return self.problems

    def _daemon_alive(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def _remove_everything(self) -> None:
        if not self._daemon_alive():
            return
        if self.cri:
            r = self.crictl("rmp", "-fa", timeout=120)
            if r.rc != 0:
                self.problems.append(f"crictl rmp -fa: {r}")
        r = self.ctr("namespaces", "ls", "-q")
        namespaces = r.stdout.split() if r.rc == 0 else [self.namespace]
        for ns in namespaces:
            tasks = self.tasks(ns)
            for cid, (_, status) in tasks.items():
                if status != "STOPPED":
                    self.ctr("task", "kill", "-s", "SIGKILL", "--all", cid, namespace=ns)
            deadline = time.monotonic() + 30
            while any(s != "STOPPED" for _, s in self.tasks(ns).values()) and time.monotonic() < deadline:
                time.sleep(0.3)
            for cid in self.tasks(ns):
                r = self.ctr("task", "delete", "-f", cid, namespace=ns, timeout=120)
                if r.rc != 0:
                    self.problems.append(f"task delete {ns}/{cid}: {r}")
            containers = self.ctr("container", "ls", "-q", namespace=ns)
            for cid in containers.stdout.split():
                r = self.ctr("container", "delete", cid, namespace=ns, timeout=120)
                if r.rc != 0:
                    self.problems.append(f"container delete {ns}/{cid}: {r}")

    def _stop_daemon(self) -> None:
        if not self._daemon_alive():
            return
        assert self.daemon is not None
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.problems.append("containerd did not exit 20 s after SIGTERM; killed")
            _kill_group(self.daemon)
            self.daemon.wait(timeout=10)

    def _kill_leftovers(self) -> None:
        """Whatever still runs in the namespaces or names T (shims, QEMU,
        container processes) is a leak: killed and reported."""
        reported: set[int] = set()
        for _ in range(3):
            pids = sorted(set(self.processes()) | set(self._pid_file_pids()))
            pids = [p for p in pids if _proc_state(p) not in ("Z", "?")]
            if not pids:
                return
            for pid in pids:
                line = _cmdline(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                if pid not in reported:
                    reported.add(pid)
                    self.problems.append(f"killed a leftover process: {pid} {line[:300]}")
            deadline = time.monotonic() + 10
            while any(_proc_state(p) not in ("Z", "?") for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)

    def _pid_file_pids(self) -> list[int]:
        """Live QEMU or shim processes named by pid files under T."""
        pids = []
        try:
            files = list(self.tmp.rglob("*.pid")) + list(self.tmp.rglob("*pid"))
        except OSError:
            return pids
        for f in set(files):
            try:
                if not f.is_file() or f.stat().st_size > 64:
                    continue
                pid = int(f.read_text().strip() or 0)
            except (OSError, ValueError):
                continue
            line = _cmdline(pid)
            if pid > 1 and ("qemu" in line or "containerd-shim" in line or str(self.tmp) in line):
                pids.append(pid)
        return pids

    def _stop_holder(self) -> None:
        if self.holder and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=10)
        if self.holder and self.holder.stdout:
            self.holder.stdout.close()

    def _remove_files(self) -> None:
        mounts = _mounts_under(self.tmp)
        if mounts:
            self.problems.append(f"mounted under {self.tmp} on the host: {mounts}")
            for m in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
        if _mounts_under(self.tmp):
            self.problems.append(f"still mounted under {self.tmp}; not removed")
            self.keep = True
            return
        if self._mnt_ns and any(_ns_inode(p, "mnt") == self._mnt_ns for p in _pids()):
            # The namespace (with /run and /var/lib bound into T/ns) is still
            # alive: never delete through it.
            self.problems.append("a process is still in the mount namespace; T not removed")
            self.keep = True
        elif self.keep:
            kept = Path(str(self.tmp) + "-logs")
            kept.mkdir(exist_ok=True)
            for p in list(self.tmp.glob("*.log")) + list(self.tmp.glob("*.stderr")) + list(self.tmp.glob("*.toml")):
                shutil.copy2(p, kept / p.name)
            for path, _ in self.vm_logs(10**6, limit=20):
                shutil.copy2(path, kept / Path(path).name)
            shutil.rmtree(self.tmp, ignore_errors=True)
            _kept.append(f"{self.name}: logs kept in {kept}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._netns_made:
            r = subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                self.problems.append(f"ip netns delete {self.netns}: {r.stderr.strip()}")
            self._netns_made = False

    def _check_host(self) -> None:
        for path, before in self._host_before.items():
            after = host_state(path)
            if after != before:
                self.problems.append(f"the host's {path} changed: {before} -> {after}")
        if Path(f"/run/netns/{self.netns}").exists():
            self.problems.append(f"netns {self.netns} still exists")

    def kill_quietly(self) -> None:
        """Last resort (interpreter exit): processes only, then the files."""
        for p in ([self.daemon] if self.daemon else []) + ([self.events.process] if self.events.process else []):
            if p.poll() is None:
                _kill_group(p)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.holder and self.holder.poll() is None:
            self.holder.kill()
        time.sleep(0.5)
        if not _mounts_under(self.tmp) and not (
            self._mnt_ns and any(_ns_inode(p, "mnt") == self._mnt_ns for p in _pids())
        ):
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._netns_made:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, timeout=30)


def _feed(process: subprocess.Popen, fd: int, data: bytes, until, deadline: float) -> None:
    """Writes `data` to pipe `fd` (the process's stdin) and closes it once
    `until()` is true (or the process ended, or `deadline` passed)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if until():
                    break
            except Exception:  # noqa: BLE001 - a failing predicate just waits
                pass
            time.sleep(0.1)
    except OSError:
        pass
    finally:
        os.close(fd)


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            process.kill()
        except ProcessLookupError:
            pass


@atexit.register
def _close_everything_left() -> None:
    for c in list(_active):
        if not c.closed:
            c.closed = True
            c.kill_quietly()


# --- pytest integration -----------------------------------------------------


class ReportPlugin:
    """Adds the containerd log tail (which holds the shim's log) of every
    running daemon to a failing test's report, keeps their logs, and lists
    kept logs at the end."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if report.failed:
            for c in list(_active):
                c.keep = True
                # Only what is new since the last report of this daemon.
                size = len(c.log())
                if size == c.reported_log_size:
                    continue
                c.reported_log_size = size
                report.sections.append((f"containerd {c.version} log, last lines ({c.log_path})", c.log_tail(80)))
                for path, tail in c.vm_logs():
                    report.sections.append((f"arrakis log {path}", tail))
        return report

    def pytest_terminal_summary(self, terminalreporter):
        for line in _kept:
            terminalreporter.write_line(f"containerd tests: {line}", yellow=True)


    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item):
        message = item.stash.get(FAIL_KEY, None)
        if message:
            pytest.fail(message, pytrace=False)


FAIL_KEY = pytest.StashKey[str]()


def fail_at_call(item, message: str) -> None:
    """Makes test `item` fail (FAILED, not ERROR) with `message` as soon as its
    call phase starts; for fixtures that find the test cannot run."""
    item.stash[FAIL_KEY] = message


_plugin = ReportPlugin()


def install_report_hook(config) -> None:
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "arrakis-containerd-report")
