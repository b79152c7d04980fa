"""Plain data objects returned by the SDK. Timestamps stay RFC 3339 strings, as the server sends them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any


def _from_dict(cls, data: dict[str, Any]):
    # Ignore keys this SDK version does not know, so a newer server does not break older clients.
    known = {f.name for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in data.items() if k in known})


class _Bound:
    """``obj.method(vm_id, ...)`` exposed as ``bound.method(...)``; works for sync and async clients alike."""

    def __init__(self, target: Any, vm_id: str):
        self._target, self._vm_id = target, vm_id

    def __getattr__(self, name: str):
        return functools.partial(getattr(self._target, name), self._vm_id)


@dataclass
class SandboxEvent:
    """One state transition of a sandbox (``GET /v1/sandboxes/{id}/events``)."""

    from_state: str | None
    to_state: str
    reason: str | None = None
    detail: str | None = None
    at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SandboxEvent":
        return _from_dict(cls, data)


@dataclass
class Sandbox:
    vm_id: str
    state: str = ""
    template: str = ""
    vcpu: int | None = None
    cpu_fraction: float | None = None
    memory_mib: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    internet: bool | None = None
    idle_timeout_seconds: int | None = None
    max_lifetime_seconds: int | None = None
    created_at: str | None = None
    expires_at: str | None = None
    destroyed_at: str | None = None
    # Why it ended: deleted, idle_timeout, max_lifetime, out_of_memory, crashed, server_restart,
    # create_failed, paused_expired.
    end_reason: str | None = None
    # The workspace mounted on /home/user, if the sandbox was created with one.
    workspace_id: str | None = None
    # Pause, resume, fork. What idleness does to it: "destroy" or "pause"; whether an exec, files or
    # port call resumes it when paused. The defaults are what a server without pause does.
    on_idle: str = "destroy"
    auto_resume: bool = False
    # While paused: since when, when it will be destroyed (end_reason paused_expired) unless
    # resumed, and the disk it holds (its writable layer and its checkpoint), in bytes.
    paused_at: str | None = None
    pause_expires_at: str | None = None
    disk_bytes: int | None = None
    # The vm_id of the sandbox this one was forked from.
    forked_from: str | None = None
    # The client that fetched this sandbox, so ``sb.run(...)`` works; an AsyncE2A makes these coroutines.
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], client: Any = None) -> "Sandbox":
        # A null where this SDK has a default (an older row, a server that does not know the
        # field yet) is the default, so ``sb.on_idle`` is always a str and ``auto_resume`` a bool.
        data = {k: v for k, v in data.items() if not (v is None and k in _SANDBOX_DEFAULTS)}
        sb = _from_dict(cls, data)
        sb._client = client
        return sb

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    # --- convenience: the client's per-sandbox methods, bound to this vm_id ---
    def _c(self):
        if self._client is None:
            raise RuntimeError("this Sandbox is not attached to a client")
        return self._client

    @property
    def files(self) -> Any:
        """``sb.files.read_bytes(path)`` == ``client.files.read_bytes(sb.vm_id, path)``."""
        return _Bound(self._c().files, self.vm_id)

    def run(self, *a, **kw): return self._c().run(self.vm_id, *a, **kw)  # noqa: E704
    def stream(self, *a, **kw): return self._c().stream(self.vm_id, *a, **kw)  # noqa: E704
    def run_background(self, *a, **kw): return self._c().run_background(self.vm_id, *a, **kw)  # noqa: E704
    def list_commands(self): return self._c().list_commands(self.vm_id)  # noqa: E704
    def reconnect(self, pid: int): return self._c().reconnect(self.vm_id, pid)  # noqa: E704
    def wait(self, pid: int, **kw): return self._c().wait(self.vm_id, pid, **kw)  # noqa: E704
    def send_stdin(self, *a, **kw): return self._c().send_stdin(self.vm_id, *a, **kw)  # noqa: E704
    def send_signal(self, *a, **kw): return self._c().send_signal(self.vm_id, *a, **kw)  # noqa: E704
    def logs(self): return self._c().logs(self.vm_id)  # noqa: E704
    # the agent's task (a sandbox created with ``agent=``)
    def task(self): return self._c().task(self.vm_id)  # noqa: E704
    def task_events(self, *a, **kw): return self._c().task_events(self.vm_id, *a, **kw)  # noqa: E704
    def iter_task_events(self, *a, **kw): return self._c().iter_task_events(self.vm_id, *a, **kw)  # noqa: E704
    def send_task(self, *a, **kw): return self._c().send_task(self.vm_id, *a, **kw)  # noqa: E704
    def cancel_task(self): return self._c().cancel_task(self.vm_id)  # noqa: E704
    def wait_task(self, *a, **kw): return self._c().wait_task(self.vm_id, *a, **kw)  # noqa: E704
    def keepalive(self): return self._c().keepalive(self.vm_id)  # noqa: E704
    def kill(self): return self._c().kill(self.vm_id)  # noqa: E704
    # pause, resume, fork: each returns fresh Sandbox objects (this one is not updated)
    def pause(self): return self._c().pause(self.vm_id)  # noqa: E704
    def resume(self): return self._c().resume(self.vm_id)  # noqa: E704
    def fork(self, count: int = 1): return self._c().fork(self.vm_id, count)  # noqa: E704

    # ``with client.create_sandbox() as sb:`` destroys the sandbox on exit (sync client only).
    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # ``async with await client.create_sandbox() as sb:`` for AsyncE2A.
    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.kill()


# Sandbox fields of pause whose default is not None: a null sent for one of them is that default.
_SANDBOX_DEFAULTS = {"on_idle", "auto_resume"}


@dataclass
class CommandEvent:
    """One NDJSON line of a command stream: ``start``, ``stdout``, ``stderr``, ``dropped``, ``exit``,
    or ``error`` (the stream stopped before the exit: ``code`` sandbox_ended with the sandbox's
    ``reason``, or stream_broken)."""

    type: str
    pid: int | None = None
    data: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool | None = None
    bytes: int | None = None
    code: str | None = None
    reason: str | None = None
    message: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CommandEvent":
        return _from_dict(cls, data)


@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    signal: str | None = None
    timed_out: bool = False
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class CommandInfo:
    pid: int
    cmd: str | None = None
    argv: list[str] | None = None
    user: str | None = None
    cwd: str | None = None
    background: bool = False
    started_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CommandInfo":
        return _from_dict(cls, data)


@dataclass
class FileEntry:
    name: str
    path: str
    type: str  # file, dir, symlink or other
    size: int = 0
    mode: str = ""  # octal string, e.g. "0644"
    mtime: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FileEntry":
        return _from_dict(cls, data)


@dataclass
class LogLine:
    ts: str
    source: str
    message: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LogLine":
        return _from_dict(cls, data)


# ---------------------------------------------------------------- workspaces


@dataclass
class Workspace:
    """A persistent /home/user (``GET /v1/workspaces/{id}``), chosen by (app, capability set,
    end user) for the API key's user."""

    workspace_id: str
    app_id: str = ""
    capset_id: str = ""
    end_user_id: str | None = None
    bytes_used: int = 0  # as last counted (``usage_at``); ``workspace_usage`` counts again
    file_count: int = 0
    usage_at: str | None = None
    created_at: str | None = None
    last_used_at: str | None = None
    mounted: bool = False  # a sandbox has it on /home/user now

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workspace":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class WorkspaceUsage:
    """``GET /v1/workspaces/{id}/usage``: counted in the store at the time of the call."""

    workspace_id: str
    bytes_used: int = 0
    file_count: int = 0
    user_bytes_used: int = 0  # all the caller's workspaces
    quota_bytes: int = 0      # the caller's storage quota, over all their workspaces

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkspaceUsage":
        return _from_dict(cls, data)


@dataclass
class WorkspaceFile:
    """One file of a workspace listing; ``path`` is relative to the workspace (= /home/user)."""

    path: str
    size: int = 0
    modified: str | None = None
    type: str = "file"  # file or symlink

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkspaceFile":
        return _from_dict(cls, data)


@dataclass
class PresignedUrl:
    """A URL that reads (GET) or writes (PUT) one workspace file without the API key, until
    ``expires_at``."""

    url: str
    method: str
    expires_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PresignedUrl":
        return _from_dict(cls, data)


# ---------------------------------------------------------------- agents


TASK_STATES_OVER = ("succeeded", "failed", "timed_out", "cancelled")


@dataclass
class Task:
    """An agent's task (``GET /v1/sandboxes/{id}/task``: the sandbox's latest).

    ``state``: starting, running, then succeeded, failed, timed_out or cancelled. ``result`` is the
    agent's final message, ``error`` why it did not succeed. Tokens are as the agent reports them
    (the key is the caller's: e2a bills nothing). ``key_passed_in`` is true only if the agent's CLI
    had to hold the key itself."""

    task_id: str
    agent: str = ""
    vendor: str = ""
    model: str | None = None
    state: str = ""
    started_at: str | None = None
    ended_at: str | None = None
    result: str | None = None
    error: str | None = None
    llm_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    key_passed_in: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def done(self) -> bool:
        """The task is over (whatever its outcome)."""
        return self.state in TASK_STATES_OVER

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"


@dataclass
class TaskEvent:
    """One event of an agent (``GET /v1/sandboxes/{id}/task/events``), numbered by ``seq`` from 1
    over all the sandbox's tasks. ``type``: task_started, task_finished; a CLI's own JSON events
    as ``cli`` (and its other lines as ``stdout``/``stderr``); e2a's own agent's message_delta,
    message, tool_call, tool_output and tool_result (docs/agents.md)."""

    seq: int
    task_id: str = ""
    type: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskEvent":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Tool:
    """A tool of the caller's for e2a's own agent (create's ``tools``): the model calls it with
    arguments matching ``parameters`` (JSON Schema); ``command`` runs in the sandbox (``bash -c``,
    as user) with those arguments as JSON on stdin, and its stdout is the result."""

    name: str
    command: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "parameters": self.parameters, "command": self.command}


# ---------------------------------------------------------------- agent sessions


@dataclass
class SessionTicket:
    """What a client of the session needs to connect: ``POST /v1/sessions`` (or ``.../token``).

    ``jwt`` is a credential for this one session (hand it to the end user's app, never log it):
    it is in no repr or str of this object; ``to_dict()`` leaves it out unless asked."""

    chat_session_id: str
    jwt: str = field(default="", repr=False)
    connect_url: str = ""
    expires_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionTicket":
        return _from_dict(cls, data)

    def to_dict(self, include_jwt: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not include_jwt:
            del d["jwt"]
        return d


@dataclass
class Session:
    """An agent session (``GET /v1/sessions/{id}``): one end user's conversation with an agent in
    a sandbox. ``state``: active or ended (then ``end_reason``: ttl_expired, deleted,
    sandbox_ended or server_restart). ``agent`` is ``{"kind", "version"}``, ``llm``
    ``{"vendor", "model"}`` (never a key), ``app`` ``{"id", "set_id", "capability_sets"}``,
    ``secrets`` the bundles' names, ``task`` the running or last task ``{"task_id", "state"}``,
    ``usage`` ``{"tasks", "llm_requests", "input_tokens", "output_tokens", "events", "seconds"}``."""

    chat_session_id: str
    state: str = ""
    user_id: str = ""
    agent: dict[str, Any] = field(default_factory=dict)
    template: str = ""
    llm: dict[str, Any] = field(default_factory=dict)
    app: dict[str, Any] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    vm_id: str | None = None
    workspace_id: str | None = None
    connected: bool = False  # a client is connected to its WebSocket now
    task: dict[str, Any] | None = None
    created_at: str | None = None
    expires_at: str | None = None
    ended_at: str | None = None
    end_reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Session":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass
class SessionReady:
    """The first message of a session's WebSocket: where the session stands. ``last_seq`` is the
    server's last event number; ``task`` the running or last task ``{"task_id", "state"}``."""

    chat_session_id: str = ""
    state: str = ""
    last_seq: int = 0
    expires_at: str | None = None
    task: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionReady":
        return _from_dict(cls, data)


@dataclass
class SessionEvent:
    """One numbered event of a session (``seq`` from 1 over all its tasks, each handed out once).
    ``type``: task_started, message_delta, message, tool_call, tool_output, tool_result, cli,
    stdout, stderr, task_finished or error; ``task_id`` is None for an event of no task."""

    seq: int
    type: str = ""
    task_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionEvent":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SecretBundle:
    """A named set of secret values kept by the server for sessions (``"secrets": [name]`` on
    create). Only the keys are ever returned: the values stay on the server."""

    name: str
    keys: list[str] = field(default_factory=list)
    version: int = 0
    created_at: str | None = None
    updated_at: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SecretBundle":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LoginCode:
    """``E2A.login``'s answer: the code is on its way to ``email`` (as the server keys accounts:
    verify with it), valid ``expires_in`` seconds."""

    email: str
    expires_in: int = 0
    message: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoginCode":
        return _from_dict(cls, data)


@dataclass
class LoginToken:
    """``E2A.verify_otp``'s answer: ``token`` is the login JWT that manages API keys and billing
    (``E2A(url, api_key=token)``), never sandboxes; it is short-lived."""

    token: str = field(repr=False)
    user_id: str = ""
    email: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoginToken":
        return _from_dict(cls, data)


@dataclass
class NewApiKey:
    """A key just made: ``key`` (e2a_live_...) is shown this once."""

    key_id: str
    key: str = field(repr=False, default="")
    prefix: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NewApiKey":
        return _from_dict(cls, data)


@dataclass
class ApiKey:
    """One of the account's API keys as listed: never the key itself."""

    key_id: str
    prefix: str = ""
    revoked: bool = False
    created_at: str | None = None
    plan_tier: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApiKey":
        return _from_dict(cls, data)


# ---------------------------------------------------------------- credits and billing


@dataclass
class AutoTopup:
    """Auto top-up's settings (``GET /v1/billing/auto-topup``): when the balance falls below
    ``threshold`` credits, the card saved by a checkout purchase is charged for
    ``credit_amount`` credits. ``last_failure`` is ``{"at", "message"}`` of the last charge that
    failed (no other is tried until the settings are saved again or credits are bought), or None."""

    enabled: bool = False
    threshold: int = 0
    credit_amount: int = 0
    payment_method_saved: bool = False
    last_failure: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoTopup":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Balance:
    """``GET /v1/billing/balance``: credits (1 credit = 1 US cent) as a float exact to 6 decimal
    places, the same in integer micro-credits, and auto top-up's settings. Below 0 only within
    the grace (docs/billing.md)."""

    credit_balance: float = 0.0
    credit_balance_micro: int = 0
    auto_topup: AutoTopup = field(default_factory=AutoTopup)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Balance":
        b = _from_dict(cls, data)
        if isinstance(b.auto_topup, dict):
            b.auto_topup = AutoTopup.from_dict(b.auto_topup)
        return b

    def to_dict(self) -> dict[str, Any]:
        return {"credit_balance": self.credit_balance, "credit_balance_micro": self.credit_balance_micro,
                "auto_topup": self.auto_topup.to_dict()}


@dataclass
class Transaction:
    """One entry of the account's ledger (``GET /v1/billing/transactions``), which is never
    changed. ``kind``: grant, purchase, usage, storage, adjustment, refund or topup_failed;
    ``amount`` in credits (negative for usage and storage, but for a charge given back),
    ``amount_micro`` the same exactly."""

    id: str
    amount: float = 0.0
    amount_micro: int = 0
    description: str = ""
    timestamp: str | None = None
    kind: str = ""
    sandbox_id: str | None = None
    workspace_id: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transaction":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class UsageItem:
    """One group of ``Usage``: ``key`` is the sandbox id, the template or the UTC day
    (YYYY-MM-DD), ``"workspaces"`` for storage when grouped by sandbox or template, and
    ``"total"`` for ``Usage.total``. Credits spent, and the vCPU-seconds, GiB-seconds and
    workspace GiB-hours behind them."""

    key: str = ""
    credits: float = 0.0
    vcpu_seconds: float = 0.0
    gib_seconds: float = 0.0
    workspace_gib_hours: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UsageItem":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Usage:
    """``GET /v1/usage``: what was spent over [``start``, ``end``) (the route's ``from`` and
    ``to``, UTC), grouped by ``group_by`` (sandbox, template or day), with the ``total`` and the
    ``rates`` (credits per vcpu_second, gib_second and workspace_gib_hour)."""

    start: str = ""
    end: str = ""
    group_by: str = ""
    items: list[UsageItem] = field(default_factory=list)
    total: UsageItem = field(default_factory=lambda: UsageItem(key="total"))
    rates: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Usage":
        return cls(start=data.get("from", ""), end=data.get("to", ""),
                   group_by=data.get("group_by", ""),
                   items=[UsageItem.from_dict(x) for x in data.get("items", [])],
                   total=UsageItem.from_dict({**data.get("total", {}), "key": "total"}),
                   rates=dict(data.get("rates", {})))

    def to_dict(self) -> dict[str, Any]:
        """As the route gives it (``from`` and ``to``)."""
        total = self.total.to_dict()
        del total["key"]
        return {"from": self.start, "to": self.end, "group_by": self.group_by,
                "items": [i.to_dict() for i in self.items], "total": total, "rates": dict(self.rates)}


@dataclass
class Checkout:
    """``POST /v1/billing/checkout``: the Stripe Checkout page to pay at; the credits arrive when
    Stripe tells e2a the payment succeeded (a ``purchase`` transaction)."""

    url: str
    purchase_id: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Checkout":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
