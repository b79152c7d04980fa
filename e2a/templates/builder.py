"""Builds template images, cached by content hash.

An image is built once per content hash under <cache>/templates/<image>-<hash>/rootfs and then
only read: every sandbox mounts it read-only and writes to a layer of its own. A template with a
`base` starts from a copy of its base's image (a reflink copy where the filesystem has them)
and adds its packages and wheels, so browser and cua do not repeat standard's minutes of apt.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from e2a.templates.recipes import Recipe, load

MIRROR = os.environ.get("E2A_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("E2A_DEBIAN_SECURITY_MIRROR",
                                 "http://deb.debian.org/debian-security")
SANDBOX_UID = 1000
# Where Playwright for Python looks for its browsers inside a sandbox (the recipe's env says
# the same); its Chromium there is a link to Debian's.
PLAYWRIGHT_BROWSERS = "/opt/playwright"
# Where a recipe's npm packages go (the agent CLIs and the Node.js they run on).
NPM_PREFIX = "/opt/e2a/agents"

Progress = Callable[[str], None]


def image_dir(cache_dir: Path, recipe: Recipe) -> Path:
    return cache_dir / "templates" / f"{recipe.image}-{recipe.content_hash}"


def rootfs_path(cache_dir: Path, recipe: Recipe) -> Path:
    return image_dir(cache_dir, recipe) / "rootfs"


def is_built(cache_dir: Path, recipe: Recipe) -> bool:
    return (image_dir(cache_dir, recipe) / "READY").is_file()


def _run(args: list[str], log, **kwargs) -> None:
    print("+", " ".join(args), file=log, flush=True)
    subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def _chroot(root: Path, script: str, log) -> None:
    """Run a shell script in the image, with /proc mounted (apt and pip need it)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LANG": "C.UTF-8", "HOME": "/root", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    print("+ chroot:", script, file=log, flush=True)
    with _build_env(root):
        subprocess.run(["chroot", str(root), "/bin/sh", "-ec", script], check=True, env=env,
                       stdout=log, stderr=subprocess.STDOUT)


# The device nodes apt and its scripts need while building; none stays in the image.
BUILD_DEVICES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9)}


@contextmanager
def _build_env(root: Path):
    """/proc, a few device nodes, and the host's resolver for the duration of a chroot step.
    Afterwards the image has no device node (the sandbox gets gVisor's own /dev; on the host a
    node such as debootstrap's world-writable /dev/console is a device anyone could open) and
    an empty resolv.conf (the runtime binds each sandbox's)."""
    resolv = root / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    for name, (major, minor) in BUILD_DEVICES.items():
        if not (dev / name).exists():
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)  # apt drops to its own user: not subject to umask
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        resolv.write_text("")
        for node in dev.rglob("*"):
            if node.is_char_device() or node.is_block_device():
                node.unlink()


def private_cache(cache_dir: Path) -> None:
    """Images are root's alone: an image holds world-writable directories (/tmp) and a home
    owned by uid 1000 (some host account's uid too), and every sandbox of it sees that tree,
    so no host user may even traverse into it."""
    templates = cache_dir / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    os.chmod(templates, 0o700)


def _steps(recipe: Recipe, root: Path, base_root: Path | None,
           log) -> list[tuple[str, Callable[[], None]]]:
    """The build steps of an image, each with the name progress gives it."""
    steps: list[tuple[str, Callable[[], None]]] = []
    if base_root is None:
        steps.append(("debootstrap", lambda: _debootstrap(root, recipe, log)))
    else:
        steps.append((f"copy the {recipe.base} image", lambda: _run(
            ["cp", "-a", "--reflink=auto", str(base_root), str(root)], log)))
    if recipe.packages:
        steps.append((f"apt-get install ({len(recipe.packages)} packages)", lambda: _chroot(
            root, "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
            + " ".join(recipe.packages), log)))
    if recipe.wheels:
        steps.append((f"pip install {' '.join(recipe.wheels)}",
                      lambda: _install_wheels(root, recipe.wheels, log)))
    if recipe.npm:
        steps.append((f"npm install ({len(recipe.npm)} packages)",
                      lambda: _install_npm(root, recipe.npm, log)))
    if recipe.commands:
        steps.append((f"commands {' '.join(recipe.commands)}",
                      lambda: _write_commands(root, recipe.commands)))
    for command in recipe.prepare:
        steps.append((f"prepare: {command[:60]}", lambda c=command: _chroot(root, c, log)))
    steps.append(("clean up", lambda: _finish(root, log)))
    return steps


def build(cache_dir: Path, recipe: Recipe, log=sys.stderr,
          progress: Progress | None = None) -> Path:
    """Build the template's image (and the image it extends) unless cached; returns the
    rootfs path. `progress` gets a line as each step starts and ends."""
    if recipe.image != recipe.name:
        return build(cache_dir, load(recipe.image), log, progress)
    private_cache(cache_dir)
    final = image_dir(cache_dir, recipe)
    if is_built(cache_dir, recipe):
        return final / "rootfs"
    base_root = build(cache_dir, load(recipe.base), log, progress) if recipe.base else None
    say = progress or (lambda line: None)
    work = final.with_name(final.name + ".building")
    if work.exists():
        _unmount_below(work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = work / "rootfs"
    steps = _steps(recipe, root, base_root, log)
    started = time.monotonic()
    for i, (name, run) in enumerate(steps, 1):
        say(f"[{recipe.image} {i}/{len(steps)}] {name}")
        t = time.monotonic()
        run()
        say(f"[{recipe.image} {i}/{len(steps)}] done in {time.monotonic() - t:.1f} s")
    (work / "READY").write_text(recipe.content_hash + "\n")
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    say(f"[{recipe.image}] built in {time.monotonic() - started:.0f} s: {final / 'rootfs'}")
    return final / "rootfs"


def _finish(root: Path, log) -> None:
    _chroot(root, "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin "
            "/root/.cache", log)
    _link_playwright_chromium(root)


def debootstrap(root: Path, suite: str, log) -> None:
    """A minimal Debian of `suite` at `root`, with its updates' sources (also e2a's own image,
    e2a/deploy/image.py)."""
    # minbase + apt in a chroot: debootstrap's own --include resolves dependencies poorly
    # (npm's node-* packages fail to configure in its ordering).
    _run(["debootstrap", "--variant=minbase", "--include=ca-certificates", suite,
          str(root), MIRROR], log)
    # Security and point-release updates too: a browser from the release alone is months old.
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {suite} main\n"
        f"deb {MIRROR} {suite}-updates main\n"
        f"deb {SECURITY_MIRROR} {suite}-security main\n")


def _debootstrap(root: Path, recipe: Recipe, log) -> None:
    debootstrap(root, recipe.suite, log)
    _chroot(root, f"useradd --create-home --uid {SANDBOX_UID} --shell /bin/bash user", log)
    # Mount points and files the runtime relies on.
    (root / ".e2a").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("sandbox\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")


def _install_wheels(root: Path, wheels: tuple[str, ...], log) -> None:
    """Download on the host (whose pip reaches the index, with its certificates), install in
    the image from those files only. The host's Python matches the image's (3.11, x86_64)."""
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
              "--dest", tmp, *wheels], log)
        inside = "/" + str(Path(tmp).relative_to(root))
        _chroot(root, f"python3 -m pip install -q --no-index --find-links {inside} "
                "--break-system-packages " + " ".join(f"'{w}'" for w in wheels), log)


def _install_npm(root: Path, packages: tuple[str, ...], log) -> None:
    """Install with the host's npm (which reaches the registry) into the image's NPM_PREFIX.
    Install scripts are not run: they would run on the host, and what they do for these
    packages (pick the platform's native binary) the recipe's `commands` say instead."""
    target = root / NPM_PREFIX.lstrip("/")
    with tempfile.TemporaryDirectory(dir=root / "tmp") as tmp:
        _run(["npm", "install", "--prefix", tmp, "--no-audit", "--no-fund", "--no-save",
              "--omit=dev", "--ignore-scripts", "--cache", str(Path(tmp) / ".npm-cache"),
              *packages], log)
        target.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target / "node_modules", ignore_errors=True)
        os.rename(Path(tmp) / "node_modules", target / "node_modules")
    _run(["chown", "-R", "root:root", str(target)], log)
    _run(["chmod", "-R", "go-w,a+rX", str(target)], log)


def _write_commands(root: Path, commands: dict[str, str]) -> None:
    """/usr/local/bin/<name>: a two-line script that runs the command line the recipe gives."""
    for name, command in commands.items():
        path = root / "usr/local/bin" / name
        path.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        os.chmod(path, 0o755)


def _link_playwright_chromium(root: Path) -> None:
    """Playwright looks for its own Chromium builds under PLAYWRIGHT_BROWSERS_PATH; point the
    revisions this Playwright expects at Debian's Chromium (downloads fail here, and one
    Chromium in the image is enough)."""
    manifests = list(root.glob("usr/local/lib/python3*/dist-packages/playwright/driver/"
                               "package/browsers.json"))
    if not manifests:
        return
    browsers = {b["name"]: b["revision"] for b in json.loads(manifests[0].read_text())["browsers"]}
    target = "/usr/lib/chromium/chromium"
    links = {
        f"chromium-{browsers['chromium']}": ("chrome-linux64/chrome", "chrome-linux/chrome"),
        f"chromium_headless_shell-{browsers.get('chromium-headless-shell', browsers['chromium'])}":
            ("chrome-headless-shell-linux64/chrome-headless-shell",
             "chrome-linux/headless_shell"),
    }
    for folder, paths in links.items():
        for rel in paths:
            link = root / PLAYWRIGHT_BROWSERS.lstrip("/") / folder / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        (root / PLAYWRIGHT_BROWSERS.lstrip("/") / folder / "INSTALLATION_COMPLETE").touch()


def _unmount_below(path: Path) -> None:
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(str(path)):
            subprocess.run(["umount", "-l", target], check=False)
