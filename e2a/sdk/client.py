"""Synchronous client (httpx.Client). Request shapes live in ``_core``; this module only does I/O."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import time
from datetime import date, datetime
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import httpx

from . import _core as api
from ._body import Body, open_dest, sync_body
from ._core import Call, Collector, parse_event, sandbox_id
from .errors import E2AError, check, error_from_response
from .models import (CommandEvent, CommandInfo, CommandResult, FileEntry, LogLine, PresignedUrl, Sandbox,
                     SandboxEvent, SecretBundle, Session, SessionTicket, Task, TaskEvent, Tool, Workspace,
                     WorkspaceFile, WorkspaceUsage)
from .models import ApiKey, LoginCode, LoginToken, NewApiKey
from .models import AutoTopup, Balance, Checkout, Transaction, Usage
from .session import SessionConnection

WorkspaceSpec = Any  # True (the defaults) | {"app_id", "capset_id", "end_user_id"} | None
LlmSpec = dict[str, Any]  # {"vendor": "anthropic" | "openai" | "google" | "deepseek", "model", "base_url"}
LlmSessionSpec = dict[str, Any]  # LlmSpec and "api_key"


class E2A:
    """``E2A(base_url=None, api_key=None)``; defaults come from ``E2A_URL`` and ``E2A_API_KEY``.

    Every per-sandbox method takes a vm_id (or a Sandbox) first. File operations live under
    ``client.files``, secret bundles under ``client.secrets``, credits under ``client.billing``;
    the Sandbox objects returned carry bound shortcuts (``sb.run(...)``).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.BaseTransport | None = None):
        self.base_url, self.api_key = api.resolve_config(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=api.auth_headers(self.api_key),
                                  timeout=api.DEFAULT_TIMEOUT, transport=transport)
        self.files = Files(self)
        self.secrets = Secrets(self)
        self.billing = Billing(self)
        # Presigned URLs carry their own authority: they are fetched by a client without the API
        # key (and possibly at another host, the S3 store), made on first use.
        self._transport = transport
        self._plain_http: httpx.Client | None = None

    def close(self) -> None:
        self._http.close()
        if self._plain_http is not None:
            self._plain_http.close()

    def __enter__(self) -> "E2A":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, c: Call, content: Any = None, headers: dict[str, str] | None = None) -> Any:
        resp = self._http.request(c.method, c.path, params=c.params, json=c.json, content=content,
                                  headers=headers, timeout=c.timeout)
        try:
            return c.result(check(resp))
        except E2AError as e:
            raise c.scrub(e)

    @contextlib.contextmanager
    def _stream(self, c: Call) -> Iterator[httpx.Response]:
        with self._http.stream(c.method, c.path, params=c.params, json=c.json, timeout=c.timeout) as resp:
            if resp.is_error:
                resp.read()
                raise error_from_response(resp)
            yield resp

    def _events(self, c: Call) -> Iterator[CommandEvent]:
        with self._stream(c) as resp:
            for line in resp.iter_lines():
                if ev := parse_event(line):
                    yield ev

    def _sandbox(self, data: dict) -> Sandbox:
        return Sandbox.from_dict(data, self)

    @property
    def _plain(self) -> httpx.Client:
        if self._plain_http is None:
            self._plain_http = httpx.Client(headers={"User-Agent": "e2a-python-sdk"},
                                            timeout=api.TRANSFER_TIMEOUT, transport=self._transport)
        return self._plain_http

    # ------------------------------------------------------------ account: sign-in and API keys

    @classmethod
    def login(cls, email: str, base_url: str | None = None, *,
              transport: httpx.BaseTransport | None = None) -> LoginCode:
        """Mail a one-time code to ``email`` (the account is made on first use). Needs no key:
        ``E2A.login("me@example.com")``; then ``E2A.verify_otp(email, code)``."""
        return cls._anonymous(api.login(email), base_url, transport)

    @classmethod
    def verify_otp(cls, email: str, code: str, base_url: str | None = None, *,
                   transport: httpx.BaseTransport | None = None) -> LoginToken:
        """Trade the mailed code for the login JWT (``.token``), which manages keys and billing:
        ``with E2A(url, api_key=tok.token) as account: key = account.create_api_key()``."""
        return cls._anonymous(api.verify_otp(email, code), base_url, transport)

    @staticmethod
    def _anonymous(c: Call, base_url: str | None, transport: httpx.BaseTransport | None) -> Any:
        with httpx.Client(base_url=api.resolve_url(base_url), headers={"User-Agent": "e2a-python-sdk"},
                          timeout=api.DEFAULT_TIMEOUT, transport=transport) as http:
            resp = http.request(c.method, c.path, json=c.json, timeout=c.timeout)
            try:
                return c.result(check(resp))
            except E2AError as e:
                raise c.scrub(e)

    def create_api_key(self) -> NewApiKey:
        """A new API key; ``.key`` is shown this once. The client must hold the login JWT."""
        return self._call(api.create_api_key())

    def api_keys(self) -> list[ApiKey]:
        """The account's keys, newest first, revoked ones too (never a key itself). Login JWT."""
        return self._call(api.list_api_keys())

    def revoke_api_key(self, key_id: str | ApiKey | NewApiKey) -> ApiKey:
        """Revoke a key at once and for good: any of the account's with the login JWT, or the
        client's own key with that key."""
        return self._call(api.revoke_api_key(key_id))

    # ------------------------------------------------------------ sandboxes

    def create_sandbox(self, template: str = "standard", *, env_vars: dict[str, str] | None = None,
                       metadata: dict[str, str] | None = None, idle_timeout_seconds: int | None = None,
                       max_lifetime_seconds: int | None = None, internet: bool | None = None,
                       resolution: str | None = None, workspace: WorkspaceSpec = None,
                       agent: str | None = None, llm_key: str | None = None, task: str | None = None,
                       model: str | None = None, llm: LlmSpec | None = None,
                       system_prompt: str | None = None, tools: list[Tool | dict] | None = None,
                       max_steps: int | None = None, task_timeout_seconds: int | None = None,
                       keep_after_task_seconds: int | None = None,
                       on_idle: str | None = None, auto_resume: bool | None = None) -> Sandbox:
        """``workspace=True`` mounts the caller's default workspace on /home/user (made on first
        use); ``workspace={"app_id": .., "capset_id": .., "end_user_id": ..}`` chooses one (any key
        may be left out). The sandbox's ``workspace_id`` names it.

        ``agent`` ("e2a", "claude-code", "codex" or "gemini-cli") starts that agent with the
        caller's ``llm_key`` (never shown by this SDK, never put in the sandbox) working on
        ``task``; follow it with ``iter_task_events`` or ``wait_task``. ``model``, and for e2a's
        own agent ``llm={"vendor", "model", "base_url"}``, ``system_prompt``, ``tools`` and
        ``max_steps``. The sandbox is destroyed when the task ends unless
        ``keep_after_task_seconds`` keeps it for a follow-up (``send_task``). docs/agents.md.

        ``on_idle="pause"`` pauses the sandbox when its idle timeout passes instead of destroying
        it (``"destroy"``, the default); ``auto_resume=True`` has any exec, files or port call
        on a paused sandbox resume it first (default False)."""
        return self._sandbox(self._call(api.create_sandbox(
            template, env_vars, metadata, idle_timeout_seconds, max_lifetime_seconds, internet,
            resolution, workspace, agent=dict(
                agent=agent, llm_key=llm_key, task=task, model=model, llm=llm,
                system_prompt=system_prompt, tools=tools, max_steps=max_steps,
                task_timeout_seconds=task_timeout_seconds,
                keep_after_task_seconds=keep_after_task_seconds),
            on_idle=on_idle, auto_resume=auto_resume)))

    def list_sandboxes(self, state: str | None = None, metadata: dict[str, str] | None = None) -> list[Sandbox]:
        return [self._sandbox(d) for d in self._call(api.list_sandboxes(state, metadata))]

    def get_sandbox(self, vm_id: str) -> Sandbox:
        return self._sandbox(self._call(api.get_sandbox(sandbox_id(vm_id))))

    def kill(self, vm_id: str) -> Sandbox:
        return self._sandbox(self._call(api.kill(sandbox_id(vm_id))))

    def keepalive(self, vm_id: str) -> Sandbox:
        return self._sandbox(self._call(api.keepalive(sandbox_id(vm_id))))

    def pause(self, vm_id: str) -> Sandbox:
        """Checkpoint a running sandbox and stop it: its memory and files are kept on the host's
        disk (``disk_bytes``), and ``resume`` carries on where it stopped. It is destroyed at
        ``pause_expires_at`` (end_reason paused_expired) unless resumed first. 409 invalid_state
        if it is not running."""
        return self._sandbox(self._call(api.pause(sandbox_id(vm_id))))

    def resume(self, vm_id: str) -> Sandbox:
        """Start a paused sandbox again where it stopped (its processes, memory and files). 409
        invalid_state if it is not paused; ``ResumeFailed`` (503 resume_failed) if the restore
        failed: it is still paused, and a retry may work."""
        return self._sandbox(self._call(api.resume(sandbox_id(vm_id))))

    def fork(self, vm_id: str, count: int = 1) -> list[Sandbox]:
        """``count`` new sandboxes, running, each a copy of this running one as it is now (memory
        and disk); their ``forked_from`` is ``vm_id``. 409 invalid_state if it is not running,
        not_forkable if it has a workspace; a new sandbox's limits apply (402, 429, 409
        no_capacity)."""
        return [self._sandbox(d) for d in self._call(api.fork(sandbox_id(vm_id), count))]

    def logs(self, vm_id: str) -> list[LogLine]:
        return self._call(api.logs(sandbox_id(vm_id)))

    def events(self, vm_id: str) -> list[SandboxEvent]:
        """Every state transition of the sandbox, oldest first, with its reason."""
        return self._call(api.events(sandbox_id(vm_id)))

    # ------------------------------------------------------------ agents: the task

    def task(self, vm_id: str) -> Task:
        """The sandbox's latest task: state, result or error, counts (404 task_not_found if the
        sandbox has had none)."""
        return self._call(api.task(sandbox_id(vm_id)))

    def send_task(self, vm_id: str, task: str, model: str | None = None,
                  task_timeout_seconds: int | None = None) -> Task:
        """A follow-up task for a kept sandbox's agent (409 task_conflict while one runs)."""
        return self._call(api.send_task(sandbox_id(vm_id), task, model, task_timeout_seconds))

    def cancel_task(self, vm_id: str) -> Task:
        """Stop the running task: the task, cancelled (409 task_not_running if none runs)."""
        return self._call(api.cancel_task(sandbox_id(vm_id)))

    def task_events(self, vm_id: str, after: int = 0,
                    limit: int = 500) -> tuple[list[TaskEvent], int, bool]:
        """One page of the agent's events after seq ``after``: ``(events, next, done)``. Pass
        ``next`` back as ``after`` to go on; ``done`` once the task is over and all is returned."""
        return self._call(api.task_events(sandbox_id(vm_id), after, limit))

    def iter_task_events(self, vm_id: str, after: int = 0) -> Iterator[TaskEvent]:
        """The agent's events after seq ``after``, stored ones first, then live as they happen,
        until the server ends the stream (the task is over). A broken connection is reopened from
        the last event seen: nothing is lost or repeated."""
        return self._follow(sandbox_id(vm_id), api.Follower(after))

    def wait_task(self, vm_id: str, timeout: float | None = None) -> Task:
        """Follow the sandbox's latest task until it is over and return it, final. After
        ``timeout`` seconds raises ``WaitTimeout`` (an E2AError and a TimeoutError; the task goes
        on, its last state in ``.task``)."""
        vm = sandbox_id(vm_id)
        w = api.Waiter(vm, timeout)
        try:
            return self._wait_task(vm, w)
        except api.DeadlinePassed:
            raise w.timed_out() from None

    def _wait_task(self, vm: str, w: api.Waiter) -> Task:
        w.task = self.task(vm)
        after = 0
        while not w.task.done:
            follower = api.Follower(after, w.deadline)
            with contextlib.closing(self._follow(vm, follower)) as events:
                for ev in events:
                    if w.seen(ev):
                        break
            after = follower.after
            # The task_finished came (the row follows at once), or the stream ended.
            for step in w.POLLS if w.finished else (0.0,):
                time.sleep(w.pause(step))
                if final := w.settled(self.task(vm)):
                    return final
                if w.expired():
                    raise api.DeadlinePassed()
            if w.finished:  # the row has not caught up with the event: the event says it all
                return w.from_event()
            time.sleep(w.pause(w.REFOLLOW))  # the stream ended before the task did: follow on
        return w.task

    def _follow(self, vm: str, f: api.Follower) -> Iterator[TaskEvent]:
        while True:
            try:
                with self._stream(f.call(vm)) as resp:
                    for line in resp.iter_lines():
                        if ev := f.event(line):
                            yield ev
                            f.remaining()
                return
            except (httpx.TransportError, api.BrokenLine, E2AError) as exc:
                time.sleep(f.retry_after(exc))

    # ------------------------------------------------------------ agent sessions

    def create_session(self, user_id: str, *, agent: str = "deictic", version: str | None = None,
                       template: str = "standard", llm: LlmSessionSpec | None = None,
                       vendor: str | None = None, model: str | None = None, base_url: str | None = None,
                       api_key: str | None = None, secrets: Iterable[str] = (), app_id: str | None = None,
                       set_id: str | None = None, capability_sets: list[str] | None = None,
                       ttl_seconds: int | None = None, system_prompt: str | None = None,
                       metadata: dict[str, Any] | None = None) -> SessionTicket:
        """Start an agent session for the end user ``user_id``: its sandbox (``template``), its
        agent (``agent`` deictic/e2a, claude-code, codex or gemini-cli, at ``version``) and its LLM:
        ``llm={"vendor", "model", "base_url", "api_key"}`` or the same as keywords (which win),
        over the values of the secret bundles named in ``secrets`` (LLM_API_KEY, LLM_BASE_URL,
        LLM_MODEL, LLM_VENDOR). ``app_id``, ``set_id`` and ``capability_sets`` (shell, files,
        browser, computer) choose the app and what the agent may do; ``ttl_seconds`` (60..7200)
        how long the session lives.

        Returns the ticket: ``chat_session_id``, ``jwt`` (the session's credential, for the
        end user's client: never shown by this SDK), ``connect_url`` and ``expires_at``. The API
        key is never needed to connect: ``connect_session(ticket)``."""
        llm = api.llm_spec(llm, vendor=vendor, model=model, base_url=base_url, api_key=api_key)
        return self._call(api.create_session(user_id, agent, version, template, llm, secrets, app_id,
                                             set_id, capability_sets, ttl_seconds, system_prompt, metadata))

    def sessions(self, state: str | None = None, user_id: str | None = None,
                 limit: int | None = None, offset: int | None = None) -> list[Session]:
        """The caller's sessions, newest first (``state`` active or ended; one end user's with
        ``user_id``; the server's page is 100 unless ``limit`` says, at most 1000)."""
        return self._call(api.list_sessions(state, user_id, limit, offset))

    def session(self, session_id: str) -> Session:
        return self._call(api.get_session(session_id))

    def end_session(self, session_id: str) -> Session:
        """End a session (its sandbox destroyed, a connected client closed with 4000 deleted)."""
        return self._call(api.end_session(session_id))

    def session_token(self, session_id: str) -> SessionTicket:
        """A fresh JWT for a live session, as a ticket (``connect_url`` is this client's URL for
        the session's WebSocket)."""
        sid = api.session_id(session_id)
        return self._call(api.session_token(sid, self._session_url(sid)))

    def connect_session(self, session: Any, jwt: str | None = None, after: int = 0, *,
                        reconnect: bool = True) -> SessionConnection:
        """Connect to a session's WebSocket: ``session`` is a ticket (its JWT and URL are used),
        a chat_session_id or a Session (a fresh JWT is asked for, unless ``jwt`` is given).
        Events after seq ``after`` come first (0: all of them). A JWT refused later (expired,
        at a reconnect) is renewed with this client's API key. Only one connection per session
        is served: a newer one takes it over (the older closed with ``SessionTakenOver``)."""
        if isinstance(session, SessionTicket):
            sid, url, jwt = session.chat_session_id, session.connect_url, jwt or session.jwt
            url = url or self._session_url(sid)
        else:
            sid = api.session_id(session)
            url = self._session_url(sid)
            jwt = jwt or self.session_token(sid).jwt
        return SessionConnection(url, jwt, after=after, session=sid, reconnect=reconnect,
                                 refresh=lambda: self.session_token(sid)).open()

    def _session_url(self, sid: str) -> str:
        return api.ws_url(self.base_url, api.session_ws_path(sid), {})

    # ------------------------------------------------------------ templates: browser, desktop, canvas

    def templates(self) -> list[dict]:
        return self._call(api.templates())

    def cdp_url(self, vm_id: str) -> str:
        """A browser sandbox's CDP WebSocket URL: ``playwright.chromium.connect_over_cdp(url)``."""
        return self._call(api.cdp_url(sandbox_id(vm_id)))

    def desktop_actions(self, vm_id: str, actions: list[dict] | dict) -> list[dict]:
        """Run computer-use actions (Anthropic's action set) in order; one result each."""
        return self._call(api.desktop_actions(sandbox_id(vm_id), actions))

    def screenshot(self, vm_id: str, width: int | None = None) -> bytes:
        """The desktop as PNG bytes, scaled to ``width`` if given."""
        return self._call(api.screenshot(sandbox_id(vm_id), width))

    def desktop_windows(self, vm_id: str) -> dict:
        return self._call(api.desktop_windows(sandbox_id(vm_id)))

    def desktop_stream(self, vm_id: str, view_only: bool = True, ttl_seconds: int | None = None) -> dict:
        """A live-view page ``{"url", "view_only", "expires_at"}`` for a person to watch (or take over)."""
        return self._call(api.desktop_stream(sandbox_id(vm_id), view_only, ttl_seconds))

    def canvas_view_url(self, vm_id: str) -> str:
        return self._call(api.canvas_view_url(sandbox_id(vm_id)))

    def render_canvas(self, vm_id: str, path: str | None = None, *, html: str | None = None,
                      width: int | None = None, height: int | None = None, format: str = "png",
                      wait_ms: int | None = None) -> bytes:
        """PNG or PDF bytes of a canvas file or an HTML string, rendered inside the sandbox."""
        return self._call(api.render_canvas(sandbox_id(vm_id), path, html, width, height, format,
                                            wait_ms))

    # ------------------------------------------------------------ commands

    def stream(self, vm_id: str, cmd: str | list[str] | None = None, **opts: Any) -> Iterator[CommandEvent]:
        """Run a command and yield its events (start, stdout, stderr, ..., exit) as they arrive.

        Options as for ``run`` (argv, env, cwd, user, stdin, keep_stdin, timeout). The request is
        sent when iteration starts; a command that cannot start raises E2AError there.
        """
        return self._events(api.command(sandbox_id(vm_id), cmd, **opts))

    def run(self, vm_id: str, cmd: str | list[str] | None = None, *, argv: list[str] | None = None,
            env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
            stdin: str | bytes | None = None, timeout: float | None = None,
            on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
            ) -> CommandResult:
        """Run a command to completion. ``timeout`` is the command's limit in seconds (server-side)."""
        col = Collector(on_stdout, on_stderr)
        for ev in self.stream(vm_id, cmd, argv=argv, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout):
            col.feed(ev)
        return col.result()

    def run_background(self, vm_id: str, cmd: str | list[str] | None = None, **opts: Any) -> int:
        """Start a command without waiting; returns its pid (see ``reconnect``/``wait``)."""
        return self._call(api.command(sandbox_id(vm_id), cmd, background=True, **opts))

    def list_commands(self, vm_id: str) -> list[CommandInfo]:
        return self._call(api.list_commands(sandbox_id(vm_id)))

    def reconnect(self, vm_id: str, pid: int) -> Iterator[CommandEvent]:
        """The command's events from its start (buffered output first), then live, until exit."""
        return self._events(api.reconnect(sandbox_id(vm_id), pid))

    def wait(self, vm_id: str, pid: int, *, on_stdout: Callable | None = None,
             on_stderr: Callable | None = None) -> CommandResult:
        col = Collector(on_stdout, on_stderr)
        for ev in self.reconnect(vm_id, pid):
            col.feed(ev)
        return col.result()

    def send_stdin(self, vm_id: str, pid: int, data: str | bytes = "", eof: bool = False) -> None:
        self._call(api.send_stdin(sandbox_id(vm_id), pid, data, eof))

    def send_signal(self, vm_id: str, pid: int, signal: str | int = "SIGTERM") -> None:
        self._call(api.send_signal(sandbox_id(vm_id), pid, signal))

    # ------------------------------------------------------------ workspaces

    def workspaces(self, end_user_id: str | None = None) -> list[Workspace]:
        """The caller's workspaces (only those of ``end_user_id`` if given)."""
        return self._call(api.list_workspaces(end_user_id))

    def workspace(self, workspace_id: str) -> Workspace:
        return self._call(api.get_workspace(workspace_id))

    def workspace_usage(self, workspace_id: str) -> WorkspaceUsage:
        """Bytes and files counted in the store now (what a mounted sandbox has not uploaded yet
        is not in it), with the caller's total and quota."""
        return self._call(api.workspace_usage(workspace_id))

    def workspace_files(self, workspace_id: str, prefix: str = "", cursor: str | None = None,
                        limit: int = 100) -> tuple[list[WorkspaceFile], str | None]:
        """One page of files under ``prefix``, in path order, and the cursor of the next page
        (None after the last). ``iter_workspace_files`` follows the pages."""
        return self._call(api.workspace_files(workspace_id, prefix, cursor, limit))

    def iter_workspace_files(self, workspace_id: str, prefix: str = "", *,
                             limit: int = 100) -> Iterator[WorkspaceFile]:
        """Every file under ``prefix``, fetched ``limit`` at a time as iteration goes."""
        cursor = None
        while True:
            page, nxt = self.workspace_files(workspace_id, prefix, cursor, limit)
            yield from page
            cursor = api.next_page_cursor(cursor, nxt)
            if cursor is None:
                return

    def presign_workspace_file(self, workspace_id: str, path: str, method: str = "GET",
                               expires_in: int = 900, size: int | None = None) -> PresignedUrl:
        """A URL that reads (``GET``) or writes (``PUT``) ``path`` without the API key, for
        ``expires_in`` seconds. A GET of a file that does not exist is refused (file_not_found);
        a PUT with ``size`` must send exactly that many bytes, checked against the quota."""
        return self._call(api.presign_workspace_file(workspace_id, path, method, expires_in,
                                                     size))

    def delete_workspace_file(self, workspace_id: str, path: str) -> None:
        self._call(api.delete_workspace_file(workspace_id, path))

    def delete_workspace(self, workspace_id: str) -> None:
        """Every file of the workspace, and the workspace; refused (409 workspace_in_use) while a
        sandbox has it mounted."""
        self._call(api.delete_workspace(workspace_id))

    def upload_workspace_file(self, workspace_id: str, path: str, data: bytes | str | os.PathLike) -> int:
        """Write ``path`` through a presigned PUT: bytes, text (``str``) or a local file
        (``pathlib.Path``, streamed). Returns the byte count."""
        n = api.presigned_body_length(data)
        url = self.presign_workspace_file(workspace_id, path, "PUT", size=n).url
        with sync_body(data) as (content, headers):
            resp = self._plain.put(api.presigned_target(self.base_url, url), content=content,
                                   headers={**headers, "Content-Length": str(n)})
        if resp.is_error:
            raise api.presigned_error(resp)
        return n

    def download_workspace_file(self, workspace_id: str, path: str) -> bytes:
        """The whole file in memory, through a presigned GET; ``download_workspace_file_to``
        streams to a local file."""
        buf = io.BytesIO()
        self.download_workspace_file_to(workspace_id, path, buf)
        return buf.getvalue()

    def download_workspace_file_to(self, workspace_id: str, path: str,
                                   dest: str | os.PathLike | BinaryIO) -> int:
        """Stream ``path`` into a local path or binary file object; returns the byte count. A
        local path is only created once the store has answered."""
        url = self.presign_workspace_file(workspace_id, path, "GET").url
        n = 0
        with self._plain.stream("GET", api.presigned_target(self.base_url, url)) as resp:
            if resp.is_error:
                resp.read()
                raise api.presigned_error(resp)
            with open_dest(dest) as f:
                for piece in resp.iter_bytes(api.CHUNK):
                    f.write(piece)
                    n += len(piece)
        return n


class Files:
    """File operations of ``E2A``: ``client.files.<op>(vm_id, ...)``. All transfers stream."""

    def __init__(self, client: E2A):
        self._c = client

    def read_bytes(self, vm_id: str, path: str) -> bytes:
        """The whole file in memory; use ``read_to`` for big files."""
        with self._c._stream(api.read_file(sandbox_id(vm_id), path)) as resp:
            return resp.read()

    def read_text(self, vm_id: str, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(vm_id, path).decode(encoding)

    def read_to(self, vm_id: str, path: str, dest: str | os.PathLike | BinaryIO) -> int:
        """Stream a remote file into a local path or binary file object; returns the byte count."""
        return self._download(api.read_file(sandbox_id(vm_id), path), dest)

    def write(self, vm_id: str, path: str, data: Body, *, mode: str | int | None = None,
              user: str | None = None) -> dict:
        """Write bytes, text (``str``), a local file (``pathlib.Path``), a binary file object or an
        iterable of bytes to ``path``. Returns ``{"path", "size"}``."""
        with sync_body(data) as (content, headers):
            return self._c._call(api.write_file(sandbox_id(vm_id), path, mode, user), content, headers)

    def list(self, vm_id: str, path: str = ".") -> list[FileEntry]:
        return self._c._call(api.list_files(sandbox_id(vm_id), path))

    def stat(self, vm_id: str, path: str) -> FileEntry:
        return self._c._call(api.stat(sandbox_id(vm_id), path))

    def exists(self, vm_id: str, path: str) -> bool:
        try:
            self.stat(vm_id, path)
            return True
        except E2AError as e:  # only "not found" means absent; anything else is a real error
            if e.code == "not_found":
                return False
            raise

    def remove(self, vm_id: str, path: str, recursive: bool = False) -> None:
        self._c._call(api.remove(sandbox_id(vm_id), path, recursive))

    def mkdir(self, vm_id: str, path: str, parents: bool = True) -> FileEntry:
        return self._c._call(api.mkdir(sandbox_id(vm_id), path, parents))

    def rename(self, vm_id: str, src: str, dst: str) -> FileEntry:
        return self._c._call(api.rename(sandbox_id(vm_id), src, dst))

    def download_tar(self, vm_id: str, path: str, dest: str | os.PathLike | BinaryIO) -> int:
        """Stream a tar of directory ``path``'s contents into ``dest``; returns the byte count."""
        return self._download(api.download_tar(sandbox_id(vm_id), path), dest)

    def upload_tar(self, vm_id: str, tar: Body, path: str) -> dict:
        """Extract a tar (a local path as str or ``pathlib.Path``, bytes or a file object) into
        directory ``path``, streamed. Returns ``{"files", "bytes"}``."""
        if isinstance(tar, str):  # unlike write(), a str here can only mean a local tar file
            tar = pathlib.Path(tar)
        with sync_body(tar) as (content, headers):
            return self._c._call(api.upload_tar(sandbox_id(vm_id), path), content, headers)

    def _download(self, c: Call, dest: str | os.PathLike | BinaryIO) -> int:
        n = 0
        with self._c._stream(c) as resp, open_dest(dest) as f:
            for piece in resp.iter_bytes(api.CHUNK):
                f.write(piece)
                n += len(piece)
        return n


class Secrets:
    """Secret bundles of ``E2A``: ``client.secrets.<op>(name, ...)``. A bundle is a named set of
    values (LLM_API_KEY, LLM_BASE_URL, LLM_MODEL, LLM_VENDOR, ...) kept by the server for
    sessions (``create_session(secrets=[name])``); only its keys ever come back."""

    def __init__(self, client: E2A):
        self._c = client

    def create(self, name: str, values: dict[str, str]) -> SecretBundle:
        """A new bundle (409 if ``name`` exists: ``replace`` it, or ``put``)."""
        return self._c._call(api.create_secret(name, values))

    def list(self) -> list[SecretBundle]:
        return self._c._call(api.list_secrets())

    def get(self, name: str) -> SecretBundle:
        return self._c._call(api.get_secret(name))

    def replace(self, name: str, values: dict[str, str]) -> SecretBundle:
        """All of the bundle's values replaced by ``values`` (its version goes up)."""
        return self._c._call(api.replace_secret(name, values))

    def put(self, name: str, values: dict[str, str]) -> SecretBundle:
        """Create the bundle, or replace its values if it exists."""
        try:
            return self.create(name, values)
        except E2AError as e:
            if e.status != 409:
                raise
        return self.replace(name, values)

    def delete(self, name: str) -> None:
        self._c._call(api.delete_secret(name))


class Billing:
    """Credits of ``E2A``: ``client.billing.<op>(...)`` (docs/billing.md). Takes an API key or
    the login JWT. 1 credit = 1 US cent."""

    def __init__(self, client: E2A):
        self._c = client

    def balance(self) -> Balance:
        """The balance (credits and micro-credits) and auto top-up's settings."""
        return self._c._call(api.balance())

    def transactions(self, limit: int = 20, offset: int = 0) -> list[Transaction]:
        """One page of the ledger, newest first (``limit`` at most 1000)."""
        return self._c._call(api.transactions(limit, offset))

    def iter_transactions(self, *, limit: int = 100) -> Iterator[Transaction]:
        """Every entry of the ledger, newest first, fetched ``limit`` at a time as iteration
        goes. Entries added meanwhile (at the front) are not returned, and push none out twice."""
        pager = api.TransactionPager(limit)
        while not pager.done:
            yield from pager.fresh(self._c._call(pager.call()))

    def usage(self, start: str | date | datetime | None = None, end: str | date | datetime | None = None,
              group_by: str = "day") -> Usage:
        """Credits spent over [``start``, ``end``) (default: the last 30 days; a naive datetime
        is UTC), per ``group_by``: sandbox, template or day, with the total and the rates."""
        return self._c._call(api.usage(start, end, group_by))

    def checkout(self, credit_amount: int) -> Checkout:
        """A Stripe Checkout page (``.url``) to buy ``credit_amount`` credits; they arrive when
        Stripe confirms the payment. 400 below the server's minimum (default 500), 501
        payments_not_configured on a server without Stripe."""
        return self._c._call(api.checkout(credit_amount))

    def auto_topup(self) -> AutoTopup:
        return self._c._call(api.auto_topup())

    def set_auto_topup(self, enabled: bool, threshold: int | None = None,
                       credit_amount: int | None = None) -> AutoTopup:
        """Charge the card saved by a checkout for ``credit_amount`` credits whenever the balance
        falls below ``threshold`` credits; a value left None stays as saved. Saving lifts the hold
        of a failed charge. 409 no_payment_method before any purchase."""
        current = None if None not in (threshold, credit_amount) else self.auto_topup()
        return self._c._call(api.topup_settings(enabled, threshold, credit_amount, current))
