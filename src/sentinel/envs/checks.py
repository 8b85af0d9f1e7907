"""Per-instance checkers (EigenData): state predicates a task carries, and the near misses
they must fail.

A task's checks are derived from its gold run: one `StateCheck` per database value the gold
actions change (a lookup and an equality; never code). Validation proves them
discriminative: they hold after the gold run, and fail on the initial state and on
*near-miss* runs, the gold run with one plausible mistake:

- an id swapped for its nearest sibling: another payment method of the same user, another
  item of the same order, another line of the same customer;
- an enumerated argument set to another allowed value (a wrong cancellation reason, cabin);
- a count off by one (bags, gigabytes);
- a write left out, where the task has several.

A variant counts only when its writes all succeed and it leaves a state other than the
gold run's: a mistake the environment rejects, or one that changes nothing, misses nothing.
Everything here runs where the replay runs, in the sandboxed child (`envs.replay`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sentinel.schemas import Action, StateCheck, Task, ToolCall
from sentinel.schemas.task import CHECK_VALUE_CHARS, MAX_CHECKS

if TYPE_CHECKING:
    from sentinel.envs.base import Entities, Environment, Episode, Hashes, State

MAX_NEAR_MISSES = 6  # variants kept per task, by default (`validation.near_misses`)
MAX_TRIES = 10  # variant replays per task, kept or not (each a fresh episode: 65 ms on retail)
CANDIDATES = 3  # replacements tried per argument
_MISSING = object()
Side = Literal["agent", "user"]


# --- predicates ------------------------------------------------------------------------


def lookup(tree: Any, path: Sequence[str]) -> Any:
    """The value at `path` (dict keys; list positions as decimal strings), or `_MISSING`."""
    node = tree
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdecimal() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def holds(check: StateCheck, state: State) -> bool:
    tree = state[0] if check.side == "agent" else state[1]
    found = lookup(tree, check.path) if tree is not None else _MISSING
    if check.op == "absent":
        return found is _MISSING
    return found is not _MISSING and found == check.value


def failing(checks: Sequence[StateCheck], state: State) -> list[StateCheck]:
    return [c for c in checks if not holds(c, state)]


def passed(checks: Sequence[StateCheck], state: State) -> float:
    """The share of `checks` that hold: a run's progress toward the task's target state."""
    return 1.0 - len(failing(checks, state)) / len(checks) if checks else 0.0


def derive(before: State, after: State, given: Sequence[StateCheck] = ()) -> list[StateCheck]:
    """`given` first, then one check per value the run changed, at most `MAX_CHECKS`."""
    derived = list(given)
    seen = {(c.side, tuple(c.path)) for c in given}
    sides: list[tuple[Side, Any, Any]] = [
        ("agent", before[0], after[0]), ("user", before[1], after[1])
    ]  # fmt: skip
    for side, old, new in sides:
        for check in _changes(old or {}, new or {}, [], side):
            if (check.side, tuple(check.path)) not in seen and len(derived) < MAX_CHECKS:
                derived.append(check)
    return derived


def _changes(old: Any, new: Any, path: list[str], side: Side) -> Iterator[StateCheck]:
    """Checks for what differs between `old` and `new`, as deep as needed to stay small."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            if key not in new:
                yield StateCheck.model_validate(
                    {"side": side, "path": [*path, key], "op": "absent"}
                )
            elif key not in old:
                yield from _leaf_or_deeper({}, new[key], [*path, key], side)
            elif old[key] != new[key]:
                yield from _changes(old[key], new[key], [*path, key], side)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                yield from _changes(a, b, [*path, str(i)], side)
    elif old != new:
        yield from _leaf_or_deeper(old, new, path, side)


def _leaf_or_deeper(old: Any, new: Any, path: list[str], side: Side) -> Iterator[StateCheck]:
    if not path:
        return
    if len(json.dumps(new)) <= CHECK_VALUE_CHARS:
        yield StateCheck(side=side, path=path, value=new)
    elif isinstance(new, dict):  # a large new record: its fields one by one
        yield from _changes({}, new, path, side)


# --- near misses -------------------------------------------------------------------------


@dataclass(frozen=True)
class NearMiss:
    where: str  # the mistake's place: "2:modify_pending_order_payment.payment_method_id"
    label: str  # the mistake: where, the gold value and the wrong one
    calls: list[ToolCall]
    writes_must_succeed: bool = True  # False for a write left out: the rest may then fail


class Siblings:
    """Where each id sits in a database, and its neighbours there: the other keys of the
    dict it keys, the other ids of the list it is in, or the same field of the list's
    other records. A near miss takes the neighbour in the smallest such container, one under
    another id of the same call first (the order's own items, not any item), and within it
    one in the same status first (another pending order, which the write accepts)."""

    def __init__(self, database: dict[str, Any], entities: Entities) -> None:
        self.ids = entities.ids
        self.status = entities.status
        self.containers: list[tuple[tuple[str, ...], list[str]]] = []
        self.where: dict[str, list[int]] = defaultdict(list)
        self._walk(database, ())

    def _walk(self, node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            self._add(path, [k for k in node if k in self.ids])
            for key, value in node.items():
                self._walk(value, (*path, key))
        elif isinstance(node, list):
            self._add(path, [v for v in node if isinstance(v, str) and v in self.ids])
            records = [v for v in node if isinstance(v, dict)]
            for field in {k for r in records for k in r if k.endswith("_id")}:
                self._add(
                    (*path, field),
                    [v for r in records if isinstance(v := r.get(field), str) and v in self.ids],
                )
            for i, value in enumerate(node):
                self._walk(value, (*path, str(i)))

    def _add(self, path: tuple[str, ...], members: list[str]) -> None:
        if len(set(members)) < 2:
            return
        self.containers.append((path, members))
        for member in set(members):
            self.where[member].append(len(self.containers) - 1)

    def of(self, value: str, near: set[str]) -> list[str]:
        """Replacements for `value`, nearest first, none of them in `near` (the call's ids)."""
        containers = sorted(
            (self.containers[i] for i in self.where.get(value, [])),
            key=lambda c: (not near & set(c[0]), len(c[1]), c[0]),
        )
        found: list[str] = []
        status = self.status.get(value)
        for _, members in containers:
            for member in sorted(members, key=lambda m: self.status.get(m) != status):
                if member != value and member not in near and member not in found:
                    found.append(member)
                    if len(found) == CANDIDATES:
                        return found
        return found


def _id_paths(arguments: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Any, str]]:
    """(path, id) for every entity id among a call's arguments, nested ones included."""
    if isinstance(arguments, dict):
        for key, value in arguments.items():
            if key.endswith("_id") and isinstance(value, str):
                yield (*path, key), value
            elif key.endswith("_ids") and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, str):
                        yield (*path, key, i), item
            else:
                yield from _id_paths(value, (*path, key))
    elif isinstance(arguments, list):
        for i, item in enumerate(arguments):
            yield from _id_paths(item, (*path, i))


def _replaced(arguments: Any, path: Sequence[str | int], value: Any) -> Any:
    copy = json.loads(json.dumps(arguments))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


def _value_swaps(action: Action, schema: dict[str, Any]) -> Iterator[tuple[Any, list[Any]]]:
    """Other allowed values of enumerated arguments, and counts off by one."""
    properties: dict[str, Any] = schema.get("properties", {})
    for name, value in action.arguments.items():
        spec = properties.get(name, {})
        if isinstance(spec.get("enum"), list):
            yield (name,), [v for v in spec["enum"] if v != value][:CANDIDATES]
        elif isinstance(value, int) and not isinstance(value, bool) and not name.endswith("_id"):
            yield (name,), [value + 1, *([value - 1] if value > 0 else [])]


def candidates(task: Task, domain: Environment, siblings: Siblings) -> Iterator[NearMiss]:
    """Near-miss runs to try, a few per argument of each gold write, then writes left out."""
    actions, calls = task.actions, gold_calls(task)
    schemas = {
        t["function"]["name"]: t["function"].get("parameters", {}) for t in domain.tool_schemas
    }
    writes = [
        i for i, a in enumerate(actions)
        if a.requestor == "assistant" and a.name in domain.write_tools
    ]  # fmt: skip
    for i in writes:
        action = actions[i]
        near = {v for _, v in _id_paths(action.arguments)}
        swaps = [(path, siblings.of(value, near)) for path, value in _id_paths(action.arguments)]
        swaps += list(_value_swaps(action, schemas.get(action.name, {})))
        for path, replacements in swaps:
            where = f"{i}:{action.name}.{'.'.join(map(str, path))}"
            old = json.dumps(_get(action.arguments, path))
            for new in replacements:
                arguments = _replaced(action.arguments, path, new)
                call = calls[i].model_copy(update={"arguments": arguments})
                label = f"{where}: {old} -> {json.dumps(new)}"
                yield NearMiss(where, label, [*calls[:i], call, *calls[i + 1 :]])
    if len(writes) > 1:
        for i in writes:
            label = f"{i}:{actions[i].name} left out"
            yield NearMiss(label, label, [*calls[:i], *calls[i + 1 :]], writes_must_succeed=False)


def gold_calls(task: Task) -> list[ToolCall]:
    return [
        ToolCall(id=f"gold-{i}", name=a.name, arguments=a.arguments, requestor=a.requestor)
        for i, a in enumerate(task.actions)
    ]


def _get(arguments: Any, path: Sequence[str | int]) -> Any:
    node = arguments
    for part in path:
        node = node[part]
    return node


@dataclass
class Discrimination:
    """The near misses tried, whether the derived checks caught each, and the checks after
    one more was added for each miss (the value where the miss and the gold run part)."""

    checks: list[StateCheck]
    tried: list[tuple[str, bool]]  # (label, caught by the checks as derived from the diff)


def discriminate(
    task: Task,
    domain: Environment,
    siblings: Siblings,
    checks: list[StateCheck],
    gold: tuple[State, Hashes],
    limit: int = MAX_NEAR_MISSES,
) -> Discrimination:
    """Near misses of the gold run (which left `gold`: state and hashes) that run and land
    elsewhere: up to `limit`, one per place (its first replacement that counts), in at most
    `MAX_TRIES` replays. A miss the diff's checks let through (it also changed something
    the gold run left alone) gets a check of its own, so the task's checks fail every one."""
    hardened, replays, done = list(checks), 0, set()
    tried: list[tuple[str, bool]] = []
    for variant in candidates(task, domain, siblings):
        if variant.where in done:
            continue
        if replays == MAX_TRIES or len(tried) >= limit:
            break
        replays += 1
        episode = _run(task, domain, variant)
        if episode is None or episode.db_hashes() == gold[1]:
            continue
        done.add(variant.where)
        landed = episode.db_state()
        tried.append((variant.label, bool(failing(checks, landed))))
        if not failing(hardened, landed) and len(hardened) < MAX_CHECKS:
            hardened.append(next(_parting(landed, gold[0])))
    return Discrimination(hardened, tried)


def _parting(landed: State, gold: State) -> Iterator[StateCheck]:
    """Checks for the gold values where a run's state `landed` differs from `gold`."""
    sides: list[tuple[Side, Any, Any]] = [
        ("agent", landed[0], gold[0]), ("user", landed[1], gold[1])
    ]  # fmt: skip
    for side, old, new in sides:
        yield from _changes(old or {}, new or {}, [], side)


def _run(task: Task, domain: Environment, variant: NearMiss) -> Episode | None:
    """The episode after the variant's calls; None when one of its writes failed."""
    episode = domain.episode(task)
    for call in variant.calls:
        result = episode.step(call)
        if result.error and variant.writes_must_succeed and call.name in domain.write_tools:
            return None
    return episode
