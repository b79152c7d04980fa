"""What relaying a session's WebSocket to the replica holding it costs (docs/kubernetes.md
"Sessions", e2a/api/session_relay.py): the relay as e2a serves it (uvicorn with e2a's
WebSocket settings, the relay's own code) in front of a WebSocket server standing for the
holder, against the same server reached directly, on loopback. The difference is the hop's
cost; the holder's own work (an e2a replica serving the session) is the same either way and
is not in these figures (bench/sessions.py measures it).

  connect        t0 before the client's handshake, t1 once the first frame (the holder's
                 `ready`) arrives.
  round trip     a 200-byte text frame sent, until the holder's echo arrives; one connection,
                 back to back.

Usage: python bench/session_relay.py [--connects 50] [--trips 2000]
Results are printed and written to bench/session_relay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from websockets.sync.client import connect  # noqa: E402
from websockets.sync.server import serve  # noqa: E402

from bench.common import others, pct  # noqa: E402
from e2a.api.session_relay import relay  # noqa: E402
from e2a.server_cli import WS_MAX_MESSAGE, WS_MAX_QUEUE  # noqa: E402

FRAME = json.dumps({"type": "ping", "id": "x" * 170})


def summary(ms: list[float]) -> dict:
    return {"p50": round(pct(ms, 50), 3), "p95": round(pct(ms, 95), 3), "n": len(ms)}


def holder() -> str:
    def handle(conn):
        conn.send(json.dumps({"type": "ready"}))
        for msg in conn:
            conn.send(msg)

    server = serve(handle, "127.0.0.1", 0, subprotocols=["e2a.session.v1"], compression=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.socket.getsockname()[1]}"


def relaying(holder_url: str) -> str:
    app = FastAPI()

    @app.websocket("/v1/sessions/{sid}/ws")
    async def ws(websocket: WebSocket, sid: str):
        await relay(websocket, sid, holder_url, 1, "token", True, "0")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio",
                                           log_level="warning", ws_max_size=WS_MAX_MESSAGE,
                                           ws_max_queue=WS_MAX_QUEUE))
    threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}"


def measure(base: str, connects: int, trips: int) -> dict:
    url = base.replace("http", "ws", 1) + "/v1/sessions/ses_bench/ws"
    opened = []
    for _ in range(connects):
        t0 = time.perf_counter()
        with connect(url, subprotocols=["e2a.session.v1"], compression=None) as ws:
            ws.recv()
            opened.append((time.perf_counter() - t0) * 1000)
    rtt = []
    with connect(url, subprotocols=["e2a.session.v1"], compression=None) as ws:
        ws.recv()
        for _ in range(trips):
            t0 = time.perf_counter()
            ws.send(FRAME)
            ws.recv()
            rtt.append((time.perf_counter() - t0) * 1000)
    return {"connect_ms": summary(opened), "round_trip_ms": summary(rtt)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=50)
    ap.add_argument("--trips", type=int, default=2000)
    args = ap.parse_args()
    direct = holder()
    out = {"machine": others(), "direct": measure(direct, args.connects, args.trips),
           "relayed": measure(relaying(direct), args.connects, args.trips)}
    out["added_p50_ms"] = {k: round(out["relayed"][k]["p50"] - out["direct"][k]["p50"], 3)
                           for k in ("connect_ms", "round_trip_ms")}
    print(json.dumps(out, indent=1))
    (ROOT / "bench/session_relay.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
