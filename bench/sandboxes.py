"""Sandbox benchmarks: `make bench` prints every figure docs/performance.md quotes.

  cold create → first output   p50/p95/p99 over N sandboxes, no warm pool, beside a bare
                               `runsc do` baseline (below)
  warm create → first output   the same with a warm pool (refilled between samples)
  exec round trip              `true` through the API on an open connection, beside the
                               in-sandbox floor (below), and the difference: what e2a adds
  idle memory                  host memory per idle standard sandbox
  death → record               kill -9 of a sandbox's gVisor Sentry until the API says destroyed
  capacity                     idle standard sandboxes that run at once before a create fails
                               or create p99 doubles

What exactly is compared:

* cold: e2a's figure is POST /v1/sandboxes (standard template, no pool) until the first stdout
  line of `echo hi` (run through the API as cmd, i.e. envd's `/bin/bash -c 'echo hi'`) reaches
  the client. The baseline is one host process, timed from its spawn until "hi" is read from its
  stdout (the exit that follows is timed too, as bare_runsc_do.exit_p50_ms):
      TMPDIR=/tmp/e2a-bench/bare runsc --platform=P --network=none \
          do --root ROOTFS --cwd / --quiet sh -c 'echo hi'
  ROOTFS is the standard recipe's image (e2a.templates.builder.rootfs_path), P the platform e2a
  uses (E2A_PLATFORM, else the recipe's: systrap). `runsc do` ignores the global --root: it makes
  its own state root with mkdtemp (hence TMPDIR, so it lands in /tmp/e2a-bench/bare/runsc-do*)
  and removes it on exit; it always puts a memory overlay over the rootfs (--overlay2 all:memory;
  e2a uses a host overlay and --overlay2 none), gives the sandbox no network and no cgroup, and
  runs `sh -c` (dash) with no agent. So the baseline is gVisor's own start + one command, and the
  ratio shows what e2a's create (database, network namespace + veth + firewall, host overlay,
  OCI bundle, cgroup, envd, the command's HTTP round trip) costs on top. e2a and bare samples
  alternate, so both see the same load on the machine.
* exec: e2a's figure is POST /v1/sandboxes/{id}/commands {"argv": ["true"]} on an open
  connection until the whole (non-streamed) response is read. For argv, envd runs no shell: it
  finds `true` on PATH (/usr/bin/true) and starts it with Go's syscall.ForkExec (a vfork-style
  clone + execve, setsid, three pipes), waits and reports. The floor is that same work with
  nothing of e2a in the way: inside the same sandbox (same CPU quota, same user), python3 times
  os.posix_spawn(/usr/bin/true, setsid) + waitpid (glibc's posix_spawn is also a vfork-style
  clone + execve). Both are paced 20 ms apart (so the sandbox's 0.5-vCPU quota throttles
  neither) and taken in alternating blocks; "e2a adds" is the difference of the two p50s. The
  back-to-back round trip (the figure docs/performance.md quotes) and the old floor (bash
  forking `/bin/sh -c true`) are also kept.
* death: kill -9 of the sandbox's Sentry (the `runsc-sandbox ... boot` process, its pid from
  `runsc --root <run_dir>/runsc state <instance>-<vm_id>`) until GET /v1/sandboxes/{id} answers
  "state": "destroyed", polled every 20 ms; no answer within 15 s is a miss. After 3 misses in
  a row the part stops (the server is evidently not noticing deaths; 15 s a miss would
  otherwise take 5 minutes of `make bench`) and the samples not taken are reported.

Each part starts its own `e2a serve` (tests/e2e/server.py) with its own instance prefix.
Results are printed and written to bench/results.json. The browser, cua and canvas templates'
figures are bench/templates.py's (`make bench-templates`; `make bench` runs both).
Usage: python bench/sandboxes.py [--samples 50] [--capacity 120] [--death-samples 20]
                                 [--only cold,warm,exec,memory,capacity,death]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import pct  # noqa: E402
from tests.e2e.server import Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"
BENCH_DIR = Path("/tmp/e2a-bench")


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
    srv = Server(instance=f"b{tag}", subnet=f"10.220.{ {'c': 0, 'w': 16, 'e': 32, 'm': 48, 'k': 64, 'd': 80}[tag]}.0/20",
                 base=BENCH_DIR / tag, extra_env={k: str(v) for k, v in env.items()})
    srv.cleanup()
    srv.start()
    return srv, Client(srv, srv.create_user(f"bench-{tag}@example.com"))


def create_to_first_output(c: Client, samples: int, before=None, after=None) -> list[float]:
    ms = []
    for _ in range(samples):
        if before:
            before()
        t0 = time.perf_counter()
        vm = c.create(idle_timeout_seconds=600)
        c.first_output(vm)
        ms.append((time.perf_counter() - t0) * 1000)
        c.kill(vm)
        if after:
            after()
    return ms


# ---- cold create, beside bare `runsc do` ---------------------------------------------------

def standard_image() -> tuple[str, Path, str]:
    """runsc binary, the standard template's rootfs and the platform e2a runs it on."""
    from e2a.config import Settings
    from e2a.templates import builder, recipes

    settings = Settings()
    recipe = recipes.load("standard")
    if recipe is None or not builder.is_built(settings.cache_dir, recipe):
        raise RuntimeError("the standard template image is not built (make templates)")
    return (settings.runsc or str(settings.cache_dir / "bin" / "runsc"),
            builder.rootfs_path(settings.cache_dir, recipe), settings.platform or recipe.platform)


def bare_runsc_do(runsc: str, rootfs: Path, platform_: str) -> tuple[float, float]:
    """One `runsc do` of `sh -c 'echo hi'`: (ms until "hi" is read, ms until the process exits)."""
    tmp = BENCH_DIR / "bare"
    tmp.mkdir(parents=True, exist_ok=True)
    # `runsc do` hands its own environment to the command; TMPDIR places its state root.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "TMPDIR": str(tmp)}
    args = [runsc, f"--platform={platform_}", "--network=none",
            "do", "--root", str(rootfs), "--cwd", "/", "--quiet", "sh", "-c", "echo hi"]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    line = p.stdout.readline()
    first = (time.perf_counter() - t0) * 1000
    _, err = p.communicate(timeout=60)
    done = (time.perf_counter() - t0) * 1000
    if line != b"hi\n" or p.returncode != 0:
        raise RuntimeError(f"runsc do failed ({p.returncode}): {line!r} {err.decode(errors='replace')[-500:]}")
    return first, done


def bench_cold(samples: int) -> dict:
    runsc, rootfs, platform_ = standard_image()
    srv, c = server("c")
    bare_first, bare_exit = [], []

    def bare() -> None:
        first, done = bare_runsc_do(runsc, rootfs, platform_)
        bare_first.append(first)
        bare_exit.append(done)

    try:
        create_to_first_output(c, 3, after=bare)  # warm the page cache for the template image
        bare_first.clear()
        bare_exit.clear()
        e2a = create_to_first_output(c, samples, after=bare)  # alternate: e2a, bare, e2a, ...
    finally:
        srv.cleanup()
    return {"e2a": summary(e2a),
            "bare_runsc_do": {**summary(bare_first), "exit_p50_ms": round(pct(bare_exit, 50), 1),
                              "platform": platform_, "rootfs": str(rootfs)},
            "ratio_p50": round(pct(e2a, 50) / pct(bare_first, 50), 2)}


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


# ---- exec round trip, beside the in-sandbox floor --------------------------------------------

GAP = 0.02  # s between paced samples, inside and outside the sandbox alike
BLOCK = 20  # paced round trips, then as many floor samples, then again

# What envd does for {"argv": ["true"]}, without envd: find it on PATH, vfork-style spawn, wait.
FLOOR_PY = """
import os, shutil, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
path, env, out = shutil.which("true"), dict(os.environ), []
for _ in range(n):
    t = time.perf_counter()
    pid = os.posix_spawn(path, ["true"], env, setsid=True)
    os.waitpid(pid, 0)
    out.append((time.perf_counter() - t) * 1e6)
    time.sleep(gap)
print(path, *(round(v) for v in out))
"""


def stdout_of(r: httpx.Response) -> str:
    r.raise_for_status()
    return "".join(json.loads(x)["data"] for x in r.text.splitlines() if '"stdout"' in x)


def bench_exec(samples: int) -> dict:
    srv, c = server("e")
    try:
        vm = c.create(idle_timeout_seconds=600)
        url = f"/v1/sandboxes/{vm}/commands"

        def round_trip() -> float:
            t0 = time.perf_counter()
            r = c.http.post(url, json={"argv": ["true"]})
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        for _ in range(5):
            round_trip()
        back_to_back = [round_trip() for _ in range(samples)]
        time.sleep(0.2)  # let the CPU quota recover

        paced, floor, path = [], [], ""
        for _ in range(-(-samples // BLOCK)):
            for _ in range(BLOCK):
                paced.append(round_trip())
                time.sleep(GAP)
            out = stdout_of(c.http.post(url, json={"argv": ["python3", "-c", FLOOR_PY,
                                                              str(BLOCK), str(GAP)]})).split()
            path = out[0]
            floor += [int(v) / 1000 for v in out[1:]]
            time.sleep(0.2)  # python3's start is not part of either figure

        # The floor docs/performance.md used to quote: bash forking `/bin/sh -c true`.
        loop = ("for i in $(seq 50); do s=$EPOCHREALTIME; /bin/sh -c true; e=$EPOCHREALTIME; "
                "echo $(( (${e/./} - ${s/./}) )); sleep 0.02; done")
        old_floor = [int(v) / 1000 for v in
                     stdout_of(c.http.post(url, json={"cmd": loop})).split()]
        c.kill(vm)
    finally:
        srv.cleanup()
    return {"back_to_back": summary(back_to_back),
            "paced": {**summary(paced), "gap_ms": GAP * 1000},
            "floor_spawn_true": {**summary(floor), "path": path},
            "e2a_adds_p50_ms": round(pct(paced, 50) - pct(floor, 50), 1),
            "old_floor_bash_fork_exec_sh_true_p50_ms": round(pct(old_floor, 50), 2)}


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


# ---- death → record ------------------------------------------------------------------------

DEATH_POLL = 0.02     # s between GETs
DEATH_TIMEOUT = 15.0  # s; a sample that is not "destroyed" by then is a miss
DEATH_GIVE_UP = 3     # misses in a row that end the part


def sentry_pid(srv: Server, runsc: str, vm: str) -> int:
    """The host pid of the sandbox's Sentry (`runsc-sandbox ... boot`)."""
    cid = f"{srv.instance}-{vm}"
    out = subprocess.run([runsc, "--root", str(srv.run_dir / "runsc"), "state", cid],
                         capture_output=True, text=True, timeout=30)
    candidates = []
    if out.returncode == 0:
        candidates.append(int(json.loads(out.stdout)["pid"]))
    procs = Path(f"/sys/fs/cgroup/memory/{srv.instance}/{cid}/cgroup.procs")
    if procs.is_file():
        candidates += [int(x) for x in procs.read_text().split()]
    for pid in candidates:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"boot" in argv and cid.encode() in argv:
            return pid
    raise RuntimeError(f"no Sentry process found for {cid} (runsc state: {out.stdout or out.stderr})")


def bench_death(samples: int) -> dict:
    runsc, _, _ = standard_image()
    srv, c = server("d")
    ms: list[float] = []
    misses: list[str] = []   # the state each missed sample was still in after DEATH_TIMEOUT
    reasons: dict[str, int] = {}
    in_a_row = 0
    try:
        for i in range(samples):
            vm = c.create(idle_timeout_seconds=600)
            c.first_output(vm)  # it is really up
            pid = sentry_pid(srv, runsc, vm)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            state = "?"
            while (elapsed := time.perf_counter() - t0) < DEATH_TIMEOUT:
                r = c.http.get(f"/v1/sandboxes/{vm}")
                if r.status_code == 200:
                    rec = r.json()
                    state = rec["state"]
                    if state == "destroyed":
                        ms.append((time.perf_counter() - t0) * 1000)
                        reason = str(rec.get("end_reason"))
                        reasons[reason] = reasons.get(reason, 0) + 1
                        break
                else:
                    state = f"HTTP {r.status_code}"
                time.sleep(DEATH_POLL)
            else:
                misses.append(state)
                c.kill(vm)
            in_a_row = in_a_row + 1 if state != "destroyed" else 0
            print(f"  death sample {i + 1}/{samples}: "
                  + (f"destroyed after {ms[-1]:.0f} ms" if state == "destroyed"
                     else f"MISS, still {state!r} after {elapsed:.0f} s"), flush=True)
            if in_a_row >= DEATH_GIVE_UP and i + 1 < samples:
                break
    finally:
        srv.cleanup()
    run = len(ms) + len(misses)
    out = {"samples_asked": samples, "samples_run": run, "detected": len(ms),
           "misses": len(misses), "miss_states": sorted(set(misses)),
           "timeout_s": DEATH_TIMEOUT, "poll_ms": DEATH_POLL * 1000, "end_reasons": reasons}
    if run < samples:
        out["stopped"] = f"{DEATH_GIVE_UP} misses in a row; {samples - run} samples not run"
    if ms:
        out.update({"p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
                    "max_ms": round(max(ms), 1)})
    return out


def death_line(d: dict) -> str:
    line = f"death: kill -9 of the Sentry → API says destroyed: {d['detected']}/{d['samples_run']} detected"
    if d["detected"]:
        line += f", p50 {d['p50_ms']:.0f} ms, p95 {d['p95_ms']:.0f} ms (end_reason: {d['end_reasons']})"
    if d["misses"]:
        line += (f"; {d['misses']} MISSED (not destroyed within {d['timeout_s']:.0f} s, "
                 f"still {', '.join(d['miss_states'])})")
    if "stopped" in d:
        line += f"; stopped after {d['stopped']}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--capacity", type=int, default=120)
    ap.add_argument("--death-samples", type=int, default=20)
    ap.add_argument("--only", default="cold,warm,exec,memory,capacity,death",
                    help="comma-separated: cold,warm,exec,memory,capacity,death")
    args = ap.parse_args()
    parts = args.only.split(",")
    unknown = set(parts) - {"cold", "warm", "exec", "memory", "capacity", "death"}
    if unknown:
        ap.error(f"unknown part(s) for --only: {', '.join(sorted(unknown))}")
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)}}

    def save() -> None:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    if "cold" in parts:
        cold = bench_cold(args.samples)
        results["cold_create_to_first_output"] = cold["e2a"]
        results["bare_runsc_do_first_output"] = cold["bare_runsc_do"]
        results["cold_vs_bare_runsc_do_p50_ratio"] = cold["ratio_p50"]
        print("cold  create→first output", cold["e2a"], flush=True)
        print("      bare runsc do       ", cold["bare_runsc_do"], flush=True)
        print(f"cold: e2a {cold['e2a']['p50_ms']:.0f} ms vs bare runsc do "
              f"{cold['bare_runsc_do']['p50_ms']:.0f} ms: {cold['ratio_p50']:.1f}x", flush=True)
        save()
    if "warm" in parts:
        results["warm_create_to_first_output"] = bench_warm(args.samples)
        print("warm  create→first output", results["warm_create_to_first_output"], flush=True)
        save()
    if "exec" in parts:
        ex = results["exec_round_trip_true"] = bench_exec(max(args.samples, 200))
        print("exec  round trip (true), back to back", ex["back_to_back"], flush=True)
        print("      round trip, paced              ", ex["paced"], flush=True)
        print("      in-sandbox floor (spawn true)  ", ex["floor_spawn_true"], flush=True)
        print(f"exec: round trip {ex['paced']['p50_ms']:.1f} ms vs in-sandbox floor "
              f"{ex['floor_spawn_true']['p50_ms']:.1f} ms: e2a adds {ex['e2a_adds_p50_ms']:.1f} ms "
              f"(p50s, paced {GAP * 1000:.0f} ms apart; old floor, bash forking sh -c true: "
              f"{ex['old_floor_bash_fork_exec_sh_true_p50_ms']:.1f} ms)", flush=True)
        save()
    if "memory" in parts:
        results["idle_memory"] = bench_memory()
        print("idle  memory per sandbox ", results["idle_memory"], flush=True)
        save()
    if "capacity" in parts:
        results["capacity"] = bench_capacity(args.capacity)
        print("capacity                 ", results["capacity"], flush=True)
        save()
    if "death" in parts:
        results["death_to_record"] = bench_death(args.death_samples)
        print(death_line(results["death_to_record"]), flush=True)
        save()
    save()
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
