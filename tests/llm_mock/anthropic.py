"""Mock of Anthropic's API (api.anthropic.com), as the official SDKs and claude-code call it:

    POST /v1/messages[?beta=true]              a Message, or with "stream": true server-sent
         events: message_start, content_block_start/delta/stop (text_delta, input_json_delta),
         ping, message_delta (stop_reason, usage), message_stop
    POST /v1/messages/count_tokens[?beta=true] {"input_tokens": N}

The key comes in `x-api-key` (claude-code) or `Authorization: Bearer` (the Python SDK). Errors
have Anthropic's shape, {"type": "error", "error": {"type", "message"}, "request_id"}, with its
error type per status, `x-should-retry` saying whether a retry can help, and Retry-After: 0 on
a 429.

A request that offers no tools is one of a client's own side questions (a session's title, a
quota check: claude-code asks such of its small model, though not in its -p runs with
nonessential traffic off): it is answered with a short text without counting it in the
scenario's fail_first or delays, so the script applies to the agent's conversation turns alone.
The native computer-use tool (type computer_2025...) is offered by its name, "computer", so a
step {"tool": "computer", "args": {"action": ...}} calls it.
"""

from __future__ import annotations

import asyncio
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.llm_mock.server import dumps, final_text, next_step

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
               529: "overloaded_error"}
INVALID_KEY = "invalid x-api-key"
# Names a client's file-writing tool, and its arguments for the path and the text, may have.
WRITE_TOOLS = ("Write", "write_file", "write", "str_replace_based_edit_tool")
PATH_ARGS = ("file_path", "path", "filename")
TEXT_ARGS = ("content", "contents", "text", "file_text")


def new_id(prefix: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "01" + "".join(secrets.choice(alphabet) for _ in range(22))


def error(status: int, message: str) -> JSONResponse:
    # The API says whether a retry can help (the SDKs and claude-code follow it: without it
    # claude-code retries a 401 ten times, thinking its key may have been refreshed).
    retry = status in (408, 409, 429) or status >= 500
    headers = {"request-id": new_id("req_"), "x-should-retry": "true" if retry else "false"}
    if status == 429:
        headers["retry-after"] = "0"
    return JSONResponse({"type": "error", "error": {"type": ERROR_TYPES.get(
        status, "api_error"), "message": message}, "request_id": headers["request-id"]},
        status_code=status, headers=headers)


def api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return request.headers.get("x-api-key") or (
        auth[7:] if auth.lower().startswith("bearer ") else None)


def tokens(obj) -> int:
    """A stable stand-in for a tokenizer: about four characters a token."""
    return max(1, len(dumps(obj)) // 4)


def blocks(content) -> list[dict]:
    """A message's content as a list of blocks (a plain string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def tool_results(messages: list) -> list[dict]:
    return [b for m in messages if m.get("role") == "user" for b in blocks(m.get("content"))
            if b.get("type") == "tool_result"]


def current_task(scenario: dict, messages: list) -> tuple[dict, list]:
    """A conversation of several tasks (a session's): with `tasks` (one scenario per task),
    the scenario of the latest task, told by how many prompts the user has sent, and the
    messages since that prompt. Without it, the scenario and the whole conversation."""
    if "tasks" not in scenario:
        return scenario, messages
    prompts = [i for i, m in enumerate(messages) if m.get("role") == "user"
               and any(b.get("type") == "text" for b in blocks(m.get("content")))]
    tasks = scenario["tasks"]
    current = tasks[min(max(len(prompts) - 1, 0), len(tasks) - 1)]
    return current, messages[prompts[-1]:] if prompts else messages


def result_text(result: dict) -> str:
    return "".join(b.get("text", "") for b in blocks(result.get("content"))
                   if b.get("type") == "text")


def offered(body: dict) -> dict[str, dict]:
    """name -> JSON Schema of the tools the request offers (a native tool: {})."""
    return {t["name"]: t.get("input_schema") or {} for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("name")}


def tool_call(step: dict, tools: dict[str, dict]) -> tuple[str, dict]:
    """The scenario's step as a call of a tool the client offered."""
    if step["tool"] != "write":
        return step["tool"], step.get("args", {})
    args = step.get("args", {})
    for name in WRITE_TOOLS:
        if name in tools:
            props = tools[name].get("properties") or {}
            path = next((p for p in PATH_ARGS if p in props), "file_path")
            text = next((t for t in TEXT_ARGS if t in props), "content")
            call = {path: args["path"], text: args["text"]}
            if name == "str_replace_based_edit_tool":
                call["command"] = "create"
            return name, call
    raise LookupError(f"the client offers no writing tool (it offers {sorted(tools)})")


def usage(prompt: int, out: int) -> dict:
    return {"input_tokens": prompt, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0, "output_tokens": out, "service_tier": "standard"}


def message(body: dict, scenario: dict | None) -> dict:
    """The whole answer, as a non-streamed Message."""
    model = str(body["model"])
    prompt = tokens(body.get("messages") or []) + tokens(body.get("system") or "") + tokens(
        body.get("tools") or [])
    if scenario is None:   # a side question
        content = [{"type": "text", "text": "OK"}]
        stop = "end_turn"
    else:
        scenario, messages = current_task(scenario, body.get("messages") or [])
        results = tool_results(messages)
        step = next_step(scenario, len(results))
        if step is not None:
            name, args = tool_call(step, offered(body))
            content = [{"type": "tool_use", "id": new_id("toolu_"), "name": name, "input": args}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": final_text(
                scenario, result_text(results[-1]) if results else None)}]
            stop = "end_turn"
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": usage(prompt, tokens(content))}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


def events(msg: dict):
    """The Message as the stream of server-sent events the API sends for it."""
    start = {**msg, "content": [], "stop_reason": None,
             "usage": {**msg["usage"], "output_tokens": 1}}
    yield sse("message_start", {"type": "message_start", "message": start})
    for i, block in enumerate(msg["content"]):
        if block["type"] == "text":
            yield sse("content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "text", "text": ""}})
            if i == 0:
                yield sse("ping", {"type": "ping"})
            text = block["text"]
            for piece in [text[j:j + 16] for j in range(0, len(text), 16)]:
                yield sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "text_delta",
                                                            "text": piece}})
        else:   # tool_use: its input streams as pieces of its JSON
            yield sse("content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {**block, "input": {}}})
            if i == 0:
                yield sse("ping", {"type": "ping"})
            text = dumps(block["input"])
            for piece in [text[j:j + 24] for j in range(0, len(text), 24)]:
                yield sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "input_json_delta",
                                                            "partial_json": piece}})
        yield sse("content_block_stop", {"type": "content_block_stop", "index": i})
    yield sse("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": msg["stop_reason"],
                                          "stop_sequence": None},
                                "usage": {"output_tokens": msg["usage"]["output_tokens"]}})
    yield sse("message_stop", {"type": "message_stop"})


def side_gate(mock, key: str | None) -> tuple[int, str] | None:
    """mock.gate for a side question or a side route: the key's refusal if any, no counting
    or waiting."""
    scenario = mock.scenarios.get(key or "")
    if scenario is None:
        return 401, INVALID_KEY
    if scenario.get("error"):
        return (int(scenario["error"].get("status", 400)),
                str(scenario["error"].get("message", "refused by the mock")))
    return None


def routes(mock) -> list[Route]:
    async def read(request: Request) -> tuple[dict | None, Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return None, error(400, "There was an error parsing the body of your request.")
        if not isinstance(body, dict):
            return None, error(400, "The request body must be a JSON object.")
        return body, None

    async def messages(request: Request) -> Response:
        key = api_key(request)
        body, bad = await read(request)
        mock.record("anthropic", request, key, body)
        if bad:
            return bad
        if not request.headers.get("anthropic-version"):
            return error(400, "anthropic-version: header is required")
        if not body.get("tools"):
            scenario, fault = None, side_gate(mock, key)
        else:
            scenario, fault = await mock.gate(key)
        if fault:
            return error(*fault)
        for field in ("model", "max_tokens", "messages"):
            if field not in body:
                return error(400, f"{field}: Field required")
        try:
            msg = message(body, scenario)
        except LookupError as exc:
            return error(400, str(exc))
        headers = {"request-id": new_id("req_")}
        if not body.get("stream"):
            return JSONResponse(msg, headers=headers)

        async def stream():
            for chunk in events(msg):
                yield chunk
                await asyncio.sleep(0)
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    async def count_tokens(request: Request) -> Response:
        key = api_key(request)
        body, bad = await read(request)
        mock.record("anthropic", request, key, body)
        if bad:
            return bad
        if fault := side_gate(mock, key):
            return error(*fault)
        return JSONResponse({"input_tokens": tokens(body.get("messages") or []) + tokens(
            body.get("system") or "") + tokens(body.get("tools") or [])})

    return [Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
