"""The fast engine: our own GPTBigCode forward over the loaded weights, a persistent static
multi-query KV cache, a decode step captured as CUDA graphs, sampling on the device, continuous
batching and prefix reuse.

Files: this one holds the engine's state, loading and scheduling (requests, slots, batches,
speculation's drafts); ``fast_math.py`` what a step computes (forward, speculative step,
sampling, prefill); ``fast_setup.py`` what is checked and chosen at start (``choices.py``: the
timing answers kept between starts); ``fast_graphs.py`` the CUDA graphs.

Design (bench/NOTES.md has the reasoning and the numbers):

* Weights are the ``from_pretrained`` model's own tensors (no copy). The forward is written here
  in plain torch so that the cache layout and the attention are ours, not transformers' internals.
* The cache is one tensor ``[layers, slots, positions + 1, 2 * head_dim]`` allocated once: per
  slot and position, K then V of the single K/V head (20 KiB per token for StarChat). Position
  ``positions`` is a scratch row that idle batch rows write to.
* Batch row ``i`` of a decode step is cache slot ``i``. One decode step for ``B`` rows and a
  cache-length bucket ``Lc`` is a static-shape function (``_decode_step``) that reads its inputs
  from static buffers and writes the sampled tokens back into them (token, position, seen-token
  mask), so consecutive steps need no host work; on CUDA it is captured once per
  (batch bucket, length bucket) at start and each step is one graph replay. On the CPU the very
  same function runs eagerly.
* Attention stays multi-query: the 48 query heads are 48 query rows against the one K/V head
  (torch: batched matmuls over the cache slice; CUDA: a Triton split-KV kernel when available).
* Sampling (repetition penalty, temperature, top-k, top-p, greedy at temperature 0) runs inside
  the step on the device with a counter-based random number per (seed, position, candidate), so
  a seeded request gives the same tokens whatever else shares its batch.
* One scheduler thread owns the device. ``generate()`` (called from any number of threads)
  queues its request and streams tokens from a per-request queue. A request is prefilled
  between decode steps (whole when nothing decodes, else in chunks of ``prefill_chunk``
  tokens, one chunk between two steps), then joins the batch; a finished or cancelled one leaves at the next
  step boundary and frees its slot. Steps are pipelined one deep: step ``n+1`` is launched
  before the host reads step ``n``'s tokens.
* Prefix reuse: every slot remembers which tokens its cache rows hold; a new request takes over
  the slot with the longest cached prefix when it continues all of it, else copies that prefix
  (one device copy) into another free slot, and prefills only the rest.
* Prompt-lookup speculation (``speculate`` drafts, 7 by default; setting ``speculativeTokens``):
  when the tail of a request's context occurred earlier (an answer copying the selection), the
  tokens that followed are drafts. One step (``_verify_step``, a graph per length bucket) runs
  ``speculate + 1`` query rows: every running request's last token and, in the spare rows, its
  drafts, each row over its own slot's cache (the step costs about what a plain step costs:
  the weights are read once either way). Every row samples exactly as plain decoding would at
  that position, so the tokens kept (the confirmed drafts and the first sample that differs)
  are the tokens plain decoding gives, greedy or sampled.
* Priorities (``generate(priority=...)``, the worker's ``Priority``): a waiting prompt of an
  explicit action goes into the cache before a hover's, and gets a speculative step's spare
  rows first.
* Warm-ups (``warm()``): a prompt prefix computed ahead of the requests that will share it (a
  document's file), at the lowest priority, always in chunks, into a slot that holds nothing an
  explicit request filled and no other slot holds; the slot is free again once it is in.
* On CUDA, paths that only pay on the device are chosen at start by a check and a timing
  (``fast_setup.py``): Triton attention (writing the step's K/V to the cache itself), fused
  norms and epilogues, one-row GEMVs, sampling in three kernels (``sample_triton.py``), and an
  L2 prefetch of the next GEMM's weights on a side stream while the small kernels between two
  GEMMs leave the memory bus idle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .base import EngineError, FinishReason, Sampling, common_prefix, first_line
from .choices import Choices, default_path, fingerprint
from .fast_graphs import Graphs, graph_time_us
from .fast_math import _M32, StepMath
from .fast_setup import StartUp
from .lookup import KnownAnswer, PromptLookup
from .worker import Priority

log = logging.getLogger(__name__)

TOP_K_CAP = 128  # sampling candidates per step (top_k 0 or above this means this many)
LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)


def batch_buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def length_buckets(max_len: int) -> list[int]:
    return [n for n in LENGTH_BUCKETS if n < max_len] + [max_len]


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    should_stop: Callable[[], bool]
    events: "queue.SimpleQueue[tuple[str, Any]]" = field(default_factory=queue.SimpleQueue)
    slot: int | None = None
    produced: list[int] = field(default_factory=list)
    fed: int = 0  # decode steps launched with this request in the batch
    done: bool = False  # left the batch (no more tokens for it)
    answered: bool = False  # its final event ("done" or "error") was sent: FastEngine._answer
    reused: int = 0
    prefilled: int = 0
    prefill_pos: int = 0  # prompt tokens in its slot's cache so far (chunked prefill)
    lookup: PromptLookup | KnownAnswer | None = None  # where its speculative drafts come from
    spec_misses: int = 0  # speculative steps in a row that kept none of its drafts
    spec_resume: int = 0  # no drafts before ``fed`` reaches this (1, 2, 4 … 16 steps after misses)
    priority: int = 1  # worker.Priority: lower first (an explicit action before a hover)
    warm: bool = False  # speculative work: its prompt goes into the cache, nothing is sampled


class FastEngine(StartUp, Graphs, StepMath):
    """Engine protocol (see base.Engine); thread-safe ``generate()`` with continuous batching."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | None = None,
        description: str = "",
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        stop_ids: list[int] | None = None,
        use_graphs: bool | None = None,
        attention: str = "auto",
        fused: bool | None = None,
        prefill_attention: str | None = None,
        gemv: bool | None = None,
        fused_sampling: bool | None = None,
        kv_in_attention: bool | None = None,
        prefetch: bool | None = None,
        speculate: int = 7,
        prefill_chunk: int = 1024,
        report: Callable[[str], None] = lambda _: None,
    ):
        import torch

        started = time.monotonic()
        self._torch = torch
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        if not getattr(cfg, "multi_query", True):
            raise EngineError("The fast engine supports multi-query GPTBigCode models (StarCoder/StarChat) only.")
        state = model.state_dict()
        first = state["transformer.wte.weight"]
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # start-up runs on the engine's GPU: Triton launches and graph capture use the calling
        # thread's current device, which need not be the model's (device: cuda:N)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = first.dtype
        dev = self.device

        def w(name: str):
            return state[name].to(dev)

        self.n_layer = cfg.n_layer
        self.n_embd = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.scale = self.head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        positions = int(cfg.n_positions)
        self.max_len = min(positions, int(max_len)) if max_len else positions
        self.context_window = self.max_len
        self.wte = w("transformer.wte.weight")
        self.wpe = w("transformer.wpe.weight")
        self.lm_head = w("lm_head.weight") if "lm_head.weight" in state else self.wte
        self.ln_f = (w("transformer.ln_f.weight"), w("transformer.ln_f.bias"))
        self.layers = []
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            self.layers.append(
                tuple(
                    w(p + n)
                    for n in (
                        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                        "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
                    )
                )
            )
        state = None  # the dict of references only: the tensors are the model's own
        self.vocab = self.lm_head.shape[0]
        self.top_k_cap = min(TOP_K_CAP, self.vocab)

        if stop_ids is None:
            from .local import STOP_TOKENS

            stops: set[int] = set()
            if tokenizer is not None:
                vocab = tokenizer.get_vocab()
                stops = {vocab[t] for t in STOP_TOKENS if t in vocab}
                if tokenizer.eos_token_id is not None:
                    stops.add(tokenizer.eos_token_id)
            stop_ids = sorted(stops)
        self.stop_ids = list(stop_ids)
        self._stop_set = set(self.stop_ids)

        self.max_batch = int(max_batch)
        self.slots = self.max_batch
        self.batch_buckets = batch_buckets(self.max_batch)
        self.length_buckets = length_buckets(self.max_len)
        on_cuda = dev.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else (bool(use_graphs) and on_cuda)

        S, L, D = self.slots, self.n_layer, self.head_dim
        with torch.inference_mode():
            # zeros once so that idle rows always attend to finite numbers
            self.cache = torch.zeros((L, S, self.max_len + 1, 2 * D), device=dev, dtype=self.dtype)
            # token, position and seen-token mask have one more entry than there are slots: the
            # speculative step sends the writes of rows that must write nothing to entry S
            self.tok = torch.zeros(S + 1, device=dev, dtype=torch.long)
            self.pos = torch.zeros(S + 1, device=dev, dtype=torch.long)
            self.active = torch.zeros(S, device=dev, dtype=torch.bool)
            self.temp = torch.zeros(S, device=dev, dtype=torch.float32)
            self.topk = torch.full((S,), self.top_k_cap, device=dev, dtype=torch.long)
            self.topp = torch.ones(S, device=dev, dtype=torch.float32)
            self.penalty = torch.ones(S, device=dev, dtype=torch.float32)
            self.seed = torch.zeros(S, device=dev, dtype=torch.long)
            self.seen = torch.zeros((S + 1, self.vocab), device=dev, dtype=torch.bool)
            self._rows = torch.arange(S, device=dev)
            self._ranks = torch.arange(self.top_k_cap, device=dev)
            self._arange_len = torch.arange(self.max_len, device=dev)
            # the speculative step (prompt lookup): R = speculate + 1 query rows, each a running
            # request's last token or one of its drafts (see _verify_step)
            R = self.spec_tokens = max(1, int(speculate) + 1)
            self.spec_ctl = torch.zeros(5 * R, device=dev, dtype=torch.long)  # filled by one copy
            (self.spec_in, self.spec_slot, self.spec_off, self.spec_start, self.spec_used) = self.spec_ctl.view(5, R).unbind(0)
            self.spec_out = torch.zeros(2 * R, device=dev, dtype=torch.long)  # samples, kept
            tri = [(i, j) for i in range(R) for j in range(1, i + 1)]  # row j's token precedes row i
            self._spec_tri_rows = torch.tensor([i for i, _ in tri], device=dev, dtype=torch.long)
            self._spec_tri_cols = torch.tensor([j for _, j in tri], device=dev, dtype=torch.long)
            self._spec_tri_true = torch.ones(len(tri), device=dev, dtype=torch.bool)
            self._spec_ones = torch.ones(R, device=dev, dtype=torch.long)
            self._spec_true = torch.ones(R, device=dev, dtype=torch.bool)
            self._spec_false = torch.zeros(1, device=dev, dtype=torch.bool)
        self._sample_params = {"penalty": self.penalty, "temp": self.temp, "topk": self.topk, "topp": self.topp, "seed": self.seed}

        # what start-up timing decided before, for this GPU, software and engine shape
        requested = dict(attention=attention, fused=fused, prefill_attention=prefill_attention, gemv=gemv,
                         fused_sampling=fused_sampling, kv_in_attention=kv_in_attention, prefetch=prefetch,
                         use_graphs=self.use_graphs)
        self.choices = Choices(default_path() if on_cuda else None, *_engine_fingerprint(self, torch, speculate, requested))
        # every switchable path off until its chooser decides (a whole-step timing runs the
        # step with the paths chosen before it and the later ones off)
        self.gelu_epilogue = "tanh" if dev.type == "cuda" else "off"
        self.prebias = self.kv_in_attention = self.sample_kernels = False
        self.fc_padded: tuple[int, ...] = ()  # step sizes whose c_fc runs for FC_PAD_ROWS rows
        self._l2 = self._side = None  # L2 prefetch on a side stream (_choose_prefetch, after the other paths)
        self.attention = self._choose_attention(attention)
        self.fused = self._choose_fused(fused)
        self._triton: dict[tuple[int, int], Any] = {}
        if self.attention == "triton":
            from .mqa_triton import TritonMQADecode

            for b in self.batch_buckets:
                for n in self.length_buckets:
                    self._triton[(b, n)] = TritonMQADecode(b, n, self.n_head, D, dev, self.dtype)
            if self.spec_tokens > 1:
                for n in self.length_buckets:
                    self._triton[("verify", n)] = TritonMQADecode(self.spec_tokens, n, self.n_head, D, dev, self.dtype)
        self._gemv: dict[str, Any] = {}
        self._gemv_ops: dict[tuple[str, int], Any] = {}
        self.gemv_report: dict[str, Any] = {}
        with torch.inference_mode():
            self._choose_gelu_fusion()
            self._choose_fc_padding()
            self._choose_sampling(fused_sampling)
            try:
                self._choose_gemv(gemv)
            except Exception as exc:
                log.warning("choosing the batch-1 GEMV failed (%s); cuBLAS everywhere", exc)
                self._gemv = {}
                self.gemv_report["error"] = first_line(exc)[:200]
            try:
                self._choose_prefill_attention(prefill_attention)
            except Exception as exc:  # the first run's path
                log.warning("choosing the prefill attention failed (%s); using SDPA's GQA path", exc)
                self.prefill_attention = "sdpa_gqa"
                self.prefill_attention_report = {"error": first_line(exc)[:200]}
            # whole-step timings last: they run the step with every path chosen above
            self._choose_prebias()
            self._choose_kv_in_attention(kv_in_attention)
            self._choose_prefetch(prefetch)

        # host mirror of the slots
        self._slot_ids: list[list[int]] = [[] for _ in range(S)]
        self._slot_req: list[_Request | None] = [None] * S
        self._slot_used = [0.0] * S
        self._slot_priority = [0] * S  # of the request that filled it (a hover's tail is worth the least)
        self._running: list[_Request] = []
        self._incoming: deque[_Request] = deque()
        # admitted (slot taken), prompt still going into the cache: whole when nothing decodes,
        # else `prefill_chunk` tokens between two decode steps (_next_prefill picks which)
        self._prefilling: list[_Request] = []
        self.prefill_chunk = max(1, int(prefill_chunk))
        self._cv = threading.Condition()
        self._closed = False
        self._broken: BaseException | None = None
        self.stats = {"requests": 0, "prefill_tokens": 0, "reused_tokens": 0, "steps": 0, "tokens": 0, "max_rows": 0,
                      "wait_s": 0.0, "host_bound_steps": 0, "prefill_s": 0.0, "prefill_chunks": 0,
                      "warm_ups": 0, "spec_steps": 0, "spec_shared_steps": 0, "spec_drafted": 0, "spec_accepted": 0}
        self._graphs: dict[tuple[int, int], Any] = {}
        self._spec_graphs: dict[int, Any] = {}
        self.spec_error: str | None = None
        self._pinned = None
        self._spec_host_ctl = self._spec_host_out = None  # pinned staging (CUDA)
        if on_cuda:
            self._pinned = [torch.empty(S, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._spec_host_ctl = torch.empty(5 * self.spec_tokens, dtype=torch.long, pin_memory=True)
            self._spec_host_out = torch.empty(2 * self.spec_tokens, dtype=torch.long, pin_memory=True)
        self._flip = 0

        self.graph_error: str | None = None
        with torch.inference_mode():
            if self.use_graphs:
                report(f"Capturing {len(self.batch_buckets) * len(self.length_buckets)} decode graphs")
                self._capture_with_fallback()
                if self.use_graphs and self.spec_tokens > 1:
                    self._capture_verify()
            self._warm_prefill()
        self.graphs_captured = len(self._graphs) + len(self._spec_graphs)
        # speculate (benchmarks switch it off to time plain decoding)
        self.speculation = self.spec_tokens > 1
        self._draft_source: Callable[[list[int]], Any] = PromptLookup
        self.description = (
            (description or "model")
            + f" · fast engine ({S} slots × {self.max_len} positions, "
            + f"{'CUDA graphs' if self.use_graphs else 'eager steps'}, {self.attention} attention"
            + (", fused norms" if self.fused else "")
            + (f", prompt-lookup speculation of {self.spec_tokens - 1} tokens" if self.spec_tokens > 1 else "")
            + ")"
        )
        self._thread = threading.Thread(target=self._loop, name="starchat-fast-engine", daemon=True)
        self._thread.start()
        self.spec_check: dict[str, Any] | None = None
        if self.speculation:
            self._check_speculation()
        self.choices.save()
        self.ready_s = time.monotonic() - started

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, settings: Any, report: Callable[[str], None] = lambda _: None, *, fallback: bool = False) -> Any:
        """Load the weights (``TransformersEngine.load``) and build the fast engine over them.
        With ``fallback`` (``engine: auto``), a model the fast engine does not suit (on the
        CPU, spread over several devices, not multi-query) or a fast engine that fails to start
        leaves the loaded ``generate()`` engine in its place, with the reason in its
        description."""
        from .local import TransformersEngine

        if getattr(settings, "quantization", "none") != "none" and not fallback:
            raise EngineError("The fast engine runs unquantized weights; set engine to auto or generate for quantization "
                              f"{settings.quantization}, or quantization to none.")
        ref = TransformersEngine.load(settings, report)
        if fallback:
            reason = unsuitable(ref.model)
            if reason is not None:
                log.info("engine auto: generate() (%s)", reason)
                return ref
        report("Preparing the fast engine (static cache, decode graphs)")
        try:
            return cls(
                ref.model,
                ref.tokenizer,
                description=ref.description,
                max_batch=settings.fast_max_batch,
                max_len=settings.context_window or None,
                stop_ids=ref.stop_ids,
                speculate=settings.speculative_tokens,
                report=report,
            )
        except Exception as exc:
            oom = "out of memory" in str(exc).lower()
            if fallback:
                log.warning("the fast engine did not start (%s); using generate()", exc)
                if oom:
                    import torch

                    torch.cuda.empty_cache()
                ref.description += f" · fast engine unavailable: {first_line(exc)[:160]}"
                return ref
            if isinstance(exc, EngineError):
                raise
            if oom:
                raise EngineError(f"Not enough GPU memory for the fast engine's cache and graphs: {exc}") from None
            raise

    # ------------------------------------------------------------------ graphs
    def _bucket(self, buckets: list[int], n: int) -> int:
        for b in buckets:
            if b >= n:
                return b
        return buckets[-1]

    def score(self, ids: list[int]):
        """Logits (T, V) float32 of every position of ``ids`` through the prefill path, in the
        last slot (forgotten afterwards). For benchmarks and checks only: call it while the
        engine is idle (no request queued or running)."""
        if self._running or self._incoming or self._prefilling:
            raise EngineError("score() needs an idle engine")
        slot = self.slots - 1
        self._slot_ids[slot] = []
        with self._torch.inference_mode():
            out = self._prefill(slot, [int(t) for t in ids], 0, all_logits=True)
        self._slot_ids[slot] = []
        return out

    def run_step(self, B: int, Lc: int) -> None:
        """One decode step (graph replay on CUDA): for benchmarks of the bare step."""
        graph = self._graphs.get((B, Lc))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(B, Lc)

    def run_verify_step(self, Lc: int) -> None:
        """One speculative step (graph replay on CUDA) with whatever ``spec_ctl`` holds."""
        graph = self._spec_graphs.get(Lc)
        if graph is not None:
            graph.replay()
        else:
            self._verify_step(Lc)

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        on_token: Callable[[int], None],
        priority: int = 1,
        on_prompt: Callable[[int], None] | None = None,
    ) -> tuple[list[int], FinishReason]:
        if self._broken is not None:
            raise EngineError(f"The fast engine stopped after an error: {self._broken}")
        if self._closed:
            raise EngineError("The engine is closed.")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EngineError("Empty prompt.")
        if len(prompt) >= self.max_len:
            raise EngineError(f"The prompt has {len(prompt)} tokens; the context window is {self.max_len}.")
        if should_stop():
            return [], "cancelled"
        if sampling.max_new_tokens <= 0:
            return [], "length"
        req = _Request(prompt, sampling, should_stop, priority=int(priority))
        if self.spec_tokens > 1:
            req.lookup = self._draft_source(prompt)  # built here, not on the scheduler thread
        with self._cv:
            self._incoming.append(req)
            self._cv.notify()
        failure: BaseException | None = None
        delivered: list[int] = []
        cancelled = False
        while True:
            kind, value = self._next_event(req)
            if on_prompt is not None and kind == "tok":
                on_prompt(req.reused)  # set when it was admitted, before its first token
                on_prompt = None
            if kind == "tok":
                # a step can yield several tokens (speculation): none reaches the caller after
                # it asked to stop
                cancelled = cancelled or failure is not None or should_stop()
                if not cancelled:
                    try:
                        on_token(value)
                        delivered.append(value)
                    except BaseException as exc:  # stop generating, re-raise once the slot is free
                        failure = exc
                        req.should_stop = lambda: True
                        with self._cv:
                            self._cv.notify()
            elif kind == "done":
                if failure is not None:
                    raise failure
                return delivered, ("cancelled" if cancelled else value)
            else:
                raise value

    def warm(self, prompt_ids: list[int], should_stop: Callable[[], bool]) -> tuple[int, int]:
        """Put ``prompt_ids`` into a free slot's cache (speculative work: a document's shared
        prompt prefix), ``prefill_chunk`` tokens at a time after the more urgent prompts, and
        leave the slot free with them; stopped by ``should_stop`` (what is in by then stays).
        Returns (how many of its tokens a slot now holds, how many this call computed): all and
        0 when a slot held them already; (0, 0) when every free slot holds an explicit
        request's tokens that no other slot holds."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt or len(prompt) >= self.max_len or should_stop() or self._closed or self._broken is not None:
            return 0, 0
        req = _Request(prompt, Sampling(max_new_tokens=0), should_stop, priority=Priority.BACKGROUND, warm=True)
        with self._cv:
            self._incoming.append(req)
            self._cv.notify()
        kind, value = self._next_event(req)
        if kind == "error":
            raise value
        return req.prefill_pos, req.prefill_pos - req.reused

    def _next_event(self, req: _Request) -> tuple[str, Any]:
        """The next event the scheduler sends ``req``, waited for; EngineError when the
        scheduler stopped, or failed without answering it."""
        while True:
            try:
                return req.events.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineError("The fast engine's scheduler stopped.") from None
                if self._broken is not None and not req.answered:  # lost in the failure: not waited for
                    raise EngineError(f"The fast engine stopped after an error: {self._broken}") from None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._graphs.clear()
        self._spec_graphs.clear()  # before the buffers they replay into
        self._triton.clear()
        self._gemv_ops.clear()
        self._gemv.clear()
        self.cache = None  # type: ignore[assignment]
        self.layers = []
        self.model = None

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        torch = self._torch
        ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else _null()
        with ctx, torch.inference_mode():
            pending = None
            while True:
                with self._cv:
                    while not self._closed and not (self._incoming or self._running or self._prefilling or pending):
                        self._cv.wait(timeout=0.5)
                    if self._closed:
                        break
                    incoming = list(self._incoming)
                try:
                    for req in incoming:  # cancelled while waiting for a slot
                        if req.should_stop():
                            self._remove_incoming(req)
                            self._answer(req, ("done", "cancelled"))
                    for req in list(self._running):
                        if not req.done and req.should_stop():
                            self._finish(req, "cancelled")
                    for req in list(self._prefilling):
                        if req.should_stop():
                            self._drop_prefilling(req, ("done", "cancelled"))
                    while self._free_slot_exists():
                        with self._cv:
                            if not self._incoming:
                                break
                            req = self._incoming.popleft()
                        if req.done:
                            continue
                        self._admit(req)
                    self._advance_prefill()
                    launched = None
                    if self._may_speculate():
                        # drafting needs every running request's last token: no pipelining
                        if pending is not None:
                            self._collect(pending)
                            pending = None
                        plan = self._plan()
                        if plan is not None:
                            self._speculate(plan)
                        elif self._running:
                            launched = self._launch()
                    elif self._running:
                        launched = self._launch()
                    if pending is not None:
                        self._collect(pending)
                    pending = launched
                except Exception as exc:  # a device error: fail what is in flight, keep serving
                    log.exception("fast engine step failed")
                    pending = None
                    self._fail_all(exc)
            self._fail_all(EngineError("The engine was closed."))

    def _remove_incoming(self, req: _Request) -> None:
        with self._cv:
            try:
                self._incoming.remove(req)
            except ValueError:
                pass

    def _free_slot_exists(self) -> bool:
        return any(r is None for r in self._slot_req)

    def _fail_all(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, EngineError) else EngineError(f"The fast engine failed: {first_line(exc)}")
        with self._cv:
            waiting = list(self._incoming)
            self._incoming.clear()
        for req in list(self._running) + list(self._prefilling) + waiting:
            self._answer(req, ("error", err))
        self._running.clear()
        self._prefilling.clear()
        for s in range(self.slots):
            self._slot_req[s] = None
            self._slot_ids[s] = []
        try:
            if self.cache is not None:
                self.active.zero_()
                if self.device.type == "cuda":
                    self._torch.cuda.synchronize(self.device)
        except Exception as inner:  # the device is gone: later requests fail at once
            self._broken = inner

    def _pick_slot(self, prompt: list[int], touch: bool = True) -> tuple[int, int, int | None]:
        """(target slot, reusable prefix length, source slot of that prefix). A free slot the
        prompt continues whole is taken over. One it shares only part of is copied from (one
        device copy) into the free slot whose tokens are worth the least: one that holds nothing
        no other slot holds, else one a hover filled, else the least recently used, the source
        last among equals, so that it stays for a request that continues it (a chat's next
        turn after a hover in between); choosing the source itself takes it over."""
        best, source = 0, None
        for s in range(self.slots):
            n = common_prefix(self._slot_ids[s], prompt)
            if n > best:
                best, source = n, s
        reuse = min(best, len(prompt) - 1)
        if reuse <= 0:
            source = None
        if source is not None and self._slot_req[source] is None and best >= len(self._slot_ids[source]):
            return source, reuse, source
        if source is not None and touch:
            self._slot_used[source] = time.monotonic()  # used: not the next to be overwritten

        free = [s for s in range(self.slots) if self._slot_req[s] is None]
        # ties → the lowest index (keeps batches small)
        target = min(free, key=lambda s: (self._holds_its_own(s), -self._slot_priority[s], self._slot_used[s], s))
        return target, reuse, source

    def _admit(self, req: _Request) -> None:
        """Give ``req`` a slot (taking over or copying the longest cached prefix of its prompt)
        and its sampling parameters; its prompt goes into the cache in ``_advance_prefill``."""
        prompt = req.prompt
        if req.warm and any(ids[: len(prompt)] == prompt for ids in self._slot_ids):
            req.reused = req.prefill_pos = len(prompt)  # held already
            self._answer(req, ("done", "length"))
            return
        slot, reuse, source = self._pick_slot(prompt, touch=not req.warm)
        if req.warm and not self._may_warm(slot, source, reuse):
            self._answer(req, ("done", "length"))
            return
        self._slot_req[slot] = req
        self._slot_used[slot] = time.monotonic()
        self._slot_priority[slot] = req.priority
        req.slot = slot
        self._slot_ids[slot] = prompt[:reuse]
        self.stats["warm_ups" if req.warm else "requests"] += 1
        try:
            if reuse > 0 and source != slot:
                self.cache[:, slot, :reuse].copy_(self.cache[:, source, :reuse])
            if req.warm:  # nothing is sampled
                req.reused = req.prefill_pos = reuse
                self._prefilling.append(req)
                return
            sp = req.sampling
            seed = sp.seed if sp.seed is not None else secrets.randbits(31)
            self.temp[slot] = float(sp.temperature)
            self.topk[slot] = int(sp.top_k) if 0 < sp.top_k <= self.top_k_cap else self.top_k_cap
            self.topp[slot] = float(sp.top_p) if sp.top_p and sp.top_p > 0 else 1.0
            self.penalty[slot] = float(sp.repetition_penalty or 1.0)
            self.seed[slot] = int(seed) & _M32
            self.seen[slot].zero_()
            self.seen[slot, self._ids_on_device(prompt)] = True
        except Exception as exc:
            self._request_failed(req, exc)
            return
        req.reused = req.prefill_pos = reuse
        self._prefilling.append(req)

    def _may_warm(self, slot: int, source: int | None, reuse: int) -> bool:
        """Whether a warm-up may go into ``slot``: one it takes over (it continues what the
        slot holds), an empty one, or one whose tokens another slot holds too or a hover or a
        warm-up put there; never one holding an explicit request's tokens alone."""
        if slot == source and reuse >= len(self._slot_ids[slot]):
            return True
        return not self._holds_its_own(slot) or self._slot_priority[slot] >= Priority.HOVER

    def _holds_its_own(self, s: int) -> bool:
        """Whether slot ``s`` holds tokens no other slot holds too (losing them loses work)."""
        held = self._slot_ids[s]
        return bool(held) and not any(o != s and ids[: len(held)] == held for o, ids in enumerate(self._slot_ids))

    def _next_prefill(self) -> _Request:
        """The waiting prompt to advance: the most urgent (an explicit action before a hover),
        the oldest of those."""
        return min(self._prefilling, key=lambda r: r.priority)

    def _advance_prefill(self) -> None:
        """Put the next waiting prompt (``_next_prefill``) into its slot's cache: whole when
        nothing is decoding (its first token comes soonest), else ``prefill_chunk`` tokens of it
        between two decode steps (a long prompt delays the others' next token by one chunk, not
        by all of it). After its last chunk the request samples its first token and joins the
        batch."""
        if not self._prefilling:
            return
        torch = self._torch
        req = self._next_prefill()
        prompt, P, slot = req.prompt, len(req.prompt), req.slot
        start = req.prefill_pos
        n = P - start
        if req.warm or any(not r.done for r in self._running):
            n = min(n, self.prefill_chunk)
        t_prefill = time.perf_counter()
        try:
            logits = self._prefill(slot, prompt[start : start + n], start)
            req.prefill_pos += n
            self._slot_ids[slot] = prompt[: req.prefill_pos]
            self.stats["prefill_chunks"] += 1
            if req.prefill_pos < P:
                return
            if not req.warm:  # a warm-up samples nothing
                pos = torch.full((1,), P - 1, device=self.device, dtype=torch.long)
                first = self._sample(logits, slice(slot, slot + 1), pos)
                self.seen[slot, first] = True
                self.tok[slot : slot + 1].copy_(first)
                self.pos[slot] = P
                self.active[slot] = True
                token = int(first.item())
        except Exception as exc:
            self._prefilling.remove(req)
            self._request_failed(req, exc)
            return
        finally:
            self.stats["prefill_s"] += time.perf_counter() - t_prefill
        self._prefilling.remove(req)
        if req.warm:  # in the cache: the slot is free again, holding it
            self.stats["prefill_tokens"] += P - req.reused
            try:
                self._release(req, prompt)
            finally:
                self._answer(req, ("done", "length"))
            return
        req.prefilled = P - req.reused
        self.stats["reused_tokens"] += req.reused
        self.stats["prefill_tokens"] += req.prefilled
        self._running.append(req)
        self._emit(req, token)

    def _drop_prefilling(self, req: _Request, event: tuple[str, Any]) -> None:
        """A request leaves before its prompt is all in: its slot is free again, and the part of
        the prompt already in the cache stays reusable."""
        self._prefilling.remove(req)
        try:
            self._release(req, req.prompt[: req.prefill_pos])
        finally:
            self._answer(req, event)

    def _request_failed(self, req: _Request, exc: BaseException) -> None:
        """Admission or prefill failed: out of memory fails this request only; anything else
        is re-raised for the loop (which fails everything in flight)."""
        oom = "out of memory" in str(exc).lower()
        msg = "The GPU ran out of memory for this request" if oom else "The fast engine failed on this request"
        try:
            self._release(req, [])
            if self.device.type == "cuda" and oom:
                self._torch.cuda.empty_cache()
        finally:  # answered even when the device is gone (the write in _release fails then)
            self._answer(req, ("error", EngineError(f"{msg}: {first_line(exc)}")))
        if not oom:
            raise exc

    def _launch(self):
        torch = self._torch
        live = [r for r in self._running if not r.done]
        if not live:
            return None
        B = self._bucket(self.batch_buckets, max(r.slot for r in live) + 1)  # type: ignore[type-var]
        Lc = self._bucket(self.length_buckets, max(len(r.prompt) + r.fed + 1 for r in live))
        self.run_step(B, Lc)
        for r in live:
            r.fed += 1
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(live))
        if self._pinned is not None:
            host = self._pinned[self._flip]
            self._flip ^= 1
            host[:B].copy_(self.tok[:B], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = self.tok[:B].clone()
            event = None
        return host, event, [(r.slot, r) for r in live]

    @contextmanager
    def drafts_from(self, source: Callable[[list[int]], Any]):
        """Requests that start inside take their drafts from ``source(prompt)`` (an object like
        ``PromptLookup``) instead of prompt lookup: the start-up check, tests and benchmarks
        use known answers."""
        self._draft_source = source
        try:
            yield
        finally:
            self._draft_source = PromptLookup

    def _may_speculate(self) -> bool:
        """Could the next step be speculative? (Room for a draft beside every running request,
        and one of them not backing off.)"""
        live = [r for r in self._running if not r.done]
        return (self.speculation and 0 < len(live) < self.spec_tokens
                and any(r.lookup is not None and r.fed >= r.spec_resume for r in live))

    def _plan(self) -> list[tuple[_Request, list[int]]] | None:
        """Every running request with its drafts within the step's rows (the step costs the same
        for 1 to 8 rows: spare rows are free tokens), the spare rows going to the most urgent
        requests first (an explicit action before a hover), in admission order among equals;
        None when no request has a draft."""
        live = [r for r in self._running if not r.done]
        if not live:
            return None
        room = self.spec_tokens - len(live)
        plan = []
        for req in sorted(live, key=lambda r: r.priority):
            draft = self._draft(req, room) if room > 0 else []
            room -= len(draft)
            plan.append((req, draft))
        return plan if any(d for _, d in plan) else None

    def _draft(self, req: _Request, room: int) -> list[int]:
        if req.lookup is None or req.fed < req.spec_resume:  # none, or backing off after misses
            return []
        p = len(req.prompt) + req.fed  # position of the slot's last token (not yet in the cache)
        room = min(room, self.max_len - 1 - p, req.sampling.max_new_tokens - len(req.produced) - 1)
        return req.lookup.draft(room) if room > 0 else []

    def _speculate(self, plan: list[tuple[_Request, list[int]]]) -> None:
        """One speculative step for the planned requests (synchronous: the next drafts need
        its result)."""
        torch = self._torch
        R = self.spec_tokens
        rows: list[tuple[int, int, int, int]] = []  # (token, slot, offset, group's first row)
        for req, draft in plan:
            first = len(rows)
            rows += [(t, req.slot, i, first) for i, t in enumerate([req.produced[req.fed], *draft])]  # type: ignore[misc]
        used = len(rows)
        rows += [(0, 0, 0, r) for r in range(used, R)]  # unused rows: a group each, writing nothing
        ctl = [[row[k] for row in rows] for k in range(4)] + [[1] * used + [0] * (R - used)]
        Lc = self._bucket(self.length_buckets, max(len(req.prompt) + req.fed + 1 + len(d) for req, d in plan))
        try:
            values = torch.tensor(ctl, dtype=torch.long).flatten()
            if self._spec_host_ctl is not None:  # from pinned memory the copy is asynchronous
                values = self._spec_host_ctl.copy_(values)
            self.spec_ctl.copy_(values, non_blocking=True)
            self.run_verify_step(Lc)
            out = self._read(self.spec_out, self._spec_host_out)
        except Exception as exc:
            # the step updates the slots' tokens, positions and seen masks last: a failure
            # before that leaves the requests as they were, and they go on in plain steps (a
            # failure that broke the device fails the next plain step, and the loop handles it)
            log.warning("speculative step failed (%s); speculation off", exc)
            self.speculation = False
            self.spec_error = first_line(exc)[:200]
            return
        samples, kept = out[:R], out[R:]
        self.stats["steps"] += 1
        self.stats["spec_steps"] += 1
        self.stats["spec_shared_steps"] += len(plan) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(plan))
        first = 0
        for req, draft in plan:
            group = range(first, first + 1 + len(draft))
            first = group.stop
            tokens = [samples[r] for r in group if kept[r]]
            req.fed += len(tokens)
            if draft:
                n = len(tokens) - 1
                self.stats["spec_drafted"] += len(draft)
                self.stats["spec_accepted"] += n
                req.spec_misses = 0 if n else req.spec_misses + 1
                if req.spec_misses:
                    req.spec_resume = req.fed + min(16, 2 ** (req.spec_misses - 1))
            for token in tokens:
                if req.done:
                    break
                self._emit(req, token)

    def _read(self, src, pinned) -> list[int]:
        """``src``'s values now (through ``pinned`` host memory on CUDA: the host waits)."""
        if pinned is None:
            return src.tolist()
        pinned.copy_(src, non_blocking=True)
        event = self._torch.cuda.Event()
        event.record()
        t = time.perf_counter()
        event.synchronize()
        self.stats["wait_s"] += time.perf_counter() - t
        return pinned.tolist()

    def _collect(self, pending) -> None:
        host, event, rows = pending
        if event is not None:
            t = time.perf_counter()
            event.synchronize()
            waited = time.perf_counter() - t
            self.stats["wait_s"] += waited  # the host waiting on the GPU (≈ all of it: GPU-bound)
            if waited < 1e-4:
                self.stats["host_bound_steps"] += 1  # the GPU was idle (or about to be) before this step
        tokens = host.tolist()
        for slot, req in rows:
            if not req.done:
                self._emit(req, tokens[slot])

    def _emit(self, req: _Request, token: int) -> None:
        req.produced.append(token)
        if req.lookup is not None:
            req.lookup.append(token)
        self.stats["tokens"] += 1
        if token in self._stop_set:
            self._finish(req, "stop")
            return
        req.events.put(("tok", token))
        if len(req.produced) >= req.sampling.max_new_tokens or len(req.prompt) + len(req.produced) >= self.max_len:
            self._finish(req, "length")

    def _release(self, req: _Request, cached: list[int]) -> None:
        """``req`` leaves its slot; the slot remembers that its cache holds ``cached``. The
        host's bookkeeping first: the device write last (it raises when the device is gone)."""
        req.done = True
        slot = req.slot
        if slot is not None and self._slot_req[slot] is req:
            self._slot_ids[slot] = cached
            self._slot_req[slot] = None
            self._slot_used[slot] = time.monotonic()
            self.active[slot] = False

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        if req in self._running:
            self._running.remove(req)
        try:
            self._release(req, req.prompt + req.produced[: min(req.fed, len(req.produced))])
        finally:
            self._answer(req, ("done", reason))

    def _answer(self, req: _Request, event: tuple[str, Any]) -> None:
        """Send ``req`` its final event, once: its caller stops waiting."""
        req.done = True
        if not req.answered:
            req.answered = True
            req.events.put(event)
        with self._cv:
            self._cv.notify_all()


def _engine_fingerprint(engine: Any, torch: Any, speculate: int, requested: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What start-up timing depends on: the GPU, the software (this engine's own code
    included: its kernels and candidate lists), the model's shape, the engine's size and the
    paths asked for (not the weights' values)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    dev = engine.device
    parts = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "dtype": str(engine.dtype), "layers": engine.n_layer, "embd": engine.n_embd, "heads": engine.n_head,
        "vocab": engine.vocab, "slots": engine.max_batch, "positions": engine.max_len, "speculate": max(1, int(speculate) + 1),
        "code": _engine_code_hash(), "requested": requested,
        "env": {k: os.environ.get(k) for k in ("STARCHAT_FAST_GEMV", "STARCHAT_FAST_PREFILL_ATTN", "STARCHAT_FAST_PREFETCH")},
    }
    return fingerprint(parts), parts


def _engine_code_hash() -> str:
    """A hash of the engine's source (kernels, candidate lists, step math): a new version
    times its choices again instead of applying an older version's answers."""
    digest = hashlib.sha1()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def unsuitable(model: Any) -> str | None:
    """Why ``engine: auto`` leaves a loaded model to ``generate()``; None when the fast engine
    suits it (a multi-query GPTBigCode model wholly on one CUDA device)."""
    if not getattr(model.config, "multi_query", False) or getattr(model.config, "model_type", "") != "gpt_bigcode":
        return "not a multi-query GPTBigCode model"
    if getattr(model.config, "quantization_config", None) is not None:
        return "the weights are quantized"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return "the model is spread over several devices"
    if next(iter(devices)).type != "cuda":
        return "the model is not on a CUDA GPU"
    return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["FastEngine", "batch_buckets", "graph_time_us", "length_buckets", "unsuitable"]
