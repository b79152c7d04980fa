"""Sandbox lifecycle routes: create, list, get, destroy, keepalive, the event feed, and pause,
resume and fork (docs/pause.md)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from e2a.api.deps import (catalog, current_user, host, owned_sandbox, resume_sandbox,
                          wrong_state)
from e2a.api.errors import ApiError
from e2a.api.schemas import (CreateSandbox, ForkOut, ForkRequest, SandboxEventsOut, SandboxOut,
                             reserved_env_key)
from e2a.api.tasks import agent_config
from e2a.auth import Caller
from e2a.sandboxes.host import (Catalog, Conflict, CreateFailed, CreateSpec, DeletedDuringCreate,
                                NoCapacity, NotForkable, PauseFailed, SandboxHost, SandboxRecord,
                                Unavailable, UserLimit, WrongState)
from e2a.sandboxes.states import EndReason, State
from e2a.templates import recipes
from e2a.workspaces.scope import Scope

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

STATES = tuple(s.value for s in State)
DEFAULT_IDLE_TIMEOUT = 60


def out(rec: SandboxRecord) -> SandboxOut:
    return SandboxOut(
        vm_id=rec.id, state=rec.state, template=rec.template, vcpu=rec.vcpu,
        cpu_fraction=rec.cpu_fraction, memory_mib=rec.memory_mib, internet=rec.internet,
        metadata=rec.metadata, idle_timeout_seconds=rec.idle_timeout_seconds,
        max_lifetime_seconds=rec.max_lifetime_seconds, created_at=rec.created_at,
        expires_at=rec.expires_at, destroyed_at=rec.destroyed_at, end_reason=rec.end_reason,
        workspace_id=rec.workspace_id, on_idle=rec.on_idle, auto_resume=rec.auto_resume,
        paused_at=rec.paused_at, pause_expires_at=rec.pause_expires_at,
        disk_bytes=rec.disk_bytes, forked_from=rec.forked_from)


@router.post("", status_code=201, response_model=SandboxOut,
             responses={400: {}, 401: {}, 402: {}, 409: {}, 429: {}, 501: {}, 503: {}})
async def create_sandbox(request: Request, req: CreateSandbox,
                         user: Caller = Depends(current_user),
                         sandboxes: SandboxHost = Depends(host)) -> SandboxOut:
    settings = request.app.state.settings
    for key in req.env_vars:
        if reserved_env_key(key):
            raise ApiError(400, "reserved_env_var", f"{key} is set by e2a and cannot be overridden",
                           f"env_vars.{key}")
    agent = await agent_config(req, settings)
    idle = req.idle_timeout_seconds
    if idle is None:
        idle = min(DEFAULT_IDLE_TIMEOUT, req.max_lifetime_seconds)
    elif idle > req.max_lifetime_seconds:
        raise ApiError(400, "invalid_field",
                       f"idle_timeout_seconds ({idle}) exceeds max_lifetime_seconds "
                       f"({req.max_lifetime_seconds})", "idle_timeout_seconds")
    if req.template not in recipes.available():
        raise ApiError(501, "template_not_available",
                       f"template {req.template!r} is not available on this e2a "
                       f"(available: {', '.join(recipes.available())})", "template")
    params = _template_params(req)
    spec = CreateSpec(
        user_id=user.id, template=req.template, env_vars=req.env_vars, metadata=req.metadata,
        idle_timeout=idle, max_lifetime=req.max_lifetime_seconds, internet=req.internet,
        params=params, workspace=_workspace_scope(req, user), on_idle=req.on_idle,
        auto_resume=req.auto_resume)
    # 402 unless the balance pays a minute of it and of the user's other sandboxes
    async with request.app.state.billing.funds_for(user.id, req.template):
        rec = await _create(sandboxes, spec)
    if agent is not None:
        await _start_agent(request, rec, agent, req.task)
    return out(rec)


@contextlib.contextmanager
def _no_room():
    """What a create and a fork are refused for alike: no room on the host, the user's limit,
    no runtime."""
    try:
        yield
    except NoCapacity as exc:
        raise ApiError(409, "no_capacity", str(exc)) from exc
    except UserLimit as exc:
        raise ApiError(429, "sandbox_limit", str(exc)) from exc
    except Unavailable as exc:
        raise ApiError(503, "runtime_unavailable", str(exc)) from exc


async def _create(sandboxes: SandboxHost, spec: CreateSpec) -> SandboxRecord:
    try:
        with _no_room():
            return await sandboxes.create(spec)
    except DeletedDuringCreate as exc:
        raise ApiError(409, "sandbox_deleted", str(exc)) from exc
    except Conflict as exc:
        raise ApiError(409, "workspace_busy", str(exc), "workspace") from exc
    except CreateFailed as exc:
        raise ApiError(503, "create_failed", str(exc)) from exc


async def _start_agent(request: Request, rec: SandboxRecord, agent, task: str | None) -> None:
    """Give the new sandbox its agent and, if create named one, its task; a sandbox whose agent
    could not start is not left running."""
    tasks = request.app.state.tasks
    try:
        await tasks.attach(rec.id, rec.user_id, rec.template, agent)
        if task:
            await tasks.submit(rec.id, task)
    except BaseException:
        await request.app.state.host.destroy(rec.id, EndReason.CREATE_FAILED)
        raise


def _workspace_scope(req: CreateSandbox, user: Caller) -> Scope | None:
    """The scope of the workspace asked for: the user from the API key, the rest checked names."""
    ws = req.workspace
    if ws is None:
        return None
    return Scope(user_id=user.id, end_user_id=ws.end_user_id or "", app_id=ws.app_id,
                 capset_id=ws.capset_id)


RESOLUTION = re.compile(r"^(\d{3,4})x(\d{3,4})$")


def _template_params(req: CreateSandbox) -> dict[str, str]:
    """Create-time parameters of the template (today: a desktop's resolution)."""
    if req.resolution is None:
        return {}
    if "resolution" not in recipes.load(req.template).params:
        raise ApiError(400, "invalid_field", f"resolution applies to desktop templates (cua), "
                       f"not {req.template}", "resolution")
    m = RESOLUTION.match(req.resolution)
    if not m or not (640 <= int(m[1]) <= 3840 and 480 <= int(m[2]) <= 2160):
        raise ApiError(400, "invalid_field", "resolution is WIDTHxHEIGHT, from 640x480 to "
                       "3840x2160", "resolution")
    return {"resolution": f"{int(m[1])}x{int(m[2])}"}


@router.get("", response_model=list[SandboxOut])
async def list_sandboxes(request: Request,
                         state: str | None = Query(default=None, description="filter by state; "
                                                   "without it, destroyed sandboxes are left out"),
                         user: Caller = Depends(current_user),
                         cat: Catalog = Depends(catalog)) -> list[SandboxOut]:
    if state is not None and state not in STATES:
        raise ApiError(400, "invalid_field", f"unknown state {state!r}", "state")
    wanted = {k[len("metadata."):]: v for k, v in request.query_params.items()
              if k.startswith("metadata.")}
    return [out(r) for r in await cat.list(user.id, state)
            if all(r.metadata.get(k) == v for k, v in wanted.items())]


@router.get("/{vm_id}", response_model=SandboxOut, responses={401: {}, 404: {}})
async def get_sandbox(request: Request, vm_id: str, user: Caller = Depends(current_user),
                      sandboxes: SandboxHost = Depends(host)) -> SandboxOut:
    rec = await owned_sandbox(request.app, user, vm_id)
    sandboxes.touch(rec.id)
    return out(rec)


@router.delete("/{vm_id}", response_model=SandboxOut,
               responses={202: {"description": "still stopping: a teardown step failed and is "
                                               "being retried"}, 401: {}, 404: {}})
async def delete_sandbox(request: Request, vm_id: str, user: Caller = Depends(current_user),
                         sandboxes: SandboxHost = Depends(host),
                         cat: Catalog = Depends(catalog)):
    rec = await owned_sandbox(request.app, user, vm_id)
    await sandboxes.destroy(rec.id, EndReason.DELETED)
    rec = await cat.get(rec.id)
    body = out(rec)
    if rec.state != State.DESTROYED.value:
        return JSONResponse(body.model_dump(mode="json"), status_code=202)
    return body


@router.post("/{vm_id}/keepalive", response_model=SandboxOut,
             responses={401: {}, 404: {}, 409: {}})
async def keepalive(request: Request, vm_id: str, user: Caller = Depends(current_user),
                    sandboxes: SandboxHost = Depends(host)) -> SandboxOut:
    rec = await owned_sandbox(request.app, user, vm_id)
    if rec.state != State.RUNNING.value:
        raise ApiError(409, "sandbox_not_running", f"sandbox {rec.id} is {rec.state}", "vm_id")
    sandboxes.touch(rec.id)
    return out(rec)


@router.get("/{vm_id}/events", response_model=SandboxEventsOut, responses={401: {}, 404: {}})
async def events(request: Request, vm_id: str, user: Caller = Depends(current_user),
                 cat: Catalog = Depends(catalog)) -> SandboxEventsOut:
    """Every state transition of the sandbox, oldest first, each with its reason."""
    rec = await owned_sandbox(request.app, user, vm_id)
    return SandboxEventsOut(events=[asdict(e) for e in await cat.events(rec.id)])


# ---- pause, resume, fork (docs/pause.md) ---------------------------------------------------

@router.post("/{vm_id}/pause", response_model=SandboxOut,
             responses={401: {}, 404: {}, 409: {}, 503: {}})
async def pause(request: Request, vm_id: str, user: Caller = Depends(current_user),
                sandboxes: SandboxHost = Depends(host)) -> SandboxOut:
    """Save the sandbox (memory, processes, files) to disk and free its CPU and memory."""
    rec = await owned_sandbox(request.app, user, vm_id)
    try:
        return out(await sandboxes.pause(rec.id))
    except WrongState as exc:
        raise wrong_state(exc) from exc
    except PauseFailed as exc:
        raise ApiError(503, "pause_failed", str(exc), "vm_id") from exc


@router.post("/{vm_id}/resume", response_model=SandboxOut,
             responses={401: {}, 402: {}, 404: {}, 409: {}, 503: {}})
async def resume(request: Request, vm_id: str, user: Caller = Depends(current_user)) -> SandboxOut:
    """Bring a paused sandbox back where it was: same id, processes, files and address."""
    rec = await owned_sandbox(request.app, user, vm_id)
    return out(await resume_sandbox(request.app, user, rec))


@router.post("/{vm_id}/fork", status_code=201, response_model=ForkOut,
             responses={400: {}, 401: {}, 402: {}, 404: {}, 409: {}, 429: {}, 503: {}})
async def fork(request: Request, vm_id: str, req: ForkRequest | None = None,
               user: Caller = Depends(current_user),
               sandboxes: SandboxHost = Depends(host)) -> ForkOut:
    """`count` new sandboxes from one checkpoint of a running one: each its own id, network and
    writable layer, all carrying on from the same moment. The original keeps running."""
    count = req.count if req else 1
    rec = await owned_sandbox(request.app, user, vm_id)
    try:
        async with request.app.state.billing.funds_for(user.id, rec.template, count):
            with _no_room():
                forks = await sandboxes.fork(rec.id, count)
    except WrongState as exc:
        raise wrong_state(exc) from exc
    except NotForkable as exc:
        raise ApiError(409, "not_forkable", str(exc), "vm_id") from exc
    except (CreateFailed, PauseFailed) as exc:
        raise ApiError(503, "fork_failed", str(exc)) from exc
    return ForkOut(sandboxes=[out(r) for r in forks])
