"""The ``e2a`` command line: ``main`` is the root click group.

Client-side commands (``sandbox``, ``task``, ``files``, ``workspaces``, ``sessions``, ``secrets``,
``credits``, ``login``, ``logout``) live here and talk to the server through ``e2a.sdk``.
Server-side commands (``serve``, ``admin ...``) live in ``e2a.server_cli`` and are loaded only when
one of them runs: help lists them by the names and short help in ``SERVER_COMMANDS``, so a client
command (or ``--help``) never imports the server's dependencies (SQLAlchemy, FastAPI, uvicorn, ...).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import click
import httpx

from e2a.sdk import E2A, AsyncE2A, E2AError


# ====================================================================== root group and shared helpers


# Commands defined in e2a.server_cli (name -> short help for listings; keep in step with it).
SERVER_COMMANDS = {
    "admin": "Administer the e2a server (runs on the host).",
    "serve": "Run the e2a server: API, sandbox host and store, on the embedded defaults.",
    "node-agent": "Mount workspaces for the sandbox pods of this Kubernetes node.",
}


class _Main(click.Group):
    """Loads the server-side commands lazily (see SERVER_COMMANDS), and turns SDK and connection
    errors from any subcommand into ``error: <code>: <message>`` + exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SERVER_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SERVER_COMMANDS and cmd_name not in self.commands:
            from e2a import server_cli

            self.add_command(getattr(server_cli, cmd_name.replace("-", "_")), cmd_name)
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
            _fail(e.code, e.message, HINTS.get(e.code))
        except httpx.TransportError as e:
            url = ctx.obj.url if isinstance(ctx.obj, _State) else "?"
            _fail("connection_error", f"cannot reach the e2a server at {url}: {e}")


# What to do next, after the server's own message, for errors a CLI user can act on here.
HINTS = {
    "insufficient_credits": "see your balance with `e2a credits`; buy credits with `e2a credits buy CREDITS`",
    "no_payment_method": "buy credits once with `e2a credits buy CREDITS`: its card is the one auto top-up charges",
    "resume_failed": "the sandbox is still paused, nothing is lost: `e2a sandbox resume` again may work",
}


def _fail(code: str, message: str, hint: str | None = None) -> None:
    click.echo(f"error: {code}: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(1)


class _State:
    """Per-invocation settings; the API client is created on first use so that ``--help`` and the
    server-side commands work without an API key. Without --api-key / E2A_API_KEY the key saved
    by ``e2a login`` is used, for the server it was made on only."""

    def __init__(self, url: str | None, api_key: str | None):
        self.url, self.api_key = url, api_key

    def _config(self) -> tuple[str | None, str | None]:
        if self.api_key:
            return self.url, self.api_key
        saved = _load_credentials()
        if saved and (self.url is None or self.url.rstrip("/") == saved["url"]):
            return saved["url"], saved["api_key"]
        return self.url, None

    @cached_property
    def client(self) -> E2A:
        return E2A(*self._config())

    def async_client(self) -> AsyncE2A:
        return AsyncE2A(*self._config())


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


# ====================================================================== account: login, logout


def _credentials_path() -> Path:
    """$XDG_CONFIG_HOME/e2a/credentials (default ~/.config/e2a/credentials)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "e2a" / "credentials"


def _load_credentials() -> dict[str, str] | None:
    """What ``e2a login`` saved ({url, api_key, key_id, email, user_id}), or None."""
    path = _credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        click.echo(f"warning: ignoring {path}: {e}", err=True)
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k]
                                             for k in ("url", "api_key", "key_id")):
        click.echo(f"warning: ignoring {path}: not a credentials file of e2a login", err=True)
        return None
    data["url"] = data["url"].rstrip("/")
    return data


def _save_credentials(data: dict[str, str]) -> Path:
    """Written whole or not at all, mode 0600 in a 0700 directory."""
    path = _credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".credentials.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _revoke_saved(saved: dict[str, str]) -> None:
    """Revoke a saved key with itself (a key may end itself); raises what the server says."""
    with E2A(saved["url"], saved["api_key"]) as c:
        c.revoke_api_key(saved["key_id"])


def _server_url(ctx: click.Context) -> str:
    url = ctx.find_object(_State).url or os.environ.get("E2A_URL") or "http://127.0.0.1:8080"
    return url.rstrip("/")


def _sign_in(url: str, email: str | None):
    """The sign-in flow: a code mailed to the address, typed in here; the login token. Prompts
    and notices go to stderr: stdout is the command's own output (--json)."""
    email = (email or click.prompt("Email", err=True)).strip()
    sent = E2A.login(email, url)
    click.echo(sent.message[:1].upper() + sent.message[1:] + "." if sent.message
               else f"A login code was sent to {sent.email}.", err=True)
    for attempt in range(3):
        code = click.prompt("Code", err=True).strip()
        try:
            return E2A.verify_otp(sent.email, code, url)
        except E2AError as e:
            if e.code != "invalid_code" or attempt == 2:
                raise
            click.echo("That code is wrong or expired; try again (or run e2a login for a new one).",
                       err=True)


@main.command("login")
@click.option("--email", help="Your email address (asked for when not given).")
@click.pass_context
def login_cmd(ctx: click.Context, email: str | None) -> None:
    """Sign in with a code sent to your email, and keep an API key for later commands.

    The key is saved with the server's URL in $XDG_CONFIG_HOME/e2a/credentials (default
    ~/.config/e2a/credentials, mode 0600) and used whenever E2A_API_KEY is not set. Logging in
    again replaces (and revokes) the saved key.
    """
    url = _server_url(ctx)
    token = _sign_in(url, email)
    with E2A(url, token.token) as account:
        key = account.create_api_key()
    old = _load_credentials()
    path = _save_credentials({"url": url, "api_key": key.key, "key_id": key.key_id,
                              "email": token.email, "user_id": token.user_id})
    if old and old["key_id"] != key.key_id:
        with contextlib.suppress(E2AError, httpx.TransportError):  # the replaced key ends
            _revoke_saved(old)
    click.echo(f"Logged in to {url} as {token.email}: API key {key.prefix}... saved in {path}")


@main.command("logout")
def logout_cmd() -> None:
    """Revoke the API key saved by e2a login and remove the credentials file."""
    path = _credentials_path()
    saved = _load_credentials()
    if saved is None:
        if path.exists():
            path.unlink()
        click.echo(f"Not logged in (no credentials in {path}).")
        return
    try:
        _revoke_saved(saved)
        what = f"API key {saved['key_id']} revoked"
    except E2AError as e:
        if e.status != 401:  # 401: it no longer works anyway (revoked elsewhere)
            raise
        what = f"API key {saved['key_id']} was already revoked"
    path.unlink()
    click.echo(f"Logged out of {saved['url']}: {what}; {path} removed.")


# ====================================================================== sandbox


@main.group()
def sandbox() -> None:
    """Create, inspect and use sandboxes."""


# The variable an agent's key is read from when --llm-key-env is not given.
KEY_ENV = {"claude-code": "ANTHROPIC_API_KEY", "codex": "OPENAI_API_KEY", "gemini-cli": "GEMINI_API_KEY"}
VENDOR_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "google": "GEMINI_API_KEY",
                  "deepseek": "DEEPSEEK_API_KEY"}
OWN_AGENTS = ("e2a", "deictic")


def _own_vendor(model: str | None) -> str | None:
    """The vendor e2a's own agent will talk to, told by the model's name (docs/agents.md)."""
    m = (model or "").lower()
    for prefixes, vendor in ((("claude",), "anthropic"), (("gpt-", "o1", "o3", "o4"), "openai"),
                             (("gemini",), "google"), (("deepseek",), "deepseek")):
        if m.startswith(prefixes):
            return vendor
    return None


def _key_env(agent: str, model: str | None, vendor: str | None) -> str | None:
    """The default variable of the agent's key, or None (an agent this CLI does not know)."""
    if agent in KEY_ENV:
        return KEY_ENV[agent]
    if agent not in OWN_AGENTS:
        return None
    vendor = vendor or _own_vendor(model)
    if vendor:
        return VENDOR_KEY_ENV[vendor]
    # Nothing says which provider: the first key that is set (the server infers the vendor from it).
    return next((name for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY")
                 if os.environ.get(name)), "ANTHROPIC_API_KEY")


def _llm_key(agent: str | None, key_env: str | None, model: str | None, vendor: str | None) -> str | None:
    """The key, from the environment only: on the command line it would show in the process list."""
    if agent is None:
        if key_env:
            raise click.UsageError("--llm-key-env applies only with --agent")
        return None
    name = key_env or _key_env(agent, model, vendor)
    if name is None:
        return None  # an agent unknown here: the server says which agents there are
    key = os.environ.get(name, "").strip()
    if not key:
        how = "" if key_env else " (or name another variable with --llm-key-env)"
        raise click.UsageError(f"the environment variable {name} holds no LLM key for {agent}: "
                               f"export your key there{how}")
    return key


def _text_arg(value: str | None) -> str | None:
    """A task given as - is read from stdin."""
    return sys.stdin.read() if value == "-" else value


def _tools_file(ctx: click.Context, param: click.Parameter, value: str | None) -> list[dict] | None:
    if value is None:
        return None
    try:
        with open(value) as f:
            tools = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read a JSON list of tools from {value}: {e}", ctx=ctx, param=param)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise click.BadParameter("expected a JSON list of {name, description, parameters, command}",
                                 ctx=ctx, param=param)
    return tools


@sandbox.command("create")
@click.argument("template", default="standard")
@click.option("--env", "env_vars", multiple=True, callback=_key_values, metavar="K=V",
              help="Environment variable for every command (repeatable).")
@click.option("--metadata", multiple=True, callback=_key_values, metavar="K=V", help="Metadata tag (repeatable).")
@click.option("--idle-timeout", type=int, help="Destroy (or pause: --on-idle) after this many idle seconds.")
@click.option("--max-lifetime", type=int, help="Destroy after this many seconds in total.")
@click.option("--internet/--no-internet", default=None, help="Allow outbound internet (server default if unset).")
@click.option("--on-idle", type=click.Choice(["destroy", "pause"]),
              help="What the idle timeout does to it [server default: destroy]; a paused one keeps its "
                   "memory and files until `e2a sandbox resume`.")
@click.option("--auto-resume", is_flag=True, default=None,
              help="An exec, files or port call on it while paused resumes it first.")
@click.option("--workspace", is_flag=True, help="Mount your default workspace on /home/user (kept after the sandbox).")
@click.option("--app-id", help="Workspace of this app (implies --workspace).")
@click.option("--capset-id", help="Workspace of this capability set (implies --workspace).")
@click.option("--end-user-id", help="Workspace of this end user (implies --workspace).")
@click.option("--agent", help="Start an agent with your LLM key: e2a (e2a's own), claude-code, codex or gemini-cli.")
@click.option("--task", help="The agent's task (- reads it from stdin).")
@click.option("--model", help="The agent's model (e.g. claude-sonnet-5-5, gpt-5, gemini-2.5-pro).")
@click.option("--llm-key-env", metavar="NAME",
              help="Environment variable holding the LLM key [default by agent: ANTHROPIC_API_KEY, "
                   "OPENAI_API_KEY or GEMINI_API_KEY]. The key itself is never an argument.")
@click.option("--llm-vendor", type=click.Choice(["anthropic", "openai", "google", "deepseek"]),
              help="e2a's own agent: the provider (default: told by the model or the key).")
@click.option("--llm-base-url", help="e2a's own agent: an OpenAI-compatible (or the vendor's) API at a public https URL.")
@click.option("--system-prompt", help="e2a's own agent: added to its system prompt.")
@click.option("--tools-file", callback=_tools_file, metavar="PATH",
              help="e2a's own agent: a JSON list of extra tools {name, description, parameters, command}.")
@click.option("--max-steps", type=click.IntRange(1), help="e2a's own agent: model turns allowed.")
@click.option("--task-timeout", type=click.IntRange(1), help="Stop the task after this many seconds (timed_out).")
@click.option("--keep-after-task", type=click.IntRange(0), metavar="SECONDS",
              help="Keep the sandbox this long after the task ends, for `e2a task send` (default: destroyed).")
@click.option("--follow", is_flag=True, help="Then print the agent's events until the task ends "
                                             "(exit 0 if it succeeded, 1 if not).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole sandbox as JSON.")
@click.pass_context
def sandbox_create(ctx, template, env_vars, metadata, idle_timeout, max_lifetime, internet, on_idle,
                   auto_resume, workspace, app_id, capset_id, end_user_id, agent, task, model, llm_key_env,
                   llm_vendor, llm_base_url, system_prompt, tools_file, max_steps, task_timeout,
                   keep_after_task, follow, as_json):
    """Create a sandbox from TEMPLATE (default: standard) and print its id.

    \b
    With an agent working on a task, your key read from the environment:
      e2a sandbox create browser --agent claude-code --task 'Find ...' --follow
    """
    scope = {k: v for k, v in (("app_id", app_id), ("capset_id", capset_id), ("end_user_id", end_user_id))
             if v is not None}
    if follow and not (agent and task):
        raise click.UsageError("--follow needs --agent and --task")
    llm = {"vendor": llm_vendor, "base_url": llm_base_url} if (llm_vendor or llm_base_url) else None
    llm_key = _llm_key(agent, llm_key_env, model, llm_vendor)
    client = _client(ctx)
    sb = client.create_sandbox(template, env_vars=env_vars, metadata=metadata,
                               idle_timeout_seconds=idle_timeout, max_lifetime_seconds=max_lifetime,
                               internet=internet, workspace=scope or (True if workspace else None),
                               agent=agent, llm_key=llm_key, task=_text_arg(task), model=model, llm=llm,
                               system_prompt=system_prompt, tools=tools_file, max_steps=max_steps,
                               task_timeout_seconds=task_timeout, keep_after_task_seconds=keep_after_task,
                               on_idle=on_idle, auto_resume=auto_resume)
    _print_json(sb.to_dict()) if as_json else click.echo(sb.vm_id)
    if follow:
        ctx.exit(_follow_task(ctx, sb.vm_id, 0, as_json=False, until_finished=True))


@sandbox.command("ls")
@click.option("--state", help="Only sandboxes in this state (e.g. running).")
@click.option("--metadata", multiple=True, callback=_key_values, metavar="K=V", help="Only with this tag.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sandbox_ls(ctx, state, metadata, as_json):
    """List your sandboxes (a paused one's STATE says the disk it holds)."""
    boxes = _client(ctx).list_sandboxes(state=state, metadata=metadata)
    if as_json:
        return _print_json([b.to_dict() for b in boxes])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    # Ids and times are copied by people: never wrapped or cut; metadata may fold.
    # Sizes follow from the template, expiry is in `sandbox get`: an 80-column terminal fits.
    # The disk a paused sandbox holds is in its STATE ("paused 1.5G"): a column of its own
    # would leave metadata no room at 80 columns.
    table.add_column("VM ID", no_wrap=True, min_width=24)
    for col in ("STATE", "TEMPLATE", "CREATED (UTC)"):
        table.add_column(col, no_wrap=True)
    table.add_column("METADATA")
    for b in boxes:
        meta = ",".join(f"{k}={v}" for k, v in (b.metadata or {}).items())
        state = b.state if b.disk_bytes is None else f"{b.state} {_short_size(b.disk_bytes)}"
        table.add_row(b.vm_id, state, b.template, _short_time(b.created_at), meta)
    _console().print(table)


def _short_size(n: int) -> str:
    """A size in at most 5 characters, binary units: 900B, 1.5K, 512M, 12G."""
    value = float(n)
    for unit in "BKMGT":
        if value < 999.5 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 9.95 else f"{value:.1f}{unit}"
        value /= 1024


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
        if key == "disk_bytes" and value is not None:
            value = f"{value} ({_size(value)})"
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


def _paused_line(sb) -> str:
    """sbx_... paused, 1.2 GiB on disk until 2026-01-02 00:00:00 UTC."""
    line = f"{sb.vm_id} {sb.state}"
    held = [f"{_size(sb.disk_bytes)} on disk" if sb.disk_bytes is not None else "",
            f"until {_short_time(sb.pause_expires_at)} UTC" if sb.pause_expires_at else ""]
    return line + (", " + " ".join(x for x in held if x) if any(held) else "")


@sandbox.command("pause")
@click.argument("vm_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole sandbox as JSON.")
@click.pass_context
def sandbox_pause(ctx, vm_id, as_json):
    """Pause a running sandbox, keeping its memory and files.

    Its processes stop until `e2a sandbox resume`; it is destroyed when the pause expires (the
    time printed), unless resumed first."""
    sb = _client(ctx).pause(vm_id)
    _print_json(sb.to_dict()) if as_json else click.echo(_paused_line(sb))


@sandbox.command("resume")
@click.argument("vm_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole sandbox as JSON.")
@click.pass_context
def sandbox_resume(ctx, vm_id, as_json):
    """Resume a paused sandbox where it stopped."""
    sb = _client(ctx).resume(vm_id)
    _print_json(sb.to_dict()) if as_json else click.echo(f"{sb.vm_id} {sb.state}")


@sandbox.command("fork")
@click.argument("vm_id")
@click.option("--count", type=click.IntRange(1), default=1, show_default=True,
              help="How many copies (the server allows up to 10).")
@click.option("--json", "as_json", is_flag=True, help="Print the new sandboxes as a JSON list.")
@click.pass_context
def sandbox_fork(ctx, vm_id, count, as_json):
    """Copy a running sandbox into new ones and print their ids.

    Each copy starts running with the sandbox's memory and files as they are now; the ids are
    printed one a line. A sandbox with a workspace cannot be forked."""
    boxes = _client(ctx).fork(vm_id, count)
    if as_json:
        return _print_json([b.to_dict() for b in boxes])
    for b in boxes:
        click.echo(b.vm_id)


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
@click.option("--user", help="user (default) or root (not on Kubernetes by default).")
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
    """Copy our stdin to the remote command as it arrives.

    os.read on the descriptor, not sys.stdin.buffer: this daemon thread is still blocked in the
    read when the command exits, and a BufferedReader's lock held at interpreter shutdown aborts
    the process (SIGABRT, "could not acquire lock for <stdin>") instead of exiting with the code.
    A stdin with no descriptor (a test runner's) is read as it is."""
    try:
        fd = sys.stdin.fileno()
        read = functools.partial(os.read, fd)
    except (OSError, ValueError):
        read = getattr(sys.stdin.buffer, "read1", sys.stdin.buffer.read)
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
@click.option("--user", help="user (default) or root (not on Kubernetes by default).")
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


# ====================================================================== task (an agent's)


@main.group("task")
def task_group() -> None:
    """An agent's task in a sandbox (sandbox create --agent): show, events, cancel, send, wait."""


def _print_task(t, as_json: bool) -> None:
    if as_json:
        return _print_json(t.to_dict())
    _print_fields(t.to_dict())


class _EventPrinter:
    """Prints task events for people: the agent's text as it streams, tool calls (→), their
    results (←), then how the task ended. Knows e2a's own agent's events and those of claude-code,
    codex and gemini-cli (type `cli`); anything else is shown as its type and JSON."""

    OUTPUT_LINES = 20  # of a tool's result, shown

    def __init__(self):
        from rich.console import Console

        self.console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
        self.open_line = False        # text printed without its newline yet (streamed deltas)
        self.streamed = False         # this turn's text came as deltas: its whole message is not repeated
        self.outputs: set[str] = set()  # tool calls whose output streamed already
        self.plan = ""                # codex's todo list, as last shown

    # ---- printing

    def _end_line(self) -> None:
        if self.open_line:
            self.console.print()
            self.open_line = False

    def text(self, text: str, style: str | None = None) -> None:
        self._end_line()
        self.console.print(text.rstrip("\n"), style=style)

    def stream(self, text: str, style: str | None = None) -> None:
        if text:
            self.console.print(text, style=style, end="")
            self.open_line = not text.endswith("\n")

    def call(self, name: str, args: Any) -> None:
        shown = args.get("command") if isinstance(args, dict) and name in ("shell", "Bash", "bash") else None
        self.text(f"→ {name}" + (f": {shown}" if shown else f"({_compact(args)})" if args not in (None, {}, "") else ""),
                  style="bold cyan")

    def result(self, name: str, output: Any, is_error: bool = False, streamed: bool = False) -> None:
        head = f"← {name}" + (" (error)" if is_error else "")
        body = "" if streamed else _clip(output if isinstance(output, str) else _compact(output), self.OUTPUT_LINES)
        style = "red" if is_error else "green"
        if body and "\n" not in body and len(body) < 100:
            self.text(f"{head}: {body}", style=style)
            return
        self.text(head, style=style)
        if body:
            self.text(body, style="dim")

    def finished(self) -> None:
        self._end_line()

    # ---- events

    def event(self, ev) -> None:
        d = ev.data if isinstance(ev.data, dict) else {}
        kind = ev.type
        if kind == "task_started":
            model = f", model {d['model']}" if d.get("model") else ""
            self.text(f"── task {d.get('task_id', ev.task_id)} started ({d.get('agent', '?')}{model})", style="bold")
        elif kind == "task_finished":
            self.text(_task_summary(d, ev.task_id), style="bold green" if d.get("state") == "succeeded" else "bold red")
        elif kind == "message_delta":
            self.streamed = True
            self.stream(str(d.get("text", "")))
        elif kind == "message":
            if not self.streamed:
                self.text(str(d.get("text", "")))
            self._end_line()
            self.streamed = False
        elif kind == "tool_call":
            self.streamed = False
            self.call(str(d.get("name", "?")), d.get("arguments"))
        elif kind == "tool_output":
            self.outputs.add(str(d.get("id")))
            self.stream(str(d.get("text", "")), style="dim")
        elif kind == "tool_result":
            images = d.get("images") or []
            output = d.get("output")
            if images:
                output = f"{output or ''}{' ' if output else ''}[{len(images)} image(s)]"
            self.result(str(d.get("name", "?")), output, bool(d.get("is_error")),
                        streamed=str(d.get("id")) in self.outputs and not images)
        elif kind in ("stdout", "stderr"):
            self.text(str(d.get("text", "")), style="dim" if kind == "stdout" else "yellow")
        elif kind == "cli":
            self.cli(d)
        elif kind == "error" and ("code" in d or "message" in d):
            self.text(f"error: {d.get('code', '?')}: {d.get('message', '')}", style="red")
        else:
            self.text(f"[{kind}] {_compact(d)}", style="dim")

    def cli(self, d: dict) -> None:
        """One JSON event of claude-code (stream-json), codex (exec --json) or gemini-cli (stream-json)."""
        t = d.get("type")
        item = d.get("item") if isinstance(d.get("item"), dict) else None
        # claude-code
        if t in ("assistant", "user") and isinstance(d.get("message"), dict):
            content = d["message"].get("content")
            for block in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if not isinstance(block, dict):
                    continue
                bt = block.get("type")
                if bt == "text" and t == "assistant":
                    self.text(str(block.get("text", "")))
                elif bt == "thinking":
                    self.text(str(block.get("thinking", "")), style="dim italic")
                elif bt == "tool_use":
                    self.call(str(block.get("name", "?")), block.get("input"))
                elif bt == "tool_result":
                    self.result("result", _block_text(block.get("content")), bool(block.get("is_error")))
            return
        if t == "system" and d.get("subtype") == "init":
            return self.text(f"claude-code session {d.get('session_id', '')} (model {d.get('model', '?')})", style="dim")
        if t == "result" and "subtype" in d:
            return self.text(f"claude-code: {d.get('subtype')} after {d.get('num_turns', '?')} turn(s)", style="dim")
        if t == "stream_event":
            return  # partial messages: the whole message follows
        # codex
        if item is not None and t in ("item.started", "item.updated", "item.completed"):
            return self.codex_item(t, item)
        if t == "thread.started":
            return self.text(f"codex thread {d.get('thread_id', '')}", style="dim")
        if t == "turn.started":
            return
        if t == "turn.completed":
            u = d.get("usage") or {}
            return self.text(f"codex: turn completed ({u.get('input_tokens', '?')} in, "
                             f"{u.get('output_tokens', '?')} out)", style="dim")
        if t == "turn.failed":
            return self.text(f"codex: turn failed: {(d.get('error') or {}).get('message', '')}", style="red")
        # gemini-cli
        if t == "init":
            return self.text(f"gemini-cli session {d.get('session_id', '')} (model {d.get('model', '?')})", style="dim")
        if t == "message":
            if d.get("role") == "assistant":
                if d.get("delta"):
                    return self.stream(str(d.get("content", "")))
                return self.text(str(d.get("content", "")))
            return
        if t == "tool_use":
            return self.call(str(d.get("tool_name", "?")), d.get("parameters"))
        if t == "tool_result":
            err = d.get("error")
            failed = d.get("status") == "error" or bool(err)
            out = (err.get("message") if isinstance(err, dict) else err) if failed and err else d.get("output")
            return self.result(str(d.get("tool_id", "result")), out, failed)
        if t == "result":
            return self.text(f"gemini-cli: {d.get('status', '?')}", style="dim")
        if t == "error":
            return self.text(f"error: {d.get('message', _compact(d))}", style="red")
        self.text(f"[cli] {_compact(d)}", style="dim")

    def codex_item(self, t: str, item: dict) -> None:
        kind = item.get("type")
        if kind == "agent_message":
            if t == "item.completed":
                self.text(str(item.get("text", "")))
        elif kind == "reasoning":
            if t == "item.completed":
                self.text(str(item.get("text", "")), style="dim italic")
        elif kind == "command_execution":
            if t == "item.started":
                self.call("shell", {"command": item.get("command")})
            elif t == "item.completed":
                code = item.get("exit_code")
                self.result(f"shell (exit {code})", item.get("aggregated_output", ""),
                            code not in (0, None) or item.get("status") == "failed")
        elif kind == "file_change":
            if t == "item.completed":
                changes = ", ".join(f"{c.get('kind', '?')} {c.get('path', '?')}" for c in item.get("changes") or [])
                self.call("edit", changes)
        elif kind == "mcp_tool_call":
            name = f"{item.get('server', '?')}.{item.get('tool', '?')}"
            if t == "item.started":
                self.call(name, item.get("arguments"))
            elif t == "item.completed":
                self.result(name, item.get("result") or item.get("error"), item.get("status") == "failed")
        elif kind == "web_search":
            if t == "item.started":
                self.call("web_search", item.get("query"))
        elif kind == "todo_list":
            todo = "; ".join(("[x] " if i.get("completed") else "[ ] ") + str(i.get("text", ""))
                             for i in item.get("items") or [] if isinstance(i, dict))
            if todo != self.plan:  # started, updated, completed: shown when it changes
                self.plan = todo
                self.text(f"plan: {todo}", style="dim")
        elif kind == "error":
            self.text(f"error: {item.get('message', '')}", style="red")
        elif t == "item.completed":
            self.text(f"[{kind}] {_compact(item)}", style="dim")


def _compact(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def _clip(text: str, lines: int) -> str:
    text = (text or "").rstrip("\n")
    rows = text.split("\n")
    if len(rows) > lines:
        text = "\n".join(rows[:lines]) + f"\n… ({len(rows) - lines} more lines)"
    return text if len(text) <= 4000 else text[:4000] + "…"


def _block_text(content: Any) -> str:
    """claude-code's tool_result content: a string or a list of blocks."""
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) if isinstance(b, dict) and b.get("type") == "text"
                         else f"[{b.get('type', '?')}]" if isinstance(b, dict) else str(b) for b in content)
    return "" if content is None else str(content)


def _task_summary(d: dict, task_id: str = "") -> str:
    state = d.get("state", "?")
    counts = (f"{d.get('llm_requests', 0)} LLM request(s), {d.get('input_tokens', 0)} tokens in, "
              f"{d.get('output_tokens', 0)} out")
    line = f"── task {d.get('task_id') or task_id} {state} ({counts})"
    if state != "succeeded" and d.get("error"):
        line += f": {d['error']}"
    return line


def _follow_task(ctx: click.Context, vm_id: str, after: int, as_json: bool, task_id: str | None = None,
                 until_finished: bool = False) -> int:
    """Print the events live (only task_id's if given) until the stream ends, or with
    `until_finished` until the (first, or task_id's) task_finished event; 0 if the task
    succeeded, else 1 (130 on Ctrl-C: the task goes on)."""
    client = _client(ctx)
    printer = None if as_json else _EventPrinter()
    state = None
    try:
        for ev in client.iter_task_events(vm_id, after=after):
            if task_id is not None and ev.task_id != task_id:
                continue
            if printer:
                printer.event(ev)
            else:
                click.echo(json.dumps(ev.to_dict()))
            if ev.type == "task_finished":
                state = ev.data.get("state")
                if until_finished:
                    break
    except KeyboardInterrupt:
        if printer:
            printer.finished()
        click.echo(f"e2a: stopped following; the task goes on (e2a task cancel {vm_id} stops it)", err=True)
        return 130
    if printer:
        printer.finished()
    if state is None:  # nothing ended while we followed: ask how the task stands
        with contextlib.suppress(E2AError):
            state = client.task(vm_id).state
    return 0 if state == "succeeded" else 1


@task_group.command("show")
@click.argument("vm_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def task_show(ctx, vm_id, as_json):
    """Show the sandbox's latest task: state, result or error, counts."""
    _print_task(_client(ctx).task(vm_id), as_json)


@task_group.command("events")
@click.argument("vm_id")
@click.option("--after", type=click.IntRange(0), default=0, show_default=True,
              help="Only events after this seq (each event is numbered).")
@click.option("-f", "--follow", is_flag=True, help="Go on printing events as they happen, until the task ends.")
@click.option("--json", "as_json", is_flag=True, help="One raw JSON event per line.")
@click.pass_context
def task_events(ctx, vm_id, after, follow, as_json):
    """Print the agent's events: its messages, tool calls (→) and their results (←)."""
    if follow:
        code = _follow_task(ctx, vm_id, after, as_json)
        ctx.exit(130 if code == 130 else 0)
    client = _client(ctx)
    printer = None if as_json else _EventPrinter()
    limit = 1000
    while True:
        events, nxt, _done = client.task_events(vm_id, after=after, limit=limit)
        for ev in events:
            printer.event(ev) if printer else click.echo(json.dumps(ev.to_dict()))
        if len(events) < limit or nxt <= after:
            break
        after = nxt
    if printer:
        printer.finished()


@task_group.command("cancel")
@click.argument("vm_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def task_cancel(ctx, vm_id, as_json):
    """Stop the running task."""
    t = _client(ctx).cancel_task(vm_id)
    _print_task(t, True) if as_json else click.echo(f"{t.task_id} {t.state}")


@task_group.command("send")
@click.argument("vm_id")
@click.argument("text")
@click.option("--model", help="Another model for this task.")
@click.option("--task-timeout", type=click.IntRange(1), help="Stop the task after this many seconds.")
@click.option("--follow", is_flag=True, help="Then print its events until it ends (exit 0 if it succeeded).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def task_send(ctx, vm_id, text, model, task_timeout, follow, as_json):
    """Give a kept sandbox's agent a further TEXT task (- reads it from stdin)."""
    t = _client(ctx).send_task(vm_id, _text_arg(text), model=model, task_timeout_seconds=task_timeout)
    _print_task(t, True) if as_json else click.echo(t.task_id)
    if follow:  # the sandbox's events are numbered over all its tasks: only this one's are shown
        ctx.exit(_follow_task(ctx, vm_id, 0, as_json=False, task_id=t.task_id, until_finished=True))


@task_group.command("wait")
@click.argument("vm_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 1; the task goes on).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def task_wait(ctx, vm_id, timeout, as_json):
    """Wait for the task to end and show it; exit 0 if it succeeded, 1 if not."""
    t = _client(ctx).wait_task(vm_id, timeout=timeout)
    _print_task(t, as_json)
    ctx.exit(0 if t.state == "succeeded" else 1)


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


# ====================================================================== sessions


@main.group("sessions")
def sessions_group() -> None:
    """Agent sessions: an end user's conversation with an agent in a sandbox, over a WebSocket."""


def _session_llm_key(agent: str, key_env: str | None, model: str | None, vendor: str | None,
                     secrets: tuple[str, ...]) -> str | None:
    """The LLM key to send, from the environment only (never an argument): the variable named by
    --llm-key-env; else none if a secret bundle is named (it holds the key); else the agent's
    usual variable."""
    if key_env:
        key = os.environ.get(key_env, "").strip()
        if not key:
            raise click.UsageError(f"the environment variable {key_env} holds no LLM key: export your key there")
        return key
    if secrets:
        return None
    name = _key_env(agent, model, vendor)
    if name is None:
        return None  # an agent unknown here: the server says which agents there are
    key = os.environ.get(name, "").strip()
    if not key:
        raise click.UsageError(f"no LLM key for {agent}: name a secret bundle that holds LLM_API_KEY with "
                               f"--secret (see e2a secrets put), or export your key in {name} (or name "
                               "another variable with --llm-key-env)")
    return key


@sessions_group.command("create")
@click.option("--user-id", required=True, help="The end user the session is for.")
@click.option("--agent", default="deictic", show_default=True,
              help="deictic (e2a's own agent, alias e2a), claude-code, codex or gemini-cli.")
@click.option("--version", "agent_version", help="The agent's version: latest or an exact one (default: e2a's pin).")
@click.option("--template", default="standard", show_default=True, help="standard, browser, cua or canvas.")
@click.option("--secret", "secrets", multiple=True, metavar="NAME",
              help="A secret bundle with the LLM settings (LLM_API_KEY, LLM_BASE_URL, LLM_MODEL, LLM_VENDOR); "
                   "repeatable. See e2a secrets put.")
@click.option("--llm-key-env", metavar="NAME",
              help="Environment variable holding the LLM key (wins over the bundles'). The key itself is "
                   "never an argument. Default, without --secret: the agent's usual variable.")
@click.option("--vendor", type=click.Choice(["anthropic", "openai", "google", "deepseek"]), help="The LLM's provider.")
@click.option("--model", help="The LLM's model.")
@click.option("--base-url", help="An OpenAI-compatible (or the vendor's) API at a public https URL.")
@click.option("--app-id", help="The app the session belongs to (default: default).")
@click.option("--set-id", help="The app's capability set (default: default).")
@click.option("--capability", "capabilities", multiple=True, metavar="NAME",
              help="What the agent may use: shell, files, browser, computer (repeatable; default: the set's).")
@click.option("--ttl", type=int, help="Seconds the session lives (60..7200; default 3600).")
@click.option("--system-prompt", help="Added to the agent's system prompt.")
@click.option("--metadata", multiple=True, callback=_key_values, metavar="K=V", help="Metadata tag (repeatable).")
@click.option("--show-jwt", is_flag=True, help="Print the session's JWT too (a credential: keep it out of logs).")
@click.option("--json", "as_json", is_flag=True, help="Print the ticket as JSON, its JWT included.")
@click.pass_context
def sessions_create(ctx, user_id, agent, agent_version, template, secrets, llm_key_env, vendor, model, base_url,
                    app_id, set_id, capabilities, ttl, system_prompt, metadata, show_jwt, as_json):
    """Start an agent session for an end user and print its id, connect URL and expiry.

    \b
    The JWT is the session's credential, for the end user's client: shown only with --show-jwt or --json.
      e2a secrets put openai --env LLM_API_KEY=OPENAI_API_KEY
      e2a sessions create --user-id u42 --secret openai --model gpt-5
      e2a sessions send ses_... 'Summarise data.csv' --attach data.csv
    """
    api_key = _session_llm_key(agent, llm_key_env, model, vendor, secrets)
    ticket = _client(ctx).create_session(
        user_id, agent=agent, version=agent_version, template=template, vendor=vendor, model=model,
        base_url=base_url, api_key=api_key, secrets=list(secrets), app_id=app_id, set_id=set_id,
        capability_sets=list(capabilities) or None, ttl_seconds=ttl, system_prompt=system_prompt,
        metadata=metadata)
    if as_json:
        return _print_json(ticket.to_dict(include_jwt=True))
    _print_fields(ticket.to_dict(include_jwt=show_jwt))


@sessions_group.command("ls")
@click.option("--state", type=click.Choice(["active", "ended"]), help="Only sessions in this state.")
@click.option("--user-id", help="Only this end user's sessions.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sessions_ls(ctx, state, user_id, as_json):
    """List your sessions."""
    rows = _client(ctx).sessions(state=state, user_id=user_id)
    if as_json:
        return _print_json([s.to_dict() for s in rows])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("SESSION ID", no_wrap=True, min_width=24)
    table.add_column("STATE", no_wrap=True)
    table.add_column("USER", overflow="fold")
    table.add_column("AGENT", no_wrap=True)
    table.add_column("TASK", no_wrap=True)
    table.add_column("CREATED (UTC)", no_wrap=True)
    for s in rows:
        state_text = s.state + (" (connected)" if s.connected else f" ({s.end_reason})" if s.end_reason else "")
        task = f"{s.task.get('state', '')}" if s.task else ""
        table.add_row(s.chat_session_id, state_text, s.user_id, str((s.agent or {}).get("kind", "")), task,
                      _short_time(s.created_at))
    _console().print(table)


@sessions_group.command("show")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sessions_show(ctx, session_id, as_json):
    """Show one session: its agent, LLM (never a key), app, task and usage."""
    data = _client(ctx).session(session_id).to_dict()
    if as_json:
        return _print_json(data)
    _print_fields({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in data.items()})


@sessions_group.command("end")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sessions_end(ctx, session_id, as_json):
    """End a session: its sandbox is destroyed, a connected client is told (close 4000 deleted)."""
    s = _client(ctx).end_session(session_id)
    if as_json:
        return _print_json(s.to_dict())
    click.echo(f"{s.chat_session_id} {s.state}" + (f" ({s.end_reason})" if s.end_reason else ""))


def _attachments(paths: tuple[str, ...]) -> dict[str, bytes] | None:
    out: dict[str, bytes] = {}
    for path in paths:
        name = os.path.basename(path)
        if name in out:
            raise click.UsageError(f"two attachments named {name}: they would land on one file, "
                                   f"/home/user/attachments/{name}")
        with open(path, "rb") as f:
            out[name] = f.read()
    return out or None


@sessions_group.command("send")
@click.argument("session_id")
@click.argument("text")
@click.option("--attach", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="A file for the agent, written to /home/user/attachments/<its name> first (repeatable).")
@click.option("--timeout", type=float, help="Stop waiting after this many seconds (exit 1; the task goes on).")
@click.option("--json", "as_json", is_flag=True, help="One raw JSON event per line.")
@click.pass_context
def sessions_send(ctx, session_id, text, attach, timeout, as_json):
    """Give the session's agent a TEXT task (- reads it from stdin) and print its work as it comes:
    its messages, tool calls (→) and their results (←). Exits 0 if the task succeeded, 1 if not.

    This connects as the session's client: a connection already open to it (an app's) is taken
    over. A dropped connection is resumed without losing or repeating an event.
    """
    client = _client(ctx)
    attachments = _attachments(attach)
    text = _text_arg(text)
    printer = None if as_json else _EventPrinter()

    def show(ev) -> None:
        printer.event(ev) if printer else click.echo(json.dumps(ev.to_dict()))

    ticket = client.session_token(session_id)  # a fresh JWT: the API key never goes on the WebSocket
    try:
        with client.connect_session(ticket) as conn:
            done = conn.run_task(text, attachments, on_event=show, timeout=timeout)
    except KeyboardInterrupt:
        if printer:
            printer.finished()
        click.echo(f"e2a: stopped following; the task goes on (e2a sessions cancel {session_id} stops it)", err=True)
        ctx.exit(130)
    if printer:
        printer.finished()
    ctx.exit(0 if done.get("state") == "succeeded" else 1)


@sessions_group.command("cancel")
@click.argument("session_id")
@click.pass_context
def sessions_cancel(ctx, session_id):
    """Stop the session's running task (connects as its client: an open connection is taken over)."""
    client = _client(ctx)
    with client.connect_session(client.session_token(session_id)) as conn:
        task_id = conn.cancel()
    click.echo(f"{task_id or '-'} cancelled")


# ====================================================================== secrets


@main.group("secrets")
def secrets_group() -> None:
    """Secret bundles: named values (an LLM key, its URL, ...) kept by the server for sessions
    (sessions create --secret NAME). Only their keys are ever shown."""


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_values(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("LLM_API_KEY=OPENAI_API_KEY",)`` -> {"LLM_API_KEY": <that variable's value>}."""
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, var = item.partition("=")
        if not sep or not key or not var:
            raise click.UsageError(f"--env expects KEY=ENVVAR (the name of an environment variable), got {item!r}")
        if not ENV_NAME.match(var):  # a value where a name belongs: not repeated back
            raise click.UsageError(f"--env {key}=...: what follows = must name an environment variable "
                                   "holding the value (the value itself is never an argument)")
        value = os.environ.get(var)
        if not value:
            raise click.UsageError(f"the environment variable {var} (for {key}) is not set or empty")
        out[key] = value
    return out


def _stdin_values() -> dict[str, str]:
    try:
        values = json.loads(sys.stdin.read())
    except ValueError as e:  # the error names a position, never the text
        raise click.UsageError(f"--stdin-json: stdin is not JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(values, dict) or not values or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise click.UsageError('--stdin-json: expected a JSON object of names to strings, {"KEY": "value", ...}')
    return values


def _print_bundle(b, as_json: bool) -> None:
    if as_json:
        return _print_json(b.to_dict())
    _print_fields({**b.to_dict(), "keys": ", ".join(b.keys)})


@secrets_group.command("put")
@click.argument("name")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=ENVVAR",
              help="KEY gets the value of the environment variable ENVVAR (repeatable).")
@click.option("--stdin-json", is_flag=True, help='Read the values from stdin: {"KEY": "value", ...}.')
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def secrets_put(ctx, name, env_pairs, stdin_json, as_json):
    """Create the bundle NAME, or replace all its values if it exists.

    \b
    Values come from environment variables or stdin, never from arguments (which shell history
    and the process list would keep):
      e2a secrets put openai --env LLM_API_KEY=OPENAI_API_KEY --env LLM_VENDOR=MY_VENDOR
      e2a secrets put openai --stdin-json < openai.json
    """
    if bool(env_pairs) == stdin_json:
        raise click.UsageError("give the values with --env KEY=ENVVAR (repeatable) or with --stdin-json: one of them")
    values = _stdin_values() if stdin_json else _env_values(env_pairs)
    _print_bundle(_client(ctx).secrets.put(name, values), as_json)


@secrets_group.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def secrets_ls(ctx, as_json):
    """List your secret bundles (names and keys only)."""
    rows = _client(ctx).secrets.list()
    if as_json:
        return _print_json([b.to_dict() for b in rows])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("NAME", no_wrap=True)
    table.add_column("KEYS", overflow="fold")
    table.add_column("VERSION", justify="right", no_wrap=True)
    table.add_column("UPDATED (UTC)", no_wrap=True)
    for b in rows:
        table.add_row(b.name, ", ".join(b.keys), str(b.version), _short_time(b.updated_at))
    _console().print(table)


@secrets_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def secrets_show(ctx, name, as_json):
    """Show one bundle: its keys and version (the values never leave the server)."""
    _print_bundle(_client(ctx).secrets.get(name), as_json)


@secrets_group.command("rm")
@click.argument("name")
@click.pass_context
def secrets_rm(ctx, name):
    """Delete a bundle (sessions already started keep what they were given)."""
    _client(ctx).secrets.delete(name)
    click.echo(f"{name} deleted")


# ====================================================================== credits


@main.group("credits", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the balance as JSON.")
@click.pass_context
def credits_group(ctx, as_json):
    """Your credits (1 credit = 1 US cent): the balance, and with a subcommand the ledger,
    usage, buying credits and auto top-up. Without one: the balance."""
    if ctx.invoked_subcommand is not None:
        return
    b = _client(ctx).billing.balance()
    if as_json:
        return _print_json(b.to_dict())
    click.echo(f"Balance: {_micro_credits(b.credit_balance_micro)} credits")
    click.echo(f"Auto top-up: {_topup_state(b.auto_topup)}")
    failed = b.auto_topup.last_failure
    if failed:
        click.echo(f"Last top-up failed at {_short_time(failed.get('at'))} UTC: {failed.get('message')}; "
                   "none is tried again until the settings are saved (e2a credits auto-topup --enable) "
                   "or credits are bought")


def _micro_credits(micro: int) -> str:
    """1234567 -> 1.234567, -500000 -> -0.5: exact, no trailing zeros."""
    sign, micro = ("-" if micro < 0 else ""), abs(micro)
    whole, frac = divmod(micro, 1_000_000)
    return f"{sign}{whole:,}" + (f".{frac:06d}".rstrip("0") if frac else "")


def _credits(value: float) -> str:
    """A credit amount as the server gives it (exact to 6 decimal places), without float noise."""
    return _micro_credits(round(value * 1_000_000))


def _topup_state(t) -> str:
    card = "a card is saved" if t.payment_method_saved else "no card saved: buying credits once saves one"
    if not t.enabled:
        return f"off ({card})"
    return f"on: {t.credit_amount:,} credits whenever the balance falls below {t.threshold:,} ({card})"


@credits_group.command("transactions")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many, newest first.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many of the newest.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def credits_transactions(ctx, limit, offset, as_json):
    """Your ledger, newest first: grants, purchases, usage, storage, adjustments."""
    rows = _client(ctx).billing.transactions(limit=limit, offset=offset)
    if as_json:
        return _print_json([t.to_dict() for t in rows])
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("TIME (UTC)", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("AMOUNT", justify="right", no_wrap=True)
    table.add_column("DESCRIPTION", overflow="fold")
    for t in rows:
        table.add_row(_short_time(t.timestamp), t.kind, _micro_credits(t.amount_micro), t.description)
    _console().print(table)


@credits_group.command("usage")
@click.option("--from", "start", metavar="WHEN", help="Start, inclusive: a date or time in ISO 8601 "
              "(2026-11-01, 2026-11-01T12:00:00Z; UTC unless it says). Default: 30 days before --to.")
@click.option("--to", "end", metavar="WHEN", help="End, exclusive. Default: now.")
@click.option("--by", "group_by", type=click.Choice(["sandbox", "template", "day"]), default="day",
              show_default=True, help="One row per sandbox, template or UTC day.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def credits_usage(ctx, start, end, group_by, as_json):
    """Credits spent, with the vCPU-seconds, GiB-seconds and workspace GiB-hours behind them."""
    u = _client(ctx).billing.usage(start, end, group_by)
    if as_json:
        return _print_json(u.to_dict())
    from rich.table import Table

    click.echo(f"From {_short_time(u.start)} to {_short_time(u.end)} UTC")
    if not u.items:
        click.echo("Nothing spent in this window.")
        return
    table = Table(box=None, header_style="bold", show_footer=True, footer_style="bold")
    total = u.total
    table.add_column(group_by.upper(), "TOTAL", no_wrap=True)
    for head, value in (("CREDITS", _credits(total.credits)), ("VCPU-S", _amount(total.vcpu_seconds)),
                        ("GIB-S", _amount(total.gib_seconds)),
                        ("GIB-H", _amount(total.workspace_gib_hours))):
        table.add_column(head, value, justify="right", no_wrap=True)
    for i in u.items:
        table.add_row(i.key, _credits(i.credits), _amount(i.vcpu_seconds), _amount(i.gib_seconds),
                      _amount(i.workspace_gib_hours))
    _console().print(table)


def _amount(value: float) -> str:
    """3 decimals, 6 below 1 (GiB-hours of a small workspace), never float noise."""
    if value == 0:
        return "0"
    text = f"{value:,.3f}" if abs(value) >= 1 else f"{value:.6f}"
    return text.rstrip("0").rstrip(".")


@credits_group.command("buy")
@click.argument("credit_amount", metavar="CREDITS", type=click.IntRange(1))
@click.pass_context
def credits_buy(ctx, credit_amount):
    """Buy CREDITS credits (1 credit = 1 US cent): prints the Stripe Checkout page to pay at.
    The credits arrive once Stripe confirms the payment; the card is kept for auto top-up."""
    c = _client(ctx).billing.checkout(credit_amount)
    click.echo(c.url)
    click.echo(f"Open this page to pay for {credit_amount:,} credits (purchase {c.purchase_id}); they "
               "arrive once Stripe confirms the payment (see e2a credits).", err=True)


@credits_group.command("auto-topup")
@click.option("--enable/--disable", "enabled", default=None, help="Turn auto top-up on or off.")
@click.option("--threshold", type=click.IntRange(0, 1_000_000), metavar="CREDITS",
              help="Top up whenever the balance falls below this.")
@click.option("--amount", type=click.IntRange(0, 1_000_000), metavar="CREDITS",
              help="Credits bought by each top-up (at least the server's checkout minimum).")
@click.option("--email", help="Your email address, to sign in (changes need it; asked for when "
              "not given and not saved by e2a login).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def credits_auto_topup(ctx, enabled, threshold, amount, email, as_json):
    """Show auto top-up's settings, or change them: the card saved by a purchase (e2a credits
    buy) is charged for --amount credits whenever the balance falls below --threshold. What is
    not given stays as it is; saving again lifts the hold of a failed charge. A change charges
    your card without you, so it takes a sign-in (a code mailed to you), not the API key."""
    billing = _client(ctx).billing
    if enabled is None and threshold is None and amount is None:
        t = billing.auto_topup()
    else:
        current = billing.auto_topup()
        url = _client(ctx).base_url  # the server just read: --url, E2A_URL or e2a login's
        saved = _load_credentials() or {}
        token = _sign_in(url, email or (saved.get("email") if saved.get("url") == url else None))
        with E2A(url, token.token) as account:
            t = account.billing.set_auto_topup(
                current.enabled if enabled is None else enabled,
                current.threshold if threshold is None else threshold,
                current.credit_amount if amount is None else amount)
    if as_json:
        return _print_json(t.to_dict())
    click.echo(f"Auto top-up: {_topup_state(t)}")
    if t.last_failure:
        click.echo(f"Last top-up failed at {_short_time(t.last_failure.get('at'))} UTC: "
                   f"{t.last_failure.get('message')}")


if __name__ == "__main__":
    main()
