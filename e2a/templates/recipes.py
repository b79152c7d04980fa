"""Template recipes: the size a sandbox gets and what its image holds."""

from __future__ import annotations

import functools
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
# Templates the hosted service documents; those without a recipe here answer 501.
KNOWN_TEMPLATES = ("standard", "browser", "cua", "canvas")
# Bumped when the build steps in builder.py change, so cached images are rebuilt.
BUILDER_VERSION = "3"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
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
    digest = hashlib.sha256(raw + BUILDER_VERSION.encode()).hexdigest()[:16]
    return Recipe(
        name=data["name"],
        description=data.get("description", ""),
        vcpu=int(data["vcpu"]),
        cpu_fraction=float(data["cpu_fraction"]),
        memory_mib=int(data["memory_mib"]),
        platform=data.get("platform", "systrap"),
        suite=data.get("suite", "bookworm"),
        packages=tuple(data.get("packages", ())),
        content_hash=digest,
    )


@functools.cache
def available() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in RECIPES.glob("*.toml")))
