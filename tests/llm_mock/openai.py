"""Mock of OpenAI's API (api.openai.com), as the official SDKs and codex call it, and of the
Chat Completions dialect of the OpenAI-compatible servers (DeepSeek's among them):

    POST /v1/responses               a Response, or with "stream": true server-sent events:
         response.created, response.in_progress, then per output item (reasoning, message,
         function_call, custom_tool_call) response.output_item.added, its deltas
         (response.output_text.delta, response.function_call_arguments.delta,
         response.custom_tool_call_input.delta) and their .done, response.output_item.done;
         last response.completed with the usage
    POST /v1/responses/input_tokens  {"object": "response.input_tokens", "input_tokens": N}
    POST /v1/chat/completions        a chat.completion, or streamed chat.completion.chunk
         events (tool_calls deltas, a usage chunk with stream_options.include_usage), then
         `data: [DONE]`; also at /chat/completions, where DeepSeek serves it
    GET  /v1/models[/{id}]

The key comes in `Authorization: Bearer`. Errors have OpenAI's shape, {"error": {"message",
"type", "param", "code"}}, an x-request-id, and Retry-After: 0 on a 429.

The abstract "write" step becomes a call of the writing tool the client offers: e2a's
write_file; else a shell (codex's exec_command, shell_command or shell) running a printf into
the file, so the text lands exactly; else apply_patch; else, for codex's code mode (one
freeform `exec` tool running JavaScript that calls the others), a script calling
tools.exec_command. Codex offers its tools in `tools` or, for its newest models, in an input
item {"type": "additional_tools"} grouped in namespaces; both are read.

Reasoning: a reasoning model's answer starts with a reasoning item carrying encrypted_content
(clients ask for it with include ["reasoning.encrypted_content"], as store is false). A request
that sends back a function call by its id without the reasoning item it came with is refused,
as is asking a model that does not reason for its encrypted reasoning, as the real API does.
In Chat Completions a model named *reasoner* streams reasoning_content first and, like
DeepSeek's, refuses a tool call of the current turn sent back without it.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.llm_mock.server import dumps, final_text, next_step

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               403: "invalid_request_error", 404: "invalid_request_error",
               429: "requests", 500: "server_error", 503: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
INVALID_KEY = ("Incorrect API key provided. You can find your API key at "
               "https://platform.openai.com/account/api-keys.")
SHELLS = ("exec_command", "shell_command", "shell")
PATH_ARGS = ("path", "file_path", "filename")
TEXT_ARGS = ("content", "contents", "text")
MODELS = ("gpt-5", "gpt-5-mini", "gpt-5-codex", "gpt-5.1-codex", "gpt-4.1", "o3", "o4-mini",
          "deepseek-chat", "deepseek-reasoner")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def error(status: int, message: str) -> JSONResponse:
    headers = {"x-request-id": new_id("req_")}
    if status == 429:
        headers["retry-after"] = "0"
        headers["retry-after-ms"] = "0"
    code = ERROR_CODES.get(status)
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(
        status, "invalid_request_error"), "param": None, "code": code}},
        status_code=status, headers=headers)


def api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("api-key")


def tokens(obj) -> int:
    """A stable stand-in for a tokenizer: about four characters a token."""
    return max(1, len(dumps(obj)) // 4)


def is_reasoning(model: str) -> bool:
    return model.startswith(("gpt-5", "gpt-6", "o1", "o3", "o4", "codex")) or "reasoner" in model


# ---- which tool the "write" step calls -------------------------------------------------------

def offered_tools(tools: list) -> dict[str, dict]:
    """name -> tool, namespaces flattened (a tool in one keeps its namespace's name)."""
    out = {}
    for t in tools or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "namespace":
            for name, inner in offered_tools(t.get("tools")).items():
                out[name] = {**inner, "namespace": t.get("name")}
        elif t.get("type") == "function" and isinstance(t.get("function"), dict):
            out[t["function"]["name"]] = {"type": "function", **t["function"]}  # chat dialect
        elif t.get("name"):
            out[t["name"]] = t
    return out


def shell_line(path: str, text: str) -> str:
    return f"printf '%s' {shlex.quote(text)} > {shlex.quote(path)}"


def patch(path: str, text: str) -> str:
    lines = "".join(f"+{line}\n" for line in text.split("\n"))
    return f"*** Begin Patch\n*** Add File: {path}\n{lines}*** End Patch\n"


def tool_call(step: dict, tools: dict[str, dict]) -> tuple[dict, str, str]:
    """The scenario's step as (the tool called, its kind "function" or "custom", the arguments
    as a JSON text or the custom tool's input)."""
    if step["tool"] != "write":
        name = step["tool"]
        tool = tools.get(name, {"type": "function", "name": name})
        args = step.get("args", {})
        if tool.get("type") == "custom":
            return tool, "custom", args if isinstance(args, str) else args.get("input", "")
        return tool, "function", dumps(args)
    path, text = step["args"]["path"], step["args"]["text"]
    if "write_file" in tools:
        props = (tools["write_file"].get("parameters") or {}).get("properties") or {}
        p = next((a for a in PATH_ARGS if a in props), "path")
        t = next((a for a in TEXT_ARGS if a in props), "content")
        return tools["write_file"], "function", dumps({p: path, t: text})
    for name in SHELLS:
        tool = tools.get(name)
        if tool and tool.get("type") == "function" and not tool.get("namespace"):
            line = shell_line(path, text)
            args = {"exec_command": {"cmd": line}, "shell_command": {"command": line},
                    "shell": {"command": ["bash", "-lc", line]}}[name]
            return tool, "function", dumps(args)
    tool = tools.get("apply_patch")
    if tool and not tool.get("namespace"):
        if tool.get("type") == "custom":
            return tool, "custom", patch(path, text)
        return tool, "function", dumps({"input": patch(path, text)})
    tool = tools.get("exec")
    if tool and tool.get("type") == "custom":
        script = (f"const r = await tools.exec_command({dumps({'cmd': shell_line(path, text)})});"
                  "\ntext(r.output);\n")
        return tool, "custom", script
    raise LookupError(f"the client offers no tool to write a file with (it offers "
                      f"{sorted(tools)})")


# ---- the Responses API -----------------------------------------------------------------------

def input_items(body: dict) -> list[dict]:
    items = body.get("input")
    if isinstance(items, str):
        return [{"type": "message", "role": "user", "content": items}]
    return [i for i in items or [] if isinstance(i, dict)]


def responses_tools(body: dict) -> dict[str, dict]:
    tools = list(body.get("tools") or [])
    for item in input_items(body):
        if item.get("type") == "additional_tools":
            tools += item.get("tools") or []
    return offered_tools(tools)


def output_text(output) -> str:
    """A tool output's text: a string, or input_text items."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(str(o.get("text", "")) for o in output if isinstance(o, dict)
                         and o.get("type") in ("input_text", "output_text", "text"))
    if isinstance(output, dict):
        return str(output.get("content") or output.get("output") or dumps(output))
    return ""


def tool_outputs(items: list[dict]) -> list[dict]:
    return [i for i in items if i.get("type") in ("function_call_output",
                                                  "custom_tool_call_output")]


def missing_reasoning(items: list[dict]) -> str | None:
    """The refusal of a function call sent back by id without its reasoning item."""
    reasoning = {i.get("id") for i in items if i.get("type") == "reasoning"}
    for i in items:
        cid = i.get("id") or ""
        if i.get("type") in ("function_call", "custom_tool_call") and cid[:3] in ("fc_", "ctc"):
            needed = "rs_" + cid.split("_", 1)[1]
            if needed not in reasoning:
                return (f"Item '{cid}' of type '{i['type']}' was provided without its "
                        f"required 'reasoning' item: '{needed}'.")
    return None


def response_output(model: str, body: dict, scenario: dict) -> list[dict]:
    """The answer's output items, complete."""
    items = input_items(body)
    outputs = tool_outputs(items)
    step = next_step(scenario, len(outputs))
    suffix = secrets.token_hex(24)
    out: list[dict] = []
    if is_reasoning(model):
        out.append({"id": f"rs_{suffix}", "type": "reasoning", "summary": [],
                    "encrypted_content": "gAAAA" + secrets.token_urlsafe(48)})
    if step is not None:
        tool, kind, args = tool_call(step, responses_tools(body))
        call = {"id": f"fc_{suffix}", "type": "function_call", "status": "completed",
                "arguments": args, "call_id": new_id("call_")[:29], "name": tool["name"]}
        if kind == "custom":
            call = {"id": f"ctc_{suffix}", "type": "custom_tool_call", "status": "completed",
                    "call_id": call["call_id"], "input": args, "name": tool["name"]}
        if tool.get("namespace"):
            call["namespace"] = tool["namespace"]
        out.append(call)
        return out
    last = output_text(outputs[-1].get("output")) if outputs else None
    out.append({"id": f"msg_{suffix}", "type": "message", "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "annotations": [],
                                                  "logprobs": [],
                                                  "text": final_text(scenario, last)}]})
    return out


def response_object(rid: str, model: str, body: dict, status: str, output: list,
                    usage: dict | None) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": None,
            "model": model, "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": "medium", "summary": None}
            if is_reasoning(model) else {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
            "metadata": {}}


def response_usage(body: dict, output: list) -> dict:
    prompt = tokens(body.get("input")) + tokens(body.get("instructions") or "")
    reasoning = sum(16 for o in output if o["type"] == "reasoning")
    out = tokens(output) + reasoning
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + out}


def pieces(text: str, size: int = 16) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def response_events(rid: str, model: str, body: dict, output: list, usage: dict) -> list[dict]:
    """The server-sent events of a streamed response, in the API's order."""
    events: list[dict] = []

    def emit(kind: str, **fields):
        events.append({"type": kind, "sequence_number": len(events), **fields})

    emit("response.created", response=response_object(rid, model, body, "in_progress", [], None))
    emit("response.in_progress",
         response=response_object(rid, model, body, "in_progress", [], None))
    for n, item in enumerate(output):
        at = {"output_index": n}
        kind = item["type"]
        if kind == "reasoning":
            emit("response.output_item.added", **at,
                 item={"id": item["id"], "type": "reasoning", "summary": []})
        elif kind == "message":
            text = item["content"][0]["text"]
            ref = {"item_id": item["id"], **at, "content_index": 0}
            emit("response.output_item.added", **at, item={**item, "status": "in_progress",
                                                             "content": []})
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            emit("response.content_part.added", **ref, part=part)
            for piece in pieces(text):
                emit("response.output_text.delta", **ref, delta=piece, logprobs=[])
            emit("response.output_text.done", **ref, text=text, logprobs=[])
            emit("response.content_part.done", **ref, part={**part, "text": text})
        elif kind == "function_call":
            emit("response.output_item.added", **at,
                 item={**item, "status": "in_progress", "arguments": ""})
            for piece in pieces(item["arguments"], 24):
                emit("response.function_call_arguments.delta", item_id=item["id"], **at,
                     delta=piece)
            emit("response.function_call_arguments.done", item_id=item["id"], **at,
                 arguments=item["arguments"])
        elif kind == "custom_tool_call":
            emit("response.output_item.added", **at,
                 item={**item, "status": "in_progress", "input": ""})
            for piece in pieces(item["input"], 24):
                emit("response.custom_tool_call_input.delta", item_id=item["id"], **at,
                     delta=piece)
            emit("response.custom_tool_call_input.done", item_id=item["id"], **at,
                 input=item["input"])
        emit("response.output_item.done", **at, item=item)
    emit("response.completed", response=response_object(rid, model, body, "completed", output,
                                                         usage))
    return events


# ---- Chat Completions ------------------------------------------------------------------------

def message_text(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content or []
                     if isinstance(p, dict) and p.get("type") == "text")


def missing_reasoning_content(messages: list) -> bool:
    """DeepSeek's thinking mode: the assistant's tool calls since the last user message must
    come back with their reasoning_content."""
    start = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    return any(m.get("role") == "assistant" and m.get("tool_calls")
               and not m.get("reasoning_content") for m in messages[start:])


def chat_answer(model: str, body: dict, scenario: dict) -> dict:
    """The assistant's message (content, tool_calls, reasoning_content) and finish reason."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    results = [m for m in messages if m.get("role") == "tool"]
    step = next_step(scenario, len(results))
    message: dict = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    if "reasoner" in model:
        message["reasoning_content"] = "The user wants this done; " + (
            "a tool first." if step is not None else "time to answer.")
    if step is not None:
        tool, _, args = tool_call(step, offered_tools(body.get("tools")))
        message["tool_calls"] = [{"id": new_id("call_")[:29], "type": "function",
                                  "function": {"name": tool["name"], "arguments": args}}]
        return {"message": message, "finish_reason": "tool_calls"}
    last = message_text(results[-1].get("content")) if results else None
    message["content"] = final_text(scenario, last)
    return {"message": message, "finish_reason": "stop"}


def chat_usage(body: dict, answer: dict) -> dict:
    prompt = tokens(body.get("messages"))
    reasoning = tokens(answer["message"].get("reasoning_content") or "") \
        if answer["message"].get("reasoning_content") else 0
    out = tokens(answer["message"]) + reasoning
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def chat_chunks(cid: str, model: str, answer: dict, usage: dict | None) -> list[dict]:
    created = int(time.time())

    def chunk(delta: dict | None, finish: str | None = None) -> dict:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": "fp_e2a_mock",
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
        if usage is not None:
            c["usage"] = None   # every chunk says so when the last one will carry it
        return c

    m = answer["message"]
    out = [chunk({"role": "assistant", "content": "" if not m.get("tool_calls") else None,
                  "refusal": None})]
    for piece in pieces(m.get("reasoning_content") or "") if m.get("reasoning_content") else []:
        out.append(chunk({"reasoning_content": piece}))
    for n, call in enumerate(m.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"],
                                                       "arguments": ""}}]}))
        for piece in pieces(call["function"]["arguments"], 24):
            out.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": piece}}]}))
    if m.get("content"):
        out += [chunk({"content": piece}) for piece in pieces(m["content"])]
    out.append(chunk({}, answer["finish_reason"]))
    if usage is not None:
        out.append({**chunk(None), "usage": usage})
    return out


# ---- routes ----------------------------------------------------------------------------------

def sse(events, named: bool) -> StreamingResponse:
    async def stream():
        for e in events:
            head = f"event: {e['type']}\n" if named else ""
            yield f"{head}data: {dumps(e)}\n\n".encode()
            await asyncio.sleep(0)
        if not named:
            yield b"data: [DONE]\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"x-request-id": new_id("req_")})


def routes(mock) -> list[Route]:
    async def read(request: Request) -> tuple[str | None, dict | None, Response | None]:
        key = api_key(request)
        try:
            body = await request.json()
        except ValueError:
            mock.record("openai", request, key, None)
            return key, None, error(400, "We could not parse the JSON body of your request.")
        mock.record("openai", request, key, body)
        return key, body, None

    async def responses(request: Request) -> Response:
        key, body, bad = await read(request)
        if bad:
            return bad
        scenario, fault = await mock.gate(key)
        if fault:
            return error(*fault)
        model = str(body.get("model") or "")
        refused = missing_reasoning(input_items(body)) if is_reasoning(model) else None
        if "reasoning.encrypted_content" in (body.get("include") or []) \
                and not is_reasoning(model):
            refused = "Encrypted content is not supported with this model."
        if refused:
            return error(400, refused)
        try:
            output = response_output(model, body, scenario)
        except LookupError as exc:
            return error(400, str(exc))
        rid = new_id("resp_")
        usage = response_usage(body, output)
        if not body.get("stream"):
            return JSONResponse(response_object(rid, model, body, "completed", output, usage),
                                headers={"x-request-id": new_id("req_")})
        return sse(response_events(rid, model, body, output, usage), named=True)

    async def input_tokens(request: Request) -> Response:
        key, body, bad = await read(request)
        if bad:
            return bad
        if key not in mock.scenarios:
            return error(401, INVALID_KEY)
        return JSONResponse({"object": "response.input_tokens",
                             "input_tokens": tokens(body.get("input"))})

    async def chat(request: Request) -> Response:
        key, body, bad = await read(request)
        if bad:
            return bad
        scenario, fault = await mock.gate(key)
        if fault:
            return error(*fault)
        model = str(body.get("model") or "")
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        if "reasoner" in model and missing_reasoning_content(messages):
            return error(400, "Missing `reasoning_content` field in the assistant message at "
                              "message index 2. For more information, please refer to "
                              "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls")
        try:
            answer = chat_answer(model, body, scenario)
        except LookupError as exc:
            return error(400, str(exc))
        cid = "chatcmpl-" + secrets.token_urlsafe(21)
        usage = chat_usage(body, answer)
        if not body.get("stream"):
            return JSONResponse({"id": cid, "object": "chat.completion",
                                 "created": int(time.time()), "model": model,
                                 "choices": [{"index": 0, "logprobs": None, **answer}],
                                 "usage": usage, "system_fingerprint": "fp_e2a_mock"},
                                headers={"x-request-id": new_id("req_")})
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return sse(chat_chunks(cid, model, answer, usage if wants_usage else None), named=False)

    async def models(request: Request) -> Response:
        key = api_key(request)
        mock.record("openai", request, key, None)
        if key not in mock.scenarios:
            return error(401, INVALID_KEY)
        info = [{"id": m, "object": "model", "created": 1754000000, "owned_by": "system"}
                for m in MODELS]
        wanted = request.path_params.get("model")
        if wanted is None:
            return JSONResponse({"object": "list", "data": info})
        found = next((m for m in info if m["id"] == wanted), None)
        if found is None:
            return error(404, f"The model '{wanted}' does not exist or you do not have "
                              f"access to it.")
        return JSONResponse(found)

    return [Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/responses/input_tokens", input_tokens, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", models, methods=["GET"])]
