"""Agents on a task, what every agent shares: create's checks, the task routes, and the egress
proxy (the only host port a sandbox reaches, and only for a sandbox whose agent holds a key).
Each agent's own runs against the mock providers are in test_agent_<protocol>.py."""

from __future__ import annotations

import json
import secrets
import subprocess

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e.agents import finished, gateway


@pytest.mark.parametrize("body, status, field", [
    ({"agent": "hal-9000", "llm_key": "k"}, 501, "agent"),
    ({"agent": "claude-code"}, 400, "llm_key"),
    ({"agent": "claude-code", "llm_key": ""}, 400, "llm_key"),
    ({"agent": "claude-code", "llm_key": "k", "model": "gpt-5"}, 400, "model"),
    ({"agent": "codex", "llm_key": "k", "model": "claude-sonnet-5-5"}, 400, "model"),
    ({"agent": "gemini-cli", "llm_key": "k", "model": "gpt-5"}, 400, "model"),
    ({"agent": "claude-code", "llm_key": "k", "system_prompt": "x"}, 400, "system_prompt"),
    ({"agent": "codex", "llm_key": "k", "llm": {"base_url": "https://example.com/v1"}}, 400, "llm"),
    ({"llm_key": "k"}, 400, "llm_key"),
    ({"task": "do it"}, 400, "task"),
    ({"agent": "e2a", "llm_key": "opaque"}, 400, "llm.vendor"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "http://api.example.com/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://10.1.2.3/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://localhost/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://169.254.169.254/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://api.example.com:99999/v1"}},
     400, "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"base_url": "https://[::1/v1"}}, 400,
     "llm.base_url"),
    ({"agent": "e2a", "llm_key": "k", "llm": {"vendor": "skynet"}}, 400, None),
    ({"agent": "e2a", "llm_key": "k", "model": "a", "llm": {"model": "b"}}, 400, "llm.model"),
    ({"agent": "e2a", "llm_key": "sk-x", "tools": [{"name": "shell", "command": "true"}]}, 400,
     "tools[0].name"),
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


# ---- a task's life, with gemini-cli against the mock -------------------------------------------

def start_cli(http, llm_mock, scenario: dict, **fields) -> tuple[str, str]:
    key = f"AIzaLife{secrets.token_hex(12)}"
    llm_mock.scenario(key, **scenario)
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "gemini-cli",
                                         "llm_key": key, "task": "write the file",
                                         "idle_timeout_seconds": 600, **fields})
    assert r.status_code == 201, r.text
    return r.json()["vm_id"], key


def test_task_timeout_stops_the_agent_and_destroys_the_sandbox(http, alice, llm_mock):
    vm, key = start_cli(http, llm_mock, {"hang": True, "hang_seconds": 300},
                        task_timeout_seconds=8)
    task = finished(http, vm, timeout=120)
    assert task["state"] == "timed_out" and "timeout of 8 s" in task["error"]
    assert task["ended_at"] is not None
    wait_for(lambda: alice.get_sandbox(vm).state == "destroyed", timeout=60)
    assert alice.get_sandbox(vm).end_reason == "task_finished"
    events = http.get(f"/v1/sandboxes/{vm}/task/events").json()
    assert events["done"] and events["events"][-1]["type"] == "task_finished"
    assert events["events"][-1]["data"]["state"] == "timed_out"


def test_cancel_kills_the_cli_and_keeps_a_kept_sandbox(http, alice, llm_mock):
    vm, key = start_cli(http, llm_mock, {"hang": True, "hang_seconds": 300},
                        keep_after_task_seconds=120)
    wait_for(lambda: llm_mock.requests(key), timeout=120)
    r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    # the CLI is gone from the sandbox, which is kept as asked
    procs = alice.run(vm, "ps -eo args", user="root").stdout
    assert "gemini.js" not in procs, procs
    assert alice.get_sandbox(vm).state == "running"
    r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_not_running"
    alice.kill(vm)


def test_events_follow_live_and_resume_without_repeats(http, alice, llm_mock):
    vm, key = start_cli(http, llm_mock, {"delay": 2, "steps": [
        {"tool": "write", "args": {"path": "/home/user/result.txt", "text": "followed"}}],
        "final": "wrote it"})
    seen = []
    with http.stream("GET", f"/v1/sandboxes/{vm}/task/events",
                     params={"follow": "true"}, timeout=180) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            seen.append(json.loads(line))
            if len(seen) == 3:
                break  # a client that goes away mid-task
    with http.stream("GET", f"/v1/sandboxes/{vm}/task/events",
                     params={"follow": "true", "after": seen[-1]["seq"]}, timeout=180) as r:
        seen += [json.loads(line) for line in r.iter_lines()]
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # none lost, none repeated
    assert seen[-1]["type"] == "task_finished" and seen[-1]["data"]["state"] == "succeeded"
    assert seen[-1]["data"]["result"] == "wrote it"
    # the feed outlives the sandbox
    wait_for(lambda: alice.get_sandbox(vm).state == "destroyed", timeout=60)
    stored = http.get(f"/v1/sandboxes/{vm}/task/events", params={"after": 2}).json()
    assert [e["seq"] for e in stored["events"]] == seqs[2:] and stored["done"]


def test_own_agent_on_a_callers_openai_compatible_server(http, alice, llm_mock):
    """llm.base_url: any OpenAI-compatible server (here the mock's Chat Completions, on a host
    the operator allowed with E2A_LLM_PRIVATE_HOSTS), spoken to in Chat Completions."""
    key = f"custom-{secrets.token_hex(8)}"
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "/home/user/result.txt",
                                                              "text": "compatible"}}],
                      final="wrote it")
    r = http.post("/v1/sandboxes", json={
        "template": "standard", "agent": "e2a", "llm_key": key, "task": "write it",
        "llm": {"base_url": f"{llm_mock.url}/v1", "model": "local-model-1"}})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    task = finished(http, vm)
    assert task["state"] == "succeeded" and task["result"] == "wrote it", task
    assert task["vendor"] == "openai" and task["model"] == "local-model-1"
    paths = {q["path"] for q in llm_mock.requests(key)}
    assert paths == {"/v1/chat/completions"}, paths


def test_follow_ups_one_at_a_time_and_the_model_recorded(http, llm_mock, kept):
    """Two follow-ups sent at once: one starts, the other is refused (never two runs on one
    conversation); a follow-up may change the own agent's model, and the task says which ran."""
    from concurrent.futures import ThreadPoolExecutor

    key = f"sk-ant-api03-follow{secrets.token_hex(8)}"
    llm_mock.scenario(key, delay=1, final="ok")
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": "e2a", "llm_key": key,
                                         "task": "first", "keep_after_task_seconds": 120})
    vm = r.json()["vm_id"]
    kept.append(vm)
    first = finished(http, vm)
    assert first["state"] == "succeeded" and first["model"] == "claude-sonnet-5-5"  # the default
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: http.post(f"/v1/sandboxes/{vm}/task", json={
            "task": "again", "model": "claude-opus-5-5"}), range(2)))
    assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
    second = finished(http, vm)
    assert second["state"] == "succeeded" and second["model"] == "claude-opus-5-5"
    assert llm_mock.requests(key)[-1]["body"]["model"] == "claude-opus-5-5"
