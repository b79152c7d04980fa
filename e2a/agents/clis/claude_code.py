"""claude-code (npm @anthropic-ai/claude-code, a native binary), run headless:

    claude -p --output-format stream-json --verbose --dangerously-skip-permissions
           [--model M] [--continue] -- TASK

`-p` runs the task to its end and exits; `stream-json` (which needs `--verbose`) prints one
JSON event a line: system/init, assistant (the model's content blocks: text, tool_use), user
(tool results), system/api_retry, and last result (the final text, is_error, usage, and the
API's status when the API failed); every tool call is allowed without asking (the sandbox is
the boundary). `--continue` picks up the last conversation in the working directory, which is
always /home/user. The task comes after `--`, so a task that starts with a dash stays a task.

Its key is ANTHROPIC_API_KEY and its API base ANTHROPIC_BASE_URL. CLAUDE_CODE_DISABLE_
NONESSENTIAL_TRAFFIC turns off everything it would send besides the task's own requests
(telemetry, error reports, feature flags, update checks, its connectivity probe of the API
base): with it, the model's requests are the only connections it opens (seen with strace), so
it works with the sandbox's internet off. IS_SANDBOX=1 says what is true: it is what lets
`--dangerously-skip-permissions` run if the agent ever runs as root.
"""

from __future__ import annotations

from e2a.agents.cli import CliAgent, Launch
from e2a.agents.outcome import Outcome

PREFIX = "/opt/e2a/agents"   # where the image installs the agent CLIs (templates/builder.py)


class ClaudeCode(CliAgent):
    name = "claude-code"
    vendor = "anthropic"
    model_prefixes = ("claude",)

    def __init__(self, prefix: str = PREFIX):
        self.binary = f"{prefix}/node_modules/@anthropic-ai/claude-code-linux-x64/claude"

    def launch(self, *, task: str, model: str | None, base_url: str, placeholder: str,
               follow_up: bool) -> Launch:
        argv = [self.binary, "-p", "--output-format", "stream-json", "--verbose",
                "--dangerously-skip-permissions"]
        if model:
            argv += ["--model", model]
        if follow_up:
            argv.append("--continue")
        return Launch(argv=[*argv, "--", task],
                      env={"HOME": "/home/user", "ANTHROPIC_API_KEY": placeholder,
                           "ANTHROPIC_BASE_URL": base_url.rstrip("/"),
                           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "IS_SANDBOX": "1"})

    def event(self, obj: dict, outcome: Outcome) -> None:
        if obj.get("type") != "result":
            return
        text = obj.get("result")
        outcome.input_tokens, outcome.output_tokens = tokens(obj)
        if obj.get("subtype") == "success" and not obj.get("is_error"):
            outcome.succeeded, outcome.result, outcome.error = True, text, None
            return
        outcome.succeeded = False
        # An API error's words are the result's text ("API Error: 400 <the API's message>");
        # other failures (error_max_turns, error_during_execution) list theirs in `errors`.
        error = str(text or "; ".join(map(str, obj.get("errors") or []))
                    or obj.get("subtype") or "claude-code failed")
        status = " ".join(str(obj[k]) for k in ("api_error_status", "api_error_type")
                          if obj.get(k))
        outcome.error = f"{error} ({status})" if status else error


def tokens(result: dict) -> tuple[int, int]:
    """(input, output) tokens of the whole run, every model it used (subagents and side
    requests too), cached input included: modelUsage; the main loop's usage if it is absent."""
    per_model = result.get("modelUsage") or {}
    if per_model:
        return (sum(int(m.get("inputTokens") or 0) + int(m.get("cacheReadInputTokens") or 0)
                    + int(m.get("cacheCreationInputTokens") or 0) for m in per_model.values()),
                sum(int(m.get("outputTokens") or 0) for m in per_model.values()))
    u = result.get("usage") or {}
    return (int(u.get("input_tokens") or 0) + int(u.get("cache_read_input_tokens") or 0)
            + int(u.get("cache_creation_input_tokens") or 0), int(u.get("output_tokens") or 0))
