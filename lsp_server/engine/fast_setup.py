"""The fast engine's start-up (a mixin of ``FastEngine``): what it checks and chooses.

Every GPU-only path is checked against a plain torch reference before it is used, and timed
where there is a choice; a path that fails its check is not used, and why is kept for the
benchmark's JSON:

* attention: the Triton split-KV kernel, or torch; whether that kernel also writes the step's
  K/V to the cache (checked, then timed on the whole step); fused decode ops (GELU epilogue,
  residual as the GEMM's C operand, bias + LayerNorm in one kernel); the one-row bias pre-write;
* the batch-1 GEMV per weight (Triton where faster than cuBLAS); whether c_fc's GELU runs in
  the GEMM's epilogue (timed for decode and prefill rows); the prefill attention (the fastest
  SDPA path or Triton kernel that agrees with float32); sampling in three kernels (checked
  against the torch ops, timed); the one-row bias pre-write, the cache write in the attention
  kernel and the L2 prefetch of the next GEMM's weights (each timed on the whole step).

What the timings decided is remembered between starts (``choices.py``). The CUDA graphs and
the speculative step's start-up check are in ``fast_graphs.py``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any

from .base import EngineError, first_line
from .fast_graphs import graph_time_us
from .fast_math import FC_PAD_ROWS

log = logging.getLogger("lsp_server.engine.fast")

# one-row GEMV candidates timed against cuBLAS at start: (block_n, block_k, num_warps, num_stages).
# H200 run 2 had the first two only: (8, 512) won lm_head (163 us against cuBLAS' 197) and lost
# qkv / attn_proj by ~2.5 us and fc / mlp_proj by ~18 us; (16, 256) lost everywhere (dropped).
# A program waits on one [block_n, block_k] tile of loads per iteration, so the bytes in flight
# per SM grow with the tile: the three newer ones load 16-32 KB tiles (8 KB before), compiled
# for sm_90 without spills (python -m lsp_server.testing.triton_targets).
GEMV_CONFIGS = ((8, 512, 4, 3), (4, 2048, 8, 1), (8, 1024, 8, 1), (16, 1024, 8, 1))


def have_triton() -> bool:
    try:
        from .mqa_triton import HAVE_TRITON
    except Exception:
        return False
    return HAVE_TRITON


@contextmanager
def ieee_float32_matmul(torch):
    """float32 matmuls in full precision (no TF32) inside the block. The ``fp32_precision``
    API where torch has it: since torch 2.9 reading the old ``allow_tf32`` flag raises once
    anything in the process has used the new one."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old, attr, value = matmul.fp32_precision, "fp32_precision", "ieee"
    else:
        old, attr, value = matmul.allow_tf32, "allow_tf32", False
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, old)


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in float32; a NaN (an unwritten output) counts as infinitely wrong."""
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    return err if err == err else float("inf")


class StartUp:
    """Start-up checks and choices of ``FastEngine`` (see the module docstring)."""

    # tests: run the timed choices that only a GPU runs (with ``_time_us`` replaced), so the
    # start-up sequence's CUDA branches (their order, the state each leaves) run on the CPU
    time_on_cpu = False

    def _timed(self, timed: bool | None = None) -> bool:
        """Whether a choice is made by timing: on CUDA (or as ``timed`` says)."""
        return timed if timed is not None else (self.device.type == "cuda" or self.time_on_cpu)

    def _choose_attention(self, requested: str) -> str:
        if requested == "torch" or (self.device.type != "cuda" and requested != "triton"):
            return "torch"  # on the CPU, "triton" is honoured for tests under TRITON_INTERPRET=1
        if not have_triton():
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
        if not have_triton() or not hasattr(self._torch, "_addmm_activation"):
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
        errs = [rel_err(a, b) for a, b in ((got_x, ref_x), (got_h, ref_h), (got_g, ref_g))]
        # the one-row variant: bias pre-written into the GEMM's output by the LayerNorm kernel
        # (its own check: a failure here only turns the pre-write off)
        self.prebias = False
        try:
            x1 = x[:1].clone()
            y1 = torch.full((1, fcw.shape[0]), float("nan"), device=self.device, dtype=self.dtype)
            h1 = bias_add_layer_norm(x1, cb, ln2w, ln2b, self.eps, fill=(y1, fcb))
            ref_y1 = F.linear(h1, fcw, fcb)
            got_y1 = y1.addmm_(h1, fcw.t())
            self.prebias_check_err = max(rel_err(got_y1, ref_y1), rel_err(h1, ref_h[:1]))
            self.prebias = self.prebias_check_err < 2e-2
        except Exception as exc:
            log.warning("one-row bias pre-write failed its self-check (%s)", exc)
            self.prebias_error = first_line(exc)
        # Which GELU does the epilogue compute? In bf16 tanh and erf GELU are indistinguishable
        # (both ~3e-3 from each other's rounding); in float32 they differ by ~3e-5 while either
        # matches itself to ~1e-6. HF's GPTBigCode uses the tanh form: a GELU epilogue with the
        # erf form would be a real (if small) numerical difference, so it is refused.
        self.gelu_epilogue = "unknown"
        try:
            with ieee_float32_matmul(torch):
                a32, w32, b32 = h_in[:, :512].float(), fcw[:256, :512].float(), fcb[:256].float()
                g32 = torch._addmm_activation(b32, a32, w32.t(), use_gelu=True)
                lin = F.linear(a32, w32, b32)
                e_tanh = rel_err(F.gelu(lin, approximate="tanh"), g32)
                e_erf = rel_err(F.gelu(lin), g32)
            self.gelu_epilogue = "tanh" if e_tanh <= e_erf else "erf"
            self.gelu_epilogue_err = {"tanh": e_tanh, "erf": e_erf}
        except Exception as exc:
            self.gelu_epilogue = f"check failed: {first_line(exc)}"
        return float(max(errs))

    def _choose_gelu_fusion(self, timed: bool | None = None) -> None:
        """Whether c_fc computes bias + GELU in cuBLASLt's epilogue (one kernel) or a GELU kernel
        follows the GEMM, for decode-step GEMMs (<= fast_math.FEW_ROWS rows; timed at 8) and
        prefill ones (timed at 2048) separately: only where the numerical check found the tanh
        epilogue, and on CUDA (or when ``timed``) only where the fused GEMM is not slower than
        the two kernels. cuBLASLt may serve an epilogue with a different, slower kernel than the plain
        GEMM, by card and library version; the prefill's c_fc is its biggest GEMM (~0.8 ms a
        layer at 2048 tokens on an H200), so a slower epilogue kernel there costs milliseconds
        of first-token time. Timings: ``gelu_fusion_us``."""
        fusable = self.gelu_epilogue == "tanh"
        self.gelu_fused = {"decode": fusable, "prefill": fusable}
        if not fusable or not self._timed(timed):
            return
        fcw, fcb = self.layers[0][8], self.layers[0][9]
        us = self.gelu_fusion_us = {}

        def not_slower() -> dict:  # _fc_gelu itself, each way, at each phase's rows
            for phase, rows, reps in (("decode", 8, 20), ("prefill", 2048, 5)):
                h = self._torch.randn((rows, fcw.shape[1]), device=self.device, dtype=self.dtype)
                for fused, way in ((True, "fused"), (False, "separate")):
                    self.gelu_fused[phase] = fused
                    us[f"{phase}_{way}"] = round(self._time_us(lambda: self._fc_gelu(h, fcw, fcb), reps), 1)
            return {p: us[f"{p}_fused"] <= us[f"{p}_separate"] * 1.01 for p in ("decode", "prefill")}

        try:
            self.gelu_fused = dict(self.choices.ask("gelu_fusion", not_slower))
        except Exception as exc:  # keep the fused epilogue the numerical check accepted
            us["error"] = first_line(exc)[:200]
            self.gelu_fused = {"decode": True, "prefill": True}

    def _choose_fc_padding(self, timed: bool | None = None) -> None:
        """The step sizes (live rows B with 1 < B < ``FC_PAD_ROWS``: the batch buckets and the
        speculative step's rows) whose c_fc runs for ``FC_PAD_ROWS`` rows, B of them live: on
        CUDA (or when ``timed``) where ``_fc_gelu`` at that many rows is >= 3 % faster than at
        B. cuBLAS picks its kernel by shape: on H200 runs, 8 rows took 81-83 us and 16 rows
        75 us, as one row does. Fused ops only (the norm kernel writes the live rows into the
        padded input). Timings: ``fc_padding_us``, by row count."""
        self.fc_padded = ()
        if not self.fused or not self._timed(timed):
            return
        fcw, fcb = self.layers[0][8], self.layers[0][9]
        sizes = sorted({b for b in (*self.batch_buckets, self.spec_tokens) if 1 < b < FC_PAD_ROWS})
        us = self.fc_padding_us = {}

        def faster() -> list[int]:
            for rows in (FC_PAD_ROWS, *sizes):
                h = self._torch.randn((rows, fcw.shape[1]), device=self.device, dtype=self.dtype)
                us[str(rows)] = round(self._time_us(lambda: self._fc_gelu(h, fcw, fcb)), 2)
            return [b for b in sizes if us[str(FC_PAD_ROWS)] * 1.03 <= us[str(b)]]

        try:
            self.fc_padded = tuple(self.choices.ask("fc_padding", faster))
        except Exception as exc:  # c_fc at its own rows, as before
            us["error"] = first_line(exc)[:200]
            self.fc_padded = ()

    def _choose_sampling(self, requested: bool | None) -> None:
        """Sampling in three kernels (``sample_triton``) instead of the torch ops, on CUDA by
        default: only if it gives the torch path's greedy tokens exactly and its sampled ones
        in >= 95 % of the draws (they may differ only where two candidates' scores are within
        a few ulps), and, unless ``requested`` (tests under the interpreter), only if it is
        >= 3 % faster at one row in a CUDA graph. What was measured: ``sample_report``."""
        self.sample_kernels = False
        self.sample_report: dict[str, Any] = {}
        if requested is False or (requested is None and not self._timed()):
            return
        if not have_triton():
            if requested:
                raise EngineError("fused sampling needs the triton package")
            return
        try:
            same_greedy, agree = self.check_sampling()
            self.sample_report.update(greedy_same=same_greedy, sampled_agree=round(agree, 4))
            if not (same_greedy and agree >= 0.95):
                log.warning("sampling kernels disagree with torch (%s); torch sampling", self.sample_report)
                return
            if not requested and not self.choices.ask("sample_kernels", self._sampling_kernels_faster):
                return
            self.sample_kernels = True
        except Exception as exc:
            self.sample_kernels = False
            self.sample_report["error"] = first_line(exc)[:200]
            log.warning("sampling kernels failed their check (%s); torch sampling", exc)
            if requested:
                raise

    def _sampling_kernels_faster(self) -> bool:
        """Are the sampling kernels >= 3 % faster than the torch ops at one row (CUDA graph)?"""
        torch = self._torch
        logits = torch.randn((1, self.vocab), device=self.device, dtype=torch.float32)
        pos = self.pos[:1]
        us = {}
        try:
            for name, on in (("torch", False), ("triton", True)):
                self.sample_kernels = on
                us[name] = round(self._time_us(lambda: self._sample(logits, slice(0, 1), pos)), 2)
        finally:
            self.sample_kernels = False
        self.sample_report["us_b1"] = us
        return us["triton"] < 0.97 * us["torch"]

    def check_sampling(self, trials: int = 16) -> tuple[bool, float]:
        """Both sampling paths on the same random logits, 8 rows with different parameters
        (greedy, top-k 1, penalties, top-p, temperatures): are the greedy rows identical, and
        in what share of the sampled rows is the token the same? The per-slot parameters are
        set for the check and reset after it (no request runs yet)."""
        torch = self._torch
        dev, S, V = self.device, self.slots, self.vocab
        gen = torch.Generator(device=dev).manual_seed(2024)
        temps = [0.0, 0.2, 0.7, 1.0, 0.2, 0.0, 1.3, 0.2]
        topks = [self.top_k_cap, 50, self.top_k_cap, 1, 10, 5, self.top_k_cap, 50]
        topps = [1.0, 0.95, 0.5, 1.0, 0.9, 1.0, 1.0, 0.95]
        pens = [1.0, 1.2, 1.0, 1.5, 1.0, 1.3, 2.0, 1.0]
        rows = torch.arange(8, device=dev) % S
        same_greedy, agree, drawn = True, 0, 0
        try:
            for r in range(min(8, S)):
                self.temp[r], self.topk[r], self.topp[r], self.penalty[r] = temps[r], min(topks[r], self.top_k_cap), topps[r], pens[r]
                self.seed[r] = 1000 + r
            self.seen[:S] = torch.rand((S, V), device=dev, generator=gen) < 0.01
            greedy_rows = self.temp[rows] <= 0
            for t in range(trials):
                logits = torch.randn((8, V), device=dev, generator=gen) * 3.0
                top = logits[t % 8].max()
                logits[t % 8, : min(V, 64)] = top  # ties: the first maximum wins, also over a later block
                logits[t % 8, V - 1] = top
                pos = torch.full((8,), 100 + t, device=dev, dtype=torch.long)
                outs = []
                for on in (False, True):
                    self.sample_kernels = on
                    outs.append(self._sample(logits, rows, pos))
                self.sample_kernels = False
                same = outs[0] == outs[1]
                same_greedy = same_greedy and bool(same[greedy_rows].all())
                agree += int(same[~greedy_rows].sum())
                drawn += int((~greedy_rows).sum())
        finally:
            self.sample_kernels = False
            self.temp.zero_()
            self.topk.fill_(self.top_k_cap)
            self.topp.fill_(1.0)
            self.penalty.fill_(1.0)
            self.seed.zero_()
            self.seen.zero_()
        return same_greedy, agree / max(1, drawn)

    def check_triton_attention(self, batch: int = 2, cache_len: int = 1024) -> float:
        """Relative error of the Triton kernel against the float32 torch attention on random data
        (``cache_len`` keys at most: no more than the engine's context window)."""
        import torch

        from .mqa_triton import TritonMQADecode

        cache_len = min(cache_len, self.max_len)
        torch.manual_seed(1234)
        H, D = self.n_head, self.head_dim
        kv = torch.randn((batch, cache_len + 1, 2 * D), device=self.device, dtype=self.dtype)
        q = torch.randn((batch, H, D), device=self.device, dtype=self.dtype)
        lengths = torch.tensor([max(1, cache_len - 37 * i) for i in range(batch)], device=self.device, dtype=torch.long)
        attn = TritonMQADecode(batch, cache_len, H, D, self.device, self.dtype)
        out = attn(q, kv, lengths, self.scale).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ref = self._torch_attention(q.float(), kv[:, :cache_len].float(), lengths, None).float()
        err = rel_err(out, ref)
        # the variant that takes the step's own K/V from the QKV output and writes the cache
        # (its own result: a failure only keeps the separate cache write)
        self.kv_in_attention_check = None
        try:
            new = torch.randn((batch, 2 * D), device=self.device, dtype=self.dtype)
            rows = torch.arange(batch, device=self.device)
            got_kv, ref_kv = kv.clone(), kv.clone()
            ref_kv[rows, lengths - 1] = new
            out = attn(q, got_kv[:, :cache_len], lengths, self.scale, new=new, wpos=lengths - 1).float()
            ref = self._torch_attention(q.float(), ref_kv[:, :cache_len].float(), lengths, None).float()
            self.kv_in_attention_check = {"rel_err": rel_err(out, ref), "cache_written": bool(torch.equal(got_kv, ref_kv))}
        except Exception as exc:
            self.kv_in_attention_check = {"error": first_line(exc)[:200]}
        return err

    def _choose_kv_in_attention(self, requested: bool | None) -> None:
        """Let the decode step's Triton attention write the step's K/V to the cache (one
        kernel per layer fewer) if its check passed and, on CUDA (unless ``requested``), a
        batch-1 step at a 2K context is not slower with it (``kv_in_attention_us``)."""
        self.kv_in_attention = False
        check = getattr(self, "kv_in_attention_check", None) or {}
        if requested is False or self.attention != "triton" or not (check.get("rel_err", 1.0) < 2e-2 and check.get("cache_written")):
            if requested:
                raise EngineError(f"the cache write in the attention kernel failed its check: {check}")
            return
        if requested or not self._timed():
            self.kv_in_attention = bool(requested)
            return
        self.kv_in_attention_us = {}
        try:
            self.kv_in_attention = self._kept_if_not_slower("kv_in_attention", self.kv_in_attention_us)
        except Exception as exc:
            self.kv_in_attention_us["error"] = first_line(exc)[:200]
            self.kv_in_attention = False

    def _choose_prebias(self, timed: bool | None = None) -> None:
        """Keep the batch-1 bias pre-write (the LayerNorm kernel writes the next GEMM's bias
        into its output, the GEMM accumulates onto it: no bias-copy kernel before qkv and c_fc)
        only if, on CUDA (or when ``timed``), a batch-1 step is not slower with it
        (``prebias_us``). Its numerical check (``check_fused``) alone decided before."""
        if not self.prebias or not self._timed(timed):
            return
        self.prebias_us = {}
        try:
            self.prebias = self._kept_if_not_slower("prebias", self.prebias_us)
        except Exception as exc:  # keep what the numerical check accepted
            self.prebias_us["error"] = first_line(exc)[:200]
            self.prebias = True

    def _kept_if_not_slower(self, attr: str, report: dict, tolerance: float = 1.002) -> bool:
        """Whether the step path switched by the flag ``attr`` stays on: a batch-1 step timed
        off, on, off, on (``report``: the faster of each pair, so a drift of the clock between
        two timings does not decide), kept unless > ``tolerance`` x slower; or the answer an
        earlier start's timing gave (``choices``)."""

        def not_slower() -> bool:
            for on in (False, True, False, True):
                setattr(self, attr, on)
                key = "on" if on else "off"
                report[key] = min(report.get(key, float("inf")), self._step_us())
            return report["on"] <= report["off"] * tolerance

        return bool(self.choices.ask(attr, not_slower))

    def _step_us(self, B: int = 1) -> float:
        """Device time of a decode step of B live rows (in a CUDA graph of 3 steps) at ~1K keys
        of a 2K-or-smaller bucket: what start-up choices between whole-step variants compare."""
        Lc = max([n for n in self.length_buckets if n <= 2048] or self.length_buckets[:1])
        with self.live_row(Lc // 2, B):
            return round(self._time_us(lambda: self._decode_step(B, Lc), reps=3), 1)

    @contextmanager
    def live_row(self, pos: int, rows: int = 1):
        """Slots 0..rows-1 as running rows at ``pos`` while no request runs (start-up timings,
        the bench's profile); idle again afterwards (tokens, positions, seen masks reset)."""
        try:
            self.pos[:rows], self.active[:rows] = pos, True
            yield
        finally:
            self.pos[:rows], self.active[:rows], self.tok[:rows] = 0, False, 0
            self.seen[:rows].zero_()

    def _choose_prefetch(self, requested: bool | None) -> None:
        """L2 prefetch of the next GEMM's weights on a side stream during the small kernels
        between GEMMs (``_prefetch``): CUDA graphs with fused ops only; each candidate (plain
        loads or ``prefetch`` instructions; 8 or 16 MB a window) is timed on the whole batch-1
        step and the fastest is kept only if it gains >= 1 % (``prefetch_us``). It cannot
        change a value, so there is no numerical check: speed is the only question."""
        self._l2 = self._side = None
        self.prefetch_us: dict[str, Any] = {}
        if requested is False:
            return
        from .mqa_triton import L2Prefetch

        if requested and self.device.type != "cuda":  # tests under the interpreter: inline, no side stream
            self._l2, self.prefetch_bytes = L2Prefetch(self.device, "load", programs=4), 1 << 16
            self.prefetch_us["chosen"] = "load (inline)"
            return
        if not (self.use_graphs and self.fused and self.device.type == "cuda"):
            return
        if os.environ.get("STARCHAT_FAST_PREFETCH") == "0":
            return
        self._side = self._torch.cuda.Stream(self.device)

        def fastest() -> list:
            """[mode, MB a window] of the fastest candidate, or [] (none gains 1 %)."""
            best, best_us = [], None
            base = self.prefetch_us["off"] = self._step_us()
            for mode in ("load", "prefetch"):
                for mb in (8, 16):
                    name = f"{mode}_{mb}mb"
                    try:
                        self._l2, self.prefetch_bytes = L2Prefetch(self.device, mode), mb << 20
                        us = self.prefetch_us[name] = self._step_us()
                        if best_us is None or us < best_us:
                            best, best_us = [mode, mb], us
                    except Exception as exc:
                        self.prefetch_us[name] = first_line(exc)[:160]
                    finally:
                        self._l2 = None
            base = min(base, self._step_us())  # the baseline again: drift is not a gain
            self.prefetch_us["off_again"] = base
            if best:  # for the record: the full batch with and without the fastest candidate
                B = max(self.batch_buckets)
                self.prefetch_us[f"off_b{B}"] = self._step_us(B)
                try:
                    self._l2, self.prefetch_bytes = L2Prefetch(self.device, best[0]), best[1] << 20
                    self.prefetch_us[f"{best[0]}_{best[1]}mb_b{B}"] = self._step_us(B)
                finally:
                    self._l2 = None
            return best if best and (requested or best_us < 0.99 * base) else []

        try:  # asked for: the fastest candidate, not remembered (it did not earn its place by timing)
            chosen = fastest() if requested else self.choices.ask("prefetch", fastest)
            if chosen:
                mode, mb = chosen
                self._l2, self.prefetch_bytes = L2Prefetch(self.device, mode), int(mb) << 20
                self.prefetch_us["chosen"] = f"{mode}_{mb}mb"
        except Exception as exc:
            self._l2 = None
            self.prefetch_us["error"] = first_line(exc)[:200]

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
        if requested is None and (not self._timed() or os.environ.get("STARCHAT_FAST_GEMV") == "0"):
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
        # the weights and configurations an earlier start chose by timing: checked, not timed
        remembered = None if requested else self.choices.recall("gemv")
        for name, (wt, bias, acc, gelu) in cases.items():
            if remembered is not None and name not in remembered:
                continue
            try:
                x = torch.randn((1, wt.shape[1]), device=self.device, dtype=self.dtype, generator=gen)
                y0 = torch.randn((1, wt.shape[0]), device=self.device, dtype=self.dtype, generator=gen)
                if acc:
                    ref = (y0.float() + F.linear(x, wt).float())
                else:
                    ref = F.linear(x, wt, bias)
                    ref = (F.gelu(ref, approximate="tanh") if gelu else ref).float()
                best = None
                configs = [tuple(remembered[name])] if remembered is not None else list(GEMV_CONFIGS)
                for cfg in configs:  # each is one Triton compile per shape (~1 s)
                    try:
                        g = TritonGEMV(wt, *cfg)
                        out = y0.clone() if acc else None
                        got = g(x, bias, out=out, accumulate=acc, gelu=gelu).float()
                        err = rel_err(got, ref)
                        if not err < 1e-2:
                            self.gemv_report[f"{name}_{cfg}"] = f"rel err {err:.3g}"
                            continue
                        if requested or remembered is not None:
                            best = (0.0, g, cfg)
                            break
                        yb = y0.clone()
                        us = self._time_us(lambda g=g, yb=yb: g(x, bias, out=yb, accumulate=acc, gelu=gelu) if acc else g(x, bias, gelu=gelu))
                        self.gemv_report[f"{name}_triton_{cfg[0]}x{cfg[1]}_us"] = round(us, 2)
                        if best is None or us < best[0]:
                            best = (us, g, cfg)
                    except Exception as exc:
                        self.gemv_report[f"{name}_{cfg}"] = first_line(exc)[:160]
                if best is None:
                    if remembered is not None:
                        self.choices.forget("gemv")
                    continue
                if requested or remembered is not None:
                    self._gemv[name] = best[1]
                    continue
                cublas_us = self._time_us(self._gemm_as_the_step_runs_it(name, x, wt, bias, y0))
                self.gemv_report[f"{name}_cublas_us"] = round(cublas_us, 2)
                if best[0] < 0.97 * cublas_us:
                    self._gemv[name] = best[1]
            except Exception as exc:
                self.gemv_report[name] = first_line(exc)[:160]
        self.gemv_report["chosen"] = sorted(self._gemv)
        if requested is None and remembered is None:
            self.choices.remember("gemv", {n: [g.block_n, g.block_k, g.num_warps, g.num_stages] for n, g in self._gemv.items()})

    def _gemm_as_the_step_runs_it(self, name: str, x, wt, bias, y0):
        """The cuBLAS path a Triton GEMV would replace, as ``_rows_forward`` runs it at one row:
        residual projections accumulate onto the residual; with the bias pre-write, qkv and c_fc
        accumulate onto their pre-written bias (the LayerNorm kernel before them writes it in
        any case); c_fc's GELU as ``_fc_gelu`` computes it (epilogue or kernel)."""
        F = self._torch.nn.functional
        yc = y0.clone()
        if name in ("attn_proj", "mlp_proj"):
            return lambda: yc.addmm_(x, wt.t())
        if name == "fc":
            if self.prebias:
                return lambda: F.gelu(yc.addmm_(x, wt.t()), approximate="tanh")
            return lambda: self._fc_gelu(x, wt, bias)
        if name == "qkv" and self.prebias:
            return lambda: yc.addmm_(x, wt.t())
        return lambda: F.linear(x, wt, bias)

    def _choose_prefill_attention(self, forced: str | None = None) -> str:
        """On CUDA, time the candidate SDPA paths and the Triton MQA kernel's configurations
        for a 2048-token causal prompt (one layer's shapes, the single K/V head; timed with
        the output laid out as the projection reads it: a copy for some paths) and keep the
        fastest one that agrees with a float32 reference and costs no more than ~2 ms extra on
        the first prompt of a length it has not seen (a backend that builds a plan per shape
        would pay that on nearly every request: prompts rarely repeat a length); the reasons a
        candidate was dropped go to ``prefill_attention_report``
        (``<mode>_new_length_extra_us``: that first-call cost)."""
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
            self.prefill_attention_report["reference"] = first_line(exc)
        best, best_us = "sdpa_gqa", None
        candidates = ["sdpa_gqa", "flash_expand", "flash_gqa", "cudnn_expand", "efficient_expand"]
        if have_triton():  # MQA in Triton: the K/V tile loaded once for G heads (prefill_triton.py)
            from .prefill_triton import CONFIGS

            candidates += list(CONFIGS)
        wanted = os.environ.get("STARCHAT_FAST_PREFILL_ATTN")
        if wanted in candidates:
            candidates = ["sdpa_gqa", wanted]

        def attend(n=T):  # as the prefill uses it: the output as (n, E) rows for the projection
            return self._prefill_attn(q[:, :, :n], k[:, :, :n], v[:, :, :n])[0].transpose(0, 1).reshape(n, E)

        def wall_us(n):  # host wall time of one call on the first n positions, device work included
            torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            attend(n)
            torch.cuda.synchronize(self.device)
            return (time.perf_counter() - t) * 1e6

        def disagrees(mode) -> str | None:
            """Why ``mode`` is not correct here (None: it agrees with float32). A Triton mode
            also serves a prompt's suffix after a cached prefix: the reference's queries alone
            against all the keys must give the same rows."""
            self.prefill_attention = mode
            out = self._prefill_attn(q, k, v)
            if ref is not None:
                err = rel_err(out[0, :, ref[1]], ref[0])
                if mode.startswith("triton"):
                    err = max(err, rel_err(self._prefill_attn(q[:, :, ref[1]], k, v)[0], ref[0]))
                if not err < 2e-2:
                    return f"rel err {err:.3g}"
            return None

        remembered = None if wanted else self.choices.recall("prefill_attention")
        if remembered is not None:  # an earlier start's choice by timing: checked, not timed
            try:
                why = disagrees(remembered)
            except Exception as exc:
                why = first_line(exc)[:160]
            if why is None:
                return remembered
            self.prefill_attention_report[remembered] = why
            self.choices.forget("prefill_attention")
        for i, mode in enumerate(candidates):
            try:
                why = disagrees(mode)
                if why is not None:
                    self.prefill_attention_report[mode] = why
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                attend()
                times = []
                for _ in range(5):
                    start.record()
                    attend()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                us = sorted(times)[len(times) // 2]
                self.prefill_attention_report[mode] = round(us, 1)
                steady = min(wall_us(T) for _ in range(3))
                extra = wall_us(T - 8 * (i + 1) - 1) - steady  # a length no candidate has run
                self.prefill_attention_report[f"{mode}_new_length_extra_us"] = round(extra, 1)
                if extra > 2000:
                    continue
                if best_us is None or us < best_us * 0.97:  # a clear gain only; ties keep the default
                    best, best_us = mode, us
            except Exception as exc:
                self.prefill_attention_report[mode] = first_line(exc)[:160]
        self.prefill_attention = best
        if not wanted:
            self.choices.remember("prefill_attention", best)
        return best
