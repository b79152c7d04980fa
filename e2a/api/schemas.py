"""Request and response bodies of the sandbox API (field names as the hosted e2a.bot documents)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from e2a.workspaces import scope

MAX_LIFETIME = 7200
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by e2a itself inside every sandbox; a request may not override them.
RESERVED_ENV = {"HOME", "USER", "LOGNAME", "SHELL", "PWD", "HOSTNAME"}
RESERVED_ENV_PREFIXES = ("E2A_",)


def reserved_env_key(key: str) -> bool:
    return key.upper() in RESERVED_ENV or key.upper().startswith(RESERVED_ENV_PREFIXES)


def _check_env(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        if not ENV_NAME.match(key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
        if "\x00" in value:
            raise ValueError(f"the value of {key} contains a NUL byte")
    return v


# Environment variables: at most 100, names like shell variables, values without NUL.
EnvVars = Annotated[
    dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=32768)]],
    Field(max_length=100), AfterValidator(_check_env)]


def _scope_name(v: str) -> str:
    return scope.check_name(v)


ScopeName = Annotated[str, AfterValidator(_scope_name)]


class WorkspaceRequest(BaseModel):
    """Which workspace to mount on /home/user: the caller's, for this app and capability set
    (and, for a tenant serving end users of its own, this end user)."""

    model_config = ConfigDict(extra="forbid")

    app_id: ScopeName = scope.DEFAULT
    capset_id: ScopeName = scope.DEFAULT
    end_user_id: ScopeName | None = None


class LlmRequest(BaseModel):
    """Which provider e2a's own agent talks to; each part is inferred when left out
    (docs/agents.md)."""

    model_config = ConfigDict(extra="forbid")

    vendor: Literal["anthropic", "openai", "google", "deepseek"] | None = None
    model: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9._-]{1,128}$")
    base_url: str | None = Field(default=None, max_length=2048, description="an OpenAI-compatible "
                                 "(or the vendor's) API at a public https address")


class ToolRequest(BaseModel):
    """A tool of the caller's for e2a's own agent: the model calls it with arguments matching
    `parameters`; e2a runs `command` in the sandbox with those arguments as JSON on stdin, and
    its stdout is the result (a non-zero exit is an error result)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z][a-zA-Z0-9_-]{0,63}$")
    description: str = Field(default="", max_length=4096)
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    command: str = Field(min_length=1, max_length=16384)


class CreateSandbox(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(max_length=64)
    env_vars: EnvVars = Field(default_factory=dict)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=50)
    # Omitted: min(60, max_lifetime_seconds).
    idle_timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_LIFETIME)
    max_lifetime_seconds: int = Field(default=MAX_LIFETIME, ge=1, le=MAX_LIFETIME)
    internet: bool = True
    # An agent working on a task with the caller's LLM key (docs/agents.md).
    agent: str | None = Field(default=None, max_length=64)
    llm_key: str | None = Field(default=None, max_length=4096)
    task: str | None = Field(default=None, max_length=100_000)
    model: str | None = Field(default=None, max_length=128)
    llm: LlmRequest | None = None
    system_prompt: str | None = Field(default=None, max_length=100_000)
    tools: list[ToolRequest] = Field(default_factory=list, max_length=32)
    max_steps: int | None = Field(default=None, ge=1, le=500)
    task_timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_LIFETIME)
    keep_after_task_seconds: int = Field(default=0, ge=0, le=MAX_LIFETIME)
    # The desktop's screen (cua only): WIDTHxHEIGHT, 640x480 to 3840x2160. Not the template's
    # default: the sandbox starts cold, not from the warm pool.
    resolution: str | None = Field(default=None, max_length=16)
    # A persistent /home/user (docs/workspaces.md): true for the defaults, or its scope.
    workspace: WorkspaceRequest | None = None
    # What an idle sandbox does: "destroy" (documented default) or "pause" (docs/pause.md).
    on_idle: Literal["destroy", "pause"] = "destroy"
    # A call into the sandbox (commands, files, ports) while it is paused resumes it first.
    auto_resume: bool = False

    @field_validator("workspace", mode="before")
    @classmethod
    def _workspace_flag(cls, v):
        if v is True:
            return {}
        return None if v is False else v


class SandboxOut(BaseModel):
    vm_id: str
    state: str
    template: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    internet: bool
    metadata: dict[str, str]
    idle_timeout_seconds: int
    max_lifetime_seconds: int
    created_at: datetime
    expires_at: datetime
    destroyed_at: datetime | None = None
    # Why it ended, once it has: deleted, idle_timeout, max_lifetime, out_of_memory, crashed,
    # server_restart or create_failed.
    end_reason: str | None = None
    # The workspace mounted on /home/user, if any (GET /v1/workspaces/{id}).
    workspace_id: str | None = None
    # Pause, resume and fork (docs/pause.md). While paused: since when, until when it is kept
    # (then destroyed: paused_expired), and the disk it holds (writable layer and checkpoint).
    on_idle: str = "destroy"
    auto_resume: bool = False
    paused_at: datetime | None = None
    pause_expires_at: datetime | None = None
    disk_bytes: int | None = None
    forked_from: str | None = None


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, ge=1, le=10)


class ForkOut(BaseModel):
    sandboxes: list[SandboxOut]


class SandboxEventOut(BaseModel):
    """One state transition (the sandbox's event feed)."""

    from_state: str | None
    to_state: str
    reason: str | None
    detail: str | None
    at: datetime


class SandboxEventsOut(BaseModel):
    events: list[SandboxEventOut]


MAX_ARG_BYTES = 128 * 1024 - 1  # MAX_ARG_STRLEN less the terminating NUL


def _one_exec_arg(v: str) -> str:
    size = len(v.encode())
    if size > MAX_ARG_BYTES:
        raise ValueError(f"is {size} bytes; one command argument may be at most {MAX_ARG_BYTES} "
                         "bytes (the kernel's limit): put longer scripts in a file")
    return v


class CommandRequest(BaseModel):
    """Shape of POST /commands (documented in docs/protocol.md); checked here, run by envd."""

    model_config = ConfigDict(extra="forbid")

    # A command reaches the kernel as exec arguments: one argument may be at most 128 KiB
    # (Linux's MAX_ARG_STRLEN, gVisor's too), so that is the real limit, checked in bytes.
    cmd: Annotated[str, AfterValidator(_one_exec_arg)] | None = Field(default=None)
    argv: list[Annotated[str, AfterValidator(_one_exec_arg)]] | None = Field(
        default=None, min_length=1, max_length=10_000)
    env: EnvVars = Field(default_factory=dict)
    cwd: str | None = Field(default=None, max_length=4096)
    user: str | None = Field(default=None, max_length=32, pattern=r"^[a-z_][a-z0-9_-]*$")
    stdin: str | None = Field(default=None, max_length=10_000_000)
    keep_stdin: bool = False
    timeout: float | None = Field(default=None, ge=0, le=86400)
    background: bool = False


class StdinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(default="", max_length=10_000_000)
    eof: bool = False


class SignalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: str | int


class MkdirRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)
    parents: bool = True
    user: str | None = Field(default=None, max_length=32, description="who makes it (default "
                             "`user`): the directory is theirs, and only what they may is done")


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from", min_length=1, max_length=4096)
    to: str = Field(min_length=1, max_length=4096)
    user: str | None = Field(default=None, max_length=32, description="who renames (default "
                             "`user`): only what they may is done")


class TemplateOut(BaseModel):
    name: str
    description: str
    vcpu: int
    cpu_fraction: float
    memory_mib: int
    disk_mib: int
    contents: list[str]
    services: list[str]
    endpoints: list[str]
    parameters: dict[str, str]
    built: bool
    warm_pool: int


class BrowserOut(BaseModel):
    cdp_url: str


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    view_only: bool = True
    ttl_seconds: int = Field(default=3600, ge=60, le=86400)


class StreamOut(BaseModel):
    url: str
    view_only: bool
    expires_at: datetime


class ControlOut(BaseModel):
    human_in_control: bool


class CanvasOut(BaseModel):
    view_url: str


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, min_length=1, max_length=1024,
                             description="a file under /home/user/canvas (default index.html)")
    html: str | None = Field(default=None, max_length=5_000_000)
    width: int = Field(default=1280, ge=16, le=4096)
    height: int = Field(default=800, ge=16, le=4096)
    format: Literal["png", "pdf"] = "png"
    wait_ms: int = Field(default=0, ge=0, le=30_000)


class TaskOut(BaseModel):
    """An agent's task (the sandbox's latest)."""

    task_id: str
    agent: str
    vendor: str
    model: str | None
    # starting | running | succeeded | failed | timed_out | cancelled
    state: str
    started_at: datetime
    ended_at: datetime | None
    result: str | None = Field(description="the agent's final message")
    error: str | None
    llm_requests: int
    input_tokens: int = Field(description="counted for the user to see; never billed")
    output_tokens: int
    key_passed_in: bool = Field(description="true if the agent's CLI held the key itself "
                                "(it could not use e2a's egress proxy); false: the key never "
                                "entered the sandbox")


class FollowUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=100_000)
    model: str | None = Field(default=None, max_length=128)
    task_timeout_seconds: int | None = Field(default=None, ge=1, le=MAX_LIFETIME)


class TaskEventOut(BaseModel):
    seq: int
    task_id: str
    type: str
    data: dict
    at: datetime


class TaskEventsOut(BaseModel):
    events: list[TaskEventOut]
    # the last seq returned (or `after` when none): pass it as `after` to go on
    next: int
    # true once the task is over and every event of it has been returned
    done: bool


# ---- sessions (docs/sessions.md) -----------------------------------------------------------

CAPABILITIES = ("shell", "files", "browser", "computer")


class SessionAgent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="deictic", max_length=64,
                      description="deictic (also e2a: e2a's own agent), claude-code, codex or "
                                  "gemini-cli")
    version: str | None = Field(default=None, max_length=64,
                                description="null or latest: the one installed; else it must "
                                            "be that version")


class SessionLlm(LlmRequest):
    """The provider; each part wins over the secret bundles' LLM_* value."""

    api_key: str | None = Field(default=None, min_length=1, max_length=4096)


class SessionApp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ScopeName = scope.DEFAULT
    set_id: ScopeName = scope.DEFAULT
    capability_sets: list[Literal["shell", "files", "browser", "computer"]] | None = Field(
        default=None, max_length=len(CAPABILITIES),
        description="the agent's tools; null: all that the template offers")


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: SessionAgent = Field(default_factory=SessionAgent)
    template: str = Field(default="standard", max_length=64)
    llm: SessionLlm = Field(default_factory=SessionLlm)
    secrets: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list,
                                                                 max_length=100)
    app: SessionApp = Field(default_factory=SessionApp)
    user_id: ScopeName = Field(description="the tenant's own end user: with app.id and "
                                            "app.set_id, the scope of the session's workspace")
    ttl_seconds: int = Field(default=3600, ge=60, le=MAX_LIFETIME)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=50)


class SessionTicket(BaseModel):
    chat_session_id: str
    jwt: str = Field(description="authorises the WebSocket (and nothing else) until expires_at")
    connect_url: str
    expires_at: datetime


class SessionTokenOut(BaseModel):
    jwt: str
    expires_at: datetime


class SessionAgentOut(BaseModel):
    kind: str
    version: str


class SessionLlmOut(BaseModel):
    vendor: str
    model: str | None


class SessionAppOut(BaseModel):
    id: str
    set_id: str
    capability_sets: list[str]


class SessionTaskOut(BaseModel):
    task_id: str
    state: str


class SessionUsage(BaseModel):
    tasks: int
    llm_requests: int
    input_tokens: int = Field(description="counted for the user to see; never billed")
    output_tokens: int
    events: int
    seconds: float = Field(description="how long the session has been (or was) active")


class SessionOut(BaseModel):
    chat_session_id: str
    state: Literal["active", "ended"]
    user_id: str
    agent: SessionAgentOut
    template: str
    llm: SessionLlmOut
    app: SessionAppOut
    secrets: list[str]
    vm_id: str | None
    workspace_id: str | None
    connected: bool
    task: SessionTaskOut | None
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    metadata: dict
    usage: SessionUsage


class SessionsOut(BaseModel):
    sessions: list[SessionOut]


# ---- accounts (docs/accounts.md) ------------------------------------------------------------


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320, description="the address the code is sent to (the "
                       "account is made on first use); trimmed and compared in lower case")


class LoginOut(BaseModel):
    """The same answer whether the account existed or not."""

    email: str = Field(description="the address as e2a keys accounts (trimmed, lower case): "
                       "verify with it")
    expires_in: int = Field(description="seconds the code is valid for")
    message: str


class VerifyOtpIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320)
    code: str = Field(max_length=64, description="the 6-digit code from the mail")


class VerifyOtpOut(BaseModel):
    token: str = Field(description="the login JWT (Authorization: Bearer <token>): manages API "
                       "keys and billing, never sandboxes; short-lived (E2A_LOGIN_TOKEN_TTL)")
    user_id: str
    email: str


class ApiKeyCreated(BaseModel):
    key_id: str
    key: str = Field(description="the key itself (e2a_live_...): shown this once, stored only "
                     "as a hash")
    prefix: str = Field(description="its first characters, by which lists show it")


class ApiKeyOut(BaseModel):
    key_id: str
    prefix: str
    revoked: bool
    created_at: datetime
    plan_tier: str


class ApiKeysOut(BaseModel):
    api_keys: list[ApiKeyOut]
