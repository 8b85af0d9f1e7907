"""`sentinel validate`: the full validator on a proposal in a file, the pool left unchanged.

Whatever the file holds gets a verdict, never a traceback: over the size limit
(`too_large`, before it is parsed), not UTF-8, not JSON, nested past the parser's depth
limit, or the wrong shape (`schema`, with pydantic's reason). A bare Task is accepted too
and wrapped in a proposal, for hand-written tasks.
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from pathlib import Path

import pydantic_core
import redis.asyncio as aioredis
from pydantic import ValidationError

from sentinel.config import Settings
from sentinel.schemas import RejectionCode, RejectionReason, Task, TaskProposal, ValidationResult

BYTES_PER_CHAR = 4  # a file may be pretty-printed and non-ASCII: its compact dump is checked


def _rejected(data: bytes, code: RejectionCode, detail: str) -> ValidationResult:
    digest = hashlib.sha256(data).hexdigest()[:12]
    return ValidationResult(
        proposal_id=f"unparseable-{digest}", task_id="unknown", accepted=False,
        reasons=[RejectionReason(code=code, detail=detail[:500])],
    )  # fmt: skip


def parse_proposal(data: bytes, max_chars: int) -> TaskProposal | ValidationResult:
    """The proposal in `data`, or the verdict on content that is not one."""
    from sentinel.validator import reject_unparseable

    limit = BYTES_PER_CHAR * max_chars
    if len(data) > limit:
        detail = f"over {limit} bytes (validation.max_task_chars is {max_chars})"
        return _rejected(data, RejectionCode.TOO_LARGE, detail)
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return _rejected(data, RejectionCode.SCHEMA, f"not UTF-8: {error}")
    try:
        value = pydantic_core.from_json(raw)  # depth-limited, unlike json.loads
    except ValueError as error:
        return _rejected(data, RejectionCode.SCHEMA, f"not JSON: {error}")
    bare_task = isinstance(value, dict) and "task" not in value and "spec" in value
    try:
        if not bare_task:
            return TaskProposal.model_validate(value)
        task = Task.model_validate(value)
    except ValidationError as error:
        return reject_unparseable(raw, error)
    return TaskProposal(
        id=f"file-{task.id}", task=task, prompt_version="hand-written", proposer_model="human"
    )


def read_proposal(path: Path, max_chars: int) -> TaskProposal | ValidationResult | str:
    """The proposal in the file, the verdict on its content, or why it cannot be read."""
    try:
        with path.open("rb") as file:
            data = file.read(BYTES_PER_CHAR * max_chars + 1)  # no more than the limit needs
    except OSError as error:
        return f"cannot read {path}: {error.strerror or error}"
    return parse_proposal(data, max_chars)


async def validate_file(
    settings: Settings, redis: aioredis.Redis, proposal: TaskProposal
) -> ValidationResult:
    """The verdict of the validator the workers run, on the proposal's own domain when
    it names one; nothing is claimed in the pool."""
    from sentinel.envs.registry import PACKS
    from sentinel.validator import open_validator

    domain = proposal.task.domain if proposal.task.domain in PACKS else None
    async with AsyncExitStack() as stack:
        validator = await open_validator(settings, redis, stack, domain)
        return await validator.validate(proposal, claim=False)


def render_verdict(result: ValidationResult) -> str:
    lines = ["accepted" if result.accepted else "rejected"]
    lines += [f"  {r.code.value}: {r.detail}" for r in result.reasons]
    if result.checks:  # what the task would carry into the pool
        lines.append(f"checks ({len(result.checks)}):")
        lines += [f"  {c.describe()}" for c in result.checks]
    if result.near_misses:
        lines.append(f"near misses caught: {result.near_misses_caught} of {result.near_misses}")
    return "\n".join(lines)
