"""The session WebSocket's messages, as pydantic models: the server validates what clients send
with them and builds what it sends from them, and docs/sessions.asyncapi.json is generated from
them (`make asyncapi`, i.e. `python -m e2a.api.session_protocol`), so the document cannot drift
from the code."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SUBPROTOCOL = "e2a.session.v1"
MAX_TASK_CHARS = 100_000
MAX_ATTACHMENTS = 10
# Close codes
ENDED, TAKEN_OVER = 4000, 4001
CloseReason = Literal["ttl_expired", "deleted", "sandbox_ended", "server_restart",
                      "out_of_credits"]

ClientRef = Annotated[str, Field(max_length=128)] | int | None


# ---- client -> server ------------------------------------------------------------------------

class Attachment(BaseModel):
    """A file written to /home/user/attachments/<name> before the task starts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    content_base64: str


class TaskMessage(BaseModel):
    """Start a task (one at a time). The conversation goes on from the session's last task."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["task"]
    text: str = Field(min_length=1, max_length=MAX_TASK_CHARS)
    attachments: list[Attachment] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)
    id: ClientRef = Field(default=None, description="echoed in the ack or error")


class CancelMessage(BaseModel):
    """Cancel the running task (it ends as cancelled; the session goes on)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
    id: ClientRef = None


class PingMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ping"]
    id: ClientRef = None


ClientMessage = Annotated[Union[TaskMessage, CancelMessage, PingMessage],
                          Field(discriminator="type")]
client_message = TypeAdapter(ClientMessage)


# ---- server -> client ------------------------------------------------------------------------

class TaskRef(BaseModel):
    task_id: str
    state: str


class Ready(BaseModel):
    """The first message of every connection, before the numbered events after `after`."""

    type: Literal["ready"] = "ready"
    chat_session_id: str
    state: Literal["active"] = "active"
    last_seq: int = Field(description="the number of the session's latest event so far")
    expires_at: datetime
    task: TaskRef | None = Field(description="the session's latest task, if any")


class Event(BaseModel):
    """A numbered event of the session: numbered from 1 over all its tasks, stored, and sent
    again (only) to a connection that asks for what came after an earlier number.

    type and data: task_started {task_id, agent, model}; message_delta {text}; message {text};
    tool_call {id, name, arguments}; tool_output {id, stream, text}; tool_result {id, name,
    output, is_error, images}; cli {a CLI agent's own JSON event}; stdout/stderr {text};
    task_finished {task_id, state, result, error, llm_requests, input_tokens, output_tokens};
    secrets_replaced {bundle}; error {code, message}."""

    seq: int = Field(ge=1)
    type: str
    task_id: str | None = Field(description="null for an event outside any task")
    data: dict[str, Any]
    at: datetime


class Ack(BaseModel):
    type: Literal["ack"] = "ack"
    id: ClientRef = None
    op: Literal["task", "cancel"]
    task_id: str


class Pong(BaseModel):
    type: Literal["pong"] = "pong"
    id: ClientRef = None


class Error(BaseModel):
    """A message could not be carried out; the connection stays open."""

    type: Literal["error"] = "error"
    id: ClientRef = None
    code: Literal["bad_message", "invalid_attachment", "task_running", "no_task",
                  "session_ended"]
    message: str


# ---- the AsyncAPI document -------------------------------------------------------------------

def _message(model: type[BaseModel], title: str) -> dict:
    return {"name": model.__name__, "title": title, "contentType": "application/json",
            "summary": (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"}}


def asyncapi() -> dict:
    """The protocol as an AsyncAPI 3.0 document."""
    sent = {"task": TaskMessage, "cancel": CancelMessage, "ping": PingMessage}
    received = {"ready": Ready, "event": Event, "ack": Ack, "pong": Pong, "error": Error}
    schemas: dict = {}
    for model in [*sent.values(), *received.values()]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    messages = {name: _message(m, name) for name, m in {**sent, **received}.items()}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "e2a session WebSocket", "version": SUBPROTOCOL,
            "description": (
                "A conversation with an agent in a sandbox (docs/sessions.md). Open "
                "connect_url (from POST /v1/sessions) with the session's JWT, as "
                "`Authorization: Bearer <jwt>` or, from a browser, the subprotocols "
                f"[\"{SUBPROTOCOL}\", \"<jwt>\"]; add `?after=N` (the last seq seen) to resume. "
                "A refused handshake is answered over HTTP: 401 (missing, invalid or expired "
                "token), 404 (no such session), 410 (the session has ended). Close codes: "
                f"{ENDED} the session ended (reason: ttl_expired, deleted, sandbox_ended, "
                f"out_of_credits, server_restart), {TAKEN_OVER} taken over by a newer connection to the same "
                "session, 1009 a message over 4 MiB, 1012 e2a is stopping (the session "
                "ends: server_restart).")},
        "servers": {"e2a": {"host": "localhost:8080", "protocol": "ws",
                            "description": "wss behind TLS"}},
        "channels": {"session": {
            "address": "/v1/sessions/{chat_session_id}/ws",
            "parameters": {"chat_session_id": {"description": "ses_…"}},
            "messages": messages}},
        "operations": {
            "sendToSession": {"action": "send", "channel": {"$ref": "#/channels/session"},
                              "messages": [{"$ref": f"#/channels/session/messages/{n}"}
                                           for n in sent]},
            "receiveFromSession": {"action": "receive", "channel": {"$ref": "#/channels/session"},
                                   "messages": [{"$ref": f"#/channels/session/messages/{n}"}
                                                for n in received]}},
        "components": {"schemas": schemas},
    }


if __name__ == "__main__":
    print(json.dumps(asyncapi(), indent=2))
