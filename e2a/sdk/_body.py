"""Turn what a caller hands to ``write``/``upload_tar`` into a streamed request body, and stream
response bodies to a local file; sync and async variants side by side."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, AsyncIterator, BinaryIO, Iterator

from ._core import CHUNK, iter_file

Body = Any  # bytes | str | os.PathLike | binary file object | iterable of bytes


def _prepared(data: Body, stack: contextlib.ExitStack) -> tuple[Any, dict[str, str]]:
    """(content, extra headers). Local paths are opened here and closed by ``stack``.

    ``str`` is text content, not a path: pass a ``pathlib.Path`` to upload a local file.
    """
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), {}
    if isinstance(data, os.PathLike):
        f = stack.enter_context(open(data, "rb"))
        # Known size: send Content-Length instead of chunked encoding (kinder to proxies).
        return f, {"Content-Length": str(os.fstat(f.fileno()).st_size)}
    return data, {}


@contextlib.contextmanager
def sync_body(data: Body) -> Iterator[tuple[Any, dict[str, str]]]:
    with contextlib.ExitStack() as stack:
        content, headers = _prepared(data, stack)
        if hasattr(content, "read"):
            content = iter_file(content)
        yield content, headers


async def _aiter_file(f: BinaryIO) -> AsyncIterator[bytes]:
    # Disk reads happen in a thread so a big upload does not stall the event loop.
    while piece := await asyncio.to_thread(f.read, CHUNK):
        yield piece


async def _aiter_sync(it: Any) -> AsyncIterator[bytes]:
    for piece in it:
        yield piece


@contextlib.contextmanager
def async_body(data: Body) -> Iterator[tuple[Any, dict[str, str]]]:
    with contextlib.ExitStack() as stack:
        content, headers = _prepared(data, stack)
        if hasattr(content, "read"):
            content = _aiter_file(content)
        elif not isinstance(content, bytes) and not hasattr(content, "__aiter__"):
            content = _aiter_sync(content)  # httpx.AsyncClient only accepts async iterables
        yield content, headers


@contextlib.contextmanager
def open_dest(dest: str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    """A local path is opened (and closed) here; a file object is used as is and left open."""
    if isinstance(dest, (str, os.PathLike)):
        with open(dest, "wb") as f:
            yield f
    else:
        yield dest
