"""Fine-tune the user model on gold-action dialogues and serve it as its own LoRA adapter.

The trainer's SFT mode learns the user's turns (and nothing of the agent's); the adapter is
saved as `user-v<N>` and loaded into the running vLLM server, next to the policy's adapters.
The fidelity checks run on held-out train tasks before and after, so a round shows whether
the simulator got more faithful; `llm.user_sim.model: user-v<N>` then points the loop at it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from pydantic import BaseModel

from sentinel.agents.llm import OpenAIChatClient
from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.schemas import SFTExample, Task, TrainStepReport
from sentinel.usersim.dialogues import build_examples
from sentinel.usersim.fidelity import FidelityReport, check_fidelity

if TYPE_CHECKING:
    from sentinel.envs.base import Environment
    from sentinel.training.policy import Policy

log = get_logger(__name__)

PREFIX = "user-v"


class FinetuneResult(BaseModel):
    name: str  # the served adapter name
    adapter_path: str
    examples: int
    steps: list[TrainStepReport]
    before: FidelityReport
    after: FidelityReport

    @property
    def improved(self) -> list[str]:
        """Checks whose rate rose on the held-out tasks."""
        return [
            b.check for b, a in zip(self.before.checks, self.after.checks, strict=True)
            if b.rate is not None and a.rate is not None and a.rate > b.rate
        ]  # fmt: skip

    @property
    def config_line(self) -> str:
        return f"llm.user_sim.model: {self.name}"


def adapter_dir(settings: Settings) -> Path:
    return settings.trainer.adapter_dir or settings.run_dir / "adapters"


def next_name(directory: Path) -> str:
    """user-v<N>, one past the highest version already saved there."""
    found = [
        int(m.group(1)) for p in directory.glob(f"{PREFIX}*")
        if (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name))
    ]  # fmt: skip
    return f"{PREFIX}{max(found, default=0) + 1}"


def train(
    policy: Policy, examples: Sequence[SFTExample], rounds: int, batch: int
) -> list[TrainStepReport]:
    """SFT steps over the examples, `rounds` passes of `batch` examples per step."""
    reports = []
    for round_ in range(rounds):
        for start in range(0, len(examples), batch):
            report = policy.sft_step(examples[start : start + batch])
            reports.append(report)
            log.info("user model step", round=round_, step=report.step, loss=round(report.loss, 4))
    return reports


async def finetune(
    settings: Settings, domain: Environment, train_tasks: Sequence[Task],
    holdout: Sequence[Task], *, model_dir: Path, name: str | None = None,
) -> FinetuneResult:  # fmt: skip
    """One fine-tune round: check, train, save and load `user-v<N>`, check again."""
    from sentinel.training.policy import Policy  # heavy: torch
    from sentinel.training.publisher import load_adapter

    overlap = {t.id for t in train_tasks} & {t.id for t in holdout}
    if overlap:
        raise ValueError(f"held-out tasks are also training tasks: {sorted(overlap)}")
    endpoint = settings.llm.user_sim
    before = await _check(settings, holdout, endpoint.model)
    examples = build_examples(domain, train_tasks)
    us = settings.usersim
    trainer = settings.trainer.model_copy(update={"learning_rate": us.finetune_learning_rate})
    policy = await anyio.to_thread.run_sync(Policy, trainer, model_dir)
    steps = await anyio.to_thread.run_sync(
        train, policy, examples, us.finetune_rounds, us.finetune_batch
    )
    directory = adapter_dir(settings)
    name = name or next_name(directory)
    path = await anyio.to_thread.run_sync(policy.save_adapter, directory / name)
    await load_adapter(endpoint.base_url, name, path, headers=endpoint.auth_headers())
    log.info("user model served", name=name, path=str(path), endpoint=endpoint.base_url)
    after = await _check(settings, holdout, name)
    result = FinetuneResult(
        name=name, adapter_path=str(path), examples=len(examples), steps=steps,
        before=before, after=after,
    )  # fmt: skip
    record = settings.run_dir / "usersim" / f"finetune-{name}.json"
    record.write_text(result.model_dump_json(indent=2))
    return result


async def _check(settings: Settings, tasks: Sequence[Task], model: str) -> FidelityReport:
    client = OpenAIChatClient(settings.llm.user_sim, model=model)
    try:
        return await check_fidelity(settings, tasks, client)
    finally:
        await client.aclose()
