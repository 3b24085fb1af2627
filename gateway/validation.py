"""Validation of a ``GenerateRequest``: the one place that decides what the gateway accepts.

A pure function from the wire message (plus the gateway's limits) to a normalized
:class:`ValidRequest`, or a :class:`ValidationError` naming the offending field. Keeping it pure
makes every rule testable without a server and guarantees that the rest of the gateway only
ever sees checked, defaulted values (positive finite QoE spec, bounded lengths, Redis-safe id).

Rules (each rejection becomes gRPC INVALID_ARGUMENT with ``field: reason``):

* ``request_id``: at most 128 characters from ``[A-Za-z0-9._:-]`` (it is embedded in Redis keys
  and metric-free logs); empty means the gateway generates one (a uuid4 hex).
* ``prompt`` / ``prompt_token_ids``: exactly one must be set. Both set is an error rather than
  a silent preference, because the two could disagree and the client would not learn which one
  was used. Text is limited to ``max_prompt_chars`` characters, token ids to
  ``max_prompt_tokens`` ids.
* ``max_tokens``: 0 means the gateway's default; above ``max_tokens_limit`` is an error (not a
  silent clamp: the planner treats max_tokens as the worst case, so the client must know).
* ``qoe.ttft_s`` / ``qoe.tds``: 0 means the default (1.0 s, 4.8 tokens/s); otherwise finite,
  positive and within sane bounds (a tds so small that 1/tds overflows would break the pacer).
* ``sampling``: temperature finite and >= 0 (vLLM's rule), top_p in (0, 1], at most
  ``MAX_STOP_STRINGS`` non-empty stop strings of at most ``MAX_STOP_CHARS`` characters.
* ``resume_from_index`` > 0 reattaches to a live request, so it needs ``request_id``; the
  prompt, sampling and QoE fields of a resume request are ignored (the request already has
  them), so an empty prompt is fine there.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from andes.v1 import generation_pb2

DEFAULT_TTFT_S = 1.0
DEFAULT_TDS = 4.8
MAX_TTFT_S = 3600.0
"""An expectation of more than an hour to the first token is a client bug, not a preference."""
MIN_TDS = 0.01
MAX_TDS = 1_000_000.0
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")


class ValidationError(ValueError):
    """A request field the gateway rejects; ``str()`` reads ``field: reason``."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What the gateway accepts; set from its command-line flags."""

    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_prompt_chars: int = 200_000
    max_prompt_tokens: int = 50_000

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "default_max_tokens", "max_prompt_chars",
                     "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")


@dataclass(frozen=True)
class Sampling:
    """Decoding options after validation; None means "the model's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        """The form stored in the Redis payload hash (see ``gateway.payload``)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
        }

    def to_proto(self) -> generation_pb2.SamplingParams:
        message = generation_pb2.SamplingParams(
            top_k=self.top_k, stop=list(self.stop), ignore_eos=self.ignore_eos
        )
        if self.temperature is not None:
            message.temperature = self.temperature
        if self.top_p is not None:
            message.top_p = self.top_p
        if self.seed is not None:
            message.seed = self.seed
        return message


@dataclass(frozen=True)
class ValidRequest:
    """A checked request with every default applied."""

    request_id: str
    id_generated: bool
    prompt: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    ttft_s: float
    tds: float
    sampling: Sampling = field(default_factory=Sampling)
    resume_from_index: int = 0

    reattach: bool = False

    @property
    def is_resume(self) -> bool:
        return self.reattach or self.resume_from_index > 0


def validate(request: generation_pb2.GenerateRequest, limits: Limits) -> ValidRequest:
    """Check ``request`` against ``limits``; raise :class:`ValidationError` on the first bad
    field (fields are checked in declaration order, so the error is deterministic)."""
    request_id, generated = _request_id(request)
    resume = int(request.resume_from_index)
    reattach = request.reattach or resume > 0
    if reattach and generated:
        raise ValidationError(
            "reattach" if request.reattach else "resume_from_index",
            "reattaching needs the request_id of the request to resume",
        )
    if reattach:
        # The live request already has its prompt, sampling and QoE; only the id matters.
        return ValidRequest(
            request_id=request_id, id_generated=False, prompt="", prompt_token_ids=(),
            max_tokens=0, ttft_s=DEFAULT_TTFT_S, tds=DEFAULT_TDS, resume_from_index=resume,
            reattach=True,
        )
    prompt, token_ids = _prompt(request, limits)
    max_tokens = _max_tokens(int(request.max_tokens), limits)
    ttft_s = _qoe_value("qoe.ttft_s", request.qoe.ttft_s, DEFAULT_TTFT_S, low=0.0,
                        high=MAX_TTFT_S, unit="s")
    tds = _qoe_value("qoe.tds", request.qoe.tds, DEFAULT_TDS, low=MIN_TDS, high=MAX_TDS,
                     unit="tokens/s")
    return ValidRequest(
        request_id=request_id,
        id_generated=generated,
        prompt=prompt,
        prompt_token_ids=token_ids,
        max_tokens=max_tokens,
        ttft_s=ttft_s,
        tds=tds,
        sampling=_sampling(request.sampling),
    )


def _request_id(request: generation_pb2.GenerateRequest) -> tuple[str, bool]:
    if not request.request_id:
        return uuid.uuid4().hex, True
    return check_request_id(request.request_id), False


def check_request_id(value: str) -> str:
    """``value`` if it is a usable request id (also what Cancel accepts)."""
    if not value:
        raise ValidationError("request_id", "empty")
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise ValidationError(
            "request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(value)}"
        )
    if not REQUEST_ID_PATTERN.fullmatch(value):
        raise ValidationError(
            "request_id", "only letters, digits and . _ : - are allowed (it names Redis keys)"
        )
    return value


def _prompt(request: generation_pb2.GenerateRequest, limits: Limits) -> tuple[str, tuple[int, ...]]:
    text = request.prompt
    token_ids = tuple(int(t) for t in request.prompt_token_ids)
    if text and token_ids:
        raise ValidationError(
            "prompt_token_ids", "set exactly one of prompt and prompt_token_ids, not both"
        )
    if not text and not token_ids:
        raise ValidationError("prompt", "empty: set prompt (text) or prompt_token_ids")
    if len(text) > limits.max_prompt_chars:
        raise ValidationError(
            "prompt", f"{len(text)} characters, more than the limit {limits.max_prompt_chars}"
        )
    if len(token_ids) > limits.max_prompt_tokens:
        raise ValidationError(
            "prompt_token_ids",
            f"{len(token_ids)} tokens, more than the limit {limits.max_prompt_tokens}",
        )
    return text, token_ids


def _max_tokens(value: int, limits: Limits) -> int:
    if value == 0:
        return limits.default_max_tokens
    if value > limits.max_tokens_limit:
        raise ValidationError(
            "max_tokens", f"{value} is more than this gateway's limit {limits.max_tokens_limit}"
        )
    return value


def _qoe_value(
    name: str, value: float, default: float, *, low: float, high: float, unit: str
) -> float:
    if value == 0:
        return default
    if not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value!r}")
    if value < 0:
        raise ValidationError(name, f"must be positive (0 means the default {default:g}), "
                                    f"got {value!r}")
    if not low <= value <= high:
        raise ValidationError(name, f"must be within [{low:g}, {high:g}] {unit}, got {value!r}")
    return float(value)


def _sampling(message: generation_pb2.SamplingParams) -> Sampling:
    temperature: float | None = None
    if message.HasField("temperature"):
        temperature = float(message.temperature)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValidationError(
                "sampling.temperature", f"must be a finite number >= 0, got {temperature!r}"
            )
    top_p: float | None = None
    if message.HasField("top_p"):
        top_p = float(message.top_p)
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise ValidationError("sampling.top_p", f"must be within (0, 1], got {top_p!r}")
    stop = tuple(message.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ValidationError(
            "sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"
        )
    for position, text in enumerate(stop):
        if not text:
            raise ValidationError(f"sampling.stop[{position}]", "empty stop string")
        if len(text) > MAX_STOP_CHARS:
            raise ValidationError(
                f"sampling.stop[{position}]", f"longer than {MAX_STOP_CHARS} characters"
            )
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=int(message.top_k),
        seed=int(message.seed) if message.HasField("seed") else None,
        stop=stop,
        ignore_eos=bool(message.ignore_eos),
    )
