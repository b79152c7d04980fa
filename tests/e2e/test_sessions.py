"""Agent sessions end to end: real gVisor sandboxes with real workspaces, e2a's own agent
scripted by the mock provider (tests/llm_mock), the real WebSocket protocol (docs/sessions.md).

A conversation of two tasks that depend on each other; a disconnect mid-stream resumed with no
loss or repeat; takeover; refused tokens; TTL expiry and DELETE; a secret bundle replaced while a
task runs; the SSRF guard on a session's base URL; tenants apart; capability sets; attachments.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import wait_for
from tests.e2e import agents
from tests.e2e.sessions import (MODEL, Conn, Listener, bundle, create, finished, refused,
                                signing_key)


def new_key() -> str:
    return "sk-ant-" + uuid.uuid4().hex


def seqs(events: list[dict]) -> list[int]:
    return [e["seq"] for e in events]


def sandbox_state(http, vm: str) -> dict:
    return http.get(f"/v1/sandboxes/{vm}").json()


def test_two_dependent_tasks_then_the_files_outlive_the_session(http, alice, llm_mock):
    key = new_key()
    name = "b-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": key, "LLM_MODEL": MODEL})
    llm_mock.scenario(key, tasks=[
        {"steps": [{"tool": "write", "args": {"path": "notes.txt", "text": "alpha beta\n"}}],
         "final": "wrote notes.txt"},
        {"steps": [{"tool": "read_file", "args": {"path": "notes.txt"}}],
         "final": "It says: {last}"},
    ])
    end_user = "eu-" + uuid.uuid4().hex[:8]
    ticket = create(http, secrets=[name], user_id=end_user,
                    app={"id": "notes", "set_id": "v1"})
    assert ticket["chat_session_id"].startswith("ses_")
    assert ticket["connect_url"].endswith(f"/v1/sessions/{ticket['chat_session_id']}/ws")
    c = Conn(ticket)
    assert c.ready["last_seq"] == 0 and c.ready["task"] is None
    first_id = c.task("Write alpha beta to notes.txt")
    evs = c.until_finished()
    assert finished(evs)["state"] == "succeeded" and finished(evs)["task_id"] == first_id
    assert [e["type"] for e in evs][0] == "task_started"
    assert "tool_call" in {e["type"] for e in evs} and "tool_result" in {e["type"] for e in evs}
    second_id = c.task("What does the file you wrote say?")
    evs2 = c.until_finished()
    done = finished(evs2)
    assert done["state"] == "succeeded" and done["task_id"] == second_id != first_id
    assert "alpha beta" in done["result"]
    # numbered over the whole session, in order, without gaps
    assert seqs(evs + evs2) == list(range(1, len(evs) + len(evs2) + 1))
    # the second task's request carried the first task's conversation
    last = llm_mock.requests(key)[-1]["body"]["messages"]
    texts = json.dumps(last)
    assert "Write alpha beta to notes.txt" in texts and "What does the file" in texts

    sid = ticket["chat_session_id"]
    got = http.get(f"/v1/sessions/{sid}").json()
    assert got["state"] == "active" and got["connected"] is True
    assert got["user_id"] == end_user and got["app"]["id"] == "notes"
    assert got["secrets"] == [name] and got["llm"] == {"vendor": "anthropic", "model": MODEL}
    assert got["usage"]["tasks"] == 2 and got["usage"]["llm_requests"] == 4
    assert got["usage"]["events"] == len(evs) + len(evs2)
    assert got["task"] == {"task_id": second_id, "state": "succeeded"}
    assert got["workspace_id"]
    listed = http.get("/v1/sessions", params={"user_id": end_user}).json()["sessions"]
    assert [s["chat_session_id"] for s in listed] == [sid]
    page = http.get("/v1/sessions", params={"limit": 1}).json()["sessions"]
    assert len(page) == 1 and page[0]["chat_session_id"] == sid  # the newest
    assert http.get("/v1/sessions", params={"limit": 0}).status_code == 400
    vm = got["vm_id"]

    r = http.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 200 and r.json()["state"] == "ended"
    assert r.json()["end_reason"] == "deleted"
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            c.recv(30)
    assert closed.value.rcvd.code == 4000 and closed.value.rcvd.reason == "deleted"
    sb = sandbox_state(http, vm)
    assert sb["state"] == "destroyed" and sb["end_reason"] == "session_ended"
    assert http.post(f"/v1/sessions/{sid}/token").status_code == 409
    # a new session of the same end user and app finds the file; the workspace is the same.
    # (Its key is the request's, which wins over the bundle's.)
    key2 = new_key()
    llm_mock.scenario(key2, steps=[{"tool": "read_file", "args": {"path": "notes.txt"}}],
                      final="Still: {last}")
    again = create(http, secrets=[name], llm={"api_key": key2}, user_id=end_user,
                   app={"id": "notes", "set_id": "v1"})
    c2 = Conn(again)
    c2.task("Read notes.txt")
    done = finished(c2.until_finished())
    assert done["state"] == "succeeded" and done["result"].startswith("Still: alpha beta"), done
    assert llm_mock.requests(key2) and not [r for r in llm_mock.requests(key)
                                            if "Read notes.txt" in json.dumps(r["body"])]
    again_ws = http.get(f"/v1/sessions/{again['chat_session_id']}").json()["workspace_id"]
    assert again_ws == got["workspace_id"]
    c2.close()
    http.delete(f"/v1/sessions/{again['chat_session_id']}")


def test_a_dropped_connection_resumes_with_nothing_lost_or_repeated(http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {
        "command": "for i in $(seq 1 12); do echo tick $i; sleep 0.25; done"}}],
        final="ticked")
    ticket = create(http, llm={"api_key": key, "model": MODEL})
    c = Conn(ticket)
    c.task("tick")
    seen = []
    while not any(e["type"] == "tool_output" for e in seen):
        m = c.recv()
        if "seq" in m:
            seen.append(m)
    c.ws.socket.shutdown(socket.SHUT_RDWR)  # cut, not closed: the server learns it late
    c.ws.socket.close()
    time.sleep(1.0)  # the task goes on meanwhile
    c2 = Conn(ticket, after=seen[-1]["seq"])
    rest = c2.until_finished()
    everything = seen + rest
    assert seqs(everything) == list(range(1, len(everything) + 1))
    assert finished(everything)["state"] == "succeeded"
    out = "".join(e["data"]["text"] for e in everything if e["type"] == "tool_output")
    assert [f"tick {i}" for i in range(1, 13)] == [ln for ln in out.split("\n") if ln]
    # from the start again: the same events, the same numbers
    c3 = Conn(ticket, after=0)
    c2.close()  # (c3 took over already; closing the old one changes nothing)
    replay = c3.until_finished()
    assert [(e["seq"], e["type"]) for e in replay] == [(e["seq"], e["type"]) for e in everything]
    c3.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_a_second_connection_takes_over(http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="hello")
    ticket = create(http, llm={"api_key": key, "vendor": "anthropic"})
    first = Conn(ticket)
    second = Conn(ticket)
    with pytest.raises(ConnectionClosed) as closed:
        first.recv(30)
    assert closed.value.rcvd.code == 4001
    second.send(type="ping", id=7)
    assert second.reply("pong")[0]["id"] == 7
    assert http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()["connected"] is True
    second.close()
    wait_for(lambda: not http.get(f"/v1/sessions/{ticket['chat_session_id']}")
             .json()["connected"], timeout=10)
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_tokens_other_than_the_sessions_own_arerefused(server, http, bob_http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="ok")
    ticket = create(http, llm={"api_key": key, "model": MODEL})
    other = create(http, llm={"api_key": key, "model": MODEL})
    url, sid = ticket["connect_url"], ticket["chat_session_id"]
    assert refused(url) == 401
    assert refused(url, {"Authorization": "Bearer nonsense"}) == 401
    assert refused(url, {"Authorization": f"Bearer {other['jwt']}"}) == 401  # another's
    # the API key is not a session token
    assert refused(url, {"Authorization": f"Bearer {server.keys['alice']}"}) == 401
    head, body, sig = ticket["jwt"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": other["chat_session_id"]})
                                      .encode()).decode().rstrip("=")
    assert refused(other["connect_url"], {"Authorization": f"Bearer {head}.{forged}.{sig}"}) \
        == 401
    # an expired one, signed with the server's real key (derived from its host key)
    signing = signing_key(server)
    expired = jwt.encode({**claims, "exp": int(time.time()) - 60, "iat": int(time.time()) - 120},
                         signing, algorithm="HS256")
    assert refused(url, {"Authorization": f"Bearer {expired}"}) == 401
    fresh = jwt.encode({**claims, "exp": int(time.time()) + 600}, signing, algorithm="HS256")
    Conn(ticket, token=fresh).close()  # the forging is right: only the expiry was refused
    # a browser's way: the token as a subprotocol
    ws = connect(url, subprotocols=["e2a.session.v1", ticket["jwt"]], open_timeout=30)
    assert ws.subprotocol == "e2a.session.v1" and json.loads(ws.recv(30))["type"] == "ready"
    ws.close()
    # bob: not his session, over REST or the WebSocket
    assert bob_http.get(f"/v1/sessions/{sid}").status_code == 404
    assert bob_http.delete(f"/v1/sessions/{sid}").status_code == 404
    assert bob_http.post(f"/v1/sessions/{sid}/token").status_code == 404
    assert sid not in {s["chat_session_id"] for s in bob_http.get("/v1/sessions").json()
                       ["sessions"]}
    # ended: 410
    http.delete(f"/v1/sessions/{sid}")
    assert refused(url, {"Authorization": f"Bearer {ticket['jwt']}"}) == 410
    http.delete(f"/v1/sessions/{other['chat_session_id']}")


def test_protocol_replies_attachments_and_bad_messages(http, alice, llm_mock):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {"command": "sleep 2; echo slept"}}],
                      final="done")
    ticket = create(http, llm={"api_key": key, "model": MODEL})
    c = Conn(ticket)
    c.ws.send("not json")
    assert c.reply("error")[0]["code"] == "bad_message"
    c.ws.send(b"\x00binary")
    assert c.reply("error")[0]["code"] == "bad_message"
    c.send(type="dance", id="x")
    err = c.reply("error")[0]
    assert err["code"] == "bad_message" and err["id"] == "x"
    c.send(type="cancel", id="c0")
    assert c.reply("error")[0]["code"] == "no_task"
    c.send(type="task", text="")
    assert c.reply("error")[0]["code"] == "bad_message"
    for bad in ([{"name": "../escape", "content_base64": ""}],
                [{"name": "a.txt", "content_base64": "***"}], [{"name": "x"}] * 11):
        c.send(type="task", text="t", attachments=bad)
        assert c.reply("error")[0]["code"] == "invalid_attachment"
    data = b"col1,col2\n1,2\n"
    c.task("Look at the attachment", attachments=[
        {"name": "table.csv", "content_base64": base64.b64encode(data).decode()}])
    c.send(type="task", text="another", id="busy")
    err = c.reply("error")[0]
    assert err["code"] == "task_running" and err["id"] == "busy"
    done = finished(c.until_finished())
    assert done["state"] == "succeeded"
    vm = http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()["vm_id"]
    assert alice.files.read_bytes(vm, "/home/user/attachments/table.csv") == data
    prompt = json.dumps(llm_mock.requests(key)[0]["body"]["messages"][0])
    assert "/home/user/attachments/table.csv" in prompt
    # cancel a running task
    llm_mock.scenario(key, hang=True)
    task_id = c.task("hang")
    c.send(type="cancel", id="c1")
    ack, before = c.reply("ack")  # once the task has ended (its last events may come first)
    assert ack == {"type": "ack", "id": "c1", "op": "cancel", "task_id": task_id}
    if not any(e["type"] == "task_finished" for e in before):
        before += c.until_finished()
    assert finished(before) == {**finished(before), "task_id": task_id, "state": "cancelled"}
    c.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_ttl_ends_the_session(http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="ok")
    ticket = create(http, llm={"api_key": key, "model": MODEL}, ttl_seconds=60)
    c = Conn(ticket)
    sid = ticket["chat_session_id"]
    vm = http.get(f"/v1/sessions/{sid}").json()["vm_id"]
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            c.recv(120)
    assert closed.value.rcvd.code == 4000 and closed.value.rcvd.reason == "ttl_expired"
    got = http.get(f"/v1/sessions/{sid}").json()
    assert got["state"] == "ended" and got["end_reason"] == "ttl_expired"
    assert 59 <= got["usage"]["seconds"] <= 90
    wait_for(lambda: sandbox_state(http, vm)["state"] == "destroyed", timeout=60)
    assert sandbox_state(http, vm)["end_reason"] == "session_ended"


def test_a_replaced_bundle_reaches_a_running_task(http, llm_mock):
    old, new = new_key(), new_key()
    name = "rot-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": old, "LLM_MODEL": MODEL})
    llm_mock.scenario(old, steps=[{"tool": "shell", "args": {"command": "sleep 3; echo up"}}],
                      final="still the old key")
    llm_mock.scenario(new, final="the new key")
    ticket = create(http, secrets=[name])
    c = Conn(ticket)
    c.task("sleep then answer")
    wait_for(lambda: len(llm_mock.requests(old)) == 1, timeout=60)
    r = http.put(f"/v1/tenants/me/secrets/{name}",
                 json={"values": {"LLM_API_KEY": new, "LLM_MODEL": MODEL}})
    assert r.status_code == 200, r.text
    evs = c.until_finished()
    assert finished(evs)["result"] == "the new key"
    assert len(llm_mock.requests(old)) == 1 and len(llm_mock.requests(new)) == 1
    replaced = [e for e in evs if e["type"] == "secrets_replaced"]
    assert replaced and replaced[0]["data"] == {"bundle": name}
    assert old not in json.dumps(evs) and new not in json.dumps(evs)
    # a deleted bundle: the session keeps what it had, and says so
    assert http.delete(f"/v1/tenants/me/secrets/{name}").status_code == 204
    m = c.recv(30)
    assert m["type"] == "error" and m["data"]["code"] == "secrets_not_applied" and "seq" in m
    c.task("again")
    assert finished(c.until_finished())["result"] == "the new key"
    c.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_ssrf_guard_on_a_sessions_base_url(http, llm_mock):
    key = new_key()
    # (the test server allows 127.0.0.1 itself, the mock's host: E2A_LLM_PRIVATE_HOSTS)
    bad = ["http://example.com/v1", "https://127.0.0.2/v1", "https://10.0.0.8/v1",
           "https://169.254.169.254/latest", "https://100.64.0.1/v1", "https://[::1]/v1",
           "https://localhost:9/v1", "https://0x7f.0.0.1/v1", "https://2130706433/v1"]
    for url in bad:
        r = http.post("/v1/sessions", json={"user_id": "u", "llm": {
            "api_key": key, "base_url": url, "vendor": "openai"}})
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["field"] == "llm.base_url", url
    name = "ssrf-" + uuid.uuid4().hex[:8]
    bundle(http, name, {"LLM_API_KEY": key, "LLM_BASE_URL": "https://127.0.0.2:8/v1"})
    r = http.post("/v1/sessions", json={"user_id": "u", "secrets": [name]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "secrets", r.text
    # an allowed provider that redirects to a private service: not followed
    private = Listener()
    llm_mock.scenario(key, final="never")
    ticket = create(http, llm={"api_key": key, "vendor": "anthropic", "model": MODEL,
                               "base_url": f"{llm_mock.url}/_mock/redirect-to/{private.port}"})
    # (to localhost, which is not allowed; a redirect is not followed anywhere anyway)
    c = Conn(ticket)
    c.task("hello")
    done = finished(c.until_finished())
    assert done["state"] == "failed" and "redirect" in done["error"].lower(), done
    assert private.hits == 0
    c.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_bundles_per_session_limits_and_collisions(http, bob_http):
    key = new_key()
    names = []
    for i in range(11):
        names.append(f"lim-{uuid.uuid4().hex[:6]}-{i}")
        bundle(http, names[-1], {"LLM_API_KEY": key})
    r = http.post("/v1/sessions", json={"user_id": "u", "secrets": names})
    assert r.status_code == 400 and r.json()["error"]["field"] == "secrets"
    r = http.post("/v1/sessions", json={"user_id": "u", "secrets": ["no-such-bundle"]})
    assert r.status_code == 404 and r.json()["error"]["field"].startswith("secrets")
    clash = "clash-" + uuid.uuid4().hex[:6]
    bundle(http, clash, {"LLM_API_KEY": new_key()})
    r = http.post("/v1/sessions", json={"user_id": "u", "secrets": [names[0], clash]})
    assert r.status_code == 400 and "LLM_API_KEY" in r.json()["error"]["message"]
    assert key not in r.text
    # bob cannot name alice's bundle
    r = bob_http.post("/v1/sessions", json={"user_id": "u", "secrets": [names[0]]})
    assert r.status_code == 404
    r = http.post("/v1/sessions", json={"user_id": "u"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "llm.api_key"
    for n in names + [clash]:
        http.delete(f"/v1/tenants/me/secrets/{n}")


def test_create_refusals_name_their_field(http):
    key = new_key()
    cases = [
        ({"agent": {"kind": "nope"}}, "agent.kind"),
        ({"agent": {"kind": "deictic", "version": "0.0.0-not"}}, "agent.version"),
        ({"template": "nope"}, "template"),
        ({"app": {"capability_sets": ["browser"]}}, "app.capability_sets"),
        ({"agent": {"kind": "claude-code"}, "app": {"capability_sets": ["files"]}},
         "app.capability_sets"),
        ({"agent": {"kind": "claude-code"}, "llm": {"api_key": key, "model": "gpt-5"}},
         "llm.model"),
        ({"ttl_seconds": 7201}, "ttl_seconds"),
        ({"llm": {"api_key": key, "model": "bad model!"}}, "llm.model"),
    ]
    for extra, field in cases:
        body = {"user_id": "u", "llm": {"api_key": key, "model": MODEL}, **extra}
        r = http.post("/v1/sessions", json=body)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["field"] == field, (extra, r.text)
        assert key not in r.text
    r = http.post("/v1/sessions", json={"llm": {"api_key": key}})
    assert r.status_code == 400 and r.json()["error"]["field"] == "user_id"


def test_capability_sets_limit_the_agents_tools(http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {"command": "id"}}], final="{last}")
    ticket = create(http, llm={"api_key": key, "model": MODEL},
                    app={"capability_sets": ["files"]})
    c = Conn(ticket)
    c.task("run id")
    done = finished(c.until_finished())
    offered = {t["name"] for t in llm_mock.requests(key)[0]["body"]["tools"]}
    assert offered == {"read_file", "write_file", "edit_file", "list_files"}
    assert "no tool named 'shell'" in done["result"]
    got = http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()
    assert got["app"]["capability_sets"] == ["files"]
    c.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_one_end_user_under_two_tenants_has_two_workspaces(http, bob_http, llm_mock):
    key = new_key()
    llm_mock.scenario(key, final="ok")
    mine = create(http, llm={"api_key": key, "model": MODEL}, user_id="shared-user")
    theirs = bob_http.post("/v1/sessions", json={"user_id": "shared-user", "llm": {
        "api_key": key, "model": MODEL}}, timeout=180)
    assert theirs.status_code == 201, theirs.text
    a = http.get(f"/v1/sessions/{mine['chat_session_id']}").json()
    b = bob_http.get(f"/v1/sessions/{theirs.json()['chat_session_id']}").json()
    assert a["workspace_id"] and b["workspace_id"] and a["workspace_id"] != b["workspace_id"]
    assert http.get(f"/v1/workspaces/{b['workspace_id']}").status_code == 404
    http.delete(f"/v1/sessions/{mine['chat_session_id']}")
    bob_http.delete(f"/v1/sessions/{theirs.json()['chat_session_id']}")


def test_a_cli_agent_session_continues_its_conversation(http, alice, llm_mock):
    """claude-code, the real CLI, in a session: the second task --continues the first's
    conversation, through the egress proxy (the key never enters the sandbox)."""
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "write", "args": {"path": "cli.txt",
                                                              "text": "from the cli\n"}}],
                      final="done")
    ticket = create(http, agent={"kind": "claude-code", "version": "latest"},
                    llm={"api_key": key})
    got = http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()
    assert got["agent"]["kind"] == "claude-code" and got["agent"]["version"] != "latest"
    c = Conn(ticket)
    c.task("write cli.txt")
    first = c.until_finished(timeout=180)
    assert finished(first)["state"] == "succeeded", finished(first)
    assert {e["type"] for e in first} >= {"task_started", "cli", "task_finished"}
    c.task("and now say done")
    second = c.until_finished(timeout=180)
    assert finished(second)["state"] == "succeeded", finished(second)
    last = json.dumps(llm_mock.requests(key)[-1]["body"]["messages"])
    assert "write cli.txt" in last and "and now say done" in last
    assert alice.files.read_text(got["vm_id"], "/home/user/cli.txt") == "from the cli\n"
    assert key not in json.dumps(first + second)
    assert agents.search(alice, got["vm_id"], key) == (0, 0, 0)  # nowhere in the sandbox
    c.close()
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")


def test_the_sdk_drives_a_session(alice, llm_mock):
    """The Python SDK against the real server: a bundle, a session, a task run to its end with
    its events, the listing and the end."""
    key = new_key()
    llm_mock.scenario(key, steps=[{"tool": "shell", "args": {"command": "echo via-sdk"}}],
                      final="{last}")
    name = "sdk-" + uuid.uuid4().hex[:8]
    alice.secrets.put(name, {"LLM_API_KEY": key, "LLM_MODEL": MODEL})
    ticket = alice.create_session("sdk-user", secrets=[name])
    assert key not in repr(ticket) and ticket.jwt not in repr(ticket)
    seen = []
    with alice.connect_session(ticket) as conn:
        done = conn.run_task("echo something", on_event=seen.append)
    assert done["state"] == "succeeded" and done["result"].startswith("via-sdk")
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert ticket.chat_session_id in {s.chat_session_id for s in alice.sessions(state="active")}
    ended = alice.end_session(ticket.chat_session_id)
    assert ended.state == "ended" and ended.end_reason == "deleted"
    alice.secrets.delete(name)


def test_a_resume_offset_past_the_event_numbers_is_a_400(http, llm_mock):
    """Events are numbered in a 32-bit column: a larger `after` is refused (it was a 500 on
    the REST feed, found by schemathesis)."""
    key = new_key()
    llm_mock.scenario(key, final="ok")
    ticket = create(http, llm={"api_key": key, "model": MODEL})
    vm = http.get(f"/v1/sessions/{ticket['chat_session_id']}").json()["vm_id"]
    headers = {"Authorization": f"Bearer {ticket['jwt']}"}
    for after in ("2147483648", "99999999999", "1614319726433759443170264724013056"):
        assert refused(f"{ticket['connect_url']}?after={after}", headers) == 400
        for follow in ("true", "false"):
            r = http.get(f"/v1/sandboxes/{vm}/task/events",
                         params={"after": after, "follow": follow})
            assert r.status_code == 400 and r.json()["error"]["field"], r.text
    Conn(ticket, after=2147483647).close()  # the largest is fine
    http.delete(f"/v1/sessions/{ticket['chat_session_id']}")
