"""Protobuf message → plain dict with native ints (json_format would stringify uint64)."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message


def to_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.is_repeated:
            out[field.name] = [to_dict(v) if isinstance(v, Message) else v for v in value]
        elif isinstance(value, Message):
            out[field.name] = to_dict(value)
        else:
            out[field.name] = value
    return out
