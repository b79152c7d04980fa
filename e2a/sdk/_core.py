"""Everything the sync and async clients share: configuration, the request shape of every API call,
response parsing and command-output collection. The clients only add the I/O."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from typing import Any, Callable
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx

from .errors import E2AError
from .models import (CommandEvent, CommandInfo, CommandResult, FileEntry, LogLine, PresignedUrl,
                     SandboxEvent, SecretBundle, Session, SessionTicket, Task, TaskEvent, Tool,
                     Workspace, WorkspaceFile, WorkspaceUsage)
from .models import ApiKey, LoginCode, LoginToken, NewApiKey
from .models import AutoTopup, Balance, Checkout, Transaction, Usage

DEFAULT_URL = "http://127.0.0.1:8080"
CHUNK = 1 << 20  # upload/download piece size: bounded memory whatever the file size

# Plain API calls are quick. Command streams last as long as the command, so they get no read
# timeout; file transfers allow long pauses (a big tar being built server-side) but not forever.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
STREAM_TIMEOUT = httpx.Timeout(None, connect=10.0)
TRANSFER_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def resolve_config(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """Fill base URL and API key from ``E2A_URL`` / ``E2A_API_KEY`` when not given."""
    base_url = (base_url or os.environ.get("E2A_URL") or DEFAULT_URL).rstrip("/")
    api_key = api_key or os.environ.get("E2A_API_KEY")
    if not api_key:
        raise E2AError(0, "missing_api_key", "no API key: set the E2A_API_KEY environment variable (or pass api_key=)")
    return base_url, api_key


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "e2a-python-sdk"}


def ws_url(base_url: str, path: str, params: dict[str, Any]) -> str:
    """http(s)://host/base + path?params  ->  ws(s)://host/base + path?params."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((scheme, parts.netloc, parts.path + path, query, ""))


def sandbox_id(sb: Any) -> str:
    """Methods take a vm_id or a Sandbox."""
    return sb if isinstance(sb, str) else sb.vm_id


@dataclass
class Call:
    """The shape of one request, and how to turn its JSON answer into a result."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    parse: Callable[[Any], Any] | None = None
    timeout: httpx.Timeout = field(default_factory=lambda: DEFAULT_TIMEOUT)
    binary: bool = False  # the answer is bytes (a PNG, a PDF), not JSON
    # Values of the body that must never be shown (an LLM key): cut from this call's repr and
    # from any error it raises (a proxy or a crashed server may echo the request body).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def result(self, resp: httpx.Response) -> Any:
        if self.binary:
            return resp.content
        data = resp.json() if resp.content else None  # 204s have no body
        return self.parse(data) if self.parse else data

    def __repr__(self) -> str:
        body = _redacted(self.json, self.secrets) if self.secrets else self.json
        return f"Call({self.method} {self.path}, params={self.params!r}, json={body!r})"

    def scrub(self, exc: E2AError) -> E2AError:
        """``exc`` with every secret of this call cut from its message."""
        for secret in self.secrets:
            if secret and secret in exc.message:
                exc.message = exc.message.replace(secret, REDACTED)
                exc.args = (f"{exc.code}: {exc.message}",)
        return exc


REDACTED = "***"


def _redacted(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` with every string equal to a secret replaced, at any depth (``llm.api_key``,
    a secret bundle's values)."""
    if isinstance(value, str):
        return REDACTED if value in secrets else value
    if isinstance(value, dict):
        return {k: _redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v, secrets) for v in value]
    return value


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    # Omitted fields take the server's defaults; sending null would be ambiguous.
    return {k: v for k, v in d.items() if v is not None}


def _sb(vm_id: str) -> str:
    return f"/v1/sandboxes/{vm_id}"


# ---------------------------------------------------------------- sandboxes


def create_sandbox(template: str, env_vars=None, metadata=None, idle_timeout_seconds=None,
                   max_lifetime_seconds=None, internet=None, resolution=None, workspace=None,
                   agent: dict[str, Any] | None = None, *, on_idle: str | None = None,
                   auto_resume: bool | None = None) -> Call:
    """``agent``: create's agent fields (agent, llm_key, task, model, llm, system_prompt, tools,
    max_steps, task_timeout_seconds, keep_after_task_seconds), None for those not given.
    ``on_idle`` ("destroy" or "pause") and ``auto_resume``: left out when None (the server's
    defaults, destroy and false), so that a server without pause takes the call as before."""
    if isinstance(workspace, dict):  # {"app_id": "a", "end_user_id": None}: None = the default
        workspace = _drop_none(workspace)
    body = _drop_none(dict(template=template, env_vars=env_vars, metadata=metadata,
                           idle_timeout_seconds=idle_timeout_seconds,
                           max_lifetime_seconds=max_lifetime_seconds, internet=internet,
                           resolution=resolution, workspace=workspace, on_idle=on_idle,
                           auto_resume=None if auto_resume is None else bool(auto_resume)))
    fields = _drop_none(agent or {})
    if isinstance(fields.get("llm"), dict):  # {"vendor": "openai", "model": None}: None = inferred
        fields["llm"] = _drop_none(fields["llm"])
    if "tools" in fields:
        fields["tools"] = [t.to_dict() if isinstance(t, Tool) else t for t in fields["tools"]]
    body.update(fields)
    key = fields.get("llm_key")
    return Call("POST", "/v1/sandboxes", json=body, secrets=(key,) if isinstance(key, str) and key else ())


def templates() -> Call:
    return Call("GET", "/v1/templates")


# ---------------------------------------------------------------- browser, desktop, canvas


def cdp_url(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/browser", parse=lambda d: d["cdp_url"])


def desktop_actions(vm_id: str, actions: list[dict] | dict) -> Call:
    listed = [actions] if isinstance(actions, dict) else list(actions)
    return Call("POST", _sb(vm_id) + "/desktop/actions", json={"actions": listed},
                parse=lambda d: d["results"])


def screenshot(vm_id: str, width: int | None = None) -> Call:
    return Call("GET", _sb(vm_id) + "/desktop/screenshot", params=_drop_none({"width": width}),
                binary=True)


def desktop_windows(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/desktop/windows")


def desktop_stream(vm_id: str, view_only: bool = True, ttl_seconds: int | None = None) -> Call:
    return Call("POST", _sb(vm_id) + "/desktop/stream",
                json=_drop_none({"view_only": view_only, "ttl_seconds": ttl_seconds}))


def canvas_view_url(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/canvas", parse=lambda d: d["view_url"])


def render_canvas(vm_id: str, path: str | None = None, html: str | None = None,
                  width: int | None = None, height: int | None = None, format: str = "png",
                  wait_ms: int | None = None) -> Call:
    body = _drop_none(dict(path=path, html=html, width=width, height=height, format=format,
                           wait_ms=wait_ms))
    return Call("POST", _sb(vm_id) + "/canvas/render", json=body, binary=True,
                timeout=httpx.Timeout(120.0, connect=10.0))


def list_sandboxes(state: str | None = None, metadata: dict[str, str] | None = None) -> Call:
    params = _drop_none({"state": state})
    params.update({f"metadata.{k}": v for k, v in (metadata or {}).items()})
    return Call("GET", "/v1/sandboxes", params=params)


def get_sandbox(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id))


def kill(vm_id: str) -> Call:
    return Call("DELETE", _sb(vm_id))


def keepalive(vm_id: str) -> Call:
    return Call("POST", _sb(vm_id) + "/keepalive")


# Pausing writes the sandbox's memory to disk and resuming reads it back; a fork copies it: seconds
# for a big sandbox on a busy host, so more than a plain call's minute before giving up.
CHECKPOINT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def pause(vm_id: str) -> Call:
    """The sandbox, paused (200), or 409 invalid_state if it is not running."""
    return Call("POST", _sb(vm_id) + "/pause", timeout=CHECKPOINT_TIMEOUT)


def resume(vm_id: str) -> Call:
    """The sandbox, running (200); 409 invalid_state if it is not paused, 503 resume_failed if the
    restore failed (it stays paused: a retry may work)."""
    return Call("POST", _sb(vm_id) + "/resume", timeout=CHECKPOINT_TIMEOUT)


def fork(vm_id: str, count: int = 1) -> Call:
    """``count`` new running sandboxes (201 ``{"sandboxes": [...]}``), each a copy of ``vm_id``'s
    memory and disk at this moment. The answer is the list of their dicts. The server bounds
    ``count`` (1 to 10 today) and says so in a 400 (invalid_field, field count); only what
    can never be a count stops here."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise E2AError(0, "invalid_count", f"count is a positive int, not {count!r}", "count")
    return Call("POST", _sb(vm_id) + "/fork", json={"count": count}, parse=lambda d: d["sandboxes"],
                timeout=CHECKPOINT_TIMEOUT)


def logs(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/logs", parse=lambda d: [LogLine.from_dict(x) for x in d["lines"]])


def events(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/events", parse=lambda d: [SandboxEvent.from_dict(x) for x in d["events"]])


# ---------------------------------------------------------------- commands


def command(vm_id: str, cmd: str | list[str] | None = None, *, argv: list[str] | None = None,
            env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
            stdin: str | bytes | None = None, keep_stdin: bool | None = None, timeout: float | None = None,
            background: bool = False) -> Call:
    """POST /commands. ``cmd`` may be a shell string or, for convenience, an argv list."""
    if isinstance(cmd, (list, tuple)):
        cmd, argv = None, list(cmd)
    if (cmd is None) == (argv is None):
        raise E2AError(0, "invalid_command", "give exactly one of cmd (a shell string) or argv (a list)", "cmd")
    if isinstance(stdin, bytes):
        stdin = stdin.decode()
    body = _drop_none(dict(cmd=cmd, argv=argv, env=env, cwd=cwd, user=user, stdin=stdin,
                           keep_stdin=keep_stdin or None, timeout=timeout, background=background or None))
    if background:
        return Call("POST", _sb(vm_id) + "/commands", json=body, parse=lambda d: int(d["pid"]))
    return Call("POST", _sb(vm_id) + "/commands", json=body, timeout=STREAM_TIMEOUT)


def reconnect(vm_id: str, pid: int) -> Call:
    return Call("GET", f"{_sb(vm_id)}/commands/{int(pid)}", timeout=STREAM_TIMEOUT)


def list_commands(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/commands",
                parse=lambda d: [CommandInfo.from_dict(x) for x in d["commands"]])


def send_stdin(vm_id: str, pid: int, data: str | bytes = "", eof: bool = False) -> Call:
    if isinstance(data, bytes):
        data = data.decode()
    return Call("POST", f"{_sb(vm_id)}/commands/{int(pid)}/stdin", json={"data": data, "eof": eof})


def send_signal(vm_id: str, pid: int, signal: str | int = "SIGTERM") -> Call:
    return Call("POST", f"{_sb(vm_id)}/commands/{int(pid)}/signal", json={"signal": signal})


def parse_event(line: str) -> CommandEvent | None:
    line = line.strip()
    return CommandEvent.from_dict(json.loads(line)) if line else None


class Collector:
    """Accumulates a command stream into a CommandResult, calling the output callbacks on the way.

    ``feed`` returns what the callback returned, so the async client can await coroutine callbacks.
    """

    def __init__(self, on_stdout: Callable | None = None, on_stderr: Callable | None = None):
        self._cb = {"stdout": on_stdout, "stderr": on_stderr}
        self._out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.pid: int | None = None
        self.exit: CommandEvent | None = None
        self.error: CommandEvent | None = None

    def feed(self, ev: CommandEvent) -> Any:
        if ev.type == "start":
            self.pid = ev.pid
        elif ev.type == "exit":
            self.exit = ev
        elif ev.type == "error":
            self.error = ev
        elif ev.type in self._out:
            self._out[ev.type].append(ev.data or "")
            cb = self._cb[ev.type]
            return cb(ev.data or "") if cb else None
        return None

    def result(self) -> CommandResult:
        if self.exit is None and self.error is not None:
            raise E2AError(0, self.error.code or "stream_error", self.error.message or "the stream failed")
        if self.exit is None:
            raise E2AError(0, "stream_ended", f"command stream ended before the exit event (pid {self.pid}); "
                                              "use reconnect() to resume it")
        return CommandResult(exit_code=int(self.exit.exit_code if self.exit.exit_code is not None else -1),
                             stdout="".join(self._out["stdout"]), stderr="".join(self._out["stderr"]),
                             signal=self.exit.signal, timed_out=bool(self.exit.timed_out), pid=self.pid)


# ---------------------------------------------------------------- agents: the task


def task(vm_id: str) -> Call:
    return Call("GET", _sb(vm_id) + "/task", parse=Task.from_dict)


def send_task(vm_id: str, text: str, model: str | None = None,
              task_timeout_seconds: int | None = None) -> Call:
    body = _drop_none({"task": text, "model": model, "task_timeout_seconds": task_timeout_seconds})
    return Call("POST", _sb(vm_id) + "/task", json=body, parse=Task.from_dict)


def cancel_task(vm_id: str) -> Call:
    return Call("POST", _sb(vm_id) + "/task/cancel", parse=Task.from_dict)


def task_events(vm_id: str, after: int = 0, limit: int = 500) -> Call:
    """One page: ``(events, next, done)``; pass ``next`` back as ``after`` to go on."""
    return Call("GET", _sb(vm_id) + "/task/events", params={"after": int(after), "limit": int(limit)},
                parse=lambda d: ([TaskEvent.from_dict(x) for x in d["events"]], int(d["next"]),
                                 bool(d["done"])))


def follow_task_events(vm_id: str, after: int, read_timeout: float | None = None) -> Call:
    """The live NDJSON feed from ``after``. Quiet while the agent thinks, so no read timeout
    unless a caller's deadline sets one."""
    timeout = STREAM_TIMEOUT if read_timeout is None else httpx.Timeout(
        10.0, connect=min(10.0, read_timeout), read=read_timeout)
    return Call("GET", _sb(vm_id) + "/task/events", params={"after": int(after), "follow": "true"},
                timeout=timeout)


# A follow stream that breaks is reopened from the last event seen, this many times in a row at
# most (any event received resets the count), waiting a little longer each time.
MAX_RECONNECTS = 8
RETRY_PAUSE = 0.2  # doubled on each failure in a row, up to 5 s
RETRY_STATUSES = (502, 503, 504)  # a proxy in front of e2a, or e2a restarting


class BrokenLine(Exception):
    """A follow stream ended in the middle of a line."""


class DeadlinePassed(Exception):
    """wait_task's deadline passed while following (turned into WaitTimeout by the client)."""


class WaitTimeout(E2AError, TimeoutError):
    """``wait_task`` gave up: the task was still going when its ``timeout`` ran out. The task goes
    on; ``task`` is how it was last seen."""

    def __init__(self, vm_id: str, task: Task | None, timeout: float | None):
        state = task.state if task else "unknown"
        name = f"task {task.task_id}" if task else "the task"
        super().__init__(0, "wait_timeout", f"{name} of sandbox {vm_id} is still {state} after "
                         f"{timeout:g} s; it goes on: wait again, or cancel it")
        self.task = task


class Follower:
    """Where a followed task event stream is: the last ``seq`` seen (each event is handed out
    once, even if a reconnect or the server repeats it), when to reconnect after a break and when
    to stop, and the caller's deadline if any. The clients only add the I/O."""

    def __init__(self, after: int = 0, deadline: float | None = None):
        self.after = int(after)
        self.deadline = deadline
        self.failures = 0

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed()
        return left

    def call(self, vm_id: str) -> Call:
        return follow_task_events(vm_id, self.after, self.remaining())

    def event(self, line: str) -> TaskEvent | None:
        """The line's event if it is a new one; None for a blank line or one seen before."""
        line = line.strip()
        if not line:
            return None
        try:
            ev = TaskEvent.from_dict(json.loads(line))
        except (ValueError, TypeError, AttributeError) as exc:  # cut short: broke mid-line
            raise BrokenLine(f"the event stream broke off in a line: {line[:80]!r}") from exc
        if ev.seq <= self.after:
            return None
        self.after, self.failures = ev.seq, 0
        return ev

    def retry_after(self, exc: BaseException) -> float:
        """The pause before reconnecting after ``exc``; raises it if it is not a broken connection
        (or breaks keep coming), DeadlinePassed if the deadline is gone."""
        if isinstance(exc, httpx.TimeoutException) and self.deadline is not None:
            self.remaining()  # a read timeout set by the deadline: raises once it has passed
        broken = isinstance(exc, (httpx.TransportError, BrokenLine)) or (
            isinstance(exc, E2AError) and exc.status in RETRY_STATUSES)
        self.failures += 1
        if not broken or self.failures > MAX_RECONNECTS:
            raise exc
        pause = min(RETRY_PAUSE * 2 ** (self.failures - 1), 5.0)
        left = self.remaining()
        return pause if left is None else min(pause, left)


class Waiter:
    """wait_task's reasoning, shared by both clients: which task is waited for, when its
    task_finished event has come, and what to return (the row, which the server updates just
    after that event, or the event's own account if the row lags)."""

    POLLS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0)  # after task_finished: asking for the row
    REFOLLOW = 0.5  # the stream ended before the task did (a proxy closed it?): follow on after

    def __init__(self, vm_id: str, timeout: float | None):
        self.vm_id = vm_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.task: Task | None = None    # the awaited task, as last seen
        self.finished: TaskEvent | None = None

    def seen(self, ev: TaskEvent) -> bool:
        """True once the awaited task's task_finished event is ``ev``."""
        if ev.type == "task_finished" and self.task is not None and (
                ev.task_id == self.task.task_id or ev.data.get("task_id") == self.task.task_id):
            self.finished = ev
            return True
        return False

    def settled(self, latest: Task) -> Task | None:
        """The final task from the latest row, or None if it is not over yet."""
        if self.task is not None and latest.task_id != self.task.task_id:
            # A newer task started: the awaited one is over; its own account is in the event.
            return self.from_event() if self.finished else None
        self.task = latest
        return latest if latest.done else None

    def from_event(self) -> Task:
        data = {k: v for k, v in self.finished.data.items() if k != "task_id"}
        known = {k: v for k, v in data.items() if k in Task.__dataclass_fields__}
        return replace(self.task, **{"ended_at": self.task.ended_at or self.finished.at, **known})

    def pause(self, step: float) -> float:
        return step if self.deadline is None else max(0.0, min(step, self.deadline - time.monotonic()))

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(self.vm_id, self.task, self.timeout)


# ---------------------------------------------------------------- files


def _path_params(path: str, **extra: Any) -> dict[str, Any]:
    return _drop_none({"path": path, **extra})


def read_file(vm_id: str, path: str) -> Call:
    return Call("GET", _sb(vm_id) + "/files", params=_path_params(path), timeout=TRANSFER_TIMEOUT)


def write_file(vm_id: str, path: str, mode: str | int | None = None, user: str | None = None) -> Call:
    if isinstance(mode, int):
        mode = f"{mode:04o}"  # 0o644 -> "0644", the form the server expects
    return Call("PUT", _sb(vm_id) + "/files", params=_path_params(path, mode=mode, user=user),
                timeout=TRANSFER_TIMEOUT)


def list_files(vm_id: str, path: str = ".") -> Call:
    return Call("GET", _sb(vm_id) + "/files/list", params=_path_params(path),
                parse=lambda d: [FileEntry.from_dict(x) for x in d["entries"]])


def stat(vm_id: str, path: str) -> Call:
    return Call("GET", _sb(vm_id) + "/files/stat", params=_path_params(path), parse=FileEntry.from_dict)


def remove(vm_id: str, path: str, recursive: bool = False) -> Call:
    return Call("DELETE", _sb(vm_id) + "/files", params=_path_params(path, recursive="true" if recursive else None))


def mkdir(vm_id: str, path: str, parents: bool = True) -> Call:
    return Call("POST", _sb(vm_id) + "/files/mkdir", json={"path": path, "parents": parents},
                parse=FileEntry.from_dict)


def rename(vm_id: str, src: str, dst: str) -> Call:
    return Call("POST", _sb(vm_id) + "/files/rename", json={"from": src, "to": dst}, parse=FileEntry.from_dict)


def download_tar(vm_id: str, path: str) -> Call:
    return Call("GET", _sb(vm_id) + "/files/tar", params=_path_params(path), timeout=TRANSFER_TIMEOUT)


def upload_tar(vm_id: str, path: str) -> Call:
    return Call("PUT", _sb(vm_id) + "/files/tar", params=_path_params(path), timeout=TRANSFER_TIMEOUT)


# ---------------------------------------------------------------- workspaces


def workspace_id(ws: Any) -> str:
    """Methods take a workspace_id or a Workspace."""
    return ws if isinstance(ws, str) else ws.workspace_id


def _ws(ws: Any) -> str:
    # Quoted whole: an id is one path segment, whatever it holds.
    return "/v1/workspaces/" + quote(workspace_id(ws), safe="")


def list_workspaces(end_user_id: str | None = None) -> Call:
    return Call("GET", "/v1/workspaces", params=_drop_none({"end_user_id": end_user_id}),
                parse=lambda d: [Workspace.from_dict(x) for x in d["workspaces"]])


def get_workspace(ws: Any) -> Call:
    return Call("GET", _ws(ws), parse=Workspace.from_dict)


def workspace_usage(ws: Any) -> Call:
    # Counted in the store on every call: allow it the time a big workspace takes.
    return Call("GET", _ws(ws) + "/usage", parse=WorkspaceUsage.from_dict, timeout=TRANSFER_TIMEOUT)


def workspace_files(ws: Any, prefix: str = "", cursor: str | None = None, limit: int = 100) -> Call:
    """One page: ``(files, next_cursor)``; pass next_cursor back as ``cursor`` (None: the end)."""
    params = _drop_none({"prefix": prefix or None, "cursor": cursor, "limit": limit})
    return Call("GET", _ws(ws) + "/files", params=params,
                parse=lambda d: ([WorkspaceFile.from_dict(x) for x in d["files"]], d.get("next_cursor")))


def next_page_cursor(cursor: str | None, nxt: str | None) -> str | None:
    """The cursor of the page after ``cursor``, or None at the end; a server that hands the same
    cursor back would page forever, so that is an error."""
    if nxt is not None and nxt == cursor:
        raise E2AError(0, "cursor_loop", f"the server returned the same cursor again ({nxt!r})")
    return nxt


def presign_workspace_file(ws: Any, path: str, method: str = "GET", expires_in: int = 900,
                           size: int | None = None) -> Call:
    body = {"path": path, "method": method.upper(), "expires_in": expires_in}
    if size is not None:  # PUT: the upload's exact size, signed into the URL
        body["size"] = size
    return Call("POST", _ws(ws) + "/files/presign", json=body, parse=PresignedUrl.from_dict)


def delete_workspace_file(ws: Any, path: str) -> Call:
    return Call("DELETE", _ws(ws) + "/files", params={"path": path})


def delete_workspace(ws: Any) -> Call:
    # Deletes every object of the workspace in the store: may take a while.
    return Call("DELETE", _ws(ws), timeout=TRANSFER_TIMEOUT)


def presigned_target(base_url: str, url: str) -> str:
    """The presigned URL to request: absolute as the server gives it (a relative one is taken
    against the e2a URL)."""
    return str(httpx.URL(base_url + "/").join(url))


def presigned_body_length(data: Any) -> int:
    """S3 refuses chunked uploads to a presigned URL: the length must be known up front."""
    n = body_length(data)
    if n is None:
        raise E2AError(0, "invalid_body", "upload bytes, a str or a local file (pathlib.Path): "
                                          "a presigned PUT needs the length up front", "data")
    return n


def presigned_error(resp: httpx.Response) -> E2AError:
    """An error from the store behind a presigned URL (S3 answers XML, not e2a's error JSON):
    ``http_<status>`` with S3's own code and message when it gives them. Body must be read."""
    text = resp.text
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    if code:
        detail = code[1] + (f": {message[1]}" if message else "")
    else:
        detail = text.strip()[:500] or resp.reason_phrase
    return E2AError(resp.status_code, f"http_{resp.status_code}", detail)


# ---------------------------------------------------------------- agent sessions


def session_id(s: Any) -> str:
    """Methods take a chat_session_id, a Session or a SessionTicket."""
    return s if isinstance(s, str) else s.chat_session_id


def _ses(s: Any) -> str:
    return "/v1/sessions/" + quote(session_id(s), safe="")


def session_ws_path(s: Any) -> str:
    return _ses(s) + "/ws"


def llm_spec(llm: dict[str, Any] | None, **fields: Any) -> dict[str, Any] | None:
    """create_session's ``llm``: the dict given, with the keyword fields given on top; None (the
    field left out) when nothing is set."""
    merged = _drop_none({**(llm or {}), **_drop_none(fields)})
    return merged or None


def create_session(user_id: str, agent: str = "deictic", version: str | None = None,
                   template: str = "standard", llm: dict[str, Any] | None = None,
                   secrets: Any = (), app_id: str | None = None, set_id: str | None = None,
                   capability_sets: list[str] | None = None, ttl_seconds: int | None = None,
                   system_prompt: str | None = None, metadata: dict[str, Any] | None = None) -> Call:
    if isinstance(secrets, str):  # one bundle's name, not its letters
        secrets = [secrets]
    app = _drop_none({"id": app_id, "set_id": set_id,
                      "capability_sets": list(capability_sets) if capability_sets is not None else None})
    body = _drop_none({"agent": _drop_none({"kind": agent, "version": version}), "template": template,
                       "llm": llm or None, "secrets": list(secrets) or None, "app": app or None,
                       "user_id": user_id, "ttl_seconds": ttl_seconds, "system_prompt": system_prompt,
                       "metadata": metadata})
    key = (llm or {}).get("api_key")
    return Call("POST", "/v1/sessions", json=body, parse=SessionTicket.from_dict,
                secrets=(key,) if isinstance(key, str) and key else ())


def list_sessions(state: str | None = None, user_id: str | None = None,
                  limit: int | None = None, offset: int | None = None) -> Call:
    return Call("GET", "/v1/sessions", params=_drop_none({
        "state": state, "user_id": user_id, "limit": limit, "offset": offset}),
        parse=lambda d: [Session.from_dict(x) for x in d["sessions"]])


def get_session(s: Any) -> Call:
    return Call("GET", _ses(s), parse=Session.from_dict)


def end_session(s: Any) -> Call:
    return Call("DELETE", _ses(s), parse=Session.from_dict)


def session_token(s: Any, connect_url: str) -> Call:
    """A fresh JWT for a live session, as a ticket (the route gives no URL: ``connect_url`` is
    the one this client would use)."""
    sid = session_id(s)
    return Call("POST", _ses(s) + "/token",
                parse=lambda d: SessionTicket(chat_session_id=sid, jwt=d["jwt"], connect_url=connect_url,
                                              expires_at=d.get("expires_at")))


# ---------------------------------------------------------------- secret bundles


def _secret(name: str) -> str:
    return "/v1/tenants/me/secrets/" + quote(name, safe="")


def _secret_values(values: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """The values as sent, and those to keep out of every repr and error."""
    if not isinstance(values, dict):
        raise E2AError(0, "invalid_values", "values must be a dict of names to strings", "values")
    return dict(values), tuple(v for v in values.values() if isinstance(v, str) and v)


def create_secret(name: str, values: dict[str, str]) -> Call:
    values, hidden = _secret_values(values)
    return Call("POST", "/v1/tenants/me/secrets", json={"name": name, "values": values},
                parse=SecretBundle.from_dict, secrets=hidden)


def list_secrets() -> Call:
    return Call("GET", "/v1/tenants/me/secrets",
                parse=lambda d: [SecretBundle.from_dict(x) for x in d["secrets"]])


def get_secret(name: str) -> Call:
    return Call("GET", _secret(name), parse=SecretBundle.from_dict)


def replace_secret(name: str, values: dict[str, str]) -> Call:
    values, hidden = _secret_values(values)
    return Call("PUT", _secret(name), json={"values": values}, parse=SecretBundle.from_dict, secrets=hidden)


def delete_secret(name: str) -> Call:
    return Call("DELETE", _secret(name))


# ---------------------------------------------------------------- account: sign-in and API keys


def resolve_url(base_url: str | None) -> str:
    """The server's URL (``E2A_URL``, else the default) for calls that need no key."""
    return (base_url or os.environ.get("E2A_URL") or DEFAULT_URL).rstrip("/")


def login(email: str) -> Call:
    return Call("POST", "/v1/auth/login", json={"email": email}, parse=LoginCode.from_dict)


def verify_otp(email: str, code: str) -> Call:
    return Call("POST", "/v1/auth/verify-otp", json={"email": email, "code": str(code)},
                parse=LoginToken.from_dict, secrets=(str(code),))


def create_api_key() -> Call:
    return Call("POST", "/v1/api-keys", parse=NewApiKey.from_dict)


def list_api_keys() -> Call:
    return Call("GET", "/v1/api-keys", parse=lambda d: [ApiKey.from_dict(x) for x in d["api_keys"]])


def revoke_api_key(key_id: Any) -> Call:
    kid = key_id if isinstance(key_id, str) else key_id.key_id  # an id, an ApiKey or a NewApiKey
    return Call("DELETE", "/v1/api-keys/" + quote(kid, safe=""), parse=ApiKey.from_dict)


# ---------------------------------------------------------------- credits and billing


def balance() -> Call:
    return Call("GET", "/v1/billing/balance", parse=Balance.from_dict)


def transactions(limit: int = 20, offset: int = 0) -> Call:
    return Call("GET", "/v1/billing/transactions", params={"limit": int(limit), "offset": int(offset)},
                parse=lambda d: [Transaction.from_dict(x) for x in d["transactions"]])


def _when(value: Any) -> str | None:
    """A usage window's end as the route takes it: a str as given; a date or datetime in ISO 8601
    (a naive datetime is UTC to the server)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise E2AError(0, "invalid_time", f"a time is a str, date or datetime, not {type(value).__name__}")


def usage(start: Any = None, end: Any = None, group_by: str = "day") -> Call:
    return Call("GET", "/v1/usage", params=_drop_none({"from": _when(start), "to": _when(end),
                                                       "group_by": group_by}),
                parse=Usage.from_dict)


def checkout(credit_amount: int) -> Call:
    return Call("POST", "/v1/billing/checkout", json={"credit_amount": credit_amount},
                parse=Checkout.from_dict)


def auto_topup() -> Call:
    return Call("GET", "/v1/billing/auto-topup", parse=AutoTopup.from_dict)


def set_auto_topup(enabled: bool, threshold: int, credit_amount: int) -> Call:
    return Call("PUT", "/v1/billing/auto-topup", json={
        "enabled": bool(enabled), "threshold": threshold, "credit_amount": credit_amount},
        parse=AutoTopup.from_dict)


def topup_settings(enabled: bool, threshold: int | None, credit_amount: int | None,
                   current: AutoTopup | None) -> Call:
    """set_auto_topup's PUT (which replaces all three settings): a value left None is the saved
    one (``current``, read first when any is None)."""
    if current is not None:
        threshold = current.threshold if threshold is None else threshold
        credit_amount = current.credit_amount if credit_amount is None else credit_amount
    return set_auto_topup(enabled, threshold, credit_amount)


class TransactionPager:
    """iter_transactions' pages, shared by both clients. The ledger is read newest first by
    offset while entries keep arriving at its front (every metering tick), which pushes entries
    already seen onto the next page: those are skipped. An entry is new when it is older than
    the last one yielded, or as old but not yielded yet (entries of one tick share a time)."""

    def __init__(self, limit: int = 100):
        self.limit = int(limit)
        self.offset = 0
        self.last: datetime | None = None  # the time of the last entry yielded
        self.at_last: set[str] = set()     # the ids yielded with that time
        self.done = False

    def call(self) -> Call:
        return transactions(self.limit, self.offset)

    def fresh(self, page: list[Transaction]) -> list[Transaction]:
        """The entries of ``page`` not yielded before; ``done`` once the ledger's end is reached."""
        self.offset += len(page)
        self.done = len(page) < self.limit
        out = []
        for t in page:
            at = _instant(t.timestamp)
            if self.last is not None and (at > self.last or (at == self.last and t.id in self.at_last)):
                continue
            if at != self.last:
                self.last, self.at_last = at, set()
            self.at_last.add(t.id)
            out.append(t)
        return out


def _instant(ts: str | None) -> datetime:
    when = datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else datetime.min
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- PTY


def pty_params(cols: int = 80, rows: int = 24, user: str | None = None, cwd: str | None = None) -> dict[str, Any]:
    return _drop_none({"cols": cols, "rows": rows, "user": user, "cwd": cwd})


def pty_path(vm_id: str) -> str:
    return _sb(vm_id) + "/pty"


# ---------------------------------------------------------------- upload bodies


def body_length(data: Any) -> int | None:
    """Content-Length when it is known without reading (bytes, a local path); else None -> chunked."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    if isinstance(data, str):
        return len(data.encode())
    if isinstance(data, os.PathLike):
        return os.path.getsize(data)
    return None


def iter_file(f: Any, chunk: int = CHUNK):
    """Read a binary file object piece by piece, so uploads never hold the whole file in memory."""
    while True:
        piece = f.read(chunk)
        if not piece:
            return
        yield piece
