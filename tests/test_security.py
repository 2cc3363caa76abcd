"""A secured deployment's servers, attacked (real etcd and nats-server; no vLLM).

The launcher's own code starts them (launcher.secure.prepare + launcher.services.ensure_services, what
`up` runs), on loopback with `services.security: tls`. The attacks are the ones issue 21 lists: a
client without credentials publishing to a worker's subject or registering a fake instance, a client
with another CA's certificate, and identities of the deployment doing what their kind does not.
Refused is checked by its type (the TLS error, nats-py's error class), and by what a legitimate
subscriber did not receive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import ssl
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import nats
import nats.errors
import pytest

from launcher import secure
from launcher import services as svc
from launcher.credentials import OPERATOR, Credentials, CredentialsError
from launcher.resolve import Endpoints, Resolved, resolve
from launcher.topology import load_topology
from tests.helpers import LAUNCHER, ROOT, until, write_topology
from workers.runtime import requestplane
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import ServiceRefused
from workers.runtime.tls import TlsFiles, TlsRefused, handshake, inbox_prefix

NAMESPACE = "sec"


def _topology(etcd: str, nats_url: str, **services: Any) -> dict[str, Any]:
    return {"name": "sec", "namespace": NAMESPACE, "model": "m",
            "services": {"etcd": etcd, "nats": nats_url, **services},
            "frontends": [{"name": "fe"}], "routers": [{"name": "r"}],
            "workers": [{"name": "kw", "kind": "kv_worker"}, {"name": "w", "kind": "monolith"}]}


@dataclass
class Secured:
    resolved: Resolved
    creds: Credentials
    used: list[svc.ManagedService]
    home: Path
    topology: Path

    @property
    def etcd(self) -> str:
        return self.resolved.endpoints.etcd[0]

    @property
    def nats(self) -> str:
        return self.resolved.endpoints.nats

    def files(self, identity: str) -> TlsFiles:
        return self.creds.client(identity)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    home = tmp_path_factory.mktemp("secured-home")
    old = os.environ.get("LAUNCHER_HOME")
    os.environ["LAUNCHER_HOME"] = str(home)
    run_dir = home / "sec"
    run_dir.mkdir(mode=0o700)
    path = write_topology(home / "sec.yaml", _topology(f"http://127.0.0.1:{svc.free_port()}",
                                                       f"nats://127.0.0.1:{svc.free_port()}", security="tls"))
    topo, _ = load_topology(path)
    resolved = resolve(topo, endpoints=Endpoints.resolve(topo, credentials=run_dir / "credentials"), table=None)
    said: list[str] = []
    security = secure.prepare(resolved, None, say=said.append)
    assert security is not None and any("made CA" in s for s in said), said
    used = svc.ensure_services(resolved.endpoints.etcd, resolved.endpoints.nats, "auto", run_dir,
                               say=said.append, security=security)
    try:
        yield Secured(resolved, Credentials(run_dir / "credentials"), used, home, path)
    finally:
        svc.release_services(used, run_dir, grace=5, say=lambda m: None)
        if old is None:
            os.environ.pop("LAUNCHER_HOME", None)
        else:
            os.environ["LAUNCHER_HOME"] = old


def _stranger(tmp: Path) -> Credentials:
    """Credentials of another deployment: a CA of its own, an identity with the same name as ours."""
    other = Credentials(tmp / "stranger")
    other.ensure("sec", ["127.0.0.1"], ["fe", OPERATOR])
    return other


# ---------------------------------------------------------------- files


def test_credentials_are_private_and_the_bundle_has_no_ca_key(secured: Secured, tmp_path: Path) -> None:
    folder = secured.creds.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    bundle = tmp_path / "sec.bundle"
    members = secured.creds.export_bundle(bundle)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert names == set(members)
    assert "ca.crt" in names and "ca.key" not in names and "server.key" not in names
    assert {"fe.crt", "fe.key", "w.key", "kw.key", "r.key", "operator.key"} <= names
    # Another host with only the bundle connects, but cannot issue an identity for a process it does not have.
    there = Credentials(tmp_path / "host-b")
    there.import_bundle(bundle)
    assert not there.can_issue()
    there.ensure("sec", ["127.0.0.1"], ["w", OPERATOR])  # all present: nothing to make
    with pytest.raises(CredentialsError, match=r"new-worker.*export the bundle again"):
        there.ensure("sec", ["127.0.0.1"], ["new-worker"])


def test_a_bundle_with_anything_else_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        (tmp_path / "ca.crt").write_text("x")
        tar.add(tmp_path / "ca.crt", arcname="ca.crt")
        tar.add(tmp_path / "ca.crt", arcname="../escape.crt")
    with pytest.raises(CredentialsError, match=re.escape("unexpected: ../escape.crt")):
        Credentials(tmp_path / "in").import_bundle(bad)
    assert not (tmp_path / "escape.crt").exists()


# ---------------------------------------------------------------- etcd


def test_etcd_serves_the_deployment_and_refuses_everyone_else(secured: Secured, tmp_path: Path) -> None:
    assert secured.etcd.startswith("https://")

    async def scenario() -> None:
        registry = await Registry.connect([secured.etcd], tls=secured.files("w"))
        try:
            lease = await registry.grant()
            await registry.register(Registration(namespace=NAMESPACE, component="vllm", endpoint="generate",
                                                 subject="s", lease_id=lease, process="w"))
            assert [r.process for r in await registry.list(NAMESPACE)] == ["w"]
        finally:
            await registry.close()
        # no credentials: the https endpoint is not even tried in clear
        with pytest.raises(ServiceRefused, match="no credentials"):
            await Registry.connect([secured.etcd], tls=None)
        # another CA's certificate: refused, with the TLS reason
        with pytest.raises(ServiceRefused, match="TLS handshake failed") as refused:
            await Registry.connect([secured.etcd], tls=_stranger(tmp_path).client("fe"))
        assert "certificate" in str(refused.value)

    asyncio.run(scenario())


def test_status_says_why_etcd_refused_it(secured: Secured, tmp_path: Path) -> None:
    """`launcher status` reports a refusing etcd with its reason, not as an etcd that did not answer."""
    from launcher import status

    regs, why = asyncio.run(status._registrations([secured.etcd], NAMESPACE, tls=None))
    assert regs is None and why is not None, why
    assert why.startswith("refused `launcher status`: ") and "no credentials" in why, why
    stranger = _stranger(tmp_path).client("fe")
    regs, why = asyncio.run(status._registrations([secured.etcd], NAMESPACE, tls=dataclasses.asdict(stranger)))
    assert regs is None and why is not None and "TLS handshake failed" in why, why
    operator = dataclasses.asdict(secured.files("operator"))
    regs, why = asyncio.run(status._registrations([secured.etcd], NAMESPACE, tls=operator))
    assert regs is not None and why is None


def test_a_fake_instance_cannot_be_registered_without_credentials(secured: Secured, tmp_path: Path) -> None:
    host, port = "127.0.0.1", int(secured.etcd.rsplit(":", 1)[1])
    # The attacker trusts our CA (it is no secret) but has no client certificate of ours.
    anonymous = ssl.create_default_context(cafile=secured.creds.ca)
    with pytest.raises(TlsRefused):
        _handshake_without_cert(host, port, anonymous)
    with pytest.raises(TlsRefused, match="TLS handshake failed"):
        handshake(host, port, _stranger(tmp_path).client("fe"))

    async def register_in_clear() -> None:
        client = aetcd.Client(host=host, port=port, timeout=3)
        try:
            await client.put(b"sec/components/vllm/generate:1", b"{}")
        finally:
            await client.close()

    with pytest.raises(aetcd.exceptions.ClientError):
        asyncio.run(register_in_clear())

    async def listed() -> list[Registration]:
        registry = await Registry.connect([secured.etcd], tls=secured.files(OPERATOR))
        try:
            return await registry.list(NAMESPACE)
        finally:
            await registry.close()

    assert all(r.process != "" for r in asyncio.run(listed())), "no anonymous registration got in"


def _handshake_without_cert(host: str, port: int, ctx: ssl.SSLContext) -> None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=3) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
            s.settimeout(1)
            if s.recv(1) == b"":
                raise TlsRefused("closed")
    except ssl.SSLError as exc:
        raise TlsRefused(str(exc)) from None


# ---------------------------------------------------------------- NATS


async def _connect(url: str, files: TlsFiles | None, identity: str, errors: list[Exception]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    options: dict[str, Any] = {"tls": files.client_context(),
                               "inbox_prefix": inbox_prefix(identity).encode()} if files else {}
    return await nats.connect(url, error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0,
                              connect_timeout=3, **options)


def test_nats_without_credentials_is_refused(secured: Secured, tmp_path: Path) -> None:
    subject = f"{NAMESPACE}.vllm.generate"

    async def scenario() -> None:
        errors: list[Exception] = []
        # An attacker that skips verifying the server and has no certificate: the server wants one.
        no_cert = ssl.create_default_context()
        no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
        with pytest.raises((ssl.SSLError, nats.errors.Error, ConnectionError, OSError)):
            await nats.connect(secured.nats, tls=no_cert, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=3, error_cb=_ignore)
        # Plain text: the server requires TLS.
        with pytest.raises((nats.errors.Error, ssl.SSLError, OSError)):
            await nats.connect(secured.nats.replace("tls://", "nats://"), allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=3, error_cb=_ignore)
        # Our own connect() says who refused and why, as a typed error.
        with pytest.raises(ServiceRefused, match="TLS handshake failed") as refused:
            await requestplane.connect(secured.nats, "stranger", tls=_stranger(tmp_path).client("fe"))
        assert refused.value.url == secured.nats
        # The worker heard nothing but the frontend's marker, sent after every attempt above.
        worker = await _connect(secured.nats, secured.files("w"), "w", errors)
        heard = await worker.subscribe(subject)
        await requestplane.flush_subscriptions(worker)
        frontend = await _connect(secured.nats, secured.files("fe"), "fe", errors)
        await frontend.publish(subject, b"marker")
        await frontend.flush()
        assert (await heard.next_msg(timeout=5)).data == b"marker" and heard.pending_msgs == 0
        await frontend.close()
        await worker.close()

    asyncio.run(scenario())


async def _ignore(exc: Exception) -> None:
    return None


async def _heard(conn: nats.NATS, subject: str) -> Any:
    sub = await conn.subscribe(subject)
    await requestplane.flush_subscriptions(conn)
    return sub


def test_each_identity_publishes_only_what_its_kind_does(secured: Secured) -> None:
    ns = NAMESPACE

    async def scenario() -> dict[str, Any]:
        errors: dict[str, list[Exception]] = {n: [] for n in ("fe", "w", "kw", "r")}
        conns = {n: await _connect(secured.nats, secured.files(n), n, errors[n]) for n in errors}
        try:
            router_events = await _heard(conns["r"], f"{ns}.kv_events")
            monolith_requests = await _heard(conns["w"], f"{ns}.vllm.generate")
            kv_requests = await _heard(conns["kw"], f"{ns}.backend.generate")
            kv_cancels = await _heard(conns["kw"], f"{ns}.backend.generate.*.cancel")
            router_ends = await _heard(conns["r"], f"{inbox_prefix('r')}.ends")
            # allowed: the frontend asks the monolith; the KV worker publishes events; the router asks a KV worker
            await conns["fe"].publish(f"{ns}.vllm.generate", b"from the frontend")
            await conns["kw"].publish(f"{ns}.kv_events", b"a real event")
            await conns["r"].publish(f"{ns}.backend.generate", b"from the router")
            # the router hands requests off: the frontend cancels on the worker, the worker reports ends to the router
            await conns["fe"].publish(f"{ns}.backend.generate.1f.cancel", b"_INBOX.fe.x")
            await conns["kw"].publish(f"{inbox_prefix('r')}.ends", b"7")
            await conns["r"].publish(f"{ns}.kv_routed", b"a router's requests, for its replicas")
            # refused: a fake KV event with the frontend's identity; a worker asking another worker;
            # the frontend calling the KV workers past the router; reading another identity's replies
            await conns["fe"].publish(f"{ns}.kv_events", b"fake event")
            await conns["fe"].publish(f"{ns}.kv_routed", b"fake requests in flight, to steer the routers")
            await conns["w"].publish(f"{ns}.backend.generate", b"worker to worker")
            await conns["fe"].publish(f"{ns}.backend.generate", b"frontend past the router")
            await conns["fe"].subscribe(f"{inbox_prefix('r')}.>")
            for c in conns.values():
                await c.flush()

            def settled() -> bool:  # the violations' -ERR lines may arrive after the flush's PONG
                fe = [str(e) for e in errors["fe"]]
                return (sum("publish" in e for e in fe) >= 3 and any("subscription" in e for e in fe)
                        and any("publish" in str(e) for e in errors["w"])
                        and min(s.pending_msgs for s in (router_events, monolith_requests, kv_requests, kv_cancels,
                                                         router_ends)) >= 1)

            await until(settled, 15, "the allowed messages delivered and the refused ones' errors in")
            got = {
                "events": [m.data async for m in _drain(router_events)],
                "monolith": [m.data async for m in _drain(monolith_requests)],
                "kv": [m.data async for m in _drain(kv_requests)],
                "cancels": [m.data async for m in _drain(kv_cancels)],
                "ends": [m.data async for m in _drain(router_ends)],
            }
            return {"got": got, "errors": {n: [str(e) for e in errs] for n, errs in errors.items()},
                    "types": {n: [type(e) for e in errs] for n, errs in errors.items()}}
        finally:
            for c in conns.values():
                await c.close()

    result = asyncio.run(scenario())
    assert result["got"] == {"events": [b"a real event"], "monolith": [b"from the frontend"],
                             "kv": [b"from the router"], "cancels": [b"_INBOX.fe.x"], "ends": [b"7"]}
    fe, w = result["errors"]["fe"], result["errors"]["w"]
    assert any("publish" in e and "kv_events" in e for e in fe), fe
    assert any("publish" in e and "kv_routed" in e for e in fe), fe
    assert any("publish" in e and "backend.generate" in e for e in fe), fe
    assert any("subscription" in e and "_inbox.r." in e.lower() for e in fe), fe
    assert any("publish" in e and "backend.generate" in e for e in w), w
    # a permissions violation, not a refused connection: typed as nats-py's generic error
    assert all(t is nats.errors.Error for t in result["types"]["fe"] + result["types"]["w"])
    assert result["errors"]["kw"] == [] and result["errors"]["r"] == []


async def _drain(sub: Any) -> Any:
    while sub.pending_msgs:
        yield await sub.next_msg(timeout=1)


# ---------------------------------------------------------------- the CLI


def _launcher(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "NATS_", "LAUNCHER_"))}
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**clean, "LAUNCHER_HOME": str(home), **env})


def test_plan_names_files_and_shows_no_key(secured: Secured) -> None:
    keys = [f.read_text() for f in secured.creds.folder.glob("*.key")]
    text = _launcher(["plan", str(secured.topology)], secured.home)
    as_json = _launcher(["plan", str(secured.topology), "--json"], secured.home)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert "security: TLS and client certificates: services.security: tls" in text.stdout
    for out in (text.stdout, as_json.stdout, text.stderr, as_json.stderr):
        assert "PRIVATE KEY" not in out and not any(k.strip().splitlines()[1] in out for k in keys)
    fe = next(p for p in json.loads(as_json.stdout) if p["name"] == "fe")
    assert fe["env"]["LAUNCHER_TLS_CERT"].endswith("/credentials/fe.crt")
    assert fe["env"]["NATS_SERVER"].startswith("tls://") and fe["env"]["ETCD_ENDPOINTS"].startswith("https://")


def test_a_loopback_deployment_stays_in_clear(tmp_path: Path) -> None:
    path = write_topology(tmp_path / "plain.yaml", _topology("http://127.0.0.1:2379", "nats://127.0.0.1:4222"))
    out = _launcher(["plan", str(path), "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    for proc in json.loads(out.stdout):
        assert not any(k.startswith("LAUNCHER_TLS") for k in proc["env"])
        assert proc["env"]["ETCD_ENDPOINTS"] == "http://127.0.0.1:2379"
    assert not (tmp_path / "sec" / "credentials").exists()


def test_cross_host_is_secured_by_default_and_opting_out_warns(tmp_path: Path) -> None:
    path = write_topology(tmp_path / "x.yaml", _topology("http://10.9.9.9:2379", "nats://10.9.9.9:4222"))
    out = _launcher(["plan", str(path), "--json"], tmp_path)
    env = json.loads(out.stdout)[0]["env"]
    assert env["ETCD_ENDPOINTS"] == "https://10.9.9.9:2379" and env["NATS_SERVER"] == "tls://10.9.9.9:4222"
    path = write_topology(tmp_path / "y.yaml", _topology("http://10.9.9.9:2379", "nats://10.9.9.9:4222",
                                                         security="none"))
    out = _launcher(["validate", str(path)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "security is none" in out.stderr and "API key" in out.stderr


def test_security_settings_that_would_not_be_honoured_are_errors(tmp_path: Path) -> None:
    files = {"ca": "/x/ca.crt", "cert": "/x/c.crt", "key": "/x/c.key"}
    cases = [
        ({"managed": "auto", "tls": files}, "services.tls names credentials for servers someone else runs"),
        ({"managed": "never", "security": "tls"}, "name the files (services.tls"),
        ({"managed": "never", "security": "none", "tls": files}, "services.security is none"),
    ]
    for extra, message in cases:
        path = write_topology(tmp_path / "t.yaml", _topology("http://127.0.0.1:2379", "nats://127.0.0.1:4222",
                                                             **extra))
        out = _launcher(["validate", str(path)], tmp_path)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)
        assert "t.yaml:" in out.stderr
    path = write_topology(tmp_path / "t.yaml", _topology("https://127.0.0.1:2379", "nats://127.0.0.1:4222",
                                                         security="none"))
    out = _launcher(["validate", str(path)], tmp_path)
    assert out.returncode == 2 and "asks for TLS but services.security is none" in out.stderr


def test_up_elsewhere_without_the_bundle_says_how_to_get_it(tmp_path: Path) -> None:
    path = write_topology(tmp_path / "x.yaml", {**_topology("http://10.9.9.9:2379", "nats://10.9.9.9:4222"),
                                                "workers": [{"name": "w", "kind": "monolith"}],
                                                "frontends": [], "routers": []})
    out = _launcher(["up", str(path)], tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "launcher credentials export sec -o FILE" in out.stderr and "--credentials FILE" in out.stderr


def test_a_refused_client_says_who_and_why_without_a_traceback(secured: Secured, tmp_path: Path) -> None:
    """The seed client with another deployment's certificate, then with none."""
    stranger = _stranger(tmp_path).client("fe")
    base = {"ETCD_ENDPOINTS": secured.etcd, "NATS_SERVER": secured.nats}
    argv = [*LAUNCHER[:1], "-m", "workers.common.client", "--namespace", NAMESPACE, "--prompt", "hi"]
    for env, reason in (({**base, **stranger.env()}, "TLS handshake failed: unknown CA"),
                        (base, "it is https and no credentials were given")):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "NATS_", "LAUNCHER_"))}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**clean, **env})
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"etcd at {secured.etcd} refused this process: {reason}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_servers_someone_else_runs_are_reached_with_the_files_the_topology_names(secured: Secured) -> None:
    """managed: never with services.tls: every process presents those files; nothing is made."""
    files = secured.files(OPERATOR)
    topo_file = write_topology(secured.home / "byo.yaml", {
        **_topology(secured.etcd, secured.nats, managed="never",
                    tls={"ca": files.ca, "cert": files.cert, "key": files.key}),
        "name": "byo"})
    topo, _ = load_topology(topo_file)
    resolved = resolve(topo, endpoints=Endpoints.resolve(topo, credentials=secured.home / "byo" / "credentials"),
                       table=None)
    security = secure.prepare(resolved, None, say=lambda m: None)
    assert security is not None and security.client == files and security.server is None
    assert all(p.env["LAUNCHER_TLS_CERT"] == files.cert for p in resolved.processes)
    said: list[str] = []
    used = svc.ensure_services(resolved.endpoints.etcd, resolved.endpoints.nats, "never",
                               secured.home / "byo", say=said.append, security=security)  # the handshakes pass
    assert not any("starting" in s for s in said), said
    assert not (secured.home / "byo" / "credentials").exists()
    assert {u.name for u in used} == {"etcd", "nats-server"}  # used, as any deployment's; never started


def test_a_process_added_later_gets_its_permissions_on_the_running_server(secured: Secured) -> None:
    """`up` again with one more worker: its certificate is made and nats-server reloads its users."""
    data = _topology(secured.etcd, secured.nats, security="tls")
    data["workers"].append({"name": "w2", "kind": "monolith", "args": ["--component", "extra"]})
    data["services"] = {**data["services"], "etcd": secured.etcd.replace("https", "http"),
                        "nats": secured.nats.replace("tls", "nats")}
    topo_file = write_topology(secured.home / "sec-more.yaml", data)
    topo, _ = load_topology(topo_file)
    run_dir = secured.home / "sec"
    resolved = resolve(topo, endpoints=Endpoints.resolve(topo, credentials=run_dir / "credentials"), table=None)
    said: list[str] = []
    security = secure.prepare(resolved, None, say=said.append)
    assert security is not None and any("certificate of w2" in s for s in said), said
    svc.ensure_services(resolved.endpoints.etcd, resolved.endpoints.nats, "auto", run_dir, say=said.append,
                        security=security)

    async def w2_serves() -> list[Exception]:
        errors: list[Exception] = []
        conn = await _connect(secured.nats, secured.files("w2"), "w2", errors)
        try:
            sub = await conn.subscribe(f"{NAMESPACE}.extra.generate")
            await requestplane.flush_subscriptions(conn)
            operator = await _connect(secured.nats, secured.files(OPERATOR), OPERATOR, errors)
            await operator.publish(f"{NAMESPACE}.extra.generate", b"hello w2")
            await operator.flush()
            assert (await sub.next_msg(timeout=5)).data == b"hello w2", "its subscription was allowed"
            await operator.close()
        finally:
            await conn.close()
        return errors

    assert asyncio.run(w2_serves()) == []


def test_a_process_may_not_take_a_credentials_files_name(tmp_path: Path) -> None:
    for name in ("ca", "server", "operator"):
        topo = _topology("http://127.0.0.1:2379", "nats://127.0.0.1:4222", security="tls")
        topo["workers"][1]["name"] = name
        path = write_topology(tmp_path / "t.yaml", topo)
        out = _launcher(["validate", str(path)], tmp_path)
        assert out.returncode == 2 and f"'{name}' cannot name a process of a secured deployment" in out.stderr
    topo["services"]["security"] = "none"  # in clear, no certificate: any name
    assert _launcher(["validate", str(write_topology(tmp_path / "t.yaml", topo))], tmp_path).returncode == 0
