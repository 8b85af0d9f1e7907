"""Getting new policy weights to the servers that sample rollouts.

`WeightPublisher` is the seam: `LoRAPublisher` writes the adapter as `policy-v{N}` into a
directory the servers can read (the run directory locally, a shared RWX volume in the
cluster) and asks every vLLM endpoint to load it at runtime. A full-weight or NCCL
broadcast publisher can implement the same method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import anyio
import httpx

from sentinel.logs import get_logger
from sentinel.schemas import PolicyVersion
from sentinel.training.policy import Policy

log = get_logger(__name__)


class PublishError(RuntimeError):
    """An endpoint did not load the new weights after every retry."""


class WeightPublisher(Protocol):
    async def publish(self, policy: Policy, step: int) -> PolicyVersion: ...


def served_name(version: int) -> str:
    return f"policy-v{version}"


class LoRAPublisher:
    def __init__(
        self,
        adapter_dir: Path,
        endpoints: list[str],
        base_model: str,
        *,
        retries: int = 5,
        backoff_s: float = 1.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.adapter_dir = adapter_dir
        self.endpoints = endpoints
        self.base_model = base_model
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = headers or {}  # the servers' key (LLMEndpoint.auth_headers)

    async def publish(self, policy: Policy, step: int) -> PolicyVersion:
        name = served_name(policy.version)
        path = await anyio.to_thread.run_sync(policy.save_adapter, self.adapter_dir / name)
        loaded = [await self._load(endpoint, name, path) for endpoint in self.endpoints]
        log.info("policy published", name=name, path=str(path), endpoints=loaded)
        return PolicyVersion(
            version=policy.version, served_name=name, base_model=self.base_model,
            adapter_path=str(path), train_step=step, endpoints=loaded,
        )  # fmt: skip

    async def _load(self, endpoint: str, name: str, path: Path) -> str:
        return await load_adapter(
            endpoint, name, path, retries=self.retries, backoff_s=self.backoff_s,
            headers=self.headers,
        )  # fmt: skip


async def load_adapter(
    base_url: str,
    name: str,
    path: Path,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    headers: dict[str, str] | None = None,
) -> str:
    """POST /v1/load_lora_adapter, in place so a re-publish after a restart is harmless;
    the endpoint once loaded, else PublishError after `retries` attempts."""
    url = base_url.removesuffix("/").removesuffix("/v1") + "/v1/load_lora_adapter"
    body = {"lora_name": name, "lora_path": str(path), "load_inplace": True}
    error = ""
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        for attempt in range(1, retries + 1):
            try:
                response = await client.post(url, json=body)
                if response.is_success:
                    return base_url
                error = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as failure:
                error = repr(failure)
            log.warning("adapter load failed", endpoint=base_url, attempt=attempt, error=error)
            await anyio.sleep(backoff_s * 2 ** (attempt - 1))
    raise PublishError(f"{base_url} did not load {name}: {error}")
