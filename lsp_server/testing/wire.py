"""Raw JSON-RPC framing for tests and benchmarks that talk to the server byte by byte."""

from __future__ import annotations

import asyncio
import json
from typing import Any


def frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def read_message(stream: asyncio.StreamReader, timeout: float = 60) -> dict[str, Any]:
    """One framed message; the stream must hold nothing but frames."""
    header = await asyncio.wait_for(stream.readuntil(b"\r\n\r\n"), timeout)
    fields = dict(line.split(b": ", 1) for line in header.strip().split(b"\r\n"))
    length = int(next(v for k, v in fields.items() if k.lower() == b"content-length"))
    return json.loads(await asyncio.wait_for(stream.readexactly(length), timeout))
