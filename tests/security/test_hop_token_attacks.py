"""A follow-up task, and a session's WebSocket, passed between replicas (e2a/api/hop_tokens.py):
what goes is a token signed for that request (its body, or the WebSocket's `after`, too) to
that replica, never the caller's API key or session token; a replica takes it once, for that
request only, if it names this replica, through the same checks every request passes. Here
against the real guard, follow-up route and session WebSocket route, and real servers
standing for the holding replica; between two real replicas it is
tests/kube/test_kube_agents.py and tests/kube/test_kube_sessions.py."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import jwt
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.websockets import WebSocket
from starlette.testclient import TestClient, WebSocketDenialResponse

from e2a.accounts.tokens import LoginTokens
from e2a.api import hop_tokens
from e2a.api import sessions as sessions_api
from e2a.api import tasks as tasks_api
from e2a.api.deps import KEY_ONLY, account_user, current_user
from e2a.api.errors import ApiError
from e2a.api.errors import install as install_errors
from e2a.api.guard import RequestGuard
from e2a.api.hop_tokens import FORWARDED, HopTokens, InvalidHop, body_digest
from e2a.api.schemas import FollowUpRequest
from e2a.auth import Caller, KeyCache
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sessions.tokens import SessionTokens
from tests.unit.test_session_relay import Holder as WsHolder

PATH = "/v1/sandboxes/sbx_a/task"
API_KEY = "e2a_live_" + "k" * 32


@pytest.fixture
def keys(tmp_path):
    return AgentKeys(tmp_path / "agent.key")


BODY = {"task": "and then?"}


def test_a_token_stands_for_its_caller_on_its_request_and_replica_once(keys):
    tokens = HopTokens(keys)
    token = tokens.issue("usr_1", "key_1", "POST", PATH, "42", BODY)
    for method, path, replica in (("GET", PATH, "42"), ("POST", "/v1/sandboxes/sbx_b/task", "42"),
                                  ("POST", PATH, "43")):
        with pytest.raises(InvalidHop, match="not valid"):
            tokens.verify(token, method, path, replica)
    claims = tokens.verify(token, "POST", PATH, "42")
    assert (claims.user_id, claims.key_id) == ("usr_1", "key_1")
    assert claims.body == body_digest(BODY) != body_digest({"task": "something else"})
    with pytest.raises(InvalidHop):  # used once
        tokens.verify(token, "POST", PATH, "42")


def test_expired_forged_and_other_kinds_of_token_are_refused(keys, tmp_path):
    tokens = HopTokens(keys)
    other_host = HopTokens(AgentKeys(tmp_path / "other.key"))
    forged = other_host.issue("usr_1", "key_1", "POST", PATH, "42", BODY)
    session = SessionTokens(keys).issue("ses_1", "usr_1", _in(600))
    claims = {"iss": "e2a", "aud": "e2a-hop", "sub": "usr_1", "req": f"POST {PATH}", "rep": "42",
              "bdy": body_digest(BODY), "jti": "j", "exp": int(time.time()) + 30}
    unsigned = jwt.encode(claims, None, algorithm="none")
    # signed with the sandboxes' derivation of the host key (what envd tokens are made of)
    envd_keyed = jwt.encode(claims, keys.token(hop_tokens.PURPOSE), algorithm="HS256")
    ago = hop_tokens.HOP_TTL + hop_tokens.LEEWAY + 1
    old = HopTokens(keys, clock=lambda: time.time() - ago).issue("usr_1", "key_1", "POST", PATH,
                                                                   "42", BODY)
    for token in (forged, session, unsigned, envd_keyed, old, "x" * 5000):
        with pytest.raises(InvalidHop, match="not valid"):
            tokens.verify(token, "POST", PATH, "42")


def _in(seconds: int) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


WHO = "/v1/sandboxes/sbx_a/who"


@pytest.fixture
def guarded(keys):
    """The guard every /v1/ request passes, on a replica whose lock key is 42: the follow-up
    route itself (its sandbox unknown here: a request that passes the checks is a 404), a
    route that names its caller, and one that takes the login token."""
    app = FastAPI()
    install_errors(app)
    app.include_router(tasks_api.router)

    @app.post(WHO)
    async def who(user: Caller = Depends(current_user)):
        return {"id": user.id, "key_id": user.key_id, "via": user.via}

    @app.get("/v1/usage")
    async def usage(user: Caller = Depends(account_user)):
        return {"id": user.id, "via": user.via}

    async def no_sandbox(_):
        return None

    app.state.hop_tokens = HopTokens(keys)
    app.state.host = SimpleNamespace(replica_key=lambda: 42)
    app.state.tasks = SimpleNamespace(forwarded_to_me=lambda key: key == "42")
    app.state.catalog = SimpleNamespace(get=no_sandbox)
    app.state.keys = KeyCache()
    app.state.login_tokens = LoginTokens(keys, ttl=600)
    app.add_middleware(RequestGuard, max_body=1 << 20)  # as e2a/api/app.py
    with TestClient(app) as c:
        c.app_state = app.state
        yield c


def hop(client, path: str, replica: str = "42", body: dict = BODY) -> str:
    return client.app_state.hop_tokens.issue("usr_1", "key_1", "POST", path, replica, body)


def test_the_guard_takes_a_hop_token_for_its_request_to_this_replica_once(guarded):
    token = hop(guarded, WHO)
    r = guarded.post(WHO, headers={"Authorization": f"Bearer {token}", FORWARDED: "42"})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "usr_1", "key_id": "key_1", "via": "key"}
    r = guarded.post(WHO, headers={"Authorization": f"Bearer {token}", FORWARDED: "42"})
    assert r.status_code == 401, "a token is taken once"
    refused = {
        "no header": (hop(guarded, WHO), {}),
        "another replica named": (hop(guarded, WHO), {FORWARDED: "43"}),
        # the header and the token agree, on a replica neither names
        "signed for another replica": (hop(guarded, WHO, replica="43"), {FORWARDED: "43"}),
        "another path": (hop(guarded, "/v1/sandboxes/sbx_b/who"), {FORWARDED: "42"}),
    }
    for why, (token, extra) in refused.items():
        r = guarded.post(WHO, headers={"Authorization": f"Bearer {token}", **extra})
        assert r.status_code == 401, why
        assert r.json()["error"]["message"] in (
            "the replica's token is not valid", KEY_ONLY), (why, r.text)


def test_two_headers_naming_replicas_are_a_400(guarded):
    r = guarded.post(WHO, headers=[("Authorization", f"Bearer {hop(guarded, WHO)}"),
                                   (FORWARDED, "43"), (FORWARDED, "42")])
    assert r.status_code == 400 and r.json()["error"]["field"] == FORWARDED, r.text


def test_the_follow_up_takes_the_body_the_token_was_signed_for_only(guarded):
    token = hop(guarded, PATH)
    r = guarded.post(PATH, json={"task": "rm -rf the work"},
                     headers={"Authorization": f"Bearer {token}", FORWARDED: "42"})
    assert r.status_code == 401, r.text
    token = hop(guarded, PATH)
    r = guarded.post(PATH, json=BODY, headers={"Authorization": f"Bearer {token}",
                                                FORWARDED: "42"})
    # past every check of the hop: the sandbox is looked up (none here)
    assert r.status_code == 404 and r.json()["error"]["code"] == "sandbox_not_found", r.text


def test_a_login_token_with_the_header_is_still_a_login_token(guarded):
    login, _ = guarded.app_state.login_tokens.issue("usr_1", "a@example.com")
    r = guarded.get("/v1/usage", headers={"Authorization": f"Bearer {login}", FORWARDED: "42"})
    assert r.status_code == 200 and r.json() == {"id": "usr_1", "via": "login"}, r.text
    r = guarded.post(WHO, headers={"Authorization": f"Bearer {login}", FORWARDED: "42"})
    assert r.status_code == 401 and r.json()["error"]["message"] == KEY_ONLY


class Holder(BaseHTTPRequestHandler):
    """The replica holding the agent: records what reached it, answers 202."""

    seen: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Holder.seen.append({"path": self.path, "headers": dict(self.headers),
                            "body": body.decode()})
        refused = "sbx_stale" in self.path  # a holder that does not take the hop token
        payload = json.dumps({"error": {"code": "unauthorized", "message": "no"}} if refused
                             else {"task_id": "tsk_1", "state": "running"}).encode()
        self.send_response(401 if refused else 202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def holder():
    Holder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Holder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.anyio
async def test_a_forward_carries_a_token_for_that_request_and_never_the_callers_key(keys, holder):
    tokens = HopTokens(keys)
    app = SimpleNamespace(state=SimpleNamespace(hop_tokens=tokens))
    request = Request({"type": "http", "method": "POST", "path": PATH, "raw_path": PATH.encode(),
                       "query_string": b"", "app": app, "scheme": "http",
                       "server": ("127.0.0.1", 1), "headers": [
                           (b"authorization", f"Bearer {API_KEY}".encode())]})
    r = await tasks_api._forward(request, Caller(id="usr_1", key_id="key_1"), "sbx_a", holder, 42,
                       FollowUpRequest(task="and then?"))
    assert r.status_code == 202 and json.loads(r.body)["task_id"] == "tsk_1"
    [seen] = Holder.seen
    assert seen["path"] == PATH and json.loads(seen["body"]) == {"task": "and then?"}
    assert API_KEY not in json.dumps(seen)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers[FORWARDED] == "42"
    token = headers["authorization"].removeprefix("Bearer ")
    claims = tokens.verify(token, "POST", PATH, "42")
    assert claims.user_id == "usr_1" and claims.body == body_digest(json.loads(seen["body"]))


@pytest.mark.anyio
async def test_a_holder_refusing_the_hop_is_a_503_to_try_again_not_a_bad_key(keys, holder):
    """The caller's key was checked here: a 401 from the holder is about the hop (its key
    changed meanwhile, an older e2a, clocks apart), not the caller's credential."""
    app = SimpleNamespace(state=SimpleNamespace(hop_tokens=HopTokens(keys)))
    stale = "/v1/sandboxes/sbx_stale/task"
    request = Request({"type": "http", "method": "POST", "path": stale,
                       "raw_path": stale.encode(), "query_string": b"", "app": app,
                       "scheme": "http", "server": ("127.0.0.1", 1), "headers": []})
    with pytest.raises(ApiError) as e:
        await tasks_api._forward(request, Caller(id="usr_1", key_id="key_1"), "sbx_stale",
                                 holder, 42, FollowUpRequest(task="and then?"))
    assert (e.value.status, e.value.code) == (503, "agent_unavailable")


@pytest.fixture
def anyio_backend():
    return "asyncio"


WS = "/v1/sessions/ses_1/ws"


@pytest.fixture
def ws_holder():
    h = WsHolder()
    yield h
    h.server.shutdown()


@pytest.fixture
def replica(keys, ws_holder):
    """The real session WebSocket route on a replica whose lock key is 42; session ses_1 of
    usr_1 is held by replica 43, at `ws_holder`'s address, unless `asked` says it is unknown."""
    app = FastAPI()
    install_errors(app)
    app.include_router(sessions_api.router)
    asked: list[str] = []

    async def get(user_id, session_id):
        asked.append(user_id)
        return SimpleNamespace(id=session_id, state="active", replica=43, end_reason=None) \
            if session_id == "ses_1" and user_id == "usr_1" and not asked_none else None

    async def holder(row):
        return ws_holder.url, 43

    asked_none: list[bool] = []
    app.state.chat_sessions = SimpleNamespace(
        tokens=SessionTokens(keys), get=get, live={}, holder=holder,
        tasks=SimpleNamespace(forwarded_to_me=lambda key: key == "42"))
    app.state.hop_tokens = HopTokens(keys)
    app.state.host = SimpleNamespace(replica_key=lambda: 42)
    with TestClient(app) as c:
        c.app_state, c.asked, c.unknown = app.state, asked, lambda: asked_none.append(True)
        yield c


def test_a_relayed_websocket_carries_a_hop_token_never_the_sessions_token(replica, ws_holder):
    session = replica.app_state.chat_sessions.tokens.issue("ses_1", "usr_1", _in(600))
    with replica.websocket_connect(f"{WS}?after=3", subprotocols=["e2a.session.v1"], headers={
            "Authorization": f"Bearer {session}"}) as c:
        assert c.receive_json() == {"type": "ready"}  # relayed to the holder
    [seen] = ws_holder.seen
    assert session not in json.dumps(seen)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers[FORWARDED] == "43"
    claims = replica.app_state.hop_tokens.verify(
        headers["authorization"].removeprefix("Bearer "), "GET", WS, "43")
    assert claims.user_id == "usr_1" and claims.body == body_digest({"after": "3"})


def _ws_refusal(client, path: str, headers) -> tuple[int, dict]:
    with pytest.raises(WebSocketDenialResponse) as no:
        with client.websocket_connect(path, headers=headers):
            pass
    return no.value.status_code, no.value.json()["error"]


def test_the_holder_takes_a_hop_token_for_that_session_after_and_replica_once(replica):
    replica.unknown()  # past the hop's checks, the session is looked up: unknown here, a 404
    tokens = replica.app_state.hop_tokens

    def hop(path=WS, to="42", after="0"):
        return tokens.issue("usr_1", None, "GET", path, to, {"after": after})

    token = hop()
    ok = {"Authorization": f"Bearer {token}", FORWARDED: "42"}
    assert _ws_refusal(replica, f"{WS}?after=0", ok)[0] == 404
    assert replica.asked == ["usr_1"]  # the user the token vouched for
    refused = {
        "used again": (token, {FORWARDED: "42"}, "0"),
        "no header": (hop(), {}, "0"),
        "another replica named": (hop(), {FORWARDED: "43"}, "0"),
        "signed for another replica": (hop(to="43"), {FORWARDED: "43"}, "0"),
        "another session": (hop(path="/v1/sessions/ses_2/ws"), {FORWARDED: "42"}, "0"),
        "another after": (hop(after="9"), {FORWARDED: "42"}, "0"),
    }
    for why, (t, extra, after) in refused.items():
        status, error = _ws_refusal(replica, f"{WS}?after={after}",
                                    {"Authorization": f"Bearer {t}", **extra})
        assert status == 401 and error["message"] == hop_tokens.NOT_VALID, (why, error)
    assert replica.asked == ["usr_1"]



@pytest.mark.anyio
async def test_two_headers_naming_replicas_on_a_websocket_are_a_400(replica):
    """(The test client merges repeated headers: the route is called as the server would.)"""
    token = replica.app_state.hop_tokens.issue("usr_1", None, "GET", WS, "42", {"after": "0"})
    sent: list[dict] = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    ws = WebSocket({"type": "websocket", "path": WS, "query_string": b"", "headers": [
        (b"authorization", f"Bearer {token}".encode()), (FORWARDED.encode(), b"43"),
        (FORWARDED.encode(), b"42")], "app": replica.app, "extensions": {
        "websocket.http.response": {}}}, receive, send)
    await sessions_api.session_ws(ws, "ses_1")
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["field"] == FORWARDED
    assert replica.asked == []
