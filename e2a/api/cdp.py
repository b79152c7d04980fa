"""A small DevTools-protocol client over a relayed WebSocket: just what rendering a page to PNG
or PDF takes (Target, Page, Emulation), in flat session mode. Playwright would do it too, but
it starts a Node driver per use; these few messages do not need one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from typing import Any


class CdpError(Exception):
    pass


class Cdp:
    def __init__(self, conn: Any):
        self.conn = conn                   # a websockets connection to the browser endpoint
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._events: dict[tuple[str | None, str], asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self._waiting.pop(msg["id"], None)
                    if fut and not fut.done():
                        if "error" in msg:
                            fut.set_exception(CdpError(msg["error"].get("message", "error")))
                        else:
                            fut.set_result(msg.get("result", {}))
                else:
                    fut = self._events.pop((msg.get("sessionId"), msg.get("method")), None)
                    if fut and not fut.done():
                        fut.set_result(msg.get("params", {}))
        finally:
            for fut in [*self._waiting.values(), *self._events.values()]:
                if not fut.done():
                    fut.set_exception(CdpError("the browser connection closed"))

    async def call(self, method: str, params: dict | None = None,
                   session: str | None = None) -> dict:
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        msg: dict = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.conn.send(json.dumps(msg))
        return await fut

    def expect(self, method: str, session: str | None = None) -> asyncio.Future:
        """A future for the next event `method` (register before the call that causes it)."""
        fut = asyncio.get_running_loop().create_future()
        self._events[(session, method)] = fut
        return fut

    def close(self) -> None:
        self._reader.cancel()


async def render(cdp: Cdp, url: str, html: str | None, width: int, height: int, fmt: str,
                 wait_ms: int, load_timeout: float = 30.0) -> bytes:
    """Open `url` in a new tab of the size given (with `html` as its document, if given),
    wait for its load event and `wait_ms` more, and return it as PNG or PDF."""
    target = (await cdp.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
    try:
        session = (await cdp.call("Target.attachToTarget",
                                  {"targetId": target, "flatten": True}))["sessionId"]
        await cdp.call("Page.enable", session=session)
        await cdp.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session)
        loaded = cdp.expect("Page.loadEventFired", session)
        nav = await cdp.call("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            raise CdpError(f"cannot open {url}: {nav['errorText']}")
        await asyncio.wait_for(loaded, load_timeout)
        if html is not None:
            await cdp.call("Page.setDocumentContent", {"frameId": nav["frameId"], "html": html},
                           session=session)
            # the document's own images and fonts: wait until the network is idle-ish
            await cdp.call("Runtime.evaluate", {
                "expression": "document.fonts.ready.then(() => Promise.all([...document.images]"
                              ".map(i => i.complete ? 0 : new Promise(r => { i.onload = "
                              "i.onerror = r; }))))",
                "awaitPromise": True}, session=session)
        if wait_ms:
            await asyncio.sleep(wait_ms / 1000)
        if fmt == "pdf":
            out = await cdp.call("Page.printToPDF", {
                "paperWidth": width / 96, "paperHeight": height / 96, "printBackground": True,
                "marginTop": 0, "marginBottom": 0, "marginLeft": 0, "marginRight": 0},
                session=session)
        else:
            out = await cdp.call("Page.captureScreenshot", {"format": "png"}, session=session)
        return base64.b64decode(out["data"])
    finally:
        # bounded: a render that timed out must not then wait for ever on a dead browser
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(cdp.call("Target.closeTarget", {"targetId": target}), 5)
