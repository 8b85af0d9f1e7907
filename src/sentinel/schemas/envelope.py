"""The envelope around every message on a stream, and its wire format.

On the wire a stream entry has one field, `envelope`: the envelope's JSON with the payload
inside, so that pydantic validates both in one pass. The delivery attempt is not stored;
Redis counts deliveries and the consumer fills it in.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from json.encoder import encode_basestring_ascii as json_string
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
    schema_version: int = Field(ge=1)
    created_at: datetime = Field(default_factory=utc_now)
    attempt: int = Field(1, exclude=True)  # deliveries so far, from Redis
    payload: M

    @classmethod
    def wrap(cls, payload: M, key: str | None = None) -> Envelope[M]:
        """Envelope an already valid message; constructed, not validated, as that costs ~5 us."""
        return _typed(type(payload)).model_construct(
            id=new_id(),
            key=key or payload.key(),
            type=payload.type_name(),
            schema_version=payload.schema_version,
            created_at=utc_now(),
            attempt=1,
            payload=payload,
        )

    def to_wire(self) -> dict[str, str]:
        text = json_string  # a decoded envelope's strings may hold anything: escape them all
        return _wire(text(self.id), text(self.key), text(self.type), self.schema_version,
                     text(self.created_at.isoformat()), self.payload.model_dump_json())  # fmt: skip

    @staticmethod
    def encode(payload: Message, key: str | None = None) -> dict[str, str]:
        """The wire form of `wrap(payload, key)`, without building the envelope (~10 us less)."""
        return Envelope.encode_many([payload], [key])[0]

    @staticmethod
    def encode_many(
        payloads: Sequence[Message], keys: Sequence[str | None] | None = None
    ) -> list[dict[str, str]]:
        """Wire forms of messages sent together; they share one `created_at`."""
        stamp = f'"{utc_now().isoformat()}"'  # ours, like the hex id and the class name:
        return [  # nothing to escape but the key
            _wire(f'"{next(_ids)}"', json_string(key or payload.key()), f'"{payload.type_name()}"',
                  payload.schema_version, stamp, payload.model_dump_json())
            for payload, key in zip(payloads, keys or [None] * len(payloads), strict=True)
        ]  # fmt: skip

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
            envelope: Envelope[M] = _typed(model).__pydantic_validator__.validate_json(raw)
        except ValidationError as error:
            raise _explain(name, model.schema_version, raw, error) from None
        if envelope.type != name:
            raise MessageError(name, "type", f"expected {name}, got {envelope.type!r}")
        if envelope.schema_version > model.schema_version:  # even when its payload validates
            raise _newer(name, envelope.schema_version, model.schema_version)
        if envelope.attempt != attempt:  # pydantic's __setattr__ is slow: skip it when equal
            envelope.attempt = attempt
        return envelope


def peek_key(fields: Mapping[str, str]) -> str | None:
    """The idempotency key of a raw entry, without validating it."""
    try:
        key = json.loads(fields.get(WIRE_FIELD, "")).get("key")
        key.encode()  # a lone surrogate ("\ud800" on the wire) is no text Redis can hold
    except (ValueError, AttributeError, RecursionError):  # UnicodeEncodeError: a ValueError
        return None
    return key if isinstance(key, str) else None


class _Ids:
    """Envelope ids: 32 hex digits like `new_id`, a random half per process and a counter.

    Unique without a system call per message; a forked child draws a new random half.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix, self.count = os.urandom(8).hex(), itertools.count()

    def __next__(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"


_ids = _Ids()


def _wire(
    id: str, key: str, type: str, version: int, created_at: str, payload_json: str
) -> dict[str, str]:
    """The envelope's JSON from its header scalars, each already JSON, and the payload's JSON.

    Written by hand: building and dumping an envelope model per message costs ~10 us.
    """
    envelope = (
        f'{{"id":{id},"key":{key},"type":{type},"schema_version":{version},'
        f'"created_at":{created_at},"payload":{payload_json}}}'
    )
    return {WIRE_FIELD: envelope}


@cache
def _typed(model: type[M]) -> type[Envelope[M]]:
    """The parametrised envelope class, built once per message type."""
    return Envelope[model]  # type: ignore[valid-type]


def _explain(name: str, version: int, raw: str, error: ValidationError) -> MessageError:
    """A clear error; a wrong type or a newer schema explains a failure better than its field."""
    try:
        head: Any = json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting: pydantic's error says it already
        head = None
    if isinstance(head, dict):
        if isinstance(head.get("type"), str) and head["type"] != name:
            return MessageError(name, "type", f"expected {name}, got {head['type']!r}")
        if isinstance(head.get("schema_version"), int) and head["schema_version"] > version:
            return _newer(name, head["schema_version"], version)
    return MessageError.from_validation(name, error)


def _newer(name: str, newer: int, version: int) -> MessageError:
    """A newer schema may mean something else by the same fields: never read it as ours."""
    reason = f"{newer} is newer than {version}: upgrade this consumer, then replay the message"
    return MessageError(name, "schema_version", reason)
