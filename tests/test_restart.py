"""Sandboxes outlive `arrakis serve`: a new server on the same state
directory finds them as they were, files included."""

from __future__ import annotations

import signal

from py_arrakis import SandboxManager

from arrakis_server import http
from conftest import start_server, stop_server


def test_sandboxes_survive_a_server_restart():
    first = start_server("restart")
    second = None
    try:
        mgr = SandboxManager(first.base_url)
        running = mgr.start_sandbox("survivor")
        running.upload_files([{"path": "/root/kept.txt", "content": "across restarts ✓"}])
        mgr.start_sandbox("paused survivor").update_state("paused")

        # Ctrl-C stops the server; the VMs keep running.
        assert first.terminate(signal.SIGINT) == 0
        assert "sandboxes keep running" in first.log()

        second = start_server("restart", tmp=first.tmp)
        mgr = SandboxManager(second.base_url)
        found = {sb.name: sb for sb in mgr.list_all()}
        assert sorted(found) == ["paused survivor", "survivor"]
        assert found["survivor"].info()["status"] == "RUNNING"
        assert found["survivor"].run_cmd("cat /root/kept.txt") == {"output": "across restarts ✓", "error": ""}
        assert found["paused survivor"].info()["status"] == "PAUSED"
        r = http("PATCH", second.url("/v1/vms/paused%20survivor"), json={"status": "resume"})
        assert r.status_code == 200, r.text
        assert found["paused survivor"].run_cmd("echo resumed") == {"output": "resumed\n", "error": ""}
    finally:
        first.terminate()
        if second is None:
            # The first server's VMs must go even when the restart failed.
            second = start_server("restart", tmp=first.tmp)
        first.stopped = True
        stop_server(first)
        stop_server(second)
