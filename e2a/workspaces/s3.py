"""The S3 store of every workspace: one bucket, each workspace's objects under w/<id>/.

boto3 talks to it for what the API offers (listings, usage, deletes, presigned URLs); each
sandbox's rclone mount talks to it on its own, configured by `rclone_env`. The same code serves
the embedded server (server.py) and any external S3 (AWS S3, R2, MinIO, SeaweedFS).

Paths given to the API are relative to the workspace and checked here (`check_path`): no empty,
`.` or `..` segment, no leading or trailing slash, no NUL, at most 1024 bytes. With the
workspace's own prefix in front, no path names another workspace's object.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MAX_PATH_BYTES = 1024
LINK_SUFFIX = ".rclonelink"  # rclone keeps a symlink as an object holding its target
PRESIGN_MAX = 7 * 24 * 3600  # S3's own limit for a SigV4 presigned URL


def check_path(path: str) -> str:
    """`path` if it names a file inside a workspace; ValueError saying why not."""
    if not path:
        raise ValueError("must not be empty")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"is longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in path or "\\" in path:
        raise ValueError("must not contain NUL or backslash characters")
    if path.startswith("/") or path.endswith("/"):
        raise ValueError("must be relative to the workspace, without a leading or trailing '/'")
    if any(seg in ("", ".", "..") for seg in path.split("/")):
        raise ValueError("must not contain empty, '.' or '..' segments")
    return path


def check_prefix(prefix: str) -> str:
    """A listing prefix: a path, possibly ending in '/', or empty for everything."""
    if prefix == "":
        return prefix
    check_path(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@dataclass
class Entry:
    path: str
    size: int
    modified: datetime
    kind: str  # file | symlink


@dataclass
class Usage:
    bytes: int
    files: int


@dataclass
class Endpoint:
    url: str
    region: str
    bucket: str
    access_key: str
    secret_key: str
    sse: str = ""           # server-side encryption to ask for (external S3)
    provider: str = "Other"  # rclone's name for the kind of S3 server ("Rclone": the embedded one)
    public_url: str = ""    # for presigned URLs

    @classmethod
    def from_settings(cls, settings) -> Endpoint:
        """The external store the settings name (E2A_S3_*)."""
        return cls(url=settings.s3_endpoint, region=settings.s3_region,
                   bucket=settings.s3_bucket, access_key=settings.s3_access_key,
                   secret_key=settings.s3_secret_key, sse=settings.s3_sse,
                   public_url=settings.s3_public_url)


class S3Store:
    def __init__(self, endpoint: Endpoint):
        self.ep = endpoint
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                        retries={"max_attempts": 4, "mode": "standard"},
                        connect_timeout=5, read_timeout=60)
        self.client = self._client(endpoint.url, config)
        # Presigned URLs carry the host they were signed for: the one clients reach.
        self.public = self._client(endpoint.public_url or endpoint.url, config)

    def _client(self, url: str, config: Config):
        return boto3.client("s3", endpoint_url=url, region_name=self.ep.region,
                            aws_access_key_id=self.ep.access_key,
                            aws_secret_access_key=self.ep.secret_key, config=config)

    @staticmethod
    def prefix(workspace_id: str) -> str:
        return f"w/{workspace_id}/"

    def key(self, workspace_id: str, path: str) -> str:
        return self.prefix(workspace_id) + check_path(path)

    # ---- bucket -------------------------------------------------------------------------

    def answers(self) -> bool:
        """Whether the store answers at all (a refused upload is then S3 refusing it)."""
        try:
            self.client.head_bucket(Bucket=self.ep.bucket)
            return True
        except Exception:
            return False

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.ep.bucket)
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            self.client.create_bucket(Bucket=self.ep.bucket)

    # ---- reads ---------------------------------------------------------------------------

    def list_page(self, workspace_id: str, prefix: str, cursor: str | None,
                  limit: int) -> tuple[list[Entry], str | None]:
        """Up to `limit` entries under `prefix`, in key order, after `cursor` (the last path of
        the previous page); and the cursor of the next page, or None at the end."""
        base = self.prefix(workspace_id)
        args = {"Bucket": self.ep.bucket, "Prefix": base + prefix, "MaxKeys": limit}
        if cursor:
            args["StartAfter"] = base + cursor
        page = self.client.list_objects_v2(**args)
        entries = [_entry(obj, len(base)) for obj in page.get("Contents", [])]
        more = page.get("IsTruncated") and entries
        return entries, (page["Contents"][-1]["Key"][len(base):] if more else None)

    def usage(self, workspace_id: str) -> Usage:
        total = files = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.ep.bucket, Prefix=self.prefix(workspace_id)):
            for obj in page.get("Contents", []):
                total += obj["Size"]
                files += 1
        return Usage(total, files)

    def exists(self, workspace_id: str, path: str) -> str | None:
        """The object key holding `path` (a file, or a symlink's link object), or None."""
        for key in (self.key(workspace_id, path), self.key(workspace_id, path) + LINK_SUFFIX):
            try:
                self.client.head_object(Bucket=self.ep.bucket, Key=key)
                return key
            except ClientError as exc:
                if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        return None

    def stat(self, workspace_id: str, path: str) -> tuple[int, datetime] | None:
        """The size and last write of the file at `path`, or None."""
        try:
            head = self.client.head_object(Bucket=self.ep.bucket, Key=self.key(workspace_id, path))
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise
            return None
        return head["ContentLength"], head["LastModified"]

    def presign(self, workspace_id: str, path: str, method: str, expires_in: int,
                size: int | None = None) -> str:
        """A SigV4 presigned URL; with `size`, a PUT must send exactly that many bytes (the
        Content-Length is signed)."""
        op = {"GET": "get_object", "PUT": "put_object"}[method]
        params = {"Bucket": self.ep.bucket, "Key": self.key(workspace_id, path)}
        if size is not None:
            params["ContentLength"] = size
        return self.public.generate_presigned_url(op, Params=params, ExpiresIn=expires_in,
                                                  HttpMethod=method)

    # ---- writes --------------------------------------------------------------------------

    def delete_key(self, key: str) -> None:
        self.client.delete_object(Bucket=self.ep.bucket, Key=key)

    def delete_all(self, workspace_id: str) -> int:
        """Delete every object of the workspace; returns how many."""
        removed = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.ep.bucket, Prefix=self.prefix(workspace_id)):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                answer = self.client.delete_objects(Bucket=self.ep.bucket,
                                                    Delete={"Objects": keys, "Quiet": True})
                if answer.get("Errors"):
                    raise RuntimeError(f"S3 refused to delete {answer['Errors'][0]}")
                removed += len(keys)
        return removed

    # ---- the mounts' view ------------------------------------------------------------------

    def rclone_env(self, name: str) -> dict[str, str]:
        """rclone's settings for a remote `name` on this store, as environment variables: the
        keys stay out of argv (which every host user can read in /proc)."""
        pre = f"RCLONE_CONFIG_{name.upper()}_"
        env = {pre + "TYPE": "s3", pre + "PROVIDER": self.ep.provider,
               pre + "ENDPOINT": self.ep.url, pre + "REGION": self.ep.region,
               pre + "ACCESS_KEY_ID": self.ep.access_key,
               pre + "SECRET_ACCESS_KEY": self.ep.secret_key,
               pre + "NO_CHECK_BUCKET": "true"}
        if self.ep.sse:
            env[pre + "SERVER_SIDE_ENCRYPTION"] = self.ep.sse
        return env

    def remote(self, name: str, workspace_id: str) -> str:
        return f"{name}:{self.ep.bucket}/{self.prefix(workspace_id).rstrip('/')}"


def _entry(obj: dict, base_len: int) -> Entry:
    path = obj["Key"][base_len:]
    kind = "file"
    if path.endswith(LINK_SUFFIX):
        path, kind = path[:-len(LINK_SUFFIX)], "symlink"
    return Entry(path=path, size=obj["Size"], modified=obj["LastModified"], kind=kind)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


async def run(fn, *args, **kwargs):
    """boto3 blocks: every call from the event loop goes through a thread."""
    return await asyncio.to_thread(fn, *args, **kwargs)
