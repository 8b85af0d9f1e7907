"""Structured logs: one JSON object per line off a TTY (for jq), readable colours on one.

Library loggers (redis, celery, httpx, vllm) go through the same renderer, so every line a
SENTINEL process writes to stderr parses as JSON. Every rendered line is scrubbed of secrets
last (defence in depth: the code already logs redacted URLs): URL passwords, and the values
of the key and password variables.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import Literal

import structlog

from sentinel.config import LOCAL_KEY_ENV, REDACTED, redact

Format = Literal["auto", "json", "console"]

# Variables whose values are secrets wherever they appear in a log line.
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|APIKEY|CREDENTIAL", re.I)
_MIN_SECRET = 6  # shorter values ("EMPTY", "1") would mask ordinary words
_json_lines = False  # what configure_logging chose, for `up`'s live view (sentinel.live)


def configure_logging(
    level: str = "INFO",
    fmt: Format = "auto",
    *,
    process: str = "",
    secret_env: Iterable[str] = (),
) -> None:
    """Route structlog and the standard library through one stderr handler. `secret_env`:
    more variables whose values never appear in a line (the endpoints' api_key_env)."""
    global _json_lines
    json_lines = _json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # modules bind loggers at import, before configure
    )
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if json_lines else _identity,
                Scrubbed(renderer, secret_env),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if process:
        structlog.contextvars.bind_contextvars(process=process)


def logs_are_json() -> bool:
    """Whether this process logs JSON lines (--log-format json, or auto off a TTY)."""
    return _json_lines


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is now, so redirection after setup is honoured."""

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class Scrubbed:
    """A renderer whose output has URL passwords and secret variables' values masked."""

    def __init__(self, renderer: structlog.types.Processor, secret_env: Iterable[str]) -> None:
        self.renderer = renderer
        named = {name for name in os.environ if _SECRET_NAME.search(name)}
        self.names = sorted(named | set(secret_env) | {LOCAL_KEY_ENV, "VLLM_API_KEY"})

    def __call__(self, logger: object, name: str, event_dict: structlog.types.EventDict) -> str:
        return scrub(str(self.renderer(logger, name, event_dict)), self.secrets())

    def secrets(self) -> list[str]:
        """Read at each line: a key set after start-up (`sentinel up`'s) is masked too."""
        values = (os.environ.get(name, "") for name in self.names)
        return sorted({v for v in values if len(v) >= _MIN_SECRET}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords and every value of `secrets` masked."""
    text = redact(text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _identity(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    return event_dict


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
