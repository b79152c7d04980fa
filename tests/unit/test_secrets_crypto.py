"""The secret bundles' encryption at rest (e2a/secrets/crypto.py, docs/secrets.md): sealing and
opening, the master key file (0600, made once, refused when others could read it), the settings,
key rotation (E2A_SECRETS_OLD_KEYS and `e2a admin rotate-secrets-key`), and a ciphertext that
was moved to another row or tampered with."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from e2a.config import Settings, SettingsError
from e2a.secrets import crypto
from e2a.secrets.bundles import Bundles, SecretsError, rotate_all
from e2a.secrets.crypto import SealError, SecretBox, SecretsKeyError
from e2a.store import db as store
from tests.unit import stores

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "import sys; sys.argv[0] = 'e2a'; from e2a.cli import main; main()"
VALUES = {"LLM_API_KEY": "sk-test-0123456789", "LLM_MODEL": "gpt-x"}

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("E2A_"):
            monkeypatch.delenv(key)


def key() -> str:
    return Fernet.generate_key().decode()


# ---------------------------------------------------------------------- sealing


def test_round_trip_and_the_ciphertext_holds_nothing_readable():
    box = SecretBox([key()])
    token = box.seal("usr_a", "openai", VALUES)
    assert box.open("usr_a", "openai", token) == VALUES
    assert "sk-test" not in token and "LLM_API_KEY" not in token and "usr_a" not in token
    assert box.seal("usr_a", "openai", VALUES) != token  # a fresh IV each time


def test_a_ciphertext_moved_to_another_row_does_not_open():
    k = key()
    box = SecretBox([k])
    token = box.seal("usr_a", "openai", VALUES)
    for user, name in (("usr_b", "openai"), ("usr_a", "other"), ("usr_b", "other")):
        with pytest.raises(SealError, match="another bundle"):
            box.open(user, name, token)
    with pytest.raises(SealError):  # nor is it rotated into a fresh-looking one
        SecretBox([key(), k]).rotate("usr_b", "openai", token)


@pytest.mark.parametrize("where", [10, 40, -5])
def test_a_tampered_ciphertext_does_not_open(where):
    box = SecretBox([key()])
    token = box.seal("usr_a", "openai", VALUES)
    raw = bytearray(token.encode())
    raw[where] = ord("A") if raw[where] != ord("A") else ord("B")
    with pytest.raises(SealError, match="cannot be decrypted"):
        box.open("usr_a", "openai", raw.decode())
    for junk in ("", "not a token", token[:-10]):
        with pytest.raises(SealError):
            box.open("usr_a", "openai", junk)


def test_another_key_does_not_open_it():
    token = SecretBox([key()]).seal("usr_a", "openai", VALUES)
    with pytest.raises(SealError, match="cannot be decrypted"):
        SecretBox([key()]).open("usr_a", "openai", token)


# ---------------------------------------------------------------------- the master key


def test_key_file_is_made_once_with_mode_0600_even_with_umask_0(tmp_path):
    old = os.umask(0)
    try:
        box1 = SecretBox.from_settings(Settings(data_dir=tmp_path / "data"))
    finally:
        os.umask(old)
    path = tmp_path / "data" / crypto.KEY_FILE
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)
    first = path.read_bytes()
    Fernet(first.strip())
    box2 = SecretBox.from_settings(Settings(data_dir=tmp_path / "data"))
    assert path.read_bytes() == first  # not made again
    assert box2.open("u", "n", box1.seal("u", "n", VALUES)) == VALUES
    assert sorted(p.name for p in path.parent.iterdir()) == [crypto.KEY_FILE]  # no temp left


def test_concurrent_starts_agree_on_one_key(tmp_path):
    path = tmp_path / crypto.KEY_FILE
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(crypto.load_key_file(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [crypto.KEY_FILE]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_key_file_others_could_read_or_write_is_refused(tmp_path, mode):
    path = tmp_path / crypto.KEY_FILE
    crypto.load_key_file(path)
    os.chmod(path, mode)
    with pytest.raises(SecretsKeyError, match=f"mode {mode:04o}.*owner alone"):
        SecretBox.from_settings(Settings(data_dir=tmp_path))
    os.chmod(path, 0o400)  # owner-only read is fine
    SecretBox.from_settings(Settings(data_dir=tmp_path))


def test_a_symlinked_damaged_or_missing_key_file_is_refused(tmp_path):
    real = tmp_path / "elsewhere.key"
    crypto.load_key_file(real)
    link = tmp_path / crypto.KEY_FILE
    link.symlink_to(real)
    with pytest.raises(SecretsKeyError, match="regular file"):
        crypto.load_key_file(link)
    link.unlink()
    fd = os.open(link, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key\n")
    os.close(fd)
    with pytest.raises(SecretsKeyError, match="Fernet key"):
        crypto.load_key_file(link)
    with pytest.raises(SecretsKeyError, match="does not exist"):
        crypto.load_key_file(tmp_path / "none.key", create=False)


def test_the_setting_wins_and_no_file_is_made(tmp_path):
    k = key()
    box = SecretBox.from_settings(Settings(data_dir=tmp_path, secrets_key=k))
    assert SecretBox([k]).open("u", "n", box.seal("u", "n", VALUES)) == VALUES
    assert not (tmp_path / crypto.KEY_FILE).exists()


def test_settings_name_a_bad_key_without_showing_it(monkeypatch):
    monkeypatch.setenv("E2A_SECRETS_KEY", "hunter2-not-a-fernet-key")
    with pytest.raises(SettingsError) as e:
        Settings()
    assert e.value.problems == ["e2a: invalid setting E2A_SECRETS_KEY=<hidden>: must be a Fernet "
                                "key: urlsafe base64 of 32 bytes, as Fernet.generate_key() makes"]
    monkeypatch.setenv("E2A_SECRETS_KEY", key())
    monkeypatch.setenv("E2A_SECRETS_OLD_KEYS", f"{key()},hunter2")
    with pytest.raises(SettingsError) as e:
        Settings()
    [line] = e.value.problems
    assert line.startswith("e2a: invalid setting E2A_SECRETS_OLD_KEYS=<hidden>: ")
    assert "(key 2 of 2)" in line and "hunter2" not in line
    k1, k2 = key(), key()
    monkeypatch.setenv("E2A_SECRETS_OLD_KEYS", f" {k1} ,, {k2} ")
    s = Settings()
    assert s.secrets_old_keys == f"{k1},{k2}" and k1 not in repr(s)


# ---------------------------------------------------------------------- rotation


async def make_store(tmp_path: Path):
    return await stores.migrated(stores.sqlite_url(tmp_path))


async def test_rotation_old_keys_decrypt_and_after_rotate_the_new_key_alone_does(tmp_path):
    old, new = key(), key()
    engine, sessions, (ua, ub) = await make_store(tmp_path)
    before = Bundles(sessions, SecretBox([old]))
    await before.create(ua, "one", VALUES)
    await before.create(ub, "two", {"LLM_API_KEY": "sk-two"})

    # the new key current, the old one still accepted: everything opens, writes use the new key
    during = Bundles(sessions, SecretBox([new, old]))
    assert await during.resolve(ua, ["one"]) == VALUES
    await during.create(ua, "three", {"LLM_API_KEY": "sk-three"})
    with pytest.raises(SecretsError) as e:  # the new key alone cannot read the old rows yet
        await Bundles(sessions, SecretBox([new])).resolve(ua, ["one"])
    assert (e.value.status, e.value.code, e.value.field) == (500, "secret_unreadable", "secrets[0]")

    async with sessions() as db:
        done = await rotate_all(db, SecretBox([new, old]))
    assert (done.rotated, done.current, done.failed) == (2, 1, [])
    after = Bundles(sessions, SecretBox([new]))
    assert await after.resolve(ua, ["one"]) == VALUES
    assert await after.resolve(ub, ["two"]) == {"LLM_API_KEY": "sk-two"}
    assert await after.resolve(ua, ["three"]) == {"LLM_API_KEY": "sk-three"}
    async with sessions() as db:  # a second run has nothing to do
        done = await rotate_all(db, SecretBox([new, old]))
    assert (done.rotated, done.current, done.failed) == (0, 3, [])
    await engine.dispose()


async def test_a_ciphertext_moved_onto_another_tenants_row_is_refused(tmp_path):
    engine, sessions, (ua, ub) = await make_store(tmp_path)
    k = key()
    bundles = Bundles(sessions, SecretBox([k]))
    await bundles.create(ua, "llm", VALUES)
    await bundles.create(ub, "llm", {"LLM_API_KEY": "sk-bob"})
    c = sqlite3.connect(tmp_path / "e2a.db")  # a database writer copies alice's onto bob's row
    c.execute("UPDATE secret_bundles SET ciphertext = (SELECT ciphertext FROM secret_bundles "
              "WHERE user_id = ?) WHERE user_id = ?", (ua, ub))
    c.commit()
    c.close()
    with pytest.raises(SecretsError) as e:
        await bundles.resolve(ub, ["llm"])
    assert (e.value.status, e.value.code) == (500, "secret_unreadable")
    assert await bundles.resolve(ua, ["llm"]) == VALUES
    async with sessions() as db:  # nor does a rotation launder it
        done = await rotate_all(db, SecretBox([key(), k]))
    assert done.rotated == 1 and len(done.failed) == 1
    await engine.dispose()


def run_e2a(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("E2A_")}
    dirs = {"E2A_DATA_DIR": str(tmp_path), "E2A_RUN_DIR": str(tmp_path / "run"),
            "E2A_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**base, "PYTHONPATH": str(ROOT), **dirs, **env},
                          timeout=60)


async def test_admin_rotate_secrets_key_command(tmp_path):
    engine, sessions, (ua, _) = await make_store(tmp_path)
    file_key = crypto.load_key_file(tmp_path / crypto.KEY_FILE).decode()  # the default: a file
    await Bundles(sessions, SecretBox([file_key])).create(ua, "llm", VALUES)
    await engine.dispose()

    new = key()
    r = run_e2a(tmp_path, "admin", "rotate-secrets-key", E2A_SECRETS_KEY=new)
    assert r.returncode == 1 and "left as they are" in r.stderr  # the old key not given
    r = run_e2a(tmp_path, "admin", "rotate-secrets-key", E2A_SECRETS_KEY=new,
                E2A_SECRETS_OLD_KEYS=file_key)
    assert r.returncode == 0, r.stderr
    assert "re-encrypted: 1; already under the current key: 0" in r.stdout
    assert file_key not in r.stdout + r.stderr and new not in r.stdout + r.stderr

    engine = store.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'e2a.db'}")
    assert await Bundles(store.sessionmaker(engine), SecretBox([new])).resolve(ua, ["llm"]) \
        == VALUES
    await engine.dispose()

    r = run_e2a(tmp_path / "empty", "admin", "rotate-secrets-key")  # no key anywhere: no new one
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "empty" / crypto.KEY_FILE).exists()
