"""The fast engine: our own GPTBigCode forward over the loaded weights, a persistent static
multi-query KV cache, a decode step captured as CUDA graphs, sampling on the device, continuous
batching and prefix reuse.

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
  between decode steps, then joins the batch; a finished or cancelled one leaves at the next
  step boundary and frees its slot. Steps are pipelined one deep: step ``n+1`` is launched
  before the host reads step ``n``'s tokens.
* Prefix reuse: every slot remembers which tokens its cache rows hold; a new request takes over
  (or copies, one device copy) the longest cached prefix and prefills only the rest.
* Prompt-lookup speculation (``speculate`` drafts, 7 by default; ``STARCHAT_FAST_SPECULATE``):
  when the tail of a request's context occurred earlier (an answer copying the selection), the
  tokens that followed are drafts. One step (``_verify_step``, a graph per length bucket) runs
  ``speculate + 1`` query rows: every running request's last token and, in the spare rows, its
  drafts, each row over its own slot's cache (the step costs about what a plain step costs:
  the weights are read once either way). Every row samples exactly as plain decoding would at
  that position, so the tokens kept (the confirmed drafts and the first sample that differs)
  are the tokens plain decoding gives, greedy or sampled.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import EngineError, FinishReason, Sampling
from .lookup import KnownAnswer, PromptLookup

log = logging.getLogger(__name__)

TOP_K_CAP = 128  # sampling candidates per step (top_k 0 or above this means this many)
LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)
_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash in int64 arithmetic (every product stays under 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    return x


def batch_buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def length_buckets(max_len: int) -> list[int]:
    return [n for n in LENGTH_BUCKETS if n < max_len] + [max_len]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    should_stop: Callable[[], bool]
    events: "queue.SimpleQueue[tuple[str, Any]]" = field(default_factory=queue.SimpleQueue)
    slot: int | None = None
    produced: list[int] = field(default_factory=list)
    fed: int = 0  # decode steps launched with this request in the batch
    done: bool = False
    reused: int = 0
    prefilled: int = 0
    lookup: PromptLookup | KnownAnswer | None = None  # where its speculative drafts come from
    spec_misses: int = 0  # speculative steps in a row that kept no draft
    spec_wait: int = 0  # plain steps before the next draft: 1, 2, 4 … 16 after misses in a row


class FastEngine:
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
        speculate: int = 7,
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
        del state
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

        self.gelu_epilogue = "tanh" if dev.type == "cuda" else "off"
        self.prebias = False
        self.attention = self._choose_attention(attention)
        self.fused = self._choose_fused(fused)
        self._gemv: dict[str, Any] = {}
        self._gemv_ops: dict[tuple[str, int], Any] = {}
        self.gemv_report: dict[str, Any] = {}
        with torch.inference_mode():
            try:
                self._choose_gemv(gemv)
            except Exception as exc:
                log.warning("choosing the batch-1 GEMV failed (%s); cuBLAS everywhere", exc)
                self._gemv = {}
                self.gemv_report["error"] = _first_line(exc)[:200]
            try:
                self._choose_prefill_attention(prefill_attention)
            except Exception as exc:  # the first run's path
                log.warning("choosing the prefill attention failed (%s); using SDPA's GQA path", exc)
                self.prefill_attention = "sdpa_gqa"
                self.prefill_attention_report = {"error": _first_line(exc)[:200]}
        self._triton: dict[tuple[int, int], Any] = {}
        if self.attention == "triton":
            from .mqa_triton import TritonMQADecode

            for b in self.batch_buckets:
                for n in self.length_buckets:
                    self._triton[(b, n)] = TritonMQADecode(b, n, self.n_head, D, dev, self.dtype)
            if self.spec_tokens > 1:
                for n in self.length_buckets:
                    self._triton[("verify", n)] = TritonMQADecode(self.spec_tokens, n, self.n_head, D, dev, self.dtype)

        # host mirror of the slots
        self._slot_ids: list[list[int]] = [[] for _ in range(S)]
        self._slot_req: list[_Request | None] = [None] * S
        self._slot_used = [0.0] * S
        self._running: list[_Request] = []
        self._incoming: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._broken: BaseException | None = None
        self.stats = {"requests": 0, "prefill_tokens": 0, "reused_tokens": 0, "steps": 0, "tokens": 0, "max_rows": 0,
                      "wait_s": 0.0, "host_bound_steps": 0, "prefill_s": 0.0,
                      "spec_steps": 0, "spec_shared_steps": 0, "spec_drafted": 0, "spec_accepted": 0}
        self._graphs: dict[tuple[int, int], Any] = {}
        self._spec_graphs: dict[int, Any] = {}
        self.spec_error: str | None = None
        self._pinned = None
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
        # speculate when a request runs alone (benchmarks switch it off to time plain decoding)
        self.speculation = self.spec_tokens > 1
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

        ref = TransformersEngine.load(settings, report)
        if fallback:
            reason = unsuitable(ref.model)
            if reason is not None:
                log.info("engine auto: generate() (%s)", reason)
                return ref
        max_batch = int(os.environ.get("STARCHAT_FAST_MAX_BATCH", "8"))
        speculate = int(os.environ.get("STARCHAT_FAST_SPECULATE", "7"))
        report("Preparing the fast engine (static cache, decode graphs)")
        try:
            return cls(
                ref.model,
                ref.tokenizer,
                description=ref.description,
                max_batch=max_batch,
                max_len=settings.context_window or None,
                stop_ids=ref.stop_ids,
                speculate=speculate,
                report=report,
            )
        except Exception as exc:
            oom = "out of memory" in str(exc).lower()
            if fallback:
                log.warning("the fast engine did not start (%s); using generate()", exc)
                if oom:
                    import torch

                    torch.cuda.empty_cache()
                ref.description += f" · fast engine unavailable: {_first_line(exc)[:160]}"
                return ref
            if isinstance(exc, EngineError):
                raise
            if oom:
                raise EngineError(f"Not enough GPU memory for the fast engine's cache and graphs: {exc}") from None
            raise

    def _choose_attention(self, requested: str) -> str:
        if requested == "torch" or (self.device.type != "cuda" and requested != "triton"):
            return "torch"  # on the CPU, "triton" is honoured for tests under TRITON_INTERPRET=1
        try:
            from .mqa_triton import HAVE_TRITON
        except Exception:
            HAVE_TRITON = False
        if not HAVE_TRITON:
            if requested == "triton":
                raise EngineError("attention='triton' needs the triton package")
            return "torch"
        try:
            err = self.check_triton_attention()
        except Exception as exc:
            log.warning("Triton attention failed its self-check (%s); using torch attention", exc)
            if requested == "triton":
                raise
            return "torch"
        if err > 2e-2:
            log.warning("Triton attention disagrees with torch (rel err %.3g); using torch attention", err)
            return "torch"
        self.triton_check_err = err
        return "triton"

    def _choose_fused(self, requested: bool | None) -> bool:
        """Fused decode step (GELU in the matmul epilogue, residual in the matmul's C operand,
        bias + residual + next LayerNorm in one Triton kernel): CUDA + Triton by default, only
        after a self-check against the unfused ops."""
        if requested is False or (requested is None and self.device.type != "cuda"):
            return False
        try:
            from .mqa_triton import HAVE_TRITON
        except Exception:
            HAVE_TRITON = False
        if not HAVE_TRITON or not hasattr(self._torch, "_addmm_activation"):
            if requested:
                raise EngineError("fused=True needs triton and torch._addmm_activation")
            return False
        try:
            err = self.check_fused()
        except Exception as exc:
            log.warning("fused decode ops failed their self-check (%s); using unfused ops", exc)
            if requested:
                raise
            return False
        self.fused_check_err = err
        if err > 2e-2:
            log.warning("fused decode ops disagree with the unfused ones (rel err %.3g)", err)
            return False
        return True

    def check_fused(self) -> float:
        import torch
        import torch.nn.functional as F

        from .mqa_triton import bias_add_layer_norm

        torch.manual_seed(4321)
        E = self.n_embd
        ln1w, ln1b, aw, ab, cw, cb, ln2w, ln2b, fcw, fcb, pw, pb = self.layers[0]
        x = torch.randn((3, E), device=self.device, dtype=self.dtype)
        h_in = torch.randn((3, fcw.shape[1]), device=self.device, dtype=self.dtype)
        ref_x = x + cb
        ref_h = F.layer_norm(ref_x, (E,), ln2w, ln2b, self.eps)
        got_x = x.clone()
        got_h = bias_add_layer_norm(got_x, cb, ln2w, ln2b, self.eps)
        ref_g = F.gelu(F.linear(h_in, fcw, fcb), approximate="tanh")
        got_g = torch._addmm_activation(fcb, h_in, fcw.t(), use_gelu=True)
        errs = [
            float((a.float() - b.float()).norm() / b.float().norm())
            for a, b in ((got_x, ref_x), (got_h, ref_h), (got_g, ref_g))
        ]
        errs = [e if e == e else float("inf") for e in errs]  # NaN (an unwritten output) fails
        # the one-row variant: bias pre-written into the GEMM's output by the LayerNorm kernel
        # (its own check: a failure here only turns the pre-write off)
        self.prebias = False
        try:
            x1 = x[:1].clone()
            y1 = torch.full((1, fcw.shape[0]), float("nan"), device=self.device, dtype=self.dtype)
            h1 = bias_add_layer_norm(x1, cb, ln2w, ln2b, self.eps, fill=(y1, fcb))
            ref_y1 = F.linear(h1, fcw, fcb)
            got_y1 = y1.addmm_(h1, fcw.t())
            e1 = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in ((got_y1, ref_y1), (h1, ref_h[:1]))]
            self.prebias_check_err = max(e if e == e else float("inf") for e in e1)
            self.prebias = self.prebias_check_err < 2e-2
        except Exception as exc:
            log.warning("one-row bias pre-write failed its self-check (%s)", exc)
            self.prebias_error = _first_line(exc)
        # Which GELU does the epilogue compute? In bf16 tanh and erf GELU are indistinguishable
        # (both ~3e-3 from each other's rounding); in float32 they differ by ~3e-5 while either
        # matches itself to ~1e-6. HF's GPTBigCode uses the tanh form: a GELU epilogue with the
        # erf form would be a real (if small) numerical difference, so it is refused.
        self.gelu_epilogue = "unknown"
        try:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                a32, w32, b32 = h_in[:, :512].float(), fcw[:256, :512].float(), fcb[:256].float()
                g32 = torch._addmm_activation(b32, a32, w32.t(), use_gelu=True)
                lin = F.linear(a32, w32, b32)
                e_tanh = float((g32 - F.gelu(lin, approximate="tanh")).norm() / g32.norm())
                e_erf = float((g32 - F.gelu(lin)).norm() / g32.norm())
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            self.gelu_epilogue = "tanh" if e_tanh <= e_erf else "erf"
            self.gelu_epilogue_err = {"tanh": e_tanh, "erf": e_erf}
        except Exception as exc:
            self.gelu_epilogue = f"check failed: {_first_line(exc)}"
        return float(max(errs))

    def check_triton_attention(self, batch: int = 2, cache_len: int = 1024) -> float:
        """Relative error of the Triton kernel against the float32 torch attention on random data."""
        import torch

        from .mqa_triton import TritonMQADecode

        torch.manual_seed(1234)
        H, D = self.n_head, self.head_dim
        kv = torch.randn((batch, cache_len + 1, 2 * D), device=self.device, dtype=self.dtype)
        q = torch.randn((batch, H, D), device=self.device, dtype=self.dtype)
        lengths = torch.tensor([cache_len - 37 * i for i in range(batch)], device=self.device, dtype=torch.long)
        out = TritonMQADecode(batch, cache_len, H, D, self.device, self.dtype)(q, kv, lengths, self.scale).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ref = self._torch_attention(q.float(), kv[:, :cache_len].float(), lengths, None).float()
        return float((out - ref).norm() / ref.norm())

    # ------------------------------------------------------------------ model math
    def _torch_attention(self, q, kv, lengths, bias):
        """q (B,H,D); kv (B,Lc,2D); every query head is a row against the one K/V head."""
        torch = self._torch
        D = self.head_dim
        Lc = kv.shape[1]
        if bias is None:
            bias = torch.zeros((q.shape[0], Lc), device=q.device, dtype=q.dtype).masked_fill(
                self._arange_len[:Lc][None, :] >= lengths[:, None], float("-inf")
            )
        k = kv[:, :, :D]
        v = kv[:, :, D:]
        scores = torch.baddbmm(bias[:, None, :], q, k.transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, v)

    def _mlp_out(self, x, layer):
        F = self._torch.nn.functional
        ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
        h = F.layer_norm(x, (self.n_embd,), ln2w, ln2b, self.eps)
        h = F.gelu(F.linear(h, fcw, fcb), approximate="tanh")
        return x + F.linear(h, pw, pb)

    def _decode_step(self, B: int, Lc: int) -> None:
        """One decoding step for batch rows (= slots) 0..B-1 with attention over at most Lc
        positions. Static shapes, no host sync: capturable as one CUDA graph."""
        torch = self._torch
        maxp = self.max_len
        rows = self._rows[:B]
        tok, pos, active = self.tok[:B], self.pos[:B], self.active[:B]
        live = active & (pos < maxp)
        wpos = torch.where(live, pos, maxp)  # idle rows write the scratch position
        lengths = torch.where(live, (pos + 1).clamp(max=Lc), 1)
        triton_attn = self._triton.get((B, Lc))
        if triton_attn is not None:
            attend = lambda q, cache: triton_attn(q, cache[:B, :Lc], lengths, self.scale)  # noqa: E731
        else:
            bias = self._length_bias(lengths, Lc)
            attend = lambda q, cache: self._torch_attention(q, cache[:B, :Lc], lengths, bias)  # noqa: E731
        logits = self._rows_forward(tok, pos.clamp(max=maxp - 1), rows, wpos, attend)
        new = self._sample(logits, slice(0, B), pos)
        self.seen.index_put_((rows, new), torch.ones_like(new, dtype=torch.bool))
        tok.copy_(new)
        pos.add_(1)

    def _verify_step(self, Lc: int) -> None:
        """The speculative step: R query rows (``spec_*`` buffers, rows ``spec_used``), grouped by
        request: the first row of a group is the request's last token at its position p, the
        next ones its drafted tokens at p + 1, p + 2 … (``spec_off``; ``spec_start`` is the
        group's first row; ``spec_slot`` its slot). Every row attends causally to its slot's
        cache and samples exactly as a plain decode step at that position would (the penalty
        sees the group's drafts before it as seen tokens; the same counter-based draw), so a
        draft is kept iff the row before it sampled it, and the tokens kept are those plain
        decoding gives. The step advances each slot's token, position and seen mask by what it
        kept and writes the samples and the kept flags (``spec_out``). Static shapes, no host
        sync: one graph per length bucket."""
        torch = self._torch
        R, S, maxp = self.spec_tokens, self.slots, self.max_len
        inp, slots, off, start = self.spec_in, self.spec_slot, self.spec_off, self.spec_start
        used = self.spec_used.bool()
        pos = self.pos.index_select(0, slots) + off
        wpos = torch.where(used & (pos < maxp), pos, maxp)  # unused rows write the scratch position
        lengths = torch.where(used, (pos + 1).clamp(max=Lc), 1)
        triton_attn = self._triton.get(("verify", Lc))
        if triton_attn is not None:
            attend = lambda q, cache: triton_attn(q, cache, lengths, self.scale, slots=slots)  # noqa: E731
        else:
            bias = self._length_bias(lengths, Lc)
            attend = lambda q, cache: self._torch_attention(q, cache[:, :Lc].index_select(0, slots), lengths, bias)  # noqa: E731
        logits = self._rows_forward(inp, pos.clamp(max=maxp - 1), slots, wpos, attend)
        # row i's context holds the drafts of its group before it
        tr, tc = self._spec_tri_rows, self._spec_tri_cols
        earlier = (start[tr] == start[tc]) & (off[tc] >= 1)
        # every write is True (pairs that do not count go to a spare column): duplicates agree
        extra = torch.zeros((R, self.vocab + 1), device=logits.device, dtype=torch.bool)
        extra.index_put_((tr, torch.where(earlier, inp[tc], self.vocab)), self._spec_tri_true)
        seen = self.seen.index_select(0, slots) | extra[:, : self.vocab]
        out = self._sample(logits, slots, pos, seen)
        # row r + 1 holds the next draft of row r's group
        has_next = torch.cat([(start[1:] == start[:-1]) & used[1:], self._spec_false])
        rejected = (has_next & torch.cat([out[:-1] != inp[1:], self._spec_false])).long()
        before = rejected.cumsum(0) - rejected  # rejections in rows < r
        kept = used & ((off == 0) | (before == before[start]))  # no rejection in the group before r
        last = kept & ~torch.cat([kept[1:] & has_next[:-1], self._spec_false])
        self.pos.index_add_(0, torch.where(kept, slots, S), self._spec_ones)
        self.tok.index_put_((torch.where(last, slots, S),), out)
        self.seen.index_put_((torch.where(kept, slots, S), out), self._spec_true)
        self.spec_out[:R].copy_(out)
        self.spec_out[R:].copy_(kept.long())

    def _length_bias(self, lengths, Lc: int):
        """Additive attention mask (rows, Lc) for the torch attention: -inf past each row's length."""
        torch = self._torch
        return torch.zeros((lengths.shape[0], Lc), device=self.device, dtype=self.dtype).masked_fill(
            self._arange_len[:Lc][None, :] >= lengths[:, None], float("-inf")
        )

    def _rows_forward(self, tok, epos, slots, wpos, attend):
        """The layer stack for one step's B query rows: row i is token ``tok[i]`` at position
        ``epos[i]``; its K/V go to cache slot ``slots[i]`` at position ``wpos[i]``;
        ``attend(q, layer_cache)`` gives its attention output. Returns the logits (B, V) in
        float32."""
        torch = self._torch
        F = torch.nn.functional
        E, H, D = self.n_embd, self.n_head, self.head_dim
        B = tok.shape[0]
        x = F.embedding(tok, self.wte) + F.embedding(epos, self.wpe)
        if self.fused:
            from .mqa_triton import bias_add_layer_norm

            h = F.layer_norm(x, (E,), self.layers[0][0], self.layers[0][1], self.eps)
        # one row: PyTorch's addmm takes the cuBLASLt bias epilogue only from 2 rows up, and at
        # one row launches a bias copy before the GEMM: the fused LayerNorm kernel writes the
        # bias into the GEMM's output instead and the GEMM accumulates onto it (beta = 1)
        prebias = self.fused and B == 1 and self.prebias
        # batch 1: Triton one-row GEMVs for the weights where start-up timing chose them
        gv = self._gemv if (self.fused and B == 1) else {}
        qkv_buf = None
        for li, layer in enumerate(self.layers):
            ln1w, ln1b, aw, ab, cw, cb = layer[:6]
            if not self.fused:
                h = F.layer_norm(x, (E,), ln1w, ln1b, self.eps)
            if "qkv" in gv:
                qkv = self._gv("qkv", li, aw)(h, ab)
            elif qkv_buf is not None:
                qkv = qkv_buf.addmm_(h, aw.t())
            else:
                qkv = F.linear(h, aw, ab)
            cache = self.cache[li]
            cache.index_put_((slots, wpos), qkv[:, E:])
            a = attend(qkv[:, :E].view(B, H, D), cache)
            if self.fused:
                ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
                if "attn_proj" in gv:
                    self._gv("attn_proj", li, cw)(a.reshape(B, E), out=x, accumulate=True)
                else:
                    x.addmm_(a.reshape(B, E), cw.t())  # residual as the GEMM's C operand (in place: no copy)
                if "fc" in gv:
                    h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps)
                    g = self._gv("fc", li, fcw)(h, fcb, gelu=True)
                elif prebias:
                    g = torch.empty((B, fcw.shape[0]), device=x.device, dtype=x.dtype)
                    h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps, fill=(g, fcb))
                    g = F.gelu(g.addmm_(h, fcw.t()), approximate="tanh")
                else:
                    h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps)
                    g = self._fc_gelu(h, fcw, fcb)  # GELU (tanh) epilogue
                if "mlp_proj" in gv:
                    self._gv("mlp_proj", li, pw)(g, out=x, accumulate=True)
                else:
                    x.addmm_(g, pw.t())
                nw, nb = (self.layers[li + 1][0], self.layers[li + 1][1]) if li + 1 < self.n_layer else self.ln_f
                if prebias and li + 1 < self.n_layer and "qkv" not in gv:
                    nab = self.layers[li + 1][3]
                    qkv_buf = torch.empty((B, nab.shape[0]), device=x.device, dtype=x.dtype)
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps, fill=(qkv_buf, nab))
                else:
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps)
            else:
                x = x + F.linear(a.reshape(B, E), cw, cb)
                x = self._mlp_out(x, layer)
        if not self.fused:
            h = F.layer_norm(x, (E,), self.ln_f[0], self.ln_f[1], self.eps)
        if "lm_head" in gv:
            return self._gv("lm_head", -1, self.lm_head)(h).float()
        return F.linear(h, self.lm_head).float()

    def _sample(self, logits, rows, pos, seen=None):
        """Repetition penalty → greedy (temperature 0) or temperature → top-k → top-p → draw.
        ``rows`` (a slice, or an index tensor: one slot per logits row) picks each row's
        sampling parameters; ``seen`` overrides the rows' seen-token masks. The draw is
        exponential-race sampling with a counter-based hash of (seed, position, candidate
        rank), so it needs no generator state."""
        torch = self._torch
        pen = self.penalty[rows][:, None]
        penalized = torch.where(logits < 0, logits * pen, logits / pen)
        logits = torch.where(self.seen[rows] if seen is None else seen, penalized, logits)
        greedy = logits.argmax(dim=-1)
        temp = self.temp[rows]
        vals, idx = torch.topk(logits, self.top_k_cap, dim=-1)
        vals = vals / temp.clamp(min=1e-4)[:, None]
        k = self.topk[rows]
        vals = vals.masked_fill(self._ranks[None, :] >= k[:, None], float("-inf"))
        probs = torch.softmax(vals, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before > self.topp[rows][:, None], 0.0)
        h = _mix32((self.seed[rows] + 0x632BE5AB) & _M32)
        h = _mix32((h ^ (pos & _M32)) & _M32)
        h = _mix32((h[:, None] ^ ((self._ranks[None, :] * 0x61C88647) & _M32)) & _M32)
        u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
        choice = (probs / -torch.log(u)).argmax(dim=-1)
        sampled = idx.gather(1, choice[:, None]).squeeze(1)
        return torch.where(temp > 0, sampled, greedy)

    def _prefill(self, slot: int, ids: list[int], start: int, all_logits: bool = False):
        """Run ``ids`` at positions start.. for one slot (its cache holds positions < start);
        writes their K/V and returns the last position's logits (1, V) in float32 (every
        position's with ``all_logits``: the bench's teacher-forced check).

        With ``self.fused`` (CUDA, self-checked) the prefill uses the decode step's fused ops:
        the residual is the C operand of the projection GEMMs (``x.addmm_``: no separate add
        pass over T x E), GELU is the c_fc GEMM's epilogue (no pass over T x 24576 in and out),
        and the projection bias + the next LayerNorm are one Triton kernel. A prompt without a
        reused prefix attends to K/V straight from the QKV output (the cache is written in
        the same pass, one copy of T x 256) through ``self.prefill_attention`` (chosen at start
        by timing: SDPA flash / efficient with the K/V head expanded as a stride-0 view, or
        SDPA's own GQA path)."""
        torch = self._torch
        F = torch.nn.functional
        E, H, D = self.n_embd, self.n_head, self.head_dim
        T = len(ids)
        S = start + T
        dev = self.device
        tok = torch.tensor(ids, device=dev, dtype=torch.long)
        x = F.embedding(tok, self.wte) + self.wpe[start:S]
        mask = None
        if start > 0:
            mask = torch.arange(S, device=dev)[None, :] <= torch.arange(start, S, device=dev)[:, None]
        fused = self.fused
        if fused:
            from .mqa_triton import bias_add_layer_norm

            h = F.layer_norm(x, (E,), self.layers[0][0], self.layers[0][1], self.eps)
        for li, layer in enumerate(self.layers):
            ln1w, ln1b, aw, ab, cw, cb = layer[:6]
            if not fused:
                h = F.layer_norm(x, (E,), ln1w, ln1b, self.eps)
            qkv = F.linear(h, aw, ab)
            cache = self.cache[li, slot]
            cache[start:S].copy_(qkv[:, E:])
            q = qkv[:, :E].view(T, H, D).transpose(0, 1)[None]  # (1, H, T, D)
            if start == 0:
                k = qkv[:, E : E + D][None, None]
                v = qkv[:, E + D :][None, None]
                a = self._prefill_attn(q, k, v)
            else:
                k = cache[:S, :D][None, None]
                v = cache[:S, D:][None, None]
                a = _sdpa_mqa(q, k, v, mask, self.scale)  # (1, H, T, D)
            a = a[0].transpose(0, 1).reshape(T, E)
            if fused:
                ln2w, ln2b, fcw, fcb, pw, pb = layer[6:]
                x.addmm_(a, cw.t())
                h = bias_add_layer_norm(x, cb, ln2w, ln2b, self.eps)
                g = self._fc_gelu(h, fcw, fcb)
                del h
                x.addmm_(g, pw.t())
                del g
                last = li + 1 == self.n_layer
                nw, nb = self.ln_f if last else (self.layers[li + 1][0], self.layers[li + 1][1])
                if last and not all_logits:  # only the last row's hidden state is needed
                    x[-1:].add_(pb)
                    h = F.layer_norm(x[-1:], (E,), nw, nb, self.eps)
                else:
                    h = bias_add_layer_norm(x, pb, nw, nb, self.eps)
            else:
                x = x + F.linear(a, cw, cb)
                x = self._mlp_out(x, layer)
        if not fused:
            h = F.layer_norm(x if all_logits else x[-1:], (E,), self.ln_f[0], self.ln_f[1], self.eps)
        elif not all_logits:
            h = h[-1:]
        return F.linear(h, self.lm_head).float()

    def _fc_gelu(self, h, fcw, fcb):
        if self.gelu_epilogue == "tanh":
            return self._torch._addmm_activation(fcb, h, fcw.t(), use_gelu=True)
        F = self._torch.nn.functional
        return F.gelu(F.linear(h, fcw, fcb), approximate="tanh")

    def _prefill_attn(self, q, k, v):
        """Causal attention of a whole prompt: q (1,H,T,D) against one K/V head (1,1,T,D)."""
        mode = self.prefill_attention
        if mode == "sdpa_gqa":
            return _sdpa_mqa(q, k, v, None, self.scale)
        F = self._torch.nn.functional
        H = q.shape[1]
        if mode.endswith("_gqa"):
            kw = dict(enable_gqa=True)
        else:
            k = k.expand(-1, H, -1, -1)  # stride-0 view: no copy of the single head
            v = v.expand(-1, H, -1, -1)
            kw = {}
        with self._sdpa_backend(mode):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **kw)

    def _sdpa_backend(self, mode: str):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        name = mode.split("_")[0]
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
        return sdpa_kernel([backend])

    def _time_us(self, fn, reps: int = 20) -> float:
        return graph_time_us(fn, self.device, reps)

    def _gv(self, name: str, li: int, weight):
        """The chosen Triton GEMV configuration of ``name`` bound to layer ``li``'s weight."""
        key = (name, li)
        op = self._gemv_ops.get(key)
        if op is None:
            from .mqa_triton import TritonGEMV

            proto = self._gemv[name]
            op = self._gemv_ops[key] = TritonGEMV(weight, proto.block_n, proto.block_k, proto.num_warps, proto.num_stages)
        return op

    def _choose_gemv(self, requested: bool | None) -> None:
        """Batch-1 decode GEMMs: a Triton one-row GEMV per weight (layer 0's shapes stand for all
        40 layers) where it agrees with cuBLAS (rel. err < 1e-2 on random rows) and is >= 3 %
        faster in a CUDA graph; cuBLAS elsewhere. ``requested=True`` (tests under the
        interpreter) takes every weight without timing; False: none."""
        if requested is False or not self.fused:
            return
        if requested is None and (self.device.type != "cuda" or os.environ.get("STARCHAT_FAST_GEMV") == "0"):
            return
        torch = self._torch
        F = torch.nn.functional
        from .mqa_triton import TritonGEMV

        ln1w, ln1b, aw, ab, cw, cb, ln2w, ln2b, fcw, fcb, pw, pb = self.layers[0]
        cases = {  # name: (weight, bias, accumulate, gelu)
            "qkv": (aw, ab, False, False), "attn_proj": (cw, None, True, False),
            "fc": (fcw, fcb, False, True), "mlp_proj": (pw, None, True, False), "lm_head": (self.lm_head, None, False, False),
        }
        gen = torch.Generator(device=self.device).manual_seed(7)
        for name, (wt, bias, acc, gelu) in cases.items():
            try:
                x = torch.randn((1, wt.shape[1]), device=self.device, dtype=self.dtype, generator=gen)
                y0 = torch.randn((1, wt.shape[0]), device=self.device, dtype=self.dtype, generator=gen)
                if acc:
                    ref = (y0.float() + F.linear(x, wt).float())
                else:
                    ref = F.linear(x, wt, bias)
                    ref = (F.gelu(ref, approximate="tanh") if gelu else ref).float()
                best = None
                for cfg in ((8, 512, 4, 3), (16, 256, 4, 3)):  # each is one Triton compile per shape (~1 s)
                    try:
                        g = TritonGEMV(wt, *cfg)
                        out = y0.clone() if acc else None
                        got = g(x, bias, out=out, accumulate=acc, gelu=gelu).float()
                        err = float((got - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            self.gemv_report[f"{name}_{cfg}"] = f"rel err {err:.3g}"
                            continue
                        if requested:
                            best = (0.0, g, cfg)
                            break
                        yb = y0.clone()
                        us = self._time_us(lambda g=g, yb=yb: g(x, bias, out=yb, accumulate=acc, gelu=gelu) if acc else g(x, bias, gelu=gelu))
                        self.gemv_report[f"{name}_triton_{cfg[0]}x{cfg[1]}_us"] = round(us, 2)
                        if best is None or us < best[0]:
                            best = (us, g, cfg)
                    except Exception as exc:
                        self.gemv_report[f"{name}_{cfg}"] = _first_line(exc)[:160]
                if best is None:
                    continue
                if requested:
                    self._gemv[name] = best[1]
                    continue
                yc = y0.clone()
                if acc:
                    cub = lambda: yc.addmm_(x, wt.t())
                elif gelu:
                    cub = lambda: F.gelu(F.linear(x, wt, bias), approximate="tanh")
                else:
                    cub = lambda: F.linear(x, wt, bias)
                cublas_us = self._time_us(cub)
                self.gemv_report[f"{name}_cublas_us"] = round(cublas_us, 2)
                if best[0] < 0.97 * cublas_us:
                    self._gemv[name] = best[1]
            except Exception as exc:
                self.gemv_report[name] = _first_line(exc)[:160]
        self.gemv_report["chosen"] = sorted(self._gemv)

    def _choose_prefill_attention(self, forced: str | None = None) -> str:
        """On CUDA, time the candidate SDPA paths for a 2048-token causal prompt (one layer's
        shapes, the single K/V head) and keep the fastest one that agrees with a float32
        reference; the reasons a candidate was dropped go to ``prefill_attention_report``."""
        self.prefill_attention = "sdpa_gqa"
        self.prefill_attention_report: dict[str, Any] = {}
        if forced is not None:
            self.prefill_attention = forced
            return forced
        if self.device.type != "cuda" or os.environ.get("STARCHAT_FAST_PREFILL_ATTN") == "sdpa_gqa":
            return "sdpa_gqa"
        torch = self._torch
        H, D, E = self.n_head, self.head_dim, self.n_embd
        T = min(2048, self.max_len)
        gen = torch.Generator(device=self.device).manual_seed(99)
        qkv = torch.randn((T, E + 2 * D), device=self.device, dtype=self.dtype, generator=gen)
        q = qkv[:, :E].view(T, H, D).transpose(0, 1)[None]
        k = qkv[:, E : E + D][None, None]
        v = qkv[:, E + D :][None, None]
        ref = None
        try:  # float32 reference, a quarter of the queries (the last ones: the longest rows)
            rows = slice(T - T // 4, T)
            qf, kf, vf = q[0, :, rows].float(), k[0, 0].float(), v[0, 0].float()
            sc = (qf @ kf.T) * self.scale
            pos = torch.arange(T, device=self.device)
            sc = sc.masked_fill(pos[None, None, :] > pos[rows][None, :, None], float("-inf"))
            ref = (torch.softmax(sc, -1) @ vf, rows)
        except Exception as exc:
            self.prefill_attention_report["reference"] = _first_line(exc)
        best, best_us = "sdpa_gqa", None
        candidates = ["sdpa_gqa", "flash_expand", "flash_gqa", "cudnn_expand", "efficient_expand"]
        wanted = os.environ.get("STARCHAT_FAST_PREFILL_ATTN")
        if wanted in candidates:
            candidates = ["sdpa_gqa", wanted]
        for mode in candidates:
            try:
                self.prefill_attention = mode
                out = self._prefill_attn(q, k, v)
                if ref is not None:
                    got = out[0, :, ref[1]].float()
                    err = float((got - ref[0]).norm() / ref[0].norm())
                    if not err < 2e-2:
                        self.prefill_attention_report[mode] = f"rel err {err:.3g}"
                        continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self._prefill_attn(q, k, v)
                times = []
                for _ in range(5):
                    start.record()
                    self._prefill_attn(q, k, v)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                us = sorted(times)[len(times) // 2]
                self.prefill_attention_report[mode] = round(us, 1)
                if best_us is None or us < best_us * 0.97:  # a clear gain only; ties keep the default
                    best, best_us = mode, us
            except Exception as exc:
                self.prefill_attention_report[mode] = _first_line(exc)[:160]
        self.prefill_attention = best
        return best

    # ------------------------------------------------------------------ graphs
    def _bucket(self, buckets: list[int], n: int) -> int:
        for b in buckets:
            if b >= n:
                return b
        return buckets[-1]

    def _capture_all(self) -> None:
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in self.batch_buckets:
                for n in self.length_buckets:
                    self._decode_step(b, n)  # warm-up: kernel selection, Triton compile, workspaces
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in self.batch_buckets:
            for n in self.length_buckets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_step(b, n)
                self._graphs[(b, n)] = graph
        torch.cuda.synchronize(self.device)

    def _capture_verify(self) -> None:
        """One speculative-step graph per length bucket. If capture fails, speculation is
        turned off (``spec_error`` says why); plain decoding is unaffected."""
        torch = self._torch
        try:
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for n in self.length_buckets:
                    self._verify_step(n)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            for n in self.length_buckets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._verify_step(n)
                self._spec_graphs[n] = graph
            torch.cuda.synchronize(self.device)
        except Exception as exc:
            log.warning("speculative step capture failed (%s); speculation off", exc)
            self.spec_error = _first_line(exc)[:200]
            self._spec_graphs.clear()
            self.spec_tokens = 1

    def _capture_with_fallback(self) -> None:
        """Graphs with the chosen attention; if that fails, with torch attention; if that fails
        too, eager steps (slower, still correct)."""
        torch = self._torch
        for attempt in range(4):
            try:
                self._capture_all()
                return
            except Exception as exc:
                what = f"{self.attention}{' + prebias' if self.prebias else ''}{' + gemv' if self._gemv else ''}"
                log.warning("decode graph capture failed (%s attention): %s", what, exc)
                self.graph_error = (self.graph_error + " | " if self.graph_error else "") + f"{what}: {_first_line(exc)}"
                self._graphs.clear()
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:
                    pass
                if self._gemv:  # the newest paths go first
                    self._gemv.clear()
                    self._gemv_ops.clear()
                    continue
                if self.prebias:
                    self.prebias = False
                    continue
                if self.attention != "triton":
                    break
                self.attention = "torch"
                self._triton.clear()
        self.use_graphs = False

    def _warm_prefill(self) -> None:
        """One short prefill into the last slot (its content is then forgotten)."""
        n = min(16, self.max_len - 1)
        self._prefill(self.slots - 1, [0] * n, 0)
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def score(self, ids: list[int]):
        """Logits (T, V) float32 of every position of ``ids`` through the prefill path, in the
        last slot (forgotten afterwards). For benchmarks and checks only: call it while the
        engine is idle (no request queued or running)."""
        if self._running or self._incoming:
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
        req = _Request(prompt, sampling, should_stop)
        if self.spec_tokens > 1:
            req.lookup = self._lookup_for(prompt)  # built here, not on the scheduler thread
        with self._cv:
            self._incoming.append(req)
            self._cv.notify()
        failure: BaseException | None = None
        delivered: list[int] = []
        cancelled = False
        while True:
            try:
                kind, value = req.events.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineError("The fast engine's scheduler stopped.") from None
                continue
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

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._graphs.clear()
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
                    while not self._closed and not self._incoming and not self._running and pending is None:
                        self._cv.wait(timeout=0.5)
                    if self._closed:
                        break
                    incoming = list(self._incoming)
                try:
                    for req in incoming:  # cancelled while waiting for a slot
                        if req.should_stop():
                            self._remove_incoming(req)
                            req.done = True
                            req.events.put(("done", "cancelled"))
                    for req in list(self._running):
                        if not req.done and req.should_stop():
                            self._finish(req, "cancelled")
                    while self._free_slot_exists():
                        with self._cv:
                            if not self._incoming:
                                break
                            req = self._incoming.popleft()
                        if req.done:
                            continue
                        self._admit(req)
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
        err = exc if isinstance(exc, EngineError) else EngineError(f"The fast engine failed: {_first_line(exc)}")
        with self._cv:
            waiting = list(self._incoming)
            self._incoming.clear()
        for req in list(self._running) + waiting:
            if not req.done:
                req.done = True
                req.events.put(("error", err))
        self._running.clear()
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

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int, int | None]:
        """(target slot, reusable prefix length, source slot of that prefix)."""
        best, source = 0, None
        for s in range(self.slots):
            n = common_prefix(self._slot_ids[s], prompt)
            if n > best:
                best, source = n, s
        reuse = min(best, len(prompt) - 1)
        free = [s for s in range(self.slots) if self._slot_req[s] is None]
        if source is not None and reuse > 0 and self._slot_req[source] is None:
            return source, reuse, source
        # least recently used free slot; ties → lowest index (keeps batches small)
        target = min(free, key=lambda s: (self._slot_used[s], s))
        return target, reuse, (source if reuse > 0 else None)

    def _admit(self, req: _Request) -> None:
        torch = self._torch
        prompt = req.prompt
        P = len(prompt)
        slot, reuse, source = self._pick_slot(prompt)
        self._slot_req[slot] = req
        self._slot_used[slot] = time.monotonic()
        req.slot = slot
        self._slot_ids[slot] = prompt[:reuse]
        self.stats["requests"] += 1
        try:
            if reuse > 0 and source != slot:
                self.cache[:, slot, :reuse].copy_(self.cache[:, source, :reuse])
            sp = req.sampling
            seed = sp.seed if sp.seed is not None else secrets.randbits(31)
            self.temp[slot] = float(sp.temperature)
            self.topk[slot] = int(sp.top_k) if 0 < sp.top_k <= self.top_k_cap else self.top_k_cap
            self.topp[slot] = float(sp.top_p) if sp.top_p and sp.top_p > 0 else 1.0
            self.penalty[slot] = float(sp.repetition_penalty or 1.0)
            self.seed[slot] = int(seed) & _M32
            self.seen[slot].zero_()
            self.seen[slot, torch.tensor(prompt, device=self.device)] = True
            t_prefill = time.perf_counter()
            logits = self._prefill(slot, prompt[reuse:], reuse)
            pos = torch.full((1,), P - 1, device=self.device, dtype=torch.long)
            first = self._sample(logits, slice(slot, slot + 1), pos)
            self.seen[slot, first] = True
            self.tok[slot : slot + 1].copy_(first)
            self.pos[slot] = P
            self.active[slot] = True
            token = int(first.item())
            self.stats["prefill_s"] += time.perf_counter() - t_prefill
        except Exception as exc:
            self._slot_req[slot] = None
            self._slot_ids[slot] = []
            req.done = True
            oom = "out of memory" in str(exc).lower()
            if self.device.type == "cuda" and oom:
                torch.cuda.empty_cache()
            msg = "The GPU ran out of memory for this request" if oom else "The fast engine failed on this request"
            req.events.put(("error", EngineError(f"{msg}: {_first_line(exc)}")))
            if not oom:
                raise
            return
        self._slot_ids[slot] = list(prompt)
        req.reused, req.prefilled = reuse, P - reuse
        self.stats["reused_tokens"] += reuse
        self.stats["prefill_tokens"] += P - reuse
        self._running.append(req)
        self._emit(req, token)

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
            r.spec_wait = max(0, r.spec_wait - 1)
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

    def _check_speculation(self, new: int = 12) -> None:
        """Start-up check of the speculative step as it will run (graphs, attention, sampling):
        a greedy answer to a fixed prompt in plain steps, then again with that answer as the
        drafts. Every draft should be kept; a near-tie of the several-row step's rounding may
        reject one, a wrong step rejects nearly all: below half kept, speculation is off
        (``spec_error``)."""
        prompt = [(i * 7919 + 13) % (min(self.vocab, 1000) - 1) + 1 for i in range(24)]
        greedy = Sampling(max_new_tokens=new, temperature=0.0)
        try:
            self.speculation = False
            answer, _ = self.generate(prompt, greedy, lambda: False, lambda _: None)
            self.speculation = True
            before = dict(self.stats)
            self._lookup_for = lambda p: KnownAnswer(p, answer)  # type: ignore[method-assign]
            try:
                got, _ = self.generate(prompt, greedy, lambda: False, lambda _: None)
            finally:
                del self._lookup_for
            drafted = self.stats["spec_drafted"] - before["spec_drafted"]
            kept = self.stats["spec_accepted"] - before["spec_accepted"]
            self.spec_check = {"drafted": drafted, "kept": kept, "same_tokens": got == answer}
            if drafted and kept * 2 < drafted:
                self.speculation = False
                self.spec_error = f"start-up check kept {kept} of {drafted} right drafts"
                log.warning("speculative step failed its start-up check (%s); speculation off", self.spec_error)
        except Exception as exc:
            self.speculation = False
            self.spec_error = f"start-up check: {_first_line(exc)[:200]}"
            log.warning("speculative step failed its start-up check (%s); speculation off", exc)
        for slot in range(self.slots):  # the check's tokens are no prefix worth reusing
            self._slot_ids[slot] = []
        for key, value in self.stats.items():  # counters start with the first real request
            self.stats[key] = type(value)()

    def _lookup_for(self, prompt: list[int]) -> PromptLookup | KnownAnswer:
        """Where a request's drafts come from (the benchmark substitutes known answers)."""
        return PromptLookup(prompt)

    def _may_speculate(self) -> bool:
        """Could the next step be speculative? (Room for a draft beside every running request,
        and one of them not backing off.)"""
        live = [r for r in self._running if not r.done]
        return (self.speculation and 0 < len(live) < self.spec_tokens
                and any(r.lookup is not None and r.spec_wait == 0 for r in live))

    def _plan(self) -> list[tuple[_Request, list[int]]] | None:
        """Every running request with its drafts, in admission order, within the step's rows
        (the step costs the same for 1 to 8 rows: spare rows are free tokens); None when no
        request has a draft."""
        live = [r for r in self._running if not r.done]
        if not live:
            return None
        room = self.spec_tokens - len(live)
        plan = []
        for req in live:
            draft = self._draft(req, room) if room > 0 else []
            room -= len(draft)
            plan.append((req, draft))
        return plan if any(d for _, d in plan) else None

    def _draft(self, req: _Request, room: int) -> list[int]:
        if req.lookup is None:
            return []
        if req.spec_wait > 0:  # backing off after drafts the model rejected (counted in _launch)
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
            if self.device.type == "cuda":
                self._spec_host_ctl.copy_(torch.tensor(ctl, dtype=torch.long).flatten())
                self.spec_ctl.copy_(self._spec_host_ctl, non_blocking=True)
            else:
                self.spec_ctl.copy_(torch.tensor(ctl, dtype=torch.long).flatten())
            self.run_verify_step(Lc)
            if self.device.type == "cuda":
                self._spec_host_out.copy_(self.spec_out, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                t = time.perf_counter()
                event.synchronize()
                self.stats["wait_s"] += time.perf_counter() - t
                out = self._spec_host_out.tolist()
            else:
                out = self.spec_out.tolist()
        except Exception as exc:
            # the step updates the slots' tokens, positions and seen masks last: a failure
            # before that leaves the requests as they were, and they go on in plain steps (a
            # failure that broke the device fails the next plain step, and the loop handles it)
            log.warning("speculative step failed (%s); speculation off", exc)
            self.speculation = False
            self.spec_error = _first_line(exc)[:200]
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
            if not draft:
                req.spec_wait = max(0, req.spec_wait - 1)
            else:
                n = len(tokens) - 1
                self.stats["spec_drafted"] += len(draft)
                self.stats["spec_accepted"] += n
                req.spec_misses = 0 if n else req.spec_misses + 1
                req.spec_wait = min(16, 2 ** (req.spec_misses - 1)) if req.spec_misses else 0
            for token in tokens:
                if req.done:
                    break
                self._emit(req, token)

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

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        req.done = True
        slot = req.slot
        if slot is not None and self._slot_req[slot] is req:
            self.active[slot] = False
            fed = min(req.fed, len(req.produced))
            self._slot_ids[slot] = req.prompt + req.produced[:fed]
            self._slot_req[slot] = None
            self._slot_used[slot] = time.monotonic()
        if req in self._running:
            self._running.remove(req)
        req.events.put(("done", reason))
        with self._cv:
            self._cv.notify_all()


def unsuitable(model: Any) -> str | None:
    """Why ``engine: auto`` leaves a loaded model to ``generate()``; None when the fast engine
    suits it (a multi-query GPTBigCode model wholly on one CUDA device)."""
    if not getattr(model.config, "multi_query", False) or getattr(model.config, "model_type", "") != "gpt_bigcode":
        return "not a multi-query GPTBigCode model"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return "the model is spread over several devices"
    if next(iter(devices)).type != "cuda":
        return "the model is not on a CUDA GPU"
    return None


def _sdpa_mqa(q, k, v, mask, scale):
    """Prefill attention: q (1,H,T,D) against one K/V head (1,1,S,D), causal (bottom-right)."""
    import torch.nn.functional as F

    is_causal = mask is None
    if mask is not None:
        try:  # bottom-right causal without a materialised mask (flash / memory-efficient kernels)
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(q.shape[-2], k.shape[-2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
        except Exception:
            pass
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
    except (TypeError, RuntimeError):
        H = q.shape[1]
        k = k.expand(-1, H, -1, -1)
        v = v.expand(-1, H, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["FastEngine", "batch_buckets", "common_prefix", "length_buckets", "unsuitable"]


def graph_time_us(fn, device, reps: int = 20) -> float:
    """Median device time of one call of ``fn`` in microseconds: ``reps`` calls captured in one
    CUDA graph, replayed 5 times, so launch overhead does not count."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return sorted(times)[len(times) // 2]
