"""Supervised fine-tuning data and loss: LEAFE's corrected trajectories, the user model's turns.

An `SFTExample` is a conversation in the OpenAI chat format, rendered with the chat template
the server uses, so the model learns the text it will be prompted with. A token carries loss
when it belongs to one of the `trained` assistant messages: from after the assistant header
(the generation prompt) through the end-of-turn token. The spans come from rendering each
trained message's prefix with and without it, which works for any template whose renders
grow append-only (ChatML does; `{% generation %}` markers would need a template that has
them), and each span is tokenized on its own, as the server tokenizes a completion.

The samples reuse the GRPO machinery (micro-batches, the shared prefix run once), with the
loss being the token-mean negative log-likelihood of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from sentinel.chat_template import default_template as default_template  # re-exported
from sentinel.schemas import SFTExample
from sentinel.training.batch import Sample
from sentinel.training.grpo import LossStats, Tensors


class TemplateError(ValueError):
    """The chat template does not render a trained message as an append to its prefix."""


class Tokenizer(Protocol):
    eos_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


def _render(
    tokenizer: Tokenizer, example: SFTExample, end: int, template: str, prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(
        example.messages[:end], tools=example.tools or None, chat_template=template,
        tokenize=False, add_generation_prompt=prompt,
    )  # fmt: skip
    return str(text)


def trained_spans(
    example: SFTExample, tokenizer: Tokenizer, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation (through its last trained message) and the character span of
    each trained message's own text."""
    last = max(example.trained) + 1
    text = _render(tokenizer, example, last, template, prompt=False)
    spans: list[tuple[int, int]] = []
    for index in sorted(example.trained):
        before = _render(tokenizer, example, index, template, prompt=True)
        after = _render(tokenizer, example, index + 1, template, prompt=False)
        if not (after.startswith(before) and text.startswith(after)):
            raise TemplateError(f"{example.id}: message {index} does not render as an append")
        spans.append((len(before), len(after)))
    return text, spans


def tokenize(
    example: SFTExample, tokenizer: Tokenizer, template: str | None = None, group_id: str = ""
) -> Sample:
    """One sequence whose loss mask covers the trained messages' tokens, through the end of
    each turn (the eos token) and not the template's text after it. Each trained message is
    tokenized on its own, as the server tokenizes a prompt apart from its completion."""
    text, spans = trained_spans(example, tokenizer, template or default_template())
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for start, end in spans:
        pieces += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    pieces.append((text[cursor:], False))
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trained in pieces:
        tokens = list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []
        ids += tokens
        mask += [trained] * len(tokens)
    _end_at_eos(ids, mask, tokenizer.eos_token_id)
    return Sample(
        input_ids=ids, loss_mask=mask, behaviour_logprobs=[0.0] * len(ids), advantage=1.0,
        weight=0.0, trajectory_id=example.id, group_id=group_id,
    )  # fmt: skip


def _end_at_eos(ids: list[int], mask: list[bool], eos: int | None) -> None:
    """Within each masked run, unmask what follows the eos token (e.g. ChatML's newline)."""
    if eos is None:
        return
    after_eos = False
    for i, token in enumerate(ids):
        if not mask[i]:
            after_eos = False
        elif after_eos:
            mask[i] = False
        elif token == eos:
            after_eos = True


def weigh(samples: Sequence[Sample]) -> None:
    """Token-mean over the step: every loss token weighs 1 / (loss tokens in the step)."""
    total = sum(sum(s.loss_mask) for s in samples) or 1
    for sample in samples:
        sample.weight = 1.0 / total


def sft_loss(logp: torch.Tensor, batch: Tensors) -> tuple[torch.Tensor, LossStats]:
    """Negative log-likelihood of the loss tokens, weighted as the batch builder said."""
    mask = batch.loss_mask.float()
    loss = -(logp * mask * batch.weights).sum()
    tokens = int(mask.sum())
    return loss, LossStats(
        loss=float(loss.detach()), clip_fraction=0.0, mismatch_kl=0.0, tis_mean=1.0, tokens=tokens
    )
