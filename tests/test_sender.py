"""The worker's coalescing writer (sender.py) and the client's shared reply inbox (inbox.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tests.helpers import until
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated
from workers.runtime.sender import ACK, END, KEEPALIVE, SEQ_HEADER, Sender, merge_into


class RecordingNats:
    """Stands in for the connection in unit tests of the writer's order: records (subject, payload), and
    checks that each stream's messages are numbered 0, 1, 2... (the Seq header)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.seq: dict[str, int] = {}

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        assert headers is not None and int(headers[SEQ_HEADER]) == self.seq.get(subject, 0), (subject, headers)
        self.seq[subject] = self.seq.get(subject, 0) + 1
        self.sent.append((subject, payload))


def test_merge_concatenates_text_and_extends_token_ids() -> None:
    acc: dict[str, Any] = {"text": "Hel", "token_ids": [1]}
    assert merge_into(acc, {"text": "lo", "token_ids": [2, 3]})
    assert merge_into(acc, {"text": "!", "token_ids": [4], "finish_reason": "stop", "prompt_tokens": 7})
    assert acc == {"text": "Hello!", "token_ids": [1, 2, 3, 4], "finish_reason": "stop", "prompt_tokens": 7}
    assert not merge_into(acc, {"text": "x", "token_ids": [5]})  # nothing merges after the final chunk
    assert not merge_into({"i": 1}, {"i": 2})  # not token deltas: each stays a message of its own


def test_first_tokens_go_before_other_streams_output() -> None:
    async def run() -> list[tuple[str, bytes]]:
        nc = RecordingNats()
        sender = Sender(nc, keepalive_interval=60)  # type: ignore[arg-type]
        busy = [sender.open(f"busy.{k}") for k in range(20)]
        for box in busy:
            box.put({"text": "a", "token_ids": [1]})
        await sender.drain()
        nc.sent.clear()
        for box in busy:  # one engine step: every running stream has a delta ...
            box.put({"text": "b", "token_ids": [2]})
        new = sender.open("new")  # ... and a new request its first token
        new.put({"text": "first", "token_ids": [9]})
        await sender.drain()
        await sender.close()
        return nc.sent

    sent = asyncio.run(run())
    subjects = [s for s, _ in sent]
    assert subjects[:2] == ["new", "new"]  # its ack, then its first token, before any busy stream's delta
    assert sorted(subjects[2:]) == sorted(f"busy.{k}" for k in range(20))
    assert [Annotated.decode(p).data for s, p in sent if s == "new"] == [None, {"text": "first", "token_ids": [9]}]


def test_backlog_is_coalesced_in_order_and_closed_by_end() -> None:
    async def run() -> list[bytes]:
        nc = RecordingNats()
        sender = Sender(nc, keepalive_interval=60)  # type: ignore[arg-type]
        box = sender.open("r")
        given = [{"text": str(k % 10), "token_ids": [k]} for k in range(50)]
        for item in given:  # the engine ran ahead: nothing was sent meanwhile
            box.put(item)
        box.put_raw(Annotated.error("boom").encode())
        box.end()
        await sender.drain()
        await sender.close()
        assert given == [{"text": str(k % 10), "token_ids": [k]} for k in range(50)]  # the handler's dicts untouched
        return [p for _, p in nc.sent]

    payloads = asyncio.run(run())
    assert payloads[0] == ACK and payloads[-1] == END
    data = Annotated.decode(payloads[1]).data
    assert data["token_ids"] == list(range(50)) and data["text"] == "0123456789" * 5
    assert Annotated.decode(payloads[2]).is_error() and len(payloads) == 4


def test_quiet_stream_gets_keepalives() -> None:
    async def run() -> list[bytes]:
        nc = RecordingNats()
        sender = Sender(nc, keepalive_interval=0.05)  # type: ignore[arg-type]
        sender.open("slow")
        with contextlib.suppress(AssertionError):  # the assertion below says what is missing
            await until(lambda: KEEPALIVE in [p for _, p in nc.sent], 10, "a keepalive", every=0.01)
        await sender.close()
        return [p for _, p in nc.sent]

    assert KEEPALIVE in asyncio.run(run())


def test_many_streams_share_one_connection_without_cross_talk(services) -> None:  # type: ignore[no-untyped-def]
    """64 concurrent requests over one client connection: each gets exactly its own tokens, in order."""

    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        for k in range(req["n"]):
            yield {"text": f"{req['id']}:{k} ", "token_ids": [req["id"] * 1000 + k]}
            if k % 3 == 0:
                await asyncio.sleep(0)

    async def run() -> list[tuple[int, list[int], str]]:
        nc_w = await requestplane.connect(services.nats, "w")
        server = requestplane.EndpointServer(nc_w, "t9.c.generate", "t9.c.generate.1", handler)
        await server.start()
        nc = await requestplane.connect(services.nats, "c")

        async def one(i: int) -> tuple[int, list[int], str]:
            ids: list[int] = []
            text = ""
            async for a in requestplane.stream(nc, "t9.c.generate", {"id": i, "n": 40}, idle_timeout=10):
                assert not a.is_error(), a
                ids += a.data["token_ids"]
                text += a.data["text"]
            return i, ids, text

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await server.stop()
            await nc.close()
            await nc_w.close()

    for i, ids, text in asyncio.run(run()):
        assert ids == [i * 1000 + k for k in range(40)]
        assert text == "".join(f"{i}:{k} " for k in range(40))


def test_merged_deltas_keep_one_logprob_per_token() -> None:
    from workers.runtime.sender import merge_into

    acc = {"text": "a", "token_ids": [1], "logprobs": [{"token": "a", "logprob": -0.1, "top": []}]}
    assert merge_into(acc, {"text": "b", "token_ids": [2], "logprobs": [{"token": "b", "logprob": -0.2, "top": []}]})
    assert acc["text"] == "ab" and acc["token_ids"] == [1, 2]
    assert [e["token"] for e in acc["logprobs"]] == ["a", "b"]
