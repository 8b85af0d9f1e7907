from __future__ import annotations

import json
from pathlib import Path

import pytest

from sentinel.config import (
    LOCAL_KEY_ENV,
    REDACTED,
    ConfigError,
    LLMEndpoint,
    MissingKey,
    Settings,
    load_settings,
    redact,
)


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
    monkeypatch.delenv(LOCAL_KEY_ENV, raising=False)  # the tests' own server sets it
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
        ("serve: {max_loras: 5}\n", ".yaml", r"serve.max_loras \(5\) must be at least"),
        ("trainer: {max_staleness: 5}\n", ".yaml", r"max_staleness \+ 2 \(7\): rollouts may"),
        ("trainer: {cpu_threads: 1000000000}\n", ".yaml", "trainer.cpu_threads: Input should"),
        ("proposer: {max_concurrency: 0}\n", ".yaml", "proposer.max_concurrency: Input should"),
        ("proposer: {max_concurrency: lots}\n", ".yaml", "proposer.max_concurrency: Input should"),
        ("loop: {eval_tasks: -1}\n", ".yaml", "loop.eval_tasks: Input should"),
        ("serve: {cpu_cores: '0;reboot'}\n", ".yaml", "serve.cpu_cores: String should match"),
        ("a = 1\n", ".ini", "must end in .toml, .yaml or .yml"),
    ],
)
def test_config_errors_are_clear(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"sentinel{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(path)


@pytest.mark.parametrize(
    ("staleness", "loras", "full", "ok"),
    [(4, 6, False, True), (0, 2, False, True), (0, 1, False, False), (9, 10, False, False),
     (9, 1, True, True)],
)  # fmt: skip
def test_adapter_slots_follow_trls_rule_for_lora_only(
    staleness: int, loras: int, full: bool, ok: bool
) -> None:
    """max_loras >= max_staleness + 2 (TRL): the last max_staleness + 1 policies serve
    rollouts while the next loads. Full-parameter training serves no adapters."""
    data = {"trainer": {"max_staleness": staleness, "full_finetune": full}}
    data["serve"] = {"max_loras": loras}
    if ok:
        Settings.model_validate(data)
    else:
        with pytest.raises(ValueError, match=r"must be at least trainer\.max_staleness"):
            Settings.model_validate(data)


def test_missing_file_and_bad_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    monkeypatch.setenv("SENTINEL_BUS__MAX_DELIVERIES", "many")
    with pytest.raises(ConfigError, match=r"bus\.max_deliveries: Input should be a valid integer"):
        load_settings()


# ---------------------------------------------------------------------------------------------
# secrets: masked wherever settings are shown, written or logged; missing keys fail closed

PASSWORD = "hunter2-redis-secret"
SECRET_URL = f"redis://sentinel:{PASSWORD}@redis.example:6379/0"


def test_sentinel_config_masks_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sentinel.cli import app

    monkeypatch.setenv("SENTINEL_REDIS_URL", SECRET_URL)
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    shown = json.loads(result.output)["redis_url"]
    assert shown == f"redis://sentinel:{REDACTED}@redis.example:6379/0"
    assert PASSWORD not in repr(load_settings())  # nor in a logged or printed Settings


def test_the_run_record_is_private_holds_no_password_and_loads(tmp_path: Path) -> None:
    from sentinel.cli.base import write_config

    old = tmp_path / "config.yaml"
    old.write_text("{}")
    old.chmod(0o644)  # a record from an older run: rewritten at 0600 too
    settings = Settings(run_dir=tmp_path, redis_url=SECRET_URL)
    path = write_config(settings)
    assert path.stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in path.read_text()
    assert load_settings(path).redis_url is None  # the processes get SENTINEL_REDIS_URL
    plain = Settings(run_dir=tmp_path, redis_url="redis://redis:6379/0")
    assert load_settings(write_config(plain)).redis_url == "redis://redis:6379/0"


def test_a_masked_url_read_back_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "copied.yaml"
    path.write_text(f"redis_url: redis://sentinel:{REDACTED}@redis:6379/0\n")
    with pytest.raises(ConfigError, match="masked password"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:p%40ss@h:6379/0", f"redis://:{REDACTED}@h:6379/0"),
        ("rediss://u:a@b@h:1/0 and http://x:y@z", f"rediss://u:{REDACTED}@h:1/0 and http://x:{REDACTED}@z"),
        ("redis://h/0?password=abc&db=1", f"redis://h/0?password={REDACTED}&db=1"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)  # fmt: skip
def test_redact_masks_every_password_form(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_log_lines_are_scrubbed_of_urls_and_key_values(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from sentinel.logs import configure_logging, get_logger

    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-live-0123456789")
    configure_logging("INFO", "json", secret_env=["MY_PROVIDER_KEY"])
    get_logger("test").info("connecting", url=SECRET_URL)
    logging.getLogger("celery").warning("broker %s refused key sk-live-0123456789", SECRET_URL)
    try:
        raise ConnectionError(f"cannot reach {SECRET_URL}")
    except ConnectionError:
        get_logger("test").exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line)  # still one JSON object per line
        assert PASSWORD not in line
        assert "sk-live-0123456789" not in line
    assert REDACTED in lines[0]
    assert REDACTED in lines[2]  # the traceback too


def test_a_named_key_that_is_unset_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SENTINEL_TEST_NO_SUCH_KEY", raising=False)
    endpoint = LLMEndpoint(
        base_url="https://api.example.com/v1", api_key_env="SENTINEL_TEST_NO_SUCH_KEY"
    )
    with pytest.raises(MissingKey, match="SENTINEL_TEST_NO_SUCH_KEY is not set"):
        endpoint.api_key()
    monkeypatch.setenv("SENTINEL_TEST_NO_SUCH_KEY", "  ")
    with pytest.raises(MissingKey):
        endpoint.api_key()  # blank is unset
    monkeypatch.setenv("SENTINEL_TEST_NO_SUCH_KEY", "sk-1")
    assert endpoint.auth_headers() == {"Authorization": "Bearer sk-1"}
    # the self-hosted vLLM's variable is optional: a server without --api-key needs none
    monkeypatch.delenv(LOCAL_KEY_ENV, raising=False)
    assert LLMEndpoint().api_key() == "EMPTY"
    assert LLMEndpoint().auth_headers() == {}


@pytest.mark.parametrize("command", [["controller"], ["proposer"], ["worker", "rollout"]])
def test_a_component_without_its_key_stops_at_start_with_exit_2(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sentinel.cli import app

    monkeypatch.delenv("SENTINEL_TEST_NO_SUCH_KEY", raising=False)
    for name in ("POLICY", "CONTROLLER", "PROPOSER"):
        monkeypatch.setenv(f"SENTINEL_LLM__{name}__API_KEY_ENV", "SENTINEL_TEST_NO_SUCH_KEY")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "SENTINEL_TEST_NO_SUCH_KEY is not set" in result.output


def test_up_children_get_the_redis_url_in_their_environment_not_argv(tmp_path: Path) -> None:
    from sentinel.supervisor import Component, Supervisor

    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    component = Component("show", ["config"])
    supervisor = Supervisor([component], tmp_path, config, env={"SENTINEL_REDIS_URL": SECRET_URL})
    assert not any(PASSWORD in arg for arg in supervisor.argv(component))
    supervisor.start(component)
    assert component.process is not None
    assert component.process.wait(60) == 0
    shown = json.loads((tmp_path / "logs" / "show.log").read_text())["redis_url"]
    assert shown == redact(SECRET_URL)  # the child connected with it, and masks it


def test_the_shipped_cpu_profile_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` loads configs/local.yaml: a key the settings do not know stops it there."""
    monkeypatch.delenv("SENTINEL_REDIS_URL", raising=False)
    settings = load_settings(Path(__file__).resolve().parents[1] / "configs" / "local.yaml")
    assert settings.loop.max_groups == 6
    assert settings.llm.proposer.timeout_s == 180  # a draft beside the rollouts, then mutation
    assert settings.rollout.user == "scripted"
