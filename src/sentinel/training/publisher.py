"""Getting new policy weights to the servers that sample rollouts.

`WeightPublisher` is the seam: `LoRAPublisher` writes the adapter as `policy-v{N}` into a
directory the servers can read (the run directory locally, a shared RWX volume in the
cluster) and asks every vLLM endpoint to load it at runtime. A full-weight or NCCL
broadcast publisher can implement the same method.

Staleness-safe serving (TRL's rule for async GRPO with LoRA, huggingface/trl#7017): a
rollout samples every turn from the adapter it started with, so the last `keep_versions`
(trainer.max_staleness + 1) versions stay loaded, and each new one loads before the oldest
is unloaded; hence serve.max_loras >= max_staleness + 2. A name and path always mean the
same weights: vLLM keys prefix-cache blocks by them (and rollouts add a `cache_salt` by
version), so other weights under an old name are refused rather than loaded in place.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import httpx

from sentinel.logs import get_logger
from sentinel.schemas import PolicyVersion

if TYPE_CHECKING:  # torch stays out of the rollout workers, which import `cache_salt`
    from sentinel.training.policy import Policy

log = get_logger(__name__)

_SERVED = re.compile(r"^policy-v(\d+)$")


class PublishError(RuntimeError):
    """An endpoint did not load the new weights after every retry, or the version's name
    already holds other weights."""


class WeightPublisher(Protocol):
    async def publish(self, policy: Policy, step: int) -> PolicyVersion: ...


def served_name(version: int) -> str:
    return f"policy-v{version}"


def cache_salt(version: int) -> str:
    """vLLM's `cache_salt` for every request sampled from policy `version`: prefix-cache
    blocks are never shared across versions, also where the served name stays the same
    (the base model, full-weight publishing)."""
    return f"sentinel-policy-v{version}"


def retained(version: int, newest: int, keep_versions: int, keep_every: int = 0) -> bool:
    """Whether adapter `version` stays loaded once `newest` is: one of the last
    `keep_versions` (rollouts of an allowed staleness), or one that a held-out evaluation
    samples from (`loop.eval_every`), which no staleness bound drops."""
    return version > newest - keep_versions or bool(keep_every and version % keep_every == 0)


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
        keep_versions: int | None = None,
        keep_every: int = 0,
    ) -> None:
        self.adapter_dir = adapter_dir
        self.endpoints = endpoints
        self.base_model = base_model
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = headers or {}  # the servers' key (LLMEndpoint.auth_headers)
        self.keep_versions = keep_versions  # None: never unload (`retained`)
        self.keep_every = keep_every

    async def publish(self, policy: Policy, step: int) -> PolicyVersion:
        name = served_name(policy.version)
        path = await anyio.to_thread.run_sync(self._save, policy, name)
        loaded = [await self._load(endpoint, name, path) for endpoint in self.endpoints]
        log.info("policy published", name=name, path=str(path), endpoints=loaded)
        if self.keep_versions is not None:  # only once the new one is loaded everywhere
            for endpoint in self.endpoints:
                await self._retire(endpoint, policy.version, self.keep_versions)
        return PolicyVersion(
            version=policy.version, served_name=name, base_model=self.base_model,
            adapter_path=str(path), train_step=step, endpoints=loaded,
        )  # fmt: skip

    def _save(self, policy: Policy, name: str) -> Path:
        """The adapter at `adapter_dir/name`. A version published before (a trainer resumed
        from an older checkpoint) keeps its weights: vLLM would reuse the prefix-cache blocks
        of the old ones, and rollouts in flight would switch weights mid-way."""
        target = self.adapter_dir / name
        if not target.exists():
            return policy.save_adapter(target)
        fresh = policy.save_adapter(self.adapter_dir / ".republished" / name)
        same = weights_digest(fresh) == weights_digest(target)
        shutil.rmtree(fresh.parent, ignore_errors=True)
        if not same:
            raise PublishError(
                f"{name} is already published with other weights at {target}: a name and "
                "path must always mean the same weights; the next version publishes"
            )
        return target.resolve()

    async def _retire(self, endpoint: str, newest: int, keep: int) -> None:
        """Unload this publisher's adapters that no rollout of an allowed staleness uses; a
        failure is logged only (the new version is served already)."""
        try:
            names = await loaded_adapters(endpoint, self.adapter_dir, headers=self.headers)
            for name in names:
                served = _SERVED.match(name)
                version = int(served[1]) if served else newest  # not ours: kept
                if not retained(version, newest, keep, self.keep_every):
                    await unload_adapter(endpoint, name, headers=self.headers)
                    log.info("adapter unloaded", endpoint=endpoint, name=name, newest=newest)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            log.warning("old adapters not unloaded", endpoint=endpoint, error=repr(error))

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
    url = _root(base_url) + "/v1/load_lora_adapter"
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


def weights_digest(directory: Path) -> str:
    """SHA-256 over an adapter's weight files (not its README or config)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _root(base_url: str) -> str:
    return base_url.removesuffix("/").removesuffix("/v1")


async def loaded_adapters(
    base_url: str, adapter_dir: Path, *, headers: dict[str, str] | None = None
) -> list[str]:
    """The adapters `base_url` serves from `adapter_dir` (GET /v1/models: a LoRA's card has
    its path as `root`), so another run's adapters on a shared server are left alone."""
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        response = await client.get(_root(base_url) + "/v1/models")
        response.raise_for_status()
    directory = Path(await anyio.Path(adapter_dir).resolve())
    return [
        card["id"]
        for card in response.json()["data"]
        if card.get("parent") and Path(str(card.get("root"))).parent == directory
    ]


async def unload_adapter(
    base_url: str, name: str, *, headers: dict[str, str] | None = None
) -> None:
    """POST /v1/unload_lora_adapter. vLLM 0.32 drops the name only: a request already
    running finishes on the adapter, a new one naming it gets 404."""
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        response = await client.post(
            _root(base_url) + "/v1/unload_lora_adapter", json={"lora_name": name}
        )
        response.raise_for_status()
