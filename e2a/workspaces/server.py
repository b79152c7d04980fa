"""The embedded S3 server: `rclone serve s3` over an rclone crypt remote in <data_dir>/s3.

Started by `e2a serve` when no S3 endpoint is configured (docs/storage.md says why this server:
measured against SeaweedFS). It listens on 127.0.0.1 only: everything that talks to it (the API,
the rclone mounts, presigned URLs used on this machine) is on the host, and loopback traffic never
leaves the kernel; a deployment that hands presigned URLs to other machines puts a TLS proxy in
front and sets E2A_S3_PUBLIC_URL. Objects are encrypted at rest by the crypt remote
(XSalsa20-Poly1305, a random nonce per file) under the workspace key; names stay readable, as with
S3's own server-side encryption, so that every name a sandbox can make (255 bytes) fits.

The server outlives `e2a serve` on purpose: sandboxes (and their mounts, still uploading) keep
running across a restart, so the server is adopted by its pid file at the next start, and stopped
only when e2a stops with no workspace mounted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import time

from e2a import proc
from e2a.workspaces.s3 import Endpoint

log = logging.getLogger("e2a.s3")

REMOTE = "e2astore"  # the crypt remote's name in the server's environment


class ServerError(Exception):
    """The embedded S3 server did not start."""


class EmbeddedS3:
    def __init__(self, settings):
        self.settings = settings
        self.rclone = settings.rclone
        self.port = settings.s3_port
        self.dir = settings.data_dir / "s3"
        self.objects = self.dir / "objects"
        self.pidfile = self.dir / "server.pid"
        self.credentials = self.dir / "credentials.json"
        self.logfile = settings.data_dir / "logs" / "s3.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self) -> Endpoint:
        creds = self._credentials()
        return Endpoint(url=self.url, region=self.settings.s3_region,
                        bucket=self.settings.s3_bucket, access_key=creds["access_key"],
                        secret_key=creds["secret_key"], provider="Rclone",
                        public_url=self.settings.s3_public_url)

    # ---- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        for d in (self.dir, self.objects, self.logfile.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        creds = self._credentials()
        if self._running_pid() is not None and await self._answers(1.0):
            log.info("adopted the S3 server already running on %s", self.url)
            return
        await self.stop()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "RCLONE_CONFIG": str(self.dir / "rclone.conf"),  # none: not root's own
               "RCLONE_AUTH_KEY": f'"{creds["access_key"]},{creds["secret_key"]}"',
               **await self._crypt_env()}
        (self.dir / "rclone.conf").touch(mode=0o600)
        # Not in e2a's process group: it outlives a restart (mounts may still be uploading).
        p = await proc.spawn_daemon(
            [self.rclone, "serve", "s3", f"{REMOTE}:", "--addr", f"127.0.0.1:{self.port}",
             "--force-path-style=true", "--log-level", "NOTICE"], env, str(self.logfile))
        self.pidfile.write_text(str(p.pid))
        if not await self._answers(15.0):
            await self.stop()
            tail = self.logfile.read_text(errors="replace")[-600:]
            raise ServerError(f"the embedded S3 server did not answer on {self.url}: {tail}")
        log.info("started the embedded S3 server on %s (pid %d)", self.url, p.pid)

    async def stop(self) -> None:
        pid = self._running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not proc.alive(pid):
                    break
                await asyncio.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)

    # ---- keys ------------------------------------------------------------------------------

    def _credentials(self) -> dict[str, str]:
        """The server's one S3 key pair, made once (only e2a and its mounts use it)."""
        if not self.credentials.exists():
            data = {"access_key": "e2a" + secrets.token_hex(10),
                    "secret_key": secrets.token_urlsafe(30)}
            fd = os.open(self.credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
        return json.loads(self.credentials.read_text())

    def _workspace_key(self) -> str:
        if self.settings.workspace_key:
            return self.settings.workspace_key
        path = self.settings.data_dir / "workspace.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    async def _crypt_env(self) -> dict[str, str]:
        # rclone wants the password "obscured" (its reversible encoding); given on stdin, so
        # that it never appears in a process list.
        obscured = (await proc.run([self.rclone, "obscure", "-"],
                                   stdin=self._workspace_key().encode(), timeout=10)).strip()
        pre = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        return {pre + "TYPE": "crypt", pre + "REMOTE": str(self.objects),
                pre + "PASSWORD": obscured, pre + "FILENAME_ENCRYPTION": "off",
                pre + "DIRECTORY_NAME_ENCRYPTION": "false",
                # Names as they are, not name + ".bin": a name of 252-255 bytes (allowed in a
                # sandbox) would not fit the host's 255 and could never be uploaded.
                pre + "SUFFIX": "none"}

    # ---- process ---------------------------------------------------------------------------

    def _running_pid(self) -> int | None:
        return proc.pid_in(self.pidfile, b"serve", b"s3")

    async def _answers(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                await asyncio.sleep(0.05)
        return False
