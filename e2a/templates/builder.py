"""Builds a template's root filesystem with debootstrap + apt, cached by the recipe's hash.

The image is built once per content hash under <cache>/templates/<name>-<hash>/rootfs and then
only read: every sandbox mounts it read-only and writes to a layer of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from e2a.templates.recipes import Recipe

MIRROR = os.environ.get("E2A_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SANDBOX_UID = 1000


def image_dir(cache_dir: Path, recipe: Recipe) -> Path:
    return cache_dir / "templates" / f"{recipe.name}-{recipe.content_hash}"


def rootfs_path(cache_dir: Path, recipe: Recipe) -> Path:
    return image_dir(cache_dir, recipe) / "rootfs"


def is_built(cache_dir: Path, recipe: Recipe) -> bool:
    return (image_dir(cache_dir, recipe) / "READY").is_file()


def _run(args: list[str], log) -> None:
    print("+", " ".join(args), file=log, flush=True)
    subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT)


def _chroot(root: Path, script: str, log) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LANG": "C.UTF-8", "HOME": "/root"}
    print("+ chroot:", script, file=log, flush=True)
    subprocess.run(["chroot", str(root), "/bin/sh", "-ec", script], check=True, env=env,
                   stdout=log, stderr=subprocess.STDOUT)


def build(cache_dir: Path, recipe: Recipe, log=sys.stderr) -> Path:
    """Build the image unless it is cached; returns the rootfs path."""
    final = image_dir(cache_dir, recipe)
    if is_built(cache_dir, recipe):
        return final / "rootfs"
    work = final.with_name(final.name + ".building")
    if work.exists():
        _unmount_below(work)
        shutil.rmtree(work)
    root = work / "rootfs"
    root.mkdir(parents=True)
    # minbase + apt in a chroot: debootstrap's own --include resolves dependencies poorly
    # (npm's node-* packages fail to configure in its ordering).
    _run(["debootstrap", "--variant=minbase", "--include=ca-certificates", recipe.suite,
          str(root), MIRROR], log)
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        pkgs = " ".join(recipe.packages)
        _chroot(root, "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                + pkgs, log)
        _chroot(root, f"useradd --create-home --uid {SANDBOX_UID} --shell /bin/bash user "
                "&& apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin", log)
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)
    # Mount points the runtime binds into every sandbox.
    (root / ".e2a").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("sandbox\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").write_text("")
    (work / "READY").write_text(recipe.content_hash + "\n")
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    return final / "rootfs"


def _unmount_below(path: Path) -> None:
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(str(path)):
            subprocess.run(["umount", "-l", target], check=False)


def main() -> None:
    """`python -m e2a.templates.builder [NAME...]`: build (or find cached) template images."""
    from e2a.config import Settings
    from e2a.templates import recipes

    settings = Settings()
    names = sys.argv[1:] or recipes.available()
    for name in names:
        recipe = recipes.load(name)
        if recipe is None:
            sys.exit(f"unknown template {name!r}")
        print(f"template {name}: {rootfs_path(settings.cache_dir, recipe)}"
              f"{' (cached)' if is_built(settings.cache_dir, recipe) else ' (building)'}",
              flush=True)
        build(settings.cache_dir, recipe)


if __name__ == "__main__":
    main()
