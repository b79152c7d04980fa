"""codex (npm @openai/codex; its native binary is run directly, not through its Node.js
wrapper), run non-interactively:

    codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox
               -c model_provider=e2a -c model_providers.e2a={...} [-m M] -- TASK
    codex exec resume --last ... -- TASK                     (a follow-up)

`exec` runs the task to its end and exits; `--json` prints one JSON event a line: thread.started,
turn.started, item.started/item.completed (agent_message, reasoning, command_execution,
file_change, mcp_tool_call, web_search, todo_list, error), error (a retry, not fatal), and last
turn.completed (usage: the session's totals) or turn.failed (error). Every command runs without
asking, outside codex's own confinement (Landlock, bubblewrap): the sandbox is the boundary.
`resume --last` continues the newest session recorded under ~/.codex/sessions. The task comes
after `--`, so a task that starts with a dash stays a task; stdin is closed (envd closes it),
so codex adds nothing from it. Codex retries every failed request 5 times, a 401 too (~6 s).
Its default model works in "code mode": its one tool runs JavaScript in a V8 host process of
its own (codex-code-mode-host, ~80 MiB) that calls the other tools.

Codex reads its API base from its provider's definition alone (OPENAI_BASE_URL is no longer
read, 0.171.0, and the built-in `openai` provider cannot be redefined), so e2a defines its own
provider, "e2a": the Responses API at the egress proxy's /v1, the key from OPENAI_API_KEY. A
provider of one's own also keeps codex off the WebSocket transport it tries first with OpenAI.
Turned off, as they would call the internet without being asked to (seen with strace): usage
analytics (ab.chatgpt.com), the plugin catalogue (api.github.com, chatgpt.com), and the
retrying of a provider it cannot connect to "until the network is back", which with the
egress unreachable would hang the task until its timeout instead of failing in ~25 s.
"""

from __future__ import annotations

import json
import re

from e2a.agents.cli import CliAgent, Launch
from e2a.agents.outcome import Outcome

PREFIX = "/opt/e2a/agents"   # where the image installs the agent CLIs (templates/builder.py)
BINARY = "node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex"
# Items that are the agent acting (a tool), after which a message is no longer the final one.
ACTIONS = {"command_execution", "file_change", "mcp_tool_call", "web_search", "collab_tool_call"}
# "unexpected status 401 Unauthorized: <the provider's message>, url: ..., request id: ..."
STATUS = re.compile(r"^unexpected status (\d{3})(?: ([^:]*))?: (.*?)"
                    r"(?:, url: \S+?)?(?:, (?:cf-ray|request id): \S+)*$", re.S)


class Codex(CliAgent):
    name = "codex"
    vendor = "openai"
    model_prefixes = ("gpt-", "o")

    def __init__(self, prefix: str = PREFIX):
        self.binary = f"{prefix}/{BINARY}"

    def launch(self, *, task: str, model: str | None, base_url: str, placeholder: str,
               follow_up: bool) -> Launch:
        provider = {"name": "OpenAI (through e2a)", "base_url": base_url.rstrip("/") + "/v1",
                    "env_key": "OPENAI_API_KEY", "wire_api": "responses"}
        argv = [self.binary, "exec", *(["resume", "--last"] if follow_up else []),
                "--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
                "-c", "model_provider=e2a", "-c", f"model_providers.e2a={toml_table(provider)}",
                "-c", "analytics.enabled=false", "-c", "check_for_update_on_startup=false",
                "--disable", "plugins", "--disable", "unbounded_connection_retries"]
        if model:
            argv += ["--model", model]
        return Launch(argv=[*argv, "--", task],
                      env={"HOME": "/home/user", "OPENAI_API_KEY": placeholder,
                           "NO_COLOR": "1"})

    def event(self, obj: dict, outcome: Outcome) -> None:
        kind = obj.get("type")
        item = obj.get("item") or {}
        if kind == "item.completed" and item.get("type") == "agent_message":
            outcome.result = str(item.get("text") or "")
        elif kind == "item.started" and item.get("type") in ACTIONS:
            outcome.result = None   # the final message is the one after the last action
        elif kind == "error":
            outcome.error = provider_message(obj.get("message"))   # a retry: may pass
        elif kind == "turn.completed":
            usage = obj.get("usage") or {}
            # the session's totals: a follow-up's include the tasks before it
            outcome.input_tokens = int(usage.get("input_tokens") or 0)
            outcome.output_tokens = int(usage.get("output_tokens") or 0)
            outcome.succeeded, outcome.error = True, None
        elif kind == "turn.failed":
            outcome.succeeded = False
            outcome.error = provider_message((obj.get("error") or {}).get("message")) \
                or outcome.error or "codex failed"


def toml_table(values: dict[str, str]) -> str:
    """An inline TOML table (a JSON string is a valid TOML basic string)."""
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "}"


def provider_message(message) -> str | None:
    """The provider's own words out of codex's "unexpected status 401 Unauthorized: <message>,
    url: ..., request id: ..." as 'message (401 Unauthorized)'; other messages as they are."""
    if not message:
        return None
    text = str(message)
    m = STATUS.match(text)
    if m is None:
        return text
    code, reason, said = m.groups()
    status = f"{code} {reason}" if reason else code
    try:   # a body codex could not read the message out of comes whole
        err = json.loads(said).get("error", {})
        said = err.get("message") or said
    except (ValueError, AttributeError):
        pass
    return f"{said} ({status})"
