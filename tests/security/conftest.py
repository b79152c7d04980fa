"""Helpers of the security suite. Its fixtures (`server`, `alice`, `http`, `sandbox`, ...) are
the end-to-end suite's, in tests/conftest.py: one server per worker serves both suites (never
import them here: a second `server` fixture would start a second server under the same name)."""

from __future__ import annotations

import json


def envd_launch(server, vm_id: str) -> tuple[str, str]:
    """(envd's --listen address, its token), from the sandbox's OCI spec on the host: what a
    test needs to look for the token in what sandbox code could capture."""
    spec = json.loads((server.base / "data" / "sandboxes" / vm_id / "config.json").read_text())
    args, env = spec["process"]["args"], spec["process"]["env"]
    token = next(e.split("=", 1)[1] for e in env if e.startswith("E2A_ENVD_TOKEN="))
    return args[args.index("--listen") + 1], token
