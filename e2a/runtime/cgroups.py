"""The sandbox's host cgroup: runsc creates it (with the memory limit, which gVisor also uses as
the sandbox's own view of its memory); e2a adds the CPU quota once the sandbox is up.

Why later: gVisor's boot is CPU-bound, and under a 0.5 vCPU quota it takes ~130 ms longer
(docs/runtime.md). Works with cgroup v1 and v2 (unified hierarchy).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V2 = (ROOT / "cgroup.controllers").is_file()
PERIOD_US = 100_000


class Cgroup:
    def __init__(self, parent: str, name: str):
        self.parent, self.name = parent, name

    @property
    def path(self) -> str:
        """The OCI spec's cgroupsPath."""
        return f"/{self.parent}/{self.name}"

    def _dirs(self) -> list[Path]:
        if V2:
            return [ROOT / self.parent / self.name]
        return [d / self.parent / self.name for d in ROOT.iterdir() if d.is_dir()]

    def _cpu_dir(self) -> Path:
        return ROOT / self.parent / self.name if V2 else ROOT / "cpu" / self.parent / self.name

    def set_cpu_quota(self, quota_us: int) -> None:
        """`quota_us` of CPU time per 100 ms on average, and a burst of as much again (CFS
        burst): an agent's sandbox idles, then runs a command; unused quota lets that command
        run at full speed for up to one extra quota, the long-run average staying the same."""
        d = self._cpu_dir()
        if V2:
            (d / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
            burst = d / "cpu.max.burst"
        else:
            (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota_us))
            burst = d / "cpu.cfs_burst_us"
        if burst.exists():  # kernels >= 5.14
            burst.write_text(str(quota_us))

    def procs(self) -> list[int]:
        """The host processes in the sandbox's cgroup (runsc's Sentry, gofer, systrap stubs)."""
        d = ROOT / self.parent / self.name if V2 else ROOT / "memory" / self.parent / self.name
        try:
            return [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        """runsc removes its cgroup on delete; this sweeps what a crash left."""
        for d in self._dirs():
            try:
                d.rmdir()
            except OSError:
                pass  # gone already, or still has processes (swept at the next reconcile)


def leaves(parent: str) -> set[str]:
    """Names of the cgroups under `parent`, in any controller."""
    bases = [ROOT / parent] if V2 else [d / parent for d in ROOT.iterdir() if d.is_dir()]
    return {p.name for b in bases if b.is_dir() for p in b.iterdir() if p.is_dir()}
