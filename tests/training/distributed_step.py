"""One GRPO update per configuration, run by each of torchrun's trainers (test_distributed):
rank 0 writes the step's figures and every parameter's full gradient, and a checkpoint.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/training/distributed_step.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sentinel.config import TrainerSettings
from sentinel.training.distributed import World, full_gradients, full_optimizer, full_weights, units
from sentinel.training.policy import Policy
from tests.training.test_grpo import groups

CONFIGS = {  # name: (full_finetune, share_prefix, updates_per_batch)
    "lora": (False, False, 1),
    "lora-shared": (False, True, 1),
    "full": (True, False, 1),
    "full-shared": (True, True, 1),
    "full-two-updates": (True, True, 2),  # the proximal logprobs, an update mid-step
}


def settings(full: bool, shared: bool, updates: int = 1) -> TrainerSettings:
    """Small micro-batches (several, an odd count to pad), no clipping: the gradient as is."""
    return TrainerSettings(
        device="cpu", full_finetune=full, share_prefix=shared, micro_batch_tokens=64,
        max_grad_norm=1e9, learning_rate=1e-2, lora_targets=["q_proj", "v_proj", "down_proj"],
        updates_per_batch=updates,
    )  # fmt: skip


def step(
    full: bool,
    shared: bool,
    model_dir: Path,
    world: World | None,
    updates: int = 1,
    divide: float = 1.0,
) -> tuple[Policy, dict[str, Any]]:
    """A policy after two GRPO steps on test_grpo's groups; their figures and the gradients
    the optimizer stepped on (unsharded). Two: LoRA's A matrices get a gradient once B moved
    from zero, and the second step's weights were gathered again after the first update."""
    policy = Policy(settings(full, shared, updates), model_dir, world)
    for unit in units(policy.model):  # a wrong factor, for the test that must fail
        unit.set_gradient_divide_factor(divide)
    seen: dict[str, Any] = {"grads": [], "reports": []}
    original = policy.optimizer.step

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen["grads"].append(full_gradients(policy.model))
        return original(*args, **kwargs)

    policy.optimizer.step = recording  # type: ignore[method-assign]
    for _ in range(2):
        report = policy.grpo_step(groups(shared=12))
        seen["reports"].append((report.loss, report.tokens, report.clip_fraction))
    return policy, seen


def main(model_dir: Path, out: Path) -> None:
    world = World.from_env("cpu")
    for name, (full, shared, updates) in CONFIGS.items():
        _, seen = step(full, shared, model_dir, world, updates)
        if world.main:
            torch.save(seen, out / f"{name}.pt")
    _, seen = step(True, False, model_dir, world, divide=2.0)
    if world.main:
        torch.save(seen, out / "divided.pt")
    for name, full in (("full", True), ("lora", False)):
        policy, _ = step(full, False, model_dir, world)
        policy.checkpoint(out / f"checkpoint-{name}", {"note": "ws2"})
        resumed = Policy(settings(full, False), model_dir, world)
        resumed.restore(out / f"checkpoint-{name}")
        for suffix, trained in (("", policy), ("-resumed", resumed)):
            weights = full_weights(trained.model, trainable=True)
            optimizer = full_optimizer(trained.model, trained.optimizer)
            if world.main:
                state = {"weights": weights, "optimizer": optimizer, "step": trained.step}
                torch.save(state, out / f"state-{name}{suffix}.pt")
    lead_and_follow(model_dir, out, world)
    dist.destroy_process_group()


def lead_and_follow(model_dir: Path, out: Path, world: World) -> None:
    """The trainer under torchrun: rank 0 steps, checkpoints and saves the adapter; the
    others follow each call; each rank then writes its counters."""
    policy = Policy(settings(False, True), model_dir, world)
    if world.main:
        policy.lead()
        policy.grpo_step(groups(shared=12))
        policy.checkpoint(out / "led-checkpoint", {"note": "led"})
        policy.save_adapter(out / "led-adapter")
        policy.dismiss()
    else:
        policy.follow()
    counters = {"step": policy.step, "version": policy.version}
    (out / f"led-rank{world.rank}.json").write_text(json.dumps(counters))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
