"""Template benchmarks: `make bench-templates` prints the browser, cua and canvas figures
docs/performance.md quotes ("Templates: browser, cua, canvas").

  browser create → page        POST /v1/sandboxes {"template": "browser"} until Playwright, on
                               the host, has connected over CDP and loaded a first page; warm
                               (pool of 1, refilled between samples) and cold (no pool)
  cua create → screenshot      POST /v1/sandboxes {"template": "cua"} until the first
                               GET .../desktop/screenshot answers a PNG; warm and cold
  screenshot                   GET .../desktop/screenshot (1280×800), back to back
  action → visible change      a `type` action into an xterm, then screenshots until one differs
  canvas render                POST .../canvas/render, PNG 800×600 and PDF, of a small page
  page load                    the same page, loaded by Chromium inside a browser sandbox (through
                               e2a's CDP relay, and measured inside the sandbox) and outside
                               any sandbox; then what changes the inside figure: Chromium flags,
                               the gVisor platform (ptrace vs systrap), and the whole-process
                               `chromium --headless --dump-dom` inside and outside

What exactly is measured (every figure is p50/p95 over N samples, --samples, default 20,
wall-clock on the host unless it says "inside"):

* browser create → page: t0 before POST /v1/sandboxes {"template": "browser"}; then
  GET /v1/sandboxes/{id}/browser (the cdp_url), Playwright's `chromium.connect_over_cdp(cdp_url)`
  (one Playwright driver for the whole run, started before any sample), a new page in the
  browser's default context and `page.goto(PAGE_DATA_URL, wait_until="load")`: a data: URL of a
  small HTML document (inline style and script, no network), so the figure is e2a + Chromium,
  not a web server. t1 when goto returns. Warm: a server with E2A_POOL_SIZES={"browser": 1}
  and E2A_POOL_SIZE=0, each sample waits until GET /health shows the pool refilled before t0.
  Cold: pool 0 (every create starts gVisor, envd and Chromium). A browser sandbox is "ready"
  (and counted in the pool) once Chromium listens on its CDP port, but Chromium then keeps its
  one vCPU busy for ~2.5 s more, finishing its start: warm_settled (max(5, N/4) samples) is the
  warm figure with the pooled sandbox left idle SETTLE_S (4 s) after /health shows it, as a
  pool sandbox that waited for its claim would be. Each sample's steps are kept (p50 of each):
  create (POST), cdp_url (GET .../browser), connect_over_cdp, new_page, goto.
* cua create → screenshot: t0 before POST /v1/sandboxes {"template": "cua"}, t1 when the first
  GET .../desktop/screenshot has answered 200 image/png (any other answer is retried every
  50 ms and counted in `retries`). Warm as above with E2A_POOL_SIZES={"cua": 1}.
* screenshot: on one open HTTP connection, GET .../desktop/screenshot (no `width`: the full
  1280×800 screen) back to back, each timed until its whole body is read. The screen shows an
  xterm of 100×30 characters filled by `ls -l /usr/lib` (the PNG size is reported) over
  fluxbox's background.
* action → visible change: in that focused xterm, t0 before POST .../desktop/actions
  [{"action": "type", "text": "x"}]; then GET .../desktop/screenshot back to back until one
  whose pixels inside the xterm's window differ from a screenshot taken just before t0; t1
  when that screenshot has been read (decoding and comparing are after t1). Only the window is
  compared because fluxbox's toolbar clock shows seconds. Also reported: the action call
  alone, and how many screenshots it took (1 = the first screenshot after the action already
  shows it). Before the samples, the window is checked to stay the same over 0.5 s with no
  action.
* canvas render: a canvas sandbox with a small page in /home/user/canvas (index.html, a
  stylesheet, a script drawing on a <canvas>); POST .../canvas/render {"width": 800,
  "height": 600, "format": "png"} until the PNG is read, and the same with "format": "pdf".
  The first render of a new sandbox is reported on its own (first_png_ms).
* page load, inside vs outside: the same three files (SITE: index.html + style.css + app.js,
  ~6 KB, the script adds 200 list items) served by `python3 -m http.server` on 127.0.0.1
  (inside: in the browser sandbox; outside: on the host), loaded with Playwright's
  `page.goto(url, wait_until="load")`, timed from the call until it returns. Two ways each:
  `fresh`, a new page (tab) per sample, created and closed outside the timed span; and `same`,
  one page navigating to the URL again and again (HTTP cache on, as a browser's is). Inside:
  the browser template's own Chromium, driven from the host through e2a's CDP relay
  (GET .../browser → connect_over_cdp). Outside: Playwright's
  `chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])` on the host
  (Debian's /usr/bin/chromium is a wrapper that adds flags from /etc/chromium.d; it runs the
  same /usr/lib/chromium/chromium). The ratio is inside p50 / outside p50. A sandbox has 1
  vCPU (CFS quota 100 ms / 100 ms), the host Chromium both cores.
* page load, the CPU budget: the sandbox has 1 vCPU as a CFS quota (100 ms per 100 ms period,
  plus e2a's CFS burst) over the host's 2 cores, and Chromium's processes (plus, in the local
  runs, Playwright's driver) want more than one core in bursts. Two runs set gVisor apart from
  that budget: PAGELOAD_PY (below) on the host inside a host cgroup given the same quota the
  same way (e2a.runtime.cgroups.Cgroup.set_cpu_quota; /sys/fs/cgroup/cpu/bthost/onecpu,
  removed after), and inside the sandbox with its quota lifted for the run (the benchmark
  writes -1 to its own sandbox's cpu.cfs_quota_us, "max" to cpu.max on cgroup v2, and puts
  the value back), both local and through e2a.
* page load, what shrinks it: PAGELOAD_PY, one script run both inside the sandbox (python3 and
  Playwright are in the browser image) and on the host (this venv's Python), starts its own
  /usr/lib/chromium/chromium with the browser recipe's flags (from recipes/browser.toml) on
  127.0.0.1:9333 with a fresh --user-data-dir, plus one variant's extra flags, connects with
  `connect_over_cdp("http://127.0.0.1:9333")` and times the same `fresh` and `same` page loads
  locally (no e2a in the path). It reports Chromium's start (spawn → CDP answering
  /json/version) and then waits until the Chromium's processes idle (under 10% of a CPU for
  0.5 s, from /proc; settle_ms) before the first load, as a pooled sandbox would have.
  `baseline` is the recipe's flags alone (the same run as inside/outside_local_recipe_flags).
* platform: cold create → page (max(5, N/4) samples), the through-e2a page loads and
  dump-dom on a server with E2A_PLATFORM=ptrace, beside the same on the default (systrap)
  servers.
* dump-dom: DUMPDOM_PY times, inside the sandbox and on the host alike, whole runs of
  `/usr/lib/chromium/chromium --headless --no-sandbox --disable-gpu --user-data-dir=D
  --dump-dom file://.../index.html` (D kept between runs, made by a first untimed run) from
  spawn to exit, max(5, N/4) runs, and checks the DOM it prints has the script's 200 items.

Each server is an `e2a serve` of this benchmark's own (tests/e2e/server.py), instance bt0-bt3
on 10.230.0.0/18, data under /tmp/e2a-bench/templates; every one is cleaned up at the end.
The host's load average is recorded with each part (other work on the machine skews figures).
Results are printed and written to bench/templates.json (with --only, the other parts'
figures already there are kept). The whole run takes about 10 minutes on a 2-core host.
Usage: python bench/templates.py [--samples 20]
           [--only browser,cua,desktop,canvas,pageload,flags,platform,dumpdom]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import Playwright, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sandboxes import pct  # noqa: E402  (bench/sandboxes.py, this script's directory)
from tests.e2e.server import Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "templates.json"
BENCH_DIR = Path("/tmp/e2a-bench/templates")
HOST_SITE = BENCH_DIR / "site"
SITE_DIR = "/home/user/site"        # the same files inside the sandbox
INSIDE_PORT = 8000
CHROMIUM = "/usr/lib/chromium/chromium"
SETTLE_S = 4.0   # s a pooled browser sandbox sits after the pool shows it, for warm_settled
PART_NAMES = ("browser", "cua", "desktop", "canvas", "pageload", "flags", "platform", "dumpdom")

# Servers: (instance, subnet, extra environment). Instances and subnets stay clear of the
# test suites (t<worker><n> on 10.210+w.*) and bench/sandboxes.py (b* on 10.220.*).
SERVERS = {
    "browser_warm": ("bt0", "10.230.0.0/20", {"E2A_POOL_SIZE": "0",
                                              "E2A_POOL_SIZES": '{"browser": 1}'}),
    "cold": ("bt1", "10.230.16.0/20", {"E2A_POOL_SIZE": "0"}),
    "cua_warm": ("bt2", "10.230.32.0/20", {"E2A_POOL_SIZE": "0", "E2A_POOL_SIZES": '{"cua": 1}'}),
    "ptrace": ("bt3", "10.230.48.0/20", {"E2A_POOL_SIZE": "0", "E2A_PLATFORM": "ptrace"}),
}

PAGE_DATA_URL = "data:text/html," + urllib.parse.quote(
    "<!doctype html><title>first</title><style>h1{font:24px sans-serif}</style>"
    "<h1 id=h>first page</h1><script>document.title = 'js ' + (6 * 7)</script>")

# The fixed local page of the page-load figures: three files, ~6 KB.
SITE = {
    "index.html": "<!doctype html><html><head><meta charset=utf-8><title>bench page</title>"
                  "<link rel=stylesheet href=style.css><script defer src=app.js></script></head>"
                  "<body><h1>A small local page</h1>"
                  + "".join(f"<p>Paragraph {i}: the quick brown fox jumps over the lazy dog, "
                            f"and again, {i} times.</p>" for i in range(30))
                  + "<table>" + "".join(f"<tr><td>{i}</td><td>{i * i}</td><td>row {i}</td></tr>"
                                        for i in range(40)) + "</table>"
                  "<svg width=200 height=100><circle cx=50 cy=50 r=40 fill=teal /></svg>"
                  "<ul id=items></ul></body></html>",
    "style.css": "body{font:15px/1.4 'DejaVu Sans',sans-serif;margin:2em;color:#222}"
                 "h1{color:#06c}table{border-collapse:collapse}td{border:1px solid #ccc;"
                 "padding:2px 6px}li:nth-child(odd){background:#eef}",
    "app.js": "const ul = document.getElementById('items');"
              "for (let i = 0; i < 200; i++) { const li = document.createElement('li');"
              " li.textContent = 'item ' + i; ul.appendChild(li); }"
              "document.title = 'loaded ' + ul.children.length;",
}
SITE_TITLE = "loaded 200"

CANVAS_PAGE = {
    "index.html": "<!doctype html><html><head><meta charset=utf-8><link rel=stylesheet "
                  "href=style.css></head><body><h1>Quarterly figures</h1>"
                  "<canvas id=c width=700 height=300></canvas><p>Drawn by script.</p>"
                  "<script src=draw.js></script></body></html>",
    "style.css": "body{margin:20px;font:16px 'DejaVu Sans',sans-serif;background:#fafafa}"
                 "h1{color:#333}canvas{border:1px solid #999}",
    "draw.js": "const g = document.getElementById('c').getContext('2d');"
               "[120, 200, 90, 260, 180, 240].forEach((v, i) => {"
               " g.fillStyle = `hsl(${i * 60}, 70%, 50%)`;"
               " g.fillRect(30 + i * 110, 300 - v, 80, v);"
               " g.fillStyle = '#000'; g.fillText('Q' + (i + 1), 60 + i * 110, 290 - v); });",
}

# Chromium flag variants tried inside the sandbox (each on top of the recipe's flags).
FLAG_VARIANTS = {
    "baseline": [],
    "single-process": ["--single-process"],
    "no-zygote": ["--no-zygote"],
    "renderer-process-limit=1": ["--renderer-process-limit=1"],
    "no-site-per-process": ["--disable-features=site-per-process"],
    "jitless": ["--js-flags=--jitless"],
    "disable-gpu-compositing": ["--disable-gpu-compositing"],
}

# Runs inside the sandbox (system python3 + Playwright) and on the host alike. Starts its own
# Chromium, then times page loads locally. One argument: a JSON object of settings.
PAGELOAD_PY = r'''
import json, os, shutil, subprocess, sys, time, urllib.request
from playwright.sync_api import sync_playwright

cfg = json.loads(sys.argv[1])
port, n, url = cfg["port"], cfg["n"], cfg["url"]
shutil.rmtree(cfg["profile"], ignore_errors=True)
argv = [cfg["chromium"], *cfg["flags"], f"--remote-debugging-port={port}",
        f"--user-data-dir={cfg['profile']}", "about:blank"]
t0 = time.perf_counter()
proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
out = {"argv": argv}
try:
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"chromium exited with {proc.returncode}")
            if time.perf_counter() - t0 > 60:
                raise SystemExit("chromium did not answer on its CDP port within 60 s")
            time.sleep(0.02)
    out["start_ms"] = (time.perf_counter() - t0) * 1000

    def tree_cpu():
        """CPU seconds used so far by this Chromium and its descendants (/proc)."""
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d)] = (int(f[1]), int(f[11]) + int(f[12]))
        tree = {proc.pid}
        while more := {p for p, (pp, _) in stats.items() if pp in tree} - tree:
            tree |= more
        return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")

    # Chromium answers CDP well before it has finished starting: wait until it idles (under
    # 10% of a CPU for two 250 ms periods in a row, at most 15 s) so its start is not timed.
    t1, last, quiet = time.perf_counter(), tree_cpu(), 0
    while quiet < 2 and time.perf_counter() - t1 < 15:
        time.sleep(0.25)
        now = tree_cpu()
        quiet = quiet + 1 if now - last < 0.025 else 0
        last = now
    out["settle_ms"] = (time.perf_counter() - t1) * 1000
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
        ctx = browser.contexts[0]
        fresh, same = [], []
        for i in range(2 + n):              # 2 untimed warm-up loads
            page = ctx.new_page()
            t = time.perf_counter()
            page.goto(url, wait_until="load")
            if i >= 2:
                fresh.append((time.perf_counter() - t) * 1000)
            page.close()
        page = ctx.new_page()
        for i in range(2 + n):
            t = time.perf_counter()
            page.goto(url, wait_until="load")
            if i >= 2:
                same.append((time.perf_counter() - t) * 1000)
        out["title"] = page.title()
        out["fresh_ms"], out["same_ms"] = fresh, same
        # this Chromium's processes, one page open: a check that the flags did what they say
        ps = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
        parent = {pid: ppid for pid, ppid in (map(int, line.split())
                                              for line in ps.stdout.splitlines())}
        tree = {proc.pid}
        while more := {pid for pid, ppid in parent.items() if ppid in tree} - tree:
            tree |= more
        out["processes"] = len(tree)
        browser.close()
finally:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(cfg["profile"], ignore_errors=True)
print(json.dumps(out))
'''

# Whole-process Chromium runs, inside and outside alike: spawn → exit of --dump-dom.
DUMPDOM_PY = r'''
import json, subprocess, sys, time
chromium, profile, url, n, want = sys.argv[1:6]
n = int(n)
argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--dump-dom", url]
ms, ok = [], True
for i in range(n + 1):                      # the first run makes the profile: not timed
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if i:
        ms.append((time.perf_counter() - t) * 1000)
    ok = ok and p.returncode == 0 and p.stdout.count("<li>") == 200 and want in p.stdout
print(json.dumps({"argv": argv, "ms": ms, "ok": ok}))
'''


# ---- helpers -------------------------------------------------------------------------------

def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Bench:
    """One `e2a serve` of the benchmark's own, and a client of it."""

    def __init__(self, role: str):
        instance, subnet, env = SERVERS[role]
        self.srv = Server(instance=instance, subnet=subnet, base=BENCH_DIR / instance,
                          extra_env=env)
        self.srv.cleanup()
        self.srv.start()
        key = self.srv.create_user(f"bench-{instance}@example.com")
        self.http = httpx.Client(base_url=self.srv.url, timeout=180,
                                 headers={"Authorization": f"Bearer {key}"})
        self.vms: list[str] = []

    def close(self) -> None:
        for vm in self.vms:
            try:
                self.http.delete(f"/v1/sandboxes/{vm}")
            except httpx.HTTPError:
                pass
        self.http.close()
        self.srv.cleanup()
        # the instance's own cgroup directories, which e2a keeps for its next start
        for d in Path("/sys/fs/cgroup").glob(f"*/{self.srv.instance}"):
            with contextlib.suppress(OSError):
                d.rmdir()

    def create(self, template: str) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": template,
                                                  "idle_timeout_seconds": 900})
        if r.status_code != 201:
            raise RuntimeError(f"create {template}: {r.status_code} {r.text[:300]}")
        vm = r.json()["vm_id"]
        self.vms.append(vm)
        return vm

    def kill(self, vm: str) -> None:
        self.http.delete(f"/v1/sandboxes/{vm}")
        self.vms.remove(vm)

    def pool_full(self, template: str, size: int = 1, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if httpx.get(self.srv.url + "/health").json().get("pool", {}).get(template, 0) >= size:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the {template} warm pool did not refill in {timeout:.0f} s")

    def run(self, vm: str, argv: list[str], timeout: float = 300, **opts) -> str:
        """Run to completion; stdout, or RuntimeError with stderr on a non-zero exit."""
        r = self.http.post(f"/v1/sandboxes/{vm}/commands",
                           json={"argv": argv, "timeout": timeout, **opts}, timeout=timeout + 30)
        r.raise_for_status()
        out, err, code = [], [], None
        for line in r.text.splitlines():
            ev = json.loads(line)
            if ev.get("type") == "stdout":
                out.append(ev["data"])
            elif ev.get("type") == "stderr":
                err.append(ev["data"])
            elif ev.get("type") == "exit":
                code = ev.get("exit_code")
            elif ev.get("type") == "error":
                raise RuntimeError(f"{argv[:3]}: {ev}")
        if code not in (0, None):
            raise RuntimeError(f"{argv[:3]} exited {code}: {''.join(err)[-2000:]}")
        return "".join(out)

    def background(self, vm: str, argv: list[str], **opts) -> None:
        r = self.http.post(f"/v1/sandboxes/{vm}/commands",
                           json={"argv": argv, "background": True, **opts})
        r.raise_for_status()

    def write(self, vm: str, path: str, data: str) -> None:
        r = self.http.put(f"/v1/sandboxes/{vm}/files", params={"path": path},
                          content=data.encode())
        r.raise_for_status()

    def cdp_url(self, vm: str) -> str:
        r = self.http.get(f"/v1/sandboxes/{vm}/browser")
        r.raise_for_status()
        return r.json()["cdp_url"]


# ---- 1. browser create → CDP + first page ---------------------------------------------------

def browser_create_to_page(b: Bench, pw: Playwright, samples: int, warm: bool,
                           settle: float = 0.0) -> dict:
    ms, titles = [], set()
    steps: dict[str, list[float]] = {"create": [], "cdp_url": [], "connect_over_cdp": [],
                                     "new_page": [], "goto": []}
    for _ in range(samples):
        if warm:
            b.pool_full("browser")
            time.sleep(settle)
        t0 = t = time.perf_counter()

        def step(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            steps[name].append((now - t) * 1000)
            t = now

        vm = b.create("browser")
        step("create")
        url = b.cdp_url(vm)
        step("cdp_url")
        browser = pw.chromium.connect_over_cdp(url)
        step("connect_over_cdp")
        ctx = browser.contexts[0] if browser.contexts else browser.new_context()
        page = ctx.new_page()
        step("new_page")
        page.goto(PAGE_DATA_URL, wait_until="load")
        step("goto")
        ms.append(since(t0))
        titles.add(page.title())
        browser.close()
        b.kill(vm)
    if titles != {"js 42"}:
        raise RuntimeError(f"the first page did not load as expected: titles {titles}")
    return {**summary(ms), "steps_p50_ms": {k: round(pct(v, 50), 1) for k, v in steps.items()}}


def part_browser(pw: Playwright, samples: int) -> dict:
    out = {"page": "data: URL (inline style + script, no network)"}
    b = Bench("browser_warm")
    try:
        b.pool_full("browser")
        browser_create_to_page(b, pw, 1, warm=True)    # page cache for the image: not a sample
        out["load_before"] = load()
        out["warm"] = {**browser_create_to_page(b, pw, samples, warm=True), "pool_size": 1}
        print("browser create → CDP + page, warm", out["warm"], flush=True)
        out["warm_settled"] = {**browser_create_to_page(b, pw, max(5, samples // 4), warm=True,
                                                        settle=SETTLE_S),
                               "pool_size": 1, "settle_s": SETTLE_S}
        print(f"browser create → CDP + page, warm, pool sandbox idle {SETTLE_S:.0f} s first",
              out["warm_settled"], flush=True)
    finally:
        b.close()
    b = Bench("cold")
    try:
        browser_create_to_page(b, pw, 1, warm=False)   # page cache for the image: not a sample
        out["cold"] = browser_create_to_page(b, pw, samples, warm=False)
        out["load_after"] = load()
    finally:
        b.close()
    print("browser create → CDP + page, cold", out["cold"], flush=True)
    return out


# ---- 2. cua create → first screenshot -------------------------------------------------------

def screenshot(b: Bench, vm: str) -> httpx.Response:
    return b.http.get(f"/v1/sandboxes/{vm}/desktop/screenshot")


def is_png(r: httpx.Response) -> bool:
    return (r.status_code == 200 and r.headers.get("content-type") == "image/png"
            and r.content[:8] == b"\x89PNG\r\n\x1a\n")


def cua_create_to_screenshot(b: Bench, samples: int, warm: bool) -> dict:
    ms, retries, errors = [], 0, {}
    for _ in range(samples):
        if warm:
            b.pool_full("cua")
        t0 = time.perf_counter()
        vm = b.create("cua")
        while True:
            r = screenshot(b, vm)
            if is_png(r):
                break
            retries += 1
            answer = f"{r.status_code} {r.text[:120]}"
            errors[answer] = errors.get(answer, 0) + 1
            if since(t0) > 60_000:
                raise RuntimeError(f"no screenshot within 60 s: {r.status_code} {r.text[:300]}")
            time.sleep(0.05)
        ms.append(since(t0))
        size = Image.open(io.BytesIO(r.content)).size
        b.kill(vm)
    return {**summary(ms), "retries": retries, "retry_answers": errors, "size": list(size)}


def part_cua(samples: int) -> dict:
    out = {}
    b = Bench("cua_warm")
    try:
        out["load_before"] = load()
        out["warm"] = {**cua_create_to_screenshot(b, samples, warm=True), "pool_size": 1}
    finally:
        b.close()
    print("cua create → first screenshot, warm", out["warm"], flush=True)
    b = Bench("cold")
    try:
        cua_create_to_screenshot(b, 1, warm=False)   # page cache: not a sample
        out["cold"] = cua_create_to_screenshot(b, samples, warm=False)
        out["load_after"] = load()
    finally:
        b.close()
    print("cua create → first screenshot, cold", out["cold"], flush=True)
    return out


# ---- 3 + 4. screenshots, action → visible change --------------------------------------------

def act(b: Bench, vm: str, *actions: dict) -> dict:
    r = b.http.post(f"/v1/sandboxes/{vm}/desktop/actions", json={"actions": list(actions)})
    if r.status_code != 200:
        raise RuntimeError(f"actions {actions}: {r.status_code} {r.text[:300]}")
    return r.json()


def open_xterm(b: Bench, vm: str, title: str) -> dict:
    # allowTitleOps off: the shell's prompt would retitle the window "user@sandbox: ~";
    # pointerMode 0: xterm would hide the pointer on the first key, a change of its own.
    b.background(vm, ["xterm", "-T", title, "-xrm", "XTerm*allowTitleOps: false",
                      "-xrm", "XTerm*pointerMode: 0", "-geometry", "100x30+40+40"])
    end = time.monotonic() + 60
    while time.monotonic() < end:
        r = b.http.get(f"/v1/sandboxes/{vm}/desktop/windows")
        if r.status_code == 200:
            for w in r.json().get("windows", []):
                if title in (w.get("title") or ""):
                    return w
        time.sleep(0.3)
    raise RuntimeError(f"the xterm {title!r} did not appear: {r.status_code} {r.text[:300]}")


def part_desktop(samples: int) -> dict:
    b = Bench("cold")
    try:
        vm = b.create("cua")
        w = open_xterm(b, vm, "bench-term")
        act(b, vm, {"action": "left_click",
                    "coordinate": [w["x"] + w["width"] // 2, w["y"] + w["height"] // 2]})
        act(b, vm, {"action": "type", "text": "ls -l /usr/lib\n"})
        time.sleep(1.5)
        load_before = load()

        for _ in range(3):
            screenshot(b, vm)
        shots, sizes = [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            r = screenshot(b, vm)
            r.read()
            shots.append(since(t0))
            if not is_png(r):
                raise RuntimeError(f"screenshot: {r.status_code} {r.text[:300]}")
            sizes.append(len(r.content))
        dims = Image.open(io.BytesIO(r.content)).size
        shot = {**summary(shots), "size": list(dims), "png_bytes": sizes[-1]}
        print("screenshot 1280×800, back to back", shot, flush=True)

        # Compared: the xterm's window only (fluxbox's toolbar clock ticks every second).
        # Decoding happens after a screenshot's time is taken, so it is not in the figure.
        box = (w["x"], w["y"], w["x"] + w["width"], w["y"] + w["height"])

        def region(png: bytes) -> bytes:
            return Image.open(io.BytesIO(png)).convert("RGB").crop(box).tobytes()

        a = region(screenshot(b, vm).content)
        time.sleep(0.5)
        stable = region(screenshot(b, vm).content) == a
        visible, action_ms, needed = [], [], []
        for _ in range(samples):
            before = region(screenshot(b, vm).content)
            t0 = time.perf_counter()
            act(b, vm, {"action": "type", "text": "x"})
            action_ms.append(since(t0))
            n = 0
            while True:
                n += 1
                png = screenshot(b, vm).content
                seen = since(t0)
                if region(png) != before:
                    break
                if seen > 10_000:
                    raise RuntimeError("a typed character never showed on the screen")
            visible.append(seen)
            needed.append(n)
            time.sleep(0.1)
        action = {**summary(visible), "action_call": summary(action_ms),
                  "screenshots_needed": {str(k): needed.count(k) for k in sorted(set(needed))},
                  "window_stable_without_action": stable, "compared": list(box)}
        print("action (type 'x' in xterm) → differing screenshot", action, flush=True)
        return {"screenshot": shot, "action_to_visible": action, "load_before": load_before,
                "load_after": load()}
    finally:
        b.close()


# ---- 5. canvas render -----------------------------------------------------------------------

def part_canvas(samples: int) -> dict:
    b = Bench("cold")
    try:
        vm = b.create("canvas")
        for name, text in CANVAS_PAGE.items():
            b.write(vm, f"/home/user/canvas/{name}", text)
        url = f"/v1/sandboxes/{vm}/canvas/render"

        def render(fmt: str) -> tuple[float, bytes]:
            t0 = time.perf_counter()
            r = b.http.post(url, json={"width": 800, "height": 600, "format": fmt})
            ms = since(t0)
            if r.status_code != 200:
                raise RuntimeError(f"render {fmt}: {r.status_code} {r.text[:300]}")
            return ms, r.content

        first, png = render("png")
        size = Image.open(io.BytesIO(png)).size
        if size != (800, 600):
            raise RuntimeError(f"render png is {size}, not 800×600")
        out = {"first_png_ms": round(first, 1), "load_before": load()}
        out["png"] = {**summary([render("png")[0] for _ in range(samples)]),
                      "png_bytes": len(png)}
        pdfs = [render("pdf") for _ in range(samples)]
        if not pdfs[-1][1].startswith(b"%PDF-"):
            raise RuntimeError("render pdf did not answer a PDF")
        out["pdf"] = {**summary([ms for ms, _ in pdfs]), "pdf_bytes": len(pdfs[-1][1])}
        out["load_after"] = load()
        print("canvas render 800×600", out, flush=True)
        return out
    finally:
        b.close()


# ---- 6. page loads: inside vs outside, flags, platform, dump-dom ----------------------------

def recipe_flags() -> list[str]:
    """The browser recipe's Chromium flags, without its port, profile and first URL."""
    from e2a.templates import recipes

    argv = recipes.load("browser").services[0].argv
    return [a for a in argv[1:] if a.startswith("--")
            and not a.startswith(("--remote-debugging-port=", "--user-data-dir="))]


def time_loads(ctx, url: str, samples: int) -> dict:
    """`fresh` and `same` page loads (see the module docstring), after 2 untimed of each."""
    fresh, same = [], []
    for i in range(2 + samples):
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(url, wait_until="load")
        if i >= 2:
            fresh.append(since(t0))
        page.close()
    page = ctx.new_page()
    for i in range(2 + samples):
        t0 = time.perf_counter()
        page.goto(url, wait_until="load")
        if i >= 2:
            same.append(since(t0))
    if page.title() != SITE_TITLE:
        raise RuntimeError(f"the page did not load fully: title {page.title()!r}")
    page.close()
    return {"fresh": summary(fresh), "same": summary(same)}


def host_site() -> tuple[subprocess.Popen, str]:
    """SITE on a host http.server (127.0.0.1, a free port): the process and the page's URL."""
    HOST_SITE.mkdir(parents=True, exist_ok=True)
    for name, text in SITE.items():
        (HOST_SITE / name).write_text(text)
    from tests.e2e.server import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(HOST_SITE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/index.html"
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            if httpx.get(url).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the host's http.server did not start")


def site_sandbox(b: Bench) -> str:
    """A browser sandbox serving SITE on 127.0.0.1:8000, with the page-load scripts."""
    vm = b.create("browser")
    for name, text in SITE.items():
        b.write(vm, f"{SITE_DIR}/{name}", text)
    b.write(vm, "/home/user/pageload.py", PAGELOAD_PY)
    b.write(vm, "/home/user/dumpdom.py", DUMPDOM_PY)
    b.background(vm, ["python3", "-m", "http.server", str(INSIDE_PORT), "--bind", "127.0.0.1"],
                 cwd=SITE_DIR)
    check = ("import sys, time, urllib.request\n"
             "for _ in range(100):\n"
             "    try:\n"
             f"        urllib.request.urlopen('{inside_url()}').read()\n"
             "        sys.exit(0)\n"
             "    except OSError:\n"
             "        time.sleep(0.1)\n"
             "sys.exit(1)\n")
    b.run(vm, ["python3", "-c", check])
    return vm


def inside_url() -> str:
    return f"http://127.0.0.1:{INSIDE_PORT}/index.html"


def through_e2a(b: Bench, pw: Playwright, vm: str, samples: int) -> dict:
    browser = pw.chromium.connect_over_cdp(b.cdp_url(vm))
    try:
        return time_loads(browser.contexts[0], inside_url(), samples)
    finally:
        browser.close()


def browser_quota_us() -> int:
    """The browser template's CPU quota per 100 ms period, as e2a sets it."""
    from e2a.runtime.cgroups import PERIOD_US
    from e2a.templates import recipes

    r = recipes.load("browser")
    return int(r.vcpu * r.cpu_fraction * PERIOD_US)


@contextlib.contextmanager
def host_cgroup_like_sandbox():
    """A host cgroup with the browser template's CPU quota (and CFS burst), set the way e2a sets
    a sandbox's (e2a.runtime.cgroups): its cgroup.procs file, to start host processes in."""
    from e2a.runtime.cgroups import ROOT, V2, Cgroup

    parent, name = "bthost", "onecpu"
    d = ROOT / parent / name if V2 else ROOT / "cpu" / parent / name
    d.mkdir(parents=True, exist_ok=True)
    try:
        Cgroup(parent, name).set_cpu_quota(browser_quota_us())
        yield d / "cgroup.procs"
    finally:
        for gone in (d, d.parent):
            with contextlib.suppress(OSError):
                gone.rmdir()


@contextlib.contextmanager
def sandbox_quota_lifted(b: Bench, vm: str):
    """The sandbox's CPU quota removed for a while (the benchmark's own sandbox only), then
    put back as it was."""
    from e2a.runtime.cgroups import ROOT, V2

    name = f"{b.srv.instance}-{vm}"
    f = ROOT / b.srv.instance / name / "cpu.max" if V2 else \
        ROOT / "cpu" / b.srv.instance / name / "cpu.cfs_quota_us"
    before = f.read_text().strip()
    f.write_text("max" if V2 else "-1")
    try:
        yield
    finally:
        f.write_text(before.split()[0] if V2 else before)


def pageload_script(b: Bench | None, vm: str | None, flags: list[str], samples: int,
                    url: str, procs: Path | None = None) -> dict:
    """PAGELOAD_PY inside the sandbox (b, vm) or on the host (b None; in the cgroup whose
    cgroup.procs is `procs`, if given)."""
    cfg = {"chromium": CHROMIUM, "port": 9333, "n": samples, "url": url,
           "flags": recipe_flags() + flags,
           "profile": "/tmp/e2a-bench-chromium" if b else str(BENCH_DIR / "host-chromium")}
    if b is None:
        argv = [sys.executable, "-c", PAGELOAD_PY, json.dumps(cfg)]
        if procs is not None:
            argv = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"pageload on the host: {p.stderr[-2000:]}")
        raw = json.loads(p.stdout.strip().splitlines()[-1])
    else:
        raw = json.loads(b.run(vm, ["python3", "/home/user/pageload.py", json.dumps(cfg)])
                         .strip().splitlines()[-1])
    if raw["title"] != SITE_TITLE:
        raise RuntimeError(f"the page did not load fully ({flags}): title {raw['title']!r}")
    return {"start_ms": round(raw["start_ms"], 1), "settle_ms": round(raw["settle_ms"]),
            "fresh": summary(raw["fresh_ms"]),
            "same": summary(raw["same_ms"]), "processes": raw.get("processes")}


def dumpdom(b: Bench | None, vm: str | None, runs: int) -> dict:
    if b is None:
        profile, url = str(BENCH_DIR / "host-dumpdom"), (HOST_SITE / "index.html").as_uri()
        p = subprocess.run([sys.executable, "-c", DUMPDOM_PY, CHROMIUM, profile, url, str(runs),
                            "item 199"], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"dump-dom on the host: {p.stderr[-2000:]}")
        raw = json.loads(p.stdout.strip().splitlines()[-1])
    else:
        raw = json.loads(b.run(vm, ["python3", "/home/user/dumpdom.py", CHROMIUM,
                                    "/tmp/e2a-bench-dumpdom", f"file://{SITE_DIR}/index.html",
                                    str(runs), "item 199"]).strip().splitlines()[-1])
    if not raw["ok"]:
        raise RuntimeError("chromium --dump-dom did not print the page's full DOM")
    return summary(raw["ms"])


def ratio(inside: dict, outside: dict) -> float:
    return round(inside["p50_ms"] / outside["p50_ms"], 2)


def part_pageload(pw: Playwright, samples: int, parts: list[str]) -> dict:
    """Inside vs outside, and (as asked in `parts`) flags and dump-dom, on the default server."""
    out: dict = {"url_inside": inside_url(), "load_before": load()}
    site, site_url = host_site()
    b = Bench("cold")
    try:
        vm = site_sandbox(b)
        if "pageload" in parts:
            inside = through_e2a(b, pw, vm, samples)
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--no-sandbox"])
            try:
                outside = time_loads(browser.new_context(), site_url, samples)
            finally:
                browser.close()
            out["inside_through_e2a"] = inside
            out["outside_playwright_launch"] = outside
            out["ratio_p50"] = {k: ratio(inside[k], outside[k]) for k in ("fresh", "same")}
            # the same Chromium with the recipe's flags, measured locally on either side
            out["inside_local_recipe_flags"] = pageload_script(b, vm, [], samples, inside_url())
            out["outside_local_recipe_flags"] = pageload_script(None, None, [], samples, site_url)
            out["ratio_local_p50"] = {k: ratio(out["inside_local_recipe_flags"][k],
                                               out["outside_local_recipe_flags"][k])
                                      for k in ("fresh", "same")}
            # The CPU budget, apart from gVisor: the host Chromium under the sandbox's quota,
            # and the sandbox's Chromium with its quota lifted.
            out["cpu_quota_us_per_100ms"] = browser_quota_us()
            with host_cgroup_like_sandbox() as procs:
                out["outside_local_recipe_flags_quota"] = pageload_script(
                    None, None, [], samples, site_url, procs=procs)
            with sandbox_quota_lifted(b, vm):
                out["inside_local_recipe_flags_no_quota"] = pageload_script(
                    b, vm, [], samples, inside_url())
                out["inside_through_e2a_no_quota"] = through_e2a(b, pw, vm, samples)
            print("page load inside (through e2a)", inside, flush=True)
            print("page load outside (Playwright launch)", outside, flush=True)
            print("ratio inside/outside p50", out["ratio_p50"], flush=True)
            print("inside, local, recipe flags", out["inside_local_recipe_flags"], flush=True)
            print("outside, local, recipe flags", out["outside_local_recipe_flags"], flush=True)
            print("outside, local, recipe flags, the sandbox's CPU quota",
                  out["outside_local_recipe_flags_quota"], flush=True)
            print("inside, local, recipe flags, no CPU quota",
                  out["inside_local_recipe_flags_no_quota"], flush=True)
            print("inside (through e2a), no CPU quota", out["inside_through_e2a_no_quota"],
                  flush=True)
        if "flags" in parts:
            flags = out["flags"] = {}
            for name, extra in FLAG_VARIANTS.items():
                if not extra and "inside_local_recipe_flags" in out:   # just measured
                    flags[name] = {"extra_flags": extra,
                                   "inside": out["inside_local_recipe_flags"],
                                   "outside": out["outside_local_recipe_flags"]}
                    continue
                flags[name] = {"extra_flags": extra,
                               "inside": pageload_script(b, vm, extra, samples, inside_url()),
                               "outside": pageload_script(None, None, extra, samples, site_url)}
                print(f"flags {name:26}", "inside", flags[name]["inside"], flush=True)
                print(f"      {'':26}", "outside", flags[name]["outside"], flush=True)
        if "dumpdom" in parts:
            runs = max(5, samples // 4)
            dd = out["dumpdom"] = {"inside": dumpdom(b, vm, runs),
                                   "outside": dumpdom(None, None, runs)}
            dd["ratio_p50"] = ratio(dd["inside"], dd["outside"])
            print("chromium --dump-dom, whole process", dd, flush=True)
        out["load_after"] = load()
    finally:
        b.close()
        site.kill()
        site.wait()
        for d in (HOST_SITE, BENCH_DIR / "host-chromium", BENCH_DIR / "host-dumpdom"):
            shutil.rmtree(d, ignore_errors=True)
    return out


def part_platform(pw: Playwright, samples: int, systrap: dict) -> dict:
    """The same on an E2A_PLATFORM=ptrace server, beside the systrap figures just taken."""
    out: dict = {"load_before": load()}
    b = Bench("ptrace")
    try:
        browser_create_to_page(b, pw, 1, warm=False)
        out["cold_create_to_page"] = browser_create_to_page(b, pw, max(5, samples // 4),
                                                            warm=False)
        vm = site_sandbox(b)
        out["inside_through_e2a"] = through_e2a(b, pw, vm, samples)
        out["dumpdom_inside"] = dumpdom(b, vm, max(5, samples // 4))
        out["load_after"] = load()
    finally:
        b.close()
    out["systrap"] = systrap
    print("platform ptrace", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--only", default=",".join(PART_NAMES),
                    help="comma-separated: " + ",".join(PART_NAMES))
    args = ap.parse_args()
    parts = args.only.split(",")
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        ap.error(f"unknown part(s) for --only: {', '.join(sorted(unknown))}")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "mem_gib": round(os.sysconf("SC_PHYS_PAGES")
                                                  * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                                 "chromium": subprocess.run([CHROMIUM, "--version"],
                                                            capture_output=True,
                                                            text=True).stdout.strip()},
                     "samples": args.samples}
    if RESULTS.exists() and set(parts) != set(PART_NAMES):
        results = {**json.loads(RESULTS.read_text()), **results}  # --only: keep the rest

    def save() -> None:
        RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    started = time.perf_counter()
    seconds = results.setdefault("part_seconds", {})

    def run(part: str, key: str, fn) -> None:
        t0 = time.perf_counter()
        results[key] = fn()
        seconds[part] = round(time.perf_counter() - t0)
        save()

    with sync_playwright() as pw:
        if "browser" in parts:
            run("browser", "browser_create_to_page", lambda: part_browser(pw, args.samples))
        if "cua" in parts:
            run("cua", "cua_create_to_screenshot", lambda: part_cua(args.samples))
        if "desktop" in parts:
            run("desktop", "desktop", lambda: part_desktop(args.samples))
        if "canvas" in parts:
            run("canvas", "canvas_render", lambda: part_canvas(args.samples))
        if {"pageload", "flags", "dumpdom"} & set(parts):
            run("pageload,flags,dumpdom", "page_load",
                lambda: {**results.get("page_load", {}), **part_pageload(pw, args.samples, parts)})
        if "platform" in parts:
            pl = results.get("page_load", {})
            systrap = {k: pl[k] for k in ("inside_through_e2a",) if k in pl}
            if "dumpdom" in pl:
                systrap["dumpdom_inside"] = pl["dumpdom"]["inside"]
            if "browser_create_to_page" in results:
                systrap["cold_create_to_page"] = results["browser_create_to_page"]["cold"]
            run("platform", "platform_ptrace", lambda: part_platform(pw, args.samples, systrap))
    took = round(time.perf_counter() - started)
    if set(parts) == set(PART_NAMES):
        results["run_seconds"] = took
    else:
        results["last_partial_run"] = {"parts": parts, "seconds": took}
    save()
    print(f"written to {RESULTS} ({took} s)")


if __name__ == "__main__":
    main()
