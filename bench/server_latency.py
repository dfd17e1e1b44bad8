"""How fast the server answers over stdio: initialize, model ready, first streamed chunk.

    python bench/server_latency.py [--model DIR] [--engine fast] [--out FILE]

Without --model it builds and uses the test model (CPU). Prints a table and writes JSON.
``time_to_ready()`` (used by bench/engine_bench.py for ``ready_s``) times a server process from
spawn to its ``starchat/status`` "ready" notification.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsp_server.testing import scenarios as sc  # noqa: E402
from lsp_server.testing.wire import frame, read_message  # noqa: E402


async def time_to_ready(model: str, device: str, engine: str = "generate", timeout: float = 300.0, chat_tokens: int = 0) -> dict:
    """Spawn the server, initialize, and wait for ``starchat/status`` "ready" (weights loaded,
    engine prepared: for the fast engine its cache allocated and graphs captured). Seconds from
    spawn; raises with the server's message on "error" and with its log's tail on an exit.
    With ``chat_tokens``, then one ``starchat/chat`` of that many tokens: its first streamed
    piece, its rate through the server, and how many pieces carried it."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lsp_server", "--model", model, "--device", device, "--engine", engine,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )
    assert process.stdin and process.stdout and process.stderr
    log_tail: list[bytes] = []

    async def drain() -> None:  # the server's log (stderr) must not fill its pipe
        async for line in process.stderr:  # type: ignore[union-attr]
            log_tail.append(line)
            del log_tail[:-20]

    draining = asyncio.ensure_future(drain())
    send = lambda payload: process.stdin.write(frame(payload))  # noqa: E731
    send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}})
    send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    figures: dict = {}
    try:
        while True:
            try:
                message = await read_message(process.stdout, timeout=max(1.0, timeout - (time.monotonic() - started)))
            except Exception as exc:
                tail = b"".join(log_tail).decode(errors="replace")[-1500:]
                raise RuntimeError(f"no 'ready' from the server ({type(exc).__name__}); its log ends: {tail}") from None
            if message.get("id") == 1:
                figures["spawn_to_initialize_s"] = round(time.monotonic() - started, 3)
            if message.get("method") == "starchat/status":
                state, text = message["params"]["state"], message["params"]["message"]
                if state == "ready" and "ready_after_spawn_s" not in figures:
                    figures["ready_after_spawn_s"] = round(time.monotonic() - started, 3)
                    figures["ready_message"] = text
                    if not chat_tokens:
                        return figures
                    asked, first, pieces = time.monotonic(), None, 0
                    send({"jsonrpc": "2.0", "id": 2, "method": "starchat/chat", "params": {
                        "messages": [{"role": "user", "content": "Write a long Python module."}],
                        "partialResultToken": "bench", "maxNewTokens": chat_tokens}})
                if state == "error":
                    raise RuntimeError(f"the server failed to load: {text}")
            if message.get("method") == "$/progress" and message["params"].get("token") == "bench":
                pieces += 1
                if first is None:
                    first = time.monotonic() - asked
            if message.get("id") == 2:
                if "result" not in message:
                    raise RuntimeError(f"chat failed: {message.get('error')}")
                total = time.monotonic() - asked
                tokens = message["result"]["completionTokens"]
                figures.update(chat_first_piece_ms=round((first or total) * 1e3, 1), chat_tokens=tokens,
                               chat_tok_s=round(tokens / total, 1), chat_pieces=pieces)
                return figures
    finally:
        try:
            send({"jsonrpc": "2.0", "id": 9, "method": "shutdown"})
            send({"jsonrpc": "2.0", "method": "exit"})
            await asyncio.wait_for(process.wait(), 30)
        except Exception:
            process.kill()
            await process.wait()
        draining.cancel()


async def measure(model: str, device: str, engine: str = "generate") -> dict:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lsp_server", "--model", model, "--device", device, "--engine", engine,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
    )
    assert process.stdin and process.stdout
    send = lambda payload: process.stdin.write(frame(payload))  # noqa: E731
    send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"temperature": 0}}})
    sent = time.monotonic()
    while (await read_message(process.stdout)).get("id") != 1:
        pass
    figures = {"initialize_ms": (time.monotonic() - sent) * 1000, "spawn_to_initialize_ms": (time.monotonic() - started) * 1000}
    send({"jsonrpc": "2.0", "method": "initialized", "params": {}})

    async def chat(request_id: int) -> tuple[float, float, int]:
        asked = time.monotonic()
        first = None
        send({"jsonrpc": "2.0", "id": request_id, "method": "starchat/chat",
              "params": {"messages": [{"role": "user", "content": sc.CHAT_QUESTION}], "partialResultToken": f"p{request_id}"}})
        while True:
            message = await read_message(process.stdout, timeout=900)
            if message.get("method") == "$/progress" and message["params"]["token"] == f"p{request_id}" and first is None:
                first = time.monotonic() - asked
            if message.get("id") == request_id:
                return first or 0.0, time.monotonic() - asked, message["result"]["completionTokens"]

    cold_first, _, _ = await chat(2)  # sent while the model loads
    figures["first_chunk_cold_ms"] = cold_first * 1000
    figures["ready_after_spawn_s"] = time.monotonic() - started
    warm_first, total, tokens = await chat(3)
    figures["first_chunk_warm_ms"] = warm_first * 1000
    figures["answer_tokens"] = tokens
    figures["tok_s"] = tokens / total
    send({"jsonrpc": "2.0", "id": 9, "method": "shutdown"})
    send({"jsonrpc": "2.0", "method": "exit"})
    await process.wait()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or hub id (default: the test model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="generate", choices=["generate", "fast"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from lsp_server.testing.tiny_model import build

        model = str(build(REPO / ".test-model"))
    figures = asyncio.run(measure(model, args.device, args.engine))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(), "model": model,
              "engine": args.engine, **figures}
    print(f"{'measure':<28}{'value':>12}")
    for key, value in figures.items():
        print(f"{key:<28}{value:>12.1f}" if isinstance(value, float) else f"{key:<28}{value:>12}")
    out = args.out or REPO / "bench" / "results" / f"server-latency-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
