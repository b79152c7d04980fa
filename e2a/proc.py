"""Running host commands from asyncio, with errors that say what failed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


class CommandFailed(RuntimeError):
    def __init__(self, args: list[str], code: int, output: str):
        super().__init__(f"{' '.join(args)} exited {code}: {output.strip()[:500]}")
        self.code = code
        self.output = output


async def run(args: list[str], stdin: bytes | None = None, check: bool = True,
              timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandFailed(list(args), proc.returncode, text)
    return text


_daemons: set[asyncio.subprocess.Process] = set()


async def spawn_daemon(args: list[str], env: dict[str, str],
                       log: str) -> asyncio.subprocess.Process:
    """Start a long-lived process that outlives e2a (a session of its own: a restart of e2a or a
    signal to its process group leaves it running), its output appended to `log` (0600).

    The Process object is kept until the process exits: asyncio kills a child whose transport
    is garbage-collected while it runs."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        p = await asyncio.create_subprocess_exec(
            *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
            start_new_session=True)
    finally:
        os.close(fd)
    _daemons.add(p)
    task = asyncio.ensure_future(p.wait())
    task.add_done_callback(lambda _: _daemons.discard(p))
    return p


def pid_in(pidfile: Path, *argv: bytes) -> int | None:
    """The pid `pidfile` names if that process runs with each of `argv` among its arguments
    (a pid reused by another program is not it), else None."""
    try:
        pid = int(pidfile.read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if all(a in args for a in argv) else None


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
