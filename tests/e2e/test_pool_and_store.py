"""The warm pool hands out pre-started sandboxes; the store works on PostgreSQL as on SQLite."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import httpx
import pytest

from e2a.sdk import E2A
from tests.conftest import own_server, wait_for


def pool_count(srv) -> int:
    return httpx.get(srv.url + "/health").json()["pool"].get("standard", 0)


@pytest.fixture
def pool_server():
    with own_server("pool", E2A_POOL_SIZES='{"standard": 2}') as srv:
        srv.start()
        yield srv


def test_warm_pool_hands_out_and_refills(pool_server):
    srv = pool_server
    key = srv.create_user("pool@example.com")
    other = srv.create_user("pool-other@example.com")
    wait_for(lambda: pool_count(srv) == 2, timeout=60)
    with E2A(srv.url, key) as c, E2A(srv.url, other) as o:
        assert c.list_sandboxes() == []  # pooled sandboxes belong to nobody yet
        a = c.create_sandbox("standard", env_vars={"FROM_POOL": "yes"}, metadata={"k": "v"},
                             internet=False, idle_timeout_seconds=30)
        assert pool_count(srv) <= 1
        assert a.state == "running" and a.metadata == {"k": "v"} and a.internet is False
        assert c.run(a.vm_id, "echo $FROM_POOL").stdout == "yes\n"
        assert any("warm pool" in line.message for line in c.logs(a.vm_id))
        # internet: false holds for a pooled sandbox too: its link left the firewall's
        # allow-list (which keeps the warm sandboxes, started with internet on)
        host_if = host_if_of(srv, c, a.vm_id)
        assert host_if not in allowed(srv)
        # handed to alice only
        assert [s.vm_id for s in c.list_sandboxes()] == [a.vm_id]
        assert o.list_sandboxes() == []
        wait_for(lambda: pool_count(srv) == 2, timeout=60)
        assert len(allowed(srv)) == 2
        c.kill(a.vm_id)
        assert host_if not in allowed(srv)
        # a pooled sandbox takes the create's on_idle and auto_resume, and pauses and resumes
        # like a cold one (its config, token and address are the pool's)
        b = c.create_sandbox("standard", env_vars={"FROM_POOL": "b"}, on_idle="pause",
                             auto_resume=True, idle_timeout_seconds=600)
        assert any("warm pool" in line.message for line in c.logs(b.vm_id))
        assert (b.on_idle, b.auto_resume) == ("pause", True)
        assert (c.get_sandbox(b.vm_id).on_idle, c.get_sandbox(b.vm_id).auto_resume) == \
            ("pause", True)
        assert c.pause(b.vm_id).state == "paused"
        assert c.run(b.vm_id, "echo $FROM_POOL").stdout == "b\n"  # woken by the call
        assert c.get_sandbox(b.vm_id).state == "running"
        c.kill(b.vm_id)
    srv.stop()
    # the pool's own sandboxes are adopted at the next start, or destroyed by cleanup
    srv.cleanup()
    assert not any(srv.host_objects().values())


def allowed(srv) -> list[str]:
    """The interfaces in the instance's internet allow-list."""
    out = subprocess.run(["nft", "-j", "list", "set", "inet", srv.instance, "internet"],
                         capture_output=True, text=True, check=True).stdout
    return next(i["set"].get("elem", []) for i in json.loads(out)["nftables"] if "set" in i)


def host_if_of(srv, client, vm_id: str) -> str:
    """A sandbox's host interface, from the address its log reports."""
    line = next(x.message for x in client.logs(vm_id) if x.message.startswith("running (ip "))
    ip = ipaddress.ip_address(line.split()[2].rstrip(","))
    slot = (int(ip) - int(ipaddress.ip_network(srv.subnet).network_address)) // 4
    return f"{srv.instance}-{slot}"


@pytest.fixture
def pg_server():
    url = os.environ.get("E2A_TEST_PG_URL")
    if not url:
        pytest.skip("E2A_TEST_PG_URL not set (make test starts PostgreSQL and sets it)")
    dsn = url.replace("+asyncpg", "")
    subprocess.run(["psql", dsn, "-qc", "drop schema public cascade; create schema public"],
                   check=True, capture_output=True)
    with own_server("pg", E2A_DATABASE_URL=url) as srv:
        yield srv


def test_postgresql_store(pg_server):
    srv = pg_server
    srv.start()
    key = srv.create_user("pg@example.com")
    with E2A(srv.url, key) as c:
        sb = c.create_sandbox("standard", metadata={"db": "postgres"}, idle_timeout_seconds=600)
        assert c.run(sb.vm_id, "echo on-postgres").stdout == "on-postgres\n"
        assert [s.vm_id for s in c.list_sandboxes(metadata={"db": "postgres"})] == [sb.vm_id]
        paused = c.create_sandbox("standard", idle_timeout_seconds=600)
        c.run(paused.vm_id, "echo kept > /tmp/f")
        assert c.pause(paused.vm_id).disk_bytes > 0
    srv.stop()
    srv.start()  # migrations run again (no-op) and the sandbox is adopted from PostgreSQL
    with E2A(srv.url, key) as c:
        assert c.get_sandbox(sb.vm_id).state == "running"
        c.kill(sb.vm_id)
        # a paused sandbox too, and resumes from its checkpoint
        assert c.get_sandbox(paused.vm_id).state == "paused"
        assert c.resume(paused.vm_id).state == "running"
        assert c.files.read_text(paused.vm_id, "/tmp/f") == "kept\n"
        c.kill(paused.vm_id)
        assert c.get_sandbox(sb.vm_id).state == "destroyed"
    out = subprocess.run(["psql", os.environ["E2A_TEST_PG_URL"].replace("+asyncpg", ""), "-tAc",
                          f"select state from sandboxes where id = '{sb.vm_id}'"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "destroyed"
