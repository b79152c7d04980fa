"""A user's LLM key: what a valid one looks like, and cutting it out of what e2a shows.

A provider's error can quote the key it was given ("Incorrect API key provided: sk-..."), and
an agent's events, a task's error and result go to the user's client and the database. Every
one of them passes through `scrub` with the keys the agent has held, so the key never does.
"""

from __future__ import annotations

from typing import Any

REDACTED = "[redacted]"
MAX_KEY = 4096
# Shorter "keys" ("EMPTY", "none": what local OpenAI-compatible servers take) are not secrets,
# and cutting them out of text would mangle it.
SCRUB_FROM = 8


def problem(key: str) -> str | None:
    """Why the key cannot be one (it goes in an HTTP header), or None. Whitespace at its ends
    (a paste's newline) is not part of it: callers use key.strip()."""
    key = key.strip()
    if not key:
        return "is empty"
    if len(key) > MAX_KEY:
        return f"is longer than {MAX_KEY} characters"
    if not all("\x21" <= ch <= "\x7e" for ch in key):
        return "may hold printable ASCII only (no spaces, line breaks or control characters)"
    return None


def scrub(value: Any, keys: set[str] | frozenset[str]) -> Any:
    """`value` (text, or JSON-like data) with every key replaced by [redacted]."""
    if not keys:
        return value
    if isinstance(value, str):
        for key in keys:
            if key in value:
                value = value.replace(key, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, keys) for v in value]
    return value
