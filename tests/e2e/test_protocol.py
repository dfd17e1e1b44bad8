"""LSP 3.17 rules and JSON-RPC framing, byte by byte over the real server's stdio."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lsp_server.testing.wire import frame, read_message

from .conftest import SERVER


class Raw:
    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.seen: list[dict] = []

    @classmethod
    async def start(cls, *extra: str) -> "Raw":
        process = await asyncio.create_subprocess_exec(
            *SERVER, *extra, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        return cls(process)

    def send_bytes(self, data: bytes) -> None:
        assert self.process.stdin
        self.process.stdin.write(data)

    def send(self, **message: Any) -> None:
        self.send_bytes(frame({"jsonrpc": "2.0", **message}))

    async def reply(self, msg_id: Any, timeout: float = 30) -> dict:
        assert self.process.stdin and self.process.stdout
        await self.process.stdin.drain()
        while True:
            message = await read_message(self.process.stdout, timeout)
            self.seen.append(message)
            if message.get("id") == msg_id and "method" not in message:
                return message

    async def initialize(self, **options: Any) -> None:
        self.send(id="init", method="initialize", params={"capabilities": {}, "initializationOptions": {"temperature": 0, **options}})
        assert "result" in await self.reply("init")
        self.send(method="initialized", params={})

    async def finish(self) -> int:
        if self.process.returncode is None:
            self.process.kill()
        return await self.process.wait()


@pytest.fixture
async def raw(test_model):
    session = await Raw.start()
    yield session
    await session.finish()


def no_internals(error: dict) -> None:
    text = json.dumps(error)
    assert "Traceback" not in text and "/work/" not in text and ".py" not in text


async def test_request_before_initialize_is_server_not_initialized(raw):
    raw.send(id=1, method="textDocument/hover", params={"textDocument": {"uri": "file:///a.py"}, "position": {"line": 0, "character": 0}})
    error = (await raw.reply(1))["error"]
    assert error["code"] == -32002
    no_internals(error)


async def test_second_initialize_and_requests_after_shutdown_are_invalid(raw):
    await raw.initialize()
    raw.send(id=2, method="initialize", params={"capabilities": {}})
    assert (await raw.reply(2))["error"]["code"] == -32600
    raw.send(id=3, method="shutdown")
    assert (await raw.reply(3))["result"] is None
    raw.send(id=4, method="starchat/chat", params={"messages": [{"role": "user", "content": "hi"}]})
    assert (await raw.reply(4))["error"]["code"] == -32600
    raw.send(method="exit")
    await raw.process.stdin.drain()
    assert await asyncio.wait_for(raw.process.wait(), 5) == 0


async def test_exit_without_shutdown_is_code_1(raw):
    await raw.initialize()
    raw.send(method="exit")
    await raw.process.stdin.drain()
    assert await asyncio.wait_for(raw.process.wait(), 5) == 1


async def test_closed_stdin_ends_the_server(raw):
    await raw.initialize()
    raw.process.stdin.close()
    assert await asyncio.wait_for(raw.process.wait(), 10) == 1


async def test_malformed_json_gets_a_parse_error_and_the_stream_goes_on(raw):
    await raw.initialize()
    body = b'{"jsonrpc": "2.0", "id": 5, "method": '
    raw.send_bytes(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    raw.send(id=6, method="textDocument/codeAction", params={"textDocument": {"uri": "file:///x.py"}, "range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "context": {"diagnostics": []}})
    reply = await raw.reply(6)
    parse_errors = [m for m in raw.seen if m.get("error", {}).get("code") == -32700]
    assert parse_errors and parse_errors[0]["id"] is None
    assert reply["error"]["code"] == -32803  # answered: the document is not open


async def test_bad_params_name_the_field_and_unknown_methods_are_not_found(raw):
    await raw.initialize()
    raw.send(id=7, method="textDocument/hover", params={"textDocument": {"uri": "file:///a.py"}})
    error = (await raw.reply(7))["error"]
    assert error["code"] == -32602 and "position" in error["message"]
    raw.send(id=8, method="starchat/nope", params={})
    assert (await raw.reply(8))["error"]["code"] == -32601


async def test_cancelling_unknown_or_twice_breaks_nothing(raw):
    await raw.initialize()
    raw.send(method="$/cancelRequest", params={"id": 12345})
    raw.send(method="$/cancelRequest", params={"id": 12345})
    raw.send(method="$/cancelRequest", params={"id": "nope"})
    raw.send(id=9, method="starchat/chat", params={"messages": [{"role": "user", "content": "Say hello."}]})
    assert "result" in await raw.reply(9, timeout=60)


async def test_header_variants_are_read(raw):
    body = json.dumps({"jsonrpc": "2.0", "id": 10, "method": "initialize", "params": {"capabilities": {}}}).encode()
    raw.send_bytes(b"content-type: application/vscode-jsonrpc; charset=utf-8\r\ncontent-length: " + str(len(body)).encode() + b"\r\nX-Extra: 1\r\n\r\n" + body)
    assert "result" in await raw.reply(10)
    raw.send(method="initialized", params={})
    body = json.dumps({"jsonrpc": "2.0", "id": 11, "method": "starchat/nope"}).encode()
    raw.send_bytes(b"CONTENT-LENGTH:" + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert (await raw.reply(11))["error"]["code"] == -32601


async def test_broken_headers_are_skipped_without_losing_what_follows(raw):
    await raw.initialize()
    raw.send_bytes(b"Content-Length: banana\r\n\r\n")
    raw.send_bytes(b"Content-Type: nothing-else\r\n\r\n")
    raw.send(id=12, method="starchat/nope")
    assert (await raw.reply(12))["error"]["code"] == -32601


async def test_a_message_over_the_cap_is_skipped_without_allocating_it(test_model):
    session = await Raw.start()
    try:
        await session.initialize(maxMessageBytes=4096)
        big = json.dumps({"jsonrpc": "2.0", "id": 13, "method": "starchat/nope", "params": {"x": "y" * 100_000}}).encode()
        session.send_bytes(f"Content-Length: {len(big)}\r\n\r\n".encode() + big)
        session.send(id=14, method="starchat/nope")
        assert (await session.reply(14))["error"]["code"] == -32601
        assert not any(m.get("id") == 13 for m in session.seen)
        # a claimed length far beyond the cap, with a short body: never allocated, the server lives on
        session.send_bytes(b"Content-Length: 99999999999\r\n\r\n{}")
        session.process.stdin.close()
        assert await asyncio.wait_for(session.process.wait(), 10) == 1
        assert b"MemoryError" not in await session.process.stderr.read()
    finally:
        await session.finish()


async def test_a_truncated_body_does_not_swallow_the_next_message(raw):
    await raw.initialize()
    cut = b'{"jsonrpc": "2.0", "id": 20, "method": "starchat/nope", "par'
    raw.send_bytes(f"Content-Length: {len(cut) + 60}\r\n\r\n".encode() + cut)  # claims more than it sends
    raw.send(id=21, method="starchat/nope")
    raw.send(id=22, method="starchat/nope")
    assert (await raw.reply(22))["error"]["code"] == -32601
    assert any(m.get("id") == 21 and m["error"]["code"] == -32601 for m in raw.seen)
    assert any(m.get("error", {}).get("code") == -32700 for m in raw.seen)


async def test_exit_mid_generation_is_prompt(raw):
    await raw.initialize()
    raw.send(id=1, method="starchat/chat", params={"messages": [{"role": "user", "content": "Count for ever."}], "maxNewTokens": 1500, "partialResultToken": "g"})
    while not any(m.get("method") == "$/progress" and m["params"]["token"] == "g" for m in raw.seen):
        raw.seen.append(await read_message(raw.process.stdout, 60))
    raw.send(id=2, method="shutdown")
    await raw.reply(2)
    raw.send(method="exit")
    await raw.process.stdin.drain()
    assert await asyncio.wait_for(raw.process.wait(), 5) == 0


async def test_a_50_mb_document_and_1000_edits_stay_responsive(raw):
    await raw.initialize()
    line = "x = 'a reasonably long line of python code here' + str(12345)\n"
    text = line * (50_000_000 // len(line))
    lines = text.count("\n")
    uri = "file:///tmp/big.py"
    raw.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})
    for version in range(2, 1002):
        at = {"line": lines - 3 if version % 2 else 7, "character": 2}
        raw.send(method="textDocument/didChange", params={"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"range": {"start": at, "end": at}, "text": "y"}]})
    started = asyncio.get_running_loop().time()
    end = {"line": lines - 3, "character": 0}
    raw.send(id=30, method="textDocument/codeAction", params={"textDocument": {"uri": uri}, "range": {"start": end, "end": end}, "context": {"diagnostics": []}})
    reply = await raw.reply(30, timeout=120)
    fix = reply["result"][0]  # without resolve support the edit comes through a command
    assert len(reply["result"]) >= 5 and fix["command"]["arguments"][0]["version"] == 1001
    assert asyncio.get_running_loop().time() - started < 60  # pygls's own store needs ~4 minutes for these edits


async def test_a_frame_with_a_too_short_length_or_junk_loses_nothing_after_it(raw):
    await raw.initialize()
    body = json.dumps({"jsonrpc": "2.0", "id": 40, "method": "starchat/nope"}).encode()
    raw.send_bytes(f"Content-Length: {len(body) - 10}\r\n\r\n".encode() + body)  # its last 10 bytes have no line break
    raw.send(id=41, method="starchat/nope")
    raw.send_bytes(b"junk without a header or a line break")
    raw.send(id=42, method="starchat/nope")
    raw.send(id=43, method="starchat/nope")
    assert (await raw.reply(43, timeout=15))["error"]["code"] == -32601
    assert {41, 42} <= {m.get("id") for m in raw.seen if m.get("error", {}).get("code") == -32601}


async def test_incremental_changes_in_utf8_columns_when_the_client_offers_only_utf8(raw):
    raw.send(id="init", method="initialize", params={"capabilities": {"general": {"positionEncodings": ["utf-8"]}}, "initializationOptions": {"temperature": 0, "hoverMaxNewTokens": 2}})
    assert (await raw.reply("init"))["result"]["capabilities"]["positionEncoding"] == "utf-8"
    raw.send(method="initialized", params={})
    uri = "file:///tmp/enc.py"
    raw.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "é = 1\n"}})
    # "é" is two bytes: "1" is at UTF-8 columns 5-6 (at 4-5 in UTF-16)
    one = {"start": {"line": 0, "character": 5}, "end": {"line": 0, "character": 6}}
    raw.send(method="textDocument/didChange", params={"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"range": one, "text": "area"}]})
    # the text is now "é = area": the identifier under UTF-8 column 7 spans columns 5-9
    raw.send(id=1, method="textDocument/hover", params={"textDocument": {"uri": uri}, "position": {"line": 0, "character": 7}})
    hover = (await raw.reply(1, timeout=60))["result"]
    assert hover["range"] == {"start": {"line": 0, "character": 5}, "end": {"line": 0, "character": 9}}


async def test_ask_and_edit_actions_are_offered_to_clients_that_run_their_commands(raw, tmp_path):
    """"StarChat: Ask…" and "StarChat: Edit…" need a question or an instruction from the user:
    commands the client runs (starchat.askQuestion, starchat.editSelection), offered only to a
    client that declares them, with the selection and the version it was listed on."""
    raw.send(id="init", method="initialize", params={"capabilities": {"experimental": {"starchat": {"askQuestion": True, "editSelection": True}}}})
    kinds = (await raw.reply("init"))["result"]["capabilities"]["codeActionProvider"]["codeActionKinds"]
    assert "refactor.rewrite.starchat.edit" in kinds
    raw.send(method="initialized", params={})
    uri = (tmp_path / "calc.py").as_uri()
    raw.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    return 1\n"}})
    selection = {"start": {"line": 0, "character": 0}, "end": {"line": 2, "character": 0}}

    async def listed(msg_id, only=None):
        context = {"diagnostics": [], **({"only": only} if only else {})}
        raw.send(id=msg_id, method="textDocument/codeAction", params={"textDocument": {"uri": uri}, "range": selection, "context": context})
        return (await raw.reply(msg_id))["result"]

    actions = await listed(1)
    assert [a["title"] for a in actions][-2:] == ["StarChat: Ask…", "StarChat: Edit…"]
    args = [{"textDocument": {"uri": uri}, "range": selection, "version": 1}]
    assert actions[-1] == {"title": "StarChat: Edit…", "kind": "refactor.rewrite.starchat.edit",
                           "command": {"title": "StarChat: Edit…", "command": "starchat.editSelection", "arguments": args}}
    assert actions[-2]["command"] == {"title": "StarChat: Ask…", "command": "starchat.askQuestion", "arguments": args}
    assert [a["title"] for a in await listed(2, ["refactor.rewrite"])] == ["StarChat: Optimize", "StarChat: Document", "StarChat: Edit…"]

    # a client that does not declare them is not offered them
    other = await Raw.start()
    try:
        await other.initialize()
        other.send(method="textDocument/didOpen", params={"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = 1\n"}})
        other.send(id=1, method="textDocument/codeAction", params={"textDocument": {"uri": uri}, "range": selection, "context": {"diagnostics": []}})
        titles = [a["title"] for a in (await other.reply(1))["result"]]
        assert "StarChat: Explain" in titles and not {"StarChat: Ask…", "StarChat: Edit…"} & set(titles)
    finally:
        await other.finish()
