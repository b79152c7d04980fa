"""Agents on a task, what every agent shares: create's checks, the task routes, and the egress
proxy (the only host port a sandbox reaches, and only for a sandbox whose agent holds a key).
Each agent's own runs against the mock providers are in test_agent_<protocol>.py."""

from __future__ import annotations

import subprocess

import httpx
import pytest



def gateway(alice, vm_id: str) -> str:
    """The host side of the sandbox's link, as the sandbox sees it."""
    out = alice.run(vm_id, "ip route show default").stdout.split()
    return out[out.index("via") + 1]


@pytest.mark.parametrize("body, status, field", [
    ({"agent": "hal-9000", "llm_key": "k"}, 501, "agent"),
    ({"agent": "claude-code"}, 400, "llm_key"),
    ({"agent": "claude-code", "llm_key": ""}, 400, "llm_key"),
    ({"agent": "claude-code", "llm_key": "k", "model": "gpt-5"}, 400, "model"),
    ({"agent": "codex", "llm_key": "k", "model": "claude-sonnet-4-5"}, 400, "model"),
    ({"agent": "gemini-cli", "llm_key": "k", "model": "gpt-5"}, 400, "model"),
    ({"agent": "claude-code", "llm_key": "k", "system_prompt": "x"}, 400, "system_prompt"),
    ({"agent": "codex", "llm_key": "k", "llm": {"base_url": "https://example.com/v1"}}, 400, "llm"),
    ({"llm_key": "k"}, 400, "llm_key"),
    ({"task": "do it"}, 400, "task"),
    ({"agent": "e2a", "llm_key": "opaque"}, 400, "llm.vendor"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "http://api.example.com/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://127.0.0.1/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://localhost/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://169.254.169.254/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"vendor": "skynet"}}, 400, None),
    ({"agent": "e2a", "llm_key": "k", "model": "a", "llm": {"model": "b"}}, 400, "llm.model"),
    ({"agent": "claude-code", "llm_key": "k", "keep_after_task_seconds": 100,
      "max_lifetime_seconds": 50}, 400, "keep_after_task_seconds"),
])
def test_create_refuses_bad_agent_fields(http, alice, body, status, field):
    before = {s.vm_id for s in alice.list_sandboxes()}
    r = http.post("/v1/sandboxes", json={"template": "standard", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if field:
        assert err["field"] == field, err
    assert {s.vm_id for s in alice.list_sandboxes()} == before  # nothing was created


def test_task_routes_of_a_sandbox_without_agent(http, sandbox, keys):
    vm = sandbox.vm_id
    r = http.get(f"/v1/sandboxes/{vm}/task")
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
    r = http.post(f"/v1/sandboxes/{vm}/task", json={"task": "hello"})
    assert r.status_code == 409 and "no agent" in r.json()["error"]["message"]
    r = http.get(f"/v1/sandboxes/{vm}/task/events")
    assert r.status_code == 200 and r.json() == {"events": [], "next": 0, "done": True}
    r = http.post(f"/v1/sandboxes/{vm}/task", json={})
    assert r.status_code == 400
    # another tenant sees none of it
    with httpx.Client(base_url=http.base_url, headers={"Authorization": f"Bearer {keys['bob']}"}) as b:
        assert b.get(f"/v1/sandboxes/{vm}/task").status_code == 404
        assert b.get(f"/v1/sandboxes/{vm}/task/events").status_code == 404


def test_egress_proxy_refuses_a_sandbox_without_an_agent(alice, sandbox, server):
    vm = sandbox.vm_id
    gw = gateway(alice, vm)
    r = alice.run(vm, f"curl -s -m 10 -w ' %{{http_code}}' "
                      f"http://{gw}:{server.egress_port}/anthropic/v1/messages -d '{{}}'")
    assert r.stdout.endswith(" 403"), r.stdout + r.stderr
    assert "holds no agent key" in r.stdout
    # every other port of the host stays closed to it
    r = alice.run(vm, f"curl -s -m 3 http://{gw}:{server.port}/health")
    assert r.exit_code != 0


def test_egress_port_is_closed_to_the_host_itself(server):
    """Only sandboxes reach the proxy: not root over loopback, not the host's other networks."""
    r = subprocess.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{server.egress_port}/"],
                       capture_output=True)
    assert r.returncode == 28  # dropped: the connection times out


def test_unknown_agent_body_is_not_echoed(http):
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "claude-code",
                                         "llm_key": "sk-ant-secret-123", "model": "gpt-4"})
    assert r.status_code == 400
    assert "sk-ant-secret-123" not in r.text


def test_tasks_listed_in_openapi(http):
    paths = http.get("/openapi.json").json()["paths"]
    for p in ("/v1/sandboxes/{vm_id}/task", "/v1/sandboxes/{vm_id}/task/events",
              "/v1/sandboxes/{vm_id}/task/cancel"):
        assert p in paths
