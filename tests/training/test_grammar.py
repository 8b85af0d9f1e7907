"""The grammar replay's bookkeeping: masks line up with the loss positions, row by row.
(That the masked scores equal vLLM's is tested against the server in
tests/agents/test_transcript.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from sentinel.schemas.trajectory import Grammar
from sentinel.training.batch import Sample
from sentinel.training.grammar import GrammarReplay, unpacked
from sentinel.training.grpo import collate, rows

YES_OR_NO = Grammar(kind="regex", spec="(yes|no), (yes|no)")
SURE = Grammar(kind="regex", spec="(sure|fine)!")


@pytest.fixture(scope="module")
def replay(model_dir: Path) -> GrammarReplay:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    return GrammarReplay(tokenizer, vocab, [tokenizer.eos_token_id])


def sample(replay: GrammarReplay, prompt: str, answer: str, grammar: Grammar = YES_OR_NO) -> Sample:
    encode = replay.tokenizer.encode
    head, tail = encode(prompt), encode(answer)
    ids = head + tail
    mask = [False] * len(head) + [True] * len(tail)
    span = (len(head), len(ids), grammar)
    return Sample(ids, mask, [0.0] * len(ids), 1.0, 1.0, prompt, guided=[span])


def test_each_rows_masks_are_its_own_loss_positions(replay: GrammarReplay) -> None:
    first = sample(replay, "Agreed?", "sure!", SURE)  # another grammar: masks of its own
    second = sample(replay, "Answer twice, please, now:", "no, no")
    free = Sample([1, 2, 3], [False, True, True], [0.0] * 3, 1.0, 1.0, "free")
    batch = collate([first, free, second], 0, torch.device("cpu"), replay)
    assert batch.allowed is not None
    assert batch.allowed.shape[0] == int(batch.loss_mask.sum())
    alone = collate([second], 0, torch.device("cpu"), replay).allowed
    assert torch.equal(rows(batch, slice(2, 3)).allowed, alone)
    assert bool(rows(batch, slice(1, 2)).allowed.all())  # free sampling: all allowed
    comma = replay.tokenizer.encode(",")[0]
    opened = alone[0]  # before "no": the grammar allows "yes"/"no" starts, not a comma
    assert not bool(opened[comma])
    assert int(opened.sum()) < 50


def test_a_token_the_grammar_refuses_leaves_the_turn_unmasked(replay: GrammarReplay) -> None:
    wrong = sample(replay, "Answer:", "maybe")
    assert replay.bitmasks(YES_OR_NO, wrong.input_ids[-2:]) is None
    batch = collate([wrong], 0, torch.device("cpu"), replay)
    assert batch.allowed is not None
    assert bool(batch.allowed.all())


def test_unpacking_reads_xgrammars_bit_order() -> None:
    packed = torch.tensor([[0b101, -(2**31)]], dtype=torch.int32)  # bits 0, 2 and 63
    assert unpacked(packed, 64)[0].nonzero().flatten().tolist() == [0, 2, 63]


def test_a_compact_json_grammar_forces_the_separators_free_whitespace_leaves_open(
    replay: GrammarReplay,
) -> None:
    """As vLLM compiles with `disable_any_whitespace`: after the colon no space or newline is
    allowed, where the free grammar allows both; a spaced answer is refused."""
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    compact, free = (Grammar(kind="json", spec=schema, compact=c) for c in (True, False))
    tokenizer = replay.tokenizer
    tight = tokenizer.encode('{"a":1}')
    after_colon = [tokenizer.decode([t]) for t in tight].index('":') + 1
    free_masks, compact_masks = replay.bitmasks(free, tight), replay.bitmasks(compact, tight)
    assert free_masks is not None
    assert compact_masks is not None
    allowed_free, allowed_compact = (
        unpacked(m, replay.vocab_size)[after_colon] for m in (free_masks, compact_masks)
    )
    for gap in (" ", "\n"):
        [token] = tokenizer.encode(gap)
        assert bool(allowed_free[token])
        assert not bool(allowed_compact[token])
    assert replay.bitmasks(free, tokenizer.encode('{"a": 1}')) is not None
    assert replay.bitmasks(compact, tokenizer.encode('{"a": 1}')) is None
