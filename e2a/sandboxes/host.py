"""The two interfaces the API depends on, and nothing else of the sandbox machinery:

* a **catalog**: sandbox id → owner, node, state and the rest of its record (backed by the
  store; running sandboxes answered from memory, so the hot path makes no query);
* a **sandbox host**: create, destroy, list, open a connection to a sandbox's agent or to a
  port inside it. The API never sees an address, a token or a manager's dictionaries.

Today one in-process implementation stands behind both (sandboxes/manager.py). This is the seam
along which sandboxes will run on other machines: a remote host implements the same methods
over RPC, and the catalog's `node` says which host to ask.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import aiohttp

from e2a.sandboxes.states import EndReason
from e2a.workspaces.scope import Scope


class NoCapacity(Exception):
    """This host cannot take another sandbox now (409)."""


class UserLimit(Exception):
    """The user has as many sandboxes as one user may (E2A_MAX_SANDBOXES_PER_USER; 429)."""

    def __init__(self, cap: int):
        super().__init__(f"a user may have at most {cap} sandboxes at once (sessions' "
                         "included); end one first")


class Unavailable(Exception):
    """The runtime cannot start sandboxes at all: runsc, envd or the template image is
    missing (503)."""


class CreateFailed(Exception):
    """A create step failed; everything it made was removed again (503)."""


class Conflict(Exception):
    """The request conflicts with the state of something it names, e.g. a workspace being
    deleted (409)."""


class DeletedDuringCreate(Exception):
    """The sandbox was deleted while it was being created (409)."""


class NotRunning(Exception):
    """The sandbox exists but is not running, so nothing inside it can be reached (409)."""

    def __init__(self, sandbox_id: str, state: str):
        super().__init__(f"sandbox {sandbox_id} is {state}")
        self.state = state


class WrongState(Exception):
    """Pause, resume or fork asked of a sandbox in a state that does not allow it (409)."""

    def __init__(self, message: str, state: str):
        super().__init__(message)
        self.state = state


class NotForkable(Exception):
    """The sandbox cannot be forked (it has a workspace; 409)."""


class PauseFailed(Exception):
    """Saving or restoring a sandbox failed; it is left in the state it was in (503)."""


class Unreachable(Exception):
    """Nothing answered inside the sandbox (502)."""


class TooManyConnections(Exception):
    """The sandbox already has as many open connections as one sandbox may (429)."""


@dataclass
class SandboxRecord:
    """What the catalog knows of a sandbox; the API's answers are made from it."""

    id: str
    user_id: str | None
    node: str
    template: str
    state: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    internet: bool
    metadata: dict[str, str]
    idle_timeout_seconds: int
    max_lifetime_seconds: int
    created_at: datetime
    expires_at: datetime
    destroyed_at: datetime | None = None
    end_reason: str | None = None
    workspace_id: str | None = None
    on_idle: str = "destroy"
    auto_resume: bool = False
    paused_at: datetime | None = None
    pause_expires_at: datetime | None = None
    disk_bytes: int | None = None
    forked_from: str | None = None
    secrets_of: str | None = None  # not shown: whose per-sandbox secrets it holds (a fork's)


@dataclass
class SandboxEventRecord:
    from_state: str | None
    to_state: str
    reason: str | None
    detail: str | None
    at: datetime


@dataclass
class CreateSpec:
    user_id: str
    template: str
    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    idle_timeout: int = 60
    max_lifetime: int = 7200
    internet: bool = True
    params: dict[str, str] = field(default_factory=dict)  # the template's (e.g. resolution)
    workspace: Scope | None = None  # mounted on /home/user; None: the home is the sandbox's own
    on_idle: str = "destroy"  # or "pause"
    auto_resume: bool = False  # a call into it while paused resumes it


class Catalog(ABC):
    @abstractmethod
    async def get(self, sandbox_id: str) -> SandboxRecord | None: ...

    @abstractmethod
    async def list(self, user_id: str, state: str | None = None) -> list[SandboxRecord]: ...

    @abstractmethod
    async def events(self, sandbox_id: str) -> list[SandboxEventRecord]: ...


# What `Upstream.ended` says when the connection was cut because its sandbox was paused.
PAUSED = "paused"


class Upstream:
    """One open connection from the API into a sandbox (an HTTP answer being streamed, or a
    WebSocket). While it is open the sandbox counts as in use; when the sandbox dies the host
    closes it and sets `ended`, so the relay can tell its client why the stream stopped."""

    def __init__(self, sandbox_id: str, conn: Any, on_close):
        self.sandbox_id = sandbox_id
        self.conn = conn                    # aiohttp.ClientResponse or a websockets connection
        self.ended: EndReason | str | None = None  # why the host cut it (or PAUSED)
        self._aborted = asyncio.Event()
        self._on_close = on_close
        self._closed = False

    @property
    def response(self) -> aiohttp.ClientResponse:
        return self.conn

    async def abort(self, reason: EndReason | str) -> None:
        """The sandbox is going (or pausing): cut the connection so whoever reads it stops at
        once."""
        self.ended = reason
        self._aborted.set()
        conn = self.conn
        if isinstance(conn, aiohttp.ClientResponse):
            conn.close()
        else:
            # A WebSocket: drop the TCP connection, no closing handshake (a dead sandbox would
            # never answer it, and the teardown would wait out websockets' close timeout). The
            # relay then tells its client why, with a close 1011.
            conn.transport.abort()

    async def settle(self, timeout: float = 2.0) -> EndReason | None:
        """After the connection broke on its own: wait briefly for the host to say whether the
        sandbox died (a dying sandbox's socket often breaks a moment before its death is
        handled), and return that reason, if any."""
        try:
            await asyncio.wait_for(self._aborted.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.ended

    def close(self) -> None:
        """Done with it: a fully read answer's connection goes back to the pool, any other is
        closed (never left half-read in the pool, never left open)."""
        if self._closed:
            return
        self._closed = True
        conn = self.conn
        if isinstance(conn, aiohttp.ClientResponse):
            if conn.content.at_eof():
                conn.release()
            else:
                conn.close()
        self._on_close(self)


class SandboxHost(ABC):
    node: str

    @abstractmethod
    async def create(self, spec: CreateSpec) -> SandboxRecord: ...

    @abstractmethod
    async def destroy(self, sandbox_id: str, reason: EndReason) -> None: ...

    @abstractmethod
    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Save a running sandbox to disk and free its CPU and memory (docs/pause.md)."""

    @abstractmethod
    async def resume(self, sandbox_id: str, wake: bool = False) -> SandboxRecord:
        """Bring a paused sandbox back, processes and all. `wake`: for a call into a sandbox
        created with auto_resume, one that runs already is no error."""

    @abstractmethod
    async def fork(self, sandbox_id: str, count: int) -> list[SandboxRecord]:
        """`count` new sandboxes restored from one checkpoint of a running one."""

    @abstractmethod
    def list(self) -> list[str]:
        """Ids of the sandboxes this host runs (or is creating or stopping)."""

    @abstractmethod
    def touch(self, sandbox_id: str) -> None:
        """Count activity against the idle timeout."""

    @abstractmethod
    async def agent_request(self, sandbox_id: str, method: str, path: str,
                            **kwargs: Any) -> Upstream:
        """An HTTP request to the sandbox's agent; the answer is returned unread."""

    @abstractmethod
    async def agent_websocket(self, sandbox_id: str, path: str,
                              max_size: int = 4 * 1024 * 1024) -> Upstream:
        """A WebSocket to envd; `max_size` bounds one message from the sandbox."""

    @abstractmethod
    async def port_request(self, sandbox_id: str, port: int, method: str, target: str,
                           **kwargs: Any) -> Upstream:
        """An HTTP request to `port` inside the sandbox (`target` = path and query)."""

    @abstractmethod
    async def port_websocket(self, sandbox_id: str, port: int, target: str) -> Upstream: ...

    @abstractmethod
    async def logs(self, sandbox_id: str) -> list[dict]:
        """The host's lines about the sandbox and, while it runs, its agent's."""

    @abstractmethod
    def addresses(self, sandbox_id: str) -> tuple[str, str]:
        """(host side, sandbox side) of the running sandbox's link; NotRunning if it is not."""

    @abstractmethod
    def on_stop(self, listener: Callable[[str, EndReason], None]) -> None:
        """Call `listener(sandbox_id, reason)` when a sandbox starts stopping, whatever the
        reason (the agents' tasks end with their sandbox)."""

    def pool_sizes(self) -> dict[str, int]:
        return {}

    def replica_key(self) -> int | None:
        """The key that rows this process works on name, where several processes (replicas)
        share the store; None where this process is the only one."""
        return None

    async def replica_gone(self, key: int | None) -> bool:
        """Whether the process whose rows name `key` has stopped (with one process: any other
        is one that ran before this one)."""
        return key != self.replica_key() or key is None

    async def replica_alive_now(self, key: int | None) -> bool:
        """Whether another process (replica) with this key runs at this moment (with one
        process: never)."""
        return False

