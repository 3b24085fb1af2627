"""Optional API keys: ``authorization: Bearer <key>`` (gRPC metadata or HTTP header) checked
against hashed keys.

The key file holds one SHA-256 hex digest per line (``#`` comments and blank lines ignored),
never the keys themselves, so a leaked config file does not leak credentials. Create a line
with ``printf %s "$KEY" | sha256sum | cut -d' ' -f1`` or :func:`hash_key`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

_DIGEST = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``, as the key file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The set of accepted key digests; an empty set would lock everybody out, so it is an
    error: run without ``--api-keys-file`` to disable authentication instead."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = frozenset(d.lower() for d in digests)
        if not self._digests:
            raise ValueError("no API key digests given")
        bad = [d for d in self._digests if not _DIGEST.fullmatch(d)]
        if bad:
            raise ValueError(f"not a SHA-256 hex digest: {bad[0][:16]!r}...")

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        lines = Path(path).read_text().splitlines()
        digests = [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]
        try:
            return cls(digests)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def allows(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        """True if ``metadata`` carries ``authorization: Bearer <key>`` with a known key."""
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
            # A set lookup on digests leaks no timing about the keys: the client cannot steer
            # the digest's bytes, so there is nothing to gain from a constant-time compare.
            if digest in self._digests:
                return True
        return False
