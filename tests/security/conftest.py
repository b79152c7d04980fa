"""Helpers of the security suite. Its fixtures (`server`, `alice`, `http`, `sandbox`, ...) are
the end-to-end suite's, in tests/conftest.py: one server per worker serves both suites (never
import them here: a second `server` fixture would start a second server under the same name)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse


NOBODY = 65534


def as_user(uid: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command on the host as an unprivileged local user (no groups)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *args], capture_output=True, text=True, timeout=timeout)


def envd_launch(server, vm_id: str) -> tuple[str, str]:
    """(envd's --listen address, its token), from the sandbox's OCI spec on the host: what a
    test needs to look for the token in what sandbox code could capture."""
    spec = json.loads((server.base / "data" / "sandboxes" / vm_id / "config.json").read_text())
    args, env = spec["process"]["args"], spec["process"]["env"]
    token = next(e.split("=", 1)[1] for e in env if e.startswith("E2A_ENVD_TOKEN="))
    return args[args.index("--listen") + 1], token


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(server, head: str, body_chunks=(), read_timeout: float = 60) -> tuple[int, bytes]:
    """Send `head` (request line and headers, without the blank line) and the body chunks over
    a plain socket; return the status and body of the answer."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=read_timeout) as s:
        s.sendall((head + "\r\n\r\n").encode())
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
        head_b, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_b.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            more = s.recv(65536)
            if not more:
                break
            rest += more
        return int(head_b.split()[1]), rest
