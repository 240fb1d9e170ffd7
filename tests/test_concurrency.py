"""Many clients at once: 50 concurrent `run_cmd` calls over 3 sandboxes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from arrakis_server import http

CALLS = 50
SANDBOXES = 3
IDENTITY = "/etc/arrakis-test-identity"


def test_fifty_concurrent_commands_on_three_sandboxes(mgr, names, server):
    sandboxes = [mgr.start_sandbox(names.unique(f"conc{k}")) for k in range(SANDBOXES)]
    hostnames = []
    for sb in sandboxes:
        sb.upload_files([{"path": IDENTITY, "content": sb.name}])
        assert sb.run_cmd("mkdir -p /tmp/tokens")["error"] == ""
        hostnames.append(sb.run_cmd("hostname")["output"].strip())
    assert len(set(hostnames)) == SANDBOXES, hostnames

    def call(i: int):
        sb = sandboxes[i % SANDBOXES]
        cmd = (
            f"echo tok-{i}; sleep 0.$(({i} % 5)); "
            f"echo tok-{i} > /tmp/tokens/tok-{i}; cat {IDENTITY}; echo; hostname"
        )
        started = time.monotonic()
        result = sb.run_cmd(cmd)
        return i, result, time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CALLS) as pool:
        results = list(pool.map(call, range(CALLS)))
    elapsed = time.monotonic() - started
    slowest = max(took for _, _, took in results)
    print(f"{CALLS} concurrent commands in {elapsed:.2f}s (slowest call {slowest:.2f}s)")

    for i, result, _ in results:
        k = i % SANDBOXES
        expected = f"tok-{i}\n{sandboxes[k].name}\n{hostnames[k]}\n"
        assert result == {"output": expected, "error": ""}, (i, result)

    # Each token file landed in its own sandbox and in no other.
    for k, sb in enumerate(sandboxes):
        listed = sb.run_cmd("ls /tmp/tokens")
        assert listed["error"] == ""
        assert sorted(listed["output"].split()) == sorted(
            f"tok-{i}" for i in range(CALLS) if i % SANDBOXES == k
        )

    assert server.healthy()
    listed = http("GET", server.url("/v1/vms")).json()["vms"]
    by_name = {vm["vmName"]: vm["status"] for vm in listed}
    for sb in sandboxes:
        assert by_name[sb.name] == "RUNNING"
        assert sb.run_cmd("echo alive") == {"output": "alive\n", "error": ""}


def test_concurrent_lifecycle_calls(mgr, names, server):
    """Starts, file transfers and destroys of different sandboxes at once."""

    def life(k: int) -> str:
        name = names.unique(f"life{k}")
        sb = mgr.start_sandbox(name)
        sb.upload_files([{"path": "/tmp/k.txt", "content": f"k={k}"}])
        out = sb.run_cmd("cat /tmp/k.txt")["output"]
        sb.destroy()
        return out

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(life, range(4)))
    assert outputs == [f"k={k}" for k in range(4)]
    assert server.healthy()
