"""Staleness-safe adapters on the real vLLM server: the last max_staleness + 1 policies stay
loaded (and held-out evaluations' ones), a name never carries other weights, and every policy
request's `cache_salt` keeps the prefix cache from serving blocks of other weights."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.agents.llm import LLMError, OpenAIChatClient
from sentinel.config import LLMEndpoint, TrainerSettings
from sentinel.training.policy import Policy
from sentinel.training.publisher import (
    LoRAPublisher,
    PublishError,
    cache_salt,
    loaded_adapters,
    retained,
)

pytestmark = pytest.mark.anyio


@settings(max_examples=100, deadline=None)
@given(
    newest=st.integers(0, 500),
    keep=st.integers(1, 12),
    every=st.integers(0, 10),
)
def test_the_last_keep_versions_and_evaluated_ones_are_retained(
    newest: int, keep: int, every: int
) -> None:
    kept = {v for v in range(newest + 1) if retained(v, newest, keep, every)}
    window = set(range(max(0, newest - keep + 1), newest + 1))
    evaluated = {v for v in range(newest + 1) if every and v % every == 0}
    assert kept == window | evaluated


def test_cache_salts_differ_by_version_and_vllm_accepts_their_form() -> None:
    salts = {cache_salt(v) for v in range(1000)}
    assert len(salts) == 1000
    # vLLM 0.32 (validate_cache_salt): 1-128 characters, none of @ / \ NUL
    assert all(0 < len(s) <= 128 and not set(s) & {"@", "/", "\\", "\0"} for s in salts)


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> Policy:
    return Policy(TrainerSettings(lora_rank=8), model_dir)


def perturb(policy: Policy) -> None:
    """Other weights under the same version (a fresh adapter's B is zero: all equal)."""
    with torch.no_grad():
        for parameter in policy.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)


async def test_a_version_never_gets_other_weights(policy: Policy, tmp_path: Path) -> None:
    """vLLM keys prefix-cache blocks by adapter name and path and warns that an in-place
    reload from the same path keeps the old blocks: a resumed trainer's other weights under
    a published version are refused; the same weights publish again (a restarted server)."""
    publisher = LoRAPublisher(tmp_path / "adapters", [], "smol")
    policy.version = 3
    first = await publisher.publish(policy, 3)
    assert (await publisher.publish(policy, 3)).adapter_path == first.adapter_path
    perturb(policy)
    with pytest.raises(PublishError, match="already published with other weights"):
        await publisher.publish(policy, 3)
    assert not (tmp_path / "adapters" / ".republished").exists()
    policy.version = 4
    assert (await publisher.publish(policy, 4)).served_name == "policy-v4"


async def test_publishing_unloads_only_versions_past_the_staleness_bound(
    policy: Policy, policy_url: str, policy_headers: dict[str, str], tmp_path: Path
) -> None:
    """keep_versions = max_staleness + 1 = 2: publishing v+2 unloads v, after v+2 is loaded;
    an evaluated version (keep_every) and another run's adapter on the server stay."""
    base = random.randrange(10**6, 10**7) * 10  # names no other test on the server uses
    other = LoRAPublisher(tmp_path / "other", [policy_url], "smol", headers=policy_headers)
    publisher = LoRAPublisher(
        tmp_path / "adapters", [policy_url], "smol", headers=policy_headers,
        keep_versions=2, keep_every=10,
    )  # fmt: skip
    policy.version = base - 5
    await other.publish(policy, 0)  # another run's adapter, older than the bound
    try:
        for version in range(base, base + 4):
            policy.version = version
            await publisher.publish(policy, version)
        ours = set(await loaded_adapters(policy_url, tmp_path / "adapters", headers=policy_headers))
        # base is evaluated (a multiple of 10); base + 1 fell out of the window
        assert ours == {f"policy-v{v}" for v in (base, base + 2, base + 3)}
        theirs = await loaded_adapters(policy_url, tmp_path / "other", headers=policy_headers)
        assert theirs == [f"policy-v{base - 5}"]
    finally:
        await _unload_all(policy_url, policy_headers, base)


async def _unload_all(url: str, headers: dict[str, str], base: int) -> None:
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        for version in (base - 5, *range(base, base + 4)):
            await http.post(url + "/unload_lora_adapter", json={"lora_name": f"policy-v{version}"})


async def test_the_salt_reaches_vllm(policy_url: str) -> None:
    """The client sends `cache_salt` in the body vLLM validates: a malformed salt is refused,
    a well-formed one is served."""
    prompt = [{"role": "user", "content": "Say hi."}]
    for salt, refused in (("bad@salt", True), (cache_salt(7), False)):
        client = OpenAIChatClient(LLMEndpoint(base_url=policy_url, max_retries=0), cache_salt=salt)
        try:
            if refused:
                with pytest.raises(LLMError, match="cache_salt"):
                    await client.complete(prompt, max_tokens=2)
            else:
                assert await client.complete(prompt, max_tokens=2, record_tokens=True)
        finally:
            await client.aclose()


async def test_another_salt_never_hits_the_prefix_cache(
    policy_url: str, policy_headers: dict[str, str]
) -> None:
    """The same prompt under the same version's salt reuses its KV blocks (a group's shared
    prompt, a rollout's earlier turns); under another version's salt it is computed again.
    Read from usage.prompt_tokens_details.cached_tokens (`--enable-prompt-tokens-details`)."""
    nonce = uuid.uuid4().hex  # no other request on the server shares these blocks
    text = f"{nonce} " + " ".join(f"word{i}" for i in range(400))
    cached = []
    async with httpx.AsyncClient(timeout=300, headers=policy_headers) as http:
        for version in (1, 1, 2):
            body = {
                "model": "smol", "messages": [{"role": "user", "content": text}],
                "max_tokens": 1, "cache_salt": cache_salt(version),
            }  # fmt: skip
            usage = (await http.post(policy_url + "/chat/completions", json=body)).json()["usage"]
            details = usage.get("prompt_tokens_details")
            if details is None:
                pytest.skip("the server was started without --enable-prompt-tokens-details")
            cached.append(details["cached_tokens"] or 0)
            prompt_tokens = usage["prompt_tokens"]
    print("cached tokens by salt (v1, v1, v2):", cached, "of", prompt_tokens)
    assert cached[0] == 0
    assert cached[1] >= prompt_tokens // 2, cached  # whole blocks of the same salt
    assert cached[2] == 0, cached  # another version's salt: nothing shared
