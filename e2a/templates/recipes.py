"""Templates as data: each `recipes/<name>.toml` declares a template's image (packages, a base
image it extends), its size, the services its sandbox starts, the endpoints they serve and its
warm pool. The manager and the API read these declarations; no template has code of its own.

Only the image part (suite, base, packages, wheels) names the built image: its content
hash. Sizes, services, endpoints and the pool size can change without a rebuild.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
# Templates the hosted service documents.
KNOWN_TEMPLATES = ("standard", "browser", "cua", "canvas")
# Bumped when the build steps in builder.py change, so cached images are rebuilt.
BUILDER_VERSION = "5"
# A sandbox's disk (its rootfs writes and /tmp together) when the recipe does not say.
DEFAULT_DISK_MIB = 2048
# Where a sandbox writes outside its home when its root filesystem is read-only (the
# Kubernetes backend's E2A_KUBE_READ_ONLY_ROOT), when the recipe does not say.
DEFAULT_WRITABLE = ("/tmp", "/var/tmp")
HOME = "/home/user"
# Keys of a recipe that go into its image, hence into its content hash.
IMAGE_KEYS = ("suite", "base", "packages", "wheels", "npm", "commands", "prepare")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class RecipeError(ValueError):
    """A recipe file that does not declare a usable template."""


@dataclass(frozen=True)
class Service:
    """A process the sandbox's envd starts at boot and keeps running (guest/services.go)."""
    name: str
    argv: tuple[str, ...]
    user: str = "user"
    env: dict[str, str] = field(default_factory=dict)
    ready_tcp: int | None = None     # ready once 127.0.0.1:port accepts
    ready_unix: str | None = None    # ready once this socket accepts

    def to_envd(self, params: dict[str, str]) -> dict:
        """The service as envd takes it, with `{param}` placeholders filled in."""
        ready: dict = {}
        if self.ready_tcp:
            ready["tcp"] = self.ready_tcp
        if self.ready_unix:
            ready["unix"] = self.ready_unix
        return {"name": self.name, "user": self.user, "ready": ready,
                "argv": [fill(a, params) for a in self.argv],
                "env": {k: fill(v, params) for k, v in self.env.items()}}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    disk_mib: int
    platform: str
    pool_size: int                     # warm pool when settings do not say
    image: str                         # whose image it runs: itself, or another template's
    base: str | None                   # the template whose image this one extends
    suite: str
    packages: tuple[str, ...]          # Debian packages added (to the base's)
    wheels: tuple[str, ...]            # Python wheels installed with pip (e.g. playwright)
    npm: tuple[str, ...]               # npm packages (pinned) installed in /opt/e2a/agents
    commands: dict[str, str]           # /usr/local/bin/<name> -> the command line it runs
    prepare: tuple[str, ...]           # shell commands run in the image last (warm caches)
    env: dict[str, str]                # environment of every process in the sandbox
    services: tuple[Service, ...]
    endpoints: dict[str, int]          # name -> loopback port of a service e2a's API fronts
    params: dict[str, str]             # defaults of create-time parameters (resolution)
    # per-sandbox secrets the services take as {name} (VNC passwords): derived by the host
    # from its key and the sandbox id, never chosen by the caller
    secrets: tuple[str, ...]
    ready_timeout: float               # seconds boot waits for the services
    contents: tuple[str, ...]          # what GET /v1/templates says it holds
    content_hash: str
    # With a read-only root (Kubernetes, E2A_KUBE_READ_ONLY_ROOT): whether this template can
    # run so, and the paths besides its home that stay writable (seeded from the image).
    read_only_root: bool = True
    writable: tuple[str, ...] = DEFAULT_WRITABLE

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per 100 ms period: 0.5 vCPU = 50 ms of CPU time per 100 ms."""
        return int(self.vcpu * self.cpu_fraction * 100_000)

    def envd_services(self, params: dict[str, str] | None = None) -> list[dict]:
        merged = {**self.params, **(params or {})}
        return [s.to_envd(merged) for s in self.services]

    def sandbox_env(self, params: dict[str, str] | None = None) -> dict[str, str]:
        merged = {**self.params, **(params or {})}
        return {k: fill(v, merged) for k, v in self.env.items()}

    def summary(self) -> dict:
        """What GET /v1/templates shows."""
        return {"name": self.name, "description": self.description, "vcpu": self.vcpu,
                "cpu_fraction": self.cpu_fraction, "memory_mib": self.memory_mib,
                "disk_mib": self.disk_mib, "contents": list(self.contents),
                "services": [s.name for s in self.services],
                "endpoints": sorted(self.endpoints), "parameters": dict(self.params)}


def fill(text: str, params: dict[str, str]) -> str:
    """Replace `{name}` with a create-time parameter (only names the recipe declares)."""
    return _PLACEHOLDER.sub(lambda m: params.get(m.group(1), m.group(0)), text)


@functools.cache  # recipes ship with the code: read once per process
def load(name: str) -> Recipe | None:
    path = RECIPES / f"{name}.toml"
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or not path.is_file():
        return None
    data = tomllib.loads(path.read_text())
    try:
        return _parse(name, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecipeError(f"recipe {path}: {exc}") from exc


def _parse(name: str, data: dict) -> Recipe:
    if data.get("name") != name:
        raise ValueError(f"name must be {name!r}")
    base = data.get("base")
    parent = load(base) if base else None
    if base and parent is None:
        raise ValueError(f"base template {base!r} has no recipe")
    image_of = data.get("image", name)
    if image_of != name:  # runs another template's image: it declares no image of its own
        if any(k in data for k in IMAGE_KEYS):
            raise ValueError(f"a recipe with image = {image_of!r} declares no image keys")
        other = load(image_of)
        if other is None:
            raise ValueError(f"image {image_of!r} has no recipe")
        digest = other.content_hash
    else:
        digest = content_hash(data, parent)
    services = tuple(
        Service(name=s["name"], argv=tuple(s["argv"]), user=s.get("user", "user"),
                env=dict(s.get("env", {})), ready_tcp=s.get("ready_tcp"),
                ready_unix=s.get("ready_unix"))
        for s in data.get("services", ()))
    return Recipe(
        name=name,
        description=data.get("description", ""),
        vcpu=int(data["vcpu"]),
        cpu_fraction=float(data["cpu_fraction"]),
        memory_mib=int(data["memory_mib"]),
        disk_mib=int(data.get("disk_mib", DEFAULT_DISK_MIB)),
        platform=data.get("platform", "systrap"),
        pool_size=int(data.get("pool_size", 0)),
        image=image_of,
        base=base,
        suite=data.get("suite", parent.suite if parent else "bookworm"),
        packages=tuple(data.get("packages", ())),
        wheels=tuple(data.get("wheels", ())),
        npm=tuple(data.get("npm", ())),
        commands={k: str(v) for k, v in data.get("commands", {}).items()},
        prepare=tuple(data.get("prepare", ())),
        env=dict(data.get("env", {})),
        services=services,
        endpoints={k: int(v) for k, v in data.get("endpoints", {}).items()},
        params={k: str(v) for k, v in data.get("params", {}).items()},
        secrets=tuple(data.get("secrets", ())),
        ready_timeout=float(data.get("ready_timeout", 60)),
        contents=tuple(data.get("contents", ())),
        content_hash=digest,
        read_only_root=bool(data.get("read_only_root", True)),
        writable=_writable(data.get("writable", DEFAULT_WRITABLE)),
    )


def _writable(paths: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Writable paths as a pod mounts them: absolute, normal, distinct, none the root, the
    home (always writable) or a kernel filesystem."""
    out: list[str] = []
    for p in paths:
        # (normpath keeps a leading "//": "//home/user" would pass as another path)
        if not isinstance(p, str) or not p.startswith("/") or p.startswith("//") \
                or posixpath.normpath(p) != p or p == "/" or p in out:
            raise ValueError(f"writable: {p!r} is not a distinct, normal absolute path")
        if any(p == top or p.startswith(top + "/") or top.startswith(p + "/")
               for top in (HOME, "/proc", "/sys", "/dev")):
            raise ValueError(f"writable: {p!r} is the home, holds it or is a kernel filesystem")
        out.append(p)
    return tuple(out)


def content_hash(data: dict, parent: Recipe | None) -> str:
    """What names the built image: the recipe's image keys, its base image's hash and the
    builder's version."""
    image_part = {k: data[k] for k in IMAGE_KEYS if k in data}
    if parent is not None:
        image_part["base"] = parent.content_hash
    raw = json.dumps(image_part, sort_keys=True).encode()
    return hashlib.sha256(raw + BUILDER_VERSION.encode()).hexdigest()[:16]


@functools.cache
def available() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in RECIPES.glob("*.toml")))


def build_order(names: tuple[str, ...] | list[str]) -> list[Recipe]:
    """The distinct images these templates need, each after the image it extends."""
    order: list[Recipe] = []

    def visit(name: str) -> None:
        recipe = load(name)
        if recipe is None:
            raise RecipeError(f"unknown template {name!r}")
        if recipe.image != recipe.name:
            return visit(recipe.image)
        if recipe.base:
            visit(recipe.base)
        if recipe not in order:
            order.append(recipe)

    for n in names:
        visit(n)
    return order
