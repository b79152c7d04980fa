"""The cua template: a real X desktop driven through the computer-use actions API, its windows,
and a live view (noVNC, in a real headless Chromium) that a person can take over."""

from __future__ import annotations

import io
import time

import pytest
import websockets
import websockets.sync.client as ws_client
from PIL import Image, ImageChops
from playwright.sync_api import sync_playwright

from tests.conftest import goto, wait_for

SENTENCE = "Héllo wörld ✓ 日本語 — e2a"


@pytest.fixture(scope="module")
def desk(alice):
    sb = alice.create_sandbox("cua", idle_timeout_seconds=900)
    yield sb
    alice.kill(sb.vm_id)


def act(http, vm: str, *actions: dict):
    return http.post(f"/v1/sandboxes/{vm}/desktop/actions", json={"actions": list(actions)},
                     timeout=120)


def screenshot(http, vm: str, **params) -> Image.Image:
    r = http.get(f"/v1/sandboxes/{vm}/desktop/screenshot", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content)).convert("RGB")


def window(http, vm: str, title_part: str) -> dict | None:
    for w in http.get(f"/v1/sandboxes/{vm}/desktop/windows").json()["windows"]:
        if title_part in (w["title"] or ""):
            return w
    return None


def open_window(alice, http, vm: str, cmd: str, title_part: str) -> dict:
    alice.run_background(vm, cmd)
    return wait_for(lambda: window(http, vm, title_part), timeout=60, interval=0.5)


def center(w: dict) -> list[int]:
    return [w["x"] + w["width"] // 2, w["y"] + w["height"] // 2]


def test_screenshot_is_the_screen_and_scales(http, desk):
    full = screenshot(http, desk.vm_id)
    assert full.size == (1280, 800)
    assert screenshot(http, desk.vm_id, width=640).size == (640, 400)
    r = act(http, desk.vm_id, {"action": "screenshot"})
    assert r.status_code == 200
    assert r.json()["results"][0]["type"] == "image"


def test_editor_types_unicode_and_saves(alice, http, desk):
    vm = desk.vm_id
    alice.files.write(vm, "/home/user/note.txt", b"")
    w = open_window(alice, http, vm, "mousepad /home/user/note.txt", "note.txt")
    assert act(http, vm, {"action": "left_click", "coordinate": center(w)}).status_code == 200
    before = screenshot(http, vm)
    r = act(http, vm, {"action": "type", "text": SENTENCE}, {"action": "key", "text": "ctrl+s"})
    assert r.status_code == 200, r.text
    assert wait_for(lambda: alice.files.read_text(vm, "/home/user/note.txt").rstrip("\n") == SENTENCE,
                    timeout=20)
    after = screenshot(http, vm)
    # the text is on the screen now, in the editor's window (the window manager's toolbar,
    # which shows the window's title, may change too)
    inside = (w["x"], w["y"], w["x"] + w["width"], w["y"] + w["height"])
    assert ImageChops.difference(before.crop(inside), after.crop(inside)).getbbox() is not None


def test_a_click_moves_focus_between_windows(alice, http, desk):
    vm = desk.vm_id
    a = open_window(alice, http, vm, "xterm -T term-alpha -geometry 40x10+20+20 -e sleep 3600", "term-alpha")
    b = open_window(alice, http, vm, "xterm -T term-beta -geometry 40x10+700+400 -e sleep 3600", "term-beta")
    for target, name in ((a, "term-alpha"), (b, "term-beta"), (a, "term-alpha")):
        assert act(http, vm, {"action": "left_click", "coordinate": center(target)}).status_code == 200
        assert wait_for(lambda: name in (focused_title(http, vm) or ""), timeout=10)


def focused_title(http, vm: str) -> str | None:
    d = http.get(f"/v1/sandboxes/{vm}/desktop/windows").json()
    return next((w["title"] for w in d["windows"] if w["focused"]), None)


def test_pointer_actions_and_cursor(http, desk):
    vm = desk.vm_id
    r = act(http, vm, {"action": "mouse_move", "coordinate": [321, 123]},
            {"action": "cursor_position"},
            {"action": "scroll", "coordinate": [640, 400], "scroll_direction": "down",
             "scroll_amount": 3},
            {"action": "left_click_drag", "start_coordinate": [10, 10], "coordinate": [30, 30]},
            {"action": "wait", "duration": 0.1},
            {"action": "cursor_position"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[1] == {"x": 321, "y": 123}
    assert results[5] == {"x": 30, "y": 30}


@pytest.mark.parametrize("actions, field", [
    ([{"action": "fly"}], "actions[0].action"),
    ([{"action": "mouse_move", "coordinate": [1, 1]},
      {"action": "left_click", "coordinate": [5000, 10]}], "actions[1].coordinate"),
    ([{"action": "key", "text": "ctrl+notakey"}], "actions[0].text"),
    ([{"action": "scroll", "scroll_direction": "sideways", "scroll_amount": 1}],
     "actions[0].scroll_direction"),
])
def test_bad_actions_are_refused_before_any_runs(http, desk, actions, field):
    before = act(http, desk.vm_id, {"action": "cursor_position"}).json()["results"][0]
    r = act(http, desk.vm_id, *actions)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    # nothing ran: the first action of the list did not move the pointer
    assert act(http, desk.vm_id, {"action": "cursor_position"}).json()["results"][0] == before


def test_desktop_routes_need_a_desktop(http, sandbox):
    r = http.get(f"/v1/sandboxes/{sandbox.vm_id}/desktop/screenshot")
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_template"


def _canvas_not_blank(page) -> bool:
    png = page.locator("#screen canvas").screenshot()
    img = Image.open(io.BytesIO(png)).convert("L")
    lo, hi = img.getextrema()
    return hi - lo > 30


def test_live_view_shows_the_desktop_and_a_person_can_take_over(alice, http, desk):
    vm = desk.vm_id
    alice.files.write(vm, "/home/user/live.txt", b"")
    w = open_window(alice, http, vm, "mousepad /home/user/live.txt", "live.txt")
    act(http, vm, {"action": "left_click", "coordinate": center(w)})
    r = http.post(f"/v1/sandboxes/{vm}/desktop/stream", json={"view_only": False})
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    assert "e2a_live_" not in url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        goto(page, url)
        try:
            page.wait_for_selector("body[data-mode=view]", timeout=30_000)
        except Exception:
            raise AssertionError(f"live view did not connect: {page.inner_text('#status')!r}, "
                                 f"console: {console}") from None
        assert wait_for(lambda: _canvas_not_blank(page), timeout=20)
        assert http.get(f"/v1/sandboxes/{vm}/desktop/control").json() == {
            "human_in_control": False}
        page.click("#take")
        page.wait_for_selector("body[data-mode=control]", timeout=30_000)
        assert http.get(f"/v1/sandboxes/{vm}/desktop/control").json() == {
            "human_in_control": True}
        r = act(http, vm, {"action": "cursor_position"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "human_in_control"
        # a person types through the live view: the keys reach the desktop's editor
        page.locator("#screen canvas").click(position={"x": 640, "y": 400})
        page.keyboard.type("typed by a person")
        time.sleep(1)
        page.click("#give")
        page.wait_for_selector("body[data-mode=view]", timeout=30_000)
        wait_for(lambda: not http.get(f"/v1/sandboxes/{vm}/desktop/control").json()[
            "human_in_control"], timeout=10)
        assert act(http, vm, {"action": "key", "text": "ctrl+s"}).status_code == 200
        assert wait_for(lambda: "typed by a person" in alice.files.read_text(vm, "/home/user/live.txt"),
                        timeout=20)
        browser.close()


def test_view_only_stream_cannot_take_control(http, desk):
    url = http.post(f"/v1/sandboxes/{desk.vm_id}/desktop/stream", json={}).json()["url"]
    ws = url.replace("http", "ws", 1) + "vnc?mode=control"
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        ws_client.connect(ws, open_timeout=10)
    assert e.value.response.status_code == 403
    forged = ws.replace("/v1/desktop/", "/v1/desktop/x")
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        ws_client.connect(forged, open_timeout=10)
    assert e.value.response.status_code == 401


def test_owner_ends_a_persons_control(http, desk):
    url = http.post(f"/v1/sandboxes/{desk.vm_id}/desktop/stream",
                    json={"view_only": False}).json()["url"]
    with ws_client.connect(url.replace("http", "ws", 1) + "vnc?mode=control",
                           open_timeout=10, subprotocols=["binary"]) as conn:
        assert conn.recv(timeout=10).startswith(b"RFB ")  # x11vnc's greeting
        assert http.get(f"/v1/sandboxes/{desk.vm_id}/desktop/control").json()[
            "human_in_control"]
        assert http.delete(f"/v1/sandboxes/{desk.vm_id}/desktop/control").json() == {
            "human_in_control": False}
        assert act(http, desk.vm_id, {"action": "cursor_position"}).status_code == 200
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            conn.recv(timeout=10)  # the person's connection was closed


def test_custom_resolution(http):
    r = http.post("/v1/sandboxes", json={"template": "cua", "resolution": "1024x768"},
                  timeout=120)
    assert r.status_code == 201, r.text
    vm = r.json()["vm_id"]
    try:
        assert screenshot(http, vm).size == (1024, 768)
    finally:
        http.delete(f"/v1/sandboxes/{vm}")


def test_sdk_drives_the_desktop(alice, desk):
    png = alice.screenshot(desk.vm_id, width=320)
    assert Image.open(io.BytesIO(png)).size == (320, 200)
    results = alice.desktop_actions(desk.vm_id, [{"action": "mouse_move", "coordinate": [7, 9]},
                                                 {"action": "cursor_position"}])
    assert results[1] == {"x": 7, "y": 9}
    assert alice.desktop_windows(desk.vm_id)["screen"] == {"width": 1280, "height": 800}
    assert alice.desktop_stream(desk.vm_id)["view_only"] is True


RFB_SECURITY_TYPES = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(s.recv(12))                 # the server's ProtocolVersion, echoed
n = s.recv(1)[0]
print(list(s.recv(n)))                # the security types it offers
"""


def test_vnc_servers_want_their_password(alice, desk):
    """A web page in the desktop's browser can reach loopback ports: neither VNC server lets
    anyone in without its per-sandbox password (VNC authentication, type 2; never None, 1)."""
    alice.files.write(desk.vm_id, "/tmp/rfb.py", RFB_SECURITY_TYPES.encode())
    for port in (5900, 5901):
        r = alice.run(desk.vm_id, f"python3 /tmp/rfb.py {port}")
        assert r.stdout.strip() == "[2]", (port, r.stdout, r.stderr)
