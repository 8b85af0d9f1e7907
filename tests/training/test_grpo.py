"""The GRPO loss and gradients against a straightforward reference implementation, and the
trainer's logprobs against the real vLLM server's."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sentinel.agents.llm import OpenAIChatClient
from sentinel.config import TrainerSettings
from sentinel.schemas import RolloutGroup, TurnTokens
from sentinel.training.batch import Sample, build_batch, micro_batches, pack
from sentinel.training.grpo import (
    LossConfig,
    LossStats,
    Tensors,
    backward_sharing_prefix,
    collate,
    grpo_loss,
    policy_logprobs,
    shared_prefix,
)
from sentinel.training.policy import Policy, keep_to_threads, map_large_allocations
from tests import factories

VOCAB = 64
CONFIG = LossConfig(epsilon_low=0.2, epsilon_high=0.28, tis_cap=2.0, kl_beta=0.0)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


def turns(
    rng: random.Random,
    count: int,
    *,
    prefix: bool,
    start: list[int] | None = None,
    temperature: float = 1.0,
) -> list[TurnTokens]:
    """Turns sampled at `temperature` whose prompts extend the previous turn (prefix=True) or
    start afresh; the first prompt begins with `start` (a system prompt the group shares)."""
    made: list[TurnTokens] = []
    context: list[int] = list(start or [])
    for _ in range(count):
        prompt = (context if prefix else list(start or [])) + [
            rng.randrange(VOCAB) for _ in range(rng.randint(3, 7))
        ]
        completion = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 5))]
        logprobs = [-rng.uniform(0.5, 4.0) for _ in completion]
        made.append(TurnTokens(message_index=len(made), prompt_token_ids=prompt,
                               completion_token_ids=completion, logprobs=logprobs,
                               temperature=temperature))  # fmt: skip
        context = prompt + completion
    return made


def groups(shared: int = 0) -> list[RolloutGroup]:
    """Three groups (the last without reward variance); each group's prompts start with the
    same `shared` tokens. Trajectories were sampled at different temperatures (0: greedy)."""
    rng = random.Random(7)
    out = []
    for g, rewards in enumerate([[1.0, 0.0, 0.5], [0.0, 1.0], [1.0, 1.0]]):  # the last: no variance
        start = [rng.randrange(VOCAB) for _ in range(shared)]
        trajectories = []
        for i, reward in enumerate(rewards):
            t = factories.trajectory(g * 10 + i, reward)
            t.group_id = f"g{g}"
            temperature = [1.0, 1.5, 0.0, 0.7][(g + i) % 4]
            t.turns = turns(rng, 2 + i % 2, prefix=i != 1, start=start, temperature=temperature)
            trajectories.append(t)
        out.append(RolloutGroup(task_id=f"t{g}", policy_version=3, trajectories=trajectories))
    return out


def reference(model: LlamaForCausalLM, data: list[RolloutGroup], aggregation: str) -> torch.Tensor:
    """Each turn separately, full logits, explicit loops."""
    per_trajectory: list[list[torch.Tensor]] = []
    for group in data:
        rewards = group.rewards
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        if std == 0:
            continue
        for trajectory, reward in zip(group.trajectories, rewards, strict=True):
            advantage = (reward - mean) / (std + 1e-6)
            terms = []
            for turn in trajectory.turns:
                ids = torch.tensor([turn.prompt_token_ids + turn.completion_token_ids])
                logits = model(input_ids=ids).logits[0] / (turn.temperature or 1.0)
                for j, token in enumerate(turn.completion_token_ids):
                    position = len(turn.prompt_token_ids) + j
                    lp = torch.log_softmax(logits[position - 1].float(), -1)[token]
                    ratio = torch.exp(lp - lp.detach())
                    clipped = torch.clamp(ratio, 0.8, 1.28)
                    pg = -torch.minimum(ratio * advantage, clipped * advantage)
                    tis = torch.clamp(torch.exp(lp.detach() - turn.logprobs[j]), max=2.0)
                    terms.append(pg * tis)
            per_trajectory.append(terms)
    if aggregation == "token_mean":
        return torch.stack([t for terms in per_trajectory for t in terms]).sum() / sum(
            len(terms) for terms in per_trajectory
        )
    return torch.stack([torch.stack(terms).mean() for terms in per_trajectory]).mean()


def ours(
    model: LlamaForCausalLM,
    data: list[RolloutGroup],
    aggregation: str,
    micro: int,
    chunk: int | None = None,
) -> float:
    """Our batch, micro-batches and loss; with `chunk`, a group per micro-batch, its prefix run
    once and the rows after it in chunks of `chunk` tokens."""
    batch = build_batch(
        data, current_version=3, max_staleness=2, scale="group", aggregation=aggregation
    )  # type: ignore[arg-type]
    total = 0.0

    def loss(logp: torch.Tensor, rows: Tensors) -> tuple[torch.Tensor, LossStats]:
        return grpo_loss(logp, logp.detach(), rows, CONFIG)

    for samples in micro_batches(batch.samples, micro, share_prefix=chunk is not None):
        tensors = collate(samples, pad_id=0, device=torch.device("cpu"))
        if chunk is not None:
            total += sum(s.loss for s in backward_sharing_prefix(model, tensors, loss, chunk))
            continue
        value, _ = loss(policy_logprobs(model, tensors), tensors)
        value.backward()
        total += float(value.detach())
    return total


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("micro", [16, 10_000])  # many micro-batches, or one
@pytest.mark.parametrize("chunk", [None, 0, 10_000])  # rows after a shared prompt: 1 or all
def test_loss_and_gradients_match_the_reference(
    aggregation: str, micro: int, chunk: int | None
) -> None:
    data = groups(shared=12)
    model = tiny_model()
    expected = reference(model, data, aggregation)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = ours(model, data, aggregation, micro, chunk)
    assert got == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-7)


def test_the_shared_prefix_stays_exact_under_gradient_checkpointing() -> None:
    """HF's checkpointing drops a layer's cache: the chunks must still attend the prefix."""
    data = groups(shared=12)
    model = tiny_model()
    expected = reference(model, data, "token_mean")
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = ours(model, data, "token_mean", 10_000, chunk=0)
    assert got == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-7)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # restored


def test_large_allocations_are_mapped_on_glibc() -> None:
    assert map_large_allocations()


def test_a_cpu_trainer_process_keeps_to_its_threads_and_a_policy_leaves_them(
    model_dir: Path,
) -> None:
    before = torch.get_num_threads()
    one = TrainerSettings(device="cpu", cpu_threads=1)
    try:
        torch.set_num_threads(2)  # the host's, whatever the machine's default
        Policy(one, model_dir)  # a library object: the host's threads are not its to set
        assert torch.get_num_threads() == 2
        keep_to_threads(TrainerSettings(device="cpu"))  # None: torch's own
        assert torch.get_num_threads() == 2
        keep_to_threads(one)  # what `sentinel trainer`, `sft` and `usersim finetune` call
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_zero_variance_and_stale_groups_contribute_nothing() -> None:
    data = groups()
    batch = build_batch(
        data, current_version=3, max_staleness=2, scale="group", aggregation="token_mean"
    )
    assert (batch.groups, batch.filtered_groups, batch.stale_groups) == (3, 1, 0)
    assert {s.trajectory_id for s in batch.samples}.isdisjoint({t.id for t in data[2].trajectories})
    stale = build_batch(
        data, current_version=9, max_staleness=2, scale="group", aggregation="token_mean"
    )
    assert (stale.stale_groups, stale.samples) == (3, [])
    model = tiny_model()
    flat = ours(model, [data[2]], "token_mean", 10_000)
    assert flat == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_packing_keeps_turns_that_extend_each_other_in_one_sequence() -> None:
    rng = random.Random(1)
    trajectory = factories.trajectory(0)
    trajectory.turns = turns(rng, 3, prefix=True)
    [(ids, mask, behaviour, temperature)] = pack(trajectory)
    last = trajectory.turns[-1]
    assert ids == last.prompt_token_ids + last.completion_token_ids
    assert sum(mask) == sum(len(t.completion_token_ids) for t in trajectory.turns)
    assert [b for b, m in zip(behaviour, mask, strict=True) if m] == [
        lp for t in trajectory.turns for lp in t.logprobs
    ]
    assert temperature == 1.0
    trajectory.turns = turns(rng, 3, prefix=False)
    assert len(pack(trajectory)) == 3
    trajectory.turns = turns(rng, 2, prefix=True, temperature=1.5)
    trajectory.turns[1].temperature = 0.7  # scored at another temperature: its own sequence
    assert [p.temperature for p in pack(trajectory)] == [1.5, 0.7]


def test_tokens_the_grammar_forced_carry_no_loss() -> None:
    trajectory = factories.trajectory(0)
    trajectory.turns = [
        TurnTokens(message_index=2, prompt_token_ids=[1, 2], completion_token_ids=[3, 4, 5, 6],
                   logprobs=[0.0, -1.2, -0.0, -3e-5])
    ]  # fmt: skip
    [(_, mask, _, _)] = pack(trajectory)
    assert mask == [False, False, False, True, False, False]


def test_clipping_bounds_the_update_when_the_policy_moved() -> None:
    data = groups()
    batch = build_batch(
        data, current_version=3, max_staleness=2, scale="none", aggregation="token_mean"
    )
    tensors = collate(batch.samples, pad_id=0, device=torch.device("cpu"))
    logp = policy_logprobs(tiny_model(), tensors).detach()
    moved = (logp + 0.5 * tensors.loss_mask).requires_grad_(True)  # ratio e^0.5 = 1.65 > 1.28
    loss, stats = grpo_loss(moved, logp, tensors, LossConfig(tis_cap=None))
    assert stats.clip_fraction == pytest.approx(1.0)
    loss.backward()
    positive = (tensors.advantages > 0).expand_as(tensors.loss_mask) & tensors.loss_mask
    assert moved.grad is not None
    assert torch.all(moved.grad[positive] == 0)  # clipped: no push further up


def test_a_group_shares_its_prompt_up_to_the_first_loss_token() -> None:
    batch = build_batch(
        groups(shared=12)[:1], current_version=3, max_staleness=2, scale="group",
        aggregation="token_mean",
    )  # fmt: skip
    firsts = [s for s in batch.samples if s.input_ids[:12] == batch.samples[0].input_ids[:12]]
    (chunk,) = micro_batches(firsts, 10_000, share_prefix=True)
    tensors = collate(chunk, pad_id=0, device=torch.device("cpu"))
    split = shared_prefix(tensors)
    assert 12 <= split <= int(tensors.loss_mask.any(0).nonzero()[0])
    assert not tensors.loss_mask[:, :split].any()


@pytest.mark.anyio
async def test_trainer_logprobs_match_vllms_at_the_sampling_temperature(
    llm: Callable[..., OpenAIChatClient], model_dir: Path
) -> None:
    completion = await llm().complete(
        [{"role": "user", "content": "Name three fruits and say why you like each."}],
        max_tokens=24, temperature=1.5, record_tokens=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = completion.prompt_token_ids + completion.completion_token_ids
    prompt = len(completion.prompt_token_ids)

    def gap(temperature: float) -> float:
        """Mean |trainer - server| logprob of the sampled tokens, scored at `temperature`."""
        sample = Sample(
            ids, [i >= prompt for i in range(len(ids))],
            [0.0] * prompt + completion.logprobs, 0.0, 0.0, "t", temperature=temperature,
        )  # fmt: skip
        tensors = collate([sample], pad_id=0, device=torch.device("cpu"))
        with torch.no_grad():
            logp = policy_logprobs(model, tensors)[tensors.loss_mask]
        return float((logp - tensors.behaviour[tensors.loss_mask]).abs().mean())

    assert len(completion.completion_token_ids) > 4
    assert gap(1.5) < 0.01  # the behaviour distribution itself, up to float error (< 1e-4)
    assert gap(1.0) > 0.1  # the untempered policy is another distribution (~1 nat a token)
