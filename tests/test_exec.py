"""`POST /v1/vms/{name}/exec`: a command with an exit code and separate
stdout and stderr, as JSON, or streamed as server-sent events with
`Accept: text/event-stream`.

SSE events are `stdout` and `stderr` with `data: {"data":"<text>"}`, then one
`exit` with `data: {"exitCode":0,"signal":null,"timedOut":false,"durationMs":N}`.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest
import requests

from arrakis_server import HTTP_TIMEOUT, error_message, http


def exec_url(base_url: str, name: str) -> str:
    return f"{base_url}/v1/vms/{quote(name, safe='')}/exec"


def sse_events(response: requests.Response):
    """Yields (event, data, arrival time) as each event arrives."""
    event, data = None, []
    for raw in response.iter_lines(chunk_size=1024):
        line = raw.decode("utf-8")
        if line == "":
            if event is not None or data:
                yield event or "message", "\n".join(data), time.monotonic()
            event, data = None, []
        elif line.startswith(":"):
            continue  # comment / keep-alive
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if event is not None or data:
        yield event or "message", "\n".join(data), time.monotonic()


def stream(base_url: str, name: str, body: dict):
    """Runs `body` with SSE; returns (events as (event, parsed data, time)),
    the time the request was sent, and the response."""
    sent = time.monotonic()
    response = requests.post(
        exec_url(base_url, name),
        json=body,
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=HTTP_TIMEOUT,
    )
    with response:
        assert response.status_code == 200, response.text
        assert response.headers.get("content-type", "").startswith("text/event-stream"), response.headers
        events = [(event, json.loads(data), at) for event, data, at in sse_events(response)]
    return events, sent


def check_exit(exit: dict, code: int | None = 0, timed_out: bool = False) -> None:
    assert set(exit) >= {"exitCode", "signal", "timedOut", "durationMs"}, exit
    assert exit["exitCode"] == code, exit
    assert exit["timedOut"] is timed_out, exit
    if code is not None:
        assert exit["signal"] is None, exit
    assert isinstance(exit["durationMs"], int) and exit["durationMs"] >= 0, exit


def test_stream_arrives_while_the_command_runs(base_url, shared_sandbox):
    body = {"shell": "for i in 1 2 3 4; do echo line$i; sleep 1; done"}
    events, sent = stream(base_url, shared_sandbox.name, body)
    kinds = [event for event, _, _ in events]
    assert kinds[-1] == "exit", kinds
    assert kinds.count("exit") == 1, kinds
    assert set(kinds[:-1]) <= {"stdout", "stderr"}, kinds

    stdout = "".join(data["data"] for event, data, _ in events if event == "stdout")
    assert stdout == "line1\nline2\nline3\nline4\n"
    assert not [data for event, data, _ in events if event == "stderr"]

    exit_at = events[-1][2]
    first_line_at = None
    seen = ""
    for event, data, at in events:
        if event == "stdout":
            seen += data["data"]
            if "line1" in seen:
                first_line_at = at
                break
    assert first_line_at is not None
    # line1 came about 3 s before the end, not all at once at the exit.
    assert exit_at - first_line_at >= 2.0, (
        f"line1 arrived {first_line_at - sent:.2f}s after the request, "
        f"exit {exit_at - sent:.2f}s after: the output was not streamed"
    )
    exit = events[-1][1]
    check_exit(exit, 0)
    assert exit["durationMs"] >= 3000, exit


def test_stream_separates_stderr_and_reports_the_exit_code(base_url, shared_sandbox):
    body = {"shell": "echo out; echo err >&2; exit 2"}
    events, _ = stream(base_url, shared_sandbox.name, body)
    out = "".join(d["data"] for e, d, _ in events if e == "stdout")
    err = "".join(d["data"] for e, d, _ in events if e == "stderr")
    assert (out, err) == ("out\n", "err\n")
    assert events[-1][0] == "exit"
    check_exit(events[-1][1], 2)


def run(base_url: str, name: str, body: dict) -> dict:
    r = http("POST", exec_url(base_url, name), json=body)
    assert r.status_code == 200, r.text
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    result = r.json()
    assert set(result) >= {"exitCode", "signal", "timedOut", "stdout", "stderr", "durationMs"}, result
    return result


def test_json_reply_without_accept_header(base_url, shared_sandbox):
    result = run(base_url, shared_sandbox.name, {"shell": "echo hello; echo oops >&2"})
    assert (result["stdout"], result["stderr"]) == ("hello\n", "oops\n")
    check_exit(result, 0)


def test_argv_env_cwd_stderr_and_exit_code(base_url, shared_sandbox):
    body = {
        "argv": ["sh", "-c", 'echo "$GREETING"; pwd; echo to-stderr >&2; exit 3'],
        "env": {"GREETING": "hello from env ✓"},
        "cwd": "/root",
    }
    result = run(base_url, shared_sandbox.name, body)
    assert result["stdout"] == "hello from env ✓\n/root\n"
    assert result["stderr"] == "to-stderr\n"
    check_exit(result, 3)


def test_argv_is_not_split_by_a_shell(base_url, shared_sandbox):
    result = run(base_url, shared_sandbox.name, {"argv": ["printf", "[%s]", "a b", "$HOME", "*"]})
    assert result["stdout"] == "[a b][$HOME][*]"
    check_exit(result, 0)


def test_stdin_and_user(base_url, shared_sandbox):
    result = run(base_url, shared_sandbox.name, {"argv": ["cat"], "stdin": "piped ✓\nin\n"})
    assert result["stdout"] == "piped ✓\nin\n"
    result = run(base_url, shared_sandbox.name, {"shell": "id -u", "user": "65534"})
    assert result["stdout"] == "65534\n"
    check_exit(result, 0)


def test_timeout_kills_the_command(base_url, shared_sandbox):
    started = time.monotonic()
    result = run(base_url, shared_sandbox.name, {"shell": "sleep 10", "timeoutSecs": 1})
    elapsed = time.monotonic() - started
    assert result["timedOut"] is True, result
    assert elapsed < 8, f"took {elapsed:.1f}s"
    assert result["durationMs"] < 8000, result
    assert result["exitCode"] != 0, result


def test_exec_errors(base_url, shared_sandbox):
    r = http("POST", exec_url(base_url, "no-such-vm"), json={"shell": "true"})
    assert r.status_code == 404, r.text
    assert "no-such-vm" in error_message(r)
    for body, hint in (
        ({}, "argv"),
        ({"argv": []}, "argv"),
        ({"shell": ""}, "shell"),
        ({"shell": "true", "argv": ["true"]}, "argv"),
        ({"shell": "true", "timeoutSecs": -1}, "timeoutSecs"),
    ):
        r = http("POST", exec_url(base_url, shared_sandbox.name), json=body)
        assert r.status_code == 400, (body, r.text)
        assert hint in error_message(r), (body, r.text)


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
def test_exec_on_a_paused_vm_is_409(base_url, sandbox, accept):
    sandbox.update_state("paused")
    r = http("POST", exec_url(base_url, sandbox.name), json={"shell": "true"}, headers={"Accept": accept})
    assert r.status_code == 409, r.text
    assert "paused" in error_message(r)
