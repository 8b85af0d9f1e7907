"""The prompt-injection filter: instruction-like text in what an LLM will read.

Every string of a proposed task reaches an LLM: the user simulator reads the scenario and
persona, the evaluator the assertions, the Proposer's prompt book the rejection details, and
the Controller's summaries become pattern descriptions. A string is refused when:

1. it holds invisible or control characters (Unicode categories Cc other than tab and
   newlines, Cf, Co, Cs, Cn, and variation selectors outside an emoji): they hide text from
   a human reader and split phrases apart for a filter, and a task has no use for them;
2. one of `RULES` matches one of three views of it, each NFKC-normalised, accents stripped,
   case-folded and with common look-alike letters (Cyrillic, Greek, small capitals) mapped
   to Latin:
   - `words`: letters and digits only, one space between words, so newlines, punctuation and
     underscores inside a phrase do not split it;
   - `flat`: punctuation kept, whitespace collapsed, for chat-template tokens and markers;
   - `compact`: letters only, with digit look-alikes mapped (1gn0re), for s-p-a-c-e-d or
     d.o.t.t.e.d phrases; only long, unambiguous phrases are matched there.

The rules aim at text that addresses the model rather than describes a customer: overriding
earlier instructions or policy, instructions claimed from a developer or the system, role
changes, chat-template tokens, prompt exfiltration, reward gaming. Ordinary customer
language ("please ignore my previous address", "you are now emotional", "forget about it")
passes: the regression test runs every tau2 task of every domain through the filter.
Text in other languages and encoded payloads (base64) are not covered.

A finding names its field and its rule, never the matched text: details reach the Proposer's
prompt as lessons, and quoting the payload there would pass it on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_FINDINGS = 5

# Look-alike letters NFKC leaves alone (lower case: text is case-folded first), by code point.
# fmt: off
_CONFUSABLES: dict[int, str] = {
    # Cyrillic
    0x0430: "a", 0x0435: "e", 0x043E: "o", 0x0440: "p", 0x0441: "c", 0x0443: "y", 0x0445: "x",
    0x0456: "i", 0x0458: "j", 0x0455: "s", 0x04BB: "h", 0x0501: "d", 0x051B: "q", 0x051D: "w",
    0x04CF: "l", 0x043A: "k", 0x043C: "m", 0x043D: "h", 0x0442: "t", 0x0432: "b", 0x044C: "b",
    0x043F: "n",
    # Greek
    0x03B1: "a", 0x03BF: "o", 0x03B9: "i", 0x03B5: "e", 0x03C1: "p", 0x03C4: "t", 0x03C5: "u",
    0x03BA: "k", 0x03BD: "v", 0x03C7: "x", 0x03B3: "y", 0x03B7: "n", 0x03B2: "b", 0x03BC: "u",
    # small capitals, dotless and script letters
    0x026A: "i", 0x0262: "g", 0x0274: "n", 0x1D0F: "o", 0x0280: "r", 0x1D07: "e", 0x1D00: "a",
    0x029F: "l", 0x1D1C: "u", 0x1D1B: "t", 0xA731: "s", 0x1D04: "c", 0x1D05: "d", 0x1D18: "p",
    0x028F: "y", 0x1D0D: "m", 0x1D21: "w", 0x1D20: "v", 0x1D0B: "k", 0x029C: "h", 0xA730: "f",
    0x1D22: "z", 0x0261: "g", 0x0131: "i", 0x0237: "j",
}
# fmt: on
_LEET = str.maketrans("0134578@$!|", "oieastbasii")
_SPACES = str.maketrans(
    {"\t": " ", "\r": "\n", "\v": "\n", "\f": "\n", "\x85": "\n", "\u2028": "\n", "\u2029": "\n"}
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_EMOJI_JOINERS = {"\u200d", "\ufe0e", "\ufe0f"}  # legitimate right after an emoji


@dataclass(frozen=True)
class Finding:
    field: str
    why: str

    @property
    def detail(self) -> str:
        return f"{self.field}: {self.why}"


def _alt(*words: str) -> str:
    return "(?:" + "|".join(words) + ")"


_W = "(?:[a-z0-9]+ )"  # one filler word in the `words` view
_VERB = _alt(
    "ignore", "ignoring", "disregard", "disregarding", "forget", "override", "overrule",
    "bypass", "skip", "abandon", "discard", "drop", "neglect", "nullify", "void", "erase",
    "set aside", "throw out", "pay no attention to", "do not follow", "don t follow",
    "dont follow", "stop following", "no longer follow", "do not obey", "stop obeying",
)  # fmt: skip
_REFERENT = _alt(
    "previous", "previously", "prior", "above", "earlier", "preceding", "foregoing", "former",
    "original", "initial", "system", "developer", "safety", "all", "any", "every",
)  # fmt: skip
_NOUN = _alt(
    "instructions?", "rules?", "polic(?:y|ies)", "guidelines?", "directives?",
    "prompts?", "constraints?", "restrictions?", "guardrails?", "safeguards?", "programming",
    "protocols?", "regulations", "limitations", "commands", "system messages?", "context",
)  # fmt: skip
_NOT_OWN = r"(?:(?!my |our )[a-z0-9]+ )"  # a filler word; "ignore my previous ...": a customer
_AFTER = _alt(
    "above", "so far", "until now", "up to now", "you were given", "you have been given",
    "you got", "you received", "you were told", "you have been told", "in your prompt",
    "in the system prompt", "of the system", "from the system", "from your developers?",
)  # fmt: skip
_AUTHORITY = _alt(
    "developers?", "system", "system administrators?", "admins?", "administrators?",
    "operators?", "openai", "anthropic", "creators?", "sentinel", "evaluators?", "graders?",
    "your (?:creators?|developers?|makers?|owners?)",
)  # fmt: skip
_ROLE = _alt(
    "ai", "an ai", "assistant", "an assistant", "the assistant", "the agent", "an agent",
    "system", "the system", "developer", "the developer", "admin", "an admin", "model",
    "a model", "language model", "a language model", "llm", "an llm", "chatbot", "a chatbot",
    "bot", "a bot", "dan", "unrestricted", "an unrestricted", "jailbroken", "uncensored",
    "free from", "no longer bound", "no longer restricted", "not bound",
    "in (?:developer|debug|admin|god|unrestricted|maintenance) mode",
)  # fmt: skip

# (name, view, pattern): the name is what a rejection says.
RULES: list[tuple[str, str, re.Pattern[str]]] = [
    (name, view, re.compile(pattern))
    for name, view, pattern in [
        ("override of earlier instructions", "words",
         rf"\b{_VERB} {_NOT_OWN}{{0,3}}{_REFERENT} {_W}{{0,2}}{_NOUN}\b"),
        ("override of earlier instructions", "words",
         rf"\b{_VERB} {_W}{{0,3}}{_NOUN} {_W}{{0,3}}{_AFTER}\b"),
        ("override of earlier instructions", "words",
         rf"\b{_VERB} {_W}{{0,2}}(?:everything|anything|all of) {_W}{{0,1}}"
         rf"(?:above|you (?:were|have been) told|in your (?:prompt|instructions)|the above)\b"),
        ("instructions claimed from an authority", "words",
         rf"\bnew {_W}{{0,2}}(?:rules?|instructions?|directives?|polic(?:y|ies)|guidelines?|"
         rf"system prompt|prompt|task|objective|role|persona|identity) {_W}{{0,3}}"
         rf"(?:from|by|issued by) (?:the )?{_AUTHORITY}\b"),
        ("instructions claimed from an authority", "words",
         rf"\b(?:message|note|instructions?|update|override|notice|command|directive|"
         rf"announcement|memo) (?:from|by) (?:the )?{_AUTHORITY}\b"),
        ("instructions claimed from an authority", "words",
         r"\b(?:the )?(?:developers?|operators?|openai|anthropic|system administrators?|"
         r"your creators?) (?:says?|said|wants?|requires?|instructs?|instructed|orders?|"
         r"has (?:authori[sz]ed|allowed|approved|instructed|decided)|authori[sz]ed)\b"),
        ("a mode or jailbreak", "words",
         r"\b(?:developer|debug|god|sudo|unrestricted|jailbreak|jailbroken|dan) mode\b"
         r"|\bjailbr(?:oken|eak(?:ing|s)?)\b|\bdo anything now\b"),
        ("a reference to the system prompt", "words",
         r"\bsystem (?:prompt|message|instructions?)\b"
         r"|\b(?:hidden|secret|initial|original) (?:prompt|instructions)\b"),
        ("a role change", "words",
         rf"\byou are now {_ROLE}\b|\bfrom now on {_W}{{0,3}}(?:ignore|disregard|obey|"
         rf"act as|pretend|you are {_ROLE})\b|\byou (?:are|re) no longer (?:a |an |the )?"
         rf"(?:customer|user|assistant|agent|bound|restricted)\b"),
        ("a role change", "words",
         rf"\b(?:pretend|imagine|act|behave|roleplay|role play) {_W}{{0,2}}"
         rf"(?:to be|you are|as|like) {_ROLE}\b"
         r"|\byour (?:new|real|true|actual) (?:instructions|role|persona|identity|directives?|"
         r"system prompt|rules|programming)\b"),
        ("model self-reference", "words", r"\bas an? (?:ai|large language model|llm)\b"),
        ("reward gaming", "words",
         r"\b(?:give|assign|award|set|output|return) {_W}{0,3}(?:reward|score) "
         r"(?:[a-z0-9]+ ){0,2}(?:1|one|100|full|maximum|max|perfect)\b"
         r"|\b(?:mark|treat|count|grade|score) (?:this|the) (?:task|conversation|episode|"
         r"trajectory|dialogue) as (?:passed|solved|successful|complete|correct)\b"
         r"|\b(?:the )?(?:grader|evaluator|reward model|reward function)\b"),
        ("a chat-template token", "flat",
         r"<\|[^|<>]{1,40}\|>|\[/?inst\]|<</?sys>>|</?(?:system|assistant|developer|tool|"
         r"tool_call|tool_response|policy|instructions?|im_start|im_end|s)>"),
        ("a role marker", "flat",
         r"(?:^|[\n.;!?]\s*)(?:system|assistant|developer)\s*(?:message|prompt|note)?\s*:"
         r"|#{2,}\s*(?:system|instructions?|assistant|developer|response|new instructions?)\b"),
        ("a user-simulator control token", "flat",
         r"#{3}\s*(?:stop|transfer|out[- ]of[- ]scope)\s*#{3}"),
        ("override of earlier instructions", "compact",
         r"(?:ignore|disregard|forget|override|bypass)(?:all|any|the|your|of)*"
         r"(?:previous|prior|above|earlier|preceding|original|initial|system|developer)"
         r"(?:instructions?|rules|polic(?:y|ies)|guidelines|directives|prompts?|programming)"),
        ("instructions claimed from an authority", "compact",
         r"new(?:rules?|instructions?|directives?)from(?:the|your)?"
         r"(?:developer|system|admin|administrator|operator|openai|anthropic)"),
    ]
]  # fmt: skip


def _invisible(text: str) -> tuple[int, int] | None:
    """(count, index of the first) of the characters a task has no use for, or None."""
    count, first = 0, -1
    for i, char in enumerate(text):
        if char in "\t\n\r" or unicodedata.category(char)[0] not in "CM":
            continue
        category = unicodedata.category(char)
        selector = "\ufe00" <= char <= "\ufe0f" or "\U000e0100" <= char <= "\U000e01ef"
        if category.startswith("M") and not selector:
            continue  # combining marks: accents (stripped when matching)
        before = text[i - 1] if i else ""
        if char in _EMOJI_JOINERS and before and unicodedata.category(before) in ("So", "Sk"):
            continue  # an emoji's presentation selector or joiner
        if char == "\u200d" and before == "\ufe0f":
            continue  # a joiner after a selected emoji: one per emoji, no chains
        count += 1
        first = i if first < 0 else first
    return (count, first) if count else None


def views(text: str) -> dict[str, str]:
    """The three normalised views the rules match against."""
    folded = unicodedata.normalize("NFKC", text.translate(_SPACES)).casefold()
    bare = "".join(
        c for c in unicodedata.normalize("NFKD", folded)
        if unicodedata.category(c)[0] not in "MC" or c == "\n"
    ).translate(_CONFUSABLES)  # fmt: skip
    return {
        "words": re.sub(r"[^a-z0-9]+", " ", bare).strip(),
        "flat": re.sub(r"[^\S\n]+", " ", bare),
        "compact": re.sub(r"[^a-z]+", "", bare.translate(_LEET)),
    }


def scan_text(text: str) -> str | None:
    """Why `text` must not reach an LLM, or None when it may."""
    if found := _invisible(text):
        count, first = found
        name = unicodedata.name(text[first], "")
        return (
            f"{count} invisible or control character{'s' if count > 1 else ''} "
            f"(first U+{ord(text[first]):04X}{' ' + name if name else ''} at character {first})"
        )
    seen = views(text)
    for name, view, pattern in RULES:
        if pattern.search(seen[view]):
            return f"instruction-like text ({name})"
    return None


def _strings(value: Any, root: str) -> Iterator[tuple[str, str]]:
    """(path, string) for every string in a JSON-like value, keys included; iterative, so
    nesting depth cannot exhaust the stack. A key that is not a plain name is shown by its
    position: a path must not carry the payload it points at."""
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            yield path, item
        elif isinstance(item, dict):
            for i, (key, child) in reversed(list(enumerate(item.items()))):
                name = str(key) if _PLAIN_KEY.fullmatch(str(key)) else f"<key {i}>"
                stack.append((f"{path}.{name}" if path else name, child))
                if isinstance(key, str):
                    stack.append((f"{path} <key {i}>", key))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(item))))


def scan(value: Any, root: str = "", limit: int = MAX_FINDINGS) -> list[Finding]:
    """Findings for every string in `value` (a model dump), at most `limit`, in order."""
    findings: list[Finding] = []
    for path, text in _strings(value, root):
        if why := scan_text(text):
            findings.append(Finding(path or "text", why))
            if len(findings) >= limit:
                break
    return findings


def bounded(text: str, limit: int) -> str | None:
    """`text` stripped and cut to `limit` characters, or None when it must not reach an LLM
    (judged whole, so a payload cannot hide past the cut)."""
    return None if scan_text(text) else text.strip()[:limit]
