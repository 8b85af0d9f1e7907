"""The litellm route (Controller, Proposer) fails and succeeds as the openai route does."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from sentinel.agents.litellm_client import LiteLLMChatClient, retry_delay, transient
from sentinel.agents.llm import (
    ClosableChatClient,
    ContextLengthExceeded,
    LLMError,
    OpenAIChatClient,
    complete_structured,
    open_chat_client,
)
from sentinel.config import AgentEndpoint, LLMEndpoint, Settings, load_settings
from sentinel.process import free_port

pytestmark = pytest.mark.anyio
ROUTES = ["openai", "litellm"]
HI = [{"role": "user", "content": "hi"}]


class Stub:
    """A local HTTP server that answers every request with `status` after `delay_s`,
    counting requests: what each route sends and how often it retries."""

    def __init__(self, status: int, delay_s: float = 0.0) -> None:
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                body = b'{"error": {"message": "stub says no", "type": "x", "code": null}}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[Stub]:
    server = Stub(*request.param)
    yield server
    server.close()


def client_for(route: str, **endpoint: Any) -> ClosableChatClient:
    return open_chat_client(AgentEndpoint(client=route, **endpoint))


async def failure(route: str, **endpoint: Any) -> tuple[LLMError, float]:
    client = client_for(route, **endpoint)
    start = time.monotonic()
    with pytest.raises(LLMError) as caught:
        await client.complete(HI, max_tokens=4)
    await client.aclose()
    return caught.value, time.monotonic() - start


def test_the_route_is_chosen_by_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_chat_client(AgentEndpoint()), LiteLLMChatClient)
    assert isinstance(open_chat_client(AgentEndpoint(client="openai")), OpenAIChatClient)
    assert isinstance(open_chat_client(LLMEndpoint()), OpenAIChatClient)
    path = tmp_path / "s.yaml"  # a section set in a file keeps the agent's default route
    path.write_text("llm:\n  controller: {model: big}\n  proposer: {client: openai}\n")
    monkeypatch.setenv("SENTINEL_LLM__PROPOSER__MODEL", "other")
    llm = load_settings(path).llm
    assert (llm.controller.client, llm.controller.model) == ("litellm", "big")
    assert (llm.proposer.client, llm.proposer.model) == ("openai", "other")


def test_the_policy_cannot_go_through_litellm() -> None:
    with pytest.raises(ValueError, match="client"):
        Settings.model_validate({"llm": {"policy": {"client": "litellm"}}})


@pytest.mark.parametrize("route", ROUTES)
async def test_a_refused_connection_is_the_same_llm_error(route: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    error, _ = await failure(route, base_url=url, max_retries=1, timeout_s=5)
    assert type(error) is LLMError
    assert str(error).startswith(f"{url} failed:")
    assert "connection" in str(error).lower()


@pytest.mark.parametrize("stub", [(200, 3.0)], indirect=True)
@pytest.mark.parametrize("route", ROUTES)
async def test_a_timeout_is_the_same_llm_error_after_the_same_attempts(
    route: str, stub: Stub
) -> None:
    error, took = await failure(route, base_url=stub.url, max_retries=1, timeout_s=0.5)
    assert type(error) is LLMError
    assert str(error).startswith(f"{stub.url} failed:")
    assert "timed out" in str(error).lower() or "timeout" in str(error).lower()
    assert stub.requests == 2  # one retry, as configured
    assert 1.0 <= took < 2.9  # two attempts of 0.5 s and a backoff, not the stub's 3 s


@pytest.mark.parametrize("stub", [(400,)], indirect=True)
@pytest.mark.parametrize("route", ROUTES)
async def test_a_refused_request_is_not_retried(route: str, stub: Stub) -> None:
    error, _ = await failure(route, base_url=stub.url, max_retries=2, timeout_s=5)
    assert str(error).startswith(f"{stub.url} refused the request:")
    assert "stub says no" in str(error)
    assert stub.requests == 1


@pytest.mark.parametrize("stub", [(503,)], indirect=True)
@pytest.mark.parametrize("route", ROUTES)
async def test_a_server_error_is_retried_then_an_llm_error(route: str, stub: Stub) -> None:
    error, _ = await failure(route, base_url=stub.url, max_retries=2, timeout_s=5)
    assert str(error).startswith(f"{stub.url} failed:")
    assert stub.requests == 3


def test_retry_policy_matches_the_openai_sdk() -> None:
    assert 0.375 <= retry_delay(0) <= 0.5
    assert 6.0 <= retry_delay(10) <= 8.0
    assert not transient(status_error(400))
    assert transient(status_error(429))
    assert transient(status_error(502))


def status_error(status: int) -> Any:
    import httpx
    import openai

    response = httpx.Response(status, request=httpx.Request("POST", "http://x"))
    return openai.APIStatusError("x", response=response, body=None)


# -- against the real local vLLM ---------------------------------------------------------------


class Colour(BaseModel):
    colour: Literal["red", "green"]


async def test_structured_output_through_litellm(policy_url: str) -> None:
    client = client_for("litellm", base_url=policy_url)
    answer = await complete_structured(
        client, [{"role": "user", "content": "Pick a colour."}], Colour, max_tokens=30
    )
    assert answer.colour in ("red", "green")


async def test_context_overflow_is_context_length_exceeded_through_litellm(
    policy_url: str,
) -> None:
    client = client_for("litellm", base_url=policy_url, max_retries=0)
    with pytest.raises(ContextLengthExceeded):
        await client.complete([{"role": "user", "content": "order " * 9000}], max_tokens=4)


async def test_unknown_model_is_refused_clearly_through_litellm(policy_url: str) -> None:
    client = client_for("litellm", base_url=policy_url, model="no-such-adapter", max_retries=0)
    with pytest.raises(LLMError, match="no-such-adapter"):
        await client.complete(HI, max_tokens=4)


async def test_a_wrong_key_never_reaches_the_error_or_a_log(
    policy_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-do-not-leak-0123456789"
    monkeypatch.setenv("TEST_LITELLM_KEY", secret)
    caplog.set_level(logging.DEBUG)
    client = client_for(
        "litellm", base_url=policy_url, api_key_env="TEST_LITELLM_KEY", max_retries=0
    )
    with pytest.raises(LLMError) as caught:
        await client.complete(HI, max_tokens=4)
    assert "401" in str(caught.value) or "auth" in str(caught.value).lower()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value.__cause__)
    assert secret not in caplog.text


async def test_token_ids_are_refused_on_the_litellm_route() -> None:
    client = client_for("litellm")
    with pytest.raises(LLMError, match="client: openai"):
        await client.complete(HI, max_tokens=4, record_tokens=True)
