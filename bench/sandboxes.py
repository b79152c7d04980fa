"""Sandbox benchmarks: `make bench` prints every figure docs/performance.md quotes.

  cold create → first output   p50/p95/p99 over N sandboxes, no warm pool
  warm create → first output   the same with a warm pool (refilled between samples)
  exec round trip              `true` through the API on an open connection, p50, beside the
                               in-sandbox floor (fork+exec of `sh -c true` inside gVisor)
  idle memory                  host memory per idle standard sandbox
  capacity                     idle standard sandboxes that run at once before a create fails
                               or create p99 doubles

Each part starts its own `e2a serve` (tests/e2e/server.py) with its own instance prefix.
Usage: python bench/sandboxes.py [--samples 50] [--capacity 120] [--only cold,warm,exec,memory,capacity]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.server import Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "p99_ms": round(pct(ms, 99), 1), "min_ms": round(min(ms), 1)}


class Client:
    def __init__(self, srv: Server, key: str):
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=120)

    def create(self, **body) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": "standard", **body})
        r.raise_for_status()
        return r.json()["vm_id"]

    def first_output(self, vm_id: str, cmd: str = "echo hi") -> None:
        with self.http.stream("POST", f"/v1/sandboxes/{vm_id}/commands", json={"cmd": cmd}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if '"stdout"' in line:
                    return
        raise RuntimeError("no output")

    def kill(self, vm_id: str) -> None:
        self.http.delete(f"/v1/sandboxes/{vm_id}")


def server(tag: str, **env) -> tuple[Server, Client]:
    srv = Server(instance=f"b{tag}", subnet=f"10.220.{ {'c': 0, 'w': 16, 'e': 32, 'm': 48, 'k': 64}[tag]}.0/20",
                 base=Path(f"/tmp/e2a-bench/{tag}"), extra_env={k: str(v) for k, v in env.items()})
    srv.cleanup()
    srv.start()
    return srv, Client(srv, srv.create_user(f"bench-{tag}@example.com"))


def create_to_first_output(c: Client, samples: int, before=None) -> list[float]:
    ms = []
    for _ in range(samples):
        if before:
            before()
        t0 = time.perf_counter()
        vm = c.create(idle_timeout_seconds=600)
        c.first_output(vm)
        ms.append((time.perf_counter() - t0) * 1000)
        c.kill(vm)
    return ms


def bench_cold(samples: int) -> dict:
    srv, c = server("c")
    try:
        create_to_first_output(c, 3)  # warm the page cache for the template image
        return summary(create_to_first_output(c, samples))
    finally:
        srv.cleanup()


def bench_warm(samples: int, pool: int = 2) -> dict:
    srv, c = server("w", E2A_POOL_SIZE=pool)

    def pool_full() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if httpx.get(srv.url + "/health").json().get("pool", {}).get("standard", 0) >= pool:
                return
            time.sleep(0.05)
        raise RuntimeError("the warm pool did not refill")

    try:
        return {**summary(create_to_first_output(c, samples, before=pool_full)), "pool_size": pool}
    finally:
        srv.cleanup()


def bench_exec(samples: int) -> dict:
    srv, c = server("e")
    try:
        vm = c.create(idle_timeout_seconds=600)
        for _ in range(5):
            c.http.post(f"/v1/sandboxes/{vm}/commands", json={"argv": ["true"]}).raise_for_status()
        ms = []
        for _ in range(samples):
            t0 = time.perf_counter()
            r = c.http.post(f"/v1/sandboxes/{vm}/commands", json={"argv": ["true"]})
            r.raise_for_status()
            ms.append((time.perf_counter() - t0) * 1000)
        # The floor: one fork+exec of `sh -c true` inside the same sandbox, timed in there with
        # bash's clock builtin (no extra process), paced like the round trips above.
        loop = ("for i in $(seq 50); do s=$EPOCHREALTIME; /bin/sh -c true; e=$EPOCHREALTIME; "
                "echo $(( (${e/./} - ${s/./}) )); sleep 0.02; done")
        r = c.http.post(f"/v1/sandboxes/{vm}/commands", json={"cmd": loop})
        out = "".join(json.loads(x)["data"] for x in r.text.splitlines() if '"stdout"' in x)
        floor = [int(v) / 1000 for v in out.split()]
        c.kill(vm)
        return {**summary(ms), "inside_fork_exec_sh_p50_ms": round(pct(floor, 50), 2)}
    finally:
        srv.cleanup()


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError


def cgroup_usage(instance: str) -> list[int]:
    out = []
    for p in Path("/sys/fs/cgroup/memory").glob(f"{instance}/*/memory.usage_in_bytes"):
        out.append(int(p.read_text()))
    return out


def bench_memory(count: int = 20) -> dict:
    srv, c = server("m")
    try:
        time.sleep(2)
        before = mem_available()
        vms = [c.create(idle_timeout_seconds=600) for _ in range(count)]
        time.sleep(5)  # let start-up allocations settle
        after = mem_available()
        usage = cgroup_usage(srv.instance)
        for vm in vms:
            c.kill(vm)
        return {"sandboxes": count,
                "host_mem_per_sandbox_mib": round((before - after) / count / 2**20, 1),
                "cgroup_mem_per_sandbox_mib": round(statistics.mean(usage) / 2**20, 1) if usage else None}
    finally:
        srv.cleanup()


def bench_capacity(limit: int) -> dict:
    srv, c = server("k", E2A_MAX_SANDBOXES=limit + 10)
    vms, times = [], []
    stop_reason = f"reached the benchmark's limit of {limit}"
    try:
        while len(vms) < limit:
            t0 = time.perf_counter()
            try:
                vms.append(c.create(idle_timeout_seconds=1800))
            except httpx.HTTPError as exc:
                stop_reason = f"create failed: {exc}"
                break
            times.append((time.perf_counter() - t0) * 1000)
            if len(times) >= 20:
                base = pct(times[:10], 99)
                recent = pct(times[-10:], 99)
                if recent > 2 * base:
                    stop_reason = f"create p99 doubled ({base:.0f} → {recent:.0f} ms)"
                    break
        # every one of them still answers
        alive = 0
        for vm in vms:
            r = c.http.post(f"/v1/sandboxes/{vm}/commands", json={"argv": ["true"]})
            alive += r.status_code == 200
        return {"running_at_once": len(vms), "all_answering": alive == len(vms),
                "create_p50_first10_ms": round(pct(times[:10], 50), 1),
                "create_p50_last10_ms": round(pct(times[-10:], 50), 1), "stopped": stop_reason}
    finally:
        for vm in vms:
            c.kill(vm)
        srv.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--capacity", type=int, default=120)
    ap.add_argument("--only", default="cold,warm,exec,memory,capacity")
    args = ap.parse_args()
    parts = args.only.split(",")
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)}}
    if "cold" in parts:
        results["cold_create_to_first_output"] = bench_cold(args.samples)
        print("cold  create→first output", results["cold_create_to_first_output"], flush=True)
    if "warm" in parts:
        results["warm_create_to_first_output"] = bench_warm(args.samples)
        print("warm  create→first output", results["warm_create_to_first_output"], flush=True)
    if "exec" in parts:
        results["exec_round_trip_true"] = bench_exec(max(args.samples, 200))
        print("exec  round trip (true)  ", results["exec_round_trip_true"], flush=True)
    if "memory" in parts:
        results["idle_memory"] = bench_memory()
        print("idle  memory per sandbox ", results["idle_memory"], flush=True)
    if "capacity" in parts:
        results["capacity"] = bench_capacity(args.capacity)
        print("capacity                 ", results["capacity"], flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
