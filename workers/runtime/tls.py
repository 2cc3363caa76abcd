"""The client side of a secured deployment: which certificate files a process presents to etcd and NATS.

The launcher passes file paths, never key material, through the environment (LAUNCHER_TLS_CA,
LAUNCHER_TLS_CERT, LAUNCHER_TLS_KEY), so a process started by hand on another host behaves like one
the launcher started: export the same three variables (`launcher credentials env NAME` prints them).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass

ENV_CA, ENV_CERT, ENV_KEY = "LAUNCHER_TLS_CA", "LAUNCHER_TLS_CERT", "LAUNCHER_TLS_KEY"
OPERATOR = "operator"  # the identity of the launcher's CLI and of clients started by hand


def client_identity() -> str:
    """Who this process is in a secured deployment: LAUNCHER_IDENTITY where several processes share one
    certificate (the replicas of a Kubernetes workload), else its process name, else the operator."""
    return os.environ.get("LAUNCHER_IDENTITY") or os.environ.get("LAUNCHER_PROCESS") or OPERATOR


def inbox_prefix(identity: str) -> str:
    """The NATS inbox prefix of an identity's connection (nats-py's `inbox_prefix`): its user may
    subscribe there only, so no identity reads another's replies."""
    return "_INBOX." + re.sub(r"[^A-Za-z0-9_-]", "_", identity)


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] | None = None) -> TlsFiles | None:
        """The three variables, or None when none is set; a partial set is an error that names what is missing."""
        env = os.environ if env is None else env
        values = {var: env.get(var, "") for var in (ENV_CA, ENV_CERT, ENV_KEY)}
        if not any(values.values()):
            return None
        missing = [var for var, value in values.items() if not value]
        if missing:
            raise ValueError(f"{', '.join(missing)} not set: TLS needs all of {ENV_CA}, {ENV_CERT} and {ENV_KEY}")
        return cls(values[ENV_CA], values[ENV_CERT], values[ENV_KEY])

    def env(self) -> dict[str, str]:
        return {ENV_CA: self.ca, ENV_CERT: self.cert, ENV_KEY: self.key}

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against the deployment's CA (and its address against the certificate's
        SANs), and presents this identity's certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, key, certificate) as bytes, for gRPC's ssl_channel_credentials."""
        with open(self.ca, "rb") as ca, open(self.key, "rb") as key, open(self.cert, "rb") as cert:
            return ca.read(), key.read(), cert.read()


def describe(exc: BaseException) -> str:
    """A TLS failure as a user reads it: "TLS handshake failed: <what the peer or the check said>"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (19, 20, 21):  # self-signed in chain / issuer not found / cannot verify leaf
            return (f"TLS handshake failed: unknown CA (the server's certificate is not from this deployment's CA: "
                    f"{exc.verify_message})")
        return f"TLS handshake failed: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        hint = " (the server wants this deployment's client certificate)" if "certificate" in reason else ""
        return f"TLS handshake failed: {reason}{hint}"
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return f"cannot read the TLS credentials: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class TlsRefused(Exception):
    """The server answered but the TLS handshake (or its certificate check, either side's) failed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def handshake(host: str, port: int, files: TlsFiles, timeout: float = 3.0,
              starttls_after: bytes | None = None) -> None:
    """A TLS handshake with our credentials, then one read (a TLS 1.3 server refuses a client certificate
    only after the handshake). Raises TlsRefused with the reason, or OSError when nothing answers.
    `starttls_after`: read this greeting in clear first (NATS sends its INFO line before the upgrade)."""
    try:
        ctx = files.client_context()
    except (OSError, ssl.SSLError) as exc:
        raise TlsRefused(describe(exc)) from None
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        if starttls_after is not None:
            greeting = b""
            while not greeting.endswith(b"\r\n") and len(greeting) < 65536:
                chunk = raw.recv(4096)
                if not chunk:
                    raise TlsRefused("closed the connection before its greeting")
                greeting += chunk
            if not greeting.startswith(starttls_after):
                raise TlsRefused(f"did not greet with {starttls_after!r}")
            if b'"tls_required":true' not in greeting.replace(b" ", b""):
                raise TlsRefused("the server does not offer TLS, and this deployment is secured")
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(0.5)  # both servers wait for the client to speak first
                try:
                    if tls.recv(1) == b"" and starttls_after is None:
                        raise TlsRefused("the server closed the connection after the handshake")
                except TimeoutError:
                    pass  # nothing to read, and no alert: accepted
        except ssl.SSLError as exc:
            raise TlsRefused(describe(exc)) from None
        except ConnectionResetError as exc:
            raise TlsRefused(f"the server reset the connection during the TLS handshake ({exc})") from None


def handshake_problem(host: str, port: int, files: TlsFiles, timeout: float = 3.0,
                      starttls_after: bytes | None = None) -> str | None:
    """handshake(), as a reason in words: None when our credentials are accepted."""
    try:
        handshake(host, port, files, timeout, starttls_after)
    except TlsRefused as exc:
        return exc.reason
    except OSError as exc:
        return describe(exc)
    return None
