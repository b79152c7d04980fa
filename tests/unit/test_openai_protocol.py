"""The OpenAI protocols: e2a's own providers (the Responses API for OpenAI, Chat Completions for
DeepSeek and OpenAI-compatible servers, both on the `openai` SDK) and the real codex CLI, each
against the mock of OpenAI's API (tests/llm_mock/openai.py) on this host. The same runs inside a
real sandbox, through the egress proxy, are in tests/e2e/test_agent_openai.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path

import openai
import pytest

from e2a.agents.clis.codex import Codex, provider_message
from e2a.agents.outcome import Outcome
from e2a.agents.own import providers
from e2a.agents.own.llm import AssistantTurn, ProviderError, ToolCall, ToolResult, \
    UserText
from e2a.agents.own.providers.openai import (ChatCompletionsProvider, OpenAIResponsesProvider,
                                             chat_messages)
from tests.unit.protocols import LOCAL, PNG, WRITE, agents_prefix, turn

WRITE_STEP = {"tool": "write", "args": {"path": "a.txt", "text": "hi"}}
INVALID = ("Incorrect API key provided: sk-proj-****1234. You can find your API key at "
           "https://platform.openai.com/account/api-keys.")


def new_key() -> str:
    return f"sk-proj-test-{uuid.uuid4().hex}"


def tool_round(make, llm_mock, key):
    """A tool call, then its result (text and an image) back and the streamed answer."""
    llm_mock.scenario(key, steps=[WRITE_STEP], final="Wrote it; the tool said: {last}")
    history = [UserText("write a.txt")]
    first, deltas = turn(make(), history)
    [call] = first.message.tool_calls
    assert (call.name, call.arguments) == ("write_file", {"path": "a.txt", "content": "hi"})
    assert call.id and not first.message.text and not deltas
    assert first.input_tokens > 0 and first.output_tokens > 0
    assert first.stop_reason == "tool_calls"
    history += [first.message, ToolResult(call.id, call.name, [
        {"type": "text", "text": "wrote 2 bytes"},
        {"type": "image", "media_type": "image/png", "data": PNG}])]
    p = make()
    second, deltas = turn(p, history)
    assert second.message.text == "Wrote it; the tool said: wrote 2 bytes"
    assert len(deltas) > 1 and "".join(deltas) == second.message.text  # streamed, in pieces
    assert not second.message.tool_calls
    assert p.requests == 1
    return first, second, llm_mock.requests(key)


# ---- the Responses API (OpenAI) ----------------------------------------------------------------

def responses(llm_mock, key, model="gpt-5", **kw) -> OpenAIResponsesProvider:
    return OpenAIResponsesProvider(model=model, key=key, base_url=llm_mock.url, policy=LOCAL,
                                   **kw)


def test_responses_tool_call_result_and_streamed_answer(llm_mock):
    key = new_key()
    first, second, seen = tool_round(lambda: responses(llm_mock, key), llm_mock, key)
    assert second.stop_reason == "completed"
    assert [s["path"] for s in seen] == ["/v1/responses"] * 2
    assert all(s["headers"]["authorization"] == f"Bearer {key}" for s in seen)
    body = seen[1]["body"]
    assert body["instructions"] == "You are a test." and body["stream"] is True
    assert body["store"] is False and body["include"] == ["reasoning.encrypted_content"]
    assert body["tools"][0]["name"] == "write_file" and body["tools"][0]["type"] == "function"
    # the model's reasoning went back encrypted, before its call (the mock refuses a call
    # without it), then the call's output with the image
    reasoning, call, output = body["input"][1:4]
    assert reasoning == first.message.raw[0] and reasoning["encrypted_content"]
    assert call["type"] == "function_call" and call["call_id"] == output["call_id"]
    assert output["type"] == "function_call_output"
    assert output["output"] == [{"type": "input_text", "text": "wrote 2 bytes"},
                                {"type": "input_image",
                                 "image_url": f"data:image/png;base64,{PNG}"}]


def test_responses_model_that_does_not_reason(llm_mock):
    """No encrypted reasoning is asked of a model without it (the API refuses that)."""
    key = new_key()
    llm_mock.scenario(key, final="plain")
    result, _ = turn(responses(llm_mock, key, model="gpt-4.1"), [UserText("hi")])
    assert result.message.text == "plain"
    [seen] = llm_mock.requests(key)
    assert "include" not in seen["body"]


def test_responses_refused_key_is_a_provider_error_not_retried(llm_mock):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": INVALID})
    p = responses(llm_mock, key)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert (err.value.status, str(err.value)) == (401, INVALID)
    assert p.requests == 1


@pytest.mark.parametrize("status", [429, 503])
def test_responses_retries_then_succeeds(llm_mock, status):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=status, final="after the retry")
    p = responses(llm_mock, key)
    t0 = time.monotonic()
    result, _ = turn(p, [UserText("hi")])
    assert result.message.text == "after the retry"
    assert p.requests == 2 == len(llm_mock.requests(key))
    assert time.monotonic() - t0 >= 0.2   # the SDK backed off (0.5 s less jitter), no hammering


def test_responses_gives_up_after_its_retries(llm_mock):
    key = new_key()
    llm_mock.scenario(key, fail_first=10, fail_status=500)
    p = responses(llm_mock, key, max_retries=1)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status == 500 and "server error" in str(err.value)
    assert p.requests == 2


def test_responses_unreachable_is_a_provider_error():
    p = OpenAIResponsesProvider(model="gpt-5", key="k", base_url="http://127.0.0.1:9",
                                policy=LOCAL, max_retries=0)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status is None and "could not be reached" in str(err.value)
    assert p.requests == 1


def test_responses_base_url_gets_its_version():
    for url in ("https://api.openai.com", "https://api.openai.com/v1/"):
        p = OpenAIResponsesProvider(model="gpt-5", key="k", base_url=url, policy=LOCAL)
        assert str(p._client.base_url) == "https://api.openai.com/v1/"
        asyncio.run(p.close())


# ---- Chat Completions (DeepSeek, OpenAI-compatible servers) -------------------------------------

def chat(llm_mock, key, model="deepseek-reasoner", base_url=None) -> ChatCompletionsProvider:
    return ChatCompletionsProvider(model=model, key=key, base_url=base_url or llm_mock.url,
                                   policy=LOCAL)


def test_chat_tool_call_result_and_streamed_answer(llm_mock):
    """DeepSeek's thinking model: its reasoning_content goes back with its tool call (the mock,
    like DeepSeek, refuses the call without it)."""
    key = new_key()
    first, second, seen = tool_round(lambda: chat(llm_mock, key), llm_mock, key)
    assert first.message.raw["reasoning_content"]
    assert second.stop_reason == "stop"
    assert [s["path"] for s in seen] == ["/chat/completions"] * 2   # where DeepSeek serves it
    assert all(s["headers"]["authorization"] == f"Bearer {key}" for s in seen)
    body = seen[1]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["name"] == "write_file"
    system, user, assistant, tool, images = body["messages"]
    assert system == {"role": "system", "content": "You are a test."}
    assert assistant["tool_calls"][0]["id"] == tool["tool_call_id"]
    assert assistant["reasoning_content"] == first.message.raw["reasoning_content"]
    assert tool["content"] == "wrote 2 bytes"
    # a tool message takes text alone: the image follows in a user message
    assert images["role"] == "user" and images["content"][1] == {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


def test_chat_compatible_server_at_its_v1(llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="compatible")
    p = providers.make("openai", "llama-3.3-70b", key, llm_mock.url + "/v1", policy=LOCAL,
                       compatible=True)
    assert isinstance(p, ChatCompletionsProvider) and p.vendor == "openai"
    result, deltas = turn(p, [UserText("hi")])
    assert result.message.text == "compatible" and "".join(deltas) == "compatible"
    assert result.input_tokens > 0 and result.output_tokens > 0
    [seen] = llm_mock.requests(key)
    assert seen["path"] == "/v1/chat/completions"
    assert "reasoning_content" not in json.dumps(seen["body"])


def test_chat_earlier_tasks_reasoning_is_not_sent_back():
    """DeepSeek wants the reasoning of the current task's tool calls, and not the older."""
    call = ToolCall("c1", "write_file", {})
    turn1 = AssistantTurn("", [call], {"reasoning_content": "old thoughts"})
    turn2 = AssistantTurn("", [ToolCall("c2", "write_file", {})], {"reasoning_content": "new"})
    result = ToolResult("c1", "write_file", [{"type": "text", "text": "no"}], is_error=True)
    messages = chat_messages("", [UserText("one"), turn1, result, AssistantTurn("ok"),
                                  UserText("two"), turn2])
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in assistants] == [None, None, "new"]
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "Error: no"}


def test_chat_refused_key_and_retry(llm_mock):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": "Authentication Fails, Your api key: "
                                                           "****1234 is invalid"})
    p = chat(llm_mock, key, model="deepseek-chat")
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status == 401 and "is invalid" in str(err.value) and p.vendor == "deepseek"
    assert p.requests == 1

    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=429, final="after the retry")
    p = chat(llm_mock, key, model="deepseek-chat")
    result, _ = turn(p, [UserText("hi")])
    assert result.message.text == "after the retry" and p.requests == 2


# ---- the mock's other answers, as the SDK reads them -------------------------------------------

def test_mock_answers_without_streaming_and_on_the_side(llm_mock):
    """What the providers do not use but a client may: whole answers, token counts, models."""
    key = new_key()
    llm_mock.scenario(key, steps=[WRITE_STEP], final="whole")
    client = openai.OpenAI(api_key=key, base_url=llm_mock.url + "/v1", max_retries=0)
    tool = {"type": "function", "name": "write_file", "parameters": WRITE.parameters}
    r = client.responses.create(model="gpt-5", input="write a.txt", tools=[tool], store=False,
                                include=["reasoning.encrypted_content"])
    reasoning, call = r.output
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    assert call.type == "function_call" and json.loads(call.arguments) == {"path": "a.txt",
                                                                          "content": "hi"}
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    r = client.responses.create(model="gpt-5", input=[
        {"role": "user", "content": "write a.txt"}, *(i.model_dump(exclude_none=True)
                                                      for i in r.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}])
    assert r.output_text == "whole" and r.status == "completed"

    c = client.chat.completions.create(model="gpt-4.1", messages=[
        {"role": "user", "content": "write a.txt"}], tools=[{"type": "function", "function": {
            "name": "write_file", "parameters": WRITE.parameters}}])
    [tc] = c.choices[0].message.tool_calls
    assert c.choices[0].finish_reason == "tool_calls" and tc.function.name == "write_file"
    assert c.usage.prompt_tokens > 0

    count = client.responses.input_tokens.count(model="gpt-5", input="hello there")
    assert count.input_tokens > 0
    assert "gpt-5" in [m.id for m in client.models.list()]
    assert client.models.retrieve("o3").id == "o3"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(api_key="sk-nobody", base_url=llm_mock.url + "/v1",
                      max_retries=0).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


# ---- codex, the real one, on this host ----------------------------------------------------------

CLI_PREFIX = agents_prefix(lambda p: Path(Codex(p).binary).is_file())
needs_cli = pytest.mark.skipif(CLI_PREFIX is None, reason=(
    "codex is not installed on this host: `npm install --prefix DIR @openai/codex@0.171.0`, "
    "then set E2A_AGENTS_PREFIX=DIR"))


def run_cli(llm_mock, key, tmp_path, task="write the file", model=None, follow_up=False):
    """codex as the runner starts it (launch's argv and env), with the mock as its API (where
    the egress proxy would be) and a home and working directory of its own; the outcome from
    its JSON events."""
    cli = Codex(CLI_PREFIX)
    launch = cli.launch(task=task, model=model, base_url=llm_mock.url, placeholder=key,
                        follow_up=follow_up)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", **launch.env, "HOME": str(home)}
    proc = subprocess.run(launch.argv, env=env, cwd=work, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    outcome, events = Outcome(), []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
            cli.event(events[-1], outcome)
    return proc, outcome, events


@needs_cli
@pytest.mark.parametrize("model", [None, "gpt-5"])
def test_cli_writes_the_file_and_answers(llm_mock, tmp_path, model):
    """Its default model works in code mode (one JavaScript `exec` tool calling the others);
    gpt-5 gets the tools themselves (exec_command)."""
    key = new_key()
    target = tmp_path / "work" / "hello.txt"
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": str(target),
                                                             "text": "hello from codex"}}],
                      final="The file is written.")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path, model=model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert target.read_text() == "hello from codex"
    assert outcome.succeeded and outcome.error is None
    assert outcome.result == "The file is written."
    assert outcome.input_tokens > 0 and outcome.output_tokens > 0
    [done] = [e["item"] for e in events if e["type"] == "item.completed"
              and e["item"]["type"] == "command_execution"]
    assert "hello from codex" in done["command"] and done["exit_code"] == 0
    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1/responses"] * 2   # nothing on the side
    assert all(s["headers"]["authorization"] == f"Bearer {key}" for s in seen)
    assert seen[0]["body"]["model"] == (model or seen[0]["body"]["model"])
    # e2a's settings hold: no analytics said to be on in what codex tells the API
    meta = json.loads(seen[0]["headers"]["x-codex-turn-metadata"])
    assert meta["analytics_enabled"] is False and meta["sandbox_mode"] == "danger-full-access"

    # a follow-up continues the conversation
    llm_mock.scenario(key, final="Still here.")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path, task="and then?", model=model,
                                    follow_up=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome.succeeded and outcome.result == "Still here."
    text = json.dumps(llm_mock.requests(key)[-1]["body"]["input"])
    assert "write the file" in text and "and then?" in text and "hello from codex" in text


@needs_cli
def test_cli_refused_key_fails_in_the_providers_words(llm_mock, tmp_path):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": INVALID})
    proc, outcome, events = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode != 0
    assert outcome.succeeded is False
    assert outcome.error == f"{INVALID} (401 Unauthorized)"
    assert events[-1]["type"] == "turn.failed"


@needs_cli
def test_cli_429_is_retried(llm_mock, tmp_path):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=429, final="after the retry")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome.succeeded and outcome.error is None and outcome.result == "after the retry"
    assert len(llm_mock.requests(key)) == 2
    assert any(e["type"] == "error" and "429" in e["message"] for e in events)


def test_cli_launch():
    launch = Codex().launch(task="-n do it; rm -rf '$HOME'", model="gpt-5-codex",
                            base_url="http://10.200.0.1:8334/openai/",
                            placeholder="sk-proj-e2a-x-placeholder", follow_up=False)
    argv = launch.argv
    assert argv[0] == ("/opt/e2a/agents/node_modules/@openai/codex-linux-x64/vendor/"
                       "x86_64-unknown-linux-musl/bin/codex")
    assert argv[1:3] == ["exec", "--json"]
    assert argv[-2:] == ["--", "-n do it; rm -rf '$HOME'"]   # an argument, never an option
    assert argv[argv.index("--model") + 1] == "gpt-5-codex"
    assert "--dangerously-bypass-approvals-and-sandbox" in argv
    assert ('model_providers.e2a={name = "OpenAI (through e2a)", base_url = '
            '"http://10.200.0.1:8334/openai/v1", env_key = "OPENAI_API_KEY", '
            'wire_api = "responses"}') in argv
    assert launch.env == {"HOME": "/home/user", "OPENAI_API_KEY": "sk-proj-e2a-x-placeholder",
                          "NO_COLOR": "1"}
    follow = Codex().launch(task="more", model=None, base_url="http://h/openai",
                            placeholder="p", follow_up=True).argv
    assert follow[1:4] == ["exec", "resume", "--last"] and "--model" not in follow


def test_cli_events_and_error_messages():
    said = ("unexpected status 401 Unauthorized: Incorrect API key provided: sk-***. See "
            "https://platform.openai.com/account/api-keys., url: http://10.200.0.1:8334/openai/"
            "v1/responses, request id: req_123")
    assert provider_message(said) == ("Incorrect API key provided: sk-***. See "
                                      "https://platform.openai.com/account/api-keys. "
                                      "(401 Unauthorized)")
    assert provider_message('unexpected status 400 Bad Request: {"error": {"message": "no"}}') \
        == "no (400 Bad Request)"
    assert provider_message("Connection failed: error sending request") == \
        "Connection failed: error sending request"
    outcome = Outcome()
    cli = Codex()
    for event in [
            {"type": "item.completed", "item": {"type": "agent_message", "text": "Let me look."}},
            {"type": "item.started", "item": {"type": "command_execution", "command": "ls"}},
            {"type": "error", "message": "Reconnecting... 1/5 (stream disconnected)"},
            {"type": "item.completed", "item": {"type": "agent_message", "text": "Done."}},
            {"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 2}}]:
        cli.event(event, outcome)
    assert outcome == Outcome(result="Done.", error=None, input_tokens=5, output_tokens=2,
                              succeeded=True)
    cli.event({"type": "turn.failed", "error": {"message": said}}, outcome)
    assert outcome.succeeded is False and outcome.error.endswith("(401 Unauthorized)")
