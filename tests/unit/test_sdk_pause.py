"""Pause, resume and fork in the SDK (sync and async), against a fake e2a API behind an
httpx.MockTransport.

The fake follows the HTTP contract of pause/resume/fork: POST /v1/sandboxes takes ``on_idle`` and
``auto_resume``; ``/pause`` and ``/resume`` answer the sandbox (200), ``/fork`` 201
``{"sandboxes": [...]}``; errors are the usual ``{"error": {...}}`` bodies (409 invalid_state and
not_forkable, 503 resume_failed, 402, 429, 409 no_capacity). It keeps each sandbox's state, so a
paused sandbox really is paused for the next call, and records every request.
"""

from __future__ import annotations

import asyncio
import inspect
import json

import httpx
import pytest

from e2a.sdk import E2A, AsyncE2A, E2AError, InsufficientCredits, ResumeFailed, Sandbox
from e2a.sdk import _core

KEY = "test-key"
API = "http://e2a.test"
GiB = 1 << 30

# A SandboxOut as a server with pause gives it.
BASE = {"state": "running", "template": "standard", "vcpu": 1, "cpu_fraction": 0.5, "memory_mib": 512,
        "internet": True, "metadata": {}, "idle_timeout_seconds": 60, "max_lifetime_seconds": 3600,
        "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T01:00:00Z",
        "destroyed_at": None, "end_reason": None, "workspace_id": None, "on_idle": "destroy",
        "auto_resume": False, "paused_at": None, "pause_expires_at": None, "disk_bytes": None,
        "forked_from": None}

# The same as a server from before pause gives it: none of the new fields.
OLD = {k: v for k, v in BASE.items()
       if k not in ("on_idle", "auto_resume", "paused_at", "pause_expires_at", "disk_bytes", "forked_from")}

PAUSED_AT = "2026-01-01T00:10:00Z"
PAUSE_EXPIRES = "2026-01-02T00:10:00Z"
DISK = 3 * GiB // 2  # 1.5 GiB


def err(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "field": field}})


def sandboxes() -> dict[str, dict]:
    """The fake's sandboxes, fresh for each test."""
    return {
        "sbx_run": {**BASE, "vm_id": "sbx_run", "on_idle": "pause", "auto_resume": True},
        "sbx_paused": {**BASE, "vm_id": "sbx_paused", "state": "paused", "on_idle": "pause",
                       "paused_at": PAUSED_AT, "pause_expires_at": PAUSE_EXPIRES, "disk_bytes": DISK},
        "sbx_ws": {**BASE, "vm_id": "sbx_ws", "workspace_id": "ws_1"},
        "sbx_dead": {**BASE, "vm_id": "sbx_dead", "state": "destroyed", "destroyed_at": "2026-01-01T00:05:00Z",
                     "end_reason": "paused_expired"},
        # resume fails once (the restore broke), then works
        "sbx_flaky": {**BASE, "vm_id": "sbx_flaky", "state": "paused", "paused_at": PAUSED_AT,
                      "pause_expires_at": PAUSE_EXPIRES, "disk_bytes": 1024},
        # forks of these are refused for lack of credits, of room in the user's limit, of host capacity
        "sbx_broke": {**BASE, "vm_id": "sbx_broke"},
        "sbx_limit": {**BASE, "vm_id": "sbx_limit"},
        "sbx_full": {**BASE, "vm_id": "sbx_full"},
        # from an older server: no pause fields at all
        "sbx_old": {**OLD, "vm_id": "sbx_old"},
    }


class Fake:
    """httpx handler: the sandbox routes of pause/resume/fork, with state kept between calls."""

    def __init__(self):
        self.requests: list[dict] = []
        self.boxes = sandboxes()
        self.resume_failures = {"sbx_flaky": 1}
        self.forks = 0

    def last(self) -> dict:
        return self.requests[-1]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        rec = {"method": request.method, "path": request.url.path, "body": body,
               "json": json.loads(body) if body else None, "headers": dict(request.headers),
               "timeout": request.extensions.get("timeout")}
        self.requests.append(rec)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return err(401, "unauthorized", "bad api key")
        seg = request.url.path.strip("/").split("/")
        if seg == ["v1", "sandboxes"]:
            if request.method == "POST":
                return self.create(rec["json"])
            return httpx.Response(200, json=list(self.boxes.values()))
        vm_id, rest = seg[2], seg[3:]
        sb = self.boxes.get(vm_id)
        if sb is None:
            return err(404, "not_found", f"no sandbox {vm_id}")
        if rest == [] and request.method == "GET":
            return httpx.Response(200, json=sb)
        if rest == ["pause"] and request.method == "POST":
            return self.pause(sb)
        if rest == ["resume"] and request.method == "POST":
            return self.resume(sb)
        if rest == ["fork"] and request.method == "POST":
            return self.fork(sb, rec["json"] or {})
        return err(404, "not_found", f"no route {request.method} {request.url.path}")

    def create(self, body: dict) -> httpx.Response:
        if body.get("on_idle") not in (None, "destroy", "pause"):
            return err(422, "validation_error", "on_idle: Input should be 'destroy' or 'pause'", "on_idle")
        sb = {**BASE, "vm_id": "sbx_new", "template": body["template"],
              "on_idle": body.get("on_idle", "destroy"), "auto_resume": body.get("auto_resume", False)}
        self.boxes["sbx_new"] = sb
        return httpx.Response(201, json=sb)

    def pause(self, sb: dict) -> httpx.Response:
        if sb["state"] != "running":
            return err(409, "invalid_state", f"sandbox {sb['vm_id']} is {sb['state']}, not running")
        sb.update(state="paused", paused_at=PAUSED_AT, pause_expires_at=PAUSE_EXPIRES, disk_bytes=DISK)
        return httpx.Response(200, json=sb)

    def resume(self, sb: dict) -> httpx.Response:
        if sb["state"] != "paused":
            return err(409, "invalid_state", f"sandbox {sb['vm_id']} is {sb['state']}, not paused")
        if self.resume_failures.get(sb["vm_id"]):
            self.resume_failures[sb["vm_id"]] -= 1
            return err(503, "resume_failed", f"restoring sandbox {sb['vm_id']} failed: runsc restore "
                                             "exited 1; it is still paused")
        sb.update(state="running", paused_at=None, pause_expires_at=None, disk_bytes=None)
        return httpx.Response(200, json=sb)

    def fork(self, sb: dict, body: dict) -> httpx.Response:
        count = body.get("count", 1)
        if not isinstance(count, int) or not 1 <= count <= 10:
            return err(422, "validation_error", "count: Input should be less than or equal to 10", "count")
        if sb["state"] != "running":
            return err(409, "invalid_state", f"sandbox {sb['vm_id']} is {sb['state']}, not running")
        if sb["workspace_id"]:
            return err(409, "not_forkable", f"sandbox {sb['vm_id']} has a workspace: it cannot be forked")
        if sb["vm_id"] == "sbx_broke":
            return err(402, "insufficient_credits", "balance 0.10 credits; a sandbox's first minute costs 0.20")
        if sb["vm_id"] == "sbx_limit":
            return err(429, "sandbox_limit", "at most 10 sandboxes at once: 9 running, 3 asked")
        if sb["vm_id"] == "sbx_full":
            return err(409, "no_capacity", "the host has no room for 2 more sandboxes")
        out = []
        for _ in range(count):
            self.forks += 1
            new = {**sb, "vm_id": f"sbx_fork{self.forks}", "forked_from": sb["vm_id"],
                   "created_at": "2026-01-01T00:20:00Z"}
            self.boxes[new["vm_id"]] = new
            out.append(new)
        return httpx.Response(201, json={"sandboxes": out})


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake):
    with E2A(API, KEY, transport=httpx.MockTransport(fake)) as c:
        yield c


def aclient(fake) -> AsyncE2A:
    return AsyncE2A(API, KEY, transport=httpx.MockTransport(fake))


# ====================================================================== create: on_idle, auto_resume


def test_create_sends_on_idle_and_auto_resume_only_when_given(client, fake):
    sb = client.create_sandbox("standard")
    assert fake.last()["json"] == {"template": "standard"}  # an old server takes this as before
    assert (sb.on_idle, sb.auto_resume) == ("destroy", False)

    sb = client.create_sandbox("browser", on_idle="pause", auto_resume=True, idle_timeout_seconds=120)
    assert fake.last()["json"] == {"template": "browser", "idle_timeout_seconds": 120, "on_idle": "pause",
                                   "auto_resume": True}
    assert (sb.on_idle, sb.auto_resume) == ("pause", True)

    # An explicit False is sent (it is a choice, not an omission); so is "destroy".
    client.create_sandbox(on_idle="destroy", auto_resume=False)
    assert fake.last()["json"] == {"template": "standard", "on_idle": "destroy", "auto_resume": False}


def test_create_leaves_on_idle_values_to_the_server(client, fake):
    with pytest.raises(E2AError) as e:
        client.create_sandbox(on_idle="hibernate")
    assert (e.value.status, e.value.code, e.value.field) == (422, "validation_error", "on_idle")
    assert fake.last()["json"]["on_idle"] == "hibernate"


# ====================================================================== pause, resume


def test_pause_posts_no_body_and_parses_the_paused_sandbox(client, fake):
    sb = client.pause("sbx_run")
    req = fake.last()
    assert (req["method"], req["path"], req["body"]) == ("POST", "/v1/sandboxes/sbx_run/pause", b"")
    assert isinstance(sb, Sandbox) and sb.vm_id == "sbx_run"
    assert sb.state == "paused" and sb.paused
    assert (sb.paused_at, sb.pause_expires_at, sb.disk_bytes) == (PAUSED_AT, PAUSE_EXPIRES, DISK)
    assert (sb.on_idle, sb.auto_resume, sb.forked_from) == ("pause", True, None)
    assert fake.boxes["sbx_run"]["state"] == "paused"


def test_resume_posts_no_body_and_clears_the_pause_fields(client, fake):
    sb = client.resume("sbx_paused")
    req = fake.last()
    assert (req["method"], req["path"], req["body"]) == ("POST", "/v1/sandboxes/sbx_paused/resume", b"")
    assert sb.state == "running" and not sb.paused
    assert (sb.paused_at, sb.pause_expires_at, sb.disk_bytes) == (None, None, None)


def test_bound_methods_and_sandbox_objects_as_ids(client, fake):
    sb = client.get_sandbox("sbx_run")
    paused = sb.pause()
    assert paused.state == "paused" and paused._client is client
    assert sb.state == "running"  # the object is a snapshot: the call returns a fresh one
    running = client.resume(paused)  # a Sandbox works wherever an id does
    assert fake.last()["path"] == "/v1/sandboxes/sbx_run/resume" and running.state == "running"
    copies = running.fork(2)
    assert fake.last()["json"] == {"count": 2} and [c.forked_from for c in copies] == ["sbx_run"] * 2


def test_pause_and_resume_wait_longer_than_a_plain_call(client, fake):
    """Checkpointing memory to disk takes a while on a big sandbox: not the 60 s of a plain call."""
    client.pause("sbx_run")
    assert fake.last()["timeout"]["read"] == _core.CHECKPOINT_TIMEOUT.read > _core.DEFAULT_TIMEOUT.read
    client.resume("sbx_run")
    assert fake.last()["timeout"]["read"] == _core.CHECKPOINT_TIMEOUT.read
    client.fork("sbx_run")
    assert fake.last()["timeout"]["read"] == _core.CHECKPOINT_TIMEOUT.read
    client.get_sandbox("sbx_run")
    assert fake.last()["timeout"]["read"] == _core.DEFAULT_TIMEOUT.read


def test_pause_and_resume_in_the_wrong_state_are_409_invalid_state(client, fake):
    with pytest.raises(E2AError) as e:
        client.pause("sbx_paused")
    assert (e.value.status, e.value.code) == (409, "invalid_state")
    assert e.value.message == "sandbox sbx_paused is paused, not running"
    with pytest.raises(E2AError) as e:
        client.pause("sbx_dead")
    assert e.value.code == "invalid_state" and "destroyed" in e.value.message
    with pytest.raises(E2AError) as e:
        client.resume("sbx_run")
    assert (e.value.status, e.value.code) == (409, "invalid_state") and "running" in e.value.message
    assert not isinstance(e.value, ResumeFailed)
    with pytest.raises(E2AError) as e:
        client.resume("nope")
    assert (e.value.status, e.value.code) == (404, "not_found")


def test_a_failed_restore_is_resume_failed_and_a_retry_may_work(client, fake):
    with pytest.raises(ResumeFailed) as e:
        client.resume("sbx_flaky")
    assert isinstance(e.value, E2AError)  # catching E2AError, or matching the code, works as well
    assert (e.value.status, e.value.code) == (503, "resume_failed")
    assert "still paused" in e.value.message
    assert client.get_sandbox("sbx_flaky").state == "paused"
    assert client.resume("sbx_flaky").state == "running"  # the retry
    assert [r["path"] for r in fake.requests].count("/v1/sandboxes/sbx_flaky/resume") == 2


# ====================================================================== fork


def test_fork_sends_the_count_and_parses_every_copy(client, fake):
    copies = client.fork("sbx_run", count=3)
    req = fake.last()
    assert (req["method"], req["path"], req["json"]) == ("POST", "/v1/sandboxes/sbx_run/fork", {"count": 3})
    assert [c.vm_id for c in copies] == ["sbx_fork1", "sbx_fork2", "sbx_fork3"]
    assert all(isinstance(c, Sandbox) and c.state == "running" and c.forked_from == "sbx_run"
               and c._client is client for c in copies)
    assert copies[0].on_idle == "pause" and copies[0].auto_resume is True  # the source's settings


def test_fork_defaults_to_one_copy(client, fake):
    copies = client.fork("sbx_run")
    assert fake.last()["json"] == {"count": 1} and len(copies) == 1


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "2", None])
def test_fork_refuses_what_can_never_be_a_count_before_any_request(client, fake, count):
    with pytest.raises(E2AError) as e:
        client.fork("sbx_run", count=count)
    assert (e.value.status, e.value.code, e.value.field) == (0, "invalid_count", "count")
    assert fake.requests == []


def test_fork_leaves_the_upper_bound_to_the_server(client, fake):
    with pytest.raises(E2AError) as e:
        client.fork("sbx_run", count=11)
    assert (e.value.status, e.value.code) == (422, "validation_error")
    assert fake.last()["json"] == {"count": 11}


@pytest.mark.parametrize("vm_id, status, code, cls, message", [
    ("sbx_paused", 409, "invalid_state", E2AError, "sandbox sbx_paused is paused, not running"),
    ("sbx_ws", 409, "not_forkable", E2AError, "sandbox sbx_ws has a workspace: it cannot be forked"),
    ("sbx_broke", 402, "insufficient_credits", InsufficientCredits,
     "balance 0.10 credits; a sandbox's first minute costs 0.20"),
    ("sbx_limit", 429, "sandbox_limit", E2AError, "at most 10 sandboxes at once: 9 running, 3 asked"),
    ("sbx_full", 409, "no_capacity", E2AError, "the host has no room for 2 more sandboxes"),
])
def test_fork_errors_are_mapped(client, fake, vm_id, status, code, cls, message):
    with pytest.raises(E2AError) as e:
        client.fork(vm_id, count=2)
    assert type(e.value) is cls
    assert (e.value.status, e.value.code, e.value.message) == (status, code, message)
    assert not [v for v in fake.boxes if v.startswith("sbx_fork")]


# ====================================================================== the model: old servers, nulls


def test_an_old_server_s_sandbox_takes_the_defaults(client):
    sb = client.get_sandbox("sbx_old")
    assert (sb.on_idle, sb.auto_resume, sb.paused_at, sb.pause_expires_at, sb.disk_bytes, sb.forked_from) == \
        ("destroy", False, None, None, None, None)
    assert sb.state == "running" and not sb.paused


def test_nulls_for_on_idle_and_auto_resume_are_the_defaults():
    sb = Sandbox.from_dict({"vm_id": "x", "on_idle": None, "auto_resume": None, "disk_bytes": None,
                            "field_from_the_future": 1})
    assert (sb.on_idle, sb.auto_resume, sb.disk_bytes) == ("destroy", False, None)
    sb = Sandbox.from_dict({"vm_id": "x", "state": "paused", "on_idle": "pause", "auto_resume": True,
                            "disk_bytes": 7, "forked_from": "sbx_a"})
    assert (sb.paused, sb.on_idle, sb.auto_resume, sb.disk_bytes, sb.forked_from) == (True, "pause", True, 7, "sbx_a")


def test_to_dict_carries_the_new_fields(client):
    data = client.pause("sbx_run").to_dict()
    assert {k: data[k] for k in ("state", "on_idle", "auto_resume", "paused_at", "pause_expires_at",
                                 "disk_bytes", "forked_from")} == \
        {"state": "paused", "on_idle": "pause", "auto_resume": True, "paused_at": PAUSED_AT,
         "pause_expires_at": PAUSE_EXPIRES, "disk_bytes": DISK, "forked_from": None}
    assert set(data) == set(BASE) | {"vm_id"}  # exactly the SandboxOut of the contract


def test_listing_parses_paused_and_forked_sandboxes(client):
    client.fork("sbx_run")
    boxes = {b.vm_id: b for b in client.list_sandboxes()}
    assert boxes["sbx_paused"].disk_bytes == DISK and boxes["sbx_paused"].paused
    assert boxes["sbx_fork1"].forked_from == "sbx_run"
    assert boxes["sbx_dead"].end_reason == "paused_expired"


# ====================================================================== async: same shapes


def test_async_client_mirrors_the_sync_one(fake):
    async def go():
        async with aclient(fake) as c:
            sb = await c.create_sandbox(on_idle="pause", auto_resume=True)
            assert fake.last()["json"] == {"template": "standard", "on_idle": "pause", "auto_resume": True}
            assert (sb.on_idle, sb.auto_resume) == ("pause", True)

            paused = await c.pause("sbx_run")
            assert (fake.last()["path"], fake.last()["body"]) == ("/v1/sandboxes/sbx_run/pause", b"")
            assert paused.paused and paused.disk_bytes == DISK and paused.pause_expires_at == PAUSE_EXPIRES
            running = await paused.resume()  # bound to the async client: a coroutine
            assert fake.last()["path"] == "/v1/sandboxes/sbx_run/resume" and running.state == "running"

            copies = await c.fork(running, count=2)
            assert fake.last()["json"] == {"count": 2}
            assert [(x.vm_id, x.forked_from) for x in copies] == [("sbx_fork1", "sbx_run"),
                                                                  ("sbx_fork2", "sbx_run")]
            assert all(x._client is c for x in copies)
            assert len(await copies[0].fork()) == 1 and fake.last()["json"] == {"count": 1}

            with pytest.raises(E2AError) as e:
                await c.pause("sbx_paused")
            assert (e.value.status, e.value.code) == (409, "invalid_state")
            with pytest.raises(ResumeFailed) as e:
                await c.resume("sbx_flaky")
            assert (e.value.status, e.value.code) == (503, "resume_failed")
            assert (await c.resume("sbx_flaky")).state == "running"
            with pytest.raises(E2AError) as e:
                await c.fork("sbx_ws")
            assert (e.value.status, e.value.code) == (409, "not_forkable")
            with pytest.raises(InsufficientCredits):
                await c.fork("sbx_broke")
            n = len(fake.requests)
            with pytest.raises(E2AError) as e:
                await c.fork("sbx_run", count=0)
            assert e.value.code == "invalid_count" and len(fake.requests) == n

    asyncio.run(go())


def test_sync_and_async_offer_the_same_pause_methods():
    for name in ("pause", "resume", "fork", "create_sandbox"):
        sync, async_ = (inspect.signature(getattr(cls, name)).parameters for cls in (E2A, AsyncE2A))
        assert list(sync.values()) == list(async_.values()), name
        assert inspect.iscoroutinefunction(getattr(AsyncE2A, name)), name
    params = inspect.signature(E2A.create_sandbox).parameters
    assert params["on_idle"].default is None and params["auto_resume"].default is None
    assert params["on_idle"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(E2A.fork).parameters["count"].default == 1
