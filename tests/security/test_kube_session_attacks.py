"""Attacks on sessions across replicas (docs/kubernetes.md "Sessions"): the replica that relays
a session's WebSocket to the one holding it takes only that session's own token (another
session's, or the tenant's API key, is refused there and never passed on), a hop forged by the
client is refused and serves nothing, and another tenant can neither read nor end the session
through any replica."""

from __future__ import annotations

import secrets

import httpx
import pytest

from tests.e2e.sessions import MODEL, Conn, create, finished, refused
from tests.security.test_kube_workspace_attacks import through_two_replicas

pytestmark = pytest.mark.kube


def ws_url(base: str, sid: str) -> str:
    return base.replace("http", "ws", 1) + f"/v1/sessions/{sid}/ws"


def test_the_relay_takes_only_the_sessions_own_token_and_a_forged_hop_serves_nothing(
        wserver, llm_mock):
    llm = "sk-ant-" + secrets.token_hex(16)
    llm_mock.scenario(llm, final="fine")
    with through_two_replicas(wserver, "sesrelay") as (one, two):
        mine = create(one.http, llm={"api_key": llm, "model": MODEL})      # held by wserver
        theirs = create(one.http, llm={"api_key": llm, "model": MODEL})
        sid = mine["chat_session_id"]
        through_two = ws_url(str(two.http.base_url), sid)
        # another session's token, and the tenant's own API key, are refused by the relayer
        assert refused(through_two, {"Authorization": f"Bearer {theirs['jwt']}"}) == 401
        assert refused(through_two, {"Authorization": one.http.headers["authorization"]}) == 401
        assert refused(through_two, {"Authorization": f"Bearer {mine['jwt']}x"}) == 401
        # a hop forged by the client, naming a replica: refused, not served, not relayed
        assert refused(through_two, {"Authorization": f"Bearer {mine['jwt']}",
                                     "x-e2a-forwarded": "12345"}) == 409
        # another tenant, through either replica: no such session, and it cannot end it
        bob = wserver.create_user(f"sesbob{secrets.token_hex(4)}@example.com")
        for base in (one.http.base_url, two.http.base_url):
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {bob}"},
                              timeout=60) as b:
                assert b.get(f"/v1/sessions/{sid}").status_code == 404
                assert b.delete(f"/v1/sessions/{sid}").status_code == 404
        # the session is untouched by all of it, and served through the relay
        c = Conn({**mine, "connect_url": through_two})
        c.task("still fine?")
        assert finished(c.until_finished())["result"] == "fine"
        c.close()
        for ticket in (mine, theirs):
            r = two.http.delete(f"/v1/sessions/{ticket['chat_session_id']}")
            assert r.status_code == 200 and r.json()["state"] == "ended", r.text
