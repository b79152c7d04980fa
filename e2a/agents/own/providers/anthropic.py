"""Anthropic's Messages API (streamed) through the official SDK, `anthropic`.

The desktop tool of a Claude model is Anthropic's native computer-use tool (its actions and
arguments are the ones e2a's `computer` tool takes), with the beta header it needs; every
other tool is a plain tool with its JSON Schema. The system prompt and the conversation so far
are marked for prompt caching: an agent's turns resend the whole conversation, and a cached
prefix costs the user a tenth. A model turn's content blocks are kept verbatim in
AssistantTurn.raw and sent back as they came (thinking blocks must keep their signatures).
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import anthropic
import httpx2

from e2a.agents import ssrf
from e2a.agents.own.llm import (AssistantTurn, Message, ProviderError, ToolCall, ToolResult,
                                ToolSpec, Turn)

# The error types Anthropic names, by the status it answers them with: an error that comes
# inside a stream that began with 200 has a type but no status of its own.
STATUSES = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
            "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
            "rate_limit_error": 429, "api_error": 500, "timeout_error": 504,
            "overloaded_error": 529}
CACHED = {"type": "ephemeral"}


class AnthropicProvider:
    vendor = "anthropic"

    def __init__(self, *, model: str, key: str, base_url: str, policy: ssrf.Policy,
                 max_retries: int = 4, timeout: float = 600.0):
        self.model = model
        self.requests = 0
        # The SDK's own client class (it speaks httpx2), hooked so every request it sends,
        # retries too, is counted. Every connection goes through the SSRF guard (a caller's
        # base_url may resolve to a private address by the time it is called), and no redirect
        # is followed: it would take the host wherever its answer says.
        self._http = ssrf.guarded_httpx2_client(policy, anthropic.DefaultAsyncHttpxClient,
                                                event_hooks={"request": [self._count]})
        # The key is given, so the SDK reads no credentials from e2a's environment.
        self._client = anthropic.AsyncAnthropic(
            api_key=key, base_url=api_root(base_url), max_retries=max_retries,
            timeout=timeout, http_client=self._http)

    async def _count(self, request: httpx2.Request) -> None:
        self.requests += 1

    async def turn(self, system: str, messages: list[Message], tools: list[ToolSpec],
                   on_text: Callable[[str], Awaitable[None]]) -> Turn:
        wire_tools, betas = self._tools(tools)
        params: dict[str, Any] = dict(model=self.model, max_tokens=max_tokens(self.model),
                                      messages=wire_messages(messages))
        if system:
            params["system"] = [{"type": "text", "text": system, "cache_control": CACHED}]
        if wire_tools:
            params["tools"] = wire_tools
        if betas:
            params["betas"] = betas
        try:
            async with self._client.beta.messages.stream(**params) as stream:
                async for event in stream:
                    if event.type == "text" and event.text:
                        await on_text(event.text)
                final = await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            if 300 <= exc.status_code < 400:
                raise ProviderError(ssrf.redirected(exc.response.headers.get("location")),
                                    exc.status_code) from None
            status = exc.status_code if exc.status_code >= 400 else STATUSES.get(exc.type or "")
            raise ProviderError(exc.api_message or str(exc), status) from None
        except (anthropic.APIConnectionError, httpx2.HTTPError) as exc:
            refused = ssrf.refusal(exc)
            if refused:
                raise ProviderError(f"e2a did not call Anthropic's API: {refused}") from None
            raise ProviderError(f"Anthropic's API could not be reached ({type(exc).__name__}: "
                                f"{exc})") from None
        text = "".join(b.text for b in final.content if b.type == "text")
        calls = [ToolCall(b.id, b.name, dict(b.input or {})) for b in final.content
                 if b.type == "tool_use"]
        if final.stop_reason == "refusal" and not calls:
            raise ProviderError("the model declined to go on (stop_reason refusal)"
                                + (f": {text}" if text else ""))
        u = final.usage
        raw = [b.model_dump(mode="json", exclude_none=True) for b in final.content]
        return Turn(AssistantTurn(text, calls, raw),
                    input_tokens=u.input_tokens + (u.cache_creation_input_tokens or 0)
                    + (u.cache_read_input_tokens or 0),
                    output_tokens=u.output_tokens, stop_reason=final.stop_reason)

    def _tools(self, tools: list[ToolSpec]) -> tuple[list[dict], list[str]]:
        out, betas = [], []
        for t in tools:
            if t.native == "computer" and t.display and self.model.startswith("claude"):
                kind, beta = computer_tool_version(self.model)
                w, h = t.display
                out.append({"type": kind, "name": "computer", "display_width_px": w,
                            "display_height_px": h})
                betas.append(beta)
            else:
                out.append({"name": t.name, "description": t.description,
                            "input_schema": t.parameters})
        if out:   # the tools come first in the prompt: caching them keeps the prefix stable
            out[-1] = {**out[-1], "cache_control": CACHED}
        return out, betas

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()


def wire_messages(messages: list[Message]) -> list[dict]:
    """The conversation in the Messages API's shape: roles alternate, so the results of one
    model turn (and any text that follows them, a follow-up) make one user message, results
    first as the API requires."""
    out: list[dict] = []
    for m in messages:
        if isinstance(m, AssistantTurn):
            content = m.raw or ([{"type": "text", "text": m.text}] if m.text else []) + [
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in m.tool_calls]
            out.append({"role": "assistant", "content": list(content)})
            continue
        block = tool_result(m) if isinstance(m, ToolResult) else {"type": "text", "text": m.text}
        if out and out[-1]["role"] == "user":
            out[-1]["content"].append(block)
        else:
            out.append({"role": "user", "content": [block]})
    if out and out[-1]["role"] == "user":   # the conversation so far is the cached prefix
        last = out[-1]["content"]
        last[-1] = {**last[-1], "cache_control": CACHED}
    return out


def tool_result(m: ToolResult) -> dict:
    content = []
    for c in m.content:
        if c.get("type") == "image":
            content.append({"type": "image", "source": {
                "type": "base64", "media_type": c["media_type"], "data": c["data"]}})
        elif c.get("text"):   # the API refuses an empty text block
            content.append({"type": "text", "text": c["text"]})
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.call_id,
                             "content": content}
    if m.is_error:
        block["is_error"] = True
    return block


def computer_tool_version(model: str) -> tuple[str, str]:
    """The native computer tool's type and beta for a Claude model: computer_20250124 for the
    models before Opus 4.5 (Sonnet and Haiku 4.5 included), computer_20251124 for the rest."""
    m = re.match(r"claude-([a-z]+)-(\d+)(?:-(\d{1,2})(?!\d))?", model)
    if model.startswith("claude-3") or m is None:
        return "computer_20250124", "computer-use-2025-01-24"
    family, version = m.group(1), (int(m.group(2)), int(m.group(3) or 0))
    if version < (4, 5) or (version == (4, 5) and family != "opus"):
        return "computer_20250124", "computer-use-2025-01-24"
    return "computer_20251124", "computer-use-2025-11-24"


def max_tokens(model: str) -> int:
    """The most a model may write in one turn, within what every model of its family allows
    (the API refuses a request asking for more)."""
    if model.startswith("claude-3-5"):
        return 8192
    if model.startswith("claude-3-") and not model.startswith("claude-3-7"):
        return 4096
    return 32000


def api_root(base_url: str) -> str:
    """The API root of a base URL that may end in its version (the SDK adds /v1 itself)."""
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url
