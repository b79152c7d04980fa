"""Mock of Google's Gemini API (generativelanguage.googleapis.com), as the google-genai SDKs
(Python, and the JavaScript one inside gemini-cli) call it:

    POST /v1beta/models/{model}:generateContent
    POST /v1beta/models/{model}:streamGenerateContent?alt=sse   server-sent events, one
         GenerateContentResponse per `data:` line, "\\r\\n\\r\\n" between events (as Google sends)
    POST /v1beta/models/{model}:countTokens
    GET  /v1beta/models, /v1beta/models/{model}

The key comes in `x-goog-api-key`, `?key=` or `Authorization: Bearer`. Errors have Google's
shape: {"error": {"code", "message", "status", "details"}}, a 429 with a RetryInfo detail and
Retry-After. Function calls come whole in one chunk with a thoughtSignature; a gemini-3 model
refuses a history whose function calls lost theirs, as the real API does.

A request in JSON mode (responseMimeType application/json, or a response schema) is one of a
client's own side questions (gemini-cli routes models and checks who speaks next that way): it
is answered with the smallest JSON its schema allows, without counting it in the scenario's
fail_first or delays, so the script applies to the agent's conversation turns alone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.llm_mock.server import dumps, final_text, next_step

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# Argument names a client's file-writing tool may use for the path and the text.
PATH_ARGS = ("file_path", "path", "absolute_path", "filename")
TEXT_ARGS = ("content", "contents", "text")
INVALID_KEY = "API key not valid. Please pass a valid API key."


def error(status: int, message: str) -> JSONResponse:
    body = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
    headers = {}
    if status == 401:
        body["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"}}]
    if status == 429:
        # when to retry, as Google says it (gemini-cli waits at least its own 5 s anyway)
        body["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": "0s"}]
        headers["retry-after"] = "0"
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return (request.headers.get("x-goog-api-key") or request.query_params.get("key")
            or (auth[7:] if auth.lower().startswith("bearer ") else None))


def model_info(name: str) -> dict:
    return {"name": f"models/{name}", "version": "001", "displayName": name,
            "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"]}


def tokens(obj) -> int:
    """A stable stand-in for a tokenizer: about four characters a token."""
    return max(1, len(dumps(obj)) // 4)


def field(obj: dict, name: str):
    """A field by its JSON name (lowerCamel) or its proto name (snake_case): Google's API takes
    both, and the Python SDK sends some in snake_case (parameters_json_schema, mime_type)."""
    if name in obj:
        return obj[name]
    return obj.get(re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name))


def function_responses(contents: list) -> list[dict]:
    return [field(p, "functionResponse") for c in contents for p in c.get("parts") or []
            if isinstance(p, dict) and field(p, "functionResponse")]


def result_text(response: dict) -> str:
    """The text of a functionResponse's `response` (clients put it under output or error)."""
    r = response.get("response") or {}
    for k in ("output", "error", "content", "result"):
        if isinstance(r.get(k), str):
            return r[k]
    return dumps(r)


def declared_tools(body: dict) -> dict[str, dict]:
    """name -> declared JSON Schema of the arguments."""
    out = {}
    for tool in body.get("tools") or []:
        for fd in field(tool, "functionDeclarations") or []:
            out[fd["name"]] = field(fd, "parametersJsonSchema") or fd.get("parameters") or {}
    return out


def tool_call(step: dict, tools: dict[str, dict]) -> tuple[str, dict]:
    """The scenario's step as a call of a tool the client offered."""
    if step["tool"] != "write":
        return step["tool"], step.get("args", {})
    args = step.get("args", {})
    for name in ("write_file", "WriteFile", "write"):
        if name in tools:
            props = tools[name].get("properties") or {}
            path = next((p for p in PATH_ARGS if p in props), "file_path")
            text = next((t for t in TEXT_ARGS if t in props), "content")
            return name, {path: args["path"], text: args["text"]}
    raise LookupError(f"the client offers no writing tool (it offers {sorted(tools)})")


def signature_missing(model: str, contents: list) -> bool:
    """Gemini 3 requires the function calls of the current turn (since the user's last text)
    to come back with their signature; earlier turns are not checked."""
    if not model.startswith("gemini-3"):
        return False
    start = 0
    for i, c in enumerate(contents):
        if c.get("role") == "user" and any("text" in p for p in c.get("parts") or []):
            start = i
    for c in contents[start:]:
        if c.get("role") == "model":
            calls = [p for p in c.get("parts") or [] if field(p, "functionCall")]
            if calls and not field(calls[0], "thoughtSignature"):
                return True
    return False


def schema_instance(schema: dict | None):
    """The smallest value a JSON Schema (or Gemini's OpenAPI subset) allows."""
    schema = schema or {}
    kind = str(schema.get("type", "object")).lower()
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: schema_instance(v) for k, v in props.items()
                if k in (schema.get("required") or props)}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)   # a score "from 1 to 100" says so only in words
    if kind == "boolean":
        return False
    return "ok"


def side_answer(body: dict) -> dict | None:
    """The JSON answer to a client's own side question, or None for a conversation turn."""
    cfg = field(body, "generationConfig") or {}
    schema = field(cfg, "responseJsonSchema") or field(cfg, "responseSchema")
    if field(cfg, "responseMimeType") != "application/json" and schema is None:
        return None
    value = schema_instance(schema)
    if isinstance(value, dict) and "next_speaker" in value:
        value["next_speaker"] = "user"   # the model's turn is over: the CLI stops there
    return value


def chunk(model: str, parts: list[dict], usage: dict, finish: bool, rid: str) -> dict:
    cand = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = "STOP"
    return {"candidates": [cand], "usageMetadata": usage, "modelVersion": model,
            "responseId": rid}


def usage(prompt: int, out: int | None) -> dict:
    u = {"promptTokenCount": prompt, "totalTokenCount": prompt + (out or 0),
         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    if out is not None:
        u["candidatesTokenCount"] = out
    return u


def answer(model: str, body: dict, scenario: dict | None) -> list[dict]:
    """The response as its streamed chunks (a non-streamed answer merges them)."""
    contents = body.get("contents") or []
    prompt = tokens(contents) + tokens(field(body, "systemInstruction") or {})
    rid = uuid.uuid4().hex[:22]
    side = side_answer(body)
    if side is not None:
        text = dumps(side)
        return [chunk(model, [{"text": text}], usage(prompt, tokens(text)), True, rid)]
    results = function_responses(contents)
    step = next_step(scenario, len(results))
    if step is not None:
        name, args = tool_call(step, declared_tools(body))
        sig = base64.b64encode(hashlib.sha256(f"{name}{len(results)}".encode()).digest()).decode()
        part = {"functionCall": {"name": name, "args": args}, "thoughtSignature": sig}
        return [chunk(model, [part], usage(prompt, tokens(part)), True, rid)]
    text = final_text(scenario, result_text(results[-1]) if results else None)
    pieces = [text[i:i + 16] for i in range(0, len(text), 16)] or [""]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append(chunk(model, [{"text": piece}],
                         usage(prompt, tokens(text) if last else None), last, rid))
    return out


def merged(chunks: list[dict]) -> dict:
    """One non-streamed response: the chunks' parts joined, the last chunk's usage."""
    parts: list[dict] = []
    for c in chunks:
        for p in c["candidates"][0]["content"]["parts"]:
            if "text" in p and parts and "text" in parts[-1] and len(p) == 1:
                parts[-1] = {"text": parts[-1]["text"] + p["text"]}
            else:
                parts.append(p)
    return chunk(chunks[-1]["modelVersion"], parts, chunks[-1]["usageMetadata"], True,
                 chunks[-1]["responseId"])


def side_gate(mock, key: str | None) -> tuple[dict | None, tuple[int, str] | None]:
    """mock.gate for a side question: the key's refusal if any, no counting or waiting."""
    scenario = mock.scenarios.get(key or "")
    if scenario is None:
        return None, (401, INVALID_KEY)
    if scenario.get("error"):
        return None, (int(scenario["error"].get("status", 400)),
                      str(scenario["error"].get("message", "refused by the mock")))
    return scenario, None


def routes(mock) -> list[Route]:
    async def models(request: Request) -> Response:
        key = api_key(request)
        mock.record("gemini", request, key, None)
        if key not in mock.scenarios:
            return error(401, INVALID_KEY)
        names = ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
                 "gemini-3-pro-preview", "gemini-3-flash-preview")
        return JSONResponse({"models": [model_info(n) for n in names]})

    async def model_action(request: Request) -> Response:
        target = request.path_params["target"]
        key = api_key(request)
        model, _, action = target.partition(":")
        if request.method == "GET":
            mock.record("gemini", request, key, None)
            if key not in mock.scenarios:
                return error(401, INVALID_KEY)
            return JSONResponse(model_info(model))
        try:
            body = await request.json()
        except ValueError:
            return error(400, "Invalid JSON payload received.")
        mock.record("gemini", request, key, body)
        if action == "countTokens":
            if key not in mock.scenarios:
                return error(401, INVALID_KEY)
            inner = field(body, "generateContentRequest") or body
            return JSONResponse({"totalTokens": tokens(inner.get("contents") or [])})
        if action not in ("generateContent", "streamGenerateContent"):
            return error(404, f"Method {action!r} not found.")
        if side_answer(body) is not None:
            scenario, fault = side_gate(mock, key)
        else:
            scenario, fault = await mock.gate(key)
        if fault:
            return error(*fault)
        if signature_missing(model, body.get("contents") or []):
            return error(400, "Function call is missing a thought_signature in functionCall "
                              "parts. This is required for tools to work correctly.")
        try:
            chunks = answer(model, body, scenario)
        except LookupError as exc:
            return error(400, str(exc))
        if action == "generateContent":
            return JSONResponse(merged(chunks))
        if request.query_params.get("alt") != "sse":
            # without alt=sse Google streams one JSON array; no SDK asks for that
            return JSONResponse(chunks)

        async def events():
            for c in chunks:
                yield f"data: {dumps(c)}\r\n\r\n".encode()
                await asyncio.sleep(0)
        return StreamingResponse(events(), media_type="text/event-stream")

    routes = []
    for version in ("v1beta", "v1", "v1alpha"):
        routes += [Route(f"/{version}/models", models, methods=["GET"]),
                   Route(f"/{version}/models/{{target:path}}", model_action,
                         methods=["GET", "POST"])]
    return routes
