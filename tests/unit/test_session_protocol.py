"""The session WebSocket's protocol document is generated from the models the server uses, and
the models accept and refuse what docs/sessions.md says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from e2a.api import session_protocol as proto

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_document_is_the_generated_one():
    committed = json.loads((ROOT / "docs" / "sessions.asyncapi.json").read_text())
    assert committed == json.loads(json.dumps(proto.asyncapi())), \
        "run `make asyncapi` and commit docs/sessions.asyncapi.json"


def test_every_reference_resolves():
    doc = proto.asyncapi()

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref


@pytest.mark.parametrize("raw", [
    {"type": "task", "text": "hi"},
    {"type": "task", "text": "hi", "id": "c1",
     "attachments": [{"name": "a.csv", "content_base64": "YQ=="}]},
    {"type": "cancel"}, {"type": "ping", "id": 3},
])
def test_client_messages_accepted(raw):
    assert proto.client_message.validate_python(raw).type == raw["type"]


@pytest.mark.parametrize("raw", [
    {"type": "task"}, {"type": "task", "text": ""}, {"type": "task", "text": "x" * 100_001},
    {"type": "task", "text": "t", "attachments": [{"name": "../x", "content_base64": ""}]},
    {"type": "task", "text": "t", "attachments": [{"name": ".hidden", "content_base64": ""}]},
    {"type": "task", "text": "t", "attachments": [{"name": "a", "content_base64": ""}] * 11},
    {"type": "ping", "extra": 1}, {"type": "dance"}, {"text": "no type"},
    {"type": "ping", "id": "x" * 129},
])
def test_client_messages_refused(raw):
    with pytest.raises(ValidationError):
        proto.client_message.validate_python(raw)
