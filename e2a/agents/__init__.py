"""Agents working on a task in a sandbox with the user's own LLM key (docs/agents.md).

- `tasks.py`: a sandbox's tasks, their state and numbered event feed (stored, live).
- `egress.py`: the host-side proxy the in-sandbox CLIs call instead of their provider: it swaps
  the sandbox's placeholder for the real key, so the key never enters the sandbox.
- `cli.py` and `clis/`: the CLI agents (claude-code, codex, gemini-cli), run inside the sandbox.
- `own/`: e2a's own agent, run on the host; its tools act on the sandbox through envd.
"""
