"""The client CLI stays light: `e2a sandbox ...`, `e2a files ...` and `e2a --help` never load the
server (its settings, store, API, sandbox manager) nor the server's dependencies; `serve` and
`admin` are still listed and load e2a.server_cli only when they run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import click
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Top-level packages, and e2a modules (with their submodules), the client side must not import.
SERVER_PACKAGES = ("sqlalchemy", "fastapi", "uvicorn", "aiohttp", "alembic")
SERVER_MODULES = ("e2a.config", "e2a.store", "e2a.api", "e2a.sandboxes", "e2a.server_cli")


def server_modules(names) -> list[str]:
    return sorted(n for n in names
                  if n.split(".")[0] in SERVER_PACKAGES
                  or any(n == m or n.startswith(m + ".") for m in SERVER_MODULES))


def client_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


# Runs the CLI's `main` as the `e2a` entry point does, with sys.argv[1:] as its arguments.
ENTRY = "import sys; sys.argv[0] = 'e2a'; from e2a.cli import main; main()"


def test_importing_the_cli_loads_no_server_module():
    code = ("import json, sys, e2a.cli, e2a.sdk; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=client_env(),
                         capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "e2a.cli" in loaded
    assert server_modules(loaded) == []


def test_client_commands_load_no_server_module():
    """Real processes, as a user runs them; -X importtime lists every module actually imported."""
    for args in (["--help"], ["sandbox", "--help"], ["files", "--help"], ["sandbox", "exec", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", ENTRY, *args], cwd=ROOT,
                           env=client_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        imported = [line.split("|")[-1].strip() for line in r.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "e2a.cli" in imported
        assert server_modules(imported) == [], args


def test_a_failed_client_call_loads_no_server_module():
    """A client command that runs (and fails to reach a server) still never loads the server."""
    code = ("import json, sys\n"
            "from e2a.cli import main\n"
            "try:\n"
            "    main(['--url', 'http://127.0.0.1:9', '--api-key', 'k', 'sandbox', 'ls'])\n"
            "except SystemExit as e:\n"
            "    print(json.dumps([e.code, sorted(sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=client_env(),
                         capture_output=True, text=True)
    code_, loaded = json.loads(out.stdout)
    assert code_ == 1 and "connection_error" in out.stderr
    assert server_modules(loaded) == []


def test_cli_module_does_not_import_the_server_at_module_level():
    import ast

    tree = ast.parse((ROOT / "e2a" / "cli.py").read_text())
    for node in tree.body:  # statements at module level (imports inside functions are lazy)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        assert server_modules(names) == [], ast.unparse(node)


def test_help_lists_server_commands_without_loading_them():
    r = subprocess.run([sys.executable, "-c", ENTRY, "--help"], cwd=ROOT, env=client_env(),
                       capture_output=True, text=True, check=True)
    listed = r.stdout.split("Commands:")[1].split()
    for name in ("admin", "files", "sandbox", "serve"):
        assert name in listed, r.stdout
    assert "Administer the e2a server" in r.stdout and "Run the e2a server" in r.stdout


def test_static_help_matches_the_server_commands():
    """cli.SERVER_COMMANDS (shown before e2a.server_cli is loaded) says what the commands say."""
    from e2a import cli, server_cli

    assert set(cli.SERVER_COMMANDS) == {"serve", "admin", "node-agent"}
    for name, short in cli.SERVER_COMMANDS.items():
        cmd = getattr(server_cli, name.replace("-", "_"))
        assert cmd.name == name
        assert cmd.get_short_help_str(200) == short


def test_server_commands_load_on_demand():
    from e2a.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["admin", "--help"])
    assert r.exit_code == 0, r.output
    for sub in ("bootstrap", "create-user", "create-key", "revoke-key", "build-templates"):
        assert sub in r.output
    r = runner.invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--host" in r.output and "--port" in r.output
    r = runner.invoke(main, ["serve", "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    ctx = click.Context(main)
    assert isinstance(main.get_command(ctx, "admin"), click.Group)
    assert main.get_command(ctx, "nonexistent") is None


def test_server_cli_does_not_import_the_client_cli():
    code = "import json, sys, e2a.server_cli; print(json.dumps('e2a.cli' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=client_env(),
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False
