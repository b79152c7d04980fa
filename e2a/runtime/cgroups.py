"""Host cgroups for sandboxes, managed by e2a itself (runsc runs with --ignore-cgroups).

Why not let runsc do it: a sandbox boots about 100 ms faster when its CPU quota applies only once
it is up (gVisor's boot is CPU-bound; 0.5 vCPU halves it). So the memory limit is set before
start, the CPU quota right after the agent answers. Works with cgroup v1 (memory and cpu
controllers) and v2 (unified hierarchy).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V2 = (ROOT / "cgroup.controllers").is_file()
PERIOD_US = 100_000


class Cgroup:
    def __init__(self, parent: str, name: str):
        self.parent, self.name = parent, name
        if V2:
            self.dirs = {"memory": ROOT / parent / name, "cpu": ROOT / parent / name}
        else:
            self.dirs = {c: ROOT / c / parent / name for c in ("memory", "cpu")}

    def create(self, memory_bytes: int) -> None:
        if V2:
            parent = ROOT / self.parent
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+memory +cpu")
        for d in set(self.dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        if V2:
            (self.dirs["memory"] / "memory.max").write_text(str(memory_bytes))
            (self.dirs["memory"] / "memory.swap.max").write_text("0")
        else:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            # no swap beyond the limit (ignored where swap accounting is off)
            try:
                (self.dirs["memory"] / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            except OSError:
                pass

    def set_cpu_quota(self, quota_us: int) -> None:
        """`quota_us` of CPU time per 100 ms on average, and a burst of as much again (CFS
        burst): an agent's sandbox idles, then runs a command; unused quota lets that command
        run at full speed for up to one extra quota, the long-run average staying the same."""
        d = self.dirs["cpu"]
        if V2:
            (d / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
            burst = d / "cpu.max.burst"
        else:
            (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota_us))
            burst = d / "cpu.cfs_burst_us"
        if burst.exists():  # kernels >= 5.14
            burst.write_text(str(quota_us))

    def procs_files(self) -> list[str]:
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def exec_inside(self, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside this cgroup, so every child it forks is born there.

        A shell joins, then execs: cheaper than a preexec_fn, which would stop Python from using
        vfork (a fork of the ~100 MB server costs ~18 ms)."""
        files = self.procs_files()
        script = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done; '
                  'exec "$@"')
        return ["/bin/sh", "-c", script, "sh", str(len(files)), *files, *argv]

    def remove(self) -> None:
        for d in set(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # still has processes: removed by reconciliation once they are gone

    def memory_usage(self) -> int | None:
        name = "memory.current" if V2 else "memory.usage_in_bytes"
        try:
            return int((self.dirs["memory"] / name).read_text())
        except (OSError, ValueError):
            return None


def leaves(parent: str) -> set[str]:
    """Names of the cgroups under `parent` (in any controller)."""
    bases = [ROOT / parent] if V2 else [ROOT / c / parent for c in ("memory", "cpu")]
    return {p.name for b in bases if b.is_dir() for p in b.iterdir() if p.is_dir()}
