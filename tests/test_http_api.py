"""The OpenAI-compatible HTTP API end to end, driven by the official ``openai`` client.

One real cluster serves the whole module: the scheduler service, a ``sim`` worker and gateways,
in-process on an event loop of their own (a thread), talking over real sockets and a real Redis.
Each test talks to it from its own loop, and may look at the scheduler's request table and the
worker's engine to see what a request did there. The sim backend generates exactly
``max_tokens`` tokens of pseudo-text that :func:`sim_text` predicts from the request id.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from andes import tokenstream
from andes.policies import make_policy
from andes.v1 import generation_pb2, generation_pb2_grpc
from gateway.auth import hash_key
from gateway.chat import DEFAULT_CHAT_TEMPLATE, ChatMessage, ChatTemplate
from gateway.config import GatewayConfig, parse_config
from gateway.http_api import body_limit
from gateway.server import Gateway
from gateway.validation import Limits
from scheduler_service.scheduler import Scheduler
from scheduler_service.server import SchedulerServer
from tests.conftest import free_port
from worker.service import WorkerConfig, WorkerService
from worker.sim_backend import token_id, token_text

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits(max_tokens_limit=3000, default_max_tokens=8, max_prompt_chars=100)
API_KEY = "s3cret"
LONG = 2000
"""max_tokens of a request that is still running when the test is done with it."""

T = TypeVar("T")


def sim_text(request_id: str, count: int) -> str:
    """What the sim worker generates for ``request_id``: its first ``count`` tokens' text."""
    return "".join(token_text(token_id(request_id, i)) for i in range(count))


def fresh_id(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


class ClusterThread:
    """A scheduler, a sim worker and gateways on an event loop running in a thread."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.prefix = f"http-{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster",
                                        daemon=True)
        self.scheduler = Scheduler(make_policy("andes"))
        self.gateways: list[Gateway] = []
        self._stop_worker = asyncio.Event()
        self._worker_task: asyncio.Task[None] | None = None
        self._server: SchedulerServer | None = None
        self.worker: WorkerService | None = None

    @property
    def server(self) -> SchedulerServer:
        assert self._server is not None, "the cluster has not started"
        return self._server

    def run(self, work: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``work`` on the cluster's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout_s)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        # Built on the cluster's loop: a grpc.aio server belongs to the loop it was made on.
        self._server = SchedulerServer(self.scheduler, f"127.0.0.1:{free_port()}")
        await self._server.start()
        registered = asyncio.Event()
        self.worker = WorkerService(
            WorkerConfig(worker_id="w0", scheduler=self.server.address,
                         redis_url=self.redis_url, redis_prefix=self.prefix),
            on_registered=registered.set,
        )
        self._worker_task = asyncio.create_task(self.worker.run(self._stop_worker))
        await asyncio.wait_for(registered.wait(), 10)

    def add_gateway(self, chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE,
                    **config: Any) -> Gateway:
        """A gateway of this cluster with an HTTP API on a free port and its own metrics."""
        settings = GatewayConfig(
            listen="127.0.0.1:0", http_listen="127.0.0.1:0", scheduler=self.server.address,
            redis_url=self.redis_url, redis_prefix=self.prefix, limits=LIMITS,
            report_interval_s=0.05, **config,
        )
        gateway = Gateway(settings, registry=CollectorRegistry(), chat_template=chat_template)
        self.run(gateway.start())
        self.gateways.append(gateway)
        return gateway

    def stop(self) -> None:
        async def stop() -> None:
            for gateway in self.gateways:
                await gateway.stop()
            self._stop_worker.set()
            if self._worker_task is not None:
                await self._worker_task
            if self._server is not None:
                await self._server.stop(0.5)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[ClusterThread]:
    running = ClusterThread(redis_url)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def gateway(cluster: ClusterThread) -> Gateway:
    """The module's main gateway: no API keys, the default model name."""
    return cluster.add_gateway()


def client_of(gateway: Gateway, api_key: str = "unused") -> openai.AsyncOpenAI:
    # No retries: a test sees every answer as the server gave it.
    return openai.AsyncOpenAI(base_url=f"http://{gateway.http_address}/v1", api_key=api_key,
                              max_retries=0, timeout=20)


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def run(body: Coroutine[Any, Any, None], budget_s: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(body, budget_s))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def stored_payload(cluster: ClusterThread, request_id: str) -> dict[str, str]:
    redis = aioredis.from_url(cluster.redis_url)
    try:
        raw: dict[bytes, bytes] = await redis.hgetall(  # type: ignore[misc]
            tokenstream.payload_key(request_id, cluster.prefix))
    finally:
        await redis.aclose()
    return {key.decode(): value.decode() for key, value in raw.items()}


async def last_chunk(cluster: ClusterThread, request_id: str) -> tokenstream.TokenChunk:
    """The final entry of the request's token stream, once it is there."""
    redis = aioredis.from_url(cluster.redis_url)
    key = tokenstream.stream_key(request_id, cluster.prefix)
    try:
        while True:
            entries = await redis.xrevrange(key, count=1)
            if entries:
                chunk = tokenstream.decode_chunk(entries[0][1])
                if chunk.finish_reason:
                    return chunk
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def raw_post(address: str, path: str, header: bytes, body: bytes) -> tuple[int, Any]:
    """POST with a header line no HTTP client library would send; (status, JSON body)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n%s\r\n"
                 b"Connection: close\r\n\r\n%s" % (path.encode(), len(body), header, body))
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


# -- completions through the official client ---------------------------------------------------


def test_chat_stream_carries_qoe_and_usage(cluster: ClusterThread, gateway: Gateway) -> None:
    request_id = fresh_id("chat")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "The Andes?"}]}]
    rendered = DEFAULT_CHAT_TEMPLATE.render([ChatMessage("system", "Be brief."),
                                             ChatMessage("user", "The Andes?")])

    async def body() -> None:
        async with client_of(gateway) as client:
            stream = await client.chat.completions.create(
                model="andes", messages=messages, max_tokens=12, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
                extra_body={"qoe": {"ttft_s": 1.0, "tds": 20}},
                extra_headers={"x-request-id": request_id},
            )
            chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.id == f"chatcmpl-{request_id}" for c in chunks)
        assert all(c.object == "chat.completion.chunk" and c.model == "andes" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == sim_text(request_id, 12)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert usage.completion_tokens == 12
        assert usage.prompt_tokens == math.ceil(len(rendered) / 4)
        assert usage.total_tokens == usage.prompt_tokens + 12
        assert all(c.usage is None for c in chunks[:-1])

        payload = await stored_payload(cluster, request_id)
        assert payload["prompt"] == rendered
        assert json.loads(payload["qoe"]) == {"ttft_s": 1.0, "tds": 20.0}
        assert metric(gateway, "andes_request_qoe_count") >= 1
        # Counted as the handler returns, which may be a moment after the client has [DONE].
        await until(lambda: metric(gateway, "andes_http_requests_total",
                                   endpoint="/v1/chat/completions", outcome="completed") >= 1)

    run(body())


def test_completions_whole_and_streamed(cluster: ClusterThread, gateway: Gateway) -> None:
    async def body() -> None:
        async with client_of(gateway) as client:
            request_id = fresh_id("cmpl")
            delivered = metric(gateway, "andes_tokens_delivered_total")
            completion = await client.completions.create(
                model="whatever", prompt="Once upon a time", max_tokens=7, temperature=0.5,
                top_p=0.5, seed=3, stop=["\n\n"], user="someone",
                extra_headers={"x-request-id": request_id},
                extra_body={"ignore_eos": True, "top_k": -1, "logit_bias": {}},
            )
            assert completion.id == f"cmpl-{request_id}"
            assert completion.object == "text_completion" and completion.model == "andes"
            choice = completion.choices[0]
            assert choice.text == sim_text(request_id, 7) and choice.finish_reason == "length"
            assert completion.usage is not None
            assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
                    completion.usage.total_tokens) == (4, 7, 11)
            # The whole answer counts as delivered once written (just after the client has it).
            await until(lambda: metric(gateway, "andes_tokens_delivered_total")
                        == delivered + 7)
            sampling = json.loads((await stored_payload(cluster, request_id))["sampling"])
            assert sampling == {"temperature": 0.5, "top_p": 0.5, "top_k": 0, "seed": 3,
                                "stop": ["\n\n"], "ignore_eos": True}

            request_id = fresh_id("ids")
            streamed = await client.completions.create(
                model="andes", prompt=[[5, 6, 7]], max_tokens=5, stream=True,
                extra_headers={"x-request-id": request_id},
            )
            pieces = [chunk async for chunk in streamed]
            assert "".join(p.choices[0].text for p in pieces) == sim_text(request_id, 5)
            assert pieces[-1].choices[0].finish_reason == "length"
            assert all(p.object == "text_completion" and p.usage is None for p in pieces)

            answer = await client.chat.completions.create(
                model="andes", messages=[{"role": "user", "content": "hi"}],
                max_completion_tokens=3, max_tokens=40,
            )
            assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
            request_id = answer.id.removeprefix("chatcmpl-")
            assert answer.choices[0].message.role == "assistant"
            assert answer.choices[0].message.content == sim_text(request_id, 3)
            assert answer.usage is not None and answer.usage.completion_tokens == 3

    run(body())


class Bracketed:
    """A chat template of a model's own (the hook a tokenizer's template will use)."""

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return " ".join(f"[{message.role}] {message.content}" for message in messages)


def test_a_model_chat_template_plugs_in(cluster: ClusterThread) -> None:
    custom = cluster.add_gateway(chat_template=Bracketed())
    request_id = fresh_id("template")

    async def body() -> None:
        async with client_of(custom) as client:
            answer = await client.chat.completions.create(
                model="andes", max_tokens=2, extra_headers={"x-request-id": request_id},
                messages=[{"role": "system", "content": "Be kind."},
                          {"role": "user", "content": "Hello"}],
            )
        assert answer.choices[0].message.content == sim_text(request_id, 2)
        prompt = (await stored_payload(cluster, request_id))["prompt"]
        assert prompt == "[system] Be kind. [user] Hello"

    run(body())


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": "x" * 101}, "prompt"),
    ("completions", {"prompt": ["one", "two"]}, "prompt"),
    ("completions", {"prompt": [1, -2]}, "prompt[1]"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": 3001}, "max_tokens"),
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"stop": [""]}, "stop[0]"),
    ("completions", {"n": 2}, "n"),
    ("completions", {"seed": -1}, "seed"),
    ("completions", {"extra_body": {"qoe": {"ttft_s": 0}}}, "qoe.ttft_s"),
    ("completions", {"extra_body": {"qoe": {"tds": -1}}}, "qoe.tds"),
    ("completions", {"extra_body": {"qoe": {"tds": 1e9}}}, "qoe.tds"),
    ("completions", {"extra_body": {"qoe": {"ttft_s": "soon"}}}, "qoe.ttft_s"),
    ("completions", {"extra_body": {"qoe": "fast"}}, "qoe"),
    ("completions", {"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ("completions", {"extra_headers": {"x-andes-tds": "quick"}}, "x-andes-tds"),
    ("completions", {"extra_headers": {"x-andes-ttft": "inf"}}, "x-andes-ttft"),
    ("completions", {"extra_headers": {"x-request-id": "no spaces"}}, "x-request-id"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "user", "content": "x" * 100}]}, "messages"),
    ("chat", {"max_completion_tokens": 3001}, "max_completion_tokens"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD_INPUTS,
                         ids=[f"{e}-{p}" for e, _, p in BAD_INPUTS])
def test_bad_input_is_400_naming_the_field(
    gateway: Gateway, endpoint: str, fields: dict[str, Any], param: str
) -> None:
    async def body() -> None:
        before = metric(gateway, "andes_requests_total", outcome="invalid")
        async with client_of(gateway) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                if endpoint == "chat":
                    values = {"messages": [{"role": "user", "content": "hi"}], **fields}
                    await client.chat.completions.create(model="andes", **values)
                else:
                    await client.completions.create(model="andes", **{"prompt": "hi", **fields})
        error = caught.value
        assert error.status_code == 400
        assert isinstance(error.body, dict)
        assert set(error.body) == {"message", "type", "param", "code"}
        assert error.type == "invalid_request_error" and error.code is None
        assert error.param == param
        assert error.body["message"].startswith(f"{param}: "), error.body["message"]
        assert metric(gateway, "andes_requests_total", outcome="invalid") == before + 1

    run(body())


def test_raw_requests_and_header_qoe(cluster: ClusterThread, gateway: Gateway) -> None:
    """What the client library cannot send, and the server still serving afterwards."""
    url = f"http://{gateway.http_address}"

    async def body() -> None:
        async with aiohttp.ClientSession() as session:
            too_large = b'{"prompt": "' + b"x" * (body_limit(LIMITS) + 1) + b'"}'
            for raw, param in ((b'{"prompt": "hi",', None), (b"\xff\xfe", None),
                               (b"[1, 2]", None), (too_large, None), (b"[" * 100_000, None),
                               (b'{"prompt": "\\ud800"}', "prompt"),
                               (b'{"prompt": "hi", "stop": ["\\udc00"]}', "stop[0]"),
                               (b'{"prompt": "hi", "qoe": {"ttft_s": NaN}}', "qoe.ttft_s"),
                               (b'{"prompt": "hi", "stream": "yes"}', "stream")):
                async with session.post(f"{url}/v1/completions", data=raw) as response:
                    assert response.status == 400, raw
                    error = (await response.json())["error"]
                    assert error["type"] == "invalid_request_error"
                    assert error["param"] == param and error["code"] is None
            for method, path, status in (("GET", "/v1/nothing", 404),
                                         ("GET", "/v1/completions", 405)):
                async with session.request(method, f"{url}{path}") as response:
                    assert response.status == status
                    assert (await response.json())["error"]["message"].startswith(method)

            request_id = fresh_id("headers")
            headers = {"x-andes-ttft": "2.5", "x-andes-tds": "8", "x-request-id": request_id}
            fields = {"prompt": "hi", "max_tokens": 4, "qoe": {"tds": 9},
                      "frequency_penalty": 0, "logprobs": None, "echo": False}
            async with session.post(f"{url}/v1/completions", json=fields,
                                    headers=headers) as response:
                assert response.status == 200
                assert response.headers["x-request-id"] == request_id
                answer = await response.json()
            assert answer["choices"][0]["text"] == sim_text(request_id, 4)
            status, error = await raw_post(gateway.http_address, "/v1/completions",
                                           b"x-request-id: \xff", b'{"prompt": "hi"}')
            assert (status, error["error"]["param"]) == (400, "x-request-id")
            assert answer["choices"][0]["logprobs"] is None
            qoe = json.loads((await stored_payload(cluster, request_id))["qoe"])
            assert qoe == {"ttft_s": 2.5, "tds": 9.0}, "the body wins over a header"

    run(body())


# -- auth, limits, draining, models, health, metrics ---------------------------------------------


def test_api_keys_models_health_and_metrics(
    cluster: ClusterThread, gateway: Gateway, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{hash_key(API_KEY)}\n")
    keyed = cluster.add_gateway(api_keys_file=str(keys), served_model_name="andes-13b")
    url = f"http://{keyed.http_address}"

    async def body() -> None:
        async with client_of(keyed, "wrong") as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.completions.create(model="andes-13b", prompt="hi", max_tokens=2)
            assert caught.value.type == "authentication_error"
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with client_of(keyed, API_KEY) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["andes-13b"]
            completion = await client.completions.create(model="andes-13b", prompt="hi",
                                                         max_tokens=2)
            assert completion.model == "andes-13b"
        status, error = await raw_post(keyed.http_address, "/v1/completions",
                                       b"Authorization: Bearer \xff", b'{"prompt": "hi"}')
        assert (status, error["error"]["type"]) == (401, "authentication_error")
        assert metric(keyed, "andes_requests_total", outcome="unauthenticated") == 2
        await until(lambda: metric(keyed, "andes_requests_total", outcome="completed") == 1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "serving"}
            async with session.get(f"{url}/metrics") as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                text = await response.text()
        assert 'andes_requests_total{outcome="completed"} 1.0' in text
        assert ('andes_http_requests_total{endpoint="/v1/completions",outcome="unauthenticated"}'
                ' 2.0') in text
        assert 'andes_http_requests_total{endpoint="/v1/models",outcome="completed"} 1.0' in text
        assert 'andes_http_requests_total{endpoint="/healthz",outcome="completed"} 1.0' in text

    run(body())


async def open_stream(client: openai.AsyncOpenAI, request_id: str, **extra: Any) -> Any:
    """A long chat stream already past its first tokens."""
    stream = await client.chat.completions.create(
        model="andes", messages=[{"role": "user", "content": "Go on"}], max_tokens=LONG,
        stream=True, extra_headers={"x-request-id": request_id, **extra},
    )
    tokens = 0
    async for chunk in stream:
        tokens += len((chunk.choices[0].delta.content or "").split())
        if tokens >= 3:
            return stream
    raise AssertionError("the stream ended early")


def test_disconnect_aborts_and_frees_the_request(cluster: ClusterThread, gateway: Gateway) -> None:
    scheduler, worker = cluster.scheduler, cluster.worker
    assert worker is not None
    request_id = fresh_id("gone")

    async def body() -> None:
        disconnected = metric(gateway, "andes_requests_total", outcome="disconnected")
        async with client_of(gateway) as client:
            stream = await open_stream(client, request_id, **{"x-andes-ttft": "2.5",
                                                              "x-andes-tds": "8"})
            entry = scheduler.table.requests[request_id]
            assert (entry.meta.ttft_s, entry.meta.tds) == (2.5, 8.0)
            # Written SSE chunks are deliveries: the scheduler hears of them.
            await until(lambda: entry.delivered_tokens >= 3)
            assert worker.engine.holds(request_id)
            with pytest.raises(openai.ConflictError):  # the id is live
                await client.completions.create(model="andes", prompt="hi", max_tokens=2,
                                                extra_headers={"x-request-id": request_id})
            await stream.close()
        await until(lambda: request_id not in scheduler.table.requests)
        await until(lambda: not worker.engine.holds(request_id))
        final = await last_chunk(cluster, request_id)
        assert final.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
        assert final.end < LONG
        await until(lambda: metric(gateway, "andes_requests_total", outcome="disconnected")
                    == disconnected + 1)
        assert metric(gateway, "andes_http_requests_total", endpoint="/v1/chat/completions",
                      outcome="disconnected") >= 1

        # A non-streaming request whose client gives up is aborted as well.
        request_id_2 = fresh_id("impatient")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                await session.post(
                    f"http://{gateway.http_address}/v1/completions",
                    json={"prompt": "hi", "max_tokens": LONG},
                    headers={"x-request-id": request_id_2},
                    timeout=aiohttp.ClientTimeout(total=0.5),
                )
        await until(lambda: request_id_2 not in scheduler.table.requests)
        assert (await last_chunk(cluster, request_id_2)).finish_reason == (
            generation_pb2.FINISH_REASON_CANCELLED)

    run(body())


def test_cancel_rpc_ends_an_http_stream_with_an_error_event(gateway: Gateway) -> None:
    request_id = fresh_id("cancelled")

    async def body() -> None:
        async with client_of(gateway) as client:
            stream = await open_stream(client, request_id)
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
                reply = await stub.Cancel(generation_pb2.CancelRequest(request_id=request_id),
                                          timeout=5)
                assert reply.found
            with pytest.raises(openai.APIError) as caught:
                async for _ in stream:
                    pass
            assert caught.value.message == "the request was cancelled"
            assert caught.value.type == "cancelled"

    run(body())


def test_stream_limit_is_429_draining_503_and_stop_aborts(cluster: ClusterThread) -> None:
    small = cluster.add_gateway(max_streams=1)
    url = f"http://{small.http_address}"
    request_id = fresh_id("held")

    async def body() -> None:
        async with client_of(small) as client, aiohttp.ClientSession() as session:
            held = await open_stream(client, request_id)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model="andes", prompt="hi", max_tokens=2)
            assert caught.value.type == "rate_limit_error"

            await asyncio.to_thread(cluster.run, small.begin_drain())
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 503
                assert await response.json() == {"status": "draining"}
            with pytest.raises(openai.InternalServerError) as unavailable:
                await client.completions.create(model="andes", prompt="hi", max_tokens=2)
            assert unavailable.value.status_code == 503
            assert "draining" in unavailable.value.message
            # The stream in progress goes on while the gateway drains ...
            more = 0
            async for chunk in held:
                more += len((chunk.choices[0].delta.content or "").split())
                if more >= 3:
                    break
            # ... until the gateway stops: then it is cancelled and its request aborted.
            started = time.monotonic()
            await asyncio.to_thread(cluster.run, small.stop())
            assert time.monotonic() - started < 5
            await until(lambda: request_id not in cluster.scheduler.table.requests)
            await held.close()
        assert metric(small, "andes_requests_total", outcome="rejected") == 1
        assert metric(small, "andes_requests_total", outcome="unavailable") == 1
        assert metric(small, "andes_requests_total", outcome="disconnected") == 1

    run(body())


# -- configuration and the process ----------------------------------------------------------------


def test_http_flags_and_their_environment() -> None:
    assert parse_config([], {}).http_listen == "127.0.0.1:8000"
    assert parse_config([], {}).served_model_name == "andes"
    env = {"ANDES_GATEWAY_HTTP_LISTEN": "", "ANDES_SERVED_MODEL_NAME": "opt-13b"}
    config = parse_config([], env)
    assert (config.http_listen, config.served_model_name) == ("", "opt-13b")
    assert parse_config(["--http-listen", "[::1]:8001"], env).http_listen == "[::1]:8001"
    assert GatewayConfig().http_listen == "", "in-process gateways serve no HTTP by default"
    for bad in (["--http-listen", "8000"], ["--http-listen", "host:port"],
                ["--served-model-name", ""]):
        with pytest.raises(SystemExit):
            parse_config(bad, {})


def test_python_m_gateway_announces_and_serves_http(redis_url: str) -> None:
    """The real process (uvloop): both READY lines, /healthz, a completion whose scheduler is
    down gets 503, /metrics counts it, SIGTERM exits cleanly."""
    env = {**os.environ, "ANDES_REDIS_URL": redis_url, "ANDES_SCHEDULER_ADDR": "127.0.0.1:1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{free_port()}",
         "--http-listen", "127.0.0.1:0", "--drain-seconds", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    async def body(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with session.post(f"{url}/v1/completions", json={"prompt": "hi"}) as response:
                assert response.status == 503
                error = (await response.json())["error"]
                assert error["type"] == "server_error" and "scheduler" in error["message"]
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
        assert 'andes_requests_total{outcome="unavailable"} 1.0' in text
        assert ('andes_http_requests_total{endpoint="/v1/completions",outcome="unavailable"}'
                ' 1.0') in text

    with process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("READY gateway 127.0.0.1:")
            http = process.stdout.readline().split()
            assert http[:2] == ["READY", "http"] and not http[2].endswith(":0")
            run(body(f"http://{http[2]}"))
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
