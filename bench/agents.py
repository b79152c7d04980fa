"""Agent benchmarks (`make bench-agents`): how soon an agent is at work, and what e2a adds.

The provider is the tests' mock (tests/llm_mock), answering at once, on the host's loopback;
every e2a provider URL points at it (E2A_LLM_*_URL). Sandboxes are the standard template
(0.5 vCPU, 512 MiB) from a warm pool of 2 (/health polled until the pool is full before each
sample).

  first-request  t0 just before POST /v1/sandboxes {"agent": A, "llm_key": K, "task": ...};
                 t1 = the time the mock received the first request carrying K (its own clock,
                 the same machine). The scenario ends the task at once (a final message, no
                 tools). Agents: e2a's own on Anthropic, OpenAI (Responses) and Google, and the
                 three CLIs. Samples rotate through the agents so they share the machine's load.
  egress         The egress proxy's added latency: an Egress (e2a/agents/egress.py) started in
                 this process on 127.0.0.1 with a grant for 127.0.0.1, and N sequential
                 POST /v1/messages (a 200-byte body; the mock answers its 401 JSON at once)
                 straight to the mock and through the proxy, alternately, over kept-alive
                 connections (httpx). Added = p50(proxy) - p50(direct). What a sandbox adds on
                 top (its veth and gVisor's netstack) is the same for any destination.
  own-step       e2a's own agent (Anthropic protocol) on a task of S steps, each a `list_files`
                 of /home/user, then a final message, against a task of 0 steps: from the
                 events' `task_started` to `task_finished` (server clock). Per step =
                 (T_S - T_0) / S: a model turn through the SDK (streamed, mock at once) plus one
                 tool call through envd plus storing the events.

Usage: python bench/agents.py [--samples 7] [--only first,egress,step] [--agents A,B]
Results are printed and written to bench/agents.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2a.agents.egress import Egress  # noqa: E402
from tests.e2e.server import Server, free_port, llm_mock  # noqa: E402

AGENTS = {
    "e2a (anthropic)": {"agent": "e2a", "key": "sk-ant-api03-", "model": "claude-sonnet-5-5"},
    "e2a (openai)": {"agent": "e2a", "key": "sk-proj-", "model": "gpt-5"},
    "e2a (google)": {"agent": "e2a", "key": "AIza", "model": "gemini-2.5-pro"},
    "claude-code": {"agent": "claude-code", "key": "sk-ant-api03-"},
    "codex": {"agent": "codex", "key": "sk-proj-"},
    "gemini-cli": {"agent": "gemini-cli", "key": "AIza"},
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": round(pct(xs, 50), 2), "p95": round(pct(xs, 95), 2),
            "min": round(min(xs), 2), "max": round(max(xs), 2)}


def wait_pool(c: httpx.Client, want: int = 2, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if c.get("/health").json().get("pool", {}).get("standard", 0) >= want:
            return
        time.sleep(0.2)
    raise RuntimeError("the warm pool did not fill")


def task_done(c: httpx.Client, vm: str, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t = c.get(f"/v1/sandboxes/{vm}/task")
        if t.status_code == 200 and t.json()["state"] not in ("starting", "running"):
            return t.json()
        time.sleep(0.2)
    raise RuntimeError(f"task of {vm} did not end")


def first_request(c: httpx.Client, mock, samples: int, agents: list[str]) -> dict:
    times: dict[str, list[float]] = {name: [] for name in agents}
    for i in range(samples):
        names = list(agents)
        names = names[i % len(names):] + names[:i % len(names)]
        for name in names:
            spec = AGENTS[name]
            key = spec["key"] + "bench" + secrets.token_hex(12)
            mock.scenario(key, final="done")
            wait_pool(c)
            body = {"template": "standard", "agent": spec["agent"], "llm_key": key,
                    "task": "say done"}
            if "model" in spec:
                body["model"] = spec["model"]
            t0 = time.time()
            r = c.post("/v1/sandboxes", json=body)
            r.raise_for_status()
            vm = r.json()["vm_id"]
            end = time.monotonic() + 120
            while not (seen := mock.requests(key)) and time.monotonic() < end:
                time.sleep(0.02)
            if not seen:
                raise RuntimeError(f"{name}: no request reached the provider")
            times[name].append((min(s["at"] for s in seen) - t0) * 1000)
            task = task_done(c, vm)
            if task["state"] != "succeeded":
                raise RuntimeError(f"{name}: task {task['state']}: {task['error']}")
            print(f"  {name:16s} first request {times[name][-1]:7.0f} ms", flush=True)
    return {name: summary(xs) for name, xs in times.items()}


async def egress_latency(mock, n: int) -> dict:
    port = free_port()
    e = Egress({"anthropic": mock.url}, port, host="127.0.0.1")
    await e.start()
    key = "sk-ant-api03-bench-egress"  # no scenario: the mock answers 401 at once
    g = e.grant("127.0.0.1", "anthropic", key)
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "x" * 120}]})
    direct, proxied = [], []
    async with httpx.AsyncClient() as c:
        for i in range(n + 20):
            for label, url, k, out in (("direct", mock.url, key, direct),
                                       ("proxy", f"http://127.0.0.1:{port}/anthropic",
                                        g.placeholder, proxied)):
                t = time.perf_counter()
                r = await c.post(url + "/v1/messages", content=body,
                                 headers={"x-api-key": k, "content-type": "application/json",
                                          "anthropic-version": "2023-06-01"})
                dt = (time.perf_counter() - t) * 1000
                assert r.status_code == 401, r.text
                if i >= 20:  # warm-up
                    out.append(dt)
    await e.stop()
    d, p = summary(direct), summary(proxied)
    return {"direct_ms": d, "proxy_ms": p, "added_p50_ms": round(p["p50"] - d["p50"], 2)}


def own_step(c: httpx.Client, mock, steps: int, samples: int) -> dict:
    def run(k: int) -> float:
        key = "sk-ant-api03-bench-step" + secrets.token_hex(8)
        mock.scenario(key, steps=[{"tool": "list_files", "args": {"path": "/home/user"}}] * k,
                      final="done")
        wait_pool(c)
        r = c.post("/v1/sandboxes", json={"template": "standard", "agent": "e2a",
                                          "llm_key": key, "model": "claude-sonnet-5-5",
                                          "task": "list", "max_steps": steps + 5})
        r.raise_for_status()
        vm = r.json()["vm_id"]
        task = task_done(c, vm)
        assert task["state"] == "succeeded", task
        ev = c.get(f"/v1/sandboxes/{vm}/task/events", params={"limit": 5000}).json()["events"]
        at = {e["type"]: datetime.fromisoformat(e["at"]) for e in ev
              if e["type"] in ("task_started", "task_finished")}
        calls = sum(1 for e in ev if e["type"] == "tool_call")
        assert calls == k, (calls, k)
        return (at["task_finished"] - at["task_started"]).total_seconds() * 1000

    zero, many = [], []
    for _ in range(samples):
        zero.append(run(0))
        many.append(run(steps))
    per = (statistics.median(many) - statistics.median(zero)) / steps
    return {"steps": steps, "task_0_steps_ms": summary(zero), f"task_{steps}_steps_ms": summary(many),
            "per_step_ms": round(per, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--only", default="first,egress,step")
    ap.add_argument("--agents", default=",".join(AGENTS), help="comma-separated, of: "
                    + ", ".join(AGENTS))
    args = ap.parse_args()
    only = set(args.only.split(","))
    mock = llm_mock()
    out: dict = {"machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                             "loadavg_before": os.getloadavg()}}
    if "egress" in only:
        out["egress"] = asyncio.run(egress_latency(mock, 300))
        print("egress:", out["egress"], flush=True)
    srv = Server(instance="ba0", subnet="10.241.0.0/20", base=Path("/tmp/e2a-bench-agents"))
    srv.extra_env = {"E2A_POOL_SIZE": "2"}
    srv.cleanup()
    srv.start()
    try:
        key = srv.create_user("bench-agents@example.com")
        with httpx.Client(base_url=srv.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            if "first" in only:
                out["first_request_ms"] = first_request(c, mock, args.samples,
                                                        args.agents.split(","))
                print("first request:", json.dumps(out["first_request_ms"], indent=1), flush=True)
            if "step" in only:
                out["own_step"] = own_step(c, mock, 20, max(3, args.samples // 2))
                print("own agent per step:", out["own_step"], flush=True)
    finally:
        srv.stop()
        srv.cleanup()
        mock.stop()
    out["machine"]["loadavg_after"] = os.getloadavg()
    (ROOT / "bench" / "agents.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
