"""Each sandbox's envd token, derived rather than stored: HMAC-SHA256(host key, sandbox id).

The database holds no token (a copy of it, a backup or a read-only SQL hole gives nothing), and
the host key is one 0600 file in the 0700 data directory. runsc still needs the token in the
sandbox's OCI spec (envd reads it from its environment); that file sits in the sandbox's own
0700 directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


class AgentKeys:
    def __init__(self, path: Path, key: str = ""):
        """`key` (the setting E2A_AGENT_KEY) when given; else the file at `path`, made once."""
        self.path = path
        self._key = key.encode() if key else self._load_or_create()

    @classmethod
    def of(cls, settings) -> AgentKeys:
        return cls(settings.data_dir / "agent.key", settings.agent_key)

    def _load_or_create(self) -> bytes:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = self.path.read_bytes()
            if len(key) < 32:
                raise RuntimeError(f"{self.path} is damaged: delete it only if no sandbox runs")
            os.chmod(self.path, 0o600)
            return key
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def token(self, sandbox_id: str) -> str:
        return hmac.new(self._key, sandbox_id.encode(), hashlib.sha256).hexdigest()

    def secret(self, purpose: str, sandbox_id: str, length: int = 32) -> str:
        """A per-sandbox secret for one purpose (e.g. a desktop's VNC password), derived like
        the token: the host and the API can both compute it, nothing stores it."""
        return hmac.new(self._key, f"{purpose}\0{sandbox_id}".encode(),
                        hashlib.sha256).hexdigest()[:length]

