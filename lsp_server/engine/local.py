"""StarChat in-process through transformers: loading and the ``generate()`` engine."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .base import EngineError, FinishReason, Sampling, common_prefix, first_line
from .worker import Priority

log = logging.getLogger(__name__)

# the end of a chat answer, of a text, and a fill-in-the-middle control token (a middle is done)
STOP_TOKENS = ("<|end|>", "<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")
KEPT_CACHES = 4  # the generate() engine's caches of recent requests (StarChat: 20 KiB a token)
KEPT_BYTES = 2 << 30  # and their size in all, the newest kept whatever its size (a multi-head model's is ~25x StarChat's)
WARM_CHUNK = 512  # tokens a warm-up computes between two looks at its stop flag


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(
            f"device={requested!r} was asked for but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}); set device to 'cpu' or 'auto'."
        )
    return requested


def resolve_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, requested)


class TransformersEngine:
    """Batch-1 generation through ``model.generate()``: the reference engine. It keeps the KV
    caches of its last ``KEPT_CACHES`` requests (prompt and answer) and gives ``generate()`` the
    part of the one a new prompt shares most with, so that only the rest is computed: prompts on
    one document version begin with the same file (prompts/build.py), and a chat's next turn
    with the last one, even after a hover or a code action in between. Past the limits the
    cache of the least urgent request goes first (a warm-up's, then a hover's), the oldest of
    those; a warm-up's cache never takes the place of an explicit request's."""

    def __init__(self, model: Any, tokenizer: Any, device: str, description: str):
        from transformers import GenerationConfig

        # only our settings decide how to sample: a generation_config.json shipped with the
        # model would fill every field we leave unset (beam search, which cannot stream;
        # n-gram bans and minimum lengths, which change answers)
        model.generation_config = GenerationConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.description = description
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        vocab = tokenizer.get_vocab()
        stops = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_ids = sorted(stops)
        self.input_device = model.get_input_embeddings().weight.device
        # recent requests' caches (transformers DynamicCache), the most recently used first,
        # each with the tokens it holds keys and values of and its request's priority
        self._kept: list[tuple[list[int], Any, int]] = []
        self._keeps_caches: bool | None = None  # whether the model's generate() caches can be kept (known after one)
        # what generate() and its output call the cache: past_key_values until transformers 5.2x
        self._cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def load(cls, settings: Any, report: Callable[[str], None] = lambda _: None) -> "TransformersEngine":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress goes to the editor, not to stderr
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        quantization = getattr(settings, "quantization", "none")
        if quantization == "8bit" and settings.dtype == "auto" and dtype == torch.bfloat16:
            dtype = torch.float16  # LLM.int8 computes in float16: no cast on every call
        source = settings.model
        common = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
        quantized = {} if quantization == "none" else {"quantization_config": quantization_config(quantization, dtype)}
        try:
            report(f"Loading the tokenizer of {source}")
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            report(f"Loading {source} ({str(dtype).removeprefix('torch.')}{', ' + quantization if quantized else ''}, {device})")
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                device_map=_device_map(device) or ({"": "cpu"} if quantized else None),
                use_safetensors=None if settings.allow_unsafe_weights else True,
                **quantized,
                **common,
            )
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"Not enough GPU memory to load {source}: {first_line(exc)}") from None
        except (OSError, ValueError, ImportError) as exc:
            hint = ""
            folder = Path(source)
            if not settings.allow_unsafe_weights and folder.is_dir() and any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
                raise EngineError(
                    f"{source} has only pickled weights (.bin), which can run code when loaded; convert them to "
                    "safetensors, or set allowUnsafeWeights if you trust them."
                ) from None
            if not settings.allow_unsafe_weights and "safetensors" in str(exc):
                hint = (" It has no safetensors weights (nor a converted copy on the hub): set allowUnsafeWeights "
                        "(--allow-unsafe-weights) if you trust its pickled .bin weights, which can run code when loaded.")
            elif os.environ.get("HF_HUB_OFFLINE") or "offline" in str(exc).lower() or "connect" in str(exc).lower():
                hint = " The weights are not in the local cache and the hub cannot be reached; download them first or set model to a local folder."
            raise EngineError(f"Could not load the model {source!r}: {first_line(exc)}.{hint}") from None
        model.eval()
        if device == "cpu" and not quantized:  # a quantized model is placed by device_map (it cannot be moved)
            model.to("cpu")
        params = model.num_parameters()  # (bitsandbytes' 4-bit tensors hold two weights per element: counted as two)
        kind = f"{quantization} quantized, " if quantized else ""
        description = f"{source} ({params / 1e6:,.1f}M parameters, {kind}{str(dtype).removeprefix('torch.')}, {device})"
        log.info("Loaded %s", description)
        return cls(model, tokenizer, device, description)

    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        on_token: Callable[[int], None],
        priority: int = 1,  # one request at a time: the worker's queue orders them
        on_prompt: Callable[[int], None] | None = None,
    ) -> tuple[list[int], FinishReason]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        stop_ids = self.stop_ids
        generated: list[int] = []
        reused = 0  # of the prompt's tokens, from a kept cache

        class Streamer:
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    if not generated and on_prompt is not None:
                        on_prompt(reused)
                    generated.append(token)
                    if token not in stop_ids:
                        on_token(token)

            def end(self) -> None:
                pass

        class StopFlag(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flag = should_stop()
                return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

        new_tokens = min(sampling.max_new_tokens, self.context_window - len(prompt_ids))
        if new_tokens <= 0:  # the prompt fills the context window
            return [], "length"
        do_sample = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_k=sampling.top_k if do_sample else None,
            top_p=sampling.top_p if do_sample else None,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0] if stop_ids else 0,
            return_dict_in_generate=True,  # with the cache, kept for the next request
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if should_stop():
            return [], "cancelled"
        input_ids = torch.tensor([prompt_ids], device=self.input_device)
        try:
            cache, reused, _ = self._cache_for(prompt_ids)
        except torch.cuda.OutOfMemoryError:  # no room to copy a kept cache's prefix
            cache = None
        while True:
            try:
                with torch.inference_mode():
                    out = self.model.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=config,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([StopFlag()]),
                        **{self._cache_name: cache},
                    )
                break
            except torch.cuda.OutOfMemoryError as exc:
                # the kept caches' memory goes to this request: again from the start, once,
                # when nothing was streamed yet
                again = not generated and (cache is not None or bool(self._kept))
                self._kept, cache, reused = [], None, 0
                torch.cuda.empty_cache()
                if not again:
                    raise EngineError(f"The GPU ran out of memory for this request: {first_line(exc)}") from None
        self._keep(getattr(out, self._cache_name, None), prompt_ids + generated, int(priority))
        if should_stop():
            reason: FinishReason = "cancelled"
        elif generated and generated[-1] in stop_ids:
            reason = "stop"
        else:
            reason = "length"
        return [t for t in generated if t not in stop_ids], reason

    def warm(self, prompt_ids: list[int], should_stop: Callable[[], bool]) -> tuple[int, int]:
        """Compute and keep the KV of ``prompt_ids`` (speculative work: a document's shared
        prompt prefix) from the kept cache that shares most of it, ``WARM_CHUNK`` tokens at a
        time, stopping when ``should_stop`` says so (what is computed by then is kept). Returns
        (how many of its tokens a kept cache now holds, how many this call computed): all and 0
        when one held them already; (0, 0) when keeping them would drop an explicit request's
        cache."""
        import torch

        if not prompt_ids or should_stop():
            return 0, 0
        if any(common_prefix(ids, prompt_ids) == len(prompt_ids) for ids, _, _ in self._kept):
            return len(prompt_ids), 0
        if not self._room_for_warm_up(prompt_ids):
            return 0, 0
        try:
            cache, done, taken = self._cache_for(prompt_ids)
        except torch.cuda.OutOfMemoryError:
            return 0, 0
        start = done
        try:
            with torch.inference_mode():
                while done < len(prompt_ids) and not should_stop():
                    chunk = prompt_ids[done : done + WARM_CHUNK]
                    out = self.model(input_ids=torch.tensor([chunk], device=self.input_device), use_cache=True,
                                     logits_to_keep=1, **{self._cache_name: cache})
                    cache = getattr(out, self._cache_name, None)
                    if cache is None:  # in case the output's name is not the argument's
                        cache = out.past_key_values
                    done += len(chunk)
        except torch.cuda.OutOfMemoryError:  # the layers the failed chunk reached hold more than the others
            cache, taken, done, start = None, None, 0, 0
            torch.cuda.empty_cache()
        if cache is not None and (done > start or taken is not None):  # a cache taken is kept again
            self._keep(cache, prompt_ids[:done], Priority.BACKGROUND if done > start else taken)
        return done, done - start

    def _room_for_warm_up(self, prompt_ids: list[int]) -> bool:
        """Whether a warm-up's cache of ``prompt_ids`` would be kept beside the explicit
        requests' caches it does not continue (by count and by size, at the kept caches' bytes
        per token), and the model's caches can be kept at all."""
        if self._keeps_caches is False:
            return False
        explicit = [e for e in self._kept if e[2] < Priority.HOVER and e[0] != prompt_ids[: len(e[0])]]
        if len(explicit) >= KEPT_CACHES:
            return False
        per_token = max((_size(e[1]) / len(e[0]) for e in self._kept if e[0]), default=0.0)
        return not explicit or per_token * len(prompt_ids) + sum(_size(e[1]) for e in explicit) <= KEPT_BYTES

    def _cache_for(self, prompt_ids: list[int]) -> tuple[Any, int, int | None]:
        """The kept cache that shares the longest prefix with ``prompt_ids``, cut to that prefix
        (at least the last prompt token is left to compute), the prefix's length, and the
        priority of the request it came from when it was taken; (None, 0, None) when none
        shares one. A cache the prompt starts with whole is taken (the request's own cache will
        hold all of it); of one the prompt leaves part of, the shared prefix is copied, so that
        it stays for a request that continues it (a chat's next turn after a hover in between)."""
        from transformers import DynamicCache

        if not self._kept:
            return None, 0, None
        shared = [common_prefix(ids, prompt_ids) for ids, _, _ in self._kept]
        best = max(range(len(shared)), key=shared.__getitem__)
        keep = min(shared[best], len(prompt_ids) - 1)
        if keep <= 0:
            return None, 0, None
        ids, cache, priority = self._kept[best]
        if shared[best] == len(ids):
            del self._kept[best]  # taken: a request that fails leaves no half-written cache behind
            cache.crop(keep - cache.get_seq_length())  # a negative count: the tokens to drop
            return cache, keep, priority
        self._kept.insert(0, self._kept.pop(best))  # used: the last to go
        prefix = DynamicCache()
        for i, layer in enumerate(cache.layers):
            prefix.update(layer.keys[..., :keep, :].clone(), layer.values[..., :keep, :].clone(), i)
        return prefix, keep, None

    def _keep(self, cache: Any, ids: list[int], priority: int = Priority.USER) -> None:
        """Keep ``cache`` (of a request of ``priority``) for later requests when it is a plain
        growing cache (a sliding-window or static one cannot be cut back to a prefix). Caches it
        continues go (they hold nothing it does not); then, past ``KEPT_CACHES`` or
        ``KEPT_BYTES``, the least urgent request's, the oldest of those (the newest stays
        whatever its size), except that a warm-up's own cache goes rather than an explicit
        request's."""
        if cache is None:
            return
        layers = getattr(cache, "layers", None)
        self._keeps_caches = bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)
        if not self._keeps_caches:
            return
        ids = ids[: cache.get_seq_length()]
        kept = [(ids, cache, priority)] + [e for e in self._kept if e[0] != ids[: len(e[0])]]
        while len(kept) > KEPT_CACHES or (len(kept) > 1 and sum(_size(e[1]) for e in kept) > KEPT_BYTES):
            victim = max(range(1, len(kept)), key=lambda i: (kept[i][2], i))
            if priority == Priority.BACKGROUND and kept[victim][2] < Priority.HOVER:
                del kept[0]  # the rest fitted before it came
                break
            del kept[victim]
        self._kept = kept

    def close(self) -> None:
        self.model = None
        self._kept = []


def _size(cache: Any) -> int:
    """Bytes of a kept ``DynamicCache``'s keys and values."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def quantization_config(kind: str, dtype: Any) -> Any:
    """bitsandbytes' 8-bit (LLM.int8) or 4-bit NF4 (double-quantized, computing in ``dtype``)
    weights: all linear layers but the output head."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EngineError(f"quantization {kind} needs bitsandbytes: pip install bitsandbytes (or set quantization to none).") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        import warnings

        # said on every layer's every call when the dtype is not float16 (a CPU run): once is enough
        warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _device_map(device: str) -> Any:
    """accelerate places the layers on every visible GPU for "cuda", on one for "cuda:N"."""
    if device == "cuda":
        return "auto"
    return {"": device} if device.startswith("cuda") else None
