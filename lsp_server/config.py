"""Typed settings with documented defaults (pure).

Settings arrive from the command line, from ``initializationOptions`` and from
``workspace/configuration`` (section ``starchat``), later sources winning. Keys are camelCase on
the wire (``maxNewTokens``); snake_case (``max_new_tokens``) is accepted too. ``null`` or ``""``
means "not set". A bad value keeps the previous value and produces a message for the user.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

DEFAULT_MODEL = "HuggingFaceH4/starchat-beta"
DEFAULT_SYSTEM_PROMPT = "Below is a conversation between a human user and a helpful AI coding assistant."

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ENGINES = ("auto", "generate", "fast")
QUANTIZATIONS = ("none", "8bit", "4bit")


def _doc(text: str, check: Callable[[Any], bool] | None = None, reloads: bool = False) -> dict:
    return {"doc": text, "check": check, "reloads": reloads}


def _positive(value: Any) -> bool:
    return value > 0


@dataclass(frozen=True)
class Settings:
    model: str = field(default=DEFAULT_MODEL, metadata=_doc("Hub id or local folder of the model.", reloads=True))
    revision: str | None = field(default=None, metadata=_doc("Model revision (branch, tag or commit).", reloads=True))
    device: str = field(
        default="auto",
        metadata=_doc(
            "auto (CUDA when present, else CPU), cuda, cuda:N or cpu.",
            lambda v: v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()),
            reloads=True,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_doc("auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.", lambda v: v in DTYPES, reloads=True),
    )
    quantization: str = field(
        default="none",
        metadata=_doc(
            "none, 8bit or 4bit (bitsandbytes, CUDA): the server takes about 17 GB or 10 GB of GPU memory with StarChat "
            "instead of 32, for a 24, 16 or 12 GB card; served by transformers generate().",
            lambda v: v in QUANTIZATIONS,
            reloads=True,
        ),
    )
    engine: str = field(
        default="auto",
        metadata=_doc(
            "auto: fast when the whole model is on one GPU (and it starts), else generate; "
            "generate: transformers generate() (the reference), given its last 4 requests' KV caches for the prefix a new prompt shares with it; fast: static KV cache, CUDA-graph decode, "
            "continuous batching, prefix reuse and prompt-lookup speculation (serves up to 8 requests at once).",
            lambda v: v in ENGINES,
            reloads=True,
        ),
    )
    fast_max_batch: int = field(
        default=8,
        metadata=_doc("Fast engine: requests decoded together (each holds a KV-cache slot of contextWindow tokens).",
                      lambda v: 1 <= v <= 64, reloads=True),
    )
    speculative_tokens: int = field(
        default=7,
        metadata=_doc("Fast engine: tokens drafted by prompt lookup and checked per step; 0 turns speculation off.",
                      lambda v: 0 <= v <= 31, reloads=True),
    )
    trust_remote_code: bool = field(default=False, metadata=_doc("Run code shipped with the model. Off unless you trust it.", reloads=True))
    allow_unsafe_weights: bool = field(
        default=False, metadata=_doc("Also load pickled .bin weights (safetensors only otherwise).", reloads=True)
    )
    max_new_tokens: int = field(default=256, metadata=_doc("Longest answer, in tokens.", _positive))
    temperature: float = field(default=0.2, metadata=_doc("Sampling temperature; 0 means greedy.", lambda v: 0 <= v <= 5))
    top_k: int = field(default=50, metadata=_doc("Sample among the k likeliest tokens; 0 turns it off.", lambda v: v >= 0))
    top_p: float = field(default=0.95, metadata=_doc("Nucleus sampling mass.", lambda v: 0 < v <= 1))
    repetition_penalty: float = field(default=1.0, metadata=_doc("Penalty for repeated tokens; 1 turns it off.", _positive))
    seed: int | None = field(default=None, metadata=_doc("Seed for sampling, for repeatable answers."))
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata=_doc("The system turn of every prompt."))
    context_window: int = field(
        default=0, metadata=_doc("Tokens of prompt + answer; 0 means the model's own (8192 for StarChat).", lambda v: v >= 0)
    )
    hover_enabled: bool = field(default=True, metadata=_doc("Answer textDocument/hover with an explanation."))
    hover_max_new_tokens: int = field(default=128, metadata=_doc("Longest hover answer, in tokens.", _positive))
    hover_context_tokens: int = field(
        default=2048,
        metadata=_doc("Tokens a hover's prompt may use (the lines nearest the hovered one): a hover comes whenever the "
                      "pointer rests, and a shorter prompt answers sooner; 0 means up to the context window.",
                      lambda v: v >= 0),
    )
    completion_enabled: bool = field(
        default=True,
        metadata=_doc("Answer textDocument/inlineCompletion (text proposed at the cursor as you type) by StarCoder's "
                      "fill-in-the-middle: one line when the cursor's line goes on after it, else up to where the code "
                      "after the cursor follows."),
    )
    completion_model: str = field(
        default="",
        metadata=_doc("Hub id or local folder of a model of its own for inline completions, a StarCoder-family base "
                      "model trained to fill in the middle (e.g. bigcode/starcoderbase-1b), loaded beside the chat model "
                      "with its device, dtype and engine; empty: the chat model completes."),
    )
    completion_max_new_tokens: int = field(default=64, metadata=_doc("Longest inline completion, in tokens.", _positive))
    completion_context_tokens: int = field(
        default=2048,
        metadata=_doc("Tokens an inline completion's prompt may use: the code before the cursor, and up to a quarter of "
                      "them for the code after it; 0 means up to the context window.", lambda v: v >= 0),
    )
    warm_cache: bool = field(
        default=True,
        metadata=_doc("0.75 s after a document is opened or last edited, compute the prompt prefix every request on "
                      "it shares (the whole file, when it fits) ahead of the request, below every request and never in "
                      "place of a request's cache: the first action or chat on it (and hover, when the file fits "
                      "hoverContextTokens) then computes only its own part."),
    )
    request_timeout: float = field(default=300.0, metadata=_doc("Seconds one generation may run (not counting its wait for the engine) before it is stopped.", _positive))
    load_timeout: float = field(default=900.0, metadata=_doc("Seconds a request waits for the model to load.", _positive))
    queue_size: int = field(default=16, metadata=_doc("Requests waiting for the engine before new ones get 'busy'.", _positive))
    max_message_bytes: int = field(default=64 * 1024 * 1024, metadata=_doc("Largest JSON-RPC message read; larger ones are skipped.", _positive))

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_BY_KEY = {name.replace("_", "").lower(): name for name in FIELDS}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def reloads_model(old: Settings, new: Settings) -> bool:
    return any(getattr(old, n) != getattr(new, n) for n, f in FIELDS.items() if f.metadata["reloads"])


def _coerce(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    if "bool" in kind:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError
    if "int" in kind:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if "float" in kind:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if not isinstance(value, str):
        raise ValueError
    return value


def merge(base: Settings, raw: Mapping[str, Any] | None, unset: Settings | None = None) -> tuple[Settings, list[str]]:
    """``base`` with the valid values of ``raw`` applied, and one message per value refused. A
    setting ``raw`` gives as null (or "") is skipped, or with ``unset`` takes its value there."""
    if not raw:
        return base, []
    if not isinstance(raw, Mapping):
        return base, [f"StarChat settings must be an object, not {type(raw).__name__}; using the defaults."]
    if isinstance(raw.get("starchat"), Mapping):
        raw = raw["starchat"]
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        name = _BY_KEY.get(str(key).replace("_", "").lower())
        if name is None:
            continue  # unknown keys belong to the editor client (e.g. its server command)
        if value is None or value == "":
            if unset is not None:
                changes[name] = getattr(unset, name)
            continue
        meta = FIELDS[name].metadata
        try:
            coerced = _coerce(name, value)
            if meta["check"] is not None and not meta["check"](coerced):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            keep = getattr(base, name)
            problems.append(f"StarChat setting {camel(name)}={value!r} is not valid ({meta['doc']}); using {keep!r}.")
            continue
        changes[name] = coerced
    return base.replace(**changes), problems


def describe() -> list[tuple[str, Any, str]]:
    """``(camelCaseKey, default, doc)`` for every setting, for docs and ``--help``."""
    return [(camel(n), f.default, f.metadata["doc"]) for n, f in FIELDS.items()]
