"""Attacks on agent sessions (docs/sessions.md), secret bundles (docs/secrets.md) and the SSRF
guard on their base URLs, against the real server:

(a) a tenant (API key) after another tenant's sessions, bundles and sandboxes, or making the
    host call private services (a hot-replaced LLM_BASE_URL);
(b) an end user holding only a session's JWT: forged tokens (alg none, other algorithms, other
    keys), another session's or tenant's token, a token after DELETE or as an API key, the
    WebSocket's `after`, floods (pings, tasks, connections, huge frames), attachments with odd
    names or planted symlinks;
(c) the session's sandbox code looking for the LLM key or the JWT, or for the host's API;
(d) a local unprivileged host user after the master key, the bundles or the tokens.

A test marked xfail(strict=True, reason="HOLE: ...") shows a hole that is still open: it fails
now, and the fix makes it pass (then strict xfail fails the suite: drop the mark).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import threading
import time
import uuid

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import wait_for
from tests.e2e import sessions
from tests.e2e.sessions import (MODEL, Conn, Listener, bundle, finished, refused,
                                signing_key)
from tests.security.conftest import NOBODY, as_user

SEEN_SECRETS: list[str] = []   # every key and JWT of this module: none may reach the log


# ---- helpers ---------------------------------------------------------------------------------

def new_key(prefix: str = "sk-ant-") -> str:
    key = prefix + "SESATK" + uuid.uuid4().hex
    SEEN_SECRETS.append(key)
    return key


def create(http, **body) -> dict:
    body.setdefault("user_id", "atk-" + uuid.uuid4().hex[:8])
    ticket = sessions.create(http, **body)
    SEEN_SECRETS.append(ticket["jwt"])
    return ticket


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def hs256(claims: dict, key: bytes) -> str:
    """A JWT signed by hand (PyJWT refuses an empty key)."""
    signed = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest())
    return f"{signed}.{sig.decode().rstrip('=')}"


def claims_of(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


@pytest.fixture(scope="module")
def shared(server, keys, llm_mock):
    """One session of alice's, for the attacks that do not end it: (ticket, key, vm_id)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['alice']}"},
                      timeout=60) as http:
        key = new_key()
        llm_mock.scenario(key, final="ok")
        ticket = create(http, llm={"api_key": key, "model": MODEL})
        vm = http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()["vm_id"]
        yield ticket, key, vm
        http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


# ---- (c) the LLM key in what the end user sees -----------------------------------------------

def test_provider_error_quoting_the_key_does_not_reach_the_end_user(shared, server, llm_mock):
    """The tenant's key is the tenant's: the end user (a browser holding the JWT) must never
    see it. A provider (or an OpenAI-compatible gateway at a bundle's LLM_BASE_URL) that
    answers 401 "Incorrect API key provided: <key>" puts it into task_finished.error, which
    e2a sends as is. (The egress proxy cuts the key from answers for the CLIs; the own agent's
    errors are not cut.)"""
    ticket, key, _ = shared
    llm_mock.scenario(key, error={"status": 401,
                                  "message": f"Incorrect API key provided: {key}."})
    c = Conn(ticket)
    try:
        c.task("hello")
        evs = c.until_finished()
        done = finished(evs)
        assert done["state"] == "failed", done
        assert key not in json.dumps(evs), done["error"]
        # nor on a reconnect from the start
        again = Conn(ticket, after=0)
        replay = again.until_finished()
        assert key not in json.dumps(replay)
        again.close()
        # nor in the database in clear (tasks.error, task_events), where a host backup goes
        stored = b"".join(p.read_bytes() for p in (server.base / "data").glob("e2a.db*"))
        assert key.encode() not in stored
    finally:
        llm_mock.scenario(key, final="ok")
        c.close()


def test_key_with_a_line_break_is_refused_before_any_provider_echoes_it(http, llm_mock):
    """A key pasted from a wrapped terminal line holds a line break. It once went as the
    x-goog-api-key header; h11 refused it quoting the whole value, and the Gemini provider put
    str(exc) into the task's error: the end user read the tenant's key. Now such a key is a
    400 naming its field, in a bundle or inline (and the provider names only the exception's
    class)."""
    key = new_key("AIza")
    name = "nl-" + uuid.uuid4().hex[:8]
    r = http.post("/v1/tenants/me/secrets", json={"name": name, "values": {
        "LLM_API_KEY": key + "\nrest", "LLM_VENDOR": "google"}})
    assert r.status_code == 400 and r.json()["error"]["field"] == "values.LLM_API_KEY", r.text
    assert key not in r.text
    r = http.post("/v1/sessions", json={"user_id": "u", "llm": {
        "api_key": key + "\nrest", "vendor": "google"}})
    assert r.status_code == 400 and r.json()["error"]["field"] == "llm.api_key", r.text
    assert key not in r.text


def test_key_with_a_trailing_newline_still_works_and_is_not_echoed(http, llm_mock):
    """The common paste, a key ending in a newline: google-genai strips it, the task runs."""
    key = new_key("AIza")
    name = "tnl-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": key + "\n", "LLM_VENDOR": "google",
                        "LLM_MODEL": "gemini-2.5-flash"})
    llm_mock.scenario(key, final="fine")
    ticket = create(http, secrets=[name])
    c = Conn(ticket)
    try:
        c.task("hello")
        evs = c.until_finished(timeout=150)
        assert finished(evs)["state"] == "succeeded", finished(evs)
        assert key not in json.dumps(evs)
    finally:
        c.close()
        http.delete(f"/v1/sessions/{ticket['chat_session_id']}")
        http.delete(f"/v1/tenants/me/secrets/{name}")


# ---- (a)(b) tokens: forged, misused, another's, after the end --------------------------------

def test_forged_and_misused_tokens_are_refused(server, http, bob_http, keys, llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="ok")
    mine = create(http, llm={"api_key": key, "model": MODEL})
    theirs = create(bob_http, llm={"api_key": key, "model": MODEL})
    url, sid = mine["connect_url"], mine["chat_session_id"]
    real = mine["jwt"]
    claims = claims_of(real)
    head = json.loads(base64.urlsafe_b64decode(real.split(".")[0] + "=="))
    assert head["alg"] == "HS256" and claims["sub"] == sid
    skey = signing_key(server)

    def auth(tok):
        return {"Authorization": f"Bearer {tok}"}

    forged = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "alg None, signature kept": f"{b64({'alg': 'None', 'typ': 'JWT'})}.{b64(claims)}."
                                    f"{real.split('.')[2]}",
        "empty key": hs256(claims, b""),
        "guessable key": hs256(claims, b"secret"),
        "the API key as the HMAC key": hs256(claims, keys["alice"].encode()),
        "the host key itself": hs256(claims, (server.base / "data" / "agent.key").read_bytes()),
        "HS512 with the real key": jwt.encode(claims, skey, algorithm="HS512"),
        "HS384 with the real key": jwt.encode(claims, skey, algorithm="HS384"),
        "RS256 header, HS signature": f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(claims)}."
                                      f"{real.split('.')[2]}",
        "no aud": jwt.encode({k: v for k, v in claims.items() if k != "aud"}, skey,
                             algorithm="HS256"),
        "another aud": jwt.encode({**claims, "aud": "e2a-access"}, skey, algorithm="HS256"),
        "another iss": jwt.encode({**claims, "iss": "evil"}, skey, algorithm="HS256"),
        "no exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, skey,
                             algorithm="HS256"),
        "no ten": jwt.encode({k: v for k, v in claims.items() if k != "ten"}, skey,
                             algorithm="HS256"),
        "sub as a list": jwt.encode({**claims, "sub": [sid]}, skey, algorithm="HS256"),
        "expired beyond the leeway": jwt.encode({**claims, "exp": int(time.time()) - 30}, skey,
                                                algorithm="HS256"),
        "bob's session's token": theirs["jwt"],
        "bob's API key": keys["bob"],
        "alice's API key": keys["alice"],
        "tampered claims": f"{real.split('.')[0]}.{b64({**claims, 'exp': claims['exp'] + 9999})}"
                           f".{real.split('.')[2]}",
        "huge": real + "A" * 5000,
        "two tokens": f"{real} {real}",
    }
    for what, tok in forged.items():
        assert refused(url, auth(tok)) == 401, what
    # bob's token names bob's session: on alice's URL it is "another session's"; alice's on
    # bob's URL neither
    assert refused(theirs["connect_url"], auth(real)) == 401
    # the token as a subprotocol without the protocol's name, or in the query: no way around
    assert refused(url + f"?token={real}") == 401
    assert refused(url + f"?access_token={real}") == 401
    # A valid token whose `ten` names another tenant (needs the host key: shows the session's
    # owner is checked too, not just the signature)
    other_ten = jwt.encode({**claims, "ten": claims_of(theirs["jwt"])["ten"]}, skey,
                           algorithm="HS256")
    assert refused(url, auth(other_ten)) == 404
    # the JWT is no API key anywhere
    for method, path in (("GET", "/v1/sessions"), ("GET", f"/v1/sessions/{sid}"),
                         ("POST", f"/v1/sessions/{sid}/token"), ("DELETE", f"/v1/sessions/{sid}"),
                         ("GET", "/v1/sandboxes"), ("GET", "/v1/tenants/me/secrets"),
                         ("POST", "/v1/sessions")):
        r = httpx.request(method, server.url + path, headers=auth(real), json={}, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code)

    # bob, with his API key: nothing of alice's session, its sandbox or its events
    vm = http.get(f"/v1/sessions/{sid}").json()["vm_id"]
    for method, path in (("GET", f"/v1/sessions/{sid}"), ("DELETE", f"/v1/sessions/{sid}"),
                         ("POST", f"/v1/sessions/{sid}/token"), ("GET", f"/v1/sandboxes/{vm}"),
                         ("GET", f"/v1/sandboxes/{vm}/task"),
                         ("GET", f"/v1/sandboxes/{vm}/task/events"),
                         ("POST", f"/v1/sandboxes/{vm}/task/cancel"),
                         ("DELETE", f"/v1/sandboxes/{vm}")):
        r = bob_http.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    r = bob_http.post(f"/v1/sandboxes/{vm}/task", json={"task": "hi"})
    assert r.status_code == 404, r.text
    assert sid not in json.dumps(bob_http.get("/v1/sessions").json())
    assert http.get(f"/v1/sessions/{sid}").json()["state"] == "active"

    # after DELETE: its tokens open nothing, no new token is given
    Conn(mine).close()
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    assert refused(url, auth(real)) == 410
    assert http.post(f"/v1/sessions/{sid}/token").status_code == 409
    fresh = jwt.encode({**claims, "exp": int(time.time()) + 600}, skey, algorithm="HS256")
    assert refused(url, auth(fresh)) == 410
    # bob's session ended by deleting its sandbox (not the session): its token is done too
    bvm = bob_http.get(f"/v1/sessions/{theirs['chat_session_id']}").json()["vm_id"]
    assert bob_http.delete(f"/v1/sandboxes/{bvm}").status_code == 200
    wait_for(lambda: bob_http.get(f"/v1/sessions/{theirs['chat_session_id']}").json()["state"]
             == "ended", timeout=30)
    assert refused(theirs["connect_url"], auth(theirs["jwt"])) == 410


# ---- (b) the WebSocket: `after`, floods, huge frames, many connections -----------------------

def test_after_must_be_a_plain_number(shared):
    ticket, _, _ = shared
    h = {"Authorization": f"Bearer {ticket['jwt']}"}
    for bad in ("-1", "abc", "1e3", "1" * 13, "0x10", "%201", "1.5", "%2B1", "", "1,2",
                "2147483648", "999999999999"):  # (seq is a 32-bit column)
        assert refused(ticket["connect_url"] + f"?after={bad}", h) == 400, bad
    for fine in ("0", "2147483647", "007"):
        c = Conn(ticket, after=fine)
        c.send(type="ping", id=1)
        assert c.reply("pong")[0]["id"] == 1
        c.close()


def test_after_with_a_unicode_digit_is_a_400_before_the_handshake(shared):
    ticket, _, _ = shared
    h = {"Authorization": f"Bearer {ticket['jwt']}"}
    live = Conn(ticket)
    try:
        assert refused(ticket["connect_url"] + "?after=%C2%B2", h) == 400   # "²"
        live.send(type="ping", id="still")
        assert live.reply("pong")[0]["id"] == "still"
    finally:
        live.close()


def test_floods_of_pings_tasks_and_frames(shared, http, llm_mock):
    ticket, key, _ = shared
    sid = ticket["chat_session_id"]
    tasks_before = http.get(f"/v1/sessions/{sid}").json()["usage"]["tasks"]
    c = Conn(ticket)
    # 2000 pings pipelined: every one answered, in order
    for i in range(2000):
        c.send(type="ping", id=i)
    got = [c.reply("pong")[0]["id"] for _ in range(2000)]
    assert got == list(range(2000))
    # 300 tasks pipelined while the first one hangs: one task, 299 task_running
    llm_mock.scenario(key, hang=True, hang_seconds=30)
    for i in range(300):
        c.send(type="task", text=f"task {i}", id=i)
    acks, errors = [], []
    while len(acks) + len(errors) < 300:
        m = c.recv(60)
        if m["type"] == "ack":
            acks.append(m)
        elif m["type"] == "error":
            errors.append(m)
    assert len(acks) == 1 and acks[0]["id"] == 0, acks
    assert {e["code"] for e in errors} == {"task_running"}
    c.send(type="cancel", id="stop")
    ack, before = c.reply("ack")
    if not any(e["type"] == "task_finished" for e in before):
        c.until_finished()
    llm_mock.scenario(key, final="ok")
    assert http.get(f"/v1/sessions/{sid}").json()["usage"]["tasks"] == tasks_before + 1
    # ids that are no refs are not echoed back
    c.send(type="ping", id={"nested": "x" * 100})
    assert c.reply("error")[0]["id"] is None
    c.ws.send(json.dumps({"type": "dance", "id": "y" * 5000}))
    assert c.reply("error")[0]["id"] is None
    # a frame over 4 MiB closes the connection (1009); the session goes on
    c.ws.send("x" * (4 * 1024 * 1024 + 10))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            c.recv(30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # a compressed bomb: small on the wire, 64 MiB inflated (permessage-deflate): refused too
    c2 = Conn(ticket)
    c2.ws.send(json.dumps({"type": "task", "text": "a" * (64 * 1024 * 1024)}))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            c2.recv(30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    c3 = Conn(ticket)
    c3.send(type="ping", id="alive")
    assert c3.reply("pong")[0]["id"] == "alive"
    c3.close()


def test_many_connections_at_once_leave_one(shared, http):
    """Takeover under a race: 40 connections at once with the same token; when the dust
    settles at most one is open, and it works."""
    ticket, _, _ = shared
    sid = ticket["chat_session_id"]
    conns: list = []
    lock = threading.Lock()

    def one():
        try:
            ws = connect(ticket["connect_url"], additional_headers={
                "Authorization": f"Bearer {ticket['jwt']}"}, open_timeout=60)
        except Exception:
            return
        with lock:
            conns.append(ws)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert conns
    time.sleep(2)
    open_ = []
    for ws in conns:
        try:
            while True:  # drain: ready, then a 4001 close for the ones taken over
                ws.recv(timeout=0.2)
        except TimeoutError:
            open_.append(ws)
        except ConnectionClosed as exc:
            assert exc.rcvd is None or exc.rcvd.code == 4001, exc
    assert len(open_) <= 1, f"{len(open_)} connections to one session are open"
    for ws in conns:
        ws.close()
    wait_for(lambda: not http.get(f"/v1/sessions/{sid}").json()["connected"], timeout=15)
    c = Conn(ticket)
    c.send(type="ping", id="after")
    assert c.reply("pong")[0]["id"] == "after"
    c.close()


# ---- (b)(c) attachments: names, counts, planted symlinks -------------------------------------

def test_attachment_names_and_counts(shared, alice):
    ticket, _, vm = shared
    c = Conn(ticket)
    try:
        for name in ("..", ".", "../x", "a/b", "a\\b", "/etc/passwd", ".bashrc", "-rf",
                     "a\x00b", "%2e%2e", "ａ.txt", "a" * 129, "", " a", "a\n"):
            c.send(type="task", text="t", id="n",
                   attachments=[{"name": name, "content_base64": ""}])
            err = c.reply("error")[0]
            assert err["code"] == "invalid_attachment", (name, err)
        c.send(type="task", text="t", attachments=[{"name": f"f{i}", "content_base64": ""}
                                                   for i in range(11)])
        assert c.reply("error")[0]["code"] == "invalid_attachment"
        c.send(type="task", text="t", attachments=[{"name": "same", "content_base64": ""}] * 2)
        assert c.reply("error")[0]["code"] == "invalid_attachment"
        c.send(type="task", text="t", attachments=[{"name": "x", "content_base64": "a", "path":
                                                    "/etc/x"}])
        assert c.reply("error")[0]["code"] == "invalid_attachment"
    finally:
        c.close()
    # nothing was written for any of them
    r = alice.run(vm, "ls -A /home/user/attachments 2>/dev/null | wc -l")
    assert r.stdout.strip() == "0", r.stdout


def test_planted_symlinks_do_not_take_attachments_out_of_the_users_reach(shared, alice,
                                                                         llm_mock):
    """The sandbox's code (the agent's earlier shell, or a CLI) makes /home/user/attachments a
    symlink to /etc (root's), or plants attachments/<name> as a symlink to a root-owned file,
    before the next task with attachments arrives: envd writes as `user`, so it is refused
    (and nothing of root's is written); the task is not started."""
    ticket, key, vm = shared
    r = alice.run(vm, "rm -rf /home/user/attachments && ln -s /etc /home/user/attachments "
                      "&& ls -ld /home/user/attachments", user="user")
    assert r.exit_code == 0, r.stderr
    c = Conn(ticket)
    try:
        c.send(type="task", text="t", id="a", attachments=[
            {"name": "e2a-planted", "content_base64": base64.b64encode(b"root?").decode()}])
        err = c.reply("error")[0]
        assert err["code"] == "invalid_attachment", err
        assert alice.run(vm, "test -e /etc/e2a-planted", user="root").exit_code != 0
        # a symlink at the attachment's own name, to a root-owned file
        r = alice.run(vm, "rm -f /home/user/attachments && mkdir /home/user/attachments && "
                          "ln -s /etc/hostname /home/user/attachments/hostname", user="user")
        assert r.exit_code == 0, r.stderr
        before = alice.run(vm, "cat /etc/hostname", user="root").stdout
        c.send(type="task", text="t", id="b", attachments=[
            {"name": "hostname", "content_base64": base64.b64encode(b"pwned\n").decode()}])
        c.reply("ack")  # written beside and renamed over the symlink: the user's own file
        c.until_finished()
        assert alice.run(vm, "cat /etc/hostname", user="root").stdout == before
        r = alice.run(vm, "test -L /home/user/attachments/hostname || "
                          "cat /home/user/attachments/hostname")
        assert r.stdout == "pwned\n", r
        # /home/user/attachments a symlink to root's home (0700)
        r = alice.run(vm, "rm -rf /home/user/attachments && ln -s /root "
                          "/home/user/attachments", user="user")
        assert r.exit_code == 0, r.stderr
        c.send(type="task", text="t", id="c", attachments=[
            {"name": "e2a-planted", "content_base64": base64.b64encode(b"x").decode()}])
        assert c.reply("error")[0]["code"] == "invalid_attachment"
        assert alice.run(vm, "test -e /root/e2a-planted", user="root").exit_code != 0
        c.send(type="ping", id="p")
        assert c.reply("pong")[0]["id"] == "p"
    finally:
        c.close()
        alice.run(vm, "rm -rf /home/user/attachments", user="user")


# ---- (c) the session's sandbox code: the key, the JWT, the host --------------------------------

def test_sandbox_code_finds_neither_the_key_nor_the_jwt_nor_the_api(shared, alice, server,
                                                                   llm_mock):
    """After a task ran (own agent: on the host), the sandbox's code, as user and as root,
    looks for the LLM key and the session's JWT in every process's environment and command
    line and in the files where they could be left; and knocks on e2a's API port and the
    egress proxy's from inside."""
    from tests.e2e.agents import gateway, search
    ticket, key, vm = shared
    c = Conn(ticket)
    try:
        c.task("hello")
        done = finished(c.until_finished())
        assert done["state"] == "succeeded", done
        jwt_sig = ticket["jwt"].split(".")[2]
        for needle in (key, jwt_sig, ticket["jwt"].split(".")[1]):
            assert search(alice, vm, needle) == (0, 0, 0), needle
        gw = gateway(alice, vm)
        api_port = server.url.rsplit(":", 1)[1]
        for target in (f"http://{gw}:{api_port}/health", f"http://127.0.0.1:{api_port}/health",
                       f"{ticket['connect_url'].replace('ws://', 'http://')}",
                       f"http://{gw}:{server.egress_port}/anthropic/v1/messages"):
            r = alice.run(vm, f"curl -s -m 4 -o /dev/null -w '%{{http_code}}' "
                              f"-H 'authorization: Bearer x' {target}")
            # nothing answers, or the egress proxy refuses a sandbox whose task is over
            assert r.stdout in ("000", "403"), (target, r.stdout)
    finally:
        c.close()


# ---- (a) bundles across tenants, hot replace and the SSRF guard --------------------------------

def test_hot_replace_to_a_private_base_url_is_refused_and_the_session_keeps_its_values(
        http, bob_http, llm_mock):
    """The tenant PUTs its bundle with an LLM_BASE_URL at a private service (the host's
    loopback, the metadata address, IPv6 forms of 127/8); the hot replace applies it to
    running sessions at once, so it must check it: each PUT leaves the session on its old
    values with a `secrets_not_applied` error, and the private service is never called. Bob's
    bundle of the same name is another bundle: its PUT touches nothing of alice's."""
    key = new_key()
    name = "hot-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": key, "LLM_MODEL": MODEL})
    llm_mock.scenario(key, final="old values")
    bob_key = new_key()
    bundle(bob_http, name, {"LLM_API_KEY": bob_key, "LLM_MODEL": MODEL})
    ticket = create(http, secrets=[name])
    private = Listener("127.0.0.1")
    c = Conn(ticket)
    try:
        # bob's PUT of his own bundle of that name: nothing reaches alice's session
        r = bob_http.put(f"/v1/tenants/me/secrets/{name}",
                         json={"values": {"LLM_API_KEY": new_key(), "LLM_MODEL": MODEL}})
        assert r.status_code == 200
        # bob cannot see, replace or delete alice's (his own is another row)
        assert bob_http.get(f"/v1/tenants/me/secrets/{name}").json()["version"] == 2
        assert http.get(f"/v1/tenants/me/secrets/{name}").json()["version"] == 1
        new = new_key()
        bad_urls = [f"http://localhost:{private.port}/v1",
                    f"https://localhost:{private.port}/v1",
                    f"https://127.0.0.2:{private.port}/v1",
                    f"https://[::ffff:127.0.0.1]:{private.port}/v1",
                    f"https://[::ffff:7f00:1]:{private.port}/v1",
                    f"https://[64:ff9b::7f00:1]:{private.port}/v1",
                    f"https://[2002:7f00:1::]:{private.port}/v1",
                    "https://169.254.169.254/latest",
                    f"https://0.0.0.0:{private.port}/v1",
                    f"https://0:{private.port}/v1",
                    f"https://user:pw@127.0.0.1:{private.port}/v1"]
        for url in bad_urls:
            r = http.put(f"/v1/tenants/me/secrets/{name}", json={"values": {
                "LLM_API_KEY": new, "LLM_MODEL": MODEL, "LLM_BASE_URL": url,
                "LLM_VENDOR": "anthropic"}})
            assert r.status_code == 200, (url, r.text)
            m = c.recv(30)
            assert m["type"] == "error" and m["data"]["code"] == "secrets_not_applied", (url, m)
            assert new not in json.dumps(m) and "pw" not in m["data"]["message"], m
        c.task("who answers?")
        evs = c.until_finished()
        assert finished(evs)["result"] == "old values", finished(evs)
        assert private.hits == 0
        assert not llm_mock.requests(new)
        assert not [e for e in evs if e["type"] == "secrets_replaced"]
        # a session cannot be started on it either
        r = http.post("/v1/sessions", json={"user_id": "u", "secrets": [name]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "secrets", r.text
        assert new not in r.text
    finally:
        private.close()
        c.close()
        http.delete(f"/v1/sessions/{ticket['chat_session_id']}")
        http.delete(f"/v1/tenants/me/secrets/{name}")
        bob_http.delete(f"/v1/tenants/me/secrets/{name}")


def test_bundle_routes_hold_no_path_tricks_and_no_other_tenant(http, bob_http, server, keys):
    key = new_key()
    name = "mine-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": key})
    try:
        for path in (f"/v1/tenants/me/secrets/{name}",):
            assert bob_http.get(path).status_code == 404
            assert bob_http.put(path, json={"values": {"LLM_API_KEY": "x"}}).status_code == 404
            assert bob_http.delete(path).status_code == 404
        for tricky in ("..%2F..%2Fsessions", "%2e%2e", name.upper(), name + "%00",
                       name + "%20", "*", "%25"):
            r = http.get(f"/v1/tenants/me/secrets/{tricky}")
            assert r.status_code in (404, 400), (tricky, r.status_code)
            assert key not in r.text
        for who in ("bob", "alice"):
            r = http.get(f"/v1/tenants/{who}/secrets")
            assert r.status_code in (404, 405), (who, r.status_code)
        # a bundle named by a session of bob's: alice's name is unknown to him
        r = bob_http.post("/v1/sessions", json={"user_id": "u", "secrets": [name]})
        assert r.status_code == 404 and key not in r.text
        # no value ever comes back
        for r in (http.get("/v1/tenants/me/secrets"), http.get(f"/v1/tenants/me/secrets/{name}"),
                  http.put(f"/v1/tenants/me/secrets/{name}", json={"values": {
                      "LLM_API_KEY": key, "LLM_BASE_URL": "ftp://x"}})):
            assert key not in r.text
    finally:
        http.delete(f"/v1/tenants/me/secrets/{name}")


def test_private_base_urls_are_refused_at_create(http):
    key = new_key()
    urls = ["https://localhost./v1", "https://LOCALHOST/v1", "https://[::ffff:7f00:1]/v1",
            "https://[64:ff9b::a00:1]/v1", "https://[2002:a00:1::]/v1", "https://[fd00::1]/v1",
            "https://0/v1", "https://127.0.0.1%2509/v1", "https://[::1%25lo]/v1",
            "https://10.0.0.1#@api.openai.com/v1", "https://api.openai.com@127.0.0.2/v1",
            "https://127.0.0.2\\@api.openai.com/v1", "http://[::1]/v1", "file:///etc/passwd",
            "https://192.168.0.1/v1", "https://198.18.0.1/v1", "https://[fe80::1%25eth0]/v1"]
    for url in urls:
        r = http.post("/v1/sessions", json={"user_id": "u", "llm": {
            "api_key": key, "base_url": url, "vendor": "openai"}})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["field"] == "llm.base_url", (url, r.text)
        assert key not in r.text
        name = "u-" + uuid.uuid4().hex[:8]
        r = http.post("/v1/tenants/me/secrets", json={"name": name, "values": {
            "LLM_API_KEY": key, "LLM_BASE_URL": url}})
        if r.status_code == 201:  # parsed only: checked when a session names it
            r = http.post("/v1/sessions", json={"user_id": "u", "secrets": [name]})
            http.delete(f"/v1/tenants/me/secrets/{name}")
            assert r.status_code == 400 and r.json()["error"]["field"] == "secrets", (url, r.text)
        else:
            assert r.status_code == 400, (url, r.text)
        assert key not in r.text


# ---- (d) a local unprivileged host user --------------------------------------------------------

def test_host_user_reads_no_master_key_bundle_or_token(server, shared, http):
    ticket, key, _ = shared
    data = server.base / "data"
    name = "host-" + uuid.uuid4().hex[:8]
    value = new_key()
    bundle(http, name, {"LLM_API_KEY": value, "OTHER_SECRET": "S3CR3T-" + value})
    try:
        skey = data / "secrets.key"
        assert skey.is_file() and not skey.is_symlink()
        assert stat.S_IMODE(skey.stat().st_mode) == 0o600
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for target in [skey, data / "agent.key", *sorted(data.glob("e2a.db*"))]:
            r = as_user(NOBODY, "cat", str(target))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r)
        # in the database (and its WAL): names, never a value
        stored = b"".join(p.read_bytes() for p in data.glob("e2a.db*"))
        assert value.encode() not in stored and b"S3CR3T" not in stored
        # what any local user may read of every process: command lines
        r = as_user(NOBODY, "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
        for needle in (key, value, ticket["jwt"], skey.read_text().strip()):
            assert needle not in r.stdout
    finally:
        http.delete(f"/v1/tenants/me/secrets/{name}")


def test_one_tenant_cannot_take_every_slot_of_the_host(llm_mock):
    """E2A_MAX_SANDBOXES=2, E2A_MAX_SANDBOXES_PER_USER=1: alice's second session is refused
    (429), so bob still gets one."""
    from tests.conftest import own_server
    with own_server("ws", E2A_MAX_SANDBOXES="2", E2A_MAX_SANDBOXES_PER_USER="1") as srv:
        srv.start()
        try:
            a = srv.create_user("alice-cap@example.com")
            b = srv.create_user("bob-cap@example.com")
            key = new_key()
            llm_mock.scenario(key, final="ok")
            body = {"user_id": "u", "llm": {"api_key": key, "model": MODEL}}
            with httpx.Client(base_url=srv.url, timeout=180) as h:
                made = []
                for _ in range(2):
                    r = h.post("/v1/sessions", json=body,
                               headers={"Authorization": f"Bearer {a}"})
                    if r.status_code != 201:
                        break
                    made.append(r.json())
                    SEEN_SECRETS.append(r.json()["jwt"])
                assert len(made) == 1 and r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "sandbox_limit"
                r = h.post("/v1/sessions", json=body, headers={"Authorization": f"Bearer {b}"})
                assert r.status_code == 201, (len(made), r.status_code, r.text)
                SEEN_SECRETS.append(r.json()["jwt"])
                for t in made + [r.json()]:
                    for k in (a, b):
                        h.delete(f"/v1/sessions/{t['chat_session_id']}",
                                 headers={"Authorization": f"Bearer {k}"})
        finally:
            srv.stop()


def test_end_user_and_app_names_with_path_tricks_are_refused(http):
    """user_id, app.id and app.set_id choose the workspace: only plain names (never a path)."""
    key = new_key()
    for bad in ("..", ".", "../other", "a/b", "a\\b", "-a", ".hidden", "a\x00", "ａ", "a" * 65,
                "", " a", "a\n", "%2e%2e"):
        for field, body in (("user_id", {"user_id": bad}),
                            ("app.id", {"user_id": "u", "app": {"id": bad}}),
                            ("app.set_id", {"user_id": "u", "app": {"set_id": bad}})):
            r = http.post("/v1/sessions", json={**body, "llm": {"api_key": key, "model": MODEL}})
            assert r.status_code == 400, (field, bad, r.text)
            assert r.json()["error"]["field"] == field, (field, bad, r.text)
            assert key not in r.text
    for bad in ("../x", "a/b", "x" * 65):
        r = http.get("/v1/sessions", params={"user_id": bad})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert r.json()["sessions"] == []


def test_zz_no_key_or_jwt_of_this_module_in_the_server_log(server):
    """Last: every LLM key and JWT this module used or saw stays out of the log."""
    log = (server.base / "server.log").read_text(errors="replace")
    for secret in SEEN_SECRETS:
        assert secret not in log, secret[:16]
        if secret.count(".") == 2:  # a JWT: not even its signature
            assert secret.split(".")[2] not in log
