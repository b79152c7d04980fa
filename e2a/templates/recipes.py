"""Template recipes: the size a sandbox gets and what its image holds."""

from __future__ import annotations

import functools
import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
# Templates the hosted service documents; those without a recipe here answer 501.
KNOWN_TEMPLATES = ("standard", "browser", "cua", "canvas")
# Bumped when the build steps in builder.py change, so cached images are rebuilt.
BUILDER_VERSION = "3"
# A sandbox's disk (its rootfs writes and /tmp together) when the recipe does not say.
DEFAULT_DISK_MIB = 2048
# Recipe keys that size the sandbox on the host and put nothing into the image: their lines are
# left out of the content hash, so changing them never rebuilds the image. (vcpu, cpu_fraction,
# memory_mib and platform are of the same kind but still hashed: taking them out changes every
# hash; do it with the next BUILDER_VERSION bump, which rebuilds anyway.)
UNHASHED_KEYS = ("disk_mib",)
_UNHASHED_LINE = re.compile(rb"^[ \t]*(?:%s)[ \t]*=[^\n]*\n?" % b"|".join(
    k.encode() for k in UNHASHED_KEYS), re.MULTILINE)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    disk_mib: int
    platform: str
    suite: str
    packages: tuple[str, ...]
    content_hash: str

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per 100 ms period: 0.5 vCPU = 50 ms of CPU time per 100 ms."""
        return int(self.vcpu * self.cpu_fraction * 100_000)


@functools.cache  # recipes ship with the code: read once per process
def load(name: str) -> Recipe | None:
    path = RECIPES / f"{name}.toml"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    data = tomllib.loads(raw.decode())
    digest = content_hash(raw)
    return Recipe(
        name=data["name"],
        description=data.get("description", ""),
        vcpu=int(data["vcpu"]),
        cpu_fraction=float(data["cpu_fraction"]),
        memory_mib=int(data["memory_mib"]),
        disk_mib=int(data.get("disk_mib", DEFAULT_DISK_MIB)),
        platform=data.get("platform", "systrap"),
        suite=data.get("suite", "bookworm"),
        packages=tuple(data.get("packages", ())),
        content_hash=digest,
    )


def content_hash(raw: bytes) -> str:
    """What names the built image: the recipe file without its UNHASHED_KEYS lines, and the
    builder's version."""
    image_part = _UNHASHED_LINE.sub(b"", raw)
    return hashlib.sha256(image_part + BUILDER_VERSION.encode()).hexdigest()[:16]


@functools.cache
def available() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in RECIPES.glob("*.toml")))
