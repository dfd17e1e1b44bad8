"""Random and mutated frames into the server's reader and protocol: no crash, no hang, and the
server still answers a valid request afterwards."""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsp_server.setup import create_server
from lsp_server.testing.wire import frame
from lsp_server.transport import StreamReaderAdapter, serve

SEEDS = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}},
    {"jsonrpc": "2.0", "id": 2, "method": "textDocument/hover", "params": {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 0, "character": 0}}},
    {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {"uri": "file:///a.py", "languageId": "python", "version": 1, "text": "x = 1\n"}}},
    {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 2}},
    {"jsonrpc": "2.0", "id": 3, "method": "starchat/chat", "params": {"messages": "nope"}},
    {"jsonrpc": "2.0", "id": 4, "method": "textDocument/codeAction", "params": {"textDocument": {"uri": "file:///a.py"}, "range": {"start": {"line": 9, "character": 0}, "end": {"line": 0, "character": 0}}, "context": {"diagnostics": []}}},
]


class Capture:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        pass


def mutate(raw: bytes, cuts: list[int], junk: bytes) -> bytes:
    for cut in cuts:
        if raw:
            at = cut % len(raw)
            raw = raw[:at] + junk + raw[at + 1 :]
    return raw


frames = st.builds(
    mutate,
    st.sampled_from([frame(s) for s in SEEDS]),
    st.lists(st.integers(0, 10_000), max_size=3),
    st.binary(max_size=6),
)
chunks = st.lists(st.one_of(frames, st.binary(max_size=64), st.sampled_from([b"Content-Length: 5\r\n\r\n", b"\r\n\r\n", b"content-length: -1\r\n\r\n"])), max_size=8)


async def feed(protocol, data: bytes) -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    await asyncio.wait_for(serve(protocol, StreamReaderAdapter(stream), lambda: 1 << 20), 5)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks)
def test_random_frames_never_crash_or_hang(parts):
    server = create_server()
    writer = Capture()
    server.protocol.set_writer(writer)

    async def scenario() -> None:
        await feed(server.protocol, b"".join(parts))
        # the protocol still answers a valid request on a fresh stream
        writer.data = b""
        await feed(server.protocol, frame({"jsonrpc": "2.0", "id": "probe", "method": "starchat/unknown"}))
        await asyncio.sleep(0)

    try:
        asyncio.run(scenario())
    finally:
        server.close()
    replies = [json.loads(part[part.index(b"{"):]) for part in writer.data.split(b"Content-Length")[1:]]
    assert any(r.get("id") == "probe" and "error" in r for r in replies)


# ---- one bad frame loses nothing after it, on the same stream -------------------------------


def short_frame(payload: dict, cut: int) -> bytes:
    """A frame whose Content-Length is shorter than its body: the rest of the body has no line
    break and runs into the next frame's header."""
    body = json.dumps(payload).encode()
    return f"Content-Length: {cut % len(body)}\r\n\r\n".encode() + body


bad_frames = st.lists(
    st.one_of(
        st.builds(short_frame, st.sampled_from(SEEDS), st.integers(0, 10_000)),
        st.binary(max_size=64).filter(lambda junk: b"content-length" not in junk.lower()),  # junk without a header
        st.sampled_from([frame(s) for s in SEEDS]),
        st.sampled_from([b"Content-Length: banana\r\n\r\n", b"Content-Type: x\r\n\r\n{}", b'"id": 9}\r\n\r\n', b"\r\n\r\n"]),
    ),
    min_size=1,
    max_size=6,
)

PROBES = [{"jsonrpc": "2.0", "id": f"probe{i}", "method": "starchat/unknown"} for i in (1, 2)]


def answered(data: bytes) -> set:
    replies = [json.loads(part[part.index(b"{"):]) for part in data.split(b"Content-Length")[1:]]
    return {r.get("id") for r in replies if "error" in r}


def run_stream(data: bytes) -> bytes:
    server = create_server()
    writer = Capture()
    server.protocol.set_writer(writer)

    async def scenario() -> None:
        await feed(server.protocol, data)
        await asyncio.sleep(0)

    try:
        asyncio.run(scenario())
    finally:
        server.close()
    return writer.data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_frames)
def test_after_bad_frames_the_next_requests_on_the_same_stream_are_answered(parts):
    data = run_stream(b"".join(parts) + b"".join(frame(p) for p in PROBES))
    assert {"probe1", "probe2"} <= answered(data)


def test_a_too_short_length_or_junk_loses_no_later_frame():
    body = json.dumps({"jsonrpc": "2.0", "id": "cut", "method": "starchat/unknown", "params": {"note": "content-length: 3"}}).encode()
    for bad in (
        f"Content-Length: {len(body) // 2}\r\n\r\n".encode() + body,  # the rest, quoted header included, runs into the next header
        b"junk without a header",
        f"content-length: {len(body) - 1}\r\n\r\n".encode() + body,  # one byte short, lowercase
        b"x" * 100_000 + f"\r\n\r\nCONTENT-LENGTH: {len(body) - 9}\r\n\r\n".encode() + body,  # a line over the reader's limit first
        b"y" * 100_000,  # over the limit, and the next header on the same line
    ):
        data = run_stream(bad + b"".join(frame(p) for p in PROBES))
        assert {"probe1", "probe2"} <= answered(data), bad[:60]


async def test_a_reply_nobody_waits_for_any_more_is_dropped():
    """The client's reply to a server request the server stopped waiting for (a chat cancelled
    while it asked for a progress token) is dropped; pygls raised InvalidStateError on it."""
    from concurrent.futures import Future

    protocol = create_server().protocol
    gone = Future()
    gone.cancel()
    protocol._request_futures["create-1"] = gone
    protocol.handle_message(protocol.structure_message({"jsonrpc": "2.0", "id": "create-1", "result": None}))
    assert "create-1" not in protocol._request_futures
    waiting = Future()
    protocol._request_futures["create-2"] = waiting
    protocol.handle_message(protocol.structure_message({"jsonrpc": "2.0", "id": "create-2", "result": 7}))
    assert waiting.result(0) == 7
