"""Secret bundles in the store (e2a/secrets/bundles.py): what `resolve` gives a session and what
it refuses, the checks on values, and the listeners a PUT or DELETE tells (hot replace). The
HTTP routes are tested end to end in tests/e2e/test_secrets.py."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet

from e2a.secrets.bundles import MAX_PER_SESSION, Bundles, SecretsError
from e2a.secrets.crypto import SecretBox
from tests.unit import stores

pytestmark = pytest.mark.anyio
KEY = "sk-live-DO-NOT-SHOW-0123456789"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def env(tmp_path):
    engine, sessions, users = await stores.migrated(stores.sqlite_url(tmp_path))
    yield Bundles(sessions, SecretBox([Fernet.generate_key()])), users
    await engine.dispose()


async def refused(coro, status: int, code: str, field: str | None) -> SecretsError:
    with pytest.raises(SecretsError) as e:
        await coro
    assert (e.value.status, e.value.code, e.value.field) == (status, code, field), e.value.message
    assert KEY not in e.value.message
    return e.value


async def test_resolve_merges_and_refuses(env):
    b, (ua, ub) = env
    await b.create(ua, "openai", {"LLM_API_KEY": KEY, "LLM_BASE_URL": "https://api.x.test/v1"})
    await b.create(ua, "model", {"LLM_API_KEY": KEY, "LLM_MODEL": "gpt-x"})   # the same key
    await b.create(ua, "other", {"LLM_API_KEY": "sk-other", "EXTRA": "1"})
    await b.create(ub, "bobs", {"LLM_API_KEY": "sk-bob"})

    assert await b.resolve(ua, []) == {}
    assert await b.resolve(ua, ["openai", "model"]) == {
        "LLM_API_KEY": KEY, "LLM_BASE_URL": "https://api.x.test/v1", "LLM_MODEL": "gpt-x"}
    e = await refused(b.resolve(ua, ["openai", "other"]), 400, "secret_collision", "secrets")
    assert "LLM_API_KEY" in e.message and "'openai'" in e.message and "'other'" in e.message
    assert "sk-other" not in e.message
    await refused(b.resolve(ua, ["openai", "nope"]), 404, "secret_not_found", "secrets[1]")
    await refused(b.resolve(ua, ["bobs"]), 404, "secret_not_found", "secrets[0]")  # bob's
    await refused(b.resolve(ub, ["openai"]), 404, "secret_not_found", "secrets[0]")
    await refused(b.resolve(ua, ["model", "model"]), 400, "invalid_field", "secrets")
    await refused(b.resolve(ua, ["x"] * (MAX_PER_SESSION + 1)), 400, "too_many_secrets",
                  "secrets")
    many = [f"b{i}" for i in range(MAX_PER_SESSION)]
    for name in many:
        await b.create(ua, name, {"LLM_API_KEY": KEY, name.upper(): name})
    merged = await b.resolve(ua, many)
    assert len(merged) == MAX_PER_SESSION + 1 and merged["LLM_API_KEY"] == KEY


async def test_values_checked_naming_the_key_never_the_value(env):
    b, (ua, _) = env
    ok = {"LLM_API_KEY": KEY}
    await refused(b.create(ua, "x", {"LLM_MODEL": "m"}), 400, "missing_field", "values.LLM_API_KEY")
    await refused(b.create(ua, "x", {"LLM_API_KEY": " "}), 400, "invalid_field",
                  "values.LLM_API_KEY")
    await refused(b.create(ua, "x", {"LLM_API_KEY": 5}), 400, "invalid_field", "values.LLM_API_KEY")
    await refused(b.create(ua, "x", [KEY]), 400, "invalid_field", "values")
    await refused(b.create(ua, "x", {**ok, "lower": "v"}), 400, "invalid_field", "values.lower")
    await refused(b.create(ua, "x", {**ok, "A\n": "v"}), 400, "invalid_field", "values.A\n")
    e = await refused(b.create(ua, "x", {**ok, "K" * 129: "v"}), 400, "invalid_field",
                      "values." + "K" * 64 + "...")
    assert "K" * 65 not in e.message
    await refused(b.create(ua, "x", {**ok, "X": "\ud800"}), 400, "invalid_field", "values.X")
    await refused(b.create(ua, "x", {**ok, "X": "é" * 32769}), 400, "value_too_large", "values.X")
    await b.create(ua, "edge", {**ok, "X": "é" * 32768, "K" * 128: ""})  # 65536 bytes: allowed
    await refused(b.create(ua, "x", {**ok, **{f"K{i}": "v" for i in range(50)}}), 400,
                  "too_many_keys", "values")
    for url in ("ftp://h/", "https://", "not a url", "https://h:99999/", "", "javascript:x",
                "https://h/\n"):
        await refused(b.create(ua, "x", {**ok, "LLM_BASE_URL": url}), 400, "invalid_field",
                      "values.LLM_BASE_URL")
    await b.create(ua, "local", {**ok, "LLM_BASE_URL": "http://127.0.0.1:8080/v1"})  # checked later
    for name in ("", "-a", "A", "a_b", "a" * 64, "a\n", "ä"):
        await refused(b.create(ua, name, ok), 400, "invalid_field", "name")
    await b.create(ua, "a" * 63, ok)


async def test_names_versions_and_limits(env):
    b, (ua, ub) = env
    info = await b.create(ua, "llm", {"LLM_API_KEY": KEY, "B": "2", "A": "1"})
    assert (info.name, info.keys, info.version) == ("llm", ["A", "B", "LLM_API_KEY"], 1)
    await refused(b.create(ua, "llm", {"LLM_API_KEY": KEY}), 409, "secret_exists", "name")
    await b.create(ub, "llm", {"LLM_API_KEY": "sk-bob"})  # the same name, another tenant
    info2 = await b.replace(ua, "llm", {"LLM_API_KEY": "sk-new"})
    assert (info2.keys, info2.version, info2.created_at) == (["LLM_API_KEY"], 2, info.created_at)
    assert info2.updated_at >= info.updated_at
    assert await b.resolve(ua, ["llm"]) == {"LLM_API_KEY": "sk-new"}
    assert await b.resolve(ub, ["llm"]) == {"LLM_API_KEY": "sk-bob"}
    assert (await b.get(ua, "llm")).version == 2
    await refused(b.replace(ua, "nope", {"LLM_API_KEY": KEY}), 404, "secret_not_found", "name")
    await refused(b.get(ua, "nope"), 404, "secret_not_found", "name")
    await refused(b.delete(ua, "nope"), 404, "secret_not_found", "name")
    for i in range(49):
        await b.create(ua, f"n{i}", {"LLM_API_KEY": KEY})
    assert len(await b.list(ua)) == 50 and len(await b.list(ub)) == 1
    await refused(b.create(ua, "fifty-one", {"LLM_API_KEY": KEY}), 400, "too_many_bundles", "name")
    await b.delete(ua, "n0")
    await b.create(ua, "fifty-one", {"LLM_API_KEY": KEY})
    assert [i.name for i in await b.list(ub)] == ["llm"]


async def test_listeners_hear_of_a_put_or_delete_after_commit(env, caplog):
    b, (ua, _) = env
    heard = []

    async def listener(user_id, name):
        heard.append((user_id, name, await b.resolve(user_id, [name]) if name == "llm"
                      and len(heard) == 0 else None))

    async def broken(user_id, name):
        raise RuntimeError(f"went wrong with {KEY}")

    b.on_change(broken)
    b.on_change(listener)
    await b.create(ua, "llm", {"LLM_API_KEY": "sk-old"})
    assert heard == []  # a create changes no running session
    with caplog.at_level(logging.INFO, logger="e2a.secrets"):
        info = await b.replace(ua, "llm", {"LLM_API_KEY": KEY})
        await b.delete(ua, "llm")
    assert info.version == 2  # the broken listener did not fail the PUT
    assert heard == [(ua, "llm", {"LLM_API_KEY": KEY}), (ua, "llm", None)]  # the new values
    assert "RuntimeError" in caplog.text and "broken" in caplog.text
    assert KEY not in caplog.text and "sk-old" not in caplog.text
