"""etcd registry: a worker's registration lives under a lease, so it vanishes when the worker does.

Key: `{namespace}/components/{component}/{endpoint}:{instance_id:x}`; value: Registration as JSON.
The launcher reads the same records to decide readiness, which is why this module is the one
definition of a registration for both sides.

A worker's identity (`instance_id`: the key, its per-instance NATS subject, the worker id in its KV
events) is chosen once, as its first lease id, and outlives that lease: when the lease is lost
(revoked, or expired during an etcd outage) the worker puts the same key again under a new lease,
so routers reach it and accept its KV events again within seconds, with no restart of anything.
The current lease (what the launcher revokes) is always the registration value's `lease_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import aetcd
import grpc
from aetcd import rpc, watcher

from workers.runtime.aio import cancel_requests, raise_if_cancelled_since, wait_for
from workers.runtime.settings import ServiceRefused, ServiceUnavailable
from workers.runtime.tls import TlsFiles, TlsRefused, handshake

log = logging.getLogger(__name__)

DEFAULT_TTL = 10
KEEPALIVE_TIMEOUT = 5.0  # seconds for one lease refresh (its write and reply), at most a third of the TTL
# gRPC's bandwidth-delay probes size the flow-control window of bulk transfers; etcd's messages here are small,
# and the probes after each lease refresh kept gRPC's threads waking: measured on an idle client refreshing every
# 3.3 s, its threads' CPU 1.5-1.6 -> 0.8-0.86 ms/s without them (the KV router's idle background was ~3 ms/s).
CHANNEL_OPTIONS = (("grpc.http2.bdp_probe", 0),)
KEEPALIVE_RETRY = 0.5  # seconds before the first retry of a failed refresh, doubling up to a third of the TTL
FOLLOW_PAUSE, FOLLOW_MAX_PAUSE = 0.1, 2.0  # seconds between attempts to list and watch again


@dataclass
class Registration:
    namespace: str
    component: str
    endpoint: str
    subject: str
    lease_id: int = 0  # the current lease; changes when a lost lease is replaced
    instance_id: int = 0  # stable for the process's life (0 in records from before it existed: the lease id)
    host: str = ""
    pid: int = field(default_factory=os.getpid)
    process: str = ""
    model: str = ""
    block_size: int | None = None
    kv_role: str | None = None
    # Set while the process drains (SIGTERM, a rolling restart): still finishing what it has, taking
    # nothing new. Callers route around it; the key goes when the drain ends.
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instance(self) -> int:
        return self.instance_id or self.lease_id

    @property
    def key(self) -> str:
        return registration_key(self.namespace, self.component, self.endpoint, self.instance)

    @property
    def instance_subject(self) -> str:
        return f"{self.subject}.{self.instance:x}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Registration:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Snapshot:
    """All registrations under a prefix, by etcd key: the first update of `Registry.follow`, and the
    one after every broken watch. `gone`: keys reported before and absent now (deleted while nobody
    watched); a caller that keeps per-key state deletes them as if a Delete had come for each."""

    registrations: dict[str, Registration]
    gone: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Put:
    key: str
    registration: Registration


@dataclass(frozen=True)
class Delete:
    """The key's registration is gone (revoked or expired lease, deleted key); the key may be unknown."""

    key: str


Update = Snapshot | Put | Delete


def _decode(raw: bytes) -> Registration | None:
    """None for a value that is not a registration (written by something else, or by another version)."""
    try:
        return Registration.decode(raw)
    except Exception:
        return None


def _decoded(result: aetcd.GetRange) -> dict[str, Registration]:
    decoded = {kv.key.decode(): _decode(kv.value) for kv in result}
    return {key: reg for key, reg in decoded.items() if reg is not None}


def components_prefix(namespace: str, component: str | None = None) -> str:
    base = f"{namespace}/components/"
    return base if component is None else f"{base}{component}/"


def registration_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{components_prefix(namespace, component)}{endpoint}:{instance_id:x}"


def instance_of_key(key: str) -> int:
    """The instance id a registration key ends with (what a delete event tells about)."""
    return int(key.rsplit(":", 1)[-1], 16)


class SecureClient(aetcd.Client):
    """aetcd.Client over TLS with a client certificate. aetcd 1.0 opens only insecure channels, so this
    is its `connect` with grpc's secure channel in place of the insecure one; everything else is aetcd's."""

    def __init__(self, *, host: str, port: int, timeout: int, tls: TlsFiles) -> None:
        super().__init__(host=host, port=port, timeout=timeout, options=dict(CHANNEL_OPTIONS))
        ca, key, cert = tls.read()
        self._credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                         certificate_chain=cert)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                          options=self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


async def connect(endpoints: tuple[str, ...] | list[str], timeout: float = 5.0,
                  tls: TlsFiles | None = None) -> aetcd.Client:
    """First endpoint that answers wins; the error names every endpoint tried.

    https:// endpoints are reached with a client certificate (tls, default: LAUNCHER_TLS_* from the
    environment); one that refuses it is reported with the TLS reason, checked by a handshake of our own
    first, since gRPC's errors only say "failed to connect"."""
    errors = []
    files = tls if tls is not None else TlsFiles.from_env()
    for endpoint in endpoints:
        url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        host, port = url.hostname or "127.0.0.1", url.port or 2379
        client: aetcd.Client
        if url.scheme == "https":
            if files is None:
                raise ServiceRefused("etcd", endpoint, "it is https and no credentials were given", "ETCD_ENDPOINTS")
            try:
                await asyncio.to_thread(handshake, host, port, files, min(timeout, 3.0))
            except TlsRefused as exc:
                raise ServiceRefused("etcd", endpoint, exc.reason, "ETCD_ENDPOINTS") from None
            except OSError:
                pass  # nothing answers: the attempt below says so, with the other endpoints'
            client = SecureClient(host=host, port=port, timeout=int(timeout), tls=files)
        else:
            client = aetcd.Client(host=host, port=port, timeout=int(timeout), options=dict(CHANNEL_OPTIONS))
        try:
            await wait_for(client.connect(), timeout)
            await wait_for(client.status(), timeout)
            return client
        except Exception as exc:
            errors.append(f"{endpoint}: {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
            with contextlib.suppress(Exception):
                await client.close()
    raise ServiceUnavailable("etcd", ",".join(endpoints), "; ".join(errors), "ETCD_ENDPOINTS")


class Registry:
    """Reads registrations, and keeps this process's own one alive until `close`."""

    def __init__(self, client: aetcd.Client) -> None:
        self.client = client
        self._own: Registration | None = None
        self._ttl = DEFAULT_TTL
        self._keepalive: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, endpoints: tuple[str, ...] | list[str], tls: TlsFiles | None = None) -> Registry:
        return cls(await connect(endpoints, tls=tls))

    async def grant(self, ttl: int = DEFAULT_TTL) -> int:
        """A lease id before registering, so the per-instance NATS subject can exist first."""
        self._ttl = ttl
        lease = await self.client.lease(ttl)
        return int(lease.id)

    async def register(self, reg: Registration, ttl: int = DEFAULT_TTL) -> Registration:
        """Put the key under reg.lease_id (granted now if 0) and keep that lease alive.

        The first lease id becomes the instance id unless one was set; a later call (after a lost
        lease) keeps it, so the key and the instance subject stay the same."""
        self._ttl = ttl
        if not reg.lease_id:
            reg.lease_id = await self.grant(ttl)
        if not reg.instance_id:
            reg.instance_id = reg.lease_id
        await self.client.put(reg.key.encode(), reg.encode(), lease=reg.lease_id)
        self._own = reg
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_alive())
        log.info("registered %s (lease %x)", reg.key, reg.lease_id)
        return reg

    async def _keep_alive(self) -> None:
        """Refresh our lease every TTL/3 over one LeaseKeepAlive stream kept open, as etcd's own clients do.

        aetcd's `refresh_lease` opens a stream per refresh and leaves it open until its deadline: about three
        streams at a time, and some ten wakeups of the event loop and 80 of gRPC's threads per refresh, which
        was a third of an idle KV router's CPU. A broken stream (etcd restarted, a timeout) is dropped and
        opened again at the next refresh."""
        stream: Any = None
        pause, failures = self._ttl / 3, 0
        try:
            while True:
                await asyncio.sleep(pause)
                own = self._own
                if own is None:
                    return
                timeout = min(KEEPALIVE_TIMEOUT, self._ttl / 3)  # write and reply together
                try:
                    if stream is None:
                        await self.client.connect()  # no-op when connected
                        stream = self.client.leasestub.LeaseKeepAlive(metadata=self.client.metadata)
                    reply = await wait_for(self._refresh(stream, own.lease_id), timeout)
                    pause, failures = self._ttl / 3, 0
                    if reply.TTL <= 0:
                        # The lease is gone (expired during an outage, or revoked): come back under a new one.
                        log.warning("lease %x lost; registering %s again under a new lease", own.lease_id, own.key)
                        own.lease_id = 0
                        await self.register(own, self._ttl)
                except Exception as exc:
                    # Soon again, not a third of the TTL later: a refresh that failed late would leave the
                    # next one after the lease's end (etcd's own client retries after about half a second).
                    failures += 1
                    pause = min(KEEPALIVE_RETRY * 2 ** (failures - 1), self._ttl / 3)
                    log.warning("lease keepalive failed (%s); again in %.1f s", str(exc) or type(exc).__name__,
                                pause)
                    if stream is not None:
                        stream.cancel()
                        stream = None
        finally:
            if stream is not None:
                stream.cancel()

    @staticmethod
    async def _refresh(stream: Any, lease_id: int) -> Any:
        """One refresh on the open stream: its request, then its reply (the stream carries one at a time)."""
        await stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
        reply = await stream.read()
        if reply is grpc.aio.EOF:
            raise ConnectionError("etcd closed the keepalive stream")
        return reply

    async def mark_draining(self) -> None:
        """Say (same key, same lease) that this process takes no new request from now on."""
        own = self._own
        if own is not None and not own.draining:
            own.draining = True
            await self.client.put(own.key.encode(), own.encode(), lease=own.lease_id)
            log.info("draining: %s takes no new request", own.key)

    async def list(self, namespace: str, component: str | None = None) -> list[Registration]:
        result = await self.client.get_prefix(components_prefix(namespace, component).encode())
        return list(_decoded(result).values())

    async def follow(self, namespace: str, component: str | None = None) -> AsyncIterator[Update]:
        """Every registration under the prefix, then every change to it, for as long as the caller iterates.

        One get-prefix gives the keys and the revision R they are at; the watch starts at R+1, so a
        registration made between the list and the watch is an event of the watch, not lost. A broken
        watch (etcd restarted, connection lost, revision compacted) is followed by a new list: its
        Snapshot names the keys deleted meanwhile (`gone`), whose delete events nobody will send. Each
        Snapshot is yielded before its watch is created: the watch's start revision, not the order of
        the two calls, is what keeps the gap closed. Undecodable values are skipped.
        """
        prefix = components_prefix(namespace, component).encode()
        known: set[str] = set()  # the keys reported so far, to tell what a re-list no longer has
        pause = FOLLOW_PAUSE
        while True:
            try:
                listed = await self.client.get_prefix(prefix)
                registrations = _decoded(listed)
                yield Snapshot(registrations, frozenset(known - registrations.keys()))
                known = set(registrations)
                asked = cancel_requests()
                watch = await self.client.watch_prefix(prefix, start_revision=listed.header.revision + 1)
                pause = FOLLOW_PAUSE
                try:
                    raise_if_cancelled_since(asked)  # aetcd's wait for the watch's creation may drop a cancel
                    async for event in watch:
                        key = event.kv.key.decode()
                        if event.kind != "PUT":
                            known.discard(key)
                            yield Delete(key)
                        elif (reg := _decode(event.kv.value)) is not None:
                            known.add(key)
                            yield Put(key, reg)
                finally:
                    with contextlib.suppress(Exception):
                        await watch.cancel()
                log.warning("etcd watch of %s ended; listing again", prefix.decode())
            except Exception as exc:
                log.warning("etcd list/watch of %s failed (%s: %s); listing again in %.1f s", prefix.decode(),
                            type(exc).__name__, exc, pause)
            await asyncio.sleep(pause)  # a pause between attempts, growing while etcd does not answer
            pause = min(2 * pause, FOLLOW_MAX_PAUSE)

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(Exception):
            await self.client.revoke_lease(lease_id)

    async def close(self) -> None:
        """Revoke our own lease first: routers forget us now, not after the TTL."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        own, self._own = self._own, None
        if own is not None:
            await self.revoke(own.lease_id)
        with contextlib.suppress(Exception):
            await self.client.close()


async def components_by_namespace(endpoints: tuple[str, ...] | list[str],
                                  tls: TlsFiles | None = None) -> dict[str, set[str]]:
    """Every namespace with live registrations, and the components registered there
    (keys `{ns}/components/{component}/...`)."""
    client = await connect(endpoints, tls=tls)
    try:
        result = await client.get_all(keys_only=True)
        found: dict[str, set[str]] = {}
        for kv in result:
            parts = kv.key.decode(errors="replace").split("/")
            if len(parts) >= 4 and parts[-3] == "components":
                found.setdefault("/".join(parts[:-3]), set()).add(parts[-2])
        return found
    finally:
        with contextlib.suppress(Exception):
            await client.close()
