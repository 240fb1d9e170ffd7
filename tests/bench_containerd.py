"""Benchmark of the containerd shim (run by scripts/bench, not by pytest).

One private containerd 2.2 (the tests' harness: its own network and mount
namespace, its own ARRAKIS_HOME) runs the same busybox image with both
runtimes, alternating, so that machine noise hits both sides alike:

- `ctr run --rm IMAGE ID true` with runc and with `io.containerd.arrakis.v2`:
  the whole life of a container (create, start, exit, delete) as a user
  sees it, and the ratio of the medians;
- the first arrakis container of the image, apart: it converts the image to
  ext4, cold-boots and keeps the golden snapshot the later ones start from;
- arrakis checkpoint (`ctr container checkpoint --task`) and restore
  (`ctr container restore --live`, until the task runs) of a running
  container, with the checkpoint's size (runc's needs CRIU, which does not
  work here).

Usage: bench_containerd.py [RUNS]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oci_image  # noqa: E402
from containerd_env import Containerd, missing_message  # noqa: E402

ARRAKIS = "io.containerd.arrakis.v2"
RUNC = "io.containerd.runc.v2"
VERSION = "2.2"


def timed(action) -> float:
    """Seconds `action()` took; it must succeed."""
    start = time.monotonic()
    action()
    return time.monotonic() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def summary(name: str, samples: list[float]) -> str:
    return (f"{name}: median {ms(statistics.median(samples))}, min {ms(min(samples))}, "
            f"max {ms(max(samples))} (n={len(samples)})")


def main(runs: int) -> int:
    message = missing_message(VERSION)
    if message:
        print(f"bench_containerd: cannot run: {message}", file=sys.stderr)
        return 1
    images = Path(tempfile.mkdtemp(prefix="actd-bench-img-"))
    try:
        oci_image.build(images / "test.tar")
        with Containerd(VERSION, runtime_name=ARRAKIS, name="bench") as c:
            c.import_image(images / "test.tar")

            def run(runtime: str, cid: str) -> None:
                c.run(c.ctr_args("run", "--rm", "--runtime", runtime, oci_image.NAME, cid, "true")).check()

            first = timed(lambda: run(ARRAKIS, "first"))
            print(f"first arrakis container of the image (conversion, cold boot, golden snapshot): {ms(first)}")
            samples: dict[str, list[float]] = {RUNC: [], ARRAKIS: []}
            for i in range(runs):
                for runtime in (RUNC, ARRAKIS):
                    samples[runtime].append(timed(lambda: run(runtime, f"r{i}-{runtime.split('.')[2]}")))
            for runtime, values in samples.items():
                print(summary(f"ctr run --rm true, {runtime}", values))
            ratio = statistics.median(samples[ARRAKIS]) / statistics.median(samples[RUNC])
            print(f"ctr run --rm true: arrakis / runc = {ratio:.2f}x (medians)")

            content = c.tmp / "root" / "io.containerd.content.v1.content"

            def content_bytes() -> int:
                return sum(f.stat().st_size for f in content.rglob("*") if f.is_file())

            checkpoints, restores, sizes = [], [], []
            for i in range(runs):
                cid, ref = f"cp{i}", f"localhost/arrakis-bench-cp:{i}"
                c.ctr_run(cid, "sleep", "600", detach=True).check()
                before = content_bytes()
                checkpoints.append(timed(
                    lambda: c.ctr("container", "checkpoint", "--task", cid, ref, timeout=300).check()))
                sizes.append(content_bytes() - before)
                c.remove(cid)

                def restore() -> None:
                    c.ctr("container", "restore", "--live", cid, ref, timeout=300).check()
                    c.wait_status(cid, "RUNNING", timeout=60)

                restores.append(timed(restore))
                c.remove(cid)
                c.ctr("image", "rm", "--sync", ref).check()
            print(summary("arrakis checkpoint --task (running container)", checkpoints))
            print(summary("arrakis restore --live until RUNNING", restores))
            print(f"checkpoint size in the content store: median {statistics.median(sizes) / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(images, ignore_errors=True)
    return 0


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else "5"
    if not arg.isdigit() or int(arg) < 1:
        sys.exit(f"RUNS must be a positive integer, got {arg!r}")
    sys.exit(main(int(arg)))
