"""Prompt token counts for planning, and the model's own chat template when it has one.

The worker tokenizes for real (its engine does); the gateway only needs the count, which
drives the planner's prefill cost and KV estimate. With ``--tokenizer DIR`` (the model
directory the workers serve) the gateway counts with the model's tokenizer, exactly, and
renders chat requests with the model's chat template. Without it, a text prompt is counted
with the common approximation of about four characters per token for English text (OpenAI's
rule of thumb) and chats use :data:`gateway.chat.DEFAULT_CHAT_TEMPLATE`. Token-id prompts are
exact either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from gateway.chat import DEFAULT_CHAT_TEMPLATE, ChatMessage

CHARS_PER_TOKEN = 4


class PromptCounter(Protocol):
    def count(self, prompt: str, token_ids: Sequence[int] = ()) -> int: ...


class ApproximateCounter:
    """The count without a tokenizer: exact for token ids, ``ceil(chars / 4)`` (at least 1)
    for text."""

    def count(self, prompt: str, token_ids: Sequence[int] = ()) -> int:
        if token_ids:
            return len(token_ids)
        return max(1, math.ceil(len(prompt) / CHARS_PER_TOKEN))


class ModelTokenizer:
    """A model directory's tokenizer: exact counts, and its chat template if it has one.

    Needs ``transformers`` (installed with the vllm extra, like the engine it matches).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError(
                "--tokenizer needs the transformers package (install the vllm extra)"
            ) from err
        try:
            self._tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {err}") from err

    def count(self, prompt: str, token_ids: Sequence[int] = ()) -> int:
        if token_ids:
            return len(token_ids)
        return max(1, len(self._tokenizer.encode(prompt, add_special_tokens=True)))

    def render(self, messages: Sequence[ChatMessage]) -> str:
        if not self._tokenizer.chat_template:
            return DEFAULT_CHAT_TEMPLATE.render(messages)
        rendered: str = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False, add_generation_prompt=True,
        )
        return rendered
