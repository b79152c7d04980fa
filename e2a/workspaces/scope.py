"""The names that choose a workspace: (user, end user, app, capability set).

The user comes from the API key; the rest from the request. They are only ever looked up in the
database (registry.py): no name becomes a path or an S3 key, the workspace's random id does. The
names are still held to a strict ASCII form, so that look-alikes ("ａpp", "app\u200b") are
refused instead of making a second, confusable workspace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
NAME_RULE = ("1-64 characters: ASCII letters, digits, '.', '_' and '-', starting with a letter "
             "or digit")
DEFAULT = "default"


def check_name(value: str) -> str:
    """`value` if it is a valid name; ValueError saying the rule otherwise."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"must be {NAME_RULE}")
    return value


@dataclass(frozen=True)
class Scope:
    user_id: str
    end_user_id: str = ""
    app_id: str = DEFAULT
    capset_id: str = DEFAULT
