"""Templates as data: the list route, the documented sizes, create-time parameters."""

from __future__ import annotations

import pytest

DOCUMENTED = {"standard": (1, 0.5, 512), "browser": (1, 1.0, 1024), "cua": (1, 1.0, 2048)}


def test_templates_route_lists_sizes_and_contents(http):
    r = http.get("/v1/templates")
    assert r.status_code == 200
    by_name = {t["name"]: t for t in r.json()}
    assert set(by_name) == {"standard", "browser", "cua", "canvas"}
    for name, (vcpu, frac, mem) in DOCUMENTED.items():
        t = by_name[name]
        assert (t["vcpu"], t["cpu_fraction"], t["memory_mib"]) == (vcpu, frac, mem)
        assert t["built"] is True and t["contents"]
    assert "chromium" in by_name["browser"]["services"]
    assert by_name["cua"]["parameters"] == {"resolution": "1280x800"}
    assert "cdp" in by_name["browser"]["endpoints"]


def test_templates_route_needs_a_key(server):
    import httpx
    assert httpx.get(server.url + "/v1/templates").status_code == 401


@pytest.mark.parametrize("body", [
    {"template": "standard", "resolution": "1024x768"},
    {"template": "cua", "resolution": "12x12"},
    {"template": "cua", "resolution": "99999x768"},
    {"template": "cua", "resolution": "1024x768; rm -rf /"},
])
def test_bad_resolution_is_a_400_naming_it(http, body):
    r = http.post("/v1/sandboxes", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "resolution"
