"""The policy-gradient objective on padded token tensors (every algorithm's: see
training.algorithms for the advantages and weights).

Per loss token t with advantage A (the trajectory's), trainer logprob log p, the trainer's
logprob before this step's first update log p_old (the proximal policy), and the server's
behaviour logprob log mu:

    ratio = exp(log p - log p_old)
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    tis   = min(exp(log p_old - log mu), cap)            (truncated IS, detached)
    kl    = exp(log ref - log p) - (log ref - log p) - 1  (k3, only when beta > 0)
    loss  = sum_t weight_t * (tis * pg + beta * kl)

`weight` comes from the batch builder and encodes the aggregation (token-mean or
sequence-mean over the whole step), so micro-batches simply add up. TIS corrects for the
server sampling from slightly different weights than the trainer holds (bf16 kernels, a policy
a few versions old), as in TRL's `vllm_importance_sampling_correction`. With one update per
step p_old is p itself (detached: the ratio is 1); with several, p_old is recomputed before the
first and held, so later updates clip: AReaL's decoupled PPO, TIS being its truncated
behaviour -> proximal weight. `reference` picks p_old, or mu for plain (coupled) PPO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from sentinel.training.batch import Sample
from sentinel.training.distributed import share
from sentinel.training.grammar import GrammarReplay, allowed_rows

GREEDY_BELOW = 1e-5  # vLLM's sampling epsilon


@dataclass
class LossConfig:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    tis_cap: float | None = 2.0
    kl_beta: float = 0.0


@dataclass
class Tensors:
    """A micro-batch, right-padded; per-token arrays are aligned to target positions."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T-1] bool: target position t+1 was sampled by the policy
    behaviour: torch.Tensor  # [B, T-1]
    advantages: torch.Tensor  # [B, 1]
    weights: torch.Tensor  # [B, 1] per loss token
    temperatures: torch.Tensor  # [B, 1] each row's sampling temperature
    # [B, T-1] the trainer's logprobs before the step's first update (several updates only)
    proximal: torch.Tensor | None = None
    # [loss tokens, V] bool: what the grammar allowed at each loss position (guided turns)
    allowed: torch.Tensor | None = None


def collate(
    samples: list[Sample], pad_id: int, device: torch.device, replay: GrammarReplay | None = None
) -> Tensors:
    """Samples as padded tensors; with a `replay`, guided turns' grammars as masks."""
    width = max(len(s.input_ids) for s in samples)
    allowed = None
    if replay is not None and any(s.guided for s in samples):
        guided = [(s.input_ids, s.loss_mask, s.guided) for s in samples]
        allowed = allowed_rows(guided, replay).to(device)

    def padded(rows: list[list[float]] | list[list[int]] | list[list[bool]], fill: float) -> list:  # type: ignore[type-arg]
        return [list(r) + [fill] * (width - len(r)) for r in rows]

    ids = torch.tensor(padded([s.input_ids for s in samples], pad_id), dtype=torch.long)
    attention = torch.tensor(padded([[1] * len(s.input_ids) for s in samples], 0))
    mask = torch.tensor(padded([s.loss_mask for s in samples], False), dtype=torch.bool)
    behaviour = torch.tensor(padded([s.behaviour_logprobs for s in samples], 0.0))
    return Tensors(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        loss_mask=mask[:, 1:].to(device),
        behaviour=behaviour[:, 1:].float().to(device),
        advantages=torch.tensor([[s.advantage] for s in samples]).float().to(device),
        weights=torch.tensor([[s.weight] for s in samples]).float().to(device),
        temperatures=torch.tensor([[_temperature(s.temperature)] for s in samples]).to(device),
        allowed=allowed,
    )


def _temperature(value: float) -> float:
    """As vLLM samples: a temperature near 0 is greedy, and its logprobs are untempered."""
    return value if value >= GREEDY_BELOW else 1.0


def policy_logprobs(model: torch.nn.Module, batch: Tensors) -> torch.Tensor:
    """log p(x_{t+1} | x_<=t) at the loss positions, 0 elsewhere: [B, T-1], float32.

    p is the policy at each row's sampling temperature, as vLLM's processed logprobs (the
    behaviour logprobs) are: the ratio and the truncated importance weights then compare
    like with like, and the update is on-policy for the distribution that was sampled.

    The vocabulary projection runs only where there is loss: a 5k-token prompt with a
    49k vocabulary would otherwise cost ~1 GB of logits per sequence for a few dozen tokens.
    """
    return _logprobs(_base(model), batch)


def _base(model: torch.nn.Module) -> Any:
    """The causal LM under a peft wrapper (its `.model` and `.lm_head`)."""
    unwrapped: Any = model
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


def _logprobs(
    base: Any, batch: Tensors, split: int = 0, kv: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """`policy_logprobs`, for rows whose first `split` tokens are cached in `kv` if given."""
    if kv is None:
        out = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    else:
        count, width = batch.input_ids.shape
        cache = DynamicCache(
            ddp_cache_data=[
                (kv[i].expand(count, -1, -1, -1), kv[i + 1].expand(count, -1, -1, -1))
                for i in range(0, len(kv), 2)
            ]
        )
        positions = torch.arange(split, width, device=batch.input_ids.device).expand(count, -1)
        out = base.model(
            input_ids=batch.input_ids[:, split:], attention_mask=batch.attention_mask,
            past_key_values=cache, position_ids=positions,
        )  # fmt: skip
    loss_mask = batch.loss_mask[:, split:]
    logits = base.lm_head(out.last_hidden_state[:, :-1][loss_mask]).float()
    logits = logits / batch.temperatures.expand_as(loss_mask)[loss_mask].unsqueeze(-1)
    if batch.allowed is not None:  # as vLLM sampled: the grammar's refusals at -inf
        logits = logits.masked_fill(~batch.allowed, float("-inf"))
    targets = batch.input_ids[:, split + 1 :][loss_mask]
    picked = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=picked.device)
    return logp.masked_scatter(batch.loss_mask, picked)


def shared_prefix(batch: Tensors) -> int:
    """Leading positions every row shares and no row has loss on (hidden state included)."""
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    same = (ids == ids[:1]).all(0) & mask.all(0)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else ids.shape[1]
    lossy = batch.loss_mask.any(0).nonzero()  # index j: the hidden state at j has loss
    first_loss = int(lossy[0]) if len(lossy) else ids.shape[1] - 1
    return max(0, min(common, first_loss))


Loss = Callable[[torch.Tensor, Tensors], tuple[torch.Tensor, "LossStats"]]


def rows(batch: Tensors, index: slice) -> Tensors:
    """Some rows of a micro-batch, without the padding they do not need."""
    width = int(batch.attention_mask[index].sum(1).max())
    proximal, allowed = batch.proximal, batch.allowed
    if allowed is not None:  # its rows are loss positions, row after row
        before = int(batch.loss_mask[: index.start].sum()) if index.start else 0
        allowed = allowed[before : before + int(batch.loss_mask[index].sum())]
    return Tensors(
        batch.input_ids[index, :width], batch.attention_mask[index, :width],
        batch.loss_mask[index, : width - 1], batch.behaviour[index, : width - 1],
        batch.advantages[index], batch.weights[index], batch.temperatures[index],
        None if proximal is None else proximal[index, : width - 1], allowed,
    )  # fmt: skip


def silenced(batch: Tensors) -> Tensors:
    """The rows with zero weight: they run (and take part in collectives) but train nothing."""
    return replace(batch, weights=torch.zeros_like(batch.weights))


def backward_sharing_prefix(
    model: torch.nn.Module,
    batch: Tensors,
    loss: Loss,
    chunk_tokens: int,
    rank: int = 0,
    size: int = 1,
) -> list[LossStats]:
    """Backpropagate `loss` over the batch with the rows' common prefix run once (a rollout
    group's system prompt and tools: thousands of tokens).

    The prefix's keys and values are computed once (`prefix_kv`: checkpointed layer by layer)
    and given to chunks of rows (at most `chunk_tokens` padded tokens after the prefix, at
    least one row) as detached leaves; each chunk's forward and backward frees its own
    activations and leaves its gradient on the leaves, which finally flows back through the
    prefix once. Exact, and memory-bounded by the chunk and a hidden state per prefix layer.
    Without a common prefix the chunks simply run whole. Among `size` trainers, every rank
    runs the prefix and its share of the chunks (`distributed.share`: padded with zero
    weight), the figures of its own."""
    split = shared_prefix(batch) if batch.input_ids.shape[0] > 1 else 0
    split = split if split >= 2 else 0
    base = _base(model)
    with _caches_kept(base.model):
        computed = prefix_kv(base.model, batch.input_ids[:1, :split]) if split else []
        leaves = [t.detach().requires_grad_() for t in computed]
        stats: list[LossStats] = []
        for index, real in share(_chunks(batch, split, chunk_tokens), rank, size):
            chunk = rows(batch, index) if real else silenced(rows(batch, index))
            logp = _logprobs(base, chunk, split, leaves if split else None)
            value, chunk_stats = loss(logp, chunk)
            value.backward()  # type: ignore[no-untyped-call]
            stats += [chunk_stats] if real else []
        grads = [
            (t, leaf.grad)
            for t, leaf in zip(computed, leaves, strict=True)
            if leaf.grad is not None and t.requires_grad  # frozen layers (LoRA) need none
        ]
        if grads:  # the prefix's layers are recomputed here, one at a time
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
    return stats


def prefix_kv(inner: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """The keys and values of every layer over `ids` (one unpadded row), differentiable but
    checkpointed a layer at a time: backward recomputes each layer's activations as it
    reaches it. Holding them all for a 5.5k-token tau2 prompt took 8 GB and 78 s on CPU
    (SmolLM2-135M) against 10 s for the plain forward; now it holds a hidden state a layer.

    Written over the decoder's own parts (embeddings, rotary, mask, layers) as HF's
    Llama-family models compose them, because HF's own checkpointing drops the cache."""
    embeds = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = create_causal_mask(
        config=inner.config, inputs_embeds=embeds, attention_mask=None,
        past_key_values=None, position_ids=positions,
    )  # fmt: skip
    rotary = inner.rotary_emb(embeds, position_ids=positions)
    hidden, kv = embeds, []
    for layer in inner.layers[: inner.config.num_hidden_layers]:
        hidden, keys, values = checkpoint(
            _layer_kv, layer, hidden, mask, rotary, positions, use_reentrant=False
        )
        kv += [keys, values]
    return kv


def _layer_kv(
    layer: Any, hidden: torch.Tensor, mask: Any, rotary: Any, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer on a fresh cache (a recompute must see no past): output, K, V."""
    cache = DynamicCache()
    out = layer(
        hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
        past_key_values=cache, use_cache=True,
    )  # fmt: skip
    own = cache.layers[layer.self_attn.layer_idx]
    return out, own.keys, own.values


@contextmanager
def _caches_kept(inner: Any) -> Iterator[None]:
    """HF's gradient checkpointing off for the shared-prefix pass: it drops a layer's cache,
    so the chunks would silently attend past nothing. The prefix is checkpointed here
    instead, and a chunk's activations are bounded by `chunk_tokens`."""
    layers = [layer for layer in inner.layers if getattr(layer, "gradient_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def _chunks(batch: Tensors, split: int, chunk_tokens: int) -> list[slice]:
    """Consecutive rows whose padded width after `split` stays within `chunk_tokens`."""
    widths = (batch.attention_mask.sum(1) - split).tolist()
    chunks: list[slice] = []
    start = 0
    for end in range(1, len(widths) + 1):
        if end == len(widths) or max(widths[start : end + 1]) * (end + 1 - start) > chunk_tokens:
            chunks.append(slice(start, end))
            start = end
    return chunks


@dataclass
class LossStats:
    loss: float
    clip_fraction: float
    mismatch_kl: float  # k3 estimate of KL(server || trainer) on the sampled tokens
    tis_mean: float
    tokens: int


def reference(logp: torch.Tensor, batch: Tensors, decoupled: bool = True) -> torch.Tensor:
    """The logprobs the ratio is taken against: the proximal policy's (decoupled; the live
    ones, detached, when none were recomputed) or the server's behaviour logprobs."""
    if not decoupled:
        return batch.behaviour
    return logp.detach() if batch.proximal is None else batch.proximal


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    batch: Tensors,
    config: LossConfig,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    mask = batch.loss_mask.float()
    ratio = torch.exp(logp - old_logp)
    advantages = batch.advantages
    low, high = 1.0 - config.epsilon_low, 1.0 + config.epsilon_high
    pg = -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)
    per_token = pg
    log_mismatch = (old_logp - batch.behaviour).detach()
    tis = torch.ones_like(pg)
    if config.tis_cap is not None:
        tis = torch.exp(log_mismatch).clamp(max=config.tis_cap)
        per_token = per_token * tis
    if config.kl_beta > 0 and ref_logp is not None:
        delta = ref_logp - logp
        per_token = per_token + config.kl_beta * (torch.exp(delta) - delta - 1)
    loss = (per_token * mask * batch.weights).sum()
    tokens = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        clipped = ((ratio < low) | (ratio > high)).float()
        trainer_over_server = torch.exp(log_mismatch)  # k3 with samples from the server
        k3 = trainer_over_server - 1 - log_mismatch
        stats = LossStats(
            loss=float(loss.detach()),
            clip_fraction=float((clipped * mask).sum() / tokens),
            mismatch_kl=float((k3 * mask).sum() / tokens),
            tis_mean=float((tis * mask).sum() / tokens),
            tokens=int(mask.sum()),
        )
    return loss, stats
