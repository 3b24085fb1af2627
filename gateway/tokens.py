"""Prompt token counting, kept in one function so a real tokenizer can replace it.

The gateway has no tokenizer yet, so a text prompt is counted with the common approximation of
about four characters per token for English text (OpenAI's rule of thumb). The count drives
the planner's prefill cost and KV size estimate; the worker, which does tokenize, reports the
real numbers back through its step reports. Token-id prompts are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CHARS_PER_TOKEN = 4


def count_prompt_tokens(prompt: str, token_ids: Sequence[int] = ()) -> int:
    """Tokens in the prompt: exact for token ids, ``ceil(chars / 4)`` (at least 1) for text."""
    if token_ids:
        return len(token_ids)
    return max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))
