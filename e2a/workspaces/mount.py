"""One sandbox's workspace: an rclone FUSE mount of the workspace's S3 prefix, on the host, bound
into the sandbox as /home/user. The S3 keys stay on the host, in rclone's environment.

In the sandbox's directory (only root may enter it):

    home/             the mount point
    workspace-cache/  rclone's VFS cache, a btrfs subvolume of its own: its limit is how much the
                      sandbox may read and write of the workspace (the storage quota, registry.py)
    workspace-meta/   the cache's metadata (linked from workspace-cache/vfsMeta), outside that
                      limit, so that a full cache still records which files are dirty
    workspace.sock    rclone's remote control, used to flush
    workspace.pid, workspace.log

Why these rclone flags: `--vfs-cache-mode full` (gVisor reads and writes files in ways that fail
with EIO on the lighter modes, measured), `--allow-other` (the gofer opens the files), `--links`
(symlinks kept as objects), a short write-back and directory cache (what a second sandbox on the
same workspace sees, and when: docs/workspaces.md), and a cache that never evicts (its size is
what the quota counts).

Nothing a process inside saw succeed may be lost: `close` (the sandbox's destroy) uploads every
dirty file before it returns, and if the mount is gone (killed with e2a), starts rclone again on
the same cache, which uploads what it left, then flushes that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp

from e2a import proc
from e2a.runtime import quota

log = logging.getLogger("e2a.workspaces")

UID = GID = 1000  # the sandbox's user (templates/builder.py SANDBOX_UID)
WRITE_BACK = 2.0  # seconds after a file is closed before its upload starts
DIR_CACHE = 10.0  # seconds a directory listing is trusted before S3 is asked again
MOUNT_TIMEOUT = 15.0
FLUSH_TIMEOUT = 600.0  # a destroy waits this long for uploads; then it is retried
DIRTY_SETTLE = 10.0  # how long a flush waits for dirty files to be queued, with nothing else to do
# A file whose upload failed this often fails the flush at once (S3 down, or an object S3
# refuses): the destroy is retried later instead of waiting out FLUSH_TIMEOUT.
FLUSH_TRIES = 3


class MountError(Exception):
    """The workspace could not be mounted or flushed."""


class Refused(MountError):
    """S3 refused some uploads again and again."""

    def __init__(self, names: list[str], message: str):
        super().__init__(message)
        self.names = names


class Mount:
    def __init__(self, sandbox_dir: Path, rclone: str, env: dict[str, str], remote: str,
                 size: int = 0):
        self.dir = sandbox_dir
        self.size = size        # what `df` shows as the disk's size (the cache's limit); 0: 1 PiB
        self.rclone = rclone
        self.env = env          # the S3 remote's settings (keys included)
        self.remote = remote    # e.g. ws:e2a-workspaces/w/wsp_...
        self.point = sandbox_dir / "home"
        self.cache = sandbox_dir / "workspace-cache"
        self.meta = sandbox_dir / "workspace-meta"
        self.sock = sandbox_dir / "workspace.sock"
        self.pidfile = sandbox_dir / "workspace.pid"
        self.logfile = sandbox_dir / "workspace.log"

    # ---- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Mount (the cache volume must exist); returns once the mount answers."""
        self.point.mkdir(exist_ok=True)
        self.meta.mkdir(exist_ok=True)
        link = self.cache / "vfsMeta"
        if not link.is_symlink():
            link.symlink_to(self.meta)
        self.sock.unlink(missing_ok=True)
        (self.dir / "rclone.conf").touch(mode=0o600)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "RCLONE_CONFIG": str(self.dir / "rclone.conf"), **self.env}
        p = await proc.spawn_daemon([
            self.rclone, "mount", self.remote, str(self.point),
            "--vfs-cache-mode", "full", "--allow-other", "--links",
            "--uid", str(UID), "--gid", str(GID), "--dir-perms", "0700",
            "--file-perms", "0700", "--cache-dir", str(self.cache),
            "--vfs-cache-max-age", "1000000h", "--vfs-cache-poll-interval", "1m",
            "--vfs-write-back", f"{WRITE_BACK}s", "--dir-cache-time", f"{DIR_CACHE}s",
            "--rc", "--rc-addr", f"unix://{self.sock}", "--rc-no-auth",
            "--log-level", "NOTICE",
            *(["--vfs-disk-space-total-size", f"{self.size}B"] if self.size else []),
        ], env, str(self.logfile))  # outlives a restart of e2a, like the sandbox
        self.pidfile.write_text(str(p.pid))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (self.mounted() and self.sock.exists()):
            if p.returncode is not None or time.monotonic() > deadline:
                await self._kill()
                raise MountError(f"rclone mount failed: {self._log_tail()}")
            await asyncio.sleep(0.01)

    # ---- state -----------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this mount's rclone, if it runs."""
        return proc.pid_in(self.pidfile, b"mount", str(self.point).encode())

    def mounted(self) -> bool:
        return quota.mount_fstype(self.point) is not None

    def alive(self, mounts: dict[str, str] | None = None) -> bool:
        """rclone runs and its FUSE mount is there (in `mounts`, quota.mount_table(), if given:
        a sweep over many sandboxes reads the table once)."""
        fstype = mounts.get(str(self.point)) if mounts is not None else quota.mount_fstype(
            self.point)
        return fstype == "fuse.rclone" and self.pid() is not None

    def dirty(self) -> list[str]:
        """Files of the cache not yet uploaded, as rclone's metadata records them."""
        found = []
        if self.meta.is_dir():
            for path in self.meta.rglob("*"):
                try:
                    if path.is_file() and json.loads(path.read_text()).get("Dirty"):
                        found.append(str(path.relative_to(self.meta)))
                except (OSError, ValueError):
                    continue
        return found

    # ---- flush and stop --------------------------------------------------------------------

    async def close(self, store_answers) -> list[str]:
        """Upload everything and unmount. Raises MountError if something stays unuploaded
        while S3 may come back (the caller retries later: the cache is kept until then).
        Returns the files S3 itself refused again and again while answering otherwise (a key
        too long for it, say): those can never be stored, and are given up."""
        for attempt in range(2):
            if not self.alive():
                await self._kill()
                if not self.dirty():
                    return []
                # A mount that died with files unuploaded: rclone, started again on its cache,
                # queues them for upload.
                log.warning("%s: mount was gone with %d unuploaded files; recovering",
                            self.dir.name, len(self.dirty()))
                await self.start()
            try:
                await self.flush()
            except Refused as exc:
                if not await store_answers():
                    raise MountError(f"{exc} (and S3 does not answer)") from exc
                await self._unmount()
                return exc.names
            await self._unmount()
            if not self.dirty():
                return []
        raise MountError(f"files still unuploaded after two flushes: {self.dirty()[:5]}")

    async def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Start every queued upload now and wait until none is left, nor any file that
        rclone's metadata still marks dirty: a file released a moment after the sandbox
        stopped, or found in the cache by a recovering mount, is queued only a little later."""
        deadline = time.monotonic() + timeout
        settle = time.monotonic() + DIRTY_SETTLE
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(self.sock))) as rc:
            while True:
                queue = (await _rc(rc, "vfs/queue")).get("queue") or []
                failing = [i["name"] for i in queue if i.get("tries", 0) >= FLUSH_TRIES]
                if failing:
                    raise Refused(failing, f"S3 refused {len(failing)} uploads {FLUSH_TRIES} "
                                  f"times (e.g. {failing[0]!r}): see {self.logfile}")
                for item in queue:  # a failed one waits out rclone's own backoff
                    if item.get("expiry", 0) > 0 and not item.get("uploading") \
                            and not item.get("tries"):
                        try:  # it may have started (or finished) meanwhile
                            await _rc(rc, "vfs/queue-set-expiry", id=item["id"], expiry=0)
                        except MountError:
                            pass
                stats = (await _rc(rc, "vfs/stats")).get("diskCache", {})
                idle = not queue and not stats.get("uploadsInProgress") \
                    and not stats.get("uploadsQueued")
                if idle and (time.monotonic() > settle
                             or not await asyncio.to_thread(self.dirty)):
                    return  # (dirty files still unqueued after DIRTY_SETTLE: close() recovers)
                if not idle:
                    settle = time.monotonic() + DIRTY_SETTLE
                if time.monotonic() > deadline:
                    raise MountError(f"uploads still pending after {timeout:.0f} s: "
                                     f"{len(queue)} files")
                await asyncio.sleep(0.05)

    async def _unmount(self) -> None:
        if self.mounted():
            await proc.run(["fusermount3", "-u", str(self.point)], check=False, timeout=30)
        pid = self.pid()
        deadline = time.monotonic() + 10
        while pid is not None and proc.alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._kill()

    async def _kill(self) -> None:
        """No rclone and no mount left, whatever state they are in."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(200):
                if not proc.alive(pid):
                    break
                await asyncio.sleep(0.01)
        if self.mounted():  # a dead FUSE server leaves its mount ("transport endpoint...")
            await proc.run(["fusermount3", "-u", "-z", str(self.point)], check=False,
                           timeout=30)
        if self.mounted():
            raise MountError(f"{self.point} is still mounted")
        self.pidfile.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-600:].strip()
        except OSError:
            return "(no log)"


async def _rc(session: aiohttp.ClientSession, path: str, **params) -> dict:
    async with session.post(f"http://rclone/{path}", json=params,
                            timeout=aiohttp.ClientTimeout(total=30)) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise MountError(f"rclone {path}: {data.get('error', r.status)}")
        return data
