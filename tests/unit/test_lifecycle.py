"""The lifecycle with fake resources: no host objects, a real (SQLite) store. What is checked is
the order of creates and destroys, the state machine, capacity and the event feed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from e2a.config import Settings
from e2a.sandboxes import resources, states
from e2a.sandboxes.host import CreateFailed, CreateSpec, DeletedDuringCreate, NoCapacity
from e2a.sandboxes.manager import Manager
from e2a.sandboxes.states import EndReason, IllegalTransition, State
from e2a.store import db as store

# anyio's pytest plugin (anyio comes with httpx) runs the async tests on asyncio.
pytestmark = pytest.mark.anyio

CALLS: list[tuple[str, str, str]] = []   # (action, kind, sandbox id)
FAIL_CREATE: set[str] = set()            # kinds whose create raises
FAIL_DESTROY: set[str] = set()           # kinds whose destroy raises
GATE: dict[str, asyncio.Event] = {}      # kinds whose create waits for the event


def fake(name: str) -> type[resources.Resource]:
    class Fake(resources.Resource):
        kind = name

        async def create(self) -> None:
            CALLS.append(("create", name, self.plan.id))
            if name in GATE:
                await GATE[name].wait()
            if name in FAIL_CREATE:
                raise RuntimeError(f"{name} failed")

        async def destroy(self) -> None:
            CALLS.append(("destroy", name, self.plan.id))
            if name in FAIL_DESTROY:
                raise RuntimeError(f"{name} stuck")

        @classmethod
        async def orphans(cls, env, keep):
            return []
    return Fake


KINDS = tuple(fake(n) for n in ("dir", "link", "rootfs", "container"))
NAMES = [k.kind for k in KINDS]


class FakeHostManager(Manager):
    """The real manager; only the steps that talk to a real sandbox are left out."""

    def check_runtime(self, recipe):
        return Path("/nonexistent-image")

    async def _agent_up(self, sb, env_vars):
        pass


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def mgr(tmp_path, monkeypatch):
    CALLS.clear(), FAIL_CREATE.clear(), FAIL_DESTROY.clear(), GATE.clear()
    settings = Settings(data_dir=tmp_path / "data", run_dir=tmp_path / "run",
                        max_sandboxes=3, pool_size=0)
    settings.data_dir.mkdir(parents=True)
    engine = store.make_engine(settings.database_url)
    await store.migrate(engine)
    m = FakeHostManager(settings, store.sessionmaker(engine), kinds=KINDS)
    yield m
    await m.http.close()
    await m.probe_http.close()
    await engine.dispose()


def spec(**kw) -> CreateSpec:
    return CreateSpec(user_id=None, template="standard", **kw)


def calls(action: str, sid: str) -> list[str]:
    return [k for a, k, s in CALLS if a == action and s == sid]


async def transitions(m: Manager, sid: str) -> list[tuple[str | None, str, str | None]]:
    return [(e.from_state, e.to_state, e.reason) for e in await m.catalog.events(sid)]


async def test_create_makes_every_unit_in_order_and_logs_each_transition(mgr):
    rec = await mgr.create(spec())
    assert rec.state == "running"
    assert calls("create", rec.id) == NAMES and calls("destroy", rec.id) == []
    assert [t[:2] for t in await transitions(mgr, rec.id)] == [
        (None, "creating"), ("creating", "configuring"), ("configuring", "booting"),
        ("booting", "running")]
    await mgr.destroy(rec.id, EndReason.DELETED)
    assert calls("destroy", rec.id) == NAMES[::-1]
    got = await mgr.catalog.get(rec.id)
    assert (got.state, got.end_reason) == ("destroyed", "deleted") and got.destroyed_at
    assert mgr.sandboxes == {} and mgr.slots == {}


@pytest.mark.parametrize("failing", NAMES)
async def test_a_failed_create_is_undone_by_the_one_teardown(mgr, failing):
    FAIL_CREATE.add(failing)
    with pytest.raises(CreateFailed):
        await mgr.create(spec())
    (sid,) = {s for _, _, s in CALLS}
    made = NAMES[:NAMES.index(failing) + 1]
    assert calls("create", sid) == made
    assert calls("destroy", sid) == NAMES[::-1]  # destroy is idempotent: all, in reverse
    got = await mgr.catalog.get(sid)
    assert (got.state, got.end_reason) == ("destroyed", "create_failed")
    assert mgr.sandboxes == {} and mgr.slots == {}
    assert ("booting", "running", "booted") not in await transitions(mgr, sid)


async def test_delete_during_boot_ends_destroyed_never_running(mgr):
    GATE["container"] = asyncio.Event()
    create = asyncio.create_task(mgr.create(spec()))
    while not any(k == "container" for _, k, _ in CALLS):
        await asyncio.sleep(0.001)
    (sid,) = mgr.sandboxes
    assert mgr.sandboxes[sid].state is State.BOOTING
    await mgr.destroy(sid, EndReason.DELETED)
    with pytest.raises(DeletedDuringCreate):
        await create
    got = await mgr.catalog.get(sid)
    assert (got.state, got.end_reason) == ("destroyed", "deleted")
    assert "running" not in [to for _, to, _ in await transitions(mgr, sid)]
    assert calls("destroy", sid) == NAMES[::-1]
    assert mgr.slots == {}


async def test_capacity_is_exact_under_concurrent_creates(mgr):
    GATE["rootfs"] = asyncio.Event()
    tasks = [asyncio.create_task(mgr.create(spec())) for _ in range(10)]
    await asyncio.sleep(0.05)
    GATE["rootfs"].set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert sum(isinstance(r, NoCapacity) for r in results) == 7
    assert len(mgr.sandboxes) == 3 and len(set(mgr.slots)) == 3


async def test_a_failed_teardown_stays_stopping_and_is_retried(mgr):
    rec = await mgr.create(spec())
    FAIL_DESTROY.add("link")
    await mgr.destroy(rec.id, EndReason.DELETED)
    got = await mgr.catalog.get(rec.id)
    assert got.state == "stopping" and rec.id in mgr.stuck
    assert mgr.slots  # its slot is not given to anyone while the link may still exist
    FAIL_DESTROY.clear()
    await mgr._reap_once()  # the retry runs in the background, not holding up the reaper
    for _ in range(500):
        got = await mgr.catalog.get(rec.id)
        if got.state == "destroyed":
            break
        await asyncio.sleep(0.01)
    assert (got.state, got.end_reason) == ("destroyed", "deleted")
    assert mgr.stuck == set() and mgr.slots == {}


async def test_death_is_destroyed_as_crashed(mgr):
    rec = await mgr.create(spec())
    mgr._on_death(rec.id, 4242)
    # the death is handled in a background task: wait for it to finish, not for the sandbox to
    # leave memory (its capacity is given back just before `destroyed` is recorded)
    await asyncio.wait(set(mgr._background))
    assert rec.id not in mgr.sandboxes
    got = await mgr.catalog.get(rec.id)
    assert (got.state, got.end_reason) == ("destroyed", "crashed")
    assert (await mgr.catalog.events(rec.id))[-1].detail.endswith("4242 of the sandbox exited")


def test_state_machine_refuses_illegal_moves():
    states.check("sbx_x", State.CREATING, State.CONFIGURING)
    states.check("sbx_x", State.RUNNING, State.STOPPING)
    for old, new in [(State.DESTROYED, State.RUNNING), (State.STOPPING, State.RUNNING),
                     (State.CREATING, State.RUNNING), (State.BOOTING, State.DESTROYED)]:
        with pytest.raises(IllegalTransition):
            states.check("sbx_x", old, new)
