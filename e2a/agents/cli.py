"""A CLI agent (claude-code, codex, gemini-cli): how to start it non-interactively inside the
sandbox, and how to read its JSON events. The runner (tasks.py) runs the command through envd as
the sandbox's user in /home/user, stores each stdout line that parses as JSON as an event of
kind "cli", and hands it to `event` to fill in the outcome."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from e2a.agents.outcome import Outcome


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]     # added to the sandbox's environment for this command only


class CliAgent(ABC):
    name: str               # as the API names it: "claude-code"
    vendor: str             # whose API it calls: "anthropic" | "openai" | "google"
    model_prefixes: tuple[str, ...]   # what `model` must start with (E2A_API.md)

    def check_model(self, model: str | None) -> str | None:
        """None if fine, else the message of a 400."""
        if model is None or model.startswith(self.model_prefixes):
            return None
        wants = " or ".join(f"{p}…" for p in self.model_prefixes)
        return f"{self.name} takes models named {wants}, not {model!r}"

    @abstractmethod
    def launch(self, *, task: str, model: str | None, base_url: str, placeholder: str,
               follow_up: bool) -> Launch:
        """The command that runs the task to its end without asking anything. `base_url` is the
        egress proxy's URL for this vendor (e.g. http://10.200.0.1:8334/anthropic), to be given
        to the CLI as its API base; `placeholder` goes where the CLI reads its API key. A
        `follow_up` task continues the previous conversation where the CLI can."""

    @abstractmethod
    def event(self, obj: dict, outcome: Outcome) -> None:
        """Update `outcome` from one JSON event the CLI printed."""
