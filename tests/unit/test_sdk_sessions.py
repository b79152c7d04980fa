"""Agent sessions and secret bundles in the SDK (sync and async) and the CLI.

No e2a server: the REST routes (/v1/sessions, /v1/tenants/me/secrets) are a fake behind
httpx.MockTransport that records every request; the session WebSocket is a real ``websockets``
server in a thread that plays the protocol (/tmp/session_protocol.md, docs/sessions.md): ready,
numbered events, ack/pong/error replies, connections dropped on purpose, takeover (4001), ended
(4000), refused handshakes (401/404/410). Both share one state, so a JWT from POST /token opens
the WebSocket and a DELETE closes it.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import socket
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from click.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from e2a import cli
from e2a.sdk import (E2A, AsyncE2A, AsyncSecrets, AsyncSessionConnection, E2AError, Secrets, SecretBundle,
                     Session, SessionConnection, SessionDisconnected, SessionEnded, SessionError, SessionEvent,
                     SessionReady, SessionTakenOver, SessionTicket)
from e2a.sdk import _core, _session

KEY = "test-key"
LLM_KEY = "sk-proj-SECRET-llm-key-0123456789"
SECRET_VALUE = "sk-bundle-SECRET-value-9876543210"
T0 = "2026-01-01T00:00:00Z"


def err(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "field": field}})


def script(task_id: str, text: str) -> list[tuple[str, dict]]:
    """What the fake agent does with a task: a short run in the documented event shapes; "fail"
    in the text makes it fail; "wait" leaves it running until cancelled."""
    started = ("task_started", {"task_id": task_id, "agent": "deictic", "model": "gpt-5"})
    if "wait" in text:
        return [started]
    state = "failed" if "fail" in text else "succeeded"
    return [
        started,
        ("message_delta", {"text": "Reading "}),
        ("message_delta", {"text": "data.csv."}),
        ("message", {"text": "Reading data.csv."}),
        ("tool_call", {"id": "c1", "name": "shell", "arguments": {"command": "wc -l attachments/data.csv"}}),
        ("tool_output", {"id": "c1", "stream": "stdout", "text": "3 attachments/data.csv\n"}),
        ("tool_result", {"id": "c1", "name": "shell", "output": "3 attachments/data.csv\n", "is_error": False,
                         "images": []}),
        ("message", {"text": "It has 3 lines."}),
        ("task_finished", {"task_id": task_id, "state": state, "result": "It has 3 lines." if state == "succeeded" else None,
                           "error": "the model gave up" if state == "failed" else None,
                           "llm_requests": 2, "input_tokens": 100, "output_tokens": 20}),
    ]


TASK_EVENTS = len(script("t", "x"))  # 9


class Fake:
    """e2a's session routes and WebSocket. ``plans`` shape the next WebSocket connections, one
    each: {"refuse": status}, {"drop_after": n} (cut the TCP connection after sending n events of
    the next task, which runs on), {"drop_before_ack": True} (take the task, then cut before the
    ack), {"drop_on_task": True} (cut on the task frame, not taking it), {"repeat": True} (send
    the event at ``after`` again first), {"close": (code, reason)} after the replay."""

    def __init__(self):
        self.requests: list[dict] = []
        self.handshakes: list[dict] = []
        self.frames: list[dict] = []
        self.sessions: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.jwts: dict[str, str] = {}
        self.issued = 0
        self.attachments: dict[str, list[dict]] = {}  # per session, per task: name -> bytes received
        self.live: dict[str, object] = {}
        self.bundles: dict[str, dict] = {}
        self.plans: list[dict] = []
        self.lock = threading.Lock()
        self.server = serve(self.handler, "127.0.0.1", 0, process_request=self.process_request)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.ws_url = self.url.replace("http://", "ws://")

    def close(self):
        self.server.shutdown()

    # ------------------------------------------------------------ REST

    def last(self, suffix: str = "", method: str | None = None) -> dict:
        return [r for r in self.requests if r["path"].endswith(suffix)
                and (method is None or r["method"] == method)][-1]

    def issue(self, sid: str) -> str:
        self.issued += 1
        jwt = f"eyJ.{sid}.{self.issued}"
        self.jwts[jwt] = sid
        return jwt

    def new_session(self, body: dict) -> dict:
        sid = f"ses_{len(self.sessions) + 1}"
        llm = body.get("llm") or {}
        self.sessions[sid] = {
            "chat_session_id": sid, "state": "active", "user_id": body["user_id"],
            "agent": {"kind": body["agent"]["kind"], "version": body["agent"].get("version") or "1.2.3"},
            "template": body.get("template", "standard"),
            "llm": {"vendor": llm.get("vendor", "openai"), "model": llm.get("model", "gpt-5")},
            "app": {"id": "default", "set_id": "default", "capability_sets": ["shell", "files"]},
            "secrets": body.get("secrets", []), "vm_id": f"sb_{sid}", "workspace_id": "ws_1",
            "connected": False, "task": None, "created_at": T0, "expires_at": "2026-01-01T01:00:00Z",
            "ended_at": None, "end_reason": None, "metadata": body.get("metadata", {}),
            "usage": {"tasks": 0, "llm_requests": 0, "input_tokens": 0, "output_tokens": 0, "events": 0,
                      "seconds": 0}, "field_from_the_future": 1}
        self.events[sid] = []
        return self.sessions[sid]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        rec = {"method": request.method, "path": request.url.path, "raw_path": request.url.raw_path,
               "query": dict(parse_qsl(request.url.query.decode())), "headers": dict(request.headers),
               "json": json.loads(body) if body else None, "body": body}
        self.requests.append(rec)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "unauthorized", "bad api key")
        seg = request.url.path.strip("/").split("/")
        method = request.method
        if seg[:3] == ["v1", "tenants", "me"]:
            return self.secret_route(method, seg[3:], rec["json"], body)
        if seg == ["v1", "sessions"] and method == "POST":
            b = rec["json"]
            if b["user_id"] == "echo":  # a proxy that quotes the request body
                return httpx.Response(502, text=f"bad gateway for {body.decode()}")
            if b.get("secrets") and "missing" in b["secrets"]:
                return err(404, "secret_not_found", "no secret bundle 'missing'", "secrets")
            s = self.new_session(b)
            return httpx.Response(201, json={"chat_session_id": s["chat_session_id"], "jwt": self.issue(s["chat_session_id"]),
                                             "connect_url": f"{self.ws_url}/v1/sessions/{s['chat_session_id']}/ws",
                                             "expires_at": s["expires_at"]})
        if seg == ["v1", "sessions"] and method == "GET":
            rows = [s for s in self.sessions.values()
                    if rec["query"].get("state") in (None, s["state"])
                    and rec["query"].get("user_id") in (None, s["user_id"])]
            return httpx.Response(200, json={"sessions": rows})
        sid = seg[2] if len(seg) > 2 else ""
        if sid not in self.sessions:
            return err(404, "session_not_found", f"no session {sid!r}", "chat_session_id")
        s = self.sessions[sid]
        if seg[3:] == [] and method == "GET":
            return httpx.Response(200, json=s)
        if seg[3:] == [] and method == "DELETE":
            self.end(sid, "deleted")
            return httpx.Response(200, json=s)
        if seg[3:] == ["token"] and method == "POST":
            if s["state"] != "active":
                return err(409, "session_ended", f"session {sid} has ended ({s['end_reason']})", "chat_session_id")
            return httpx.Response(200, json={"jwt": self.issue(sid), "expires_at": "2026-01-01T00:15:00Z"})
        return err(404, "not_found", f"no route {method} {request.url.path}")

    def secret_route(self, method: str, seg: list[str], body: dict | None, raw: bytes) -> httpx.Response:
        def out(name: str) -> dict:
            b = self.bundles[name]
            return {"name": name, "keys": sorted(b["values"]), "version": b["version"], "created_at": T0,
                    "updated_at": b["updated_at"]}

        if seg == ["secrets"] and method == "POST":
            if body["name"] == "echo":
                return httpx.Response(502, text=f"bad gateway for {raw.decode()}")
            if body["name"] in self.bundles:
                return err(409, "secret_exists", f"secret bundle {body['name']!r} exists", "name")
            self.bundles[body["name"]] = {"values": body["values"], "version": 1, "updated_at": T0}
            return httpx.Response(201, json=out(body["name"]))
        if seg == ["secrets"] and method == "GET":
            return httpx.Response(200, json={"secrets": [out(n) for n in sorted(self.bundles)]})
        name = seg[1]
        if name not in self.bundles:
            return err(404, "not_found", f"no secret bundle {name!r}", "name")
        if method == "GET":
            return httpx.Response(200, json=out(name))
        if method == "PUT":
            b = self.bundles[name]
            b.update(values=body["values"], version=b["version"] + 1, updated_at="2026-01-02T00:00:00Z")
            return httpx.Response(200, json=out(name))
        if method == "DELETE":
            del self.bundles[name]
            return httpx.Response(204)
        return err(405, "method_not_allowed", method)

    # ------------------------------------------------------------ the WebSocket

    def process_request(self, conn, request):
        parts = urlsplit(request.path)
        query = dict(parse_qsl(parts.query))
        seg = parts.path.strip("/").split("/")
        sid = seg[2] if len(seg) == 4 else ""
        auth = request.headers.get("Authorization")
        self.handshakes.append({"session": sid, "after": int(query.get("after", -1)), "auth": auth})
        conn.plan = self.plans.pop(0) if self.plans else {}
        if conn.plan.get("refuse"):
            return conn.respond(conn.plan["refuse"], "e2a is restarting")
        jwt = (auth or "").removeprefix("Bearer ")
        if self.jwts.get(jwt) != sid or sid not in self.sessions:
            if sid not in self.sessions and jwt in self.jwts:
                return conn.respond(404, json.dumps({"error": {"code": "session_not_found", "message": f"no session {sid}",
                                                               "field": None}}))
            return conn.respond(401, json.dumps({"error": {"code": "unauthorized", "message": "bad or expired JWT",
                                                           "field": None}}))
        if self.sessions[sid]["state"] != "active":
            return conn.respond(410, json.dumps({"error": {"code": "session_ended",
                                                           "message": f"session {sid} has ended", "field": None}}))
        conn.sid, conn.after = sid, int(query.get("after", 0))
        return None

    def send(self, conn, msg: dict) -> None:
        conn.send(json.dumps(msg))

    def cut(self, conn) -> None:
        """The TCP connection lost, no close frame."""
        conn.socket.shutdown(socket.SHUT_RDWR)

    def store(self, sid: str, task_id: str | None, kind: str, data: dict) -> dict:
        with self.lock:
            evs = self.events[sid]
            ev = {"seq": len(evs) + 1, "type": kind, "task_id": task_id, "data": data,
                  "at": f"2026-01-01T00:00:{len(evs) + 1:02d}Z"}
            evs.append(ev)
            if kind == "task_finished":
                self.sessions[sid]["task"]["state"] = data["state"]
            return ev

    def end(self, sid: str, reason: str) -> None:
        s = self.sessions[sid]
        s.update(state="ended", end_reason=reason, ended_at="2026-01-01T00:30:00Z", connected=False)
        if (conn := self.live.pop(sid, None)) is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a sync client: closed before the route answers
            conn.close(4000, reason)
            return
        # An async client answers the close from the event loop that is calling this route
        # through the mock transport: not waited for.
        threading.Thread(target=conn.close, args=(4000, reason), daemon=True).start()

    def handler(self, conn) -> None:
        sid, after, plan = conn.sid, conn.after, conn.plan
        old, self.live[sid] = self.live.get(sid), conn
        if old is not None:
            old.close(4001, "taken over")
        s = self.sessions[sid]
        s["connected"] = True
        self.send(conn, {"type": "ready", "chat_session_id": sid, "state": "active",
                         "last_seq": len(self.events[sid]), "expires_at": s["expires_at"], "task": s["task"]})
        if plan.get("repeat") and after > 0:
            self.send(conn, self.events[sid][after - 1])
        for ev in list(self.events[sid][after:]):
            self.send(conn, ev)
        if plan.get("close"):
            conn.close(*plan["close"])
            return
        try:
            for raw in iter_frames(conn):
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self.send(conn, {"type": "error", "id": None, "code": "bad_message", "message": "not JSON"})
                    continue
                self.frames.append(msg)
                if not self.answer(conn, sid, msg, plan):
                    return
        finally:
            if self.live.get(sid) is conn:
                del self.live[sid]
                s["connected"] = False

    def answer(self, conn, sid: str, msg: dict, plan: dict) -> bool:
        s, rid, kind = self.sessions[sid], msg.get("id"), msg.get("type")
        running = s["task"] is not None and s["task"]["state"] == "running"
        if kind == "ping":
            self.send(conn, {"type": "pong", "id": rid})
        elif kind == "cancel":
            if not running:
                self.send(conn, {"type": "error", "id": rid, "code": "no_task", "message": "no task is running"})
                return True
            tid = s["task"]["task_id"]
            self.send(conn, {"type": "ack", "id": rid, "op": "cancel", "task_id": tid})
            self.send(conn, self.store(sid, tid, "task_finished", {
                "task_id": tid, "state": "cancelled", "result": None, "error": "cancelled", "llm_requests": 1,
                "input_tokens": 10, "output_tokens": 0}))
        elif kind == "task":
            if running:
                self.send(conn, {"type": "error", "id": rid, "code": "task_running",
                                 "message": f"task {s['task']['task_id']} is running"})
                return True
            for a in msg.get("attachments") or []:
                if a["name"] == "virus.exe":
                    self.send(conn, {"type": "error", "id": rid, "code": "invalid_attachment",
                                     "message": "attachment virus.exe refused"})
                    return True
            if plan.pop("drop_on_task", False):
                self.cut(conn)
                return False
            s["usage"]["tasks"] += 1
            tid = f"tsk_{s['usage']['tasks']}"
            s["task"] = {"task_id": tid, "state": "running"}
            self.attachments.setdefault(sid, []).append(
                {a["name"]: base64.b64decode(a["content_base64"]) for a in msg.get("attachments") or []})
            stored = [self.store(sid, tid, k, d) for k, d in script(tid, msg["text"])]
            if plan.pop("drop_before_ack", False):
                self.cut(conn)
                return False
            self.send(conn, {"type": "ack", "id": rid, "op": "task", "task_id": tid})
            for i, ev in enumerate(stored):
                if plan.get("drop_after") == i:
                    self.cut(conn)
                    return False
                self.send(conn, ev)
        else:
            self.send(conn, {"type": "error", "id": rid, "code": "bad_message", "message": f"unknown type {kind!r}"})
        return True


def iter_frames(conn):
    """The client's frames until the connection ends, however it ends."""
    while True:
        try:
            yield conn.recv()
        except ConnectionClosed:
            return


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Reconnects without the real pauses."""
    monkeypatch.setattr(_core, "RETRY_PAUSE", 0.001)


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.close()


@pytest.fixture
def client(fake):
    with E2A(fake.url, KEY, transport=httpx.MockTransport(fake)) as c:
        yield c


def aclient(fake) -> AsyncE2A:
    return AsyncE2A(fake.url, KEY, transport=httpx.MockTransport(fake))


def seqs(events) -> list[int]:
    return [e.seq for e in events]


def shown(*objs) -> str:
    """Everything a person could see of these objects: repr and str."""
    return " ".join(f"{o!r} {o}" for o in objs)


# ====================================================================== REST: sessions


def test_create_sends_the_fields_given(client, fake):
    t = client.create_session("u1")
    assert fake.last("/v1/sessions", "POST")["json"] == {"agent": {"kind": "deictic"}, "template": "standard",
                                                        "user_id": "u1"}
    assert isinstance(t, SessionTicket) and t.chat_session_id == "ses_1"
    assert t.connect_url == f"{fake.ws_url}/v1/sessions/ses_1/ws" and t.expires_at == "2026-01-01T01:00:00Z"
    assert t.jwt == "eyJ.ses_1.1"
    client.create_session("u2", agent="claude-code", version="latest", template="browser",
                          llm={"vendor": "anthropic", "model": "claude-x", "base_url": None},
                          api_key=LLM_KEY, model="claude-sonnet-4-5", secrets=["anthropic", "extra"],
                          app_id="app1", set_id="readonly", capability_sets=["shell", "browser"],
                          ttl_seconds=600, system_prompt="Be brief.", metadata={"team": "a"})
    assert fake.last("/v1/sessions", "POST")["json"] == {
        "agent": {"kind": "claude-code", "version": "latest"}, "template": "browser",
        "llm": {"vendor": "anthropic", "model": "claude-sonnet-4-5", "api_key": LLM_KEY},  # keywords win
        "secrets": ["anthropic", "extra"],
        "app": {"id": "app1", "set_id": "readonly", "capability_sets": ["shell", "browser"]},
        "user_id": "u2", "ttl_seconds": 600, "system_prompt": "Be brief.", "metadata": {"team": "a"}}
    client.create_session("u3", secrets="one", set_id="s", vendor="openai", base_url="https://llm.example/v1")
    body = fake.last("/v1/sessions", "POST")["json"]
    assert body["secrets"] == ["one"] and body["app"] == {"set_id": "s"}
    assert body["llm"] == {"vendor": "openai", "base_url": "https://llm.example/v1"}
    with pytest.raises(E2AError) as e:
        client.create_session("u4", secrets=["missing"])
    assert (e.value.status, e.value.code, e.value.field) == (404, "secret_not_found", "secrets")


def test_list_get_end_and_token(client, fake):
    client.create_session("u1")
    client.create_session("u2")
    rows = client.sessions()
    assert [s.chat_session_id for s in rows] == ["ses_1", "ses_2"] and fake.last("/v1/sessions")["query"] == {}
    assert all(isinstance(s, Session) and s.active for s in rows)
    assert [s.user_id for s in client.sessions(user_id="u2", state="active")] == ["u2"]
    assert fake.last("/v1/sessions")["query"] == {"user_id": "u2", "state": "active"}
    s = client.session("ses_1")
    assert fake.last("/ses_1", "GET")["path"] == "/v1/sessions/ses_1"
    assert s.to_dict() == {k: v for k, v in fake.sessions["ses_1"].items() if k != "field_from_the_future"}
    assert (s.agent, s.llm, s.vm_id, s.connected, s.task) == ({"kind": "deictic", "version": "1.2.3"},
                                                             {"vendor": "openai", "model": "gpt-5"}, "sb_ses_1",
                                                             False, None)
    t = client.session_token("ses_1")
    assert fake.last("/token")["method"] == "POST" and fake.last("/token")["path"] == "/v1/sessions/ses_1/token"
    assert (t.chat_session_id, t.jwt, t.expires_at) == ("ses_1", "eyJ.ses_1.3", "2026-01-01T00:15:00Z")
    assert t.connect_url == f"{fake.ws_url}/v1/sessions/ses_1/ws"
    assert client.session_token(s).jwt == "eyJ.ses_1.4"  # a Session works wherever an id does
    ended = client.end_session("ses_1")
    assert fake.last("/ses_1", "DELETE")["method"] == "DELETE"
    assert (ended.state, ended.end_reason, ended.active) == ("ended", "deleted", False)
    assert [s.chat_session_id for s in client.sessions(state="ended")] == ["ses_1"]
    with pytest.raises(E2AError) as e:
        client.session_token("ses_1")
    assert (e.value.status, e.value.code) == (409, "session_ended")
    with pytest.raises(E2AError) as e:
        client.session("nope")
    assert (e.value.status, e.value.code) == (404, "session_not_found")


def test_the_jwt_and_the_llm_key_are_in_no_repr_and_no_error(client, fake):
    t = client.create_session("u1", api_key=LLM_KEY)
    assert t.jwt and t.jwt not in shown(t, t.to_dict()) and "jwt" not in t.to_dict()
    assert t.to_dict(include_jwt=True)["jwt"] == t.jwt
    c = _core.create_session("u1", llm={"api_key": LLM_KEY, "vendor": "openai"})
    assert c.json["llm"]["api_key"] == LLM_KEY  # sent, of course
    assert LLM_KEY not in repr(c) and "'api_key': '***'" in repr(c)
    with pytest.raises(E2AError) as e:  # a proxy that quotes the request body: the key is cut
        client.create_session("echo", llm={"api_key": LLM_KEY})
    assert e.value.status == 502 and "***" in e.value.message
    assert LLM_KEY not in shown(e.value) and LLM_KEY not in str(e.value.args)
    s = client.session(t.chat_session_id)
    assert LLM_KEY not in shown(s) and LLM_KEY not in json.dumps(s.to_dict())
    with client.connect_session(t) as conn:
        assert t.jwt not in shown(conn, conn._core) and "ses_1" in repr(conn)
    fresh = client.session_token("ses_1")
    assert fresh.jwt not in shown(fresh)


def test_the_jwt_is_cut_from_debug_logs(client, fake, caplog):
    t = client.create_session("u1")
    with caplog.at_level(logging.DEBUG):
        with client.connect_session(t) as conn:
            conn.ping()

        async def go():
            async with await AsyncSessionConnection.connect(t) as conn:
                await conn.ping()

        asyncio.run(go())
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "e2a.sdk.session")  # not the fake's
    assert ours.count("> Authorization: Bearer ***") == 2 and "pong" in ours
    assert t.jwt not in ours


def test_async_rest(fake):
    async def go():
        async with aclient(fake) as c:
            t = await c.create_session("u1", vendor="openai", api_key=LLM_KEY, ttl_seconds=60)
            assert fake.last("/v1/sessions", "POST")["json"] == {
                "agent": {"kind": "deictic"}, "template": "standard", "llm": {"vendor": "openai", "api_key": LLM_KEY},
                "user_id": "u1", "ttl_seconds": 60}
            assert t.jwt not in repr(t)
            assert [s.chat_session_id for s in await c.sessions(state="active")] == ["ses_1"]
            assert (await c.session("ses_1")).user_id == "u1"
            assert (await c.session_token("ses_1")).jwt == "eyJ.ses_1.2"
            assert (await c.end_session("ses_1")).state == "ended"
            with pytest.raises(E2AError) as e:
                await c.create_session("echo", api_key=LLM_KEY)
            assert LLM_KEY not in shown(e.value)

    asyncio.run(go())


# ====================================================================== REST: secret bundles


def test_secret_bundles(client, fake):
    b = client.secrets.create("openai", {"LLM_API_KEY": SECRET_VALUE, "LLM_VENDOR": "openai"})
    assert fake.last("/secrets", "POST")["path"] == "/v1/tenants/me/secrets"
    assert fake.last("/secrets", "POST")["json"] == {"name": "openai",
                                                     "values": {"LLM_API_KEY": SECRET_VALUE, "LLM_VENDOR": "openai"}}
    assert b == SecretBundle(name="openai", keys=["LLM_API_KEY", "LLM_VENDOR"], version=1, created_at=T0, updated_at=T0)
    assert SECRET_VALUE not in shown(b, b.to_dict())
    with pytest.raises(E2AError) as e:
        client.secrets.create("openai", {"LLM_API_KEY": SECRET_VALUE})
    assert (e.value.status, e.value.code) == (409, "secret_exists")
    assert [x.name for x in client.secrets.list()] == ["openai"]
    assert client.secrets.get("openai").keys == ["LLM_API_KEY", "LLM_VENDOR"]
    r = client.secrets.replace("openai", {"LLM_API_KEY": "sk-2"})
    assert fake.last("/secrets/openai", "PUT")["json"] == {"values": {"LLM_API_KEY": "sk-2"}}
    assert (r.keys, r.version, r.updated_at) == (["LLM_API_KEY"], 2, "2026-01-02T00:00:00Z")
    assert client.secrets.put("openai", {"LLM_MODEL": "gpt-5"}).version == 3  # exists: replaced
    assert client.secrets.put("other", {"K": "v"}).version == 1               # new: created
    assert client.secrets.delete("other") is None
    assert fake.last("/secrets/other")["method"] == "DELETE"
    with pytest.raises(E2AError) as e:
        client.secrets.get("other")
    assert (e.value.status, e.value.code) == (404, "not_found")
    with pytest.raises(E2AError):
        client.secrets.get("a/b")
    assert fake.requests[-1]["raw_path"] == b"/v1/tenants/me/secrets/a%2Fb"  # one path segment
    # A proxy quoting the body: the values are cut from the error; from a Call's repr too.
    with pytest.raises(E2AError) as e:
        client.secrets.create("echo", {"LLM_API_KEY": SECRET_VALUE})
    assert e.value.status == 502 and SECRET_VALUE not in shown(e.value) and "***" in e.value.message
    assert SECRET_VALUE not in repr(_core.replace_secret("x", {"K": SECRET_VALUE}))
    with pytest.raises(E2AError) as e:
        client.secrets.create("x", ["not", "a", "dict"])
    assert e.value.code == "invalid_values"


def test_async_secret_bundles(fake):
    async def go():
        async with aclient(fake) as c:
            b = await c.secrets.put("openai", {"LLM_API_KEY": SECRET_VALUE})
            assert (b.name, b.version) == ("openai", 1)
            assert (await c.secrets.put("openai", {"LLM_API_KEY": "x"})).version == 2
            assert [x.name for x in await c.secrets.list()] == ["openai"]
            assert (await c.secrets.get("openai")).keys == ["LLM_API_KEY"]
            assert (await c.secrets.replace("openai", {"A": "1"})).keys == ["A"]
            await c.secrets.delete("openai")
            assert await c.secrets.list() == []
            with pytest.raises(E2AError) as e:
                await c.secrets.create("echo", {"K": SECRET_VALUE})
            assert SECRET_VALUE not in shown(e.value)

    asyncio.run(go())


# ====================================================================== the WebSocket


def test_ready_task_events_and_attachments(client, fake):
    t = client.create_session("u1")
    seen: list[SessionEvent] = []
    with client.connect_session(t) as conn:
        assert isinstance(conn, SessionConnection)
        assert fake.handshakes[-1] == {"session": "ses_1", "after": 0, "auth": f"Bearer {t.jwt}"}
        assert (conn.ready.chat_session_id, conn.ready.state, conn.ready.last_seq, conn.ready.task) == \
            ("ses_1", "active", 0, None)
        done = conn.run_task("Count the lines", attachments={"data.csv": b"a\nb\nc\n", "notes.txt": "hi"},
                             on_event=seen.append)
        assert done == {"task_id": "tsk_1", "state": "succeeded", "result": "It has 3 lines.", "error": None,
                        "llm_requests": 2, "input_tokens": 100, "output_tokens": 20}
        assert seqs(seen) == list(range(1, TASK_EVENTS + 1)) and conn.last_seq == TASK_EVENTS
        assert seen[0] == SessionEvent(seq=1, type="task_started", task_id="tsk_1",
                                       data={"task_id": "tsk_1", "agent": "deictic", "model": "gpt-5"},
                                       at="2026-01-01T00:00:01Z")
        assert fake.frames[0] == {"type": "task", "text": "Count the lines", "id": "c1", "attachments": [
            {"name": "data.csv", "content_base64": base64.b64encode(b"a\nb\nc\n").decode()},
            {"name": "notes.txt", "content_base64": base64.b64encode(b"hi").decode()}]}
        assert fake.attachments["ses_1"] == [{"data.csv": b"a\nb\nc\n", "notes.txt": b"hi"}]
        # A second task: only its own events; the first task's are history.
        seen.clear()
        assert conn.send_task("again") == "tsk_2"
        assert fake.frames[-1] == {"type": "task", "text": "again", "id": "c2"}  # no attachments: no field
        events = [next(conn) for _ in range(TASK_EVENTS)]
        assert seqs(events) == list(range(TASK_EVENTS + 1, 2 * TASK_EVENTS + 1))
        assert {e.task_id for e in events} == {"tsk_2"}


def test_a_new_connection_replays_from_after_and_run_task_skips_history(client, fake):
    t = client.create_session("u1")
    with client.connect_session(t) as conn:
        conn.run_task("first")
    with client.connect_session("ses_1", after=3) as conn:  # by id: a fresh JWT is asked for
        assert fake.last("/token")["method"] == "POST"
        assert fake.handshakes[-1]["after"] == 3 and fake.handshakes[-1]["auth"] == "Bearer eyJ.ses_1.2"
        assert conn.ready.last_seq == TASK_EVENTS and conn.ready.task == {"task_id": "tsk_1", "state": "succeeded"}
        assert [next(conn).seq for _ in range(TASK_EVENTS - 3)] == list(range(4, TASK_EVENTS + 1))
    seen = []
    n = len(fake.requests)
    with client.connect_session("ses_1", jwt=t.jwt) as conn:  # after=0: the whole history comes first
        assert len(fake.requests) == n  # the JWT given is used: no token asked for
        done = conn.run_task("second", on_event=seen.append)
    assert done["task_id"] == "tsk_2" and {e.task_id for e in seen} == {"tsk_2"}
    assert seqs(seen) == list(range(TASK_EVENTS + 1, 2 * TASK_EVENTS + 1))


def test_replies_pong_and_errors(client, fake):
    t = client.create_session("u1")
    with client.connect_session(t) as conn:
        assert conn.ping() >= 0
        assert fake.frames[-1] == {"type": "ping", "id": "c1"}
        with pytest.raises(SessionError) as e:
            conn.cancel()
        assert (e.value.status, e.value.code, e.value.message) == (0, "no_task", "no task is running")
        assert isinstance(e.value, E2AError)
        assert conn.send_task("wait for me") == "tsk_1"
        with pytest.raises(SessionError) as e:
            conn.send_task("another")
        assert e.value.code == "task_running" and "tsk_1" in e.value.message
        n = len(fake.frames)
        with pytest.raises(E2AError) as e:  # refused here, before anything is sent
            conn.send_task("x", attachments={"../etc/passwd": b"x"})
        assert (e.value.code, e.value.field) == ("invalid_attachment", "attachments")
        with pytest.raises(E2AError) as e:
            conn.send_task("x", attachments={"big.bin": b"\0" * (4 << 20)})
        assert e.value.code == "frame_too_big"
        assert len(fake.frames) == n
        assert conn.cancel() == "tsk_1"
        assert fake.frames[-1]["type"] == "cancel" and fake.frames[-1]["id"] not in ("c1", "c2", "c3", "c4")
        with pytest.raises(SessionError) as e:
            conn.send_task("x", attachments={"virus.exe": b"MZ"})
        assert e.value.code == "invalid_attachment" and e.value.message == "attachment virus.exe refused"
        kinds = [ev.type for ev in (next(conn), next(conn))]
        assert kinds == ["task_started", "task_finished"]
        assert conn.last_seq == 2


def test_a_dropped_connection_is_resumed_without_loss_or_repeats(client, fake):
    t = client.create_session("u1")
    fake.plans = [{"drop_after": 4},   # 4 events of the task, then the TCP connection is gone
                  {"refuse": 503},     # e2a (or a proxy) not answering for a moment
                  {"repeat": True}]    # sends the event at `after` again first
    seen = []
    with client.connect_session(t) as conn:
        done = conn.run_task("go", on_event=seen.append)
    assert done["state"] == "succeeded"
    assert seqs(seen) == list(range(1, TASK_EVENTS + 1))  # each once, in order
    assert [h["after"] for h in fake.handshakes] == [0, 4, 4]
    assert [f["type"] for f in fake.frames] == ["task"]   # the task was not sent again


def test_a_drop_before_the_ack_neither_loses_nor_doubles_the_task(client, fake):
    t = client.create_session("u1")
    fake.plans = [{"drop_before_ack": True}]  # the server took the task; the ack never came
    seen = []
    with client.connect_session(t) as conn:
        assert conn.run_task("go", on_event=seen.append)["task_id"] == "tsk_1"
    assert seqs(seen) == list(range(1, TASK_EVENTS + 1))
    assert [f["type"] for f in fake.frames] == ["task"]  # not sent twice: the new ready shows it
    fake.plans = [{"drop_on_task": True}]  # the server did not take it: it is sent again
    with client.connect_session(t) as conn:
        assert conn.run_task("again", on_event=seen.append)["task_id"] == "tsk_2"
    assert [f["type"] for f in fake.frames] == ["task", "task", "task"]
    assert fake.sessions["ses_1"]["usage"]["tasks"] == 2
    assert seqs(seen) == list(range(1, 2 * TASK_EVENTS + 1))


def test_an_expired_jwt_is_renewed_at_a_reconnect(client, fake):
    t = client.create_session("u1")
    fake.plans = [{"drop_after": 2}]
    with client.connect_session(t) as conn:
        fake.jwts.pop(t.jwt)  # expired meanwhile
        assert conn.run_task("go")["state"] == "succeeded"
    assert [h["auth"] for h in fake.handshakes] == [f"Bearer {t.jwt}", f"Bearer {t.jwt}", "Bearer eyJ.ses_1.2"]
    assert fake.last("/token")["path"] == "/v1/sessions/ses_1/token"


def test_refused_handshakes_are_clear(client, fake):
    t = client.create_session("u1")
    bad = SessionTicket(t.chat_session_id, "not-a-jwt", t.connect_url, t.expires_at)
    with pytest.raises(SessionError) as e:  # no API key behind it: no fresh JWT to try
        SessionConnection.connect(bad)
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    assert "bad or expired JWT" in e.value.message and "session_token" in e.value.message
    assert "not-a-jwt" not in shown(e.value)
    fake.jwts.clear()  # the client's fresh JWT is refused too: the second 401 is final
    fake.issue = lambda sid: "also-refused"
    with pytest.raises(SessionError) as e:
        client.connect_session(t)
    assert e.value.status == 401 and [h["auth"] for h in fake.handshakes[-2:]] == [f"Bearer {t.jwt}",
                                                                                   "Bearer also-refused"]
    fake.jwts["ok"] = "ses_9"
    with pytest.raises(SessionError) as e:
        SessionConnection.connect(f"{fake.ws_url}/v1/sessions/ses_9/ws", jwt="ok")
    assert (e.value.status, e.value.code) == (404, "session_not_found")
    fake.jwts["live"] = "ses_1"
    fake.sessions["ses_1"]["state"] = "ended"
    with pytest.raises(SessionEnded) as e:
        SessionConnection.connect(t.connect_url, jwt="live")
    assert (e.value.status, e.value.code) == (410, "session_ended")
    with pytest.raises(SessionError) as e:
        SessionConnection.connect(t.connect_url)
    assert e.value.code == "missing_jwt"
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with pytest.raises(SessionDisconnected) as e:  # nothing listening: fails at once
        SessionConnection.connect(f"ws://127.0.0.1:{port}/v1/sessions/ses_1/ws", jwt="x")
    assert e.value.code == "connection_error"


def test_takeover_4001_is_not_fought(client, fake):
    t = client.create_session("u1")
    first = client.connect_session(t)
    first.send_task("wait")
    second = client.connect_session(t)  # a newer connection: the first is closed with 4001
    assert second.ready.task == {"task_id": "tsk_1", "state": "running"}
    assert next(first).type == "task_started"  # what came before the close is still handed out
    with pytest.raises(SessionTakenOver) as e:
        next(first)
    assert e.value.code == "session_taken_over" and isinstance(e.value, SessionError)
    with pytest.raises(SessionTakenOver):
        first.ping()
    assert len(fake.handshakes) == 2  # no reconnect from the first
    assert second.cancel() == "tsk_1"
    second.close()
    assert [ev.type for ev in second][:1] in ([], ["task_started"])  # closed by this side: it just stops
    with pytest.raises(SessionDisconnected) as e:
        second.ping()
    assert e.value.code == "closed"


def test_session_ended_4000_with_its_reason(client, fake):
    t = client.create_session("u1")
    conn = client.connect_session(t)
    assert conn.send_task("wait") == "tsk_1"
    client.end_session("ses_1")  # closes the WebSocket with 4000 deleted
    with pytest.raises(SessionEnded) as e:
        conn.run_task("more")
    assert (e.value.code, e.value.reason) == ("session_ended", "deleted") and "deleted" in str(e.value)
    assert len(fake.handshakes) == 1
    fake.sessions["ses_1"]["state"] = "active"
    fake.plans = [{"close": (4000, "ttl_expired")}]
    with client.connect_session(t) as conn:
        events = []
        with pytest.raises(SessionEnded) as e:
            for ev in conn:
                events.append(ev)
        assert e.value.reason == "ttl_expired" and [ev.type for ev in events] == ["task_started"]


def test_cancel_from_another_thread_while_one_iterates(client, fake):
    t = client.create_session("u1")
    with client.connect_session(t) as conn:
        result = {}
        worker = threading.Thread(target=lambda: result.update(done=conn.run_task("wait for it")))
        worker.start()
        while fake.sessions["ses_1"]["task"] is None:
            time.sleep(0.01)
        time.sleep(0.1)  # the worker is now waiting for events, holding the read
        assert conn.cancel() == "tsk_1"
        worker.join(5)
        assert result["done"]["state"] == "cancelled"


def test_run_task_timeout_leaves_the_task_going(client, fake):
    t = client.create_session("u1")
    with client.connect_session(t) as conn:
        t0 = time.monotonic()
        with pytest.raises(SessionError) as e:
            conn.run_task("wait", timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 3
        assert e.value.code == "wait_timeout" and "tsk_1" in str(e.value)
        assert fake.sessions["ses_1"]["task"]["state"] == "running"
        with pytest.raises(TimeoutError):
            conn.next_event(timeout=0.1)


def test_reconnects_give_up_after_breaks_in_a_row(client, fake, monkeypatch):
    monkeypatch.setattr(_core, "MAX_RECONNECTS", 3)
    t = client.create_session("u1")
    fake.plans = [{"drop_after": 1}] + [{"refuse": 503}] * 10
    with client.connect_session(t) as conn:
        with pytest.raises(SessionDisconnected) as e:
            conn.run_task("go")
    assert e.value.code == "connection_lost" and "3 reconnects failed" in e.value.message
    assert len(fake.handshakes) == 4
    fake.plans = [{"drop_after": 0}]
    with client.connect_session(t, reconnect=False) as conn:  # or none at all
        assert conn.send_task("x") == "tsk_2"
        with pytest.raises(SessionDisconnected) as e:
            list(conn)
        assert e.value.code == "connection_lost"
    assert len(fake.handshakes) == 5


def test_async_connection(fake):
    async def go():
        async with aclient(fake) as c:
            t = await c.create_session("u1")
            fake.plans = [{"drop_after": 5}, {"refuse": 502}, {"repeat": True}]
            seen = []

            async def on_event(ev):
                seen.append(ev)

            async with await c.connect_session(t) as conn:
                assert isinstance(conn, AsyncSessionConnection)
                assert conn.ready.chat_session_id == "ses_1"
                assert await conn.ping() >= 0
                done = await conn.run_task("go", attachments={"data.csv": b"1\n"}, on_event=on_event)
                assert done["state"] == "succeeded" and t.jwt not in repr(conn)
                assert seqs(seen) == list(range(1, TASK_EVENTS + 1))
                assert [h["after"] for h in fake.handshakes] == [0, 5, 5]
                with pytest.raises(SessionError) as e:
                    await conn.cancel()
                assert e.value.code == "no_task"
                assert await conn.send_task("wait") == "tsk_2"
                with pytest.raises(SessionError) as e:
                    await conn.send_task("wait")
                assert e.value.code == "task_running"
                # One task iterates while another cancels.
                got = []

                async def follow():
                    async for ev in conn:
                        got.append(ev)
                        if ev.type == "task_finished":
                            return

                follower = asyncio.create_task(follow())
                await asyncio.sleep(0.1)
                assert await conn.cancel() == "tsk_2"
                await asyncio.wait_for(follower, 5)
                assert [e.type for e in got] == ["task_started", "task_finished"]
                assert got[-1].data["state"] == "cancelled"
            # Takeover, end, refusals.
            first = await c.connect_session("ses_1", after=conn.last_seq)
            assert fake.handshakes[-1]["after"] == TASK_EVENTS + 2
            second = await c.connect_session(t)
            with pytest.raises(SessionTakenOver):
                await first.next_event(timeout=5)
            await c.end_session("ses_1")
            with pytest.raises(SessionEnded) as e:
                async for _ in second:
                    pass
            assert e.value.reason == "deleted"
            with pytest.raises(SessionEnded) as e:
                await AsyncSessionConnection.connect(t)
            assert e.value.status == 410
            bad = SessionTicket("ses_1", "nope", t.connect_url)
            with pytest.raises(SessionError) as e:
                await AsyncSessionConnection.connect(bad)
            assert e.value.status == 401

    asyncio.run(go())


def test_async_drop_before_ack_and_timeout(fake):
    async def go():
        async with aclient(fake) as c:
            t = await c.create_session("u1")
            fake.plans = [{"drop_before_ack": True}]
            async with await c.connect_session(t) as conn:
                assert (await conn.run_task("go"))["task_id"] == "tsk_1"
                assert [f["type"] for f in fake.frames] == ["task"]
                with pytest.raises(SessionError) as e:
                    await conn.run_task("wait", timeout=0.2)
                assert e.value.code == "wait_timeout"

    asyncio.run(go())


# ====================================================================== shapes


def test_sync_and_async_offer_the_same_session_methods():
    for name in ("create_session", "sessions", "session", "end_session", "session_token", "connect_session"):
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (E2A, AsyncE2A))
        assert list(sync.values()) == list(async_.values()), name
        assert inspect.iscoroutinefunction(getattr(AsyncE2A, name)), name
    for name in ("create", "list", "get", "replace", "put", "delete"):
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (Secrets, AsyncSecrets))
        assert list(sync.values()) == list(async_.values()), name
    for name in ("send_task", "cancel", "ping", "run_task", "next_event"):
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters
                        for cls in (SessionConnection, AsyncSessionConnection))
        assert list(sync.values()) == list(async_.values()), name


def test_create_session_takes_the_contracts_fields():
    params = set(inspect.signature(E2A.create_session).parameters) - {"self"}
    assert params == {"user_id", "agent", "version", "template", "llm", "vendor", "model", "base_url", "api_key",
                      "secrets", "app_id", "set_id", "capability_sets", "ttl_seconds", "system_prompt", "metadata"}
    assert _session.with_after("ws://h/v1/sessions/s/ws?x=1&after=2", 7) == "ws://h/v1/sessions/s/ws?x=1&after=7"


def test_models_match_the_routes():
    """The SDK's models hold exactly the server's response fields, and create_session sends
    exactly its request fields (skipped where the server side is not in the tree)."""
    schemas = pytest.importorskip("e2a.api.schemas")
    proto = pytest.importorskip("e2a.api.session_protocol")
    if not hasattr(schemas, "SessionOut"):
        pytest.skip("no session routes here")
    from dataclasses import fields

    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    assert names(Session) == list(schemas.SessionOut.model_fields)
    assert names(SessionTicket) == list(schemas.SessionTicket.model_fields)
    assert set(schemas.SessionTokenOut.model_fields) == {"jwt", "expires_at"}
    assert names(SessionEvent) == list(proto.Event.model_fields)
    assert names(SessionReady) == [f for f in proto.Ready.model_fields if f != "type"]
    secret_out = pytest.importorskip("e2a.api.secrets").SecretOut
    assert names(SecretBundle) == list(secret_out.model_fields)
    body = _core.create_session("u1", "codex", "latest", "browser",
                                {"vendor": "openai", "model": "m", "base_url": "https://x", "api_key": "k"},
                                ["b"], "a", "s", ["shell"], 60, "p", {"k": "v"}).json
    assert set(body) == set(schemas.CreateSession.model_fields)
    assert set(body["agent"]) == set(schemas.SessionAgent.model_fields)
    assert set(body["llm"]) == set(schemas.SessionLlm.model_fields)
    assert set(body["app"]) == set(schemas.SessionApp.model_fields)
    schemas.CreateSession.model_validate(body)  # and the server takes it
    for frame in (json.loads(_session.SessionCore("ws://h/v1/sessions/s/ws", "j").task_frame(
                      "c1", "hi", {"a.csv": b"1"})),
                  {"type": "cancel", "id": "c2"}, {"type": "ping", "id": "c3"}):
        proto.client_message.validate_python(frame)
    assert set(proto.Error.model_fields["code"].annotation.__args__) == {
        "bad_message", "invalid_attachment", "task_running", "no_task", "session_ended"}


# ====================================================================== CLI


@pytest.fixture
def cli_fake(fake, monkeypatch):
    """The CLI's client, talking to the fake; no LLM keys around."""
    monkeypatch.setenv("E2A_URL", fake.url)
    monkeypatch.setenv("E2A_API_KEY", KEY)
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "DEEPSEEK_API_KEY", "MY_KEY", "BUNDLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "E2A", lambda url, key: E2A(url, key, transport=httpx.MockTransport(fake)))
    return fake


def run_cli(*args, input=None, env=None):
    return CliRunner().invoke(cli.main, list(args), input=input, env=env)


def creates(fake) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/v1/sessions" and r["method"] == "POST"]


def test_cli_sessions_create(cli_fake, monkeypatch):
    monkeypatch.setenv("MY_KEY", f" {LLM_KEY}\n")
    r = run_cli("sessions", "create", "--user-id", "u1", "--agent", "codex", "--version", "0.40.0",
                "--template", "browser", "--secret", "openai", "--secret", "extra", "--llm-key-env", "MY_KEY",
                "--vendor", "openai", "--model", "gpt-5", "--base-url", "https://llm.example/v1",
                "--app-id", "app1", "--set-id", "set1", "--capability", "shell", "--capability", "browser",
                "--ttl", "600", "--system-prompt", "Be brief.", "--metadata", "team=a")
    assert r.exit_code == 0, r.output
    assert creates(cli_fake)[-1]["json"] == {
        "agent": {"kind": "codex", "version": "0.40.0"}, "template": "browser",
        "llm": {"vendor": "openai", "model": "gpt-5", "base_url": "https://llm.example/v1", "api_key": LLM_KEY},
        "secrets": ["openai", "extra"], "app": {"id": "app1", "set_id": "set1", "capability_sets": ["shell", "browser"]},
        "user_id": "u1", "ttl_seconds": 600, "system_prompt": "Be brief.", "metadata": {"team": "a"}}
    jwt = "eyJ.ses_1.1"
    assert r.stdout.splitlines() == ["chat_session_id:   ses_1",
                                     f"connect_url:       {cli_fake.ws_url}/v1/sessions/ses_1/ws",
                                     "expires_at:        2026-01-01T01:00:00Z"]
    assert jwt not in r.output and LLM_KEY not in r.output
    r = run_cli("sessions", "create", "--user-id", "u2", "--secret", "openai", "--show-jwt")
    assert r.exit_code == 0 and "jwt:               eyJ.ses_2.2" in r.stdout.splitlines()
    assert creates(cli_fake)[-1]["json"] == {"agent": {"kind": "deictic"}, "template": "standard",
                                            "secrets": ["openai"], "user_id": "u2"}  # the bundle has the key
    r = run_cli("sessions", "create", "--user-id", "u3", "--secret", "openai", "--json")
    assert json.loads(r.stdout) == {"chat_session_id": "ses_3", "jwt": "eyJ.ses_3.3",
                                    "connect_url": f"{cli_fake.ws_url}/v1/sessions/ses_3/ws",
                                    "expires_at": "2026-01-01T01:00:00Z"}


def test_cli_sessions_create_reads_the_key_from_the_environment_only(cli_fake, monkeypatch):
    r = run_cli("sessions", "create", "--user-id", "u1")
    assert r.exit_code == 2 and "no LLM key for deictic" in r.stderr and "--secret" in r.stderr
    r = run_cli("sessions", "create", "--user-id", "u1", "--llm-key-env", "MY_KEY")
    assert r.exit_code == 2 and "MY_KEY holds no LLM key" in r.stderr
    assert creates(cli_fake) == []
    monkeypatch.setenv("OPENAI_API_KEY", LLM_KEY)
    r = run_cli("sessions", "create", "--user-id", "u1", "--vendor", "openai")
    assert r.exit_code == 0 and creates(cli_fake)[-1]["json"]["llm"] == {"vendor": "openai", "api_key": LLM_KEY}
    assert LLM_KEY not in r.output
    r = run_cli("sessions", "create", "--user-id", "u1", "--api-key-value", LLM_KEY)
    assert r.exit_code == 2 and "No such option" in r.stderr
    r = run_cli("sessions", "create", "--user-id", "u1", "--secret", "missing")
    assert r.exit_code == 1 and r.stderr.startswith("error: secret_not_found: no secret bundle 'missing'")


def test_cli_sessions_ls_show_end(cli_fake):
    run_cli("sessions", "create", "--user-id", "alice", "--secret", "s")
    run_cli("sessions", "create", "--user-id", "bob", "--secret", "s")
    r = run_cli("sessions", "ls")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SESSION", "ID", "STATE", "USER", "AGENT", "TASK", "CREATED", "(UTC)"]
    assert lines[1].split()[:4] == ["ses_1", "active", "alice", "deictic"]
    r = run_cli("sessions", "ls", "--user-id", "bob", "--state", "active", "--json")
    assert [s["chat_session_id"] for s in json.loads(r.stdout)] == ["ses_2"]
    assert cli_fake.last("/v1/sessions", "GET")["query"] == {"state": "active", "user_id": "bob"}
    r = run_cli("sessions", "show", "ses_1")
    assert r.exit_code == 0 and "user_id:           alice" in r.stdout.splitlines()
    assert 'agent:             {"kind": "deictic", "version": "1.2.3"}' in r.stdout.splitlines()
    assert json.loads(run_cli("sessions", "show", "ses_1", "--json").stdout)["vm_id"] == "sb_ses_1"
    r = run_cli("sessions", "end", "ses_1")
    assert r.exit_code == 0 and r.stdout == "ses_1 ended (deleted)\n"
    r = run_cli("sessions", "show", "nope")
    assert r.exit_code == 1 and r.stderr.startswith("error: session_not_found: no session 'nope'")


def test_cli_sessions_send(cli_fake, tmp_path):
    run_cli("sessions", "create", "--user-id", "u1", "--secret", "s")
    data = tmp_path / "data.csv"
    data.write_bytes(b"a\nb\nc\n")
    cli_fake.plans = [{"drop_after": 2}]  # and the connection breaks halfway
    r = run_cli("sessions", "send", "ses_1", "Count the lines", "--attach", str(data))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "── task tsk_1 started (deictic, model gpt-5)",
        "Reading data.csv.",
        "→ shell: wc -l attachments/data.csv",
        "3 attachments/data.csv",
        "← shell",
        "It has 3 lines.",
        "── task tsk_1 succeeded (2 LLM request(s), 100 tokens in, 20 out)",
    ]
    assert cli_fake.attachments["ses_1"] == [{"data.csv": b"a\nb\nc\n"}]
    assert [h["after"] for h in cli_fake.handshakes] == [0, 2]
    assert cli_fake.handshakes[0]["auth"] == "Bearer eyJ.ses_1.2"  # a fresh JWT, never the API key
    assert "eyJ" not in r.output
    r = run_cli("sessions", "send", "ses_1", "-", "--json", input="this will fail")
    assert r.exit_code == 1
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(TASK_EVENTS + 1, 2 * TASK_EVENTS + 1))
    assert events[-1]["data"]["state"] == "failed" and cli_fake.frames[-1]["text"] == "this will fail"
    r = run_cli("sessions", "send", "ses_1", "wait", "--timeout", "0.3")
    assert r.exit_code == 1 and "error: wait_timeout: task tsk_3 of session ses_1" in r.stderr
    r = run_cli("sessions", "send", "ses_1", "more")
    assert r.exit_code == 1 and r.stderr.startswith("error: task_running: task tsk_3 is running")
    r = run_cli("sessions", "cancel", "ses_1")
    assert r.exit_code == 0 and r.stdout == "tsk_3 cancelled\n"
    r = run_cli("sessions", "cancel", "ses_1")
    assert r.exit_code == 1 and r.stderr.startswith("error: no_task")
    run_cli("sessions", "end", "ses_1")
    r = run_cli("sessions", "send", "ses_1", "more")
    assert r.exit_code == 1 and r.stderr.startswith("error: session_ended")
    r = run_cli("sessions", "send", "ses_1", "x", "--attach", str(data), "--attach", str(data))
    assert r.exit_code == 2 and "two attachments named data.csv" in r.stderr


def test_cli_secrets_values_come_from_the_environment(cli_fake, monkeypatch):
    monkeypatch.setenv("BUNDLE_KEY", SECRET_VALUE)
    monkeypatch.setenv("MY_KEY", "openai")
    args = ["secrets", "put", "openai", "--env", "LLM_API_KEY=BUNDLE_KEY", "--env", "LLM_VENDOR=MY_KEY"]
    assert SECRET_VALUE not in " ".join(args)  # what argv (shell history, ps) holds: names only
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert cli_fake.last("/secrets", "POST")["json"] == {"name": "openai",
                                                         "values": {"LLM_API_KEY": SECRET_VALUE, "LLM_VENDOR": "openai"}}
    assert SECRET_VALUE not in r.output
    assert "keys:              LLM_API_KEY, LLM_VENDOR" in r.stdout.splitlines()
    assert "version:           1" in r.stdout.splitlines()
    # It exists: replaced (409 on create, then PUT).
    r = run_cli("secrets", "put", "openai", "--stdin-json", "--json",
                input=json.dumps({"LLM_API_KEY": SECRET_VALUE + "2"}))
    assert r.exit_code == 0, r.output
    assert cli_fake.last("/secrets/openai", "PUT")["json"] == {"values": {"LLM_API_KEY": SECRET_VALUE + "2"}}
    assert json.loads(r.stdout)["version"] == 2 and SECRET_VALUE not in r.output
    r = run_cli("secrets", "ls")
    assert r.exit_code == 0 and r.stdout.splitlines()[1].split()[:3] == ["openai", "LLM_API_KEY", "2"]
    assert json.loads(run_cli("secrets", "ls", "--json").stdout)[0]["keys"] == ["LLM_API_KEY"]
    r = run_cli("secrets", "show", "openai")
    assert r.exit_code == 0 and "name:              openai" in r.stdout and SECRET_VALUE not in r.output
    r = run_cli("secrets", "rm", "openai")
    assert r.exit_code == 0 and r.stdout == "openai deleted\n"
    r = run_cli("secrets", "show", "openai")
    assert r.exit_code == 1 and r.stderr.startswith("error: not_found")


def test_cli_secrets_put_refuses_values_as_arguments(cli_fake, monkeypatch):
    n = len(cli_fake.requests)
    r = run_cli("secrets", "put", "x")
    assert r.exit_code == 2 and "--env KEY=ENVVAR" in r.stderr
    monkeypatch.setenv("BUNDLE_KEY", SECRET_VALUE)
    r = run_cli("secrets", "put", "x", "--env", "K=BUNDLE_KEY", "--stdin-json", input="{}")
    assert r.exit_code == 2
    r = run_cli("secrets", "put", "x", "--env", "K=NOT_SET_ANYWHERE")
    assert r.exit_code == 2 and "NOT_SET_ANYWHERE (for K) is not set" in r.stderr
    r = run_cli("secrets", "put", "x", "--env", f"K={SECRET_VALUE}")  # a value where a name belongs
    assert r.exit_code == 2 and SECRET_VALUE not in r.output and "must name an environment variable" in r.stderr
    r = run_cli("secrets", "put", "x", "--stdin-json", input=f'{{"K": "{SECRET_VALUE}"')
    assert r.exit_code == 2 and "not JSON" in r.stderr and SECRET_VALUE not in r.output
    r = run_cli("secrets", "put", "x", "--stdin-json", input=json.dumps({"K": 1}))
    assert r.exit_code == 2 and "names to strings" in r.stderr
    r = run_cli("secrets", "put", "x", "--value", SECRET_VALUE)
    assert r.exit_code == 2 and "No such option" in r.stderr
    assert len(cli_fake.requests) == n
