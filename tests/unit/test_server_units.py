"""Pure server logic: addressing, firewall rules, recipes, request schemas, errors, auth cache."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx

import pytest
from pydantic import ValidationError

from e2a import auth
from e2a.api.app import create_app
from e2a.api.schemas import CommandRequest, CreateSandbox, reserved_env_key
from e2a.network.firewall import Firewall
from e2a.network.links import Addressing
from e2a.templates import recipes


def test_addressing_gives_disjoint_30s_and_short_names():
    a = Addressing("e2a", "10.201.0.0/16")
    assert a.slots == 16384
    seen = set()
    for slot in (0, 1, 2, 16383):
        link = a.link(slot, "sbx_abc")
        assert len(link.host_if) <= 15  # Linux interface name limit
        host, sb = ipaddress.ip_address(link.host_ip), ipaddress.ip_address(link.sandbox_ip)
        assert sb == host + 1
        net = ipaddress.ip_network(f"{link.host_ip}/30", strict=False)
        assert sb in net and net not in seen
        seen.add(net)
    with pytest.raises(ValueError):
        a.link(16384, "sbx_abc")


def test_firewall_ruleset_isolates_sandboxes():
    fw = Firewall("e2a", "10.201.0.0/16", egress_port=8334)
    fw.dns = ["192.0.2.53"]
    rules = fw.ruleset(internet=["e2a-7"])
    # the egress proxy's port: open to sandboxes only, before the drop of all else from them
    assert "ct count over 32 } drop" in rules  # connections per sandbox, bounded
    assert rules.index('tcp dport 8334 iifname "e2a-*" accept') < rules.index(
        "tcp dport 8334 ct state != established drop") < rules.index('iifname "e2a-*" drop')
    assert 'iifname "e2a-*" drop' in rules                      # nothing from a sandbox to the host
    assert 'oifname "e2a-*" drop' in rules                      # nothing into a sandbox from another
    assert "elements = { e2a-7 }" in rules                     # internet on for this link only
    # an allow-list: whatever is not in the set is dropped before DNS or anything else
    cut = rules.index('iifname "e2a-*" iifname != @internet drop')
    assert cut < rules.index("udp dport 53 accept")
    assert "elements" not in fw.ruleset(internet=[])
    assert "10.0.0.0/8" in rules and "169.254.0.0/16" in rules and "127.0.0.0/8" in rules
    assert "masquerade" in rules


def test_recipe_hash_follows_content():
    r = recipes.load("standard")
    assert r is not None and r.memory_mib == 512 and r.cpu_quota_us == 50_000
    assert len(r.content_hash) == 16
    assert recipes.load("nope") is None
    assert "standard" in recipes.available()


def test_a_recipes_writable_paths_are_checked():
    """What a read-only root keeps writable (E2A_KUBE_READ_ONLY_ROOT): /tmp and /var/tmp unless
    the recipe says; a path that would shadow the home, the root or a kernel filesystem, or is
    not a normal absolute path, makes the recipe unusable."""
    assert recipes.load("standard").writable == ("/tmp", "/var/tmp")
    assert all(recipes.load(t).read_only_root for t in ("standard", "browser", "canvas"))
    base = {"name": "x", "vcpu": 1, "cpu_fraction": 1.0, "memory_mib": 256}
    assert recipes._parse("x", {**base, "writable": ["/tmp", "/var/lib/xkb"]}).writable \
        == ("/tmp", "/var/lib/xkb")
    assert not recipes._parse("x", {**base, "read_only_root": False}).read_only_root
    for bad in ("tmp", "/", "/tmp/../etc", "/tmp/", "/home/user", "/home", "/home/user/x",
                "//home/user", "//proc", "//tmp",
                "/proc", "/dev/shm", ["/tmp", "/tmp"], 7):
        with pytest.raises(ValueError, match="writable"):
            recipes._parse("x", {**base, "writable": bad if isinstance(bad, list) else [bad]})


def test_schemas_refuse_bad_input():
    with pytest.raises(ValidationError):
        CreateSandbox(template="standard", idle_timeout_seconds=0)
    with pytest.raises(ValidationError):
        CreateSandbox(template="standard", max_lifetime_seconds=7201)
    with pytest.raises(ValidationError):
        CreateSandbox(template="standard", env_vars={"A": "nul\x00"})
    with pytest.raises(ValidationError):
        CreateSandbox(template="standard", surprise=1)
    with pytest.raises(ValidationError):
        CommandRequest(cmd="true", user="Root; rm")
    assert reserved_env_key("E2A_ANYTHING") and reserved_env_key("home")
    assert not reserved_env_key("PATH")


def test_key_cache_expires():
    cache = auth.KeyCache(ttl=10)
    caller = auth.Caller(id="usr_a", key_id="key_a")
    cache.put("e2a_live_x", caller)
    assert cache.get("e2a_live_x") == caller
    assert cache.get("e2a_live_y") is None
    cache = auth.KeyCache(ttl=-1)
    cache.put("e2a_live_x", caller)
    assert cache.get("e2a_live_x") is None


def test_error_shape_without_runtime():
    async def calls():
        transport = httpx.ASGITransport(app=create_app(with_runtime=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://e2a") as client:
            return (await client.get("/nowhere"), await client.put("/health"),
                    await client.post("/v1/sandboxes", content=b"x" * 10_000_000))

    missing, wrong_method, anonymous = asyncio.run(calls())
    # a /v1 request without a key is refused before its body is read
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"code", "message", "field"}
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_the_e2a_image_cache_keeps_the_archives_used_last(tmp_path):
    """Each change to e2a's sources is a new image archive of ~430 MB: the cache keeps three."""
    import os

    from e2a.deploy import image
    for i in range(5):
        a = tmp_path / f"e2a-{i:016x}.tar"
        a.write_bytes(b"x")
        os.utime(a, (1000 + i, 1000 + i))
    os.utime(tmp_path / f"e2a-{0:016x}.tar", (2000, 2000))  # the oldest, used again just now
    (tmp_path / "build.log").write_text("kept")
    image.prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "build.log", f"e2a-{0:016x}.tar", f"e2a-{3:016x}.tar", f"e2a-{4:016x}.tar"]
