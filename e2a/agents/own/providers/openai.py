"""OpenAI's Responses API, and the Chat Completions dialect of DeepSeek and every
OpenAI-compatible server, both streamed through the official SDK, `openai`.

Responses (OpenAIResponsesProvider): nothing is stored at OpenAI (store false): the whole
conversation is sent each turn, and a reasoning model's reasoning comes back encrypted
(include reasoning.encrypted_content) inside the turn's output items, which are kept verbatim
in AssistantTurn.raw and sent back as they came, so the model keeps its reasoning across its
tool calls. A tool result's images go in the function_call_output itself.

Chat Completions (ChatCompletionsProvider): tool results are `tool` messages, which take text
alone, so their images follow in a user message. A thinking model's reasoning_content (DeepSeek)
is kept and sent back with the assistant's tool calls of the current task, which DeepSeek's
thinking mode requires; older turns go without it, as DeepSeek asks.

The desktop tool is a plain function tool here (the native computer-use tool is Anthropic's).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import httpx2
import openai

from e2a.agents import ssrf
from e2a.agents.own.llm import (AssistantTurn, Message, ProviderError, ToolCall, ToolResult,
                                ToolSpec, Turn, UserText)


class _Base:
    vendor = "openai"

    def __init__(self, *, model: str, key: str, base_url: str, policy: ssrf.Policy,
                 max_retries: int = 4, timeout: float = 600.0):
        self.model = model
        self.requests = 0
        # The SDK's own client class, hooked so every request it sends, retries too, counts.
        # Every connection goes through the SSRF guard (a caller's base_url may resolve to a
        # private address by the time it is called), and no redirect is followed: it would
        # take the host wherever its answer says.
        self._http = ssrf.guarded_httpx2_client(policy, openai.DefaultAsyncHttpxClient,
                                                event_hooks={"request": [self._count]})
        # Everything given, so the SDK reads nothing (base URL, organization) from e2a's
        # environment.
        self._client = openai.AsyncOpenAI(
            api_key=key, base_url=self._base(base_url), organization=None, project=None,
            max_retries=max_retries, timeout=timeout, http_client=self._http)

    def _base(self, base_url: str) -> str:
        return base_url.rstrip("/")

    async def _count(self, request: httpx2.Request) -> None:
        self.requests += 1

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    def _failed(self, exc: Exception) -> ProviderError:
        if isinstance(exc, openai.APIStatusError):
            if 300 <= exc.status_code < 400:
                return ProviderError(ssrf.redirected(exc.response.headers.get("location")),
                                     exc.status_code)
            body = exc.body if isinstance(exc.body, dict) else {}
            return ProviderError(str(body.get("message") or exc.message), exc.status_code)
        refused = ssrf.refusal(exc)
        if refused:
            return ProviderError(f"e2a did not call {self.vendor}'s API: {refused}")
        if isinstance(exc, (openai.APIConnectionError, httpx2.HTTPError)):
            return ProviderError(f"{self.vendor}'s API could not be reached "
                                 f"({type(exc).__name__}: {exc})")
        body = getattr(exc, "body", None)   # an error inside a stream that began well
        message = body.get("message") if isinstance(body, dict) else None
        return ProviderError(str(message or exc))


class OpenAIResponsesProvider(_Base):
    def _base(self, base_url: str) -> str:
        """The vendor's API root gets the version the SDK's paths go under."""
        url = base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    async def turn(self, system: str, messages: list[Message], tools: list[ToolSpec],
                   on_text: Callable[[str], Awaitable[None]]) -> Turn:
        params: dict[str, Any] = dict(model=self.model, input=responses_input(messages),
                                      store=False, stream=True)
        if system:
            params["instructions"] = system
        if tools:
            params["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                                "parameters": t.parameters, "strict": False} for t in tools]
        if reasons(self.model):
            params["include"] = ["reasoning.encrypted_content"]
        final = None
        try:
            stream = await self._client.responses.create(**params)
            async for event in stream:
                if event.type == "response.output_text.delta" and event.delta:
                    await on_text(event.delta)
                elif event.type in ("response.completed", "response.incomplete"):
                    final = event.response
                elif event.type == "response.failed":
                    err = event.response.error
                    raise ProviderError(err.message if err else "the response failed")
                elif event.type == "error":
                    raise ProviderError(event.message)
        except openai.OpenAIError as exc:
            raise self._failed(exc) from None
        except httpx2.HTTPError as exc:
            raise self._failed(exc) from None
        if final is None:
            raise ProviderError("the response stream ended before the response was complete")
        text, refusal, calls = "", "", []
        for item in final.output:
            if item.type == "message":
                for part in item.content:
                    if part.type == "output_text":
                        text += part.text
                    elif part.type == "refusal":
                        refusal += part.refusal
            elif item.type == "function_call":
                calls.append(ToolCall(item.call_id, item.name, arguments(item.arguments)))
        why = final.incomplete_details.reason if final.incomplete_details else None
        if not text and not calls and (refusal or why == "content_filter"):
            raise ProviderError("the model declined to answer"
                                + (f": {refusal}" if refusal else f" ({why})"))
        raw = [item.model_dump(mode="json", exclude_none=True) for item in final.output]
        u = final.usage
        return Turn(AssistantTurn(text, calls, raw),
                    input_tokens=u.input_tokens if u else 0,
                    output_tokens=u.output_tokens if u else 0,
                    stop_reason="tool_calls" if calls else (why or final.status))


class ChatCompletionsProvider(_Base):
    def __init__(self, *, model: str, key: str, base_url: str, policy: ssrf.Policy,
                 max_retries: int = 4, timeout: float = 600.0):
        super().__init__(model=model, key=key, base_url=base_url, policy=policy,
                         max_retries=max_retries, timeout=timeout)
        self.vendor = "deepseek" if "deepseek" in (urlsplit(base_url).hostname or "") \
            or model.startswith("deepseek") else "openai"

    async def turn(self, system: str, messages: list[Message], tools: list[ToolSpec],
                   on_text: Callable[[str], Awaitable[None]]) -> Turn:
        params: dict[str, Any] = dict(model=self.model, messages=chat_messages(system, messages),
                                      stream=True, stream_options={"include_usage": True})
        if tools:
            params["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}
                for t in tools]
        text, reasoning, refusal = [], [], []
        calls: dict[int, dict] = {}
        usage = finish = None
        try:
            stream = await self._client.chat.completions.create(**params)
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices[:1]:
                    finish = choice.finish_reason or finish
                    delta = choice.delta
                    if delta.content:
                        text.append(delta.content)
                        await on_text(delta.content)
                    if getattr(delta, "refusal", None):
                        refusal.append(delta.refusal)
                    thought = (delta.model_extra or {}).get("reasoning_content")
                    if thought:
                        reasoning.append(thought)
                    for tc in delta.tool_calls or []:
                        call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = tc.id or call["id"]
                        if tc.function:
                            call["name"] += tc.function.name or ""
                            call["arguments"] += tc.function.arguments or ""
        except openai.OpenAIError as exc:
            raise self._failed(exc) from None
        except httpx2.HTTPError as exc:
            raise self._failed(exc) from None
        said = "".join(text)
        tool_calls = [ToolCall(c["id"], c["name"], arguments(c["arguments"]))
                      for _, c in sorted(calls.items())]
        if not said and not tool_calls and (refusal or finish == "content_filter"):
            raise ProviderError("the model declined to answer"
                                + (f": {''.join(refusal)}" if refusal else f" ({finish})"))
        raw = {"reasoning_content": "".join(reasoning)} if reasoning else None
        return Turn(AssistantTurn(said, tool_calls, raw),
                    input_tokens=usage.prompt_tokens if usage else 0,
                    output_tokens=usage.completion_tokens if usage else 0,
                    stop_reason=finish)


def reasons(model: str) -> bool:
    """Whether a model reasons (and so can hand its reasoning back encrypted): the API refuses
    include reasoning.encrypted_content for the others."""
    return not model.startswith(("gpt-4", "gpt-3", "chatgpt-"))


def arguments(text: str) -> dict[str, Any]:
    """A call's arguments, which the model wrote as JSON (badly, at times: then none)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def text_of(m: ToolResult) -> str:
    text = "\n".join(c["text"] for c in m.content if c.get("type") == "text")
    return f"Error: {text}" if m.is_error else text


def data_url(c: dict) -> str:
    return f"data:{c['media_type']};base64,{c['data']}"


def responses_input(messages: list[Message]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if isinstance(m, UserText):
            out.append({"role": "user", "content": m.text})
        elif isinstance(m, AssistantTurn):
            if m.raw:
                out.extend(m.raw)
                continue
            if m.text:
                out.append({"role": "assistant", "content": m.text})
            out.extend({"type": "function_call", "call_id": c.id, "name": c.name,
                        "arguments": json.dumps(c.arguments)} for c in m.tool_calls)
        elif isinstance(m, ToolResult):
            images = [c for c in m.content if c.get("type") == "image"]
            output: Any = text_of(m)
            if images:
                output = [{"type": "input_text", "text": output}] + [
                    {"type": "input_image", "image_url": data_url(c)} for c in images]
            out.append({"type": "function_call_output", "call_id": m.call_id, "output": output})
    return out


def chat_messages(system: str, messages: list[Message]) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    current = max((i for i, m in enumerate(messages) if isinstance(m, UserText)), default=0)
    images: list[dict] = []   # of the tool results just sent, for the user message after them

    def flush():
        if images:
            out.append({"role": "user", "content": [
                {"type": "text", "text": "The images the tools returned:"}] + images[:]})
            images.clear()

    for i, m in enumerate(messages):
        if isinstance(m, ToolResult):
            out.append({"role": "tool", "tool_call_id": m.call_id, "content": text_of(m)})
            images.extend({"type": "image_url", "image_url": {"url": data_url(c)}}
                          for c in m.content if c.get("type") == "image")
            continue
        flush()
        if isinstance(m, UserText):
            out.append({"role": "user", "content": m.text})
        elif isinstance(m, AssistantTurn):
            msg: dict[str, Any] = {"role": "assistant", "content": m.text or None}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": json.dumps(c.arguments)}} for c in m.tool_calls]
            if isinstance(m.raw, dict) and m.raw.get("reasoning_content") and i > current:
                msg["reasoning_content"] = m.raw["reasoning_content"]
            out.append(msg)
    flush()
    return out
