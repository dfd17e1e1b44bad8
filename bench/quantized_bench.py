"""Quantized weights on a GPU, through the real server: for none, 8bit and 4bit (bitsandbytes),
the server loads a random model as wide as StarChat-beta with fewer layers (``--layers``: all
40 take longer to save and quantize than a device session has), answers two chats, and this
reports the time to ready, the GPU memory the server took, and the second chat's rate. The
weights in GPU memory for StarChat's 40 layers follow from the per-layer figure. Prints a table
and writes JSON (``--out``, else bench/results/quantized-<gpu>-<date>.json).

    python bench/quantized_bench.py --out $OUT/quantized.json   # a GPU (bitsandbytes installed)
    python bench/quantized_bench.py --tiny                      # CPU: the plan, unquantized only (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine_bench import DRY_RUN_SHAPE, STARCHAT, random_gptbigcode, word_tokenizer  # noqa: E402
from server_latency import Server  # noqa: E402

QUESTION = "Write a long Python module."


def gpu_used_mb() -> float | None:
    """Memory in use on GPU 0, all processes (a container's nvidia-smi may not list them)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.split()[0])
    except Exception:
        return None


def build(folder: Path, layers: int, tiny: bool) -> dict:
    """A random GPTBigCode of StarChat's width (tiny: 256 wide) saved with a word-per-id
    tokenizer that has StarChat's special tokens."""
    import torch

    shape = {**STARCHAT, "n_layer": layers, **(DRY_RUN_SHAPE if tiny else {})}
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    model = random_gptbigcode(shape, dev)
    params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.0."))
    t = time.monotonic()
    model.save_pretrained(folder, max_shard_size="4GB")
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    saved = time.monotonic() - t
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"layers": shape["n_layer"], "n_embd": shape["n_embd"], "params_m": round(params / 1e6, 1),
            "layer_params_m": round(per_layer / 1e6, 1), "save_s": round(saved, 1)}


async def serve(folder: Path, quantization: str, device: str, tokens: int) -> dict:
    """One server process with ``--quantization``: ready, memory, two chats (the first warms up)."""
    before = gpu_used_mb()
    server = await Server.start(str(folder), device, "generate", "--quantization", quantization)
    try:
        await server.initialize({"temperature": 0})
        message = await server.ready(600)
        figures: dict = {"ready_s": round(server.since_start(), 2), "ready_message": message}
        loaded = gpu_used_mb()
        await server.chat(2, QUESTION, tokens)
        got = await server.chat(3, QUESTION, tokens)
        after = gpu_used_mb()
        if before is not None and loaded is not None and after is not None:
            figures.update(gpu_loaded_mb=round(loaded - before), gpu_after_chats_mb=round(after - before))
        figures.update(chat_tokens=got["tokens"], chat_tok_s=round(got["tokens"] / got["total_s"], 2),
                       first_piece_ms=round(got["first_s"] * 1e3, 1))
        return figures
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="StarChat-wide layers of the random model (StarChat has 40)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens a chat asks for")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model on the CPU, unquantized only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    kinds = ["none", "8bit", "4bit"] if cuda else ["none"]
    device = "cuda" if cuda else "cpu"
    result: dict = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__}
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:
        result["bitsandbytes"] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    folder = Path(tempfile.mkdtemp(prefix="starchat-quantized-"))
    try:
        result["model"] = build(folder, args.layers, args.tiny)
        for kind in kinds:
            try:
                result[kind] = asyncio.run(serve(folder, kind, device, args.tokens))
            except Exception as exc:
                result[kind] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            print(f"[quantized] {kind}: {result[kind]}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # StarChat's 40 layers: the weights' memory grows by the per-layer difference
    layers = result["model"]["layers"]
    base = result.get("none", {}).get("gpu_loaded_mb")
    for kind in kinds:
        mb = result[kind].get("gpu_loaded_mb")
        if mb is not None and base is not None and kind != "none":
            result[kind]["share_of_bf16"] = round(mb / base, 3)
    print("\n| weights | ready s | GPU MB loaded | after chats | chat tok/s | first piece ms |\n|---|---|---|---|---|---|")
    for kind in kinds:
        r = result[kind]
        print(f"| {kind} | {r.get('ready_s', '—')} | {r.get('gpu_loaded_mb', '—')} | {r.get('gpu_after_chats_mb', '—')} | "
              f"{r.get('chat_tok_s', '—')} | {r.get('first_piece_ms', '—')} |" + (f" error: {r['error'][:200]}" if "error" in r else ""))
    print(f"\n{layers} layers of StarChat's width ({result['model']['params_m']}M parameters, {result['model']['layer_params_m']}M a layer), {result['gpu']}")
    out = args.out or REPO / "bench" / "results" / f"quantized-{re.sub(r'[^a-z0-9]+', '-', result['gpu'].lower()).strip('-')}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in result[k] for k in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
