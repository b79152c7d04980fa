"""The Kubernetes backend beside the embedded one, in one run (`make bench-kube`): what
docs/performance.md quotes in "Kubernetes backend". Two servers of the benchmark's own, one
per backend without a warm pool and one per backend with one (E2A_POOL_SIZES standard: 2), the
Kubernetes ones again with root and a writable image (E2A_KUBE_NON_ROOT and
E2A_KUBE_READ_ONLY_ROOT false; creates only: no init container seeds the writable paths), and
the test cluster (scripts/k8s/cluster.sh, under /tmp/e2a-bench/k8s, or one already up with
--reuse DIR). Every sandbox is the standard template (0.5 vCPU, 512 MiB). What each figure
times, client side:

  create → first output   t0 before POST /v1/sandboxes, t1 once the first stdout line of
                          `echo hi` (streamed) arrives. Deleted between samples. Warm: the
                          same, each sample once the pool is full again (GET /health).
  exec round trip         POST .../commands `echo hi` until its stream ends, on one sandbox.
  N parallel creates      N threads POST at once; until all N are running (each POST
                          answered 201). Then all deleted. For 50 to fit the test node's
                          2 cores and 23 GiB, the Kubernetes servers request 0.05 of a pod's
                          CPU limit and 0.25 of its memory limit (requests weigh only on
                          scheduling; limits are the template's).
  memory per idle sandbox MemAvailable before and after N idle sandboxes ran for 5 s,
                          divided by N (the whole host: gVisor, shims, the kubelet's share).
  death (Kubernetes)      SIGKILL to a pod's runsc-sandbox process on the host, until GET
                          says `destroyed` (polled every 50 ms): the pod watch's answer plus
                          the delete of its objects. The embedded backend's own death figure
                          is bench/sandboxes.py's.

Usage: python bench/kube.py [--samples 10] [--execs 30] [--parallel 50] [--deaths 5] [--reuse DIR]
                           [--only embedded kubernetes kubernetes_root]
Results are printed and written to bench/kube.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import others, pct  # noqa: E402
from e2a.config import Settings  # noqa: E402
from e2a.kube import images  # noqa: E402
from e2a.templates import recipes  # noqa: E402
from tests.e2e.server import Server  # noqa: E402
from tests.kube.cluster import NAMESPACE, Cluster, kube_env  # noqa: E402

CLUSTER_DIR = Path("/tmp/e2a-bench/k8s")


def summary(ms: list[float]) -> dict:
    return {"p50": round(pct(ms, 50), 1), "p95": round(pct(ms, 95), 1), "n": len(ms)}


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


class Bench:
    def __init__(self, name: str, srv: Server):
        self.name, self.srv = name, srv
        key = srv.create_user(f"bench-{name}@example.com")
        self.http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=120)

    def create(self) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": "standard",
                                                   "idle_timeout_seconds": 600})
        r.raise_for_status()
        return r.json()["vm_id"]

    def delete(self, vm: str) -> None:
        self.http.delete(f"/v1/sandboxes/{vm}")

    def first_output(self, vm: str) -> None:
        with self.http.stream("POST", f"/v1/sandboxes/{vm}/commands",
                              json={"cmd": "echo hi"}) as r:
            for line in r.iter_lines():
                if json.loads(line).get("type") == "stdout":
                    return
        raise RuntimeError("no output")

    def exec_round_trip(self, vm: str) -> None:
        with self.http.stream("POST", f"/v1/sandboxes/{vm}/commands",
                              json={"cmd": "echo hi"}) as r:
            for _ in r.iter_lines():
                pass


def create_to_first_output(b: Bench, n: int, warm: bool = False) -> dict:
    """Cold, or warm: each sample once the pool is full again and its refill has settled
    (the claim is measured, not a host busy starting the next pooled pod)."""
    ms = []
    for _ in range(n):
        if warm:
            while b.http.get("/health").json()["pool"].get("standard", 0) < 2:
                time.sleep(0.2)
            time.sleep(1)
        t0 = time.perf_counter()
        vm = b.create()
        b.first_output(vm)
        ms.append(1000 * (time.perf_counter() - t0))
        b.delete(vm)
    return summary(ms)


def execs(b: Bench, n: int) -> dict:
    vm = b.create()
    try:
        b.exec_round_trip(vm)
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            b.exec_round_trip(vm)
            ms.append(1000 * (time.perf_counter() - t0))
        return summary(ms)
    finally:
        b.delete(vm)


def parallel(b: Bench, n: int) -> dict:
    before = mem_available()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        vms = list(pool.map(lambda _: b.create(), range(n)))
    took = 1000 * (time.perf_counter() - t0)
    time.sleep(5)
    per = (before - mem_available()) / n / 2**20
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(b.delete, vms))
    return {"all_running_ms": round(took), "n": n, "memory_per_idle_sandbox_mib": round(per, 1)}


def death(b: Bench, cluster: Cluster, n: int) -> dict:
    from tests.kube.test_kube_sandboxes import sandbox_processes
    ms, noticed = [], []
    for _ in range(n):
        vm = b.create()
        pids = sandbox_processes(cluster, vm.replace("_", "-"))
        t0 = time.perf_counter()
        for pid in pids:
            os.kill(pid, 9)
        seen = None
        while True:
            sb = b.http.get(f"/v1/sandboxes/{vm}").json()
            if seen is None and sb["state"] != "running":
                seen = 1000 * (time.perf_counter() - t0)
            if sb["state"] == "destroyed":
                break
            time.sleep(0.05)
        ms.append(1000 * (time.perf_counter() - t0))
        noticed.append(seen)
    return {"to_stopping_ms": summary(noticed), "to_destroyed_ms": summary(ms)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--deaths", type=int, default=5)
    ap.add_argument("--reuse", type=Path, help="a test cluster already up in this directory")
    ap.add_argument("--only", nargs="+", help="these backends only (embedded, kubernetes, "
                    "kubernetes_root), each cold and warm")
    args = ap.parse_args()
    script = ROOT / "scripts/k8s/cluster.sh"
    where = args.reuse or CLUSTER_DIR
    if not args.reuse:
        subprocess.run([script, "down", where], check=False)
        subprocess.run([script, "up", where], check=True)
    cluster = Cluster(where)
    servers: list[tuple[str, Server]] = []
    try:
        if NAMESPACE not in cluster.kubectl("get", "namespaces", "-o", "name"):
            cluster.kubectl("create", "namespace", NAMESPACE)
        images.import_to(Settings(envd=str(ROOT / "build/envd")), recipes.load("standard"),
                         str(cluster.bin / "ctr"), str(where / "containerd/containerd.sock"))
        pool = {"E2A_POOL_SIZES": json.dumps({"standard": 2})}
        packed = {"E2A_KUBE_CPU_REQUEST_RATIO": "0.05", "E2A_KUBE_MEMORY_REQUEST_RATIO": "0.25"}
        out: dict = {"machine": {"cores": os.cpu_count(), "others": others()}}
        root = {"E2A_KUBE_NON_ROOT": "false", "E2A_KUBE_READ_ONLY_ROOT": "false"}
        configs = [
            ("embedded", {}), ("embedded_warm", pool),
            ("kubernetes", {**kube_env(cluster, "e2a_bench"), **packed}),
            ("kubernetes_warm", {**kube_env(cluster, "e2a_bench_warm"), **packed, **pool}),
            ("kubernetes_root", {**kube_env(cluster, "e2a_bench_root"), **packed, **root}),
            ("kubernetes_root_warm", {**kube_env(cluster, "e2a_bench_root_warm"), **packed,
                                      **root, **pool})]
        # one server at a time, so no other's sandboxes (or pool) weigh on a measure
        for i, (name, env) in enumerate(configs):
            if args.only and name.removesuffix("_warm") not in args.only:
                continue
            srv = Server(instance=f"bk{i}", subnet=f"10.248.{16 * i}.0/20",
                         base=Path(f"/tmp/e2a-bench/{name}"))
            srv.extra_env = env
            srv.cleanup()
            servers.append((name, srv))
            srv.start()
            b = Bench(srv.instance, srv)
            backend = name.removesuffix("_warm")
            if name.endswith("_warm"):
                out[backend]["warm_create_to_first_output_ms"] = create_to_first_output(
                    b, args.samples, warm=True)
            elif name.endswith("_root"):  # only the create differs (no init container)
                out[name] = {"create_to_first_output_ms": create_to_first_output(b, args.samples)}
            else:
                out[name] = {"create_to_first_output_ms": create_to_first_output(b, args.samples),
                             "exec_round_trip_ms": execs(b, args.execs),
                             "parallel_creates": parallel(b, args.parallel)}
                if name == "kubernetes":
                    out[name]["death"] = death(b, cluster, args.deaths)
            print(name, json.dumps(out[backend]), flush=True)
            srv.stop()
            srv.cleanup()
            cluster.kubectl("delete", "pods,secrets,networkpolicies", "-n", NAMESPACE, "-l",
                            f"e2a.dev/instance={srv.instance}", "--wait=true", check=False)
        results = ROOT / "bench/kube.json"
        if args.only and results.exists():  # the other backends' figures stay
            out = {**json.loads(results.read_text()), **out}
        results.write_text(json.dumps(out, indent=1) + "\n")
    finally:
        for _, srv in servers:
            srv.stop()
            srv.cleanup()
            # pooled pods outlive their e2a on purpose; these are the benchmark's own
            cluster.kubectl("delete", "pods,secrets,networkpolicies", "-n", NAMESPACE, "-l",
                            f"e2a.dev/instance={srv.instance}", "--wait=true", check=False)
        if not args.reuse:
            subprocess.run([script, "down", where], check=False)


if __name__ == "__main__":
    main()
