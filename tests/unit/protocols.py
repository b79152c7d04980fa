"""What the provider protocol tests share: a tool to offer, an image to send back, one model
turn of a provider, and where the real agent CLIs are on this host."""

from __future__ import annotations

import asyncio
import os

from e2a.agents.own.llm import ToolSpec
from e2a.agents.ssrf import Policy
from e2a.config import Settings
from e2a.templates import builder, recipes

WRITE = ToolSpec("write_file", "Write a file.", {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["path", "content"]})
# The SSRF guard's policy for providers pointed at a server on this host (the mock, a closed
# port): 127.0.0.1 allowed, as E2A_LLM_PRIVATE_HOSTS=127.0.0.1 would.
LOCAL = Policy(frozenset({("127.0.0.1", None)}))
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def turn(provider, messages, tools=(WRITE,)):
    """One model turn of `provider` (closed afterwards): (the Turn, the streamed text deltas)."""
    deltas: list[str] = []

    async def on_text(text):
        deltas.append(text)

    async def go():
        try:
            return await provider.turn("You are a test.", messages, list(tools), on_text)
        finally:
            await provider.close()
    return asyncio.run(go()), deltas


def agents_prefix(has) -> str | None:
    """Where the agent CLIs are on this host: E2A_AGENTS_PREFIX, else the standard template's
    built image (its /opt/e2a/agents: the very binaries sandboxes run; `make test` builds it
    first), else an install of one's own in /opt/e2a/agents. `has(prefix)` says whether the
    CLI wanted is there."""
    image = builder.rootfs_path(Settings().cache_dir, recipes.load("standard")) / "opt/e2a/agents"
    for prefix in (os.environ.get("E2A_AGENTS_PREFIX"), str(image), "/opt/e2a/agents"):
        if prefix and has(prefix):
            return prefix
    return None
