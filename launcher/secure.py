"""`up`'s side of a secured deployment: have the credentials its plan names, and tell launcher.services
how to start and reach its servers. Also the `launcher credentials` commands' work.

Which host makes the credentials: the one whose launcher starts etcd and NATS (their addresses are its
own). Every other host receives a bundle (`launcher credentials export NAME -o FILE` there, then
`launcher up FILE --host b --credentials FILE`, or LAUNCHER_CREDENTIALS=FILE): a file, because it
crosses hosts the way the topology file does (scp), and because a Kubernetes Secret is made the same way.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from launcher import nats_access, services
from launcher.credentials import OPERATOR, Credentials, CredentialsError
from launcher.resolve import Resolved
from launcher.state import RunDir
from workers.runtime.tls import TlsFiles

__all__ = ["CredentialsError", "env_lines", "prepare"]


def _service_hosts(resolved: Resolved) -> list[str]:
    urls = [*resolved.endpoints.etcd, resolved.endpoints.nats]
    return sorted({urlparse(u).hostname or "127.0.0.1" for u in urls})


def prepare(resolved: Resolved, bundle: Path | None, say: Callable[[str], object]) -> services.Security | None:
    """The credentials `up` needs, made or imported now; None for a deployment in clear.
    Raises CredentialsError with what to do when this host cannot have them."""
    topo, security = resolved.topology, resolved.endpoints.security
    if bundle is not None and (not security.tls or security.credentials is None):
        raise CredentialsError(f"--credentials {bundle} given, but {topo.name} "
                               + ("is not secured (" + security.reason + ")" if not security.tls else
                                  "uses the files services.tls names (managed: never)") + ": drop --credentials")
    if not security.tls:
        return None
    if security.given is not None:
        return services.Security(topo.name, client=security.given, own=False)
    assert security.credentials is not None
    creds = Credentials(security.credentials)
    if bundle is not None:
        members = creds.import_bundle(bundle)
        say(f"credentials: {len(members)} file(s) from {bundle} in {creds.folder}")
    starts_servers = topo.services.managed != "never" and any(
        services.is_local(u) for u in [*resolved.endpoints.etcd, resolved.endpoints.nats])
    if not creds.exists() and not starts_servers:
        raise CredentialsError(
            f"{topo.name} is secured ({security.reason}) and its etcd and NATS run on another host: copy the "
            f"credentials from the host that started them (`launcher credentials export {topo.name} -o FILE` "
            f"there), then `launcher up ... --credentials FILE` here (or LAUNCHER_CREDENTIALS=FILE)")
    identities = [p.name for p in resolved.processes] + [OPERATOR]
    made = creds.ensure(topo.name, _service_hosts(resolved), identities)
    if made:
        say(f"credentials: made {', '.join(made)} in {creds.folder} (0600)")
    access = nats_access.access_for(topo.effective_namespace, resolved.processes)
    server = creds.server if creds.can_issue() else None
    config = None
    if server is not None:
        tls = {"cert_file": server.cert, "key_file": server.key, "ca_file": server.ca}
        config = functools.partial(_nats_config, tls=tls, deployment=topo.name, access=access)
    return services.Security(topo.name, client=creds.client(OPERATOR), server=server, nats_config=config)


def _nats_config(listen: str, store: Path, *, tls: dict[str, str], deployment: str,
                 access: list[nats_access.Access]) -> str:
    return nats_access.server_config(listen, store, tls, deployment, access)


def operator_files(rd: RunDir) -> TlsFiles | None:
    """The launcher's own identity for a deployment's servers, as its plan.json names it."""
    files = rd.plan().get("tls")
    return TlsFiles(**files) if files else None


def env_lines(rd: RunDir) -> list[str]:
    """Shell lines that make a client started by hand (the seed client, scripts) act as the operator of a
    secured deployment: addresses and certificate paths, never key contents."""
    plan = rd.plan()
    files = operator_files(rd)
    lines = [f"export ETCD_ENDPOINTS={shlex.quote(','.join(plan.get('etcd', [])))}",
             f"export NATS_SERVER={shlex.quote(str(plan.get('nats', '')))}"]
    if files is not None:
        lines += [f"export {var}={shlex.quote(value)}" for var, value in files.env().items()]
    return lines


def export_bundle(rd: RunDir, out: Path) -> list[str]:
    folder = rd.path / "credentials"
    return Credentials(folder).export_bundle(out)
