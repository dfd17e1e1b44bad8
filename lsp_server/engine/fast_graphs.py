"""The fast engine's CUDA graphs (a mixin of ``FastEngine``): the decode step per (batch, length)
bucket and the speculative step per length bucket, captured at start in one memory pool, with
fallbacks down to eager steps; and the speculative step's start-up check on a known answer.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from .base import Sampling, first_line
from .lookup import KnownAnswer

log = logging.getLogger("lsp_server.engine.fast")


class Graphs:
    """Graph capture and the speculation check of ``FastEngine`` (see the module docstring)."""

    def _capture(self, steps: dict[Any, Any]) -> dict[Any, Any]:
        """One CUDA graph per entry of ``steps`` (key → step function), in one memory pool:
        each step runs once on a side stream first (kernel selection, Triton compiles,
        workspaces), then is captured."""
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for step in steps.values():
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graphs = {}
        current = torch.cuda.current_stream(self.device)
        try:
            for key, step in steps.items():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    step()
                graphs[key] = graph
        finally:  # a capture that fails to end leaves its capture stream current: not the next one's problem
            torch.cuda.set_stream(current)
        torch.cuda.synchronize(self.device)
        return graphs

    def _capture_all(self) -> None:
        self._graphs = self._capture({(b, n): partial(self._decode_step, b, n)
                                      for b in self.batch_buckets for n in self.length_buckets})

    def _capture_verify(self) -> None:
        """One speculative-step graph per length bucket. If capture fails, it is tried once
        more without the L2 prefetch (the decode graphs keep theirs: a graph holds what was
        captured), then speculation is turned off (``spec_error`` says why); plain decoding is
        unaffected."""
        while True:
            try:
                self._spec_graphs = self._capture({n: partial(self._verify_step, n) for n in self.length_buckets})
                return
            except Exception as exc:
                if self._l2 is not None:
                    log.warning("speculative step capture failed with the L2 prefetch (%s); trying without", exc)
                    self._l2 = None
                    self.prefetch_us["speculative_step"] = f"without: {first_line(exc)[:160]}"
                    continue
                log.warning("speculative step capture failed (%s); speculation off", exc)
                self.spec_error = first_line(exc)[:200]
                self._spec_graphs = {}
                self.spec_tokens = 1
                return

    def _capture_with_fallback(self) -> None:
        """Graphs with the chosen paths; if capture fails, again with the newest optional path
        off (one at a time: L2 prefetch, cache write in the attention, sampling kernels, Triton
        GEMVs, bias pre-write), then with torch attention; if that fails too, eager steps
        (slower, still correct). The path whose removal let the capture succeed is remembered
        as off for this fingerprint: the next start neither times it nor pays the failed
        capture again."""
        torch = self._torch
        last_off = None
        while True:
            try:
                self._capture_all()
                if last_off is not None:
                    self.choices.remember(*last_off)
                return
            except Exception as exc:
                what = (f"{self.attention}{' + prebias' if self.prebias else ''}{' + gemv' if self._gemv else ''}"
                        f"{' + kv in attention' if self.kv_in_attention else ''}{' + sampling kernels' if self.sample_kernels else ''}"
                        f"{' + L2 prefetch' if self._l2 is not None else ''}")
                log.warning("decode graph capture failed (%s attention): %s", what, exc)
                self.graph_error = (self.graph_error + " | " if self.graph_error else "") + f"{what}: {first_line(exc)}"
                self._graphs.clear()
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:
                    pass
                last_off = self._turn_off_newest_path()
                if last_off is not None:
                    continue
                if self.attention != "triton":
                    break
                self.attention = "torch"
                self._triton.clear()
        self.use_graphs = False

    def _turn_off_newest_path(self) -> tuple[str, Any] | None:
        """Turn off the newest optional decode path still on; returns its ``choices`` entry as
        off (question, answer), or None when none is on."""
        if self._l2 is not None:
            self._l2 = None
            return "prefetch", []
        for attr in ("kv_in_attention", "sample_kernels"):
            if getattr(self, attr):
                setattr(self, attr, False)
                return attr, False
        if self._gemv:
            self._gemv.clear()
            self._gemv_ops.clear()
            return "gemv", {}
        if self.prebias:
            self.prebias = False
            return "prebias", False
        return None

    def _warm_prefill(self) -> None:
        """One short prefill into the last slot (its content is then forgotten)."""
        n = min(16, self.max_len - 1)
        self._prefill(self.slots - 1, [0] * n, 0)
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

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
            with self.drafts_from(lambda p: KnownAnswer(p, answer)):
                got, _ = self.generate(prompt, greedy, lambda: False, lambda _: None)
            drafted = self.stats["spec_drafted"] - before["spec_drafted"]
            kept = self.stats["spec_accepted"] - before["spec_accepted"]
            self.spec_check = {"drafted": drafted, "kept": kept, "same_tokens": got == answer}
            if drafted and kept * 2 < drafted:
                self.speculation = False
                self.spec_error = f"start-up check kept {kept} of {drafted} right drafts"
                log.warning("speculative step failed its start-up check (%s); speculation off", self.spec_error)
        except Exception as exc:
            self.speculation = False
            self.spec_error = f"start-up check: {first_line(exc)[:200]}"
            log.warning("speculative step failed its start-up check (%s); speculation off", exc)
        for slot in range(self.slots):  # the check's tokens are no prefix worth reusing
            self._slot_ids[slot] = []
        for key, value in self.stats.items():  # counters start with the first real request
            self.stats[key] = type(value)()


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
