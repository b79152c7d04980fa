"""A follow-up task passed between replicas (e2a/api/hop_tokens.py): what goes is a token signed
for that request to that replica, never the caller's API key; a replica takes it for that
request only, through the same guard every request passes. Here against the real guard and a
real HTTP server standing for the holding replica; between two real replicas it is
tests/kube/test_kube_agents.py."""

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
from starlette.testclient import TestClient

from e2a.accounts.tokens import LoginTokens
from e2a.api import hop_tokens
from e2a.api.deps import current_user
from e2a.api.errors import install as install_errors
from e2a.api.guard import RequestGuard
from e2a.api.hop_tokens import FORWARDED, HopTokens, InvalidHop
from e2a.api.schemas import FollowUpRequest
from e2a.api.tasks import _forward
from e2a.auth import Caller, KeyCache
from e2a.sandboxes.agent_keys import AgentKeys
from e2a.sessions.tokens import SessionTokens

PATH = "/v1/sandboxes/sbx_a/task"
API_KEY = "e2a_live_" + "k" * 32


@pytest.fixture
def keys(tmp_path):
    return AgentKeys(tmp_path / "agent.key")


def test_a_token_stands_for_its_caller_on_its_request_and_replica_only(keys):
    tokens = HopTokens(keys)
    token = tokens.issue("usr_1", "key_1", "POST", PATH, "42")
    claims = tokens.verify(token, "POST", PATH, "42")
    assert (claims.user_id, claims.key_id) == ("usr_1", "key_1")
    for method, path, replica in (("GET", PATH, "42"), ("POST", "/v1/sandboxes/sbx_b/task", "42"),
                                  ("POST", PATH, "43")):
        with pytest.raises(InvalidHop, match="another request"):
            tokens.verify(token, method, path, replica)


def test_expired_forged_and_other_kinds_of_token_are_refused(keys, tmp_path):
    tokens = HopTokens(keys)
    other_host = HopTokens(AgentKeys(tmp_path / "other.key"))
    forged = other_host.issue("usr_1", "key_1", "POST", PATH, "42")
    session = SessionTokens(keys).issue("ses_1", "usr_1", _in(600))
    unsigned = jwt.encode({"iss": "e2a", "aud": "e2a-hop", "sub": "usr_1", "req": f"POST {PATH}",
                           "rep": "42", "exp": int(time.time()) + 30}, None, algorithm="none")
    for token in (forged, session, unsigned, "x" * 5000):
        with pytest.raises(InvalidHop):
            tokens.verify(token, "POST", PATH, "42")
    ago = hop_tokens.HOP_TTL + hop_tokens.LEEWAY + 1
    old = HopTokens(keys, clock=lambda: time.time() - ago).issue("usr_1", "key_1", "POST", PATH,
                                                                   "42")
    with pytest.raises(InvalidHop, match="expired"):
        tokens.verify(old, "POST", PATH, "42")


def _in(seconds: int) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


@pytest.fixture
def guarded(keys):
    """The guard every /v1/ request passes, in front of a route that names its caller."""
    app = FastAPI()
    install_errors(app)

    @app.post("/v1/sandboxes/{vm_id}/task")
    async def who(user: Caller = Depends(current_user)):
        return {"id": user.id, "key_id": user.key_id, "via": user.via}

    app.state.hop_tokens = HopTokens(keys)
    app.state.keys = KeyCache()
    app.state.login_tokens = LoginTokens(keys, ttl=600)
    app.add_middleware(RequestGuard, max_body=1 << 20)  # as e2a/api/app.py
    with TestClient(app) as c:
        c.app_state = app.state
        yield c


def test_the_guard_takes_a_hop_token_for_its_request_with_the_header_naming_the_replica(guarded):
    token = guarded.app_state.hop_tokens.issue("usr_1", "key_1", "POST", PATH, "42")
    r = guarded.post(PATH, headers={"Authorization": f"Bearer {token}", FORWARDED: "42"})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "usr_1", "key_id": "key_1", "via": "key"}
    refused = {
        "no header": {},
        "another replica named": {FORWARDED: "43"},
    }
    for why, extra in refused.items():
        r = guarded.post(PATH, headers={"Authorization": f"Bearer {token}", **extra})
        assert r.status_code == 401, why
    # on another path (another sandbox) the same token is nobody
    r = guarded.post("/v1/sandboxes/sbx_b/task",
                     headers={"Authorization": f"Bearer {token}", FORWARDED: "42"})
    assert r.status_code == 401 and "another request" in r.json()["error"]["message"]
    # a login token with the header is not a hop token
    login, _ = guarded.app_state.login_tokens.issue("usr_1", "a@example.com")
    r = guarded.post(PATH, headers={"Authorization": f"Bearer {login}", FORWARDED: "42"})
    assert r.status_code == 401


class Holder(BaseHTTPRequestHandler):
    """The replica holding the agent: records what reached it, answers 202."""

    seen: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Holder.seen.append({"path": self.path, "headers": dict(self.headers),
                            "body": body.decode()})
        payload = json.dumps({"task_id": "tsk_1", "state": "running"}).encode()
        self.send_response(202)
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
    r = await _forward(request, Caller(id="usr_1", key_id="key_1"), holder, 42,
                       FollowUpRequest(task="and then?"))
    assert r.status_code == 202 and json.loads(r.body)["task_id"] == "tsk_1"
    [seen] = Holder.seen
    assert seen["path"] == PATH and json.loads(seen["body"]) == {"task": "and then?"}
    assert API_KEY not in json.dumps(seen)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers[FORWARDED] == "42"
    token = headers["authorization"].removeprefix("Bearer ")
    assert tokens.verify(token, "POST", PATH, "42").user_id == "usr_1"


@pytest.fixture
def anyio_backend():
    return "asyncio"
