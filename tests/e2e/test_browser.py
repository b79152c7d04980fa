"""The browser template: the real Playwright client, unmodified, drives the sandbox's Chromium
over CDP through e2a; the CDP URL's token is the only way in."""

from __future__ import annotations

import httpx
import websockets
import pytest
import websockets.sync.client as ws_client
from playwright.sync_api import sync_playwright

from tests.conftest import goto_once_served

SITE = ("<!doctype html><title>inside</title><h1 id=where>served inside</h1>"
        "<script>document.title = 'js ran ' + (6 * 7)</script>")


@pytest.fixture(scope="module")
def browser_sb(alice):
    sb = alice.create_sandbox("browser", idle_timeout_seconds=600)
    yield sb
    alice.kill(sb.vm_id)


def cdp_url(http, vm_id: str) -> str:
    r = http.get(f"/v1/sandboxes/{vm_id}/browser")
    assert r.status_code == 200, r.text
    return r.json()["cdp_url"]


def test_playwright_over_cdp_pages_inside_and_outside(alice, http, browser_sb, outside):
    vm = browser_sb.vm_id
    alice.files.write(vm, "/home/user/site/index.html", SITE.encode())
    alice.run_background(vm, "python3 -m http.server 8000 --bind 127.0.0.1",
                         cwd="/home/user/site")
    url = cdp_url(http, vm)
    assert url.startswith("ws://") and "/v1/browser/" in url
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(url)
        context = browser.contexts[0] if browser.contexts else browser.new_context()
        page = context.new_page()
        goto_once_served(page, "http://127.0.0.1:8000/index.html")
        assert page.locator("#where").inner_text() == "served inside"
        assert page.title() == "js ran 42"
        shot = page.screenshot()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 1000
        # a page of the test's own 'internet' host, and a download from it
        second = context.new_page()
        second.goto(f"http://{outside}/page.html")
        assert second.locator("#where").inner_text() == "served outside"
        # Chromium saves a download where Playwright tells it, inside the sandbox: the files
        # API reads it from there (Playwright's save_as copies on the client's machine).
        with second.expect_download() as dl:
            second.click("#dl")
        assert dl.value.suggested_filename == "file.txt"
        saved = str(dl.value.path())
        assert alice.files.read_text(vm, saved) == "downloaded from outside\n"
        browser.close()


def test_cdp_token_is_required_and_bound_to_its_sandbox(alice, http, browser_sb, server):
    url = cdp_url(http, browser_sb.vm_id)
    token = url.rsplit("/", 1)[1]
    base = server.url.replace("http", "ws", 1)
    for bad in (f"{base}/v1/browser/", f"{base}/v1/browser/x",
                f"{base}/v1/browser/{token[:-2]}ab", f"{base}/v1/browser/{token}x"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            ws_client.connect(bad, open_timeout=10)
        assert e.value.response.status_code in (401, 403), bad  # 403: no such route
    # the token works, without any API key
    with ws_client.connect(url, open_timeout=10, max_size=None) as conn:
        conn.send('{"id": 1, "method": "Browser.getVersion"}')
        assert "Chrome" in conn.recv(timeout=10)


def test_browser_route_for_others_and_other_templates(alice, http, browser_sb, server, keys,
                                                      sandbox):
    bob = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['bob']}"})
    with bob:
        assert bob.get(f"/v1/sandboxes/{browser_sb.vm_id}/browser").status_code == 404
    assert httpx.get(f"{server.url}/v1/sandboxes/{browser_sb.vm_id}/browser").status_code == 401
    r = http.get(f"/v1/sandboxes/{sandbox.vm_id}/browser")
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_template"


def test_playwright_inside_uses_the_system_chromium(alice, browser_sb):
    script = ("from playwright.sync_api import sync_playwright\n"
              "with sync_playwright() as p:\n"
              "    b = p.chromium.launch(args=['--no-sandbox'])\n"
              "    pg = b.new_page(); pg.set_content('<p id=x>scripted</p>')\n"
              "    print(pg.inner_text('#x')); b.close()\n")
    alice.files.write(browser_sb.vm_id, "/home/user/pw.py", script.encode())
    r = alice.run(browser_sb.vm_id, "python3 /home/user/pw.py", timeout=120)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "scripted"


def test_chromium_keeps_the_memory_limit(alice, browser_sb):
    r = alice.run(browser_sb.vm_id, "python3 -c 'b = bytearray(1400 * 1024 * 1024)'",
                  timeout=120)
    assert r.exit_code != 0  # killed inside: a 1 GiB sandbox cannot hold 1.4 GiB
    assert alice.get_sandbox(browser_sb.vm_id).state == "running"
    assert alice.run(browser_sb.vm_id, "echo alive").stdout.strip() == "alive"



