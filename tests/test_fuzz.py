"""Property-based fuzzing of the gateway's two public APIs: every malformed input gets a clear
client error, never a server error, a crash or a hang; every valid one is served.

One gateway serves the module, gRPC and HTTP, on an event loop of its own (a thread): the
gateway of :func:`tests.test_gateway.cluster`, whose fake scheduler writes each request's
tokens to a real Redis. Hypothesis drives it from the test thread with blocking clients over
real sockets, one input at a time:

* gRPC ``Generate``: bad and borderline ``GenerateRequest`` messages (field by field, around
  every limit), raw bytes that are no message at all (random, mutated, hand-made wire format,
  strings that are not UTF-8) and messages over the size limit; ``Cancel`` gets a share too;
* HTTP ``POST /v1/completions`` and ``/v1/chat/completions``: bodies with wrong types for every
  field, unknown fields, nested garbage, huge numbers, ``NaN`` literals, bytes that are not
  JSON or not UTF-8, bodies over the size limit, bad headers (QoE, request id, content type
  and encoding), chunked uploads, wrong methods.

Each input's answer is predicted by an oracle (the gateway's own pure parsing functions, which
their unit tests pin down, plus what the module has sent so far: a reused request id is
ALREADY_EXISTS / 409, a resume is NOT_FOUND unless the id was served). The answer must be
exactly that: for a rejected input a client-error status whose message names the field (gRPC
details, or the OpenAI error body's ``message`` and ``param``), for a valid one a stream that
completes with every token. A server error (UNKNOWN, INTERNAL, 5xx), a hang (the call's
deadline) or an error logged by the gateway fails the test, and the gateway must serve a valid
request afterwards.

``ANDES_FUZZ_EXAMPLES`` sets the inputs per API (default 300, so the suite stays fast; ``make
fuzz`` runs 10,000). With ``ANDES_FUZZ_REPORT`` naming a file, the counts are written there as
JSON: inputs sent per API, their outcomes, and the server errors seen (0).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import math
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from andes.tokenstream import FINISHED_TTL_S
from andes.v1 import generation_pb2
from gateway.chat import DEFAULT_CHAT_TEMPLATE
from gateway.grpc_api import max_request_bytes
from gateway.http_api import body_limit
from gateway.openai_request import parse_chat, parse_completion
from gateway.validation import (
    Limits,
    ValidationError,
    ValidRequest,
    check_request_id,
    validate,
)
from tests.test_gateway import Cluster, _text, _token_ids, cluster

EXAMPLES = int(os.environ.get("ANDES_FUZZ_EXAMPLES", "300"))
REPORT = os.environ.get("ANDES_FUZZ_REPORT", "")

LIMITS = Limits(max_tokens_limit=24, default_max_tokens=5, max_prompt_chars=2000,
                max_prompt_tokens=400)
"""Small limits, so inputs around and past every one of them are cheap to send."""
GRPC_MAX_BYTES = max_request_bytes(LIMITS)
HTTP_MAX_BYTES = body_limit(LIMITS)
CALL_TIMEOUT_S = 20.0
"""A call still running after this long hangs: DEADLINE_EXCEEDED fails the test."""
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

CLIENT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
})
"""The statuses that say "your request is wrong"; any other failure is the server's."""

GENERATE = "/andes.v1.GenerationService/Generate"
CANCEL = "/andes.v1.GenerationService/Cancel"

T = TypeVar("T")


# -- the record of the run ----------------------------------------------------------------------


@dataclass
class ApiRecord:
    """What one API was sent and how it answered."""

    sent: int = 0
    server_errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"inputs_sent": self.sent, "server_errors": self.server_errors,
                "outcomes": dict(sorted(self.outcomes.items())),
                "seconds": round(self.seconds, 1)}


RECORD = {"grpc": ApiRecord(), "http": ApiRecord()}


def write_report() -> None:
    """The run's counts, as JSON, where ``ANDES_FUZZ_REPORT`` says (nothing when unset)."""
    if not REPORT:
        return
    report = {
        "examples_per_api": EXAMPLES,
        "limits": {"max_tokens_limit": LIMITS.max_tokens_limit,
                   "max_prompt_chars": LIMITS.max_prompt_chars,
                   "max_prompt_tokens": LIMITS.max_prompt_tokens,
                   "grpc_max_request_bytes": GRPC_MAX_BYTES,
                   "http_max_body_bytes": HTTP_MAX_BYTES},
        **{api: record.as_json() for api, record in RECORD.items()},
        "server_errors": sum(record.server_errors for record in RECORD.values()),
    }
    path = Path(REPORT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


class ErrorLog(logging.Handler):
    """Collects the errors anything in the process logs (an unexpected exception in a
    handler, a task that died): each is a server bug even when the client got an answer."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


# -- the gateway --------------------------------------------------------------------------------


@dataclass
class Ledger:
    """The request ids the gateway accepted so far (an id can be used once), the number of
    tokens each response has and when it finished (its payload expires after
    ``FINISHED_TTL_S``, after which a resume is NOT_FOUND)."""

    lengths: dict[str, int] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)

    def add(self, request_id: str, length: int) -> None:
        self.lengths[request_id] = length
        self.finished_at[request_id] = time.monotonic()

    def may_have_expired(self, request_id: str) -> bool:
        return time.monotonic() - self.finished_at[request_id] > FINISHED_TTL_S - 10


class GatewayThread:
    """The test gateway (gRPC and HTTP) on an event loop running in a thread."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-gateway",
                                        daemon=True)
        self._stack = AsyncExitStack()
        self._cluster: Cluster | None = None
        self.ledger = Ledger()
        self.errors = ErrorLog()

    @property
    def cluster(self) -> Cluster:
        assert self._cluster is not None, "the gateway has not started"
        return self._cluster

    def run(self, work: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout_s)

    def start(self) -> None:
        self._thread.start()
        # No held requests: the fuzzed request ids are arbitrary.
        self._cluster = self.run(self._stack.enter_async_context(cluster(
            self.redis_url, hold_prefix="", http_listen="127.0.0.1:0", limits=LIMITS,
        )))
        logging.getLogger().addHandler(self.errors)

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        try:
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def idle(self) -> bool:
        """No stream is left open in the gateway (checked after every input)."""
        deadline = time.monotonic() + 5
        while self.cluster.gateway.service.active_streams:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


@pytest.fixture(scope="module")
def fuzz_gateway(redis_url: str) -> Iterator[GatewayThread]:
    running = GatewayThread(redis_url)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        write_report()


# -- wire format helpers ------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint (a negative value as its 64-bit two's complement)."""
    value &= UINT64_MAX
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


NOT_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xe2\x82",
            b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xf8\x88\x80")
"""Byte strings that are not UTF-8: stray and truncated sequences, surrogates, code points
past U+10FFFF, overlong forms."""


# -- gRPC inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcCase:
    """One call: the serialized request and which RPC gets it."""

    kind: str
    """What the strategy made (``message``, ``not-utf8``, ``random``, ``mutated``, ``wire``,
    ``oversize``, ``cancel``): the report counts outcomes by it."""
    raw: bytes
    method: str = GENERATE
    bad_utf8_field: str | None = None
    """The field whose string is not UTF-8, when the strategy knows it."""

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep huge ones readable
        raw = self.raw if len(self.raw) <= 400 else self.raw[:400] + b"..."
        return (f"GrpcCase(kind={self.kind!r}, method={self.method!r}, len={len(self.raw)}, "
                f"raw={raw!r}, bad_utf8_field={self.bad_utf8_field!r})")


def floats(*edges: float) -> st.SearchStrategy[float]:
    """Any double (NaN, infinities, subnormals, huge), with ``edges`` made likely."""
    return st.one_of(st.sampled_from(edges), st.floats(), st.floats(-10, 1e7))


TEXT = st.text(max_size=40)
PRINTABLE = st.text(st.characters(min_codepoint=32, codec="utf-8"), min_size=1, max_size=40)
VALID_ID = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
FRESH_ID = st.uuids().map(lambda u: f"fz-{u.hex}")


def long_text(low: int, high: int) -> st.SearchStrategy[str]:
    """A text of ``low`` to ``high`` characters (built, not drawn character by character),
    some of them multi-byte."""
    return st.builds(lambda n, unit: (unit * n)[:n], st.integers(low, high),
                     st.sampled_from(["x", "é", "字", "😀", "a\x00", "ab\n"]))


@st.composite
def good_requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    """A request the gateway must serve, often at a limit."""
    request = generation_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), FRESH_ID, VALID_ID)),
        max_tokens=draw(st.integers(0, LIMITS.max_tokens_limit)),
    )
    if draw(st.booleans()):
        request.prompt = draw(st.one_of(PRINTABLE, TEXT.filter(bool),
                                        long_text(1, LIMITS.max_prompt_chars)))
    else:
        request.prompt_token_ids.extend(draw(st.one_of(
            st.lists(st.integers(0, UINT32_MAX), min_size=1, max_size=20),
            st.builds(lambda n, t: [t] * n, st.integers(1, LIMITS.max_prompt_tokens),
                      st.integers(0, UINT32_MAX)),
        )))
    if draw(st.booleans()):
        sampling = request.sampling
        sampling.top_k = draw(st.integers(0, UINT32_MAX))
        sampling.ignore_eos = draw(st.booleans())
        if draw(st.booleans()):
            sampling.temperature = draw(st.one_of(st.sampled_from([0.0, 1.0, 2.0]),
                                                  st.floats(0, 1e30)))
        if draw(st.booleans()):
            sampling.top_p = draw(st.one_of(st.just(1.0), st.floats(1e-30, 1)))
        if draw(st.booleans()):
            sampling.seed = draw(st.integers(0, UINT64_MAX))
        sampling.stop.extend(draw(st.lists(
            st.one_of(PRINTABLE, long_text(1, 256)), max_size=16)))
    if draw(st.booleans()):
        request.qoe.ttft_s = draw(st.one_of(st.sampled_from([0.0, 1e-9, 3600.0]),
                                            st.floats(0, 3600)))
        request.qoe.tds = draw(st.one_of(st.sampled_from([0.0, 0.01, 1e6]),
                                         st.floats(0.01, 1e6)))
    return request


SPOILABLE = (
    "request_id", "no_request_id", "prompt", "prompt_token_ids", "no_prompt", "max_tokens",
    "ttft_s", "tds", "temperature", "top_p", "top_k", "seed", "stop", "resume_from_index",
    "reattach",
)
"""The fields (and field combinations) that :func:`spoil` knows how to get wrong."""


def spoil(draw: st.DrawFn, request: generation_pb2.GenerateRequest, name: str) -> None:
    """Give ``request`` a bad or borderline value of ``name`` (several may combine)."""
    sampling = request.sampling
    if name == "request_id":
        request.request_id = draw(st.one_of(
            TEXT, long_text(129, 5000), st.builds(lambda n: "x" * n, st.integers(120, 140)),
            st.sampled_from(["a b", "a/b", "é", "id\n", "-" * 129, "*", "a\x00"])))
    elif name == "no_request_id":
        request.ClearField("request_id")
    elif name == "prompt":
        request.prompt = draw(st.one_of(
            st.just(""), TEXT,
            long_text(LIMITS.max_prompt_chars - 2, LIMITS.max_prompt_chars + 2),
            long_text(LIMITS.max_prompt_chars, 4 * LIMITS.max_prompt_chars)))
    elif name == "prompt_token_ids":
        request.prompt_token_ids.extend(draw(st.one_of(
            st.lists(st.sampled_from([0, 1, UINT32_MAX, 2**31]), max_size=5),
            st.builds(lambda n: [7] * n, st.integers(LIMITS.max_prompt_tokens - 2,
                                                     3 * LIMITS.max_prompt_tokens)))))
    elif name == "no_prompt":
        request.ClearField("prompt")
        request.ClearField("prompt_token_ids")
    elif name == "max_tokens":
        request.max_tokens = draw(st.one_of(
            st.sampled_from([0, 1, LIMITS.max_tokens_limit, LIMITS.max_tokens_limit + 1,
                             UINT32_MAX]),
            st.integers(0, UINT32_MAX)))
    elif name == "ttft_s":
        request.qoe.ttft_s = draw(floats(math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0,
                                         5e-324, 3600.0, 3600.0000001, 1e308))
    elif name == "tds":
        request.qoe.tds = draw(floats(math.nan, math.inf, -math.inf, -1.0, 0.0, 5e-324, 0.01,
                                      0.0099999, 1e6, 1e6 + 1))
    elif name == "temperature":
        sampling.temperature = draw(floats(math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0,
                                           1e39, -1e-45, 3.4e38))
    elif name == "top_p":
        sampling.top_p = draw(floats(math.nan, math.inf, -1.0, 0.0, 1e-46, 1.0, 1.0000001,
                                     1.5, 2.0))
    elif name == "top_k":
        sampling.top_k = draw(st.sampled_from([0, 1, UINT32_MAX, 2**31]))
    elif name == "seed":
        sampling.seed = draw(st.sampled_from([0, UINT64_MAX, 2**63]))
    elif name == "stop":
        del sampling.stop[:]
        sampling.stop.extend(draw(st.one_of(
            st.lists(TEXT, min_size=1, max_size=20),
            st.builds(lambda n: ["s"] * n, st.integers(16, 40)),
            st.lists(long_text(250, 600), min_size=1, max_size=3))))
    elif name == "resume_from_index":
        request.resume_from_index = draw(st.one_of(st.sampled_from([1, 2, 5, UINT64_MAX]),
                                                   st.integers(0, UINT64_MAX)))
    elif name == "reattach":
        request.reattach = True
    else:
        raise AssertionError(f"unknown field {name}")


@st.composite
def request_messages(draw: st.DrawFn) -> GrpcCase:
    """A good request with zero to three fields spoiled."""
    request = draw(good_requests())
    for name in draw(st.lists(st.sampled_from(SPOILABLE), max_size=3, unique=True)):
        spoil(draw, request, name)
    return GrpcCase("message", request.SerializeToString())


@st.composite
def not_utf8_messages(draw: st.DrawFn) -> GrpcCase:
    """A good request plus one string field that is not UTF-8: the error must name it."""
    request = draw(good_requests())
    bad = draw(st.sampled_from(NOT_UTF8))
    text = draw(TEXT).encode() + bad + draw(TEXT).encode()
    where = draw(st.sampled_from(["request_id", "prompt", "sampling.stop"]))
    if where == "sampling.stop":
        good = draw(st.lists(PRINTABLE, max_size=3))
        payload = b"".join(length_delimited(5, s.encode()) for s in good)
        extra = length_delimited(5, payload + length_delimited(5, text))
        name = f"sampling.stop[{len(good)}]"
    else:
        extra = length_delimited(1 if where == "request_id" else 2, text)
        name = where
    raw = request.SerializeToString()
    if draw(st.booleans()):  # the bad field first or last: the parser stops at it either way
        raw = extra + raw
    else:
        raw += extra
    return GrpcCase("not-utf8", raw, bad_utf8_field=name)


@st.composite
def wire_field(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One field in hand-made wire format: known or unknown numbers, any wire type (also the
    invalid 6 and 7 and unbalanced groups), values out of their type's range, lengths that
    lie, strings that are not UTF-8, nested garbage."""
    number = draw(st.one_of(st.integers(1, 9), st.sampled_from([0, 2**29 - 1, 19000]),
                            st.integers(0, 2**29 - 1)))
    wire_type = draw(st.one_of(st.sampled_from([0, 2]), st.integers(0, 7)))
    head = tag(number, wire_type)
    if wire_type == 0:
        body = varint(draw(st.one_of(st.sampled_from([UINT32_MAX + 1, UINT64_MAX, -1, 2**63]),
                                     st.integers(-2**63, UINT64_MAX))))
    elif wire_type == 1:
        body = draw(st.binary(min_size=8, max_size=8))
    elif wire_type == 5:
        body = draw(st.binary(min_size=4, max_size=4))
    elif wire_type == 2:
        if depth < 2 and draw(st.booleans()):
            payload = b"".join(draw(st.lists(wire_field(depth + 1), max_size=3)))
        else:
            payload = draw(st.one_of(st.binary(max_size=30), st.sampled_from(NOT_UTF8),
                                     TEXT.map(str.encode)))
        length = len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**20]))
        body = varint(length) + payload
    else:
        body = draw(st.binary(max_size=8))
    if draw(st.integers(0, 9)) == 0:  # truncated
        body = body[:draw(st.integers(0, max(len(body) - 1, 0)))]
    return head + body


@st.composite
def wire_messages(draw: st.DrawFn) -> GrpcCase:
    fields = draw(st.lists(wire_field(), min_size=1, max_size=6))
    if draw(st.booleans()):  # among good fields
        fields.append(draw(good_requests()).SerializeToString())
        fields = draw(st.permutations(fields))
    return GrpcCase("wire", b"".join(fields))


@st.composite
def mutated_messages(draw: st.DrawFn) -> GrpcCase:
    """A good request's bytes with a few bytes flipped, inserted, deleted or cut off."""
    raw = bytearray(draw(good_requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, len(raw)))
        if operation == "flip" and position < len(raw):
            raw[position] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            raw[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete":
            del raw[position:position + draw(st.integers(1, 4))]
        else:
            del raw[position:]
    return GrpcCase("mutated", bytes(raw))


@st.composite
def oversize_messages(draw: st.DrawFn) -> GrpcCase:
    """A prompt of text or token ids, near the size limit or far past it."""
    size = draw(st.one_of(st.integers(GRPC_MAX_BYTES - 40, GRPC_MAX_BYTES + 40),
                          st.integers(GRPC_MAX_BYTES, 4 * GRPC_MAX_BYTES)))
    if draw(st.booleans()):
        raw = length_delimited(2, b"x" * size)
    else:
        raw = length_delimited(3, varint(UINT32_MAX) * (size // 5))
    return GrpcCase("oversize", raw)


@st.composite
def cancel_requests(draw: st.DrawFn) -> GrpcCase:
    raw = draw(st.one_of(
        st.builds(lambda i: generation_pb2.CancelRequest(request_id=i).SerializeToString(),
                  st.one_of(VALID_ID, TEXT, long_text(100, 300))),
        st.binary(max_size=40),
        st.builds(lambda bad: length_delimited(1, bad), st.sampled_from(NOT_UTF8)),
        st.builds(lambda fields: b"".join(fields), st.lists(wire_field(), max_size=3)),
    ))
    return GrpcCase("cancel", raw, method=CANCEL)


GRPC_CASES = st.one_of(
    request_messages(), request_messages(), request_messages(), not_utf8_messages(),
    st.builds(lambda raw: GrpcCase("random", raw), st.binary(max_size=300)),
    mutated_messages(), wire_messages(), oversize_messages(), cancel_requests(),
)


# -- gRPC oracle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcExpect:
    """The answer a request must get."""

    codes: frozenset[grpc.StatusCode]
    """Acceptable statuses (OK: a stream that completes)."""
    details: str | None = None
    """The exact error message, where the oracle knows it."""
    details_prefix: str = ""
    valid: ValidRequest | None = None
    length: int = 0
    """Tokens of the whole response (a resumed one replays from its index)."""


def expect_grpc(case: GrpcCase, ledger: Ledger) -> GrpcExpect:
    invalid = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
    if len(case.raw) > GRPC_MAX_BYTES:
        return GrpcExpect(frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    message_type = (generation_pb2.CancelRequest if case.method == CANCEL
                    else generation_pb2.GenerateRequest)
    message = message_type()
    try:
        message.ParseFromString(case.raw)
    except Exception:
        if case.bad_utf8_field is not None:
            return GrpcExpect(invalid, details=f"{case.bad_utf8_field}: not valid UTF-8 text")
        return GrpcExpect(invalid)
    if case.method == CANCEL:
        try:
            check_request_id(message.request_id)
        except ValidationError as err:
            return GrpcExpect(invalid, details=str(err))
        return GrpcExpect(frozenset({grpc.StatusCode.OK}))
    try:
        valid = validate(message, LIMITS)
    except ValidationError as err:
        return GrpcExpect(invalid, details=str(err))
    request_id = valid.request_id
    if valid.is_resume:
        if request_id not in ledger.lengths:
            return GrpcExpect(frozenset({grpc.StatusCode.NOT_FOUND}),
                              details_prefix="request_id: ")
        length = ledger.lengths[request_id]
        codes = {grpc.StatusCode.OK if valid.resume_from_index <= length
                 else grpc.StatusCode.OUT_OF_RANGE}
        if ledger.may_have_expired(request_id):
            codes.add(grpc.StatusCode.NOT_FOUND)
        return GrpcExpect(frozenset(codes), valid=valid, length=length)
    if not valid.id_generated and request_id in ledger.lengths:
        return GrpcExpect(frozenset({grpc.StatusCode.ALREADY_EXISTS}),
                          details_prefix="request_id: ")
    return GrpcExpect(frozenset({grpc.StatusCode.OK}), valid=valid, length=valid.max_tokens)


def check_stream(responses: list[generation_pb2.GenerateResponse], expect: GrpcExpect) -> None:
    """A complete response: contiguous messages from the request's start index, the fake
    scheduler's tokens, one finish reason on the last message, the usage."""
    valid = expect.valid
    assert valid is not None
    assert responses, "an OK stream with no message"
    position = valid.resume_from_index
    for response in responses:
        assert response.index == position, "message indices must be contiguous"
        assert list(response.token_ids) == list(_token_ids(position, position
                                                           + len(response.token_ids)))
        position += len(response.token_ids)
        if not valid.id_generated:
            assert response.request_id == valid.request_id
    assert position == expect.length, f"{position} tokens of {expect.length}"
    assert {r.request_id for r in responses} == {responses[0].request_id}
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert all(r.finish_reason == 0 for r in responses[:-1])
    assert responses[-1].usage.completion_tokens == expect.length
    if valid.resume_from_index == 0:
        assert "".join(r.text for r in responses) == _text(_token_ids(0, expect.length))


def send_grpc(channel: grpc.Channel, case: GrpcCase) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Send ``case.raw`` as is (identity serializer): (status, details, responses)."""
    responses: list[Any] = []
    try:
        if case.method == CANCEL:
            cancel = channel.unary_unary(
                CANCEL, request_serializer=None,
                response_deserializer=generation_pb2.CancelResponse.FromString)
            responses.append(cancel(case.raw, timeout=CALL_TIMEOUT_S))
        else:
            generate = channel.unary_stream(
                GENERATE, request_serializer=None,
                response_deserializer=generation_pb2.GenerateResponse.FromString)
            responses.extend(generate(case.raw, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as err:
        return err.code(), err.details() or "", responses
    return grpc.StatusCode.OK, "", responses


def check_grpc(gateway: GatewayThread, channel: grpc.Channel, case: GrpcCase) -> None:
    expect = expect_grpc(case, gateway.ledger)
    record = RECORD["grpc"]
    record.sent += 1
    code, details, responses = send_grpc(channel, case)
    record.outcomes[f"{case.kind}:{code.name}"] += 1
    if code not in CLIENT_CODES and code != grpc.StatusCode.OK:
        record.server_errors += 1
        raise AssertionError(f"server error {code.name}: {details!r}")
    assert code in expect.codes, f"{code.name} ({details!r}), expected {expect.codes}"
    if code == grpc.StatusCode.OK:
        if case.method == GENERATE:
            check_stream(responses, expect)
            assert expect.valid is not None
            if not expect.valid.is_resume:
                gateway.ledger.add(responses[0].request_id, expect.length)
    else:
        assert details.strip(), "an error without a message"
        if expect.details is not None:
            assert details == expect.details
        assert details.startswith(expect.details_prefix), details
    assert gateway.idle(), "a stream stayed open after its call ended"


def valid_grpc_call(channel: grpc.Channel) -> None:
    """The gateway still serves: a plain request completes."""
    generate = channel.unary_stream(
        GENERATE, request_serializer=generation_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generation_pb2.GenerateResponse.FromString)
    responses = list(generate(generation_pb2.GenerateRequest(prompt="still there?",
                                                             max_tokens=4),
                              timeout=CALL_TIMEOUT_S))
    assert sum(len(r.token_ids) for r in responses) == 4
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)
"""No example database: each run explores afresh (a failure prints its input)."""


def test_grpc_generate_never_fails_on_the_server(fuzz_gateway: GatewayThread) -> None:
    started = time.monotonic()
    before = RECORD["grpc"].sent
    with grpc.insecure_channel(fuzz_gateway.cluster.gateway.address) as channel:

        @FUZZ_SETTINGS
        @given(case=GRPC_CASES)
        def fuzz(case: GrpcCase) -> None:
            check_grpc(fuzz_gateway, channel, case)

        try:
            fuzz()
        finally:
            RECORD["grpc"].seconds += time.monotonic() - started
            write_report()
        valid_grpc_call(channel)
    sent = RECORD["grpc"].sent - before
    print(f"gRPC: {sent} inputs sent, {RECORD['grpc'].server_errors} server errors")
    assert sent >= EXAMPLES
    assert RECORD["grpc"].server_errors == 0
    assert fuzz_gateway.errors.records == [], "the gateway logged errors"


# -- HTTP inputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    """One HTTP request as it goes on the wire."""

    kind: str
    path: str
    body: bytes
    method: str = "POST"
    headers: tuple[tuple[str, bytes], ...] = ()
    chunked: bool = False
    encoding: str = ""
    """A Content-Encoding header; ``body`` is then encoded with it (or claims to be)."""
    plain: bytes | None = None
    """The body before its content encoding, None when it is not validly encoded."""

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 400 else self.body[:400] + b"..."
        return (f"HttpCase(kind={self.kind!r}, {self.method} {self.path}, "
                f"headers={self.headers!r}, chunked={self.chunked}, "
                f"encoding={self.encoding!r}, len={len(self.body)}, body={body!r})")


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, -2**64, 10**300, 10**4000]),
    floats(math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324), TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
"""Any JSON value, NaN and infinities included (Python writes and reads them as literals)."""

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]),
     "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": TEXT}), max_size=3))},
    optional={"name": TEXT},
)


@st.composite
def good_bodies(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """A body the gateway must serve, often at a limit."""
    body: dict[str, Any] = {"model": draw(st.sampled_from(["andes", "gpt-4o", ""]))}
    if chat:
        body["messages"] = draw(st.lists(MESSAGE, min_size=1, max_size=4))
        if draw(st.booleans()):
            body["messages"] = [{"role": "user", "content": draw(long_text(1, 1900))}]
    else:
        body["prompt"] = draw(st.one_of(
            PRINTABLE, long_text(1, LIMITS.max_prompt_chars),
            st.lists(st.integers(0, UINT32_MAX), min_size=1, max_size=20),
            st.builds(lambda n: [3] * n, st.integers(1, LIMITS.max_prompt_tokens)),
            st.builds(lambda text: [text], PRINTABLE),
            st.builds(lambda ids: [ids], st.lists(st.integers(0, UINT32_MAX), min_size=1,
                                                  max_size=5)),
        ))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "max_tokens": st.integers(1, LIMITS.max_tokens_limit),
        "temperature": st.one_of(st.just(0), st.floats(0, 1e30)),
        "top_p": st.one_of(st.just(1), st.floats(1e-30, 1)),
        "top_k": st.one_of(st.just(-1), st.integers(0, UINT32_MAX)),
        "seed": st.integers(0, UINT64_MAX),
        "stop": st.one_of(PRINTABLE, st.lists(PRINTABLE, max_size=16)),
        "n": st.just(1),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
        "qoe": st.fixed_dictionaries({}, optional={"ttft_s": st.floats(1e-6, 3600),
                                                   "tds": st.floats(0.01, 1e6)}),
        "user": TEXT,
        "logprobs": st.sampled_from([None, False]),
        "echo": st.just(False),
        "frequency_penalty": st.floats(-2, 2),
        "logit_bias": st.just({}),
    }
    if chat:
        optional["max_completion_tokens"] = st.integers(1, LIMITS.max_tokens_limit)
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        body[name] = draw(optional[name])
    return body


BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(st.sampled_from(["", [], [[]], [""], ["a", "b"], [[1], [2]], [1, "a"],
                                         [True], [-1], [2**32], [1.0], [["a"]], {}]),
                        long_text(LIMITS.max_prompt_chars + 1, 3 * LIMITS.max_prompt_chars),
                        st.builds(lambda n: [1] * n, st.integers(LIMITS.max_prompt_tokens + 1,
                                                                 2 * LIMITS.max_prompt_tokens))),
    "messages": st.one_of(
        st.sampled_from([[], {}, "hi", [None], [{}], [{"role": "user"}],
                         [{"role": "tool", "content": "x"}],
                         [{"role": "user", "content": [{"type": "image_url"}]}],
                         [{"role": "user", "content": [{"type": "text", "text": 1}]}],
                         [{"role": "user", "content": None}]]),
        st.lists(st.fixed_dictionaries({"role": JSON_VALUES, "content": JSON_VALUES}),
                 max_size=3),
        st.builds(lambda text: [{"role": "user", "content": text}],
                  long_text(LIMITS.max_prompt_chars - 20, 3 * LIMITS.max_prompt_chars))),
    "max_tokens": st.sampled_from([0, -1, LIMITS.max_tokens_limit + 1, 2**32, 2**64, 1.5, "3",
                                   True, math.nan, [], 10**400]),
    "max_completion_tokens": st.sampled_from([0, -5, LIMITS.max_tokens_limit + 1, 2.0, "1"]),
    "temperature": st.sampled_from([-1, -1e-45, math.nan, math.inf, -math.inf, 1e39, 10**400,
                                    "0.5", True, [0.5]]),
    "top_p": st.sampled_from([0, -0.5, 1.0000001, 1.5, 1e-46, math.nan, math.inf, "1", False]),
    "top_k": st.sampled_from([-2, 2**32, 1.0, "5", True]),
    "seed": st.sampled_from([-1, 2**64, 1.5, "7", False]),
    "stop": st.one_of(st.sampled_from(["", [""], [1], ["a", None], {}, 5, ["s"] * 17]),
                      st.builds(lambda n: ["x" * n], st.integers(257, 600))),
    "n": st.sampled_from([0, 2, 10, -1, 1.0, "1", True, 2**40]),
    "stream": st.sampled_from([1, 0, "true", "false", [], {}]),
    "stream_options": st.sampled_from(["x", [], 1, {"include_usage": "yes"},
                                       {"include_usage": 1}]),
    "ignore_eos": st.sampled_from([1, "no", [], {}]),
    "qoe": st.one_of(
        st.sampled_from(["fast", [], 1, True]),
        st.fixed_dictionaries({}, optional={
            "ttft_s": st.sampled_from([0, -1, math.nan, math.inf, 3601, 1e308, 10**400, "1",
                                       True, None, [], 5e-324]),
            "tds": st.sampled_from([0, -1, math.nan, math.inf, 0.001, 1e6 + 1, "fast", False,
                                    None, {}]),
        })),
}
"""Values of each known field that the gateway must reject (or, for a few, accept)."""


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """A header value: printable ASCII or bytes >= 0x80 (not necessarily UTF-8), no
    surrounding whitespace (what HTTP allows on the wire)."""
    allowed = st.one_of(st.integers(0x21, 0x7E), st.integers(0x80, 0xFF), st.just(0x20))
    raw = bytes(draw(st.lists(allowed, min_size=1, max_size=60))).strip()
    return raw or b"x"


def _float_text(value: float) -> bytes:
    return repr(value).encode()


HEADERS: dict[str, st.SearchStrategy[bytes]] = {
    "x-request-id": st.one_of(FRESH_ID.map(str.encode), VALID_ID.map(str.encode),
                              header_values(), st.builds(lambda n: b"r" * n,
                                                         st.integers(100, 300))),
    "x-andes-ttft": st.one_of(st.floats(1e-3, 3600).map(_float_text), header_values(),
                              st.sampled_from([b"nan", b"inf", b"-1", b"0", b"1e999",
                                               b"3601", b"1_0", b"0x10"])),
    "x-andes-tds": st.one_of(st.floats(0.01, 1e6).map(_float_text), header_values(),
                             st.sampled_from([b"NaN", b"-inf", b"0", b"1e7", b"\xff"])),
    "content-type": st.sampled_from([
        b"application/json", b"application/json; charset=utf-8", b"text/plain",
        b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
        b"application/json; charset=latin-1", b"*/*", b"garbage",
    ]),
    "authorization": st.sampled_from([b"Bearer nothing", b"Basic Zm9vOmJhcg==", b"Bearer"]),
    "x-unknown": header_values(),
}


@st.composite
def http_headers(draw: st.DrawFn) -> tuple[tuple[str, bytes], ...]:
    names = draw(st.lists(st.sampled_from(sorted(HEADERS)), unique=True, max_size=4))
    return tuple((name, draw(HEADERS[name])) for name in names)


def dump(draw: st.DrawFn, body: Any) -> bytes:
    """JSON text of ``body``, escaped or raw UTF-8, compact or not."""
    ascii_only = draw(st.booleans())
    text = json.dumps(body, ensure_ascii=ascii_only,
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def structured_bodies(draw: st.DrawFn) -> HttpCase:
    """A good body with zero to three known fields spoiled, unknown fields and garbage."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    chat = path == CHAT
    body = draw(good_bodies(chat))
    names = sorted(name for name in BAD_VALUES
                   if name != ("prompt" if chat else "messages")
                   and (chat or name != "max_completion_tokens"))
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        body[name] = draw(st.one_of(BAD_VALUES[name], JSON_VALUES))
    if draw(st.integers(0, 4)) == 0:  # a required field missing
        body.pop("messages" if chat else "prompt", None)
    body.update(draw(st.dictionaries(TEXT, JSON_VALUES, max_size=3)))
    return HttpCase("json", path, dump(draw, body), headers=draw(http_headers()))


def _literal(text: str) -> Callable[[bytes], bytes]:
    return lambda body: body.replace(b'"__X__"', text.encode(), 1)


LITERALS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-0",
            "1E400", "0.0000000000000000000000000000001e-400", "tru", "nul", "01", "1.",
            '"\\ud800"', '"\\udfff"', '"a\\ud83d"', '"\\u0000"', '"\\x41"', '"\\uZZZZ"',
            '"\xff"', '"\\"', "[", "{}", "[[[[[]]]]]"]
"""JSON literals and near-literals: Python's extensions (NaN, Infinity), numbers beyond any
float or past the integer length Python converts, lone surrogates, bad escapes."""


@st.composite
def literal_bodies(draw: st.DrawFn) -> HttpCase:
    """A good body with one field's value replaced by a literal JSON text."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    chat = path == CHAT
    body = draw(good_bodies(chat))
    names = [*BAD_VALUES, "prompt" if not chat else "messages", "x-unknown"]
    target = draw(st.sampled_from(sorted(set(names))))
    if chat and target == "prompt":
        target = "messages"
    if target == "messages":
        body["messages"] = [{"role": "user", "content": "__X__"}]
    else:
        body[target] = "__X__"
    literal = draw(st.sampled_from(LITERALS))
    raw = _literal(literal)(json.dumps(body).encode())
    return HttpCase("literal", path, raw, headers=draw(http_headers()))


@st.composite
def raw_bodies(draw: st.DrawFn) -> HttpCase:
    """Bytes that are hardly JSON: random, a good body mutated, not UTF-8, not an object,
    nested past any parser's depth, empty."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    choice = draw(st.integers(0, 5))
    if choice == 0:
        raw = draw(st.binary(max_size=200))
    elif choice == 1:
        data = bytearray(dump(draw, draw(good_bodies(path == CHAT))))
        for _ in range(draw(st.integers(1, 3))):
            position = draw(st.integers(0, len(data)))
            if draw(st.booleans()) and position < len(data):
                data[position] = draw(st.integers(0, 255))
            else:
                data[position:position] = draw(st.sampled_from((*NOT_UTF8, b"{", b'"', b",")))
        raw = bytes(data)
    elif choice == 2:
        raw = draw(st.sampled_from(NOT_UTF8)) + b'{"prompt": "hi"}'
    elif choice == 3:
        raw = dump(draw, draw(st.one_of(SCALARS, st.lists(JSON_VALUES, max_size=3))))
    elif choice == 4:
        depth = draw(st.integers(10, 200_000))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        raw = b'{"prompt": "x", "extra": ' + opener * depth
        if draw(st.booleans()):
            raw += (b"]" if opener == b"[" else b"}") * depth + b"}"
    else:
        raw = draw(st.sampled_from([b"", b" ", b"\x00", b"null", b"\xef\xbb\xbf{}",
                                    b"\xef\xbb\xbf" + json.dumps({"prompt": "bom"}).encode()]))
    return HttpCase("raw", path, raw, headers=draw(http_headers()))


@st.composite
def huge_bodies(draw: st.DrawFn) -> HttpCase:
    """A body near the size limit or past it, sent in one piece or chunked."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    size = draw(st.one_of(st.integers(HTTP_MAX_BYTES - 40, HTTP_MAX_BYTES + 40),
                          st.integers(HTTP_MAX_BYTES, 3 * HTTP_MAX_BYTES),
                          st.integers(LIMITS.max_prompt_chars - 5,
                                      LIMITS.max_prompt_chars + 5)))
    head = (b'{"messages": [{"role": "user", "content": "' if path == CHAT
            else b'{"prompt": "')
    tail = b'"}]}' if path == CHAT else b'"}'
    raw = head + b"x" * max(size - len(head) - len(tail), 0) + tail
    return HttpCase("huge", path, raw, chunked=draw(st.booleans()))


@st.composite
def transport_variants(draw: st.DrawFn) -> HttpCase:
    """A structured body sent chunked, compressed (properly or not), or with the wrong
    method."""
    case = draw(st.one_of(structured_bodies(), literal_bodies()))
    variant = draw(st.sampled_from(["chunked", "gzip", "deflate", "bad-encoding",
                                    "identity", "method"]))
    if variant == "chunked":
        return HttpCase("chunked", case.path, case.body, headers=case.headers, chunked=True)
    if variant == "gzip":
        return HttpCase("gzip", case.path, gzip.compress(case.body), headers=case.headers,
                        encoding="gzip", plain=case.body)
    if variant == "deflate":
        return HttpCase("deflate", case.path, zlib.compress(case.body), headers=case.headers,
                        encoding="deflate", plain=case.body)
    if variant == "bad-encoding":
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "zstd"]))
        body = case.body
        if draw(st.booleans()):
            body = gzip.compress(body)[:draw(st.integers(0, 20))]
        return HttpCase("bad-encoding", case.path, body, headers=case.headers,
                        encoding=encoding)
    if variant == "identity":
        return HttpCase("identity", case.path, case.body, headers=case.headers,
                        encoding="identity", plain=case.body)
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
    return HttpCase("method", case.path, case.body, method=method, headers=case.headers)


HTTP_CASES = st.one_of(
    structured_bodies(), structured_bodies(), structured_bodies(), literal_bodies(),
    raw_bodies(), huge_bodies(), transport_variants(),
)


# -- HTTP oracle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpExpect:
    status: frozenset[int]
    param: str | None = None
    message: str | None = None
    """The exact error message, where the oracle knows it."""
    message_prefix: str = ""
    valid: ValidRequest | None = None
    stream: bool = False
    include_usage: bool = False


def _bad(param: str | None = None, message: str | None = None) -> HttpExpect:
    return HttpExpect(frozenset({400}), param=param, message=message)


def expect_http(case: HttpCase, ledger: Ledger) -> HttpExpect:
    if case.method != "POST":
        return HttpExpect(frozenset({405}))
    if case.encoding in ("gzip", "deflate", "br", "zstd"):
        if case.plain is None:
            return _bad()
        body = case.plain
    else:
        body = case.body
    if len(body) > HTTP_MAX_BYTES:
        return _bad()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return _bad()
    if not isinstance(value, dict):
        return _bad()
    headers = CIMultiDict((name, raw.decode("utf-8", "surrogateescape"))
                          for name, raw in case.headers)
    try:
        if case.path == CHAT:
            parsed = parse_chat(value, headers, LIMITS, DEFAULT_CHAT_TEMPLATE)
        else:
            parsed = parse_completion(value, headers, LIMITS)
    except ValidationError as err:
        return _bad(err.field, str(err))
    valid = parsed.valid
    if not valid.id_generated and valid.request_id in ledger.lengths:
        return HttpExpect(frozenset({409}), message_prefix="request_id: ")
    return HttpExpect(frozenset({200}), valid=valid, stream=parsed.stream,
                      include_usage=parsed.include_usage)


def send_http(address: str, case: HttpCase) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of ``case`` sent on a fresh connection."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        headers: dict[str, Any] = dict(case.headers)
        if case.encoding:
            headers["content-encoding"] = case.encoding
        body: Any = case.body
        if case.chunked:
            step = max(len(case.body) // 3, 1)
            body = (case.body[i:i + step] for i in range(0, len(case.body), step))
            headers["transfer-encoding"] = "chunked"
        connection.request(case.method, case.path, body=body, headers=headers,
                           encode_chunked=case.chunked)
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def check_error_body(status: int, content: bytes, expect: HttpExpect) -> None:
    """OpenAI's error shape, with a message (and the param the oracle names)."""
    body = json.loads(content)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip()
    assert error["type"] == "invalid_request_error" and error["code"] is None
    if status == 400:
        assert error["param"] == expect.param, (error, expect)
    if expect.message is not None:
        assert error["message"] == expect.message
    if expect.param is not None:
        assert error["message"].startswith(f"{expect.param}: "), error
    assert error["message"].startswith(expect.message_prefix), error


def check_answer(case: HttpCase, content: bytes, expect: HttpExpect) -> str:
    """A complete answer (one JSON object, or events ending in ``[DONE]``) with the fake
    scheduler's text; the request id."""
    valid = expect.valid
    assert valid is not None
    length = valid.max_tokens
    chat = case.path == CHAT
    if not expect.stream:
        answer = json.loads(content)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        assert choice["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == length
        request_id = str(answer["id"]).partition("-")[2]
    else:
        events = [line.removeprefix(b"data: ") for line in content.split(b"\n\n") if line]
        assert events[-1] == b"[DONE]", events[-3:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks
        choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
        if chat:
            assert choices[0]["delta"].get("role") == "assistant"
            text = "".join(c["delta"].get("content") or "" for c in choices)
        else:
            text = "".join(c["text"] for c in choices)
        assert choices[-1]["finish_reason"] == "length"
        if expect.include_usage:
            assert chunks[-1]["choices"] == []
            assert chunks[-1]["usage"]["completion_tokens"] == length
        request_id = str(chunks[0]["id"]).partition("-")[2]
    assert text == _text(_token_ids(0, length))
    if not valid.id_generated:
        assert request_id == valid.request_id
    return request_id


def check_http(gateway: GatewayThread, case: HttpCase) -> None:
    expect = expect_http(case, gateway.ledger)
    record = RECORD["http"]
    record.sent += 1
    status, headers, content = send_http(gateway.cluster.gateway.http_address, case)
    record.outcomes[f"{case.kind}:{status}"] += 1
    if status >= 500:
        record.server_errors += 1
        raise AssertionError(f"server error {status}: {content[:500]!r}")
    assert status in expect.status, f"{status} ({content[:300]!r}), expected {expect}"
    if status == 200:
        request_id = check_answer(case, content, expect)
        assert expect.valid is not None
        assert headers.get("x-request-id") == request_id
        gateway.ledger.add(request_id, expect.valid.max_tokens)
    else:
        assert headers.get("content-type", "").startswith("application/json"), headers
        check_error_body(status, content, expect)
    assert gateway.idle(), "a stream stayed open after its request ended"


def valid_http_call(address: str) -> None:
    """The gateway still serves: a plain request completes."""
    case = HttpCase("after", CHAT, json.dumps(
        {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}).encode())
    status, _, content = send_http(address, case)
    assert status == 200, content
    assert json.loads(content)["usage"]["completion_tokens"] == 4


def test_http_completions_never_fail_on_the_server(fuzz_gateway: GatewayThread) -> None:
    started = time.monotonic()
    before = RECORD["http"].sent

    @FUZZ_SETTINGS
    @given(case=HTTP_CASES)
    def fuzz(case: HttpCase) -> None:
        check_http(fuzz_gateway, case)

    try:
        fuzz()
    finally:
        RECORD["http"].seconds += time.monotonic() - started
        write_report()
    valid_http_call(fuzz_gateway.cluster.gateway.http_address)
    sent = RECORD["http"].sent - before
    print(f"HTTP: {sent} inputs sent, {RECORD['http'].server_errors} server errors")
    assert sent >= EXAMPLES
    assert RECORD["http"].server_errors == 0
    assert fuzz_gateway.errors.records == [], "the gateway logged errors"
