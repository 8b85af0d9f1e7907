"""The base of every message that crosses a process boundary, and its registry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def new_id() -> str:
    """A fresh, URL-safe identifier."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class MessageError(ValueError):
    """A payload that is not a valid message; `field` names the first offending field."""

    def __init__(self, message_type: str, field: str, reason: str) -> None:
        self.message_type = message_type
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {message_type}: field '{field}': {reason}")

    @classmethod
    def from_validation(cls, message_type: str, error: ValidationError) -> MessageError:
        errors = error.errors(include_url=False)
        first = errors[0]
        field = ".".join(str(part) for part in first["loc"]) or "<root>"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return cls(message_type, field, f"{first['msg']}{more}")


class Strict(BaseModel):
    """A record nested inside a message: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    """A top-level message. Subclasses register under their class name."""

    schema_version: ClassVar[int] = 1
    registry: ClassVar[dict[str, type[Message]]] = {}

    created_at: datetime = Field(default_factory=utc_now)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Message.registry[cls.__name__] = cls

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def key(self) -> str:
        """The idempotency key: two messages with one key are handled once."""
        identity = getattr(self, "id", None)
        if not isinstance(identity, str):
            raise NotImplementedError(f"{type(self).__name__} has no id; override key()")
        return identity

    @classmethod
    def parse(cls, data: str | bytes) -> Self:
        """Validate JSON into this model, raising MessageError on any problem."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as error:
            raise MessageError.from_validation(cls.__name__, error) from None


def message_class(type_name: str) -> type[Message]:
    try:
        return Message.registry[type_name]
    except KeyError:
        raise MessageError(type_name, "type", f"unknown message type {type_name!r}") from None
