"""GRPO step throughput on CPU: SENTINEL's `Policy.grpo_step` against TRL's GRPO update, in one run.

Both train SmolLM2-135M-Instruct (float32) with the same LoRA adapter (rank 8, alpha 16, dropout
0, on q/k/v/o_proj, initialised from the same seed), AdamW at lr 1e-5 without weight decay, grad
norm clipped at 1.0, no KL term (beta 0), clip range 0.2 / 0.28 and token-mean aggregation over
the whole step (SENTINEL: `loss_aggregation="token_mean"`; TRL: `loss_type="dapo"`, whose
`num_items_in_batch` normaliser makes gradient accumulation add up to the same thing). The
settings are SENTINEL's `TrainerSettings` defaults except the learning rate, whose default is
2e-5; every one is passed explicitly below.

The batch is fixed and recorded-like: G groups x S trajectories, one turn each, a shared random
prompt per group (token ids 1..40000, fixed seed) and a random completion per trajectory, mixed
rewards so that no group is filtered. Behaviour logprobs are the initial policy's own logprobs
plus a little noise, as a server running the same weights would report them, so SENTINEL's
truncated importance-sampling factor stays near 1 instead of collapsing to 0 on random tokens.

SENTINEL splits the step into micro-batches of at most `micro_batch_tokens` padded tokens; TRL
gets the same number of micro-batches (as gradient accumulation steps) unless told otherwise.
For TRL the trainer is constructed offline (a tiny dummy dataset, a constant reward, no vLLM,
no reporting) and each step calls `trainer._compute_loss` on an `inputs` dict built directly
(left-padded prompt ids and mask, completion ids and mask, advantages of shape (B,),
`num_items_in_batch`; `old_per_token_logps` absent, i.e. one gradient step per generation),
then `accelerator.backward`, clipping, the optimizer TRL's trainer creates, and `zero_grad`.
Only the update is timed in both paths; generation, reward and advantage code are not. After
each path's warm-up steps the timed steps alternate (SENTINEL, TRL, SENTINEL, ...) so that load
from other processes on the machine hits both alike. Both models stay in memory, so
`peak_rss_mb` covers both; `peak_rss_mb_sentinel_only` is taken before TRL's model is loaded.

Known differences in the logprob computation: SENTINEL runs the backbone, then projects through
the LM head only the hidden states of loss positions. TRL patches the model with its fused,
chunked LM head (`trl.trainer.utils.add_fused_lm_head`); on CUDA/XPU with Triton it also scores
only the labelled positions, but on CPU (`_use_triton` is False) it projects *every* position,
prompt included, and masks afterwards, and it always computes per-token entropy as well.
SENTINEL's loss also multiplies by a truncated importance-sampling factor from the behaviour
logprobs (cap 2); TRL without vLLM has no behaviour logprobs and no such factor.

Trained tokens are counted the same way for both: completion tokens that carry loss. The last
line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentinel.config import TrainerSettings
from sentinel.schemas import RolloutGroup, TurnTokens
from sentinel.training.batch import FORCED_LOGPROB, advantages, build_batch, micro_batches
from sentinel.training.grpo import collate, policy_logprobs
from sentinel.training.policy import Policy
from tests import factories

MODEL_DIR = ROOT / ".cache" / "sentinel" / "models" / "SmolLM2-135M-Instruct"
# Rewards per trajectory; group g uses row g % len(REWARDS), each row has some variance.
REWARDS = [
    [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0],
    [0.0, 1.0, 0.5, 0.25, 0.0, 1.0, 0.0, 0.75],
    [0.2, 0.9, 0.4, 0.0, 1.0, 0.3, 0.6, 0.1],
    [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0],
]


def settings(seed: int, learning_rate: float, micro_batch_tokens: int) -> TrainerSettings:
    return TrainerSettings(
        device="cpu", full_finetune=False, lora_rank=8, lora_alpha=16,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], learning_rate=learning_rate,
        weight_decay=0.0, max_grad_norm=1.0, micro_batch_tokens=micro_batch_tokens,
        advantage_scale="group", loss_aggregation="token_mean", epsilon_low=0.2,
        epsilon_high=0.28, tis_cap=2.0,
        kl_beta=0.0, max_staleness=4, seed=seed,
    )  # fmt: skip


def make_groups(
    groups: int, size: int, prompt_tokens: int, completion_tokens: int, seed: int
) -> list[RolloutGroup]:
    """Groups with placeholder behaviour logprobs (-1.0); see `with_behaviour`."""
    rng = random.Random(seed)
    made = []
    for g in range(groups):
        prompt = [rng.randrange(1, 40_000) for _ in range(prompt_tokens)]
        trajectories = []
        for i in range(size):
            reward = REWARDS[g % len(REWARDS)][i % len(REWARDS[0])]
            t = factories.trajectory(g * 1000 + i, reward)
            completion = [rng.randrange(1, 40_000) for _ in range(completion_tokens)]
            t.turns = [TurnTokens(message_index=2, prompt_token_ids=prompt,
                                  completion_token_ids=completion,
                                  logprobs=[-1.0] * completion_tokens)]  # fmt: skip
            trajectories.append(t)
        made.append(
            RolloutGroup(
                id=f"group-{g}", task_id=f"t{g}", policy_version=0, trajectories=trajectories
            )
        )
    assert all(g.informative() for g in made), "every group needs reward variance"
    return made


@torch.no_grad()
def initial_logprobs(policy: Policy, groups: Sequence[RolloutGroup]) -> dict[str, list[float]]:
    """The untrained policy's logprob of every completion token, by trajectory id."""
    batch = build_batch(
        groups, current_version=0, max_staleness=0, scale="group", aggregation="token_mean"
    )
    policy.model.eval()
    found: dict[str, list[float]] = {}
    for samples in micro_batches(batch.samples, policy.settings.micro_batch_tokens):
        tensors = collate(samples, policy.pad_id, policy.device)
        logp = policy_logprobs(policy.model, tensors)
        for row, sample in enumerate(samples):
            found[sample.trajectory_id] = logp[row][tensors.loss_mask[row]].tolist()
    return found


def with_behaviour(
    groups: Sequence[RolloutGroup], logprobs: dict[str, list[float]], seed: int
) -> list[RolloutGroup]:
    """Behaviour logprobs = the policy's own + N(0, 0.05), kept clear of FORCED_LOGPROB."""
    rng = random.Random(seed + 1)
    out = []
    for group in groups:
        trajectories = []
        for t in group.trajectories:
            noisy = [min(lp + rng.gauss(0, 0.05), 10 * FORCED_LOGPROB) for lp in logprobs[t.id]]
            turn = t.turns[0].model_copy(update={"logprobs": noisy})
            trajectories.append(t.model_copy(update={"turns": [turn]}))
        out.append(group.model_copy(update={"trajectories": trajectories}))
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step: Callable[[], int]) -> tuple[float, int]:
    """Seconds one step took and the tokens it trained."""
    started = time.perf_counter()
    tokens = step()
    return time.perf_counter() - started, tokens


def sentinel_step(policy: Policy, groups: Sequence[RolloutGroup]) -> Callable[[], int]:
    def step() -> int:
        # Keep the fixed batch fresh: the policy version moves on every step.
        fresh = [g.model_copy(update={"policy_version": policy.version}) for g in groups]
        report = policy.grpo_step(fresh)
        assert report.filtered_groups == 0, report
        assert report.stale_groups == 0, report
        return report.tokens

    return step


def trl_trainer(
    s: TrainerSettings, lora: Any, batch_size: int, group_size: int, micro: int,
    completion_tokens: int, out_dir: Path,
) -> Any:  # fmt: skip
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def constant_reward(completions: list[Any], **_: Any) -> list[float]:
        return [0.0] * len(completions)

    accumulation = batch_size // micro
    config = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation,
        num_generations=group_size, max_completion_length=completion_tokens,
        learning_rate=s.learning_rate, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        beta=s.kl_beta, epsilon=s.epsilon_low, epsilon_high=s.epsilon_high, loss_type="dapo",
        scale_rewards="group", temperature=1.0, importance_sampling_level="token",
        use_vllm=False, report_to=[], bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, seed=s.seed, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    # The same construction order as Policy, so the LoRA A matrices start identical.
    torch.manual_seed(s.seed)
    model: Any = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = get_peft_model(model, lora)
    trainer = GRPOTrainer(
        model=model, reward_funcs=constant_reward, args=config,
        train_dataset=Dataset.from_dict({"prompt": ["Hello."] * batch_size}),
        processing_class=AutoTokenizer.from_pretrained(MODEL_DIR),
    )  # fmt: skip
    # Set by Trainer's training loop, which is not run here.
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.create_optimizer()
    return trainer


def trl_inputs(
    groups: Sequence[RolloutGroup], pad_id: int, micro: int
) -> list[dict[str, torch.Tensor]]:
    """TRL's post-generation `inputs`, one dict per micro-batch, in the batch's order."""
    advantage = advantages(groups, "group")
    trajectories = [t for g in groups for t in g.trajectories]
    prompts = [t.turns[0].prompt_token_ids for t in trajectories]
    completions = [t.turns[0].completion_token_ids for t in trajectories]
    width_p = max(len(p) for p in prompts)
    width_c = max(len(c) for c in completions)
    prompt_ids = torch.tensor([[pad_id] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad_id] * (width_c - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
    advantages_t = torch.tensor([advantage[t.id] for t in trajectories], dtype=torch.float32)
    total = completion_mask.sum()
    return [
        {
            "prompt_ids": prompt_ids[i : i + micro],
            "prompt_mask": prompt_mask[i : i + micro],
            "completion_ids": completion_ids[i : i + micro],
            "completion_mask": completion_mask[i : i + micro],
            "advantages": advantages_t[i : i + micro],
            "num_items_in_batch": total,
        }
        for i in range(0, len(trajectories), micro)
    ]


def trl_step(trainer: Any, chunks: list[dict[str, torch.Tensor]]) -> Callable[[], int]:
    """What `Trainer.training_step` and the training loop do for one optimizer step."""
    model, optimizer = trainer.model, trainer.optimizer
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> int:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for inputs in chunks:
            loss = trainer._compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
        optimizer.step()
        return sum(int(c["completion_mask"].sum()) for c in chunks)

    return step


@torch.no_grad()
def trl_initial_logprobs(trainer: Any, chunks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    rows = []
    for inputs in chunks:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].size(1)
        )
        rows.append(logps)
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=8192,
        help="SENTINEL's micro-batch budget (its default, sized for a GPU; activations of one "
        "8192-token float32 micro-batch take ~13 GB of RAM on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--trl-micro-batch", type=int, default=0,
        help="sequences per TRL micro-batch (default: as many micro-batches as SENTINEL uses)",
    )  # fmt: skip
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    s = settings(args.seed, args.learning_rate, args.micro_batch_tokens)
    batch_size = args.groups * args.group_size
    paths = 1 if args.skip_trl else 2
    ours_s: list[float] = []
    trl_s: list[float] = []
    ours_tokens = trl_tokens = 0
    figures: dict[str, Any] = {}

    with Progress(transient=True) as progress, tempfile.TemporaryDirectory() as tmp:
        job = progress.add_task("SENTINEL: load, warm up", total=(args.warmup + args.steps) * paths)
        policy = Policy(s, MODEL_DIR)
        placeholder = make_groups(
            args.groups, args.group_size, args.prompt_tokens, args.completion_tokens, args.seed
        )
        ours_initial = initial_logprobs(policy, placeholder)
        groups = with_behaviour(placeholder, ours_initial, args.seed)
        samples = build_batch(
            groups, current_version=0, max_staleness=0, scale="group", aggregation="token_mean"
        ).samples
        our_micro = len(micro_batches(samples, s.micro_batch_tokens))
        ours_step = sentinel_step(policy, groups)
        for _ in range(args.warmup):
            timed(ours_step)
            progress.advance(job)
        rss_sentinel = rss_mb()  # before TRL's model exists

        steps: list[tuple[Callable[[], int], list[float]]] = [(ours_step, ours_s)]
        if not args.skip_trl:
            progress.update(job, description="TRL: construct GRPOTrainer, warm up")
            micro = args.trl_micro_batch or math.ceil(batch_size / our_micro)
            if batch_size % micro:
                parser.error(f"--trl-micro-batch {micro} must divide the batch ({batch_size})")
            trainer = trl_trainer(
                s, policy.lora_config(), batch_size, args.group_size, micro,
                args.completion_tokens, Path(tmp),
            )  # fmt: skip
            chunks = trl_inputs(groups, policy.pad_id, micro)
            theirs = trl_initial_logprobs(trainer, chunks)
            ours = torch.tensor([ours_initial[t.id] for g in groups for t in g.trajectories])
            figures |= {
                "trl_path": "GRPOTrainer._compute_loss",
                "trl_micro_batches": len(chunks),
                "trl_optimizer": type(trainer.optimizer).__name__,
                "initial_logprob_max_abs_diff": float((ours - theirs).abs().max()),
            }
            theirs_step = trl_step(trainer, chunks)
            for _ in range(args.warmup):
                timed(theirs_step)
                progress.advance(job)
            steps.append((theirs_step, trl_s))

        # Alternate the timed steps so that load from other processes hits both paths alike.
        progress.update(job, description="timed steps, alternating")
        for _ in range(args.steps):
            for step, durations in steps:
                seconds, tokens = timed(step)
                durations.append(seconds)
                if step is ours_step:
                    ours_tokens += tokens
                else:
                    trl_tokens += tokens
                progress.advance(job)

    ours_rate = ours_tokens / sum(ours_s)
    trl_rate = trl_tokens / sum(trl_s) if trl_s else None
    result: dict[str, Any] = {
        "train_tokens_per_s": round(ours_rate, 1),
        "trl_tokens_per_s": round(trl_rate, 1) if trl_rate else None,
        "ratio": round(ours_rate / trl_rate, 3) if trl_rate else None,
        "peak_rss_mb": round(rss_mb(), 1),
        "peak_rss_mb_sentinel_only": round(rss_sentinel, 1),
        "steps": args.steps,
        "batch_sequences": batch_size,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "trained_tokens_per_step": ours_tokens // args.steps,
        "trl_trained_tokens_per_step": trl_tokens // args.steps if trl_s else None,
        "sentinel_step_s": [round(x, 2) for x in ours_s],
        "trl_step_s": [round(x, 2) for x in trl_s],
        "sentinel_micro_batches": our_micro,
        "torch_threads": torch.get_num_threads(),
        **figures,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
