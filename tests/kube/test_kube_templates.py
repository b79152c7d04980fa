"""The browser, canvas and desktop templates on the Kubernetes backend: their images (the
template builder's, one layer with envd) imported into the test cluster, Chromium, or X and its
VNC servers, started by envd in a gVisor pod, driven through the same endpoints as on the
embedded backend."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from e2a.config import Settings
from e2a.kube import images
from e2a.sdk import E2A
from e2a.templates import recipes
from tests.conftest import goto, goto_once_served, wait_for
from tests.e2e.test_desktop import SENTENCE, _canvas_not_blank, act, center, open_window
from tests.kube.cluster import CLUSTER_DIR, NAMESPACE, ROOT_SHAPE, another_replica, replica_user

pytestmark = pytest.mark.kube  # one cluster per machine: run apart from xdist (Makefile)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def alice(cluster, kube_clients):
    # the browser's image (canvas runs it too), as an operator would push it to the registry
    images.import_to(Settings(envd=str(ROOT / "build/envd")), recipes.load("browser"),
                     str(cluster.bin / "ctr"), str(CLUSTER_DIR / "containerd/containerd.sock"))
    return kube_clients["alice"]


def test_a_browser_sandbox_is_driven_over_cdp(cluster, alice):
    _drive_browser(cluster, alice)


def test_a_canvas_sandbox_renders(alice):
    _render_canvas(alice)


def test_the_browser_templates_run_with_root_and_a_writable_image(cluster, kserver, alice):
    """By default Chromium writes only its profile (the home) and its cache (/tmp), with the
    image read-only, as `user`; with root given back (ROOT_SHAPE) both templates run too."""
    with another_replica(kserver, "rootbrowser", **ROOT_SHAPE) as srv, \
            E2A(srv.url, srv.create_user("rootbrowser@example.com")) as client:
        _drive_browser(cluster, client, read_only=False)
        _render_canvas(client)


def _drive_browser(cluster, client: E2A, read_only: bool = True) -> None:
    sb = client.create_sandbox("browser", idle_timeout_seconds=300)
    try:
        pod = cluster.json("get", "pod", sb.vm_id.replace("_", "-"), "-n", NAMESPACE)
        assert pod["spec"]["runtimeClassName"] == "gvisor"
        sandbox = pod["spec"]["containers"][0]
        assert sandbox["resources"]["limits"]["memory"] == "1056Mi"
        assert sandbox["securityContext"].get("readOnlyRootFilesystem", False) is read_only
        client.files.write(sb.vm_id, "/home/user/site/index.html",
                           b"<title>in a pod</title><p id=w>served inside</p>")
        client.run_background(sb.vm_id, "python3 -m http.server 8000 --bind 127.0.0.1",
                              cwd="/home/user/site")
        with sync_playwright() as p:
            browser = p.chromium.connect_over_cdp(client.cdp_url(sb.vm_id))
            page = (browser.contexts[0] if browser.contexts else browser.new_context()).new_page()
            goto_once_served(page, "http://127.0.0.1:8000/index.html")
            assert page.locator("#w").inner_text() == "served inside"
            assert page.title() == "in a pod"
            browser.close()
    finally:
        client.kill(sb.vm_id)


def _render_canvas(client: E2A) -> None:
    sb = client.create_sandbox("canvas", idle_timeout_seconds=300)
    try:
        png = client.render_canvas(sb.vm_id, html="<body style='background:#f00'>x</body>",
                                   width=120, height=90)
        img = Image.open(io.BytesIO(png))
        assert img.size == (120, 90)
        assert img.convert("RGB").getpixel((60, 80)) == (255, 0, 0)
        assert "/v1/canvas/" in client.canvas_view_url(sb.vm_id)
    finally:
        client.kill(sb.vm_id)


@pytest.fixture(scope="module")
def desktop_image(cluster):
    """The desktop's image (3.1 GB: about a minute of import), for its tests only."""
    images.import_to(Settings(envd=str(ROOT / "build/envd")), recipes.load("cua"),
                     str(cluster.bin / "ctr"), str(CLUSTER_DIR / "containerd/containerd.sock"))


def test_a_desktop_sandbox_is_driven_and_viewed_live(cluster, kserver, desktop_image):
    """The cua template in a pod: an editor typed into through the actions API saves what was
    typed; the live view (VNC through envd's relay, noVNC in a real Chromium) shows it. With a
    read-only root, as by default (X's socket in /tmp, the window manager's settings in the
    home), and with root and a writable image (ROOT_SHAPE)."""
    with httpx.Client(base_url=kserver.url, timeout=120, headers={
            "Authorization": f"Bearer {kserver.keys['alice']}"}) as http, \
            E2A(kserver.url, kserver.keys["alice"]) as client:
        _drive_desktop(cluster, client, http, live_view=True)
    with replica_user(kserver, "rootdesktop", **ROOT_SHAPE) as (http, client):
        _drive_desktop(cluster, client, http, read_only=False)


def _drive_desktop(cluster, client: E2A, http: httpx.Client, live_view: bool = False,
                   read_only: bool = True) -> None:
    sb = client.create_sandbox("cua", idle_timeout_seconds=300)
    vm = sb.vm_id
    try:
        pod = cluster.json("get", "pod", vm.replace("_", "-"), "-n", NAMESPACE)
        assert pod["spec"]["containers"][0]["securityContext"].get(
            "readOnlyRootFilesystem", False) is read_only
        client.files.write(vm, "/home/user/note.txt", b"")
        w = open_window(client, http, vm, "mousepad /home/user/note.txt", "note.txt")
        assert act(http, vm, {"action": "left_click", "coordinate": center(w)}).status_code == 200
        r = act(http, vm, {"action": "type", "text": SENTENCE}, {"action": "key", "text": "ctrl+s"})
        assert r.status_code == 200, r.text
        assert wait_for(lambda: client.files.read_text(vm, "/home/user/note.txt").rstrip("\n")
                        == SENTENCE, timeout=30)
        if not live_view:
            return
        r = http.post(f"/v1/sandboxes/{vm}/desktop/stream", json={"view_only": True})
        assert r.status_code == 200, r.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            goto(page, r.json()["url"])
            page.wait_for_selector("body[data-mode=view]", timeout=30_000)
            assert wait_for(lambda: _canvas_not_blank(page), timeout=20)
            browser.close()
    finally:
        client.kill(vm)
