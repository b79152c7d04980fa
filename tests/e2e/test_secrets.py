"""Secret bundles over HTTP against a real `e2a serve` (docs/secrets.md): create, list, get,
replace, delete; the limits, each a 400 naming its field; one tenant's bundles invisible to
another; and no value ever leaving: not in any answer (every response's raw text and headers are
searched), not in the server's database file in clear, not in its log. No sandbox is needed.

Each test works as fresh tenants of its own, so bundles other tests (or schemathesis) made for
alice and bob cannot push these over the per-tenant limit."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import httpx
import pytest

from tests.conftest import worker_index

BASE = "/v1/tenants/me/secrets"
SHAPE = {"name", "keys", "version", "created_at", "updated_at"}

# Every value this module sends, accepted or refused: none may come back out.
SENT: set[str] = set()


def secret(tag: str = "") -> str:
    value = f"sk-e2asecret-{tag}{uuid.uuid4().hex}"
    SENT.add(value)
    return value


class Tenant:
    """A new user on the test server, over raw HTTP; every response is kept for the final scan."""

    responses: list[str] = []

    def __init__(self, server, label: str):
        key = server.create_user(f"sec-{label}-{worker_index()}-{uuid.uuid4().hex[:8]}@example.com")
        self.http = httpx.Client(base_url=server.url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"},
                                 event_hooks={"response": [self._keep]})

    def _keep(self, r: httpx.Response) -> None:
        r.read()
        Tenant.responses.append(f"{r.status_code} {r.headers!r} {r.text}")

    def __getattr__(self, name):
        return getattr(self.http, name)


@pytest.fixture
def tenant(server):
    t = Tenant(server, "a")
    yield t
    t.http.close()


@pytest.fixture
def other(server):
    t = Tenant(server, "b")
    yield t
    t.http.close()


def error(r: httpx.Response, status: int, code: str | None, field: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    assert err["field"] == field, err
    return err


def test_create_list_get_put_delete(tenant):
    key, base_url = secret("crud"), "https://llm.example.com/v1"
    r = tenant.post(BASE, json={"name": "openai-prod", "values": {
        "LLM_API_KEY": key, "LLM_BASE_URL": base_url, "LLM_MODEL": "gpt-x"}})
    assert r.status_code == 201, r.text
    made = r.json()
    assert set(made) == SHAPE
    assert (made["name"], made["keys"], made["version"]) == (
        "openai-prod", ["LLM_API_KEY", "LLM_BASE_URL", "LLM_MODEL"], 1)
    assert made["created_at"] == made["updated_at"]

    r = tenant.post(BASE, json={"name": "openai-prod", "values": {"LLM_API_KEY": secret()}})
    error(r, 409, "secret_exists", "name")

    assert tenant.get(BASE).json() == {"secrets": [made]}
    assert tenant.get(f"{BASE}/openai-prod").json() == made

    key2 = secret("rotated")
    r = tenant.put(f"{BASE}/openai-prod", json={"values": {"LLM_API_KEY": key2, "EXTRA_HEADER": "x"}})
    assert r.status_code == 200, r.text
    put = r.json()
    assert set(put) == SHAPE
    assert (put["keys"], put["version"], put["created_at"]) == (
        ["EXTRA_HEADER", "LLM_API_KEY"], 2, made["created_at"])  # the whole set replaced
    assert put["updated_at"] >= made["updated_at"]
    assert tenant.get(f"{BASE}/openai-prod").json() == put
    # the create's body works too, if its name is the path's; a rename is refused
    r = tenant.put(f"{BASE}/openai-prod", json={"name": "openai-prod",
                                                  "values": {"LLM_API_KEY": secret()}})
    assert r.status_code == 200 and r.json()["version"] == 3
    r = tenant.put(f"{BASE}/openai-prod", json={"name": "renamed",
                                                  "values": {"LLM_API_KEY": secret()}})
    error(r, 400, "invalid_field", "name")

    error(tenant.put(f"{BASE}/nope", json={"values": {"LLM_API_KEY": secret()}}),
          404, "secret_not_found", "name")
    error(tenant.get(f"{BASE}/nope"), 404, "secret_not_found", "name")

    r = tenant.delete(f"{BASE}/openai-prod")
    assert r.status_code == 204 and r.content == b""
    error(tenant.get(f"{BASE}/openai-prod"), 404, "secret_not_found", "name")
    error(tenant.delete(f"{BASE}/openai-prod"), 404, "secret_not_found", "name")
    assert tenant.get(BASE).json() == {"secrets": []}
    # deleted, the name is free again
    assert tenant.post(BASE, json={"name": "openai-prod",
                                   "values": {"LLM_API_KEY": secret()}}).json()["version"] == 1


def test_limits_each_a_400_naming_its_field(tenant):
    def create(name="limits", **values):
        return tenant.post(BASE, json={"name": name, "values": values})

    ok = {"LLM_API_KEY": secret("limits")}
    error(create(**{**ok, **{f"K{i}": "v" for i in range(50)}}), 400, "too_many_keys", "values")
    error(create(**ok, BIG="x" * 65537), 400, "value_too_large", "values.BIG")
    error(create(**ok, BIG="€" * 21846), 400, "value_too_large", "values.BIG")  # 65538 bytes
    error(create(LLM_MODEL="m"), 400, "missing_field", "values.LLM_API_KEY")
    error(create(LLM_API_KEY=""), 400, "invalid_field", "values.LLM_API_KEY")
    error(create(**ok, lower_case="v"), 400, "invalid_field", "values.lower_case")
    error(create(**ok, N=5), 400, "invalid_field", "values.N")
    error(create(**ok, LLM_BASE_URL="file:///etc/passwd"), 400, "invalid_field",
          "values.LLM_BASE_URL")
    err = error(create(**{**ok, "K" * 5000: "v"}), 400, "invalid_field", "values." + "K" * 64 + "...")
    assert "K" * 65 not in err["message"]
    for bad in ("", "Upper", "-dash", "a" * 64, "under_score", "dot.ted", "spa ce", "a\n"):
        error(create(name=bad, **ok), 400, "invalid_field", "name")
    error(tenant.post(BASE, json={"values": ok}), 400, "missing_field", "name")
    error(tenant.post(BASE, json={"name": "x"}), 400, "missing_field", "values")
    error(tenant.post(BASE, json={"name": "x", "values": [1]}), 400, "invalid_field", "values")

    # at the limits exactly: 50 keys, a value of 65536 bytes, a name of 63
    r = create(name="a" * 63, **{**ok, **{f"K{i}": "€" * 21845 + "x" for i in range(49)}})
    assert r.status_code == 201, r.text[:300]
    assert len(r.json()["keys"]) == 50

    # 50 bundles per tenant, exactly, even when the last ones are asked for all at once
    for i in range(44):
        assert create(name=f"b{i}", **ok).status_code == 201
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(lambda i: create(name=f"c{i}", **ok).status_code, range(10)))
    assert codes == [201] * 5 + [400] * 5, codes
    assert len(tenant.get(BASE).json()["secrets"]) == 50
    error(create(name="fifty-one", **ok), 400, "too_many_bundles", "name")


def test_tenants_never_see_each_others_bundles(tenant, other):
    mine = secret("alice")
    made = tenant.post(BASE, json={"name": "shared-name", "values": {"LLM_API_KEY": mine}}).json()

    assert other.get(BASE).json() == {"secrets": []}
    error(other.get(f"{BASE}/shared-name"), 404, "secret_not_found", "name")
    error(other.put(f"{BASE}/shared-name", json={"values": {"LLM_API_KEY": secret()}}),
          404, "secret_not_found", "name")
    error(other.delete(f"{BASE}/shared-name"), 404, "secret_not_found", "name")
    assert tenant.get(f"{BASE}/shared-name").json() == made  # untouched

    # the same name under the other tenant is its own bundle
    r = other.post(BASE, json={"name": "shared-name", "values": {"LLM_API_KEY": secret("bob"),
                                                                  "ONLY_BOB": "1"}})
    assert r.status_code == 201, r.text
    assert other.put(f"{BASE}/shared-name", json={"values": {"LLM_API_KEY": secret()}}) \
        .json()["version"] == 2
    assert tenant.get(f"{BASE}/shared-name").json() == made
    assert other.delete(f"{BASE}/shared-name").status_code == 204
    assert tenant.get(f"{BASE}/shared-name").json() == made


def test_refused_requests_do_not_echo_values(tenant):
    """Pydantic's validation errors name a field; none may carry the input back."""
    v = secret("refused")
    bodies = [
        {"name": "echo", "values": {"LLM_API_KEY": v}, "unexpected": v},
        {"name": "echo", "values": {"LLM_API_KEY": {"nested": v}}},
        {"name": "echo", "values": {"LLM_API_KEY": [v]}},
        {"name": [v], "values": {"LLM_API_KEY": v}},
        {"name": v.upper(), "values": {"LLM_API_KEY": v}},
        {"name": "echo", "values": v},
        {"name": "echo", "values": {"LLM_API_KEY": v, "LLM_BASE_URL": "ftp://" + v}},
        {"name": "echo", "values": {"LLM_API_KEY": v, "HUGE": v * 3000}},
        [v],
    ]
    for body in bodies:
        r = tenant.post(BASE, json=body)
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert v not in r.text
    r = tenant.post(BASE, content='{"name": "echo", "values": {"LLM_API_KEY": "' + v + '"',
                    headers={"content-type": "application/json"})
    error(r, 400, "invalid_json", None)
    r = tenant.put(f"{BASE}/echo", json={"values": {"LLM_API_KEY": v}, "other": v})
    assert r.status_code == 400 and v not in r.text
    r = tenant.put(f"{BASE}/echo", json={"values": {"LLM_API_KEY": {"x": v}}})
    assert r.status_code in (400, 404) and v not in r.text


def test_no_value_in_any_answer_the_database_or_the_log(server, tenant):
    """Every value this process sent so far (all of them when the module runs in order on one
    worker), and those sent here, is searched for."""
    v = secret("at-rest")
    r = tenant.post(BASE, json={"name": "at-rest", "values": {"LLM_API_KEY": v, "NOTE": v[::-1]}})
    assert r.status_code == 201
    SENT.add(v[::-1])
    tenant.put(f"{BASE}/at-rest", json={"values": {"LLM_API_KEY": secret("at-rest-2")}})
    tenant.get(BASE), tenant.get(f"{BASE}/at-rest")

    answers = "\n".join(Tenant.responses)
    for value in SENT:
        assert value not in answers

    data = server.base / "data"
    stored = b"".join(p.read_bytes() for p in data.glob("e2a.db*"))  # the WAL and shm too
    assert b"at-rest" in stored and b"LLM_API_KEY" in stored  # names and key names are there
    log = (server.base / "server.log").read_bytes()
    for value in SENT:
        for form in (value.encode(), json.dumps(value).encode()):
            assert form not in stored, "a value is in the database in clear"
            assert form not in log, "a value is in the server's log"
    assert b"sk-e2asecret" not in stored + log
