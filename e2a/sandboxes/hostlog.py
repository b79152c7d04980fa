"""The host's own lines about each sandbox (start, state changes, destroy), as JSON lines."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


class HostLog:
    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, sandbox_id: str) -> Path:
        return self.dir / f"{sandbox_id}.jsonl"

    def write(self, sandbox_id: str, message: str) -> None:
        line = {"ts": datetime.now(timezone.utc).isoformat(), "source": "host", "message": message}
        with self.path(sandbox_id).open("a") as f:
            f.write(json.dumps(line) + "\n")

    def read(self, sandbox_id: str) -> list[dict]:
        try:
            text = self.path(sandbox_id).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
