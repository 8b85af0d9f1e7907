"""The trainer's CUDA path, checked against the CPU float32 reference (issue 17 item 6).

Run this first whenever a GPU machine is lent: it needs no vLLM, no Redis and no model files,
and finishes in a few minutes on one H100.

A randomly initialised model of Qwen3's architecture (Qwen3-4B-Thinking's widths: hidden 2560,
32 query and 8 key-value heads of 128, MLP 9728, vocabulary 151,936; `--layers` of them) gets
one GRPO update and one SFT update on a synthetic rollout group: `--rows` trajectories sharing
a `--prompt`-token prompt, each with a `--completion`-token answer, advantages in [-1, 1],
behaviour logprobs near the policy's own.

- **Reference:** CPU, float32, every row whole (no prefix sharing), full-parameter gradients.
- **Checked:** the device (`--device`, CUDA by default), bfloat16 weights as the trainer loads
  them on a GPU, the shared prompt run once and the rows after it in chunks of
  `--chunk-tokens` (`grpo.backward_sharing_prefix`, the trainer's GPU path), and, with `--fsdp`
  (default on CUDA), the model sharded by FSDP2 as the trainer shards it
  (`distributed.shard`) in a world of one process.

Compared per update: the loss (relative difference) and every parameter's gradient (cosine
similarity and relative norm difference against the reference). bfloat16 keeps about three
significant digits, so the thresholds are a loss within 2% and every gradient's cosine above
0.99; `ok` says whether both held for both updates.

On CPU (`--device cpu --dtype float32`, tiny widths) the same script checks its own machinery:
the shared-prefix path must then equal the reference to float32 noise. The tests run it so.

The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sentinel.training.batch import Sample
from sentinel.training.grpo import (
    LossConfig,
    LossStats,
    Tensors,
    backward_sharing_prefix,
    collate,
    grpo_loss,
    policy_logprobs,
)
from sentinel.training.sft import sft_loss

LOSS_REL_TOL = 0.02
MIN_COSINE = 0.99
Loss = Callable[[torch.Tensor, Tensors], tuple[torch.Tensor, LossStats]]


@dataclass(frozen=True)
class Shape:
    hidden: int = 2560
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 9728
    vocab: int = 151_936
    layers: int = 2


TINY = Shape(hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, layers=2)


def qwen3(shape: Shape, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen3 causal LM in float32 on the CPU."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=True,
        max_position_embeddings=32_768, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def samples(args: argparse.Namespace, vocab: int) -> list[Sample]:
    """One group: a shared prompt, a completion per row, mixed advantages, token-mean weights."""
    rng = random.Random(args.seed)
    prompt = [rng.randrange(1, vocab) for _ in range(args.prompt)]
    rows: list[Sample] = []
    for index in range(args.rows):
        completion = [rng.randrange(1, vocab) for _ in range(args.completion)]
        ids = prompt + completion
        mask = [False] * len(prompt) + [True] * len(completion)
        # A random model's logits are near uniform: logprobs near -log(vocab), so the
        # truncated importance weights stay near 1 rather than at their cap.
        near = -math.log(vocab)
        behaviour = [0.0] * len(prompt) + [near + rng.uniform(-0.1, 0.1) for _ in completion]
        advantage = rng.uniform(-1.0, 1.0)
        rows.append(Sample(ids, mask, behaviour, advantage, 0.0, f"t{index}", "g"))
    total = sum(sum(s.loss_mask) for s in rows)
    return [replace(s, weight=1.0 / total) for s in rows]


def grpo(config: LossConfig) -> Loss:
    def loss(logp: torch.Tensor, rows: Tensors) -> tuple[torch.Tensor, LossStats]:
        return grpo_loss(logp, logp.detach(), rows, config)

    return loss


def reference_grads(
    model: torch.nn.Module, rows: list[Sample], loss: Loss
) -> tuple[float, dict[str, torch.Tensor]]:
    """The CPU float32 update: every row whole."""
    model.zero_grad(set_to_none=True)
    tensors = collate(rows, 0, torch.device("cpu"))
    value, _ = loss(policy_logprobs(model, tensors), tensors)
    value.backward()  # type: ignore[no-untyped-call]
    return float(value.detach()), _grads(model)


def checked_grads(
    model: torch.nn.Module, rows: list[Sample], loss: Loss, device: torch.device, chunk: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's path: the shared prompt once, the rows after it in chunks."""
    model.zero_grad(set_to_none=True)
    tensors = collate(rows, 0, device)
    stats = backward_sharing_prefix(model, tensors, loss, chunk)
    return sum(s.loss for s in stats), _grads(model)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        grad: Any = parameter.grad
        if grad is None:
            continue
        if hasattr(grad, "full_tensor"):  # an FSDP2 DTensor
            grad = grad.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "")] = grad.detach().float().cpu()
    return out


def compare(
    expected: tuple[float, dict[str, torch.Tensor]], got: tuple[float, dict[str, torch.Tensor]]
) -> dict[str, Any]:
    (loss_ref, ref), (loss_got, grads) = expected, got
    missing = sorted(set(ref) - set(grads))
    cosines, norms = [], []
    for name, want in ref.items():
        if name not in grads:
            continue
        have = grads[name]
        cosines.append(
            float(torch.nn.functional.cosine_similarity(have.flatten(), want.flatten(), 0))
        )
        norms.append(float((have - want).norm() / want.norm().clamp(min=1e-30)))
    loss_rel = abs(loss_got - loss_ref) / max(abs(loss_ref), 1e-12)
    return {
        "loss_ref": loss_ref, "loss": loss_got, "loss_rel_diff": loss_rel,
        "grad_min_cosine": min(cosines, default=0.0), "grad_max_rel_diff": max(norms, default=0.0),
        "params": len(cosines), "missing_grads": missing,
    }  # fmt: skip


def sharded(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in a world of one process, sharded as the trainer shards (`distributed.shard`)."""
    import torch.distributed as dist

    from sentinel.training.distributed import World, shard

    if not dist.is_initialized():
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512"),
                            ("RANK", "0"), ("WORLD_SIZE", "1")):  # fmt: skip
            os.environ.setdefault(name, value)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shard(model, World(0, 1, device))
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    shape = TINY if args.tiny else replace(Shape(), layers=args.layers)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = qwen3(shape, args.seed)
    rows = samples(args, shape.vocab)
    updates = {"grpo": grpo(LossConfig()), "sft": sft_loss}
    references = {name: reference_grads(base, rows, loss) for name, loss in updates.items()}
    model = qwen3(shape, args.seed).to(device=device, dtype=dtype)
    if args.fsdp:
        model = sharded(model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {
        name: compare(references[name], checked_grads(model, rows, loss, device, args.chunk_tokens))
        for name, loss in updates.items()
    }
    ok = all(
        r["loss_rel_diff"] <= LOSS_REL_TOL and r["grad_min_cosine"] >= MIN_COSINE
        and not r["missing_grads"]
        for r in results.values()
    )  # fmt: skip
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "fsdp": args.fsdp, "layers": shape.layers, "hidden": shape.hidden,
        "rows": args.rows, "prompt_tokens": args.prompt, "completion_tokens": args.completion,
        "chunk_tokens": args.chunk_tokens, **results, "peak_memory_mb": peak,
        "seconds": round(time.monotonic() - started, 1), "ok": ok,
    }  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=cuda)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-4B: 36)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths: the CPU self-check")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1536, help="shared prompt tokens")
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    figures = run(parse(argv))
    print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
