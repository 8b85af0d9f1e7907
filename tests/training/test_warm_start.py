"""Agent SFT before RL on the mock domain: grounded dialogues, assistant-only masks, a TRL
SFT step on SmolLM2 (CPU) that lowers their loss, and the adapter served as policy-v1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from sentinel.agents.llm import OpenAIChatClient
from sentinel.chat_template import default_template
from sentinel.config import LLMEndpoint, Settings, SFTSettings, TrainerSettings
from sentinel.envs.base import Environment
from sentinel.schemas import TerminationReason
from sentinel.training.publisher import LoRAPublisher, loaded_adapters, unload_adapter
from sentinel.training.warm_start import (
    Grounded,
    Row,
    WarmStartError,
    assistant_masks,
    check_renders,
    converse,
    fine_tune,
    publish,
    render,
    solver_for,
    synthesise,
    training_template,
)
from tests.training.test_sft import masked_runs


@pytest.fixture(scope="module")
def dialogues(mock: Environment) -> tuple[list[Grounded], list[str]]:
    return synthesise(mock, mock.tasks("train"))


@pytest.fixture(scope="module")
def rows(mock: Environment, dialogues: tuple[list[Grounded], list[str]]) -> list[Row]:
    solver = solver_for(mock, Settings().rollout)
    return [render(solver, g) for g in dialogues[0]]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def test_every_tool_result_is_the_environments_and_the_replay_earns_reward_1(
    mock: Environment, dialogues: tuple[list[Grounded], list[str]]
) -> None:
    kept, dropped = dialogues
    assert len(kept) >= 3
    for grounded in kept:
        task, messages = grounded.task, grounded.messages
        calls = [c for m in messages for c in m.tool_calls]
        assert [(c.name, c.arguments) for c in calls] == [
            (a.name, a.arguments) for a in task.agent_actions
        ]
        episode = mock.episode(task)
        results = {m.tool_call_id: m for m in messages if m.role == "tool"}
        for call in calls:  # replayed on a fresh episode: the same answers
            result = episode.step(call)
            assert (results[call.id].content, results[call.id].error) == (
                result.content, result.error
            )  # fmt: skip
        replayed = mock.replay(task, calls)
        assert mock.reward(task, replayed, messages, TerminationReason.USER_STOP).reward == 1.0
        assert messages[-1].role == "user"
        assert "###STOP###" in (messages[-1].content or "")
    for task_id in dropped:  # kept out because a scripted dialogue cannot earn its reward
        task = next(t for t in mock.tasks("train") if t.id == task_id)
        assert converse(mock, task).reward < 1.0


def test_no_test_split_task_is_synthesised(
    mock: Environment, dialogues: tuple[list[Grounded], list[str]]
) -> None:
    test_tasks = mock.tasks("test")
    assert not {g.task.id for g in dialogues[0]} & {t.id for t in test_tasks}
    with pytest.raises(ValueError, match="test-split"):
        synthesise(mock, [*mock.tasks("train"), test_tasks[0]])
    relabelled = test_tasks[0].model_copy(
        update={"provenance": test_tasks[0].provenance.model_copy(update={"split": "train"})}
    )
    with pytest.raises(ValueError, match="test-split"):  # a test task's id under any split
        synthesise(mock, [relabelled])


def _sampled_texts(tokenizer: Any, messages: list[dict[str, Any]], tools: Any) -> list[str]:
    """What the model samples for each assistant turn under the served template: the text
    after the generation prompt, through <|im_end|>."""
    texts = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = (
            tokenizer.apply_chat_template(
                messages[:end], tools=tools, chat_template=default_template(), tokenize=False,
                add_generation_prompt=end == i,
            )
            for end in (i, i + 1)
        )  # fmt: skip
        assert after.startswith(before)
        texts.append(after[len(before) :].removesuffix("\n"))
    return texts


def test_assistant_only_masks_cover_exactly_the_assistant_turns(
    tokenizer: Any, rows: list[Row]
) -> None:
    served = default_template()
    training = training_template(served)
    check_renders(tokenizer, rows, served, training)  # the same text as served
    for row in rows:
        ids, mask = assistant_masks(tokenizer, row, training)
        expected = _sampled_texts(tokenizer, row["messages"], json.loads(row["tools"]))
        assert masked_runs(ids, mask, tokenizer) == expected
        assert all(text.endswith("<|im_end|>") for text in expected)


def test_a_template_without_chatml_assistant_turns_is_refused() -> None:
    with pytest.raises(WarmStartError):
        training_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.anyio
async def test_sft_lowers_the_loss_and_the_adapter_is_served_as_policy_v1(
    rows: list[Row],
    model_dir: Path,
    policy_url: str,
    policy_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    from sentinel.training.policy import Policy

    # one dialogue, one step: the CI's CPU budget; the loss is measured on that dialogue
    settings = Settings(
        run_dir=tmp_path, sft=SFTSettings(epochs=1, batch_size=1, learning_rate=1e-3)
    )
    policy = Policy(TrainerSettings(device="cpu"), model_dir)
    fit = fine_tune(policy, rows[:1], settings, tmp_path / "trl")
    print("warm start loss:", round(fit.loss_before, 4), "->", round(fit.loss_after, 4))
    assert fit.steps == 1
    assert fit.loss_after < fit.loss_before
    adapters = tmp_path / "adapters"
    publisher = LoRAPublisher(adapters, [policy_url], "smol", headers=policy_headers)
    version = await publish(policy, publisher, tmp_path / "checkpoints", fit)
    try:
        assert version.served_name == "policy-v1"
        assert version.version == 1
        assert "policy-v1" in await loaded_adapters(policy_url, adapters, headers=policy_headers)
        await _assert_differs_from_base(policy_url, rows[0]["messages"][:2])
        state = json.loads((tmp_path / "checkpoints" / "step-1" / "trainer_state.json").read_text())
        assert (state["step"], state["version"]) == (1, 1)  # the trainer resumes RL from here
    finally:  # a shared server has few LoRA slots (serve.max_loras)
        await unload_adapter(policy_url, "policy-v1", headers=policy_headers)


async def _assert_differs_from_base(url: str, prompt: list[dict[str, Any]]) -> None:
    logprobs = []
    for model in ("smol", "policy-v1"):
        client = OpenAIChatClient(LLMEndpoint(base_url=url, model=model))
        try:
            completion = await client.complete(
                prompt, max_tokens=8, temperature=0, record_tokens=True
            )
        finally:
            await client.aclose()
        logprobs.append(completion.logprobs)
    assert logprobs[0] != logprobs[1]


def test_sft_dry_run_writes_the_dialogues_and_refuses_a_started_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sentinel.cli import app

    monkeypatch.setenv("SENTINEL_ENV__DOMAIN", "mock")
    monkeypatch.setenv("SENTINEL_RUN_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["sft", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "warm_start" / "dialogues.jsonl").read_text().splitlines()
    assert len(lines) >= 3
    assert all(json.loads(line)["messages"][0]["role"] == "system" for line in lines)
    (tmp_path / "trainer" / "checkpoints" / "step-3").mkdir(parents=True)
    result = runner.invoke(app, ["sft"])
    assert result.exit_code == 1
    assert "before RL" in result.stderr


def test_up_runs_the_warm_start_once_and_only_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from sentinel.cli import sft

    ran: list[list[str]] = []

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        ran.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    config = tmp_path / "config.yaml"
    sft.warm_start_before_rl(Settings(run_dir=tmp_path), config, {})
    assert ran == []  # loop.warm_start: none
    settings = Settings.model_validate({"run_dir": tmp_path, "loop": {"warm_start": "sft"}})
    sft.warm_start_before_rl(settings, config, {})
    assert ran[-1][-3:] == ["--config", str(config), "sft"]
    (tmp_path / "trainer" / "checkpoints" / "step-1").mkdir(parents=True)
    sft.warm_start_before_rl(settings, config, {})  # a resumed run: RL already started
    assert len(ran) == 1
