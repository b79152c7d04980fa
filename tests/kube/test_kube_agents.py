"""Agents on the Kubernetes backend (docs/kubernetes.md "Agents"): a CLI agent's task in a pod,
its LLM calls through the egress proxy of the replica that runs it (the user's key swapped in
there, never in the pod); the task followed live, followed up and cancelled through another
replica; a replica's death fails its task and ends its sandbox."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e.agents import finished, search
from tests.kube.cluster import another_replica, replica_of

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)


def api(srv) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=180,
                        headers={"Authorization": f"Bearer {srv.keys['alice']}"})


@pytest.fixture(scope="module")
def alice(kube_clients):
    return kube_clients["alice"]


@pytest.fixture(scope="module")
def second(kserver):
    """Another replica of the Kubernetes server: kserver runs the tasks, this one is 'any
    other' behind a load balancer."""
    with another_replica(kserver, "agents") as srv:
        yield srv


def start(srv, llm_mock, scenario: dict, **fields) -> tuple[str, str]:
    """gemini-cli on a task, through `srv`, against the mock provider: (vm_id, the key)."""
    key = f"AIzaKube{secrets.token_hex(12)}"
    llm_mock.scenario(key, **scenario)
    with api(srv) as c:
        r = c.post("/v1/sandboxes", json={"template": "standard", "agent": "gemini-cli",
                                          "llm_key": key, "task": "write the file",
                                          "idle_timeout_seconds": 600, **fields})
    assert r.status_code == 201, r.text
    return r.json()["vm_id"], key


def test_a_task_runs_in_a_pod_and_is_followed_live_through_another_replica(
        kserver, second, alice, llm_mock):
    vm, key = start(kserver, llm_mock, {"delay": 2, "steps": [
        {"tool": "write", "args": {"path": "/home/user/result.txt", "text": "from a pod"}}],
        "final": "wrote it"}, keep_after_task_seconds=120)
    seen = []
    with api(second) as b, b.stream("GET", f"/v1/sandboxes/{vm}/task/events",
                                     params={"follow": "true"}) as r:
        assert r.status_code == 200
        seen = [json.loads(line) for line in r.iter_lines()]
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))  # none lost or repeated
    assert seen[0]["type"] == "task_started"
    assert seen[-1]["type"] == "task_finished" and seen[-1]["data"]["state"] == "succeeded"
    assert seen[-1]["data"]["result"] == "wrote it"
    with api(second) as b:
        first = finished(b, vm)
        assert first["state"] == "succeeded"
        stored = b.get(f"/v1/sandboxes/{vm}/task/events").json()
        assert stored["done"] and len(stored["events"]) == len(seen)
    assert alice.run(vm, "cat /home/user/result.txt").stdout == "from a pod"
    assert llm_mock.requests(key)  # with the user's key, swapped in by the replica's proxy
    # a follow-up through the other replica is passed to the one holding the agent (its key)
    llm_mock.scenario(key, final="Still here.")
    with api(second) as b:
        r = b.post(f"/v1/sandboxes/{vm}/task", json={"task": "and then?"})
        assert r.status_code == 202, r.text
        again = finished(b, vm)
        assert again["state"] == "succeeded" and again["result"] == "Still here.", again
        assert again["task_id"] == r.json()["task_id"] != first["task_id"]
    assert "and then?" in str(llm_mock.requests(key)[-1]["body"])
    # one said to be passed on already is not passed again, nor taken by a replica not named
    with api(second) as b, api(kserver) as a:
        for c in (a, b):
            r = c.post(f"/v1/sandboxes/{vm}/task", json={"task": "x"},
                       headers={"x-e2a-forwarded": "12345"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "task_conflict", r.text
    assert search(alice, vm, key, root=False)[2] == 0  # nothing the CLI wrote holds it
    alice.kill(vm)


def test_a_first_task_through_another_replica_reaches_an_agent_with_none_yet(
        kserver, second, alice, llm_mock):
    """An agent created without a task, then its task sent through another replica (as a load
    balancer would): passed on to the replica holding the agent. Before, only a task's row
    named that replica, and this was a 409 through any other."""
    key = f"AIzaKube{secrets.token_hex(12)}"
    llm_mock.scenario(key, final="first, through the other")
    with api(kserver) as a:
        r = a.post("/v1/sandboxes", json={"template": "standard", "agent": "gemini-cli",
                                          "llm_key": key, "idle_timeout_seconds": 600})
        assert r.status_code == 201, r.text
        vm = r.json()["vm_id"]
    with api(second) as b:
        r = b.post(f"/v1/sandboxes/{vm}/task", json={"task": "say so"})
        assert r.status_code == 202, r.text
        done = finished(b, vm)
    assert done["state"] == "succeeded" and done["result"] == "first, through the other", done
    assert done["task_id"] == r.json()["task_id"]
    alice.kill(vm)


def test_a_task_is_cancelled_through_another_replica(kserver, second, alice, llm_mock):
    vm, key = start(kserver, llm_mock, {"hang": True, "hang_seconds": 300},
                    keep_after_task_seconds=120)
    wait_for(lambda: llm_mock.requests(key), timeout=120)
    # caught mid-task: the CLI in the pod holds the placeholder, never the key
    env = alice.run(vm, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done "
                        "2>/dev/null | grep ^GEMINI_API_KEY= | head -1").stdout
    placeholder = env.strip().partition("=")[2]
    assert "placeholder" in placeholder, env
    assert search(alice, vm, placeholder, root=False)[0] >= 1  # the search finds what is there
    assert search(alice, vm, key, root=False) == (0, 0, 0)
    with api(second) as b:
        r = b.get(f"/v1/sandboxes/{vm}/task/events")
        assert r.status_code == 200 and not r.json()["done"]  # running, on the other replica
        r = b.post(f"/v1/sandboxes/{vm}/task/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        r = b.post(f"/v1/sandboxes/{vm}/task/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "task_not_running"
    procs = alice.run(vm, "ps -eo args").stdout
    assert "gemini" not in procs, procs
    assert alice.get_sandbox(vm).state == "running"  # kept, as asked
    alice.kill(vm)


def test_a_sandbox_deleted_through_another_replica_ends_its_task_there(
        kserver, second, alice, llm_mock):
    """The replica running the task lets go of the sandbox the other tears down, and ends its
    task as the embedded backend does (cancelled: the sandbox was deleted)."""
    vm, key = start(kserver, llm_mock, {"hang": True, "hang_seconds": 300})
    wait_for(lambda: llm_mock.requests(key), timeout=120)
    with api(second) as b:
        assert b.delete(f"/v1/sandboxes/{vm}").status_code in (200, 204)
        task = finished(b, vm, timeout=60)
    assert task["state"] == "cancelled", task
    assert "the sandbox ended (deleted)" in task["error"], task


def test_a_replicas_death_fails_its_task_and_ends_its_sandbox(kserver, alice, llm_mock):
    doomed = replica_of(kserver, "agentsdie")
    doomed.cleanup()
    doomed.start()
    try:
        vm, key = start(doomed, llm_mock, {"hang": True, "hang_seconds": 300})
        wait_for(lambda: llm_mock.requests(key), timeout=120)
        doomed.kill9()
        with api(kserver) as a:
            task = finished(a, vm, timeout=60)
        assert task["state"] == "failed" and "replica running the task stopped" in task["error"]
        ended = wait_for(lambda: (s := alice.get_sandbox(vm)).state == "destroyed" and s,
                         timeout=60)
        assert ended.end_reason == "server_restart"
    finally:
        doomed.stop()
        doomed.cleanup()
