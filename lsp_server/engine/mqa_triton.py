"""Multi-query decode attention in Triton (split-KV "flash decoding"), used by the fast engine on
CUDA when Triton is importable and the start-up self-check agrees with the torch path.

One query token per batch row, 48 query heads, ONE K/V head: the 48 heads are 48 query rows
against the same keys, so K and V are read once per row (no repeat to 48 heads). The keys of a
row are split into chunks; one program per (row, chunk) does an online softmax over its chunk
and writes a partial result with its log-sum-exp; a second kernel merges the partials of the
chunks that hold keys (the row's length is read from device memory, so a CUDA graph captured
for a cache-length bucket serves every length below it).

Cache layout: ``kv[slot, position, 0:D]`` is K and ``kv[slot, position, D:2D]`` is V.

Also here: the decode step's bias + LayerNorm kernel, a one-row GEMV, and the L2 prefetch kernel.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU machines and CI run the torch path
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _split_kernel(
        q_ptr, kv_ptr, len_ptr, o_ptr, lse_ptr, slot_ptr,
        stride_qb, stride_qh,
        stride_kb, stride_kt,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        scale, H,
        new_ptr, wpos_ptr, stride_nb,
        CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        SLOT_MAP: tl.constexpr, NEW_KV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        b = tl.program_id(0)
        s = tl.program_id(1)
        length = tl.load(len_ptr + b).to(tl.int32)
        start = s * CHUNK
        # with NEW_KV the row's last key is this step's token: it comes from new_ptr (the QKV
        # output), not from the cache, and the program whose chunk holds it writes it there
        cached = length - 1 if NEW_KV else length
        end = tl.minimum(start + CHUNK, cached)  # masks only: loops have static trip counts
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        hmask = offs_h < H
        q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        if SLOT_MAP:  # row b reads the cache of slot slots[b] (several query rows, one slot)
            base = kv_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_kb
        else:
            base = kv_ptr + b * stride_kb
        for i in range(0, CHUNK // BLOCK_N):  # static trip count; blocks past the row's end are masked
            offs_n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            k = tl.load(base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=nmask[None, :], other=0.0)
            sc = tl.dot(q, k, input_precision=DOT_PREC) * scale
            sc = tl.where(nmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: no NaN from -inf - -inf
            alpha = tl.exp(m - m_use)
            p = tl.exp(sc - m_use[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(base + offs_n[:, None] * stride_kt + D + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m = m_new
        if NEW_KV:
            if s == (length - 1) // CHUNK:
                k1 = tl.load(new_ptr + b * stride_nb + offs_d)
                v1 = tl.load(new_ptr + b * stride_nb + D + offs_d)
                sc1 = tl.sum(q.to(tl.float32) * k1.to(tl.float32)[None, :], 1) * scale
                m_new = tl.maximum(m, sc1)
                alpha = tl.exp(m - m_new)
                p1 = tl.exp(sc1 - m_new)
                l = l * alpha + p1
                acc = acc * alpha[:, None] + p1.to(v1.dtype).to(tl.float32)[:, None] * v1.to(tl.float32)[None, :]
                m = m_new
                wpos = tl.load(wpos_ptr + b).to(tl.int64)  # the scratch position for idle rows
                tl.store(base + wpos * stride_kt + offs_d, k1)
                tl.store(base + wpos * stride_kt + D + offs_d, v1)
        has = l > 0
        l_safe = tl.where(has, l, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, m + tl.log(l_safe), float("-inf"))
        tl.store(o_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :], out, mask=hmask[:, None])
        tl.store(lse_ptr + b * stride_lb + s * stride_ls + offs_h, lse, mask=hmask)

    @triton.jit
    def _merge_kernel(
        o_ptr, lse_ptr, len_ptr, out_ptr,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls,
        stride_outb, stride_outh,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, D: tl.constexpr,
    ):
        """All the row's partials in one tile: every load is issued at once (the first version
        looped over the splits, one dependent load latency per split: ~0.4 us x 32 splits per
        layer at 8K)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.load(len_ptr + b).to(tl.int32)
        n = (length + CHUNK - 1) // CHUNK  # split 0 always holds keys (length >= 1)
        offs_s = tl.arange(0, SPLITS_P2)
        offs_d = tl.arange(0, D)
        ok = (offs_s < n) & (offs_s < SPLITS)
        lse = tl.load(lse_ptr + b * stride_lb + offs_s * stride_ls + h, mask=ok, other=float("-inf"))
        o = tl.load(o_ptr + b * stride_ob + offs_s[:, None] * stride_os + h * stride_oh + offs_d[None, :],
                    mask=ok[:, None], other=0.0)
        m = tl.max(lse, 0)
        w = tl.where(ok, tl.exp(lse - m), 0.0)
        acc = tl.sum(o * w[:, None], 0)
        out = acc / tl.sum(w, 0)
        tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 inputs in full precision ("ieee"; Triton's default
    on a GPU is TF32, ~1e-3 off: a float32 model must match its float32 reference); half types
    get the default ("tf32", ignored for them: the same compile as without)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_for(cache_len: int) -> int:
    """Keys per program (a multiple of 64): up to 64 chunks per row (one or two 64-key blocks per
    program: at batch 1 the kernel is latency-bound, so more and shorter programs finish sooner;
    the one-tile merge makes many chunks cheap). The first version used ~32 chunks of >= 128."""
    return max(64, (cache_len // 64 + 63) // 64 * 64)


class TritonMQADecode:
    """Preallocated partial buffers for one (batch, cache length) bucket; ``__call__`` is
    graph-capturable (two kernel launches, no allocation)."""

    def __init__(self, batch: int, cache_len: int, heads: int, head_dim: int, device, dtype):
        self.chunk = chunk_for(cache_len)
        self.splits = (cache_len + self.chunk - 1) // self.chunk
        self.splits_p2 = max(2, triton.next_power_of_2(self.splits))
        self.heads, self.head_dim = heads, head_dim
        self.block_h = max(16, triton.next_power_of_2(heads))
        self.o = torch.empty((batch, self.splits, heads, head_dim), device=device, dtype=torch.float32)
        self.lse = torch.empty((batch, self.splits, heads), device=device, dtype=torch.float32)
        self.out = torch.empty((batch, heads, head_dim), device=device, dtype=dtype)

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float,
                 slots: torch.Tensor | None = None, new: torch.Tensor | None = None,
                 wpos: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, H, D); kv: (B, positions, 2D) (a slice of one layer's cache, rows = slots);
        lengths: (B,) int64 keys per row (>= 1). Returns (B, H, D) in q's dtype.
        With ``slots`` (B,) int64, row b reads ``kv[slots[b]]`` instead (kv: every slot): the
        speculative step's query rows all attend to one slot's cache.
        With ``new`` (B, 2D) and ``wpos`` (B,): row b's last key and value are ``new[b]`` (this
        step's token; the cache holds the ``lengths[b] - 1`` before it), and the kernel writes
        them to ``kv[b, wpos[b]]`` (one launch fewer than writing the cache first; wpos may be
        past the slice's positions: the cache's scratch row)."""
        B = q.shape[0]
        D = self.head_dim
        fused_kv = new is not None
        if fused_kv and (slots is not None or wpos is None):
            raise ValueError("new K/V needs wpos and no slot map")
        _split_kernel[(B, self.splits)](
            q, kv, lengths, self.o, self.lse, slots if slots is not None else lengths,
            q.stride(0), q.stride(1),
            kv.stride(0), kv.stride(1),
            self.o.stride(0), self.o.stride(1), self.o.stride(2),
            self.lse.stride(0), self.lse.stride(1),
            scale, self.heads,
            new if fused_kv else q, wpos if fused_kv else lengths, new.stride(0) if fused_kv else 0,
            CHUNK=self.chunk, BLOCK_H=self.block_h, BLOCK_N=64, D=D, SLOT_MAP=slots is not None, NEW_KV=fused_kv,
            DOT_PREC=dot_precision(q.dtype),
            num_warps=4, num_stages=2,
        )
        out = self.out[:B]
        _merge_kernel[(B, self.heads)](
            self.o, self.lse, lengths, out,
            self.o.stride(0), self.o.stride(1), self.o.stride(2),
            self.lse.stride(0), self.lse.stride(1),
            out.stride(0), out.stride(1),
            CHUNK=self.chunk, SPLITS=self.splits, SPLITS_P2=self.splits_p2, D=D,
            num_warps=8 if self.splits_p2 >= 64 else (4 if self.splits_p2 >= 16 else 2),
        )
        return out


if HAVE_TRITON:

    @triton.jit
    def _bias_add_ln_kernel(
        x_ptr, bias_ptr, w_ptr, b_ptr, h_ptr, stride_x, stride_h, E, eps,
        y_ptr, ybias_ptr, stride_y, N,
        BLOCK: tl.constexpr, FILL: tl.constexpr, BLOCK_Y: tl.constexpr, Y_ITERS: tl.constexpr,
    ):
        """x += bias (in place, rounded to x's dtype like an unfused add); h = LayerNorm(x).
        With FILL, also y[row, :N] = ybias: the next GEMM's bias, pre-written into its output
        so that the GEMM adds it as its C operand (at one row PyTorch would launch a copy)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < E
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        x = x + tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
        xq = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, xq, mask=m)
        x = xq.to(tl.float32)
        mean = tl.sum(x, 0) / E
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, 0) / E
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * stride_h + offs, (xc * rstd * w + b).to(h_ptr.dtype.element_ty), mask=m)
        if FILL:
            for i in range(0, Y_ITERS):
                oy = i * BLOCK_Y + tl.arange(0, BLOCK_Y)
                my = oy < N
                tl.store(y_ptr + row * stride_y + oy, tl.load(ybias_ptr + oy, mask=my, other=0.0), mask=my)


def bias_add_layer_norm(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, eps: float,
                        fill: tuple[torch.Tensor, torch.Tensor] | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """For the decode step's rows x (B, E), contiguous: ``x += bias`` in place and return
    ``layer_norm(x)``: one kernel instead of two (residual bias add, then the next norm).
    ``fill=(y, ybias)``: also ``y[:] = ybias`` (y (B, N) contiguous) in the same kernel.
    ``out``: rows (B, E) with unit stride along E to write the norm to (else a new tensor)."""
    B, E = x.shape
    h = torch.empty_like(x) if out is None else out
    block = triton.next_power_of_2(E)
    if fill is None:
        y, ybias, stride_y, n, flag = h, bias, 0, 0, False
    else:
        y, ybias = fill
        stride_y, n, flag = y.stride(0), y.shape[1], True
    _bias_add_ln_kernel[(B,)](x, bias, weight, beta, h, x.stride(0), h.stride(0), E, eps,
                              y, ybias, stride_y, n,
                              BLOCK=block, FILL=flag, BLOCK_Y=min(4096, block), Y_ITERS=triton.cdiv(n, min(4096, block)),
                              num_warps=8 if block >= 4096 else 4)
    return h


if HAVE_TRITON:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, y_ptr, N, stride_w,
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, GELU: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
    ):
        """One row: y[n] (+)= sum_k x[k] W[n, k] (+ bias[n]) (GELU-tanh). W row-major [N, K]
        (nn.Linear's layout), K = K_ITERS * BLOCK_K. Rounds like the cuBLAS path it replaces:
        accumulate in fp32, add bias, round to the output dtype; GELU on the rounded value;
        with ACC the old y is added in fp32 before the one rounding (addmm_ with beta = 1)."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        for i in range(0, K_ITERS):
            k = i * BLOCK_K + offs_k
            xv = tl.load(x_ptr + k).to(tl.float32)
            wv = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
            acc += wv * xv[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if ACC:
            y += tl.load(y_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if GELU:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # tanh
            y = 0.5 * y * (1.0 + t)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


class TritonGEMV:
    """y = x @ W.T for ONE row (the batch-1 decode step), graph-capturable, for one weight;
    the engine uses it per weight only where start-up timing found it faster than cuBLAS."""

    def __init__(self, weight: torch.Tensor, block_n: int = 8, block_k: int = 512, num_warps: int = 4, num_stages: int = 3):
        N, K = weight.shape
        while block_k > 64 and K % block_k:
            block_k //= 2
        if K % block_k or weight.stride(1) != 1:
            raise ValueError(f"unsupported weight shape/stride {tuple(weight.shape)} {weight.stride()}")
        self.weight, self.N, self.K = weight, N, K
        self.block_n, self.block_k, self.num_warps, self.num_stages = block_n, block_k, num_warps, num_stages

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 accumulate: bool = False, gelu: bool = False) -> torch.Tensor:
        """x (1, K) contiguous; out (1, N) (required with accumulate: y += x W^T)."""
        if out is None:
            out = torch.empty((1, self.N), device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(self.N, self.block_n),)
        _gemv_kernel[grid](
            x, self.weight, bias if bias is not None else out, out, self.N, self.weight.stride(0),
            HAS_BIAS=bias is not None, ACC=accumulate, GELU=gelu,
            BLOCK_N=self.block_n, BLOCK_K=self.block_k, K_ITERS=self.K // self.block_k,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )
        return out


if HAVE_TRITON:

    @triton.jit
    def _prefetch_kernel(w_ptr, addr, n, per_prog, iters, sink_ptr,
                         BLOCK: tl.constexpr, MODE: tl.constexpr, ESIZE: tl.constexpr):
        """Bring elements [0, n) of ``w`` into L2 (program p: its ``per_prog`` of them), so that
        the GEMM that reads them next finds them there. MODE 0: loads with the evict-last
        policy (a per-program sum goes to ``sink`` so that nothing is optimised away); MODE 1:
        one ``prefetch.global.L2::evict_last`` per 128-byte line (``addr``: w's address; no
        registers wait for the data). Changes no value the model computes."""
        pid = tl.program_id(0)
        start = pid * per_prog
        end = tl.minimum(start + per_prog, n)
        if MODE == 0:
            acc = tl.zeros([BLOCK], tl.float32)
            i = 0
            while i < iters:  # a runtime bound: one compile for every size
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                acc += tl.load(w_ptr + offs, mask=offs < end, other=0.0, eviction_policy="evict_last").to(tl.float32)
                i += 1
            tl.store(sink_ptr + pid, tl.sum(acc, 0))
        else:
            i = 0
            while i < iters:  # BLOCK lines of 128 bytes per iteration
                line = start + (i * BLOCK + tl.arange(0, BLOCK)) * (128 // ESIZE)
                tl.inline_asm_elementwise(
                    "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                    [tl.where(line < end, addr + line.to(tl.int64) * ESIZE, addr)], dtype=tl.int32, is_pure=False, pack=1,
                )
                i += 1


class L2Prefetch:
    """Graph-capturable: ``self(weight, nbytes)`` brings a weight's first ``nbytes`` into L2.
    The decode step runs it on a side stream while the small kernels between two GEMMs (norm,
    attention, GELU) leave the memory bus idle (see ``fast_math._rows_forward``)."""

    def __init__(self, device, mode: str = "load", programs: int | None = None):
        if mode not in ("load", "prefetch"):
            raise ValueError(mode)
        self.mode = 0 if mode == "load" else 1
        if programs is None:  # loads wait for their data: more programs, each 1-2 wide loads
            sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 4
            programs = (4 if self.mode == 0 else 2) * sms
        self.programs = programs
        self.sink = torch.zeros(programs, device=device, dtype=torch.float32)

    def __call__(self, weight: torch.Tensor, nbytes: int) -> None:
        if not weight.is_contiguous():
            raise ValueError("L2Prefetch expects a contiguous weight")
        esize = weight.element_size()
        n = min(weight.numel(), nbytes // esize)
        per = triton.cdiv(n, self.programs)
        block = 8192 if self.mode == 0 else 128  # elements per load, or 128-byte lines per iteration
        step = block if self.mode == 0 else block * (128 // esize)  # elements per iteration
        per = triton.cdiv(per, step) * step
        _prefetch_kernel[(self.programs,)](weight, weight.data_ptr(), n, per, per // step, self.sink,
                                           BLOCK=block, MODE=self.mode, ESIZE=esize, num_warps=4)
