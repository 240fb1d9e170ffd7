"""Schemathesis against the server's own OpenAPI document: no generated
request, valid or not, may get a 5xx, and the server stays healthy.

The fuzz runs on a server of its own (own state directory). POST /v1/vms
boots a VM for every acceptable name, so it is fuzzed separately with few
examples; once `arrakis serve --config` exists the server is also capped at
two sandboxes (`[runtime] max_sandboxes = 2`, beyond which starting is a
429). The other operations run twice: on names that do not exist, and
pinned to one live VM so that commands, files and state changes reach the
guest.

ARRAKIS_FUZZ_SEED picks the seed (fixed by default, so a failure
reproduces); ARRAKIS_FUZZ_EXAMPLES scales the examples per operation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arrakis_server import http, serve_supports
from conftest import start_server, stop_server, vm_path

SEED = os.environ.get("ARRAKIS_FUZZ_SEED", "20251124")
EXAMPLES = int(os.environ.get("ARRAKIS_FUZZ_EXAMPLES", "100"))
TARGET = "fuzz-target"

CONFIG = """\
[runtime]
max_sandboxes = 2
"""


@pytest.fixture(scope="module")
def fuzz_server():
    config = CONFIG if serve_supports("--config") else None
    server = start_server("fuzz", config=config)
    server.capped = config is not None
    yield server
    stop_server(server)


def schemathesis(
    server,
    tmp_path: Path,
    *args: str,
    budget: int,
    parameters: dict | None = None,
    allow_501: bool = False,
) -> str:
    """Runs `st run` on the server's document and fails the test, with the
    summary, unless it passed and the server logged no 5xx reply. `budget`
    bounds the run in seconds. Returns the output."""
    config = tmp_path / "schemathesis.toml"
    lines = []
    if allow_501:
        lines += ["[checks.not_a_server_error]", 'expected-statuses = ["2xx", "3xx", "4xx", "501"]']
    if parameters:
        lines.append("[parameters]")
        lines += [f'"{key}" = "{value}"' for key, value in parameters.items()]
    config.write_text("\n".join(lines) + "\n")
    st = Path(sys.executable).with_name("st")
    command = [
        str(st),
        "--config-file",
        str(config),
        "run",
        server.url("/v1/openapi.json"),
        "--checks",
        "not_a_server_error",
        "--seed",
        SEED,
        "--request-timeout",
        "60",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--output-truncate",
        "true",
        *args,
    ]
    log_start = len(server.log())
    try:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=budget,
            env=dict(
                os.environ,
                SCHEMATHESIS_HOOKS="st_hooks",
                PYTHONPATH=str(Path(__file__).resolve().parent),
            ),
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"schemathesis ran over {budget}s:\n{e.stdout or ''}\n{e.stderr or ''}")
    output = done.stdout + done.stderr
    print(output)
    server_errors = [
        (method, path, status)
        for method, path, status in server.server_errors(log_start)
        if not (allow_501 and status == "501")
    ]
    assert not server_errors, "5xx replies in the server log: " + ", ".join(
        f"{method} {path} -> {status}" for method, path, status in server_errors[:20]
    )
    assert done.returncode == 0, f"schemathesis failed (exit {done.returncode}):\n{summary(output)}"
    assert server.healthy(), "the server is not healthy after fuzzing"
    return output


def summary(output: str) -> str:
    """The FAILURES section onwards (or everything if there is none)."""
    at = output.find("FAILURES")
    return output[at - 40 :] if at >= 40 else output


def test_fuzz_without_vms(fuzz_server, tmp_path):
    """Every operation but POST /v1/vms, on names no VM has."""
    schemathesis(
        fuzz_server,
        tmp_path,
        "--exclude-operation-id",
        "start",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(EXAMPLES),
        budget=200,
    )


def live_target(server) -> None:
    r = http("GET", server.url(vm_path(TARGET)))
    if r.status_code == 200 and r.json()["status"] == "RUNNING":
        return
    if r.status_code == 200:
        http("DELETE", server.url(vm_path(TARGET)))
    r = http("POST", server.url("/v1/vms"), json={"vmName": TARGET})
    assert r.status_code == 200, r.text


def test_fuzz_commands_and_files_on_a_live_vm(fuzz_server, tmp_path):
    """Operations on /v1/vms/{name}/..., with {name} a running VM: fuzzed
    commands and files reach the guest. No DELETE (the VM must live), no
    PATCH (tested next), no snapshots (each would copy the VM's memory)."""
    live_target(fuzz_server)
    schemathesis(
        fuzz_server,
        tmp_path,
        "--include-path-regex",
        r"\{name\}/",
        "--exclude-path-regex",
        "snapshots",
        "--exclude-method",
        "DELETE",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(EXAMPLES),
        budget=200,
        parameters={"path.name": TARGET},
    )
    r = http("POST", fuzz_server.url(vm_path(TARGET) + "/cmd"), json={"cmd": "echo alive"})
    assert r.status_code in (200, 409), r.text


def test_fuzz_state_changes_on_a_live_vm(fuzz_server, tmp_path):
    """PATCH /v1/vms/{name} on the running VM."""
    live_target(fuzz_server)
    schemathesis(
        fuzz_server,
        tmp_path,
        "--include-operation-id",
        "update",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(max(EXAMPLES // 2, 5)),
        budget=120,
        parameters={"path.name": TARGET},
    )


def restore_unimplemented(server) -> bool:
    r = http("POST", server.url("/v1/vms"), json={"vmName": "restore-probe", "snapshotId": "none"})
    http("DELETE", server.url(vm_path("restore-probe")))
    return r.status_code == 501


def test_fuzz_start(fuzz_server, tmp_path, server_errors_allowed):
    """POST /v1/vms: few examples, since every acceptable name boots a VM.
    Until restoring lands (issue 4), a snapshotId gets a documented 501."""
    examples = 20 if fuzz_server.capped else 6
    allow_501 = restore_unimplemented(fuzz_server)
    if allow_501:
        server_errors_allowed.add("501")
    try:
        schemathesis(
            fuzz_server,
            tmp_path,
            "--include-operation-id",
            "start",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(examples),
            budget=150,
            allow_501=allow_501,
        )
    finally:
        r = http("DELETE", fuzz_server.url("/v1/vms"), timeout=180)
        assert r.status_code == 200, r.text
    assert fuzz_server.vm_names() == []
    assert fuzz_server.healthy()
