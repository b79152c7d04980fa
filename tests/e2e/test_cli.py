"""The `e2a` CLI against the real server: the README's commands, end to end."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

E2A = str(Path(sys.executable).parent / "e2a")


def cli(server, key, *args, stdin=None):
    env = {**os.environ, "E2A_URL": server.url, "E2A_API_KEY": key}
    return subprocess.run([E2A, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


def test_cli_sandbox_and_files(server, keys, tmp_path):
    key = keys["alice"]
    r = cli(server, key, "sandbox", "create", "standard", "--metadata", "via=cli")
    assert r.returncode == 0, r.stderr
    vm = r.stdout.strip()
    assert vm.startswith("sbx_")
    try:
        r = cli(server, key, "sandbox", "exec", vm, "--", "echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        r = cli(server, key, "sandbox", "exec", vm, "--", "wc", "-c", stdin="12345")
        assert r.returncode == 0 and r.stdout.strip() == "5"
        local = tmp_path / "up.bin"
        local.write_bytes(bytes(range(256)) * 100)
        assert cli(server, key, "files", "put", vm, str(local), "dir/up.bin").returncode == 0
        back = tmp_path / "down.bin"
        assert cli(server, key, "files", "get", vm, "dir/up.bin", str(back)).returncode == 0
        assert back.read_bytes() == local.read_bytes()
        r = cli(server, key, "files", "ls", vm, "dir")
        assert "up.bin" in r.stdout
        r = cli(server, key, "sandbox", "ls", "--json")
        assert vm in r.stdout and "via" in r.stdout
    finally:
        r = cli(server, key, "sandbox", "kill", vm)
    assert r.returncode == 0
    r = cli(server, key, "sandbox", "exec", vm, "--", "true")
    assert r.returncode == 1 and "sandbox_not_running" in r.stderr


def test_cli_exec_exits_with_the_code_while_stdin_stays_open(server, keys):
    """The stdin forwarder is still blocked reading an open pipe when the command exits: the CLI
    must exit with the command's code, not abort at interpreter shutdown (it did: SIGABRT, -6)."""
    key = keys["alice"]
    r = cli(server, key, "sandbox", "create", "standard")
    assert r.returncode == 0, r.stderr
    vm = r.stdout.strip()
    env = {**os.environ, "E2A_URL": server.url, "E2A_API_KEY": key}
    try:
        for _ in range(3):
            p = subprocess.Popen([E2A, "sandbox", "exec", vm, "--", "echo done; exit 4"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                code = p.wait(timeout=120)  # stdin is never closed
                out, err = p.stdout.read(), p.stderr.read()
            finally:
                p.kill()
                p.stdin.close()
                p.stdout.close()
                p.stderr.close()
            assert (code, out, err) == (4, b"done\n", b"")
    finally:
        cli(server, key, "sandbox", "kill", vm)


def test_cli_pause_resume_fork(server, keys):
    key = keys["alice"]
    r = cli(server, key, "sandbox", "create", "standard", "--on-idle", "pause", "--auto-resume")
    assert r.returncode == 0, r.stderr
    vm = r.stdout.strip()
    forks = []
    try:
        assert cli(server, key, "sandbox", "exec", vm, "--", "echo v1 > /tmp/f").returncode == 0
        r = cli(server, key, "sandbox", "pause", vm)
        assert r.returncode == 0 and "paused" in r.stdout, r.stderr
        r = cli(server, key, "sandbox", "ls")
        assert vm in r.stdout and "paused" in r.stdout
        r = cli(server, key, "sandbox", "pause", vm)
        assert r.returncode == 1 and "invalid_state" in r.stderr
        r = cli(server, key, "sandbox", "resume", vm)
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        r = cli(server, key, "sandbox", "fork", vm, "--count", "2")
        assert r.returncode == 0, r.stderr
        forks = r.stdout.split()
        assert len(forks) == 2 and all(f.startswith("sbx_") and f != vm for f in forks)
        for f in forks:
            r = cli(server, key, "sandbox", "exec", f, "--", "cat /tmp/f")
            assert (r.returncode, r.stdout) == (0, "v1\n")
    finally:
        for f in [vm, *forks]:
            cli(server, key, "sandbox", "kill", f)


def test_cli_errors_are_clear(server):
    r = cli(server, "e2a_live_nope", "sandbox", "ls")
    assert r.returncode == 1 and "unauthorized" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "E2A_API_KEY"}
    r = subprocess.run([E2A, "--url", server.url, "sandbox", "ls"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "E2A_API_KEY" in r.stderr


def test_cli_shell_is_interactive(server, keys, sandbox):
    env = {**os.environ, "E2A_URL": server.url, "E2A_API_KEY": keys["alice"]}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(E2A, [E2A, "sandbox", "shell", sandbox.vm_id], env)
    out = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while marker not in out and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return

    read_until(b"$ ")
    os.write(fd, b"echo in-$((40+2))-shell; exit 6\n")
    read_until(b"in-42-shell")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"in-42-shell" in out
    assert os.waitstatus_to_exitcode(status) == 6


def test_cli_secrets_and_a_session(server, keys, llm_mock):
    """The README's session commands: a bundle from an environment variable, a session, one
    task streamed; the key never in any output."""
    import uuid

    key = keys["alice"]
    llm_key = "sk-ant-cli-" + uuid.uuid4().hex
    llm_mock.scenario(llm_key, final="hello from the session")
    name = "cli-" + uuid.uuid4().hex[:8]
    env = {**os.environ, "E2A_URL": server.url, "E2A_API_KEY": key, "MY_LLM_KEY": llm_key,
           "MY_MODEL": "claude-sonnet-5-5"}
    run = lambda *args: subprocess.run([E2A, *args], env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=120)
    r = run("secrets", "put", name, "--env", "LLM_API_KEY=MY_LLM_KEY", "--env",
            "LLM_MODEL=MY_MODEL")
    assert r.returncode == 0, r.stderr
    r = run("secrets", "show", name)
    assert r.returncode == 0 and "LLM_API_KEY" in r.stdout
    r = run("sessions", "create", "--user-id", "cli-user", "--secret", name, "--json")
    assert r.returncode == 0, r.stderr
    import json
    sid = json.loads(r.stdout)["chat_session_id"]
    r = run("sessions", "send", sid, "say hello")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hello from the session" in r.stdout
    r = run("sessions", "show", sid)
    assert r.returncode == 0 and sid in r.stdout
    r = run("sessions", "end", sid)
    assert r.returncode == 0
    r2 = run("secrets", "rm", name)
    assert r2.returncode == 0
    for out in (r.stdout, r.stderr, r2.stdout):
        assert llm_key not in out
