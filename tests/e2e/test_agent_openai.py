"""Agents on OpenAI's API (and DeepSeek's dialect of it) in real sandboxes, against the mock of
that API (tests/llm_mock/openai.py): codex inside the sandbox, through the egress proxy, and
e2a's own agent on the host with its openai SDK providers (the Responses API for OpenAI, Chat
Completions for DeepSeek). The task is done (a file written, the final message as the result),
the real key reaches the provider and nothing else, a refused key fails the task in the
provider's words, a 429 is retried."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import wait_for
from tests.e2e import agents
from tests.e2e.agents import events, finished, search

CODEX = ("/opt/e2a/agents/node_modules/@openai/codex-linux-x64/vendor/"
         "x86_64-unknown-linux-musl/bin/codex")


def new_key() -> str:
    return f"sk-proj-REAL{uuid.uuid4().hex}"


def commands(evs: list[dict]) -> list[dict]:
    """The commands codex ran, as its item.completed events tell them."""
    return [e["data"]["item"] for e in evs if e["type"] == "cli"
            and e["data"].get("type") == "item.completed"
            and e["data"]["item"].get("type") == "command_execution"]


def test_codex_writes_the_file_and_follows_up(http, alice, llm_mock, server, kept):
    """With codex's default model, which works in code mode: its one tool runs JavaScript (in
    a V8 host process of its own) that runs the command."""
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "/home/user/hello.txt",
                                                             "text": "hello from codex"}}],
                      final="The file is written.")
    # with the sandbox's internet off: codex needs nothing but its API, through the proxy
    vm = start(http, "codex", key, keep_after_task_seconds=120, internet=False)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"] == "The file is written." and t["error"] is None
    assert t["input_tokens"] > 0 and t["output_tokens"] > 0 and not t["key_passed_in"]
    assert alice.files.read_text(vm, "/home/user/hello.txt") == "hello from codex"
    evs = events(http, vm)
    [run] = commands(evs)
    assert "hello from codex" in run["command"] and run["exit_code"] == 0
    assert [e["data"]["type"] for e in evs if e["type"] == "cli"][-1] == "turn.completed"
    # the task's two turns and nothing else, through the proxy with the real key, counted
    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1/responses"] * 2
    assert {s["headers"].get("authorization") for s in seen} == {f"Bearer {key}"}
    assert t["llm_requests"] == len(seen)
    [call] = [i for i in seen[1]["body"]["input"] if i.get("type") == "custom_tool_call"]
    assert call["name"] == "exec" and "tools.exec_command" in call["input"]

    # a follow-up continues the conversation (codex exec resume --last)
    llm_mock.scenario(key, final="Still here.")
    r = http.post(f"/v1/sandboxes/{vm}/task", json={"task": "and then?"})
    assert r.status_code == 202, r.text
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "Still here.", t
    text = str(llm_mock.requests(key)[-1]["body"]["input"])
    assert "write the file" in text and "and then?" in text and "custom_tool_call_output" in text

    # nothing the CLI wrote (its sessions, logs, databases) holds the key
    assert search(alice, vm, key)[2] == 0
    assert key not in server.log_tail(10_000_000)


def test_codex_key_is_nowhere_in_the_sandbox_while_it_works(http, alice, llm_mock, server):
    """Caught mid-task (the mock holds its request), the CLI holds the placeholder, not the
    key; it reached the provider within seconds of the create, and leaves most of the standard
    template's 512 MiB to the task."""
    key = new_key()
    llm_mock.scenario(key, hang=True, hang_seconds=120)
    t0 = time.monotonic()
    vm = start(http, "codex", key)
    try:
        wait_for(lambda: llm_mock.requests(key), timeout=120, interval=0.1)
        assert time.monotonic() - t0 < 30
        env = alice.run(vm, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done "
                            "2>/dev/null | grep ^OPENAI_API_KEY= | head -1").stdout
        placeholder = env.strip().partition("=")[2]
        assert placeholder.startswith("sk-proj-") and "placeholder" in placeholder, env
        assert search(alice, vm, placeholder)[0] >= 1   # the search finds what is there
        assert search(alice, vm, key) == (0, 0, 0)
        assert key not in alice.run(vm, "env").stdout
        # its binary (300 MiB) is mapped from the image: 300 MiB more fit beside it
        fill = alice.run(vm, ["python3", "-c", "x = b'1' * (300 << 20); print(len(x) >> 20)"])
        assert fill.exit_code == 0 and fill.stdout.strip() == "300", fill
        procs = alice.run(vm, "ps -eo args=").stdout.splitlines()
        assert len([p for p in procs if p.startswith(CODEX)]) == 1, procs   # still working
        r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    finally:
        alice.kill(vm)
    assert key not in server.log_tail(10_000_000)


@pytest.mark.parametrize("model, path", [("gpt-5", "/v1/responses"),
                                         ("deepseek-chat", "/chat/completions")])
def test_own_agent_writes_the_file(http, alice, llm_mock, kept, model, path):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "notes/own.txt",
                                                             "text": "written by e2a"}}],
                      final="Done: {last}")
    vm = start(http, "e2a", key, model=model, keep_after_task_seconds=60)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"].startswith("Done: ") and t["llm_requests"] == 2
    assert t["input_tokens"] > 0 and t["output_tokens"] > 0
    assert t["vendor"] == ("openai" if model.startswith("gpt") else "deepseek")
    assert alice.files.read_text(vm, "/home/user/notes/own.txt") == "written by e2a"
    evs = events(http, vm)
    [call] = [e["data"] for e in evs if e["type"] == "tool_call"]
    assert call["name"] == "write_file" and call["arguments"]["content"] == "written by e2a"
    [result] = [e["data"] for e in evs if e["type"] == "tool_result"]
    assert result["id"] == call["id"] and not result["is_error"]
    deltas = "".join(e["data"]["text"] for e in evs if e["type"] == "message_delta")
    assert deltas == t["result"]   # the answer streamed
    seen = llm_mock.requests(key)
    assert [(s["path"], s["body"]["model"]) for s in seen] == [(path, model)] * 2
    assert {s["headers"].get("authorization") for s in seen} == {f"Bearer {key}"}
    assert key not in alice.run(vm, "env").stdout


INVALID = ("Incorrect API key provided: sk-proj-****1234. You can find your API key at "
           "https://platform.openai.com/account/api-keys.")


@pytest.mark.parametrize("agent, error", [
    ("codex", f"{INVALID} (401 Unauthorized)"),
    ("e2a", f"openai answered 401: {INVALID}"),
])
def test_refused_key_fails_in_the_providers_words(http, llm_mock, server, agent, error):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": INVALID})
    vm = start(http, agent, key)
    t = finished(http, vm)
    assert t["state"] == "failed", t
    assert t["error"] == error
    # codex tries a refused request again, 5 times (it retries every failed stream); e2a not
    assert len(llm_mock.requests(key)) == (6 if agent == "codex" else 1)
    assert key not in server.log_tail(10_000_000)


@pytest.mark.parametrize("agent", ["codex", "e2a"])
def test_429_is_retried_and_the_task_succeeds(http, llm_mock, agent):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, final="made it")
    # codex on gpt-5, whose tools are codex's own (no code mode)
    vm = start(http, agent, key, model="gpt-5")
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "made it", t
    assert len(llm_mock.requests(key)) == 2   # the 429, then the retry
    assert t["llm_requests"] == 2


def start(http, agent: str, key: str, task: str = "write the file", **fields) -> str:
    return agents.start(http, agent, key, task, own_model="gpt-5", **fields)
