"""Attacks on the agents' keys: from code inside the sandbox (the agent's own tools run there),
from another sandbox, from another tenant. The CLI here is gemini-cli (like every CLI, its
requests go through the egress proxy); the mock provider holds the sandbox's requests open
("hang") so the CLI is caught mid-task with its placeholder in hand."""

from __future__ import annotations

import secrets

import httpx

from tests.conftest import wait_for
from tests.e2e.agents import gateway, search


AGENT, KEY_VAR, VENDOR, OTHER = "gemini-cli", "GEMINI_API_KEY", "google", "openai"
# a request of the vendor's API, by path and the header its key goes in
API_PATH, KEY_HEADER = "/v1beta/models/gemini-2.5-pro:generateContent", "x-goog-api-key"


def new_key() -> str:
    return f"AIzaREAL{secrets.token_hex(16)}"


def start_hanging(http, llm_mock, key: str, **extra) -> str:
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": AGENT,
                                         "llm_key": key, "task": "write a poem",
                                         "idle_timeout_seconds": 300, **extra})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    wait_for(lambda: llm_mock.requests(key), timeout=120)  # the CLI reached the provider
    return vm


FIND_VAR = """
import glob, sys
name = sys.argv[1].encode() + b"="
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        for var in open(path, "rb").read().split(b"\\0"):
            if var.startswith(name):
                print(var[len(name):].decode())
                sys.exit(0)
    except OSError:
        pass
"""


def placeholder_of(alice, vm: str) -> str:
    """What the CLI holds: the placeholder, read from its environment by code running as the
    same user (root in the sandbox may not read another user's environ: no CAP_SYS_PTRACE)."""
    r = alice.run(vm, ["python3", "-c", FIND_VAR, KEY_VAR])
    out = r.stdout.strip()
    assert out, (r.stdout, r.stderr)
    return out


def test_key_is_nowhere_in_the_sandbox_nor_the_api_nor_the_log(http, alice, llm_mock, server):
    key = new_key()
    vm = start_hanging(http, llm_mock, key)
    try:
        ph = placeholder_of(alice, vm)
        assert ph != key and "REAL" not in ph
        seen = llm_mock.requests(key)[0]
        assert key in (seen["headers"].get(KEY_HEADER), seen["query"].get("key")), seen
        # positive control: the same search finds the placeholder, so it would find the key
        assert search(alice, vm, ph)[0] >= 1
        assert search(alice, vm, key) == (0, 0, 0)
        assert key not in alice.run(vm, "env").stdout
        # the API's answers and the server's log
        for path in (f"/v1/sandboxes/{vm}", f"/v1/sandboxes/{vm}/task",
                     f"/v1/sandboxes/{vm}/task/events", f"/v1/sandboxes/{vm}/logs"):
            r = http.get(path)
            assert r.status_code == 200 and key not in r.text, path
    finally:
        alice.kill(vm)
    assert key not in server.log_tail(10_000_000)


def test_another_sandboxs_placeholder_and_another_vendor_get_nothing(http, alice, llm_mock, server):
    key_a, key_b = new_key(), new_key()
    a = start_hanging(http, llm_mock, key_a)
    b = start_hanging(http, llm_mock, key_b)
    try:
        ph_a, ph_b = placeholder_of(alice, a), placeholder_of(alice, b)
        assert ph_a != ph_b
        gw = gateway(alice, b)
        base = f"http://{gw}:{server.egress_port}"
        before = len(llm_mock.requests(key_a))
        # from b, with a's placeholder: forwarded without any key (the mock: no such key → 401)
        r = alice.run(b, f"curl -s -m 10 -o /dev/null -w '%{{http_code}}' {base}/{VENDOR}{API_PATH} "
                         f"-H '{KEY_HEADER}: {ph_a}' -H 'content-type: application/json' -d '{{}}'")
        assert r.stdout == "401", r.stdout
        assert len(llm_mock.requests(key_a)) == before  # a's key was never used for b
        assert llm_mock.requests(ph_a)  # the mock saw the placeholder itself, unreplaced
        # b's own placeholder toward another vendor's API: refused by the proxy
        r = alice.run(b, f"curl -s -m 10 -w ' %{{http_code}}' {base}/{OTHER}/v1/responses "
                         f"-H 'authorization: Bearer {ph_b}' -d '{{}}'")
        assert r.stdout.endswith(" 403") and f"may call {VENDOR}" in r.stdout, r.stdout
    finally:
        alice.kill(a)
        alice.kill(b)


def test_key_quoted_by_the_provider_is_cut_from_what_the_sandbox_sees(http, alice, llm_mock):
    key = new_key()
    llm_mock.scenario(key, error={"status": 400, "message": f"API key not valid: {key}"})
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": AGENT,
                                         "llm_key": key, "task": "hi",
                                         "keep_after_task_seconds": 120})
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    try:
        task = wait_for(lambda: (t := http.get(f"/v1/sandboxes/{vm}/task").json())["state"]
                        not in ("starting", "running") and t, timeout=180)
        assert task["state"] == "failed"
        events = http.get(f"/v1/sandboxes/{vm}/task/events", params={"limit": 5000}).text
        assert key not in events and key not in (task["error"] or "")
        assert "API key not valid" in events  # the provider's words did come through
    finally:
        alice.kill(vm)


def test_between_tasks_the_sandbox_cannot_spend_the_key(http, alice, llm_mock, server):
    """A kept sandbox's code holds the placeholder, but the grant holds only while a task runs."""
    key = new_key()
    llm_mock.scenario(key, delay=4, final="ok")
    r = http.post("/v1/sandboxes", json={"template": "standard", "agent": AGENT,
                                         "llm_key": key, "task": "say ok",
                                         "keep_after_task_seconds": 120})
    vm = r.json()["vm_id"]
    try:
        wait_for(lambda: llm_mock.requests(key), timeout=120)
        ph = placeholder_of(alice, vm)  # taken while the task runs
        wait_for(lambda: http.get(f"/v1/sandboxes/{vm}/task").json()["state"] == "succeeded",
                 timeout=180)
        used = len(llm_mock.requests(key))
        gw = gateway(alice, vm)
        r = alice.run(vm, f"curl -s -m 10 -w ' %{{http_code}}' "
                          f"http://{gw}:{server.egress_port}/{VENDOR}{API_PATH} "
                          f"-H '{KEY_HEADER}: {ph}' -d '{{}}'")
        assert r.stdout.endswith(" 403"), r.stdout
        assert len(llm_mock.requests(key)) == used
        assert alice.get_sandbox(vm).state == "running"  # kept, as asked
    finally:
        alice.kill(vm)


def test_another_tenant_cannot_touch_the_task(http, alice, llm_mock, keys, server):
    key = new_key()
    vm = start_hanging(http, llm_mock, key)
    try:
        with httpx.Client(base_url=server.url, timeout=30,
                          headers={"Authorization": f"Bearer {keys['bob']}"}) as bob:
            for method, path in (("GET", "/task"), ("GET", "/task/events"),
                                 ("POST", "/task/cancel")):
                r = bob.request(method, f"/v1/sandboxes/{vm}{path}")
                assert r.status_code == 404, (path, r.text)
            r = bob.post(f"/v1/sandboxes/{vm}/task", json={"task": "steal"})
            assert r.status_code == 404
        assert http.get(f"/v1/sandboxes/{vm}/task").json()["state"] == "running"
    finally:
        alice.kill(vm)

