"""Per-API-key limits: the token bucket's properties, the key file, the flags, and both front
ends refusing over real sockets (the fake-scheduler gateway of ``tests/test_gateway.py``, with
its HTTP API on for the OpenAI client).

Requests whose id starts with ``hold`` stay open until they are ended (see the fake scheduler),
which is how these tests fill a key's concurrent-stream limit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from andes.v1 import generation_pb2
from gateway.auth import ANONYMOUS, ApiKey, ApiKeys, hash_key
from gateway.config import GatewayConfig, parse_config
from gateway.ratelimit import KeyLimiter, KeyLimits, TokenBucket, retry_after_seconds
from gateway.server import Gateway, StartupError
from tests.test_gateway import (
    Cluster,
    _check_contiguous,
    _collect,
    _read_rest,
    _rpc_error,
    _until,
    cluster,
    run,
)
from tests.test_http_api import client_of

ALICE, BOB = "alice-key", "bob-key"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket -----------------------------------------------------------------------------

rates = st.floats(min_value=0.01, max_value=1000, allow_nan=False)
bursts = st.floats(min_value=1, max_value=100, allow_nan=False)
steps = st.lists(st.tuples(st.floats(min_value=0, max_value=5, allow_nan=False),
                           st.integers(min_value=0, max_value=4)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, schedule=steps)
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, schedule: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    admitted: list[float] = []
    for wait_s, attempts in schedule:
        clock.now += wait_s
        for _ in range(attempts):
            if bucket.take() == 0.0:
                admitted.append(clock.now)
    # Every window [admitted[i], admitted[j]] holds j - i + 1 admissions.
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + rate * (admitted[j] - start) + 1e-6


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts,
       moves=st.lists(st.tuples(st.floats(min_value=-3, max_value=5, allow_nan=False),
                                st.floats(min_value=0.1, max_value=3, allow_nan=False)),
                      max_size=60))
def test_bucket_level_stays_between_zero_and_burst(
    rate: float, burst: float, moves: list[tuple[float, float]]
) -> None:
    """Whatever the requests and even with a clock that jumps back."""
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    for move_s, cost in moves:
        clock.now += move_s
        before = bucket.tokens
        wait_s = bucket.take(cost)
        assert 0.0 <= bucket.tokens <= burst
        if wait_s:
            assert bucket.tokens == pytest.approx(before), "a refusal takes nothing"
            assert wait_s > 0


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, used=st.integers(min_value=1, max_value=100))
def test_bucket_refills(rate: float, burst: float, used: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    while bucket.take() == 0.0:  # drain it
        pass
    wait_s = bucket.take()
    assert 0 < wait_s <= 1 / rate + 1e-9
    clock.now += wait_s
    assert bucket.take() == 0.0, "waiting the time it said admits the request"
    clock.now += burst / rate * 2
    assert bucket.tokens == pytest.approx(burst), "an idle bucket fills up, and no further"
    for _ in range(min(used, math.floor(burst))):
        assert bucket.take() == 0.0


def test_limiter_counts_streams_and_refuses_without_side_effects() -> None:
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    limits = KeyLimits(rate=1.0, burst=2.0, max_streams=2)
    assert limiter.admit("k", limits) is None and limiter.admit("k", limits) is None
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.limit == "streams" and refusal.retry_after_s is None
    assert "concurrent-stream limit" in refusal.message
    assert limiter.streams("k") == 2
    limiter.release("k")
    limiter.release("k")
    assert limiter.streams("k") == 0
    # Both tokens were taken by the two admissions, none by the refusal.
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.limit == "rate"
    assert refusal.retry_after_s == pytest.approx(1.0) and "rate limit" in refusal.message
    clock.now += 1.0
    assert limiter.admit("k", limits) is None
    assert limiter.admit("other", limits) is None, "each key has its own bucket"
    assert limiter.admit("free", KeyLimits()) is None, "0: unlimited"
    assert [retry_after_seconds(s) for s in (0.01, 1.0, 1.2, math.inf)] == [1, 1, 2, 3600]


def test_key_limits_check_their_values() -> None:
    assert KeyLimits(rate=20).bucket_size == 20 and KeyLimits(rate=0.5).bucket_size == 1
    assert KeyLimits(rate=20, burst=40).bucket_size == 40
    for bad in ({"rate": -1}, {"rate": math.inf}, {"burst": 0.5}, {"max_streams": -1}):
        with pytest.raises(ValueError):
            KeyLimits(**bad)


# -- the key file and the flags -------------------------------------------------------------------


def test_key_file_lines_carry_names_and_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "# old and new format side by side\n"
        f"{hash_key(ALICE)} name=alice rate=20 burst=40 max_streams=64\n"
        f"{hash_key('alice-new')} name=alice rate=20 burst=40 max_streams=64  # rotation\n"
        f"\n{hash_key(BOB).upper()}\n"
    )
    loaded = ApiKeys.load(keys)
    alice = loaded.identify([("authorization", f"Bearer {ALICE}")])
    assert alice == ApiKey("alice", rate=20.0, burst=40.0, max_streams=64)
    assert loaded.identify([("authorization", "Bearer alice-new")]) == alice
    bob = loaded.identify([("Authorization", f"bearer {BOB}")])
    assert bob == ApiKey("line-5"), "unnamed: named after its line, never its digest"
    defaults = KeyLimits(rate=5, burst=10, max_streams=3)
    assert alice.limits(defaults) == KeyLimits(rate=20, burst=40, max_streams=64)
    assert bob.limits(defaults) == defaults
    assert ApiKey("x", rate=0).limits(defaults).rate == 0, "a key may be unlimited"
    assert loaded.identify([("authorization", "Bearer nope")]) is None
    assert ANONYMOUS.name == "anonymous"


BAD_LINES = [
    ("abc", "not a SHA-256 hex digest"),
    ("{digest} rate", "expected setting=value"),
    ("{digest} speed=3", "unknown setting 'speed'"),
    ("{digest} rate=fast", "rate: expected a finite number >= 0"),
    ("{digest} rate=-1", "rate: expected a finite number >= 0"),
    ("{digest} rate=nan", "rate: expected a finite number >= 0"),
    ("{digest} max_streams=1.5", "max_streams: expected a whole number"),
    ("{digest} burst=0.5", "burst must be 0 or >= 1"),
    ("{digest} name=a name=b", "name is given twice"),
    ("{digest} name=al/ice", "name: 'al/ice' is not"),
    ("{digest} name=bob rate=1\n{other} name=bob rate=2", "name=bob is on line 2"),
    ("{digest}\n{digest}", "listed twice"),
]


@pytest.mark.parametrize(("lines", "reason"), BAD_LINES)
def test_a_bad_key_file_line_stops_the_start_naming_it(
    tmp_path: Path, lines: str, reason: str
) -> None:
    keys = tmp_path / "keys.txt"
    text = lines.format(digest=hash_key("one"), other=hash_key("two"))
    keys.write_text(f"# keys\n{text}\n")
    bad_line = text.count("\n") + 2
    with pytest.raises(ValueError) as caught:
        ApiKeys.load(keys)
    assert str(caught.value).startswith(f"{keys}:{bad_line}: "), caught.value
    assert reason in str(caught.value)

    async def start() -> None:
        await Gateway(GatewayConfig(api_keys_file=str(keys)),
                      registry=CollectorRegistry()).start()

    with pytest.raises(StartupError) as failed:
        run(start())
    assert f"keys.txt:{bad_line}: " in str(failed.value)


def test_key_limit_flags_and_their_environment() -> None:
    assert parse_config([], {}).key_limits == KeyLimits()
    env = {"ANDES_KEY_RATE": "2.5", "ANDES_KEY_BURST": "5", "ANDES_KEY_MAX_STREAMS": "7",
           "ANDES_GATEWAY_STALLED_CLIENT_TIMEOUT_S": "30"}
    config = parse_config([], env)
    assert config.key_limits == KeyLimits(rate=2.5, burst=5, max_streams=7)
    assert config.stalled_client_timeout_s == 30
    assert parse_config(["--key-rate", "9", "--key-max-streams", "0"], env).key_limits == (
        KeyLimits(rate=9, burst=5, max_streams=0))
    for bad in (["--key-rate", "-1"], ["--key-burst", "0.5"], ["--key-max-streams", "1.5"],
                ["--stalled-client-timeout-s", "inf"]):
        with pytest.raises(SystemExit):
            parse_config(bad, {})


# -- gRPC over real sockets -----------------------------------------------------------------------


def _keys_file(tmp_path: Path) -> str:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{hash_key(ALICE)} name=alice rate=0.01 burst=2\n"
                    f"{hash_key(BOB)} name=bob max_streams=1\n")
    return str(keys)


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _request(request_id: str = "", max_tokens: int = 3) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id=request_id, prompt="hi",
                                          max_tokens=max_tokens)


def test_grpc_rate_limit_is_resource_exhausted_with_retry_after(
    redis_url: str, tmp_path: Path
) -> None:
    async def body() -> None:
        async with cluster(redis_url, api_keys_file=_keys_file(tmp_path)) as c:
            for _ in range(2):  # the burst
                responses = await _collect(c.stub.Generate(_request(), metadata=_auth(ALICE),
                                                           timeout=10))
                assert _check_contiguous(responses) == 3
            error = await _rpc_error(c.stub.Generate(_request(), metadata=_auth(ALICE),
                                                     timeout=10))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "API key 'alice' is over its rate limit" in (error.details() or "")
            trailers = dict(error.trailing_metadata() or ())
            assert 1 <= int(trailers["retry-after"]) <= 100
            # Other keys have buckets of their own.
            responses = await _collect(c.stub.Generate(_request(), metadata=_auth(BOB),
                                                       timeout=10))
            assert _check_contiguous(responses) == 3
            assert c.metric("andes_gateway_rate_limited_total", key="alice", limit="rate") == 1
            assert c.metric("andes_gateway_rate_limited_total", key="bob", limit="rate") == 0
            assert c.metric("andes_requests_total", outcome="rejected") == 1
            text = generate_latest(c.registry).decode().lower()
            for secret in (ALICE, hash_key(ALICE)):
                assert secret not in text, "metrics name keys, never the key or its digest"

    run(body())


def test_grpc_stream_limit_is_released_however_a_stream_ends(
    redis_url: str, tmp_path: Path
) -> None:
    """bob may hold one stream; each way a stream can end gives it back."""

    async def refused(c: Cluster) -> None:
        error = await _rpc_error(c.stub.Generate(_request(), metadata=_auth(BOB), timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "API key 'bob' is at its concurrent-stream limit (1 streams)" in (
            error.details() or "")
        assert "retry-after" not in dict(error.trailing_metadata() or ())

    async def held(c: Cluster, request_id: str, **kwargs: Any) -> Any:
        call = c.stub.Generate(_request(request_id), metadata=_auth(BOB), **kwargs)
        assert (await call.read()).index == 0
        assert c.gateway.service.key_streams("bob") == 1
        await refused(c)
        return call

    async def released(c: Cluster) -> None:
        await _until(lambda: c.gateway.service.key_streams("bob") == 0)
        await _until(lambda: c.gateway.service.active_streams == 0)

    async def body() -> None:
        async with cluster(redis_url, api_keys_file=_keys_file(tmp_path)) as c:
            # finished
            assert _check_contiguous(await _collect(
                c.stub.Generate(_request(), metadata=_auth(BOB), timeout=10))) == 3
            await released(c)
            # cancelled by the Cancel RPC
            call = await held(c, "hold-cancel", timeout=10)
            await c.stub.Cancel(generation_pb2.CancelRequest(request_id="hold-cancel"),
                                metadata=_auth(BOB), timeout=10)
            rest = await _read_rest(call)
            assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
            await released(c)
            # the client went away
            call = await held(c, "hold-gone", timeout=10)
            call.cancel()
            await released(c)
            # the client's deadline passed
            call = await held(c, "hold-late", timeout=1.0)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await _read_rest(call)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await released(c)
            # an error: an invalid request is admitted first, then refused
            invalid = generation_pb2.GenerateRequest(prompt="")
            error = await _rpc_error(c.stub.Generate(invalid, metadata=_auth(BOB), timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            await released(c)
            # the gateway stops: streams in progress are cancelled
            call = await held(c, "hold-stop", timeout=10)
            assert c.metric("andes_gateway_rate_limited_total", key="bob",
                            limit="streams") == 4
            await c.gateway.stop()
            await _until(lambda: c.gateway.service.key_streams("bob") == 0)
            call.cancel()

    run(body())


def test_without_api_keys_every_client_is_the_anonymous_key(redis_url: str) -> None:
    async def body() -> None:
        async with cluster(redis_url, key_limits=KeyLimits(max_streams=1)) as c:
            call = c.stub.Generate(_request("hold-anon"), timeout=10)
            await call.read()
            assert c.gateway.service.key_streams("anonymous") == 1
            error = await _rpc_error(c.stub.Generate(_request(), timeout=10))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'anonymous' is at its concurrent-stream limit" in (error.details() or "")
            assert c.metric("andes_gateway_rate_limited_total", key="anonymous",
                            limit="streams") == 1
            call.cancel()
            await _until(lambda: c.gateway.service.key_streams("anonymous") == 0)
            assert _check_contiguous(await _collect(c.stub.Generate(_request(),
                                                                    timeout=10))) == 3

    run(body())


# -- HTTP over real sockets -----------------------------------------------------------------------


def test_http_limits_are_429_with_retry_after(redis_url: str, tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(redis_url, api_keys_file=_keys_file(tmp_path),
                           http_listen="127.0.0.1:0") as c:
            gateway = c.gateway
            async with client_of(gateway, ALICE) as alice:
                for _ in range(2):
                    answer = await alice.completions.create(model="andes", prompt="hi",
                                                            max_tokens=3)
                    assert answer.usage is not None and answer.usage.completion_tokens == 3
                with pytest.raises(openai.RateLimitError) as caught:
                    await alice.completions.create(model="andes", prompt="hi", max_tokens=3)
            error = caught.value
            assert error.status_code == 429 and error.type == "rate_limit_error"
            assert "API key 'alice' is over its rate limit" in error.message
            retry_after = error.response.headers["Retry-After"]
            assert retry_after.isdigit() and 1 <= int(retry_after) <= 100

            async with client_of(gateway, BOB) as bob:
                held = await bob.completions.create(
                    model="andes", prompt="hi", stream=True,
                    extra_headers={"x-request-id": "hold-http"})
                first = await held.__anext__()
                assert first.choices[0].text
                assert gateway.service.key_streams("bob") == 1
                with pytest.raises(openai.RateLimitError) as caught:
                    await bob.completions.create(model="andes", prompt="hi", max_tokens=3)
                assert "concurrent-stream limit" in caught.value.message
                assert "Retry-After" not in caught.value.response.headers
                await held.close()  # the client disconnects
                await _until(lambda: gateway.service.key_streams("bob") == 0)
                # A request refused inside admission (a bad field) gives its stream back too.
                with pytest.raises(openai.BadRequestError):
                    await bob.completions.create(model="andes", prompt="", max_tokens=3)
                assert gateway.service.key_streams("bob") == 0
                answer = await bob.completions.create(model="andes", prompt="hi",
                                                      max_tokens=3)
                assert answer.choices[0].finish_reason == "length"
            await _until(lambda: gateway.service.key_streams("bob") == 0)
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://{gateway.http_address}/metrics") as response:
                text = await response.text()
            assert 'andes_gateway_rate_limited_total{key="alice",limit="rate"} 1.0' in text
            assert 'andes_gateway_rate_limited_total{key="bob",limit="streams"} 1.0' in text
            assert hash_key(ALICE) not in text and ALICE not in text

    run(body())
