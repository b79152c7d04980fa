"""Tables. Times are timezone-aware UTC; ids carry their type prefix (usr_, key_, sbx_, tsk_)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    # sha256 of the whole key: keys are 190 random bits, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    plan_tier: Mapped[str] = mapped_column(String(32), default="free")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Sandbox(Base):
    __tablename__ = "sandboxes"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # NULL while the sandbox waits in the warm pool.
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), index=True, nullable=True)
    template: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    vcpu: Mapped[int] = mapped_column(Integer)
    cpu_fraction: Mapped[float] = mapped_column(Float)
    memory_mib: Mapped[int] = mapped_column(Integer)
    internet: Mapped[bool] = mapped_column(Boolean, default=True)
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    env_vars: Mapped[dict] = mapped_column(JSON, default=dict)
    idle_timeout_seconds: Mapped[int] = mapped_column(Integer)
    max_lifetime_seconds: Mapped[int] = mapped_column(Integer)
    # Host resources, needed to adopt or clean up the sandbox after a restart.
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Empty: the token is derived from the host's agent key (sandboxes/agent_keys.py). Rows
    # written before that still hold theirs.
    envd_token: Mapped[str] = mapped_column(String(64))
    # Why it ended (states.EndReason), and the host's words about it.
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The workspace mounted on /home/user, if any.
    workspace_id: Mapped[str | None] = mapped_column(ForeignKey("workspaces.id"), index=True,
                                                     nullable=True)
    host_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Workspace(Base):
    """One scope's persistent home directory: its objects are under w/<id>/ in the S3 bucket.
    The scope's names never reach a path: the random id does."""

    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("user_id", "end_user_id", "app_id", "capset_id",
                                       name="uq_workspace_scope"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    # "" when the caller serves no end users of its own.
    end_user_id: Mapped[str] = mapped_column(String(64))
    app_id: Mapped[str] = mapped_column(String(64))
    capset_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # As last counted (after each sandbox that mounted it, and by GET .../usage).
    bytes_used: Mapped[int] = mapped_column(BigInteger, default=0)
    file_count: Mapped[int] = mapped_column(Integer, default=0)
    usage_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SandboxEvent(Base):
    """One state transition of a sandbox: the feed metering, webhooks and the dashboard read."""

    __tablename__ = "sandbox_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(String(500), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Task(Base):
    """One task an agent worked on in a sandbox (docs/agents.md). The user's LLM key is not here:
    it is held in the server's memory only, for the sandbox's life."""

    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    agent: Mapped[str] = mapped_column(String(32))
    vendor: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    # starting | running | succeeded | failed | timed_out | cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    llm_requests: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # True when the CLI could not be pointed at e2a's egress proxy and got the key itself.
    key_passed_in: Mapped[bool] = mapped_column(Boolean, default=False)


class TaskEvent(Base):
    """The agent's events, numbered per sandbox (over all its tasks) from 1."""

    __tablename__ = "task_events"
    sandbox_id: Mapped[str] = mapped_column(ForeignKey("sandboxes.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    task_id: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ChatSession(Base):
    """A conversation with an agent in one sandbox, over a WebSocket (docs/sessions.md). No key
    is here: the LLM key is in the secret bundles (encrypted) or, given inline, in memory only."""

    __tablename__ = "chat_sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    # the tenant's end user; with app_id and set_id, the workspace's scope
    end_user_id: Mapped[str] = mapped_column(String(64), index=True)
    app_id: Mapped[str] = mapped_column(String(64))
    set_id: Mapped[str] = mapped_column(String(64))
    capability_sets: Mapped[list] = mapped_column(JSON)
    agent: Mapped[str] = mapped_column(String(32))
    agent_version: Mapped[str] = mapped_column(String(32))
    template: Mapped[str] = mapped_column(String(32))
    vendor: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    secrets: Mapped[list] = mapped_column(JSON)  # bundle names, never values
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    sandbox_id: Mapped[str | None] = mapped_column(ForeignKey("sandboxes.id"), index=True,
                                                   nullable=True)
    # active | ended
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # ttl_expired | deleted | sandbox_ended | server_restart
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


class SecretBundle(Base):
    """A tenant's named set of secrets (an LLM key, its base URL, ...), docs/secrets.md. The
    values are only in `ciphertext`: Fernet over {"user_id", "name", "values"}, so a row's
    ciphertext opens on that row alone. `key_names` are the names, never the values."""

    __tablename__ = "secret_bundles"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_secret_bundle_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    key_names: Mapped[list] = mapped_column(JSON)
    ciphertext: Mapped[str] = mapped_column(Text)
    # 1 when created, +1 per replace (PUT)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
