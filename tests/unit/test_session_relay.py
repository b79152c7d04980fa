"""The session WebSocket's relay to the replica holding the session (e2a/api/session_relay.py),
against a real WebSocket server standing for that replica: frames both ways, the holder's close
code and refusal passed on, a holder that is gone or no longer the one meant is a 503 to try
again, and the session's token is never in the relay's log, not even at DEBUG. The relay
between two real replicas is tests/kube/test_kube_sessions.py."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from websockets.sync.server import serve

from e2a.api.session_relay import relay

TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2Vzc2lvbg.c2lnbmF0dXJl"


class Holder:
    """The holding replica: records each handshake, answers by the session id in the path."""

    def __init__(self):
        self.seen: list[dict] = []
        self.server = serve(self._handle, "127.0.0.1", 0, process_request=self._refuse,
                            subprotocols=["e2a.session.v1"])
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _refuse(self, conn, request):
        self.seen.append({"path": request.path, "headers": dict(request.headers.raw_items())})
        for sid, status, code in (("gone", 410, "session_ended"),
                                  ("other", 409, "session_conflict"),
                                  ("stale", 401, "unauthorized")):
            if f"/{sid}/" in request.path:
                return conn.respond(status, json.dumps({"error": {
                    "code": code, "message": f"refused {status}", "field": None}}))
        return None

    def _handle(self, conn):
        conn.send(json.dumps({"type": "ready"}))
        for msg in conn:
            if msg == "bye":
                conn.close(4001, "taken over by a newer connection")
                return
            conn.send(json.dumps({"echo": msg}))


@pytest.fixture
def holder():
    h = Holder()
    yield h
    h.server.shutdown()


def client(url: str) -> TestClient:
    app = FastAPI()

    @app.websocket("/v1/sessions/{sid}/ws")
    async def ws(websocket: WebSocket, sid: str):
        await relay(websocket, sid, url, 7, TOKEN, True, "3")

    return TestClient(app)


def test_frames_go_both_ways_and_the_holders_close_reaches_the_client(holder, caplog):
    caplog.set_level(logging.DEBUG, logger="e2a.sessions.relay")
    with client(holder.url) as tc, tc.websocket_connect(
            "/v1/sessions/ses_a/ws", subprotocols=["e2a.session.v1"]) as c:
        assert c.accepted_subprotocol == "e2a.session.v1"  # as the holder selected it
        assert c.receive_json() == {"type": "ready"}
        c.send_text("hello")
        assert c.receive_json() == {"echo": "hello"}
        c.send_text("bye")
        with pytest.raises(WebSocketDisconnect) as gone:
            c.receive_text()
    assert (gone.value.code, gone.value.reason) == (4001, "taken over by a newer connection")
    [hs] = holder.seen
    assert hs["path"] == "/v1/sessions/ses_a/ws?after=3"
    headers = {k.lower(): v for k, v in hs["headers"].items()}
    assert headers["authorization"] == f"Bearer {TOKEN}" and headers["x-e2a-forwarded"] == "7"
    assert headers["sec-websocket-protocol"] == "e2a.session.v1"
    # websockets logged the handshake's headers at DEBUG; the token was cut from them
    assert "Bearer ***" in caplog.text and TOKEN not in caplog.text


def test_the_holders_refusal_is_passed_on_as_it_gave_it(holder):
    with client(holder.url) as tc, pytest.raises(WebSocketDenialResponse) as no:
        with tc.websocket_connect("/v1/sessions/gone/ws"):
            pass
    assert no.value.status_code == 410
    assert no.value.json()["error"] == {"code": "session_ended", "message": "refused 410",
                                        "field": None}


def test_a_holder_that_is_not_the_one_meant_or_gone_is_a_503_to_try_again(holder):
    """Not the one meant (409), or not taking this replica's hop token (401: an older e2a, a
    key changed meanwhile, clocks apart), or gone: the client's token was good here."""
    with socket.socket() as s:  # a port nothing listens on: a replica gone
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    for url, sid in ((holder.url, "other"), (holder.url, "stale"), (nobody, "ses_b")):
        with client(url) as tc, pytest.raises(WebSocketDenialResponse) as no:
            with tc.websocket_connect(f"/v1/sessions/{sid}/ws"):
                pass
        assert no.value.status_code == 503, url
        assert no.value.json()["error"]["code"] == "session_unavailable"
