"""What every engine offers the server, and the pieces they share (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


class EngineError(RuntimeError):
    """A failure the user should read (model missing, out of memory, ...), without a traceback."""


class TimedOut(EngineError):
    """A generation that ran past its time limit and was stopped."""

    def __init__(self, limit: float):
        super().__init__(f"Generation took longer than {limit:g} s and was stopped (setting requestTimeout).")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` start with alike (compared 64 at a time first)."""
    n = min(len(a), len(b))
    i = 0
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type when it has no text): for messages and reports."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.2
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_settings(cls, settings: Any, max_new_tokens: int | None = None) -> "Sampling":
        return cls(
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            seed=settings.seed,
        )


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from an earlier request (prefix reuse)
    first_token_s: float | None = None  # from the start of generation to the first token
    seconds: float = 0.0  # the whole generation, not counting the wait for the engine


class Engine(Protocol):
    tokenizer: Any
    context_window: int
    description: str

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        on_token: Callable[[int], None],
        priority: int = 1,
        on_prompt: Callable[[int], None] | None = None,
    ) -> tuple[list[int], FinishReason]:
        """Blocking; runs on the engine's worker thread. Calls ``on_token`` for every new token
        (stop tokens excluded) and checks ``should_stop`` before every decoding step.
        ``priority`` (``worker.Priority``, lower first) orders the work of an engine that runs
        several requests at once; the worker already orders the requests waiting for it.
        ``on_prompt`` is called once, before the first token, with how many of the prompt's
        tokens were not computed again because an earlier request's cache held them."""

    def warm(self, prompt_ids: list[int], should_stop: Callable[[], bool]) -> tuple[int, int]:
        """Blocking, on a worker thread: compute the KV of ``prompt_ids`` and keep it for the
        requests that will start with them (speculative work, below every request), checking
        ``should_stop`` between chunks (what is computed by then is kept). It never takes the
        place of an explicit request's cache. Returns (how many of its tokens the engine now
        holds, how many this call computed); (0, 0) when it kept nothing."""

    def close(self) -> None: ...


class StreamDecoder:
    """Token ids → text deltas that never split a character (byte-level BPE can end a token in
    the middle of a UTF-8 sequence; the delta waits until the character is whole)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        delta = now[len(before) :]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta
