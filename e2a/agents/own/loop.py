"""e2a's own agent: the model is asked for a turn, the tools it calls run in the sandbox, their
results go back, until it answers without calling a tool (its answer is the task's result) or
runs out of steps. It runs on the host: the user's key goes to the provider and nowhere else.

Events (docs/agents.md): message_delta {text} as the model streams, message {text} for a
turn's whole text, tool_call {id, name, arguments}, tool_output {id, stream, text} while a
command runs, tool_result {id, name, output, is_error, images}.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from e2a.agents.outcome import Outcome
from e2a.agents.own.llm import (AssistantTurn, Message, Provider, ProviderError, ToolCall,
                                ToolResult, ToolSpec, UserText)
from e2a.agents.own.tools import RESULT_CHARS, Toolbox
from e2a.sandboxes.host import NotRunning, SandboxHost
from e2a.templates import recipes

log = logging.getLogger("e2a.agents.own")

DELTA_EVERY = 0.05   # seconds: text deltas go out in batches, not one event per token

SYSTEM = """You are an agent working on your own in a Linux sandbox (Debian, isolated by \
gVisor), as the unprivileged user `user`, in /home/user (relative paths are taken from there). \
Nobody answers questions while you work: carry the task out with your tools, check that it is \
done, then answer with your final message, which is the task's result.

Your tools: {tools}."""

TOOL_NOTES = {
    "shell": "shell (bash commands)",
    "read_file": "read_file, write_file, edit_file, list_files (files)",
    "browser": "browser (the sandbox's Chromium: navigate, click, type, read the page, "
               "screenshot)",
    "computer": "computer (the sandbox's desktop, with mouse, keyboard and screenshots)",
}


@dataclass
class OwnRun:
    sandbox_id: str
    template: str                     # decides the tools (tools.py)
    host: SandboxHost
    provider: Provider
    task: str
    emit: Callable[[str, dict], Awaitable[None]]
    system_prompt: str | None = None  # the caller's, after e2a's
    extra_tools: list[dict] = ()      # the caller's: {name, description, parameters, command}
    max_steps: int = 50               # model turns
    history: list[Message] = field(default_factory=list)  # kept across follow-up tasks
    display: tuple[int, int] | None = None
    # whether a person controls the sandbox's desktop through the live view (api/desktop.py)
    human_in_control: Callable[[str], bool] = lambda sid: False
    # filled in as the run goes (so a cancelled run's tokens still count); one of its own if None
    outcome: Outcome | None = None
    # a session's capability sets (tools.CAPABILITIES); None: every tool the template has
    capabilities: tuple[str, ...] | None = None


CANVAS = """Your canvas is /home/user/canvas: a person watches its index.html live (it \
reloads whenever a file there changes), so what you show goes there, with its assets."""


def system_prompt(specs: list[ToolSpec], extra: str | None, template: str = "") -> str:
    names = [s.name for s in specs]
    notes = [note for name, note in TOOL_NOTES.items() if name in names]
    notes += [s.name for s in specs if s.name not in TOOL_NOTES
              and s.name not in ("write_file", "edit_file", "list_files")]
    text = SYSTEM.format(tools="; ".join(notes) or "none")
    recipe = recipes.load(template) if template else None
    if recipe is not None and "canvas" in recipe.endpoints:
        text += "\n\n" + CANVAS
    return f"{text}\n\n{extra}" if extra else text


async def run(r: OwnRun) -> Outcome:
    """Work on `r.task` to the end. Raises nothing but CancelledError (a cancel or a timeout:
    a running command is killed on the way out)."""
    outcome = r.outcome if r.outcome is not None else Outcome()
    tools = Toolbox(r.host, r.sandbox_id, r.template, r.emit, list(r.extra_tools or ()),
                    r.display, r.human_in_control, r.capabilities)
    try:
        specs = await tools.specs()
        system = system_prompt(specs, r.system_prompt, r.template)
        r.history.append(UserText(r.task))
        for _ in range(r.max_steps):
            turn = await _model_turn(r, system, specs, outcome)
            if turn is None:
                return outcome
            if not turn.tool_calls:
                outcome.result, outcome.succeeded = turn.text, True
                return outcome
            for call in turn.tool_calls:  # in order: a later call may need an earlier one's work
                await _tool_call(r, tools, call)
        outcome.succeeded = False
        outcome.error = (f"the agent used all of its {r.max_steps} steps (max_steps) without "
                         "finishing the task")
        return outcome
    except NotRunning as exc:
        outcome.succeeded, outcome.error = False, f"the sandbox is not running any more ({exc})"
        return outcome
    except Exception as exc:  # a bug of ours: the task still ends, with the reason
        log.exception("the own agent failed in %s", r.sandbox_id)
        outcome.succeeded = False
        outcome.error = f"the agent failed: {type(exc).__name__}: {exc}"
        return outcome
    finally:
        await _answer_open_calls(r)
        await tools.close()


async def _model_turn(r: OwnRun, system: str, specs: list[ToolSpec],
                      outcome: Outcome) -> AssistantTurn | None:
    """One model turn, added to the history; None if the provider failed for good."""
    deltas = _Deltas(r.emit)
    try:
        turn = await r.provider.turn(system, r.history, specs, deltas.add)
    except ProviderError as exc:
        outcome.succeeded = False
        outcome.error = (f"{r.provider.vendor} answered {exc.status}: {exc}" if exc.status
                         else f"{r.provider.vendor}: {exc}")
        return None
    finally:
        await deltas.flush()
    outcome.input_tokens += turn.input_tokens
    outcome.output_tokens += turn.output_tokens
    message = turn.message
    r.history.append(message)
    if message.text:
        await r.emit("message", {"text": message.text})
    return message


async def _tool_call(r: OwnRun, tools: Toolbox, call: ToolCall) -> None:
    await r.emit("tool_call", {"id": call.id, "name": call.name, "arguments": call.arguments})
    out = await tools.call(call)
    r.history.append(ToolResult(call.id, call.name, out.parts(), out.is_error))
    await r.emit("tool_result", {"id": call.id, "name": call.name,
                                 "output": out.text[:RESULT_CHARS + 200],
                                 "is_error": out.is_error, "images": len(out.images)})


async def _answer_open_calls(r: OwnRun) -> None:
    """Every tool call of the last turn gets a result, even when the run stopped amid them (a
    cancel, a timeout): providers refuse a conversation with a call left unanswered, and a
    follow-up task continues this one."""
    history = r.history
    for i in range(len(history) - 1, -1, -1):
        if isinstance(history[i], AssistantTurn):
            answered = {m.call_id for m in history[i + 1:] if isinstance(m, ToolResult)}
            for call in history[i].tool_calls:
                if call.id not in answered:
                    text = "stopped before it finished: the task ended"
                    history.append(ToolResult(call.id, call.name,
                                              [{"type": "text", "text": text}], True))
                    await r.emit("tool_result", {"id": call.id, "name": call.name,
                                                 "output": text, "is_error": True, "images": 0})
            return


class _Deltas:
    """The model's streamed text as message_delta events, at most one per DELTA_EVERY."""

    def __init__(self, emit):
        self.emit, self.buf, self.last = emit, [], 0.0

    async def add(self, text: str) -> None:
        self.buf.append(text)
        if time.monotonic() - self.last >= DELTA_EVERY:
            await self.flush()

    async def flush(self) -> None:
        if self.buf:
            text, self.buf = "".join(self.buf), []
            self.last = time.monotonic()
            await self.emit("message_delta", {"text": text})

