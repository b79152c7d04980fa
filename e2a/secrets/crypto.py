"""The secret bundles' encryption at rest: Fernet (AES-128-CBC + HMAC-SHA256) under one master
key, with earlier keys still accepted for decryption during a rotation (MultiFernet).

The plaintext of a row is JSON {"user_id", "name", "values"} and `open` checks the first two
against the row it was read from, so a ciphertext copied onto another tenant's row (or another
bundle's) by someone who can write the database does not open there.

The master key is the setting E2A_SECRETS_KEY or, unset, <data_dir>/secrets.key: made once
with O_EXCL and mode 0600 (never readable by anyone else, not even for a moment), refused if
it ever becomes readable or writable by group or others.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_FILE = "secrets.key"


class SecretsKeyError(RuntimeError):
    """The master key cannot be had (the key file is unsafe, damaged, or missing)."""


class SealError(ValueError):
    """A ciphertext that does not open here: the wrong key, tampered with, or another row's."""


class SecretBox:
    """Seals and opens one bundle's values. `keys[0]` encrypts; every key decrypts."""

    def __init__(self, keys: list[bytes | str]):
        if not keys:
            raise ValueError("SecretBox needs at least one key")
        self._fernets = [Fernet(k) for k in keys]
        self._all = MultiFernet(self._fernets)

    @classmethod
    def from_settings(cls, settings, *, create: bool = True) -> SecretBox:
        """The box for these settings: E2A_SECRETS_KEY (else the key file, made if `create`),
        then E2A_SECRETS_OLD_KEYS. Raises SecretsKeyError."""
        current = settings.secrets_key or load_key_file(Path(settings.data_dir) / KEY_FILE,
                                                        create=create)
        old = [k for k in settings.secrets_old_keys.split(",") if k]
        return cls([current, *old])

    @staticmethod
    def _plaintext(user_id: str, name: str, values: dict[str, str]) -> bytes:
        # UTF-8 as is, not \u escapes (which would make a non-ASCII value up to 3 times longer);
        # Bundles refuses a value that is not valid Unicode before it gets here.
        return json.dumps({"user_id": user_id, "name": name, "values": values},
                          separators=(",", ":"), ensure_ascii=False).encode()

    def seal(self, user_id: str, name: str, values: dict[str, str]) -> str:
        return self._fernets[0].encrypt(self._plaintext(user_id, name, values)).decode()

    def open(self, user_id: str, name: str, token: str) -> dict[str, str]:
        """The values sealed for exactly this tenant and bundle name, else SealError."""
        try:
            data = json.loads(self._all.decrypt(token.encode()))
        except (InvalidToken, ValueError, TypeError, AttributeError):
            raise SealError("cannot be decrypted with the server's keys (tampered with, or "
                            "sealed under a key that is no longer configured)") from None
        if not isinstance(data, dict) or data.get("user_id") != user_id \
                or data.get("name") != name or not isinstance(data.get("values"), dict):
            raise SealError("was sealed for another bundle (its ciphertext was moved)")
        return data["values"]

    def is_current(self, token: str) -> bool:
        """Whether the current key (alone) decrypts it, i.e. a rotation has nothing to do."""
        try:
            self._fernets[0].decrypt(token.encode())
            return True
        except InvalidToken:
            return False

    def rotate(self, user_id: str, name: str, token: str) -> str:
        """The same plaintext under the current key. Checks it belongs to this row first, so a
        rotation never launders a moved ciphertext into one that looks freshly made."""
        self.open(user_id, name, token)
        return self._all.rotate(token.encode()).decode()


def load_key_file(path: Path, *, create: bool = True) -> bytes:
    """The master key in `path`, made once (0600, atomically: it is written under another name
    and linked into place, so no reader ever sees a partial key). Raises SecretsKeyError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise SecretsKeyError(f"{path} does not exist and E2A_SECRETS_KEY is not set: no "
                                  "master key for the secret bundles") from None
        _create_key_file(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: a symlink
        raise SecretsKeyError(f"cannot open {path} ({exc.strerror}): the secret bundles' master "
                              "key must be a regular file") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretsKeyError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretsKeyError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: the secret bundles' master key "
                "must be readable by its owner alone. Treat the key as exposed; `chmod 600` it "
                "to start anyway, and rotate it (docs/secrets.md)")
        if st.st_uid != os.geteuid():
            raise SecretsKeyError(f"{path} is owned by uid {st.st_uid}, not by this process "
                                  f"(uid {os.geteuid()})")
        key = f.read().strip()
    try:
        Fernet(key)
    except ValueError:
        raise SecretsKeyError(f"{path} does not hold a Fernet key (damaged?): without it no "
                              "secret bundle can be decrypted") from None
    return key


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is kept
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
