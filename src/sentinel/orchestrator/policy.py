"""The policy version rollouts sample now: the newest the loop has announced, kept in Redis.

The loop writes it as versions are published; anything that must act on the current Solver
(the validator's difficulty probe) reads it here rather than from the loop itself."""

from __future__ import annotations

import redis.asyncio as aioredis

from sentinel.schemas.training import PolicyVersion


def policy_key(prefix: str) -> str:
    return f"{prefix}:loop:policy"


async def current_policy(redis: aioredis.Redis, prefix: str, base_model: str) -> PolicyVersion:
    """The newest announced version; before any, the base model as version 0."""
    raw = await redis.get(policy_key(prefix))
    if raw:
        return PolicyVersion.model_validate_json(raw)
    return PolicyVersion(version=0, served_name=base_model, base_model=base_model)
