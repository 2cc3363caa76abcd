"""A deployment's own trust: a CA, a server certificate for etcd and nats-server, and a client
certificate for every identity that talks to them (each process of the topology, and the operator).

Why certificates everywhere (mutual TLS), not passwords or NATS nkeys: one kind of credential serves
both servers. etcd authenticates a client by its certificate (`--client-cert-auth`), nats-server maps
a verified certificate to a user and that user's permissions (`verify_and_map`), so there is no
password to put in an argv, an environment or a log, and what crosses hosts is files only.

Layout, in the run directory (0700; every file 0600):

    credentials/ca.crt  ca.key           the deployment's CA (ca.key never leaves this host)
    credentials/server.crt server.key    etcd's and nats-server's (SANs: the topology's addresses)
    credentials/<identity>.crt .key      one per process, and `operator` (the launcher's CLI, the seed client)

A bundle (`launcher credentials export`) holds ca.crt and the identities' certificates and keys: what
another host's processes need to connect, and not what would let it mint identities or pose as a server.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.state import write_private
from workers.runtime.tls import OPERATOR, TlsFiles

__all__ = ["OPERATOR", "RESERVED_IDENTITIES", "Credentials", "CredentialsError", "identity_name"]

# Names a process may not have in a secured deployment: its certificate files would be the CA's, the
# servers', or the operator's (whose NATS permissions it would then share).
RESERVED_IDENTITIES = ("ca", "server", OPERATOR)
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity common TLS clients accept for a leaf
BUNDLE_MEMBERS_CA = "ca.crt"


class CredentialsError(Exception):
    pass


def identity_name(deployment: str, identity: str) -> str:
    """The certificate subject of an identity, as nats-server's verify_and_map reads it (RFC 2253)."""
    return f"CN={identity},O={deployment}"


def _name(deployment: str, common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, deployment),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Credentials:
    """The credentials folder of one run directory."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server(self) -> TlsFiles:
        return TlsFiles(str(self.ca), str(self.folder / "server.crt"), str(self.folder / "server.key"))

    def client(self, identity: str) -> TlsFiles:
        return TlsFiles(str(self.ca), str(self.folder / f"{identity}.crt"), str(self.folder / f"{identity}.key"))

    def exists(self) -> bool:
        return self.ca.exists()

    def can_issue(self) -> bool:
        """Only the host that made the CA (it has ca.key) can issue certificates."""
        return self.ca_key.exists()

    def missing(self, identities: Iterable[str]) -> list[str]:
        return [i for i in identities if not Path(self.client(i).cert).exists()]

    def ensure(self, deployment: str, hosts: Iterable[str], identities: Iterable[str]) -> list[str]:
        """Make what is missing: the CA once, the server certificate when an address is new, an identity's
        certificate once. Returns what was made (names only, never contents)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        made = []
        if not self.exists():
            self._make_ca(deployment)
            made.append("CA")
        if not self.can_issue():
            missing = self.missing(identities)
            if missing:
                raise CredentialsError(
                    f"the credentials in {self.folder} have no certificate for {', '.join(missing)} and this host "
                    "cannot issue one (only the host that made the CA can): export the bundle again there "
                    f"(`launcher credentials export {deployment} -o FILE`) and pass it with --credentials FILE")
            return made
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        wanted = sorted({"127.0.0.1", "localhost", *hosts})
        if self._server_hosts() != set(wanted):
            self._issue(ca_cert, ca_key, _name(deployment, "launcher-services"), self.server,
                        server_hosts=wanted)
            made.append(f"server certificate for {', '.join(wanted)}")
        for identity in self.missing(identities):
            self._issue(ca_cert, ca_key, _name(deployment, identity), self.client(identity))
            made.append(f"certificate of {identity}")
        return made

    def _server_hosts(self) -> set[str]:
        try:
            cert = x509.load_pem_x509_certificate(Path(self.server.cert).read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return set()
        return {str(n.value) for n in sans}

    def _make_ca(self, deployment: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(deployment, f"{deployment} launcher CA")
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(self.ca_key, _key_pem(key))
        write_private(self.ca, cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name,
               files: TlsFiles, server_hosts: list[str] | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server_hosts else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if server_hosts:  # etcd's peer port also uses it (client auth), hence both usages
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]),
                                            critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(Path(files.key), _key_pem(key))
        write_private(Path(files.cert), cert.public_bytes(serialization.Encoding.PEM))

    # --- the bundle another host receives ------------------------------------------------

    def export_bundle(self, out: Path) -> list[str]:
        """ca.crt and every identity's certificate and key, as a tar file written 0600. Returns its members."""
        if not self.exists():
            raise CredentialsError(f"no credentials in {self.folder}: `launcher up` makes them on the host that "
                                   "starts etcd and NATS")
        identities = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".crt", ".key")
                            and p.stem not in ("ca", "server") and not p.name.startswith("."))
        members = [BUNDLE_MEMBERS_CA, *identities]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for member in members:
                data = (self.folder / member).read_bytes()
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
        write_private(out, buf.getvalue())
        return members

    def import_bundle(self, bundle: Path) -> list[str]:
        """Unpack a bundle here; refuses members that are not plain credential files of this layout."""
        try:
            with tarfile.open(bundle, mode="r:gz") as tar:
                members = tar.getmembers()
                bad = [m.name for m in members if not m.isfile() or "/" in m.name or m.name.startswith(".")
                       or Path(m.name).suffix not in (".crt", ".key") or Path(m.name).stem in ("ca-key", "server")
                       or m.name == "ca.key"]
                if bad or BUNDLE_MEMBERS_CA not in {m.name for m in members}:
                    raise CredentialsError(f"{bundle} is not a credentials bundle of `launcher credentials export`"
                                           + (f" (unexpected: {', '.join(bad)})" if bad else " (no ca.crt)"))
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.folder.chmod(0o700)
                for m in members:
                    f = tar.extractfile(m)
                    assert f is not None
                    write_private(self.folder / m.name, f.read())
        except (OSError, tarfile.TarError) as exc:
            raise CredentialsError(f"cannot read the credentials bundle {bundle}: {exc}") from None
        return sorted(m.name for m in members)
