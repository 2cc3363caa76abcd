"""The request plane over a real nats-server: streams, errors, and never hanging on a dead worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import pytest

from tests.helpers import until
from workers.common.protocol import GenerateRequest
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated, ErrorCode, StreamError, instance_lost, retryable
from workers.runtime.registry import Registration, Registry, components_prefix


def test_annotated_prints_like_the_seed() -> None:
    assert repr(Annotated(data=" Well")) == "Annotated(data=' Well', event=None, comment=[], id=None)"


def test_annotated_roundtrip() -> None:
    a = Annotated(data={"text": "x", "token_ids": [1, 2]}, event=None, comment=["c"], id="7")
    assert Annotated.decode(a.encode()) == a
    assert Annotated.error("boom").is_error()
    err = Annotated.error("gone", code=ErrorCode.SILENT)
    assert Annotated.decode(err.encode()) == err and Annotated.decode(err.encode()).code == ErrorCode.SILENT
    assert repr(err) == "Annotated(data=None, event='error', comment=['gone'], id=None)"


def test_retry_only_before_the_first_token_and_only_for_a_lost_worker() -> None:
    lost = {ErrorCode.NO_RESPONDERS, ErrorCode.NO_ANSWER, ErrorCode.SILENT, ErrorCode.SHUTTING_DOWN,
            ErrorCode.WORKER_LOST, ErrorCode.ENGINE_DEAD, ErrorCode.MESSAGES_LOST}
    for code in ErrorCode:
        assert instance_lost(code) == (code in lost), code
        assert retryable(code, tokens_sent=False) == (code in lost), code
        assert not retryable(code, tokens_sent=True), code
    assert not retryable(None, tokens_sent=False)
    assert not retryable("some-future-code", tokens_sent=False)


def test_generate_request_needs_exactly_one_input() -> None:
    with pytest.raises(ValueError):
        GenerateRequest()
    with pytest.raises(ValueError):
        GenerateRequest(prompt="a", token_ids=[1])
    assert GenerateRequest(token_ids=[1, 2]).token_ids == [1, 2]


async def _serve(nats: str, subject: str, handler: Any) -> tuple[Any, requestplane.EndpointServer]:
    nc = await requestplane.connect(nats, "test-worker")
    server = requestplane.EndpointServer(nc, subject, subject + ".1", handler)
    await server.start()
    return nc, server


def test_a_server_answers_a_request_sent_the_moment_its_start_returns(services) -> None:  # type: ignore[no-untyped-def]
    """What registering right after `start` relies on: the NATS server has the subscriptions by then, so a
    request sent at once (here nats-py's own request, which fails on no_responders) finds a subscriber.
    With nats-py's single flush, about 1 in 10 fresh servers was not subscribed yet
    (requestplane.flush_subscriptions)."""
    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"served": True}

    async def run() -> list[str]:
        nc = await requestplane.connect(services.nats, "c")
        missed = []
        try:
            for i in range(100):
                subject = f"t-live{i}.c.generate"
                nc_w, server = await _serve(services.nats, subject, handler)
                try:
                    await nc.request(subject + ".1", b"{}", timeout=5)  # its first reply: the worker's ack
                except nats.errors.NoRespondersError:
                    missed.append(subject)
                finally:
                    await server.stop()
                    await nc_w.close()
        finally:
            await nc.close()
        return missed

    assert asyncio.run(run()) == []


def test_stream_delivers_items_in_order_then_ends(services) -> None:  # type: ignore[no-untyped-def]
    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        for i in range(req["n"]):
            yield {"i": i}

    async def run() -> list[Annotated]:
        nc_w, server = await _serve(services.nats, "t1.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        try:
            return [a async for a in requestplane.stream(nc, "t1.c.generate", {"n": 5}, idle_timeout=2)]
        finally:
            await server.stop()
            await nc.close()
            await nc_w.close()

    items = asyncio.run(run())
    assert [a.data for a in items] == [{"i": i} for i in range(5)]


def test_handler_exception_becomes_error_event(services) -> None:  # type: ignore[no-untyped-def]
    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"ok": 1}
        raise ValueError("model exploded")

    async def run() -> list[Annotated]:
        nc_w, server = await _serve(services.nats, "t2.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        try:
            return [a async for a in requestplane.stream(nc, "t2.c.generate", {}, idle_timeout=2)]
        finally:
            await server.stop()
            await nc.close()
            await nc_w.close()

    items = asyncio.run(run())
    assert items[0].data == {"ok": 1}
    assert items[-1].is_error() and "model exploded" in items[-1].comment[0]
    assert items[-1].code == ErrorCode.WORKER_ERROR


def test_handler_passes_on_a_typed_error(services) -> None:  # type: ignore[no-untyped-def]
    """A router relays its worker's failure with the worker's code, so its own caller decides alike."""
    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        raise StreamError("worker w1: no worker serves x", code=ErrorCode.NO_RESPONDERS)
        yield {}

    async def run() -> list[Annotated]:
        nc_w, server = await _serve(services.nats, "t2b.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        try:
            return [a async for a in requestplane.stream(nc, "t2b.c.generate", {}, idle_timeout=2)]
        finally:
            await server.stop()
            await nc.close()
            await nc_w.close()

    (item,) = asyncio.run(run())
    assert item.is_error() and item.code == ErrorCode.NO_RESPONDERS and "w1" in item.comment[0]


def test_nobody_serving_is_an_error_not_a_hang(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> list[Annotated]:
        nc = await requestplane.connect(services.nats, "c")
        try:
            return [a async for a in requestplane.stream(nc, "t3.nobody.generate", {}, idle_timeout=1)]
        finally:
            await nc.close()

    (item,) = asyncio.run(run())
    assert item.is_error() and "no worker serves t3.nobody.generate" in item.comment[0]
    assert item.code == ErrorCode.NO_RESPONDERS


async def stream_from(nats: str, subject: str, answer: Any, idle_timeout: float) -> list[Annotated]:
    """What a client streams from `subject`, where a scripted subscriber runs `answer(its_connection, msg)`."""
    nc_w = await requestplane.connect(nats, "scripted")

    async def on_msg(msg: Any) -> None:
        await answer(nc_w, msg)

    await nc_w.subscribe(subject, cb=on_msg)
    await requestplane.flush_subscriptions(nc_w)
    nc = await requestplane.connect(nats, "c")
    try:
        return [a async for a in requestplane.stream(nc, subject, {}, idle_timeout=idle_timeout)]
    finally:
        await nc.close()
        await nc_w.close()


def test_a_subscriber_that_never_acks_is_no_answer(services) -> None:  # type: ignore[no-untyped-def]
    """Something holds the subject but never answers (a wedged process): NO_ANSWER after the idle timeout."""
    async def ignore(nc_w: Any, msg: Any) -> None:
        return None

    async def run() -> list[Annotated]:
        return await stream_from(services.nats, "t3b.c.generate", ignore, idle_timeout=1)

    (item,) = asyncio.run(run())
    assert item.is_error() and item.code == ErrorCode.NO_ANSWER and "no worker answered" in item.comment[0]


def test_a_gap_in_the_streams_numbers_is_messages_lost_not_a_shorter_answer(services) -> None:  # type: ignore[no-untyped-def]
    """Core NATS drops what is published while the receiver's subscription is gone (a NATS restart): the
    stream must say so (a code the frontend migrates on), not stream on with tokens missing."""
    from workers.runtime.sender import ACK, SEQ_HEADER

    async def answer(nc_w: Any, msg: Any) -> None:  # message 2 never arrives
        for seq, payload in ((0, ACK), (1, Annotated(data={"token_ids": [1]}).encode()),
                             (3, Annotated(data={"token_ids": [3]}).encode())):
            await nc_w.publish(msg.reply, payload, headers={SEQ_HEADER: str(seq)})

    async def run() -> list[Annotated]:
        return await stream_from(services.nats, "t3g.c.generate", answer, idle_timeout=5)

    first, lost = asyncio.run(run())
    assert first.data == {"token_ids": [1]}
    assert lost.is_error() and lost.code == ErrorCode.MESSAGES_LOST and "2..2" in lost.comment[0]
    assert instance_lost(lost.code), "the frontend continues such a stream elsewhere"


def test_invalid_request_is_bad_request(services) -> None:  # type: ignore[no-untyped-def]
    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        GenerateRequest.model_validate(req)
        yield {"never": True}

    async def run() -> list[Annotated]:
        nc_w, server = await _serve(services.nats, "t3c.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        try:
            return [a async for a in requestplane.stream(nc, "t3c.c.generate", {"prompt": "a", "token_ids": [1]},
                                                         idle_timeout=2)]
        finally:
            await server.stop()
            await nc.close()
            await nc_w.close()

    (item,) = asyncio.run(run())
    assert item.is_error() and item.code == ErrorCode.BAD_REQUEST
    assert not retryable(item.code, tokens_sent=False)


def test_worker_stopping_mid_request_is_shutting_down(services) -> None:  # type: ignore[no-untyped-def]
    started = asyncio.Event()

    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        started.set()
        await asyncio.sleep(3600)
        yield {"never": True}

    async def run() -> list[Annotated]:
        nc_w, server = await _serve(services.nats, "t3d.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        items: list[Annotated] = []

        async def consume() -> None:
            async for a in requestplane.stream(nc, "t3d.c.generate", {}, idle_timeout=2):
                items.append(a)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        await server.stop()
        await asyncio.wait_for(task, 10)
        await nc.close()
        await nc_w.close()
        return items

    (item,) = asyncio.run(run())
    assert item.is_error() and item.code == ErrorCode.SHUTTING_DOWN
    assert retryable(item.code, tokens_sent=False)


def test_worker_dying_mid_stream_gives_an_error(services) -> None:  # type: ignore[no-untyped-def]
    """The worker's connection vanishes after one item (as with kill -9): the client errors, it does not hang."""
    first_received = asyncio.Event()

    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"first": True}
        await asyncio.sleep(3600)
        yield {"never": True}

    async def run() -> tuple[list[Annotated], float]:
        nc_w, server = await _serve(services.nats, "t4.c.generate", handler)
        nc = await requestplane.connect(services.nats, "c")
        items: list[Annotated] = []

        async def consume() -> None:
            async for a in requestplane.stream(nc, "t4.c.generate", {}, idle_timeout=1.5):
                items.append(a)
                first_received.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_received.wait(), timeout=30)  # the worker's sends are asynchronous
        # Kill the worker's side without any goodbye: close its socket, stop its tasks silently.
        for t in list(server._tasks):  # a crash: the stream stops with no error and no end marker
            t.cancel()
        nc_w._transport.close()
        t0 = time.monotonic()
        await asyncio.wait_for(task, timeout=30)
        await nc.close()
        return items, time.monotonic() - t0

    items, waited = asyncio.run(run())
    assert items[0].data == {"first": True}
    assert items[-1].is_error() and "went silent" in items[-1].comment[0]
    assert items[-1].code == ErrorCode.SILENT
    assert waited < 30


def test_registration_lives_under_a_lease(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[list[Registration], list[Registration]]:
        reg_side = await Registry.connect([services.etcd])
        reader = await Registry.connect([services.etcd])
        try:
            reg = Registration(namespace="t5", component="c", endpoint="generate", subject="t5.c.generate",
                               process="w", model="m")
            await reg_side.register(reg, ttl=5)
            before = await reader.list("t5")
            await reg_side.close()  # revokes: gone at once, not after the TTL
            after = await reader.list("t5")
            return before, after
        finally:
            await reader.close()

    before, after = asyncio.run(run())
    assert len(before) == 1 and before[0].process == "w" and before[0].lease_id
    assert before[0].subject == "t5.c.generate"
    assert after == []
    assert components_prefix("ns", "c") == "ns/components/c/"


@pytest.mark.parametrize("via", ["shared subject", "instance subject", "cancel before the request arrives"])
def test_a_caller_that_leaves_cancels_the_workers_stream(services, via: str) -> None:  # type: ignore[no-untyped-def]
    """The handler's generator is closed (where the engine request is aborted) once the caller stops
    reading, whichever subject it called, and a request cancelled before it arrives never runs."""
    subject = f"test.cancel{abs(hash(via))}.generate"
    closed = asyncio.Event()
    started: list[str] = []

    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        started.append(req["id"])
        try:
            for i in range(10_000):
                yield {"i": i}
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def run() -> None:
        nc, server = await _serve(services.nats, subject, handler)
        client = await requestplane.connect(services.nats, "test-client")
        try:
            if via == "cancel before the request arrives":
                await client.publish(requestplane.cancel_subject(subject), b"_INBOX.gone.1")
                await until(lambda: "_INBOX.gone.1" in server._cancelled_early, 5,
                            "the cancel is remembered before its request comes")
                await client.publish(subject, b'{"id": "late"}', reply="_INBOX.gone.1")
                # A request sent after it on the same subject runs only once the late one was handled.
                probe = requestplane.stream(client, subject, {"id": "probe"}, idle_timeout=5)
                assert not (await anext(probe)).is_error()
                await probe.aclose()
                assert started == ["probe"]
                return
            target = subject if via == "shared subject" else subject + ".1"
            got = 0
            gen = requestplane.stream(client, target, {"id": via}, idle_timeout=5)
            async for item in gen:
                assert not item.is_error(), item
                got += 1
                if got == 3:
                    break
            await gen.aclose()
            await asyncio.wait_for(closed.wait(), 5)
            await until(lambda: server.in_flight == 0, 5, "the server to count the request done", every=0.01)
        finally:
            await server.stop()
            await nc.close()
            await client.close()

    asyncio.run(run())


# ---- handoff: a router's stream handed to the worker it chose -------------------------------------------
def test_a_handed_off_stream_is_the_workers_from_then_on(services) -> None:  # type: ignore[no-untyped-def]
    """The caller reads the worker's chunks (numbered from 0 again) with the routing on the final one; the
    router's loss after the handoff does not end the stream, the worker's does, at once; a caller that
    leaves cancels on the worker; the worker reports the end to the router's inbox, however it ends."""
    release = asyncio.Event()
    aborted: list[str] = []

    async def worker(req: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            yield {"text": " Par", "token_ids": [1]}
            if req["mode"] == "finish":
                yield {"text": "is", "token_ids": [2], "finish_reason": "stop"}
                return
            await release.wait()
        except asyncio.CancelledError:
            aborted.append(req["mode"])
            raise

    async def router(req: dict[str, Any]) -> AsyncIterator[Any]:
        forwarded = {**req, requestplane.ROUTED: {"by": ends_inbox, "id": req["id"]}}
        yield requestplane.Handoff(0x77, "th.backend.generate.77", forwarded, {"process": "w"})

    async def run() -> dict[str, Any]:
        nc_w, w_server = await _serve(services.nats, "th.backend.generate.77", worker)
        nc_r, r_server = await _serve(services.nats, "th.preprocess.generate", router)
        ends: list[int] = []
        firsts: list[int] = []

        async def on_end(msg: Any) -> None:
            rid, first = requestplane.parse_routed_report(msg.data)
            (firsts if first else ends).append(rid)

        await nc_r.subscribe(ends_inbox, cb=on_end)
        nc = await requestplane.connect(services.nats, "caller")
        tracker = requestplane.StreamTracker()
        out: dict[str, Any] = {}
        try:
            out["finished"] = [a async for a in requestplane.stream(nc, "th.preprocess.generate",
                                                                    {"mode": "finish", "id": 1}, 2, tracker, 0x99)]
            # Lost router (after the handoff): nothing happens; lost worker: the stream ends now.
            handed: list[dict[str, Any]] = []
            held = requestplane.stream(nc, "th.preprocess.generate", {"mode": "hold", "id": 2}, 30, tracker, 0x99,
                                       on_handoff=handed.append)
            first = await anext(held)
            await until(lambda: w_server.routed_in_flight() == {ends_inbox: [2]}, 5, "the worker lists it")
            assert tracker.lost(0x99, "router killed") == 0
            assert tracker.lost(0x77, "worker killed") == 1
            t0 = time.monotonic()
            out["lost"] = [first, *[a async for a in held]]
            out["lost_after_s"] = time.monotonic() - t0
            out["handed"] = handed
            # A caller that leaves: the cancel reaches the worker (not the router that handed off).
            left = requestplane.stream(nc, "th.preprocess.generate", {"mode": "leave", "id": 3}, 30)
            await anext(left)
            await left.aclose()
            await until(lambda: "leave" in aborted, 5, "the worker's stream cancelled")
            await until(lambda: len(ends) == 3, 5, "three end reports")
            out["ends"] = sorted(ends)
            out["firsts"] = sorted(firsts)
            out["in_flight"] = w_server.routed_in_flight()
            release.set()
            return out
        finally:
            await nc.close()
            for server, conn in ((w_server, nc_w), (r_server, nc_r)):
                await server.stop()
                await conn.close()

    ends_inbox = "_INBOX.th-router.ends"
    out = asyncio.run(run())
    data = [a.data for a in out["finished"]]
    assert "".join(d["text"] for d in data) == " Paris" and data[-1]["finish_reason"] == "stop"
    assert data[-1]["routing"] == {"process": "w"}
    assert [a.data for a in out["lost"][:1]] == [{"text": " Par", "token_ids": [1]}]
    assert out["lost"][-1].is_error() and out["lost"][-1].code == ErrorCode.WORKER_LOST
    assert out["lost_after_s"] < 2  # not the 30 s idle timeout
    assert out["handed"] == [{"instance": 0x77, "subject": "th.backend.generate.77", "routing": {"process": "w"}}]
    assert out["ends"] == [1, 2, 3] and out["in_flight"] == {}
    # Each request's first message was reported once (its prefill done): all three streamed one.
    assert out["firsts"] == [1, 2, 3]


def test_a_handoff_that_names_nobody_is_an_error(services) -> None:  # type: ignore[no-untyped-def]
    async def answer(nc_w: Any, msg: Any) -> None:
        await nc_w.publish(msg.reply, Annotated(event="handoff", data={"subject": 3}).encode(),
                           headers={"Seq": "0"})

    items = asyncio.run(stream_from(services.nats, "th2.c.generate", answer, idle_timeout=2))
    assert len(items) == 1 and items[0].is_error() and items[0].code == ErrorCode.WORKER_ERROR
    assert "without saying to whom" in items[0].comment[0]


def test_a_cancel_that_reaches_the_router_after_its_handoff_is_passed_on(services) -> None:  # type: ignore[no-untyped-def]
    """The caller left before it read the handoff, so it cancelled on the router's subject: the router passes
    the cancel on to the worker it handed the stream to, which stops instead of generating for nobody."""
    aborted = asyncio.Event()

    async def worker(req: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            yield {"text": " Par", "token_ids": [1]}
            await asyncio.Event().wait()  # generates until cancelled
        except asyncio.CancelledError:
            aborted.set()
            raise

    async def router(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield requestplane.Handoff(0x78, "tc.backend.generate.78", req)

    async def run() -> None:
        nc_w, w_server = await _serve(services.nats, "tc.backend.generate.78", worker)
        nc_r, r_server = await _serve(services.nats, "tc.preprocess.generate", router)
        nc = await requestplane.connect(services.nats, "caller")
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("tc.preprocess.generate", b"{}", reply=inbox)
            while Annotated.decode((await sub.next_msg(5)).data).event != "handoff":
                pass
            await nc.publish(requestplane.cancel_subject("tc.preprocess.generate"), inbox.encode())
            await asyncio.wait_for(aborted.wait(), 5)  # else it would generate for nobody
            await until(lambda: w_server.in_flight == 0, 5, "the worker's stream to end")
        finally:
            await nc.close()
            for server, conn in ((w_server, nc_w), (r_server, nc_r)):
                await server.stop()
                await conn.close()

    asyncio.run(run())
    assert aborted.is_set()
