"""The gateway's request validation (pure): every bad field is named, defaults are applied,
and no input makes it fail with anything but ValidationError."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.v1 import generation_pb2
from gateway.tokens import ApproximateCounter
from gateway.validation import (
    DEFAULT_TDS,
    DEFAULT_TTFT_S,
    MAX_STOP_STRINGS,
    Limits,
    ValidationError,
    ValidRequest,
    check_request_id,
    validate,
)

LIMITS = Limits(max_tokens_limit=100, default_max_tokens=16, max_prompt_chars=50,
                max_prompt_tokens=20)


def _request(**fields: object) -> generation_pb2.GenerateRequest:
    values: dict[str, object] = {"prompt": "hello"}
    values.update(fields)
    return generation_pb2.GenerateRequest(**values)  # type: ignore[arg-type]


def _rejects(request: generation_pb2.GenerateRequest, field: str) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        validate(request, LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    return caught.value


# -- accepted requests and defaults -------------------------------------------------------------


def test_minimal_request_gets_every_default() -> None:
    valid = validate(_request(), LIMITS)
    assert valid.prompt == "hello" and valid.prompt_token_ids == ()
    assert valid.max_tokens == LIMITS.default_max_tokens
    assert valid.ttft_s == DEFAULT_TTFT_S == 1.0
    assert valid.tds == DEFAULT_TDS == 4.8
    assert valid.sampling.temperature is None and valid.sampling.top_p is None
    assert valid.sampling.seed is None and valid.sampling.stop == ()
    assert valid.id_generated and re.fullmatch(r"[0-9a-f]{32}", valid.request_id)
    assert not valid.is_resume


def test_explicit_values_are_kept() -> None:
    request = _request(
        request_id="client-1:a.b_c",
        max_tokens=100,
        qoe=generation_pb2.QoESpec(ttft_s=2.5, tds=3.3),
        sampling=generation_pb2.SamplingParams(
            temperature=0.0, top_p=1.0, top_k=5, seed=0, stop=["END"], ignore_eos=True
        ),
    )
    valid = validate(request, LIMITS)
    assert valid.request_id == "client-1:a.b_c" and not valid.id_generated
    assert valid.max_tokens == 100
    assert valid.ttft_s == 2.5 and valid.tds == pytest.approx(3.3)
    sampling = valid.sampling
    assert sampling.temperature == 0.0 and sampling.top_p == 1.0 and sampling.top_k == 5
    assert sampling.seed == 0 and sampling.stop == ("END",) and sampling.ignore_eos
    proto = sampling.to_proto()
    assert proto.HasField("temperature") and proto.HasField("seed")


def test_token_id_prompt_is_accepted() -> None:
    valid = validate(_request(prompt="", prompt_token_ids=[1, 2, 3]), LIMITS)
    assert valid.prompt == "" and valid.prompt_token_ids == (1, 2, 3)


def test_resume_needs_only_the_id() -> None:
    valid = validate(generation_pb2.GenerateRequest(request_id="r1", resume_from_index=7),
                     LIMITS)
    assert valid.is_resume and valid.resume_from_index == 7 and valid.request_id == "r1"


def test_prompt_token_count_approximation() -> None:
    assert ApproximateCounter().count("abcd") == 1
    assert ApproximateCounter().count("abcde") == 2
    assert ApproximateCounter().count("a") == 1
    assert ApproximateCounter().count("", [5, 6, 7]) == 3


# -- one test per bad field ---------------------------------------------------------------------


def test_empty_prompt() -> None:
    _rejects(_request(prompt=""), "prompt")


def test_prompt_and_token_ids_together() -> None:
    error = _rejects(_request(prompt_token_ids=[1, 2]), "prompt_token_ids")
    assert "exactly one" in error.reason


def test_oversize_prompt() -> None:
    _rejects(_request(prompt="x" * (LIMITS.max_prompt_chars + 1)), "prompt")
    validate(_request(prompt="x" * LIMITS.max_prompt_chars), LIMITS)


def test_too_many_prompt_token_ids() -> None:
    _rejects(_request(prompt="", prompt_token_ids=[1] * (LIMITS.max_prompt_tokens + 1)),
             "prompt_token_ids")


def test_max_tokens_over_the_limit() -> None:
    _rejects(_request(max_tokens=LIMITS.max_tokens_limit + 1), "max_tokens")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 1e9])
def test_bad_ttft(value: float) -> None:
    _rejects(_request(qoe=generation_pb2.QoESpec(ttft_s=value)), "qoe.ttft_s")


@pytest.mark.parametrize("value", [math.nan, math.inf, -4.8, 1e-6])
def test_bad_tds(value: float) -> None:
    _rejects(_request(qoe=generation_pb2.QoESpec(tds=value)), "qoe.tds")


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf])
def test_bad_temperature(value: float) -> None:
    _rejects(_request(sampling=generation_pb2.SamplingParams(temperature=value)),
             "sampling.temperature")


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan])
def test_bad_top_p(value: float) -> None:
    _rejects(_request(sampling=generation_pb2.SamplingParams(top_p=value)), "sampling.top_p")


def test_empty_stop_string() -> None:
    _rejects(_request(sampling=generation_pb2.SamplingParams(stop=["ok", ""])),
             "sampling.stop[1]")


def test_too_many_stop_strings() -> None:
    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    _rejects(_request(sampling=generation_pb2.SamplingParams(stop=stops)), "sampling.stop")


@pytest.mark.parametrize("value", ["has space", "slash/", "brace{x}", "ünï", "a*b", "x" * 129])
def test_bad_request_id(value: str) -> None:
    _rejects(_request(request_id=value), "request_id")


def test_longest_request_id_is_fine() -> None:
    assert validate(_request(request_id="x" * 128), LIMITS).request_id == "x" * 128


def test_resume_without_request_id() -> None:
    _rejects(generation_pb2.GenerateRequest(resume_from_index=3), "resume_from_index")


def test_check_request_id_rejects_empty() -> None:
    with pytest.raises(ValidationError, match="request_id"):
        check_request_id("")


def test_limits_must_be_consistent() -> None:
    with pytest.raises(ValueError):
        Limits(max_tokens_limit=10, default_max_tokens=20)
    with pytest.raises(ValueError):
        Limits(max_prompt_chars=0)


# -- property: validation never fails in any other way ------------------------------------------

_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_sampling = st.builds(
    generation_pb2.SamplingParams,
    temperature=st.none() | _floats,
    top_p=st.none() | _floats,
    top_k=st.integers(0, 2**32 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
    ignore_eos=st.booleans(),
)
_requests = st.builds(
    generation_pb2.GenerateRequest,
    request_id=st.text(max_size=140) | st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True),
    prompt=st.text(max_size=60),
    prompt_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=25),
    max_tokens=st.integers(0, 2**32 - 1),
    sampling=st.none() | _sampling,
    qoe=st.none() | st.builds(generation_pb2.QoESpec, ttft_s=_floats, tds=_floats),
    resume_from_index=st.integers(0, 2**64 - 1) | st.just(0),
)


@settings(max_examples=300, deadline=None)
@given(_requests)
def test_any_request_validates_or_raises_validation_error(
    request: generation_pb2.GenerateRequest,
) -> None:
    try:
        valid = validate(request, LIMITS)
    except ValidationError as err:
        assert err.field and err.reason
        return
    assert isinstance(valid, ValidRequest)
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", valid.request_id)
    if valid.is_resume:
        return
    assert bool(valid.prompt) != bool(valid.prompt_token_ids)
    assert 1 <= valid.max_tokens <= LIMITS.max_tokens_limit
    assert math.isfinite(valid.ttft_s) and valid.ttft_s > 0
    assert math.isfinite(valid.tds) and valid.tds > 0
    assert math.isfinite(1.0 / valid.tds)
