"""Server settings: embedded defaults, overridable by E2A_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get("E2A_" + name, default)


@dataclass
class Settings:
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("PORT", "8080")))
    # Persistent state: the SQLite database and the log of each sandbox.
    data_dir: Path = field(default_factory=lambda: Path(_env("DATA_DIR", "/var/lib/e2a")))
    # Volatile state: runsc's state, bundles and each sandbox's writable layer.
    run_dir: Path = field(default_factory=lambda: Path(_env("RUN_DIR", "/run/e2a")))
    # Template images and the runsc build, keyed by content hash; survive clones and restarts.
    cache_dir: Path = field(default_factory=lambda: Path(_env("CACHE_DIR", "/var/cache/e2a")))
    database_url: str = field(default_factory=lambda: _env("DATABASE_URL", ""))
    runsc: str = field(default_factory=lambda: _env("RUNSC", ""))
    envd: str = field(default_factory=lambda: _env("ENVD", ""))
    # 10.201.0.0/16 cut into /30 links, one per sandbox.
    subnet: str = field(default_factory=lambda: _env("SUBNET", "10.201.0.0/16"))
    max_sandboxes: int = field(default_factory=lambda: int(_env("MAX_SANDBOXES", "256")))
    # Pre-started sandboxes per template, handed out on create (~15 MiB of host memory each).
    pool_size: int = field(default_factory=lambda: int(_env("POOL_SIZE", "2")))
    # Force one gVisor platform (ptrace, systrap) for every template; empty = each recipe's own.
    platform: str = field(default_factory=lambda: _env("PLATFORM", ""))
    reaper_interval: float = field(default_factory=lambda: float(_env("REAPER_INTERVAL", "1.0")))
    # Name prefix of every host object (netns, veth, cgroup, runsc id): lets tests run two servers.
    instance: str = field(default_factory=lambda: _env("INSTANCE", "e2a"))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.run_dir = Path(self.run_dir)
        self.cache_dir = Path(self.cache_dir)
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'e2a.db'}"
        if not self.runsc:
            self.runsc = str(self.cache_dir / "bin" / "runsc")
        if not self.envd:
            self.envd = str(Path(__file__).resolve().parent.parent / "build" / "envd")
