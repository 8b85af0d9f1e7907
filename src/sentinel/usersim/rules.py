"""What a simulated user must never say, whatever the task: the rules that both the fidelity
probe (`usersim.fidelity`) and the blame of a failed rollout (`simulator_fault`) read.

Each rule returns None when a user turn passes, else why it fails. Pure functions of text:
no model, no environment, so any stage may import them.
"""

from __future__ import annotations

import re

from sentinel.schemas import Trajectory

MAX_CHARS = 600  # a user turn longer than this is not a customer's chat message

AGENT_PHRASES = re.compile(
    r"how (?:can|may) i (?:help|assist)|is there anything else i can"
    r"|i(?:'ve| have) (?:cancell?ed|processed|updated|modified|exchanged|returned|refunded"
    r"|found your|located your)|let me (?:check|look up|pull up|verify)"
    r"|(?:could|can) you (?:please )?(?:provide|confirm|verify) your"
    r"|thank you for (?:contacting|reaching out)|i can help you with|please hold on while"
    r"|i'?m (?:a|your) customer (?:service|support)|i'?m here to (?:help|assist)"
    r"|(?:happy|glad) to (?:help|assist) you|if you have any (?:more |other )?questions",
    re.I,
)
ROLE_TAG = re.compile(
    r"<\|im_(?:start|end)\|>|<tool_call>|^\s*(?:user|customer|agent|assistant|system)\s*:",
    re.I | re.M,
)
TOOL_SYNTAX = re.compile(r'^\s*[\[{]|"(?:name|arguments)"\s*:|\w+\(\w+\s*=', re.M)


def well_formed(text: str) -> str | None:
    if not text.strip():
        return "empty turn"
    if len(text) > MAX_CHARS:
        return f"{len(text)} characters (limit {MAX_CHARS})"
    return role_tag(text) or _repetition(text)


def _repetition(text: str) -> str | None:
    """A sentence said twice: the degenerate loop small models fall into."""
    seen: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        key = " ".join(words(sentence))
        if len(key.split()) >= 4 and key in seen:
            return f"repeats itself: {sentence.strip()!r}"
        seen.add(key)
    return None


def role_tag(text: str) -> str | None:
    if match := ROLE_TAG.search(text) or TOOL_SYNTAX.search(text):
        return f"role tag or tool-call syntax: {match.group(0).strip()!r}"
    return None


def role_flip(text: str) -> str | None:
    if match := AGENT_PHRASES.search(text):
        return f"speaks as the agent: {match.group(0)!r}"
    return None


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9#@._'-]+", text.lower())


def simulator_fault(trajectory: Trajectory) -> str | None:
    """Why a failed rollout is the user simulator's fault rather than the agent's: a user
    turn that speaks as the agent or writes role tags and tool-call syntax (a role flip; it
    was behind 120 of 128 failures of SmolLM2 as the user, measured on recorded runs). None
    for a success, or when every user turn stays in role."""
    if trajectory.succeeded:
        return None
    for index, message in enumerate(trajectory.messages):
        if message.role != "user" or not message.content or message.error:
            continue  # an error observation is the rollout's words to the agent, not the user's
        if why := role_flip(message.content) or role_tag(message.content):
            return f"user turn {index}: {why}"
    return None
