"""What the benchmarks share: percentiles, and what else ran on the machine while they did (the
machine is shared, so each figure is stored with the load beside it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, interpolated between the two nearest samples."""
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def others() -> dict:
    """What else runs on the machine (other engineers' tests and servers)."""
    def count(pattern: str) -> int:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        return len([p for p in out.split() if int(p) != os.getpid()])
    return {"e2a_serve": count("bin/e2a serve"), "pytest": count("pytest"),
            "runsc_sandboxes": count("runsc-sandbox"), "load": load()}


def save(results: Path, out: dict, partial: bool) -> None:
    """Write a run's figures; a partial run (some parts only) keeps the other parts' figures
    from the file."""
    if partial and results.exists():
        out = {**json.loads(results.read_text()), **out}
    results.write_text(json.dumps(out, indent=1) + "\n")
