"""Session benchmarks (`make bench-sessions`): how soon a session answers, how late its events
reach the client, and what an idle session costs the host.

A session (docs/sessions.md) is a sandbox of its own with the end user's workspace mounted and
e2a's own agent attached, driven over a WebSocket. Its sandbox always mounts a workspace, which
is bound at boot, so a session's sandbox is never served from the warm pool (docs/workspaces.md):
the server here runs with E2A_POOL_SIZE=0 (a pool would only hold sandboxes no session takes).
The provider is the tests' mock (tests/llm_mock) answering at once on the host's loopback; the
agent is e2a's own ("deictic") on Anthropic's protocol, model claude-sonnet-5-5, key in
llm.api_key. Every session has a new end user (user_id), so a new workspace (the template's
dotfiles copied in). Standard template (0.5 vCPU, 512 MiB).

  create    t0 just before POST /v1/sessions; then, in this order:
              post      the 201 has arrived (the sandbox runs, workspace mounted, agent attached)
              ready     the WebSocket is open and its first message, `ready`, received
              first     a task was sent ({"type": "task"}) right after `ready`; its first
                        numbered event, task_started, received
              finished  task_finished received (a one-turn task: the mock's final at once)
            Reported from t0 (create → ...) and as the part each step takes (POST, WS open =
            ready - post, first event = first - ready, the turn = finished - first). Also the
            server's boot steps for the session's sandbox (its log line "boot network+rootfs N,
            runsc N, envd N ms"; the mount is in network+rootfs) and the DELETE that ends it.
  latency   One session; T tasks, each one shell tool call whose command prints a line
            `L <i> $EPOCHREALTIME` every 100 ms for 4 s (40 lines), then a final message.
            For each numbered event received: recv - at, where recv is time.time() when the
            client had the message and `at` the event's own timestamp (set by the server when
            the agent emitted it; same host clock). For tool_output events also, per line in it,
            recv - the time the command printed it (bash's $EPOCHREALTIME inside gVisor, whose
            realtime clock is the host's) and at - printed (the agent's side: envd's stream,
            the tool's 100 ms output batching). Events are numbered and stored before they are
            sent: emit() sets `at` and queues the event, a flusher stores the queue FLUSH_EVERY
            (50 ms) after its first event (e2a/agents/tasks.py) and notifies the WebSocket's
            follower, which reads it back from the database and sends it
            (e2a/sessions/service.py follow). Each task is sent as soon as the previous
            task_finished has arrived; one refused as task_running in that gap is counted
            (refused_task_running) and sent again 20 ms later.
  idle      N sessions (default 200), each with its WebSocket open and idle (no task), created
            B at a time in parallel (create + connect + ready). Memory: the whole host's
            MemAvailable (/proc/meminfo, median of 5 reads 1 s apart) before the first and
            after the last (after a settle of 15 s), the difference per session; and attributed
            to this server's processes: the e2a server, the rclone mounts (one per session),
            the runsc processes (Sentry, gofer: root= this server's runsc state), the embedded
            S3 server, as RSS and PSS (smaps_rollup: shared pages split among their users), and
            the sandboxes' memory cgroups (memory.usage_in_bytes: the Sentry, gofer and
            gVisor's memory file, which is shared memory charged to the cgroup and hardly in
            any RSS); "estimate" = the server's growth + the mounts' PSS + the cgroups, each
            page counted once. Snapshots every 50 sessions give a slope (per-session cost by
            least squares, less sensitive to other work on the machine than one difference).
            With all N open: the CPU the server and the sandboxes use while idle (20 s); then, still
            with all N open, the latency figures above for 3 streaming tasks on one of them and
            5 create samples as above (what an idle crowd does to a busy session and to a new
            one). Creation stops early if a batch fails or MemAvailable falls below 4 GiB
            (the machine is shared); then the figures are for the number reached, and why it
            stopped is recorded. Then
            every session is ended (DELETE, B at a time; each WebSocket must close with 4000)
            and nothing may be left: no runsc process, no rclone mount, no netns, veth, cgroup,
            mount or sandbox directory of this server (polled up to 60 s).

Machine (nproc, memory, kernel) and the load average, with the other e2a servers and pytest
processes running on the machine, are recorded before and after each part.
The server is tests/e2e/server.py's, so its reaper runs every 0.2 s (E2A_REAPER_INTERVAL; the
default is 1 s); the death sweep keeps its default 0.5 s (E2A_DEATH_CHECK_INTERVAL).
Own server: instance bse0, subnet 10.250.0.0/20 (1024 links), base /tmp/e2a-bench-sessions.
Results are printed and written to bench/sessions.json.
Usage: python bench/sessions.py [--samples 15] [--tasks 5] [--sessions 200] [--batch 10]
                                [--only create,latency,idle]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import load, others as _others, pct, save  # noqa: E402
from tests.e2e.server import Server, llm_mock  # noqa: E402

RESULTS = ROOT / "bench" / "sessions.json"
BASE = Path("/tmp/e2a-bench-sessions")
INSTANCE, SUBNET = "bse0", "10.250.0.0/20"
MODEL = "claude-sonnet-5-5"
PARTS = ["create", "latency", "idle"]
MIN_AVAILABLE = 4 << 30          # stop creating idle sessions below this much MemAvailable
LINES, EVERY = 40, 0.1           # the streaming command: 40 lines, one per 100 ms
IDLE_TASKS, IDLE_CREATES = 3, 5  # with every idle session open: streaming tasks, creates
STREAM_CMD = (f"for i in $(seq 1 {LINES}); do echo \"L $i $EPOCHREALTIME\"; sleep {EVERY}; "
              "done")


# ---- figures ---------------------------------------------------------------------------------


def ms_summary(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1),
            "mean_ms": round(statistics.fmean(ms), 1)}


def others() -> dict:
    return {**_others(), "mem_available_gib": round(meminfo("MemAvailable") / 2**30, 2)}


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def machine() -> dict:
    return {"nproc": os.cpu_count(), "mem_gib": round(meminfo("MemTotal") / 2**30, 1),
            "kernel": platform.release(),
            "pid_max": int(Path("/proc/sys/kernel/pid_max").read_text())}


# ---- the server ------------------------------------------------------------------------------

class BenchServer(Server):
    def cleanup(self) -> None:
        """Kill this server's own leftovers one pid at a time, then the shared hygiene."""
        for pid in self.runsc_pids() + self.mount_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        super().cleanup()
        for d in Path("/sys/fs/cgroup").glob(f"*/{self.instance}"):  # the instance's own, empty
            with contextlib.suppress(OSError):
                d.rmdir()

    def runsc_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"root={self.run_dir}/runsc"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def boot_steps(self, vm: str) -> dict[str, int]:
        path = self.base / "data" / "logs" / f"{vm}.jsonl"
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                m = re.search(r"boot (.*) ms\)", json.loads(line)["message"])
                if m:
                    return {k: int(v) for k, v in
                            (step.rsplit(" ", 1) for step in m.group(1).split(", "))}
        return {}


class Client:
    def __init__(self, srv: BenchServer, key: str, mock):
        self.srv, self.mock = srv, mock
        self.http = httpx.AsyncClient(base_url=srv.url, timeout=300,
                                      headers={"Authorization": f"Bearer {key}"},
                                      limits=httpx.Limits(max_connections=64))

    async def create(self, llm_key: str, user_id: str | None = None) -> dict:
        r = await self.http.post("/v1/sessions", json={
            "user_id": user_id or "bench-" + uuid.uuid4().hex[:10],
            "llm": {"api_key": llm_key, "model": MODEL}})
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/sessions: {r.status_code} {r.text[:400]}")
        return r.json()

    async def open(self, ticket: dict):
        ws = await connect(ticket["connect_url"], open_timeout=120, max_size=None,
                           additional_headers={"Authorization": f"Bearer {ticket['jwt']}"})
        ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if ready["type"] != "ready":
            raise RuntimeError(f"first message {ready}")
        return ws

    async def end(self, sid: str) -> float:
        t = time.perf_counter()
        r = await self.http.delete(f"/v1/sessions/{sid}")
        ms = (time.perf_counter() - t) * 1000
        if r.status_code != 200 or r.json()["state"] != "ended":
            raise RuntimeError(f"DELETE {sid}: {r.status_code} {r.text[:300]}")
        return ms

    async def vm(self, sid: str) -> str:
        return (await self.http.get(f"/v1/sessions/{sid}")).json()["vm_id"]


async def until_closed(ws, timeout: float = 60) -> int | None:
    """Read until the server closes; its close code."""
    with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code


# ---- create → ready → first event → finished -------------------------------------------------

async def create_sample(c: Client) -> tuple[dict, str]:
    """One session: create, open, a one-turn task, DELETE. Its times (ms) and its sandbox."""
    key = "sk-ant-bench-" + secrets.token_hex(12)
    c.mock.scenario(key, final="done")
    t0 = time.perf_counter()
    ticket = await c.create(key)
    t_post = time.perf_counter()
    ws = await c.open(ticket)
    t_ready = time.perf_counter()
    await ws.send(json.dumps({"type": "task", "text": "say done", "id": "t"}))
    t_first = t_done = None
    while t_done is None:
        m = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if m.get("type") == "task_started" and "seq" in m:
            t_first = time.perf_counter()
        elif m.get("type") == "task_finished" and "seq" in m:
            t_done = time.perf_counter()
            if m["data"]["state"] != "succeeded":
                raise RuntimeError(f"task {m['data']}")
        elif m.get("type") == "error":
            raise RuntimeError(f"error {m}")
    sid = ticket["chat_session_id"]
    vm = await c.vm(sid)
    d = await c.end(sid)
    code = await until_closed(ws)
    if code != 4000:
        raise RuntimeError(f"closed with {code}, not 4000")
    ms = lambda a, b: (b - a) * 1000  # noqa: E731
    return {"post": ms(t0, t_post), "ready": ms(t0, t_ready), "first": ms(t0, t_first),
            "finished": ms(t0, t_done), "ws_open": ms(t_post, t_ready),
            "first_event": ms(t_ready, t_first), "turn": ms(t_first, t_done), "delete": d}, vm


def create_summary(samples: list[dict]) -> dict:
    col = lambda k: [s[k] for s in samples]  # noqa: E731
    return {"from_create": {k: ms_summary(col(k)) for k in ("post", "ready", "first",
                                                             "finished")},
            "parts": {k: ms_summary(col(k)) for k in ("post", "ws_open", "first_event",
                                                      "turn")},
            "delete": ms_summary(col("delete"))}


async def create_part(c: Client, samples: int) -> dict:
    got: list[dict] = []
    boots: dict[str, list[float]] = {}
    for i in range(samples + 1):   # the first is a warm-up (the provider's SDK is imported)
        t, vm = await create_sample(c)
        if i == 0:
            print(f"  warm-up: create → finished {t['finished']:.0f} ms", flush=True)
            continue
        got.append(t)
        steps = c.srv.boot_steps(vm)
        for k, v in steps.items():
            boots.setdefault(k, []).append(v)
        print(f"  {i:2d} POST {t['post']:5.0f}  +ws {t['ws_open']:4.0f}  +first "
              f"{t['first_event']:4.0f}  +turn {t['turn']:4.0f}  = {t['finished']:5.0f} ms   "
              f"DELETE {t['delete']:4.0f}  boot {steps}", flush=True)
    return {**create_summary(got),
            "server_boot_steps": {k: ms_summary(v) for k, v in boots.items()}}


# ---- event latency ---------------------------------------------------------------------------

def stream_scenario(tasks: int) -> list[dict]:
    return [{"steps": [{"tool": "shell", "args": {"command": STREAM_CMD}}],
             "final": "streamed"}] * tasks


async def stream(ws, tasks: int, warmup: int) -> dict:
    """Run `warmup` + `tasks` streaming tasks on an open session, each sent as soon as the one
    before has finished; the latencies of the last `tasks`. A task refused as task_running
    right after the previous task_finished is counted and sent again 20 ms later."""
    by_type: dict[str, list[float]] = {}
    line_to_client, line_to_at, lines_per_event = [], [], []
    refused = 0
    for n in range(warmup + tasks):
        await ws.send(json.dumps({"type": "task", "text": f"stream {n}", "id": n}))
        while True:
            raw = await asyncio.wait_for(ws.recv(), 120)
            recv = time.time()
            m = json.loads(raw)
            if "seq" not in m:
                if m["type"] == "error" and m.get("code") == "task_running" and m["id"] == n:
                    # the previous task_finished was sent before the task was marked over
                    # (e2a/agents/tasks.py _finish): counted, and sent again
                    refused += 1
                    await asyncio.sleep(0.02)
                    await ws.send(json.dumps({"type": "task", "text": f"stream {n}", "id": n}))
                elif m["type"] == "error":
                    raise RuntimeError(f"reply {m}")
                continue
            if m["type"] == "task_finished" and m["data"]["state"] != "succeeded":
                raise RuntimeError(f"task {m['data']}")
            if n < warmup:
                if m["type"] == "task_finished":
                    break
                continue
            at = datetime.fromisoformat(m["at"]).timestamp()
            by_type.setdefault(m["type"], []).append((recv - at) * 1000)
            if m["type"] == "tool_output":
                found = re.findall(r"L \d+ (\d+\.\d+)", m["data"]["text"])
                lines_per_event.append(len(found))
                for printed in map(float, found):
                    line_to_client.append((recv - printed) * 1000)
                    line_to_at.append((at - printed) * 1000)
            if m["type"] == "task_finished":
                break
    every = [x for xs in by_type.values() for x in xs]
    return {"tasks": tasks, "lines_per_task": LINES, "line_every_s": EVERY,
            "refused_task_running": refused,
            "event_recv_minus_at": {"tool_output": ms_summary(by_type.get("tool_output", [])),
                                    "all_events": ms_summary(every),
                                    **{k: ms_summary(v) for k, v in by_type.items()
                                       if k != "tool_output"}},
            "line_printed_to_client": ms_summary(line_to_client),
            "line_printed_to_at": ms_summary(line_to_at),
            "lines_per_tool_output_event": {
                "mean": round(statistics.fmean(lines_per_event), 2) if lines_per_event else 0,
                "max": max(lines_per_event, default=0)}}


async def latency_part(c: Client, tasks: int) -> dict:
    key = "sk-ant-bench-lat-" + secrets.token_hex(8)
    c.mock.scenario(key, tasks=stream_scenario(tasks + 1))
    ticket = await c.create(key)
    ws = await c.open(ticket)
    try:
        return await stream(ws, tasks, warmup=1)   # the first task is a warm-up
    finally:
        await c.end(ticket["chat_session_id"])
        await until_closed(ws)


# ---- idle sessions: memory -------------------------------------------------------------------

def proc_mem(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, threads) of a process in bytes; zeros if it is gone."""
    try:
        rss = pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
        return rss, pss, len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0, 0, 0


def group_mem(pids: list[int]) -> dict:
    rss = pss = threads = 0
    for p in pids:
        r, s, t = proc_mem(p)
        rss, pss, threads = rss + r, pss + s, threads + t
    return {"processes": len(pids), "rss_mib": round(rss / 2**20, 1),
            "pss_mib": round(pss / 2**20, 1), "threads": threads}


def cgroup_mem(instance: str) -> dict:
    """The sandboxes' memory cgroups (cgroup v1 here; v2 read the same way)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    parent = Path("/sys/fs/cgroup") / instance if v2 else Path("/sys/fs/cgroup/memory") / instance
    usage, stat, n = 0, {}, 0
    for d in parent.glob("*"):
        if not d.is_dir():
            continue
        with contextlib.suppress(OSError, ValueError):
            usage += int((d / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
            n += 1
            for line in (d / "memory.stat").read_text().splitlines():
                k, v = line.split()
                if k in ("rss", "cache", "shmem", "mapped_file", "anon", "file", "kernel"):
                    stat[k] = stat.get(k, 0) + int(v)
    return {"cgroups": n, "usage_mib": round(usage / 2**20, 1),
            **{f"{k}_mib": round(v / 2**20, 1) for k, v in sorted(stat.items())}}


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
    return total


async def available(reads: int = 5) -> int:
    values = []
    for i in range(reads):
        values.append(meminfo("MemAvailable"))
        if i < reads - 1:
            await asyncio.sleep(1)
    return int(statistics.median(values))


def snapshot(srv: BenchServer, sessions: int) -> dict:
    s3 = srv.s3_server_pid()
    return {"sessions": sessions, "t": round(time.time(), 1),
            "mem_available_mib": round(meminfo("MemAvailable") / 2**20, 1),
            "server": group_mem([srv.proc.pid]), "rclone_mounts": group_mem(srv.mount_pids()),
            "runsc": group_mem(srv.runsc_pids()), "s3_server": group_mem([s3] if s3 else []),
            "bench_client": group_mem([os.getpid()]), "sandbox_cgroups": cgroup_mem(INSTANCE),
            "load": load()}


def attributed_mib(s: dict, field: str) -> float:
    return (s["server"][field] + s["rclone_mounts"][field] + s["runsc"][field]
            + s["s3_server"][field])


def slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


async def idle_part(c: Client, n: int, batch: int) -> dict:
    srv = c.srv
    key = "sk-ant-bench-idle-" + secrets.token_hex(8)
    c.mock.scenario(key, final="ok")
    out: dict = {"asked": n, "batch": batch}
    before = await available()
    snaps = [snapshot(srv, 0)]
    out["mem_available_before_mib"] = round(before / 2**20, 1)
    open_: list[tuple[str, object]] = []   # (session id, WebSocket)
    create_ms: list[float] = []
    stopped = None
    t_all = time.perf_counter()

    async def one(i: int):
        t = time.perf_counter()
        ticket = await c.create(key, user_id=f"idle-{i:04d}")
        ws = await c.open(ticket)
        return ticket["chat_session_id"], ws, (time.perf_counter() - t) * 1000

    while len(open_) < n and stopped is None:
        if (avail := meminfo("MemAvailable")) < MIN_AVAILABLE:
            stopped = f"MemAvailable {avail / 2**30:.2f} GiB < {MIN_AVAILABLE / 2**30:.0f} GiB"
            break
        k = min(batch, n - len(open_))
        results = await asyncio.gather(*(one(len(open_) + j) for j in range(k)),
                                       return_exceptions=True)
        errors = []
        for r in results:
            if isinstance(r, BaseException):
                errors.append(f"{type(r).__name__}: {r}"[:500])
            else:
                open_.append(r[:2])
                create_ms.append(r[2])
        if errors:
            stopped = f"{len(errors)} of a batch of {k} failed at {len(open_)} open: {errors[0]}"
            out["errors"] = errors
        if len(open_) % 50 == 0 or stopped or len(open_) >= n:
            snaps.append(snapshot(srv, len(open_)))
            s = snaps[-1]
            print(f"  {len(open_):3d} open ({time.perf_counter() - t_all:5.1f} s): "
                  f"MemAvailable {s['mem_available_mib']:.0f} MiB, attributed PSS "
                  f"{attributed_mib(s, 'pss_mib'):.0f} MiB, cgroups "
                  f"{s['sandbox_cgroups']['usage_mib']:.0f} MiB, load {s['load']}", flush=True)
    out["open"] = len(open_)
    out["stopped"] = stopped
    out["create_all_s"] = round(time.perf_counter() - t_all, 1)
    out["create_plus_ready_ms"] = ms_summary(create_ms)
    # every WebSocket still open and idle?
    out["connected_after_create"] = sum(1 for _, ws in open_ if ws.close_code is None)
    await asyncio.sleep(15)  # settle: the dotfiles' uploads (write-back 2 s), the GC
    after = await available()
    snaps.append(snapshot(srv, len(open_)))
    # the idle cost in CPU: 20 s with every session open
    pids = {"server": [srv.proc.pid], "runsc": srv.runsc_pids(),
            "rclone_mounts": srv.mount_pids()}
    t0, c0 = time.monotonic(), {k: cpu_ticks(v) for k, v in pids.items()}
    await asyncio.sleep(20)
    hz = os.sysconf("SC_CLK_TCK")
    dt = time.monotonic() - t0
    out["idle_cpu_percent_of_a_core"] = {
        k: round(100 * (cpu_ticks(v) - c0[k]) / hz / dt, 1) for k, v in pids.items()}
    out["connected_after_idle"] = sum(1 for _, ws in open_ if ws.close_code is None)
    if open_:
        # with every session open: events of a streaming task on one of them, and new sessions
        c.mock.scenario(key, tasks=stream_scenario(IDLE_TASKS))
        out["latency_with_all_open"] = await stream(open_[0][1], IDLE_TASKS, warmup=0)
        lat = out["latency_with_all_open"]["event_recv_minus_at"]["tool_output"]
        print(f"  with {len(open_)} open: tool_output recv - at p50 {lat.get('p50_ms')} ms, "
              f"p95 {lat.get('p95_ms')} ms", flush=True)
        samples = [(await create_sample(c))[0] for _ in range(IDLE_CREATES)]
        out["create_with_all_open"] = create_summary(samples)
        print(f"  with {len(open_)} open: create → finished "
              f"{out['create_with_all_open']['from_create']['finished']}", flush=True)
    out["mem_available_after_mib"] = round(after / 2**20, 1)
    m = max(1, len(open_))
    last, first = snaps[-1], snaps[0]
    out["per_session_mib"] = {
        "mem_available_drop": round((before - after) / 2**20 / m, 1),
        "attributed_rss": round((attributed_mib(last, "rss_mib")
                                 - attributed_mib(first, "rss_mib")) / m, 1),
        "attributed_pss": round((attributed_mib(last, "pss_mib")
                                 - attributed_mib(first, "pss_mib")) / m, 1),
        "sandbox_cgroup_usage": round(last["sandbox_cgroups"]["usage_mib"] / m, 1),
        "server_rss": round((last["server"]["rss_mib"] - first["server"]["rss_mib"]) / m, 2),
        "rclone_mount_pss": round(last["rclone_mounts"]["pss_mib"] / m, 1),
        "rclone_mount_rss": round(last["rclone_mounts"]["rss_mib"] / m, 1),
        "runsc_pss": round(last["runsc"]["pss_mib"] / m, 1),
        "runsc_rss": round(last["runsc"]["rss_mib"] / m, 1),
        "threads": round((last["server"]["threads"] + last["rclone_mounts"]["threads"]
                          + last["runsc"]["threads"]) / m, 1),
        # what one session holds, without counting a page twice: the server's growth, the
        # mount's PSS, and the sandbox's cgroup (Sentry and gofer, gVisor's memory file)
        "estimate": round((last["server"]["rss_mib"] - first["server"]["rss_mib"]
                           + last["rclone_mounts"]["pss_mib"]
                           + last["sandbox_cgroups"]["usage_mib"]) / m, 1),
        "bench_client_rss": round((last["bench_client"]["rss_mib"]
                                   - first["bench_client"]["rss_mib"]) / m, 2),
    }
    pts = [(s["sessions"], s) for s in snaps[:-1]]
    out["slope_mib_per_session"] = {
        "mem_available_drop": _r(slope([(x, -s["mem_available_mib"]) for x, s in pts])),
        "attributed_pss": _r(slope([(x, attributed_mib(s, "pss_mib")) for x, s in pts])),
        "sandbox_cgroup_usage": _r(slope([(x, s["sandbox_cgroups"]["usage_mib"])
                                          for x, s in pts])),
    }
    print("  per session:", out["per_session_mib"], "slope:", out["slope_mib_per_session"],
          "idle CPU %:", out["idle_cpu_percent_of_a_core"], flush=True)

    # end them all, B at a time; every WebSocket closes with 4000
    t_end = time.perf_counter()
    delete_ms, codes = [], {}
    for i in range(0, len(open_), batch):
        chunk = open_[i:i + batch]
        got = await asyncio.gather(*(c.end(sid) for sid, _ in chunk), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                out.setdefault("delete_errors", []).append(str(g)[:300])
            else:
                delete_ms.append(g)
        for code in await asyncio.gather(*(until_closed(ws, 30) for _, ws in chunk)):
            codes[str(code)] = codes.get(str(code), 0) + 1
    out["delete_all_s"] = round(time.perf_counter() - t_end, 1)
    out["delete_ms"] = ms_summary(delete_ms)
    out["close_codes"] = codes
    # nothing left of them on the host
    deadline, left = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        left = {k: v for k, v in srv.host_objects().items() if v}
        active = (await c.http.get("/v1/sessions", params={"state": "active"})).json()["sessions"]
        if active:
            left["active_sessions"] = len(active)
        if not left:
            break
        await asyncio.sleep(1)
    out["left_after_delete"] = left
    out["left_check_s"] = round(time.perf_counter() - t_end - out["delete_all_s"], 1)
    await asyncio.sleep(5)
    out["mem_available_after_delete_mib"] = round(await available() / 2**20, 1)
    out["snapshots"] = snaps
    print(f"  ended {len(delete_ms)} in {out['delete_all_s']} s (DELETE p50 "
          f"{out['delete_ms'].get('p50_ms')} ms), close codes {codes}, left {left or 'nothing'}",
          flush=True)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# ---- main ------------------------------------------------------------------------------------

async def run(args, srv: BenchServer, out: dict) -> None:
    mock = llm_mock()
    key = srv.create_user("bench-sessions@example.com")
    c = Client(srv, key, mock)
    only = args.only.split(",")
    try:
        for part in PARTS:
            if part not in only:
                continue
            print(f"{part}:", flush=True)
            before = others()
            if part == "create":
                res = await create_part(c, args.samples)
            elif part == "latency":
                res = await latency_part(c, args.tasks)
            else:
                res = await idle_part(c, args.sessions, args.batch)
            res["others_before"], res["others_after"] = before, others()
            out[part] = res
            print(json.dumps({k: v for k, v in res.items() if k != "snapshots"}, indent=1),
                  flush=True)
    finally:
        await c.http.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--only", default=",".join(PARTS))
    args = ap.parse_args()
    out: dict = {"taken": datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "args": vars(args), "others_at_start": others()}
    srv = BenchServer(instance=INSTANCE, subnet=SUBNET, base=BASE,
                      extra_env={"E2A_POOL_SIZE": "0"})
    srv.cleanup()
    srv.start()
    try:
        asyncio.run(run(args, srv, out))
    finally:
        srv.stop()
        with contextlib.suppress(OSError):  # kept for a look after a failure
            Path("/tmp/e2a-bench-sessions.log").write_bytes((BASE / "server.log").read_bytes())
        srv.cleanup()
    out["others_at_end"] = others()
    save(RESULTS, out, partial=set(args.only.split(",")) != set(PARTS))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
