"""The SSRF guard (e2a/agents/ssrf.py): which addresses are public, what a caller's URL may be,
and the connection-time check that closes DNS rebinding, for every client that calls a caller's
URL (the providers' SDK clients, the egress proxy), with real servers on this host. No test here
needs the internet: names are resolved by the system (localhost, numeric forms) or by a resolver
the test injects."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import threading

import httpx
import httpx2
import pytest

from e2a.agents import ssrf
from e2a.agents.egress import Egress
from e2a.agents.ssrf import Policy, UrlRefused, check_url, public
from e2a.agents.own import providers
from e2a.agents.own.llm import ProviderError, UserText
from e2a.agents.own.providers.anthropic import AnthropicProvider
from e2a.agents.own.providers.gemini import GeminiProvider
from e2a.agents.own.providers.openai import ChatCompletionsProvider, OpenAIResponsesProvider
from e2a.config import Settings, SettingsError, parse_private_hosts
from tests.unit.protocols import turn

# ---- public() ---------------------------------------------------------------------------------

NOT_PUBLIC = [
    # IPv4
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254",
    "127.0.0.1", "127.255.0.1", "169.254.169.254", "169.254.0.1", "172.16.0.1",
    "172.31.255.255", "192.0.0.8", "192.0.0.9", "192.0.0.170", "192.0.2.1", "192.88.99.1",
    "192.168.1.1", "198.18.0.1", "198.19.255.255", "198.51.100.7", "203.0.113.9", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6
    "::", "::1", "::127.0.0.1", "fe80::1", "fe80::1%1", "fc00::1", "fd12:3456::1", "fec0::1",
    "ff02::1", "ff0e::1", "2001:db8::1", "3fff::1", "100::1", "2001:2::1", "2001:10::1",
    "5f00::1", "::ffff:0:7f00:1",
    # IPv6 embedding a non-public IPv4 address
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",
    "64:ff9b::127.0.0.1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
    "64:ff9b:1::808:808", "2002:7f00:1::1", "2002:a00:1::", "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",      # Teredo, client 192.0.2.45 (RFC 4380's)
    "2001:0:7f00:1::808:808",                    # Teredo, server 127.0.0.1
    "2001:0:808:808::80ff:fffe",                 # Teredo, client 127.0.0.1 (inverted)
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.1",
          "172.32.0.1", "192.0.1.1", "198.20.0.1", "223.255.255.254",
          "2606:4700:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8",
          "64:ff9b::808:808", "2002:808:808::1", "2001:0:808:808::f7f7:f7f7"]


@pytest.mark.parametrize("ip", NOT_PUBLIC)
def test_not_public(ip):
    assert not public(ip), ip
    assert ssrf.not_public(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public(ip):
    assert public(ip), (ip, ssrf.not_public(ip))


def test_where_python_says_global_the_table_does_not():
    """The reason for a table of our own."""
    for ip in ("64:ff9b::a00:1", "192.0.0.8"):
        assert ipaddress.ip_address(ip).is_global and not public(ip)


def test_what_each_is_called():
    assert ssrf.not_public("127.0.0.1") == "loopback"
    assert ssrf.not_public("100.64.0.1") == "shared (CGNAT)"
    assert ssrf.not_public("::ffff:169.254.169.254") == "IPv4-mapped link-local (cloud metadata)"
    assert ssrf.not_public("64:ff9b::a00:1") == "NAT64 private"
    assert ssrf.not_public("2002:7f00:1::1") == "6to4 loopback"


# ---- check_url --------------------------------------------------------------------------------

def fake_resolver(table: dict[str, list[str]]):
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    resolve.calls = calls
    return resolve


PUBLIC_NAMES = {"api.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
                "mixed.example.com": ["93.184.216.34", "10.0.0.7"],
                "mapped.example.com": ["::ffff:127.0.0.1"],
                "nat64.example.com": ["64:ff9b::a9fe:a9fe"],
                "llm.lan": ["10.0.0.5"]}


def check(url: str, policy: Policy | None = None) -> str:
    return asyncio.run(check_url(url, policy or Policy(resolver=fake_resolver(PUBLIC_NAMES))))


def refused(url: str, policy: Policy | None = None) -> str:
    with pytest.raises(UrlRefused) as err:
        check(url, policy)
    return str(err.value)


def test_a_public_https_url_passes_without_its_trailing_slash():
    assert check("https://api.example.com/v1/") == "https://api.example.com/v1"
    assert check("https://api.example.com:8443") == "https://api.example.com:8443"
    assert check("HTTPS://api.example.com/v1") == "HTTPS://api.example.com/v1"
    assert check("https://93.184.216.34/v1") == "https://93.184.216.34/v1"


@pytest.mark.parametrize("url", [
    "https://localhost/v1", "https://localhost.:443/v1", "https://127.0.0.1/v1",
    "https://[::1]/v1", "https://10.1.2.3/v1", "https://169.254.169.254/latest",
    "https://100.64.0.1/", "https://0.0.0.0/", "https://[::]/", "https://[fe80::1]/",
    "https://[::ffff:127.0.0.1]/", "https://[::ffff:a9fe:a9fe]/", "https://[64:ff9b::a00:1]/",
    "https://[2002:7f00:1::1]/", "https://192.0.0.8/", "https://198.18.0.1/",
    # decimal, hex, octal and short IPv4 forms: getaddrinfo turns them into 127.0.0.1
    "https://2130706433/v1", "https://0x7f000001/v1", "https://0x7f.1/v1", "https://0177.0.0.1/v1",
    "https://127.1/v1", "https://017700000001/", "https://127.0.0.1.:443/v1",
])
def test_private_addresses_however_spelt_are_refused(url):
    """With the system's resolver (localhost and the numeric forms resolve without a network)."""
    message = refused(url, Policy())
    assert "public" in message or "does not resolve" in message, message


def test_a_name_resolving_to_any_private_address_is_refused():
    assert "10.0.0.7" not in refused("https://mixed.example.com/v1")   # the address is not shown
    assert "private address" in refused("https://mixed.example.com/v1")
    assert "IPv4-mapped loopback" in refused("https://mapped.example.com/v1")
    assert "NAT64 link-local" in refused("https://nat64.example.com/v1")
    assert "does not resolve" in refused("https://nowhere.example.com/v1")


def test_localhost_resolves_to_loopback_and_is_refused():
    assert "resolves to a loopback address" in refused("https://localhost/v1", Policy())


def test_the_loops_resolver_runs_off_the_loop(monkeypatch):
    """The default resolver is the event loop's: getaddrinfo in its executor, never blocking
    the loop that serves every other request."""
    threads = []
    real = socket.getaddrinfo

    def recording(*a, **kw):
        threads.append(threading.current_thread())
        return real(*a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", recording)
    refused("https://localhost/v1", Policy())
    assert threads and threading.main_thread() not in threads


@pytest.mark.parametrize("url, why", [
    ("http://api.example.com/v1", "https"), ("ftp://api.example.com/", "https"),
    ("api.example.com/v1", "https"), ("https:///v1", "host"), ("https://", "host"),
    ("https://[::1/v1", "not a valid URL"), ("https://api.example.com:99999/", "not a valid URL"),
    ("https://api.example.com:x/", "not a valid URL"), ("https://api.example.com:0/", "port 0"),
    ("https://api.example.com /v1", "not a valid URL"),
    ("https://api.example.com\\@x/", "not a valid URL"),
    ("https://api.example.com\n/v1", "not a valid URL"),
])
def test_malformed_and_non_https_urls_are_refused(url, why):
    assert why in refused(url)


@pytest.mark.parametrize("url", [
    "https://api.openai.com@127.0.0.1/", "https://user:pw@api.example.com/v1",
    "https://@api.example.com/",
    "https://api.example.com:443@localhost/", "https://u@api.example.com/",
])
def test_user_info_is_refused_and_never_shown(url):
    message = refused(url)
    assert "user name or password" in message
    for secret in ("pw", "api.openai.com", "u@"):
        assert secret not in message.replace("password", ""), message


def test_the_api_error_names_the_field_and_never_the_credential():
    message = refused("https://user:s3cr3t-KEY@localhost/v1")
    assert "s3cr3t" not in message
    with pytest.raises(UrlRefused) as err:
        check("https://localhost/v1", Policy())
    assert err.value.about("llm.base_url").startswith("llm.base_url names host 'localhost'")


def test_allowed_hosts_any_port_or_one_port():
    policy = Policy(frozenset(parse_private_hosts("llm.lan,127.0.0.1:8000,[::1]:9000")),
                    resolver=fake_resolver({**PUBLIC_NAMES, "localhost": ["127.0.0.1"]}))
    # a plain host: any port, http too
    assert check("http://llm.lan:1234/v1", policy) == "http://llm.lan:1234/v1"
    assert check("https://llm.lan/v1", policy) == "https://llm.lan/v1"
    # host:port: that port only
    assert check("http://127.0.0.1:8000/v1", policy) == "http://127.0.0.1:8000/v1"
    assert "https" in refused("http://127.0.0.1:8001/v1", policy)
    assert "loopback" in refused("https://127.0.0.1:8001/v1", policy)
    assert "loopback" in refused("https://127.0.0.1/v1", policy)
    assert check("http://[::1]:9000/", policy) == "http://[::1]:9000"
    assert check("http://[0:0::1]:9000/", policy) == "http://[0:0::1]:9000"
    assert "loopback" in refused("https://[::1]:9001/", policy)
    # hosts are matched as the URL names them: not a name that resolves to an allowed address
    assert "loopback" in refused("https://localhost:8000/", policy)
    # a spelling of an allowed address that is not the address is resolved, and refused
    assert "loopback" in refused("https://127.1:8001/", Policy(
        frozenset(parse_private_hosts("127.0.0.1:8000"))))


def test_policy_from_settings_allows_the_private_hosts_and_the_operators_upstreams():
    s = Settings(llm_private_hosts="LLM.lan, 10.0.0.5:8000, [FD00::1]:9000",
                 llm_openai_url="http://127.0.0.1:4000/v1", llm_google_url="http://[::1]:4001")
    p = Policy.from_settings(s)
    assert p.allows("llm.lan", 1) and p.allows("LLM.LAN", 443)
    assert p.allows("10.0.0.5", 8000) and not p.allows("10.0.0.5", 8001)
    assert p.allows("fd00::1", 9000) and p.allows("[fd00:0::1]", 9000)
    assert p.allows("127.0.0.1", 4000) and not p.allows("127.0.0.1", 4002)
    assert p.allows("::1", 4001)
    assert p.allows("api.anthropic.com", 443) and not p.allows("api.anthropic.com", 22)


@pytest.mark.parametrize("value", ["a b", "[::1", "[::1]x", "[llm]:80", "h:0", "h:65536", "h:",
                                   "h:x", "1:2:3", "a/b", "http://h"])
def test_a_bad_private_hosts_setting_is_refused_at_start(value):
    with pytest.raises(SettingsError) as err:
        Settings(llm_private_hosts=value)
    assert "E2A_LLM_PRIVATE_HOSTS" in str(err.value)


# ---- servers on this host ---------------------------------------------------------------------

class Recorder:
    """An HTTP server on 127.0.0.1 (a thread) recording each request, answering with `answer`."""

    def __init__(self, answer=lambda h: (200, {}, b"{}")):
        self.hits: list[str] = []
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                rec.hits.append(self.path)
                status, headers, body = answer(self)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Listener:
    """A bare TCP port on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def listener():
    listen = Listener()
    yield listen
    listen.close()


def own_providers(base: str, policy: Policy):
    """One provider of each protocol e2a's own agent speaks, at `base`, no retries."""
    common = dict(key="sk-test", base_url=base, policy=policy, max_retries=0, timeout=10)
    return [AnthropicProvider(model="claude-sonnet-4-6", **common),
            OpenAIResponsesProvider(model="gpt-5", **common),
            ChatCompletionsProvider(model="local-model", **common),
            GeminiProvider(model="gemini-2.5-pro", **common)]


# ---- DNS rebinding ----------------------------------------------------------------------------

def rebinding():
    """A resolver for rebind.example: public the first time it is asked, 127.0.0.1 after."""
    asked = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["93.184.216.34"] if len(asked) == 1 else ["127.0.0.1"]
    resolve.asked = asked
    return resolve


@pytest.mark.parametrize("which", range(4), ids=["anthropic", "openai-responses",
                                                 "chat-completions", "gemini"])
def test_dns_rebinding_is_refused_at_connect_time(listener, which):
    """The name passes the check at create (public then), then resolves to 127.0.0.1 when the
    provider's SDK connects: the guard refuses, and nothing reaches the local port."""
    resolver = rebinding()
    policy = Policy(resolver=resolver)
    base = asyncio.run(check_url(f"https://rebind.example:{listener.port}/v1", policy))
    provider = own_providers(base, policy)[which]
    with pytest.raises(ProviderError) as err:
        turn(provider, [UserText("hi")])
    message = str(err.value)
    assert "e2a did not call" in message and "loopback" in message, message
    assert "rebind.example" in message
    assert listener.accepted == 0
    assert len(resolver.asked) >= 2      # the guard resolved the name again itself


def test_rebinding_refused_for_plain_clients_too(listener):
    """httpx (the Gemini SDK's, the egress proxy's) and httpx2 (anthropic's, openai's): the
    refusal is each library's ConnectError, with the guard's reason as its cause."""
    async def go():
        url = f"https://rebind.example:{listener.port}/"
        policy = Policy(resolver=fake_resolver({"rebind.example": ["127.0.0.1"]}))
        async with ssrf.guarded_httpx_client(policy) as c:
            with pytest.raises(httpx.ConnectError) as one:
                await c.get(url)
        async with ssrf.guarded_httpx2_client(policy) as c:
            with pytest.raises(httpx2.ConnectError) as two:
                await c.get(url)
        return one.value, two.value
    one, two = asyncio.run(go())
    for exc in (one, two):
        assert isinstance(ssrf.refusal(exc), UrlRefused) and "loopback" in str(exc)
    assert listener.accepted == 0


def test_every_address_is_checked_and_a_checked_one_connected_to(listener):
    """A name with a public and a private address is refused whole; a name the policy allows
    is connected to at the address the guard resolved (here only the test's resolver knows
    it); an allowed address does not allow a name that resolves to it."""
    async def go():
        mixed = Policy(resolver=fake_resolver({"mixed.test": ["93.184.216.34", "127.0.0.1"]}))
        async with ssrf.guarded_httpx_client(mixed) as c:
            with pytest.raises(httpx.ConnectError) as err:
                await c.get(f"http://mixed.test:{listener.port}/")
        assert ssrf.refusal(err.value)
        names = fake_resolver({"named.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        allowed = Policy(frozenset({("named.test", listener.port),
                                    ("127.0.0.1", listener.port)}), resolver=names)
        async with ssrf.guarded_httpx_client(allowed) as c:
            with pytest.raises(httpx.HTTPError) as err:   # the listener hangs up at once
                await c.get(f"http://named.test:{listener.port}/")
            assert not ssrf.refusal(err.value)
            with pytest.raises(httpx.ConnectError) as err:
                await c.get(f"http://other.test:{listener.port}/")
            assert ssrf.refusal(err.value)
    asyncio.run(go())
    assert listener.accepted == 1


def test_egress_refuses_a_grant_upstream_that_rebinds(listener):
    """The egress proxy's upstream client goes through the guard: a grant's own upstream (a
    caller's API root) that resolves to 127.0.0.1 by now gets a 502 naming the refusal."""
    from tests.e2e.server import free_port

    async def go():
        e = Egress({"anthropic": "https://api.anthropic.com"}, free_port(), host="127.0.0.1",
                   policy=Policy(resolver=fake_resolver({"own.example": ["127.0.0.1"]})))
        await e.start()
        try:
            g = e.grant("127.0.0.1", "anthropic", "sk-ant-REAL",
                        upstream=f"https://own.example:{listener.port}/")
            assert g.upstream == f"https://own.example:{listener.port}"
            async with httpx.AsyncClient() as c:
                r = await c.post(f"http://127.0.0.1:{e.port}/anthropic/v1/messages",
                                 headers={"x-api-key": g.placeholder}, json={})
            return r
        finally:
            await e.stop()
    r = asyncio.run(go())
    assert r.status_code == 502 and "loopback" in r.json()["error"]["message"], r.text
    assert "REAL" not in r.text
    assert listener.accepted == 0


def test_egress_grant_upstream_is_used_instead_of_the_vendors():
    rec = Recorder(lambda h: (200, {"content-type": "application/json"}, b'{"ok": true}'))
    from tests.e2e.server import free_port

    async def go():
        e = Egress({"anthropic": "https://api.anthropic.com"}, free_port(), host="127.0.0.1",
                   policy=Policy(frozenset({("127.0.0.1", rec.port)})))
        await e.start()
        try:
            g = e.grant("127.0.0.1", "anthropic", "sk-ant-REAL",
                        upstream=f"http://127.0.0.1:{rec.port}/gw")
            async with httpx.AsyncClient() as c:
                return await c.post(f"http://127.0.0.1:{e.port}/anthropic/v1/messages",
                                    headers={"x-api-key": g.placeholder}, json={})
        finally:
            await e.stop()
    try:
        r = asyncio.run(go())
    finally:
        rec.close()
    assert r.status_code == 200 and rec.hits == ["/gw/v1/messages"]


# ---- redirects --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", range(4), ids=["anthropic", "openai-responses",
                                                 "chat-completions", "gemini"])
def test_a_redirect_to_a_private_target_is_not_followed(which):
    """An allowed host (its one port allowed) answers 307 to another port of 127.0.0.1, which is
    not allowed: the provider call fails saying so, and the target sees no request."""
    target = Recorder()
    outer = Recorder(lambda h: (307, {"location": f"http://127.0.0.1:{target.port}{h.path}"},
                                b""))
    try:
        policy = Policy(frozenset({("127.0.0.1", outer.port)}))
        base = asyncio.run(check_url(f"http://127.0.0.1:{outer.port}/v1", policy))
        with pytest.raises(ProviderError) as err:
            turn(own_providers(base, policy)[which], [UserText("hi")])
    finally:
        outer.close()
        target.close()
    message = str(err.value)
    assert "redirected" in message and "does not follow redirects" in message, message
    assert f"http://127.0.0.1:{target.port}" in message and err.value.status == 307
    assert outer.hits and not target.hits


def test_the_guard_refuses_the_redirect_target_itself():
    """Had a redirect been followed, its target's connection would be checked as well."""
    target = Recorder()
    try:
        async def go():
            async with ssrf.guarded_httpx2_client(Policy(frozenset({("127.0.0.1", 1)}))) as c:
                with pytest.raises(httpx2.ConnectError):
                    await c.get(f"http://127.0.0.1:{target.port}/")
        asyncio.run(go())
    finally:
        target.close()
    assert not target.hits


def test_guarded_clients_take_no_redirects_nor_transport():
    for make in (ssrf.guarded_httpx_client, ssrf.guarded_httpx2_client):
        with pytest.raises(ValueError):
            make(Policy(), follow_redirects=True)
        with pytest.raises(ValueError):
            make(Policy(), transport=object())
        with pytest.raises(ValueError):
            make(Policy(), proxy="http://proxy.example:3128")


def test_make_needs_a_policy():
    with pytest.raises(TypeError):
        providers.make("anthropic", None, "k", "https://api.anthropic.com")


# ---- TLS ----------------------------------------------------------------------------------------

def certificates(tmp_path, name: str):
    """A CA and a server certificate for `name` signed by it (files): (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2a test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = tmp_path / f"{name}-ca.pem", tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def tls_server(cert, key, seen_sni: list):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, ctx_: seen_sni.append(name)

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = json.dumps({"ok": True}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_tls_verifies_the_url_host_name_when_connecting_to_the_checked_ip(tmp_path, library):
    """The guard resolves llm.test itself (allowed at this port; only the test's resolver knows
    it) and connects to 127.0.0.1; TLS still sends llm.test as SNI and verifies the certificate
    against llm.test: a cert for another name fails, though the address is the same."""
    ca, cert, key = certificates(tmp_path, "llm.test")
    other_ca, other_cert, other_key = certificates(tmp_path, "other.test")

    async def go():
        sni: list = []
        results = []
        for c, k, a in ((cert, key, ca), (other_cert, other_key, other_ca)):
            server = await tls_server(c, k, sni)
            port = server.sockets[0].getsockname()[1]
            policy = Policy(frozenset({("llm.test", port)}),
                            resolver=fake_resolver({"llm.test": ["127.0.0.1"]}))
            verify = ssl.create_default_context(cafile=str(a))
            make = ssrf.guarded_httpx_client if library == "httpx" else ssrf.guarded_httpx2_client
            try:
                async with make(policy, verify=verify) as client:
                    try:
                        r = await client.get(f"https://llm.test:{port}/v1")
                        results.append((r.status_code, r.json()))
                    except (httpx.ConnectError, httpx2.ConnectError) as exc:
                        results.append(exc)
            finally:
                server.close()
                await server.wait_closed()
        return sni, results
    sni, (good, bad) = asyncio.run(go())
    assert good == (200, {"ok": True})
    assert sni == ["llm.test", "llm.test"]   # the URL's name, not the address connected to
    assert isinstance(bad, Exception) and "CERTIFICATE_VERIFY_FAILED" in str(bad), bad
    assert "Hostname mismatch" in str(bad) and "'llm.test'" in str(bad), bad
