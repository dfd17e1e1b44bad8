"""Compile every Triton kernel the fast engine can launch, at StarChat-beta's shapes, for real
NVIDIA architectures, on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which checks what they compute but not
that they compile: the interpreter never lowers to PTX, so a type the backend rejects, an
inline-asm line ``ptxas`` refuses, a layout that needs more shared memory than an SM has, or
registers spilling to local memory would first show on a user's GPU (where the engine then
falls back to the slower torch path) or in the few minutes of a GPU session. Here each launch
the engine makes goes through Triton's own argument binding and specialization (the same code
as a real launch, with a target given instead of asked of a driver), then ``triton.compile``
down to a cubin with the ``ptxas`` that ships in the Triton wheel; nothing runs.

    python -m lsp_server.testing.triton_targets              # a table: registers, spills, shared memory
    python -m lsp_server.testing.triton_targets --json F     # also the rows as one JSON list in F

Run it without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives interpreted
functions, which cannot be compiled); ``tests/unit/test_triton_targets.py`` runs it in a child
process for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# the GPUs a 16B model in bf16 fits on (>= 40 GB) and what they are: A100 (8.0), A6000 /
# A40 (8.6), L40S / L40 (8.9), H100 / H200 (9.0)
ARCHS = (80, 86, 89, 90)

# StarChat-beta (GPTBigCode): bench/engine_bench.py builds the same shape
STARCHAT = dict(n_embd=6144, n_head=48, head_dim=128, n_inner=24576, vocab=49156, n_positions=8192,
                max_batch=8, spec_rows=8, sms=132)

# ptxas' per-kernel limits that matter here (shared memory per block, opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@contextmanager
def compile_only(capability: int):
    """Inside: every ``kernel[grid](...)`` compiles for ``cuda:<capability>`` and appends a
    record (kernel name, constexprs, options, the compiled kernel) to the yielded list instead
    of launching. Uses Triton's launch internals (``_pack_args``, the binder), the same in
    3.5 to 3.8 (all four compile every kernel here); a Triton that changes them fails this
    loudly rather than checking less."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binders: dict[int, object] = {}
    records: list[dict] = []

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        names = [p.name for p in self.params]
        records.append({
            "kernel": self.__name__,
            "constexprs": {names[path[0]]: value for path, value in constexprs.items()},
            "num_warps": options.num_warps, "num_stages": options.num_stages,
            "compiled": kernel,
        })
        return kernel

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = saved


def engine_launches(shape: dict = STARCHAT):
    """(label, thunk) for every kernel variant the fast engine launches on a GPU of this shape:
    the decode attention per cache-length bucket (plain, writing the step's K/V, and the
    speculative step's slot map), the bias + LayerNorm kernel (with and without the bias
    pre-fill), each GEMV start-up candidate per weight, both L2-prefetch modes, each prefill
    attention candidate, and the two sampling kernels. CPU tensors stand in for the GPU ones (only shapes, dtypes and
    alignment reach the compiler); big weights are allocated, never touched."""
    import torch

    from ..engine.fast import TOP_K_CAP, batch_buckets, length_buckets
    from ..engine.fast_setup import GEMV_CONFIGS
    from ..engine.mqa_triton import (
        L2Prefetch,
        TritonGEMV,
        TritonMQADecode,
        bias_add_layer_norm,
    )
    from ..engine.prefill_triton import CONFIGS as PREFILL_CONFIGS
    from ..engine.prefill_triton import prefill_attention
    from ..engine.sample_triton import sample

    E, H, D, F, V = shape["n_embd"], shape["n_head"], shape["head_dim"], shape["n_inner"], shape["vocab"]
    P, S, R = shape["n_positions"], shape["max_batch"], shape["spec_rows"]
    bf16 = torch.bfloat16
    kv = torch.empty((S, P + 1, 2 * D), dtype=bf16)  # one layer's cache (+ the scratch row)
    qkv_out = E + 2 * D
    launches = []

    for n in length_buckets(P):
        for b in sorted({max(batch_buckets(S)), R}):
            attn = TritonMQADecode(b, n, H, D, "cpu", bf16)
            q = torch.empty((b, H, D), dtype=bf16)
            lengths = torch.ones(b, dtype=torch.long)
            new = torch.empty((b, qkv_out), dtype=bf16)[:, E:]  # a view of the QKV output
            launches.append((f"attention L{n} B{b}", lambda a=attn, q=q, le=lengths: a(q, kv[: q.shape[0]], le, 0.088)))
            launches.append((f"attention+kv L{n} B{b}", lambda a=attn, q=q, le=lengths, nw=new: a(q, kv[: q.shape[0]], le, 0.088, new=nw, wpos=le)))
            launches.append((f"attention slots L{n} B{b}", lambda a=attn, q=q, le=lengths: a(q, kv, le, 0.088, slots=le)))

    x = torch.empty((S, E), dtype=bf16)
    vec = torch.empty(E, dtype=bf16)
    y, ybias = torch.empty((S, qkv_out), dtype=bf16), torch.empty(qkv_out, dtype=bf16)
    launches.append(("bias+layernorm", lambda: bias_add_layer_norm(x, vec, vec, vec, 1e-5)))
    launches.append(("bias+layernorm+fill", lambda: bias_add_layer_norm(x, vec, vec, vec, 1e-5, fill=(y, ybias))))

    weights = {  # name: (weight, bias, accumulate, gelu): fast_setup._choose_gemv's cases
        "qkv": ((qkv_out, E), True, False, False), "attn_proj": ((E, E), False, True, False),
        "fc": ((F, E), True, False, True), "mlp_proj": ((E, F), False, True, False), "lm_head": ((V, E), False, False, False),
    }
    for name, (wshape, has_bias, acc, gelu) in weights.items():
        w = torch.empty(wshape, dtype=bf16)
        xin = torch.empty((1, wshape[1]), dtype=bf16)
        bias = torch.empty(wshape[0], dtype=bf16) if has_bias else None
        for cfg in GEMV_CONFIGS:
            g = TritonGEMV(w, *cfg)
            launches.append((f"gemv {name} {cfg}", lambda g=g, xin=xin, bias=bias, acc=acc, gelu=gelu:
                             g(xin, bias, out=torch.empty((1, g.N), dtype=bf16), accumulate=acc, gelu=gelu)))

    w = torch.empty((F, E), dtype=bf16)
    for mode in ("load", "prefetch"):
        pf = L2Prefetch("cpu", mode, programs=(4 if mode == "load" else 2) * shape["sms"])
        launches.append((f"l2 prefetch {mode}", lambda pf=pf: pf(w, 16 << 20)))

    T = 2048  # a prompt: queries, keys and values read where the QKV projection wrote them
    qkv = torch.empty((T, qkv_out), dtype=bf16)
    q = qkv[:, :E].view(T, H, D).transpose(0, 1)
    for config in PREFILL_CONFIGS:
        launches.append((f"prefill attention {config}",
                         lambda c=config: prefill_attention(q, qkv[:, E : E + D], qkv[:, E + D :], 0.088, c)))

    slots = torch.zeros(R, dtype=torch.long)
    params = {"penalty": torch.ones(S), "temp": torch.ones(S), "topk": torch.full((S,), TOP_K_CAP),
              "topp": torch.ones(S), "seed": torch.zeros(S, dtype=torch.long)}
    logits = torch.empty((R, V), dtype=torch.float32)
    seen = torch.zeros((S + 1, V), dtype=torch.bool)

    def sampling():  # the penalty kernel, then (after torch.topk on these CPU tensors) the draw kernel
        logits.normal_()
        sample(logits, slots, slots, seen, slots, params, min(TOP_K_CAP, V))

    launches.append(("sampling", sampling))
    return launches


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) and static shared memory of a cubin, as
    ``cuobjdump -res-usage`` (shipped with Triton) prints them."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for field in line.split():
                key, _, value = field.partition(":")
                if key in ("REG", "STACK", "SHARED", "LOCAL") and value.isdigit():
                    usage["shared_static" if key == "SHARED" else key.lower()] = int(value)
    return usage


def compile_all(archs=ARCHS, shape: dict = STARCHAT) -> list[dict]:
    """One row per kernel compiled, per architecture and launch (the attention launch compiles
    two kernels), with its resources; a launch that failed to compile gets a row with the error."""
    rows = []
    for cap in archs:
        for label, thunk in engine_launches(shape):
            row = {"arch": f"sm_{cap}", "launch": label}
            try:
                with compile_only(cap) as records:
                    thunk()
            except Exception as exc:  # a kernel that does not compile for this target
                lines = str(exc).strip().splitlines() or [""]
                said = [ln for ln in lines if "error" in ln.lower()] or lines[-1:]  # ptxas: its own error lines
                row["error"] = f"{type(exc).__name__}: {' | '.join(said)[:300]}"
            for rec in records:
                kernel = rec.pop("compiled")
                rows.append({**row, **rec, "shared_dynamic": kernel.metadata.shared,
                             "shared_limit": SHARED_LIMIT[cap], **resource_usage(kernel.asm["cubin"]),
                             # the evict-last cache hints that reached the PTX (the L2 prefetch's point)
                             "l2_evict_last": kernel.asm["ptx"].count("L2::evict_last")})
            if "error" in row or not records:
                rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default: 80 86 89 90)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows to FILE as one JSON list")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = compile_all(tuple(args.arch or ARCHS))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print(f"{'arch':6} {'launch':34} {'kernel':20} {'warps':>5} {'regs':>5} {'spill':>5} {'shared':>7}  error")
    for r in rows:
        print(f"{r['arch']:6} {r['launch'][:34]:34} {r.get('kernel', '-'):20} {r.get('num_warps', ''):>5} "
              f"{r.get('reg', ''):>5} {r.get('local', ''):>5} {r.get('shared_dynamic', ''):>7}  {r.get('error', '')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
