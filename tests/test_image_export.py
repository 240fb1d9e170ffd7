"""`arrakis image export` end to end: an image built with `arrakis image
build` is written as an OCI archive, imported back under another name with
`arrakis image import` and booted; a pulled image is written as it is.

The registry, the private ARRAKIS_HOME and the pushed busybox-based image
are test_images.py's fixtures (module-scoped: this module gets its own).
"""

from __future__ import annotations

import json
import tarfile

from test_images import arrakis, home, pushed, registry  # noqa: F401 (fixtures)

DOCKERFILE = """\
FROM {base}
ENV EXPORTED=yes
RUN echo built > built.txt && ln built.txt built-link
"""


def _index_and_manifest(archive) -> tuple[dict, dict]:
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))
    return index, manifest


def test_a_built_image_exports_and_boots_after_import(home, pushed, tmp_path):
    reference, _ = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE.format(base=reference))
    arrakis(home, "image", "build", "-t", "built:1", str(context))

    archive = tmp_path / "built.tar"
    exported = json.loads(arrakis(home, "--json", "image", "export", "built:1", str(archive)).stdout)
    assert exported["reference"] == "built:1", exported
    index, manifest = _index_and_manifest(archive)
    assert len(index["manifests"]) == 1, index
    annotations = index["manifests"][0]["annotations"]
    assert annotations["org.opencontainers.image.ref.name"] == "docker.io/library/built:1", index
    assert annotations["io.containerd.image.name"] == "docker.io/library/built:1", index
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ], manifest

    # The layer is made deterministically: a directory export is the same image.
    again = arrakis(home, "--json", "image", "export", "built:1", str(tmp_path / "layout"))
    assert json.loads(again.stdout)["digest"] == exported["digest"]
    refused = arrakis(home, "image", "export", "built:1", str(archive), check=False)
    assert refused.returncode != 0
    assert "already exists" in refused.stderr, refused.stderr

    arrakis(home, "image", "import", str(archive), "--tag", "reimported:1")
    arrakis(home, "create", "reimported", "--image", "reimported:1")
    try:
        script = (
            'id -un; pwd; echo "$EXPORTED / $GREETING"; cat built.txt; '
            "stat -c %i built.txt built-link; "
            'stat -c "%u:%g %a" owned.txt /home/app; readlink /data/symlink'
        )
        out = arrakis(home, "exec", "reimported", "--", "sh", "-c", script).stdout.splitlines()
        # The build's ENV and file, and the base image's USER, WORKDIR and ENV.
        assert out[:4] == ["app", "/srv/app", "yes / hello from the image", "built"], out
        assert out[4] == out[5], f"the hard link became a copy: {out}"
        assert out[6:] == ["1000:1000 640", "1000:1000 700", "target.txt"], out
    finally:
        arrakis(home, "destroy", "reimported")


def test_a_pulled_image_exports_as_it_is_and_errors_are_clear(home, pushed, tmp_path):
    reference, digest = pushed
    arrakis(home, "image", "pull", "--insecure", reference)
    layout = tmp_path / "layout"
    layout.mkdir()
    exported = json.loads(arrakis(home, "--json", "image", "export", reference, str(layout)).stdout)
    assert exported["digest"] == digest, "the manifest is the registry's, byte for byte"
    assert (layout / "blobs/sha256" / digest.removeprefix("sha256:")).is_file()

    unknown = arrakis(home, "image", "export", "nothing:1", str(tmp_path / "x.tar"), check=False)
    assert unknown.returncode != 0
    assert 'no image "nothing:1"' in unknown.stderr, unknown.stderr
    not_empty = arrakis(home, "image", "export", reference, str(layout), check=False)
    assert not_empty.returncode != 0
    assert "is not empty" in not_empty.stderr, not_empty.stderr
    assert not (tmp_path / "x.tar").exists()
