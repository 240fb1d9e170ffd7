"""The published examples of py-arrakis 2.0.0 and of the original Arrakis
README and cookbook, run unmodified through the real SDK, and the SDK's
other calls (reference sections 2.2 to 2.5)."""

from __future__ import annotations

import time

import pytest
import requests
from py_arrakis import Sandbox, SandboxManager

from arrakis_server import error_message, http
from conftest import vm_path


def names_of(mgr: SandboxManager) -> list[str]:
    return [sb.name for sb in mgr.list_all()]


def status_of(base_url: str, name: str) -> int:
    return http("GET", base_url + vm_path(name)).status_code


# --- py-arrakis README -------------------------------------------------------


def test_py_arrakis_readme(mgr, names, base_url):
    assert isinstance(mgr.list_all(), list)
    sandbox = mgr.start_sandbox(names("my-sandbox"))
    assert isinstance(sandbox, Sandbox) and sandbox.name == "my-sandbox"
    result = sandbox.run_cmd("echo hello world")
    assert result == {"output": "hello world\n", "error": ""}
    assert "my-sandbox" in names_of(mgr)
    # How the MCP server reaches an existing VM: a Sandbox on the manager's client.
    attached = Sandbox(mgr._api, "my-sandbox")
    assert attached.info()["status"] == "RUNNING"
    [item] = attached.download_files(["/etc/hostname"])
    assert not item.get("error") and item["content"].strip() == "my-sandbox"
    sandbox.destroy()
    assert "my-sandbox" not in names_of(mgr)
    assert status_of(base_url, "my-sandbox") == 404


# --- arrakis README / cookbook ---------------------------------------------------


def test_run_untrusted_code_with_context_manager(mgr, names, base_url):
    names("agent-sandbox")
    with mgr.start_sandbox("agent-sandbox") as sb:
        assert sb.name == "agent-sandbox"
        result = sb.run_cmd("echo 'untrusted code runs here'; uname -s")
        assert result == {"output": "untrusted code runs here\nLinux\n", "error": ""}
        assert sb.info()["status"] == "RUNNING"
    assert "agent-sandbox" not in names_of(mgr)
    assert status_of(base_url, "agent-sandbox") == 404


def test_context_manager_destroys_on_exception(mgr, names, base_url):
    name = names.unique("ctx-raise")
    with pytest.raises(ZeroDivisionError):
        with mgr.start_sandbox(name) as sb:
            sb.run_cmd("true")
            1 / 0
    assert status_of(base_url, name) == 404


def test_vm_management_example_info(sandbox):
    details = sandbox.info()
    print(details)  # the README's GUI example prints it
    assert details["name"] == sandbox.name
    assert details.get("status") == "RUNNING"
    for key in ("ip", "tap_device_name"):
        assert key in details, details
        assert isinstance(details[key], str), details
    if "port_forwards" in details:
        for forward in details["port_forwards"]:
            assert set(forward) == {"host_port", "guest_port", "description"}


def test_cookbook_error_handler_pattern(mgr):
    """`e.response.json()['error']['message']`, as the cookbook reads errors."""
    ghost = Sandbox(mgr._api, "no-such-vm")
    with pytest.raises(requests.HTTPError) as caught:
        ghost.info()
    assert caught.value.response.status_code == 404
    message = caught.value.response.json()["error"]["message"]
    assert "no-such-vm" in message


# --- run_cmd ---------------------------------------------------------------------


def test_failing_command_reports_exit_status(shared_sandbox):
    assert shared_sandbox.run_cmd("exit 3") == {"output": "", "error": "exit status 3"}
    result = shared_sandbox.run_cmd("echo out; echo err >&2; false")
    assert result["error"] == "exit status 1"
    # stdout and stderr are combined, as by the original server.
    assert sorted(result["output"].splitlines()) == ["err", "out"]
    result = shared_sandbox.run_cmd("kill -KILL $$")
    assert result == {"output": "", "error": "signal: killed"}


@pytest.mark.parametrize(
    ("cmd", "output"),
    [
        ("(cd /tmp && pwd)", "/tmp\n"),
        ("echo \"it's\"", "it's\n"),
        ("echo 'say \"hi\"'", 'say "hi"\n'),
        ("echo a\\ b", "a b\n"),
        ("for i in 1 2 3; do echo $i; done", "1\n2\n3\n"),
        ("printf 'b\\na\\n' | sort", "a\nb\n"),
        ("echo $((6 * 7))", "42\n"),
        ("cat <<'EOF'\nline one\n$HOME stays\nEOF", "line one\n$HOME stays\n"),
        ("x=1\nif [ $x = 1 ]; then\n  echo multi-line\nfi", "multi-line\n"),
        ("f() { echo \"fn $1\"; }; f arg", "fn arg\n"),
        ("echo {a,b}c", "ac bc\n"),
        ("pwd", "/tmp/server_files\n"),
        ("id -u", "0\n"),
        ("echo héllo ✓ 😀", "héllo ✓ 😀\n"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_any_valid_bash(shared_sandbox, cmd, output):
    assert shared_sandbox.run_cmd(cmd) == {"output": output, "error": ""}


def test_large_output(shared_sandbox):
    result = shared_sandbox.run_cmd("seq 1 200000")
    assert result["error"] == ""
    lines = result["output"].splitlines()
    assert len(lines) == 200000 and lines[0] == "1" and lines[-1] == "200000"


def test_non_blocking_command(shared_sandbox):
    shared_sandbox.run_cmd("rm -f /tmp/bg-done")
    cmd = "sleep 1; echo finished > /tmp/bg-done"
    started = time.monotonic()
    result = shared_sandbox.run_cmd(cmd, blocking=False)
    assert time.monotonic() - started < 1.0, "blocking=False waited for the command"
    assert result == {"output": f"Command '/usr/bin/bash -c {cmd}' started in background", "error": ""}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if shared_sandbox.run_cmd("cat /tmp/bg-done")["output"] == "finished\n":
            break
        time.sleep(0.5)
    else:
        pytest.fail("the background command never wrote /tmp/bg-done")


@pytest.mark.slow
def test_command_longer_than_30s(shared_sandbox):
    """The original server cut blocking commands off at 30 s; this one must not."""
    started = time.monotonic()
    result = shared_sandbox.run_cmd("sleep 32; echo still here")
    elapsed = time.monotonic() - started
    assert result == {"output": "still here\n", "error": ""}
    assert elapsed >= 32


# --- files -----------------------------------------------------------------------

UNICODE = "héllo wörld ✓ 😀\n第二行 — line two\ttab\n"


def test_upload_download_round_trip(shared_sandbox):
    shared_sandbox.upload_files(
        [
            {"path": "relative.txt", "content": "relative content\n"},
            {"path": "/root/absolute.txt", "content": UNICODE},
            {"path": "/tmp/with space.txt", "content": "spaced"},
            {"path": "/tmp/empty.txt", "content": ""},
        ]
    )
    # Relative paths land in /tmp/server_files, where commands run.
    assert shared_sandbox.run_cmd("cat relative.txt /tmp/server_files/relative.txt") == {
        "output": "relative content\nrelative content\n",
        "error": "",
    }
    assert shared_sandbox.run_cmd("cat /root/absolute.txt")["output"] == UNICODE
    files = shared_sandbox.download_files(
        ["relative.txt", "/root/absolute.txt", "/tmp/with space.txt", "/tmp/empty.txt"]
    )
    assert files == [
        {"path": "relative.txt", "content": "relative content\n", "error": ""},
        {"path": "/root/absolute.txt", "content": UNICODE, "error": ""},
        {"path": "/tmp/with space.txt", "content": "spaced", "error": ""},
        {"path": "/tmp/empty.txt", "content": "", "error": ""},
    ]


def test_download_of_a_file_written_by_a_command(shared_sandbox):
    shared_sandbox.run_cmd("mkdir -p /srv/out && printf 'from the guest\\n' > /srv/out/result.txt")
    [item] = shared_sandbox.download_files(["/srv/out/result.txt"])
    assert item == {"path": "/srv/out/result.txt", "content": "from the guest\n", "error": ""}


def test_upload_creates_parent_directories_and_overwrites(shared_sandbox):
    shared_sandbox.upload_files([{"path": "/opt/deep/er/file.txt", "content": "one"}])
    shared_sandbox.upload_files([{"path": "/opt/deep/er/file.txt", "content": "two"}])
    [item] = shared_sandbox.download_files(["/opt/deep/er/file.txt"])
    assert item["content"] == "two" and item["error"] == ""


def test_download_missing_file_gives_an_error_string(shared_sandbox):
    shared_sandbox.upload_files([{"path": "/tmp/present.txt", "content": "here"}])
    files = shared_sandbox.download_files(["/tmp/present.txt", "/nonexistent/missing.txt", "/tmp"])
    assert [f["path"] for f in files] == ["/tmp/present.txt", "/nonexistent/missing.txt", "/tmp"]
    assert files[0] == {"path": "/tmp/present.txt", "content": "here", "error": ""}
    for missing in files[1:]:
        assert missing["content"] == ""
        assert isinstance(missing["error"], str) and missing["error"], missing


def test_upload_never_replaces_a_device(sandbox):
    """Writing to /dev/null is refused (400, naming the path) and leaves the
    device as it was: a file upload never replaces a device, FIFO or socket."""
    with pytest.raises(requests.HTTPError) as info:
        sandbox.upload_files([{"path": "/dev/null", "content": "discarded"}])
    assert info.value.response.status_code == 400
    message = info.value.response.json()["error"]["message"]
    assert "/dev/null" in message and "not a regular file" in message, message
    result = sandbox.run_cmd("test -c /dev/null && echo char-device; cat /dev/null")
    assert result == {"output": "char-device\n", "error": ""}


def test_download_of_an_endless_file_is_bounded(shared_sandbox, base_url):
    """A file that never ends (st_size 0, like /dev/zero or many /proc
    files) must not be read forever: it gets an error, quickly."""
    r = http("GET", base_url + vm_path(shared_sandbox.name) + "/files", params={"paths": "/dev/zero,/proc/version"}, timeout=30)
    assert r.status_code == 200, r.text
    zero, version = r.json()["files"]
    assert "not a regular file" in zero["error"], zero
    assert zero["content"] == ""
    assert version["error"] == "" and version["content"].startswith("Linux version"), version


def test_large_file_round_trip(shared_sandbox):
    content = "".join(f"{i:08d} ünïcode line\n" for i in range(100000))  # ~2.3 MB
    shared_sandbox.upload_files([{"path": "/tmp/big.txt", "content": content}])
    assert shared_sandbox.run_cmd("wc -l < /tmp/big.txt")["output"] == "100000\n"
    [item] = shared_sandbox.download_files(["/tmp/big.txt"])
    assert item["error"] == "" and item["content"] == content


# --- lifecycle -------------------------------------------------------------------


def test_pause_then_resume(sandbox, base_url):
    sandbox.update_state("paused")
    assert sandbox.info()["status"] == "PAUSED"
    # Commands wait for nobody: a paused VM refuses them with a conflict.
    with pytest.raises(requests.HTTPError) as caught:
        sandbox.run_cmd("true")
    assert caught.value.response.status_code == 409
    assert "paused" in error_message(caught.value.response)
    # py-arrakis refuses "resume"; the server accepts it (as the original did).
    with pytest.raises(ValueError):
        sandbox.update_state("resume")
    r = http("PATCH", base_url + vm_path(sandbox.name), json={"status": "resume"})
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert sandbox.info()["status"] == "RUNNING"
    assert sandbox.run_cmd("echo awake") == {"output": "awake\n", "error": ""}


def test_stop_then_start_again_keeps_the_disk(mgr, names):
    name = names.unique("restart")
    sandbox = mgr.start_sandbox(name)
    sandbox.upload_files([{"path": "/root/uploaded.txt", "content": UNICODE}])
    assert sandbox.run_cmd("echo written-before-stop > /var/tmp/kept.txt && sync")["error"] == ""
    sandbox.update_state("stopped")
    assert sandbox.info()["status"] == "STOPPED"
    assert name in names_of(mgr)
    with pytest.raises(requests.HTTPError) as caught:
        sandbox.run_cmd("true")
    assert caught.value.response.status_code == 409

    again = mgr.start_sandbox(name)
    assert again.info()["status"] == "RUNNING"
    assert again.run_cmd("cat /var/tmp/kept.txt") == {"output": "written-before-stop\n", "error": ""}
    [item] = again.download_files(["/root/uploaded.txt"])
    assert item == {"path": "/root/uploaded.txt", "content": UNICODE, "error": ""}


def test_update_state_rejects_other_values_before_sending(sandbox):
    with pytest.raises(ValueError):
        sandbox.update_state("running")
    assert sandbox.info()["status"] == "RUNNING"


@pytest.mark.parametrize(
    "name",
    ["my sandbox", "sandbox ü", "日本語の箱", "emoji 😀 box", "dots.and_under-scores", "x" * 60],
    ids=["space", "umlaut", "cjk", "emoji", "punctuation", "long"],
)
def test_names_with_spaces_and_unicode(mgr, names, base_url, name):
    sandbox = mgr.start_sandbox(names(name))
    assert sandbox.info()["name"] == name
    assert name in names_of(mgr)
    assert sandbox.run_cmd("echo ok") == {"output": "ok\n", "error": ""}
    sandbox.upload_files([{"path": "/tmp/n.txt", "content": name}])
    assert sandbox.download_files(["/tmp/n.txt"])[0]["content"] == name
    # The guest's hostname is derived from the name and is a valid hostname.
    hostname = sandbox.run_cmd("hostname")["output"].strip()
    assert hostname and len(hostname) <= 63, hostname
    assert all(c.isascii() and (c.isalnum() or c in "-.") for c in hostname), hostname
    sandbox.destroy()
    assert name not in names_of(mgr)
    assert status_of(base_url, name) == 404


# --- errors ----------------------------------------------------------------------


def http_error(call) -> requests.Response:
    with pytest.raises(requests.HTTPError) as caught:
        call()
    return caught.value.response


@pytest.mark.parametrize(
    "operation",
    ["info", "run_cmd", "upload_files", "download_files", "update_state", "destroy", "snapshot"],
)
def test_unknown_vm_is_404(mgr, operation):
    ghost = Sandbox(mgr._api, "ghost vm ü")
    calls = {
        "info": ghost.info,
        "run_cmd": lambda: ghost.run_cmd("true"),
        "upload_files": lambda: ghost.upload_files([{"path": "a", "content": "b"}]),
        "download_files": lambda: ghost.download_files(["a"]),
        "update_state": lambda: ghost.update_state("paused"),
        "destroy": ghost.destroy,
        "snapshot": lambda: ghost.snapshot("s1"),
    }
    response = http_error(calls[operation])
    if operation == "snapshot" and response.status_code in (404, 501) and "no route" in response.text:
        pytest.skip("snapshots are not served yet")
    assert response.status_code == 404, response.text
    assert "ghost vm ü" in error_message(response)


def test_bad_patch_status_is_400(sandbox, base_url):
    for body in ({"status": "running"}, {"status": "STOPPED"}, {"status": ""}, {}):
        r = http("PATCH", base_url + vm_path(sandbox.name), json=body)
        assert r.status_code == 400, (body, r.text)
        assert "status" in error_message(r), (body, r.text)
    assert sandbox.info()["status"] == "RUNNING"


def test_empty_cmd_is_400(shared_sandbox):
    response = http_error(lambda: shared_sandbox.run_cmd(""))
    assert response.status_code == 400
    assert "cmd" in error_message(response)


def test_starting_a_running_vm_again_is_409(sandbox, mgr):
    response = http_error(lambda: mgr.start_sandbox(sandbox.name))
    assert response.status_code == 409
    assert sandbox.name in error_message(response)
    # The running VM is untouched.
    assert sandbox.run_cmd("echo still") == {"output": "still\n", "error": ""}


def test_starting_a_paused_vm_again_is_409(sandbox, mgr):
    sandbox.update_state("paused")
    response = http_error(lambda: mgr.start_sandbox(sandbox.name))
    assert response.status_code == 409
    assert sandbox.name in error_message(response)
    assert sandbox.info()["status"] == "PAUSED"


def test_empty_upload_is_400(shared_sandbox):
    response = http_error(lambda: shared_sandbox.upload_files([]))
    assert response.status_code == 400
    assert "files" in error_message(response)


def test_start_without_name_is_400(mgr):
    response = http_error(lambda: mgr.start_sandbox(""))
    assert response.status_code == 400
    assert "vmName" in error_message(response)


def test_destroying_a_vm_cuts_its_command_short_with_409(sandbox):
    """A command whose VM is destroyed while it runs gets a 409 that says
    so, not an internal error."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(sandbox.run_cmd, "sleep 30")
        time.sleep(3)
        assert not running.done()
        sandbox.destroy()
        response = http_error(lambda: running.result(timeout=60))
    assert response.status_code == 409, response.text
    assert "destroy" in response.json()["error"]["message"]
