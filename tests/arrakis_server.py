"""Starting and stopping `arrakis serve` for the tests, and small HTTP helpers.

Each server gets its own temporary directory (state directory, log, config),
listens on a free loopback port, and on stop destroys every VM it made,
ends the server, and kills any QEMU process whose command line still
mentions its state directory (VMs outlive the server by design).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent

# Printed by `arrakis serve` once it listens (cli/src/commands/serve.rs).
SERVING = re.compile(r"serving the API on (http://\S+)")

# The request log line of a 5xx reply (ARRAKIS_LOG=info).
FIVE_XX = re.compile(r"request method=(\S+) path=(\S+) status=(5\d\d)")

# Bound on one HTTP call of the helpers: long enough for a boot under TCG
# on a loaded machine, short enough to never hang a run.
HTTP_TIMEOUT = 120


def binary() -> str:
    """The arrakis binary under test."""
    return os.environ.get("ARRAKIS_BIN") or str(REPO / "target" / "release" / "arrakis")


def serve_supports(flag: str) -> bool:
    """Whether `arrakis serve --help` lists `flag` (features still landing)."""
    try:
        out = subprocess.run(
            [binary(), "serve", "--help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out.stdout + out.stderr


def http(method: str, url: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", HTTP_TIMEOUT)
    return requests.request(method, url, **kwargs)


def error_message(response: requests.Response) -> str:
    """The message of an error reply, checking the reply is exactly
    `{"error":{"message":"<non-empty>"}}` with a JSON content type."""
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.status_code,
        response.headers,
        response.text,
    )
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], dict) and set(body["error"]) == {"message"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message.strip(), body
    return message


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        line = _cmdline(int(entry))
        if marker in line and "qemu" in line.split(" ", 1)[0]:
            pids.append(int(entry))
    return pids


def kill_qemu(marker: str) -> list[str]:
    """SIGKILLs every QEMU whose command line contains `marker`; returns
    what it killed (`pid cmdline`)."""
    killed = []
    for pid in qemu_pids(marker):
        line = _cmdline(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} {line[:200]}")
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while qemu_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return killed


class Server:
    """A running `arrakis serve`."""

    def __init__(self, tmp: Path, process: subprocess.Popen, log_path: Path, name: str):
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.process = process
        self.log_path = log_path
        self.name = name
        self.base_url = ""
        self.problems: list[str] = []
        self.keep = False
        self.stopped = False

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            r = http("GET", self.url("/v1/health"), timeout=10)
            return r.status_code == 200 and r.json().get("status") == "healthy"
        except (requests.RequestException, ValueError):
            return False

    def vm_names(self) -> list[str]:
        r = http("GET", self.url("/v1/vms"))
        r.raise_for_status()
        return [vm["vmName"] for vm in r.json().get("vms", [])]

    def server_errors(self, since: int = 0) -> list[tuple[str, str, str]]:
        """(method, path, status) of the 5xx replies logged after byte `since`."""
        return FIVE_XX.findall(self.log()[since:])

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        """Ends the server process only (its VMs keep running); returns its
        exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{self.name}: no exit 15 s after signal {sig}; killed")
                self.process.kill()
                self.process.wait(timeout=15)
        return self.process.returncode

    def stop(self) -> list[str]:
        """Destroys every VM, ends the server, kills leftover QEMU processes
        and removes the directory (kept when `keep`). Returns the problems
        met on the way (also kept in `problems`). The later steps run even
        when an earlier one is interrupted (e.g. by pytest-timeout)."""
        if self.stopped:
            return self.problems
        self.stopped = True
        try:
            self._destroy_all()
        finally:
            try:
                self.terminate()
            finally:
                self._kill_leftovers()
        return self.problems

    def _destroy_all(self) -> None:
        if not self.base_url:
            return
        if self.process.poll() is not None:
            self.problems.append(
                f"{self.name}: the server had exited (status {self.process.returncode}) before the end"
            )
            return
        try:
            r = http("DELETE", self.url("/v1/vms"), timeout=120)
            if r.status_code != 200:
                self.problems.append(f"{self.name}: DELETE /v1/vms answered {r.status_code}: {r.text}")
        except requests.RequestException as e:
            self.problems.append(f"{self.name}: DELETE /v1/vms failed: {e}")

    def _kill_leftovers(self) -> None:
        for line in kill_qemu(str(self.state_dir)):
            self.problems.append(f"{self.name}: killed a leftover QEMU: {line}")
        if self.problems:
            self.keep = True
        if self.keep:
            # The log is what matters; VM disks go.
            shutil.rmtree(self.state_dir / "sandboxes", ignore_errors=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def kill(self) -> None:
        """Last resort (at interpreter exit): no HTTP, just processes."""
        if self.process.poll() is None:
            self.process.kill()
        kill_qemu(str(self.state_dir))

def start(
    name: str = "server",
    config: str | None = None,
    env: dict | None = None,
    tmp: Path | None = None,
    prefix: list[str] | None = None,
) -> Server:
    """Starts `arrakis serve` on a free loopback port and waits until
    `/v1/health` answers. Its directory is `tmp` (to restart a server on the
    same state) or a new temporary one. `config` (TOML) is passed with
    `--config`. `prefix` goes before the command (e.g. `setpriv` to run it
    as another user)."""
    if tmp is None:
        # Under /tmp: QEMU's unix sockets live in the state dir and their
        # paths must stay short.
        base = "/tmp" if os.path.isdir("/tmp") else None
        tmp = Path(tempfile.mkdtemp(prefix=f"arpy-{name[:8]}-", dir=base))
    log_path = tmp / f"server-{len(list(tmp.glob('server*.log')))}.log"
    args = [binary(), "--state-dir", str(tmp / "state"), "serve", "--listen", "127.0.0.1:0"]
    # Guests in tests reach nothing but their forwards, unless a test says
    # otherwise in its own [runtime.network].
    config = config or ""
    if "[runtime.network]" not in config:
        config += '\n[runtime.network]\negress = "deny"\n'
    config_path = tmp / "config.toml"
    config_path.write_text(config)
    args += ["--config", str(config_path)]
    full_env = dict(os.environ)
    # User-mode networking: the suite runs as root, and a bridge, taps and
    # nftables rules must never be made in the host's own namespace.
    full_env.setdefault("ARRAKIS_NETWORK_MODE", "user")
    full_env.setdefault("ARRAKIS_LOG", "info")
    full_env["NO_COLOR"] = "1"
    full_env.pop("ARRAKIS_LOG_FILE", None)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            (prefix or []) + args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = Server(tmp, process, log_path, name)
    try:
        deadline = time.monotonic() + 60
        while not server.base_url:
            match = SERVING.search(server.log())
            if match:
                server.base_url = match.group(1).rstrip("/")
                break
            if process.poll() is not None:
                raise RuntimeError(f"arrakis serve exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("arrakis serve printed no 'serving the API on' line in 60 s")
            time.sleep(0.05)
        while not server.healthy():
            if process.poll() is not None:
                raise RuntimeError(f"arrakis serve exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("GET /v1/health did not answer 200 healthy in 60 s")
            time.sleep(0.1)
    except Exception as e:
        server.keep = True
        server.stop()
        raise RuntimeError(
            f"{e}\ncommand: {' '.join(args)}\nlog ({log_path}):\n{server.log_tail(100)}"
        ) from None
    return server
