"""Images end to end: Debian's `docker-registry` on loopback, a test image
built here from local files (a static busybox and a few layers), pushed with
the registry HTTP API, pulled with `arrakis image pull --insecure`, then
booted as a sandbox whose files, ENV, WORKDIR and USER are checked.

Everything runs in a private ARRAKIS_HOME (the guest kernel and initramfs are
linked in) so the image store of the machine is never touched; the CLI runs
the sandboxes in-process (no server).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import requests

import arrakis_server

BUSYBOX = Path("/bin/busybox")
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
APPLETS = ["sh", "cat", "ls", "id", "pwd", "env", "stat", "readlink", "echo", "test", "tar", "mkdir", "rm"]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry():
    """`docker-registry serve` on a free loopback port, its storage in a
    temporary directory; yields `host:port`."""
    if not os.access(REGISTRY, os.X_OK):
        pytest.fail("docker-registry is missing: run scripts/setup (it installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="arpy-registry-"))
    port = _free_port()
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    log = open(tmp / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"http://{address}/v2/", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"docker-registry did not start: {(tmp / 'registry.log').read_text()}")
        time.sleep(0.1)
    yield address
    process.terminate()
    process.wait(timeout=10)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def home():
    """A private ARRAKIS_HOME with the machine's kernel and initramfs linked
    in and an empty image store; every sandbox in it is destroyed at the end."""
    base = Path(os.environ.get("ARRAKIS_HOME") or Path.home() / ".cache/arrakis")
    tmp = Path(tempfile.mkdtemp(prefix="arpy-images-"))
    for name in ("vmlinuz", "initramfs.cpio"):
        (tmp / "artifacts").mkdir(exist_ok=True)
        os.symlink((base / "artifacts" / name).resolve(), tmp / "artifacts" / name)
    yield tmp
    arrakis(tmp, "destroy-all", check=False)
    arrakis_server.kill_qemu(str(tmp))
    shutil.rmtree(tmp, ignore_errors=True)


def arrakis(home: Path, *args: str, check: bool = True, stdin: str | None = None):
    env = dict(os.environ)
    env.update(
        ARRAKIS_HOME=str(home),
        ARRAKIS_NETWORK_MODE="user",
        ARRAKIS_NETWORK_EGRESS="deny",
    )
    env.pop("ARRAKIS_STATE_DIR", None)
    result = subprocess.run(
        [arrakis_server.binary(), *args],
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


# --- building and pushing a test image -------------------------------------


def _info(name: str, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, size=0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.size = size
    info.mtime = 1_700_000_000
    return info


class Layer:
    """A layer tarball written entry by entry."""

    def __init__(self):
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(_info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data: bytes, mode=0o644, uid=0, gid=0):
        self.tar.addfile(_info(name, mode=mode, uid=uid, gid=gid, size=len(data)), io.BytesIO(data))

    def symlink(self, name, target):
        info = _info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)

    def hardlink(self, name, target):
        info = _info(name, tarfile.LNKTYPE)
        info.linkname = target
        self.tar.addfile(info)

    def raw(self, info: tarfile.TarInfo, data: bytes = b""):
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def busybox_layer() -> Layer:
    layer = Layer()
    for d in ("bin", "etc", "srv", "old", "replaced", "home"):
        layer.dir(d)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\napp:x:1000:\n")
    layer.dir("home/app", mode=0o700, uid=1000, gid=1000)
    layer.dir("srv/app", mode=0o750, uid=1000, gid=1000)
    layer.file("srv/app/owned.txt", b"mine\n", mode=0o640, uid=1000, gid=1000)
    layer.file("old/deleted.txt", b"deleted by the upper layer\n")
    layer.file("old/kept.txt", b"kept\n")
    layer.file("replaced/a.txt", b"a\n")
    layer.file("replaced/b.txt", b"b\n")
    return layer


def upper_layer() -> Layer:
    layer = Layer()
    layer.file("old/.wh.deleted.txt", b"")
    layer.dir("replaced")
    layer.file("replaced/.wh..wh..opq", b"")
    layer.file("replaced/c.txt", b"c\n")
    layer.dir("data")
    layer.file("data/target.txt", b"linked content\n")
    layer.hardlink("data/hardlink", "data/target.txt")
    layer.symlink("data/symlink", "target.txt")
    return layer


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(registry: str, repository: str, tag: str, layers: list[bytes], config: dict) -> str:
    """Pushes the layers (gzip-compressed) and config with the registry's
    HTTP API; returns the manifest digest."""
    base = f"http://{registry}/v2/{repository}"

    def blob(data: bytes) -> str:
        digest = _digest(data)
        start = requests.post(f"{base}/blobs/uploads/", timeout=30)
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{registry}{location}"
        sep = "&" if "?" in location else "?"
        done = requests.put(
            f"{location}{sep}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert done.status_code == 201, done.text
        return digest

    compressed = [gzip.compress(layer, mtime=0) for layer in layers]
    config = dict(config)
    config["rootfs"] = {"type": "layers", "diff_ids": [_digest(layer) for layer in layers]}
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blob(config_bytes), "size": len(config_bytes)},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": blob(data),
                "size": len(data),
            }
            for data in compressed
        ],
    }
    body = json.dumps(manifest).encode()
    put = requests.put(
        f"{base}/manifests/{tag}",
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert put.status_code == 201, put.text
    return _digest(body)


IMAGE_CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/bin", "GREETING=hello from the image"],
        "WorkingDir": "/srv/app",
        "User": "app",
        "Cmd": ["sh"],
    },
}


@pytest.fixture(scope="module")
def pushed(registry):
    """The test image in the registry: its reference and manifest digest."""
    if not BUSYBOX.exists():
        pytest.fail("/bin/busybox is missing: run scripts/setup (it installs busybox-static)")
    digest = push(
        registry,
        "test/busybox",
        "1",
        [busybox_layer().bytes(), upper_layer().bytes()],
        IMAGE_CONFIG,
    )
    return f"{registry}/test/busybox:1", digest


def test_pulled_image_runs_with_its_files_env_workdir_and_user(home, pushed, tmp_path):
    reference, digest = pushed
    pulled = arrakis(home, "--json", "image", "pull", "--insecure", reference)
    rows = json.loads(pulled.stdout)
    assert [(r["reference"], r["digest"]) for r in rows] == [(reference, digest)]

    listed = json.loads(arrakis(home, "--json", "image", "ls").stdout)
    assert [(r["reference"], r["digest"]) for r in listed] == [(reference, digest)]
    assert listed[0]["diskBytes"] > 0

    arrakis(home, "create", "img", "--image", reference)
    try:
        # The image's USER, WORKDIR and ENV apply to every command.
        out = arrakis(home, "exec", "img", "--", "sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"').stdout
        assert out.splitlines() == ["1000", "1000", "/srv/app", "hello from the image"]
        # A request's own settings win.
        out = arrakis(home, "exec", "img", "-u", "root", "-w", "/", "-e", "GREETING=mine", "--",
                      "sh", "-c", 'id -u; pwd; echo "$GREETING"').stdout
        assert out.splitlines() == ["0", "/", "mine"]
        # Ownership and modes survive the conversion.
        out = arrakis(home, "exec", "img", "--", "stat", "-c", "%u:%g %a", "/srv/app/owned.txt", "/home/app").stdout
        assert out.splitlines() == ["1000:1000 640", "1000:1000 700"]
        # Layer semantics: a whiteout deleted a file, an opaque directory
        # replaced another, a hard link shares its inode, a symlink resolves.
        script = (
            "test -e /old/deleted.txt && echo deleted-present; cat /old/kept.txt; "
            "ls /replaced; stat -c %i /data/target.txt /data/hardlink; stat -c %h /data/hardlink; "
            "readlink /data/symlink; cat /data/symlink"
        )
        out = arrakis(home, "exec", "img", "-u", "root", "--", "sh", "-c", script).stdout.splitlines()
        assert out[0] == "kept", out
        assert out[1:2] == ["c.txt"], out
        assert out[2] == out[3], f"hard link has its own inode: {out}"
        assert out[4] == "2", out
        assert out[5:] == ["target.txt", "linked content"], out
        # File operations go through the agent, not the image's tools.
        (tmp_path / "up.txt").write_text("uploaded\n")
        arrakis(home, "cp", str(tmp_path / "up.txt"), "img:/tmp/up.txt")
        arrakis(home, "cp", "img:/tmp/up.txt", str(tmp_path / "down.txt"))
        assert (tmp_path / "down.txt").read_text() == "uploaded\n"
        # Forks of an image's sandbox keep its files and its defaults.
        arrakis(home, "exec", "img", "--", "sh", "-c", "echo state > /home/app/state.txt")
        arrakis(home, "fork", "-n", "img", "-c", "2", "-p", "imgfork")
        for fork in ("imgfork-1", "imgfork-2"):
            out = arrakis(home, "exec", fork, "--", "sh", "-c", 'id -u; pwd; echo "$GREETING"; cat /home/app/state.txt').stdout
            assert out.splitlines() == ["1000", "/srv/app", "hello from the image", "state"], (fork, out)
    finally:
        for name in ("imgfork-1", "imgfork-2"):
            arrakis(home, "destroy", name, check=False)
        arrakis(home, "destroy", "img")


def test_removing_an_image_in_use_is_refused(home, pushed):
    reference, _ = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    arrakis(home, "create", "user-of-image", "--image", reference)
    try:
        refused = arrakis(home, "image", "rm", reference, check=False)
        assert refused.returncode != 0
        assert "used by sandbox user-of-image" in refused.stderr, refused.stderr
    finally:
        arrakis(home, "destroy", "user-of-image")
    arrakis(home, "image", "rm", reference)
    assert json.loads(arrakis(home, "--json", "image", "ls").stdout) == []
    store = home / "images/.store"
    assert [p.name for p in (store / "rootfs").iterdir() if not p.name.endswith(".lock")] == []
    assert list((store / "layout/blobs/sha256").iterdir()) == []


def test_pull_errors_are_clear_and_leave_nothing(home, registry):
    unknown = arrakis(home, "image", "pull", "--insecure", f"{registry}/test/nothing:1", check=False)
    assert unknown.returncode != 0
    assert "not found in registry" in unknown.stderr, unknown.stderr

    closed = _free_port()
    unreachable = arrakis(home, "image", "pull", "--insecure", f"127.0.0.1:{closed}/x:1", check=False)
    assert unreachable.returncode != 0
    assert "cannot reach registry" in unreachable.stderr, unreachable.stderr

    bad = arrakis(home, "image", "pull", "Not A Reference", check=False)
    assert bad.returncode != 0
    assert "invalid image reference" in bad.stderr, bad.stderr

    missing = arrakis(home, "create", "nope", "--image", f"{registry}/test/never:1", check=False)
    assert missing.returncode != 0
    assert "arrakis image pull" in missing.stderr, missing.stderr
    assert json.loads(arrakis(home, "--json", "image", "ls").stdout) == []


def test_a_path_escape_in_a_layer_is_rejected(home, registry, tmp_path):
    victim = tmp_path / "victim"
    layer = Layer()
    layer.dir("etc")
    layer.raw(_info(f"../../../../../../..{victim}"), b"escaped\n")
    push(registry, "test/evil", "1", [layer.bytes()], IMAGE_CONFIG)
    result = arrakis(home, "image", "pull", "--insecure", f"{registry}/test/evil:1", check=False)
    assert result.returncode != 0
    assert "rejected" in result.stderr and "climbs above the root" in result.stderr, result.stderr
    assert not victim.exists()
    assert json.loads(arrakis(home, "--json", "image", "ls").stdout) == []
    leftovers = [p.name for p in (home / "images/.store/rootfs").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


BUILD_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
USER root
ENV BUILT=yes
WORKDIR /opt/app
COPY hello.txt ./
COPY tree/ /opt/tree/
RUN echo "ran as $(id -u) in $(pwd) with $BUILT" > run.txt
USER app
CMD ["cat", "/opt/app/hello.txt"]
"""


def _steps(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("STEP ")]


def test_build_runs_steps_in_a_vm_and_caches_them(home, pushed, tmp_path):
    reference, _ = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    context = tmp_path / "ctx"
    (context / "tree/sub").mkdir(parents=True)
    (context / "Dockerfile").write_text(BUILD_DOCKERFILE)
    (context / "hello.txt").write_text("hello from the build context\n")
    (context / "tree/sub/deep.txt").write_text("deep\n")
    os.chmod(context / "tree/sub/deep.txt", 0o600)
    os.symlink("sub/deep.txt", context / "tree/link")

    build = ["image", "build", "-t", "built:1", "--build-arg", f"BASE={reference}", str(context)]
    started = time.monotonic()
    first = arrakis(home, *build)
    first_secs = time.monotonic() - started
    steps = _steps(first.stderr)
    assert len(steps) == 8, first.stderr
    assert not any("(cached)" in s for s in steps if "RUN" in s or "COPY" in s), first.stderr

    started = time.monotonic()
    second = arrakis(home, *build)
    second_secs = time.monotonic() - started
    assert all(s.endswith("(cached)") for s in _steps(second.stderr)), second.stderr
    # Timing belongs to benchmarks; printed for the record (-s shows it).
    print(f"build: first {first_secs:.1f} s, fully cached {second_secs:.1f} s")
    assert first.stdout == second.stdout, "a fully cached build is the same image"

    arrakis(home, "create", "from-build", "--image", "built:1")
    try:
        out = arrakis(home, "exec", "from-build", "--", "sh", "-c",
                      'id -un; pwd; echo "$BUILT"; cat hello.txt run.txt; '
                      'stat -c "%a %u" /opt/tree/sub/deep.txt; readlink /opt/tree/link').stdout
        assert out.splitlines() == [
            "app",
            "/opt/app",
            "yes",
            "hello from the build context",
            "ran as 0 in /opt/app with yes",
            "600 0",
            "sub/deep.txt",
        ], out
    finally:
        arrakis(home, "destroy", "from-build")

    # Changing a copied file reruns that step and the ones after it only.
    (context / "tree/sub/deep.txt").write_text("changed\n")
    third = arrakis(home, *build)
    cached = {s.split(":", 1)[1].strip().removesuffix(" (cached)"): s.endswith("(cached)") for s in _steps(third.stderr)}
    assert cached["COPY hello.txt ./"] is True, third.stderr
    assert cached["COPY tree/ /opt/tree/"] is False, third.stderr
    assert cached['RUN echo "ran as $(id -u) in $(pwd) with $BUILT" > run.txt'] is False, third.stderr


def test_a_failing_run_step_names_the_step_and_leaves_no_vm(home, pushed, tmp_path):
    reference, _ = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    (tmp_path / "Dockerfile").write_text(f"FROM {reference}\nRUN echo before; exit 3\n")
    result = arrakis(home, "image", "build", "-t", "broken:1", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "step 1/1 (line 2)" in result.stderr and "exited with code 3" in result.stderr, result.stderr
    assert "before" in result.stderr
    assert json.loads(arrakis(home, "--json", "list").stdout) == []
    assert "broken" not in arrakis(home, "image", "ls").stdout


def test_an_image_without_a_shell_still_runs_commands_and_file_operations(home, registry, tmp_path):
    layer = Layer()
    layer.dir("bin")
    layer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    push(registry, "test/noshell", "1", [layer.bytes()], {"architecture": "amd64", "os": "linux", "config": {}})
    reference = f"{registry}/test/noshell:1"
    arrakis(home, "image", "pull", "--insecure", reference)
    arrakis(home, "create", "noshell", "--image", reference)
    try:
        out = arrakis(home, "exec", "noshell", "--", "/bin/busybox", "echo", "direct").stdout
        assert out == "direct\n"
        refused = arrakis(home, "exec", "noshell", "--shell", "--", "echo hi", check=False)
        assert refused.returncode != 0
        assert "no shell" in refused.stderr, refused.stderr
        (tmp_path / "f.txt").write_text("file ops need no tools\n")
        arrakis(home, "cp", str(tmp_path / "f.txt"), "noshell:/data/f.txt")
        listing = arrakis(home, "fs", "ls", "noshell", "/data").stdout
        assert "f.txt" in listing, listing
        arrakis(home, "cp", "noshell:/data/f.txt", str(tmp_path / "back.txt"))
        assert (tmp_path / "back.txt").read_text() == "file ops need no tools\n"
    finally:
        arrakis(home, "destroy", "noshell")


def test_the_api_creates_from_an_image_and_runs_commands_with_its_defaults(home, pushed):
    """`POST /v1/vms` with `image`, then `cmd` (py-arrakis run_cmd) and `exec`: the image's
    USER, WORKDIR and ENV apply, as they do in the CLI."""
    from conftest import start_server, stop_server

    reference, _ = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    server = start_server("images", env={"ARRAKIS_HOME": str(home)})
    try:
        created = arrakis_server.http(
            "POST", server.url("/v1/vms"), json={"vmName": "api-img", "image": reference}
        )
        assert created.status_code == 200, created.text
        out = arrakis_server.http(
            "POST", server.url("/v1/vms/api-img/cmd"), json={"cmd": 'id -u; pwd; echo "$GREETING"'}
        )
        assert out.status_code == 200, out.text
        assert out.json()["output"].splitlines() == ["1000", "/srv/app", "hello from the image"]
        ran = arrakis_server.http(
            "POST", server.url("/v1/vms/api-img/exec"), json={"argv": ["id", "-un"]}
        )
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"] == "app\n", ran.json()
        unknown = arrakis_server.http(
            "POST", server.url("/v1/vms"), json={"vmName": "api-nope", "image": "nothing/here:1"}
        )
        assert unknown.status_code == 400, unknown.text
        assert "arrakis image pull" in unknown.json()["error"]["message"]
    finally:
        stop_server(server)
