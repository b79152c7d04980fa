"""The ``e2a`` command line: ``main`` is the root click group.

Client-side commands (``sandbox``, ``files``, ``workspaces``) live here and talk to the server through ``e2a.sdk``.
Server-side commands (``serve``, ``admin ...``) live in ``e2a.server_cli`` and are loaded only when
one of them runs: help lists them by the names and short help in ``SERVER_COMMANDS``, so a client
command (or ``--help``) never imports the server's dependencies (SQLAlchemy, FastAPI, uvicorn, ...).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from functools import cached_property
from typing import Any

import click
import httpx

from e2a.sdk import E2A, AsyncE2A, E2AError


# ====================================================================== root group and shared helpers


# Commands defined in e2a.server_cli (name -> short help for listings; keep in step with it).
SERVER_COMMANDS = {
    "admin": "Administer the e2a server (runs on the host).",
    "serve": "Run the e2a server: API, sandbox host and store, on the embedded defaults.",
}


class _Main(click.Group):
    """Loads the server-side commands lazily (see SERVER_COMMANDS), and turns SDK and connection
    errors from any subcommand into ``error: <code>: <message>`` + exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SERVER_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SERVER_COMMANDS and cmd_name not in self.commands:
            from e2a import server_cli

            self.add_command(getattr(server_cli, cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, except that not-yet-loaded server commands show their static help."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in SERVER_COMMANDS and name not in self.commands:
                rows.append((name, click.utils.make_default_short_help(SERVER_COMMANDS[name], limit)))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except E2AError as e:
            _fail(e.code, e.message)
        except httpx.TransportError as e:
            url = ctx.obj.url if isinstance(ctx.obj, _State) else "?"
            _fail("connection_error", f"cannot reach the e2a server at {url}: {e}")


def _fail(code: str, message: str) -> None:
    click.echo(f"error: {code}: {message}", err=True)
    sys.exit(1)


class _State:
    """Per-invocation settings; the API client is created on first use so that ``--help`` and the
    server-side commands work without an API key."""

    def __init__(self, url: str | None, api_key: str | None):
        self.url, self.api_key = url, api_key

    @cached_property
    def client(self) -> E2A:
        return E2A(self.url, self.api_key)

    def async_client(self) -> AsyncE2A:
        return AsyncE2A(self.url, self.api_key)


@click.group(cls=_Main)
@click.option("--url", envvar="E2A_URL", help="Server URL [env E2A_URL; default http://127.0.0.1:8080].")
@click.option("--api-key", envvar="E2A_API_KEY", help="API key [env E2A_API_KEY].")
@click.pass_context
def main(ctx: click.Context, url: str | None, api_key: str | None) -> None:
    """e2a: self-hosted sandboxes for AI agents."""
    state = ctx.obj = _State(url, api_key)
    ctx.call_on_close(lambda: state.__dict__.get("client") and state.client.close())


def _client(ctx: click.Context) -> E2A:
    return ctx.find_object(_State).client


def _key_values(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    """click callback: ``("A=1", "B=x=y")`` -> ``{"A": "1", "B": "x=y"}``."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        out[key] = value
    return out or None


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _console():
    from rich.console import Console  # rich is only needed for tables; keep startup light

    return Console()


# ====================================================================== sandbox


@main.group()
def sandbox() -> None:
    """Create, inspect and use sandboxes."""


@sandbox.command("create")
@click.argument("template", default="standard")
@click.option("--env", "env_vars", multiple=True, callback=_key_values, metavar="K=V",
              help="Environment variable for every command (repeatable).")
@click.option("--metadata", multiple=True, callback=_key_values, metavar="K=V", help="Metadata tag (repeatable).")
@click.option("--idle-timeout", type=int, help="Destroy after this many idle seconds.")
@click.option("--max-lifetime", type=int, help="Destroy after this many seconds in total.")
@click.option("--internet/--no-internet", default=None, help="Allow outbound internet (server default if unset).")
@click.option("--workspace", is_flag=True, help="Mount your default workspace on /home/user (kept after the sandbox).")
@click.option("--app-id", help="Workspace of this app (implies --workspace).")
@click.option("--capset-id", help="Workspace of this capability set (implies --workspace).")
@click.option("--end-user-id", help="Workspace of this end user (implies --workspace).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole sandbox as JSON.")
@click.pass_context
def sandbox_create(ctx, template, env_vars, metadata, idle_timeout, max_lifetime, internet, workspace,
                   app_id, capset_id, end_user_id, as_json):
    """Create a sandbox from TEMPLATE (default: standard) and print its id."""
    scope = {k: v for k, v in (("app_id", app_id), ("capset_id", capset_id), ("end_user_id", end_user_id))
             if v is not None}
    sb = _client(ctx).create_sandbox(template, env_vars=env_vars, metadata=metadata,
                                     idle_timeout_seconds=idle_timeout, max_lifetime_seconds=max_lifetime,
                                     internet=internet, workspace=scope or (True if workspace else None))
    _print_json(sb.to_dict()) if as_json else click.echo(sb.vm_id)


@sandbox.command("ls")
@click.option("--state", help="Only sandboxes in this state (e.g. running).")
@click.option("--metadata", multiple=True, callback=_key_values, metavar="K=V", help="Only with this tag.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sandbox_ls(ctx, state, metadata, as_json):
    """List your sandboxes."""
    boxes = _client(ctx).list_sandboxes(state=state, metadata=metadata)
    if as_json:
        return _print_json([b.to_dict() for b in boxes])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    # Ids and times are copied by people: never wrapped or cut; metadata may fold.
    # Sizes follow from the template, expiry is in `sandbox get`: an 80-column terminal fits.
    table.add_column("VM ID", no_wrap=True, min_width=24)
    for col in ("STATE", "TEMPLATE", "CREATED (UTC)"):
        table.add_column(col, no_wrap=True)
    table.add_column("METADATA")
    for b in boxes:
        meta = ",".join(f"{k}={v}" for k, v in (b.metadata or {}).items())
        table.add_row(b.vm_id, b.state, b.template, _short_time(b.created_at), meta)
    _console().print(table)


def _short_time(ts: str | None) -> str:
    """2026-11-26T06:14:13.939788Z -> 2026-11-26 06:14:13."""
    return (ts or "")[:19].replace("T", " ")


@sandbox.command("get")
@click.argument("vm_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sandbox_get(ctx, vm_id, as_json):
    """Show one sandbox."""
    data = _client(ctx).get_sandbox(vm_id).to_dict()
    if as_json:
        return _print_json(data)
    for key, value in data.items():
        click.echo(f"{key + ':':<22} {json.dumps(value) if isinstance(value, dict) else value}")


@sandbox.command("kill")
@click.argument("vm_id")
@click.pass_context
def sandbox_kill(ctx, vm_id):
    """Destroy a sandbox."""
    sb = _client(ctx).kill(vm_id)
    click.echo(f"{sb.vm_id} {sb.state}")


@sandbox.command("keepalive")
@click.argument("vm_id")
@click.pass_context
def sandbox_keepalive(ctx, vm_id):
    """Reset a sandbox's idle timer."""
    sb = _client(ctx).keepalive(vm_id)
    click.echo(f"{sb.vm_id} expires_at={sb.expires_at}")


@sandbox.command("logs")
@click.argument("vm_id")
@click.pass_context
def sandbox_logs(ctx, vm_id):
    """Print the sandbox's log (host and envd lines, by time)."""
    for line in _client(ctx).logs(vm_id):
        click.echo(f"{line.ts} {line.source:<5} {line.message}")


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("vm_id")
@click.option("--cwd", help="Working directory (default: the user's home).")
@click.option("--user", help="user (default) or root.")
@click.option("--env", multiple=True, callback=_key_values, metavar="K=V", help="Extra environment (repeatable).")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def sandbox_exec(ctx, vm_id, cwd, user, env, timeout, command):
    """Run COMMAND in the sandbox and exit with its exit code:

    \b
      e2a sandbox exec ID -- 'ls -l | wc -l'   (one argument: a bash command line)
      e2a sandbox exec ID -- ls -l /tmp        (several: exec'd directly, no shell)

    Output streams to stdout/stderr as it is produced. When stdin is not a terminal it is
    forwarded to the command (as UTF-8 text). Ctrl-C sends SIGINT to the command and exits 130.
    """
    client = _client(ctx)
    cmd: Any = command[0] if len(command) == 1 else list(command)
    forward = not sys.stdin.isatty()
    events = client.stream(vm_id, cmd, env=env, cwd=cwd, user=user, timeout=timeout, keep_stdin=forward or None)
    pid = None
    try:
        for ev in events:
            if ev.type == "start":
                pid = ev.pid
                if forward:
                    threading.Thread(target=_forward_stdin, args=(client, vm_id, pid), daemon=True).start()
            elif ev.type in ("stdout", "stderr"):
                out = sys.stdout if ev.type == "stdout" else sys.stderr
                out.write(ev.data or "")
                out.flush()
            elif ev.type == "dropped":
                click.echo(f"e2a: {ev.bytes} bytes of earlier output were dropped", err=True)
            elif ev.type == "exit":
                if ev.timed_out:
                    click.echo(f"e2a: command timed out after {timeout}s", err=True)
                ctx.exit(ev.exit_code if ev.exit_code is not None else 1)
    except KeyboardInterrupt:
        if pid is not None:
            with contextlib.suppress(E2AError, httpx.HTTPError):
                client.send_signal(vm_id, pid, "SIGINT")
        ctx.exit(130)
    _fail("stream_ended", "the connection closed before the command exited")


def _forward_stdin(client: E2A, vm_id: str, pid: int) -> None:
    """Copy our stdin to the remote command as it arrives (read1: don't wait for a full buffer)."""
    stream = sys.stdin.buffer
    read = getattr(stream, "read1", stream.read)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps split UTF-8 sequences whole
    try:
        while chunk := read(1 << 16):
            if text := decoder.decode(chunk):
                client.send_stdin(vm_id, pid, text)
        client.send_stdin(vm_id, pid, decoder.decode(b"", final=True), eof=True)
    except (E2AError, httpx.HTTPError, OSError, ValueError, RuntimeError):
        pass  # the command exited (or we are exiting and the client is closed): nothing to forward to


# ---------------------------------------------------------------------- shell (PTY over WebSocket)


@sandbox.command("shell")
@click.argument("vm_id")
@click.option("--user", help="user (default) or root.")
@click.option("--cwd", help="Starting directory.")
@click.pass_context
def sandbox_shell(ctx, vm_id, user, cwd):
    """Open an interactive shell in the sandbox; exits with the shell's exit code."""
    state = ctx.find_object(_State)
    ctx.exit(asyncio.run(_shell(state, vm_id, user, cwd)))


@contextlib.contextmanager
def _raw_terminal(fd: int):
    """Raw mode so every key (Ctrl-C, arrows, ...) goes to the remote shell; always restored."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


async def _shell(state: _State, vm_id: str, user: str | None, cwd: str | None) -> int:
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    cols, rows = shutil.get_terminal_size()
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    def on_input() -> None:
        data = os.read(fd_in, 1 << 16)
        keys.put_nowait(data)
        if not data:  # EOF (piped stdin): stop watching, the shell decides when to end
            loop.remove_reader(fd_in)

    async with state.async_client() as client, client.pty(vm_id, cols, rows, user, cwd) as ws:

        async def send_keys() -> None:
            while data := await keys.get():
                await ws.send(data)  # bytes -> binary frame = keyboard input

        def on_resize() -> None:
            c, r = shutil.get_terminal_size()
            loop.create_task(ws.send(json.dumps({"type": "resize", "cols": c, "rows": r})))

        sys.stdout.flush()
        exit_code = None
        with _raw_terminal(fd_in):
            loop.add_reader(fd_in, on_input)
            loop.add_signal_handler(signal.SIGWINCH, on_resize)
            sender = asyncio.create_task(send_keys())
            try:
                async for msg in ws:
                    if isinstance(msg, bytes):
                        _write_all(fd_out, msg)
                    else:
                        ctl = json.loads(msg)
                        if ctl.get("type") == "exit":
                            exit_code = int(ctl.get("exit_code", 0))
            except Exception as e:  # a dropped connection must still restore the terminal first
                from websockets.exceptions import ConnectionClosed

                if not isinstance(e, ConnectionClosed):
                    raise
            finally:
                sender.cancel()
                loop.remove_signal_handler(signal.SIGWINCH)
                loop.remove_reader(fd_in)
    if exit_code is None:
        click.echo("e2a: connection closed before the shell exited", err=True)
        return 255
    return exit_code


# ====================================================================== files


@main.group()
def files() -> None:
    """Copy and manage files inside a sandbox."""


@files.command("put")
@click.argument("vm_id")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("remote")
@click.option("--mode", help="Octal file mode, e.g. 0755.")
@click.option("--user", help="Owner (default: user).")
@click.pass_context
def files_put(ctx, vm_id, local, remote, mode, user):
    """Upload LOCAL (a file, or - for stdin) to REMOTE, streamed."""
    import pathlib

    src: Any = sys.stdin.buffer if local == "-" else pathlib.Path(local)
    res = _client(ctx).files.write(vm_id, remote, src, mode=mode, user=user)
    click.echo(f"{res.get('path', remote)} ({res.get('size', '?')} bytes)")


@files.command("get")
@click.argument("vm_id")
@click.argument("remote")
@click.argument("local", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def files_get(ctx, vm_id, remote, local):
    """Download REMOTE to LOCAL (default: its base name here; - for stdout), streamed."""
    local = local or os.path.basename(remote.rstrip("/")) or "download"
    dest: Any = sys.stdout.buffer if local == "-" else local
    n = _client(ctx).files.read_to(vm_id, remote, dest)
    if local != "-":
        click.echo(f"{local} ({n} bytes)", err=True)


@files.command("ls")
@click.argument("vm_id")
@click.argument("path", default=".")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def files_ls(ctx, vm_id, path, as_json):
    """List a directory (default: the home directory)."""
    entries = _client(ctx).files.list(vm_id, path)
    if as_json:
        return _print_json([e.__dict__ for e in entries])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col, justify in (("MODE", "left"), ("TYPE", "left"), ("SIZE", "right"), ("MTIME", "left"), ("NAME", "left")):
        table.add_column(col, justify=justify)
    for e in entries:
        table.add_row(e.mode, e.type, str(e.size), e.mtime or "", e.name + ("/" if e.type == "dir" else ""))
    _console().print(table)


@files.command("stat")
@click.argument("vm_id")
@click.argument("path")
@click.pass_context
def files_stat(ctx, vm_id, path):
    """Show one file's metadata as JSON."""
    _print_json(_client(ctx).files.stat(vm_id, path).__dict__)


@files.command("rm")
@click.argument("vm_id")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and its contents.")
@click.pass_context
def files_rm(ctx, vm_id, path, recursive):
    """Remove a file or directory."""
    _client(ctx).files.remove(vm_id, path, recursive=recursive)


@files.command("mkdir")
@click.argument("vm_id")
@click.argument("path")
@click.option("--parents/--no-parents", default=True, help="Create missing parents (default).")
@click.pass_context
def files_mkdir(ctx, vm_id, path, parents):
    """Create a directory."""
    click.echo(_client(ctx).files.mkdir(vm_id, path, parents=parents).path)


@files.command("mv")
@click.argument("vm_id")
@click.argument("src")
@click.argument("dst")
@click.pass_context
def files_mv(ctx, vm_id, src, dst):
    """Rename or move SRC to DST."""
    click.echo(_client(ctx).files.rename(vm_id, src, dst).path)


# ====================================================================== workspaces


@main.group()
def workspaces() -> None:
    """Persistent home directories (sandbox create --workspace): list, inspect, copy, delete."""


def _size(n: int) -> str:
    """1536 -> 1.5 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"


@workspaces.command("ls")
@click.option("--end-user-id", help="Only this end user's workspaces.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workspaces_ls(ctx, end_user_id, as_json):
    """List your workspaces: SCOPE is app/capset[/end user], SIZE as last counted (see `usage`)."""
    rows = _client(ctx).workspaces(end_user_id=end_user_id)
    if as_json:
        return _print_json([w.to_dict() for w in rows])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    # Fits 80 columns: the scope (app/capset[/end user]; names hold no '/') folds, the rest never.
    table.add_column("WORKSPACE ID", no_wrap=True, min_width=24)
    table.add_column("SCOPE", overflow="fold")
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("MOUNTED", no_wrap=True)
    table.add_column("LAST USED (UTC)", no_wrap=True)
    for w in rows:
        scope = "/".join(x for x in (w.app_id, w.capset_id, w.end_user_id) if x)
        table.add_row(w.workspace_id, scope, _size(w.bytes_used), "yes" if w.mounted else "",
                      _short_time(w.last_used_at)[:16])  # to the minute
    _console().print(table)


def _print_fields(data: dict[str, Any]) -> None:
    for key, value in data.items():
        click.echo(f"{key + ':':<18} {value}")


@workspaces.command("show")
@click.argument("workspace_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workspaces_show(ctx, workspace_id, as_json):
    """Show one workspace."""
    data = _client(ctx).workspace(workspace_id).to_dict()
    _print_json(data) if as_json else _print_fields(data)


@workspaces.command("usage")
@click.argument("workspace_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workspaces_usage(ctx, workspace_id, as_json):
    """Count a workspace's bytes and files now, with your total and quota."""
    u = _client(ctx).workspace_usage(workspace_id)
    if as_json:
        return _print_json(u.__dict__)
    _print_fields({"workspace_id": u.workspace_id, "bytes_used": f"{u.bytes_used} ({_size(u.bytes_used)})",
                   "file_count": u.file_count,
                   "user_bytes_used": f"{u.user_bytes_used} ({_size(u.user_bytes_used)})",
                   "quota_bytes": f"{u.quota_bytes} ({_size(u.quota_bytes)})"})


@workspaces.command("files")
@click.argument("workspace_id")
@click.option("--prefix", default="", help="Only paths starting with this (e.g. src/).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def workspaces_files(ctx, workspace_id, prefix, as_json):
    """List a workspace's files (paths relative to /home/user), every page, as they arrive."""
    for f in _client(ctx).iter_workspace_files(workspace_id, prefix, limit=1000):
        if as_json:
            click.echo(json.dumps(f.__dict__))
        else:
            click.echo(f"{f.size:>12}  {_short_time(f.modified)}  {f.path}{'@' if f.type == 'symlink' else ''}")


@workspaces.command("presign")
@click.argument("workspace_id")
@click.argument("path")
@click.option("--put", is_flag=True, help="A URL to write the file (default: to read it).")
@click.option("--expires-in", type=click.IntRange(1), default=900, show_default=True, help="Seconds.")
@click.pass_context
def workspaces_presign(ctx, workspace_id, path, put, expires_in):
    """Print a URL that reads (or, with --put, writes) PATH without the API key."""
    p = _client(ctx).presign_workspace_file(workspace_id, path, "PUT" if put else "GET", expires_in)
    click.echo(p.url)
    click.echo(f"{p.method}, expires {_short_time(p.expires_at)} UTC", err=True)


@workspaces.command("rm")
@click.argument("workspace_id")
@click.argument("path")
@click.pass_context
def workspaces_rm(ctx, workspace_id, path):
    """Delete one file of a workspace."""
    _client(ctx).delete_workspace_file(workspace_id, path)


@workspaces.command("delete")
@click.argument("workspace_id")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def workspaces_delete(ctx, workspace_id, yes):
    """Delete a workspace and every file in it (refused while a sandbox has it mounted)."""
    if not yes:
        click.confirm(f"Delete workspace {workspace_id} and all its files?", abort=True, err=True)
    _client(ctx).delete_workspace(workspace_id)
    click.echo(f"{workspace_id} deleted")


@workspaces.command("put")
@click.argument("workspace_id")
@click.argument("path")
@click.argument("local", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.pass_context
def workspaces_put(ctx, workspace_id, path, local):
    """Upload LOCAL (a file, or - for stdin) to PATH through a presigned URL."""
    import pathlib

    src: Any = sys.stdin.buffer.read() if local == "-" else pathlib.Path(local)
    n = _client(ctx).upload_workspace_file(workspace_id, path, src)
    click.echo(f"{path} ({n} bytes)")


@workspaces.command("get")
@click.argument("workspace_id")
@click.argument("path")
@click.argument("local", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def workspaces_download(ctx, workspace_id, path, local):
    """Download PATH to LOCAL (default: its base name here; - for stdout) through a presigned URL."""
    local = local or os.path.basename(path.rstrip("/")) or "download"
    dest: Any = sys.stdout.buffer if local == "-" else local
    n = _client(ctx).download_workspace_file_to(workspace_id, path, dest)
    if local != "-":
        click.echo(f"{local} ({n} bytes)", err=True)


if __name__ == "__main__":
    main()
