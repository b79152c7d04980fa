"""The mock provider server: scenarios scripted per API key, a log of every request.

Run: `python -m tests.llm_mock --port N` (127.0.0.1). Control routes, for tests:

    POST /_mock/scenarios {"key": K, "scenario": {...}}   answer requests carrying key K so
    GET  /_mock/requests[?key=K]                          the requests seen (headers, body, key)
    POST /_mock/reset
    ANY  /_mock/redirect-to/PORT/PATH                    307 to http://localhost:PORT/PATH

A request whose key has no scenario gets the provider's 401, so a placeholder that leaked
through the egress proxy unreplaced fails loudly.

A scenario (all fields optional):

    steps: [{"tool": "write", "args": {"path": P, "text": T}}, {"tool": NAME, "args": {...}}]
        tool calls the model asks for, one per model turn, in order. "write" is abstract: each
        protocol maps it to the writing tool the agent offers (claude-code's Write, gemini-cli's
        write_file, codex's shell or apply_patch, e2a's write_file). Any other name is called
        as is. Which step comes next is counted from the tool results in the request, so the
        mock keeps no state per conversation.
    final: the final message once the steps are done; "{last}" is replaced by the text of the
        last tool result (the first 2000 characters).
    fail_first: N, fail_status: 429 (or 500...): the first N requests of this key get that
        error (with Retry-After: 0 on a 429), then the script runs.
    error: {"status": 401, "message": "..."}: every request gets this error.
    hang: true: the request is answered only after `hang_seconds` (default 3600) — for cancel
        and timeouts.
    delay: seconds to wait before each answer (default 0).
    tasks: [{steps, final}, ...] (Anthropic's protocol only): one script per task of a
        conversation that goes on over several tasks (a session), chosen by the number of
        prompts in it; its steps are counted from the latest prompt.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_FINAL = "Done."


@dataclass
class Seen:
    protocol: str
    path: str
    key: str | None
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "path": self.path, "key": self.key,
                "headers": self.headers, "query": self.query, "body": self.body, "at": self.at}


class Mock:
    def __init__(self) -> None:
        self.scenarios: dict[str, dict] = {}
        self.seen: list[Seen] = []
        self.counts: dict[str, int] = {}

    def record(self, protocol: str, request: Request, key: str | None, body: Any) -> Seen:
        s = Seen(protocol, request.url.path, key, {k.lower(): v for k, v in request.headers.items()},
                 dict(request.query_params), body)
        self.seen.append(s)
        return s

    async def gate(self, key: str | None) -> tuple[dict | None, tuple[int, str] | None]:
        """The scenario for a key, after its delay or hang; or an error (status, message) to
        answer in the protocol's own error format."""
        scenario = self.scenarios.get(key or "")
        if scenario is None:
            return None, (401, "invalid api key (the mock has no scenario for it)")
        n = self.counts[key] = self.counts.get(key, 0) + 1
        if scenario.get("hang"):
            await asyncio.sleep(float(scenario.get("hang_seconds", 3600)))
        if scenario.get("delay"):
            await asyncio.sleep(float(scenario["delay"]))
        if n <= int(scenario.get("fail_first", 0)):
            status = int(scenario.get("fail_status", 429))
            return None, (status, "rate limited by the mock" if status == 429
                          else "the mock's server error")
        if scenario.get("error"):
            return None, (int(scenario["error"].get("status", 400)),
                          str(scenario["error"].get("message", "refused by the mock")))
        return scenario, None


def next_step(scenario: dict, tool_results_so_far: int) -> dict | None:
    """The tool call to ask for now, or None when the final message is due."""
    steps = scenario.get("steps", [])
    return steps[tool_results_so_far] if tool_results_so_far < len(steps) else None


def final_text(scenario: dict, last_result: str | None) -> str:
    return str(scenario.get("final", DEFAULT_FINAL)).replace("{last}", (last_result or "")[:2000])


def app() -> Starlette:
    from tests.llm_mock import anthropic, gemini, openai

    mock = Mock()

    async def set_scenario(request: Request) -> Response:
        body = await request.json()
        mock.scenarios[body["key"]] = body.get("scenario") or {}
        mock.counts.pop(body["key"], None)
        return JSONResponse({"ok": True})

    async def requests(request: Request) -> Response:
        key = request.query_params.get("key")
        return JSONResponse([s.to_json() for s in mock.seen if key is None or s.key == key])

    async def reset(request: Request) -> Response:
        mock.scenarios.clear()
        mock.seen.clear()
        mock.counts.clear()
        return JSONResponse({"ok": True})

    async def redirect(request: Request) -> Response:
        # a provider that sends its callers elsewhere (the SSRF tests: a redirect to a private
        # address must not be followed)
        target = f"http://localhost:{request.path_params['port']}/{request.path_params['path']}"
        return Response(status_code=307, headers={"location": target})

    routes = [Route("/_mock/scenarios", set_scenario, methods=["POST"]),
              Route("/_mock/redirect-to/{port:int}/{path:path}", redirect,
                    methods=["GET", "POST"]),
              Route("/_mock/requests", requests), Route("/_mock/reset", reset, methods=["POST"])]
    for module in (anthropic, openai, gemini):
        routes += module.routes(mock)
    return Starlette(routes=routes)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
