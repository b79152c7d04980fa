"""Agents on a task: create's agent fields checked into an AgentConfig, and the task routes
(GET /task, its events, cancel, a follow-up task). docs/agents.md."""

from __future__ import annotations

import json

import httpx

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from e2a.agents import clis, keys, ssrf
from e2a.agents.own import providers
from e2a.agents.own.tools import BUILT_IN
from e2a.agents.tasks import AgentConfig, NoAgentHere, TaskConflict, Tasks
from e2a.api.deps import current_user, owned_sandbox, require_running
from e2a.api.errors import ApiError
from e2a.api.hop_tokens import FORWARDED, NOT_VALID, body_digest
from e2a.api.schemas import CreateSandbox, FollowUpRequest, TaskEventOut, TaskEventsOut, TaskOut
from e2a.auth import Caller
from e2a.config import Settings
from e2a.store.models import Task

router = APIRouter(prefix="/v1/sandboxes/{vm_id}/task", tags=["agents"])

# The own agent answers to both names: `deictic` is the hosted service's name for it.
OWN = ("e2a", "deictic")
AGENTS = OWN + clis.NAMES
DEFAULT_MAX_STEPS = 50
# Events are numbered in a 32-bit column (PostgreSQL's integer): a larger `after` is a 400.
MAX_SEQ = 2**31 - 1
FORWARD_TIMEOUT = 30.0


def tasks(request: Request) -> Tasks:
    return request.app.state.tasks


async def agent_config(req: CreateSandbox, settings: Settings) -> AgentConfig | None:
    """The agent create asked for, checked; None without one. Raises ApiError (400/501)."""
    own_only = {"llm": req.llm, "system_prompt": req.system_prompt, "tools": req.tools or None,
                "max_steps": req.max_steps}
    if req.agent is None:
        for name, value in {"llm_key": req.llm_key, "task": req.task, "model": req.model,
                            **own_only}.items():
            if value is not None:
                raise ApiError(400, "invalid_field", f"{name} applies only with an agent", name)
        if req.task_timeout_seconds is not None or req.keep_after_task_seconds:
            raise ApiError(400, "invalid_field", "task_timeout_seconds and "
                           "keep_after_task_seconds apply only with an agent", "agent")
        return None
    if settings.backend == "kubernetes" and not settings.kube_egress_host:
        raise ApiError(501, "agent_not_available", "agents need E2A_KUBE_EGRESS_HOST on the "
                       "Kubernetes backend (docs/kubernetes.md)", "agent")
    if req.agent not in AGENTS:
        raise ApiError(501, "agent_not_available", f"agent {req.agent!r} is not available "
                       f"(available: {', '.join(AGENTS)})", "agent")
    if not req.llm_key:
        raise ApiError(400, "missing_field", "llm_key is required when agent is set", "llm_key")
    problem = keys.problem(req.llm_key)
    if problem:
        raise ApiError(400, "invalid_field", f"llm_key {problem}", "llm_key")
    if req.keep_after_task_seconds > req.max_lifetime_seconds:
        raise ApiError(400, "invalid_field", "keep_after_task_seconds exceeds "
                       "max_lifetime_seconds", "keep_after_task_seconds")
    common = dict(key=req.llm_key.strip(), task_timeout=req.task_timeout_seconds,
                  keep_after=float(req.keep_after_task_seconds))
    cli = clis.get(req.agent)
    if cli is not None:
        for name, value in own_only.items():
            if value is not None:
                raise ApiError(400, "invalid_field", f"{name} applies to e2a's own agent "
                               f"(agent \"e2a\"), not {req.agent}", name)
        _check_model(cli, req.model)
        return AgentConfig(agent=req.agent, vendor=cli.vendor, model=req.model, **common)
    return await _own_config(req, settings, common)


def _check_model(cli, model: str | None) -> None:
    """A CLI's model must be of its vendor's names (E2A_API.md): else 400 naming `model`."""
    problem = cli.check_model(model)
    if problem:
        raise ApiError(400, "invalid_field", problem, "model")


async def _own_config(req: CreateSandbox, settings: Settings, common: dict) -> AgentConfig:
    llm = req.llm
    model = req.model
    if llm is not None and llm.model:
        if model and model != llm.model:
            raise ApiError(400, "invalid_field", "model and llm.model differ", "llm.model")
        model = llm.model
    vendor = llm.vendor if llm else None
    base_url = llm.base_url if llm else None
    compatible = False
    if base_url:
        base_url = await checked_base_url(base_url, settings, "llm.base_url")
        compatible = vendor in (None, "openai")
        vendor = vendor or "openai"
    vendor = vendor or providers.infer_vendor(model, req.llm_key)
    if vendor is None:
        raise ApiError(400, "invalid_field", "cannot tell the provider from the model or the key: "
                       "set llm.vendor (anthropic, openai, google or deepseek)", "llm.vendor")
    if not base_url:
        base_url = getattr(settings, f"llm_{vendor}_url")
    for i, tool in enumerate(req.tools):
        if tool.name in BUILT_IN:
            raise ApiError(400, "invalid_field", f"tool name {tool.name!r} is one of e2a's own "
                           "tools", f"tools[{i}].name")
    return AgentConfig(agent="e2a", vendor=vendor, model=model, base_url=base_url,
                       compatible=compatible, system_prompt=req.system_prompt,
                       tools=[t.model_dump() for t in req.tools],
                       max_steps=req.max_steps or DEFAULT_MAX_STEPS, **common)


async def checked_base_url(url: str, settings: Settings, field: str = "llm.base_url") -> str:
    """A caller's own LLM base URL, which e2a will call from the host: https, and every address
    its host resolves to public, or a host the operator allowed (ssrf.check_url; each connection
    is checked again). Without a trailing slash. Else 400 invalid_field naming `field`."""
    try:
        return await ssrf.check_url(url, ssrf.Policy.from_settings(settings))
    except ssrf.UrlRefused as exc:
        raise ApiError(400, "invalid_field", exc.about(field), field) from None


def task_out(t: Task) -> TaskOut:
    return TaskOut(task_id=t.id, agent=t.agent, vendor=t.vendor, model=t.model, state=t.state,
                   started_at=t.started_at, ended_at=t.ended_at, result=t.result, error=t.error,
                   llm_requests=t.llm_requests, input_tokens=t.input_tokens,
                   output_tokens=t.output_tokens, key_passed_in=t.key_passed_in)


async def _latest(request: Request, user: Caller, vm_id: str) -> Task:
    rec = await owned_sandbox(request.app, user, vm_id)
    t = await tasks(request).latest(rec.id)
    if t is None:
        raise ApiError(404, "task_not_found", f"sandbox {rec.id} has had no task", "vm_id")
    return t


@router.get("", response_model=TaskOut, responses={401: {}, 404: {}})
async def get_task(request: Request, vm_id: str, user: Caller = Depends(current_user)) -> TaskOut:
    """The sandbox's latest task: its state, result or error, and counts."""
    return task_out(await _latest(request, user, vm_id))


@router.post("", status_code=202, response_model=TaskOut,
             responses={401: {}, 404: {}, 409: {}, 503: {}})
async def follow_up(request: Request, vm_id: str, body: FollowUpRequest,
                    user: Caller = Depends(current_user)) -> TaskOut:
    """A further task for the sandbox's agent (a sandbox kept with keep_after_task_seconds)."""
    forwarded = request.headers.get(FORWARDED)
    if forwarded is not None and not tasks(request).forwarded_to_me(forwarded):
        raise ApiError(409, "task_conflict", "this follow-up was passed to a replica that is "
                       "not the one meant", "vm_id")
    hop = request.scope.get("state", {}).get("hop")  # signed by the replica that passed it on
    if hop is not None and hop.body != body_digest(body.model_dump(exclude_unset=True)):
        raise ApiError(401, "unauthorized", NOT_VALID)
    rec = await owned_sandbox(request.app, user, vm_id)
    require_running(rec)
    s = tasks(request).session(rec.id)
    if s is not None and s.cli is not None:
        _check_model(s.cli, body.model)
    try:
        t = await tasks(request).submit(rec.id, body.task, body.model, body.task_timeout_seconds)
    except NoAgentHere as exc:
        target = None if FORWARDED in request.headers else \
            await tasks(request).agent_elsewhere(rec.id)
        if target is None:
            raise ApiError(409, "task_conflict", str(exc), "vm_id") from exc
        return await _forward(request, user, rec.id, *target, body)
    except TaskConflict as exc:
        raise ApiError(409, "task_conflict", str(exc), "vm_id") from exc
    return task_out(t)


async def _forward(request: Request, user: Caller, vm_id: str, url: str, key: int,
                   body: FollowUpRequest) -> JSONResponse:
    """The follow-up, passed to the replica that holds the agent (its key is in that
    replica's memory only); its answer, as it gave it. Passed on once at most, naming the
    replica meant (the header): one that is not it refuses. The caller's credential stays
    here: what goes is a token this replica signs for this request to that replica alone
    (api/hop_tokens.py). No proxy from the environment."""
    path = router.prefix.format(vm_id=vm_id)  # the id checked here, as the guard there reads it
    sent = body.model_dump(exclude_unset=True)
    hop = request.app.state.hop_tokens.issue(user.id, user.key_id, "POST", path, str(key), sent)
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT, trust_env=False) as client:
            r = await client.post(f"{url}{path}", json=sent,
                                  headers={"Authorization": f"Bearer {hop}",
                                           FORWARDED: str(key)})
            if r.status_code == 401:  # the hop token, not the caller's key (checked here):
                # its key changed meanwhile, an older e2a, clocks apart; a retry may do
                raise ApiError(503, "agent_unavailable", "the replica that runs this "
                               "sandbox's agent did not take the request; try again")
            return JSONResponse(r.json(), status_code=r.status_code)
    except (httpx.HTTPError, ValueError) as exc:
        raise ApiError(503, "agent_unavailable", "the replica that runs this sandbox's agent "
                       "did not answer; try again") from exc


@router.post("/cancel", response_model=TaskOut, responses={401: {}, 404: {}, 409: {}})
async def cancel(request: Request, vm_id: str, user: Caller = Depends(current_user)) -> TaskOut:
    t = await _latest(request, user, vm_id)
    if not await tasks(request).cancel(t.sandbox_id):
        raise ApiError(409, "task_not_running", f"task {t.id} is {t.state}", "vm_id")
    return task_out(await _latest(request, user, vm_id))


@router.get("/events", response_model=TaskEventsOut, responses={401: {}, 404: {}})
async def events(request: Request, vm_id: str, after: int = Query(0, ge=0, le=MAX_SEQ),
                 limit: int = Query(500, ge=1, le=5000),
                 follow: bool = Query(False, description="stream NDJSON, live, until the task "
                                      "is over"),
                 user: Caller = Depends(current_user)):
    """The agent's events after `after`, numbered from 1 over all the sandbox's tasks; kept after
    the sandbox ends. With follow=true: one JSON object per line as they happen."""
    rec = await owned_sandbox(request.app, user, vm_id)
    t = tasks(request)
    if follow:
        async def lines():
            async for e in t.follow(rec.id, after):
                yield json.dumps(_event(e).model_dump(mode="json")) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")
    s = t.session(rec.id)
    # before the read (as follow does): events stored before an end are in this batch
    elsewhere = s is None and await t.live_elsewhere(rec.id)
    batch = await t.events(rec.id, after, limit)
    live = (s.running or bool(s.pending)) if s is not None else elsewhere
    done = not live and len(batch) < limit
    return TaskEventsOut(events=[_event(e) for e in batch],
                         next=batch[-1].seq if batch else after, done=done)


def _event(e) -> TaskEventOut:
    return TaskEventOut(seq=e.seq, task_id=e.task_id, type=e.type, data=e.data, at=e.at)
