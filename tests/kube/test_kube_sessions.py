"""Sessions across replicas on the Kubernetes backend (docs/kubernetes.md "Sessions"): a
session's agent is in the memory of the replica that created it; its WebSocket through any
other replica is relayed there, it is ended and its bundles replaced through any replica, a
replica starting leaves the others' sessions alone, and a dead replica's sessions end."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import wait_for
from tests.e2e.sessions import MODEL, Conn, bundle, create, finished, refused
from tests.kube.cluster import another_replica

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def second(wserver):
    """Another replica of the workspace server (a session mounts its end user's workspace)."""
    with another_replica(wserver, "sessions") as srv:
        yield srv


@pytest.fixture(scope="module")
def key(wserver):
    return wserver.create_user(f"kses{secrets.token_hex(4)}@example.com")


def api(srv, key) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=180, headers={"Authorization": f"Bearer {key}"})


def through(srv, ticket: dict) -> dict:
    """The ticket, its connect_url through the replica `srv`."""
    return {**ticket, "connect_url": srv.url.replace("http", "ws", 1) +
            f"/v1/sessions/{ticket['chat_session_id']}/ws"}


def closed(c: Conn, timeout: float = 30) -> tuple[int, str]:
    """The close code and reason the connection ends with (messages before it are skipped)."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as gone:
        while time.monotonic() < deadline:
            c.recv(max(0.5, deadline - time.monotonic()))
    return gone.value.rcvd.code, gone.value.rcvd.reason


def test_a_session_is_served_rekeyed_and_ended_through_another_replica(
        wserver, second, key, llm_mock):
    old, new = "sk-ant-" + secrets.token_hex(16), "sk-ant-" + secrets.token_hex(16)
    name = "kses-" + secrets.token_hex(4)
    llm_mock.scenario(old, final="the old key")
    llm_mock.scenario(new, final="the new key")
    with api(wserver, key) as a, api(second, key) as b:
        bundle(a, name, {"LLM_API_KEY": old, "LLM_MODEL": MODEL})
        ticket = create(a, secrets=[name])           # held by wserver
        sid = ticket["chat_session_id"]
        c = Conn(through(second, ticket))            # relayed by the other replica
        assert c.ready["chat_session_id"] == sid
        c.task("which key?")
        first = c.until_finished()
        assert finished(first)["result"] == "the old key"
        assert [e["seq"] for e in first] == list(range(1, len(first) + 1))
        for http in (a, b):
            got = http.get(f"/v1/sessions/{sid}").json()
            assert got["state"] == "active" and got["connected"] is True, got
        # the bundle replaced through the replica that does not hold the session
        r = b.put(f"/v1/tenants/me/secrets/{name}",
                  json={"values": {"LLM_API_KEY": new, "LLM_MODEL": MODEL}})
        assert r.status_code == 200, r.text
        m = c.recv(30)
        assert m["type"] == "secrets_replaced" and m["data"] == {"bundle": name}, m
        c.task("and now?")
        assert finished(c.until_finished())["result"] == "the new key"
        assert len(llm_mock.requests(old)) == 1 and len(llm_mock.requests(new)) == 1
        # a connection through the holder takes over the relayed one, which hears it
        d = Conn(ticket, after=first[-1]["seq"])
        assert closed(c)[0] == 4001
        # ended through the other replica: the holder closes its WebSocket, the sandbox goes
        r = b.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["state"] == "ended", r.text
        assert closed(d) == (4000, "deleted")
        got = a.get(f"/v1/sessions/{sid}").json()
        assert got["end_reason"] == "deleted" and got["connected"] is False, got
        vm = got["vm_id"]
        assert wait_for(lambda: a.get(f"/v1/sandboxes/{vm}").json()["state"] == "destroyed",
                        timeout=60)
        assert refused(through(second, ticket)["connect_url"],
                       {"Authorization": f"Bearer {ticket['jwt']}"}) == 410


def test_a_replica_starting_leaves_others_sessions_and_a_dead_ones_end(
        wserver, second, key, llm_mock):
    """Before, a replica's start ended every active session, other replicas' included; and a
    dead replica's session with no task running stayed active, its sandbox kept until its TTL."""
    llm = "sk-ant-" + secrets.token_hex(16)
    llm_mock.scenario(llm, final="here")
    with api(wserver, key) as a:
        ticket = create(a, llm={"api_key": llm, "model": MODEL}, ttl_seconds=3600)
        sid = ticket["chat_session_id"]
        # a third replica starts while the session is held by wserver
        with another_replica(wserver, "sesthird") as third:
            assert a.get(f"/v1/sessions/{sid}").json()["state"] == "active"
            c = Conn(through(third, ticket))
            c.task("still there?")
            assert finished(c.until_finished())["result"] == "here"
            # the holder (here the third) killed: its sessions end through the others
            with api(third, key) as t:
                other = create(t, llm={"api_key": llm, "model": MODEL})
            c.close()
            third.kill9()
            got = wait_for(lambda: _ended(a, other["chat_session_id"]), timeout=60)
            assert got["end_reason"] == "server_restart"
            assert wait_for(lambda: a.get(f"/v1/sandboxes/{got['vm_id']}").json()["state"]
                            == "destroyed", timeout=60)
            assert refused(through(second, other)["connect_url"],
                           {"Authorization": f"Bearer {other['jwt']}"}) == 410
            assert a.get(f"/v1/sessions/{sid}").json()["state"] == "active"  # wserver's
        assert a.delete(f"/v1/sessions/{sid}").status_code == 200


def _ended(http, sid: str) -> dict | None:
    got = http.get(f"/v1/sessions/{sid}").json()
    return got if got["state"] == "ended" else None
