"""The CLI agents e2a runs, by the name the API gives them."""

from __future__ import annotations

from e2a.agents.cli import CliAgent

NAMES = ("claude-code", "codex", "gemini-cli")


def get(name: str) -> CliAgent | None:
    """The CLI agent of that name; None for e2a's own agent (or an unknown name)."""
    if name == "claude-code":
        from e2a.agents.clis.claude_code import ClaudeCode
        return ClaudeCode()
    if name == "codex":
        from e2a.agents.clis.codex import Codex
        return Codex()
    if name == "gemini-cli":
        from e2a.agents.clis.gemini_cli import GeminiCli
        return GeminiCli()
    return None
