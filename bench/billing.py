"""Credits benchmarks (`make bench-billing`): what metering, the ledger and the funds check cost.

No server and no sandbox: each part makes a migrated store of its own, the way the server does
(e2a.store.db: SQLite in WAL mode with the server's engine; PostgreSQL with the server's pool of
10 + 20 connections), on SQLite in /tmp/e2a-bench-billing and, when E2A_TEST_PG_URL is set, on
that PostgreSQL in the schema `bench_billing` (dropped and made again for each store; no other
schema is touched). Everything runs in this one process on one event loop, as in `e2a serve`.

  ticks    For N running sandboxes (default 0, 10, 100, 256, 500, 2000; 256 is
           E2A_MAX_SANDBOXES's default), a fresh store with min(N, 50) users, the sandboxes'
           rows (standard size: 1 vCPU x 0.5, 512 MiB; owners round-robin) and each one's four
           transitions as tests/unit/test_metering.py's boot() writes them (creating,
           configuring, booting, running), inserted in bulk. Then, on the synthetic clock:
             first   one `Metering.tick(now)` 60 s after the boots: it applies the 4N new events
                     (opening N meters) and charges every meter (one sample per N).
             steady  T ticks (12; 4 for N >= 1000) 10 s apart, each charging every open meter
                     for its 10 s: wall time, this process's CPU time (time.process_time(),
                     aiosqlite's threads included), and on PostgreSQL the CPU time of every
                     `postgres` process on the machine (/proc; other users of that server count
                     too). Ledger rows a tick wrote = usage rows after - before; the ledger's
                     size on disk with its indexes per row (pg_total_relation_size; SQLite's
                     dbstat) once it holds 1000 rows or more.
             probes  for N in --probe-sizes (256, 2000): one more tick each while a probe runs
                     back to back beside it in the same event loop, and the same probe alone
                     (40 runs) for a baseline: `sandbox_write` (UPDATE of one sandbox row and
                     commit: what a create or a state transition writes), `ledger_post` (a post
                     of +1 micro-credit to a user the tick is charging: a purchase or a grant
                     arriving mid-tick), `funds_check` (Billing.funds_for around nothing: two reads).
  posts    Ledger throughput: C posts at once (50 and 200), each `ledger.post` in its own
           session and transaction, then commit; `hot` = every post to one account, `spread` =
           each post to its own account. R rounds (5) per case: posts/s of each round
           (C / wall time of the round), each post's latency, failures, this process's CPU time
           over the rounds' wall time, and the database connections the pool opened; afterwards
           every account touched is checked: cached balance == sum of its ledger rows.
  funds    `async with Billing.funds_for(user, "standard")` around nothing (Billing built with
           the store's own catalog, host and gateway None), for a user with 5 sandboxes
           running, 1000 calls back to back, and its parts alone: `first_minute("standard")`
           (the price, from the template's recipe, which recipes.load caches),
           `db.get(Account, user)` in a new session (the balance) and the catalog's list of the
           user's sandboxes (what they already run).
  storage  `Metering.charge_storage(now)` over W workspaces (1000, 50 users, sizes 1 MiB-4 GiB
           fixed by a seed): the first pass (opens the meters, writes no ledger row), then 5
           passes an hour apart (E2A_STORAGE_METERING_INTERVAL's default), each writing a
           ledger row per workspace.

Machine (nproc, memory, kernel, CPU model), library and server versions, and the load with the
other e2a servers and pytest processes on the machine are recorded before and after each part.
Results are printed and written to bench/billing.json.
Usage: python bench/billing.py [--only ticks,posts,funds,storage] [--sizes 0,10,100,256,500,2000]
                               [--ticks 12] [--probe-sizes 256,2000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy  # noqa: E402
import sqlalchemy.event  # noqa: E402
from sqlalchemy import func, insert, select, text, update  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from bench.common import others, pct, save  # noqa: E402
from e2a import auth  # noqa: E402
from e2a.billing import ledger  # noqa: E402
from e2a.billing.metering import Metering  # noqa: E402
from e2a.billing.rates import Rates  # noqa: E402
from e2a.billing.service import Billing  # noqa: E402
from e2a.config import Settings  # noqa: E402
from e2a.sandboxes.records import Records, StoreCatalog  # noqa: E402
from e2a.store import db as store  # noqa: E402
from e2a.store.models import (Account, LedgerEntry, Sandbox, SandboxEvent,  # noqa: E402
                              Workspace)

RESULTS = ROOT / "bench" / "billing.json"
BASE = Path("/tmp/e2a-bench-billing")
SCHEMA = "bench_billing"
PARTS = ["ticks", "posts", "funds", "storage"]
T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)
INTERVAL = 10.0                  # E2A_METERING_INTERVAL's default (s)
MAX_USERS = 50                   # sandboxes' and workspaces' owners


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---- figures ---------------------------------------------------------------------------------

def ms_summary(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def us_summary(us: list[float]) -> dict:
    return {"n": len(us), "p50_us": round(pct(us, 50), 1), "p95_us": round(pct(us, 95), 1),
            "min_us": round(min(us), 1), "max_us": round(max(us), 1)}


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every `postgres` process on the machine."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name == "postgres":
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / hz


def machine() -> dict:
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))) * 1024
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               None)
    import aiosqlite
    import asyncpg
    import sqlite3
    return {"nproc": os.cpu_count(), "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "cpu": cpu, "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__, "aiosqlite": aiosqlite.__version__,
            "asyncpg": asyncpg.__version__, "sqlite": sqlite3.sqlite_version}


# ---- stores ----------------------------------------------------------------------------------

class Store:
    """A fresh migrated store with `users` users, each opened with 1,000,000 credits."""

    def __init__(self, backend: str, name: str):
        self.backend, self.name = backend, name

    async def __aenter__(self) -> Store:
        if self.backend == "sqlite":
            BASE.mkdir(parents=True, exist_ok=True)
            for f in BASE.glob(f"{self.name}.db*"):
                f.unlink()
            self.engine = store.make_engine(f"sqlite+aiosqlite:///{BASE / self.name}.db")
        else:
            url = os.environ["E2A_TEST_PG_URL"]
            admin = create_async_engine(url)
            async with admin.begin() as conn:
                await conn.execute(text(f'drop schema if exists "{SCHEMA}" cascade'))
                await conn.execute(text(f'create schema "{SCHEMA}"'))
            await admin.dispose()
            # the server's pool (e2a.store.db.make_engine), in the benchmark's own schema
            self.engine = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True,
                connect_args={"server_settings": {"search_path": SCHEMA}})
        self.connects = 0

        @sqlalchemy.event.listens_for(self.engine.sync_engine, "connect")
        def _count(*_):
            self.connects += 1

        await store.migrate(self.engine)
        self.sessions = store.sessionmaker(self.engine)
        self.settings = Settings(data_dir=BASE)
        self.rates = Rates.from_settings(self.settings)
        return self

    async def add_users(self, n: int) -> list[str]:
        async with self.sessions() as db:
            ids = [(await auth.create_user(db, f"bench-{i}-{time.monotonic_ns()}@example.com",
                                           1_000_000)).id for i in range(n)]
            await db.commit()
        return ids

    async def __aexit__(self, *exc) -> None:
        await self.engine.dispose()
        if self.backend == "postgresql":
            admin = create_async_engine(os.environ["E2A_TEST_PG_URL"])
            async with admin.begin() as conn:
                await conn.execute(text(f'drop schema if exists "{SCHEMA}" cascade'))
            await admin.dispose()

    async def count(self, *where) -> int:
        async with self.sessions() as db:
            return await db.scalar(select(func.count()).select_from(LedgerEntry).where(*where))

    async def ledger_bytes_per_row(self) -> float | None:
        """The ledger's size on disk with its indexes, per row."""
        async with self.sessions() as db:
            rows = await db.scalar(select(func.count()).select_from(LedgerEntry))
            if self.backend == "postgresql":
                size = await db.scalar(text("select pg_total_relation_size('ledger')"))
            else:
                size = await db.scalar(text(
                    "select sum(pgsize) from dbstat where name in (select name from "
                    "sqlite_master where tbl_name = 'ledger')"))
        return round(size / rows, 1) if rows >= 1000 else None

    async def consistent(self, users: list[str]) -> bool:
        """Every account's cached balance equals the sum of its ledger rows (one query)."""
        async with self.sessions() as db:
            sums = dict((await db.execute(
                select(LedgerEntry.user_id, func.sum(LedgerEntry.amount_micro))
                .where(LedgerEntry.user_id.in_(users)).group_by(LedgerEntry.user_id))).all())
            balances = dict((await db.execute(
                select(Account.user_id, Account.balance_micro)
                .where(Account.user_id.in_(users)))).all())
        return all(balances[u] == int(sums.get(u) or 0) for u in users)


def sandbox_row(sid: str, user: str | None, state: str) -> dict:
    """As tests/unit/test_metering.py's sandbox() writes one (the standard size)."""
    return dict(id=sid, user_id=user, template="standard", state=state, vcpu=1,
                cpu_fraction=0.5, memory_mib=512, internet=True, metadata_={}, env_vars={},
                idle_timeout_seconds=60, max_lifetime_seconds=7200, slot=None, envd_token="",
                created_at=T0, expires_at=at(7200))


async def add_running_sandbox(s: Store, sid: str, user: str) -> None:
    async with s.sessions() as db:
        await db.execute(insert(Sandbox), [sandbox_row(sid, user, "running")])
        await db.commit()


async def boot_many(s: Store, n: int, users: list[str]) -> None:
    """N sandboxes running, each with boot()'s four transitions, in one transaction."""
    sandboxes, events = [], []
    for i in range(n):
        sid = f"sbx_bench{i:06d}"
        sandboxes.append(sandbox_row(sid, users[i % len(users)], "running"))
        for old, new, when, reason in ((None, "creating", 0, "create"),
                                       ("creating", "configuring", 0.1, None),
                                       ("configuring", "booting", 0.2, None),
                                       ("booting", "running", 1.0, None)):
            events.append(dict(sandbox_id=sid, from_state=old, to_state=new, reason=reason,
                               at=at(when)))
    async with s.sessions() as db:
        # a sandbox waiting in the pool (no user, no events): the sandbox_write probe's row
        await db.execute(insert(Sandbox), [sandbox_row("sbx_probe", None, "creating")])
        if n:
            await db.execute(insert(Sandbox), sandboxes)
            await db.execute(insert(SandboxEvent), events)
        await db.commit()


# ---- ticks -----------------------------------------------------------------------------------

async def timed_tick(s: Store, m: Metering, now: datetime) -> dict:
    before = await s.count(LedgerEntry.kind == "usage")
    pg0 = postgres_cpu_s() if s.backend == "postgresql" else 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    await m.tick(now=now)
    wall, cpu = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
    pg = (postgres_cpu_s() - pg0) * 1000 if s.backend == "postgresql" else None
    rows = await s.count(LedgerEntry.kind == "usage") - before
    return {"wall_ms": wall, "cpu_ms": cpu, "pg_cpu_ms": pg, "rows": rows}


def probe_fns(s: Store, users: list[str], billing: Billing) -> dict:
    async def sandbox_write(i: int) -> None:
        async with s.sessions() as db:
            await db.execute(update(Sandbox).where(Sandbox.id == "sbx_probe")
                             .values(host_reason=f"probe {i}"))
            await db.commit()

    async def ledger_post(i: int) -> None:
        async with s.sessions() as db:
            await ledger.post(db, users[0], 1, "adjustment", f"bench probe {i}")
            await db.commit()

    async def funds_check(i: int) -> None:
        async with billing.funds_for(users[0], "standard"):
            pass

    return {"sandbox_write": sandbox_write, "ledger_post": ledger_post,
            "funds_check": funds_check}


async def probe_during_tick(s: Store, m: Metering, now: datetime, fn) -> dict:
    """Run `fn` back to back while one tick runs; the probes that overlapped the tick."""
    lat: list[float] = []
    stop = asyncio.Event()

    async def loop() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            await fn(i)
            lat.append((time.perf_counter() - t) * 1000)
            i += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    lat.clear()
    t0 = time.perf_counter()
    await m.tick(now=now)
    tick_ms = (time.perf_counter() - t0) * 1000
    stop.set()
    await task
    return {"tick_ms": round(tick_ms, 1), "probe": ms_summary(lat)}


async def probe_alone(fn, n: int = 40) -> dict:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        await fn(i)
        lat.append((time.perf_counter() - t) * 1000)
    return ms_summary(lat)


async def ticks_level(backend: str, n: int, samples: int, probe: bool) -> dict:
    async with Store(backend, f"ticks{n}") as s:
        users = await s.add_users(max(1, min(n, MAX_USERS)))
        t = time.perf_counter()
        await boot_many(s, n, users)
        setup_s = time.perf_counter() - t
        m = Metering(s.sessions, s.settings, s.rates)
        first = await timed_tick(s, m, at(60))
        steady = [await timed_tick(s, m, at(60 + INTERVAL * (k + 1))) for k in range(samples)]
        out = {
            "sandboxes": n, "users": len(users), "setup_s": round(setup_s, 2),
            "first_tick": {"events_applied": 4 * n, "wall_ms": round(first["wall_ms"], 1),
                           "cpu_ms": round(first["cpu_ms"], 1),
                           "pg_cpu_ms": first["pg_cpu_ms"] and round(first["pg_cpu_ms"], 1),
                           "ledger_rows": first["rows"]},
            "tick_ms": ms_summary([x["wall_ms"] for x in steady]),
            "tick_cpu_ms": ms_summary([x["cpu_ms"] for x in steady]),
            "ledger_rows_per_tick": sorted({x["rows"] for x in steady}),
        }
        if backend == "postgresql":
            out["tick_pg_cpu_ms"] = ms_summary([x["pg_cpu_ms"] for x in steady])
        if n:
            out["tick_ms_per_sandbox"] = round(pct([x["wall_ms"] for x in steady], 50) / n, 3)
        out["consistent"] = await s.consistent(users)
        out["ledger_bytes_per_row"] = await s.ledger_bytes_per_row()
        if probe:
            catalog = StoreCatalog(Records(s.sessions), lambda _: None, "bench")
            billing = Billing(s.sessions, s.settings, None, catalog, None)
            fns = probe_fns(s, users, billing)
            k = samples + 1
            out["probes"] = {}
            for name, fn in fns.items():
                alone = await probe_alone(fn)
                during = await probe_during_tick(s, m, at(60 + INTERVAL * k), fn)
                k += 1
                out["probes"][name] = {"alone": alone, **during}
            out["consistent_after_probes"] = await s.consistent(users)
        return out


async def ticks_part(args, backends: list[str]) -> dict:
    sizes = [int(x) for x in args.sizes.split(",")]
    probe_sizes = {int(x) for x in args.probe_sizes.split(",") if x}
    res: dict = {"interval_s": INTERVAL}
    for backend in backends:
        res[backend] = {}
        for n in sizes:
            samples = args.ticks if n < 1000 else max(3, args.ticks // 3)
            r = await ticks_level(backend, n, samples, n in probe_sizes)
            res[backend][str(n)] = r
            share = r["tick_cpu_ms"]["p50_ms"] / (INTERVAL * 1000) * 100
            pg = (f" + postgres {r['tick_pg_cpu_ms']['p50_ms']:.0f} ms"
                  if backend == "postgresql" else "")
            print(f"  {backend:10s} N={n:5d}: first tick ({4 * n} events) "
                  f"{r['first_tick']['wall_ms']:8.1f} ms; tick p50 {r['tick_ms']['p50_ms']:8.1f}"
                  f" p95 {r['tick_ms']['p95_ms']:8.1f} ms (n={r['tick_ms']['n']}), cpu p50 "
                  f"{r['tick_cpu_ms']['p50_ms']:.0f} ms{pg} = {share:.2f} % of a core at "
                  f"{INTERVAL:g} s; rows/tick {r['ledger_rows_per_tick']}, "
                  f"ledger B/row {r['ledger_bytes_per_row']}, consistent {r['consistent']}",
                  flush=True)
            for name, p in r.get("probes", {}).items():
                print(f"      {name:13s} alone p50 {p['alone']['p50_ms']:6.2f} ms; during a "
                      f"{p['tick_ms']:.0f} ms tick p50 {p['probe'].get('p50_ms')} max "
                      f"{p['probe'].get('max_ms')} ms (n={p['probe']['n']})", flush=True)
    return res


# ---- ledger posts ----------------------------------------------------------------------------

async def posts_part(args, backends: list[str]) -> dict:
    res: dict = {}
    concurrency = [int(x) for x in args.concurrency.split(",")]
    for backend in backends:
        res[backend] = {}
        async with Store(backend, "posts") as s:
            users = await s.add_users(max(concurrency) + 1)
            for c in concurrency:
                for mode in ("hot", "spread"):
                    rates, lat, failed, errors = [], [], 0, set()
                    connects0, c0, wall = s.connects, time.process_time(), 0.0
                    for r in range(args.rounds):
                        async def one(i: int) -> None:
                            nonlocal failed
                            user = users[0] if mode == "hot" else users[1 + i]
                            t = time.perf_counter()
                            try:
                                async with s.sessions() as db:
                                    await ledger.post(db, user, 1000 + i, "adjustment",
                                                      f"bench post {r}/{i}")
                                    await db.commit()
                            except Exception as exc:  # counted, not fatal
                                failed += 1
                                errors.add(f"{type(exc).__name__}: {str(exc)[:120]}")
                                return
                            lat.append((time.perf_counter() - t) * 1000)

                        t0 = time.perf_counter()
                        await asyncio.gather(*(one(i) for i in range(c)))
                        rates.append(c / (time.perf_counter() - t0))
                        wall += time.perf_counter() - t0
                    cpu_share = (time.process_time() - c0) / wall
                    touched = users[:1] if mode == "hot" else users[1:1 + c]
                    ok = await s.consistent(touched)
                    entry = {"concurrent": c, "rounds": args.rounds,
                             "posts_per_s": {"p50": round(pct(rates, 50), 1),
                                             "min": round(min(rates), 1),
                                             "max": round(max(rates), 1)},
                             "post_latency": ms_summary(lat), "failed": failed,
                             "process_cpu_share": round(cpu_share, 2),
                             "new_connections": s.connects - connects0,
                             "errors": sorted(errors), "balance_equals_ledger_sum": ok}
                    res[backend][f"{mode}_{c}"] = entry
                    print(f"  {backend:10s} {mode:6s} x{c:3d}: {entry['posts_per_s']['p50']:7.1f}"
                          f" posts/s (rounds {entry['posts_per_s']['min']}-"
                          f"{entry['posts_per_s']['max']}), post p50 "
                          f"{entry['post_latency'].get('p50_ms')} p95 "
                          f"{entry['post_latency'].get('p95_ms')} ms, failed {failed}, "
                          f"cpu {cpu_share:.0%} of a core, new connections "
                          f"{entry['new_connections']}, "
                          f"balance == ledger sum: {ok}", flush=True)
    return res


# ---- the funds check -------------------------------------------------------------------------

async def funds_part(args, backends: list[str]) -> dict:
    res: dict = {}
    for backend in backends:
        async with Store(backend, "funds") as s:
            users = await s.add_users(1)
            catalog = StoreCatalog(Records(s.sessions), lambda _: None, "bench")
            billing = Billing(s.sessions, s.settings, None, catalog, None)
            for i in range(5):  # what the user already runs: counted by the check
                await add_running_sandbox(s, f"sbx_funds{i}", users[0])

            async def require() -> None:
                async with billing.funds_for(users[0], "standard"):
                    pass

            async def list_sandboxes() -> None:
                await catalog.list(users[0])

            async def get_account() -> None:
                async with s.sessions() as db:
                    await db.get(Account, users[0])

            async def first_minute() -> None:
                billing.first_minute("standard")

            out = {}
            for name, fn in (("funds_for", require), ("db_get_account", get_account),
                             ("catalog_list", list_sandboxes), ("first_minute", first_minute)):
                for _ in range(50):  # warm-up: the pool's connections, the statement cache
                    await fn()
                us = []
                for _ in range(args.funds_calls):
                    t = time.perf_counter()
                    await fn()
                    us.append((time.perf_counter() - t) * 1e6)
                out[name] = us_summary(us)
                print(f"  {backend:10s} {name:15s} p50 {out[name]['p50_us']:7.1f} µs, p95 "
                      f"{out[name]['p95_us']:7.1f} µs (n={len(us)})", flush=True)
            res[backend] = out
    return res


# ---- storage ---------------------------------------------------------------------------------

async def storage_part(args, backends: list[str]) -> dict:
    res: dict = {}
    rnd = random.Random(11)
    sizes = [rnd.randint(1 << 20, 4 << 30) for _ in range(args.workspaces)]
    for backend in backends:
        async with Store(backend, "storage") as s:
            users = await s.add_users(min(args.workspaces, MAX_USERS))
            async with s.sessions() as db:
                await db.execute(insert(Workspace), [
                    dict(id=f"wsp_bench{i:06d}", user_id=users[i % len(users)],
                         end_user_id=f"eu{i}", app_id="app", capset_id="c", created_at=T0,
                         last_used_at=T0, bytes_used=size, file_count=10)
                    for i, size in enumerate(sizes)])
                await db.commit()
            m = Metering(s.sessions, s.settings, s.rates)
            t = time.perf_counter()
            await m.charge_storage(now=at(0))
            first_ms = (time.perf_counter() - t) * 1000
            passes, rows = [], set()
            for k in range(1, args.storage_passes + 1):
                before = await s.count(LedgerEntry.kind == "storage")
                c0, t = time.process_time(), time.perf_counter()
                await m.charge_storage(now=at(3600 * k))
                passes.append(((time.perf_counter() - t) * 1000, (time.process_time() - c0) * 1000))
                rows.add(await s.count(LedgerEntry.kind == "storage") - before)
            out = {"workspaces": args.workspaces, "users": len(users),
                   "first_pass_ms": round(first_ms, 1),
                   "pass_ms": ms_summary([p[0] for p in passes]),
                   "pass_cpu_ms": ms_summary([p[1] for p in passes]),
                   "ledger_rows_per_pass": sorted(rows),
                   "consistent": await s.consistent(users)}
            res[backend] = out
            print(f"  {backend:10s} {args.workspaces} workspaces: first pass {first_ms:.0f} ms; "
                  f"pass p50 {out['pass_ms']['p50_ms']:.0f} p95 {out['pass_ms']['p95_ms']:.0f} ms"
                  f" (cpu p50 {out['pass_cpu_ms']['p50_ms']:.0f} ms), rows/pass {sorted(rows)}, "
                  f"consistent {out['consistent']}", flush=True)
    return res


# ---- main ------------------------------------------------------------------------------------

async def pg_version() -> str | None:
    url = os.environ.get("E2A_TEST_PG_URL")
    if not url:
        return None
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        version = await conn.scalar(text("show server_version"))
    await engine.dispose()
    return version


async def run(args, out: dict) -> None:
    backends = [b for b in args.backends.split(",")
                if b == "sqlite" or (b == "postgresql" and os.environ.get("E2A_TEST_PG_URL"))]
    out["backends"] = backends
    out["machine"]["postgresql"] = await pg_version()
    parts = {"ticks": ticks_part, "posts": posts_part, "funds": funds_part,
             "storage": storage_part}
    for part in PARTS:
        if part not in args.only.split(","):
            continue
        print(f"{part}:", flush=True)
        before, t = others(), time.perf_counter()
        res = await parts[part](args, backends)
        res["others_before"], res["others_after"] = before, others()
        res["took_s"] = round(time.perf_counter() - t, 1)
        out[part] = res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--backends", default="sqlite,postgresql",
                    help="postgresql only when E2A_TEST_PG_URL is set")
    ap.add_argument("--sizes", default="0,10,100,256,500,2000")
    ap.add_argument("--ticks", type=int, default=12)
    ap.add_argument("--probe-sizes", default="256,2000")
    ap.add_argument("--concurrency", default="50,200")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--funds-calls", type=int, default=1000)
    ap.add_argument("--workspaces", type=int, default=1000)
    ap.add_argument("--storage-passes", type=int, default=5)
    args = ap.parse_args()
    out: dict = {"taken": datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "args": vars(args), "others_at_start": others()}
    t = time.perf_counter()
    try:
        asyncio.run(run(args, out))
    finally:
        shutil.rmtree(BASE, ignore_errors=True)
    out["took_s"] = round(time.perf_counter() - t, 1)
    out["others_at_end"] = others()
    save(RESULTS, out, partial=set(args.only.split(",")) != set(PARTS))
    print(f"took {out['took_s']} s; written to {RESULTS}")


if __name__ == "__main__":
    main()
