"""Sandbox lifecycle routes: create, list, get, destroy, keepalive."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from e2a.api.deps import current_user, db_session, manager, owned_sandbox, running
from e2a.api.errors import ApiError
from e2a.api.schemas import CreateSandbox, SandboxOut, reserved_env_key
from e2a.sandboxes.manager import Manager, NoCapacity, Unavailable, aware
from e2a.auth import Caller
from e2a.store.models import Sandbox
from e2a.templates import recipes

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])

STATES = ("creating", "configuring", "booting", "running", "paused", "stopping", "destroyed")
AGENTS = ("claude-code", "codex", "e2a")


def out(row: Sandbox) -> SandboxOut:
    return SandboxOut(
        vm_id=row.id, state=row.state, template=row.template, vcpu=row.vcpu,
        cpu_fraction=row.cpu_fraction, memory_mib=row.memory_mib, internet=row.internet,
        metadata=row.metadata_ or {}, idle_timeout_seconds=row.idle_timeout_seconds,
        max_lifetime_seconds=row.max_lifetime_seconds, created_at=aware(row.created_at),
        expires_at=aware(row.expires_at),
        destroyed_at=aware(row.destroyed_at) if row.destroyed_at else None,
    )


@router.post("", status_code=201, response_model=SandboxOut,
             responses={400: {}, 401: {}, 409: {}, 501: {}, 503: {}})
async def create_sandbox(req: CreateSandbox, user: Caller = Depends(current_user),
                         mgr: Manager = Depends(manager)) -> SandboxOut:
    for key in req.env_vars:
        if reserved_env_key(key):
            raise ApiError(400, "reserved_env_var", f"{key} is set by e2a and cannot be overridden",
                           f"env_vars.{key}")
    if req.agent is not None and not req.llm_key:
        raise ApiError(400, "missing_field", "llm_key is required when agent is set", "llm_key")
    if req.max_lifetime_seconds < req.idle_timeout_seconds:
        raise ApiError(400, "invalid_field", "idle_timeout_seconds exceeds max_lifetime_seconds",
                       "idle_timeout_seconds")
    recipe = recipes.load(req.template) if req.template in recipes.available() else None
    if recipe is None:
        raise ApiError(501, "template_not_available",
                       f"template {req.template!r} is not available on this e2a "
                       f"(available: {', '.join(recipes.available())})", "template")
    if req.agent is not None:
        raise ApiError(501, "agent_not_available",
                       f"agent {req.agent!r} is not available on this e2a yet", "agent")
    try:
        row = await mgr.create(user_id=user.id, recipe=recipe, env_vars=req.env_vars,
                               metadata=req.metadata, idle_timeout=req.idle_timeout_seconds,
                               max_lifetime=req.max_lifetime_seconds, internet=req.internet)
    except NoCapacity as exc:
        raise ApiError(409, "no_capacity", str(exc)) from exc
    except Unavailable as exc:
        raise ApiError(503, "runtime_unavailable", str(exc)) from exc
    return out(row)


@router.get("", response_model=list[SandboxOut])
async def list_sandboxes(request: Request,
                         state: str | None = Query(default=None, description="filter by state; "
                                                   "without it, destroyed sandboxes are left out"),
                         user: Caller = Depends(current_user),
                         db: AsyncSession = Depends(db_session)) -> list[SandboxOut]:
    if state is not None and state not in STATES:
        raise ApiError(400, "invalid_field", f"unknown state {state!r}", "state")
    q = select(Sandbox).where(Sandbox.user_id == user.id)
    q = q.where(Sandbox.state == state) if state else q.where(Sandbox.state != "destroyed")
    rows = (await db.execute(q.order_by(Sandbox.created_at.desc()).limit(1000))).scalars().all()
    wanted = {k[len("metadata."):]: v for k, v in request.query_params.items()
              if k.startswith("metadata.")}
    return [out(r) for r in rows
            if all((r.metadata_ or {}).get(k) == v for k, v in wanted.items())]


@router.get("/{vm_id}", response_model=SandboxOut, responses={401: {}, 404: {}})
async def get_sandbox(vm_id: str, user: Caller = Depends(current_user),
                      db: AsyncSession = Depends(db_session),
                      mgr: Manager = Depends(manager)) -> SandboxOut:
    row = await owned_sandbox(db, user, vm_id)
    mgr.touch(row.id)
    return out(row)


@router.delete("/{vm_id}", response_model=SandboxOut, responses={401: {}, 404: {}})
async def delete_sandbox(vm_id: str, user: Caller = Depends(current_user),
                         db: AsyncSession = Depends(db_session),
                         mgr: Manager = Depends(manager)) -> SandboxOut:
    row = await owned_sandbox(db, user, vm_id)
    await mgr.destroy(row.id, "deleted through the API")
    await db.refresh(row)
    return out(row)


@router.post("/{vm_id}/keepalive", response_model=SandboxOut,
             responses={401: {}, 404: {}, 409: {}})
async def keepalive(vm_id: str, user: Caller = Depends(current_user),
                    db: AsyncSession = Depends(db_session),
                    mgr: Manager = Depends(manager)) -> SandboxOut:
    row = await owned_sandbox(db, user, vm_id)
    running(mgr, row)
    return out(row)
