"""e2a's own agent's loop (e2a/agents/own/loop.py) with the real providers against the mock
LLM server (tests/llm_mock), on every protocol: final answers, streamed text, token counts,
tool errors going back to the model, the step limit, refusals, retries, follow-ups, cancel.

No sandbox here: the host is a real Manager with no sandbox running, so a tool that reaches for
the sandbox finds it gone. The tools at work in real sandboxes are in
tests/e2e/test_agent_own.py."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from e2a.agents.own import loop, providers
from e2a.agents.own.llm import AssistantTurn, ToolResult, UserText
from e2a.config import Settings
from e2a.sandboxes.manager import Manager
from tests.e2e.server import llm_mock
from tests.unit.protocols import LOCAL

pytestmark = pytest.mark.anyio

# (vendor, model, compatible): each protocol the mock speaks and a provider talks
PROTOCOLS = {
    "anthropic": ("anthropic", "claude-sonnet-4-6", False),
    "openai-responses": ("openai", "gpt-5", False),
    "chat-completions": ("openai", "some-local-model", True),
    "deepseek": ("deepseek", "deepseek-chat", False),
    "gemini": ("google", "gemini-2.5-pro", False),
}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def mock():
    return llm_mock()


@pytest.fixture
async def host(tmp_path):
    m = Manager(Settings(data_dir=tmp_path / "data", run_dir=tmp_path / "run"), None)
    yield m
    await m.http.close()
    await m.probe_http.close()


@pytest.fixture(params=list(PROTOCOLS))
def protocol(request):
    return request.param


class Agent:
    """One provider on one protocol, a fresh key (so a scenario of its own), and what the
    loop emitted."""

    def __init__(self, mock, host, protocol: str):
        self.mock, self.host = mock, host
        self.vendor, self.model, compatible = PROTOCOLS[protocol]
        self.key = f"sk-test-{uuid.uuid4().hex}"
        base = mock.url + "/v1" if compatible else mock.url
        self.provider = providers.make(self.vendor, self.model, self.key, base, policy=LOCAL,
                                       compatible=compatible)
        self.events: list[tuple[str, dict]] = []
        self.history: list = []

    async def emit(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))

    def scenario(self, **scenario) -> None:
        self.mock.scenario(self.key, **scenario)

    async def run(self, task: str = "do the task", **kw):
        r = loop.OwnRun(sandbox_id="sbx_notthere", template="standard", host=self.host,
                        provider=self.provider, task=task, emit=self.emit,
                        history=self.history, **kw)
        return await loop.run(r)

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]

    def sent(self) -> list[str]:
        """The bodies the mock got with this key, as JSON text."""
        return [json.dumps(r["body"]) for r in self.mock.requests(self.key)]


@pytest.fixture
async def agent(mock, host, protocol):
    a = Agent(mock, host, protocol)
    yield a
    await a.provider.close()


async def test_final_answer_is_the_result_streamed_and_counted(agent):
    agent.scenario(final="The answer is 42, as computed.")
    out = await agent.run("What is six times seven?")
    assert out.succeeded and out.error is None
    assert out.result == "The answer is 42, as computed."
    assert "".join(d["text"] for d in agent.of("message_delta")) == out.result
    assert agent.of("message") == [{"text": out.result}]
    assert out.input_tokens > 0 and out.output_tokens > 0
    assert agent.provider.requests == 1
    (body,) = agent.sent()
    assert "What is six times seven?" in body
    assert "/home/user" in body  # e2a's system prompt
    for tool in ("shell", "read_file", "write_file", "edit_file", "list_files"):
        assert f'"{tool}"' in body
    assert '"browser"' not in body and '"computer"' not in body  # not in a standard sandbox
    assert isinstance(agent.history[0], UserText)
    assert isinstance(agent.history[-1], AssistantTurn) and not agent.history[-1].tool_calls


async def test_failing_tool_calls_go_back_to_the_model(agent):
    """A tool that does not exist and a call without its arguments are error results the
    model reads; the run goes on to the model's answer."""
    agent.scenario(steps=[{"tool": "teleport", "args": {"where": "mars"}},
                          {"tool": "shell", "args": {"timeout_seconds": 5}}],
                   final="Last result: {last}")
    out = await agent.run()
    assert out.succeeded, out.error
    # (a protocol without an error flag on results says it in the text: "Error: ...")
    assert out.result.startswith("Last result: ")
    assert out.result.endswith("shell needs `command`")
    calls, results = agent.of("tool_call"), agent.of("tool_result")
    assert [c["name"] for c in calls] == ["teleport", "shell"]
    assert calls[0]["arguments"] == {"where": "mars"}
    assert [r["id"] for r in results] == [c["id"] for c in calls]
    assert all(r["is_error"] for r in results)
    assert "no tool named 'teleport'" in results[0]["output"]
    assert agent.provider.requests == 3
    # the model was told: the second request carries the first error
    assert "no tool named" in agent.sent()[1]
    results_kept = [m for m in agent.history if isinstance(m, ToolResult)]
    assert [m.is_error for m in results_kept] == [True, True]


async def test_step_limit_fails_the_run(agent):
    agent.scenario(steps=[{"tool": "teleport", "args": {}}] * 10)
    out = await agent.run(max_steps=3)
    assert out.succeeded is False and out.result is None
    assert "3 steps" in out.error and "max_steps" in out.error
    assert agent.provider.requests == 3
    assert len(agent.of("tool_result")) == 3


async def test_refusal_fails_with_the_providers_words(agent):
    agent.scenario(error={"status": 401, "message": "invalid x-api-key: mock says no"})
    out = await agent.run()
    assert out.succeeded is False
    assert "invalid x-api-key: mock says no" in out.error and "401" in out.error
    assert agent.provider.requests == 1  # a 401 is not retried


async def test_rate_limit_then_success_is_retried(agent):
    agent.scenario(fail_first=2, fail_status=429, final="made it")
    out = await agent.run()
    assert out.succeeded and out.result == "made it"
    assert agent.provider.requests == 3


async def test_follow_up_continues_the_conversation(agent):
    agent.scenario(steps=[{"tool": "teleport", "args": {}}], final="first answer")
    assert (await agent.run("first task")).result == "first answer"
    # the mock counts tool results in the conversation: the first run's one is already there
    out = await agent.run("second task")
    assert out.succeeded and out.result == "first answer"
    last = agent.sent()[-1]
    for said in ("first task", "no tool named", "first answer", "second task"):
        assert said in last
    assert [type(m).__name__ for m in agent.history] == [
        "UserText", "AssistantTurn", "ToolResult", "AssistantTurn", "UserText", "AssistantTurn"]


async def test_caller_system_prompt_and_tools_reach_the_model(agent):
    agent.scenario(final="ok")
    tool = {"name": "lookup_price", "description": "Price of a product by its SKU.",
            "parameters": {"type": "object", "properties": {"sku": {"type": "string"}},
                           "required": ["sku"]},
            "command": "cat"}
    await agent.run(system_prompt="Always answer in French.", extra_tools=[tool])
    (body,) = agent.sent()
    assert "Always answer in French." in body and "/home/user" in body
    assert "lookup_price" in body and "Price of a product by its SKU." in body


async def test_cancel_while_the_model_answers(agent):
    agent.scenario(hang=True, hang_seconds=30)
    run = asyncio.create_task(agent.run())
    while not agent.mock.requests(agent.key):
        await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 5)


async def test_a_sandbox_that_is_gone_ends_the_run(agent):
    agent.scenario(steps=[{"tool": "shell", "args": {"command": "true"}}])
    out = await agent.run()
    assert out.succeeded is False and "not running" in out.error
    # the call that could not run is answered all the same, for a follow-up's sake
    assert isinstance(agent.history[-1], ToolResult) and agent.history[-1].is_error
    assert agent.of("tool_result")[-1]["is_error"]


async def test_system_prompt_names_the_templates_tools(host):
    """A browser sandbox's agent is told of its browser (no sandbox needed for the specs)."""
    from e2a.agents.own.tools import Toolbox

    async def emit(kind, data):
        pass
    specs = await Toolbox(host, "sbx_notthere", "browser", emit).specs()
    assert [s.name for s in specs] == ["shell", "read_file", "write_file", "edit_file",
                                       "list_files", "browser"]
    text = loop.system_prompt(specs, "Be brief.")
    assert "browser (the sandbox's Chromium" in text and text.endswith("\n\nBe brief.")
