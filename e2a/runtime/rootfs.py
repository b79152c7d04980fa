"""Each sandbox's root filesystem: the shared, read-only template image as the lower layer of a
host overlayfs, with the sandbox's own upper layer on the host disk.

Why not gVisor's own rootfs overlay (--overlay2): its upper layer lives in the Sentry's memory
file, charged to the sandbox's memory cgroup, so writing more than the memory limit (a 1 GiB
file in a 512 MiB sandbox) killed the sandbox. Here written data is ordinary page cache of a disk
file, written back and reclaimed by the kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

from e2a import proc


class Layer:
    def __init__(self, sandbox_dir: Path):
        self.upper = sandbox_dir / "upper"
        self.work = sandbox_dir / "work"
        self.merged = sandbox_dir / "rootfs"

    async def mount(self, lower: Path) -> None:
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        # nosuid, nodev: whatever the sandbox writes is never a setuid program or a device node
        # on the host (the directory is 0700 besides).
        await proc.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"nosuid,nodev,lowerdir={lower},upperdir={self.upper},workdir={self.work}",
                        str(self.merged)])

    async def unmount(self) -> None:
        if is_mounted(self.merged):
            await proc.run(["umount", str(self.merged)], check=False)
        if is_mounted(self.merged):  # still busy: detach now, freed when the last user goes
            await proc.run(["umount", "-l", str(self.merged)], check=False)


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def mounts_under(directory: Path) -> list[str]:
    """Mount points below `directory`, deepest first (the order to unmount them in)."""
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    return sorted(targets, key=len, reverse=True)
