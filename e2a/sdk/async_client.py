"""Asynchronous client (httpx.AsyncClient), the mirror of ``client.E2A``. Request shapes live in
``_core``; only the I/O differs. Output callbacks may be plain functions or coroutine functions."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import os
import pathlib
from datetime import date, datetime
from typing import Any, AsyncIterator, BinaryIO, Callable, Iterable

import httpx

from . import _core as api
from ._body import Body, async_body, open_dest
from ._core import Call, Collector, parse_event, sandbox_id
from .errors import E2AError, check, error_from_response
from .models import (CommandEvent, CommandInfo, CommandResult, FileEntry, LogLine, PresignedUrl, Sandbox,
                     SandboxEvent, SecretBundle, Session, SessionTicket, Task, TaskEvent, Tool, Workspace,
                     WorkspaceFile, WorkspaceUsage)
from .models import ApiKey, LoginCode, LoginToken, NewApiKey
from .models import AutoTopup, Balance, Checkout, Transaction, Usage
from .session import AsyncSessionConnection

WorkspaceSpec = Any  # True (the defaults) | {"app_id", "capset_id", "end_user_id"} | None
LlmSpec = dict[str, Any]  # {"vendor": "anthropic" | "openai" | "google" | "deepseek", "model", "base_url"}
LlmSessionSpec = dict[str, Any]  # LlmSpec and "api_key"


class AsyncE2A:
    """Async twin of ``E2A``: same methods, awaited; streams are async iterators."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url, self.api_key = api.resolve_config(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=api.auth_headers(self.api_key),
                                       timeout=api.DEFAULT_TIMEOUT, transport=transport)
        self.files = AsyncFiles(self)
        self.secrets = AsyncSecrets(self)
        self.billing = AsyncBilling(self)
        # Presigned URLs are fetched without the API key (see E2A), by a client made on first use.
        self._transport = transport
        self._plain_http: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._plain_http is not None:
            await self._plain_http.aclose()

    async def __aenter__(self) -> "AsyncE2A":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------ plumbing

    async def _call(self, c: Call, content: Any = None, headers: dict[str, str] | None = None) -> Any:
        resp = await self._http.request(c.method, c.path, params=c.params, json=c.json, content=content,
                                        headers=headers, timeout=c.timeout)
        try:
            return c.result(check(resp))
        except E2AError as e:
            raise c.scrub(e)

    @contextlib.asynccontextmanager
    async def _stream(self, c: Call) -> AsyncIterator[httpx.Response]:
        async with self._http.stream(c.method, c.path, params=c.params, json=c.json, timeout=c.timeout) as resp:
            if resp.is_error:
                await resp.aread()
                raise error_from_response(resp)
            yield resp

    async def _events(self, c: Call) -> AsyncIterator[CommandEvent]:
        async with self._stream(c) as resp:
            async for line in resp.aiter_lines():
                if ev := parse_event(line):
                    yield ev

    async def _collect(self, events: AsyncIterator[CommandEvent], on_stdout, on_stderr) -> CommandResult:
        col = Collector(on_stdout, on_stderr)
        async for ev in events:
            ret = col.feed(ev)
            if inspect.isawaitable(ret):
                await ret
        return col.result()

    def _sandbox(self, data: dict) -> Sandbox:
        return Sandbox.from_dict(data, self)

    @property
    def _plain(self) -> httpx.AsyncClient:
        if self._plain_http is None:
            self._plain_http = httpx.AsyncClient(headers={"User-Agent": "e2a-python-sdk"},
                                                 timeout=api.TRANSFER_TIMEOUT, transport=self._transport)
        return self._plain_http

    # ------------------------------------------------------------ account: sign-in and API keys

    @classmethod
    async def login(cls, email: str, base_url: str | None = None, *,
                    transport: httpx.AsyncBaseTransport | None = None) -> LoginCode:
        """Mail a one-time code to ``email`` (see ``E2A.login``); needs no key."""
        return await cls._anonymous(api.login(email), base_url, transport)

    @classmethod
    async def verify_otp(cls, email: str, code: str, base_url: str | None = None, *,
                         transport: httpx.AsyncBaseTransport | None = None) -> LoginToken:
        """Trade the mailed code for the login JWT (see ``E2A.verify_otp``)."""
        return await cls._anonymous(api.verify_otp(email, code), base_url, transport)

    @staticmethod
    async def _anonymous(c: Call, base_url: str | None,
                         transport: httpx.AsyncBaseTransport | None) -> Any:
        async with httpx.AsyncClient(base_url=api.resolve_url(base_url),
                                     headers={"User-Agent": "e2a-python-sdk"},
                                     timeout=api.DEFAULT_TIMEOUT, transport=transport) as http:
            resp = await http.request(c.method, c.path, json=c.json, timeout=c.timeout)
            try:
                return c.result(check(resp))
            except E2AError as e:
                raise c.scrub(e)

    async def create_api_key(self) -> NewApiKey:
        return await self._call(api.create_api_key())

    async def api_keys(self) -> list[ApiKey]:
        return await self._call(api.list_api_keys())

    async def revoke_api_key(self, key_id: str | ApiKey | NewApiKey) -> ApiKey:
        return await self._call(api.revoke_api_key(key_id))

    # ------------------------------------------------------------ sandboxes

    async def create_sandbox(self, template: str = "standard", *, env_vars: dict[str, str] | None = None,
                             metadata: dict[str, str] | None = None, idle_timeout_seconds: int | None = None,
                             max_lifetime_seconds: int | None = None, internet: bool | None = None,
                             resolution: str | None = None, workspace: WorkspaceSpec = None,
                             agent: str | None = None, llm_key: str | None = None, task: str | None = None,
                             model: str | None = None, llm: LlmSpec | None = None,
                             system_prompt: str | None = None, tools: list[Tool | dict] | None = None,
                             max_steps: int | None = None, task_timeout_seconds: int | None = None,
                             keep_after_task_seconds: int | None = None,
                             on_idle: str | None = None, auto_resume: bool | None = None) -> Sandbox:
        """``workspace``: True or ``{"app_id", "capset_id", "end_user_id"}``; ``agent`` and its
        fields, ``on_idle`` and ``auto_resume``: as for ``E2A.create_sandbox``."""
        return self._sandbox(await self._call(api.create_sandbox(
            template, env_vars, metadata, idle_timeout_seconds, max_lifetime_seconds, internet,
            resolution, workspace, agent=dict(
                agent=agent, llm_key=llm_key, task=task, model=model, llm=llm,
                system_prompt=system_prompt, tools=tools, max_steps=max_steps,
                task_timeout_seconds=task_timeout_seconds,
                keep_after_task_seconds=keep_after_task_seconds),
            on_idle=on_idle, auto_resume=auto_resume)))

    async def list_sandboxes(self, state: str | None = None, metadata: dict[str, str] | None = None) -> list[Sandbox]:
        return [self._sandbox(d) for d in await self._call(api.list_sandboxes(state, metadata))]

    async def get_sandbox(self, vm_id: str) -> Sandbox:
        return self._sandbox(await self._call(api.get_sandbox(sandbox_id(vm_id))))

    async def kill(self, vm_id: str) -> Sandbox:
        return self._sandbox(await self._call(api.kill(sandbox_id(vm_id))))

    async def keepalive(self, vm_id: str) -> Sandbox:
        return self._sandbox(await self._call(api.keepalive(sandbox_id(vm_id))))

    async def pause(self, vm_id: str) -> Sandbox:
        """As ``E2A.pause``: the sandbox, paused."""
        return self._sandbox(await self._call(api.pause(sandbox_id(vm_id))))

    async def resume(self, vm_id: str) -> Sandbox:
        """As ``E2A.resume``: the sandbox, running (``ResumeFailed`` if the restore failed)."""
        return self._sandbox(await self._call(api.resume(sandbox_id(vm_id))))

    async def fork(self, vm_id: str, count: int = 1) -> list[Sandbox]:
        """As ``E2A.fork``: ``count`` new running copies of the sandbox."""
        return [self._sandbox(d) for d in await self._call(api.fork(sandbox_id(vm_id), count))]

    async def logs(self, vm_id: str) -> list[LogLine]:
        return await self._call(api.logs(sandbox_id(vm_id)))

    async def events(self, vm_id: str) -> list[SandboxEvent]:
        """Every state transition of the sandbox, oldest first, with its reason."""
        return await self._call(api.events(sandbox_id(vm_id)))

    # ------------------------------------------------------------ agents: the task

    async def task(self, vm_id: str) -> Task:
        return await self._call(api.task(sandbox_id(vm_id)))

    async def send_task(self, vm_id: str, task: str, model: str | None = None,
                        task_timeout_seconds: int | None = None) -> Task:
        return await self._call(api.send_task(sandbox_id(vm_id), task, model, task_timeout_seconds))

    async def cancel_task(self, vm_id: str) -> Task:
        return await self._call(api.cancel_task(sandbox_id(vm_id)))

    async def task_events(self, vm_id: str, after: int = 0,
                          limit: int = 500) -> tuple[list[TaskEvent], int, bool]:
        return await self._call(api.task_events(sandbox_id(vm_id), after, limit))

    def iter_task_events(self, vm_id: str, after: int = 0) -> AsyncIterator[TaskEvent]:
        """``async for ev in client.iter_task_events(id)``: as ``E2A.iter_task_events``."""
        return self._follow(sandbox_id(vm_id), api.Follower(after))

    async def wait_task(self, vm_id: str, timeout: float | None = None) -> Task:
        """As ``E2A.wait_task``: the final task, or ``WaitTimeout`` after ``timeout`` seconds."""
        vm = sandbox_id(vm_id)
        w = api.Waiter(vm, timeout)
        try:
            async with asyncio.timeout(timeout):
                return await self._wait_task(vm, w)
        except (api.DeadlinePassed, TimeoutError) as exc:
            if isinstance(exc, api.WaitTimeout):
                raise
            raise w.timed_out() from None

    async def _wait_task(self, vm: str, w: api.Waiter) -> Task:
        w.task = await self.task(vm)
        after = 0
        while not w.task.done:
            follower = api.Follower(after, w.deadline)
            async with contextlib.aclosing(self._follow(vm, follower)) as events:
                async for ev in events:
                    if w.seen(ev):
                        break
            after = follower.after
            # The task_finished came (the row follows at once), or the stream ended.
            for step in w.POLLS if w.finished else (0.0,):
                await asyncio.sleep(w.pause(step))
                if final := w.settled(await self.task(vm)):
                    return final
                if w.expired():
                    raise api.DeadlinePassed()
            if w.finished:  # the row has not caught up with the event: the event says it all
                return w.from_event()
            await asyncio.sleep(w.pause(w.REFOLLOW))  # the stream ended before the task did: follow on
        return w.task

    async def _follow(self, vm: str, f: api.Follower) -> AsyncIterator[TaskEvent]:
        while True:
            try:
                async with self._stream(f.call(vm)) as resp:
                    async for line in resp.aiter_lines():
                        if ev := f.event(line):
                            yield ev
                            f.remaining()
                return
            except (httpx.TransportError, api.BrokenLine, E2AError) as exc:
                await asyncio.sleep(f.retry_after(exc))

    # ------------------------------------------------------------ agent sessions

    async def create_session(self, user_id: str, *, agent: str = "deictic", version: str | None = None,
                             template: str = "standard", llm: LlmSessionSpec | None = None,
                             vendor: str | None = None, model: str | None = None, base_url: str | None = None,
                             api_key: str | None = None, secrets: Iterable[str] = (), app_id: str | None = None,
                             set_id: str | None = None, capability_sets: list[str] | None = None,
                             ttl_seconds: int | None = None, system_prompt: str | None = None,
                             metadata: dict[str, Any] | None = None) -> SessionTicket:
        """As ``E2A.create_session``."""
        llm = api.llm_spec(llm, vendor=vendor, model=model, base_url=base_url, api_key=api_key)
        return await self._call(api.create_session(user_id, agent, version, template, llm, secrets, app_id,
                                                   set_id, capability_sets, ttl_seconds, system_prompt,
                                                   metadata))

    async def sessions(self, state: str | None = None, user_id: str | None = None,
                       limit: int | None = None, offset: int | None = None) -> list[Session]:
        return await self._call(api.list_sessions(state, user_id, limit, offset))

    async def session(self, session_id: str) -> Session:
        return await self._call(api.get_session(session_id))

    async def end_session(self, session_id: str) -> Session:
        return await self._call(api.end_session(session_id))

    async def session_token(self, session_id: str) -> SessionTicket:
        sid = api.session_id(session_id)
        return await self._call(api.session_token(sid, self._session_url(sid)))

    async def connect_session(self, session: Any, jwt: str | None = None, after: int = 0, *,
                              reconnect: bool = True) -> AsyncSessionConnection:
        """As ``E2A.connect_session``: ``async with await client.connect_session(t) as conn``."""
        if isinstance(session, SessionTicket):
            sid, url, jwt = session.chat_session_id, session.connect_url, jwt or session.jwt
            url = url or self._session_url(sid)
        else:
            sid = api.session_id(session)
            url = self._session_url(sid)
            jwt = jwt or (await self.session_token(sid)).jwt
        return await AsyncSessionConnection(url, jwt, after=after, session=sid, reconnect=reconnect,
                                            refresh=lambda: self.session_token(sid)).open()

    def _session_url(self, sid: str) -> str:
        return api.ws_url(self.base_url, api.session_ws_path(sid), {})

    # ------------------------------------------------------------ templates: browser, desktop, canvas

    async def templates(self) -> list[dict]:
        return await self._call(api.templates())

    async def cdp_url(self, vm_id: str) -> str:
        """A browser sandbox's CDP WebSocket URL: ``playwright.chromium.connect_over_cdp(url)``."""
        return await self._call(api.cdp_url(sandbox_id(vm_id)))

    async def desktop_actions(self, vm_id: str, actions: list[dict] | dict) -> list[dict]:
        """Run computer-use actions (Anthropic's action set) in order; one result each."""
        return await self._call(api.desktop_actions(sandbox_id(vm_id), actions))

    async def screenshot(self, vm_id: str, width: int | None = None) -> bytes:
        """The desktop as PNG bytes, scaled to ``width`` if given."""
        return await self._call(api.screenshot(sandbox_id(vm_id), width))

    async def desktop_windows(self, vm_id: str) -> dict:
        return await self._call(api.desktop_windows(sandbox_id(vm_id)))

    async def desktop_stream(self, vm_id: str, view_only: bool = True, ttl_seconds: int | None = None) -> dict:
        """A live-view page ``{"url", "view_only", "expires_at"}`` for a person to watch (or take over)."""
        return await self._call(api.desktop_stream(sandbox_id(vm_id), view_only, ttl_seconds))

    async def canvas_view_url(self, vm_id: str) -> str:
        return await self._call(api.canvas_view_url(sandbox_id(vm_id)))

    async def render_canvas(self, vm_id: str, path: str | None = None, *, html: str | None = None,
                      width: int | None = None, height: int | None = None, format: str = "png",
                      wait_ms: int | None = None) -> bytes:
        """PNG or PDF bytes of a canvas file or an HTML string, rendered inside the sandbox."""
        return await self._call(api.render_canvas(sandbox_id(vm_id), path, html, width, height, format,
                                            wait_ms))

    # ------------------------------------------------------------ commands

    def stream(self, vm_id: str, cmd: str | list[str] | None = None, **opts: Any) -> AsyncIterator[CommandEvent]:
        """``async for ev in client.stream(id, "make")``: events as they arrive (see ``E2A.stream``)."""
        return self._events(api.command(sandbox_id(vm_id), cmd, **opts))

    async def run(self, vm_id: str, cmd: str | list[str] | None = None, *, argv: list[str] | None = None,
                  env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
                  stdin: str | bytes | None = None, timeout: float | None = None,
                  on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
                  ) -> CommandResult:
        events = self.stream(vm_id, cmd, argv=argv, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        return await self._collect(events, on_stdout, on_stderr)

    async def run_background(self, vm_id: str, cmd: str | list[str] | None = None, **opts: Any) -> int:
        return await self._call(api.command(sandbox_id(vm_id), cmd, background=True, **opts))

    async def list_commands(self, vm_id: str) -> list[CommandInfo]:
        return await self._call(api.list_commands(sandbox_id(vm_id)))

    def reconnect(self, vm_id: str, pid: int) -> AsyncIterator[CommandEvent]:
        return self._events(api.reconnect(sandbox_id(vm_id), pid))

    async def wait(self, vm_id: str, pid: int, *, on_stdout: Callable | None = None,
                   on_stderr: Callable | None = None) -> CommandResult:
        return await self._collect(self.reconnect(vm_id, pid), on_stdout, on_stderr)

    async def send_stdin(self, vm_id: str, pid: int, data: str | bytes = "", eof: bool = False) -> None:
        await self._call(api.send_stdin(sandbox_id(vm_id), pid, data, eof))

    async def send_signal(self, vm_id: str, pid: int, signal: str | int = "SIGTERM") -> None:
        await self._call(api.send_signal(sandbox_id(vm_id), pid, signal))

    # ------------------------------------------------------------ workspaces

    async def workspaces(self, end_user_id: str | None = None) -> list[Workspace]:
        return await self._call(api.list_workspaces(end_user_id))

    async def workspace(self, workspace_id: str) -> Workspace:
        return await self._call(api.get_workspace(workspace_id))

    async def workspace_usage(self, workspace_id: str) -> WorkspaceUsage:
        return await self._call(api.workspace_usage(workspace_id))

    async def workspace_files(self, workspace_id: str, prefix: str = "", cursor: str | None = None,
                              limit: int = 100) -> tuple[list[WorkspaceFile], str | None]:
        return await self._call(api.workspace_files(workspace_id, prefix, cursor, limit))

    async def iter_workspace_files(self, workspace_id: str, prefix: str = "", *,
                                   limit: int = 100) -> AsyncIterator[WorkspaceFile]:
        """``async for f in client.iter_workspace_files(id)``: every file, page after page."""
        cursor = None
        while True:
            page, nxt = await self.workspace_files(workspace_id, prefix, cursor, limit)
            for f in page:
                yield f
            cursor = api.next_page_cursor(cursor, nxt)
            if cursor is None:
                return

    async def presign_workspace_file(self, workspace_id: str, path: str, method: str = "GET",
                                     expires_in: int = 900,
                                     size: int | None = None) -> PresignedUrl:
        return await self._call(api.presign_workspace_file(workspace_id, path, method, expires_in,
                                                           size))

    async def delete_workspace_file(self, workspace_id: str, path: str) -> None:
        await self._call(api.delete_workspace_file(workspace_id, path))

    async def delete_workspace(self, workspace_id: str) -> None:
        await self._call(api.delete_workspace(workspace_id))

    async def upload_workspace_file(self, workspace_id: str, path: str,
                                    data: bytes | str | os.PathLike) -> int:
        n = api.presigned_body_length(data)
        url = (await self.presign_workspace_file(workspace_id, path, "PUT", size=n)).url
        with async_body(data) as (content, headers):
            resp = await self._plain.put(api.presigned_target(self.base_url, url), content=content,
                                         headers={**headers, "Content-Length": str(n)})
        if resp.is_error:
            raise api.presigned_error(resp)
        return n

    async def download_workspace_file(self, workspace_id: str, path: str) -> bytes:
        buf = io.BytesIO()
        await self.download_workspace_file_to(workspace_id, path, buf)
        return buf.getvalue()

    async def download_workspace_file_to(self, workspace_id: str, path: str,
                                         dest: str | os.PathLike | BinaryIO) -> int:
        url = (await self.presign_workspace_file(workspace_id, path, "GET")).url
        n = 0
        async with self._plain.stream("GET", api.presigned_target(self.base_url, url)) as resp:
            if resp.is_error:
                await resp.aread()
                raise api.presigned_error(resp)
            with open_dest(dest) as f:
                async for piece in resp.aiter_bytes(api.CHUNK):
                    f.write(piece)
                    n += len(piece)
        return n

    # ------------------------------------------------------------ PTY

    @contextlib.asynccontextmanager
    async def pty(self, vm_id: str, cols: int = 80, rows: int = 24, user: str | None = None,
                  cwd: str | None = None):
        """An interactive shell as a ``websockets`` connection (protocol: docs/protocol.md, PTY).

        Send bytes for keyboard input and ``json.dumps({"type": "resize", ...})`` text to resize;
        receive bytes of terminal output, and a text ``{"type": "exit", "exit_code": N}`` at the end.
        """
        from websockets.asyncio.client import connect  # imported here: only the PTY needs it
        from websockets.exceptions import InvalidStatus

        url = api.ws_url(self.base_url, api.pty_path(sandbox_id(vm_id)), api.pty_params(cols, rows, user, cwd))
        try:
            ws = await connect(url, additional_headers=api.auth_headers(self.api_key),
                               max_size=None, open_timeout=30)
        except InvalidStatus as e:  # the upgrade was refused: surface the server's error JSON
            r = e.response
            raise error_from_response(httpx.Response(r.status_code, content=r.body or b"")) from None
        async with ws:
            yield ws


class AsyncFiles:
    """File operations of ``AsyncE2A``: ``await client.files.<op>(vm_id, ...)``. All transfers stream."""

    def __init__(self, client: AsyncE2A):
        self._c = client

    async def read_bytes(self, vm_id: str, path: str) -> bytes:
        async with self._c._stream(api.read_file(sandbox_id(vm_id), path)) as resp:
            return await resp.aread()

    async def read_text(self, vm_id: str, path: str, encoding: str = "utf-8") -> str:
        return (await self.read_bytes(vm_id, path)).decode(encoding)

    async def read_to(self, vm_id: str, path: str, dest: str | os.PathLike | BinaryIO) -> int:
        return await self._download(api.read_file(sandbox_id(vm_id), path), dest)

    async def write(self, vm_id: str, path: str, data: Body, *, mode: str | int | None = None,
                    user: str | None = None) -> dict:
        with async_body(data) as (content, headers):
            return await self._c._call(api.write_file(sandbox_id(vm_id), path, mode, user), content, headers)

    async def list(self, vm_id: str, path: str = ".") -> list[FileEntry]:
        return await self._c._call(api.list_files(sandbox_id(vm_id), path))

    async def stat(self, vm_id: str, path: str) -> FileEntry:
        return await self._c._call(api.stat(sandbox_id(vm_id), path))

    async def exists(self, vm_id: str, path: str) -> bool:
        try:
            await self.stat(vm_id, path)
            return True
        except E2AError as e:
            if e.code == "not_found":
                return False
            raise

    async def remove(self, vm_id: str, path: str, recursive: bool = False) -> None:
        await self._c._call(api.remove(sandbox_id(vm_id), path, recursive))

    async def mkdir(self, vm_id: str, path: str, parents: bool = True) -> FileEntry:
        return await self._c._call(api.mkdir(sandbox_id(vm_id), path, parents))

    async def rename(self, vm_id: str, src: str, dst: str) -> FileEntry:
        return await self._c._call(api.rename(sandbox_id(vm_id), src, dst))

    async def download_tar(self, vm_id: str, path: str, dest: str | os.PathLike | BinaryIO) -> int:
        return await self._download(api.download_tar(sandbox_id(vm_id), path), dest)

    async def upload_tar(self, vm_id: str, tar: Body, path: str) -> dict:
        if isinstance(tar, str):  # unlike write(), a str here can only mean a local tar file
            tar = pathlib.Path(tar)
        with async_body(tar) as (content, headers):
            return await self._c._call(api.upload_tar(sandbox_id(vm_id), path), content, headers)

    async def _download(self, c: Call, dest: str | os.PathLike | BinaryIO) -> int:
        # Local writes are small and buffered; doing them inline keeps this simple.
        n = 0
        async with self._c._stream(c) as resp:
            with open_dest(dest) as f:
                async for piece in resp.aiter_bytes(api.CHUNK):
                    f.write(piece)
                    n += len(piece)
        return n


class AsyncSecrets:
    """Secret bundles of ``AsyncE2A``: ``await client.secrets.<op>(name, ...)`` (see ``Secrets``)."""

    def __init__(self, client: AsyncE2A):
        self._c = client

    async def create(self, name: str, values: dict[str, str]) -> SecretBundle:
        return await self._c._call(api.create_secret(name, values))

    async def list(self) -> list[SecretBundle]:
        return await self._c._call(api.list_secrets())

    async def get(self, name: str) -> SecretBundle:
        return await self._c._call(api.get_secret(name))

    async def replace(self, name: str, values: dict[str, str]) -> SecretBundle:
        return await self._c._call(api.replace_secret(name, values))

    async def put(self, name: str, values: dict[str, str]) -> SecretBundle:
        try:
            return await self.create(name, values)
        except E2AError as e:
            if e.status != 409:
                raise
        return await self.replace(name, values)

    async def delete(self, name: str) -> None:
        await self._c._call(api.delete_secret(name))


class AsyncBilling:
    """Credits of ``AsyncE2A``: ``await client.billing.<op>(...)`` (see ``Billing``)."""

    def __init__(self, client: AsyncE2A):
        self._c = client

    async def balance(self) -> Balance:
        return await self._c._call(api.balance())

    async def transactions(self, limit: int = 20, offset: int = 0) -> list[Transaction]:
        return await self._c._call(api.transactions(limit, offset))

    async def iter_transactions(self, *, limit: int = 100) -> AsyncIterator[Transaction]:
        """``async for t in client.billing.iter_transactions()``: every entry, newest first."""
        pager = api.TransactionPager(limit)
        while not pager.done:
            for t in pager.fresh(await self._c._call(pager.call())):
                yield t

    async def usage(self, start: str | date | datetime | None = None,
                    end: str | date | datetime | None = None, group_by: str = "day") -> Usage:
        return await self._c._call(api.usage(start, end, group_by))

    async def checkout(self, credit_amount: int) -> Checkout:
        return await self._c._call(api.checkout(credit_amount))

    async def auto_topup(self) -> AutoTopup:
        return await self._c._call(api.auto_topup())

    async def set_auto_topup(self, enabled: bool, threshold: int | None = None,
                             credit_amount: int | None = None) -> AutoTopup:
        current = None if None not in (threshold, credit_amount) else await self.auto_topup()
        return await self._c._call(api.topup_settings(enabled, threshold, credit_amount, current))
