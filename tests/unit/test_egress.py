"""The LLM egress proxy on its own: the placeholder becomes the real key only toward the
sandbox's vendor, the key never comes back, answers stream through."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from e2a.agents import egress
from e2a.agents.egress import Egress
from tests.e2e.server import free_port


class Upstream:
    """A provider's API: records what it got, answers with the key it saw (as a careless
    provider's error message might), streamed in small pieces."""

    def __init__(self):
        self.seen: list[httpx.Request] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        said = request.headers.get("x-api-key", "") + "|" + request.url.params.get("key", "")

        async def body():
            text = f"data: you sent {said}\n\n".encode()
            for i in range(0, len(text), 3):  # the key is cut across chunks
                yield text[i:i + 3]
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body())


@pytest.fixture
def proxy():
    up = Upstream()
    e = Egress({"anthropic": "http://provider.test", "google": "http://google.test"},
               free_port(), host="127.0.0.1")
    e.client = httpx.AsyncClient(transport=httpx.MockTransport(up.handler))
    return e, up


def run(coro):
    return asyncio.run(coro)


def test_placeholder_swapped_for_the_key_and_cut_from_the_answer(proxy):
    e, up = proxy

    async def go():
        await e.start()
        try:
            g = e.grant("127.0.0.1", "anthropic", "sk-ant-REAL-KEY-0123456789")
            assert g.placeholder.startswith("sk-ant-") and "REAL" not in g.placeholder
            async with httpx.AsyncClient() as c:
                r = await c.post(f"http://127.0.0.1:{e.port}/anthropic/v1/messages?beta=true",
                                 headers={"x-api-key": g.placeholder}, json={"model": "m"})
            return g, r
        finally:
            await e.stop()

    g, r = run(go())
    assert r.status_code == 200
    assert up.seen[0].headers["x-api-key"] == "sk-ant-REAL-KEY-0123456789"
    assert str(up.seen[0].url) == "http://provider.test/v1/messages?beta=true"
    assert up.seen[0].headers["accept-encoding"] == "identity"
    assert "REAL-KEY" not in r.text and g.placeholder in r.text
    assert g.requests == 1


def test_key_in_query_and_bearer(proxy):
    e, up = proxy

    async def go():
        await e.start()
        try:
            g = e.grant("127.0.0.1", "google", "AIzaREALKEY")
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{e.port}/google/v1beta/models?key={g.placeholder}",
                                headers={"authorization": f"Bearer {g.placeholder}"})
            return r
        finally:
            await e.stop()

    r = run(go())
    assert up.seen[0].url.params["key"] == "AIzaREALKEY"
    assert up.seen[0].headers["authorization"] == "Bearer AIzaREALKEY"
    assert "AIzaREALKEY" not in r.text


def test_other_vendor_and_unknown_sandbox_refused(proxy):
    e, up = proxy

    async def go():
        await e.start()
        try:
            async with httpx.AsyncClient() as c:
                no_grant = await c.post(f"http://127.0.0.1:{e.port}/anthropic/v1/messages")
                g = e.grant("127.0.0.1", "anthropic", "sk-ant-REAL")
                other = await c.get(f"http://127.0.0.1:{e.port}/google/v1beta/models",
                                    headers={"x-goog-api-key": g.placeholder})
                e.revoke("127.0.0.1")
                revoked = await c.post(f"http://127.0.0.1:{e.port}/anthropic/v1/messages",
                                       headers={"x-api-key": g.placeholder})
            return no_grant, other, revoked
        finally:
            await e.stop()

    no_grant, other, revoked = run(go())
    assert no_grant.status_code == 403 and other.status_code == 403 and revoked.status_code == 403
    assert "may call anthropic" in other.text
    assert up.seen == []  # nothing reached a provider


def test_oversized_and_too_many_requests_refused(proxy):
    e, up = proxy

    async def go():
        await e.start()
        try:
            g = e.grant("127.0.0.1", "anthropic", "sk-ant-REAL")
            url = f"http://127.0.0.1:{e.port}/anthropic/v1/messages"
            # a declared size past the limit: refused before any of the body is read
            r, w = await asyncio.open_connection("127.0.0.1", e.port)
            w.write(f"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\n"
                    f"content-length: {egress.MAX_BODY + 1}\r\n\r\n".encode())
            declared = (await r.readline()).decode()
            w.close()
            async with httpx.AsyncClient() as c:

                async def chunked():  # no size declared: cut off as it passes the limit
                    for _ in range((egress.MAX_BODY >> 20) + 2):
                        yield b"x" * (1 << 20)
                streamed = await c.post(url, headers={"x-api-key": g.placeholder},
                                        content=chunked())
                g.open = egress.MAX_OPEN
                busy = await c.post(url, headers={"x-api-key": g.placeholder}, content=b"{}")
            return declared, streamed, busy
        finally:
            await e.stop()

    declared, streamed, busy = run(go())
    assert declared.startswith("HTTP/1.1 413") and streamed.status_code == 413
    assert busy.status_code == 429


def test_taken_port_is_an_oserror():
    async def go():
        port = free_port()
        a, b = Egress({}, port, host="127.0.0.1"), Egress({}, port, host="127.0.0.1")
        await a.start()
        try:
            with pytest.raises(OSError):
                await b.start()
        finally:
            await a.stop()
    run(go())


@pytest.mark.parametrize("chunks", [[b"abcKEYdef"], [b"abcK", b"EYdef"], [b"K", b"E", b"Y"],
                                    [b"KE", b"YKEY", b"K", b"EY!"], [b"xx"], [b""]])
def test_scrub_across_chunks(chunks):
    class Resp:
        async def aiter_raw(self):
            for c in chunks:
                yield c

        async def aclose(self):
            pass

    g = egress.Grant(vendor="anthropic", key="KEY", placeholder="<p>", open=1)

    async def go():
        return b"".join([c async for c in egress._scrubbed(Resp(), g)])

    out = run(go())
    assert out == b"".join(chunks).replace(b"KEY", b"<p>")
    assert g.open == 0
