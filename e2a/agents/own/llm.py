"""The own agent's conversation in a provider-neutral shape, and what a provider must do with it.

A conversation is a list of messages:

    UserText(text)                          the task (or a follow-up)
    AssistantTurn(text, tool_calls)         what the model said and asked for
    ToolResult(call_id, name, content, is_error)
        content: a list of parts, {"type": "text", "text": ...} or
                 {"type": "image", "media_type": "image/png", "data": <base64>}

Each provider turns that into its own wire format, streams one model turn back (text deltas go
to `on_text` as they arrive), and answers a Turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Union


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]          # JSON Schema of the arguments (an object)
    # "computer": the desktop tool. A provider with a native computer-use tool (Anthropic's,
    # for Claude models) uses it instead of `parameters`, with the screen size given here.
    native: str | None = None
    display: tuple[int, int] | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class UserText:
    text: str


@dataclass
class AssistantTurn:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    # Provider-specific items that must be sent back verbatim on the next request (e.g. an
    # OpenAI Responses reasoning item, Gemini thought signatures); None when there are none.
    raw: Any = None


@dataclass
class ToolResult:
    call_id: str
    name: str
    content: list[dict[str, Any]]
    is_error: bool = False


Message = Union[UserText, AssistantTurn, ToolResult]


@dataclass
class Turn:
    message: AssistantTurn
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str | None = None


class ProviderError(Exception):
    """The provider refused or failed for good (after the SDK's retries): `status` is its HTTP
    status when there was one, the message its own words."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Provider(Protocol):
    vendor: str
    model: str
    requests: int        # HTTP requests sent to the provider so far, retries included

    async def turn(self, system: str, messages: list[Message], tools: list[ToolSpec],
                   on_text: Callable[[str], Awaitable[None]]) -> Turn: ...

    async def close(self) -> None: ...
