"""User-model SFT data: gold-action dialogues of train tasks, seen as the user simulator sees
them, with loss on the user's own turns only. Built on tau2's mock domain (any pack's phrasing
makes them); retail's for a task with two writes to confirm."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sentinel.agents.user import is_stop
from sentinel.envs.base import Environment
from sentinel.schemas import SFTExample
from sentinel.training.sft import default_template, tokenize
from sentinel.usersim.dialogues import build_examples, script, user_view


@pytest.fixture(scope="module")
def examples(mock: Environment) -> list[SFTExample]:
    return build_examples(mock, mock.tasks("train"))


def test_examples_come_from_train_tasks_and_test_tasks_are_refused(
    mock: Environment, examples: list[SFTExample]
) -> None:
    train = {t.id for t in mock.tasks("train")}
    assert [e.task_id for e in examples] == [t.id for t in mock.tasks("train")]
    assert all(e.task_id in train and e.source == "user_model" and not e.tools for e in examples)
    with pytest.raises(ValueError, match="test-split"):
        build_examples(mock, mock.tasks("test")[:1])


def test_trained_messages_are_exactly_the_users_turns(
    mock: Environment, examples: list[SFTExample]
) -> None:
    for task, example in zip(mock.tasks("train"), examples, strict=True):
        dialogue = script(task, mock.write_tools)
        assert example.messages == user_view(mock.user_prompt(task), dialogue.messages)
        assert example.messages[0] == {"role": "system", "content": mock.user_prompt(task)}
        users = [m.content for m in dialogue.messages if m.role == "user"]
        assert [example.messages[i]["content"] for i in example.trained] == users
        assert [i for i, m in enumerate(example.messages) if m["role"] == "assistant"] == (
            example.trained
        )
        assert is_stop(dialogue.messages[-1])
        assert dialogue.messages[-1].role == "user"
        assert dialogue.messages[0].role == "assistant"  # the agent greets, as in rollouts


def test_gold_writes_are_confirmed_one_by_one(retail: Environment) -> None:
    task = next(t for t in retail.tasks("train") if t.id == "retail-4")  # two item changes
    dialogue = script(task, retail.write_tools)
    asks = [m.content or "" for m in dialogue.messages if "(yes/no)" in (m.content or "")]
    assert len(asks) == 2
    assert "#W6247578" in asks[0]
    assert "#W4776164" in asks[1]


def test_loss_mask_covers_the_user_turns_only(examples: list[SFTExample], model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for example in examples:
        sample = tokenize(example, tokenizer, default_template())
        masked = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
        turns = [example.messages[i]["content"] + "<|im_end|>" for i in example.trained]
        assert tokenizer.decode(masked) == "".join(turns)
        unmasked = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if not m]
        context = tokenizer.decode(unmasked)
        others = [m for i, m in enumerate(example.messages) if i not in example.trained]
        assert all(m["content"] in context for m in others)  # prompt and agent: context only
