"""The GPU check script's own machinery, on CPU in float32: its shared-prefix path must equal
the whole-row reference to float32 noise, for the GRPO and the SFT update."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TINY = ["--tiny", "--device", "cpu", "--dtype", "float32", "--rows", "4", "--prompt", "48"]


def check(*extra: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--completion", "16", *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


@pytest.mark.parametrize("fsdp", ["--no-fsdp", "--fsdp"])  # FSDP2 on gloo, a world of one
def test_the_cpu_float32_run_matches_its_reference_in_chunks(fsdp: str) -> None:
    figures = check("--chunk-tokens", "20", fsdp)  # a row per chunk after the prompt
    assert figures["ok"] is True
    assert figures["fsdp"] is (fsdp == "--fsdp")
    for update in ("grpo", "sft"):
        result = figures[update]
        assert isinstance(result, dict)
        assert result["loss_rel_diff"] < 1e-5
        assert result["grad_min_cosine"] > 0.99999
        assert result["grad_max_rel_diff"] < 1e-4
        assert result["params"] == 2 * 11 + 2
        assert not result["missing_grads"]
        assert result["loss_ref"] != 0.0
