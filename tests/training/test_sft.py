"""SFT on CPU with SmolLM2: masks on the trained turns only, and a step that lowers the loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sentinel.config import TrainerSettings
from sentinel.training.policy import Policy
from sentinel.training.sft import TemplateError, tokenize
from tests import factories


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(model_dir)


def masked_runs(ids: list[int], mask: list[bool], tokenizer: object) -> list[str]:
    runs: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ids, mask, strict=True)):
        if on:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]  # type: ignore[attr-defined]


def test_the_loss_mask_covers_each_trained_turn_through_its_end_token(tokenizer: object) -> None:
    example = factories.sft_example()
    sample = tokenize(example, tokenizer)  # type: ignore[arg-type]
    runs = masked_runs(sample.input_ids, sample.loss_mask, tokenizer)
    assert len(runs) == 2
    assert runs[0].startswith("<tool_call>")
    assert '"zip": "19122"' in runs[0]
    assert runs[1].startswith("<tool_call>")
    assert "Which order?" in runs[1]
    for run in runs:
        assert run.endswith("</tool_call><|im_end|>")
        assert "<|im_start|>" not in run
        assert "Help the user" not in run
    text = tokenizer.decode(sample.input_ids)  # type: ignore[attr-defined]
    assert text.rstrip().endswith("<|im_end|>")  # nothing after the last trained turn
    assert "#W2378156" not in text


def test_an_example_the_template_cannot_mask_is_refused(tokenizer: object) -> None:
    reversed_order = (
        "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(TemplateError, match="does not render as an append"):
        tokenize(factories.sft_example(), tokenizer, reversed_order)  # type: ignore[arg-type]


def test_sft_steps_lower_the_loss_of_their_examples(model_dir: Path) -> None:
    policy = Policy(TrainerSettings(device="cpu", learning_rate=2e-3, seed=1), model_dir)
    examples = [factories.sft_example(), factories.sft_example()]
    reports = [policy.sft_step(examples) for _ in range(4)]
    assert [r.mode for r in reports] == ["sft"] * 4
    assert reports[0].examples == 2
    assert reports[0].tokens > 20
    assert policy.version == 4
    losses = [r.loss for r in reports]  # each step's loss before its update
    assert losses[-1] < 0.8 * losses[0], losses


def test_sft_renders_with_the_served_template_without_importing_the_server() -> None:
    """The template sits below serving and training: SFT does not pull in vLLM's launcher."""
    check = (
        "import sys, sentinel.training.sft as sft, sentinel.chat_template as t\n"
        "assert sft.default_template() == t.CHAT_TEMPLATE.read_text() != ''\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('sentinel.serving'))\n"
        "assert not loaded, loaded\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
