"""Template images for the cluster: which name a template's pods run, and the image itself.

The name carries the template image's content hash and envd's, so a changed recipe or envd is
a new image, never a stale one under an old name. The cluster gets it from the registry the
settings name (E2A_KUBE_REGISTRY, where an operator pushes it), or, on a test cluster without
one, by `ctr images import` of the archive `write` makes (no command does it for an
operator yet: docs/kubernetes.md).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import tempfile
from pathlib import Path

from e2a.config import Settings
from e2a.runtime.runsc import ENVD_PATH, ENVD_PORT
from e2a.templates import builder, recipes
from e2a.templates.oci import write_archive


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ref(settings: Settings, recipe: recipes.Recipe) -> str:
    """registry/e2a-<image>:<image hash>-<envd hash>."""
    image_hash = builder.image_dir(settings.cache_dir, recipe).name.rsplit("-", 1)[-1]
    envd = Path(settings.envd)
    envd_hash = _file_hash(str(envd), envd.stat().st_mtime)[:12]
    return f"{settings.kube_registry}/e2a-{recipe.image}:{image_hash}-{envd_hash}"


def write(settings: Settings, recipe: recipes.Recipe, out: Path) -> str:
    """The template's image as a docker archive at `out`; returns its name."""
    name = ref(settings, recipe)
    write_archive(out, name, builder.rootfs_path(settings.cache_dir, recipe),
                  [ENVD_PATH, "--listen", f"0.0.0.0:{ENVD_PORT}"],
                  env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                  add=[(Path(settings.envd), ENVD_PATH)])
    return name


def import_to(settings: Settings, recipe: recipes.Recipe, ctr: str, socket: str) -> str:
    """Write the image and import it into a containerd (the test cluster's); returns its
    name. Skipped if containerd has it already."""
    name = ref(settings, recipe)
    base = [ctr, "-a", socket, "-n", "k8s.io"]
    have = subprocess.run([*base, "images", "ls", "-q", f"name=={name}"], capture_output=True,
                          text=True, check=True).stdout.split()
    if name in have:
        return name
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        archive = Path(tmp) / "image.tar"
        write(settings, recipe, archive)
        r = subprocess.run([*base, "images", "import", str(archive)], capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError(f"ctr could not import {name}: {r.stderr.strip()[-800:]}")
    return name
