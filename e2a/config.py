"""Server settings: embedded defaults, overridable by E2A_* environment variables.

Read and validated in one place: ``Settings()`` reads the environment (an empty variable counts as
unset) and raises :class:`SettingsError` listing every bad value, one line per problem and naming
its variable, before anything touches the host. Unknown ``E2A_*`` variables (e.g. the CLI's own
``E2A_URL`` and ``E2A_API_KEY``) are ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "E2A_"
PLATFORMS = ("systrap", "ptrace")
DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
IFNAMSIZ = 15  # longest Linux network interface name; host side of a link is "<instance>-<slot>"
INSTANCE_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

# What a valid value looks like, for errors that pydantic raises itself (a string that is not a
# number, a number out of range): one sentence per field instead of pydantic's wording.
_EXPECTED = {
    "port": "must be an integer from 1 to 65535",
    "max_sandboxes": "must be an integer of at least 1",
    "max_sandboxes_per_user": "must be an integer of at least 0 (0: no limit per user)",
    "pool_size": "must be an integer of at least 0",
    "pool_sizes": 'must be a JSON object of template names and sizes, e.g. {"browser": 2}',
    "reaper_interval": "must be a number of seconds greater than 0",
    "death_check_interval": "must be a number of seconds greater than 0 and at most 2",
    "max_body_bytes": "must be an integer of at least 1024 (bytes)",
    "disk_gib": "must be an integer of at least 0 (GiB; 0 = half the free space)",
    "s3_port": "must be an integer from 1 to 65535",
    "workspace_quota_mib": "must be an integer of at least 1 (MiB)",
    "egress_port": "must be an integer from 1 to 65535",
    "smtp_port": "must be an integer from 1 to 65535",
    "login_code_ttl": "must be an integer from 60 to 3600 (seconds)",
    "login_token_ttl": "must be an integer from 60 to 86400 (seconds)",
    "login_per_client": "must be an integer of at least 1",
    "free_credits": "must be an integer of at least 0 (credits)",
    "metering_interval": "must be a number of seconds from 0.2 to 300",
    "storage_metering_interval": "must be a number of seconds from 0.2 to 86400",
    "checkout_min_credits": "must be an integer of at least 1 (credits)",
    "paused_ttl": "must be an integer of at least 1 (seconds a paused sandbox is kept)",
    "kube_runtime_handlers": 'must be a JSON list of handler names, e.g. ["runsc", "gvisor"]',
}

# Settings whose value no error line (nor the settings' repr) shows: a bad key is likely a typo
# of the real one.
_HIDDEN = {"agent_key", "kube_node_token", "s3_secret_key", "secrets_key", "secrets_old_keys",
           "smtp_password", "stripe_secret_key", "stripe_webhook_secret"}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class SettingsError(ValueError):
    """Invalid settings; ``problems`` holds one line per bad value, each naming its variable."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Where the other replicas on this database reach this one's API (a follow-up task sent
    # through another replica is passed to the one holding the agent): deploy/kubernetes sets
    # it from the pod's address. Empty: http://<host>:<port> unless host is a wildcard or
    # loopback (then follow-ups are not passed on).
    replica_url: str = ""
    # Persistent state: the SQLite database and the log of each sandbox.
    data_dir: Path = Path("/var/lib/e2a")
    # Volatile state: runsc's state, bundles and each sandbox's writable layer.
    run_dir: Path = Path("/run/e2a")
    # Template images and the runsc build, keyed by content hash; survive clones and restarts.
    cache_dir: Path = Path("/var/cache/e2a")
    # Default: sqlite+aiosqlite:///<data_dir>/e2a.db
    database_url: str = ""
    # Default: <cache_dir>/bin/runsc
    runsc: str = ""
    # The URL clients reach this server by (behind a proxy), for the URLs the API hands out (CDP,
    # live view, canvas); empty = as each request arrived.
    public_url: str = ""
    # Default: build/envd of this checkout
    envd: str = ""
    # 10.201.0.0/16 cut into /30 links, one per sandbox.
    subnet: str = "10.201.0.0/16"
    max_sandboxes: int = Field(256, ge=1)
    # The most sandboxes (sessions' included) one user may have at once, so that one tenant
    # cannot take every slot of a shared host: 429 beyond. 0: no limit but max_sandboxes.
    max_sandboxes_per_user: int = Field(0, ge=0)
    # Pre-started sandboxes of every template, handed out on create (a standard one costs ~15
    # MiB of host memory). Unset: each recipe's own pool_size. E2A_POOL_SIZES (JSON, e.g.
    # {"browser": 2}) sets single templates and wins over both.
    pool_size: int | None = Field(None, ge=0)
    pool_sizes: dict[str, int] = Field(default_factory=dict)
    # Force one gVisor platform (ptrace, systrap) for every template; empty = each recipe's own.
    platform: str = ""
    reaper_interval: float = Field(1.0, gt=0, allow_inf_nan=False)
    # Name prefix of every host object (netns, veth, cgroup, runsc id): lets tests run two servers.
    instance: str = "e2a"
    # The host key every envd token, per-sandbox secret and access token is derived from: at
    # least 32 characters (e.g. `openssl rand -hex 32`). Empty = generated once into
    # <data_dir>/agent.key (mode 0600). Replicas of one e2a (docs/kubernetes.md) share it.
    agent_key: str = Field("", repr=False)
    # How long a paused sandbox is kept (its checkpoint on disk) before it is destroyed with
    # end_reason paused_expired (docs/pause.md). 7 days.
    paused_ttl: int = Field(604_800, ge=1)
    # Seconds between checks that each sandbox's host processes are still alive.
    death_check_interval: float = Field(0.5, gt=0, le=2, allow_inf_nan=False)
    # The largest JSON request body the API accepts.
    # 16 MiB: room for a command's stdin (the schema allows 10 million characters).
    max_body_bytes: int = Field(16_777_216, ge=1024)
    # The disk pool every sandbox's writes go to (<data_dir>/sandboxes.img, preallocated when it is
    # first made; each sandbox also has its template's own limit). 0 = half the free space then
    # (at most 64 GiB).
    disk_gib: int = Field(0, ge=0)

    # ---- where sandboxes run (docs/kubernetes.md) ----
    # "embedded": gVisor sandboxes on this machine (runsc, e2a's own network and disk pool).
    # "kubernetes": each sandbox a gVisor pod in a cluster, through its API.
    backend: Literal["embedded", "kubernetes"] = "embedded"
    # A kubeconfig file; empty: the service account of the pod e2a runs in.
    kube_config: str = ""
    # The namespace of the sandboxes' pods, secrets and policies (e2a needs only its verbs there).
    kube_namespace: str = "e2a-sandboxes"
    # The RuntimeClass that runs pods in gVisor; e2a refuses to start on a cluster without it.
    kube_runtime_class: str = "gvisor"
    # The containerd handlers that are gVisor (runsc's own name, and GKE's): a RuntimeClass of
    # that name whose handler is another (runc, re-created under the name) would run sandboxes
    # on the node's kernel, so e2a refuses to start, and to create, on it. JSON list.
    kube_runtime_handlers: list[str] = Field(default_factory=lambda: ["runsc", "gvisor"],
                                             min_length=1)
    # Sandbox pods run as `user` (uid 1000), with no capability and no privilege escalation
    # (what the Pod Security Standard "restricted" asks of containers). Commands, PTYs and
    # files as root answer 400 (envd cannot switch users): no `apt install` at run time.
    # false: envd runs as root in gVisor, as on the embedded backend, and switches users.
    kube_non_root: bool = True
    # Sandbox pods' image read-only, for the templates whose recipe allows it: only the home,
    # /tmp and the recipe's `writable` paths (copied from the image at start) can be written;
    # `pip install --user` goes to the home. false: the image is writable (gVisor's overlay).
    kube_read_only_root: bool = True
    # What a sandbox pod requests of the CPU its template may use (its limit): CPU is shared as
    # on one host, where idle sandboxes hold no core. 1 = a core reserved per vCPU.
    kube_cpu_request_ratio: float = Field(0.1, gt=0, le=1, allow_inf_nan=False)
    # What a sandbox pod requests of its memory limit. 1: never overcommitted (a node never runs
    # out). Below 1 packs more sandboxes on a node (an idle gVisor sandbox touches ~43 MiB of
    # its 544), at the risk that the node's OOM killer ends some when many use their limit.
    kube_memory_request_ratio: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    # Where the cluster pulls template images (e2a-<template>:<hash>) from.
    kube_registry: str = "e2a.local"
    # Address ranges e2a connects to sandboxes from, besides e2a's own pods in the cluster
    # (the policies' only ingress): e.g. the node's address on the pod network.
    kube_api_cidrs: list[str] = Field(default_factory=list)
    # The resolvers sandboxes use (their policies allow DNS to these alone). Empty: those of
    # e2a's own /etc/resolv.conf, right for an e2a outside the cluster; one inside it must name
    # resolvers outside the cluster (its own DNS would resolve, and carry data to, the
    # cluster's names), and does not start without them.
    kube_nameservers: list[str] = Field(default_factory=list)
    # e2a starts only where its NetworkPolicies are proven enforced, unless this accepts that
    # sandboxes may reach each other and the cluster.
    kube_allow_unenforced_policies: bool = False
    # Where sandbox pods reach this replica's LLM egress proxy (agents, docs/agents.md): in the
    # cluster, the replica's own pod IP (deploy/kubernetes sets it from the downward API);
    # outside it, the host's address on the pods' network. Empty: agents answer 501 here.
    kube_egress_host: str = ""
    # Workspaces on Kubernetes: each node runs `e2a node-agent`, which mounts them for its pods
    # (docs/kubernetes.md, "Workspaces"); the replicas call it on the node's address and this
    # port, with this token. Empty token: a create with a workspace answers 503 here.
    kube_node_token: str = Field("", repr=False)
    kube_node_port: int = Field(8335, ge=1, le=65535)

    # ---- workspaces (docs/workspaces.md) ----
    # The S3 store of every workspace. Empty endpoint: e2a starts its own S3 server (rclone serve
    # s3) on 127.0.0.1:<s3_port>, its objects encrypted under <data_dir>/s3. Set endpoint, region,
    # bucket and keys to use any S3 (AWS S3, R2, MinIO, SeaweedFS) instead; e2a then starts none.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "e2a-workspaces"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    # Server-side encryption asked of an external S3 for every object written ("AES256" or
    # "aws:kms"); the embedded server encrypts everything itself.
    s3_sse: str = ""
    s3_port: int = Field(8333, ge=1, le=65535)
    # Where clients reach the S3 server, for presigned URLs (e.g. https://s3.example.com behind
    # a TLS proxy that keeps the Host header); empty = the endpoint e2a itself uses.
    s3_public_url: str = ""
    # The embedded server's encryption key (any string); empty = generated once into
    # <data_dir>/workspace.key. Losing it loses every workspace.
    workspace_key: str = ""
    # Each user's storage over all their workspaces.
    workspace_quota_mib: int = Field(10240, ge=1)
    # Default: <cache_dir>/bin/rclone
    rclone: str = ""

    # ---- agents (docs/agents.md) ----
    # The LLM egress proxy's port, on the host side of every sandbox's link: the agent CLIs call
    # it with a placeholder key and it calls the provider with the real one.
    egress_port: int = Field(8334, ge=1, le=65535)
    # Each provider's API root, where the egress proxy and e2a's own agent send requests.
    llm_anthropic_url: str = "https://api.anthropic.com"
    llm_openai_url: str = "https://api.openai.com"
    llm_google_url: str = "https://generativelanguage.googleapis.com"
    llm_deepseek_url: str = "https://api.deepseek.com"
    # Hosts a caller's own LLM base URL may name although they are not public, and over http too
    # (for a provider on the local network): comma-separated `host` (any port), `host:port`,
    # `[v6]` or `[v6]:port`, e.g. "llm.lan,10.0.0.5:8000". Empty: none. The SSRF guard
    # (e2a/agents/ssrf.py) refuses every other non-public address, also when a name resolves to
    # one later.
    llm_private_hosts: str = ""

    # ---- secrets (docs/secrets.md) ----
    # The master key of the tenants' secret bundles: a Fernet key (urlsafe base64 of 32 bytes,
    # `Fernet.generate_key()`). Empty = generated once into <data_dir>/secrets.key (mode 0600).
    # Losing it loses every bundle.
    secrets_key: str = Field("", repr=False)
    # Earlier master keys, comma-separated, still accepted for decryption while
    # `e2a admin rotate-secrets-key` re-encrypts every bundle under the current one.
    secrets_old_keys: str = Field("", repr=False)

    # ---- accounts (docs/accounts.md) ----
    # The SMTP server that sends login codes. Empty host: each code is written to the server's
    # log instead (the embedded default, for one machine).
    smtp_host: str = ""
    smtp_port: int = Field(587, ge=1, le=65535)
    # starttls (upgrade after connecting) | tls (TLS from the start, port 465) | none
    smtp_security: str = "starttls"
    smtp_username: str = ""
    smtp_password: str = Field("", repr=False)
    smtp_from: str = "e2a <no-reply@localhost>"
    # How long a login code and a login token (the JWT that manages keys and billing) live.
    login_code_ttl: int = Field(600, ge=60, le=3600)
    login_token_ttl: int = Field(3600, ge=60, le=86400)
    # Login codes one client address may ask for per 15 minutes (each email address: 5).
    login_per_client: int = Field(30, ge=1)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto e2a believes (comma-separated addresses,
    # e.g. "127.0.0.1" behind a local TLS proxy). Empty: none, so no client can pick the address
    # that rate limits count (uvicorn's own default trusts 127.0.0.1).
    trusted_proxies: str = ""

    # ---- credits (docs/billing.md) ----
    # 1 credit = 1 US cent. Rates are credits per unit, exact to 6 decimal places.
    free_credits: int = Field(100, ge=0)
    rate_vcpu_second: Decimal = Decimal("0.0014")
    rate_gib_second: Decimal = Decimal("0.00045")
    rate_workspace_gib_hour: Decimal = Decimal("0.01")
    # How often running sandboxes are charged, and workspace storage.
    metering_interval: float = Field(30.0, ge=0.2, le=300, allow_inf_nan=False)
    storage_metering_interval: float = Field(3600.0, ge=0.2, le=86400, allow_inf_nan=False)
    # How far below zero a balance may go before the user's sandboxes are ended (credits): a
    # running task is not cut by the last tick's rounding.
    credit_grace: Decimal = Decimal("0.5")
    # The smallest purchase through Stripe Checkout, in credits.
    checkout_min_credits: int = Field(500, ge=1)
    # Stripe: unset secret key = no purchases (checkout answers 501), free and admin grants only.
    stripe_secret_key: str = Field("", repr=False)
    stripe_webhook_secret: str = Field("", repr=False)
    # Stripe's API root (for stripe-mock in tests); empty = Stripe's own.
    stripe_api_base: str = ""
    currency: str = "usd"
    # Where Stripe Checkout sends the buyer back; empty = <public URL>/v1/billing/checkout/done.
    checkout_success_url: str = ""
    checkout_cancel_url: str = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(_problems(e, values)) from None

    # ---- one field at a time (fields are validated in the order declared above) -----------------

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v.strip(), strict=True)
        except ValueError as e:
            raise ValueError(f"must be an IPv4 network such as 10.201.0.0/16 ({e})") from None
        if net.version != 4:
            raise ValueError("must be an IPv4 network such as 10.201.0.0/16 (sandbox links are IPv4)")
        if net.prefixlen > 30:
            raise ValueError("must hold at least one /30 link (a prefix length of 30 or less)")
        return str(net)

    @field_validator("pool_size")
    @classmethod
    def _pool_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = info.data.get("max_sandboxes")  # absent when max_sandboxes itself is invalid
        if limit is not None and v is not None and v > limit:
            raise ValueError(f"must be at most {env_name('max_sandboxes')} ({limit})")
        return v

    @field_validator("pool_sizes")
    @classmethod
    def _pool_sizes(cls, v: dict[str, int]) -> dict[str, int]:
        from e2a.templates import recipes
        for name, size in v.items():
            if name not in recipes.available():
                raise ValueError(f"names an unknown template {name!r} (known: "
                                 f"{', '.join(recipes.available())})")
            if size < 0:
                raise ValueError(f"gives {name!r} a negative size")
        return v

    def pool_size_of(self, template: str, recipe_default: int) -> int:
        """How many sandboxes of this template the warm pool keeps started."""
        if template in self.pool_sizes:
            return self.pool_sizes[template]
        return recipe_default if self.pool_size is None else self.pool_size

    @field_validator("platform")
    @classmethod
    def _platform(cls, v: str) -> str:
        if v and v not in PLATFORMS:
            raise ValueError(f"must be empty (each template's own) or one of {', '.join(PLATFORMS)}")
        return v

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str, info: ValidationInfo) -> str:
        if not INSTANCE_RE.match(v):
            raise ValueError("must be 1-8 lowercase letters and digits, starting with a letter"
                             " (it prefixes network interface names)")
        subnet = info.data.get("subnet")
        if subnet is not None:  # "<instance>-<highest slot>" must fit in an interface name
            slots = ipaddress.IPv4Network(subnet).num_addresses // 4
            longest = f"{v}-{slots - 1}"
            if len(longest) > IFNAMSIZ:
                raise ValueError(f"is too long for {env_name('subnet')}={subnet}: interface names such as"
                                 f" {longest} exceed {IFNAMSIZ} characters (use a shorter instance"
                                 " or a smaller subnet)")
        return v

    @field_validator("s3_endpoint", "s3_public_url")
    @classmethod
    def _s3_url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+/?$", v):
            raise ValueError("must be an http(s) URL of the S3 server alone, such as "
                             "https://s3.example.com (no path)")
        return v.rstrip("/")

    @field_validator("llm_anthropic_url", "llm_openai_url", "llm_google_url", "llm_deepseek_url")
    @classmethod
    def _llm_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("must be the http(s) URL of the provider's API root, such as "
                             "https://api.anthropic.com")
        return v.rstrip("/")

    @field_validator("kube_nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        for ns in v:
            try:
                ipaddress.IPv4Address(ns)
            except ValueError:
                raise ValueError(f"must be IPv4 addresses, e.g. [\"1.1.1.1\"]; {ns!r} is not "
                                 "one") from None
        return v

    @field_validator("kube_egress_host")
    @classmethod
    def _egress_host(cls, v: str) -> str:
        if v:
            try:
                ipaddress.IPv4Address(v)
            except ValueError:
                raise ValueError("must be an IPv4 address (this replica's, as sandbox pods "
                                 "reach it)") from None
        return v

    @field_validator("agent_key")
    @classmethod
    def _agent_key(cls, v: str) -> str:
        if v and len(v.strip()) < 32:
            raise ValueError("must be at least 32 characters, e.g. from `openssl rand -hex 32`")
        return v.strip()

    @field_validator("secrets_key", "secrets_old_keys")
    @classmethod
    def _fernet_keys(cls, v: str, info: ValidationInfo) -> str:
        from cryptography.fernet import Fernet
        keys = [k.strip() for k in v.split(",")] if info.field_name == "secrets_old_keys" else [v.strip()]
        keys = [k for k in keys if k]
        for i, key in enumerate(keys):
            try:
                Fernet(key)
            except ValueError:
                which = "" if info.field_name == "secrets_key" else f" (key {i + 1} of {len(keys)})"
                raise ValueError(f"must be a Fernet key{which}: urlsafe base64 of 32 bytes, as "
                                 "Fernet.generate_key() makes") from None
        return ",".join(keys)

    @field_validator("llm_private_hosts")
    @classmethod
    def _llm_private_hosts(cls, v: str) -> str:
        parse_private_hosts(v)
        return v

    @field_validator("rate_vcpu_second", "rate_gib_second", "rate_workspace_gib_hour",
                     "credit_grace", mode="before")
    @classmethod
    def _credits(cls, v: Any) -> Decimal:
        try:
            d = Decimal(str(v).strip())
        except InvalidOperation:
            raise ValueError("must be a number of credits, such as 0.0014") from None
        if not d.is_finite() or d < 0 or d != d.quantize(Decimal("0.000001")):
            raise ValueError("must be a number of credits of at least 0 with at most 6 decimal "
                             "places (amounts are counted in millionths of a credit)")
        return d

    @field_validator("smtp_security")
    @classmethod
    def _smtp_security(cls, v: str) -> str:
        if v not in ("starttls", "tls", "none"):
            raise ValueError("must be starttls, tls or none")
        return v

    @field_validator("stripe_api_base", "checkout_success_url", "checkout_cancel_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        if not re.match(r"^[a-z]{3}$", v):
            raise ValueError("must be a three-letter ISO currency code in lower case, e.g. usd")
        return v

    @field_validator("s3_sse")
    @classmethod
    def _s3_sse(cls, v: str) -> str:
        if v not in ("", "AES256", "aws:kms"):
            raise ValueError("must be empty, AES256 or aws:kms")
        return v

    @field_validator("s3_bucket")
    @classmethod
    def _s3_bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v):
            raise ValueError("must be an S3 bucket name: 3-63 lowercase letters, digits, dots "
                             "and hyphens")
        return v

    @model_validator(mode="after")
    def _s3_credentials(self) -> Settings:
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key):
            raise ValueError(f"{env_name('s3_endpoint')} is set: {env_name('s3_access_key')} "
                             f"and {env_name('s3_secret_key')} must be set too")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if v:
            scheme, sep, rest = v.partition("://")
            if not sep or scheme not in DATABASE_SCHEMES or not rest:
                raise ValueError("must be a URL starting with " + " or ".join(s + "://" for s in DATABASE_SCHEMES))
        return v

    # ---- defaults derived from other fields ---------------------------------------------------

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'e2a.db'}"
        if not self.runsc:
            self.runsc = str(self.cache_dir / "bin" / "runsc")
        if not self.rclone:
            self.rclone = str(self.cache_dir / "bin" / "rclone")
        if not self.envd:
            self.envd = str(Path(__file__).resolve().parent.parent / "build" / "envd")
        return self


def canonical_host(host: str) -> str:
    """A host as the SSRF guard compares it: lowercase, without [brackets], an IP address in its
    usual form (so "[::1]" and "0:0::1" are one host)."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?$")


def parse_private_hosts(value: str) -> list[tuple[str, int | None]]:
    """E2A_LLM_PRIVATE_HOSTS as (canonical host, port or None for any port). Raises ValueError."""
    out = []
    for entry in (e.strip().lower() for e in value.split(",")):
        if not entry:
            continue
        host, port = entry, ""
        if entry.startswith("["):
            host, sep, rest = entry[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"has {entry!r}: an IPv6 address goes in brackets, [v6] or "
                                 "[v6]:port")
            port = rest[1:] if rest else ""
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"has {entry!r}, whose [brackets] hold no IPv6 address") from None
        elif entry.count(":") > 1:
            try:
                ipaddress.IPv6Address(entry)
            except ValueError:
                raise ValueError(f"has {entry!r}: neither a host nor host:port (an IPv6 address "
                                 "with a port goes in brackets, [v6]:port)") from None
        elif ":" in entry:
            host, port = entry.split(":")
        if not entry.startswith("[") and entry.count(":") <= 1 and not _HOST_RE.match(host):
            raise ValueError(f"has {entry!r}, which is not a host name or address (entries are "
                             "comma-separated host, host:port, [v6] or [v6]:port)")
        if (port or entry.endswith(":")) and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"has {entry!r}, whose port is not a number from 1 to 65535")
        out.append((canonical_host(host), int(port) if port else None))
    return out


def _problems(error: ValidationError, given: dict[str, Any]) -> list[str]:
    """``e2a: invalid setting E2A_PORT='abc': must be an integer from 1 to 65535``, one per error."""
    from_env = {k.upper() for k, v in os.environ.items() if v}  # names are read case-insensitively
    lines = []
    for err in error.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = env_name(field) if field else "E2A_*"
        if err["type"] == "value_error":  # raised by one of our validators: its message as is
            reason = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            reason = _EXPECTED.get(field, err["msg"][:1].lower() + err["msg"][1:])
        if not field:  # a check across settings: its message names them
            lines.append(f"e2a: invalid settings: {reason}")
            continue
        source = "" if field in given or name in from_env else " (default)"
        value = "<hidden>" if field in _HIDDEN else repr(str(err.get("input")))
        lines.append(f"e2a: invalid setting {name}={value}{source}: {reason}")
    return lines
