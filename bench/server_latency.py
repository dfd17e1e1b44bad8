"""How fast the server answers over stdio: initialize, model ready, first streamed chunk, the
first chunk of a chat whose prompt starts with a document an earlier chat computed, of the
first chat about a document the server warmed up while the editor was quiet, and inline
completions while a line is typed.

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
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsp_server.testing import scenarios as sc  # noqa: E402
from lsp_server.testing.wire import frame, read_message  # noqa: E402


class Server:
    """``python -m lsp_server`` over stdio, driven by hand (no client library): frames in and
    out, its log (stderr) kept to the last lines for error messages."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.started = time.monotonic()
        self.log_tail: list[bytes] = []
        self._draining = asyncio.ensure_future(self._drain())

    @classmethod
    async def start(cls, model: str, device: str, engine: str, *extra: str) -> "Server":
        """``extra``: more command-line arguments (``--quantization 8bit``)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lsp_server", "--model", model, "--device", device, "--engine", engine, *extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )
        return cls(process)

    async def _drain(self) -> None:  # the log must not fill its pipe
        async for line in self.process.stderr:  # type: ignore[union-attr]
            self.log_tail.append(line)
            del self.log_tail[:-20]

    def since_start(self) -> float:
        return time.monotonic() - self.started

    def send(self, payload: dict) -> None:
        self.process.stdin.write(frame(payload))  # type: ignore[union-attr]

    async def receive(self, timeout: float = 900) -> dict:
        try:
            return await read_message(self.process.stdout, timeout=timeout)  # type: ignore[arg-type]
        except Exception as exc:
            tail = b"".join(self.log_tail).decode(errors="replace")[-1500:]
            raise RuntimeError(f"the server did not answer ({type(exc).__name__}); its log ends: {tail}") from None

    async def initialize(self, options: dict | None = None) -> float:
        """Seconds initialize took."""
        sent = time.monotonic()
        self.send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                   "params": {"capabilities": {}, "initializationOptions": options or {}, "trace": "messages"}})
        while (await self.receive()).get("id") != 1:
            pass
        took = time.monotonic() - sent
        self.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        return took

    async def ready(self, timeout: float) -> str:
        """Wait for starchat/status "ready"; its message."""
        while True:
            message = await self.receive(max(1.0, timeout - self.since_start()))
            if message.get("method") == "starchat/status":
                state, text = message["params"]["state"], message["params"]["message"]
                if state == "ready":
                    return text
                if state == "error":
                    raise RuntimeError(f"the server failed to load: {text}")

    async def trace(self, start: str, timeout: float = 120) -> str:
        """The next ``$/logTrace`` line that starts with ``start`` (other messages are dropped)."""
        while True:
            message = await self.receive(timeout)
            if message.get("method") == "$/logTrace" and message["params"]["message"].startswith(start):
                return message["params"]["message"]

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.send({"jsonrpc": "2.0", "method": "textDocument/didOpen",
                   "params": {"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}}})

    async def chat(self, request_id: int, question: str | list[str], max_new_tokens: int | None = None, **extra) -> dict:
        """One streamed starchat/chat (``question``: one, or a conversation's turns from the user's
        first; ``extra``: more params, such as a textDocument and range): seconds to its first
        piece and in all, the answer, tokens, pieces, prompt tokens and how many of them came
        from the engine's cache."""
        token = f"p{request_id}"
        turns = [question] if isinstance(question, str) else question
        messages = [{"role": ("user", "assistant")[i % 2], "content": turn} for i, turn in enumerate(turns)]
        params: dict = {"messages": messages, "partialResultToken": token, **extra}
        if max_new_tokens:
            params["maxNewTokens"] = max_new_tokens
        asked, first, pieces = time.monotonic(), None, 0
        self.send({"jsonrpc": "2.0", "id": request_id, "method": "starchat/chat", "params": params})
        while True:
            message = await self.receive()
            if message.get("method") == "$/progress" and message["params"].get("token") == token:
                pieces += 1
                first = first if first is not None else time.monotonic() - asked
            if message.get("id") == request_id:
                if "result" not in message:
                    raise RuntimeError(f"chat failed: {message.get('error')}")
                total = time.monotonic() - asked
                result = message["result"]
                return {"first_s": first if first is not None else total, "total_s": total, "pieces": pieces,
                        "text": result["text"],
                        "tokens": result["completionTokens"], "prompt_tokens": result["promptTokens"],
                        "cached_tokens": result["cachedTokens"]}

    async def close(self) -> None:
        try:
            self.send({"jsonrpc": "2.0", "id": 9, "method": "shutdown"})
            self.send({"jsonrpc": "2.0", "method": "exit"})
            await asyncio.wait_for(self.process.wait(), 30)
        except Exception:
            self.process.kill()
            await self.process.wait()
        self._draining.cancel()


async def document_reuse(server: Server, first_id: int, functions: int) -> dict:
    """Two chats about different functions of one document of ``functions`` small functions:
    the second prompt starts with the file the first one computed (the prompt puts the file
    before the selection and the question), so its first piece comes sooner. The first
    pieces of both, the prompt's size and how much of the second came from the cache. Then
    the first chat's next turn, after the second chat in between: how much of its prompt
    came from the cache (all of the first turn and its answer when the engine kept them)."""
    uri = "file:///bench/module.py"
    server.open(uri, "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\n" for i in range(functions)))

    def function(i: int) -> dict:
        return {"start": {"line": 4 * i, "character": 0}, "end": {"line": 4 * i + 2, "character": 0}}

    question = "What does this function do?"
    about_first = {"textDocument": {"uri": uri}, "range": function(functions // 4)}
    first = await server.chat(first_id, question, 4, **about_first)
    again = await server.chat(first_id + 1, question, 4, textDocument={"uri": uri}, range=function(3 * functions // 4))
    turn = await server.chat(first_id + 2, [question, first["text"], "And then?"], 4, **about_first)
    return {"doc_prompt_tokens": again["prompt_tokens"], "doc_cached_tokens": again["cached_tokens"],
            "doc_first_piece_ms": round(first["first_s"] * 1e3, 1),
            "doc_reused_first_piece_ms": round(again["first_s"] * 1e3, 1),
            "doc_next_turn_prompt_tokens": turn["prompt_tokens"], "doc_next_turn_cached_tokens": turn["cached_tokens"],
            "doc_next_turn_first_piece_ms": round(turn["first_s"] * 1e3, 1)}


async def document_warm_up(server: Server, request_id: int, functions: int) -> dict:
    """A document of ``functions`` small functions (as :func:`document_reuse`'s, other code)
    opened and left alone for a moment: the server computes the prompt prefix every request on
    it shares (``warmCache``), and the first chat about it computes only its selection and
    question. Compare its first piece with ``doc_first_piece_ms`` (a chat about a document of
    the same size, sent at once after didOpen: nothing warmed)."""
    uri = "file:///bench/warmed.py"
    server.open(uri, "".join(f"def g{i}(y):\n    return y - {i} * {i % 5}\n\n\n" for i in range(functions)))
    line = await server.trace("Warm-up of warmed.py")
    got = await server.chat(request_id, "What does this function do?", 4, textDocument={"uri": uri},
                            range={"start": {"line": functions, "character": 0}, "end": {"line": functions + 2, "character": 0}})
    computed, _, rest = line.partition(": ")[2].partition(" of ")
    return {"doc_warm_up_tokens": int(computed), "doc_warm_up_ms": float(rest.split(" computed in ")[1].split(" ms")[0]),
            "doc_warmed_prompt_tokens": got["prompt_tokens"], "doc_warmed_cached_tokens": got["cached_tokens"],
            "doc_warmed_first_piece_ms": round(got["first_s"] * 1e3, 1)}


# a completion of about a line: a model with random weights (the GPU bench's) never ends one itself
FILL_OPTIONS = {"completionMaxNewTokens": 16}


async def document_typing(server: Server, first_id: int, functions: int, keys: int = 12) -> dict:
    """Inline completions while a line is typed into the middle of a document of ``functions``
    small functions, one per keystroke (as an editor asks): the first (nothing of the document
    in the engine's cache), then the keystrokes' (each prompt starts with the last one's text
    before the cursor, so the engine computes the cursor's neighbourhood and the code after
    it), then typing the first character of the last proposal (answered from it, without the
    model). Times are the whole answer, as the user waits for it; prompt and cache figures
    come from the server's trace."""
    uri = "file:///bench/typing.py"
    line = 4 * (functions // 2) + 2  # the blank line after a function, in the middle
    server.open(uri, "".join(f"def h{i}(x, y):\n    return x * {i} - y\n\n\n" for i in range(functions)))
    version = 1

    def type_at(column: int, text: str) -> None:
        nonlocal version
        version += 1
        at = {"line": line, "character": column}
        server.send({"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {
            "textDocument": {"uri": uri, "version": version},
            "contentChanges": [{"range": {"start": at, "end": at}, "text": text}]}})

    async def complete(request_id: int, column: int) -> tuple[float, str, tuple[int, int] | None]:
        """Seconds to the answer, the proposal, and (prompt, cached) tokens when the model ran."""
        asked, ran = time.monotonic(), None
        server.send({"jsonrpc": "2.0", "id": request_id, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": column}, "context": {"triggerKind": 2}}})
        while True:
            message = await server.receive()
            if message.get("method") == "$/logTrace" and message["params"]["message"].startswith("StarChat: completion: prompt"):
                found = re.search(r"prompt (\d+) tokens \((\d+) from the cache\)", message["params"]["message"])
                ran = (int(found[1]), int(found[2])) if found else None
            if message.get("id") == request_id:
                if "result" not in message:
                    raise RuntimeError(f"inline completion failed: {message.get('error')}")
                items = (message["result"] or {}).get("items") or [{}]
                return time.monotonic() - asked, items[0].get("insertText", ""), ran

    first_s, _, first_ran = await complete(first_id, 0)
    typed = "    total = x * 3 + y - 1"[:keys]
    keystrokes, cached, proposal = [], [], ""
    for column, char in enumerate(typed):
        type_at(column, char)
        took, proposal, ran = await complete(first_id + 1 + column, column + 1)
        keystrokes.append(took)
        if ran:
            cached.append(ran[1] / ran[0])
    through = None
    if proposal:
        type_at(len(typed), proposal[0])
        took, _, ran = await complete(first_id + 1 + len(typed), len(typed) + 1)
        through = {"fill_typed_through_ms": round(took * 1e3, 1), "fill_typed_through_ran_model": ran is not None}
    keystrokes.sort()
    return {"fill_first_ms": round(first_s * 1e3, 1), "fill_first_prompt_tokens": first_ran[0] if first_ran else None,
            "fill_keystroke_median_ms": round(keystrokes[len(keystrokes) // 2] * 1e3, 1),
            "fill_keystroke_max_ms": round(keystrokes[-1] * 1e3, 1),
            "fill_keystroke_cached_share": round(min(cached), 3) if cached else None, **(through or {})}


async def time_to_ready(model: str, device: str, engine: str = "generate", timeout: float = 300.0, chat_tokens: int = 0,
                        doc_functions: int = 0) -> dict:
    """Seconds from spawning the server to its ``starchat/status`` "ready" (weights loaded,
    engine prepared: for the fast engine its cache allocated and graphs captured). With
    ``chat_tokens``, then one chat of that many tokens: its first streamed piece, its rate
    through the server, and how many pieces carried it. With ``doc_functions``, then
    :func:`document_reuse`, :func:`document_warm_up` and :func:`document_typing` on documents of
    that many functions."""
    server = await Server.start(model, device, engine)
    try:
        await server.initialize(FILL_OPTIONS)
        figures: dict = {"ready_message": await server.ready(timeout)}
        figures["ready_after_spawn_s"] = round(server.since_start(), 3)
        if chat_tokens:
            got = await server.chat(2, "Write a long Python module.", chat_tokens)
            figures.update(chat_first_piece_ms=round(got["first_s"] * 1e3, 1), chat_tokens=got["tokens"],
                           chat_tok_s=round(got["tokens"] / got["total_s"], 1), chat_pieces=got["pieces"])
        if doc_functions:
            figures.update(await document_reuse(server, 3, doc_functions))
            figures.update(await document_warm_up(server, 6, doc_functions))
            figures.update(await document_typing(server, 10, doc_functions))
        return figures
    finally:
        await server.close()


async def measure(model: str, device: str, engine: str = "generate") -> dict:
    server = await Server.start(model, device, engine)
    try:
        took = await server.initialize({"temperature": 0, **FILL_OPTIONS})
        figures = {"initialize_ms": took * 1000, "spawn_to_initialize_ms": server.since_start() * 1000}
        cold = await server.chat(2, sc.CHAT_QUESTION)  # sent while the model loads
        figures["first_chunk_cold_ms"] = cold["first_s"] * 1000
        figures["ready_after_spawn_s"] = server.since_start()
        warm = await server.chat(3, sc.CHAT_QUESTION)
        figures["first_chunk_warm_ms"] = warm["first_s"] * 1000
        figures["answer_tokens"] = warm["tokens"]
        figures["tok_s"] = warm["tokens"] / warm["total_s"]
        figures.update(await document_reuse(server, 4, 40))
        figures.update(await document_warm_up(server, 7, 40))
        figures.update(await document_typing(server, 10, 40))
        return figures
    finally:
        await server.close()


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
    print(f"{'measure':<32}{'value':>12}")
    for key, value in figures.items():
        print(f"{key:<32}{value:>12.1f}" if isinstance(value, float) else f"{key:<32}{value!s:>12}")
    out = args.out or REPO / "bench" / "results" / f"server-latency-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
