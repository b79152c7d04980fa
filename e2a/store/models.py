"""Tables. Times are timezone-aware UTC; ids carry their type prefix (usr_, key_, sbx_, tsk_)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, false)
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
    # Pause, resume and fork (docs/pause.md): what an idle sandbox does ("destroy" | "pause"),
    # whether a call into a paused one resumes it, since when it is paused and how much disk it
    # holds then, the sandbox it was forked from, and the sandbox whose per-sandbox secrets
    # (envd's token, a template's passwords) it carries: a fork's memory is its origin's.
    on_idle: Mapped[str] = mapped_column(String(8), default="destroy", server_default="destroy")
    auto_resume: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    forked_from: Mapped[str | None] = mapped_column(String(32), nullable=True)
    secrets_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Replicas on one database (Kubernetes backend, docs/kubernetes.md): the replica that
    # creates or tears the sandbox down (its liveness lock's key: a dead one's work is taken
    # over), and when a call last went into it through any replica (the idle timeout's clock).
    replica: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    active_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # ... and the replica holding its agent (in that replica's memory only), and where its API
    # is: a task sent through another replica is passed on to it
    agent_replica: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    agent_url: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # Kubernetes: the node whose agent mounted its workspace (where its teardown uploads it).
    node_name: Mapped[str | None] = mapped_column(String(253), nullable=True)


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
    # Set while its objects are being deleted: a create leasing it meanwhile is refused (409).
    deleting_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WorkspaceLease(Base):
    """A sandbox's hold on a workspace, from its create's first step until the sandbox is gone
    and the workspace counted again (workspaces/service.py): a workspace with one is not
    deleted, and the user's free quota is shared among all of them, whichever replica made
    them (a mount elsewhere is measured and limited through its node's agent)."""

    __tablename__ = "workspace_leases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(32), index=True)
    # The replica that made it (Kubernetes; None on the embedded backend's one process).
    replica: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Once known: the sandbox, and on Kubernetes the node whose agent mounted it.
    sandbox_id: Mapped[str | None] = mapped_column(String(32), index=True, nullable=True)
    node_name: Mapped[str | None] = mapped_column(String(253), nullable=True)
    # The workspace's bytes as counted when the lease was made (None: not known).
    stored: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Its sandbox is gone: held only until the workspace is counted again.
    ended: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WorkspaceUpload(Base):
    """A presigned PUT handed out (workspaces/service.py), until its file is in S3 or its URL
    expires: with a size, that much of the user's quota is held for it, whichever replica
    shares the quota next; sized or not, its workspace is counted again before the next quota
    check and the next storage charge."""

    __tablename__ = "workspace_uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(32), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # the file is newer
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # a pause's disk


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
    # Replicas (docs/kubernetes.md): the lock key of the replica running the task, and a cancel
    # asked for through another one (the runner carries it out).
    replica: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # ... and where that replica's API is (a follow-up through another replica is passed on)
    replica_url: Mapped[str | None] = mapped_column(String(300), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   server_default=false())


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
    # ttl_expired | deleted | sandbox_ended | server_restart | out_of_credits
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Replicas (docs/kubernetes.md "Sessions"): the one holding the session's agent (its lock
    # key; None on the embedded backend), where its API is, and whether a client is connected
    # to it now
    replica: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    replica_url: Mapped[str | None] = mapped_column(String(300), nullable=True)
    connected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


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


class LoginCode(Base):
    """A one-time login code sent to an email address (docs/accounts.md). Only its HMAC is kept;
    a code is spent by one successful verify, by too many wrong tries, or by a newer code."""

    __tablename__ = "login_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(64))  # the address that asked for it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Account(Base):
    """A user's billing state (docs/billing.md). `balance_micro` caches the sum of the user's
    ledger entries: it changes only in the transaction that appends one."""

    __tablename__ = "accounts"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # saved by the first paid checkout, charged off-session by auto top-up
    payment_method_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    topup_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    topup_threshold: Mapped[int] = mapped_column(Integer, default=0)      # credits
    topup_credits: Mapped[int] = mapped_column(Integer, default=0)
    # One charge per fall below the threshold: cleared by a top-up, set again when a tick sees
    # the balance at or above the threshold, or the settings are saved.
    topup_armed: Mapped[bool] = mapped_column(Boolean, default=True)
    # A failed auto top-up holds further ones until the user saves the settings again or buys.
    topup_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    topup_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CreditHold(Base):
    """A minute of credits held for a create under way (billing/service.py `funds_for`): in the
    database, so that the creates of one user through several replicas see each other's. Gone
    when the create ends; `expires_at` frees one whose replica died meanwhile."""

    __tablename__ = "credit_holds"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LedgerEntry(Base):
    """One change of a balance, never updated nor deleted. Amounts are integer micro-credits
    (1 credit = 1 US cent = 1,000,000 micro-credits); usage rows also keep the raw quantities."""

    __tablename__ = "ledger"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    # grant | purchase | usage | storage | refund | adjustment | topup_failed
    kind: Mapped[str] = mapped_column(String(16), index=True)
    description: Mapped[str] = mapped_column(String(300))
    # What makes the entry unique where it must happen once ("signup:usr_…", "purchase:pur_…")
    ref: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    sandbox_id: Mapped[str | None] = mapped_column(String(32), index=True, nullable=True)
    workspace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    template: Mapped[str | None] = mapped_column(String(32), nullable=True)
    vcpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    gib_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    gib_hours: Mapped[float] = mapped_column(Float, default=0.0)
    actor: Mapped[str | None] = mapped_column(String(320), nullable=True)  # an admin's adjustment
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SandboxMeter(Base):
    """How much of a sandbox's running time has been charged. Charges are computed from the
    whole time so far (never summed per tick), so rounding never drifts and a tick repeated
    after a crash charges nothing twice."""

    __tablename__ = "sandbox_meters"
    sandbox_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    template: Mapped[str] = mapped_column(String(32))
    vcpu_milli: Mapped[int] = mapped_column(Integer)      # vcpu × cpu_fraction × 1000
    memory_mib: Mapped[int] = mapped_column(Integer)
    rate_num: Mapped[int] = mapped_column(BigInteger)     # billing/rates.py: cost per ms × 1.024e9
    open_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    billed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    finished: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # While paused its disk (writable layer and checkpoint) is billed as storage: the current
    # pause's start and size, the byte-seconds of pauses closed, and what has been charged.
    paused_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    paused_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    paused_byte_s: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_billed_byte_s: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_charged_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class StorageMeter(Base):
    """How much of a workspace's stored bytes over time has been charged."""

    __tablename__ = "storage_meters"
    workspace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    metered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    byte_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class MeteringCursor(Base):
    """How far metering has read the sandbox_events feed."""

    __tablename__ = "metering_cursor"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Purchase(Base):
    """A payment for credits: a Stripe Checkout or an auto top-up charge. Credits are granted
    once per purchase (ledger ref "purchase:<id>"), whichever of Stripe's events comes first."""

    __tablename__ = "purchases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))          # checkout | auto_topup
    credits: Mapped[int] = mapped_column(Integer)
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(8))
    # pending | succeeded | failed | expired | unsent (Stripe was not reached)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stripe_session_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StripeEvent(Base):
    """Stripe events already handled: a redelivered event is answered without a second look."""

    __tablename__ = "stripe_events"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
