"""e2a's own agent at work in real sandboxes, scripted by the mock LLM server (tests/llm_mock):
the shell streaming its output and timing out, the file tools, the caller's tools and system
prompt, the step limit, the browser reading a page on the tests' "internet", and computer use
typing into a terminal on the cua desktop."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import pytest

from tests.conftest import wait_for
from tests.e2e import agents
from tests.e2e.agents import events, finished, of


def new_key(vendor: str = "anthropic") -> str:
    return {"anthropic": "sk-ant-", "openai": "sk-", "google": "AIza"}[vendor] + uuid.uuid4().hex


def results_by_name(evs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in of(evs, "tool_result"):
        out.setdefault(d["name"], []).append(d)
    return out


def test_shell_streams_and_times_out_and_file_tools_work(http, alice, llm_mock, kept):
    key = new_key("anthropic")
    llm_mock.scenario(key, steps=[
        {"tool": "shell", "args": {"command": "for i in 1 2 3 4; do echo tick $i; sleep 0.5; "
                                              "done; echo to-stderr >&2"}},
        {"tool": "shell", "args": {"command": "sleep 60; echo never", "timeout_seconds": 1}},
        {"tool": "write", "args": {"path": "notes/plan.txt", "text": "alpha beta\nsecond line\n"}},
        {"tool": "edit_file", "args": {"path": "notes/plan.txt", "old": "beta", "new": "gamma"}},
        {"tool": "edit_file", "args": {"path": "notes/plan.txt", "old": "nowhere", "new": "x"}},
        {"tool": "list_files", "args": {"path": "notes"}},
        {"tool": "read_file", "args": {"path": "/home/user/notes/plan.txt", "offset": 1,
                                       "limit": 1}},
    ], final="First line: {last}")
    vm = start(http, "standard", key, keep_after_task_seconds=120)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"].startswith("First line: alpha gamma\n[lines 1-1 of 2")
    assert t["llm_requests"] == 8 and t["input_tokens"] > 0
    assert alice.files.read_text(vm, "/home/user/notes/plan.txt") == "alpha gamma\nsecond line\n"

    evs = events(http, vm)
    calls, results = of(evs, "tool_call"), of(evs, "tool_result")
    assert [c["name"] for c in calls] == ["shell", "shell", "write_file", "edit_file",
                                          "edit_file", "list_files", "read_file"]
    assert [r["id"] for r in results] == [c["id"] for c in calls]
    assert [r["is_error"] for r in results] == [False, True, False, False, True, False, False]
    # the first command's output came as it ran, a few events, not one per character
    first = calls[0]["id"]
    out = [e for e in evs if e["type"] == "tool_output" and e["data"]["id"] == first]
    text = "".join(e["data"]["text"] for e in out if e["data"]["stream"] == "stdout")
    assert text == "tick 1\ntick 2\ntick 3\ntick 4\n"
    assert any(e["data"] == {"id": first, "stream": "stderr", "text": "to-stderr\n"} for e in out)
    assert 2 <= len(out) <= 8
    at = [datetime.fromisoformat(e["at"]) for e in out]
    assert (at[-1] - at[0]).total_seconds() > 1.0  # streamed over the command's 2 s
    assert results[0]["output"].endswith("to-stderr\n[exit code 0]")
    assert "timed out after 1 s" in results[1]["output"]
    assert "occurs" in results[4]["output"] or "not in" in results[4]["output"]
    assert results[5]["output"] == "plan.txt  (24 bytes)"
    # the timed-out command was killed, not left running
    ps = alice.run(vm, "ps -eo args").stdout
    assert "sleep 60" not in ps
    # the mock got the real key
    assert {r["key"] for r in llm_mock.requests(key)} == {key}


def test_callers_tools_and_system_prompt(http, alice, llm_mock, kept):
    key = new_key("openai")
    tools = [
        {"name": "shout", "description": "Upper-cases a text.",
         "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                        "required": ["text"]},
         "command": "python3 -c 'import json, sys; print(json.load(sys.stdin)[\"text\"].upper())'"},
        {"name": "broken", "description": "Always fails.", "command": "echo it broke >&2; exit 3"},
    ]
    llm_mock.scenario(key, steps=[{"tool": "shout", "args": {"text": "hello there"}},
                                  {"tool": "broken", "args": {}}], final="done")
    vm = start(http, "standard", key, model="gpt-5", tools=tools,
               system_prompt="Answer like a pirate.", keep_after_task_seconds=60)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded" and t["result"] == "done", t
    res = results_by_name(events(http, vm))
    assert res["shout"][0] == {**res["shout"][0], "output": "HELLO THERE\n", "is_error": False}
    assert res["broken"][0]["is_error"]
    assert "it broke" in res["broken"][0]["output"] and "exit code 3" in res["broken"][0]["output"]
    first = llm_mock.requests(key)[0]
    assert first["path"] == "/v1/responses"
    assert "Answer like a pirate." in str(first["body"])
    assert "Upper-cases a text." in str(first["body"])


def test_step_limit_fails_the_task_and_ends_the_sandbox(http, alice, llm_mock):
    key = new_key("google")
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {"command": "echo step"}}] * 10)
    vm = start(http, "standard", key, max_steps=3)
    t = finished(http, vm)
    assert t["state"] == "failed" and t["result"] is None
    assert "3 steps" in t["error"] and "max_steps" in t["error"]
    assert t["llm_requests"] == 3
    wait_for(lambda: alice.get_sandbox(vm).state == "destroyed", timeout=60)
    assert alice.get_sandbox(vm).end_reason == "task_finished"


FORM = ("<!doctype html><title>form</title><input id=q><button id=go onclick=\"document."
        "getElementById('out').textContent = 'Hello, ' + document.getElementById('q').value\">"
        "Greet</button><p id=out></p><a href=two.html>to the next page</a>")


def test_browser_reads_a_page_on_the_internet_types_and_clicks(http, llm_mock, outside, kept):
    key = new_key("anthropic")
    llm_mock.scenario(key, steps=[
        {"tool": "browser", "args": {"action": "navigate", "url": f"http://{outside}/page.html"}},
        {"tool": "browser", "args": {"action": "screenshot"}},
        {"tool": "browser", "args": {"action": "read"}},
        {"tool": "write", "args": {"path": "form.html", "text": FORM}},
        {"tool": "write", "args": {"path": "two.html", "text": "<p>the second page</p>"}},
        {"tool": "browser", "args": {"action": "navigate", "url": "file:///home/user/form.html"}},
        {"tool": "browser", "args": {"action": "type", "selector": "#q", "text": "Ada"}},
        {"tool": "browser", "args": {"action": "click", "selector": "#go"}},
        {"tool": "browser", "args": {"action": "read"}},
        {"tool": "browser", "args": {"action": "click", "selector": "text=next page"}},
        {"tool": "browser", "args": {"action": "read"}},
    ], final="The page says: {last}")
    vm = start(http, "browser", key, task="What does the page say?",
               keep_after_task_seconds=60)
    kept.append(vm)
    t = finished(http, vm)
    assert t["state"] == "succeeded", t
    assert t["result"].startswith("The page says: URL: file:///home/user/two.html")
    assert t["result"].endswith("the second page")
    nav, shot, read, _, typed, clicked, read2, followed, _ = results_by_name(
        events(http, vm))["browser"]
    assert not nav["is_error"] and "title: 'outside'" in nav["output"]
    assert shot["images"] == 1 and not shot["is_error"]
    assert read["output"].startswith(f"URL: http://{outside}/page.html\nTitle: outside")
    assert "served outside" in read["output"]
    assert not typed["is_error"] and not clicked["is_error"]
    assert "Hello, Ada" in read2["output"]
    assert followed["output"].endswith("the page is now file:///home/user/two.html")


@pytest.mark.parametrize("vendor", ["anthropic", "openai", "google"])
def test_computer_use_types_into_a_terminal(http, alice, llm_mock, kept, vendor):
    """Anthropic's native computer tool for Claude, a function tool of the same actions for
    GPT and Gemini: the agent opens a terminal, clicks into it and types a command that writes a
    file."""
    key = new_key(vendor)
    word = f"typed-{vendor}"
    llm_mock.scenario(key, steps=[
        {"tool": "shell", "args": {"command": "(setsid xterm -T agentterm -geometry 80x20+40+40 "
                                              ">/dev/null 2>&1 &); sleep 3"}},
        {"tool": "computer", "args": {"action": "left_click", "coordinate": [300, 180]}},
        {"tool": "computer", "args": {"action": "type",
                                      "text": f"echo {word} > /home/user/cu.txt\n"}},
        {"tool": "shell", "args": {"command": "for i in $(seq 50); do test -s cu.txt && break; "
                                              "sleep 0.2; done; cat cu.txt"}},
    ], final="{last}")
    vm = start(http, "cua", key, keep_after_task_seconds=60)
    kept.append(vm)
    t = finished(http, vm, timeout=240)
    assert t["state"] == "succeeded", t
    assert t["result"].startswith(f"{word}\n")
    res = results_by_name(events(http, vm))["computer"]
    assert [r["is_error"] for r in res] == [False, False]
    assert [r["images"] for r in res] == [1, 1]  # each action shows the screen after it
    body = str(llm_mock.requests(key)[0]["body"])
    if vendor == "anthropic":
        assert "computer_20" in body and "1280" in body  # the native tool, with the screen size
    else:
        assert "left_click" in body  # the function tool's schema


def test_cancel_kills_the_running_command(http, alice, llm_mock, kept):
    key = new_key("openai")
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {
        "command": "echo started; sleep 300; echo never"}}])
    # DeepSeek: Chat Completions
    vm = start(http, "standard", key, llm={"vendor": "deepseek"}, keep_after_task_seconds=60)
    kept.append(vm)
    wait_for(lambda: any(e["type"] == "tool_output" for e in events(http, vm)), timeout=60)
    r = http.post(f"/v1/sandboxes/{vm}/task/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    res = of(events(http, vm), "tool_result")
    assert res and res[-1]["is_error"] and "stopped" in res[-1]["output"]
    time.sleep(0.5)
    assert "sleep 300" not in alice.run(vm, "ps -eo args").stdout
    assert llm_mock.requests(key)[0]["path"].endswith("/chat/completions")


def start(http, template: str, key: str, task: str = "do the task", **fields) -> str:
    return agents.start(http, "e2a", key, task, template=template, **fields)
