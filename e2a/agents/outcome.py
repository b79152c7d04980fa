"""What an agent run came to, whichever agent ran it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outcome:
    """Filled in while the agent runs (from its events) and read when it ends."""

    result: str | None = None      # the agent's final message
    error: str | None = None       # why it failed, in the agent's or provider's words
    input_tokens: int = 0
    output_tokens: int = 0
    succeeded: bool | None = None  # None: the agent never said (then its exit status decides)
