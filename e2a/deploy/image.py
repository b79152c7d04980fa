"""The OCI image of e2a itself, for running it in a cluster (deploy/kubernetes/).

Made with the template builder's own steps (e2a/templates/builder.py): a minimal Debian
bookworm (its python3 is 3.11, the version e2a is tested on), e2a's dependencies as wheels
downloaded on the host and installed from those files, then e2a's own wheel; envd, whose hash
names the template images e2a asks the cluster for (e2a/kube/images.py); a user 10001 to run
as, and `e2a serve` as the entrypoint. Nothing the embedded backend needs (runsc, rclone,
nftables): this image runs only E2A_BACKEND=kubernetes.

The dependencies are pinned to the versions this environment runs (the tested set), not to
what the index offers today, so the same checkout gives the same image name. The image is
cached by a hash of everything that goes in: <cache>/images/e2a-<hash>.tar, a docker archive
(`ctr images import`, `docker load`), named <registry>/e2a:<hash>. Builds run as root
(debootstrap, chroot), like the templates'.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from e2a.templates import builder
from e2a.templates.oci import write_archive

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml and e2a/
SUITE = "bookworm"
# python3-pip only to install the wheels; removed before the image is written.
PACKAGES = ("python3", "python3-pip")
UID = 10001
ENVD_PATH = "/usr/local/lib/e2a/envd"
# Bump when the steps below change what an image holds for the same inputs.
VERSION = "1"
# What a source file of the e2a package may be (the wheel's package data included).
SOURCE_SUFFIXES = (".py", ".toml", ".ini")


def pinned_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """name==version for every package e2a needs to run (no test extras), as installed here."""
    from packaging.requirements import Requirement  # build-time only; in the dev venv (pip, pytest)
    from packaging.utils import canonicalize_name

    roots = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found: dict[str, tuple[str, set[str]]] = {}  # name -> version, extras asked of it
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        version, extras = found.get(name, (None, set()))
        if version is not None and set(req.extras) <= extras:
            continue
        extras = extras | set(req.extras)
        dist = importlib.metadata.distribution(req.name)
        found[name] = (dist.version, extras)
        for line in dist.requires or ():
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": x})
                                         for x in (extras or {""})):
                todo.append(dep)
    return sorted(f"{name}=={version}" for name, (version, _) in found.items())


def _sources(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "e2a").rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


def content_hash(envd: Path, pins: list[str], root: Path = ROOT) -> str:
    """Of the steps' version, the base, the pins, pyproject.toml, every source file and envd."""
    h = hashlib.sha256()
    h.update(f"{VERSION}\n{SUITE}\n{' '.join(PACKAGES)}\n{UID}\n".encode())
    h.update("\n".join(pins).encode() + b"\n")
    for path in [root / "pyproject.toml", *_sources(root), envd]:
        h.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name)
                 .encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


# e2a image archives kept in the cache: the one built or used last and a few before it (two
# checkouts of different sources do not rebuild each other's each time)
KEEP_ARCHIVES = 3


def archive_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "images" / f"e2a-{digest}.tar"


def ref(registry: str, digest: str) -> str:
    return f"{registry}/e2a:{digest}"


def build(cache_dir: Path, envd: Path, registry: str = "e2a.local", log=sys.stderr,
          progress=lambda line: None) -> tuple[Path, str]:
    """The image's archive (built unless cached) and its name."""
    envd = envd.resolve()
    pins = pinned_requirements()
    digest = content_hash(envd, pins)
    out, name = archive_path(cache_dir, digest), ref(registry, digest)
    if out.is_file():
        out.touch()  # recently used: pruned last
        return out, name
    started = time.monotonic()
    # The tree is big and temporary: /var/tmp, not the (often memory-backed) /tmp.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="e2a-image-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        steps = [
            ("debootstrap", lambda: builder.debootstrap(rootfs, SUITE, log)),
            ("apt-get install", lambda: builder._chroot(
                rootfs, "apt-get update -qq && apt-get install -y -qq "
                "--no-install-recommends " + " ".join(PACKAGES), log)),
            (f"pip install ({len(pins)} pinned packages)",
             lambda: builder._install_wheels(rootfs, tuple(pins), log)),
            ("pip install e2a", lambda: _install_e2a(rootfs, Path(tmp), log)),
            ("user, clean up", lambda: _finish(rootfs, log)),
        ]
        try:
            for i, (what, run) in enumerate(steps, 1):
                progress(f"[e2a image {i}/{len(steps)}] {what}")
                run()
            progress("[e2a image] writing the archive")
            write_archive(out, name, rootfs, ["e2a", "serve"],
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                               "PYTHONUNBUFFERED": "1", "E2A_ENVD": ENVD_PATH},
                          add=[(envd, ENVD_PATH)], user=f"{UID}:{UID}")
        finally:
            builder._unmount_below(Path(tmp))  # a chroot step killed midway leaves /proc
    progress(f"[e2a image] built in {time.monotonic() - started:.0f} s: {out} "
             f"({out.stat().st_size / 2**20:.0f} MiB)")
    prune(out.parent)
    return out, name


def prune(images: Path, keep: int = KEEP_ARCHIVES) -> None:
    """Each change to e2a's sources is a new archive (about 430 MB): all but the `keep` used
    last are deleted, so that a working machine's cache does not grow without end."""
    archives = sorted(images.glob("e2a-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[keep:]:
        old.unlink(missing_ok=True)


def _install_e2a(rootfs: Path, tmp: Path, log) -> None:
    """e2a's wheel, built on the host from a copy of the hashed files (a build in the checkout
    would write its build/ there; pip fetches the setuptools pyproject.toml asks for, which
    only packs the files), installed without dependencies (they are in already)."""
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    for path in _sources():
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    wheels = rootfs / "tmp" / "e2a-wheel"
    builder._run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)], log)
    wheel = next(wheels.glob("e2a-*.whl")).name
    builder._chroot(rootfs, f"python3 -m pip install -q --no-deps --no-index "
                    f"--break-system-packages /tmp/e2a-wheel/{wheel} && rm -r /tmp/e2a-wheel",
                    log)


def _finish(rootfs: Path, log) -> None:
    """The user e2a runs as (no home, no shell); pip, apt's caches, docs and translations
    gone (nobody reads them in a pod)."""
    builder._chroot(rootfs, f"useradd --uid {UID} --user-group --no-create-home "
                    f"--home-dir /nonexistent --shell /usr/sbin/nologin e2a && "
                    "apt-get purge -y -qq python3-pip && apt-get autoremove -y -qq && "
                    "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/*", log)
    builder._finish(rootfs, log)
