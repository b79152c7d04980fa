"""Create, list, get, keepalive, destroy; auth and ownership; bad input gets a clear 4xx."""

from __future__ import annotations

import httpx
import pytest

from e2a.sdk import E2AError
from tests.conftest import wait_for


def test_create_exec_destroy_over_plain_http(server, keys):
    """The README's curl flow, byte for byte: JSON sent without a content type."""
    h = {"Authorization": f"Bearer {keys['alice']}"}
    r = httpx.post(server.url + "/v1/sandboxes", headers=h, content='{"template":"standard"}')
    assert r.status_code == 201, r.text
    sb = r.json()
    assert sb["vm_id"].startswith("sbx_") and sb["state"] == "running"
    assert (sb["vcpu"], sb["cpu_fraction"], sb["memory_mib"]) == (1, 0.5, 512)
    assert sb["template"] == "standard" and sb["internet"] is True
    assert sb["max_lifetime_seconds"] == 7200 and sb["idle_timeout_seconds"] == 60
    r = httpx.post(f"{server.url}/v1/sandboxes/{sb['vm_id']}/commands", headers=h,
                   content='{"cmd":"echo hi; exit 3"}')
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    events = [httpx.Response(200, content=line).json() for line in r.text.splitlines()]
    assert events[0]["type"] == "start"
    assert {"type": "stdout", "data": "hi\n"} in events
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 3
    r = httpx.delete(f"{server.url}/v1/sandboxes/{sb['vm_id']}", headers=h)
    assert r.status_code == 200 and r.json()["state"] == "destroyed"
    r = httpx.get(f"{server.url}/v1/sandboxes/{sb['vm_id']}", headers=h)
    assert r.json()["state"] == "destroyed"


def test_list_get_and_filters(alice):
    a = alice.create_sandbox("standard", metadata={"team": "red", "n": "1"})
    b = alice.create_sandbox("standard", metadata={"team": "blue"})
    try:
        ids = {s.vm_id for s in alice.list_sandboxes()}
        assert {a.vm_id, b.vm_id} <= ids
        red = alice.list_sandboxes(metadata={"team": "red"})
        assert [s.vm_id for s in red] == [a.vm_id]
        assert red[0].metadata == {"team": "red", "n": "1"}
        assert {s.vm_id for s in alice.list_sandboxes(state="running")} >= {a.vm_id, b.vm_id}
        assert alice.get_sandbox(a.vm_id).state == "running"
    finally:
        alice.kill(a.vm_id)
        alice.kill(b.vm_id)
    assert a.vm_id not in {s.vm_id for s in alice.list_sandboxes()}
    assert a.vm_id in {s.vm_id for s in alice.list_sandboxes(state="destroyed")}


def test_env_vars_reach_commands(alice):
    sb = alice.create_sandbox("standard", env_vars={"GREETING": "hello there"})
    try:
        assert alice.run(sb.vm_id, "echo $GREETING").stdout == "hello there\n"
        r = alice.run(sb.vm_id, "echo $GREETING $EXTRA", env={"EXTRA": "x"})
        assert r.stdout == "hello there x\n"
    finally:
        alice.kill(sb.vm_id)


def test_auth_required(server, sandbox):
    for headers in ({}, {"Authorization": "Bearer e2a_live_wrong"}, {"Authorization": "Basic x"}):
        r = httpx.get(server.url + "/v1/sandboxes", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(f"{server.url}/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "true"})
    assert r.status_code == 401


def test_revoked_key_is_refused(server):
    first = server.create_user("revoked@example.com")
    out = server.admin("create-key", "revoked@example.com")
    key_id = out.split("key_id=")[1].split()[0]
    second = out.split("api_key=")[1].strip()
    for key in (first, second):
        r = httpx.get(server.url + "/v1/sandboxes", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    server.admin("revoke-key", key_id)
    # a key revoked in the database stops working within the key cache's TTL (2 s)
    wait_for(lambda: httpx.get(server.url + "/v1/sandboxes",
                               headers={"Authorization": f"Bearer {second}"}).status_code == 401,
             timeout=5, interval=0.1)
    r = httpx.get(server.url + "/v1/sandboxes", headers={"Authorization": f"Bearer {first}"})
    assert r.status_code == 200


def test_other_users_sandbox_is_404(alice, bob, sandbox):
    assert sandbox.vm_id not in {s.vm_id for s in bob.list_sandboxes()}
    for call in (lambda: bob.get_sandbox(sandbox.vm_id),
                 lambda: bob.run(sandbox.vm_id, "true"),
                 lambda: bob.files.read_bytes(sandbox.vm_id, "/etc/hostname"),
                 lambda: bob.keepalive(sandbox.vm_id),
                 lambda: bob.kill(sandbox.vm_id)):
        with pytest.raises(E2AError) as e:
            call()
        assert e.value.status == 404
    assert alice.get_sandbox(sandbox.vm_id).state == "running"


@pytest.mark.parametrize("body,status,code,field", [
    ({}, 400, "missing_field", "template"),
    ({"template": "standard", "env_vars": {"E2A_TOKEN": "x"}}, 400, "reserved_env_var",
     "env_vars.E2A_TOKEN"),
    ({"template": "standard", "env_vars": {"HOME": "/tmp"}}, 400, "reserved_env_var",
     "env_vars.HOME"),
    ({"template": "standard", "env_vars": {"1BAD": "x"}}, 400, "invalid_field", "env_vars"),
    ({"template": "standard", "idle_timeout_seconds": 0}, 400, "invalid_field",
     "idle_timeout_seconds"),
    ({"template": "standard", "max_lifetime_seconds": 7201}, 400, "invalid_field",
     "max_lifetime_seconds"),
    ({"template": "standard", "idle_timeout_seconds": "soon"}, 400, "invalid_field",
     "idle_timeout_seconds"),
    ({"template": "standard", "colour": "red"}, 400, "invalid_field", "colour"),
    ({"template": "standard", "agent": "claude-code"}, 400, "missing_field", "llm_key"),
    ({"template": "standard", "agent": "hal-9000", "llm_key": "sk-x"}, 501,
     "agent_not_available", "agent"),
    ({"template": "windows95"}, 501, "template_not_available", "template"),
])
def test_create_rejects_bad_input(http, body, status, code, field):
    r = http.post("/v1/sandboxes", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["field"]) == (code, field)
    assert err["message"]


def test_bad_json_and_shapes(http, sandbox):
    r = http.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.post("/v1/sandboxes", json=["standard"])
    assert r.status_code == 400
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_command"
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "x", "argv": ["y"]})
    assert r.status_code == 400
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "true", "timeout": -1})
    assert r.status_code == 400 and r.json()["error"]["field"] == "timeout"
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "true", "cwd": "/nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cwd"
    r = http.post(f"/v1/sandboxes/{sandbox.vm_id}/commands", json={"cmd": "true", "user": "nobody2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_user"
    r = http.get("/v1/sandboxes/sbx_doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "sandbox_not_found"
    r = http.get("/v1/sandboxes", params={"state": "melted"})
    assert r.status_code == 400
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_destroyed_sandbox_refuses_work(alice, http):
    sb = alice.create_sandbox("standard")
    alice.kill(sb.vm_id)
    r = http.post(f"/v1/sandboxes/{sb.vm_id}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running"
    r = http.get(f"/v1/sandboxes/{sb.vm_id}/files", params={"path": "/etc/hostname"})
    assert r.status_code == 409
    r = http.post(f"/v1/sandboxes/{sb.vm_id}/keepalive")
    assert r.status_code == 409
    r = http.delete(f"/v1/sandboxes/{sb.vm_id}")  # destroying twice is harmless
    assert r.status_code == 200 and r.json()["state"] == "destroyed"


def test_logs_have_host_and_agent_lines(alice, sandbox):
    alice.run(sandbox.vm_id, "echo logged")
    lines = alice.logs(sandbox.vm_id)
    sources = {line.source for line in lines}
    assert {"host", "envd"} <= sources
    text = "\n".join(line.message for line in lines)
    assert "running" in text and "echo logged" in text
