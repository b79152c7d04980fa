"""e2a's own agent: a tool-using loop run on the host, so the user's key never enters the
sandbox. `llm.py` is the provider-neutral conversation; `providers/` speak each vendor's API;
`tools.py` acts on the sandbox; `loop.py` runs the task."""
