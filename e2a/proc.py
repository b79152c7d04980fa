"""Running host commands from asyncio, with errors that say what failed."""

from __future__ import annotations

import asyncio


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
