"""The own agent's tools: what the model may do in the sandbox, each a ToolSpec and its
implementation against the sandbox's envd (docs/protocol.md), reached through the SandboxHost.

Every tool runs as the sandbox's `user`, in /home/user. A tool that fails answers the model an
error result it can act on (ToolError); only a sandbox that is not running (NotRunning) ends the
run. Which tools a sandbox gets follows its template's endpoints: `cdp` (browser, canvas) adds
the browser, `vnc_view` (cua) the computer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection

import aiohttp

from e2a.agents.own.llm import ToolCall, ToolSpec
from e2a.api.cdp import Cdp, CdpError
from e2a.sandboxes.host import NotRunning, SandboxHost
from e2a.templates import recipes

Emit = Callable[[str, dict], Awaitable[None]]

HOME = "/home/user"
USER = "user"
SHELL_TIMEOUT = 120          # seconds, when the model gives none
SHELL_MAX_TIMEOUT = 1800
EXTRA_TOOL_TIMEOUT = 1800    # the caller's tools: the task's own timeout bounds them too
RESULT_CHARS = 30_000        # of a tool's text, what the model gets (a command's: its end)
STREAMED_CHARS = 1 << 20     # of one command's output, what goes out as tool_output events
STREAM_EVERY = 0.1           # seconds between tool_output events of one command
READ_MAX_BYTES = 4 << 20     # what read_file and edit_file load of a file
READ_LINES = 2000            # read_file's default line count
LIST_MAX = 1000              # entries list_files shows
REQUEST_TIMEOUT = 60         # one small envd request (files, desktop)
BROWSER_TIMEOUT = 60         # one browser action
BROWSER_VIEWPORT = (1280, 800)
CDP_MAX_MESSAGE = 16 << 20   # a screenshot is one CDP message
CLICK_NAVIGATES = 0.3        # how long after a click a navigation may start
SETTLE = 0.5                 # after a desktop action, before the screenshot that shows its effect

IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg",
               b"GIF87a": "image/gif", b"GIF89a": "image/gif"}


class ToolError(Exception):
    """What the model is told when a tool fails; the run goes on."""


@dataclass
class Output:
    text: str
    images: list[dict] = field(default_factory=list)   # {"type": "image", "media_type", "data"}
    is_error: bool = False

    def parts(self) -> list[dict]:
        return [{"type": "text", "text": self.text}, *self.images]


# ---- the tools' specs -------------------------------------------------------------------------

def _obj(required: list[str], **props: dict) -> dict:
    return {"type": "object", "properties": props, "required": required}


STR, INT = {"type": "string"}, {"type": "integer"}

SHELL = ToolSpec("shell", (
    "Run a bash command as `user` in /home/user and get its exit code and output (stdout and "
    "stderr together; only the last 30000 characters of a long output). Each call is a new "
    "shell: cd and variables do not carry over. Interactive programs get no input: pass flags "
    "such as -y. For a long-running server, start it in the background (nohup ... &)."),
    _obj(["command"], command=STR, timeout_seconds={
        "type": "integer", "description": f"default {SHELL_TIMEOUT}, at most {SHELL_MAX_TIMEOUT}; "
        "on expiry the command and its children are killed"}))

READ_FILE = ToolSpec("read_file", (
    f"Read a text file (up to {READ_LINES} lines from `offset`, a 1-based line number; at most "
    f"{RESULT_CHARS} characters). Images (PNG, JPEG, GIF) come back as images."),
    _obj(["path"], path=STR, offset=INT, limit=INT))

WRITE_FILE = ToolSpec("write_file", (
    "Write a file with the given content, replacing it if it exists; parent directories are "
    "created."), _obj(["path", "content"], path=STR, content=STR))

EDIT_FILE = ToolSpec("edit_file", (
    "Replace the text `old` with `new` in a file. `old` must occur exactly once: include enough "
    "surrounding lines to make it unique, with exact whitespace."),
    _obj(["path", "old", "new"], path=STR, old=STR, new=STR))

LIST_FILES = ToolSpec("list_files", "List a directory (default: /home/user).",
                      _obj([], path=STR))

BROWSER = ToolSpec("browser", (
    "Drive the sandbox's Chromium. Actions: navigate {url}; click {selector}; type {selector, "
    "text} (replaces the field's content; end the text with \\n to press Enter); read (the "
    "page's URL, title and text); screenshot (an image of the page). A selector is CSS, or "
    "text=Some words for the element showing that text."),
    _obj(["action"], action={"type": "string",
                             "enum": ["navigate", "click", "type", "read", "screenshot"]},
         url=STR, selector=STR, text=STR))

COMPUTER_ACTIONS = ["screenshot", "left_click", "right_click", "middle_click", "double_click",
                    "triple_click", "left_click_drag", "left_mouse_down", "left_mouse_up",
                    "mouse_move", "scroll", "type", "key", "hold_key", "cursor_position", "wait"]
POINT = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
         "description": "[x, y] in screen pixels"}


# Names the caller's tools may not take (create refuses them).
BUILT_IN = ("shell", "read_file", "write_file", "edit_file", "list_files", "browser", "computer")
# A session's capability sets, each a group of the tools above (docs/sessions.md).
CAPABILITIES = ("shell", "files", "browser", "computer")


def computer_spec(display: tuple[int, int]) -> ToolSpec:
    w, h = display
    return ToolSpec("computer", (
        f"Use the desktop (a {w}x{h} screen, X11 with fluxbox; xterm, mousepad, Chromium and "
        "pcmanfm are installed) with the mouse and keyboard. Every action but screenshot, "
        "cursor_position and wait answers with a screenshot taken just after it. `text`: what "
        "to type (type), the keys (key, hold_key: xdotool syntax such as ctrl+s or Return), or "
        "modifiers held while clicking or scrolling."),
        _obj(["action"], action={"type": "string", "enum": COMPUTER_ACTIONS},
             coordinate=POINT, start_coordinate=POINT, text=STR,
             scroll_direction={"type": "string", "enum": ["up", "down", "left", "right"]},
             scroll_amount=INT, duration={"type": "number", "description": "seconds"}),
        native="computer", display=display)


def extra_spec(tool: dict) -> ToolSpec:
    params = tool.get("parameters") or {"type": "object", "properties": {}}
    return ToolSpec(tool["name"], tool.get("description") or tool["name"], params)


# ---- helpers ------------------------------------------------------------------------------------

def _arg(args: dict, name: str, kind: type, default: Any = ..., tool: str = "") -> Any:
    value = args.get(name)
    if value is None:
        if default is ...:
            raise ToolError(f"{tool} needs `{name}`")
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ToolError(f"{tool}: `{name}` must be {'a string' if kind is str else 'an integer'}")
    return value


def _line_end(text: str) -> str:
    """`text` ending with a line break, if it has any text, for a note to follow."""
    return text if not text or text.endswith("\n") else text + "\n"


def _head(text: str, limit: int = RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut ...]"


def _error_message(status: int, body: bytes, path: str = "") -> str:
    """envd's error message (it names the path, usually), for the model."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"the sandbox answered {status}: {body[:300].decode(errors='replace')}"
    return message if path in message else f"{path}: {message}"


class _Tail:
    """The last `limit` characters of a stream, and how many came before them."""

    def __init__(self, limit: int = RESULT_CHARS):
        self.limit, self.parts, self.size, self.cut = limit, [], 0, 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > 2 * self.limit:
            joined = "".join(self.parts)
            self.cut += len(joined) - self.limit
            self.parts, self.size = [joined[-self.limit:]], self.limit

    def text(self) -> str:
        joined = "".join(self.parts)
        cut = self.cut + max(0, len(joined) - self.limit)
        joined = joined[-self.limit:]
        return f"[... the first {cut} characters are cut ...]\n{joined}" if cut else joined


class _Streamer:
    """A command's output as tool_output events: batched every STREAM_EVERY, not per chunk, and
    no more than STREAMED_CHARS per command (the model still gets the end)."""

    def __init__(self, emit: Emit, call_id: str):
        self.emit, self.call_id = emit, call_id
        self.pending: list[tuple[str, str]] = []
        self.sent = 0
        self.task = asyncio.create_task(self._tick())

    def add(self, stream: str, text: str) -> None:
        if self.sent >= STREAMED_CHARS:
            return
        text = text[:STREAMED_CHARS - self.sent]
        self.sent += len(text)
        if self.sent >= STREAMED_CHARS:
            text += "\n[... output too long: no more of it is streamed ...]\n"
        self.pending.append((stream, text))

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        merged: list[tuple[str, str]] = []
        for stream, text in batch:   # consecutive chunks of one stream make one event
            if merged and merged[-1][0] == stream:
                merged[-1] = (stream, merged[-1][1] + text)
            else:
                merged.append((stream, text))
        for stream, text in merged:
            await self.emit("tool_output", {"id": self.call_id, "stream": stream, "text": text})

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STREAM_EVERY)
            await self.flush()

    def stop(self) -> None:
        """No more ticks; the caller flushes what is left."""
        self.task.cancel()


@dataclass
class Ran:
    exit_code: int | None
    timed_out: bool
    output: _Tail      # stdout and stderr as they came
    stdout: _Tail      # a caller's tool's result
    dropped: int = 0


# ---- the toolbox ----------------------------------------------------------------------------

class Toolbox:
    """The tools of one run, and what they hold open (the browser's CDP connection)."""

    def __init__(self, host: SandboxHost, sandbox_id: str, template: str, emit: Emit,
                 extra_tools: list[dict] = (), display: tuple[int, int] | None = None,
                 human_in_control: Callable[[str], bool] = lambda sid: False,
                 capabilities: Collection[str] | None = None):
        self.host, self.sid, self.emit = host, sandbox_id, emit
        self.human_in_control = human_in_control
        # a session's capability sets (docs/sessions.md); None: every tool the template has
        allowed = set(CAPABILITIES if capabilities is None else capabilities)
        self.shell, self.files = "shell" in allowed, "files" in allowed
        recipe = recipes.load(template)
        endpoints = recipe.endpoints if recipe else {}
        self.cdp_port = endpoints.get("cdp") if "browser" in allowed else None
        self.desktop = "vnc_view" in endpoints and "computer" in allowed
        self.display = display
        self.extra = {t["name"]: t for t in extra_tools}
        self.browser: _Browser | None = None

    async def specs(self) -> list[ToolSpec]:
        tools = ([SHELL] if self.shell else []) + (
            [READ_FILE, WRITE_FILE, EDIT_FILE, LIST_FILES] if self.files else [])
        if self.cdp_port:
            tools.append(BROWSER)
        if self.desktop:
            self.display = await self._screen() or self.display or (1280, 800)
            tools.append(computer_spec(self.display))
        return tools + [extra_spec(t) for t in self.extra.values()]

    async def call(self, call: ToolCall) -> Output:
        """Run one tool call; an Output with is_error for anything the model should hear."""
        args = call.arguments
        try:
            if not isinstance(args, dict):
                raise ToolError("the arguments must be a JSON object")
            if call.name in self.extra:
                return await self._extra(call.id, self.extra[call.name], args)
            handlers = {}
            if self.shell:
                handlers["shell"] = lambda a: self._shell(call.id, a)
            if self.files:
                handlers.update(read_file=self._read_file, write_file=self._write_file,
                                edit_file=self._edit_file, list_files=self._list_files)
            if self.cdp_port:
                handlers["browser"] = self._browser
            if self.desktop:
                handlers["computer"] = self._computer
            if call.name not in handlers:
                raise ToolError(f"there is no tool named {call.name!r}")
            return await handlers[call.name](args)
        except ToolError as exc:
            return Output(str(exc), is_error=True)
        except NotRunning:
            raise   # the sandbox is gone: nothing more can be done in it
        except Exception as exc:  # the sandbox did not answer, a broken stream...: the model hears
            return Output(f"{call.name} failed: {type(exc).__name__}: {exc}", is_error=True)

    async def close(self) -> None:
        if self.browser is not None:
            await self.browser.close()
            self.browser = None

    # ---- envd requests --------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, limit: int = 1 << 20,
                       timeout: float = REQUEST_TIMEOUT, **kwargs: Any) -> tuple[int, bytes]:
        """One request to envd; its status and body, at most `limit` + 1 bytes of it."""
        up = await self.host.agent_request(self.sid, method, path,
                                           timeout=aiohttp.ClientTimeout(total=timeout), **kwargs)
        try:
            body = bytearray()
            async for chunk in up.response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    break
            return up.response.status, bytes(body)
        finally:
            up.close()

    async def _files(self, method: str, route: str, path: str, *, limit: int = 1 << 20,
                     **kwargs: Any) -> bytes:
        params = {"path": path, "user": USER, **kwargs.pop("params", {})}
        status, body = await self._request(method, route, params=params, limit=limit, **kwargs)
        if status >= 300:
            raise ToolError(_error_message(status, body, path))
        return body

    async def _stat(self, path: str) -> dict | None:
        status, body = await self._request("GET", "/files/stat",
                                           params={"path": path, "user": USER})
        if status == 404:
            return None
        if status >= 300:
            raise ToolError(_error_message(status, body, path))
        return json.loads(body)

    async def run_command(self, call_id: str, cmd: str, timeout: int,
                          stdin: str | None = None) -> Ran:
        """`bash -c cmd` as user in /home/user, its output streamed as tool_output events. A
        cancelled run (or a broken stream) kills the command's process group."""
        body: dict = {"cmd": cmd, "cwd": HOME, "user": USER, "timeout": timeout}
        if stdin is not None:
            body["stdin"] = stdin
        ran = Ran(None, False, _Tail(), _Tail())
        up = await self.host.agent_request(self.sid, "POST", "/commands", json=body)
        streamer = _Streamer(self.emit, call_id)
        pid = None
        try:
            if up.response.status != 200:
                raise ToolError(_error_message(up.response.status, await up.response.read()))
            buf = b""
            async for chunk in up.response.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        pid = self._frame(json.loads(line), ran, streamer, pid)
            if ran.exit_code is None:
                raise ToolError("the command's output stream ended before it exited")
            return ran
        finally:
            up.close()
            streamer.stop()
            try:
                if pid is not None and ran.exit_code is None:
                    await asyncio.shield(self._kill(pid))
            finally:
                await streamer.flush()

    @staticmethod
    def _frame(frame: dict, ran: Ran, streamer: _Streamer, pid: int | None) -> int | None:
        """One line of envd's command stream into `ran`; the command's pid once known."""
        kind = frame.get("type")
        if kind == "start":
            return frame.get("pid")
        if kind in ("stdout", "stderr"):
            text = frame.get("data", "")
            ran.output.add(text)
            if kind == "stdout":
                ran.stdout.add(text)
            streamer.add(kind, text)
        elif kind == "dropped":
            ran.dropped += int(frame.get("bytes", 0))
        elif kind == "exit":
            ran.exit_code, ran.timed_out = frame.get("exit_code"), bool(frame.get("timed_out"))
            if ran.exit_code is None:
                ran.exit_code = -1
        return pid

    async def _kill(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            await self._request("POST", f"/commands/{pid}/signal", json={"signal": "SIGKILL"},
                                timeout=10)

    # ---- shell and the caller's tools -------------------------------------------------------

    async def _shell(self, call_id: str, args: dict) -> Output:
        cmd = _arg(args, "command", str, tool="shell")
        timeout = _arg(args, "timeout_seconds", int, SHELL_TIMEOUT, tool="shell")
        timeout = max(1, min(timeout, SHELL_MAX_TIMEOUT))
        ran = await self.run_command(call_id, cmd, timeout)
        text = ran.output.text()
        if ran.dropped:
            text = f"[... {ran.dropped} bytes of output were lost ...]\n" + text
        if ran.timed_out:
            return Output(f"{_line_end(text)}[timed out after {timeout} s: the command and its "
                          "children were killed]", is_error=True)
        if not text:
            return Output(f"[exit code {ran.exit_code}, no output]", is_error=ran.exit_code != 0)
        return Output(f"{_line_end(text)}[exit code {ran.exit_code}]",
                      is_error=ran.exit_code != 0)

    async def _extra(self, call_id: str, tool: dict, args: dict) -> Output:
        ran = await self.run_command(call_id, tool["command"], EXTRA_TOOL_TIMEOUT,
                                     stdin=json.dumps(args))
        if ran.timed_out:
            return Output(f"{_line_end(ran.output.text())}[timed out after {EXTRA_TOOL_TIMEOUT} s]",
                          is_error=True)
        if ran.exit_code != 0:
            return Output(f"{_line_end(ran.output.text())}[exit code {ran.exit_code}]",
                          is_error=True)
        return Output(ran.stdout.text())

    # ---- files ------------------------------------------------------------------------------

    async def _read_text(self, path: str, tool: str) -> tuple[str, dict]:
        """A whole text file (for editing) and its stat entry."""
        entry = await self._stat(path)
        if entry is None:
            raise ToolError(f"{path}: no such file")
        if entry["type"] == "dir":
            raise ToolError(f"{path} is a directory")
        if entry.get("size", 0) > READ_MAX_BYTES:
            raise ToolError(f"{path} is {entry['size']} bytes: {tool} takes files up to "
                            f"{READ_MAX_BYTES} bytes (use shell for bigger ones)")
        data = await self._files("GET", "/files", path, limit=READ_MAX_BYTES)
        if b"\0" in data[:8192]:
            raise ToolError(f"{path} is a binary file")
        return data.decode(errors="replace"), entry

    async def _read_file(self, args: dict) -> Output:
        path = _arg(args, "path", str, tool="read_file")
        offset = max(1, _arg(args, "offset", int, 1, tool="read_file"))
        limit = max(1, _arg(args, "limit", int, READ_LINES, tool="read_file"))
        entry = await self._stat(path)
        if entry is None:
            raise ToolError(f"{path}: no such file")
        if entry["type"] == "dir":
            raise ToolError(f"{path} is a directory: use list_files")
        data = await self._files("GET", "/files", path, limit=READ_MAX_BYTES)
        more = len(data) > READ_MAX_BYTES
        data = data[:READ_MAX_BYTES]
        for magic, media in IMAGE_TYPES.items():
            if data.startswith(magic) and not more:
                return Output(f"{path}: {media}, {len(data)} bytes", images=[{
                    "type": "image", "media_type": media,
                    "data": base64.b64encode(data).decode()}])
        if b"\0" in data[:8192]:
            return Output(f"{path} is a binary file of {entry.get('size', len(data))} bytes; "
                          "inspect it with shell (file, xxd, ...)")
        lines = data.decode(errors="replace").splitlines(keepends=True)
        if more:  # the last line loaded may be cut
            lines = lines[:-1]
        chosen, size = [], 0
        for line in lines[offset - 1:offset - 1 + limit]:
            if size + len(line) > RESULT_CHARS and chosen:
                break
            chosen.append(line[:RESULT_CHARS])
            size += len(line)
        end = offset - 1 + len(chosen)
        text = "".join(chosen)
        if not lines:
            return Output(f"{path} is empty")
        if offset > len(lines):
            raise ToolError(f"{path} has {len(lines)}{'+' if more else ''} lines; offset "
                            f"{offset} is past its end")
        if offset > 1 or end < len(lines) or more:
            total = f"{len(lines)}{'+' if more else ''}"
            note = f"[lines {offset}-{end} of {total}"
            note += f"; read on with offset={end + 1}]" if end < len(lines) or more else "]"
            text = _line_end(text) + note
        return Output(text)

    async def _write_file(self, args: dict) -> Output:
        path = _arg(args, "path", str, tool="write_file")
        content = _arg(args, "content", str, tool="write_file")
        data = content.encode()
        await self._put(path, data, await self._stat(path))
        return Output(f"wrote {len(data)} bytes to {path}")

    async def _put(self, path: str, data: bytes, entry: dict | None) -> None:
        if entry is not None and entry["type"] == "dir":
            raise ToolError(f"{path} is a directory")
        params = {"mode": entry["mode"]} if entry and entry.get("mode") else {}
        await self._files("PUT", "/files", path, data=data, params=params)

    async def _edit_file(self, args: dict) -> Output:
        path = _arg(args, "path", str, tool="edit_file")
        old = _arg(args, "old", str, tool="edit_file")
        new = _arg(args, "new", str, tool="edit_file")
        if not old:
            raise ToolError("edit_file: `old` is empty; use write_file to write a whole file")
        text, entry = await self._read_text(path, "edit_file")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"`old` is not in {path} (it must match exactly, whitespace and "
                            "line breaks included); read the file again to see its text")
        if count > 1:
            raise ToolError(f"`old` occurs {count} times in {path}; include more of the "
                            "surrounding text so that it occurs once")
        at = text.index(old)
        await self._put(path, text.replace(old, new, 1).encode(), entry)
        line = text.count("\n", 0, at) + 1
        return Output(f"edited {path}: replaced {old.count(chr(10)) + 1} line(s) at line {line}")

    async def _list_files(self, args: dict) -> Output:
        path = _arg(args, "path", str, HOME, tool="list_files")
        body = await self._files("GET", "/files/list", path, limit=16 << 20)
        entries = json.loads(body)["entries"]
        lines = []
        for e in entries[:LIST_MAX]:
            if e["type"] == "dir":
                lines.append(f"{e['name']}/")
            elif e["type"] == "file":
                lines.append(f"{e['name']}  ({e['size']} bytes)")
            else:
                lines.append(f"{e['name']}  ({e['type']})")
        if len(entries) > LIST_MAX:
            lines.append(f"[... {len(entries) - LIST_MAX} more entries ...]")
        return Output("\n".join(lines) if lines else f"{path} is empty")

    # ---- the browser ------------------------------------------------------------------------

    async def _browser(self, args: dict) -> Output:
        action = _arg(args, "action", str, tool="browser")
        if self.browser is None:
            self.browser = _Browser(self.host, self.sid, self.cdp_port)
        try:
            return await asyncio.wait_for(self.browser.act(action, args), BROWSER_TIMEOUT)
        except ToolError:
            raise
        except BaseException as exc:
            # The connection may be broken (Chromium restarted) or left mid-way: the next
            # action connects anew.
            await self.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise ToolError(f"the browser did not finish {action} within "
                                f"{BROWSER_TIMEOUT} s") from None
            if isinstance(exc, CdpError):
                raise ToolError(f"the browser failed: {exc}") from None
            raise

    # ---- the desktop ------------------------------------------------------------------------

    async def _screen(self) -> tuple[int, int] | None:
        try:
            status, body = await self._request("GET", "/desktop/windows")
            screen = json.loads(body)["screen"] if status == 200 else None
            return (int(screen["width"]), int(screen["height"])) if screen else None
        except NotRunning:
            raise
        except Exception:  # the desktop is still starting: the template's size will do
            return None

    async def _computer(self, args: dict) -> Output:
        if self.human_in_control(self.sid):  # as the actions API does: a person has the desktop
            raise ToolError("a person controls this desktop through the live view now; wait "
                            "(e.g. with the shell: sleep 10) and try again")
        action = _arg(args, "action", str, tool="computer")
        act = {k: v for k, v in args.items() if v is not None}
        actions = [act]
        shows = action not in ("screenshot", "cursor_position", "wait")
        if shows:  # the model sees what its action did
            actions += [{"action": "wait", "duration": SETTLE}, {"action": "screenshot"}]
        status, body = await self._request("POST", "/desktop/actions", json={"actions": actions},
                                           limit=64 << 20, timeout=REQUEST_TIMEOUT + 100)
        if status != 200:  # envd names the field of the list it was sent: say it of the call
            raise ToolError(_error_message(status, body).replace("actions[0].", ""))
        results = json.loads(body)["results"]
        images = [{"type": "image", "media_type": r["media_type"], "data": r["data"]}
                  for r in results if isinstance(r, dict) and r.get("type") == "image"]
        first = results[0] if results else {}
        if action == "cursor_position":
            return Output(f"the pointer is at [{first.get('x')}, {first.get('y')}]")
        return Output("screenshot" if action == "screenshot" else f"done: {action}",
                      images=images)


class _Browser:
    """One CDP connection to the sandbox's Chromium for the run, attached to one page."""

    def __init__(self, host: SandboxHost, sandbox_id: str, port: int):
        self.host, self.sid, self.port = host, sandbox_id, port
        self.up = None
        self.cdp: Cdp | None = None
        self.session: str | None = None

    async def _connect(self) -> None:
        from e2a.api.endpoints import browser_ws_path  # the API's finding of the endpoint
        from e2a.api.errors import ApiError
        try:
            path = await browser_ws_path(self.host, self.sid, self.port)
        except ApiError as exc:
            raise ToolError(f"the browser is not reachable: {exc.message}") from None
        self.up = await self.host.agent_websocket(self.sid, f"/proxy/{self.port}{path}",
                                                  max_size=CDP_MAX_MESSAGE)
        self.cdp = Cdp(self.up.conn)
        targets = (await self.cdp.call("Target.getTargets"))["targetInfos"]
        pages = [t["targetId"] for t in targets if t.get("type") == "page"]
        target = pages[0] if pages else (await self.cdp.call(
            "Target.createTarget", {"url": "about:blank"}))["targetId"]
        self.session = (await self.cdp.call("Target.attachToTarget",
                                            {"targetId": target, "flatten": True}))["sessionId"]
        await self.call("Page.enable")
        w, h = BROWSER_VIEWPORT
        await self.call("Emulation.setDeviceMetricsOverride",
                        {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False})

    async def call(self, method: str, params: dict | None = None) -> dict:
        return await self.cdp.call(method, params, session=self.session)

    async def js(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", {"expression": expression,
                                                   "returnByValue": True, "awaitPromise": True})
        if out.get("exceptionDetails"):
            d = out["exceptionDetails"]
            raise ToolError(d.get("exception", {}).get("description") or d.get("text", "error"))
        return out.get("result", {}).get("value")

    async def act(self, action: str, args: dict) -> Output:
        if self.cdp is None:
            await self._connect()
        if action == "navigate":
            return await self._navigate(_arg(args, "url", str, tool="browser navigate"))
        if action == "click":
            return await self._click(_arg(args, "selector", str, tool="browser click"))
        if action == "type":
            return await self._type(_arg(args, "selector", str, tool="browser type"),
                                    _arg(args, "text", str, tool="browser type"))
        if action == "read":
            return await self._read()
        if action == "screenshot":
            await self._loaded()
            shot = await self.call("Page.captureScreenshot", {"format": "png"})
            url = await self.js("location.href")
            return Output(f"screenshot of {url}", images=[
                {"type": "image", "media_type": "image/png", "data": shot["data"]}])
        raise ToolError(f"browser: unknown action {action!r} (navigate, click, type, read, "
                        "screenshot)")

    async def _navigate(self, url: str) -> Output:
        if "://" not in url and not url.startswith(("about:", "data:")):
            url = "https://" + url
        loaded = self.cdp.expect("Page.loadEventFired", self.session)
        nav = await self.call("Page.navigate", {"url": url})
        state = ""
        if nav.get("errorText"):
            loaded.cancel()
            raise ToolError(f"cannot open {url}: {nav['errorText']}")
        if "loaderId" not in nav:  # the same document (an #anchor): nothing loads
            loaded.cancel()
        else:
            try:
                await asyncio.wait_for(loaded, 30)
            except asyncio.TimeoutError:
                state = " (still loading after 30 s)"
        title = await self.js("document.title")
        return Output(f"opened {await self.js('location.href')}{state}; title: {title!r}")

    async def _loaded(self, timeout_ms: int = 10_000) -> None:
        """Until the page has loaded, at most 10 s. A page being replaced destroys the context
        this runs in: then it is asked again, in the new one."""
        for attempt in range(3):
            try:
                await self.js(f"""new Promise(done => {{
                    if (document.readyState === "complete") return done(true);
                    addEventListener("load", () => done(true));
                    setTimeout(() => done(false), {timeout_ms}); }})""")
                return
            except (CdpError, ToolError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)

    async def _find(self, selector: str, then: str) -> Any:
        """Evaluate `then` (JS using `el`) on the element `selector` names, scrolled into view."""
        found = await self.js(f"""(() => {{
            const sel = {json.dumps(selector)};
            let el = null;
            if (sel.startsWith("text=")) {{
                const want = sel.slice(5).trim().toLowerCase();
                let best = null;
                for (const e of document.querySelectorAll("body *")) {{
                    if (!e.getClientRects().length) continue;
                    const t = (e.innerText || e.value || e.getAttribute("aria-label") || "")
                        .trim().toLowerCase();
                    if (t.includes(want) && (!best || t.length <= best.t.length)) best = {{e, t}};
                }}
                el = best && best.e;
            }} else {{
                el = document.querySelector(sel);
            }}
            if (!el) return null;
            el.scrollIntoView({{block: "center", inline: "center"}});
            {then}
        }})()""")
        if found is None:
            raise ToolError(f"no element matches {selector!r} on {await self.js('location.href')}")
        return found

    async def _click(self, selector: str) -> Output:
        await self._loaded()
        box = await self._find(selector, """const r = el.getBoundingClientRect();
            return {x: r.x + r.width / 2, y: r.y + r.height / 2, w: r.width, h: r.height};""")
        # A click that opens another page: wait for it, so that a read right after reads it.
        starts = self.cdp.expect("Page.frameStartedLoading", self.session)
        loaded = self.cdp.expect("Page.loadEventFired", self.session)
        if box["w"] and box["h"]:  # a real click (mousedown, mouseup, click) where it is shown
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                await self.call("Input.dispatchMouseEvent", {
                    "type": kind, "x": box["x"], "y": box["y"], "button": "left",
                    "clickCount": 0 if kind == "mouseMoved" else 1})
        else:
            await self._find(selector, "el.click(); return true;")
        try:
            await asyncio.wait_for(starts, CLICK_NAVIGATES)
        except asyncio.TimeoutError:
            loaded.cancel()
            return Output(f"clicked {selector}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(loaded, 10)
        return Output(f"clicked {selector}; the page is now {await self.js('location.href')}")

    async def _type(self, selector: str, text: str) -> Output:
        await self._loaded()
        await self._find(selector, """el.focus();
            if (typeof el.select === "function") el.select();
            else { const r = document.createRange(); r.selectNodeContents(el);
                   const s = getSelection(); s.removeAllRanges(); s.addRange(r); }
            return true;""")
        enter = text.endswith("\n")
        if text.rstrip("\n"):
            await self.call("Input.insertText", {"text": text[:-1] if enter else text})
        if enter:
            for kind in ("keyDown", "keyUp"):
                await self.call("Input.dispatchKeyEvent", {
                    "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                    **({"text": "\r"} if kind == "keyDown" else {})})
        return Output(f"typed {len(text)} characters into {selector}"
                      + (" and pressed Enter" if enter else ""))

    async def _read(self) -> Output:
        await self._loaded()
        page = await self.js("({url: location.href, title: document.title, "
                             "text: document.body ? document.body.innerText : ''})")
        return Output(f"URL: {page['url']}\nTitle: {page['title']}\n\n"
                      + _head(page["text"] or "(the page has no text)"))

    async def close(self) -> None:
        if self.cdp is not None:
            self.cdp.close()
        if self.up is not None:
            self.up.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.up.conn.close(), 2)
