"""Agents on Anthropic's Messages API in real sandboxes, against the mock of that API
(tests/llm_mock/anthropic.py): claude-code inside the sandbox, through the egress proxy, and
e2a's own agent on the host with its anthropic SDK provider. The task is done (a file written,
the final message as the result), the real key reaches the provider and nothing else, a
refused key fails the task in the provider's words, a 429 is retried."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import wait_for
from tests.e2e import agents
from tests.e2e.agents import events, finished, search

CLAUDE = "/opt/e2a/agents/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
MODEL = "claude-sonnet-5-5"


def new_key() -> str:
    return f"sk-ant-api03-REAL{uuid.uuid4().hex}"


def tool_uses(evs: list[dict]) -> list[dict]:
    """The tool_use blocks of claude-code's assistant events."""
    return [b for e in evs if e["type"] == "cli" and e["data"].get("type") == "assistant"
            for b in e["data"]["message"]["content"] if b["type"] == "tool_use"]


def test_claude_code_writes_the_file_and_follows_up(http, alice, llm_mock, server, kept):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "/home/user/hello.txt",
                                                             "text": "hello from claude-code"}}],
                      final="The file is written.")
    # with the sandbox's internet off: claude-code needs nothing but its API, through the proxy
    vm = start(http, "claude-code", key, keep_after_task_seconds=120, internet=False)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"] == "The file is written." and t["error"] is None
    assert t["input_tokens"] > 0 and t["output_tokens"] > 0 and not t["key_passed_in"]
    assert alice.files.read_text(vm, "/home/user/hello.txt") == "hello from claude-code"
    evs = events(http, vm)
    [use] = tool_uses(evs)
    assert use["name"] == "Write" and use["input"] == {"file_path": "/home/user/hello.txt",
                                                       "content": "hello from claude-code"}
    [result] = [e["data"] for e in evs if e["type"] == "cli" and e["data"]["type"] == "result"]
    assert result["subtype"] == "success" and result["num_turns"] == 2
    # the task's two turns and nothing else, through the proxy with the real key, counted
    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1/messages"] * 2
    assert {s["headers"].get("x-api-key") for s in seen} == {key}
    assert t["llm_requests"] == len(seen)

    # a follow-up continues the conversation (claude-code's --continue)
    llm_mock.scenario(key, final="Still here.")
    r = http.post(f"/v1/sandboxes/{vm}/task", json={"task": "and then?"})
    assert r.status_code == 202, r.text
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "Still here.", t
    text = str(llm_mock.requests(key)[-1]["body"]["messages"])
    assert "write the file" in text and "and then?" in text and "tool_result" in text

    # nothing the CLI wrote (its config, sessions) holds the key
    assert search(alice, vm, key)[2] == 0
    assert key not in server.log_tail(10_000_000)


def test_claude_code_key_is_nowhere_in_the_sandbox_while_it_works(http, alice, llm_mock,
                                                                   server):
    """Caught mid-task (the mock holds its request), the CLI holds the placeholder, not the
    key; it reached the provider within seconds of the create, and leaves most of the standard
    template's 512 MiB to the task."""
    key = new_key()
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    t0 = time.monotonic()
    vm = start(http, "claude-code", key)
    try:
        wait_for(lambda: llm_mock.requests(key), timeout=120, interval=0.1)
        assert time.monotonic() - t0 < 30
        env = alice.run(vm, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done "
                            "2>/dev/null | grep ^ANTHROPIC_API_KEY= | head -1").stdout
        placeholder = env.strip().partition("=")[2]
        assert placeholder.startswith("sk-ant-") and "placeholder" in placeholder, env
        assert search(alice, vm, placeholder)[0] >= 1   # the search finds what is there
        assert search(alice, vm, key) == (0, 0, 0)
        assert key not in alice.run(vm, "env").stdout
        # its binary (390 MiB, mostly the JavaScript it carries) is mapped from the image: the
        # sandbox's meminfo shows it as cache and little free, yet 300 MiB more fit beside it
        fill = alice.run(vm, ["python3", "-c", "x = b'1' * (300 << 20); print(len(x) >> 20)"])
        assert fill.exit_code == 0 and fill.stdout.strip() == "300", fill
        procs = alice.run(vm, "ps -eo args=").stdout.splitlines()
        assert len([p for p in procs if p.startswith(CLAUDE)]) == 1, procs   # still working
        r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    finally:
        alice.kill(vm)
    assert key not in server.log_tail(10_000_000)


def test_own_agent_on_anthropic_writes_the_file(http, alice, llm_mock, kept):
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
    deltas = "".join(e["data"]["text"] for e in evs if e["type"] == "message_delta")
    assert deltas == t["result"]   # the answer streamed
    seen = llm_mock.requests(key)
    assert [(s["path"], s["body"]["model"]) for s in seen] == [("/v1/messages", MODEL)] * 2
    assert {s["key"] for s in seen} == {key}
    assert key not in alice.run(vm, "env").stdout


@pytest.mark.parametrize("agent, message, error", [
    # claude-code says Anthropic's usual answer to a wrong key in its own words
    ("claude-code", "invalid x-api-key",
     "Invalid API key · Fix external API key (401 authentication_error)"),
    ("claude-code", "This API key was revoked by its organization.",
     "Failed to authenticate. API Error: 401 This API key was revoked by its organization. "
     "(401 authentication_error)"),
    ("e2a", "invalid x-api-key", "anthropic answered 401: invalid x-api-key"),
])
def test_refused_key_fails_in_the_providers_words(http, llm_mock, server, agent, message, error):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": message})
    vm = start(http, agent, key)
    t = finished(http, vm)
    assert t["state"] == "failed", t
    assert t["error"] == error
    assert len(llm_mock.requests(key)) == 1   # a 401 is not retried
    assert key not in server.log_tail(10_000_000)


@pytest.mark.parametrize("agent", ["claude-code", "e2a"])
def test_429_is_retried_and_the_task_succeeds(http, llm_mock, agent):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, final="made it")
    vm = start(http, agent, key)
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "made it", t
    assert len(llm_mock.requests(key)) == 2   # the 429, then the retry
    assert t["llm_requests"] == 2


def start(http, agent: str, key: str, task: str = "write the file", **fields) -> str:
    return agents.start(http, agent, key, task, own_model=MODEL, **fields)
