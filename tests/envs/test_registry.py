"""The environment seam: configuration picks an environment, and domain knowledge stays in
its pack."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from sentinel.config import ConfigError, load_settings
from sentinel.envs.registry import PACKS, Tau2EnvSettings, load, named, pack

SRC = Path(__file__).resolve().parents[2] / "src" / "sentinel"
DOMAIN_BLIND = ("agents", "orchestrator", "workers", "training", "usersim")
DOMAIN = re.compile(r"\b(" + "|".join(PACKS) + r")\b", re.I)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal and identifier of a module, docstrings and comments excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
    return found


def test_no_domain_is_named_outside_the_environment_packs() -> None:
    named_domains = [
        f"{path.relative_to(SRC)}:{line}: {text[:60]!r}"
        for package in DOMAIN_BLIND
        for path in sorted((SRC / package).rglob("*.py"))
        for line, text in _code_strings(path)
        if DOMAIN.search(text)
    ]
    assert named_domains == []


def test_the_check_sees_a_domain_in_code(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""retail in a docstring is fine."""\nif env.name == "airline":\n    pass\n')
    assert [text for _, text in _code_strings(module) if DOMAIN.search(text)] == ["airline"]


def test_every_pack_loads_and_names_itself() -> None:
    for name in PACKS:
        assert pack(name).name == name


def test_load_is_keyed_by_settings_and_cached() -> None:
    env = load(named("mock"))
    assert env.name == "mock"
    assert env.settings == Tau2EnvSettings(domain="mock")
    assert load(Tau2EnvSettings(domain="mock")) is env
    assert env.tasks("train")
    assert env.tasks("test")
    assert {t.id for t in env.tasks("train")}.isdisjoint(t.id for t in env.tasks("test"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"kind": "tau2", "domain": "mall"}, "unknown domain 'mall'; choose from retail"),
        ({"kind": "sql", "domain": "retail"}, "env.kind"),
        ({"kind": "tau2", "domain": "retail", "extra": 1}, "env.extra"),
        ("retail", "env"),
    ],
)
def test_a_bad_env_in_a_config_file_is_a_clear_error(
    tmp_path: Path, env: object, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"env": env}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)


def test_a_config_file_picks_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"env": {"kind": "tau2", "domain": "airline"}}))
    assert load_settings(path).env == Tau2EnvSettings(domain="airline")
