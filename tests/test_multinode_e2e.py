"""Multi-node: two hosts, one etcd and one NATS, each host's share started by its own launcher.

The hosts are two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), so nothing
works by accident through loopback: host b reaches etcd and NATS only at host a's address. Host a's
launcher starts them there (managed: auto on a routable address). Where namespaces cannot be made
(not root, no `ip`; or MULTINODE_E2E_LOOPBACK=1), the two hosts share this machine's loopback with
distinct host names and shared servers (managed: never), and the test says so in its skip/print.

The rule tests at the top need no vLLM; the end-to-end ones run two tiny-llama monolith workers.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from launcher import services as svc
from launcher.rules import check as check_rules
from launcher.topology import load_topology
from tests.helpers import CPU_ENGINE, CPU_ENV, LAUNCHER, MONOLITH, ROOT, Services, write_topology
from workers.runtime import requestplane

# ---------------------------------------------------------------- rules (no vLLM)


def _problems(tmp_path: Path, topo: dict[str, Any]) -> list[str]:
    path = write_topology(tmp_path / "t.yaml", topo)
    parsed, loaded = load_topology(path)
    return [p.render(loaded) for p in check_rules(parsed)]


def _two_hosts(**services: str) -> dict[str, Any]:
    topo: dict[str, Any] = {"name": "t", "model": "m", "workers": [{"name": "wa", "host": "a"},
                                                                  {"name": "wb", "host": "b"}]}
    if services:
        topo["services"] = services
    return topo


def test_loopback_services_across_hosts_are_refused_with_the_fix(tmp_path: Path) -> None:
    topo = _two_hosts(etcd="http://127.0.0.1:2379", nats="nats://localhost:4222")
    found = _problems(tmp_path, topo)
    assert len(found) == 2, found
    etcd, nats = found
    line = next(n for n, text in enumerate((tmp_path / "t.yaml").read_text().splitlines(), 1) if "etcd:" in text)
    assert f"t.yaml:{line}:" in etcd and "services.etcd" in etcd and "127.0.0.1" in etcd, etcd
    assert "services.nats" in nats and "localhost" in nats
    assert all("routable address" in p and "managed: never" in p for p in found)
    # The defaults are loopback too: a multi-host file has to say where its services are.
    assert len(_problems(tmp_path, _two_hosts())) == 2


def test_routable_services_or_shared_servers_are_fine(tmp_path: Path) -> None:
    assert _problems(tmp_path, _two_hosts(etcd="http://10.0.0.1:2379", nats="nats://10.0.0.1:4222")) == []
    # managed: never: the user runs the servers (e.g. container/docker-compose.yml, or a tunnel).
    assert _problems(tmp_path, _two_hosts(etcd="http://127.0.0.1:2379", managed="never")) == []


def test_every_process_names_its_host_once_one_does(tmp_path: Path) -> None:
    topo = _two_hosts(managed="never")
    del topo["workers"][1]["host"]
    (problem,) = _problems(tmp_path, topo)
    assert "'wb' names no host" in problem and "give it host:" in problem


def test_kv_ip_on_loopback_across_hosts_is_refused(tmp_path: Path) -> None:
    topo = yaml.safe_load((ROOT / "topologies" / "multinode.yaml").read_text())
    assert _problems(tmp_path, topo) == []
    topo["workers"][0]["kv_transfer"]["kv_ip"] = "127.0.0.1"
    (problem,) = _problems(tmp_path, topo)
    assert "workers[0].kv_transfer.kv_ip" in problem and "routable" in problem


def _launcher(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**_clean_env(), **(env or {})})


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("ETCD_ENDPOINTS", "NATS_SERVER", "LAUNCHER_HOME")}


def test_multinode_yaml_plans_each_hosts_share_with_nixl_side_channels(tmp_path: Path) -> None:
    env = {"LAUNCHER_HOME": str(tmp_path)}
    plan_b = json.loads(_launcher(["plan", "topologies/multinode.yaml", "--host", "b", "--json"], env).stdout)
    (decode,) = plan_b
    assert (decode["name"], decode["host"], decode["devices"]) == ("decode", "b", "gpu 0,1")
    assert "--tensor-parallel-size" in decode["argv"]
    kv = json.loads(decode["argv"][decode["argv"].index("--kv-transfer-config") + 1])
    assert (kv["kv_connector"], kv["kv_ip"], kv["kv_port"]) == ("NixlConnector", "10.0.0.2", 5600)
    # NIXL reads its handshake address from the environment, not from kv_ip.
    assert decode["env"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.2"
    # the services are on 10.0.0.1, not loopback: secured by default, each process with its own certificate
    assert decode["env"]["ETCD_ENDPOINTS"] == "https://10.0.0.1:2379"
    assert decode["env"]["NATS_SERVER"] == "tls://10.0.0.1:4222"
    assert decode["env"]["LAUNCHER_TLS_CERT"].endswith("multinode@b/credentials/decode.crt")
    assert decode["env"]["LAUNCHER_HOST"] == "b"
    frontend, prefill = json.loads(_launcher(["plan", "topologies/multinode.yaml", "--host", "a", "--json"],
                                             env).stdout)
    assert (frontend["kind"], frontend["host"]) == ("frontend", "a")
    assert prefill["name"] == "prefill" and prefill["depends_on"] == [], "host a must not wait for host b"


def test_up_refuses_a_loopback_override_for_managed_services(tmp_path: Path) -> None:
    proc = _launcher(["up", "topologies/multinode.yaml", "--host", "a"],
                     {"LAUNCHER_HOME": str(tmp_path), "ETCD_ENDPOINTS": "http://127.0.0.1:2379"})
    assert proc.returncode == 2
    assert "ETCD_ENDPOINTS=http://127.0.0.1:2379 is a loopback address" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be started or written"


# ---------------------------------------------------------------- two hosts, real vLLM


@dataclass
class Host:
    name: str
    netns: str | None
    address: str
    home: Path

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def run(self, argv: list[str], timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**_clean_env(), "LAUNCHER_HOME": str(self.home), **(env or {})})

    def launcher(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = self.run([*LAUNCHER, *args], timeout)
        assert proc.returncode == 0, f"{self.name}: launcher {args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def status(self) -> dict[str, dict[str, Any]]:
        info = json.loads(self.launcher(["status", "--host", self.name, "--json"]).stdout)
        return {p["name"]: p for p in info["processes"]}

    def client_env(self) -> dict[str, str]:
        """What `eval "$(launcher credentials env)"` gives a client started by hand on this host."""
        lines = self.launcher(["credentials", "env", "--host", self.name]).stdout.splitlines()
        return dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("export "))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _make_namespaces(tag: str) -> tuple[str, str] | str:
    """Two namespaces joined by a veth pair; or the reason they cannot be made here."""
    if os.environ.get("MULTINODE_E2E_LOOPBACK"):
        return "MULTINODE_E2E_LOOPBACK is set"
    if os.geteuid() != 0:
        return "network namespaces need root"
    ns_a, ns_b = f"lt{tag}a", f"lt{tag}b"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"v{tag}a", "netns", ns_a, "type", "veth", "peer", "name", f"v{tag}b", "netns", ns_b)
        for ns, dev, addr in ((ns_a, f"v{tag}a", "10.77.0.1/24"), (ns_b, f"v{tag}b", "10.77.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # vLLM's own processes talk over loopback
    except (OSError, subprocess.CalledProcessError) as exc:
        _drop_namespaces(ns_a, ns_b)
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        return f"ip netns unavailable ({detail})"
    return ns_a, ns_b


def _drop_namespaces(*names: str) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@dataclass
class TwoHosts:
    a: Host
    b: Host
    namespace: str
    nats: str
    etcd: str
    isolated: bool


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, services: Services
              ) -> Iterator[TwoHosts]:
    tmp = tmp_path_factory.mktemp("multinode")
    tag = uuid.uuid4().hex[:6]
    made = _make_namespaces(tag)
    if isinstance(made, tuple):
        a = Host("a", made[0], "10.77.0.1", tmp / "home-a")
        b = Host("b", made[1], "10.77.0.2", tmp / "home-b")
        # Host a's launcher starts etcd and nats-server on its routable address; b uses them.
        etcd, nats, managed = f"http://{a.address}:{svc.free_port()}", f"nats://{a.address}:{svc.free_port()}", "auto"
    else:
        print(f"multinode e2e on loopback with distinct host names: {made}")
        a = Host("a", None, "127.0.0.1", tmp / "home-a")
        b = Host("b", None, "127.0.0.1", tmp / "home-b")
        etcd, nats, managed = services.etcd, services.nats, "never"
    name = f"mn-{tag}"
    topo = {
        "name": name, "services": {"etcd": etcd, "nats": nats, "managed": managed},
        "model": str(tiny_model), "engine": CPU_ENGINE, "env": CPU_ENV,
        "workers": [{"name": "w-a", "kind": MONOLITH.name, "host": "a", "cpus": "0", "ready_timeout": 300},
                    {"name": "w-b", "kind": MONOLITH.name, "host": "b", "cpus": "1", "ready_timeout": 300}],
    }
    path = write_topology(tmp / f"{name}.yaml", topo)
    hosts = TwoHosts(a, b, name, nats, etcd, isolated=a.netns is not None)
    try:
        a.launcher(["up", str(path), "--host", "a"], timeout=600)
        if hosts.isolated:  # secured (services on a routable address): b gets a's credentials bundle
            bundle = tmp / "credentials.bundle"
            a.launcher(["credentials", "export", name, "--host", "a", "-o", str(bundle)])
            b.launcher(["up", str(path), "--host", "b", "--credentials", str(bundle)], timeout=600)
        else:
            b.launcher(["up", str(path), "--host", "b"], timeout=600)
        yield hosts
    finally:
        for host in (b, a):
            host.run([*LAUNCHER, "down", "--host", host.name], timeout=120)
        if hosts.isolated:
            _drop_namespaces(a.netns or "", b.netns or "")


CLIENT = textwrap.dedent("""\
    import asyncio, json, sys
    from workers.common.protocol import GenerateRequest
    from workers.runtime import requestplane

    async def main(nats, subject):
        nc = await requestplane.connect(nats, "multinode-test-client")
        request = GenerateRequest(prompt="the quick brown fox", sampling={"max_tokens": 4, "temperature": 0})
        try:
            items = [a async for a in requestplane.stream(nc, subject, request.model_dump(exclude_none=True), 30)]
        finally:
            await nc.close()
        print(json.dumps([{"data": a.data, "event": a.event, "comment": a.comment} for a in items]))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def ask_from(host: Host, nats: str, subject: str) -> list[dict[str, Any]]:
    """A client process on `host` (inside its namespace), with the operator's credentials that host has:
    the worker's raw chunks."""
    proc = host.run([sys.executable, "-c", CLIENT, nats, subject], env=host.client_env())
    assert proc.returncode == 0, proc.stderr
    items: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert items and not any(i["event"] == "error" for i in items), items
    return items


def answered_by(items: list[dict[str, Any]]) -> set[str]:
    return {i["data"]["worker"] for i in items if isinstance(i["data"], dict) and i["data"].get("worker")}


def instance_subject(hosts: TwoHosts, lease: str) -> str:
    return f"{requestplane.endpoint_subject(hosts.namespace, MONOLITH.component, MONOLITH.endpoint)}.{lease}"


def test_host_b_reaches_services_only_through_host_a(two_hosts: TwoHosts) -> None:
    if not two_hosts.isolated:
        pytest.skip("hosts share loopback here (no network namespaces)")
    port = two_hosts.etcd.rsplit(":", 1)[1]
    probe = ("import sys; from launcher.services import etcd_healthy as h; from workers.runtime.tls import TlsFiles; "
             "print(h(sys.argv[1], tls=TlsFiles.from_env()))")
    secured = f"https://{two_hosts.a.address}:{port}"
    on_b = [two_hosts.b.run([sys.executable, "-c", probe, url], env=two_hosts.b.client_env()).stdout.strip()
            for url in (secured, f"https://127.0.0.1:{port}")]
    assert on_b == ["True", "False"], "b must see etcd at a's address and nothing on its own loopback"


REFUSED_NATS = textwrap.dedent("""\
    import asyncio, ssl, sys
    import nats, nats.errors

    async def main(url, subject):
        anonymous = ssl.create_default_context()
        anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE  # no certificate of its own
        try:
            nc = await nats.connect(url, tls=anonymous, allow_reconnect=False, max_reconnect_attempts=0,
                                    connect_timeout=5)
        except (ssl.SSLError, ConnectionError, nats.errors.Error) as exc:
            print("refused", type(exc).__name__)
            return
        await nc.publish(subject, b"{}")
        await nc.flush()
        print("connected")

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")

REFUSED_ETCD = textwrap.dedent("""\
    import asyncio, sys
    import aetcd

    async def main(host, port):
        client = aetcd.Client(host=host, port=int(port), timeout=5)  # in clear, no certificate
        try:
            await client.put(b"/fake/components/vllm/generate:1", b"{}")
        except aetcd.exceptions.ClientError as exc:
            print("refused", type(exc).__name__)
            return
        finally:
            await client.close()
        print("registered")

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_from_host_b_nothing_gets_in_without_credentials(two_hosts: TwoHosts) -> None:
    """Issue 21: the two-host test with security on. From b's namespace, a NATS client and an etcd client
    without the deployment's certificates are refused, checked by their error types; b's own client
    (the bundle's operator identity) is answered (test_a_client_on_one_host_reaches_the_worker_on_the_other)."""
    if not two_hosts.isolated:
        pytest.skip("hosts share loopback here (no network namespaces): the shared servers run in clear")
    nats_url = f"tls://{two_hosts.a.address}:{two_hosts.nats.rsplit(':', 1)[1]}"
    subject = requestplane.endpoint_subject(two_hosts.namespace, MONOLITH.component, MONOLITH.endpoint)
    out = two_hosts.b.run([sys.executable, "-c", REFUSED_NATS, nats_url, subject]).stdout.split()
    # TLS 1.3: the server's refusal of a client without a certificate comes after the client's side of
    # the handshake is done, so the client's next read or write finds the connection gone (reset, broken
    # pipe, EOF) or reads the server's alert (SSLError): no connection either way (seen: all four).
    assert out[:1] == ["refused"] and out[1] in ("SSLError", "SSLEOFError", "ConnectionResetError",
                                                 "BrokenPipeError"), out
    out = two_hosts.b.run([sys.executable, "-c", REFUSED_ETCD, two_hosts.a.address,
                           two_hosts.etcd.rsplit(":", 1)[1]]).stdout.split()
    assert out[:1] == ["refused"] and out[1] in ("ConnectionFailedError", "ConnectionTimeoutError"), out


def test_no_key_in_plan_status_logs_or_errors(two_hosts: TwoHosts) -> None:
    if not two_hosts.isolated:
        pytest.skip("hosts share loopback here (no network namespaces): no credentials are made")
    keys = [line for host in (two_hosts.a, two_hosts.b)
            for f in (host.home / f"{two_hosts.namespace}@{host.name}" / "credentials").glob("*.key")
            for line in f.read_text().splitlines()[1:-1]]
    assert keys
    shown = []
    for host in (two_hosts.a, two_hosts.b):
        rd = host.home / f"{two_hosts.namespace}@{host.name}"
        shown += [host.launcher(["status", "--host", host.name]).stdout,
                  host.launcher(["status", "--host", host.name, "--json"]).stdout,
                  host.launcher(["credentials", "env", "--host", host.name]).stdout]
        shown += [p.read_text(errors="replace") for p in (rd / "logs").glob("*.log")]
        shown += [(rd / "plan.json").read_text()]
    for text in shown:
        assert "PRIVATE KEY" not in text and not any(k in text for k in keys)


def test_status_on_either_host_shows_both_hosts(two_hosts: TwoHosts) -> None:
    on_a, on_b = two_hosts.a.status(), two_hosts.b.status()
    assert set(on_a) == set(on_b) == {"w-a", "w-b"}
    # Each host has the local details (state, CPU, memory) of its own process ...
    for status, mine in ((on_a, "w-a"), (on_b, "w-b")):
        row = status[mine]
        assert (row["state"], row["registered"], row["local"]) == ("ready", True, True)
        assert row["rss_bytes"] > 50 * 2**20 and psutil.pid_exists(row["pid"])
    # ... and the other host's from etcd: host, pid and lease agree with what that host reports.
    for status, other, there in ((on_a, "w-b", on_b), (on_b, "w-a", on_a)):
        row = status[other]
        assert (row["state"], row["registered"], row["local"]) == ("remote", True, False)
        assert row["host"] == there[other]["host"] and row["pid"] == there[other]["pid"]
        assert row["leases"] == there[other]["leases"] and row["cpu_percent"] is None
    table = two_hosts.a.launcher(["status", "--host", "a"]).stdout
    assert "host" in table and "remote" in table and "w-b" in table


def test_a_client_on_one_host_reaches_the_worker_on_the_other(two_hosts: TwoHosts) -> None:
    on_a = two_hosts.a.status()
    for client_host, worker in ((two_hosts.a, "w-b"), (two_hosts.b, "w-a")):
        (lease,) = on_a[worker]["leases"]
        items = ask_from(client_host, two_hosts.nats, instance_subject(two_hosts, lease))
        assert answered_by(items) == {worker}
        assert "".join(i["data"].get("text", "") for i in items if isinstance(i["data"], dict))


def test_stopping_one_host_leaves_the_other_serving(two_hosts: TwoHosts) -> None:
    """Runs last in this file: it takes host b down."""
    pid_b = two_hosts.b.status()["w-b"]["pid"]
    out = two_hosts.b.launcher(["down", "--host", "b"]).stdout
    assert "stopped" in out
    assert not psutil.pid_exists(pid_b)
    on_a = two_hosts.a.status()
    assert on_a["w-a"]["state"] == "ready"
    assert on_a["w-b"]["registered"] is False and on_a["w-b"]["pid"] is None
    subject = requestplane.endpoint_subject(two_hosts.namespace, MONOLITH.component, MONOLITH.endpoint)
    for _ in range(3):  # any instance: only a's is left to answer
        assert answered_by(ask_from(two_hosts.a, two_hosts.nats, subject)) == {"w-a"}
