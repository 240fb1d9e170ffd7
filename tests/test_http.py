"""The API with plain `requests`: the unprefixed routes that py-arrakis 1.x
and the MCP server call (`/vms`, `/vms/{name}/cmd`, `/vms/{name}/files`,
`/health`), the JSON of every reply, and the error replies."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from urllib.parse import quote

import pytest

from arrakis_server import error_message, http

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def json_ok(response, status: int = 200):
    """The JSON body of a successful reply; every 2xx has one."""
    assert response.status_code == status, (response.request.method, response.url, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    assert response.content, f"{response.request.method} {response.url}: empty body"
    return response.json()


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_health(base_url, prefix):
    body = json_ok(http("GET", f"{base_url}{prefix}/health"))
    assert body["status"] == "healthy"
    assert RFC3339_UTC.match(body["timestamp"]), body
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 120


def check_vm_object(vm: dict, name: str, status: str) -> None:
    assert vm["vmName"] == name
    assert vm["status"] == status
    assert isinstance(vm["ip"], str) and isinstance(vm["tapDeviceName"], str)
    assert isinstance(vm["portForwards"], list)
    for forward in vm["portForwards"]:
        # Ports are strings, as on the original server.
        assert isinstance(forward["hostPort"], str) and isinstance(forward["guestPort"], str)
        assert isinstance(forward["description"], str)


@pytest.mark.parametrize("prefix", ["", "/v1"], ids=["unprefixed", "v1"])
def test_full_flow_with_plain_requests(base_url, names, prefix):
    """What py-arrakis 1.1.2 (the MCP server's pin) sends, on both route sets:
    `run_cmd` sends only `cmd`, without `blocking`."""
    name = names.unique(f"raw{prefix.replace('/', '-')} ü")
    api = f"{base_url}{prefix}"
    vm_url = f"{api}/vms/{quote(name, safe='')}"

    vm = json_ok(http("POST", f"{api}/vms", json={"vmName": name}))
    check_vm_object(vm, name, "RUNNING")

    listed = json_ok(http("GET", f"{api}/vms"))
    assert name in [v["vmName"] for v in listed["vms"]]
    check_vm_object(json_ok(http("GET", vm_url)), name, "RUNNING")

    out = json_ok(http("POST", f"{vm_url}/cmd", json={"cmd": "echo hello world"}))
    assert out == {"output": "hello world\n", "error": ""}
    out = json_ok(http("POST", f"{vm_url}/cmd", json={"cmd": "exit 7", "blocking": True}))
    assert out == {"output": "", "error": "exit status 7"}

    files = [
        {"path": "/tmp/raw.txt", "content": "raw ✓\n"},
        {"path": "rel/nested.txt", "content": "nested"},
    ]
    assert json_ok(http("POST", f"{vm_url}/files", json={"files": files})) == {}
    got = json_ok(http("GET", f"{vm_url}/files", params={"paths": "/tmp/raw.txt,rel/nested.txt,/nope"}))
    assert got["files"][:2] == [
        {"path": "/tmp/raw.txt", "content": "raw ✓\n", "error": ""},
        {"path": "rel/nested.txt", "content": "nested", "error": ""},
    ]
    assert got["files"][2]["path"] == "/nope" and got["files"][2]["content"] == ""
    assert got["files"][2]["error"]

    assert json_ok(http("PATCH", vm_url, json={"status": "paused"})) == {"success": True}
    check_vm_object(json_ok(http("GET", vm_url)), name, "PAUSED")
    assert json_ok(http("PATCH", vm_url, json={"status": "resume"})) == {"success": True}
    check_vm_object(json_ok(http("GET", vm_url)), name, "RUNNING")
    assert json_ok(http("PATCH", vm_url, json={"status": "stopped"})) == {"success": True}
    check_vm_object(json_ok(http("GET", vm_url)), name, "STOPPED")
    # POST with the same name boots the stopped VM again.
    check_vm_object(json_ok(http("POST", f"{api}/vms", json={"vmName": name})), name, "RUNNING")
    out = json_ok(http("POST", f"{vm_url}/cmd", json={"cmd": "cat /tmp/raw.txt"}))
    assert out == {"output": "raw ✓\n", "error": ""}

    # DELETE sends no body and no Content-Type, as py-arrakis does.
    assert json_ok(http("DELETE", vm_url)) == {"success": True}
    r = http("GET", vm_url)
    assert r.status_code == 404
    assert name in error_message(r)


def test_body_content_type_does_not_matter(base_url, shared_sandbox):
    """Bodies are read as JSON whatever their Content-Type (curl -d sends
    application/x-www-form-urlencoded)."""
    url = f"{base_url}/vms/{quote(shared_sandbox.name, safe='')}/cmd"
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = http("POST", url, data='{"cmd": "echo typed"}'.encode(), headers=headers)
        assert json_ok(r) == {"output": "typed\n", "error": ""}, content_type


def test_download_query_encoding(base_url, shared_sandbox):
    """py-arrakis joins paths with raw commas and lets requests quote the
    rest (a space becomes %20)."""
    url = f"{base_url}/v1/vms/{quote(shared_sandbox.name, safe='')}/files"
    files = [
        {"path": "/tmp/q a.txt", "content": "space"},
        {"path": "/tmp/q-ü.txt", "content": "umlaut"},
    ]
    json_ok(http("POST", url, json={"files": files}))
    got = json_ok(http("GET", url + "?paths=/tmp/q%20a.txt,/tmp/q-%C3%BC.txt"))
    assert got["files"] == [
        {"path": "/tmp/q a.txt", "content": "space", "error": ""},
        {"path": "/tmp/q-ü.txt", "content": "umlaut", "error": ""},
    ]


# Requests that must fail, with the status and a word the message must contain.
BAD_REQUESTS = [
    ("GET", "/nope", None, 404, "/nope"),
    ("GET", "/v1/nope", None, 404, "/v1/nope"),
    ("GET", "/v2/health", None, 404, "/v2/health"),
    ("GET", "/v1/vms/", None, 404, "/v1/vms/"),
    ("GET", "/v1/vms/x/unknown", None, 404, "unknown"),
    ("GET", "/vms/a/b/c", None, 404, "/vms/a/b/c"),
    ("PUT", "/v1/vms", None, 405, "PUT"),
    ("PUT", "/vms", None, 405, "PUT"),
    ("DELETE", "/health", None, 405, "DELETE"),
    ("POST", "/v1/health", None, 405, "POST"),
    ("POST", "/v1/vms/x", b"{}", 405, "POST"),
    ("PUT", "/vms/x/cmd", b"{}", 405, "PUT"),
    ("GET", "/v1/vms/x/cmd", None, 405, "GET"),
    ("DELETE", "/v1/vms/x/files", None, 405, "DELETE"),
    ("POST", "/v1/vms", b"", 400, "vmName"),
    ("POST", "/v1/vms", b"{", 400, "invalid"),
    ("POST", "/v1/vms", b"[]", 400, ""),
    ("POST", "/v1/vms", b'{"vmName": 5}', 400, "invalid"),
    ("POST", "/vms", b'{"vmName": ""}', 400, "vmName"),
    ("POST", "/v1/vms", b'{"vmName": "a/b"}', 400, "name"),
    ("POST", "/v1/vms/x/cmd", b"{}", 400, "cmd"),
    ("POST", "/vms/x/cmd", b'{"cmd": ""}', 400, "cmd"),
    ("POST", "/v1/vms/x/cmd", b'{"cmd": "true", "x": 1}', 400, "x"),
    ("POST", "/v1/vms/x/cmd", b'{"cmd": 1}', 400, "invalid"),
    ("POST", "/v1/vms/x/files", b"{}", 400, "files"),
    ("POST", "/v1/vms/x/files", b'{"files": []}', 400, "files"),
    ("POST", "/v1/vms/x/files", b'{"files": [{"path": "a"}]}', 400, "content"),
    ("POST", "/v1/vms/x/files", b'{"files": [{"path": "", "content": ""}]}', 400, "path"),
    ("GET", "/v1/vms/x/files", None, 400, "paths"),
    ("GET", "/v1/vms/x/files?paths=", None, 400, "paths"),
    ("PATCH", "/v1/vms/x", b"{", 400, "invalid"),
    ("PATCH", "/v1/vms/x", b'{"status": "running"}', 400, "status"),
    ("PATCH", "/vms/x", b"{}", 400, "status"),
    ("GET", "/v1/vms/no%20such", None, 404, "no such"),
    ("DELETE", "/vms/no-such", None, 404, "no-such"),
    ("PATCH", "/v1/vms/no-such", b'{"status": "paused"}', 404, "no-such"),
    ("POST", "/vms/no-such/cmd", b'{"cmd": "true"}', 404, "no-such"),
    ("POST", "/v1/vms/no-such/files", b'{"files": [{"path": "a", "content": ""}]}', 404, "no-such"),
    ("GET", "/vms/no-such/files?paths=a", None, 404, "no-such"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "hint"),
    BAD_REQUESTS,
    ids=[f"{m} {p} {b!r}" if b else f"{m} {p}" for m, p, b, _, _ in BAD_REQUESTS],
)
def test_error_replies(base_url, method, path, body, status, hint):
    r = http(method, base_url + path, data=body)
    assert r.status_code == status, r.text
    message = error_message(r)
    assert hint in message, message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/vms", b'["from-an-array"]'),
        ("/v1/vms/{name}/cmd", b'["echo from an array", true]'),
        ("/v1/vms/{name}", b'["paused"]'),
        ("/v1/vms/{name}/files", b'[[["/tmp/from-array", "x"]]]'),
    ],
    ids=["start", "cmd", "patch", "files"],
)
def test_json_arrays_are_not_objects(base_url, names, shared_sandbox, path, body):
    """Request bodies are JSON objects; an array is a 400, not its elements
    read as the fields in declaration order."""
    names("from-an-array")
    method = "PATCH" if path == "/v1/vms/{name}" else "POST"
    url = base_url + path.replace("{name}", quote(shared_sandbox.name, safe=""))
    try:
        r = http(method, url, data=body)
        assert r.status_code == 400, r.text
        error_message(r)
    finally:
        vm_url = f"{base_url}/v1/vms/{quote(shared_sandbox.name, safe='')}"
        if http("GET", vm_url).json().get("status") == "PAUSED":
            http("PATCH", vm_url, json={"status": "resume"})


def test_empty_list_is_an_object(server, base_url):
    """With no VMs, the list is still an object py-arrakis can `.get` from."""
    body = json_ok(http("GET", f"{base_url}/v1/vms"))
    assert isinstance(body, dict)
    assert isinstance(body.get("vms", []), list)


def test_openapi_document(base_url):
    doc = json_ok(http("GET", f"{base_url}/v1/openapi.json"))
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/health", "/v1/vms", "/v1/vms/{name}", "/v1/vms/{name}/cmd", "/v1/vms/{name}/files"):
        assert path in doc["paths"], sorted(doc["paths"])
