"""The canvas template: renders by the sandbox's own Chromium, and a view page that reloads
when the canvas changes."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from tests.conftest import goto


DRAWING = """<!doctype html><html><head><link rel=stylesheet href=style.css></head>
<body><div id=box></div><p id=label>{label}</p></body></html>"""
STYLE = ("html, body { margin: 0; background: rgb(0, 0, 255); }"
         "#box { position: absolute; left: 0; top: 0; width: 100px; height: 100px;"
         " background: rgb(255, 0, 0); } #label { position: absolute; top: 200px; color: white; }")


@pytest.fixture(scope="module")
def canvas_sb(alice):
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=600)
    alice.files.write(sb.vm_id, "/home/user/canvas/style.css", STYLE.encode())
    alice.files.write(sb.vm_id, "/home/user/canvas/index.html", DRAWING.format(label="v1").encode())
    yield sb
    alice.kill(sb.vm_id)


def close(pixel, want, tol=30) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, want))


def test_render_png_of_the_canvas(http, canvas_sb):
    r = http.post(f"/v1/sandboxes/{canvas_sb.vm_id}/canvas/render",
                  json={"width": 400, "height": 300, "format": "png"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert img.size == (400, 300)
    assert close(img.getpixel((50, 50)), (255, 0, 0))      # the box, its stylesheet applied
    assert close(img.getpixel((300, 150)), (0, 0, 255))    # the background


def test_render_pdf_and_html_string(http, canvas_sb):
    r = http.post(f"/v1/sandboxes/{canvas_sb.vm_id}/canvas/render",
                  json={"format": "pdf", "width": 800, "height": 600}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf" and r.content.startswith(b"%PDF-")
    html = ("<html><body style='margin:0;background:rgb(0,255,0)'>"
            "<script>setTimeout(() => document.body.style.background = 'rgb(255,255,0)', 300)"
            "</script></body></html>")
    r = http.post(f"/v1/sandboxes/{canvas_sb.vm_id}/canvas/render",
                  json={"html": html, "width": 200, "height": 100, "wait_ms": 1500},
                  timeout=120)
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert img.size == (200, 100) and close(img.getpixel((100, 50)), (255, 255, 0))


@pytest.mark.parametrize("body, field", [
    ({"path": "../../etc/passwd"}, "path"),
    ({"path": "index.html", "html": "<p>"}, "html"),
    ({"format": "gif"}, "format"),
    ({"width": 100000}, "width"),
])
def test_render_refuses_bad_input(http, canvas_sb, body, field):
    r = http.post(f"/v1/sandboxes/{canvas_sb.vm_id}/canvas/render", json=body)
    assert r.status_code in (400, 422), r.text
    assert field in (r.json()["error"].get("field") or "") + r.json()["error"]["message"]


def test_view_page_reloads_when_the_canvas_changes(alice, http, canvas_sb, server):
    vm = canvas_sb.vm_id
    url = http.get(f"/v1/sandboxes/{vm}/canvas").json()["view_url"]
    assert url.startswith(server.url) and "e2a_live_" not in url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        goto(page, url)
        frame = page.frame_locator("#canvas")
        assert frame.locator("#label").inner_text(timeout=20_000) == "v1"
        alice.files.write(vm, "/home/user/canvas/index.html", DRAWING.format(label="v2").encode())
        page.wait_for_function("document.body.dataset.reloads !== '0'", timeout=20_000)
        assert frame.locator("#label").inner_text(timeout=20_000) == "v2"
        browser.close()


def test_canvas_files_run_in_an_opaque_origin_and_need_the_token(http, canvas_sb, server):
    url = http.get(f"/v1/sandboxes/{canvas_sb.vm_id}/canvas").json()["view_url"]
    r = httpx.get(url + "files/index.html")
    assert r.status_code == 200 and ("v1" in r.text or "v2" in r.text)
    assert r.headers["content-security-policy"].startswith("sandbox")
    assert httpx.get(url.replace("/v1/canvas/", "/v1/canvas/x") + "files/index.html"
                     ).status_code == 401
    assert httpx.get(url + "files/..%2F..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    # a symlink out of the canvas is read as the sandbox user: no root-only file comes out
    http.post(f"/v1/sandboxes/{canvas_sb.vm_id}/commands",
              json={"cmd": "ln -sf /etc/shadow /home/user/canvas/shadow"})
    r = httpx.get(url + "files/shadow")
    assert r.status_code in (403, 404) and "root:" not in r.text



def test_sdk_renders_and_gives_the_view_url(alice, canvas_sb):
    png = alice.render_canvas(canvas_sb.vm_id, "index.html", width=120, height=90)
    assert Image.open(io.BytesIO(png)).size == (120, 90)
    assert "/v1/canvas/" in alice.canvas_view_url(canvas_sb.vm_id)


def test_an_html_string_renders_before_anything_is_drawn(alice):
    """A fresh canvas sandbox has no /home/user/canvas yet: the string's base URL is made."""
    sb = alice.create_sandbox("canvas", idle_timeout_seconds=120)
    try:
        png = alice.render_canvas(sb.vm_id, html="<body style='margin:0;background:#0f0'>",
                                  width=80, height=60)
        img = Image.open(io.BytesIO(png)).convert("RGB")
        assert img.size == (80, 60) and close(img.getpixel((40, 30)), (0, 255, 0))
        assert alice.files.stat(sb.vm_id, "/home/user/canvas").type == "dir"
    finally:
        alice.kill(sb.vm_id)
