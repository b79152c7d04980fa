"""Python SDK for e2a sandboxes.

    from e2a.sdk import E2A
    with E2A() as client:                      # E2A_URL / E2A_API_KEY from the environment
        with client.create_sandbox("standard") as sb:   # destroyed when the block ends
            print(sb.run("echo hi").stdout)
            sb.files.write("data.txt", b"hello")

Workspaces (a persistent /home/user kept in S3) are chosen at create time and managed on the client:

    sb = client.create_sandbox("standard", workspace=True)     # or {"app_id": "a", "end_user_id": "u1"}
    for f in client.iter_workspace_files(sb.workspace_id):
        print(f.path, f.size)
    client.upload_workspace_file(sb.workspace_id, "notes.txt", b"hi")   # presigned PUT, no API key sent

An agent works on a task with the caller's own LLM key (which never enters the sandbox):

    sb = client.create_sandbox("browser", agent="claude-code", llm_key=os.environ["ANTHROPIC_API_KEY"],
                               task="Research top 5 AI papers this week")
    for ev in client.iter_task_events(sb):      # live; reconnects without loss or repeats
        print(ev.seq, ev.type, ev.data)
    print(client.wait_task(sb, timeout=600).result)

An agent session: an end user's conversation with an agent in a sandbox, over a WebSocket
(``SessionTicket.jwt`` is its credential; the LLM key can sit in a secret bundle on the server):

    client.secrets.put("openai", {"LLM_API_KEY": os.environ["OPENAI_API_KEY"], "LLM_VENDOR": "openai"})
    ticket = client.create_session("user-42", secrets=["openai"], model="gpt-5")
    with client.connect_session(ticket) as conn:          # drops are resumed, no event lost or repeated
        done = conn.run_task("Plot data.csv", attachments={"data.csv": data},
                             on_event=lambda ev: print(ev.type, ev.data))
    print(done["state"], done["result"])

Signing in needs no key: a code is mailed, and the login JWT it is traded for makes API keys
(``e2a login`` in the CLI does the same and keeps the key):

    E2A.login("me@example.com")
    tok = E2A.verify_otp("me@example.com", input("code: "))
    with E2A(api_key=tok.token) as account:
        key = account.create_api_key()          # key.key is e2a_live_..., shown this once

Credits (1 credit = 1 US cent; docs/billing.md), with an API key or the login JWT:

    client.billing.balance().credit_balance              # 99.87
    for t in client.billing.iter_transactions():          # the whole ledger, newest first
        print(t.timestamp, t.kind, t.amount, t.description)
    client.billing.usage(group_by="sandbox").total.credits
    print(client.billing.checkout(500).url)               # a Stripe Checkout page for 500 credits
    # a create the balance cannot pay raises InsufficientCredits (402, an E2AError)

Pause, resume, fork: a paused sandbox keeps its memory and files on the host's disk and carries
on where it stopped; a fork is a running copy of a running sandbox (not one with a workspace):

    sb = client.create_sandbox("standard", on_idle="pause", auto_resume=True)  # idle: paused, not destroyed
    paused = client.pause(sb)        # .paused_at, .pause_expires_at (then destroyed), .disk_bytes
    client.resume(sb)                # ResumeFailed (503) if the restore failed: still paused, retry
    copies = client.fork(sb, count=3)    # three new running sandboxes, .forked_from == sb.vm_id

``AsyncE2A`` has the same methods as coroutines / async iterators.
"""

from ._core import WaitTimeout
from .async_client import AsyncBilling, AsyncE2A, AsyncFiles, AsyncSecrets
from .client import E2A, Billing, Files, Secrets
from .errors import (E2AError, InsufficientCredits, ResumeFailed, SessionDisconnected, SessionEnded,
                     SessionError, SessionTakenOver)
from .models import (CommandEvent, CommandInfo, CommandResult, FileEntry, LogLine, PresignedUrl, Sandbox,
                     SandboxEvent, SecretBundle, Session, SessionEvent, SessionReady, SessionTicket, Task,
                     TaskEvent, Tool, Workspace, WorkspaceFile, WorkspaceUsage)
from .models import ApiKey, LoginCode, LoginToken, NewApiKey
from .models import AutoTopup, Balance, Checkout, Transaction, Usage, UsageItem
from .session import AsyncSessionConnection, SessionConnection

__all__ = ["E2A", "AsyncE2A", "Files", "AsyncFiles", "E2AError", "Sandbox", "CommandEvent",
           "CommandResult", "CommandInfo", "FileEntry", "LogLine", "SandboxEvent", "Workspace",
           "WorkspaceUsage", "WorkspaceFile", "PresignedUrl", "Task", "TaskEvent", "Tool",
           "WaitTimeout", "Secrets", "AsyncSecrets", "SecretBundle", "Session", "SessionTicket",
           "SessionReady", "SessionEvent", "SessionConnection", "AsyncSessionConnection",
           "SessionError", "SessionEnded", "SessionTakenOver", "SessionDisconnected",
           "LoginCode", "LoginToken", "NewApiKey", "ApiKey", "Billing", "AsyncBilling", "Balance",
           "AutoTopup", "Transaction", "Usage", "UsageItem", "Checkout", "InsufficientCredits",
           "ResumeFailed"]
