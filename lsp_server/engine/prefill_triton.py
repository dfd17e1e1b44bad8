"""Multi-query causal attention for a prompt (the prefill) in Triton: a start-up candidate beside
PyTorch's SDPA backends (``fast_setup._choose_prefill_attention`` keeps it only where it agrees
with a float32 reference and is faster).

StarChat has one K/V head for its 48 query heads. SDPA serves that either by expanding the head
(a stride-0 view: every head's tile loads the same keys again) or through its GQA path. Here one
program takes BLOCK_M query positions of G heads at once: BLOCK_M x G rows against each K/V tile,
loaded once for all of them. The rows read the queries where the QKV projection wrote them and
the output goes out as (T, H, D), the layout the next projection reads: no transposing copy in
or out.

Causal with the diagonal at the bottom right, so that one kernel serves a whole prompt and a
prompt's suffix after a reused prefix: query t (of T) is at position S - T + t and sees keys
0..S - T + t of the S in the cache. Key blocks wholly below a program's first position run
without a mask; only the last few are masked. Programs start with the longest rows.
"""

from __future__ import annotations

import torch

from .mqa_triton import dot_precision

try:  # optional: CPU machines and CI without triton use SDPA
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TRITON = False

LOG2E = 1.4426950408889634

# start-up candidates: name -> (BLOCK_M query positions, G heads, BLOCK_N keys, num_warps, num_stages)
# (128-key blocks spill registers on sm_80 at 8 warps: tests/unit/test_triton_targets.py)
# 64-row programs (4 warps) are twice as many: better balanced over the SMs for short prompts
CONFIGS = {
    "triton_m128_g1": (128, 1, 64, 8, 3),
    "triton_m64_g2": (64, 2, 64, 8, 3),
    "triton_m32_g2": (32, 2, 64, 4, 3),
}


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["T", "S"])  # one compile for every prompt length
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, T, S,
        stride_qh, stride_qt, stride_kt, stride_vt, stride_ot, stride_oh, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first
        ROWS: tl.constexpr = BLOCK_M * G
        r = tl.arange(0, ROWS)
        t = pid_m * BLOCK_M + r // G  # row r: query position t, head h
        h = tl.program_id(1) * G + r % G
        tmask = t < T
        d = tl.arange(0, D)
        q = tl.load(q_ptr + h[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :], mask=tmask[:, None], other=0.0)
        pos = S - T + t  # each row's position: it sees keys 0..pos
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        first = S - T + pid_m * BLOCK_M  # every row of the program sees the keys below this
        unmasked = (first // BLOCK_N) * BLOCK_N
        end = tl.minimum(first + BLOCK_M, S)
        n_off = tl.arange(0, BLOCK_N)
        for n0 in range(0, unmasked, BLOCK_N):
            n = n0 + n_off
            k = tl.load(k_ptr + n[None, :] * stride_kt + d[:, None])
            s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + n[:, None] * stride_vt + d[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        for n0 in range(unmasked, end, BLOCK_N):  # the diagonal: keys past a row's position masked
            n = n0 + n_off
            nmask = n < S
            k = tl.load(k_ptr + n[None, :] * stride_kt + d[:, None], mask=nmask[None, :], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale
            s = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is in the first block any row reads
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + n[:, None] * stride_vt + d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=tmask[:, None])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: str) -> torch.Tensor:
    """q: (H, T, D) (any strides with a unit last one: a view of the QKV output); k, v: (S, D)
    with S >= T (the keys of positions 0..S-1; the queries are the last T positions).
    Returns (T, H, D) contiguous."""
    H, T, D = q.shape
    S = k.shape[0]
    block_m, g, block_n, warps, stages = CONFIGS[config]
    if H % g or q.stride(2) != 1 or k.stride(1) != 1 or v.stride(1) != 1 or S < T:
        raise ValueError(f"unsupported prefill attention shapes {tuple(q.shape)} {tuple(k.shape)}")
    out = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
    _prefill_kernel[(triton.cdiv(T, block_m), H // g)](
        q, k, v, out, T, S,
        q.stride(0), q.stride(1), k.stride(0), v.stride(0), out.stride(0), out.stride(1), scale * LOG2E,
        D=D, BLOCK_M=block_m, G=g, BLOCK_N=block_n, DOT_PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out
