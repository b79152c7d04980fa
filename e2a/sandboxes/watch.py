"""Noticing at once that a sandbox died: a pidfd for each of its long-lived host processes
(gVisor's Sentry and gofer), registered with the event loop, becomes readable the moment the
process exits, whatever killed it (the host OOM killer, `kill -9`, a panic in runsc).

What a pidfd cannot see is covered by the manager's sweep (every E2A_DEATH_CHECK_INTERVAL):
a sandbox whose systrap stub processes are all gone can no longer run anything (envd's
address space is among them) although its Sentry waits on; the sweep sees the empty set in the
cgroup and confirms with one call to the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("e2a.watch")


def runsc_processes(cgroup_procs: list[int]) -> list[int]:
    """Of a sandbox's host processes, the long-lived runsc ones (Sentry, gofer). The systrap stub
    processes come and go with the sandbox's own processes, so they are not watched one by one:
    the Sentry notices a stub's death itself."""
    keep = []
    for pid in cgroup_procs:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.startswith(b"runsc"):
            keep.append(pid)
    return keep


class DeathWatch:
    def __init__(self, on_death: Callable[[str, int], None]):
        self.on_death = on_death
        self._fds: dict[str, list[int]] = {}
        self._pids: dict[str, list[int]] = {}

    def watch(self, key: str, pids: list[int]) -> bool:
        """Watch `pids` under `key`; False (and nothing watched) if one of them is gone already."""
        self.unwatch(key)
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        self._fds[key] = fds
        self._pids[key] = list(pids)
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.unwatch(key)
                return False
            fds.append(fd)
            loop.add_reader(fd, self._fired, key, pid)
        return True

    def watching(self, key: str) -> bool:
        return key in self._fds

    def pids(self, key: str) -> set[int]:
        return set(self._pids.get(key, ()))

    def _fired(self, key: str, pid: int) -> None:
        self.unwatch(key)
        self.on_death(key, pid)

    def unwatch(self, key: str) -> None:
        fds = self._fds.pop(key, [])
        self._pids.pop(key, None)
        if not fds:
            return
        loop = asyncio.get_running_loop()
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.unwatch(key)
