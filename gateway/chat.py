"""Chat messages -> the prompt text that the model continues.

The gateway has no tokenizer yet, and so no model's chat template: chat requests are rendered
with the documented default below. A model's own template plugs in as any object with a
``render(messages) -> str`` method (:class:`ChatTemplate`) handed to the HTTP API, for example
a wrapper around a Hugging Face tokenizer's
``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.

The default template writes each message as ``<|role|>\\n{content}\\n`` and ends with
``<|assistant|>\\n``, the cue for the model to answer::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

Messages are parsed here too (the rules are the chat API's, not the template's): roles
``system``, ``user`` and ``assistant``; content a string or a list of ``{"type": "text",
"text": ...}`` parts, joined with newlines; other keys of a message (``name``, ...) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.validation import ValidationError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, its content flattened to text."""

    role: str
    content: str


class ChatTemplate(Protocol):
    """Turns a conversation into the prompt of the model's answer."""

    def render(self, messages: Sequence[ChatMessage]) -> str: ...


class DefaultChatTemplate:
    """``<|role|>\\n{content}\\n`` per message, then ``<|assistant|>\\n``."""

    def render(self, messages: Sequence[ChatMessage]) -> str:
        turns = "".join(f"<|{message.role}|>\n{message.content}\n" for message in messages)
        return f"{turns}<|assistant|>\n"


DEFAULT_CHAT_TEMPLATE = DefaultChatTemplate()


def parse_messages(value: object) -> list[ChatMessage]:
    """The ``messages`` of a chat request; a :class:`ValidationError` names the bad part."""
    if not isinstance(value, list) or not value:
        raise ValidationError("messages", "must be a non-empty list of messages")
    messages = []
    for position, item in enumerate(value):
        name = f"messages[{position}]"
        if not isinstance(item, Mapping):
            raise ValidationError(name, "must be an object with role and content")
        role = item.get("role")
        if role not in ROLES:
            raise ValidationError(f"{name}.role", f"must be one of {', '.join(ROLES)}, "
                                                  f"got {role!r}")
        messages.append(ChatMessage(role, _content(item.get("content"), f"{name}.content")))
    return messages


def _content(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValidationError(name, "must be a string or a list of text parts")
    texts = []
    for position, part in enumerate(value):
        if not (isinstance(part, Mapping) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise ValidationError(f"{name}[{position}]",
                                  'only text parts ({"type": "text", "text": "..."}) are supported')
        texts.append(part["text"])
    return "\n".join(texts)
