"""One SSRF guard for every URL e2a's host calls on a caller's behalf (docs/agents.md "SSRF guard").

A caller may give the URL of its own LLM API (`llm.base_url`, a stored LLM_BASE_URL, an egress
grant's upstream). e2a then calls it from the host, which sees what sandboxes and callers must not:
loopback services, the local network, the cloud's metadata address. So such a URL is checked
twice:

- once when it is given (`check_url`): https only (http only for a host the operator allowed), no
  user name or password, and every address its host resolves to public;
- again at every connection (`GuardedBackend`, the network backend of the HTTP clients that call
  it): the backend resolves the host itself, checks every address, and connects to an address it
  checked. A name that resolved to a public address at the first check and to 127.0.0.1 at the
  next request (DNS rebinding) is refused then. TLS is still verified against the URL's host name
  (httpcore starts TLS with the origin's host as server name; tests/unit/test_ssrf.py checks it).

The guarded clients follow no redirects (a 3xx is an answer, never a second request), and use
no proxy from the environment (a proxy would connect where the guard cannot see).

"Public" is `public()`, a table of its own: Python's `ipaddress.is_global` calls some addresses
global that reach the host's own networks (64:ff9b::a00:1 is NAT64 for 10.0.0.1), and addresses
embedding an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) are judged by the address inside.

Allowed despite the table (`Policy`): the hosts of E2A_LLM_PRIVATE_HOSTS (`host`, `host:port`,
`[v6]`, `[v6]:port`; a plain host means any port) and of the operator's own upstreams
(E2A_LLM_<VENDOR>_URL, at their port), which the operator set and e2a trusts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from e2a.config import canonical_host, parse_private_hosts

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (as strings); tests inject their own
Resolver = Callable[[str, int], Awaitable[list[str]]]

# ---- what is public ---------------------------------------------------------------------------

_net = ipaddress.ip_network
# Not public, with what each is (IANA's special-purpose registry, RFC 6890 and successors).
V4_NOT_PUBLIC = [
    (_net("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (_net("10.0.0.0/8"), "private"),
    (_net("100.64.0.0/10"), "shared (CGNAT)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_net("172.16.0.0/12"), "private"),
    (_net("192.0.0.0/24"), "IETF protocol assignment"),
    (_net("192.0.2.0/24"), "documentation"),
    (_net("192.88.99.0/24"), "6to4 relay anycast"),
    (_net("192.168.0.0/16"), "private"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("198.51.100.0/24"), "documentation"),
    (_net("203.0.113.0/24"), "documentation"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved"),   # 255.255.255.255 included
]
V6_NOT_PUBLIC = [
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    (_net("::/96"), "IPv4-compatible (deprecated)"),
    (_net("::ffff:0:0:0/96"), "IPv4-translated"),
    (_net("64:ff9b:1::/48"), "local-use NAT64"),
    (_net("100::/64"), "discard-only"),
    (_net("2001::/23"), "IETF protocol assignment"),   # Teredo (2001::/32) is unwrapped first
    (_net("2001:db8::/32"), "documentation"),
    (_net("3fff::/20"), "documentation"),
    (_net("fc00::/7"), "private (unique local)"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local"),
    (_net("ff00::/8"), "multicast"),
]
_GLOBAL_UNICAST = _net("2000::/3")
_NAT64 = _net("64:ff9b::/96")
_TEREDO = _net("2001::/32")
_6TO4 = _net("2002::/16")


def address(ip: str | IPAddress) -> IPAddress:
    """An address as getaddrinfo gives it (an IPv6 one may carry a %scope), without the scope."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = str(ip)
    return ipaddress.ip_address(ip.split("%", 1)[0])


def not_public(ip: str | IPAddress) -> str | None:
    """What kind of non-public address `ip` is ("loopback", "private", ...); None if public."""
    ip = address(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return next((why for net, why in V4_NOT_PUBLIC if ip in net), None)
    inner: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        inner = [("IPv4-mapped", ip.ipv4_mapped)]
    elif ip in _NAT64:
        inner = [("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    elif ip in _6TO4:
        inner = [("6to4", ip.sixtofour)]
    elif ip in _TEREDO:
        server, client = ip.teredo
        inner = [("Teredo server", server), ("Teredo client", client)]
    for kind, v4 in inner:
        why = not_public(v4)
        if why:
            return f"{kind} {why}"
    if inner:
        return None
    why = next((why for net, why in V6_NOT_PUBLIC if ip in net), None)
    if why is None and ip not in _GLOBAL_UNICAST:
        why = "reserved"
    return why


def public(ip: str | IPAddress) -> bool:
    """Whether e2a's host may call `ip` for a caller: a globally reachable unicast address, also
    inside the IPv6 forms that embed an IPv4 address."""
    return not_public(ip) is None


# ---- the policy -------------------------------------------------------------------------------

class UrlRefused(Exception):
    """A URL (or a connection to its host) e2a refuses to call. The message names what is wrong
    and never quotes the URL (whose user info may hold a credential): `problem` reads after a
    subject, "the URL" by default, a field's name in an API error (`about`)."""

    def __init__(self, problem: str, subject: str = "the URL"):
        super().__init__(f"{subject} {problem}")
        self.problem, self.subject = problem, subject

    def about(self, name: str) -> str:
        return f"{name} {self.problem}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The event loop's resolver (getaddrinfo in its executor: never blocks the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class Policy:
    """Which non-public hosts e2a may call anyway, and how names are resolved."""

    # (canonical host, port or None for any port)
    allowed: frozenset[tuple[str, int | None]] = frozenset()
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings, resolver: Resolver | None = None) -> Policy:
        """E2A_LLM_PRIVATE_HOSTS and the hosts of the operator's own upstream URLs."""
        policy = cls(frozenset(parse_private_hosts(settings.llm_private_hosts)), resolver)
        return policy.allowing(*(getattr(settings, f"llm_{v}_url") for v in
                                 ("anthropic", "openai", "google", "deepseek")))

    def allowing(self, *urls: str) -> Policy:
        """This policy, also allowing each URL's host at its port (the operator's upstreams)."""
        more = set()
        for url in urls:
            parts = urlsplit(url)
            if parts.hostname:
                more.add((canonical_host(parts.hostname),
                          parts.port or (443 if parts.scheme == "https" else 80)))
        return Policy(self.allowed | more, self.resolver)

    def allows(self, host: str, port: int) -> bool:
        """Whether host:port is allowed although not public. The host as the URL names it:
        allowing 127.0.0.1 does not allow localhost, nor a name that resolves to 127.0.0.1."""
        h = canonical_host(host)
        return (h, None) in self.allowed or (h, port) in self.allowed

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` resolves to, in the resolver's order, each once. Raises OSError
        or UnicodeError (the name does not resolve), ValueError (an address that is none)."""
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return [address(bare)]   # an IP address in the usual form: nothing to resolve
        except ValueError:
            pass
        found = await (self.resolver or system_resolver)(bare, port)
        out: list[IPAddress] = []
        for a in found:
            ip = address(a)
            if ip not in out:
                out.append(ip)
        if not out:
            raise OSError(f"no address for {bare!r}")
        return out


# ---- a URL, when it is given --------------------------------------------------------------------

_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


async def check_url(url: str, policy: Policy) -> str:
    """`url` (without a trailing slash) if e2a may call it: https (http only for an allowed
    host), no user info, and every address of its host public or allowed. Raises UrlRefused."""
    if not isinstance(url, str) or _BAD_CHARS.search(url):
        raise UrlRefused("is not a valid URL (it holds spaces, control characters or "
                         "backslashes)")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
    except ValueError:   # an unclosed [IPv6], a port that is no number or out of range
        raise UrlRefused("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused("must be an https URL")
    if "@" in parts.netloc:
        raise UrlRefused("must not hold a user name or password (give the key as the key)")
    if not host:
        raise UrlRefused("must be an https URL with a host")
    if port == 0:
        raise UrlRefused("is not a valid URL (port 0)")
    port = port or (443 if scheme == "https" else 80)
    allowed = policy.allows(host, port)
    if scheme == "http" and not allowed:
        raise UrlRefused("must be an https URL (http only for a host the operator allowed in "
                         "E2A_LLM_PRIVATE_HOSTS)")
    try:
        addresses = await policy.resolve(host, port)
    except (OSError, UnicodeError, ValueError):
        raise UrlRefused(f"names host {host!r}, which does not resolve") from None
    if not allowed:
        for ip in addresses:
            why = not_public(ip)
            if why:
                raise UrlRefused(_not_public(host, ip, why))
    return url.rstrip("/")


def _not_public(host: str, ip: IPAddress, why: str) -> str:
    if canonical_host(host) == str(ip):
        return f"names {_a(why)} address, not a public one"
    return f"names host {host!r}, which resolves to {_a(why)} address, not a public one"


def _a(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" or words.startswith("IPv") else "a ") + words


# ---- every connection ---------------------------------------------------------------------------

class GuardedBackend:
    """An httpcore (or httpcore2) network backend that resolves each host itself, refuses the
    connection if any address is not public (unless the policy allows the host at that port),
    and connects to one of the addresses it checked: the address checked is the address
    connected to. `core` is the httpcore module it serves."""

    def __init__(self, policy: Policy, core: Any):
        self.policy = policy
        self.core = core
        self.inner = core.AnyIOBackend()
        self.refused = _refused_class(core)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable | None = None):
        start = time.monotonic()
        try:
            addresses = await asyncio.wait_for(self.policy.resolve(host, port), timeout)
        except asyncio.TimeoutError:
            raise self.core.ConnectTimeout(f"resolving {host!r} timed out") from None
        except (OSError, UnicodeError, ValueError) as exc:
            raise self.core.ConnectError(f"host {host!r} does not resolve ({exc})") from None
        if not self.policy.allows(host, port):
            for ip in addresses:
                why = not_public(ip)
                if why:
                    raise self.refused(
                        f"resolves to {_a(why)} address, not a public one: e2a connects only to "
                        "public addresses", subject=f"host {host!r}")
        failed: Exception | None = None
        for ip in addresses:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            try:
                return await self.inner.connect_tcp(str(ip), port, timeout=left,
                                                    local_address=local_address,
                                                    socket_options=socket_options)
            except self.core.ConnectError as exc:
                failed = exc
        assert failed is not None
        raise failed

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable | None = None):
        raise self.refused("is a unix socket: e2a connects only to public addresses",
                           subject=repr(path))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


_REFUSED: dict[str, type] = {}


def _refused_class(core: Any) -> type:
    """UrlRefused that is also `core`'s ConnectError, so every client maps it as it maps a
    connection that failed (httpx: ConnectError; the SDKs: APIConnectionError), with the
    refusal as its cause (`refusal` finds it)."""
    cls = _REFUSED.get(core.__name__)
    if cls is None:
        cls = _REFUSED[core.__name__] = type("ConnectionRefusedByGuard",
                                              (UrlRefused, core.ConnectError), {})
    return cls


def _guard(transport: Any, policy: Policy, core: Any) -> Any:
    pool = transport._pool
    if not isinstance(pool, core.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError(f"{core.__name__}'s transport changed: its connection pool cannot "
                           "take e2a's SSRF guard")
    pool._network_backend = GuardedBackend(policy, core)
    return transport


def _no_redirects(kw: dict) -> None:
    if kw.pop("follow_redirects", False):
        raise ValueError("a guarded client follows no redirects")
    for name in ("transport", "mounts", "proxy"):
        if kw.get(name) is not None:
            raise ValueError(f"a guarded client takes no {name}: it makes its own")


def guarded_httpx_transport(policy: Policy, **kw):
    """An httpx transport whose every connection goes through the guard."""
    import httpcore
    import httpx
    return _guard(httpx.AsyncHTTPTransport(**kw), policy, httpcore)


def guarded_httpx2_transport(policy: Policy, **kw):
    """The same for httpx2 (the fork the anthropic and openai SDKs speak)."""
    import httpcore2
    import httpx2
    return _guard(httpx2.AsyncHTTPTransport(**kw), policy, httpcore2)


def guarded_httpx_client(policy: Policy, *, limits=None, http2: bool = False,
                         verify: Any = True, **kw):
    """An httpx.AsyncClient that connects only through the guard and follows no redirects."""
    import httpx
    _no_redirects(kw)
    transport = guarded_httpx_transport(policy, limits=limits or httpx.Limits(),
                                        http2=http2, verify=verify)
    return httpx.AsyncClient(transport=transport, follow_redirects=False, **kw)


# The SDKs' own socket options (their default transport's): keepalive probes, so a connection
# that died during a long streamed answer is noticed.
def _keepalive() -> list[tuple[int, int, int]]:
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5), ("TCP_KEEPIDLE", 60)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


def guarded_httpx2_client(policy: Policy, factory: Callable[..., Any] | None = None, *,
                          limits=None, http2: bool = False, verify: Any = True, **kw):
    """An httpx2 client made by `factory` (e.g. anthropic.DefaultAsyncHttpxClient, for the
    SDK's defaults; httpx2.AsyncClient if None) on a guarded transport, following no
    redirects."""
    import httpx2
    _no_redirects(kw)
    transport = guarded_httpx2_transport(
        policy, limits=limits or httpx2.Limits(max_connections=1000,
                                                max_keepalive_connections=100),
        http2=http2, verify=verify, socket_options=_keepalive())
    return (factory or httpx2.AsyncClient)(transport=transport, follow_redirects=False, **kw)


# ---- what the providers show --------------------------------------------------------------------

def refusal(exc: BaseException | None) -> UrlRefused | None:
    """The guard's refusal behind an exception (a client's ConnectError, an SDK's connection
    error), if it is one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UrlRefused):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def redirected(location: str | None) -> str:
    """What a provider's 3xx answer means to the caller (its target's origin, never its path
    or user info; the status is the ProviderError's)."""
    where = ""
    try:
        target = urlsplit(location or "")
        if target.hostname:
            port = f":{target.port}" if target.port else ""
            host = f"[{target.hostname}]" if ":" in target.hostname else target.hostname
            where = f" to {target.scheme}://{host}{port}"
    except ValueError:
        pass
    return (f"the provider redirected{where}, and e2a does not follow redirects: the base URL "
            "must be where the API itself is served")
