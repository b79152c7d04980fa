"""The sandbox's host cgroup: runsc creates it (with the memory limit, which gVisor also uses as
the sandbox's own view of its memory); e2a raises the memory limit by the sandbox's overhead
right after boot (runtime/runsc.py) and adds the CPU quota once the sandbox is up.

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

    def _memory_dir(self) -> Path:
        return ROOT / self.parent / self.name if V2 else ROOT / "memory" / self.parent / self.name

    def set_memory_limit(self, limit_bytes: int) -> None:
        """The host's hard limit on the sandbox's memory (Sentry, gofer, stubs, gVisor's memory
        file), with no swap beyond it where the host accounts swap. runsc set the template's size
        from the OCI spec at boot, and gVisor sized its MemTotal from that; e2a raises the host
        limit afterwards by the sandbox's overhead (docs/runtime.md, "Memory")."""
        d = self._memory_dir()
        if V2:
            (d / "memory.max").write_text(str(limit_bytes))
            swap = d / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
            return
        mem, memsw = d / "memory.limit_in_bytes", d / "memory.memsw.limit_in_bytes"
        # memory+swap may never be below memory: raise memsw first, lower it last.
        current = int(mem.read_text())
        order = [memsw, mem] if limit_bytes >= current else [mem, memsw]
        for f in order:
            if f.exists():
                f.write_text(str(limit_bytes))

    def prepare_memory(self, limit_bytes: int) -> None:
        """Make the memory cgroup before runsc does, with `limit_bytes`: runsc then uses it as
        it is ("pre-created") instead of setting the OCI spec's limit. A restore needs this:
        it loads the sandbox's whole memory before returning, past the spec's limit when the
        sandbox had used its margin, and runsc refuses a spec whose limit differs from the
        checkpointed one."""
        self._memory_dir().mkdir(parents=True, exist_ok=True)
        self.set_memory_limit(limit_bytes)

    def memory_limit(self) -> int:
        """The host limit in bytes (a very large number when unlimited)."""
        d = self._memory_dir()
        raw = (d / ("memory.max" if V2 else "memory.limit_in_bytes")).read_text().strip()
        return 1 << 62 if raw == "max" else int(raw)

    def oom_kills(self) -> int:
        """How many processes the host's OOM killer killed in this cgroup (0 if unreadable):
        the `oom_kill` field of memory.oom_control (cgroup v1) or memory.events (v2).

        It counts every kill, and since e2a steers the OOM killer to the systrap stubs
        (runtime/runsc.py), most are one sandbox process killed *inside* (exit 137) with the
        sandbox going on; a rise together with the Sentry's death is the sandbox killed whole."""
        f = self._memory_dir() / ("memory.events" if V2 else "memory.oom_control")
        try:
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def cpu_used_us(self) -> int:
        """CPU time the sandbox's host processes have used, in microseconds."""
        if V2:
            for line in (self._cpu_dir() / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1])
            return 0
        acct = ROOT / "cpuacct" / self.parent / self.name / "cpuacct.usage"
        return int(acct.read_text()) // 1000

    def procs(self) -> list[int]:
        """The host processes in the sandbox's cgroup (runsc's Sentry, gofer, systrap stubs)."""
        try:
            return [int(p) for p in (self._memory_dir() / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def exists(self) -> bool:
        return any(d.is_dir() for d in self._dirs())

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
