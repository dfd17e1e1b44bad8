"""Overload, faults and security, with the real server and engine."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

from lsp_server.testing import scenarios as sc

from ..conftest import MODEL_DIR
from .conftest import SERVER
from .test_protocol import Raw

HERE = Path(__file__).parent


def chat_params(question: str = sc.CHAT_QUESTION, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], **extra}


async def test_out_of_memory_fails_one_request_and_the_next_succeeds(test_model):
    session = Raw(await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "faulty_server.py"), "oom", "--model", str(MODEL_DIR),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    ))
    try:
        await session.initialize()
        session.send(id=1, method="starchat/chat", params=chat_params())
        error = (await session.reply(1, timeout=60))["error"]
        assert error["code"] == -32803 and "ran out of memory" in error["message"]
        session.send(id=2, method="starchat/chat", params=chat_params())
        assert (await session.reply(2, timeout=60))["result"]["text"] == sc.CHAT_ANSWER
    finally:
        await session.finish()


async def test_request_timeout_stops_generation(test_model):
    session = await Raw.start()
    try:
        await session.initialize(requestTimeout=1.0)
        session.send(id=1, method="starchat/chat", params=chat_params())  # loads the model
        await session.reply(1, timeout=60)
        session.send(id=2, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken="p"))
        error = (await session.reply(2, timeout=30))["error"]
        assert error["code"] == -32803 and "requestTimeout" in error["message"]
        pieces = sum(1 for m in session.seen if m.get("method") == "$/progress" and m["params"]["token"] == "p")
        session.send(id=3, method="starchat/chat", params=chat_params())
        assert (await session.reply(3, timeout=30))["result"]["text"] == sc.CHAT_ANSWER
        after = sum(1 for m in session.seen if m.get("method") == "$/progress" and m["params"]["token"] == "p")
        assert after == pieces  # the stopped generation sent nothing more
    finally:
        await session.finish()


async def test_secret_files_are_refused_and_logs_hold_no_document_text(test_model, tmp_path):
    session = Raw(await asyncio.create_subprocess_exec(
        *SERVER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    ))
    try:
        await session.initialize()
        marker = "TOKEN_zq81_do_not_log"
        for name, text in ((".env", f"API_KEY={marker}\n"), ("calc.py", sc.CALC_PY + f"# {marker}\n")):
            session.send(method="textDocument/didOpen", params={"textDocument": {"uri": (tmp_path / name).as_uri(), "languageId": "python", "version": 1, "text": text}})
        whole = {"start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 0}}
        session.send(id=1, method="starchat/chat", params=chat_params(textDocument={"uri": (tmp_path / ".env").as_uri()}, range=whole))
        error = (await session.reply(1, timeout=60))["error"]
        assert "secrets" in error["message"]
        session.send(id=2, method="starchat/chat", params=chat_params(textDocument={"uri": (tmp_path / "calc.py").as_uri()}))
        assert "result" in await session.reply(2, timeout=60)
        session.send(id=3, method="shutdown")
        await session.reply(3)
        session.send(method="exit")
        await session.process.stdin.drain()
        await asyncio.wait_for(session.process.wait(), 10)
        logs = (await session.process.stderr.read()).decode()
        assert marker not in logs and "Say hello" not in logs
    finally:
        await session.finish()


def test_tcp_beyond_loopback_needs_a_token(test_model):
    done = subprocess.run([*SERVER, "--tcp", "0.0.0.0:0"], capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "STARCHAT_LSP_TOKEN"})
    assert done.returncode == 2 and "STARCHAT_LSP_TOKEN" in done.stderr


def test_a_tcp_client_must_present_the_token(test_model):
    from .test_server import _read_message, frame

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*SERVER, "--tcp", f"127.0.0.1:{port}"], env={**os.environ, "STARCHAT_LSP_TOKEN": "s3cret"}, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                import time

                time.sleep(0.1)
        with sock:
            buffer = bytearray()
            sock.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"token": "wrong"}}}))
            assert _read_message(sock, buffer)["error"]["code"] == -32600
            sock.sendall(frame({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"token": "s3cret"}}}))
            assert "result" in _read_message(sock, buffer)
    finally:
        server.terminate()
        server.wait(10)


async def test_the_server_exits_when_the_editor_process_is_gone(test_model):
    editor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    session = await Raw.start()
    try:
        session.send(id="init", method="initialize", params={"capabilities": {}, "processId": editor.pid})
        await session.reply("init")
        editor.kill()
        editor.wait()
        assert await asyncio.wait_for(session.process.wait(), 15) == 1
    finally:
        await session.finish()
