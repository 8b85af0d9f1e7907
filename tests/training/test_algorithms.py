"""The algorithm registry (GRPO, RLOO, Dr. GRPO) on hand-computed groups, Dr. GRPO's loss
against TRL's formula, and several optimizer updates per step (PPO mini-batches)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sentinel.config import TrainerSettings
from sentinel.schemas import RolloutGroup
from sentinel.training.algorithms import ALGORITHMS, GRPO, RLOO, DrGRPO, algorithm
from sentinel.training.batch import build_batch, micro_batches
from sentinel.training.grpo import LossConfig, collate, grpo_loss, policy_logprobs
from sentinel.training.policy import Policy
from tests import factories
from tests.training.test_grpo import groups, tiny_model

EPS = 1e-6


def group(rewards: list[float], first: int = 0) -> RolloutGroup:
    trajectories = [factories.trajectory(first + i, r) for i, r in enumerate(rewards)]
    return RolloutGroup(task_id="t", policy_version=0, trajectories=trajectories)


def test_grpo_centres_and_scales_by_the_group_or_batch_std() -> None:
    # mean 0.5, population std 0.5: +-0.5 / 0.5
    assert GRPO("group").score_group([1.0, 0.0, 0.0, 1.0]) == pytest.approx(
        [0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS)], abs=0
    )
    assert GRPO("none").score_group([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    # batch: [0.5, -0.5] and [0.25, -0.25] over one std, sqrt(mean(a^2)) = sqrt(0.15625)
    data = [group([1.0, 0.0]), group([0.5, 0.0], first=2)]
    std = 0.15625**0.5
    assert list(GRPO("batch").advantages(data).values()) == pytest.approx(
        [0.5 / (std + EPS), -0.5 / (std + EPS), 0.25 / (std + EPS), -0.25 / (std + EPS)]
    )


def test_rloo_subtracts_the_mean_of_the_others() -> None:
    assert RLOO().score_group([1.0, 0.0, 0.0, 0.0]) == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert RLOO().score_group([1.0, 0.5, 0.0]) == pytest.approx([0.75, 0.0, -0.75])
    assert RLOO().score_group([1.0]) == [0.0]


def test_dr_grpo_centres_without_std_and_weighs_every_token_alike() -> None:
    assert DrGRPO(100).score_group([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert DrGRPO(100).weights({"a": 3, "b": 50}) == {"a": 1 / 200, "b": 1 / 200}
    assert GRPO().weights({"a": 3, "b": 1}) == {"a": 0.25, "b": 0.25}
    assert RLOO("sequence_mean").weights({"a": 4, "b": 1}) == {"a": 1 / 8, "b": 1 / 2}


def test_the_registry_builds_each_by_name_and_refuses_unknown_ones() -> None:
    assert set(ALGORITHMS) == {"grpo", "rloo", "dr_grpo"}
    for name in ALGORITHMS:
        assert algorithm(TrainerSettings(algorithm=name)).name == name
    assert algorithm(TrainerSettings(algorithm="dr_grpo", dr_grpo_max_tokens=7)).max_tokens == 7  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match=r"unknown algorithm 'ppo'; registered: dr_grpo, gr"):
        TrainerSettings(algorithm="ppo")


def test_dr_grpo_loss_is_trls_formula() -> None:
    """TRL 1.16 `loss_type="dr_grpo"`: sum(per_token_loss * mask) / (B * max_completion_length),
    with advantages r - mean(group) (scale_rewards="none"); one row per trajectory here."""
    data = groups()[:2]
    for g in data:
        for t in g.trajectories:
            t.turns = [t.turns[0]]  # one turn: one row, as TRL's completions
    batch = build_batch(
        data, current_version=3, max_staleness=2, scale="group", aggregation="token_mean",
        algorithm=DrGRPO(max_tokens=16),
    )  # fmt: skip
    tensors = collate(batch.samples, pad_id=0, device=torch.device("cpu"))
    logp = policy_logprobs(tiny_model(), tensors).detach().requires_grad_(True)
    old = (logp + 0.3 * torch.randn_like(logp) * tensors.loss_mask).detach()  # ratio != 1
    ours, _ = grpo_loss(logp, old, tensors, LossConfig(tis_cap=None))

    rewards = [torch.tensor(g.rewards) for g in data]
    advantages = torch.cat([r - r.mean() for r in rewards]).unsqueeze(1)  # TRL's order = ours
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    mask = tensors.loss_mask.float()
    trl = (per_token_loss * mask).sum() / (per_token_loss.size(0) * 16)
    torch.testing.assert_close(tensors.advantages, advantages)
    torch.testing.assert_close(ours, trl)


@pytest.fixture(scope="module")
def tiny_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Llama beside SmolLM2's tokenizer (its vocabulary)."""
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for extra in model_dir.glob("*.jinja"):
        shutil.copy(extra, directory)
    return directory


def settings(**overrides: object) -> TrainerSettings:
    base: dict[str, object] = {
        "device": "cpu", "learning_rate": 5e-2, "full_finetune": True, "share_prefix": False,
    }  # fmt: skip
    return TrainerSettings.model_validate(base | overrides)


def test_one_update_per_step_is_the_single_step_as_before(tiny_dir: Path) -> None:
    """updates_per_batch=1: the step's parameters equal one accumulated step of the loss with
    the live logprobs as the old ones (the trainer before the registry), bit for bit."""
    data = groups(shared=12)
    policy = Policy(settings(), tiny_dir)
    before = Policy(settings(), tiny_dir)
    batch = build_batch(
        data, current_version=0, max_staleness=4, scale="group", aggregation="token_mean"
    )
    before.optimizer.zero_grad()
    for micro in micro_batches(batch.samples, before.settings.micro_batch_tokens):
        tensors = collate(micro, before.pad_id, before.device)
        logp = policy_logprobs(before.model, tensors)
        grpo_loss(logp, logp.detach(), tensors, before.loss_config)[0].backward()
    torch.nn.utils.clip_grad_norm_(before.model.parameters(), 1.0)
    before.optimizer.step()
    report = policy.grpo_step(data)
    assert (report.step, report.policy_version, len(policy.last_updates)) == (1, 1, 1)
    for (name, got), want in zip(
        policy.model.named_parameters(), before.model.parameters(), strict=True
    ):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("share_prefix", [False, True])  # True: rows of the proximal sliced
def test_later_updates_of_a_step_clip_against_the_policy_before_it(
    tiny_dir: Path, share_prefix: bool
) -> None:
    clip = {"epsilon_low": 0.01, "epsilon_high": 0.01}
    policy = Policy(settings(updates_per_batch=2, share_prefix=share_prefix, **clip), tiny_dir)
    report = policy.grpo_step(groups(shared=6))
    first, second = policy.last_updates
    assert first.clip_fraction == 0.0  # the proximal policy is the one being trained: ratio 1
    assert second.clip_fraction > 0  # one update later the ratio moved past 1 +- 0.01
    assert (report.step, report.policy_version) == (1, 1)  # a step counts once
    assert report.clip_fraction == pytest.approx(
        (first.clip_fraction * first.tokens + second.clip_fraction * second.tokens)
        / (first.tokens + second.tokens)
    )
    assert report.tokens == first.tokens + second.tokens


def test_each_mini_batch_is_weighed_as_a_step_of_its_own(tiny_dir: Path) -> None:
    policy = Policy(settings(updates_per_batch=2), tiny_dir)
    batch = build_batch(
        groups(), current_version=0, max_staleness=4, scale="group", aggregation="token_mean"
    )
    minis = policy._mini_batches(batch.samples)
    assert len(minis) == 2
    assert sorted(s.trajectory_id for m in minis for s in m) == sorted(
        s.trajectory_id for s in batch.samples
    )
    for mini in minis:
        assert sum(s.weight * sum(s.loss_mask) for s in mini) == pytest.approx(1.0)


def test_coupled_ppo_clips_around_the_servers_logprobs(tiny_dir: Path) -> None:
    """decoupled=False: the ratio is against the behaviour logprobs, which the random tiny
    model is far from, so even a single update clips."""
    policy = Policy(settings(decoupled=False), tiny_dir)
    policy.grpo_step(groups())
    assert policy.last_updates[0].clip_fraction > 0.5
    assert policy.last_updates[0].tis_mean == 1.0  # the ratio carries it: no TIS on top
