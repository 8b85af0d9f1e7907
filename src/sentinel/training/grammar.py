"""The grammar a guided turn was sampled under, replayed: which tokens it allowed, where.

Under guided decoding vLLM masks the logits before sampling and reports the logprobs of the
masked, tempered distribution. For the trainer to score that same distribution (a PPO ratio
of exactly 1 on-policy, importance weights that compare like with like), it masks its own
logits with the same grammar at the same positions. xgrammar is vLLM's default backend; the
grammar is compiled here as vLLM compiles it (`backend_xgrammar.py`: a JSON schema with any
whitespace unless the server disables it, which the Grammar records; a regex as is; the
request's stop tokens), on the trainer's tokenizer, which is the served one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sentinel.logs import get_logger

if TYPE_CHECKING:
    from sentinel.schemas.trajectory import Grammar

log = get_logger(__name__)

# What vLLM passes xgrammar with `disable_any_whitespace` (backend_xgrammar.py).
COMPACT_SEPARATORS = (",", ":")


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a turn, as vLLM gathers them: the tokenizer's end of text and
    the generation config's."""
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id}
    return sorted(s for s in stops if s is not None)


class GrammarReplay:
    """Token bitmasks of a sampled span under its grammar, on one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)

    def bitmasks(self, grammar: Grammar, token_ids: list[int]) -> torch.Tensor | None:
        """[len(token_ids), ceil(vocab/32)] int32: the tokens allowed before each sampled one.
        None when the grammar refuses a sampled token: it is not what the server ran."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(
            self._compiled(grammar), override_stop_tokens=self.stop_token_ids
        )
        masks = xgr.allocate_token_bitmask(len(token_ids), self.vocab_size)
        for index, token in enumerate(token_ids):
            matcher.fill_next_token_bitmask(masks, index)
            if not matcher.accept_token(token):
                log.warning("a sampled token breaks its grammar; scored unmasked", at=index)
                return None
        return masks

    def _compiled(self, grammar: Grammar) -> Any:
        """Compiled once: the compiler caches by spec (one tool schema serves a whole run)."""
        if grammar.kind == "json":
            return self.compiler.compile_json_schema(
                grammar.spec,
                any_whitespace=not grammar.compact,
                separators=COMPACT_SEPARATORS if grammar.compact else None,
            )
        return self.compiler.compile_regex(grammar.spec)


def mask_logits(logits: torch.Tensor, bitmasks: torch.Tensor) -> torch.Tensor:
    """`logits` [N, V] with every token the grammar refused at -inf (V may exceed the
    tokenizer's vocabulary: the padding rows are refused too)."""
    import xgrammar as xgr

    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmasks.to(logits.device))
    return masked


def unpacked(bitmasks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's int32 bitmask rows as booleans over the vocabulary: [N, vocab_size]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmasks.device)
    bits = (bitmasks.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmasks.shape[0], -1)[:, :vocab_size].bool()


def allowed_rows(
    rows: Sequence[tuple[list[int], list[bool], list[tuple[int, int, Grammar]]]],
    replay: GrammarReplay,
) -> torch.Tensor:
    """The tokens allowed at each loss position of `rows` (input ids, loss mask, guided
    spans), in the order the trainer gathers its loss positions (row by row, left to right):
    a guided turn's grammar where one applies, every token elsewhere. [N, vocab_size]."""
    allowed: list[torch.Tensor] = []
    for ids, loss_mask, guided in rows:
        row = torch.ones(len(ids), replay.vocab_size, dtype=torch.bool)
        for start, end, grammar in guided:
            masks = replay.bitmasks(grammar, ids[start:end])
            if masks is not None:  # else scored unmasked (logged): no worse than before
                row[start:end] = unpacked(masks, replay.vocab_size)
        allowed.append(row[torch.tensor(loss_mask, dtype=torch.bool)])
    return torch.cat(allowed)
