"""The envelope around every message on a stream, and its wire format.

On the wire a stream entry has one field, `envelope`: the envelope's JSON with the payload
inside, so that pydantic encodes and validates both in one pass. The delivery attempt is not
stored; Redis counts deliveries and the consumer fills it in.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sentinel.schemas.message import Message, MessageError, new_id, utc_now

M = TypeVar("M", bound=Message)

WIRE_FIELD = "envelope"


class Envelope(BaseModel, Generic[M]):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=new_id)
    key: str  # the idempotency key
    type: str
    schema_version: int
    created_at: datetime = Field(default_factory=utc_now)
    attempt: int = Field(1, exclude=True)  # deliveries so far, from Redis
    payload: M

    @classmethod
    def wrap(cls, payload: M, key: str | None = None) -> Envelope[M]:
        return _typed(type(payload))(
            key=key or payload.key(),
            type=payload.type_name(),
            schema_version=payload.schema_version,
            payload=payload,
        )

    def to_wire(self) -> dict[str, str]:
        return {WIRE_FIELD: self.model_dump_json()}

    @classmethod
    def from_wire(
        cls, fields: Mapping[str, str], model: builtins.type[M], attempt: int = 1
    ) -> Envelope[M]:
        """Decode a stream entry as a `model` message; MessageError names what is wrong."""
        name = model.type_name()
        raw = fields.get(WIRE_FIELD)
        if raw is None:
            raise MessageError(name, WIRE_FIELD, "missing from the stream entry")
        try:
            envelope = _typed(model).model_validate_json(raw)
        except ValidationError as error:
            raise _explain(name, model.schema_version, raw, error) from None
        if envelope.type != name:
            raise MessageError(name, "type", f"expected {name}, got {envelope.type!r}")
        envelope.attempt = attempt
        return envelope


def peek_key(fields: Mapping[str, str]) -> str | None:
    """The idempotency key of a raw entry, without validating it."""
    try:
        key = json.loads(fields.get(WIRE_FIELD, "")).get("key")
    except (ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


@cache
def _typed(model: type[M]) -> type[Envelope[M]]:
    """The parametrised envelope class, built once per message type."""
    return Envelope[model]  # type: ignore[valid-type]


def _explain(name: str, version: int, raw: str, error: ValidationError) -> MessageError:
    """A clear error; a wrong type or a newer schema explains a failure better than its field."""
    try:
        head: Any = json.loads(raw)
    except ValueError:
        head = None
    if isinstance(head, dict):
        if isinstance(head.get("type"), str) and head["type"] != name:
            return MessageError(name, "type", f"expected {name}, got {head['type']!r}")
        if isinstance(head.get("schema_version"), int) and head["schema_version"] > version:
            newer = head["schema_version"]
            return MessageError(name, "schema_version", f"{newer} is newer than {version}")
    return MessageError.from_validation(name, error)
