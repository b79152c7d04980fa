"""Fixtures of the end-to-end and security suites: a real server with real gVisor sandboxes,
one per xdist worker, shared by both suites."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest

from e2a.sdk import E2A
from tests.e2e.server import Server



def worker_index() -> int:
    """The xdist worker's number, shifted by E2A_TEST_WORKER_OFFSET so that two suites (two
    developers, or a helper beside the main run) can run on one machine without colliding."""
    offset = int(os.environ.get("E2A_TEST_WORKER_OFFSET", "0"))
    return offset + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def new_server(tag: str) -> Server:
    """Instance names and subnets differ per worker and per tag, so servers never collide."""
    w = worker_index()
    n = {"main": 0, "restart": 1, "pool": 2, "pg": 3, "core": 4, "disk": 5}[tag]
    return Server(instance=f"t{w}{n}", subnet=f"10.{210 + w}.{n * 16}.0/20",
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
def server():
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
    srv.cleanup()
    assert not any(leftovers.values()), f"host objects left behind: {leftovers}"


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
def sandbox(alice):
    sb = alice.create_sandbox("standard", idle_timeout_seconds=600)
    yield sb
    alice.kill(sb.vm_id)


def wait_for(predicate, timeout: float = 30, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
