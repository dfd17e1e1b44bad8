"""The fast engine's sampling in three kernels instead of ~45 small torch ops (CUDA + Triton,
used only after a start-up check against the torch path in ``fast_math._sample``).

The torch path launches a kernel per elementwise op: the parameter gathers, the penalty, the
128-candidate temperature / top-k / top-p arithmetic and the 3-round integer hash of the draw.
Each is microseconds of launch and latency for almost no data (149 µs per step at batch 1 on
an H200, 2 % of the step). Here:

1. ``_penalize_kernel`` (one program per row): repetition penalty over the row's vocabulary
   (HF semantics: divide positive logits, multiply negative ones, for seen tokens) and the
   greedy token (the first maximum, as ``torch.argmax``);
2. ``torch.topk`` of the penalized logits (the candidates, sorted);
3. ``_draw_kernel`` (one program per row): temperature, top-k by rank, softmax, top-p, the
   exponential-race draw with the same counter-based hash of (seed, position, rank) as the
   torch path, and greedy at temperature 0.

Greedy tokens are identical to the torch path (the same IEEE division, the same tie rule);
sampled ones may differ where two candidates' race scores agree to a few ulps (``exp``/``log``
are not bit-identical), which the start-up check measures.
"""

from __future__ import annotations

import torch

try:  # optional: CPU machines and CI use the torch path
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TRITON = False

_M32 = 0xFFFFFFFF

if HAVE_TRITON:

    @triton.jit
    def _penalize_kernel(
        logits_ptr, out_ptr, greedy_ptr, seen_ptr, seen_row_ptr, slot_ptr, pen_ptr,
        V, stride_l, stride_o, stride_s,
        BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        r = tl.program_id(0)
        slot = tl.load(slot_ptr + r)
        pen = tl.load(pen_ptr + slot)
        seen_row = tl.load(seen_row_ptr + r).to(tl.int64)
        best_v = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], 0, tl.int64)
        for i in range(0, ITERS):
            offs = i * BLOCK + tl.arange(0, BLOCK)
            m = offs < V
            x = tl.load(logits_ptr + r * stride_l + offs, mask=m, other=float("-inf"))
            s = tl.load(seen_ptr + seen_row * stride_s + offs, mask=m, other=0) != 0
            p = tl.where(x < 0, x * pen, tl.math.div_rn(x, pen))
            x = tl.where(s & m, p, x)
            tl.store(out_ptr + r * stride_o + offs, x, mask=m)
            bv, bi = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            better = bv > best_v  # strictly: an earlier block keeps a tie (first maximum)
            best_i = tl.where(better, bi.to(tl.int64) + i * BLOCK, best_i)
            best_v = tl.where(better, bv, best_v)
        tl.store(greedy_ptr + r, best_i)

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _draw_kernel(
        vals_ptr, idx_ptr, greedy_ptr, slot_ptr, pos_ptr,
        temp_ptr, topk_ptr, topp_ptr, seed_ptr, out_ptr, stride_v, stride_i,
        K: tl.constexpr,
    ):
        r = tl.program_id(0)
        slot = tl.load(slot_ptr + r)
        temp = tl.load(temp_ptr + slot)
        ranks = tl.arange(0, K)
        v = tl.load(vals_ptr + r * stride_v + ranks)
        v = tl.math.div_rn(v, tl.maximum(temp, 1e-4))
        v = tl.where(ranks >= tl.load(topk_ptr + slot), float("-inf"), v)
        e = tl.exp(v - tl.max(v, 0))
        p = e / tl.sum(e, 0)
        mass_before = tl.cumsum(p, 0) - p
        p = tl.where(mass_before > tl.load(topp_ptr + slot), 0.0, p)
        # the torch path's hash, in int64 (every product stays under 2**63)
        h = _mix32((tl.load(seed_ptr + slot).to(tl.int64) + 0x632BE5AB) & 0xFFFFFFFF)
        h = _mix32((h ^ (tl.load(pos_ptr + r).to(tl.int64) & 0xFFFFFFFF)) & 0xFFFFFFFF)
        h = _mix32((h ^ ((ranks.to(tl.int64) * 0x61C88647) & 0xFFFFFFFF)) & 0xFFFFFFFF)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # in (0, 1): fast_math._uniform
        choice = tl.argmax(p / -tl.log(u), 0)
        sampled = tl.load(idx_ptr + r * stride_i + choice)
        greedy = tl.load(greedy_ptr + r)
        tl.store(out_ptr + r, tl.where(temp > 0, sampled, greedy))


def sample(logits: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor,
           seen_rows: torch.Tensor, params: dict[str, torch.Tensor], top_k_cap: int) -> torch.Tensor:
    """The tokens of ``logits`` (R, V) float32: row r uses the sampling parameters of slot
    ``slots[r]`` (``params``: per-slot ``penalty``, ``temp``, ``topk``, ``topp``, ``seed``),
    position ``pos[r]`` and the seen-token mask ``seen[seen_rows[r]]``. Graph-capturable."""
    R, V = logits.shape
    block = min(4096, triton.next_power_of_2(V))
    pen = torch.empty_like(logits)
    greedy = torch.empty(R, device=logits.device, dtype=torch.long)
    _penalize_kernel[(R,)](
        logits, pen, greedy, seen, seen_rows, slots, params["penalty"],
        V, logits.stride(0), pen.stride(0), seen.stride(0),
        BLOCK=block, ITERS=triton.cdiv(V, block), num_warps=8,
    )
    vals, idx = torch.topk(pen, top_k_cap, dim=-1)
    K = triton.next_power_of_2(top_k_cap)
    if K != top_k_cap:  # pad to a power of two: padded ranks are past every top-k
        vals = torch.nn.functional.pad(vals, (0, K - top_k_cap), value=float("-inf"))
        idx = torch.nn.functional.pad(idx, (0, K - top_k_cap))
    out = torch.empty(R, device=logits.device, dtype=torch.long)
    _draw_kernel[(R,)](
        vals, idx, greedy, slots, pos,
        params["temp"], params["topk"], params["topp"], params["seed"], out, vals.stride(0), idx.stride(0),
        K=K, num_warps=4,
    )
    return out
