"""Google's Gemini API (generateContent, streamed) through the official SDK, google-genai.

Tools are plain function declarations with their JSON Schema (`parametersJsonSchema`), the
desktop tool included: Gemini has no native computer tool on this API. A model turn's parts are
kept verbatim in AssistantTurn.raw (as JSON, signatures in base64) and sent back as they came:
Gemini 3 refuses a history whose function calls lost their thought signatures.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx
from google import genai
from google.genai import errors, types

from e2a.agents import ssrf
from e2a.agents.own.llm import (AssistantTurn, Message, ProviderError, ToolCall, ToolResult,
                                ToolSpec, Turn, UserText)

# The SDK's default set (408, 429, 5xx), named so a change of the default does not go unseen.
RETRY_STATUSES = [408, 429, 500, 502, 503, 504]
API_VERSIONS = ("v1beta", "v1", "v1alpha")
# Finish reasons that mean the model would not answer (rather than that it was done).
REFUSALS = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
            "IMAGE_SAFETY", "MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "LANGUAGE"}


class GeminiProvider:
    vendor = "google"

    def __init__(self, *, model: str, key: str, base_url: str, policy: ssrf.Policy,
                 max_retries: int = 4, timeout: float = 600.0):
        self.model = model
        self.requests = 0
        self._made_ids: set[str] = set()   # call ids we made up (the model gave none)
        # Our own httpx client, so every request the SDK sends (retries too) is counted; its
        # connections go through the SSRF guard, and it follows no redirect.
        self._http = ssrf.guarded_httpx_client(policy, timeout=timeout,
                                               event_hooks={"request": [self._count]})
        base, version = split_version(base_url)
        self._client = genai.Client(api_key=key, http_options=types.HttpOptions(
            base_url=base, api_version=version, timeout=int(timeout * 1000),
            httpx_async_client=self._http,
            retry_options=types.HttpRetryOptions(attempts=max_retries + 1,
                                                 http_status_codes=RETRY_STATUSES)))

    async def _count(self, request: httpx.Request) -> None:
        self.requests += 1

    async def turn(self, system: str, messages: list[Message], tools: list[ToolSpec],
                   on_text: Callable[[str], Awaitable[None]]) -> Turn:
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            tools=[types.Tool(function_declarations=[
                types.FunctionDeclaration(name=t.name, description=t.description,
                                          parameters_json_schema=t.parameters)
                for t in tools])] if tools else None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
        parts: list[types.Part] = []
        usage = finish = block = None
        try:
            stream = await self._client.aio.models.generate_content_stream(
                model=self.model, contents=self._contents(messages), config=config)
            async for chunk in stream:
                usage = chunk.usage_metadata or usage
                if chunk.prompt_feedback and chunk.prompt_feedback.block_reason:
                    block = chunk.prompt_feedback.block_reason
                for cand in (chunk.candidates or [])[:1]:
                    finish = cand.finish_reason or finish
                    for part in (cand.content.parts if cand.content else None) or []:
                        parts.append(part)
                        if part.text and not part.thought:
                            await on_text(part.text)
        except errors.APIError as exc:
            if 300 <= (exc.code or 0) < 400:
                headers = getattr(exc.response, "headers", None) or {}
                location = headers.get("location")
                raise ProviderError(ssrf.redirected(location), exc.code) from None
            raise ProviderError(exc.message or str(exc), exc.code) from None
        except httpx.HTTPError as exc:
            refused = ssrf.refusal(exc)
            if refused:
                raise ProviderError(f"e2a did not call the Gemini API: {refused}") from None
            # the class only: httpx's words can quote a header, the key's among them
            raise ProviderError(f"the Gemini API could not be reached "
                                f"({type(exc).__name__})") from None
        text = "".join(p.text for p in parts if p.text and not p.thought)
        calls = [self._call(p.function_call) for p in parts if p.function_call]
        reason = getattr(finish, "value", finish)
        if block and not parts:
            raise ProviderError(f"the prompt was blocked ({getattr(block, 'value', block)})")
        if reason in REFUSALS and not text and not calls:
            raise ProviderError(f"the model stopped without an answer ({reason})")
        raw = [p.model_dump(mode="json", by_alias=True, exclude_none=True) for p in parts]
        return Turn(AssistantTurn(text, calls, raw),
                    input_tokens=(usage.prompt_token_count or 0) if usage else 0,
                    output_tokens=((usage.candidates_token_count or 0)
                                   + (usage.thoughts_token_count or 0)) if usage else 0,
                    stop_reason=reason)

    def _call(self, fc: types.FunctionCall) -> ToolCall:
        call_id = fc.id
        if not call_id:
            call_id = f"call_{uuid.uuid4().hex[:16]}"
            self._made_ids.add(call_id)
        return ToolCall(call_id, fc.name or "", dict(fc.args or {}))

    def _contents(self, messages: list[Message]) -> list[types.Content]:
        out: list[types.Content] = []
        results: list[types.Part] = []   # one user turn answers all calls of a model turn
        images: list[types.Part] = []

        def flush():
            if results or images:
                out.append(types.Content(role="user", parts=results + images))
                results.clear()
                images.clear()

        for m in messages:
            if isinstance(m, ToolResult):
                results.append(self._result(m))
                images.extend(types.Part.from_bytes(data=base64.b64decode(c["data"]),
                                                    mime_type=c["media_type"])
                              for c in m.content if c.get("type") == "image")
                continue
            flush()
            if isinstance(m, UserText):
                out.append(types.Content(role="user", parts=[types.Part(text=m.text)]))
            elif isinstance(m, AssistantTurn):
                out.append(types.Content(role="model", parts=model_parts(m)))
        flush()
        return out

    def _result(self, m: ToolResult) -> types.Part:
        text = "\n".join(c["text"] for c in m.content if c.get("type") == "text")
        return types.Part(function_response=types.FunctionResponse(
            id=None if m.call_id in self._made_ids else m.call_id, name=m.name,
            response={"error" if m.is_error else "output": text}))

    async def close(self) -> None:
        await self._http.aclose()


def model_parts(m: AssistantTurn) -> list[types.Part]:
    """The model's turn as it came (signatures and all), or rebuilt when nothing was kept."""
    if m.raw:
        # from JSON, so the signatures' base64 is decoded as the SDK encoded it
        return [types.Part.model_validate_json(json.dumps(p)) for p in m.raw]
    parts = [types.Part(text=m.text)] if m.text else []
    return parts + [types.Part(function_call=types.FunctionCall(name=c.name, args=c.arguments))
                    for c in m.tool_calls]


def split_version(base_url: str) -> tuple[str, str]:
    """The API root and version of a base URL that may end in its version (…/v1beta)."""
    u = urlsplit(base_url.rstrip("/"))
    head, _, last = u.path.rpartition("/")
    if last in API_VERSIONS:
        return urlunsplit(u._replace(path=head)), last
    return base_url.rstrip("/"), "v1beta"
