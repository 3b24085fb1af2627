"""argparse value types shared by the command lines: each turns a bad value into argparse's
one-line error instead of a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the string but rejects it with ``check``'s ValueError."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
        return text

    return parse


def positive(kind: type[int] | type[float], *, zero_ok: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number > 0 (>= 0 with ``zero_ok``) of type ``kind``."""
    bound = ">= 0" if zero_ok else "> 0"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from err
        if not (math.isfinite(value) and (value > 0 or (zero_ok and value == 0))):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse
