"""Fixtures of the end-to-end and security suites: a real server with real gVisor sandboxes,
one per xdist worker, shared by both suites."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from e2a.sdk import E2A
from tests.e2e.mailbox import Mailbox, running as _mailbox
from tests.e2e.server import LlmMock, Server, llm_mock as _llm_mock
from tests.kube.cluster import cluster, kserver, kube_clients, wserver  # noqa: F401  (tests/kube, security)



def worker_index() -> int:
    """The xdist worker's number, shifted by E2A_TEST_WORKER_OFFSET so that two suites (two
    developers, or a helper beside the main run) can run on one machine without colliding."""
    offset = int(os.environ.get("E2A_TEST_WORKER_OFFSET", "0"))
    return offset + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def new_server(tag: str) -> Server:
    """Instance names and subnets differ per worker and per tag, so servers never collide."""
    w = worker_index()
    n = {"main": 0, "restart": 1, "pool": 2, "pg": 3, "core": 4, "disk": 5, "ws": 6, "wsbench": 7,
         "billing": 8, "quota": 9, "pause": 10, "pausesec": 11, "pausebench": 12, "kube": 13,
         "kubeprobe": 14, "kubepool": 15, "kubews": 16, "kubero": 17}[tag]
    return Server(instance=f"t{w}{n}", subnet=f"10.{210 + w + 8 * (n // 16)}.{n % 16 * 16}.0/20",
                  base=Path(f"/tmp/e2a-test/{w}-{tag}"))


@contextlib.contextmanager
def own_server(tag: str, **env: str):
    """A server of a test's own (not yet started), with nothing of it left afterwards."""
    srv = new_server(tag)
    srv.extra_env = env
    srv.cleanup()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def mailbox() -> Mailbox:
    """The SMTP server every test server mails its login codes to (tests/e2e/mailbox.py)."""
    from tests.e2e.mailbox import smtp_port
    with _mailbox(smtp_port()) as box:
        yield box


@pytest.fixture(scope="session")
def server(mailbox):
    srv = new_server("main")
    srv.cleanup()
    srv.start()
    yield srv
    # Sandboxes outlive their server on purpose (adopted at the next start), so destroy what the
    # tests left through the API; after that any host object of this instance is a leak.
    for key in srv.keys.values():
        with E2A(srv.url, key) as c:
            for sb in c.list_sandboxes():
                c.kill(sb.vm_id)
    srv.stop()
    leftovers = srv.host_objects()
    s3_server = srv.s3_server_pid()  # stopped with e2a once no workspace is mounted
    srv.cleanup()
    assert not any(leftovers.values()), f"host objects left behind: {leftovers}"
    assert s3_server is None, "the embedded S3 server outlived a clean stop with nothing mounted"


@pytest.fixture(scope="session")
def llm_mock() -> LlmMock:
    """The mock LLM providers every test server's agents call (tests/llm_mock/server.py)."""
    return _llm_mock()


@pytest.fixture(scope="session")
def keys(server):
    server.keys = {"alice": server.create_user(f"alice{worker_index()}@example.com"),
                   "bob": server.create_user(f"bob{worker_index()}@example.com")}
    return server.keys


@pytest.fixture(scope="session")
def alice(server, keys):
    with E2A(server.url, keys["alice"]) as c:
        yield c


@pytest.fixture(scope="session")
def bob(server, keys):
    with E2A(server.url, keys["bob"]) as c:
        yield c


@pytest.fixture
def http(server, keys):
    """Raw HTTP as alice, for status codes and bodies the SDK would turn into exceptions."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['alice']}"},
                      timeout=60) as c:
        yield c


@pytest.fixture
def bob_http(server, keys):
    """Raw HTTP as bob, the other tenant."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['bob']}"},
                      timeout=60) as c:
        yield c


@pytest.fixture
def kept(alice):
    """Sandboxes a test keeps (an agent's, kept after its task), deleted at its end."""
    vms: list[str] = []
    yield vms
    for vm in vms:
        alice.kill(vm)


@pytest.fixture
def sandbox(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield sb
    alice.kill(sb.vm_id)


@pytest.fixture(scope="session")
def outside(tmp_path_factory):
    """A test host in its own network namespace on a documentation range: the 'internet'. It
    serves a directory listing at / and a page and a file of the tests' own. Half of
    198.51.100.0/24 per worker: the machines here reach their package registries on
    203.0.113.80, and a route of the tests' own to 203.0.113.0/24 cut the host off them."""
    w = worker_index()
    low = 128 * (w % 2)
    host, there = f"198.51.100.{low + 1}/25", f"198.51.100.{low + 2}"
    ns, h, s = f"e2a-inet-test{w}", f"xinet{w}h", f"xinet{w}s"
    site = tmp_path_factory.mktemp("outside")
    (site / "page.html").write_text(
        "<!doctype html><title>outside</title><h1 id=where>served outside</h1>"
        "<a id=dl href=file.txt download>file</a>")
    (site / "file.txt").write_text("downloaded from outside\n")
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", h], capture_output=True)
    cmds = [["ip", "netns", "add", ns],
            ["ip", "link", "add", h, "type", "veth", "peer", "name", s, "netns", ns],
            ["ip", "addr", "add", host, "dev", h], ["ip", "link", "set", h, "up"],
            ["ip", "-n", ns, "addr", "add", f"{there}/25", "dev", s],
            ["ip", "-n", ns, "link", "set", s, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    for c in cmds:
        subprocess.run(c, check=True)
    srv = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-m", "http.server", "80",
                            "--bind", there, "--directory", str(site)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                                     f"import socket; socket.create_connection(('{there}', 80))"],
                                    capture_output=True).returncode == 0, timeout=10)
    yield there
    srv.kill()
    srv.wait()
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def goto(page, url: str, attempts: int = 5) -> None:
    """page.goto for host Chromium in these tests: other tests create and delete network
    interfaces all the time, and Chromium aborts a load on such a change
    (net::ERR_NETWORK_CHANGED); that, and only that, is tried again."""
    for attempt in range(attempts):
        try:
            page.goto(url)
            return
        except Exception as exc:
            if "ERR_NETWORK_CHANGED" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5)


def goto_once_served(page, url: str, attempts: int = 50) -> None:
    """page.goto of a server a sandbox started in the background a moment ago: tried again
    every 200 ms until it answers (the last failure is raised)."""
    for attempt in range(attempts):
        try:
            page.goto(url)
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            page.wait_for_timeout(200)


def wait_for(predicate, timeout: float = 30, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
