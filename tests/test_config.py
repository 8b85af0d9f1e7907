from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SENTINEL_CONFIG", "SENTINEL_REDIS_URL", "SENTINEL_BUS__MAX_DELIVERIES"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_need_no_file() -> None:
    settings = load_settings()
    assert settings.redis_url is None
    assert settings.llm.policy.base_url == "http://127.0.0.1:8000/v1"


def test_yaml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text(
        "run_dir: /data/run-7\n"
        "bus: {max_deliveries: 2}\n"
        "llm:\n  proposer: {base_url: 'https://api.example.com/v1', model: big, api_key_env: KEY}\n"
    )
    monkeypatch.setenv("SENTINEL_BUS__MAX_DELIVERIES", "9")
    monkeypatch.setenv("SENTINEL_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("KEY", "sk-test")
    settings = load_settings(path)
    assert settings.run_dir == Path("/data/run-7")
    assert settings.bus.max_deliveries == 9  # the environment wins over the file
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.llm.proposer.model == "big"
    assert settings.llm.proposer.api_key() == "sk-test"
    assert settings.llm.controller.api_key() == "EMPTY"


def test_toml_file_and_sentinel_config_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text('[llm.controller]\nmodel = "judge"\n')
    monkeypatch.setenv("SENTINEL_CONFIG", str(path))
    assert load_settings().llm.controller.model == "judge"


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("bus: {max_deliveries: 0}\n", ".yaml", "bus.max_deliveries: Input should be greater"),
        ("bus: {colour: red}\n", ".yaml", "bus.colour: Extra inputs are not permitted"),
        ("bus: [1,\n", ".yaml", "does not parse"),
        ("[bus\n", ".toml", "does not parse"),
        ("redis_url = 'http://x'\n", ".toml", "redis_url must start with redis://"),
        ("redis_socket_timeout_s = 1\n", ".toml", "must exceed bus.block_ms"),
        ("trainer: {lora_rank: 16}\n", ".yaml", "exceeds serve.max_lora_rank"),
        ("a = 1\n", ".ini", "must end in .toml, .yaml or .yml"),
    ],
)
def test_config_errors_are_clear(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"sentinel{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(path)


def test_missing_file_and_bad_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    monkeypatch.setenv("SENTINEL_BUS__MAX_DELIVERIES", "many")
    with pytest.raises(ConfigError, match=r"bus\.max_deliveries: Input should be a valid integer"):
        load_settings()
