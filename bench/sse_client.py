"""A minimal HTTP/1.1 client over asyncio streams for the benchmarks' OpenAI sides.

Why not aiohttp/httpx: the GPU machine is offline and its image may lack them, and a few dozen
lines of stdlib keep the client's own cost small and the same for every HTTP side. One connection
per request (`Connection: close`), chunked or Content-Length bodies, SSE `data:` events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


class HttpError(Exception):
    """A non-2xx answer; the body is in the message."""


async def _request(host: str, port: int, method: str, path: str, body: bytes | None
                   ) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + (body or b""))
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, reader, writer


async def _body(headers: dict[str, str], reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def get_json(host: str, port: int, path: str) -> Any:
    status, headers, reader, writer = await _request(host, port, "GET", path, None)
    try:
        body = b"".join([piece async for piece in _body(headers, reader)])
    finally:
        writer.close()
    if status // 100 != 2:
        raise HttpError(f"GET {path}: {status} {body[:500]!r}")
    return json.loads(body)


async def post_sse(host: str, port: int, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST a JSON body and yield each SSE `data:` event as parsed JSON, until `[DONE]`."""
    status, headers, reader, writer = await _request(host, port, "POST", path, json.dumps(payload).encode())
    try:
        if status // 100 != 2:
            body = b"".join([piece async for piece in _body(headers, reader)])
            raise HttpError(f"POST {path}: {status} {body[:1000]!r}")
        buf = b""
        async for piece in _body(headers, reader):
            buf += piece.replace(b"\r\n", b"\n")
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield json.loads(data)
    finally:
        writer.close()
