"""The chat template the policy is both served and fine-tuned with.

ChatML with Hermes-style `<tool_call>` blocks (SmolLM2's own template has no tools). vLLM
renders prompts with it (`serving.server`) and SFT renders its examples with it
(`training.sft`), so the model learns the text it is prompted with. It lives here, below both,
so that neither depends on the other.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = Path(__file__).with_name("chatml_tools.jinja")


def default_template() -> str:
    """The template `sentinel serve` gives vLLM, as text."""
    return CHAT_TEMPLATE.read_text()
