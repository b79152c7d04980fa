"""Pause, resume and fork benchmarks (`make bench-pause`): what docs/performance.md quotes in
"Pause, resume and fork". Every sandbox is the standard template (0.5 vCPU, 512 MiB), on a
server of the benchmark's own (instance bp, subnet 10.249.0.0/20, base /tmp/e2a-bench/pause,
E2A_POOL_SIZE=0). What each figure times:

  pause          POST /v1/sandboxes/{id}/pause until its answer (state "paused"), client side.
                 "idle": a standard sandbox that ran `echo hi` and nothing else. "<N> MB": the
                 same with a python3 process in it that allocated N MiB (a bytearray filled
                 with random bytes, so every page is touched and none is zero) and sleeps.
  resume → first output
                 t0 before POST /v1/sandboxes/{id}/resume, t1 once the first stdout line of
                 `echo hi` (cmd, streamed: envd's `/bin/bash -c 'echo hi'`) reaches the
                 client; the POST alone is kept too. Pause and resume alternate on the same
                 sandbox (~0.3 s apart: the old checkpoint is removed in the background after
                 a resume), so each sample restores a checkpoint written just before.
  server's steps The server's own figures from its host log (GET .../logs): "paused in N ms
                 (B bytes on disk)" and "resumed in N ms" (e2a/sandboxes/manager.py: from
                 `links.arm` to envd answering, before the transition is stored). For a few
                 more idle resumes `perf record` (system-wide, sched_process_fork/exec/exit
                 tracepoints, CLOCK_MONOTONIC, the same clock as the client's) times the
                 processes the server starts: `ip -n ... -batch` (links.arm) and `runsc
                 restore --detach` (fork → exit). The rest of "resumed in" is envd's wait
                 (polled every 3 ms) plus the CPU quota and the death watch; POST − "resumed
                 in" is the API (auth, the funds check, the lock) and the stored transition.
                 A pause's children are listed by name and order (runsc#1 is `runsc
                 checkpoint`, runsc#2 `runsc delete`). Idle (--traced) and 300 MiB (half as
                 many). perf's own cost is small (three tracepoints), but these samples are
                 kept apart from the figures above.
  fork into 3    t0 before POST /v1/sandboxes/{id}/fork {"count": 3} on a running idle
                 sandbox, t1 once each of the 3 forks has answered `echo hi` (three streamed
                 commands in parallel threads, started when the POST answers). The forks are
                 deleted between samples.
  checkpoint size
                 After a pause: `disk_bytes` of the answer (writable layer + /tmp +
                 checkpoint, allocated), and the checkpoint directory
                 <data>/sandboxes/<id>/checkpoint itself (allocated blocks and apparent size
                 of its files), for 0 (idle), 100 and 300 MiB touched. "per MiB touched" is
                 (size(N) − size(0)) / N.
  bare restore   The same paused idle sandbox's checkpoint restored by runsc itself, with e2a
                 out of the way: its address put back as links.arm does (`ip -n <netns> -batch`,
                 untimed), then timed until runsc returns:
                     runsc --root <run_dir>/runsc --platform systrap --overlay2 none restore
                         --detach --bundle <sandbox dir> --image-path <dir>/checkpoint <rid>
                 (e2a's own command line, runtime/runsc.py `_launch`), and then until envd
                 accepts a TCP connection on <sandbox ip>:984 from the host. Then `runsc delete
                 --force <rid>` and its cgroup removed; the checkpoint is not consumed by a
                 restore, so the sandbox is still a whole paused sandbox, and e2a's own resume
                 (→ first output) follows at once, then a pause again: bare and e2a samples
                 alternate and share the machine's load. Ratio: e2a's resume POST (and resume
                 → first output) p50 / bare restore p50. The same again for a sandbox holding
                 300 MiB (bare300, --big-samples).

Usage: python bench/pause.py [--samples 20] [--big-samples 6] [--fork-samples 6]
                             [--bare-samples 10] [--traced 6]
Results are printed and written to bench/pause.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

# The test helpers' stripe-mock and SMTP ports are per test worker: take worker 7's, which no
# suite on this machine uses by default (tests/conftest.py worker_index).
os.environ.setdefault("E2A_TEST_WORKER_OFFSET", "7")

import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import others, pct  # noqa: E402
from tests.e2e.server import Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "pause.json"
BASE = Path("/tmp/e2a-bench/pause")
INSTANCE, SUBNET = "bp", "10.249.0.0/20"
MIB = 1 << 20
ENVD_PORT = 984

HOG = """
import os, sys, time
n = int(sys.argv[1])
chunk = os.urandom(1 << 20)
b = bytearray(n << 20)
for i in range(n):
    b[i << 20:(i + 1) << 20] = chunk
open("/tmp/hog-ready", "w").write(str(os.getpid()))
time.sleep(10 ** 6)
"""


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def machine() -> dict:
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))) * 1024
    return {"nproc": os.cpu_count(), "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release()}


def dir_size(path: Path) -> dict:
    allocated = apparent = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return {"allocated": allocated, "apparent": apparent}


class Bench:
    def __init__(self):
        self.srv = Server(instance=INSTANCE, subnet=SUBNET, base=BASE,
                          extra_env={"E2A_POOL_SIZE": "0", "E2A_DISK_GIB": "6"})
        self.srv.cleanup()
        self.srv.start()
        key = self.srv.create_user("bench-pause@example.com")
        self.http = httpx.Client(base_url=self.srv.url, timeout=300,
                                 headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self.http.close()
        self.srv.cleanup()

    @property
    def sandboxes_dir(self) -> Path:
        return self.srv.base / "data" / "sandboxes"

    def runtime_id(self, vm: str) -> str:
        return f"{INSTANCE}-{vm}"

    # ---- API ---------------------------------------------------------------------------------

    def create(self) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": "standard",
                                                  "idle_timeout_seconds": 1800})
        if r.status_code >= 300:
            raise RuntimeError(f"create: {r.status_code} {r.text[:300]}")
        return r.json()["vm_id"]

    def delete(self, vm: str) -> None:
        self.http.delete(f"/v1/sandboxes/{vm}")

    def run(self, vm: str, cmd: str) -> str:
        r = self.http.post(f"/v1/sandboxes/{vm}/commands", json={"cmd": cmd})
        r.raise_for_status()
        out = []
        for line in r.text.splitlines():
            ev = json.loads(line)
            if ev["type"] == "stdout":
                out.append(ev["data"])
            elif ev["type"] == "error":
                raise RuntimeError(f"{cmd!r}: {ev}")
        return "".join(out)

    def first_output(self, vm: str, http: httpx.Client | None = None) -> None:
        with (http or self.http).stream("POST", f"/v1/sandboxes/{vm}/commands",
                                        json={"cmd": "echo hi"}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if '"stdout"' in line:
                    return
        raise RuntimeError(f"{vm}: no output")

    def pause(self, vm: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = self.http.post(f"/v1/sandboxes/{vm}/pause")
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200 or r.json()["state"] != "paused":
            raise RuntimeError(f"pause {vm}: {r.status_code} {r.text[:300]}")
        return ms, r.json()

    def resume_to_output(self, vm: str) -> tuple[float, float, float, float]:
        """(monotonic t0, POST ms, to first output ms, monotonic end of the POST)."""
        t0 = time.perf_counter()
        m0 = time.monotonic()
        r = self.http.post(f"/v1/sandboxes/{vm}/resume")
        post = (time.perf_counter() - t0) * 1000
        m1 = time.monotonic()
        if r.status_code != 200 or r.json()["state"] != "running":
            raise RuntimeError(f"resume {vm}: {r.status_code} {r.text[:300]}")
        self.first_output(vm)
        return m0, post, (time.perf_counter() - t0) * 1000, m1

    def host_log(self, vm: str) -> list[str]:
        r = self.http.get(f"/v1/sandboxes/{vm}/logs")
        r.raise_for_status()
        return [x["message"] for x in r.json()["lines"] if x.get("source") == "host"]

    def server_ms(self, vm: str, what: str) -> list[float]:
        """Every "<what> in N ms" of the sandbox's host log, oldest first."""
        return [float(m.group(1)) for line in self.host_log(vm)
                if (m := re.match(rf"{what} in (\d+) ms", line))]

    # ---- memory ------------------------------------------------------------------------------

    def hog(self, vm: str, mib: int) -> int:
        """Start a python3 in the sandbox that holds `mib` MiB of touched memory; its RSS (KiB)."""
        self.run(vm, f"rm -f /tmp/hog-ready; setsid nohup python3 -c '{HOG}' {mib} "
                     ">/dev/null 2>&1 </dev/null &")
        end = time.monotonic() + 120
        while time.monotonic() < end:
            pid = self.run(vm, "cat /tmp/hog-ready 2>/dev/null || true").strip()
            if pid:
                rss = self.run(vm, f"grep VmRSS /proc/{pid}/status").split()
                return int(rss[1])
            time.sleep(0.5)
        raise RuntimeError(f"{vm}: the {mib} MiB process did not get ready")


def cycles(b: Bench, vm: str, n: int) -> dict:
    """n × (pause, resume → first output) of one sandbox, ~0.3 s apart."""
    pause_ms, post_ms, first_ms, disk, ckpt = [], [], [], [], []
    for _ in range(n):
        time.sleep(0.3)
        ms, rec = b.pause(vm)
        pause_ms.append(ms)
        disk.append(rec.get("disk_bytes") or 0)
        ckpt.append(dir_size(b.sandboxes_dir / vm / "checkpoint"))
        time.sleep(0.3)
        _, post, first, _ = b.resume_to_output(vm)
        post_ms.append(post)
        first_ms.append(first)
    srv_pause = b.server_ms(vm, "paused")[-n:]
    srv_resume = b.server_ms(vm, "resumed")[-n:]
    return {"pause": summary(pause_ms), "resume_post": summary(post_ms),
            "resume_to_first_output": summary(first_ms),
            "server_paused_in": summary(srv_pause), "server_resumed_in": summary(srv_resume),
            "disk_bytes_p50": int(pct(disk, 50)),
            "checkpoint_allocated_p50": int(pct([c["allocated"] for c in ckpt], 50)),
            "checkpoint_apparent_p50": int(pct([c["apparent"] for c in ckpt], 50))}


def part_idle(b: Bench, n: int) -> dict:
    vm = b.create()
    try:
        b.first_output(vm)
        return cycles(b, vm, n)
    finally:
        b.delete(vm)


def part_memory(b: Bench, mib: int, n: int) -> dict:
    vm = b.create()
    try:
        b.first_output(vm)
        rss = b.hog(vm, mib)
        out = {"touched_mib": mib, "hog_rss_kib": rss, **cycles(b, vm, n)}
        # the process is still there and still holds its memory after the resumes
        pid = b.run(vm, "cat /tmp/hog-ready").strip()
        out["hog_rss_kib_after"] = int(b.run(vm, f"grep VmRSS /proc/{pid}/status").split()[1])
        return out
    finally:
        b.delete(vm)


def part_fork(b: Bench, n: int, count: int = 3) -> dict:
    src = b.create()
    clients = [httpx.Client(base_url=b.srv.url, timeout=120, headers=b.http.headers)
               for _ in range(count)]
    post_ms, all_ms = [], []
    try:
        b.first_output(src)
        for _ in range(n):
            time.sleep(0.3)
            t0 = time.perf_counter()
            r = b.http.post(f"/v1/sandboxes/{src}/fork", json={"count": count})
            post_ms.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 201:
                raise RuntimeError(f"fork: {r.status_code} {r.text[:300]}")
            forks = [s["vm_id"] for s in r.json()["sandboxes"]]
            errors: list[BaseException] = []

            def answer(vm: str, http: httpx.Client) -> None:
                try:
                    b.first_output(vm, http)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=answer, args=(vm, http))
                       for vm, http in zip(forks, clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            all_ms.append((time.perf_counter() - t0) * 1000)
            if errors:
                raise RuntimeError(f"a fork did not answer: {errors[0]}")
            deleters = [threading.Thread(target=b.delete, args=(vm,)) for vm in forks]
            for t in deleters:
                t.start()
            for t in deleters:
                t.join()
        b.first_output(src)  # the origin runs on
        return {"count": count, "post": summary(post_ms), "all_answer": summary(all_ms)}
    finally:
        for c in clients:
            c.close()
        b.delete(src)


# ---- bare runsc restore ----------------------------------------------------------------------

def standard_platform() -> tuple[str, str]:
    from e2a.config import Settings
    from e2a.templates import recipes
    settings = Settings()
    recipe = recipes.load("standard")
    return (settings.runsc or str(settings.cache_dir / "bin" / "runsc"),
            settings.platform or recipe.platform)


def link_of(netns: str) -> tuple[str, str]:
    """(host ip, sandbox ip) of a sandbox's namespace: its eth0's peer is the host's veth, whose
    address is the /30's first; the sandbox's is the next (e2a/network/links.py Addressing)."""
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "eth0"], check=True,
                         capture_output=True, text=True).stdout
    peer = int(re.search(r"eth0@if(\d+)", out).group(1))
    host_if = next(p.name for p in Path("/sys/class/net").iterdir()
                   if (p / "ifindex").read_text().strip() == str(peer))
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", host_if], check=True,
                         capture_output=True, text=True).stdout
    host_ip = re.search(r"inet (\S+)/", out).group(1)
    a, b_, c, d = map(int, host_ip.split("."))
    return host_ip, f"{a}.{b_}.{c}.{d + 1}"


def arm(netns: str, host_ip: str, sandbox_ip: str) -> None:
    """e2a/network/links.py `arm`, as a command of our own."""
    subprocess.run(["ip", "-n", netns, "-batch", "-"], check=True, input=(
        f"addr replace {sandbox_ip}/30 dev eth0\nlink set eth0 up\nlink set lo up\n"
        f"route replace default via {host_ip}\n").encode())


def envd_accepts(ip: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((ip, ENVD_PORT), timeout=0.5):
                return
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"envd did not accept on {ip}:{ENVD_PORT}")


def remove_cgroup(rid: str) -> None:
    for d in Path("/sys/fs/cgroup").glob(f"*/{INSTANCE}/{rid}"):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
    if (Path("/sys/fs/cgroup") / INSTANCE / rid).is_dir():  # cgroup v2
        (Path("/sys/fs/cgroup") / INSTANCE / rid).rmdir()


def part_bare(b: Bench, n: int, mib: int = 0) -> dict:
    runsc, platform_ = standard_platform()
    vm = b.create()
    rid = b.runtime_id(vm)
    sdir = b.sandboxes_dir / vm
    netns = f"{INSTANCE}-{vm}"
    base = [runsc, "--root", str(b.srv.run_dir / "runsc")]
    restore_ms, envd_ms, e2a_post, e2a_first = [], [], [], []
    console = BASE / "bare-console.log"
    try:
        b.first_output(vm)
        if mib:
            b.hog(vm, mib)
        host_ip, sandbox_ip = link_of(netns)
        for _ in range(n):
            time.sleep(0.3)
            b.pause(vm)
            arm(netns, host_ip, sandbox_ip)
            args = base + [f"--platform={platform_}", "--overlay2", "none", "restore",
                           "--detach", "--bundle", str(sdir), "--image-path",
                           str(sdir / "checkpoint"), rid]
            with open(console, "ab") as out:
                t0 = time.perf_counter()
                p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                t1 = time.perf_counter()
            if p.returncode != 0:
                raise RuntimeError(f"bare restore failed ({p.returncode}); see {console}")
            envd_accepts(sandbox_ip)
            t2 = time.perf_counter()
            restore_ms.append((t1 - t0) * 1000)
            envd_ms.append((t2 - t0) * 1000)
            subprocess.run(base + ["delete", "--force", rid], check=True, capture_output=True)
            remove_cgroup(rid)
            time.sleep(0.3)
            _, post, first, _ = b.resume_to_output(vm)  # e2a's, of the same checkpoint
            e2a_post.append(post)
            e2a_first.append(first)
        return {"touched_mib": mib, "bare_restore": {**summary(restore_ms), "platform": platform_},
                "bare_restore_to_envd_tcp": summary(envd_ms),
                "e2a_resume_post": summary(e2a_post),
                "e2a_resume_to_first_output": summary(e2a_first),
                "ratio_post_p50": round(pct(e2a_post, 50) / pct(restore_ms, 50), 2),
                "ratio_first_output_p50": round(pct(e2a_first, 50) / pct(restore_ms, 50), 2)}
    finally:
        subprocess.run(base + ["delete", "--force", rid], capture_output=True)
        b.delete(vm)


# ---- where a pause's and a resume's time go (perf) -----------------------------------------

def children(script: str, server: int, threads: set[int]) -> list[dict]:
    """The server's child processes in a `perf script` of fork/exec/exit events: each with
    its fork and exit time (CLOCK_MONOTONIC s) and the file it executed."""
    kids: dict[int, dict] = {}
    for line in script.splitlines():
        m = re.match(r"\s*(\d+)/(\d+)\s+([\d.]+):\s+sched:(\w+):\s*(.*)", line)
        if not m:
            continue
        pid, tid, t, event, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
        if event == "sched_process_fork" and (pid == server or tid in threads):
            kids[int(re.search(r"child_pid=(\d+)", rest)[1])] = {"fork": t, "exec": ""}
        elif event == "sched_process_exec" and pid in kids:
            kids[pid]["exec"] = re.search(r"filename=(\S+)", rest)[1]
        elif event == "sched_process_exit" and pid in kids and pid == tid:
            kids[pid]["exit"] = t
    return sorted((k for k in kids.values() if "exit" in k), key=lambda k: k["fork"])


def steps(kids: list[dict], m0: float, m1: float) -> list[tuple[str, float, float]]:
    """The children started between m0 and m1: (name#k, ms from m0 to its fork, ms it ran)."""
    seen: dict[str, int] = {}
    out = []
    for k in kids:
        if m0 <= k["fork"] <= m1:
            name = os.path.basename(k["exec"]) or "?"
            seen[name] = seen.get(name, 0) + 1
            out.append((f"{name}#{seen[name]}", (k["fork"] - m0) * 1000,
                        (k["exit"] - k["fork"]) * 1000))
    return out


def part_traced(b: Bench, n: int, mib: int = 0) -> dict:
    """n pause + resume cycles with perf recording which processes the server started, when."""
    data = BASE / f"perf-{mib}.data"
    vm = b.create()
    server = b.srv.proc.pid
    pauses, resumes = [], []
    perf = None
    try:
        b.first_output(vm)
        if mib:
            b.hog(vm, mib)
        perf = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o",
                                 str(data), "-e", "sched:sched_process_fork", "-e",
                                 "sched:sched_process_exec", "-e", "sched:sched_process_exit"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # perf is recording
        for _ in range(n):
            time.sleep(0.3)
            m0 = time.monotonic()
            ms, _ = b.pause(vm)
            pauses.append((m0, time.monotonic(), ms))
            time.sleep(0.3)
            m0, post, first, m1 = b.resume_to_output(vm)
            resumes.append((m0, m1, post, first))
        time.sleep(0.2)
    finally:
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(30)
        resumed = b.server_ms(vm, "resumed")[-n:]
        paused = b.server_ms(vm, "paused")[-n:]
        b.delete(vm)
    threads = {int(t) for t in os.listdir(f"/proc/{server}/task")}
    kids = children(subprocess.run(["perf", "script", "-i", str(data), "-F",
                                    "pid,tid,time,event,trace"],
                                   capture_output=True, text=True).stdout, server, threads)
    parts = {"api_in": [], "arm": [], "arm_to_restore": [], "runsc_restore": [],
             "after_restore": [], "api_out": []}
    for (m0, m1, post, first), srv_ms in zip(resumes, resumed):
        inside = steps(kids, m0, m1)
        ip = next((s for s in inside if s[0] == "ip#1"), None)
        rs = next((s for s in inside if s[0] == "runsc#1"), None)
        if ip is None or rs is None:
            continue
        start = ip[1]  # _resume's t0 is just before (links.arm is its first step)
        parts["api_in"].append(start)
        parts["arm"].append(ip[2])
        parts["arm_to_restore"].append(rs[1] - (ip[1] + ip[2]))
        parts["runsc_restore"].append(rs[2])
        # the rest of "resumed in": envd's wait, the CPU quota, the death watch
        parts["after_restore"].append(srv_ms - (rs[1] + rs[2] - start))
        # after "resumed in": the stored transition, the answer
        parts["api_out"].append((m1 - m0) * 1000 - start - srv_ms)
    # a pause's children, by name and order (runsc#1 checkpoint, runsc#2 delete, ...)
    pause_steps: dict[str, list[float]] = {}
    for m0, m1, _ in pauses:
        for name, _, ran in steps(kids, m0, m1):
            pause_steps.setdefault(name, []).append(ran)
    return {"touched_mib": mib, "samples": len(parts["arm"]),
            "resume_p50_ms": {k: round(pct(v, 50), 1) for k, v in parts.items() if v},
            "resume_max_ms": {k: round(max(v), 1) for k, v in parts.items() if v},
            "server_resumed_in_p50_ms": round(pct(resumed, 50), 1),
            "resume_post_p50_ms": round(pct([r[2] for r in resumes], 50), 1),
            "resume_to_first_output_p50_ms": round(pct([r[3] for r in resumes], 50), 1),
            "pause_post_p50_ms": round(pct([p[2] for p in pauses], 50), 1),
            "server_paused_in_p50_ms": round(pct(paused, 50), 1),
            "pause_children_p50_ms": {k: round(pct(v, 50), 1) for k, v in pause_steps.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--big-samples", type=int, default=6)
    ap.add_argument("--fork-samples", type=int, default=6)
    ap.add_argument("--bare-samples", type=int, default=10)
    ap.add_argument("--traced", type=int, default=6, help="0: no perf breakdown")
    args = ap.parse_args()
    BASE.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(),
                     "taken": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "others_at_start": others()}
    seconds = results.setdefault("part_seconds", {})

    def run(part: str, fn) -> None:
        t0 = time.perf_counter()
        results[part] = fn()
        seconds[part] = round(time.perf_counter() - t0)
        results[f"others_after_{part}"] = others()
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(part, json.dumps(results[part]), flush=True)

    started = time.perf_counter()
    b = Bench()
    try:
        run("idle", lambda: part_idle(b, args.samples))
        run("mem100", lambda: part_memory(b, 100, 3))
        run("mem300", lambda: part_memory(b, 300, args.big_samples))
        run("fork", lambda: part_fork(b, args.fork_samples))
        run("bare", lambda: part_bare(b, args.bare_samples))
        run("bare300", lambda: part_bare(b, args.big_samples, 300))
        if args.traced and shutil.which("perf"):
            run("traced", lambda: part_traced(b, args.traced))
            run("traced300", lambda: part_traced(b, max(3, args.traced // 2), 300))
    finally:
        b.close()
    zero = results["idle"]["checkpoint_allocated_p50"]
    results["checkpoint_per_touched_mib"] = {
        f"{mib}": {"checkpoint_mib": round(results[k]["checkpoint_allocated_p50"] / MIB, 1),
                   "disk_bytes_mib": round(results[k]["disk_bytes_p50"] / MIB, 1),
                   "added_per_touched_mib": round(
                       (results[k]["checkpoint_allocated_p50"] - zero) / MIB / mib, 3)}
        for mib, k in ((100, "mem100"), (300, "mem300"))}
    results["checkpoint_per_touched_mib"]["0"] = {
        "checkpoint_mib": round(zero / MIB, 1),
        "disk_bytes_mib": round(results["idle"]["disk_bytes_p50"] / MIB, 1)}
    results["run_seconds"] = round(time.perf_counter() - started)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print("checkpoint", json.dumps(results["checkpoint_per_touched_mib"]))
    print(f"done in {results['run_seconds']} s")


if __name__ == "__main__":
    main()
