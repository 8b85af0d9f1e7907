"""Environments by configuration: `load(settings.env)` builds one, keyed by its settings type.

Each kind of environment is a settings model with a `kind` literal and a factory, registered
here by dotted path so nothing heavy is imported until one is built (tau2 takes seconds).
Domain packs are found by name in `PACKS`. A new kind: a settings model added to `EnvSettings`
and a line in `_FACTORIES`; a new tau2 domain: a folder under `envs/tau2/` and a line in
`PACKS`.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, cast

from pydantic import BaseModel, ConfigDict, field_validator

if TYPE_CHECKING:
    from sentinel.envs.base import Environment
    from sentinel.envs.pack import DomainPack

PACKS: dict[str, str] = {  # domain -> the module whose PACK holds its knowledge
    "retail": "sentinel.envs.tau2.retail",
    "airline": "sentinel.envs.tau2.airline",
    "telecom": "sentinel.envs.tau2.telecom",
    "mock": "sentinel.envs.tau2.mock",
}


class Tau2EnvSettings(BaseModel):
    """A tau2-bench domain: its tasks, database, tools, user simulator and evaluators."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tau2"] = "tau2"
    domain: str = "retail"

    @field_validator("domain")
    @classmethod
    def _known(cls, domain: str) -> str:
        return _known(domain)

    @property
    def name(self) -> str:
        return self.domain


EnvSettings = Tau2EnvSettings  # becomes a union discriminated by `kind` with a second kind
_FACTORIES: dict[type[BaseModel], str] = {Tau2EnvSettings: "sentinel.envs.tau2.env:Tau2Env"}


@lru_cache(maxsize=8)
def load(settings: EnvSettings) -> Environment:
    """The environment `settings` describe, built once per process (databases are large)."""
    module, _, attr = _FACTORIES[type(settings)].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return cast("Environment", factory(settings))


def named(name: str) -> EnvSettings:
    """The settings of the environment whose tasks carry `name` as their domain."""
    return Tau2EnvSettings(domain=_known(name))


def pack(name: str) -> DomainPack:
    """The knowledge pack of domain `name`: light, no environment is built."""
    return cast("DomainPack", importlib.import_module(PACKS[_known(name)]).PACK)


def _known(name: str) -> str:
    if name not in PACKS:
        raise ValueError(f"unknown domain {str(name)[:80]!r}; choose from {', '.join(PACKS)}")
    return name
