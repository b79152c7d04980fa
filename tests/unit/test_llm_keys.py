"""The LLM key's checks and its scrubbing from what e2a shows (e2a/agents/keys.py)."""

from __future__ import annotations

import pytest

from e2a.agents import keys

KEY = "sk-ant-api03-abcdefghijklmnop"


@pytest.mark.parametrize("key", [KEY, KEY + "\n", "  " + KEY, "EMPTY", "x"])
def test_keys_that_can_go_in_a_header(key):
    assert keys.problem(key) is None


@pytest.mark.parametrize("key", ["", "   ", KEY + "\nrest", "sk ant", "sk-\x00", "sk-é",
                                 "k" * 4097])
def test_keys_that_cannot(key):
    assert keys.problem(key)


def test_scrub_reaches_every_string_of_the_data():
    data = {"error": f"Incorrect API key provided: {KEY}.", "n": 3, "ok": None,
            "nested": [{"text": f"{KEY}{KEY}"}, KEY[:-1], ("x", KEY)]}
    out = keys.scrub(data, {KEY})
    assert KEY not in repr(out)
    assert out["error"] == "Incorrect API key provided: [redacted]."
    assert out["nested"][0]["text"] == "[redacted][redacted]"
    assert out["nested"][1] == KEY[:-1] and out["n"] == 3 and out["ok"] is None
    assert keys.scrub("plain", set()) == "plain"
