"""An agent session's WebSocket, sync (``websockets.sync``) and async (``websockets.asyncio``).
What the protocol means lives in ``_session``; these classes only do the I/O.

    with client.connect_session(ticket) as conn:          # or a chat_session_id
        result = conn.run_task("Summarise data.csv", attachments={"data.csv": data},
                               on_event=lambda ev: print(ev.type, ev.data))

A connection is read by whoever needs the next message (an iteration, or a request waiting for
its reply), one at a time; what one reads for another is kept for it. So one thread (or task) may
iterate while another sends ``cancel()``. Not for use from several event loops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

from . import _session as core
from ._session import Closed, ReplyLost, SessionCore
from .errors import SessionDisconnected, SessionError
from .models import SessionEvent, SessionReady, SessionTicket

EventCallback = Callable[[SessionEvent], Any]
RefreshJwt = Callable[[], Any]  # a fresh SessionTicket (sync) or a coroutine of one (async)
RESENDS = 3  # a request whose reply was lost to a reconnect is sent again at most this often


def _target(ticket_or_url: Any, jwt: str | None) -> tuple[str, str, str]:
    """(connect_url, jwt, chat_session_id) from a ticket or a URL and a JWT."""
    if isinstance(ticket_or_url, SessionTicket):
        return ticket_or_url.connect_url, jwt or ticket_or_url.jwt, ticket_or_url.chat_session_id
    if not jwt:
        raise SessionError(0, "missing_jwt", "connecting to a session needs its JWT (from create_session "
                           "or session_token)")
    return str(ticket_or_url), jwt, ""


def _ws_errors():
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

    return ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI


class _NoCredentials(logging.Filter):
    """websockets logs a handshake's headers at DEBUG: the JWT is cut from them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() == "authorization":
            record.args = (args[0], "Bearer ***")
        return True


# The connections' logger (websockets logs through it): "e2a.sdk.session", not "websockets.client".
LOG = logging.getLogger("e2a.sdk.session")
LOG.addFilter(_NoCredentials())


def _direct(connect: Callable) -> dict[str, Any]:
    """websockets >= 17.1 wants sync connections made in a ``with`` unless told ``legacy=True``
    (a connection that outlives a block, as here); older versions know no such flag."""
    return {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


class _Base:
    def __init__(self, url: str, jwt: str, *, after: int = 0, session: str = "",
                 refresh: RefreshJwt | None = None, reconnect: bool = True,
                 open_timeout: float = core.OPEN_TIMEOUT):
        self._core = SessionCore(url, jwt, after, session)
        self._refresh = refresh
        self._reconnect = reconnect
        self._open_timeout = open_timeout
        self._ws: Any = None

    @property
    def session_id(self) -> str:
        return self._core.session

    @property
    def last_seq(self) -> int:
        """The seq of the last event handed out (iteration or run_task): connect again with
        ``after=last_seq`` to go on from there."""
        return self._core.last_seq

    @property
    def ready(self) -> SessionReady | None:
        """The latest connection's ready message: the session's state, last seq and task."""
        return self._core.ready

    @property
    def closed(self) -> bool:
        return self._core.closing or self._core.terminal is not None

    def __repr__(self) -> str:  # never the JWT
        state = "closed" if self.closed else "open" if self._ws is not None else "not connected"
        return f"{type(self).__name__}({self.session_id}, last_seq={self.last_seq}, {state})"

    def _refused(self, e: Any, refreshed: bool) -> bool:
        """After a refused handshake: True to try again with a fresh JWT (a 401, once); raises
        the session error for a final refusal; returns False for a transient one (retry)."""
        status = e.response.status_code
        if status == 401 and self._refresh is not None and not refreshed:
            return True
        if core.retryable_status(status):
            return False
        raise self._core.refused(status, e.response.body) from None

    def _task_floor(self) -> int:
        c = self._core
        return max(c.received, c.ready.last_seq if c.ready else 0)


class SessionConnection(_Base):
    """A connection to an agent session's WebSocket (sync). Made by ``E2A.connect_session``, or
    ``SessionConnection.connect(ticket)`` with only the ticket (no API key: no fresh JWT then).

    Iterating gives the numbered events (``SessionEvent``), live, each once; a dropped connection
    is opened again with ``after`` the last seq taken in, so none is lost or repeated. It ends
    with ``SessionEnded`` (close 4000; ``.reason``) or ``SessionTakenOver`` (4001), or stops
    when this side closes it."""

    def __init__(self, url: str, jwt: str, **kw: Any):
        super().__init__(url, jwt, **kw)
        self._cond = threading.Condition()  # guards the core's state and whose turn it is to read
        self._reading = False

    @classmethod
    def connect(cls, ticket_or_url: Any, jwt: str | None = None, after: int = 0,
                **kw: Any) -> "SessionConnection":
        url, jwt, session = _target(ticket_or_url, jwt)
        return cls(url, jwt, after=after, session=session, **kw).open()

    def open(self) -> "SessionConnection":
        self._connect(None)
        return self

    def close(self) -> None:
        self._core.closing = True
        if self._ws is not None:
            self._ws.close()

    def __enter__(self) -> "SessionConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the messages

    def send_task(self, text: str, attachments: dict[str, bytes] | None = None) -> str:
        """Start a task; returns its task_id once the server acknowledged it. Attachments
        (``{name: bytes}``) are written to /home/user/attachments/<name> first. A task already
        running is ``SessionError`` task_running."""
        before = self._core.ready.task if self._core.ready else None
        for _ in range(RESENDS):
            try:
                ack = self._request("task", lambda rid: self._core.task_frame(rid, text, attachments))
                return str(ack.get("task_id"))
            except ReplyLost:  # did the server take it? The new connection's ready says.
                if (task_id := core.sent_task(before, self._core.ready)) is not None:
                    return task_id
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the task was acknowledged")

    def cancel(self) -> str | None:
        """Stop the running task (its task_finished event follows, state cancelled); returns its
        task_id. No task running: ``SessionError`` no_task."""
        lost = False
        for _ in range(RESENDS):
            try:
                return self._request("cancel", lambda rid: self._core.frame("cancel", rid)).get("task_id")
            except ReplyLost:
                lost = True
            except SessionError as e:
                if lost and e.code == "no_task":
                    return None  # the first cancel did it (or the task ended meanwhile)
                raise
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the cancel was acknowledged")

    def ping(self) -> float:
        """A ping answered by the server's pong: the round trip in seconds."""
        for _ in range(RESENDS):
            t0 = time.monotonic()
            try:
                self._request("ping", lambda rid: self._core.frame("ping", rid))
                return time.monotonic() - t0
            except ReplyLost:
                continue
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the pong")

    def run_task(self, text: str, attachments: dict[str, bytes] | None = None, *,
                 on_event: EventCallback | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a task and follow it to its end: ``on_event`` gets each of its events as it comes
        (events of earlier tasks are skipped), and the task_finished event's data is returned
        (``state`` succeeded, failed, timed_out or cancelled; ``result``, ``error``, the counts).
        A dropped connection is resumed without losing or repeating an event. After ``timeout``
        seconds: ``SessionError`` wait_timeout (the task goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        floor = self._task_floor()
        watch = core.TaskWatch(self.send_task(text, attachments), floor)
        while True:
            try:
                ev = self._next(deadline)
            except TimeoutError:
                raise core.wait_timeout(self.session_id, watch.task_id, timeout) from None
            except Closed:
                raise self._core.closed_error() from None
            if not watch.wanted(ev):
                continue
            if on_event is not None:
                on_event(ev)
            if watch.finished(ev):
                return ev.data

    def __iter__(self) -> Iterator[SessionEvent]:
        return self

    def __next__(self) -> SessionEvent:
        try:
            return self._next(None)
        except Closed:
            raise StopIteration from None

    def next_event(self, timeout: float | None = None) -> SessionEvent:
        """The next event, waiting at most ``timeout`` seconds (TimeoutError)."""
        try:
            return self._next(None if timeout is None else time.monotonic() + timeout)
        except Closed:
            raise self._core.closed_error() from None

    # ------------------------------------------------------------ plumbing

    def _wait_for(self, check: Callable[[], Any], deadline: float | None) -> Any:
        """Read messages until ``check()`` gives something (it raises what should end the wait).
        One thread reads at a time; the others wait for what it reads, and each looks at once
        for what concerns it (so a reply read by an iterating thread reaches its requester)."""
        c = self._core
        while True:
            with self._cond:
                while (got := check()) is None and self._reading:
                    self._cond.wait(core.deadline_left(deadline))
                if got is not None:
                    return got
                self._reading = True
            raw = None
            try:
                raw = self._read(deadline)
            finally:
                with self._cond:
                    self._reading = False
                    if raw is not None:
                        c.take(raw)
                    self._cond.notify_all()

    def _next(self, deadline: float | None) -> SessionEvent:
        return self._wait_for(self._core.next_event, deadline)

    def _request(self, kind: str, build: Callable[[str], str]) -> dict[str, Any]:
        c = self._core
        ConnectionClosed = _ws_errors()[0]
        rid = c.next_id()
        frame = build(rid)  # a bad attachment is refused here, before anything is sent
        deadline = time.monotonic() + core.REPLY_TIMEOUT
        try:
            while True:
                c.check_open()
                gen, ws = c.generation, self._ws
                try:
                    ws.send(frame)
                    break
                except ConnectionClosed:  # read on until the close is seen and a new connection is up
                    self._wait_for(lambda: c.check_open() or (True if c.generation != gen else None), deadline)
            return self._wait_for(lambda: c.reply(rid, gen), deadline)
        except TimeoutError:
            raise core.reply_timeout(self.session_id, kind) from None
        except Closed:
            raise c.closed_error() from None

    def _read(self, deadline: float | None) -> Any:
        """One message (the reader's turn held), or None after opening a dropped connection again."""
        c = self._core
        if c.terminal is not None:
            raise c.terminal
        ConnectionClosed = _ws_errors()[0]
        try:
            return self._ws.recv(timeout=core.deadline_left(deadline))
        except ConnectionClosed as exc:
            if (err := c.on_close(exc)) is not None:
                raise err from None
            if not self._reconnect:
                c.terminal = SessionDisconnected(0, "connection_lost", f"the connection to session "
                                                 f"{self.session_id} was lost: {exc}")
                raise c.terminal from None
            self._connect(exc)
            return None

    def _connect(self, exc: BaseException | None) -> None:
        """Open a connection (after ``exc``, a drop, with pauses), retrying what may pass (a drop,
        a 502/503/504) a few times in a row; a first connection that cannot reach the server
        fails at once."""
        ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI = _ws_errors()
        first = exc is None
        while True:
            if exc is not None:
                time.sleep(self._core.retry_pause(exc))
            try:
                self._open_one()
                return
            except InvalidURI as e:
                raise SessionError(0, "invalid_url", str(e)) from None
            except InvalidStatus as e:
                exc = e  # a transient refusal (_open_one raised the others)
            except (OSError, InvalidHandshake, ConnectionClosed) as e:
                if first and not isinstance(e, ConnectionClosed):
                    raise SessionDisconnected(0, "connection_error", f"cannot open session "
                                              f"{self.session_id}'s WebSocket at {self._core.url}: {e}") from None
                exc = e

    def _open_one(self) -> None:
        from websockets.sync.client import connect

        ConnectionClosed, _, InvalidStatus, _ = _ws_errors()
        c = self._core
        refreshed = False
        while True:
            try:
                ws = connect(c.connect_target(), additional_headers=c.headers(), open_timeout=self._open_timeout,
                             max_size=None, max_queue=core.MAX_QUEUE, logger=LOG, **_direct(connect))
            except InvalidStatus as e:
                if self._refused(e, refreshed):
                    c.jwt, refreshed = self._refresh().jwt, True
                    continue
                raise
            try:
                c.take_ready(ws.recv(timeout=self._open_timeout))
            except ConnectionClosed as e:
                if (err := c.on_close(e)) is not None:
                    raise err from None
                raise
            except BaseException:
                ws.close()
                raise
            self._ws = ws
            return


class AsyncSessionConnection(_Base):
    """The async twin of ``SessionConnection``: ``await conn.send_task(...)``,
    ``async for ev in conn``, ``await conn.run_task(...)`` (``on_event`` may be a coroutine
    function); made by ``await AsyncE2A.connect_session(...)`` or
    ``await AsyncSessionConnection.connect(ticket)``."""

    def __init__(self, url: str, jwt: str, **kw: Any):
        super().__init__(url, jwt, **kw)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, ticket_or_url: Any, jwt: str | None = None, after: int = 0,
                      **kw: Any) -> "AsyncSessionConnection":
        url, jwt, session = _target(ticket_or_url, jwt)
        return await cls(url, jwt, after=after, session=session, **kw).open()

    async def open(self) -> "AsyncSessionConnection":
        async with self._lock:
            await self._connect(None)
        return self

    async def aclose(self) -> None:
        self._core.closing = True
        if self._ws is not None:
            await self._ws.close()

    close = aclose

    async def __aenter__(self) -> "AsyncSessionConnection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------ the messages

    async def send_task(self, text: str, attachments: dict[str, bytes] | None = None) -> str:
        """As ``SessionConnection.send_task``."""
        before = self._core.ready.task if self._core.ready else None
        for _ in range(RESENDS):
            try:
                ack = await self._request("task", lambda rid: self._core.task_frame(rid, text, attachments))
                return str(ack.get("task_id"))
            except ReplyLost:
                if (task_id := core.sent_task(before, self._core.ready)) is not None:
                    return task_id
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the task was acknowledged")

    async def cancel(self) -> str | None:
        lost = False
        for _ in range(RESENDS):
            try:
                return (await self._request("cancel", lambda rid: self._core.frame("cancel", rid))).get("task_id")
            except ReplyLost:
                lost = True
            except SessionError as e:
                if lost and e.code == "no_task":
                    return None
                raise
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the cancel was acknowledged")

    async def ping(self) -> float:
        for _ in range(RESENDS):
            t0 = time.monotonic()
            try:
                await self._request("ping", lambda rid: self._core.frame("ping", rid))
                return time.monotonic() - t0
            except ReplyLost:
                continue
        raise SessionDisconnected(0, "connection_lost", "the connection kept breaking before the pong")

    async def run_task(self, text: str, attachments: dict[str, bytes] | None = None, *,
                       on_event: EventCallback | None = None, timeout: float | None = None) -> dict[str, Any]:
        """As ``SessionConnection.run_task``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        floor = self._task_floor()
        watch = core.TaskWatch(await self.send_task(text, attachments), floor)
        while True:
            try:
                ev = await self._next(deadline)
            except TimeoutError:
                raise core.wait_timeout(self.session_id, watch.task_id, timeout) from None
            except Closed:
                raise self._core.closed_error() from None
            if not watch.wanted(ev):
                continue
            if on_event is not None:
                ret = on_event(ev)
                if inspect.isawaitable(ret):
                    await ret
            if watch.finished(ev):
                return ev.data

    def __aiter__(self) -> AsyncIterator[SessionEvent]:
        return self

    async def __anext__(self) -> SessionEvent:
        try:
            return await self._next(None)
        except Closed:
            raise StopAsyncIteration from None

    async def next_event(self, timeout: float | None = None) -> SessionEvent:
        try:
            return await self._next(None if timeout is None else time.monotonic() + timeout)
        except Closed:
            raise self._core.closed_error() from None

    # ------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def _locked(self, deadline: float | None):
        """One reader at a time (asyncio.Lock is first come, first served: a task waiting for a
        reply gets its turn right after the reader that read it)."""
        async with asyncio.timeout(core.deadline_left(deadline)):
            await self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    async def _next(self, deadline: float | None) -> SessionEvent:
        while True:
            async with self._locked(deadline):
                if (ev := self._core.next_event()) is not None:
                    return ev
                await self._pump(deadline)

    async def _request(self, kind: str, build: Callable[[str], str]) -> dict[str, Any]:
        c = self._core
        ConnectionClosed = _ws_errors()[0]
        rid = c.next_id()
        frame = build(rid)
        deadline = time.monotonic() + core.REPLY_TIMEOUT
        try:
            while True:
                c.check_open()
                gen, ws = c.generation, self._ws
                try:
                    await ws.send(frame)
                    break
                except ConnectionClosed:
                    async with self._locked(deadline):
                        if c.generation == gen:
                            await self._pump(deadline)
            while True:
                async with self._locked(deadline):
                    if (msg := c.reply(rid, gen)) is not None:
                        return msg
                    await self._pump(deadline)
        except TimeoutError:
            raise core.reply_timeout(self.session_id, kind) from None
        except Closed:
            raise c.closed_error() from None

    async def _pump(self, deadline: float | None) -> None:
        c = self._core
        if c.terminal is not None:
            raise c.terminal
        ConnectionClosed = _ws_errors()[0]
        try:
            async with asyncio.timeout(core.deadline_left(deadline)):
                raw = await self._ws.recv()
        except ConnectionClosed as exc:
            if (err := c.on_close(exc)) is not None:
                raise err from None
            if not self._reconnect:
                c.terminal = SessionDisconnected(0, "connection_lost", f"the connection to session "
                                                 f"{self.session_id} was lost: {exc}")
                raise c.terminal from None
            await self._connect(exc)
            return
        c.take(raw)

    async def _connect(self, exc: BaseException | None) -> None:
        ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI = _ws_errors()
        first = exc is None
        while True:
            if exc is not None:
                await asyncio.sleep(self._core.retry_pause(exc))
            try:
                await self._open_one()
                return
            except InvalidURI as e:
                raise SessionError(0, "invalid_url", str(e)) from None
            except InvalidStatus as e:
                exc = e
            except (OSError, InvalidHandshake, ConnectionClosed) as e:
                if first and not isinstance(e, ConnectionClosed):
                    raise SessionDisconnected(0, "connection_error", f"cannot open session "
                                              f"{self.session_id}'s WebSocket at {self._core.url}: {e}") from None
                exc = e

    async def _open_one(self) -> None:
        from websockets.asyncio.client import connect

        ConnectionClosed, _, InvalidStatus, _ = _ws_errors()
        c = self._core
        refreshed = False
        while True:
            try:
                ws = await connect(c.connect_target(), additional_headers=c.headers(),
                                   open_timeout=self._open_timeout, max_size=None, max_queue=core.MAX_QUEUE,
                                   logger=LOG)
            except InvalidStatus as e:
                if self._refused(e, refreshed):
                    ticket = self._refresh()
                    if inspect.isawaitable(ticket):
                        ticket = await ticket
                    c.jwt, refreshed = ticket.jwt, True
                    continue
                raise
            try:
                async with asyncio.timeout(self._open_timeout):
                    c.take_ready(await ws.recv())
            except ConnectionClosed as e:
                if (err := c.on_close(e)) is not None:
                    raise err from None
                raise
            except BaseException:
                await ws.close()
                raise
            self._ws = ws
            return
