"""Pieces the systems' Jinja chat templates share (`GROMA_CHAT_TEMPLATE`, `TAP_CHAT_TEMPLATE`,
`ULLAVA_CHAT_TEMPLATE`): quoting Python text for a template, and reading a message's text and image count from
either content form (a string, or transformers' list of `{"type": "text" | "image" | ...}` entries)."""

from __future__ import annotations

import json

__all__ = ["MESSAGE_TEXT", "MESSAGE_TEXT_AND_IMAGE_COUNT", "jinja_literal"]

MESSAGE_TEXT = (
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
)
"""Inside `{% for message in messages %}`, with list content: `text` = the message's text entries joined by spaces."""

MESSAGE_TEXT_AND_IMAGE_COUNT = (
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}" + MESSAGE_TEXT + "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
)
"""Inside `{% for message in messages %}`: `text` as in `MESSAGE_TEXT` (or the string content) and `n_images`, the
number of `{"type": "image"}` entries (0 for string content)."""


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON quoting is valid Jinja)."""
    return json.dumps(text)
