"""Where a worker finds etcd and NATS, and who it is in the deployment.

The launcher passes everything through the environment so that a worker started by hand (or on
another host) behaves exactly like one the launcher started: export the same variables and go.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_DRAIN_TIMEOUT = 30.0


def subject_token(name: str) -> str:
    """NATS subject tokens may not contain dots, spaces or wildcards; etcd keys don't care."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


@dataclass(frozen=True)
class RuntimeSettings:
    namespace: str
    etcd_endpoints: tuple[str, ...]
    nats_server: str
    process_name: str
    host: str
    # On SIGTERM: seconds to finish the requests in flight (after unregistering) before the rest are
    # ended with a `shutting_down` error that the frontend migrates to another instance.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT

    @classmethod
    def from_env(cls, default_namespace: str = "vllm") -> RuntimeSettings:
        etcd = os.environ.get("ETCD_ENDPOINTS", DEFAULT_ETCD)
        return cls(
            namespace=os.environ.get("LAUNCHER_NAMESPACE", default_namespace),
            etcd_endpoints=tuple(e.strip() for e in etcd.split(",") if e.strip()),
            nats_server=os.environ.get("NATS_SERVER", DEFAULT_NATS),
            process_name=os.environ.get("LAUNCHER_PROCESS", ""),
            host=os.environ.get("LAUNCHER_HOST", socket.gethostname()),
            drain_timeout=float(os.environ.get("LAUNCHER_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT)),
        )


class ServiceUnavailable(ConnectionError):
    """etcd or NATS did not answer: names the address and what to check, instead of a bare errno."""

    def __init__(self, service: str, url: str, cause: str, env_var: str) -> None:
        self.service, self.url = service, url
        super().__init__(
            f"{service} at {url} did not answer ({cause}). Is it running? `launcher ls` / `launcher status` "
            f"show the deployments and their {service}; {env_var} overrides the address.")



class ServiceRefused(ConnectionError):
    """etcd or NATS answered but would not let this process in (TLS or authorization): names the address
    and the reason, e.g. "TLS handshake failed: certificate verify failed: unable to get local issuer
    certificate"."""

    def __init__(self, service: str, url: str, cause: str, env_var: str) -> None:
        self.service, self.url, self.cause = service, url, cause
        super().__init__(
            f"{service} at {url} refused this process: {cause}. A secured deployment's processes need its "
            f"credentials (LAUNCHER_TLS_CA / _CERT / _KEY; `launcher credentials env NAME` prints them); "
            f"{env_var} overrides the address.")
