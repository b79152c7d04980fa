"""Agents in the SDK (sync and async) and the CLI: create's agent fields, the task routes, the
live NDJSON event feed (broken connections resumed without loss or repeats), wait_task, and the
LLM key kept out of everything the SDK and CLI show.

A fake of the task routes (e2a/api/tasks.py, shapes field for field) behind httpx.MockTransport
records every request; its follow streams can be cut mid-line to play a broken connection. One
test uses a real socket, to check that wait_task's timeout holds while a stream says nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
from dataclasses import fields
from urllib.parse import parse_qsl

import httpx
import pytest
from click.testing import CliRunner

from e2a import cli
from e2a.sdk import (E2A, AsyncE2A, E2AError, Sandbox, Task, TaskEvent, Tool, WaitTimeout)
from e2a.sdk import _core

KEY = "test-key"
API = "http://e2a.test"
LLM_KEY = "sk-ant-api03-SECRET-0123456789abcdef"

SB = {"vm_id": "sb1", "state": "running", "template": "standard", "vcpu": 1, "cpu_fraction": 0.5,
      "memory_mib": 512, "internet": True, "metadata": {}, "idle_timeout_seconds": 60,
      "max_lifetime_seconds": 7200, "created_at": "2026-01-01T00:00:00Z",
      "expires_at": "2026-01-01T02:00:00Z", "destroyed_at": None, "end_reason": None,
      "workspace_id": None}


def task_out(task_id: str = "tsk_1", **kw) -> dict:
    """A TaskOut as the route gives it (plus a field from a newer server)."""
    return {"task_id": task_id, "agent": "e2a", "vendor": "anthropic", "model": "claude-sonnet-4-5",
            "state": "running", "started_at": "2026-01-01T00:00:01Z", "ended_at": None,
            "result": None, "error": None, "llm_requests": 0, "input_tokens": 0,
            "output_tokens": 0, "key_passed_in": False, "field_from_the_future": 1, **kw}


FINAL = {"state": "succeeded", "result": "Wrote result.txt.", "error": None, "llm_requests": 3,
         "input_tokens": 1200, "output_tokens": 80}


def own_agent_run(task_id: str = "tsk_1") -> list[tuple[str, dict]]:
    """e2a's own agent writing /home/user/result.txt, in its documented event shapes."""
    return [
        ("task_started", {"task_id": task_id, "agent": "e2a", "model": "claude-sonnet-4-5"}),
        ("message_delta", {"text": "I'll write "}),
        ("message_delta", {"text": "the file."}),
        ("message", {"text": "I'll write the file."}),
        ("tool_call", {"id": "c1", "name": "shell", "arguments": {"command": "echo hi > result.txt && cat result.txt"}}),
        ("tool_output", {"id": "c1", "stream": "stdout", "text": "hi\n"}),
        ("tool_result", {"id": "c1", "name": "shell", "output": "hi\n", "is_error": False, "images": []}),
        ("tool_call", {"id": "c2", "name": "read_file", "arguments": {"path": "nope.txt"}}),
        ("tool_result", {"id": "c2", "name": "read_file", "output": "no such file: nope.txt",
                         "is_error": True, "images": []}),
        ("message", {"text": "Wrote result.txt."}),
        ("task_finished", {"task_id": task_id, **FINAL}),
    ]


def err(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "field": field}})


class Stream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body in pieces, for sync and async clients alike, that may end in an error
    (the connection breaking) after its last piece."""

    def __init__(self, pieces: list[bytes], error: Exception | None = None, linger: float = 0):
        self.pieces, self.error, self.linger = pieces, error, linger

    def __iter__(self):
        yield from self.pieces
        time.sleep(self.linger)
        if self.error:
            raise self.error

    async def __aiter__(self):
        for piece in self.pieces:
            yield piece
        if self.error:
            raise self.error


class Fake:
    """The task routes of one sandbox, sb1, whose agent runs the script above.

    The task is `running` until a follow stream has carried its task_finished event; then GET
    /task still says `running` `lag` more times (the server updates the row just after storing
    the event). `plans` shape the next follow streams, one each: {"events": n, "end": "break" |
    "eof" | "stall" | "repeat" | "linger" | 503}: n whole lines, then half a line and a broken
    connection ("break"), half a line and a clean end ("eof"), no events and a clean end with the
    task still running ("stall"), the event before `after` sent again first ("repeat"), or the
    stream held open a while after the last event ("linger", sync clients only)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.task: dict | None = task_out()
        self.events: list[dict] = []
        self.final: dict[str, dict] = {}
        self.plans: list[dict] = []
        self.lag = 0
        self.run("tsk_1", own_agent_run())

    def run(self, task_id: str, script: list[tuple[str, dict]]) -> None:
        for kind, data in script:
            seq = len(self.events) + 1
            self.events.append({"seq": seq, "task_id": task_id, "type": kind, "data": data,
                                "at": f"2026-01-01T00:00:{seq:02d}Z"})
        self.final[task_id] = dict(script[-1][1])

    def last(self, suffix: str = "", method: str | None = None) -> dict:
        return [r for r in self.requests if r["path"].endswith(suffix)
                and (method is None or r["method"] == method)][-1]

    def follows(self) -> list[dict]:
        return [r for r in self.requests if r["query"].get("follow") == "true"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        rec = {"method": request.method, "path": request.url.path,
               "query": dict(parse_qsl(request.url.query.decode())), "headers": dict(request.headers),
               "json": json.loads(body) if body else None, "body": body}
        self.requests.append(rec)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "unauthorized", "bad api key")
        seg = request.url.path.strip("/").split("/")
        if seg == ["v1", "sandboxes"] and request.method == "POST":
            if rec["json"]["template"] == "echo":  # a proxy that quotes the request body
                return httpx.Response(502, text=f"bad gateway for {body.decode()}")
            if rec["json"]["template"] == "echo-json":
                return err(400, "invalid_field", f"llm_key {rec['json'].get('llm_key')} is wrong", "llm_key")
            return httpx.Response(201, json=SB)
        vm, rest = seg[2], seg[3:]
        if vm != "sb1":
            return err(404, "not_found", f"no sandbox {vm!r}", "vm_id")
        if rest == ["task"] and request.method == "GET":
            return self.get_task()
        if rest == ["task"] and request.method == "POST":
            return self.follow_up(rec["json"])
        if rest == ["task", "cancel"]:
            return self.cancel()
        if rest == ["task", "events"]:
            after = int(rec["query"].get("after", 0))
            if rec["query"].get("follow") == "true":
                return self.follow(after)
            limit = int(rec["query"].get("limit", 500))
            batch = [e for e in self.events if e["seq"] > after][:limit]
            done = self.task["state"] not in ("starting", "running") and len(batch) < limit
            return httpx.Response(200, json={"events": batch, "next": batch[-1]["seq"] if batch else after,
                                             "done": done})
        return err(404, "not_found", f"no route {request.method} {request.url.path}")

    def get_task(self) -> httpx.Response:
        if self.task is None:
            return err(404, "task_not_found", "sandbox sb1 has had no task", "vm_id")
        if self.task.get("finished_pending") is not None:
            if self.lag > 0:
                self.lag -= 1
            else:
                self.task = {k: v for k, v in self.task.items() if k != "finished_pending"}
                self.task.update(self.final[self.task["task_id"]], ended_at="2026-01-01T00:01:00Z")
        return httpx.Response(200, json={k: v for k, v in self.task.items() if k != "finished_pending"})

    def follow_up(self, body: dict) -> httpx.Response:
        if self.task["state"] in ("starting", "running"):
            return err(409, "task_conflict", f"task {self.task['task_id']} is still running", "vm_id")
        tid = f"tsk_{len(self.final) + 1}"
        self.task = task_out(tid, state="starting", model=body.get("model") or "claude-sonnet-4-5")
        self.run(tid, [("task_started", {"task_id": tid, "agent": "e2a", "model": self.task["model"]}),
                       ("message", {"text": "Again: done."}),
                       ("task_finished", {"task_id": tid, **FINAL, "result": "Again: done."})])
        return httpx.Response(202, json=self.task)

    def cancel(self) -> httpx.Response:
        if self.task["state"] not in ("starting", "running"):
            return err(409, "task_not_running", f"task {self.task['task_id']} is {self.task['state']}", "vm_id")
        self.task.update(state="cancelled", error="cancelled through the API", ended_at="2026-01-01T00:02:00Z")
        self.task.pop("finished_pending", None)
        return httpx.Response(200, json=self.task)

    def line(self, e: dict) -> bytes:
        if e["type"] == "task_finished" and self.task["task_id"] == e["task_id"] \
                and self.task["state"] in ("starting", "running"):
            self.task["finished_pending"] = True  # the row catches up (after `lag` GETs)
        return (json.dumps(e) + "\n").encode()

    def follow(self, after: int) -> httpx.Response:
        plan = self.plans.pop(0) if self.plans else {}
        end = plan.get("end")
        if end == 503:
            return err(503, "unavailable", "e2a is restarting")
        if end == "stall":
            return httpx.Response(200, stream=Stream([]), headers={"content-type": "application/x-ndjson"})
        pending = [e for e in self.events if e["seq"] > after]
        n = plan.get("events", len(pending))
        pieces, error = [], None
        if end == "repeat" and after > 0:
            pieces.append((json.dumps(self.events[after - 1]) + "\n").encode())
        # Whole lines, sometimes two in one piece and one split over two pieces.
        for i, e in enumerate(pending[:n]):
            raw = self.line(e)
            if i % 3 == 1:
                pieces += [raw[:7], raw[7:]]
            elif i % 3 == 2 and pieces:
                pieces[-1] += raw
            else:
                pieces.append(raw)
        if end in ("break", "eof") and n < len(pending):
            half = json.dumps(pending[n]).encode()
            pieces.append(half[: len(half) // 2])
            if end == "break":
                error = httpx.RemoteProtocolError("peer closed connection without sending complete "
                                                  "message body (incomplete chunked read)")
        return httpx.Response(200, stream=Stream(pieces, error, 5.0 if end == "linger" else 0),
                              headers={"content-type": "application/x-ndjson"})


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Reconnects and polls without the real pauses."""
    monkeypatch.setattr(_core, "RETRY_PAUSE", 0.001)
    monkeypatch.setattr(_core.Waiter, "POLLS", (0.0, 0.001, 0.002, 0.003))
    monkeypatch.setattr(_core.Waiter, "REFOLLOW", 0.01)


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake):
    with E2A(API, KEY, transport=httpx.MockTransport(fake)) as c:
        yield c


def aclient(fake) -> AsyncE2A:
    return AsyncE2A(API, KEY, transport=httpx.MockTransport(fake))


def seqs(events) -> list[int]:
    return [e.seq for e in events]


ALL = list(range(1, 12))


# ====================================================================== create with an agent


def test_create_sends_the_agent_fields_given(client, fake):
    client.create_sandbox("standard")
    assert fake.last("/v1/sandboxes")["json"] == {"template": "standard"}
    sb = client.create_sandbox("browser", agent="claude-code", llm_key=LLM_KEY, task="Research",
                               model="claude-opus-4-1", task_timeout_seconds=600,
                               keep_after_task_seconds=300)
    assert isinstance(sb, Sandbox) and sb.vm_id == "sb1"
    assert fake.last("/v1/sandboxes")["json"] == {
        "template": "browser", "agent": "claude-code", "llm_key": LLM_KEY, "task": "Research",
        "model": "claude-opus-4-1", "task_timeout_seconds": 600, "keep_after_task_seconds": 300}
    tool = Tool(name="lookup", command="jq .q", description="look it up",
                parameters={"type": "object", "properties": {"q": {"type": "string"}}})
    client.create_sandbox(agent="e2a", llm_key=LLM_KEY, task="t", system_prompt="Be brief.",
                          llm={"vendor": "openai", "model": None, "base_url": "https://llm.example/v1"},
                          tools=[tool, {"name": "raw", "command": "cat"}], max_steps=7,
                          keep_after_task_seconds=0)
    body = fake.last("/v1/sandboxes")["json"]
    assert body["llm"] == {"vendor": "openai", "base_url": "https://llm.example/v1"}
    assert body["tools"] == [{"name": "lookup", "description": "look it up", "command": "jq .q",
                              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
                             {"name": "raw", "command": "cat"}]
    assert (body["system_prompt"], body["max_steps"], body["keep_after_task_seconds"]) == ("Be brief.", 7, 0)
    assert Tool("t", "cat").to_dict()["parameters"] == {"type": "object", "properties": {}}


def test_the_llm_key_is_in_no_repr_and_no_error(client, fake):
    c = _core.create_sandbox("standard", agent={"agent": "codex", "llm_key": LLM_KEY, "task": "t"})
    assert c.json["llm_key"] == LLM_KEY  # sent, of course
    assert LLM_KEY not in repr(c) and LLM_KEY not in str(c) and "'llm_key': '***'" in repr(c)
    # A proxy that quotes the request body, and a server that quotes the key: both cut.
    for template in ("echo", "echo-json"):
        with pytest.raises(E2AError) as e:
            client.create_sandbox(template, agent="codex", llm_key=LLM_KEY, task="t")
        assert e.value.status in (400, 502)
        shown = [str(e.value), repr(e.value), e.value.message, str(e.value.args)]
        assert all(LLM_KEY not in s for s in shown), shown
        assert "***" in e.value.message
    sb = client.create_sandbox(agent="codex", llm_key=LLM_KEY, task="t")
    assert LLM_KEY not in repr(sb) and LLM_KEY not in json.dumps(sb.to_dict())
    assert LLM_KEY not in repr(client) and LLM_KEY not in repr(client.__dict__)


def test_async_create_keeps_the_key_out_too(fake):
    async def go():
        async with aclient(fake) as c:
            await c.create_sandbox("browser", agent="e2a", llm_key=LLM_KEY, task="t",
                                   tools=[Tool("x", "cat")], llm={"vendor": "anthropic"})
            assert fake.last("/v1/sandboxes")["json"] == {
                "template": "browser", "agent": "e2a", "llm_key": LLM_KEY, "task": "t",
                "llm": {"vendor": "anthropic"},
                "tools": [{"name": "x", "command": "cat", "description": "",
                           "parameters": {"type": "object", "properties": {}}}]}
            with pytest.raises(E2AError) as e:
                await c.create_sandbox("echo", agent="e2a", llm_key=LLM_KEY)
            assert LLM_KEY not in str(e.value) and LLM_KEY not in repr(e.value)

    asyncio.run(go())


# ====================================================================== the task


def test_task_send_cancel(client, fake):
    t = client.task("sb1")
    assert fake.last("/task")["method"] == "GET" and fake.last("/task")["path"] == "/v1/sandboxes/sb1/task"
    assert t == Task(task_id="tsk_1", agent="e2a", vendor="anthropic", model="claude-sonnet-4-5",
                     state="running", started_at="2026-01-01T00:00:01Z")
    assert not t.done and not t.ok
    assert client.task(Sandbox(vm_id="sb1")).task_id == "tsk_1"  # a Sandbox works wherever an id does
    with pytest.raises(E2AError) as e:
        client.send_task("sb1", "more")
    assert (e.value.status, e.value.code) == (409, "task_conflict")
    c = client.cancel_task("sb1")
    assert fake.last("/task/cancel")["method"] == "POST"
    assert (c.state, c.error, c.done) == ("cancelled", "cancelled through the API", True)
    with pytest.raises(E2AError) as e:
        client.cancel_task("sb1")
    assert (e.value.status, e.value.code) == (409, "task_not_running")
    t = client.send_task("sb1", "more", model="claude-opus-4-1", task_timeout_seconds=30)
    assert fake.last("/task", "POST")["json"] == {"task": "more", "model": "claude-opus-4-1",
                                                  "task_timeout_seconds": 30}
    assert (t.task_id, t.state, t.model) == ("tsk_2", "starting", "claude-opus-4-1")
    client.cancel_task("sb1")
    client.send_task("sb1", "again")
    assert fake.last("/task", "POST")["json"] == {"task": "again"}
    with pytest.raises(E2AError) as e:
        client.task("nope")
    assert (e.value.status, e.value.code) == (404, "not_found")
    fake.task = None
    with pytest.raises(E2AError) as e:
        client.task("sb1")
    assert (e.value.status, e.value.code) == (404, "task_not_found")


def test_sandbox_shortcuts(client, fake):
    sb = client.create_sandbox(agent="e2a", llm_key=LLM_KEY, task="t")
    assert sb.task().task_id == "tsk_1"
    events, nxt, done = sb.task_events(after=9)
    assert seqs(events) == [10, 11] and nxt == 11
    assert seqs(sb.iter_task_events(after=8)) == [9, 10, 11]
    assert sb.wait_task(timeout=5).state == "succeeded"
    assert sb.send_task("more").task_id == "tsk_2"
    assert sb.cancel_task().state == "cancelled"


def test_one_page_of_events(client, fake):
    events, nxt, done = client.task_events("sb1")
    req = fake.last("/task/events")
    assert req["query"] == {"after": "0", "limit": "500"}
    assert seqs(events) == ALL and nxt == 11 and done is False  # the task still runs
    assert events[4] == TaskEvent(seq=5, task_id="tsk_1", type="tool_call",
                                  data={"id": "c1", "name": "shell",
                                        "arguments": {"command": "echo hi > result.txt && cat result.txt"}},
                                  at="2026-01-01T00:00:05Z")
    events, nxt, _ = client.task_events("sb1", after=3, limit=4)
    assert fake.last("/task/events")["query"] == {"after": "3", "limit": "4"}
    assert seqs(events) == [4, 5, 6, 7] and nxt == 7
    events, nxt, _ = client.task_events("sb1", after=11)
    assert events == [] and nxt == 11
    fake.task["state"] = "succeeded"
    assert client.task_events("sb1", after=5)[2] is True


# ====================================================================== following the events


def test_follow_streams_every_event_once(client, fake):
    it = client.iter_task_events("sb1")
    assert fake.follows() == []  # lazy: nothing is sent before iteration
    events = list(it)
    assert seqs(events) == ALL and [e.type for e in events][-1] == "task_finished"
    assert [r["query"] for r in fake.follows()] == [{"after": "0", "follow": "true"}]
    assert seqs(client.iter_task_events("sb1", after=9)) == [10, 11]


def test_follow_resumes_a_broken_stream_without_loss_or_repeats(client, fake):
    fake.plans = [{"events": 4, "end": "break"},     # 4 lines, half a line, connection lost
                  {"events": 0, "end": "break"},     # lost again before a whole line
                  {"end": 503},                      # e2a (or a proxy) not answering for now
                  {"events": 2, "end": "eof"},       # a clean end in the middle of a line
                  {"end": "repeat"}]                 # sends seq 6 again, then 7..11, then ends
    events = list(client.iter_task_events("sb1"))
    assert seqs(events) == ALL
    assert [r["query"]["after"] for r in fake.follows()] == ["0", "4", "4", "4", "6"]


def test_follow_gives_up_after_breaks_in_a_row(client, fake, monkeypatch):
    monkeypatch.setattr(_core, "MAX_RECONNECTS", 3)
    fake.plans = [{"events": 1, "end": "break"}] + [{"events": 0, "end": "break"}] * 4
    got = []
    with pytest.raises(httpx.RemoteProtocolError):
        for ev in client.iter_task_events("sb1"):
            got.append(ev.seq)
    assert got == [1] and len(fake.follows()) == 4  # the first, then 3 reconnects that break too


def test_follow_raises_api_errors_at_once(client, fake):
    with pytest.raises(E2AError) as e:
        list(client.iter_task_events("nope"))
    assert (e.value.status, e.value.code) == (404, "not_found")
    assert len(fake.follows()) == 1


def test_async_follow_resumes_too(fake):
    async def go():
        async with aclient(fake) as c:
            fake.plans = [{"events": 5, "end": "break"}, {"end": 503}, {"events": 1, "end": "eof"},
                          {"end": "repeat"}]
            events = [ev async for ev in c.iter_task_events("sb1")]
            assert seqs(events) == ALL
            assert [r["query"]["after"] for r in fake.follows()] == ["0", "5", "5", "6"]
            assert isinstance(events[0], TaskEvent) and events[0].type == "task_started"
            page, nxt, _ = await c.task_events("sb1", after=10)
            assert seqs(page) == [11] and nxt == 11

    asyncio.run(go())


# ====================================================================== wait_task


def test_wait_follows_until_the_task_is_over(client, fake):
    fake.plans = [{"events": 3, "end": "break"}]
    fake.lag = 2  # the row says running a little after the task_finished event
    t = client.wait_task("sb1", timeout=10)
    assert t.task_id == "tsk_1" and t.state == "succeeded" and t.result == "Wrote result.txt."
    assert (t.llm_requests, t.input_tokens, t.output_tokens) == (3, 1200, 80) and t.ended_at
    assert [r["query"]["after"] for r in fake.follows()] == ["0", "3"]
    n = len(fake.requests)
    assert client.wait_task("sb1") == t and len(fake.requests) == n + 1  # over already: one GET


def test_wait_returns_the_event_account_if_the_row_lags(client, fake):
    fake.lag = 1000
    t = client.wait_task("sb1", timeout=10)
    assert (t.task_id, t.state, t.result, t.llm_requests) == ("tsk_1", "succeeded", "Wrote result.txt.", 3)
    assert t.ended_at == "2026-01-01T00:00:11Z"  # the task_finished event's time


def test_wait_for_a_follow_up_skips_the_earlier_tasks(client, fake):
    fake.task.update(FINAL)
    t = client.send_task("sb1", "more")
    assert t.task_id == "tsk_2"
    fake.lag = 1
    final = client.wait_task("sb1", timeout=10)
    assert (final.task_id, final.state, final.result) == ("tsk_2", "succeeded", "Again: done.")


def test_wait_times_out_clearly(client, fake):
    fake.plans = [{"end": "stall"}] * 1000  # the stream ends and the task still runs
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as e:
        client.wait_task("sb1", timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 3
    assert isinstance(e.value, E2AError) and isinstance(e.value, TimeoutError)
    assert (e.value.status, e.value.code) == (0, "wait_timeout")
    assert e.value.task.task_id == "tsk_1" and e.value.task.state == "running"
    assert "tsk_1" in str(e.value) and "still running after 0.3 s" in str(e.value)


def test_async_wait(fake):
    async def go():
        async with aclient(fake) as c:
            fake.plans = [{"events": 6, "end": "break"}]
            fake.lag = 2
            t = await c.wait_task("sb1", timeout=10)
            assert (t.state, t.result) == ("succeeded", "Wrote result.txt.")
            assert [r["query"]["after"] for r in fake.follows()] == ["0", "6"]
            await c.send_task("sb1", "more")
            fake.plans = [{"end": "stall"}] * 1000
            with pytest.raises(WaitTimeout) as e:
                await c.wait_task("sb1", timeout=0.2)
            assert e.value.task.task_id == "tsk_2" and e.value.code == "wait_timeout"
            assert (await c.cancel_task("sb1")).state == "cancelled"

    asyncio.run(go())


class Quiet:
    """A real HTTP server whose task runs on and whose event stream goes quiet after one event:
    only a read timeout can end the wait."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ")[1].decode()
        if "/task/events" in path:
            line = json.dumps({"seq": 1, "task_id": "tsk_1", "type": "task_started", "data": {},
                               "at": "2026-01-01T00:00:00Z"}).encode() + b"\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(line) + line + b"\r\n")
            return  # and then nothing, connection open
        body = json.dumps(task_out()).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_wait_timeout_holds_while_the_stream_is_quiet():
    server = Quiet()
    try:
        with E2A(server.url, KEY) as c:
            t0 = time.monotonic()
            with pytest.raises(WaitTimeout) as e:
                c.wait_task("sb1", timeout=0.5)
            assert 0.5 <= time.monotonic() - t0 < 4 and e.value.task.state == "running"

        async def go():
            async with AsyncE2A(server.url, KEY) as c:
                t0 = time.monotonic()
                with pytest.raises(WaitTimeout):
                    await c.wait_task("sb1", timeout=0.5)
                assert 0.5 <= time.monotonic() - t0 < 4

        asyncio.run(go())
    finally:
        server.close()


# ====================================================================== shapes


def test_sync_and_async_offer_the_same_task_methods():
    for name in ("task", "send_task", "cancel_task", "task_events", "iter_task_events", "wait_task",
                 "create_sandbox"):
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (E2A, AsyncE2A))
        assert list(sync.values()) == list(async_.values()), name
    assert inspect.isasyncgenfunction(AsyncE2A._follow) and inspect.isgeneratorfunction(E2A._follow)


def test_models_match_the_routes():
    """The SDK's models hold exactly the routes' response fields; create and send_task take
    exactly the request fields."""
    from e2a.api.schemas import (CreateSandbox, FollowUpRequest, LlmRequest, TaskEventOut, TaskEventsOut,
                                 TaskOut, ToolRequest)

    assert [f.name for f in fields(Task)] == list(TaskOut.model_fields)
    assert [f.name for f in fields(TaskEvent)] == list(TaskEventOut.model_fields)
    assert set(task_out()) - {"field_from_the_future"} == set(TaskOut.model_fields)
    assert {f.name for f in fields(Tool)} == set(ToolRequest.model_fields)
    assert set(TaskEventsOut.model_fields) == {"events", "next", "done"}
    assert set(LlmRequest.model_fields) == {"vendor", "model", "base_url"}
    create = set(inspect.signature(E2A.create_sandbox).parameters) - {"self"}
    assert create == set(CreateSandbox.model_fields)
    send = set(inspect.signature(E2A.send_task).parameters) - {"self", "vm_id"}
    assert send == set(FollowUpRequest.model_fields)


# ====================================================================== CLI


@pytest.fixture
def cli_fake(fake, monkeypatch):
    """The CLI's client, talking to the fake through the mock transport; no LLM keys around."""
    monkeypatch.setenv("E2A_URL", API)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "DEEPSEEK_API_KEY", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "E2A", lambda url, key: E2A(url, key, transport=httpx.MockTransport(fake)))
    return fake


def run_cli(*args, input=None, env=None):
    return CliRunner().invoke(cli.main, list(args), input=input, env=env)


def creates(fake) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/v1/sandboxes" and r["method"] == "POST"]


def test_cli_create_reads_the_key_from_the_agents_variable(cli_fake, monkeypatch):
    for agent, var in (("claude-code", "ANTHROPIC_API_KEY"), ("codex", "OPENAI_API_KEY"),
                       ("gemini-cli", "GEMINI_API_KEY")):
        monkeypatch.setenv(var, f"{LLM_KEY}-{agent}")
        r = run_cli("sandbox", "create", "browser", "--agent", agent, "--task", "Research",
                    "--model", "m", "--task-timeout", "600", "--keep-after-task", "120")
        assert r.exit_code == 0, r.output
        assert r.stdout == "sb1\n" and LLM_KEY not in r.output
        assert creates(cli_fake)[-1]["json"] == {
            "template": "browser", "agent": agent, "llm_key": f"{LLM_KEY}-{agent}", "task": "Research",
            "model": "m", "task_timeout_seconds": 600, "keep_after_task_seconds": 120}
        monkeypatch.delenv(var)


def test_cli_llm_key_env_names_another_variable(cli_fake, monkeypatch):
    monkeypatch.setenv("MY_KEY", f"  {LLM_KEY}\n")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "not-this-one")
    r = run_cli("sandbox", "create", "--agent", "claude-code", "--llm-key-env", "MY_KEY", "--task", "t", "--json")
    assert r.exit_code == 0, r.output
    assert creates(cli_fake)[-1]["json"]["llm_key"] == LLM_KEY and LLM_KEY not in r.output
    assert json.loads(r.stdout)["vm_id"] == "sb1"


def test_cli_without_the_key_is_a_usage_error_before_any_request(cli_fake, monkeypatch):
    r = run_cli("sandbox", "create", "--agent", "codex", "--task", "t")
    assert r.exit_code == 2 and "OPENAI_API_KEY holds no LLM key for codex" in r.stderr
    assert "--llm-key-env" in r.stderr
    r = run_cli("sandbox", "create", "--agent", "codex", "--llm-key-env", "MY_KEY")
    assert r.exit_code == 2 and "MY_KEY holds no LLM key" in r.stderr
    monkeypatch.setenv("MY_KEY", LLM_KEY)
    r = run_cli("sandbox", "create", "--llm-key-env", "MY_KEY")  # no agent: the key is not read
    assert r.exit_code == 2 and "--llm-key-env applies only with --agent" in r.stderr
    assert creates(cli_fake) == []
    # The key itself is never an argument (it would show in the process list).
    r = run_cli("sandbox", "create", "--agent", "codex", "--llm-key", LLM_KEY)
    assert r.exit_code == 2 and "No such option" in r.stderr and creates(cli_fake) == []


def test_cli_own_agent_options_and_its_default_key(cli_fake, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-deepseek")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "lookup", "command": "jq .q", "parameters": {"type": "object"}}]))
    r = run_cli("sandbox", "create", "--agent", "e2a", "--model", "gpt-5", "--task", "-",
                "--system-prompt", "Be brief.", "--tools-file", str(tools), "--max-steps", "9",
                input="a task\nfrom stdin\n")
    assert r.exit_code == 0, r.output
    assert creates(cli_fake)[-1]["json"] == {
        "template": "standard", "agent": "e2a", "llm_key": "sk-openai", "task": "a task\nfrom stdin\n",
        "model": "gpt-5", "system_prompt": "Be brief.", "max_steps": 9,
        "tools": [{"name": "lookup", "command": "jq .q", "parameters": {"type": "object"}}]}
    run_cli("sandbox", "create", "--agent", "deictic", "--llm-vendor", "deepseek", "--task", "t")
    assert creates(cli_fake)[-1]["json"]["llm"] == {"vendor": "deepseek"}
    assert creates(cli_fake)[-1]["json"]["llm_key"] == "sk-deepseek"
    run_cli("sandbox", "create", "--agent", "e2a", "--llm-base-url", "https://llm.example/v1", "--task", "t")
    body = creates(cli_fake)[-1]["json"]
    assert body["llm"] == {"base_url": "https://llm.example/v1"} and body["llm_key"] == "sk-ant"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = run_cli("sandbox", "create", "--agent", "e2a", "--tools-file", str(bad))
    assert r.exit_code == 2 and "expected a JSON list" in r.stderr


def test_cli_create_follow_prints_the_run(cli_fake, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", LLM_KEY)
    cli_fake.plans = [{"events": 5, "end": "break"}]
    r = run_cli("sandbox", "create", "--agent", "e2a", "--task", "t", "--follow")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "sb1" and LLM_KEY not in r.output
    assert r.stdout.count("I'll write the file.") == 1  # streamed, not repeated by the whole message
    assert "── task tsk_1 succeeded (3 LLM request(s), 1200 tokens in, 80 out)" in r.stdout
    assert run_cli("sandbox", "create", "--follow").exit_code == 2
    # It ends with the task, however long the server holds the stream open after it.
    cli_fake.plans = [{"end": "linger"}]
    cli_fake.task.update(state="running")
    cli_fake.final["tsk_1"]["state"] = "failed"
    cli_fake.events[-1]["data"].update(state="failed", error="the provider said 401")
    t0 = time.monotonic()
    r = run_cli("sandbox", "create", "--agent", "e2a", "--task", "t", "--follow")
    assert time.monotonic() - t0 < 3 and r.exit_code == 1
    assert r.stdout.splitlines()[-1].endswith("): the provider said 401")


def test_cli_events_readable(cli_fake):
    r = run_cli("task", "events", "sb1")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "── task tsk_1 started (e2a, model claude-sonnet-4-5)",
        "I'll write the file.",
        "→ shell: echo hi > result.txt && cat result.txt",
        "hi",
        "← shell",
        '→ read_file({"path": "nope.txt"})',
        "← read_file (error): no such file: nope.txt",
        "Wrote result.txt.",
        "── task tsk_1 succeeded (3 LLM request(s), 1200 tokens in, 80 out)",
    ]
    r = run_cli("task", "events", "sb1", "--after", "9", "--json")
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [10, 11]
    assert json.loads(r.stdout.splitlines()[1]) == cli_fake.events[10]


def test_cli_events_pages_to_the_end(cli_fake, monkeypatch):
    cli_fake.run("tsk_1", [("stdout", {"text": f"line {i}"}) for i in range(2500)])
    r = run_cli("task", "events", "sb1", "--json")
    assert r.exit_code == 0
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == list(range(1, 2512))
    assert [q["query"]["after"] for q in cli_fake.requests if q["path"].endswith("/events")] == ["0", "1000", "2000"]


def test_cli_events_follow_resumes(cli_fake):
    cli_fake.plans = [{"events": 2, "end": "break"}, {"events": 4, "end": "eof"}]
    r = run_cli("task", "events", "sb1", "--follow", "--json")
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == ALL
    r = run_cli("task", "events", "sb1", "-f", "--after", "10")
    assert r.exit_code == 0 and r.stdout.startswith("── task tsk_1 succeeded")


def test_cli_show_cancel_send_wait(cli_fake):
    r = run_cli("task", "show", "sb1")
    assert r.exit_code == 0 and "state:" in r.stdout and "running" in r.stdout
    assert json.loads(run_cli("task", "show", "sb1", "--json").stdout)["task_id"] == "tsk_1"
    r = run_cli("task", "send", "sb1", "more")
    assert r.exit_code == 1 and r.stderr.startswith("error: task_conflict: task tsk_1 is still running")
    r = run_cli("task", "wait", "sb1", "--timeout", "10")
    assert r.exit_code == 0 and "succeeded" in r.stdout and "Wrote result.txt." in r.stdout
    r = run_cli("task", "cancel", "sb1")
    assert r.exit_code == 1 and r.stderr.startswith("error: task_not_running: task tsk_1 is succeeded")
    r = run_cli("task", "send", "sb1", "-", "--model", "claude-opus-4-1", "--task-timeout", "60",
                input="from stdin")
    assert r.exit_code == 0 and r.stdout == "tsk_2\n"
    assert cli_fake.last("/task", "POST")["json"] == {"task": "from stdin", "model": "claude-opus-4-1",
                                                      "task_timeout_seconds": 60}
    r = run_cli("task", "cancel", "sb1")
    assert r.exit_code == 0 and r.stdout == "tsk_2 cancelled\n"
    r = run_cli("task", "wait", "sb1", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["state"] == "cancelled"
    r = run_cli("task", "send", "sb1", "again", "--follow")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "tsk_3" and "tsk_1" not in r.stdout  # only this task's events
    assert lines[1:] == ["── task tsk_3 started (e2a, model claude-sonnet-4-5)", "Again: done.",
                         "── task tsk_3 succeeded (3 LLM request(s), 1200 tokens in, 80 out)"]


def test_cli_wait_timeout(cli_fake):
    cli_fake.plans = [{"end": "stall"}] * 1000
    r = run_cli("task", "wait", "sb1", "--timeout", "0.2")
    assert r.exit_code == 1 and r.stderr.startswith("error: wait_timeout: task tsk_1 of sandbox sb1 is "
                                                    "still running after 0.2 s")


def event(seq: int, kind: str, data: dict) -> TaskEvent:
    return TaskEvent(seq=seq, task_id="tsk_1", type=kind, data=data)


def render(*events: TaskEvent) -> list[str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        p = cli._EventPrinter()
        for ev in events:
            p.event(ev)
        p.finished()
    return out.getvalue().splitlines()


def test_cli_renders_the_clis_events():
    claude = [
        {"type": "system", "subtype": "init", "session_id": "s1", "model": "claude-sonnet-4-5"},
        {"type": "assistant", "message": {"content": [
            {"type": "text", "text": "Writing it."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "echo hi > result.txt"}}]}},
        {"type": "user", "message": {"content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "done"}],
             "is_error": False}]}},
        {"type": "assistant", "message": {"content": [
            {"type": "tool_use", "id": "t2", "name": "Write", "input": {"file_path": "/home/user/a"}}]}},
        {"type": "result", "subtype": "success", "num_turns": 2, "result": "Done."},
    ]
    assert render(*(event(i, "cli", d) for i, d in enumerate(claude, 1))) == [
        "claude-code session s1 (model claude-sonnet-4-5)", "Writing it.", "→ Bash: echo hi > result.txt",
        "← result: done", '→ Write({"file_path": "/home/user/a"})', "claude-code: success after 2 turn(s)"]
    codex = [
        {"type": "thread.started", "thread_id": "th1"},
        {"type": "turn.started"},
        {"type": "item.started", "item": {"id": "i1", "type": "command_execution", "command": "bash -lc 'ls'",
                                          "status": "in_progress"}},
        {"type": "item.completed", "item": {"id": "i1", "type": "command_execution", "command": "bash -lc 'ls'",
                                            "aggregated_output": "a\nb\n", "exit_code": 0, "status": "completed"}},
        {"type": "item.completed", "item": {"id": "i2", "type": "file_change", "status": "completed",
                                            "changes": [{"path": "result.txt", "kind": "add"}]}},
        {"type": "item.completed", "item": {"id": "i3", "type": "agent_message", "text": "All done."}},
        {"type": "turn.completed", "usage": {"input_tokens": 10, "output_tokens": 2}},
    ]
    assert render(*(event(i, "cli", d) for i, d in enumerate(codex, 1))) == [
        "codex thread th1", "→ shell: bash -lc 'ls'", "← shell (exit 0)", "a", "b",
        "→ edit(add result.txt)", "All done.", "codex: turn completed (10 in, 2 out)"]
    gemini = [
        {"type": "init", "session_id": "g1", "model": "gemini-2.5-pro"},
        {"type": "message", "role": "user", "content": "the task"},
        {"type": "message", "role": "assistant", "content": "Writing ", "delta": True},
        {"type": "message", "role": "assistant", "content": "it.", "delta": True},
        {"type": "tool_use", "tool_name": "write_file", "tool_id": "w1", "parameters": {"file_path": "a"}},
        {"type": "tool_result", "tool_id": "w1", "status": "error", "error": {"message": "denied"}},
        {"type": "result", "status": "success", "stats": {}},
    ]
    assert render(*(event(i, "cli", d) for i, d in enumerate(gemini, 1))) == [
        "gemini-cli session g1 (model gemini-2.5-pro)", "Writing it.", '→ write_file({"file_path": "a"})',
        "← w1 (error): denied", "gemini-cli: success"]
    assert render(event(1, "cli", {"type": "something_new", "x": 1}), event(2, "stderr", {"text": "warn"}),
                  event(3, "new_kind", {"a": [1]})) == [
        '[cli] {"type": "something_new", "x": 1}', "warn", '[new_kind] {"a": [1]}']
    long = "\n".join(f"row {i}" for i in range(50))
    lines = render(event(1, "tool_result", {"id": "x", "name": "read_file", "output": long, "is_error": False,
                                            "images": []}),
                   event(2, "tool_result", {"id": "y", "name": "browser", "output": "", "is_error": False,
                                            "images": ["..."]}),
                   event(3, "task_finished", {"task_id": "tsk_1", "state": "failed", "error": "401 invalid x-api-key",
                                              "llm_requests": 1, "input_tokens": 0, "output_tokens": 0}))
    assert lines[0] == "← read_file" and lines[1] == "row 0" and lines[21] == "… (30 more lines)"
    assert lines[22] == "← browser: [1 image(s)]"
    assert lines[23] == "── task tsk_1 failed (1 LLM request(s), 0 tokens in, 0 out): 401 invalid x-api-key"


def test_cli_markup_in_agent_text_is_printed_as_is(cli_fake):
    cli_fake.events[3]["data"]["text"] = "[bold]not markup[/bold] and [link]"
    cli_fake.events[1]["data"]["text"] = "[red]x[/red] "
    cli_fake.events[2]["data"]["text"] = "[/] :thumbs_up:"
    r = run_cli("task", "events", "sb1")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1] == "[red]x[/red] [/] :thumbs_up:"
