"""A tiny OCI image for the containerd tests, built from the machine's static
busybox with nothing but the standard library.

`build(path)` writes an OCI *image layout* tar (what `ctr image import` reads):
one uncompressed layer, every entry owned by root unless said otherwise, every
mtime 0, JSON with sorted keys, so the same busybox always gives the same
digests. The image is named `localhost/arrakis-test:latest` (the
`io.containerd.image.name` annotation) and holds:

- `/bin/busybox` and applet symlinks (`sh`, `echo`, `cat`, `sleep`, `httpd`,
  `wget`, `stty`, `nproc`, ...: see APPLETS);
- `/etc/passwd`, `/etc/group` (root and `app`, uid/gid 1000, home
  `/home/app`), `/etc/hostname`;
- empty `proc sys dev dev/shm tmp run root var home/app`;
- `/www/index.html` holding MARKER, for the web server tests.

`build(path, name=PAUSE_NAME, entrypoint=PAUSE_ENTRYPOINT)` makes a "pause"
image for CRI sandboxes from the same layer (busybox `sleep` for ever), so
nothing is pulled from the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
NAME = "localhost/arrakis-test:latest"
PAUSE_NAME = "localhost/arrakis-pause:latest"
# `sleep` with no handler: CRI stops a sandbox with SIGKILL anyway.
PAUSE_ENTRYPOINT = ["/bin/sleep", "2147483647"]
MARKER = "arrakis-containerd-marker-7f3c2a"
HOSTNAME = "arrakis-test-image"

# Applets linked into /bin when the machine's busybox has them (`ulimit` is a
# shell builtin).
APPLETS = [
    "sh", "ash", "echo", "cat", "sleep", "ls", "id", "env", "httpd", "wget", "ps", "hostname",
    "stty", "tty", "seq", "true", "false", "mkdir", "rm", "touch", "pwd", "uname", "nproc",
    "head", "tail", "grep", "sed", "awk", "wc", "tr", "kill", "printf", "test", "[", "date",
    "whoami", "ip", "nc", "mount", "umount", "free", "df", "stat", "readlink", "dd", "timeout",
    "pidof", "sync", "cp", "mv", "ln", "chmod", "chown", "xargs", "expr", "basename", "dirname",
]

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _add(tar: tarfile.TarFile, path: str, data: bytes | None = None, mode: int = 0o644,
         kind=tarfile.REGTYPE, link: str = "", uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.linkname = kind, mode, link
    info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
    info.mtime = 0
    info.size = len(data) if data is not None else 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def busybox_applets() -> set[str]:
    """The applets the machine's busybox was built with."""
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def layer_bytes() -> bytes:
    """The image's only layer (an uncompressed tar)."""
    available = busybox_applets()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d, mode in (("bin", 0o755), ("etc", 0o755), ("proc", 0o555), ("sys", 0o555),
                        ("dev", 0o755), ("dev/shm", 0o1777), ("tmp", 0o1777), ("run", 0o755),
                        ("root", 0o700), ("var", 0o755), ("home", 0o755), ("www", 0o755)):
            _add(t, d, kind=tarfile.DIRTYPE, mode=mode)
        _add(t, "home/app", kind=tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000)
        _add(t, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        for applet in APPLETS:
            if applet in available:
                _add(t, f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
        _add(t, "etc/passwd", PASSWD.encode())
        _add(t, "etc/group", GROUP.encode())
        _add(t, "etc/hostname", f"{HOSTNAME}\n".encode())
        _add(t, "www/index.html", f"<html><body>{MARKER}</body></html>\n".encode())
    return buf.getvalue()


def build(path: str | Path, name: str = NAME, entrypoint: list[str] | None = None,
          cmd: list[str] | None = None, env: list[str] | None = None) -> dict:
    """Writes the OCI layout tar to `path`. Returns
    `{"name", "manifest_digest", "config_digest", "layer_digest", "size"}`."""
    layer = layer_bytes()
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media, "digest": digest, "size": len(data)}

    layer_desc = blob(layer, MEDIA_LAYER)
    image_config: dict = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if entrypoint:
        image_config["Entrypoint"] = entrypoint
    image_config["Cmd"] = cmd if cmd is not None else ([] if entrypoint else ["/bin/sh"])
    image_config["WorkingDir"] = "/"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        # The layer is uncompressed: its diff_id is its digest.
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created_by": "tests/oci_image.py"}],
    }
    config_desc = blob(_json(config), MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc,
                "layers": [layer_desc]}
    manifest_desc = blob(_json(manifest), MEDIA_MANIFEST)
    manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        _add(t, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add(t, "index.json", _json(index))
        _add(t, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(t, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        for digest in sorted(blobs):
            _add(t, "blobs/sha256/" + digest.split(":", 1)[1], blobs[digest])
    return {
        "name": name,
        "manifest_digest": manifest_desc["digest"],
        "config_digest": config_desc["digest"],
        "layer_digest": layer_desc["digest"],
        "size": Path(path).stat().st_size,
    }


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: oci_image.py OUT.tar [NAME]")
    print(json.dumps(build(sys.argv[1], *sys.argv[2:]), indent=2))
