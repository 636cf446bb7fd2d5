"""cluo-coord's container image as `make image` builds it (hack/build-coord-image.sh).

    image = build_coord_image(tmp_path / "build")
    image.names      # its tags in root's podman storage: ("localhost/cluo-coord:0.1.0",)
    image.archive    # OUT/cluo-coord-VERSION.oci.tar
    image.digest     # OUT/cluo-coord-VERSION.oci.digest: the archive's manifest digest

The script caches its Debian bases and buildah caches the layers, so a warm build takes
seconds; a clean machine builds everything (minutes). Needs root and podman.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from testbed.podman_pod import podman

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "hack" / "build-coord-image.sh"
BUILD_TIMEOUT = 1200.0  # a cold build makes two Debian roots


class CoordImageError(RuntimeError):
    """The image could not be built, or the build left something else than it says."""


@dataclass(frozen=True)
class BuiltImage:
    names: tuple[str, ...]  # its tags in podman's storage
    image_id: str
    archive: Path
    digest: str  # the digest file's content


def archive_ids(archive: Path) -> tuple[str, str]:
    """(config digest = image id, manifest digest) of an OCI archive's one image."""
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.load(
            tar.extractfile("blobs/" + manifest_digest.replace(":", "/")))  # type: ignore[arg-type]
    return manifest["config"]["digest"].removeprefix("sha256:"), manifest_digest


def build_coord_image(out: Path, timeout: float = BUILD_TIMEOUT) -> BuiltImage:
    """hack/build-coord-image.sh with OUT_DIR=`out`; checks that the digest file names the
    archive's manifest."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], env={**os.environ, "OUT_DIR": str(out)},
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise CoordImageError(f"{BUILD_SCRIPT} failed:\n{result.stderr[-4000:]}")
    archive = Path(result.stdout.strip().splitlines()[-1])
    image_id, manifest_digest = archive_ids(archive)
    digest = archive.with_name(archive.name.removesuffix(".tar") + ".digest").read_text().strip()
    if digest != manifest_digest:
        raise CoordImageError(f"{archive}'s digest file says {digest}, its manifest is "
                              f"{manifest_digest}")
    names = json.loads(podman("image", "inspect", "--format", "{{json .RepoTags}}",
                              image_id).stdout)
    return BuiltImage(tuple(names), image_id, archive, digest)
