"""Agent sessions: create, list, get, end, a fresh token, and the WebSocket (docs/sessions.md;
the protocol's schema is docs/sessions.asyncapi.json)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
from datetime import datetime, timezone
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, WebSocket
from pydantic import ValidationError

from e2a.agents.tasks import TaskConflict
from e2a.api.session_relay import first_of, relay
from e2a.api.hop_tokens import FORWARDED, NOT_VALID, body_digest
from e2a.api.tasks import MAX_SEQ
from e2a.api import session_protocol as proto
from e2a.api.deps import bearer, current_user, hop_caller, named_replica
from e2a.api.endpoints import base_url
from e2a.api.errors import ApiError, deny_websocket
from e2a.api.schemas import (CreateSession, SessionAgentOut, SessionAppOut, SessionLlmOut,
                             SessionOut, SessionsOut, SessionTaskOut, SessionTicket,
                             SessionTokenOut, SessionUsage)
from e2a.auth import Caller
from e2a.sessions.service import Live, LlmRequest, SessionError, Sessions, SessionSpec
from e2a.sessions.tokens import InvalidToken
from e2a.store.models import ChatSession
from e2a.templates import recipes

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

ATTACHMENTS_DIR = "/home/user/attachments"
AFTER = re.compile(r"[0-9]{1,10}")


def sessions(conn: Request | WebSocket) -> Sessions:
    return conn.app.state.chat_sessions


def _api_error(exc: SessionError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message, exc.field)


async def _owned(request: Request, user: Caller, session_id: str) -> ChatSession:
    row = await sessions(request).get(user.id, session_id)
    if row is None:  # someone else's is indistinguishable from none
        raise ApiError(404, "session_not_found", f"no session {session_id!r}",
                       "chat_session_id")
    return row


async def session_out(svc: Sessions, row: ChatSession) -> SessionOut:
    task = await svc.latest_task(row)
    usage = await svc.usage(row)
    end = row.ended_at or datetime.now(timezone.utc)
    return SessionOut(
        chat_session_id=row.id, state=row.state, user_id=row.end_user_id,
        agent=SessionAgentOut(kind=row.agent, version=row.agent_version), template=row.template,
        llm=SessionLlmOut(vendor=row.vendor, model=row.model),
        app=SessionAppOut(id=row.app_id, set_id=row.set_id,
                          capability_sets=row.capability_sets),
        secrets=row.secrets, vm_id=row.sandbox_id,
        workspace_id=await _workspace_id(svc, row),
        connected=row.state == "active" and row.connected,
        task=SessionTaskOut(task_id=task.id, state=task.state) if task else None,
        created_at=row.created_at, expires_at=row.expires_at, ended_at=row.ended_at,
        end_reason=row.end_reason, metadata=row.metadata_,
        usage=SessionUsage(**usage, seconds=round((_aware(end) - _aware(row.created_at))
                                                  .total_seconds(), 3)))


async def _workspace_id(svc: Sessions, row: ChatSession) -> str | None:
    if row.sandbox_id is None:
        return None
    rec = await svc.catalog.get(row.sandbox_id)
    return rec.workspace_id if rec else None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def connect_url(conn: Request | WebSocket, session_id: str) -> str:
    return f"{base_url(conn, websocket=True)}/v1/sessions/{session_id}/ws"


@router.post("", status_code=201, response_model=SessionTicket,
             responses={400: {}, 401: {}, 402: {}, 404: {}, 409: {}, 429: {}, 503: {}})
async def create_session(request: Request, req: CreateSession,
                         user: Caller = Depends(current_user)) -> SessionTicket:
    """Start a session: a sandbox of its own with the end user's workspace, and the agent in
    it, ready for tasks over the WebSocket at `connect_url` (authorised by `jwt`)."""
    spec = SessionSpec(
        user_id=user.id, end_user_id=req.user_id, app_id=req.app.id, set_id=req.app.set_id,
        capabilities=req.app.capability_sets, agent=req.agent.kind, version=req.agent.version,
        template=req.template,
        llm=LlmRequest(vendor=req.llm.vendor, model=req.llm.model, base_url=req.llm.base_url,
                       api_key=req.llm.api_key),
        secrets=req.secrets, ttl=req.ttl_seconds, system_prompt=req.system_prompt,
        metadata=req.metadata)
    # 402 unless the balance pays a minute of it and of the user's other sandboxes (an unknown
    # template is the service's 400)
    billing = request.app.state.billing
    async with (billing.funds_for(user.id, req.template) if req.template in recipes.available()
                else contextlib.nullcontext()):
        try:
            row, token = await sessions(request).create(spec)
        except SessionError as exc:
            raise _api_error(exc) from None
    return SessionTicket(chat_session_id=row.id, jwt=token,
                         connect_url=connect_url(request, row.id), expires_at=row.expires_at)


@router.get("", response_model=SessionsOut, responses={401: {}})
async def list_sessions(request: Request,
                        state: str | None = Query(None, pattern="^(active|ended)$"),
                        user_id: str | None = Query(None, max_length=64,
                                                    description="the tenant's end user"),
                        limit: int = Query(100, ge=1, le=1000),
                        offset: int = Query(0, ge=0, le=10_000_000),
                        user: Caller = Depends(current_user)) -> SessionsOut:
    """The tenant's sessions, newest first: `limit` of them from `offset`."""
    svc = sessions(request)
    rows = await svc.list(user.id, state, user_id, limit, offset)
    return SessionsOut(sessions=[await session_out(svc, r) for r in rows])


@router.get("/{session_id}", response_model=SessionOut, responses={401: {}, 404: {}})
async def get_session(request: Request, session_id: str,
                      user: Caller = Depends(current_user)) -> SessionOut:
    return await session_out(sessions(request), await _owned(request, user, session_id))


@router.delete("/{session_id}", response_model=SessionOut, responses={401: {}, 404: {}})
async def end_session(request: Request, session_id: str,
                      user: Caller = Depends(current_user)) -> SessionOut:
    """End the session: its task cancelled, its WebSocket closed (code 4000), its sandbox
    destroyed after its workspace is flushed. Ending an ended session changes nothing. Through
    any replica (docs/kubernetes.md "Sessions")."""
    row = await _owned(request, user, session_id)
    await sessions(request).end(row.id, "deleted")
    return await session_out(sessions(request), await _owned(request, user, session_id))


@router.post("/{session_id}/token", response_model=SessionTokenOut,
             responses={401: {}, 404: {}, 409: {}})
async def new_token(request: Request, session_id: str,
                    user: Caller = Depends(current_user)) -> SessionTokenOut:
    """A fresh JWT for an active session's WebSocket (the earlier ones stay valid)."""
    row = await _owned(request, user, session_id)
    if row.state != "active":
        raise ApiError(409, "session_ended", f"session {row.id} has ended ({row.end_reason})",
                       "chat_session_id")
    return SessionTokenOut(jwt=sessions(request).tokens.issue(row.id, user.id, row.expires_at),
                           expires_at=row.expires_at)


# ---- the WebSocket --------------------------------------------------------------------------

def _offered_token(ws: WebSocket) -> tuple[str | None, bool]:
    """The JWT, from the Authorization header or (browsers, which cannot set headers) the
    subprotocol list ["e2a.session.v1", "<jwt>"]; and whether the subprotocol was offered."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")
               if p.strip()]
    token = bearer(ws.headers.get("authorization"))
    if token is None:
        token = next((p for p in offered if p != proto.SUBPROTOCOL), None)
    return token, proto.SUBPROTOCOL in offered


def _ws_path(session_id: str) -> str:
    return f"{router.prefix}/{session_id}/ws"


def _relayed_caller(ws: WebSocket, token: str, session_id: str, relayed: str | None,
                    after: str) -> str | None:
    """The user a relaying replica vouches for with a hop token (api/hop_tokens.py), signed
    for this session's WebSocket, from this `after`, to this replica; None if the token is not
    a hop token (the session's own is checked as such); a 401 if it is not good here."""
    hop = hop_caller(ws.app, f"Bearer {token}", "GET", _ws_path(session_id), relayed or "")
    if hop is None:
        return None
    if hop[1].body != body_digest({"after": after}):
        raise ApiError(401, "unauthorized", NOT_VALID)
    return hop[0].id


@router.websocket("/{session_id}/ws")
async def session_ws(ws: WebSocket, session_id: str) -> None:
    svc = sessions(ws)
    token, subprotocol = _offered_token(ws)
    if token is None:
        return await deny_websocket(ws, ApiError(401, "unauthorized", "missing session token: send "
                                        "Authorization: Bearer <jwt> or the subprotocols "
                                        f"[{proto.SUBPROTOCOL!r}, <jwt>]"))
    after_text = ws.query_params.get("after", "0")
    try:
        relayed = named_replica(ws.headers.getlist(FORWARDED))
        user_id = _relayed_caller(ws, token, session_id, relayed, after_text) \
            or svc.tokens.verify(token, session_id).user_id
    except InvalidToken as exc:
        return await deny_websocket(ws, ApiError(401, "unauthorized", str(exc)))
    except ApiError as exc:
        return await deny_websocket(ws, exc)
    row = await svc.get(user_id, session_id)
    if row is None:
        return await deny_websocket(ws, ApiError(404, "session_not_found", f"no session {session_id!r}"))
    # (str.isdigit takes "²", which int() refuses; seq is a 32-bit column)
    if not AFTER.fullmatch(after_text) or int(after_text) > MAX_SEQ:
        return await deny_websocket(ws, ApiError(400, "invalid_field", "after must be the last seq "
                                        "seen (an integer, 0 for all)", "after"))
    live = svc.live.get(session_id)
    if row.state == "active" and live is None:  # another replica's session: relayed to it
        if relayed is not None and not svc.tasks.forwarded_to_me(relayed):
            return await deny_websocket(ws, ApiError(409, "session_conflict", "this connection "
                                            "was relayed to a replica that is not the one meant"))
        holder = None if relayed is not None else await svc.holder(row)
        if holder is not None:
            url, key = holder  # the session's token stays here: a hop token goes
            hop = ws.app.state.hop_tokens.issue(user_id, None, "GET", _ws_path(session_id),
                                                str(key), {"after": after_text})
            return await relay(ws, session_id, url, key, hop, subprotocol, after_text)
        if relayed is None and row.replica is not None and row.replica != svc.host.replica_key():
            # its replica does not answer now: gone (its sessions end within seconds, then
            # this is a 410) or blinking; a client tries again
            return await deny_websocket(ws, ApiError(503, "session_unavailable", "the e2a "
                                            "replica holding this session does not answer; "
                                            "try again"))
    if row.state != "active" or live is None or live.end_reason:
        return await deny_websocket(ws, ApiError(410, "session_ended", f"session {session_id} has "
                                        f"ended ({row.end_reason or 'ending'})"))
    await ws.accept(subprotocol=proto.SUBPROTOCOL if subprotocol else None)
    previous, live.connection = live.connection, ws
    if previous is not None:  # the newer connection takes over
        with contextlib.suppress(Exception):
            await previous.close(code=proto.TAKEN_OVER, reason="taken over by a newer connection")
    try:
        await svc.note_connected(live)
        await _serve(ws, svc, live, int(after_text))
    finally:
        if live.connection is ws:
            live.connection = None
            with contextlib.suppress(Exception):  # (a session that ended is not connected)
                await svc.note_connected(live)


async def _serve(ws: WebSocket, svc: Sessions, live: Live, after: int) -> None:
    row = await svc.get(live.user_id, live.id)
    task = await svc.latest_task(row)
    usage = await svc.usage(row)
    send = _Sender(ws)
    await send(proto.Ready(chat_session_id=live.id, last_seq=usage["events"],
                           expires_at=live.expires_at,
                           task=proto.TaskRef(task_id=task.id, state=task.state) if task
                           else None))
    events = asyncio.create_task(_send_events(svc, live, after, send))
    reader = asyncio.create_task(_read(ws, svc, live, send))
    done = await first_of(events, reader)
    if events in done and not events.cancelled() and events.exception() is None:
        # every event up to the session's end was sent: it has ended
        with contextlib.suppress(Exception):
            await ws.close(code=proto.ENDED, reason=live.end_reason or "ended")


class _Sender:
    """One writer at a time: events and replies come from two tasks."""

    def __init__(self, ws: WebSocket):
        self.ws, self.lock = ws, asyncio.Lock()

    async def __call__(self, message) -> None:
        text = message.model_dump_json()
        async with self.lock:
            await self.ws.send_text(text)


async def _send_events(svc: Sessions, live: Live, after: int, send) -> None:
    async for e in svc.follow(live, after):
        await send(proto.Event(seq=e.seq, type=e.type, task_id=e.task_id or None, data=e.data,
                               at=_aware(e.at)))


async def _read(ws: WebSocket, svc: Sessions, live: Live, send) -> None:
    while True:
        try:
            frame = await ws.receive()
        except RuntimeError:  # closed by us (taken over)
            return
        if frame["type"] == "websocket.disconnect":
            return
        raw = None
        try:
            raw = json.loads(frame.get("text") or "")  # a binary frame is no message
            msg = proto.client_message.validate_python(raw)
        except (ValueError, ValidationError) as exc:
            await send(_invalid(raw, exc))
            continue
        try:
            await _handle(svc, live, msg, send)
        except ApiError as exc:
            await send(proto.Error(id=msg.id, code=exc.code, message=exc.message))


def _invalid(raw, exc: Exception) -> proto.Error:
    """The error reply to a message that is not one of the protocol's."""
    ref = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(ref, (str, int)) or isinstance(ref, bool) or len(str(ref)) > 128:
        ref = None
    if not isinstance(exc, ValidationError):
        return proto.Error(id=ref, code="bad_message", message="a message is a JSON object "
                           "with a type: task, cancel or ping")
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    code = "invalid_attachment" if "attachments" in first["loc"] else "bad_message"
    return proto.Error(id=ref, code=code, message=f"{where}: {first['msg']}" if where
                       else first["msg"])


async def _handle(svc: Sessions, live: Live, msg, send) -> None:
    if isinstance(msg, proto.PingMessage):
        await send(proto.Pong(id=msg.id))
    elif isinstance(msg, proto.TaskMessage):
        task_id = await _task(svc, live, msg)
        await send(proto.Ack(id=msg.id, op="task", task_id=task_id))
    else:
        s = svc.tasks.session(live.sandbox_id)
        task_id = s.task_id if s is not None and s.running else None
        if task_id is None or not await svc.tasks.cancel(live.sandbox_id,
                                                         "cancelled by the session's client"):
            raise ApiError(409, "no_task", "no task is running")
        await send(proto.Ack(id=msg.id, op="cancel", task_id=task_id))


async def _task(svc: Sessions, live: Live, msg: proto.TaskMessage) -> str:
    files = []
    for a in msg.attachments:
        try:
            files.append((a.name, base64.b64decode(a.content_base64, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_attachment", f"attachment {a.name}: content_base64 "
                           "is not base64") from None
    if len({n for n, _ in files}) != len(files):
        raise ApiError(400, "invalid_attachment", "each attachment's name once")
    s = svc.tasks.session(live.sandbox_id)
    if s is None or live.end_reason:
        raise ApiError(410, "session_ended", "the session has ended")
    if s.running:
        raise ApiError(409, "task_running", f"task {s.task_id} is still running: wait for its "
                       "task_finished, or cancel it")
    for name, data in files:
        await _put(svc, live.sandbox_id, f"{ATTACHMENTS_DIR}/{name}", data)
    text = msg.text
    if files:
        text += "\n\nAttached files: " + ", ".join(f"{ATTACHMENTS_DIR}/{n}" for n, _ in files)
    try:
        task = await svc.tasks.submit(live.sandbox_id, text)
    except TaskConflict as exc:
        raise ApiError(409, "task_running", str(exc)) from None
    return task.id


async def _put(svc: Sessions, sandbox_id: str, path: str, data: bytes) -> None:
    up = await svc.host.agent_request(sandbox_id, "PUT",
                                      f"/files?path={quote(path)}&user=user", data=data)
    try:
        if up.response.status >= 300:
            body = (await up.response.read())[:500].decode(errors="replace")
            raise ApiError(400, "invalid_attachment", f"{path} could not be written: {body}")
    finally:
        up.close()


def url_guard(settings):
    """The SSRF guard for a session's LLM base URL (the request's or a bundle's), as the
    session service calls it: the checked URL, or SessionError naming the field."""
    from e2a.api.tasks import checked_base_url

    async def check(url: str, field: str) -> str:
        try:
            return await checked_base_url(url, settings, field)
        except ApiError as exc:
            raise SessionError(exc.status, exc.code, exc.message, exc.field) from None
    return check
