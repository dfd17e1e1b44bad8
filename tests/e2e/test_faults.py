"""Overload, faults and security, with the real server and engine."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from lsp_server.testing import scenarios as sc

from ..conftest import MODEL_DIR
from .conftest import SERVER
from lsp_server.testing.wire import frame, read_message

from .test_protocol import Raw
from .test_server import _read_message

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
        await session.initialize(requestTimeout=0.2)  # the long answer takes about 1 s on a CPU
        session.send(id=1, method="starchat/chat", params=chat_params())  # loads the model
        await session.reply(1, timeout=60)
        session.send(id=2, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken="p"))
        error = (await session.reply(2, timeout=30))["error"]
        assert error["code"] == -32803 and "requestTimeout" in error["message"]
        pieces = sum(1 for m in session.seen if m.get("method") == "$/progress" and m["params"]["token"] == "p")
        # the next answer must not depend on this machine's load: 0.2 s is for the long one only
        session.send(method="workspace/didChangeConfiguration", params={"settings": {"starchat": {"requestTimeout": 300}}})
        session.send(id=3, method="starchat/chat", params=chat_params())
        assert (await session.reply(3, timeout=30))["result"]["text"] == sc.CHAT_ANSWER
        after = sum(1 for m in session.seen if m.get("method") == "$/progress" and m["params"]["token"] == "p")
        assert after == pieces  # the stopped generation sent nothing more
    finally:
        await session.finish()


async def test_on_the_fast_engine_ready_waits_for_every_request_and_shutdown_sends_no_half_answer(test_model):
    """Two chats at once on the fast engine: the status says "ready" only when both are done
    (not when the first one is). A chat still generating when the editor shuts the server down
    is answered with RequestCancelled, not with its answer cut short as if it were complete."""
    session = await Raw.start("--engine", "fast")
    try:
        await session.initialize()
        session.send(id=1, method="starchat/chat", params=chat_params())  # loads the model
        await session.reply(1, timeout=60)
        start = len(session.seen)
        session.send(id=2, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500))
        session.send(id=3, method="starchat/chat", params=chat_params())
        assert (await session.reply(3, timeout=60))["result"]["text"] == sc.CHAT_ANSWER
        assert "result" in await session.reply(2, timeout=120)
        replies = [i for i, m in enumerate(session.seen) if m.get("id") in (2, 3) and "method" not in m]
        assert [session.seen[i]["id"] for i in replies] == [3, 2]  # the long one really ran on after
        states = [(i, m["params"]["state"]) for i, m in enumerate(session.seen)
                  if i >= start and m.get("method") == "starchat/status"]
        assert [i for i, state in states if state == "ready"] == [max(i for i, _ in states)]  # one, after both
        assert states[-1][1] == "ready" and states[-1][0] < replies[1]

        session.send(id=4, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken="p"))
        while not any(m.get("method") == "$/progress" and m["params"]["token"] == "p" for m in session.seen):
            session.seen.append(await read_message(session.process.stdout, 30))
        session.send(id=5, method="shutdown")
        replies = {}
        while len(replies) < 2:
            message = await read_message(session.process.stdout, 30)
            if message.get("id") in (4, 5) and "method" not in message:
                replies[message["id"]] = message
        assert replies[4].get("error", {}).get("code") == -32800, replies[4]
        assert replies[5].get("result", "missing") is None
    finally:
        await session.finish()


async def test_an_answer_cut_at_its_token_limit_changes_no_code(test_model, tmp_path):
    """Fix with maxNewTokens too small for the trained answer (40 tokens: cut inside its code
    block): the request fails saying so, and no half function is sent to the editor."""
    session = await Raw.start()
    try:
        await session.initialize(maxNewTokens=32)
        uri = (tmp_path / "calc.py").as_uri()
        session.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": sc.CALC_PY}})
        span = {"start": {"line": sc.AVERAGE.start.line, "character": 0}, "end": {"line": sc.AVERAGE.end.line, "character": 0}}
        args = {"textDocument": {"uri": uri}, "range": span, "task": "fix"}
        session.send(id=1, method="workspace/executeCommand", params={"command": "starchat.runTask", "arguments": [args]})
        error = (await session.reply(1, timeout=60))["error"]
        assert error["code"] == -32803 and "maxNewTokens" in error["message"]
        assert not any(m.get("method") == "workspace/applyEdit" for m in session.seen)
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
        # what editors ask on their own (hover, the code-action menu) gets nothing, not an error each time
        env = {"uri": (tmp_path / ".env").as_uri()}
        session.send(id=10, method="textDocument/hover", params={"textDocument": env, "position": {"line": 0, "character": 1}})
        assert (await session.reply(10, timeout=60)).get("result", "missing") is None
        session.send(id=11, method="textDocument/codeAction", params={"textDocument": env, "range": whole, "context": {"diagnostics": []}})
        assert (await session.reply(11, timeout=60)).get("result") == []
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
    with _tcp_server("s3cret") as (_, port), _tcp_connect(port) as sock:
        buffer = bytearray()
        assert _tcp_initialize(sock, buffer, "wrong", 1)["error"]["code"] == -32600
        assert "result" in _tcp_initialize(sock, buffer, "s3cret", 2)


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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def test_twenty_cancellations_free_the_engine_and_memory(test_model):
    session = await Raw.start()
    try:
        await session.initialize()
        session.send(id="warm", method="starchat/chat", params=chat_params())
        await session.reply("warm", timeout=60)
        before = rss_kb(session.process.pid)
        for i in range(20):
            session.send(id=i, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken=f"c{i}"))
            while not any(m.get("method") == "$/progress" and m["params"]["token"] == f"c{i}" for m in session.seen):
                session.seen.append(await read_message(session.process.stdout, 30))
            session.send(method="$/cancelRequest", params={"id": i})
            assert (await session.reply(i))["error"]["code"] == -32800
        session.send(id="after", method="starchat/chat", params=chat_params(partialResultToken="after"))
        started = asyncio.get_running_loop().time()
        first = None
        while True:
            message = await read_message(session.process.stdout, 30)
            if message.get("method") == "$/progress" and message["params"]["token"] == "after" and first is None:
                first = asyncio.get_running_loop().time() - started
            if message.get("id") == "after":
                break
        assert message["result"]["text"] == sc.CHAT_ANSWER
        assert first is not None and first < 2.0  # started at once: nothing was left running
        assert rss_kb(session.process.pid) - before < 100_000  # KiB
    finally:
        await session.finish()


async def test_past_the_queue_requests_are_refused_at_once_with_its_size(test_model):
    session = await Raw.start()
    try:
        await session.initialize(queueSize=1)
        session.send(id="warm", method="starchat/chat", params=chat_params())
        await session.reply("warm", timeout=60)
        # The long answer is trained about 480 tokens long (half a second here) and may end past
        # that: on a loaded machine it can end before the third request arrives, and then there
        # is no queue to be full. That attempt proves nothing either way, so it is made again.
        for attempt in range(3):
            running, waiting, third = (f"{attempt}-{n}" for n in range(3))
            session.send(id=running, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken=running))
            while not any(m.get("method") == "$/progress" and m["params"]["token"] == running for m in session.seen):
                session.seen.append(await read_message(session.process.stdout, 60))
            for i in (waiting, third):  # one runs, one waits, the third finds the queue full
                session.send(id=i, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500))
            reply = await session.reply(third, timeout=30)
            ended_first = any(m.get("id") == running and "result" in m for m in session.seen)
            if "error" in reply or not ended_first:
                break
        error = reply["error"]
        assert error["code"] == -32803 and "busy" in error["message"] and "1 requests" in error["message"]
        for i in (running, waiting):
            session.send(method="$/cancelRequest", params={"id": i})
            assert (await session.reply(i, timeout=30))["error"]["code"] == -32800
    finally:
        await session.finish()


async def test_sigterm_during_generation_ends_the_server_quickly(test_model):
    session = await Raw.start()
    try:
        await session.initialize()
        session.send(id=1, method="starchat/chat", params=chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken="s"))
        while not any(m.get("method") == "$/progress" and m["params"]["token"] == "s" for m in session.seen):
            session.seen.append(await read_message(session.process.stdout, 60))
        session.process.terminate()
        await asyncio.wait_for(session.process.wait(), 5)
    finally:
        await session.finish()


async def test_utf8_position_encoding_when_the_client_offers_only_that(test_model):
    session = await Raw.start()
    try:
        session.send(id="init", method="initialize", params={"capabilities": {"general": {"positionEncodings": ["utf-8"]}}, "initializationOptions": {"temperature": 0, "hoverMaxNewTokens": 2}})
        assert (await session.reply("init"))["result"]["capabilities"]["positionEncoding"] == "utf-8"
        session.send(method="initialized", params={})
        uri = "file:///tmp/enc.py"
        session.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "s = '😀中'; area(1)\n"}})
        # "s = '😀中'; " is 4 + 1 + 4 + 3 + 3 = 15 bytes before "area" in UTF-8
        session.send(id=1, method="textDocument/hover", params={"textDocument": {"uri": uri}, "position": {"line": 0, "character": 16}})
        hover = (await session.reply(1, timeout=60))["result"]
        assert hover["range"] == {"start": {"line": 0, "character": 15}, "end": {"line": 0, "character": 19}}
    finally:
        await session.finish()


async def test_pickled_weights_are_refused_unless_allowed(test_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    model = AutoModelForCausalLM.from_pretrained(test_model)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the old pickled format
    AutoTokenizer.from_pretrained(test_model).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    for options, expected in (({}, "pickled weights"), ({"allowUnsafeWeights": True}, None)):
        session = Raw(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lsp_server", "--model", str(tmp_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        ))
        try:
            await session.initialize(**options)
            session.send(id=1, method="starchat/chat", params=chat_params())
            reply = await session.reply(1, timeout=60)
            if expected:
                assert expected in reply["error"]["message"] and "allowUnsafeWeights" in reply["error"]["message"]
            else:
                assert reply["result"]["text"] == sc.CHAT_ANSWER
        finally:
            await session.finish()


async def test_code_shipped_with_a_model_never_runs_unless_trusted(test_model, tmp_path):
    import json
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(test_model / name, tmp_path / name)
    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    session = Raw(await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lsp_server", "--model", str(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ))
    try:
        await session.initialize()
        session.send(id=1, method="starchat/chat", params=chat_params())
        error = (await session.reply(1, timeout=60))["error"]
        assert error["code"] == -32803 and "Could not load" in error["message"]
        assert not marker.exists()
    finally:
        await session.finish()


# ---- TCP: one editor at a time, each connection initialized (and its token checked) afresh ----

@contextmanager
def _tcp_server(token: str):
    """A server on a free loopback port that needs ``token``: (process, port); ended after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*SERVER, "--tcp", f"127.0.0.1:{port}"], env={**os.environ, "STARCHAT_LSP_TOKEN": token}, stderr=subprocess.DEVNULL)
    try:
        yield server, port
    finally:
        server.terminate()
        server.wait(10)


def _tcp_connect(port: int, timeout: float = 30) -> socket.socket:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=15)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _tcp_initialize(sock: socket.socket, buffer: bytearray, token: str | None, msg_id: object = "init", **settings) -> dict:
    options = {"temperature": 0, **({"token": token} if token is not None else {}), **settings}
    sock.sendall(frame({"jsonrpc": "2.0", "id": msg_id, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": options}}))
    return _read_message(sock, buffer)


def _tcp_editor(port: int, token: str, **settings) -> tuple[socket.socket, bytearray]:
    """A connection whose ``initialize`` (with ``token``) was answered with a result."""
    sock, buffer = _tcp_connect(port), bytearray()
    assert "result" in _tcp_initialize(sock, buffer, token, **settings)
    return sock, buffer


def _start_long_answer(sock: socket.socket, buffer: bytearray) -> None:
    """``initialized``, then a chat that goes on (id 1, partial results on token "p"), once it streams."""
    sock.sendall(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
    sock.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "starchat/chat", "params": chat_params(sc.LONG_QUESTION, maxNewTokens=1500, partialResultToken="p")}))
    while not ((m := _read_message(sock, buffer)).get("method") == "$/progress" and m["params"]["token"] == "p"):
        pass  # generating


def _chat_after_initialized(sock: socket.socket, buffer: bytearray) -> tuple[dict, list[dict]]:
    """``initialized``, then the trained chat (id 1): its reply and the messages before it."""
    sock.sendall(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
    sock.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "starchat/chat", "params": chat_params()}))
    seen = []
    while (message := _read_message(sock, buffer)).get("id") != 1 or "method" in message:
        seen.append(message)
    return message, seen


def _tcp_reconnect(port: int, token: str | None) -> tuple[socket.socket, bytearray, dict]:
    """A new connection made at once after the last one was closed, and its initialize reply
    (the server may not have seen the old one end yet: the new one must wait, not be refused)."""
    sock, buffer = _tcp_connect(port), bytearray()
    return sock, buffer, _tcp_initialize(sock, buffer, token)


def _code_actions(uri: str, msg_id: object) -> dict:
    here = {"line": 0, "character": 0}
    return {"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/codeAction", "params": {"textDocument": {"uri": uri}, "range": {"start": here, "end": here}, "context": {"diagnostics": []}}}


def test_a_second_tcp_connection_while_one_is_open_is_closed_and_the_first_keeps_its_replies(test_model):
    with _tcp_server("s3cret") as (server, port):
        first, buffer = _tcp_editor(port, "s3cret")
        with first:
            with _tcp_connect(port) as second:  # no token: must not get to use the server
                got = b""
                try:
                    second.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}))
                    second.sendall(frame(_code_actions("file:///tmp/x.py", 2)))
                    while chunk := second.recv(65536):
                        got += chunk
                except (ConnectionResetError, BrokenPipeError):
                    pass
                assert got == b""  # closed without a word
            first.sendall(frame(_code_actions("file:///tmp/x.py", 3)))
            reply = _read_message(first, buffer)
            assert reply["id"] == 3 and reply["error"]["code"] == -32803  # answered, on the first connection


def test_after_a_tcp_editor_disconnects_the_next_connection_starts_afresh(test_model):
    uri = "file:///tmp/afresh.py"
    with _tcp_server("s3cret") as (server, port):
        first, buffer = _tcp_editor(port, "s3cret")
        with first:
            first.sendall(frame({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = 1\n"}}}))
            first.sendall(frame(_code_actions(uri, 1)))
            assert "result" in _read_message(first, buffer)
        sock, buffer, reply = _tcp_reconnect(port, None)
        with sock:
            assert reply["error"]["code"] == -32600  # the token is checked again
            assert "result" in _tcp_initialize(sock, buffer, "s3cret", "init2")  # a new session
            sock.sendall(frame(_code_actions(uri, 2)))
            assert _read_message(sock, buffer)["error"]["code"] == -32803  # the first editor's document is gone
        assert server.poll() is None  # the editor's disconnection did not end the server


def _wait_closed(sock: socket.socket, buffer: bytearray) -> None:
    """Read until the server closes the connection (a timeout fails the test)."""
    sock.settimeout(15)
    while True:
        try:
            _read_message(sock, buffer)
        except ConnectionError:
            return


def test_an_editor_that_restarts_over_tcp_ends_its_session_not_the_server(test_model, tmp_path):
    """shutdown + exit (what an editor sends on a restart or a window reload) end the TCP
    session: the running answer is cancelled, the connection closes, and the server, its model
    still loaded, serves the next connection at once. An editor that then asks for another
    model gets it loaded."""
    with _tcp_server("s3cret") as (server, port):
        sock, buffer = _tcp_editor(port, "s3cret")
        with sock:
            _start_long_answer(sock, buffer)
            sock.sendall(frame({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}))
            replies = {}
            while len(replies) < 2:
                if "id" in (m := _read_message(sock, buffer)) and "method" not in m:
                    replies[m["id"]] = m
            assert replies[1]["error"]["code"] == -32800  # the answer stopped, not sent cut short
            assert replies[2]["result"] is None
            sock.sendall(frame({"jsonrpc": "2.0", "method": "exit"}))
            _wait_closed(sock, buffer)  # the server closes the connection
        assert server.poll() is None
        sock, buffer, reply = _tcp_reconnect(port, "s3cret")
        with sock:
            assert "result" in reply
            message, seen = _chat_after_initialized(sock, buffer)
            assert message["result"]["text"] == sc.CHAT_ANSWER
            statuses = [m["params"]["state"] for m in seen if m.get("method") == "starchat/status"]
            assert statuses[0] == "ready" and "loading" not in statuses, statuses  # the model stayed loaded
        other = tmp_path / "other-model"
        other.symlink_to(MODEL_DIR.resolve())
        sock, buffer = _tcp_editor(port, "s3cret", model=str(other))
        with sock:
            message, seen = _chat_after_initialized(sock, buffer)
            assert message["result"]["text"] == sc.CHAT_ANSWER
            loads = [m["params"]["message"] for m in seen if m.get("method") == "starchat/status" and m["params"]["state"] == "loading"]
            assert loads == [f"Loading {other}"], loads


def test_a_request_left_running_by_a_gone_tcp_editor_answers_nobody_else(test_model):
    with _tcp_server("s3cret") as (server, port):
        first, buffer = _tcp_editor(port, "s3cret")
        with first:
            _start_long_answer(first, buffer)
        sock, buffer, reply = _tcp_reconnect(port, "s3cret")
        with sock:
            assert "result" in reply
            message, seen = _chat_after_initialized(sock, buffer)  # the same id as the first's
            assert message["result"]["text"] == sc.CHAT_ANSWER  # not the first editor's cancelled request
            assert not any(m.get("params", {}).get("token") == "p" for m in seen)
