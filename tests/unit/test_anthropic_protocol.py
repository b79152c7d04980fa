"""The Anthropic protocol: e2a's own provider (the `anthropic` SDK) and the real claude-code,
each against the mock of Anthropic's API (tests/llm_mock/anthropic.py) on this host. The same
runs inside a real sandbox, through the egress proxy, are in tests/e2e/test_agent_anthropic.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path

import anthropic
import pytest

from e2a.agents.clis.claude_code import ClaudeCode
from e2a.agents.outcome import Outcome
from e2a.agents.own.llm import (AssistantTurn, ProviderError, ToolCall, ToolResult,
                                UserText)
from e2a.agents.own.providers.anthropic import (AnthropicProvider, api_root,
                                                computer_tool_version)
from e2a.agents.own.tools import computer_spec
from tests.unit.protocols import LOCAL, PNG, WRITE, agents_prefix, turn


def new_key() -> str:
    return f"sk-ant-api03-test-{uuid.uuid4().hex}"


def provider(llm_mock, key, model="claude-sonnet-5-5", **kw) -> AnthropicProvider:
    return AnthropicProvider(model=model, key=key, base_url=llm_mock.url, policy=LOCAL,
                             **kw)


# ---- e2a's own provider ------------------------------------------------------------------------

def test_provider_tool_call_result_and_streamed_answer(llm_mock):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "a.txt", "text": "hi"}}],
                      final="Wrote it; the tool said: {last}")
    history = [UserText("write a.txt")]
    first, deltas = turn(provider(llm_mock, key), history)
    [call] = first.message.tool_calls
    assert (call.name, call.arguments) == ("write_file", {"path": "a.txt", "content": "hi"})
    assert call.id.startswith("toolu_") and not first.message.text and not deltas
    assert first.stop_reason == "tool_use"
    assert first.input_tokens > 0 and first.output_tokens > 0

    history += [first.message, ToolResult(call.id, call.name, [
        {"type": "text", "text": "wrote 2 bytes"},
        {"type": "image", "media_type": "image/png", "data": PNG}])]
    p = provider(llm_mock, key)
    second, deltas = turn(p, history)
    assert second.message.text == "Wrote it; the tool said: wrote 2 bytes"
    assert len(deltas) > 1 and "".join(deltas) == second.message.text   # streamed, in pieces
    assert not second.message.tool_calls and second.stop_reason == "end_turn"
    assert p.requests == 1

    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1/messages"] * 2
    # this SDK sends the key as a bearer token (claude-code in x-api-key): the API takes both
    assert all(s["headers"]["authorization"] == f"Bearer {key}" and s["key"] == key
               and s["headers"]["anthropic-version"] for s in seen)
    body = seen[1]["body"]
    assert body["stream"] is True and body["model"] == "claude-sonnet-5-5"
    assert body["system"] == [{"type": "text", "text": "You are a test.",
                               "cache_control": {"type": "ephemeral"}}]
    assert body["tools"][0]["input_schema"] == WRITE.parameters
    user, assistant, results = body["messages"]
    assert user == {"role": "user", "content": [{"type": "text", "text": "write a.txt"}]}
    assert assistant["content"] == [{"type": "tool_use", "id": call.id, "name": "write_file",
                                     "input": {"path": "a.txt", "content": "hi"}}]
    [result] = results["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.id
    assert result["content"] == [{"type": "text", "text": "wrote 2 bytes"}, {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]
    assert result["cache_control"] == {"type": "ephemeral"}   # the conversation is cached


def test_provider_follow_up_after_results_is_one_user_message(llm_mock):
    """Roles must alternate: the results of a turn and a follow-up's text go together, results
    first; an error result says so."""
    key = new_key()
    llm_mock.scenario(key, final="ok")
    history = [UserText("go"), AssistantTurn("let me", [ToolCall("toolu_1", "x", {})]),
               ToolResult("toolu_1", "x", [{"type": "text", "text": "cancelled"}], is_error=True),
               UserText("and then?")]
    result, _ = turn(provider(llm_mock, key), history)
    assert result.message.text == "ok"
    messages = llm_mock.requests(key)[0]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][0] == {"type": "text", "text": "let me"}
    results, text = messages[2]["content"]
    assert results["type"] == "tool_result" and results["is_error"] is True
    assert text["text"] == "and then?"


@pytest.mark.parametrize("model, kind, beta", [
    ("claude-haiku-4-5", "computer_20250124", "computer-use-2025-01-24"),
    ("claude-opus-4-6", "computer_20251124", "computer-use-2025-11-24"),
])
def test_provider_native_computer_tool(llm_mock, model, kind, beta):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "computer", "args": {"action": "left_click",
                                                                "coordinate": [100, 200]}}])
    p = provider(llm_mock, key, model=model)
    result, _ = turn(p, [UserText("click")], tools=(WRITE, computer_spec((1280, 800))))
    [call] = result.message.tool_calls
    assert (call.name, call.arguments) == ("computer", {"action": "left_click",
                                                        "coordinate": [100, 200]})
    [seen] = llm_mock.requests(key)
    assert seen["headers"]["anthropic-beta"] == beta
    native = seen["body"]["tools"][1]
    assert {k: v for k, v in native.items() if k != "cache_control"} == {
        "type": kind, "name": "computer", "display_width_px": 1280, "display_height_px": 800}


def test_computer_tool_versions():
    assert computer_tool_version("claude-sonnet-4-20250514")[0] == "computer_20250124"
    assert computer_tool_version("claude-haiku-4-5")[0] == "computer_20250124"
    assert computer_tool_version("claude-3-7-sonnet-latest")[0] == "computer_20250124"
    assert computer_tool_version("claude-opus-4-6")[0] == "computer_20251124"
    assert computer_tool_version("claude-sonnet-4-6")[0] == "computer_20251124"
    assert computer_tool_version("claude-opus-4-5-20251101")[0] == "computer_20251124"
    assert computer_tool_version("claude-sonnet-4-5-20250929")[0] == "computer_20250124"
    assert computer_tool_version("claude-opus-4-1")[0] == "computer_20250124"
    assert computer_tool_version("claude-fable-5-2")[0] == "computer_20251124"


def test_provider_refused_key_is_a_provider_error_not_retried(llm_mock):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": "invalid x-api-key"})
    p = provider(llm_mock, key)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert (str(err.value), err.value.status) == ("invalid x-api-key", 401)
    assert p.requests == 1


@pytest.mark.parametrize("status", [429, 529])
def test_provider_retries_then_succeeds(llm_mock, status):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=status, final="after the retry")
    p = provider(llm_mock, key)
    t0 = time.monotonic()
    result, _ = turn(p, [UserText("hi")])
    assert result.message.text == "after the retry"
    assert p.requests == 2 == len(llm_mock.requests(key))
    assert time.monotonic() - t0 >= 0.3   # the SDK backed off (0.5 s less jitter at first)


def test_provider_gives_up_after_its_retries(llm_mock):
    key = new_key()
    llm_mock.scenario(key, fail_first=10, fail_status=500)
    p = provider(llm_mock, key, max_retries=1)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status == 500 and "server error" in str(err.value)
    assert p.requests == 2


def test_provider_unreachable_is_a_provider_error():
    p = AnthropicProvider(model="claude-sonnet-5-5", key="k", base_url="http://127.0.0.1:9",
                          policy=LOCAL, max_retries=0)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status is None and "could not be reached" in str(err.value)
    assert p.requests == 1


def test_base_url_with_its_version():
    assert api_root("https://api.anthropic.com/") == "https://api.anthropic.com"
    assert api_root("https://gw.example.com/anthropic/v1") == "https://gw.example.com/anthropic"


def test_mock_non_streamed_answers_and_side_routes_parse_in_the_sdk(llm_mock):
    """What a client may call besides the streamed turn: a whole Message, token counting. The
    official SDK parses each, and knows the mock's errors by their type. (No model list: the
    CLI does not ask for one, and /v1/models is Gemini's path too.)"""
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "p", "text": "t"}}])

    async def go():
        async with anthropic.AsyncAnthropic(api_key=key, base_url=llm_mock.url,
                                            max_retries=0) as client:
            tools = [{"name": "Write", "description": "w", "input_schema": {
                "type": "object", "properties": {"file_path": {}, "content": {}}}}]
            msg = await client.messages.create(model="claude-haiku-4-5", max_tokens=100,
                                               tools=tools, messages=[
                                                   {"role": "user", "content": "go"}])
            count = await client.messages.count_tokens(
                model="claude-haiku-4-5", messages=[{"role": "user", "content": "go"}])
            side = await client.messages.create(model="claude-haiku-4-5", max_tokens=10,
                                                messages=[{"role": "user", "content": "name"}])
            try:
                await client.messages.create(model="m", max_tokens=1, messages=[
                    {"role": "user", "content": "x"}], extra_headers={"x-api-key": "other"})
            except anthropic.AuthenticationError as exc:
                refused = exc
            return msg, count, side, refused

    msg, count, side, refused = asyncio.run(go())
    [use] = msg.content
    assert (use.type, use.name, use.input) == ("tool_use", "Write",
                                               {"file_path": "p", "content": "t"})
    assert msg.stop_reason == "tool_use" and msg.usage.input_tokens > 0
    assert count.input_tokens > 0
    assert side.content[0].type == "text" and side.stop_reason == "end_turn"
    assert refused.status_code == 401 and refused.type == "authentication_error"
    # a side question (no tools) is not a step of the script
    assert len([s for s in llm_mock.requests(key) if s["path"] == "/v1/messages"]) == 2


# ---- claude-code, the real one, on this host ---------------------------------------------------

CLI_PREFIX = agents_prefix(lambda p: Path(ClaudeCode(p).binary).is_file())
needs_cli = pytest.mark.skipif(CLI_PREFIX is None, reason=(
    "claude-code is not installed on this host: `npm install --prefix DIR "
    "@anthropic-ai/claude-code@2.1.332`, then set E2A_AGENTS_PREFIX=DIR"))


def run_cli(llm_mock, key, tmp_path, task="write the file", follow_up=False):
    """claude-code as the runner starts it (launch's argv and env), with the mock as its API
    and a home and working directory of its own; the outcome from its JSON events."""
    cli = ClaudeCode(CLI_PREFIX)
    launch = cli.launch(task=task, model=None, base_url=llm_mock.url + "/", placeholder=key,
                        follow_up=follow_up)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", **launch.env, "HOME": str(home), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(launch.argv, env=env, cwd=work, capture_output=True, text=True,
                          timeout=60)
    outcome, events = Outcome(), []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
            cli.event(events[-1], outcome)
    return proc, outcome, events


@needs_cli
def test_cli_writes_the_file_and_answers(llm_mock, tmp_path):
    key = new_key()
    target = tmp_path / "work" / "hello.txt"
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": str(target),
                                                             "text": "hello from claude"}}],
                      final="The file is written.")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert target.read_text() == "hello from claude"
    assert outcome.succeeded and outcome.error is None
    assert outcome.result == "The file is written."
    assert outcome.input_tokens > 0 and outcome.output_tokens > 0
    [use] = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"]
             if b["type"] == "tool_use"]
    assert use["name"] == "Write" and use["input"]["content"] == "hello from claude"
    [init] = [e for e in events if e.get("subtype") == "init"]
    assert init["permissionMode"] == "bypassPermissions"
    assert init["apiKeySource"] == "ANTHROPIC_API_KEY"
    seen = llm_mock.requests(key)
    # the task's two turns and nothing else: no side requests, the key on each
    assert [s["path"] for s in seen] == ["/v1/messages"] * 2
    assert all(s["headers"]["x-api-key"] == key for s in seen)
    # the session is kept in the home for a follow-up, the key in no file of it
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file()
                and key.encode() in p.read_bytes()]

    # a follow-up continues the conversation
    llm_mock.scenario(key, final="Still here.")
    proc, outcome, _ = run_cli(llm_mock, key, tmp_path, task="-and then?", follow_up=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome.succeeded and outcome.result == "Still here."
    text = json.dumps(llm_mock.requests(key)[-1]["body"]["messages"])
    assert "write the file" in text and "-and then?" in text and "tool_result" in text


@needs_cli
@pytest.mark.parametrize("message, error", [
    # claude-code says this one of Anthropic's messages in its own words
    ("invalid x-api-key", "Invalid API key · Fix external API key (401 authentication_error)"),
    ("Your API key has been disabled.", "Failed to authenticate. API Error: 401 Your API key "
                                        "has been disabled. (401 authentication_error)"),
])
def test_cli_refused_key_fails_at_once(llm_mock, tmp_path, message, error):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": message})
    proc, outcome, _ = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode != 0
    assert outcome.succeeded is False and outcome.error == error
    assert len(llm_mock.requests(key)) == 1   # the API said not to retry: no retries


@needs_cli
def test_cli_retries_a_429(llm_mock, tmp_path):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=429, final="after the retry")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome.succeeded and outcome.result == "after the retry"
    [retry] = [e for e in events if e.get("subtype") == "api_retry"]
    assert retry["error_status"] == 429
    assert len(llm_mock.requests(key)) == 2


def test_cli_launch():
    launch = ClaudeCode().launch(task="--help; rm -rf '$HOME'", model="claude-opus-4-5",
                                 base_url="http://10.200.0.1:8334/anthropic/",
                                 placeholder="sk-ant-api03-e2a-x-placeholder", follow_up=True)
    assert launch.argv[0] == ("/opt/e2a/agents/node_modules/@anthropic-ai/claude-code-linux-x64/"
                              "claude")
    assert launch.argv[-2:] == ["--", "--help; rm -rf '$HOME'"]   # an argument, not an option
    assert launch.argv[launch.argv.index("--model") + 1] == "claude-opus-4-5"
    assert {"-p", "--continue", "--dangerously-skip-permissions", "--verbose"} <= set(launch.argv)
    assert launch.argv[launch.argv.index("--output-format") + 1] == "stream-json"
    assert launch.env["ANTHROPIC_API_KEY"] == "sk-ant-api03-e2a-x-placeholder"
    assert launch.env["ANTHROPIC_BASE_URL"] == "http://10.200.0.1:8334/anthropic"
    assert launch.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert launch.env["HOME"] == "/home/user"
    fresh = ClaudeCode().launch(task="t", model=None, base_url="http://h/anthropic",
                                placeholder="p", follow_up=False)
    assert "--continue" not in fresh.argv and "--model" not in fresh.argv


def test_cli_events():
    cli = ClaudeCode()
    outcome = Outcome()
    cli.event({"type": "assistant", "message": {"content": [{"type": "text", "text": "x"}]}},
              outcome)
    assert outcome.succeeded is None
    cli.event({"type": "result", "subtype": "success", "is_error": False, "result": "Done.",
               "usage": {"input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 2},
               "modelUsage": {"a": {"inputTokens": 7, "cacheReadInputTokens": 3,
                                    "cacheCreationInputTokens": 1, "outputTokens": 2},
                              "b": {"inputTokens": 1, "outputTokens": 1}}}, outcome)
    assert (outcome.succeeded, outcome.result, outcome.error) == (True, "Done.", None)
    assert (outcome.input_tokens, outcome.output_tokens) == (12, 3)
    outcome = Outcome()
    cli.event({"type": "result", "subtype": "error_max_turns", "is_error": True,
               "errors": ["Reached maximum number of turns (3)"],
               "usage": {"input_tokens": 5, "output_tokens": 2}}, outcome)
    assert outcome.succeeded is False
    assert outcome.error == "Reached maximum number of turns (3)"
    assert (outcome.input_tokens, outcome.output_tokens) == (5, 2)
