"""Workspace benchmarks (`make bench-workspaces`): what a persistent /home/user costs.

A workspace is an rclone FUSE mount on the host (e2a/workspaces/mount.py: --vfs-cache-mode full,
write-back 2 s, a new empty VFS cache per sandbox) of an S3 prefix on the embedded S3 server
(`rclone serve s3` over a crypt remote on 127.0.0.1, e2a/workspaces/server.py), bound into the
sandbox as /home/user. Every sandbox here is the standard template (0.5 vCPU, 512 MiB).

  create       t0 just before POST /v1/sandboxes, t1 once the complete (non-streamed) answer
               to a first command `cat ~/.profile` has arrived, with exit 0 and the file's text.
               Four kinds, samples alternating (rotated order) so they share the machine's load:
                 none-cold      no workspace, no pool (E2A_POOL_SIZE=0): the image's .profile
                 existing       {"app_id": "bench-existing"}: a workspace made before the samples
                                holding the template's dotfiles + 100 files of 16 KiB
                                (~/files/f000..f099) in S3; each sandbox has a new, empty VFS
                                cache, so its .profile comes from S3
                 fresh          {"app_id": "fresh-<n>"}: a new workspace each time (the registry
                                row is made, the template's dotfiles are copied in on the host)
                 none-warm      no workspace, claimed from a warm pool of 2 (a second server
                                lifetime with E2A_POOL_SIZE=2; /health polled until the pool is
                                full before each sample)
               "added" is p50(workspace) - p50(baseline), given against none-cold (like for like:
               a workspace is mounted at boot, so such a create never comes from the pool) and
               against none-warm (what a caller sees when switching a workspace on). Also
               recorded: the POST alone, the server's boot steps (its log line "boot
               network+rootfs N, runsc N, envd N ms"; the mount is in network+rootfs) and each
               sample's DELETE.
  io           One sandbox per sample with the workspace {"app_id": "bench-io"}, which holds a
               200 MiB file of /dev/urandom data (seed.bin) written by an earlier sandbox.
               Timed inside the sandbox with bash's $EPOCHREALTIME around one command each:
                 read cold      dd if=~/seed.bin of=/dev/null bs=1M: the first read in a sandbox,
                                so it comes through rclone from S3 (the S3 server's files are in
                                the host's page cache after the first sample: S3 over loopback,
                                not a disk)
                 read warm      the same again (now in the sandbox's VFS cache, and gVisor's)
                 write          dd if=/tmp/src of=DIR/w.bin bs=1M conv=fsync (200 MiB, the seed's
                                random bytes, copied to /tmp untimed); returns once the data is
                                in rclone's local cache: the upload to S3 comes after
                 re-read        dd if=DIR/w.bin of=/dev/null bs=1M right after the write
                 small files    python3 in the sandbox: 1000 x (open, write 4 KiB, close) into a
                                new directory, timed inside python (its start excluded)
               DIR is ~ (the workspace) and /tmp (the sandbox's own disk: its btrfs subvolume on
               the host, through gVisor's gofer) in the same sandbox, alternately. The own-disk
               "read" has no cold variant: /tmp is new with each sandbox, so its read is the
               re-read of a file just written there (compared with both workspace reads).
               After each workspace write the benchmark starts its upload at once (rclone's rc
               vfs/queue-set-expiry 0 over the mount's socket on the host, as a DELETE does) and
               times it until rclone's queue is empty: "upload" (the file is then checked in S3
               through GET /v1/workspaces/{id}/files).
  git          A bare repository made on the host (200 files of 256 KiB of random bytes in 4
               commits: ~50 MiB, one pack), uploaded once into the sandbox's /tmp/repo.git by
               PUT /files/tar; then, alternately, `git clone -q --no-local /tmp/repo.git ~/repo`
               (workspace {"app_id": "bench-git"}) and `... /tmp/clone`, timed inside, each
               checked (HEAD as on the host, 201 files) and removed; after a workspace clone its
               upload is forced and timed as above, before the rm.
  destroy      A sandbox on the workspace {"app_id": "bench-destroy"}: a 100 MiB file of random
               bytes (made on the host, sha256 known) is put in /tmp by PUT /files, then
               `cp /tmp/src ~/u<n>.bin` (returns once in rclone's cache, nothing uploaded yet) and
               at once DELETE /v1/sandboxes/{id}: timed until the DELETE answers (200 and
               "state": "destroyed"). The next sample's sandbox (and one more at the end) checks
               `sha256sum ~/u<n>.bin` against the host's and removes it. The same DELETE of a
               sandbox without a workspace and with an untouched one are in `create`.

  manyfiles    create → `cat ~/.profile` as in `create`, then DELETE (nothing written), with a
               workspace of 20,000 files of 1 KiB beside one of 100 (samples alternating,
               --samples // 3 of each, at least 3): what grows with a workspace's file count. A
               DELETE counts the workspace in S3 again before it answers (Manager._stop →
               Workspaces.refresh_usage, a listing of the whole prefix, waited up to 5 s).

Machine (nproc, memory, kernel) and the load average before and after each part are recorded,
with the other e2a servers and pytest processes running on the machine at the start.
One server lifetime (instance bw0, subnet 10.240.0.0/20, /tmp/e2a-bench-ws) with
E2A_POOL_SIZE=0 for create/io/git/destroy, then one with E2A_POOL_SIZE=2 for none-warm.
Results are printed and written to bench/workspaces.json.
Usage: python bench/workspaces.py [--samples 15] [--io-samples N] [--only create,warm,io,git,destroy,manyfiles]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import others, pct  # noqa: E402
from tests.e2e.server import Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "workspaces.json"
BASE = Path("/tmp/e2a-bench-ws")
HOST_DIR = Path("/tmp/e2a-bench-ws-host")  # the host's repository and random files
PARTS = ["create", "warm", "io", "git", "destroy", "manyfiles"]
MIB = 1024 * 1024


def ms_summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def rate_summary(values: list[float], unit: str) -> dict:
    """p50 and p95 of a rate; p95 is the slow end (the 5th percentile of the rate)."""
    return {"n": len(values), f"p50_{unit}": round(pct(values, 50), 1),
            f"p95_{unit}": round(pct(values, 5), 1), f"max_{unit}": round(max(values), 1)}


def machine() -> dict:
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))) * 1024
    rclone = subprocess.run(["/var/cache/e2a/bin/rclone", "version"], capture_output=True,
                            text=True).stdout.split("\n")[0] if Path(
        "/var/cache/e2a/bin/rclone").exists() else None
    return {"nproc": os.cpu_count(), "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "rclone": rclone}


class Bench:
    def __init__(self, pool: int = 0):
        self.srv = Server(instance="bw0", subnet="10.240.0.0/20", base=BASE,
                          extra_env={"E2A_POOL_SIZE": str(pool)})
        self.pool = pool
        self.srv.cleanup()
        self.srv.start()
        key = self.srv.create_user("bench-ws@example.com")
        self.http = httpx.Client(base_url=self.srv.url, timeout=900,
                                 headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self.http.close()
        self.srv.cleanup()

    # ---- sandboxes -------------------------------------------------------------------------

    def create(self, workspace=None) -> dict:
        body = {"template": "standard", "idle_timeout_seconds": 1800}
        if workspace is not None:
            body["workspace"] = workspace
        r = self.http.post("/v1/sandboxes", json=body)
        if r.status_code >= 300:
            raise RuntimeError(f"create: {r.status_code} {r.text}")
        return r.json()

    def run(self, vm: str, cmd: str, check: bool = True) -> tuple[str, str, int]:
        r = self.http.post(f"/v1/sandboxes/{vm}/commands", json={"cmd": cmd})
        r.raise_for_status()
        out, err, code = [], [], None
        for line in r.text.splitlines():
            ev = json.loads(line)
            if ev["type"] == "stdout":
                out.append(ev["data"])
            elif ev["type"] == "stderr":
                err.append(ev["data"])
            elif ev["type"] == "exit":
                code = ev["exit_code"]
            elif ev["type"] == "error":
                raise RuntimeError(f"{cmd!r}: {ev}")
        if check and code != 0:
            raise RuntimeError(f"{cmd!r} exited {code}: {''.join(err)[-800:]}")
        return "".join(out), "".join(err), code

    def timed(self, vm: str, cmd: str) -> float:
        """Seconds `cmd` took inside the sandbox (bash's $EPOCHREALTIME around it)."""
        out, _, _ = self.run(vm, f"s=$EPOCHREALTIME; {cmd}; e=$EPOCHREALTIME; echo \"@T $s $e\"")
        s, e = re.search(r"@T (\S+) (\S+)", out).groups()
        return float(e) - float(s)

    def delete(self, vm: str) -> float:
        t0 = time.perf_counter()
        r = self.http.delete(f"/v1/sandboxes/{vm}")
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200 or r.json()["state"] != "destroyed":
            raise RuntimeError(f"DELETE {vm}: {r.status_code} {r.text[:300]}")
        return ms

    def boot_steps(self, vm: str) -> dict[str, int]:
        path = self.srv.base / "data" / "logs" / f"{vm}.jsonl"
        for line in path.read_text().splitlines():
            m = re.search(r"boot (.*) ms\)", json.loads(line)["message"])
            if m:
                return {k: int(v) for k, v in
                        (step.rsplit(" ", 1) for step in m.group(1).split(", "))}
        return {}

    def pool_full(self) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if httpx.get(self.srv.url + "/health").json().get("pool", {}).get(
                    "standard", 0) >= self.pool:
                return
            time.sleep(0.05)
        raise RuntimeError("the warm pool did not refill")

    # ---- the workspace mount, from the host ------------------------------------------------

    def upload_now(self, vm: str, timeout: float = 600) -> float:
        """Start every queued upload of the sandbox's mount now (as a DELETE's flush does) and
        wait until rclone's queue is empty: seconds."""
        sock = self.srv.base / "data" / "sandboxes" / vm / "workspace.sock"
        t0 = time.perf_counter()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://rclone", timeout=30) as rc:
            while True:
                queue = rc.post("/vfs/queue", json={}).json().get("queue") or []
                for item in queue:
                    if item.get("expiry", 0) > 0 and not item.get("uploading"):
                        rc.post("/vfs/queue-set-expiry", json={"id": item["id"], "expiry": 0})
                stats = rc.post("/vfs/stats", json={}).json().get("diskCache", {})
                if not queue and not stats.get("uploadsInProgress") \
                        and not stats.get("uploadsQueued"):
                    return time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"uploads of {vm} still pending after {timeout} s")
                time.sleep(0.02)

    def stored(self, workspace_id: str, prefix: str) -> dict[str, int]:
        """path → size of the workspace's objects under prefix, as S3 lists them."""
        found, cursor = {}, None
        while True:
            params = {"prefix": prefix, "limit": 1000, **({"cursor": cursor} if cursor else {})}
            r = self.http.get(f"/v1/workspaces/{workspace_id}/files", params=params)
            r.raise_for_status()
            d = r.json()
            found.update({f["path"]: f["size"] for f in d["files"]})
            cursor = d["next_cursor"]
            if not cursor:
                return found


# ---- 1. create → workspace mounted and readable -------------------------------------------

SEED_FILES = ("mkdir -p ~/files && python3 -c \"import os\n"
              "for i in range(100): open(os.path.expanduser(f'~/files/f{i:03d}'), 'wb')"
              ".write(os.urandom(16384))\"")


def part_create(b: Bench, samples: int) -> dict:
    out: dict = {"before": others()}
    # The existing workspace: dotfiles (fresh workspace) + 100 files, flushed by the DELETE.
    sb = b.create({"app_id": "bench-existing"})
    b.run(sb["vm_id"], SEED_FILES)
    out["seed_delete_100_dirty_files_ms"] = round(b.delete(sb["vm_id"]), 1)
    n_fresh = 0

    def one(kind: str) -> dict:
        nonlocal n_fresh
        ws = None
        if kind == "existing":
            ws = {"app_id": "bench-existing"}
        elif kind == "fresh":
            n_fresh += 1
            ws = {"app_id": f"fresh-{n_fresh}"}
        t0 = time.perf_counter()
        vm = b.create(ws)["vm_id"]
        t_post = time.perf_counter()
        text, _, _ = b.run(vm, "cat ~/.profile")
        t1 = time.perf_counter()
        if "PATH" not in text and "bashrc" not in text:
            raise RuntimeError(f"{kind}: unexpected ~/.profile: {text[:200]!r}")
        if kind == "existing":
            n = b.run(vm, "ls ~/files | wc -l")[0].strip()
            if n != "100":
                raise RuntimeError(f"existing workspace shows {n} files, not 100")
        steps = b.boot_steps(vm)
        return {"ms": (t1 - t0) * 1000, "post_ms": (t_post - t0) * 1000,
                "steps": steps, "delete_ms": b.delete(vm)}

    kinds = ["none-cold", "existing", "fresh"]
    for k in kinds:  # warm-up: page cache, the S3 server, first-use paths
        one(k)
    got: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(samples):
        for k in kinds[i % 3:] + kinds[:i % 3]:
            got[k].append(one(k))
    for k in kinds:
        xs = got[k]
        step_names = sorted({s for x in xs for s in x["steps"]})
        out[k] = {**ms_summary([x["ms"] for x in xs]),
                  "post_p50_ms": round(pct([x["post_ms"] for x in xs], 50), 1),
                  "boot_steps_p50_ms": {s: pct([x["steps"].get(s, 0) for x in xs], 50)
                                        for s in step_names},
                  "delete": ms_summary([x["delete_ms"] for x in xs])}
        print(f"create {k:10} → cat ~/.profile answered", out[k], flush=True)
    out["after"] = others()
    return out


def part_warm(samples: int) -> dict:
    b = Bench(pool=2)
    try:
        out: dict = {"before": others(), "pool_size": 2}
        ms = []
        for i in range(samples + 2):
            b.pool_full()
            t0 = time.perf_counter()
            vm = b.create()["vm_id"]
            b.run(vm, "cat ~/.profile")
            if i >= 2:  # two warm-ups
                ms.append((time.perf_counter() - t0) * 1000)
            b.delete(vm)
        out["none-warm"] = ms_summary(ms)
        out["after"] = others()
        print("create none-warm  → cat ~/.profile answered", out["none-warm"], flush=True)
        return out
    finally:
        b.close()


# ---- 2. sequential and small-file I/O ------------------------------------------------------

SIZE_MIB = 200
SMALL = ("python3 -c \"import os, sys, time\n"
         "d = sys.argv[1]; os.makedirs(d); data = os.urandom(4096); t = time.perf_counter()\n"
         "for i in range(1000):\n"
         "    with open(f'{d}/f{i:04d}', 'wb') as f: f.write(data)\n"
         "print('@S', time.perf_counter() - t)\" ")


def part_io(b: Bench, samples: int) -> dict:
    out: dict = {"before": others(), "file_mib": SIZE_MIB}
    sb = b.create({"app_id": "bench-io"})
    vm, wid = sb["vm_id"], sb["workspace_id"]
    b.run(vm, f"head -c {SIZE_MIB}M /dev/urandom > ~/seed.bin")
    out["seed_upload_s"] = round(b.upload_now(vm), 2)
    b.delete(vm)
    r: dict[str, list[float]] = {k: [] for k in (
        "ws_read_cold", "ws_read_warm", "ws_write", "ws_reread", "ws_upload", "ws_small",
        "ws_small_upload", "tmp_write", "tmp_reread", "tmp_small")}
    mb = SIZE_MIB * MIB / 1e6

    for i in range(samples):
        vm = b.create({"app_id": "bench-io"})["vm_id"]
        r["ws_read_cold"].append(mb / b.timed(vm, "dd if=$HOME/seed.bin of=/dev/null bs=1M 2>/dev/null"))
        r["ws_read_warm"].append(mb / b.timed(vm, "dd if=$HOME/seed.bin of=/dev/null bs=1M 2>/dev/null"))
        b.run(vm, "cp ~/seed.bin /tmp/src")
        for where in (["ws", "tmp"] if i % 2 == 0 else ["tmp", "ws"]):
            d = "$HOME" if where == "ws" else "/tmp"
            r[f"{where}_write"].append(mb / b.timed(
                vm, f"dd if=/tmp/src of={d}/w.bin bs=1M conv=fsync 2>/dev/null"))
            r[f"{where}_reread"].append(mb / b.timed(
                vm, f"dd if={d}/w.bin of=/dev/null bs=1M 2>/dev/null"))
            if where == "ws":
                r["ws_upload"].append(mb / b.upload_now(vm))
                if b.stored(wid, "w.bin").get("w.bin") != SIZE_MIB * MIB:
                    raise RuntimeError("w.bin is not in S3 at its size after the upload")
            small, _, _ = b.run(vm, SMALL + f"{d}/small")
            r[f"{where}_small"].append(1000 / float(small.split()[-1]))
            if where == "ws":
                r["ws_small_upload"].append(1000 / b.upload_now(vm))
                if len(b.stored(wid, "small/")) != 1000:
                    raise RuntimeError("the 1000 small files are not all in S3")
            b.run(vm, f"rm -rf {d}/w.bin {d}/small")
        b.upload_now(vm)  # the removals
        b.delete(vm)
        print(f"io sample {i + 1}/{samples}", {k: round(v[-1], 1) for k, v in r.items()},
              flush=True)
    for k, v in r.items():
        unit = "files_per_s" if "small" in k else "MB_per_s"
        out[k] = rate_summary(v, unit)
    p = {k: pct(v, 50) for k, v in r.items()}
    out["ratios_p50_ws_over_tmp"] = {
        "write": round(p["ws_write"] / p["tmp_write"], 2),
        "read_cold_vs_tmp_reread": round(p["ws_read_cold"] / p["tmp_reread"], 2),
        "read_warm_vs_tmp_reread": round(p["ws_read_warm"] / p["tmp_reread"], 2),
        "reread_after_write": round(p["ws_reread"] / p["tmp_reread"], 2),
        "small_files": round(p["ws_small"] / p["tmp_small"], 2)}
    out["after"] = others()
    for k in r:
        print(f"io {k:16}", out[k], flush=True)
    print("io ratios workspace / own disk (p50)", out["ratios_p50_ws_over_tmp"], flush=True)
    return out


# ---- 3. git clone --------------------------------------------------------------------------

def make_repo() -> tuple[Path, str, int]:
    """A bare repository of ~50 MiB of random files in 4 commits; (tar, HEAD, pack bytes)."""
    shutil.rmtree(HOST_DIR, ignore_errors=True)
    work, bare = HOST_DIR / "work", HOST_DIR / "repo.git"
    work.mkdir(parents=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run(git + ["init", "-q", "-b", "main", str(work)], check=True)
    for c in range(4):
        d = work / f"dir{c}"
        d.mkdir()
        for i in range(50):
            (d / f"blob{i:02d}.bin").write_bytes(os.urandom(256 * 1024))
        (work / "README").write_text(f"commit {c}\n")
        subprocess.run(git + ["-C", str(work), "add", "-A"], check=True)
        subprocess.run(git + ["-C", str(work), "commit", "-q", "-m", f"commit {c}"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", "--no-local", str(work), str(bare)],
                   check=True)
    head = subprocess.run(["git", "-C", str(bare), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    pack = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
    tar = HOST_DIR / "repo.tar"
    with tarfile.open(tar, "w") as t:
        t.add(bare, arcname="repo.git")
    return tar, head, pack


def part_git(b: Bench, samples: int) -> dict:
    tar, head, pack = make_repo()
    out: dict = {"before": others(), "repo": {"files": 200, "commits": 4,
                                              "pack_mib": round(pack / MIB, 1)}}
    sb = b.create({"app_id": "bench-git"})
    vm = sb["vm_id"]
    t0 = time.perf_counter()
    with open(tar, "rb") as f:
        r = b.http.put(f"/v1/sandboxes/{vm}/files/tar", params={"path": "/tmp"}, content=f)
    r.raise_for_status()
    out["upload_tar_s"] = round(time.perf_counter() - t0, 2)
    got: dict[str, list[float]] = {"ws": [], "tmp": [], "ws_upload": []}
    for i in range(samples + 1):
        for where in (["ws", "tmp"] if i % 2 == 0 else ["tmp", "ws"]):
            dest = "~/repo" if where == "ws" else "/tmp/clone"
            s = b.timed(vm, f"git clone -q --no-local /tmp/repo.git {dest}")
            h, _, _ = b.run(vm, f"git -C {dest} rev-parse HEAD; git -C {dest} ls-files | wc -l")
            if h.split() != [head, "201"]:
                raise RuntimeError(f"clone into {dest}: {h!r}")
            up = b.upload_now(vm) if where == "ws" else None
            if i > 0:  # the first round is a warm-up
                got[where].append(s)
                if up is not None:
                    got["ws_upload"].append(up)
            b.run(vm, f"rm -rf {dest}")
            if where == "ws":
                b.upload_now(vm)
        print(f"git sample {i}/{samples}", {k: round(v[-1], 2) for k, v in got.items() if v},
              flush=True)
    b.delete(vm)
    for k, v in got.items():
        out[k] = ms_summary([x * 1000 for x in v])
    out["ratio_p50_ws_over_tmp"] = round(pct(got["ws"], 50) / pct(got["tmp"], 50), 2)
    out["after"] = others()
    print("git clone into ~ (workspace)", out["ws"], flush=True)
    print("git clone into /tmp         ", out["tmp"], flush=True)
    print("  its upload to S3 (forced) ", out["ws_upload"], flush=True)
    print("ratio p50", out["ratio_p50_ws_over_tmp"], flush=True)
    return out


# ---- 4. destroy with 100 MiB unflushed -----------------------------------------------------

def part_destroy(b: Bench, samples: int) -> dict:
    HOST_DIR.mkdir(parents=True, exist_ok=True)
    src = HOST_DIR / "u.bin"
    data = os.urandom(100 * MIB)
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    out: dict = {"before": others(), "file_mib": 100}
    ms, checked, prev = [], 0, None

    def verify(vm: str, n: int) -> None:
        nonlocal checked
        got = b.run(vm, f"sha256sum ~/u{n}.bin; rm ~/u{n}.bin")[0].split()[0]
        if got != digest:
            raise RuntimeError(f"u{n}.bin: sha256 {got} != {digest}")
        checked += 1

    for i in range(samples + 1):
        vm = b.create({"app_id": "bench-destroy"})["vm_id"]
        if prev is not None:
            verify(vm, prev)
        with open(src, "rb") as f:
            b.http.put(f"/v1/sandboxes/{vm}/files", params={"path": "/tmp/src"},
                       content=f).raise_for_status()
        b.run(vm, f"cp /tmp/src ~/u{i}.bin")
        d = b.delete(vm)
        if i > 0:  # the first is a warm-up
            ms.append(d)
        prev = i
        print(f"destroy sample {i}/{samples}: {d:.0f} ms", flush=True)
    vm = b.create({"app_id": "bench-destroy"})["vm_id"]
    verify(vm, prev)
    b.delete(vm)
    out["delete_100mib_dirty"] = ms_summary(ms)
    out["checksums_ok"] = f"{checked}/{samples + 1}"
    out["after"] = others()
    print("destroy with 100 MiB unflushed", out["delete_100mib_dirty"], "checksums",
          out["checksums_ok"], flush=True)
    return out


# ---- 5. create with a workspace of many files -----------------------------------------------

MANY = 20000


def part_manyfiles(b: Bench, samples: int) -> dict:
    """create → `cat ~/.profile` answered, as in `create`, and the DELETE that follows, with a
    workspace of 20,000 files (1 KiB each, 100 directories) beside one of 100 files."""
    out: dict = {"before": others(), "files": MANY}
    sb = b.create({"app_id": "bench-many"})
    vm = sb["vm_id"]
    t0 = time.perf_counter()
    b.run(vm, "python3 -c \"import os\n"
              f"for i in range({MANY}):\n"
              "    d = os.path.expanduser(f'~/many/d{i % 100:02d}'); os.makedirs(d, exist_ok=True)\n"
              "    open(f'{d}/f{i:05d}', 'wb').write(b'x' * 1024)\"")
    out["seed_write_s"] = round(time.perf_counter() - t0, 1)
    out["seed_upload_s"] = round(b.upload_now(vm), 1)
    out["seed_delete_ms"] = round(b.delete(vm), 1)
    sb = b.create({"app_id": "bench-few"})
    b.run(sb["vm_id"], SEED_FILES)
    b.delete(sb["vm_id"])
    got: dict[str, list[dict]] = {"many": [], "few": []}
    for i in range(samples + 1):
        for kind in (["many", "few"] if i % 2 == 0 else ["few", "many"]):
            t0 = time.perf_counter()
            vm = b.create({"app_id": f"bench-{kind}"})["vm_id"]
            t_post = time.perf_counter()
            b.run(vm, "cat ~/.profile")
            t1 = time.perf_counter()
            steps = b.boot_steps(vm)
            d = b.delete(vm)
            if i > 0:
                got[kind].append({"ms": (t1 - t0) * 1000, "post_ms": (t_post - t0) * 1000,
                                  "boot_ms": sum(steps.values()), "delete_ms": d})
    for kind, xs in got.items():
        out[kind] = {**ms_summary([x["ms"] for x in xs]),
                     "post_p50_ms": round(pct([x["post_ms"] for x in xs], 50), 1),
                     "boot_p50_ms": round(pct([x["boot_ms"] for x in xs], 50), 1),
                     "delete_p50_ms": round(pct([x["delete_ms"] for x in xs], 50), 1)}
        print(f"create, workspace of {'20,000' if kind == 'many' else '100'} files", out[kind],
              flush=True)
    out["after"] = others()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--io-samples", type=int, default=None,
                    help="samples of the io and git parts (default: --samples)")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    args = ap.parse_args()
    parts = args.only.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"unknown part(s): {', '.join(sorted(set(parts) - set(PARTS)))}")
    io_samples = args.io_samples or args.samples
    results: dict = {}
    if RESULTS.exists() and set(parts) != set(PARTS):
        results = json.loads(RESULTS.read_text())  # --only: keep the rest
    results.update({"machine": machine(), "samples": args.samples, "io_samples": io_samples,
                    "taken": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "others_at_start": others()})
    seconds = results.setdefault("part_seconds", {})

    def save() -> None:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    def run(part: str, fn) -> None:
        t0 = time.perf_counter()
        results[part] = fn()
        seconds[part] = round(time.perf_counter() - t0)
        save()

    started = time.perf_counter()
    cold = {"create", "io", "git", "destroy"} & set(parts)
    if cold:
        b = Bench(pool=0)
        try:
            if "create" in parts:
                run("create", lambda: part_create(b, args.samples))
            if "io" in parts:
                run("io", lambda: part_io(b, io_samples))
            if "git" in parts:
                run("git", lambda: part_git(b, io_samples))
            if "destroy" in parts:
                run("destroy", lambda: part_destroy(b, args.samples))
        finally:
            b.close()
    if "manyfiles" in parts:
        b = Bench(pool=0)
        try:
            run("manyfiles", lambda: part_manyfiles(b, max(3, args.samples // 3)))
        finally:
            b.close()
    if "warm" in parts:
        run("warm", lambda: part_warm(args.samples))
    c, w = results.get("create"), results.get("warm")
    if c and w:
        base_cold, base_warm = c["none-cold"]["p50_ms"], w["none-warm"]["p50_ms"]
        results["workspace_adds_p50_ms"] = {
            kind: {"vs_none_cold": round(c[kind]["p50_ms"] - base_cold, 1),
                   "vs_none_warm": round(c[kind]["p50_ms"] - base_warm, 1)}
            for kind in ("existing", "fresh")}
        print("workspace adds (p50 ms; floor: ≤ 300)", results["workspace_adds_p50_ms"],
              flush=True)
    results["run_seconds"] = round(time.perf_counter() - started)
    results["others_at_end"] = others()
    save()
    shutil.rmtree(HOST_DIR, ignore_errors=True)
    print(f"written to {RESULTS} ({results['run_seconds']} s)")


if __name__ == "__main__":
    main()
