"""Two trainers under torchrun (FSDP2, gloo on CPU) against one: the same loss and every
gradient of a GRPO update, LoRA and full, with and without the shared prefix; and a
checkpoint of two ranks resumed by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sentinel.training.distributed import full_optimizer, share
from sentinel.training.policy import Policy
from tests.training.distributed_step import CONFIGS, settings, step
from tests.training.test_algorithms import tiny_dir  # noqa: F401 (a fixture)
from tests.training.test_grpo import groups

ROOT = Path(__file__).parents[2]
HELPER = Path(__file__).with_name("distributed_step.py")


@pytest.fixture(scope="module")
def ranks(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """What rank 0 of `torchrun --nproc-per-node 2` wrote (distributed_step.py)."""
    out = tmp_path_factory.mktemp("ranks")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(HELPER), str(tiny_dir), str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    if done.returncode:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}")
    return out


def reference(*args: Any) -> dict[str, Any]:
    """The single-process step, on one thread as each rank runs (OMP_NUM_THREADS=1): with
    more, its matmuls sum in another order, and the float32 differences after two Adam
    updates outgrow the tolerance (it passed or failed by what an earlier test had set)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return step(*args)[1]
    finally:
        torch.set_num_threads(threads)


def assert_same_gradients(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want) >= 2  # two steps, one or more updates each
    for ours, theirs in zip(got, want, strict=True):
        assert ours.keys() == theirs.keys()
        for name, grad in theirs.items():
            assert grad.abs().max() > 0 or "lora_A" in name, name  # A: zero while B is
            # float32 sums in another order: <1e-6 of the tensor's largest entry in the first
            # update, up to 5e-6 two Adam updates later (which amplify the tiny gradients)
            atol = 3e-5 * float(grad.abs().max())
            torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=atol, msg=name)


def test_each_rank_takes_its_share_padded_to_the_same_count() -> None:
    assert share([0, 1, 2, 3, 4], 0, 2) == [(0, True), (2, True), (4, True)]
    assert share([0, 1, 2, 3, 4], 1, 2) == [(1, True), (3, True), (0, False)]
    assert share([7], 1, 2) == [(7, False)]
    assert share([], 0, 2) == []
    assert share([1, 2], 0, 1) == [(1, True), (2, True)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_compute_the_single_process_loss_and_gradients(
    ranks: Path,
    tiny_dir: Path,  # noqa: F811
    name: str,
) -> None:
    full, shared, updates = CONFIGS[name]
    want = reference(full, shared, tiny_dir, None, updates)
    got = torch.load(ranks / f"{name}.pt")
    for (loss, tokens, clip), (their_loss, their_tokens, their_clip) in zip(
        got["reports"], want["reports"], strict=True
    ):
        assert loss == pytest.approx(their_loss, rel=1e-6, abs=1e-12)
        assert (tokens, clip) == (their_tokens, pytest.approx(their_clip))
    assert_same_gradients(got["grads"], want["grads"])


@pytest.mark.slow
def test_an_averaged_gradient_would_be_caught(ranks: Path, tiny_dir: Path) -> None:  # noqa: F811
    """Dividing by the world size (FSDP's default) halves every gradient of the first update
    (Adam's first step hardly sees the scale, so the second differs less): the comparison
    above fails on it."""
    want = reference(True, False, tiny_dir, None)
    got = torch.load(ranks / "divided.pt")
    for name, grad in want["grads"][0].items():
        torch.testing.assert_close(got["grads"][0][name], grad / 2, rtol=1e-5, atol=1e-9)
    with pytest.raises(AssertionError):
        assert_same_gradients(got["grads"], want["grads"])


def assert_same_state(
    weights: dict[str, Any], optimizer: dict[str, Any], saved: dict[str, Any]
) -> None:
    """Weights and optimizer state (by parameter name) equal to what was saved, bit for bit."""
    assert weights.keys() == saved["weights"].keys()
    for key, weight in saved["weights"].items():
        assert torch.equal(weights[key].detach(), weight), key
    for ours, theirs in zip(
        optimizer["param_groups"], saved["optimizer"]["param_groups"], strict=True
    ):  # a tuple comes back a list
        assert ours | {"betas": list(ours["betas"])} == theirs | {"betas": list(theirs["betas"])}
    assert optimizer["state"].keys() == saved["optimizer"]["state"].keys() == weights.keys()
    for key, moments in saved["optimizer"]["state"].items():
        for moment, value in moments.items():
            assert torch.equal(optimizer["state"][key][moment], value), (key, moment)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora"])
def test_a_checkpoint_of_two_ranks_resumes_on_one(
    ranks: Path,
    tiny_dir: Path,  # noqa: F811
    name: str,
) -> None:
    saved = torch.load(ranks / f"state-{name}.pt")
    policy = Policy(settings(name == "full", False), tiny_dir)
    state = policy.restore(ranks / f"checkpoint-{name}")
    assert (policy.step, policy.version, state["note"]) == (2, 2, "ws2")
    trained = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    assert_same_state(trained, full_optimizer(policy.model, policy.optimizer), saved)
    report = policy.grpo_step(groups(shared=12))
    assert (report.step, report.policy_version) == (3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_ranks_resume_their_own_checkpoint(ranks: Path, name: str) -> None:
    saved = torch.load(ranks / f"state-{name}.pt")
    resumed = torch.load(ranks / f"state-{name}-resumed.pt")
    assert resumed["step"] == saved["step"] == 2
    assert_same_state(resumed["weights"], resumed["optimizer"], saved)


@pytest.mark.parametrize("full", [True, False])
def test_one_process_resumes_its_own_checkpoint_and_an_old_one(
    tiny_dir: Path,  # noqa: F811
    tmp_path: Path,
    full: bool,
) -> None:
    """Without torchrun nothing is sharded; the optimizer is saved by parameter name now, and
    a checkpoint from before (by index) still restores."""
    policy, _ = step(full, False, tiny_dir, None)
    policy.checkpoint(tmp_path / "new", {})
    old = tmp_path / "old"
    policy.checkpoint(old, {})
    torch.save(policy.optimizer.state_dict(), old / "optimizer.pt")  # by index
    for directory in (tmp_path / "new", old):
        resumed = Policy(settings(full, False), tiny_dir)
        resumed.restore(directory)
        assert (resumed.step, resumed.version) == (2, 2)
        for (name, got), (_, want) in zip(
            resumed.model.named_parameters(), policy.model.named_parameters(), strict=True
        ):
            assert torch.equal(got, want), name
        ours, theirs = resumed.optimizer.state_dict(), policy.optimizer.state_dict()
        assert ours["state"].keys() == theirs["state"].keys()
        for index, moments in theirs["state"].items():
            for moment, value in moments.items():
                assert torch.equal(ours["state"][index][moment], value), (index, moment)


def test_rank_0_leads_and_the_others_follow(ranks: Path) -> None:
    """Each collective call rank 0 makes (a step, a checkpoint, an adapter) is made by rank 1
    too, then rank 1 is dismissed: the trainer under torchrun (`sentinel trainer`)."""
    counters = [json.loads((ranks / f"led-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert counters == [{"step": 1, "version": 1}] * 2
    assert (ranks / "led-checkpoint" / "optimizer.pt").is_file()
    assert (ranks / "led-adapter" / "adapter_config.json").is_file()
