"""The host's side of envd authentication (e2a/sandboxes/envd.py, docs/protocol.md): requests
are signed, never carry the token, and an answer that does not prove the token is no answer.

A fake envd on 127.0.0.1 plays both parts: the genuine agent (checks the signature with its
own implementation of the protocol, answers with the proof) and an impostor that took the
port (answers without a proof, or with a proof that is not for this request)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import struct

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.server import serve

from e2a.sandboxes import envd

TOKEN = "t" * 64


def _hmac(key: str, *parts: bytes) -> bytes:
    m = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def verify(method: str, target: str, headers, body: bytes | None) -> bool:
    """An independent check of a request's signature, as envd (guest/auth.go) does it."""
    ts, nonce, desc, sig = (headers.get(h) for h in (envd.TIMESTAMP, envd.NONCE, envd.BODY,
                                                     envd.SIGNATURE))
    msg = f"e2a-envd-request-v1\n{method}\n{target}\n{ts}\n{nonce}\n{desc}".encode()
    if not hmac.compare_digest(_hmac(TOKEN, msg).hex(), sig or ""):
        return False
    if desc == "framed" or body is None:
        return True
    return desc == "sha256=" + hashlib.sha256(body).hexdigest()


def unframe(nonce: str, data: bytes) -> bytes:
    out, seq, i = b"", 0, 0
    while True:
        n = struct.unpack(">I", data[i:i + 4])[0]
        mac, payload = data[i + 4:i + 36], data[i + 36:i + 36 + n]
        want = _hmac(TOKEN, b"e2a-envd-frame-v1\n" + nonce.encode() + b"\n",
                     struct.pack(">Q", seq), struct.pack(">I", n), payload)
        assert hmac.compare_digest(mac, want), f"frame {seq} does not verify"
        i, seq = i + 36 + n, seq + 1
        if n == 0:
            assert i == len(data), "data after the end frame"
            return out
        out += payload


def proof(nonce: str, token: str = TOKEN) -> str:
    return _hmac(token, b"e2a-envd-answer-v1\n", nonce.encode()).hex()


class FakeEnvd:
    """mode: "genuine", "no_proof", "wrong_token" or "stale_proof" (a proof from an earlier
    answer, i.e. for another nonce)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.seen: list[dict] = []
        self.old_nonce = "0" * 32

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        desc = request.headers.get(envd.BODY)
        ok = verify(request.method, request.raw_path, request.headers,
                    None if desc == "framed" else body)
        nonce = request.headers.get(envd.NONCE, "")
        self.seen.append({"headers": dict(request.headers), "ok": ok, "body": body,
                          "content": unframe(nonce, body) if desc == "framed" else body})
        if not ok:
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        headers = {}
        if self.mode == "genuine":
            headers[envd.PROOF] = proof(nonce)
        elif self.mode == "wrong_token":
            headers[envd.PROOF] = proof(nonce, "another sandbox's token")
        elif self.mode == "stale_proof":
            headers[envd.PROOF] = proof(self.old_nonce)
        return web.json_response({"status": "ok", "commands": []}, headers=headers)


@contextlib.asynccontextmanager
async def fake_envd(mode: str, monkeypatch):
    fake = FakeEnvd(mode)
    app = web.Application(client_max_size=16 << 20)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    monkeypatch.setattr(envd, "ENVD_PORT", runner.addresses[0][1])
    client = envd.make_client()
    try:
        yield fake, client
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["no_proof", "wrong_token", "stale_proof"])
def test_an_answer_without_a_valid_proof_is_refused(mode, monkeypatch):
    async def main():
        async with fake_envd(mode, monkeypatch) as (fake, client):
            with pytest.raises(envd.NotEnvd):
                r = await envd.send(client, "127.0.0.1", TOKEN, "POST", "/commands",
                                    json={"cmd": "id", "user": "root"})
                r.release()
            # The host's own calls treat it as no answer at all.
            assert await envd.get_json(client, envd.base_url("127.0.0.1") + "/commands",
                                       TOKEN) is None
            with pytest.raises(TimeoutError, match="proof"):
                await envd.wait_ready(client, "127.0.0.1", TOKEN, deadline_s=0.3)
            assert fake.seen and all(s["ok"] for s in fake.seen)  # the requests were fine
    asyncio.run(main())


def test_not_envd_is_a_transport_error():
    # So every caller that treats a broken connection as "the agent did not answer" (502
    # through the API, a failed health check) treats an impostor the same way.
    assert issubclass(envd.NotEnvd, envd.TRANSPORT_ERRORS)


def test_a_genuine_answer_is_accepted_and_no_request_carries_the_token(monkeypatch):
    async def main():
        async with fake_envd("genuine", monkeypatch) as (fake, client):
            r = await envd.send(client, "127.0.0.1", TOKEN, "GET", "/files",
                                params={"path": "/tmp/a b&c", "user": "root"})
            assert r.status == 200
            r.release()
            r = await envd.send(client, "127.0.0.1", TOKEN, "POST", "/commands",
                                json={"cmd": "echo hi"})
            r.release()
            assert await envd.get_json(client, envd.base_url("127.0.0.1") + "/logs",
                                       TOKEN) == {"status": "ok", "commands": []}
            await envd.wait_ready(client, "127.0.0.1", TOKEN, deadline_s=2)

            async def chunks():
                yield b"hello "
                yield b"x" * (envd.MAX_FRAME + 10)  # split into two frames
                yield b" world"
            r = await envd.send(client, "127.0.0.1", TOKEN, "PUT", "/files",
                                params={"path": "f"}, data=chunks())
            r.release()
        assert all(s["ok"] for s in fake.seen)
        assert fake.seen[-1]["content"] == b"hello " + b"x" * (envd.MAX_FRAME + 10) + b" world"
        assert fake.seen[1]["body"] == b'{"cmd":"echo hi"}'
        nonces = [s["headers"][envd.NONCE] for s in fake.seen]
        assert len(set(nonces)) == len(nonces)
        for s in fake.seen:
            assert "Authorization" not in s["headers"]
            assert not any(TOKEN in v for v in s["headers"].values())
    asyncio.run(main())


def test_a_signed_request_cannot_be_altered():
    h = envd.signed_headers(TOKEN, "POST", "/commands", b'{"cmd":"id"}')
    assert verify("POST", "/commands", h, b'{"cmd":"id"}')
    assert not verify("POST", "/commands", h, b'{"cmd":"id","user":"root"}')
    assert not verify("POST", "/commands?user=root", h, b'{"cmd":"id"}')
    assert not verify("GET", "/commands", h, b'{"cmd":"id"}')


def test_check_answer():
    sent = envd.signed_headers(TOKEN, "GET", "/health")
    envd.check_answer(TOKEN, sent, {envd.PROOF: proof(sent[envd.NONCE])})
    for bad in ({}, {envd.PROOF: ""}, {envd.PROOF: "zz"}, {envd.PROOF: proof("1" * 32)},
                {envd.PROOF: proof(sent[envd.NONCE], "other")}):
        with pytest.raises(envd.NotEnvd):
            envd.check_answer(TOKEN, sent, bad)


@pytest.mark.parametrize("genuine", [True, False])
def test_websocket_handshake_needs_the_proof(genuine, monkeypatch):
    async def main():
        def process_response(connection, request, response):
            if genuine:
                response.headers[envd.PROOF] = proof(request.headers[envd.NONCE])
            return response

        async def echo(ws):
            async for msg in ws:
                await ws.send(msg)

        async with serve(echo, "127.0.0.1", 0, process_response=process_response) as server:
            port = server.sockets[0].getsockname()[1]
            monkeypatch.setattr(envd, "ENVD_PORT", port)
            if genuine:
                conn = await envd.websocket("127.0.0.1", TOKEN, "/pty?cols=80&rows=24",
                                            open_timeout=5)
                await conn.send("hi")
                assert await conn.recv() == "hi"
                await conn.close()
            else:
                with pytest.raises(envd.NotEnvd):
                    await envd.websocket("127.0.0.1", TOKEN, "/pty?cols=80&rows=24",
                                         open_timeout=5)
    asyncio.run(main())


def test_transport_errors_still_count():
    assert issubclass(aiohttp.ClientConnectionError, envd.TRANSPORT_ERRORS)
