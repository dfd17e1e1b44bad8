"""Dialogue → token ids, exactly as the model was trained (pure: the tokenizer is passed in).

StarChat-beta's format (see docs/protocol.md and the model card)::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n…

A prompt for a new answer ends with ``<|assistant|>\\n``. Each text segment between two special
tokens is encoded on its own with special-token parsing off, which is what the tokenizer does
with the whole string, except that text from the user can never become a control token.
Models without these tokens use their tokenizer's chat template.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

Role = Literal["system", "user", "assistant"]
STARCHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# One tokenizer call at a time: a fast tokenizer's special-token parsing is one flag each call
# sets (``encode_special_tokens``), and prompts are built on the event loop and, for warm-ups,
# on another thread.
_TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


class PromptFormat(Protocol):
    def encode_text(self, text: str) -> list[int]:
        """Plain text → ids; control-token strings inside it stay plain text."""

    def encode_dialogue(self, messages: Sequence[Message]) -> list[int]:
        """A whole dialogue, ending with the opening of the assistant's answer."""


@dataclass(frozen=True)
class StarChatFormat:
    encode_text: Callable[[str], list[int]]
    system_id: int
    user_id: int
    assistant_id: int
    end_id: int

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt as text (what the ids spell), for logs and tests."""
        parts = [f"<|{m.role}|>\n{m.content}<|end|>\n" for m in _with_system(messages)]
        return "".join(parts) + "<|assistant|>\n"

    def encode_dialogue(self, messages: Sequence[Message]) -> list[int]:
        role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        newline = self.encode_text("\n")
        ids: list[int] = []
        for message in _with_system(messages):
            ids.append(role_ids[message.role])
            ids += self.encode_text("\n" + message.content)
            ids.append(self.end_id)
            ids += newline
        ids.append(self.assistant_id)
        ids += newline
        return ids


def _with_system(messages: Sequence[Message]) -> list[Message]:
    """StarChat was trained with a system turn first, empty or not."""
    if messages and messages[0].role == "system":
        return list(messages)
    return [Message("system", ""), *messages]


@dataclass(frozen=True)
class TemplateFormat:
    """Any model whose tokenizer carries a chat template."""

    tokenizer: Any

    def encode_text(self, text: str) -> list[int]:
        return text_encoder(self.tokenizer)(text)

    def encode_dialogue(self, messages: Sequence[Message]) -> list[int]:
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        text = self.tokenizer.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
        with _TOKENIZER_LOCK:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Plain text → ids with ``tokenizer``; control-token strings inside the text stay plain text."""

    def encode_text(text: str) -> list[int]:
        with _TOKENIZER_LOCK:
            return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    return encode_text


def format_for(tokenizer: Any) -> StarChatFormat | TemplateFormat:
    """StarChat's own format when the tokenizer has its control tokens, else the chat template."""
    vocab = tokenizer.get_vocab()
    encode_text = text_encoder(tokenizer)
    if all(token in vocab for token in STARCHAT_TOKENS):
        system, user, assistant, end = (vocab[t] for t in STARCHAT_TOKENS)
        return StarChatFormat(encode_text, system, user, assistant, end)
    if getattr(tokenizer, "chat_template", None):
        return TemplateFormat(tokenizer)
    raise ValueError(
        "the model's tokenizer has neither StarChat's <|system|>/<|user|>/<|assistant|>/<|end|> "
        "tokens nor a chat template, so there is no way to prompt it as a chat model"
    )
