"""OpenAI request bodies -> the gateway's :class:`~gateway.validation.ValidRequest`.

Pure functions, one per endpoint, like :mod:`gateway.validation` and on top of it: the body's
fields are type-checked and assembled into the ``GenerateRequest`` a gRPC client would have
sent, and :func:`gateway.validation.validate` checks that, so both APIs accept exactly the same
requests. A rejection is a :class:`~gateway.validation.ValidationError` named with the OpenAI
field (``temperature``, not ``sampling.temperature``; ``messages`` for a chat prompt).

Where the HTTP form differs from the gRPC one:

* a field that is absent (or null) takes its default; an explicit 0 for ``max_tokens`` or a QoE
  value is an error (gRPC has only 0 to say "default"; JSON has absence for that);
* QoE: the body's ``qoe: {"ttft_s": ..., "tds": ...}`` (what the OpenAI client's
  ``extra_body`` sends) or the headers ``x-andes-ttft`` / ``x-andes-tds``; the body wins where
  both are given;
* the request id comes from the ``x-request-id`` header (absent: the gateway makes one);
* one prompt and one choice per request (``n`` must be 1);
* ``top_k`` -1 means no limit, like 0 (vLLM's convention);
* ``model`` is not checked: a gateway serves one model, whatever the client calls it;
* unknown fields are ignored (OpenAI clients send many), a known field of the wrong type is an
  error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from andes.v1 import generation_pb2
from gateway.chat import ChatTemplate, parse_messages
from gateway.validation import Limits, ValidationError, ValidRequest, validate

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
QOE_HEADERS = {"ttft_s": "x-andes-ttft", "tds": "x-andes-tds"}
"""The QoE fields and the headers that may carry them instead of the body."""


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked completion request and how the client wants the answer."""

    valid: ValidRequest
    stream: bool
    include_usage: bool
    """``stream_options.include_usage``: a last chunk with the token counts."""


def parse_completion(
    body: Mapping[str, Any], headers: Mapping[str, str], limits: Limits
) -> OpenAIRequest:
    """A ``/v1/completions`` body: ``prompt`` is a string or a list of token ids (or a list
    holding one of those)."""
    fields = _Fields(body)
    message = generation_pb2.GenerateRequest()
    text, token_ids = _prompt(fields.get("prompt"))
    message.prompt = _unicode("prompt", text)
    message.prompt_token_ids.extend(token_ids)
    return _finish(fields, message, headers, limits,
                   prompt_param="prompt", max_tokens_param="max_tokens")


def parse_chat(
    body: Mapping[str, Any], headers: Mapping[str, str], limits: Limits, template: ChatTemplate
) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body: ``messages`` rendered by ``template``;
    ``max_completion_tokens`` wins over ``max_tokens``."""
    fields = _Fields(body)
    messages = parse_messages(body.get("messages"))
    prompt = _unicode("messages", template.render(messages))
    message = generation_pb2.GenerateRequest(prompt=prompt)
    newer = fields.get("max_completion_tokens") is not None
    return _finish(fields, message, headers, limits, prompt_param="messages",
                   max_tokens_param="max_completion_tokens" if newer else "max_tokens")


def _finish(
    fields: _Fields,
    message: generation_pb2.GenerateRequest,
    headers: Mapping[str, str],
    limits: Limits,
    *,
    prompt_param: str,
    max_tokens_param: str,
) -> OpenAIRequest:
    """The fields both endpoints share, then the shared validation."""
    n = fields.integer("n", 0, UINT32_MAX)
    if n is not None and n != 1:
        raise ValidationError("n", f"only one choice per request is supported, got {n}")
    stream = bool(fields.boolean("stream"))
    options = _Fields(fields.mapping("stream_options") or {}, "stream_options.")
    include_usage = bool(options.boolean("include_usage"))
    max_tokens = fields.integer(max_tokens_param, 1, UINT32_MAX)
    if max_tokens is not None:
        message.max_tokens = max_tokens
    sampling = message.sampling
    if (temperature := fields.number("temperature")) is not None:
        sampling.temperature = temperature
    if (top_p := fields.number("top_p")) is not None:
        sampling.top_p = top_p
    if (top_k := fields.integer("top_k", -1, UINT32_MAX)) is not None:
        sampling.top_k = max(top_k, 0)
    if (seed := fields.integer("seed", 0, UINT64_MAX)) is not None:
        sampling.seed = seed
    sampling.stop.extend(_unicode(f"stop[{i}]", text) for i, text in enumerate(fields.stop("stop")))
    sampling.ignore_eos = bool(fields.boolean("ignore_eos"))
    names = {"prompt": prompt_param, "prompt_token_ids": prompt_param,
             "max_tokens": max_tokens_param, "request_id": "x-request-id"}
    qoe = _Fields(fields.mapping("qoe") or {}, "qoe.")
    for name, header in QOE_HEADERS.items():
        param, value = f"qoe.{name}", qoe.number(name)
        if value is None and header in headers:
            param, value = header, _header_number(header, headers[header])
        if value is None:
            continue
        if not value > 0:
            raise ValidationError(param, f"must be a positive number, got {value!r}")
        setattr(message.qoe, name, value)
        names[f"qoe.{name}"] = param
    message.request_id = _unicode("x-request-id", headers.get("x-request-id", ""))
    try:
        valid = validate(message, limits)
    except ValidationError as err:
        field = names.get(err.field, err.field.removeprefix("sampling."))
        raise ValidationError(field, err.reason) from err
    return OpenAIRequest(valid=valid, stream=stream, include_usage=include_usage)


def _prompt(value: object) -> tuple[str, list[int]]:
    """(text, token ids) of a completion prompt: OpenAI's string, token list, or a batch of
    those, of which only a batch of one is accepted."""
    if value is None or isinstance(value, str):
        return value or "", []
    if not isinstance(value, list):
        raise ValidationError("prompt", "must be a string or a list of token ids, got "
                                        f"{_kind(value)}")
    if value and all(isinstance(item, str | list) for item in value):
        if len(value) > 1:
            raise ValidationError("prompt", f"only one prompt per request is supported, got "
                                            f"{len(value)}")
        (single,) = value
        return (single, []) if isinstance(single, str) else ("", _token_ids(single))
    return "", _token_ids(value)


def _token_ids(values: list[Any]) -> list[int]:
    for position, token in enumerate(values):
        if not (_is_int(token) and 0 <= token <= UINT32_MAX):
            raise ValidationError(f"prompt[{position}]",
                                  f"token ids are integers in [0, {UINT32_MAX}], got {token!r}")
    return values


class _Fields:
    """Typed access to a JSON object's optional fields (null counts as absent); a field of
    the wrong type is a :class:`ValidationError` named ``prefix + name``."""

    def __init__(self, body: Mapping[str, Any], prefix: str = "") -> None:
        self._body = body
        self._prefix = prefix

    def get(self, name: str) -> Any:
        return self._body.get(name)

    def _wrong(self, name: str, expected: str, value: object) -> ValidationError:
        return ValidationError(self._prefix + name, f"must be {expected}, got {_kind(value)}")

    def boolean(self, name: str) -> bool | None:
        value = self.get(name)
        if value is None or isinstance(value, bool):
            return value
        raise self._wrong(name, "a boolean", value)

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise self._wrong(name, "an integer", value)
        if not low <= value <= high:
            raise ValidationError(self._prefix + name,
                                  f"must be an integer in [{low}, {high}], got {value}")
        return int(value)

    def number(self, name: str) -> float | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(name, "a number", value)
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            return math.inf

    def mapping(self, name: str) -> Mapping[str, Any] | None:
        value = self.get(name)
        if value is None or isinstance(value, Mapping):
            return value
        raise self._wrong(name, "an object", value)

    def stop(self, name: str) -> list[str]:
        value = self.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise self._wrong(name, "a string or a list of strings", value)


def _unicode(name: str, text: str) -> str:
    """``text`` if it is Unicode text: JSON escapes (and undecodable header bytes) can make
    lone surrogates, which no wire format (protobuf, Redis, the engine) takes."""
    try:
        text.encode()
    except UnicodeEncodeError as err:
        raise ValidationError(name, f"not valid Unicode text (a lone surrogate at {err.start})"
                              ) from err
    return text


def _header_number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError as err:
        raise ValidationError(name, f"must be a number, got {text!r}") from err


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """A JSON value's type in JSON's words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
