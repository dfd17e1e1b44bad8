"""Settings, loading, failures and transports, over stdio with the real engine."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_server.testing import scenarios as sc
from lsp_server.testing.wire import frame, read_message

from ..conftest import MODEL_DIR
from .conftest import SERVER, plain, rng, start_session


def progress_titles(client: LanguageClient) -> list[str]:
    return [r.title for reports in client.progress_reports.values() for r in reports if isinstance(r, types.WorkDoneProgressBegin)]


async def ask_chat(editor, question: str = sc.CHAT_QUESTION, **extra):
    params = {"messages": [{"role": "user", "content": question}], "partialResultToken": "t", **extra}
    return plain(await editor.request("starchat/chat", params))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def raw_client(lsp_client: LanguageClient, test_model):
    yield
    await lsp_client.shutdown_session()


async def test_a_request_during_loading_waits_with_progress(raw_client, tmp_path):
    editor = await start_session(raw_client, tmp_path, "neovim")
    result = await ask_chat(editor)  # sent at once: the model is still loading
    assert result["text"] == sc.CHAT_ANSWER
    titles = progress_titles(raw_client)
    assert "StarChat: waiting for the model to load" in titles
    assert "StarChat: loading the model" in titles
    assert editor.statuses[0] == "loading" and "ready" in editor.statuses


async def test_settings_from_initialization_options_and_bad_values(raw_client, tmp_path):
    editor = await start_session(raw_client, tmp_path, "visual-studio-code", options={"maxNewTokens": 4, "topP": "lots"})
    result = await ask_chat(editor)
    assert result["finishReason"] == "length" and result["completionTokens"] == 4
    assert sc.CHAT_ANSWER.startswith(result["text"])
    warnings = [m.message for m in raw_client.messages if m.type == types.MessageType.Warning]
    assert any("topP='lots'" in w and "0.95" in w for w in warnings)


async def test_workspace_configuration_overrides_initialization_options(raw_client, tmp_path):
    raw_client.set_configuration({"maxNewTokens": 3}, section="starchat")
    editor = await start_session(raw_client, tmp_path, "neovim", options={"maxNewTokens": 40})
    result = await ask_chat(editor)
    assert result["completionTokens"] == 3


async def test_a_setting_reset_in_the_editor_is_back_to_its_default(raw_client, tmp_path):
    """VS Code sends the user's settings as initializationOptions and answers the pull with null
    for a setting that is not set: after the user resets one, its default applies again."""
    raw_client.set_configuration({"maxNewTokens": 3}, section="starchat")
    editor = await start_session(raw_client, tmp_path, "visual-studio-code", options={"maxNewTokens": 3})
    assert (await ask_chat(editor))["completionTokens"] == 3
    raw_client.set_configuration({"maxNewTokens": None}, section="starchat")
    raw_client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    result = await ask_chat(editor)
    assert result["text"] == sc.CHAT_ANSWER and result["finishReason"] == "stop", result


async def test_prompt_too_long_names_both_sizes(raw_client, tmp_path):
    editor = await start_session(raw_client, tmp_path, "neovim", options={"contextWindow": 300, "maxNewTokens": 50})
    big = "".join(f"value_{i} = {i} * 2  # a line of filler\n" for i in range(200))
    uri = editor.open("big.py", big)
    args = {"textDocument": {"uri": uri}, "range": {"start": {"line": 0, "character": 0}, "end": {"line": 200, "character": 0}}}
    with pytest.raises(Exception) as error:
        await raw_client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.explain", arguments=[args]))
    message = str(error.value)
    assert getattr(error.value, "code", None) == -32803
    assert "at most 250 tokens" in message and "tokens, but" in message


async def test_unopened_documents_are_refused_not_read(raw_client, tmp_path):
    await start_session(raw_client, tmp_path, "neovim")
    secret = tmp_path / "secret.py"
    secret.write_text("TOKEN = 'do-not-send'\n")
    args = {"textDocument": {"uri": secret.as_uri()}, "range": plain(raw_client.protocol._converter.unstructure(rng(sc.AVERAGE)))}
    with pytest.raises(Exception) as error:
        await raw_client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.explain", arguments=[args]))
    assert "not open" in str(error.value)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "lsp_server", "--model", "/nonexistent/starchat-model"]))
async def broken_client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def test_load_failure_is_a_message_not_a_crash(broken_client, tmp_path):
    editor = await start_session(broken_client, tmp_path, "neovim")
    for _ in range(2):  # the server stays up and keeps answering
        with pytest.raises(Exception) as error:
            await ask_chat(editor)
        assert getattr(error.value, "code", None) == -32803
        assert "Could not load the model '/nonexistent/starchat-model'" in str(error.value)
    errors = [m.message for m in broken_client.messages if m.type == types.MessageType.Error]
    assert any("/nonexistent/starchat-model" in e for e in errors)
    assert "error" in editor.statuses
    assert "Traceback" not in str(error.value)


def _read_message(sock: socket.socket, buffer: bytearray) -> dict:
    while True:
        head, sep, rest = bytes(buffer).partition(b"\r\n\r\n")
        if sep:
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            if len(rest) >= length:
                del buffer[: len(head) + 4 + length]
                return json.loads(rest[:length])
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buffer += chunk


def test_tcp_mode_serves_on_loopback(test_model):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*SERVER, "--tcp", str(port)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with sock:
            buffer = bytearray()
            sock.sendall(frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"temperature": 0}}}))
            reply = _read_message(sock, buffer)
            assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "starchat-lsp"
            sock.sendall(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
            sock.sendall(frame({"jsonrpc": "2.0", "id": 2, "method": "starchat/chat", "params": {"messages": [{"role": "user", "content": sc.CHAT_QUESTION}]}}))
            while (message := _read_message(sock, buffer)).get("id") != 2:
                pass
            assert message["result"]["text"] == sc.CHAT_ANSWER
    finally:
        server.terminate()
        server.wait(10)


def test_ask_from_the_terminal_streams_the_answer(test_model, tmp_path):
    (tmp_path / "calc.py").write_text(sc.CALC_PY)
    done = subprocess.run(
        [sys.executable, "-m", "lsp_server", "--model", str(MODEL_DIR), "--temperature", "0", "ask", str(tmp_path / "calc.py") + ":4-5", "--task", "fix"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sc.FIX_ANSWER
    question = subprocess.run(
        [sys.executable, "-m", "lsp_server", "--model", str(MODEL_DIR), "--temperature", "0", "ask", str(tmp_path / "calc.py") + ":4-5", sc.ASK_QUESTION],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert question.stdout.strip() == sc.ASK_ANSWER
    # another file shown beside it, as a chat's attached file (area() is on lines 8-9)
    (tmp_path / "shapes.py").write_text(sc.SHAPES_PY)
    callers = subprocess.run(
        [sys.executable, "-m", "lsp_server", "--model", str(MODEL_DIR), "--temperature", "0", "ask", str(tmp_path / "calc.py") + ":8-9",
         sc.CALLERS_QUESTION, "--with", str(tmp_path / "shapes.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert callers.returncode == 0, callers.stderr
    assert callers.stdout.strip() == sc.CALLERS_ANSWER
    assert "too long for the prompt" not in callers.stderr
    # files too long for the prompt: stderr says which of their lines the model sees
    for name in ("long.py", "other.py"):
        (tmp_path / name).write_text("".join(f"{name[:-3]}_{i} = {i}  # a line of filler to make the file long\n" for i in range(600)))
    long = subprocess.run(
        [sys.executable, "-m", "lsp_server", "--model", str(MODEL_DIR), "--max-new-tokens", "2", "ask", str(tmp_path / "long.py") + ":300-301",
         "Why?", "--with", str(tmp_path / "other.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert long.returncode == 0, long.stderr
    seen = re.search(r"too long for the prompt, the model sees long\.py lines (\d+)-(\d+) of 600; other\.py lines 1-(\d+) of 600\n", long.stderr)
    assert seen and int(seen[1]) <= 300 and 301 <= int(seen[2]) < 600 and 0 < int(seen[3]) < 600, long.stderr


def test_ask_reports_a_missing_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lsp_server", "ask", str(tmp_path / "nope.py"), "why?"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr and done.stdout == ""
    (tmp_path / "a.py").write_text("x = 1\n")
    done = subprocess.run([sys.executable, "-m", "lsp_server", "ask", str(tmp_path / "a.py"), "why?", "--with", str(tmp_path / "b.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr and "b.py" in done.stderr


async def test_stdout_carries_only_json_rpc(test_model):
    """Nothing but framed JSON-RPC may reach stdout, even while loading and generating."""
    process = await asyncio.create_subprocess_exec(*SERVER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert process.stdin and process.stdout
    process.stdin.write(frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"temperature": 0}}}))
    process.stdin.write(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
    process.stdin.write(frame({"jsonrpc": "2.0", "id": 2, "method": "starchat/chat", "params": {"messages": [{"role": "user", "content": sc.CHAT_QUESTION}]}}))
    await process.stdin.drain()
    seen = []
    while (message := await read_message(process.stdout)).get("id") != 2:  # fails on anything unframed
        seen.append(message)
    seen.append(message)
    assert seen[-1]["result"]["text"] == sc.CHAT_ANSWER
    process.stdin.write(frame({"jsonrpc": "2.0", "id": 3, "method": "shutdown"}) + frame({"jsonrpc": "2.0", "method": "exit"}))
    await process.stdin.drain()
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_a_reversed_range_is_a_clear_error(raw_client, tmp_path):
    editor = await start_session(raw_client, tmp_path, "neovim")
    uri = editor.open()
    args = {"textDocument": {"uri": uri}, "range": {"start": {"line": 4, "character": 0}, "end": {"line": 3, "character": 0}}}
    with pytest.raises(Exception) as error:
        await raw_client.workspace_execute_command_async(types.ExecuteCommandParams(command="starchat.explain", arguments=[args]))
    assert getattr(error.value, "code", None) == -32803
    assert "ends (3:0) before it starts (4:0)" in str(error.value)


async def test_chat_about_a_selection_puts_the_code_in_the_prompt(raw_client, tmp_path):
    editor = await start_session(raw_client, tmp_path, "neovim", options={"maxNewTokens": 2})
    uri = editor.open()
    bare = await ask_chat(editor)
    about = await ask_chat(editor, textDocument={"uri": uri}, range=plain(raw_client.protocol._converter.unstructure(rng(sc.AREA))))
    whole = await ask_chat(editor, textDocument={"uri": uri})
    assert bare["promptTokens"] < whole["promptTokens"] < about["promptTokens"]  # the selection comes again
    assert bare["cachedTokens"] == 0  # the first request: nothing to reuse
    with pytest.raises(Exception) as error:
        await ask_chat(editor, textDocument={"uri": uri}, range={"start": {"line": 5, "character": 0}, "end": {"line": 1, "character": 0}})
    assert "before it starts" in str(error.value)


async def test_a_trace_asked_for_in_initialize_gets_a_line_per_generation(raw_client, tmp_path):
    """``trace`` in initialize (pygls honours only $/setTrace): one $/logTrace line per
    generation, saying what the prompt cost; "off" again with $/setTrace."""
    editor = await start_session(raw_client, tmp_path, "visual-studio-code", options={"maxNewTokens": 2},
                                 trace=types.TraceValue.Messages)
    first = await ask_chat(editor)
    (line,) = editor.traces
    assert line.startswith(f"StarChat: chat: prompt {first['promptTokens']} tokens (0 from the cache), 2 tokens in ")
    raw_client.protocol.notify(types.SET_TRACE, types.SetTraceParams(value=types.TraceValue.Off))
    await ask_chat(editor)
    assert len(editor.traces) == 1
