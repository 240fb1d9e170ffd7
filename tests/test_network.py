"""User-mode networking without root: `arrakis serve` run as the
unprivileged user `nobody` picks user mode by itself (network.mode = auto)
and a guest web server is reached through its forward on the host's
loopback. The artifacts are hard-linked (or copied) into a directory that
user can read; the test runs as root only to drop to that user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import requests

import arrakis_server
from arrakis_server import http
from conftest import stop_server

NOBODY = 65534


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src.resolve(), dst)
    os.chmod(dst, 0o644)


@pytest.fixture
def unprivileged_home():
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing")
    home = Path(os.environ.get("ARRAKIS_HOME") or Path.home() / ".cache/arrakis")
    tmp = Path(tempfile.mkdtemp(prefix="arpy-nobody-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    _place(home / "artifacts/vmlinuz", tmp / "artifacts/vmlinuz")
    _place(home / "artifacts/initramfs.cpio", tmp / "artifacts/initramfs.cpio")
    _place(home / "images/default/rootfs.ext4", tmp / "images/default/rootfs.ext4")
    for d in (tmp / "artifacts", tmp / "images", tmp / "images/default"):
        os.chmod(d, 0o755)
    (tmp / "state").mkdir()
    os.chown(tmp / "state", NOBODY, NOBODY)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_user_mode_forward_works_without_root(unprivileged_home):
    tmp = unprivileged_home
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    env = {
        "ARRAKIS_HOME": str(tmp),
        "HOME": str(tmp),
        # auto must choose user mode for an unprivileged user.
        "ARRAKIS_NETWORK_MODE": "auto",
    }
    server = arrakis_server.start("nobody", env=env, tmp=tmp, prefix=prefix)
    try:
        assert Path(f"/proc/{server.process.pid}").stat().st_uid == NOBODY
        reply = http(
            "POST",
            f"{server.base_url}/v1/vms",
            json={"vmName": "web", "portForwards": [{"guestPort": 8000, "description": "web"}]},
        )
        assert reply.status_code == 200, reply.text
        vm = reply.json()
        assert vm["networkMode"] == "user", vm
        assert vm["tapDeviceName"] == "", vm
        port = next(f["hostPort"] for f in vm["portForwards"] if f["guestPort"] == "8000")
        qemu = arrakis_server.qemu_pids(str(tmp / "state"))
        assert qemu and all(Path(f"/proc/{pid}").stat().st_uid == NOBODY for pid in qemu)
        reply = http(
            "POST",
            f"{server.base_url}/v1/vms/web/exec",
            json={
                "shell": "mkdir -p /srv && echo unprivileged > /srv/index.html && "
                "(cd /srv && setsid python3 -m http.server 8000 >/dev/null 2>&1 &)"
            },
        )
        assert reply.status_code == 200, reply.text
        body = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                got = requests.get(f"http://127.0.0.1:{port}/index.html", timeout=5)
                if got.ok:
                    body = got.text
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        assert body == "unprivileged\n"
    finally:
        server.keep = False
        stop_server(server)
