"""Optional API keys: ``authorization: Bearer <key>`` (gRPC metadata or HTTP header) checked
against hashed keys, each with a name and optional limits of its own.

The key file holds one SHA-256 hex digest per line (``#`` comments and blank lines ignored),
never the keys themselves, so a leaked config file does not leak credentials. Create a line
with ``printf %s "$KEY" | sha256sum | cut -d' ' -f1`` or :func:`hash_key`. After the digest a
line may carry ``setting=value`` words::

    <sha256-hex> name=alice rate=20 burst=40 max_streams=64

``name`` labels the key in metrics and error messages (never the key or its digest; default
``line-<n>``, the line's number); ``rate`` (requests/s), ``burst`` and ``max_streams`` override
the gateway-wide ``--key-rate``/``--key-burst``/``--key-max-streams`` (0: unlimited, see
:mod:`gateway.ratelimit`). Lines that share a name share one set of limits (two keys of one
client while it rotates them), so their settings must agree. Any malformed line stops the
gateway at start with its file name and line number.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gateway.ratelimit import ANONYMOUS_KEY, KeyLimits

_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")
"""A key name: safe as a Prometheus label value and in a log line."""

Number = TypeVar("Number", int, float)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``, as the key file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """An accepted key as the gateway knows it: its name and its own limits (None: the
    gateway-wide default)."""

    name: str
    rate: float | None = None
    burst: float | None = None
    max_streams: int | None = None

    def limits(self, defaults: KeyLimits) -> KeyLimits:
        """This key's limits, its own settings over ``defaults``."""
        return KeyLimits(
            rate=defaults.rate if self.rate is None else self.rate,
            burst=defaults.burst if self.burst is None else self.burst,
            max_streams=defaults.max_streams if self.max_streams is None else self.max_streams,
        )


ANONYMOUS = ApiKey(ANONYMOUS_KEY)
"""Every client, when the gateway runs without API keys: the gateway-wide limits apply to all
of them together."""


class ApiKeys:
    """The accepted keys by digest; an empty set would lock everybody out, so it is an error:
    run without ``--api-keys-file`` to disable authentication instead.

    ``keys``: digests (each its own unnamed key) or a mapping of digest to :class:`ApiKey`.
    """

    def __init__(self, keys: Iterable[str] | Mapping[str, ApiKey]) -> None:
        pairs: list[tuple[str, ApiKey]]
        if isinstance(keys, Mapping):
            pairs = [(str(digest).lower(), key) for digest, key in keys.items()]
        else:
            pairs = [(digest.lower(), ApiKey(f"key-{i}")) for i, digest in enumerate(keys, 1)]
        self._keys = dict(pairs)
        if not self._keys:
            raise ValueError("no API key digests given")
        bad = [d for d in self._keys if not _DIGEST.fullmatch(d)]
        if bad:
            raise ValueError(f"not a SHA-256 hex digest: {bad[0][:16]!r}...")

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a key file; ValueError naming ``path:line`` for the first bad line."""
        keys: dict[str, ApiKey] = {}
        by_name: dict[str, tuple[ApiKey, int]] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            try:
                digest, key = _parse_line(words, number)
                if digest in keys:
                    raise ValueError("the same digest is listed twice")
                first = by_name.setdefault(key.name, (key, number))
                if first[0] != key:
                    raise ValueError(f"name={key.name} is on line {first[1]} with other "
                                     "settings (lines sharing a name share its limits)")
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from err
            keys[digest] = key
        try:
            return cls(keys)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> ApiKey | None:
        """The key that ``metadata`` presents as ``authorization: Bearer <key>`` (None: no
        known key)."""
        for name, value in metadata:
            if name.lower() != "authorization" or not isinstance(value, str):
                continue
            scheme, _, key = value.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                continue
            try:
                digest = hash_key(key.strip())
            except UnicodeEncodeError:  # undecodable HTTP header bytes: no key of ours
                continue
            # A dict lookup on digests leaks no timing about the keys: the client cannot steer
            # the digest's bytes, so there is nothing to gain from a constant-time compare.
            known = self._keys.get(digest)
            if known is not None:
                return known
        return None

    def allows(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        """True if ``metadata`` carries ``authorization: Bearer <key>`` with a known key."""
        return self.identify(metadata) is not None


def _parse_line(words: list[str], number: int) -> tuple[str, ApiKey]:
    """(digest, key) of one key file line split into words."""
    digest = words[0].lower()
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {words[0][:16]!r}...")
    settings: dict[str, str] = {}
    for word in words[1:]:
        setting, equals, value = word.partition("=")
        if not equals or not value:
            raise ValueError(f"expected setting=value after the digest, got {word!r}")
        if setting not in ("name", "rate", "burst", "max_streams"):
            raise ValueError(f"unknown setting {setting!r} (name, rate, burst, max_streams)")
        if setting in settings:
            raise ValueError(f"{setting} is given twice")
        settings[setting] = value
    name = settings.get("name", f"line-{number}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name: {name!r} is not 1-64 characters of [A-Za-z0-9_.@:-] "
                         "starting with a letter or digit")
    key = ApiKey(
        name=name,
        rate=_number(settings, "rate", float),
        burst=_number(settings, "burst", float),
        max_streams=_number(settings, "max_streams", int),
    )
    key.limits(KeyLimits())  # checks the values together (burst 0 or >= 1, finite, >= 0)
    return digest, key


def _number(settings: Mapping[str, str], name: str, kind: type[Number]
            ) -> Number | None:
    text = settings.get(name)
    if text is None:
        return None
    expected = "a whole number >= 0" if kind is int else "a finite number >= 0"
    try:
        value = kind(text)
    except ValueError as err:
        raise ValueError(f"{name}: expected {expected}, got {text!r}") from err
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name}: expected {expected}, got {text!r}")
    return value
