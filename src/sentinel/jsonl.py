"""JSON Lines as the recorder writes them: one message per `\\n`, and nothing else.

`str.splitlines()` also breaks at U+2028, U+2029, U+0085 and the other Unicode line
boundaries, which JSON leaves unescaped inside strings: one sampled U+2028 in an LLM turn
would cut a recorded message in two, and its reader would lose it.
"""

from __future__ import annotations

from pathlib import Path


def lines(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file; none when it does not exist."""
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n") if line.strip()]
